//! End-to-end tests of rooms, direct sends, request/reply, fan-out encoding,
//! the backplane, MessagePack and the axum integration, over real sockets.

mod support;

use futures::{SinkExt, StreamExt};
use serde::{Serialize, Serializer};
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use support::*;
use switchboard::transport::{Frame, Handshake};
use switchboard::{backplane::MemoryBackplane, Call, CallError, Hub, HubConfig, Identity, Rejection};
use tokio_tungstenite::tungstenite::Message;

fn internal(e: switchboard::Error) -> CallError {
    CallError::internal(e.to_string())
}

/// Admits everyone; `?user=NAME` makes the connection user NAME.
fn user_from_query(hs: &Handshake) -> impl std::future::Future<Output = Result<Identity, Rejection>> + Send + 'static {
    let user = hs.query("user");
    async move { Ok(user.map(Identity::user).unwrap_or_default()) }
}

#[tokio::test]
async fn publishes_never_leave_their_room() {
    let hub = Hub::builder()
        .on("shout", |call: Call, data: Value| async move {
            call.broadcast("shouted", &data).await.map_err(internal)?;
            Ok(json!({"ok": true}))
        })
        .build();
    let addr = serve(&hub).await;
    let mut a = connect(addr).await;
    let mut b = connect(addr).await;
    let mut ab = connect(addr).await;
    a.join_ok("A").await;
    b.join_ok("B").await;
    ab.join_ok("A").await;
    ab.join_ok("B").await;

    // To A: by the host, and by a handler broadcasting in the caller's room.
    hub.publish("A", "news", &json!({"n": 1})).await.unwrap();
    let r = a.call_in("A", "shout", json!({"n": 2})).await;
    assert_eq!(r["type"], "reply", "{r}");
    // To B, the same two ways.
    hub.publish("B", "news", &json!({"n": 3})).await.unwrap();
    let r = b.call_in("B", "shout", json!({"n": 4})).await;
    assert_eq!(r["type"], "reply", "{r}");
    // Markers, published after everything above.
    hub.publish("A", "marker", &json!("A")).await.unwrap();
    hub.publish("B", "marker", &json!("B")).await.unwrap();

    let ev =
        |room: &str, event: &str, data: Value| json!({"type": "event", "room": room, "event": event, "data": data});
    assert_eq!(a.event().await, ev("A", "news", json!({"n": 1})));
    assert_eq!(a.event().await, ev("A", "shouted", json!({"n": 2})));
    assert_eq!(a.event().await, ev("A", "marker", json!("A")), "A-only member got a B event");
    assert_eq!(b.event().await, ev("B", "news", json!({"n": 3})));
    assert_eq!(b.event().await, ev("B", "shouted", json!({"n": 4})));
    assert_eq!(b.event().await, ev("B", "marker", json!("B")), "B-only member got an A event");
    // The member of both rooms gets both, each room's in order.
    let mut got = Vec::new();
    for _ in 0..6 {
        got.push(ab.event().await);
    }
    let of = |room: &str| got.iter().filter(|e| e["room"] == room).map(|e| e["data"].clone()).collect::<Vec<_>>();
    assert_eq!(of("A"), vec![json!({"n": 1}), json!({"n": 2}), json!("A")]);
    assert_eq!(of("B"), vec![json!({"n": 3}), json!({"n": 4}), json!("B")]);
    assert_eq!(a.pending_events() + b.pending_events() + ab.pending_events(), 0);
}

#[tokio::test]
async fn broadcast_others_and_publish_except_skip_the_sender() {
    let hub = Hub::builder()
        .on("tell", |call: Call, data: Value| async move {
            call.broadcast_others("told", &data).await.map_err(internal)?;
            Ok(json!({"ok": true}))
        })
        .build();
    let addr = serve(&hub).await;
    let mut a = connect(addr).await;
    let mut b = connect(addr).await;
    let mut c = connect(addr).await;
    for cl in [&mut a, &mut b, &mut c] {
        cl.join_ok("r").await;
    }

    // The told event would be queued to `a` before its reply: absent from
    // what `a` set aside while waiting for the reply.
    let r = a.call_in("r", "tell", json!({"n": 1})).await;
    assert_eq!(r["type"], "reply", "{r}");
    assert_eq!(a.pending_events(), 0, "sender got its own broadcast_others");
    let told = json!({"type": "event", "room": "r", "event": "told", "data": {"n": 1}});
    assert_eq!(b.event().await, told);
    assert_eq!(c.event().await, told);

    let b_id = member_id(&hub, "r", b.connection_id());
    hub.publish_except("r", "x", &json!({"n": 2}), b_id).await.unwrap();
    hub.publish("r", "marker", &json!(null)).await.unwrap();

    let x = json!({"type": "event", "room": "r", "event": "x", "data": {"n": 2}});
    assert_eq!(a.event().await, x);
    assert_eq!(a.event().await["event"], "marker", "sender got `told` after all");
    assert_eq!(b.event().await["event"], "marker", "the excluded connection got the publish_except event");
    assert_eq!(c.event().await, x);
    assert_eq!(c.event().await["event"], "marker");
}

