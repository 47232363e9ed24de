//! The smallest embedding of switchboard in an existing axum app that has
//! its own routes and its own state. This file is the README's quick start,
//! verbatim from the first `use` on (`tests/examples.rs` checks that they
//! are the same, and runs this program; the README's copy is compiled as a
//! doc test).
//!
//! ```text
//! cargo run --example axum-integration -- --addr 127.0.0.1:3000
//! ```

use axum::{extract::State, routing::get, Router};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use switchboard::{Call, CallError, Hub};

/// The app's own state, untouched by switchboard.
#[derive(Clone, Default)]
struct AppState {
    visits: Arc<AtomicU64>,
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("axum-integration: switchboard in an axum app\n\nusage: axum-integration [--addr HOST:PORT]");
        return Ok(());
    }
    let addr = args.iter().skip_while(|a| *a != "--addr").nth(1).map_or("127.0.0.1:3000", String::as_str);

    let hub = Hub::builder()
        // A client in room "lobby" sends
        // {"type":"call","ref":1,"room":"lobby","event":"say","data":"hi"};
        // everyone in the room gets {"type":"event","room":"lobby","event":"said","data":"hi"}
        // and the caller the reply {"type":"reply","ref":1,"data":"delivered"}.
        .on("say", |call: Call, text: String| async move {
            // With the backplane down, `?` answers `503 temporarily unavailable, retry`.
            call.broadcast("said", &text).await?;
            Ok::<_, CallError>("delivered")
        })
        .build();

    let app = Router::new()
        .route(
            "/",
            get(|State(s): State<AppState>| async move {
                format!("visit {}", s.visits.fetch_add(1, Ordering::Relaxed) + 1)
            }),
        )
        .route("/ws", switchboard::integration::axum::route(hub.clone()))
        // The browser client, served with an ETag (docs/js-client.md).
        .route("/switchboard.js", switchboard::integration::axum::client_js())
        .with_state(AppState::default());

    let listener = tokio::net::TcpListener::bind(addr).await?;
    println!("axum-integration listening on http://{}/ (WebSocket at /ws)", listener.local_addr()?);
    switchboard::integration::axum::serve(listener, app, switchboard::integration::axum::ServeConfig::default())
        .with_graceful_shutdown(async move {
            stop_signal().await;
            // Every connection gets a close frame (1001) before the exit.
            hub.shutdown(Duration::from_secs(5)).await;
        })
        .await
}

/// Ctrl-C, or SIGTERM on Unix.
async fn stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}
