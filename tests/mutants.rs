//! Tests of the tests: deliberately broken implementations of `Backplane`,
//! `HistoryStore`, `PresenceStore`, `SnapshotStore` and `Transport`, one plausible bug each (for
//! the stores and backplane, the bugs of issue 23, found in a real PostgreSQL
//! implementation), and a check that
//! the conformance suite fails every one of them **at the check meant for
//! it**. Every check of every suite is tripped by at least one mutant, so
//! none is dead weight. The table is in `docs/extending.md`.
//!
//! Each mutant wraps the shipped in-memory implementation with a simulated
//! connection that the suites' `cut_connection` hook can break. The same
//! wrapper without a bug passes every suite with every option, so each
//! mutant fails for its bug alone.

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::StreamExt;
use parking_lot::Mutex;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use switchboard::history::{Append, Appended, HistoryRead, HistoryStore, MemoryHistory, StreamPosition};
use switchboard::presence::{PresenceQuery, PresenceRecord, PresenceStore, PresenceStoreExt, StoreChange};
use switchboard::sync::{
    Append as SnapAppend, Appended as SnapAppended, ClientRecord, Loaded, MemorySnapshots, OpRecord, SnapshotStore,
};
use switchboard::testing::{BackplaneSuite, Failure, HistorySuite, PresenceStoreSuite, SnapshotSuite, TransportSuite};
use switchboard::transport::{Capabilities, CloseFrame, Frame, Transport, TransportError};
use switchboard::{
    backplane::Backplane, backplane::MemoryBackplane, backplane::Subscription, presence::MemoryPresence, Error,
    ErrorKind,
};
use tokio::sync::watch;

/// The bound of every mutant backplane's subscriptions (but `Unbounded`'s).
const CAPACITY: usize = 64;

fn cut(name: &str, len: usize) -> String {
    name[..name.len().min(len)].to_owned()
}

/// A suite run against one implementation.
type Run = BoxFuture<'static, Result<(), Failure>>;

/// Runs every mutant of a suite at once, then checks each failed at its
/// check and that every check of the suite was tripped.
async fn expect_caught<M: std::fmt::Debug>(mutants: Vec<(M, &'static str, Run)>, checks: &[&str]) {
    let (names, runs): (Vec<_>, Vec<_>) = mutants.into_iter().map(|(m, check, run)| ((m, check), run)).unzip();
    let results = futures::future::join_all(runs.into_iter().map(tokio::spawn)).await;
    let mut report = String::new();
    let mut ok = true;
    for ((mutant, want), result) in names.iter().zip(results) {
        let line = match result.expect("a suite panicked instead of returning its failure") {
            Ok(()) => {
                ok = false;
                format!("{mutant:?}: PASSED the suite (expected `{want}` to fail)")
            }
            Err(f) if f.check == *want => format!("{mutant:?}: caught by `{}`: {}", f.check, f.message),
            Err(f) => {
                ok = false;
                format!("{mutant:?}: caught by `{}` instead of `{want}`: {}", f.check, f.message)
            }
        };
        report.push_str(&line);
        report.push('\n');
    }
    println!("{report}");
    assert!(ok, "{report}");
    let tripped: HashSet<&str> = names.iter().map(|(_, c)| *c).collect();
    for check in checks {
        assert!(tripped.contains(check), "no mutant trips `{check}`: a check nothing tests");
    }
}

// ---------------------------------------------------------------------------
// Backplane

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BpBug {
    None,
    /// Payloads through `String::from_utf8_lossy` (a text column, a JSON string).
    Utf8Lossy,
    /// `subscribe` resolves at once; the engine subscription is made on the
    /// stream's first poll.
    LazySubscribe,
    /// `publish` hands the message to a task and returns (a retry loop, a
    /// pool): publishes overtake each other.
    Jitter,
    /// Topics cut to 20 bytes: every topic of the suite's tag collides.
    Truncate20,
    /// One engine subscription per topic per handle; a second `subscribe`
    /// takes it over and the first goes silent.
    OneSubPerTopic,
    /// Dropping any subscription unsubscribes the handle from the topic
    /// (UNLISTEN without a reference count).
    DropUnsubscribesAll,
    /// A new subscription starts with the last message the handle saw on
    /// the topic ("late joiners get the current state").
    Retained,
    /// Topics cut to 63 bytes (a PostgreSQL channel name).
    Truncate63,
    /// Every character but letters and digits escaped to `_`.
    EscapeSeparators,
    /// Drop reports filtered out of the stream.
    SwallowErrors,
    /// Declares a bound of 64 but buffers without limit.
    Unbounded,
    /// After a reconnect the subscription goes on as if nothing happened.
    SilentReconnect,
    /// After a cut the subscription neither reconnects nor ends.
    DeadAfterCut,
    /// Each message goes to the handle that subscribed first (a queue
    /// group, a consumer group), not to every node.
    QueueGroup,
}

/// A handle on a shared `MemoryBackplane`, with a connection of its own
/// that `cut` breaks (its subscriptions resubscribe after 20 ms).
#[derive(Clone)]
struct Bp {
    engine: MemoryBackplane,
    bug: BpBug,
    id: u64,
    conn: Arc<watch::Sender<u64>>,
    /// Per topic, the id of the newest subscription (`OneSubPerTopic`).
    newest: Arc<Mutex<HashMap<String, u64>>>,
    /// Per topic, "unsubscribed" for all the handle's subscriptions
    /// (`DropUnsubscribesAll`).
    kill: Arc<Mutex<HashMap<String, Arc<watch::Sender<bool>>>>>,
    /// Per topic, the last message seen (`Retained`).
    retained: Arc<Mutex<HashMap<String, Bytes>>>,
    /// Per topic, the handle that subscribed first (`QueueGroup`), shared.
    owner: Arc<Mutex<HashMap<String, u64>>>,
    next_sub: Arc<AtomicU64>,
}

impl std::fmt::Debug for Bp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Bp({:?}, handle {})", self.bug, self.id)
    }
}

