//! The property of synced rooms, checked over random runs: N clients (the
//! real `Synced` handle over real WebSockets) issue random ops with random
//! delays while their connections are dropped at random, a raw client
//! resends applied ops (its own user's: duplicates; another user's:
//! replays); against one hub, and against two hubs over Redis (its own
//! `redis-server`). After quiescence:
//!
//! - every client's view equals the server's state (convergence);
//! - each client's counter equals the increments it made (applied exactly
//!   once, however often resent);
//! - every op a client queued either got a version or was rolled back on
//!   that client: ops applied locally = versions assigned + rollbacks;
//! - the store's log has versions 1..=top, each once.

mod support;

use proptest::prelude::*;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use switchboard::client::sync::Synced;
use switchboard::client::{Backoff, Client, ClientConfig, Status};
use switchboard::protocol::CloseCode;
use switchboard::sync::{JsonDoc, JsonOp, MemorySnapshots, Seg, SnapshotStore, SyncConfig, SyncRooms};
use switchboard::transport::Handshake;
use switchboard::{Hub, HubBuilder, Identity, Rejection};

const CLIENTS: usize = 4;
const STEPS: usize = 30;
const ROOM: &str = "doc:prop";
const SETTLE: Duration = Duration::from_secs(30);

fn user_from_query(hs: &Handshake) -> impl std::future::Future<Output = Result<Identity, Rejection>> + Send + 'static {
    let user = hs.query("user");
    async move { Ok(user.map(Identity::user).unwrap_or_default()) }
}

fn builder(store: impl SnapshotStore) -> HubBuilder {
    let config = SyncConfig::default().op_rate(10_000).op_burst(10_000).snapshot_every(25);
    Hub::builder().authenticate(user_from_query).sync(SyncRooms::new(store).config(config).room("doc:", JsonDoc))
}

/// A small deterministic generator (xorshift), seeded by proptest.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

fn p(segs: &[&str]) -> Vec<Seg> {
    segs.iter().map(|s| (*s).into()).collect()
}

fn connect(addr: SocketAddr, user: &str) -> Client {
    let config = ClientConfig::default()
        .backoff(Backoff::default().initial(Duration::from_millis(10)).max(Duration::from_millis(50)))
        .call_timeout(Duration::from_secs(10));
    Client::builder(format!("ws://{addr}/?user={user}")).config(config).connect().expect("client")
}

/// Drops `client`'s connection, if it has one (it reconnects).
fn drop_connection(hub: &Hub, client: &Client) {
    if let Status::Connected { connection_id, .. } = &*client.status().borrow() {
        if let Some(m) = hub.room_members(ROOM).into_iter().find(|m| m.connection.get() == *connection_id) {
            hub.disconnect(m.connection, CloseCode::RECONNECT, "test: reconnect");
        }
    }
}