#[tokio::test]
async fn send_to_user_and_send_to_one_connection() {
    let hub = Hub::builder().authenticate(user_from_query).build();
    let addr = serve(&hub).await;
    let mut alice = Vec::new();
    for _ in 0..3 {
        alice.push(connect_path(addr, "/?user=alice").await);
    }
    let mut bob = connect_path(addr, "/?user=bob").await;
    assert_eq!(hub.stats().users, 2);
    assert_eq!(hub.stats().connections, 4);

    let n = hub.send_to_user("alice", "note", &json!({"text": "hi alice"})).unwrap();
    assert_eq!(n, 3);
    assert_eq!(hub.send_to_user("carol", "note", &json!(1)).unwrap(), 0);
    assert_eq!(hub.send_to_user("bob", "marker", &json!(null)).unwrap(), 1);
    let note = json!({"type": "event", "event": "note", "data": {"text": "hi alice"}});
    for a in &mut alice {
        assert_eq!(a.event().await, note);
    }
    assert_eq!(bob.event().await, json!({"type": "event", "event": "marker", "data": null}), "bob got alice's note");

    // One connection by id (learned through a room, the public way to map a
    // hello's connection_id to a ConnectionId).
    alice[0].join_ok("x").await;
    let id = member_id(&hub, "x", alice[0].connection_id());
    hub.send(id, "direct", &json!({"only": "you"})).unwrap();
    assert_eq!(hub.send_to_user("alice", "marker", &json!(null)).unwrap(), 3);
    assert_eq!(alice[0].event().await, json!({"type": "event", "event": "direct", "data": {"only": "you"}}));
    for a in &mut alice {
        assert_eq!(a.event().await["event"], "marker", "`send` reached another connection of the user");
    }
}

#[tokio::test]
async fn concurrent_calls_are_correlated_by_ref() {
    let hub = Hub::builder()
        .on("sleep", |_call: Call, req: Value| async move {
            tokio::time::sleep(Duration::from_millis(req["ms"].as_u64().unwrap())).await;
            Ok(json!({"id": req["id"]}))
        })
        .build();
    let addr = serve(&hub).await;
    let mut c = connect(addr).await;
    // Sent in this order; the handler's sleeps make the replies come back in
    // another one.
    let jobs =
        [(101u64, "slowest", 400u64), (102, "fast", 0), (103, "slow", 200), (104, "fastish", 20), (105, "mid", 100)];
    for (r, id, ms) in jobs {
        c.send(json!({"type": "call", "ref": r, "event": "sleep", "data": {"id": id, "ms": ms}})).await;
    }
    let expected: HashMap<u64, &str> = jobs.iter().map(|(r, id, _)| (*r, *id)).collect();
    let mut order = Vec::new();
    for _ in 0..jobs.len() {
        let m = c.recv().await;
        assert_eq!(m["type"], "reply", "{m}");
        let r = m["ref"].as_u64().unwrap();
        assert_eq!(m["data"]["id"], expected[&r], "reply {m} carries another call's answer");
        order.push(r);
    }
    let distinct: HashSet<u64> = order.iter().copied().collect();
    assert_eq!(distinct.len(), jobs.len(), "every call answered exactly once: {order:?}");
    let sent: Vec<u64> = jobs.iter().map(|j| j.0).collect();
    assert_ne!(order, sent, "replies came back in send order: calls were not concurrent");
}

