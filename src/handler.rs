//! Event handlers: what runs when a client sends a `call`.
//!
//! Handlers are registered per event name on the [`HubBuilder`](crate::HubBuilder)
//! with typed payloads and replies:
//!
//! ```
//! use switchboard::{Call, CallError, Hub};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Deserialize)]
//! struct Add { a: i64, b: i64 }
//! #[derive(Serialize)]
//! struct Sum { sum: i64 }
//!
//! let hub = Hub::builder()
//!     .on("add", |_call: Call, req: Add| async move {
//!         req.a.checked_add(req.b).map(|sum| Sum { sum }).ok_or_else(|| CallError::new(1001, "overflow"))
//!     })
//!     .build();
//! # drop(hub);
//! ```
//!
//! A handler runs in its own task, off the connection's read loop, bounded by
//! the per-connection concurrency limit and the handler timeout (see
//! [`HubConfig`](crate::HubConfig)); a slow handler delays its own reply and
//! nothing else. A payload that does not deserialize into the handler's type
//! gets a 422 error and the handler is not called; a panic becomes a 500.
//!
//! A payload can also be **validated** before the handler runs
//! ([`HubBuilder::on_validated`](crate::HubBuilder::on_validated)): the
//! validator returns [`FieldErrors`], which reach the client as a 422 error
//! whose `data` lists every field's problems:
//!
//! ```
//! use serde::Deserialize;
//! use switchboard::handler::FieldErrors;
//! use switchboard::{Call, Hub};
//!
//! #[derive(Deserialize)]
//! struct Say { text: String }
//!
//! let hub = Hub::builder()
//!     .on_validated(
//!         "say",
//!         |say: &Say| {
//!             let mut errors = FieldErrors::new();
//!             if say.text.trim().is_empty() {
//!                 errors.add("text", "required", "must not be empty");
//!             }
//!             if say.text.len() > 500 {
//!                 errors.add("text", "length", "at most 500 bytes");
//!             }
//!             errors.into_result()
//!         },
//!         |_call: Call, say: Say| async move { Ok(say.text.len()) },
//!     )
//!     .build();
//! # drop(hub);
//! ```
//!
//! With the `validator` or `garde` crates, convert their error report into
//! [`FieldErrors`] in the validator closure.

use crate::hub::session::Session;
use crate::hub::Hub;
use crate::protocol::{ErrorCode, Format, Payload};
use crate::{ConnectionId, Identity};
use futures::future::BoxFuture;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::sync::Arc;

/// The context of one `call`: who sent it, in which room, and the hub.
#[derive(Clone)]
pub struct Call {
    pub(crate) hub: Hub,
    pub(crate) session: Arc<Session>,
    pub(crate) room: Option<Arc<str>>,
    pub(crate) event: Arc<str>,
}

impl fmt::Debug for Call {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Call")
            .field("connection", &self.session.id)
            .field("room", &self.room)
            .field("event", &self.event)
            .finish()
    }
}

impl Call {
    /// The hub.
    pub fn hub(&self) -> &Hub {
        &self.hub
    }

    /// The calling connection.
    pub fn connection_id(&self) -> ConnectionId {
        self.session.id
    }

    /// The caller's identity.
    pub fn identity(&self) -> &Identity {
        &self.session.identity
    }

    /// The caller's user id, if any.
    pub fn user_id(&self) -> Option<&str> {
        self.session.identity.user_id()
    }

    /// The room the call names (already checked: the caller is a member).
    pub fn room(&self) -> Option<&str> {
        self.room.as_deref()
    }

    /// The event name.
    pub fn event(&self) -> &str {
        &self.event
    }

    /// The caller's envelope format.
    pub fn format(&self) -> Format {
        self.session.format
    }

    /// Publishes `event` to the call's room, the caller included. An error
    /// when the call names no room, or when the backplane fails.
    pub async fn broadcast<T: Serialize + ?Sized>(&self, event: &str, data: &T) -> crate::Result<crate::Published> {
        let room =
            self.room.as_deref().ok_or_else(|| crate::Error::msg(crate::ErrorKind::InvalidRoom, "call has no room"))?;
        self.hub.publish(room, event, data).await
    }

