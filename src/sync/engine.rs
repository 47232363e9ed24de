//! The server side of synced rooms: the `sync.op` and `sync.get` handlers,
//! one cached state per room and node, ops applied one at a time.
//!
//! Locking: each room's cached state sits behind its own `tokio` mutex,
//! held across the store round trips and the broadcast of one op, so a
//! node applies a room's ops one at a time and broadcasts them in version
//! order. The map of rooms and the rate buckets are `parking_lot` mutexes
//! held for a lookup only, never across an `.await`.

use super::store::{Append, Appended, ClientRecord, OpRecord, SnapshotStore};
use super::{valid_client_id, Context, Reducer, Reject, SyncConfig};
use crate::handler::{Call, CallError, Handler};
use crate::hub::ConnectionId;
use crate::protocol::{ErrorCode, Payload};
use crate::util::TokenBucket;
use crate::HubBuilder;
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::Arc;
use tokio::time::Instant;

/// The synced rooms of a hub: a [`SnapshotStore`], the bounds, and a
/// [`Reducer`] per room-name prefix. Mount them with [`HubBuilder::sync`].
pub struct SyncRooms {
    store: Arc<dyn SnapshotStore>,
    config: SyncConfig,
    kinds: Vec<(String, MakeKind)>,
}

/// Builds a room kind once the shared parts exist.
type MakeKind = Box<dyn FnOnce(Arc<Common>) -> Arc<dyn Kind>>;
/// Op rate buckets per member and room, with their last use.
type Limits = parking_lot::Mutex<HashMap<(ConnectionId, Arc<str>), (TokenBucket, Instant)>>;

impl fmt::Debug for SyncRooms {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SyncRooms")
            .field("config", &self.config)
            .field("prefixes", &self.kinds.iter().map(|(p, _)| p).collect::<Vec<_>>())
            .finish()
    }
}

impl SyncRooms {
    /// Synced rooms kept in `store`. Hubs linked by a backplane must share
    /// one store (a clone of the same [`MemorySnapshots`](super::MemorySnapshots)
    /// in one process, or `redis::RedisSnapshots`).
    pub fn new(store: impl SnapshotStore) -> SyncRooms {
        SyncRooms { store: Arc::new(store), config: SyncConfig::default(), kinds: Vec::new() }
    }

    /// Replaces the bounds (default: [`SyncConfig::default`]).
    pub fn config(mut self, config: SyncConfig) -> Self {
        self.config = config;
        self
    }

    /// Rooms whose name starts with `prefix` are synced with `reducer` (the
    /// first matching prefix wins; `""` matches every room).
    pub fn room<R: Reducer>(mut self, prefix: &str, reducer: R) -> Self {
        self.kinds.push((
            prefix.to_owned(),
            Box::new(move |common| Arc::new(Typed { reducer, common, slots: Default::default() })),
        ));
        self
    }
}

impl HubBuilder {
    /// Serves synced rooms (`docs/sync.md`): registers the handlers of the
    /// `sync.op` and `sync.get` calls.
    pub fn sync(self, rooms: SyncRooms) -> Self {
        let common = Arc::new(Common { store: rooms.store, config: rooms.config, limits: Default::default() });
        let kinds: Vec<(String, Arc<dyn Kind>)> =
            rooms.kinds.into_iter().map(|(prefix, make)| (prefix, make(common.clone()))).collect();
        let engine = Arc::new(Engine { kinds });
        self.handler("sync.op", OpHandler(engine.clone())).handler("sync.get", GetHandler(engine))
    }
}

struct Common {
    store: Arc<dyn SnapshotStore>,
    config: SyncConfig,
    limits: Limits,
}

