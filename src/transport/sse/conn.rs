//! One SSE session as a [`Transport`]: the sink writes events into the HTTP
//! response body, the stream yields what POSTs bring in. It moves frames
//! and knows nothing of envelopes: the session names each event, frames it
//! ([`Framing::EventStream`]) once per broadcast, joins the stream's rooms
//! and writes the stream's `id:` lines (`hub/session/sse_stream`).
//!
//! ```text
//!  session writer ──► SseSink ──(hand-off list)──► SseBody ──► hyper ──► client
//!  session reader ◄── SseStream ◄── inbound queue ◄── POST (this node, or
//!                                                      forwarded over the backplane)
//! ```
//!
//! The sink hands the body buffers, not copies: an event the session framed
//! once per broadcast reaches the body as that same `Bytes` (issue 21).
//! When hyper asks for a chunk, the body gathers every small buffer handed
//! over into one chunk (one chunk header and one body poll for the lot, as
//! a minimal hyper SSE server does), and passes a large one on by itself.
//! The copy thus happens once, when the socket can take it, not when the
//! writer runs ahead of a slow socket (a burst's backlog was a private copy
//! per stream: 213 MiB at 1,000 streams against 49 MiB).
//!
//! Bounds: the hand-off list holds at most [`HANDOFF_MAX`] bytes of events
//! (what the session's writer fed between flushes, itself bounded by the
//! hub's outbound queue and cut at [`FLUSH_AT`] bytes); when hyper stops
//! taking them (a slow reader), the writer waits, the session's outbound
//! queue fills and the hub's overflow policy applies. The inbound queue holds
//! [`SseConfig::inbound_capacity`](crate::integration::sse::SseConfig::inbound_capacity)
//! frames; a POST that does not fit is refused with 429. It is a list in
//! [`Shared`], allocated when a POST brings something and given back once
//! the reader took it: most streams never POST, and a bounded channel cost
//! each one about 1.5 KB while idle (issue 21).

use super::encode::Batch;
use crate::protocol::CloseCode;
use crate::transport::event_stream::STOP_ID;
use crate::transport::{Capabilities, Frame, Framing, Transport, TransportError};
use bytes::Bytes;
use bytes::{BufMut, BytesMut};
use futures::task::AtomicWaker;
use futures::{Sink, Stream};
use parking_lot::Mutex;
use std::collections::VecDeque;
use std::fmt;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

/// A batch this large is handed to the body before more is fed, so the
/// sink never holds much more than this on top of the hub's queue.
pub(crate) const FLUSH_AT: usize = 64 * 1024;

/// The sink waits while the body has this many bytes handed over and not
/// yet given to hyper (two batches cut at [`FLUSH_AT`], as the bounded
/// channel this replaced held).
pub(crate) const HANDOFF_MAX: usize = 2 * FLUSH_AT;

/// The most bytes the body gathers into one chunk.
const CHUNK_MAX: usize = 64 * 1024;

/// A buffer this large goes to hyper by itself rather than copied into a
/// gathered chunk (hyper writes its chunks with one vectored write).
const GATHER_BELOW: usize = 1024;

/// What the sink handed to the body and hyper has not taken yet.
#[derive(Debug, Default)]
struct Handoff {
    /// Buffers in write order; `chunks[head..]` are still to go.
    chunks: Vec<Bytes>,
    head: usize,
    /// Bytes in `chunks[head..]`.
    bytes: usize,
    /// The sink is waiting for `bytes` to fall below [`HANDOFF_MAX`].
    sink_waits: bool,
    /// The sink is gone or wrote its close event: the body ends once the
    /// list is empty.
    ended: bool,
}

