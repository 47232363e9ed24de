//! The `call` operation: a handler call, queued per room and run one at a
//! time per room under the connection's in-flight bound and the handler
//! timeout.

use super::*;

pub(super) fn on_call(hub: &Hub, session: &Arc<Session>, calls: &mut Calls, env: Envelope) {
    let reference = env.reference;
    let Some(event) = env.event.as_deref() else {
        return session.send_error(reference, ErrorCode::BAD_REQUEST.0, "`call` needs an `event`");
    };
    if event.is_empty() || event.len() > crate::hub::MAX_EVENT_NAME_LEN {
        return session.send_error(reference, ErrorCode::BAD_REQUEST.0, "event name must be 1 to 128 bytes");
    }
    let room = match env.room.as_deref() {
        None => None,
        Some(r) => match session.rooms.lock().iter().find(|j| &***j == r) {
            Some(joined) => Some(joined.clone()),
            None => return session.send_error(reference, ErrorCode::NOT_JOINED.0, "not a member of this room"),
        },
    };
    let Some((event, handler)) = hub.inner.handlers.get_key_value(event) else {
        let msg = format!("no handler for event `{}`", crate::protocol::truncate(event));
        return session.send_error(reference, ErrorCode::UNKNOWN_EVENT.0, &msg);
    };
    let Some(permit) = acquire(session, reference) else { return };
    let queued_room = room.clone();
    let call = Call { hub: hub.clone(), session: session.clone(), room, event: event.clone() };
    let handler = handler.clone();
    let data = env.data;
    // The handler is invoked inside the task, so even a panic in its
    // synchronous part is caught and answered with a 500.
    let make: MakeCall = Box::new(move || handler.call(call, data));
    // A child of the connection's span (the reader runs in it); it follows
    // the call into its task. `docs/operations.md`, "Tracing".
    let span = tracing::debug_span!("call", event = &**event, r#ref = reference, room = queued_room.as_deref());
    let queued = QueuedCall { make, reference, _permit: permit, span };
    let Some(room) = queued_room else {
        let session = session.clone();
        let guard = TaskGuard::new(&hub.inner);
        let timeout = hub.inner.config.handler_timeout;
        // In the connection's span: a filter on its fields (one user's
        // calls) reaches the call's task too.
        calls.spawn(tracing::Instrument::in_current_span(async move {
            let _guard = guard;
            run_call(&session, timeout, queued).await;
        }));
        return;
    };
    let start_worker = {
        let mut queues = session.call_queues.lock();
        match queues.iter_mut().find(|q| q.room == room) {
            Some(q) => {
                q.calls.push_back(queued);
                false
            }
            None => {
                queues.push(RoomCalls { room: room.clone(), calls: VecDeque::from([queued]) });
                true
            }
        }
    };
    if start_worker {
        let session = session.clone();
        let guard = TaskGuard::new(&hub.inner);
        let timeout = hub.inner.config.handler_timeout;
        calls.spawn(tracing::Instrument::in_current_span(async move {
            let _guard = guard;
            room_worker(session, room, timeout).await;
        }));
    }
}

/// A call waiting to run: how to start its handler, its `ref`, its permit.
pub(crate) struct QueuedCall {
    make: MakeCall,
    reference: Option<u64>,
    _permit: Permit,
    span: tracing::Span,
}

pub(super) type MakeCall = Box<dyn FnOnce() -> futures::future::BoxFuture<'static, Result<Payload, CallError>> + Send>;

/// The queued calls of one room of one connection.
pub(crate) struct RoomCalls {
    room: Arc<str>,
    calls: VecDeque<QueuedCall>,
}

/// Runs `room`'s queued calls one after another until the queue is empty,
/// then removes it (a call queued after that starts a new worker).
pub(super) async fn room_worker(session: Arc<Session>, room: Arc<str>, timeout: std::time::Duration) {
    loop {
        let next = {
            let mut queues = session.call_queues.lock();
            let Some(pos) = queues.iter().position(|q| q.room == room) else { return };
            match queues[pos].calls.pop_front() {
                Some(call) => call,
                None => {
                    queues.swap_remove(pos);
                    return;
                }
            }
        };
        run_call(&session, timeout, next).await;
    }
}

/// Runs one call's handler under the timeout, catching panics, and answers.
pub(super) async fn run_call(session: &Session, timeout: std::time::Duration, queued: QueuedCall) {
    let QueuedCall { make, reference, _permit, span } = queued;
    let fut = async move { make().await };
    let timer = crate::metrics::Timer::start();
    let outcome = tracing::Instrument::instrument(
        tokio::time::timeout(timeout, AssertUnwindSafe(fut).catch_unwind()),
        span.clone(),
    )
    .await;
    let code = match &outcome {
        Err(_) => Some(ErrorCode::TIMEOUT.0),
        Ok(Err(_panic)) => Some(ErrorCode::INTERNAL.0),
        Ok(Ok(Err(e))) => Some(e.code()),
        Ok(Ok(Ok(_))) => None,
    };
    timer.call_done(code);
    span.in_scope(|| tracing::debug!(code, "call answered"));
    match outcome {
        Err(_) => session.send_error(reference, ErrorCode::TIMEOUT.0, "handler timed out"),
        Ok(Err(_panic)) => session.send_error(reference, ErrorCode::INTERNAL.0, "handler failed"),
        Ok(Ok(Err(e))) => session.send_call_error(reference, &e),
        Ok(Ok(Ok(payload))) => {
            if let Some(r) = reference {
                session.send_reply(r, &payload);
            }
        }
    }
}
