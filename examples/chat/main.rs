//! A multi-room chat in the browser, on switchboard inside axum.
//!
//! The server (`app.rs`) serves one page (`index.html`, on the browser
//! client served at `/switchboard.js`) at `/` and the switchboard endpoint
//! at `/ws`. Pick a name, join rooms (`lobby` first), switch between them,
//! send messages; each room shows who is in it. The app-level API (`?name=`,
//! events and payloads) is in `docs/examples.md`.
//!
//! ```text
//! cargo run --example chat                          # http://127.0.0.1:3000/
//! cargo run --example chat -- --addr 0.0.0.0:8080
//! RUST_LOG=debug cargo run --example chat           # log to stderr
//! ```
//!
//! Several instances share rooms, presence and history through Redis
//! (feature `redis`; see the "Chat on Redis" section of `docs/redis.md`):
//!
//! ```text
//! cargo run --example chat --features redis -- --redis redis://127.0.0.1:6379 --addr 127.0.0.1:3000
//! SWITCHBOARD_REDIS=redis://127.0.0.1:6379 cargo run --example chat --features redis -- --addr 127.0.0.1:3001
//! ```
//!
//! Without the feature, `--redis` (or `SWITCHBOARD_REDIS`) is refused with a
//! message saying how to enable it.
//!
//! `--tls-cert FILE --tls-key FILE` (feature `tls`) serves HTTPS and WSS
//! with that PEM certificate chain and key (`docs/deploy.md`).
//!
//! `--metrics ADDR` (feature `metrics`) serves the hub's metrics in the
//! Prometheus text format at `http://ADDR/metrics` (`docs/operations.md`):
//!
//! ```text
//! cargo run --example chat --features metrics -- --metrics 127.0.0.1:9100
//! ```
//!
//! Open the printed URL in two browser windows with different names. Ctrl-C
//! or SIGTERM shuts down gracefully: every connection is closed with 1001
//! "going away" (within 5 s) before the process exits.
//!
//! `tests/browser.rs` drives this same app in headless Chromium.

mod app;
#[path = "../common/cli.rs"]
mod cli;
#[cfg(feature = "metrics")]
mod metrics;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    USAGE.help_if_asked(&args);
    let (redis, rest) = match redis_arg(args) {
        Ok(v) => v,
        Err(msg) => USAGE.fail(&msg),
    };
    let (metrics, rest) = match cli::take_flag("--metrics", rest) {
        Ok(v) => v,
        Err(msg) => USAGE.fail(&msg),
    };
    let metrics = metrics.map(|a| a.parse().unwrap_or_else(|e| USAGE.fail(&format!("--metrics {a}: {e}"))));
    let (tls, rest) = cli::tls_args(&USAGE, rest);
    let addr = cli::addr_from(&USAGE, rest);
    cli::init_logging();
    // The recorder goes in before the server accepts anything, so no count is lost.
    let (router, hub) = match redis {
        None => app::app(),
        Some(url) => on_redis(&url).await,
    };
    if let Some(metrics_addr) = metrics {
        serve_metrics(metrics_addr, hub.clone()).await?;
    }
    cli::serve_app_tls("chat", addr, tls, router, hub).await
}

const USAGE: cli::Usage = cli::Usage {
    program: "chat",
    about: "a multi-room chat in the browser: open http://ADDR/ (WebSocket endpoint /ws).",
    flags: " [--redis URL] [--metrics ADDR] [--tls-cert FILE --tls-key FILE]",
    details: "  --redis URL        share rooms, presence and history with other instances through\n                     Redis, e.g. redis://127.0.0.1:6379 (needs the `redis` feature;\n                     also $SWITCHBOARD_REDIS)\n  --metrics ADDR     serve Prometheus metrics at http://ADDR/metrics (needs the\n                     `metrics` feature)\n  --tls-cert FILE    serve HTTPS and WSS with this PEM certificate chain (needs the\n                     `tls` feature)\n  --tls-key FILE     its PEM private key (PKCS#8, PKCS#1 or SEC1)\n  RUST_LOG=LEVEL     log filter for stderr (default warn)\n",
};

/// Environment variable naming the Redis to share, like `--redis`.
const REDIS_ENV: &str = "SWITCHBOARD_REDIS";

/// Takes `--redis URL` (or `--redis=URL`) out of `args`, falling back to
/// `$SWITCHBOARD_REDIS`; returns the URL, if any, and the other arguments.
fn redis_arg(args: Vec<String>) -> Result<(Option<String>, Vec<String>), String> {
    let (url, rest) = cli::take_flag("--redis", args)?;
    let url = url.or_else(|| std::env::var(REDIS_ENV).ok().filter(|v| !v.is_empty()));
    Ok((url, rest))
}

/// Serves `/metrics` at `addr` (see `metrics.rs`).
#[cfg(feature = "metrics")]
async fn serve_metrics(addr: std::net::SocketAddr, hub: switchboard::Hub) -> std::io::Result<()> {
    metrics::serve(addr, hub).await
}

/// Without the `metrics` feature the hub records nothing: refuse, and say
/// how to get it.
#[cfg(not(feature = "metrics"))]
async fn serve_metrics(addr: std::net::SocketAddr, _hub: switchboard::Hub) -> std::io::Result<()> {
    eprintln!("chat: --metrics {addr} needs the `metrics` feature: cargo run --example chat --features metrics -- --metrics {addr}");
    std::process::exit(2);
}

/// The hub on Redis; exits with a message when Redis cannot be reached.
#[cfg(feature = "redis")]
async fn on_redis(url: &str) -> (axum::Router, switchboard::Hub) {
    match app::app_on_redis(url).await {
        Ok(app) => {
            println!("chat sharing rooms, presence and history through {url}");
            app
        }
        Err(e) => {
            eprintln!("chat: cannot use Redis at {url}: {e}");
            std::process::exit(1);
        }
    }
}

/// Without the `redis` feature there is no Redis to use: refuse, and say
/// how to get it.
#[cfg(not(feature = "redis"))]
async fn on_redis(url: &str) -> (axum::Router, switchboard::Hub) {
    eprintln!(
        "chat: --redis {url} (or ${REDIS_ENV}) needs the `redis` feature: \
         cargo run --example chat --features redis -- --redis {url}"
    );
    std::process::exit(2);
}
