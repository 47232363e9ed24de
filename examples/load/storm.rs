//! `load storm` (issue 18): a reconnect storm, measured.
//!
//! `--clients N` Rust clients (`switchboard::client`, the real reconnect
//! policy: full-jitter backoff, the server's retry hint, rejoin with the last
//! offset) join `--rooms R` recoverable rooms that get `--rate` events a
//! second each. Then every connection is cut at once:
//!
//! - `restart`: the server's runtime is dropped (every socket closes with no
//!   close frame, as a killed process) and a new hub listens on the same
//!   port with the same history store (`MemoryHistory`, standing in for a
//!   persistent store);
//! - `sockets`: the server stays up and closes every connection at once
//!   (`Hub::disconnect` with 4002, through the admin API) while the events
//!   keep coming.
//!
//! Measured: the time until every client is reconnected, rejoined
//! (`recovered: true`) and has every event published before the cut; the
//! connects refused (503/429 or 1013) and retried; the server's peak CPU
//! (its runtime threads, `sb-server*`, from `/proc/self/task`), the process's
//! peak RSS (clients included: one process) and the server runtime's peak
//! task count; events lost and duplicated (both must be 0: the history
//! window is larger than the run). `--hint off` turns the server's jittered
//! retry hint off (`SecurityConfig::spread_retry_hint(false)`: the floor
//! only) for the comparison. The server keeps its default admission (10,000
//! connections, 1,000 new connections a second with a burst of 2,000)
//! unless `--conn-rate N` sets the hub's connection rate to N new
//! connections a second, with a burst of `--conn-burst B` (default N): a
//! storm against a low rate, where most reconnects are shed with 429 and
//! come back when their hint says.
//!
//! Exits 1 when an event was lost or duplicated, or the storm did not settle
//! within `--timeout` seconds.

use super::{procfs, Args};
use serde::Deserialize;
use serde_json::json;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use switchboard::client::{Client, ClientConfig, Disconnect, RoomEvent, Status};
use switchboard::history::{HistoryConfig, MemoryHistory, RoomHistory};
use switchboard::protocol::CloseCode;
use switchboard::security::{RateLimit, SecurityConfig};
use switchboard::Hub;

/// One incarnation of the server: its own runtime, so dropping it drops
/// every socket at once.
struct Server {
    rt: tokio::runtime::Runtime,
    hub: Hub,
}

struct Shared {
    rooms: Vec<String>,
    /// Events published per room (the next `n`).
    published: Vec<AtomicU64>,
    /// Per client: the next `n` it expects (0: nothing seen yet), its
    /// rejoins, and its `recovered: false` rejoins.
    next: Vec<AtomicU64>,
    rejoins: Vec<AtomicU64>,
    lost: AtomicU64,
    duplicated: AtomicU64,
    not_recovered: AtomicU64,
    gaps: AtomicU64,
    refused: AtomicU64,
    retries: AtomicU64,
    paused: AtomicBool,
    /// When each `recovered: false` rejoin came.
    not_recovered_at: Mutex<Vec<Instant>>,
}

#[derive(Deserialize)]
struct Tick {
    n: u64,
}

/// The server's admission and traffic settings.
#[derive(Clone, Copy)]
struct Settings {
    /// Spread the retry hint (`--hint`).
    spread: bool,
    /// Events a second per room (`--rate`).
    rate: u32,
    /// New connections a second and burst (`--conn-rate`, `--conn-burst`);
    /// `None`: the hub's default.
    admit: Option<(u32, u32)>,
}

