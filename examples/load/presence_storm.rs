//! `load storm --presence on` (issue 18): presence under a reconnect storm.
//!
//! `--clients N` Rust clients (the real reconnect policy), users `u0..`,
//! join one presence room (`PresenceConfig::default()`: 50 ms batch
//! window, counts only above 100 keys). A watcher, a plain WebSocket that
//! joined first, counts the room's presence messages and their bytes on
//! the wire. Then every member's connection is closed at once (`Hub::
//! disconnect` with 4002, a reconnect code, through the admin API) and
//! they all come back. Measured: the time until the count is back and
//! every client is connected; the presence messages and bytes the watcher
//! got during the storm, per member (every member gets the same diffs);
//! and the stale check: the room's presence is exactly one meta per member,
//! each its current connection (exit 1 otherwise).

use super::Args;
use futures::{SinkExt, StreamExt};
use std::collections::BTreeSet;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use switchboard::client::Client;
use switchboard::presence::PresenceConfig;
use switchboard::protocol::CloseCode;
use switchboard::{Hub, Identity};
use tokio_tungstenite::tungstenite::Message;

const ROOM: &str = "lobby";

/// What the watcher counts (reset at the cut).
#[derive(Default)]
struct Watch {
    messages: AtomicU64,
    bytes: AtomicU64,
    /// The last count, as `keys << 32 | connections`.
    count: AtomicU64,
}

/// A server for the presence modes (`soak` too): its own two-thread
/// runtime (threads `sb-server*`), a hub with users from `?user=` and
/// presence on every room (`extra` adds to its builder), serving WebSocket
/// on a free loopback port.
pub(super) fn presence_server(
    extra: impl FnOnce(switchboard::HubBuilder) -> switchboard::HubBuilder,
) -> Result<(tokio::runtime::Runtime, Hub, std::net::SocketAddr), String> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("sb-server")
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let _guard = rt.enter();
    let builder = Hub::builder()
        .authenticate(|hs: &switchboard::Handshake| {
            std::future::ready(Ok(hs.query("user").map(Identity::user).unwrap_or_default()))
        })
        .presence(PresenceConfig::default());
    let hub = extra(builder).build();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    let listener = tokio::net::TcpListener::from_std(listener).map_err(|e| e.to_string())?;
    rt.spawn(switchboard::integration::ws::serve(listener, hub.clone(), Default::default()));
    drop(_guard);
    Ok((rt, hub, addr))
}

