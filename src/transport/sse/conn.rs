//! One SSE session as a [`Transport`]: the sink writes events into the HTTP
//! response body, the stream yields what POSTs (and the stream's own room
//! joins) bring in.
//!
//! ```text
//!  session writer ──► SseSink ──(≤ 2 batches)──► SseBody ──► hyper ──► client
//!  session reader ◄── SseStream ◄── joins of the stream's rooms (first)
//!                                ◄── inbound queue ◄── POST (this node, or
//!                                                       forwarded over the backplane)
//! ```
//!
//! Bounds: the body channel holds at most two batches (a batch is what the
//! session's writer fed between two flushes, itself bounded by the hub's
//! outbound queue, and cut at [`FLUSH_AT`] bytes); when hyper stops taking
//! them (a slow reader), the writer waits, the session's outbound queue
//! fills and the hub's overflow policy applies. The inbound queue holds
//! [`SseConfig::inbound_capacity`](super::SseConfig::inbound_capacity)
//! frames; a POST that does not fit is refused with 429.

use super::encode::Batch;
use super::resume::{self, Position};
use crate::protocol::CloseCode;
use crate::transport::{Capabilities, Frame, Transport, TransportError};
use bytes::Bytes;
use futures::channel::mpsc as fmpsc;
use futures::task::AtomicWaker;
use futures::{Sink, Stream, StreamExt};
use serde::Deserialize;
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::collections::VecDeque;
use std::fmt;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::sync::mpsc;

/// A batch this large is handed to the body before more is fed, so the
/// sink never holds much more than this on top of the hub's queue.
pub(crate) const FLUSH_AT: usize = 64 * 1024;

/// Refs at and above this are the stream's own joins (their replies become
/// `$joined` / `$join_error` events). Clients keep their refs below it.
pub(crate) const STREAM_REF_BASE: u64 = 1 << 63;

/// Joins of the stream's rooms in flight at once (below the hub's default
/// in-flight limit of 16, so a stream of many rooms never gets a 429).
const JOINS_IN_FLIGHT: usize = 8;

/// State shared by the halves of one SSE session, the response body, the
/// endpoint's registry (POST delivery) and its keep-alive task.
pub(crate) struct Shared {
    pub(crate) key: u64,
    pub(crate) secret: [u8; 16],
    /// POSTed frames for the reader. Bounded; `try_reserve_many` keeps a
    /// POST all-or-nothing.
    pub(crate) inbound: mpsc::Sender<Frame>,
    /// Wakes the reader half (joins answered, body gone, dead).
    reader: AtomicWaker,
    /// Wakes the body (keep-alive due).
    body: AtomicWaker,
    /// Wakes the sink while it waits for room in the body channel (the
    /// stream was found stuck: the write fails at once instead of waiting
    /// for the close timeout).
    sink: AtomicWaker,
    joins_in_flight: AtomicUsize,
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
            joins_in_flight: AtomicUsize::new(0),
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

/// The stream's rooms: joined when it opens, and described by its ids.
#[derive(Debug, Clone, Default)]
pub(crate) struct StreamRooms {
    pub(crate) names: Vec<Arc<str>>,
    pub(crate) fingerprint: u32,
    /// Whether the stream's join of each room asked to recover from a
    /// position (`Last-Event-ID`): a reply with `recovered: false` then
    /// gets a `$resync`.
    pub(crate) recovering: Vec<bool>,
    /// Known positions at the start (from `Last-Event-ID`).
    pub(crate) positions: Vec<Option<Position>>,
}

/// How the sink writes closes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CloseRetry {
    /// `retry:` written before a reconnectable `$close` (jittered by the caller).
    pub(crate) retry_ms: u64,
    /// End the stream (reconnect code 4002) when a stream room reports a
    /// `gap`, so the browser's reconnect recovers it from `Last-Event-ID`.
    pub(crate) reconnect_on_gap: bool,
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
        joins: VecDeque<Frame>,
        rooms: StreamRooms,
        close: CloseRetry,
        on_drop: Box<dyn FnOnce() + Send>,
    ) -> SseTransport {
        let positions = rooms.positions.clone();
        let offsets = positions.iter().map(|p| p.as_ref().map(|p| p.offset)).collect();
        let epochs = positions.iter().map(|p| p.as_ref().map(|p| p.epoch.clone())).collect();
        SseTransport {
            sink: SseSink {
                tx: Some(out),
                batch: Batch::default(),
                shared: shared.clone(),
                rooms,
                offsets,
                epochs,
                close,
                closed: false,
            },
            stream: SseStream { shared, inbound, joins, on_drop: Some(on_drop), reported_dead: false },
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
    /// a dead client). Data frames are payloads (JSON envelopes).
    fn capabilities(&self) -> Capabilities {
        Capabilities::default().with_bidirectional(false)
    }
}

/// The writing half: envelopes become SSE events in the response body.
pub struct SseSink {
    tx: Option<fmpsc::Sender<Vec<Bytes>>>,
    batch: Batch,
    shared: Arc<Shared>,
    rooms: StreamRooms,
    offsets: Vec<Option<u64>>,
    epochs: Vec<Option<String>>,
    close: CloseRetry,
    closed: bool,
}

impl fmt::Debug for SseSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SseSink").field("key", &self.shared.key).field("queued", &self.batch.len()).finish()
    }
}

