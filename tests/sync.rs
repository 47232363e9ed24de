//! Synced rooms end to end: real hubs on 127.0.0.1, the Rust client's
//! `Synced` handle and raw WebSocket clients for bad input. Two hubs over a
//! `MemoryBackplane` and one shared `MemorySnapshots` stand for two nodes
//! (the Redis store has its own tests in tests/sync_redis.rs).

mod support;

use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use support::WAIT;
use switchboard::client::sync::Synced;
use switchboard::client::{Backoff, Client, ClientConfig};
use switchboard::sync::{
    Context, JsonDoc, JsonOp, MemorySnapshots, Reducer, Reject, SnapshotStore, SyncConfig, SyncRooms,
};
use switchboard::transport::Handshake;
use switchboard::{backplane::MemoryBackplane, Hub, Identity, Rejection};
use tokio::net::TcpListener;

fn user_from_query(hs: &Handshake) -> impl std::future::Future<Output = Result<Identity, Rejection>> + Send + 'static {
    let user = hs.query("user");
    async move { Ok(user.map(Identity::user).unwrap_or_default()) }
}

fn hub_with(store: MemorySnapshots, config: SyncConfig, backplane: Option<MemoryBackplane>) -> Hub {
    let mut b =
        Hub::builder().authenticate(user_from_query).sync(SyncRooms::new(store).config(config).room("doc:", JsonDoc));
    if let Some(bp) = backplane {
        b = b.backplane(bp);
    }
    b.build()
}

fn hub(store: MemorySnapshots) -> Hub {
    hub_with(store, SyncConfig::default(), None)
}

fn fast() -> ClientConfig {
    ClientConfig::default()
        .backoff(Backoff::default().initial(Duration::from_millis(20)).max(Duration::from_millis(100)))
        .jitter_seed(Some(1))
        .call_timeout(WAIT)
}

fn connect(addr: SocketAddr, user: &str) -> Client {
    Client::builder(format!("ws://{addr}/?user={user}")).config(fast()).connect().expect("client")
}

fn set(path: &[&str], value: Value) -> JsonOp {
    JsonOp::Set { path: path.iter().map(|s| (*s).into()).collect(), value }
}

fn delete(path: &[&str]) -> JsonOp {
    JsonOp::Delete { path: path.iter().map(|s| (*s).into()).collect() }
}

async fn settled(s: &Synced<JsonDoc>) {
    tokio::time::timeout(WAIT, s.settled()).await.unwrap_or_else(|_| panic!("not settled: {:?}", s.view()));
}

/// Waits until `s`'s confirmed version reaches `v`.
async fn at_version(s: &Synced<JsonDoc>, v: u64) {
    let mut rx = s.watch();
    tokio::time::timeout(WAIT, rx.wait_for(|view| view.version >= v && view.pending == 0))
        .await
        .unwrap_or_else(|_| panic!("version {v} not reached: {:?}", s.view()))
        .unwrap();
}

/// A hub, and ann's and bob's synced handles on `room`.
async fn ann_and_bob(room: &str) -> (SocketAddr, (Client, Synced<JsonDoc>), (Client, Synced<JsonDoc>)) {
    let h = hub(MemorySnapshots::new());
    let addr = support::serve(&h).await;
    let (ann, bob) = (connect(addr, "ann"), connect(addr, "bob"));
    let a = Synced::join(&ann, room, JsonDoc).await.unwrap();
    let b = Synced::join(&bob, room, JsonDoc).await.unwrap();
    (addr, (ann, a), (bob, b))
}

// ---------------------------------------------------------------------------
// The Rust client

