//! A multi-room chat in the browser, on switchboard inside axum.
//!
//! The server (`app.rs`) serves one page (`index.html`, plain HTML and
//! JavaScript on the browser's own `WebSocket`) at `/` and the switchboard
//! endpoint at `/ws`. Pick a name, join rooms (`lobby` first), switch between
//! them, send messages; each room shows who is in it.
//!
//! ```text
//! cargo run --example chat                          # http://127.0.0.1:3000/
//! cargo run --example chat -- --addr 0.0.0.0:8080
//! RUST_LOG=debug cargo run --example chat           # log to stderr
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

use std::net::SocketAddr;
use std::time::Duration;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();

    let addr = cli::addr_arg("chat");
    let (router, hub) = app::app();
    let listener = tokio::net::TcpListener::bind(addr).await?;
    println!("chat listening on http://{}/", listener.local_addr()?);

    axum::serve(listener, router.into_make_service_with_connect_info::<SocketAddr>())
        .with_graceful_shutdown(async move {
            cli::shutdown_signal().await;
            hub.shutdown(Duration::from_secs(5)).await;
        })
        .await
}
