//! The client's error type.

use crate::protocol::{ErrorCode, Payload};
use std::fmt;

/// What kind of failure a [`ClientError`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ClientErrorKind {
    /// No reply within [`ClientConfig::call_timeout`](super::ClientConfig::call_timeout).
    /// A reply that arrives later is discarded and counted in
    /// [`ClientStats::late_replies`](super::ClientStats::late_replies).
    Timeout,
    /// The server answered with an `error` envelope: see
    /// [`ClientError::code`], [`ClientError::message`], [`ClientError::data`].
    Server,
    /// The request was written, but the connection dropped before its
    /// answer: it may or may not have run on the server.
    Disconnected,
    /// A volatile send while there was no connection (or its send queue was
    /// full): dropped, as volatile sends are.
    Offline,
    /// The offline buffer was full and this buffered request, the oldest,
    /// was dropped to make room; it was never sent.
    Dropped,
    /// The message is larger than the offline buffer or the server's
    /// `max_message_size`.
    TooLarge,
    /// The client is closed (by the application, or after a close code that
    /// forbids reconnecting), or the server closed the room
    /// ([`Room::closed_reason`](super::Room::closed_reason)).
    Closed,
    /// The room is already joined through another [`Room`](super::Room) handle.
    AlreadyJoined,
    /// A value could not be encoded, or a reply could not be decoded into
    /// the expected type.
    Codec,
    /// The client's configuration or URL is invalid.
    Config,
}

/// The error of every fallible client operation. Match on
/// [`ClientError::kind`]; server errors carry their wire `code`, `message`
/// and `data`.
#[derive(Clone)]
pub struct ClientError {
    kind: ClientErrorKind,
    code: Option<ErrorCode>,
    message: String,
    data: Option<Payload>,
}

impl ClientError {
    pub(crate) fn new(kind: ClientErrorKind, message: impl Into<String>) -> ClientError {
        ClientError { kind, code: None, message: message.into(), data: None }
    }

    pub(crate) fn server(code: u32, message: String, data: Option<Payload>) -> ClientError {
        ClientError { kind: ClientErrorKind::Server, code: Some(ErrorCode(code)), message, data }
    }

    pub(crate) fn timeout() -> ClientError {
        ClientError::new(ClientErrorKind::Timeout, "no reply within the call timeout")
    }

    pub(crate) fn closed() -> ClientError {
        ClientError::new(ClientErrorKind::Closed, "the client is closed")
    }

    /// What kind of error this is.
    pub fn kind(&self) -> ClientErrorKind {
        self.kind
    }

    /// The server's error code, for [`ClientErrorKind::Server`].
    pub fn code(&self) -> Option<ErrorCode> {
        self.code
    }

    /// Human-readable text: the server's `message` for server errors.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The server error's `data`, when it had one (for example
    /// `{"retry_after_ms": n}` on 420, or a validator's field list on 422).
    pub fn data(&self) -> Option<&Payload> {
        self.data.as_ref()
    }

    /// No reply in time.
    pub fn is_timeout(&self) -> bool {
        self.kind == ClientErrorKind::Timeout
    }

    /// The server answered with an error.
    pub fn is_server(&self) -> bool {
        self.kind == ClientErrorKind::Server
    }

    /// The client is closed.
    pub fn is_closed(&self) -> bool {
        self.kind == ClientErrorKind::Closed
    }
}

impl fmt::Debug for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("ClientError");
        d.field("kind", &self.kind);
        if let Some(code) = self.code {
            d.field("code", &code.0);
        }
        d.field("message", &self.message);
        if let Some(data) = &self.data {
            d.field("data", data);
        }
        d.finish()
    }
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.code {
            Some(code) => write!(f, "server error {code}: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

impl std::error::Error for ClientError {}
