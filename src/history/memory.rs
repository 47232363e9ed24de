//! In-memory history: one bounded deque per room.

use super::{Append, Appended, HistoryRead, HistoryStore, Publication, Retention, StreamPosition};
use crate::error::Result;
use futures::future::BoxFuture;
use parking_lot::Mutex;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// A [`HistoryStore`] in memory. Clone it to share it between hubs in one
/// process; a new `MemoryHistory` (a restarted process) starts new epochs.
///
/// **Bounds:** each room keeps at most its retention's `max_len` events, and
/// events older than `max_age` are dropped on the next append or read. A
/// room whose events have all expired keeps its epoch and top offset (a few
/// dozen bytes) until it was neither appended to nor read for
/// [`MemoryHistory::meta_ttl`] (default 24 hours, and at least the room's
/// `max_age`); then it is forgotten and its next use starts a new epoch.
/// Appends and reads sweep once a second, so memory is bounded by the rooms
/// used within that time.
#[derive(Clone, Debug, Default)]
pub struct MemoryHistory {
    inner: Arc<Inner>,
}

const DEFAULT_META_TTL_MS: u64 = 24 * 3600 * 1000;

#[derive(Debug, Default)]
struct Inner {
    /// Idle time after which an empty stream is forgotten (0: default).
    meta_ttl_ms: u64,
    // One lock for the room map; appends to one room are short (no await
    // under it), so a per-room lock is not worth its memory yet.
    rooms: Mutex<HashMap<String, Stream>>,
    /// When the last sweep ran (ms): appends and reads sweep every second,
    /// so idle rooms are forgotten without a timer task.
    swept_ms: std::sync::atomic::AtomicU64,
}

#[derive(Debug)]
struct Stream {
    epoch: Arc<str>,
    /// Offset of the newest event ever appended.
    top: u64,
    events: VecDeque<Stored>,
    /// The retention of the last append: used to expire on reads too.
    retention: Retention,
    /// When the stream last changed (ms), to forget idle expired rooms.
    touched_ms: u64,
}

#[derive(Debug)]
struct Stored {
    publication: Publication,
    key: Option<String>,
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn new_epoch() -> Arc<str> {
    Arc::from(format!("{:016x}", crate::hub::random_u64()))
}

impl Stream {
    fn new(retention: Retention, now: u64) -> Stream {
        Stream { epoch: new_epoch(), top: 0, events: VecDeque::new(), retention, touched_ms: now }
    }

    fn expire(&mut self, now: u64) {
        let max_age = u64::try_from(self.retention.max_age.as_millis()).unwrap_or(u64::MAX);
        while self.events.front().is_some_and(|e| now.saturating_sub(e.publication.time_ms) > max_age) {
            self.events.pop_front();
        }
        while self.events.len() > self.retention.max_len {
            self.events.pop_front();
        }
    }

    fn position(&self) -> StreamPosition {
        StreamPosition { offset: self.top, epoch: self.epoch.clone() }
    }

    /// Whether the stream holds nothing and was not used for `ttl` (nor for
    /// its retention's age): safe to forget (a new stream gets a new epoch).
    fn idle(&self, now: u64, ttl: u64) -> bool {
        let max_age = u64::try_from(self.retention.max_age.as_millis()).unwrap_or(u64::MAX);
        self.events.is_empty() && now.saturating_sub(self.touched_ms) > max_age.max(ttl)
    }
}

impl MemoryHistory {
    /// An empty store.
    pub fn new() -> MemoryHistory {
        MemoryHistory::default()
    }

    /// An empty store forgetting unused empty streams after `ttl` (see the
    /// type's docs).
    pub fn with_meta_ttl(ttl: std::time::Duration) -> MemoryHistory {
        let meta_ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        MemoryHistory { inner: Arc::new(Inner { meta_ttl_ms, ..Inner::default() }) }
    }

    /// How long an unused empty stream is kept.
    pub fn meta_ttl(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.ttl_ms())
    }

