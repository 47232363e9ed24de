//! Shared helpers for the end-to-end tests: a real server on 127.0.0.1:0
//! and a real tokio-tungstenite client that speaks the JSON protocol.
#![allow(dead_code)]

pub mod browser;
pub mod examples;
pub mod fault_proxy;
pub mod nats;
pub mod process;
pub mod redis;
#[cfg(feature = "tls")]
pub mod tls;

use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::time::Duration;
use switchboard::integration::ws;
use switchboard::transport::ws::WsConfig;
use switchboard::Hub;
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long a test waits for an expected message before failing. Generous:
/// it only bounds a failing test, a passing one never waits it out.
pub const WAIT: Duration = Duration::from_secs(10);

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A standalone WebSocket server for `hub` on a free loopback port.
pub async fn serve(hub: &Hub) -> SocketAddr {
    serve_with(hub, WsConfig::default()).await
}

pub async fn serve_with(hub: &Hub, config: WsConfig) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(ws::serve(listener, hub.clone(), config));
    addr
}

/// Serves `hub` on exactly `addr` (after a restart the old listener may take
/// a moment to go away).
pub async fn serve_on(addr: SocketAddr, hub: &Hub) {
    tokio::spawn(ws::serve(bind_again(addr).await, hub.clone(), WsConfig::default()));
}