#[tokio::test]
async fn local_ops_show_at_once_and_every_member_converges() {
    let (addr, (_ann, a), (_bob, b)) = ann_and_bob("doc:1").await;
    assert_eq!(a.view().state, Value::Null, "an empty room's document is null");
    a.apply(set(&["items"], json!({}))).unwrap();
    at_version(&b, 1).await;

    a.apply(set(&["title"], json!("Groceries"))).unwrap();
    // Predicted: in the view before any round trip, not yet confirmed.
    assert_eq!(a.view().state["title"], "Groceries");
    assert_eq!(a.confirmed().1, 1);
    // Both edit the same field and different ones at once.
    for i in 0..20 {
        a.apply(set(&["n"], json!(format!("a{i}")))).unwrap();
        b.apply(set(&["n"], json!(format!("b{i}")))).unwrap();
        b.apply(set(&["items", &format!("b{i}")], json!({"text": i}))).unwrap();
    }
    settled(&a).await;
    settled(&b).await;
    at_version(&a, 62).await;
    at_version(&b, 62).await;
    assert_eq!(a.view().state, b.view().state, "the two views converge");
    assert_eq!(a.view().state["items"].as_object().unwrap().len(), 20);
    assert_eq!(a.view().version, 62, "every op applied once");
    // A newcomer gets a snapshot equal to both.
    let carl = connect(addr, "carl");
    let c = Synced::join(&carl, "doc:1", JsonDoc).await.unwrap();
    assert_eq!((c.view().state, c.view().version), (a.view().state, 62));
}

#[tokio::test]
async fn a_refused_op_is_rolled_back_on_its_sender_only() {
    let (_, (_ann, a), (_bob, b)) = ann_and_bob("doc:r").await;
    a.apply(set(&["items"], json!({"x": {"text": "milk"}}))).unwrap();
    at_version(&a, 1).await;
    at_version(&b, 1).await;

    // Bob deletes the item; Ann, not yet seeing that, edits it.
    let (_, before) = a.confirmed();
    b.apply(delete(&["items", "x"])).unwrap();
    at_version(&b, 2).await;
    // Ann's edit is predicted against her (stale) view.
    if a.view().version == before {
        a.apply(set(&["items", "x", "text"], json!("oat milk"))).unwrap();
    } else {
        // Bob's delete already arrived: the edit is refused locally, not sent.
        let e = a.apply(set(&["items", "x", "text"], json!("oat milk"))).unwrap_err();
        assert_eq!(e.code(), 409);
        return;
    }
    let undone = tokio::time::timeout(WAIT, a.rollback()).await.expect("a rollback").unwrap();
    assert_eq!(undone.code, 409);
    assert!(undone.message.contains("no value at"), "{}", undone.message);
    settled(&a).await;
    assert_eq!(a.view().state, json!({"items": {}}));
    assert_eq!(a.view().version, 2, "the refused op got no version");
    assert!(b.try_rollback().is_none(), "only the sender rolls back");
}

#[tokio::test]
async fn pending_ops_survive_a_server_restart_and_are_applied_once() {
    let store = MemorySnapshots::new();
    let addr = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
    let hub1 = hub(store.clone());
    support::serve_on(addr, &hub1).await;
    let ann = connect(addr, "ann");
    let a = Synced::join(&ann, "doc:off", JsonDoc).await.unwrap();
    a.apply(JsonOp::Increment { path: vec!["n".into()], by: 1.0 }).unwrap();
    at_version(&a, 1).await;

    hub1.shutdown(Duration::from_secs(5)).await;
    // Offline edits: predicted at once, pending.
    for _ in 0..5 {
        a.apply(JsonOp::Increment { path: vec!["n".into()], by: 1.0 }).unwrap();
    }
    assert_eq!(a.view().state["n"], 6);
    assert_eq!(a.view().pending, 5);

    let hub2 = hub(store.clone());
    support::serve_on(addr, &hub2).await;
    settled(&a).await;
    assert_eq!(a.view().state["n"], 6);
    assert_eq!(a.view().version, 6, "each increment applied once");
    let loaded = store.load("doc:off", None).await.unwrap();
    assert_eq!(loaded.version, 6);
}

/// A hub without an op rate limit on a free port, its store, and ann
/// connected to it (for tests that queue 1,000 ops).
async fn ann_on_an_unthrottled_hub() -> (MemorySnapshots, SocketAddr, SyncConfig, Hub, Client) {
    let store = MemorySnapshots::new();
    let addr = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
    let config = SyncConfig::default().op_rate(100_000).op_burst(100_000);
    let hub = hub_with(store.clone(), config.clone(), None);
    support::serve_on(addr, &hub).await;
    (store, addr, config, hub, connect(addr, "ann"))
}

