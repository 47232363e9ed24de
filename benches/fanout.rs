//! Fan-out and codec benchmarks.
//!
//! - `fanout/publish/N`: one `Hub::publish` of a ~100-byte event to a room of
//!   N members over the in-memory transport, until every member received it.
//!   The event is serialized once however large N is; time per delivery is
//!   the figure to watch (throughput is reported in deliveries).
//! - `codec/*`: envelope encode and decode, JSON and MessagePack.
//! - `fanout/publish_recoverable/N`: the same publish into a recoverable
//!   room (stored in `MemoryHistory`, delivered with its offset), to compare
//!   with `fanout/publish/N`.
//! - `history/*`: `MemoryHistory` append, and reads of 100 events after a
//!   position (a recovering join's read).
//! - `rooms/join_leave/N`: N connected members join a room with `Hub::join`
//!   and leave it with `Hub::leave` (the membership, the room's creation and
//!   removal; no client round trip). Throughput in join+leave pairs.
//! - `presence/join_leave/N`: the same in a room with presence, N distinct
//!   users: each join and leave also updates the presence state and queues
//!   the diffs to the room's members (batched by `batch_window`).
//! - `presence/store/*`: `MemoryPresence` writes one record, and lists a
//!   room of 100.
//!
//! Run: `cargo bench --bench fanout`.

// criterion's macros generate undocumented functions.
#![allow(missing_docs)]

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use futures::future::join_all;
use std::sync::{Arc, Mutex};
use switchboard::history::{Append, HistoryConfig, HistoryStore, MemoryHistory, Retention, StreamPosition};
use switchboard::presence::{PresenceRecord, PresenceStoreExt};
use switchboard::protocol::{Envelope, Format, Kind, Payload};
use switchboard::transport::memory::{self, MemoryPeer};
use switchboard::transport::{Frame, Handshake};
use switchboard::{presence::MemoryPresence, presence::PresenceConfig, ConnectionId, Hub, HubConfig, Identity};

async fn joined_peers(hub: &Hub, room: &str, n: usize) -> Vec<MemoryPeer> {
    let mut peers = Vec::with_capacity(n);
    for _ in 0..n {
        let (transport, mut peer) = memory::pair(1024);
        let h = hub.clone();
        tokio::spawn(async move {
            let _ = h.connect(transport, Handshake::new()).await;
        });
        let join = format!(r#"{{"type":"join","ref":1,"room":"{room}"}}"#);
        peer.send(Frame::Text(Bytes::from(join))).await.unwrap();
        // hello, then the join reply
        peer.recv().await.unwrap();
        peer.recv().await.unwrap();
        peers.push(peer);
    }
    peers
}

fn fanout(c: &mut Criterion) {
    fanout_group(c, "fanout/publish", false);
    fanout_group(c, "fanout/publish_recoverable", true);
}

fn fanout_group(c: &mut Criterion, name: &str, recoverable: bool) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let mut group = c.benchmark_group(name);
    group.sample_size(20);
    let payload =
        serde_json::json!({"seq": 1, "text": "a chat message of about one hundred bytes, give or take a few"});
    let sizes: &[usize] = if recoverable { &[100, 1_000] } else { &[100, 1_000, 10_000] };
    for &n in sizes {
        let mut builder = Hub::builder().config(HubConfig::default().heartbeat_interval(std::time::Duration::ZERO));
        if recoverable {
            builder = builder.history(MemoryHistory::new(), HistoryConfig::all_rooms());
        }
        let hub = builder.build();
        let mut peers = rt.block_on(joined_peers(&hub, "bench", n));
        group.throughput(Throughput::Elements(n as u64));
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| {
                rt.block_on(async {
                    hub.publish("bench", "msg", &payload).await.unwrap();
                    join_all(peers.iter_mut().map(|p| p.recv())).await;
                })
            })
        });
    }
    group.finish();
}

/// Connects `n` in-memory peers (user `u<i>` each) and returns their ids;
/// every peer is drained on a task of its own, so nothing backs up.
fn connected(rt: &tokio::runtime::Runtime, builder: switchboard::HubBuilder, n: usize) -> (Hub, Vec<ConnectionId>) {
    let ids = Arc::new(Mutex::new(Vec::with_capacity(n)));
    let seen = ids.clone();
    let hub = builder
        .config(HubConfig::default().heartbeat_interval(std::time::Duration::ZERO))
        .on_connect(move |conn| seen.lock().unwrap().push(conn.id()))
        .build();
    rt.block_on(async {
        for i in 0..n {
            let (transport, mut peer) = memory::pair(1024);
            let serve = hub.serve(transport, &Handshake::new(), Identity::user(format!("u{i}")));
            tokio::spawn(serve);
            peer.recv().await.expect("hello");
            tokio::spawn(async move { while peer.recv().await.is_some() {} });
        }
    });
    let ids = ids.lock().unwrap().clone();
    assert_eq!(ids.len(), n);
    (hub, ids)
}

