//! One connection: its bounded outbound queue, its writer, its reader.
//!
//! Tasks per connection: the reader runs in the task that called
//! [`Hub::serve`](crate::Hub::serve); the writer is one spawned task; each
//! in-flight call or join is a short-lived task bounded by the connection's
//! semaphore. Heartbeats are driven by the hub's shared timer wheel (see
//! `heartbeat.rs`), not by a task here.

use super::handler::{Call, CallError};
use super::room::validate_room_name;
use super::stream::Want;
use super::{ConnectionState, DisconnectReason, Hub, OverflowPolicy, TaskGuard};
use crate::auth::Identity;
use crate::history::StreamPosition;
use crate::protocol::{CloseCode, Envelope, ErrorCode, Format, Kind, Parts, Payload};
use crate::transport::{CloseFrame, Frame, Transport, TransportError};
use crate::util::Limiter;
use crate::ConnectionId;
use bytes::Bytes;
use futures::{FutureExt, Sink, SinkExt, Stream, StreamExt};
use parking_lot::Mutex;
use std::collections::VecDeque;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU8, Ordering};
use std::sync::Arc;
use std::task::ready;
use tokio::sync::Notify;
use tokio::task::JoinSet;

/// Shared state of one connection. Reachable from rooms (for fan-out), the
/// hub's session index, the heartbeat wheel (weakly) and handler calls.
pub(crate) struct Session {
    pub(crate) id: ConnectionId,
    pub(crate) format: Format,
    pub(crate) identity: Identity,
    pub(crate) native_ping: bool,
    /// The transport takes data frames framed for the wire
    /// ([`Transport::prefer_framed`](crate::transport::Transport::prefer_framed)).
    framed: bool,
    pub(crate) outbox: Outbox,
    /// Rooms this connection is in. Locked only for quick reads and edits;
    /// the room registry is always locked *after* this one when both are held.
    pub(crate) rooms: Mutex<Vec<Arc<str>>>,
    state: AtomicU8,
    /// Set by any inbound frame; cleared when the heartbeat sends a ping.
    pub(crate) alive: AtomicBool,
    /// The stop signals: [`STOP_READ`] tells the reader to stop (a close
    /// was decided), [`STOP_DRAIN`] tells the session to stop waiting for
    /// a graceful drain. Inline: a `CancellationToken` each was two
    /// allocations (~260 bytes) per connection.
    stops: Stops,
    reason: Mutex<Option<DisconnectReason>>,
    /// Requests in flight (handler calls, joins, refreshes), at most
    /// `max_inflight`; each holds a [`Permit`].
    inflight: AtomicU32,
    max_inflight: u32,
    /// Calls naming a room wait here, per room, for that room's worker task:
    /// one task per room with work drains its queue in arrival order, so a
    /// publisher's broadcasts stay in order and run back to back (writers
    /// then batch them), while calls in different rooms or without a room
    /// run concurrently. An entry exists only while its room has work; the
    /// queued calls hold in-flight permits, so the total is bounded by
    /// `max_inflight`.
    pub(crate) call_queues: Mutex<Vec<RoomCalls>>,
    /// Inbound message rate (`None`: unlimited). Checked by the reader only.
    rate: Option<Rate>,
    /// The credentials in force: the identity's expiry and room
    /// restriction, replaced by a successful `refresh`. Locked briefly by the
    /// reader, joins and refreshes; never across an await.
    grant: Mutex<Grant>,
}

/// A connection's message bucket, and the bucket of its refusals: when
/// that one is empty too, the connection is closed with 1008.
struct Rate {
    messages: Limiter,
    violations: Limiter,
}

/// Expiry and room restriction of the credentials in force.
pub(crate) struct Grant {
    /// The identity of the latest successful `refresh`; `None`: the
    /// connection's own (boxed: most connections never refresh).
    refreshed: Option<Box<Identity>>,
    /// When the credentials expire, on tokio's clock.
    pub(crate) deadline: Option<tokio::time::Instant>,
}

impl Grant {
    fn deadline_of(identity: &Identity) -> Option<tokio::time::Instant> {
        identity.expires_in().map(|left| tokio::time::Instant::now() + left)
    }
}

impl Session {
    pub(crate) fn new(
        id: ConnectionId,
        format: Format,
        identity: Identity,
        (native_ping, framed): (bool, bool),
        hub: &Hub,
    ) -> Session {
        let cfg = &hub.inner.config;
        Session {
            id,
            format,
            native_ping,
            framed,
            outbox: Outbox::new(cfg.outbound_queue_bytes, cfg.overflow),
            rooms: Mutex::new(Vec::new()),
            state: AtomicU8::new(ConnectionState::Connecting as u8),
            alive: AtomicBool::new(true),
            stops: Stops { raised: AtomicU8::new(0), notify: Notify::new() },
            reason: Mutex::new(None),
            inflight: AtomicU32::new(0),
            max_inflight: u32::try_from(cfg.max_inflight.max(1)).unwrap_or(u32::MAX),
            call_queues: Mutex::new(Vec::new()),
            rate: identity.rate_limit_or(cfg.rate_limit).map(|limit| Rate {
                messages: limit.limiter(),
                // Same refill rate as the messages: a client sending up to
                // twice its rate gets errors for the excess but stays.
                violations: limit.burst(cfg.max_rate_violations.max(1)).limiter(),
            }),
            grant: Mutex::new(Grant { refreshed: None, deadline: Grant::deadline_of(&identity) }),
            identity,
        }
    }

    /// When the credentials in force expire (tokio clock), if they do.
    pub(crate) fn deadline(&self) -> Option<tokio::time::Instant> {
        self.grant.lock().deadline
    }

    /// Whether the credentials in force allow a client `join` of `room`.
    fn allows_room(&self, room: &str) -> bool {
        self.grant.lock().refreshed.as_deref().unwrap_or(&self.identity).allows_room(room)
    }

