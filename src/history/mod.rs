//! Room history: the recent events of recoverable rooms, with stream
//! positions, so a client that reconnects receives exactly what it missed —
//! or is told plainly that it cannot.
//!
//! A recoverable room's events form a **stream**: every event gets the next
//! **offset** (1, 2, 3, … with no gaps), and the stream has an **epoch**, an
//! opaque string that changes whenever the stream's history was lost (the
//! store restarted, or the room's stream expired and was created anew).
//! Together they are a [`StreamPosition`]. A position from another epoch
//! says nothing about this one.
//!
//! A [`HistoryStore`] keeps, per room, the newest events within the room's
//! [`Retention`] (a count and an age). Reading "everything after position P"
//! answers with the events *and* whether that is everything: when the epoch
//! differs, or events after P were already trimmed, [`HistoryRead::complete`]
//! is `false` — a partial replay is never presented as complete.
//!
//! # The rules a store keeps
//!
//! [`MemoryHistory`] keeps them; `switchboard::testing::HistorySuite`
//! (feature `testing`) checks each of them, with two handles on the store
//! (two nodes), and `docs/extending.md` walks through a store on SQL.
//!
//! 1. **Offsets are assigned atomically with storing.** A room's first
//!    append gets offset 1, then 2, 3, … with no gap and no repeat, also
//!    when appends race through different handles (nodes): the counter
//!    lives in the store and is read and advanced in the same atomic step
//!    (a transaction with a row lock, a script), never read by one
//!    statement and written by the next.
//! 2. **The first poll starts the work**, so appends started in order by
//!    one publisher get offsets in that order: queue the command on the
//!    connection on the first poll, with no `.await` before it (no pool
//!    checkout, no statement preparation that another append can overtake).
//! 3. **Offsets are `u64`.** Positions up to `u64::MAX` compare as
//!    unsigned; an engine with signed 64-bit integers must not let a
//!    position above `i64::MAX` wrap into a negative number (a read after
//!    it would replay everything). Such a position is beyond the top.
//! 4. **Epochs** are 1 to [`MAX_EPOCH_LEN`] bytes (clients send them back in
//!    `join`, which refuses longer ones with 400), and change whenever the
//!    stream's history was lost — never because a connection was cut and
//!    remade.
//! 5. **Retention is applied by reads too.** [`HistoryStore::append`]
//!    receives the room's [`Retention`]; the store keeps exactly the newest
//!    `max_len` events, and a read never returns an event older than
//!    `max_age`, even when nothing was appended since (remember the
//!    retention of the last append, or store each event's expiry).
//! 6. **Reads say whether they are complete.** [`HistoryStore::read`]
//!    returns retained events with offset greater than `since.offset`,
//!    oldest first, at most `limit`, plus the stream's current top position;
//!    [`HistoryRead::complete`] is `true` only when they are *everything*
//!    after `since`: same epoch, nothing after it trimmed or expired, not cut
//!    by `limit`. With `since: None` the newest `limit` events are
//!    returned, complete only when they are all the stream ever had.
//! 7. **Idempotency keys store once**, also when retries race through
//!    different handles: the lookup of the key and the append are one
//!    atomic step (a unique index, a script). A duplicate stores nothing,
//!    takes no offset and returns the original position with
//!    `duplicate: true`, for as long as the original is retained.
//! 8. **A read of a room without a stream creates it** (offset 0, a new
//!    epoch), so the position a first join gets stays valid for the appends
//!    that follow.
//! 9. **Room names** are 1 to
//!    [`MAX_ROOM_NAME_LEN`](crate::room::MAX_ROOM_NAME_LEN) bytes of
//!    `A–Z a–z 0–9` and [`ROOM_NAME_PUNCTUATION`](crate::room::ROOM_NAME_PUNCTUATION)
//!    and are kept apart exactly (no
//!    length cut in a key or column).
//! 10. **A lost connection is not lost history.** Calls fail with an error
//!     of kind [`ErrorKind::History`](crate::ErrorKind::History) while the
//!     store is unreachable and work again once the handle reconnected by
//!     itself; the hub retries a failed publish with the same idempotency
//!     key, which must then be stored once.
//!
//! The store is where a Redis implementation (streams plus an atomic
//! publish script) and a host's own fit; hubs sharing a store share streams.

mod config;
mod memory;

pub use config::{HistoryConfig, RoomHistory};
pub use memory::{MemoryHistory, MemoryHistoryConfig};

use crate::error::Result;
use crate::protocol::Payload;
use futures::future::BoxFuture;
use std::sync::Arc;
use std::time::Duration;

