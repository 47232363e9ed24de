//! The SSE transport end to end: real HTTP on 127.0.0.1:0 (axum, and plain
//! hyper), an EventSource-faithful client (`tests/sse_client`), raw POSTs.

#[path = "support/room_log.rs"]
mod room_log;
mod sse_client;

use serde_json::{json, Value};
use sse_client::{post, request, EventSource, Item};
use std::net::SocketAddr;
use std::time::Duration;
use switchboard::integration::sse::{SseConfig, SseEndpoint};
use switchboard::protocol::CloseCode;
use switchboard::security::{OriginPolicy, SecurityConfig};
use switchboard::{
    auth::JoinRequest, backplane::MemoryBackplane, hub::DisconnectReason, hub::OverflowPolicy, Call, CallError,
    ConnectionId, Hub, HubConfig,
};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

/// Serves `endpoint` at `/events` in an axum app on a free loopback port.
async fn serve(endpoint: SseEndpoint) -> SocketAddr {
    let app: axum::Router = axum::Router::new().route("/events", switchboard::integration::axum::sse(endpoint));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>()).await.unwrap();
    });
    addr
}

fn echo_hub() -> switchboard::HubBuilder {
    Hub::builder().on("echo", |_call: Call, v: Value| async move { Ok::<_, CallError>(v) }).on(
        "shout",
        |call: Call, v: Value| async move {
            call.broadcast("shouted", &v).await.map_err(|e| CallError::internal(e.to_string()))?;
            Ok::<_, CallError>(json!({"ok": true}))
        },
    )
}

/// Opens a stream and reads its opening: `$session`, then `$hello`.
async fn open(addr: SocketAddr, path: &str) -> (EventSource, Value, Value) {
    let mut es = EventSource::open(addr, path).await.expect("stream refused");
    let session = es.next().await;
    assert_eq!(session.event, "$session", "the first event gives the session: {session:?}");
    let hello = es.wait_for("$hello").await;
    (es, session.json(), hello.json())
}

/// Reports the id of every connection the hub opens.
fn report_ids(builder: switchboard::HubBuilder) -> (switchboard::HubBuilder, mpsc::UnboundedReceiver<ConnectionId>) {
    let (tx, rx) = mpsc::unbounded_channel();
    (builder.on_connect(move |c| tx.send(c.id()).unwrap()), rx)
}

/// The id of the connection whose `hello` this is.
async fn connection_id(ids: &mut mpsc::UnboundedReceiver<ConnectionId>, hello: &Value) -> ConnectionId {
    let want = hello["data"]["connection_id"].as_u64().unwrap();
    loop {
        let id = tokio::time::timeout(sse_client::WAIT, ids.recv()).await.expect("no on_connect").unwrap();
        if id.get() == want {
            return id;
        }
    }
}

#[tokio::test]
async fn stream_headers_names_and_data() {
    let (builder, mut ids) = report_ids(echo_hub());
    let hub = builder.build();
    let addr = serve(SseEndpoint::new(hub.clone())).await;
    let (mut es, session, hello) = open(addr, "/events?room=a&room=b%2Fc").await;

    // Headers that stop caching and proxy buffering.
    assert_eq!(es.status, 200);
    assert!(es.header("content-type").unwrap().starts_with("text/event-stream"));
    assert!(es.header("cache-control").unwrap().contains("no-cache"));
    assert_eq!(es.header("x-accel-buffering"), Some("no"));
    assert_eq!(es.retries.first(), Some(&3000), "the stream opens with retry:");
    assert_eq!(session["rooms"], json!(["a", "b/c"]));
    assert_eq!(session["secret"].as_str().unwrap().len(), 32);
    assert_eq!(hello["type"], "hello");
    assert_eq!(hello["data"]["version"], 1);

    // Both rooms were joined through the join path.
    let mut joined = vec![es.wait_for("$joined").await.json()["room"].clone()];
    joined.push(es.wait_for("$joined").await.json()["room"].clone());
    joined.sort_by_key(|v| v.to_string());
    assert_eq!(joined, vec![json!("a"), json!("b/c")]);
    assert_eq!(hub.room_len("a"), 1);
    assert_eq!(hub.room_len("b/c"), 1);

    // Multi-line and unicode data survive; the event name is the event's.
    let text = "line one\nline two\r\nline three\rend — ünïcödé 🎉\u{2028}x";
    hub.publish("a", "tick", &json!({ "text": text })).await.unwrap();
    let e = es.wait_for("tick").await;
    let env = e.json();
    assert_eq!((env["type"].as_str(), env["room"].as_str()), (Some("event"), Some("a")));
    assert_eq!(env["data"]["text"], text);

    // Names that cannot be SSE event names arrive as `$event`, intact.
    hub.publish("b/c", "two\nlines", &1).await.unwrap();
    let e = es.wait_for("$event").await;
    assert_eq!(e.json()["event"], "two\nlines");
    hub.publish("b/c", "$sneaky", &2).await.unwrap();
    assert_eq!(es.wait_for("$event").await.json()["event"], "$sneaky");

    // A direct send to the connection.
    hub.send(connection_id(&mut ids, &hello).await, "notice", &"hi").unwrap();
    assert_eq!(es.wait_for("notice").await.json()["data"], "hi");
}

