//! The WebSocket transport against a real tokio-tungstenite client: the
//! frames switchboard writes itself (header + shared payload) must parse, at
//! every length class, and pings must be answered.

#[path = "support/room_log.rs"]
mod room_log;
mod support;

use futures::{SinkExt, StreamExt};
use serde_json::json;
use support::*;
use switchboard::transport::ws::{self, WsConfig};
use switchboard::transport::{Frame, Transport};
use switchboard::{Hub, HubConfig};
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn pings_are_answered_with_their_payload() {
    // Without a rate limit: pings count toward it, and the flood below
    // would be closed with 1008 (tests/abuse.rs).
    let hub = Hub::builder().config(HubConfig::default().rate_limit(None)).build();
    let addr = serve(&hub).await;
    let mut c = connect(addr).await;
    for payload in [&b""[..], b"abc", &[7u8; 125][..]] {
        c.send_raw(Message::Ping(payload.to_vec().into())).await;
        let pong = tokio::time::timeout(WAIT, c.ws.next()).await.unwrap().unwrap().unwrap();
        assert_eq!(pong, Message::Pong(payload.to_vec().into()));
    }
    // A flood of pings gets at least the latest one answered, and the
    // connection keeps working.
    for i in 0..500u32 {
        c.send_raw(Message::Ping(i.to_be_bytes().to_vec().into())).await;
    }
    let mut last = None;
    while last != Some(499u32) {
        match tokio::time::timeout(WAIT, c.ws.next()).await.unwrap().unwrap().unwrap() {
            Message::Pong(p) => last = Some(u32::from_be_bytes(p[..].try_into().unwrap())),
            other => panic!("unexpected {other:?}"),
        }
    }
    c.join_ok("r").await;
}

#[tokio::test]
async fn every_header_length_class_reaches_the_client_intact() {
    let hub = Hub::builder().config(HubConfig::default().max_message_size(1 << 20)).build();
    let addr = serve(&hub).await;
    let mut c = connect(addr).await;
    c.join_ok("r").await;
    // 7-bit, 16-bit and 64-bit payload lengths (the envelope adds ~40 bytes).
    for len in [10usize, 100, 200, 65_000, 70_000, 300_000] {
        let text: String = "x".repeat(len);
        hub.publish("r", "big", &text).await.unwrap();
        let e = c.event().await;
        assert_eq!(e["data"].as_str().map(str::len), Some(len));
    }
    // Non-ASCII text survives byte for byte.
    hub.publish("r", "uni", &"héllo ✓ 🎉").await.unwrap();
    assert_eq!(c.event().await["data"], "héllo ✓ 🎉");
}

#[tokio::test]
async fn a_burst_is_written_in_order() {
    let hub = Hub::builder().build();
    let addr = serve(&hub).await;
    let mut c = connect(addr).await;
    c.join_ok("r").await;
    for i in 0..5_000 {
        hub.publish("r", "n", &i).await.unwrap();
    }
    for i in 0..5_000 {
        assert_eq!(c.event().await["data"], json!(i));
    }
}

#[tokio::test]
async fn close_frames_carry_code_and_reason() {
    let hub = Hub::builder().build();
    let addr = serve(&hub).await;
    let mut c = connect(addr).await;
    let id = c.connection_id();
    c.join_ok("r").await;
    let member = hub.room_members("r")[0].connection;
    assert_eq!(member.get(), id);
    let reason = "ü".repeat(100); // longer than a close frame allows: cut at a char boundary
    assert!(hub.disconnect(member, switchboard::protocol::CloseCode::KICKED, &reason));
    loop {
        match tokio::time::timeout(WAIT, c.ws.next()).await.unwrap() {
            Some(Ok(Message::Close(Some(f)))) => {
                assert_eq!(u16::from(f.code), 4500);
                assert!(f.reason.len() <= 123 && f.reason.chars().all(|ch| ch == 'ü'), "{:?}", f.reason);
                break;
            }
            Some(Ok(_)) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    }
}

/// The transport on its own (no hub), as `examples/echo.rs` uses it.
#[tokio::test]
async fn bare_transport_echoes() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (stream, peer) = listener.accept().await.unwrap();
        let (transport, _) = ws::upgrade(stream, peer, &WsConfig::default(), 1 << 20).await.unwrap().unwrap();
        let (mut sink, mut stream) = transport.split();
        while let Some(Ok(frame)) = stream.next().await {
            let done = matches!(frame, Frame::Close(_));
            sink.send(frame).await.unwrap();
            if done {
                break;
            }
        }
    });
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/")).await.unwrap();
    ws.send(Message::text("hello")).await.unwrap();
    ws.send(Message::binary(vec![0u8, 1, 2, 255])).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("hello"));
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::binary(vec![0u8, 1, 2, 255]));
    ws.close(None).await.unwrap();
    assert!(matches!(ws.next().await, Some(Ok(Message::Close(_))) | None));
}

