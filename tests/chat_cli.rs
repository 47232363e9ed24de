//! `examples/chat-cli.rs` as a user runs it: the built binary, typed into
//! through a pipe (and, for the screen, a pseudo-terminal), against the
//! built `chat` server, which is killed (`kill -9`) and started again on the
//! same port. Run alone, build the examples first:
//! `cargo build --examples --all-features`.

mod support;

use nix::sys::signal::Signal;
use serde_json::json;
use support::examples::{binary, Running};
use tokio::sync::mpsc;

/// The chat-cli program with a pipe for its input.
fn cli(name: &str, port: u16) -> Running {
    Running::spawn("chat-cli", &["--name", name, "--url", &format!("ws://127.0.0.1:{port}/ws")], &[])
}

async fn chat_server(port: u16) -> Running {
    let addr = format!("127.0.0.1:{port}");
    Running::start("chat", &["--addr", &addr], &[], "listening on").await.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_cli_survives_a_late_and_a_killed_server_and_sends_what_was_typed() {
    let port = support::process::free_port();
    // Started before the server: it retries, and a line typed now waits.
    let mut ann = cli("ann", port);
    ann.line_with("connect failed").await;
    ann.type_line("typed before the server was up").await;

    let server = chat_server(port).await;
    ann.line_with("-- connected").await;
    // It joins the room it was asked for, then sends the waiting line.
    ann.line_with("-- in lobby").await;
    ann.line_with("[lobby] ann: typed before the server was up").await;

    // A second user sees the recent messages on joining.
    let mut carl = cli("carl", port);
    carl.line_with("-- in lobby").await;
    carl.line_with("[lobby] ann: typed before the server was up").await;
    carl.type_line("/quit").await;
    assert_eq!(carl.exit_code().await, Some(0));

    // The server is killed: a dropped connection, not a protocol violation.
    server.signal(Signal::SIGKILL);
    let dropped = ann.line_with("reconnecting in").await;
    assert!(dropped.contains("connection dropped"), "{dropped}");
    assert!(ann.seen.iter().all(|l| !l.contains("protocol violation")), "{:#?}", ann.seen);

    // Lines typed during the outage wait, up to the bound; one more is
    // refused with its text.
    for i in 0..120 {
        ann.type_line(&format!("line {i}")).await;
    }
    ann.line_with("not sent: \u{201c}line 119\u{201d}").await;

    let _server = chat_server(port).await;
    // "connected" first, then the rejoin, then the waiting lines in order.
    let connected = ann.line_with("-- connected").await;
    ann.line_with("[lobby] -- rejoined").await;
    let at = ann.seen.iter().position(|l| *l == connected).unwrap();
    assert!(ann.seen[at..].iter().any(|l| l.contains("rejoined")), "connected comes first: {:#?}", ann.seen);
    for i in 0..100 {
        ann.line_with(&format!("[lobby] ann: line {i}")).await;
    }
    // Whether the 101st fit depends on whether the sender had taken the
    // first out of the queue yet; never more than that.
    assert!(ann.seen.iter().all(|l| !l.contains("ann: line 119")), "{:#?}", ann.seen);
    ann.type_line("/quit").await;
    assert_eq!(ann.exit_code().await, Some(0));
}

/// A message that arrives while a line is half-typed is printed above it on
/// a terminal, and the half-typed text is drawn again below.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_terminal_incoming_lines_do_not_glue_onto_the_typed_one() {
    use std::io::{Read, Write};
    let port = support::process::free_port();
    let _server = chat_server(port).await;
    let pty = nix::pty::openpty(None, None).expect("openpty");
    let slave = std::fs::File::from(pty.slave);
    let url = format!("ws://127.0.0.1:{port}/ws");
    let mut child = std::process::Command::new(binary("chat-cli"))
        .args(["--name", "ann", "--url", &url])
        .stdin(slave.try_clone().unwrap())
        .stdout(slave.try_clone().unwrap())
        .stderr(slave)
        .spawn()
        .expect("spawn chat-cli on a pty");
    let mut master = std::fs::File::from(pty.master);
    let (tx, mut screen) = mpsc::unbounded_channel::<Vec<u8>>();
    let mut reader = master.try_clone().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = reader.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                return;
            }
        }
    });
    let mut output = String::new();
    let mut until = async |output: &mut String, what: &str| {
        while !output.contains(what) {
            let chunk = tokio::time::timeout(support::WAIT, screen.recv())
                .await
                .unwrap_or_else(|_| panic!("no {what:?} on the screen: {output:?}"))
                .expect("the pty closed");
            output.push_str(&String::from_utf8_lossy(&chunk));
        }
    };
    until(&mut output, "-- in lobby").await;
    master.write_all(b"half-typ").unwrap();
    until(&mut output, "> half-typ").await;

    let mut bob = support::connect_path(std::net::SocketAddr::from(([127, 0, 0, 1], port)), "/ws?name=bob").await;
    bob.join_ok("lobby").await;
    assert_eq!(bob.call_in("lobby", "message", json!({"text": "hello ann"})).await["type"], "reply");
    until(&mut output, "bob: hello ann").await;
    until(&mut output, "bob: hello ann\r\n> half-typ").await;
    // The message starts on a cleared line, never right after "half-typ".
    assert!(output.contains("\r\u{1b}[2K[lobby] bob: hello ann"), "{output:?}");
    assert!(!output.contains("half-typ[lobby]"), "{output:?}");

    // Finishing the line sends the whole of it.
    master.write_all(b"ed line\r").unwrap();
    until(&mut output, "[lobby] ann: half-typed line").await;
    master.write_all(&[4]).unwrap(); // Ctrl-D on an empty line
    let status = tokio::task::spawn_blocking(move || child.wait()).await.unwrap().unwrap();
    assert_eq!(status.code(), Some(0));
}
