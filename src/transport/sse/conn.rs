//! One SSE session as a [`Transport`]: the sink writes events into the HTTP
//! response body, the stream yields what POSTs bring in. It moves frames
//! and knows nothing of envelopes: the session names each event, frames it
//! ([`Framing::EventStream`]) once per broadcast, joins the stream's rooms
//! and writes the stream's `id:` lines (`hub/session/sse_stream`).
//!
//! ```text
//!  session writer ──► SseSink ──(≤ 2 batches)──► SseBody ──► hyper ──► client
//!  session reader ◄── SseStream ◄── inbound queue ◄── POST (this node, or
//!                                                      forwarded over the backplane)
//! ```
//!
//! Bounds: the body channel holds at most two batches (a batch is what the
//! session's writer fed between two flushes, itself bounded by the hub's
//! outbound queue, and cut at [`FLUSH_AT`] bytes); when hyper stops taking
//! them (a slow reader), the writer waits, the session's outbound queue
//! fills and the hub's overflow policy applies. The inbound queue holds
//! [`SseConfig::inbound_capacity`](crate::integration::sse::SseConfig::inbound_capacity)
//! frames; a POST that does not fit is refused with 429.

use super::encode::Batch;
use crate::protocol::CloseCode;
use crate::transport::event_stream::STOP_ID;
use crate::transport::{Capabilities, Frame, Framing, Transport, TransportError};
use bytes::Bytes;
use futures::channel::mpsc as fmpsc;
use futures::task::AtomicWaker;
use futures::{Sink, Stream, StreamExt};
use std::collections::VecDeque;
use std::fmt;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::sync::mpsc;

/// A batch this large is handed to the body before more is fed, so the
/// sink never holds much more than this on top of the hub's queue.
pub(crate) const FLUSH_AT: usize = 64 * 1024;

/// State shared by the halves of one SSE session, the response body, the
/// endpoint's registry (POST delivery) and its keep-alive task.
pub(crate) struct Shared {
    pub(crate) key: u64,
    pub(crate) secret: [u8; 16],
    /// POSTed frames for the reader. Bounded; `try_reserve_many` keeps a
    /// POST all-or-nothing.
    pub(crate) inbound: mpsc::Sender<Frame>,
    /// Wakes the reader half (body gone, sink closed, dead).
    reader: AtomicWaker,
    /// Wakes the body (keep-alive due).
    body: AtomicWaker,
    /// Wakes the sink while it waits for room in the body channel (the
    /// stream was found stuck: the write fails at once instead of waiting
    /// for the close timeout).
    sink: AtomicWaker,
    /// The response body was dropped: the client went away.
    body_gone: AtomicBool,
    /// The sink wrote the close event: the reader ends at once (there is no
    /// close frame to wait for).
    sink_closed: AtomicBool,
    /// The keep-alive task found the stream stuck past its keep-alive.
    dead: AtomicBool,
    /// Something went out since the keep-alive task last looked.
    pub(crate) wrote: AtomicBool,
    /// 0: nothing due; 1: a keep-alive comment is due; 2+: it has been due
    /// for that many ticks without the body being polled.
    pub(crate) keepalive: AtomicU8,
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shared").field("key", &self.key).finish_non_exhaustive()
    }
}

impl Shared {
    pub(crate) fn new(key: u64, secret: [u8; 16], inbound: mpsc::Sender<Frame>) -> Shared {
        Shared {
            key,
            secret,
            inbound,
            reader: AtomicWaker::new(),
            body: AtomicWaker::new(),
            sink: AtomicWaker::new(),
            body_gone: AtomicBool::new(false),
            sink_closed: AtomicBool::new(false),
            dead: AtomicBool::new(false),
            wrote: AtomicBool::new(true),
            keepalive: AtomicU8::new(0),
        }
    }

    /// Called by the keep-alive task every half keep-alive period: asks the
    /// body for a comment when nothing went out since the last look, and
    /// ends the session when one has been due for two looks (the body was
    /// not polled for a whole keep-alive period: the peer stopped reading).
    pub(crate) fn tick(&self) {
        if self.wrote.swap(false, Ordering::AcqRel) {
            self.keepalive.store(0, Ordering::Release);
            return;
        }
        let due = self.keepalive.fetch_add(1, Ordering::AcqRel).saturating_add(1);
        if due >= 3 {
            self.dead.store(true, Ordering::Release);
            self.reader.wake();
            self.sink.wake();
        } else {
            self.body.wake();
        }
    }