/// Resends applied ops it sees broadcast: client 0's as its user u0 (a
/// duplicate: acknowledged as such, or 409 when older than u0's last op),
/// client 1's as u0 too (a replay of another user's id: 403). Any other
/// answer, or an ack that is not a duplicate, is a failure.
async fn replayer(addr: SocketAddr, stop: Arc<AtomicBool>, resent: Arc<AtomicU64>) -> Result<(), String> {
    let mut raw = support::connect_path(addr, "/?user=u0").await;
    raw.join_ok(ROOM).await;
    let mut expect = std::collections::HashMap::new();
    let mut seen = 0u64;
    while !stop.load(Ordering::Relaxed) || !expect.is_empty() {
        let Ok(msg) = tokio::time::timeout(Duration::from_millis(200), raw.recv()).await else { continue };
        match msg["type"].as_str() {
            Some("event") if msg["event"] == "sync.op" && !stop.load(Ordering::Relaxed) => {
                let d = &msg["data"];
                let from = d["user"].as_str().unwrap_or("");
                seen += 1;
                if (from == "u0" || from == "u1") && seen % 3 == 0 {
                    let r = raw.next_ref();
                    let data = json!({"client": d["client"], "seq": d["seq"], "base": d["base"], "op": d["op"]});
                    raw.send(json!({"type":"call","ref":r,"room":ROOM,"event":"sync.op","data":data})).await;
                    expect.insert(r, from == "u0");
                    resent.fetch_add(1, Ordering::Relaxed);
                }
            }
            Some("reply") | Some("error") => {
                let Some(own) = msg["ref"].as_u64().and_then(|r| expect.remove(&r)) else { continue };
                let ok = match (own, msg["type"].as_str()) {
                    (true, Some("reply")) => msg["data"]["duplicate"] == true,
                    (true, _) => msg["code"] == 409,
                    (false, _) => msg["code"] == 403,
                };
                if !ok {
                    return Err(format!("a resent op (own user: {own}) got {msg}"));
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// One client's random run; returns (ops queued, increments queued).
async fn run_client(i: usize, seed: u64, s: &Synced<JsonDoc>, client: &Client, hub: &Hub) -> (u64, u64) {
    let mut rng = Rng(seed ^ (i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let (mut queued, mut incs) = (0, 0);
    let user = format!("u{i}");
    for step in 0..STEPS {
        let view = s.view().state;
        let key = format!("k{}", rng.below(3));
        let op = match rng.below(20) {
            0..=7 => JsonOp::Increment { path: p(&["counts", &user]), by: 1.0 },
            8..=11 => JsonOp::Set { path: p(&["items", &key]), value: json!({"by": i, "step": step}) },
            12..=14 => JsonOp::Delete { path: p(&["items", &key]) },
            15..=16 => JsonOp::Insert { path: p(&["list"]), index: None, value: json!(format!("{i}.{step}")) },
            17 => {
                let len = view["list"].as_array().map_or(0, Vec::len) as u64;
                JsonOp::Remove { path: p(&["list"]), index: rng.below(len.max(1)) as usize }
            }
            _ => {
                drop_connection(hub, client);
                continue;
            }
        };
        let is_inc = matches!(op, JsonOp::Increment { .. });
        if s.apply(op).is_ok() {
            queued += 1;
            incs += u64::from(is_inc);
        }
        match rng.below(4) {
            0 => tokio::task::yield_now().await,
            1 => {}
            _ => tokio::time::sleep(Duration::from_millis(rng.below(6))).await,
        }
    }
    (queued, incs)
}

/// Runs the scenario with client `i` on `nodes[i % nodes.len()]`.
async fn scenario(seed: u64, nodes: &[(Hub, SocketAddr)], store: &dyn SnapshotStore) {
    let clients: Vec<Client> = (0..CLIENTS).map(|i| connect(nodes[i % nodes.len()].1, &format!("u{i}"))).collect();
    let mut synced = Vec::new();
    for c in &clients {
        synced.push(Synced::join(c, ROOM, JsonDoc).await.expect("join"));
    }
    let counts: serde_json::Map<String, Value> = (0..CLIENTS).map(|i| (format!("u{i}"), json!(0))).collect();
    synced[0].apply(JsonOp::Set { path: vec![], value: json!({"counts": counts, "items": {}, "list": []}) }).unwrap();
    for s in &synced {
        let mut rx = s.watch();
        tokio::time::timeout(SETTLE, rx.wait_for(|v| v.version >= 1)).await.expect("setup reached everyone").unwrap();
    }

    let stop = Arc::new(AtomicBool::new(false));
    let resent = Arc::new(AtomicU64::new(0));
    let replay = tokio::spawn(replayer(nodes[0].1, stop.clone(), resent.clone()));
    let runs = futures::future::join_all(
        synced.iter().enumerate().map(|(i, s)| run_client(i, seed, s, &clients[i], &nodes[i % nodes.len()].0)),
    )
    .await;
    for (i, s) in synced.iter().enumerate() {
        tokio::time::timeout(SETTLE, s.settled())
            .await
            .unwrap_or_else(|_| panic!("client {i} settles: {:?}", s.view()));
    }
    stop.store(true, Ordering::Relaxed);
    replay.await.unwrap().unwrap_or_else(|e| panic!("seed {seed}: {e}"));

    let top = store.load(ROOM, None).await.unwrap().version;
    for s in &synced {
        let mut rx = s.watch();
        tokio::time::timeout(SETTLE, rx.wait_for(|v| v.version == top && v.pending == 0))
            .await
            .unwrap_or_else(|_| panic!("seed {seed}: a client stays behind {top}: {:?}", s.view()))
            .unwrap();
    }
    let fresh = connect(nodes[0].1, "checker");
    let server = Synced::join(&fresh, ROOM, JsonDoc).await.unwrap().view();
    assert_eq!(server.version, top);

    let mut rollbacks = 0;
    for (i, s) in synced.iter().enumerate() {
        assert_eq!(s.view().state, server.state, "seed {seed}: client {i} converges on the server's state");
        assert_eq!(
            server.state["counts"][format!("u{i}")],
            json!(runs[i].1),
            "seed {seed}: client {i}'s increments were applied exactly once"
        );
        while let Some(r) = s.try_rollback() {
            assert_eq!(r.code, 409, "seed {seed}: only conflicts are refused here: {r:?}");
            assert!(matches!(r.op, JsonOp::Delete { .. } | JsonOp::Remove { .. }), "seed {seed}: {r:?}");
            rollbacks += 1;
        }
    }
    let queued: u64 = runs.iter().map(|r| r.0).sum::<u64>() + 1;
    assert_eq!(queued, top + rollbacks, "seed {seed}: every queued op got a version or was rolled back, once");
    let log = store.load(ROOM, Some(0)).await.unwrap();
    assert!(log.snapshot.is_none(), "the test store keeps every op");
    assert_eq!(log.ops.iter().map(|o| o.version).collect::<Vec<_>>(), (1..=top).collect::<Vec<_>>());
    eprintln!("seed {seed:#x}: {top} versions, {rollbacks} rollbacks, {} resent", resent.load(Ordering::Relaxed));
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn one_hub_converges_exactly_once(seed in any::<u64>()) {
        runtime().block_on(async {
            let store = MemorySnapshots::new();
            let hub = builder(store.clone()).build();
            let addr = support::serve(&hub).await;
            scenario(seed, &[(hub, addr)], &store).await;
        });
    }
}

#[cfg(feature = "redis")]
proptest! {
    #![proptest_config(ProptestConfig { cases: 3, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn two_hubs_over_redis_converge_exactly_once(seed in any::<u64>()) {
        use switchboard::redis::{RedisBackplane, RedisConfig, RedisSnapshots};
        runtime().block_on(async {
            let server = support::redis::RedisServer::start().await;
            let config = support::redis::quick(RedisConfig::new(server.url()));
            let store = RedisSnapshots::connect(config.clone()).await.unwrap();
            let mut nodes = Vec::new();
            for _ in 0..2 {
                let bp = RedisBackplane::connect(config.clone()).await.unwrap();
                let own = RedisSnapshots::connect(config.clone()).await.unwrap();
                let hub = builder(own).backplane(bp).build();
                let addr = support::serve(&hub).await;
                nodes.push((hub, addr));
            }
            scenario(seed, &nodes, &store).await;
        });
    }
}
