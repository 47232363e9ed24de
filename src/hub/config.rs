use crate::security::RateLimit;
use std::time::Duration;

/// What a hub does when a connection's outbound queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum OverflowPolicy {
    /// Close the connection with 4000 "slow consumer" (a reconnect code) and
    /// discard its queue, and the part of the batch being written that was
    /// not handed to the socket yet (a batch goes out in 64 KiB chunks): the
    /// close frame follows what is already in flight, so a client that still
    /// reads gets it; one that reads nothing is dropped after
    /// [`HubConfig::close_timeout`]. The client reconnects and, where the
    /// room keeps history, recovers. The default: a client never silently
    /// misses events.
    #[default]
    Disconnect,
    /// Drop the oldest queued messages to make room and tell the client with
    /// a `lagged` envelope (`{"dropped": n}`) before the next message written.
    DropOldest,
}

/// Hub configuration. Every field has a safe default, written in its docs.
///
/// ```
/// use std::time::Duration;
/// use switchboard::{HubConfig, hub::OverflowPolicy};
/// let config = HubConfig::default()
///     .heartbeat_interval(Duration::from_secs(10))
///     .overflow(OverflowPolicy::DropOldest);
/// assert_eq!(config.max_message_size, 64 * 1024);
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct HubConfig {
    /// How often the server pings a connection. Default 25 s; zero turns
    /// heartbeats off.
    pub heartbeat_interval: Duration,
    /// How long after a ping the connection must have shown a sign of life
    /// (any frame) before it is closed with 4001. Default 10 s.
    pub heartbeat_timeout: Duration,
    /// Largest inbound message, in bytes; a larger one closes the connection
    /// with 1009. Default 64 KiB.
    pub max_message_size: usize,
    /// Bound on a connection's outbound queue, in bytes of queued frames.
    /// Default 1 MiB. A connection that reads a room's events from the
    /// room's log (a WebSocket connection or an event stream, in the first
    /// room without history it joins: `docs/architecture.md` §12, *Room
    /// logs*) is bound by the same number of bytes behind the log's end,
    /// under the same [`HubConfig::overflow`].
    pub outbound_queue_bytes: usize,
    /// What happens when the outbound queue is full. Default
    /// [`OverflowPolicy::Disconnect`].
    pub overflow: OverflowPolicy,
    /// Calls and joins a connection may have in flight; more get a 429 error
    /// and are not processed. Default 16.
    pub max_inflight: usize,
    /// Longest a handler (or join authorization) may run before the caller
    /// gets a 408 error and the handler is cancelled. Default 10 s.
    pub handler_timeout: Duration,
    /// Rooms one connection may be in at once; more get a 413 error.
    /// Default 128.
    pub max_rooms_per_connection: usize,
    /// How long a closing connection may take to drain its queue and finish
    /// the close handshake before it is dropped (the handshake also ends
    /// after 64 frames from the peer that are not its close; after a
    /// heartbeat timeout the peer's close frame is not awaited at all).
    /// Default 5 s.
    pub close_timeout: Duration,
    /// How long the hub waits for the backplane to answer a publish or a
    /// subscribe before it gives up with
    /// [`ErrorKind::Backplane`](crate::ErrorKind::Backplane) (the publish
    /// fails; a subscription is tried again). Above the Redis backplane's
    /// own command timeout (2 s), so its errors come first; this bounds a
    /// host's backplane. Default 10 s.
    pub backplane_timeout: Duration,
    /// Connections closed per step during shutdown (the hub yields between
    /// steps). Default 256.
    pub shutdown_batch: usize,
    /// Inbound message rate per connection (every frame counts, valid or
    /// not: a message one token per WebSocket frame it came in, a ping or
    /// pong one). A message over it is answered with `error 420`
    /// (`data: {"retry_after_ms": n}`) and not processed. An
    /// [`Identity`](crate::Identity) may override it. `None` turns it off.
    /// Default 50 messages per second with a burst of 200 (more than
    /// [`HubConfig::max_rooms_per_connection`], so a reconnecting client can
    /// rejoin every room at once).
    pub rate_limit: Option<RateLimit>,
    /// How many over-limit messages a connection may send in quick
    /// succession before it is closed with 1008 (policy violation). Each
    /// refused message takes a token from a second bucket of this size that
    /// refills at the rate limit's own rate, so a client sending at most
    /// twice its rate only gets errors for the excess, while one that keeps
    /// sending faster is closed. Default 10.
    pub max_rate_violations: u32,
    /// Joins and leaves per connection, on top of the message rate (each
    /// also takes a message token). A `join` or `leave` over it is answered
    /// with `error 420` (`data: {"retry_after_ms": n}`) and not processed,
    /// and counts as a violation ([`HubConfig::max_rate_violations`]).
    /// Applies to connections the message rate applies to (an identity
    /// without a rate limit has none). `None` turns it off. Default 5 per
    /// second with a burst of 150: a reconnecting client rejoins every room
    /// (at most [`HubConfig::max_rooms_per_connection`], 128) at once, while
    /// join/leave cycles, each making the room send presence and history to
    /// the joiner, stay at a few per second.
    pub join_rate: Option<RateLimit>,
    /// Largest `data` of a `join` (the join params), in encoded bytes; a
    /// larger one gets a 400 error. Default 4 KiB.
    pub max_join_params_size: usize,
    /// Deepest nesting of arrays and maps in a message's `data`; deeper gets
    /// a 400 error before any handler sees it, so a payload cannot exhaust
    /// the stack. At most (and by default) 128, the decoder's own bound.
    pub max_payload_depth: usize,
}

