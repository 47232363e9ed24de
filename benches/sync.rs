//! Synced rooms under load (`docs/performance.md`, "Synced rooms"): one
//! room, W writers and M watchers using the Rust client's `Synced` handle
//! over real WebSockets on 127.0.0.1. Each writer sets its own key, waits
//! until the server confirmed it, and goes on (closed loop), so the numbers
//! are the room's steady rate with W writers one op in flight each, and the
//! time from a writer's `apply` to the moment **every** watcher's confirmed
//! state has the op.
//!
//! Two set-ups: one hub with `MemorySnapshots`, and two hubs over Redis
//! (`RedisSnapshots` + `RedisBackplane`, a private `redis-server` on a free
//! port; skipped when there is none), writers and watchers split between
//! the hubs.
//!
//! ```text
//! cargo bench --bench sync --features client,redis -- [writers] [watchers] [ops per writer]
//! ```

use hdrhistogram::Histogram;
use serde_json::json;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use switchboard::client::sync::Synced;
use switchboard::client::Client;
use switchboard::sync::{JsonDoc, JsonOp, SnapshotStore, SyncConfig, SyncRooms};
use switchboard::Hub;

const ROOM: &str = "doc:bench";

fn hub(store: impl SnapshotStore, backplane: Option<switchboard::redis::RedisBackplane>) -> Hub {
    let config = SyncConfig::default().op_rate(1_000_000).op_burst(1_000_000);
    // No per-connection message rate (default 50/s): the bench measures the room, not that limit.
    let mut b = Hub::builder()
        .config(switchboard::HubConfig::default().rate_limit(None))
        .sync(SyncRooms::new(store).config(config).room("doc:", JsonDoc));
    if let Some(bp) = backplane {
        b = b.backplane(bp);
    }
    b.build()
}

async fn serve(hub: &Hub) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(switchboard::integration::ws::serve(listener, hub.clone(), Default::default()));
    addr
}

/// Runs the scenario against `addrs` (clients spread round robin); prints one line.
async fn scenario(label: &str, addrs: &[SocketAddr], writers: usize, watchers: usize, ops: u64) {
    let clients: Vec<Client> = (0..writers + watchers)
        .map(|i| Client::builder(format!("ws://{}/", addrs[i % addrs.len()])).connect().unwrap())
        .collect();
    let mut handles = Vec::new();
    for c in &clients {
        handles.push(Arc::new(Synced::join(c, ROOM, JsonDoc).await.unwrap()));
    }
    // When each (writer, seq) was applied, and how many watchers have it.
    type Sent = HashMap<(usize, u64), (Instant, usize)>;
    let sent: Arc<Mutex<Sent>> = Arc::default();
    let hist = Arc::new(Mutex::new(Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap()));
    let mut watch_tasks = Vec::new();
    for h in &handles[writers..] {
        let (h, sent, hist) = (Arc::clone(h), sent.clone(), hist.clone());
        watch_tasks.push(tokio::spawn(async move {
            let mut rx = h.watch();
            let mut seen = vec![0u64; writers];
            loop {
                if rx.changed().await.is_err() {
                    return;
                }
                let state = h.confirmed().0;
                let now = Instant::now();
                let mut done = 0;
                for (w, last) in seen.iter_mut().enumerate() {
                    let top = state[format!("w{w}")].as_u64().unwrap_or(0);
                    let mut sent = sent.lock().unwrap();
                    for seq in *last + 1..=top {
                        if let Some(e) = sent.get_mut(&(w, seq)) {
                            e.1 += 1;
                            if e.1 == watchers {
                                let us = now.duration_since(e.0).as_micros() as u64;
                                hist.lock().unwrap().record(us.max(1)).unwrap();
                                sent.remove(&(w, seq));
                            }
                        }
                    }
                    *last = top;
                    done += usize::from(top == ops);
                }
                if done == writers {
                    return;
                }
            }
        }));
    }
    let start = Instant::now();
    let mut write_tasks = Vec::new();
    for (w, h) in handles[..writers].iter().cloned().enumerate() {
        let sent = sent.clone();
        write_tasks.push(tokio::spawn(async move {
            for seq in 1..=ops {
                sent.lock().unwrap().insert((w, seq), (Instant::now(), 0));
                h.apply(JsonOp::Set { path: vec![format!("w{w}").into()], value: json!(seq) }).unwrap();
                h.settled().await;
            }
        }));
    }
    for t in write_tasks {
        t.await.unwrap();
    }
    let writes_done = start.elapsed();
    for t in watch_tasks {
        tokio::time::timeout(Duration::from_secs(60), t).await.expect("watchers caught up").unwrap();
    }
    let total = writers as u64 * ops;
    let h = hist.lock().unwrap().clone();
    println!(
        "{label}: {writers} writers, {watchers} watchers, {total} ops in {:.2} s = {:.0} ops/s; op -> every watcher's confirmed state: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        writes_done.as_secs_f64(),
        total as f64 / writes_done.as_secs_f64(),
        h.value_at_quantile(0.5) as f64 / 1000.0,
        h.value_at_quantile(0.99) as f64 / 1000.0,
        h.max() as f64 / 1000.0,
    );
    for c in &clients {
        c.close().await;
    }
}

/// A private redis-server on a free port, killed on drop.
struct Redis(std::process::Child, u16);

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_redis() -> Option<Redis> {
    let port = std::net::TcpListener::bind("127.0.0.1:0").ok()?.local_addr().ok()?.port();
    let child = std::process::Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .ok()?;
    let redis = Redis(child, port);
    for _ in 0..200 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Some(redis);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

fn main() {
    let args: Vec<u64> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let writers = args.first().copied().unwrap_or(4) as usize;
    let watchers = args.get(1).copied().unwrap_or(8) as usize;
    let ops = args.get(2).copied().unwrap_or(500);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let one = hub(switchboard::sync::MemorySnapshots::new(), None);
        let addr = serve(&one).await;
        scenario("one node (memory store)", &[addr], writers, watchers, ops).await;

        let Some(redis) = start_redis() else {
            println!("two nodes over Redis: skipped (no redis-server on PATH)");
            return;
        };
        use switchboard::redis::{RedisBackplane, RedisConfig, RedisSnapshots};
        let config = RedisConfig::new(format!("redis://127.0.0.1:{}/", redis.1));
        let mut addrs = Vec::new();
        let mut hubs = Vec::new();
        for _ in 0..2 {
            let store = RedisSnapshots::connect(config.clone()).await.unwrap();
            let bp = RedisBackplane::connect(config.clone()).await.unwrap();
            let h = hub(store, Some(bp));
            addrs.push(serve(&h).await);
            hubs.push(h);
        }
        scenario("two nodes over Redis", &addrs, writers, watchers, ops).await;
        drop(redis);
    });
}