    pub(crate) fn state(&self) -> ConnectionState {
        ConnectionState::from_u8(self.state.load(Ordering::Acquire))
    }

    fn set_state(&self, s: ConnectionState) {
        self.state.store(s as u8, Ordering::Release);
    }

    pub(crate) fn is_member(&self, room: &str) -> bool {
        self.rooms.lock().iter().any(|r| &**r == room)
    }

    /// An encoded envelope as a frame: text or binary by the format.
    fn frame(&self, bytes: bytes::Bytes) -> Frame {
        if self.format.is_binary() {
            Frame::Binary(bytes)
        } else {
            Frame::Text(bytes)
        }
    }

    /// The form this connection's frames are queued in.
    pub(crate) fn wire(&self) -> Wire {
        Wire { format: self.format, framed: self.framed }
    }

    /// A notice the writer sends itself (`lagged`, `gap`), as a frame.
    fn notice(&self, parts: Parts<'_>) -> Frame {
        self.frame(self.wire().prepare(parts.encode(self.format)))
    }

    /// Queues an encoded envelope (a text or binary frame by format) under
    /// the overflow policy.
    pub(crate) fn push_encoded(&self, bytes: bytes::Bytes) {
        self.push_prepared(self.wire().prepare(bytes));
    }

    /// Queues an envelope already in this connection's [`Wire`] form (from
    /// a broadcast's per-form cache) under the overflow policy.
    pub(crate) fn push_prepared(&self, bytes: bytes::Bytes) {
        if let Push::Overflow = self.outbox.push_queued(bytes, None) {
            self.close(DisconnectReason::SlowConsumer, CloseCode::SLOW_CONSUMER, "outbound queue full", true);
        }
    }

    /// Queues an event of a recoverable room, in this connection's
    /// [`Wire`] form: if the drop-oldest policy drops it, the client is
    /// told the room and offset range in a `gap`.
    pub(crate) fn push_tagged(&self, bytes: bytes::Bytes, room: &Arc<str>, offset: u64) {
        if let Push::Overflow = self.outbox.push_queued(bytes, Some((room, offset))) {
            self.close(DisconnectReason::SlowConsumer, CloseCode::SLOW_CONSUMER, "outbound queue full", true);
        }
    }

    pub(crate) fn send_parts(&self, parts: &Parts<'_>) {
        self.push_encoded(parts.encode(self.format));
    }

    pub(crate) fn send_error(&self, reference: Option<u64>, code: u32, message: &str) {
        self.send_parts(&Parts { reference, code: Some(code), message: Some(message), ..Parts::new(Kind::Error) });
    }

    /// An `error` with structured `data` (rate-limit hints, field errors).
    pub(crate) fn send_error_data(&self, reference: Option<u64>, code: u32, message: &str, data: &serde_json::Value) {
        let Ok(data) = Payload::encode(self.format, data) else { return self.send_error(reference, code, message) };
        let parts = Parts {
            reference,
            code: Some(code),
            message: Some(message),
            data: Some(data.bytes()),
            ..Parts::new(Kind::Error)
        };
        self.send_parts(&parts);
    }

    /// A handler's or authorizer's error, with its `data` when it has some.
    pub(crate) fn send_call_error(&self, reference: Option<u64>, e: &CallError) {
        match e.data() {
            Some(data) => self.send_error_data(reference, e.code(), e.message(), data),
            None => self.send_error(reference, e.code(), e.message()),
        }
    }

    pub(crate) fn send_reply(&self, reference: u64, data: &Payload) {
        let data = match data.to_format(self.format) {
            Ok(d) => d,
            Err(e) => return self.send_error(Some(reference), ErrorCode::INTERNAL.0, &e.to_string()),
        };
        self.send_parts(&Parts { reference: Some(reference), data: Some(data.bytes()), ..Parts::new(Kind::Reply) });
    }

    /// Sends a heartbeat ping: a transport ping when the transport has one,
    /// the protocol's `ping` envelope otherwise. Bypasses the byte bound
    /// (at most one is outstanding).
    pub(crate) fn send_ping(&self) {
        let frame = if self.native_ping {
            Frame::Ping(bytes::Bytes::new())
        } else {
            let bytes = Parts::new(Kind::Ping).encode(self.format);
            if self.format.is_binary() {
                Frame::Binary(bytes)
            } else {
                Frame::Text(bytes)
            }
        };
        self.outbox.push_control(frame);
    }

    /// Decides to close. The first reason wins. `discard` drops what is still
    /// queued (slow consumer, errors); otherwise the writer sends it first
    /// (shutdown, host close). `code` is sent in a close frame.
    pub(crate) fn close(&self, reason: DisconnectReason, code: CloseCode, text: &str, discard: bool) {
        self.close_with(reason, Some(CloseFrame { code, reason: text.to_owned() }), discard);
    }

    pub(crate) fn close_with(&self, reason: DisconnectReason, frame: Option<CloseFrame>, discard: bool) {
        {
            let mut r = self.reason.lock();
            if r.is_some() {
                return;
            }
            *r = Some(reason);
        }
        if self.state() != ConnectionState::Closed {
            self.set_state(ConnectionState::Closing);
        }
        self.outbox.close(frame, discard);
        self.stops.raise(STOP_READ);
    }

    /// Whether a close was decided (the reader has been told to stop).
    pub(crate) fn is_cancelled(&self) -> bool {
        self.stops.is_raised(STOP_READ)
    }

    /// Ends the wait for a graceful drain (the shutdown deadline passed).
    pub(crate) fn kill(&self) {
        self.stops.raise(STOP_DRAIN);
    }

    pub(crate) fn reason(&self) -> Option<DisconnectReason> {
        self.reason.lock().clone()
    }
}

/// The form of a connection's queued frames: its format, and whether its
/// transport takes them framed for the wire
/// ([`Transport::prefer_framed`](crate::transport::Transport::prefer_framed)).
/// A broadcast prepares each form once ([`Wire::COUNT`] at most), however
/// many recipients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Wire {
    pub(crate) format: Format,
    framed: bool,
}

