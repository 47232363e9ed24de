//! The todo example in a real browser, on Redis: serves `examples/todo` in
//! a runtime of its own (killed and restarted like a process; its
//! `RedisSnapshots` and `RedisBackplane` live on, as an external Redis
//! would) and runs `node tests/browser/todo.mjs`: two headless Chromium
//! pages add, check, reorder, edit and delete; both edit one item at once
//! and converge; while the server is down both keep editing offline (the
//! pages say so, with a countdown and "Retry now"), and after the restart
//! one page's edit of an item the other deleted is visibly rolled back; a
//! new page sees everything (the restart lost nothing); one page alone goes
//! offline (its own browser context) and edits while the other edits live,
//! and back online both show the same board with its edits applied once.
//! Screenshots at 390 and 1280 px under `target/tmp/browser-screenshots/`.
//!
//! A second test checks the board's own rules over a raw WebSocket client.

#[path = "../examples/todo/app.rs"]
mod app;

mod support;

use serde_json::json;
use std::sync::OnceLock;
use support::redis::RedisServer;
use switchboard::redis::{RedisBackplane, RedisConfig, RedisSnapshots};

static SHARED: OnceLock<(RedisSnapshots, RedisBackplane)> = OnceLock::new();

fn router() -> axum::Router {
    let (store, backplane) = SHARED.get().expect("redis connected").clone();
    app::build(store, switchboard::Hub::builder().backplane(backplane)).0
}

async fn redis() -> RedisServer {
    let server = RedisServer::start().await;
    let config = support::redis::quick(RedisConfig::new(server.url()));
    let store = RedisSnapshots::connect(config.clone()).await.unwrap();
    let backplane = RedisBackplane::connect(config).await.unwrap();
    assert!(SHARED.set((store, backplane)).is_ok(), "one redis per test binary");
    server
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_pages_edit_converge_survive_a_restart_and_see_rollbacks() {
    use support::browser::{levers, Node};
    let _redis = redis().await;
    let (addr, node) =
        tokio::task::spawn_blocking(|| Node::start("127.0.0.1:0".parse().unwrap(), router)).await.unwrap();
    let control = levers(addr, node, router).await;
    let dir = support::browser::screenshot_dir();
    let args = [format!("http://{addr}"), control, dir.display().to_string()];
    let out = support::browser::run_script("tests/browser/todo.mjs", &args, "browser todo test passed").await;
    assert!(out.contains("todo-390.png") && out.contains("todo-1280.png"), "{out}");
}

#[tokio::test]
async fn the_board_rules_refuse_with_1001_and_change_nothing() {
    let (router, _hub) = app::app();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    let mut c = support::connect_path(addr, "/ws").await;
    c.join_ok("todo:rules").await;
    let op = |seq: u64, base: u64, op: serde_json::Value| json!({"client": "t", "seq": seq, "base": base, "op": op});
    let item = |text: &str| json!({"type":"set","path":["items","a"],"value":{"text": text, "done": false, "pos": 1}});
    let r = c.call_in("todo:rules", "sync.op", op(1, 0, item("milk"))).await;
    assert_eq!(r["data"]["version"], 1, "a new board starts with its items: {r}");
    for (seq, bad) in [
        (2, item("")),
        (3, item(&"x".repeat(201))),
        (4, json!({"type":"set","path":["items","b"],"value":{"text":"no done"}})),
        (5, json!({"type":"set","path":["items"],"value":[]})),
    ] {
        let r = c.call_in("todo:rules", "sync.op", op(seq, 1, bad.clone())).await;
        assert_eq!(
            (r["code"].as_u64(), r["data"]["version"].as_u64()),
            (Some(app::RULES as u64), Some(1)),
            "{bad}: {r}"
        );
    }
    let r = c.call_in("todo:rules", "sync.get", json!({})).await;
    assert_eq!(r["data"]["state"], json!({"items": {"a": {"text": "milk", "done": false, "pos": 1}}}));
}
