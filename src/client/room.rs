//! Room handles, their bounded event streams, and events.

use super::error::{ClientError, ClientErrorKind};
use super::presence::PresenceView;
use super::Client;
use crate::protocol::{Envelope, Kind, Payload};
use parking_lot::Mutex;
use serde::{de::DeserializeOwned, Serialize};
use std::collections::VecDeque;
use std::fmt;
use std::sync::Arc;
use tokio::sync::{watch, Notify};

/// An event pushed by the server: to a room, or straight to this connection.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Event {
    /// The room, for room events; `None` for direct events.
    pub room: Option<String>,
    /// The event name.
    pub event: String,
    /// The payload (`null` when the server sent none).
    pub data: Payload,
    /// The event's position in the room's stream, in rooms with history
    /// (recoverable rooms); `None` elsewhere.
    pub offset: Option<u64>,
}

impl Event {
    /// Deserializes the payload.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, ClientError> {
        self.data.decode().map_err(|e| ClientError::new(ClientErrorKind::Codec, e.to_string()))
    }
}

/// Why events of a room were not delivered on the live connection, from
/// the server's `gap` message.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Gap {
    /// First missed offset (0 for `epoch_changed`).
    pub from: u64,
    /// Last missed offset (0 for `epoch_changed`).
    pub to: u64,
    /// `slow_consumer`, `missed` or `epoch_changed` (or a newer reason).
    pub reason: String,
    /// Whether the client is recovering the range itself: for
    /// `slow_consumer` it leaves and rejoins the room from `from - 1`, and
    /// the missed events arrive as ordinary events, each once, possibly
    /// after newer ones. When `false` (`missed`, `epoch_changed`, unknown
    /// reasons) the application must resynchronize the room.
    pub recovering: bool,
}

/// What a room's stream yields.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum RoomEvent {
    /// An event published to the room.
    Event(Event),
    /// The client joined the room again on a new connection (after a
    /// reconnect). With `recovered: true` the server is replaying every event
    /// missed while away (they follow, oldest first, before live ones, each
    /// delivered once). With `recovered: false`, events may have been
    /// missed: **resynchronize** the room's state (refetch it).
    Rejoined {
        /// Whether the server recovered everything missed.
        recovered: bool,
    },
    /// The server reports events of this room that were not delivered on
    /// the live connection (`gap`).
    Gap(Gap),
    /// The application read this stream too slowly: it holds at most
    /// [`ClientConfig::room_buffer`](super::ClientConfig::room_buffer) items
    /// and dropped the `dropped` oldest. Resynchronize if it matters.
    Lagged {
        /// How many were dropped since the previous `Lagged`.
        dropped: u64,
    },
    /// The server dropped `dropped` messages for this connection because
    /// the client read its socket too slowly (`lagged`, drop-oldest
    /// servers). Which rooms lost events is unknown, so every room
    /// **without** history and the direct stream get this: resynchronize.
    /// Rooms with history get exact [`RoomEvent::Gap`]s instead.
    ServerLagged {
        /// The server's count.
        dropped: u64,
    },
}

/// A bounded queue of [`RoomEvent`]s with a drop-oldest policy.
///
/// Locking: one short `parking_lot` lock per push or pop; nothing is awaited
/// under it. The single reader waits on a `Notify`.
pub(crate) struct EventQueue {
    inner: Mutex<QueueInner>,
    notify: Notify,
    capacity: usize,
}

struct QueueInner {
    items: VecDeque<RoomEvent>,
    /// Dropped since the reader last saw a `Lagged`.
    dropped_pending: u64,
    dropped_total: u64,
    closed: bool,
}

impl fmt::Debug for EventQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let q = self.inner.lock();
        f.debug_struct("EventQueue")
            .field("len", &q.items.len())
            .field("capacity", &self.capacity)
            .field("dropped_total", &q.dropped_total)
            .field("closed", &q.closed)
            .finish()
    }
}

impl EventQueue {
    pub(crate) fn new(capacity: usize) -> Arc<EventQueue> {
        Arc::new(EventQueue {
            inner: Mutex::new(QueueInner {
                items: VecDeque::new(),
                dropped_pending: 0,
                dropped_total: 0,
                closed: false,
            }),
            notify: Notify::new(),
            capacity: capacity.max(1),
        })
    }