impl Wire {
    pub(crate) const COUNT: usize = 4;

    /// The unframed form of `format`.
    pub(crate) fn plain(format: Format) -> Wire {
        Wire { format, framed: false }
    }

    pub(crate) fn index(self) -> usize {
        self.format.index() * 2 + usize::from(self.framed)
    }

    /// An encoded envelope of this form's format, in this form.
    pub(crate) fn prepare(self, envelope: Bytes) -> Bytes {
        if self.framed {
            crate::transport::ws_framed(self.format.is_binary(), &envelope)
        } else {
            envelope
        }
    }
}

/// The connection's handler tasks. The set is created by the first one:
/// an empty `JoinSet` is an allocation, and most connections never call.
#[derive(Default)]
struct Calls(Option<JoinSet<()>>);

impl Calls {
    fn spawn(&mut self, task: impl Future<Output = ()> + Send + 'static) {
        self.0.get_or_insert_with(JoinSet::new).spawn(task);
    }

    fn is_empty(&self) -> bool {
        self.0.as_ref().is_none_or(JoinSet::is_empty)
    }

    async fn join_next(&mut self) -> Option<()> {
        match &mut self.0 {
            Some(set) => set.join_next().await.map(|_| ()),
            None => None,
        }
    }

    fn abort_all(&mut self) {
        if let Some(set) = &mut self.0 {
            set.abort_all();
        }
    }
}

/// Tells the reader to stop.
const STOP_READ: u8 = 1;
/// Tells the session to stop waiting for a graceful drain.
const STOP_DRAIN: u8 = 2;

/// One-way signals, each raised at most once and awaited by any number of
/// tasks: what `CancellationToken`s would do, without an allocation each.
struct Stops {
    raised: AtomicU8,
    notify: Notify,
}

impl Stops {
    fn raise(&self, signal: u8) {
        if self.raised.fetch_or(signal, Ordering::AcqRel) & signal == 0 {
            self.notify.notify_waiters();
        }
    }

    fn is_raised(&self, signal: u8) -> bool {
        self.raised.load(Ordering::Acquire) & signal != 0
    }

    async fn wait(&self, signal: u8) {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            // Registered before the check, so a raise between the check and
            // the await still wakes this waiter.
            notified.as_mut().enable();
            if self.is_raised(signal) {
                return;
            }
            notified.await;
        }
    }
}

pub(crate) enum Push {
    Queued,
    Dropped,
    Overflow,
    Closed,
}

/// The bounded outbound queue, drained by the connection's single writer.
///
/// **Bound:** the bytes of queued data frames *plus* the batch the writer is
/// currently writing never exceed `limit`; a frame that does not fit triggers
/// the overflow policy. Control frames (heartbeat ping, close) are not
/// counted: there is at most one ping outstanding and one close.
///
/// The lock is a plain mutex held only to move frames in or out; no await
/// happens under it, and publishers never wait on a slow connection.
pub(crate) struct Outbox {
    state: Mutex<OutState>,
    notify: Notify,
    limit: usize,
    policy: OverflowPolicy,
}

/// Most gap ranges remembered between two writes; beyond it a room's last
/// range is widened (the client is told of a superset, never of less).
const MAX_GAP_RANGES: usize = 64;

#[derive(Default)]
struct OutState {
    /// Encoded envelopes, each a data frame of the connection's format:
    /// bare `Bytes` (32 bytes a slot), since each slot is written by the
    /// publishing task and read by the writer, usually on another core.
    queue: VecDeque<Bytes>,
    /// Events of recoverable rooms in `queue`: `(seq, room, offset)`, so a
    /// drop can be reported as a gap. Kept aside: most queued frames have
    /// no tag, and a tag in every slot would double its size.
    tags: VecDeque<(u64, Arc<str>, u64)>,
    /// Sequence number of `queue`'s front (counts every frame queued).
    head: u64,
    /// The pending heartbeat ping, written before the queue. Kept apart so it
    /// is never counted in `bytes` (a protocol ping is a text or binary
    /// frame) nor dropped as data under the drop-oldest policy.
    ping: Option<Frame>,
    /// The pending answer to the peer's latest transport ping (RFC 6455 lets
    /// a pong answer only the most recent ping, so one slot bounds a ping
    /// flood). Not counted in `bytes` either.
    pong: Option<Frame>,
    bytes: usize,
    peak: usize,
    /// Dropped since the last `lagged` notice (drop-oldest policy).
    lagged: u64,
    /// Offset ranges of recoverable rooms dropped since the last write:
    /// `(room, from, to)`, sent as `gap` notices.
    gaps: Vec<(Arc<str>, u64, u64)>,
    dropped_total: u64,
    /// Close decided: no more data is accepted.
    closing: bool,
    /// The writer was woken and has not taken the queue since: further
    /// pushes need not wake it again (one `notify` per batch, not per
    /// message — a publish to N members costs N pushes).
    woken: bool,
    /// The close frame still to send (taken by the writer).
    close_frame: Option<CloseFrame>,
}

impl Outbox {
    fn new(limit: usize, policy: OverflowPolicy) -> Outbox {
        Outbox { state: Mutex::new(OutState::default()), notify: Notify::new(), limit, policy }
    }

