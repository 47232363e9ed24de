//! The bounded outbound queue of a connection ([`Outbox`]), filled by
//! publishers and drained by the connection's single writer.

use super::log::{fence, Cursor, Fence, LogReader};
use super::*;

/// What the writer (and a drop) needs to know of a queued frame beyond its
/// bytes.
#[derive(Debug)]
pub(crate) enum Tag {
    /// An event of a recoverable room: the room and the event's offset.
    Offset(Arc<str>, u64),
    /// A note for an event stream's writer (`sse_stream`).
    Stream(Box<super::sse_stream::Note>),
}

pub(crate) enum Push {
    Queued,
    Dropped,
    Overflow,
    Closed,
}

/// What the writer takes in one go ([`Outbox::take`]).
pub(super) struct Taken {
    pub(super) ping: Option<Frame>,
    pub(super) pong: Option<Frame>,
    /// The bytes of the data frames taken (still counted in the bound).
    pub(super) bytes: usize,
    /// Data frames dropped since the last batch (`DropOldest`).
    pub(super) lagged: u64,
    pub(super) close: Option<CloseFrame>,
    /// Whether the outbox was closed (nothing more will be queued).
    pub(super) closing: bool,
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
///
/// **Layout** (`repr(C)`, issue 21): what a push reads and writes — the
/// bound, the policy, the lock, `bytes`, `closing`, `woken`, the queue's
/// header — comes first, in about 80 bytes (two cache lines). A publish
/// to N members touches these lines of N connections, last written by
/// each connection's writer on the other core; with the compiler's field
/// order they were spread over four or five lines.
#[repr(C)]
pub(crate) struct Outbox {
    limit: usize,
    policy: OverflowPolicy,
    /// The session may read room logs (its frames are framed: a WebSocket
    /// connection, an event stream): only then does a push look at the
    /// log state, which lies past the push's lines.
    reads_logs: bool,
    state: Mutex<OutState>,
    /// Wakes the writer (`writer.rs`) when something was queued.
    pub(super) notify: Notify,
    /// Something was appended to a room log the session reads since its
    /// writer last looked (the outbox's `woken` for logs, `log.rs`).
    pub(super) log_woken: AtomicBool,
}

/// Most gap ranges remembered between two writes; beyond it a room's last
/// range is widened (the client is told of a superset, never of less).
pub(super) const MAX_GAP_RANGES: usize = 64;

#[derive(Default)]
#[repr(C)] // the push's fields first (see `Outbox`)
struct OutState {
    bytes: usize,
    /// Close decided: no more data is accepted.
    closing: bool,
    /// The writer was woken and has not taken the queue since: further
    /// pushes need not wake it again (one `notify` per batch, not per
    /// message — a publish to N members costs N pushes).
    woken: bool,
    /// Encoded envelopes, each a data frame of the connection's format:
    /// bare `Bytes` (32 bytes a slot), since each slot is written by the
    /// publishing task and read by the writer, usually on another core.
    queue: VecDeque<Bytes>,
    /// The most `bytes` ever was.
    peak: usize,
    /// Tagged frames in `queue`: `(seq, tag)`; an event of a recoverable
    /// room is tagged with its room and offset, so a drop can be reported
    /// as a gap. Kept aside: most queued frames have no tag, and a tag in
    /// every slot would double its size.
    tags: VecDeque<(u64, Tag)>,
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
    /// Dropped since the last `lagged` notice (drop-oldest policy).
    lagged: u64,
    /// Offset ranges of recoverable rooms dropped since the last write:
    /// `(room, from, to)`, sent as `gap` notices.
    gaps: GapRanges,
    dropped_total: u64,
    /// The close frame still to send (taken by the writer).
    close_frame: Option<CloseFrame>,
    /// The close discards what is queued: the writer drops the rest of its
    /// batch too ([`Outbox::discarding`]).
    discarding: bool,
    /// What it needs to read room logs (`log.rs`); boxed, allocated by
    /// the first log it reads: a WebSocket connection never does.
    logs: Option<Box<LogState>>,
}

impl OutState {
    /// Whether the session reads a room log it has not left.
    fn reads_a_log(&self) -> bool {
        self.logs.iter().flat_map(|l| &l.cursors).any(|c| !c.stopped())
    }
}

#[derive(Default)]
struct LogState {
    /// The session's cursors in room logs, kept until its writer is done
    /// with each; `generation` counts changes.
    cursors: Vec<Arc<Cursor>>,
    generation: u64,
    /// Fences of queued frames, `(seq, fence)`: where each log stood when
    /// the frame was queued.
    fences: VecDeque<(u64, Fence)>,
}

impl Outbox {
    pub(super) fn new(limit: usize, policy: OverflowPolicy) -> Outbox {
        Outbox {
            limit,
            policy,
            reads_logs: false,
            state: Mutex::new(OutState::default()),
            notify: Notify::new(),
            log_woken: AtomicBool::new(false),
        }
    }