    /// Queues `item`, dropping the oldest when full. Returns how many were
    /// dropped (0 or 1).
    pub(crate) fn push(&self, item: RoomEvent) -> u64 {
        let mut dropped = 0;
        {
            let mut q = self.inner.lock();
            if q.closed {
                return 0;
            }
            if q.items.len() >= self.capacity {
                q.items.pop_front();
                q.dropped_pending += 1;
                q.dropped_total += 1;
                dropped = 1;
            }
            q.items.push_back(item);
        }
        self.notify.notify_one();
        dropped
    }

    /// Ends the stream after what it holds.
    pub(crate) fn close(&self) {
        self.inner.lock().closed = true;
        self.notify.notify_one();
    }

    pub(crate) fn dropped_total(&self) -> u64 {
        self.inner.lock().dropped_total
    }

    pub(crate) async fn recv(&self) -> Option<RoomEvent> {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut q = self.inner.lock();
                if q.dropped_pending > 0 {
                    let dropped = std::mem::take(&mut q.dropped_pending);
                    return Some(RoomEvent::Lagged { dropped });
                }
                if let Some(item) = q.items.pop_front() {
                    return Some(item);
                }
                if q.closed {
                    return None;
                }
            }
            notified.await;
        }
    }

    pub(crate) fn try_recv(&self) -> Option<RoomEvent> {
        let mut q = self.inner.lock();
        if q.dropped_pending > 0 {
            let dropped = std::mem::take(&mut q.dropped_pending);
            return Some(RoomEvent::Lagged { dropped });
        }
        q.items.pop_front()
    }
}

/// Options of a join.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct JoinOptions {
    /// Join parameters (the `join`'s `data`), passed to the host's join
    /// authorizer; sent again on every rejoin.
    pub params: Option<serde_json::Value>,
    /// On the first join of a room with history, also receive up to this
    /// many of its newest retained events before live ones (`rewind`).
    pub rewind: Option<u64>,
}

impl JoinOptions {
    /// Sets [`JoinOptions::params`].
    pub fn params(mut self, params: serde_json::Value) -> Self {
        self.params = Some(params);
        self
    }

    /// Sets [`JoinOptions::rewind`].
    pub fn rewind(mut self, n: u64) -> Self {
        self.rewind = Some(n);
        self
    }
}

/// A joined room: its event stream, presence, calls and sends.
///
/// The client rejoins the room after every reconnect (with its last offset
/// and epoch in rooms with history, so missed events are recovered), until
/// [`Room::leave`] or the handle is dropped (which leaves without waiting).
/// The stream is bounded ([`ClientConfig::room_buffer`](super::ClientConfig::room_buffer),
/// drop-oldest, reported as [`RoomEvent::Lagged`]).
pub struct Room {
    pub(crate) client: Client,
    pub(crate) name: String,
    pub(crate) queue: Arc<EventQueue>,
    pub(crate) presence: watch::Receiver<PresenceView>,
    pub(crate) id: u64,
    pub(crate) left: std::sync::atomic::AtomicBool,
}

impl fmt::Debug for Room {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Room").field("name", &self.name).field("queue", &self.queue).finish()
    }
}

impl Room {
    /// The room's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The next item of the room's stream; `None` once the room was left,
    /// its rejoin was refused (see [`Room::closed_reason`]), or the client
    /// closed.
    ///
    /// The stream has one reader: with several tasks calling `recv` on a
    /// shared handle, each item goes to one of them.
    pub async fn recv(&self) -> Option<RoomEvent> {
        self.queue.recv().await
    }

    /// The next item if one is ready.
    pub fn try_recv(&self) -> Option<RoomEvent> {
        self.queue.try_recv()
    }

