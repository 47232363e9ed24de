//! The room log (issue 21): one shared list of a room's broadcast frames
//! that the room's members read at their own positions, instead of a copy
//! of each frame's handle pushed into every member's outbox.
//!
//! **Who reads a log.** A member whose frames are framed for the wire
//! (`Framing`): an event stream (SSE) or a WebSocket connection, in a room
//! that is not recoverable, the first such room it joins. Framed, a run
//! of events is a run of bytes its writer can copy into one buffer and
//! write as it is: a run of `text/event-stream` events, or of whole
//! WebSocket frames back to back. Recoverable rooms keep the outbox path:
//! their events carry offsets, which a drop reports as a gap and the
//! stream writer turns into `id:` lines. So do a session's other rooms,
//! and transports that frame nothing (the in-memory one, a host's own
//! without `Capabilities::framing`).
//!
//! **Publishing** appends the frame once (one per wire form in use, under
//! the log's write lock, with the room's member lock held for reading),
//! then wakes each log member's writer through a flag that is only
//! written when it was clear: a busy writer costs the publisher one read.
//!
//! **Reading.** The writer copies what lies past its [`Cursor`] into one
//! buffer of at most [`READ_CHUNK`] bytes, under the log's read lock, and
//! hands it to the sink as one frame (`writer.rs`).
//!
//! **Order against the outbox.** A frame queued in the outbox of a session
//! that reads logs records each log's end at that moment (a *fence*); the
//! writer writes the log up to the fence before that frame. So every
//! member sees the room's events and its own replies, joins and notices in
//! the order they were produced, as with one queue.
//!
//! **Bound and overflow.** A log keeps what its slowest member has not
//! read, and never more than the hub's `outbound_queue_bytes` behind its
//! end. Every [`SCAN_EVERY`] bytes appended the publisher looks at the
//! members' cursors and drops what all have read and what is past the
//! bound; a member left behind by the bound is a slow consumer: with
//! [`OverflowPolicy::Disconnect`] its connection is closed (4000), with
//! [`OverflowPolicy::DropOldest`] its writer skips to the log's start and
//! reports the skipped events in a `lagged` notice. A writer with nothing
//! to do at a heartbeat trims its logs too, so a room that went quiet does
//! not keep its last events.

use super::{CloseCode, DisconnectReason, Session, Wire};
use crate::hub::room::{MemberMap, Room};
use crate::hub::OverflowPolicy;
use bytes::{Bytes, BytesMut};
use parking_lot::RwLock;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};

/// The most bytes a writer copies out of a log in one go (one frame for
/// the sink), as the writer's own chunk.
pub(crate) const READ_CHUNK: usize = 64 * 1024;

/// The publisher trims a log every this many bytes appended (a quarter of
/// the bound when that is less).
const SCAN_EVERY: u64 = 16 * 1024;

/// A stop position that was never set.
const NO_STOP: u64 = u64::MAX;

/// One frame of the log and the connection it is not for (a broadcast's
/// excluded sender; 0: none).
struct Entry {
    bytes: Bytes,
    exclude: u64,
}

#[derive(Default)]
struct Inner {
    entries: VecDeque<Entry>,
    /// The sequence number of `entries[0]` (counts every frame appended).
    first: u64,
    /// The byte position of `entries[0]` (counts every byte appended).
    first_bytes: u64,
    /// The byte position of the log's end.
    end_bytes: u64,
    /// `end_bytes` at the last trim.
    trimmed_at: u64,
    /// Cursors of members that left and whose writers have not read up to
    /// where they left yet: trims keep what they still read. Weak: a
    /// cursor holds its log, and a writer that is done (or gone) drops it.
    departed: Vec<Weak<Cursor>>,
}

impl Inner {
    fn end(&self) -> u64 {
        self.first + self.entries.len() as u64
    }
}