    /// Queues an encoded envelope; `tag`: its room and offset, for an event
    /// of a recoverable room.
    fn push_queued(&self, item: Bytes, tag: Option<(&Arc<str>, u64)>) -> Push {
        let len = item.len();
        let mut guard = self.state.lock();
        let st = &mut *guard;
        if st.closing {
            return Push::Closed;
        }
        if st.bytes + len > self.limit {
            match self.policy {
                OverflowPolicy::Disconnect => return Push::Overflow,
                OverflowPolicy::DropOldest => {
                    while st.bytes + len > self.limit {
                        let Some(old) = st.queue.pop_front() else { break };
                        let seq = st.head;
                        st.head += 1;
                        st.bytes -= old.len();
                        st.lagged += 1;
                        st.dropped_total += 1;
                        if st.tags.front().is_some_and(|t| t.0 == seq) {
                            let (_, room, offset) = st.tags.pop_front().expect("checked");
                            note_gap(&mut st.gaps, room, offset);
                        }
                    }
                    if st.bytes + len > self.limit {
                        // The writer's in-flight batch holds the rest: drop the new one.
                        st.lagged += 1;
                        st.dropped_total += 1;
                        if let Some((room, offset)) = tag {
                            note_gap(&mut st.gaps, room.clone(), offset);
                        }
                        drop(guard);
                        self.notify.notify_one();
                        return Push::Dropped;
                    }
                }
            }
        }
        st.bytes += len;
        st.peak = st.peak.max(st.bytes);
        if st.queue.capacity() == 0 {
            // Room for one frame, not the usual four: most connections
            // are idle most of the time and get a frame now and then.
            st.queue.reserve_exact(1);
        }
        if let Some((room, offset)) = tag {
            st.tags.push_back((st.head + st.queue.len() as u64, room.clone(), offset));
        }
        st.queue.push_back(item);
        let wake = !std::mem::replace(&mut st.woken, true);
        drop(guard);
        if wake {
            self.notify.notify_one();
        }
        Push::Queued
    }

    pub(crate) fn push_control(&self, frame: Frame) {
        let mut st = self.state.lock();
        if st.closing {
            return;
        }
        match frame {
            Frame::Pong(_) => st.pong = Some(frame),
            _ => st.ping = Some(frame),
        }
        drop(st);
        self.notify.notify_one();
    }

    fn close(&self, frame: Option<CloseFrame>, discard: bool) {
        let mut st = self.state.lock();
        st.closing = true;
        st.close_frame = frame;
        if discard {
            let freed: usize = st.queue.drain(..).map(|b| b.len()).sum();
            st.bytes -= freed;
            st.tags.clear();
        }
        drop(st);
        self.notify.notify_one();
    }

    pub(crate) fn queued_bytes(&self) -> usize {
        self.state.lock().bytes
    }

    pub(crate) fn peak_bytes(&self) -> usize {
        self.state.lock().peak
    }

    pub(crate) fn dropped(&self) -> u64 {
        self.state.lock().dropped_total
    }
}

/// The writer: takes everything queued in one go, feeds it to the sink, and
/// flushes once per batch (coalescing many small frames into few writes).
///
/// Returns whether the close frame was sent. Not an `async fn`, and the
/// batch is fed by one `poll_fn` rather than a `feed(..).await` per frame:
/// this future lives as long as the connection, and each await point of
/// an `async` body keeps its own state (the writer task was ~900 bytes).
#[allow(clippy::manual_async_fn)] // an `async fn` would hold its arguments twice
fn write_loop<S>(session: Arc<Session>, mut sink: S) -> impl Future<Output = bool> + Send
where
    S: Sink<Frame, Error = TransportError> + Send + Unpin,
{
    async move {
        let mut batch: VecDeque<Bytes> = VecDeque::new();
        let mut gaps: Vec<(Arc<str>, u64, u64)> = Vec::new();
        loop {
            let (mut ping, mut pong, batch_bytes, mut lagged, mut close, closing) = {
                let mut st = session.outbox.state.lock();
                std::mem::swap(&mut st.queue, &mut batch);
                // Taken frames are on their way: no longer droppable.
                st.head += batch.len() as u64;
                st.tags.clear();
                // From here a push must wake the writer again (Notify keeps the
                // permit if the writer is not waiting yet).
                st.woken = false;
                // Everything counted in `bytes` is in the queue just taken: the
                // previous batch was subtracted when it was written.
                let bytes = st.bytes;
                debug_assert_eq!(bytes, batch.iter().map(Bytes::len).sum::<usize>());
                if !st.gaps.is_empty() {
                    std::mem::swap(&mut st.gaps, &mut gaps);
                }
                let ping = st.ping.take();
                if ping.is_some() && batch.is_empty() {
                    // A heartbeat ping with no data since the last write: the
                    // connection is idle, so its two queue buffers (grown by
                    // earlier traffic) are given back rather than kept for
                    // the next burst. A busy connection keeps them: its pings
                    // travel with data.
                    st.queue = VecDeque::new();
                    st.tags = VecDeque::new();
                    batch = VecDeque::new();
                }
                (ping, st.pong.take(), bytes, std::mem::take(&mut st.lagged), st.close_frame.take(), st.closing)
            };
            if ping.is_none() && pong.is_none() && batch.is_empty() && lagged == 0 && gaps.is_empty() && close.is_none()
            {
                if closing {
                    return false;
                }
                session.outbox.notify.notified().await;
                continue;
            }
            let closes = close.is_some();
            let mut gap = 0;
            // In order: the pong, the heartbeat ping, the `lagged` notice, the
            // gap notices, the data, the close frame; then one flush.
            let result = futures::future::poll_fn(|cx| {
                loop {
                    let more = pong.is_some()
                        || ping.is_some()
                        || lagged > 0
                        || gap < gaps.len()
                        || !batch.is_empty()
                        || close.is_some();
                    if !more {
                        break;
                    }
                    // Ready before taking a frame: a `Pending` here keeps it.
                    ready!(sink.poll_ready_unpin(cx))?;
                    let frame = if let Some(f) = pong.take() {
                        f
                    } else if let Some(f) = ping.take() {
                        f
                    } else if lagged > 0 {
                        let data = lagged_payload(session.format, std::mem::take(&mut lagged));
                        session.notice(Parts { data: Some(data.bytes()), ..Parts::new(Kind::Lagged) })
                    } else if let Some((room, from, to)) = gaps.get(gap) {
                        gap += 1;
                        let reason = super::stream::GapReason::SlowConsumer;
                        let data = super::stream::gap_payload(session.format, Some(*from), Some(*to), reason, None);
                        session.notice(Parts { room: Some(room), data: Some(data.bytes()), ..Parts::new(Kind::Gap) })
                    } else if let Some(bytes) = batch.pop_front() {
                        session.frame(bytes)
                    } else {
                        // Only the close frame is left (`more` above).
                        Frame::Close(close.take())
                    };
                    sink.start_send_unpin(frame)?;
                }
                sink.poll_flush_unpin(cx)
            })
            .await;
            gaps.clear();
            batch.clear();
            session.outbox.state.lock().bytes -= batch_bytes;
            if let Err(e) = result {
                tracing::debug!(connection = %session.id, error = %e, "write failed");
                session.close_with(DisconnectReason::ConnectionLost, None, true);
                return false;
            }
            if closes {
                return true;
            }
        }
    }
}

