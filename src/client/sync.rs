//! [`Synced`]: a synced room's state on the client, predicted locally and
//! reconciled with the server (`docs/sync.md`).
//!
//! ```no_run
//! # async fn run() -> Result<(), switchboard::client::ClientError> {
//! use serde_json::json;
//! use switchboard::client::{sync::Synced, Client};
//! use switchboard::sync::{JsonDoc, JsonOp};
//!
//! let client = Client::builder("ws://127.0.0.1:3000/ws").connect()?;
//! let todo = Synced::join(&client, "todo:home", JsonDoc).await?;
//! // Applied to the view at once; sent, acknowledged or rolled back later.
//! todo.apply(JsonOp::Set { path: vec!["title".into()], value: json!("Groceries") }).ok();
//! println!("{}", todo.view().state);
//! if let Some(undone) = todo.rollback().await {
//!     println!("your change was undone: {}", undone.message);
//! }
//! # Ok(()) }
//! ```

use super::error::{ClientError, ClientErrorKind};
use super::room::RoomEvent;
use super::{Client, Room};
use crate::sync::{Context, OpRecord, Reducer, Reject};
use crate::util::AbortOnDrop;
use parking_lot::Mutex;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch, Notify};
use tokio::time::Instant;

/// What the application sees: the confirmed state with the pending local
/// ops applied over it.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct SyncView<S> {
    /// The predicted state (pending ops over the confirmed state).
    pub state: S,
    /// The confirmed version (the last server op applied).
    pub version: u64,
    /// Local ops not yet confirmed.
    pub pending: usize,
    /// Whether the confirmed state is current: false from a reconnect until
    /// the resync answered.
    pub synced: bool,
}

/// A local op the server refused: it was dropped and the view recomputed
/// without it.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Rollback<Op> {
    /// The op.
    pub op: Op,
    /// The server's error code (409 for a reducer's plain refusal).
    pub code: u32,
    /// The reason, for the user ("your change was undone: …").
    pub message: String,
}

/// Bounds of the client handle.
const MAX_PENDING: usize = 1000;
const MAX_EARLY: usize = 4096;
const ROLLBACKS: usize = 256;
/// How long an op announced by version may stay missing before a resync.
const GAP_WAIT: Duration = Duration::from_secs(1);

struct Pending<Op> {
    seq: u64,
    base: u64,
    op: Op,
    /// The version the server acknowledged, before its broadcast arrived.
    acked: Option<u64>,
}

struct Core<R: Reducer> {
    room: String,
    client_id: String,
    user: Option<String>,
    confirmed: R::State,
    version: u64,
    pending: VecDeque<Pending<R::Op>>,
    next_seq: u64,
    /// Ops that arrived ahead of a missing one, by version.
    early: BTreeMap<u64, OpRecord>,
    synced: bool,
    /// When a missing op (early ops, or an acknowledged op's broadcast) is
    /// given up on and a resync asked for.
    gap_since: Option<Instant>,
    /// The published view's state is no longer the confirmed state with the
    /// pending ops over it: the next publish replays them (a rebase). An
    /// acknowledgement of the oldest pending op, in order, leaves the view as
    /// it was (the server applied the same op to the same state), so a queue
    /// of ops drains in linear time rather than one replay per op.
    stale: bool,
}

impl<R: Reducer> Core<R> {
    fn view(&self, reducer: &R) -> SyncView<R::State> {
        let mut state = self.confirmed.clone();
        for p in &self.pending {
            let cx = Context::new(&self.room, &self.client_id, self.user.as_deref(), p.base);
            let mut next = state.clone();
            if reducer.apply(&mut next, &p.op, &cx).is_ok() {
                state = next;
            }
        }
        SyncView { state, version: self.version, pending: self.pending.len(), synced: self.synced }
    }

