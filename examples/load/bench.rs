//! The load generator: `run` (fan-out) and `idle` (held connections).

use crate::client::{self, Client, Lean};
use crate::heap::Heap;
use crate::procfs;
use crate::server::{Kind, ROOM};
use hdrhistogram::Histogram;
use parking_lot::Mutex;
use serde::Serialize;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::sync::{mpsc, watch, Notify, Semaphore};

/// Options shared by `run` and `idle`.
#[derive(Debug, Clone)]
pub struct ConnOpts {
    pub kind: Kind,
    /// Source addresses 127.0.0.2 … 127.0.0.(1+n) the connections are spread over.
    pub source_ips: usize,
    /// Connection attempts in flight at once.
    pub concurrency: usize,
    /// Subscribers that use a full tokio-tungstenite client.
    pub checked: usize,
    /// Heartbeat interval for the server (`None`: its default).
    pub heartbeat_ms: Option<u64>,
    /// `max_inflight` for the switchboard server.
    pub max_inflight: Option<usize>,
    /// Server runtime worker threads (`Some(0)`: a current-thread runtime).
    pub server_threads: Option<usize>,
}

/// `load run` options.
#[derive(Debug, Clone)]
pub struct RunOpts {
    pub conn: ConnOpts,
    pub subscribers: usize,
    pub messages: u64,
    /// Messages per second; `None` is flat out (bounded by `window`).
    pub rate: Option<f64>,
    /// Size of the publisher's JSON payload, in bytes.
    pub payload: usize,
    /// Flat out: most messages the publisher is ahead of the average
    /// subscriber; 0 is an unpaced burst (every message sent at once).
    pub window: u64,
    /// `raw-padded`: the frame size subscribers must receive (the publisher
    /// pads its payload to it); `None`: switchboard's envelope around
    /// `payload` ([`crate::server::switchboard_event_len`]).
    pub pad_to: Option<usize>,
    pub timeout: Option<Duration>,
    /// Runs `perf <args> -p <server pid>` during the publishing phase.
    pub perf: Option<String>,
}

/// A `perf` process attached to the server while it is under load.
struct Perf(Option<std::process::Child>);

impl Perf {
    fn start(args: Option<&str>, pid: u32) -> Perf {
        let Some(args) = args else { return Perf(None) };
        let mut cmd = std::process::Command::new("perf");
        cmd.args(args.split_whitespace()).args(["-p", &pid.to_string()]).stdin(Stdio::null());
        match cmd.spawn() {
            Ok(child) => {
                // Give perf time to attach before the load starts.
                std::thread::sleep(Duration::from_millis(300));
                Perf(Some(child))
            }
            Err(e) => {
                eprintln!("load: could not start perf: {e}");
                Perf(None)
            }
        }
    }

    /// Stops perf the way Ctrl-C does, so it writes its output.
    fn stop(mut self) {
        if let Some(mut child) = self.0.take() {
            use nix::sys::signal::{kill, Signal};
            let _ = kill(nix::unistd::Pid::from_raw(child.id() as i32), Signal::SIGINT);
            let _ = child.wait();
        }
    }
}

impl Drop for Perf {
    fn drop(&mut self) {
        if let Some(child) = &mut self.0 {
            let _ = child.kill();
        }
    }
}

/// A server child process, killed when dropped (also on panic).
pub struct ServerProc {
    child: Child,
    pub pid: u32,
    pub addr: SocketAddr,
    stdin: ChildStdin,
    lines: Lines<BufReader<ChildStdout>>,
}