    /// Publishes `event` to the call's room, except to the caller.
    pub async fn broadcast_others<T: Serialize + ?Sized>(
        &self,
        event: &str,
        data: &T,
    ) -> crate::Result<crate::Published> {
        let room =
            self.room.as_deref().ok_or_else(|| crate::Error::msg(crate::ErrorKind::InvalidRoom, "call has no room"))?;
        self.hub.publish_except(room, event, data, self.session.id).await
    }
}

/// A failed call, sent to the client as an `error` envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallError {
    code: u32,
    message: String,
    data: Option<serde_json::Value>,
}

impl CallError {
    /// An error with a host code (use 1000 and above for application codes;
    /// below 1000 are the protocol's, see [`ErrorCode`]).
    pub fn new(code: u32, message: impl Into<String>) -> CallError {
        CallError { code, message: message.into(), data: None }
    }

    /// Attaches structured details, sent as the error envelope's `data`.
    pub fn with_data(mut self, data: serde_json::Value) -> CallError {
        self.data = Some(data);
        self
    }

    /// The structured details, if any.
    pub fn data(&self) -> Option<&serde_json::Value> {
        self.data.as_ref()
    }

    /// An error with one of the protocol's codes.
    pub fn with_code(code: ErrorCode, message: impl Into<String>) -> CallError {
        CallError::new(code.0, message)
    }

    /// 403 forbidden.
    pub fn forbidden(message: impl Into<String>) -> CallError {
        CallError::with_code(ErrorCode::FORBIDDEN, message)
    }

    /// 400 bad request.
    pub fn bad_request(message: impl Into<String>) -> CallError {
        CallError::with_code(ErrorCode::BAD_REQUEST, message)
    }

    /// 500 internal error.
    pub fn internal(message: impl Into<String>) -> CallError {
        CallError::with_code(ErrorCode::INTERNAL, message)
    }

    /// The numeric code.
    pub fn code(&self) -> u32 {
        self.code
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for CallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.message, self.code)
    }
}

impl std::error::Error for CallError {}

/// What a client is told when a handler fails with a hub [`Error`](crate::Error),
/// so a handler can use `?` on `broadcast`, `publish` and the history and
/// presence calls:
///
/// | [`ErrorKind`](crate::ErrorKind) | code | message |
/// |---|---|---|
/// | `Backplane`, `History`, `ShuttingDown` | 503 [`ErrorCode::UNAVAILABLE`] | `temporarily unavailable, retry` |
/// | `InvalidRoom` | 400 [`ErrorCode::BAD_REQUEST`] | `invalid room name` |
/// | any other | 500 [`ErrorCode::INTERNAL`] | `internal error` |
///
/// The client never sees the error's internals (which engine failed, and
/// why): they go to the server log instead, as one `tracing` event at
/// `warn` (503) or `error` (500) level with the whole cause chain.
impl From<crate::Error> for CallError {
    fn from(e: crate::Error) -> CallError {
        use crate::ErrorKind;
        let chain = error_chain(&e);
        match e.kind() {
            ErrorKind::Backplane | ErrorKind::History | ErrorKind::ShuttingDown => {
                tracing::warn!(error = %chain, "call failed: temporarily unavailable");
                CallError::with_code(ErrorCode::UNAVAILABLE, UNAVAILABLE_MESSAGE)
            }
            ErrorKind::InvalidRoom => CallError::bad_request("invalid room name"),
            _ => {
                tracing::error!(error = %chain, "call failed");
                CallError::internal("internal error")
            }
        }
    }
}

/// The message of a 503 for an outage (see `From<Error> for CallError`).
pub(crate) const UNAVAILABLE_MESSAGE: &str = "temporarily unavailable, retry";

/// `e` and its causes, joined by `: `, for a log line. A cause whose text the
/// line already ends with is left out (an error that quotes its cause in its
/// own message, as the Redis errors do, would otherwise print it twice).
pub(crate) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut line = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !line.ends_with(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        cause = c.source();
    }
    line
}

/// One problem with one field of a payload, from a validator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FieldError {
    /// The field's name or path (`"text"`, `"items[2].name"`).
    pub field: String,
    /// A short machine-readable code (`"required"`, `"length"`, `"range"`).
    pub code: String,
    /// Human-readable text.
    pub message: String,
}

