//! Redis support (feature `redis`): a [`Backplane`](crate::Backplane) on
//! Redis pub/sub, so hubs on several servers share rooms
//! ([`RedisBackplane`]), and a [`HistoryStore`](crate::history::HistoryStore)
//! on Redis streams, so they share room history ([`RedisHistory`]), and a
//! [`PresenceStore`](crate::PresenceStore) with TTLs ([`RedisPresence`]).
//!
//! ```no_run
//! use switchboard::redis::{RedisBackplane, RedisConfig};
//! use switchboard::Hub;
//!
//! # async fn run() -> switchboard::Result<()> {
//! let config = RedisConfig::new("redis://10.0.0.5:6379/").prefix("myapp:");
//! let backplane = RedisBackplane::connect(config).await?;
//! let hub = Hub::builder().backplane(backplane).build();
//! # let _ = hub;
//! # Ok(())
//! # }
//! ```
//!
//! Every node connects to the same Redis. What is kept where, the bounds,
//! and what happens when Redis restarts or a connection silently dies is in
//! `docs/redis.md`; in short:
//!
//! - a publish is one `PUBLISH <prefix><topic>` on a multiplexed
//!   connection (concurrent publishes are pipelined); while Redis is
//!   unreachable it fails at once with an error of kind
//!   [`ErrorKind::Backplane`];
//! - subscriptions share one pub/sub connection; a channel is subscribed
//!   while at least one [`Subscription`](crate::Subscription) for it lives;
//! - every subscription buffers at most
//!   [`RedisConfig::subscription_capacity`] messages; beyond that messages
//!   are dropped for that subscription and it yields an error saying how
//!   many;
//! - a lost connection is re-established with capped exponential backoff
//!   and jitter; every channel is subscribed again and every live
//!   subscription yields an error saying messages may have been lost;
//! - a periodic probe publishes to a channel of the node's own and expects
//!   it back, so a subscription that silently stopped delivering is
//!   detected and re-established.
//!
//! [`RedisHistory`] keeps one stream per room plus a meta key (epoch, top
//! offset); an append is one Lua script, so offsets are gap-free across
//! nodes, and the epoch changes when Redis lost the room's history.
//!
//! The redis-rs types stay private: a redis-rs major release is not a
//! breaking change of this crate.

mod backplane;
mod history;
mod link;
mod presence;

pub use backplane::{RedisBackplane, RedisStats};
pub use history::RedisHistory;
pub use presence::RedisPresence;

use crate::error::{Error, ErrorKind, Result};
use std::time::Duration;

/// Settings of the Redis integrations. Every field has a safe default,
/// written in its documentation; set them with the by-value setters.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RedisConfig {
    /// The server: `redis://[user:password@]host[:port][/db]`. Default
    /// `redis://127.0.0.1:6379/`.
    pub url: String,
    /// Prepended to every topic to make the Redis channel name, and to every
    /// key. Default `switchboard:`.
    pub prefix: String,
    /// Messages each subscription buffers before it drops (and reports) the
    /// overflow. Default 4096.
    pub subscription_capacity: usize,
    /// Longest wait for a reply to a command (a publish, a subscribe);
    /// beyond it the command fails and the connection is replaced.
    /// Default 2 s.
    pub command_timeout: Duration,
    /// Longest wait to establish a connection. Default 2 s.
    pub connect_timeout: Duration,
    /// First delay before reconnecting after a loss; it doubles per failed
    /// attempt up to [`RedisConfig::reconnect_max`], with jitter. Default
    /// 100 ms.
    pub reconnect_min: Duration,
    /// Longest delay between reconnect attempts. Default 5 s.
    pub reconnect_max: Duration,
    /// How often the pub/sub connection's liveness is probed. Default 5 s.
    pub probe_interval: Duration,
    /// How long a probe may take to come back before the pub/sub connection
    /// is declared dead and replaced. Default 3 s.
    pub probe_timeout: Duration,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: "redis://127.0.0.1:6379/".to_owned(),
            prefix: "switchboard:".to_owned(),
            subscription_capacity: 4096,
            command_timeout: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(2),
            reconnect_min: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(5),
            probe_interval: Duration::from_secs(5),
            probe_timeout: Duration::from_secs(3),
        }
    }
}

impl RedisConfig {
    /// The defaults, with the server at `url`.
    pub fn new(url: impl Into<String>) -> RedisConfig {
        RedisConfig { url: url.into(), ..RedisConfig::default() }
    }

    /// Sets [`RedisConfig::prefix`].
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Sets [`RedisConfig::subscription_capacity`] (at least 1).
    pub fn subscription_capacity(mut self, capacity: usize) -> Self {
        self.subscription_capacity = capacity.max(1);
        self
    }

    /// Sets [`RedisConfig::command_timeout`].
    pub fn command_timeout(mut self, timeout: Duration) -> Self {
        self.command_timeout = timeout;
        self
    }

    /// Sets [`RedisConfig::connect_timeout`].
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Sets [`RedisConfig::reconnect_min`] and [`RedisConfig::reconnect_max`].
    pub fn reconnect_backoff(mut self, min: Duration, max: Duration) -> Self {
        self.reconnect_min = min;
        self.reconnect_max = max.max(min);
        self
    }

    /// Sets [`RedisConfig::probe_interval`] and [`RedisConfig::probe_timeout`].
    pub fn probe(mut self, interval: Duration, timeout: Duration) -> Self {
        self.probe_interval = interval;
        self.probe_timeout = timeout;
        self
    }

    pub(crate) fn client(&self) -> Result<::redis::Client> {
        ::redis::Client::open(self.url.as_str()).map_err(|e| Error::with_source(ErrorKind::Config, e))
    }

    pub(crate) fn channel(&self, topic: &str) -> String {
        format!("{}{topic}", self.prefix)
    }
}
