//! `permessage-deflate` on vs off, end to end over loopback sockets: bytes
//! on the wire and server CPU per delivery for chat-like JSON and 4 KiB
//! dashboard samples at 1,000 and 8,000 subscribers, idle memory per
//! connection with and without the extension, and the deflate level's
//! cost and ratio on both payloads.
//!
//! ```text
//! cargo bench --bench compression              # everything (a few minutes)
//! cargo bench --bench compression -- quick     # 1,000 subscribers only
//! ```
//!
//! Each measurement runs in a child process of its own (this binary, with
//! arguments), so memory figures do not inherit an earlier run's heap. In
//! the child, the hub runs on a one-thread runtime whose thread is named
//! `sb-server`; the subscribers run on another runtime. Server CPU is that
//! thread's user + system time (from `/proc/self/task`), over the publish
//! phase only, divided by the deliveries. Bytes on the wire are the bytes
//! the subscribers read in that phase (WebSocket headers included),
//! divided the same way. Subscribers are minimal raw clients (they count
//! frames and bytes; the first subscriber inflates and checks every
//! message), so they cost the server what any client would.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use switchboard::integration::ws;
use switchboard::transport::ws::{Compression, WsConfig};
use switchboard::{Hub, HubConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const ROOM: &str = "bench";
const OFFER: &str = "permessage-deflate; client_max_window_bits";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    match args.first().map(String::as_str) {
        Some("child-run") => child_run(&args[1..]),
        Some("child-idle") => child_idle(&args[1..]),
        _ => parent(args.iter().any(|a| a == "quick")),
    }
}

fn child(args: &[String]) -> String {
    let out = std::process::Command::new(std::env::current_exe().unwrap()).args(args).output().expect("run the child");
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

fn parent(quick: bool) {
    println!("## deflate level (flate2 on miniz_oxide), one message compressed alone");
    println!("| payload | bytes | level | compressed | ratio | µs per message |");
    println!("|---|---:|---:|---:|---:|---:|");
    for (name, payload) in [("chat", chat(7)), ("dashboard", dashboard(7))] {
        for level in [1, 6, 9] {
            let (size, us) = level_cost(payload.as_bytes(), level);
            println!(
                "| {name} | {} | {level} | {size} | {:.2} | {us:.2} |",
                payload.len(),
                payload.len() as f64 / size as f64
            );
        }
    }
    println!();
    println!("## fan-out: per delivery (one publish to every subscriber)");
    println!("| payload | subscribers | messages | compression | wire bytes / delivery | server CPU ns / delivery | wall s |");
    println!("|---|---:|---:|---|---:|---:|---:|");
    let subs: &[usize] = if quick { &[1000] } else { &[1000, 8000] };
    for payload in ["chat", "dashboard"] {
        for &n in subs {
            let messages = if n >= 8000 { 60 } else { 300 };
            for mode in ["off", "above256", "on"] {
                let line =
                    child(&["child-run".into(), payload.into(), n.to_string(), messages.to_string(), mode.into()]);
                println!("| {payload} | {n} | {messages} | {mode} | {line} |");
            }
        }
    }
    println!();
    println!("## idle memory (process RSS growth per open connection, server and lean client together)");
    println!("| connections | extension | bytes / connection |");
    println!("|---:|---|---:|");
    let n = if quick { 2000 } else { 8000 };
    for mode in ["off", "negotiated"] {
        let line = child(&["child-idle".into(), n.to_string(), mode.into()]);
        println!("| {n} | {mode} | {line} |");
    }
}

/// A chat line as a chat app would publish it (some 150 bytes of JSON).
fn chat(i: u64) -> String {
    const LINES: [&str; 4] = [
        "are we still on for the review at three?",
        "yes, I moved it to the big room so everyone fits",
        "great, I'll bring the numbers from last week's run",
        "see you there, and thanks for sorting out the room",
    ];
    serde_json::json!({
        "id": format!("m-{i:08}"),
        "user": {"id": "u-4821", "name": "Ann"},
        "text": LINES[(i % 4) as usize],
        "at": 1_733_212_345_678u64 + i * 1234,
    })
    .to_string()
}

/// A dashboard update: 4 KiB of JSON samples (timestamps and values).
fn dashboard(i: u64) -> String {
    let mut x = i.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
    let samples: Vec<serde_json::Value> = (0..131)
        .map(|k| {
            x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            serde_json::json!({"t": 1_733_212_345_000u64 + i * 1000 + k * 10, "v": ((x >> 40) % 100_000) as f64 / 100.0})
        })
        .collect();
    let s = serde_json::json!({"series": "cpu.load", "host": "web-03", "samples": samples}).to_string();
    assert!((3500..4600).contains(&s.len()), "{}", s.len());
    s
}

fn level_cost(payload: &[u8], level: u32) -> (usize, f64) {
    use flate2::{Compress, FlushCompress};
    let mut c = Compress::new(flate2::Compression::new(level), false);
    let mut out = Vec::with_capacity(payload.len() * 2);
    let rounds = 2000;
    let start = Instant::now();
    for _ in 0..rounds {
        c.reset();
        out.clear();
        c.compress_vec(payload, &mut out, FlushCompress::Sync).unwrap();
    }
    let us = start.elapsed().as_secs_f64() * 1e6 / f64::from(rounds);
    (out.len() - 4, us)
}

fn server_cpu_ns() -> u64 {
    let ticks = 100u64; // USER_HZ
    let mut total = 0;
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim() != "sb-server" {
            continue;
        }
        let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
        // Fields after the `(comm)`: state is field 3; utime 14, stime 15.
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        let f: Vec<&str> = rest.split(' ').collect();
        let (u, s): (u64, u64) = (f[11].parse().unwrap(), f[12].parse().unwrap());
        total += (u + s) * 1_000_000_000 / ticks;
    }
    total
}

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split(' ').nth(1).unwrap().parse().unwrap();
    pages * 4096
}