/// What a payload validator found wrong, field by field. Empty means valid.
///
/// Sent to the client as `error 422` with `message` "validation failed" and
/// `data` `{"fields": [{"field": …, "code": …, "message": …}, …]}`, in the
/// order the errors were added.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldErrors(Vec<FieldError>);

impl FieldErrors {
    /// No errors.
    pub fn new() -> FieldErrors {
        FieldErrors::default()
    }

    /// Adds a problem with `field`.
    pub fn add(&mut self, field: impl Into<String>, code: impl Into<String>, message: impl Into<String>) -> &mut Self {
        self.0.push(FieldError { field: field.into(), code: code.into(), message: message.into() });
        self
    }

    /// Whether nothing was found wrong.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The problems, in the order added.
    pub fn errors(&self) -> &[FieldError] {
        &self.0
    }

    /// `Ok(())` when empty, else `Err(self)`: the usual end of a validator.
    pub fn into_result(self) -> Result<(), FieldErrors> {
        if self.is_empty() {
            Ok(())
        } else {
            Err(self)
        }
    }
}

impl FromIterator<FieldError> for FieldErrors {
    fn from_iter<I: IntoIterator<Item = FieldError>>(iter: I) -> Self {
        FieldErrors(iter.into_iter().collect())
    }
}

impl From<FieldErrors> for CallError {
    fn from(errors: FieldErrors) -> CallError {
        CallError::with_code(ErrorCode::INVALID_PAYLOAD, "validation failed")
            .with_data(serde_json::json!({ "fields": errors.0 }))
    }
}

/// An untyped handler: the payload as received, the reply as encoded.
/// Implemented for the typed closures [`HubBuilder::on`](crate::HubBuilder::on)
/// accepts; implement it directly to handle raw payloads.
pub trait Handler: Send + Sync + 'static {
    /// Handles one call. `payload` is `None` when the envelope had no `data`.
    /// The reply must be encoded in `call.format()`.
    fn call(&self, call: Call, payload: Option<Payload>) -> BoxFuture<'static, Result<Payload, CallError>>;
}

/// A validator that accepts everything (what [`HubBuilder::on`](crate::HubBuilder::on) uses).
pub(crate) fn no_validation<Req>(_: &Req) -> Result<(), FieldErrors> {
    Ok(())
}

/// Adapts `Fn(Call, Req) -> Future<Output = Result<Resp, CallError>>` to
/// [`Handler`], with a validator run between deserializing and calling.
pub(crate) struct TypedHandler<F, V, Req, Resp> {
    f: F,
    validate: V,
    _types: PhantomData<fn(Req) -> Resp>,
}

impl<F, V, Req, Resp> TypedHandler<F, V, Req, Resp> {
    pub(crate) fn new(f: F, validate: V) -> Self {
        TypedHandler { f, validate, _types: PhantomData }
    }
}

impl<F, V, Fut, Req, Resp> Handler for TypedHandler<F, V, Req, Resp>
where
    F: Fn(Call, Req) -> Fut + Send + Sync + 'static,
    V: Fn(&Req) -> Result<(), FieldErrors> + Send + Sync + 'static,
    Fut: Future<Output = Result<Resp, CallError>> + Send + 'static,
    Req: DeserializeOwned + Send + 'static,
    Resp: Serialize + Send + 'static,
{
    fn call(&self, call: Call, payload: Option<Payload>) -> BoxFuture<'static, Result<Payload, CallError>> {
        let format = call.format();
        let payload = payload.unwrap_or_else(|| Payload::null(format));
        let req: Req = match payload.decode() {
            Ok(r) => r,
            Err(e) => {
                return Box::pin(async move { Err(CallError::with_code(ErrorCode::INVALID_PAYLOAD, e.to_string())) })
            }
        };
        if let Err(errors) = (self.validate)(&req) {
            return Box::pin(async move { Err(errors.into()) });
        }
        let fut = (self.f)(call, req);
        Box::pin(async move {
            let resp = fut.await?;
            Payload::encode(format, &resp).map_err(|e| CallError::internal(e.to_string()))
        })
    }
}
