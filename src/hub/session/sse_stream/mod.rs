//! The protocol side of a one-way event stream (Server-Sent Events): the
//! session, not the transport, adapts the protocol to a stream that names
//! its events and resumes from an id.
//!
//! - **Joins.** A stream's rooms come from its request (the SSE URL and the
//!   host's choice) and its resume position (`Last-Event-ID`). The session
//!   joins them itself ([`join_rooms`]) before it reads anything the client
//!   POSTs, through the normal join path (authorizer, history, presence),
//!   and answers each with a `$joined` or `$join_error` event instead of a
//!   `reply` or `error` envelope.
//! - **Names.** Every envelope is framed once per broadcast as an event
//!   ([`Framing::EventStream`](crate::transport::Framing::EventStream)),
//!   named by [`event_name`].
//! - **Ids.** The session's writer keeps the stream's position in each of
//!   its rooms ([`StreamIds`]) as it writes, and writes the stream's id
//!   (module [`resume`]) in its own `id:` line before each event that
//!   moves a position: events of recoverable stream rooms (the outbox's
//!   offset tags), join replies and gaps ([`Note`]s queued with them).
//!   A position that events can no longer recover from gets `$resync`; a
//!   gap still in history ends the stream (4002) so the browser's
//!   reconnect recovers it.
//!
//! `docs/sse.md` describes the wire; nothing here is visible on it that was
//! not there when the transport did this by re-reading envelopes.

pub(crate) mod resume;

use super::*;
use crate::hub::stream::GapReason;
use crate::transport::event_stream;
use resume::Position;
use std::borrow::Cow;

/// Joins of the stream's rooms in flight at once (below the hub's default
/// in-flight limit of 16).
const JOINS_IN_FLIGHT: usize = 8;

/// What a stream's session joins itself and how its ids describe them.
#[derive(Debug, Clone, Default)]
pub(crate) struct StreamSpec {
    /// The stream's rooms, in the order its id lists them.
    pub(crate) names: Vec<Arc<str>>,
    /// [`resume::fingerprint`] of `names`.
    pub(crate) fingerprint: u32,
    /// Where to resume each room from (from `Last-Event-ID`): those joins
    /// recover, and a reply that did not recover gets a `$resync`.
    pub(crate) positions: Vec<Option<Position>>,
    /// `rewind=N`: rooms without a position start with their N newest
    /// retained events.
    pub(crate) rewind: Option<u64>,
    /// End the stream (reconnect code 4002) when a stream room reports a
    /// `slow_consumer` gap, so the browser's reconnect recovers it from its
    /// `Last-Event-ID`.
    pub(crate) reconnect_on_gap: bool,
}

impl StreamSpec {
    /// A stream of `names`, resuming from `positions` (by index).
    pub(crate) fn new(names: Vec<Arc<str>>, positions: Vec<Option<Position>>) -> StreamSpec {
        let fingerprint = resume::fingerprint(&names);
        StreamSpec { names, fingerprint, positions, rewind: None, reconnect_on_gap: true }
    }

    pub(crate) fn index_of(&self, room: &str) -> Option<usize> {
        self.names.iter().position(|r| &**r == room)
    }

    fn recovering(&self, index: usize) -> bool {
        self.positions.get(index).is_some_and(Option::is_some)
    }
}

/// Something the writer does when it writes the frame it came with (kept
/// in the outbox's tags beside the frame, so it happens in write order).
#[derive(Debug)]
pub(crate) enum Note {
    /// The frame is the `$joined` event of the stream's room `index`;
    /// `position` is where its live stream starts (recoverable rooms).
    Joined { index: usize, position: Option<(Arc<str>, u64)>, recovered: Option<bool> },
    /// The frame is the `$gap` event of the stream's room `index`.
    Gap { index: usize, reason: GapReason, to: Option<u64>, epoch: Option<Arc<str>> },
}