#[tokio::test]
async fn handler_timeout_is_408_and_the_connection_goes_on() {
    struct SetOnDrop(Arc<AtomicBool>);
    impl Drop for SetOnDrop {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }
    let cancelled = Arc::new(AtomicBool::new(false));
    let flag = cancelled.clone();
    let hub = Hub::builder()
        .config(HubConfig::default().handler_timeout(Duration::from_millis(100)))
        .on("stall", move |_call: Call, _: Value| {
            let guard = SetOnDrop(flag.clone());
            async move {
                let _guard = guard;
                tokio::time::sleep(Duration::from_secs(10)).await;
                Ok(json!("too late"))
            }
        })
        .on("echo", |_call: Call, v: Value| async move { Ok(v) })
        .build();
    let addr = serve(&hub).await;
    let mut c = connect(addr).await;
    c.send(json!({"type": "call", "ref": 7, "event": "stall", "data": null})).await;
    let e = c.recv().await;
    assert_eq!(e["type"], "error", "{e}");
    assert_eq!(e["code"], 408, "{e}");
    assert_eq!(e["ref"], 7, "{e}");
    eventually("the timed-out handler is dropped", || cancelled.load(Ordering::SeqCst)).await;
    let r = c.call("echo", json!({"still": "here"})).await;
    assert_eq!(r["type"], "reply", "{r}");
    assert_eq!(r["data"], json!({"still": "here"}));
}

static SERIALIZED: AtomicUsize = AtomicUsize::new(0);

/// A payload that counts how often it is serialized.
struct Counted(u64);

impl Serialize for Counted {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        SERIALIZED.fetch_add(1, Ordering::SeqCst);
        s.serialize_u64(self.0)
    }
}

#[tokio::test]
async fn a_publish_is_serialized_once_per_format() {
    let hub = Hub::builder().build();
    let addr = serve(&hub).await;
    let mut clients = Vec::new();
    for _ in 0..50 {
        let mut c = connect(addr).await;
        c.join_ok("big").await;
        clients.push(c);
    }
    let before = SERIALIZED.load(Ordering::SeqCst);
    hub.publish("big", "tick", &Counted(7)).await.unwrap();
    assert_eq!(SERIALIZED.load(Ordering::SeqCst) - before, 1, "50 JSON members: one serialization");
    for c in &mut clients {
        assert_eq!(c.event().await, json!({"type": "event", "room": "big", "event": "tick", "data": 7}));
    }

    let (mut mp, chosen) = connect_protocol(addr, "switchboard.v1.msgpack").await;
    assert_eq!(chosen.as_deref(), Some("switchboard.v1.msgpack"));
    assert_eq!(next_msgpack(&mut mp).await["type"], "hello");
    send_msgpack(&mut mp, &json!({"type": "join", "ref": 1, "room": "big"})).await;
    let r = next_msgpack(&mut mp).await;
    assert_eq!((r["type"].as_str(), r["ref"].as_u64()), (Some("reply"), Some(1)), "{r}");

    let before = SERIALIZED.load(Ordering::SeqCst);
    hub.publish("big", "tick", &Counted(8)).await.unwrap();
    assert_eq!(SERIALIZED.load(Ordering::SeqCst) - before, 2, "JSON and MessagePack members: one serialization each");
    for c in &mut clients {
        assert_eq!(c.event().await["data"], 8);
    }
    assert_eq!(next_msgpack(&mut mp).await, json!({"type": "event", "room": "big", "event": "tick", "data": 8}));

    // A member on a transport that takes plain payloads (the in-memory one)
    // beside the WebSocket members, which take frames the hub framed once:
    // still one serialization per format, and each gets its own form.
    let (transport, mut peer) = switchboard::transport::memory::pair(64);
    let served = hub.clone();
    tokio::spawn(async move { served.connect(transport, Handshake::new()).await.unwrap() });
    let plain = |f: Option<Frame>| -> Value {
        match f.expect("frame") {
            Frame::Text(b) => serde_json::from_slice(&b).expect("a bare JSON envelope, no frame header"),
            other => panic!("expected text, got {other:?}"),
        }
    };
    assert_eq!(plain(peer.recv().await)["type"], "hello");
    let join = r#"{"type":"join","ref":1,"room":"big"}"#;
    peer.send(Frame::Text(bytes::Bytes::from_static(join.as_bytes()))).await.unwrap();
    assert_eq!(plain(peer.recv().await)["type"], "reply");
    let before = SERIALIZED.load(Ordering::SeqCst);
    hub.publish("big", "tick", &Counted(9)).await.unwrap();
    assert_eq!(SERIALIZED.load(Ordering::SeqCst) - before, 2, "framing is not serializing again");
    assert_eq!(plain(peer.recv().await), json!({"type": "event", "room": "big", "event": "tick", "data": 9}));
    for c in &mut clients {
        assert_eq!(c.event().await, json!({"type": "event", "room": "big", "event": "tick", "data": 9}));
    }
    assert_eq!(next_msgpack(&mut mp).await, json!({"type": "event", "room": "big", "event": "tick", "data": 9}));
}

