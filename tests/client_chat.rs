//! The Rust client against the `chat` example server (the one the browser
//! page and `examples/chat-cli.rs` talk to): messages, member lists and
//! presence between two clients, and a chat server restart.

#[path = "../examples/chat/app.rs"]
mod app;

use serde_json::{json, Value};
use std::net::SocketAddr;
use std::time::Duration;
use switchboard::client::{Backoff, Client, ClientConfig, ClientErrorKind, Room, RoomEvent};
use switchboard::Hub;
use tokio::net::TcpListener;

const WAIT: Duration = Duration::from_secs(10);

async fn serve_chat(addr: &str) -> (SocketAddr, Hub, tokio::task::JoinHandle<()>) {
    let (router, hub) = app::app();
    let listener = loop {
        match TcpListener::bind(addr).await {
            Ok(l) => break l,
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await, // the old listener is closing
        }
    };
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        axum::serve(listener, router.into_make_service_with_connect_info::<SocketAddr>()).await.expect("serve");
    });
    (addr, hub, server)
}

fn client(addr: SocketAddr, name: &str) -> Client {
    let config = ClientConfig::default()
        .backoff(Backoff::default().initial(Duration::from_millis(20)).max(Duration::from_millis(100)));
    Client::builder(format!("ws://{addr}/ws?name={name}")).config(config).connect().unwrap()
}

/// The next `message` event's (from, text), skipping `members` lists.
async fn message(room: &Room) -> (String, String) {
    loop {
        match tokio::time::timeout(WAIT, room.recv()).await.expect("no message").expect("stream ended") {
            RoomEvent::Event(e) if e.event == "message" => {
                let v: Value = e.decode().unwrap();
                return (v["from"].as_str().unwrap().into(), v["text"].as_str().unwrap().into());
            }
            _ => continue,
        }
    }
}

async fn online(room: &Room, want: &[&str]) {
    let mut rx = room.presence();
    let ok = tokio::time::timeout(WAIT, rx.wait_for(|v| v.synced && v.keys().eq(want.iter().copied()))).await.is_ok();
    assert!(ok, "presence never showed {want:?}: {:?}", *rx.borrow());
}

#[tokio::test]
async fn two_clients_chat_through_the_chat_example_and_survive_its_restart() {
    let (addr, hub, server) = serve_chat("127.0.0.1:0").await;
    let ann = client(addr, "ann");
    let bob = client(addr, "bob");
    let ann_lobby = ann.join("lobby").await.unwrap();
    let bob_lobby = bob.join("lobby").await.unwrap();
    online(&ann_lobby, &["ann", "bob"]).await;
    online(&bob_lobby, &["ann", "bob"]).await;

    let ok: Value = ann_lobby.call("message", &json!({"text": "hi bob"})).await.unwrap();
    assert_eq!(ok, json!({"ok": true}));
    assert_eq!(message(&bob_lobby).await, ("ann".into(), "hi bob".into()));
    assert_eq!(message(&ann_lobby).await, ("ann".into(), "hi bob".into()));
    let members: Value = bob_lobby.call("members", &()).await.unwrap();
    assert_eq!(members, json!({"members": ["ann", "bob"]}));
    let err = bob_lobby.call::<_, Value>("message", &json!({"text": "  "})).await.unwrap_err();
    assert_eq!((err.kind(), err.code().map(|c| c.0)), (ClientErrorKind::Server, Some(400)), "{err}");

    // Typing shows in the other's presence view.
    ann_lobby.set_ephemeral(json!({"typing": true})).await.unwrap();
    let mut rx = bob_lobby.presence();
    tokio::time::timeout(
        WAIT,
        rx.wait_for(|v| v.members.get("ann").is_some_and(|m| m[0].ephemeral.contains_key("typing"))),
    )
    .await
    .expect("typing never showed")
    .unwrap();

    // The server restarts on the same port: both come back to the lobby and
    // chat again; bob's line typed while it was down is delivered.
    hub.shutdown(Duration::from_secs(5)).await;
    server.abort();
    let _ = server.await;
    let mut status = bob.status();
    tokio::time::timeout(WAIT, status.wait_for(|s| !s.is_connected())).await.unwrap().unwrap();
    // A call made while the server is down waits in the offline buffer.
    let pending = tokio::spawn({
        let bob = bob.clone();
        async move { bob.call::<_, Value>("members", &()).await }
    });
    let (_, _hub2, _server2) = serve_chat(&addr.to_string()).await;
    online(&ann_lobby, &["ann", "bob"]).await;
    online(&bob_lobby, &["ann", "bob"]).await;
    assert_eq!(
        pending.await.unwrap().unwrap_err().code().map(|c| c.0),
        Some(400),
        "`members` without a room is refused by the chat server"
    );
    bob_lobby.send("message", &json!({"text": "back"})).await.unwrap();
    assert_eq!(message(&ann_lobby).await, ("bob".into(), "back".into()));
}
