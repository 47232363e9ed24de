//! The WebSocket connection itself: the crate's frame reader reads, we
//! write.
//!
//! **Reading** goes through [`FrameReader`](super::reader), which enforces
//! RFC 6455 on what the client sends (masking, fragmentation, UTF-8 in
//! text, control-frame rules, size limits) and inflates `permessage-deflate`
//! messages. It never writes: the session answers pings and closes through
//! the writer below, so every byte sent on the socket comes from one place,
//! in order.
//!
//! **Writing** does not go through tungstenite. Server frames are unmasked,
//! so a frame is a 2–10 byte header followed by the payload unchanged: the
//! writer builds the header and queues the payload `Bytes` as is — for a
//! room publish, the very buffer every other member shares — then writes the
//! whole batch with vectored writes on flush. A delivery costs a header, a
//! reference count and a slot in an `IoSlice` array: no UTF-8 re-check, no
//! copy into a per-connection buffer.

use super::deflate::Deflate;
use super::reader::{FrameReader, Limits, Role};
use super::WsConfig;
use crate::transport::{Capabilities, CloseFrame, Fragments, Frame, Framing, Transport, TransportError};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures::{Sink, Stream};
use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite};

type BoxRead = Box<dyn AsyncRead + Send + Unpin>;
type BoxWrite = Box<dyn AsyncWrite + Send + Unpin>;

/// A server-side WebSocket connection as a [`Transport`].
pub struct WsTransport {
    read: FrameReader,
    /// Frames per message read.
    fragments: Fragments,
    write: BoxWrite,
    /// Data frames come framed ([`Framing::WebSocket`], after
    /// [`Transport::use_framing`]).
    framed: bool,
    /// `permessage-deflate` as negotiated, if it was.
    deflate: Option<Deflate>,
}

impl std::fmt::Debug for WsTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WsTransport").field("deflate", &self.deflate.is_some()).finish_non_exhaustive()
    }
}

impl WsTransport {
    /// Wraps a stream whose handshake is already done (server role), e.g. a
    /// hyper upgrade, without `permessage-deflate`. The stream is split
    /// with `tokio::io::split`.
    pub async fn from_upgraded<S>(io: S, config: &WsConfig, max_message_size: usize) -> WsTransport
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        WsTransport::upgraded(io, config, max_message_size, None)
    }

    /// [`WsTransport::from_upgraded`], with the extension as negotiated.
    pub(crate) fn upgraded<S>(
        io: S,
        config: &WsConfig,
        max_message_size: usize,
        deflate: Option<Deflate>,
    ) -> WsTransport
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let (r, w) = tokio::io::split(io);
        WsTransport::from_halves(Box::new(r), Box::new(w), Vec::new(), config, max_message_size, deflate)
    }

    /// Builds the transport from the two halves of an upgraded connection
    /// and the bytes already read past the handshake.
    pub(crate) fn from_halves(
        read: BoxRead,
        write: BoxWrite,
        leftover: Vec<u8>,
        config: &WsConfig,
        max_message_size: usize,
        deflate: Option<Deflate>,
    ) -> WsTransport {
        let limits = Limits {
            max_message_size,
            max_fragments: config.max_fragments,
            read_buffer_size: config.read_buffer_size,
            deflate: deflate.is_some(),
        };
        let read = FrameReader::new(read, leftover, Role::Server, limits);
        let fragments = read.counts();
        WsTransport { read, fragments, write, framed: false, deflate }
    }

    /// Whether `permessage-deflate` was negotiated.
    pub fn compressed(&self) -> bool {
        self.deflate.is_some()
    }
}

impl Transport for WsTransport {
    type Sink = WsSink;
    type Stream = WsStream;

