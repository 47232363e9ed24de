//! History and recovery over real sockets: stream offsets on the wire,
//! recovery on join (exactly the missed events, in order, once — or
//! `recovered: false`), gaps reported while connected, the host's history
//! API, and non-recoverable rooms left untouched.

mod support;

use futures::future::BoxFuture;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use support::*;
use switchboard::history::{
    Append, Appended, HistoryConfig, HistoryRead, HistoryStore, MemoryHistory, RoomHistory, StreamPosition,
};
use switchboard::{backplane::MemoryBackplane, hub::OverflowPolicy, Hub, HubConfig};

fn hub(history: &MemoryHistory, config: HistoryConfig) -> Hub {
    Hub::builder().history(history.clone(), config).build()
}

/// Joins `room` with extra join fields; returns the reply (or error).
async fn join_with(c: &mut Client, room: &str, extra: Value) -> Value {
    let mut msg = json!({"type": "join", "room": room});
    for (k, v) in extra.as_object().unwrap() {
        msg[k] = v.clone();
    }
    c.request(msg).await
}

#[tokio::test]
async fn reconnect_inside_the_window_recovers_exactly_what_was_missed() {
    let history = MemoryHistory::new();
    let hub = hub(&history, HistoryConfig::all_rooms());
    let addr = serve(&hub).await;

    let mut a = connect(addr).await;
    let reply = a.join("r").await;
    assert_eq!(reply["type"], "reply", "{reply}");
    assert_eq!(reply["data"]["offset"], 0, "{reply}");
    let epoch = reply["data"]["epoch"].as_str().unwrap().to_owned();
    assert!(!epoch.is_empty());
    assert!(reply["data"].get("recovered").is_none(), "a join without a position says nothing of recovery");

    publish_range(&hub, "r", 1..=5).await;
    for n in 1..=5 {
        assert_eq!(next_offset(&mut a).await, (n, n), "offsets are the stream's, in order");
    }
    drop(a);
    publish_range(&hub, "r", 6..=10).await;

    // A new connection resumes from offset 5: the reply, then exactly
    // 6..=10, then live events.
    let mut b = connect(addr).await;
    let r = b.next_ref();
    b.send(json!({"type": "join", "ref": r, "room": "r", "offset": 5, "epoch": epoch})).await;
    let reply = b.recv().await;
    assert_eq!((reply["type"].as_str(), reply["ref"].as_u64()), (Some("reply"), Some(r)), "{reply}");
    assert_eq!(reply["data"], json!({"room": "r", "epoch": epoch, "offset": 10, "recovered": true}));
    for n in 6..=10 {
        let e = b.recv().await;
        assert_eq!(
            (e["type"].as_str(), e["offset"].as_u64(), e["data"]["n"].as_u64()),
            (Some("event"), Some(n), Some(n))
        );
    }
    hub.publish("r", "m", &json!({"n": 11})).await.unwrap();
    assert_eq!(next_offset(&mut b).await, (11, 11));
    assert_eq!(b.pending_events(), 0);
}

#[tokio::test]
async fn outside_the_window_by_size_age_or_replay_cap_is_not_recovered() {
    let history = MemoryHistory::new();
    let config = HistoryConfig::default()
        .rooms("small:", RoomHistory::default().max_len(5))
        .rooms("short:", RoomHistory::default().max_age(Duration::from_millis(200)))
        .rooms("capped:", RoomHistory::default().max_replay(3));
    let hub = hub(&history, config);
    let addr = serve(&hub).await;

    for room in ["small:1", "short:1", "capped:1"] {
        let mut a = connect(addr).await;
        let epoch = a.join(room).await["data"]["epoch"].as_str().unwrap().to_owned();
        publish_range(&hub, room, 1..=1).await;
        assert_eq!(next_offset(&mut a).await.0, 1);
        drop(a);
        publish_range(&hub, room, 2..=7).await;
        if room.starts_with("short:") {
            // Let every missed event expire (waiting, not measuring).
            tokio::time::sleep(Duration::from_millis(400)).await;
        }
        let mut b = connect(addr).await;
        let reply = join_with(&mut b, room, json!({"offset": 1, "epoch": epoch})).await;
        assert_eq!(reply["data"]["recovered"], false, "{room}: {reply}");
        assert_eq!(reply["data"]["offset"], 7, "{room}: live continues after the top");
        // Nothing was replayed: the next event is the next live one.
        publish_range(&hub, room, 8..=8).await;
        assert_eq!(next_offset(&mut b).await, (8, 8), "{room}: a partial replay must never be sent");
    }
}

