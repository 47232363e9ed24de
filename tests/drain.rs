//! Draining a hub over real sockets: 1,000 WebSocket connections are closed
//! in batches no larger than configured, with the reconnect code, readiness
//! turns false before the first close, new connections get `503` with
//! `retry-after`, the connections not yet closed keep working; the Rust
//! client and the browser client (`tests/browser/drain.mjs`) move to a
//! second hub behind the same address.

mod support;

use futures::StreamExt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use support::*;
use switchboard::client::{Client, RoomEvent, Status};
use switchboard::hub::DrainConfig;
use switchboard::integration::axum::{health, route, serve as serve_app, ServeConfig};
use switchboard::Hub;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

/// A hub served by `integration::axum::serve` with the WebSocket route at
/// `/ws`, the probes (`/healthz`, `/readyz`) and the browser client.
struct Node {
    hub: Hub,
    addr: SocketAddr,
}

async fn node() -> Node {
    let hub = Hub::builder().build();
    let app = axum::Router::new()
        .route("/ws", route(hub.clone()))
        .route("/switchboard.js", switchboard::integration::axum::client_js())
        .route("/", axum::routing::get(|| async { axum::response::Html(PAGE) }))
        .merge(health(hub.clone()));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { serve_app(listener, app, ServeConfig::default()).await });
    Node { hub, addr }
}

/// The page the browser test loads; the script imports `/switchboard.js`
/// from the same origin.
const PAGE: &str = r#"<!doctype html><meta charset="utf-8"><title>drain</title><p>drain test</p>"#;

/// `GET path` over plain HTTP/1.1: the status and the body.
async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(WAIT, tcp.read_to_end(&mut out)).await.expect("response").unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).expect("status line");
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (status, body)
}