    /// A server op in version order: applied to the confirmed state; the
    /// client's own op leaves the pending queue.
    fn apply_record(&mut self, reducer: &R, rec: OpRecord) {
        let cx = Context::new(&self.room, &rec.client, rec.user.as_deref(), rec.base);
        // Our oldest pending op, with the context the view applied it with.
        let own_head = rec.client == self.client_id
            && rec.user == self.user
            && self.pending.front().is_some_and(|p| p.seq == rec.seq && p.base == rec.base);
        let mut applied = false;
        match serde_json::from_value::<R::Op>(rec.op) {
            Ok(op) => {
                let mut next = self.confirmed.clone();
                match reducer.apply(&mut next, &op, &cx) {
                    Ok(()) => {
                        self.confirmed = next;
                        applied = true;
                    }
                    Err(e) => tracing::error!(version = rec.version, error = %e,
                        "sync: a confirmed op is refused here: the reducer is not deterministic"),
                }
            }
            Err(e) => tracing::error!(version = rec.version, error = %e, "sync: a confirmed op does not decode"),
        }
        self.version = rec.version;
        if rec.client == self.client_id {
            self.pending.retain(|p| p.seq > rec.seq);
        }
        // The view is the confirmed state with the pending ops over it: when
        // the op that moved from one to the other applied the same here, it
        // is unchanged.
        self.stale |= !(own_head && applied);
    }

    fn on_record(&mut self, reducer: &R, rec: OpRecord) {
        if rec.version <= self.version {
            return;
        }
        if rec.version > self.version + 1 {
            if self.early.len() < MAX_EARLY {
                self.early.insert(rec.version, rec);
            }
        } else {
            self.apply_record(reducer, rec);
        }
        while let Some(rec) = self.early.remove(&(self.version + 1)) {
            self.apply_record(reducer, rec);
        }
        self.early.retain(|v, _| *v > self.version);
        self.settle_acked();
    }

    /// Acknowledged ops whose version the confirmed state has reached are
    /// in it (their broadcast was missed and a resync brought them).
    fn settle_acked(&mut self) {
        let version = self.version;
        let before = self.pending.len();
        self.pending.retain(|p| p.acked.is_none_or(|v| v > version));
        self.stale |= self.pending.len() != before;
        let waiting = !self.early.is_empty() || self.pending.iter().any(|p| p.acked.is_some());
        self.gap_since = match (waiting, self.gap_since) {
            (false, _) => None,
            (true, Some(t)) => Some(t),
            (true, None) => Some(Instant::now()),
        };
    }
}

/// `sync.get`'s reply.
#[derive(Debug, Deserialize)]
struct GetReply {
    version: u64,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    client_seq: u64,
    #[serde(default)]
    state: Option<Value>,
    #[serde(default)]
    ops: Option<Vec<OpRecord>>,
}

struct Shared<R: Reducer> {
    reducer: R,
    core: Mutex<Core<R>>,
    view: watch::Sender<SyncView<R::State>>,
    wake: Notify,
}

impl<R: Reducer> Shared<R> {
    /// Publishes the view: replays the pending ops when the state changed
    /// under them, else only updates the counts.
    fn publish(&self, core: &mut Core<R>) {
        if std::mem::take(&mut core.stale) {
            self.view.send_replace(core.view(&self.reducer));
        } else {
            let (version, pending, synced) = (core.version, core.pending.len(), core.synced);
            self.view.send_if_modified(|v| {
                let changed = (v.version, v.pending, v.synced) != (version, pending, synced);
                (v.version, v.pending, v.synced) = (version, pending, synced);
                changed
            });
        }
    }
}

/// A synced room on the client: the confirmed state and version, the
/// queue of local ops the server has not confirmed yet, and the view (the
/// pending ops applied over the confirmed state).
///
/// - [`Synced::apply`] applies an op to the view at once and queues it; the
///   handle sends queued ops one at a time, in order, each with its
///   client id and sequence number.
/// - A server op is applied to the confirmed state and the pending ops are
///   replayed over it (rebase). The acknowledgement of a local op (its
///   broadcast) takes it off the queue.
/// - A refused op is dropped, the view is recomputed without it, and a
///   [`Rollback`] is raised ([`Synced::rollback`]).
/// - Pending ops survive reconnects: after the room's rejoin the handle
///   asks for what it missed (`sync.get` from its version: the missed ops, or
///   a fresh snapshot), rebases, and resends the queue with the same ids, so
///   the server applies each op once.
///
/// The reducer must be the server's (the same type), and deterministic.
/// Bounds: at most 1,000 pending ops ([`Synced::apply`] refuses more with
/// code 429), 4,096 ops held while an earlier one is missing, and 256
/// unread rollbacks (newer ones are dropped). Dropping the handle stops
/// it and leaves the room.
pub struct Synced<R: Reducer> {
    shared: Arc<Shared<R>>,
    rollbacks: tokio::sync::Mutex<mpsc::Receiver<Rollback<R::Op>>>,
    client_id: String,
    _task: AbortOnDrop,
}

