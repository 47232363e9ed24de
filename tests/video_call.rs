//! The video-call example in a real browser: serves `examples/video-call`
//! in-process and runs `node tests/browser/video.mjs`: two headless
//! Chromium pages with fake media devices call each other through
//! switchboard's signaling, both `RTCPeerConnection`s reach `connected` and
//! decode video frames, a page reloaded mid-call rejoins and renegotiates,
//! and while the server is killed and restarted the video goes on (it is
//! peer to peer), the pages say so in words with a countdown, "Retry now"
//! reconnects, and the call is signaled again. Screenshots at 390 and 1280 px under
//! `target/tmp/browser-screenshots/`.
//!
//! A second test checks the signaling relay's rules over plain WebSocket
//! clients, without a browser.

#[path = "../examples/video-call/app.rs"]
mod app;

mod support;

use serde_json::json;
use std::net::SocketAddr;
use tokio::net::TcpListener;

async fn serve() -> SocketAddr {
    let (router, _hub) = app::app();
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, router.into_make_service_with_connect_info::<SocketAddr>()).await.expect("serve");
    });
    addr
}

fn router() -> axum::Router {
    app::app().0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_browsers_call_each_other_and_a_reloaded_page_comes_back() {
    use support::browser::{levers, Node};
    let (addr, node) =
        tokio::task::spawn_blocking(|| Node::start("127.0.0.1:0".parse().unwrap(), router)).await.unwrap();
    let control = levers(addr, node, router).await;
    let dir = support::browser::screenshot_dir();
    let args = [format!("http://{addr}"), control, dir.display().to_string()];
    let out = support::browser::run_script("tests/browser/video.mjs", &args, "browser video test passed").await;
    assert!(out.contains("video-call-390.png") && out.contains("video-call-1280.png"), "{out}");
}

/// The peer id (presence key) of the member called `name` in `view`.
fn peer_named(view: &support::PresenceView, name: &str) -> String {
    let named = |metas: &std::collections::BTreeMap<String, serde_json::Value>| {
        metas.values().any(|m| m["meta"]["name"] == name || m["name"] == name)
    };
    view.iter()
        .find(|(_, metas)| named(metas))
        .map(|(k, _)| k.clone())
        .unwrap_or_else(|| panic!("no {name} in {view:?}"))
}

#[tokio::test]
async fn signals_go_only_to_a_peer_in_the_room() {
    let addr = serve().await;
    let mut ann = support::connect_path(addr, "/ws?name=Ann").await;
    let mut bob = support::connect_path(addr, "/ws?name=Bob").await;
    let mut eve = support::connect_path(addr, "/ws?name=Eve").await;
    ann.join_ok("standup").await;
    bob.join_ok("standup").await;
    eve.join_ok("elsewhere").await;
    let mut view = support::PresenceView::default();
    support::presence_until(&mut ann, "standup", &mut view, |v| v.len() == 2).await;
    let (ann_id, bob_id) = (peer_named(&view, "Ann"), peer_named(&view, "Bob"));
    assert_ne!(ann_id, bob_id, "the server gives each connection its own peer id");
    let mut elsewhere = support::PresenceView::default();
    support::presence_until(&mut eve, "elsewhere", &mut elsewhere, |v| v.len() == 1).await;
    let eve_id = peer_named(&elsewhere, "Eve");

    // An offer to a peer in the room reaches that peer, with the sender's id.
    let r = ann.call_in("standup", "signal", json!({"to": bob_id, "kind": "offer", "data": {"sdp": "x"}})).await;
    assert_eq!(r["data"], json!({"ok": true}), "{r}");
    let relayed = loop {
        let e = bob.event().await;
        if e["event"] == "signal" {
            break e;
        }
    };
    assert_eq!(relayed["data"], json!({"from": ann_id, "room": "standup", "kind": "offer", "data": {"sdp": "x"}}));
    // To someone in another room: refused, and nothing reaches them.
    let refused = ann.call_in("standup", "signal", json!({"to": eve_id, "kind": "offer", "data": {}})).await;
    assert_eq!(
        (refused["type"].as_str(), refused["code"].as_u64()),
        (Some("error"), Some(u64::from(app::NOT_IN_ROOM)))
    );
    // Another kind of message is refused.
    let bad = ann.call_in("standup", "signal", json!({"to": bob_id, "kind": "bye", "data": {}})).await;
    assert_eq!(bad["code"], 422, "{bad}");
    // A name is required.
    assert_eq!(support::refused_status(&format!("ws://{addr}/ws")).await, 400);
}
