//! The connection status the application observes.

use crate::protocol::CloseCode;
use std::fmt;
use std::time::Duration;

/// The client's connection status, published through a
/// [`tokio::sync::watch`] ([`Client::status`](super::Client::status)).
///
/// ```text
/// Connecting ──► Connected ──► Reconnecting{attempt, retry_in} ──► Connected …
///      │              │                       │
///      └──────────────┴───────────────────────┴──► Closed{reason}   (terminal)
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Status {
    /// The first connection attempt is under way.
    Connecting,
    /// Connected: `hello` arrived, the rooms were rejoined and the offline
    /// buffer flushed.
    Connected {
        /// The server's connection id (from `hello`).
        connection_id: u64,
        /// The server node (from `hello`).
        node: String,
    },
    /// The connection was lost (or an attempt failed); the next attempt
    /// starts after `retry_in`.
    Reconnecting {
        /// Failures since the last connection, starting at 0, plus the
        /// short-lived connections in a row before it (the reset rule of
        /// [`Backoff`](crate::client::Backoff)).
        attempt: u32,
        /// The wait before the next attempt (full jitter, §7.2).
        retry_in: Duration,
        /// Why the previous connection or attempt ended.
        reason: Disconnect,
    },
    /// The client stopped for good and will not reconnect.
    Closed {
        /// Why.
        reason: Disconnect,
    },
}

impl Status {
    /// Whether this is [`Status::Connected`].
    pub fn is_connected(&self) -> bool {
        matches!(self, Status::Connected { .. })
    }

    /// Whether this is [`Status::Closed`].
    pub fn is_closed(&self) -> bool {
        matches!(self, Status::Closed { .. })
    }
}

/// Why a connection (or a connection attempt) ended.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Disconnect {
    /// The server closed the connection with a close frame.
    Closed {
        /// The close code; [`CloseCode::should_reconnect`] decides what happens next.
        code: CloseCode,
        /// The close reason (informal text).
        reason: String,
    },
    /// The connection ended without a close frame (1006): network failure,
    /// server killed.
    Dropped(String),
    /// Nothing at all arrived for longer than the heartbeat rule allows
    /// (`max(I, T) + T` after the last frame, §8): a dead or half-open
    /// connection.
    HeartbeatTimeout,
    /// The server refused the upgrade with this HTTP status.
    Refused {
        /// The HTTP status.
        status: u16,
        /// The response body (short text).
        body: String,
    },
    /// The TCP connection or the upgrade failed (refused, unreachable,
    /// timed out).
    Connect(String),
    /// TLS failed in a way no retry cures, so the client stops: the
    /// server's certificate did not verify (unknown issuer, expired, not
    /// for this host), the server refused the client's certificate, no root
    /// certificates are configured, or a `wss://` URL without the `tls`
    /// feature. The text says which. (A TLS handshake cut short by the
    /// network is a [`Disconnect::Connect`] and is retried.)
    Tls(String),
    /// The server broke the protocol in a way the connection cannot survive
    /// (no `hello` first, an oversized or invalid frame).
    Protocol(String),
    /// The token provider failed.
    Token(String),
    /// The application closed the client.
    ClientClosed,
}

impl Disconnect {
    /// Whether the client reconnects after this: the close-code rule of
    /// §7.1, the HTTP rule of §7.3 (401 and 403 stop unless a token
    /// provider can get new credentials, other 4xx stop), everything else
    /// retries.
    pub fn should_reconnect(&self) -> bool {
        match self {
            Disconnect::Closed { code, .. } => code.should_reconnect(),
            Disconnect::Refused { status, .. } => *status == 429 || *status == 408 || *status >= 500,
            Disconnect::ClientClosed | Disconnect::Tls(_) => false,
            _ => true,
        }
    }
}

impl fmt::Display for Disconnect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Disconnect::Closed { code, reason } => write!(f, "closed by the server with {code} {reason:?}"),
            Disconnect::Dropped(e) => write!(f, "connection dropped: {e}"),
            Disconnect::HeartbeatTimeout => f.write_str("no heartbeat from the server"),
            Disconnect::Refused { status, body } => write!(f, "upgrade refused with {status}: {body}"),
            Disconnect::Connect(e) => write!(f, "connect failed: {e}"),
            Disconnect::Tls(e) => write!(f, "TLS failed: {e}"),
            Disconnect::Protocol(e) => write!(f, "protocol violation by the server: {e}"),
            Disconnect::Token(e) => write!(f, "token provider failed: {e}"),
            Disconnect::ClientClosed => f.write_str("closed by the application"),
        }
    }
}
