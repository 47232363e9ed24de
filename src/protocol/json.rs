//! JSON envelope codec. Decoding borrows from the frame: the `data` field is
//! located with serde_json's `RawValue` and kept as a zero-copy slice of the
//! frame's `Bytes`.

use super::{Envelope, Format, Kind, Parts, Payload, ProtocolError, MAX_DEPTH};
use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::io::Write;

#[derive(Deserialize)]
struct Wire<'a> {
    #[serde(rename = "type", borrow, default)]
    kind: Option<Cow<'a, str>>,
    #[serde(rename = "ref", default)]
    reference: Option<u64>,
    #[serde(borrow, default)]
    room: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    event: Option<Cow<'a, str>>,
    #[serde(default)]
    code: Option<u32>,
    #[serde(borrow, default)]
    message: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
    #[serde(default)]
    offset: Option<u64>,
    #[serde(borrow, default)]
    epoch: Option<Cow<'a, str>>,
    #[serde(default)]
    rewind: Option<u64>,
}

pub(super) fn decode(bytes: &Bytes) -> Result<Envelope, ProtocolError> {
    let wire: Wire<'_> = serde_json::from_slice(bytes).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => ProtocolError::Invalid(e.to_string()),
        _ => ProtocolError::Malformed(e.to_string()),
    })?;
    let kind_name = wire.kind.ok_or_else(|| ProtocolError::Invalid("missing field `type`".into()))?;
    let kind = Kind::parse(&kind_name).ok_or_else(|| ProtocolError::UnknownType(truncate(&kind_name)))?;
    if let Some(raw) = wire.data {
        check_depth(raw.get().as_bytes())?;
    }
    let data = wire.data.map(|raw| {
        // The RawValue borrows from `bytes`: slice the same allocation
        // instead of copying the payload.
        let text = raw.get();
        let start = text.as_ptr() as usize - bytes.as_ptr() as usize;
        Payload { format: Format::Json, bytes: bytes.slice(start..start + text.len()) }
    });
    Ok(Envelope {
        kind,
        reference: wire.reference,
        room: wire.room.map(Cow::into_owned),
        event: wire.event.map(Cow::into_owned),
        code: wire.code,
        message: wire.message.map(Cow::into_owned),
        data,
        offset: wire.offset,
        epoch: wire.epoch.map(Cow::into_owned),
        rewind: wire.rewind,
    })
}

/// Refuses `data` nested deeper than [`MAX_DEPTH`] (serde_json skips a raw
/// value without a depth limit, so the envelope decoder checks it: a handler
/// that later deserializes the payload recursively must not blow the stack).
/// One pass over the bytes, tracking strings so brackets inside them do not
/// count.
fn check_depth(json: &[u8]) -> Result<(), ProtocolError> {
    check_depth_max(json, MAX_DEPTH)
}

/// [`check_depth`] with another bound.
pub(super) fn check_depth_max(json: &[u8], max: usize) -> Result<(), ProtocolError> {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for &b in json {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return Err(ProtocolError::Malformed(format!("nesting deeper than {max}")));
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

/// The `ref` of a JSON envelope that failed to decode: the first `ref` key,
/// when the object is readable up to it and its value is an unsigned
/// integer. What follows it (more keys, a second `ref`, a cut-off, trailing
/// data) does not matter: the MessagePack reader follows the same rule
/// (`docs/protocol.md` §2).
pub(super) fn reference_of(bytes: &[u8]) -> Option<u64> {
    use serde::de::{Error as _, IgnoredAny, MapAccess, Visitor};
    struct FirstRef<'a>(&'a mut Option<u64>);
    impl<'de> Visitor<'de> for FirstRef<'_> {
        type Value = ();
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("an object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
            while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                if key == "ref" {
                    *self.0 = map.next_value::<serde_json::Value>()?.as_u64();
                    // Stop reading here: the rest may be what is broken.
                    return Err(A::Error::custom("found `ref`"));
                }
                map.next_value::<IgnoredAny>()?;
            }
            Ok(())
        }
    }
    let mut found = None;
    let mut de = serde_json::Deserializer::from_slice(bytes);
    // Always an error once `ref` is found (the visitor stops early): the
    // answer is what the visitor saw, not the result.
    let _ = serde::Deserializer::deserialize_map(&mut de, FirstRef(&mut found));
    found
}

