//! `load soak --redis on` (issue 18): the soak against two hubs over one
//! Redis that is killed and restarted every few minutes.
//!
//! The tool starts its own `redis-server` on a free loopback port (no
//! persistence: `--save '' --appendonly no`; never the one on 6379) and two
//! hubs in the same process, each on its own two-thread runtime
//! (`sb-hub0*`, `sb-hub1*`) and its own port, each with a `RedisBackplane`,
//! a `RedisHistory` (every `soak:` room recoverable) and a `RedisPresence`
//! (presence TTL `--presence-ttl`, default 6 s, so stale records go
//! quickly), and an outbound queue bound of `--queue-kib` (default 256).
//! Then:
//!
//! - `--listeners L` Rust clients (default 40) stay connected, listener `i`
//!   to hub `(i / R) % 2` in room `i % R` (`--rooms R`, default 8), so every
//!   room has members on both hubs;
//! - each hub publishes `--rate` events a second to each room (default 20),
//!   so every room gets events from both hubs;
//! - `--churners C` loops (default 32), half on each hub, connect, join,
//!   read, then leave and close or drop the socket (as the in-memory soak);
//! - `--slow N` loops (default 4), half on each hub, join the room `busy`
//!   (not recoverable) that each hub floods with `--busy-rate` events of
//!   `--busy-kib` KiB a second (default 50 of 16 KiB), with an 8 KiB
//!   socket receive buffer, and read one message every 1/`--slow-read`
//!   s (default 20 a second, a sixth of the flood at the defaults) until
//!   the connection ends (at most `--slow-stall` s, default 60). With
//!   `--slow-read 0` they read nothing until their hub has dropped the
//!   connection, then what is left until the socket ends. The hub's
//!   `on_disconnect` hook counts the slow consumers it closed as such
//!   (`DisconnectReason::SlowConsumer`, close 4000, `docs/protocol.md` §7)
//!   and those it closed for another reason of its own (a heartbeat
//!   timeout would be one); the client side counts what it read at the
//!   end: a 4000 frame, another code, or the socket ending without a frame
//!   (a consumer that reads nothing: the hub cannot write its close frame
//!   into a full socket and drops it after `close_timeout`). A run with
//!   `--slow` above 0 in which no connection was closed as a slow consumer
//!   fails, and so does one with `--slow-read` above 0 in which no slow
//!   consumer read a 4000 frame; the leak checks below cover their
//!   connections;
//! - every `--redis-restart S` seconds (default 120; 0: never) the
//!   redis-server gets SIGKILL and, after `--redis-down` seconds (default
//!   1), starts again on the same port, empty.
//!
//! # What "exactly once, in order" means here
//!
//! A Redis restart loses every stream, so the rule is per listener and per
//! stretch between two notices. Every event of a recoverable room carries
//! its offset; within one stretch a listener must see consecutive offsets
//! (an offset below the expected one is **duplicated**, one above it means
//! the events in between were skipped without notice: **lost**). A stretch
//! ends with a notice: a `gap` (`epoch_changed`: the next event is offset
//! 1 of the new stream; `missed`: the next is `to + 1`), or a rejoin after
//! a reconnect with `recovered: false` (the next event starts a stretch);
//! a rejoin with `recovered: true` continues the stretch. Events each hub
//! acknowledged (`Hub::publish` returned a position) in an epoch that ended
//! before the listener got them are counted as **gapped** (announced), not
//! lost. A publish that failed (Redis down, a store timeout) is counted as
//! **refused**: the publisher was told, so it is not owed to anyone (if it
//! was stored anyway it is delivered like any other, with its offset). At
//! the end, with Redis up and publishing stopped, every listener's position
//! must be the newest acknowledged offset of its room's current epoch: an
//! acknowledged event a listener never got, without a notice, is lost.
//! Each event's payload is `{"h": hub, "n": seq}` with `n` rising per hub;
//! a listener seeing a hub's `n` go down counts a **misorder**.
//!
//! The run **fails** (exit 1) on any lost, duplicated or misordered event,
//! on a listener whose end position is behind or in another epoch, on
//! leftovers once the churn stops (on either hub: connections or rooms
//! other than the listeners', presence metas other than the listeners',
//! tasks more than 8 above the count before the churn; in Redis: presence
//! keys of anyone but the listeners, or records other than theirs, once
//! the TTL has passed), when `--slow` is above 0 and no connection was
//! closed as a slow consumer (or, reading, none got the 4000 frame), and when
//! RSS ends above the baseline by more than
//! `--rss-slack` percent plus 8 MiB, or when a run of 10 minutes or more
//! shows an RSS slope above `--max-slope`, as in the in-memory soak.

