//! Numeric codes a client sees: `error` envelope codes and WebSocket close
//! codes. Both tables are part of the versioned protocol (`docs/protocol.md`).

use std::fmt;

/// The `code` of an `error` envelope.
///
/// Codes below 1000 are the protocol's own and mirror HTTP where a status
/// means the same thing; codes from 1000 up are free for host applications
/// (a handler returning [`CallError::new`](crate::CallError::new) with its own
/// code).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ErrorCode(pub u32);

impl ErrorCode {
    /// 400: the frame is not a valid envelope (bad JSON/MessagePack, wrong
    /// shape, unknown `type`, missing field, invalid room name).
    pub const BAD_REQUEST: ErrorCode = ErrorCode(400);
    /// 401: the connection has no identity and the action needs one. Not
    /// sent by the crate itself; for host handlers and authorizers.
    pub const UNAUTHORIZED: ErrorCode = ErrorCode(401);
    /// 403: the host refused the join or the call.
    pub const FORBIDDEN: ErrorCode = ErrorCode(403);
    /// 404: no handler is registered for the event.
    pub const UNKNOWN_EVENT: ErrorCode = ErrorCode(404);
    /// 405: the call names a room this connection has not joined, or a
    /// `leave` names a room it is not in.
    pub const NOT_JOINED: ErrorCode = ErrorCode(405);
    /// 408: the handler did not finish within the handler timeout.
    pub const TIMEOUT: ErrorCode = ErrorCode(408);
    /// 413: joining would exceed the per-connection room limit.
    pub const TOO_MANY_ROOMS: ErrorCode = ErrorCode(413);
    /// 415: a binary frame on a JSON connection, or text on a MessagePack one.
    pub const UNSUPPORTED_FRAME: ErrorCode = ErrorCode(415);
    /// 420: the message was over the connection's rate limit and was **not
    /// processed**; the error's `data` is `{"retry_after_ms": n}`. (420 is
    /// unassigned in the HTTP registry; it is not 429, which means "too many
    /// requests in flight", because the remedy differs: wait `n` ms, not for
    /// a reply.)
    pub const RATE_LIMITED: ErrorCode = ErrorCode(420);
    /// 422: the payload does not have the shape the handler expects.
    pub const INVALID_PAYLOAD: ErrorCode = ErrorCode(422);
    /// 429: too many requests in flight on this connection; the request was
    /// not processed, retry after a reply arrives.
    pub const TOO_MANY_REQUESTS: ErrorCode = ErrorCode(429);
    /// 500: the handler failed unexpectedly (panicked, or its reply could not
    /// be encoded).
    pub const INTERNAL: ErrorCode = ErrorCode(500);
    /// 503: temporarily unavailable, retry (with backoff): the server is
    /// shutting down, or the backplane, history store or presence store it
    /// needs cannot be reached. The message is short
    /// (`temporarily unavailable, retry`, or `server is shutting down`); the
    /// cause goes to the server's log, not to the client.
    pub const UNAVAILABLE: ErrorCode = ErrorCode(503);

    /// Short snake_case name of a protocol code, `None` for host codes.
    pub fn name(self) -> Option<&'static str> {
        Some(match self.0 {
            400 => "bad_request",
            401 => "unauthorized",
            403 => "forbidden",
            404 => "unknown_event",
            405 => "not_joined",
            408 => "timeout",
            413 => "too_many_rooms",
            415 => "unsupported_frame",
            420 => "rate_limited",
            422 => "invalid_payload",
            429 => "too_many_requests",
            500 => "internal",
            503 => "unavailable",
            _ => return None,
        })
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(n) => write!(f, "{} {}", self.0, n),
            None => write!(f, "{}", self.0),
        }
    }
}