    /// Lets the session read room logs (set once, before it is shared).
    pub(super) fn allow_logs(&mut self) {
        self.reads_logs = true;
    }

    /// Whether the session may read room logs ([`Outbox::allow_logs`]).
    pub(super) fn reads_logs(&self) -> bool {
        self.reads_logs
    }

    pub(super) fn policy(&self) -> OverflowPolicy {
        self.policy
    }

    /// Whether the session reads a room log it has not left.
    pub(crate) fn reads_a_log(&self) -> bool {
        self.state.lock().reads_a_log()
    }

    /// Adds a cursor in a room log (a join, with the room's member lock
    /// held for writing) and wakes the writer to pick it up; `false` (and
    /// nothing added) when the session reads another log it has not left
    /// or is closing: it reads one room's log at most, which keeps every
    /// frame it gets in the order it was produced (`log.rs`).
    pub(crate) fn attach(&self, cursor: &Arc<Cursor>) -> bool {
        let mut st = self.state.lock();
        if st.closing || st.reads_a_log() {
            return false;
        }
        let logs = st.logs.get_or_insert_with(Box::default);
        // Room for the one it reads (a push would make room for four):
        // every WebSocket connection in a room keeps this list.
        logs.cursors.reserve_exact(1);
        logs.cursors.push(cursor.clone());
        logs.generation += 1;
        drop(st);
        self.notify.notify_one();
        true
    }

    /// Something was appended to a log this session reads: wakes the
    /// writer unless it was woken since it last looked. The publisher
    /// issues a `SeqCst` fence between its appends and these calls; the
    /// writer clears the flag with a `SeqCst` swap before it reads.
    #[inline]
    pub(crate) fn wake_log(&self) {
        if !self.log_woken.load(Ordering::Relaxed) && !self.log_woken.swap(true, Ordering::AcqRel) {
            self.notify.notify_one();
        }
    }