/// Adds a dropped event to the gap ranges (see [`MAX_GAP_RANGES`]).
fn note_gap(gaps: &mut Vec<(Arc<str>, u64, u64)>, room: Arc<str>, offset: u64) {
    if let Some(g) = gaps.iter_mut().rev().find(|g| g.0 == room) {
        if g.2 + 1 == offset {
            g.2 = offset;
            return;
        }
        if gaps.len() >= MAX_GAP_RANGES {
            let g = gaps.iter_mut().rev().find(|g| g.0 == room).expect("found above");
            g.1 = g.1.min(offset);
            g.2 = g.2.max(offset);
            return;
        }
    }
    gaps.push((room, offset, offset));
}

fn lagged_payload(format: Format, dropped: u64) -> Payload {
    #[derive(serde::Serialize)]
    struct Lag {
        dropped: u64,
    }
    Payload::encode(format, &Lag { dropped }).unwrap_or_else(|_| Payload::null(format))
}

/// Longest `epoch` a client may send in a `join`.
const MAX_EPOCH_LEN: usize = 64;

/// Runs a connection to its end. Called by [`Hub::serve`].
pub(crate) fn run<T: Transport>(hub: Hub, session: Arc<Session>, transport: T) -> impl Future<Output = ()> + Send {
    let fragments = transport.fragments();
    let (sink, mut stream) = transport.split();
    let task = TaskGuard::new(&hub.inner);
    // An `async move` block, not an `async fn`: an `async fn` moves its
    // arguments into locals, holding each twice for the connection's life;
    // a block uses what it captured in place.
    async move {
        let _task = task;
        let writer = {
            let guard = TaskGuard::new(&hub.inner);
            // `map`, not an `async` wrapper: a wrapper would keep the captured
            // future and the awaited one, two copies per connection.
            tokio::spawn(write_loop(session.clone(), sink).map(move |sent| {
                drop(guard);
                sent
            }))
        };
        hub.send_hello(&session);
        // Open, unless a close was already decided (e.g. shutdown began while
        // this connection was being set up): states never go backwards.
        let _ = session.state.compare_exchange(
            ConnectionState::Connecting as u8,
            ConnectionState::Open as u8,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
        hub.register_heartbeat(&session).await;
        hub.hook_connect(&session);

        let mut calls = Calls::default();
        let peer_closed = read_loop(&hub, &session, &mut stream, &mut calls, fragments.as_ref()).await;

        // Closing: stop handlers, leave rooms (so nothing more is queued), then
        // let the writer drain what is queued and send the close frame.
        calls.abort_all();
        hub.leave_all(&session);
        let close_timeout = hub.inner.config.close_timeout;
        let mut writer = writer;
        let sent_close = tokio::select! {
            r = &mut writer => r.unwrap_or(false),
            _ = session.stops.wait(STOP_DRAIN) => { writer.abort(); false }
            _ = tokio::time::sleep(close_timeout) => { writer.abort(); false }
        };
        if sent_close && !peer_closed {
            // Wait (bounded) for the peer's close frame so the close handshake
            // completes cleanly; anything else it sends now is ignored.
            let drain = async {
                while let Some(Ok(frame)) = stream.next().await {
                    if let Frame::Close(_) = frame {
                        break;
                    }
                }
            };
            tokio::select! {
                _ = drain => {}
                _ = session.stops.wait(STOP_DRAIN) => {}
                _ = tokio::time::sleep(close_timeout) => {}
            }
        }
        drop(stream);
        drop(calls);
        // Only now is the connection gone: until here it was Closing, still
        // counted and reachable (so `shutdown` waits for its drain and close).
        hub.deregister(&session);
        session.set_state(ConnectionState::Closed);
        let reason = session.reason().unwrap_or(DisconnectReason::ConnectionLost);
        hub.hook_disconnect(&session, &reason);
        hub.session_ended();
    }
}

/// Reads frames until the peer leaves or a close is decided. Returns whether
/// the peer closed (sent a close frame or ended the stream).
async fn read_loop<S>(
    hub: &Hub,
    session: &Arc<Session>,
    stream: &mut S,
    calls: &mut Calls,
    fragments: Option<&crate::transport::Fragments>,
) -> bool
where
    S: Stream<Item = Result<Frame, TransportError>> + Unpin,
{
    // The credentials' expiry. A `refresh` (a task in `calls`) moves the
    // deadline; the loop re-reads it every turn, and a finished refresh
    // wakes the loop through `join_next`, so the timer is re-armed before
    // the old deadline can fire.
    // The timer exists only while there is a deadline (boxed: most
    // connections have none, and the reader's task stays smaller).
    let mut armed = None;
    let mut expiry: Option<std::pin::Pin<Box<tokio::time::Sleep>>> = None;
    loop {
        let deadline = session.deadline();
        if deadline != armed {
            armed = deadline;
            match (armed, &mut expiry) {
                (Some(d), Some(timer)) => timer.as_mut().reset(d),
                (Some(d), None) => expiry = Some(Box::pin(tokio::time::sleep_until(d))),
                (None, _) => expiry = None,
            }
        }
        let expired = futures::future::poll_fn(|cx| match &mut expiry {
            Some(timer) => timer.as_mut().poll(cx),
            None => std::task::Poll::Pending,
        });
        tokio::select! {
            biased;
            _ = session.stops.wait(STOP_READ) => return false,
            Some(_) = calls.join_next(), if !calls.is_empty() => {}
            item = stream.next() => match item {
                None => {
                    session.close_with(DisconnectReason::ConnectionLost, None, true);
                    return true;
                }
                Some(Err(e)) => {
                    tracing::debug!(connection = %session.id, error = %e, "read failed");
                    match e.close_code() {
                        Some(code) => {
                            session.close(DisconnectReason::ProtocolViolation(code), code, &e.to_string(), true);
                            return false;
                        }
                        None => {
                            session.close_with(DisconnectReason::ConnectionLost, None, true);
                            return true;
                        }
                    }
                }
                Some(Ok(frame)) => {
                    session.alive.store(true, Ordering::Relaxed);
                    // Every frame costs a token: a control frame one, a
                    // message one per frame it came in.
                    let cost = || fragments.map_or(1, |f| u64::from(f.next_message()));
                    match frame {
                        Frame::Close(cf) => {
                            let (code, text) = match &cf {
                                Some(c) => (Some(c.code), c.reason.clone()),
                                None => (None, String::new()),
                            };
                            // Echo the peer's code, as RFC 6455 asks.
                            let echo = CloseFrame { code: code.unwrap_or(CloseCode::NORMAL), reason: String::new() };
                            // The peer will read nothing more after its close:
                            // what is still queued is dropped.
                            session.close_with(DisconnectReason::ClientClosed { code, reason: text }, Some(echo), true);
                            return true;
                        }
                        // Transports leave answering pings to the session, so
                        // the pong goes out through the one writer, in order.
                        // Over the rate, a ping is not answered (a control
                        // frame has no `ref` to refuse it with).
                        Frame::Ping(payload) => {
                            if charge(session, 1).is_ok() {
                                session.outbox.push_control(Frame::Pong(payload));
                            }
                        }
                        Frame::Pong(_) => {
                            let _ = charge(session, 1);
                        }
                        Frame::Text(bytes) => on_message(hub, session, calls, false, bytes, cost()),
                        Frame::Binary(bytes) => on_message(hub, session, calls, true, bytes, cost()),
                    }
                }
            },
            _ = expired => {
                session.close(
                    DisconnectReason::TokenExpired,
                    CloseCode::TOKEN_EXPIRED,
                    "token expired: refresh and reconnect",
                    false,
                );
                return false;
            }
        }
    }
}

/// Takes `cost` tokens from the connection's message bucket.
/// `Err(Some(wait))`: over the rate, the frame must be refused;
/// `Err(None)`: over it too often, the connection is being closed with 1008
/// for refusing to slow down.
fn charge(session: &Session, cost: u64) -> Result<(), Option<std::time::Duration>> {
    let Some(rate) = &session.rate else { return Ok(()) };
    let Err(wait) = (0..cost).try_for_each(|_| rate.messages.check()) else { return Ok(()) };
    if rate.violations.check().is_err() {
        session.close(DisconnectReason::RateLimited, CloseCode::POLICY, "rate limit exceeded", false);
        return Err(None);
    }
    Err(Some(wait))
}

/// Charges a message `cost` tokens. `false`: the message must not be
/// processed (it was answered with 420, or the connection is closing).
fn within_rate(session: &Session, bytes: &[u8], cost: u64) -> bool {
    let wait = match charge(session, cost) {
        Ok(()) => return true,
        Err(None) => return false,
        Err(Some(wait)) => wait,
    };
    let retry_after_ms = u64::try_from(wait.as_micros().div_ceil(1000)).unwrap_or(u64::MAX).max(1);
    session.send_error_data(
        Envelope::reference_of(session.format, bytes),
        ErrorCode::RATE_LIMITED.0,
        "rate limit exceeded",
        &serde_json::json!({ "retry_after_ms": retry_after_ms }),
    );
    false
}

fn on_message(hub: &Hub, session: &Arc<Session>, calls: &mut Calls, binary: bool, bytes: bytes::Bytes, cost: u64) {
    let cfg = &hub.inner.config;
    if bytes.len() > cfg.max_message_size {
        // Transports that enforce the limit themselves never get here.
        session.close(
            DisconnectReason::ProtocolViolation(CloseCode::TOO_BIG),
            CloseCode::TOO_BIG,
            "message too big",
            true,
        );
        return;
    }
    if !within_rate(session, &bytes, cost) {
        return;
    }
    if binary != session.format.is_binary() {
        let msg = if binary { "binary frame on a JSON connection" } else { "text frame on a MessagePack connection" };
        return session.send_error(None, ErrorCode::UNSUPPORTED_FRAME.0, msg);
    }
    let env = match Envelope::decode(session.format, &bytes) {
        Ok(env) => env,
        Err(e) => {
            return session.send_error(Envelope::reference_of(session.format, &bytes), e.code().0, &e.to_string())
        }
    };
    if let Some(data) = &env.data {
        if cfg.max_payload_depth < crate::protocol::MAX_DEPTH && data.exceeds_depth(cfg.max_payload_depth) {
            let msg = format!("`data` nested deeper than {}", cfg.max_payload_depth);
            return session.send_error(env.reference, ErrorCode::BAD_REQUEST.0, &msg);
        }
    }
    match env.kind {
        Kind::Ping => session.send_parts(&Parts { reference: env.reference, ..Parts::new(Kind::Pong) }),
        Kind::Pong => {}
        Kind::Join => on_join(hub, session, calls, env),
        Kind::Leave => on_leave(hub, session, env),
        Kind::Call => on_call(hub, session, calls, env),
        Kind::Presence => hub.extension_request(session, env),
        Kind::Refresh => on_refresh(hub, session, calls, env),
        other => session.send_error(
            env.reference,
            ErrorCode::BAD_REQUEST.0,
            &format!("message type `{other}` is not sent by clients"),
        ),
    }
}

fn room_field(session: &Session, env: &Envelope) -> Option<String> {
    let Some(room) = env.room.as_deref() else {
        session.send_error(env.reference, ErrorCode::BAD_REQUEST.0, &format!("`{}` needs a `room`", env.kind));
        return None;
    };
    if let Err(why) = validate_room_name(room) {
        session.send_error(env.reference, ErrorCode::BAD_REQUEST.0, why);
        return None;
    }
    Some(room.to_owned())
}

fn room_reply(session: &Session, reference: Option<u64>, room: &str) {
    if let Some(r) = reference {
        #[derive(serde::Serialize)]
        struct JoinReply<'a> {
            room: &'a str,
        }
        if let Ok(p) = Payload::encode(session.format, &JoinReply { room }) {
            session.send_reply(r, &p);
        }
    }
}