/// A listener on exactly `addr`, retrying while the previous one goes away.
pub async fn bind_again(addr: SocketAddr) -> TcpListener {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match TcpListener::bind(addr).await {
            Ok(l) => return l,
            Err(e) => {
                assert!(tokio::time::Instant::now() < deadline, "cannot bind {addr} again: {e}");
                tokio::task::yield_now().await;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// A byte stream, plain or TLS.
pub trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin> Io for T {}

/// A protocol client over a real WebSocket.
pub struct Client {
    pub ws: Ws,
    pub hello: Value,
    next_ref: u64,
    /// Messages read while waiting for something else.
    pending: std::collections::VecDeque<Value>,
}

pub async fn connect(addr: SocketAddr) -> Client {
    connect_path(addr, "/").await
}

pub async fn connect_path(addr: SocketAddr, path: &str) -> Client {
    let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}{path}")).await.expect("connect");
    Client::start(ws).await
}

/// Connects offering a subprotocol.
pub async fn connect_protocol(addr: SocketAddr, protocol: &str) -> (Ws, Option<String>) {
    let mut req = format!("ws://{addr}/").into_client_request().unwrap();
    req.headers_mut().insert("sec-websocket-protocol", protocol.parse().unwrap());
    let (ws, resp) = tokio_tungstenite::connect_async(req).await.expect("connect");
    let chosen = resp.headers().get("sec-websocket-protocol").map(|v| v.to_str().unwrap().to_owned());
    (ws, chosen)
}

impl Client {
    pub async fn start(mut ws: Ws) -> Client {
        let hello = next_json(&mut ws).await;
        assert_eq!(hello["type"], "hello", "first message must be hello: {hello}");
        Client { ws, hello, next_ref: 1, pending: Default::default() }
    }

    pub fn connection_id(&self) -> u64 {
        self.hello["data"]["connection_id"].as_u64().unwrap()
    }

    pub async fn send(&mut self, v: Value) {
        self.ws.send(Message::text(v.to_string())).await.expect("send");
    }

    pub async fn send_raw(&mut self, m: Message) {
        self.ws.send(m).await.expect("send");
    }

    pub fn next_ref(&mut self) -> u64 {
        self.next_ref += 1;
        self.next_ref
    }

    /// The next JSON message (from what was set aside first).
    pub async fn recv(&mut self) -> Value {
        if let Some(v) = self.pending.pop_front() {
            return v;
        }
        next_json(&mut self.ws).await
    }

    /// Waits for the reply or error with `r`, setting other messages aside.
    pub async fn reply_to(&mut self, r: u64) -> Value {
        if let Some(pos) =
            self.pending.iter().position(|v| v["ref"] == r && (v["type"] == "reply" || v["type"] == "error"))
        {
            return self.pending.remove(pos).unwrap();
        }
        loop {
            let v = next_json(&mut self.ws).await;
            if v["ref"] == r && (v["type"] == "reply" || v["type"] == "error") {
                return v;
            }
            self.pending.push_back(v);
        }
    }

    /// Waits for the next `event` message, setting others aside.
    pub async fn event(&mut self) -> Value {
        if let Some(pos) = self.pending.iter().position(|v| v["type"] == "event") {
            return self.pending.remove(pos).unwrap();
        }
        loop {
            let v = next_json(&mut self.ws).await;
            if v["type"] == "event" {
                return v;
            }
            self.pending.push_back(v);
        }
    }

    pub async fn request(&mut self, mut v: Value) -> Value {
        let r = self.next_ref();
        v["ref"] = json!(r);
        self.send(v).await;
        self.reply_to(r).await
    }

    pub async fn join(&mut self, room: &str) -> Value {
        self.request(json!({"type": "join", "room": room})).await
    }

    pub async fn join_ok(&mut self, room: &str) {
        let r = self.join(room).await;
        assert_eq!(r["type"], "reply", "join {room}: {r}");
    }

    pub async fn call(&mut self, event: &str, data: Value) -> Value {
        self.request(json!({"type": "call", "event": event, "data": data})).await
    }

    pub async fn call_in(&mut self, room: &str, event: &str, data: Value) -> Value {
        self.request(json!({"type": "call", "room": room, "event": event, "data": data})).await
    }

    /// Reads until the server closes; returns the close code (None if the
    /// socket ended without a close frame).
    pub async fn closed(&mut self) -> Option<u16> {
        expect_close(&mut self.ws).await
    }

    /// Asserts nothing arrives for a short while (used only to check absence
    /// after a later message proved the earlier one would have arrived).
    pub fn pending_events(&self) -> usize {
        self.pending.iter().filter(|v| v["type"] == "event").count()
    }
}

pub async fn next_json(ws: &mut Ws) -> Value {
    loop {
        let msg = tokio::time::timeout(WAIT, ws.next()).await.expect("timed out waiting for a message");
        match msg.expect("stream ended").expect("read error") {
            Message::Text(t) => return serde_json::from_str(&t).expect("server sent invalid JSON"),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected frame {other:?}"),
        }
    }
}

pub async fn expect_close(ws: &mut Ws) -> Option<u16> {
    loop {
        let msg = tokio::time::timeout(WAIT, ws.next()).await.expect("timed out waiting for close");
        match msg {
            None | Some(Err(_)) => return None,
            Some(Ok(Message::Close(frame))) => return frame.map(|f| u16::from(f.code)),
            Some(Ok(_)) => continue,
        }
    }
}

pub fn code(c: u16) -> CloseCode {
    CloseCode::from(c)
}

/// Polls `f` until it is true, yielding in between (for state that settles
/// asynchronously after a socket closes). Fails after `WAIT`.
pub async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !f() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

// ---------------------------------------------------------------------------
// Helpers for tests/rooms.rs and tests/lifecycle.rs (appended).

/// The hub-side id of the member of `room` whose `hello` said `wire_id`
/// (the client must have joined `room`).
pub fn member_id(hub: &Hub, room: &str, wire_id: u64) -> switchboard::ConnectionId {
    hub.room_members(room)
        .into_iter()
        .map(|m| m.connection)
        .find(|c| c.get() == wire_id)
        .unwrap_or_else(|| panic!("connection {wire_id} is not a member of {room}"))
}

/// Reads until the server closes; returns the close frame's code and reason
/// (`None` if the socket ended without a close frame). After the close
/// frame it keeps reading, so tungstenite sends the close reply, until the
/// server ends the socket.
pub async fn expect_close_frame(ws: &mut Ws) -> Option<(u16, String)> {
    let frame = loop {
        let msg = tokio::time::timeout(WAIT, ws.next()).await.expect("timed out waiting for close");
        match msg {
            None | Some(Err(_)) => return None,
            Some(Ok(Message::Close(frame))) => break frame.map(|f| (u16::from(f.code), f.reason.to_string())),
            Some(Ok(_)) => continue,
        }
    };
    while let Some(Ok(_)) = tokio::time::timeout(WAIT, ws.next()).await.expect("socket not ended after close") {}
    frame
}

/// Sends `v` as a MessagePack envelope in a binary frame.
pub async fn send_msgpack(ws: &mut Ws, v: &Value) {
    let bytes = rmp_serde::to_vec_named(v).expect("encode msgpack");
    ws.send(Message::binary(bytes)).await.expect("send");
}

/// The next MessagePack envelope (binary frame), decoded into JSON values.
pub async fn next_msgpack(ws: &mut Ws) -> Value {
    loop {
        let msg = tokio::time::timeout(WAIT, ws.next()).await.expect("timed out waiting for a message");
        match msg.expect("stream ended").expect("read error") {
            Message::Binary(b) => return rmp_serde::from_slice(&b).expect("server sent invalid MessagePack"),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected frame on a MessagePack connection: {other:?}"),
        }
    }
}

/// An axum app with the hub mounted at `/ws` (and a plain route at `/`),
/// served with connect info on a free loopback port.
pub async fn serve_axum(hub: &Hub) -> SocketAddr {
    let app = axum::Router::new()
        .route("/", axum::routing::get(|| async { "plain route" }))
        .route("/ws", switchboard::integration::axum::route(hub.clone()));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>()).await.unwrap();
    });
    addr
}

