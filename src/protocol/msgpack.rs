//! MessagePack envelope codec.
//!
//! An envelope is a map with string keys (the same names as in JSON). The
//! decoder is a small hand-written reader: it walks the map once, reads the
//! scalar fields, and for `data` only measures the value (with a depth limit,
//! so a deeply nested payload cannot exhaust the stack) and keeps it as a
//! zero-copy slice of the frame.

use super::{json::truncate, Envelope, Format, Kind, Parts, Payload, ProtocolError, MAX_DEPTH};
use bytes::Bytes;

fn malformed(what: &str) -> ProtocolError {
    ProtocolError::Malformed(format!("msgpack: {what}"))
}

fn take<'a>(buf: &mut &'a [u8], n: usize) -> Result<&'a [u8], ProtocolError> {
    if buf.len() < n {
        return Err(malformed("unexpected end of input"));
    }
    let (head, rest) = buf.split_at(n);
    *buf = rest;
    Ok(head)
}

fn be(buf: &mut &[u8], n: usize) -> Result<u64, ProtocolError> {
    Ok(take(buf, n)?.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b)))
}

fn byte(buf: &mut &[u8]) -> Result<u8, ProtocolError> {
    Ok(take(buf, 1)?[0])
}

fn len_usize(v: u64) -> Result<usize, ProtocolError> {
    usize::try_from(v).map_err(|_| malformed("length too large"))
}

/// Skips one complete value, refusing nesting deeper than [`MAX_DEPTH`].
pub(super) fn skip_value(buf: &mut &[u8], depth: usize) -> Result<(), ProtocolError> {
    skip_value_max(buf, depth, MAX_DEPTH)
}

/// [`skip_value`] with another depth bound.
pub(super) fn skip_value_max(buf: &mut &[u8], depth: usize, max: usize) -> Result<(), ProtocolError> {
    if depth > max {
        return Err(ProtocolError::Malformed(format!("nesting deeper than {max}")));
    }
    let m = byte(buf)?;
    let (items, skip): (u64, u64) = match m {
        0x00..=0x7f | 0xe0..=0xff | 0xc0 | 0xc2 | 0xc3 => (0, 0),
        0x80..=0x8f => (2 * u64::from(m & 0x0f), 0),
        0x90..=0x9f => (u64::from(m & 0x0f), 0),
        0xa0..=0xbf => (0, u64::from(m & 0x1f)),
        0xc1 => return Err(malformed("reserved marker 0xc1")),
        0xc4 | 0xd9 => (0, be(buf, 1)?),
        0xc5 | 0xda => (0, be(buf, 2)?),
        0xc6 | 0xdb => (0, be(buf, 4)?),
        0xc7 => (0, be(buf, 1)? + 1),
        0xc8 => (0, be(buf, 2)? + 1),
        0xc9 => (0, be(buf, 4)? + 1),
        0xca => (0, 4),
        0xcb => (0, 8),
        0xcc | 0xd0 => (0, 1),
        0xcd | 0xd1 => (0, 2),
        0xce | 0xd2 => (0, 4),
        0xcf | 0xd3 => (0, 8),
        0xd4 => (0, 2),
        0xd5 => (0, 3),
        0xd6 => (0, 5),
        0xd7 => (0, 9),
        0xd8 => (0, 17),
        0xdc => (be(buf, 2)?, 0),
        0xdd => (be(buf, 4)?, 0),
        0xde => (2 * be(buf, 2)?, 0),
        0xdf => (2 * be(buf, 4)?, 0),
    };
    take(buf, len_usize(skip)?)?;
    // Every item is at least one byte, so a huge declared count on a short
    // buffer fails fast at the end of input.
    for _ in 0..items {
        skip_value_max(buf, depth + 1, max)?;
    }
    Ok(())
}

fn read_str<'a>(buf: &mut &'a [u8]) -> Result<Option<&'a str>, ProtocolError> {
    let m = byte(buf)?;
    let len = match m {
        0xc0 => return Ok(None),
        0xa0..=0xbf => u64::from(m & 0x1f),
        0xd9 => be(buf, 1)?,
        0xda => be(buf, 2)?,
        0xdb => be(buf, 4)?,
        _ => return Err(ProtocolError::Invalid("msgpack: expected a string".into())),
    };
    let raw = take(buf, len_usize(len)?)?;
    std::str::from_utf8(raw).map(Some).map_err(|_| malformed("string is not UTF-8"))
}