fn backplane_pair(bug: BpBug) -> (Bp, Bp, impl Fn() -> BoxFuture<'static, ()> + Send + Sync + 'static) {
    let capacity = if bug == BpBug::Unbounded { 1 << 30 } else { CAPACITY };
    let engine = MemoryBackplane::with_capacity(capacity);
    let owner = Arc::new(Mutex::new(HashMap::new()));
    let handle = |id| Bp {
        engine: engine.clone(),
        bug,
        id,
        conn: Arc::new(watch::Sender::new(0)),
        newest: Arc::default(),
        kill: Arc::default(),
        retained: Arc::default(),
        owner: owner.clone(),
        next_sub: Arc::default(),
    };
    let (a, b) = (handle(1), handle(2));
    let conns = [a.conn.clone(), b.conn.clone()];
    let cut = move || -> BoxFuture<'static, ()> {
        for c in &conns {
            c.send_modify(|n| *n += 1);
        }
        Box::pin(async {})
    };
    (a, b, cut)
}

impl Bp {
    fn topic(&self, topic: &str) -> String {
        match self.bug {
            BpBug::Truncate20 => cut(topic, 20),
            BpBug::Truncate63 => cut(topic, 63),
            BpBug::EscapeSeparators => topic.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect(),
            _ => topic.to_owned(),
        }
    }
}

/// Sends `true` (unsubscribed) to the topic's other subscriptions when
/// dropped (`DropUnsubscribesAll`).
struct KillOnDrop(Option<Arc<watch::Sender<bool>>>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(k) = &self.0 {
            k.send_replace(true);
        }
    }
}

struct SubState {
    handle: Bp,
    topic: String,
    engine_topic: String,
    inner: Subscription,
    conn: watch::Receiver<u64>,
    kill: Option<watch::Receiver<bool>>,
    _kill_on_drop: KillOnDrop,
    id: u64,
    replay: Option<Bytes>,
}

async fn next_item(mut st: SubState) -> Option<(switchboard::Result<Bytes>, SubState)> {
    if let Some(m) = st.replay.take() {
        return Some((Ok(m), st));
    }
    loop {
        let killed = async {
            match &mut st.kill {
                Some(k) => {
                    let _ = k.wait_for(|killed| *killed).await;
                }
                None => futures::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            () = killed => return None,
            Ok(()) = st.conn.changed() => {
                // The connection broke: what was in flight is gone.
                tokio::time::sleep(Duration::from_millis(20)).await;
                st.inner = st.handle.engine.subscribe(&st.engine_topic).await.ok()?;
                match st.handle.bug {
                    BpBug::SilentReconnect => continue,
                    BpBug::DeadAfterCut => futures::future::pending::<()>().await,
                    _ => {
                        let err = Error::with_source(ErrorKind::Backplane, "reconnected: messages may be missing");
                        return Some((Err(err), st));
                    }
                }
            }
            item = st.inner.next() => {
                let item = item?;
                let bug = st.handle.bug;
                match &item {
                    Err(_) if bug == BpBug::SwallowErrors => continue,
                    Ok(_) if bug == BpBug::OneSubPerTopic && st.handle.newest.lock().get(&st.topic) != Some(&st.id) => {
                        continue
                    }
                    Ok(m) if bug == BpBug::Utf8Lossy => {
                        let text = String::from_utf8_lossy(m).into_owned();
                        return Some((Ok(Bytes::from(text)), st));
                    }
                    Ok(m) if bug == BpBug::Retained => {
                        st.handle.retained.lock().insert(st.topic.clone(), m.clone());
                    }
                    _ => {}
                }
                return Some((item, st));
            }
        }
    }
}

impl Backplane for Bp {
    fn publish(&self, topic: &str, message: Bytes) -> BoxFuture<'static, switchboard::Result<()>> {
        let mut engine_topic = self.topic(topic);
        if self.bug == BpBug::QueueGroup {
            let Some(owner) = self.owner.lock().get(&engine_topic).copied() else { return Box::pin(async { Ok(()) }) };
            engine_topic = format!("{engine_topic}#{owner}");
        }
        let engine = self.engine.clone();
        if self.bug == BpBug::Jitter {
            let n = self.next_sub.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(async move {
                for _ in 0..n * 7 % 5 {
                    tokio::task::yield_now().await;
                }
                let _ = engine.publish(&engine_topic, message).await;
            });
            return Box::pin(async { Ok(()) });
        }
        engine.publish(&engine_topic, message)
    }

    fn subscribe(&self, topic: &str) -> BoxFuture<'static, switchboard::Result<Subscription>> {
        let mut engine_topic = self.topic(topic);
        let engine = self.engine.clone();
        match self.bug {
            BpBug::LazySubscribe => {
                let stream = futures::stream::once(async move { engine.subscribe(&engine_topic).await })
                    .map(|sub| sub.expect("memory subscribe"))
                    .flatten();
                return Box::pin(async move { Ok(Subscription::new(stream)) });
            }
            BpBug::QueueGroup => {
                self.owner.lock().entry(engine_topic.clone()).or_insert(self.id);
                engine_topic = format!("{engine_topic}#{}", self.id);
            }
            _ => {}
        }
        let id = self.next_sub.fetch_add(1, Ordering::Relaxed);
        self.newest.lock().insert(topic.to_owned(), id);
        let (kill, kill_on_drop) = if self.bug == BpBug::DropUnsubscribesAll {
            let mut map = self.kill.lock();
            let sender = map.entry(topic.to_owned()).or_insert_with(|| Arc::new(watch::Sender::new(false)));
            if *sender.borrow() {
                *sender = Arc::new(watch::Sender::new(false));
            }
            (Some(sender.subscribe()), KillOnDrop(Some(sender.clone())))
        } else {
            (None, KillOnDrop(None))
        };
        let replay = if self.bug == BpBug::Retained { self.retained.lock().get(topic).cloned() } else { None };
        let (handle, topic) = (self.clone(), topic.to_owned());
        let mut conn = self.conn.subscribe();
        conn.mark_unchanged();
        let inner = engine.subscribe(&engine_topic);
        Box::pin(async move {
            let inner = inner.await?;
            let st =
                SubState { handle, topic, engine_topic, inner, conn, kill, _kill_on_drop: kill_on_drop, id, replay };
            Ok(Subscription::new(futures::stream::unfold(st, next_item)))
        })
    }
}

