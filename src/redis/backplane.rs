//! [`RedisBackplane`]: the [`Backplane`] on Redis pub/sub.
//!
//! Two connections per handle (and its clones):
//!
//! - the **command link** ([`super::link`]): publishes (and the liveness
//!   probe's publishes), pipelined on one multiplexed connection;
//! - the **pub/sub connection**, owned by one task (the *subscriber task*),
//!   which subscribes and unsubscribes channels, reads every message and
//!   hands it to the subscriptions of its topic.
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
//! Subscribing and dropping only *mark* a topic and wake the task (a set of
//! marks, bounded by the number of topics); the task brings the server in
//! step, one command at a time, so a subscribe racing an unsubscribe of the
//! same channel cannot leave them out of step.
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
//! When the pub/sub connection ends (Redis restarted, the connection was
//! killed) or the probe finds it dead, the task reconnects with capped
//! exponential backoff and jitter, subscribes every channel that still has
//! subscriptions in one command, and then queues an `Err` ("reconnected:
//! messages may have been lost") in every subscription that was live, ahead
//! of the messages of the new connection. While it is down, `subscribe`
//! fails at once.
//!
//! The probe: every [`RedisConfig::probe_interval`] the task publishes a
//! random token (over the command link) to a channel only this handle
//! subscribes to. If Redis says nobody is subscribed to it, or the token
//! does not come back within [`RedisConfig::probe_timeout`], the
//! subscription is dead although the socket looks open (a half-open
//! connection, a proxy or a network that dropped it): the connection is
//! replaced. When the command link is down the probe cannot publish, and
//! falls back to a `PING` on the pub/sub connection.

use super::link::{self, is_connection_error, Link};
use super::RedisConfig;
use crate::backplane::{Backplane, Subscription};
use crate::error::{Error, ErrorKind, Result};
use ::redis::aio::{PubSubSink, PubSubStream};
use ::redis::{Client, Msg, RedisResult};
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
use tokio::sync::{oneshot, Notify};
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior, Sleep};

/// A [`Backplane`] on Redis pub/sub. See the [module docs](super) and
/// `docs/redis.md`.
///
/// Cheap to clone: clones share the connections. Give each hub its own
/// `RedisBackplane` (two hubs in one process may share one; they are told
/// apart by their node ids).
///
/// Publishing to a topic publishes to the Redis channel
/// [`RedisConfig::prefix`] + topic.
#[derive(Clone)]
pub struct RedisBackplane {
    shared: Arc<Shared>,
    _task: Arc<TaskGuard>,
}

/// Counters of a [`RedisBackplane`], for observability and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct RedisStats {
    /// Whether the pub/sub connection is up and subscribed.
    pub pubsub_connected: bool,
    /// Whether the command (publish) connection is up.
    pub commands_connected: bool,
    /// Channels subscribed on the server (topics; the probe channel is not
    /// counted).
    pub channels: usize,
    /// Live [`Subscription`]s.
    pub subscriptions: usize,
    /// Times the pub/sub connection was re-established.
    pub pubsub_reconnects: u64,
    /// Times the command connection was re-established.
    pub command_reconnects: u64,
    /// Messages dropped because a subscription's queue was full.
    pub dropped: u64,
    /// Times the liveness probe found the pub/sub connection dead.
    pub probe_failures: u64,
}

