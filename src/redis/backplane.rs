//! [`RedisBackplane`]: the [`Backplane`] on Redis pub/sub.
//!
//! Connections per handle (and its clones):
//!
//! - the **command link** ([`super::link`]): publishes (and the liveness
//!   probe's publishes), pipelined on one multiplexed connection (on a
//!   cluster, redis-rs's cluster connection, which routes each publish to
//!   the master of its channel's slot);
//! - the **pub/sub connections**, one per *shard*: on a single Redis one
//!   shard owns every channel; on a Redis Cluster there is one shard per
//!   master, owning the channels whose slots that master serves. Each is
//!   owned by one task (the shard's *subscriber task*), which subscribes and
//!   unsubscribes its channels, reads every message and hands it to the
//!   subscriptions of its topic.
//!
//! # Subscriptions and their channels
//!
//! The registry maps each topic to its live subscriptions. A subscription
//! starts *pending*: it receives nothing until the subscriber task got the
//! server's confirmation of a `SUBSCRIBE` of its channel sent after the
//! subscription was registered. Redis writes a channel's messages and the
//! replies on the pub/sub connection in order, so every message that was
//! published before `subscribe` was called arrives before that
//! confirmation, and is not handed to the new subscription (the contract:
//! a subscription receives what is published after it resolved, not
//! before). A channel is unsubscribed when its last subscription is dropped.
//! Subscribing and dropping only *mark* a topic on its shard and wake the
//! shard's task (a set of marks, bounded by the number of topics); the task
//! brings the server in step, one command at a time, so a subscribe racing
//! an unsubscribe of the same channel cannot leave them out of step.
//!
//! # Redis Cluster: sharded pub/sub
//!
//! On a cluster a topic's channel is `<prefix>{<topic>}`: the topic is the
//! hash tag, so a room's channel lives in the slot of the room's history and
//! presence keys, and rooms spread over all slots. Channels are subscribed
//! with `SSUBSCRIBE` (one channel per command: the server sends one
//! confirmation per channel, and a command's channels must share a slot)
//! on a RESP3 connection to the master that owns the slot, and published
//! with `SPUBLISH`, so a message travels only within its shard instead of
//! being broadcast to every node as classic pub/sub does.
//!
//! The slot map comes from `CLUSTER SLOTS`. It is read again (by the
//! *topology task*) when a shard's connection fails or cannot be opened,
//! when a subscribe is answered with `MOVED` or `ASK`, and when the server
//! unsubscribes a channel on its own (Redis sends `sunsubscribe` when the
//! channel's slot migrated). When the map changed, every shard is replaced:
//! each new one subscribes the channels it owns and reports a gap on their
//! subscriptions, as after a reconnect. redis-rs's cluster connection can
//! subscribe too, but it forgets a channel the server unsubscribed (so a
//! migrated channel would stay silent), shares each node's connection with
//! commands (a server-sent `sunsubscribe` could be taken for a command's
//! reply), and says nothing of which subscriptions a failure touched: hence
//! our own connections per master.
//!
//! # Bounds
//!
//! redis-rs's pub/sub reader hands messages to us through an unbounded
//! channel. The subscriber task drains it without awaiting anything else
//! (a lookup under the registry lock and a push per subscription), so it
//! holds only what arrives while the task waits to be scheduled — and,
//! after a reconnect, what arrives during the one round trip of the
//! resubscription. Each subscription's queue holds at most
//! [`RedisConfig::subscription_capacity`] messages: beyond that a message is
//! dropped *for that subscription*, counted, and the subscription yields
//! one `Err` saying how many were lost, at the place of the gap.
//!
//! # Faults
//!
//! When a pub/sub connection ends (Redis restarted, the connection was
//! killed) or the probe finds it dead, its task reconnects with capped
//! exponential backoff and jitter, subscribes every channel of its shard
//! that still has subscriptions, and then queues an `Err` ("reconnected:
//! messages may have been lost") in every subscription that was live, ahead
//! of the messages of the new connection. While it is down, `subscribe` to
//! a topic of that shard fails at once; the other shards are not touched.
//!
//! The probe: every [`RedisConfig::probe_interval`] the task publishes a
//! random token (over the command link) to a channel only this shard of
//! this handle subscribes to (on a cluster, one whose slot the shard owns).
//! If Redis says nobody is subscribed to it, or the token does not come
//! back within [`RedisConfig::probe_timeout`], the subscription is dead
//! although the socket looks open (a half-open connection, a proxy or a
//! network that dropped it): the connection is replaced. When the command
//! link is down the probe cannot publish, and falls back to a `PING` on the
//! pub/sub connection.

use super::link::{self, is_connection_error, Link};
use super::RedisConfig;
use crate::backplane::{Backplane, Subscription};
use crate::error::{Error, ErrorKind, Result};
use ::redis::aio::{MultiplexedConnection, PubSubSink, PubSubStream};
use ::redis::{AsyncConnectionConfig, Client, Msg, ProtocolVersion, PushInfo, PushKind, RedisResult, Value};
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::task::AtomicWaker;
use futures::{FutureExt, Stream, StreamExt};
use parking_lot::Mutex;
use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior, Sleep};

/// A [`Backplane`] on Redis pub/sub (on a Redis Cluster: sharded pub/sub).
/// See the [module docs](super) and `docs/redis.md`.
///
/// Cheap to clone: clones share the connections. Give each hub its own
/// `RedisBackplane` (two hubs in one process may share one; they are told
/// apart by their node ids).
///
/// Publishing to a topic publishes to the Redis channel
/// [`RedisConfig::prefix`] + topic (on a cluster: prefix + `{topic}`, with
/// `SPUBLISH`).
#[derive(Clone)]
pub struct RedisBackplane {
    shared: Arc<Shared>,
    _task: Arc<TaskGuard>,
}

