//! The `id:` of SSE events: every recoverable room's position in one string,
//! so the browser's `Last-Event-ID` on reconnect rejoins each room where the
//! stream left it.
//!
//! A browser keeps only the **last** id it saw, so an id must describe the
//! whole stream, not one event. Format (ASCII; `docs/sse.md` §5):
//!
//! ```text
//! s1.<fingerprint>[.<index>:<offset>:<epoch>]...
//! ```
//!
//! - `fingerprint`: 8 lowercase hex digits, the FNV-1a (32-bit) hash of the
//!   stream's room list (room names joined by `\n`, in the order the stream
//!   joins them). A reconnect to another room list does not match and gets
//!   `$resync` instead of a wrong recovery.
//! - one entry per room whose position is known: its `index` in that list,
//!   the last `offset` delivered, and the stream `epoch`, with every byte
//!   outside `A–Z a–z 0–9 _ -` written as `~` and two hex digits.
//!
//! The id [`STOP`] marks a stream the server ended for good: a reconnect
//! that sends it is answered `204 No Content`, which makes browsers stop.

/// The id of a terminal `$close` (written by the SSE transport): a
/// reconnect carrying it gets 204.
pub(crate) use crate::transport::event_stream::STOP_ID as STOP;

/// FNV-1a over the room list.
pub(crate) fn fingerprint<S: AsRef<str>>(rooms: &[S]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for (i, r) in rooms.iter().enumerate() {
        if i > 0 {
            h = (h ^ u32::from(b'\n')).wrapping_mul(0x0100_0193);
        }
        for &b in r.as_ref().as_bytes() {
            h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
        }
    }
    h
}

/// A room's last delivered position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Position {
    pub(crate) offset: u64,
    pub(crate) epoch: String,
}

/// Encodes the positions of a stream (`None`: not known yet).
pub(crate) fn encode(fingerprint: u32, positions: &[Option<Position>]) -> String {
    use std::fmt::Write;
    let mut out = format!("s1.{fingerprint:08x}");
    for (i, p) in positions.iter().enumerate() {
        if let Some(p) = p {
            let _ = write!(out, ".{i}:{}:", p.offset);
            for b in p.epoch.bytes() {
                if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
                    out.push(char::from(b));
                } else {
                    let _ = write!(out, "~{b:02x}");
                }
            }
        }
    }
    out
}

/// What a `Last-Event-ID` says.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum LastId {
    /// The stream was ended for good ([`STOP`]).
    Stop,
    /// Positions by room index, for a stream whose room list has this
    /// fingerprint.
    Positions { fingerprint: u32, positions: Vec<(usize, Position)> },
}

/// Decodes a `Last-Event-ID`; `None` when it is not one of ours (or
/// malformed). At most `max_rooms` entries are accepted.
pub(crate) fn decode(id: &str, max_rooms: usize) -> Option<LastId> {
    if id == STOP {
        return Some(LastId::Stop);
    }
    let mut parts = id.split('.');
    if parts.next()? != "s1" {
        return None;
    }
    let fp = parts.next()?;
    if fp.len() != 8 {
        return None;
    }
    let fingerprint = u32::from_str_radix(fp, 16).ok()?;
    let mut positions = Vec::new();
    for entry in parts {
        if positions.len() >= max_rooms {
            return None;
        }
        let mut f = entry.split(':');
        let (i, offset, epoch) = (f.next()?, f.next()?, f.next()?);
        if f.next().is_some() {
            return None;
        }
        let index: usize = i.parse().ok()?;
        let offset: u64 = offset.parse().ok()?;
        positions.push((index, Position { offset, epoch: unescape(epoch)? }));
    }
    Some(LastId::Positions { fingerprint, positions })
}

fn unescape(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'~' => {
                let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
                if !hex.bytes().all(|c| c.is_ascii_hexdigit()) {
                    return None;
                }
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            c if c.is_ascii_alphanumeric() || c == b'_' || c == b'-' => {
                out.push(c);
                i += 1;
            }
            _ => return None,
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let fp = fingerprint(&["a", "b/c", "d"]);
        assert_ne!(fp, fingerprint(&["a", "b", "c/d"]), "order and boundaries count");
        let p = |offset, epoch: &str| Some(Position { offset, epoch: epoch.into() });
        let positions = vec![p(12, "0123abcd"), None, p(0, "weird.epoch:~é")];
        let id = encode(fp, &positions);
        assert!(id.is_ascii() && !id.contains(['\n', '\r', ' ']), "{id}");
        let Some(LastId::Positions { fingerprint: f, positions: got }) = decode(&id, 128) else { panic!("{id}") };
        assert_eq!(f, fp);
        assert_eq!(got, vec![(0, positions[0].clone().unwrap()), (2, positions[2].clone().unwrap())]);
        assert_eq!(decode(STOP, 128), Some(LastId::Stop));
        assert_eq!(decode(&encode(fp, &[]), 128), Some(LastId::Positions { fingerprint: fp, positions: vec![] }));
    }

    #[test]
    fn garbage_is_refused() {
        for bad in [
            "",
            "s1",
            "s2.00000000",
            "s1.zzzzzzzz",
            "s1.0000000",
            "s1.00000000.1:2",
            "s1.00000000.x:1:e",
            "s1.00000000.1:1:e~zz",
            "s1.00000000.1:1:a b",
            "s1.00000000.1:-1:e",
            "s1.00000000.1:1:e:f",
        ] {
            assert_eq!(decode(bad, 128), None, "{bad}");
        }
        let many = format!("s1.00000000{}", ".0:1:e".repeat(3));
        assert_eq!(decode(&many, 2), None, "entry bound");
    }
}