fn start_server(addr: SocketAddr, history: &MemoryHistory, settings: Settings, shared: &Arc<Shared>) -> Server {
    let Settings { spread, rate, admit } = settings;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("sb-server")
        .enable_all()
        .build()
        .expect("server runtime");
    let _guard = rt.enter();
    let mut security = SecurityConfig::default().spread_retry_hint(spread);
    if let Some((per_second, burst)) = admit {
        security = security.connection_rate(Some(RateLimit::per_second(per_second).burst(burst)));
    }
    let hub = Hub::builder()
        .security(security)
        .history(history.clone(), HistoryConfig::default().rooms("storm:", RoomHistory::default().max_len(1_000_000)))
        .build();
    let listener = loop {
        match std::net::TcpListener::bind(addr) {
            Ok(l) => break l,
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    listener.set_nonblocking(true).expect("nonblocking");
    let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
    rt.spawn(switchboard::integration::ws::serve(listener, hub.clone(), Default::default()));
    // The live traffic: every room gets `rate` events a second.
    let (hub2, shared) = (hub.clone(), shared.clone());
    rt.spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1) / rate.max(1));
        loop {
            tick.tick().await;
            if shared.paused.load(Ordering::Acquire) {
                continue;
            }
            for (i, room) in shared.rooms.iter().enumerate() {
                let n = shared.published[i].load(Ordering::Acquire);
                if hub2.publish(room, "tick", &json!({ "n": n })).await.is_ok() {
                    shared.published[i].store(n + 1, Ordering::Release);
                }
            }
        }
    });
    Server { rt, hub }
}

/// CPU seconds of this process's threads named `sb-server*` (the server's runtime).
fn server_cpu() -> f64 {
    let tick = 100.0; // USER_HZ
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else { return 0.0 };
    let mut total = 0.0;
    for t in dir.flatten() {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if !comm.starts_with("sb-server") {
            continue;
        }
        let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
        // Fields after the `(comm)`: utime and stime are the 12th and 13th.
        let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
            + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
        total += ticks / tick;
    }
    total
}

/// Peaks sampled every 250 ms while `on`.
#[derive(Default, Clone, Copy)]
struct Peaks {
    cpu_pct: f64,
    rss_kib: u64,
    tasks: usize,
}

