//! The chat example in a real browser: serves `examples/chat` in-process and
//! runs `node tests/browser/chat.mjs`, which drives headless Chromium through
//! playwright-core: people chat, see who is online and typing, two people
//! with one name stay two, markup is shown as text; the server is killed and
//! restarted on the same port and both pages come back by themselves with
//! every later message exactly once and in order; Connect while
//! reconnecting keeps the rooms; "Retry now" connects before the countdown
//! ends; the layout holds from 360 px to 1280 px (screenshots at 390 and
//! 1280 px under `target/tmp/browser-screenshots/`).
//!
//! Needs node, Chromium and playwright-core (`tests/support/browser.rs`).
//!
//! A second test checks the chat server's rules over a plain WebSocket
//! client (names, ids and keys, message limits, member lists), without a
//! browser.

#[path = "../examples/chat/app.rs"]
mod app;

mod support;

use axum::extract::State;
use axum::routing::get;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::{eventually, presence_until, Client, PresenceView};
use switchboard::Hub;
use tokio::net::TcpListener;

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

/// A chat server in a runtime of its own, so that killing it drops every
/// socket at once without a close frame, as a killed process would (the
/// browsers see 1006). Its history is in memory: a new one starts empty.
struct Node {
    runtime: Option<tokio::runtime::Runtime>,
    hub: Hub,
}

impl Node {
    /// Starts on `addr` (port 0: a free one), retrying while the old
    /// listener of a killed node is still being dropped.
    fn start(addr: SocketAddr) -> (SocketAddr, Node) {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let (router, hub) = runtime.block_on(async { app::app() });
        let listener = runtime.block_on(async {
            for _ in 0..500 {
                match TcpListener::bind(addr).await {
                    Ok(l) => return l,
                    Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                }
            }
            panic!("cannot bind {addr} again");
        });
        let addr = listener.local_addr().unwrap();
        runtime.spawn(async move {
            axum::serve(listener, router.into_make_service_with_connect_info::<SocketAddr>()).await.expect("serve");
        });
        (addr, Node { runtime: Some(runtime), hub })
    }
}

/// Dropping a node kills it (also when a failing test unwinds).
impl Drop for Node {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// The chat server the browser test drives, and the levers it pulls from
/// `chat.mjs` (on another port, since the chat server may be down):
/// `/kill` and `/start`.
#[derive(Clone)]
struct Chat {
    addr: SocketAddr,
    node: Arc<Mutex<Option<Node>>>,
}

async fn kill(State(chat): State<Chat>) -> &'static str {
    match chat.node.lock().unwrap().take() {
        Some(node) => {
            drop(node);
            "killed"
        }
        None => "not running",
    }
}

async fn start(State(chat): State<Chat>) -> &'static str {
    // Node::start blocks (its own runtime): not on this runtime's workers.
    let node = tokio::task::spawn_blocking(move || Node::start(chat.addr).1).await.unwrap();
    let old = chat.node.lock().unwrap().replace(node);
    assert!(old.is_none(), "/start while running");
    "started"
}

#[tokio::test(flavor = "multi_thread")]
async fn chat_in_headless_chromium() {
    let (addr, node) = tokio::task::spawn_blocking(|| Node::start("127.0.0.1:0".parse().unwrap())).await.unwrap();
    let chat = Chat { addr, node: Arc::new(Mutex::new(Some(node))) };
    let levers = axum::Router::new().route("/kill", get(kill)).route("/start", get(start)).with_state(chat.clone());
    let control = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let control_addr = control.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(control, levers).await.unwrap() });

    let screenshots = support::browser::screenshot_dir();
    let args = [format!("http://{addr}"), format!("http://{control_addr}"), screenshots.display().to_string()];
    let out = support::browser::run_script("tests/browser/chat.mjs", &args, "browser chat test passed").await;
    print!("{out}");

    // The browser is gone: so are its connections and rooms.
    let node = chat.node.lock().unwrap().take().expect("the chat server runs at the end");
    let hub = node.hub.clone();
    eventually("all browser connections closed", || hub.stats().connections == 0 && hub.stats().rooms == 0).await;
    drop(node);
}

/// Connects as `query` (`name=…&id=…`, URL-encoded); `Err(status)` when
/// the handshake is refused.
async fn connect(addr: SocketAddr, query: &str) -> Result<Client, u16> {
    match tokio_tungstenite::connect_async(format!("ws://{addr}/ws?{query}")).await {
        Ok((ws, _)) => Ok(Client::start(ws).await),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => Err(resp.status().as_u16()),
        Err(e) => panic!("connect with {query:?}: {e}"),
    }
}

/// The next `message` event of `lobby`; fails on a `members` event (the
/// server no longer republishes member lists: presence tells).
async fn message(c: &mut Client) -> Value {
    loop {
        let e = c.event().await;
        assert_ne!(e["event"], "members", "a republished member list: {e}");
        if e["room"] == "lobby" && e["event"] == "message" {
            return e["data"].clone();
        }
    }
}

/// The display names in the metas of `key`.
fn names(view: &PresenceView, key: &str) -> Vec<String> {
    view.get(key).into_iter().flatten().map(|(_, m)| m["meta"]["name"].as_str().unwrap_or("?").to_owned()).collect()
}

