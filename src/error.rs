//! The crate's error type.
//!
//! [`Error`] is opaque: match on [`Error::kind`] or use the `is_*` helpers;
//! the underlying cause, when there is one, is reachable through
//! [`std::error::Error::source`], and its `Display` prints the whole cause
//! chain (`backplane error: lagged: 3 messages dropped`), so the text of a
//! host's own store or backplane error reaches the hub's log lines. Errors a *client* sees on the wire are a
//! separate set of codes: see [`crate::protocol::ErrorCode`] and
//! [`crate::protocol::CloseCode`].
//!
//! # One error for the host
//!
//! Every fallible method of [`Hub`](crate::Hub) returns this [`Error`]:
//! `publish`, `send`, `send_to_user`, `join`, `admit`, `authenticate`,
//! `connect`, and the [`Call`](crate::Call) helpers (`broadcast`). A host
//! decides what to do from the [`ErrorKind`] alone. Where the hub refused
//! something with an answer meant for a client, that answer travels as the
//! error's source and can be read back by type, never by text:
//!
//! - [`Error::rejection`]: the HTTP status (and `retry-after`) a refused
//!   handshake gets from [`Hub::admit`](crate::Hub::admit) and
//!   [`Hub::authenticate`](crate::Hub::authenticate) (kind
//!   [`ErrorKind::Refused`], or [`ErrorKind::ShuttingDown`] for the 503
//!   of a hub that is shutting down). A host's own transport answers the
//!   upgrade request with it.
//! - [`Error::call_error`]: the protocol error reply of a join refused by
//!   [`Hub::join`](crate::Hub::join) (the room limit, a closing
//!   connection, shutdown).
//!
//! The other direction: a handler returns a
//! [`CallError`](crate::CallError) (the reply a client sees), and `?` on an
//! [`Error`] inside a handler turns it into one (see the table on
//! `From<Error> for CallError`); an error that carries a client answer
//! becomes exactly that answer.

use std::fmt;

/// Shorthand for results whose error is [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

type Cause = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What kind of failure an [`Error`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The hub is shutting down (or shut down) and takes no new work.
    ShuttingDown,
    /// The connection is not (or no longer) connected to this hub.
    NotConnected,
    /// A value could not be encoded or decoded.
    Protocol,
    /// A room name breaks the naming rules.
    InvalidRoom,
    /// The backplane failed to carry a message between nodes.
    Backplane,
    /// An I/O error outside a connection (binding a listener, …).
    Io,
    /// The configuration is invalid, or a feature used is not configured
    /// (e.g. history of a room that is not recoverable).
    Config,
    /// The history store failed (room history and recovery).
    History,
    /// The presence store failed or did not answer within
    /// [`PresenceConfig::store_timeout`](crate::presence::PresenceConfig::store_timeout).
    Presence,
    /// The hub refused the request under its rules: a handshake refused by
    /// admission (origin, limits, rate) or by the authenticator
    /// ([`Error::rejection`] holds the HTTP answer), or a join over the
    /// per-connection room limit ([`Error::call_error`] holds the protocol
    /// reply).
    Refused,
}

/// The error type of every fallible switchboard API.
pub struct Error {
    kind: ErrorKind,
    message: Option<String>,
    source: Option<Cause>,
}

impl Error {
    pub(crate) fn new(kind: ErrorKind) -> Error {
        Error { kind, message: None, source: None }
    }

    pub(crate) fn msg(kind: ErrorKind, message: impl Into<String>) -> Error {
        Error { kind, message: Some(message.into()), source: None }
    }

    /// The same error reported as `kind` (a store on a shared connection:
    /// the failing feature is the store's, not the backplane's).
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn with_kind(mut self, kind: ErrorKind) -> Error {
        self.kind = kind;
        self
    }

