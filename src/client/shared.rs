//! State shared by the application's handles and the connection task.
//!
//! Locking: one `parking_lot` mutex ([`Shared::state`]) guards the rooms,
//! the pending requests, the offline buffer and the current link. It is
//! held for short, synchronous steps only, never across an `.await`: a
//! sender clones the link's channel under the lock and awaits outside it.

use super::config::ClientConfig;
use super::error::{ClientError, ClientErrorKind};
use super::presence::PresenceView;
use super::room::{EventQueue, RoomEvent};
use super::status::Status;
use super::ClientStats;
use crate::protocol::{Envelope, Format, Kind, Payload, Version};
use bytes::Bytes;
use parking_lot::Mutex;
use serde::Serialize;
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

/// An encoded message on its way to the server.
#[derive(Debug)]
pub(crate) struct Outgoing {
    pub bytes: Bytes,
    /// The request's `ref`, when it has one (its pending entry is marked
    /// sent when the writer writes it).
    pub reference: Option<u64>,
    /// Held in the offline buffer while disconnected (otherwise dropped).
    pub buffered: bool,
    /// A message of the connection itself (join, pong, ping): never
    /// buffered, silently dropped with its connection.
    pub control: bool,
}

impl Outgoing {
    pub(crate) fn app(bytes: Bytes, reference: Option<u64>, buffered: bool) -> Outgoing {
        Outgoing { bytes, reference, buffered, control: false }
    }

    pub(crate) fn control(bytes: Bytes, reference: Option<u64>) -> Outgoing {
        Outgoing { bytes, reference, buffered: false, control: true }
    }
}

pub(crate) type Reply = Result<Payload, ClientError>;

#[derive(Debug)]
pub(crate) enum PendingKind {
    /// An application request (call, leave, presence): the answer goes here.
    Request(oneshot::Sender<Reply>),
    /// A join of `room` (the room's `join_ref`).
    Join { room: String },
    /// A fire-and-forget control message (ping, a leave nobody waits for).
    Internal,
    /// An in-band `refresh`: the reply schedules the next one.
    Refresh,
    /// The join of a room the application gave up while it was in flight:
    /// leave once it succeeds (unless the room is wanted again).
    LeaveOnJoin { room: String },
}

#[derive(Debug)]
pub(crate) struct Pending {
    pub kind: PendingKind,
    /// The connection generation it was written on; `None` while it waits
    /// in the offline buffer or a send queue.
    pub sent_on: Option<u64>,
}

/// A room the application wants to be in.
#[derive(Debug)]
pub(crate) struct RoomState {
    pub id: u64,
    pub params: Option<Payload>,
    pub rewind: Option<u64>,
    pub queue: Arc<EventQueue>,
    pub presence: watch::Sender<PresenceView>,
    /// Stream epoch and last delivered offset, in rooms with history.
    pub epoch: Option<String>,
    pub last_offset: Option<u64>,
    /// Offsets announced missing by a `gap` that a recovering rejoin may
    /// still deliver (bounded: at most [`MAX_MISSING`] ranges).
    pub missing: Vec<(u64, u64)>,
    /// The generation its last join was written on, and that join's ref.
    pub sent_on: Option<u64>,
    pub join_ref: Option<u64>,
    /// Joined on the current connection (its join was answered).
    pub joined: bool,
    /// Joined at least once (so the next join is a rejoin).
    pub ever_joined: bool,
    /// The first join's waiter.
    pub waiter: Option<oneshot::Sender<Result<(), ClientError>>>,
    /// A recovery from a `gap` is under way (leave sent, rejoin follows).
    pub recovering: bool,
    /// Restarts of the current recovery (after `lagged` notices).
    pub recovery_attempts: u8,
}

/// At most this many missing ranges are remembered per room; more make the
/// client give up recovering and ask the application to resynchronize.
pub(crate) const MAX_MISSING: usize = 16;

pub(crate) struct Link {
    pub tx: mpsc::Sender<Outgoing>,
    pub generation: u64,
}

#[derive(Default)]
pub(crate) struct State {
    pub link: Option<Link>,
    pub generation: u64,
    pub offline: VecDeque<Outgoing>,
    pub offline_bytes: usize,
    pub pending: HashMap<u64, Pending>,
    pub rooms: HashMap<String, RoomState>,
    /// Closed rooms' reasons, for handles that ask (bounded by the number
    /// of live handles: removed when a handle is dropped).
    pub closed_rooms: HashMap<(String, u64), ClientError>,
    pub max_message_size: Option<usize>,
    pub closed: bool,
}

