//! A live metrics dashboard in the browser, fed by Server-Sent Events.
//!
//! The server (`app.rs`) publishes a metrics sample to room `metrics` every
//! second; the page (`index.html`, on the browser client served at
//! `/switchboard.js`, over SSE) opens `/events`, joins `metrics`, draws the
//! samples, and sends notes upstream with `POST /events` (a `call` whose
//! reply comes back on the stream). The client reconnects by itself and
//! recovers the events it missed from the room's history (kept in memory
//! here: a restarted process starts a new history, and the page says samples
//! could not be recovered; `tests/sse_browser.rs` restarts the server on a
//! shared store and checks nothing is missed). Room and payloads:
//! `docs/examples.md`.
//!
//! ```text
//! cargo run --example dashboard --features sse       # http://127.0.0.1:3000/
//! cargo run --example dashboard --features sse -- --addr 0.0.0.0:8080
//! cargo run --example dashboard --features sse,tls -- --tls-cert cert.pem --tls-key key.pem   # https://
//! ```
//!
//! Ctrl-C or SIGTERM shuts down gracefully: every stream ends with a
//! `retry:` and a `$close` event, so pages come back when the server does.
//! `tests/sse_browser.rs` drives this page in headless Chromium.

mod app;
#[path = "../common/cli.rs"]
mod cli;

use std::time::Duration;

const USAGE: cli::Usage = cli::Usage {
    program: "dashboard",
    about: "a live metrics dashboard on Server-Sent Events: open http://ADDR/ in a browser.\nThe page streams room `metrics` from GET /events?room=metrics and POSTs notes to /events.",
    flags: " [--tls-cert FILE --tls-key FILE]",
    details: "  --tls-cert FILE    serve HTTPS and WSS with this PEM certificate chain (needs the\n                     `tls` feature)\n  --tls-key FILE     its PEM private key (PKCS#8, PKCS#1 or SEC1)\n  RUST_LOG=LEVEL     log filter for stderr (default warn)\n",
};

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    USAGE.help_if_asked(&args);
    let (tls, rest) = cli::tls_args(&USAGE, args);
    let addr = cli::addr_from(&USAGE, rest);
    cli::init_logging();
    // Same-origin only (the default origin policy).
    let options = app::Options {
        period: Duration::from_secs(1),
        origins: Vec::new(),
        history: switchboard::history::MemoryHistory::new(),
    };
    let (router, hub, _sse) = app::app(options);
    cli::serve_app_tls("dashboard", addr, tls, router, hub).await
}