/// Publishes a fence from each hub and collects what `c` gets until it has
/// seen both: anything a hub or the backplane queued to `c` earlier
/// (duplicates, echoes) arrives before the fence that travels its path.
async fn events_until_fences(c: &mut Client, fences: usize) -> Vec<Value> {
    let mut seen_fences = 0;
    let mut got = Vec::new();
    while seen_fences < fences {
        let e = c.event().await;
        if e["event"] == "fence" {
            seen_fences += 1;
        } else {
            got.push(e["data"].clone());
        }
    }
    got.sort_by_key(|v| v["n"].as_u64());
    got
}

#[tokio::test]
async fn two_hubs_on_one_memory_backplane() {
    let bp = MemoryBackplane::new();
    let hub1 = Hub::builder().backplane(bp.clone()).build();
    let hub2 = Hub::builder().backplane(bp.clone()).build();
    let (addr1, addr2) = (serve(&hub1).await, serve(&hub2).await);
    let mut c1 = connect(addr1).await;
    let mut c2 = connect(addr2).await;
    let mut d2 = connect(addr2).await;
    // Ids are per hub: c1 and c2 are both the first connection of theirs.
    assert_eq!(c1.connection_id(), c2.connection_id());
    for c in [&mut c1, &mut c2, &mut d2] {
        c.join_ok("r").await;
    }
    assert_eq!(bp.topic_count(), 1);

    hub1.publish("r", "e", &json!({"n": 1})).await.unwrap();
    hub2.publish("r", "e", &json!({"n": 2})).await.unwrap();
    hub1.publish("r", "fence", &json!(null)).await.unwrap();
    hub2.publish("r", "fence", &json!(null)).await.unwrap();
    let both = vec![json!({"n": 1}), json!({"n": 2})];
    assert_eq!(events_until_fences(&mut c1, 2).await, both, "hub 1's client");
    assert_eq!(events_until_fences(&mut c2, 2).await, both, "hub 2's client");
    assert_eq!(events_until_fences(&mut d2, 2).await, both, "hub 2's other client");

    // Excluding the sender skips exactly it: not the connection that has the
    // same number on the other hub.
    let c1_id = member_id(&hub1, "r", c1.connection_id());
    let c2_id = member_id(&hub2, "r", c2.connection_id());
    hub1.publish_except("r", "e", &json!({"n": 3}), c1_id).await.unwrap();
    hub2.publish_except("r", "e", &json!({"n": 4}), c2_id).await.unwrap();
    hub1.publish("r", "fence", &json!(null)).await.unwrap();
    hub2.publish("r", "fence", &json!(null)).await.unwrap();
    assert_eq!(events_until_fences(&mut c1, 2).await, vec![json!({"n": 4})], "hub 1's sender");
    assert_eq!(events_until_fences(&mut c2, 2).await, vec![json!({"n": 3})], "hub 2's sender");
    assert_eq!(events_until_fences(&mut d2, 2).await, vec![json!({"n": 3}), json!({"n": 4})], "hub 2's other client");

    for c in [&mut c1, &mut c2, &mut d2] {
        let r = c.request(json!({"type": "leave", "room": "r"})).await;
        assert_eq!(r["type"], "reply", "{r}");
    }
    eventually("backplane topics released", || bp.topic_count() == 0).await;
    assert_eq!(hub1.stats().rooms + hub2.stats().rooms, 0);
}

