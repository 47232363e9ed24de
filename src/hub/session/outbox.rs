//! The bounded outbound queue of a connection ([`Outbox`]), filled by
//! publishers and drained by the connection's single writer.

use super::*;

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
    /// The writer takes batches out under this lock (`writer.rs`).
    pub(super) state: Mutex<OutState>,
    pub(super) notify: Notify,
    limit: usize,
    policy: OverflowPolicy,
}

/// Most gap ranges remembered between two writes; beyond it a room's last
/// range is widened (the client is told of a superset, never of less).
pub(super) const MAX_GAP_RANGES: usize = 64;

#[derive(Default)]
pub(super) struct OutState {
    /// Encoded envelopes, each a data frame of the connection's format:
    /// bare `Bytes` (32 bytes a slot), since each slot is written by the
    /// publishing task and read by the writer, usually on another core.
    pub(super) queue: VecDeque<Bytes>,
    /// Events of recoverable rooms in `queue`: `(seq, room, offset)`, so a
    /// drop can be reported as a gap. Kept aside: most queued frames have
    /// no tag, and a tag in every slot would double its size.
    pub(super) tags: VecDeque<(u64, Arc<str>, u64)>,
    /// Sequence number of `queue`'s front (counts every frame queued).
    pub(super) head: u64,
    /// The pending heartbeat ping, written before the queue. Kept apart so it
    /// is never counted in `bytes` (a protocol ping is a text or binary
    /// frame) nor dropped as data under the drop-oldest policy.
    pub(super) ping: Option<Frame>,
    /// The pending answer to the peer's latest transport ping (RFC 6455 lets
    /// a pong answer only the most recent ping, so one slot bounds a ping
    /// flood). Not counted in `bytes` either.
    pub(super) pong: Option<Frame>,
    pub(super) bytes: usize,
    pub(super) peak: usize,
    /// Dropped since the last `lagged` notice (drop-oldest policy).
    pub(super) lagged: u64,
    /// Offset ranges of recoverable rooms dropped since the last write:
    /// `(room, from, to)`, sent as `gap` notices.
    pub(super) gaps: Vec<(Arc<str>, u64, u64)>,
    pub(super) dropped_total: u64,
    /// Close decided: no more data is accepted.
    pub(super) closing: bool,
    /// The writer was woken and has not taken the queue since: further
    /// pushes need not wake it again (one `notify` per batch, not per
    /// message — a publish to N members costs N pushes).
    pub(super) woken: bool,
    /// The close frame still to send (taken by the writer).
    pub(super) close_frame: Option<CloseFrame>,
}

impl Outbox {
    pub(super) fn new(limit: usize, policy: OverflowPolicy) -> Outbox {
        Outbox { state: Mutex::new(OutState::default()), notify: Notify::new(), limit, policy }
    }

    /// Queues an encoded envelope; `tag`: its room and offset, for an event
    /// of a recoverable room.
    pub(super) fn push_queued(&self, item: Bytes, tag: Option<(&Arc<str>, u64)>) -> Push {
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

    pub(super) fn close(&self, frame: Option<CloseFrame>, discard: bool) {
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

/// Adds a dropped event to the gap ranges (see [`MAX_GAP_RANGES`]).
pub(super) fn note_gap(gaps: &mut Vec<(Arc<str>, u64, u64)>, room: Arc<str>, offset: u64) {
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