/// A room's log of one wire form.
pub(crate) struct RoomLog {
    pub(crate) wire: Wire,
    inner: RwLock<Inner>,
    /// `inner`'s end, readable without the lock (fences, stops, the
    /// queued-bytes figure).
    end: AtomicU64,
    end_bytes: AtomicU64,
    /// `inner.first_bytes`, readable without the lock.
    first_bytes: AtomicU64,
    /// `inner.first`, readable without the lock (a reader's drops not yet
    /// counted, [`Cursor::skipped`]).
    first: AtomicU64,
    /// Appended to since the last trim.
    dirty: AtomicBool,
    limit: u64,
    /// Bytes appended between two trims.
    scan_every: u64,
    policy: OverflowPolicy,
    room: Weak<Room>,
    /// Members reading it; changed under the room's member lock held for
    /// writing. At 0 the room drops the log ([`RoomLog::attached`],
    /// [`RoomLog::detached`]): a form nobody reads costs no encode and
    /// no append per publish.
    readers: AtomicUsize,
}

impl RoomLog {
    pub(crate) fn new(wire: Wire, limit: usize, policy: OverflowPolicy, room: Weak<Room>) -> RoomLog {
        RoomLog {
            wire,
            inner: RwLock::new(Inner::default()),
            end: AtomicU64::new(0),
            end_bytes: AtomicU64::new(0),
            first_bytes: AtomicU64::new(0),
            first: AtomicU64::new(0),
            dirty: AtomicBool::new(false),
            limit: limit as u64,
            scan_every: SCAN_EVERY.min(limit as u64 / 4).max(1),
            policy,
            room,
            readers: AtomicUsize::new(0),
        }
    }

    /// A member now reads the log (the caller holds the room's member lock
    /// for writing).
    pub(crate) fn attached(&self) {
        self.readers.fetch_add(1, Ordering::Relaxed);
    }

    /// A member stopped reading it (a leave, the caller holding the room's
    /// member lock for writing): whether it was the last, so the room
    /// drops the log. A departed reader keeps its `Arc` until it has read
    /// up to where it left.
    pub(crate) fn detached(&self) -> bool {
        self.readers.fetch_sub(1, Ordering::Relaxed) == 1
    }

    /// Whether no member reads it.
    pub(crate) fn unread(&self) -> bool {
        self.readers.load(Ordering::Relaxed) == 0
    }

    /// The sequence number the next frame appended gets.
    pub(crate) fn end(&self) -> u64 {
        self.end.load(Ordering::Acquire)
    }

    /// A cursor at the log's end, for a member joining now (the caller
    /// holds the room's member lock for writing, so nothing is appended
    /// meanwhile).
    pub(crate) fn cursor(self: &Arc<Self>) -> Arc<Cursor> {
        let inner = self.inner.read();
        Arc::new(Cursor {
            log: self.clone(),
            seq: AtomicU64::new(inner.end()),
            bytes: AtomicU64::new(inner.end_bytes),
            stop: AtomicU64::new(NO_STOP),
            stop_bytes: AtomicU64::new(NO_STOP),
        })
    }

    /// Appends a broadcast's frame; `members` are the room's (their lock
    /// held for reading by the caller, so no member joins or leaves
    /// meanwhile). Trims every [`SCAN_EVERY`] bytes.
    pub(crate) fn append(&self, bytes: Bytes, exclude: u64, members: &MemberMap) {
        let mut inner = self.inner.write();
        inner.end_bytes += bytes.len() as u64;
        inner.entries.push_back(Entry { bytes, exclude });
        self.end.store(inner.end(), Ordering::Release);
        self.end_bytes.store(inner.end_bytes, Ordering::Release);
        if inner.end_bytes - inner.trimmed_at >= self.scan_every {
            self.trim(&mut inner, members);
        } else {
            self.dirty.store(true, Ordering::Relaxed);
        }
    }

