//! The bytes a hub puts on the backplane for one room publish.
//!
//! ```text
//! u8  version (1)
//! u64 origin node id      (big endian)
//! u64 excluded connection (0: none)
//! u8  payload format      (0: none, 1: JSON, 2: MessagePack)
//! u16 event name length, event name (UTF-8)
//! ..  payload bytes (the rest)
//! ```
//! The room is the topic the message was published on.

use crate::protocol::{Format, Payload};
use bytes::{Buf, BufMut, Bytes, BytesMut};

const VERSION: u8 = 1;

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct RoomMessage {
    pub origin: u64,
    pub exclude: u64,
    pub event: String,
    pub payload: Option<Payload>,
}

impl RoomMessage {
    pub(crate) fn encode(origin: u64, exclude: u64, event: &str, payload: Option<&Payload>) -> Bytes {
        let body = payload.map(|p| p.bytes().as_ref()).unwrap_or_default();
        let mut out = BytesMut::with_capacity(20 + event.len() + body.len());
        out.put_u8(VERSION);
        out.put_u64(origin);
        out.put_u64(exclude);
        out.put_u8(match payload.map(Payload::format) {
            None => 0,
            Some(Format::Json) => 1,
            Some(Format::MsgPack) => 2,
        });
        // Event names are limited to 128 bytes by the hub.
        out.put_u16(event.len() as u16);
        out.put_slice(event.as_bytes());
        out.put_slice(body);
        out.freeze()
    }

    pub(crate) fn decode(mut bytes: Bytes) -> Option<RoomMessage> {
        if bytes.len() < 20 || bytes.get_u8() != VERSION {
            return None;
        }
        let origin = bytes.get_u64();
        let exclude = bytes.get_u64();
        let format = match bytes.get_u8() {
            0 => None,
            1 => Some(Format::Json),
            2 => Some(Format::MsgPack),
            _ => return None,
        };
        let len = usize::from(bytes.get_u16());
        if bytes.len() < len {
            return None;
        }
        let event = String::from_utf8(bytes.split_to(len).to_vec()).ok()?;
        let payload = match format {
            None => None,
            Some(f) => Some(Payload::from_encoded(f, bytes).ok()?),
        };
        Some(RoomMessage { origin, exclude, event, payload })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_garbage() {
        let p = Payload::encode(Format::Json, &serde_json::json!({"x": 1})).unwrap();
        let b = RoomMessage::encode(7, 9, "msg", Some(&p));
        let m = RoomMessage::decode(b.clone()).unwrap();
        assert_eq!((m.origin, m.exclude, m.event.as_str()), (7, 9, "msg"));
        assert_eq!(m.payload.unwrap(), p);
        assert!(RoomMessage::decode(b.slice(..10)).is_none());
        assert!(RoomMessage::decode(Bytes::from_static(b"garbage garbage garbage")).is_none());
        let none = RoomMessage::decode(RoomMessage::encode(1, 0, "e", None)).unwrap();
        assert!(none.payload.is_none());
    }
}
