//! The dashboard example in a real browser: serves `examples/dashboard`
//! in-process and runs `node tests/browser/sse.mjs`, which drives headless
//! Chromium on the page (the served browser client over SSE): samples on a
//! chart with axes and a time scale, a note with its author and time (several
//! lines, unicode, markup shown as text), the status in words with no
//! internal ids, the client's reconnect after a dropped stream and after a
//! server restart recovering every event published meanwhile from history,
//! CORS from an allowed origin, a refused origin, and the layout from 360 to
//! 1280 px (screenshots at 390 and 1280 px under
//! `target/tmp/browser-screenshots/`).
//!
//! Needs node, Chromium and playwright-core (`tests/support/browser.rs`).

#[path = "../examples/dashboard/app.rs"]
mod app;
mod support;

use axum::response::Html;
use axum::routing::get;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use switchboard::history::MemoryHistory;
use switchboard::integration::sse::SseEndpoint;
use switchboard::protocol::CloseCode;
use switchboard::Hub;
use tokio::net::TcpListener;
use tokio::sync::Notify;

/// Serves the dashboard page and the client alone (another origin than the
/// server's).
async fn serve_page() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router: axum::Router = axum::Router::new()
        .route("/", get(|| async { Html(app::index_html()) }))
        .route("/switchboard.js", switchboard::integration::axum::client_js());
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    addr
}

#[tokio::test(flavor = "multi_thread")]
async fn dashboard_in_headless_chromium() {
    let allowed = serve_page().await;
    let refused = serve_page().await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let origins = vec![format!("http://{addr}"), format!("http://{allowed}")];
    // The history outlives a server restart (as a shared store would).
    let history = MemoryHistory::new();
    let current: Arc<Mutex<Option<(Hub, SseEndpoint)>>> = Arc::default();
    let server = {
        let current = current.clone();
        tokio::spawn(async move {
            let mut listener = Some(listener);
            loop {
                let listener = match listener.take() {
                    Some(l) => l,
                    None => TcpListener::bind(addr).await.expect("bind the same address again"),
                };
                let options = app::Options {
                    period: Duration::from_millis(100),
                    origins: origins.clone(),
                    history: history.clone(),
                };
                let (router, hub, sse) = app::app(options);
                *current.lock().unwrap() = Some((hub.clone(), sse));
                let restart = Arc::new(Notify::new());
                let router = with_test_routes(router, &hub, &restart);
                // A restart: shut the hub down (every stream gets its
                // `retry:` and `$close`), let axum finish, serve anew.
                let stop = async move {
                    restart.notified().await;
                    hub.shutdown(Duration::from_secs(5)).await;
                };
                axum::serve(listener, router.into_make_service_with_connect_info::<SocketAddr>())
                    .with_graceful_shutdown(stop)
                    .await
                    .unwrap();
            }
        })
    };

    let args = [
        format!("http://{addr}"),
        format!("http://{allowed}"),
        format!("http://{refused}"),
        support::browser::screenshot_dir().display().to_string(),
    ];
    let out = support::browser::run_script("tests/browser/sse.mjs", &args, "browser sse test passed").await;
    print!("{out}");

    // The browser is gone: so are its streams and sessions.
    let (hub, sse) = current.lock().unwrap().clone().unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while sse.streams() > 0 || hub.stats().connections > 0 {
        assert!(tokio::time::Instant::now() < deadline, "streams left open: {}", sse.streams());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    hub.shutdown(Duration::from_secs(5)).await;
    server.abort();
}

/// The test's own levers: `/test/kick` drops every stream of room `metrics`
/// with a reconnect code; `/test/restart` restarts the server.
fn with_test_routes(router: axum::Router, hub: &Hub, restart: &Arc<Notify>) -> axum::Router {
    let kick_hub = hub.clone();
    let restart = restart.clone();
    router
        .route(
            "/test/kick",
            get(move || {
                let hub = kick_hub.clone();
                async move {
                    for m in hub.room_members("metrics") {
                        hub.disconnect(m.connection, CloseCode::RECONNECT, "test kick");
                    }
                    "kicked"
                }
            }),
        )
        .route(
            "/test/restart",
            get(move || {
                restart.notify_one();
                async { "restarting" }
            }),
        )
}