fn backplane_run(bug: BpBug) -> Run {
    let (a, b, cut) = backplane_pair(bug);
    Box::pin(BackplaneSuite::new(a, b).subscription_capacity(CAPACITY).cut_connection(cut).run())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_unbroken_backplane_wrapper_passes() {
    backplane_run(BpBug::None).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_backplane_mutant_fails_its_check() {
    use BpBug::*;
    let table = [
        (Utf8Lossy, "backplane.delivery"),
        (LazySubscribe, "backplane.delivery"),
        (Jitter, "backplane.order"),
        (Truncate20, "backplane.isolation"),
        (OneSubPerTopic, "backplane.fan_out"),
        (DropUnsubscribesAll, "backplane.drop_one"),
        (Retained, "backplane.no_replay"),
        (Truncate63, "backplane.topics"),
        (EscapeSeparators, "backplane.topics"),
        (SwallowErrors, "backplane.gap_reported"),
        (Unbounded, "backplane.bounded"),
        (SilentReconnect, "backplane.lost_connection"),
        (DeadAfterCut, "backplane.lost_connection"),
        (QueueGroup, "backplane.hubs"),
    ];
    let mutants = table.into_iter().map(|(bug, check)| (bug, check, backplane_run(bug))).collect();
    expect_caught(mutants, BackplaneSuite::<Bp>::CHECKS).await;
}

// ---------------------------------------------------------------------------
// A simulated connection for the stores: after a cut, calls fail with the
// store's error kind for 200 ms (or for good), as while reconnecting.

#[derive(Debug, Default)]
struct Conn {
    broken_until: Mutex<Option<tokio::time::Instant>>,
    dead: AtomicBool,
}

impl Conn {
    fn cut(&self, for_good: bool) {
        *self.broken_until.lock() = Some(tokio::time::Instant::now() + Duration::from_millis(200));
        self.dead.store(for_good, Ordering::Relaxed);
    }

    fn check(&self, kind: ErrorKind) -> switchboard::Result<()> {
        let broken = self.dead.load(Ordering::Relaxed)
            || self.broken_until.lock().is_some_and(|until| tokio::time::Instant::now() < until);
        if broken {
            return Err(Error::with_source(kind, "connection lost, reconnecting"));
        }
        Ok(())
    }
}

fn cut_hook(conns: Vec<Arc<Conn>>, for_good: bool) -> impl Fn() -> BoxFuture<'static, ()> + Send + Sync + 'static {
    move || -> BoxFuture<'static, ()> {
        for c in &conns {
            c.cut(for_good);
        }
        Box::pin(async {})
    }
}

// ---------------------------------------------------------------------------
// History store

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HBug {
    None,
    /// A 0-based counter.
    OffsetFromZero,
    /// Room names cut to 20 bytes: the suite's rooms share one stream.
    RoomCut20,
    /// An epoch of a UUID and a timestamp and a node name: over 64 bytes.
    LongEpoch,
    /// `SELECT max(offset)`, then `INSERT offset + 1`, without a lock; one
    /// connection serializes its own appends, two race.
    ReadThenWrite,
    /// A pool checkout (an `.await`) before the append is queued.
    LazyStart,
    /// `offset >= since` instead of `>`.
    InclusiveRead,
    /// `complete` ignores the limit.
    LimitComplete,
    /// The position's epoch is not compared.
    IgnoresEpoch,
    /// The position bound as `i64`: above `i64::MAX` it wraps negative.
    I64Wrap,
    /// `since: None` always reported complete.
    NoneAlwaysComplete,
    /// Trims to `max_len + 1`.
    KeepsOneMore,
    /// Age applied when appending only, never by reads.
    AgeOnlyOnAppend,
    /// The idempotency key is not stored.
    IgnoresKey,
    /// Looks the key up, then appends: two retries racing both store.
    CheckThenAppend,
    /// Room names cut to 64 bytes (a `varchar(64)` key).
    RoomCut64,
    /// A read of a room without a stream makes up an epoch and stores
    /// nothing.
    ReadDoesNotCreate,
    /// Never reconnects after a cut.
    NoReconnect,
}

const LONG_SUFFIX: &str = "-2026-12-03T08:00:00.000000000Z-node-eu-west-1a-7f3c";

#[derive(Clone)]
struct Hs {
    store: MemoryHistory,
    bug: HBug,
    conn: Arc<Conn>,
    /// One connection runs one statement sequence at a time.
    serial: Arc<tokio::sync::Mutex<()>>,
    /// `CheckThenAppend`'s key table, shared by the handles.
    keys: Arc<Mutex<HashMap<(String, String), Appended>>>,
    started: Arc<AtomicU64>,
}

impl std::fmt::Debug for Hs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Hs({:?})", self.bug)
    }
}

