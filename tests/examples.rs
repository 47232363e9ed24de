//! The example programs run as a user runs them (the built binaries, real
//! sockets, a private `nats-server`): `--help`, the errors a user sees on a
//! bad flag or a missing server, logs without colour codes when not on a
//! terminal, and a clean stop on SIGTERM. Run alone, build the examples
//! first: `cargo build --examples --all-features`.

mod support;

use futures::StreamExt;
use nix::sys::signal::Signal;
use serde_json::json;
use support::examples::{listening_addr, run, Running};

/// Every program that `cargo run --example` offers.
const EXAMPLES: [&str; 8] =
    ["chat", "chat-cli", "dashboard", "echo", "axum-integration", "custom-backplane", "load", "video-call"];

#[tokio::test]
async fn every_example_answers_help_with_its_usage_and_status_0() {
    for name in EXAMPLES {
        for flag in ["--help", "-h"] {
            let (code, out, err) = run(name, &[flag], &[], support::WAIT).await;
            assert_eq!(code, Some(0), "{name} {flag}: stdout {out:?} stderr {err:?}");
            assert!(out.contains("usage:"), "{name} {flag} prints its usage on stdout: {out:?}");
            assert!(out.contains(name), "{name} {flag} names itself: {out:?}");
            assert!(err.is_empty(), "{name} {flag}: nothing on stderr: {err:?}");
        }
    }
    // A wrong flag is still an error, with the usage, and status 2.
    let (code, _, err) = run("echo", &["--adr", "x"], &[], support::WAIT).await;
    assert_eq!(code, Some(2));
    assert!(err.contains("unknown argument `--adr`") && err.contains("usage:"), "{err}");
}

#[tokio::test]
async fn chat_says_a_redis_url_needs_its_scheme() {
    let (code, out, err) =
        run("chat", &["--addr", "127.0.0.1:0", "--redis", "localhost:6391"], &[], support::WAIT).await;
    assert_ne!(code, Some(0), "{out} {err}");
    assert!(
        err.contains("localhost:6391") && err.contains("redis://"),
        "says what is wrong and how to write it: {err}"
    );
}

#[tokio::test]
async fn logs_have_no_colour_codes_when_stderr_is_not_a_terminal() {
    // trace: axum logs each connection, so there is something to read.
    let (mut chat, line) =
        Running::start("chat", &["--addr", "127.0.0.1:0"], &[("RUST_LOG", "trace")], "listening on").await;
    let addr = listening_addr(&line);
    let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws?name=ann")).await.expect("connect");
    let log = chat.line_with("!").await;
    drop(ws);
    chat.signal(Signal::SIGTERM);
    assert_eq!(chat.exit_code().await, Some(0));
    while let Ok(line) = chat.lines.try_recv() {
        chat.seen.push(line);
    }
    assert!(!log.is_empty());
    for line in &chat.seen {
        assert!(!line.contains('\u{1b}'), "an escape code in a log that is not on a terminal: {line:?}");
    }
}

#[tokio::test]
async fn custom_backplane_without_nats_names_the_url_and_exits() {
    let port = support::process::free_port();
    let url = format!("nats://127.0.0.1:{port}");
    let (code, out, err) =
        run("custom-backplane", &["--addr", "127.0.0.1:0"], &[("NATS_URL", url.as_str())], support::WAIT).await;
    assert_eq!(code, Some(1), "{out} {err}");
    assert!(err.contains(&url), "names the URL it tried: {err}");
    assert!(err.contains("NATS_URL"), "says how to point it elsewhere: {err}");
    assert!(!err.contains("Error {") && !err.contains("kind:"), "no debug dump: {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_backplane_fails_joins_fast_while_nats_is_down_and_closes_cleanly_on_sigterm() {
    let nats = support::nats::NatsServer::start().await;
    let (mut server, line) =
        Running::start("custom-backplane", &["--addr", "127.0.0.1:0"], &[("NATS_URL", &nats.url())], "listening on")
            .await;
    let addr = listening_addr(&line);
    let mut c = support::connect(addr).await;
    c.join_ok("lobby").await;
    assert_eq!(c.call_in("lobby", "say", json!("hi")).await["type"], "reply");

    // NATS goes away: a join is refused with the documented 503, not left
    // waiting for the 10 s handler timeout (which would answer 408).
    drop(nats);
    let deadline = tokio::time::Instant::now() + support::WAIT;
    let mut n = 0;
    let refused = loop {
        n += 1;
        let r = c.join(&format!("room{n}")).await;
        if r["type"] == "error" {
            break r;
        }
        assert!(tokio::time::Instant::now() < deadline, "joins kept succeeding without NATS: {r}");
    };
    assert_eq!(
        (refused["code"].as_u64(), refused["message"].as_str()),
        (Some(503), Some("temporarily unavailable, retry"))
    );

    // SIGTERM: the connection gets a close frame (1001), the program exits 0.
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/")).await.expect("connect");
    let _hello = ws.next().await;
    server.signal(Signal::SIGTERM);
    assert_eq!(support::expect_close(&mut ws).await, Some(1001));
    assert_eq!(c.closed().await, Some(1001));
    assert_eq!(server.exit_code().await, Some(0), "{:#?}", server.seen);
}

#[test]
fn the_readme_quick_start_is_the_axum_integration_example() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let example = std::fs::read_to_string(root.join("examples/axum-integration.rs")).unwrap();
    let start = readme.find("## Quick start").expect("a quick start section");
    let block = &readme[start..];
    let code_start = block.find("```rust,no_run\n").expect("a rust block") + "```rust,no_run\n".len();
    let code = &block[code_start..code_start + block[code_start..].find("```").unwrap()];
    let body = &example[example.find("use axum::").expect("the example's first use")..];
    assert_eq!(code, body, "README.md's quick start and examples/axum-integration.rs differ");
}

#[tokio::test]
async fn the_quick_start_runs_as_the_readme_says() {
    let (mut server, line) = Running::start("axum-integration", &["--addr", "127.0.0.1:0"], &[], "listening on").await;
    let addr = listening_addr(&line);
    let mut ann = support::connect_path(addr, "/ws").await;
    let mut bob = support::connect_path(addr, "/ws").await;
    ann.join_ok("lobby").await;
    bob.join_ok("lobby").await;
    let reply = ann.call_in("lobby", "say", json!("hi")).await;
    assert_eq!(reply["data"], "delivered", "{reply}");
    let said = json!({"type": "event", "room": "lobby", "event": "said", "data": "hi"});
    assert_eq!(bob.event().await, said);
    assert_eq!(ann.event().await, said);
    // The app's own route still answers.
    assert_eq!(support::plain_get_status(addr, "/").await, 200);
    assert_eq!(support::plain_get_status(addr, "/switchboard.js").await, 200);

    server.signal(Signal::SIGTERM);
    assert_eq!(ann.closed().await, Some(1001));
    assert_eq!(bob.closed().await, Some(1001));
    assert_eq!(server.exit_code().await, Some(0));
}