/// The client's pending-op cap (1,000): while the server is down, the
/// 1,001st op is refused locally with 429 and leaves no trace; when the
/// server is back every queued op is applied once and the cap frees.
#[tokio::test]
async fn the_1001st_pending_op_is_refused_with_429_and_the_queue_stays_consistent() {
    let (store, addr, config, hub1, ann) = ann_on_an_unthrottled_hub().await;
    let a = Synced::join(&ann, "doc:cap", JsonDoc).await.unwrap();
    let inc = || JsonOp::Increment { path: vec!["n".into()], by: 1.0 };
    a.apply(inc()).unwrap();
    at_version(&a, 1).await;

    // Offline: nothing is acknowledged, so every op stays pending.
    hub1.shutdown(Duration::from_secs(5)).await;
    for i in 0..1000 {
        a.apply(inc()).unwrap_or_else(|e| panic!("op {} of 1,000 refused: {e:?}", i + 1));
    }
    let full = a.view();
    assert_eq!((full.pending, full.state["n"].as_f64()), (1000, Some(1001.0)));
    let e = a.apply(inc()).expect_err("the 1,001st pending op is refused");
    assert_eq!(e.code(), 429, "{e:?}");
    assert!(e.message().contains("too many changes"), "{e:?}");
    assert_eq!(a.view(), full, "the refused op left the view and the queue as they were");
    assert!(a.try_rollback().is_none(), "a local refusal is returned, not rolled back");

    // Back online: the 1,000 queued ops are applied exactly once each.
    let hub2 = hub_with(store.clone(), config, None);
    support::serve_on(addr, &hub2).await;
    // One op at a time, 1,000 round trips: the deadline is for progress.
    let mut rx = a.watch();
    loop {
        let before = rx.borrow_and_update().clone();
        if before.pending == 0 && before.synced {
            break;
        }
        tokio::time::timeout(WAIT, rx.changed())
            .await
            .unwrap_or_else(|_| panic!("no progress for {WAIT:?}: {before:?}"))
            .unwrap();
    }
    let view = a.view();
    assert_eq!((view.version, view.state["n"].as_f64()), (1001, Some(1001.0)), "each queued op applied once");
    assert_eq!(store.load("doc:cap", None).await.unwrap().version, 1001);
    assert!(a.try_rollback().is_none(), "nothing was refused by the server");
    a.apply(inc()).expect("the cap frees once ops are confirmed");
    at_version(&a, 1002).await;
}

/// `JsonDoc` on the client, counting how often the client applies an op.
struct Counting(Arc<AtomicUsize>);

impl Reducer for Counting {
    type State = Value;
    type Op = JsonOp;
    fn apply(&self, doc: &mut Value, op: &JsonOp, cx: &Context) -> Result<(), Reject> {
        self.0.fetch_add(1, Ordering::Relaxed);
        JsonDoc.apply(doc, op, cx)
    }
}

#[tokio::test]
async fn draining_1000_pending_ops_replays_none_of_them() {
    let (store, addr, config, hub1, ann) = ann_on_an_unthrottled_hub().await;
    let calls = Arc::new(AtomicUsize::new(0));
    let a = Synced::join(&ann, "doc:drain", Counting(calls.clone())).await.unwrap();
    let inc = || JsonOp::Increment { path: vec!["n".into()], by: 1.0 };
    hub1.shutdown(Duration::from_secs(5)).await;
    for _ in 0..1000 {
        a.apply(inc()).unwrap();
    }
    let before = calls.load(Ordering::Relaxed);

    let hub2 = hub_with(store.clone(), config, None);
    support::serve_on(addr, &hub2).await;
    let mut rx = a.watch();
    tokio::time::timeout(WAIT * 4, rx.wait_for(|v| v.pending == 0 && v.synced)).await.expect("drained").unwrap();
    let view = a.view();
    assert_eq!((view.version, view.state["n"].as_f64()), (1000, Some(1000.0)));
    // Each acknowledged op is applied once more, to the confirmed state;
    // the reconnect's resync replays the queue once. Replaying the queue
    // on every acknowledgement would be about 500,000 applications.
    let drain = calls.load(Ordering::Relaxed) - before;
    assert!(drain <= 3 * 1000, "{drain} applications to drain 1,000 ops");
}