struct Shared {
    config: RedisConfig,
    client: Client,
    link: Arc<Link>,
    /// Held only for in-memory work, never across an await.
    registry: Mutex<Registry>,
    /// Topics whose server subscription must be looked at.
    marks: Mutex<HashSet<String>>,
    wake: Notify,
    /// The pub/sub connection is up and resubscribed.
    up: AtomicBool,
    probe_channel: String,
    channels: AtomicUsize,
    pubsub_reconnects: AtomicU64,
    dropped: AtomicU64,
    probe_failures: AtomicU64,
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

/// Aborts the subscriber task when the last handle and subscription are gone.
struct TaskGuard(Mutex<Option<JoinHandle<()>>>);

impl Drop for TaskGuard {
    fn drop(&mut self) {
        if let Some(task) = self.0.lock().take() {
            task.abort();
        }
    }
}

impl fmt::Debug for RedisBackplane {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisBackplane")
            .field("url", &self.shared.config.url)
            .field("prefix", &self.shared.config.prefix)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl RedisBackplane {
    /// Connects to Redis (the command connection and the pub/sub
    /// connection). Fails when Redis cannot be reached now; once connected,
    /// later losses are repaired in the background.
    pub async fn connect(config: RedisConfig) -> Result<RedisBackplane> {
        let link = Link::connect(&config).await?;
        let client = config.client()?;
        let probe_channel = format!("{}$probe:{:016x}", config.prefix, crate::hub::random_u64());
        let shared = Arc::new(Shared {
            config,
            client,
            link,
            registry: Mutex::new(Registry::default()),
            marks: Mutex::new(HashSet::new()),
            wake: Notify::new(),
            up: AtomicBool::new(false),
            probe_channel,
            channels: AtomicUsize::new(0),
            pubsub_reconnects: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            probe_failures: AtomicU64::new(0),
        });
        let first = open_pubsub(&shared).await?;
        shared.up.store(true, Ordering::Release);
        let task = tokio::spawn(run(shared.clone(), first));
        Ok(RedisBackplane { shared, _task: Arc::new(TaskGuard(Mutex::new(Some(task)))) })
    }

    /// Current counters.
    pub fn stats(&self) -> RedisStats {
        let s = &self.shared;
        RedisStats {
            pubsub_connected: s.up.load(Ordering::Acquire),
            commands_connected: s.link.is_up(),
            channels: s.channels.load(Ordering::Relaxed),
            subscriptions: s.registry.lock().count,
            pubsub_reconnects: s.pubsub_reconnects.load(Ordering::Relaxed),
            command_reconnects: s.link.reconnects(),
            dropped: s.dropped.load(Ordering::Relaxed),
            probe_failures: s.probe_failures.load(Ordering::Relaxed),
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
        let link = self.shared.link.clone();
        Box::pin(async move {
            link.run("publish", move |mut conn| async move {
                ::redis::cmd("PUBLISH").arg(channel).arg(message.as_ref()).query_async::<i64>(&mut conn).await
            })
            .await
            .map(|_receivers| ())
        })
    }

    fn subscribe(&self, topic: &str) -> BoxFuture<'static, Result<Subscription>> {
        let shared = self.shared.clone();
        let task = self._task.clone();
        if !shared.up.load(Ordering::Acquire) {
            let err = Error::msg(ErrorKind::Backplane, "redis pub/sub connection is down (reconnecting)");
            return Box::pin(async move { Err(err) });
        }
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
        shared.mark(topic);
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

impl Shared {
    fn mark(&self, topic: &str) {
        self.marks.lock().insert(topic.to_owned());
        self.wake.notify_one();
    }

    /// Hands a message read from the pub/sub connection to the live
    /// subscriptions of its topic.
    fn dispatch(&self, msg: &Msg, probe: &mut Probe) {
        let channel = msg.get_channel_name();
        if channel == self.probe_channel {
            probe.received(msg.get_payload_bytes());
            return;
        }
        let Some(topic) = channel.strip_prefix(self.config.prefix.as_str()) else { return };
        let reg = self.registry.lock();
        let Some(entries) = reg.topics.get(topic) else { return };
        let bytes = Bytes::copy_from_slice(msg.get_payload_bytes());
        for entry in entries.iter().filter(|e| e.active) {
            if !entry.queue.push(bytes.clone()) {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// After the pub/sub connection was lost: pending `subscribe` calls fail
    /// (their entries go when the calls drop them).
    fn connection_lost(&self) {
        self.up.store(false, Ordering::Release);
        self.channels.store(0, Ordering::Relaxed);
        let mut reg = self.registry.lock();
        for entry in reg.topics.values_mut().flatten() {
            entry.waiter = None;
        }
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
        self.shared.mark(&self.topic);
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
// The subscriber task.

type PubSub = (PubSubSink, PubSubStream);

/// Opens a pub/sub connection and subscribes the probe channel.
async fn open_pubsub(shared: &Shared) -> Result<PubSub> {
    let config = &shared.config;
    let pubsub = match tokio::time::timeout(config.connect_timeout, shared.client.get_async_pubsub()).await {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => return Err(link::redis_error("pub/sub connect", e)),
        Err(_) => return Err(Error::msg(ErrorKind::Backplane, "redis pub/sub connect: timed out")),
    };
    let (mut sink, stream) = pubsub.split();
    match tokio::time::timeout(config.command_timeout, sink.subscribe(&shared.probe_channel)).await {
        Ok(Ok(())) => Ok((sink, stream)),
        Ok(Err(e)) => Err(link::redis_error("subscribe", e)),
        Err(_) => Err(Error::msg(ErrorKind::Backplane, "redis subscribe: timed out")),
    }
}

async fn run(shared: Arc<Shared>, first: PubSub) {
    let mut next = Some(first);
    let mut reconnected = false;
    let mut attempt = 0u32;
    loop {
        let conn = match next.take() {
            Some(conn) => conn,
            None => {
                tokio::time::sleep(link::backoff(&shared.config, attempt)).await;
                attempt = attempt.saturating_add(1);
                match open_pubsub(&shared).await {
                    Ok(conn) => conn,
                    Err(e) => {
                        tracing::debug!(attempt, error = %e, "redis pub/sub reconnect failed");
                        continue;
                    }
                }
            }
        };
        let (why, was_up) = session(&shared, conn, reconnected).await;
        shared.connection_lost();
        // The command connection most likely broke too: find out now, not
        // on the next publish.
        let link = shared.link.clone();
        tokio::spawn(async move { link.ping().await });
        if was_up {
            attempt = 0;
        }
        reconnected = true;
        tracing::warn!(reason = %why, "redis pub/sub connection lost; reconnecting");
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

type Command = (Op, BoxFuture<'static, RedisResult<()>>);

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

/// Runs one pub/sub connection until it is lost; returns why, and whether
/// it got as far as resubscribing.
async fn session(shared: &Arc<Shared>, (sink, mut stream): PubSub, reconnected: bool) -> (String, bool) {
    let config = &shared.config;
    let mut server: HashSet<String> = HashSet::new();
    if reconnected {
        shared.link.refresh(config.connect_timeout + config.command_timeout).await;
    }

    // Subscribe every topic with subscriptions, in one command.
    let snapshot: Vec<(String, Vec<u64>)> = {
        let reg = shared.registry.lock();
        reg.topics.iter().map(|(t, entries)| (t.clone(), entries.iter().map(|e| e.id).collect())).collect()
    };
    if !snapshot.is_empty() {
        let channels: Vec<String> = snapshot.iter().map(|(t, _)| config.channel(t)).collect();
        let mut s = sink.clone();
        // One reply per channel: allow time in proportion.
        let timeout = config.command_timeout.saturating_mul(1 + (channels.len() / 1000) as u32);
        match tokio::time::timeout(timeout, s.subscribe(&channels)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return (format!("resubscribe failed: {e}"), false),
            Err(_) => return ("resubscribe timed out".to_owned(), false),
        }
        server.extend(snapshot.iter().map(|(t, _)| t.clone()));
    }
    shared.channels.store(server.len(), Ordering::Relaxed);
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
    shared.up.store(true, Ordering::Release);

    let mut inflight_op: Option<Op> = None;
    let mut inflight: Option<BoxFuture<'static, RedisResult<()>>> = None;
    let mut probe = Probe::default();
    let mut probe_publish: Option<BoxFuture<'static, Result<i64>>> = None;
    let mut probe_ping: Option<BoxFuture<'static, bool>> = None;
    let mut tick = tokio::time::interval_at(Instant::now() + config.probe_interval, config.probe_interval);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);

    loop {
        if inflight.is_none() {
            if let Some((op, fut)) = next_command(shared, &server, &sink) {
                inflight_op = Some(op);
                inflight = Some(fut);
            }
        }
        // Biased: messages first, so every message the server sent before a
        // command's confirmation is dispatched before the confirmation is
        // handled (redis-rs queues messages before it completes replies).
        tokio::select! {
            biased;
            msg = stream.next() => match msg {
                Some(msg) => shared.dispatch(&msg, &mut probe),
                None => return ("connection closed".to_owned(), true),
            },
            result = maybe(&mut inflight) => {
                inflight = None;
                let Some(op) = inflight_op.take() else { continue };
                if let Err(e) = result {
                    if is_connection_error(&e) || e.to_string().contains("timed out") {
                        return (format!("(un)subscribe failed: {e}"), true);
                    }
                    // Refused by the server (an ACL, say): the waiting
                    // subscribe calls fail; the connection is fine.
                    tracing::warn!(error = %e, "redis refused a (un)subscribe");
                    if let Op::Subscribe(topics) = &op {
                        let mut reg = shared.registry.lock();
                        for (topic, ids) in topics {
                            for entry in reg.topics.get_mut(topic).into_iter().flatten() {
                                if ids.contains(&entry.id) {
                                    entry.waiter = None;
                                }
                            }
                        }
                    }
                    continue;
                }
                // Dispatch what arrived before the confirmation first.
                while let Some(Some(msg)) = stream.next().now_or_never() {
                    shared.dispatch(&msg, &mut probe);
                }
                match op {
                    Op::Subscribe(topics) => {
                        let mut reg = shared.registry.lock();
                        for (topic, ids) in &topics {
                            server.insert(topic.clone());
                            Shared::activate(&mut reg, topic, ids);
                        }
                    }
                    Op::Unsubscribe(topics) => {
                        for topic in &topics {
                            server.remove(topic);
                        }
                    }
                }
                shared.channels.store(server.len(), Ordering::Relaxed);
            },
            () = shared.wake.notified() => {}
            _ = tick.tick() => {
                if probe.token.is_none() && probe_publish.is_none() && probe_ping.is_none() {
                    let token = crate::hub::random_u64();
                    probe.token = Some(token);
                    probe.deadline = Some(Box::pin(tokio::time::sleep(config.probe_timeout)));
                    let channel = shared.probe_channel.clone();
                    let link = shared.link.clone();
                    probe_publish = Some(Box::pin(async move {
                        link.run("probe", move |mut conn| async move {
                            ::redis::cmd("PUBLISH").arg(channel).arg(token.to_string()).query_async::<i64>(&mut conn).await
                        })
                        .await
                    }));
                }
            },
            result = maybe(&mut probe_publish) => {
                probe_publish = None;
                match result {
                    Ok(0) => {
                        shared.probe_failures.fetch_add(1, Ordering::Relaxed);
                        return ("probe: redis has no subscriber for this connection's probe channel".to_owned(), true);
                    }
                    Ok(_) => {}
                    Err(_) => {
                        // The command link is down: the probe proves
                        // nothing; ask the pub/sub connection itself.
                        probe = Probe::default();
                        let mut s = sink.clone();
                        let timeout = config.probe_timeout;
                        probe_ping = Some(Box::pin(async move {
                            matches!(tokio::time::timeout(timeout, s.ping::<::redis::Value>()).await, Ok(Ok(_)))
                        }));
                    }
                }
            },
            alive = maybe(&mut probe_ping) => {
                probe_ping = None;
                if !alive {
                    shared.probe_failures.fetch_add(1, Ordering::Relaxed);
                    return ("probe: no answer to PING".to_owned(), true);
                }
            },
            () = maybe(&mut probe.deadline) => {
                shared.probe_failures.fetch_add(1, Ordering::Relaxed);
                return (format!("probe: not delivered within {:?}", config.probe_timeout), true);
            },
        }
    }
}

/// Looks at the marked topics and builds the next command that brings the
/// server in step, if any. Unsubscribes wait for the next round when there
/// is something to subscribe.
fn next_command(shared: &Shared, server: &HashSet<String>, sink: &PubSubSink) -> Option<Command> {
    let marks = std::mem::take(&mut *shared.marks.lock());
    if marks.is_empty() {
        return None;
    }
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
    let config = &shared.config;
    let timeout = config.command_timeout;
    let mut s = sink.clone();
    if !subscribe.is_empty() {
        if !unsubscribe.is_empty() {
            shared.marks.lock().extend(unsubscribe);
        }
        let channels: Vec<String> = subscribe.iter().map(|(t, _)| config.channel(t)).collect();
        let fut = async move { with_timeout(timeout, s.subscribe(channels)).await };
        Some((Op::Subscribe(subscribe), Box::pin(fut)))
    } else if !unsubscribe.is_empty() {
        let channels: Vec<String> = unsubscribe.iter().map(|t| config.channel(t)).collect();
        let fut = async move { with_timeout(timeout, s.unsubscribe(channels)).await };
        Some((Op::Unsubscribe(unsubscribe), Box::pin(fut)))
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
