//! The chat example in a real browser: serves `examples/chat` in-process and
//! runs `node tests/browser/chat.mjs`, which drives headless Chromium through
//! playwright-core (two users chat and see each other online and typing;
//! markup must be shown as text).
//!
//! Needs node, Chromium (`$CHROMIUM_PATH` or `/usr/bin/chromium`) and
//! `tests/browser/node_modules`: `bash .ci/install-browser.sh` installs them.
//! When they are missing this test fails, it never skips.
//!
//! A second test checks the chat server's rules over a plain WebSocket
//! client (names, message limits, member lists), without a browser.

#[path = "../examples/chat/app.rs"]
mod app;

use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;
use switchboard::Hub;
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

const INSTALL: &str = "run `bash .ci/install-browser.sh` (as root) to install Chromium and the npm packages";

/// Serves the chat app on a free loopback port.
async fn serve_chat() -> (SocketAddr, Hub, tokio::task::JoinHandle<()>) {
    let (router, hub) = app::app();
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        axum::serve(listener, router.into_make_service_with_connect_info::<SocketAddr>()).await.expect("serve");
    });
    (addr, hub, server)
}

async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn chat_in_headless_chromium() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let node_ok = std::process::Command::new("node").arg("--version").output().is_ok_and(|o| o.status.success());
    assert!(node_ok, "`node` is not on PATH: {INSTALL}");
    let playwright = root.join("tests/browser/node_modules/playwright-core");
    assert!(playwright.is_dir(), "{} is missing: {INSTALL}", playwright.display());
    let chromium = std::env::var("CHROMIUM_PATH").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(Path::new(&chromium).is_file(), "no Chromium at {chromium}: {INSTALL}");

    let (addr, hub, server) = serve_chat().await;
    let run = tokio::process::Command::new("node")
        .arg("tests/browser/chat.mjs")
        .arg(format!("http://{addr}"))
        .current_dir(root)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    // chat.mjs stops itself after 120 s; this only guards against a hung node.
    let out = tokio::time::timeout(Duration::from_secs(180), run)
        .await
        .expect("node tests/browser/chat.mjs did not finish within 180 s")
        .expect("could not start node");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("browser chat test passed"),
        "browser test failed ({}); if Chromium or playwright-core is missing, {INSTALL}\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}",
        out.status,
    );
    print!("{stdout}");

    // The browser is gone: so are its connections and rooms.
    eventually("all browser connections closed", || hub.stats().connections == 0 && hub.stats().rooms == 0).await;
    hub.shutdown(Duration::from_secs(5)).await;
    server.abort();
}

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A protocol client; messages read while waiting for another are kept.
struct Client {
    ws: Ws,
    next_ref: u64,
    pending: VecDeque<Value>,
}

/// Connects as `name` (already URL-encoded); `Err(status)` when the
/// handshake is refused.
async fn connect(addr: SocketAddr, name: &str) -> Result<Client, u16> {
    let mut req = format!("ws://{addr}/ws?name={name}").into_client_request().unwrap();
    req.headers_mut().insert("sec-websocket-protocol", "switchboard.v1.json".parse().unwrap());
    match tokio_tungstenite::connect_async(req).await {
        Ok((ws, resp)) => {
            assert_eq!(resp.headers()["sec-websocket-protocol"], "switchboard.v1.json");
            let mut c = Client { ws, next_ref: 0, pending: VecDeque::new() };
            assert_eq!(c.read().await["type"], "hello");
            Ok(c)
        }
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => Err(resp.status().as_u16()),
        Err(e) => panic!("connect as {name:?}: {e}"),
    }
}

impl Client {
    async fn read(&mut self) -> Value {
        loop {
            let msg = tokio::time::timeout(Duration::from_secs(10), self.ws.next())
                .await
                .expect("timed out waiting for a message");
            match msg.expect("stream ended").expect("read error") {
                Message::Text(t) => return serde_json::from_str(&t).expect("invalid JSON"),
                Message::Ping(_) | Message::Pong(_) => continue,
                other => panic!("unexpected frame {other:?}"),
            }
        }
    }

    /// The first message (kept or new) that `f` accepts; others are kept.
    async fn wait_for(&mut self, f: impl Fn(&Value) -> bool) -> Value {
        if let Some(pos) = self.pending.iter().position(&f) {
            return self.pending.remove(pos).unwrap();
        }
        loop {
            let v = self.read().await;
            if f(&v) {
                return v;
            }
            self.pending.push_back(v);
        }
    }