impl Hs {
    fn room(&self, room: &str) -> String {
        match self.bug {
            HBug::RoomCut20 => cut(room, 20),
            HBug::RoomCut64 => cut(room, 64),
            _ => room.to_owned(),
        }
    }
}

fn history_run(bug: HBug) -> Run {
    let store = MemoryHistory::new();
    let keys = Arc::new(Mutex::new(HashMap::new()));
    let handle = || Hs {
        store: store.clone(),
        bug,
        conn: Arc::default(),
        serial: Arc::default(),
        keys: keys.clone(),
        started: Arc::default(),
    };
    let (a, b) = (handle(), handle());
    let cut = cut_hook(vec![a.conn.clone(), b.conn.clone()], bug == HBug::NoReconnect);
    Box::pin(HistorySuite::new(a, b).cut_connection(cut).run())
}

impl HistoryStore for Hs {
    fn append(&self, room: &str, mut append: Append) -> BoxFuture<'static, switchboard::Result<Appended>> {
        let (this, room) = (self.clone(), self.room(room));
        match self.bug {
            HBug::KeepsOneMore => append.retention.max_len += 1,
            HBug::AgeOnlyOnAppend => append.retention.max_age = Duration::from_secs(365 * 24 * 3600),
            HBug::IgnoresKey => append.idempotency_key = None,
            _ => {}
        }
        let n = self.started.fetch_add(1, Ordering::Relaxed);
        Box::pin(async move {
            this.conn.check(ErrorKind::History)?;
            let mut done = match this.bug {
                HBug::LazyStart => {
                    // A checkout that takes 0 to 4 polls: a later append
                    // can be queued first.
                    for _ in 0..n * 7 % 5 {
                        tokio::task::yield_now().await;
                    }
                    this.store.append(&room, append).await?
                }
                HBug::ReadThenWrite => {
                    let _connection = this.serial.lock().await;
                    let top = this.store.read(&room, None, 0).await?.top.offset;
                    tokio::task::yield_now().await;
                    let mut done = this.store.append(&room, append).await?;
                    done.position.offset = top + 1;
                    done
                }
                HBug::CheckThenAppend => match append.idempotency_key.take() {
                    None => this.store.append(&room, append).await?,
                    Some(key) => {
                        let found = this.keys.lock().get(&(room.clone(), key.clone())).cloned();
                        if let Some(found) = found {
                            return Ok(Appended { duplicate: true, ..found });
                        }
                        tokio::time::sleep(Duration::from_millis(1)).await;
                        let done = this.store.append(&room, append).await?;
                        this.keys.lock().insert((room, key), done.clone());
                        done
                    }
                },
                _ => this.store.append(&room, append).await?,
            };
            match this.bug {
                HBug::OffsetFromZero => done.position.offset -= 1,
                HBug::LongEpoch => done.position.epoch = format!("{}{LONG_SUFFIX}", done.position.epoch).into(),
                _ => {}
            }
            Ok(done)
        })
    }

    fn read(
        &self,
        room: &str,
        mut since: Option<StreamPosition>,
        limit: usize,
    ) -> BoxFuture<'static, switchboard::Result<HistoryRead>> {
        let (this, room) = (self.clone(), self.room(room));
        Box::pin(async move {
            this.conn.check(ErrorKind::History)?;
            if let Some(pos) = &mut since {
                match this.bug {
                    HBug::LongEpoch => {
                        if let Some(e) = pos.epoch.strip_suffix(LONG_SUFFIX) {
                            pos.epoch = e.into();
                        }
                    }
                    HBug::InclusiveRead => pos.offset = pos.offset.saturating_sub(1),
                    HBug::IgnoresEpoch => pos.epoch = this.store.read(&room, None, 0).await?.top.epoch,
                    HBug::I64Wrap if (pos.offset as i64) < 0 => pos.offset = 0,
                    _ => {}
                }
            }
            let asked = since.clone();
            let mut read = this.store.read(&room, since, limit).await?;
            match this.bug {
                HBug::LimitComplete => {
                    read.complete |= asked.is_some_and(|p| p.epoch == read.top.epoch && p.offset <= read.top.offset)
                }
                HBug::NoneAlwaysComplete if asked.is_none() => read.complete = true,
                HBug::LongEpoch => read.top.epoch = format!("{}{LONG_SUFFIX}", read.top.epoch).into(),
                HBug::ReadDoesNotCreate if read.top.offset == 0 => {
                    read.top.epoch = format!("{:x}", this.started.fetch_add(1, Ordering::Relaxed) + 0xfeed).into()
                }
                _ => {}
            }
            Ok(read)
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_unbroken_history_wrapper_passes() {
    history_run(HBug::None).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_history_mutant_fails_its_check() {
    use HBug::*;
    let table = [
        (OffsetFromZero, "history.first_offset"),
        (RoomCut20, "history.rooms"),
        (LongEpoch, "history.epoch"),
        (ReadThenWrite, "history.concurrent_offsets"),
        (LazyStart, "history.start_order"),
        (InclusiveRead, "history.read_after"),
        (LimitComplete, "history.limit"),
        (IgnoresEpoch, "history.foreign_position"),
        (I64Wrap, "history.u64_offsets"),
        (NoneAlwaysComplete, "history.since_none"),
        (KeepsOneMore, "history.max_len"),
        (AgeOnlyOnAppend, "history.max_age"),
        (IgnoresKey, "history.idempotency"),
        (CheckThenAppend, "history.concurrent_retries"),
        (RoomCut64, "history.room_names"),
        (ReadDoesNotCreate, "history.fresh_read"),
        (NoReconnect, "history.lost_connection"),
    ];
    let mutants = table.into_iter().map(|(bug, check)| (bug, check, history_run(bug))).collect();
    expect_caught(mutants, HistorySuite::<Hs>::CHECKS).await;
}

// ---------------------------------------------------------------------------
// Presence store

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PBug {
    None,
    /// Listing by key returns nothing (the key index is never written).
    NoKeyIndex,
    /// Each handle answers from what it wrote itself (a local cache).
    LocalCache,
    /// `INSERT … ON CONFLICT DO NOTHING`: a rewrite changes nothing.
    InsertIfAbsent,
    /// `LIKE 'room%'`: a room or key lists its prefixed neighbours too.
    PrefixMatch,
    /// A remove matches the connection id on any node.
    RemoveIgnoresNode,
    /// A batch as two statements: every remove, then every put.
    RemovesFirst,
    /// Rooms and keys cut to 64 bytes (a `varchar(64)`).
    CutNames,
    /// The room's records as one value: read, change, write back.
    RoomBlob,
    /// Lists ignore the expiry.
    NeverExpires,
    /// Never reconnects after a cut.
    NoReconnect,
}

#[derive(Clone)]
struct Ps {
    store: MemoryPresence,
    bug: PBug,
    conn: Arc<Conn>,
    /// Every room and key ever written (`PrefixMatch`), shared.
    names: Arc<Mutex<(BTreeSet<String>, BTreeSet<String>)>>,
}

impl std::fmt::Debug for Ps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Ps({:?})", self.bug)
    }
}

fn presence_run(bug: PBug) -> Run {
    let store = MemoryPresence::new();
    let names = Arc::default();
    let handle = || Ps {
        store: if bug == PBug::LocalCache { MemoryPresence::new() } else { store.clone() },
        bug,
        conn: Arc::default(),
        names: Arc::clone(&names),
    };
    let (a, b) = (handle(), handle());
    let cut = cut_hook(vec![a.conn.clone(), b.conn.clone()], bug == PBug::NoReconnect);
    Box::pin(PresenceStoreSuite::new(a, b).cut_connection(cut).run())
}

fn id(r: &PresenceRecord) -> (String, u64, u64) {
    (r.room.clone(), r.node, r.connection)
}

impl Ps {
    async fn write_changes(&self, changes: Vec<StoreChange>, ttl: Duration) -> switchboard::Result<()> {
        let store = &self.store;
        match self.bug {
            PBug::InsertIfAbsent => {
                for change in changes {
                    if let StoreChange::Put(r) = &change {
                        if store.list_room(&r.room).await?.iter().any(|x| id(x) == id(r)) {
                            continue;
                        }
                    }
                    store.write(vec![change], ttl).await?;
                }
                Ok(())
            }
            PBug::RemoveIgnoresNode => {
                for change in changes {
                    match change {
                        StoreChange::Remove { room, connection, .. } => {
                            for r in store.list_room(&room).await?.into_iter().filter(|r| r.connection == connection) {
                                store.remove(&room, r.node, r.connection).await?;
                            }
                        }
                        put => store.write(vec![put], ttl).await?,
                    }
                }
                Ok(())
            }
            PBug::RemovesFirst => {
                let (removes, puts): (Vec<_>, Vec<_>) =
                    changes.into_iter().partition(|c| matches!(c, StoreChange::Remove { .. }));
                store.write(removes, ttl).await?;
                store.write(puts, ttl).await
            }
            PBug::RoomBlob => {
                for change in changes {
                    let StoreChange::Put(r) = change else {
                        store.write(vec![change], ttl).await?;
                        continue;
                    };
                    let blob = store.list_room(&r.room).await?;
                    tokio::task::yield_now().await;
                    // Write the blob back: what was read, with the change.
                    let now = store.list_room(&r.room).await?;
                    let mut writes: Vec<StoreChange> = now
                        .iter()
                        .filter(|x| !blob.contains(x))
                        .map(|x| StoreChange::Remove { room: x.room.clone(), node: x.node, connection: x.connection })
                        .collect();
                    writes.extend(blob.into_iter().filter(|x| id(x) != id(&r)).map(StoreChange::Put));
                    writes.push(StoreChange::Put(r));
                    store.write(writes, ttl).await?;
                }
                Ok(())
            }
            PBug::NeverExpires => store.write(changes, Duration::from_secs(365 * 24 * 3600)).await,
            _ => store.write(changes, ttl).await,
        }
    }
}

impl PresenceStore for Ps {
    fn write(&self, mut changes: Vec<StoreChange>, ttl: Duration) -> BoxFuture<'static, switchboard::Result<()>> {
        if self.bug == PBug::CutNames {
            for change in &mut changes {
                match change {
                    StoreChange::Put(r) => {
                        r.room = cut(&r.room, 64);
                        r.key = cut(&r.key, 64);
                    }
                    StoreChange::Remove { room, .. } => *room = cut(room, 64),
                    _ => {}
                }
            }
        }
        let mut names = self.names.lock();
        for change in &changes {
            if let StoreChange::Put(r) = change {
                names.0.insert(r.room.clone());
                names.1.insert(r.key.clone());
            }
        }
        drop(names);
        let this = self.clone();
        Box::pin(async move {
            this.conn.check(ErrorKind::Presence)?;
            this.write_changes(changes, ttl).await
        })
    }

    fn list(&self, query: PresenceQuery) -> BoxFuture<'static, switchboard::Result<Vec<PresenceRecord>>> {
        let this = self.clone();
        Box::pin(async move {
            this.conn.check(ErrorKind::Presence)?;
            match (this.bug, query) {
                (PBug::NoKeyIndex, PresenceQuery::Key(_)) => Ok(Vec::new()),
                (PBug::CutNames, PresenceQuery::Room(room)) => this.store.list_room(&cut(&room, 64)).await,
                (PBug::CutNames, PresenceQuery::Key(key)) => this.store.list_key(&cut(&key, 64)).await,
                (PBug::PrefixMatch, query) => {
                    let (rooms, keys) = this.names.lock().clone();
                    let mut out = Vec::new();
                    match query {
                        PresenceQuery::Room(room) => {
                            for r in rooms.iter().filter(|r| r.starts_with(&room)) {
                                out.extend(this.store.list_room(r).await?);
                            }
                        }
                        PresenceQuery::Key(key) => {
                            for k in keys.iter().filter(|k| k.starts_with(&key)) {
                                out.extend(this.store.list_key(k).await?);
                            }
                        }
                        _ => unreachable!("two kinds of query"),
                    }
                    Ok(out)
                }
                (_, query) => this.store.list(query).await,
            }
        })
    }
}

