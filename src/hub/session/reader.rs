//! The connection's reader: reads frames, applies the message rate, and
//! dispatches each envelope to its operation (`join`, `leave`, `call`,
//! `refresh`, `presence`, `pong`).

use super::*;

/// Reads frames until the peer leaves or a close is decided. Returns whether
/// the peer closed (sent a close frame or ended the stream).
pub(super) async fn read_loop<S>(
    hub: &Hub,
    session: &Arc<Session>,
    stream: &mut S,
    calls: &mut Calls,
    fragments: Option<&crate::transport::Fragments>,
) -> bool
where
    S: Stream<Item = Result<Frame, TransportError>> + Unpin,
{
    // The credentials' expiry. A `refresh` (a task in `calls`) moves the
    // deadline; the loop re-reads it every turn, and a finished refresh
    // wakes the loop through `join_next`, so the timer is re-armed before
    // the old deadline can fire.
    // The timer exists only while there is a deadline (boxed: most
    // connections have none, and the reader's task stays smaller).
    let mut armed = None;
    let mut expiry: Option<std::pin::Pin<Box<tokio::time::Sleep>>> = None;
    loop {
        let deadline = session.deadline();
        if deadline != armed {
            armed = deadline;
            match (armed, &mut expiry) {
                (Some(d), Some(timer)) => timer.as_mut().reset(d),
                (Some(d), None) => expiry = Some(Box::pin(tokio::time::sleep_until(d))),
                (None, _) => expiry = None,
            }
        }
        let expired = futures::future::poll_fn(|cx| match &mut expiry {
            Some(timer) => timer.as_mut().poll(cx),
            None => std::task::Poll::Pending,
        });
        tokio::select! {
            biased;
            _ = session.stops.wait(STOP_READ) => return false,
            Some(_) = calls.join_next(), if !calls.is_empty() => {}
            item = stream.next() => match item {
                None => {
                    session.close_with(DisconnectReason::ConnectionLost, None, true);
                    return true;
                }
                Some(Err(e)) => {
                    tracing::debug!(connection = %session.id, error = %e, "read failed");
                    match e.close_code() {
                        Some(code) => {
                            session.close(DisconnectReason::ProtocolViolation(code), code, &e.to_string(), true);
                            return false;
                        }
                        None => {
                            session.close_with(DisconnectReason::ConnectionLost, None, true);
                            return true;
                        }
                    }
                }
                Some(Ok(frame)) => {
                    session.alive.store(true, Ordering::Relaxed);
                    // Every frame costs a token: a control frame one, a
                    // message one per frame it came in.
                    let cost = || fragments.map_or(1, |f| u64::from(f.next_message()));
                    match frame {
                        Frame::Close(cf) => {
                            let (code, text) = match &cf {
                                Some(c) => (Some(c.code), c.reason.clone()),
                                None => (None, String::new()),
                            };
                            // Echo the peer's code, as RFC 6455 asks.
                            let echo = CloseFrame { code: code.unwrap_or(CloseCode::NORMAL), reason: String::new() };
                            // The peer will read nothing more after its close:
                            // what is still queued is dropped.
                            session.close_with(DisconnectReason::ClientClosed { code, reason: text }, Some(echo), true);
                            return true;
                        }
                        // Transports leave answering pings to the session, so
                        // the pong goes out through the one writer, in order.
                        // Over the rate, a ping is not answered (a control
                        // frame has no `ref` to refuse it with).
                        Frame::Ping(payload) => {
                            if charge(session, 1).is_ok() {
                                session.outbox.push_control(Frame::Pong(payload));
                            }
                        }
                        Frame::Pong(_) => {
                            let _ = charge(session, 1);
                        }
                        Frame::Text(bytes) => on_message(hub, session, calls, false, bytes, cost()),
                        Frame::Binary(bytes) => on_message(hub, session, calls, true, bytes, cost()),
                    }
                }
            },
            _ = expired => {
                session.close(
                    DisconnectReason::TokenExpired,
                    CloseCode::TOKEN_EXPIRED,
                    "token expired: refresh and reconnect",
                    false,
                );
                return false;
            }
        }
    }
}

/// Takes `cost` tokens from the connection's message bucket.
/// `Err(Some(wait))`: over the rate, the frame must be refused;
/// `Err(None)`: over it too often, the connection is being closed with 1008
/// for refusing to slow down.
pub(super) fn charge(session: &Session, cost: u64) -> Result<(), Option<std::time::Duration>> {
    let Some(rate) = &session.rate else { return Ok(()) };
    let Err(wait) = (0..cost).try_for_each(|_| rate.messages.check()) else { return Ok(()) };
    crate::metrics::rate_limited(false);
    over_rate(session, rate, wait)
}

/// A refusal: takes a token from the violations bucket, or, when that is
/// empty too, closes the connection with 1008 (`Err(None)`).
fn over_rate(session: &Session, rate: &Rate, wait: std::time::Duration) -> Result<(), Option<std::time::Duration>> {
    if rate.violations.check().is_err() {
        session.close(DisconnectReason::RateLimited, CloseCode::POLICY, "rate limit exceeded", false);
        return Err(None);
    }
    Err(Some(wait))
}

/// The `data` of a 420 refusal.
fn retry_after(wait: std::time::Duration) -> serde_json::Value {
    let retry_after_ms = u64::try_from(wait.as_micros().div_ceil(1000)).unwrap_or(u64::MAX).max(1);
    serde_json::json!({ "retry_after_ms": retry_after_ms })
}

