//! The `leave` operation.

use super::*;

pub(super) fn on_leave(hub: &Hub, session: &Arc<Session>, env: Envelope) {
    let Some(room) = room_field(session, &env) else { return };
    if session.is_member(&room) && !reader::within_join_rate(session, env.reference) {
        return;
    }
    if hub.leave_session(session, &room) {
        room_reply(session, env.reference, &room);
    } else {
        session.send_error(env.reference, ErrorCode::NOT_JOINED.0, "not a member of this room");
    }
}