#[tokio::test(start_paused = true)]
async fn the_unbroken_presence_wrapper_passes() {
    presence_run(PBug::None).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn every_presence_mutant_fails_its_check() {
    use PBug::*;
    let table = [
        (NoKeyIndex, "presence_store.write_read"),
        (LocalCache, "presence_store.two_handles"),
        (InsertIfAbsent, "presence_store.replace"),
        (PrefixMatch, "presence_store.isolation"),
        (RemoveIgnoresNode, "presence_store.remove"),
        (RemovesFirst, "presence_store.batch_order"),
        (CutNames, "presence_store.names"),
        (RoomBlob, "presence_store.concurrent_writes"),
        (NeverExpires, "presence_store.expiry"),
        (NoReconnect, "presence_store.lost_connection"),
    ];
    let mutants = table.into_iter().map(|(bug, check)| (bug, check, presence_run(bug))).collect();
    expect_caught(mutants, PresenceStoreSuite::<Ps>::CHECKS).await;
}

// ---------------------------------------------------------------------------
// Snapshot store (synced rooms)

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SBug {
    None,
    /// A load of a room with no row is an error (`fetch_one`), not empty.
    UnknownRoomFails,
    /// The compare-and-append does not compare the version: it appends at
    /// whatever the room's version is.
    NoCompare,
    /// The client record keeps the client's first op (`INSERT … ON
    /// CONFLICT DO NOTHING`): it forgets the last seq.
    ForgetsSeq,
    /// `version >= since` instead of `>`.
    InclusiveSince,
    /// A load ignores the snapshot and returns the ops it has (a partial
    /// list once older ones are trimmed).
    IgnoresSnapshot,
    /// Reads the version, then writes in a second statement: one connection
    /// serializes its own appends, two race.
    ReadThenWrite,
    /// Room names cut to 64 bytes (a `varchar(64)` key).
    RoomCut64,
    /// Never reconnects after a cut.
    NoReconnect,
}

#[derive(Clone)]
struct Ss {
    store: MemorySnapshots,
    bug: SBug,
    conn: Arc<Conn>,
    /// One connection runs one statement sequence at a time.
    serial: Arc<tokio::sync::Mutex<()>>,
    /// `ForgetsSeq`'s client table (the first record of each client), shared.
    firsts: Arc<Mutex<HashMap<(String, String), ClientRecord>>>,
}

impl std::fmt::Debug for Ss {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Ss({:?})", self.bug)
    }
}