/// The event name of an envelope of `kind` (`event`: its event name) on an
/// event stream: an `event` is named by its event name (`$event` when that
/// is empty, starts with `$` or cannot be a field value), any other type
/// `$<type>`.
pub(crate) fn event_name(kind: Kind, event: Option<&str>) -> Cow<'_, str> {
    if kind == Kind::Event {
        return match event {
            Some(name) if !name.is_empty() && !name.starts_with('$') && event_stream::is_field_safe(name) => {
                Cow::Borrowed(name)
            }
            _ => Cow::Borrowed("$event"),
        };
    }
    Cow::Owned(format!("${}", kind.as_str()))
}

/// A stream-only event (no envelope behind it), framed.
fn stream_event(id: Option<&str>, name: &str, data: &serde_json::Value) -> Frame {
    Frame::Text(event_stream::event(id, Some(name), data.to_string().as_bytes()))
}

impl Session {
    /// Queues the `$joined` of the stream's room `index`: `data` is the
    /// reply's (a recoverable room's position), `{"room": …}` without one.
    pub(crate) fn stream_joined(
        &self,
        index: usize,
        data: Option<&Payload>,
        position: Option<(Arc<str>, u64)>,
        recovered: Option<bool>,
    ) {
        let Some(spec) = &self.stream else { return };
        let Some(room) = spec.names.get(index) else { return };
        let data = match data {
            Some(d) if d.bytes().first() == Some(&b'{') => Bytes::copy_from_slice(d.bytes()),
            _ => Bytes::from(serde_json::json!({ "room": &**room }).to_string()),
        };
        let bytes = event_stream::event(None, Some("$joined"), &data);
        // Counted as the reply it stands for.
        crate::metrics::messages_out(Kind::Reply, 1);
        let note = Note::Joined { index, position, recovered };
        self.push_noted(bytes, note);
    }

    /// Queues the `$join_error` of the stream's room `index`.
    fn stream_join_error(&self, index: usize, code: u32, message: &str) {
        let Some(room) = self.stream.as_ref().and_then(|s| s.names.get(index)) else { return };
        let data = serde_json::json!({ "room": &**room, "code": code, "message": message });
        crate::metrics::messages_out(Kind::Error, 1);
        if let Frame::Text(bytes) = stream_event(None, "$join_error", &data) {
            self.push_prepared(bytes);
        }
    }

    /// Queues a `gap` of `room` in this connection's form: with a [`Note`]
    /// when it is one of the stream's rooms.
    pub(crate) fn push_gap(
        &self,
        bytes: Bytes,
        room: &str,
        reason: GapReason,
        to: Option<u64>,
        epoch: Option<&Arc<str>>,
    ) {
        crate::metrics::gap_notice();
        match self.stream.as_ref().and_then(|s| s.index_of(room)) {
            Some(index) => self.push_noted(bytes, Note::Gap { index, reason, to, epoch: epoch.cloned() }),
            None => self.push_prepared(bytes),
        }
    }
}

/// Joins the stream's rooms, at most [`JOINS_IN_FLIGHT`] at once; returns
/// when every join was answered.
pub(super) async fn join_rooms(hub: &Hub, session: &Arc<Session>, spec: &StreamSpec) {
    let in_flight = JOINS_IN_FLIGHT.min(session.max_inflight as usize).max(1);
    futures::stream::iter(0..spec.names.len())
        .for_each_concurrent(in_flight, |index| join_one(hub, session, spec, index))
        .await;
}