    fn name(&self) -> &'static str {
        "websocket"
    }

    fn split(self) -> (WsSink, WsStream) {
        let sink =
            WsSink { io: self.write, out: VecDeque::new(), data: false, framed: self.framed, deflate: self.deflate };
        (sink, WsStream { inner: self.read })
    }

    /// Bidirectional, native pings, and data frames framed for the wire
    /// ([`Framing::WebSocket`]) when the session asks: the hub then frames a
    /// broadcast once for all its recipients, and the sink writes it as it is.
    fn capabilities(&self) -> Capabilities {
        Capabilities::default().with_framing(Some(Framing::WebSocket))
    }

    fn use_framing(&mut self, framing: Framing) {
        self.framed = framing == Framing::WebSocket;
    }

    fn compress_above(&self) -> Option<usize> {
        self.deflate.map(|d| d.threshold)
    }

    fn fragments(&self) -> Option<Fragments> {
        Some(self.fragments.clone())
    }
}

/// Writing half of a [`WsTransport`]: frames queued by `start_send` are
/// written by `poll_flush` in as few vectored writes as the socket takes.
pub struct WsSink {
    io: BoxWrite,
    /// Frames queued since the last flush: each its header, inline, and its
    /// payload, the hub's shared buffer (never copied).
    out: VecDeque<OutFrame>,
    /// A data frame was queued since the last flush. A flush of control
    /// frames only (a heartbeat ping on an idle connection) frees `out`.
    data: bool,
    /// Data frames arrive framed (header included): queued as they are.
    framed: bool,
    /// `permessage-deflate` as negotiated: unframed data frames at or over
    /// its threshold are compressed here (framed ones were by the hub).
    deflate: Option<Deflate>,
}

/// One frame on its way out: a 2–10 byte header kept inline (no allocation
/// or reference count per frame) and the payload.
struct OutFrame {
    head: [u8; 10],
    /// Header bytes: `head[start..len]` are still to be written.
    start: u8,
    len: u8,
    payload: Bytes,
}

impl std::fmt::Debug for WsSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WsSink").field("queued_frames", &self.out.len()).finish_non_exhaustive()
    }
}

/// Buffers handed to one `write_vectored` call at most (Linux allows 1024).
const MAX_SLICES: usize = 256;

use crate::transport::{ws_header as header, WS_BINARY as OP_BINARY, WS_TEXT as OP_TEXT};
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;

/// Control frame payloads are limited to 125 bytes (RFC 6455 §5.5).
fn control_payload(b: Bytes) -> Bytes {
    if b.len() > 125 {
        b.slice(..125)
    } else {
        b
    }
}

fn close_payload(frame: Option<CloseFrame>) -> Bytes {
    let Some(c) = frame else { return Bytes::new() };
    // Code (2 bytes) + reason: at most 123 bytes of reason, cut at a char
    // boundary so it stays valid UTF-8.
    let mut end = c.reason.len().min(123);
    while !c.reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut out = BytesMut::with_capacity(2 + end);
    out.put_u16(c.code.0);
    out.put_slice(&c.reason.as_bytes()[..end]);
    out.freeze()
}

impl WsSink {
    fn queue(&mut self, opcode: u8, payload: Bytes) {
        let (head, len) = header(opcode, payload.len());
        self.push(head, len, payload);
    }

    /// A data frame: framed by the hub already, or given a header (and
    /// compressed, when that was negotiated and it is big enough) here.
    fn queue_data(&mut self, opcode: u8, payload: Bytes) {
        self.data = true;
        if self.framed {
            self.push([0; 10], 0, payload);
        } else if let Some(frame) = self
            .deflate
            .filter(|d| payload.len() >= d.threshold)
            .and_then(|_| super::deflate::compressed_frame(opcode, &payload))
        {
            self.push([0; 10], 0, frame);
        } else {
            self.queue(opcode, payload);
        }
    }

    fn push(&mut self, head: [u8; 10], len: u8, payload: Bytes) {
        if self.out.capacity() == 0 {
            // Room for one frame, not the usual four (see `Outbox`).
            self.out.reserve_exact(1);
        }
        self.out.push_back(OutFrame { head, start: 0, len, payload });
    }
}