/// State shared by the halves of one SSE session, the response body, the
/// endpoint's registry (POST delivery) and its keep-alive task.
pub(crate) struct Shared {
    pub(crate) key: u64,
    pub(crate) secret: [u8; 16],
    /// POSTed frames for the reader, at most `inbound_capacity`
    /// ([`Shared::post`] keeps a POST all-or-nothing). Locked to move
    /// frames in or out, never across an await.
    inbox: Mutex<Inbox>,
    inbound_capacity: usize,
    /// The sink's buffers on their way to the body. Locked once per flush
    /// by the sink and once per chunk by the body, to move buffer handles
    /// (and, the body, to gather small ones); never across an await.
    out: Mutex<Handoff>,
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
    /// A stream's state; its inbound queue takes `inbound_capacity` frames.
    pub(crate) fn new(key: u64, secret: [u8; 16], inbound_capacity: usize) -> Shared {
        Shared {
            key,
            secret,
            inbox: Mutex::new(Inbox::default()),
            inbound_capacity,
            out: Mutex::new(Handoff::default()),
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

    /// Queues a POST's frames for the session's reader: all of them, or
    /// none when they do not fit.
    pub(crate) fn post(&self, frames: Vec<Frame>) -> Posted {
        let mut inbox = self.inbox.lock();
        if inbox.closed {
            return Posted::Closed;
        }
        if inbox.frames.len() + frames.len() > self.inbound_capacity {
            return Posted::Full;
        }
        inbox.frames.extend(frames);
        drop(inbox);
        self.reader.wake();
        Posted::Queued
    }

    /// Whether `secret` is this session's, in time independent of where
    /// they differ.
    pub(crate) fn secret_matches(&self, secret: &[u8]) -> bool {
        secret.len() == self.secret.len()
            && secret.iter().zip(self.secret.iter()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    }
}

/// The inbound queue (see [`Shared::post`]).
#[derive(Debug, Default)]
struct Inbox {
    frames: VecDeque<Frame>,
    /// The reader is gone: nothing more is queued.
    closed: bool,
}

/// What [`Shared::post`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Posted {
    Queued,
    /// Not queued: the queue has no room for them all.
    Full,
    /// Not queued: the session's reader is gone.
    Closed,
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
    /// The transport of the stream whose body is `shared`'s (see
    /// [`StreamBody::new`]).
    pub(crate) fn new(shared: Arc<Shared>, close: CloseRetry, on_drop: Box<dyn FnOnce() + Send>) -> SseTransport {
        SseTransport {
            sink: SseSink {
                open: true,
                batch: Batch::default(),
                shared: shared.clone(),
                framed: false,
                close,
                closed: false,
            },
            stream: SseStream { shared, on_drop: Some(on_drop), reported_dead: false },
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
    /// The body may still be handed buffers (false after the close event
    /// or `poll_close`).
    open: bool,
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

    /// Hands the batch to the body; `Pending` while the body holds
    /// [`HANDOFF_MAX`] bytes or more.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), TransportError>> {
        if self.batch.is_empty() {
            return Poll::Ready(Ok(()));
        }
        if !self.open {
            return Poll::Ready(Err(TransportError::Closed));
        }
        self.shared.sink.register(cx.waker());
        if self.shared.body_gone.load(Ordering::Acquire) || self.shared.dead.load(Ordering::Acquire) {
            return Poll::Ready(Err(TransportError::Closed));
        }
        {
            let mut out = self.shared.out.lock();
            if out.bytes >= HANDOFF_MAX {
                // The body wakes the sink once it has given hyper enough.
                out.sink_waits = true;
                return Poll::Pending;
            }
            if out.head == out.chunks.len() {
                out.chunks.clear();
                out.head = 0;
            }
            out.bytes += self.batch.move_into(&mut out.chunks);
        }
        self.shared.body.wake();
        Poll::Ready(Ok(()))
    }

    /// No more buffers for the body: it ends after what it holds.
    fn end_body(&mut self) {
        if std::mem::replace(&mut self.open, false) {
            self.shared.out.lock().ended = true;
            self.shared.body.wake();
        }
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
            Frame::Text(bytes) if this.framed => this.batch.framed(bytes),
            Frame::Text(bytes) => this.batch.event(None, None, &bytes),
            // SSE sessions speak JSON only; a binary frame cannot happen.
            Frame::Binary(_) => {}
            Frame::Ping(_) => {
                if this.batch.is_empty() {
                    // A heartbeat with no data since the last flush: the
                    // stream is idle, so the batch gives back what a burst
                    // grew (as the hub's outbound queue does).
                    this.batch.shrink();
                }
                this.batch.comment("ping");
            }
            Frame::Pong(_) => {}
            Frame::Close(frame) => this.close_event(frame),
        }
        Ok(())
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), TransportError>> {
        let this = self.get_mut();
        if !this.open {
            return Poll::Ready(if this.batch.is_empty() { Ok(()) } else { Err(TransportError::Closed) });
        }
        std::task::ready!(this.poll_send(cx))?;
        if this.closed {
            // The close event is out: end the body and let the reader end
            // (there is no close frame to wait for).
            this.end_body();
            this.shared.sink_closed.store(true, Ordering::Release);
            this.shared.reader.wake();
        }
        Poll::Ready(Ok(()))
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), TransportError>> {
        std::task::ready!(self.as_mut().poll_flush(cx))?;
        self.end_body();
        Poll::Ready(Ok(()))
    }
}

impl Drop for SseSink {
    fn drop(&mut self) {
        // As a dropped channel sender ends its receiver: the body ends.
        self.end_body();
    }
}

/// The reading half: POSTed envelopes.
pub struct SseStream {
    shared: Arc<Shared>,
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
        // POSTs racing the registry's removal are refused, not lost.
        let mut inbox = self.shared.inbox.lock();
        inbox.closed = true;
        inbox.frames = VecDeque::new();
        drop(inbox);
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
        let mut inbox = shared.inbox.lock();
        match inbox.frames.pop_front() {
            Some(f) => {
                if inbox.frames.is_empty() {
                    // POSTs are rare: an idle stream holds no queue.
                    inbox.frames = VecDeque::new();
                }
                Poll::Ready(Some(Ok(f)))
            }
            // The waker was registered above: a POST after this wakes it.
            None => Poll::Pending,
        }
    }
}

/// The body of a stream response: the opening events, then what the sink
/// hands over (small buffers gathered into one chunk per poll), with
/// keep-alive comments when idle.
pub(crate) struct StreamBody {
    pub(crate) first: Option<Bytes>,
    shared: Arc<Shared>,
}

impl StreamBody {
    /// The body of the stream whose state is `shared` (its sink is the
    /// [`SseTransport`] made with the same `shared`), starting with `first`.
    pub(crate) fn new(first: Bytes, shared: Arc<Shared>) -> StreamBody {
        StreamBody { first: Some(first), shared }
    }