/// One request in flight, counted in its session until dropped. Holds the
/// session weakly: permits are kept in the session's own call queues.
pub(crate) struct Permit(std::sync::Weak<Session>);

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(session) = self.0.upgrade() {
            session.inflight.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

fn acquire(session: &Arc<Session>, reference: Option<u64>) -> Option<Permit> {
    let max = session.max_inflight;
    match session.inflight.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1)) {
        Ok(_) => Some(Permit(Arc::downgrade(session))),
        Err(_) => {
            session.send_error(reference, ErrorCode::TOO_MANY_REQUESTS.0, "too many requests in flight");
            None
        }
    }
}

fn on_join(hub: &Hub, session: &Arc<Session>, calls: &mut Calls, env: Envelope) {
    let Some(room) = room_field(session, &env) else { return };
    if session.is_member(&room) {
        return room_reply(session, env.reference, &room);
    }
    let max_params = hub.inner.config.max_join_params_size;
    if env.data.as_ref().is_some_and(|d| d.bytes().len() > max_params) {
        let msg = format!("join params larger than {max_params} bytes");
        return session.send_error(env.reference, ErrorCode::BAD_REQUEST.0, &msg);
    }
    if !session.allows_room(&room) {
        return session.send_error(env.reference, ErrorCode::FORBIDDEN.0, "token does not allow this room");
    }
    let want = match (env.offset, env.epoch.as_deref(), env.rewind) {
        (Some(_), Some(_), Some(_)) => {
            return session.send_error(env.reference, ErrorCode::BAD_REQUEST.0, "`rewind` cannot go with a position");
        }
        (Some(offset), Some(epoch), None) => {
            if epoch.len() > MAX_EPOCH_LEN {
                return session.send_error(env.reference, ErrorCode::BAD_REQUEST.0, "`epoch` is longer than 64 bytes");
            }
            Want::Since(StreamPosition { offset, epoch: Arc::from(epoch) })
        }
        (None, None, Some(n)) => Want::Rewind(usize::try_from(n).unwrap_or(usize::MAX)),
        (None, None, None) => Want::Live,
        _ => {
            let msg = "a recovering `join` needs both `offset` and `epoch`";
            return session.send_error(env.reference, ErrorCode::BAD_REQUEST.0, msg);
        }
    };
    let Some(permit) = acquire(session, env.reference) else { return };
    let (hub, session) = (hub.clone(), session.clone());
    let guard = TaskGuard::new(&hub.inner);
    calls.spawn(async move {
        let _guard = guard;
        let _permit = permit;
        let timeout = hub.inner.config.handler_timeout;
        // A panic in the host's join authorizer is answered with a 500, as a
        // panicking handler is; uncaught, the join would never be answered.
        let join = AssertUnwindSafe(hub.join_session(&session, &room, env.data, want, env.reference)).catch_unwind();
        match tokio::time::timeout(timeout, join).await {
            Err(_) => session.send_error(env.reference, ErrorCode::TIMEOUT.0, "join timed out"),
            Ok(Err(_panic)) => session.send_error(env.reference, ErrorCode::INTERNAL.0, "join failed"),
            Ok(Ok(Err(e))) => session.send_call_error(env.reference, &e),
            Ok(Ok(Ok(replied))) => {
                if !replied {
                    room_reply(&session, env.reference, &room);
                }
                // Presence state goes right after the reply, never before.
                hub.extension_joined(&session, &room);
            }
        }
    });
}