#[tokio::test]
async fn two_hubs_share_one_order_and_converge() {
    let store = MemorySnapshots::new();
    let bp = MemoryBackplane::new();
    let h1 = hub_with(store.clone(), SyncConfig::default(), Some(bp.clone()));
    let h2 = hub_with(store.clone(), SyncConfig::default(), Some(bp.clone()));
    let (addr1, addr2) = (support::serve(&h1).await, support::serve(&h2).await);
    let clients: Vec<Client> =
        (0..4).map(|i| connect(if i % 2 == 0 { addr1 } else { addr2 }, &format!("u{i}"))).collect();
    let mut synced = Vec::new();
    for c in &clients {
        synced.push(Synced::join(c, "doc:2n", JsonDoc).await.unwrap());
    }
    for round in 0..25 {
        for (i, s) in synced.iter().enumerate() {
            s.apply(JsonOp::Increment { path: vec!["n".into()], by: 1.0 }).unwrap();
            s.apply(set(&["last"], json!(format!("{i}-{round}")))).unwrap();
        }
    }
    for s in &synced {
        settled(s).await;
    }
    for s in &synced {
        at_version(s, 200).await;
    }
    let first = synced[0].view();
    assert_eq!(first.state["n"], 100, "every increment applied exactly once across nodes");
    for s in &synced[1..] {
        assert_eq!(s.view().state, first.state, "all members converge");
    }
    let log = store.load("doc:2n", Some(0)).await.unwrap();
    assert_eq!(log.version, 200);
    let versions: Vec<u64> = log.ops.iter().map(|o| o.version).collect();
    assert_eq!(versions, (1..=200).collect::<Vec<_>>(), "no version assigned twice, none skipped");
}

/// The Rust client's snapshot-on-resync path: ann's node goes down while
/// she has pending ops and bob pushes 40 ops through the other node; the
/// store keeps 5 ops before its newest snapshot (one every 10), so when
/// ann is back she is too far behind for the ops, loads the snapshot and
/// rebases her pending ops on it.
#[tokio::test]
async fn a_client_too_far_behind_loads_the_snapshot_and_rebases_its_pending_ops() {
    let store = MemorySnapshots::new().retain(5);
    let bp = MemoryBackplane::new();
    let config = SyncConfig::default().snapshot_every(10).op_rate(10_000).op_burst(10_000);
    let h1 = hub_with(store.clone(), config.clone(), Some(bp.clone()));
    let addr1 = support::serve(&h1).await;
    let addr2 = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
    let h2 = hub_with(store.clone(), config.clone(), Some(bp.clone()));
    support::serve_on(addr2, &h2).await;
    let (ann, bob) = (connect(addr2, "ann"), connect(addr1, "bob"));
    let a = Synced::join(&ann, "doc:far", JsonDoc).await.unwrap();
    let b = Synced::join(&bob, "doc:far", JsonDoc).await.unwrap();
    a.apply(set(&["items"], json!({}))).unwrap();
    at_version(&b, 1).await;
    at_version(&a, 1).await;

    // Ann's node goes down; she keeps editing.
    h2.shutdown(Duration::from_secs(5)).await;
    let inc = |who: &str| JsonOp::Increment { path: vec![who.into()], by: 1.0 };
    for i in 0..5 {
        a.apply(inc("ann")).unwrap();
        a.apply(set(&["items", &format!("a{i}")], json!(i))).unwrap();
    }
    assert_eq!(a.view().pending, 10);
    assert_eq!(a.view().state["ann"], 5, "predicted while offline");
    // Bob pushes 40 ops meanwhile.
    for i in 0..20 {
        b.apply(inc("bob")).unwrap();
        b.apply(set(&["items", &format!("b{i}")], json!(i))).unwrap();
    }
    settled(&b).await;
    assert_eq!(b.view().version, 41);
    assert_eq!(a.view().version, 1, "ann saw none of it");
    let behind = store.load("doc:far", Some(1)).await.unwrap();
    assert_eq!(
        behind.snapshot.as_ref().map(|s| s.0),
        Some(40),
        "precondition: from 1, the store has only the snapshot"
    );

    // Ann's node is back: she loads the snapshot, rebases and resends.
    let h2 = hub_with(store.clone(), config, Some(bp.clone()));
    support::serve_on(addr2, &h2).await;
    settled(&a).await;
    at_version(&a, 51).await;
    at_version(&b, 51).await;
    let server = store.load("doc:far", None).await.unwrap();
    assert_eq!(server.version, 51, "41 before, and each of ann's 10 pending ops appended once");
    let view = a.view();
    assert_eq!(view.state["ann"], 5, "each of ann's increments applied exactly once");
    assert_eq!(view.state["bob"], 20);
    assert_eq!(view.state["items"].as_object().unwrap().len(), 25, "ann's and bob's items");
    assert_eq!(view.state, b.view().state, "ann's view equals bob's");
    // The server's state: the snapshot and the ops after it.
    let (v, mut state) = server.snapshot.clone().expect("a snapshot");
    for rec in server.ops.iter().filter(|o| o.version > v) {
        let op: JsonOp = serde_json::from_value(rec.op.clone()).unwrap();
        let cx = switchboard::sync::Context::new("doc:far", &rec.client, rec.user.as_deref(), rec.base);
        switchboard::sync::Reducer::apply(&JsonDoc, &mut state, &op, &cx).unwrap();
    }
    assert_eq!(view.state, state, "ann's view equals the server's state");
    assert_eq!(a.confirmed(), (state, 51));
    assert!(a.try_rollback().is_none(), "nothing of ann's was refused");
}

