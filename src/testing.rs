//! Conformance suites for implementations of the crate's extension traits
//! (feature `testing`).
//!
//! A host that writes its own [`Backplane`] proves it behaves like ours with
//! one call in a test:
//!
//! ```no_run
//! # async fn run() {
//! use switchboard::MemoryBackplane;
//! // Two handles on the same engine, as two nodes would have.
//! let engine = MemoryBackplane::new();
//! switchboard::testing::backplane(engine.clone(), engine).await;
//! # }
//! ```
//!
//! The suite panics with a message naming the broken rule. It uses topics
//! prefixed with a random tag, so it can run against a shared engine.

use crate::backplane::{Backplane, Subscription};
use crate::transport::{memory, Frame, Handshake};
use crate::Hub;
use bytes::Bytes;
use futures::StreamExt;
use std::time::Duration;

pub use crate::presence::conformance::presence_store;

/// How long the suite waits for a message before declaring it lost.
const WAIT: Duration = Duration::from_secs(5);

async fn next(sub: &mut Subscription, what: &str) -> Bytes {
    match tokio::time::timeout(WAIT, sub.next()).await {
        Ok(Some(Ok(b))) => b,
        Ok(Some(Err(e))) => panic!("{what}: subscription yielded an error: {e}"),
        Ok(None) => panic!("{what}: subscription ended"),
        Err(_) => panic!("{what}: no message within {WAIT:?}"),
    }
}

/// Runs the [`Backplane`] conformance suite. `a` and `b` must be two handles
/// on the same engine (two nodes). Checks, in order:
///
/// 1. a message published on `a` reaches a subscriber on `b`, unchanged
///    (binary-safe, including a 64 KiB message);
/// 2. 500 messages from one publisher arrive in publish order;
/// 3. topics are isolated;
/// 4. two subscriptions to one topic both receive;
/// 5. dropping a subscription unsubscribes, and subscribing again receives
///    only messages published after;
/// 6. two [`Hub`]s, one on each handle, deliver a room publish across, once.
pub async fn backplane<B: Backplane + Clone>(a: B, b: B) {
    let tag = format!("conf{:x}", std::process::id() as u64 ^ crate::util::random_u64());
    let t = |name: &str| format!("{tag}.{name}");

    // 1. Delivery across nodes, binary-safe.
    let mut sub_b = b.subscribe(&t("one")).await.expect("subscribe");
    let payloads =
        [Bytes::from_static(b"hello"), Bytes::from_static(&[0, 255, 10, 13, 0]), Bytes::from(vec![7u8; 64 * 1024])];
    for p in &payloads {
        a.publish(&t("one"), p.clone()).await.expect("publish");
        let got = next(&mut sub_b, "1. cross-node delivery").await;
        assert_eq!(&got, p, "1. message changed in transit");
    }

    // 2. Order per publisher.
    for i in 0..500u32 {
        a.publish(&t("one"), Bytes::from(i.to_be_bytes().to_vec())).await.expect("publish");
    }
    for i in 0..500u32 {
        let got = next(&mut sub_b, "2. ordered delivery").await;
        assert_eq!(got.as_ref(), i.to_be_bytes(), "2. messages reordered or lost at #{i}");
    }

    // 3. Isolation: a message to another topic does not arrive here.
    let mut sub_other = b.subscribe(&t("other")).await.expect("subscribe");
    a.publish(&t("one"), Bytes::from_static(b"for one")).await.expect("publish");
    a.publish(&t("other"), Bytes::from_static(b"for other")).await.expect("publish");
    assert_eq!(next(&mut sub_other, "3. isolation").await.as_ref(), b"for other", "3. topic leaked");
    assert_eq!(next(&mut sub_b, "3. isolation").await.as_ref(), b"for one", "3. topic leaked");
    drop(sub_other);

    // 4. Two subscriptions to the same topic.
    let mut sub_b2 = b.subscribe(&t("one")).await.expect("subscribe");
    a.publish(&t("one"), Bytes::from_static(b"both")).await.expect("publish");
    assert_eq!(next(&mut sub_b, "4. first subscription").await.as_ref(), b"both");
    assert_eq!(next(&mut sub_b2, "4. second subscription").await.as_ref(), b"both");

    // 5. Unsubscribe by drop; a new subscription sees only new messages.
    drop(sub_b);
    drop(sub_b2);
    a.publish(&t("one"), Bytes::from_static(b"nobody")).await.expect("publish");
    let mut again = b.subscribe(&t("one")).await.expect("subscribe");
    a.publish(&t("one"), Bytes::from_static(b"fresh")).await.expect("publish");
    let got = next(&mut again, "5. resubscribe").await;
    assert_eq!(got.as_ref(), b"fresh", "5. a new subscription received a message published before it");
    drop(again);

    // 6. Two hubs, one per handle.
    hubs_deliver_across(a, b, &tag).await;
}