/// One join of the stream's room `index`, as a client's `join` is handled
/// (`join.rs`), answered on the stream.
async fn join_one(hub: &Hub, session: &Arc<Session>, spec: &StreamSpec, index: usize) {
    let room = &spec.names[index];
    match reader::join_rate(session) {
        Ok(()) => {}
        Err(Some(_wait)) => return session.stream_join_error(index, ErrorCode::RATE_LIMITED.0, "join rate exceeded"),
        // Closing (too many refusals).
        Err(None) => return,
    }
    if !session.allows_room(room) {
        return session.stream_join_error(index, ErrorCode::FORBIDDEN.0, "token does not allow this room");
    }
    let want = match (&spec.positions[index], spec.rewind) {
        (Some(p), _) => Want::Since(StreamPosition { offset: p.offset, epoch: Arc::from(p.epoch.as_str()) }),
        (None, Some(n)) => Want::Rewind(usize::try_from(n).unwrap_or(usize::MAX)),
        (None, None) => Want::Live,
    };
    let timeout = hub.inner.config.handler_timeout;
    // A panic in the host's join authorizer is answered with a 500, as for
    // a client's join.
    let join = AssertUnwindSafe(hub.join_session(session, room, None, want, JoinAnswer::Stream(index))).catch_unwind();
    match tokio::time::timeout(timeout, join).await {
        Err(_) => session.stream_join_error(index, ErrorCode::TIMEOUT.0, "join timed out"),
        Ok(Err(_panic)) => session.stream_join_error(index, ErrorCode::INTERNAL.0, "join failed"),
        Ok(Ok(Err(e))) => session.stream_join_error(index, e.code(), e.message()),
        Ok(Ok(Ok(replied))) => {
            if !replied {
                session.stream_joined(index, None, None, None);
            }
            // Presence state goes right after the reply, never before.
            hub.extension_joined(session, room);
        }
    }
}

/// What the session's writer keeps for an event stream.
pub(super) struct StreamWriter {
    pub(super) ids: StreamIds,
    /// The tags of the batch being written, by index in the batch.
    pub(super) tags: VecDeque<(u64, Tag)>,
    /// Frames the last one written expanded to, written before anything else.
    pub(super) extra: VecDeque<Frame>,
}

impl StreamWriter {
    pub(super) fn new(spec: Arc<StreamSpec>) -> StreamWriter {
        StreamWriter { ids: StreamIds::new(spec), tags: VecDeque::new(), extra: VecDeque::new() }
    }

    /// The first frame to write for the batch's frame `index`; the rest
    /// (its event, `$resync`, a close) wait in `extra`.
    pub(super) fn write(&mut self, frame: Frame, index: u64) -> Frame {
        let Some((_, tag)) = self.tags.front().is_some_and(|t| t.0 == index).then(|| self.tags.pop_front()).flatten()
        else {
            // Untagged (most frames): written as it is. `extra` is empty
            // here, the writer writes it before the batch's next frame.
            return frame;
        };
        self.ids.write(frame, Some(tag), &mut self.extra);
        self.extra.pop_front().expect("a written frame is at least itself")
    }
}

/// A stream's position in each of its rooms, kept by the session's writer
/// as it writes (so an id never claims an event that was not written).
pub(super) struct StreamIds {
    spec: Arc<StreamSpec>,
    offsets: Vec<Option<u64>>,
    epochs: Vec<Option<Arc<str>>>,
}

impl StreamIds {
    pub(super) fn new(spec: Arc<StreamSpec>) -> StreamIds {
        let offsets = spec.positions.iter().map(|p| p.as_ref().map(|p| p.offset)).collect();
        let epochs = spec.positions.iter().map(|p| p.as_ref().map(|p| Arc::from(p.epoch.as_str()))).collect();
        StreamIds { spec, offsets, epochs }
    }

    fn known(&self, i: usize) -> bool {
        self.offsets[i].is_some() && self.epochs[i].is_some()
    }

    fn id(&self) -> String {
        let positions: Vec<Option<Position>> = self
            .offsets
            .iter()
            .zip(&self.epochs)
            .map(|(o, e)| match (o, e) {
                (Some(offset), Some(epoch)) => Some(Position { offset: *offset, epoch: epoch.to_string() }),
                _ => None,
            })
            .collect();
        resume::encode(self.spec.fingerprint, &positions)
    }