    /// An error of `kind` with a message and a cause.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn msg_with_source(kind: ErrorKind, message: impl Into<String>, cause: impl Into<Cause>) -> Error {
        Error { kind, message: Some(message.into()), source: Some(cause.into()) }
    }

    /// Builds an error of `kind` around `cause`. Meant for host
    /// implementations of [`Backplane`](crate::backplane::Backplane) and the stores,
    /// which must report failures as this type (a
    /// [`Transport`](crate::transport::Transport) reports its own
    /// [`TransportError`](crate::transport::TransportError), which the
    /// session turns into a close code).
    pub fn with_source(kind: ErrorKind, cause: impl Into<Cause>) -> Error {
        Error { kind, message: None, source: Some(cause.into()) }
    }

    /// The message without the kind's prefix (the kind's text when there
    /// is no message): for an error that becomes the cause of another of
    /// the same kind, so a log line does not repeat "backplane error".
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn detail(&self) -> String {
        match &self.message {
            Some(m) => m.clone(),
            None => self.to_string(),
        }
    }

    /// What kind of error this is.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The hub is shutting down.
    pub fn is_shutting_down(&self) -> bool {
        self.kind == ErrorKind::ShuttingDown
    }

    /// The connection is gone.
    pub fn is_not_connected(&self) -> bool {
        self.kind == ErrorKind::NotConnected
    }

    /// The backplane failed.
    pub fn is_backplane(&self) -> bool {
        self.kind == ErrorKind::Backplane
    }

    /// Encoding or decoding failed.
    pub fn is_protocol(&self) -> bool {
        self.kind == ErrorKind::Protocol
    }

    /// The hub refused the request (see [`ErrorKind::Refused`]).
    pub fn is_refused(&self) -> bool {
        self.kind == ErrorKind::Refused
    }

    /// The source, if it is a `T` (the client answers an error carries:
    /// found by type, never by text).
    pub(crate) fn source_as<T: std::error::Error + 'static>(&self) -> Option<&T> {
        self.source.as_deref().and_then(|s| (s as &(dyn std::error::Error + 'static)).downcast_ref::<T>())
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Error");
        d.field("kind", &self.kind);
        if let Some(m) = &self.message {
            d.field("message", m);
        }
        if let Some(s) = &self.source {
            d.field("source", s);
        }
        d.finish()
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.kind {
            ErrorKind::ShuttingDown => "hub is shutting down",
            ErrorKind::NotConnected => "connection is not connected",
            ErrorKind::Protocol => "protocol error",
            ErrorKind::InvalidRoom => "invalid room name",
            ErrorKind::Backplane => "backplane error",
            ErrorKind::Io => "i/o error",
            ErrorKind::Config => "invalid configuration",
            ErrorKind::History => "history store failed",
            ErrorKind::Presence => "presence store failed",
            ErrorKind::Refused => "refused",
        };
        // The cause chain too: a host's store or backplane error is the
        // cause of ours, and a log line of ours must say what it was.
        let mut line = String::from(what);
        if let Some(m) = &self.message {
            line.push_str(": ");
            line.push_str(m);
        }
        push_causes(&mut line, std::error::Error::source(self));
        f.write_str(&line)
    }
}

/// Appends `cause` and its own causes to `line`, each after `: `, leaving
/// out a cause whose text the line already holds (an error that quotes its
/// cause in its message, as the Redis errors do, or one of ours, whose text
/// holds its chain, would otherwise print it twice).
pub(crate) fn push_causes(line: &mut String, mut cause: Option<&(dyn std::error::Error + 'static)>) {
    while let Some(c) = cause {
        let text = c.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        cause = c.source();
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_deref().map(|s| s as &(dyn std::error::Error + 'static))
    }
}

impl From<crate::protocol::ProtocolError> for Error {
    fn from(e: crate::protocol::ProtocolError) -> Error {
        Error::with_source(ErrorKind::Protocol, e)
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Error {
        Error::with_source(ErrorKind::Io, e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Outer(std::io::Error);

    impl fmt::Display for Outer {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("query failed")
        }
    }

    impl std::error::Error for Outer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn display_prints_the_cause_chain_once() {
        let io = || std::io::Error::new(std::io::ErrorKind::ConnectionReset, "connection reset by peer");
        // A host's error with a cause of its own: every link is printed.
        let e = Error::with_source(ErrorKind::History, Outer(io()));
        assert_eq!(e.to_string(), "history store failed: query failed: connection reset by peer");
        // A message that quotes its cause does not print it twice.
        let e = Error::msg_with_source(ErrorKind::Backplane, "redis publish: connection reset by peer", io());
        assert_eq!(e.to_string(), "backplane error: redis publish: connection reset by peer");
        // One of ours as the cause of another: its chain once.
        let inner = Error::with_source(ErrorKind::Backplane, "lagged: 3 messages dropped");
        let e = Error::msg_with_source(ErrorKind::Presence, "sync failed", inner);
        assert_eq!(e.to_string(), "presence store failed: sync failed: backplane error: lagged: 3 messages dropped");
        assert_eq!(Error::new(ErrorKind::Io).to_string(), "i/o error");
    }
}
