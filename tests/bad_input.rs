//! Bad input, end to end over real sockets: every malformed, misdirected or
//! abusive thing a client can send gets its documented answer — an `error`
//! envelope with the code from `protocol::codes` (and the request's `ref`
//! when the envelope could be read), or a WebSocket close code — the server
//! never panics, and other connections never notice.
//!
//! Every test runs a hub with a room `lobby` holding a *bystander* client.
//! After each bad input [`Fixture::check`] proves that the bystander still
//! gets every event, in order (one published by the host, one broadcast by a
//! handler), that the offending connection — when it stays open — still
//! answers a valid call with nothing stray queued before the reply, and that
//! `hub.stats().connections` is what it should be.

mod support;

use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::time::Duration;
use support::*;
use switchboard::transport::ws::WsConfig;
use switchboard::{auth::JoinRequest, hub::HubStats, Call, CallError, Hub, HubBuilder, HubConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::Message;

const MSGPACK: &str = "switchboard.v1.msgpack";

// ---------------------------------------------------------------------------
// Fixture
// ---------------------------------------------------------------------------

#[derive(serde::Deserialize)]
struct Num {
    n: i64,
}

/// The handlers every test hub has.
fn handlers() -> HubBuilder {
    Hub::builder()
        .on("echo", |_: Call, v: Value| async move { Ok(v) })
        .on("inc", |_: Call, req: Num| async move { Ok(json!({ "n": req.n + 1 })) })
        .on("len", |_: Call, s: String| async move { Ok(s.len()) })
        .on("shout", |call: Call, v: Value| async move {
            call.broadcast("tick", &v).await.map_err(|e| CallError::internal(e.to_string()))?;
            Ok(Value::Null)
        })
        .on("boom", |_: Call, v: Value| async move {
            if v.is_null() {
                panic!("intentional panic in an async handler (bad_input test)");
            }
            Ok(v)
        })
        .on("boom_sync", |_: Call, _: Value| -> std::future::Ready<Result<Value, CallError>> {
            panic!("intentional panic before the handler's future exists (bad_input test)")
        })
}

struct Fixture {
    hub: Hub,
    addr: SocketAddr,
    bystander: Bystander,
}

impl Fixture {
    async fn start(builder: HubBuilder) -> Fixture {
        Fixture::start_with(builder, WsConfig::default()).await
    }

    async fn start_with(builder: HubBuilder, ws: WsConfig) -> Fixture {
        let hub = builder.build();
        let addr = serve_with(&hub, ws).await;
        let bystander = Bystander::join(connect(addr).await, &hub).await;
        Fixture { hub, addr, bystander }
    }

    /// The bystander gets two more events, next in line and in order: one
    /// published by the host, one broadcast by a handler it calls.
    async fn tick(&mut self) {
        self.bystander.tick(&self.hub).await;
    }

    /// Ends a test: once every client is gone, the hub holds nothing — no
    /// connection, room or task was leaked by what came before. (Drop the
    /// other clients first.)
    async fn finish(self) {
        drop(self.bystander);
        eventually("hub empty", || self.hub.stats() == HubStats::default()).await;
    }

    /// After a bad input: the bystander is unaffected, the offender (if it
    /// stayed open) still works, and the hub has `connections` connections.
    async fn check(&mut self, offender: Option<&mut Client>, connections: usize) {
        self.tick().await;
        if let Some(c) = offender {
            assert_alive(c).await;
        }
        assert_eq!(self.hub.stats().connections, connections);
    }
}

fn text(s: impl Into<String>) -> Message {
    Message::text(s.into())
}

fn msg(v: Value) -> Message {
    Message::text(v.to_string())
}

/// A valid call on `c` is answered, and the reply is the very next message
/// (so nothing stray — an extra error, a leaked event — was queued before it).
async fn assert_alive(c: &mut Client) {
    let r = c.next_ref() + 1_000_000;
    c.send(json!({"type": "call", "ref": r, "event": "echo", "data": {"alive": r}})).await;
    let v = c.recv().await;
    assert_eq!(v, json!({"type": "reply", "ref": r, "data": {"alive": r}}), "offender no longer works");
}

/// Asserts `v` is an `error` with `code` and `reference` (`None`: no `ref`).
fn assert_error(v: &Value, code: u32, reference: Option<u64>, what: &str) {
    assert_eq!(v["type"], "error", "{what}: {v}");
    assert_eq!(v["code"], code, "{what}: {v}");
    match reference {
        Some(r) => assert_eq!(v["ref"], r, "{what}: {v}"),
        None => assert!(v.get("ref").is_none(), "{what}: unexpected ref in {v}"),
    }
    assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()), "{what}: no message in {v}");
}