/// Attempts a WebSocket upgrade at `url` that the server must refuse with an
/// HTTP response; returns its status.
pub async fn refused_status(url: &str) -> u16 {
    match tokio_tungstenite::connect_async(url).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => resp.status().as_u16(),
        Err(e) => panic!("{url}: expected an HTTP refusal, got error {e}"),
        Ok(_) => panic!("{url}: expected an HTTP refusal, but the upgrade succeeded"),
    }
}

/// Sends a plain `GET` (no upgrade headers) and returns the response status.
pub async fn plain_get_status(addr: SocketAddr, path: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut buf = [0u8; 512];
    while !head.windows(2).any(|w| w == b"\r\n") {
        let n = tokio::time::timeout(WAIT, tcp.read(&mut buf)).await.expect("timed out reading response").unwrap();
        assert!(n > 0, "connection closed before a status line: {:?}", String::from_utf8_lossy(&head));
        head.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&head);
    line.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("bad status line: {line}"))
}

// ---------------------------------------------------------------------------
// Helpers for tests/abuse.rs and tests/jwt.rs (appended).

/// Attempts an upgrade at `ws://{addr}{path}` with extra request headers:
/// `Ok` with a started client (its `hello` read), or `Err` with the HTTP
/// refusal's status, headers and body.
pub async fn try_connect(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<Client, (u16, http::HeaderMap, String)> {
    let mut req = format!("ws://{addr}{path}").into_client_request().unwrap();
    for (k, v) in headers {
        req.headers_mut().append(http::HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
    }
    match tokio_tungstenite::connect_async(req).await {
        Ok((ws, _)) => Ok(Client::start(ws).await),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            let body = resp.body().as_ref().map(|b| String::from_utf8_lossy(b).into_owned()).unwrap_or_default();
            Err((resp.status().as_u16(), resp.headers().clone(), body))
        }
        Err(e) => panic!("{path}: expected an upgrade or an HTTP refusal, got {e}"),
    }
}

/// [`try_connect`] that must be refused; returns the status and body.
pub async fn refused_with(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
    match try_connect(addr, path, headers).await {
        Ok(_) => panic!("{path} {headers:?}: expected a refusal, but the upgrade succeeded"),
        Err((status, _, body)) => (status, body),
    }
}

/// The next message, which must be an `error` with `code` and `reference`;
/// returns it.
pub async fn expect_error_code(c: &mut Client, code: u32, reference: Option<u64>) -> Value {
    let v = c.recv().await;
    assert_eq!(v["type"], "error", "expected error {code}: {v}");
    assert_eq!(v["code"], code, "{v}");
    match reference {
        Some(r) => assert_eq!(v["ref"], r, "{v}"),
        None => assert!(v.get("ref").is_none(), "unexpected ref in {v}"),
    }
    v
}

/// A JSON protocol client over the in-memory transport (for tests that run
/// on paused time). Serves `peer`'s other half on `hub` in a spawned task.
pub struct MemClient {
    pub peer: switchboard::transport::memory::MemoryPeer,
    pub hello: Value,
}

impl MemClient {
    pub async fn connect(hub: &Hub, handshake: switchboard::Handshake) -> switchboard::Result<MemClient> {
        let (transport, peer) = switchboard::transport::memory::pair(1024);
        let identity = hub.authenticate(&handshake).await?;
        let served = hub.clone();
        tokio::spawn(async move { served.serve(transport, &handshake, identity).await });
        let mut c = MemClient { peer, hello: Value::Null };
        c.hello = c.recv().await;
        assert_eq!(c.hello["type"], "hello", "{}", c.hello);
        Ok(c)
    }

    pub async fn send(&mut self, v: Value) {
        self.peer.send(switchboard::transport::Frame::Text(v.to_string().into())).await.expect("send");
    }

    /// The next envelope; panics on a close or the end.
    pub async fn recv(&mut self) -> Value {
        loop {
            match self.recv_frame().await {
                Some(switchboard::transport::Frame::Text(b)) => {
                    return serde_json::from_slice(&b).expect("invalid JSON")
                }
                Some(switchboard::transport::Frame::Ping(_)) => continue,
                other => panic!("expected a message, got {other:?}"),
            }
        }
    }

    pub async fn recv_frame(&mut self) -> Option<switchboard::transport::Frame> {
        tokio::time::timeout(WAIT, self.peer.recv()).await.expect("timed out waiting for the server")
    }

    /// The close frame's code (skipping other frames).
    pub async fn closed(&mut self) -> Option<u16> {
        loop {
            match self.recv_frame().await {
                None => return None,
                Some(switchboard::transport::Frame::Close(c)) => return c.map(|c| c.code.0),
                Some(_) => continue,
            }
        }
    }
}

/// The next `event`'s stream offset and its `data.n`.
pub async fn next_offset(c: &mut Client) -> (u64, u64) {
    let e = c.event().await;
    let offset = e["offset"].as_u64().unwrap_or_else(|| panic!("event without offset: {e}"));
    (offset, e["data"]["n"].as_u64().unwrap_or(0))
}

/// Publishes `{"n": n}` as event `m` for each n of `range`, in order.
pub async fn publish_range(hub: &Hub, room: &str, range: std::ops::RangeInclusive<u64>) {
    for n in range {
        hub.publish(room, "m", &json!({"n": n})).await.unwrap();
    }
}

/// Publishes 8 KB events `m` (`{"n": 1..}`) to `room` until `slow` (a
/// member that reads nothing) had some dropped under the drop-oldest
/// policy, then 20 more and an `end` (`{"n": 0}`); returns the `end`'s
/// offset (the number of events published).
pub async fn publish_until_dropped(hub: &Hub, room: &str, slow: &switchboard::hub::Connection) -> u64 {
    let pad = "p".repeat(8 * 1024);
    let mut published = 0u64;
    while slow.dropped_messages() == 0 {
        published += 1;
        hub.publish(room, "m", &json!({"n": published, "pad": pad})).await.unwrap();
        if published % 64 == 0 {
            tokio::task::yield_now().await;
        }
        assert!(published < 100_000, "the queue never overflowed");
    }
    for _ in 0..20 {
        published += 1;
        hub.publish(room, "m", &json!({"n": published, "pad": pad})).await.unwrap();
    }
    hub.publish(room, "end", &json!({"n": 0})).await.unwrap();
    published + 1
}

/// Two hubs, linked by a backplane and sharing one history store, with every
/// room recoverable: both publish `per_node` events concurrently and both
/// deliver one sequence, offsets 1.. in order; a client that drops from node
/// 2 rejoins on node 1 and gets exactly what it missed, then live events of
/// node 2. Run on each backplane/store pair.
pub async fn two_nodes_share_one_stream(hub1: &Hub, hub2: &Hub, per_node: u64) {
    let (addr1, addr2) = (serve(hub1).await, serve(hub2).await);
    let mut c1 = connect(addr1).await;
    let mut c2 = connect(addr2).await;
    c1.join_ok("r").await;
    let epoch = c2.join("r").await["data"]["epoch"].as_str().unwrap().to_owned();

    let p1 = tokio::spawn({
        let hub = hub1.clone();
        async move { publish_range(&hub, "r", 1..=per_node).await }
    });
    let p2 = tokio::spawn({
        let hub = hub2.clone();
        async move { publish_range(&hub, "r", 1001..=1000 + per_node).await }
    });
    p1.await.unwrap();
    p2.await.unwrap();
    let total = 2 * per_node;
    let (mut seq1, mut seq2) = (Vec::new(), Vec::new());
    for _ in 0..total {
        seq1.push(next_offset(&mut c1).await);
        seq2.push(next_offset(&mut c2).await);
    }
    assert_eq!(seq1.iter().map(|s| s.0).collect::<Vec<_>>(), (1..=total).collect::<Vec<_>>(), "node 1 order");
    assert_eq!(seq1, seq2, "both nodes deliver the same sequence");

    drop(c2);
    publish_range(hub1, "r", 2001..=2010).await;
    let mut back = connect(addr1).await;
    let reply = back.request(json!({"type": "join", "room": "r", "offset": total, "epoch": epoch})).await;
    assert_eq!(reply["data"]["recovered"], true, "{reply}");
    assert_eq!(reply["data"]["offset"], total + 10, "{reply}");
    for (offset, n) in (total + 1..=total + 10).zip(2001..=2010) {
        assert_eq!(next_offset(&mut back).await, (offset, n));
    }
    hub2.publish("r", "m", &json!({"n": 3000})).await.unwrap();
    assert_eq!(next_offset(&mut back).await, (total + 11, 3000), "live events from the other node follow");
    assert_eq!(back.pending_events(), 0);
}

/// A well-behaved client in room `lobby` that checks, after each bad input
/// elsewhere, that it still gets every event, next in line and in order.
/// The hub needs a `shout` handler that broadcasts its `data` as `tick`.
pub struct Bystander {
    pub client: Client,
    /// Sequence number of the last event sent to `lobby`.
    seq: u64,
}

impl Bystander {
    /// Joins `client` to `lobby` and checks a first round of events.
    pub async fn join(mut client: Client, hub: &Hub) -> Bystander {
        client.join_ok("lobby").await;
        let mut b = Bystander { client, seq: 0 };
        b.tick(hub).await;
        b
    }

    /// The bystander gets two more events, next in line and in order: one
    /// published by the host, one broadcast by a handler it calls.
    pub async fn tick(&mut self, hub: &Hub) {
        self.seq += 1;
        let published = self.seq;
        hub.publish("lobby", "tick", &json!({ "seq": published })).await.expect("publish");
        self.seq += 1;
        let shouted = self.seq;
        let r = self.client.call_in("lobby", "shout", json!({ "seq": shouted })).await;
        assert_eq!(r["type"], "reply", "bystander's call failed: {r}");
        for seq in [published, shouted] {
            let e = self.client.event().await;
            assert_eq!(e, json!({"type": "event", "room": "lobby", "event": "tick", "data": {"seq": seq}}));
        }
        assert_eq!(self.client.pending_events(), 0, "bystander got extra events");
    }
}

/// An authenticator for tests: the `user` query parameter is the user id
/// (none: anonymous).
pub fn user_from_query(
    hs: &switchboard::Handshake,
) -> impl std::future::Future<Output = Result<switchboard::Identity, switchboard::Rejection>> + Send + 'static {
    let user = hs.query("user");
    async move { Ok(user.map(switchboard::Identity::user).unwrap_or_default()) }
}