/// The head of an outbound envelope: what decides its SSE event name and id.
#[derive(Deserialize)]
struct Head<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
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
    #[serde(default)]
    offset: Option<u64>,
    #[serde(borrow, default)]
    epoch: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
}

/// Where the `,"data":` of an envelope written by the hub's JSON encoder
/// starts: the encoder writes `data` last and every key before it holds a
/// scalar, so the head ends at the first `,"data":` met outside a string
/// before any `{` or `[`. `None` when the frame does not look like that
/// (it is then parsed whole).
fn data_start(b: &[u8]) -> Option<usize> {
    if b.first() != Some(&b'{') {
        return None;
    }
    let mut i = 1;
    let mut in_string = false;
    while i < b.len() {
        let c = b[i];
        if in_string {
            match c {
                b'\\' => i += 1,
                b'"' => in_string = false,
                _ => {}
            }
        } else {
            match c {
                b'"' => in_string = true,
                b'{' | b'[' => return None,
                b',' if b[i..].starts_with(b",\"data\":") => return Some(i),
                _ => {}
            }
        }
        i += 1;
    }
    None
}

/// The `data` of a join reply (with history: epoch, offset, recovered).
#[derive(Deserialize)]
struct JoinReply<'a> {
    #[serde(default)]
    offset: Option<u64>,
    #[serde(borrow, default)]
    epoch: Option<Cow<'a, str>>,
    #[serde(default)]
    recovered: Option<bool>,
}

impl SseSink {
    fn index_of(&self, room: &str) -> Option<usize> {
        self.rooms.names.iter().position(|r| &**r == room)
    }

    fn id(&self) -> String {
        let positions: Vec<Option<Position>> = self
            .offsets
            .iter()
            .zip(&self.epochs)
            .map(|(o, e)| match (o, e) {
                (Some(offset), Some(epoch)) => Some(Position { offset: *offset, epoch: epoch.clone() }),
                _ => None,
            })
            .collect();
        resume::encode(self.rooms.fingerprint, &positions)
    }