fn on_leave(hub: &Hub, session: &Arc<Session>, env: Envelope) {
    let Some(room) = room_field(session, &env) else { return };
    if hub.leave_session(session, &room) {
        room_reply(session, env.reference, &room);
    } else {
        session.send_error(env.reference, ErrorCode::NOT_JOINED.0, "not a member of this room");
    }
}

fn on_call(hub: &Hub, session: &Arc<Session>, calls: &mut Calls, env: Envelope) {
    let reference = env.reference;
    let Some(event) = env.event.as_deref() else {
        return session.send_error(reference, ErrorCode::BAD_REQUEST.0, "`call` needs an `event`");
    };
    if event.is_empty() || event.len() > crate::hub::MAX_EVENT_NAME_LEN {
        return session.send_error(reference, ErrorCode::BAD_REQUEST.0, "event name must be 1 to 128 bytes");
    }
    let room = match env.room.as_deref() {
        None => None,
        Some(r) => match session.rooms.lock().iter().find(|j| &***j == r) {
            Some(joined) => Some(joined.clone()),
            None => return session.send_error(reference, ErrorCode::NOT_JOINED.0, "not a member of this room"),
        },
    };
    let Some((event, handler)) = hub.inner.handlers.get_key_value(event) else {
        let msg = format!("no handler for event `{}`", crate::protocol::truncate(event));
        return session.send_error(reference, ErrorCode::UNKNOWN_EVENT.0, &msg);
    };
    let Some(permit) = acquire(session, reference) else { return };
    let queued_room = room.clone();
    let call = Call { hub: hub.clone(), session: session.clone(), room, event: event.clone() };
    let handler = handler.clone();
    let data = env.data;
    // The handler is invoked inside the task, so even a panic in its
    // synchronous part is caught and answered with a 500.
    let make: MakeCall = Box::new(move || handler.call(call, data));
    let queued = QueuedCall { make, reference, _permit: permit };
    let Some(room) = queued_room else {
        let session = session.clone();
        let guard = TaskGuard::new(&hub.inner);
        let timeout = hub.inner.config.handler_timeout;
        calls.spawn(async move {
            let _guard = guard;
            run_call(&session, timeout, queued).await;
        });
        return;
    };
    let start_worker = {
        let mut queues = session.call_queues.lock();
        match queues.iter_mut().find(|q| q.room == room) {
            Some(q) => {
                q.calls.push_back(queued);
                false
            }
            None => {
                queues.push(RoomCalls { room: room.clone(), calls: VecDeque::from([queued]) });
                true
            }
        }
    };
    if start_worker {
        let session = session.clone();
        let guard = TaskGuard::new(&hub.inner);
        let timeout = hub.inner.config.handler_timeout;
        calls.spawn(async move {
            let _guard = guard;
            room_worker(session, room, timeout).await;
        });
    }
}