    /// Whether `secret` is this session's, in time independent of where
    /// they differ.
    pub(crate) fn secret_matches(&self, secret: &[u8]) -> bool {
        secret.len() == self.secret.len()
            && secret.iter().zip(self.secret.iter()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    }
}

/// How the sink writes closes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CloseRetry {
    /// `retry:` written before a reconnectable `$close` (jittered by the caller).
    pub(crate) retry_ms: u64,
}

/// The [`Transport`] of one SSE session, handed to
/// [`Hub::serve`](crate::Hub::serve) by the endpoint.
#[derive(Debug)]
pub struct SseTransport {
    sink: SseSink,
    stream: SseStream,
}

impl SseTransport {
    pub(crate) fn new(
        shared: Arc<Shared>,
        out: fmpsc::Sender<Vec<Bytes>>,
        inbound: mpsc::Receiver<Frame>,
        close: CloseRetry,
        on_drop: Box<dyn FnOnce() + Send>,
    ) -> SseTransport {
        SseTransport {
            sink: SseSink {
                tx: Some(out),
                batch: Batch::default(),
                shared: shared.clone(),
                framed: false,
                close,
                closed: false,
            },
            stream: SseStream { shared, inbound, on_drop: Some(on_drop), reported_dead: false },
        }
    }
}

impl Transport for SseTransport {
    type Sink = SseSink;
    type Stream = SseStream;

    fn name(&self) -> &'static str {
        "sse"
    }

    fn split(self) -> (SseSink, SseStream) {
        (self.sink, self.stream)
    }

    /// One-way with native pings: a heartbeat ping is written as a comment
    /// line, and the session counts a flushed one as the client's answer
    /// (the stream has no way back; a failed or stuck write is what shows
    /// a dead client). Text only. Data frames can come framed as events
    /// ([`Framing::EventStream`]); unframed, each is an unnamed event.
    fn capabilities(&self) -> Capabilities {
        Capabilities::default().with_bidirectional(false).with_binary(false).with_framing(Some(Framing::EventStream))
    }

    fn use_framing(&mut self, framing: Framing) {
        self.sink.framed = framing == Framing::EventStream;
    }
}

/// The writing half: frames become the response body's events.
pub struct SseSink {
    tx: Option<fmpsc::Sender<Vec<Bytes>>>,
    batch: Batch,
    shared: Arc<Shared>,
    /// Data frames come as event-stream bytes ([`Framing::EventStream`]),
    /// written as they are; otherwise each is the data of an unnamed event.
    framed: bool,
    close: CloseRetry,
    closed: bool,
}

impl fmt::Debug for SseSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SseSink").field("key", &self.shared.key).field("queued", &self.batch.len()).finish()
    }
}

impl SseSink {
    fn close_event(&mut self, frame: Option<crate::transport::CloseFrame>) {
        let (code, reason) = match frame {
            Some(f) => (f.code, f.reason),
            None => (CloseCode(1006), String::new()),
        };
        let reconnect = code.should_reconnect();
        if reconnect {
            self.batch.retry(self.close.retry_ms);
        }
        let data = serde_json::json!({ "code": code.0, "reason": reason, "reconnect": reconnect });
        let id = (!reconnect).then_some(STOP_ID);
        self.batch.event(id, Some("$close"), &Bytes::from(data.to_string()));
        self.closed = true;
    }

    /// Hands the batch to the body; `Pending` while the body channel is full.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), TransportError>> {
        if self.batch.is_empty() {
            return Poll::Ready(Ok(()));
        }
        let Some(tx) = self.tx.as_mut() else { return Poll::Ready(Err(TransportError::Closed)) };
        self.shared.sink.register(cx.waker());
        if self.shared.body_gone.load(Ordering::Acquire) || self.shared.dead.load(Ordering::Acquire) {
            return Poll::Ready(Err(TransportError::Closed));
        }
        match tx.poll_ready(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Err(_)) => return Poll::Ready(Err(TransportError::Closed)),
            Poll::Ready(Ok(())) => {}
        }
        tx.start_send(self.batch.take()).map_err(|_| TransportError::Closed)?;
        self.shared.body.wake();
        Poll::Ready(Ok(()))
    }
}

