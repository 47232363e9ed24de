//! `load soak --minutes M` (issue 18): hours of churn in minutes, checked
//! for leaks and for loss.
//!
//! One process: the server (its own two-thread runtime, `sb-server*`) with
//! presence on and every `soak:` room recoverable (`MemoryHistory`), and
//! the generator:
//!
//! - `--listeners L` Rust clients (default 40) stay connected, spread over
//!   `--rooms R` rooms (default 8), each checking that it gets every event
//!   of its room exactly once, in order;
//! - the host publishes `--rate` events a second to each room (default 20);
//! - `--churners C` loops (default 32) each repeat a cycle on a plain
//!   WebSocket: connect, join a room, read its presence and a few events,
//!   then leave and close (half of them), or drop the socket without a
//!   word (the other half).
//!
//! Every `--interval` seconds (default 10) it prints the process's RSS, the
//! server runtime's live tasks, the hub's rooms and connections, cycles
//! done, events checked, lost and duplicated. The baseline is the first
//! sample after one interval of warm-up. At the end the churn stops and
//! the tool waits for the hub to come back to the listeners alone; then
//! it **fails** (exit 1) when an event was lost or duplicated, when a
//! room, connection, presence entry or task is left over (tasks: at most
//! 8 more than with the listeners alone before the churn), or when RSS is above the baseline by
//! more than `--rss-slack` percent (default 10) plus 8 MiB: the allocator
//! keeps some freed memory, a leak grows with the cycles. It also prints
//! the RSS slope over the samples after warm-up (least squares, KiB a
//! minute). In a run of 10 minutes or more it judges the slope over the
//! samples after the first 2 minutes (while buffers and the allocator's
//! arenas reach their working size RSS still grows) and **fails** when it
//! is above `--max-slope` KiB a minute (default 128) by more than two
//! standard errors: RSS must not trend up while the churn is steady, and
//! samples that swing by a MiB or two must not fail a flat run. Shorter
//! runs print the slope unjudged.
//!
//! `--redis on` runs the same soak against two hubs over a private Redis
//! that is killed and restarted every few minutes, with slow consumers
//! among the churners: `examples/load/soak_redis.rs`.

use super::trend::trend;
use super::{procfs, Args};
use futures::{SinkExt, StreamExt};
use serde_json::json;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use switchboard::client::{Client, RoomEvent};
use switchboard::history::{HistoryConfig, MemoryHistory, RoomHistory};
use tokio_tungstenite::tungstenite::Message;

#[derive(Default)]
struct Counters {
    cycles: AtomicU64,
    failed_cycles: AtomicU64,
    checked: AtomicU64,
    lost: AtomicU64,
    duplicated: AtomicU64,
    stop: AtomicBool,
}

/// One churn cycle on a plain WebSocket; `abrupt`: drop without a close.
pub(super) async fn cycle(url: &str, room: &str, abrupt: bool) -> Result<(), String> {
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.map_err(|e| e.to_string())?;
    let join = json!({"type": "join", "room": room, "ref": 1}).to_string();
    ws.send(Message::text(join)).await.map_err(|e| e.to_string())?;
    // The hello, the reply, the presence state and a few events.
    let mut seen = 0;
    while seen < 6 {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
            Ok(Some(Ok(Message::Text(_)))) => seen += 1,
            Ok(Some(Ok(_))) => {}
            Ok(_) => return Err("the connection ended".into()),
            Err(_) => return Err("nothing for 10 s".into()),
        }
    }
    if abrupt {
        drop(ws);
        return Ok(());
    }
    let leave = json!({"type": "leave", "room": room, "ref": 2}).to_string();
    ws.send(Message::text(leave)).await.map_err(|e| e.to_string())?;
    ws.close(None).await.map_err(|e| e.to_string())?;
    while let Ok(Some(Ok(_))) = tokio::time::timeout(Duration::from_secs(10), ws.next()).await {}
    Ok(())
}

