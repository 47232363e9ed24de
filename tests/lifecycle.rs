//! Connection lifecycle: heartbeats, slow consumers, graceful shutdown,
//! churn, host and client closes.

mod support;

use futures::{FutureExt, SinkExt, StreamExt};
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::*;
use switchboard::protocol::CloseCode;
use switchboard::transport::memory::{self, MemoryPeer};
use switchboard::transport::{CloseFrame, Frame, Handshake};
use switchboard::{hub::Connection, hub::DisconnectReason, hub::OverflowPolicy, Hub, HubBuilder, HubConfig};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

/// What the `on_disconnect` hook saw: (connection, reason, peak queued bytes).
type Ended = Arc<Mutex<Vec<(u64, DisconnectReason, usize)>>>;

/// Adds an `on_disconnect` hook that records every ended connection.
fn record_disconnects(builder: HubBuilder) -> (HubBuilder, Ended) {
    let ended: Ended = Arc::default();
    let log = ended.clone();
    let builder = builder.on_disconnect(move |c: &Connection, reason: &DisconnectReason| {
        log.lock().unwrap().push((c.id().get(), reason.clone(), c.peak_queued_bytes()));
    });
    (builder, ended)
}

fn reasons(ended: &Ended) -> Vec<DisconnectReason> {
    ended.lock().unwrap().iter().map(|e| e.1.clone()).collect()
}

fn text(frame: &Frame) -> Value {
    match frame {
        Frame::Text(b) => serde_json::from_slice(b).unwrap(),
        other => panic!("expected a text frame, got {other:?}"),
    }
}

/// Connects an in-memory peer to `hub` (served on a spawned task) and reads
/// its `hello`.
async fn memory_peer(hub: &Hub, native_ping: bool) -> MemoryPeer {
    let (transport, mut peer) = memory::pair(64);
    let transport = if native_ping { transport } else { transport.without_native_ping() };
    let hub = hub.clone();
    tokio::spawn(async move { hub.connect(transport, Handshake::new()).await.unwrap() });
    let hello = text(&peer.recv().await.expect("hello"));
    assert_eq!(hello["type"], "hello", "{hello}");
    peer
}

fn heartbeat_25_10() -> HubConfig {
    HubConfig::default().heartbeat_interval(Duration::from_secs(25)).heartbeat_timeout(Duration::from_secs(10))
}

#[tokio::test(start_paused = true)]
async fn silent_peer_is_pinged_then_closed_with_4001() {
    let (builder, ended) = record_disconnects(Hub::builder().config(heartbeat_25_10()));
    let hub = builder.build();
    let t0 = Instant::now();
    let mut peer = memory_peer(&hub, true).await;

    tokio::time::sleep_until(t0 + Duration::from_millis(24_900)).await;
    assert!(peer.recv().now_or_never().is_none(), "something sent before the first interval");
    let ping = peer.recv().await.expect("ping");
    assert_eq!(ping, Frame::Ping(Default::default()));
    let at = t0.elapsed();
    assert!(at >= Duration::from_secs(25) && at <= Duration::from_millis(25_100), "ping at {at:?}");

    tokio::time::sleep_until(t0 + Duration::from_millis(34_900)).await;
    assert!(peer.recv().now_or_never().is_none(), "closed before interval + timeout");
    assert_eq!(hub.stats().connections, 1);
    assert!(ended.lock().unwrap().is_empty());

    let close = peer.recv().await.expect("close frame");
    let at = t0.elapsed();
    assert!(at <= Duration::from_millis(35_100), "closed only at {at:?}");
    match close {
        Frame::Close(Some(CloseFrame { code, .. })) => assert_eq!(code, CloseCode::HEARTBEAT_TIMEOUT),
        other => panic!("expected close 4001, got {other:?}"),
    }
    // Complete the close handshake; the hook reports the timeout.
    let _ =
        peer.send(Frame::Close(Some(CloseFrame { code: CloseCode::HEARTBEAT_TIMEOUT, reason: String::new() }))).await;
    eventually("hook ran", || !ended.lock().unwrap().is_empty()).await;
    assert_eq!(reasons(&ended), vec![DisconnectReason::HeartbeatTimeout]);
    eventually("all gone", || hub.stats() == Default::default()).await;
}