impl Common {
    fn take_token(&self, who: ConnectionId, room: &str) -> Result<(), CallError> {
        let refill = std::time::Duration::from_secs(1) / self.config.op_rate.max(1);
        let burst = self.config.op_burst.max(1);
        let now = Instant::now();
        let mut limits = self.limits.lock();
        if limits.len() > 4096 {
            // A bucket unused for `burst` refills is full again: forget it.
            let idle = refill * burst;
            limits.retain(|_, (_, used)| now.duration_since(*used) < idle);
        }
        let (bucket, used) = limits.entry((who, Arc::from(room))).or_insert_with(|| (TokenBucket::full(now), now));
        *used = now;
        bucket.take(now, refill, burst).map_err(|wait| {
            CallError::with_code(ErrorCode::RATE_LIMITED, "op rate exceeded")
                .with_data(json!({ "retry_after_ms": wait.as_millis().max(1) as u64 }))
        })
    }

    async fn store<T>(&self, f: impl std::future::Future<Output = crate::Result<T>>) -> Result<T, CallError> {
        match tokio::time::timeout(self.config.store_timeout, f).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "sync: snapshot store failed");
                Err(unavailable())
            }
            Err(_) => {
                tracing::warn!("sync: snapshot store timed out");
                Err(unavailable())
            }
        }
    }
}

fn unavailable() -> CallError {
    CallError::with_code(ErrorCode::UNAVAILABLE, "temporarily unavailable, retry")
}

struct Engine {
    kinds: Vec<(String, Arc<dyn Kind>)>,
}

impl Engine {
    fn kind(&self, call: &Call) -> Result<(Arc<dyn Kind>, Arc<str>), CallError> {
        let room = call.room().ok_or_else(|| CallError::bad_request("sync calls name their room"))?;
        let kind = self.kinds.iter().find(|(prefix, _)| room.starts_with(prefix.as_str()));
        match kind {
            Some((_, k)) => Ok((k.clone(), Arc::from(room))),
            None => Err(CallError::with_code(ErrorCode::UNKNOWN_EVENT, "this room is not synced")),
        }
    }
}

/// `sync.op`'s `data`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OpRequest {
    client: String,
    seq: u64,
    base: u64,
    op: Value,
}

/// `sync.get`'s `data`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct GetRequest {
    #[serde(default)]
    since: Option<u64>,
    #[serde(default)]
    client: Option<String>,
}

fn decode<T: serde::de::DeserializeOwned>(payload: Option<Payload>) -> Result<T, CallError> {
    let Some(payload) = payload else { return Err(CallError::with_code(ErrorCode::INVALID_PAYLOAD, "no data")) };
    payload.decode().map_err(|e| CallError::with_code(ErrorCode::INVALID_PAYLOAD, e.to_string()))
}

fn encode(call: &Call, value: &impl Serialize) -> Result<Payload, CallError> {
    Payload::encode(call.format(), value).map_err(|e| CallError::internal(e.to_string()))
}

struct OpHandler(Arc<Engine>);
struct GetHandler(Arc<Engine>);

impl Handler for OpHandler {
    fn call(&self, call: Call, payload: Option<Payload>) -> BoxFuture<'static, Result<Payload, CallError>> {
        let engine = self.0.clone();
        Box::pin(async move {
            let (kind, room) = engine.kind(&call)?;
            let req: OpRequest = decode(payload)?;
            let reply = kind.op(call.clone(), room, req).await?;
            encode(&call, &reply)
        })
    }
}

impl Handler for GetHandler {
    fn call(&self, call: Call, payload: Option<Payload>) -> BoxFuture<'static, Result<Payload, CallError>> {
        let engine = self.0.clone();
        Box::pin(async move {
            let (kind, room) = engine.kind(&call)?;
            let req: GetRequest = match payload {
                Some(p) if !p.is_null() => decode(Some(p))?,
                _ => GetRequest::default(),
            };
            let reply = kind.get(call.clone(), room, req).await?;
            encode(&call, &reply)
        })
    }
}

/// A reducer type behind a trait object.
trait Kind: Send + Sync + 'static {
    fn op(self: Arc<Self>, call: Call, room: Arc<str>, req: OpRequest) -> BoxFuture<'static, Result<Value, CallError>>;
    fn get(
        self: Arc<Self>,
        call: Call,
        room: Arc<str>,
        req: GetRequest,
    ) -> BoxFuture<'static, Result<Value, CallError>>;
}