    fn ttl_ms(&self) -> u64 {
        if self.inner.meta_ttl_ms == 0 {
            DEFAULT_META_TTL_MS
        } else {
            self.inner.meta_ttl_ms
        }
    }

    /// Rooms with a stream in memory (for leak checks).
    pub fn room_count(&self) -> usize {
        self.inner.rooms.lock().len()
    }

    /// Forgets every stream, as a restarted process would (new epochs).
    pub fn clear(&self) {
        self.inner.rooms.lock().clear();
    }

    /// Drops expired events everywhere and forgets idle empty rooms.
    pub fn sweep(&self) {
        let (now, ttl) = (now_ms(), self.ttl_ms());
        self.inner.rooms.lock().retain(|_, s| {
            s.expire(now);
            !s.idle(now, ttl)
        });
    }

    fn sweep_due(&self, rooms: &mut HashMap<String, Stream>, now: u64) {
        use std::sync::atomic::Ordering;
        let last = self.inner.swept_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) < 1000 {
            return;
        }
        self.inner.swept_ms.store(now, Ordering::Relaxed);
        let ttl = self.ttl_ms();
        rooms.retain(|_, s| {
            s.expire(now);
            !s.idle(now, ttl)
        });
    }

    fn append_now(&self, room: &str, append: Append, now: u64) -> Appended {
        let mut rooms = self.inner.rooms.lock();
        self.sweep_due(&mut rooms, now);
        let stream = rooms.entry(room.to_owned()).or_insert_with(|| Stream::new(append.retention, now));
        stream.retention = append.retention;
        stream.expire(now);
        if let Some(key) = &append.idempotency_key {
            if let Some(found) = stream.events.iter().find(|e| e.key.as_deref() == Some(key.as_str())) {
                let position = StreamPosition { offset: found.publication.offset, epoch: stream.epoch.clone() };
                return Appended { position, duplicate: true };
            }
        }
        stream.top += 1;
        stream.touched_ms = now;
        let publication = Publication { offset: stream.top, event: append.event, data: append.data, time_ms: now };
        stream.events.push_back(Stored { publication, key: append.idempotency_key });
        stream.expire(now);
        Appended { position: stream.position(), duplicate: false }
    }

    fn read_now(&self, room: &str, since: Option<StreamPosition>, limit: usize, now: u64) -> HistoryRead {
        let mut rooms = self.inner.rooms.lock();
        self.sweep_due(&mut rooms, now);
        // A read creates the stream (and its epoch) when there is none, so
        // the position it returns stays valid for the appends that follow.
        let stream = rooms.entry(room.to_owned()).or_insert_with(|| Stream::new(Retention::default(), now));
        stream.touched_ms = now;
        stream.expire(now);
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
    use std::time::Duration;

    const R: Retention = Retention { max_len: 3, max_age: Duration::from_secs(10) };

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
    fn age_expiry_and_forgetting() {
        let h = MemoryHistory::with_meta_ttl(Duration::from_secs(15));
        let p = append_at(&h, "r", "e", None, R, 1000).position;
        let read = h.read_now("r", Some(StreamPosition { offset: 0, epoch: p.epoch.clone() }), 10, 12_000);
        assert!(!read.complete, "the only event expired");
        assert_eq!(read.top.offset, 1);
        // Idle and empty past the retention: forgotten, and a new publish
        // starts a new epoch.
        {
            let mut rooms = h.inner.rooms.lock();
            let now = 40_000;
            rooms.retain(|_, s| {
                s.expire(now);
                !s.idle(now, 15_000)
            });
        }
        assert_eq!(h.room_count(), 0);
        let q = append_at(&h, "r", "e", None, R, 41_000).position;
        assert_ne!(q.epoch, p.epoch);
        assert_eq!(q.offset, 1);
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
        let read = h.read_now("r", Some(p.clone()), 10, 1001);
        assert!(!read.complete);
        let q = append_at(&h, "r", "e", None, R, 1002).position;
        assert_ne!(p.epoch, q.epoch);
    }
}