fn snapshot_run(bug: SBug) -> Run {
    let store = MemorySnapshots::new().retain(4);
    let firsts = Arc::default();
    let handle =
        || Ss { store: store.clone(), bug, conn: Arc::default(), serial: Arc::default(), firsts: Arc::clone(&firsts) };
    let (a, b) = (handle(), handle());
    let cut = cut_hook(vec![a.conn.clone(), b.conn.clone()], bug == SBug::NoReconnect);
    Box::pin(SnapshotSuite::new(a, b).cut_connection(cut).run())
}

impl Ss {
    fn room(&self, room: &str) -> String {
        match self.bug {
            SBug::RoomCut64 => cut(room, 64),
            _ => room.to_owned(),
        }
    }
}

impl SnapshotStore for Ss {
    fn load<'a>(&'a self, room: &'a str, since: Option<u64>) -> BoxFuture<'a, switchboard::Result<Loaded>> {
        Box::pin(async move {
            self.conn.check(ErrorKind::History)?;
            let room = self.room(room);
            let since = match self.bug {
                SBug::InclusiveSince => since.map(|s| s.saturating_sub(1)),
                _ => since,
            };
            let mut loaded = self.store.load(&room, since).await?;
            match self.bug {
                SBug::UnknownRoomFails if loaded.version == 0 => {
                    return Err(Error::with_source(ErrorKind::History, "no rows returned"))
                }
                SBug::IgnoresSnapshot => loaded.snapshot = None,
                _ => {}
            }
            Ok(loaded)
        })
    }