#[tokio::test]
async fn a_store_reset_changes_the_epoch_for_joiners_and_members() {
    let history = MemoryHistory::new();
    let hub = hub(&history, HistoryConfig::all_rooms());
    let addr = serve(&hub).await;
    let mut member = connect(addr).await;
    let epoch = member.join("r").await["data"]["epoch"].as_str().unwrap().to_owned();
    publish_range(&hub, "r", 1..=3).await;
    for n in 1..=3 {
        assert_eq!(next_offset(&mut member).await.0, n);
    }

    // The store loses everything (as a restarted process would).
    history.clear();
    publish_range(&hub, "r", 4..=4).await;
    // The member is told to resync, with the new epoch, then gets the new
    // stream from its start.
    let gap = member.recv().await;
    assert_eq!((gap["type"].as_str(), gap["room"].as_str()), (Some("gap"), Some("r")), "{gap}");
    assert_eq!(gap["data"]["reason"], "epoch_changed", "{gap}");
    let new_epoch = gap["data"]["epoch"].as_str().unwrap().to_owned();
    assert_ne!(new_epoch, epoch);
    assert_eq!(next_offset(&mut member).await, (1, 4));

    // A client resuming with the old epoch cannot recover.
    let mut b = connect(addr).await;
    let reply = join_with(&mut b, "r", json!({"offset": 3, "epoch": epoch})).await;
    assert_eq!(reply["data"]["recovered"], false, "{reply}");
    assert_eq!(reply["data"]["epoch"], new_epoch.as_str());
}

#[tokio::test]
async fn idempotent_publish_is_stored_and_delivered_once() {
    let history = MemoryHistory::new();
    let hub = hub(&history, HistoryConfig::all_rooms());
    let addr = serve(&hub).await;
    let mut a = connect(addr).await;
    a.join_ok("r").await;

    let first = hub.publish_idempotent("r", "order", &json!({"n": 1}), "order-77").await.unwrap();
    let retry = hub.publish_idempotent("r", "order", &json!({"n": 1}), "order-77").await.unwrap();
    assert!(!first.duplicate && retry.duplicate);
    assert_eq!(first.position, retry.position);
    assert_eq!(first.position.as_ref().unwrap().offset, 1);
    let other = hub.publish_idempotent("r", "order", &json!({"n": 2}), "order-78").await.unwrap();
    assert_eq!(other.position.unwrap().offset, 2, "a duplicate takes no offset");

    assert_eq!(next_offset(&mut a).await, (1, 1));
    assert_eq!(next_offset(&mut a).await, (2, 2), "the retry was delivered a second time");

    let page = hub.history_page("r", None, 10).await.unwrap();
    assert_eq!(page.publications.iter().map(|p| p.offset).collect::<Vec<_>>(), [1, 2]);
    assert!(page.complete);
    // The host reads a page after a position too.
    let page = hub.history_page("r", Some(first.position.unwrap()), 10).await.unwrap();
    assert_eq!(page.publications.len(), 1);
}

#[tokio::test]
async fn garbage_positions_get_recovered_false_or_a_documented_error() {
    let history = MemoryHistory::new();
    let hub = hub(&history, HistoryConfig::all_rooms());
    let addr = serve(&hub).await;
    let mut a = connect(addr).await;
    let epoch_a = a.join("a").await["data"]["epoch"].as_str().unwrap().to_owned();
    publish_range(&hub, "a", 1..=3).await;
    let mut x = connect(addr).await;
    x.join_ok("b").await;
    publish_range(&hub, "b", 1..=3).await;

    let mut c = connect(addr).await;
    // Another room's epoch: never a replay of someone else's room.
    let reply = join_with(&mut c, "b", json!({"offset": 0, "epoch": epoch_a})).await;
    assert_eq!(reply["data"]["recovered"], false, "{reply}");
    // An offset beyond the top.
    let reply = join_with(&mut c, "a", json!({"offset": 99, "epoch": epoch_a})).await;
    assert_eq!(reply["data"]["recovered"], false, "{reply}");
    let mut d = connect(addr).await;
    // An unknown epoch.
    let reply = join_with(&mut d, "a", json!({"offset": 1, "epoch": "no-such-epoch"})).await;
    assert_eq!(reply["data"]["recovered"], false, "{reply}");

    // Malformed values: documented 400s.
    let mut e = connect(addr).await;
    for (extra, what) in [
        (json!({"offset": "five", "epoch": epoch_a}), "offset not a number"),
        (json!({"offset": -1, "epoch": epoch_a}), "negative offset"),
        (json!({"offset": 1}), "offset without epoch"),
        (json!({"epoch": epoch_a}), "epoch without offset"),
        (json!({"offset": 1, "epoch": "e".repeat(65)}), "epoch too long"),
        (json!({"offset": 1, "epoch": epoch_a, "rewind": 3}), "rewind with a position"),
        (json!({"offset": 1, "epoch": 5}), "epoch not a string"),
    ] {
        let reply = join_with(&mut e, "c", extra).await;
        assert_eq!((reply["type"].as_str(), reply["code"].as_u64()), (Some("error"), Some(400)), "{what}: {reply}");
    }
    assert!(!hub.room_exists("c"), "a refused join leaves nothing behind");
    // The connection (and everyone else) carries on.
    e.join_ok("c").await;
    hub.publish("a", "m", &json!({"n": 4})).await.unwrap();
    for n in 1..=4 {
        assert_eq!(next_offset(&mut a).await, (n, n));
    }
}

#[tokio::test]
async fn rewind_sends_the_newest_events_first() {
    let history = MemoryHistory::new();
    let hub = hub(&history, HistoryConfig::all_rooms());
    let addr = serve(&hub).await;
    let mut first = connect(addr).await;
    first.join_ok("r").await;
    publish_range(&hub, "r", 1..=5).await;

    let mut b = connect(addr).await;
    let r = b.next_ref();
    b.send(json!({"type": "join", "ref": r, "room": "r", "rewind": 3})).await;
    let reply = b.recv().await;
    assert_eq!(reply["data"], json!({"room": "r", "epoch": reply["data"]["epoch"], "offset": 5}), "{reply}");
    for n in 3..=5 {
        let e = b.recv().await;
        assert_eq!((e["type"].as_str(), e["offset"].as_u64()), (Some("event"), Some(n)), "{e}");
    }
    publish_range(&hub, "r", 6..=6).await;
    assert_eq!(next_offset(&mut b).await, (6, 6));
}