#[derive(Default)]
pub(crate) struct Counters {
    pub reconnects: AtomicU64,
    pub late_replies: AtomicU64,
    pub offline_dropped: AtomicU64,
    pub volatile_dropped: AtomicU64,
    pub malformed: AtomicU64,
    pub unknown: AtomicU64,
    pub server_errors: AtomicU64,
    pub events_dropped: AtomicU64,
    pub server_lagged: AtomicU64,
}

pub(crate) struct Shared {
    pub config: ClientConfig,
    pub format: Format,
    /// The newest protocol version offered at the upgrade.
    pub version: Version,
    pub state: Mutex<State>,
    pub status: watch::Sender<Status>,
    pub counters: Counters,
    pub next_ref: AtomicU64,
    pub next_room_id: AtomicU64,
    pub direct: Arc<EventQueue>,
    pub direct_taken: std::sync::atomic::AtomicBool,
    pub stop: watch::Sender<bool>,
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shared").field("format", &self.format).field("status", &*self.status.borrow()).finish()
    }
}

fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

impl Shared {
    pub(crate) fn new(config: ClientConfig, (format, version): (Format, Version)) -> Shared {
        let direct = EventQueue::new(config.room_buffer);
        Shared {
            config,
            format,
            version,
            state: Mutex::new(State::default()),
            status: watch::Sender::new(Status::Connecting),
            counters: Counters::default(),
            next_ref: AtomicU64::new(1),
            next_room_id: AtomicU64::new(1),
            direct,
            direct_taken: false.into(),
            stop: watch::Sender::new(false),
        }
    }

    pub(crate) fn stats(&self) -> ClientStats {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let st = self.state.lock();
        ClientStats {
            reconnects: get(&c.reconnects),
            late_replies: get(&c.late_replies),
            offline_dropped: get(&c.offline_dropped),
            volatile_dropped: get(&c.volatile_dropped),
            malformed_messages: get(&c.malformed),
            unknown_messages: get(&c.unknown),
            server_errors: get(&c.server_errors),
            events_dropped: get(&c.events_dropped),
            server_lagged: get(&c.server_lagged),
            offline_buffered: st.offline.len(),
            offline_buffered_bytes: st.offline_bytes,
            pending_requests: st.pending.len(),
        }
    }

    pub(crate) fn count_late(&self) {
        add(&self.counters.late_replies, 1);
    }
    pub(crate) fn count_malformed(&self) {
        add(&self.counters.malformed, 1);
    }
    pub(crate) fn count_unknown(&self) {
        add(&self.counters.unknown, 1);
    }
    pub(crate) fn count_server_error(&self) {
        add(&self.counters.server_errors, 1);
    }

    pub(crate) fn payload<T: Serialize + ?Sized>(&self, value: &T) -> Result<Payload, ClientError> {
        Payload::encode(self.format, value).map_err(|e| ClientError::new(ClientErrorKind::Codec, e.to_string()))
    }

    pub(crate) fn encode(&self, env: &Envelope) -> Result<Bytes, ClientError> {
        env.encode(self.format).map_err(|e| ClientError::new(ClientErrorKind::Codec, e.to_string()))
    }

    pub(crate) fn next_ref(&self) -> u64 {
        self.next_ref.fetch_add(1, Ordering::Relaxed)
    }

    /// Pushes onto a room's (or the direct) stream, counting drops.
    pub(crate) fn deliver(&self, queue: &EventQueue, item: RoomEvent) {
        let dropped = queue.push(item);
        if dropped > 0 {
            add(&self.counters.events_dropped, dropped);
        }
    }

    /// Adds to the offline buffer (drop-oldest by count and bytes). Called
    /// with the state locked.
    fn buffer(&self, st: &mut State, out: Outgoing, front: bool) -> Result<(), ClientError> {
        if out.bytes.len() > self.config.offline_buffer_bytes {
            return Err(ClientError::new(ClientErrorKind::TooLarge, "message larger than the offline buffer"));
        }
        st.offline_bytes += out.bytes.len();
        if front {
            st.offline.push_front(out);
        } else {
            st.offline.push_back(out);
        }
        while st.offline.len() > self.config.offline_buffer_messages.max(1)
            || st.offline_bytes > self.config.offline_buffer_bytes
        {
            let Some(old) = st.offline.pop_front() else { break };
            st.offline_bytes -= old.bytes.len();
            add(&self.counters.offline_dropped, 1);
            if let Some(r) = old.reference {
                if let Some(p) = st.pending.remove(&r) {
                    fail(p, ClientError::new(ClientErrorKind::Dropped, "dropped from the full offline buffer"));
                }
            }
        }
        Ok(())
    }

