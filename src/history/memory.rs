//! In-memory history: one bounded deque per room, a global byte budget, and
//! a timer queue that expires idle rooms without walking the others.
//!
//! # Bounds and how memory comes back
//!
//! - **Per room**: at most the retention's `max_len` events, none older than
//!   `max_age`.
//! - **In total**: [`MemoryHistoryConfig::max_bytes`] (default 128 MiB) of
//!   accounted memory: the events (their fixed size, event name, payload and
//!   idempotency key, plus the deque's spare capacity) and a fixed overhead
//!   per room. An append or read that takes the store over the budget evicts
//!   **whole rooms**, least recently used first: the evicted room's next use
//!   starts a new epoch, so its members get a `gap` with reason
//!   `epoch_changed` and resync, exactly as after a restart. Only when the
//!   room being appended to is the last one left are its own oldest events
//!   trimmed instead (a `missed` gap for a client that recovers into them).
//! - **In time**: every room has one entry in a timer queue ordered by due
//!   time (a `BTreeSet`): its oldest event's expiry (rounded up to the next
//!   second) or, with no events left, the end of its idle time
//!   ([`MemoryHistoryConfig::meta_ttl`], at least its `max_age`). Expiring
//!   pops only the entries that are due, at most [`TIMER_BATCH`] per lock
//!   hold, so the cost is proportional to what expires, never to the number
//!   of rooms, and publishers to other rooms wait at most one short batch.
//!   Timers run on every append and read (one batch), and on a background
//!   task (spawned on the first use inside a tokio runtime, one per store,
//!   ending with the store) once a second, so a store nobody touches still
//!   gives its memory back.
//!
//! Memory freed this way goes back to the allocator: a deque that shrinks
//! below a quarter of its capacity is shrunk, an emptied one is freed, and
//! the room map is shrunk when it is three quarters empty.

use super::{Append, Appended, HistoryRead, HistoryStore, Publication, Retention, StreamPosition};
use crate::error::Result;
use crate::util::unix_ms as now_ms;
use futures::future::BoxFuture;
use parking_lot::Mutex;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

/// Most timer entries handled per lock hold (see the module docs).
const TIMER_BATCH: usize = 64;
/// Accounted bytes of a room besides its events and its name: the stream
/// itself, its map, LRU and timer entries, its epoch.
const ROOM_OVERHEAD: usize = 256;
/// `Stream::timer` when the room has no timer entry.
const NO_TIMER: u64 = u64::MAX;

/// Bounds of a [`MemoryHistory`]. See [`MemoryHistory::with_config`].
///
/// ```
/// use std::time::Duration;
/// use switchboard::history::{MemoryHistory, MemoryHistoryConfig};
/// let store = MemoryHistory::with_config(
///     MemoryHistoryConfig::default().max_bytes(512 << 20).meta_ttl(Duration::from_secs(3600)),
/// );
/// assert_eq!(store.config().max_bytes, 512 << 20);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct MemoryHistoryConfig {
    /// Most bytes the store holds, all rooms together (events, their names,
    /// payloads and idempotency keys, plus a fixed overhead per room). Over
    /// it, whole rooms are evicted, least recently used first (their next
    /// use starts a new epoch: members get `gap` `epoch_changed`). Default
    /// 128 MiB.
    pub max_bytes: usize,
    /// How long a room whose events have all expired keeps its epoch and top
    /// offset after its last append or read (at least its `max_age`; a room
    /// that was only read, by joins, and never appended to: exactly this);
    /// then it is forgotten and its next use starts a new epoch. Default 24
    /// hours.
    pub meta_ttl: Duration,
}

impl Default for MemoryHistoryConfig {
    fn default() -> Self {
        MemoryHistoryConfig { max_bytes: 128 << 20, meta_ttl: Duration::from_secs(24 * 3600) }
    }
}

impl MemoryHistoryConfig {
    /// Sets [`MemoryHistoryConfig::max_bytes`].
    pub fn max_bytes(mut self, bytes: usize) -> Self {
        self.max_bytes = bytes;
        self
    }