    fn id_frame(&self) -> Option<Frame> {
        event_stream::id_field(&self.id()).map(Frame::Text)
    }

    /// The frames to write for `frame`, a data frame queued with `tag`, in
    /// order (into `out`).
    pub(super) fn write(&mut self, frame: Frame, tag: Option<Tag>, out: &mut VecDeque<Frame>) {
        match tag {
            None => out.push_back(frame),
            Some(Tag::Offset(room, offset)) => {
                if let Some(i) = self.spec.index_of(&room) {
                    // Positions only move forward: a rewind replays older
                    // events after the join reply, and the id must not send
                    // a reconnect back before them.
                    self.offsets[i] = Some(self.offsets[i].map_or(offset, |o| o.max(offset)));
                    out.extend(self.id_frame());
                }
                out.push_back(frame);
            }
            Some(Tag::Stream(note)) => match *note {
                Note::Joined { index, position, recovered } => self.joined(frame, index, position, recovered, out),
                Note::Gap { index, reason, to, epoch } => {
                    out.push_back(frame);
                    self.gap(index, reason, to, epoch, out);
                }
            },
        }
    }

    fn joined(
        &mut self,
        frame: Frame,
        i: usize,
        position: Option<(Arc<str>, u64)>,
        recovered: Option<bool>,
        out: &mut VecDeque<Frame>,
    ) {
        // The reply's offset is where the live stream starts, *after* the
        // replayed events that follow it. On a recovery the position stays
        // the one asked for, and the replayed events move it: a stream that
        // drops mid-replay resumes from the last one delivered.
        let keep = recovered == Some(true) && self.known(i);
        if let (false, Some((epoch, offset))) = (keep, position) {
            self.epochs[i] = Some(epoch);
            self.offsets[i] = Some(offset);
        }
        if self.known(i) {
            out.extend(self.id_frame());
        }
        out.push_back(frame);
        if self.spec.recovering(i) && recovered != Some(true) {
            let reason = if recovered == Some(false) {
                "the events missed are no longer in history"
            } else {
                "this room keeps no history"
            };
            out.push_back(stream_event(
                None,
                "$resync",
                &serde_json::json!({ "room": &*self.spec.names[i], "reason": reason }),
            ));
        }
    }

    /// After the `$gap` of the stream's room `i` (protocol §3.12):
    /// - `slow_consumer`: the events are still in history; end the stream
    ///   (4002) so the browser's reconnect recovers them from its
    ///   `Last-Event-ID` (when [`StreamSpec::reconnect_on_gap`]);
    /// - `missed`: they are gone; `$resync`, and the position moves past
    ///   them so a later reconnect does not ask for them again;
    /// - `epoch_changed`: the stream starts over; `$resync`, and the
    ///   position becomes offset 0 of the new epoch.
    pub(super) fn gap(
        &mut self,
        i: usize,
        reason: GapReason,
        to: Option<u64>,
        epoch: Option<Arc<str>>,
        out: &mut VecDeque<Frame>,
    ) {
        let resync = |this: &Self, why: &str, out: &mut VecDeque<Frame>| {
            let id = this.known(i).then(|| this.id());
            let data = serde_json::json!({ "room": &*this.spec.names[i], "reason": why });
            out.push_back(stream_event(id.as_deref(), "$resync", &data));
        };
        match reason {
            GapReason::Missed => {
                if let Some(to) = to {
                    self.offsets[i] = Some(self.offsets[i].map_or(to, |o| o.max(to)));
                }
                resync(self, "events were lost and are no longer in history", out);
            }
            GapReason::EpochChanged => {
                if let Some(e) = epoch {
                    self.epochs[i] = Some(e);
                    self.offsets[i] = Some(0);
                }
                resync(self, "the room's history was reset", out);
            }
            GapReason::SlowConsumer if self.spec.reconnect_on_gap => {
                let reason = "reconnect to recover missed events".to_owned();
                out.push_back(Frame::Close(Some(CloseFrame { code: CloseCode::RECONNECT, reason })));
            }
            GapReason::SlowConsumer => {}
        }
    }