async fn hubs_deliver_across<B: Backplane + Clone>(a: B, b: B, tag: &str) {
    let hub_a = Hub::builder().backplane(a).build();
    let hub_b = Hub::builder().backplane(b).build();
    let room = format!("{tag}-room");
    let mut peer_a = join(&hub_a, &room).await;
    let mut peer_b = join(&hub_b, &room).await;
    hub_a.publish(&room, "ping", &1).await.expect("6. publish through the backplane");
    for (peer, name) in [(&mut peer_a, "publishing hub"), (&mut peer_b, "other hub")] {
        let v = recv_event(peer, name).await;
        assert_eq!(v["event"], "ping", "6. {name} got the wrong event: {v}");
    }
    // Exactly once: a second publish is the next event on both.
    hub_b.publish(&room, "pong", &2).await.expect("6. publish through the backplane");
    for (peer, name) in [(&mut peer_a, "other hub"), (&mut peer_b, "publishing hub")] {
        let v = recv_event(peer, name).await;
        assert_eq!(v["event"], "pong", "6. {name} got a duplicate or stray event: {v}");
    }
}

async fn join(hub: &Hub, room: &str) -> memory::MemoryPeer {
    let (transport, mut peer) = memory::pair(64);
    let hub2 = hub.clone();
    tokio::spawn(async move {
        let _ = hub2.connect(transport, Handshake::new()).await;
    });
    let join = serde_json::json!({"type": "join", "ref": 1, "room": room}).to_string();
    peer.send(Frame::Text(join.into())).await.expect("send join");
    loop {
        let v = recv_json(&mut peer, "join").await;
        if v["type"] == "reply" && v["ref"] == 1 {
            return peer;
        }
        assert_ne!(v["type"], "error", "6. join failed: {v}");
    }
}

async fn recv_json(peer: &mut memory::MemoryPeer, what: &str) -> serde_json::Value {
    loop {
        match tokio::time::timeout(WAIT, peer.recv()).await {
            Ok(Some(Frame::Text(t))) => return serde_json::from_slice(&t).expect("valid JSON"),
            Ok(Some(_)) => continue,
            Ok(None) => panic!("6. {what}: connection closed"),
            Err(_) => panic!("6. {what}: nothing within {WAIT:?}"),
        }
    }
}

async fn recv_event(peer: &mut memory::MemoryPeer, what: &str) -> serde_json::Value {
    loop {
        let v = recv_json(peer, what).await;
        if v["type"] == "event" {
            return v;
        }
    }
}

