//! The smallest embedding of switchboard in an existing axum app that has
//! its own routes and its own state.
//!
//! ```text
//! cargo run --example axum-integration --features axum -- --addr 127.0.0.1:3000
//! ```

#[path = "common/cli.rs"]
mod cli;

use axum::{extract::State, routing::get, Router};
use std::net::SocketAddr;
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
    let hub = Hub::builder()
        .on("echo", |_call: Call, value: serde_json::Value| async move { Ok::<_, CallError>(value) })
        .build();

    let app = Router::new()
        .route(
            "/",
            get(|State(s): State<AppState>| async move {
                format!("visit {}", s.visits.fetch_add(1, Ordering::Relaxed) + 1)
            }),
        )
        .route("/ws", switchboard::integration::axum::route(hub.clone()))
        .with_state(AppState::default());

    let addr = cli::addr_arg("axum-integration");
    let listener = tokio::net::TcpListener::bind(addr).await?;
    println!("axum-integration listening on http://{}/ (WebSocket at /ws)", listener.local_addr()?);
    let shutdown_hub = hub.clone();
    axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>())
        .with_graceful_shutdown(async move {
            cli::shutdown_signal().await;
            shutdown_hub.shutdown(Duration::from_secs(5)).await;
        })
        .await
}