/// A call waiting to run: how to start its handler, its `ref`, its permit.
pub(crate) struct QueuedCall {
    make: MakeCall,
    reference: Option<u64>,
    _permit: Permit,
}

type MakeCall = Box<dyn FnOnce() -> futures::future::BoxFuture<'static, Result<Payload, CallError>> + Send>;

/// The queued calls of one room of one connection.
pub(crate) struct RoomCalls {
    room: Arc<str>,
    calls: VecDeque<QueuedCall>,
}

/// Runs `room`'s queued calls one after another until the queue is empty,
/// then removes it (a call queued after that starts a new worker).
async fn room_worker(session: Arc<Session>, room: Arc<str>, timeout: std::time::Duration) {
    loop {
        let next = {
            let mut queues = session.call_queues.lock();
            let Some(pos) = queues.iter().position(|q| q.room == room) else { return };
            match queues[pos].calls.pop_front() {
                Some(call) => call,
                None => {
                    queues.swap_remove(pos);
                    return;
                }
            }
        };
        run_call(&session, timeout, next).await;
    }
}

/// Runs one call's handler under the timeout, catching panics, and answers.
async fn run_call(session: &Session, timeout: std::time::Duration, queued: QueuedCall) {
    let QueuedCall { make, reference, _permit } = queued;
    let fut = async move { make().await };
    match tokio::time::timeout(timeout, AssertUnwindSafe(fut).catch_unwind()).await {
        Err(_) => session.send_error(reference, ErrorCode::TIMEOUT.0, "handler timed out"),
        Ok(Err(_panic)) => session.send_error(reference, ErrorCode::INTERNAL.0, "handler failed"),
        Ok(Ok(Err(e))) => session.send_call_error(reference, &e),
        Ok(Ok(Ok(payload))) => {
            if let Some(r) = reference {
                session.send_reply(r, &payload);
            }
        }
    }
}

/// `refresh`: checks the new token with the hub's [`Refresh`](crate::auth::Refresh)
/// hook (as a task, like a call: it may be slow) and, when it is for the
/// same user, makes its expiry and room restriction the connection's.
fn on_refresh(hub: &Hub, session: &Arc<Session>, calls: &mut Calls, env: Envelope) {
    let reference = env.reference;
    if hub.inner.refresh.is_none() {
        return session.send_error(reference, ErrorCode::BAD_REQUEST.0, "this server does not accept `refresh`");
    }
    #[derive(serde::Deserialize)]
    struct Token {
        token: String,
    }
    let Some(Ok(Token { token })) = env.data.as_ref().map(Payload::decode::<Token>) else {
        let msg = "`refresh` needs `data: {\"token\": \"…\"}`";
        return session.send_error(reference, ErrorCode::BAD_REQUEST.0, msg);
    };
    let Some(permit) = acquire(session, reference) else { return };
    let (hub, session) = (hub.clone(), session.clone());
    let guard = TaskGuard::new(&hub.inner);
    calls.spawn(async move {
        let _guard = guard;
        let _permit = permit;
        let Some(refresh) = &hub.inner.refresh else { return };
        let current = session.grant.lock().refreshed.as_deref().unwrap_or(&session.identity).clone();
        let checked = AssertUnwindSafe(async { refresh.refresh(&current, token).await }).catch_unwind();
        let renewed = match tokio::time::timeout(hub.inner.config.handler_timeout, checked).await {
            Err(_) => return session.send_error(reference, ErrorCode::TIMEOUT.0, "refresh timed out"),
            Ok(Err(_panic)) => return session.send_error(reference, ErrorCode::INTERNAL.0, "refresh failed"),
            Ok(Ok(Err(e))) => return session.send_call_error(reference, &e),
            Ok(Ok(Ok(identity))) => identity,
        };
        if renewed.user_id() != session.identity.user_id() {
            return session.send_error(reference, ErrorCode::FORBIDDEN.0, "token is for another user");
        }
        let grant = Grant { deadline: Grant::deadline_of(&renewed), refreshed: Some(Box::new(renewed)) };
        let expires_in_ms =
            grant.deadline.map(|d| d.saturating_duration_since(tokio::time::Instant::now()).as_millis() as u64);
        *session.grant.lock() = grant;
        if let Some(r) = reference {
            #[derive(serde::Serialize)]
            struct Renewed {
                expires_in_ms: Option<u64>,
            }
            if let Ok(p) = Payload::encode(session.format, &Renewed { expires_in_ms }) {
                session.send_reply(r, &p);
            }
        }
    });
}