    /// Drops what every member read and what lies past the bound; closes
    /// the connections of members the bound left behind (disconnect policy).
    fn trim(&self, inner: &mut Inner, members: &MemberMap) {
        let end = inner.end();
        let mut keep_from = end;
        let mut keep = |c: &Cursor| keep_from = keep_from.min(c.seq.load(Ordering::Acquire));
        for c in members.values().filter_map(|(_, _, c)| c.as_ref()) {
            if std::ptr::eq(&*c.log, self) && !c.finished() {
                keep(c);
            }
        }
        // Departed readers (all of this log): one upgrade each, and the
        // ones done or gone are forgotten.
        inner.departed.retain(|c| match c.upgrade() {
            Some(c) if !c.finished() => {
                keep(&c);
                true
            }
            _ => false,
        });
        // The bound: nothing more than `limit` bytes behind the end.
        let floor_bytes = inner.end_bytes.saturating_sub(self.limit);
        while let Some(front) = inner.entries.front() {
            if inner.first >= keep_from && inner.first_bytes >= floor_bytes {
                break;
            }
            inner.first_bytes += front.bytes.len() as u64;
            inner.first += 1;
            inner.entries.pop_front();
        }
        self.first_bytes.store(inner.first_bytes, Ordering::Release);
        self.first.store(inner.first, Ordering::Release);
        if inner.first > keep_from && self.policy == OverflowPolicy::Disconnect {
            for (_, session, cursor) in members.values() {
                let behind = cursor.as_ref().is_some_and(|c| {
                    std::ptr::eq(&*c.log, self) && !c.finished() && c.seq.load(Ordering::Acquire) < inner.first
                });
                if behind {
                    slow_consumer(session);
                }
            }
        }
        if inner.entries.is_empty() && inner.entries.capacity() > 16 {
            // A burst's list goes back; an idle room keeps nothing.
            inner.entries = VecDeque::new();
        }
        inner.trimmed_at = inner.end_bytes;
        self.dirty.store(false, Ordering::Relaxed);
    }

    /// Trims the log if something was appended since the last trim (a
    /// writer with nothing to write at a heartbeat calls this).
    pub(crate) fn trim_if_dirty(&self) {
        if !self.dirty.load(Ordering::Relaxed) {
            return;
        }
        let Some(room) = self.room.upgrade() else { return };
        let members = room.members.read();
        let mut inner = self.inner.write();
        self.trim(&mut inner, &members);
    }

    /// A member left: `cursor` reads up to the log's end as it is now (the
    /// caller holds the room's member lock for writing, so nothing is
    /// appended meanwhile), and trims keep that much for it.
    pub(crate) fn depart(&self, cursor: Arc<Cursor>) {
        cursor.stop_at_end();
        if !cursor.finished() {
            let mut inner = self.inner.write();
            inner.departed.retain(|c| c.upgrade().is_some_and(|c| !c.finished()));
            inner.departed.push(Arc::downgrade(&cursor));
        }
    }

    /// Bytes the log holds between byte positions `from` and `to`.
    fn held_between(&self, from: u64, to: u64) -> u64 {
        let from = from.max(self.first_bytes.load(Ordering::Acquire));
        self.end_bytes.load(Ordering::Acquire).min(to).saturating_sub(from)
    }
}

fn slow_consumer(session: &Session) {
    session.close(DisconnectReason::SlowConsumer, CloseCode::SLOW_CONSUMER, "outbound queue full", true);
}

/// A member's position in a room's log. Moved by the member's writer only
/// (and set at the start by the join).
pub(crate) struct Cursor {
    pub(crate) log: Arc<RoomLog>,
    /// The next frame to read.
    seq: AtomicU64,
    /// The byte position of `seq`.
    bytes: AtomicU64,
    /// The writer reads nothing from here on ([`NO_STOP`]: not set): set
    /// when the member leaves (the log's end then) and when its connection
    /// closes (the end, or where it is when the close discards its queue).
    stop: AtomicU64,
    /// The byte position of `stop`.
    stop_bytes: AtomicU64,
}