    fn append<'a>(&'a self, room: &'a str, mut append: SnapAppend) -> BoxFuture<'a, switchboard::Result<SnapAppended>> {
        Box::pin(async move {
            self.conn.check(ErrorKind::History)?;
            let room = self.room(room);
            match self.bug {
                SBug::NoCompare => {
                    append.expected = self.store.load(&room, Some(u64::MAX)).await?.version;
                    self.store.append(&room, append).await
                }
                SBug::ReadThenWrite => {
                    let _connection = self.serial.lock().await;
                    let version = self.store.load(&room, Some(u64::MAX)).await?.version;
                    if version != append.expected {
                        return Ok(SnapAppended::Conflict { version });
                    }
                    // The round trip to the second statement.
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    append.expected = self.store.load(&room, Some(u64::MAX)).await?.version;
                    self.store.append(&room, append).await
                }
                SBug::ForgetsSeq => {
                    let key = (room.clone(), append.record.client.clone());
                    let first = self.firsts.lock().get(&key).cloned();
                    if let Some(first) = first.filter(|f| f.seq >= append.record.seq) {
                        return Ok(SnapAppended::Duplicate(first));
                    }
                    // The store's own record is keyed apart, so only this
                    // table decides what is a duplicate.
                    let record = OpRecord { client: format!("{}@{}", key.1, append.expected), ..append.record.clone() };
                    let done = self.store.append(&room, SnapAppend { record, ..append.clone() }).await?;
                    if done == SnapAppended::Done {
                        let rec = ClientRecord {
                            seq: append.record.seq,
                            version: append.expected + 1,
                            user: append.record.user,
                        };
                        self.firsts.lock().entry(key).or_insert(rec);
                    }
                    Ok(done)
                }
                _ => self.store.append(&room, append).await,
            }
        })
    }

