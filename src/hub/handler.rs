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

use super::session::Session;
use super::ConnectionId;
use super::Hub;
use crate::auth::Identity;
pub use crate::protocol::{CallError, FieldError, FieldErrors};
use crate::protocol::{ErrorCode, Format, Payload};
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
    pub async fn broadcast<T: Serialize + ?Sized>(
        &self,
        event: &str,
        data: &T,
    ) -> crate::Result<crate::hub::Published> {
        let room =
            self.room.as_deref().ok_or_else(|| crate::Error::msg(crate::ErrorKind::InvalidRoom, "call has no room"))?;
        self.hub.publish(room, event, data).await
    }

    /// Publishes `event` to the call's room, except to the caller.
    pub async fn broadcast_others<T: Serialize + ?Sized>(
        &self,
        event: &str,
        data: &T,
    ) -> crate::Result<crate::hub::Published> {
        let room =
            self.room.as_deref().ok_or_else(|| crate::Error::msg(crate::ErrorKind::InvalidRoom, "call has no room"))?;
        self.hub.publish_except(room, event, data, self.session.id).await
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