/// Answers `rounds` heartbeats with `answer`, checking each ping is
/// `interval` after the previous one and nothing else arrives.
async fn answer_heartbeats(peer: &mut MemoryPeer, rounds: u32, is_ping: impl Fn(&Frame) -> bool, answer: Frame) {
    let mut last = Instant::now();
    for i in 0..rounds {
        let frame = peer.recv().await.expect("connection closed");
        assert!(is_ping(&frame), "round {i}: expected a heartbeat ping, got {frame:?}");
        let gap = last.elapsed();
        assert!(
            gap >= Duration::from_millis(24_900) && gap <= Duration::from_millis(25_100),
            "round {i}: ping after {gap:?}"
        );
        last = Instant::now();
        peer.send(answer.clone()).await.unwrap();
    }
}

#[tokio::test(start_paused = true)]
async fn peer_answering_pings_stays_open() {
    let (builder, ended) = record_disconnects(Hub::builder().config(heartbeat_25_10()));
    let hub = builder.build();
    let mut peer = memory_peer(&hub, true).await;
    answer_heartbeats(&mut peer, 10, |f| matches!(f, Frame::Ping(_)), Frame::Pong(Default::default())).await;
    assert_eq!(hub.stats().connections, 1);
    assert!(ended.lock().unwrap().is_empty(), "closed: {:?}", reasons(&ended));
    // Still fully usable.
    peer.send(Frame::Text(r#"{"type":"ping","ref":5}"#.into())).await.unwrap();
    assert_eq!(text(&peer.recv().await.unwrap()), json!({"type": "pong", "ref": 5}));
}

#[tokio::test(start_paused = true)]
async fn transport_without_native_ping_gets_protocol_pings() {
    let (builder, ended) = record_disconnects(Hub::builder().config(heartbeat_25_10()));
    let hub = builder.build();
    let mut peer = memory_peer(&hub, false).await;
    let is_ping = |f: &Frame| matches!(f, Frame::Text(_)) && text(f) == json!({"type": "ping"});
    answer_heartbeats(&mut peer, 10, is_ping, Frame::Text(r#"{"type":"pong"}"#.into())).await;
    assert_eq!(hub.stats().connections, 1);
    assert!(ended.lock().unwrap().is_empty(), "closed: {:?}", reasons(&ended));

    // And one that stops answering is closed like a native one.
    let t = Instant::now();
    let frame = peer.recv().await.unwrap();
    assert!(is_ping(&frame), "{frame:?}");
    match peer.recv().await.unwrap() {
        Frame::Close(Some(c)) => assert_eq!(c.code, CloseCode::HEARTBEAT_TIMEOUT),
        other => panic!("expected close 4001, got {other:?}"),
    }
    assert!(t.elapsed() <= Duration::from_millis(35_100), "closed only after {:?}", t.elapsed());
}

/// A one-way transport (`Capabilities::bidirectional` false, as SSE): the
/// peer cannot answer, so a ping the writer flushed is the answer. A peer
/// that reads stays; one that stops reading (the flush never finishes) is
/// closed by the heartbeat timeout.
#[tokio::test(start_paused = true)]
async fn one_way_transport_a_flushed_ping_is_the_answer() {
    let (builder, ended) = record_disconnects(Hub::builder().config(heartbeat_25_10()));
    let hub = builder.build();
    let (transport, mut peer) = memory::pair(1);
    tokio::spawn({
        let hub = hub.clone();
        async move { hub.connect(transport.one_way(), Handshake::new()).await.unwrap() }
    });
    assert_eq!(text(&peer.recv().await.unwrap())["type"], "hello");
    for round in 0..10 {
        let frame = peer.recv().await.unwrap();
        assert!(matches!(frame, Frame::Ping(_)), "round {round}: {frame:?}");
    }
    assert_eq!(hub.stats().connections, 1);
    assert!(ended.lock().unwrap().is_empty(), "closed: {:?}", reasons(&ended));

    // Stop reading: the channel (one frame) fills, the next ping's flush
    // never finishes, and the heartbeat times out.
    let t = Instant::now();
    // (Two rounds at most, then the close timeout for a writer that cannot
    // write its close frame.)
    tokio::time::sleep(Duration::from_secs(200)).await;
    assert_eq!(reasons(&ended), [DisconnectReason::HeartbeatTimeout], "after {:?}", t.elapsed());
    drop(peer);
}

#[tokio::test(start_paused = true)]
async fn heartbeat_ping_is_not_dropped_as_data_under_drop_oldest() {
    let config = heartbeat_25_10().outbound_queue_bytes(2048).overflow(OverflowPolicy::DropOldest);
    let (builder, ended) = record_disconnects(Hub::builder().config(config));
    let hub = builder.build();
    // A small channel: the peer stops reading and the server queue fills.
    let (transport, mut peer) = memory::pair(2);
    tokio::spawn({
        let hub = hub.clone();
        async move { hub.connect(transport, Handshake::new()).await.unwrap() }
    });
    let hello = text(&peer.recv().await.unwrap());
    peer.send(Frame::Text(r#"{"type":"join","ref":1,"room":"r"}"#.into())).await.unwrap();
    assert_eq!(text(&peer.recv().await.unwrap())["type"], "reply");
    let conn = hub.connection(member_id(&hub, "r", hello["data"]["connection_id"].as_u64().unwrap())).unwrap();

    let pad = "z".repeat(200);
    let publish = |n: u64| hub.publish("r", "m", &json!({"n": n, "pad": pad}));
    // The first few one at a time, so the writer takes each alone and ends
    // up blocked on the full channel with a one-message batch; the rest
    // pile up in the queue behind it, and the oldest are dropped.
    for n in 0..10 {
        publish(n).await.unwrap();
        tokio::task::yield_now().await;
    }
    for n in 10..100 {
        publish(n).await.unwrap();
    }
    assert!(conn.dropped_messages() > 0, "the queue never filled");
    // The heartbeat pings while the queue is full, then more data churns
    // through the queue: the ping must survive it.
    tokio::time::sleep(Duration::from_millis(25_500)).await;
    for n in 100..200 {
        publish(n).await.unwrap();
    }

    let reader = tokio::spawn(async move {
        let (mut events, mut dropped, mut pinged) = (Vec::new(), 0, false);
        loop {
            match peer.recv().await.expect("closed") {
                Frame::Ping(_) => {
                    pinged = true;
                    peer.send(Frame::Pong(Default::default())).await.unwrap();
                }
                f => {
                    let m = text(&f);
                    match m["type"].as_str() {
                        Some("lagged") => dropped += m["data"]["dropped"].as_u64().unwrap(),
                        Some("event") if m["event"] == "end" => return (events, dropped, pinged, peer),
                        Some("event") => events.push(m["data"]["n"].as_u64().unwrap()),
                        _ => panic!("unexpected {m}"),
                    }
                }
            }
        }
    });
    eventually("queue drained", || conn.queued_bytes() == 0).await;
    hub.publish("r", "end", &json!(null)).await.unwrap();
    let (events, dropped, pinged, _peer) = reader.await.unwrap();
    assert!(pinged, "the heartbeat ping was dropped with the data");
    assert!(events.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(events.len() as u64 + dropped, 200, "lagged counts must count data messages only");
    assert_eq!(conn.dropped_messages(), dropped);
    assert!(ended.lock().unwrap().is_empty(), "closed: {:?}", reasons(&ended));
}

#[tokio::test]
async fn heartbeat_over_a_real_socket() {
    let interval = Duration::from_millis(300);
    let config = HubConfig::default().heartbeat_interval(interval).heartbeat_timeout(interval).close_timeout(interval);
    let (builder, ended) = record_disconnects(Hub::builder().config(config));
    let hub = builder.build();
    let addr = serve(&hub).await;
    // `silent` is never polled after its hello, so tungstenite never answers
    // the server's pings; `live` keeps reading and auto-pongs.
    let mut silent = connect(addr).await;
    let mut live = connect(addr).await;
    silent.join_ok("r").await;
    live.join_ok("r").await;
    let silent_id = member_id(&hub, "r", silent.connection_id());
    let live_id = member_id(&hub, "r", live.connection_id());

    let mut pings = 0;
    while pings < 5 || hub.connection(silent_id).is_some() {
        let msg = tokio::time::timeout(WAIT, live.ws.next()).await.expect("live client: nothing for a while");
        match msg.expect("live client: stream ended").expect("live client: read error") {
            Message::Ping(_) => pings += 1,
            other => panic!("live client: unexpected {other:?}"),
        }
    }
    let live_conn = hub.connection(live_id).expect("the answering client was closed");
    assert_eq!(live_conn.state(), switchboard::hub::ConnectionState::Open);
    assert_eq!(hub.room_len("r"), 1);

    // The silent client's socket holds pings, then the close 4001.
    let mut silent_pings = 0;
    let code = loop {
        let msg = tokio::time::timeout(WAIT, silent.ws.next()).await.expect("silent client: no close");
        match msg {
            Some(Ok(Message::Ping(_))) => silent_pings += 1,
            Some(Ok(Message::Close(f))) => break f.map(|f| u16::from(f.code)),
            other => panic!("silent client: unexpected {other:?}"),
        }
    };
    assert!(silent_pings >= 1, "closed without being pinged");
    assert_eq!(code, Some(4001));
    eventually("hook ran", || !ended.lock().unwrap().is_empty()).await;
    assert_eq!(reasons(&ended), vec![DisconnectReason::HeartbeatTimeout]);
    assert_eq!(ended.lock().unwrap()[0].0, silent_id.get());
}

const BOUND: usize = 64 * 1024;
/// Messages published at least; more if the kernel's socket buffers have
/// not filled yet (they absorb several MB before the server queue fills).
const MIN_MESSAGES: u64 = 2_000;
const MAX_MESSAGES: u64 = 40_000;
/// How far the publisher may run ahead of the fast reader (in messages of
/// ~4 KiB): keeps the fast reader's server-side queue well under the bound.
const WINDOW: u64 = 6;

/// The fast reader's task: its event count and its (still connected) client.
type FastReader = tokio::task::JoinHandle<(u64, Client)>;

/// A spawned reader that checks `m` events arrive in order with no gap and
/// reports each index; it stops at the `end` event.
fn fast_reader(mut c: Client) -> (FastReader, tokio::sync::mpsc::UnboundedReceiver<u64>) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        let mut next = 0u64;
        loop {
            let e = c.event().await;
            if e["event"] == "end" {
                return (next, c);
            }
            let n = e["data"]["n"].as_u64().unwrap();
            assert_eq!(n, next, "fast client: gap or reordering");
            next += 1;
            let _ = tx.send(n);
        }
    });
    (task, rx)
}

/// Publishes ~4 KiB events `0..` to `room`, paced by the fast reader, until
/// `done()` holds and at least `MIN_MESSAGES` went out. Returns the count.
async fn publish_paced(
    hub: &Hub,
    room: &str,
    progress: &mut tokio::sync::mpsc::UnboundedReceiver<u64>,
    mut done: impl FnMut() -> bool,
) -> u64 {
    let pad = "x".repeat(4000);
    let mut received = 0u64;
    let mut n = 0u64;
    while n < MIN_MESSAGES || !done() {
        assert!(n < MAX_MESSAGES, "the slow client never overflowed");
        hub.publish(room, "m", &json!({"n": n, "pad": pad})).await.unwrap();
        n += 1;
        while n - received > WINDOW {
            received = progress.recv().await.expect("fast reader stopped") + 1;
        }
    }
    n
}

#[tokio::test]
async fn slow_consumer_is_disconnected() {
    let config = HubConfig::default().outbound_queue_bytes(BOUND).close_timeout(Duration::from_millis(200));
    let (builder, ended) = record_disconnects(Hub::builder().config(config));
    let hub = builder.build();
    let addr = serve(&hub).await;
    let mut fast = connect(addr).await;
    let mut slow = connect(addr).await;
    fast.join_ok("r").await;
    slow.join_ok("r").await;
    let slow_id = member_id(&hub, "r", slow.connection_id());
    let slow_conn = hub.connection(slow_id).unwrap();
    let (reader, mut progress) = fast_reader(fast);

    let published = publish_paced(&hub, "r", &mut progress, || hub.room_len("r") == 1).await;
    hub.publish("r", "end", &json!(null)).await.unwrap();
    let (count, _fast) = reader.await.unwrap();
    assert_eq!(count, published, "fast client missed events");

    eventually("slow client's hook ran", || !ended.lock().unwrap().is_empty()).await;
    let (id, reason, peak) = ended.lock().unwrap()[0].clone();
    assert_eq!((id, reason), (slow_id.get(), DisconnectReason::SlowConsumer));
    assert!(peak > 0 && peak <= BOUND, "peak queued bytes {peak} outside (0, {BOUND}]");
    assert!(slow_conn.peak_queued_bytes() <= BOUND);
    // Closed, not lagging: nothing counts as dropped, though the room's
    // log went on without it.
    assert_eq!(slow_conn.dropped_messages(), 0);

    // Reading now, the slow client gets what the kernel held, then the end.
    match expect_close(&mut slow.ws).await {
        None | Some(4000) => {}
        Some(other) => panic!("slow client closed with {other}"),
    }
    assert_eq!(hub.stats().connections, 1);
}

#[tokio::test]
async fn slow_consumer_under_drop_oldest_lags() {
    let config = HubConfig::default().outbound_queue_bytes(BOUND).overflow(OverflowPolicy::DropOldest);
    let (builder, ended) = record_disconnects(Hub::builder().config(config));
    let hub = builder.build();
    let addr = serve(&hub).await;
    let mut fast = connect(addr).await;
    let mut slow = connect(addr).await;
    fast.join_ok("r").await;
    slow.join_ok("r").await;
    let slow_conn = hub.connection(member_id(&hub, "r", slow.connection_id())).unwrap();
    let (reader, mut progress) = fast_reader(fast);

    let published = publish_paced(&hub, "r", &mut progress, || slow_conn.dropped_messages() > 0).await;
    assert!(slow_conn.peak_queued_bytes() <= BOUND);
    assert_eq!(hub.room_len("r"), 2, "the slow client was disconnected under drop-oldest");

    // The slow client reads at last; once its queue is empty, the end marker
    // fits and follows everything else.
    let slow_reader = tokio::spawn(async move {
        let (mut events, mut dropped) = (Vec::new(), 0u64);
        loop {
            let m = slow.recv().await;
            match m["type"].as_str() {
                Some("lagged") => {
                    let n = m["data"]["dropped"].as_u64().unwrap();
                    assert!(n > 0, "{m}");
                    dropped += n;
                }
                Some("event") if m["event"] == "end" => return (events, dropped),
                Some("event") => events.push(m["data"]["n"].as_u64().unwrap()),
                _ => panic!("slow client: unexpected {m}"),
            }
        }
    });
    eventually("slow client's queue drained", || slow_conn.queued_bytes() == 0).await;
    hub.publish("r", "end", &json!(null)).await.unwrap();
    let (count, _fast) = reader.await.unwrap();
    assert_eq!(count, published, "fast client missed events");
    let (events, dropped) = slow_reader.await.unwrap();

    assert!(dropped > 0, "no lagged notice");
    assert!(events.windows(2).all(|w| w[0] < w[1]), "slow client's events out of order");
    assert_eq!(events.len() as u64 + dropped, published, "every event is either delivered or counted as dropped");
    assert_eq!(slow_conn.dropped_messages(), dropped);
    assert!(ended.lock().unwrap().is_empty(), "closed: {:?}", reasons(&ended));
    assert_eq!(slow_conn.state(), switchboard::hub::ConnectionState::Open);
}

/// Reads a client until close: the events' data, then the close code.
async fn read_to_close(c: &mut Client) -> (Vec<Value>, Option<u16>) {
    let mut events = Vec::new();
    loop {
        let msg = tokio::time::timeout(WAIT, c.ws.next()).await.expect("no close");
        match msg {
            Some(Ok(Message::Text(t))) => {
                let v: Value = serde_json::from_str(&t).unwrap();
                assert_eq!(v["type"], "event", "{v}");
                events.push(v["data"].clone());
            }
            Some(Ok(Message::Close(f))) => {
                // Keep polling so tungstenite sends its close reply, as a
                // well-behaved client does, until the server ends the socket.
                while let Some(Ok(_)) = tokio::time::timeout(WAIT, c.ws.next()).await.expect("socket not ended") {}
                return (events, f.map(|f| u16::from(f.code)));
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            other => panic!("unexpected {other:?} before the close frame"),
        }
    }
}

#[tokio::test]
async fn graceful_shutdown_drains_then_closes_with_1001() {
    let (builder, ended) = record_disconnects(Hub::builder().authenticate(|hs: &Handshake| {
        let user = hs.query("user");
        async move { Ok(user.map(switchboard::Identity::user).unwrap_or_default()) }
    }));
    let hub = builder.build();
    let addr = serve(&hub).await;
    let mut clients = Vec::new();
    for i in 0..6 {
        let mut c = connect_path(addr, &format!("/?user=u{}", i % 3)).await;
        if i % 2 == 0 {
            c.join_ok("r").await;
        }
        if i % 3 == 0 {
            c.join_ok("s").await;
        }
        clients.push(c);
    }
    assert_eq!(hub.stats().rooms, 2);

    // Queued before the shutdown starts: must all be written before 1001.
    const N: u64 = 200;
    for n in 0..N {
        hub.publish("r", "m", &json!(n)).await.unwrap();
    }
    // Its first poll closes every connection, before any writer has run:
    // the 200 events are all still queued when the close is decided.
    let shutdown = hub.shutdown(Duration::from_secs(5));
    tokio::pin!(shutdown);
    assert!(futures::poll!(&mut shutdown).is_pending());
    assert!(hub.is_shutting_down());
    let reads = futures::future::join_all(clients.iter_mut().map(read_to_close));
    let ((), results) = tokio::join!(shutdown, reads);
    for (i, (events, code)) in results.into_iter().enumerate() {
        let expected: Vec<Value> = if i % 2 == 0 { (0..N).map(|n| json!(n)).collect() } else { Vec::new() };
        assert_eq!(events, expected, "client {i}");
        assert_eq!(code, Some(1001), "client {i}");
    }
    assert_eq!(hub.stats().connections, 0);
    assert!(hub.is_shutting_down());
    eventually("all counts zero", || hub.stats() == Default::default()).await;
    assert_eq!(reasons(&ended), vec![DisconnectReason::ServerShutdown; 6]);

    // No new connections: the listener is gone or answers 503.
    match tokio_tungstenite::connect_async(format!("ws://{addr}/")).await {
        Ok(_) => panic!("connected after shutdown"),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 503),
        Err(_) => {}
    }
}

#[tokio::test]
async fn shutdown_resolves_only_when_every_connection_has_ended() {
    // A host typically returns from main once `shutdown` resolves; anything
    // still draining then is lost. So when it resolves, every connection
    // must have finished (its hook has run).
    let (builder, ended) = record_disconnects(Hub::builder());
    let hub = builder.build();
    let addr = serve(&hub).await;
    let mut clients = Vec::new();
    for _ in 0..4 {
        let mut c = connect(addr).await;
        c.join_ok("r").await;
        clients.push(c);
    }
    let readers: Vec<_> =
        clients.into_iter().map(|mut c| tokio::spawn(async move { read_to_close(&mut c).await })).collect();
    let pad = "y".repeat(2000);
    for n in 0..200 {
        hub.publish("r", "m", &json!({"n": n, "pad": pad})).await.unwrap();
    }
    hub.shutdown(Duration::from_secs(5)).await;
    assert_eq!(ended.lock().unwrap().len(), 4, "shutdown resolved while connections were still closing");
    for r in readers {
        let (events, code) = r.await.unwrap();
        assert_eq!(events.len(), 200);
        assert_eq!(code, Some(1001));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_leaves_nothing_behind() {
    const CYCLES: usize = 2_000;
    let (builder, ended) = record_disconnects(Hub::builder().authenticate(|hs: &Handshake| {
        let user = hs.query("user");
        async move { Ok(user.map(switchboard::Identity::user).unwrap_or_default()) }
    }));
    let hub = builder.build();
    let addr = serve(&hub).await;
    futures::stream::iter(0..CYCLES)
        .for_each_concurrent(50, |i| async move {
            let mut c = connect_path(addr, &format!("/?user=u{}", i % 7)).await;
            c.join_ok(&format!("room-{}", i % 5)).await;
            if i % 2 == 0 {
                c.ws.close(None).await.unwrap();
                while let Some(Ok(_)) = c.ws.next().await {}
            } else {
                drop(c); // no close frame
            }
        })
        .await;
    eventually("all counts zero", || hub.stats() == Default::default()).await;
    eventually("every hook ran", || ended.lock().unwrap().len() == CYCLES).await;
    let reasons = reasons(&ended);
    let clean = reasons.iter().filter(|r| matches!(r, DisconnectReason::ClientClosed { .. })).count();
    let lost = reasons.iter().filter(|r| **r == DisconnectReason::ConnectionLost).count();
    assert_eq!((clean, lost), (CYCLES / 2, CYCLES / 2));
}

#[tokio::test]
async fn host_disconnect_closes_with_its_code() {
    let (builder, ended) = record_disconnects(Hub::builder());
    let hub = builder.build();
    let addr = serve(&hub).await;
    let mut c = connect(addr).await;
    c.join_ok("r").await;
    let id = member_id(&hub, "r", c.connection_id());
    hub.publish("r", "before", &json!(1)).await.unwrap();
    assert!(hub.disconnect(id, CloseCode::KICKED, "bye"));
    // What was queued first is still delivered, then the close.
    assert_eq!(c.event().await["event"], "before");
    assert_eq!(expect_close_frame(&mut c.ws).await, Some((4500, "bye".to_owned())));
    eventually("hook ran", || !ended.lock().unwrap().is_empty()).await;
    assert_eq!(reasons(&ended), vec![DisconnectReason::Host(CloseCode::KICKED)]);
    eventually("all gone", || hub.stats() == Default::default()).await;
    assert!(!hub.disconnect(id, CloseCode::KICKED, "again"));
}

#[tokio::test]
async fn client_close_is_echoed_and_rooms_are_left() {
    let left = Arc::new(Mutex::new(Vec::new()));
    let log = left.clone();
    let (builder, ended) = record_disconnects(
        Hub::builder()
            .on_leave(move |c: &Connection, room: &str| log.lock().unwrap().push((c.id().get(), room.to_owned()))),
    );
    let hub = builder.build();
    let addr = serve(&hub).await;
    let mut c = connect(addr).await;
    let mut other = connect(addr).await;
    c.join_ok("r").await;
    c.join_ok("s").await;
    other.join_ok("r").await;
    let id = c.connection_id();

    let close = tokio_tungstenite::tungstenite::protocol::CloseFrame { code: code(1000), reason: "done".into() };
    c.ws.send(Message::Close(Some(close))).await.unwrap();
    match c.ws.next().await {
        Some(Ok(Message::Close(Some(f)))) => assert_eq!(u16::from(f.code), 1000),
        other => panic!("expected the close echoed, got {other:?}"),
    }
    assert!(c.ws.next().await.is_none(), "stream goes on after the close handshake");

    eventually("hook ran", || !ended.lock().unwrap().is_empty()).await;
    assert_eq!(
        reasons(&ended),
        vec![DisconnectReason::ClientClosed { code: Some(CloseCode::NORMAL), reason: "done".to_owned() }]
    );
    let mut rooms: Vec<_> = left.lock().unwrap().iter().filter(|(c, _)| *c == id).map(|(_, r)| r.clone()).collect();
    rooms.sort();
    assert_eq!(rooms, ["r", "s"]);
    assert_eq!(hub.room_len("r"), 1);
    assert!(!hub.room_exists("s"));
    assert_eq!(hub.stats().rooms, 1);
    assert_eq!(hub.stats().connections, 1);
    // The other member is unaffected.
    hub.publish("r", "still", &json!(null)).await.unwrap();
    assert_eq!(other.event().await["event"], "still");
}

#[tokio::test]
async fn after_shutdown_starts_publish_and_send_fail_with_shutting_down() {
    let hub = Hub::builder().build();
    let addr = serve(&hub).await;
    let mut c = connect(addr).await;
    c.join_ok("r").await;
    let id = member_id(&hub, "r", c.connection_id());
    hub.publish("r", "m", &json!(1)).await.expect("a publish before shutdown");
    hub.send(id, "m", &json!(1)).expect("a send before shutdown");
    hub.shutdown(Duration::from_secs(5)).await;
    assert!(hub.is_shutting_down());
    let err = hub.publish("r", "m", &json!(2)).await.expect_err("no new work once shutdown started");
    assert!(err.is_shutting_down(), "{err}");
    let err = hub.send(id, "m", &json!(2)).expect_err("no new work once shutdown started");
    assert!(err.is_shutting_down(), "{err}");
    let err = hub.send_to_user("u", "m", &json!(2)).expect_err("no new work once shutdown started");
    assert!(err.is_shutting_down(), "{err}");
    // The handshake gate says the same, with the HTTP answer for the client.
    let err = hub.admit(&mut Handshake::new()).expect_err("no new connections once shutdown started");
    assert!(err.is_shutting_down(), "{err}");
    assert_eq!(err.rejection().map(|r| r.status().as_u16()), Some(503), "{err:?}");
    let err = hub.authenticate(&Handshake::new()).await.expect_err("no new connections once shutdown started");
    assert!(err.is_shutting_down(), "{err}");
    assert_eq!(err.rejection().map(|r| r.status().as_u16()), Some(503), "{err:?}");
    let (transport, _peer) = memory::pair(8);
    let err = hub.connect(transport, Handshake::new()).await.expect_err("no new connections once shutdown started");
    assert!(err.is_shutting_down(), "{err}");
}

#[tokio::test]
async fn memory_transport_text_that_is_not_utf8_closes_1007_like_websocket() {
    let hub = Hub::builder().build();
    let mut peer = memory_peer(&hub, true).await;
    peer.send(Frame::Text(bytes::Bytes::from_static(b"{\"type\":\"ping\",\"ref\":1,\"x\":\"\xff\"}"))).await.unwrap();
    let close = loop {
        match peer.recv().await.expect("a close frame before the end") {
            Frame::Close(close) => break close,
            _ => continue,
        }
    };
    assert_eq!(close.map(|c| c.code), Some(CloseCode::INVALID_DATA));
}