/// One room's state on this node.
struct Slot<S> {
    loaded: bool,
    state: S,
    version: u64,
    /// Last applied op per client, as far as this node knows (from the
    /// store, and from every op applied or caught up since). Bounded: cleared
    /// when it grows past 10,000 (then fetched again per client).
    clients: HashMap<String, ClientRecord>,
    /// Recent refusals per client, so a resend gets the same answer.
    refused: HashMap<String, VecDeque<(u64, Option<String>, Reject)>>,
}

impl<S: Default> Default for Slot<S> {
    fn default() -> Self {
        Slot { loaded: false, state: S::default(), version: 0, clients: HashMap::new(), refused: HashMap::new() }
    }
}

impl<S> Slot<S> {
    fn note_client(&mut self, client: &str, rec: ClientRecord) {
        if self.clients.len() >= 10_000 && !self.clients.contains_key(client) {
            self.clients.clear();
        }
        match self.clients.get_mut(client) {
            Some(known) if known.seq >= rec.seq => {}
            Some(known) => *known = rec,
            None => {
                self.clients.insert(client.to_owned(), rec);
            }
        }
    }
}

type SlotMap<S> = parking_lot::Mutex<HashMap<Arc<str>, Arc<tokio::sync::Mutex<Slot<S>>>>>;

struct Typed<R: Reducer> {
    reducer: R,
    common: Arc<Common>,
    slots: SlotMap<R::State>,
}

/// Counts bytes written, failing past a bound (sizes a state without
/// keeping its JSON).
struct Counter {
    n: usize,
    max: usize,
}