    /// The stream's index of `room`, if it is one of its rooms.
    pub(super) fn index_of(&self, room: &str) -> Option<usize> {
        self.spec.index_of(room)
    }
}

#[cfg(test)]
mod tests {
    //! The writer's side of a stream on its own (tier a): which frames a
    //! queued frame and its tag become, and the ids they carry.

    use super::*;
    use crate::transport::event_stream::parse;

    fn spec(names: &[&str], positions: Vec<Option<Position>>, reconnect_on_gap: bool) -> Arc<StreamSpec> {
        let mut spec = StreamSpec::new(names.iter().map(|n| Arc::from(*n)).collect(), positions);
        spec.reconnect_on_gap = reconnect_on_gap;
        Arc::new(spec)
    }

    fn pos(offset: u64, epoch: &str) -> Option<Position> {
        Some(Position { offset, epoch: epoch.into() })
    }

    fn ev(name: &str) -> Frame {
        Frame::Text(Framing::EventStream.frame_named(false, name, b"{}"))
    }

    fn joined(index: usize, epoch: &str, offset: u64, recovered: Option<bool>) -> Option<Tag> {
        let note = Note::Joined { index, position: Some((Arc::from(epoch), offset)), recovered };
        Some(Tag::Stream(Box::new(note)))
    }

    fn offset(room: &str, offset: u64) -> Option<Tag> {
        Some(Tag::Offset(Arc::from(room), offset))
    }

    /// What the frames written make on the wire: (id, event, data) of each
    /// event, and the close frame if one was written.
    fn wire(frames: &VecDeque<Frame>) -> (Vec<(String, String, String)>, Option<CloseFrame>) {
        let mut text = Vec::new();
        let mut close = None;
        for f in frames {
            match f {
                Frame::Text(b) => text.extend_from_slice(b),
                Frame::Close(c) => close = c.clone(),
                other => panic!("unexpected {other:?}"),
            }
        }
        (parse(std::str::from_utf8(&text).unwrap()), close)
    }

    #[test]
    fn names_of_envelopes() {
        assert_eq!(event_name(Kind::Event, Some("tick")), "tick");
        for odd in [Some(""), Some("$x"), Some("a\nb"), None] {
            assert_eq!(event_name(Kind::Event, odd), "$event", "{odd:?}");
        }
        assert_eq!(event_name(Kind::Hello, None), "$hello");
        assert_eq!(event_name(Kind::PresenceDiff, None), "$presence_diff");
    }

    /// Ids from join replies and from events of stream rooms; `$resync`
    /// for a recovering join that did not recover.
    #[test]
    fn ids_from_replies_and_events() {
        let spec = spec(&["a", "b"], vec![None, pos(2, "old")], true);
        let fp = spec.fingerprint;
        let mut ids = StreamIds::new(spec);
        let mut out = VecDeque::new();
        ids.write(ev("$joined"), joined(0, "E.1", 3, Some(true)), &mut out);
        ids.write(ev("tick"), offset("a", 4), &mut out);
        ids.write(ev("tick"), offset("c", 99), &mut out);
        ids.write(ev("$joined"), joined(1, "F", 9, Some(false)), &mut out);
        ids.write(ev("$reply"), None, &mut out);
        let (events, close) = wire(&out);
        assert!(close.is_none());
        let names: Vec<&str> = events.iter().map(|e| e.1.as_str()).collect();
        assert_eq!(names, ["$joined", "tick", "tick", "$joined", "$resync", "$reply"]);
        let id_a = resume::encode(fp, &[pos(3, "E.1"), pos(2, "old")]);
        assert_eq!(events[0].0, id_a, "the join reply's position (b keeps the one it asked for)");
        let id_a4 = resume::encode(fp, &[pos(4, "E.1"), pos(2, "old")]);
        assert_eq!(events[1].0, id_a4, "an event of a stream room moves its position");
        assert_eq!(events[2].0, id_a4, "another room's event leaves the id alone");
        assert_eq!(events[3].0, resume::encode(fp, &[pos(4, "E.1"), pos(9, "F")]));
        assert_eq!(serde_json::from_str::<serde_json::Value>(&events[4].2).unwrap()["room"], "b");
    }

