//! The command connection: one multiplexed Redis connection shared by every
//! command of a handle (publishes, history scripts, presence writes), with
//! reconnection in the background.
//!
//! Commands never wait for a connection: while the link is down they fail
//! at once with an error of kind [`ErrorKind::Backplane`], and the first
//! failure starts one reconnect task that retries with capped exponential
//! backoff and jitter. A command that fails because the connection broke
//! (I/O error, dropped connection, no answer within
//! [`RedisConfig::command_timeout`]) marks the link down, so the next
//! command fails fast instead of queueing behind a dead socket.
//!
//! Requests from concurrent callers are pipelined by redis-rs's multiplexed
//! connection: they are written back to back without waiting for replies.
//! Its request queue is bounded (callers wait for room) and every request
//! has a response timeout, so nothing queues without bound.
//!
//! On a Redis Cluster the connection is redis-rs's cluster connection: one
//! multiplexed connection per node, each command routed by the slot of its
//! first key (a script by its first key), `MOVED`/`ASK` followed and the
//! slot map refreshed by redis-rs. A node that fails is reconnected by
//! redis-rs on its own, so a failure never marks the whole link down (the
//! other shards keep working): a command for a slot of the failed node
//! fails within [`RedisConfig::command_timeout`] and the link stays up.

use super::RedisConfig;
use crate::error::{Error, ErrorKind, Result};
use ::redis::aio::{ConnectionLike, MultiplexedConnection};
use ::redis::cluster::{ClusterClient, ClusterClientBuilder};
use ::redis::cluster_async::ClusterConnection;
use ::redis::{AsyncConnectionConfig, Client, Cmd, Pipeline, RedisError, RedisFuture, Value};
use parking_lot::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

/// Converts a redis-rs error into ours, keeping it as the source.
pub(crate) fn redis_error(context: &str, e: RedisError) -> Error {
    // What redis-rs's cluster connection returns when the master of a slot
    // stays unreachable: the last redirect, which reads as "Moved: 1234 …".
    if let Some((addr, slot)) = e.redirect_node() {
        let msg = format!("redis {context}: slot {slot} is served by {addr}, which could not be reached ({e})");
        return Error::msg_with_source(ErrorKind::Backplane, msg, e);
    }
    Error::msg_with_source(ErrorKind::Backplane, format!("redis {context}: {e}"), e)
}

/// A call of a Redis store (history, presence) whose connection errors are
/// reported with the store's own kind, not as [`ErrorKind::Backplane`].
pub(crate) fn store_call<T: Send + 'static>(
    kind: ErrorKind,
    call: impl std::future::Future<Output = Result<T>> + Send + 'static,
) -> futures::future::BoxFuture<'static, Result<T>> {
    Box::pin(
        async move { call.await.map_err(|e| if e.kind() == ErrorKind::Backplane { e.with_kind(kind) } else { e }) },
    )
}

/// Whether `e` means the connection is unusable (rather than a command the
/// server refused, such as a script error).
pub(crate) fn is_connection_error(e: &RedisError) -> bool {
    e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_unrecoverable_error()
}

/// The delay before reconnect attempt `attempt` (0-based): `min · 2^attempt`
/// capped at `max`, then a random part of up to half of it taken off
/// ("equal jitter"), so nodes that lost Redis together do not reconnect in
/// lockstep.
pub(crate) fn backoff(config: &RedisConfig, attempt: u32) -> Duration {
    let base = config.reconnect_min.max(Duration::from_millis(1));
    let capped = base.saturating_mul(1u32 << attempt.min(20)).min(config.reconnect_max.max(base));
    let half = capped / 2;
    let nanos = u64::try_from(half.as_nanos()).unwrap_or(u64::MAX).max(1);
    capped - Duration::from_nanos(crate::util::random_u64() % nanos)
}

/// A command connection: to one Redis, or to a Redis Cluster.
#[derive(Clone)]
pub(crate) enum Conn {
    Single(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// What the link connects with.
enum Target {
    Single(Client),
    // Boxed: it is several times the size of a `Client`.
    Cluster(Box<ClusterClient>),
}

enum State {
    Up { conn: Conn, generation: u64 },
    Down { error: String, reconnecting: bool },
}

/// A shared, self-healing command connection.
pub(crate) struct Link {
    target: Target,
    config: RedisConfig,
    state: Mutex<State>,
    generation: AtomicU64,
    reconnects: AtomicU64,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link").field("up", &self.is_up()).finish_non_exhaustive()
    }
}

impl Link {
    /// Connects once; fails if Redis cannot be reached now.
    pub(crate) async fn connect(config: &RedisConfig) -> Result<Arc<Link>> {
        let target = if config.is_cluster() {
            if config.prefix.contains(['{', '}']) {
                // The room must be the hash tag of every key and channel.
                return Err(Error::msg(ErrorKind::Config, "a Redis Cluster prefix must not contain '{' or '}'"));
            }
            let client = ClusterClientBuilder::new(config.cluster_nodes.iter().map(String::as_str))
                .connection_timeout(config.connect_timeout)
                .response_timeout(config.command_timeout)
                // A command for a failed shard fails (within the command
                // timeout) instead of waiting through many retries; MOVED
                // and ASK are followed regardless.
                .retries(2)
                .min_retry_wait(10)
                .max_retry_wait(100)
                .build()
                .map_err(|e| Error::with_source(ErrorKind::Config, e))?;
            Target::Cluster(Box::new(client))
        } else {
            Target::Single(config.client()?)
        };
        let conn = open(&target, config).await?;
        Ok(Arc::new(Link {
            target,
            config: config.clone(),
            state: Mutex::new(State::Up { conn, generation: 1 }),
            generation: AtomicU64::new(1),
            reconnects: AtomicU64::new(0),
        }))
    }