#[tokio::test]
async fn non_recoverable_rooms_carry_no_offsets_and_store_nothing() {
    let history = MemoryHistory::new();
    let hub = hub(&history, HistoryConfig::default().rooms("chat:", RoomHistory::default()));
    let addr = serve(&hub).await;
    let mut a = connect(addr).await;
    let reply = a.join("game:1").await;
    assert_eq!(reply["data"], json!({"room": "game:1"}), "no stream fields: {reply}");
    // Positions sent for a plain room are ignored, never an error.
    let reply = join_with(&mut a, "game:2", json!({"offset": 3, "epoch": "x"})).await;
    assert_eq!(reply["data"], json!({"room": "game:2"}), "{reply}");
    publish_range(&hub, "game:1", 1..=2).await;
    for n in 1..=2 {
        let e = a.event().await;
        assert!(e.get("offset").is_none(), "{e}");
        assert_eq!(e["data"]["n"], n);
    }
    assert_eq!(history.room_count(), 0, "a plain room must not touch the store");
    let err = hub.history_page("game:1", None, 10).await.unwrap_err();
    assert_eq!(err.kind(), switchboard::ErrorKind::Config);
    a.join_ok("chat:1").await;
    assert_eq!(history.room_count(), 1);
}

#[tokio::test]
async fn drop_oldest_reports_the_lost_range_as_a_gap() {
    const BOUND: usize = 64 * 1024;
    let history = MemoryHistory::new();
    let config = HubConfig::default().outbound_queue_bytes(BOUND).overflow(OverflowPolicy::DropOldest);
    let hub = Hub::builder()
        .config(config)
        .history(history.clone(), HistoryConfig::default().rooms("", RoomHistory::default().max_len(100_000)))
        .build();
    let addr = serve(&hub).await;
    let mut slow = connect(addr).await;
    slow.join_ok("r").await;
    let conn = hub.connection(member_id(&hub, "r", slow.connection_id())).unwrap();

    // The slow client reads nothing: the socket buffers fill, then the queue,
    // then the oldest queued events are dropped.
    let end_offset = publish_until_dropped(&hub, "r", &conn).await;

    // Every offset is either delivered or inside a reported gap; none twice.
    let mut seen: Vec<u64> = Vec::new();
    let mut gaps: Vec<(u64, u64)> = Vec::new();
    loop {
        let m = slow.recv().await;
        match m["type"].as_str().unwrap() {
            "event" => {
                let o = m["offset"].as_u64().unwrap();
                seen.push(o);
                if o == end_offset {
                    break;
                }
            }
            "gap" => {
                assert_eq!(
                    (m["room"].as_str(), m["data"]["reason"].as_str()),
                    (Some("r"), Some("slow_consumer")),
                    "{m}"
                );
                gaps.push((m["data"]["from"].as_u64().unwrap(), m["data"]["to"].as_u64().unwrap()));
            }
            "lagged" => {}
            other => panic!("unexpected {other}: {m}"),
        }
    }
    assert!(!gaps.is_empty(), "drops happened but no gap was reported");
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "events out of order or repeated");
    for o in 1..=end_offset {
        let delivered = seen.contains(&o);
        let reported = gaps.iter().any(|&(f, t)| (f..=t).contains(&o));
        assert!(delivered || reported, "offset {o} was lost silently");
        assert!(!(delivered && reported), "offset {o} was both delivered and reported lost");
    }
    assert_eq!(conn.dropped_messages(), gaps.iter().map(|(f, t)| t - f + 1).sum::<u64>());
}

/// Two hubs linked by a backplane and sharing the store: one stream order
/// on both, and a client that reconnects to the other node recovers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_share_one_ordered_stream_and_recover_across_nodes() {
    let history = MemoryHistory::new();
    let backplane = MemoryBackplane::new();
    let make =
        || Hub::builder().backplane(backplane.clone()).history(history.clone(), HistoryConfig::all_rooms()).build();
    two_nodes_share_one_stream(&make(), &make(), 200).await;
}

/// An event that reached the store but whose backplane message was lost is
/// delivered by the periodic position check.
#[tokio::test]
async fn the_position_check_delivers_events_the_backplane_lost() {
    let history = MemoryHistory::new();
    let config = HistoryConfig::all_rooms().position_check(Duration::from_millis(100));
    let hub = Hub::builder().history(history.clone(), config).build();
    let addr = serve(&hub).await;
    let mut a = connect(addr).await;
    a.join_ok("r").await;
    // Appended by "another node" whose backplane publish never arrived.
    let append = Append {
        event: "m".into(),
        data: Some(payload(json!({"n": 1}))),
        idempotency_key: None,
        retention: RoomHistory::default().retention,
    };
    history.append("r", append).await.unwrap();
    assert_eq!(next_offset(&mut a).await, (1, 1));
}