fn read_uint(buf: &mut &[u8]) -> Result<Option<u64>, ProtocolError> {
    let m = byte(buf)?;
    let v = match m {
        0xc0 => return Ok(None),
        0x00..=0x7f => u64::from(m),
        0xcc => be(buf, 1)?,
        0xcd => be(buf, 2)?,
        0xce => be(buf, 4)?,
        0xcf => be(buf, 8)?,
        // Signed encodings of non-negative numbers are accepted too.
        0xd0..=0xd3 => {
            let n = 1usize << (m - 0xd0);
            let raw = be(buf, n)?;
            let shift = 64 - 8 * n as u32;
            let signed = ((raw << shift) as i64) >> shift;
            u64::try_from(signed).map_err(|_| ProtocolError::Invalid("msgpack: negative number".into()))?
        }
        _ => return Err(ProtocolError::Invalid("msgpack: expected an unsigned integer".into())),
    };
    Ok(Some(v))
}

pub(super) fn decode(bytes: &Bytes) -> Result<Envelope, ProtocolError> {
    let mut buf: &[u8] = bytes;
    let m = byte(&mut buf)?;
    let len = match m {
        0x80..=0x8f => u64::from(m & 0x0f),
        0xde => be(&mut buf, 2)?,
        0xdf => be(&mut buf, 4)?,
        _ => return Err(ProtocolError::Invalid("msgpack: envelope must be a map".into())),
    };
    let mut env = Envelope::new(Kind::Ping);
    let mut kind: Option<Kind> = None;
    // Known keys seen so far: a duplicate is refused, as JSON refuses it.
    let mut seen = 0u16;
    for _ in 0..len {
        let key = read_str(&mut buf)?.ok_or_else(|| ProtocolError::Invalid("msgpack: nil key".into()))?;
        if let Some(bit) = KEYS.iter().position(|k| *k == key) {
            if seen & (1 << bit) != 0 {
                return Err(ProtocolError::Invalid(format!("duplicate field `{key}`")));
            }
            seen |= 1 << bit;
        }
        match key {
            "type" => {
                let name = read_str(&mut buf)?.ok_or_else(|| ProtocolError::Invalid("`type` is nil".into()))?;
                kind = Some(Kind::parse(name).ok_or_else(|| ProtocolError::UnknownType(truncate(name)))?);
            }
            "ref" => env.reference = read_uint(&mut buf)?,
            "room" => env.room = read_str(&mut buf)?.map(str::to_owned),
            "event" => env.event = read_str(&mut buf)?.map(str::to_owned),
            "message" => env.message = read_str(&mut buf)?.map(str::to_owned),
            "code" => {
                env.code = read_uint(&mut buf)?
                    .map(|c| u32::try_from(c).map_err(|_| ProtocolError::Invalid("`code` out of range".into())))
                    .transpose()?
            }
            "offset" => env.offset = read_uint(&mut buf)?,
            "epoch" => env.epoch = read_str(&mut buf)?.map(str::to_owned),
            "rewind" => env.rewind = read_uint(&mut buf)?,
            "data" => {
                let before = buf;
                skip_value(&mut buf, 1)?;
                let start = before.as_ptr() as usize - bytes.as_ptr() as usize;
                let end = start + (before.len() - buf.len());
                if before[0] != 0xc0 {
                    env.data = Some(Payload { format: Format::MsgPack, bytes: bytes.slice(start..end) });
                }
            }
            _ => skip_value(&mut buf, 1)?,
        }
    }
    if !buf.is_empty() {
        return Err(malformed("trailing bytes after envelope"));
    }
    env.kind = kind.ok_or_else(|| ProtocolError::Invalid("missing field `type`".into()))?;
    Ok(env)
}

const KEYS: [&str; 10] = ["type", "ref", "room", "event", "code", "message", "data", "offset", "epoch", "rewind"];

/// The `ref` of a MessagePack envelope that failed to decode: the first `ref`
/// key, when the map is readable up to it and its value is an unsigned
/// integer. What follows it does not matter (the JSON reader follows the
/// same rule, `docs/protocol.md` §2).
pub(super) fn reference_of(bytes: &[u8]) -> Option<u64> {
    let mut buf = bytes;
    let len = match byte(&mut buf).ok()? {
        m @ 0x80..=0x8f => u64::from(m & 0x0f),
        0xde => be(&mut buf, 2).ok()?,
        0xdf => be(&mut buf, 4).ok()?,
        _ => return None,
    };
    for _ in 0..len {
        let key = read_str(&mut buf).ok()??;
        if key == "ref" {
            return read_uint(&mut buf).ok()?;
        }
        skip_value(&mut buf, 1).ok()?;
    }
    None
}