    /// Sets [`MemoryHistoryConfig::meta_ttl`] (at least 1 ms).
    pub fn meta_ttl(mut self, ttl: Duration) -> Self {
        self.meta_ttl = ttl.max(Duration::from_millis(1));
        self
    }
}

/// A [`HistoryStore`] in memory. Clone it to share it between hubs in one
/// process; a new `MemoryHistory` (a restarted process) starts new epochs.
///
/// **Bounds:** each room keeps at most its retention's `max_len` events,
/// none older than `max_age`; all rooms together at most
/// [`MemoryHistoryConfig::max_bytes`] (128 MiB by default), evicting whole
/// rooms, least recently used first. A room whose events have all expired
/// keeps its epoch and top offset (a few hundred bytes) until it was neither
/// appended to nor read for [`MemoryHistoryConfig::meta_ttl`] (24 hours by
/// default); then it is forgotten and its next use starts a new epoch.
/// Expiry runs on a timer queue that only visits the rooms that are due
/// (details in the source's module docs and `docs/recovery.md`).
#[derive(Clone, Debug, Default)]
pub struct MemoryHistory {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    config: MemoryHistoryConfig,
    // One lock for all rooms. Nothing awaits under it, and every operation
    // under it is O(log rooms) plus the events it touches: the timer queue
    // and the LRU order are B-trees, and expiry handles at most
    // TIMER_BATCH due rooms per hold, so publishers never wait behind a
    // walk of every room.
    state: Mutex<State>,
    /// The background timer task is running (or being spawned).
    timer_task: AtomicBool,
}

#[derive(Debug, Default)]
struct State {
    rooms: HashMap<Arc<str>, Stream>,
    /// Accounted bytes of every room (the sum of `Stream::bytes`).
    bytes: usize,
    /// Rooms by last use, least recent first: `Stream::used` → name.
    lru: BTreeMap<u64, Arc<str>>,
    next_use: u64,
    /// One entry per room: `(Stream::timer, name)`. An entry may be early
    /// (the room's due time moved later since): it is then re-armed when
    /// popped. It is never late: a due time moving earlier re-inserts it.
    timers: BTreeSet<(u64, Arc<str>)>,
    /// Rooms evicted for the byte budget, ever.
    evicted: u64,
}

#[derive(Debug)]
struct Stream {
    epoch: Arc<str>,
    /// Offset of the newest event ever appended.
    top: u64,
    events: VecDeque<Stored>,
    /// Heap bytes of `events` besides the deque itself (`Stored::heap`).
    heap: usize,
    /// The retention of the last append: used to expire on reads too.
    retention: Retention,
    /// When the stream was last appended to or read (ms).
    touched_ms: u64,
    /// Accounted bytes, as counted in `State::bytes`.
    bytes: usize,
    /// Key in `State::lru`.
    used: u64,
    /// Due time of its entry in `State::timers` (`NO_TIMER`: none).
    timer: u64,
}

#[derive(Debug)]
struct Stored {
    publication: Publication,
    key: Option<String>,
}

