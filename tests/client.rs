//! The Rust client (`switchboard::client`) end to end: real hubs on
//! 127.0.0.1 (restarted on the same port), and scripted raw WebSocket
//! servers for what a hub never does (silence, garbage, recovery replies).
//! Backoff is checked with paused time; nothing asserts a duration.
//!
//! The suite runs twice: as this test over `ws://`, and included by
//! `tests/tls.rs` over `wss://`, where every server below (hubs and scripted
//! ones alike) speaks TLS with a certificate made at run time.

pub(crate) mod support;

use futures::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::WAIT;
use switchboard::client::{
    Backoff, Client, ClientBuilder, ClientConfig, ClientErrorKind, Disconnect, Event, JoinOptions, Room, RoomEvent,
    Status,
};
use switchboard::protocol::{CloseCode, Format, Version};
use switchboard::transport::Handshake;
use switchboard::{presence::PresenceConfig, Call, CallError, ConnectionId, Hub, HubBuilder, Identity, Rejection};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode as WsCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

// ---------------------------------------------------------------------------
// Helpers

/// Whether this build of the suite is the `wss://` one (`tests/tls.rs`).
fn over_tls() -> bool {
    env!("CARGO_CRATE_NAME") == "tls"
}

/// A client of `ws[s]://{addr}{rest}` with `config` (trusting the test CA
/// over TLS).
fn builder(addr: SocketAddr, rest: &str, config: ClientConfig) -> ClientBuilder {
    let scheme = if over_tls() { "wss" } else { "ws" };
    #[cfg(feature = "tls")]
    let config = if over_tls() { config.tls(support::tls::pki().client_config()) } else { config };
    Client::builder(format!("{scheme}://{addr}{rest}")).config(config)
}

/// A server for `hub` on a free loopback port: the standalone WebSocket
/// server, or over TLS `integration::axum::serve` with a certificate.
async fn serve(hub: &Hub) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    serve_listener(listener, hub);
    addr
}

/// [`serve`] on exactly `addr` (a restart).
async fn serve_on(addr: SocketAddr, hub: &Hub) {
    serve_listener(support::bind_again(addr).await, hub);
}

fn serve_listener(listener: TcpListener, hub: &Hub) {
    #[cfg(feature = "tls")]
    if over_tls() {
        return support::tls::serve_hub(listener, hub);
    }
    tokio::spawn(switchboard::integration::ws::serve(listener, hub.clone(), Default::default()));
}

fn user_from_query(hs: &Handshake) -> impl std::future::Future<Output = Result<Identity, Rejection>> + Send + 'static {
    let user = hs.query("user");
    async move { Ok(user.map(Identity::user).unwrap_or_default()) }
}

#[derive(Deserialize)]
struct Say {
    text: String,
}

/// A hub where `say` in a room broadcasts `said` {text} to the room and
/// records the text, and `echo` returns its argument.
fn chat_hub(log: Arc<Mutex<Vec<String>>>) -> HubBuilder {
    Hub::builder()
        .authenticate(user_from_query)
        .on("say", move |call: Call, say: Say| {
            let log = log.clone();
            async move {
                log.lock().unwrap().push(say.text.clone());
                call.broadcast("said", &json!({ "text": say.text }))
                    .await
                    .map_err(|e| CallError::internal(e.to_string()))?;
                Ok(json!({ "ok": true }))
            }
        })
        .on("echo", |_: Call, v: Value| async move { Ok(v) })
}

/// A loopback address nothing listens on (yet).
async fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap()
}

/// Quick reconnects for tests that do not look at the backoff itself.
fn fast() -> ClientConfig {
    ClientConfig::default()
        .backoff(Backoff::default().initial(Duration::from_millis(20)).max(Duration::from_millis(100)))
        .jitter_seed(Some(1))
        .call_timeout(WAIT)
}

fn connect(addr: SocketAddr, user: &str, config: ClientConfig) -> Client {
    builder(addr, &format!("/?user={user}"), config).connect().expect("client")
}

async fn wait_status(client: &Client, what: &str, f: impl FnMut(&Status) -> bool) -> Status {
    let mut rx = client.status();
    let s = match tokio::time::timeout(WAIT, rx.wait_for(f)).await {
        Ok(s) => s.expect("status sender gone").clone(),
        Err(_) => panic!("timed out waiting for {what}; status {:?}", *client.status().borrow()),
    };
    s
}

/// A client whose token callback hands out `<prefix>1`, `<prefix>2`, …;
/// the counter says how many it gave.
fn counting_token_client(addr: SocketAddr, prefix: &'static str) -> (Client, Arc<AtomicU64>) {
    let calls = Arc::new(AtomicU64::new(0));
    let c = calls.clone();
    let client = builder(addr, "/", fast())
        .token(move || {
            let n = c.fetch_add(1, Ordering::SeqCst) + 1;
            async move { Ok::<_, std::convert::Infallible>(format!("{prefix}{n}")) }
        })
        .connect()
        .unwrap();
    (client, calls)
}

/// A listener the test answers by hand (raw WebSocket frames) and a
/// client (user `x`) connecting to it.
async fn scripted(config: ClientConfig) -> (TcpListener, Client) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let client = connect(listener.local_addr().unwrap(), "x", config);
    (listener, client)
}

/// Accepts `client`'s connection on `listener`, says hello, and answers
/// its `join` of room `r` with `reply` as the reply's data.
async fn scripted_join(listener: &TcpListener, client: &Client, reply: Value) -> (RawWs, Room) {
    let mut ws = accept_raw(listener).await;
    send(&mut ws, hello(0, 0)).await;
    let joiner = {
        let client = client.clone();
        tokio::spawn(async move { client.join("r").await })
    };
    let join = recv(&mut ws).await;
    assert_eq!((join["type"].as_str(), join["room"].as_str()), (Some("join"), Some("r")), "{join}");
    send(&mut ws, json!({"type": "reply", "ref": join["ref"], "data": reply})).await;
    (ws, joiner.await.unwrap().unwrap())
}

async fn connected(client: &Client) {
    tokio::time::timeout(WAIT, client.connected()).await.expect("timed out connecting").expect("connected");
}

async fn next(room: &mut Room) -> RoomEvent {
    tokio::time::timeout(WAIT, room.recv()).await.expect("timed out waiting for a room event").expect("stream ended")
}

/// The next room event that is an `Event`, returning the others seen before it.
async fn next_event(room: &mut Room) -> (Event, Vec<RoomEvent>) {
    let mut other = Vec::new();
    loop {
        match next(room).await {
            RoomEvent::Event(e) => return (e, other),
            o => other.push(o),
        }
    }
}

fn text(e: &Event) -> String {
    e.decode::<Value>().unwrap()["text"].as_str().unwrap_or_default().to_owned()
}

async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    support::eventually(what, &mut f).await
}

// Scripted servers ------------------------------------------------------------

type RawWs = WebSocketStream<Box<dyn support::Io>>;

async fn accept_raw(listener: &TcpListener) -> RawWs {
    let (tcp, _) = tokio::time::timeout(WAIT, listener.accept()).await.expect("no connection").unwrap();
    #[cfg(feature = "tls")]
    let io: Box<dyn support::Io> =
        if over_tls() { support::tls::accept(tcp).await.expect("TLS handshake") } else { Box::new(tcp) };
    #[cfg(not(feature = "tls"))]
    let io: Box<dyn support::Io> = Box::new(tcp);
    // Selects the JSON subprotocol the client offers.
    #[allow(clippy::result_large_err)] // tungstenite's callback signature
    let select = |_: &tokio_tungstenite::tungstenite::handshake::server::Request,
                  mut resp: tokio_tungstenite::tungstenite::handshake::server::Response| {
        resp.headers_mut().insert("sec-websocket-protocol", "switchboard.v1.json".parse().unwrap());
        Ok(resp)
    };
    tokio_tungstenite::accept_hdr_async(io, select).await.expect("upgrade")
}

fn hello(interval_ms: u64, timeout_ms: u64) -> Value {
    json!({"type": "hello", "data": {"version": 1, "connection_id": 1, "node": "0000000000000001",
        "heartbeat_interval_ms": interval_ms, "heartbeat_timeout_ms": timeout_ms,
        "max_message_size": 65536, "max_rooms": 128, "max_inflight": 16}})
}