impl Cursor {
    /// Reads nothing past the log's end as it is now (a leave, a close).
    pub(crate) fn stop_at_end(&self) {
        self.stop_bytes.fetch_min(self.log.end_bytes.load(Ordering::Acquire), Ordering::AcqRel);
        self.stop.fetch_min(self.log.end(), Ordering::AcqRel);
    }

    /// Reads nothing more (a close that discards the queue).
    pub(crate) fn stop_here(&self) {
        self.stop_bytes.fetch_min(self.bytes.load(Ordering::Acquire), Ordering::AcqRel);
        self.stop.fetch_min(self.seq.load(Ordering::Acquire), Ordering::AcqRel);
    }

    /// Whether the member left or its connection is closing.
    pub(crate) fn stopped(&self) -> bool {
        self.stop.load(Ordering::Acquire) != NO_STOP
    }

    /// Whether the member's writer is done with this log (left, or closed,
    /// and read up to its stop).
    pub(crate) fn finished(&self) -> bool {
        self.seq.load(Ordering::Acquire) >= self.stop.load(Ordering::Acquire)
    }

    /// Bytes of the log this member has yet to read (up to its stop).
    pub(crate) fn queued_bytes(&self) -> u64 {
        if self.finished() {
            return 0;
        }
        self.log.held_between(self.bytes.load(Ordering::Acquire), self.stop_bytes.load(Ordering::Acquire))
    }

    /// Frames the bound dropped before this member read them, and that its
    /// writer has not counted yet (it counts them when it next reads).
    pub(crate) fn skipped(&self) -> u64 {
        let first = self.log.first.load(Ordering::Acquire).min(self.stop.load(Ordering::Acquire));
        first.saturating_sub(self.seq.load(Ordering::Acquire))
    }

    /// Whether there is something to read below `upto`.
    fn has_more(&self, upto: u64) -> bool {
        let seq = self.seq.load(Ordering::Acquire);
        seq < upto.min(self.stop.load(Ordering::Acquire)).min(self.log.end())
    }
}

/// A fence: the ends of the logs a session read when a frame was queued
/// in its outbox (by the log's address; see the module's doc).
pub(crate) type Fence = Box<[(usize, u64)]>;

pub(crate) fn fence(cursors: &[Arc<Cursor>]) -> Fence {
    cursors.iter().map(|c| (Arc::as_ptr(&c.log) as usize, c.log.end())).collect()
}

/// What one read of the logs gave.
pub(super) enum Read {
    /// Bytes to write, as one frame.
    Chunk(Bytes),
    /// The bound dropped frames this member had not read yet (drop-oldest
    /// policy): this many.
    Lagged(u64),
    /// Nothing more to read (up to the fence asked for).
    Done,
}

/// The writer's side: its copy of the session's cursors, the fences of the
/// batch being written, and where each log ended when it took the batch.
#[derive(Default)]
pub(super) struct LogReader {
    pub(super) cursors: Vec<Arc<Cursor>>,
    /// The outbox's cursor generation `cursors` was copied at.
    pub(super) generation: u64,
    /// The fences of the batch's frames, by index in the batch.
    pub(super) fences: VecDeque<(u64, Fence)>,
    /// Each cursor's log end when the batch was taken: after the batch the
    /// writer reads up to there, so a frame queued after the take (its
    /// fence at or past these ends) still follows what came before it.
    ends: Vec<u64>,
}

impl LogReader {
    /// Notes where each log ends (the outbox calls this as the writer
    /// takes a batch, under its lock).
    pub(super) fn mark_ends(&mut self) {
        self.ends.clear();
        self.ends.reserve_exact(self.cursors.len());
        self.ends.extend(self.cursors.iter().map(|c| c.log.end()));
    }

    /// Whether any cursor has something to read.
    pub(super) fn has_more(&self) -> bool {
        self.cursors.iter().any(|c| c.has_more(u64::MAX))
    }