    pub(crate) fn is_up(&self) -> bool {
        matches!(*self.state.lock(), State::Up { .. })
    }

    /// How many times the link was re-established after a loss.
    pub(crate) fn reconnects(&self) -> u64 {
        self.reconnects.load(Ordering::Relaxed)
    }

    /// The current connection, or an error at once when the link is down
    /// (starting a reconnect if none is running).
    pub(crate) fn get(self: &Arc<Self>) -> Result<(Conn, u64)> {
        let mut state = self.state.lock();
        match &mut *state {
            State::Up { conn, generation } => Ok((conn.clone(), *generation)),
            State::Down { error, reconnecting } => {
                let err =
                    Error::msg_with_source(ErrorKind::Backplane, "redis unavailable (reconnecting)", error.clone());
                if !*reconnecting {
                    *reconnecting = true;
                    tokio::spawn(reconnect(Arc::downgrade(self)));
                }
                Err(err)
            }
        }
    }

    /// Marks connection `generation` as broken (if it is still the current
    /// one) and starts reconnecting.
    pub(crate) fn broken(self: &Arc<Self>, generation: u64, why: &str) {
        if matches!(self.target, Target::Cluster(_)) {
            // redis-rs repairs the connection of a failed node itself; the
            // other shards' commands must go on.
            tracing::debug!(error = why, "redis cluster command failed");
            return;
        }
        let mut state = self.state.lock();
        if let State::Up { generation: g, .. } = &*state {
            if *g == generation {
                tracing::warn!(error = why, "redis command connection lost; reconnecting");
                *state = State::Down { error: why.to_owned(), reconnecting: true };
                tokio::spawn(reconnect(Arc::downgrade(self)));
            }
        }
    }

    /// Checks the connection with a `PING` (a dead one is marked broken and
    /// replaced in the background).
    pub(crate) async fn ping(self: &Arc<Self>) -> Result<()> {
        self.run("ping", |mut conn| async move { ::redis::cmd("PING").query_async::<()>(&mut conn).await }).await
    }

    /// Checks the connection and, when it was dead, waits up to `limit` for
    /// the replacement. Called when the pub/sub connection came back after a
    /// loss: the command connection most likely broke too, and this way the
    /// first publish after the outage does not find it out the hard way.
    pub(crate) async fn refresh(self: &Arc<Self>, limit: Duration) {
        if self.ping().await.is_ok() {
            return;
        }
        let deadline = tokio::time::Instant::now() + limit;
        while !self.is_up() && tokio::time::Instant::now() < deadline {
            // Keeps a reconnect running (it is started by the first failure).
            let _ = self.get();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Runs `f` on the connection with the command timeout; a connection
    /// failure marks the link broken. Errors are ours, with `context`.
    pub(crate) async fn run<T, F, Fut>(self: &Arc<Self>, context: &str, f: F) -> Result<T>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<T, RedisError>>,
    {
        let (conn, generation) = self.get()?;
        match tokio::time::timeout(self.config.command_timeout, f(conn)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                if is_connection_error(&e) {
                    self.broken(generation, &e.to_string());
                }
                Err(redis_error(context, e))
            }
            Err(_) => {
                self.broken(generation, "no reply within the command timeout");
                Err(Error::msg(
                    ErrorKind::Backplane,
                    format!("redis {context}: no reply within {:?}", self.config.command_timeout),
                ))
            }
        }
    }
}

/// Opens the command connection of `target`.
async fn open(target: &Target, config: &RedisConfig) -> Result<Conn> {
    match target {
        Target::Single(client) => open_single(client, config).await.map(Conn::Single),
        Target::Cluster(client) => {
            match tokio::time::timeout(config.connect_timeout + config.command_timeout, client.get_async_connection())
                .await
            {
                Ok(Ok(conn)) => Ok(Conn::Cluster(conn)),
                Ok(Err(e)) => Err(redis_error("cluster connect", e)),
                Err(_) => Err(Error::msg(ErrorKind::Backplane, "redis cluster connect: timed out")),
            }
        }
    }
}

/// Opens a multiplexed connection with our timeouts.
pub(crate) async fn open_single(client: &Client, config: &RedisConfig) -> Result<MultiplexedConnection> {
    let cfg = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(config.connect_timeout))
        .set_response_timeout(Some(config.command_timeout));
    // The connection timeout covers the TCP connect and the handshake; the
    // outer timeout is a backstop.
    match tokio::time::timeout(
        config.connect_timeout + config.command_timeout,
        client.get_multiplexed_async_connection_with_config(&cfg),
    )
    .await
    {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => Err(redis_error("connect", e)),
        Err(_) => Err(Error::msg(ErrorKind::Backplane, "redis connect: timed out")),
    }
}

/// Retries until connected; holds no strong reference while it sleeps, so
/// it ends once every handle is gone.
async fn reconnect(weak: Weak<Link>) {
    let mut attempt = 0u32;
    loop {
        let delay = match weak.upgrade() {
            Some(link) => backoff(&link.config, attempt),
            None => return,
        };
        tokio::time::sleep(delay).await;
        let Some(link) = weak.upgrade() else { return };
        attempt = attempt.saturating_add(1);
        match open(&link.target, &link.config).await {
            Ok(conn) => {
                let generation = link.generation.fetch_add(1, Ordering::Relaxed) + 1;
                *link.state.lock() = State::Up { conn, generation };
                link.reconnects.fetch_add(1, Ordering::Relaxed);
                tracing::info!(attempt, "redis command connection re-established");
                return;
            }
            Err(e) => {
                tracing::debug!(attempt, error = %e, "redis reconnect failed");
                if let State::Down { error, .. } = &mut *link.state.lock() {
                    *error = e.detail();
                }
            }
        }
    }
}