pub async fn cmd(args: &Args) -> Result<ExitCode, String> {
    let n: u64 = args.or("clients", 2000)?;
    let timeout = Duration::from_secs(args.or("timeout", 180)?);
    let want = n * 2 + 1024;
    if super::procfs::raise_nofile(want) < want {
        return Err(format!("open files limit too low for {n} clients"));
    }
    let (rt, hub, addr) = presence_server(|b| b)?;
    println!(
        "presence storm: {n} members of one presence room (batch window 50 ms, counts only above 100 keys), \
         every connection closed at once; client and server in one process on a shared {}-core machine",
        std::thread::available_parallelism().map_or(0, |p| p.get())
    );

    // The watcher: joins first, then only reads.
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/?user=watcher"))
        .await
        .map_err(|e| format!("watcher: {e}"))?;
    ws.send(Message::text(format!(r#"{{"type":"join","room":"{ROOM}","ref":1}}"#))).await.map_err(|e| e.to_string())?;
    let watch = Arc::new(Watch::default());
    {
        let watch = watch.clone();
        tokio::spawn(async move {
            while let Some(Ok(msg)) = ws.next().await {
                let Message::Text(text) = msg else { continue };
                let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else { continue };
                if !matches!(v["type"].as_str(), Some("presence_diff" | "presence_state")) {
                    continue;
                }
                watch.messages.fetch_add(1, Ordering::Relaxed);
                watch.bytes.fetch_add(text.len() as u64, Ordering::Relaxed);
                let c = &v["data"]["count"];
                let (k, cs) = (c["keys"].as_u64().unwrap_or(0), c["connections"].as_u64().unwrap_or(0));
                watch.count.store(k << 32 | cs, Ordering::Release);
            }
        });
    }
    let all = (n + 1) << 32 | (n + 1);

    let started = Instant::now();
    let mut clients = Vec::with_capacity(n as usize);
    let mut rooms = Vec::with_capacity(n as usize);
    for i in 0..n {
        let client = Client::builder(format!("ws://{addr}/?user=u{i}")).connect().map_err(|e| e.to_string())?;
        clients.push(client);
        if i % 500 == 499 {
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    let joins = futures::future::join_all(clients.iter().map(|c| async move {
        loop {
            match c.join(ROOM).await {
                Ok(room) => return room,
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }));
    rooms.extend(tokio::time::timeout(timeout, joins).await.map_err(|_| "the joins did not finish")?);
    while watch.count.load(Ordering::Acquire) != all {
        if started.elapsed() > timeout {
            return Err("the watcher's count never reached every member".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (m0, b0) = (watch.messages.load(Ordering::Acquire), watch.bytes.load(Ordering::Acquire));
    println!(
        "joined: {n} members after {:.1} s; the watcher got {m0} presence messages, {b0} bytes ({:.1} bytes per member)",
        started.elapsed().as_secs_f64(),
        b0 as f64 / n as f64
    );
    tokio::time::sleep(Duration::from_secs(1)).await;

    // The storm.
    let (m0, b0) = (watch.messages.load(Ordering::Acquire), watch.bytes.load(Ordering::Acquire));
    let members: Vec<_> =
        hub.room_connections(ROOM).into_iter().filter(|c| c.user_id.as_deref() != Some("watcher")).collect();
    let id = |c: &Client| match &*c.status().borrow() {
        switchboard::client::Status::Connected { connection_id, .. } => Some(*connection_id),
        _ => None,
    };
    let before: Vec<Option<u64>> = clients.iter().map(id).collect();
    let t0 = Instant::now();
    for c in &members {
        hub.disconnect(c.id, CloseCode::RECONNECT, "presence storm");
    }
    // Back: every client is connected again, on a new connection, and the
    // count is whole again.
    loop {
        let back = clients.iter().zip(&before).all(|(c, old)| id(c).is_some_and(|now| Some(now) != *old))
            && watch.count.load(Ordering::Acquire) == all
            && hub.room_members(ROOM).len() as u64 == n + 1;
        if back {
            break;
        }
        if t0.elapsed() > timeout {
            println!("presence storm FAILED: not back after {timeout:?}");
            return Ok(ExitCode::FAILURE);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = t0.elapsed();
    // A few windows more, for anything still on its way.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let messages = watch.messages.load(Ordering::Acquire) - m0;
    let bytes = watch.bytes.load(Ordering::Acquire) - b0;
    let windows = took.as_millis() as u64 / 50 + 2;
    println!(
        "storm: {n} members closed and back in {:.2} s ({} changes); the watcher got {messages} presence messages \
         (at most {windows}: one per 50 ms window), {bytes} bytes: {:.2} bytes per member, {:.3} bytes per change",
        took.as_secs_f64(),
        2 * n,
        bytes as f64 / n as f64,
        bytes as f64 / (2 * n) as f64
    );

    // No stale member.
    let live: BTreeSet<u64> = hub.room_members(ROOM).iter().map(|m| m.connection.get()).collect();
    let entries = hub.presence(ROOM).await.map_err(|e| e.to_string())?;
    let metas: usize = entries.iter().map(|e| e.metas.len()).sum();
    let refs: BTreeSet<u64> = entries.iter().flat_map(|e| e.metas.iter().map(|m| m.connection)).collect();
    let stale = refs.difference(&live).count();
    println!("after: {} keys, {metas} metas, {} live members, {stale} stale metas", entries.len(), live.len());
    drop(rooms);
    for c in &clients {
        c.close().await;
    }
    rt.shutdown_background();
    if stale > 0 || metas as u64 != n + 1 || entries.len() as u64 != n + 1 || messages > windows {
        println!("presence storm FAILED");
        return Ok(ExitCode::FAILURE);
    }
    println!("presence storm passed: no stale member, diffs batched");
    Ok(ExitCode::SUCCESS)
}