/// Takes a token from the connection's join/leave bucket. `false`: the
/// `join` or `leave` must not be processed (answered with 420, or the
/// connection is closing with 1008).
pub(super) fn within_join_rate(session: &Session, reference: Option<u64>) -> bool {
    match join_rate(session) {
        Ok(()) => true,
        Err(Some(wait)) => {
            session.send_error_data(reference, ErrorCode::RATE_LIMITED.0, "join rate exceeded", &retry_after(wait));
            false
        }
        Err(None) => false,
    }
}

/// Takes a token from the connection's join/leave bucket: `Err(Some(wait))`
/// when it is empty (the refusal to send), `Err(None)` when the refusals
/// ran out too and the connection is closing with 1008.
pub(super) fn join_rate(session: &Session) -> Result<(), Option<std::time::Duration>> {
    let Some(rate) = &session.rate else { return Ok(()) };
    let Some(joins) = &rate.joins else { return Ok(()) };
    let Err(wait) = joins.check() else { return Ok(()) };
    crate::metrics::rate_limited(true);
    over_rate(session, rate, wait)
}

/// Charges a message `cost` tokens. `false`: the message must not be
/// processed (it was answered with 420, or the connection is closing).
pub(super) fn within_rate(session: &Session, bytes: &[u8], cost: u64) -> bool {
    let wait = match charge(session, cost) {
        Ok(()) => return true,
        Err(None) => return false,
        Err(Some(wait)) => wait,
    };
    let reference = Envelope::reference_of(session.format, bytes);
    session.send_error_data(reference, ErrorCode::RATE_LIMITED.0, "rate limit exceeded", &retry_after(wait));
    false
}

pub(super) fn on_message(
    hub: &Hub,
    session: &Arc<Session>,
    calls: &mut Calls,
    binary: bool,
    bytes: bytes::Bytes,
    cost: u64,
) {
    let cfg = &hub.inner.config;
    if bytes.len() > cfg.max_message_size {
        // Transports that enforce the limit themselves never get here.
        session.close(
            DisconnectReason::ProtocolViolation(CloseCode::TOO_BIG),
            CloseCode::TOO_BIG,
            "message too big",
            true,
        );
        return;
    }
    if !within_rate(session, &bytes, cost) {
        return;
    }
    if binary != session.format.is_binary() {
        let msg = if binary { "binary frame on a JSON connection" } else { "text frame on a MessagePack connection" };
        return session.send_error(None, ErrorCode::UNSUPPORTED_FRAME.0, msg);
    }
    let env = match Envelope::decode(session.format, &bytes) {
        Ok(env) => env,
        Err(e) => {
            return session.send_error(Envelope::reference_of(session.format, &bytes), e.code().0, &e.to_string())
        }
    };
    if let Some(data) = &env.data {
        if cfg.max_payload_depth < crate::protocol::MAX_DEPTH && data.exceeds_depth(cfg.max_payload_depth) {
            let msg = format!("`data` nested deeper than {}", cfg.max_payload_depth);
            return session.send_error(env.reference, ErrorCode::BAD_REQUEST.0, &msg);
        }
    }
    crate::metrics::message_in(env.kind);
    match env.kind {
        Kind::Ping => session.send_parts(&Parts { reference: env.reference, ..Parts::new(Kind::Pong) }),
        Kind::Pong => {}
        Kind::Join => on_join(hub, session, calls, env),
        Kind::Leave => on_leave(hub, session, env),
        Kind::Call => on_call(hub, session, calls, env),
        Kind::Presence => hub.extension_request(session, env),
        Kind::Refresh => on_refresh(hub, session, calls, env),
        other => session.send_error(
            env.reference,
            ErrorCode::BAD_REQUEST.0,
            &format!("message type `{other}` is not sent by clients"),
        ),
    }
}

pub(super) fn room_field(session: &Session, env: &Envelope) -> Option<String> {
    let Some(room) = env.room.as_deref() else {
        session.send_error(env.reference, ErrorCode::BAD_REQUEST.0, &format!("`{}` needs a `room`", env.kind));
        return None;
    };
    if let Err(why) = validate_room_name(room) {
        session.send_error(env.reference, ErrorCode::BAD_REQUEST.0, why);
        return None;
    }
    Some(room.to_owned())
}

pub(super) fn room_reply(session: &Session, reference: Option<u64>, room: &str) {
    if let Some(r) = reference {
        #[derive(serde::Serialize)]
        struct JoinReply<'a> {
            room: &'a str,
        }
        if let Ok(p) = Payload::encode(session.format, &JoinReply { room }) {
            session.send_reply(r, &p);
        }
    }
}

/// One request in flight, counted in its session until dropped. Holds the
/// session weakly: permits are kept in the session's own call queues.
pub(crate) struct Permit(std::sync::Weak<Session>);

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(session) = self.0.upgrade() {
            session.inflight.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

pub(super) fn acquire(session: &Arc<Session>, reference: Option<u64>) -> Option<Permit> {
    let max = session.max_inflight;
    match session.inflight.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1)) {
        Ok(_) => Some(Permit(Arc::downgrade(session))),
        Err(_) => {
            session.send_error(reference, ErrorCode::TOO_MANY_REQUESTS.0, "too many requests in flight");
            None
        }
    }
}