    /// Reads what must be written before the batch's frame `before` (what
    /// its fence says), or, with `None`, what lies before each log's end.
    pub(super) fn read(&mut self, session: &Session, before: Option<u64>) -> Read {
        let fence = match before {
            Some(index) => match self.fences.front() {
                Some((i, f)) if *i == index => Some(f),
                _ => return Read::Done,
            },
            None => None,
        };
        for (c, end) in self.cursors.iter().zip(&self.ends) {
            let upto = match fence {
                // A log the session did not read when the frame was queued
                // has nothing that comes before it.
                Some(f) => f.iter().find(|(log, _)| *log == Arc::as_ptr(&c.log) as usize).map_or(0, |f| f.1),
                None => *end,
            };
            if !c.has_more(upto) {
                continue;
            }
            match copy(c, upto, session) {
                Read::Done => continue,
                read => return read,
            }
        }
        if before.is_some() {
            self.fences.pop_front();
        }
        Read::Done
    }
}

/// Copies what `c` has to read below `upto` (at most [`READ_CHUNK`] bytes,
/// at least one frame).
fn copy(c: &Cursor, upto: u64, session: &Session) -> Read {
    let inner = c.log.inner.read();
    let mut seq = c.seq.load(Ordering::Acquire);
    if seq < inner.first {
        // The bound dropped frames this member had not read.
        let skipped = inner.first - seq;
        if session.outbox.policy() == OverflowPolicy::Disconnect {
            drop(inner);
            slow_consumer(session);
            c.stop_here();
            return Read::Done;
        }
        let (first, first_bytes) = (inner.first, inner.first_bytes);
        drop(inner);
        // Moved and counted together: `Outbox::dropped` never sees the
        // skip twice, nor not at all.
        session.outbox.count_dropped(skipped, || {
            c.seq.store(first, Ordering::Release);
            c.bytes.store(first_bytes, Ordering::Release);
        });
        return Read::Lagged(skipped);
    }
    let end = upto.min(c.stop.load(Ordering::Acquire)).min(inner.end());
    let mut bytes = c.bytes.load(Ordering::Acquire);
    // The buffer's size: known from the byte positions when reading up to
    // the log's end (the usual case), counted only when stopped short.
    let size = if end == inner.end() { (inner.end_bytes - bytes) as usize } else { pending(&inner, seq, end) };
    let mut buf: Option<BytesMut> = None;
    let me = session.id.get();
    while seq < end {
        let entry = &inner.entries[(seq - inner.first) as usize];
        let len = entry.bytes.len();
        if let Some(b) = &buf {
            if b.len() + len > READ_CHUNK {
                break;
            }
        }
        if entry.exclude != me {
            buf.get_or_insert_with(|| BytesMut::with_capacity(READ_CHUNK.min(size))).extend_from_slice(&entry.bytes);
        }
        seq += 1;
        bytes += len as u64;
    }
    drop(inner);
    c.seq.store(seq, Ordering::Release);
    c.bytes.store(bytes, Ordering::Release);
    match buf {
        Some(b) => Read::Chunk(b.freeze()),
        // Only frames this member was excluded from.
        None => Read::Done,
    }
}

/// Bytes of the frames `from..to`, up to [`READ_CHUNK`] (the copy's
/// buffer size).
fn pending(inner: &Inner, from: u64, to: u64) -> usize {
    let (a, b) = ((from - inner.first) as usize, (to - inner.first) as usize);
    let mut n = 0;
    for e in inner.entries.range(a..b) {
        n += e.bytes.len();
        if n >= READ_CHUNK {
            break;
        }
    }
    n
}

#[cfg(test)]
mod tests {
    //! The log on its own (tier a): appends, trims, positions. Readers and
    //! their overflow are tested end to end in `tests/sse.rs`.

    use super::*;
    use crate::protocol::Format;

