//! The crate's own WebSocket frame reader (RFC 6455 §5), for the inbound
//! side of a connection.
//!
//! tungstenite refuses any frame with a reserved bit set, so it cannot read
//! `permessage-deflate` messages (RSV1). This reader does everything its
//! read side did, plus the extension:
//!
//! - frames: masking (client frames must be masked, server frames must
//!   not), reserved bits and opcodes, control frames (final, at most 125
//!   bytes, allowed between fragments), 63-bit lengths;
//! - messages: fragmentation (a continuation only inside a message, no new
//!   message inside one), UTF-8 of text checked as each fragment arrives
//!   (an invalid sequence fails at once) and whole at the end;
//! - limits: a message of more than `max_message_size` bytes is refused
//!   before its payload is read (1009), and so is one in more than
//!   `max_fragments` frames; each message reports how many frames it came
//!   in ([`Fragments`]), so the session charges every frame to the rate
//!   limit;
//! - close frames: the code must be one a peer may send, the reason UTF-8;
//!   after a close nothing more is read;
//! - `permessage-deflate` when negotiated: RSV1 on a message's first frame
//!   marks it compressed; the message is inflated whole when its last frame
//!   arrives, with the output capped at the message limit (a deflate bomb
//!   stops at `max_message_size + 1` bytes and closes 1009), then checked
//!   like any other.
//!
//! Errors and their close codes: a broken frame or message rule, RSV1 on a
//! control frame, on a continuation or without the extension, an invalid
//! close code → 1002 ([`TransportError::Protocol`]); invalid UTF-8 in text
//! or a close reason, a compressed message that is not valid deflate →
//! 1007 ([`TransportError::InvalidUtf8`] / [`TransportError::InvalidData`]);
//! too big or too many fragments, compressed or inflated → 1009. After an
//! error the reader yields nothing more.

use super::deflate::{self, InflateError};
use crate::protocol::CloseCode;
use crate::transport::{CloseFrame, Fragments, Frame, TransportError};
use bytes::{Buf, Bytes, BytesMut};
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use tokio::io::{AsyncRead, ReadBuf};

type BoxRead = Box<dyn AsyncRead + Send + Unpin>;

/// Which side of the connection reads: a server reads masked frames, a
/// client unmasked ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    Server,
    /// The Rust client's reader (`client::ws`).
    #[cfg_attr(not(feature = "client"), allow(dead_code))]
    Client,
}

/// Limits and negotiated options of a [`FrameReader`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub(crate) max_message_size: usize,
    pub(crate) max_fragments: u32,
    /// Bytes read from the socket at a time (the read buffer's size).
    pub(crate) read_buffer_size: usize,
    /// `permessage-deflate` was negotiated: RSV1 marks compressed messages.
    pub(crate) deflate: bool,
}

/// A message whose first frame is in and whose last is not.
#[derive(Debug)]
struct Partial {
    binary: bool,
    compressed: bool,
    /// The payloads so far: the message, or its compressed bytes.
    data: Vec<u8>,
    /// Frames so far.
    frames: u32,
    /// Bytes of `data` known to be valid UTF-8 (uncompressed text).
    checked: usize,
}

/// Most bytes a read takes while the reader holds no buffer (see
/// [`FrameReader::poll_fill`]): a stack chunk, as big as the default
/// read buffer.
const IDLE_CHUNK: usize = 4096;

/// Reads frames from the socket and yields messages and control frames.
pub(crate) struct FrameReader {
    io: BoxRead,
    /// Bytes read and not parsed yet.
    buf: BytesMut,
    role: Role,
    limits: Limits,
    counts: Fragments,
    message: Option<Partial>,
    /// A close was read or an error returned: nothing more is read.
    done: bool,
}

impl std::fmt::Debug for FrameReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameReader").field("buffered", &self.buf.len()).finish_non_exhaustive()
    }
}

fn protocol(msg: &str) -> TransportError {
    TransportError::Protocol(msg.to_owned())
}

const OP_CONTINUATION: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;

/// A parsed frame header.
#[derive(Debug, Clone, Copy)]
struct Header {
    fin: bool,
    rsv1: bool,
    opcode: u8,
    mask: Option<[u8; 4]>,
    /// Header bytes.
    len: usize,
    payload: u64,
}

