//! Redis support (feature `redis`): a [`Backplane`](crate::backplane::Backplane) on
//! Redis pub/sub, so hubs on several servers share rooms
//! ([`RedisBackplane`]), and a [`HistoryStore`](crate::history::HistoryStore)
//! on Redis streams, so they share room history ([`RedisHistory`]), and a
//! [`PresenceStore`](crate::presence::PresenceStore) with TTLs ([`RedisPresence`]).
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
//!   while at least one [`Subscription`](crate::backplane::Subscription) for it lives;
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
//! # Redis Cluster
//!
//! [`RedisConfig::cluster`] runs all three on a Redis Cluster (Redis 7 or
//! newer):
//!
//! ```no_run
//! use switchboard::redis::{RedisBackplane, RedisConfig};
//!
//! # async fn run() -> switchboard::Result<()> {
//! let config = RedisConfig::cluster(["redis://10.0.0.5:7000", "redis://10.0.0.6:7000"]);
//! let backplane = RedisBackplane::connect(config).await?;
//! # let _ = backplane;
//! # Ok(())
//! # }
//! ```
//!
//! A room's channel is `<prefix>{<room>}` (sharded pub/sub: `SPUBLISH`, and
//! `SSUBSCRIBE` on one connection per master) and its history and presence
//! keys carry the same `{<room>}` hash tag: one room lives in one slot, and
//! rooms spread over every master. A master that fails fails only its own
//! rooms' calls; slot migrations and failovers move the subscriptions to
//! the new owner, with a gap reported on each. `docs/scaling.md` and
//! `docs/redis.md` have the details.
//!
//! The redis-rs types stay private: a redis-rs major release is not a
//! breaking change of this crate.

mod backplane;
mod history;
mod link;
mod presence;
mod sync;

pub use backplane::{RedisBackplane, RedisStats};
pub use history::RedisHistory;
pub use presence::RedisPresence;
pub use sync::RedisSnapshots;

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
    /// key. Default `switchboard:`. On a cluster it must not contain `{` or
    /// `}` (the room is the hash tag; `connect` refuses such a prefix).
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
    /// Seed nodes of a Redis Cluster (`redis://host:port` each; one
    /// reachable master or replica is enough, the rest of the cluster is
    /// discovered with `CLUSTER SLOTS`). Empty (the default): a single Redis
    /// at [`RedisConfig::url`]. Set with [`RedisConfig::cluster`]; see
    /// `docs/scaling.md` for what changes on a cluster (sharded pub/sub,
    /// Redis 7 or newer).
    pub cluster_nodes: Vec<String>,
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
            cluster_nodes: Vec::new(),
        }
    }
}

impl RedisConfig {
    /// The defaults, with the server at `url`.
    pub fn new(url: impl Into<String>) -> RedisConfig {
        RedisConfig { url: url.into(), ..RedisConfig::default() }
    }

    /// The defaults, on the Redis Cluster that `nodes` belong to (seed
    /// nodes: one reachable node is enough). [`RedisConfig::url`] is set to
    /// the first node, for display only.
    ///
    /// On a cluster the backplane uses sharded pub/sub (`SSUBSCRIBE` and
    /// `SPUBLISH`, Redis 7 or newer) and every key and channel of a room
    /// carries the room as its hash tag, so a room lives on one shard and
    /// rooms spread over all of them.
    pub fn cluster<I, S>(nodes: I) -> RedisConfig
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let cluster_nodes: Vec<String> = nodes.into_iter().map(Into::into).collect();
        let url = cluster_nodes.first().cloned().unwrap_or_default();
        RedisConfig { url, cluster_nodes, ..RedisConfig::default() }
    }

    /// Whether this is a Redis Cluster configuration
    /// ([`RedisConfig::cluster_nodes`] is not empty).
    pub fn is_cluster(&self) -> bool {
        !self.cluster_nodes.is_empty()
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
        ::redis::Client::open(self.url.as_str()).map_err(|e| {
            // The commonest mistake is a bare `host:port`: say what a URL
            // looks like, and which one was given.
            let msg = format!(
                "`{}` is not a Redis URL; it needs a scheme: redis://HOST:PORT (rediss:// for TLS, \
                 redis+unix:///PATH for a socket)",
                self.url
            );
            Error::msg_with_source(ErrorKind::Config, msg, e)
        })
    }

    /// The Redis channel of `topic`: `<prefix><topic>` on a single Redis;
    /// on a cluster `<prefix>{<topic>}`, the topic being the hash tag, so a
    /// room's channel shares the slot of its keys (`…{<room>}…`) and rooms
    /// spread over every slot.
    pub(crate) fn channel(&self, topic: &str) -> String {
        if self.is_cluster() {
            format!("{}{{{topic}}}", self.prefix)
        } else {
            format!("{}{topic}", self.prefix)
        }
    }

    /// The topic of a channel made by [`RedisConfig::channel`].
    pub(crate) fn topic<'a>(&self, channel: &'a str) -> Option<&'a str> {
        let rest = channel.strip_prefix(self.prefix.as_str())?;
        if self.is_cluster() {
            rest.strip_prefix('{')?.strip_suffix('}')
        } else {
            Some(rest)
        }
    }
}

/// The Redis Cluster hash slot of a key or channel: CRC16 (XMODEM) of its
/// hash tag (the part between the first `{` and the next `}`, when not
/// empty) or of the whole name, modulo 16384.
pub(crate) fn slot(key: &[u8]) -> u16 {
    let tagged = key
        .iter()
        .position(|b| *b == b'{')
        .and_then(|open| {
            let rest = &key[open + 1..];
            rest.iter().position(|b| *b == b'}').map(|close| &rest[..close])
        })
        .filter(|tag| !tag.is_empty());
    let mut crc: u16 = 0;
    for byte in tagged.unwrap_or(key) {
        crc ^= u16::from(*byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 { (crc << 1) ^ 0x1021 } else { crc << 1 };
        }
    }
    crc % 16384
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_match_redis() {
        // Values from `CLUSTER KEYSLOT` (and the Redis Cluster spec).
        // CRC16/XMODEM("123456789") is 0x31C3, below 16384.
        assert_eq!(slot(b"123456789"), 0x31C3);
        assert_eq!(slot(b"foo"), 12182);
        assert_eq!(slot(b"{user1000}.following"), slot(b"user1000"));
        assert_eq!(slot(b"foo{}{bar}"), slot(b"foo{}{bar}"));
        assert_ne!(slot(b"foo{}{bar}"), slot(b"bar"), "an empty tag hashes the whole name");
        assert_eq!(slot(b"foo{{bar}}zap"), slot(b"{bar"));
    }

    #[test]
    fn cluster_channels_carry_the_topic_as_hash_tag() {
        let single = RedisConfig::default();
        assert_eq!(single.channel("lobby"), "switchboard:lobby");
        assert_eq!(single.topic("switchboard:lobby"), Some("lobby"));
        let cluster = RedisConfig::cluster(["redis://127.0.0.1:7000"]);
        assert_eq!(cluster.channel("lobby"), "switchboard:{lobby}");
        assert_eq!(cluster.topic("switchboard:{a}b}"), Some("a}b"));
        assert_eq!(slot(cluster.channel("lobby").as_bytes()), slot(b"switchboard:history:{lobby}:stream"));
    }
}