/// A WebSocket close code, with the protocol's split into codes after which a
/// client should reconnect (with backoff) and codes after which it must not.
///
/// | range | meaning |
/// |---|---|
/// | 1001, 1006, 1009, 1011, 1012, 1013, 1014 | reconnect |
/// | 1000, 1002, 1003, 1007, 1008 | do not reconnect |
/// | 4000–4499 | switchboard: reconnect |
/// | 4500–4999 | switchboard: do not reconnect |
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CloseCode(pub u16);

impl CloseCode {
    /// 1000: normal closure (the client closed, or the host ended the session
    /// for good).
    pub const NORMAL: CloseCode = CloseCode(1000);
    /// 1001: the server is shutting down or restarting: reconnect with jitter.
    pub const GOING_AWAY: CloseCode = CloseCode(1001);
    /// 1002: the peer broke RFC 6455.
    pub const PROTOCOL_ERROR: CloseCode = CloseCode(1002);
    /// 1007: a text frame was not valid UTF-8.
    pub const INVALID_DATA: CloseCode = CloseCode(1007);
    /// 1008: policy violation: the client kept sending over its rate limit
    /// (or the host chose this code). Do not reconnect on your own.
    pub const POLICY: CloseCode = CloseCode(1008);
    /// 1009: a message exceeded the maximum message size.
    pub const TOO_BIG: CloseCode = CloseCode(1009);
    /// 1011: unexpected server error.
    pub const INTERNAL: CloseCode = CloseCode(1011);
    /// 1013: try again later. The server shed this connection right after
    /// the upgrade (it is at its connection limit or rate, and the client is
    /// a browser, which cannot read an HTTP status); the close reason carries
    /// the wait, `retry_after_ms=<n>` ([`CloseCode::retry_hint`]). Reconnect,
    /// not before that wait.
    pub const TRY_AGAIN_LATER: CloseCode = CloseCode(1013);
    /// 4000: the client read too slowly and its outbound queue overflowed.
    pub const SLOW_CONSUMER: CloseCode = CloseCode(4000);
    /// 4001: no pong (or other traffic) within the heartbeat timeout.
    pub const HEARTBEAT_TIMEOUT: CloseCode = CloseCode(4001);
    /// 4002: the host asked the client to reconnect (e.g. rebalancing).
    pub const RECONNECT: CloseCode = CloseCode(4002);
    /// 4003: the connection's credentials expired (for example a JWT's `exp`)
    /// and no `refresh` renewed them: get a fresh token and reconnect.
    pub const TOKEN_EXPIRED: CloseCode = CloseCode(4003);
    /// 4500: the host ended the session and the client must not come back on
    /// its own (kicked, banned, logged out).
    pub const KICKED: CloseCode = CloseCode(4500);
    /// 4501: authentication is no longer valid.
    pub const UNAUTHORIZED: CloseCode = CloseCode(4501);

    /// Whether a client should reconnect (with backoff) after this code.
    pub fn should_reconnect(self) -> bool {
        matches!(self.0, 1001 | 1006 | 1009 | 1011..=1014 | 4000..=4499)
    }

    /// The close reason of a 1013 the server sends when it sheds a
    /// connection after the upgrade: `try again later; retry_after_ms=<n>`
    /// (protocol §7.1).
    pub fn retry_reason(after: std::time::Duration) -> String {
        let ms = u64::try_from(after.as_millis()).unwrap_or(u64::MAX).max(1);
        format!("try again later; retry_after_ms={ms}")
    }

    /// The wait a close reason asks for: the number after
    /// `retry_after_ms=` (protocol §7.1), for 1013 and any other reconnect
    /// code; `None` when there is none or it is not a number. Capped at one
    /// hour so a hostile reason cannot park a client for ever.
    pub fn retry_hint(self, reason: &str) -> Option<std::time::Duration> {
        if !self.should_reconnect() {
            return None;
        }
        let rest = &reason[reason.find("retry_after_ms=")? + "retry_after_ms=".len()..];
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        let ms: u64 = rest[..digits].parse().ok()?;
        Some(std::time::Duration::from_millis(ms.min(3_600_000)))
    }
}

impl fmt::Display for CloseCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}
