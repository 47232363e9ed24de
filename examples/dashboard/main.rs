//! A live metrics dashboard in the browser, fed by Server-Sent Events.
//!
//! The server (`app.rs`) publishes a metrics sample to room `metrics` every
//! second; the page (`index.html`, plain JavaScript on the browser's own
//! `EventSource` and `fetch`) opens `/events?room=metrics`, draws the
//! samples, and sends notes upstream with `POST /events` (a `call` whose
//! reply comes back on the stream). Browsers reconnect by themselves and,
//! through `Last-Event-ID`, get the samples they missed from the room's
//! history (kept in memory here: a restarted process starts a new history,
//! and the page says it resynchronized; `tests/sse_browser.rs` restarts the
//! server on a shared store and checks nothing is missed).
//!
//! ```text
//! cargo run --example dashboard --features sse       # http://127.0.0.1:3000/
//! cargo run --example dashboard --features sse -- --addr 0.0.0.0:8080
//! ```
//!
//! Ctrl-C or SIGTERM shuts down gracefully: every stream ends with a
//! `retry:` and a `$close` event, so browsers come back when the server
//! does. `tests/browser.rs` drives this page in headless Chromium.

mod app;
#[path = "../common/cli.rs"]
mod cli;

use std::net::SocketAddr;
use std::time::Duration;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();

    let addr = cli::addr_arg("dashboard");
    // Same-origin only (the default origin policy).
    let options = app::Options {
        period: Duration::from_secs(1),
        origins: Vec::new(),
        history: switchboard::history::MemoryHistory::new(),
    };
    let (router, hub, _sse) = app::app(options);
    let listener = tokio::net::TcpListener::bind(addr).await?;
    println!("dashboard listening on http://{}/", listener.local_addr()?);

    axum::serve(listener, router.into_make_service_with_connect_info::<SocketAddr>())
        .with_graceful_shutdown(async move {
            cli::shutdown_signal().await;
            hub.shutdown(Duration::from_secs(5)).await;
        })
        .await
}
