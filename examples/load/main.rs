//! End-to-end load tool: switchboard against a raw tokio-tungstenite
//! broadcast server, as separate processes on loopback.
//!
//! ```text
//! cargo run --release --example load -- smoke
//! cargo run --release --example load -- run --kind switchboard --subscribers 1000 --messages 2000
//! cargo run --release --example load -- compare --subscribers 1000 --messages 2000 --runs 3
//! cargo run --release --example load -- compare --subscribers 1000 --messages 2000 --window 0
//! cargo run --release --example load -- compare --subscribers 8000 --messages 500 --rate 50
//! cargo run --release --example load -- idle --kind switchboard --connections 8000 --seconds 20 --heartbeat-ms 1000
//! cargo run --release --example load -- compare-idle --connections 8000 --seconds 20
//! cargo run --release --example load --all-features -- idle --kind switchboard --listener axum-tls --connections 2000 --seconds 20
//! cargo run --release --example load --all-features -- compare --kinds raw-sse,sb-sse,sb-sse-v2 --subscribers 1000 --messages 2000
//! cargo run --release --example load -- server --kind raw --addr 127.0.0.1:9000
//! cargo run --release --example load --features client -- storm --clients 1000
//! ```
//!
//! Every run starts a fresh server (`load server`, this same binary) as a
//! child process, opens the connections from this process, and reads the
//! server's CPU time and memory from `/proc`. Server and generator share the
//! machine's cores, so absolute figures depend on the machine and on what
//! else runs; the ratios between kinds measured in one `compare` are the
//! figures to read. See `docs/performance.md`.

mod attack;
mod bench;
mod client;
mod heap;
#[cfg(feature = "client")]
mod presence_storm;
mod procfs;
mod server;
#[cfg(feature = "client")]
mod soak;
#[cfg(all(feature = "client", feature = "redis"))]
mod soak_redis;
#[cfg(feature = "client")]
mod storm;
#[cfg(all(feature = "axum", feature = "tls"))]
mod tls;
#[cfg(feature = "client")]
mod trend;

use bench::{ConnOpts, IdleOpts, IdleReport, RunOpts, RunReport};
use serde::Serialize;
use server::{Kind, Listener, ServerOpts};
use std::collections::HashMap;
use std::process::ExitCode;
use std::time::Duration;

/// Counts the live heap (`load idle`'s heap per connection, from the
/// server child); a few shared atomic adds per allocation, so only in
/// builds with `RUSTFLAGS="--cfg load_heap"` (see `heap.rs`).
#[cfg(load_heap)]
#[global_allocator]
static ALLOC: &stats_alloc::StatsAlloc<std::alloc::System> = &stats_alloc::INSTRUMENTED_SYSTEM;

const USAGE: &str = "\
usage: load <command> [options]