// ---------------------------------------------------------------------------
// The wire, with a raw client

async fn raw(addr: SocketAddr, user: &str, room: &str) -> support::Client {
    let mut c = support::connect_path(addr, &format!("/?user={user}")).await;
    c.join_ok(room).await;
    c
}

fn op(client: &str, seq: u64, base: Value, op: Value) -> Value {
    json!({"client": client, "seq": seq, "base": base, "op": op})
}

async fn version(c: &mut support::Client, room: &str) -> (u64, Value) {
    let r = c.call_in(room, "sync.get", json!({})).await;
    assert_eq!(r["type"], "reply", "{r}");
    (r["data"]["version"].as_u64().unwrap(), r["data"]["state"].clone())
}

#[tokio::test]
async fn the_wire_ack_broadcast_duplicate_and_snapshot() {
    let h = hub(MemorySnapshots::new());
    let addr = support::serve(&h).await;
    let mut c = raw(addr, "ann", "doc:w").await;
    let mut other = raw(addr, "bob", "doc:w").await;
    let set_a = json!({"type":"set","path":["a"],"value":1});
    let r = c.call_in("doc:w", "sync.op", op("c1", 1, json!(0), set_a.clone())).await;
    assert_eq!(r["data"], json!({"version": 1}), "{r}");
    let ev = other.event().await;
    assert_eq!(ev["event"], "sync.op");
    assert_eq!(
        ev["data"],
        json!({"version":1,"client":"c1","seq":1,"user":"ann","base":0,"op":set_a}),
        "the broadcast names the op, its version and its origin"
    );
    // A resend (same id) is answered with the original outcome and not applied again.
    let r = c.call_in("doc:w", "sync.op", op("c1", 1, json!(0), set_a.clone())).await;
    assert_eq!(r["data"], json!({"version": 1, "duplicate": true}), "{r}");
    assert_eq!(version(&mut c, "doc:w").await, (1, json!({"a": 1})));
    // `since` within the log: the ops; a client's last applied seq.
    let r = c.call_in("doc:w", "sync.get", json!({"since": 0, "client": "c1"})).await;
    assert_eq!(r["data"]["ops"].as_array().map(Vec::len), Some(1), "{r}");
    assert_eq!(r["data"]["client_seq"], 1);
    assert_eq!(r["data"]["user"], "ann");
    // A refusal carries the current version and changes nothing.
    let r = c.call_in("doc:w", "sync.op", op("c1", 2, json!(1), json!({"type":"delete","path":["zz"]}))).await;
    assert_eq!((r["type"].as_str(), r["code"].as_u64()), (Some("error"), Some(409)), "{r}");
    assert_eq!(r["data"], json!({"version": 1}));
    // Its resend gets the same refusal.
    let again =
        c.call_in("doc:w", "sync.op", op("c1", 2, json!(1), json!({"type":"set","path":["b"],"value":2}))).await;
    assert_eq!((again["code"].as_u64(), &again["message"]), (Some(409), &r["message"]), "{again}");
    assert_eq!(version(&mut c, "doc:w").await, (1, json!({"a": 1})));
}

