//! Authentication at the handshake and authorization of each join.
//!
//! [`Authenticate`] runs once per connection, *before* the WebSocket upgrade:
//! it sees the [`Handshake`] (headers, query, cookies, peer address) and
//! either produces the connection's [`Identity`] or a [`Rejection`], which the
//! transport answers with an HTTP status instead of upgrading.
//!
//! [`AuthorizeJoin`] runs on every `join` with the room, the join params and
//! the identity; refusing gets the client an `error` with code 403 (or the
//! code of the [`CallError`] returned).
//!
//! Both are traits with a blanket implementation for closures, so a host can
//! pass an `async` closure or write a type of its own.
//!
//! An identity may carry an **expiry** ([`Identity::with_expiry`]): the
//! connection is closed with 4003 ("token expired: refresh and reconnect")
//! when it passes, unless the client renews it first with a `refresh`
//! message, which the hub's [`Refresh`] hook checks. It may also restrict
//! which rooms the connection may join ([`Identity::with_rooms`]) and
//! override the hub's message rate limit ([`Identity::with_rate_limit`]).
//! The `jwt` feature's [`jwt::JwtAuth`] fills all of this from a token's
//! claims.

#[cfg(feature = "jwt")]
pub mod jwt;

use crate::protocol::CallError;
use crate::protocol::Payload;
use crate::transport::Handshake;
use crate::util::RateLimit;
use crate::ConnectionId;
use futures::future::BoxFuture;
use http::StatusCode;
use std::any::Any;
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// Who is on the other end of a connection, as the authenticator decided.
///
/// Cheap to clone. A connection without a user id is anonymous; hubs route
/// `send_to_user` by user id.
#[derive(Clone, Default)]
pub struct Identity {
    user: Option<Arc<str>>,
    data: Option<Arc<dyn Any + Send + Sync>>,
    expires_at: Option<SystemTime>,
    rooms: Option<Arc<[String]>>,
    rate_limit: Option<Option<RateLimit>>,
}

impl Identity {
    /// An anonymous identity.
    pub fn anonymous() -> Identity {
        Identity::default()
    }

    /// An identity for user `id`.
    pub fn user(id: impl Into<Arc<str>>) -> Identity {
        Identity { user: Some(id.into()), ..Identity::default() }
    }

    /// Attaches host data (claims, a session record, …), read back with
    /// [`Identity::data`].
    pub fn with_data<T: Any + Send + Sync>(mut self, data: T) -> Identity {
        self.data = Some(Arc::new(data));
        self
    }

    /// The user id, if authenticated as a user.
    pub fn user_id(&self) -> Option<&str> {
        self.user.as_deref()
    }

    pub(crate) fn user_arc(&self) -> Option<&Arc<str>> {
        self.user.as_ref()
    }

    /// The host data attached with [`Identity::with_data`], if it is a `T`.
    pub fn data<T: Any + Send + Sync>(&self) -> Option<&T> {
        self.data.as_deref()?.downcast_ref()
    }

    /// Makes the credentials expire at `at` (wall-clock time, as a token's
    /// `exp`): the connection is closed with 4003 then, unless a `refresh`
    /// renews it. Default: never.
    pub fn with_expiry(mut self, at: SystemTime) -> Identity {
        self.expires_at = Some(at);
        self
    }

    /// When the credentials expire, if they do.
    pub fn expires_at(&self) -> Option<SystemTime> {
        self.expires_at
    }

    /// Time left until [`Identity::expires_at`] (zero once it passed).
    pub(crate) fn expires_in(&self) -> Option<Duration> {
        self.expires_at.map(|at| at.duration_since(SystemTime::now()).unwrap_or(Duration::ZERO))
    }

    /// Restricts the rooms a client may join (its own `join`s; the host's
    /// [`Hub::join`](crate::Hub::join) is not restricted). A pattern ending
    /// in `*` matches every room starting with what precedes it (`team:42:*`);
    /// any other pattern matches that room only. Other joins get `403`.
    /// Default: every room (subject to the join authorizer).
    pub fn with_rooms<I, S>(mut self, patterns: I) -> Identity
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.rooms = Some(patterns.into_iter().map(Into::into).collect());
        self
    }

    /// The room patterns set with [`Identity::with_rooms`], if any.
    pub fn rooms(&self) -> Option<&[String]> {
        self.rooms.as_deref()
    }

    /// Whether this identity may join `room` by its own `join`.
    pub fn allows_room(&self, room: &str) -> bool {
        match &self.rooms {
            None => true,
            Some(patterns) => patterns.iter().any(|p| match p.strip_suffix('*') {
                Some(prefix) => room.starts_with(prefix),
                None => p == room,
            }),
        }
    }

    /// Overrides the hub's message rate limit
    /// ([`HubConfig::rate_limit`](crate::HubConfig::rate_limit)) for this
    /// connection: `Some` for another limit, `None` for none (trusted
    /// services). Default: the hub's.
    pub fn with_rate_limit(mut self, limit: Option<RateLimit>) -> Identity {
        self.rate_limit = Some(limit);
        self
    }

    /// The rate limit for this connection, given the hub's default.
    pub(crate) fn rate_limit_or(&self, hub_default: Option<RateLimit>) -> Option<RateLimit> {
        self.rate_limit.unwrap_or(hub_default)
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("user", &self.user)
            .field("has_data", &self.data.is_some())
            .field("expires_at", &self.expires_at)
            .field("rooms", &self.rooms)
            .finish()
    }
}

