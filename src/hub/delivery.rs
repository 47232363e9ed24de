//! Delivery: queuing an encoded event to this node's members of a room
//! (local publishes, and messages from other nodes), and sends to one
//! connection or to every connection of a user.

use super::*;

impl Hub {
    /// Queues the event to every local member of `room` but `exclude`.
    pub(super) fn deliver_local(
        &self,
        room: &str,
        exclude: u64,
        encoded: &mut Encoded<'_>,
    ) -> std::result::Result<usize, ProtocolError> {
        let Some(room) = self.inner.rooms.get(room) else { return Ok(0) };
        let timer = crate::metrics::Timer::start();
        // Read lock held while queueing: queueing never awaits or blocks on
        // a peer, so publishers to the same room proceed in parallel.
        let members = room.members.read();
        let mut delivered = 0;
        let mut failed: [Option<ProtocolError>; 2] = [None, None];
        // Members with framed frames read the room's logs (`session/log.rs`):
        // the frame is appended once per form, then each is only woken.
        let logs = room.logs.read();
        for log in logs.iter() {
            match encoded.get(log.wire) {
                Ok(bytes) => log.append(bytes, exclude, &members),
                Err(e) => failed[log.wire.format.index()] = Some(e),
            }
        }
        if !logs.is_empty() {
            // Pairs with the writer's swap of its flag before it reads.
            std::sync::atomic::fence(Ordering::SeqCst);
        }
        drop(logs);
        for (id, (wire, session, cursor)) in members.iter() {
            if id.0 == exclude {
                continue;
            }
            // A value one format cannot represent (a map with non-string
            // keys in JSON) still reaches the members using the other one;
            // the error is returned once every member was tried.
            let slot = &mut failed[wire.format.index()];
            if slot.is_some() {
                continue;
            }
            if cursor.is_some() {
                session.outbox.wake_log();
                delivered += 1;
                continue;
            }
            match encoded.get(*wire) {
                Ok(bytes) => {
                    session.push_prepared(bytes);
                    delivered += 1;
                }
                Err(e) => *slot = Some(e),
            }
        }
        timer.fanout_done(delivered);
        match failed {
            [Some(e), _] | [None, Some(e)] => Err(e),
            [None, None] => Ok(delivered),
        }
    }

    /// Delivers a message that arrived over the backplane to local members.
    pub(crate) fn deliver_remote(&self, room: &str, msg: RoomMessage) {
        if msg.origin == self.inner.node {
            return;
        }
        if let Some(position) = msg.position {
            let ev = stream::Positioned {
                offset: position.offset,
                epoch: position.epoch,
                event: Arc::from(msg.event),
                payload: msg.payload,
                exclude: 0,
            };
            return self.deliver_positioned(room, ev);
        }
        // `msg.exclude` is a connection id of the origin node, which already
        // skipped it; ids are per hub, so here it would name an unrelated
        // connection that happens to have the same number.
        self.deliver_encoded(room, &msg.event, msg.payload.as_ref(), 0);
    }

    /// Queues an event whose payload is already encoded to every local
    /// member of `room` but `exclude`, without an offset.
    pub(crate) fn deliver_encoded(&self, room: &str, event: &str, payload: Option<&Payload>, exclude: u64) {
        let mut payload_fn = transcoding(payload);
        let mut encoded =
            Encoded { room: Some(room), event, offset: None, payload: &mut payload_fn, frames: Default::default() };
        if let Err(e) = self.deliver_local(room, exclude, &mut encoded) {
            tracing::warn!(room, error = %e, "dropping undeliverable event");
        }
    }

    /// Sends `event` straight to one connection of this node (an `event`
    /// envelope without `room`). Errors if it is not connected here, or
    /// once [`Hub::shutdown`] has started ([`Error::is_shutting_down`]).
    pub fn send<T: Serialize + ?Sized>(&self, id: ConnectionId, event: &str, data: &T) -> Result<()> {
        self.taking_work()?;
        check_event(event)?;
        let session = self.inner.sessions.read().get(&id).cloned();
        let session = session.ok_or_else(|| Error::new(ErrorKind::NotConnected))?;
        let payload = Payload::encode(session.format, data)?;
        session.send_parts(&Parts { event: Some(event), data: Some(payload.bytes()), ..Parts::new(Kind::Event) });
        Ok(())
    }

    /// Sends `event` to every connection of `user` on this node; returns how
    /// many connections it was queued to. Serializes once per format. Errors
    /// once [`Hub::shutdown`] has started ([`Error::is_shutting_down`]).
    pub fn send_to_user<T: Serialize + ?Sized>(&self, user: &str, event: &str, data: &T) -> Result<usize> {
        self.taking_work()?;
        check_event(event)?;
        let sessions = self.user_sessions(user);
        let mut payload_fn = |format: Format| Payload::encode(format, data).map(Some);
        let mut encoded =
            Encoded { room: None, event, offset: None, payload: &mut payload_fn, frames: Default::default() };
        // As in a room publish: a format that cannot encode the value skips
        // its connections, the others are served, the error is returned.
        let mut error = None;
        let mut sent = 0;
        for s in &sessions {
            match encoded.get(s.wire()) {
                Ok(bytes) => {
                    s.push_prepared(bytes);
                    sent += 1;
                }
                Err(e) => error = Some(e),
            }
        }
        crate::metrics::messages_out(Kind::Event, sent);
        match error {
            Some(e) => Err(e.into()),
            None => Ok(sent),
        }
    }
}