impl<R: Reducer> fmt::Debug for Synced<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let core = self.shared.core.lock();
        f.debug_struct("Synced")
            .field("room", &core.room)
            .field("client", &self.client_id)
            .field("version", &core.version)
            .field("pending", &core.pending.len())
            .finish()
    }
}

fn new_client_id() -> String {
    format!("{:016x}{:016x}", crate::util::random_u64(), crate::util::random_u64())
}

impl<R: Reducer> Synced<R> {
    /// Joins `room` and loads its state (`sync.get`), with a fresh client id.
    pub async fn join(client: &Client, room: &str, reducer: R) -> Result<Synced<R>, ClientError> {
        let handle = client.join(room).await?;
        Synced::open(handle, reducer).await
    }

    /// Loads the state of an already joined room and takes over its event
    /// stream (its other events are ignored).
    pub async fn open(room: Room, reducer: R) -> Result<Synced<R>, ClientError> {
        Synced::open_as(room, reducer, &new_client_id()).await
    }

    /// Like [`Synced::open`] with a chosen client id (1–64 bytes of
    /// `A–Z a–z 0–9 _ -`, unique per client; op ids are this id and a
    /// sequence number from 1).
    pub async fn open_as(room: Room, reducer: R, client_id: &str) -> Result<Synced<R>, ClientError> {
        if !crate::sync::valid_client_id(client_id) {
            return Err(ClientError::new(ClientErrorKind::Config, "client id: 1-64 bytes of A-Z a-z 0-9 _ -"));
        }
        let reply = get(&room, None, client_id).await?;
        let mut core = Core {
            room: room.name().to_owned(),
            client_id: client_id.to_owned(),
            user: None,
            confirmed: R::State::default(),
            version: 0,
            pending: VecDeque::new(),
            next_seq: 1,
            early: BTreeMap::new(),
            synced: false,
            gap_since: None,
            stale: false,
        };
        // A client id reused after a restart continues after its last op.
        core.next_seq = reply.client_seq + 1;
        resync(&reducer, &mut core, reply);
        let view = core.view(&reducer);
        core.stale = false;
        let shared =
            Arc::new(Shared { reducer, core: Mutex::new(core), view: watch::channel(view).0, wake: Notify::new() });
        let (tx, rx) = mpsc::channel(ROLLBACKS);
        let task = tokio::spawn(drive(shared.clone(), room, tx));
        Ok(Synced {
            shared,
            rollbacks: tokio::sync::Mutex::new(rx),
            client_id: client_id.to_owned(),
            _task: AbortOnDrop(task),
        })
    }

    /// Applies `op` to the view at once and queues it for the server.
    /// Refused here (and not queued) when the local reducer refuses it, or
    /// with code 429 when 1,000 ops are already pending.
    pub fn apply(&self, op: R::Op) -> Result<(), Reject> {
        let mut core = self.shared.core.lock();
        if core.pending.len() >= MAX_PENDING {
            return Err(Reject::with_code(429, "too many changes waiting for the server"));
        }
        let mut view = self.shared.view.borrow().state.clone();
        let cx = Context::new(&core.room, &core.client_id, core.user.as_deref(), core.version);
        self.shared.reducer.apply(&mut view, &op, &cx)?;
        let (seq, base) = (core.next_seq, core.version);
        core.next_seq += 1;
        core.pending.push_back(Pending { seq, base, op, acked: None });
        let snapshot =
            SyncView { state: view, version: core.version, pending: core.pending.len(), synced: core.synced };
        drop(core);
        self.shared.view.send_replace(snapshot);
        self.shared.wake.notify_one();
        Ok(())
    }

