//! `load attack --mode M`: the attacks of issue 24, as bounded scripts
//! against the shipped chat example (`examples/chat`, built next to this
//! binary: `cargo build --release --example chat --example load`), with a
//! bystander measuring its round trips and the server's memory and CPU read
//! from `/proc`. Every mode stops by itself (counts and seconds are
//! bounded), sends only to loopback, checks the documented bounds at the
//! end and exits 1 when one is broken. `docs/security.md` §7 has the table.
//!
//! Modes (item of the issue):
//!
//! - `tabs` (1): one user opens `--tabs` tabs (default 960, over 16 source
//!   addresses) with `--meta`-byte metas (990) in one room; then
//!   `--joiners` (16) newcomers join it, then `--burst` (300) tabs set a
//!   flag at once (over `max_pending`: a full-state broadcast). Bounds: no
//!   joiner, tab or member closed; every state at most 256 KiB.
//! - `history` (2): `--conns` (20) × `--rooms` (128) rooms × `--rate` (49)
//!   messages/s of 2,000 four-byte characters for `--seconds` (40). Bound:
//!   the server grows by at most twice the 128 MiB history budget (event
//!   bytes are counted; the allocator keeps freed blocks) + 64 MiB.
//! - `churn` (4): `--workers` (32) join and leave ever new rooms for
//!   `--seconds` (30), reconnecting when their join burst is spent; a
//!   prober (10 connections, a chat message every 25 ms each, staggered)
//!   runs for 5 s before the churn and again `--settle` (5) s after it.
//!   Bounds: growth at most 2 × 128 MiB + 64 MiB, and at most 1 KiB per
//!   churned room (the store accounts 256 bytes and the name); the
//!   bystander's p99 in the churn's last third at most 4 × the
//!   first third's, and the prober's slowest call per second (median) after
//!   the churn at most 4 × before (each baseline floored at 10 ms): a store
//!   that walks every room under one lock stalls longer the more rooms it
//!   holds.
//!   `--chat PATH` runs another build of the chat example (an older one).
//! - `fanout` (5): `--members` (90) users with 990-byte metas in one room;
//!   `--cyclers` (4) connections join and leave it as fast as they may and
//!   one member toggles `typing` for `--seconds` (15). Reports bytes out per
//!   byte in. Bounds: each cycler at most 5 joins/s after its burst; a
//!   toggle costs each member at most 300 bytes.
//! - `pings` / `fragments` (6): `--conns` (16) connections send WebSocket
//!   pings, or empty continuation frames, as fast as they can for
//!   `--seconds` (10). Bound: every attacker closed (1008 or 1009).
//! - `heads` (3): `--heads` (1500) connections send half a request head
//!   and stop. Bound: all closed within 10 s + 5 s; growth at most 32 KiB
//!   per head.
//!
//! Every mode: the bystander (in `lobby`, its own address) sends a chat
//! message every 50 ms and times the reply; its p99 must stay under
//! `--max-p99-ms` (default 250, generous for a loaded 2-core machine).

use super::{client, procfs, Args};
use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::{ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio_tungstenite::tungstenite::Message;

type Ws = tokio_tungstenite::WebSocketStream<TcpStream>;

/// Attackers' source addresses: 127.0.0.2 ..= 127.0.0.17.
fn source(i: usize) -> Option<IpAddr> {
    Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + (i % 16) as u8)))
}

/// The chat example as a child process, killed when dropped.
struct Chat {
    _child: Child,
    pid: u32,
    addr: SocketAddr,
}

impl Chat {
    /// Starts `--chat PATH`, by default the `chat` next to this binary.
    async fn spawn(args: &Args) -> Result<Chat, String> {
        let exe = match args.get::<std::path::PathBuf>("chat")? {
            Some(path) => path,
            None => std::env::current_exe().map_err(|e| e.to_string())?.with_file_name("chat"),
        };
        if !exe.exists() {
            return Err(format!("{} is missing: cargo build --release --example chat", exe.display()));
        }
        let mut child = Command::new(exe)
            .args(["--addr", "127.0.0.1:0"])
            // Its warnings (one per evicted history room) are expected.
            .env("RUST_LOG", "error")
            .stdout(Stdio::piped())
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| e.to_string())?;
        let pid = child.id().ok_or("the chat server exited at once")?;
        let mut lines = BufReader::new(child.stdout.take().ok_or("no stdout")?).lines();
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .map_err(|_| "the chat server did not start")?
            .map_err(|e| e.to_string())?
            .ok_or("the chat server exited")?;
        let addr = line
            .split("http://")
            .nth(1)
            .and_then(|a| a.trim_end_matches('/').parse().ok())
            .ok_or_else(|| format!("unexpected line from the chat server: {line}"))?;
        Ok(Chat { _child: child, pid, addr })
    }

    fn rss_mib(&self) -> f64 {
        procfs::rss_kib(self.pid).unwrap_or(0) as f64 / 1024.0
    }

    fn peak_mib(&self) -> f64 {
        procfs::hwm_kib(self.pid).unwrap_or(0) as f64 / 1024.0
    }

    fn cpu(&self) -> f64 {
        procfs::cpu_seconds(self.pid).unwrap_or(f64::NAN)
    }
}