/// Counters of a [`RedisBackplane`], for observability and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct RedisStats {
    /// Whether every pub/sub connection is up and subscribed (on a cluster:
    /// the one of every master).
    pub pubsub_connected: bool,
    /// Whether the command (publish) connection is up. On a cluster it
    /// stays up while single nodes fail (redis-rs repairs their
    /// connections).
    pub commands_connected: bool,
    /// Channels subscribed on the server (topics; the probe channels are
    /// not counted).
    pub channels: usize,
    /// Live [`Subscription`]s.
    pub subscriptions: usize,
    /// Times a pub/sub connection was re-established (on a cluster, also
    /// each shard's first connection after the slot map changed).
    pub pubsub_reconnects: u64,
    /// Times the command connection was re-established.
    pub command_reconnects: u64,
    /// Messages dropped because a subscription's queue was full.
    pub dropped: u64,
    /// Times the liveness probe found a pub/sub connection dead.
    pub probe_failures: u64,
    /// Pub/sub connections: 1 on a single Redis, one per master on a
    /// cluster.
    pub shards: usize,
    /// Times the cluster's slot map was found changed and the shards
    /// replaced.
    pub topology_changes: u64,
}

struct Shared {
    config: RedisConfig,
    /// Opens the pub/sub connections (a single Redis: the one; a cluster:
    /// the seed, whose credentials each master's connection takes).
    client: Client,
    link: Arc<Link>,
    /// Held only for in-memory work, never across an await.
    registry: Mutex<Registry>,
    /// The current shards; replaced whole when the slot map changes.
    shards: Mutex<Arc<Vec<Arc<Shard>>>>,
    /// Asks the topology task to read the slot map again (cluster only).
    refresh: Notify,
    pubsub_reconnects: AtomicU64,
    dropped: AtomicU64,
    probe_failures: AtomicU64,
    topology_changes: AtomicU64,
}

/// One pub/sub connection and the channels it owns.
struct Shard {
    /// Where its pub/sub connection goes.
    client: Client,
    /// The slots it owns (inclusive ranges); `None`: every channel (a single
    /// Redis).
    slots: Option<Vec<(u16, u16)>>,
    /// Topics whose server subscription must be looked at.
    marks: Mutex<HashSet<String>>,
    wake: Notify,
    /// The pub/sub connection is up and resubscribed.
    up: AtomicBool,
    probe_channel: String,
    channels: AtomicUsize,
    task: Mutex<Option<JoinHandle<()>>>,
}

#[derive(Default)]
struct Registry {
    topics: HashMap<String, Vec<Entry>>,
    next_id: u64,
    count: usize,
}

struct Entry {
    id: u64,
    queue: Arc<Queue>,
    /// Receives messages (its channel's subscription was confirmed after
    /// it was registered).
    active: bool,
    /// Resolves the pending `subscribe` call.
    waiter: Option<oneshot::Sender<()>>,
}

/// Aborts the subscriber and topology tasks when the last handle and
/// subscription are gone.
struct TaskGuard {
    shared: Arc<Shared>,
    topology: Option<JoinHandle<()>>,
}

impl Drop for TaskGuard {
    fn drop(&mut self) {
        if let Some(task) = self.topology.take() {
            task.abort();
        }
        for shard in self.shared.shards.lock().iter() {
            shard.stop();
        }
    }
}

impl fmt::Debug for RedisBackplane {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisBackplane")
            .field("url", &self.shared.config.url)
            .field("cluster_nodes", &self.shared.config.cluster_nodes)
            .field("prefix", &self.shared.config.prefix)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

/// `RedisStats`' own counters, set as they are (feature `metrics`).
#[cfg(feature = "metrics")]
impl crate::metrics::Sample for RedisBackplane {
    fn sample_metrics(&self) {
        let s = self.stats();
        crate::metrics::redis_gauges(
            s.pubsub_reconnects,
            s.command_reconnects,
            s.dropped,
            [s.pubsub_connected, s.commands_connected],
        );
    }
}

impl RedisBackplane {
    /// Connects to Redis (the command connection and the pub/sub
    /// connection; on a cluster, one pub/sub connection per master). Fails
    /// when Redis (any master of a cluster) cannot be reached now; once
    /// connected, later losses are repaired in the background.
    pub async fn connect(config: RedisConfig) -> Result<RedisBackplane> {
        let link = Link::connect(&config).await?;
        let client = config.client()?;
        let shared = Arc::new(Shared {
            config,
            client,
            link,
            registry: Mutex::new(Registry::default()),
            shards: Mutex::new(Arc::new(Vec::new())),
            refresh: Notify::new(),
            pubsub_reconnects: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            probe_failures: AtomicU64::new(0),
            topology_changes: AtomicU64::new(0),
        });
        let specs = if shared.config.is_cluster() { cluster_slots(&shared.link).await? } else { vec![None] };
        let mut shards = Vec::new();
        let mut firsts = Vec::new();
        for spec in &specs {
            let shard = Arc::new(Shard::new(&shared, spec.as_ref())?);
            firsts.push(open_pubsub(&shared, &shard).await?);
            shards.push(shard);
        }
        for (shard, first) in shards.iter().zip(firsts) {
            shard.up.store(true, Ordering::Release);
            *shard.task.lock() = Some(tokio::spawn(run(shared.clone(), shard.clone(), Some(first), false)));
        }
        *shared.shards.lock() = Arc::new(shards);
        let topology = shared.config.is_cluster().then(|| tokio::spawn(topology(shared.clone(), specs)));
        Ok(RedisBackplane { shared: shared.clone(), _task: Arc::new(TaskGuard { shared, topology }) })
    }

    /// Current counters.
    pub fn stats(&self) -> RedisStats {
        let s = &self.shared;
        let shards = s.shards.lock().clone();
        RedisStats {
            pubsub_connected: !shards.is_empty() && shards.iter().all(|sh| sh.up.load(Ordering::Acquire)),
            commands_connected: s.link.is_up(),
            channels: shards.iter().map(|sh| sh.channels.load(Ordering::Relaxed)).sum(),
            subscriptions: s.registry.lock().count,
            pubsub_reconnects: s.pubsub_reconnects.load(Ordering::Relaxed),
            command_reconnects: s.link.reconnects(),
            dropped: s.dropped.load(Ordering::Relaxed),
            probe_failures: s.probe_failures.load(Ordering::Relaxed),
            shards: shards.len(),
            topology_changes: s.topology_changes.load(Ordering::Relaxed),
        }
    }