fn config(mode: &str) -> WsConfig {
    WsConfig::default().compression(match mode {
        "off" => Compression::Off,
        "on" => Compression::On,
        _ => Compression::Above(256),
    })
}

/// Starts a hub and listener on a one-thread runtime named `sb-server`.
fn server(mode: &str) -> (tokio::runtime::Runtime, Hub, SocketAddr) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("sb-server")
        .enable_all()
        .build()
        .unwrap();
    let cfg = config(mode);
    let (hub, addr) = rt.block_on(async move {
        // As examples/load: no per-connection message rate or admission
        // limits (thousands of connections open in a burst from one address).
        let security = switchboard::security::SecurityConfig::default().connection_rate(None).max_connections(1 << 20);
        let hub = Hub::builder()
            .config(HubConfig::default().rate_limit(None).outbound_queue_bytes(4 << 20))
            .security(security)
            .build();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(ws::serve(listener, hub.clone(), cfg));
        (hub, addr)
    });
    (rt, hub, addr)
}

fn clients_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(1).thread_name("sb-client").enable_all().build().unwrap()
}

/// A subscriber's socket after the handshake, with what it read past it.
struct Sub {
    tcp: TcpStream,
    buf: Vec<u8>,
}

async fn open(addr: SocketAddr, offer: bool) -> Sub {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let ext = if offer { format!("Sec-WebSocket-Extensions: {OFFER}\r\n") } else { String::new() };
    let req = format!(
        "GET / HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{ext}\r\n"
    );
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    loop {
        let mut chunk = [0u8; 1024];
        let n = tcp.read(&mut chunk).await.unwrap();
        assert!(n > 0);
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..i]).to_lowercase();
            assert!(head.starts_with("http/1.1 101"));
            assert_eq!(head.contains("permessage-deflate"), offer);
            buf.drain(..i + 4);
            return Sub { tcp, buf };
        }
    }
}

fn masked_text(payload: &[u8]) -> Vec<u8> {
    assert!(payload.len() < 126);
    let mut f = vec![0x81, 0x80 | payload.len() as u8, 0, 0, 0, 0];
    f.extend_from_slice(payload);
    f
}

/// Reads frames: returns (data frames, bytes) once `want` data frames came.
/// With `check`, inflates and parses every data message.
async fn read_frames(sub: &mut Sub, want: u64, counted: &AtomicU64, check: bool) -> u64 {
    let mut got = 0;
    let mut bytes = sub.buf.len() as u64;
    let mut at = 0;
    loop {
        while sub.buf.len() - at >= 2 {
            let b = &sub.buf[at..];
            let (len, h) = match b[1] & 0x7F {
                126 if b.len() >= 4 => (usize::from(u16::from_be_bytes([b[2], b[3]])), 4),
                127 if b.len() >= 10 => (u64::from_be_bytes(b[2..10].try_into().unwrap()) as usize, 10),
                126 | 127 => break,
                n => (usize::from(n), 2),
            };
            if b.len() < h + len {
                break;
            }
            let op = b[0] & 0x0F;
            if op == 0x1 || op == 0x2 {
                if check {
                    let p = &b[h..h + len];
                    let data = if b[0] & 0x40 != 0 { inflate(p) } else { p.to_vec() };
                    let v: serde_json::Value = serde_json::from_slice(&data).expect("JSON");
                    assert_eq!(v["type"], "event");
                }
                got += 1;
                counted.fetch_add(1, Ordering::Relaxed);
            }
            at += h + len;
        }
        sub.buf.drain(..at);
        at = 0;
        if got >= want {
            return bytes;
        }
        let mut chunk = [0u8; 16 * 1024];
        let n = sub.tcp.read(&mut chunk).await.unwrap();
        assert!(n > 0, "server closed");
        bytes += n as u64;
        sub.buf.extend_from_slice(&chunk[..n]);
    }
}