    /// Sends `msg` with a fresh `ref`; returns its reply or error.
    async fn request(&mut self, mut msg: Value) -> Value {
        self.next_ref += 1;
        let r = self.next_ref;
        msg["ref"] = json!(r);
        self.ws.send(Message::text(msg.to_string())).await.unwrap();
        self.wait_for(|v| v["ref"] == r && (v["type"] == "reply" || v["type"] == "error")).await
    }

    /// The next `event` named `event` in `room`.
    async fn event(&mut self, room: &str, event: &str) -> Value {
        self.wait_for(|v| v["type"] == "event" && v["room"] == room && v["event"] == event).await
    }

    /// Waits until a `members` event of `room` lists exactly `want`.
    async fn members_become(&mut self, room: &str, want: Value) {
        while self.event(room, "members").await["data"]["members"] != want {}
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn chat_server_rules() {
    let (addr, hub, server) = serve_chat().await;

    // Names: trimmed, 1 to 32 characters.
    assert_eq!(connect(addr, "").await.err(), Some(400));
    assert_eq!(connect(addr, "%20%20").await.err(), Some(400));
    assert_eq!(connect(addr, &"a".repeat(33)).await.err(), Some(400));
    assert_eq!(connect(addr, "a%0Ab").await.err(), Some(400));
    connect(addr, &"%C3%A9".repeat(32)).await.expect("32 characters is a valid name");

    let mut ann = connect(addr, "%20ann%20").await.expect("ann");
    assert_eq!(ann.request(json!({"type": "join", "room": "lobby"})).await["type"], "reply");
    let list = ann.request(json!({"type": "call", "room": "lobby", "event": "members"})).await;
    assert_eq!(list["data"], json!({"members": ["ann"]}), "{list}");
    ann.members_become("lobby", json!(["ann"])).await;

    // A user with two connections is listed once.
    let mut bob = connect(addr, "bob").await.expect("bob");
    let mut bob2 = connect(addr, "bob").await.expect("bob again");
    bob.request(json!({"type": "join", "room": "lobby"})).await;
    bob2.request(json!({"type": "join", "room": "lobby"})).await;
    let list = bob2.request(json!({"type": "call", "room": "lobby", "event": "members"})).await;
    assert_eq!(list["data"], json!({"members": ["ann", "bob"]}), "{list}");
    ann.members_become("lobby", json!(["ann", "bob"])).await;

    // Messages go to the whole room, the sender included, with who and when.
    let r = ann.request(json!({"type": "call", "room": "lobby", "event": "message", "data": {"text": "hi <b>"}})).await;
    assert_eq!(r["data"], json!({"ok": true}), "{r}");
    for c in [&mut ann, &mut bob, &mut bob2] {
        let e = c.event("lobby", "message").await;
        assert_eq!(e["data"]["from"], "ann");
        assert_eq!(e["data"]["text"], "hi <b>");
        assert!(e["data"]["at"].as_u64().is_some_and(|t| t > 1_600_000_000_000), "{e}");
    }

    // Refusals.
    let cases = [
        (json!({"type": "call", "room": "lobby", "event": "message", "data": {"text": "  "}}), 400),
        (json!({"type": "call", "room": "lobby", "event": "message", "data": {"text": "x".repeat(2001)}}), 400),
        (json!({"type": "call", "event": "message", "data": {"text": "no room"}}), 400),
        (json!({"type": "call", "room": "lobby", "event": "message", "data": {}}), 422),
        (json!({"type": "call", "room": "elsewhere", "event": "message", "data": {"text": "hi"}}), 405),
        (json!({"type": "call", "event": "members"}), 400),
    ];
    for (msg, code) in cases {
        let e = ann.request(msg.clone()).await;
        assert_eq!((e["type"].as_str(), e["code"].as_u64()), (Some("error"), Some(code)), "{msg} -> {e}");
    }
    let long = json!({"type": "call", "room": "lobby", "event": "message", "data": {"text": "é".repeat(2000)}});
    assert_eq!(ann.request(long).await["type"], "reply", "2000 characters is allowed");

    // Leaving (here: dropping the sockets) sends the rest of the room the new list.
    drop(bob);
    ann.members_become("lobby", json!(["ann", "bob"])).await;
    drop(bob2);
    ann.members_become("lobby", json!(["ann"])).await;
    eventually("only ann left", || hub.stats().connections == 1 && hub.stats().users == 1).await;

    hub.shutdown(Duration::from_secs(5)).await;
    server.abort();
}