    /// The current view.
    pub fn view(&self) -> SyncView<R::State> {
        self.shared.view.borrow().clone()
    }

    /// The view as a [`watch`]: changed on every local op, server op,
    /// rollback and resync.
    pub fn watch(&self) -> watch::Receiver<SyncView<R::State>> {
        self.shared.view.subscribe()
    }

    /// The confirmed state and its version (without the pending ops).
    pub fn confirmed(&self) -> (R::State, u64) {
        let core = self.shared.core.lock();
        (core.confirmed.clone(), core.version)
    }

    /// The next rollback; `None` once the handle's task ended.
    pub async fn rollback(&self) -> Option<Rollback<R::Op>> {
        self.rollbacks.lock().await.recv().await
    }

    /// A rollback if one is ready.
    pub fn try_rollback(&self) -> Option<Rollback<R::Op>> {
        self.rollbacks.try_lock().ok()?.try_recv().ok()
    }

    /// Waits until no op is pending and the state is synced.
    pub async fn settled(&self) {
        let mut rx = self.shared.view.subscribe();
        let _ = rx.wait_for(|v| v.pending == 0 && v.synced).await;
    }

    /// This handle's client id.
    pub fn client_id(&self) -> &str {
        &self.client_id
    }
}

async fn get(room: &Room, since: Option<u64>, client: &str) -> Result<GetReply, ClientError> {
    room.call("sync.get", &json!({ "since": since, "client": client })).await
}

/// Loads a `sync.get` reply: a snapshot replaces the confirmed state, ops
/// are applied; ops the server says it already applied leave the queue.
fn resync<R: Reducer>(reducer: &R, core: &mut Core<R>, reply: GetReply) {
    core.user = reply.user;
    if let Some(state) = reply.state {
        match serde_json::from_value(state) {
            Ok(s) => {
                core.confirmed = s;
                core.version = reply.version;
            }
            Err(e) => tracing::error!(error = %e, "sync: the server's state does not decode"),
        }
    }
    for rec in reply.ops.unwrap_or_default() {
        core.on_record(reducer, rec);
    }
    let done = reply.client_seq;
    core.pending.retain(|p| p.seq > done);
    core.stale = true;
    core.early.retain(|v, _| *v > reply.version);
    core.synced = true;
    core.settle_acked();
}

type InFlight = Pin<Box<dyn Future<Output = (u64, Result<Value, ClientError>)> + Send>>;

/// What a failed `sync.op` means for its op.
enum Failure {
    /// Refused: roll it back.
    Refused(u32, String),
    /// Not answered or not processed: send it again at `Instant`.
    Retry(Instant),
    /// The client stopped.
    Stop,
}

fn classify(e: &ClientError) -> Failure {
    let now = Instant::now();
    match (e.kind(), e.code().map(|c| c.0)) {
        (ClientErrorKind::Closed, _) => Failure::Stop,
        (ClientErrorKind::Server, Some(420)) => {
            let wait = e
                .data()
                .and_then(|d| d.decode::<Value>().ok())
                .and_then(|d| d.get("retry_after_ms").and_then(Value::as_u64))
                .unwrap_or(1000);
            Failure::Retry(now + Duration::from_millis(wait.min(60_000)))
        }
        // Not processed (in-flight limit, store down, timeout, the rejoin not done yet).
        (ClientErrorKind::Server, Some(405 | 408 | 429 | 503)) => Failure::Retry(now + Duration::from_secs(1)),
        (ClientErrorKind::Server, Some(code)) => Failure::Refused(code, e.message().to_owned()),
        (ClientErrorKind::TooLarge, _) => Failure::Refused(413, e.message().to_owned()),
        (ClientErrorKind::Codec | ClientErrorKind::Config, _) => Failure::Refused(400, e.message().to_owned()),
        // Timeout, Disconnected, Dropped, Offline: resent after the rejoin or in a second.
        _ => Failure::Retry(now + Duration::from_secs(1)),
    }
}

