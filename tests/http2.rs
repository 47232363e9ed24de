//! HTTP/2 in `integration::axum::serve` (issue 20): SSE over h2 (ALPN over
//! TLS) and h2c (cleartext, prior knowledge) with hyper's own HTTP/2
//! client: events, keep-alive comments, `POST` upstream on the same
//! connection, resume with `Last-Event-ID`, many streams on one connection,
//! and the limits (per-address sessions, idle and silent connections,
//! header counts) as they apply to HTTP/2.

mod support;

use bytes::Bytes;
use http::{Method, Request, StatusCode, Version};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use support::tls::pki;
use support::WAIT;
use switchboard::integration::axum::{serve, ServeConfig};
use switchboard::integration::sse::{SseConfig, SseEndpoint};
use switchboard::security::SecurityConfig;
use switchboard::{Call, CallError, Hub};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn echo_hub() -> switchboard::HubBuilder {
    Hub::builder().on("echo", |_call: Call, v: Value| async move { Ok::<_, CallError>(v) })
}

/// Serves `/events` (SSE on `hub`) and `/version` (the request's HTTP
/// version) with `integration::axum::serve`; over TLS with `tls`.
async fn start(hub: &Hub, sse: SseConfig, config: ServeConfig, tls: bool) -> SocketAddr {
    let endpoint = SseEndpoint::builder(hub.clone()).config(sse).build();
    let app = axum::Router::new()
        .route("/events", switchboard::integration::axum::sse(endpoint))
        .route(
            "/version",
            axum::routing::get(|req: axum::extract::Request| async move { format!("{:?}", req.version()) }),
        )
        .route("/ws", switchboard::integration::axum::route(hub.clone()));
    let config = if tls { config.tls(pki().server_config(&[])) } else { config };
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(std::future::IntoFuture::into_future(
        serve(listener, app, config).with_graceful_shutdown(hub.shutdown_started()),
    ));
    addr
}

/// One HTTP/2 client connection (hyper's client).
struct H2 {
    send: SendRequest<Full<Bytes>>,
    /// The connection's task: finishes when the connection closes.
    conn: tokio::task::JoinHandle<Result<(), hyper::Error>>,
}

async fn handshake<I>(io: I) -> H2
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .handshake(io)
        .await
        .expect("HTTP/2 handshake");
    H2 { send, conn: tokio::spawn(conn) }
}

/// h2c: HTTP/2 with prior knowledge over plain TCP.
async fn h2c(addr: SocketAddr) -> H2 {
    handshake(TokioIo::new(TcpStream::connect(addr).await.unwrap())).await
}

/// h2 over TLS, chosen by ALPN (the client offers only `h2`).
async fn h2_tls(addr: SocketAddr) -> H2 {
    let mut config = (*pki().client_config()).clone();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp).await.expect("TLS handshake");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]), "the server picks h2 by ALPN");
    handshake(TokioIo::new(tls)).await
}