/// A chat connection: joined as `name`, JSON envelopes.
async fn open(addr: SocketAddr, from: Option<IpAddr>, name: &str) -> io::Result<Ws> {
    let stream = client::tcp(addr, from).await?;
    let url = format!("ws://{addr}/ws?name={name}");
    let (mut ws, _) = tokio_tungstenite::client_async(url, stream).await.map_err(io::Error::other)?;
    match ws.next().await {
        Some(Ok(Message::Text(t))) if t.contains("\"hello\"") => Ok(ws),
        other => Err(io::Error::other(format!("no hello: {other:?}"))),
    }
}

async fn send(tx: &mut SplitSink<Ws, Message>, v: Value) -> io::Result<()> {
    tx.send(Message::text(v.to_string())).await.map_err(io::Error::other)
}

/// Reads `ws` until the reply to `r`; `None` if it closed first.
async fn reply(ws: &mut Ws, r: u64) -> Option<Value> {
    while let Some(Ok(m)) = ws.next().await {
        if let Message::Text(t) = m {
            let v: Value = serde_json::from_str(&t).ok()?;
            if v["ref"] == r && (v["type"] == "reply" || v["type"] == "error") {
                return Some(v);
            }
        }
    }
    None
}

async fn join(ws: &mut Ws, room: &str, r: u64) -> io::Result<()> {
    ws.send(Message::text(json!({"type": "join", "ref": r, "room": room}).to_string()))
        .await
        .map_err(io::Error::other)?;
    match reply(ws, r).await {
        Some(v) if v["type"] == "reply" => Ok(()),
        other => Err(io::Error::other(format!("join {room}: {other:?}"))),
    }
}

/// What a drained connection saw: bytes, and the close code if it closed.
#[derive(Default)]
struct Seen {
    bytes: AtomicU64,
    close: AtomicU64,
    states: AtomicU64,
    biggest_state: AtomicU64,
}

/// Reads everything `rx` gets until it ends, into `seen`.
fn drain(mut rx: SplitStream<Ws>, seen: Arc<Seen>) {
    tokio::spawn(async move {
        while let Some(m) = rx.next().await {
            match m {
                Ok(Message::Text(t)) => {
                    seen.bytes.fetch_add(t.len() as u64, Ordering::Relaxed);
                    if t.starts_with("{\"type\":\"presence_state\"") {
                        seen.states.fetch_add(1, Ordering::Relaxed);
                        seen.biggest_state.fetch_max(t.len() as u64, Ordering::Relaxed);
                    }
                }
                Ok(Message::Close(f)) => {
                    seen.close.store(f.map_or(1005, |f| u16::from(f.code) as u64), Ordering::Relaxed);
                    return;
                }
                Ok(_) => {}
                Err(_) => {
                    seen.close.compare_exchange(0, 1006, Ordering::Relaxed, Ordering::Relaxed).ok();
                    return;
                }
            }
        }
    });
}

/// The bystander: a chat message in `lobby` every 50 ms, each reply timed.
/// It runs on a thread and runtime of its own, so that the attackers'
/// tasks in this process cannot delay it: its latency is the server's.
struct Bystander {
    stop: Arc<AtomicBool>,
    /// Every round trip so far: when it started, and its length in ms.
    rtts: Arc<parking_lot::Mutex<Vec<(Instant, f64)>>>,
    thread: std::thread::JoinHandle<bool>,
}