const ID_A: &str = "browser-a-0123456789";
const ID_B: &str = "browser-b-0123456789";

#[tokio::test(flavor = "multi_thread")]
async fn chat_server_rules() {
    let (addr, hub, server) = serve_chat().await;

    // Names: trimmed, 1 to 32 characters, no control characters, no `#`;
    // ids: 16 to 64 of [A-Za-z0-9_-].
    for bad in [
        "name=",
        "name=%20%20",
        &format!("name={}", "a".repeat(33)),
        "name=a%0Ab",
        "name=a%23b",
        "name=ann&id=short",
        "name=ann&id=has%20a%20space%20in%20it",
        &format!("name=ann&id={}", "x".repeat(65)),
    ] {
        assert_eq!(connect(addr, bad).await.err(), Some(400), "{bad}");
    }
    connect(addr, &format!("name={}", "%C3%A9".repeat(32))).await.expect("32 characters is a valid name");

    // Without an id the key is the name (chat-cli); with one it is
    // `name#tag`, the tag a hash of the id, so two "bob"s stay two.

    let mut ann = connect(addr, "name=%20ann%20").await.expect("ann");
    let mut bob_a = connect(addr, &format!("name=bob&id={ID_A}")).await.expect("bob (browser A)");
    let mut bob_a2 = connect(addr, &format!("name=bob&id={ID_A}")).await.expect("bob (browser A, second tab)");
    let mut bob_b = connect(addr, &format!("name=bob&id={ID_B}")).await.expect("bob (browser B)");
    let conn_ref = |c: &Client| format!("{}.{}", c.hello["data"]["node"].as_str().unwrap(), c.connection_id());
    let (ref_a, ref_a2, ref_b) = (conn_ref(&bob_a), conn_ref(&bob_a2), conn_ref(&bob_b));
    for c in [&mut ann, &mut bob_a, &mut bob_a2, &mut bob_b] {
        c.join_ok("lobby").await;
    }
    let mut view = PresenceView::new();
    presence_until(&mut ann, "lobby", &mut view, |v| v.values().map(|m| m.len()).sum::<usize>() == 4).await;
    let key_of = |r: &str| view.iter().find(|(_, m)| m.contains_key(r)).map(|(k, _)| k.clone()).unwrap();
    let (key_a, key_b) = (key_of(&ref_a), key_of(&ref_b));
    assert!(key_a.starts_with("bob#") && key_a.len() == 4 + 12, "{key_a}");
    assert!(key_b.starts_with("bob#") && key_b != key_a, "{key_b}");
    assert!(!key_a.contains(ID_A), "the key must not reveal the id");
    assert_eq!(key_of(&ref_a2), key_a, "one browser, one key");
    let mut want = vec!["ann".to_owned(), key_a.clone(), key_b.clone()];
    want.sort();
    assert!(view.keys().eq(want.iter()), "{view:?}");
    assert_eq!(names(&view, "ann"), ["ann"], "without an id the key is the name");
    assert_eq!(names(&view, &key_a), ["bob", "bob"], "two tabs of browser A: one key, two metas");
    assert_eq!(names(&view, &key_b), ["bob"], "browser B is someone else");
    let list = bob_b.call_in("lobby", "members", Value::Null).await;
    assert_eq!(list["data"], json!({ "members": want }), "{list}");

    // The name is the host's part of the meta: a client cannot change it.
    let renamed = bob_b.request(json!({"type": "presence", "room": "lobby", "data": {"meta": {"name": "ann"}}})).await;
    assert_eq!((renamed["type"].as_str(), renamed["code"].as_u64()), (Some("error"), Some(403)), "{renamed}");

    // Messages go to the whole room, the sender included, with the display
    // name, the key and the time.
    let r = bob_b.call_in("lobby", "message", json!({"text": "hi <b>"})).await;
    assert_eq!(r["data"], json!({"ok": true}), "{r}");
    for c in [&mut ann, &mut bob_a, &mut bob_a2, &mut bob_b] {
        let m = message(c).await;
        assert_eq!(
            (m["from"].as_str(), m["user"].as_str(), m["text"].as_str()),
            (Some("bob"), Some(key_b.as_str()), Some("hi <b>"))
        );
        assert!(m["at"].as_u64().is_some_and(|t| t > 1_600_000_000_000), "{m}");
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
    assert_eq!(message(&mut ann).await["from"], "ann");

    // Leaving (here: dropping the sockets) shows in presence; nothing else
    // is sent to the room (a member list republished to everyone on every
    // join and leave was 136x amplification, issue #24).
    drop(bob_a);
    presence_until(&mut ann, "lobby", &mut view, |v| v.get(&key_a).is_some_and(|m| m.len() == 1)).await;
    drop(bob_a2);
    drop(bob_b);
    presence_until(&mut ann, "lobby", &mut view, |v| v.keys().eq(["ann"])).await;
    let r = ann.call_in("lobby", "message", json!({"text": "alone"})).await;
    assert_eq!(r["type"], "reply");
    assert_eq!(message(&mut ann).await["text"], "alone", "no event came before this one");
    eventually("only ann left", || hub.stats().connections == 1 && hub.stats().users == 1).await;

    hub.shutdown(Duration::from_secs(5)).await;
    server.abort();
}
