//! HTTP/2 in headless Chromium (issue 20): `integration::axum::serve` over
//! TLS (h2 by ALPN) serves a page that opens ten `EventSource` streams to
//! one origin, all live at once, which HTTP/1.1's six connections per origin
//! would not allow, and a WebSocket on the same HTTP/2 connection (RFC 8441
//! extended `CONNECT`) that gets its `hello` and answers a call
//! (`node tests/browser/h2.mjs`; a screenshot under
//! `target/tmp/browser-screenshots/`).
//!
//! Needs node, Chromium and playwright-core (`tests/support/browser.rs`).

mod support;

use axum::response::Html;
use axum::routing::{get, post};
use std::time::Duration;
use support::tls::pki;
use switchboard::integration::axum::{serve, ServeConfig};
use switchboard::integration::sse::SseEndpoint;
use switchboard::Hub;
use tokio::net::TcpListener;

/// How the WebSocket requests came (`HTTP/2.0 CONNECT` for RFC 8441).
static WS_VERSIONS: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

const PAGE: &str = r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>ten streams</title></head>
<body><h1>Ten SSE streams over HTTP/2</h1><p id="status">opening…</p>
<script>
window.sources = [];
window.joined = 0;
window.got = new Set();
const status = document.getElementById("status");
const show = () => { status.textContent = `${window.joined} joined, ${window.got.size} got the event`; };
for (let i = 0; i < 10; i++) {
  const es = new EventSource("/events?room=ten");
  es.addEventListener("$joined", () => { window.joined++; show(); });
  es.addEventListener("go", () => { window.got.add(i); show(); });
  window.sources.push(es);
}
</script></body></html>"#;

#[tokio::test(flavor = "multi_thread")]
async fn ten_sse_streams_over_h2_in_chromium() {
    let hub = Hub::builder()
        .on("echo", |_: switchboard::Call, v: serde_json::Value| async move { Ok::<_, switchboard::CallError>(v) })
        .build();
    let publish_hub = hub.clone();
    let app = axum::Router::new()
        .route("/", get(|| async { Html(PAGE) }))
        .route("/events", switchboard::integration::axum::sse(SseEndpoint::new(hub.clone())))
        .route(
            "/ws",
            switchboard::integration::axum::route(hub.clone()).layer(axum::middleware::from_fn(
                |req: axum::extract::Request, next: axum::middleware::Next| async move {
                    WS_VERSIONS.lock().unwrap().push(format!("{:?} {}", req.version(), req.method()));
                    next.run(req).await
                },
            )),
        )
        .route("/test/ws-versions", get(|| async { WS_VERSIONS.lock().unwrap().join(",") }))
        .route(
            "/test/publish",
            post(move |req: axum::extract::Request| {
                let hub = publish_hub.clone();
                async move {
                    hub.publish("ten", "go", &"now").await.unwrap();
                    format!("{:?}", req.version())
                }
            }),
        );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let config = ServeConfig::default().tls(pki().server_config(&[]));
    let server = tokio::spawn(std::future::IntoFuture::into_future(
        serve(listener, app, config).with_graceful_shutdown(hub.shutdown_started()),
    ));

    let args = [format!("https://{addr}"), support::browser::screenshot_dir().display().to_string()];
    let out = support::browser::run_script("tests/browser/h2.mjs", &args, "browser h2 test passed").await;
    print!("{out}");

    // The browser is gone: so are its streams' sessions.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while hub.stats().connections > 0 {
        assert!(tokio::time::Instant::now() < deadline, "sessions left: {}", hub.stats().connections);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    hub.shutdown(Duration::from_secs(5)).await;
    server.await.unwrap().unwrap();
}