impl Bystander {
    async fn start(addr: SocketAddr) -> Result<Bystander, String> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let rtts = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let samples = rtts.clone();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            rt.block_on(async move {
                let mut ws = match open(addr, None, "bystander").await {
                    Ok(ws) => ws,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.to_string()));
                        return true;
                    }
                };
                if let Err(e) = join(&mut ws, "lobby", 1).await {
                    let _ = ready_tx.send(Err(e.to_string()));
                    return true;
                }
                let _ = ready_tx.send(Ok(()));
                let mut tick = tokio::time::interval(Duration::from_millis(50));
                for r in 2u64.. {
                    tick.tick().await;
                    if flag.load(Ordering::Relaxed) {
                        break;
                    }
                    let t0 = Instant::now();
                    let msg =
                        json!({"type": "call", "ref": r, "room": "lobby", "event": "message", "data": {"text": "hi"}});
                    if ws.send(Message::text(msg.to_string())).await.is_err() {
                        return true;
                    }
                    match tokio::time::timeout(Duration::from_secs(10), reply(&mut ws, r)).await {
                        Ok(Some(v)) if v["type"] == "reply" => {
                            samples.lock().push((t0, t0.elapsed().as_secs_f64() * 1000.0))
                        }
                        _ => return true,
                    }
                }
                false
            })
        });
        ready_rx.await.map_err(|_| "the bystander did not start".to_owned())??;
        Ok(Bystander { stop, rtts, thread })
    }

    /// The round trips (ms) that started within `from..to`.
    fn between(&self, from: Instant, to: Instant) -> Vec<f64> {
        self.rtts.lock().iter().filter(|(t, _)| (from..to).contains(t)).map(|&(_, ms)| ms).collect()
    }

    /// Stops it: (p50, p99, max) in ms, and whether it lost its connection.
    async fn finish(self) -> ((f64, f64, f64), bool) {
        self.stop.store(true, Ordering::Relaxed);
        let thread = self.thread;
        let lost = tokio::task::spawn_blocking(move || thread.join().unwrap_or(true)).await.unwrap_or(true);
        let mut rtts: Vec<f64> = self.rtts.lock().iter().map(|&(_, ms)| ms).collect();
        rtts.sort_by(f64::total_cmp);
        ((quantile(&rtts, 0.5), quantile(&rtts, 0.99), rtts.last().copied().unwrap_or(f64::NAN)), lost)
    }
}

/// The `p` quantile of `sorted` (NaN when empty).
fn quantile(sorted: &[f64], p: f64) -> f64 {
    sorted.get(((sorted.len() as f64 - 1.0) * p).round() as usize).copied().unwrap_or(f64::NAN)
}

/// The `p` quantile of `v`, sorted first.
fn quantile_of(mut v: Vec<f64>, p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    quantile(&v, p)
}

/// The bounds a mode checks; each failed one is printed.
#[derive(Default)]
struct Checks(Vec<String>);

impl Checks {
    fn check(&mut self, ok: bool, what: String) {
        println!("  {} {what}", if ok { "ok  " } else { "FAIL" });
        if !ok {
            self.0.push(what);
        }
    }
}