impl H2 {
    async fn request(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> http::Response<Incoming> {
        let mut req = Request::builder().method(method).uri(format!("http://localhost{path}"));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(Full::new(Bytes::from(body.to_owned()))).unwrap();
        let mut send = self.send.clone();
        let res = tokio::time::timeout(WAIT, async {
            send.ready().await.expect("connection open");
            send.send_request(req).await
        })
        .await
        .expect("an answer")
        .expect("the request went through");
        assert_eq!(res.version(), Version::HTTP_2);
        res
    }

    /// Opens an event stream at `path`.
    async fn stream(&self, path: &str, headers: &[(&str, &str)]) -> Stream {
        let mut all = vec![("accept", "text/event-stream")];
        all.extend_from_slice(headers);
        let res = self.request(Method::GET, path, &all, "").await;
        assert_eq!(res.status(), StatusCode::OK);
        assert!(res.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
        Stream { body: res.into_body(), text: String::new(), last_id: String::new() }
    }

    /// POSTs `body` to the session of `session` (a `$session` event's data).
    async fn post(&self, session: &Value, body: &str) -> (StatusCode, String) {
        let headers = [
            ("content-type", "application/json"),
            ("switchboard-session", session["session"].as_str().unwrap()),
            ("switchboard-secret", session["secret"].as_str().unwrap()),
        ];
        let res = self.request(Method::POST, "/events", &headers, body).await;
        let status = res.status();
        let body = tokio::time::timeout(WAIT, res.into_body().collect()).await.unwrap().unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }
}

#[derive(Debug)]
enum Item {
    Event { event: String, data: String },
    Comment(String),
}

/// An event stream read off one HTTP/2 stream.
struct Stream {
    body: Incoming,
    text: String,
    /// The last `id:` seen.
    last_id: String,
}

impl Stream {
    async fn item(&mut self) -> Item {
        loop {
            if let Some(end) = self.text.find("\n\n") {
                let block: String = self.text.drain(..end + 2).collect();
                let (mut event, mut data, mut comment) = (String::from("message"), None::<String>, None);
                for line in block.lines().filter(|l| !l.is_empty()) {
                    let (name, value) = line.split_once(':').unwrap_or((line, ""));
                    let value = value.strip_prefix(' ').unwrap_or(value);
                    match name {
                        "" => comment = Some(value.to_owned()),
                        "event" => event = value.to_owned(),
                        "data" => data = Some(data.map_or(value.to_owned(), |d| d + "\n" + value)),
                        "id" => self.last_id = value.to_owned(),
                        _ => {}
                    }
                }
                match (data, comment) {
                    (Some(data), _) => return Item::Event { event, data },
                    (None, Some(c)) => return Item::Comment(c),
                    (None, None) => continue,
                }
            }
            let frame = tokio::time::timeout(WAIT, self.body.frame())
                .await
                .expect("timed out waiting for the event stream")
                .expect("the stream ended")
                .expect("the stream failed");
            if let Ok(data) = frame.into_data() {
                self.text.push_str(std::str::from_utf8(&data).unwrap());
            }
        }
    }

    /// The next event named `name` (others skipped): its data as JSON.
    async fn wait_for(&mut self, name: &str) -> Value {
        loop {
            if let Item::Event { event, data } = self.item().await {
                if event == name {
                    return serde_json::from_str(&data).unwrap();
                }
            }
        }
    }

    /// Reads until the comment line `text` (other items skipped).
    async fn comment(&mut self, text: &str) {
        loop {
            if let Item::Comment(c) = self.item().await {
                if c == text {
                    return;
                }
            }
        }
    }
}

/// Events, a keep-alive comment, a `POST` upstream on the same connection
/// and its reply on the stream.
async fn events_keep_alive_and_post(h2: &H2, hub: &Hub) {
    assert_eq!(version(h2).await, "HTTP/2.0");
    let mut es = h2.stream("/events?room=a", &[]).await;
    let session = es.wait_for("$session").await;
    es.wait_for("$hello").await;
    assert_eq!(es.wait_for("$joined").await["room"], "a");
    hub.publish("a", "tick", &json!({"n": 1})).await.unwrap();
    assert_eq!(es.wait_for("tick").await["data"], json!({"n": 1}));
    // Keep-alive comments go out over HTTP/2 too.
    es.comment("keep-alive").await;

    let (status, body) = h2.post(&session, r#"{"type":"call","ref":1,"event":"echo","data":{"x":"h2"}}"#).await;
    assert_eq!((status, body.as_str()), (StatusCode::ACCEPTED, r#"{"accepted":1}"#));
    let reply = es.wait_for("$reply").await;
    assert_eq!(reply, json!({"type": "reply", "ref": 1, "data": {"x": "h2"}}));
}

async fn version(h2: &H2) -> String {
    let res = h2.request(Method::GET, "/version", &[], "").await;
    String::from_utf8(res.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap()
}

fn keep_alive_soon() -> SseConfig {
    SseConfig::default().keep_alive(Duration::from_millis(200))
}

#[tokio::test]
async fn sse_over_h2_chosen_by_alpn() {
    let hub = echo_hub().build();
    let addr = start(&hub, keep_alive_soon(), ServeConfig::default(), true).await;
    let h2 = h2_tls(addr).await;
    events_keep_alive_and_post(&h2, &hub).await;
    hub.shutdown(WAIT).await;
}

#[tokio::test]
async fn sse_over_h2c_with_prior_knowledge() {
    let hub = echo_hub().build();
    let addr = start(&hub, keep_alive_soon(), ServeConfig::default(), false).await;
    let h2 = h2c(addr).await;
    events_keep_alive_and_post(&h2, &hub).await;
    // HTTP/1.1 on the same port still works.
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"GET /version HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut got = String::new();
    tokio::time::timeout(WAIT, tcp.read_to_string(&mut got)).await.unwrap().unwrap();
    assert!(got.starts_with("HTTP/1.1 200") && got.ends_with("HTTP/1.1"), "{got}");
    hub.shutdown(WAIT).await;
}

/// With `http2_cleartext(false)` the preface is not HTTP/2: hyper's
/// HTTP/1.1 parser refuses it, and the HTTP/2 client fails.
#[tokio::test]
async fn h2c_can_be_turned_off() {
    let hub = echo_hub().build();
    let addr = start(&hub, SseConfig::default(), ServeConfig::default().http2_cleartext(false), false).await;
    let io = TokioIo::new(TcpStream::connect(addr).await.unwrap());
    let (mut send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .handshake::<_, Full<Bytes>>(io)
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::get("http://localhost/version").body(Full::new(Bytes::new())).unwrap();
    let res = tokio::time::timeout(WAIT, async {
        send.ready().await?;
        send.send_request(req).await
    })
    .await
    .expect("the client gives up");
    assert!(res.is_err(), "{res:?}");
}

/// A stream dropped on an HTTP/2 connection resumes on a new stream of the
/// same connection with `Last-Event-ID`: exactly the missed events.
#[tokio::test]
async fn resume_with_last_event_id_over_h2() {
    let history = switchboard::history::MemoryHistory::new();
    let hub = echo_hub().history(history, switchboard::history::HistoryConfig::all_rooms()).build();
    let addr = start(&hub, SseConfig::default(), ServeConfig::default(), true).await;
    let h2 = h2_tls(addr).await;
    let mut es = h2.stream("/events?room=a", &[]).await;
    es.wait_for("$joined").await;
    for n in 1..=2 {
        hub.publish("a", "m", &json!({"n": n})).await.unwrap();
    }
    assert_eq!(es.wait_for("m").await["data"]["n"], 1);
    assert_eq!(es.wait_for("m").await["data"]["n"], 2);
    let id = es.last_id.clone();
    assert!(id.starts_with("s1.") && id.contains(":2:"), "{id}");
    // The stream is reset (the client drops it); the connection stays.
    drop(es);
    let deadline = tokio::time::Instant::now() + WAIT;
    while hub.stats().connections > 0 {
        assert!(tokio::time::Instant::now() < deadline, "the session ends with its stream");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for n in 3..=4 {
        hub.publish("a", "m", &json!({"n": n})).await.unwrap();
    }
    let mut es = h2.stream("/events?room=a", &[("last-event-id", &id)]).await;
    assert_eq!(es.wait_for("$joined").await["recovered"], true);
    hub.publish("a", "m", &json!({"n": 5})).await.unwrap();
    for n in 3..=5 {
        assert_eq!(es.wait_for("m").await["data"]["n"], n, "the missed events in order, then live");
    }
    assert!(!h2.conn.is_finished(), "one connection throughout");
    hub.shutdown(WAIT).await;
}

/// Thirty streams on one h2c connection, all live: each gets the event
/// published after all are open.
#[tokio::test]
async fn many_streams_share_one_connection() {
    const STREAMS: usize = 30;
    let hub = echo_hub().build();
    let addr = start(&hub, SseConfig::default(), ServeConfig::default(), false).await;
    let h2 = h2c(addr).await;
    let mut streams = Vec::new();
    for _ in 0..STREAMS {
        let mut es = h2.stream("/events?room=many", &[]).await;
        es.wait_for("$joined").await;
        streams.push(es);
    }
    assert_eq!(hub.room_len("many"), STREAMS);
    hub.publish("many", "all", &"here").await.unwrap();
    for es in &mut streams {
        assert_eq!(es.wait_for("all").await["data"], "here");
    }
    assert!(!h2.conn.is_finished());
    hub.shutdown(WAIT).await;
}

/// The hub's per-address limit counts sessions, not connections: one HTTP/2
/// connection carrying many streams gets no more than the limit.
#[tokio::test]
async fn the_per_address_limit_counts_streams() {
    let security = SecurityConfig::default().max_connections_per_ip(3).per_ip_exempt(Vec::new());
    let hub = echo_hub().security(security).build();
    let addr = start(&hub, SseConfig::default().retry_refusals(false), ServeConfig::default(), false).await;
    let h2 = h2c(addr).await;
    let mut open = Vec::new();
    for _ in 0..3 {
        let mut es = h2.stream("/events?room=a", &[]).await;
        es.wait_for("$joined").await;
        open.push(es);
    }
    let res = h2.request(Method::GET, "/events?room=a", &[("accept", "text/event-stream")], "").await;
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(hub.stats().connections, 3);
    // One stream ends: its place is free again, on the same connection.
    drop(open.pop());
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let res = h2.request(Method::GET, "/events?room=a", &[("accept", "text/event-stream")], "").await;
        if res.status() == StatusCode::OK {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the place is given back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    hub.shutdown(WAIT).await;
}

/// An HTTP/2 connection with no request in flight is closed after the head
/// timeout (HTTP/2 has no head timeout of its own); one carrying a stream
/// is not.
#[tokio::test]
async fn idle_h2_connections_close_and_busy_ones_stay() {
    let hub = echo_hub().build();
    let config = ServeConfig::default().header_read_timeout(Duration::from_millis(300));
    let addr = start(&hub, SseConfig::default(), config, false).await;
    let idle = h2c(addr).await;
    assert_eq!(version(&idle).await, "HTTP/2.0");
    let busy = h2c(addr).await;
    let mut es = busy.stream("/events?room=a", &[]).await;
    es.wait_for("$joined").await;
    tokio::time::timeout(WAIT, idle.conn).await.expect("the idle connection is closed").unwrap().unwrap();
    hub.publish("a", "still", &1).await.unwrap();
    assert_eq!(es.wait_for("still").await["data"], 1, "the connection with a stream stays");
    assert!(!busy.conn.is_finished());
    hub.shutdown(WAIT).await;
}

/// A socket that sends nothing, or only part of the HTTP/2 preface, is
/// closed after the head timeout.
#[tokio::test]
async fn silent_and_half_preface_sockets_are_closed() {
    let hub = echo_hub().build();
    let config = ServeConfig::default().header_read_timeout(Duration::from_millis(300));
    let addr = start(&hub, SseConfig::default(), config, false).await;
    for first in [&b""[..], b"PRI * HTTP/2.0\r\n"] {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(first).await.unwrap();
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(WAIT, tcp.read(&mut buf)).await.expect("the server closes the socket");
        assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    }
}

/// [`ServeConfig::max_headers`] holds over HTTP/2 too (`431`), and so does
/// the head size (as the header list size).
#[tokio::test]
async fn header_limits_hold_over_h2() {
    let hub = echo_hub().build();
    let addr = start(&hub, SseConfig::default(), ServeConfig::default().max_headers(8), true).await;
    let h2 = h2_tls(addr).await;
    let names: Vec<String> = (0..10).map(|i| format!("x-h{i}")).collect();
    let many: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "v")).collect();
    let res = h2.request(Method::GET, "/version", &many, "").await;
    assert_eq!(res.status(), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    let big = "v".repeat(9000);
    let req = Request::get("http://localhost/version").header("x-big", &big).body(Full::new(Bytes::new())).unwrap();
    let mut send = h2.send.clone();
    let res = tokio::time::timeout(WAIT, send.send_request(req)).await.expect("an answer");
    assert!(res.as_ref().map_or(true, |r| r.status() == StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE), "{res:?}");
    // The connection goes on.
    assert_eq!(version(&h2).await, "HTTP/2.0");
}

/// Opens a WebSocket over HTTP/2 (RFC 8441's extended `CONNECT`) on `h2`:
/// the answer, and the WebSocket when it is `200`.
async fn connect_ws(
    h2: &H2,
    version: &str,
) -> (http::Response<Incoming>, Option<tokio_tungstenite::WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>>) {
    let req = Request::builder()
        .method(Method::CONNECT)
        .uri("http://localhost/ws")
        .extension(hyper::ext::Protocol::from_static("websocket"))
        .header("sec-websocket-version", version)
        .header("sec-websocket-protocol", "switchboard.v1.json")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let mut send = h2.send.clone();
    let mut res = tokio::time::timeout(WAIT, send.send_request(req)).await.unwrap().unwrap();
    if res.status() != StatusCode::OK {
        return (res, None);
    }
    let upgraded = tokio::time::timeout(WAIT, hyper::upgrade::on(&mut res)).await.unwrap().unwrap();
    let role = tokio_tungstenite::tungstenite::protocol::Role::Client;
    let ws = tokio_tungstenite::WebSocketStream::from_raw_socket(TokioIo::new(upgraded), role, None).await;
    (res, Some(ws))
}

/// The next text message of `ws` whose `type` is `kind`, as JSON.
async fn next_of<S>(ws: &mut tokio_tungstenite::WebSocketStream<S>, kind: &str) -> Value
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use futures::StreamExt;
    loop {
        let msg = tokio::time::timeout(WAIT, ws.next()).await.expect("a message").expect("open").unwrap();
        if let tokio_tungstenite::tungstenite::Message::Text(t) = msg {
            let v: Value = serde_json::from_str(&t).unwrap();
            if v["type"] == kind {
                return v;
            }
        }
    }
}

/// WebSocket over HTTP/2 (RFC 8441): an extended `CONNECT` on a connection
/// that also carries an SSE stream gets `200` and the subprotocol, and the
/// WebSocket works on that stream (hello, a call and its reply). The
/// WebSocket alone keeps the connection from being closed as idle; once it
/// is closed too, the idle connection is.
#[tokio::test]
async fn websocket_over_h2_extended_connect() {
    use futures::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    let hub = echo_hub().build();
    let config = ServeConfig::default().header_read_timeout(Duration::from_millis(300));
    let addr = start(&hub, SseConfig::default(), config, false).await;
    let h2 = h2c(addr).await;
    let mut es = h2.stream("/events?room=a", &[]).await;
    es.wait_for("$joined").await;

    let (res, ws) = connect_ws(&h2, "13").await;
    assert_eq!(res.status(), StatusCode::OK, "RFC 8441 answers 200");
    assert_eq!(res.headers()["sec-websocket-protocol"], "switchboard.v1.json");
    let mut ws = ws.unwrap();
    next_of(&mut ws, "hello").await;
    let call = |n: u64| Message::text(format!(r#"{{"type":"call","ref":{n},"event":"echo","data":{{"n":{n}}}}}"#));
    ws.send(call(1)).await.unwrap();
    assert_eq!(next_of(&mut ws, "reply").await, json!({"type": "reply", "ref": 1, "data": {"n": 1}}));
    assert_eq!(hub.stats().connections, 2, "the SSE stream and the WebSocket, on one connection");

    // The SSE stream goes; the WebSocket alone outlives several idle
    // periods.
    drop(es);
    let deadline = tokio::time::Instant::now() + WAIT;
    while hub.stats().connections > 1 {
        assert!(tokio::time::Instant::now() < deadline, "the SSE session ends");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(1200)).await;
    ws.send(call(2)).await.unwrap();
    assert_eq!(next_of(&mut ws, "reply").await["ref"], 2);
    assert!(!h2.conn.is_finished());

    ws.close(None).await.unwrap();
    tokio::time::timeout(WAIT, h2.conn).await.expect("then the idle connection is closed").unwrap().unwrap();
    assert_eq!(hub.stats().connections, 0);
    hub.shutdown(WAIT).await;
}

/// An HTTP/2 request to the WebSocket route that is not a well-formed
/// extended `CONNECT` is refused with its reason.
#[tokio::test]
async fn bad_websocket_requests_over_h2_are_refused() {
    let hub = echo_hub().build();
    let addr = start(&hub, SseConfig::default(), ServeConfig::default(), false).await;
    let h2 = h2c(addr).await;
    let res = h2.request(Method::GET, "/ws", &[("sec-websocket-version", "13")], "").await;
    assert_eq!(res.status(), StatusCode::METHOD_NOT_ALLOWED);
    let (res, ws) = connect_ws(&h2, "8").await;
    assert!(ws.is_none());
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
    assert_eq!(res.headers()["sec-websocket-version"], "13");
    assert_eq!(hub.stats().connections, 0);
}

/// HTTP/2 requests carry their host in `:authority`, not `Host`: the
/// same-origin checks still see it (a page's own `Origin` passes, another
/// is refused), for an SSE `POST` and a WebSocket alike.
#[tokio::test]
async fn same_origin_checks_read_the_authority() {
    let hub = echo_hub().build();
    let addr = start(&hub, SseConfig::default(), ServeConfig::default(), true).await;
    let h2 = h2_tls(addr).await;
    let mut es = h2.stream("/events?room=a", &[]).await;
    let session = es.wait_for("$session").await;
    let (id, secret) = (session["session"].as_str().unwrap(), session["secret"].as_str().unwrap());
    let post = |origin: &'static str| {
        let headers = [
            ("content-type", "application/json"),
            ("origin", origin),
            ("switchboard-session", id),
            ("switchboard-secret", secret),
        ];
        let h2 = &h2;
        async move { h2.request(Method::POST, "/events", &headers, r#"{"type":"ping","ref":1}"#).await.status() }
    };
    assert_eq!(post("https://localhost").await, StatusCode::ACCEPTED);
    assert_eq!(post("https://elsewhere.example").await, StatusCode::FORBIDDEN);
    let ws = |origin: &'static str| {
        let req = Request::builder()
            .method(Method::CONNECT)
            .uri("https://localhost/ws")
            .extension(hyper::ext::Protocol::from_static("websocket"))
            .header("sec-websocket-version", "13")
            .header("origin", origin)
            .body(Full::new(Bytes::new()))
            .unwrap();
        let mut send = h2.send.clone();
        async move { tokio::time::timeout(WAIT, send.send_request(req)).await.unwrap().unwrap().status() }
    };
    assert_eq!(ws("https://localhost").await, StatusCode::OK);
    assert_eq!(ws("https://elsewhere.example").await, StatusCode::FORBIDDEN);
    hub.shutdown(WAIT).await;
}

/// A bare HTTP/2 client writing frames by hand (HPACK literals, no
/// Huffman): hyper's and h2's clients hold a stream over the peer's
/// `SETTINGS_MAX_CONCURRENT_STREAMS` back themselves, so only a client
/// that does not can show the server enforcing it.
struct RawH2 {
    tcp: TcpStream,
    /// The server's `SETTINGS_MAX_CONCURRENT_STREAMS`, once its SETTINGS came.
    max_streams: Option<u32>,
}

/// Frame types and the error codes used here (RFC 9113 §6, §7).
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const WINDOW_UPDATE: u8 = 0x8;
const REFUSED_STREAM: u32 = 0x7;
const CANCEL: u32 = 0x8;

impl RawH2 {
    /// h2c with prior knowledge: the preface, our SETTINGS (1 MiB stream
    /// windows) and a large connection window; then waits for the server's
    /// SETTINGS and acknowledges them.
    async fn connect(addr: SocketAddr) -> RawH2 {
        let mut h2 = RawH2 { tcp: TcpStream::connect(addr).await.unwrap(), max_streams: None };
        h2.tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.unwrap();
        // SETTINGS_INITIAL_WINDOW_SIZE (0x4) = 1 MiB.
        h2.write(SETTINGS, 0, 0, &[0, 4, 0, 0x10, 0, 0]).await;
        h2.write(WINDOW_UPDATE, 0, 0, &(1u32 << 30).to_be_bytes()).await;
        while h2.max_streams.is_none() {
            h2.frame().await;
        }
        h2
    }

    async fn write(&mut self, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
        let mut frame = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        frame.extend_from_slice(&[kind, flags]);
        frame.extend_from_slice(&stream.to_be_bytes());
        frame.extend_from_slice(payload);
        self.tcp.write_all(&frame).await.unwrap();
    }

    /// `GET path` as an event stream on `stream` (HEADERS with END_STREAM
    /// and END_HEADERS; every field a literal without indexing).
    async fn get(&mut self, stream: u32, path: &str) {
        let mut block = Vec::new();
        for (name, value) in [
            (":method", "GET"),
            (":scheme", "http"),
            (":path", path),
            (":authority", "localhost"),
            ("accept", "text/event-stream"),
        ] {
            block.push(0);
            block.push(name.len() as u8);
            block.extend_from_slice(name.as_bytes());
            block.push(value.len() as u8);
            block.extend_from_slice(value.as_bytes());
        }
        self.write(HEADERS, 0x1 | 0x4, stream, &block).await;
    }

    async fn reset(&mut self, stream: u32, code: u32) {
        self.write(RST_STREAM, 0, stream, &code.to_be_bytes()).await;
    }

    /// The next frame (type, stream, payload); SETTINGS and PINGs are
    /// answered here, and the server's limit is read from its SETTINGS.
    async fn frame(&mut self) -> (u8, u32, Vec<u8>) {
        let mut head = [0u8; 9];
        tokio::time::timeout(WAIT, self.tcp.read_exact(&mut head)).await.expect("a frame in time").unwrap();
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let (kind, flags) = (head[3], head[4]);
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        let mut payload = vec![0; len];
        tokio::time::timeout(WAIT, self.tcp.read_exact(&mut payload)).await.expect("a frame in time").unwrap();
        match kind {
            SETTINGS if flags & 0x1 == 0 => {
                for setting in payload.chunks_exact(6) {
                    if setting[..2] == [0, 3] {
                        self.max_streams = Some(u32::from_be_bytes(setting[2..].try_into().unwrap()));
                    }
                }
                self.write(SETTINGS, 0x1, 0, &[]).await;
            }
            PING if flags & 0x1 == 0 => self.write(PING, 0x1, 0, &payload).await,
            GOAWAY => panic!("the server ended the connection: {payload:?}"),
            _ => {}
        }
        (kind, stream, payload)
    }
}

/// The server's `max_concurrent_streams` (100 by default) is advertised in
/// its SETTINGS and enforced: a 101st stream opened anyway is refused with
/// `REFUSED_STREAM`, the 100 open ones stay live on the same connection,
/// and once one of them is closed a new one opens.
#[tokio::test]
async fn the_101st_stream_is_refused_and_a_closed_one_frees_its_place() {
    const LIMIT: u32 = 100;
    let hub = echo_hub().build();
    let addr = start(&hub, SseConfig::default(), ServeConfig::default(), false).await;
    let mut h2 = RawH2::connect(addr).await;
    assert_eq!(h2.max_streams, Some(LIMIT), "SETTINGS_MAX_CONCURRENT_STREAMS");

    // Streams 1, 3, …, 199: each answered 200 (HPACK static index 8,
    // `0x88`) and joined to the room.
    let ids: Vec<u32> = (0..LIMIT).map(|i| 2 * i + 1).collect();
    for &id in &ids {
        h2.get(id, "/events?room=limit").await;
    }
    let mut text: std::collections::HashMap<u32, String> = ids.iter().map(|&id| (id, String::new())).collect();
    let mut answered = std::collections::HashSet::new();
    while answered.len() < ids.len() || text.values().any(|t| !t.contains("event: $joined")) {
        let (kind, stream, payload) = h2.frame().await;
        match kind {
            HEADERS => {
                assert_eq!(payload.first(), Some(&0x88), "stream {stream}: 200");
                answered.insert(stream);
            }
            DATA => text.get_mut(&stream).unwrap().push_str(std::str::from_utf8(&payload).unwrap()),
            RST_STREAM => panic!("stream {stream} reset within the limit: {payload:?}"),
            _ => {}
        }
    }
    assert_eq!(hub.room_len("limit"), LIMIT as usize);

    // The 101st: refused by the server, nothing else changes.
    let extra = 2 * LIMIT + 1;
    h2.get(extra, "/events?room=limit").await;
    loop {
        let (kind, stream, payload) = h2.frame().await;
        if stream == extra {
            assert_eq!(kind, RST_STREAM, "the 101st stream gets no answer but a reset");
            assert_eq!(u32::from_be_bytes(payload[..4].try_into().unwrap()), REFUSED_STREAM);
            break;
        }
        if let DATA = kind {
            text.get_mut(&stream).unwrap().push_str(std::str::from_utf8(&payload).unwrap());
        }
    }
    assert_eq!(hub.room_len("limit"), LIMIT as usize);

    // All 100 are live: each gets an event published now.
    hub.publish("limit", "all", &"here").await.unwrap();
    while text.values().any(|t| !t.contains("event: all")) {
        let (kind, stream, payload) = h2.frame().await;
        assert_ne!(kind, RST_STREAM, "stream {stream} reset");
        if kind == DATA {
            text.get_mut(&stream).unwrap().push_str(std::str::from_utf8(&payload).unwrap());
        }
    }

    // The client closes stream 1; its place is free once the server has
    // let go of the stream (the response body noticing the reset), so a
    // new stream may still be refused for a moment: retry on new ids.
    h2.reset(1, CANCEL).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut id = extra + 2;
    'open: loop {
        h2.get(id, "/events?room=limit").await;
        loop {
            let (kind, stream, payload) = h2.frame().await;
            if stream != id {
                continue;
            }
            match kind {
                HEADERS => {
                    assert_eq!(payload.first(), Some(&0x88), "the new stream: 200");
                    break 'open;
                }
                RST_STREAM => {
                    assert_eq!(u32::from_be_bytes(payload[..4].try_into().unwrap()), REFUSED_STREAM);
                    assert!(tokio::time::Instant::now() < deadline, "a closed stream frees its place");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    id += 2;
                    continue 'open;
                }
                _ => {}
            }
        }
    }
    let mut joined = String::new();
    while !joined.contains("event: $joined") {
        let (kind, stream, payload) = h2.frame().await;
        if kind == DATA && stream == id {
            joined.push_str(std::str::from_utf8(&payload).unwrap());
        }
    }
    let deadline = tokio::time::Instant::now() + WAIT;
    while hub.room_len("limit") != LIMIT as usize {
        assert!(tokio::time::Instant::now() < deadline, "the reset stream's session ended: {}", hub.room_len("limit"));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    hub.shutdown(WAIT).await;
}
