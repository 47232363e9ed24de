//! Synced rooms on Redis (`RedisSnapshots`, its own `redis-server` per
//! test): the store conformance suite, two hubs over Redis racing for the
//! same versions, and a restart of every hub that loses nothing.

mod support;

use serde_json::json;
use std::time::Duration;
use support::redis::RedisServer;
use switchboard::client::sync::Synced;
use switchboard::client::{Backoff, Client, ClientConfig};
use switchboard::redis::{RedisBackplane, RedisConfig, RedisSnapshots};
use switchboard::sync::{JsonDoc, JsonOp, SnapshotStore, SyncRooms};
use switchboard::transport::Handshake;
use switchboard::{Hub, Identity, Rejection};

fn user_from_query(hs: &Handshake) -> impl std::future::Future<Output = Result<Identity, Rejection>> + Send + 'static {
    let user = hs.query("user");
    async move { Ok(user.map(Identity::user).unwrap_or_default()) }
}

fn config(server: &RedisServer) -> RedisConfig {
    support::redis::quick(RedisConfig::new(server.url()))
}

async fn node(server: &RedisServer) -> Hub {
    let store = RedisSnapshots::connect(config(server)).await.unwrap();
    let bp = RedisBackplane::connect(config(server)).await.unwrap();
    Hub::builder().authenticate(user_from_query).sync(SyncRooms::new(store).room("doc:", JsonDoc)).backplane(bp).build()
}

fn connect(addr: std::net::SocketAddr, user: &str) -> Client {
    let config = ClientConfig::default()
        .backoff(Backoff::default().initial(Duration::from_millis(20)).max(Duration::from_millis(100)))
        .call_timeout(support::WAIT);
    Client::builder(format!("ws://{addr}/?user={user}")).config(config).connect().unwrap()
}

fn inc() -> JsonOp {
    JsonOp::Increment { path: vec!["n".into()], by: 1.0 }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_snapshots_conform() {
    let server = RedisServer::start().await;
    let a = RedisSnapshots::connect(config(&server)).await.unwrap().retain(4);
    let b = RedisSnapshots::connect(config(&server)).await.unwrap().retain(4);
    let port = server.port();
    switchboard::testing::SnapshotSuite::new(a, b)
        .cut_connection(move || support::redis::cut_clients(vec![port]))
        .run()
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hubs_over_redis_never_assign_one_version_twice() {
    let server = RedisServer::start().await;
    let (h1, h2) = (node(&server).await, node(&server).await);
    let (a1, a2) = (support::serve(&h1).await, support::serve(&h2).await);
    let (c1, c2) = (connect(a1, "ann"), connect(a2, "bob"));
    let s1 = Synced::join(&c1, "doc:race", JsonDoc).await.unwrap();
    let s2 = Synced::join(&c2, "doc:race", JsonDoc).await.unwrap();
    s1.apply(JsonOp::Set { path: vec![], value: json!({"n": 0}) }).unwrap();
    tokio::time::timeout(support::WAIT, s2.watch().wait_for(|v| v.version == 1)).await.unwrap().unwrap();
    // Both nodes apply at once: each loses some races, catches up, applies again.
    for _ in 0..100 {
        s1.apply(inc()).unwrap();
        s2.apply(inc()).unwrap();
    }
    for s in [&s1, &s2] {
        tokio::time::timeout(support::WAIT, s.settled()).await.expect("settled");
        tokio::time::timeout(support::WAIT, s.watch().wait_for(|v| v.version == 201)).await.unwrap().unwrap();
        assert_eq!(s.view().state, json!({"n": 200}));
    }
    let store = RedisSnapshots::connect(config(&server)).await.unwrap();
    let log = store.load("doc:race", Some(0)).await.unwrap();
    assert_eq!(log.ops.iter().map(|o| o.version).collect::<Vec<_>>(), (1..=201).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarting_every_hub_loses_nothing() {
    let server = RedisServer::start().await;
    let addr = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let hub1 = node(&server).await;
    support::serve_on(addr, &hub1).await;
    let c = connect(addr, "ann");
    let s = Synced::join(&c, "doc:restart", JsonDoc).await.unwrap();
    s.apply(JsonOp::Set { path: vec![], value: json!({"n": 0}) }).unwrap();
    for _ in 0..150 {
        s.apply(inc()).unwrap();
    }
    tokio::time::timeout(support::WAIT, s.settled()).await.expect("settled");
    hub1.shutdown(Duration::from_secs(5)).await;
    drop(hub1);
    // Offline edits, then a new hub process-alike on the same Redis.
    for _ in 0..3 {
        s.apply(inc()).unwrap();
    }
    let hub2 = node(&server).await;
    support::serve_on(addr, &hub2).await;
    tokio::time::timeout(support::WAIT, s.settled()).await.expect("settled after the restart");
    assert_eq!((s.view().state, s.view().version), (json!({"n": 153}), 154));
    // A newcomer loads the snapshot (at 100) and the ops after it.
    let fresh = connect(addr, "bob");
    let f = Synced::join(&fresh, "doc:restart", JsonDoc).await.unwrap();
    assert_eq!((f.view().state, f.view().version), (json!({"n": 153}), 154));
}