    fn envelope(&mut self, bytes: Bytes) {
        // Parse only the envelope's head when the payload comes last (as
        // the hub writes it): a broadcast's payload is not scanned once per
        // stream. The stack buffer avoids an allocation per delivery.
        let mut stack = [0u8; 512];
        let owned: Vec<u8>;
        let (src, whole): (&[u8], bool) = match data_start(&bytes) {
            Some(i) if i < stack.len() => {
                stack[..i].copy_from_slice(&bytes[..i]);
                stack[i] = b'}';
                (&stack[..=i], false)
            }
            Some(i) => {
                owned = [&bytes[..i], b"}"].concat();
                (&owned, false)
            }
            None => (&bytes, true),
        };
        let mut head = match serde_json::from_slice::<Head<'_>>(src) {
            Ok(h) => h,
            Err(_) => {
                // Never produced by the hub; still framed safely.
                self.batch.event(None, None, &bytes);
                return;
            }
        };
        let needs_data =
            head.kind == "gap" || (head.reference.is_some_and(|r| r >= STREAM_REF_BASE) && head.kind != "event");
        if needs_data && !whole {
            match serde_json::from_slice::<Head<'_>>(&bytes) {
                Ok(h) => head = h,
                Err(_) => {
                    self.batch.event(None, None, &bytes);
                    return;
                }
            }
        }
        match &*head.kind {
            "event" => {
                let name = head.event.as_deref().unwrap_or("");
                let name = if name.is_empty() || name.starts_with('$') || !super::encode::is_field_safe(name) {
                    "$event"
                } else {
                    name
                };
                let mut id = None;
                if let (Some(room), Some(offset)) = (head.room.as_deref(), head.offset) {
                    if let Some(i) = self.index_of(room) {
                        // Positions only move forward: a rewind replays
                        // older events after the join reply, and the id
                        // must not send a reconnect back before them.
                        if let Some(e) = head.epoch.as_deref() {
                            if self.epochs[i].as_deref() != Some(e) {
                                self.epochs[i] = Some(e.to_owned());
                                self.offsets[i] = None;
                            }
                        }
                        self.offsets[i] = Some(self.offsets[i].map_or(offset, |o| o.max(offset)));
                        id = Some(self.id());
                    }
                }
                let name = name.to_owned();
                self.batch.event(id.as_deref(), Some(&name), &bytes);
            }
            "reply" | "error" if head.reference.is_some_and(|r| r >= STREAM_REF_BASE) => {
                let index = (head.reference.unwrap_or(0) - STREAM_REF_BASE) as usize;
                let Some(room) = self.rooms.names.get(index).cloned() else { return };
                let _ =
                    self.shared.joins_in_flight.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
                self.shared.reader.wake();
                if head.kind == "error" {
                    let data = serde_json::json!({
                        "room": &*room,
                        "code": head.code,
                        "message": head.message.as_deref().unwrap_or(""),
                    });
                    self.batch.event(None, Some("$join_error"), &Bytes::from(data.to_string()));
                    return;
                }
                let reply = head.data.and_then(|d| serde_json::from_str::<JoinReply<'_>>(d.get()).ok());
                let mut recovered = None;
                if let Some(r) = &reply {
                    recovered = r.recovered;
                    // The reply's offset is where the live stream starts,
                    // *after* the replayed events that follow it. On a
                    // recovery the position stays the one asked for, and
                    // the replayed events move it: a stream that drops
                    // mid-replay resumes from the last one delivered.
                    let keep = recovered == Some(true) && self.offsets[index].is_some() && self.epochs[index].is_some();
                    if !keep {
                        if let Some(e) = &r.epoch {
                            self.epochs[index] = Some(e.clone().into_owned());
                        }
                        if let Some(o) = r.offset {
                            self.offsets[index] = Some(o);
                        }
                    }
                }
                let data = match head.data {
                    Some(d) if d.get().starts_with('{') => Bytes::copy_from_slice(d.get().as_bytes()),
                    _ => Bytes::from(serde_json::json!({ "room": &*room }).to_string()),
                };
                let known = self.offsets[index].is_some() && self.epochs[index].is_some();
                let id = known.then(|| self.id());
                self.batch.event(id.as_deref(), Some("$joined"), &data);
                if self.rooms.recovering.get(index).copied().unwrap_or(false) && recovered != Some(true) {
                    let reason = if recovered == Some(false) {
                        "the events missed are no longer in history"
                    } else {
                        "this room keeps no history"
                    };
                    let data = serde_json::json!({ "room": &*room, "reason": reason });
                    self.batch.event(None, Some("$resync"), &Bytes::from(data.to_string()));
                }
            }
            "gap" => {
                self.batch.event(None, Some("$gap"), &bytes);
                let Some(i) = head.room.as_deref().and_then(|r| self.index_of(r)) else { return };
                self.on_gap(i, head.data);
            }
            kind => {
                let name = format!("${kind}");
                let name = if super::encode::is_field_safe(&name) { name } else { "$unknown".to_owned() };
                self.batch.event(None, Some(&name), &bytes);
            }
        }
    }

    /// A stream room's `gap` (protocol §3.12), after the `$gap` event:
    /// - `slow_consumer`: the events are still in history; end the stream
    ///   (4002) so the browser's reconnect recovers them from its
    ///   `Last-Event-ID` (when [`CloseRetry::reconnect_on_gap`]);
    /// - `missed`: they are gone; `$resync`, and the position moves past
    ///   them so a later reconnect does not ask for them again;
    /// - `epoch_changed`: the stream starts over; `$resync`, and the
    ///   position becomes offset 0 of the new epoch.
    fn on_gap(&mut self, i: usize, data: Option<&RawValue>) {
        #[derive(Deserialize)]
        struct Gap<'a> {
            #[serde(borrow, default)]
            reason: Option<Cow<'a, str>>,
            #[serde(default)]
            to: Option<u64>,
            #[serde(borrow, default)]
            epoch: Option<Cow<'a, str>>,
        }
        let gap = data.and_then(|d| serde_json::from_str::<Gap<'_>>(d.get()).ok());
        let room = self.rooms.names[i].clone();
        let resync = |this: &mut Self, reason: &str| {
            let id = (this.offsets[i].is_some() && this.epochs[i].is_some()).then(|| this.id());
            let data = serde_json::json!({ "room": &*room, "reason": reason });
            this.batch.event(id.as_deref(), Some("$resync"), &Bytes::from(data.to_string()));
        };
        match gap.as_ref().and_then(|g| g.reason.as_deref()) {
            Some("missed") => {
                if let Some(to) = gap.as_ref().and_then(|g| g.to) {
                    self.offsets[i] = Some(self.offsets[i].map_or(to, |o| o.max(to)));
                }
                resync(self, "events were lost and are no longer in history");
            }
            Some("epoch_changed") => {
                if let Some(e) = gap.as_ref().and_then(|g| g.epoch.as_deref()) {
                    self.epochs[i] = Some(e.to_owned());
                    self.offsets[i] = Some(0);
                }
                resync(self, "the room's history was reset");
            }
            _ if self.close.reconnect_on_gap => {
                let reason = "reconnect to recover missed events";
                self.close_event(Some(crate::transport::CloseFrame {
                    code: CloseCode::RECONNECT,
                    reason: reason.into(),
                }));
            }
            _ => {}
        }
    }

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
        let id = (!reconnect).then_some(resume::STOP);
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
        if this.batch.len() >= FLUSH_AT {
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
            Frame::Text(bytes) => this.envelope(bytes),
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

/// The reading half: the stream's own joins, then POSTed envelopes.
pub struct SseStream {
    shared: Arc<Shared>,
    inbound: mpsc::Receiver<Frame>,
    joins: VecDeque<Frame>,
    on_drop: Option<Box<dyn FnOnce() + Send>>,
    reported_dead: bool,
}

impl fmt::Debug for SseStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SseStream").field("key", &self.shared.key).field("joins", &self.joins.len()).finish()
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
        if !this.joins.is_empty() {
            if shared.joins_in_flight.load(Ordering::Acquire) < JOINS_IN_FLIGHT {
                shared.joins_in_flight.fetch_add(1, Ordering::AcqRel);
                return Poll::Ready(this.joins.pop_front().map(Ok));
            }
            return Poll::Pending;
        }
        // POSTed envelopes only once the stream's rooms are joined, so a
        // call naming one of them finds the membership.
        if shared.joins_in_flight.load(Ordering::Acquire) > 0 {
            return Poll::Pending;
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
    use crate::transport::CloseFrame;
    use futures::{FutureExt, SinkExt};

    fn text(rx: &mut fmpsc::Receiver<Vec<Bytes>>) -> String {
        let mut out = Vec::new();
        while let Some(Some(batch)) = rx.next().now_or_never() {
            out.extend(batch.concat());
        }
        String::from_utf8(out).unwrap()
    }

    fn frame(v: serde_json::Value) -> Frame {
        Frame::Text(Bytes::from(v.to_string()))
    }

    /// The sink alone (tier a): names, ids from offsets and join replies,
    /// `$resync`, pings as comments, and the close.
    #[tokio::test]
    async fn events_ids_pings_and_close() {
        let (in_tx, in_rx) = mpsc::channel(4);
        let shared = Arc::new(Shared::new(1, [0; 16], in_tx));
        let (out_tx, mut out_rx) = fmpsc::channel(8);
        let names: Vec<Arc<str>> = vec!["a".into(), "b".into()];
        let fp = resume::fingerprint(&names);
        let rooms = StreamRooms { names, fingerprint: fp, recovering: vec![false, true], positions: vec![None, None] };
        let joins: VecDeque<Frame> = [frame(serde_json::json!({"type": "join"}))].into();
        let t = SseTransport::new(
            shared,
            out_tx,
            in_rx,
            joins,
            rooms,
            CloseRetry { retry_ms: 1234, reconnect_on_gap: true },
            Box::new(|| {}),
        );
        let caps = t.capabilities();
        assert!(caps.native_ping && !caps.bidirectional && caps.framing.is_none(), "{caps:?}");
        let (mut sink, mut stream) = t.split();
        // The stream's join comes first.
        assert!(matches!(stream.next().await, Some(Ok(Frame::Text(_)))));

        let base = STREAM_REF_BASE;
        sink.feed(frame(serde_json::json!({"type": "hello", "data": {}}))).await.unwrap();
        let joined_a = serde_json::json!({"type": "reply", "ref": base, "data": {"room": "a", "epoch": "E.1", "offset": 3, "recovered": true}});
        sink.feed(frame(joined_a)).await.unwrap();
        sink.feed(frame(serde_json::json!({"type": "event", "room": "a", "event": "tick", "offset": 4, "data": 1})))
            .await
            .unwrap();
        sink.feed(frame(serde_json::json!({"type": "event", "room": "c", "event": "tick", "offset": 99, "data": 2})))
            .await
            .unwrap();
        let joined_b = serde_json::json!({"type": "reply", "ref": base + 1, "data": {"room": "b", "epoch": "F", "offset": 9, "recovered": false}});
        sink.feed(frame(joined_b)).await.unwrap();
        sink.feed(frame(serde_json::json!({"type": "error", "ref": base + 5, "code": 403, "message": "x"})))
            .await
            .unwrap();
        sink.feed(frame(serde_json::json!({"type": "reply", "ref": 7, "data": null}))).await.unwrap();
        sink.feed(Frame::Ping(Bytes::new())).await.unwrap();
        sink.flush().await.unwrap();
        let s = text(&mut out_rx);
        let events = super::super::encode::parse(&s);
        let names: Vec<&str> = events.iter().map(|e| e.1.as_str()).collect();
        assert_eq!(names, ["$hello", "$joined", "tick", "tick", "$joined", "$resync", "$reply"], "{s}");
        let id_a = resume::encode(fp, &[Some(Position { offset: 3, epoch: "E.1".into() }), None]);
        assert_eq!(events[1].0, id_a, "the join reply's position");
        let id_a4 = resume::encode(fp, &[Some(Position { offset: 4, epoch: "E.1".into() }), None]);
        assert_eq!(events[2].0, id_a4, "an event of a stream room moves its position");
        assert_eq!(events[3].0, id_a4, "another room's event leaves the id alone");
        let both = resume::encode(
            fp,
            &[Some(Position { offset: 4, epoch: "E.1".into() }), Some(Position { offset: 9, epoch: "F".into() })],
        );
        assert_eq!(events[4].0, both);
        assert_eq!(serde_json::from_str::<serde_json::Value>(&events[5].2).unwrap()["room"], "b");
        assert!(s.contains(": ping\n\n"), "{s}");

        // A reconnectable close: retry, then $close; the reader ends.
        let close = CloseFrame { code: CloseCode::GOING_AWAY, reason: "bye".into() };
        sink.send(Frame::Close(Some(close))).await.unwrap();
        let s = text(&mut out_rx);
        assert!(s.starts_with("retry: 1234\n\n"), "{s}");
        let events = super::super::encode::parse(&s);
        assert_eq!(events[0].1, "$close");
        assert_eq!(events[0].2, r#"{"code":1001,"reason":"bye","reconnect":true}"#);
        assert!(stream.next().await.is_none());
        assert_eq!(out_rx.next().now_or_never(), Some(None), "the body ends after the close");
    }

    #[tokio::test]
    async fn a_gap_in_a_stream_room_ends_the_stream_for_a_reconnect() {
        let (in_tx, in_rx) = mpsc::channel(4);
        let shared = Arc::new(Shared::new(1, [0; 16], in_tx));
        let (out_tx, mut out_rx) = fmpsc::channel(8);
        let names: Vec<Arc<str>> = vec!["a".into()];
        let fp = resume::fingerprint(&names);
        let rooms = StreamRooms { fingerprint: fp, names, recovering: vec![false], positions: vec![None] };
        let close = CloseRetry { retry_ms: 10, reconnect_on_gap: true };
        let t = SseTransport::new(shared, out_tx, in_rx, VecDeque::new(), rooms, close, Box::new(|| {}));
        let (mut sink, mut stream) = t.split();
        let base = STREAM_REF_BASE;
        let reply = serde_json::json!({"type": "reply", "ref": base, "data": {"room": "a", "epoch": "E", "offset": 3}});
        sink.feed(frame(reply)).await.unwrap();
        let gap =
            |room: &str, data: serde_json::Value| frame(serde_json::json!({"type": "gap", "room": room, "data": data}));
        // A gap in another room passes through.
        sink.feed(gap("x", serde_json::json!({"reason": "slow_consumer", "from": 1, "to": 2}))).await.unwrap();
        // Lost for good: resync, and the position moves past the loss.
        sink.feed(gap("a", serde_json::json!({"reason": "missed", "from": 4, "to": 6, "epoch": "E"}))).await.unwrap();
        // Reset: resync, position 0 of the new epoch.
        sink.feed(gap("a", serde_json::json!({"reason": "epoch_changed", "epoch": "F"}))).await.unwrap();
        // Still in history: end the stream for a recovering reconnect.
        sink.feed(gap("a", serde_json::json!({"reason": "slow_consumer", "from": 1, "to": 2}))).await.unwrap();
        sink.flush().await.unwrap();
        let s = text(&mut out_rx);
        let events = super::super::encode::parse(&s);
        let names: Vec<&str> = events.iter().map(|e| e.1.as_str()).collect();
        assert_eq!(names, ["$joined", "$gap", "$gap", "$resync", "$gap", "$resync", "$gap", "$close"], "{s}");
        let pos = |offset, epoch: &str| Some(Position { offset, epoch: epoch.into() });
        assert_eq!(events[3].0, resume::encode(fp, &[pos(6, "E")]));
        assert_eq!(events[5].0, resume::encode(fp, &[pos(0, "F")]));
        assert!(events[7].2.contains("\"code\":4002") && s.contains("retry: 10\n"), "{s}");
        assert!(stream.next().await.is_none(), "the session ends");
        assert!(sink.feed(frame(serde_json::json!({"type": "event"}))).await.is_err());
    }

    /// A recovering join keeps the position it asked for until the
    /// replayed events move it; a rewind's older events never move it back.
    #[tokio::test]
    async fn recovery_positions_follow_the_replay() {
        let (in_tx, in_rx) = mpsc::channel(4);
        let shared = Arc::new(Shared::new(1, [0; 16], in_tx));
        let (out_tx, mut out_rx) = fmpsc::channel(8);
        let names: Vec<Arc<str>> = vec!["a".into(), "b".into()];
        let fp = resume::fingerprint(&names);
        let pos = |offset, epoch: &str| Some(Position { offset, epoch: epoch.into() });
        let rooms =
            StreamRooms { names, fingerprint: fp, recovering: vec![true, false], positions: vec![pos(5, "E"), None] };
        let close = CloseRetry { retry_ms: 10, reconnect_on_gap: true };
        let t = SseTransport::new(shared, out_tx, in_rx, VecDeque::new(), rooms, close, Box::new(|| {}));
        let (mut sink, _stream) = t.split();
        let base = STREAM_REF_BASE;
        let ev = |room: &str, offset: u64| {
            frame(serde_json::json!({"type": "event", "room": room, "event": "m", "offset": offset}))
        };
        sink.feed(frame(serde_json::json!({"type": "reply", "ref": base, "data": {"room": "a", "epoch": "E", "offset": 9, "recovered": true}})))
            .await
            .unwrap();
        sink.feed(ev("a", 6)).await.unwrap();
        sink.feed(ev("a", 7)).await.unwrap();
        sink.feed(frame(
            serde_json::json!({"type": "reply", "ref": base + 1, "data": {"room": "b", "epoch": "F", "offset": 10}}),
        ))
        .await
        .unwrap();
        sink.feed(ev("b", 8)).await.unwrap();
        sink.feed(ev("b", 11)).await.unwrap();
        sink.flush().await.unwrap();
        let events = super::super::encode::parse(&text(&mut out_rx));
        let ids: Vec<String> = events.iter().map(|e| e.0.clone()).collect();
        let at = |a: Option<Position>, b: Option<Position>| resume::encode(fp, &[a, b]);
        assert_eq!(
            ids,
            [
                at(pos(5, "E"), None),
                at(pos(6, "E"), None),
                at(pos(7, "E"), None),
                at(pos(7, "E"), pos(10, "F")),
                at(pos(7, "E"), pos(10, "F")),
                at(pos(7, "E"), pos(11, "F")),
            ]
        );
        assert!(events.iter().all(|e| e.1 != "$resync"), "recovered: no resync");
    }

    #[test]
    fn heads_end_where_the_payload_starts() {
        fn f(s: &str) -> Option<&str> {
            data_start(s.as_bytes()).map(|i| &s[..i])
        }
        assert_eq!(
            f(r#"{"type":"event","room":"a","event":"e","offset":3,"data":{"x":1}}"#),
            Some(r#"{"type":"event","room":"a","event":"e","offset":3"#)
        );
        // A key named data inside a string is not the payload.
        assert_eq!(
            f(r#"{"type":"event","event":"x\",\"data\":","data":1}"#),
            Some(r#"{"type":"event","event":"x\",\"data\":""#)
        );
        assert_eq!(f(r#"{"type":"event","event":"\\","data":1}"#), Some(r#"{"type":"event","event":"\\""#));
        assert_eq!(f(r#"{"type":"hello"}"#), None);
        assert_eq!(f(r#"{"type":"x","nested":{"data":1},"data":2}"#), None);
        assert_eq!(f("[1]"), None);
    }

    /// By hand (`cargo test --release --features sse --lib head_parse --
    /// --ignored --nocapture`): what reading only the head saves per
    /// delivery of a 4 KiB event.
    #[test]
    #[ignore]
    fn head_parse_cost() {
        let env = format!(
            r#"{{"type":"event","room":"r","event":"tick","offset":7,"data":{{"blob":"{}"}}}}"#,
            "x".repeat(4096)
        );
        let bytes = env.as_bytes();
        let n = 100_000;
        let t = std::time::Instant::now();
        for _ in 0..n {
            let h: Head<'_> = serde_json::from_slice(std::hint::black_box(bytes)).unwrap();
            std::hint::black_box(h.offset);
        }
        let whole = t.elapsed() / n;
        let t = std::time::Instant::now();
        for _ in 0..n {
            let i = data_start(std::hint::black_box(bytes)).unwrap();
            let mut stack = [0u8; 512];
            stack[..i].copy_from_slice(&bytes[..i]);
            stack[i] = b'}';
            let h: Head<'_> = serde_json::from_slice(&stack[..=i]).unwrap();
            std::hint::black_box(h.offset);
        }
        let head = t.elapsed() / n;
        println!("4 KiB event: whole parse {whole:?}, head only {head:?} per delivery");
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