impl Sink<Frame> for SseSink {
    type Error = TransportError;

    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), TransportError>> {
        let this = self.get_mut();
        if this.closed {
            return Poll::Ready(Err(TransportError::Closed));
        }
        // Handed over only between two events: an `id:` line stays with
        // the event after it.
        if this.batch.len() >= FLUSH_AT && this.batch.at_boundary() {
            return this.poll_send(cx);
        }
        Poll::Ready(Ok(()))
    }

    fn start_send(self: Pin<&mut Self>, frame: Frame) -> Result<(), TransportError> {
        let this = self.get_mut();
        if this.closed {
            // After a `$close` the sink takes nothing more (the session's
            // own close frame included): the stream is over.
            return Err(TransportError::Closed);
        }
        match frame {
            Frame::Text(bytes) if this.framed => this.batch.framed(&bytes),
            Frame::Text(bytes) => this.batch.event(None, None, &bytes),
            // SSE sessions speak JSON only; a binary frame cannot happen.
            Frame::Binary(_) => {}
            Frame::Ping(_) => this.batch.comment("ping"),
            Frame::Pong(_) => {}
            Frame::Close(frame) => this.close_event(frame),
        }
        Ok(())
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), TransportError>> {
        let this = self.get_mut();
        if this.tx.is_none() {
            return Poll::Ready(if this.batch.is_empty() { Ok(()) } else { Err(TransportError::Closed) });
        }
        std::task::ready!(this.poll_send(cx))?;
        if this.closed {
            // The close event is out: end the body and let the reader end
            // (there is no close frame to wait for).
            this.tx = None;
            this.shared.sink_closed.store(true, Ordering::Release);
            this.shared.reader.wake();
        }
        Poll::Ready(Ok(()))
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), TransportError>> {
        std::task::ready!(self.as_mut().poll_flush(cx))?;
        self.tx = None;
        Poll::Ready(Ok(()))
    }
}

/// The reading half: POSTed envelopes.
pub struct SseStream {
    shared: Arc<Shared>,
    inbound: mpsc::Receiver<Frame>,
    on_drop: Option<Box<dyn FnOnce() + Send>>,
    reported_dead: bool,
}

impl fmt::Debug for SseStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SseStream").field("key", &self.shared.key).finish()
    }
}

impl Drop for SseStream {
    fn drop(&mut self) {
        if let Some(f) = self.on_drop.take() {
            f();
        }
    }
}