/// Longest epoch a store may make, in bytes: clients send it back in a
/// `join`, which refuses a longer one (`docs/protocol.md`).
pub const MAX_EPOCH_LEN: usize = 64;

/// A point in a room's stream: the offset of the last event seen, in an
/// epoch. Offset 0 means "before the first event".
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StreamPosition {
    /// Offset of the last event covered (0: none).
    pub offset: u64,
    /// The stream's epoch.
    pub epoch: Arc<str>,
}

/// One stored event.
#[derive(Debug, Clone, PartialEq)]
pub struct Publication {
    /// Its offset in the room's stream.
    pub offset: u64,
    /// The event name.
    pub event: String,
    /// The payload, if any.
    pub data: Option<Payload>,
    /// When it was appended, in milliseconds since the Unix epoch.
    pub time_ms: u64,
}

/// How much history a room keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Retention {
    /// Most events kept; older ones are trimmed. Default 1000.
    pub max_len: usize,
    /// Oldest event kept; older ones expire. Default 5 minutes.
    pub max_age: Duration,
}

impl Default for Retention {
    fn default() -> Self {
        Retention { max_len: 1000, max_age: Duration::from_secs(300) }
    }
}

impl Retention {
    /// Sets [`Retention::max_len`].
    pub fn max_len(mut self, n: usize) -> Self {
        self.max_len = n;
        self
    }

    /// Sets [`Retention::max_age`].
    pub fn max_age(mut self, age: Duration) -> Self {
        self.max_age = age;
        self
    }
}

/// An event to append.
#[derive(Debug, Clone)]
pub struct Append {
    /// The event name.
    pub event: String,
    /// The payload.
    pub data: Option<Payload>,
    /// A retried publish with the same key (within the retained history) is
    /// stored once.
    pub idempotency_key: Option<String>,
    /// The room's retention, applied by the store on this append.
    pub retention: Retention,
}

/// The result of an append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Appended {
    /// The event's position (for a duplicate, the original's).
    pub position: StreamPosition,
    /// `true` when the idempotency key was seen before and nothing was stored.
    pub duplicate: bool,
}

/// The result of a read.
#[derive(Debug, Clone, PartialEq)]
pub struct HistoryRead {
    /// Retained events after the requested position, oldest first.
    pub publications: Vec<Publication>,
    /// The stream's position now (its newest offset and its epoch).
    pub top: StreamPosition,
    /// Whether `publications` is *everything* after the requested position:
    /// same epoch, nothing after it trimmed, and not cut by `limit`.
    pub complete: bool,
}

/// Where room history lives. See the [module docs](self) for the rules an
/// implementation keeps.
pub trait HistoryStore: Send + Sync + 'static {
    /// Appends an event to `room`'s stream, assigning its offset atomically.
    fn append(&self, room: &str, append: Append) -> BoxFuture<'static, Result<Appended>>;

    /// Reads retained events of `room` after `since` (at most `limit`).
    /// With `since == None`, reads the newest `limit` events (a first join
    /// showing recent history); `complete` then says whether they are all
    /// the stream ever had.
    fn read(&self, room: &str, since: Option<StreamPosition>, limit: usize) -> BoxFuture<'static, Result<HistoryRead>>;
}

/// The host's store as the hub uses it: every call bounded by
/// [`HistoryConfig::store_timeout`], so a store that never answers fails a
/// publish or a join with [`ErrorKind::History`](crate::ErrorKind::History)
/// instead of holding it forever.
pub(crate) struct Bounded {
    store: Arc<dyn HistoryStore>,
    timeout: Duration,
}

impl Bounded {
    pub(crate) fn new(store: Arc<dyn HistoryStore>, timeout: Duration) -> Bounded {
        Bounded { store, timeout }
    }
}

impl HistoryStore for Bounded {
    fn append(&self, room: &str, append: Append) -> BoxFuture<'static, Result<Appended>> {
        crate::util::bounded(self.timeout, crate::ErrorKind::History, "history store", self.store.append(room, append))
    }

    fn read(&self, room: &str, since: Option<StreamPosition>, limit: usize) -> BoxFuture<'static, Result<HistoryRead>> {
        crate::util::bounded(
            self.timeout,
            crate::ErrorKind::History,
            "history store",
            self.store.read(room, since, limit),
        )
    }
}

impl<H: HistoryStore + ?Sized> HistoryStore for Arc<H> {
    fn append(&self, room: &str, append: Append) -> BoxFuture<'static, Result<Appended>> {
        (**self).append(room, append)
    }

    fn read(&self, room: &str, since: Option<StreamPosition>, limit: usize) -> BoxFuture<'static, Result<HistoryRead>> {
        (**self).read(room, since, limit)
    }
}