    /// Queues an encoded envelope with its tag, if any.
    pub(super) fn push_queued(&self, item: Bytes, tag: Option<Tag>) -> Push {
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
                            if let Some((_, Tag::Offset(room, offset))) = st.tags.pop_front() {
                                note_gap(&mut st.gaps, room, offset);
                            }
                        }
                    }
                    // The fences of the frames dropped go with them.
                    let head = st.head;
                    if let Some(logs) = &mut st.logs {
                        while logs.fences.front().is_some_and(|f| f.0 < head) {
                            logs.fences.pop_front();
                        }
                    }
                    if st.bytes + len > self.limit {
                        // The writer's in-flight batch holds the rest: drop the new one.
                        st.lagged += 1;
                        st.dropped_total += 1;
                        if let Some(Tag::Offset(room, offset)) = tag {
                            note_gap(&mut st.gaps, room, offset);
                        }
                        drop(guard);
                        self.notify.notify_one();
                        return Push::Dropped;
                    }
                }
            }
        }
        self.enqueue(guard, item, tag)
    }

    /// Queues an encoded envelope only if it fits within the bound, whatever
    /// the overflow policy: [`Push::Dropped`] when it does not, and then
    /// nothing was queued or dropped. For messages whose sender repairs a
    /// refusal itself (presence sends the whole state once there is room),
    /// so that they never close a connection nor push its data out.
    pub(super) fn push_if_room(&self, item: Bytes) -> Push {
        let guard = self.state.lock();
        if guard.closing {
            return Push::Closed;
        }
        if guard.bytes + item.len() > self.limit {
            return Push::Dropped;
        }
        self.enqueue(guard, item, None)
    }

    /// The end of a push that fits: queues `item` and wakes the writer.
    fn enqueue(&self, mut guard: parking_lot::MutexGuard<'_, OutState>, item: Bytes, tag: Option<Tag>) -> Push {
        let st = &mut *guard;
        let len = item.len();
        st.bytes += len;
        st.peak = st.peak.max(st.bytes);
        if st.queue.capacity() == 0 {
            // Room for one frame, not the usual four: most connections
            // are idle most of the time and get a frame now and then.
            st.queue.reserve_exact(1);
        }
        if let Some(tag) = tag {
            st.tags.push_back((st.head + st.queue.len() as u64, tag));
        }
        if self.reads_logs {
            let seq = st.head + st.queue.len() as u64;
            if let Some(logs) = st.logs.as_mut().filter(|l| !l.cursors.is_empty()) {
                // Room events appended before this frame go out before it.
                let f = fence(&logs.cursors);
                logs.fences.push_back((seq, f));
            }
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

    pub(super) fn close(&self, frame: Option<CloseFrame>, discard: bool) {
        let mut st = self.state.lock();
        st.closing = true;
        st.close_frame = frame;
        st.discarding = discard;
        if discard {
            let freed: usize = st.queue.drain(..).map(|b| b.len()).sum();
            st.bytes -= freed;
            st.tags.clear();
            if let Some(logs) = &mut st.logs {
                logs.fences.clear();
            }
        }
        for c in st.logs.iter().flat_map(|l| &l.cursors) {
            if discard {
                c.stop_here();
            } else {
                c.stop_at_end();
            }
        }
        drop(st);
        self.notify.notify_one();
    }

    /// The writer's side: moves everything queued into `batch` (which must
    /// be empty) and the gap ranges into `gaps`, and takes the control
    /// frames. The taken bytes stay counted until [`Outbox::written`], so
    /// the bound covers the batch in flight.
    ///
    /// `tags`: when given (an event stream's writer wants them), the tags
    /// of the frames taken, by their index in `batch` (it must be empty).
    ///
    /// `logs`: the writer's cursors are brought up to date, and the fences
    /// of the frames taken move there, by index in `batch`; its reader is
    /// allocated once the session has read a log.
    pub(super) fn take(
        &self,
        batch: &mut VecDeque<Bytes>,
        gaps: &mut GapRanges,
        tags: Option<&mut VecDeque<(u64, Tag)>>,
        logs: Option<&mut Option<Box<LogReader>>>,
    ) -> Taken {
        let mut st = self.state.lock();
        // (The writer of a session that reads no logs passes none: its take
        // does not touch the log state's line.)
        if let (Some(reader), Some(state)) = (logs, &mut st.logs) {
            let logs = reader.get_or_insert_with(Box::default);
            let before = state.cursors.len();
            state.cursors.retain(|c| !c.finished());
            if state.cursors.len() != before {
                state.generation += 1;
            }
            if state.generation != logs.generation {
                logs.cursors.clear();
                logs.cursors.reserve_exact(state.cursors.len());
                logs.cursors.extend(state.cursors.iter().cloned());
                logs.generation = state.generation;
            }
            if !state.fences.is_empty() {
                std::mem::swap(&mut state.fences, &mut logs.fences);
                let head = st.head;
                for f in logs.fences.iter_mut() {
                    f.0 -= head;
                }
            }
            if !logs.cursors.is_empty() {
                logs.mark_ends();
            }
        }
        std::mem::swap(&mut st.queue, batch);
        match tags {
            Some(tags) if !st.tags.is_empty() => {
                std::mem::swap(&mut st.tags, tags);
                let head = st.head;
                for t in tags.iter_mut() {
                    t.0 -= head;
                }
            }
            _ => st.tags.clear(),
        }
        // Taken frames are on their way: no longer droppable.
        st.head += batch.len() as u64;
        // From here a push must wake the writer again (Notify keeps the
        // permit if the writer is not waiting yet).
        st.woken = false;
        // Everything counted in `bytes` is in the queue just taken: the
        // previous batch was subtracted when it was written.
        let bytes = st.bytes;
        debug_assert_eq!(bytes, batch.iter().map(Bytes::len).sum::<usize>());
        if !st.gaps.is_empty() {
            std::mem::swap(&mut st.gaps, gaps);
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
            if let Some(logs) = &mut st.logs {
                logs.fences = VecDeque::new();
            }
            *batch = VecDeque::new();
        }
        Taken {
            ping,
            pong: st.pong.take(),
            bytes,
            lagged: std::mem::take(&mut st.lagged),
            close: st.close_frame.take(),
            closing: st.closing,
        }
    }

    /// Whether a close that discards the queue was decided (a slow
    /// consumer, a heartbeat timeout): the writer then drops what it took
    /// and has not written yet, so the close frame goes next.
    pub(super) fn discarding(&self) -> bool {
        self.state.lock().discarding
    }

    /// The writer wrote a batch of `bytes` (from [`Outbox::take`]).
    pub(super) fn written(&self, bytes: usize) {
        self.state.lock().bytes -= bytes;
    }

    /// Bytes queued, and not yet read from the room logs it reads.
    pub(crate) fn queued_bytes(&self) -> usize {
        let st = self.state.lock();
        let logs: u64 = st.logs.iter().flat_map(|l| &l.cursors).map(|c| c.queued_bytes()).sum();
        st.bytes + usize::try_from(logs).unwrap_or(usize::MAX)
    }

    pub(crate) fn peak_bytes(&self) -> usize {
        self.state.lock().peak
    }

    /// Counts frames of a room log the bound dropped before the writer
    /// read them (`log.rs`), as this queue's own drops are counted, and
    /// moves the cursor past them (`skip`) under the same lock.
    pub(super) fn count_dropped(&self, n: u64, skip: impl FnOnce()) {
        let mut st = self.state.lock();
        st.dropped_total += n;
        skip();
    }

    /// Frames dropped: from the queue, and from the room logs it reads
    /// (those its writer has not come to yet included). Under disconnect
    /// nothing of a log counts: the reader left behind is closed and its
    /// cursor stopped where it was.
    pub(crate) fn dropped(&self) -> u64 {
        let st = self.state.lock();
        st.dropped_total + st.logs.iter().flat_map(|l| &l.cursors).map(|c| c.skipped()).sum::<u64>()
    }
}

/// Dropped events of recoverable rooms: `(room, first offset, last offset)`.
pub(super) type GapRanges = Vec<(Arc<str>, u64, u64)>;

/// Adds a dropped event to the gap ranges (see [`MAX_GAP_RANGES`]).
pub(super) fn note_gap(gaps: &mut GapRanges, room: Arc<str>, offset: u64) {
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

#[cfg(test)]
mod tests {
    //! The outbox on its own, without a session or a socket: what is
    //! queued, dropped, counted and handed to the writer, under each policy.

    use super::*;

    fn b(n: usize) -> Bytes {
        Bytes::from(vec![b'x'; n])
    }

    fn take(outbox: &Outbox) -> (VecDeque<Bytes>, GapRanges, Taken) {
        let (mut batch, mut gaps) = (VecDeque::new(), Vec::new());
        let taken = outbox.take(&mut batch, &mut gaps, None, None);
        (batch, gaps, taken)
    }

    #[test]
    fn frames_come_out_in_order_and_stay_counted_until_written() {
        let outbox = Outbox::new(100, OverflowPolicy::Disconnect);
        for n in [10, 20, 30] {
            assert!(matches!(outbox.push_queued(b(n), None), Push::Queued));
        }
        assert_eq!((outbox.queued_bytes(), outbox.peak_bytes()), (60, 60));
        let (batch, gaps, taken) = take(&outbox);
        assert_eq!(batch.iter().map(Bytes::len).collect::<Vec<_>>(), [10, 20, 30]);
        assert!(gaps.is_empty());
        assert_eq!((taken.bytes, taken.lagged, taken.closing), (60, 0, false));
        // The batch in flight still counts against the bound.
        assert_eq!(outbox.queued_bytes(), 60);
        assert!(matches!(outbox.push_queued(b(41), None), Push::Overflow));
        outbox.written(taken.bytes);
        assert_eq!(outbox.queued_bytes(), 0);
        assert!(matches!(outbox.push_queued(b(100), None), Push::Queued));
        assert_eq!(outbox.peak_bytes(), 100);
        assert_eq!(outbox.dropped(), 0);
    }

    #[test]
    fn disconnect_policy_refuses_what_does_not_fit_and_keeps_the_rest() {
        let outbox = Outbox::new(50, OverflowPolicy::Disconnect);
        assert!(matches!(outbox.push_queued(b(30), None), Push::Queued));
        assert!(matches!(outbox.push_queued(b(21), None), Push::Overflow));
        assert!(matches!(outbox.push_queued(b(20), None), Push::Queued));
        let (batch, _, taken) = take(&outbox);
        assert_eq!((batch.len(), taken.bytes), (2, 50));
    }

    #[test]
    fn drop_oldest_makes_room_reports_lag_and_the_gaps_of_recoverable_rooms() {
        let outbox = Outbox::new(30, OverflowPolicy::DropOldest);
        let room: Arc<str> = Arc::from("r");
        for offset in 1..=3 {
            assert!(matches!(outbox.push_queued(b(10), Some(Tag::Offset(room.clone(), offset))), Push::Queued));
        }
        // Offsets 1 and 2 make way for a 20-byte frame.
        assert!(matches!(outbox.push_queued(b(20), None), Push::Queued));
        assert_eq!((outbox.queued_bytes(), outbox.dropped()), (30, 2));
        let (batch, gaps, taken) = take(&outbox);
        assert_eq!(batch.iter().map(Bytes::len).collect::<Vec<_>>(), [10, 20]);
        assert_eq!(taken.lagged, 2);
        assert_eq!(gaps, vec![(room.clone(), 1, 2)], "one contiguous range");
        // While that batch is in flight nothing queued can be dropped: a
        // frame that does not fit is dropped itself, and reported.
        assert!(matches!(outbox.push_queued(b(5), Some(Tag::Offset(room.clone(), 9))), Push::Dropped));
        outbox.written(taken.bytes);
        let (batch, gaps, taken) = take(&outbox);
        assert!(batch.is_empty());
        assert_eq!((taken.lagged, gaps), (1, vec![(room, 9, 9)]));
        assert_eq!(outbox.dropped(), 3);
    }

    #[test]
    fn gap_ranges_are_bounded_and_only_ever_widened() {
        let mut gaps = Vec::new();
        let room: Arc<str> = Arc::from("r");
        for offset in (0..(MAX_GAP_RANGES as u64 * 4)).step_by(2) {
            note_gap(&mut gaps, room.clone(), offset);
        }
        assert_eq!(gaps.len(), MAX_GAP_RANGES);
        let covered = |o: u64| gaps.iter().any(|g| g.1 <= o && o <= g.2);
        assert!((0..(MAX_GAP_RANGES as u64 * 4)).step_by(2).all(covered), "no dropped offset left out");
    }

    #[test]
    fn control_frames_are_not_counted_and_close_discards_on_request() {
        let outbox = Outbox::new(10, OverflowPolicy::Disconnect);
        outbox.push_control(Frame::Ping(Bytes::new()));
        outbox.push_control(Frame::Pong(Bytes::new()));
        assert!(matches!(outbox.push_queued(b(10), None), Push::Queued));
        assert_eq!(outbox.queued_bytes(), 10);
        let (batch, _, taken) = take(&outbox);
        assert!(taken.ping.is_some() && taken.pong.is_some());
        assert_eq!(batch.len(), 1);
        outbox.written(taken.bytes);

        assert!(matches!(outbox.push_queued(b(4), None), Push::Queued));
        outbox.close(None, true);
        assert_eq!(outbox.queued_bytes(), 0, "discarded at once");
        assert!(matches!(outbox.push_queued(b(1), None), Push::Closed));
        outbox.push_control(Frame::Ping(Bytes::new()));
        let (batch, _, taken) = take(&outbox);
        assert!(batch.is_empty() && taken.ping.is_none() && taken.closing);
    }

    /// A session reading a room log: frames dropped under drop-oldest take
    /// their fences with them, and the fences of the frames left still
    /// point at them (by index in the batch).
    #[test]
    fn drop_oldest_drops_the_fences_of_the_frames_it_drops() {
        use super::super::log::RoomLog;
        let room = Arc::new(crate::hub::room::Room::default());
        let log = Arc::new(RoomLog::new(
            Wire::unframed(crate::protocol::Format::Json),
            1 << 20,
            OverflowPolicy::DropOldest,
            Arc::downgrade(&room),
        ));
        let mut outbox = Outbox::new(30, OverflowPolicy::DropOldest);
        outbox.allow_logs();
        assert!(outbox.attach(&log.cursor()));
        let members = crate::hub::room::MemberMap::new();
        for n in 0..3u8 {
            log.append(Bytes::from(vec![n]), 0, &members);
            assert!(matches!(outbox.push_queued(b(10), None), Push::Queued));
        }
        // The first two make way for a 20-byte frame.
        log.append(Bytes::from_static(b"3"), 0, &members);
        assert!(matches!(outbox.push_queued(b(20), None), Push::Queued));
        let (mut batch, mut gaps, mut reader) = (VecDeque::new(), Vec::new(), None);
        let taken = outbox.take(&mut batch, &mut gaps, None, Some(&mut reader));
        assert_eq!((batch.len(), taken.lagged), (2, 2));
        let fences: Vec<(u64, u64)> = reader.expect("allocated").fences.iter().map(|(i, f)| (*i, f[0].1)).collect();
        assert_eq!(fences, [(0, 3), (1, 4)], "the third frame after 3 log entries, the fourth after 4");
    }

    #[test]
    fn an_idle_ping_gives_the_queue_buffers_back() {
        let outbox = Outbox::new(1 << 20, OverflowPolicy::Disconnect);
        for _ in 0..64 {
            let _ = outbox.push_queued(b(1), None);
        }
        let (_, _, taken) = take(&outbox);
        outbox.written(taken.bytes);
        outbox.push_control(Frame::Ping(Bytes::new()));
        let (mut batch, mut gaps) = (VecDeque::with_capacity(64), Vec::new());
        let taken = outbox.take(&mut batch, &mut gaps, None, None);
        assert!(taken.ping.is_some());
        assert_eq!(batch.capacity(), 0, "the writer's buffer was freed");
        assert_eq!(outbox.state.lock().queue.capacity(), 0, "and the queue's");
    }
}