/// A frame, shortened for assertion messages.
fn describe(frame: &Message) -> String {
    let full = format!("{frame:?}");
    match full.char_indices().nth(160) {
        Some((end, _)) => format!("{}… ({} bytes)", &full[..end], frame.len()),
        None => full,
    }
}

/// Sends `frame`; the next message must be that error.
async fn expect_error(c: &mut Client, frame: Message, code: u32, reference: Option<u64>) {
    let what = describe(&frame);
    c.send_raw(frame).await;
    let v = c.recv().await;
    assert_error(&v, code, reference, &what);
}

/// Sends `v` (which carries `ref`); the next message must be its reply.
async fn expect_reply(c: &mut Client, v: Value) -> Value {
    let r = v["ref"].as_u64().expect("request without ref");
    c.send(v.clone()).await;
    let reply = c.recv().await;
    assert_eq!(reply["type"], "reply", "{v} -> {reply}");
    assert_eq!(reply["ref"], r, "{v} -> {reply}");
    reply
}

fn join(room: &str, r: u64) -> Value {
    json!({"type": "join", "ref": r, "room": room})
}

fn leave(room: &str, r: u64) -> Value {
    json!({"type": "leave", "ref": r, "room": room})
}

// ---------------------------------------------------------------------------
// Cases 1–7, 9 (JSON side), 11: a table of one bad frame → one error
// ---------------------------------------------------------------------------