fn client_task(client: Client, i: usize, shared: Arc<Shared>) {
    let room_name = shared.rooms[i % shared.rooms.len()].clone();
    let mut status = client.status();
    let sh = shared.clone();
    tokio::spawn(async move {
        while status.changed().await.is_ok() {
            let s = status.borrow_and_update().clone();
            if let Status::Reconnecting { reason, .. } = s {
                sh.retries.fetch_add(1, Ordering::Relaxed);
                let shed = match &reason {
                    Disconnect::Refused { status, .. } => *status == 503 || *status == 429,
                    Disconnect::Closed { code, .. } => *code == CloseCode::TRY_AGAIN_LATER,
                    _ => false,
                };
                if shed {
                    sh.refused.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    });
    tokio::spawn(async move {
        let room = loop {
            match client.join(&room_name).await {
                Ok(r) => break r,
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        };
        while let Some(ev) = room.recv().await {
            match ev {
                RoomEvent::Event(e) => {
                    let Ok(Tick { n }) = e.decode::<Tick>() else { continue };
                    // `next` 0: nothing seen yet (the client joined mid-stream).
                    let next = shared.next[i].load(Ordering::Relaxed);
                    if next != 0 && n < next {
                        shared.duplicated.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    if next != 0 && n > next {
                        shared.lost.fetch_add(n - next, Ordering::Relaxed);
                    }
                    shared.next[i].store(n + 1, Ordering::Release);
                }
                RoomEvent::Rejoined { recovered } => {
                    if !recovered {
                        shared.not_recovered.fetch_add(1, Ordering::Relaxed);
                        shared.not_recovered_at.lock().unwrap().push(Instant::now());
                    }
                    shared.rejoins[i].fetch_add(1, Ordering::Release);
                }
                RoomEvent::Gap(_) => {
                    shared.gaps.fetch_add(1, Ordering::Relaxed);
                }
                _ => {}
            }
        }
        drop(client);
    });
}

pub async fn cmd(args: &Args) -> Result<ExitCode, String> {
    let n: usize = args.or("clients", 1000)?;
    let rooms: usize = args.or("rooms", (n / 50).max(1))?;
    let rate: u32 = args.or("rate", 2)?;
    let spread = args.or("hint", "on".to_string())? != "off";
    let cuts: Vec<String> = args.or("cut", "restart,sockets".to_string())?.split(',').map(str::to_owned).collect();
    let timeout = Duration::from_secs(args.or("timeout", 180)?);
    let admit = match args.or("conn-rate", 0u32)? {
        0 => None,
        per_second => Some((per_second, args.or("conn-burst", per_second)?.max(1))),
    };
    let settings = Settings { spread, rate, admit };
    let want = (n as u64) * 2 + 1024;
    let got = procfs::raise_nofile(want);
    if got < want {
        return Err(format!("open files limit {got} < {want} needed for {n} clients"));
    }
    let shared = Arc::new(Shared {
        rooms: (0..rooms).map(|r| format!("storm:{r}")).collect(),
        published: (0..rooms).map(|_| AtomicU64::new(1)).collect(),
        next: (0..n).map(|_| AtomicU64::new(0)).collect(),
        rejoins: (0..n).map(|_| AtomicU64::new(0)).collect(),
        lost: AtomicU64::new(0),
        duplicated: AtomicU64::new(0),
        not_recovered: AtomicU64::new(0),
        gaps: AtomicU64::new(0),
        refused: AtomicU64::new(0),
        retries: AtomicU64::new(0),
        paused: AtomicBool::new(false),
        not_recovered_at: Mutex::default(),
    });
    let history = MemoryHistory::new();
    let addr = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map_err(|e| e.to_string())?;
    let server = Arc::new(Mutex::new(Some(start_server(addr, &history, settings, &shared))));
    println!(
        "storm: {n} clients in {rooms} rooms, {rate} events/s per room, retry hint {}, connection rate {}, \
         cuts {cuts:?}; client and server in one process on a shared {}-core machine",
        if spread { "on" } else { "off" },
        admit.map_or("default (1000/s, burst 2000)".to_string(), |(r, b)| format!("{r}/s, burst {b}")),
        std::thread::available_parallelism().map_or(0, |p| p.get())
    );

    // Peaks, sampled.
    let peaks = Arc::new(Mutex::new(Peaks::default()));
    let sampling = Arc::new(AtomicBool::new(true));
    {
        let (peaks, sampling, server) = (peaks.clone(), sampling.clone(), server.clone());
        tokio::spawn(async move {
            let (mut last_cpu, mut last_at) = (server_cpu(), Instant::now());
            while sampling.load(Ordering::Acquire) {
                tokio::time::sleep(Duration::from_millis(250)).await;
                let (cpu, at) = (server_cpu(), Instant::now());
                let pct = (cpu - last_cpu).max(0.0) / at.duration_since(last_at).as_secs_f64() * 100.0;
                (last_cpu, last_at) = (cpu, at);
                let rss = procfs::rss_kib(std::process::id()).unwrap_or(0);
                let tasks = server.lock().unwrap().as_ref().map_or(0, |s| s.rt.metrics().num_alive_tasks());
                let mut p = peaks.lock().unwrap();
                p.cpu_pct = p.cpu_pct.max(pct);
                p.rss_kib = p.rss_kib.max(rss);
                p.tasks = p.tasks.max(tasks);
            }
        });
    }

    let url = format!("ws://{addr}/");
    let started = Instant::now();
    for i in 0..n {
        let client =
            Client::builder(url.clone()).config(ClientConfig::default()).connect().map_err(|e| e.to_string())?;
        client_task(client, i, shared.clone());
        if i % 500 == 499 {
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    // Everyone joined and receiving.
    let ready = |sh: &Shared| sh.next.iter().filter(|x| x.load(Ordering::Acquire) > 0).count();
    while ready(&shared) < n {
        if started.elapsed() > timeout {
            return Err(format!("only {} of {n} clients receiving after {timeout:?}", ready(&shared)));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("ready: {n} clients joined and receiving after {:.1} s", started.elapsed().as_secs_f64());
    tokio::time::sleep(Duration::from_secs(3)).await;
    let steady = *peaks.lock().unwrap();
    let steady_rss = procfs::rss_kib(std::process::id()).unwrap_or(0);
    let mut ok = true;

    for cut in &cuts {
        let (refused0, retries0) = (shared.refused.load(Ordering::Acquire), shared.retries.load(Ordering::Acquire));
        let rejoins0: Vec<u64> = shared.rejoins.iter().map(|r| r.load(Ordering::Acquire)).collect();
        *peaks.lock().unwrap() = Peaks::default();
        let t0 = match cut.as_str() {
            "restart" => {
                shared.paused.store(true, Ordering::Release);
                tokio::time::sleep(Duration::from_millis(200)).await;
                let old = server.lock().unwrap().take();
                let t0 = Instant::now();
                if let Some(old) = old {
                    old.rt.shutdown_background();
                }
                let new = start_server(addr, &history, settings, &shared);
                *server.lock().unwrap() = Some(new);
                shared.paused.store(false, Ordering::Release);
                t0
            }
            "sockets" => {
                let hub = server.lock().unwrap().as_ref().map(|s| s.hub.clone()).ok_or("no server")?;
                let t0 = Instant::now();
                for c in hub.connections() {
                    hub.disconnect(c.id, CloseCode::RECONNECT, "storm: every connection cut");
                }
                t0
            }
            other => return Err(format!("unknown --cut {other} (restart, sockets)")),
        };
        let at_cut: Vec<u64> = shared.published.iter().map(|p| p.load(Ordering::Acquire)).collect();
        // Done: every client rejoined since the cut and has every event
        // published before it.
        let done = |sh: &Shared| {
            (0..n)
                .filter(|&i| {
                    sh.rejoins[i].load(Ordering::Acquire) > rejoins0[i]
                        && sh.next[i].load(Ordering::Acquire) >= at_cut[i % sh.rooms.len()]
                })
                .count()
        };
        let mut last_print = Instant::now();
        loop {
            let d = done(&shared);
            if d == n {
                break;
            }
            if t0.elapsed() > timeout {
                println!("{cut}: only {d} of {n} clients recovered after {timeout:?}");
                ok = false;
                break;
            }
            if last_print.elapsed() > Duration::from_secs(5) {
                println!("  {cut}: {d} of {n} recovered after {:.1} s", t0.elapsed().as_secs_f64());
                last_print = Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let took = t0.elapsed();
        tokio::time::sleep(Duration::from_secs(2)).await;
        let late: Vec<f64> = shared
            .not_recovered_at
            .lock()
            .unwrap()
            .iter()
            .filter(|at| **at >= t0)
            .map(|at| at.duration_since(t0).as_secs_f64())
            .collect();
        if let (Some(first), Some(last)) =
            (late.iter().copied().reduce(f64::min), late.iter().copied().reduce(f64::max))
        {
            println!("  {cut}: {} rejoins not recovered, {first:.1} s to {last:.1} s after the cut", late.len());
        }
        let p = *peaks.lock().unwrap();
        println!(
            "{cut}: all {n} reconnected, rejoined and recovered in {:.2} s; shed {} connects, {} retries; \
             server peak CPU {:.0} % of a core, process peak RSS {:.0} MiB (steady {:.0} MiB), server peak tasks {} \
             (steady {}); lost {}, duplicated {}, rejoins not recovered {}, gaps {}",
            took.as_secs_f64(),
            shared.refused.load(Ordering::Acquire) - refused0,
            shared.retries.load(Ordering::Acquire) - retries0,
            p.cpu_pct,
            p.rss_kib as f64 / 1024.0,
            steady_rss as f64 / 1024.0,
            p.tasks,
            steady.tasks,
            shared.lost.load(Ordering::Acquire),
            shared.duplicated.load(Ordering::Acquire),
            shared.not_recovered.load(Ordering::Acquire),
            shared.gaps.load(Ordering::Acquire),
        );
    }
    sampling.store(false, Ordering::Release);
    let lost = shared.lost.load(Ordering::Acquire);
    let dup = shared.duplicated.load(Ordering::Acquire);
    if let Some(s) = server.lock().unwrap().take() {
        s.rt.shutdown_background();
    }
    if lost > 0 || dup > 0 || !ok {
        println!("storm FAILED: lost {lost}, duplicated {dup}, settled {ok}");
        return Ok(ExitCode::FAILURE);
    }
    println!("storm passed: lost 0, duplicated 0");
    Ok(ExitCode::SUCCESS)
}