/// The presence keys of `room` as `hub` lists them, sorted.
pub async fn keys_of(hub: &Hub, room: &str) -> Vec<String> {
    let mut keys: Vec<String> = hub.presence(room).await.unwrap().into_iter().map(|e| e.key).collect();
    keys.sort();
    keys
}

/// A room's presence as a client sees it: key -> metas (by `ref`), built
/// from `presence_state` and `presence_diff` the documented way.
pub type PresenceView = std::collections::BTreeMap<String, std::collections::BTreeMap<String, Value>>;

/// Applies `room`'s presence messages to `view` until `done` accepts it;
/// other messages are set aside. Fails after [`WAIT`].
pub async fn presence_until(c: &mut Client, room: &str, view: &mut PresenceView, done: impl Fn(&PresenceView) -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let next = async {
            if let Some(pos) = c.pending.iter().position(|v| v["room"] == room && is_presence(v)) {
                return c.pending.remove(pos).unwrap();
            }
            loop {
                let v = next_json(&mut c.ws).await;
                if v["room"] == room && is_presence(&v) {
                    return v;
                }
                c.pending.push_back(v);
            }
        };
        let v = tokio::time::timeout_at(deadline, next)
            .await
            .unwrap_or_else(|_| panic!("presence of {room} never became as expected (last seen {view:?})"));
        let metas = |part: &Value| -> Vec<(String, Value)> {
            let entries = part.as_object().into_iter().flatten();
            entries
                .flat_map(|(k, e)| e["metas"].as_array().into_iter().flatten().map(move |m| (k.clone(), m.clone())))
                .collect()
        };
        if v["type"] == "presence_state" {
            view.clear();
        }
        for (key, meta) in metas(&v["data"]["presences"]).into_iter().chain(metas(&v["data"]["joins"])) {
            view.entry(key).or_default().insert(meta["ref"].as_str().unwrap_or_default().to_owned(), meta);
        }
        for (key, meta) in metas(&v["data"]["leaves"]) {
            if let Some(m) = view.get_mut(&key) {
                m.remove(meta["ref"].as_str().unwrap_or_default());
                if m.is_empty() {
                    view.remove(&key);
                }
            }
        }
        // Flag changes alone: key -> ref -> flags (`null`: gone).
        for (key, refs) in v["data"]["ephemeral"].as_object().into_iter().flatten() {
            for (r, flags) in refs.as_object().into_iter().flatten() {
                let Some(meta) = view.get_mut(key).and_then(|m| m.get_mut(r)) else { continue };
                let Some(ephemeral) = meta["ephemeral"].as_object_mut() else { continue };
                for (flag, value) in flags.as_object().into_iter().flatten() {
                    if value.is_null() {
                        ephemeral.remove(flag);
                    } else {
                        ephemeral.insert(flag.clone(), value.clone());
                    }
                }
            }
        }
        if done(view) {
            return;
        }
    }
}