pub(super) fn encode(p: &Parts<'_>) -> Bytes {
    let mut out = Vec::with_capacity(32 + p.data.map_or(0, <[u8]>::len));
    let fields = 1
        + usize::from(p.reference.is_some())
        + usize::from(p.room.is_some())
        + usize::from(p.event.is_some())
        + usize::from(p.code.is_some())
        + usize::from(p.message.is_some())
        + usize::from(p.data.is_some())
        + usize::from(p.offset.is_some())
        + usize::from(p.epoch.is_some())
        + usize::from(p.rewind.is_some());
    // Writes into a Vec cannot fail; the results are ignored on purpose.
    let _ = rmp::encode::write_map_len(&mut out, fields as u32);
    let _ = rmp::encode::write_str(&mut out, "type");
    let _ = rmp::encode::write_str(&mut out, p.kind.as_str());
    if let Some(r) = p.reference {
        let _ = rmp::encode::write_str(&mut out, "ref");
        let _ = rmp::encode::write_uint(&mut out, r);
    }
    for (name, value) in [("room", p.room), ("event", p.event)] {
        if let Some(v) = value {
            let _ = rmp::encode::write_str(&mut out, name);
            let _ = rmp::encode::write_str(&mut out, v);
        }
    }
    if let Some(c) = p.code {
        let _ = rmp::encode::write_str(&mut out, "code");
        let _ = rmp::encode::write_uint(&mut out, u64::from(c));
    }
    if let Some(m) = p.message {
        let _ = rmp::encode::write_str(&mut out, "message");
        let _ = rmp::encode::write_str(&mut out, m);
    }
    for (name, value) in [("offset", p.offset), ("rewind", p.rewind)] {
        if let Some(v) = value {
            let _ = rmp::encode::write_str(&mut out, name);
            let _ = rmp::encode::write_uint(&mut out, v);
        }
    }
    if let Some(e) = p.epoch {
        let _ = rmp::encode::write_str(&mut out, "epoch");
        let _ = rmp::encode::write_str(&mut out, e);
    }
    if let Some(d) = p.data {
        let _ = rmp::encode::write_str(&mut out, "data");
        out.extend_from_slice(d);
    }
    Bytes::from(out)
}

/// Whether a MessagePack document is an array: a
/// [`Version::V2`](super::Version::V2) compact `event`.
pub(super) fn is_array(bytes: &[u8]) -> bool {
    matches!(bytes.first(), Some(0x90..=0x9f | 0xdc | 0xdd))
}

/// Decodes a compact `event` array: `[room, event, data]` or
/// `[room, event, data, offset]` (`docs/protocol.md` §13).
pub(super) fn decode_event_array(bytes: &Bytes) -> Result<Envelope, ProtocolError> {
    let mut buf: &[u8] = bytes;
    let len = match byte(&mut buf)? {
        m @ 0x90..=0x9f => u64::from(m & 0x0f),
        0xdc => be(&mut buf, 2)?,
        0xdd => be(&mut buf, 4)?,
        _ => return Err(ProtocolError::Invalid("msgpack: expected an array".into())),
    };
    if !(3..=4).contains(&len) {
        return Err(ProtocolError::Invalid(format!("msgpack: an event array has 3 or 4 items, not {len}")));
    }
    let mut env = Envelope::new(Kind::Event);
    env.room = read_str(&mut buf)?.map(str::to_owned);
    env.event = Some(
        read_str(&mut buf)?.ok_or_else(|| ProtocolError::Invalid("msgpack: event name is nil".into()))?.to_owned(),
    );
    let before = buf;
    skip_value(&mut buf, 1)?;
    let start = before.as_ptr() as usize - bytes.as_ptr() as usize;
    let end = start + (before.len() - buf.len());
    env.data = Some(Payload { format: Format::MsgPack, bytes: bytes.slice(start..end) });
    if len == 4 {
        env.offset = read_uint(&mut buf)?;
    }
    if !buf.is_empty() {
        return Err(malformed("trailing bytes after envelope"));
    }
    Ok(env)
}

/// Encodes a compact `event` array; `data` absent is nil.
pub(super) fn encode_event_array(room: Option<&str>, event: &str, data: Option<&[u8]>, offset: Option<u64>) -> Bytes {
    let data = data.unwrap_or(&[0xc0]);
    let mut out = Vec::with_capacity(16 + room.map_or(1, str::len) + event.len() + data.len());
    // Writes into a Vec cannot fail; the results are ignored on purpose.
    let _ = rmp::encode::write_array_len(&mut out, if offset.is_some() { 4 } else { 3 });
    match room {
        Some(r) => {
            let _ = rmp::encode::write_str(&mut out, r);
        }
        None => {
            let _ = rmp::encode::write_nil(&mut out);
        }
    }
    let _ = rmp::encode::write_str(&mut out, event);
    out.extend_from_slice(data);
    if let Some(o) = offset {
        let _ = rmp::encode::write_uint(&mut out, o);
    }
    Bytes::from(out)
}