impl Stored {
    /// Bytes this event holds outside the deque.
    fn heap(&self) -> usize {
        self.publication.event.capacity()
            + self.publication.data.as_ref().map_or(0, |d| d.bytes().len())
            + self.key.as_ref().map_or(0, String::capacity)
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Rounds a due time up to the next whole second, so a busy room re-arms
/// its timer at most once a second.
fn ceil_second(ms: u64) -> u64 {
    ms.div_ceil(1000).saturating_mul(1000)
}

fn new_epoch() -> Arc<str> {
    Arc::from(format!("{:016x}", crate::util::random_u64()))
}

impl Stream {
    fn new(retention: Retention, now: u64) -> Stream {
        Stream {
            epoch: new_epoch(),
            top: 0,
            events: VecDeque::new(),
            heap: 0,
            retention,
            touched_ms: now,
            bytes: 0,
            used: 0,
            timer: NO_TIMER,
        }
    }

    fn push(&mut self, stored: Stored) {
        self.heap += stored.heap();
        self.events.push_back(stored);
    }

    fn pop_oldest(&mut self) {
        if let Some(old) = self.events.pop_front() {
            self.heap -= old.heap();
        }
    }

    fn expire(&mut self, now: u64) {
        let max_age = millis(self.retention.max_age);
        while self.events.front().is_some_and(|e| now.saturating_sub(e.publication.time_ms) > max_age) {
            self.pop_oldest();
        }
        while self.events.len() > self.retention.max_len {
            self.pop_oldest();
        }
    }

    /// Gives spare deque capacity back to the allocator.
    fn compact(&mut self) {
        let (len, cap) = (self.events.len(), self.events.capacity());
        if len == 0 && cap > 0 {
            self.events = VecDeque::new();
        } else if cap > 16 && len < cap / 4 {
            self.events.shrink_to(len * 2);
        }
    }

    /// What this room counts against the budget.
    fn accounted(&self, name: &str) -> usize {
        ROOM_OVERHEAD + name.len() + self.events.capacity() * std::mem::size_of::<Stored>() + self.heap
    }

    /// When its timer is due: its oldest event's expiry, or, with no events,
    /// the end of its idle time.
    fn due(&self, ttl: u64) -> u64 {
        match self.events.front() {
            Some(e) => {
                let max_age = millis(self.retention.max_age);
                ceil_second(e.publication.time_ms.saturating_add(max_age).saturating_add(1))
            }
            None => ceil_second(self.touched_ms.saturating_add(self.idle_after(ttl)).saturating_add(1)),
        }
    }

    /// How long the stream is kept unused once empty: the meta TTL, and at
    /// least its retention's age once it had events (a room only ever read,
    /// by joins, never had any: nothing to outlive).
    fn idle_after(&self, ttl: u64) -> u64 {
        if self.top == 0 {
            ttl
        } else {
            ttl.max(millis(self.retention.max_age))
        }
    }

    fn position(&self) -> StreamPosition {
        StreamPosition { offset: self.top, epoch: self.epoch.clone() }
    }

    /// Whether the stream holds nothing and was not used for `idle_after`:
    /// safe to forget (a new stream gets a new epoch).
    fn idle(&self, now: u64, ttl: u64) -> bool {
        self.events.is_empty() && now.saturating_sub(self.touched_ms) > self.idle_after(ttl)
    }
}

impl State {
    /// The room's stream (created with a new epoch when missing), marked as
    /// the most recently used. Returns the map's key.
    fn open(&mut self, room: &str, retention: Retention, now: u64) -> Arc<str> {
        let name = match self.rooms.get_key_value(room) {
            Some((name, _)) => name.clone(),
            None => {
                let name: Arc<str> = Arc::from(room);
                self.rooms.insert(name.clone(), Stream::new(retention, now));
                name
            }
        };
        let stream = self.rooms.get_mut(&name).expect("just found or inserted");
        if stream.used != 0 {
            self.lru.remove(&stream.used);
        }
        self.next_use += 1;
        stream.used = self.next_use;
        self.lru.insert(stream.used, name.clone());
        name
    }

    /// Brings the room's accounting and timer up to date after a change.
    fn settle(&mut self, name: &Arc<str>, ttl: u64) {
        let Some(stream) = self.rooms.get_mut(name) else { return };
        stream.compact();
        let bytes = stream.accounted(name);
        self.bytes = self.bytes - stream.bytes + bytes;
        stream.bytes = bytes;
        let due = stream.due(ttl);
        if due < stream.timer {
            if stream.timer != NO_TIMER {
                self.timers.remove(&(stream.timer, name.clone()));
            }
            self.timers.insert((due, name.clone()));
            stream.timer = due;
        }
    }

    /// Removes a room and everything that points at it.
    fn forget(&mut self, name: &Arc<str>) {
        let Some(stream) = self.rooms.remove(name) else { return };
        self.bytes -= stream.bytes;
        self.lru.remove(&stream.used);
        if stream.timer != NO_TIMER {
            self.timers.remove(&(stream.timer, name.clone()));
        }
        // A map that held a burst of rooms keeps its table otherwise.
        // Shrinking when three quarters are free is amortized O(1).
        if self.rooms.capacity() > 64 && self.rooms.len() < self.rooms.capacity() / 4 {
            self.rooms.shrink_to_fit();
        }
    }

    /// Evicts the least recently used rooms until the store fits `max`.
    /// `keep` (the room just used) is evicted from last: when it is alone
    /// over the budget, its own oldest events go instead.
    fn enforce_budget(&mut self, keep: &Arc<str>, max: usize, ttl: u64) {
        while self.bytes > max {
            let Some((_, oldest)) = self.lru.first_key_value() else { break };
            if !Arc::ptr_eq(oldest, keep) {
                let oldest = oldest.clone();
                self.forget(&oldest);
                self.evicted += 1;
                continue;
            }
            let Some(stream) = self.rooms.get_mut(keep) else { break };
            if stream.events.len() <= 1 {
                break;
            }
            stream.pop_oldest();
            self.settle(keep, ttl);
        }
    }

    /// Runs at most `batch` due timers; returns how many rooms it visited.
    fn run_timers(&mut self, now: u64, ttl: u64, batch: usize) -> usize {
        let mut visited = 0;
        while visited < batch {
            match self.timers.first() {
                Some((due, _)) if *due <= now => {}
                _ => break,
            }
            let Some((_, name)) = self.timers.pop_first() else { break };
            visited += 1;
            let Some(stream) = self.rooms.get_mut(&name) else { continue };
            stream.timer = NO_TIMER;
            stream.expire(now);
            if stream.idle(now, ttl) {
                self.forget(&name);
            } else {
                self.settle(&name, ttl);
            }
        }
        visited
    }
}

impl MemoryHistory {
    /// An empty store with the default [`MemoryHistoryConfig`].
    pub fn new() -> MemoryHistory {
        MemoryHistory::default()
    }

    /// An empty store with these bounds.
    pub fn with_config(config: MemoryHistoryConfig) -> MemoryHistory {
        MemoryHistory { inner: Arc::new(Inner { config, ..Inner::default() }) }
    }

    /// An empty store forgetting unused empty streams after `ttl`: short
    /// for `with_config(MemoryHistoryConfig::default().meta_ttl(ttl))`.
    pub fn with_meta_ttl(ttl: Duration) -> MemoryHistory {
        MemoryHistory::with_config(MemoryHistoryConfig::default().meta_ttl(ttl))
    }

    /// The store's bounds.
    pub fn config(&self) -> MemoryHistoryConfig {
        self.inner.config
    }

    /// How long an unused empty stream is kept.
    pub fn meta_ttl(&self) -> Duration {
        self.inner.config.meta_ttl
    }

    fn ttl_ms(&self) -> u64 {
        millis(self.inner.config.meta_ttl).max(1)
    }

    /// Rooms with a stream in memory (for leak checks).
    pub fn room_count(&self) -> usize {
        self.inner.state.lock().rooms.len()
    }

    /// Accounted bytes held, all rooms together: never more than
    /// [`MemoryHistoryConfig::max_bytes`] after an append or read returns
    /// (unless one room's newest event alone is bigger).
    pub fn bytes(&self) -> usize {
        self.inner.state.lock().bytes
    }

    /// Rooms evicted to stay within [`MemoryHistoryConfig::max_bytes`], since
    /// the store was created.
    pub fn evicted_rooms(&self) -> u64 {
        self.inner.state.lock().evicted
    }

    /// Forgets every stream, as a restarted process would (new epochs).
    pub fn clear(&self) {
        let mut state = self.inner.state.lock();
        let evicted = state.evicted;
        *state = State { evicted, ..State::default() };
    }

    /// Runs every timer that is due now: drops expired events and forgets
    /// idle empty rooms. The background task does this once a second; this
    /// is for hosts and tests that want it now.
    pub fn sweep(&self) {
        self.sweep_at(now_ms());
    }

    fn sweep_at(&self, now: u64) {
        let ttl = self.ttl_ms();
        // In batches, so appends to other rooms get the lock in between.
        while self.inner.state.lock().run_timers(now, ttl, TIMER_BATCH) == TIMER_BATCH {}
    }

    /// Starts the store's timer task if it has none and a runtime is here.
    fn ensure_timer_task(&self) {
        if self.inner.timer_task.load(Ordering::Relaxed) {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else { return };
        if self.inner.timer_task.swap(true, Ordering::AcqRel) {
            return;
        }
        rt.spawn(timer_task(Arc::downgrade(&self.inner)));
    }

    fn append_now(&self, room: &str, append: Append, now: u64) -> Appended {
        let ttl = self.ttl_ms();
        let mut state = self.inner.state.lock();
        state.run_timers(now, ttl, TIMER_BATCH);
        let name = state.open(room, append.retention, now);
        let stream = state.rooms.get_mut(&name).expect("opened");
        stream.retention = append.retention;
        stream.touched_ms = now;
        stream.expire(now);
        let found = append
            .idempotency_key
            .as_deref()
            .and_then(|key| stream.events.iter().find(|e| e.key.as_deref() == Some(key)).map(|e| e.publication.offset));
        let done = match found {
            Some(offset) => {
                Appended { position: StreamPosition { offset, epoch: stream.epoch.clone() }, duplicate: true }
            }
            None => {
                stream.top += 1;
                let publication =
                    Publication { offset: stream.top, event: append.event, data: append.data, time_ms: now };
                stream.push(Stored { publication, key: append.idempotency_key });
                stream.expire(now);
                Appended { position: stream.position(), duplicate: false }
            }
        };
        state.settle(&name, ttl);
        state.enforce_budget(&name, self.inner.config.max_bytes, ttl);
        drop(state);
        self.ensure_timer_task();
        done
    }

    fn read_now(&self, room: &str, since: Option<StreamPosition>, limit: usize, now: u64) -> HistoryRead {
        let ttl = self.ttl_ms();
        let mut state = self.inner.state.lock();
        state.run_timers(now, ttl, TIMER_BATCH);
        // A read creates the stream (and its epoch) when there is none, so
        // the position it returns stays valid for the appends that follow.
        let name = state.open(room, Retention::default(), now);
        let stream = state.rooms.get_mut(&name).expect("opened");
        stream.touched_ms = now;
        stream.expire(now);
        let read = read_stream(stream, since, limit);
        state.settle(&name, ttl);
        state.enforce_budget(&name, self.inner.config.max_bytes, ttl);
        drop(state);
        self.ensure_timer_task();
        read
    }
}

/// What a read of `stream` answers (see [`HistoryStore::read`]).
fn read_stream(stream: &Stream, since: Option<StreamPosition>, limit: usize) -> HistoryRead {
    let top = stream.position();
    let oldest = stream.events.front().map_or(stream.top + 1, |e| e.publication.offset);
    let publications: Vec<Publication>;
    let complete;
    match since {
        Some(pos) if pos.epoch != stream.epoch || pos.offset > stream.top => {
            publications = Vec::new();
            complete = false;
        }
        Some(pos) => {
            let after: Vec<&Stored> = stream.events.iter().filter(|e| e.publication.offset > pos.offset).collect();
            // Everything after `pos` is still here when the oldest
            // retained event is the one right after it (or nothing came).
            let nothing_trimmed = pos.offset == stream.top || oldest <= pos.offset + 1;
            complete = nothing_trimmed && after.len() <= limit;
            publications = after.into_iter().take(limit).map(|e| e.publication.clone()).collect();
        }
        None => {
            let skip = stream.events.len().saturating_sub(limit);
            publications = stream.events.iter().skip(skip).map(|e| e.publication.clone()).collect();
            complete = skip == 0 && oldest == 1;
        }
    }
    HistoryRead { publications, top, complete }
}

/// The store's background expiry: once a second, the due timers, in
/// batches. Ends when the store is dropped (or with its runtime; the next
/// use in another runtime starts a new one).
async fn timer_task(inner: Weak<Inner>) {
    struct Running(Weak<Inner>);
    impl Drop for Running {
        fn drop(&mut self) {
            if let Some(inner) = self.0.upgrade() {
                inner.timer_task.store(false, Ordering::Release);
            }
        }
    }
    let _running = Running(inner.clone());
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(store) = inner.upgrade().map(|inner| MemoryHistory { inner }) else { return };
        let (now, ttl) = (now_ms(), store.ttl_ms());
        loop {
            let visited = store.inner.state.lock().run_timers(now, ttl, TIMER_BATCH);
            if visited < TIMER_BATCH {
                break;
            }
            tokio::task::yield_now().await;
        }
    }
}

impl HistoryStore for MemoryHistory {
    fn append(&self, room: &str, append: Append) -> BoxFuture<'static, Result<Appended>> {
        let done = self.append_now(room, append, now_ms());
        Box::pin(async move { Ok(done) })
    }

    fn read(&self, room: &str, since: Option<StreamPosition>, limit: usize) -> BoxFuture<'static, Result<HistoryRead>> {
        let done = self.read_now(room, since, limit, now_ms());
        Box::pin(async move { Ok(done) })
    }
}