impl ServerProc {
    pub async fn spawn(opts: &ConnOpts) -> io::Result<ServerProc> {
        let exe = std::env::current_exe()?;
        // `LOAD_SERVER_WRAP="valgrind --tool=massif"` (or strace, …) runs
        // the server under a tool: the words come before the server's own
        // command line. The tool must keep the server's pid (valgrind does)
        // for the CPU and RSS figures to mean anything.
        let wrap = std::env::var("LOAD_SERVER_WRAP").unwrap_or_default();
        let mut words = wrap.split_whitespace();
        let mut cmd = match words.next() {
            Some(tool) => {
                let mut c = Command::new(tool);
                c.args(words).arg(exe);
                c
            }
            None => Command::new(exe),
        };
        cmd.args(["server", "--kind", opts.kind.name(), "--addr", "127.0.0.1:0"]);
        if let Some(h) = opts.heartbeat_ms {
            cmd.args(["--heartbeat-ms", &h.to_string()]);
        }
        if let Some(n) = opts.max_inflight {
            cmd.args(["--max-inflight", &n.to_string()]);
        }
        if let Some(n) = opts.server_threads {
            cmd.args(["--threads", &n.to_string()]);
        }
        let mut child = cmd.stdout(Stdio::piped()).stdin(Stdio::piped()).kill_on_drop(true).spawn()?;
        let pid = child.id().ok_or_else(|| io::Error::other("server exited at once"))?;
        let stdout = child.stdout.take().ok_or_else(|| io::Error::other("no stdout"))?;
        let stdin = child.stdin.take().ok_or_else(|| io::Error::other("no stdin"))?;
        let mut lines = BufReader::new(stdout).lines();
        // A wrapping tool may print lines of its own first.
        let ready = async {
            loop {
                match lines.next_line().await? {
                    Some(l) if l.starts_with("ready ") => return Ok(l),
                    Some(_) => continue,
                    None => return Err(io::Error::other("server exited before ready")),
                }
            }
        };
        let line = tokio::time::timeout(Duration::from_secs(60), ready)
            .await
            .map_err(|_| io::Error::other("server did not say ready"))??;
        let addr = line
            .strip_prefix("ready ")
            .and_then(|a| a.trim().parse().ok())
            .ok_or_else(|| io::Error::other(format!("unexpected server line: {line}")))?;
        Ok(ServerProc { child, pid, addr, stdin, lines })
    }

    /// The server's live heap, from its counting allocator.
    pub async fn heap(&mut self) -> io::Result<Heap> {
        self.stdin.write_all(b"heap\n").await?;
        loop {
            match self.lines.next_line().await? {
                Some(l) => {
                    if let Some(h) = l.strip_prefix("heap ").and_then(Heap::parse) {
                        return Ok(h);
                    }
                }
                None => return Err(io::Error::other("server exited")),
            }
        }
    }

    pub fn cpu(&self) -> f64 {
        procfs::cpu_seconds(self.pid).unwrap_or(f64::NAN)
    }

    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

fn source_ip(i: usize, n: usize) -> Option<IpAddr> {
    (n > 0).then(|| IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + (i % n) as u8)))
}

fn self_cpu() -> f64 {
    procfs::cpu_seconds(std::process::id()).unwrap_or(f64::NAN)
}

/// Opens a client and waits for the server's first message (`hello` or
/// `welcome`): from then on it receives what is published.
async fn open(addr: SocketAddr, opts: &ConnOpts, i: usize, checked: bool) -> io::Result<Client> {
    if opts.kind.sse() {
        return open_sse(addr, opts, i).await;
    }
    let mut c =
        Client::connect(addr, source_ip(i, opts.source_ips), checked, 0x9E37_79B9 ^ i as u32, opts.kind.subprotocol())
            .await?;
    c.next_data(|_| ()).await?.ok_or_else(|| io::Error::other("closed before the first message"))?;
    Ok(c)
}

/// Opens an SSE stream and waits until it receives what is published: on
/// switchboard the `$joined` of the query's room, on raw-sse its greeting.
async fn open_sse(addr: SocketAddr, opts: &ConnOpts, i: usize) -> io::Result<Client> {
    let stream = client::tcp(addr, source_ip(i, opts.source_ips)).await?;
    let mut c = Client::Sse(Box::new(client::Sse::open(stream, addr, &opts.kind.sse_path()).await?));
    let ready: &[u8] = if opts.kind.is_switchboard() { b"event: $joined\n" } else { b"data: welcome\n" };
    wait_for(&mut c, ready, &[b"event: $join_error\n", b"event: $close\n"], "opening the stream").await?;
    Ok(c)
}