    /// Puts messages that never reached the socket back at the front of the
    /// offline buffer, in their order (volatile ones are dropped).
    pub(crate) fn requeue_front(&self, st: &mut State, items: Vec<Outgoing>) {
        for out in items.into_iter().rev() {
            if out.control {
                continue; // the next connection sends its own
            }
            if out.buffered {
                if let Some(r) = out.reference {
                    if !st.pending.contains_key(&r) {
                        continue; // its caller gave up (timeout)
                    }
                }
                let _ = self.buffer(st, out, true);
            } else {
                add(&self.counters.volatile_dropped, 1);
            }
        }
    }

    /// Sends `out` on the live connection, or buffers / drops it while
    /// offline. Buffered messages wait for room in the send queue.
    pub(crate) async fn enqueue(&self, mut out: Outgoing) -> Result<(), ClientError> {
        loop {
            let tx = {
                let mut st = self.state.lock();
                if st.closed {
                    return Err(ClientError::closed());
                }
                if let Some(max) = st.max_message_size {
                    if out.bytes.len() > max {
                        return Err(ClientError::new(
                            ClientErrorKind::TooLarge,
                            format!("message of {} bytes, the server accepts {max}", out.bytes.len()),
                        ));
                    }
                }
                match &st.link {
                    Some(link) => link.tx.clone(),
                    None if out.buffered => return self.buffer(&mut st, out, false),
                    None => {
                        add(&self.counters.volatile_dropped, 1);
                        return Err(ClientError::new(ClientErrorKind::Offline, "not connected: volatile send dropped"));
                    }
                }
            };
            if !out.buffered {
                return tx.try_send(out).map_err(|_| {
                    add(&self.counters.volatile_dropped, 1);
                    ClientError::new(
                        ClientErrorKind::Offline,
                        "send queue full or connection lost: volatile send dropped",
                    )
                });
            }
            match tx.send(out).await {
                Ok(()) => return Ok(()),
                // The connection ended while we waited: try again (buffer it,
                // or use the next connection's link).
                Err(mpsc::error::SendError(back)) => out = back,
            }
        }
    }

    /// A request with a `ref`: waits for its reply or error within the call
    /// timeout (counted from now, offline time included).
    pub(crate) async fn request(&self, mut env: Envelope) -> Reply {
        let deadline = Instant::now() + self.config.call_timeout;
        let r = self.next_ref();
        env.reference = Some(r);
        let bytes = self.encode(&env)?;
        let (tx, rx) = oneshot::channel();
        {
            let mut st = self.state.lock();
            if st.closed {
                return Err(ClientError::closed());
            }
            st.pending.insert(r, Pending { kind: PendingKind::Request(tx), sent_on: None });
        }
        let result = tokio::time::timeout_at(deadline, async {
            self.enqueue(Outgoing::app(bytes, Some(r), true)).await?;
            rx.await.unwrap_or_else(|_| Err(ClientError::closed()))
        })
        .await;
        match result {
            Ok(reply) => {
                if reply.is_err() {
                    self.forget_request(r);
                }
                reply
            }
            Err(_) => {
                self.forget_request(r);
                Err(ClientError::timeout())
            }
        }
    }

    /// Drops a request's pending entry, and its message if it still waits in
    /// the offline buffer (a late reply is then counted and discarded).
    fn forget_request(&self, r: u64) {
        let mut st = self.state.lock();
        st.pending.remove(&r);
        if let Some(pos) = st.offline.iter().position(|o| o.reference == Some(r)) {
            if let Some(old) = st.offline.remove(pos) {
                st.offline_bytes -= old.bytes.len();
            }
        }
    }

    pub(crate) fn room_position(&self, room: &str, id: u64) -> Option<(u64, String)> {
        let st = self.state.lock();
        let r = st.rooms.get(room).filter(|r| r.id == id)?;
        Some((r.last_offset?, r.epoch.clone()?))
    }