fn payload(v: Value) -> switchboard::protocol::Payload {
    switchboard::protocol::Payload::encode(switchboard::protocol::Format::Json, &v).unwrap()
}

/// A store whose reads answer late with what they read early, as a remote
/// store does: the room moves on while a join's read is in flight.
#[derive(Clone)]
struct SlowReads(MemoryHistory);

impl HistoryStore for SlowReads {
    fn append(&self, room: &str, append: Append) -> BoxFuture<'static, switchboard::Result<Appended>> {
        self.0.append(room, append)
    }

    fn read(
        &self,
        room: &str,
        since: Option<StreamPosition>,
        limit: usize,
    ) -> BoxFuture<'static, switchboard::Result<HistoryRead>> {
        let read = self.0.read(room, since, limit);
        Box::pin(async move {
            let read = read.await;
            tokio::time::sleep(Duration::from_millis(3)).await;
            read
        })
    }
}

/// Many publishes race a client that keeps dropping and rejoining with its
/// last position: it must see every offset exactly once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejoins_racing_concurrent_publishes_lose_and_repeat_nothing() {
    const TOTAL: u64 = 3000;
    let store = SlowReads(MemoryHistory::new());
    let config = HistoryConfig::default().rooms("", RoomHistory::default().max_len(10_000).max_replay(10_000));
    let hub = Hub::builder().history(store, config).build();
    let addr = serve(&hub).await;
    let mut c = connect(addr).await;
    let epoch = c.join("r").await["data"]["epoch"].as_str().unwrap().to_owned();

    let publishers: Vec<_> = (0..3)
        .map(|k| {
            let hub = hub.clone();
            tokio::spawn(async move {
                for i in 0..TOTAL / 3 {
                    hub.publish("r", "m", &json!({"n": k * 10_000 + i})).await.unwrap();
                    if i % 10 == 0 {
                        tokio::time::sleep(Duration::from_micros(200)).await;
                    }
                }
            })
        })
        .collect();

    let mut seen: Vec<u64> = Vec::new();
    let mut last = 0u64;
    let mut rejoins = 0;
    while last < TOTAL {
        // Read a few events, then drop the connection and resume.
        for _ in 0..37 {
            if last == TOTAL {
                break;
            }
            let (o, _) = next_offset(&mut c).await;
            seen.push(o);
            last = o;
        }
        if last == TOTAL {
            break;
        }
        drop(c);
        c = connect(addr).await;
        let reply = join_with(&mut c, "r", json!({"offset": last, "epoch": epoch})).await;
        assert_eq!(reply["data"]["recovered"], true, "{reply}");
        rejoins += 1;
    }
    for p in publishers {
        p.await.unwrap();
    }
    assert!(rejoins > 10, "the test did not exercise rejoins");
    assert_eq!(seen, (1..=TOTAL).collect::<Vec<_>>(), "lost, repeated or reordered events");
}

/// Interleavings of publishes, disconnects and rejoins for several clients:
/// each client's sequence is the room's sequence minus what it was
/// explicitly told it could not get (`recovered: false`).
#[test]
fn random_interleavings_keep_every_client_in_step() {
    use proptest::prelude::*;
    #[derive(Debug, Clone)]
    enum Op {
        Publish(u8),
        Drop(usize),
        Rejoin(usize),
    }
    let op = prop_oneof![
        4 => (1u8..6).prop_map(Op::Publish),
        1 => (0usize..3).prop_map(Op::Drop),
        1 => (0usize..3).prop_map(Op::Rejoin),
    ];
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: 24,
        // Each case runs real sockets; a failure is reported as found.
        max_shrink_iters: 0,
        ..ProptestConfig::default()
    });
    runner
        .run(&prop::collection::vec(op, 1..40), |ops| {
            rt.block_on(run_interleaving(ops.iter().map(|o| match o {
                Op::Publish(n) => (0, *n as usize),
                Op::Drop(i) => (1, *i),
                Op::Rejoin(i) => (2, *i),
            })));
            Ok(())
        })
        .unwrap();
}

struct Tracked {
    client: Option<Client>,
    /// Offsets delivered, in arrival order.
    seen: Vec<u64>,
    /// Offsets it was told it cannot recover (ranges after `recovered: false`).
    skipped: Vec<(u64, u64)>,
    last: u64,
}

