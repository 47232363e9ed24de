//! The `join` operation: validation, authorization, the hub's join path,
//! and recovery of a recoverable room.

use super::*;

// The longest `epoch` a client may send in a `join` is the longest a store
// may make.
use crate::history::MAX_EPOCH_LEN;

pub(super) fn on_join(hub: &Hub, session: &Arc<Session>, calls: &mut Calls, env: Envelope) {
    let Some(room) = room_field(session, &env) else { return };
    if session.is_member(&room) {
        tracing::debug!(%room, reference = ?env.reference, offset = ?env.offset, "join of a room already joined");
        return room_reply(session, env.reference, &room);
    }
    if !reader::within_join_rate(session, env.reference) {
        return;
    }
    let max_params = hub.inner.config.max_join_params_size;
    if env.data.as_ref().is_some_and(|d| d.bytes().len() > max_params) {
        let msg = format!("join params larger than {max_params} bytes");
        return session.send_error(env.reference, ErrorCode::BAD_REQUEST.0, &msg);
    }
    if !session.allows_room(&room) {
        return session.send_error(env.reference, ErrorCode::FORBIDDEN.0, "token does not allow this room");
    }
    let want = match (env.offset, env.epoch.as_deref(), env.rewind) {
        (Some(_), Some(_), Some(_)) => {
            return session.send_error(env.reference, ErrorCode::BAD_REQUEST.0, "`rewind` cannot go with a position");
        }
        (Some(offset), Some(epoch), None) => {
            if epoch.len() > MAX_EPOCH_LEN {
                return session.send_error(env.reference, ErrorCode::BAD_REQUEST.0, "`epoch` is longer than 64 bytes");
            }
            Want::Since(StreamPosition { offset, epoch: Arc::from(epoch) })
        }
        (None, None, Some(n)) => Want::Rewind(usize::try_from(n).unwrap_or(usize::MAX)),
        (None, None, None) => Want::Live,
        _ => {
            let msg = "a recovering `join` needs both `offset` and `epoch`";
            return session.send_error(env.reference, ErrorCode::BAD_REQUEST.0, msg);
        }
    };
    let Some(permit) = acquire(session, env.reference) else { return };
    let (hub, session) = (hub.clone(), session.clone());
    let guard = TaskGuard::new(&hub.inner);
    calls.spawn(async move {
        let _guard = guard;
        let _permit = permit;
        let timeout = hub.inner.config.handler_timeout;
        // A panic in the host's join authorizer is answered with a 500, as a
        // panicking handler is; uncaught, the join would never be answered.
        let join =
            AssertUnwindSafe(hub.join_session(&session, &room, env.data, want, JoinAnswer::Reply(env.reference)))
                .catch_unwind();
        match tokio::time::timeout(timeout, join).await {
            Err(_) => session.send_error(env.reference, ErrorCode::TIMEOUT.0, "join timed out"),
            Ok(Err(_panic)) => session.send_error(env.reference, ErrorCode::INTERNAL.0, "join failed"),
            Ok(Ok(Err(e))) => session.send_call_error(env.reference, &e),
            Ok(Ok(Ok(replied))) => {
                if !replied {
                    room_reply(&session, env.reference, &room);
                }
                // Presence state goes right after the reply, never before.
                hub.extension_joined(&session, &room);
            }
        }
    });
}