    /// The Redis channel a topic is published on.
    pub fn channel(&self, topic: &str) -> String {
        self.shared.config.channel(topic)
    }
}

impl Backplane for RedisBackplane {
    fn publish(&self, topic: &str, message: Bytes) -> BoxFuture<'static, Result<()>> {
        let channel = self.shared.config.channel(topic);
        let command = publish_command(&self.shared.config);
        let link = self.shared.link.clone();
        Box::pin(async move {
            link.run("publish", move |mut conn| async move {
                ::redis::cmd(command).arg(channel).arg(message.as_ref()).query_async::<i64>(&mut conn).await
            })
            .await
            .map(|_receivers| ())
        })
    }

    fn subscribe(&self, topic: &str) -> BoxFuture<'static, Result<Subscription>> {
        let shared = self.shared.clone();
        let task = self._task.clone();
        let shard = match shared.shard_for(topic) {
            Some(shard) if shard.up.load(Ordering::Acquire) => shard,
            Some(_) => {
                let err = Error::msg(ErrorKind::Backplane, "redis pub/sub connection is down (reconnecting)");
                return Box::pin(async move { Err(err) });
            }
            None => {
                shared.refresh.notify_one();
                let err = Error::msg(ErrorKind::Backplane, "no redis cluster master serves this topic's slot");
                return Box::pin(async move { Err(err) });
            }
        };
        let queue = Arc::new(Queue::new(shared.config.subscription_capacity));
        let (tx, rx) = oneshot::channel();
        let id = {
            let mut reg = shared.registry.lock();
            reg.next_id += 1;
            reg.count += 1;
            let id = reg.next_id;
            let entry = Entry { id, queue: queue.clone(), active: false, waiter: Some(tx) };
            reg.topics.entry(topic.to_owned()).or_default().push(entry);
            id
        };
        // From here on, dropping `guard` (an error below, or the caller
        // dropping this future) unregisters.
        let guard = Unregister { shared: shared.clone(), topic: topic.to_owned(), id };
        shard.mark(topic);
        let timeout = shared.config.command_timeout;
        Box::pin(async move {
            match tokio::time::timeout(timeout, rx).await {
                Ok(Ok(())) => Ok(Subscription::new(SubStream { queue, _guard: guard, _task: task })),
                Ok(Err(_)) => Err(Error::msg(ErrorKind::Backplane, "redis pub/sub connection lost while subscribing")),
                Err(_) => {
                    Err(Error::msg(ErrorKind::Backplane, format!("redis subscribe not confirmed within {timeout:?}")))
                }
            }
        })
    }
}

fn publish_command(config: &RedisConfig) -> &'static str {
    if config.is_cluster() {
        "SPUBLISH"
    } else {
        "PUBLISH"
    }
}

impl Shared {
    /// The shard that owns `topic`'s channel now (`None`: no master serves
    /// its slot).
    fn shard_for(&self, topic: &str) -> Option<Arc<Shard>> {
        let shards = self.shards.lock().clone();
        if !self.config.is_cluster() {
            return shards.first().cloned();
        }
        let slot = super::slot(self.config.channel(topic).as_bytes());
        shards.iter().find(|s| s.owns_slot(slot)).cloned()
    }

    /// Activates the entries `ids` of `topic` (their subscription is
    /// confirmed) and resolves their `subscribe` calls.
    fn activate(reg: &mut Registry, topic: &str, ids: &[u64]) {
        if let Some(entries) = reg.topics.get_mut(topic) {
            for entry in entries.iter_mut().filter(|e| ids.contains(&e.id)) {
                entry.active = true;
                if let Some(w) = entry.waiter.take() {
                    let _ = w.send(());
                }
            }
        }
    }
}

impl Shard {
    /// A shard owning `slots` (`None`: everything), not yet connected.
    fn new(shared: &Shared, slots: Option<&ShardSpec>) -> Result<Shard> {
        let config = &shared.config;
        let id = crate::util::random_u64();
        let (client, slots, probe_channel) = match slots {
            None => (shared.client.clone(), None, format!("{}$probe:{id:016x}", config.prefix)),
            Some(spec) => {
                // The seed's settings (credentials, database), the master's
                // address, RESP3 (sharded messages arrive as pushes).
                let info = shared.client.get_connection_info().clone();
                let redis = info.redis_settings().clone().set_protocol(ProtocolVersion::RESP3);
                let info =
                    info.set_addr(::redis::ConnectionAddr::Tcp(spec.host.clone(), spec.port)).set_redis_settings(redis);
                let client = Client::open(info).map_err(|e| Error::with_source(ErrorKind::Config, e))?;
                // A probe channel in a slot of this shard.
                let probe = (0u32..)
                    .map(|n| format!("{}$probe:{id:016x}:{{{n}}}", config.prefix))
                    .find(|c| spec.owns(super::slot(c.as_bytes())))
                    .unwrap_or_default();
                (client, Some(spec.slots.clone()), probe)
            }
        };
        Ok(Shard {
            client,
            slots,
            marks: Mutex::new(HashSet::new()),
            wake: Notify::new(),
            up: AtomicBool::new(false),
            probe_channel,
            channels: AtomicUsize::new(0),
            task: Mutex::new(None),
        })
    }

    fn owns_slot(&self, slot: u16) -> bool {
        self.slots.as_ref().is_none_or(|ranges| ranges.iter().any(|(a, b)| (*a..=*b).contains(&slot)))
    }

    fn owns(&self, config: &RedisConfig, topic: &str) -> bool {
        self.slots.is_none() || self.owns_slot(super::slot(config.channel(topic).as_bytes()))
    }

    fn sharded(&self) -> bool {
        self.slots.is_some()
    }

    fn mark(&self, topic: &str) {
        self.marks.lock().insert(topic.to_owned());
        self.wake.notify_one();
    }

    fn stop(&self) {
        if let Some(task) = self.task.lock().take() {
            task.abort();
        }
    }

