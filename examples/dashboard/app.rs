//! The dashboard server: a hub, its SSE endpoint at `/events`, the page at
//! `/` (on the browser client served at `/switchboard.js`), and a task
//! publishing a metrics sample to room `metrics` every period. Shared by
//! `main.rs` and `tests/sse_browser.rs`.
//!
//! App-level API (`docs/examples.md`): the page connects over SSE to
//! `/events` (upstream envelopes by `POST /events`) and joins room
//! `metrics`, which keeps its last 2000 events for recovery. Events there:
//! `sample` `{"seq", "at", "load", "rss_kib", "streams"}` every period, and
//! `note` `{"text", "author", "at"}`. The call `note` (no room) takes
//! `{"text": 1 to 500 characters, "author": 1 to 32 characters}` and
//! publishes it to `metrics`.

use axum::response::Html;
use axum::routing::get;
use axum::Router;
use serde::{Deserialize, Serialize};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use switchboard::history::{HistoryConfig, MemoryHistory, RoomHistory};
use switchboard::integration::sse::{SseConfig, SseEndpoint};
use switchboard::security::{OriginPolicy, SecurityConfig};
use switchboard::{Call, CallError, Hub};

const INDEX_HTML: &str = include_str!("index.html");

/// How the dashboard runs.
pub struct Options {
    /// Time between two samples.
    pub period: Duration,
    /// Page origins allowed besides the server's own (`scheme://host:port`).
    /// The server's own origin must be in the list when it is not empty
    /// (same-origin POSTs carry an `Origin` too).
    pub origins: Vec<String>,
    /// Where room `metrics` keeps its recent events. A browser that comes
    /// back (a dropped stream, a restarted server sharing this store)
    /// recovers what it missed from here, through its `Last-Event-ID`.
    pub history: MemoryHistory,
}

/// One metrics sample (event `sample` in room `metrics`).
#[derive(Serialize)]
struct Sample {
    seq: u64,
    at: u64,
    /// A made-up load figure (a slow wave with noise), in percent.
    load: f64,
    /// This process's resident memory, in KiB (Linux; 0 elsewhere).
    rss_kib: u64,
    /// Open SSE streams.
    streams: usize,
}

#[derive(Deserialize)]
struct Note {
    text: String,
    author: String,
}

/// The router (page and endpoint), the hub and the SSE endpoint.
pub fn app(options: Options) -> (Router, Hub, SseEndpoint) {
    let mut security = SecurityConfig::default();
    if !options.origins.is_empty() {
        security = security.origin(OriginPolicy::AllowList(options.origins.clone()));
    }
    // The last 2000 events (over half an hour of samples at one a second)
    // can be replayed to a page that comes back.
    let history = HistoryConfig::default().rooms("metrics", RoomHistory::default().max_len(2000).max_replay(2000));
    let hub = Hub::builder()
        .security(security)
        .history(options.history.clone(), history)
        // A note for everyone watching: text of 1 to 500 characters, any
        // lines and any script, and who wrote it (as they typed it: this
        // demo has no sign-in); the page shows both as text.
        .on("note", |call: Call, note: Note| async move {
            let text = note.text.trim();
            if text.is_empty() || text.chars().count() > 500 {
                return Err(CallError::bad_request("a note has 1 to 500 characters"));
            }
            let author = note.author.trim();
            if author.is_empty() || author.chars().count() > 32 || author.chars().any(char::is_control) {
                return Err(CallError::bad_request("a name has 1 to 32 characters"));
            }
            let note = serde_json::json!({ "text": text, "author": author, "at": unix_millis() });
            call.hub().publish("metrics", "note", &note).await?;
            Ok(serde_json::json!({ "ok": true }))
        })
        .build();
    let config = SseConfig::default().retry(Duration::from_millis(500)).close_retry(Duration::from_millis(500));
    let sse = SseEndpoint::builder(hub.clone()).config(config).build();
    tokio::spawn(publish_samples(hub.clone(), sse.clone(), options.period));
    let router = Router::new()
        .route("/", get(|| async { Html(INDEX_HTML) }))
        .route("/switchboard.js", switchboard::integration::axum::client_js())
        .route("/events", switchboard::integration::axum::sse(sse.clone()));
    (router, hub, sse)
}

/// The page itself, for serving it from another origin (`tests/browser.rs`).
#[allow(dead_code)]
pub fn index_html() -> &'static str {
    INDEX_HTML
}

async fn publish_samples(hub: Hub, sse: SseEndpoint, period: Duration) {
    let stop = hub.shutdown_started();
    tokio::pin!(stop);
    let mut tick = tokio::time::interval(period);
    let mut seq = 0u64;
    loop {
        tokio::select! {
            _ = &mut stop => return,
            _ = tick.tick() => {}
        }
        seq += 1;
        let phase = seq as f64 / 20.0;
        let noise = (seq.wrapping_mul(2_654_435_761) % 1000) as f64 / 200.0;
        let sample = Sample {
            seq,
            at: unix_millis(),
            load: (50.0 + 35.0 * phase.sin() + noise).clamp(0.0, 100.0),
            rss_kib: rss_kib(),
            streams: sse.streams(),
        };
        if let Err(e) = hub.publish("metrics", "sample", &sample).await {
            tracing::warn!(error = %e, "publishing a sample failed");
        }
    }
}

fn rss_kib() -> u64 {
    // Second field of /proc/self/statm: resident pages.
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4)
}

fn unix_millis() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}
