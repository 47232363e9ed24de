//! The registry: which sessions exist, which rooms they are in, and the
//! join and leave paths (with their rollback when a join fails half-way).

use super::*;

/// Takes back a membership whose join did not complete (see `add_member`).
pub(super) struct Rollback<'a> {
    hub: &'a Hub,
    session: &'a Arc<Session>,
    room: &'a str,
    armed: bool,
}

impl Drop for Rollback<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.hub.remove_member(self.session, self.room, false);
        }
    }
}

impl Hub {
    pub(super) fn register(&self, session: &Arc<Session>) {
        self.inner.sessions.write().insert(session.id, session.clone());
        if let Some(user) = session.identity.user_arc() {
            self.inner.users.write().entry(user.clone()).or_default().push(session.id);
        }
    }

    pub(crate) fn deregister(&self, session: &Session) {
        self.inner.sessions.write().remove(&session.id);
        if let Some(user) = session.identity.user_arc() {
            let mut users = self.inner.users.write();
            if let Some(ids) = users.get_mut(user) {
                ids.retain(|i| *i != session.id);
                if ids.is_empty() {
                    users.remove(user);
                }
            }
        }
    }

    pub(crate) fn session_ended(&self) {
        self.inner.sessions_changed.notify_waiters();
    }

    pub(crate) async fn register_heartbeat(&self, session: &Arc<Session>) {
        let cfg = &self.inner.config;
        if cfg.heartbeat_interval.is_zero() {
            return;
        }
        let tx = self.inner.heartbeat.get_or_init(|| heartbeat::spawn(cfg.heartbeat_interval, cfg.heartbeat_timeout));
        let _ = tx.send(Arc::downgrade(session)).await;
    }

    /// A live connection by id.
    pub fn connection(&self, id: ConnectionId) -> Option<Connection> {
        self.inner.sessions.read().get(&id).cloned().map(|s| Connection(s, self.clone()))
    }

    /// Joins a connection to a room, as if it had sent `join` (the join
    /// authorizer is not asked: the host decided).
    ///
    /// # Errors
    ///
    /// [`ErrorKind::NotConnected`] (no such connection, or it is closing),
    /// [`ErrorKind::InvalidRoom`], [`ErrorKind::Refused`] (the
    /// connection's room limit), [`ErrorKind::ShuttingDown`], and the
    /// engines' own kinds (`Backplane`, `History`, `Presence`) when the
    /// room could not be brought in step. [`Error::call_error`] holds the
    /// reply a client's own `join` would get, for a host relaying it.
    pub async fn join(&self, id: ConnectionId, room: &str) -> Result<()> {
        let session = self.inner.sessions.read().get(&id).cloned();
        let session = session.ok_or_else(|| Error::new(ErrorKind::NotConnected))?;
        validate_room_name(room).map_err(|why| Error::msg(ErrorKind::InvalidRoom, why))?;
        self.add_member(&session, room, stream::Want::Live, JoinAnswer::Silent).await?;
        self.extension_joined(&session, room);
        Ok(())
    }

    /// Removes a connection from a room; `false` if it was not a member.
    pub fn leave(&self, id: ConnectionId, room: &str) -> bool {
        let session = self.inner.sessions.read().get(&id).cloned();
        session.is_some_and(|s| self.leave_session(&s, room))
    }

    /// A client's join: the authorizer, then the membership. Returns
    /// whether the reply was already queued (recoverable rooms queue it
    /// before their replay).
    pub(crate) async fn join_session(
        &self,
        session: &Arc<Session>,
        room: &str,
        params: Option<Payload>,
        want: stream::Want,
        answer: JoinAnswer,
    ) -> std::result::Result<bool, CallError> {
        if let Some(auth) = &self.inner.authorize_join {
            let req = JoinRequest {
                room: room.to_owned(),
                params,
                identity: session.identity.clone(),
                connection: session.id,
            };
            auth.authorize(req).await?;
        }
        Ok(self.add_member(session, room, want, answer).await?)
    }