#[tokio::test]
async fn bad_envelopes_get_their_error_code_and_the_connection_stays_open() {
    let mut f = Fixture::start(handlers()).await;
    let mut c = connect(f.addr).await;
    // The typed handler works when the payload fits.
    let r = expect_reply(&mut c, json!({"type": "call", "ref": 60, "event": "inc", "data": {"n": 7}})).await;
    assert_eq!(r["data"], json!({"n": 8}));

    let deep =
        format!(r#"{{"type":"call","ref":8,"event":"echo","data":{}1{}}}"#, "[".repeat(10_000), "]".repeat(10_000));
    let cases: Vec<(Message, u32, Option<u64>)> = vec![
        // 1. Not JSON.
        (text("{not json"), 400, None),
        (text(""), 400, None),
        // 2. JSON of the wrong shape. The envelope does not decode; a `ref`
        // that is itself valid is still echoed so the client can correlate.
        (text("[1,2]"), 400, None),
        (text(r#""call""#), 400, None),
        (text("5"), 400, None),
        (text("null"), 400, None),
        (text(r#"{"type": 5}"#), 400, None),
        (text(r#"{"type":"call","ref":"x"}"#), 400, None),
        (text(r#"{"ref":1}"#), 400, Some(1)),
        (text(r#"{"type":"call","ref":-1}"#), 400, None),
        (text(r#"{"type":"call","ref":1.5}"#), 400, None),
        (text(r#"{"type":"call","ref":2,"event":7}"#), 400, Some(2)),
        (text(r#"{"type":"call","type":"join"}"#), 400, None),
        // Nesting deeper than 128 inside `data` is refused by the envelope
        // decoder (as for MessagePack below): 400 with the ref.
        (text(deep), 400, Some(8)),
        // 3. Unknown type: the envelope does not decode, the valid ref is echoed.
        (text(r#"{"type":"frobnicate","ref":3}"#), 400, Some(3)),
        // 4. Types only the server sends: the envelope decodes, the ref is echoed.
        (msg(json!({"type": "hello", "ref": 41})), 400, Some(41)),
        (msg(json!({"type": "reply", "ref": 42, "data": 1})), 400, Some(42)),
        (msg(json!({"type": "event", "ref": 43, "event": "x"})), 400, Some(43)),
        (msg(json!({"type": "error", "ref": 44, "code": 500, "message": "m"})), 400, Some(44)),
        (msg(json!({"type": "lagged", "ref": 45, "data": {"dropped": 1}})), 400, Some(45)),
        // 5. No handler for the event.
        (msg(json!({"type": "call", "ref": 5, "event": "nope"})), 404, Some(5)),
        // 6. Payload of the wrong type for `struct { n: i64 }`.
        (msg(json!({"type": "call", "ref": 61, "event": "inc", "data": {"n": "seven"}})), 422, Some(61)),
        (msg(json!({"type": "call", "ref": 62, "event": "inc", "data": "str"})), 422, Some(62)),
        (msg(json!({"type": "call", "ref": 63, "event": "inc"})), 422, Some(63)),
        // 7. Call without an event; call in a room not joined.
        (msg(json!({"type": "call", "ref": 71})), 400, Some(71)),
        (msg(json!({"type": "call", "ref": 72, "event": "echo", "room": "lobby"})), 405, Some(72)),
        (msg(json!({"type": "call", "ref": 73, "event": "nope", "room": "elsewhere"})), 405, Some(73)),
        // 9. A binary frame on a JSON connection.
        (Message::binary(b"{\"type\":\"ping\"}".to_vec()), 415, None),
        (Message::binary(vec![0x81, 0xa4, b't', b'y', b'p', b'e', 0xa4, b'p', b'i', b'n', b'g']), 415, None),
        // 11. Invalid room names, and no room at all.
        (msg(join("", 111)), 400, Some(111)),
        (msg(join(&"a".repeat(129), 112)), 400, Some(112)),
        (msg(join("has space", 113)), 400, Some(113)),
        (msg(join("$sys", 114)), 400, Some(114)),
        (msg(join("ünï", 115)), 400, Some(115)),
        (msg(json!({"type": "join", "ref": 116})), 400, Some(116)),
        (msg(json!({"type": "join", "ref": 117, "room": null})), 400, Some(117)),
        (msg(json!({"type": "leave", "ref": 118})), 400, Some(118)),
        (msg(leave("has space", 119)), 400, Some(119)),
    ];
    for (frame, code, reference) in cases {
        expect_error(&mut c, frame, code, reference).await;
        f.check(Some(&mut c), 2).await;
    }
    // None of the bad joins made the offender a member of anything.
    assert_eq!(f.hub.stats().rooms, 1);
    assert_eq!(f.hub.room_len("lobby"), 1);
    drop(c);
    f.finish().await;
}

// ---------------------------------------------------------------------------
// Case 8: message size limit
// ---------------------------------------------------------------------------

#[tokio::test]
async fn oversized_message_closes_1009_and_one_just_under_is_accepted() {
    const LIMIT: usize = 64 * 1024;
    let mut f = Fixture::start(handlers()).await;
    assert_eq!(f.hub.config().max_message_size, LIMIT);
    let mut c = connect(f.addr).await;

    let big = "x".repeat(60 * 1024);
    let r = expect_reply(&mut c, json!({"type": "call", "ref": 81, "event": "len", "data": big})).await;
    assert_eq!(r["data"], 60 * 1024);
    f.check(Some(&mut c), 2).await;
    // Exactly at the limit is still accepted.
    let at_limit = call_of_size(82, LIMIT);
    c.send_raw(Message::text(at_limit)).await;
    let r = c.recv().await;
    assert_eq!((&r["type"], &r["ref"]), (&json!("reply"), &json!(82)), "{r}");
    f.check(Some(&mut c), 2).await;

    // 100 KiB in one frame. The server may close before it has read all of
    // it, so the send itself is allowed to fail.
    let _ = c.ws.send(Message::text("a".repeat(100 * 1024))).await;
    assert_eq!(c.closed().await, Some(1009));
    eventually("the offender is gone", || f.hub.stats().connections == 1).await;
    f.check(None, 1).await;

    // One byte over the limit.
    let mut c = connect(f.addr).await;
    let _ = c.ws.send(Message::text(call_of_size(83, LIMIT + 1))).await;
    assert_eq!(c.closed().await, Some(1009));
    eventually("the offender is gone", || f.hub.stats().connections == 1).await;
    f.check(None, 1).await;

    // Over the limit in fragments that are each under it.
    let mut c = connect(f.addr).await;
    let chunk = || vec![b'a'; 32 * 1024];
    let frames = [
        Frame::message(chunk(), OpCode::Data(Data::Text), false),
        Frame::message(chunk(), OpCode::Data(Data::Continue), false),
        Frame::message(chunk(), OpCode::Data(Data::Continue), true),
    ];
    for frame in frames {
        if c.ws.send(Message::Frame(frame)).await.is_err() {
            break;
        }
    }
    assert_eq!(c.closed().await, Some(1009));
    eventually("the offender is gone", || f.hub.stats().connections == 1).await;
    f.check(None, 1).await;
    drop(c);
    f.finish().await;
}

/// A valid JSON `call` of `len` padded to exactly `size` bytes.
fn call_of_size(r: u64, size: usize) -> String {
    let frame = |pad: usize| json!({"type": "call", "ref": r, "event": "len", "data": "x".repeat(pad)}).to_string();
    let overhead = frame(0).len();
    let s = frame(size - overhead);
    assert_eq!(s.len(), size);
    s
}

// ---------------------------------------------------------------------------
// Cases 9 (MessagePack side) and 10: a MessagePack connection
// ---------------------------------------------------------------------------

/// A minimal MessagePack protocol client (the shared one speaks JSON).
struct MpClient {
    ws: Ws,
    next_ref: u64,
}

impl MpClient {
    async fn connect(addr: SocketAddr) -> MpClient {
        let (ws, chosen) = connect_protocol(addr, MSGPACK).await;
        assert_eq!(chosen.as_deref(), Some(MSGPACK));
        let mut c = MpClient { ws, next_ref: 0 };
        let hello = c.recv().await;
        assert_eq!(hello["type"], "hello", "{hello}");
        c
    }

    async fn send_raw(&mut self, m: Message) {
        self.ws.send(m).await.expect("send");
    }

    async fn send(&mut self, v: &Value) {
        self.send_raw(mp(v.clone())).await;
    }

    /// The next envelope, decoded from MessagePack.
    async fn recv(&mut self) -> Value {
        loop {
            let m = tokio::time::timeout(WAIT, self.ws.next()).await.expect("timed out waiting for a message");
            match m.expect("stream ended").expect("read error") {
                Message::Binary(b) => return rmp_serde::from_slice(&b).expect("server sent invalid MessagePack"),
                Message::Ping(_) | Message::Pong(_) => continue,
                other => panic!("unexpected frame on a MessagePack connection: {other:?}"),
            }
        }
    }

    async fn expect_error(&mut self, frame: Message, code: u32, reference: Option<u64>) {
        let what = describe(&frame);
        self.send_raw(frame).await;
        let v = self.recv().await;
        assert_error(&v, code, reference, &what);
    }

    async fn assert_alive(&mut self) {
        self.next_ref += 1;
        let r = self.next_ref + 1_000_000;
        self.send(&json!({"type": "call", "ref": r, "event": "echo", "data": {"alive": r}})).await;
        let v = self.recv().await;
        assert_eq!(v, json!({"type": "reply", "ref": r, "data": {"alive": r}}), "msgpack offender no longer works");
    }
}

/// `v` as a MessagePack binary frame (objects become maps with string keys).
fn mp(v: Value) -> Message {
    Message::binary(rmp_serde::to_vec_named(&v).unwrap())
}

/// Hand-built MessagePack, so the tests can write what a serializer never would.
fn mp_str(out: &mut Vec<u8>, s: &str) {
    rmp::encode::write_str(out, s).unwrap();
}

fn mp_call_prefix(fields: u32, r: u64) -> Vec<u8> {
    let mut out = Vec::new();
    rmp::encode::write_map_len(&mut out, fields).unwrap();
    mp_str(&mut out, "type");
    mp_str(&mut out, "call");
    mp_str(&mut out, "ref");
    rmp::encode::write_uint(&mut out, r).unwrap();
    mp_str(&mut out, "event");
    mp_str(&mut out, "echo");
    out
}

#[tokio::test]
async fn msgpack_connection_rejects_text_frames_and_invalid_msgpack() {
    let mut f = Fixture::start(handlers()).await;
    let mut c = MpClient::connect(f.addr).await;
    c.assert_alive().await;

    // A 10,000-deep nested array in `data`.
    let mut deep = mp_call_prefix(4, 101);
    mp_str(&mut deep, "data");
    deep.extend(std::iter::repeat_n(0x91u8, 10_000));
    deep.push(0xc0);
    // Truncated: a map announcing three entries that holds one and a half.
    let mut truncated = Vec::new();
    rmp::encode::write_map_len(&mut truncated, 3).unwrap();
    mp_str(&mut truncated, "type");
    mp_str(&mut truncated, "call");
    mp_str(&mut truncated, "ref");
    // An array claiming 2^32-1 elements in `data`.
    let mut huge = mp_call_prefix(4, 102);
    mp_str(&mut huge, "data");
    huge.extend([0xdd, 0xff, 0xff, 0xff, 0xff, 0x01]);
    // Trailing bytes after a complete envelope.
    let mut trailing = mp_call_prefix(3, 103);
    trailing.push(0xc0);

    let cases: Vec<(Message, u32, Option<u64>)> = vec![
        // 9. A text frame on a MessagePack connection.
        (text(r#"{"type":"ping"}"#), 415, None),
        // 10. Invalid MessagePack.
        (Message::binary(vec![0xc1]), 400, None),
        (Message::binary(Vec::new()), 400, None),
        (Message::binary(truncated), 400, None),
        (Message::binary(deep), 400, Some(101)),
        (Message::binary(huge), 400, Some(102)),
        (Message::binary(trailing), 400, Some(103)),
        // Well-formed but not an envelope.
        (mp(json!([1, 2, 3])), 400, None),
        (mp(json!({"ref": 1})), 400, Some(1)),
        (mp(json!({"type": "frobnicate", "ref": 3})), 400, Some(3)),
        (mp(json!({"type": "call", "ref": -1})), 400, None),
        (mp(json!({"type": 5, "ref": 1})), 400, Some(1)),
        // Errors that echo the ref come back in MessagePack too.
        (mp(json!({"type": "hello", "ref": 104})), 400, Some(104)),
        (mp(json!({"type": "call", "ref": 105, "event": "nope"})), 404, Some(105)),
        (mp(json!({"type": "call", "ref": 106, "event": "inc", "data": "x"})), 422, Some(106)),
        (mp(json!({"type": "join", "ref": 107, "room": "has space"})), 400, Some(107)),
    ];
    for (frame, code, reference) in cases {
        c.expect_error(frame, code, reference).await;
        f.check(None, 2).await;
        c.assert_alive().await;
    }
    drop(c);
    f.finish().await;
}

// ---------------------------------------------------------------------------
// Case 12: join authorization
// ---------------------------------------------------------------------------

#[tokio::test]
async fn unauthorized_join_gets_403_and_no_membership() {
    let builder = handlers().authorize_join(|req: JoinRequest| async move {
        if req.room.starts_with("boom") {
            panic!("intentional panic in a join authorizer (bad_input test)");
        }
        if req.room.starts_with("private") {
            Err(CallError::forbidden("no"))
        } else {
            Ok(())
        }
    });
    let mut f = Fixture::start(builder).await;
    let mut c = connect(f.addr).await;

    expect_error(&mut c, msg(join("private-x", 121)), 403, Some(121)).await;
    f.check(Some(&mut c), 2).await;
    assert_eq!(f.hub.room_len("private-x"), 0);
    assert!(!f.hub.room_exists("private-x"));
    // Calls in the refused room are refused as not joined.
    expect_error(
        &mut c,
        msg(json!({"type": "call", "ref": 122, "event": "echo", "room": "private-x"})),
        405,
        Some(122),
    )
    .await;
    // A publish there does not reach it: had it been queued, it would come
    // before the reply to the call that `assert_alive` makes afterwards.
    f.hub.publish("private-x", "secret", &json!(1)).await.unwrap();
    assert_alive(&mut c).await;

    // An authorizer that panics is answered like a handler that panics.
    expect_error(&mut c, msg(join("boom-x", 124)), 500, Some(124)).await;
    f.check(Some(&mut c), 2).await;
    assert_eq!(f.hub.room_len("boom-x"), 0);

    // Rooms the authorizer allows can still be joined.
    let r = expect_reply(&mut c, join("public-x", 123)).await;
    assert_eq!(r["data"], json!({"room": "public-x"}));
    assert_eq!(f.hub.room_len("public-x"), 1);
    f.check(Some(&mut c), 2).await;
    drop(c);
    f.finish().await;
}

// ---------------------------------------------------------------------------
// Case 13: room limit, leaving rooms not joined
// ---------------------------------------------------------------------------

#[tokio::test]
async fn room_limit_gets_413_and_leaving_frees_a_slot() {
    let mut f = Fixture::start(handlers().config(HubConfig::default().max_rooms_per_connection(3))).await;
    let mut c = connect(f.addr).await;

    for (i, room) in ["a", "b", "c"].into_iter().enumerate() {
        expect_reply(&mut c, join(room, 130 + i as u64)).await;
    }
    // Joining a room it is already in is not a fourth room.
    expect_reply(&mut c, join("a", 133)).await;
    expect_error(&mut c, msg(join("d", 134)), 413, Some(134)).await;
    f.check(Some(&mut c), 2).await;
    assert_eq!(f.hub.room_len("d"), 0);

    let r = expect_reply(&mut c, leave("a", 135)).await;
    assert_eq!(r["data"], json!({"room": "a"}));
    expect_reply(&mut c, join("d", 136)).await;
    assert_eq!(f.hub.room_len("d"), 1);
    assert_eq!(f.hub.room_len("a"), 0);

    // Leaving a room it is not in.
    expect_error(&mut c, msg(leave("a", 137)), 405, Some(137)).await;
    expect_error(&mut c, msg(leave("never", 138)), 405, Some(138)).await;
    f.check(Some(&mut c), 2).await;
    drop(c);
    f.finish().await;
}

// ---------------------------------------------------------------------------
// Case 14: more calls in flight than `max_inflight`
// ---------------------------------------------------------------------------

#[tokio::test]
async fn flood_beyond_max_inflight_gets_429_for_the_excess() {
    const INFLIGHT: usize = 4;
    // The handler reports that it started, then waits until the gate opens.
    let (gate, gate_rx) = watch::channel(false);
    let (started_tx, mut started) = mpsc::unbounded_channel::<u64>();
    let builder = handlers().config(HubConfig::default().max_inflight(INFLIGHT)).on("wait", move |_: Call, n: u64| {
        let (mut gate, started) = (gate_rx.clone(), started_tx.clone());
        async move {
            started.send(n).unwrap();
            let open = gate.wait_for(|open| *open).await.is_ok();
            assert!(open, "gate dropped");
            Ok(n)
        }
    });
    let mut f = Fixture::start(builder).await;
    let mut c = connect(f.addr).await;
    assert_alive(&mut c).await;
    let idle_tasks = f.hub.stats().tasks;

    let refs: Vec<u64> = (1401..=1420).collect();
    for r in &refs {
        c.ws.feed(msg(json!({"type": "call", "ref": r, "event": "wait", "data": r}))).await.unwrap();
    }
    c.ws.flush().await.unwrap();

    // The first four are taken; the other sixteen are refused at once, in order.
    for r in &refs[INFLIGHT..] {
        let v = c.recv().await;
        assert_error(&v, 429, Some(*r), "flooded call");
    }
    let mut running = Vec::new();
    for _ in 0..INFLIGHT {
        running.push(tokio::time::timeout(WAIT, started.recv()).await.expect("handler never started").unwrap());
    }
    running.sort_unstable();
    assert_eq!(running, refs[..INFLIGHT]);
    // Exactly four call tasks exist (more would hold the count above this).
    eventually("exactly 4 calls in flight", || f.hub.stats().tasks == idle_tasks + INFLIGHT).await;

    // While flooded: the bystander is unaffected, the offender's pings are
    // answered and a further call is refused too.
    f.tick().await;
    c.send(json!({"type": "ping", "ref": 1421})).await;
    assert_eq!(c.recv().await, json!({"type": "pong", "ref": 1421}));
    expect_error(&mut c, msg(json!({"type": "call", "ref": 1422, "event": "echo", "data": 1})), 429, Some(1422)).await;
    assert!(started.try_recv().is_err(), "a refused call reached its handler");

    // Release: the four complete.
    gate.send(true).unwrap();
    let mut replied = Vec::new();
    for _ in 0..INFLIGHT {
        let v = c.recv().await;
        assert_eq!(v["type"], "reply", "{v}");
        assert_eq!(v["data"], v["ref"], "{v}");
        replied.push(v["ref"].as_u64().unwrap());
    }
    replied.sort_unstable();
    assert_eq!(replied, refs[..INFLIGHT]);

    // Every permit came back: a full window of new calls succeeds.
    for r in 1501..=1500 + INFLIGHT as u64 {
        c.ws.feed(msg(json!({"type": "call", "ref": r, "event": "wait", "data": r}))).await.unwrap();
    }
    c.ws.flush().await.unwrap();
    for _ in 0..INFLIGHT {
        let v = c.recv().await;
        assert_eq!(v["type"], "reply", "{v}");
    }
    f.check(Some(&mut c), 2).await;
    eventually("no call left in flight", || f.hub.stats().tasks == idle_tasks).await;
    drop(c);
    f.finish().await;
}

// ---------------------------------------------------------------------------
// Case 15: transport-level violations close the connection
// ---------------------------------------------------------------------------

#[tokio::test]
async fn invalid_utf8_text_closes_1007() {
    let mut f = Fixture::start(handlers()).await;
    let mut c = connect(f.addr).await;
    let frame = Frame::message(vec![b'{', 0xff, 0xfe, b'}'], OpCode::Data(Data::Text), true);
    c.send_raw(Message::Frame(frame)).await;
    assert_eq!(c.closed().await, Some(1007));
    eventually("the offender is gone", || f.hub.stats().connections == 1).await;
    f.check(None, 1).await;

    // A reserved opcode is an RFC 6455 protocol error: 1002.
    let mut c = connect(f.addr).await;
    f.check(Some(&mut c), 2).await;
    let frame = Frame::message(b"x".to_vec(), OpCode::Data(Data::Reserved(3)), true);
    c.send_raw(Message::Frame(frame)).await;
    assert_eq!(c.closed().await, Some(1002));
    eventually("the offender is gone", || f.hub.stats().connections == 1).await;
    f.check(None, 1).await;
    f.finish().await;
}

// ---------------------------------------------------------------------------
// Case 16: handshake garbage on the standalone listener
// ---------------------------------------------------------------------------

/// Sends `request` on a fresh TCP connection and returns all the server
/// answers before it closes the connection.
async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    // The server may answer and close before it has read all of an
    // oversized head, so the write is allowed to fail.
    let _ = s.write_all(request).await;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let read = tokio::time::timeout(WAIT, s.read(&mut buf)).await.expect("server neither answered nor closed");
        match read {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            // A reset after the answer (request bytes left unread) ends it too.
            Err(_) if !out.is_empty() => break,
            Err(e) => panic!("read failed before any answer: {e}"),
        }
    }
    String::from_utf8(out).expect("non-UTF-8 HTTP answer")
}

/// Connects, sends `bytes` (maybe none), and expects the server to close
/// the socket without a word.
async fn expect_dropped(addr: SocketAddr, bytes: &[u8]) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut buf = [0u8; 256];
    let n = tokio::time::timeout(WAIT, s.read(&mut buf))
        .await
        .expect("the server never dropped a client that did not finish its handshake")
        .expect("read");
    assert_eq!(n, 0, "unexpected answer: {:?}", String::from_utf8_lossy(&buf[..n]));
}

#[tokio::test]
async fn handshake_garbage_gets_http_errors() {
    let ws = WsConfig::default().handshake_timeout(Duration::from_millis(200));
    let mut f = Fixture::start_with(handlers(), ws).await;

    let plain_get = raw_exchange(f.addr, b"GET / HTTP/1.1\r\n\r\n").await;
    assert!(plain_get.starts_with("HTTP/1.1 426 "), "{plain_get}");
    assert!(plain_get.to_ascii_lowercase().contains("\r\nupgrade: websocket\r\n"), "{plain_get}");
    f.check(None, 1).await;

    let mut random: Vec<u8> = (0u32..512).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    random[0] = 0xde;
    let random = raw_exchange(f.addr, &random).await;
    assert!(random.starts_with("HTTP/1.1 400 "), "{random}");
    f.check(None, 1).await;

    // A TLS ClientHello on the plain port.
    let tls = raw_exchange(f.addr, &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03]).await;
    assert!(tls.starts_with("HTTP/1.1 400 "), "{tls}");
    f.check(None, 1).await;

    let mut big = b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nX-Pad: ".to_vec();
    big.extend(std::iter::repeat_n(b'a', 16 * 1024));
    big.extend_from_slice(b"\r\n\r\n");
    let big = raw_exchange(f.addr, &big).await;
    assert!(big.starts_with("HTTP/1.1 431 "), "{big}");
    f.check(None, 1).await;

    // Silence, and a head that never ends: dropped after the handshake timeout.
    expect_dropped(f.addr, b"").await;
    expect_dropped(f.addr, b"GET / HTTP/1.1\r\nHost: x\r\n").await;
    f.check(None, 1).await;

    // The listener still accepts real clients.
    let mut c = connect(f.addr).await;
    f.check(Some(&mut c), 2).await;
    drop(c);
    f.finish().await;
}

// ---------------------------------------------------------------------------
// Case 17: a panicking handler
// ---------------------------------------------------------------------------

#[tokio::test]
async fn panicking_handler_gets_500() {
    let mut f = Fixture::start(handlers()).await;
    let mut c = connect(f.addr).await;
    expect_error(&mut c, msg(json!({"type": "call", "ref": 171, "event": "boom"})), 500, Some(171)).await;
    f.check(Some(&mut c), 2).await;
    expect_error(&mut c, msg(json!({"type": "call", "ref": 172, "event": "boom_sync", "data": 1})), 500, Some(172))
        .await;
    f.check(Some(&mut c), 2).await;
    // More panics than the in-flight bound: no permit is lost to a panic.
    let bound = f.hub.config().max_inflight as u64;
    for r in 0..bound + 2 {
        expect_error(&mut c, msg(json!({"type": "call", "ref": 1700 + r, "event": "boom"})), 500, Some(1700 + r)).await;
    }
    f.check(Some(&mut c), 2).await;
    drop(c);
    f.finish().await;
}