#[tokio::test]
async fn bad_ops_get_their_documented_error_and_change_nothing() {
    let config = SyncConfig::default().max_op_bytes(300).max_state_bytes(150);
    let h = hub_with(MemorySnapshots::new(), config, None);
    let addr = support::serve(&h).await;
    let mut c = raw(addr, "ann", "doc:bad").await;
    let good = json!({"type":"set","path":["a"],"value":1});
    let r = c.call_in("doc:bad", "sync.op", op("c1", 1, json!(0), good.clone())).await;
    assert_eq!(r["type"], "reply", "{r}");
    let before = version(&mut c, "doc:bad").await;

    let cases: Vec<(&str, Value, u64)> = vec![
        ("garbage data", json!("not an op request"), 422),
        ("missing fields", json!({"client": "c1", "seq": 2}), 422),
        ("unknown field", json!({"client": "c1", "seq": 2, "base": 1, "op": good, "x": 1}), 422),
        ("unknown op type", op("c1", 2, json!(1), json!({"type":"frob","path":[]})), 422),
        ("op of the wrong shape", op("c1", 2, json!(1), json!({"type":"set","path":"a"})), 422),
        ("negative base", op("c1", 2, json!(-1), good.clone()), 422),
        ("fractional base", op("c1", 2, json!(0.5), good.clone()), 422),
        ("future base", op("c1", 2, json!(99), good.clone()), 400),
        ("seq 0", op("c1", 0, json!(1), good.clone()), 400),
        ("bad client id", op("c 1", 2, json!(1), good.clone()), 400),
        ("empty client id", op("", 2, json!(1), good.clone()), 400),
        ("oversized op", op("c1", 2, json!(1), json!({"type":"set","path":["a"],"value":"x".repeat(400)})), 413),
        ("state too large", op("c1", 2, json!(1), json!({"type":"set","path":["a"],"value":"x".repeat(200)})), 413),
    ];
    for (what, data, code) in cases {
        let r = c.call_in("doc:bad", "sync.op", data).await;
        assert_eq!((r["type"].as_str(), r["code"].as_u64()), (Some("error"), Some(code)), "{what}: {r}");
        assert_eq!(version(&mut c, "doc:bad").await, before, "{what}: the state is untouched");
    }
    // The state bound is checked on the result: small ops still fit. (Seq 2
    // was refused for its size: a resend of it would get that answer again.)
    for seq in 3..=4 {
        let r = c
            .call_in("doc:bad", "sync.op", op("c1", seq, json!(1), json!({"type":"set","path":["s"],"value":seq})))
            .await;
        assert_eq!(r["type"], "reply", "{r}");
    }
    // A stale seq of this client (below its last applied one): 409.
    let r = c.call_in("doc:bad", "sync.op", op("c1", 1, json!(3), good.clone())).await;
    assert_eq!(r["code"], 409, "{r}");
    let r = c.call_in("doc:bad", "sync.op", op("c1", 2, json!(3), good.clone())).await;
    assert_eq!(r["code"], 413, "a resent refused op gets its refusal again: {r}");
    // Another user replaying ann's client id: 403, nothing applied.
    let mut mallory = raw(addr, "mallory", "doc:bad").await;
    let r = mallory.call_in("doc:bad", "sync.op", op("c1", 5, json!(3), good.clone())).await;
    assert_eq!((r["code"].as_u64(), r["data"]["version"].as_u64()), (Some(403), Some(3)), "{r}");
    let r = mallory.call_in("doc:bad", "sync.op", op("c1", 4, json!(3), good.clone())).await;
    assert_eq!(r["code"], 403, "a replayed id is not acknowledged to another user: {r}");
    assert_eq!(version(&mut c, "doc:bad").await.0, 3);
    // A room that is not synced, a call without a room, a get ahead of the room.
    c.join_ok("plain").await;
    let r = c.call_in("plain", "sync.op", op("c1", 9, json!(0), good.clone())).await;
    assert_eq!(r["code"], 404, "{r}");
    let r = c.call("sync.get", json!({})).await;
    assert_eq!(r["code"], 400, "{r}");
    let r = c.call_in("doc:bad", "sync.get", json!({"since": 50})).await;
    assert_eq!((r["code"].as_u64(), r["data"]["version"].as_u64()), (Some(400), Some(3)), "{r}");
    let r = c.call_in("doc:bad", "sync.get", json!({"since": -1})).await;
    assert_eq!(r["code"], 422, "{r}");
    // Still alive and usable.
    let r = c.call_in("doc:bad", "sync.op", op("c1", 5, json!(3), good)).await;
    assert_eq!(r["data"]["version"], 4, "{r}");
}

