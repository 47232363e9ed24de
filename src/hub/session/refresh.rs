//! The `refresh` operation: new credentials for a live connection.

use super::*;

/// `refresh`: checks the new token with the hub's [`Refresh`](crate::auth::Refresh)
/// hook (as a task, like a call: it may be slow) and, when it is for the
/// same user, makes its expiry and room restriction the connection's.
pub(super) fn on_refresh(hub: &Hub, session: &Arc<Session>, calls: &mut Calls, env: Envelope) {
    let reference = env.reference;
    if hub.inner.refresh.is_none() {
        return session.send_error(reference, ErrorCode::BAD_REQUEST.0, "this server does not accept `refresh`");
    }
    #[derive(serde::Deserialize)]
    struct Token {
        token: String,
    }
    let Some(Ok(Token { token })) = env.data.as_ref().map(Payload::decode::<Token>) else {
        let msg = "`refresh` needs `data: {\"token\": \"…\"}`";
        return session.send_error(reference, ErrorCode::BAD_REQUEST.0, msg);
    };
    let Some(permit) = acquire(session, reference) else { return };
    let (hub, session) = (hub.clone(), session.clone());
    let guard = TaskGuard::new(&hub.inner);
    calls.spawn(async move {
        let _guard = guard;
        let _permit = permit;
        let Some(refresh) = &hub.inner.refresh else { return };
        let current = session.grant.lock().refreshed.as_deref().unwrap_or(&session.identity).clone();
        let checked = AssertUnwindSafe(async { refresh.refresh(&current, token).await }).catch_unwind();
        let renewed = match tokio::time::timeout(hub.inner.config.handler_timeout, checked).await {
            Err(_) => return session.send_error(reference, ErrorCode::TIMEOUT.0, "refresh timed out"),
            Ok(Err(_panic)) => return session.send_error(reference, ErrorCode::INTERNAL.0, "refresh failed"),
            Ok(Ok(Err(e))) => return session.send_call_error(reference, &e),
            Ok(Ok(Ok(identity))) => identity,
        };
        if renewed.user_id() != session.identity.user_id() {
            return session.send_error(reference, ErrorCode::FORBIDDEN.0, "token is for another user");
        }
        let grant = Grant { deadline: Grant::deadline_of(&renewed), refreshed: Some(Box::new(renewed)) };
        let expires_in_ms =
            grant.deadline.map(|d| d.saturating_duration_since(tokio::time::Instant::now()).as_millis() as u64);
        *session.grant.lock() = grant;
        if let Some(r) = reference {
            #[derive(serde::Serialize)]
            struct Renewed {
                expires_in_ms: Option<u64>,
            }
            if let Ok(p) = Payload::encode(session.format, &Renewed { expires_in_ms }) {
                session.send_reply(r, &p);
            }
        }
    });
}
