//! The chat example scaled out: two instances of `examples/chat/app.rs`
//! (`app_on_redis`), served in-process on their own ports, share one private
//! `redis-server` (`support::redis`). Real WebSocket clients on each check
//! that messages cross instances, that presence on each lists both users,
//! and that a client reconnecting to the other instance recovers what it
//! missed.

#[path = "../examples/chat/app.rs"]
mod app;
mod support;

use serde_json::{json, Value};
use std::net::SocketAddr;
use support::redis::RedisServer;
use support::Client;
use switchboard::Hub;
use tokio::net::TcpListener;

/// One chat instance on Redis, served by axum on a free loopback port.
async fn instance(url: &str) -> (SocketAddr, Hub) {
    let (router, hub) = app::app_on_redis(url).await.expect("the chat app connects to the test redis");
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, router.into_make_service_with_connect_info::<SocketAddr>()).await.unwrap();
    });
    (addr, hub)
}

async fn user(addr: SocketAddr, name: &str) -> Client {
    support::connect_path(addr, &format!("/ws?name={name}")).await
}

/// The next `message` event in `lobby`: its data and offset.
async fn message(c: &mut Client) -> (Value, u64) {
    loop {
        let e = c.event().await;
        if e["room"] == "lobby" && e["event"] == "message" {
            let offset = e["offset"].as_u64().unwrap_or_else(|| panic!("a message without offset: {e}"));
            return (e["data"].clone(), offset);
        }
        assert_ne!(e["event"], "members", "no members event on Redis: {e}");
    }
}

async fn say(c: &mut Client, text: &str) {
    let r = c.call_in("lobby", "message", json!({ "text": text })).await;
    assert_eq!(r["data"], json!({"ok": true}), "{r}");
}

/// Reads `lobby`'s presence until the keys online are `want`; fails after
/// `WAIT`.
async fn presence_becomes(c: &mut Client, want: &[&str]) {
    support::presence_until(c, "lobby", &mut Default::default(), |view| view.keys().eq(want.iter().copied())).await;
}

async fn presence_keys(hub: &Hub) -> Vec<String> {
    hub.presence("lobby").await.expect("presence from redis").into_iter().map(|e| e.key).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_chat_instances_share_rooms_presence_and_history_through_redis() {
    let server = RedisServer::start().await;
    let (addr1, hub1) = instance(&server.url()).await;
    let (addr2, hub2) = instance(&server.url()).await;

    let mut ann = user(addr1, "ann").await;
    let mut bob = user(addr2, "bob").await;
    ann.join_ok("lobby").await;
    let joined = bob.join("lobby").await;
    assert_eq!(joined["type"], "reply", "{joined}");
    let epoch = joined["data"]["epoch"].as_str().unwrap_or_else(|| panic!("no epoch: {joined}")).to_owned();

    // Presence: each client's view, and each instance's, lists both users.
    presence_becomes(&mut ann, &["ann", "bob"]).await;
    presence_becomes(&mut bob, &["ann", "bob"]).await;
    for hub in [&hub1, &hub2] {
        assert_eq!(presence_keys(hub).await, ["ann", "bob"]);
    }
    // The `members` call lists every instance's users, from presence.
    for c in [&mut ann, &mut bob] {
        let r = c.call_in("lobby", "members", Value::Null).await;
        assert_eq!(r["data"], json!({"members": ["ann", "bob"]}), "{r}");
    }

    // A message on one instance reaches the other's client, both ways.
    say(&mut ann, "hi from 1").await;
    for c in [&mut ann, &mut bob] {
        assert_eq!(message(c).await.0["text"], "hi from 1");
    }
    say(&mut bob, "hi from 2").await;
    let (seen, last) = message(&mut bob).await;
    assert_eq!((seen["from"].as_str(), seen["text"].as_str()), (Some("bob"), Some("hi from 2")));
    assert_eq!(message(&mut ann).await, (seen, last), "one message, one offset, on both instances");

    // bob drops; ann goes on; bob comes back on the *other* instance with
    // his last position and recovers exactly what he missed.
    drop(bob);
    say(&mut ann, "missed 1").await;
    say(&mut ann, "missed 2").await;
    let mut bob = user(addr1, "bob").await;
    let r = bob.request(json!({"type": "join", "room": "lobby", "offset": last, "epoch": epoch})).await;
    assert_eq!(r["type"], "reply", "{r}");
    assert_eq!(r["data"]["recovered"], true, "{r}");
    for (i, text) in ["missed 1", "missed 2"].into_iter().enumerate() {
        let (data, offset) = message(&mut bob).await;
        assert_eq!((data["from"].as_str(), data["text"].as_str()), (Some("ann"), Some(text)));
        assert_eq!(offset, last + 1 + i as u64);
    }
    // Then live messages, here from a new user on the other instance.
    let mut cat = user(addr2, "cat").await;
    cat.join_ok("lobby").await;
    say(&mut cat, "live").await;
    assert_eq!(message(&mut bob).await.0["text"], "live");
    assert_eq!(bob.pending_events(), 0, "nothing twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_sent_while_redis_is_down_gets_the_short_503() {
    let mut server = RedisServer::start().await;
    let (addr, _hub) = instance(&server.url()).await;
    let mut ann = user(addr, "ann").await;
    ann.join_ok("lobby").await;
    say(&mut ann, "before").await;

    server.kill();
    let deadline = tokio::time::Instant::now() + 2 * support::WAIT;
    let error = loop {
        let r = ann.call_in("lobby", "message", json!({ "text": "during" })).await;
        if r["type"] == "error" {
            break r;
        }
        assert!(tokio::time::Instant::now() < deadline, "messages kept being accepted with Redis down: {r}");
    };
    // Not "error 500: backplane error: redis unavailable (reconnecting): ...".
    assert_eq!(error["code"], 503, "{error}");
    assert_eq!(error["message"], "temporarily unavailable, retry", "{error}");
}