    #[test]
    fn a_gap_in_a_stream_room_resyncs_or_ends_the_stream() {
        let spec = spec(&["a"], vec![None], true);
        let fp = spec.fingerprint;
        let mut ids = StreamIds::new(spec);
        let mut out = VecDeque::new();
        ids.write(ev("$joined"), joined(0, "E", 3, None), &mut out);
        let gap = |index, reason, to: Option<u64>, epoch: Option<&str>| {
            Some(Tag::Stream(Box::new(Note::Gap { index, reason, to, epoch: epoch.map(Arc::from) })))
        };
        // Lost for good: resync, and the position moves past the loss.
        ids.write(ev("$gap"), gap(0, GapReason::Missed, Some(6), Some("E")), &mut out);
        // Reset: resync, position 0 of the new epoch.
        ids.write(ev("$gap"), gap(0, GapReason::EpochChanged, None, Some("F")), &mut out);
        let (events, close) = wire(&out);
        let names: Vec<&str> = events.iter().map(|e| e.1.as_str()).collect();
        assert_eq!(names, ["$joined", "$gap", "$resync", "$gap", "$resync"]);
        assert_eq!(events[2].0, resume::encode(fp, &[pos(6, "E")]));
        assert_eq!(events[4].0, resume::encode(fp, &[pos(0, "F")]));
        assert!(close.is_none());
        // Still in history: end the stream for a recovering reconnect.
        let mut out = VecDeque::new();
        ids.gap(0, GapReason::SlowConsumer, Some(2), None, &mut out);
        assert!(matches!(out.pop_front(), Some(Frame::Close(Some(c))) if c.code == CloseCode::RECONNECT));
        // Unless the endpoint says not to.
        let mut quiet = StreamIds::new(spec_without_reconnect());
        quiet.gap(0, GapReason::SlowConsumer, Some(2), None, &mut out);
        assert!(out.is_empty());
    }

    fn spec_without_reconnect() -> Arc<StreamSpec> {
        spec(&["a"], vec![None], false)
    }

    /// A recovering join keeps the position it asked for until the
    /// replayed events move it; a rewind's older events never move it back.
    #[test]
    fn recovery_positions_follow_the_replay() {
        let spec = spec(&["a", "b"], vec![pos(5, "E"), None], true);
        let fp = spec.fingerprint;
        let mut ids = StreamIds::new(spec);
        let mut out = VecDeque::new();
        ids.write(ev("$joined"), joined(0, "E", 9, Some(true)), &mut out);
        ids.write(ev("m"), offset("a", 6), &mut out);
        ids.write(ev("m"), offset("a", 7), &mut out);
        ids.write(ev("$joined"), joined(1, "F", 10, None), &mut out);
        ids.write(ev("m"), offset("b", 8), &mut out);
        ids.write(ev("m"), offset("b", 11), &mut out);
        let (events, _) = wire(&out);
        let got: Vec<String> = events.iter().map(|e| e.0.clone()).collect();
        let at = |a: Option<Position>, b: Option<Position>| resume::encode(fp, &[a, b]);
        assert_eq!(
            got,
            [
                at(pos(5, "E"), None),
                at(pos(6, "E"), None),
                at(pos(7, "E"), None),
                at(pos(7, "E"), pos(10, "F")),
                at(pos(7, "E"), pos(10, "F")),
                at(pos(7, "E"), pos(11, "F")),
            ]
        );
        assert!(events.iter().all(|e| e.1 != "$resync"), "recovered: no resync");
    }
}