    fn log_of(room: &Arc<Room>, limit: usize) -> Arc<RoomLog> {
        Arc::new(RoomLog::new(Wire::unframed(Format::Json), limit, OverflowPolicy::Disconnect, Arc::downgrade(room)))
    }

    fn held(log: &RoomLog) -> (usize, u64, u64) {
        let inner = log.inner.read();
        (inner.entries.len(), inner.first, inner.end_bytes - inner.first_bytes)
    }

    /// With nobody behind, a trim every 16 KiB drops what was appended, and
    /// a quiet log is emptied by the next idle trim.
    #[test]
    fn a_log_nobody_needs_keeps_nothing() {
        let room = Arc::new(Room::default());
        let log = log_of(&room, 1 << 20);
        let members = MemberMap::new();
        for _ in 0..10 {
            log.append(Bytes::from(vec![b'x'; 1000]), 0, &members);
        }
        assert_eq!(held(&log), (10, 0, 10_000), "below the trim threshold: kept");
        for _ in 0..7 {
            log.append(Bytes::from(vec![b'x'; 1000]), 0, &members);
        }
        assert_eq!(held(&log), (0, 17, 0), "16 KiB appended: trimmed");
        assert_eq!(log.end(), 17);
        log.append(Bytes::from_static(b"last"), 0, &members);
        assert_eq!(held(&log).0, 1);
        log.trim_if_dirty();
        assert_eq!(held(&log), (0, 18, 0), "the idle trim gives the quiet log's last event back");
        // A new reader starts at the end, and its queue is empty.
        let c = log.cursor();
        assert_eq!((c.seq.load(Ordering::Relaxed), c.queued_bytes()), (18, 0));
        log.append(Bytes::from_static(b"next"), 0, &members);
        assert_eq!(c.queued_bytes(), 4);
        c.stop_at_end();
        assert!(c.stopped() && !c.finished(), "it still reads what came before its stop");
    }

    /// A departed reader does not keep its log alive: once its writer
    /// drops the cursor (done, or its connection gone), the log is freed
    /// with its room, whatever it still held.
    #[test]
    fn a_log_is_freed_with_its_last_cursor() {
        let room = Arc::new(Room::default());
        let log = log_of(&room, 1 << 20);
        let c = log.cursor();
        log.append(Bytes::from_static(b"unread"), 0, &MemberMap::new());
        log.depart(c.clone());
        assert!(!c.finished(), "left with an event still to read");
        let weak = Arc::downgrade(&log);
        drop(log);
        assert!(weak.upgrade().is_some(), "its reader still reads it");
        drop(c);
        assert!(weak.upgrade().is_none(), "freed with the reader's cursor");
    }

    /// The bound holds even for a position nobody advances: the log never
    /// keeps more than `limit` bytes behind its end.
    #[test]
    fn the_bound_caps_what_a_departed_reader_keeps() {
        let room = Arc::new(Room::default());
        let log = log_of(&room, 8 * 1024);
        let members = MemberMap::new();
        let c = log.cursor();
        log.depart(c.clone());
        assert!(c.finished(), "left before anything was appended: nothing to read");
        log.append(Bytes::from_static(b"a"), 0, &members);
        let stuck = log.cursor();
        // Appended while `stuck` is a departed reader that never reads.
        log.append(Bytes::from_static(b"b"), 0, &members);
        log.depart(stuck.clone());
        for _ in 0..64 {
            log.append(Bytes::from(vec![b'x'; 512]), 0, &members);
        }
        let (_, first, bytes) = held(&log);
        assert!(bytes <= 8 * 1024, "{bytes} bytes held over a bound of 8 KiB");
        assert!(first > stuck.seq.load(Ordering::Relaxed), "the bound dropped what the stuck reader needed");
        assert_eq!(stuck.queued_bytes(), 0, "`b` is gone, and nothing past its stop counts");
    }
}