/// A refused handshake: answered with this HTTP status and message as a
/// plain-text body, before any upgrade.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    status: StatusCode,
    message: String,
    retry_after: Option<Duration>,
    /// For a browser (a request with `Origin`), which cannot read an HTTP
    /// status: the close code and reason to send right after an upgrade
    /// instead of the HTTP answer (set by the hub's gate, §7.3).
    close: Option<(crate::protocol::CloseCode, String)>,
}

impl Rejection {
    /// A rejection with any status.
    pub fn new(status: StatusCode, message: impl Into<String>) -> Rejection {
        Rejection { status, message: message.into(), retry_after: None, close: None }
    }

    /// Answer with a WebSocket close after the upgrade instead of the HTTP
    /// status (the reason is cut to the 123 bytes a close frame carries).
    #[cfg_attr(not(any(feature = "ws", feature = "sse")), allow(dead_code))] // used by `Hub::open_gate`
    pub(crate) fn close_after_upgrade(mut self, code: crate::protocol::CloseCode, reason: &str) -> Rejection {
        let mut end = reason.len().min(123);
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        self.close = Some((code, reason[..end].to_owned()));
        self
    }

    /// The close to send after the upgrade instead of the HTTP answer.
    #[cfg_attr(not(feature = "ws"), allow(dead_code))] // only WebSocket closes after an upgrade
    pub(crate) fn close(&self) -> Option<&(crate::protocol::CloseCode, String)> {
        self.close.as_ref()
    }

    /// Adds a `retry-after` header (in whole seconds, rounded up) to the
    /// response.
    pub fn with_retry_after(mut self, after: Duration) -> Rejection {
        self.retry_after = Some(after);
        self
    }

    /// The `retry-after` hint, if any.
    pub fn retry_after(&self) -> Option<Duration> {
        self.retry_after
    }

    /// 401 Unauthorized.
    pub fn unauthorized(message: impl Into<String>) -> Rejection {
        Rejection::new(StatusCode::UNAUTHORIZED, message)
    }

    /// 403 Forbidden.
    pub fn forbidden(message: impl Into<String>) -> Rejection {
        Rejection::new(StatusCode::FORBIDDEN, message)
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.message, self.status.as_u16())
    }
}

impl std::error::Error for Rejection {}

/// A refused handshake as the host-facing [`Error`](crate::Error), of kind
/// [`ErrorKind::Refused`](crate::ErrorKind::Refused); the rejection is its
/// source ([`Error::rejection`](crate::Error::rejection)).
impl From<Rejection> for crate::error::Error {
    fn from(r: Rejection) -> crate::error::Error {
        crate::error::Error::with_source(crate::error::ErrorKind::Refused, r)
    }
}

impl crate::error::Error {
    /// The HTTP answer of a refused handshake ([`Hub::admit`](crate::Hub::admit),
    /// [`Hub::authenticate`](crate::Hub::authenticate),
    /// [`Hub::connect`](crate::Hub::connect)): its status, message and
    /// `retry-after`. `None` for any other error.
    pub fn rejection(&self) -> Option<&Rejection> {
        self.source_as::<Rejection>()
    }
}

/// Decides who a new connection is. See the [module docs](self).
pub trait Authenticate: Send + Sync + 'static {
    /// Inspects the handshake; `Err` refuses the connection with an HTTP status.
    fn authenticate(&self, handshake: &Handshake) -> BoxFuture<'static, Result<Identity, Rejection>>;
}

impl<F, Fut> Authenticate for F
where
    F: Fn(&Handshake) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Identity, Rejection>> + Send + 'static,
{
    fn authenticate(&self, handshake: &Handshake) -> BoxFuture<'static, Result<Identity, Rejection>> {
        Box::pin(self(handshake))
    }
}

/// A join to authorize.
#[derive(Debug, Clone)]
pub struct JoinRequest {
    /// The room.
    pub room: String,
    /// The `data` of the join message, if any.
    pub params: Option<Payload>,
    /// The joining connection's identity.
    pub identity: Identity,
    /// The joining connection.
    pub connection: ConnectionId,
}

/// Decides whether a connection may join a room. See the [module docs](self).
pub trait AuthorizeJoin: Send + Sync + 'static {
    /// `Ok` admits the join; `Err` refuses it with that error (usually 403).
    fn authorize(&self, request: JoinRequest) -> BoxFuture<'static, Result<(), CallError>>;
}

impl<F, Fut> AuthorizeJoin for F
where
    F: Fn(JoinRequest) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), CallError>> + Send + 'static,
{
    fn authorize(&self, request: JoinRequest) -> BoxFuture<'static, Result<(), CallError>> {
        Box::pin(self(request))
    }
}

/// Checks the token of a client's `refresh` message and produces the
/// renewed identity. See the [module docs](self).
///
/// The hub keeps the connection's user id: a renewed identity for another
/// user is refused with `403`. From the renewed identity it takes the
/// expiry and the room restriction. An `Err` is sent to the client (use
/// `401` for a bad or expired token); the connection keeps its old expiry.
pub trait Refresh: Send + Sync + 'static {
    /// Verifies `token` for the connection whose identity is `current`.
    fn refresh(&self, current: &Identity, token: String) -> BoxFuture<'static, Result<Identity, CallError>>;
}

impl<F, Fut> Refresh for F
where
    F: Fn(&Identity, String) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Identity, CallError>> + Send + 'static,
{
    fn refresh(&self, current: &Identity, token: String) -> BoxFuture<'static, Result<Identity, CallError>> {
        Box::pin(self(current, token))
    }
}