    /// Hands a message read from the pub/sub connection to the live
    /// subscriptions of its topic.
    fn dispatch(&self, shared: &Shared, msg: &Msg, probe: &mut Probe) {
        let channel = msg.get_channel_name();
        if channel == self.probe_channel {
            probe.received(msg.get_payload_bytes());
            return;
        }
        let Some(topic) = shared.config.topic(channel) else { return };
        let reg = shared.registry.lock();
        let Some(entries) = reg.topics.get(topic) else { return };
        let bytes = Bytes::copy_from_slice(msg.get_payload_bytes());
        for entry in entries.iter().filter(|e| e.active) {
            if !entry.queue.push(bytes.clone()) {
                shared.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// After the pub/sub connection was lost: pending `subscribe` calls of
    /// this shard's topics fail (their entries go when the calls drop them).
    fn connection_lost(&self, shared: &Shared) {
        self.up.store(false, Ordering::Release);
        self.channels.store(0, Ordering::Relaxed);
        let mut reg = shared.registry.lock();
        for (topic, entries) in reg.topics.iter_mut() {
            if self.owns(&shared.config, topic) {
                for entry in entries {
                    entry.waiter = None;
                }
            }
        }
    }
}

/// Removes a subscription from the registry when it is dropped, and marks
/// its topic so the channel is unsubscribed if it was the last.
struct Unregister {
    shared: Arc<Shared>,
    topic: String,
    id: u64,
}

impl Drop for Unregister {
    fn drop(&mut self) {
        let mut reg = self.shared.registry.lock();
        if let Some(entries) = reg.topics.get_mut(&self.topic) {
            let before = entries.len();
            entries.retain(|e| e.id != self.id);
            let removed = before - entries.len();
            if entries.is_empty() {
                reg.topics.remove(&self.topic);
            }
            reg.count -= removed;
        }
        drop(reg);
        if let Some(shard) = self.shared.shard_for(&self.topic) {
            shard.mark(&self.topic);
        }
    }
}

// ---------------------------------------------------------------------------
// Per-subscription queues.

enum Item {
    Message(Bytes),
    /// Messages were lost here: `lost` dropped on overflow, and/or the
    /// connection was re-established.
    Gap {
        lost: u64,
        reconnected: bool,
    },
}

/// A bounded queue: at most `capacity` messages, plus gap markers between
/// them (consecutive gaps merge, so there are at most `capacity + 1`).
struct Queue {
    state: Mutex<QueueState>,
    waker: AtomicWaker,
    capacity: usize,
}

struct QueueState {
    items: VecDeque<Item>,
    messages: usize,
}

impl Queue {
    fn new(capacity: usize) -> Queue {
        Queue {
            state: Mutex::new(QueueState { items: VecDeque::new(), messages: 0 }),
            waker: AtomicWaker::new(),
            capacity: capacity.max(1),
        }
    }

    /// Queues a message; `false` when it was dropped (queue full).
    fn push(&self, message: Bytes) -> bool {
        let mut st = self.state.lock();
        let queued = if st.messages < self.capacity {
            st.items.push_back(Item::Message(message));
            st.messages += 1;
            true
        } else {
            st.gap(1, false);
            false
        };
        drop(st);
        self.waker.wake();
        queued
    }

    fn push_reconnected(&self) {
        self.state.lock().gap(0, true);
        self.waker.wake();
    }

    fn poll_next(&self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes>>> {
        // Register first, then look: a push after the look wakes us.
        self.waker.register(cx.waker());
        let mut st = self.state.lock();
        match st.items.pop_front() {
            Some(Item::Message(m)) => {
                st.messages -= 1;
                Poll::Ready(Some(Ok(m)))
            }
            Some(Item::Gap { lost, reconnected }) => {
                let text = match (lost, reconnected) {
                    (0, _) => "reconnected to redis: messages may have been lost".to_owned(),
                    (n, false) => format!("subscriber lagged: {n} messages dropped"),
                    (n, true) => format!(
                        "subscriber lagged: {n} messages dropped; reconnected to redis: messages may have been lost"
                    ),
                };
                Poll::Ready(Some(Err(Error::msg(ErrorKind::Backplane, text))))
            }
            None => Poll::Pending,
        }
    }
}

impl QueueState {
    fn gap(&mut self, lost: u64, reconnected: bool) {
        if let Some(Item::Gap { lost: l, reconnected: r }) = self.items.back_mut() {
            *l += lost;
            *r |= reconnected;
        } else {
            self.items.push_back(Item::Gap { lost, reconnected });
        }
    }
}

struct SubStream {
    queue: Arc<Queue>,
    _guard: Unregister,
    _task: Arc<TaskGuard>,
}

impl Stream for SubStream {
    type Item = Result<Bytes>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.queue.poll_next(cx)
    }
}

// ---------------------------------------------------------------------------
// The pub/sub connections.

/// A pub/sub connection: classic (a single Redis) or sharded (a RESP3
/// connection to one cluster master, messages as pushes).
enum PubConn {
    Classic(PubSubSink, PubSubStream),
    /// The pushes arrive through a bounded queue of [`PUSH_QUEUE`]; when
    /// the reader falls that far behind, the flag is raised and the
    /// connection is treated as lost (reopened, with a gap on every
    /// subscription), as Redis itself drops a pub/sub client whose output
    /// buffer overflows: never a silent loss, never unbounded memory.
    Sharded(MultiplexedConnection, mpsc::Receiver<PushInfo>, Arc<AtomicBool>),
}

/// Pushes a sharded pub/sub connection may hold before its reader takes
/// them; one more and the connection is dropped (see [`PubConn::Sharded`]).
const PUSH_QUEUE: usize = 4096;

/// What a pub/sub connection delivers.
enum Event {
    Message(Msg),
    /// The server unsubscribed this channel (a `sunsubscribe` push: ours,
    /// or one the server sent because the slot moved).
    Unsubscribed(String),
    /// A reply or confirmation, nothing to do.
    Other,
}

impl PubConn {
    /// The next event; `None` when the connection is gone.
    async fn next(&mut self) -> Option<Event> {
        match self {
            PubConn::Classic(_, stream) => stream.next().await.map(Event::Message),
            PubConn::Sharded(_, rx, overflowed) => {
                if overflowed.load(Ordering::Acquire) {
                    return None;
                }
                rx.recv().await.and_then(sharded_event)
            }
        }
    }

    /// An event already received, without waiting.
    fn try_next(&mut self) -> Option<Event> {
        match self {
            PubConn::Classic(_, stream) => stream.next().now_or_never().flatten().map(Event::Message),
            PubConn::Sharded(_, _, overflowed) if overflowed.load(Ordering::Acquire) => None,
            PubConn::Sharded(_, rx, _) => rx.try_recv().ok().and_then(sharded_event),
        }
    }

    /// Subscribes (or unsubscribes) `channels`; resolves once the server
    /// confirmed them all.
    fn command(&self, subscribe: bool, channels: Vec<String>, timeout: std::time::Duration) -> SubFuture {
        match self {
            PubConn::Classic(sink, _) => {
                let mut s = sink.clone();
                Box::pin(async move {
                    if subscribe {
                        with_timeout(timeout, s.subscribe(channels)).await
                    } else {
                        with_timeout(timeout, s.unsubscribe(channels)).await
                    }
                })
            }
            PubConn::Sharded(conn, ..) => {
                // One channel per command: each is answered by exactly one
                // confirmation (which redis-rs takes for the reply), and a
                // command's channels would have to share a slot. Pipelined.
                let name = if subscribe { "SSUBSCRIBE" } else { "SUNSUBSCRIBE" };
                let commands: Vec<_> = channels
                    .into_iter()
                    .map(|channel| {
                        let mut c = conn.clone();
                        async move { ::redis::cmd(name).arg(channel).query_async::<Value>(&mut c).await.map(|_| ()) }
                    })
                    .collect();
                Box::pin(async move {
                    with_timeout(timeout, async move {
                        futures::future::join_all(commands).await.into_iter().collect::<RedisResult<()>>()
                    })
                    .await
                })
            }
        }
    }

    /// `PING` on the connection: whether it answered within `timeout`.
    fn ping(&self, timeout: std::time::Duration) -> BoxFuture<'static, bool> {
        match self {
            PubConn::Classic(sink, _) => {
                let mut s = sink.clone();
                Box::pin(async move { matches!(tokio::time::timeout(timeout, s.ping::<Value>()).await, Ok(Ok(_))) })
            }
            PubConn::Sharded(conn, ..) => {
                let mut c = conn.clone();
                Box::pin(async move {
                    let ping = async move { ::redis::cmd("PING").query_async::<Value>(&mut c).await };
                    matches!(tokio::time::timeout(timeout, ping).await, Ok(Ok(_)))
                })
            }
        }
    }
}

fn sharded_event(push: PushInfo) -> Option<Event> {
    match push.kind {
        PushKind::Disconnection => None,
        PushKind::SMessage | PushKind::Message => Some(Msg::from_push_info(push).map_or(Event::Other, Event::Message)),
        PushKind::SUnsubscribe => Some(match push.data.first() {
            Some(Value::BulkString(b)) => Event::Unsubscribed(String::from_utf8_lossy(b).into_owned()),
            _ => Event::Other,
        }),
        _ => Some(Event::Other),
    }
}

type SubFuture = BoxFuture<'static, RedisResult<()>>;

/// Opens a shard's pub/sub connection and subscribes its probe channel.
async fn open_pubsub(shared: &Shared, shard: &Shard) -> Result<PubConn> {
    let config = &shared.config;
    let conn = if shard.sharded() {
        let (tx, rx) = mpsc::channel(PUSH_QUEUE);
        let overflowed = Arc::new(AtomicBool::new(false));
        let flag = overflowed.clone();
        let push = move |info: PushInfo| {
            tx.try_send(info).inspect_err(|e| {
                if matches!(e, mpsc::error::TrySendError::Full(_)) {
                    flag.store(true, Ordering::Release);
                }
            })
        };
        let cfg = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(config.connect_timeout))
            .set_response_timeout(Some(config.command_timeout))
            .set_push_sender(push);
        let open = shard.client.get_multiplexed_async_connection_with_config(&cfg);
        match tokio::time::timeout(config.connect_timeout + config.command_timeout, open).await {
            Ok(Ok(c)) => PubConn::Sharded(c, rx, overflowed),
            Ok(Err(e)) => return Err(link::redis_error("pub/sub connect", e)),
            Err(_) => return Err(Error::msg(ErrorKind::Backplane, "redis pub/sub connect: timed out")),
        }
    } else {
        match tokio::time::timeout(config.connect_timeout, shard.client.get_async_pubsub()).await {
            Ok(Ok(p)) => {
                let (sink, stream) = p.split();
                PubConn::Classic(sink, stream)
            }
            Ok(Err(e)) => return Err(link::redis_error("pub/sub connect", e)),
            Err(_) => return Err(Error::msg(ErrorKind::Backplane, "redis pub/sub connect: timed out")),
        }
    };
    match conn.command(true, vec![shard.probe_channel.clone()], config.command_timeout).await {
        Ok(()) => Ok(conn),
        Err(e) => Err(link::redis_error("subscribe", e)),
    }
}

/// A shard's subscriber task: runs its pub/sub connection, and replaces it
/// when it is lost. `first` is an open connection to start with; without
/// one the task connects at once.
async fn run(shared: Arc<Shared>, shard: Arc<Shard>, first: Option<PubConn>, mut reconnected: bool) {
    let mut next = first;
    let mut attempt = 0u32;
    let mut fresh = next.is_none();
    loop {
        let conn = match next.take() {
            Some(conn) => conn,
            None => {
                if !fresh {
                    tokio::time::sleep(link::backoff(&shared.config, attempt)).await;
                    attempt = attempt.saturating_add(1);
                }
                fresh = false;
                match open_pubsub(&shared, &shard).await {
                    Ok(conn) => conn,
                    Err(e) => {
                        tracing::debug!(attempt, error = %e, "redis pub/sub reconnect failed");
                        // The master may have been replaced (a failover):
                        // look at the slot map.
                        shared.refresh.notify_one();
                        continue;
                    }
                }
            }
        };
        let end = session(&shared, &shard, conn, reconnected).await;
        shard.connection_lost(&shared);
        if end.topology {
            shared.refresh.notify_one();
        }
        // The command connection most likely broke too: find out now, not
        // on the next publish.
        let link = shared.link.clone();
        tokio::spawn(async move { link.ping().await });
        if end.was_up {
            attempt = 0;
        }
        reconnected = true;
        tracing::warn!(reason = %end.why, "redis pub/sub connection lost; reconnecting");
    }
}

/// Resolves with `f`'s output, or never when there is no `f`.
async fn maybe<F: Future + Unpin>(f: &mut Option<F>) -> F::Output {
    match f {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

/// A `SUBSCRIBE` or `UNSUBSCRIBE` the task is waiting on.
enum Op {
    /// The topics, with the entries each confirmation activates.
    Subscribe(Vec<(String, Vec<u64>)>),
    Unsubscribe(Vec<String>),
}

/// The liveness probe's state.
#[derive(Default)]
struct Probe {
    /// The token in flight.
    token: Option<u64>,
    /// When it is overdue.
    deadline: Option<Pin<Box<Sleep>>>,
}

impl Probe {
    fn received(&mut self, payload: &[u8]) {
        if self.token.is_some_and(|t| payload == t.to_string().as_bytes()) {
            self.token = None;
            self.deadline = None;
        }
    }
}

/// Why a session ended.
struct End {
    why: String,
    /// It got as far as resubscribing.
    was_up: bool,
    /// The cluster's slot map must be looked at again.
    topology: bool,
}

impl End {
    fn lost(why: impl Into<String>) -> End {
        End { why: why.into(), was_up: true, topology: false }
    }
}

/// Whether a refused (un)subscribe says the slot is not this node's.
fn is_redirect(e: &::redis::RedisError) -> bool {
    e.redirect_node().is_some() || matches!(e.code(), Some("MOVED" | "ASK" | "CLUSTERDOWN"))
}

/// Runs one pub/sub connection until it is lost: brings the new connection
/// in step with the registry ([`resubscribe`]), then serves it ([`Live`]).
async fn session(shared: &Arc<Shared>, shard: &Arc<Shard>, mut conn: PubConn, reconnected: bool) -> End {
    match resubscribe(shared, shard, &mut conn, reconnected).await {
        Ok(server) => Live::new(shared, shard, conn, server).run().await,
        Err(end) => end,
    }
}

/// The start of a session: subscribes every topic of this shard with
/// subscriptions, queues the gap notices of a reconnect ahead of the new
/// connection's messages, activates the waiting subscriptions and marks the
/// shard up. Returns the topics the server now has.
async fn resubscribe(
    shared: &Arc<Shared>,
    shard: &Arc<Shard>,
    conn: &mut PubConn,
    reconnected: bool,
) -> std::result::Result<HashSet<String>, End> {
    let config = &shared.config;
    let mut server: HashSet<String> = HashSet::new();
    if reconnected {
        shared.link.refresh(config.connect_timeout + config.command_timeout).await;
    }

    // Subscribe every topic of this shard with subscriptions.
    let snapshot: Vec<(String, Vec<u64>)> = {
        let reg = shared.registry.lock();
        reg.topics
            .iter()
            .filter(|(t, _)| shard.owns(config, t))
            .map(|(t, entries)| (t.clone(), entries.iter().map(|e| e.id).collect()))
            .collect()
    };
    if !snapshot.is_empty() {
        let channels: Vec<String> = snapshot.iter().map(|(t, _)| config.channel(t)).collect();
        // One reply per channel: allow time in proportion.
        let timeout = config.command_timeout.saturating_mul(1 + (channels.len() / 1000) as u32);
        if let Err(e) = conn.command(true, channels, timeout).await {
            return Err(End { why: format!("resubscribe failed: {e}"), was_up: false, topology: is_redirect(&e) });
        }
        server.extend(snapshot.iter().map(|(t, _)| t.clone()));
    }
    shard.channels.store(server.len(), Ordering::Relaxed);
    if reconnected {
        shared.pubsub_reconnects.fetch_add(1, Ordering::Relaxed);
        tracing::info!(channels = server.len(), "redis pub/sub connection re-established");
    }
    {
        // The gap notice goes ahead of the new connection's messages (those
        // wait in redis-rs's channel until this task reads them).
        let mut reg = shared.registry.lock();
        for (topic, ids) in &snapshot {
            if let Some(entries) = reg.topics.get(topic) {
                for entry in entries.iter().filter(|e| e.active && ids.contains(&e.id)) {
                    entry.queue.push_reconnected();
                }
            }
            Shared::activate(&mut reg, topic, ids);
        }
    }
    shard.up.store(true, Ordering::Release);
    Ok(server)
}

/// A session's connection once it is up, and everything it waits on: the
/// server's messages, the one (un)subscribe in flight, the shard's wake-up
/// (new marks), and the liveness probe (tick, probe publish, `PING`
/// fallback, deadline). Each wake-up has a handler of its own; a handler
/// that returns an [`End`] ends the session.
struct Live<'a> {
    shared: &'a Arc<Shared>,
    shard: &'a Arc<Shard>,
    conn: PubConn,
    /// The topics the server has subscribed on this connection.
    server: HashSet<String>,
    /// The (un)subscribe in flight: what it is, and its confirmation.
    inflight_op: Option<Op>,
    inflight: Option<SubFuture>,
    probe: Probe,
    /// The probe's publish on the command connection.
    probe_publish: Option<BoxFuture<'static, Result<i64>>>,
    /// A `PING` on this connection, when the command connection is down.
    probe_ping: Option<BoxFuture<'static, bool>>,
    tick: tokio::time::Interval,
}

impl<'a> Live<'a> {
    fn new(shared: &'a Arc<Shared>, shard: &'a Arc<Shard>, conn: PubConn, server: HashSet<String>) -> Live<'a> {
        let every = shared.config.probe_interval;
        let mut tick = tokio::time::interval_at(Instant::now() + every, every);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        Live {
            shared,
            shard,
            conn,
            server,
            inflight_op: None,
            inflight: None,
            probe: Probe::default(),
            probe_publish: None,
            probe_ping: None,
            tick,
        }
    }

    async fn run(mut self) -> End {
        loop {
            if self.inflight.is_none() {
                if let Some((op, fut)) = next_command(self.shared, self.shard, &self.server, &self.conn) {
                    self.inflight_op = Some(op);
                    self.inflight = Some(fut);
                }
            }
            // Biased: messages first, so every message the server sent
            // before a command's confirmation is dispatched before the
            // confirmation is handled (redis-rs queues messages before it
            // completes replies). The handlers run after the select has
            // dropped its futures, so each may take `self` whole.
            let end = tokio::select! {
                biased;
                event = self.conn.next() => self.on_event(event),
                result = maybe(&mut self.inflight) => self.on_command_done(result),
                () = self.shard.wake.notified() => None,
                _ = self.tick.tick() => self.on_tick(),
                result = maybe(&mut self.probe_publish) => self.on_probe_published(result),
                alive = maybe(&mut self.probe_ping) => self.on_probe_ping(alive),
                () = maybe(&mut self.probe.deadline) => {
                    Some(self.probe_failed(format!("probe: not delivered within {:?}", self.shared.config.probe_timeout)))
                }
            };
            if let Some(end) = end {
                return end;
            }
        }
    }

    /// A message, or an unsubscribe the server sent on its own (the slot
    /// moved), or the connection's end.
    fn on_event(&mut self, event: Option<Event>) -> Option<End> {
        match event {
            Some(Event::Message(msg)) => self.shard.dispatch(self.shared, &msg, &mut self.probe),
            Some(Event::Unsubscribed(channel)) => {
                let config = &self.shared.config;
                let ours = matches!(&self.inflight_op, Some(Op::Unsubscribe(topics))
                    if config.topic(&channel).is_some_and(|t| topics.iter().any(|x| x == t)));
                if !ours {
                    // The slot moved to another master.
                    return Some(End {
                        why: format!("redis unsubscribed {channel} (its slot moved)"),
                        was_up: true,
                        topology: true,
                    });
                }
            }
            Some(Event::Other) => {}
            None => return Some(End::lost("connection closed")),
        }
        None
    }

    /// The (un)subscribe in flight answered: on success the registry and
    /// `server` follow; a refusal fails the waiting subscribe calls; a
    /// redirect or a lost connection ends the session.
    fn on_command_done(&mut self, result: RedisResult<()>) -> Option<End> {
        self.inflight = None;
        let op = self.inflight_op.take()?;
        if let Err(e) = result {
            if is_redirect(&e) {
                return Some(End { why: format!("(un)subscribe redirected: {e}"), was_up: true, topology: true });
            }
            // A timeout is classified by its kind (`with_timeout` makes an
            // `io::ErrorKind::TimedOut`), never by its text.
            if is_connection_error(&e) {
                return Some(End::lost(format!("(un)subscribe failed: {e}")));
            }
            // Refused by the server (an ACL, say): the waiting subscribe
            // calls fail; the connection is fine.
            tracing::warn!(error = %e, "redis refused a (un)subscribe");
            if let Op::Subscribe(topics) = &op {
                let mut reg = self.shared.registry.lock();
                for (topic, ids) in topics {
                    for entry in reg.topics.get_mut(topic).into_iter().flatten() {
                        if ids.contains(&entry.id) {
                            entry.waiter = None;
                        }
                    }
                }
            }
            return None;
        }
        // Dispatch what arrived before the confirmation first.
        while let Some(event) = self.conn.try_next() {
            if let Event::Message(msg) = event {
                self.shard.dispatch(self.shared, &msg, &mut self.probe);
            }
        }
        match op {
            Op::Subscribe(topics) => {
                let mut reg = self.shared.registry.lock();
                for (topic, ids) in &topics {
                    self.server.insert(topic.clone());
                    Shared::activate(&mut reg, topic, ids);
                }
            }
            Op::Unsubscribe(topics) => {
                for topic in &topics {
                    self.server.remove(topic);
                }
            }
        }
        self.shard.channels.store(self.server.len(), Ordering::Relaxed);
        None
    }

    /// Every `probe_interval`: unless a probe is under way, publish a fresh
    /// token on the shard's probe channel (through the command connection)
    /// and arm its deadline; the token must come back on this connection.
    fn on_tick(&mut self) -> Option<End> {
        if self.probe.token.is_some() || self.probe_publish.is_some() || self.probe_ping.is_some() {
            return None;
        }
        let config = &self.shared.config;
        let token = crate::util::random_u64();
        self.probe.token = Some(token);
        self.probe.deadline = Some(Box::pin(tokio::time::sleep(config.probe_timeout)));
        let channel = self.shard.probe_channel.clone();
        let link = self.shared.link.clone();
        let command = publish_command(config);
        self.probe_publish = Some(Box::pin(async move {
            link.run("probe", move |mut conn| async move {
                ::redis::cmd(command).arg(channel).arg(token.to_string()).query_async::<i64>(&mut conn).await
            })
            .await
        }));
        None
    }

    /// The probe's publish answered with the number of receivers: none
    /// means Redis no longer has this connection subscribed; a failed
    /// publish (the command connection is down) proves nothing, so ask this
    /// connection with a `PING` instead.
    fn on_probe_published(&mut self, result: Result<i64>) -> Option<End> {
        self.probe_publish = None;
        match result {
            Ok(0) => Some(self.probe_failed("probe: redis has no subscriber for this connection's probe channel")),
            Ok(_) => None,
            Err(_) => {
                self.probe = Probe::default();
                self.probe_ping = Some(self.conn.ping(self.shared.config.probe_timeout));
                None
            }
        }
    }

    fn on_probe_ping(&mut self, alive: bool) -> Option<End> {
        self.probe_ping = None;
        (!alive).then(|| self.probe_failed("probe: no answer to PING"))
    }

    /// The probe found the connection dead: counted, and the session ends.
    fn probe_failed(&self, why: impl Into<String>) -> End {
        self.shared.probe_failures.fetch_add(1, Ordering::Relaxed);
        End::lost(why)
    }
}

/// Looks at the shard's marked topics and builds the next command that
/// brings the server in step, if any. Unsubscribes wait for the next round
/// when there is something to subscribe.
fn next_command(shared: &Shared, shard: &Shard, server: &HashSet<String>, conn: &PubConn) -> Option<(Op, SubFuture)> {
    let marks = std::mem::take(&mut *shard.marks.lock());
    if marks.is_empty() {
        return None;
    }
    let config = &shared.config;
    let mut subscribe = Vec::new();
    let mut unsubscribe = Vec::new();
    {
        let reg = shared.registry.lock();
        for topic in marks {
            match reg.topics.get(&topic) {
                Some(entries) => {
                    let pending: Vec<u64> = entries.iter().filter(|e| !e.active).map(|e| e.id).collect();
                    if !pending.is_empty() || !server.contains(&topic) {
                        subscribe.push((topic, pending));
                    }
                }
                None if server.contains(&topic) => unsubscribe.push(topic),
                None => {}
            }
        }
    }
    let timeout = config.command_timeout;
    if !subscribe.is_empty() {
        if !unsubscribe.is_empty() {
            shard.marks.lock().extend(unsubscribe);
        }
        let channels: Vec<String> = subscribe.iter().map(|(t, _)| config.channel(t)).collect();
        Some((Op::Subscribe(subscribe), conn.command(true, channels, timeout)))
    } else if !unsubscribe.is_empty() {
        let channels: Vec<String> = unsubscribe.iter().map(|t| config.channel(t)).collect();
        Some((Op::Unsubscribe(unsubscribe), conn.command(false, channels, timeout)))
    } else {
        None
    }
}

async fn with_timeout(timeout: std::time::Duration, f: impl Future<Output = RedisResult<()>>) -> RedisResult<()> {
    match tokio::time::timeout(timeout, f).await {
        Ok(r) => r,
        Err(_) => Err(::redis::RedisError::from(std::io::Error::new(std::io::ErrorKind::TimedOut, "timed out"))),
    }
}

// ---------------------------------------------------------------------------
// The cluster's slot map.

/// A master and the slots it serves.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ShardSpec {
    host: String,
    port: u16,
    /// Inclusive ranges, sorted.
    slots: Vec<(u16, u16)>,
}