#[tokio::test]
async fn messagepack_end_to_end() {
    let hub = Hub::builder()
        .on("add", |_call: Call, req: Value| async move {
            let (a, b) = (req["a"].as_i64().unwrap(), req["b"].as_i64().unwrap());
            Ok(json!({"sum": a + b}))
        })
        .build();
    let addr = serve(&hub).await;
    let (mut ws, chosen) = connect_protocol(addr, "switchboard.v1.msgpack").await;
    assert_eq!(chosen.as_deref(), Some("switchboard.v1.msgpack"));
    // Everything comes in binary frames (next_msgpack fails on text).
    let hello = next_msgpack(&mut ws).await;
    assert_eq!(hello["type"], "hello", "{hello}");
    assert_eq!(hello["data"]["version"], 1);
    assert!(hello["data"]["connection_id"].as_u64().is_some(), "{hello}");

    send_msgpack(&mut ws, &json!({"type": "join", "ref": 1, "room": "mp"})).await;
    assert_eq!(next_msgpack(&mut ws).await, json!({"type": "reply", "ref": 1, "data": {"room": "mp"}}));
    send_msgpack(&mut ws, &json!({"type": "call", "ref": 2, "event": "add", "data": {"a": 40, "b": 2}})).await;
    assert_eq!(next_msgpack(&mut ws).await, json!({"type": "reply", "ref": 2, "data": {"sum": 42}}));
    send_msgpack(&mut ws, &json!({"type": "call", "ref": 3, "event": "nope"})).await;
    let e = next_msgpack(&mut ws).await;
    assert_eq!((e["type"].as_str(), e["ref"].as_u64(), e["code"].as_u64()), (Some("error"), Some(3), Some(404)), "{e}");

    hub.publish("mp", "news", &json!({"k": [1, 2, 3]})).await.unwrap();
    assert_eq!(
        next_msgpack(&mut ws).await,
        json!({"type": "event", "room": "mp", "event": "news", "data": {"k": [1, 2, 3]}})
    );
}

/// The next data frame as bytes (text or binary), skipping pings.
async fn next_frame(ws: &mut Ws) -> Message {
    loop {
        let msg = tokio::time::timeout(WAIT, ws.next()).await.expect("timed out waiting for a message");
        match msg.expect("stream ended").expect("read error") {
            Message::Ping(_) | Message::Pong(_) => continue,
            other => return other,
        }
    }
}

