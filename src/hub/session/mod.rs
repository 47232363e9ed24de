//! One connection: its bounded outbound queue, its writer, its reader.
//!
//! Tasks per connection: the reader runs in the task that called
//! [`Hub::serve`](crate::Hub::serve); the writer is one spawned task; each
//! in-flight call or join is a short-lived task bounded by the connection's
//! semaphore. Heartbeats are driven by the hub's shared timer wheel (see
//! `heartbeat.rs`), not by a task here.

mod call;
mod join;
mod leave;
pub(crate) mod log;
mod outbox;
mod reader;
mod refresh;
#[cfg_attr(not(feature = "sse"), allow(dead_code))]
pub(crate) mod sse_stream;
mod writer;

use super::handler::{Call, CallError};
use super::room::validate_room_name;
use super::stream::Want;
use super::{ConnectionState, DisconnectReason, Hub, OverflowPolicy, TaskGuard};
use crate::auth::Identity;
use crate::history::StreamPosition;
use crate::protocol::{CloseCode, Envelope, ErrorCode, Format, Kind, Parts, Payload, Version};
use crate::transport::{Capabilities, CloseFrame, Frame, Framing, Transport, TransportError};
use crate::util::Limiter;
use crate::ConnectionId;
use bytes::Bytes;
use call::{on_call, RoomCalls};
use futures::{FutureExt, Sink, SinkExt, Stream, StreamExt};
use join::on_join;
use leave::on_leave;
pub(crate) use outbox::{Outbox, Push, Tag};
use parking_lot::Mutex;
use reader::{acquire, read_loop, room_field, room_reply, Permit};
use refresh::on_refresh;
use std::collections::VecDeque;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU8, Ordering};
use std::sync::Arc;
use std::task::ready;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use writer::write_loop;

/// Most frames read from a peer after the server's close frame while
/// waiting for the peer's own: what a well-behaved peer had in flight.
const MAX_FRAMES_AFTER_CLOSE: u32 = 64;

/// Shared state of one connection. Reachable from rooms (for fan-out), the
/// hub's session index, the heartbeat wheel (weakly) and handler calls.
pub(crate) struct Session {
    pub(crate) id: ConnectionId,
    pub(crate) format: Format,
    /// The protocol version (from the subprotocol): in v2 events are
    /// compact arrays.
    pub(crate) version: Version,
    pub(crate) identity: Identity,
    /// Where and when it came from, for the admin API.
    pub(crate) origin: crate::hub::admin::Origin,
    /// What the transport can do (heartbeat form, liveness, framing).
    caps: Capabilities,
    /// Data frames are compressed from this size on
    /// ([`Transport::compress_above`](crate::transport::Transport::compress_above)).
    compress_above: Option<u32>,
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
    /// For an event stream (SSE): the rooms the session joins itself and
    /// how the writer identifies its events (`sse_stream.rs`).
    pub(crate) stream: Option<Arc<sse_stream::StreamSpec>>,
}

/// Where the answer to a join goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum JoinAnswer {
    /// Nowhere (a join by the host).
    Silent,
    /// A `reply` (or `error`) with the client's `ref`, when it gave one.
    Reply(Option<u64>),
    /// A `$joined` (or `$join_error`) event of the stream's room of this
    /// index (`sse_stream.rs`).
    Stream(usize),
}

impl JoinAnswer {
    /// Whether a reply is sent at all.
    pub(crate) fn replies(self) -> bool {
        !matches!(self, JoinAnswer::Silent | JoinAnswer::Reply(None))
    }
}