    fn client<'a>(
        &'a self,
        room: &'a str,
        client: &'a str,
    ) -> BoxFuture<'a, switchboard::Result<Option<ClientRecord>>> {
        Box::pin(async move {
            self.conn.check(ErrorKind::History)?;
            let room = self.room(room);
            match self.bug {
                SBug::ForgetsSeq => Ok(self.firsts.lock().get(&(room, client.to_owned())).cloned()),
                _ => self.store.client(&room, client).await,
            }
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_unbroken_snapshot_store_wrapper_passes() {
    snapshot_run(SBug::None).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_snapshot_store_mutant_fails_its_check() {
    use SBug::*;
    let table = [
        (UnknownRoomFails, "snapshot_store.empty"),
        (NoCompare, "snapshot_store.compare_and_append"),
        (ForgetsSeq, "snapshot_store.duplicate"),
        (InclusiveSince, "snapshot_store.load_since"),
        (IgnoresSnapshot, "snapshot_store.snapshot"),
        (ReadThenWrite, "snapshot_store.concurrent_appends"),
        (RoomCut64, "snapshot_store.room_names"),
        (NoReconnect, "snapshot_store.lost_connection"),
    ];
    let mutants = table.into_iter().map(|(bug, check)| (bug, check, snapshot_run(bug))).collect();
    expect_caught(mutants, SnapshotSuite::<Ss>::CHECKS).await;
}

// ---------------------------------------------------------------------------
// Transport

/// The inbound limit every mutant transport declares.
const LIMIT: usize = 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TBug {
    None,
    /// Inbound frames come out in swapped pairs (two reader tasks racing).
    Reorder,
    /// The close frame goes out without its reason.
    DropCloseReason,
    /// The peer's close frame ends the stream instead of coming out of it.
    CloseAsEnd,
    /// Declares a limit but hands over messages of any size.
    SwallowOversize,
    /// Hands over text without checking it is UTF-8.
    SkipUtf8,
    /// The stream never ends once the peer is gone (a reader that waits
    /// for a close frame that never comes).
    NeverEnd,
    /// Inbound pings are answered internally and never surface.
    DropPings,
    /// Stops reading once its sink sent a close frame, losing the peer's
    /// frames in flight and its close.
    DeafAfterClose,
    /// One-way, and makes up a pong for every ping its sink sends.
    FakePong,
}

/// The memory transport with a declared inbound limit and UTF-8 checks
/// (as a socket transport has), and one bug.
struct Mt(switchboard::transport::memory::MemoryTransport, TBug);

type FrameSink = std::pin::Pin<Box<dyn futures::Sink<Frame, Error = TransportError> + Send>>;

impl Transport for Mt {
    type Sink = FrameSink;
    type Stream = futures::stream::BoxStream<'static, Result<Frame, TransportError>>;

    fn capabilities(&self) -> Capabilities {
        self.0.capabilities()
    }

    fn split(self) -> (Self::Sink, Self::Stream) {
        use futures::SinkExt;
        let bug = self.1;
        let (sink, stream) = self.0.split();
        // Set by the sink (a close sent, a ping to fake an answer to); read
        // by the stream.
        let closed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let pinged = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (closed_w, pinged_w) = (closed.clone(), pinged.clone());
        let sink: FrameSink = Box::pin(sink.with(move |frame: Frame| {
            use std::sync::atomic::Ordering::SeqCst;
            match &frame {
                Frame::Close(_) => closed_w.store(true, SeqCst),
                Frame::Ping(_) => pinged_w.store(true, SeqCst),
                _ => {}
            }
            async move {
                Ok::<_, TransportError>(match frame {
                    Frame::Close(Some(c)) if bug == TBug::DropCloseReason => {
                        Frame::Close(Some(CloseFrame { code: c.code, reason: String::new() }))
                    }
                    frame => frame,
                })
            }
        }));
        let stream = stream
            .filter_map(move |item| async move {
                Some(match item {
                    Ok(Frame::Ping(_)) if bug == TBug::DropPings => return None,
                    Ok(Frame::Text(b)) if bug != TBug::SkipUtf8 && std::str::from_utf8(&b).is_err() => {
                        Err(TransportError::InvalidUtf8)
                    }
                    Ok(Frame::Text(b) | Frame::Binary(b)) if bug != TBug::SwallowOversize && b.len() > LIMIT => {
                        Err(TransportError::MessageTooBig)
                    }
                    other => other,
                })
            })
            .boxed();
        let stream = match bug {
            TBug::Reorder => stream.chunks(2).flat_map(|pair| futures::stream::iter(pair.into_iter().rev())).boxed(),
            TBug::CloseAsEnd => {
                stream.take_while(|item| std::future::ready(!matches!(item, Ok(Frame::Close(_))))).boxed()
            }
            TBug::NeverEnd => stream.chain(futures::stream::pending()).boxed(),
            TBug::DeafAfterClose => stream
                .take_while(move |_| std::future::ready(!closed.load(std::sync::atomic::Ordering::SeqCst)))
                .boxed(),
            TBug::FakePong => stream
                .flat_map(move |item| {
                    let fake = pinged.swap(false, std::sync::atomic::Ordering::SeqCst);
                    let pong = fake.then(|| Ok(Frame::Pong(bytes::Bytes::new())));
                    futures::stream::iter(pong.into_iter().chain(std::iter::once(item)))
                })
                .boxed(),
            _ => stream,
        };
        (sink, stream)
    }
}

fn transport_run(bug: TBug) -> Run {
    Box::pin(async move {
        let one_way = bug == TBug::FakePong;
        TransportSuite::new(move || async move {
            let (t, peer) = switchboard::transport::memory::pair(16);
            // The wrapper checks UTF-8 itself (unless `SkipUtf8`).
            let t = t.unchecked_text();
            (Mt(if one_way { t.one_way() } else { t }, bug), peer)
        })
        .max_message_size(LIMIT)
        .run()
        .await
        .map(|report| {
            let skipped: Vec<&str> = report.skipped.iter().map(|(c, _)| *c).collect();
            assert_eq!(skipped, ["transport.one_way"], "{report:?}");
        })
    })
}

#[tokio::test]
async fn the_unbroken_transport_wrapper_passes() {
    transport_run(TBug::None).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_transport_mutant_fails_its_check() {
    let mutants = [
        (TBug::Reorder, "transport.order"),
        (TBug::DropCloseReason, "transport.close_sent"),
        (TBug::CloseAsEnd, "transport.close_received"),
        (TBug::SwallowOversize, "transport.too_big"),
        (TBug::SkipUtf8, "transport.invalid_utf8"),
        (TBug::NeverEnd, "transport.vanish"),
        (TBug::DropPings, "transport.ping"),
        (TBug::DeafAfterClose, "transport.half_closed"),
        (TBug::FakePong, "transport.one_way"),
    ];
    let mutants = mutants.into_iter().map(|(bug, check)| (bug, check, transport_run(bug))).collect();
    expect_caught(mutants, TransportSuite::<()>::CHECKS).await;
}