/// Parses a frame header at the start of `buf`: `Ok(None)` until it is all
/// there.
fn parse_header(buf: &[u8]) -> Result<Option<Header>, TransportError> {
    let [b0, b1, ..] = *buf else { return Ok(None) };
    if b0 & 0x30 != 0 {
        return Err(protocol("reserved bits RSV2/RSV3 set"));
    }
    let ext = match b1 & 0x7F {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    let masked = b1 & 0x80 != 0;
    let len = 2 + ext + if masked { 4 } else { 0 };
    if buf.len() < len {
        return Ok(None);
    }
    let payload = match ext {
        2 => u64::from(u16::from_be_bytes([buf[2], buf[3]])),
        8 => u64::from_be_bytes(buf[2..10].try_into().expect("8 bytes")),
        _ => u64::from(b1 & 0x7F),
    };
    if payload >> 63 != 0 {
        return Err(protocol("frame length with its top bit set"));
    }
    let mask = masked.then(|| buf[2 + ext..6 + ext].try_into().expect("4 bytes"));
    Ok(Some(Header { fin: b0 & 0x80 != 0, rsv1: b0 & 0x40 != 0, opcode: b0 & 0x0F, mask, len, payload }))
}

/// Unmasks `data` in place with `key`.
fn unmask(data: &mut [u8], key: [u8; 4]) {
    let word = u32::from_ne_bytes(key);
    let mut chunks = data.chunks_exact_mut(4);
    for c in &mut chunks {
        let v = u32::from_ne_bytes((&*c).try_into().expect("4 bytes")) ^ word;
        c.copy_from_slice(&v.to_ne_bytes());
    }
    for (b, k) in chunks.into_remainder().iter_mut().zip(key) {
        *b ^= k;
    }
}

/// Appends a masked frame (a client's): first byte `b0`, `payload` masked
/// with `key`.
#[cfg(any(test, feature = "client"))]
pub(crate) fn masked_frame(out: &mut Vec<u8>, b0: u8, payload: &[u8], key: [u8; 4]) {
    out.push(b0);
    match payload.len() {
        n if n < 126 => out.push(0x80 | n as u8),
        n if n <= 0xFFFF => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&key);
    let start = out.len();
    out.extend_from_slice(payload);
    unmask(&mut out[start..], key);
}

/// Close codes a peer may send (RFC 6455 §7.4, IANA registry).
fn valid_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// The most compressed bytes one message may take: a little over the
/// message limit, as incompressible data grows a few bytes per block.
fn max_compressed(max: usize) -> usize {
    max.saturating_add(max / 64).saturating_add(64)
}

impl FrameReader {
    pub(crate) fn new(io: BoxRead, leftover: Vec<u8>, role: Role, limits: Limits) -> FrameReader {
        // No buffer until bytes arrive (`poll_fill`): only the leftover.
        let buf = BytesMut::from(&leftover[..]);
        FrameReader { io, buf, role, limits, counts: Fragments::new(), message: None, done: false }
    }

    /// The frames-per-message counts, for the session.
    pub(crate) fn counts(&self) -> Fragments {
        self.counts.clone()
    }

    /// The next frame or message: `None` when the connection ended (after
    /// a close, an error, or the end of the stream).
    pub(crate) fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame, TransportError>>> {
        if self.done {
            return Poll::Ready(None);
        }
        loop {
            match self.parse() {
                Ok(Some(frame)) => {
                    if matches!(frame, Frame::Close(_)) {
                        self.done = true;
                    }
                    return Poll::Ready(Some(Ok(frame)));
                }
                Ok(None) => {}
                Err(e) => {
                    self.done = true;
                    self.buf = BytesMut::new();
                    return Poll::Ready(Some(Err(e)));
                }
            }
            match ready!(self.poll_fill(cx)) {
                Ok(0) => {
                    // The peer went away without a close frame (perhaps in
                    // the middle of one): the connection is lost.
                    self.done = true;
                    return Poll::Ready(None);
                }
                Ok(_) => {}
                Err(e) => {
                    self.done = true;
                    return Poll::Ready(Some(Err(TransportError::Io(e))));
                }
            }
        }
    }

    /// Reads more bytes into the buffer: at least what the frame being
    /// read still lacks, when that is known.
    ///
    /// The buffer is held only while there is something in it: a read that
    /// finds nothing to read with the buffer empty (between frames: an
    /// idle connection) gives it back, and the next read goes into a
    /// chunk on the stack, copied into a buffer of its size only once
    /// bytes came. An idle connection then holds no read buffer (4 KiB
    /// each by default), at the cost of one allocation and copy per read
    /// after a wait, not per read.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<usize>> {
        if self.buf.capacity() == 0 {
            return self.poll_fill_released(cx);
        }
        let want = self.limits.read_buffer_size.max(1);
        if self.buf.capacity() - self.buf.len() < want {
            self.buf.reserve(want);
        }
        let start = self.buf.len();
        let cap = self.buf.capacity();
        self.buf.resize(cap, 0);
        let mut rb = ReadBuf::new(&mut self.buf[start..]);
        let res = Pin::new(&mut self.io).poll_read(cx, &mut rb);
        let n = rb.filled().len();
        self.buf.truncate(start + n);
        match res {
            Poll::Ready(Ok(())) => Poll::Ready(Ok(n)),
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                if self.buf.is_empty() {
                    self.buf = BytesMut::new();
                }
                Poll::Pending
            }
        }
    }

    /// [`FrameReader::poll_fill`] without a buffer: into a stack chunk of
    /// at most [`IDLE_CHUNK`] bytes (and at most `read_buffer_size`),
    /// then into a buffer holding just what came.
    fn poll_fill_released(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<usize>> {
        let mut chunk = [std::mem::MaybeUninit::<u8>::uninit(); IDLE_CHUNK];
        let size = self.limits.read_buffer_size.clamp(1, IDLE_CHUNK);
        let mut rb = ReadBuf::uninit(&mut chunk[..size]);
        match Pin::new(&mut self.io).poll_read(cx, &mut rb) {
            Poll::Ready(Ok(())) => {
                self.buf.extend_from_slice(rb.filled());
                Poll::Ready(Ok(rb.filled().len()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                // Empty (no room left): drop what an exhausted buffer kept.
                self.buf = BytesMut::new();
                Poll::Pending
            }
        }
    }

    /// Parses what the buffer holds: a frame to yield, `None` when more
    /// bytes are needed.
    fn parse(&mut self) -> Result<Option<Frame>, TransportError> {
        loop {
            let Some(h) = parse_header(&self.buf)? else { return Ok(None) };
            self.check(&h)?;
            let total = h.len + usize::try_from(h.payload).expect("checked against the limits");
            if self.buf.len() < total {
                // The whole frame before anything is taken from it.
                self.buf.reserve(total - self.buf.len());
                return Ok(None);
            }
            // Read in place and then skipped, not split off: splitting
            // would make the buffer shared, an allocation of its own.
            let mut buf = std::mem::take(&mut self.buf);
            if let Some(key) = h.mask {
                unmask(&mut buf[h.len..total], key);
            }
            let frame = self.frame(&h, &buf[h.len..total]);
            buf.advance(total);
            self.buf = buf;
            if let Some(frame) = frame? {
                return Ok(Some(frame));
            }
        }
    }

    /// The frame rules that the header alone decides, before its payload
    /// is read.
    fn check(&self, h: &Header) -> Result<(), TransportError> {
        match (self.role, h.mask) {
            (Role::Server, None) => return Err(protocol("unmasked client frame")),
            (Role::Client, Some(_)) => return Err(protocol("masked server frame")),
            _ => {}
        }
        let max = self.limits.max_message_size;
        match h.opcode {
            OP_CLOSE | OP_PING | OP_PONG => {
                if !h.fin {
                    return Err(protocol("fragmented control frame"));
                }
                if h.payload > 125 {
                    return Err(protocol("control frame over 125 bytes"));
                }
                if h.rsv1 {
                    return Err(protocol("RSV1 set on a control frame"));
                }
            }
            OP_CONTINUATION => {
                let Some(m) = &self.message else { return Err(protocol("continuation frame outside a message")) };
                if h.rsv1 {
                    return Err(protocol("RSV1 set on a continuation frame"));
                }
                if m.frames >= self.limits.max_fragments {
                    return Err(TransportError::MessageTooBig);
                }
                let limit = if m.compressed { max_compressed(max) } else { max };
                if h.payload > (limit - m.data.len()) as u64 {
                    return Err(TransportError::MessageTooBig);
                }
            }
            OP_TEXT | OP_BINARY => {
                if self.message.is_some() {
                    return Err(protocol("new message before the last one ended"));
                }
                if h.rsv1 && !self.limits.deflate {
                    return Err(protocol("RSV1 set without permessage-deflate"));
                }
                let limit = if h.rsv1 { max_compressed(max) } else { max };
                if h.payload > limit as u64 {
                    return Err(TransportError::MessageTooBig);
                }
            }
            _ => return Err(protocol("unknown opcode")),
        }
        Ok(())
    }

    /// A whole, unmasked frame: the frame or message to yield, if any.
    fn frame(&mut self, h: &Header, payload: &[u8]) -> Result<Option<Frame>, TransportError> {
        match h.opcode {
            OP_PING => Ok(Some(Frame::Ping(Bytes::copy_from_slice(payload)))),
            OP_PONG => Ok(Some(Frame::Pong(Bytes::copy_from_slice(payload)))),
            OP_CLOSE => close(payload).map(Some),
            OP_CONTINUATION => {
                let m = self.message.as_mut().expect("checked");
                m.frames += 1;
                m.data.extend_from_slice(payload);
                if !m.compressed && !m.binary {
                    check_utf8_prefix(&m.data, &mut m.checked)?;
                }
                if !h.fin {
                    return Ok(None);
                }
                let m = self.message.take().expect("checked");
                self.finish(m.binary, m.compressed, &[&m.data], m.frames).map(Some)
            }
            _ => {
                let binary = h.opcode == OP_BINARY;
                if h.fin {
                    return self.finish(binary, h.rsv1, &[payload], 1).map(Some);
                }
                let mut m = Partial { binary, compressed: h.rsv1, data: payload.to_vec(), frames: 1, checked: 0 };
                if !m.compressed && !binary {
                    check_utf8_prefix(&m.data, &mut m.checked)?;
                }
                self.message = Some(m);
                Ok(None)
            }
        }
    }

    /// A whole message: inflated if compressed, checked, counted.
    fn finish(&mut self, binary: bool, compressed: bool, data: &[&[u8]], frames: u32) -> Result<Frame, TransportError> {
        let bytes = if compressed {
            let out = deflate::inflate(data, self.limits.max_message_size).map_err(|e| match e {
                InflateError::TooBig => TransportError::MessageTooBig,
                InflateError::Corrupt => TransportError::InvalidData("invalid deflate stream".into()),
            })?;
            Bytes::from(out)
        } else {
            Bytes::copy_from_slice(data[0])
        };
        if !binary && std::str::from_utf8(&bytes).is_err() {
            return Err(TransportError::InvalidUtf8);
        }
        self.counts.message_read(frames);
        Ok(if binary { Frame::Binary(bytes) } else { Frame::Text(bytes) })
    }
}

/// Checks the UTF-8 of `data` past `checked`, as fragments arrive: an
/// invalid sequence fails now; a character cut at the end waits for the
/// next fragment.
fn check_utf8_prefix(data: &[u8], checked: &mut usize) -> Result<(), TransportError> {
    match std::str::from_utf8(&data[*checked..]) {
        Ok(_) => *checked = data.len(),
        Err(e) if e.error_len().is_none() => *checked += e.valid_up_to(),
        Err(_) => return Err(TransportError::InvalidUtf8),
    }
    Ok(())
}

/// A close frame's payload: nothing, or a code a peer may send and a UTF-8
/// reason.
fn close(payload: &[u8]) -> Result<Frame, TransportError> {
    match payload {
        [] => Ok(Frame::Close(None)),
        [_] => Err(protocol("close frame with a one-byte payload")),
        [a, b, reason @ ..] => {
            let code = u16::from_be_bytes([*a, *b]);
            if !valid_close_code(code) {
                return Err(protocol("invalid close code"));
            }
            let reason = std::str::from_utf8(reason).map_err(|_| TransportError::InvalidUtf8)?;
            Ok(Frame::Close(Some(CloseFrame { code: CloseCode(code), reason: reason.to_owned() })))
        }
    }
}

/// See [`super::read_frames_for_fuzzing`].
#[cfg(fuzzing)]
pub(crate) fn read_for_fuzzing(data: &[u8]) {
    let Some((&step, bytes)) = data.split_first() else { return };
    let limits = Limits { max_message_size: 4096, max_fragments: 8, read_buffer_size: 64, deflate: true };
    let io = Box::new(Chunks(bytes.to_vec(), usize::from(step).max(1)));
    let mut r = FrameReader::new(io, Vec::new(), Role::Server, limits);
    let waker = futures::task::noop_waker();
    let mut cx = Context::from_waker(&waker);
    let mut ended = false;
    while let Poll::Ready(Some(item)) = r.poll_frame(&mut cx) {
        assert!(!ended, "a frame after a close or an error");
        match item {
            Ok(Frame::Text(t)) => assert!(t.len() <= 4096 && std::str::from_utf8(&t).is_ok()),
            Ok(Frame::Binary(b)) => assert!(b.len() <= 4096),
            Ok(Frame::Ping(p) | Frame::Pong(p)) => assert!(p.len() <= 125),
            Ok(Frame::Close(_)) | Err(_) => ended = true,
        }
    }
}

/// A reader returning `bytes` at most `.1` bytes per read (tests, fuzzing).
#[cfg(any(test, fuzzing))]
struct Chunks(Vec<u8>, usize);

#[cfg(any(test, fuzzing))]
impl AsyncRead for Chunks {
    fn poll_read(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let n = self.1.min(self.0.len()).min(buf.remaining());
        buf.put_slice(&self.0[..n]);
        self.0.drain(..n);
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A masked client frame.
    pub(crate) fn frame(fin: bool, rsv1: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        let b0 = if fin { 0x80 } else { 0 } | if rsv1 { 0x40 } else { 0 } | opcode;
        masked_frame(&mut f, b0, payload, [0x12, 0x34, 0x56, 0x78]);
        f
    }

    fn limits(deflate: bool) -> Limits {
        Limits { max_message_size: 100_000, max_fragments: 4, read_buffer_size: 64, deflate }
    }

    /// Reads everything from `bytes`, fed `step` bytes per read.
    fn read_all(bytes: Vec<u8>, step: usize, deflate: bool) -> (Vec<Result<Frame, String>>, Fragments) {
        let mut r = FrameReader::new(Box::new(Chunks(bytes, step)), Vec::new(), Role::Server, limits(deflate));
        let counts = r.counts();
        let mut out = Vec::new();
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        while let Poll::Ready(Some(item)) = r.poll_frame(&mut cx) {
            out.push(item.map_err(|e| e.to_string()));
        }
        (out, counts)
    }

    fn deflated(payload: &[u8]) -> Vec<u8> {
        let f = deflate::compressed_frame(OP_TEXT, payload).unwrap();
        let at = match f[1] {
            126 => 4,
            127 => 10,
            _ => 2,
        };
        f[at..].to_vec()
    }

    #[test]
    fn messages_fragments_and_control_frames_whatever_the_read_sizes() {
        let big = "é".repeat(40_000);
        let mut s = Vec::new();
        s.extend(frame(true, false, OP_TEXT, b"hello"));
        s.extend(frame(false, false, OP_BINARY, &[1; 200]));
        s.extend(frame(true, false, OP_PING, b"p"));
        s.extend(frame(false, false, OP_CONTINUATION, b""));
        s.extend(frame(true, false, OP_CONTINUATION, &[2; 3]));
        // A character split across fragments.
        s.extend(frame(false, false, OP_TEXT, &big.as_bytes()[..70_001]));
        s.extend(frame(true, false, OP_CONTINUATION, &big.as_bytes()[70_001..]));
        let z = deflated(b"compressed compressed compressed");
        s.extend(frame(false, true, OP_TEXT, &z[..5]));
        s.extend(frame(true, false, OP_CONTINUATION, &z[5..]));
        s.extend(frame(true, false, OP_PONG, b""));
        s.extend(frame(true, false, OP_CLOSE, &[0x03, 0xE8, b'o', b'k']));
        s.extend(frame(true, false, OP_TEXT, b"never read"));
        for step in [1, 2, 7, 100, 1 << 20] {
            let (out, counts) = read_all(s.clone(), step, true);
            let mut bin = vec![1; 200];
            bin.extend([2; 3]);
            assert_eq!(
                out,
                vec![
                    Ok(Frame::Text(Bytes::from_static(b"hello"))),
                    Ok(Frame::Ping(Bytes::from_static(b"p"))),
                    Ok(Frame::Binary(bin.into())),
                    Ok(Frame::Text(big.clone().into())),
                    Ok(Frame::Text(Bytes::from_static(b"compressed compressed compressed"))),
                    Ok(Frame::Pong(Bytes::new())),
                    Ok(Frame::Close(Some(CloseFrame { code: CloseCode(1000), reason: "ok".into() }))),
                ],
                "read size {step}"
            );
            let n: Vec<u32> = (0..4).map(|_| counts.next_message()).collect();
            assert_eq!(n, [1, 3, 2, 2]);
        }
    }

    /// Between frames, with nothing to read, the reader gives its buffer
    /// back (an idle connection holds none); in the middle of a frame it
    /// keeps what it has; a frame bigger than the stack chunk, and bytes
    /// left over from the handshake, still come whole.
    #[tokio::test]
    async fn an_idle_reader_holds_no_buffer_and_frames_still_come_whole() {
        use tokio::io::AsyncWriteExt;
        let (mut peer, io) = tokio::io::duplex(1 << 16);
        let limits = Limits { read_buffer_size: 4096, ..limits(false) };
        let leftover = frame(true, false, OP_TEXT, b"early");
        let mut r = FrameReader::new(Box::new(io), leftover, Role::Server, limits);
        async fn poll(r: &mut FrameReader) -> Poll<Option<Result<Frame, TransportError>>> {
            std::future::poll_fn(|cx| Poll::Ready(r.poll_frame(cx))).await
        }
        assert!(matches!(poll(&mut r).await, Poll::Ready(Some(Ok(Frame::Text(t)))) if t == "early"));
        assert!(poll(&mut r).await.is_pending());
        assert_eq!(r.buf.capacity(), 0, "idle between frames: no buffer");
        let big = "b".repeat(3 * IDLE_CHUNK);
        let mut s = frame(true, false, OP_TEXT, b"one");
        s.extend(frame(true, false, OP_TEXT, big.as_bytes()));
        let cut = s.len() - 10;
        peer.write_all(&s[..cut]).await.unwrap();
        assert!(matches!(poll(&mut r).await, Poll::Ready(Some(Ok(Frame::Text(t)))) if t == "one"));
        assert!(poll(&mut r).await.is_pending());
        assert!(!r.buf.is_empty(), "a frame cut short keeps what came of it");
        peer.write_all(&s[cut..]).await.unwrap();
        assert!(matches!(poll(&mut r).await, Poll::Ready(Some(Ok(Frame::Text(t)))) if t == big));
        assert!(poll(&mut r).await.is_pending());
        assert_eq!(r.buf.capacity(), 0);
        peer.write_all(&frame(true, false, OP_PING, b"p")).await.unwrap();
        assert!(matches!(poll(&mut r).await, Poll::Ready(Some(Ok(Frame::Ping(p)))) if p == "p"));
        drop(peer);
        assert!(matches!(poll(&mut r).await, Poll::Ready(None)));
    }

    fn first_error(bytes: Vec<u8>, deflate: bool) -> String {
        let (out, _) = read_all(bytes, 1 << 20, deflate);
        match out.into_iter().find_map(Result::err) {
            Some(e) => e,
            None => panic!("no error"),
        }
    }

    #[test]
    fn broken_frames_are_refused() {
        let rsv = |b: &[u8]| first_error(b.to_vec(), true);
        assert!(rsv(&frame(true, true, OP_PING, b"")).contains("RSV1 set on a control frame"));
        let mut s = frame(false, true, OP_TEXT, &deflated(b"aaaaaaaaaaaaaaaa")[..2]);
        s.extend(frame(true, true, OP_CONTINUATION, b""));
        assert!(rsv(&s).contains("RSV1 set on a continuation"));
        assert!(first_error(frame(true, true, OP_TEXT, &deflated(b"aaaaaaaa")), false)
            .contains("without permessage-deflate"));
        let mut unmasked = frame(true, false, OP_TEXT, b"");
        unmasked[1] &= 0x7F;
        unmasked.truncate(2);
        assert!(rsv(&unmasked).contains("unmasked"));
        let mut rsv2 = frame(true, false, OP_TEXT, b"");
        rsv2[0] |= 0x20;
        assert!(rsv(&rsv2).contains("RSV2"));
        assert!(rsv(&frame(true, false, 0x3, b"")).contains("unknown opcode"));
        assert!(rsv(&frame(true, false, 0xB, b"")).contains("unknown opcode"));
        assert!(rsv(&frame(false, false, OP_PING, b"")).contains("fragmented control"));
        assert!(rsv(&frame(true, false, OP_PING, &[0; 126])).contains("125"));
        assert!(rsv(&frame(true, false, OP_CONTINUATION, b"x")).contains("outside a message"));
        let mut s = frame(false, false, OP_TEXT, b"x");
        s.extend(frame(true, false, OP_TEXT, b"y"));
        assert!(rsv(&s).contains("before the last one ended"));
        assert!(rsv(&frame(true, false, OP_CLOSE, &[3])).contains("one-byte"));
        assert!(rsv(&frame(true, false, OP_CLOSE, &[0x03, 0xED])).contains("invalid close code"));
        assert!(rsv(&frame(true, false, OP_CLOSE, &[0x03, 0xE8, 0xff])).contains("UTF-8"));
        assert!(rsv(&frame(true, false, OP_TEXT, &[0xff])).contains("UTF-8"));
        // Invalid UTF-8 fails with the fragment that has it, before the end.
        let mut s = frame(false, false, OP_TEXT, b"ok");
        s.extend(frame(false, false, OP_CONTINUATION, &[0xC0, 0x80]));
        assert!(rsv(&s).contains("UTF-8"));
        // A character cut at the very end.
        assert!(rsv(&frame(true, false, OP_TEXT, &"é".as_bytes()[..1])).contains("UTF-8"));
        assert!(rsv(&frame(true, true, OP_TEXT, &[0xff, 0xff, 0xff])).contains("deflate"));
        // Compressed invalid UTF-8, checked after inflation.
        assert!(rsv(&frame(true, true, OP_TEXT, &deflated(&[0xff; 64]))).contains("UTF-8"));
    }

    #[test]
    fn limits_are_kept() {
        let too_big = |b: Vec<u8>, deflate| first_error(b, deflate).contains("maximum size");
        // Refused on the header: the payload is never read.
        let mut head = frame(true, false, OP_BINARY, b"");
        head[1] = 0x80 | 127;
        head.splice(2..2, 200_000u64.to_be_bytes());
        assert!(too_big(head, false));
        let mut s = frame(false, false, OP_BINARY, &[0; 60_000]);
        s.extend(frame(true, false, OP_CONTINUATION, &[0; 60_000]));
        assert!(too_big(s, false));
        // Five fragments, four allowed.
        let mut s = frame(false, false, OP_BINARY, b"");
        for _ in 0..4 {
            s.extend(frame(false, false, OP_CONTINUATION, b""));
        }
        assert!(too_big(s, false));
        // A bomb: 10 MiB of zeros in a few KiB, limit 100 KB.
        let bomb = deflate::compressed_frame(OP_BINARY, &vec![0; 10 << 20]).unwrap();
        let mut s = vec![0xC2, 0x80 | 126];
        s.extend_from_slice(&bomb[2..4]);
        s.extend_from_slice(&[0; 4]);
        s.extend_from_slice(&bomb[4..]);
        assert!(too_big(s, true));
    }

    #[test]
    fn top_bit_length_is_refused() {
        let mut head = frame(true, false, OP_BINARY, b"");
        head[1] = 0x80 | 127;
        head.splice(2..2, u64::MAX.to_be_bytes());
        assert!(first_error(head, false).contains("top bit"));
    }
}