impl std::io::Write for Counter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.n += buf.len();
        if self.n > self.max {
            return Err(std::io::Error::other("too large"));
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn json_fits(value: &impl Serialize, max: usize) -> bool {
    serde_json::to_writer(Counter { n: 0, max }, value).is_ok()
}

fn refusal(code: u32, message: impl Into<String>, version: u64) -> CallError {
    CallError::new(code, message).with_data(json!({ "version": version }))
}

impl<R: Reducer> Typed<R> {
    fn slot(&self, hub: &crate::Hub, room: &Arc<str>) -> Arc<tokio::sync::Mutex<Slot<R::State>>> {
        let mut slots = self.slots.lock();
        if slots.len() > 1024 {
            // Forget rooms without members here that nobody is using.
            slots.retain(|name, slot| Arc::strong_count(slot) > 1 || hub.has_local_room(name));
        }
        slots.entry(room.clone()).or_default().clone()
    }

    /// Brings `slot` up to the store's version: the ops after it, or a
    /// snapshot and the ops after that.
    async fn catch_up(&self, room: &str, slot: &mut Slot<R::State>) -> Result<(), CallError> {
        let since = slot.loaded.then_some(slot.version);
        let loaded = self.common.store(self.common.store.load(room, since)).await?;
        if let Some((version, state)) = loaded.snapshot {
            slot.state = serde_json::from_value(state).map_err(|e| {
                tracing::error!(room, error = %e, "sync: a stored snapshot does not decode");
                CallError::internal("stored state does not decode")
            })?;
            slot.version = version;
            slot.clients.clear();
        } else if since.is_none() {
            slot.state = R::State::default();
            slot.version = 0;
        }
        for rec in loaded.ops {
            if rec.version <= slot.version {
                continue;
            }
            if rec.version != slot.version + 1 {
                tracing::error!(room, expected = slot.version + 1, got = rec.version, "sync: the store skipped ops");
                return Err(CallError::internal("stored ops are not contiguous"));
            }
            let cx = Context::new(room, &rec.client, rec.user.as_deref(), rec.base);
            match serde_json::from_value::<R::Op>(rec.op.clone()) {
                Ok(op) => {
                    let mut next = slot.state.clone();
                    match self.reducer.apply(&mut next, &op, &cx) {
                        Ok(()) => slot.state = next,
                        Err(e) => tracing::error!(room, version = rec.version, error = %e,
                            "sync: an accepted op is refused on replay: the reducer is not deterministic"),
                    }
                }
                Err(e) => tracing::error!(room, version = rec.version, error = %e, "sync: a stored op does not decode"),
            }
            slot.version = rec.version;
            slot.note_client(&rec.client, ClientRecord { seq: rec.seq, version: rec.version, user: rec.user });
        }
        slot.loaded = true;
        Ok(())
    }

    async fn client_record(
        &self,
        room: &str,
        slot: &mut Slot<R::State>,
        client: &str,
    ) -> Result<Option<ClientRecord>, CallError> {
        if let Some(rec) = slot.clients.get(client) {
            return Ok(Some(rec.clone()));
        }
        let rec = self.common.store(self.common.store.client(room, client)).await?;
        if let Some(rec) = &rec {
            slot.note_client(client, rec.clone());
        }
        Ok(rec)
    }

    async fn apply_op(&self, call: &Call, room: &Arc<str>, req: OpRequest) -> Result<Value, CallError> {
        let config = &self.common.config;
        if !valid_client_id(&req.client) {
            return Err(CallError::bad_request("client must be 1-64 bytes of A-Z a-z 0-9 _ -"));
        }
        if req.seq == 0 {
            return Err(CallError::bad_request("seq starts at 1"));
        }
        if !json_fits(&req.op, config.max_op_bytes) {
            return Err(CallError::new(413, format!("op larger than {} bytes", config.max_op_bytes)));
        }
        let op: R::Op = serde_json::from_value(req.op.clone())
            .map_err(|e| CallError::with_code(ErrorCode::INVALID_PAYLOAD, format!("invalid op: {e}")))?;
        self.common.take_token(call.connection_id(), room)?;
        let user = call.user_id().map(str::to_owned);
        let slot = self.slot(call.hub(), room);
        let mut slot = slot.lock().await;
        let mut caught_up = false;
        for _ in 0..32 {
            if !slot.loaded {
                self.catch_up(room, &mut slot).await?;
            }
            let earlier =
                slot.refused.get(&req.client).and_then(|q| q.iter().find(|(s, u, _)| *s == req.seq && *u == user));
            if let Some((_, _, r)) = earlier {
                return Err(refusal(r.code(), r.message(), slot.version));
            }
            if let Some(rec) = self.client_record(room, &mut slot, &req.client).await? {
                if rec.user != user {
                    return Err(refusal(403, "this client id belongs to another user", slot.version));
                }
                if req.seq == rec.seq {
                    return Ok(json!({ "version": rec.version, "duplicate": true }));
                }
                if req.seq < rec.seq {
                    return Err(refusal(409, "op id older than this client's last applied op", slot.version));
                }
            }
            if req.base > slot.version {
                if !caught_up {
                    // Another node may be ahead of this one.
                    caught_up = true;
                    self.catch_up(room, &mut slot).await?;
                    continue;
                }
                let msg = format!("base version {} is ahead of the room's version {}", req.base, slot.version);
                return Err(refusal(400, msg, slot.version));
            }
            let cx = Context::new(room, &req.client, user.as_deref(), req.base);
            let mut next = slot.state.clone();
            let refused = match self.reducer.apply(&mut next, &op, &cx) {
                Err(r) => Some(r),
                Ok(()) if !json_fits(&next, config.max_state_bytes) => {
                    Some(Reject::with_code(413, format!("the state would exceed {} bytes", config.max_state_bytes)))
                }
                Ok(()) => None,
            };
            if let Some(r) = refused {
                let q = slot.refused.entry(req.client.clone()).or_default();
                q.push_back((req.seq, user.clone(), r.clone()));
                while q.len() > config.refusal_window {
                    q.pop_front();
                }
                if slot.refused.len() > 10_000 {
                    slot.refused.clear();
                }
                return Err(refusal(r.code(), r.message(), slot.version));
            }
            let version = slot.version + 1;
            let snapshot = if version % config.snapshot_every.max(1) == 0 {
                Some(serde_json::to_value(&next).map_err(|e| CallError::internal(e.to_string()))?)
            } else {
                None
            };
            let record = OpRecord {
                version,
                client: req.client.clone(),
                seq: req.seq,
                user: user.clone(),
                base: req.base,
                op: req.op.clone(),
            };
            let append = Append { expected: slot.version, record: record.clone(), snapshot };
            match self.common.store(self.common.store.append(room, append)).await? {
                Appended::Done => {
                    slot.state = next;
                    slot.version = version;
                    slot.note_client(&req.client, ClientRecord { seq: req.seq, version, user });
                    // Broadcast under the room's lock: this node's broadcasts are in version order.
                    if let Err(e) = call.hub().publish(room, "sync.op", &record).await {
                        // Applied and stored; members catch up through `sync.get`.
                        tracing::warn!(room = &**room, error = %e, "sync: broadcast of an applied op failed");
                    }
                    return Ok(json!({ "version": version }));
                }
                Appended::Conflict { .. } => {
                    caught_up = true;
                    self.catch_up(room, &mut slot).await?;
                }
                Appended::Duplicate(rec) => slot.note_client(&req.client, rec),
            }
        }
        Err(unavailable())
    }

    async fn read(&self, call: &Call, room: &Arc<str>, req: GetRequest) -> Result<Value, CallError> {
        if let Some(c) = &req.client {
            if !valid_client_id(c) {
                return Err(CallError::bad_request("client must be 1-64 bytes of A-Z a-z 0-9 _ -"));
            }
        }
        let slot = self.slot(call.hub(), room);
        let mut slot = slot.lock().await;
        self.catch_up(room, &mut slot).await?;
        let version = slot.version;
        let mut reply = serde_json::Map::new();
        reply.insert("version".into(), version.into());
        reply.insert("user".into(), call.user_id().into());
        if let Some(c) = &req.client {
            let seq = self.client_record(room, &mut slot, c).await?.map_or(0, |r| r.seq);
            reply.insert("client_seq".into(), seq.into());
        }
        match req.since {
            Some(since) if since > version => {
                return Err(refusal(400, format!("since {since} is ahead of the room's version {version}"), version));
            }
            Some(since) if since == version => {
                reply.insert("ops".into(), Value::Array(Vec::new()));
                return Ok(Value::Object(reply));
            }
            Some(since) => {
                let loaded = self.common.store(self.common.store.load(room, Some(since))).await?;
                let ops: Vec<&OpRecord> = loaded.ops.iter().filter(|op| op.version <= version).collect();
                let contiguous = ops.iter().enumerate().all(|(i, op)| op.version == since + 1 + i as u64);
                if loaded.snapshot.is_none() && contiguous && ops.len() as u64 == version - since {
                    reply.insert(
                        "ops".into(),
                        serde_json::to_value(ops).map_err(|e| CallError::internal(e.to_string()))?,
                    );
                    return Ok(Value::Object(reply));
                }
            }
            None => {}
        }
        let state = serde_json::to_value(&slot.state).map_err(|e| CallError::internal(e.to_string()))?;
        reply.insert("state".into(), state);
        Ok(Value::Object(reply))
    }
}

impl<R: Reducer> Kind for Typed<R> {
    fn op(self: Arc<Self>, call: Call, room: Arc<str>, req: OpRequest) -> BoxFuture<'static, Result<Value, CallError>> {
        Box::pin(async move { self.apply_op(&call, &room, req).await })
    }

    fn get(
        self: Arc<Self>,
        call: Call,
        room: Arc<str>,
        req: GetRequest,
    ) -> BoxFuture<'static, Result<Value, CallError>> {
        Box::pin(async move { self.read(&call, &room, req).await })
    }
}