/// Appends with an explicit clock (tests of expiry without waiting).
#[cfg(test)]
fn append_at(
    h: &MemoryHistory,
    room: &str,
    event: &str,
    key: Option<&str>,
    retention: Retention,
    now: u64,
) -> Appended {
    let a = Append { event: event.into(), data: None, idempotency_key: key.map(Into::into), retention };
    h.append_now(room, a, now)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{Format, Payload};

    const R: Retention = Retention { max_len: 3, max_age: Duration::from_secs(10) };

    /// The accounting recomputed from scratch, to check the running total.
    fn recount(h: &MemoryHistory) -> usize {
        let state = h.inner.state.lock();
        assert_eq!(state.lru.len(), state.rooms.len(), "one LRU entry per room");
        assert_eq!(state.timers.len(), state.rooms.len(), "one timer per room");
        state.rooms.iter().map(|(name, s)| s.accounted(name)).sum()
    }

    fn append_payload(h: &MemoryHistory, room: &str, size: usize, retention: Retention, now: u64) -> Appended {
        let data = Payload::from_encoded(Format::Json, format!("\"{}\"", "x".repeat(size)).into()).unwrap();
        let a = Append { event: "e".into(), data: Some(data), idempotency_key: None, retention };
        h.append_now(room, a, now)
    }

    #[test]
    fn offsets_are_consecutive_and_reads_are_exact() {
        let h = MemoryHistory::new();
        let p1 = append_at(&h, "r", "a", None, R, 1000).position;
        let p2 = append_at(&h, "r", "b", None, R, 1001).position;
        assert_eq!((p1.offset, p2.offset), (1, 2));
        assert_eq!(p1.epoch, p2.epoch);
        let read = h.read_now("r", Some(p1.clone()), 10, 1002);
        assert!(read.complete);
        assert_eq!(read.publications.iter().map(|p| p.offset).collect::<Vec<_>>(), [2]);
        assert_eq!(read.top, p2);
        // Caught up: complete and empty.
        let read = h.read_now("r", Some(p2.clone()), 10, 1002);
        assert!(read.complete && read.publications.is_empty());
    }

    #[test]
    fn trimmed_or_foreign_positions_are_incomplete() {
        let h = MemoryHistory::new();
        let first = append_at(&h, "r", "e", None, R, 1000).position;
        for i in 0..4 {
            append_at(&h, "r", "e", None, R, 1001 + i);
        }
        // Offsets 1..=5 published, 3..=5 kept: after 1, offset 2 is gone.
        let read = h.read_now("r", Some(first.clone()), 10, 1010);
        assert!(!read.complete);
        // After 2, everything (3, 4, 5) is there.
        let read = h.read_now("r", Some(StreamPosition { offset: 2, epoch: first.epoch.clone() }), 10, 1010);
        assert!(read.complete);
        assert_eq!(read.publications.len(), 3);
        // Cut by the limit: not complete.
        let read = h.read_now("r", Some(StreamPosition { offset: 2, epoch: first.epoch.clone() }), 2, 1010);
        assert!(!read.complete);
        // Another epoch, or an offset beyond the top: not complete, nothing replayed.
        for bad in
            [StreamPosition { offset: 2, epoch: "other".into() }, StreamPosition { offset: 99, epoch: first.epoch }]
        {
            let read = h.read_now("r", Some(bad), 10, 1010);
            assert!(!read.complete && read.publications.is_empty());
        }
    }

    #[test]
    fn age_expiry_and_forgetting_run_on_timers() {
        let h = MemoryHistory::with_meta_ttl(Duration::from_secs(15));
        let p = append_at(&h, "r", "e", None, R, 1000).position;
        // The event expires after 11 s (1 s + 10 s); its timer is due at the
        // next whole second and drops it without any read of the room.
        assert_eq!(h.inner.state.lock().run_timers(11_999, 15_000, 64), 0, "nothing due yet");
        assert_eq!(h.inner.state.lock().run_timers(12_000, 15_000, 64), 1);
        assert!(h.inner.state.lock().rooms["r"].events.is_empty(), "expired by the timer");
        assert_eq!(h.bytes(), recount(&h));
        let read = h.read_now("r", Some(StreamPosition { offset: 0, epoch: p.epoch.clone() }), 10, 12_000);
        assert!(!read.complete, "the only event expired");
        assert_eq!(read.top.offset, 1);
        // Idle and empty for the meta TTL after the read (12 s + 15 s):
        // forgotten, its bytes returned, and a new publish starts a new epoch.
        h.sweep_at(27_000);
        assert_eq!(h.room_count(), 1, "not idle long enough");
        h.sweep_at(28_000);
        assert_eq!((h.room_count(), h.bytes()), (0, 0));
        let q = append_at(&h, "r", "e", None, R, 41_000).position;
        assert_ne!(q.epoch, p.epoch);
        assert_eq!(q.offset, 1);
    }

    #[test]
    fn a_room_only_joined_is_forgotten_after_the_meta_ttl_alone() {
        // Joins read (and so create) streams; churn through rooms nobody
        // publishes to must not keep them for the default 5 minute max_age.
        let h = MemoryHistory::with_meta_ttl(Duration::from_secs(2));
        for i in 0..1000 {
            h.read_now(&format!("churn:{i}"), None, 0, 1000);
        }
        assert_eq!(h.room_count(), 1000);
        assert!(h.bytes() > 1000 * ROOM_OVERHEAD);
        h.sweep_at(3000);
        assert_eq!(h.room_count(), 1000, "used 2 s ago: kept");
        h.sweep_at(4000);
        assert_eq!((h.room_count(), h.bytes()), (0, 0));
        assert!(h.inner.state.lock().rooms.capacity() <= 64, "the map's table is given back too");
    }

    #[test]
    fn expiry_visits_only_the_rooms_that_are_due() {
        let h = MemoryHistory::new();
        let long = Retention { max_len: 10, max_age: Duration::from_secs(3600) };
        for i in 0..10_000 {
            append_at(&h, &format!("quiet:{i}"), "e", None, long, 1000);
        }
        append_at(&h, "brief", "e", None, R, 1000);
        // The once-a-second expiry used to walk all 10,001 rooms under the
        // lock; now it visits the one that is due, and leaves the rest.
        let visited = h.inner.state.lock().run_timers(20_000, h.ttl_ms(), usize::MAX);
        assert_eq!(visited, 1);
        assert!(h.inner.state.lock().rooms["brief"].events.is_empty());
        assert_eq!(h.room_count(), 10_001);
        // Appends run one bounded batch: a burst of due rooms is spread over
        // many appends instead of stalling one.
        let visited = h.inner.state.lock().run_timers(3_700_000, h.ttl_ms(), TIMER_BATCH);
        assert_eq!(visited, TIMER_BATCH);
        h.sweep_at(3_700_000);
        assert!(h.inner.state.lock().rooms.values().all(|s| s.events.is_empty()));
        assert_eq!(h.bytes(), recount(&h));
    }

    #[test]
    fn the_byte_budget_evicts_least_recently_used_rooms_whole() {
        let budget = 64 * 1024;
        let h = MemoryHistory::with_config(MemoryHistoryConfig::default().max_bytes(budget));
        let keep = Retention { max_len: 1000, max_age: Duration::from_secs(300) };
        let first = append_payload(&h, "a", 1000, keep, 1000).position;
        // `b` keeps ten events: its own share stays small.
        let small = Retention { max_len: 10, ..keep };
        append_payload(&h, "b", 1000, small, 1000);
        for i in 0..500 {
            // `b` stays in use; the flood goes to ever new rooms.
            append_payload(&h, "b", 1000, small, 1001 + i);
            append_payload(&h, &format!("flood:{i}"), 1000, keep, 1001 + i);
            assert!(h.bytes() <= budget, "{} bytes held over a budget of {budget}", h.bytes());
            assert_eq!(h.bytes(), recount(&h));
        }
        assert!(h.evicted_rooms() > 400, "{} rooms evicted", h.evicted_rooms());
        // `a` was the least recently used: evicted whole, so its next use
        // starts a new epoch (its members get `epoch_changed`).
        let read = h.read_now("a", Some(first.clone()), 10, 2000);
        assert!(!read.complete);
        assert_ne!(read.top.epoch, first.epoch);
        // `b`, used all along, was never evicted: one epoch, all ten events.
        let b = h.read_now("b", None, 1000, 2000);
        assert_eq!(b.top.offset, 501);
        assert_eq!(b.publications.len(), 10);
    }

    #[test]
    fn one_room_alone_over_the_budget_trims_its_own_oldest_events() {
        let h = MemoryHistory::with_config(MemoryHistoryConfig::default().max_bytes(16 * 1024));
        let keep = Retention { max_len: 1000, max_age: Duration::from_secs(300) };
        let first = append_payload(&h, "big", 1000, keep, 1000).position;
        for i in 0..100 {
            append_payload(&h, "big", 1000, keep, 1001 + i);
            assert!(h.bytes() <= 16 * 1024);
        }
        let read = h.read_now("big", None, 1000, 2000);
        assert_eq!(read.top.epoch, first.epoch, "the room itself is not evicted");
        assert_eq!(read.top.offset, 101);
        assert!(read.publications.len() < 16 && !read.complete);
    }

    #[test]
    fn idempotency_keys_store_once() {
        let h = MemoryHistory::new();
        let a = append_at(&h, "r", "e", Some("k1"), R, 1000);
        let b = append_at(&h, "r", "e", Some("k1"), R, 1001);
        assert!(!a.duplicate && b.duplicate);
        assert_eq!(a.position, b.position);
        assert_eq!(h.read_now("r", None, 10, 1002).publications.len(), 1);
    }

    #[test]
    fn clear_starts_new_epochs() {
        let h = MemoryHistory::new();
        let p = append_at(&h, "r", "e", None, R, 1000).position;
        h.clear();
        assert_eq!(h.bytes(), 0);
        let read = h.read_now("r", Some(p.clone()), 10, 1001);
        assert!(!read.complete);
        let q = append_at(&h, "r", "e", None, R, 1002).position;
        assert_ne!(p.epoch, q.epoch);
    }
}