/// A WebSocket member reads its first room without history from the
/// room's log (`docs/architecture.md` §12, *Room logs*): the room's events
/// reach it as runs of frames copied back to back. Whatever it reads from
/// where, it gets every message in the order it was produced: room events,
/// host sends, a second room's events (queued as before), events excluded
/// for it left out, and after a `leave` nothing more of that room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_reading_a_room_log_keeps_the_order_of_everything_it_gets() {
    let hub = Hub::builder().build();
    let addr = serve(&hub).await;
    let mut c = connect(addr).await;
    c.join_ok("a").await;
    c.join_ok("b").await;
    let id = member_id(&hub, "a", c.connection_id());
    // Another member of `a` on the same log, reading all along.
    let mut other = connect(addr).await;
    other.join_ok("a").await;

    let expected = room_log::mixed_burst(&hub, id).await;
    let mut got = Vec::new();
    while got.len() < expected.len() {
        let v = c.recv().await;
        assert_eq!(v["type"], "event", "unexpected {v}");
        got.push(v["data"].as_u64().unwrap());
    }
    assert_eq!(room_log::first_difference(&got, &expected), None, "out of order from there");
    // The other member got every event of `a`, the excluded ones too.
    let of_a = room_log::events_of_a();
    let mut got = Vec::new();
    while got.len() < of_a.len() {
        got.push(other.event().await["data"].as_u64().unwrap());
    }
    assert_eq!(got, of_a);

    // Leave `a`: what was published before the reply comes before it,
    // nothing after it.
    hub.publish("a", "ev", &"before").await.unwrap();
    c.send(json!({"type": "leave", "ref": 9, "room": "a"})).await;
    let before = c.recv().await;
    assert_eq!(before["data"], "before", "{before}");
    let reply = c.recv().await;
    assert_eq!((reply["type"].as_str(), reply["ref"].as_u64()), (Some("reply"), Some(9)), "{reply}");
    hub.publish("a", "ev", &"after").await.unwrap();
    hub.publish("b", "ev", &"end").await.unwrap();
    let next = c.recv().await;
    assert_eq!(next["data"], "end", "got {next} after leaving");
    assert_eq!(hub.connection(id).unwrap().queued_bytes(), 0);
}

/// Under drop-oldest, a WebSocket member that stops reading is left behind
/// by the room log's bound once its socket's buffers are full, is told how
/// many events it missed (`lagged`), and then gets the newest ones: nothing
/// is lost without being counted, the queued bytes stay within the bound,
/// and a member that reads keeps up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_websocket_on_a_room_log_lags_by_a_counted_number_of_events() {
    use switchboard::hub::OverflowPolicy;
    const BOUND: usize = 64 * 1024;
    let hub = Hub::builder()
        .config(HubConfig::default().outbound_queue_bytes(BOUND).overflow(OverflowPolicy::DropOldest))
        .build();
    let addr = serve(&hub).await;
    let mut slow = connect(addr).await;
    slow.join_ok("r").await;
    let id = member_id(&hub, "r", slow.connection_id());
    let mut fast = connect(addr).await;
    fast.join_ok("r").await;

    const TOTAL: u64 = 20_000;
    let fast = futures::stream::unfold(fast, |mut c| async move {
        let i = c.event().await["data"]["i"].as_u64().unwrap();
        Some((i, c))
    });
    room_log::publish_beside_a_reader(&hub, "r", TOTAL, id, BOUND, fast).await;

    let mut tally = room_log::Tally::default();
    while !tally.done(TOTAL) {
        let v = slow.recv().await;
        match v["type"].as_str() {
            Some("lagged") => tally.lagged(v["data"]["dropped"].as_u64().unwrap()),
            Some("event") => tally.event(v["data"]["i"].as_u64().unwrap()),
            _ => panic!("unexpected {v}"),
        }
    }
    tally.check(TOTAL, &hub, id);
    println!("stalled websocket: {tally:?}");
}
