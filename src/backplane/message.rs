//! The bytes a hub puts on the backplane for one room publish.
//!
//! ```text
//! u8  version (1)
//! u64 origin node id      (big endian)
//! u64 excluded connection (0: none)
//! u64 offset              (0: not a recoverable room's event)
//! u8  epoch length, epoch (UTF-8; only when the offset is not 0)
//! u8  payload format      (0: none, 1: JSON, 2: MessagePack)
//! u16 event name length, event name (UTF-8)
//! ..  payload bytes (the rest)
//! ```
//! The room is the topic the message was published on.

use crate::history::StreamPosition;
use crate::protocol::{Format, Payload};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use std::sync::Arc;

const VERSION: u8 = 1;

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct RoomMessage {
    pub origin: u64,
    pub exclude: u64,
    /// A recoverable room's event: its position in the room's stream.
    pub position: Option<StreamPosition>,
    pub event: String,
    pub payload: Option<Payload>,
}

impl RoomMessage {
    pub(crate) fn encode(
        origin: u64,
        exclude: u64,
        event: &str,
        payload: Option<&Payload>,
        position: Option<&StreamPosition>,
    ) -> Bytes {
        let body = payload.map(|p| p.bytes().as_ref()).unwrap_or_default();
        let epoch = position.map_or("", |p| &p.epoch[..p.epoch.len().min(255)]);
        let mut out = BytesMut::with_capacity(29 + epoch.len() + event.len() + body.len());
        out.put_u8(VERSION);
        out.put_u64(origin);
        out.put_u64(exclude);
        match position {
            Some(p) if p.offset > 0 => {
                out.put_u64(p.offset);
                // Epochs are short ids; a longer one is cut, which only makes
                // receivers treat the event as another epoch's.
                out.put_u8(epoch.len() as u8);
                out.put_slice(epoch.as_bytes());
            }
            _ => out.put_u64(0),
        }
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
        if bytes.len() < 28 || bytes.get_u8() != VERSION {
            return None;
        }
        let origin = bytes.get_u64();
        let exclude = bytes.get_u64();
        let offset = bytes.get_u64();
        let position = if offset == 0 {
            None
        } else {
            let len = usize::from(bytes.get_u8());
            if bytes.len() < len + 3 {
                return None;
            }
            let epoch = std::str::from_utf8(&bytes.split_to(len)).ok()?.to_owned();
            Some(StreamPosition { offset, epoch: Arc::from(epoch) })
        };
        if bytes.len() < 3 {
            return None;
        }
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
        Some(RoomMessage { origin, exclude, position, event, payload })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_garbage() {
        let p = Payload::encode(Format::Json, &serde_json::json!({"x": 1})).unwrap();
        let b = RoomMessage::encode(7, 9, "msg", Some(&p), None);
        let m = RoomMessage::decode(b.clone()).unwrap();
        assert_eq!((m.origin, m.exclude, m.event.as_str()), (7, 9, "msg"));
        assert_eq!(m.payload.unwrap(), p);
        assert!(RoomMessage::decode(b.slice(..10)).is_none());
        assert!(RoomMessage::decode(Bytes::from_static(b"garbage garbage garbage")).is_none());
        let none = RoomMessage::decode(RoomMessage::encode(1, 0, "e", None, None)).unwrap();
        assert!(none.payload.is_none() && none.position.is_none());
        let pos = StreamPosition { offset: 42, epoch: Arc::from("ep0ch") };
        let m = RoomMessage::decode(RoomMessage::encode(1, 0, "e", Some(&p), Some(&pos))).unwrap();
        assert_eq!((m.position, m.payload), (Some(pos), Some(p)));
        for cut in 0..30 {
            let b = RoomMessage::encode(1, 0, "e", None, Some(&StreamPosition { offset: 1, epoch: Arc::from("x") }));
            let _ = RoomMessage::decode(b.slice(..cut.min(b.len())));
        }
    }
}