async fn run_interleaving(ops: impl Iterator<Item = (u8, usize)>) {
    let history = MemoryHistory::new();
    // A small window, so some rejoins are outside it.
    let hub = hub(&history, HistoryConfig::default().rooms("", RoomHistory::default().max_len(8)));
    let addr: SocketAddr = serve(&hub).await;
    let mut epoch = String::new();
    let mut clients = Vec::new();
    for _ in 0..3 {
        let mut c = connect(addr).await;
        epoch = c.join("r").await["data"]["epoch"].as_str().unwrap().to_owned();
        clients.push(Tracked { client: Some(c), seen: Vec::new(), skipped: Vec::new(), last: 0 });
    }
    let mut top = 0u64;
    for (kind, arg) in ops {
        match kind {
            0 => {
                for _ in 0..arg {
                    top += 1;
                    hub.publish("r", "m", &json!({"n": top})).await.unwrap();
                }
                // Connected clients read up to the top.
                for t in clients.iter_mut() {
                    if let Some(c) = t.client.as_mut() {
                        while t.last < top {
                            let (o, _) = next_offset(c).await;
                            t.seen.push(o);
                            t.last = o;
                        }
                    }
                }
            }
            1 => clients[arg].client = None,
            _ => {
                let t = &mut clients[arg];
                if t.client.is_some() {
                    continue;
                }
                let mut c = connect(addr).await;
                let reply = join_with(&mut c, "r", json!({"offset": t.last, "epoch": epoch})).await;
                let live = reply["data"]["offset"].as_u64().unwrap();
                assert_eq!(live, top);
                if reply["data"]["recovered"] == true {
                    while t.last < top {
                        let (o, _) = next_offset(&mut c).await;
                        t.seen.push(o);
                        t.last = o;
                    }
                } else {
                    if live > t.last {
                        t.skipped.push((t.last + 1, live));
                    }
                    t.last = live;
                }
                t.client = Some(c);
            }
        }
    }
    for t in &clients {
        let mut expected: Vec<u64> = (1..=t.last).collect();
        expected.retain(|o| !t.skipped.iter().any(|&(f, to)| (f..=to).contains(o)));
        assert_eq!(t.seen, expected, "a client's sequence is the room's minus reported gaps");
    }
}

/// A backplane subscription that lagged (dropped messages and said so)
/// makes the room read what it missed from the store at once: every event
/// arrives, in order, without waiting for the position check.
#[tokio::test]
async fn a_lagging_backplane_is_caught_up_from_the_store() {
    let history = MemoryHistory::new();
    // One message of buffer per subscription: a burst overflows it.
    let backplane = MemoryBackplane::with_capacity(1);
    // Gap waits and position checks far beyond the test's patience: only
    // the backplane's own report can trigger the catch-up.
    let config =
        HistoryConfig::all_rooms().gap_wait(Duration::from_secs(3600)).position_check(Duration::from_secs(3600));
    let make = || Hub::builder().backplane(backplane.clone()).history(history.clone(), config.clone()).build();
    let (hub1, hub2) = (make(), make());
    let addr2 = serve(&hub2).await;
    let mut c = connect(addr2).await;
    c.join_ok("r").await;
    // Publishing without yielding: the receiving side cannot keep up.
    for n in 1..=200 {
        hub1.publish("r", "m", &json!({"n": n})).await.unwrap();
    }
    for n in 1..=200 {
        assert_eq!(next_offset(&mut c).await, (n, n));
    }
}

/// A replay that would not fit in the member's outbound queue (half its
/// bound) is refused with `recovered: false` instead of overflowing it; a
/// rewind keeps the newest events that fit.
#[tokio::test]
async fn a_replay_bigger_than_half_the_queue_is_refused_not_overflowed() {
    const QUEUE: usize = 64 * 1024;
    let history = MemoryHistory::new();
    let hub = Hub::builder()
        .config(HubConfig::default().outbound_queue_bytes(QUEUE))
        .history(history.clone(), HistoryConfig::all_rooms())
        .build();
    let addr = serve(&hub).await;
    let mut a = connect(addr).await;
    let epoch = a.join("r").await["data"]["epoch"].as_str().unwrap().to_owned();
    drop(a);
    // 20 events of 4 KiB: 80 KiB, more than half of 64 KiB.
    let pad = "x".repeat(4096);
    for n in 1..=20u64 {
        hub.publish("r", "m", &json!({"n": n, "pad": pad})).await.unwrap();
    }
    let mut b = connect(addr).await;
    let reply = join_with(&mut b, "r", json!({"offset": 0, "epoch": epoch})).await;
    assert_eq!(reply["data"]["recovered"], false, "{reply}");
    assert_eq!(reply["data"]["offset"], 20);
    hub.publish("r", "m", &json!({"n": 21})).await.unwrap();
    assert_eq!(next_offset(&mut b).await, (21, 21), "nothing replayed, the connection stays");

    // A smaller gap still recovers.
    let mut c = connect(addr).await;
    let reply = join_with(&mut c, "r", json!({"offset": 18, "epoch": epoch})).await;
    assert_eq!(reply["data"]["recovered"], true, "{reply}");
    for n in 19..=21 {
        assert_eq!(next_offset(&mut c).await.0, n);
    }

    // A rewind of everything gets the newest events that fit, in order.
    let mut d = connect(addr).await;
    let r = d.next_ref();
    d.send(json!({"type": "join", "ref": r, "room": "r", "rewind": 100})).await;
    assert_eq!(d.recv().await["type"], "reply");
    hub.publish("r", "end", &json!({"n": 0})).await.unwrap();
    let mut got = Vec::new();
    loop {
        let (o, _) = next_offset(&mut d).await;
        if o == 22 {
            break;
        }
        got.push(o);
    }
    assert!(!got.is_empty() && got.len() < 21, "rewound {got:?}");
    assert_eq!(*got.last().unwrap(), 21, "the newest events are kept");
    assert!(got.windows(2).all(|w| w[1] == w[0] + 1), "contiguous: {got:?}");
}

/// A backplane whose first subscription to each topic ends after one
/// message, as an engine that drops a subscriber would.
#[derive(Clone)]
struct EndsOnce {
    inner: MemoryBackplane,
    ended: Arc<parking_lot::Mutex<std::collections::HashSet<String>>>,
}