commands:
  server   --kind K [--addr 127.0.0.1:0] [--heartbeat-ms N] [--max-inflight N] [--threads N]
  run      --kind K --subscribers N --messages M [--rate R] [--payload 100] [--json out.json]
  idle     --kind K --connections N --seconds T [--heartbeat-ms 1000] [--json out.json]
           [--listener standalone|axum|axum-tls] (switchboard on the standalone listener, or on
           integration::axum::serve over ws:// or wss://: a certificate made at run time, features `axum`, `tls`)
           (RSS per connection, and the server's live heap per connection from its counting allocator:
           bytes asked for and blocks; only in builds with RUSTFLAGS='--cfg load_heap', NaN otherwise)
  compare  --subscribers N --messages M [--rate R] [--runs 3] [--kinds raw,switchboard,raw-padded] [--json out.json]
           (runs interleaved, a fresh server each; prints medians and two sets of ratios: switchboard
           against raw at equal payload, `what a user gets`, and against raw-padded at equal bytes,
           `what the machinery costs`)
  compare-idle --connections N --seconds T [--heartbeat-ms 1000] [--runs 1] [--kinds raw,switchboard] [--json out.json]
  smoke    (200 subscribers x 200 messages flat out per kind, the SSE kinds too when built with `sse` and
           `axum`; fails on any loss or reordering)
  sizes    (bytes of the per-connection task futures each server spawns; what idle RSS is made of)
  attack   --mode tabs|history|churn|fanout|pings|fragments|heads [--seconds S] [--max-p99-ms 250]
           (issue 24: attacks on the chat example with a bystander; see examples/load/attack.rs)
  storm    --clients N [--rooms N/50] [--rate 2] [--cut restart,sockets] [--hint on|off] [--timeout 180]
           [--conn-rate N [--conn-burst N]]
           (issue 18, feature `client`: N Rust clients in recoverable rooms, every connection cut at
           once; time to recover, sheds, peaks, loss and duplicates; see examples/load/storm.rs)
  storm    --presence on --clients N [--timeout 180]
           (issue 18: N members of one presence room all closed at once and back; presence messages
           and bytes per member a watcher gets, no stale member; see examples/load/presence_storm.rs)
  soak     --minutes M [--listeners 40] [--rooms 8] [--rate 20] [--churners 32] [--interval 10]
           [--rss-slack 10] [--max-slope 128] (issue 18, feature `client`: churn with live traffic;
           every interval RSS, tasks, rooms, connections; fails on loss, duplicates, leftovers, RSS
           above the baseline by more than the slack + 8 MiB, or, in runs of 10 min or more, an RSS
           slope above --max-slope KiB/min after the first 2 min; see examples/load/soak.rs)
  soak     --redis on --minutes M [--redis-restart 120] [--redis-down 1] [--slow 4] [--slow-stall 60]
           [--slow-read 20] [--busy-rate 50] [--busy-kib 16] [--queue-kib 256] [--presence-ttl 6] and
           the options above (feature `redis` too: two hubs over a private redis-server, SIGKILLed and
           restarted every --redis-restart s; slow consumers reading --slow-read messages/s that the
           hubs must close and that must get the 4000 frame; fails on loss, duplicates, leftovers on
           either hub or in Redis; see examples/load/soak_redis.rs)

kinds: raw, raw-padded, raw-select, and switchboard with its subscribers on switchboard.v1.json
(`switchboard`), switchboard.v2.json (`sb-v2`), switchboard.v1.msgpack (`sb-msgpack`),
switchboard.v2.msgpack (`sb-v2-msgpack`); Server-Sent Events (features `sse` and `axum`): `raw-sse`, a minimal
hyper server writing each message as one `data:` event to every stream, `sb-sse`, the hub's SSE transport
(streams join the room from the query), and `sb-sse-v2`, the same with `protocol=switchboard.v2.json` (compact
unnamed events); their subscribers read `text/event-stream`, the publisher is the same WebSocket client as for
the other kinds. `compare --kinds raw-sse,sb-sse,sb-sse-v2` gives the sb kinds' ratios to raw-sse

generator options (run, idle, compare, compare-idle):
  --source-ips N     spread connections over 127.0.0.2 .. 127.0.0.(N+1) (default 4; 0 = no bind)
  --concurrency N    connection attempts in flight (default 64)
  --checked N        subscribers using a full tokio-tungstenite client (default 8)
  --window N         flat out: messages the publisher may run ahead of the subscribers (default 64;
                     0 = an unpaced burst: every message written at once)
  --pad-to BYTES     raw-padded: frame payload size subscribers receive (default: in `compare`, what
                     switchboard's subscribers received in the latest run; else switchboard's envelope
                     size around --payload)
  --timeout S        give up waiting for deliveries after S seconds
  --gen-threads N    generator runtime threads (default 2; 1 = a current-thread runtime)
  --perf \"ARGS\"     run: attach `perf ARGS -p <server pid>` while publishing (e.g. \"record -g -o sb.data\")
  --max-inflight N   switchboard server's HubConfig::max_inflight (default 256, with --window 0 the
                     number of messages; the hub's default is 16)
  --server-threads N server runtime worker threads (default: tokio's, one per CPU; 0 = current-thread runtime)
";

/// `--key value` options after the command.
struct Args {
    cmd: String,
    flags: HashMap<String, String>,
}

impl Args {
    fn parse() -> Result<Args, String> {
        let mut it = std::env::args().skip(1);
        let cmd = it.next().ok_or("no command")?;
        let mut flags = HashMap::new();
        while let Some(k) = it.next() {
            let key = k.strip_prefix("--").ok_or_else(|| format!("unexpected argument `{k}`"))?.to_owned();
            let value = it.next().ok_or_else(|| format!("`--{key}` needs a value"))?;
            flags.insert(key, value);
        }
        Ok(Args { cmd, flags })
    }

    fn get<T: std::str::FromStr>(&self, key: &str) -> Result<Option<T>, String> {
        self.flags.get(key).map(|v| v.parse::<T>().map_err(|_| format!("bad value `{v}` for --{key}"))).transpose()
    }

    fn or<T: std::str::FromStr>(&self, key: &str, default: T) -> Result<T, String> {
        Ok(self.get(key)?.unwrap_or(default))
    }

    fn need<T: std::str::FromStr>(&self, key: &str) -> Result<T, String> {
        self.get(key)?.ok_or_else(|| format!("--{key} is required"))
    }

    fn kind(&self) -> Result<Kind, String> {
        let k: String = self.need("kind")?;
        Kind::parse(&k).ok_or_else(|| format!("unknown kind `{k}`"))
    }

    fn kinds(&self, default: &str) -> Result<Vec<Kind>, String> {
        let list: String = self.or("kinds", default.to_owned())?;
        list.split(',').map(|k| Kind::parse(k.trim()).ok_or_else(|| format!("unknown kind `{k}`"))).collect()
    }

    fn conn(&self, kind: Kind, default_heartbeat: Option<u64>) -> Result<ConnOpts, String> {
        Ok(ConnOpts {
            kind,
            source_ips: self.or("source-ips", 4)?,
            concurrency: self.or("concurrency", 64)?,
            checked: self.or("checked", 8)?,
            heartbeat_ms: self.get("heartbeat-ms")?.or(default_heartbeat),
            // A flat-out publisher pipelines up to `--window` calls, an
            // unpaced one all of them; the hub's default bound (16) would
            // refuse the excess with 429 (see docs).
            max_inflight: Some(match self.get("max-inflight")? {
                Some(n) => n,
                None if self.get::<u64>("window")? == Some(0) => 256.max(self.or("messages", 0)?),
                None => 256,
            }),
            server_threads: self.get("server-threads")?,
        })
    }

    fn run_opts(&self, kind: Kind) -> Result<RunOpts, String> {
        Ok(RunOpts {
            conn: self.conn(kind, None)?,
            subscribers: self.need("subscribers")?,
            messages: self.need("messages")?,
            rate: self.get("rate")?,
            payload: self.or("payload", 100)?,
            window: self.or("window", 64)?,
            pad_to: self.get("pad-to")?,
            timeout: self.get::<f64>("timeout")?.map(Duration::from_secs_f64),
            perf: self.get("perf")?,
        })
    }

    fn listener(&self) -> Result<Listener, String> {
        let l: String = self.or("listener", "standalone".to_owned())?;
        Listener::parse(&l).ok_or_else(|| format!("unknown listener `{l}` (standalone, axum, axum-tls)"))
    }

    fn idle_opts(&self, kind: Kind) -> Result<IdleOpts, String> {
        Ok(IdleOpts {
            conn: self.conn(kind, Some(1000))?,
            connections: self.need("connections")?,
            seconds: self.need("seconds")?,
        })
    }
}

fn main() -> ExitCode {
    if std::env::args().skip(1).any(|a| a == "-h" || a == "--help") {
        println!("load: measures switchboard against raw WebSocket servers (throughput, latency, memory)\n\n{USAGE}");
        return ExitCode::SUCCESS;
    }
    let args = match Args::parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("load: {e}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    // `RUST_LOG=switchboard::hub=debug load storm …` and the like: the
    // crate's own diagnostics, on stderr (the tool's report is stdout).
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    match dispatch(&args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("load: {e}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(args: &Args) -> Result<ExitCode, String> {
    if args.cmd == "server" {
        heap::serve_stdin();
        let opts = ServerOpts {
            kind: args.kind()?,
            addr: args.or("addr", "127.0.0.1:0".parse().expect("address"))?,
            heartbeat: args.get::<u64>("heartbeat-ms")?.map(Duration::from_millis),
            max_inflight: args.get("max-inflight")?,
            listener: args.listener()?,
            tls_dir: args.get("tls-dir")?,
        };
        let rt = match args.get::<usize>("threads")? {
            Some(0) => tokio::runtime::Builder::new_current_thread().enable_all().build(),
            Some(n) => tokio::runtime::Builder::new_multi_thread().worker_threads(n).enable_all().build(),
            None => tokio::runtime::Builder::new_multi_thread().enable_all().build(),
        }
        .map_err(|e| e.to_string())?;
        rt.block_on(server::run(opts)).map_err(|e| e.to_string())?;
        return Ok(ExitCode::SUCCESS);
    }
    let threads: usize = args.or("gen-threads", 2)?;
    let rt = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    } else {
        tokio::runtime::Builder::new_multi_thread().worker_threads(threads).enable_all().build()
    }
    .map_err(|e| e.to_string())?;
    rt.block_on(async {
        match args.cmd.as_str() {
            "run" => cmd_run(args).await,
            "idle" => cmd_idle(args).await,
            "compare" => cmd_compare(args).await,
            "compare-idle" => cmd_compare_idle(args).await,
            "smoke" => cmd_smoke(args).await,
            "sizes" => cmd_sizes().await,
            "attack" => attack::cmd(args).await,
            #[cfg(feature = "client")]
            "storm" if args.or("presence", "off".to_string())? == "on" => presence_storm::cmd(args).await,
            #[cfg(feature = "client")]
            "storm" => storm::cmd(args).await,
            #[cfg(feature = "client")]
            "soak" => soak::cmd(args).await,
            #[cfg(not(feature = "client"))]
            "soak" => Err("`load soak` needs the `client` feature".into()),
            #[cfg(not(feature = "client"))]
            "storm" => Err("`load storm` needs the `client` feature: cargo run --release --example load --features client -- storm".into()),
            other => Err(format!("unknown command `{other}`\n\n{USAGE}")),
        }
    })
}

#[derive(Serialize)]
struct Output<'a, R, S> {
    command: String,
    machine: procfs::Machine,
    note: &'static str,
    runs: &'a [R],
    #[serde(skip_serializing_if = "Option::is_none")]
    summary: Option<S>,
}

const NOTE: &str = "server and load generator are separate processes on loopback sharing the same cores; \
                    absolute figures are noisy, ratios between kinds measured in one session are the figures to read";

fn write_json<R: Serialize, S: Serialize>(args: &Args, runs: &[R], summary: Option<S>) -> Result<(), String> {
    let Some(path) = args.get::<String>("json")? else { return Ok(()) };
    let out = Output {
        command: std::env::args().skip(1).collect::<Vec<_>>().join(" "),
        machine: procfs::machine(),
        note: NOTE,
        runs,
        summary,
    };
    let text = serde_json::to_string_pretty(&out).map_err(|e| e.to_string())?;
    std::fs::write(&path, text + "\n").map_err(|e| format!("{path}: {e}"))?;
    eprintln!("load: wrote {path}");
    Ok(())
}

fn print_machine() {
    let m = procfs::machine();
    println!(
        "machine: {} CPUs ({}), {} MiB RAM, kernel {}, open files {}/{}; server and generator share these CPUs",
        m.nproc, m.cpu_model, m.mem_total_mib, m.kernel, m.nofile_soft, m.nofile_hard
    );
}

async fn cmd_run(args: &Args) -> Result<ExitCode, String> {
    let opts = args.run_opts(args.kind()?)?;
    print_machine();
    let r = bench::run(&opts).await.map_err(|e| e.to_string())?;
    print_runs(std::slice::from_ref(&r));
    write_json::<_, ()>(args, std::slice::from_ref(&r), None)?;
    Ok(if r.clean() && !r.timed_out { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

async fn cmd_idle(args: &Args) -> Result<ExitCode, String> {
    let opts = args.idle_opts(args.kind()?)?;
    print_machine();
    let r = match args.listener()? {
        Listener::Standalone => bench::idle(&opts).await,
        #[cfg(all(feature = "axum", feature = "tls"))]
        l if opts.conn.kind == Kind::Switchboard => {
            println!(
                "switchboard on integration::axum::serve, {}",
                if l == Listener::AxumTls { "wss://" } else { "ws://" }
            );
            tls::idle(&opts, l).await
        }
        _ => return Err("--listener axum|axum-tls: --kind switchboard, features `axum` and `tls`".into()),
    }
    .map_err(|e| e.to_string())?;
    print_idle(std::slice::from_ref(&r));
    write_json::<_, ()>(args, std::slice::from_ref(&r), None)?;
    Ok(ExitCode::SUCCESS)
}

async fn cmd_smoke(args: &Args) -> Result<ExitCode, String> {
    print_machine();
    let mut reports = Vec::new();
    // The SSE kinds too when built with them (CI's default features are not).
    let kinds = if cfg!(all(feature = "sse", feature = "axum")) {
        "switchboard,raw,raw-select,raw-sse,sb-sse,sb-sse-v2"
    } else {
        "switchboard,raw,raw-select"
    };
    for kind in args.kinds(kinds)? {
        let opts = RunOpts {
            conn: args.conn(kind, None)?,
            subscribers: args.or("subscribers", 200)?,
            messages: args.or("messages", 200)?,
            rate: None,
            payload: 100,
            window: args.or("window", 64)?,
            pad_to: None,
            timeout: Some(Duration::from_secs(args.or("timeout", 5)?)),
            perf: None,
        };
        reports.push(bench::run(&opts).await.map_err(|e| format!("{}: {e}", kind.name()))?);
    }
    print_runs(&reports);
    write_json::<_, ()>(args, &reports, None)?;
    let bad: Vec<&RunReport> = reports.iter().filter(|r| !r.clean() || r.timed_out).collect();
    for r in &bad {
        eprintln!(
            "load smoke: {} lost {} reordered {} publisher errors {} client errors {}{}",
            r.kind.name(),
            r.lost,
            r.reordered,
            r.publisher_errors,
            r.client_errors,
            if r.timed_out { " (timed out)" } else { "" }
        );
    }
    Ok(if bad.is_empty() {
        println!("smoke: ok");
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Medians of one kind's runs.
#[derive(Debug, Clone, Serialize)]
struct RunMedian {
    kind: Kind,
    runs: usize,
    connects_per_s: f64,
    deliveries_per_s: f64,
    /// Deliveries/s times the bytes a subscriber receives per message.
    bytes_per_s: f64,
    /// The bytes a subscriber receives per message (latest run).
    message_bytes: usize,
    /// SSE: bytes read from the socket per delivery, chunk framing included.
    wire_bytes_per_delivery: Option<f64>,
    lost_total: u64,
    reordered_total: u64,
    publisher_errors_total: u64,
    p50_us: f64,
    p90_us: f64,
    p99_us: f64,
    max_us: f64,
    server_cpu_s_per_million: f64,
    server_peak_rss_kib: f64,
    generator_cpu_s_per_million: f64,
}

#[derive(Debug, Clone, Serialize)]
struct Ratios {
    kind: Kind,
    /// The kind the figures are divided by (`raw` or `raw-padded`).
    base: Kind,
    /// Higher is better for `kind`: its figure over the base's.
    deliveries_per_s: f64,
    bytes_per_s: f64,
    connects_per_s: f64,
    /// Lower is better: its figure over the base's.
    p50: f64,
    p99: f64,
    server_cpu_per_delivery: f64,
    server_peak_rss: f64,
}

impl Ratios {
    fn of(m: &RunMedian, base: &RunMedian) -> Ratios {
        Ratios {
            kind: m.kind,
            base: base.kind,
            deliveries_per_s: m.deliveries_per_s / base.deliveries_per_s,
            bytes_per_s: m.bytes_per_s / base.bytes_per_s,
            connects_per_s: m.connects_per_s / base.connects_per_s,
            p50: m.p50_us / base.p50_us,
            p99: m.p99_us / base.p99_us,
            server_cpu_per_delivery: m.server_cpu_s_per_million / base.server_cpu_s_per_million,
            server_peak_rss: m.server_peak_rss_kib / base.server_peak_rss_kib,
        }
    }
}

#[derive(Serialize)]
struct CompareSummary {
    medians: Vec<RunMedian>,
    /// Every other kind against `raw` (SSE kinds against `raw-sse`): equal
    /// payload ("what a user gets").
    ratios_to_raw: Vec<Ratios>,
    /// Switchboard against `raw-padded`: equal bytes on the wire ("what the
    /// machinery costs").
    ratios_to_raw_padded: Vec<Ratios>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| !x.is_nan());
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn run_median(kind: Kind, reports: &[RunReport]) -> RunMedian {
    let rs: Vec<&RunReport> = reports.iter().filter(|r| r.kind == kind).collect();
    let med = |f: &dyn Fn(&RunReport) -> f64| median(rs.iter().map(|r| f(r)).collect());
    RunMedian {
        kind,
        runs: rs.len(),
        connects_per_s: med(&|r| r.connects_per_s),
        deliveries_per_s: med(&|r| r.deliveries_per_s),
        bytes_per_s: med(&|r| r.deliveries_per_s * r.received_message_bytes as f64),
        message_bytes: rs.last().map_or(0, |r| r.received_message_bytes),
        wire_bytes_per_delivery: Some(median(rs.iter().filter_map(|r| r.wire_bytes_per_delivery).collect()))
            .filter(|w| !w.is_nan()),
        lost_total: rs.iter().map(|r| r.lost).sum(),
        reordered_total: rs.iter().map(|r| r.reordered).sum(),
        publisher_errors_total: rs.iter().map(|r| r.publisher_errors).sum(),
        p50_us: med(&|r| r.latency.p50_us as f64),
        p90_us: med(&|r| r.latency.p90_us as f64),
        p99_us: med(&|r| r.latency.p99_us as f64),
        max_us: med(&|r| r.latency.max_us as f64),
        server_cpu_s_per_million: med(&|r| r.server_cpu_s_per_million),
        server_peak_rss_kib: med(&|r| r.server_peak_rss_kib as f64),
        generator_cpu_s_per_million: med(&|r| r.generator_cpu_s_per_million),
    }
}

async fn cmd_compare(args: &Args) -> Result<ExitCode, String> {
    let kinds = args.kinds("raw,switchboard,raw-padded")?;
    // `raw-padded` is padded to what the first switchboard kind's
    // subscribers receive, and compared with it.
    let first_sb = kinds.iter().copied().find(|k| k.is_switchboard());
    let runs: usize = args.or("runs", 3)?;
    print_machine();
    let mut reports: Vec<RunReport> = Vec::new();
    for i in 0..runs {
        for &kind in &kinds {
            let mut opts = args.run_opts(kind)?;
            if kind == Kind::RawPadded && opts.pad_to.is_none() {
                // Equal bytes: what switchboard's subscribers received in
                // the latest run (the envelope as the server wrote it).
                opts.pad_to = reports
                    .iter()
                    .rev()
                    .find(|r| Some(r.kind) == first_sb && r.received_message_bytes > 0)
                    .map(|r| r.received_message_bytes);
            }
            eprintln!("load: run {}/{runs} {}", i + 1, kind.name());
            let r = bench::run(&opts).await.map_err(|e| format!("{}: {e}", kind.name()))?;
            print_runs(std::slice::from_ref(&r));
            reports.push(r);
        }
    }
    println!("\nall runs:");
    print_runs(&reports);
    let medians: Vec<RunMedian> = kinds.iter().map(|&kind| run_median(kind, &reports)).collect();
    println!("\nmedians of {runs} run(s):");
    println!(
        "{:<12} {:>6} {:>7} {:>10} {:>11} {:>8} {:>6} {:>6} {:>5} {:>8} {:>8} {:>8} {:>8} {:>11} {:>9} {:>11}",
        "kind",
        "bytes",
        "wire B",
        "connect/s",
        "deliv/s",
        "MB/s",
        "lost",
        "reord",
        "perr",
        "p50 us",
        "p90 us",
        "p99 us",
        "max us",
        "srv s/Mdel",
        "srv MiB",
        "gen s/Mdel"
    );
    for m in &medians {
        println!(
            "{:<12} {:>6} {:>7} {:>10.0} {:>11.0} {:>8.1} {:>6} {:>6} {:>5} {:>8.0} {:>8.0} {:>8.0} {:>8.0} {:>11.3} {:>9.1} {:>11.3}",
            m.kind.name(),
            m.message_bytes,
            m.wire_bytes_per_delivery.map_or("-".into(), |w| format!("{w:.1}")),
            m.connects_per_s,
            m.deliveries_per_s,
            m.bytes_per_s / 1e6,
            m.lost_total,
            m.reordered_total,
            m.publisher_errors_total,
            m.p50_us,
            m.p90_us,
            m.p99_us,
            m.max_us,
            m.server_cpu_s_per_million,
            m.server_peak_rss_kib / 1024.0,
            m.generator_cpu_s_per_million
        );
    }
    let find = |k: Kind| medians.iter().find(|m| m.kind == k);
    // WebSocket kinds against raw, SSE kinds against raw-sse.
    let mut to_raw = Vec::new();
    for (base_kind, title) in [
        (Kind::Raw, "what a user gets: equal payload, ratios to raw"),
        (Kind::RawSse, "SSE, what a user gets: equal payload, ratios to raw-sse"),
    ] {
        let Some(base) = find(base_kind) else { continue };
        let others: Vec<&RunMedian> =
            medians.iter().filter(|m| m.kind != base_kind && m.kind.sse() == base_kind.sse()).collect();
        if !others.is_empty() {
            to_raw.extend(print_ratios(title, base, &others));
        }
    }
    let mut to_padded = Vec::new();
    if let (Some(padded), Some(sb)) = (find(Kind::RawPadded), first_sb.and_then(find)) {
        to_padded = print_ratios("what the machinery costs: equal bytes, ratios to raw-padded", padded, &[sb]);
    }
    let clean = reports.iter().all(|r| r.clean() && !r.timed_out);
    let summary = CompareSummary { medians, ratios_to_raw: to_raw, ratios_to_raw_padded: to_padded };
    write_json(args, &reports, Some(summary))?;
    Ok(if clean { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// Prints (and returns) each of `others` divided by `base`.
fn print_ratios(title: &str, base: &RunMedian, others: &[&RunMedian]) -> Vec<Ratios> {
    println!("\n{title} (deliv/s and connect/s: higher is better; latency, CPU, RSS: lower is better):");
    println!(
        "{:<12} {:>8} {:>8} {:>10} {:>8} {:>8} {:>12} {:>8}",
        "kind", "deliv/s", "bytes/s", "connect/s", "p50", "p99", "cpu/deliv", "rss"
    );
    others
        .iter()
        .map(|m| {
            let r = Ratios::of(m, base);
            println!(
                "{:<12} {:>7.2}x {:>7.2}x {:>9.2}x {:>7.2}x {:>7.2}x {:>11.2}x {:>7.2}x",
                m.kind.name(),
                r.deliveries_per_s,
                r.bytes_per_s,
                r.connects_per_s,
                r.p50,
                r.p99,
                r.server_cpu_per_delivery,
                r.server_peak_rss
            );
            r
        })
        .collect()
}

async fn cmd_compare_idle(args: &Args) -> Result<ExitCode, String> {
    let kinds = args.kinds("raw,switchboard")?;
    let runs: usize = args.or("runs", 1)?;
    print_machine();
    let mut reports: Vec<IdleReport> = Vec::new();
    for i in 0..runs {
        for &kind in &kinds {
            eprintln!("load: idle run {}/{runs} {}", i + 1, kind.name());
            let r = bench::idle(&args.idle_opts(kind)?).await.map_err(|e| format!("{}: {e}", kind.name()))?;
            print_idle(std::slice::from_ref(&r));
            reports.push(r);
        }
    }
    println!("\nall runs:");
    print_idle(&reports);
    let mut summary = Vec::new();
    // WebSocket kinds against raw, SSE kinds against raw-sse.
    let base = |kind: Kind| if kind.sse() { Kind::RawSse } else { Kind::Raw };
    let base_median = |kind: Kind, f: fn(&IdleReport) -> f64| {
        median(reports.iter().filter(|r| r.kind == base(kind)).map(f).collect())
    };
    println!("\nmedians (x raw: against raw-sse for the SSE kinds):");
    println!(
        "{:<12} {:>12} {:>10} {:>12} {:>10} {:>10}",
        "kind", "B/conn", "x raw", "cpu % core", "x raw", "% at 25 s"
    );
    for &kind in &kinds {
        let rs: Vec<&IdleReport> = reports.iter().filter(|r| r.kind == kind).collect();
        let rss = median(rs.iter().map(|r| r.rss_per_connection_bytes).collect());
        let cpu = median(rs.iter().map(|r| r.server_cpu_pct_of_core).collect());
        let at25 = median(rs.iter().filter_map(|r| r.server_cpu_pct_at_25s).collect());
        let raw_rss = base_median(kind, |r| r.rss_per_connection_bytes);
        let raw_cpu = base_median(kind, |r| r.server_cpu_pct_of_core);
        println!(
            "{:<12} {:>12.0} {:>9.2}x {:>12.2} {:>9.2}x {:>10.3}",
            kind.name(),
            rss,
            rss / raw_rss,
            cpu,
            cpu / raw_cpu,
            at25
        );
        summary.push(serde_json::json!({
            "kind": kind, "base": base(kind), "rss_per_connection_bytes": rss, "rss_ratio_to_raw": rss / raw_rss,
            "server_cpu_pct_of_core": cpu, "cpu_ratio_to_raw": cpu / raw_cpu, "server_cpu_pct_at_25s": at25,
        }));
    }
    write_json(args, &reports, Some(summary))?;
    Ok(ExitCode::SUCCESS)
}

async fn cmd_sizes() -> Result<ExitCode, String> {
    let e = |e: std::io::Error| e.to_string();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.map_err(e)?;
    let addr = listener.local_addr().map_err(e)?;
    let hub = switchboard::Hub::builder().build();
    let config = switchboard::transport::ws::WsConfig::default();
    let stream = tokio::net::TcpStream::connect(addr).await.map_err(e)?;
    let accept = switchboard::integration::ws::accept(stream, addr, &hub, &config);
    println!(
        "switchboard: integration::ws::accept future (the handshake task, freed once upgraded): {} bytes",
        std::mem::size_of_val(&accept)
    );
    drop(accept);
    // A real upgrade, for the session task's size with the WebSocket
    // transport: after the handshake `ws::serve` runs it on a task of its own.
    drop(listener);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.map_err(e)?;
    let addr = listener.local_addr().map_err(e)?;
    let upgrade = tokio::spawn(async move {
        let (socket, peer) = listener.accept().await?;
        switchboard::transport::ws::upgrade(socket, peer, &switchboard::transport::ws::WsConfig::default(), 65536).await
    });
    let socket = tokio::net::TcpStream::connect(addr).await.map_err(e)?;
    let (_client, _) =
        tokio_tungstenite::client_async(format!("ws://{addr}/"), socket).await.map_err(|e| e.to_string())?;
    let (transport, handshake) = upgrade.await.map_err(|e| e.to_string())?.map_err(e)?.ok_or("upgrade refused")?;
    let serve = hub.serve(transport, &handshake, switchboard::Identity::anonymous());
    println!(
        "switchboard: Hub::serve future (the session task of a connection, WebSocket): {} bytes",
        std::mem::size_of_val(&serve)
    );
    drop(serve);
    for (name, size) in server::future_sizes() {
        println!("{name}: {size} bytes");
    }
    Ok(ExitCode::SUCCESS)
}

fn print_runs(reports: &[RunReport]) {
    println!(
        "{:<12} {:>6} {:>6} {:>5} {:>7} {:>9} {:>7} {:>10} {:>6} {:>5} {:>4} {:>7} {:>7} {:>7} {:>8} {:>7} {:>9} {:>8} {:>7}",
        "kind",
        "subs",
        "msgs",
        "rate",
        "conn s",
        "conn/s",
        "join s",
        "deliv/s",
        "lost",
        "reord",
        "perr",
        "p50 us",
        "p90 us",
        "p99 us",
        "max us",
        "srv cpu",
        "s/Mdeliv",
        "srv MiB",
        "gen cpu"
    );
    for r in reports {
        println!(
            "{:<12} {:>6} {:>6} {:>5} {:>7.2} {:>9.0} {:>7} {:>10.0} {:>6} {:>5} {:>4} {:>7} {:>7} {:>7} {:>8} {:>7.2} {:>9.3} {:>8.1} {:>7.2}{}",
            r.kind.name(),
            r.subscribers,
            r.messages,
            match (r.rate, r.window) {
                (Some(x), _) => format!("{x}"),
                (None, Some(0)) => "burst".into(),
                (None, _) => "max".into(),
            },
            r.connect_s,
            r.connects_per_s,
            r.join_s.map_or("-".into(), |x| format!("{x:.2}")),
            r.deliveries_per_s,
            r.lost,
            r.reordered,
            r.publisher_errors,
            r.latency.p50_us,
            r.latency.p90_us,
            r.latency.p99_us,
            r.latency.max_us,
            r.server_cpu_s,
            r.server_cpu_s_per_million,
            r.server_peak_rss_kib as f64 / 1024.0,
            r.generator_cpu_s,
            if r.timed_out { "  TIMED OUT" } else { "" }
        );
    }
}

fn print_idle(reports: &[IdleReport]) {
    println!(
        "{:<12} {:>6} {:>6} {:>7} {:>8} {:>9} {:>9} {:>9} {:>8} {:>8} {:>10} {:>8} {:>8} {:>7} {:>8} {:>6}",
        "kind",
        "conns",
        "secs",
        "hb ms",
        "conn s",
        "rss0 KiB",
        "rss1 KiB",
        "rss2 KiB",
        "B/conn",
        "cpu s",
        "cpu % core",
        "%@25s",
        "us/ping",
        "gen s",
        "heap B",
        "blocks"
    );
    for r in reports {
        println!(
            "{:<12} {:>6} {:>6.1} {:>7} {:>8.2} {:>9} {:>9} {:>9} {:>8.0} {:>8.3} {:>10.2} {:>8} {:>8.1} {:>7.2} {:>8.0} {:>6.2}",
            r.kind.name(),
            r.connections,
            r.seconds,
            r.heartbeat_ms.map_or("-".into(), |h| h.to_string()),
            r.connect_s,
            r.server_rss_before_kib,
            r.server_rss_connected_kib,
            r.server_rss_after_kib,
            r.rss_per_connection_bytes,
            r.server_cpu_idle_s,
            r.server_cpu_pct_of_core,
            r.server_cpu_pct_at_25s.map_or("-".into(), |x| format!("{x:.3}")),
            r.server_cpu_us_per_ping,
            r.generator_cpu_s,
            r.heap_per_connection_bytes,
            r.heap_blocks_per_connection
        );
    }
}