fn join_leave(rt: &tokio::runtime::Runtime, hub: &Hub, ids: &[ConnectionId]) {
    rt.block_on(async {
        for id in ids {
            hub.join(*id, "bench").await.unwrap();
        }
        for id in ids {
            assert!(hub.leave(*id, "bench"));
        }
    })
}

fn rooms(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let mut group = c.benchmark_group("rooms");
    group.sample_size(20);
    let n = 1_000;
    let (hub, ids) = connected(&rt, Hub::builder(), n);
    group.throughput(Throughput::Elements(n as u64));
    group.bench_with_input(BenchmarkId::new("join_leave", n), &n, |b, _| b.iter(|| join_leave(&rt, &hub, &ids)));
    group.finish();
}

fn presence(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let mut group = c.benchmark_group("presence");
    group.sample_size(20);
    let n = 100;
    let (hub, ids) = connected(&rt, Hub::builder().presence(PresenceConfig::default()), n);
    group.throughput(Throughput::Elements(n as u64));
    group.bench_with_input(BenchmarkId::new("join_leave", n), &n, |b, _| b.iter(|| join_leave(&rt, &hub, &ids)));

    let store = MemoryPresence::new();
    let ttl = std::time::Duration::from_secs(60);
    for i in 0..100u64 {
        rt.block_on(store.put(PresenceRecord::new("listed", format!("u{i}"), 1, i), ttl)).unwrap();
    }
    let mut next = 0u64;
    group.throughput(Throughput::Elements(1));
    group.bench_function("store/put", |b| {
        b.iter(|| {
            next += 1;
            rt.block_on(store.put(PresenceRecord::new("written", format!("u{}", next % 1000), 1, next % 1000), ttl))
                .unwrap()
        })
    });
    group.throughput(Throughput::Elements(100));
    group.bench_function("store/list_room/100", |b| {
        b.iter(|| assert_eq!(rt.block_on(store.list_room("listed")).unwrap().len(), 100))
    });
    group.finish();
}

fn history(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let mut group = c.benchmark_group("history");
    let payload =
        Payload::encode(Format::Json, &serde_json::json!({"text": "about forty bytes of chat text"})).unwrap();
    let store = MemoryHistory::new();
    let append = || Append {
        event: "msg".into(),
        data: Some(payload.clone()),
        idempotency_key: None,
        retention: Retention::default(),
    };
    group.throughput(Throughput::Elements(1));
    group.bench_function("append", |b| b.iter(|| rt.block_on(store.append("bench", append())).unwrap()));
    let top = rt.block_on(store.append("bench", append())).unwrap().position;
    let since = StreamPosition { offset: top.offset - 100, epoch: top.epoch.clone() };
    group.throughput(Throughput::Elements(100));
    group.bench_function("read/100", |b| {
        b.iter(|| {
            let read = rt.block_on(store.read("bench", Some(since.clone()), 1001)).unwrap();
            assert_eq!(read.publications.len(), 100);
        })
    });
    group.finish();
}

fn codec(c: &mut Criterion) {
    let mut group = c.benchmark_group("codec");
    let small = serde_json::json!({"text": "hello", "n": 42});
    let big = serde_json::json!({"blob": "x".repeat(4096)});
    for (name, value) in [("small", &small), ("4k", &big)] {
        for format in [Format::Json, Format::MsgPack] {
            let env = Envelope::new(Kind::Event)
                .with_room("lobby")
                .with_event("msg")
                .with_data(Payload::encode(format, value).unwrap());
            let bytes = env.encode(format).unwrap();
            group.throughput(Throughput::Bytes(bytes.len() as u64));
            group.bench_function(format!("encode/{format:?}/{name}"), |b| b.iter(|| env.encode(format).unwrap()));
            group.bench_function(format!("decode/{format:?}/{name}"), |b| {
                b.iter(|| Envelope::decode(format, &bytes).unwrap())
            });
        }
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default();
    targets = fanout, rooms, presence, history, codec
}
criterion_main!(benches);
