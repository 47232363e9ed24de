//! permessage-deflate (RFC 7692): the negotiation, and compressing and
//! inflating one message.
//!
//! switchboard always agrees **no context takeover in both directions**:
//! every message is compressed on its own (`server_no_context_takeover`, so
//! one compressed frame can be shared by every member of a room) and the
//! client is asked to do the same (`client_no_context_takeover`, which a
//! server may add to any accepted offer, RFC 7692 §7.1.1.1). So a
//! connection keeps no deflate state between messages: the compressor and
//! the inflater are per thread, reset before each message, and an idle
//! connection costs not one byte more with the extension negotiated.
//!
//! The deflate itself is `flate2` on `miniz_oxide` (pure Rust). It cannot
//! bound its LZ77 window below 32 KiB, so an offer with
//! `server_max_window_bits` under 15 is declined (the next offer, or no
//! compression); `client_max_window_bits` needs nothing from the server (the
//! inflater takes any window).

use bytes::{BufMut, Bytes, BytesMut};
use flate2::{Compress, Decompress, FlushCompress, FlushDecompress, Status};
use std::cell::RefCell;

/// Outbound compression on WebSocket connections
/// ([`WsConfig::compression`](super::WsConfig::compression)).
///
/// Any setting but [`Compression::Off`] accepts a client's
/// `permessage-deflate` offer; inbound compressed messages are then always
/// inflated, and outbound ones are compressed as this says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Compression {
    /// The extension is not negotiated: no frame is compressed either way.
    Off,
    /// Every outbound data message is compressed (unless compressing it
    /// does not make it smaller).
    On,
    /// Outbound data messages of at least this many bytes (the encoded
    /// envelope) are compressed; smaller ones go uncompressed (RSV1 clear).
    Above(usize),
}

impl Compression {
    /// The smallest message compressed, when the extension is offered.
    pub(crate) fn threshold(self) -> Option<usize> {
        match self {
            Compression::Off => None,
            Compression::On => Some(0),
            Compression::Above(n) => Some(n),
        }
    }
}

/// The extension as agreed with one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Deflate {
    /// Outbound messages of at least this many bytes are compressed.
    pub(crate) threshold: usize,
}

/// The `Sec-WebSocket-Extensions` response header of an accepted offer.
pub(crate) const RESPONSE: &str = "permessage-deflate; server_no_context_takeover; client_no_context_takeover";

/// The compression level: measured in docs/performance.md (chat lines and
/// 4 KiB samples shrink nearly as much at 1 as at 6, for far less CPU).
const LEVEL: u32 = 1;

/// Picks the first `permessage-deflate` offer of the
/// `Sec-WebSocket-Extensions` headers that we can honour (see the module
/// docs); `None` when compression is off or no offer fits. A malformed
/// offer is skipped, never an error: the connection then runs without
/// compression.
pub(crate) fn negotiate<'a>(offers: impl Iterator<Item = &'a str>, compression: Compression) -> Option<Deflate> {
    let threshold = compression.threshold()?;
    offers.flat_map(|v| v.split(',')).find(|offer| acceptable(offer)).map(|_| Deflate { threshold })
}

/// Whether one extension offer is a `permessage-deflate` we can accept.
fn acceptable(offer: &str) -> bool {
    let mut parts = offer.split(';').map(str::trim);
    if !parts.next().is_some_and(|name| name.eq_ignore_ascii_case("permessage-deflate")) {
        return false;
    }
    let mut seen = [false; 4];
    for param in parts {
        let (name, value) = match param.split_once('=') {
            Some((n, v)) => (n.trim(), Some(v.trim().trim_matches('"'))),
            None => (param, None),
        };
        let i = match name.to_ascii_lowercase().as_str() {
            "server_no_context_takeover" if value.is_none() => 0,
            "client_no_context_takeover" if value.is_none() => 1,
            // We cannot keep a smaller window: decline.
            "server_max_window_bits" if window_bits(value) == Some(15) => 2,
            "client_max_window_bits" if value.is_none() || window_bits(value).is_some() => 3,
            _ => return false,
        };
        // A parameter given twice makes the offer invalid (§7.1).
        if std::mem::replace(&mut seen[i], true) {
            return false;
        }
    }
    true
}

/// A window size parameter's value: 8 to 15, digits only.
fn window_bits(value: Option<&str>) -> Option<u8> {
    let v = value?;
    if v.is_empty() || v.len() > 2 || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    v.parse().ok().filter(|b| (8..=15).contains(b))
}

/// The tail every compressed message ends with before it is sent, stripped
/// by the sender and put back by the receiver (RFC 7692 §7.2.1–2).
const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