#[tokio::test]
async fn version_2_events_are_compact_arrays_next_to_version_1_clients() {
    let history = switchboard::history::MemoryHistory::new();
    let hub = Hub::builder()
        .history(
            history,
            switchboard::history::HistoryConfig::default().rooms("log", switchboard::history::RoomHistory::default()),
        )
        .on("relay", |call: Call, data: Value| async move {
            call.broadcast_others("said", &data).await.map(|_| ()).map_err(|e| CallError::internal(e.to_string()))
        })
        .build();
    let addr = serve(&hub).await;
    // One client of each subprotocol in room "r" (and "log", recoverable).
    let mut clients = Vec::new();
    for protocol in ["switchboard.v1.json", "switchboard.v2.json", "switchboard.v1.msgpack", "switchboard.v2.msgpack"] {
        let (mut ws, chosen) = connect_protocol(addr, protocol).await;
        assert_eq!(chosen.as_deref(), Some(protocol));
        let msgpack = protocol.ends_with("msgpack");
        let hello = if msgpack { next_msgpack(&mut ws).await } else { next_json(&mut ws).await };
        let v2 = protocol.contains(".v2.");
        // Everything but events is as in version 1: the hello names the version.
        assert_eq!(hello["data"]["version"], if v2 { 2 } else { 1 }, "{hello}");
        for (r, room) in [(1, "r"), (2, "log")] {
            let join = json!({"type": "join", "ref": r, "room": room});
            let reply = if msgpack {
                send_msgpack(&mut ws, &join).await;
                next_msgpack(&mut ws).await
            } else {
                ws.send(Message::text(join.to_string())).await.unwrap();
                next_json(&mut ws).await
            };
            assert_eq!(reply["type"], "reply", "{protocol}: {reply}");
        }
        let id = hello["data"]["connection_id"].as_u64().unwrap();
        clients.push((protocol, ws, id));
    }
    let data = json!({"text": "hé", "n": [1, 2]});
    hub.publish("r", "news", &data).await.unwrap();
    let position = hub.publish("log", "line", &data).await.unwrap().position.unwrap();
    let v2_json = member_id(&hub, "r", clients[1].2);
    hub.send(v2_json, "direct", &data).unwrap();
    let v2_msgpack = member_id(&hub, "r", clients[3].2);
    hub.send(v2_msgpack, "direct", &data).unwrap();

    for (protocol, ws, _) in &mut clients {
        let v1_news = json!({"type": "event", "room": "r", "event": "news", "data": data});
        let v1_line = json!({"type": "event", "room": "log", "event": "line", "data": data, "offset": position.offset});
        let v2_news = json!(["r", "news", data]);
        let v2_line = json!(["log", "line", data, position.offset]);
        let v2_direct = json!([null, "direct", data]);
        let frames = [next_frame(ws).await, next_frame(ws).await];
        let got: Vec<Value> = frames
            .iter()
            .map(|f| match f {
                Message::Text(t) => serde_json::from_str(t).unwrap(),
                Message::Binary(b) => rmp_serde::from_slice(b).unwrap(),
                other => panic!("{protocol}: unexpected {other:?}"),
            })
            .collect();
        match *protocol {
            "switchboard.v1.json" | "switchboard.v1.msgpack" => assert_eq!(got, [v1_news, v1_line], "{protocol}"),
            _ => {
                assert_eq!(got, [v2_news, v2_line], "{protocol}");
                assert_eq!(
                    match next_frame(ws).await {
                        Message::Text(t) => serde_json::from_str::<Value>(&t).unwrap(),
                        Message::Binary(b) => rmp_serde::from_slice(&b).unwrap(),
                        other => panic!("{other:?}"),
                    },
                    v2_direct,
                    "{protocol}"
                );
            }
        }
        let binary = protocol.ends_with("msgpack");
        assert!(frames.iter().all(|f| f.is_binary() == binary), "{protocol}: frame kinds follow the format");
    }

    // A client's call broadcast by its handler: the v1 JSON client relays,
    // the v2 JSON client gets the array.
    let (_, relay, _) = &mut clients[0];
    relay
        .send(Message::text(json!({"type": "call", "room": "r", "event": "relay", "data": {"k": 1}}).to_string()))
        .await
        .unwrap();
    let (_, v2, _) = &mut clients[1];
    match next_frame(v2).await {
        Message::Text(t) => assert_eq!(t.as_str(), r#"["r","said",{"k":1}]"#),
        other => panic!("{other:?}"),
    }
}

fn token_hub() -> Hub {
    Hub::builder()
        .authenticate(|hs: &Handshake| {
            let token = hs.query("token");
            let peer = hs.peer_addr();
            async move {
                match token.as_deref() {
                    Some("secret") => Ok(Identity::user("tok").with_data(peer)),
                    Some(_) => Err(Rejection::forbidden("bad token")),
                    None => Err(Rejection::unauthorized("missing token")),
                }
            }
        })
        .on("whoami", |call: Call, _: Value| async move {
            let peer = call.identity().data::<Option<SocketAddr>>().copied().flatten();
            Ok(json!({"user": call.user_id(), "peer_known": peer.is_some()}))
        })
        .build()
}

async fn check_admitted_client(hub: &Hub, addr: SocketAddr, path: &str) -> Client {
    let mut c = connect_path(addr, &format!("{path}?token=secret")).await;
    c.join_ok("lobby").await;
    let r = c.call("whoami", json!(null)).await;
    assert_eq!(r["data"], json!({"user": "tok", "peer_known": true}), "{r}");
    hub.publish("lobby", "news", &json!(1)).await.unwrap();
    assert_eq!(c.event().await, json!({"type": "event", "room": "lobby", "event": "news", "data": 1}));
    c
}

#[tokio::test]
async fn axum_route_upgrades_authenticates_and_refuses() {
    let hub = token_hub();
    let addr = serve_axum(&hub).await;
    let _client = check_admitted_client(&hub, addr, "/ws").await;
    assert_eq!(refused_status(&format!("ws://{addr}/ws")).await, 401);
    assert_eq!(refused_status(&format!("ws://{addr}/ws?token=wrong")).await, 403);
    assert_eq!(plain_get_status(addr, "/ws").await, 426);
    // The app's own routes are untouched.
    assert_eq!(plain_get_status(addr, "/").await, 200);
    assert_eq!(hub.stats().connections, 1);
}

#[tokio::test]
async fn standalone_server_authenticates_and_refuses() {
    let hub = token_hub();
    let addr = serve(&hub).await;
    let _client = check_admitted_client(&hub, addr, "/").await;
    assert_eq!(refused_status(&format!("ws://{addr}/")).await, 401);
    assert_eq!(refused_status(&format!("ws://{addr}/?token=wrong")).await, 403);
    assert_eq!(plain_get_status(addr, "/").await, 426);
    assert_eq!(hub.stats().connections, 1);
}

#[tokio::test]
async fn refused_upgrade_leaves_nothing_behind() {
    let hub = token_hub();
    let addr = serve(&hub).await;
    let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/?token=secret")).await.unwrap();
    let mut ws = ws;
    // hello arrives, then the refused attempt must not add anything.
    assert!(ws.next().await.is_some());
    assert_eq!(refused_status(&format!("ws://{addr}/")).await, 401);
    assert_eq!(hub.stats().connections, 1);
    drop(ws);
    eventually("all gone", || hub.stats() == Default::default()).await;
}

/// A client that pipelines calls into one room (a publisher) has them
/// handled in order: its broadcasts reach the others in the order it sent
/// them, even though handlers run in their own tasks. Handlers here yield a
/// varying number of times, which reorders them if they ran concurrently.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_in_one_room_are_handled_in_order() {
    let hub = Hub::builder()
        .config(switchboard::HubConfig::default().max_inflight(512))
        .on("pub", |call: Call, n: u64| async move {
            for _ in 0..(n % 4) {
                tokio::task::yield_now().await;
            }
            call.broadcast_others("pub", &n).await.map_err(|e| CallError::internal(e.to_string()))
        })
        .build();
    let addr = serve(&hub).await;
    let mut publisher = connect(addr).await;
    let mut reader = connect(addr).await;
    publisher.join_ok("r").await;
    reader.join_ok("r").await;
    for n in 0..150u64 {
        publisher.send(json!({"type": "call", "room": "r", "event": "pub", "data": n})).await;
    }
    for n in 0..150u64 {
        let e = reader.event().await;
        assert_eq!(e["data"], json!(n), "broadcast {n} arrived out of order");
    }
}