pub async fn cmd(args: &Args) -> Result<ExitCode, String> {
    match args.or("redis", "off".to_string())?.as_str() {
        "off" => {}
        #[cfg(feature = "redis")]
        "on" => return super::soak_redis::cmd(args).await,
        #[cfg(not(feature = "redis"))]
        "on" => return Err("`load soak --redis on` needs the `redis` feature (and `client`)".into()),
        other => return Err(format!("bad value `{other}` for --redis: on or off")),
    }
    let minutes: f64 = args.or("minutes", 1.0)?;
    let listeners: usize = args.or("listeners", 40)?;
    let rooms: usize = args.or("rooms", 8)?;
    let churners: usize = args.or("churners", 32)?;
    let rate: u32 = args.or("rate", 20)?;
    let interval = Duration::from_secs(args.or("interval", 10)?);
    let slack: f64 = args.or("rss-slack", 10.0)?;
    let max_slope: f64 = args.or("max-slope", 128.0)?;
    let total = Duration::from_secs_f64(minutes * 60.0);
    procfs::raise_nofile((listeners + churners) as u64 * 2 + 1024);

    let (rt, hub, addr) = super::presence_storm::presence_server(|b| {
        b.history(MemoryHistory::new(), HistoryConfig::default().rooms("soak:", RoomHistory::default()))
    })?;
    let names: Vec<String> = (0..rooms).map(|r| format!("soak:{r}")).collect();
    let published: Arc<Vec<AtomicU64>> = Arc::new((0..rooms).map(|_| AtomicU64::new(1)).collect());
    {
        let (hub, names, published) = (hub.clone(), names.clone(), published.clone());
        rt.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1) / rate.max(1));
            loop {
                tick.tick().await;
                for (i, room) in names.iter().enumerate() {
                    let n = published[i].load(Ordering::Acquire);
                    if hub.publish(room, "tick", &json!({ "n": n })).await.is_ok() {
                        published[i].store(n + 1, Ordering::Release);
                    }
                }
            }
        });
    }
    println!(
        "soak: {minutes} min; {listeners} listeners in {rooms} recoverable presence rooms at {rate} events/s each; \
         {churners} churners (connect, join, read, then leave and close, or drop); shared {}-core machine",
        std::thread::available_parallelism().map_or(0, |p| p.get())
    );

    let counters = Arc::new(Counters::default());
    // The listeners.
    let mut clients = Vec::new();
    for i in 0..listeners {
        let client = Client::builder(format!("ws://{addr}/?user=l{i}")).connect().map_err(|e| e.to_string())?;
        let room = tokio::time::timeout(Duration::from_secs(30), client.join(&names[i % rooms]))
            .await
            .map_err(|_| "a listener's join timed out")?
            .map_err(|e| e.to_string())?;
        let counters = counters.clone();
        tokio::spawn(async move {
            let mut next = 0u64;
            while let Some(ev) = room.recv().await {
                if let RoomEvent::Event(e) = ev {
                    let Ok(v) = e.decode::<serde_json::Value>() else { continue };
                    let n = v["n"].as_u64().unwrap_or(0);
                    if next != 0 && n < next {
                        counters.duplicated.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    if next != 0 && n > next {
                        counters.lost.fetch_add(n - next, Ordering::Relaxed);
                    }
                    next = n + 1;
                    counters.checked.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        clients.push(client);
    }
    // Tasks with the listeners alone: the count to come back to.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle_tasks = rt.metrics().num_alive_tasks();
    // The churners.
    let mut churn = Vec::new();
    for c in 0..churners {
        let (counters, names) = (counters.clone(), names.clone());
        churn.push(tokio::spawn(async move {
            let mut k = 0usize;
            while !counters.stop.load(Ordering::Acquire) {
                k += 1;
                let url = format!("ws://{addr}/?user=c{c}");
                let room = &names[(c + k) % names.len()];
                match cycle(&url, room, (c + k) % 2 == 0).await {
                    Ok(()) => counters.cycles.fetch_add(1, Ordering::Relaxed),
                    Err(_) => counters.failed_cycles.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }

    let pid = std::process::id();
    let sample = |started: Instant| {
        let s = hub.stats();
        let (rss, tasks) = (procfs::rss_kib(pid).unwrap_or(0), rt.metrics().num_alive_tasks());
        let line = format!(
            "{:>6.0} s  rss {:>7} KiB  tasks {:>5}  rooms {:>3}  connections {:>4}  cycles {:>7} ({} failed)  \
             checked {:>8}  lost {}  dup {}",
            started.elapsed().as_secs_f64(),
            rss,
            tasks,
            s.rooms,
            s.connections,
            counters.cycles.load(Ordering::Relaxed),
            counters.failed_cycles.load(Ordering::Relaxed),
            counters.checked.load(Ordering::Relaxed),
            counters.lost.load(Ordering::Relaxed),
            counters.duplicated.load(Ordering::Relaxed),
        );
        (line, rss, tasks)
    };
    let started = Instant::now();
    let mut samples = Vec::new();
    let mut baseline: Option<(u64, usize)> = None;
    while started.elapsed() < total {
        tokio::time::sleep(interval.min(total.saturating_sub(started.elapsed()))).await;
        let (line, rss, tasks) = sample(started);
        println!("{line}");
        if started.elapsed() >= interval {
            baseline.get_or_insert((rss, tasks));
            samples.push((started.elapsed().as_secs_f64(), rss as f64));
        }
    }
    counters.stop.store(true, Ordering::Release);
    for c in churn {
        let _ = c.await;
    }
    // Back to the listeners alone.
    let settle = Instant::now();
    loop {
        let s = hub.stats();
        if s.connections == listeners && s.rooms == rooms {
            break;
        }
        if settle.elapsed() > Duration::from_secs(60) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (line, rss, tasks) = sample(started);
    println!("{line}  (churn stopped)");
    let (base_rss, _) = baseline.unwrap_or((rss, tasks));
    let stats = hub.stats();
    let mut metas = 0;
    for room in &names {
        metas += hub.presence(room).await.map(|e| e.iter().map(|e| e.metas.len()).sum::<usize>()).unwrap_or(0);
    }
    let lost = counters.lost.load(Ordering::Acquire);
    let dup = counters.duplicated.load(Ordering::Acquire);
    let bound = base_rss as f64 * (1.0 + slack / 100.0) + 8.0 * 1024.0;
    let trend = trend(&samples, max_slope);
    println!(
        "end: rss {rss} KiB (baseline {base_rss} KiB, bound {bound:.0} KiB), {trend} over {} samples; \
         tasks {tasks} (listeners alone before the churn {idle_tasks}); connections {}, rooms {}, presence metas {metas} (listeners {listeners}); \
         cycles {} ({} failed); events checked {}, lost {lost}, duplicated {dup}",
        samples.len(),
        stats.connections,
        stats.rooms,
        counters.cycles.load(Ordering::Acquire),
        counters.failed_cycles.load(Ordering::Acquire),
        counters.checked.load(Ordering::Acquire),
    );
    let leaks = stats.connections != listeners || stats.rooms != rooms || metas != listeners || tasks > idle_tasks + 8;
    let ok = lost == 0 && dup == 0 && !leaks && (rss as f64) <= bound && trend.flat != Some(false);
    for c in &clients {
        c.close().await;
    }
    rt.shutdown_background();
    if !ok {
        println!("soak FAILED");
        return Ok(ExitCode::FAILURE);
    }
    println!("soak passed");
    Ok(ExitCode::SUCCESS)
}