thread_local! {
    static COMPRESS: RefCell<Compress> = RefCell::new(Compress::new(flate2::Compression::new(LEVEL), false));
    static INFLATE: RefCell<Decompress> = RefCell::new(Decompress::new(false));
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// `payload` compressed on its own (no context kept), without the tail:
/// a message's payload for a frame with RSV1 set (a client masks it);
/// `None` when compressing does not make it smaller.
#[cfg(feature = "client")]
pub(crate) fn compress_body(payload: &[u8]) -> Option<Vec<u8>> {
    with_compressed(payload, <[u8]>::to_vec)
}

/// Compresses `payload` into the per-thread scratch buffer and hands `f`
/// the body (without the tail) when it is smaller than `payload`.
fn with_compressed<R>(payload: &[u8], f: impl FnOnce(&[u8]) -> R) -> Option<R> {
    SCRATCH.with_borrow_mut(|out| {
        out.clear();
        COMPRESS.with_borrow_mut(|c| compress(c, payload, out));
        let body = out.strip_suffix(&TAIL).unwrap_or(out);
        let r = (body.len() < payload.len()).then(|| f(body));
        // The scratch buffer grows with the largest message; keep it small.
        if out.capacity() > 64 * 1024 {
            *out = Vec::new();
        }
        r
    })
}

/// `payload` as one final data frame with RSV1 set, compressed on its own
/// (no context kept), for the wire; `None` when compressing does not make
/// it smaller (it is then sent as it is).
pub(crate) fn compressed_frame(opcode: u8, payload: &[u8]) -> Option<Bytes> {
    with_compressed(payload, |body| {
        let (mut head, n) = crate::transport::ws_header(opcode, body.len());
        head[0] |= 0x40; // RSV1: compressed
        let mut frame = BytesMut::with_capacity(usize::from(n) + body.len());
        frame.put_slice(&head[..usize::from(n)]);
        frame.put_slice(body);
        frame.freeze()
    })
}

/// Deflates `input` into `out` with a sync flush (the output ends with
/// [`TAIL`]), from a reset state.
///
/// The input goes in without a flush, the output growing whenever it is
/// full; then the sync flush is asked for alone, again until it fits.
/// (Asking for the flush with input the output had no room for lost data
/// in miniz_oxide: the bytes of the first, full call's tail never came
/// out; Autobahn 12.2.9 and 12.5.9 found it.)
fn compress(c: &mut Compress, input: &[u8], out: &mut Vec<u8>) {
    c.reset();
    // Room for incompressible input in one go (stored blocks cost 5 bytes
    // per 64 KiB), so the loops below run once in the usual case.
    out.reserve(input.len() + input.len() / 64 + 64);
    loop {
        let read = usize::try_from(c.total_in()).expect("fits");
        if read == input.len() {
            break;
        }
        let before = out.len();
        // Only fails on a misuse of the stream (none here).
        let _ = c.compress_vec(&input[read..], out, FlushCompress::None);
        let stuck = out.len() == before && usize::try_from(c.total_in()).expect("fits") == read;
        if out.len() == out.capacity() || stuck {
            out.reserve(out.capacity().max(64));
        }
    }
    loop {
        let _ = c.compress_vec(&[], out, FlushCompress::Sync);
        // A sync flush with room to spare has written everything.
        if out.len() < out.capacity() {
            return;
        }
        out.reserve(out.capacity().max(64));
    }
}

/// Why a compressed message could not be inflated.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum InflateError {
    /// It inflates to more than the limit (close 1009).
    TooBig,
    /// It is not a valid deflate stream (close 1007).
    Corrupt,
}