async fn send(ws: &mut RawWs, v: Value) {
    ws.send(Message::text(v.to_string())).await.expect("send");
}

/// The next JSON message from the client (skipping control frames).
async fn recv(ws: &mut RawWs) -> Value {
    loop {
        let m = tokio::time::timeout(WAIT, ws.next()).await.expect("timed out waiting for the client");
        match m.expect("client went away").expect("read") {
            Message::Text(t) => return serde_json::from_str(&t).expect("client sent invalid JSON"),
            Message::Close(f) => panic!("client closed: {f:?}"),
            _ => continue,
        }
    }
}

async fn close(ws: &mut RawWs, code: u16) {
    let _ = ws.close(Some(CloseFrame { code: WsCode::from(code), reason: "scripted".into() })).await;
    while let Ok(Some(Ok(_))) = tokio::time::timeout(WAIT, ws.next()).await {}
}

// ---------------------------------------------------------------------------
// Basics

#[tokio::test]
async fn joins_calls_and_receives_room_and_direct_events() {
    let forms = [Format::Json, Format::MsgPack].into_iter().flat_map(|f| [(f, Version::V1), (f, Version::V2)]);
    for (format, version) in forms {
        let log = Arc::default();
        let hub = chat_hub(log).build();
        let addr = serve(&hub).await;
        let client = builder(addr, "/?user=ann", fast()).format(format).version(version).connect().unwrap();
        connected(&client).await;
        assert!(matches!(*client.status().borrow(), Status::Connected { connection_id: 1, .. }));

        let mut lobby = client.join("lobby").await.expect("join");
        // The server speaks the newest version the client offered (in
        // version 2 every event below arrives as a compact array).
        let conn = hub.connection(support::member_id(&hub, "lobby", 1)).expect("connected");
        assert_eq!((conn.format(), conn.version()), (format, version));
        let reply: Value = lobby.call("say", &json!({"text": "hi"})).await.expect("call");
        assert_eq!(reply, json!({"ok": true}));
        let (e, _) = next_event(&mut lobby).await;
        assert_eq!((e.event.as_str(), text(&e).as_str(), e.room.as_deref()), ("said", "hi", Some("lobby")));
        // The same items as a `Stream`.
        for n in 1..=3 {
            hub.publish("lobby", "n", &n).await.unwrap();
        }
        let streamed: Vec<RoomEvent> = tokio::time::timeout(WAIT, lobby.stream().take(3).collect()).await.unwrap();
        let ns: Vec<Value> = streamed
            .iter()
            .map(|item| match item {
                RoomEvent::Event(e) => e.decode().unwrap(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(ns, [json!(1), json!(2), json!(3)]);

        let echoed: Vec<u32> = client.call("echo", &[1, 2, 3]).await.unwrap();
        assert_eq!(echoed, [1, 2, 3]);
        let err = client.call::<_, Value>("nope", &()).await.unwrap_err();
        assert_eq!((err.kind(), err.code().map(|c| c.0)), (ClientErrorKind::Server, Some(404)), "{err}");
        let err = lobby.call::<_, Value>("say", &json!({"wrong": 1})).await.unwrap_err();
        assert_eq!(err.code().map(|c| c.0), Some(422), "{err}");

        let mut direct = client.direct_events().unwrap();
        assert!(client.direct_events().is_none(), "one reader");
        hub.send_to_user("ann", "notice", &json!({"n": 1})).unwrap();
        match tokio::time::timeout(WAIT, direct.recv()).await.unwrap().unwrap() {
            RoomEvent::Event(e) => assert_eq!((e.event.as_str(), e.room), ("notice", None)),
            other => panic!("{other:?}"),
        }

        assert_eq!(client.join("lobby").await.unwrap_err().kind(), ClientErrorKind::AlreadyJoined);
        lobby.leave().await.expect("leave");
        eventually("the hub forgets the room", || hub.room_len("lobby") == 0).await;
        // A dropped handle leaves too.
        let again = client.join("lobby").await.expect("join again");
        eventually("joined", || hub.room_len("lobby") == 1).await;
        drop(again);
        eventually("the dropped handle left", || hub.room_len("lobby") == 0).await;
        // An owning stream leaves when it is dropped.
        let mut owned = Box::pin(client.join("lobby").await.expect("join").into_stream());
        eventually("joined", || hub.room_len("lobby") == 1).await;
        hub.publish("lobby", "n", &4).await.unwrap();
        match tokio::time::timeout(WAIT, owned.next()).await.unwrap() {
            Some(RoomEvent::Event(e)) => assert_eq!(e.decode::<u32>().unwrap(), 4),
            other => panic!("{other:?}"),
        }
        drop(owned);
        eventually("the dropped stream left", || hub.room_len("lobby") == 0).await;

        client.close().await;
        assert!(matches!(&*client.status().borrow(), Status::Closed { reason: Disconnect::ClientClosed }));
        assert_eq!(client.call::<_, Value>("echo", &1).await.unwrap_err().kind(), ClientErrorKind::Closed);
    }
}

// ---------------------------------------------------------------------------
// Restart

#[tokio::test]
async fn server_restart_reconnects_rejoins_and_flushes_the_offline_buffer_in_order() {
    let addr = free_addr().await;
    let log1 = Arc::new(Mutex::new(Vec::new()));
    let hub1 = chat_hub(log1.clone()).build();
    serve_on(addr, &hub1).await;

    let client = connect(addr, "ann", fast());
    let mut lobby = client.join("lobby").await.unwrap();
    let _: Value = lobby.call("say", &json!({"text": "before"})).await.unwrap();
    assert_eq!(text(&next_event(&mut lobby).await.0), "before");

    hub1.shutdown(Duration::from_secs(5)).await;
    let s = wait_status(&client, "reconnecting", |s| matches!(s, Status::Reconnecting { .. })).await;
    let Status::Reconnecting { reason, .. } = s else { unreachable!() };
    assert!(
        matches!(&reason, Disconnect::Closed { code, .. } if *code == CloseCode::GOING_AWAY)
            || matches!(&reason, Disconnect::Connect(_)),
        "{reason:?}"
    );

    // Offline: buffered sends wait, volatile ones are dropped, a call waits.
    for i in 0..5 {
        lobby.send("say", &json!({"text": format!("offline-{i}")})).await.expect("buffered");
    }
    let err = lobby.send_volatile("say", &json!({"text": "volatile"})).await.unwrap_err();
    assert_eq!(err.kind(), ClientErrorKind::Offline);
    let caller = {
        let client = client.clone();
        tokio::spawn(async move { client.call::<_, Value>("echo", &"queued call").await })
    };
    eventually("the call is buffered", || client.stats().offline_buffered == 6).await;

    let log2 = Arc::new(Mutex::new(Vec::new()));
    let hub2 = chat_hub(log2.clone()).build();
    serve_on(addr, &hub2).await;

    // Rejoined (no history on this hub: nothing recovered), then the
    // buffered sends in order, broadcast to the rejoined room.
    let (first, before) = next_event(&mut lobby).await;
    assert_eq!(before, [RoomEvent::Rejoined { recovered: false }]);
    let mut texts = vec![text(&first)];
    for _ in 1..5 {
        texts.push(text(&next_event(&mut lobby).await.0));
    }
    assert_eq!(texts, (0..5).map(|i| format!("offline-{i}")).collect::<Vec<_>>());
    assert_eq!(*log2.lock().unwrap(), texts);
    assert_eq!(caller.await.unwrap().unwrap(), json!("queued call"));
    assert!(!log2.lock().unwrap().contains(&"volatile".to_owned()));

    let stats = client.stats();
    assert_eq!((stats.reconnects, stats.offline_buffered, stats.volatile_dropped), (1, 0, 1), "{stats:?}");
    assert!(client.status().borrow().is_connected());
    // And live again.
    hub2.publish("lobby", "said", &json!({"text": "live"})).await.unwrap();
    assert_eq!(text(&next_event(&mut lobby).await.0), "live");
}

// ---------------------------------------------------------------------------
// Backoff

/// Collects the first `n` `Reconnecting` statuses of a client that cannot
/// connect, with the (paused) time at which each was published.
async fn reconnecting_statuses(client: &Client, n: usize) -> Vec<(u32, Duration, tokio::time::Instant)> {
    let mut rx = client.status();
    let mut seen = Vec::new();
    while seen.len() < n {
        tokio::time::timeout(Duration::from_secs(3600), rx.changed()).await.expect("no status change").unwrap();
        if let Status::Reconnecting { attempt, retry_in, reason } = &*rx.borrow_and_update() {
            assert!(matches!(reason, Disconnect::Connect(_)), "{reason:?}");
            seen.push((*attempt, *retry_in, tokio::time::Instant::now()));
        }
    }
    seen
}

#[tokio::test(start_paused = true)]
async fn backoff_is_exponential_with_full_jitter_and_a_cap() {
    let addr = free_addr().await;
    let config = ClientConfig::default().jitter_seed(Some(42)).connect_timeout(Duration::from_secs(3600));
    let backoff = config.backoff.clone();
    let client = connect(addr, "x", config.clone());
    let seen = reconnecting_statuses(&client, 12).await;

    let attempts: Vec<u32> = seen.iter().map(|s| s.0).collect();
    assert_eq!(attempts, (0..12).collect::<Vec<_>>(), "attempts count failures from 0");
    for (attempt, delay, _) in &seen {
        assert!(*delay <= backoff.ceiling(*attempt), "attempt {attempt}: {delay:?} over the ceiling");
    }
    // Ceilings 1, 2, 4, 8, 16, 30, 30…: the later draws reach well past the
    // early ceilings, and never past 30 s.
    assert!(seen[5..].iter().any(|s| s.1 > Duration::from_secs(16)), "{seen:?}");
    assert!(seen.iter().all(|s| s.1 <= Duration::from_secs(30)));
    // Full jitter: the draws are spread, not pinned to the ceiling.
    let fractions: Vec<f64> =
        seen.iter().map(|(a, d, _)| d.as_secs_f64() / backoff.ceiling(*a).as_secs_f64()).collect();
    assert!(fractions.iter().any(|f| *f < 0.5) && fractions.iter().any(|f| *f > 0.5), "{fractions:?}");
    // The client really waits the announced time before the next attempt.
    for w in seen.windows(2) {
        assert!(w[1].2 - w[0].2 >= w[0].1, "attempt {} came early", w[1].0);
    }
    // Same seed, same sequence.
    let twin = connect(addr, "x", config);
    let again = reconnecting_statuses(&twin, 12).await;
    let delays = |v: &[(u32, Duration, tokio::time::Instant)]| v.iter().map(|s| s.1).collect::<Vec<_>>();
    assert_eq!(delays(&seen), delays(&again));
}

#[tokio::test]
async fn backoff_resets_after_a_stable_connection() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let reset_after = Duration::from_secs(1);
    let config = ClientConfig::default()
        .backoff(
            Backoff::default()
                .initial(Duration::from_millis(5))
                .max(Duration::from_millis(20))
                .reset_after(reset_after),
        )
        .jitter_seed(Some(3));
    let client = connect(addr, "x", config);
    let mut rx = client.status();
    let mut attempts = Vec::new();
    // Three connections closed right after hello: each is a failure.
    for _ in 0..3 {
        let mut ws = accept_raw(&listener).await;
        send(&mut ws, hello(0, 0)).await;
        tokio::time::timeout(WAIT, rx.wait_for(Status::is_connected)).await.unwrap().unwrap();
        close(&mut ws, 1001).await;
        let s = tokio::time::timeout(WAIT, rx.wait_for(|s| matches!(s, Status::Reconnecting { .. }))).await.unwrap();
        let Status::Reconnecting { attempt, .. } = *s.unwrap() else { unreachable!() };
        attempts.push(attempt);
    }
    // One that stays up longer than `reset_after`.
    let mut ws = accept_raw(&listener).await;
    send(&mut ws, hello(0, 0)).await;
    tokio::time::timeout(WAIT, rx.wait_for(Status::is_connected)).await.unwrap().unwrap();
    tokio::time::sleep(reset_after * 2).await; // the timer under test, not a wait for a message
    close(&mut ws, 1001).await;
    let s = tokio::time::timeout(WAIT, rx.wait_for(|s| matches!(s, Status::Reconnecting { .. }))).await.unwrap();
    let Status::Reconnecting { attempt, .. } = *s.unwrap() else { unreachable!() };
    attempts.push(attempt);
    assert_eq!(attempts, [0, 1, 2, 0]);
}

#[tokio::test]
async fn a_short_connection_after_an_outage_restarts_the_backoff() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let config = ClientConfig::default()
        .backoff(Backoff::default().initial(Duration::from_millis(5)).max(Duration::from_millis(20)))
        .jitter_seed(Some(5));
    let client = connect(addr, "x", config);
    let mut rx = client.status();
    // The next `Reconnecting` published (each attempt waits for this
    // test's next accept, so none is missed).
    let next_reconnecting = async |rx: &mut tokio::sync::watch::Receiver<Status>| loop {
        tokio::time::timeout(WAIT, rx.changed()).await.expect("a status in time").unwrap();
        if let Status::Reconnecting { attempt, reason, .. } = &*rx.borrow_and_update() {
            return (*attempt, reason.clone());
        }
    };
    // A failed attempt: the TCP connection is accepted and dropped.
    let fail = async |rx: &mut tokio::sync::watch::Receiver<Status>| {
        drop(tokio::time::timeout(WAIT, listener.accept()).await.unwrap().unwrap());
        next_reconnecting(rx).await.0
    };
    // A short-lived connection: `hello`, then the end (`kill`: no close frame).
    let greet = async |rx: &mut tokio::sync::watch::Receiver<Status>, kill: bool| {
        let mut ws = accept_raw(&listener).await;
        send(&mut ws, hello(0, 0)).await;
        tokio::time::timeout(WAIT, rx.wait_for(Status::is_connected)).await.unwrap().unwrap();
        if !kill {
            close(&mut ws, 1001).await;
        }
        drop(ws);
        next_reconnecting(rx).await
    };
    let mut attempts = Vec::new();
    // An outage: four attempts fail before a `hello`.
    for _ in 0..4 {
        attempts.push(fail(&mut rx).await);
    }
    // The server is back, and killed soon after.
    let (attempt, reason) = greet(&mut rx, true).await;
    attempts.push(attempt);
    // A killed server is a dropped connection, not a protocol violation.
    assert!(matches!(reason, Disconnect::Dropped(_)), "{reason:?}: {reason}");
    // One more failure, then a second short-lived connection in a row.
    attempts.push(fail(&mut rx).await);
    attempts.push(greet(&mut rx, false).await.0);
    // Before the reset rule the fifth was 4: the outage's count carried over.
    assert_eq!(attempts, [0, 1, 2, 3, 0, 1, 1]);
}

#[tokio::test]
async fn many_clients_spread_their_reconnects_over_the_backoff_window() {
    // Fewer over TLS: 2,000 TLS handshakes at once in a debug build on a
    // shared 2-core machine outlast the test's waits; 500 still fill every
    // tenth of the window.
    let n: usize = if over_tls() { 500 } else { 2000 };
    let cap = Duration::from_secs(2);
    let addr = free_addr().await;
    let hub1 = Hub::builder().build();
    serve_on(addr, &hub1).await;
    let config = ClientConfig::default()
        .backoff(Backoff::default().initial(cap).max(cap))
        .read_buffer_size(1024)
        .write_buffer_size(1024)
        .room_buffer(8);
    let clients: Vec<Client> = (0..n).map(|_| connect(addr, "x", config.clone())).collect();
    for c in &clients {
        connected(c).await;
    }

    // Each client's first `Reconnecting` after the restart announces its
    // delay, drawn in [0, cap].
    let watchers: Vec<_> = clients
        .iter()
        .map(|c| {
            let mut rx = c.status();
            rx.borrow_and_update();
            tokio::spawn(async move {
                loop {
                    rx.changed().await.ok()?;
                    if let Status::Reconnecting { attempt, retry_in, .. } = &*rx.borrow_and_update() {
                        return (*attempt == 0).then_some(retry_in.as_secs_f64());
                    }
                }
            })
        })
        .collect();
    let arrivals = Arc::new(Mutex::new(Vec::with_capacity(n)));
    let recorded = arrivals.clone();
    let hub2 = Hub::builder().on_connect(move |_| recorded.lock().unwrap().push(std::time::Instant::now())).build();
    hub1.shutdown(Duration::from_secs(10)).await;
    serve_on(addr, &hub2).await;
    let mut delays = Vec::with_capacity(n);
    for w in watchers {
        if let Ok(Ok(Some(d))) = tokio::time::timeout(WAIT, w).await {
            delays.push(d);
        }
    }
    for c in &clients {
        connected(c).await;
    }
    let buckets = spread(&delays, cap.as_secs_f64(), 10);
    let (mean, sd) = mean_sd(&delays);
    let arrivals = arrivals.lock().unwrap().clone();
    assert_eq!(arrivals.len(), n, "every client is back");
    let t0 = *arrivals.iter().min().unwrap();
    let offsets: Vec<f64> = arrivals.iter().map(|t| (*t - t0).as_secs_f64()).collect();
    let (_, arrival_sd) = mean_sd(&offsets);
    println!(
        "reconnect spread: {} delays seen, mean {mean:.3} s, sd {sd:.3} s (uniform: {:.3}), buckets {buckets:?}; \
         arrival sd {arrival_sd:.3} s",
        delays.len(),
        cap.as_secs_f64() / 12f64.sqrt()
    );
    // Uniform over [0, cap]: each tenth holds ~10 %; a herd would sit in one.
    assert!(delays.len() >= n / 2, "{}", delays.len());
    let min_bucket = delays.len() / 10 / 2;
    assert!(buckets.iter().all(|b| *b >= min_bucket), "{buckets:?}");
    assert!(sd > cap.as_secs_f64() / 12f64.sqrt() * 0.7, "sd {sd}");
    // And the server saw them arrive spread out, not at once.
    assert!(arrival_sd > cap.as_secs_f64() / 12f64.sqrt() * 0.5, "arrival sd {arrival_sd}");
}

fn spread(xs: &[f64], max: f64, n: usize) -> Vec<usize> {
    let mut b = vec![0; n];
    for x in xs {
        b[((x / max * n as f64) as usize).min(n - 1)] += 1;
    }
    b
}

fn mean_sd(xs: &[f64]) -> (f64, f64) {
    let mean = xs.iter().sum::<f64>() / xs.len() as f64;
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / xs.len() as f64;
    (mean, var.sqrt())
}

// ---------------------------------------------------------------------------
// Close codes and tokens

fn hub_recording_ids() -> (Hub, Arc<Mutex<Vec<ConnectionId>>>) {
    let ids = Arc::new(Mutex::new(Vec::new()));
    let rec = ids.clone();
    let hub = chat_hub(Arc::default()).on_connect(move |c| rec.lock().unwrap().push(c.id())).build();
    (hub, ids)
}

#[tokio::test]
async fn terminal_close_codes_stop_the_client_and_others_reconnect() {
    let (hub, ids) = hub_recording_ids();
    let addr = serve(&hub).await;
    for (code, terminal) in [(4500, true), (1008, true), (1000, true), (4501, true), (4002, false), (4000, false)] {
        ids.lock().unwrap().clear();
        let client = connect(addr, "x", fast());
        connected(&client).await;
        let id = ids.lock().unwrap()[0];
        assert!(hub.disconnect(id, CloseCode(code), "test"));
        if terminal {
            let s = wait_status(&client, "closed", Status::is_closed).await;
            assert_eq!(
                s,
                Status::Closed { reason: Disconnect::Closed { code: CloseCode(code), reason: "test".into() } },
                "code {code}"
            );
            let err = client.call::<_, Value>("echo", &1).await.unwrap_err();
            assert_eq!(err.kind(), ClientErrorKind::Closed);
            assert_eq!(client.stats().reconnects, 0);
            // `Closed` is published as the connection task returns; the
            // hub never saw a second connection from it.
            assert_eq!(ids.lock().unwrap().len(), 1, "code {code}");
        } else {
            eventually("a second connection", || ids.lock().unwrap().len() == 2).await;
            connected(&client).await;
            assert_eq!(client.stats().reconnects, 1, "code {code}");
            client.close().await;
        }
    }
}

#[tokio::test]
async fn token_expired_gets_a_new_token_before_reconnecting() {
    let seen = Arc::new(Mutex::new(Vec::<String>::new()));
    let ids = Arc::new(Mutex::new(Vec::new()));
    let (s, rec) = (seen.clone(), ids.clone());
    let hub = Hub::builder()
        .authenticate(move |hs: &Handshake| {
            let auth = hs.header("authorization").map(str::to_owned);
            s.lock().unwrap().push(auth.clone().unwrap_or_default());
            async move {
                match auth.as_deref().and_then(|a| a.strip_prefix("Bearer ")) {
                    Some(t) if t.starts_with("token-") => Ok(Identity::user(t)),
                    _ => Err(Rejection::unauthorized("who are you?")),
                }
            }
        })
        .on_connect(move |c| rec.lock().unwrap().push(c.id()))
        .build();
    let addr = serve(&hub).await;
    let (client, calls) = counting_token_client(addr, "token-");
    connected(&client).await;
    let first = ids.lock().unwrap()[0];
    assert!(hub.disconnect(first, CloseCode::TOKEN_EXPIRED, "token expired: refresh and reconnect"));
    eventually("reconnected", || ids.lock().unwrap().len() == 2).await;
    connected(&client).await;
    assert_eq!(*seen.lock().unwrap(), ["Bearer token-1", "Bearer token-2"]);
    assert_eq!(calls.load(Ordering::SeqCst), 2);

    // A refused upgrade (401) gets one more token; a second refusal stops.
    let refusing = builder(addr, "/", fast())
        .token(|| async { Ok::<_, std::convert::Infallible>("forged".to_owned()) })
        .connect()
        .unwrap();
    let s = wait_status(&refusing, "closed", Status::is_closed).await;
    assert!(matches!(s, Status::Closed { reason: Disconnect::Refused { status: 401, .. } }), "{s:?}");
}

#[tokio::test]
async fn the_token_can_travel_in_the_query() {
    let hub = Hub::builder()
        .authenticate(|hs: &Handshake| {
            let token = hs.query("access_token");
            async move {
                match token.as_deref() {
                    Some("a b&c") => Ok(Identity::user("ann")),
                    _ => Err(Rejection::unauthorized("no token")),
                }
            }
        })
        .build();
    let addr = serve(&hub).await;
    let client = builder(
        addr,
        "/?x=1",
        fast().token_placement(switchboard::client::TokenPlacement::Query("access_token".into())),
    )
    .token(|| async { Ok::<_, std::convert::Infallible>("a b&c".to_owned()) })
    .connect()
    .unwrap();
    connected(&client).await;
    // Without the provider the same server refuses, and the client stops.
    let refused = connect(addr, "x", fast());
    let s = wait_status(&refused, "closed", Status::is_closed).await;
    assert!(matches!(s, Status::Closed { reason: Disconnect::Refused { status: 401, .. } }), "{s:?}");
}

#[tokio::test]
async fn credentials_are_refreshed_in_band_before_they_expire() {
    use std::time::SystemTime;
    let lifetime = Duration::from_millis(1500);
    let refreshed = Arc::new(Mutex::new(Vec::<String>::new()));
    let ids = Arc::new(Mutex::new(Vec::new()));
    let (r, rec) = (refreshed.clone(), ids.clone());
    let hub = Hub::builder()
        .authenticate(move |_: &Handshake| async move {
            Ok::<_, Rejection>(Identity::user("ann").with_expiry(SystemTime::now() + lifetime))
        })
        .refresh(move |_: &Identity, token: String| {
            r.lock().unwrap().push(token);
            async move { Ok::<_, CallError>(Identity::user("ann").with_expiry(SystemTime::now() + lifetime)) }
        })
        .on_connect(move |c| rec.lock().unwrap().push(c.id()))
        .build();
    let addr = serve(&hub).await;
    let (client, _) = counting_token_client(addr, "t");
    connected(&client).await;
    // Each renewal lands before the expiry: two in a row on one connection
    // (without them the server would close with 4003).
    eventually("two refreshes", || refreshed.lock().unwrap().len() >= 2).await;
    assert_eq!(refreshed.lock().unwrap()[..2], ["t2", "t3"]);
    assert_eq!(ids.lock().unwrap().len(), 1, "one connection throughout");
    assert_eq!(client.stats().reconnects, 0);
    assert!(client.status().borrow().is_connected());
}

// ---------------------------------------------------------------------------
// Dead servers

#[tokio::test]
async fn a_half_open_connection_is_detected_by_the_heartbeat_timeout() {
    let (listener, client) = scripted(fast()).await;
    // Accepts, says hello (heartbeats every 100 ms, 100 ms timeout), then
    // goes silent without closing: no pings, no reads.
    let mut silent = accept_raw(&listener).await;
    send(&mut silent, hello(100, 100)).await;
    let s = wait_status(&client, "heartbeat timeout", |s| !matches!(s, Status::Connecting | Status::Connected { .. }))
        .await;
    assert!(matches!(s, Status::Reconnecting { reason: Disconnect::HeartbeatTimeout, .. }), "{s:?}");
    // It reconnects.
    let mut ws = accept_raw(&listener).await;
    send(&mut ws, hello(0, 0)).await;
    connected(&client).await;
    drop(silent);

    // Client pings: with no server heartbeats, the client pings after its
    // interval and gives up when nothing answers.
    let client2 = connect(listener.local_addr().unwrap(), "y", fast().ping_interval(Some(Duration::from_millis(100))));
    let mut mute = accept_raw(&listener).await;
    send(&mut mute, hello(0, 200)).await;
    let ping = recv(&mut mute).await;
    assert_eq!(ping["type"], "ping", "{ping}");
    assert!(ping["ref"].is_u64());
    let s = wait_status(&client2, "ping timeout", |s| matches!(s, Status::Reconnecting { .. })).await;
    assert!(matches!(s, Status::Reconnecting { reason: Disconnect::HeartbeatTimeout, .. }), "{s:?}");
    // A server that answers keeps the connection.
    let mut answering = accept_raw(&listener).await;
    send(&mut answering, hello(0, 5000)).await;
    connected(&client2).await;
    for _ in 0..3 {
        let ping = recv(&mut answering).await;
        assert_eq!(ping["type"], "ping");
        send(&mut answering, json!({"type": "pong", "ref": ping["ref"]})).await;
    }
    assert!(client2.status().borrow().is_connected());
    // The client answers protocol pings with pongs echoing the ref.
    send(&mut answering, json!({"type": "ping", "ref": 77})).await;
    loop {
        let m = recv(&mut answering).await;
        if m["type"] == "pong" {
            assert_eq!(m["ref"], 77);
            break;
        }
    }
}

// ---------------------------------------------------------------------------
// Buffers and calls

#[tokio::test]
async fn the_offline_buffer_is_bounded_and_drops_the_oldest() {
    let addr = free_addr().await;
    let client = connect(addr, "x", fast().offline_buffer_messages(3).offline_buffer_bytes(100_000));
    for n in 1..=5 {
        client.send("note", &json!({"n": n})).await.expect("buffered");
    }
    // A call is buffered too: it pushes out the oldest note; then a newer
    // note pushes out the call, which fails as dropped.
    let call = {
        let client = client.clone();
        tokio::spawn(async move { client.call::<_, Value>("echo", &"dropped").await })
    };
    eventually("the call is buffered", || client.stats().pending_requests == 1).await;
    for n in 6..=8 {
        client.send("note", &json!({"n": n})).await.unwrap();
    }
    let err = call.await.unwrap().unwrap_err();
    assert_eq!(err.kind(), ClientErrorKind::Dropped, "{err}");
    let stats = client.stats();
    assert_eq!((stats.offline_buffered, stats.offline_dropped), (3, 6), "{stats:?}");
    assert_eq!(client.send_volatile("note", &json!({"n": 0})).await.unwrap_err().kind(), ClientErrorKind::Offline);

    // Byte bound: 1 KiB notes in a 2.5 KiB buffer keep two; a note larger
    // than the buffer is refused outright.
    let small = connect(addr, "y", fast().offline_buffer_bytes(2560));
    for n in 0..4 {
        small.send("note", &json!({"n": n, "pad": "x".repeat(1000)})).await.unwrap();
    }
    let stats = small.stats();
    assert_eq!((stats.offline_buffered, stats.offline_dropped), (2, 2), "{stats:?}");
    assert!(stats.offline_buffered_bytes <= 2560);
    let err = small.send("note", &json!({"pad": "x".repeat(3000)})).await.unwrap_err();
    assert_eq!(err.kind(), ClientErrorKind::TooLarge);

    // The server comes up: the survivors arrive, in order.
    let notes = Arc::new(Mutex::new(Vec::new()));
    let rec = notes.clone();
    let hub = Hub::builder()
        .authenticate(user_from_query)
        .on("note", move |call: Call, v: Value| {
            let rec = rec.clone();
            async move {
                rec.lock()
                    .unwrap()
                    .push((call.user_id().unwrap_or_default().to_owned(), v["n"].as_i64().unwrap_or(-1)));
                Ok(())
            }
        })
        .build();
    serve_on(addr, &hub).await;
    eventually("notes delivered", || notes.lock().unwrap().len() == 5).await;
    let notes = notes.lock().unwrap().clone();
    let of = |u: &str| notes.iter().filter(|(w, _)| w == u).map(|(_, n)| *n).collect::<Vec<_>>();
    assert_eq!(of("x"), [6, 7, 8]);
    assert_eq!(of("y"), [2, 3]);
}

#[tokio::test]
async fn calls_time_out_and_late_replies_are_discarded() {
    let gate = Arc::new(tokio::sync::Notify::new());
    let g = gate.clone();
    let hub = chat_hub(Arc::default())
        .on("slow", move |_: Call, _: Value| {
            let g = g.clone();
            async move {
                g.notified().await;
                Ok(json!("late"))
            }
        })
        .build();
    let addr = serve(&hub).await;
    let client = connect(addr, "x", fast().call_timeout(Duration::from_millis(200)));
    connected(&client).await;
    let err = client.call::<_, Value>("slow", &()).await.unwrap_err();
    assert!(err.is_timeout(), "{err}");
    assert_eq!(client.stats().pending_requests, 0);
    gate.notify_one();
    eventually("the late reply is counted", || client.stats().late_replies == 1).await;
    // Not wedged (a loaded machine may take longer than this test's short
    // call timeout once or twice; what matters is that calls work again).
    let mut answered = None;
    for _ in 0..20 {
        match client.call::<_, String>("echo", &"still here").await {
            Ok(v) => {
                answered = Some(v);
                break;
            }
            Err(e) => assert!(e.is_timeout(), "{e}"),
        }
    }
    assert_eq!(answered.as_deref(), Some("still here"));
    assert!(client.status().borrow().is_connected());
}

// ---------------------------------------------------------------------------
// Presence

#[tokio::test]
async fn the_presence_view_converges_with_the_server() {
    let hub = Hub::builder().authenticate(user_from_query).presence(PresenceConfig::default()).build();
    let addr = serve(&hub).await;
    let ann = connect(addr, "ann", fast());
    let bob1 = connect(addr, "bob", fast());
    let bob2 = connect(addr, "bob", fast());
    let ann_room = ann.join("room").await.unwrap();
    let bob1_room = bob1.join("room").await.unwrap();
    let bob2_room = bob2.join("room").await.unwrap();

    let converge = |room: &Room, want: Vec<(&'static str, usize)>| {
        let mut rx = room.presence();
        async move {
            let got = tokio::time::timeout(
                WAIT,
                rx.wait_for(|v| {
                    v.synced && v.members.iter().map(|(k, m)| (k.as_str(), m.len())).collect::<Vec<_>>() == want
                }),
            )
            .await
            .map(|r| r.map(|v| v.clone()));
            match got {
                Ok(v) => v.unwrap(),
                Err(_) => panic!("presence did not converge to {want:?}: {:?}", *rx.borrow()),
            }
        }
    };
    for room in [&ann_room, &bob1_room, &bob2_room] {
        let v = converge(room, vec![("ann", 1), ("bob", 2)]).await;
        assert_eq!((v.count.keys, v.count.connections), (2, 3));
    }
    // Ephemeral flags show up in everyone's view, and go.
    ann_room.set_ephemeral(json!({"typing": true})).await.unwrap();
    let mut rx = bob1_room.presence();
    tokio::time::timeout(
        WAIT,
        rx.wait_for(|v| v.members.get("ann").is_some_and(|m| m[0].ephemeral.get("typing").is_some())),
    )
    .await
    .unwrap()
    .unwrap();
    ann_room.set_ephemeral(json!({"typing": null})).await.unwrap();
    tokio::time::timeout(WAIT, rx.wait_for(|v| v.members.get("ann").is_some_and(|m| m[0].ephemeral.is_empty())))
        .await
        .unwrap()
        .unwrap();
    // A tab goes away: one bob meta left; ann leaves: only bob.
    drop(bob2_room);
    bob2.close().await;
    converge(&ann_room, vec![("ann", 1), ("bob", 1)]).await;
    converge(&bob1_room, vec![("ann", 1), ("bob", 1)]).await;
    ann_room.leave().await.unwrap();
    let v = converge(&bob1_room, vec![("bob", 1)]).await;
    assert_eq!(v.count.connections, 1);
}

// ---------------------------------------------------------------------------
// Garbage

#[tokio::test]
async fn a_garbage_sending_server_neither_crashes_nor_wedges_the_client() {
    let (listener, client) = scripted(fast().max_message_size(4096)).await;
    let mut ws = accept_raw(&listener).await;
    send(&mut ws, hello(0, 0)).await;
    connected(&client).await;
    let caller = {
        let client = client.clone();
        tokio::spawn(async move { client.call::<_, Value>("echo", &"hi").await })
    };
    let call = recv(&mut ws).await;
    assert_eq!(call["type"], "call");
    for garbage in [
        Message::text("not json"),
        Message::text("[1,2,3]"),
        Message::text(r#"{"type":"frobnicate","ref":1}"#),
        Message::text(r#"{"type":"reply","ref":987654321,"data":1}"#),
        Message::text(r#"{"type":"error","ref":987654322,"code":500,"message":"x"}"#),
        Message::text(r#"{"type":"error","code":500,"message":"no ref"}"#),
        Message::text(r#"{"type":"event"}"#),
        Message::text(r#"{"type":"event","room":"unjoined","event":"e","data":1}"#),
        Message::text(r#"{"type":"presence_diff","room":"nope","data":5}"#),
        Message::text(r#"{"type":"join","room":"x"}"#),
        Message::text(r#"{"type":"gap","room":"x","data":"?"}"#),
        Message::text(r#"{"type":"lagged","data":{"dropped":"many"}}"#),
        Message::binary(vec![0xc1, 0xff]),
        Message::text(r#"{"type":"hello","data":{"version":99}}"#),
    ] {
        ws.send(garbage).await.unwrap();
    }
    send(&mut ws, json!({"type": "reply", "ref": call["ref"], "data": "hi"})).await;
    assert_eq!(caller.await.unwrap().unwrap(), json!("hi"));
    let stats = client.stats();
    assert!(stats.malformed_messages >= 4, "{stats:?}");
    assert!(stats.unknown_messages >= 2, "{stats:?}");
    assert_eq!((stats.late_replies, stats.server_errors), (2, 1), "{stats:?}");
    assert!(client.status().borrow().is_connected());

    // Fatal: a message over the client's size limit → reconnect.
    ws.send(Message::text(format!("{{\"type\":\"event\",\"event\":\"{}\"}}", "x".repeat(5000)))).await.unwrap();
    let s = wait_status(&client, "reconnecting", |s| matches!(s, Status::Reconnecting { .. })).await;
    assert!(matches!(s, Status::Reconnecting { reason: Disconnect::Protocol(_), .. }), "{s:?}");
    // Fatal: no hello first.
    let mut ws = accept_raw(&listener).await;
    send(&mut ws, json!({"type": "event", "event": "e"})).await;
    let s = wait_status(&client, "reconnecting", |s| matches!(s, Status::Reconnecting { attempt: 1, .. })).await;
    assert!(matches!(&s, Status::Reconnecting { reason: Disconnect::Protocol(m), .. } if m.contains("hello")), "{s:?}");
    // Fatal: nothing but garbage.
    let mut ws = accept_raw(&listener).await;
    send(&mut ws, hello(0, 0)).await;
    connected(&client).await;
    for _ in 0..40 {
        if ws.send(Message::text("}{")).await.is_err() {
            break;
        }
    }
    let s = wait_status(&client, "reconnecting", |s| matches!(s, Status::Reconnecting { .. })).await;
    assert!(
        matches!(&s, Status::Reconnecting { reason: Disconnect::Protocol(m), .. } if m.contains("in a row")),
        "{s:?}"
    );
    // And a sane server gets a working client.
    let mut ws = accept_raw(&listener).await;
    send(&mut ws, hello(0, 0)).await;
    connected(&client).await;
    let caller = {
        let client = client.clone();
        tokio::spawn(async move { client.call::<_, Value>("echo", &2).await })
    };
    let call = recv(&mut ws).await;
    send(&mut ws, json!({"type": "reply", "ref": call["ref"], "data": 2})).await;
    assert_eq!(caller.await.unwrap().unwrap(), json!(2));
}

// ---------------------------------------------------------------------------
// Recovery, against a scripted server speaking the recovery wire format

/// An event of room `r` (epoch-less, as on the wire) at `offset`.
fn event_at(offset: u64) -> Value {
    json!({"type": "event", "room": "r", "event": "e", "offset": offset, "data": {"n": offset}})
}

/// The offsets of the events among `items`.
fn offsets(items: &[RoomEvent]) -> Vec<u64> {
    items.iter().filter_map(|i| if let RoomEvent::Event(e) = i { e.offset } else { None }).collect()
}

/// Answers the recovering `join` of room `r` with `recovered: true` up to
/// `top` in epoch E1, sends the events at `sent`, and returns what the room
/// yields until the last of them arrived.
async fn recover<const N: usize>(
    ws: &mut RawWs,
    room: &mut Room,
    join: &Value,
    top: u64,
    sent: [u64; N],
) -> Vec<RoomEvent> {
    let data = json!({"room": "r", "epoch": "E1", "offset": top, "recovered": true});
    send(ws, json!({"type": "reply", "ref": join["ref"], "data": data})).await;
    for off in sent {
        send(ws, event_at(off)).await;
    }
    let mut items = vec![next(room).await];
    while offsets(&items).last() != sent.last() {
        items.push(next(room).await);
    }
    items
}

#[tokio::test]
async fn rejoins_with_the_last_offset_and_delivers_recovered_events_once_and_first() {
    let (listener, client) = scripted(fast()).await;

    // Connection 1: join at head 10; events 11, 12; the server goes away.
    let mut ws = accept_raw(&listener).await;
    send(&mut ws, hello(0, 0)).await;
    let joiner = {
        let client = client.clone();
        tokio::spawn(async move { client.join_with("r", JoinOptions::default().params(json!({"invite": "k"}))).await })
    };
    let join = recv(&mut ws).await;
    assert_eq!((join["type"].as_str(), join["room"].as_str()), (Some("join"), Some("r")));
    assert_eq!(join["data"], json!({"invite": "k"}));
    assert!(join.get("offset").is_none() && join.get("epoch").is_none(), "{join}");
    send(&mut ws, json!({"type": "reply", "ref": join["ref"], "data": {"room": "r", "epoch": "E1", "offset": 10}}))
        .await;
    let mut room = joiner.await.unwrap().unwrap();
    send(&mut ws, event_at(9)).await; // older than the join: not delivered
    send(&mut ws, event_at(11)).await;
    send(&mut ws, event_at(12)).await;
    assert_eq!(next_event(&mut room).await.0.offset, Some(11));
    assert_eq!(next_event(&mut room).await.0.offset, Some(12));
    assert_eq!(room.position(), Some((12, "E1".to_owned())));
    close(&mut ws, 1001).await;

    // Connection 2: the rejoin carries offset 12 and epoch E1 (and the
    // params again); the server recovers 13, 14 (repeating 12), then live 15.
    let mut ws = accept_raw(&listener).await;
    send(&mut ws, hello(0, 0)).await;
    let join = recv(&mut ws).await;
    assert_eq!((join["offset"].as_u64(), join["epoch"].as_str()), (Some(12), Some("E1")), "{join}");
    assert_eq!(join["data"], json!({"invite": "k"}));
    let items = recover(&mut ws, &mut room, &join, 14, [12, 13, 14, 15]).await;
    assert_eq!(items[0], RoomEvent::Rejoined { recovered: true });
    assert_eq!(offsets(&items), [13, 14, 15]);

    // A gap on the live connection: the client leaves and rejoins from just
    // before it, and delivers only the missing events (and newer ones).
    send(
        &mut ws,
        json!({"type": "gap", "room": "r", "data": {"from": 16, "to": 17, "reason": "slow_consumer", "epoch": "E1"}}),
    )
    .await;
    send(&mut ws, event_at(18)).await;
    let leave = recv(&mut ws).await;
    assert_eq!((leave["type"].as_str(), leave["room"].as_str()), (Some("leave"), Some("r")), "{leave}");
    let join = recv(&mut ws).await;
    assert_eq!(
        (join["type"].as_str(), join["offset"].as_u64(), join["epoch"].as_str()),
        (Some("join"), Some(15), Some("E1"))
    );
    send(&mut ws, json!({"type": "reply", "ref": leave["ref"], "data": {"room": "r"}})).await;
    let items = recover(&mut ws, &mut room, &join, 19, [16, 17, 18, 19]).await;
    assert!(matches!(
        &items[0],
        RoomEvent::Gap(g) if (g.from, g.to, g.reason.as_str(), g.recovering) == (16, 17, "slow_consumer", true)
    ));
    assert_eq!(offsets(&items), [18, 16, 17, 19], "18 arrived live before the recovery; 18 is not repeated");
    close(&mut ws, 1001).await;

    // Connection 3: the server cannot recover: the app is told to resync.
    let mut ws = accept_raw(&listener).await;
    send(&mut ws, hello(0, 0)).await;
    let join = recv(&mut ws).await;
    assert_eq!(join["offset"].as_u64(), Some(19));
    send(&mut ws, json!({"type": "reply", "ref": join["ref"], "data": {"room": "r", "epoch": "E2", "offset": 40, "recovered": false}}))
        .await;
    send(&mut ws, event_at(41)).await;
    assert_eq!(next(&mut room).await, RoomEvent::Rejoined { recovered: false });
    assert_eq!(next_event(&mut room).await.0.offset, Some(41));
    assert_eq!(room.position(), Some((41, "E2".to_owned())));
    // epoch_changed: resync, no recovery attempt.
    send(
        &mut ws,
        json!({"type": "gap", "room": "r", "data": {"from": 42, "to": 50, "reason": "epoch_changed", "epoch": "E3"}}),
    )
    .await;
    match next(&mut room).await {
        RoomEvent::Gap(g) => assert!(!g.recovering && g.reason == "epoch_changed"),
        other => panic!("{other:?}"),
    }
    // A rejoin refused after a reconnect ends the stream with the reason.
    close(&mut ws, 1001).await;
    let mut ws = accept_raw(&listener).await;
    send(&mut ws, hello(0, 0)).await;
    let join = recv(&mut ws).await;
    assert_eq!(
        (join["offset"].as_u64(), join["epoch"].as_str()),
        (Some(0), Some("E3")),
        "new epoch from its start: {join}"
    );
    send(&mut ws, json!({"type": "error", "ref": join["ref"], "code": 403, "message": "banned"})).await;
    while tokio::time::timeout(WAIT, room.recv()).await.expect("stream did not end").is_some() {}
    assert_eq!(room.closed_reason().and_then(|e| e.code()).map(|c| c.0), Some(403));
}

#[tokio::test]
async fn a_slow_reader_loses_the_oldest_events_and_is_told() {
    let hub = chat_hub(Arc::default()).build();
    let addr = serve(&hub).await;
    let client = connect(addr, "x", fast().room_buffer(4));
    let mut room = client.join("lobby").await.unwrap();
    for i in 0..10 {
        hub.publish("lobby", "said", &json!({"text": i.to_string()})).await.unwrap();
    }
    let _: Value = room.call("say", &json!({"text": "last"})).await.unwrap(); // the events are in before the reply
    assert_eq!(next(&mut room).await, RoomEvent::Lagged { dropped: 7 });
    let mut texts = Vec::new();
    while let Some(RoomEvent::Event(e)) = room.try_recv() {
        texts.push(text(&e));
    }
    assert_eq!(texts, ["7", "8", "9", "last"]);
    assert_eq!((room.dropped(), client.stats().events_dropped), (7, 7));
}

// ---------------------------------------------------------------------------
// Recovery against real hubs with history (the store outlives the hub)

#[tokio::test]
async fn server_restart_with_history_recovers_every_missed_event_in_order() {
    for format in [Format::Json, Format::MsgPack] {
        restart_with_history(format).await;
    }
}

async fn restart_with_history(format: Format) {
    use switchboard::history::{HistoryConfig, MemoryHistory};
    let history = MemoryHistory::new();
    let recoverable =
        |h: &MemoryHistory| chat_hub(Arc::default()).history(h.clone(), HistoryConfig::all_rooms()).build();
    let addr = free_addr().await;
    let hub1 = recoverable(&history);
    serve_on(addr, &hub1).await;

    let client = builder(addr, "/?user=ann", fast()).format(format).connect().unwrap();
    let mut room = client.join("r").await.unwrap();
    for n in 1..=3 {
        hub1.publish("r", "said", &json!({"text": n.to_string()})).await.unwrap();
    }
    for n in 1..=3u64 {
        let (e, _) = next_event(&mut room).await;
        assert_eq!((e.offset, text(&e)), (Some(n), n.to_string()));
    }
    let (_, epoch) = room.position().expect("a recoverable room has a position");

    // The server goes away; events keep being published (into the same
    // store) while the client is offline.
    hub1.shutdown(Duration::from_secs(5)).await;
    wait_status(&client, "reconnecting", |s| matches!(s, Status::Reconnecting { .. })).await;
    let hub2 = recoverable(&history);
    for n in 4..=8 {
        hub2.publish("r", "said", &json!({"text": n.to_string()})).await.unwrap();
    }
    // And the client says something while offline (buffered: sent after the
    // rejoin, so it is broadcast after the recovered events).
    room.send("say", &json!({"text": "back"})).await.unwrap();
    serve_on(addr, &hub2).await;

    let mut items = Vec::new();
    loop {
        let item = next(&mut room).await;
        let done = matches!(&item, RoomEvent::Event(e) if text(e) == "back");
        items.push(item);
        if done {
            break;
        }
    }
    assert_eq!(items[0], RoomEvent::Rejoined { recovered: true });
    let got: Vec<(Option<u64>, String)> = items[1..]
        .iter()
        .map(|i| if let RoomEvent::Event(e) = i { (e.offset, text(e)) } else { panic!("{i:?}") })
        .collect();
    let want: Vec<(Option<u64>, String)> =
        (4..=8).map(|n| (Some(n), n.to_string())).chain([(Some(9), "back".to_owned())]).collect();
    assert_eq!(got, want, "every missed event, once, in order, before the live ones");
    assert_eq!(room.position(), Some((9, epoch.clone())));

    // A server whose history was lost (a new store, a new epoch): the
    // client is told to resync, and follows the new stream.
    let hub3 = recoverable(&MemoryHistory::new());
    hub2.shutdown(Duration::from_secs(5)).await;
    serve_on(addr, &hub3).await;
    assert_eq!(next(&mut room).await, RoomEvent::Rejoined { recovered: false });
    hub3.publish("r", "said", &json!({"text": "new"})).await.unwrap();
    let (e, _) = next_event(&mut room).await;
    assert_eq!((e.offset, text(&e)), (Some(1), "new".to_owned()));
    assert_ne!(room.position().unwrap().1, epoch);

    // Rewind on a first join: the newest retained events first.
    let late = builder(addr, "/?user=bob", fast()).format(format).connect().unwrap();
    for n in 2..=4 {
        hub3.publish("r", "said", &json!({"text": format!("new{n}")})).await.unwrap();
    }
    let mut bob = late.join_with("r", JoinOptions::default().rewind(2)).await.unwrap();
    let first = next_event(&mut bob).await.0;
    let second = next_event(&mut bob).await.0;
    assert_eq!([first.offset, second.offset], [Some(3), Some(4)]);
}

#[tokio::test]
async fn an_unanswered_rejoin_does_not_hold_the_offline_buffer_forever() {
    let (listener, client) = scripted(fast().call_timeout(Duration::from_secs(1))).await;
    let (mut ws, room) = scripted_join(&listener, &client, json!({"room": "r"})).await;
    close(&mut ws, 1001).await;
    wait_status(&client, "reconnecting", |s| matches!(s, Status::Reconnecting { .. })).await;
    room.send("say", &json!({"text": "held"})).await.unwrap();

    // The server never answers the rejoin: after the call timeout the
    // client goes live anyway and flushes what it held.
    let mut ws = accept_raw(&listener).await;
    send(&mut ws, hello(0, 0)).await;
    let rejoin = recv(&mut ws).await;
    assert_eq!(rejoin["type"], "join");
    let held = recv(&mut ws).await;
    assert_eq!((held["type"].as_str(), held["data"]["text"].as_str()), (Some("call"), Some("held")), "{held}");
    connected(&client).await;
    // A late answer to the rejoin is still taken.
    send(&mut ws, json!({"type": "reply", "ref": rejoin["ref"], "data": {"room": "r"}})).await;
    send(&mut ws, json!({"type": "event", "room": "r", "event": "e", "data": {"text": "after"}})).await;
    let mut room = room;
    let (e, other) = next_event(&mut room).await;
    assert_eq!(text(&e), "after");
    assert_eq!(other, [RoomEvent::Rejoined { recovered: false }]);
    assert_eq!(client.stats().late_replies, 0);
}

#[tokio::test]
async fn a_slow_consumer_gap_is_recovered_exactly_once() {
    use switchboard::history::{HistoryConfig, MemoryHistory, RoomHistory};
    use switchboard::{hub::OverflowPolicy, HubConfig};
    // `r…` rooms keep history; `big` does not. The connection's queue
    // holds 16 KiB and drops the oldest when full.
    let config = HubConfig::default().outbound_queue_bytes(16 * 1024).overflow(OverflowPolicy::DropOldest);
    let hub = Hub::builder()
        .config(config)
        .history(MemoryHistory::new(), HistoryConfig::default().rooms("r", RoomHistory::default()))
        .build();
    let addr = serve(&hub).await;
    let client = connect(addr, "x", fast().room_buffer(100_000));
    let room = client.join("r").await.unwrap();
    let big = client.join("big").await.unwrap();
    let Status::Connected { connection_id, .. } = client.status().borrow().clone() else { panic!("not connected") };
    let conn = hub.connection(support::member_id(&hub, "r", connection_id)).unwrap();

    // Publish without yielding: on this single-threaded runtime neither the
    // server's writer nor the client runs, so the queue overflows and the
    // oldest messages, some of `r`'s among them, are dropped. `big`'s
    // events are read from the room's log, which has the same bound, so
    // they lag on their own; the queue is filled by direct messages of
    // 1 KiB of hex noise (the client negotiates `permessage-deflate`, and
    // noise compresses little).
    let pad = "p".repeat(1024);
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    let mut noise = move || {
        (0..128)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                format!("{:08x}", seed as u32)
            })
            .collect::<String>()
    };
    let mut published = 0u64;
    let mut i = 0u64;
    while conn.dropped_messages() < 8 || published < 20 {
        i += 1;
        hub.publish("big", "m", &json!({"pad": pad})).await.unwrap();
        hub.send(conn.id(), "filler", &noise()).unwrap();
        if i % 3 == 0 {
            published += 1;
            hub.publish("r", "m", &json!({"n": published})).await.unwrap();
        }
        assert!(i < 100_000, "the queue never overflowed");
    }
    let end = published + 1;
    hub.publish("r", "end", &json!({"n": end})).await.unwrap();

    // `r` reports the gap, the client rejoins it from before the gap, and
    // every offset is delivered exactly once; `big` (no history) is told
    // that messages were lost.
    let mut delivered = Vec::new();
    let mut gaps = Vec::new();
    while delivered.len() < end as usize {
        let item = match tokio::time::timeout(WAIT, room.recv()).await {
            Ok(Some(item)) => item,
            other => panic!(
                "stalled ({other:?}) after {} of {end} events (missing {:?}); gaps {gaps:?}; {:?}",
                delivered.len(),
                (1..=end).filter(|o| !delivered.contains(o)).collect::<Vec<_>>(),
                client.stats()
            ),
        };
        match item {
            RoomEvent::Event(e) => delivered.push(e.offset.expect("offset")),
            RoomEvent::Gap(g) => {
                assert!(g.recovering && g.reason == "slow_consumer", "{g:?}");
                gaps.push(g);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(!gaps.is_empty(), "no gap reported");
    let mut sorted = delivered.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (1..=end).collect::<Vec<_>>(), "each offset once; gaps {gaps:?}");
    assert!(room.try_recv().is_none(), "nothing more");
    assert_eq!(room.position().map(|p| p.0), Some(end));
    let mut lagged = false;
    while let Some(item) = big.try_recv() {
        lagged |= matches!(item, RoomEvent::ServerLagged { .. });
    }
    assert!(lagged, "the room without history is told about the loss");
}

#[tokio::test]
async fn a_recovery_whose_reply_was_dropped_is_restarted_then_given_up() {
    let (listener, client) = scripted(fast()).await;
    let (mut ws, mut room) = scripted_join(&listener, &client, json!({"room": "r", "epoch": "E", "offset": 5})).await;
    send(&mut ws, json!({"type": "lagged", "data": {"dropped": 2}})).await;
    send(
        &mut ws,
        json!({"type": "gap", "room": "r", "data": {"from": 6, "to": 7, "reason": "slow_consumer", "epoch": "E"}}),
    )
    .await;
    // The recovery: leave, join from 5. Each `lagged` while its reply is
    // outstanding restarts it, three times; the fourth gives up.
    for attempt in 0..4 {
        let leave = recv(&mut ws).await;
        let join = recv(&mut ws).await;
        assert_eq!((leave["type"].as_str(), join["type"].as_str()), (Some("leave"), Some("join")), "attempt {attempt}");
        assert_eq!((join["offset"].as_u64(), join["epoch"].as_str()), (Some(5), Some("E")));
        send(&mut ws, json!({"type": "lagged", "data": {"dropped": 1}})).await;
    }
    let mut items = vec![next(&mut room).await];
    while !matches!(items.last(), Some(RoomEvent::Rejoined { .. })) {
        items.push(next(&mut room).await);
    }
    assert!(matches!(&items[0], RoomEvent::Gap(g) if g.recovering), "{items:?}");
    assert_eq!(items.last(), Some(&RoomEvent::Rejoined { recovered: false }));
    assert!(
        !items.iter().any(|i| matches!(i, RoomEvent::ServerLagged { .. })),
        "a room with history gets gaps, not lagged"
    );
    // Still usable: live events flow.
    send(&mut ws, json!({"type": "event", "room": "r", "event": "e", "offset": 9, "data": {"text": "live"}})).await;
    assert_eq!(next_event(&mut room).await.0.offset, Some(9));
}

#[tokio::test]
async fn a_join_given_up_while_in_flight_is_undone_when_it_completes() {
    let (listener, client) = scripted(fast().call_timeout(Duration::from_millis(300))).await;
    let mut ws = accept_raw(&listener).await;
    send(&mut ws, hello(0, 0)).await;
    connected(&client).await;
    let joiner = {
        let client = client.clone();
        tokio::spawn(async move { client.join("r").await })
    };
    let join = recv(&mut ws).await;
    assert_eq!(join["type"], "join");
    // The server is slow: the application gives up…
    assert_eq!(joiner.await.unwrap().unwrap_err().kind(), ClientErrorKind::Timeout);
    // …then the join completes on the server: the client leaves at once
    // rather than stay a member of a room nobody reads.
    send(&mut ws, json!({"type": "reply", "ref": join["ref"], "data": {"room": "r"}})).await;
    let leave = recv(&mut ws).await;
    assert_eq!((leave["type"].as_str(), leave["room"].as_str()), (Some("leave"), Some("r")), "{leave}");
    send(&mut ws, json!({"type": "reply", "ref": leave["ref"], "data": {"room": "r"}})).await;
    // A ping round trip: the client has handled everything before it.
    send(&mut ws, json!({"type": "ping", "ref": 1})).await;
    assert_eq!(recv(&mut ws).await, json!({"type": "pong", "ref": 1}));
    assert_eq!(client.stats().late_replies, 0, "the leave's reply was expected");
}
