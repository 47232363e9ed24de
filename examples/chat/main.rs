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

use std::net::SocketAddr;
use std::time::Duration;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();

    let addr = match addr_arg() {
        Ok(a) => a,
        Err(msg) => {
            eprintln!("chat: {msg}\nusage: chat [--addr HOST:PORT]   (default 127.0.0.1:3000)");
            std::process::exit(2);
        }
    };
    let (router, hub) = app::app();
    let listener = tokio::net::TcpListener::bind(addr).await?;
    println!("chat listening on http://{}/", listener.local_addr()?);

    axum::serve(listener, router.into_make_service_with_connect_info::<SocketAddr>())
        .with_graceful_shutdown(async move {
            shutdown_signal().await;
            hub.shutdown(Duration::from_secs(5)).await;
        })
        .await
}

/// `--addr HOST:PORT` (or `--addr=HOST:PORT`), default `127.0.0.1:3000`.
fn addr_arg() -> Result<SocketAddr, String> {
    let mut args = std::env::args().skip(1);
    let mut addr = None;
    while let Some(arg) = args.next() {
        let value = match arg.strip_prefix("--addr") {
            Some("") => args.next().ok_or("--addr needs a value")?,
            Some(v) if v.starts_with('=') => v[1..].to_owned(),
            _ => return Err(format!("unknown argument `{arg}`")),
        };
        addr = Some(value.parse().map_err(|e| format!("--addr {value}: {e}"))?);
    }
    Ok(addr.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 3000))))
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}