/// Keeps error messages that echo client input short.
pub(crate) fn truncate(s: &str) -> String {
    const MAX: usize = 64;
    if s.len() <= MAX {
        return s.to_owned();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

pub(super) fn encode(p: &Parts<'_>) -> Bytes {
    let mut out = Vec::with_capacity(48 + p.data.map_or(0, <[u8]>::len));
    out.extend_from_slice(b"{\"type\":\"");
    out.extend_from_slice(p.kind.as_str().as_bytes());
    out.push(b'"');
    if let Some(r) = p.reference {
        // Writing into a Vec cannot fail.
        let _ = write!(out, ",\"ref\":{r}");
    }
    string_field(&mut out, "room", p.room);
    string_field(&mut out, "event", p.event);
    if let Some(c) = p.code {
        let _ = write!(out, ",\"code\":{c}");
    }
    string_field(&mut out, "message", p.message);
    if let Some(o) = p.offset {
        let _ = write!(out, ",\"offset\":{o}");
    }
    string_field(&mut out, "epoch", p.epoch);
    if let Some(n) = p.rewind {
        let _ = write!(out, ",\"rewind\":{n}");
    }
    if let Some(d) = p.data {
        out.extend_from_slice(b",\"data\":");
        out.extend_from_slice(d);
    }
    out.push(b'}');
    Bytes::from(out)
}

fn string_field(out: &mut Vec<u8>, name: &str, value: Option<&str>) {
    if let Some(v) = value {
        out.extend_from_slice(b",\"");
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b"\":");
        // Serializing a str into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *out, v);
    }
}

/// Whether a JSON document is an array (its first non-blank byte is `[`):
/// a [`Version::V2`](super::Version::V2) compact `event`.
pub(super) fn is_array(bytes: &[u8]) -> bool {
    bytes.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[')
}

/// A compact `event`: `[room, event, data]` or `[room, event, data, offset]`.
#[derive(Deserialize)]
struct EventArray<'a>(
    #[serde(borrow)] Option<Cow<'a, str>>,
    #[serde(borrow)] Cow<'a, str>,
    #[serde(borrow)] &'a RawValue,
    #[serde(default)] Option<u64>,
);

/// Decodes a compact `event` array (`docs/protocol.md` §13).
pub(super) fn decode_event_array(bytes: &Bytes) -> Result<Envelope, ProtocolError> {
    let EventArray(room, event, raw, offset) = serde_json::from_slice(bytes).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => ProtocolError::Invalid(e.to_string()),
        _ => ProtocolError::Malformed(e.to_string()),
    })?;
    check_depth(raw.get().as_bytes())?;
    let text = raw.get();
    let start = text.as_ptr() as usize - bytes.as_ptr() as usize;
    let data = Payload { format: Format::Json, bytes: bytes.slice(start..start + text.len()) };
    Ok(Envelope {
        room: room.map(Cow::into_owned),
        event: Some(event.into_owned()),
        data: Some(data),
        offset,
        ..Envelope::new(Kind::Event)
    })
}

/// Encodes a compact `event` array; `data` absent is `null`.
pub(super) fn encode_event_array(room: Option<&str>, event: &str, data: Option<&[u8]>, offset: Option<u64>) -> Bytes {
    let data = data.unwrap_or(b"null");
    let mut out = Vec::with_capacity(16 + room.map_or(4, str::len) + event.len() + data.len());
    out.push(b'[');
    // Serializing a str into a Vec cannot fail.
    match room {
        Some(r) => {
            let _ = serde_json::to_writer(&mut out, r);
        }
        None => out.extend_from_slice(b"null"),
    }
    out.push(b',');
    let _ = serde_json::to_writer(&mut out, event);
    out.push(b',');
    out.extend_from_slice(data);
    if let Some(o) = offset {
        let _ = write!(out, ",{o}");
    }
    out.push(b']');
    Bytes::from(out)
}