/// `Hub::join` reports every failure as a `switchboard::Error` a host can
/// match on, and a refusal carries the reply a client's own `join` gets.
#[tokio::test]
async fn host_join_errors_have_kinds_and_the_client_reply() {
    use switchboard::ErrorKind;
    let hub = Hub::builder().config(HubConfig::default().max_rooms_per_connection(1)).build();
    let addr = serve(&hub).await;
    let mut c = connect(addr).await;
    c.join_ok("a").await;
    let id = member_id(&hub, "a", c.connection_id());

    let err = hub.join(id, "b").await.expect_err("over the room limit");
    assert_eq!(err.kind(), ErrorKind::Refused, "{err}");
    assert!(err.is_refused());
    let reply = err.call_error().expect("the client's reply");
    assert_eq!(reply.code(), switchboard::protocol::ErrorCode::TOO_MANY_ROOMS.0);
    // `?` in a handler turns it into exactly that reply.
    assert_eq!(
        CallError::from(err),
        CallError::with_code(switchboard::protocol::ErrorCode::TOO_MANY_ROOMS, "room limit reached")
    );
    // The client's own join over the limit gets the same reply.
    let r = c.join("b").await;
    assert_eq!(r["type"], "error", "{r}");
    assert_eq!(r["code"], switchboard::protocol::ErrorCode::TOO_MANY_ROOMS.0, "{r}");
    assert_eq!(r["message"], "room limit reached", "{r}");

    let err = hub.join(id, "").await.expect_err("an invalid name");
    assert_eq!(err.kind(), ErrorKind::InvalidRoom, "{err}");
    assert!(err.call_error().is_none());

    drop(c);
    eventually("the connection is gone", || hub.connection(id).is_none()).await;
    let err = hub.join(id, "a").await.expect_err("a connection that is gone");
    assert!(err.is_not_connected(), "{err}");
}

/// `Hub::admit` refuses with `ErrorKind::Refused` and the HTTP answer.
#[tokio::test]
async fn admit_refusal_is_an_error_with_its_http_answer() {
    let hub = Hub::builder().build();
    let mut headers = http::HeaderMap::new();
    headers.insert(http::header::HOST, "app.example.com".parse().unwrap());
    headers.insert(http::header::ORIGIN, "https://evil.example".parse().unwrap());
    let err = hub.admit(&mut Handshake::new().with_headers(headers)).expect_err("a foreign origin");
    assert!(err.is_refused(), "{err}");
    assert!(!err.is_shutting_down());
    let rejection = err.rejection().expect("the HTTP answer");
    assert_eq!(rejection.status().as_u16(), 403);
    assert!(!rejection.message().is_empty());
}
