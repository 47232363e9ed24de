//! Entry points for the cargo-fuzz targets in `fuzz/` (compiled only with
//! `--cfg fuzzing`, which cargo-fuzz sets). Each takes raw bytes from the
//! fuzzer, feeds them to a parser that reads network input, and checks the
//! invariants that must hold whatever the bytes: no panic, no unbounded
//! recursion, and encode → decode round trips.

use crate::protocol::{Envelope, Format, Kind, Version};
use bytes::Bytes;

/// Envelope decoding in `format`: decoding never panics; what decodes
/// re-encodes and decodes to the same envelope; a refused frame's `ref` is
/// readable without panicking; payload helpers are total. The same for
/// version 2 (compact event arrays), see [`envelope_v2`].
pub fn envelope(format: Format, data: &[u8]) {
    let bytes = Bytes::copy_from_slice(data);
    envelope_v2(format, &bytes);
    let _ = Envelope::reference_of(format, data);
    let Ok(env) = Envelope::decode(format, &bytes) else { return };
    if let Some(p) = &env.data {
        let _ = p.exceeds_depth(8);
        let _ = p.decode::<serde_json::Value>();
        let other = if format == Format::Json { Format::MsgPack } else { Format::Json };
        let _ = p.to_format(other);
    }
    let again = env.encode(format).expect("a decoded envelope re-encodes in its own format");
    let back = Envelope::decode(format, &again).expect("a re-encoded envelope decodes");
    assert_eq!(back, env, "round trip changed the envelope");
}

/// Version 2 decoding: never panics; what decodes re-encodes in version 2
/// and decodes to the same envelope, except that an event keeps only what
/// its array holds (room, event, data with absent as `null`, offset).
fn envelope_v2(format: Format, bytes: &Bytes) {
    let Ok(env) = Envelope::decode_as(format, Version::V2, bytes) else { return };
    let again = env.encode_as(format, Version::V2).expect("a decoded envelope re-encodes in its own format");
    let back = Envelope::decode_as(format, Version::V2, &again).expect("a re-encoded envelope decodes");
    if env.kind == Kind::Event && env.event.is_some() {
        assert_eq!((&back.room, &back.event, back.offset), (&env.room, &env.event, env.offset));
        let value =
            |e: &Envelope| e.data.as_ref().map_or(Ok(serde_json::Value::Null), |d| d.decode::<serde_json::Value>());
        if let (Ok(a), Ok(b)) = (value(&back), value(&env)) {
            assert_eq!(a, b, "round trip changed the event's data");
        }
    } else {
        assert_eq!(back, env, "round trip changed the envelope");
    }
}

/// The WebSocket handshake as the standalone listener sees it: the HTTP
/// head parser, the RFC 6455 negotiation, the query and cookie readers, the
/// forwarded-for walk (every peer trusted) and the origin check.
pub fn handshake(data: &[u8]) {
    use crate::security::{self, OriginPolicy, SecurityConfig};
    let Ok(Some((method, uri, headers, _rest))) = crate::transport::ws::parse_head(data, 8 * 1024) else { return };
    let _ = crate::transport::ws::negotiate_for_fuzzing(&method, &headers);
    let hs = crate::Handshake::new().with_uri(uri).with_headers(headers.clone());
    let _ = hs.query("access_token");
    let _ = hs.cookie("session");
    let _ = hs.format();
    let trusting =
        SecurityConfig::default().trusted_proxies(vec!["0.0.0.0/0".parse().unwrap(), "::/0".parse().unwrap()]);
    let _ = security::client_ip(&trusting, std::net::Ipv4Addr::LOCALHOST.into(), &headers);
    let host = headers.get(http::header::HOST).and_then(|v| v.to_str().ok());
    let _ = security::check_origin(&trusting, &headers, host, "refused");
    let list = trusting.origin(OriginPolicy::AllowList(vec!["https://*.example.com".into(), "http://a:1".into()]));
    let _ = security::check_origin(&list, &headers, host, "refused");
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = text.parse::<security::IpNet>();
        let _ = security::parse_forwarded_ip(text);
    }
}

/// The backplane's room-message layout (bytes another node, or a Redis
/// server, sent): decoding never panics, and what decodes re-encodes to the
/// same message.
pub fn backplane_message(data: &[u8]) {
    use crate::backplane::message::RoomMessage;
    let Some(msg) = RoomMessage::decode(Bytes::copy_from_slice(data)) else { return };
    if msg.event.len() > usize::from(u16::MAX) {
        return;
    }
    let again = RoomMessage::encode(msg.origin, msg.exclude, &msg.event, msg.payload.as_ref(), msg.position.as_ref());
    assert_eq!(RoomMessage::decode(again), Some(msg));
}

/// The WebSocket frame reader with `permessage-deflate` negotiated: the
/// first byte picks the read size, the rest is what a client sent. Reading
/// never panics, never yields a message over the limit or text that is not
/// UTF-8, and stops after the first error or close.
pub fn ws_frames(data: &[u8]) {
    crate::transport::ws::read_frames_for_fuzzing(data);
}