/// Sends `join` and waits for its reply (switchboard only), in MessagePack
/// on a `msgpack` connection.
async fn join(c: &mut Client, msgpack: bool) -> io::Result<()> {
    let (reply, error): (&[u8], &[u8]) = if msgpack {
        c.binary(&client::msgpack_join(ROOM)).await?;
        (b"\xa4type\xa5reply", b"\xa4type\xa5error")
    } else {
        let msg = format!(r#"{{"type":"join","ref":1,"room":"{ROOM}"}}"#);
        c.text(msg.as_bytes()).await?;
        (br#""type":"reply""#, br#""type":"error""#)
    };
    wait_for(c, reply, &[error], "joining").await
}

/// Reads messages until one contains `ok`; one containing any of `refused`
/// is an error.
async fn wait_for(c: &mut Client, ok: &[u8], refused: &[&[u8]], what: &str) -> io::Result<()> {
    loop {
        let kind = c
            .next_data(|m| {
                if client::find(m, ok).is_some() {
                    Ok(true)
                } else if refused.iter().any(|r| client::find(m, r).is_some()) {
                    Err(String::from_utf8_lossy(m).into_owned())
                } else {
                    Ok(false)
                }
            })
            .await?
            .ok_or_else(|| io::Error::other(format!("closed while {what}")))?;
        match kind {
            Ok(true) => return Ok(()),
            Ok(false) => continue,
            Err(e) => return Err(io::Error::other(format!("refused while {what}: {e}"))),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Phase {
    Connect,
    Join,
    Go,
}

/// What subscribers share with the driver.
struct Shared {
    base: Instant,
    n: u64,
    m: u64,
    delivered: AtomicU64,
    reordered: AtomicU64,
    done_subs: AtomicU64,
    all_done: Notify,
    first_send_ns: AtomicU64,
    last_delivery_ns: AtomicU64,
    /// The publisher sleeps until `delivered` reaches this.
    wake_at: AtomicU64,
    progress: Notify,
    frame_len: AtomicUsize,
    /// SSE: bytes read by the subscribers that received every message,
    /// from the start of the run to their last message, and how many they are.
    wire_bytes: AtomicU64,
    wire_subs: AtomicU64,
    /// Latency histograms, one per shard of subscribers (merged at the
    /// end): with a multi-thread generator one shared lock per delivery
    /// would be contended by every thread.
    hists: Vec<Mutex<Histogram<u64>>>,
    /// The run is over and the server is being stopped.
    stopping: AtomicBool,
}

impl Shared {
    fn now_ns(&self) -> u64 {
        self.base.elapsed().as_nanos() as u64
    }
}

/// Latency percentiles, in microseconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Latency {
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
    pub mean_us: f64,
}

/// Result of one `run`.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    pub kind: Kind,
    pub subscribers: usize,
    pub messages: u64,
    pub rate: Option<f64>,
    pub payload_bytes: usize,
    /// Flat out: messages the publisher may run ahead of the subscribers
    /// (0: an unpaced burst).
    pub window: Option<u64>,
    /// The switchboard server's `max_inflight`.
    pub max_inflight: Option<usize>,
    /// Subscribers on a full tokio-tungstenite client.
    pub checked_subscribers: usize,
    /// Size of a frame's payload as a subscriber receives it (switchboard
    /// wraps the payload in an `event` envelope); SSE: the event's bytes,
    /// its `event:`/`data:` lines and blank line included.
    pub received_message_bytes: usize,
    /// SSE: bytes read from the socket per delivery (chunk framing and
    /// comments included), over the subscribers that received everything.
    pub wire_bytes_per_delivery: Option<f64>,
    pub connect_s: f64,
    pub connects_per_s: f64,
    pub join_s: Option<f64>,
    pub publish_s: f64,
    pub expected: u64,
    pub delivered: u64,
    pub deliveries_per_s: f64,
    pub lost: u64,
    pub reordered: u64,
    pub publisher_errors: u64,
    pub client_errors: u64,
    pub timed_out: bool,
    pub latency: Latency,
    pub server_connect_cpu_s: f64,
    pub server_cpu_s: f64,
    pub server_cpu_s_per_million: f64,
    pub server_cpu_pct_of_core: f64,
    pub server_rss_connected_kib: u64,
    pub server_peak_rss_kib: u64,
    pub generator_cpu_s: f64,
    pub generator_cpu_s_per_million: f64,
}

impl RunReport {
    /// Whether every message arrived, once and in order.
    pub fn clean(&self) -> bool {
        self.lost == 0 && self.reordered == 0 && self.publisher_errors == 0 && self.client_errors == 0
    }
}

/// The publisher's JSON payload, padded to `size` bytes.
fn payload(seq: u64, sent_ns: u64, size: usize) -> String {
    let head = format!(r#"{{"seq":{seq},"sent_ns":{sent_ns},"pad":""#);
    let pad = size.saturating_sub(head.len() + 2);
    let mut s = String::with_capacity(size);
    s.push_str(&head);
    s.extend(std::iter::repeat_n('x', pad));
    s.push_str("\"}");
    s
}

/// One fan-out run: a fresh server process, N subscribers, one publisher.
pub async fn run(opts: &RunOpts) -> io::Result<RunReport> {
    let n = opts.subscribers;
    let m = opts.messages;
    procfs::raise_nofile(n as u64 + 256);
    let server = ServerProc::spawn(&opts.conn).await?;
    let addr = server.addr;
    let sh = Arc::new(Shared {
        base: Instant::now(),
        n: n as u64,
        m,
        delivered: AtomicU64::new(0),
        reordered: AtomicU64::new(0),
        done_subs: AtomicU64::new(0),
        all_done: Notify::new(),
        first_send_ns: AtomicU64::new(0),
        last_delivery_ns: AtomicU64::new(0),
        wake_at: AtomicU64::new(u64::MAX),
        progress: Notify::new(),
        frame_len: AtomicUsize::new(0),
        wire_bytes: AtomicU64::new(0),
        wire_subs: AtomicU64::new(0),
        stopping: AtomicBool::new(false),
        hists: (0..HIST_SHARDS)
            .map(|_| Histogram::new_with_bounds(1, 120_000_000, 3).map(Mutex::new).map_err(io::Error::other))
            .collect::<io::Result<_>>()?,
    });
    let client_errors = Arc::new(AtomicU64::new(0));

    // Connect every subscriber, then (switchboard) join them all.
    let (phase_tx, phase_rx) = watch::channel(Phase::Connect);
    let (ready_tx, mut ready_rx) = mpsc::unbounded_channel::<io::Result<()>>();
    let sem = Arc::new(Semaphore::new(opts.conn.concurrency.max(1)));
    let server_cpu0 = server.cpu();
    let t_connect = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let (sh, conn, sem, ready, mut phase) =
            (sh.clone(), opts.conn.clone(), sem.clone(), ready_tx.clone(), phase_rx.clone());
        let errors = client_errors.clone();
        tasks.spawn(async move {
            let permit = sem.acquire_owned().await;
            let opened = open(addr, &conn, i, i < conn.checked).await;
            drop(permit);
            let Some(mut c) = report_open(opened, &ready) else { return };
            // SSE streams joined from their query while opening.
            if conn.kind.is_switchboard() && !conn.kind.sse() {
                if phase.wait_for(|p| *p >= Phase::Join).await.is_err() {
                    return;
                }
                let joined = join(&mut c, conn.kind.msgpack()).await;
                let failed = joined.is_err();
                let _ = ready.send(joined);
                if failed {
                    return;
                }
            }
            if let Err(e) = subscribe(&mut c, &sh, i, conn.kind.msgpack()).await {
                // Once the run is over the server is killed: a reset then
                // (seen by a task still running on another generator
                // thread) is not the server's fault.
                if sh.stopping.load(Ordering::Acquire) {
                    return;
                }
                if errors.fetch_add(1, Ordering::Relaxed) < 3 {
                    eprintln!("load: subscriber {i}: {e}");
                }
            }
        });
    }
    drop(ready_tx);
    wait_all(&mut ready_rx, n, "connect").await?;
    let connect_s = t_connect.elapsed().as_secs_f64();
    let join_s = if opts.conn.kind.is_switchboard() && !opts.conn.kind.sse() {
        let t = Instant::now();
        let _ = phase_tx.send(Phase::Join);
        wait_all(&mut ready_rx, n, "join").await?;
        Some(t.elapsed().as_secs_f64())
    } else {
        None
    };
    let server_connect_cpu_s = server.cpu() - server_cpu0;
    let _ = phase_tx.send(Phase::Go);

    // The publisher: a lean client; it reads its own socket on the side
    // (errors, pings) and writes the messages.
    let publisher = Lean::handshake(client::tcp(addr, None).await?, addr, 0xC0FF_EE11, None).await?;
    let (mut prd, mut pwr) = (publisher.rd, publisher.wr);
    let first = prd.frame().await?.ok_or_else(|| io::Error::other("publisher closed"))?;
    debug_assert!(first.0 == client::OP_TEXT);
    let publisher_errors = Arc::new(AtomicU64::new(0));
    if opts.conn.kind.is_switchboard() {
        pwr.text(format!(r#"{{"type":"join","ref":1,"room":"{ROOM}"}}"#).as_bytes()).await?;
        loop {
            let (op, r) = prd.frame().await?.ok_or_else(|| io::Error::other("publisher closed while joining"))?;
            if op == client::OP_TEXT && client::find(prd.data(r), br#""type":"reply""#).is_some() {
                break;
            }
        }
    }
    let (pong_tx, mut pong_rx) = mpsc::unbounded_channel::<Vec<u8>>();
    let perr = publisher_errors.clone();
    let publisher_reader = tokio::spawn(async move {
        while let Ok(Some((op, r))) = prd.frame().await {
            let data = prd.data(r).to_vec();
            match op {
                client::OP_PING => {
                    let _ = pong_tx.send(data);
                }
                client::OP_TEXT if client::find(&data, br#""type":"error""#).is_some() => {
                    let seen = perr.fetch_add(1, Ordering::Relaxed);
                    if seen < 3 {
                        eprintln!("load: publisher got {}", String::from_utf8_lossy(&data));
                    }
                }
                client::OP_CLOSE => break,
                _ => {}
            }
        }
    });

    let server_rss_connected_kib = procfs::rss_kib(server.pid).unwrap_or(0);
    let timeout = opts.timeout.unwrap_or_else(|| match opts.rate {
        Some(r) => Duration::from_secs_f64(m as f64 / r * 1.5 + 20.0),
        None => Duration::from_secs_f64(30.0 + (n as f64 * m as f64) / 100_000.0),
    });
    let perf = Perf::start(opts.perf.as_deref(), server.pid);
    let server_cpu1 = server.cpu();
    let gen_cpu1 = self_cpu();
    let deadline = tokio::time::Instant::now() + timeout;
    let t_publish = Instant::now();
    let publish = {
        let sh = sh.clone();
        let (kind, rate, window) = (opts.conn.kind, opts.rate, opts.window);
        let size = match kind {
            Kind::RawPadded => opts.pad_to.unwrap_or_else(|| crate::server::switchboard_event_len(opts.payload)),
            _ => opts.payload,
        };
        async move {
            let mut tick = rate.map(|r| {
                let mut t = tokio::time::interval(Duration::from_secs_f64(1.0 / r));
                t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                t
            });
            for seq in 0..m {
                while let Ok(p) = pong_rx.try_recv() {
                    pwr.send(client::OP_PONG, &p).await?;
                }
                match &mut tick {
                    Some(t) => {
                        t.tick().await;
                    }
                    None if window > 0 && seq >= window => {
                        let need = (seq - window) * sh.n;
                        while sh.delivered.load(Ordering::Relaxed) < need {
                            sh.wake_at.store(need, Ordering::Relaxed);
                            if sh.delivered.load(Ordering::Relaxed) >= need {
                                break;
                            }
                            let _ = tokio::time::timeout(Duration::from_millis(100), sh.progress.notified()).await;
                        }
                        sh.wake_at.store(u64::MAX, Ordering::Relaxed);
                    }
                    None => {}
                }
                let sent = sh.now_ns();
                if seq == 0 {
                    sh.first_send_ns.store(sent, Ordering::Relaxed);
                }
                let p = payload(seq, sent, size);
                let msg = match kind {
                    k if k.is_switchboard() => format!(r#"{{"type":"call","room":"{ROOM}","event":"pub","data":{p}}}"#),
                    _ => p,
                };
                pwr.text(msg.as_bytes()).await?;
            }
            Ok::<_, io::Error>(pwr)
        }
    };
    let pwr_keep;
    let mut timed_out = false;
    tokio::select! {
        r = publish => {
            pwr_keep = Some(r?);
            if sh.done_subs.load(Ordering::Relaxed) < sh.n
                && tokio::time::timeout_at(deadline, wait_done(&sh)).await.is_err() {
                timed_out = true;
            }
        }
        _ = tokio::time::sleep_until(deadline) => { timed_out = true; pwr_keep = None; }
    }
    let publish_s = t_publish.elapsed().as_secs_f64();
    let server_cpu_s = server.cpu() - server_cpu1;
    let gen_cpu_s = self_cpu() - gen_cpu1;
    let server_peak_rss_kib = procfs::hwm_kib(server.pid).unwrap_or(0);
    perf.stop();
    sh.stopping.store(true, Ordering::Release);
    server.stop().await;
    drop(pwr_keep);
    publisher_reader.abort();
    tasks.abort_all();

    let delivered = sh.delivered.load(Ordering::Relaxed);
    let expected = n as u64 * m;
    let first = sh.first_send_ns.load(Ordering::Relaxed);
    let last = sh.last_delivery_ns.load(Ordering::Relaxed);
    let span = (last.saturating_sub(first)) as f64 / 1e9;
    let mut hist = sh.hists[0].lock().clone();
    for h in &sh.hists[1..] {
        hist.add(&*h.lock()).map_err(io::Error::other)?;
    }
    let latency = Latency {
        p50_us: hist.value_at_quantile(0.50),
        p90_us: hist.value_at_quantile(0.90),
        p99_us: hist.value_at_quantile(0.99),
        max_us: hist.max(),
        mean_us: hist.mean(),
    };
    let per_million = |cpu: f64| if delivered > 0 { cpu / delivered as f64 * 1e6 } else { f64::NAN };
    Ok(RunReport {
        kind: opts.conn.kind,
        subscribers: n,
        messages: m,
        rate: opts.rate,
        payload_bytes: opts.payload,
        window: opts.rate.is_none().then_some(opts.window),
        max_inflight: opts.conn.kind.is_switchboard().then_some(opts.conn.max_inflight).flatten(),
        checked_subscribers: opts.conn.checked.min(n),
        received_message_bytes: sh.frame_len.load(Ordering::Relaxed),
        wire_bytes_per_delivery: match sh.wire_subs.load(Ordering::Relaxed) {
            0 => None,
            subs => Some(sh.wire_bytes.load(Ordering::Relaxed) as f64 / (subs * m) as f64),
        },
        connect_s,
        connects_per_s: n as f64 / connect_s,
        join_s,
        publish_s,
        expected,
        delivered,
        deliveries_per_s: if span > 0.0 { delivered as f64 / span } else { 0.0 },
        lost: expected.saturating_sub(delivered),
        reordered: sh.reordered.load(Ordering::Relaxed),
        publisher_errors: publisher_errors.load(Ordering::Relaxed),
        client_errors: client_errors.load(Ordering::Relaxed),
        timed_out,
        latency,
        server_connect_cpu_s,
        server_cpu_s,
        server_cpu_s_per_million: per_million(server_cpu_s),
        server_cpu_pct_of_core: server_cpu_s / publish_s * 100.0,
        server_rss_connected_kib,
        server_peak_rss_kib,
        generator_cpu_s: gen_cpu_s,
        generator_cpu_s_per_million: per_million(gen_cpu_s),
    })
}

/// Tells the driver whether a connection opened; the connection if it did.
fn report_open<T>(opened: io::Result<T>, ready: &mpsc::UnboundedSender<io::Result<()>>) -> Option<T> {
    let result = opened.map(Some).unwrap_or_else(|e| {
        let _ = ready.send(Err(e));
        None
    });
    if result.is_some() {
        let _ = ready.send(Ok(()));
    }
    result
}

/// Waits for `n` results from the subscribers; the first error ends the run.
/// Waits for `n` tasks to report ready on `rx`; the first error ends it.
pub(crate) async fn wait_all(rx: &mut mpsc::UnboundedReceiver<io::Result<()>>, n: usize, what: &str) -> io::Result<()> {
    let mut left = n;
    while left > 0 {
        match rx.recv().await {
            Some(Ok(())) => left -= 1,
            Some(Err(e)) => return Err(io::Error::other(format!("{what} failed ({} done): {e}", n - left))),
            None => return Err(io::Error::other(format!("{what}: the tasks are gone ({} done)", n - left))),
        }
    }
    Ok(())
}

async fn wait_done(sh: &Shared) {
    loop {
        let notified = sh.all_done.notified();
        if sh.done_subs.load(Ordering::Relaxed) >= sh.n {
            return;
        }
        let _ = tokio::time::timeout(Duration::from_millis(50), notified).await;
    }
}

/// Reads the number after a key in a message (JSON or MessagePack).
type NumberAfter = fn(&[u8], &[u8]) -> Option<u64>;

/// Latency histogram shards ([`Shared::hists`]).
const HIST_SHARDS: usize = 16;

/// A subscriber's receive loop: latency, order, completion.
async fn subscribe(c: &mut Client, sh: &Shared, index: usize, msgpack: bool) -> io::Result<()> {
    let hist = &sh.hists[index % HIST_SHARDS];
    // The payload's fields: JSON, or MessagePack keys (fixstr) before uints.
    let (seq_key, sent_key, number): (&[u8], &[u8], NumberAfter) = if msgpack {
        (b"\xa3seq", b"\xa7sent_ns", client::msgpack_uint_after)
    } else {
        (br#""seq":"#, br#""sent_ns":"#, client::number_after)
    };
    let mut next_seq = 0u64;
    let mut received = 0u64;
    let wire0 = c.wire_bytes();
    loop {
        let got = c
            .next_data(|msg| {
                let seq = number(msg, seq_key)?;
                let sent = number(msg, sent_key)?;
                Some((seq, sent, msg.len()))
            })
            .await?;
        let Some(got) = got else { return Ok(()) };
        let Some((seq, sent, len)) = got else { continue };
        let now = sh.now_ns();
        if received == 0 {
            sh.frame_len.store(len, Ordering::Relaxed);
        }
        if seq >= next_seq {
            // A gap (seq > next_seq) is a loss unless the missing messages
            // arrive later, when they count as reordered.
            next_seq = seq + 1;
        } else {
            sh.reordered.fetch_add(1, Ordering::Relaxed);
        }
        received += 1;
        hist.lock().saturating_record(now.saturating_sub(sent) / 1000);
        sh.last_delivery_ns.fetch_max(now, Ordering::Relaxed);
        let d = sh.delivered.fetch_add(1, Ordering::Relaxed) + 1;
        if d >= sh.wake_at.load(Ordering::Relaxed) {
            sh.progress.notify_one();
        }
        if received == sh.m {
            if let (Some(w0), Some(w1)) = (wire0, c.wire_bytes()) {
                sh.wire_bytes.fetch_add(w1 - w0, Ordering::Relaxed);
                sh.wire_subs.fetch_add(1, Ordering::Relaxed);
            }
            if sh.done_subs.fetch_add(1, Ordering::Relaxed) + 1 == sh.n {
                sh.all_done.notify_one();
            }
        }
    }
}

/// `load idle` options.
#[derive(Debug, Clone)]
pub struct IdleOpts {
    pub conn: ConnOpts,
    pub connections: usize,
    pub seconds: f64,
}

/// Result of one `idle` run.
#[derive(Debug, Clone, Serialize)]
pub struct IdleReport {
    pub kind: Kind,
    pub connections: usize,
    pub seconds: f64,
    pub heartbeat_ms: Option<u64>,
    pub connect_s: f64,
    pub server_rss_before_kib: u64,
    pub server_rss_connected_kib: u64,
    pub server_rss_after_kib: u64,
    pub rss_per_connection_bytes: f64,
    /// Live heap the server holds per connection once connected (its
    /// counting allocator, see `heap.rs`): bytes asked for, and blocks.
    pub heap_per_connection_bytes: f64,
    pub heap_blocks_per_connection: f64,
    pub server_cpu_idle_s: f64,
    pub server_cpu_pct_of_core: f64,
    /// `server_cpu_pct_of_core` scaled to a 25 s heartbeat interval.
    pub server_cpu_pct_at_25s: Option<f64>,
    pub pings_received: u64,
    pub server_cpu_us_per_ping: f64,
    pub generator_cpu_s: f64,
}

/// What an idle hold read off the server and itself; [`IdleReport::new`]
/// derives the rest.
pub struct IdleReadings {
    pub seconds: f64,
    pub connect_s: f64,
    /// Server RSS before connecting, once connected, after the hold.
    pub rss_kib: [u64; 3],
    /// Live heap per connection (bytes, blocks); NaN where not asked.
    pub heap_per_connection: (f64, f64),
    pub server_cpu_s: f64,
    pub generator_cpu_s: f64,
    pub pings_received: u64,
}

impl IdleReport {
    pub fn new(opts: &IdleOpts, connections: usize, r: IdleReadings) -> IdleReport {
        let [before, connected, after] = r.rss_kib;
        let pct = r.server_cpu_s / r.seconds * 100.0;
        IdleReport {
            kind: opts.conn.kind,
            connections,
            seconds: r.seconds,
            heartbeat_ms: opts.conn.heartbeat_ms,
            connect_s: r.connect_s,
            server_rss_before_kib: before,
            server_rss_connected_kib: connected,
            server_rss_after_kib: after,
            rss_per_connection_bytes: (after as f64 - before as f64) * 1024.0 / connections as f64,
            heap_per_connection_bytes: r.heap_per_connection.0,
            heap_blocks_per_connection: r.heap_per_connection.1,
            server_cpu_idle_s: r.server_cpu_s,
            server_cpu_pct_of_core: pct,
            server_cpu_pct_at_25s: opts.conn.heartbeat_ms.map(|h| pct * h as f64 / 25_000.0),
            pings_received: r.pings_received,
            server_cpu_us_per_ping: if r.pings_received > 0 {
                r.server_cpu_s / r.pings_received as f64 * 1e6
            } else {
                f64::NAN
            },
            generator_cpu_s: r.generator_cpu_s,
        }
    }
}

/// Holds N connections for T seconds.
pub async fn idle(opts: &IdleOpts) -> io::Result<IdleReport> {
    let n = opts.connections;
    procfs::raise_nofile(n as u64 + 256);
    let mut server = ServerProc::spawn(&opts.conn).await?;
    let addr = server.addr;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss_before = procfs::rss_kib(server.pid).unwrap_or(0);
    let heap_before = server.heap().await?;
    let pings = Arc::new(AtomicU64::new(0));
    let (ready_tx, mut ready_rx) = mpsc::unbounded_channel::<io::Result<()>>();
    let sem = Arc::new(Semaphore::new(opts.conn.concurrency.max(1)));
    let t = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let (conn, sem, ready, pings) = (opts.conn.clone(), sem.clone(), ready_tx.clone(), pings.clone());
        tasks.spawn(async move {
            let permit = sem.acquire_owned().await;
            if conn.kind.sse() {
                let opened = open_sse(addr, &conn, i).await;
                drop(permit);
                let Some(mut c) = report_open(opened, &ready) else { return };
                // Read forever, counting the heartbeat comments.
                while let Ok(Some(ping)) = c.next_data(|ev| ev.starts_with(b": ping")).await {
                    if ping {
                        pings.fetch_add(1, Ordering::Relaxed);
                    }
                }
                return;
            }
            let opened = async {
                let mut c = Lean::handshake(
                    client::tcp(addr, source_ip(i, conn.source_ips)).await?,
                    addr,
                    i as u32,
                    conn.kind.subprotocol(),
                )
                .await?;
                c.next_data(|_| ()).await?.ok_or_else(|| io::Error::other("closed before the first message"))?;
                let mut c = Client::Lean(Box::new(c));
                if conn.kind.is_switchboard() {
                    join(&mut c, conn.kind.msgpack()).await?;
                }
                Ok::<_, io::Error>(c)
            }
            .await;
            drop(permit);
            let Some(Client::Lean(mut c)) = report_open(opened, &ready) else { return };
            // Read forever: answer pings, count them.
            while let Ok(Some((op, r))) = c.rd.frame().await {
                match op {
                    client::OP_PING => {
                        pings.fetch_add(1, Ordering::Relaxed);
                        let p = c.rd.data(r).to_vec();
                        if c.wr.send(client::OP_PONG, &p).await.is_err() {
                            return;
                        }
                    }
                    client::OP_CLOSE => return,
                    _ => {}
                }
            }
        });
    }
    drop(ready_tx);
    wait_all(&mut ready_rx, n, "connect").await?;
    let connect_s = t.elapsed().as_secs_f64();
    // Let the last handshakes' transient allocations settle.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_connected = procfs::rss_kib(server.pid).unwrap_or(0);
    let heap = server.heap().await?;
    let cpu0 = server.cpu();
    let gen0 = self_cpu();
    let pings0 = pings.load(Ordering::Relaxed);
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(opts.seconds)).await;
    let secs = t0.elapsed().as_secs_f64();
    let cpu = server.cpu() - cpu0;
    let gen = self_cpu() - gen0;
    let pings_received = pings.load(Ordering::Relaxed) - pings0;
    let rss_after = procfs::rss_kib(server.pid).unwrap_or(0);
    server.stop().await;
    tasks.abort_all();
    let readings = IdleReadings {
        seconds: secs,
        connect_s,
        rss_kib: [rss_before, rss_connected, rss_after],
        heap_per_connection: heap.per_connection(&heap_before, n),
        server_cpu_s: cpu,
        generator_cpu_s: gen,
        pings_received,
    };
    Ok(IdleReport::new(opts, n, readings))
}