    pub(crate) fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<Option<Bytes>> {
        if let Some(b) = self.first.take() {
            return Poll::Ready(Some(b));
        }
        let shared = &*self.shared;
        let mut out = shared.out.lock();
        if out.head == out.chunks.len() {
            if out.ended {
                return Poll::Ready(None);
            }
            // Registered under the lock the sink hands over under: a
            // hand-off after this wakes this poll.
            shared.body.register(cx.waker());
            if shared.keepalive.swap(0, Ordering::AcqRel) > 0 {
                // Idle for half a keep-alive period: give back the list a
                // burst grew, and keep the connection warm.
                out.chunks = Vec::new();
                out.head = 0;
                drop(out);
                shared.wrote.store(true, Ordering::Release);
                return Poll::Ready(Some(Bytes::from_static(b": keep-alive\n\n")));
            }
            return Poll::Pending;
        }
        let chunk = gather(&mut out);
        let wake_sink = out.sink_waits && out.bytes < HANDOFF_MAX;
        if wake_sink {
            out.sink_waits = false;
        }
        drop(out);
        if wake_sink {
            shared.sink.wake();
        }
        shared.wrote.store(true, Ordering::Release);
        shared.keepalive.store(0, Ordering::Release);
        Poll::Ready(Some(chunk))
    }
}

/// The next chunk of the hand-off list (which is not empty): a large buffer
/// by itself, or the small ones in a row copied into one (at most
/// [`CHUNK_MAX`] bytes).
fn gather(out: &mut Handoff) -> Bytes {
    let start = out.head;
    let mut end = start;
    let mut len = 0;
    for b in &out.chunks[start..] {
        if b.len() >= GATHER_BELOW || len + b.len() > CHUNK_MAX {
            break;
        }
        len += b.len();
        end += 1;
    }
    let chunk = match end - start {
        // A large buffer first: passed on as it is.
        0 => {
            end = start + 1;
            std::mem::take(&mut out.chunks[start])
        }
        1 => std::mem::take(&mut out.chunks[start]),
        _ => {
            let mut buf = BytesMut::with_capacity(len);
            for b in &mut out.chunks[start..end] {
                buf.put_slice(b);
                // Released now, not when the list is next reused.
                *b = Bytes::new();
            }
            buf.freeze()
        }
    };
    out.bytes -= chunk.len();
    out.head = end;
    if out.head == out.chunks.len() {
        out.chunks.clear();
        out.head = 0;
    }
    chunk
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
    use futures::{FutureExt, SinkExt, StreamExt};

    /// What the body has ready, as a client reads it.
    fn text(body: &mut StreamBody) -> String {
        let mut out = Vec::new();
        while let Some(Some(chunk)) = futures::future::poll_fn(|cx| body.poll_chunk(cx)).now_or_never() {
            out.extend_from_slice(&chunk);
        }
        String::from_utf8(out).unwrap()
    }

    fn transport(framed: bool) -> (SseSink, SseStream, StreamBody) {
        let shared = Arc::new(Shared::new(1, [0; 16], 4));
        let body = StreamBody::new(Bytes::new(), shared.clone());
        let mut t = SseTransport::new(shared, CloseRetry { retry_ms: 1234 }, Box::new(|| {}));
        let caps = t.capabilities();
        assert!(caps.native_ping && !caps.bidirectional, "{caps:?}");
        assert_eq!(caps.framing, Some(Framing::EventStream));
        if framed {
            t.use_framing(Framing::EventStream);
        }
        let (sink, stream) = t.split();
        (sink, stream, body)
    }

    /// The sink alone (tier a): framed events as they come (an `id:` line
    /// with the event after it), unframed payloads as unnamed events, pings
    /// as comments, and the close.
    #[tokio::test]
    async fn events_pings_and_close() {
        let (mut sink, mut stream, mut body) = transport(true);
        sink.feed(Frame::Text(event_stream::event(None, Some("$hello"), b"{}"))).await.unwrap();
        sink.feed(Frame::Text(event_stream::id_field("s1.0").unwrap())).await.unwrap();
        sink.feed(Frame::Text(Framing::EventStream.frame_named(false, "tick", b"1"))).await.unwrap();
        sink.feed(Frame::Ping(Bytes::new())).await.unwrap();
        sink.flush().await.unwrap();
        let s = text(&mut body);
        let events = event_stream::parse(&s);
        assert_eq!(events, [("".into(), "$hello".into(), "{}".into()), ("s1.0".into(), "tick".into(), "1".into())]);
        assert!(s.ends_with(": ping\n\n"), "{s}");

        // A reconnectable close: retry, then $close; the reader ends.
        let close = CloseFrame { code: CloseCode::GOING_AWAY, reason: "bye".into() };
        sink.send(Frame::Close(Some(close))).await.unwrap();
        let s = text(&mut body);
        assert!(s.starts_with("retry: 1234\n\n"), "{s}");
        let events = event_stream::parse(&s);
        assert_eq!(events[0].1, "$close");
        assert_eq!(events[0].2, r#"{"code":1001,"reason":"bye","reconnect":true}"#);
        assert!(stream.next().await.is_none());
        assert_eq!(
            futures::future::poll_fn(|cx| body.poll_chunk(cx)).now_or_never(),
            Some(None),
            "the body ends after the close"
        );
        assert!(sink.feed(Frame::Text(Bytes::from_static(b"x"))).await.is_err(), "nothing after the close");
    }

    /// Without a session's framing, a text frame is the data of an unnamed
    /// event; a close that must not be retried carries the stop id.
    #[tokio::test]
    async fn unframed_payloads_and_a_final_close() {
        let (mut sink, _stream, mut body) = transport(false);
        sink.feed(Frame::Text(Bytes::from_static(b"a\nb"))).await.unwrap();
        let close = CloseFrame { code: CloseCode::POLICY, reason: "no".into() };
        sink.send(Frame::Close(Some(close))).await.unwrap();
        let events = event_stream::parse(&text(&mut body));
        assert_eq!(events[0], ("".into(), "message".into(), "a\nb".into()));
        assert_eq!(events[1].0, STOP_ID);
        assert!(events[1].2.contains("\"reconnect\":false"), "{events:?}");
    }

    /// The body gathers the small events handed over into one chunk and
    /// passes a large one on as the broadcast's own buffer; the sink waits
    /// while the body holds [`HANDOFF_MAX`] bytes and is woken when hyper
    /// took some.
    #[tokio::test]
    async fn body_gathers_small_events_and_bounds_the_sink() {
        let (mut sink, _stream, mut body) = transport(true);
        assert_eq!(futures::future::poll_fn(|cx| body.poll_chunk(cx)).await, Some(Bytes::new()), "the opening");
        let small: Vec<Bytes> =
            (0..3).map(|i| event_stream::event(None, Some("tick"), format!("{i}").as_bytes())).collect();
        let big = event_stream::event(None, Some("big"), "b".repeat(GATHER_BELOW).as_bytes());
        for b in small.iter().chain([&big]).chain(&small) {
            sink.feed(Frame::Text(b.clone())).await.unwrap();
        }
        sink.flush().await.unwrap();
        let mut next = || futures::future::poll_fn(|cx| body.poll_chunk(cx)).now_or_never().flatten();
        assert_eq!(next().unwrap(), small.concat(), "three events, one chunk");
        assert_eq!(next().unwrap().as_ptr(), big.as_ptr(), "the large event is not copied");
        assert_eq!(next().unwrap(), small.concat());
        assert_eq!(next(), None, "nothing more yet");

        // Bound: two flushes of FLUSH_AT fill the hand-off; the third waits.
        let event = event_stream::event(None, Some("e"), "x".repeat(FLUSH_AT / 8).as_bytes());
        async fn fill(sink: &mut SseSink, event: &Bytes) {
            for _ in 0..8 {
                sink.feed(Frame::Text(event.clone())).await.unwrap();
            }
            sink.flush().await.unwrap();
        }
        fill(&mut sink, &event).await;
        fill(&mut sink, &event).await;
        let mut third = Box::pin(fill(&mut sink, &event));
        assert!(futures::poll!(third.as_mut()).is_pending(), "the body holds HANDOFF_MAX bytes");
        assert_eq!(next().unwrap().len(), event.len(), "large events go one by one");
        third.await;
    }

    /// A POST is queued whole or not at all, and refused once the reader
    /// is gone.
    #[tokio::test]
    async fn posts_are_all_or_nothing() {
        let (_sink, mut stream, _body) = transport(true);
        let f = |s: &'static str| Frame::Text(Bytes::from_static(s.as_bytes()));
        let shared = stream.shared.clone();
        assert_eq!(shared.post(vec![f("a"), f("b"), f("c")]), Posted::Queued);
        assert_eq!(shared.post(vec![f("d"), f("e")]), Posted::Full, "4 frames fit, not 5");
        for want in ["a", "b", "c"] {
            assert_eq!(stream.next().await.unwrap().unwrap(), f(want));
        }
        assert_eq!(shared.post(vec![f("d"), f("e")]), Posted::Queued);
        assert_eq!(stream.next().await.unwrap().unwrap(), f("d"));
        drop(stream);
        assert_eq!(shared.post(vec![f("x")]), Posted::Closed);
    }

    #[test]
    fn secrets_compare_whole() {
        let s = Shared::new(1, [7; 16], 1);
        assert!(s.secret_matches(&[7; 16]));
        assert!(!s.secret_matches(&[7; 15]));
        let mut other = [7; 16];
        other[15] = 8;
        assert!(!s.secret_matches(&other));
    }
}