/// A connection's message bucket, and the bucket of its refusals: when
/// that one is empty too, the connection is closed with 1008.
struct Rate {
    messages: Limiter,
    violations: Limiter,
    /// Joins and leaves (`HubConfig::join_rate`).
    joins: Option<Limiter>,
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
        (format, version): (Format, Version),
        identity: Identity,
        (caps, compress_above): (Capabilities, Option<usize>),
        origin: crate::hub::admin::Origin,
        hub: &Hub,
    ) -> Session {
        let cfg = &hub.inner.config;
        Session {
            id,
            format,
            version,
            origin,
            caps,
            compress_above: compress_above.map(|n| u32::try_from(n).unwrap_or(u32::MAX)),
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
                joins: cfg.join_rate.as_ref().map(|l| l.limiter()),
            }),
            grant: Mutex::new(Grant { refreshed: None, deadline: Grant::deadline_of(&identity) }),
            identity,
            stream: None,
        }
    }

    /// Makes this the session of an event stream that joins `spec`'s rooms
    /// (`None`: of another transport), and decides whether it may read
    /// room logs.
    pub(crate) fn with_stream(mut self, spec: Option<sse_stream::StreamSpec>) -> Session {
        self.stream = spec.map(Arc::new);
        // Framed for the wire, a run of room events is a run of bytes a
        // writer copies as it is: an event stream's (SSE) and a WebSocket's.
        let reads_logs = match self.caps.framing {
            Some(Framing::EventStream) => self.stream.is_some(),
            Some(Framing::WebSocket) => true,
            None => false,
        };
        if reads_logs {
            self.outbox.allow_logs();
        }
        self
    }

    /// Answers a join that went through the hub's join path: the reply's
    /// `data`, and for a recoverable room the position its live stream
    /// starts at and whether it recovered.
    pub(crate) fn answer_join(
        &self,
        answer: JoinAnswer,
        data: &Payload,
        position: Option<(Arc<str>, u64)>,
        recovered: Option<bool>,
    ) {
        match answer {
            JoinAnswer::Silent | JoinAnswer::Reply(None) => {}
            JoinAnswer::Reply(Some(r)) => self.send_reply(r, data),
            JoinAnswer::Stream(index) => self.stream_joined(index, Some(data), position, recovered),
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

    /// Whether its room events may come from room logs rather than its
    /// outbox (framed frames: `log.rs`; decided in `with_stream`).
    pub(crate) fn reads_logs(&self) -> bool {
        self.outbox.reads_logs()
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
        Wire {
            format: self.format,
            version: self.version,
            framing: self.caps.framing,
            compress_above: self.compress_above,
        }
    }

    /// A notice the writer sends itself (`lagged`, `gap`), as a frame.
    fn notice(&self, parts: Parts<'_>) -> Frame {
        self.frame(self.wire().prepare(parts.kind, parts.event, parts.encode_as(self.format, self.version)))
    }

    /// Queues an envelope already in this connection's [`Wire`] form (from
    /// a broadcast's per-form cache) under the overflow policy.
    pub(crate) fn push_prepared(&self, bytes: bytes::Bytes) {
        if let Push::Overflow = self.outbox.push_queued(bytes, None) {
            self.close(DisconnectReason::SlowConsumer, CloseCode::SLOW_CONSUMER, "outbound queue full", true);
        }
    }

    /// Queues an envelope already in this connection's [`Wire`] form only if
    /// the queue has room for it, whatever the overflow policy. `false`: it
    /// did not fit (or the connection is closing), and nothing was queued,
    /// dropped or closed; the caller sends something else later.
    pub(crate) fn offer_prepared(&self, bytes: bytes::Bytes) -> bool {
        matches!(self.outbox.push_if_room(bytes), Push::Queued)
    }

    /// Queues an event of a recoverable room, in this connection's
    /// [`Wire`] form: if the drop-oldest policy drops it, the client is
    /// told the room and offset range in a `gap`.
    pub(crate) fn push_tagged(&self, bytes: bytes::Bytes, room: &Arc<str>, offset: u64) {
        if let Push::Overflow = self.outbox.push_queued(bytes, Some(Tag::Offset(room.clone(), offset))) {
            self.close(DisconnectReason::SlowConsumer, CloseCode::SLOW_CONSUMER, "outbound queue full", true);
        }
    }

    /// Queues a frame in this connection's [`Wire`] form with a note for an
    /// event stream's writer, under the overflow policy.
    fn push_noted(&self, bytes: bytes::Bytes, note: sse_stream::Note) {
        if let Push::Overflow = self.outbox.push_queued(bytes, Some(Tag::Stream(Box::new(note)))) {
            self.close(DisconnectReason::SlowConsumer, CloseCode::SLOW_CONSUMER, "outbound queue full", true);
        }
    }

    /// Queues an envelope (a text or binary frame by format) under the
    /// overflow policy.
    pub(crate) fn send_parts(&self, parts: &Parts<'_>) {
        crate::metrics::messages_out(parts.kind, 1);
        let bytes = parts.encode_as(self.format, self.version);
        self.push_prepared(self.wire().prepare(parts.kind, parts.event, bytes));
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
        let frame = if self.caps.native_ping {
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

    /// [`Session::close`] with any close frame (or none). Returns whether
    /// this call decided the close (`false`: an earlier one did).
    pub(crate) fn close_with(&self, reason: DisconnectReason, frame: Option<CloseFrame>, discard: bool) -> bool {
        {
            let mut r = self.reason.lock();
            if r.is_some() {
                return false;
            }
            *r = Some(reason);
        }
        if self.state() != ConnectionState::Closed {
            self.set_state(ConnectionState::Closing);
        }
        self.outbox.close(frame, discard);
        self.stops.raise(STOP_READ);
        true
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

/// The form of a connection's queued frames: its format and protocol
/// version, the framing its transport takes them in
/// ([`Capabilities::framing`]),
/// and whether compressed with `permessage-deflate`
/// ([`Transport::compress_above`](crate::transport::Transport::compress_above)).
/// A broadcast prepares each form once ([`Wire::COUNT`] at most), however
/// many recipients: one compression per broadcast for every member that
/// negotiated it.
///
/// The threshold is not part of the form: when connections with different
/// thresholds (different `WsConfig`s on one hub) share a broadcast, the
/// first one prepared decides whether it is compressed for all of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Wire {
    pub(crate) format: Format,
    pub(crate) version: Version,
    framing: Option<Framing>,
    compress_above: Option<u32>,
}

impl Wire {
    /// Formats × versions × (unframed, WebSocket-framed, WebSocket-framed
    /// and compressed, event-stream-framed).
    pub(crate) const COUNT: usize = Format::COUNT * Version::COUNT * 4;

    /// This form unframed and uncompressed: the envelope itself.
    pub(crate) fn plain(self) -> Wire {
        Wire { framing: None, compress_above: None, ..self }
    }

    /// For a compressing form, the framed uncompressed one of the same
    /// format and version (what its members get when a message is not
    /// compressed).
    pub(crate) fn uncompressed(self) -> Option<Wire> {
        self.compress_above.map(|_| Wire { compress_above: None, ..self })
    }

    /// The unframed version 1 form of `format`.
    #[cfg(test)]
    pub(crate) fn unframed(format: Format) -> Wire {
        Wire { format, version: Version::V1, framing: None, compress_above: None }
    }

    /// The framed form of `format` (version 1), compressed from `above` bytes on.
    #[cfg(test)]
    pub(crate) fn compressing(format: Format, above: u32) -> Wire {
        Wire { format, version: Version::V1, framing: Some(Framing::WebSocket), compress_above: Some(above) }
    }

    pub(crate) fn index(self) -> usize {
        let form = match (self.framing, self.compress_above) {
            (None, _) => 0,
            (Some(Framing::WebSocket), None) => 1,
            (Some(Framing::WebSocket), Some(_)) => 2,
            (Some(Framing::EventStream), _) => 3,
        };
        (self.format.index() * Version::COUNT + self.version.index()) * 4 + form
    }

    /// An encoded envelope of this form's format, in this form. `kind` and
    /// `event` are the envelope's type and event name: a framing that names
    /// its messages ([`Framing::EventStream`]) takes its name from them, so
    /// no transport reads an envelope to learn it.
    pub(crate) fn prepare(self, kind: Kind, event: Option<&str>, envelope: Bytes) -> Bytes {
        if let Some(frame) = self.compressed(&envelope) {
            return frame;
        }
        match self.framing {
            // Version 2's compact event is an unnamed event (a `message`):
            // the array names its room and event (`docs/sse.md` §3.1).
            Some(Framing::EventStream) if kind == Kind::Event && self.version == Version::V2 => {
                Framing::EventStream.frame(false, &envelope)
            }
            Some(Framing::EventStream) => {
                Framing::EventStream.frame_named(false, &sse_stream::event_name(kind, event), &envelope)
            }
            Some(framing) => framing.frame(self.format.is_binary(), &envelope),
            None => envelope,
        }
    }

    /// The envelope compressed and framed, when this form compresses it
    /// (big enough, and it shrinks).
    pub(crate) fn compressed(self, envelope: &[u8]) -> Option<Bytes> {
        let above = self.compress_above?;
        let framing = self.framing?;
        if envelope.len() < above as usize {
            return None;
        }
        framing.frame_compressed(self.format.is_binary(), envelope)
    }
}

/// The connection's handler tasks. The set is created by the first one
/// and dropped when the last has ended: an empty `JoinSet` is an
/// allocation, and most connections are idle.
#[derive(Default)]
struct Calls(Option<JoinSet<()>>);

impl Calls {
    fn spawn(&mut self, task: impl Future<Output = ()> + Send + 'static) {
        self.0.get_or_insert_with(JoinSet::new).spawn(task);
    }

    fn is_empty(&self) -> bool {
        self.0.as_ref().is_none_or(JoinSet::is_empty)
    }

    /// The next handler task to end. The set goes once it is empty
    /// again: most connections call a few times (a join) and then only
    /// listen, and would keep its allocation for their whole life.
    async fn join_next(&mut self) -> Option<()> {
        let set = self.0.as_mut()?;
        let done = set.join_next().await.map(|_| ());
        if set.is_empty() {
            self.0 = None;
        }
        done
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

/// A box's value, the box freed at once. `*boxed` in an `async` block
/// moves the value out but frees the allocation only when the block ends:
/// for the session's block, at the end of the connection.
#[allow(clippy::boxed_local)] // taking the box is the point: it is freed here
fn unbox<T>(boxed: Box<T>) -> T {
    *boxed
}

/// Runs a connection to its end. Called by [`Hub::serve`].
pub(crate) fn run<T: Transport>(hub: Hub, session: Arc<Session>, transport: T) -> impl Future<Output = ()> + Send {
    let fragments = transport.fragments();
    let (sink, mut stream) = transport.split();
    // Boxed until the writer takes it: a value this block captures keeps
    // its room in the connection's future for the connection's whole life,
    // even once moved out, and the sink is only passed on to the writer
    // (through `unbox`, which frees the box then).
    let sink = Box::new(sink);
    let task = TaskGuard::new(&hub.inner);
    // An `async move` block, not an `async fn`: an `async fn` moves its
    // arguments into locals, holding each twice for the connection's life;
    // a block uses what it captured in place.
    async move {
        let _task = task;
        // Counted before the `hello`: a client that has it sees itself counted.
        crate::metrics::connected(session.origin.transport());
        let writer = {
            let guard = TaskGuard::new(&hub.inner);
            // `map`, not an `async` wrapper: a wrapper would keep the captured
            // future and the awaited one, two copies per connection.
            tokio::spawn(write_loop(session.clone(), unbox(sink)).map(move |sent| {
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
        if let Some(spec) = session.stream.clone() {
            // An event stream's own joins, before anything the client sends
            // is read, so a POST naming one of its rooms finds the
            // membership. A close decided meanwhile stops them.
            tokio::select! {
                _ = sse_stream::join_rooms(&hub, &session, &spec) => {}
                _ = session.stops.wait(STOP_READ) => {}
            }
        }

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
        // After a heartbeat timeout the peer has shown no sign of life for
        // the whole timeout: waiting for its close reply as well would only
        // hold a zombie (its task and its admission slot) for another
        // `close_timeout` (issue 18: a half-open peer is freed within
        // `max(I, T) + T`).
        let peer_silent = matches!(session.reason(), Some(DisconnectReason::HeartbeatTimeout));
        if sent_close && !peer_closed && !peer_silent {
            // Wait (bounded) for the peer's close frame so the close handshake
            // completes cleanly; anything else it sends now is ignored. Bounded
            // in frames too, not only in time: a peer closed for flooding
            // (1008, 1009) that keeps flooding would otherwise have every frame
            // it sends for `close_timeout` parsed, with no rate limit (issue
            // 24: 16 reconnecting ping flooders held bystanders at ~0.5 s).
            let drain = async {
                let mut frames = 0;
                while let Some(Ok(frame)) = stream.next().await {
                    frames += 1;
                    if matches!(frame, Frame::Close(_)) || frames >= MAX_FRAMES_AFTER_CLOSE {
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
        crate::metrics::disconnected(session.origin.transport(), reason.metric_labels(), session.outbox.peak_bytes());
        hub.hook_disconnect(&session, &reason);
        hub.session_ended();
    }
}

#[cfg(test)]
mod wire_tests {
    use super::*;
    use crate::protocol::Version;

    /// Every form of a queued frame has its own slot in a broadcast's cache
    /// (so one encoding serves exactly the members of that form), and a
    /// framed form is the framing's frame of the plain envelope, reached
    /// through [`Framing::frame`].
    #[test]
    fn each_wire_form_has_its_own_cache_slot_and_frames_through_its_framing() {
        let mut seen = std::collections::HashSet::new();
        for format in [Format::Json, Format::MsgPack] {
            for version in [Version::V1, Version::V2] {
                for framing in [None, Some(Framing::WebSocket), Some(Framing::EventStream)] {
                    let ws = framing == Some(Framing::WebSocket);
                    let compress = if ws { vec![None, Some(16)] } else { vec![None] };
                    for compress_above in compress {
                        let wire = Wire { format, version, framing, compress_above };
                        assert!(wire.index() < Wire::COUNT, "{wire:?}");
                        assert!(seen.insert(wire.index()), "two forms share slot {}: {wire:?}", wire.index());
                        assert_eq!(wire.plain(), Wire { format, version, framing: None, compress_above: None });
                    }
                }
            }
        }
        assert_eq!(seen.len(), Wire::COUNT);
        let envelope = Bytes::from_static(b"{\"type\":\"event\"}");
        let framed = Wire {
            format: Format::Json,
            version: Version::V1,
            framing: Some(Framing::WebSocket),
            compress_above: None,
        };
        assert_eq!(
            framed.prepare(Kind::Event, Some("e"), envelope.clone()),
            Framing::WebSocket.frame(false, &envelope)
        );
        assert_eq!(Wire::unframed(Format::Json).prepare(Kind::Event, Some("e"), envelope.clone()), envelope);
        let sse = Wire { framing: Some(Framing::EventStream), ..framed };
        assert_eq!(
            &sse.prepare(Kind::Event, Some("tick"), envelope.clone())[..],
            b"event: tick\ndata: {\"type\":\"event\"}\n\n"
        );
        assert_eq!(&sse.prepare(Kind::Hello, None, envelope.clone())[..14], b"event: $hello\n");
        // Version 2: a compact event is unnamed, every other type keeps its name.
        let sse2 = Wire { version: Version::V2, ..sse };
        let array = Bytes::from_static(b"[\"r\",\"tick\",1]");
        assert_eq!(&sse2.prepare(Kind::Event, Some("tick"), array)[..], b"data: [\"r\",\"tick\",1]\n\n");
        assert_eq!(&sse2.prepare(Kind::Hello, None, envelope)[..14], b"event: $hello\n");
    }
}