/// The handle's task: reads the room, sends the queue's head, resyncs.
async fn drive<R: Reducer>(shared: Arc<Shared<R>>, room: Room, rollbacks: mpsc::Sender<Rollback<R::Op>>) {
    let mut inflight: Option<InFlight> = None;
    let mut retry_at: Option<Instant> = None;
    let mut need_resync = false;
    let name = room.name().to_owned();
    loop {
        if need_resync {
            let (since, client) = {
                let core = shared.core.lock();
                (core.version, core.client_id.clone())
            };
            match get(&room, Some(since), &client).await {
                Ok(reply) => {
                    need_resync = false;
                    let mut core = shared.core.lock();
                    resync(&shared.reducer, &mut core, reply);
                    shared.publish(&mut core);
                }
                Err(e) if e.kind() == ClientErrorKind::Closed => return,
                Err(e) => {
                    // A `since` the server does not know (its store lost the room): start over.
                    let start_over = e.code().is_some_and(|c| c.0 == 400);
                    if start_over {
                        if let Ok(reply) = get(&room, None, &client).await {
                            need_resync = false;
                            let mut core = shared.core.lock();
                            resync(&shared.reducer, &mut core, reply);
                            shared.publish(&mut core);
                        }
                    }
                    if need_resync {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
            continue;
        }
        if inflight.is_none() && retry_at.is_none_or(|t| t <= Instant::now()) {
            retry_at = None;
            let core = shared.core.lock();
            if let Some(head) = core.pending.front().filter(|p| p.acked.is_none() && core.synced) {
                let data = json!({ "client": core.client_id, "seq": head.seq, "base": head.base, "op": head.op });
                let (client, room_name, seq) = (room.client.clone(), name.clone(), head.seq);
                inflight = Some(Box::pin(async move {
                    (seq, client.call_in::<_, Value>(Some(&room_name), "sync.op", &data).await)
                }));
            }
        }
        let gap_deadline = shared.core.lock().gap_since.map(|t| t + GAP_WAIT);
        tokio::select! {
            ev = room.recv() => match ev {
                None => return,
                Some(RoomEvent::Event(e)) if e.event == "sync.op" => match e.decode::<OpRecord>() {
                    Ok(rec) => {
                        let mut core = shared.core.lock();
                        core.on_record(&shared.reducer, rec);
                        shared.publish(&mut core);
                    }
                    Err(e) => tracing::warn!(error = %e, "sync: a malformed op event was ignored"),
                },
                Some(RoomEvent::Event(_)) => {}
                // Rejoined, a gap, lost events: ask for what was missed.
                Some(_) => {
                    need_resync = true;
                    let mut core = shared.core.lock();
                    core.synced = false;
                    shared.publish(&mut core);
                }
            },
            (seq, result) = async { inflight.as_mut().expect("guarded").await }, if inflight.is_some() => {
                inflight = None;
                let mut core = shared.core.lock();
                match result {
                    Ok(reply) => {
                        let version = reply.get("version").and_then(Value::as_u64).unwrap_or(0);
                        if let Some(p) = core.pending.iter_mut().find(|p| p.seq == seq) {
                            p.acked = Some(version);
                        }
                        core.settle_acked();
                    }
                    Err(e) => match classify(&e) {
                        Failure::Stop => return,
                        Failure::Retry(at) => retry_at = Some(at),
                        Failure::Refused(code, message) => {
                            if let Some(i) = core.pending.iter().position(|p| p.seq == seq) {
                                let p = core.pending.remove(i).expect("index in range");
                                core.stale = true;
                                // Dropped when the application does not read them (bounded).
                                let _ = rollbacks.try_send(Rollback { op: p.op, code, message });
                            }
                        }
                    },
                }
                shared.publish(&mut core);
            }
            _ = shared.wake.notified() => {}
            _ = tokio::time::sleep_until(retry_at.unwrap_or_else(Instant::now)), if retry_at.is_some() && inflight.is_none() => {}
            _ = tokio::time::sleep_until(gap_deadline.unwrap_or_else(Instant::now)), if gap_deadline.is_some() => {
                need_resync = true;
            }
        }
    }
}