fn inflate(p: &[u8]) -> Vec<u8> {
    let mut d = flate2::Decompress::new(false);
    let mut input = p.to_vec();
    input.extend_from_slice(&[0, 0, 0xff, 0xff]);
    let mut out = Vec::with_capacity(64 * 1024);
    d.decompress_vec(&input, &mut out, flate2::FlushDecompress::Sync).unwrap();
    out
}

fn child_run(args: &[String]) {
    let payload = args[0].clone();
    let n: usize = args[1].parse().unwrap();
    let messages: u64 = args[2].parse().unwrap();
    let mode = args[3].clone();
    let offer = mode != "off";
    let (srv, hub, addr) = server(&mode);
    let rt = clients_runtime();
    // Connect and join (hello and the join reply are two data frames).
    let counted = Arc::new(AtomicU64::new(0));
    let subs: Vec<Sub> = rt.block_on(async {
        let mut subs = Vec::with_capacity(n);
        for _ in 0..n {
            let mut s = open(addr, offer).await;
            s.tcp.write_all(&masked_text(br#"{"type":"join","ref":1,"room":"bench"}"#)).await.unwrap();
            subs.push(s);
        }
        let mut ready = Vec::with_capacity(n);
        for mut s in subs {
            read_frames(&mut s, 2, &AtomicU64::new(0), false).await;
            ready.push(s);
        }
        ready
    });
    let handles: Vec<_> = subs
        .into_iter()
        .enumerate()
        .map(|(i, mut s)| {
            let counted = counted.clone();
            rt.spawn(async move { read_frames(&mut s, messages, &counted, i == 0).await })
        })
        .collect();
    let cpu0 = server_cpu_ns();
    let t0 = Instant::now();
    srv.block_on(async {
        for i in 0..messages {
            let data: serde_json::Value =
                serde_json::from_str(&if payload == "chat" { chat(i) } else { dashboard(i) }).unwrap();
            hub.publish(ROOM, "update", &data).await.unwrap();
            // A window of 10 messages in flight per subscriber.
            while counted.load(Ordering::Relaxed) + 10 * n as u64 <= (i + 1) * n as u64 {
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
        }
        while counted.load(Ordering::Relaxed) < messages * n as u64 {
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
    });
    let wall = t0.elapsed();
    let cpu = server_cpu_ns() - cpu0;
    let bytes: u64 = rt.block_on(async {
        let mut total = 0;
        for h in handles {
            total += h.await.unwrap();
        }
        total
    });
    let deliveries = messages * n as u64;
    println!(
        "{:.1} | {:.0} | {:.1}",
        bytes as f64 / deliveries as f64,
        cpu as f64 / deliveries as f64,
        wall.as_secs_f64()
    );
    drop(rt);
    drop(srv);
}

fn child_idle(args: &[String]) {
    let n: usize = args[0].parse().unwrap();
    let offer = args[1] == "negotiated";
    let (srv, hub, addr) = server("above256");
    let rt = clients_runtime();
    // Warm up allocator and runtime with a few connections first.
    let warm: Vec<Sub> = rt.block_on(async {
        let mut v = Vec::new();
        for _ in 0..50 {
            v.push(open(addr, offer).await);
        }
        v
    });
    std::thread::sleep(Duration::from_millis(300));
    let before = rss_bytes();
    let subs: Vec<Sub> = rt.block_on(async {
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            let mut s = open(addr, offer).await;
            // Read the hello so the server is done with the handshake.
            read_frames(&mut s, 1, &AtomicU64::new(0), false).await;
            v.push(s);
        }
        v
    });
    while hub.stats().connections < n + warm.len() {
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    let after = rss_bytes();
    println!("{}", (after - before) / n as u64);
    drop(subs);
    drop(warm);
    drop(rt);
    drop(srv);
}
