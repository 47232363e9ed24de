//! POSTs for a session held by another node, carried over the backplane.
//!
//! Every node with an SSE endpoint subscribes to `$sse.<node id>` (16 hex
//! digits; topics starting with `$` are the hub's own). A session id starts
//! with the node id of the node holding the stream, so a POST landing
//! elsewhere is published to that node's topic as a **request**; the holder
//! delivers it to the session and publishes an **answer** (the HTTP status)
//! to the requester's topic, which the waiting POST returns.
//!
//! Layout (big-endian):
//!
//! | offset | size | request | answer |
//! |---|---|---|---|
//! | 0 | 1 | version `1` | version `1` |
//! | 1 | 1 | kind `1` | kind `2` |
//! | 2 | 8 | requesting node | request id |
//! | 10 | 8 | request id | — |
//! | 10 | 2 | — | HTTP status |
//! | 18 | 8 | session key | |
//! | 26 | 16 | secret | |
//! | 42 | 2 | envelope count `n` | |
//! | 44 | … | `n` × (4-byte length, envelope bytes) | |

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// The backplane topic of `node`'s SSE sessions.
pub(crate) fn topic(node: u64) -> String {
    format!("$sse.{node:016x}")
}

#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Message {
    Request { from: u64, id: u64, key: u64, secret: [u8; 16], envelopes: Vec<Bytes> },
    Answer { id: u64, status: u16 },
}

pub(crate) fn encode_request(from: u64, id: u64, key: u64, secret: &[u8; 16], envelopes: &[Bytes]) -> Bytes {
    let len: usize = envelopes.iter().map(|e| e.len() + 4).sum();
    let mut b = BytesMut::with_capacity(44 + len);
    b.put_u8(1);
    b.put_u8(1);
    b.put_u64(from);
    b.put_u64(id);
    b.put_u64(key);
    b.put_slice(secret);
    b.put_u16(envelopes.len() as u16);
    for e in envelopes {
        b.put_u32(e.len() as u32);
        b.put_slice(e);
    }
    b.freeze()
}

pub(crate) fn encode_answer(id: u64, status: u16) -> Bytes {
    let mut b = BytesMut::with_capacity(12);
    b.put_u8(1);
    b.put_u8(2);
    b.put_u64(id);
    b.put_u16(status);
    b.freeze()
}

/// Decodes a message; `None` when it is malformed (logged and skipped by
/// the caller). At most `max_envelopes` envelopes are accepted.
pub(crate) fn decode(mut b: Bytes, max_envelopes: usize) -> Option<Message> {
    if b.remaining() < 2 || b.get_u8() != 1 {
        return None;
    }
    match b.get_u8() {
        1 => {
            if b.remaining() < 42 {
                return None;
            }
            let (from, id, key) = (b.get_u64(), b.get_u64(), b.get_u64());
            let mut secret = [0u8; 16];
            b.copy_to_slice(&mut secret);
            let n = usize::from(b.get_u16());
            if n > max_envelopes {
                return None;
            }
            let mut envelopes = Vec::with_capacity(n);
            for _ in 0..n {
                if b.remaining() < 4 {
                    return None;
                }
                let len = b.get_u32() as usize;
                if b.remaining() < len {
                    return None;
                }
                envelopes.push(b.split_to(len));
            }
            b.is_empty().then_some(Message::Request { from, id, key, secret, envelopes })
        }
        2 if b.remaining() == 10 => Some(Message::Answer { id: b.get_u64(), status: b.get_u16() }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_garbage() {
        let envs = vec![Bytes::from_static(b"{\"type\":\"ping\"}"), Bytes::new()];
        let req = encode_request(7, 8, 9, &[3; 16], &envs);
        assert_eq!(
            decode(req.clone(), 32),
            Some(Message::Request { from: 7, id: 8, key: 9, secret: [3; 16], envelopes: envs })
        );
        assert_eq!(decode(req.clone(), 1), None, "envelope bound");
        for cut in 0..req.len() {
            assert_eq!(decode(req.slice(..cut), 32), None, "cut at {cut}");
        }
        assert_eq!(decode(encode_answer(5, 404), 32), Some(Message::Answer { id: 5, status: 404 }));
        assert_eq!(decode(Bytes::from_static(&[2, 2]), 32), None);
        assert_eq!(topic(0xab), "$sse.00000000000000ab");
    }
}