    pub(crate) fn room_closed_reason(&self, room: &str, id: u64) -> Option<ClientError> {
        self.state.lock().closed_rooms.get(&(room.to_owned(), id)).cloned()
    }

    /// Forgets a room (no more rejoins) and, when connected and joined,
    /// sends `leave`. Returns the leave's message and ref to wait for.
    fn detach_room(&self, room: &str, id: u64, wait: bool) -> Option<(Outgoing, Option<oneshot::Receiver<Reply>>)> {
        let mut st = self.state.lock();
        st.closed_rooms.remove(&(room.to_owned(), id));
        if st.rooms.get(room).is_none_or(|r| r.id != id) {
            return None;
        }
        let state = st.rooms.remove(room)?;
        state.queue.close();
        let link_gen = st.link.as_ref().map(|l| l.generation);
        let live = state.sent_on.is_some() && state.sent_on == link_gen;
        let current = state.sent_on == Some(st.generation);
        if let Some(r) = state.join_ref {
            match st.pending.get_mut(&r) {
                // A join still in flight on the current connection: a
                // `leave` now would get 405 and the join would still complete
                // (§4), so leave when its reply comes instead. (If the
                // connection ends first, the entry goes with it.)
                Some(p) if current && !state.joined => {
                    p.kind = PendingKind::LeaveOnJoin { room: room.to_owned() };
                    return None;
                }
                _ => {
                    st.pending.remove(&r);
                }
            }
        }
        if !live {
            return None; // not joined on the live connection: nothing to tell the server
        }
        let r = self.next_ref();
        let (tx, rx) = oneshot::channel();
        let kind = if wait { PendingKind::Request(tx) } else { PendingKind::Internal };
        st.pending.insert(r, Pending { kind, sent_on: None });
        let env = Envelope::new(Kind::Leave).with_room(room).with_ref(r);
        let bytes = self.encode(&env).ok()?;
        Some((Outgoing::control(bytes, Some(r)), wait.then_some(rx)))
    }

    pub(crate) async fn leave(&self, room: &str, id: u64, wait: bool) -> Result<(), ClientError> {
        let Some((out, rx)) = self.detach_room(room, id, wait) else { return Ok(()) };
        let r = out.reference;
        if self.enqueue(out).await.is_err() {
            // Offline: the server forgot the room with the connection.
            if let Some(r) = r {
                self.state.lock().pending.remove(&r);
            }
            return Ok(());
        }
        let Some(rx) = rx else { return Ok(()) };
        match tokio::time::timeout(self.config.call_timeout, rx).await {
            // 405: already not a member (for example the join was undone).
            Ok(Ok(Ok(_))) | Ok(Err(_)) => Ok(()),
            Ok(Ok(Err(e))) if e.code().is_some_and(|c| c.0 == 405) || e.kind() == ClientErrorKind::Disconnected => {
                Ok(())
            }
            Ok(Ok(Err(e))) => Err(e),
            Err(_) => {
                if let Some(r) = r {
                    self.state.lock().pending.remove(&r);
                }
                Err(ClientError::timeout())
            }
        }
    }

    /// A dropped room handle: leave without waiting.
    /// The ref of a `join` of `room` that was given up while in flight on
    /// the live connection (now `LeaveOnJoin`), and that connection's
    /// generation.
    pub(crate) fn abandoned_join(&self, st: &State, room: &str) -> Option<(u64, u64)> {
        let generation = st.link.as_ref().map(|l| l.generation).filter(|g| *g == st.generation)?;
        st.pending.iter().find_map(|(r, p)| match &p.kind {
            PendingKind::LeaveOnJoin { room: name } if name == room && p.sent_on.is_none_or(|s| s == generation) => {
                Some((*r, generation))
            }
            _ => None,
        })
    }

    pub(crate) fn forget_room(&self, room: &str, id: u64) {
        if let Some((out, _)) = self.detach_room(room, id, false) {
            let r = out.reference;
            let tx = self.state.lock().link.as_ref().map(|l| l.tx.clone());
            let sent = tx.is_some_and(|tx| tx.try_send(out).is_ok());
            if !sent {
                if let Some(r) = r {
                    self.state.lock().pending.remove(&r);
                }
            }
        }
    }
}

/// Answers a pending entry with an error.
pub(crate) fn fail(p: Pending, e: ClientError) {
    if let PendingKind::Request(tx) = p.kind {
        let _ = tx.send(Err(e));
    }
}