impl Default for HubConfig {
    fn default() -> Self {
        HubConfig {
            heartbeat_interval: Duration::from_secs(25),
            heartbeat_timeout: Duration::from_secs(10),
            max_message_size: 64 * 1024,
            outbound_queue_bytes: 1024 * 1024,
            overflow: OverflowPolicy::Disconnect,
            max_inflight: 16,
            handler_timeout: Duration::from_secs(10),
            max_rooms_per_connection: 128,
            close_timeout: Duration::from_secs(5),
            backplane_timeout: Duration::from_secs(10),
            shutdown_batch: 256,
            rate_limit: Some(RateLimit::per_second(50).burst(200)),
            max_rate_violations: 10,
            join_rate: Some(RateLimit::per_second(5).burst(150)),
            max_join_params_size: 4 * 1024,
            max_payload_depth: crate::protocol::MAX_DEPTH,
        }
    }
}

macro_rules! setters {
    ($($(#[$doc:meta])* $name:ident: $ty:ty,)*) => {
        impl HubConfig {
            $(
                $(#[$doc])*
                pub fn $name(mut self, value: $ty) -> Self {
                    self.$name = value;
                    self
                }
            )*
        }
    };
}

setters! {
    /// Sets [`HubConfig::heartbeat_interval`].
    heartbeat_interval: Duration,
    /// Sets [`HubConfig::heartbeat_timeout`].
    heartbeat_timeout: Duration,
    /// Sets [`HubConfig::max_message_size`].
    max_message_size: usize,
    /// Sets [`HubConfig::outbound_queue_bytes`].
    outbound_queue_bytes: usize,
    /// Sets [`HubConfig::overflow`].
    overflow: OverflowPolicy,
    /// Sets [`HubConfig::max_inflight`].
    max_inflight: usize,
    /// Sets [`HubConfig::handler_timeout`].
    handler_timeout: Duration,
    /// Sets [`HubConfig::max_rooms_per_connection`].
    max_rooms_per_connection: usize,
    /// Sets [`HubConfig::close_timeout`].
    close_timeout: Duration,
    /// Sets [`HubConfig::backplane_timeout`].
    backplane_timeout: Duration,
    /// Sets [`HubConfig::shutdown_batch`].
    shutdown_batch: usize,
    /// Sets [`HubConfig::rate_limit`].
    rate_limit: Option<RateLimit>,
    /// Sets [`HubConfig::max_rate_violations`].
    max_rate_violations: u32,
    /// Sets [`HubConfig::join_rate`].
    join_rate: Option<RateLimit>,
    /// Sets [`HubConfig::max_join_params_size`].
    max_join_params_size: usize,
    /// Sets [`HubConfig::max_payload_depth`].
    max_payload_depth: usize,
}