    /// The room's items as a [`Stream`](futures::Stream) borrowing the
    /// handle (the same items as [`Room::recv`]; it ends when `recv` would
    /// return `None`).
    pub fn stream(&self) -> impl futures::Stream<Item = RoomEvent> + Send + '_ {
        futures::stream::unfold(self, |room| async move { room.recv().await.map(|item| (item, room)) })
    }

    /// The room's items as a [`Stream`](futures::Stream) that owns the
    /// handle: the room is left when the stream is dropped.
    pub fn into_stream(self) -> impl futures::Stream<Item = RoomEvent> + Send + 'static {
        futures::stream::unfold(self, |room| async move { room.recv().await.map(|item| (item, room)) })
    }

    /// The room's live presence (empty and not `synced` in rooms without
    /// presence). Every applied `presence_state` or `presence_diff` marks
    /// it changed.
    pub fn presence(&self) -> watch::Receiver<PresenceView> {
        self.presence.clone()
    }

    /// Events dropped from this stream because the application read too
    /// slowly, in total.
    pub fn dropped(&self) -> u64 {
        self.queue.dropped_total()
    }

    /// The last offset delivered and the stream epoch, in a room with
    /// history: where a rejoin recovers from.
    pub fn position(&self) -> Option<(u64, String)> {
        self.client.shared.room_position(&self.name, self.id)
    }

    /// Why the stream ended, when the client stopped rejoining the room:
    /// the join was refused after a reconnect, or the server closed the
    /// room (a server `leave`, `docs/protocol.md` §3.3.1; kind
    /// [`Closed`](super::ClientErrorKind::Closed), the host's reason in the
    /// message).
    pub fn closed_reason(&self) -> Option<ClientError> {
        self.client.shared.room_closed_reason(&self.name, self.id)
    }

    /// A call in this room: the handler for `event` gets `data`; its reply
    /// is decoded into `R`. Buffered while offline, within the call timeout.
    pub async fn call<T: Serialize + ?Sized, R: DeserializeOwned>(
        &self,
        event: &str,
        data: &T,
    ) -> Result<R, ClientError> {
        self.client.call_in(Some(&self.name), event, data).await
    }

    /// A fire-and-forget call in this room, held in the offline buffer while
    /// disconnected and sent after the rejoin.
    pub async fn send<T: Serialize + ?Sized>(&self, event: &str, data: &T) -> Result<(), ClientError> {
        self.client.send_in(Some(&self.name), event, data, true).await
    }

    /// A fire-and-forget call in this room that is dropped (with
    /// [`ClientErrorKind::Offline`]) when there is no connection.
    pub async fn send_volatile<T: Serialize + ?Sized>(&self, event: &str, data: &T) -> Result<(), ClientError> {
        self.client.send_in(Some(&self.name), event, data, false).await
    }

    /// Replaces this connection's client-set presence meta (`presence`
    /// with `meta`) and waits for the reply.
    pub async fn set_presence_meta(&self, meta: serde_json::Value) -> Result<(), ClientError> {
        self.presence_update(serde_json::json!({ "meta": meta })).await
    }

    /// Sets (or with `null` values removes) ephemeral presence flags and
    /// waits for the reply.
    pub async fn set_ephemeral(&self, flags: serde_json::Value) -> Result<(), ClientError> {
        self.presence_update(serde_json::json!({ "ephemeral": flags })).await
    }

    async fn presence_update(&self, data: serde_json::Value) -> Result<(), ClientError> {
        let payload = self.client.shared.payload(&data)?;
        let env = Envelope::new(Kind::Presence).with_room(self.name.clone()).with_data(payload);
        self.client.shared.request(env).await.map(drop)
    }

    /// Leaves the room and waits for the server's answer (when connected).
    /// The stream ends.
    ///
    /// Takes `&self` so that a handle shared with a reading task can be
    /// left; afterwards the handle is inert.
    pub async fn leave(&self) -> Result<(), ClientError> {
        if self.left.swap(true, std::sync::atomic::Ordering::Relaxed) {
            return Ok(());
        }
        self.client.shared.leave(&self.name, self.id, true).await
    }
}

impl Drop for Room {
    fn drop(&mut self) {
        if !*self.left.get_mut() {
            let shared = self.client.shared.clone();
            let (name, id) = (std::mem::take(&mut self.name), self.id);
            // Leave without waiting: forget the room at once (so it is not
            // rejoined) and tell the server if connected.
            shared.forget_room(&name, id);
        }
    }
}