/// A load balancer in front of several nodes, as a deploy has one: each new
/// TCP connection goes to the first node whose `/readyz` answers `200`,
/// asked at that moment; the bytes are then copied both ways.
async fn balancer(nodes: Vec<SocketAddr>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut inbound, _)) = listener.accept().await else { continue };
            let nodes = nodes.clone();
            tokio::spawn(async move {
                for n in nodes {
                    if get(n, "/readyz").await.0 == 200 {
                        let mut outbound = TcpStream::connect(n).await.unwrap();
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// What one client saw when it was closed.
struct Closed {
    at: Instant,
    code: u16,
    reason: String,
    hub_ready: bool,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_connections_are_drained_in_batches_with_the_reconnect_code() {
    const N: usize = 1_000;
    const BATCH: usize = 100;
    const PERIOD: Duration = Duration::from_secs(10);
    // 10 batches, one a second: the closes of one batch arrive together
    // (a batch is delivered in milliseconds), and batches are told apart by
    // gaps of more than half a step. The step is that long so that a batch
    // delivered late on a loaded machine (half a second late) still does
    // not run into the next one.
    let step = PERIOD / (N / BATCH) as u32;
    let a = node().await;
    assert_eq!(get(a.addr, "/readyz").await, (200, "ready".to_owned()));
    assert_eq!(get(a.addr, "/healthz").await, (200, "ok".to_owned()));

    let (tx, mut rx) = tokio::sync::mpsc::channel::<Closed>(N);
    // Small client buffers: a thousand clients in this process.
    let config = WebSocketConfig::default().read_buffer_size(4096).write_buffer_size(0);
    let url = format!("ws://{}/ws", a.addr);
    let mut connects =
        futures::stream::iter(0..N)
            .map(|_| {
                let url = url.clone();
                async move {
                    tokio_tungstenite::connect_async_with_config(url, Some(config), false).await.expect("connect").0
                }
            })
            .buffer_unordered(32);
    while let Some(mut ws) = connects.next().await {
        let (tx, hub) = (tx.clone(), a.hub.clone());
        tokio::spawn(async move {
            while let Some(Ok(msg)) = ws.next().await {
                if let Message::Close(frame) = msg {
                    let (code, reason) = frame.map(|f| (u16::from(f.code), f.reason.to_string())).unwrap_or_default();
                    let seen = Closed { at: Instant::now(), code, reason, hub_ready: hub.is_ready() };
                    tx.send(seen).await.unwrap();
                    // Keep reading: tungstenite answers the close, then ends.
                    while let Some(Ok(_)) = ws.next().await {}
                    return;
                }
            }
            panic!("the socket ended without a close frame");
        });
    }
    drop(tx);
    eventually("all connected", || a.hub.stats().connections == N).await;

    let report = a.hub.drain(DrainConfig::default().period(PERIOD).batch(BATCH)).await;
    assert_eq!((report.closed, report.batches, report.remaining), (N, N / BATCH, 0));

    let mut closes = Vec::with_capacity(N);
    while let Some(c) = tokio::time::timeout(WAIT, rx.recv()).await.expect("every client saw its close") {
        closes.push(c);
    }
    assert_eq!(closes.len(), N);
    for c in &closes {
        assert_eq!((c.code, c.reason.as_str()), (4002, "server draining, reconnect"));
        // Readiness had turned before this close (every close, the first
        // one included).
        assert!(!c.hub_ready);
    }
    closes.sort_by_key(|c| c.at);
    let mut batches = vec![1usize];
    for w in closes.windows(2) {
        if w[1].at - w[0].at > step / 2 {
            batches.push(0);
        }
        *batches.last_mut().unwrap() += 1;
    }
    let span = closes[N - 1].at - closes[0].at;
    println!("{N} closes in batches {batches:?}, first to last {span:?}");
    assert!(batches.iter().all(|&b| b <= BATCH), "a batch larger than {BATCH}: {batches:?}");
    assert_eq!(batches.iter().sum::<usize>(), N);
    assert!(batches.len() >= N / BATCH, "{batches:?}");

    // Still live, not ready; a new connection is refused before the upgrade.
    assert_eq!(get(a.addr, "/readyz").await, (503, "draining".to_owned()));
    assert_eq!(get(a.addr, "/healthz").await, (200, "ok".to_owned()));
    match try_connect(a.addr, "/ws", &[]).await {
        Err((status, headers, body)) => {
            assert_eq!((status, body.as_str()), (503, "server is draining"));
            assert_eq!(headers.get("retry-after").map(|v| v.to_str().unwrap().to_owned()), Some("2".to_owned()));
        }
        Ok(_) => panic!("a connection was accepted during the drain"),
    }
    // A second drain does nothing; shutdown finishes the node.
    let again = a.hub.drain(DrainConfig::default()).await;
    assert_eq!((again.closed, again.batches), (0, 0));
    a.hub.shutdown(Duration::from_secs(5)).await;
    assert_eq!(get(a.addr, "/readyz").await, (503, "shutting down".to_owned()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rust_client_moves_to_the_second_hub() {
    let (a, b) = (node().await, node().await);
    let lb = balancer(vec![a.addr, b.addr]).await;
    let client = Client::builder(format!("ws://{lb}/ws")).connect().unwrap();
    client.connected().await.unwrap();
    let room = client.join("r").await.unwrap();
    let node_of = |hub: &Hub| format!("{:016x}", hub.node_id());
    let mut status = client.status();
    assert!(matches!(&*status.borrow(), Status::Connected { node, .. } if *node == node_of(&a.hub)));
    assert_eq!(a.hub.room_connections("r").len(), 1);

    let drain = {
        let hub = a.hub.clone();
        tokio::spawn(async move { hub.drain(DrainConfig::default().period(Duration::ZERO)).await })
    };
    // Told to reconnect with 4002, then connected to the other node through
    // the same address, with its room rejoined.
    let mut saw_reconnect = false;
    loop {
        tokio::time::timeout(WAIT, status.changed()).await.expect("status change").unwrap();
        match &*status.borrow() {
            Status::Reconnecting { reason: switchboard::client::Disconnect::Closed { code, .. }, .. } => {
                assert_eq!(code.0, 4002);
                saw_reconnect = true;
            }
            Status::Connected { node, .. } => {
                assert!(saw_reconnect);
                assert_eq!(*node, node_of(&b.hub));
                break;
            }
            _ => {}
        }
    }
    assert_eq!(drain.await.unwrap().closed, 1);
    eventually("rejoined on b", || b.hub.room_connections("r").len() == 1).await;
    assert!(a.hub.connections().is_empty());
    b.hub.publish("r", "hello", &"from b").await.unwrap();
    loop {
        match tokio::time::timeout(WAIT, room.recv()).await.expect("event from b") {
            Some(RoomEvent::Event(e)) => {
                assert_eq!((e.event.as_str(), e.decode::<String>().unwrap().as_str()), ("hello", "from b"));
                break;
            }
            Some(_) => continue,
            None => panic!("room stream ended"),
        }
    }
    client.close().await;
}

/// The browser client in headless Chromium: a page connected through the
/// balancer to node a is moved to node b by a's drain (4002), rejoins its
/// room there and gets b's event. The script drives the steps through
/// `GET /drain` and `GET /publish` on a control port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_browser_client_moves_to_the_second_hub() {
    let (a, b) = (Arc::new(node().await), Arc::new(node().await));
    let lb = balancer(vec![a.addr, b.addr]).await;
    let (ca, cb) = (a.clone(), b.clone());
    let control = axum::Router::new()
        .route(
            "/drain",
            axum::routing::get(move || {
                let a = ca.clone();
                async move {
                    let report = a.hub.drain(DrainConfig::default().period(Duration::ZERO)).await;
                    format!("{}", report.closed)
                }
            }),
        )
        .route(
            "/publish",
            axum::routing::get(move || {
                let b = cb.clone();
                async move {
                    // The page rejoined on b before asking.
                    let members = b.hub.room_connections("r").len();
                    b.hub.publish("r", "hello", &"from b").await.unwrap();
                    format!("{members}")
                }
            }),
        );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ctl = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, control).await.unwrap() });
    let args = [format!("http://{lb}"), format!("http://{ctl}")];
    let out = support::browser::run_script("tests/browser/drain.mjs", &args, "browser drain test passed").await;
    print!("{out}");
    assert!(a.hub.connections().is_empty());
}

/// On the standalone listener: batch by batch, oldest first; the
/// connections not yet closed keep working; the chosen code and reason
/// reach the client and the `on_disconnect` hook; a new connection gets
/// `503` with `retry-after` before the upgrade.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_connections_keep_working_until_their_batch() {
    use switchboard::hub::{Connection, DisconnectReason};
    use switchboard::protocol::CloseCode;
    let reasons = Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = reasons.clone();
    let hub = Hub::builder()
        .on_disconnect(move |c: &Connection, r: &DisconnectReason| log.lock().unwrap().push((c.id().get(), r.clone())))
        .build();
    let addr = serve(&hub).await;
    let mut first = connect(addr).await;
    let mut second = connect(addr).await;
    first.join_ok("r").await;
    second.join_ok("r").await;
    // Two batches of one, five seconds apart: the second connection is
    // still open long after the first one's close.
    let config = DrainConfig::default()
        .period(Duration::from_secs(10))
        .batch(1)
        .code(CloseCode(4010))
        .reason("moving you")
        .retry_after(Duration::from_millis(1500));
    let drain = {
        let hub = hub.clone();
        tokio::spawn(async move { hub.drain(config).await })
    };
    assert_eq!(expect_close_frame(&mut first.ws).await, Some((4010, "moving you".to_owned())));
    assert!(!hub.is_ready() && hub.is_draining());
    match try_connect(addr, "/", &[]).await {
        Err((status, headers, body)) => {
            assert_eq!((status, body.as_str()), (503, "server is draining"));
            // Whole seconds, rounded up.
            assert_eq!(headers.get("retry-after").map(|v| v.to_str().unwrap().to_owned()), Some("2".to_owned()));
        }
        Ok(_) => panic!("a connection was accepted during the drain"),
    }
    hub.publish("r", "still", &1).await.unwrap();
    assert_eq!(second.event().await["data"], 1);
    assert_eq!(second.call("nothing", serde_json::json!(null)).await["code"], 404);
    assert_eq!(expect_close_frame(&mut second.ws).await, Some((4010, "moving you".to_owned())));
    let report = drain.await.unwrap();
    assert_eq!((report.closed, report.batches, report.remaining), (2, 2, 0));
    eventually("both hooks ran", || reasons.lock().unwrap().len() == 2).await;
    let mut seen = reasons.lock().unwrap().clone();
    seen.sort_by_key(|(id, _)| *id);
    let want = DisconnectReason::Drained(CloseCode(4010));
    assert_eq!(seen, vec![(first.connection_id(), want.clone()), (second.connection_id(), want)]);
}