impl Sink<Frame> for WsSink {
    type Error = TransportError;

    fn poll_ready(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Result<(), TransportError>> {
        // The session bounds what it feeds between flushes (its outbound
        // queue), so the sink accepts a batch without writing in between.
        Poll::Ready(Ok(()))
    }

    fn start_send(mut self: Pin<&mut Self>, frame: Frame) -> Result<(), TransportError> {
        match frame {
            // Text is UTF-8 by the `Frame` contract (switchboard only sends
            // what it encoded); it is not checked again per recipient.
            Frame::Text(b) => self.queue_data(OP_TEXT, b),
            Frame::Binary(b) => self.queue_data(OP_BINARY, b),
            Frame::Ping(b) => self.queue(OP_PING, control_payload(b)),
            Frame::Pong(b) => self.queue(OP_PONG, control_payload(b)),
            Frame::Close(c) => self.queue(OP_CLOSE, close_payload(c)),
        }
        Ok(())
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), TransportError>> {
        let this = &mut *self;
        while !this.out.is_empty() {
            let mut slices = [IoSlice::new(&[]); MAX_SLICES];
            let mut n = 0;
            for f in &this.out {
                if n + 2 > MAX_SLICES {
                    break;
                }
                if f.start < f.len {
                    slices[n] = IoSlice::new(&f.head[usize::from(f.start)..usize::from(f.len)]);
                    n += 1;
                }
                if !f.payload.is_empty() {
                    slices[n] = IoSlice::new(&f.payload);
                    n += 1;
                }
            }
            let written = ready!(Pin::new(&mut this.io).poll_write_vectored(cx, &slices[..n]))?;
            if written == 0 {
                return Poll::Ready(Err(TransportError::Io(io::ErrorKind::WriteZero.into())));
            }
            let mut left = written;
            while left > 0 {
                let front = this.out.front_mut().expect("wrote more than was queued");
                let head_left = usize::from(front.len - front.start);
                if left < head_left {
                    front.start += left as u8;
                    break;
                }
                left -= head_left;
                front.start = front.len;
                if left < front.payload.len() {
                    front.payload.advance(left);
                    break;
                }
                left -= front.payload.len();
                this.out.pop_front();
            }
            // A frame whose header and payload are both written may still
            // be at the front (when `left` ran out exactly at its end).
            while this.out.front().is_some_and(|f| f.start == f.len && f.payload.is_empty()) {
                this.out.pop_front();
            }
        }
        // A burst grew the queue, or only control frames went out (the
        // connection is idle): do not keep the queue's memory.
        if this.out.capacity() > 256 || !std::mem::take(&mut this.data) {
            this.out = VecDeque::new();
        }
        ready!(Pin::new(&mut this.io).poll_flush(cx))?;
        Poll::Ready(Ok(()))
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), TransportError>> {
        ready!(self.as_mut().poll_flush(cx))?;
        ready!(Pin::new(&mut self.io).poll_shutdown(cx))?;
        Poll::Ready(Ok(()))
    }
}

/// Reading half of a [`WsTransport`].
pub struct WsStream {
    inner: FrameReader,
}

impl std::fmt::Debug for WsStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WsStream").finish_non_exhaustive()
    }
}