fn is_presence(v: &Value) -> bool {
    v["type"] == "presence_state" || v["type"] == "presence_diff"
}

// ---------------------------------------------------------------------------
// Helpers for the `integration::axum::serve` tests (appended).

/// The hub's WebSocket route at `/` and a plain page at `/page` (a `POST`
/// to `/echo` answers its body), served by `integration::axum::serve` with
/// `config` on a free loopback port.
pub async fn serve_safe(hub: &Hub, config: switchboard::integration::axum::ServeConfig) -> SocketAddr {
    use std::future::IntoFuture;
    let app = axum::Router::new()
        .route("/", switchboard::integration::axum::route(hub.clone()))
        .route("/page", axum::routing::get(|| async { "page" }))
        .route("/echo", axum::routing::post(|body: String| async move { body }));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(switchboard::integration::axum::serve(listener, app, config).into_future());
    addr
}

/// Connects to `addr`, sends `request` (maybe nothing, maybe half a
/// request), and reads until the server closes the connection: everything
/// it answered. Fails if the server keeps the connection open past `WAIT`.
pub async fn until_closed(addr: SocketAddr, request: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    if !request.is_empty() {
        tcp.write_all(request).await.unwrap();
    }
    let mut answer = Vec::new();
    match tokio::time::timeout(WAIT, tcp.read_to_end(&mut answer)).await {
        Ok(Ok(_)) => {}
        // A reset after the answer (the server closed with unread input).
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Ok(Err(e)) => panic!("read failed: {e}"),
        Err(_) => panic!("the server kept the connection open; it answered {:?}", String::from_utf8_lossy(&answer)),
    }
    String::from_utf8_lossy(&answer).into_owned()
}