impl switchboard::backplane::Backplane for EndsOnce {
    fn publish(&self, topic: &str, message: bytes::Bytes) -> BoxFuture<'static, switchboard::Result<()>> {
        self.inner.publish(topic, message)
    }

    fn subscribe(&self, topic: &str) -> BoxFuture<'static, switchboard::Result<switchboard::backplane::Subscription>> {
        let first = self.ended.lock().insert(topic.to_owned());
        let sub = self.inner.subscribe(topic);
        Box::pin(async move {
            let sub = sub.await?;
            if !first {
                return Ok(sub);
            }
            use futures::StreamExt;
            Ok(switchboard::backplane::Subscription::new(sub.take(1)))
        })
    }
}

/// A subscription that ends while the room has members is made again, and
/// a recoverable room reads what went by in between from the store: every
/// event arrives, in order.
#[tokio::test]
async fn an_ended_subscription_is_made_again_and_the_gap_filled() {
    let history = MemoryHistory::new();
    let backplane = EndsOnce { inner: MemoryBackplane::new(), ended: Default::default() };
    // No position check and a short gap wait: only a live backplane message
    // can make the room look at the store again.
    let config =
        HistoryConfig::all_rooms().position_check(Duration::from_secs(3600)).gap_wait(Duration::from_millis(10));
    let make = || Hub::builder().backplane(backplane.clone()).history(history.clone(), config.clone()).build();
    let (hub1, hub2) = (make(), make());
    let addr2 = serve(&hub2).await;
    let mut c = connect(addr2).await;
    c.join_ok("r").await;
    for n in 1..=20u64 {
        hub1.publish("r", "m", &json!({"n": n})).await.unwrap();
    }
    // 1 came through the first subscription, which then ended; the rest
    // were read from the store when it did.
    for n in 1..=20 {
        assert_eq!(next_offset(&mut c).await, (n, n));
    }
    assert!(backplane.ended.lock().contains("r"));
    // Publish until one comes through live, which proves a new subscription:
    // everything arrives, in order, from 21 on.
    let mut n = 20u64;
    let first = loop {
        n += 1;
        assert!(n < 120, "no subscription was made again");
        hub1.publish("r", "m", &json!({"n": n})).await.unwrap();
        if let Ok(got) = tokio::time::timeout(Duration::from_millis(200), next_offset(&mut c)).await {
            break got;
        }
    };
    assert_eq!(first, (21, 21));
    for k in 22..=n {
        assert_eq!(next_offset(&mut c).await, (k, k));
    }
}

/// A backplane whose first subscription to each topic ends when the test
/// says so, and whose next subscribe waits for the test's release (telling
/// it first), so events can be published while a room has no subscription.
#[derive(Clone)]
struct EndsOnCue {
    inner: MemoryBackplane,
    calls: Arc<std::sync::atomic::AtomicUsize>,
    end: Arc<tokio::sync::Notify>,
    resubscribing: tokio::sync::mpsc::UnboundedSender<()>,
    release: Arc<tokio::sync::Notify>,
}

impl switchboard::backplane::Backplane for EndsOnCue {
    fn publish(&self, topic: &str, message: bytes::Bytes) -> BoxFuture<'static, switchboard::Result<()>> {
        self.inner.publish(topic, message)
    }

    fn subscribe(&self, topic: &str) -> BoxFuture<'static, switchboard::Result<switchboard::backplane::Subscription>> {
        use futures::StreamExt;
        let call = self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let (this, topic) = (self.clone(), topic.to_owned());
        Box::pin(async move {
            if call == 0 {
                let sub = this.inner.subscribe(&topic).await?;
                let end = this.end.clone();
                return Ok(switchboard::backplane::Subscription::new(
                    sub.take_until(async move { end.notified().await }),
                ));
            }
            // Not subscribed until released: what is published meanwhile
            // reaches the store only.
            let _ = this.resubscribing.send(());
            this.release.notified().await;
            this.inner.subscribe(&topic).await
        })
    }
}

impl EndsOnCue {
    fn new(resubscribing: tokio::sync::mpsc::UnboundedSender<()>) -> EndsOnCue {
        EndsOnCue {
            inner: MemoryBackplane::new(),
            calls: Default::default(),
            end: Default::default(),
            resubscribing,
            release: Default::default(),
        }
    }
}

/// Two hubs on `history`: the first (returned) only publishes, through the
/// plain memory backplane, so it never subscribes; the member (returned)
/// is on the second, served at the returned address, which reads through
/// `store` and subscribes through `backplane`, and has had events 1..=3
/// live. The position check and the gap wait are out of reach (600 s):
/// only a read of the store made for the resubscription can fill a gap.
async fn serve_on_cue(
    history: &MemoryHistory,
    store: impl HistoryStore,
    backplane: &EndsOnCue,
) -> (Hub, SocketAddr, Client) {
    let config = HistoryConfig::all_rooms().position_check(Duration::from_secs(600)).gap_wait(Duration::from_secs(600));
    let hub1 = Hub::builder().backplane(backplane.inner.clone()).history(history.clone(), config.clone()).build();
    let hub2 = Hub::builder().backplane(backplane.clone()).history(store, config).build();
    let addr2 = serve(&hub2).await;
    let mut c = connect(addr2).await;
    c.join_ok("r").await;
    publish_range(&hub1, "r", 1..=3).await;
    for n in 1..=3 {
        assert_eq!(next_offset(&mut c).await, (n, n), "live through the first subscription");
    }
    (hub1, addr2, c)
}