pub async fn cmd(args: &Args) -> Result<ExitCode, String> {
    procfs::raise_nofile(65_536);
    let mode: String = args.need("mode")?;
    let chat = Chat::spawn(args).await?;
    let by = Bystander::start(chat.addr).await?;
    let (rss0, cpu0, t0) = (chat.rss_mib(), chat.cpu(), Instant::now());
    println!("attack {mode} on the chat example (pid {}, {}), RSS {rss0:.1} MiB", chat.pid, chat.addr);
    let mut checks = Checks::default();
    match mode.as_str() {
        "tabs" => tabs(args, &chat, &mut checks).await?,
        "history" => history(args, &chat, &mut checks, rss0).await?,
        "churn" => churn(args, &chat, &mut checks, rss0, &by).await?,
        "fanout" => fanout(args, &chat, &mut checks).await?,
        "pings" | "fragments" => floods(args, &chat, &mut checks, mode == "pings").await?,
        "heads" => heads(args, &chat, &mut checks).await?,
        other => return Err(format!("unknown mode `{other}`")),
    }
    let wall = t0.elapsed().as_secs_f64();
    let ((p50, p99, max), lost) = by.finish().await;
    let max_p99: f64 = args.or("max-p99-ms", 250.0)?;
    println!(
        "server: RSS {:.1} MiB now, {:.1} MiB peak; CPU {:.0} % over {wall:.1} s",
        chat.rss_mib(),
        chat.peak_mib(),
        (chat.cpu() - cpu0) / wall * 100.0
    );
    println!("bystander: p50 {p50:.2} ms, p99 {p99:.2} ms, max {max:.2} ms");
    checks.check(!lost, "the bystander kept its connection and got every reply".into());
    checks.check(p99 <= max_p99, format!("the bystander's p99 {p99:.2} ms <= {max_p99} ms"));
    Ok(if checks.0.is_empty() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// Opens `n` connections named `name(i)` in `room` (64 at a time), each
/// drained into its own [`Seen`]; returns their write halves.
async fn crowd(
    addr: SocketAddr,
    n: usize,
    room: &str,
    name: impl Fn(usize) -> String,
) -> Result<Vec<(SplitSink<Ws, Message>, Arc<Seen>)>, String> {
    let opened = futures::stream::iter((0..n).map(|i| {
        let name = name(i);
        async move {
            let mut ws = open(addr, source(i), &name).await?;
            join(&mut ws, room, 1).await?;
            let (tx, rx) = ws.split();
            let seen = Arc::new(Seen::default());
            drain(rx, seen.clone());
            Ok::<_, io::Error>((tx, seen))
        }
    }))
    .buffer_unordered(64)
    .collect::<Vec<_>>()
    .await;
    opened.into_iter().collect::<Result<_, _>>().map_err(|e| e.to_string())
}

fn closed(crowd: &[(SplitSink<Ws, Message>, Arc<Seen>)]) -> usize {
    crowd.iter().filter(|(_, s)| s.close.load(Ordering::Relaxed) != 0).count()
}

async fn tabs(args: &Args, chat: &Chat, checks: &mut Checks) -> Result<(), String> {
    let (n, meta, joiners, burst): (usize, usize, usize, usize) =
        (args.or("tabs", 960)?, args.or("meta", 990)?, args.or("joiners", 16)?, args.or("burst", 300)?);
    let mut member = crowd(chat.addr, 1, "target", |_| "member".into()).await?;
    let mut tabs = crowd(chat.addr, n, "target", |_| "tabs".into()).await?;
    let bio = "x".repeat(meta);
    for (tx, _) in &mut tabs {
        send(tx, json!({"type": "presence", "room": "target", "data": {"meta": {"bio": bio}}}))
            .await
            .map_err(|e| e.to_string())?;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    println!("{n} tabs of one user with {meta}-byte metas; RSS {:.1} MiB", chat.rss_mib());
    let newcomers = crowd(chat.addr, joiners, "target", |i| format!("newcomer{i}")).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let states: Vec<u64> = newcomers.iter().map(|(_, s)| s.biggest_state.load(Ordering::Relaxed)).collect();
    let biggest = states.iter().copied().max().unwrap_or(0);
    println!("joiners: {} of {joiners} closed; states up to {biggest} bytes", closed(&newcomers));
    checks.check(closed(&newcomers) == 0, format!("no joiner closed ({} of {joiners})", closed(&newcomers)));
    checks.check(states.iter().all(|&s| s > 0), "every joiner got a presence_state".into());
    checks.check(biggest <= 256 * 1024, format!("every state at most 256 KiB ({biggest} bytes)"));
    // The burst: one flag on `burst` tabs at once, more changes than one
    // window tracks: the whole state goes to every member.
    let t = Instant::now();
    for (tx, _) in tabs.iter_mut().take(burst) {
        send(tx, json!({"type": "presence", "room": "target", "data": {"ephemeral": {"typing": true}}}))
            .await
            .map_err(|e| e.to_string())?;
    }
    println!("burst of {burst} flag updates sent in {:.1} ms", t.elapsed().as_secs_f64() * 1000.0);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let states_after = member[0].1.states.load(Ordering::Relaxed);
    println!(
        "after the burst: {} of {n} tabs closed, member closed: {}, member states: {states_after}",
        closed(&tabs),
        closed(&member) > 0
    );
    checks.check(closed(&tabs) == 0, format!("no tab closed ({} of {n})", closed(&tabs)));
    checks.check(closed(&member) == 0, "the member was not closed".into());
    drop((member.pop(), tabs, newcomers));
    Ok(())
}

async fn history(args: &Args, chat: &Chat, checks: &mut Checks, rss0: f64) -> Result<(), String> {
    let (conns, rooms, rate, seconds): (usize, usize, u64, u64) =
        (args.or("conns", 20)?, args.or("rooms", 128)?, args.or("rate", 49)?, args.or("seconds", 40)?);
    let text = "😀".repeat(2000);
    let sent = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for c in 0..conns {
        let mut ws = open(chat.addr, source(c), &format!("flood{c}")).await.map_err(|e| e.to_string())?;
        for r in 0..rooms {
            join(&mut ws, &format!("h{c}-{r}"), r as u64 + 1).await.map_err(|e| e.to_string())?;
        }
        let (mut tx, rx) = ws.split();
        drain(rx, Arc::new(Seen::default()));
        let (text, sent) = (text.clone(), sent.clone());
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate.max(1)));
            let end = Instant::now() + Duration::from_secs(seconds);
            for i in 0u64.. {
                tick.tick().await;
                if Instant::now() >= end {
                    break;
                }
                let room = format!("h{c}-{}", i as usize % rooms);
                let m = json!({"type": "call", "room": room, "event": "message", "data": {"text": text}});
                if send(&mut tx, m).await.is_err() {
                    break;
                }
                sent.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let mut peak = 0.0f64;
    for t in 0..seconds {
        tokio::time::sleep(Duration::from_secs(1)).await;
        peak = peak.max(chat.rss_mib());
        if t % 10 == 9 {
            println!("  {:>3} s: RSS {:.1} MiB, {} messages", t + 1, chat.rss_mib(), sent.load(Ordering::Relaxed));
        }
    }
    for t in tasks {
        let _ = t.await;
    }
    let mb = sent.load(Ordering::Relaxed) as f64 * 8.0 / 1024.0;
    println!(
        "{} messages of 8 KB ({mb:.0} MiB) into {} rooms; RSS peak {peak:.1} MiB",
        sent.load(Ordering::Relaxed),
        conns * rooms
    );
    // The store's budget counts event bytes; the allocator keeps freed
    // 8 KB blocks around, so RSS plateaus near twice the budget.
    let bound = rss0 + 2.0 * 128.0 + 64.0;
    checks.check(
        peak <= bound,
        format!("RSS peak {peak:.1} MiB <= {bound:.1} MiB (start + 2 × 128 MiB budget + 64 MiB)"),
    );
    Ok(())
}

/// Round trips (ms) of chat messages in room `probe` for `seconds`, one
/// list per second: [`PROBERS`] connections, each sending every 25 ms
/// (within the default rate limit, 50/s), staggered so that a call starts
/// every 2.5 ms. A stall of the store (the old once-a-second sweep over
/// every room under one lock) delays the calls in flight, so each second's
/// slowest call shows it. On a thread and runtime of its own, as the
/// bystander.
async fn probe(addr: SocketAddr, seconds: u64) -> Result<Vec<Vec<f64>>, String> {
    const PROBERS: u64 = 10;
    const EVERY: Duration = Duration::from_millis(25);
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
        rt.block_on(async move {
            let rtts = Arc::new(parking_lot::Mutex::new(vec![Vec::new(); seconds as usize]));
            let mut conns = Vec::new();
            for i in 0..PROBERS {
                let mut ws = open(addr, None, &format!("prober{i}")).await.map_err(|e| e.to_string())?;
                join(&mut ws, "probe", 1).await.map_err(|e| e.to_string())?;
                conns.push(ws);
            }
            let start = Instant::now();
            let tasks: Vec<_> = (0..PROBERS)
                .zip(conns)
                .map(|(i, mut ws)| {
                    let rtts = rtts.clone();
                    tokio::spawn(async move {
                        let first = tokio::time::Instant::from_std(start) + EVERY * i as u32 / PROBERS as u32;
                        let mut tick = tokio::time::interval_at(first, EVERY);
                        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                        for r in 2u64.. {
                            tick.tick().await;
                            let t0 = Instant::now();
                            let second = t0.duration_since(start).as_secs() as usize;
                            if second >= seconds as usize {
                                return Ok(());
                            }
                            let msg = json!({"type": "call", "ref": r, "room": "probe", "event": "message", "data": {"text": "?"}});
                            ws.send(Message::text(msg.to_string())).await.map_err(|e| e.to_string())?;
                            match tokio::time::timeout(Duration::from_secs(10), reply(&mut ws, r)).await {
                                Ok(Some(v)) if v["type"] == "reply" => {
                                    rtts.lock()[second].push(t0.elapsed().as_secs_f64() * 1000.0)
                                }
                                other => return Err(format!("a prober got no reply: {other:?}")),
                            }
                        }
                        Ok(())
                    })
                })
                .collect();
            for t in tasks {
                t.await.map_err(|e| e.to_string())??;
            }
            let rtts = std::mem::take(&mut *rtts.lock());
            Ok(rtts)
        })
    });
    tokio::task::spawn_blocking(move || thread.join().unwrap_or_else(|_| Err("the prober panicked".into())))
        .await
        .map_err(|e| e.to_string())?
}

/// The median over the seconds of each second's slowest round trip (ms).
fn typical_stall(seconds: &[Vec<f64>]) -> f64 {
    quantile_of(seconds.iter().map(|s| s.iter().copied().fold(0.0, f64::max)).collect(), 0.5)
}

/// How much worse a latency may get while the rooms pile up: a ratio to
/// the same figure with few or no rooms, that figure floored at
/// [`CHURN_FLOOR_MS`]. Generous: on a shared 2-core machine the new store
/// measured up to 3 × (bystander, 280,000 rooms in a release build).
const CHURN_FACTOR: f64 = 4.0;
const CHURN_FLOOR_MS: f64 = 10.0;

async fn churn(args: &Args, chat: &Chat, checks: &mut Checks, rss0: f64, by: &Bystander) -> Result<(), String> {
    let (workers, seconds, settle): (usize, u64, u64) =
        (args.or("workers", 32)?, args.or("seconds", 30)?, args.or("settle", 5)?);
    let probe_s = 5;
    let before = typical_stall(&probe(chat.addr, probe_s).await?);
    let rooms = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let end = start + Duration::from_secs(seconds);
    let tasks: Vec<_> = (0..workers)
        .map(|w| {
            let (rooms, addr) = (rooms.clone(), chat.addr);
            tokio::spawn(async move {
                let mut n = 0u64;
                while Instant::now() < end {
                    let Ok(mut ws) = open(addr, source(w), &format!("churn{w}")).await else { break };
                    // A join and a leave take a token each: 75 rooms per
                    // burst of 150, then a new connection.
                    for _ in 0..75 {
                        let room = format!("c{w}-{n}");
                        n += 1;
                        if join(&mut ws, &room, 2 * n).await.is_err() {
                            break;
                        }
                        let leave = json!({"type": "leave", "ref": 2 * n + 1, "room": room});
                        if ws.send(Message::text(leave.to_string())).await.is_err()
                            || reply(&mut ws, 2 * n + 1).await.is_none()
                        {
                            break;
                        }
                        rooms.fetch_add(1, Ordering::Relaxed);
                    }
                    let _ = ws.close(None).await;
                }
            })
        })
        .collect();
    let mut peak = 0.0f64;
    while Instant::now() < end {
        tokio::time::sleep(Duration::from_secs(1)).await;
        peak = peak.max(chat.rss_mib());
    }
    for t in tasks {
        let _ = t.await;
    }
    let churned = rooms.load(Ordering::Relaxed);
    let rss_end = chat.rss_mib();
    println!("{churned} rooms joined and left by {workers} workers in {seconds} s; RSS peak {peak:.1} MiB, now {rss_end:.1} MiB");
    // The bystander while the rooms pile up: its first and last thirds.
    let third = Duration::from_secs(seconds) / 3;
    let first = quantile_of(by.between(start, start + third), 0.99);
    let last = quantile_of(by.between(end - third, end), 0.99);
    println!("bystander during the churn: p99 {first:.2} ms in the first third, {last:.2} ms in the last");
    // After it, with nothing else going on: a store that walks its rooms
    // stalls every second, for longer the more rooms it holds.
    tokio::time::sleep(Duration::from_secs(settle)).await;
    let after = typical_stall(&probe(chat.addr, probe_s).await?);
    println!(
        "prober (slowest call per second, median): {before:.2} ms before the churn, {after:.2} ms {settle} s after it"
    );
    let bound = rss0 + 128.0 + 96.0;
    checks.check(peak <= bound, format!("RSS peak {peak:.1} MiB <= {bound:.1} MiB (start + 128 MiB budget + 96 MiB)"));
    // The store accounts a joined-only room at 256 bytes and its name;
    // twice that for the allocator and the maps' spare room, rounded up.
    let per_room = (rss_end - rss0) * 1024.0 * 1024.0 / churned.max(1) as f64;
    checks.check(per_room <= 1024.0, format!("growth per churned room {per_room:.0} B <= 1,024 B"));
    let bound = CHURN_FACTOR * first.max(CHURN_FLOOR_MS);
    checks.check(
        last <= bound,
        format!(
            "the bystander's p99 in the last third {last:.2} ms <= {bound:.2} ms ({CHURN_FACTOR} x the first third's, floored at {CHURN_FLOOR_MS} ms)"
        ),
    );
    let bound = CHURN_FACTOR * before.max(CHURN_FLOOR_MS);
    checks.check(
        after <= bound,
        format!("the prober's slowest call per second after the churn {after:.2} ms <= {bound:.2} ms ({CHURN_FACTOR} x before, floored at {CHURN_FLOOR_MS} ms)"),
    );
    Ok(())
}

async fn fanout(args: &Args, chat: &Chat, checks: &mut Checks) -> Result<(), String> {
    let (members, cyclers, seconds): (usize, usize, u64) =
        (args.or("members", 90)?, args.or("cyclers", 4)?, args.or("seconds", 15)?);
    let mut crowd_ = crowd(chat.addr, members, "fan", |i| format!("member{i}")).await?;
    let bio = "x".repeat(990);
    for (tx, _) in &mut crowd_ {
        send(tx, json!({"type": "presence", "room": "fan", "data": {"meta": {"bio": bio}}}))
            .await
            .map_err(|e| e.to_string())?;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let received =
        |c: &[(SplitSink<Ws, Message>, Arc<Seen>)]| c.iter().map(|(_, s)| s.bytes.load(Ordering::Relaxed)).sum::<u64>();
    // Typing toggles by member 0, at its update rate (10/s), for 3 s.
    let before = received(&crowd_[1..]);
    let toggles = 30u64;
    for i in 0..toggles {
        let typing = if i % 2 == 0 { json!(true) } else { Value::Null };
        send(&mut crowd_[0].0, json!({"type": "presence", "room": "fan", "data": {"ephemeral": {"typing": typing}}}))
            .await
            .map_err(|e| e.to_string())?;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let per_toggle = (received(&crowd_[1..]) - before) as f64 / toggles as f64 / (members - 1) as f64;
    println!("typing toggles: {per_toggle:.0} bytes per member per toggle");
    checks.check(per_toggle <= 300.0, format!("a toggle costs each member at most 300 bytes ({per_toggle:.0})"));
    // Join/leave cycles.
    let before = received(&crowd_);
    let (bytes_in, bytes_out, joins) =
        (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let end = Instant::now() + Duration::from_secs(seconds);
    let tasks: Vec<_> = (0..cyclers)
        .map(|c| {
            let (addr, bytes_in, bytes_out, joins) = (chat.addr, bytes_in.clone(), bytes_out.clone(), joins.clone());
            tokio::spawn(async move {
                let Ok(mut ws) = open(addr, source(c), &format!("cycler{c}")).await else { return };
                for r in 1u64.. {
                    if Instant::now() >= end {
                        break;
                    }
                    let kind = if r % 2 == 1 { "join" } else { "leave" };
                    let m = json!({"type": kind, "ref": r, "room": "fan"}).to_string();
                    bytes_in.fetch_add(m.len() as u64, Ordering::Relaxed);
                    if ws.send(Message::text(m)).await.is_err() {
                        break;
                    }
                    // Count everything up to the answer.
                    let mut answered = None;
                    while let Ok(Some(Ok(msg))) = tokio::time::timeout(Duration::from_secs(2), ws.next()).await {
                        if let Message::Text(t) = msg {
                            bytes_out.fetch_add(t.len() as u64, Ordering::Relaxed);
                            let v: Value = serde_json::from_str(&t).unwrap_or_default();
                            if v["ref"] == r {
                                answered = Some(v);
                                break;
                            }
                        }
                    }
                    match answered {
                        Some(v) if v["type"] == "reply" && kind == "join" => {
                            joins.fetch_add(1, Ordering::Relaxed);
                        }
                        Some(v) if v["code"] == 420 => {
                            let wait = v["data"]["retry_after_ms"].as_u64().unwrap_or(100);
                            tokio::time::sleep(Duration::from_millis(wait)).await;
                        }
                        Some(_) => {}
                        None => break,
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        let _ = t.await;
    }
    let out = bytes_out.load(Ordering::Relaxed) + received(&crowd_) - before;
    let inn = bytes_in.load(Ordering::Relaxed).max(1);
    let joins = joins.load(Ordering::Relaxed);
    println!(
        "join/leave cycles: {joins} joins by {cyclers} cyclers in {seconds} s; {inn} bytes in, {out} bytes out ({:.0} out per byte in, {:.1} MB/s out)",
        out as f64 / inn as f64,
        out as f64 / seconds as f64 / 1e6
    );
    let allowed = cyclers as u64 * (150 + 5 * seconds);
    checks.check(joins <= allowed, format!("joins within the join rate: {joins} <= {allowed}"));
    checks.check(closed(&crowd_) == 0, "no member closed".into());
    Ok(())
}

/// A masked client frame with no payload.
fn empty_frame(first: u8) -> [u8; 6] {
    [first, 0x80, 1, 2, 3, 4]
}

async fn floods(args: &Args, chat: &Chat, checks: &mut Checks, pings: bool) -> Result<(), String> {
    let (conns, seconds): (usize, u64) = (args.or("conns", 16)?, args.or("seconds", 10)?);
    let end = Instant::now() + Duration::from_secs(seconds);
    let mut batch = Vec::new();
    if !pings {
        // A text frame without FIN (one masked byte), then empty
        // continuations, never the last.
        batch.extend_from_slice(&[0x01, 0x81, 1, 2, 3, 4, b'x' ^ 1]);
    }
    for _ in 0..1000 {
        batch.extend_from_slice(&empty_frame(if pings { 0x89 } else { 0x00 }));
    }
    let batch = Arc::new(batch);
    // Each attacker floods until it is closed, then connects again, until
    // the end: (connections, closed with 1008/1009, frames, seconds open).
    let tasks: Vec<_> = (0..conns)
        .map(|c| {
            let (addr, batch) = (chat.addr, batch.clone());
            tokio::spawn(async move {
                let (mut made, mut refused, mut frames, mut open_s) = (0u64, 0u64, 0u64, 0f64);
                let mut refused_upgrades = 0u64;
                while Instant::now() < end {
                    let Ok(ws) = open(addr, source(c), &format!("flood{c}")).await else {
                        // Refused (the hub's connection rate: 429): again soon.
                        refused_upgrades += 1;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    };
                    made += 1;
                    let started = Instant::now();
                    let mut stream = ws.into_inner();
                    let (mut rd, mut wr) = stream.split();
                    let done = AtomicBool::new(false);
                    let writer = async {
                        while Instant::now() < end
                            && !done.load(Ordering::Relaxed)
                            && wr.write_all(&batch).await.is_ok()
                        {
                            frames += 1000;
                        }
                    };
                    // The server's frames, until its close frame.
                    let reader = async {
                        let mut buf = vec![0u8; 64 * 1024];
                        let mut all = Vec::new();
                        let code = loop {
                            match tokio::time::timeout_at(end.into(), rd.read(&mut buf)).await {
                                Ok(Ok(n)) if n > 0 => all.extend_from_slice(&buf[..n]),
                                _ => break close_code(&all),
                            }
                            if let Some(code) = close_code(&all) {
                                break Some(code);
                            }
                        };
                        done.store(true, Ordering::Relaxed);
                        code
                    };
                    let ((), code) = tokio::join!(writer, reader);
                    open_s += started.elapsed().as_secs_f64();
                    refused += u64::from(matches!(code, Some(1008 | 1009)));
                }
                (made, refused, frames, open_s, refused_upgrades)
            })
        })
        .collect();
    let (mut made, mut refused, mut frames, mut open_s, mut upgrades_refused) = (0, 0, 0, 0.0, 0);
    for t in tasks {
        if let Ok((m, r, f, o, u)) = t.await {
            (made, refused, frames, open_s, upgrades_refused) =
                (made + m, refused + r, frames + f, open_s + o, upgrades_refused + u);
        }
    }
    println!(
        "{conns} attackers, {seconds} s: {made} connections ({upgrades_refused} more refused at the upgrade), {refused} closed with 1008/1009, {frames} frames written, {:.3} s open on average",
        open_s / made.max(1) as f64
    );
    // The last connection of each attacker may still be open at the end.
    checks.check(refused + conns as u64 >= made, format!("every flooding connection closed ({refused} of {made})"));
    Ok(())
}

/// The code of the first close frame in a server byte stream, if complete.
fn close_code(mut b: &[u8]) -> Option<u16> {
    while b.len() >= 2 {
        let (op, len7) = (b[0] & 0x0f, (b[1] & 0x7f) as usize);
        let (head, len) = match len7 {
            126 if b.len() >= 4 => (4, u16::from_be_bytes([b[2], b[3]]) as usize),
            127 if b.len() >= 10 => (10, u64::from_be_bytes(b[2..10].try_into().ok()?) as usize),
            126 | 127 => return None,
            n => (2, n),
        };
        if b.len() < head + len {
            return None;
        }
        if op == 0x8 && len >= 2 {
            return Some(u16::from_be_bytes([b[head], b[head + 1]]));
        }
        b = &b[head + len..];
    }
    None
}

async fn heads(args: &Args, chat: &Chat, checks: &mut Checks) -> Result<(), String> {
    let n: usize = args.or("heads", 1500)?;
    let before = chat.rss_mib();
    let mut socks = Vec::new();
    for i in 0..n {
        let Ok(mut s) = client::tcp(chat.addr, source(i)).await else { continue };
        // Half a head, with a long header line: the rest never comes.
        let half = format!("GET /ws HTTP/1.1\r\nHost: {}\r\nX-Pad: {}", chat.addr, "p".repeat(4000));
        if s.write_all(half.as_bytes()).await.is_ok() {
            socks.push(s);
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let held = chat.rss_mib() - before;
    println!(
        "{} half-open heads: +{held:.1} MiB ({:.1} KiB each)",
        socks.len(),
        held * 1024.0 / socks.len().max(1) as f64
    );
    checks.check(
        held * 1024.0 <= 32.0 * n as f64,
        format!("at most 32 KiB per head ({:.1} KiB)", held * 1024.0 / n as f64),
    );
    // All must be closed by the server within its 10 s head timeout (+5 s).
    let t = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut open = 0;
    for s in &mut socks {
        let mut b = [0u8; 256];
        loop {
            match tokio::time::timeout_at(deadline.into(), s.read(&mut b)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break,
                Ok(Ok(_)) => continue,
                Err(_) => {
                    open += 1;
                    break;
                }
            }
        }
    }
    println!("closed by the server after {:.1} s; still open: {open}", t.elapsed().as_secs_f64());
    checks.check(open == 0, format!("every half-open head closed within 15 s ({open} open)"));
    Ok(())
}