#[tokio::test]
async fn post_upstream_calls_get_replies_on_the_stream() {
    let hub = echo_hub().build();
    let addr = serve(SseEndpoint::new(hub.clone())).await;
    let (mut es, session, _) = open(addr, "/events?room=lobby").await;
    es.wait_for("$joined").await;

    let a = post(addr, "/events", &session, r#"{"type":"call","ref":1,"event":"echo","data":{"x":"é\n"}}"#).await;
    assert_eq!(a.status, 202, "{a:?}");
    assert_eq!(a.json(), json!({"accepted": 1}));
    let r = es.reply_to(1).await;
    assert_eq!(r, json!({"type": "reply", "ref": 1, "data": {"x": "é\n"}}));

    // An array: join another room, ping, and a type the server does not know.
    let batch = json!([
        {"type": "join", "ref": 2, "room": "side"},
        {"type": "ping", "ref": 4},
        {"type": "nonsense", "ref": 5},
    ]);
    let a = post(addr, "/events", &session, &batch.to_string()).await;
    assert_eq!((a.status, a.json()), (202, json!({"accepted": 3})));
    assert_eq!(es.reply_to(2).await["data"]["room"], "side");
    assert_eq!(es.wait_for("$pong").await.json()["ref"], 4);
    let err = es.reply_to(5).await;
    assert_eq!((err["type"].as_str(), err["code"].as_u64()), (Some("error"), Some(400)));
    // A call in the joined room broadcasts to it, the caller included.
    let call = r#"{"type":"call","ref":3,"room":"side","event":"shout","data":"hey"}"#;
    assert_eq!(post(addr, "/events", &session, call).await.status, 202);
    assert_eq!(es.wait_for("shouted").await.json()["data"], "hey");
    assert_eq!(es.reply_to(3).await["data"], json!({"ok": true}));

    // Leave through a POST.
    let a = post(addr, "/events", &session, r#"{"type":"leave","ref":6,"room":"side"}"#).await;
    assert_eq!(a.status, 202);
    assert_eq!(es.reply_to(6).await["type"], "reply");
    assert_eq!(hub.room_len("side"), 0);
}

#[tokio::test]
async fn bad_posts_get_documented_errors() {
    let hub = echo_hub().build();
    let endpoint = SseEndpoint::builder(hub.clone())
        .config(SseConfig::default().max_post_size(1024).max_post_envelopes(3))
        .build();
    let addr = serve(endpoint).await;
    let (_es, session, _) = open(addr, "/events").await;
    let cases: Vec<(String, u16)> = vec![
        ("not json".into(), 400),
        ("[1, 2]".into(), 400),
        (r#"{"type":"ping""#.into(), 400),
        ("\"text\"".into(), 400),
        (format!(r#"{{"type":"call","event":"echo","data":"{}"}}"#, "x".repeat(2000)), 413),
        (json!([{"type": "ping"}, {"type": "ping"}, {"type": "ping"}, {"type": "ping"}]).to_string(), 413),
    ];
    for (body, status) in cases {
        let a = post(addr, "/events", &session, &body).await;
        assert_eq!(a.status, status, "{body:.60} -> {a:?}");
        let j = a.json();
        assert_eq!(j["status"], status);
        assert!(j["error"].as_str().is_some_and(|e| !e.is_empty()), "{j}");
    }
    let id = session["session"].as_str().unwrap();
    let secret = session["secret"].as_str().unwrap();
    let ping = br#"{"type":"ping"}"#;
    let with = |sid: &'static str, sec: &'static str| vec![("switchboard-session", sid), ("switchboard-secret", sec)];
    let leak = |s: &str| -> &'static str { Box::leak(s.to_owned().into_boxed_str()) };
    // Unknown session on this node: 404.
    let unknown = format!("{}{}", &id[..16], "0123456789abcdef");
    let a = request(addr, "POST", "/events", &with(leak(&unknown), leak(secret)), ping).await;
    assert_eq!(a.status, 404, "{a:?}");
    // Wrong or missing secret: 403.
    let a = request(addr, "POST", "/events", &with(leak(id), "00000000000000000000000000000000"), ping).await;
    assert_eq!((a.status, a.json()["error"].as_str()), (403, Some("wrong secret")));
    let a = request(addr, "POST", "/events", &[("switchboard-session", id)], ping).await;
    assert_eq!(a.status, 403);
    // Missing or malformed session: 400.
    let a = request(addr, "POST", "/events", &[("switchboard-secret", secret)], ping).await;
    assert_eq!(a.status, 400);
    let a = request(addr, "POST", "/events", &with("nope", leak(secret)), ping).await;
    assert_eq!(a.status, 400);
    // Other methods: 405.
    let a = request(addr, "PUT", "/events", &[], b"").await;
    assert_eq!((a.status, a.header("allow")), (405, Some("GET, POST, OPTIONS")));
    // Bad stream requests: an invalid room name.
    let a = request(addr, "GET", "/events?room=bad%20room", &[], b"").await;
    assert_eq!(a.status, 400, "{a:?}");
}

#[tokio::test]
async fn a_full_inbound_queue_refuses_the_whole_post() {
    // The stream's join waits on the authorizer, and POSTed envelopes wait
    // for the stream's joins: the inbound queue fills.
    let (release_tx, release_rx) = tokio::sync::watch::channel(false);
    let hub = echo_hub()
        .authorize_join(move |_r: JoinRequest| {
            let mut rx = release_rx.clone();
            async move {
                let _ = rx.wait_for(|v| *v).await;
                Ok::<(), CallError>(())
            }
        })
        .build();
    let endpoint = SseEndpoint::builder(hub.clone())
        .config(SseConfig::default().inbound_capacity(3).max_post_envelopes(2))
        .build();
    let addr = serve(endpoint).await;
    let (mut es, session, _) = open(addr, "/events?room=held").await;
    let two = json!([{"type": "ping", "ref": 1}, {"type": "ping", "ref": 2}]).to_string();
    assert_eq!(post(addr, "/events", &session, &two).await.status, 202);
    let a = post(addr, "/events", &session, &two).await;
    assert_eq!((a.status, a.header("retry-after")), (429, Some("1")), "all or nothing: {a:?}");
    let one = r#"{"type":"ping","ref":3}"#;
    assert_eq!(post(addr, "/events", &session, one).await.status, 202);
    release_tx.send(true).unwrap();
    assert_eq!(es.wait_for("$joined").await.json()["room"], "held");
    for r in 1..=3 {
        assert_eq!(es.wait_for("$pong").await.json()["ref"], r);
    }
}

#[tokio::test]
async fn a_refused_room_gets_join_error() {
    let hub = echo_hub()
        .authorize_join(|r: JoinRequest| async move {
            if r.room != "secret" {
                Ok(())
            } else {
                Err(CallError::with_code(switchboard::protocol::ErrorCode::FORBIDDEN, "not for you"))
            }
        })
        .build();
    let addr = serve(SseEndpoint::new(hub.clone())).await;
    let (mut es, _, _) = open(addr, "/events?room=secret&room=open").await;
    let e = es.wait_for("$join_error").await.json();
    assert_eq!((e["room"].as_str(), e["code"].as_u64()), (Some("secret"), Some(403)), "{e}");
    assert_eq!(es.wait_for("$joined").await.json()["room"], "open");
    assert_eq!(hub.room_len("secret"), 0);
}

#[tokio::test]
async fn host_chosen_rooms() {
    let hub = echo_hub().build();
    let endpoint = SseEndpoint::builder(hub.clone())
        .config(SseConfig::default().query_rooms(false))
        .rooms(|hs, _identity| vec![format!("user:{}", hs.query("u").unwrap_or_default())])
        .build();
    let addr = serve(endpoint).await;
    let (mut es, session, _) = open(addr, "/events?u=ann&room=ignored").await;
    assert_eq!(session["rooms"], json!(["user:ann"]));
    assert_eq!(es.wait_for("$joined").await.json()["room"], "user:ann");
    assert_eq!(hub.room_len("ignored"), 0);
}

#[tokio::test]
async fn two_hubs_route_posts_over_the_backplane() {
    let backplane = MemoryBackplane::new();
    let a = echo_hub().backplane(backplane.clone()).build();
    let b = echo_hub().backplane(backplane.clone()).build();
    let addr_a = serve(SseEndpoint::new(a.clone())).await;
    let addr_b = serve(SseEndpoint::new(b.clone())).await;
    // A stream on B too, so B subscribes its own topic (as any node serving
    // streams does); POSTs to A's sessions land on B.
    let (_es_b, _, _) = open(addr_b, "/events").await;
    let (mut es, session, _) = open(addr_a, "/events?room=r").await;
    es.wait_for("$joined").await;

    let ans = post(addr_b, "/events", &session, r#"{"type":"call","ref":7,"event":"echo","data":"via b"}"#).await;
    assert_eq!((ans.status, ans.json()), (202, json!({"accepted": 1})), "{ans:?}");
    assert_eq!(es.reply_to(7).await["data"], "via b");
    // A broadcast from that call reaches members on both nodes.
    let (mut es2, session2, _) = open(addr_b, "/events?room=r").await;
    es2.wait_for("$joined").await;
    let ans = post(addr_b, "/events", &session, r#"{"type":"call","ref":8,"room":"r","event":"shout","data":1}"#).await;
    assert_eq!(ans.status, 202);
    assert_eq!(es.wait_for("shouted").await.json()["data"], 1);
    assert_eq!(es2.wait_for("shouted").await.json()["data"], 1);
    assert_eq!(es.reply_to(8).await["data"], json!({"ok": true}));

    // The holder's answers come back through the requester.
    let mut wrong = session.clone();
    wrong["secret"] = json!("00000000000000000000000000000000");
    assert_eq!(post(addr_b, "/events", &wrong, r#"{"type":"ping"}"#).await.status, 403);
    let mut gone = session.clone();
    let id = session["session"].as_str().unwrap();
    gone["session"] = json!(format!("{}{}", &id[..16], "0000000000000001"));
    assert_eq!(post(addr_b, "/events", &gone, r#"{"type":"ping"}"#).await.status, 404);
    // And B's own session still works on B, and from A.
    assert_eq!(post(addr_a, "/events", &session2, r#"{"type":"ping","ref":9}"#).await.status, 202);
    assert_eq!(es2.wait_for("$pong").await.json()["ref"], 9);
}

#[tokio::test]
async fn cors_allowed_and_refused() {
    let security = SecurityConfig::default().origin(OriginPolicy::AllowList(vec!["http://app.example".into()]));
    let hub = echo_hub().security(security).build();
    let addr = serve(SseEndpoint::new(hub.clone())).await;

    // Allowed origin: the stream, the preflight, the POST all carry CORS.
    let mut es = EventSource::open_with(addr, "/events", &[("origin", "http://app.example")]).await.unwrap();
    assert_eq!(es.header("access-control-allow-origin"), Some("http://app.example"));
    assert_eq!(es.header("access-control-allow-credentials"), Some("true"));
    let session = es.wait_for("$session").await.json();
    let pre = request(
        addr,
        "OPTIONS",
        "/events",
        &[
            ("origin", "http://app.example"),
            ("access-control-request-method", "POST"),
            ("access-control-request-headers", "content-type, switchboard-session, switchboard-secret"),
        ],
        b"",
    )
    .await;
    assert_eq!(pre.status, 204, "{pre:?}");
    assert_eq!(pre.header("access-control-allow-origin"), Some("http://app.example"));
    assert!(pre.header("access-control-allow-methods").unwrap().contains("POST"));
    let allowed = pre.header("access-control-allow-headers").unwrap();
    for h in ["content-type", "switchboard-session", "switchboard-secret", "last-event-id"] {
        assert!(allowed.contains(h), "{h} not in {allowed}");
    }
    let id = session["session"].as_str().unwrap();
    let secret = session["secret"].as_str().unwrap();
    let ok = request(
        addr,
        "POST",
        "/events",
        &[("origin", "http://app.example"), ("switchboard-session", id), ("switchboard-secret", secret)],
        br#"{"type":"ping","ref":1}"#,
    )
    .await;
    assert_eq!((ok.status, ok.header("access-control-allow-origin")), (202, Some("http://app.example")));
    assert_eq!(es.wait_for("$pong").await.json()["ref"], 1);

    // Refused origin: 403 everywhere, no CORS headers.
    let refused = EventSource::open_with(addr, "/events", &[("origin", "http://evil.example")]).await.err().unwrap();
    assert_eq!(refused.status, 403);
    let pre = request(addr, "OPTIONS", "/events", &[("origin", "http://evil.example")], b"").await;
    assert_eq!((pre.status, pre.header("access-control-allow-origin")), (403, None));
    let bad = request(
        addr,
        "POST",
        "/events",
        &[("origin", "http://evil.example"), ("switchboard-session", id), ("switchboard-secret", secret)],
        br#"{"type":"ping"}"#,
    )
    .await;
    assert_eq!((bad.status, bad.header("access-control-allow-origin")), (403, None));

    // The default same-origin policy: Origin must match Host.
    let same = echo_hub().build();
    let addr = serve(SseEndpoint::new(same)).await;
    let origin = format!("http://{addr}");
    assert!(EventSource::open_with(addr, "/events", &[("origin", &origin)]).await.is_ok());
    let err = EventSource::open_with(addr, "/events", &[("origin", "http://other.example")]).await.err().unwrap();
    assert_eq!(err.status, 403);
    // The refusal body is worded for SSE, as docs/sse.md shows it.
    let refused = request(addr, "GET", "/events", &[("origin", "http://other.example")], b"").await;
    assert_eq!(refused.json(), serde_json::json!({"status": 403, "error": "cross-origin request refused"}));
}

#[tokio::test]
async fn keep_alives_when_idle_and_heartbeats_keep_it_open() {
    let hub = echo_hub()
        .config(
            HubConfig::default()
                .heartbeat_interval(Duration::from_millis(40))
                .heartbeat_timeout(Duration::from_millis(200)),
        )
        .build();
    let endpoint =
        SseEndpoint::builder(hub.clone()).config(SseConfig::default().keep_alive(Duration::from_millis(60))).build();
    let addr = serve(endpoint).await;
    let (mut es, _, _) = open(addr, "/events").await;
    let (mut keepalives, mut pings) = (0, 0);
    while keepalives < 2 || pings < 5 {
        match es.next_item().await.expect("stream stopped") {
            Item::Comment(c) if c == "keep-alive" => keepalives += 1,
            Item::Comment(c) if c == "ping" => pings += 1,
            Item::Comment(c) => panic!("unexpected comment {c:?}"),
            Item::Event(e) => panic!("unexpected event {e:?}"),
            Item::Reconnected => panic!("the stream dropped"),
        }
    }
    // Every heartbeat ping was answered by the transport's pong: still open.
    assert_eq!(hub.stats().connections, 1);
}

#[tokio::test]
async fn a_gone_client_ends_its_session() {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let hub = echo_hub().on_disconnect(move |_c, reason| tx.send(reason.clone()).unwrap()).build();
    let endpoint = SseEndpoint::new(hub.clone());
    let addr = serve(endpoint.clone()).await;
    let (mut es, _, _) = open(addr, "/events?room=x").await;
    es.wait_for("$joined").await;
    assert_eq!(endpoint.streams(), 1);
    drop(es);
    let reason = tokio::time::timeout(sse_client::WAIT, rx.recv()).await.expect("session did not end").unwrap();
    assert_eq!(reason, DisconnectReason::ConnectionLost);
    assert_eq!(hub.room_len("x"), 0);
    assert_eq!(endpoint.streams(), 0);
}

#[tokio::test]
async fn slow_reader_hits_the_overflow_policy() {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let hub = echo_hub()
        .config(HubConfig::default().outbound_queue_bytes(64 * 1024).overflow(OverflowPolicy::Disconnect))
        .on_disconnect(move |_c, reason| tx.send(reason.clone()).unwrap())
        .build();
    let addr = serve(SseEndpoint::new(hub.clone())).await;
    // A reader that opens the stream and never reads it.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let mut stream = sock.connect(addr).await.unwrap();
    use tokio::io::AsyncWriteExt;
    stream.write_all(b"GET /events?room=flood HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let (status, _, _) = sse_client::read_head(&mut stream).await;
    assert_eq!(status, 200);
    while hub.room_len("flood") == 0 {
        tokio::task::yield_now().await;
    }
    let chunk = "z".repeat(16 * 1024);
    let mut published = 0u64;
    let reason = loop {
        hub.publish("flood", "bulk", &chunk).await.unwrap();
        published += 1;
        assert!(published < 100_000, "no overflow after {published} messages");
        if let Ok(r) = rx.try_recv() {
            break r;
        }
        if published % 16 == 0 {
            tokio::task::yield_now().await;
        }
    };
    assert_eq!(reason, DisconnectReason::SlowConsumer);
    println!("slow reader disconnected after {published} messages of 16 KiB");
    drop(stream);
}

#[tokio::test]
async fn shutdown_sends_retry_and_browsers_come_back() {
    let hub = echo_hub().build();
    let endpoint = SseEndpoint::builder(hub.clone())
        .config(SseConfig::default().close_retry(Duration::from_millis(50)).retry(Duration::from_millis(50)))
        .build();
    let addr = serve(endpoint).await;
    let (mut es, _, _) = open(addr, "/events?room=r").await;
    es.wait_for("$joined").await;
    let shutdown = {
        let hub = hub.clone();
        tokio::spawn(async move { hub.shutdown(Duration::from_secs(5)).await })
    };
    let close = es.wait_for("$close").await;
    assert_eq!(close.json(), json!({"code": 1001, "reason": "server shutting down", "reconnect": true}));
    let retry = *es.retries.last().unwrap();
    assert!((50..100).contains(&retry), "close retry is 50 ms plus jitter: {retry}");
    shutdown.await.unwrap();
    // The browser comes back; a hub still shutting down answers 200 with a
    // retry and a $close (a 503 would make EventSource give up).
    let item = es.next_item().await.expect("stopped");
    assert!(matches!(item, Item::Reconnected), "unexpected {item:?}");
    let close = es.wait_for("$close").await.json();
    assert_eq!((close["code"].as_u64(), close["status"].as_u64()), (Some(1013), Some(503)), "{close}");
    assert_eq!(close["reconnect"], true);
}

#[tokio::test]
async fn a_terminal_close_stops_the_browser_with_204() {
    let (builder, mut ids) = report_ids(echo_hub());
    let hub = builder.build();
    let addr = serve(SseEndpoint::new(hub.clone())).await;
    let (mut es, _, hello) = open(addr, "/events").await;
    es.retry = Duration::from_millis(1);
    assert!(hub.disconnect(connection_id(&mut ids, &hello).await, CloseCode::KICKED, "banned"));
    let close = es.wait_for("$close").await;
    assert_eq!(close.json(), json!({"code": 4500, "reason": "banned", "reconnect": false}));
    assert_eq!(close.id, "stop");
    // The reconnect sends Last-Event-ID: stop and gets 204: EventSource stops.
    let stopped = loop {
        match es.next_item().await {
            Err(s) => break s,
            Ok(Item::Event(e)) => panic!("unexpected {e:?}"),
            Ok(_) => {}
        }
    };
    assert_eq!(stopped.status, 204);
}

#[tokio::test]
async fn a_reconnect_with_a_foreign_last_event_id_resyncs() {
    let hub = echo_hub().build();
    let addr = serve(SseEndpoint::new(hub.clone())).await;
    let mut es =
        EventSource::open_with(addr, "/events?room=a", &[("last-event-id", "s1.00000000.0:5:e")]).await.unwrap();
    assert_eq!(es.wait_for("$session").await.event, "$session");
    let r = es.wait_for("$resync").await.json();
    assert_eq!(r["room"], "a");
    assert_eq!(es.wait_for("$joined").await.json()["room"], "a");
}

#[tokio::test]
async fn usable_from_plain_hyper() {
    use hyper::server::conn::http1;
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    let hub = echo_hub().build();
    let endpoint = SseEndpoint::new(hub.clone());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (sock, peer) = listener.accept().await.unwrap();
            let endpoint = endpoint.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let endpoint = endpoint.clone();
                    async move { Ok::<_, std::convert::Infallible>(endpoint.handle(req, Some(peer)).await) }
                });
                let _ = http1::Builder::new().serve_connection(TokioIo::new(sock), svc).await;
            });
        }
    });
    let (mut es, session, _) = open(addr, "/any/path?room=h").await;
    es.wait_for("$joined").await;
    let a = post(addr, "/any/path", &session, r#"{"type":"call","ref":1,"event":"echo","data":[1,2]}"#).await;
    assert_eq!(a.status, 202);
    assert_eq!(es.reply_to(1).await["data"], json!([1, 2]));
}

/// Opens a stream that is never read (a tiny receive buffer), then floods
/// its room until the kernel and hyper buffers are full. Returns the socket
/// (keep it alive) once the flood is queued.
async fn stuck_reader(hub: &Hub, addr: SocketAddr, room: &str) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let mut stream = sock.connect(addr).await.unwrap();
    stream.write_all(format!("GET /events?room={room} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).await.unwrap();
    let (status, _, _) = sse_client::read_head(&mut stream).await;
    assert_eq!(status, 200);
    while hub.room_len(room) == 0 {
        tokio::task::yield_now().await;
    }
    let chunk = "z".repeat(16 * 1024);
    for i in 0..2000 {
        // Under drop-oldest nothing closes the stream: the queue stays bounded.
        hub.publish(room, "bulk", &chunk).await.unwrap();
        if i % 16 == 0 {
            tokio::task::yield_now().await;
        }
    }
    stream
}

#[tokio::test]
async fn a_stream_stuck_past_its_keep_alive_is_ended() {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let hub = echo_hub()
        .config(
            HubConfig::default()
                .heartbeat_interval(Duration::ZERO)
                .outbound_queue_bytes(256 * 1024)
                .overflow(OverflowPolicy::DropOldest),
        )
        .on_disconnect(move |_c, reason| tx.send(reason.clone()).unwrap())
        .build();
    let endpoint =
        SseEndpoint::builder(hub.clone()).config(SseConfig::default().keep_alive(Duration::from_millis(100))).build();
    let addr = serve(endpoint.clone()).await;
    let _socket = stuck_reader(&hub, addr, "stuck").await;
    let reason =
        tokio::time::timeout(sse_client::WAIT, rx.recv()).await.expect("the stuck stream was not ended").unwrap();
    assert_eq!(reason, DisconnectReason::ConnectionLost);
    assert_eq!(hub.room_len("stuck"), 0);
    assert_eq!(endpoint.streams(), 0);
}

#[tokio::test]
async fn a_stuck_stream_misses_its_heartbeat() {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let hub = echo_hub()
        .config(
            HubConfig::default()
                .heartbeat_interval(Duration::from_millis(50))
                .heartbeat_timeout(Duration::from_millis(100))
                .close_timeout(Duration::from_millis(100))
                .outbound_queue_bytes(256 * 1024)
                .overflow(OverflowPolicy::DropOldest),
        )
        .on_disconnect(move |_c, reason| tx.send(reason.clone()).unwrap())
        .build();
    let endpoint = SseEndpoint::builder(hub.clone()).config(SseConfig::default().keep_alive(Duration::ZERO)).build();
    let addr = serve(endpoint).await;
    let _socket = stuck_reader(&hub, addr, "stuck").await;
    let reason =
        tokio::time::timeout(sse_client::WAIT, rx.recv()).await.expect("the stuck stream was not ended").unwrap();
    assert_eq!(reason, DisconnectReason::HeartbeatTimeout);
}

/// Resident memory of this process, in KiB (Linux).
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4)
}

/// By-hand measurement (`cargo test --release --features sse --test sse
/// measure -- --ignored --nocapture`): memory per idle stream and fan-out
/// throughput to many streams, server and clients in one process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn measure_streams_and_fan_out() {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const STREAMS: usize = 2000;
    const MESSAGES: u64 = 200;
    let security = SecurityConfig::default().connection_rate(None);
    let hub = echo_hub().security(security).config(HubConfig::default().rate_limit(None)).build();
    let addr = serve(SseEndpoint::new(hub.clone())).await;
    // Opening: retry block, $session, $hello, $joined.
    const OPENING: u64 = 4;
    let blocks = Arc::new(AtomicU64::new(0));
    // Baseline: the same clients against a bare TCP acceptor that holds
    // the sockets, so the difference is what a stream costs the server.
    let bare = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let bare_addr = bare.local_addr().unwrap();
    let held = Arc::new(std::sync::Mutex::new(Vec::new()));
    let holder = {
        let held = held.clone();
        tokio::spawn(async move {
            loop {
                let (s, _) = bare.accept().await.unwrap();
                held.lock().unwrap().push(s);
            }
        })
    };
    let base_before = rss_kib();
    let mut bare_clients = Vec::new();
    for _ in 0..STREAMS {
        let mut s = tokio::net::TcpStream::connect(bare_addr).await.unwrap();
        s.write_all(b"GET /events?room=fan HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        bare_clients.push(tokio::spawn(async move {
            let mut buf = vec![0u8; 2048];
            while s.read(&mut buf).await.unwrap_or(0) > 0 {}
        }));
    }
    while held.lock().unwrap().len() < STREAMS {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let base_after = rss_kib();
    println!(
        "baseline: {STREAMS} bare TCP connections with their client tasks: {:.1} KiB each",
        (base_after - base_before) as f64 / STREAMS as f64
    );
    // Second baseline: axum answering each with a streaming body that never
    // ends (what hyper and axum cost per open response, without switchboard).
    let plain: axum::Router = axum::Router::new().route(
        "/events",
        axum::routing::get(|| async {
            axum::body::Body::from_stream(futures::stream::pending::<Result<bytes::Bytes, std::io::Error>>())
        }),
    );
    let plain_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let plain_addr = plain_listener.local_addr().unwrap();
    let plain_server = tokio::spawn(async move { axum::serve(plain_listener, plain).await.unwrap() });
    let plain_before = rss_kib();
    let mut plain_clients = Vec::new();
    for _ in 0..STREAMS {
        let mut s = tokio::net::TcpStream::connect(plain_addr).await.unwrap();
        s.write_all(b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        let (status, _, _) = sse_client::read_head(&mut s).await;
        assert_eq!(status, 200);
        plain_clients.push(tokio::spawn(async move {
            let mut buf = vec![0u8; 2048];
            while s.read(&mut buf).await.unwrap_or(0) > 0 {}
        }));
    }
    let plain_after = rss_kib();
    println!(
        "baseline: {STREAMS} open axum streaming responses (no switchboard) with their clients: {:.1} KiB each",
        (plain_after - plain_before) as f64 / STREAMS as f64
    );
    let before = rss_kib();
    let mut tasks = Vec::new();
    for _ in 0..STREAMS {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /events?room=fan HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        let blocks = blocks.clone();
        tasks.push(tokio::spawn(async move {
            let mut buf = vec![0u8; 2048];
            let mut last = 0u8;
            loop {
                let n = s.read(&mut buf).await.unwrap_or(0);
                if n == 0 {
                    return;
                }
                let mut found = 0;
                let mut prev = last;
                for &b in &buf[..n] {
                    if b == b'\n' && prev == b'\n' {
                        found += 1;
                    }
                    prev = b;
                }
                last = prev;
                blocks.fetch_add(found, Ordering::Relaxed);
            }
        }));
    }
    let want = STREAMS as u64 * OPENING;
    while blocks.load(Ordering::Relaxed) < want || hub.room_len("fan") < STREAMS {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let after = rss_kib();
    println!(
        "{STREAMS} idle streams: RSS {before} -> {after} KiB, {:.1} KiB per stream (server and client sides, one process)",
        (after - before) as f64 / STREAMS as f64
    );
    let mut want = want;
    for (what, payload) in [
        ("small (~120 B) events", json!({"seq": 0, "load": 42.5, "note": "a small metrics sample"})),
        ("4 KiB events", json!({"seq": 0, "blob": "x".repeat(4096)})),
    ] {
        let start = std::time::Instant::now();
        for _ in 0..MESSAGES {
            hub.publish("fan", "tick", &payload).await.unwrap();
        }
        want += STREAMS as u64 * MESSAGES;
        while blocks.load(Ordering::Relaxed) < want {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let secs = start.elapsed().as_secs_f64();
        println!(
            "fan-out of {what}: {MESSAGES} to {STREAMS} streams in {:.3} s: {:.0} deliveries/s",
            secs,
            (STREAMS as u64 * MESSAGES) as f64 / secs
        );
    }
    for t in tasks.into_iter().chain(bare_clients).chain(plain_clients) {
        t.abort();
    }
    holder.abort();
    plain_server.abort();
}

/// A hub whose rooms all keep history.
fn history_hub() -> (Hub, switchboard::history::MemoryHistory) {
    let history = switchboard::history::MemoryHistory::new();
    let hub = echo_hub().history(history.clone(), switchboard::history::HistoryConfig::all_rooms()).build();
    (hub, history)
}

/// The next events of rooms `a` and `b` until `count` have arrived, as
/// (room, offset, n) in arrival order.
async fn room_events(es: &mut EventSource, count: usize) -> Vec<(String, u64, u64)> {
    let mut out = Vec::new();
    while out.len() < count {
        let e = es.wait_for("m").await;
        let env = e.json();
        out.push((
            env["room"].as_str().unwrap().to_owned(),
            env["offset"].as_u64().unwrap(),
            env["data"]["n"].as_u64().unwrap(),
        ));
    }
    out
}

#[tokio::test]
async fn a_dropped_stream_reconnects_and_recovers_the_gap_exactly() {
    let (hub, _history) = history_hub();
    let endpoint =
        SseEndpoint::builder(hub.clone()).config(SseConfig::default().retry(Duration::from_millis(20))).build();
    let addr = serve(endpoint.clone()).await;
    let (mut es, _, _) = open(addr, "/events?room=a&room=b").await;
    let mut joined = [es.wait_for("$joined").await.json(), es.wait_for("$joined").await.json()];
    joined.sort_by_key(|j| j["room"].to_string());
    assert_eq!((joined[0]["room"].as_str(), joined[0]["offset"].as_u64()), (Some("a"), Some(0)), "{joined:?}");
    assert!(joined[0]["epoch"].as_str().is_some_and(|e| !e.is_empty()));
    assert!(es.last_event_id.starts_with("s1."), "the join replies give positions: {}", es.last_event_id);

    for n in 1..=3 {
        hub.publish("a", "m", &json!({ "n": n })).await.unwrap();
    }
    hub.publish("b", "m", &json!({ "n": 1 })).await.unwrap();
    let got = room_events(&mut es, 4).await;
    assert_eq!(got.iter().filter(|e| e.0 == "a").map(|e| e.1).collect::<Vec<_>>(), [1, 2, 3]);
    let seen = es.last_event_id.clone();
    assert!(seen.contains(":3:") && seen.contains(":1:"), "the id holds both rooms' positions: {seen}");

    // The network drops the stream; events go on meanwhile (some of them
    // reach the old session and die with its socket).
    es.drop_connection();
    for n in 4..=6 {
        hub.publish("a", "m", &json!({ "n": n })).await.unwrap();
    }
    hub.publish("b", "m", &json!({ "n": 2 })).await.unwrap();

    // The client reconnects by itself with Last-Event-ID: both rooms
    // rejoin from their positions and get exactly what they missed, once,
    // in order, then live events.
    assert!(matches!(es.next_item().await, Ok(Item::Reconnected)));
    assert_eq!(es.wait_for("$session").await.event, "$session");
    let mut joined = [es.wait_for("$joined").await.json(), es.wait_for("$joined").await.json()];
    joined.sort_by_key(|j| j["room"].to_string());
    assert_eq!(joined[0]["recovered"], true, "{joined:?}");
    assert_eq!(joined[1]["recovered"], true, "{joined:?}");
    hub.publish("a", "m", &json!({ "n": 7 })).await.unwrap();
    let got = room_events(&mut es, 5).await;
    let a: Vec<(u64, u64)> = got.iter().filter(|e| e.0 == "a").map(|e| (e.1, e.2)).collect();
    let b: Vec<(u64, u64)> = got.iter().filter(|e| e.0 == "b").map(|e| (e.1, e.2)).collect();
    assert_eq!(a, [(4, 4), (5, 5), (6, 6), (7, 7)], "exactly the missed events, then live");
    assert_eq!(b, [(2, 2)]);
    assert!(es.pending_is_empty_of("$resync"), "nothing to resync");
    assert!(es.last_event_id.contains(":7:"), "{}", es.last_event_id);
}

#[tokio::test]
async fn version_2_streams_send_compact_unnamed_events_and_recover() {
    let (builder, mut ids) = report_ids(echo_hub());
    let history = switchboard::history::MemoryHistory::new();
    let hub = builder.history(history, switchboard::history::HistoryConfig::all_rooms()).build();
    let endpoint =
        SseEndpoint::builder(hub.clone()).config(SseConfig::default().retry(Duration::from_millis(20))).build();
    let addr = serve(endpoint).await;
    let (mut es, session, hello) = open(addr, "/events?room=a&protocol=switchboard.v2.json").await;
    assert_eq!(hello["data"]["version"], 2, "hello reports the version: {hello}");
    assert_eq!(es.wait_for("$joined").await.json()["room"], "a", "stream events keep their names");

    // A room event: an unnamed event (`message`) whose data is the array,
    // with the stream's id for Last-Event-ID as in version 1.
    hub.publish("a", "tick", &json!({ "n": 1 })).await.unwrap();
    let e = es.wait_for("message").await;
    assert_eq!(e.json(), json!(["a", "tick", { "n": 1 }, 1]), "{e:?}");
    assert!(e.id.contains(":1:"), "the event moved the stream's id: {}", e.id);
    // Names that cannot be SSE event names need no `$event` here.
    hub.publish("a", "$odd\nname", &2).await.unwrap();
    assert_eq!(es.wait_for("message").await.json(), json!(["a", "$odd\nname", 2, 2]));
    // A direct send: room null.
    hub.send(connection_id(&mut ids, &hello).await, "notice", &"hi").unwrap();
    assert_eq!(es.wait_for("message").await.json(), json!([null, "notice", "hi"]));
    // Every other envelope is the version 1 object under its `$` name.
    let a = post(addr, "/events", &session, r#"{"type":"call","ref":5,"event":"echo","data":{"x":1}}"#).await;
    assert_eq!(a.status, 202, "{a:?}");
    let reply = es.reply_to(5).await;
    assert_eq!((reply["type"].as_str(), &reply["data"]), (Some("reply"), &json!({"x": 1})));

    // A dropped stream resumes from Last-Event-ID; what it missed comes as arrays.
    es.drop_connection();
    hub.publish("a", "tick", &json!({ "n": 3 })).await.unwrap();
    assert!(matches!(es.next_item().await, Ok(Item::Reconnected)));
    assert_eq!(es.wait_for("$joined").await.json()["recovered"], true);
    assert_eq!(es.wait_for("message").await.json(), json!(["a", "tick", { "n": 3 }, 3]));
    assert!(es.pending_is_empty_of("tick"), "no version 1 event on a version 2 stream");

    // A protocol that is not a JSON one of ours: 400, before anything else.
    for bad in ["switchboard.v2.msgpack", "switchboard.v1.msgpack", "switchboard.v3.json", ""] {
        let a = request(addr, "GET", &format!("/events?room=a&protocol={bad}"), &[], b"").await;
        assert_eq!(a.status, 400, "{bad}: {a:?}");
        assert!(a.json()["error"].as_str().is_some_and(|e| e.contains("switchboard.v2.json")), "{a:?}");
    }
    // Version 1 by name is version 1.
    let (mut v1, _, hello) = open(addr, "/events?room=a&protocol=switchboard.v1.json").await;
    assert_eq!(hello["data"]["version"], 1);
    v1.wait_for("$joined").await;
    hub.publish("a", "tick", &json!({ "n": 4 })).await.unwrap();
    assert_eq!(v1.wait_for("tick").await.json()["offset"], 4);
}

#[tokio::test]
async fn a_position_history_cannot_serve_gets_resync() {
    let (hub, _history) = history_hub();
    let addr = serve(SseEndpoint::new(hub.clone())).await;
    // Learn the stream's id format from a first stream.
    let (mut es, _, _) = open(addr, "/events?room=a").await;
    es.wait_for("$joined").await;
    let id = es.last_event_id.clone();
    drop(es);
    // Same rooms, a position in an epoch the room never had.
    let fp = id.split('.').nth(1).unwrap();
    let stale = format!("s1.{fp}.0:5:0000000000000000");
    let mut es = EventSource::open_with(addr, "/events?room=a", &[("last-event-id", &stale)]).await.unwrap();
    let joined = es.wait_for("$joined").await.json();
    assert_eq!(joined["recovered"], false, "{joined}");
    let r = es.wait_for("$resync").await.json();
    assert_eq!(r["room"], "a");
    // The stream goes on live from the room's current position.
    hub.publish("a", "m", &json!({ "n": 1 })).await.unwrap();
    assert_eq!(room_events(&mut es, 1).await[0].2, 1);
}

#[tokio::test]
async fn rewind_starts_a_fresh_stream_with_recent_events() {
    let (hub, _history) = history_hub();
    let addr = serve(SseEndpoint::new(hub.clone())).await;
    for n in 1..=5 {
        hub.publish("a", "m", &json!({ "n": n })).await.unwrap();
    }
    let (mut es, _, _) = open(addr, "/events?room=a&rewind=2").await;
    let joined = es.wait_for("$joined").await.json();
    assert_eq!(joined["offset"], 5, "{joined}");
    let got = room_events(&mut es, 2).await;
    assert_eq!(got.iter().map(|e| e.1).collect::<Vec<_>>(), [4, 5]);
    assert!(es.last_event_id.contains(":5:"), "a rewind never moves the id back: {}", es.last_event_id);
}

#[tokio::test]
async fn a_reconnect_to_another_node_recovers_from_the_shared_history() {
    let history = switchboard::history::MemoryHistory::new();
    let backplane = MemoryBackplane::new();
    let config = switchboard::history::HistoryConfig::all_rooms();
    let a = echo_hub().backplane(backplane.clone()).history(history.clone(), config.clone()).build();
    let b = echo_hub().backplane(backplane.clone()).history(history.clone(), config).build();
    let quick = SseConfig::default().retry(Duration::from_millis(20));
    let addr_a = serve(SseEndpoint::builder(a.clone()).config(quick.clone()).build()).await;
    let addr_b = serve(SseEndpoint::builder(b.clone()).config(quick).build()).await;

    let (mut es, _, _) = open(addr_a, "/events?room=r").await;
    es.wait_for("$joined").await;
    for n in 1..=2 {
        a.publish("r", "m", &json!({ "n": n })).await.unwrap();
    }
    assert_eq!(room_events(&mut es, 2).await.last().unwrap().1, 2);
    // Node A's stream drops; events go on (published on B); the browser's
    // reconnect lands on node B.
    es.drop_connection();
    for n in 3..=4 {
        b.publish("r", "m", &json!({ "n": n })).await.unwrap();
    }
    es.addr = addr_b;
    assert!(matches!(es.next_item().await, Ok(Item::Reconnected)));
    let session = es.wait_for("$session").await.json();
    assert_eq!(session["node"], format!("{:016x}", b.node_id()));
    assert_eq!(es.wait_for("$joined").await.json()["recovered"], true);
    let got = room_events(&mut es, 2).await;
    assert_eq!(got.iter().map(|e| (e.1, e.2)).collect::<Vec<_>>(), [(3, 3), (4, 4)]);
}

/// The text of a room or direct event, by protocol version (v1: the
/// envelope's `data`; v2: the array's third element).
fn event_data(e: &sse_client::Event) -> Value {
    let v = e.json();
    if v.is_array() {
        v[2].clone()
    } else {
        v["data"].clone()
    }
}

/// An event-stream member reads its first plain room from the room's log
/// (`docs/sse.md` §3.2). Whatever it reads from where, the stream gets
/// every frame in the order it was produced: room events, host sends, a
/// second room's events (queued as before), events excluded for it left
/// out, and after a `leave` nothing more of that room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_reading_a_room_log_keeps_the_order_of_everything_it_gets() {
    for protocol in ["switchboard.v1.json", "switchboard.v2.json"] {
        let (builder, mut ids) = report_ids(echo_hub());
        let hub = builder.build();
        let addr = serve(SseEndpoint::new(hub.clone())).await;
        let (mut es, session, hello) = open(addr, &format!("/events?room=a&room=b&protocol={protocol}")).await;
        let id = connection_id(&mut ids, &hello).await;
        es.wait_for("$joined").await;
        es.wait_for("$joined").await;
        // Another member of `a` on the same log, reading all along.
        let (mut other, _, _) = open(addr, "/events?room=a").await;
        other.wait_for("$joined").await;

        let expected = room_log::mixed_burst(&hub, id).await;
        let mut got = Vec::new();
        while got.len() < expected.len() {
            let e = es.next().await;
            assert!(!e.event.starts_with('$') || e.event == "$event", "{protocol}: unexpected {e:?}");
            got.push(event_data(&e).as_u64().unwrap());
        }
        assert_eq!(room_log::first_difference(&got, &expected), None, "{protocol}: out of order from there");
        // The other member got every event of `a`, the excluded ones too.
        let of_a = room_log::events_of_a();
        let mut got = Vec::new();
        while got.len() < of_a.len() {
            got.push(event_data(&other.next().await).as_u64().unwrap());
        }
        assert_eq!(got, of_a, "{protocol}");

        // Leave `a`: what was published before the reply comes before it,
        // nothing after it.
        hub.publish("a", "ev", &"before").await.unwrap();
        let leave = post(addr, "/events", &session, r#"{"type":"leave","ref":9,"room":"a"}"#).await;
        assert_eq!(leave.status, 202);
        let before = es.next().await;
        assert_eq!(event_data(&before), "before", "{protocol}: {before:?}");
        assert_eq!(es.reply_to(9).await["type"], "reply");
        hub.publish("a", "ev", &"after").await.unwrap();
        hub.publish("b", "ev", &"end").await.unwrap();
        let next = es.next().await;
        assert_eq!(event_data(&next), "end", "{protocol}: got {next:?} after leaving");
        assert_eq!(hub.connection(id).unwrap().queued_bytes(), 0);
    }
}

/// Under drop-oldest, a stream that stops reading is left behind by the
/// room log's bound, is told how many events it missed (`$lagged`), and
/// then gets the newest ones; nothing is lost without being counted, the
/// queued bytes stay within the bound, and a member that reads keeps up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_stream_on_a_room_log_lags_by_a_counted_number_of_events() {
    const BOUND: usize = 64 * 1024;
    let (builder, mut ids) = report_ids(echo_hub());
    let hub =
        builder.config(HubConfig::default().outbound_queue_bytes(BOUND).overflow(OverflowPolicy::DropOldest)).build();
    let addr = serve(SseEndpoint::new(hub.clone())).await;
    let (mut slow, _, hello) = open(addr, "/events?room=r&protocol=switchboard.v2.json").await;
    let id = connection_id(&mut ids, &hello).await;
    slow.wait_for("$joined").await;
    let (mut fast, _, _) = open(addr, "/events?room=r&protocol=switchboard.v2.json").await;
    fast.wait_for("$joined").await;

    // `slow` reads nothing meanwhile: its socket's buffers fill, then its
    // position in the log falls behind the bound.
    const TOTAL: u64 = 20_000;
    let fast = futures::stream::unfold(fast, |mut es| async move {
        let i = event_data(&es.next().await)["i"].as_u64().unwrap();
        Some((i, es))
    });
    room_log::publish_beside_a_reader(&hub, "r", TOTAL, id, BOUND, fast).await;

    let mut tally = room_log::Tally::default();
    while !tally.done(TOTAL) {
        let e = slow.next().await;
        if e.event == "$lagged" {
            tally.lagged(e.json()["data"]["dropped"].as_u64().unwrap());
        } else {
            tally.event(event_data(&e)["i"].as_u64().unwrap());
        }
    }
    tally.check(TOTAL, &hub, id);
    println!("stalled stream: {tally:?}");
}