/// Events 4..=6 (published while the room had no subscription) reach `c`
/// in order, then 7 comes live, and nothing came twice. Nothing else is
/// published, so only a read of the store made for the resubscription can
/// deliver 4..=6. Within a second is the promise; the 5 s bound only keeps
/// a failure from waiting the 600 s check out.
async fn expect_window_then_live(hub1: &Hub, c: &mut Client, why: &str) {
    let released = std::time::Instant::now();
    for n in 4..=6 {
        let got = tokio::time::timeout(Duration::from_secs(5), next_offset(c)).await;
        assert_eq!(got.expect(why), (n, n));
    }
    // Printed, not asserted (timings are measured, never asserted): how
    // long after the new subscription the gap was filled, for
    // docs/recovery.md. Broken, it is the position check: out of reach.
    eprintln!("gap filled {:?} after the resubscription was released", released.elapsed());
    hub1.publish("r", "m", &json!({"n": 7})).await.unwrap();
    assert_eq!(next_offset(c).await, (7, 7));
    assert_eq!(c.pending_events(), 0);
}

/// Events published after a subscription ended and before it was made again
/// are read from the store as soon as the new subscription is active: in
/// order, once, without waiting for the position check (which is out of
/// reach here, as is the gap wait).
#[tokio::test]
async fn events_published_while_resubscribing_arrive_once_subscribed_again() {
    let history = MemoryHistory::new();
    let (tx, mut resubscribing) = tokio::sync::mpsc::unbounded_channel();
    let backplane = EndsOnCue::new(tx);
    let (hub1, _, mut c) = serve_on_cue(&history, history.clone(), &backplane).await;

    backplane.end.notify_one();
    resubscribing.recv().await.unwrap();
    // The window: the room has no subscription.
    publish_range(&hub1, "r", 4..=6).await;
    backplane.release.notify_one();

    expect_window_then_live(&hub1, &mut c, "the gap was not filled after the resubscription").await;
    assert_eq!(backplane.calls.load(std::sync::atomic::Ordering::SeqCst), 2);
}

/// A store whose next read, once armed, reads at once but answers only when
/// released (telling the test it is held).
#[derive(Clone)]
struct HeldRead {
    inner: MemoryHistory,
    armed: Arc<std::sync::atomic::AtomicBool>,
    held: tokio::sync::mpsc::UnboundedSender<()>,
    release: Arc<tokio::sync::Notify>,
}

impl HistoryStore for HeldRead {
    fn append(&self, room: &str, append: Append) -> BoxFuture<'static, switchboard::Result<Appended>> {
        self.inner.append(room, append)
    }

    fn read(
        &self,
        room: &str,
        since: Option<StreamPosition>,
        limit: usize,
    ) -> BoxFuture<'static, switchboard::Result<HistoryRead>> {
        let read = self.inner.read(room, since, limit);
        let hold = self.armed.swap(false, std::sync::atomic::Ordering::SeqCst);
        let (held, release) = (self.held.clone(), self.release.clone());
        Box::pin(async move {
            let read = read.await;
            if hold {
                let _ = held.send(());
                release.notified().await;
            }
            read
        })
    }
}

/// The read made when the subscription ended is still in flight when the
/// new subscription is active: its answer predates the events published in
/// between, so the fill reads once more instead of stopping there.
#[tokio::test]
async fn a_fill_still_reading_when_the_subscription_is_made_again_reads_once_more() {
    let history = MemoryHistory::new();
    let (tx, mut resubscribing) = tokio::sync::mpsc::unbounded_channel();
    let backplane = EndsOnCue::new(tx);
    let (held_tx, mut held) = tokio::sync::mpsc::unbounded_channel();
    let store =
        HeldRead { inner: history.clone(), armed: Default::default(), held: held_tx, release: Default::default() };
    let (hub1, addr2, mut c) = serve_on_cue(&history, store.clone(), &backplane).await;

    // The fill started by the end reads 1..=3 and is held there.
    store.armed.store(true, std::sync::atomic::Ordering::SeqCst);
    backplane.end.notify_one();
    held.recv().await.unwrap();
    resubscribing.recv().await.unwrap();
    publish_range(&hub1, "r", 4..=6).await;
    backplane.release.notify_one();
    // A join is answered only after the manager is done with the room's
    // resubscription (and so has asked for the fill again).
    let mut d = connect(addr2).await;
    d.join_ok("r").await;
    store.release.notify_one();

    expect_window_then_live(&hub1, &mut c, "the fill stopped at its stale read").await;
}