impl Stream for SseStream {
    type Item = Result<Frame, TransportError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        let shared = &this.shared;
        // Register first, then look: a wake between the two is not lost.
        shared.reader.register(cx.waker());
        if shared.dead.load(Ordering::Acquire) {
            if !this.reported_dead {
                this.reported_dead = true;
                let e = std::io::Error::new(std::io::ErrorKind::TimedOut, "event stream stuck past its keep-alive");
                return Poll::Ready(Some(Err(TransportError::Io(e))));
            }
            return Poll::Ready(None);
        }
        if shared.sink_closed.load(Ordering::Acquire) || shared.body_gone.load(Ordering::Acquire) {
            return Poll::Ready(None);
        }
        match this.inbound.poll_recv(cx) {
            Poll::Ready(Some(f)) => Poll::Ready(Some(Ok(f))),
            // The registry holds a sender while the session lives.
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// The body of a stream response: the opening events, then what the sink
/// hands over, with keep-alive comments when idle.
pub(crate) struct StreamBody {
    pub(crate) first: Option<Bytes>,
    queued: VecDeque<Bytes>,
    rx: fmpsc::Receiver<Vec<Bytes>>,
    shared: Arc<Shared>,
    ended: bool,
}

impl StreamBody {
    pub(crate) fn new(first: Bytes, rx: fmpsc::Receiver<Vec<Bytes>>, shared: Arc<Shared>) -> StreamBody {
        StreamBody { first: Some(first), queued: VecDeque::new(), rx, shared, ended: false }
    }

    pub(crate) fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<Option<Bytes>> {
        if let Some(b) = self.first.take() {
            return Poll::Ready(Some(b));
        }
        loop {
            if let Some(b) = self.queued.pop_front() {
                self.shared.wrote.store(true, Ordering::Release);
                self.shared.keepalive.store(0, Ordering::Release);
                return Poll::Ready(Some(b));
            }
            if self.ended {
                return Poll::Ready(None);
            }
            self.shared.body.register(cx.waker());
            match self.rx.poll_next_unpin(cx) {
                Poll::Ready(Some(batch)) => self.queued.extend(batch),
                Poll::Ready(None) => {
                    self.ended = true;
                    return Poll::Ready(None);
                }
                Poll::Pending => {
                    if self.shared.keepalive.swap(0, Ordering::AcqRel) > 0 {
                        self.shared.wrote.store(true, Ordering::Release);
                        return Poll::Ready(Some(Bytes::from_static(b": keep-alive\n\n")));
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}

impl Drop for StreamBody {
    fn drop(&mut self) {
        self.shared.body_gone.store(true, Ordering::Release);
        self.shared.reader.wake();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::{event_stream, CloseFrame};
    use futures::{FutureExt, SinkExt};

    fn text(rx: &mut fmpsc::Receiver<Vec<Bytes>>) -> String {
        let mut out = Vec::new();
        while let Some(Some(batch)) = rx.next().now_or_never() {
            out.extend(batch.concat());
        }
        String::from_utf8(out).unwrap()
    }

    fn transport(framed: bool) -> (SseSink, SseStream, fmpsc::Receiver<Vec<Bytes>>) {
        let (in_tx, in_rx) = mpsc::channel(4);
        let shared = Arc::new(Shared::new(1, [0; 16], in_tx));
        let (out_tx, out_rx) = fmpsc::channel(8);
        let mut t = SseTransport::new(shared, out_tx, in_rx, CloseRetry { retry_ms: 1234 }, Box::new(|| {}));
        let caps = t.capabilities();
        assert!(caps.native_ping && !caps.bidirectional, "{caps:?}");
        assert_eq!(caps.framing, Some(Framing::EventStream));
        if framed {
            t.use_framing(Framing::EventStream);
        }
        let (sink, stream) = t.split();
        (sink, stream, out_rx)
    }

    /// The sink alone (tier a): framed events as they come (an `id:` line
    /// with the event after it), unframed payloads as unnamed events, pings
    /// as comments, and the close.
    #[tokio::test]
    async fn events_pings_and_close() {
        let (mut sink, mut stream, mut out_rx) = transport(true);
        sink.feed(Frame::Text(event_stream::event(None, Some("$hello"), b"{}"))).await.unwrap();
        sink.feed(Frame::Text(event_stream::id_field("s1.0").unwrap())).await.unwrap();
        sink.feed(Frame::Text(Framing::EventStream.frame_named(false, "tick", b"1"))).await.unwrap();
        sink.feed(Frame::Ping(Bytes::new())).await.unwrap();
        sink.flush().await.unwrap();
        let s = text(&mut out_rx);
        let events = event_stream::parse(&s);
        assert_eq!(events, [("".into(), "$hello".into(), "{}".into()), ("s1.0".into(), "tick".into(), "1".into())]);
        assert!(s.ends_with(": ping\n\n"), "{s}");

        // A reconnectable close: retry, then $close; the reader ends.
        let close = CloseFrame { code: CloseCode::GOING_AWAY, reason: "bye".into() };
        sink.send(Frame::Close(Some(close))).await.unwrap();
        let s = text(&mut out_rx);
        assert!(s.starts_with("retry: 1234\n\n"), "{s}");
        let events = event_stream::parse(&s);
        assert_eq!(events[0].1, "$close");
        assert_eq!(events[0].2, r#"{"code":1001,"reason":"bye","reconnect":true}"#);
        assert!(stream.next().await.is_none());
        assert_eq!(out_rx.next().now_or_never(), Some(None), "the body ends after the close");
        assert!(sink.feed(Frame::Text(Bytes::from_static(b"x"))).await.is_err(), "nothing after the close");
    }

    /// Without a session's framing, a text frame is the data of an unnamed
    /// event; a close that must not be retried carries the stop id.
    #[tokio::test]
    async fn unframed_payloads_and_a_final_close() {
        let (mut sink, _stream, mut out_rx) = transport(false);
        sink.feed(Frame::Text(Bytes::from_static(b"a\nb"))).await.unwrap();
        let close = CloseFrame { code: CloseCode::POLICY, reason: "no".into() };
        sink.send(Frame::Close(Some(close))).await.unwrap();
        let events = event_stream::parse(&text(&mut out_rx));
        assert_eq!(events[0], ("".into(), "message".into(), "a\nb".into()));
        assert_eq!(events[1].0, STOP_ID);
        assert!(events[1].2.contains("\"reconnect\":false"), "{events:?}");
    }

    #[test]
    fn secrets_compare_whole() {
        let (tx, _rx) = mpsc::channel(1);
        let s = Shared::new(1, [7; 16], tx);
        assert!(s.secret_matches(&[7; 16]));
        assert!(!s.secret_matches(&[7; 15]));
        let mut other = [7; 16];
        other[15] = 8;
        assert!(!s.secret_matches(&other));
    }
}
