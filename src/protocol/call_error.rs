//! The error reply of a failed call: what a handler, a join authorizer or a
//! refresh hook returns, and what the client receives as an `error`
//! envelope. It lives with the protocol because it is wire data: a code
//! from [`ErrorCode`] (or a host code of 1000 and above), a message and
//! optional structured `data`.

use super::ErrorCode;
use serde::Serialize;
use std::fmt;

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
/// | `Backplane`, `History`, `Presence`, `ShuttingDown` | 503 [`ErrorCode::UNAVAILABLE`] | `temporarily unavailable, retry` |
/// | `InvalidRoom` | 400 [`ErrorCode::BAD_REQUEST`] | `invalid room name` |
/// | any other | 500 [`ErrorCode::INTERNAL`] | `internal error` |
///
/// An error that carries a client answer ([`Error::call_error`](crate::Error::call_error),
/// e.g. the room limit from [`Hub::join`](crate::Hub::join)) becomes that
/// answer, whatever its kind.
///
/// The client never sees the error's internals (which engine failed, and
/// why): they go to the server log instead, as one `tracing` event at
/// `warn` (503) or `error` (500) level with the whole cause chain.
impl From<crate::Error> for CallError {
    fn from(e: crate::Error) -> CallError {
        use crate::ErrorKind;
        // `Error`'s `Display` holds its cause chain.
        if let Some(reply) = e.call_error() {
            return reply.clone();
        }
        let chain = e.to_string();
        match e.kind() {
            ErrorKind::Backplane | ErrorKind::History | ErrorKind::Presence | ErrorKind::ShuttingDown => {
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

impl crate::Error {
    /// The protocol error reply a client gets for this error, when the hub
    /// refused something with a specific one ([`Hub::join`](crate::Hub::join):
    /// `room limit reached`, `connection is closing`, `server is shutting
    /// down`). `None` for any other error (which `From<Error> for CallError`
    /// maps by kind).
    pub fn call_error(&self) -> Option<&CallError> {
        self.source_as::<CallError>()
    }
}

/// The message of a 503 for an outage (see `From<Error> for CallError`).
const UNAVAILABLE_MESSAGE: &str = "temporarily unavailable, retry";

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
