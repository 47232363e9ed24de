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

use crate::handler::CallError;
use crate::protocol::Payload;
use crate::transport::Handshake;
use crate::ConnectionId;
use futures::future::BoxFuture;
use http::StatusCode;
use std::any::Any;
use std::fmt;
use std::future::Future;
use std::sync::Arc;

/// Who is on the other end of a connection, as the authenticator decided.
///
/// Cheap to clone. A connection without a user id is anonymous; hubs route
/// `send_to_user` by user id.
#[derive(Clone, Default)]
pub struct Identity {
    user: Option<Arc<str>>,
    data: Option<Arc<dyn Any + Send + Sync>>,
}

impl Identity {
    /// An anonymous identity.
    pub fn anonymous() -> Identity {
        Identity::default()
    }

    /// An identity for user `id`.
    pub fn user(id: impl Into<Arc<str>>) -> Identity {
        Identity { user: Some(id.into()), data: None }
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
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity").field("user", &self.user).field("has_data", &self.data.is_some()).finish()
    }
}

/// A refused handshake: answered with this HTTP status and message as a
/// plain-text body, before any upgrade.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    status: StatusCode,
    message: String,
}

impl Rejection {
    /// A rejection with any status.
    pub fn new(status: StatusCode, message: impl Into<String>) -> Rejection {
        Rejection { status, message: message.into() }
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
