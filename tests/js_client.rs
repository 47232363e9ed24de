//! The browser client `switchboard.js` end to end: a real server (WebSocket,
//! SSE, presence, recoverable rooms, the served module) and headless
//! Chromium driven by `node js/test/e2e/browser.mjs` through playwright-core.
//!
//! The server runs on a runtime of its own so that the test can **kill** it
//! (every task and socket dropped at once, no close frame: browsers see
//! 1006) and start it again on the same port; a control server on another
//! port, which survives, gives the script its levers: `/kill`,
//! `/start?publish=N&room=R&tag=T` (publishes N events into the new
//! server's history before it listens again; `fresh=1`: with an empty
//! history, as after a restart without a persistent store),
//! `/publish?room=R&n=N&tag=T`.
//!
//! Needs node, Chromium (`$CHROMIUM_PATH` or `/usr/bin/chromium`) and
//! `tests/browser/node_modules`: `bash .ci/install-browser.sh` installs them.
//! When they are missing this test fails, it never skips.

use axum::extract::Query;
use axum::response::Html;
use axum::routing::get;
use axum::Router;
use serde::Deserialize;
use serde_json::json;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use switchboard::history::{HistoryConfig, MemoryHistory, RoomHistory};
use switchboard::integration::sse::{SseConfig, SseEndpoint};
use switchboard::presence::PresenceConfig;
use switchboard::{Call, CallError, Handshake, Hub, Identity, Rejection};
use tokio::net::TcpListener;

mod support;

/// A bare page that loads the served module; the script drives it.
const PAGE: &str = r#"<!doctype html><html><head><meta charset="utf-8"><title>switchboard.js test</title></head>
<body><p id="state">loading</p><script type="module">
import * as sb from "/switchboard.js";
window.sb = sb;
document.getElementById("state").textContent = "ready";
</script></body></html>"#;

#[derive(Deserialize)]
struct Say {
    text: String,
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// The application: users from `?user=`, presence everywhere, rooms
/// `chat:*` recoverable, `say` broadcasts `said` to the caller's room.
fn app(history: MemoryHistory) -> (Router, Hub) {
    let hub = Hub::builder()
        .authenticate(|hs: &Handshake| {
            let user = hs.query("user");
            std::future::ready(user.map(Identity::user).ok_or_else(|| Rejection::unauthorized("who are you?")))
        })
        .presence(PresenceConfig::default().batch_window(Duration::from_millis(20)))
        .history(history, HistoryConfig::default().rooms("chat:", RoomHistory::default().max_len(1000)))
        .on("say", |call: Call, say: Say| async move {
            let from = call.user_id().unwrap_or("?").to_owned();
            call.broadcast("said", &json!({ "from": from, "text": say.text }))
                .await
                .map_err(|e| CallError::internal(e.to_string()))?;
            Ok(json!({ "ok": true }))
        })
        .build();
    let sse = SseEndpoint::builder(hub.clone())
        .config(SseConfig::default().retry(Duration::from_millis(500)).close_retry(Duration::from_millis(500)))
        .build();
    let router = Router::new()
        .route("/", get(|| async { Html(PAGE) }))
        .route("/switchboard.js", switchboard::integration::axum::client_js())
        .route("/ws", switchboard::integration::axum::route(hub.clone()))
        .route("/events", switchboard::integration::axum::sse(sse));
    (router, hub)
}

/// One incarnation of the server: its own runtime, so dropping it kills
/// every connection at once.
struct Incarnation {
    rt: tokio::runtime::Runtime,
    hub: Hub,
}

struct Server {
    addr: SocketAddr,
    history: Mutex<MemoryHistory>,
    current: Mutex<Option<Incarnation>>,
}

impl Server {
    /// Starts the server (on `self.addr`), after publishing `publish` events
    /// `said` `{"n": i, "tag": tag}` into `room`'s history.
    async fn start(self: &Arc<Self>, publish: u32, room: String, tag: String, fresh: bool) {
        if fresh {
            *self.history.lock().unwrap() = MemoryHistory::new();
        }
        let history = self.history.lock().unwrap().clone();
        let me = self.clone();
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel();
        rt.spawn(async move {
            let (router, hub) = app(history);
            for n in 0..publish {
                hub.publish(&room, "said", &json!({ "n": n, "tag": tag })).await.expect("publish");
            }
            let listener = loop {
                match TcpListener::bind(me.addr).await {
                    Ok(l) => break l,
                    Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            };
            let _ = tx.send(hub);
            axum::serve(listener, router.into_make_service_with_connect_info::<SocketAddr>()).await.unwrap();
        });
        let hub = rx.await.expect("server started");
        *self.current.lock().unwrap() = Some(Incarnation { rt, hub });
    }

    fn kill(&self) {
        if let Some(inc) = self.current.lock().unwrap().take() {
            inc.rt.shutdown_background();
        }
    }

    async fn publish(&self, room: String, n: u32, tag: String) {
        let (rt, hub) = {
            let cur = self.current.lock().unwrap();
            let inc = cur.as_ref().expect("server running");
            (inc.rt.handle().clone(), inc.hub.clone())
        };
        rt.spawn(async move {
            for i in 0..n {
                hub.publish(&room, "said", &json!({ "n": i, "tag": tag })).await.expect("publish");
            }
        })
        .await
        .unwrap();
    }
}

/// The script's levers, on a port that survives the kills.
async fn control(server: Arc<Server>) -> SocketAddr {
    type Q = Query<HashMap<String, String>>;
    let arg = |q: &HashMap<String, String>, k: &str| q.get(k).cloned().unwrap_or_default();
    let (s1, s2, s3) = (server.clone(), server.clone(), server);
    let router = Router::new()
        .route(
            "/kill",
            get(move || async move {
                s1.kill();
                unix_ms().to_string()
            }),
        )
        .route(
            "/start",
            get(move |Query(q): Q| async move {
                let publish = arg(&q, "publish").parse().unwrap_or(0);
                s2.start(publish, arg(&q, "room"), arg(&q, "tag"), arg(&q, "fresh") == "1").await;
                unix_ms().to_string()
            }),
        )
        .route(
            "/publish",
            get(move |Query(q): Q| async move {
                s3.publish(arg(&q, "room"), arg(&q, "n").parse().unwrap_or(1), arg(&q, "tag")).await;
                unix_ms().to_string()
            }),
        );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    addr
}

#[tokio::test(flavor = "multi_thread")]
async fn js_client_in_headless_chromium() {
    let addr = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
    let server = Arc::new(Server { addr, history: Mutex::new(MemoryHistory::new()), current: Mutex::new(None) });
    server.start(0, String::new(), String::new(), false).await;
    let ctl = control(server.clone()).await;

    let args = [format!("http://{addr}"), format!("http://{ctl}")];
    let stdout = support::browser::run_script("js/test/e2e/browser.mjs", &args, "js client browser test passed").await;
    print!("{stdout}");

    // The browser is gone: so are its connections and rooms.
    let hub = server.current.lock().unwrap().as_ref().map(|i| i.hub.clone()).expect("server running");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while hub.stats().connections > 0 {
        assert!(std::time::Instant::now() < deadline, "connections left open: {}", hub.stats().connections);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    server.kill();
}