/// Runs the [`HistoryStore`](crate::history::HistoryStore) conformance
/// suite. Checks, in order:
///
/// 1. appends get consecutive offsets from 1 in one epoch, also when 200 are
///    made concurrently;
/// 2. reading after a position returns exactly the later events, oldest
///    first, `complete`, with the top position;
/// 3. a read cut by its limit is not `complete`; one from another epoch or
///    beyond the top returns nothing and is not `complete`;
/// 4. events beyond `max_len` are trimmed, and a read that would need them
///    is not `complete`;
/// 5. an idempotency key stores once and returns the original position;
/// 6. rooms are separate streams.
pub async fn history<H: crate::history::HistoryStore + Clone>(store: H) {
    use crate::history::{Append, Retention, StreamPosition};
    let tag = format!("hist{:x}", crate::util::random_u64());
    let room = |n: &str| format!("{tag}-{n}");
    let retention = Retention::default().max_len(50);
    let append = |event: &str, key: Option<&str>| Append {
        event: event.to_owned(),
        data: Some(crate::protocol::Payload::encode(crate::protocol::Format::Json, &event).expect("encode")),
        idempotency_key: key.map(str::to_owned),
        retention,
    };

    // 1. Consecutive offsets, also under concurrency.
    let first = store.append(&room("a"), append("e1", None)).await.expect("append");
    assert_eq!(first.position.offset, 1, "1. the first offset is 1");
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let (store, room) = (store.clone(), room("c"));
            let a = append(&format!("c{i}"), None);
            tokio::spawn(async move { store.append(&room, a).await.expect("append").position.offset })
        })
        .collect();
    let mut offsets = Vec::new();
    for t in tasks {
        offsets.push(t.await.expect("task"));
    }
    offsets.sort_unstable();
    assert_eq!(offsets, (1..=200).collect::<Vec<u64>>(), "1. concurrent appends got duplicate or missing offsets");

    // 2. Exact reads.
    for i in 2..=5 {
        let a = store.append(&room("a"), append(&format!("e{i}"), None)).await.expect("append");
        assert_eq!(a.position.offset, i, "1. offsets must be consecutive");
        assert_eq!(a.position.epoch, first.position.epoch, "1. the epoch changed without a reason");
    }
    let read = store.read(&room("a"), Some(first.position.clone()), 100).await.expect("read");
    assert!(read.complete, "2. a read of retained events must be complete");
    let got: Vec<(u64, String)> = read.publications.iter().map(|p| (p.offset, p.event.clone())).collect();
    assert_eq!(got, (2..=5).map(|i| (i, format!("e{i}"))).collect::<Vec<_>>(), "2. wrong events");
    assert_eq!(read.top.offset, 5, "2. wrong top");
    let data: String = read.publications[0].data.as_ref().expect("2. data kept").decode().expect("decode");
    assert_eq!(data, "e2", "2. payload changed");

    // 3. Limits, foreign epochs, offsets beyond the top.
    let read = store.read(&room("a"), Some(first.position.clone()), 2).await.expect("read");
    assert!(!read.complete && read.publications.len() == 2, "3. a read cut by its limit is not complete");
    for bad in [
        StreamPosition { offset: 1, epoch: format!("{}x", first.position.epoch).into() },
        StreamPosition { offset: 99, epoch: first.position.epoch.clone() },
    ] {
        let read = store.read(&room("a"), Some(bad.clone()), 100).await.expect("read");
        assert!(!read.complete && read.publications.is_empty(), "3. {bad:?} must not replay");
    }

    // 4. Trimming beyond max_len.
    let small = Retention::default().max_len(3);
    let mut last = None;
    for i in 0..6 {
        let a = Append { retention: small, ..append(&format!("t{i}"), None) };
        last = Some(store.append(&room("t"), a).await.expect("append").position);
    }
    let epoch = last.expect("appended").epoch;
    let read =
        store.read(&room("t"), Some(StreamPosition { offset: 1, epoch: epoch.clone() }), 100).await.expect("read");
    assert!(!read.complete, "4. offsets 2 and 3 were trimmed: the read must not be complete");
    let read = store.read(&room("t"), Some(StreamPosition { offset: 3, epoch }), 100).await.expect("read");
    assert!(read.complete, "4. offsets 4..=6 are retained");
    assert_eq!(read.publications.len(), 3);

    // 5. Idempotency.
    let a = store.append(&room("i"), append("x", Some("key-1"))).await.expect("append");
    let b = store.append(&room("i"), append("x", Some("key-1"))).await.expect("append");
    assert!(!a.duplicate && b.duplicate, "5. the retry must be reported as a duplicate");
    assert_eq!(a.position, b.position, "5. the duplicate must return the original position");
    let c = store.append(&room("i"), append("y", Some("key-2"))).await.expect("append");
    assert_eq!(c.position.offset, 2, "5. a duplicate must not take an offset");

    // 6. Rooms are separate.
    let other = store.append(&room("other"), append("o", None)).await.expect("append");
    assert_eq!(other.position.offset, 1, "6. each room has its own offsets");

    // 7. A read of a room without a stream creates it: its epoch is the one
    //    the first append keeps, and a position from it continues.
    let fresh = store.read(&room("fresh"), None, 10).await.expect("read");
    assert_eq!(fresh.top.offset, 0, "7. a fresh room starts at offset 0");
    assert!(!fresh.top.epoch.is_empty(), "7. a read must create the stream's epoch");
    let a = store.append(&room("fresh"), append("f1", None)).await.expect("append");
    assert_eq!(a.position.epoch, fresh.top.epoch, "7. the first append must keep the epoch a read created");
    let read = store.read(&room("fresh"), Some(fresh.top.clone()), 10).await.expect("read");
    assert!(read.complete && read.publications.len() == 1, "7. a position from the fresh read continues");
}