/// A store that never answers: the hub gives up after
/// `HistoryConfig::store_timeout` with `ErrorKind::History` (a publish to a
/// recoverable room fails; `history_page` too), instead of waiting forever.
#[tokio::test(start_paused = true)]
async fn a_store_that_never_answers_fails_with_history_after_the_timeout() {
    struct Hung;
    impl HistoryStore for Hung {
        fn append(&self, _: &str, _: Append) -> BoxFuture<'static, switchboard::Result<Appended>> {
            Box::pin(futures::future::pending())
        }
        fn read(
            &self,
            _: &str,
            _: Option<StreamPosition>,
            _: usize,
        ) -> BoxFuture<'static, switchboard::Result<HistoryRead>> {
            Box::pin(futures::future::pending())
        }
    }
    let timeout = Duration::from_secs(3);
    let hub = Hub::builder().history(Hung, HistoryConfig::all_rooms().store_timeout(timeout)).build();
    let start = tokio::time::Instant::now();
    let e = hub.publish("r", "m", &json!(1)).await.unwrap_err();
    assert_eq!(e.kind(), switchboard::ErrorKind::History, "{e}");
    assert_eq!(start.elapsed(), timeout);
    let e = hub.history_page("r", None, 10).await.unwrap_err();
    assert_eq!(e.kind(), switchboard::ErrorKind::History, "{e}");
    assert_eq!(start.elapsed(), timeout * 2);
}

/// A backplane that never answers: a publish fails with
/// `ErrorKind::Backplane` after `HubConfig::backplane_timeout` (local
/// members still got the event), instead of waiting forever.
#[tokio::test(start_paused = true)]
async fn a_backplane_that_never_answers_fails_the_publish_after_the_timeout() {
    use switchboard::backplane::{Backplane, Subscription};
    struct Hung;
    impl Backplane for Hung {
        fn publish(&self, _: &str, _: bytes::Bytes) -> BoxFuture<'static, switchboard::Result<()>> {
            Box::pin(futures::future::pending())
        }
        fn subscribe(&self, _: &str) -> BoxFuture<'static, switchboard::Result<Subscription>> {
            Box::pin(futures::future::pending())
        }
    }
    let timeout = Duration::from_secs(4);
    let hub = Hub::builder().backplane(Hung).config(HubConfig::default().backplane_timeout(timeout)).build();
    let start = tokio::time::Instant::now();
    let e = hub.publish("r", "m", &json!(1)).await.unwrap_err();
    assert_eq!(e.kind(), switchboard::ErrorKind::Backplane, "{e}");
    assert_eq!(start.elapsed(), timeout);
}

/// The storm's lost recoveries (issue 18, `load storm --conn-rate 200`): a
/// client gives up on a join the server is still answering (its history
/// read is slow) and joins again at once, as `load storm` does after a
/// timeout. The server takes the second `join` for one of a room already
/// joined; the client must still learn the stream's position, or a later
/// reconnect rejoins without one and comes back `recovered: false`.
#[tokio::test]
async fn a_join_retried_while_the_first_still_reads_keeps_the_stream_position() {
    use switchboard::client::{Client as RustClient, ClientConfig, ClientErrorKind};
    use switchboard::protocol::CloseCode;
    let history = MemoryHistory::new();
    let (held_tx, mut held) = tokio::sync::mpsc::unbounded_channel();
    let store =
        HeldRead { inner: history.clone(), armed: Default::default(), held: held_tx, release: Default::default() };
    let hub = Hub::builder().history(store.clone(), HistoryConfig::all_rooms()).build();
    publish_range(&hub, "r", 1..=1).await;
    let addr = serve(&hub).await;
    let config = ClientConfig::default().call_timeout(Duration::from_millis(300));
    let client = RustClient::builder(format!("ws://{addr}/")).config(config).connect().unwrap();
    tokio::time::timeout(WAIT, client.connected()).await.unwrap().unwrap();

    // The first join's read is held past the client's call timeout…
    store.armed.store(true, std::sync::atomic::Ordering::SeqCst);
    let e = client.join("r").await.unwrap_err();
    assert_eq!(e.kind(), ClientErrorKind::Timeout);
    held.recv().await.unwrap();
    // …and the application joins again while the server is still at it;
    // then the read completes.
    let again = {
        let client = client.clone();
        tokio::spawn(async move { client.join("r").await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    store.release.notify_one();
    let mut room = again.await.unwrap().expect("the second join");
    publish_range(&hub, "r", 2..=2).await;
    let mut got = Vec::new();
    let mut rejoined = None;
    wait_for(&mut room, 1, &mut got, &mut rejoined).await;
    assert_eq!(got, vec![Some(2)], "a member after the retried join");

    // Cut the connection; two events while it is away.
    for c in hub.connections() {
        hub.disconnect(c.id, CloseCode::RECONNECT, "cut");
    }
    publish_range(&hub, "r", 3..=4).await;
    wait_for(&mut room, 3, &mut got, &mut rejoined).await;
    assert_eq!(rejoined, Some(true), "the rejoin recovered what was missed");
    assert_eq!(got, vec![Some(2), Some(3), Some(4)]);
}

/// Reads `room` until `got` holds `want` events' offsets, noting a rejoin.
async fn wait_for(
    room: &mut switchboard::client::Room,
    want: usize,
    got: &mut Vec<Option<u64>>,
    rejoined: &mut Option<bool>,
) {
    use switchboard::client::RoomEvent;
    while got.len() < want {
        let ev = tokio::time::timeout(WAIT, room.recv()).await;
        let ev = ev.unwrap_or_else(|_| panic!("no event after {got:?} (rejoined: {rejoined:?})")).expect("open");
        match ev {
            RoomEvent::Event(e) => got.push(e.offset),
            RoomEvent::Rejoined { recovered } => *rejoined = Some(recovered),
            _ => {}
        }
    }
}
