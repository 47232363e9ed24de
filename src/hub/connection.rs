//! Connections as the host sees them: ids, states, the reasons a
//! connection ended, the [`Connection`] handle, and [`HubStats`].

use super::*;

/// Identifies a connection within its hub. Never reused by a hub.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnectionId(pub(super) u64);

impl ConnectionId {
    /// The number behind the id (also what `hello` tells the client).
    pub fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for ConnectionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Where a connection is in its lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ConnectionState {
    /// Accepted; `hello` not yet sent.
    Connecting = 0,
    /// Exchanging messages.
    Open = 1,
    /// A close was decided; draining the queue and closing.
    Closing = 2,
    /// Gone.
    Closed = 3,
}

impl ConnectionState {
    pub(super) fn from_u8(v: u8) -> ConnectionState {
        match v {
            0 => ConnectionState::Connecting,
            1 => ConnectionState::Open,
            2 => ConnectionState::Closing,
            _ => ConnectionState::Closed,
        }
    }
}

/// Why a connection ended, as given to the `on_disconnect` hook.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DisconnectReason {
    /// The client sent a close frame.
    ClientClosed {
        /// Its close code, if it gave one.
        code: Option<CloseCode>,
        /// Its reason text.
        reason: String,
    },
    /// The connection dropped without a close frame (or a write failed).
    ConnectionLost,
    /// No sign of life within the heartbeat timeout (close 4001).
    HeartbeatTimeout,
    /// The outbound queue overflowed under the disconnect policy (close 4000).
    SlowConsumer,
    /// The hub shut down (close 1001).
    ServerShutdown,
    /// The host closed it with [`Hub::disconnect`] or
    /// [`Hub::disconnect_user`].
    Host(CloseCode),
    /// [`Hub::drain`] closed it with this code ([`DrainConfig::code`], 4002
    /// by default).
    Drained(CloseCode),
    /// The client kept sending over its message rate limit (close 1008).
    RateLimited,
    /// The connection's credentials expired without a `refresh` (close 4003).
    TokenExpired,
    /// The client broke the transport's rules: too big (1009), invalid
    /// UTF-8 (1007), protocol error (1002).
    ProtocolViolation(CloseCode),
}

impl DisconnectReason {
    /// The `reason` label of `switchboard_disconnects_total` and the close
    /// code the server sent (its `code` label). A client's own code is not
    /// a label: a client chooses it, so it is not a small set.
    #[cfg_attr(not(feature = "metrics"), allow(dead_code))]
    pub(crate) fn metric_labels(&self) -> (&'static str, Option<CloseCode>) {
        match self {
            DisconnectReason::ClientClosed { .. } => ("client_closed", None),
            DisconnectReason::ConnectionLost => ("connection_lost", None),
            DisconnectReason::HeartbeatTimeout => ("heartbeat_timeout", Some(CloseCode::HEARTBEAT_TIMEOUT)),
            DisconnectReason::SlowConsumer => ("slow_consumer", Some(CloseCode::SLOW_CONSUMER)),
            DisconnectReason::ServerShutdown => ("server_shutdown", Some(CloseCode::GOING_AWAY)),
            DisconnectReason::Host(c) => ("host", Some(*c)),
            DisconnectReason::Drained(c) => ("drained", Some(*c)),
            DisconnectReason::RateLimited => ("rate_limited", Some(CloseCode::POLICY)),
            DisconnectReason::TokenExpired => ("token_expired", Some(CloseCode::TOKEN_EXPIRED)),
            DisconnectReason::ProtocolViolation(c) => ("protocol_violation", Some(*c)),
        }
    }
}

/// A host's view of one live connection (from hooks and [`Hub::connection`]).
///
/// Holds a handle on its hub ([`Connection::hub`]), so hooks can publish or
/// look things up without capturing the hub they are registered on.
#[derive(Clone)]
pub struct Connection(pub(super) Arc<Session>, pub(super) Hub);

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection").field("id", &self.0.id).field("identity", &self.0.identity).finish()
    }
}

impl Connection {
    /// Its id.
    pub fn id(&self) -> ConnectionId {
        self.0.id
    }

    /// The hub it belongs to.
    pub fn hub(&self) -> &Hub {
        &self.1
    }

    /// Its identity.
    pub fn identity(&self) -> &Identity {
        &self.0.identity
    }

    /// The user id of its identity.
    pub fn user_id(&self) -> Option<&str> {
        self.0.identity.user_id()
    }

    /// Its envelope format.
    pub fn format(&self) -> Format {
        self.0.format
    }

    /// The protocol version it speaks (from its subprotocol; in
    /// [`Version::V2`](crate::protocol::Version::V2) events are compact
    /// arrays).
    pub fn version(&self) -> crate::protocol::Version {
        self.0.version
    }

    /// Its lifecycle state.
    pub fn state(&self) -> ConnectionState {
        self.0.state()
    }

    /// The rooms it is in.
    pub fn rooms(&self) -> Vec<String> {
        self.0.rooms.lock().iter().map(|r| r.to_string()).collect()
    }

    /// Bytes queued for it and not yet written, with what it has yet to
    /// read from a room's log.
    pub fn queued_bytes(&self) -> usize {
        self.0.outbox.queued_bytes()
    }

    /// The most bytes ever queued for it at once (never above
    /// [`HubConfig::outbound_queue_bytes`]).
    pub fn peak_queued_bytes(&self) -> usize {
        self.0.outbox.peak_bytes()
    }

    /// Messages dropped for it under the drop-oldest policy, with the
    /// events of a room's log its bound skipped (counted as soon as the
    /// log drops them, before its writer tells the client).
    pub fn dropped_messages(&self) -> u64 {
        self.0.outbox.dropped()
    }
}

/// Counts for observability and leak tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct HubStats {
    /// Live connections (any state before closed).
    pub connections: usize,
    /// Rooms with at least one local member.
    pub rooms: usize,
    /// Live tasks belonging to connections and rooms: connection readers and
    /// writers, in-flight calls and joins, backplane room subscriptions.
    pub tasks: usize,
    /// Distinct user ids with at least one connection.
    pub users: usize,
    /// Admission slots held ([`SecurityConfig::max_connections`]): upgrades
    /// admitted and not yet ended, including handshakes in progress.
    pub admitted: usize,
    /// Distinct client addresses (IPv6: /64 networks) holding admission slots.
    pub client_addresses: usize,
}