    /// Adds the membership; returns whether a reply was queued (only with a
    /// `answer` that replies, in a recoverable room). A refusal carries the client's
    /// reply as its source (see [`Error::call_error`]).
    pub(super) async fn add_member(
        &self,
        session: &Arc<Session>,
        room: &str,
        want: stream::Want,
        answer: JoinAnswer,
    ) -> Result<bool> {
        let refuse = |kind, code, message| Error::with_source(kind, CallError::with_code(code, message));
        if self.is_shutting_down() {
            return Err(refuse(ErrorKind::ShuttingDown, ErrorCode::UNAVAILABLE, "server is shutting down"));
        }
        let created = {
            let mut rooms = session.rooms.lock();
            if rooms.iter().any(|r| &**r == room) {
                return Ok(false);
            }
            if rooms.len() >= self.inner.config.max_rooms_per_connection {
                return Err(refuse(ErrorKind::Refused, ErrorCode::TOO_MANY_ROOMS, "room limit reached"));
            }
            if session.is_cancelled() {
                return Err(refuse(ErrorKind::NotConnected, ErrorCode::UNAVAILABLE, "connection is closing"));
            }
            let (name, created, stream) = self.inner.rooms.join(room, session, self.recoverable(room));
            // Room for just this one while the list is short: a first push
            // would reserve four (64 bytes for a connection in one room,
            // the common case, kept for its whole life).
            if rooms.len() < 4 {
                rooms.reserve_exact(1);
            }
            rooms.push(name);
            (created, stream)
        };
        let (created, stream) = created;
        // Until the join is complete (subscription in step, hook run), a
        // failure — or the caller dropping this future, e.g. on a timeout —
        // takes the membership back without an `on_leave` for a join that
        // never finished.
        let mut rollback = Rollback { hub: self, session, room, armed: true };
        if let Some(link) = &self.inner.backplane {
            link.ensure(self, room, created).await?;
        }
        // The room's presence view (and other nodes' metas) is ready before
        // the reply, so the state sent right after it is complete.
        if let Some(ext) = &self.inner.extension {
            // A client gets the short 503 of every outage (`From<Error>
            // for CallError`); the cause goes to the log only.
            ext.prepare(self, room).await?;
        }
        // Taken out while this join was on its way (`Hub::close_room`, or the
        // client's own `leave`): the join ends with 403, not with a reply
        // for a membership that is gone.
        if !session.is_member(room) {
            return Err(left_while_joining());
        }
        // A recoverable room: merge history and the live stream, queue the
        // reply and the replay, make the member live.
        let replied = match &stream {
            Some(stream) => {
                self.start_position_check();
                self.join_stream(session, stream, want, answer).await?;
                answer.replies()
            }
            None => false,
        };
        rollback.armed = false;
        // Taken out between the merge and here: no `on_join` for it (and
        // no `on_leave`, `hooks.rs`). Taken out by then or while `on_join`
        // ran: a client already answered keeps its reply (the `leave`
        // notice came after it), one not yet answered gets the 403 of a
        // join on its way, never a reply after its `leave`.
        self.hook_joined(session, room);
        if !replied && !session.is_member(room) {
            return Err(left_while_joining());
        }
        Ok(replied)
    }

    /// Removes a membership; with `hook`, runs `on_leave`. `false` if the
    /// session was not a member.
    pub(super) fn remove_member(&self, session: &Arc<Session>, room: &str, hook: bool) -> bool {
        let removed = {
            let mut rooms = session.rooms.lock();
            let Some(pos) = rooms.iter().position(|r| &**r == room) else { return false };
            rooms.swap_remove(pos);
            self.inner.rooms.leave(room, session.id)
        };
        if removed == Some(true) {
            if let Some(link) = &self.inner.backplane {
                link.mark(self, room);
            }
        }
        if let Some(ext) = &self.inner.extension {
            ext.leave(self, session, room, removed == Some(true));
        }
        if hook {
            self.hook_left(session, room);
        }
        true
    }

    pub(crate) fn leave_session(&self, session: &Arc<Session>, room: &str) -> bool {
        self.remove_member(session, room, true)
    }

    pub(crate) fn leave_all(&self, session: &Arc<Session>) {
        let rooms: Vec<Arc<str>> = session.rooms.lock().clone();
        for room in rooms {
            self.leave_session(session, &room);
        }
    }

    /// Number of local members of a room (0 if it does not exist).
    pub fn room_len(&self, room: &str) -> usize {
        self.inner.rooms.get(room).map_or(0, |r| r.members.read().len())
    }

    /// The local members of a room.
    pub fn room_members(&self, room: &str) -> Vec<Member> {
        let Some(r) = self.inner.rooms.get(room) else { return Vec::new() };
        let members = r.members.read();
        let mut out: Vec<Member> = members
            .values()
            .map(|(_, s, _)| Member { connection: s.id, user_id: s.identity.user_arc().cloned() })
            .collect();
        out.sort_by_key(|m| m.connection);
        out
    }

    /// Whether `room` currently has local members.
    pub fn room_exists(&self, room: &str) -> bool {
        self.inner.rooms.contains(room)
    }
}

/// A join whose member was taken out of the room (`Hub::close_room`, or the
/// client's own `leave`) while it was on its way: 403, never a reply for a
/// membership that is gone.
pub(super) fn left_while_joining() -> Error {
    Error::with_source(
        ErrorKind::Refused,
        CallError::with_code(ErrorCode::FORBIDDEN, "the room was left or closed while joining"),
    )
}