impl Stream for WsStream {
    type Item = Result<Frame, TransportError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.inner.poll_frame(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::CloseCode;

    #[test]
    fn headers_for_each_length_class() {
        let h = |op, len| {
            let (head, n) = header(op, len);
            head[..usize::from(n)].to_vec()
        };
        assert_eq!(h(OP_TEXT, 5), [0x81, 5]);
        assert_eq!(h(OP_BINARY, 126), [0x82, 126, 0, 126]);
        assert_eq!(h(OP_TEXT, 70_000), [0x81, 127, 0, 0, 0, 0, 0, 1, 0x11, 0x70]);
    }

    /// A socket that takes at most `step` bytes per write, across slices.
    struct Trickle {
        got: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
        step: usize,
    }

    impl AsyncWrite for Trickle {
        fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
            let n = buf.len().min(self.step);
            self.got.lock().unwrap().extend_from_slice(&buf[..n]);
            Poll::Ready(Ok(n))
        }

        fn poll_write_vectored(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let mut left = self.step;
            let mut got = self.got.lock().unwrap();
            for b in bufs {
                let n = b.len().min(left);
                got.extend_from_slice(&b[..n]);
                left -= n;
                if left == 0 {
                    break;
                }
            }
            Poll::Ready(Ok(self.step - left))
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// Partial writes that stop inside headers and payloads, for every
    /// write size: the bytes on the wire are exactly the frames, in order.
    #[test]
    fn partial_writes_resume_exactly() {
        use futures::SinkExt;
        let frames = || {
            vec![
                Frame::Text(Bytes::from_static(b"hello")),
                Frame::Ping(Bytes::new()),
                Frame::Binary(Bytes::from(vec![7u8; 300])),
                Frame::Text(Bytes::from_static(b"x")),
            ]
        };
        let mut expected = Vec::new();
        for f in frames() {
            let (op, p) = match f {
                Frame::Text(p) => (OP_TEXT, p),
                Frame::Binary(p) => (OP_BINARY, p),
                Frame::Ping(p) => (OP_PING, p),
                _ => unreachable!(),
            };
            let (head, n) = header(op, p.len());
            expected.extend_from_slice(&head[..usize::from(n)]);
            expected.extend_from_slice(&p);
        }
        for step in [1, 2, 3, 5, 7, 64, 1000] {
            let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
            let io = Box::new(Trickle { got: got.clone(), step });
            let mut sink = WsSink { io, out: VecDeque::new(), data: false, framed: false, deflate: None };
            futures::executor::block_on(async {
                for f in frames() {
                    sink.feed(f).await.unwrap();
                }
                sink.flush().await.unwrap();
            });
            assert_eq!(*got.lock().unwrap(), expected, "write size {step}");
            assert!(sink.out.is_empty());
        }
    }

    /// A framed sink ([`Framing::WebSocket`]) writes data frames as they come
    /// (the hub framed them once for every recipient) and still frames
    /// control frames itself.
    #[test]
    fn a_framed_sink_writes_data_frames_unchanged() {
        use futures::SinkExt;
        let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let io = Box::new(Trickle { got: got.clone(), step: 1000 });
        let mut sink = WsSink { io, out: VecDeque::new(), data: false, framed: true, deflate: None };
        let text = Framing::WebSocket.frame(false, b"hello");
        let binary = Framing::WebSocket.frame(true, &[7u8; 300]);
        futures::executor::block_on(async {
            sink.feed(Frame::Text(text.clone())).await.unwrap();
            sink.feed(Frame::Ping(Bytes::new())).await.unwrap();
            sink.feed(Frame::Binary(binary.clone())).await.unwrap();
            sink.flush().await.unwrap();
        });
        let mut expected = vec![0x81, 5];
        expected.extend_from_slice(b"hello");
        expected.extend_from_slice(&[0x89, 0]);
        expected.extend_from_slice(&[0x82, 126, 1, 44]);
        expected.extend_from_slice(&[7u8; 300]);
        assert_eq!(*got.lock().unwrap(), expected);
    }

    #[test]
    fn close_reason_is_cut_at_a_char_boundary() {
        let reason = "é".repeat(100); // 200 bytes
        let p = close_payload(Some(CloseFrame { code: CloseCode(4000), reason }));
        assert!(p.len() <= 125);
        assert_eq!(&p[..2], [0x0f, 0xa0]);
        assert!(std::str::from_utf8(&p[2..]).is_ok());
    }
}