impl ShardSpec {
    fn owns(&self, slot: u16) -> bool {
        self.slots.iter().any(|(a, b)| (*a..=*b).contains(&slot))
    }
}

/// Reads the slot map (`CLUSTER SLOTS`) over the command link: one spec per
/// master, sorted by address.
async fn cluster_slots(link: &Arc<Link>) -> Result<Vec<Option<ShardSpec>>> {
    let reply: Value =
        link.run("cluster slots", |mut conn| async move {
            ::redis::cmd("CLUSTER").arg("SLOTS").query_async(&mut conn).await
        })
        .await?;
    let bad = || Error::msg(ErrorKind::Backplane, format!("redis: unexpected CLUSTER SLOTS reply: {reply:?}"));
    let Value::Array(ranges) = &reply else { return Err(bad()) };
    let mut masters: HashMap<(String, u16), Vec<(u16, u16)>> = HashMap::new();
    for range in ranges {
        let Value::Array(parts) = range else { return Err(bad()) };
        let (Some(Value::Int(start)), Some(Value::Int(end)), Some(Value::Array(master))) =
            (parts.first(), parts.get(1), parts.get(2))
        else {
            return Err(bad());
        };
        let host = match master.first() {
            Some(Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
            Some(Value::SimpleString(s)) => s.clone(),
            _ => return Err(bad()),
        };
        let Some(Value::Int(port)) = master.get(1) else { return Err(bad()) };
        let (start, end, port) = (
            u16::try_from(*start).map_err(|_| bad())?,
            u16::try_from(*end).map_err(|_| bad())?,
            u16::try_from(*port).map_err(|_| bad())?,
        );
        masters.entry((host, port)).or_default().push((start, end));
    }
    if masters.is_empty() {
        return Err(Error::msg(ErrorKind::Backplane, "redis cluster: no slot is served"));
    }
    let mut specs: Vec<ShardSpec> = masters
        .into_iter()
        .map(|((host, port), mut slots)| {
            slots.sort_unstable();
            ShardSpec { host, port, slots }
        })
        .collect();
    specs.sort_by(|a, b| (&a.host, a.port).cmp(&(&b.host, b.port)));
    Ok(specs.into_iter().map(Some).collect())
}

/// The topology task (cluster only): when asked, reads the slot map and,
/// when it changed, replaces every shard. Checks at most once per
/// [`RedisConfig::reconnect_min`].
async fn topology(shared: Arc<Shared>, mut current: Vec<Option<ShardSpec>>) {
    loop {
        shared.refresh.notified().await;
        tokio::time::sleep(shared.config.reconnect_min).await;
        let specs = match cluster_slots(&shared.link).await {
            Ok(specs) => specs,
            Err(e) => {
                tracing::debug!(error = %e, "redis cluster: reading the slot map failed");
                continue;
            }
        };
        if specs == current {
            continue;
        }
        let mut shards = Vec::new();
        for spec in &specs {
            match Shard::new(&shared, spec.as_ref()) {
                Ok(shard) => shards.push(Arc::new(shard)),
                Err(e) => {
                    tracing::warn!(error = %e, "redis cluster: a master's address is unusable");
                    shards.clear();
                    break;
                }
            }
        }
        if shards.is_empty() {
            continue;
        }
        tracing::info!(masters = shards.len(), "redis cluster: the slot map changed; resubscribing");
        shared.topology_changes.fetch_add(1, Ordering::Relaxed);
        let old = std::mem::replace(&mut *shared.shards.lock(), Arc::new(shards.clone()));
        // The new shards subscribe every topic with subscriptions (pending
        // ones included: their subscribe calls resolve then) and report the
        // gap on the live ones.
        for shard in old.iter() {
            shard.stop();
        }
        for shard in &shards {
            *shard.task.lock() = Some(tokio::spawn(run(shared.clone(), shard.clone(), None, true)));
        }
        current = specs;
    }
}