#[tokio::test]
async fn ops_over_the_rate_get_420_with_retry_after() {
    let config = SyncConfig::default().op_rate(1).op_burst(3);
    let h = hub_with(MemorySnapshots::new(), config, None);
    let addr = support::serve(&h).await;
    let mut c = raw(addr, "ann", "doc:rate").await;
    let mut codes = Vec::new();
    for seq in 1..=5 {
        let r = c
            .call_in(
                "doc:rate",
                "sync.op",
                op("c1", seq, json!(seq - 1), json!({"type":"set","path":["n"],"value":seq})),
            )
            .await;
        codes.push(r["code"].as_u64().unwrap_or(0));
        if r["code"] == 420 {
            assert!(r["data"]["retry_after_ms"].as_u64().unwrap() > 0, "{r}");
        }
    }
    assert_eq!(codes, [0, 0, 0, 420, 420]);
    assert_eq!(version(&mut c, "doc:rate").await.0, 3);
}

#[tokio::test]
async fn a_late_joiner_far_behind_gets_a_snapshot() {
    let config = SyncConfig::default().snapshot_every(10).op_rate(10_000).op_burst(10_000);
    let h = hub_with(MemorySnapshots::new().retain(5), config, None);
    let addr = support::serve(&h).await;
    let mut c = raw(addr, "ann", "doc:snap").await;
    for seq in 1..=37u64 {
        let r = c
            .call_in(
                "doc:snap",
                "sync.op",
                op("c1", seq, json!(seq - 1), json!({"type":"increment","path":["n"],"by":1})),
            )
            .await;
        assert_eq!(r["data"]["version"], seq, "{r}");
    }
    // Near the top: the ops. Far behind: the state.
    let r = c.call_in("doc:snap", "sync.get", json!({"since": 35})).await;
    assert_eq!(r["data"]["ops"].as_array().map(Vec::len), Some(2), "{r}");
    let r = c.call_in("doc:snap", "sync.get", json!({"since": 3})).await;
    assert_eq!((r["data"]["version"].as_u64(), &r["data"]["state"]), (Some(37), &json!({"n": 37})), "{r}");
}

#[tokio::test]
async fn memory_snapshots_pass_the_conformance_suite() {
    let store = MemorySnapshots::new().retain(4);
    switchboard::testing::SnapshotSuite::new(store.clone(), store).run().await.unwrap();
    // The one-handle shorthand still runs the same checks.
    switchboard::testing::snapshot_store(MemorySnapshots::new().retain(4)).await;
}