use super::soak::cycle;
use super::trend::trend;
use super::{procfs, Args};
use futures::{SinkExt, StreamExt};
use parking_lot::Mutex;
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use switchboard::client::{Client, Room, RoomEvent};
use switchboard::history::{HistoryConfig, RoomHistory};
use switchboard::hub::DisconnectReason;
use switchboard::presence::PresenceConfig;
use switchboard::redis::{RedisBackplane, RedisConfig, RedisHistory, RedisPresence};
use switchboard::{Hub, HubConfig, Identity};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

/// The key prefix of the soak's Redis (rooms are `soak:<r>`).
const PREFIX: &str = "sbsoak:";
/// The room the slow consumers join (not recoverable: no `soak:` prefix).
const BUSY: &str = "busy";

/// A private `redis-server` on a loopback port: no persistence, killed
/// (SIGKILL) and its scratch directory removed on drop.
struct RedisProcess {
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl RedisProcess {
    async fn start() -> Result<RedisProcess, String> {
        let dir = std::env::temp_dir().join(format!("sb-soak-redis-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| format!("scratch directory {}: {e}", dir.display()))?;
        // A port found free may be taken before redis binds it: retry.
        for _ in 0..5 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map_err(|e| e.to_string())?
                .port();
            let mut redis = RedisProcess { port, dir: dir.clone(), child: None };
            if redis.spawn().await? {
                return Ok(redis);
            }
        }
        Err("redis-server did not start on a free port (5 tries)".into())
    }

    /// Spawns the server on `self.port`; `Ok(true)` once it answers `PING`.
    async fn spawn(&mut self) -> Result<bool, String> {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--daemonize", "no", "--loglevel", "warning"])
            .arg("--dir")
            .arg(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .map_err(|e| {
                format!(
                    "cannot run redis-server ({e}); `load soak --redis on` starts its own: install it \
                     (Debian: `apt-get install redis-server`, or `bash .ci/install-redis.sh`)"
                )
            })?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(c) = self.child.as_mut() {
                if c.try_wait().ok().flatten().is_some() {
                    self.child = None;
                    return Ok(false);
                }
            }
            if matches!(resp(self.port, &["PING"]).await, Ok(Resp::Simple(s)) if s == "PONG") {
                return Ok(true);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.kill();
        Ok(false)
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill(); // SIGKILL
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port, empty.
    async fn restart(&mut self) -> Result<(), String> {
        self.kill();
        for _ in 0..50 {
            if self.spawn().await? {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(format!("redis-server did not restart on port {}", self.port))
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }
}

impl Drop for RedisProcess {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A RESP reply, as far as the soak's checks need.
#[derive(Debug, PartialEq)]
enum Resp {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Vec<Resp>),
}

/// Parses one reply at the start of `buf`: the reply and its length, or
/// `None` when `buf` does not hold all of it yet.
fn parse(buf: &[u8]) -> Option<(Resp, usize)> {
    let end = buf.windows(2).position(|w| w == b"\r\n")?;
    let line = std::str::from_utf8(&buf[1..end]).ok()?;
    let rest = end + 2;
    match buf.first()? {
        b'+' => Some((Resp::Simple(line.to_owned()), rest)),
        b'-' => Some((Resp::Error(line.to_owned()), rest)),
        b':' => Some((Resp::Int(line.parse().ok()?), rest)),
        b'$' => {
            let n: i64 = line.parse().ok()?;
            if n < 0 {
                return Some((Resp::Bulk(None), rest));
            }
            let n = n as usize;
            (buf.len() >= rest + n + 2).then(|| (Resp::Bulk(Some(buf[rest..rest + n].to_vec())), rest + n + 2))
        }
        b'*' => {
            let n: i64 = line.parse().ok()?;
            let mut items = Vec::new();
            let mut at = rest;
            for _ in 0..n.max(0) {
                let (item, len) = parse(&buf[at..])?;
                items.push(item);
                at += len;
            }
            Some((Resp::Array(items), at))
        }
        _ => None,
    }
}

/// One command on a fresh connection to the soak's Redis.
async fn resp(port: u16, args: &[&str]) -> Result<Resp, String> {
    let io = async {
        let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.map_err(|e| e.to_string())?;
        let mut cmd = format!("*{}\r\n", args.len());
        for a in args {
            cmd.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        conn.write_all(cmd.as_bytes()).await.map_err(|e| e.to_string())?;
        let mut buf = Vec::new();
        loop {
            if let Some((reply, _)) = parse(&buf) {
                return Ok(reply);
            }
            let mut chunk = [0u8; 4096];
            match conn.read(&mut chunk).await.map_err(|e| e.to_string())? {
                0 => return Err("redis closed the connection".to_string()),
                n => buf.extend_from_slice(&chunk[..n]),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(5), io).await.map_err(|_| "redis: no reply within 5 s".to_string())?
}

/// What Redis holds of presence: the users with a presence key index, and
/// the records (hash fields) of the soak's rooms.
async fn redis_presence(port: u16, rooms: &[String]) -> Result<(BTreeSet<String>, i64), String> {
    let key_prefix = format!("{PREFIX}presence:key:");
    let users = match resp(port, &["KEYS", &format!("{key_prefix}*")]).await? {
        Resp::Array(keys) => keys
            .into_iter()
            .filter_map(|k| match k {
                Resp::Bulk(Some(k)) => Some(String::from_utf8_lossy(&k).into_owned()),
                _ => None,
            })
            .map(|k| k[key_prefix.len()..].trim_matches(|c| c == '{' || c == '}').to_owned())
            .collect(),
        other => return Err(format!("KEYS: {other:?}")),
    };
    let mut records = 0;
    for room in rooms.iter().map(String::as_str).chain([BUSY]) {
        match resp(port, &["HLEN", &format!("{PREFIX}presence:data:{{{room}}}")]).await? {
            Resp::Int(n) => records += n,
            other => return Err(format!("HLEN: {other:?}")),
        }
    }
    Ok((users, records))
}

/// One hub on its own runtime, with the three Redis stores.
struct Node {
    /// Always `Some` until drop, which shuts it down without blocking (the
    /// tool drops it inside the generator's runtime, also on an error).
    rt: Option<tokio::runtime::Runtime>,
    hub: Hub,
    addr: SocketAddr,
    backplane: RedisBackplane,
}

async fn node(
    i: usize,
    url: &str,
    queue: usize,
    presence_ttl: Duration,
    counters: Arc<Counters>,
) -> Result<Node, String> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(format!("sb-hub{i}"))
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let config = RedisConfig::new(url).prefix(PREFIX);
    // Connected on the hub's runtime, so their tasks are the hub's.
    let (backplane, history, presence) = rt
        .spawn(async move {
            Ok::<_, switchboard::Error>((
                RedisBackplane::connect(config.clone()).await?,
                RedisHistory::connect(config.clone()).await?,
                RedisPresence::connect(config).await?,
            ))
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("hub {i}: {e}"))?;
    let _guard = rt.enter();
    let hub = Hub::builder()
        .authenticate(|hs: &switchboard::Handshake| {
            std::future::ready(Ok(hs.query("user").map(Identity::user).unwrap_or_default()))
        })
        .config(HubConfig::default().outbound_queue_bytes(queue))
        // The server's own count of why the slow consumers (users `s…`) went.
        .on_disconnect(move |conn, reason| {
            if conn.user_id().is_some_and(|u| u.starts_with('s')) {
                // A slow consumer that gave up (the churn stopped) closes
                // itself: not counted.
                match reason {
                    DisconnectReason::SlowConsumer => counters.slow_dropped.fetch_add(1, Ordering::Relaxed),
                    DisconnectReason::ClientClosed { .. } | DisconnectReason::ConnectionLost => 0,
                    _ => counters.slow_dropped_otherwise.fetch_add(1, Ordering::Relaxed),
                };
            }
        })
        .backplane(backplane.clone())
        .history(history, HistoryConfig::default().rooms("soak:", RoomHistory::default()))
        .presence(PresenceConfig::default().ttl(presence_ttl))
        .presence_store(presence)
        .build();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    let listener = tokio::net::TcpListener::from_std(listener).map_err(|e| e.to_string())?;
    rt.spawn(switchboard::integration::ws::serve(listener, hub.clone(), Default::default()));
    drop(_guard);
    Ok(Node { rt: Some(rt), hub, addr, backplane })
}

impl Node {
    fn rt(&self) -> &tokio::runtime::Runtime {
        self.rt.as_ref().expect("a node's runtime lives until drop")
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

#[derive(Default)]
struct Counters {
    cycles: AtomicU64,
    failed_cycles: AtomicU64,
    checked: AtomicU64,
    lost: AtomicU64,
    duplicated: AtomicU64,
    misordered: AtomicU64,
    /// Notices: `gap` messages (any reason) and rejoins with `recovered: false`.
    gaps: AtomicU64,
    /// Acknowledged events a listener did not get, announced by a notice.
    gapped: AtomicU64,
    rejoins: AtomicU64,
    /// Events the client's own buffer dropped (`RoomEvent::Lagged`).
    client_dropped: AtomicU64,
    published: AtomicU64,
    refused: AtomicU64,
    restarts: AtomicU64,
    slow_cycles: AtomicU64,
    /// How the slow consumers saw their connection end (see `SlowEnd`).
    slow_frame_4000: AtomicU64,
    slow_frame_other: AtomicU64,
    slow_no_frame: AtomicU64,
    slow_not_dropped: AtomicU64,
    /// Slow consumers' connections the hubs closed as slow consumers
    /// (`DisconnectReason::SlowConsumer`, close 4000), and those the hubs
    /// closed for another reason of their own (a heartbeat timeout, …).
    slow_dropped: AtomicU64,
    slow_dropped_otherwise: AtomicU64,
    /// Milliseconds from the join to the hub dropping the connection, summed.
    slow_unread_ms: AtomicU64,
    gap_reasons: Mutex<BTreeMap<String, u64>>,
    stop_churn: AtomicBool,
    stop_publish: AtomicBool,
}

/// The newest acknowledged offset of every room, per epoch, and the epoch of
/// the latest acknowledgement.
#[derive(Default)]
struct Acks {
    rooms: Mutex<HashMap<usize, RoomAcks>>,
}

#[derive(Default)]
struct RoomAcks {
    top: HashMap<Arc<str>, u64>,
    current: Option<Arc<str>>,
}

impl Acks {
    fn ack(&self, room: usize, epoch: &Arc<str>, offset: u64) {
        let mut rooms = self.rooms.lock();
        let r = rooms.entry(room).or_default();
        let top = r.top.entry(epoch.clone()).or_insert(0);
        *top = (*top).max(offset);
        r.current = Some(epoch.clone());
    }

    fn top(&self, room: usize, epoch: &str) -> u64 {
        self.rooms.lock().get(&room).and_then(|r| r.top.get(epoch).copied()).unwrap_or(0)
    }

    fn current(&self, room: usize) -> Option<(Arc<str>, u64)> {
        let rooms = self.rooms.lock();
        let r = rooms.get(&room)?;
        let e = r.current.clone()?;
        let top = r.top.get(&e).copied().unwrap_or(0);
        Some((e, top))
    }
}

/// A listener's check of one room (see the module docs).
async fn listen(room: Arc<Room>, index: usize, counters: Arc<Counters>, acks: Arc<Acks>) {
    let mut next: Option<u64> = None;
    let mut epoch: Option<String> = None;
    let mut last_n = [0u64; 2];
    while let Some(ev) = room.recv().await {
        match ev {
            RoomEvent::Event(e) => {
                let Some(o) = e.offset else {
                    counters.lost.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                match next {
                    Some(x) if o < x => {
                        counters.duplicated.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    Some(x) if o > x => {
                        counters.lost.fetch_add(o - x, Ordering::Relaxed);
                    }
                    _ => {}
                }
                next = Some(o + 1);
                epoch = room.position().map(|p| p.1);
                counters.checked.fetch_add(1, Ordering::Relaxed);
                let v: serde_json::Value = e.decode().unwrap_or_default();
                let (h, n) = (v["h"].as_u64().unwrap_or(0) as usize, v["n"].as_u64().unwrap_or(0));
                if n <= last_n[h % 2] {
                    counters.misordered.fetch_add(1, Ordering::Relaxed);
                }
                last_n[h % 2] = n;
            }
            RoomEvent::Gap(g) => {
                counters.gaps.fetch_add(1, Ordering::Relaxed);
                *counters.gap_reasons.lock().entry(g.reason.clone()).or_default() += 1;
                if g.reason == "epoch_changed" {
                    // What the old epoch still owed this listener.
                    if let (Some(e), Some(x)) = (&epoch, next) {
                        counters.gapped.fetch_add(acks.top(index, e).saturating_sub(x - 1), Ordering::Relaxed);
                    }
                    next = Some(1);
                } else {
                    if let Some(x) = next {
                        counters.lost.fetch_add(g.from.saturating_sub(x), Ordering::Relaxed);
                    }
                    counters.gapped.fetch_add(g.to + 1 - g.from.min(g.to + 1), Ordering::Relaxed);
                    next = Some(g.to + 1);
                }
            }
            RoomEvent::Rejoined { recovered } => {
                counters.rejoins.fetch_add(1, Ordering::Relaxed);
                if !recovered {
                    counters.gaps.fetch_add(1, Ordering::Relaxed);
                    next = None;
                }
            }
            RoomEvent::Lagged { dropped } => {
                counters.client_dropped.fetch_add(dropped, Ordering::Relaxed);
                next = None;
            }
            _ => {}
        }
    }
}

/// How a slow consumer's connection ended.
enum SlowEnd {
    /// Dropped by the hub; the client then read this close code.
    Closed(u16),
    /// Dropped by the hub; the client read no close frame: the hub could not
    /// write it into a full socket and dropped the socket after its close
    /// timeout (`HubConfig::close_timeout`).
    NoFrame,
    /// Not dropped by the hub within `--slow-stall`, or the churn stopped.
    NotDropped,
}

/// One slow consumer: joins the busy room with a small receive buffer, and
/// either reads one message every `read_every` (far below the flood) until
/// the connection ends (at most `stall`), or with `read_every` zero reads
/// nothing until the hub has dropped the connection (at most `stall`),
/// then reads until the connection ends: what the server sent before its
/// close frame, then the frame.
async fn slow_cycle(
    addr: SocketAddr,
    hub: &Hub,
    user: &str,
    stall: Duration,
    read_every: Duration,
    counters: &Counters,
) -> SlowEnd {
    let stop = &counters.stop_churn;
    let run = async {
        let socket = tokio::net::TcpSocket::new_v4().map_err(|e| e.to_string())?;
        socket.set_recv_buffer_size(8192).map_err(|e| e.to_string())?;
        let stream = socket.connect(addr).await.map_err(|e| e.to_string())?;
        let (mut ws, _) = tokio_tungstenite::client_async(format!("ws://{addr}/?user={user}"), stream)
            .await
            .map_err(|e| e.to_string())?;
        let join = json!({"type": "join", "room": BUSY, "ref": 1}).to_string();
        ws.send(Message::text(join)).await.map_err(|e| e.to_string())?;
        let stalled = Instant::now();
        if !read_every.is_zero() {
            // Slow but reading: the hub's close frame comes after what is
            // already in flight (`docs/protocol.md` §7.1).
            let end = async {
                while stalled.elapsed() < stall && !stop.load(Ordering::Acquire) {
                    match tokio::time::timeout(Duration::from_secs(1), ws.next()).await {
                        Err(_) => continue,
                        Ok(Some(Ok(Message::Close(frame)))) => {
                            return SlowEnd::Closed(frame.map_or(1005, |f| u16::from(f.code)))
                        }
                        Ok(Some(Ok(_))) => tokio::time::sleep(read_every).await,
                        Ok(None | Some(Err(_))) => return SlowEnd::NoFrame,
                    }
                }
                SlowEnd::NotDropped
            };
            let end = end.await;
            if !matches!(end, SlowEnd::NotDropped) {
                counters.slow_unread_ms.fetch_add(stalled.elapsed().as_millis() as u64, Ordering::Relaxed);
            }
            return Ok(end);
        }
        // Read nothing until the hub has dropped the connection (or `stall`).
        let here = || hub.connections().iter().any(|c| c.user_id.as_deref() == Some(user));
        while stalled.elapsed() < stall && !stop.load(Ordering::Acquire) && here() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if here() {
            // Stopped, or never dropped within `stall`: nothing to wait for.
            return Ok(SlowEnd::NotDropped);
        }
        counters.slow_unread_ms.fetch_add(stalled.elapsed().as_millis() as u64, Ordering::Relaxed);
        let drain = tokio::time::timeout(Duration::from_secs(20), async {
            while let Some(m) = ws.next().await {
                match m {
                    Ok(Message::Close(frame)) => return Some(frame.map_or(1005, |f| u16::from(f.code))),
                    Ok(_) => {}
                    Err(_) => return None,
                }
            }
            None
        })
        .await;
        Ok::<_, String>(match drain {
            Ok(Some(code)) => SlowEnd::Closed(code),
            _ => SlowEnd::NoFrame,
        })
    };
    run.await.unwrap_or(SlowEnd::NotDropped)
}

pub async fn cmd(args: &Args) -> Result<ExitCode, String> {
    let minutes: f64 = args.or("minutes", 1.0)?;
    let listeners: usize = args.or("listeners", 40)?;
    let rooms: usize = args.or("rooms", 8)?.max(1);
    let churners: usize = args.or("churners", 32)?;
    let slow: usize = args.or("slow", 4)?;
    let rate: u32 = args.or("rate", 20)?;
    let busy_rate: u32 = args.or("busy-rate", 50)?;
    let busy_kib: usize = args.or("busy-kib", 16)?;
    let stall = Duration::from_secs_f64(args.or("slow-stall", 60.0)?);
    let slow_read: f64 = args.or("slow-read", 20.0)?;
    let read_every = if slow_read > 0.0 { Duration::from_secs_f64(1.0 / slow_read) } else { Duration::ZERO };
    let interval = Duration::from_secs(args.or("interval", 10)?);
    let slack: f64 = args.or("rss-slack", 10.0)?;
    let max_slope: f64 = args.or("max-slope", 128.0)?;
    let restart_every = Duration::from_secs_f64(args.or("redis-restart", 120.0)?);
    let down = Duration::from_secs_f64(args.or("redis-down", 1.0)?);
    let queue = args.or("queue-kib", 256usize)? * 1024;
    let presence_ttl = Duration::from_secs_f64(args.or("presence-ttl", 6.0)?);
    if listeners < 2 * rooms {
        return Err(format!(
            "--listeners must be at least twice --rooms ({rooms}), so every room has a member on both hubs"
        ));
    }
    let total = Duration::from_secs_f64(minutes * 60.0);
    procfs::raise_nofile((listeners + churners + slow) as u64 * 2 + 1024);

    let mut redis = RedisProcess::start().await?;
    let counters = Arc::new(Counters::default());
    let nodes = [
        node(0, &redis.url(), queue, presence_ttl, counters.clone()).await?,
        node(1, &redis.url(), queue, presence_ttl, counters.clone()).await?,
    ];
    let names: Vec<String> = (0..rooms).map(|r| format!("soak:{r}")).collect();
    let acks = Arc::new(Acks::default());
    println!(
        "soak over redis: {minutes} min; two hubs in one process (each its own 2-thread runtime) on one private \
         redis-server (port {}, no persistence), SIGKILL and restart every {:?} (down {:?}); {listeners} listeners \
         in {rooms} recoverable presence rooms, {rate} events/s per room from each hub; {churners} churners; \
         {slow} slow consumers in `{BUSY}` ({busy_rate} x {busy_kib} KiB events/s from each hub, queue bound {} KiB); \
         shared {}-core machine",
        redis.port,
        restart_every,
        down,
        queue / 1024,
        std::thread::available_parallelism().map_or(0, |p| p.get())
    );

    // The publishers: one task per hub and room (a store timeout in one
    // room does not hold up the others), and one per hub for `busy`.
    let mut publishers = Vec::new();
    for (h, node) in nodes.iter().enumerate() {
        for (r, room) in names.iter().enumerate() {
            let (hub, room, counters, acks) = (node.hub.clone(), room.clone(), counters.clone(), acks.clone());
            publishers.push(node.rt().spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(1) / rate.max(1));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let mut n = 0u64;
                while !counters.stop_publish.load(Ordering::Acquire) {
                    tick.tick().await;
                    n += 1;
                    match hub.publish(&room, "tick", &json!({ "h": h, "n": n })).await {
                        Ok(p) => {
                            counters.published.fetch_add(1, Ordering::Relaxed);
                            if let Some(pos) = p.position {
                                acks.ack(r, &pos.epoch, pos.offset);
                            }
                        }
                        Err(_) => {
                            counters.refused.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }));
        }
        let (hub, counters) = (node.hub.clone(), counters.clone());
        publishers.push(node.rt().spawn(async move {
            let pad = "x".repeat(busy_kib * 1024);
            let mut tick = tokio::time::interval(Duration::from_secs(1) / busy_rate.max(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while !counters.stop_publish.load(Ordering::Acquire) {
                tick.tick().await;
                let _ = hub.publish(BUSY, "pad", &json!({ "pad": pad })).await;
            }
        }));
    }

    // The listeners.
    let mut clients = Vec::new();
    let mut handles = Vec::new();
    for i in 0..listeners {
        let (r, h) = (i % rooms, (i / rooms) % 2);
        let client =
            Client::builder(format!("ws://{}/?user=l{i}", nodes[h].addr)).connect().map_err(|e| e.to_string())?;
        let room = tokio::time::timeout(Duration::from_secs(30), client.join(&names[r]))
            .await
            .map_err(|_| "a listener's join timed out")?
            .map_err(|e| e.to_string())?;
        let room = Arc::new(room);
        tokio::spawn(listen(room.clone(), r, counters.clone(), acks.clone()));
        handles.push((r, room));
        clients.push(client);
    }
    let on_hub = |h: usize| (0..listeners).filter(|i| (i / rooms) % 2 == h).count();
    // Tasks with the listeners alone: the counts to come back to.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle_tasks: Vec<usize> = nodes.iter().map(|n| n.rt().metrics().num_alive_tasks()).collect();

    // The churners and the slow consumers, half on each hub.
    let mut churn = Vec::new();
    for c in 0..churners {
        let (counters, names, addr) = (counters.clone(), names.clone(), nodes[c % 2].addr);
        churn.push(tokio::spawn(async move {
            let mut k = 0usize;
            while !counters.stop_churn.load(Ordering::Acquire) {
                k += 1;
                let url = format!("ws://{addr}/?user=c{c}");
                match cycle(&url, &names[(c + k) % names.len()], (c + k) % 2 == 0).await {
                    Ok(()) => counters.cycles.fetch_add(1, Ordering::Relaxed),
                    Err(_) => counters.failed_cycles.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    for s in 0..slow {
        let (counters, addr, hub) = (counters.clone(), nodes[s % 2].addr, nodes[s % 2].hub.clone());
        churn.push(tokio::spawn(async move {
            while !counters.stop_churn.load(Ordering::Acquire) {
                let end = slow_cycle(addr, &hub, &format!("s{s}"), stall, read_every, &counters).await;
                counters.slow_cycles.fetch_add(1, Ordering::Relaxed);
                match end {
                    SlowEnd::Closed(4000) => counters.slow_frame_4000.fetch_add(1, Ordering::Relaxed),
                    SlowEnd::Closed(_) => counters.slow_frame_other.fetch_add(1, Ordering::Relaxed),
                    SlowEnd::NoFrame => counters.slow_no_frame.fetch_add(1, Ordering::Relaxed),
                    SlowEnd::NotDropped => counters.slow_not_dropped.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }

    // Redis killed and restarted every `restart_every`, until the churn stops.
    let restarter = {
        let counters = counters.clone();
        tokio::spawn(async move {
            let mut last = Instant::now();
            while !restart_every.is_zero() && !counters.stop_churn.load(Ordering::Acquire) {
                tokio::time::sleep(Duration::from_millis(100)).await;
                if last.elapsed() < restart_every {
                    continue;
                }
                redis.kill();
                tokio::time::sleep(down).await;
                redis.restart().await?;
                counters.restarts.fetch_add(1, Ordering::Relaxed);
                last = Instant::now();
            }
            Ok::<_, String>(redis)
        })
    };

    let pid = std::process::id();
    let sample = |started: Instant| {
        let s: Vec<_> = nodes.iter().map(|n| n.hub.stats()).collect();
        let tasks: Vec<usize> = nodes.iter().map(|n| n.rt().metrics().num_alive_tasks()).collect();
        let queued: usize = nodes.iter().flat_map(|n| n.hub.connections()).map(|c| c.queued_bytes).sum();
        let rss = procfs::rss_kib(pid).unwrap_or(0);
        let c = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let line = format!(
            "{:>6.0} s  rss {:>7} KiB  tasks {}+{}  rooms {}+{}  conns {}+{}  queued {:>7} B  cycles {} ({} failed)  \
             checked {}  lost {}  dup {}  misordered {}  gaps {} ({} events)  refused {}  slow closed {}/{}  \
             restarts {}",
            started.elapsed().as_secs_f64(),
            rss,
            tasks[0],
            tasks[1],
            s[0].rooms,
            s[1].rooms,
            s[0].connections,
            s[1].connections,
            queued,
            c(&counters.cycles),
            c(&counters.failed_cycles),
            c(&counters.checked),
            c(&counters.lost),
            c(&counters.duplicated),
            c(&counters.misordered),
            c(&counters.gaps),
            c(&counters.gapped),
            c(&counters.refused),
            c(&counters.slow_dropped),
            c(&counters.slow_cycles),
            c(&counters.restarts),
        );
        (line, rss, tasks)
    };
    let started = Instant::now();
    let mut samples = Vec::new();
    let mut baseline: Option<u64> = None;
    while started.elapsed() < total {
        tokio::time::sleep(interval.min(total.saturating_sub(started.elapsed()))).await;
        let (line, rss, _) = sample(started);
        println!("{line}");
        if started.elapsed() >= interval {
            baseline.get_or_insert(rss);
            samples.push((started.elapsed().as_secs_f64(), rss as f64));
        }
    }

    // The end: churn and restarts stop, Redis stays up; the publishers go on
    // until both hubs are connected to it again, then stop.
    counters.stop_churn.store(true, Ordering::Release);
    for c in churn {
        let _ = c.await;
    }
    let redis = restarter.await.map_err(|e| e.to_string())??;
    let reconnected = Instant::now();
    while nodes.iter().any(|n| {
        let s = n.backplane.stats();
        !(s.pubsub_connected && s.commands_connected)
    }) && reconnected.elapsed() < Duration::from_secs(60)
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    counters.stop_publish.store(true, Ordering::Release);
    for p in publishers {
        let _ = p.await;
    }
    // Every listener at its room's newest acknowledged offset (the position
    // check brings a trailing event within 10 s).
    let behind = |handles: &[(usize, Arc<Room>)]| -> Vec<String> {
        handles
            .iter()
            .enumerate()
            .filter_map(|(i, (r, room))| {
                let want = acks.current(*r);
                let have = room.position();
                match (&want, &have) {
                    (Some((e, top)), Some((offset, epoch))) if **e == **epoch && offset >= top => None,
                    (None, _) => None,
                    _ => Some(format!("listener l{i} in {}: at {have:?}, newest acknowledged {want:?}", names[*r])),
                }
            })
            .collect()
    };
    let settle = Instant::now();
    while !behind(&handles).is_empty() && settle.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let behind = behind(&handles);
    // Back to the listeners alone, on both hubs and in Redis (stale records
    // expire within the presence TTL and a third).
    let listener_users: BTreeSet<String> = (0..listeners).map(|i| format!("l{i}")).collect();
    let deadline = Instant::now() + presence_ttl * 2 + Duration::from_secs(60);
    let (metas, in_redis) = loop {
        let s: Vec<_> = nodes.iter().map(|n| n.hub.stats()).collect();
        let mut metas = [0usize; 2];
        for (h, node) in nodes.iter().enumerate() {
            for room in &names {
                metas[h] += node.hub.presence(room).await.map_or(0, |e| e.iter().map(|e| e.metas.len()).sum());
            }
        }
        let in_redis = redis_presence(redis.port, &names).await.unwrap_or_default();
        let done = (0..2).all(|h| s[h].connections == on_hub(h) && s[h].rooms == rooms && metas[h] == listeners)
            && in_redis.0 == listener_users
            && in_redis.1 == listeners as i64;
        if done || Instant::now() > deadline {
            break (metas, in_redis);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (line, rss, tasks) = sample(started);
    println!("{line}  (churn stopped)");
    for b in &behind {
        println!("behind: {b}");
    }
    let stale: Vec<&String> = in_redis.0.difference(&listener_users).collect();
    let missing: Vec<&String> = listener_users.difference(&in_redis.0).collect();
    let s: Vec<_> = nodes.iter().map(|n| n.hub.stats()).collect();
    let base_rss = baseline.unwrap_or(rss);
    let bound = base_rss as f64 * (1.0 + slack / 100.0) + 8.0 * 1024.0;
    let trend = trend(&samples, max_slope);
    let c = |a: &AtomicU64| a.load(Ordering::Acquire);
    println!(
        "end: rss {rss} KiB (baseline {base_rss} KiB, bound {bound:.0} KiB), {trend} over {} samples; \
         tasks {}+{} (listeners alone before the churn {}+{}); connections {}+{} (listeners {}+{}), rooms {}+{}, \
         presence metas {}+{} (listeners {listeners} each); in redis: presence keys of {} users ({} stale: {stale:?}, \
         {} listeners missing), {} records",
        samples.len(),
        tasks[0],
        tasks[1],
        idle_tasks[0],
        idle_tasks[1],
        s[0].connections,
        s[1].connections,
        on_hub(0),
        on_hub(1),
        s[0].rooms,
        s[1].rooms,
        metas[0],
        metas[1],
        in_redis.0.len(),
        stale.len(),
        missing.len(),
        in_redis.1,
    );
    println!(
        "totals: redis restarts {}; churn cycles {} ({} failed); published {} (acknowledged), refused {}; \
         events checked {}, lost {}, duplicated {}, misordered {}; notices {} (gaps and unrecovered rejoins), \
         acknowledged events announced as gapped {}, rejoins {}, client-side drops {}; slow consumers {} cycles, \
         the hubs closed {} as slow consumers (after {:.1} s on average) and {} for another reason of \
         theirs; the clients then read {} close frames with 4000, {} with another code and {} sockets ending \
         without a frame; {} not dropped (the churn stopped); gaps by reason {:?}",
        c(&counters.restarts),
        c(&counters.cycles),
        c(&counters.failed_cycles),
        c(&counters.published),
        c(&counters.refused),
        c(&counters.checked),
        c(&counters.lost),
        c(&counters.duplicated),
        c(&counters.misordered),
        c(&counters.gaps),
        c(&counters.gapped),
        c(&counters.rejoins),
        c(&counters.client_dropped),
        c(&counters.slow_cycles),
        c(&counters.slow_dropped),
        c(&counters.slow_unread_ms) as f64 / 1000.0 / c(&counters.slow_dropped).max(1) as f64,
        c(&counters.slow_dropped_otherwise),
        c(&counters.slow_frame_4000),
        c(&counters.slow_frame_other),
        c(&counters.slow_no_frame),
        c(&counters.slow_not_dropped),
        counters.gap_reasons.lock(),
    );
    for (h, n) in nodes.iter().enumerate() {
        let b = n.backplane.stats();
        println!(
            "hub {h} backplane: pub/sub reconnects {}, command reconnects {}, messages dropped {}, probe failures {}",
            b.pubsub_reconnects, b.command_reconnects, b.dropped, b.probe_failures
        );
    }
    let mut failures = Vec::new();
    if c(&counters.lost) + c(&counters.duplicated) + c(&counters.misordered) > 0 || !behind.is_empty() {
        failures.push("events lost, duplicated or out of order, or a listener behind at the end");
    }
    if (0..2).any(|h| s[h].connections != on_hub(h) || s[h].rooms != rooms || metas[h] != listeners) {
        failures.push("connections, rooms or presence metas left over on a hub");
    }
    if (0..2).any(|h| tasks[h] > idle_tasks[h] + 8) {
        failures.push("tasks left over on a hub");
    }
    if in_redis.0 != listener_users || in_redis.1 != listeners as i64 {
        failures.push("presence keys or records in redis other than the listeners'");
    }
    if slow > 0 && c(&counters.slow_dropped) == 0 {
        failures.push("no slow consumer was closed as one");
    }
    if slow > 0 && !read_every.is_zero() && c(&counters.slow_dropped) > 0 && c(&counters.slow_frame_4000) == 0 {
        failures.push("no slow consumer that kept reading got the 4000 close frame");
    }
    if c(&counters.checked) == 0 {
        failures.push("no event was checked");
    }
    if rss as f64 > bound {
        failures.push("RSS above the bound");
    }
    if trend.flat == Some(false) {
        failures.push("RSS trending up while the churn was steady");
    }
    for c in &clients {
        c.close().await;
    }
    drop(handles);
    drop(nodes);
    drop(redis);
    if !failures.is_empty() {
        println!("soak FAILED: {}", failures.join("; "));
        return Ok(ExitCode::FAILURE);
    }
    println!("soak passed");
    Ok(ExitCode::SUCCESS)
}