/// Inflates one message from its compressed `parts` (the payloads of its
/// frames, in order), allocating at most `max + 1` bytes of output: a
/// message that inflates to more than `max` bytes is refused as soon as
/// that is known, however far it would have gone.
pub(crate) fn inflate(parts: &[&[u8]], max: usize) -> Result<Vec<u8>, InflateError> {
    INFLATE.with_borrow_mut(|d| {
        d.reset(false);
        let compressed: usize = parts.iter().map(|p| p.len()).sum();
        // A first guess at the size (deflate shrinks text 3 to 10 times),
        // grown by doubling up to the limit.
        let mut out = Vec::with_capacity(compressed.saturating_mul(4).clamp(64, max.saturating_add(1)));
        for part in parts.iter().copied().chain(std::iter::once(&TAIL[..])) {
            let start = d.total_in();
            loop {
                let read = usize::try_from(d.total_in() - start).expect("fits");
                let status = d
                    .decompress_vec(&part[read..], &mut out, FlushDecompress::Sync)
                    .map_err(|_| InflateError::Corrupt)?;
                if out.len() > max {
                    return Err(InflateError::TooBig);
                }
                if status == Status::StreamEnd {
                    // A final block: anything after it is not deflate.
                    return Ok(out);
                }
                let consumed = usize::try_from(d.total_in() - start).expect("fits") == part.len();
                if out.len() < out.capacity() {
                    if consumed {
                        break;
                    }
                    if status == Status::BufError {
                        return Err(InflateError::Corrupt);
                    }
                    continue;
                }
                // The output is full: grow it, one byte past the limit at most.
                let room = out.capacity().min(max.saturating_add(1) - out.len());
                if room == 0 {
                    return Err(InflateError::TooBig);
                }
                out.reserve_exact(room);
            }
        }
        Ok(out)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offer(s: &str) -> Option<Deflate> {
        negotiate(std::iter::once(s), Compression::On)
    }

    #[test]
    fn offers() {
        assert!(offer("permessage-deflate").is_some());
        assert!(offer("permessage-deflate; client_max_window_bits").is_some());
        assert!(offer("x-webkit-deflate-frame, permessage-deflate; client_max_window_bits=10").is_some());
        assert!(offer("permessage-deflate; server_no_context_takeover; client_no_context_takeover").is_some());
        assert!(offer("permessage-deflate; server_max_window_bits=15").is_some());
        assert!(offer("permessage-deflate; server_max_window_bits=\"15\"").is_some());
        // Declined: a smaller server window, bad values, unknown or repeated parameters.
        assert!(offer("permessage-deflate; server_max_window_bits=10").is_none());
        assert!(offer("permessage-deflate; server_max_window_bits").is_none());
        assert!(offer("permessage-deflate; client_max_window_bits=16").is_none());
        assert!(offer("permessage-deflate; client_max_window_bits=7").is_none());
        assert!(offer("permessage-deflate; client_max_window_bits=+9").is_none());
        assert!(offer("permessage-deflate; foo").is_none());
        assert!(offer("permessage-deflate; client_no_context_takeover; client_no_context_takeover").is_none());
        assert!(offer("permessage-deflate; server_no_context_takeover=1").is_none());
        assert!(offer("deflate-frame").is_none());
        // The first acceptable offer wins.
        assert!(offer("permessage-deflate; server_max_window_bits=9, permessage-deflate").is_some());
        assert!(negotiate(std::iter::once("permessage-deflate"), Compression::Off).is_none());
        assert_eq!(
            negotiate(std::iter::once("permessage-deflate"), Compression::Above(100)),
            Some(Deflate { threshold: 100 })
        );
    }

    fn roundtrip(payload: &[u8]) {
        let frame = compressed_frame(0x1, payload).expect("compresses");
        assert_eq!(frame[0], 0xC1, "FIN, RSV1, text");
        let body_at = match frame[1] {
            126 => 4,
            127 => 10,
            _ => 2,
        };
        let body = &frame[body_at..];
        assert_eq!(inflate(&[body], payload.len()).unwrap(), payload);
        // In fragments of any size.
        for step in [1, 3, 100] {
            let parts: Vec<&[u8]> = body.chunks(step).collect();
            assert_eq!(inflate(&parts, payload.len()).unwrap(), payload);
        }
        // One byte under the size: too big.
        assert_eq!(inflate(&[body], payload.len() - 1), Err(InflateError::TooBig));
    }

    /// Binary-like data that deflate shrinks only a little (runs of noise
    /// between runs of a pattern), so the compressed form is nearly as big
    /// as the input.
    fn barely_compressible(len: usize) -> Vec<u8> {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        (0..len)
            .map(|i| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                if (i / 700) % 4 == 0 {
                    (i % 7) as u8
                } else {
                    (x >> 32) as u8
                }
            })
            .collect()
    }

    /// Autobahn 12.2.9 and 12.5.9 (a bitmap and a PDF, 64 KiB and 128 KiB
    /// a message): messages that compress to more than half their size
    /// came back short, the compressor's output cut where its first buffer
    /// was full.
    #[test]
    fn large_barely_compressible_messages_round_trip_whole() {
        for len in [40_000, 65_536, 131_072, 1 << 20] {
            let payload = barely_compressible(len);
            let frame = compressed_frame(0x2, &payload).expect("compresses a little");
            let body_at = if frame[1] == 126 { 4 } else { 10 };
            assert!(frame.len() - body_at > len / 2, "barely compressible: {} of {len}", frame.len());
            let back = inflate(&[&frame[body_at..]], len).expect("inflates");
            assert_eq!(back.len(), len);
            assert!(back == payload, "{len} bytes came back changed");
        }
    }

    #[test]
    fn compress_and_inflate() {
        roundtrip(br#"{"t":"event","room":"chat:lobby","event":"message","data":{"user":"ann","text":"hello there, hello there"}}"#);
        roundtrip(&b"0123456789abcdef".repeat(4096));
        // Incompressible: sent plain.
        let noise: Vec<u8> = (0..200u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        assert!(compressed_frame(0x2, &noise).is_none());
    }

    #[test]
    fn a_bomb_stops_at_the_limit() {
        let frame = compressed_frame(0x2, &vec![0u8; 10 << 20]).unwrap();
        let body = &frame[4..];
        assert!(body.len() < 64 * 1024, "{}", body.len());
        assert_eq!(inflate(&[body], 64 * 1024), Err(InflateError::TooBig));
    }

    #[test]
    fn corrupt_streams() {
        // Block type 3 is reserved.
        assert_eq!(inflate(&[&[0xff, 0xff, 0xff]], 1024), Err(InflateError::Corrupt));
        // A stored block whose length check (NLEN) is wrong.
        assert_eq!(inflate(&[&[0x00, 0x05, 0x00, 0x00, 0x00, b'a']], 1024), Err(InflateError::Corrupt));
    }
}
