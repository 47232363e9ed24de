//! The presence engine of one hub.
//!
//! **State.** One [`RoomView`] per presence room with local members: every
//! meta of the room (this node's and other nodes'), the local connections
//! that receive its presence messages, the changes pending for the next
//! diff. A view's state sits behind one mutex, held only for in-memory work
//! (no await under it): joins, leaves, updates, remote changes, flushes and
//! expiries of one room are serialized, rooms are independent. Views are
//! indexed by an `RwLock`ed map, written only when a room's first local
//! member arrives or its last one leaves.
//!
//! **Lock order:** session rooms → view index → view state → a session's
//! outbox. The local-key index and the inboxes below are leaf locks.
//!
//! **Tasks** (two per hub, started with the first presence join; they hold
//! only weak references and stop when the hub is dropped):
//!
//! - the **timer** task owns a `DelayQueue` with at most one flush entry per
//!   room with pending changes (armed by the first change of a window) and
//!   at most one expiry entry per meta with ephemeral flags;
//! - the **sync** task writes this node's changes to the [`PresenceStore`]
//!   and publishes them to the backplane, rewrites all of this node's
//!   entries every `ttl / 3`, and then reconciles each view with the store
//!   (entries of vanished nodes become leaves). It reads the *current* state
//!   of each changed meta when it runs, so its inbox is a set of
//!   `(room, connection)` marks, bounded by this node's memberships.
//!
//! **Remote changes** arrive through one forwarder task per view (the
//! view's backplane subscription); a view that is still loading from the
//! store buffers them and applies them after the store's snapshot.

use super::config::PresenceConfig;
use super::wire::{
    self, Count, DiffData, FlagChanges, NodeBatch, StateData, UpdateReply, UpdateRequest, WireChange, WireEntry,
};
use super::{
    conn_ref, Map, PresenceCause, PresenceCount, PresenceEntry, PresenceEvent, PresenceMeta, PresenceQuery,
    PresenceRecord, PresenceStats, PresenceStore, StoreChange,
};
use crate::backplane::Subscription;
use crate::error::ErrorKind;
use crate::hub::extension::{PresenceHello, WeakHub};
use crate::hub::room::validate_room_name;
use crate::hub::session::{Session, Wire};
use crate::hub::{Hub, TaskGuard};
use crate::protocol::{Envelope, ErrorCode, Format, Kind, Parts, Payload};
use crate::util::{bounded, unix_ms, AbortOnDrop, TokenBucket};
use bytes::Bytes;
use futures::StreamExt;
use parking_lot::{Mutex, RwLock};
use serde::Serialize;
use serde_json::Value;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::time::DelayQueue;

pub(crate) type MetaFn = Arc<dyn Fn(&crate::hub::Connection, &str) -> Option<Map> + Send + Sync>;
pub(crate) type PresenceHook = Arc<dyn Fn(&Hub, &PresenceEvent) + Send + Sync>;

/// A meta's identity: (node, connection on that node).
type Id = (u64, u64);

/// Most remote changes a loading view buffers; beyond, they are dropped and
/// the next reconciliation with the store repairs the view.
const MAX_BUFFERED: usize = 4096;

/// One connection's meta in one room.
#[derive(Debug, Clone)]
pub(crate) struct Meta {
    pub key: Arc<str>,
    pub conn_ref: Arc<str>,
    pub joined_at: u64,
    /// The host's part (this node's metas only): keys the client may not set.
    pub host: Map,
    /// What clients see: the client's part with the host's part over it.
    pub meta: Map,
    /// Ephemeral flags and when each expires.
    pub ephemeral: BTreeMap<String, (Value, Instant)>,
}

impl Meta {
    /// Whether clients would see the same thing (deadlines aside).
    fn same_view(&self, other: &Meta) -> bool {
        self.joined_at == other.joined_at
            && self.meta == other.meta
            && self.ephemeral.len() == other.ephemeral.len()
            && self.ephemeral.iter().zip(&other.ephemeral).all(|((ka, (va, _)), (kb, (vb, _)))| ka == kb && va == vb)
    }

    fn from_record(record: PresenceRecord, ephemeral: BTreeMap<String, (Value, Instant)>) -> Meta {
        Meta {
            key: record.key.into(),
            conn_ref: conn_ref(record.node, record.connection).into(),
            joined_at: record.joined_at,
            host: Map::new(),
            meta: record.meta,
            ephemeral,
        }
    }

    fn from_wire(node: u64, conn: u64, entry: WireEntry, now: Instant) -> Meta {
        let ephemeral = entry
            .ephemeral
            .into_iter()
            .map(|(k, (v, ttl_ms))| (k, (v, later(now, Duration::from_millis(ttl_ms)))))
            .collect();
        Meta {
            key: entry.key.into(),
            conn_ref: conn_ref(node, conn).into(),
            joined_at: entry.joined_at,
            host: Map::new(),
            meta: entry.meta,
            ephemeral,
        }
    }

    fn to_wire(&self, now: Instant) -> WireEntry {
        WireEntry {
            key: self.key.to_string(),
            joined_at: self.joined_at,
            meta: self.meta.clone(),
            ephemeral: self
                .ephemeral
                .iter()
                .map(|(k, (v, d))| (k.clone(), (v.clone(), d.saturating_duration_since(now).as_millis() as u64)))
                .collect(),
        }
    }

    fn to_record(&self, room: &str, id: Id) -> PresenceRecord {
        PresenceRecord {
            room: room.to_owned(),
            key: self.key.to_string(),
            node: id.0,
            connection: id.1,
            joined_at: self.joined_at,
            meta: self.meta.clone(),
        }
    }

    fn to_public(&self, id: Id) -> PresenceMeta {
        PresenceMeta {
            conn_ref: self.conn_ref.to_string(),
            node: id.0,
            connection: id.1,
            joined_at: self.joined_at,
            meta: self.meta.clone(),
            ephemeral: self.ephemeral.iter().map(|(k, (v, _))| (k.clone(), v.clone())).collect(),
        }
    }
}

struct Slot {
    meta: Meta,
    /// What the meta adds to the member list's JSON ([`wire::list_size`]).
    size: usize,
    /// The token of this meta's expiry entry in the timer wheel, if any (an
    /// entry with another token is stale and does nothing).
    expiry: Option<u64>,
    /// This node's metas only: the client's update bucket.
    bucket: Option<TokenBucket>,
}

/// A change waiting for the next diff, coalesced per meta.
struct Pending {
    /// The meta as the members last got it (at the start of the window):
    /// `None` if it was not in the view then. A leave sends it; a change of
    /// its flags alone is diffed against it; and the joiners' state (the
    /// view as the members have it) is rebuilt from it.
    before: Option<Meta>,
}

#[derive(Default)]
struct SetOutcome {
    inserted: bool,
    key_joined: bool,
    changed: bool,
}

pub(crate) struct RoomState {
    slots: HashMap<Id, Slot>,
    /// Metas per key.
    keys: HashMap<Arc<str>, usize>,
    /// Local connections that got the state and get the diffs.
    receivers: HashMap<u64, Weak<Session>>,
    /// Receivers whose queue had no room for a presence message: they get
    /// no diffs, and the whole state as soon as it fits (retried every
    /// batch window). A presence message never closes a connection.
    behind: HashSet<u64>,
    /// The view as the members have it (as of the last flush), encoded per
    /// wire form: every joiner until the next flush gets these same bytes.
    joiner_states: [Option<Bytes>; Wire::COUNT],
    /// How many times a joiners' state was encoded (tests).
    states_encoded: u64,
    /// The member list's JSON size: the sum of the slots' `size`.
    list_bytes: usize,
    pending: HashMap<Id, Pending>,
    /// Send the whole state at the next flush (mode switch, too many changes).
    full_pending: bool,
    counts_mode: bool,
    flush_armed: bool,
    /// The count last broadcast.
    last_count: Option<Count>,
    /// The store's snapshot has been merged (always, without a backplane).
    loaded: bool,
    buffer: Vec<NodeBatch>,
    buffered: usize,
    /// During a reconciliation: metas a backplane change touched meanwhile.
    reconciling: Option<HashSet<Id>>,
    next_token: u64,
}

type Events = Vec<(Arc<str>, bool, PresenceCause)>;

impl RoomState {
    fn new(loaded: bool) -> RoomState {
        RoomState {
            slots: HashMap::new(),
            keys: HashMap::new(),
            receivers: HashMap::new(),
            behind: HashSet::new(),
            joiner_states: Default::default(),
            states_encoded: 0,
            list_bytes: 0,
            pending: HashMap::new(),
            full_pending: false,
            counts_mode: false,
            flush_armed: false,
            last_count: None,
            loaded,
            buffer: Vec::new(),
            buffered: 0,
            reconciling: None,
            next_token: 0,
        }
    }

    fn count(&self) -> Count {
        Count { keys: self.keys.len(), connections: self.slots.len() }
    }

    /// Notes a change of one meta for the next diff; `before`: the meta
    /// before this change (`None`: it is new).
    fn record(&mut self, id: Id, before: Option<Meta>, cfg: &PresenceConfig) {
        if self.counts_mode {
            return;
        }
        if self.full_pending {
            // Joiners get the view as it is (`joiner_state`): it changed.
            self.joiner_states = Default::default();
            return;
        }
        if self.pending.contains_key(&id) {
            // The window's first `before` is what the members have.
            return;
        }
        if self.pending.len() >= cfg.max_pending {
            // Overflow: the next flush sends the whole state instead.
            self.full_pending = true;
            self.pending.clear();
            self.joiner_states = Default::default();
            return;
        }
        self.pending.insert(id, Pending { before });
    }

    fn set(&mut self, id: Id, meta: Meta, cfg: &PresenceConfig) -> SetOutcome {
        if let Some(slot) = self.slots.get_mut(&id) {
            if slot.meta.same_view(&meta) {
                // Only deadlines moved.
                slot.meta.ephemeral = meta.ephemeral;
                return SetOutcome::default();
            }
            let size = wire::list_size(&meta);
            self.list_bytes = self.list_bytes - slot.size + size;
            slot.size = size;
            let before = std::mem::replace(&mut slot.meta, meta);
            self.record(id, Some(before), cfg);
            return SetOutcome { changed: true, ..SetOutcome::default() };
        }
        let n = self.keys.entry(meta.key.clone()).or_insert(0);
        *n += 1;
        let key_joined = *n == 1;
        let size = wire::list_size(&meta);
        self.list_bytes += size;
        self.slots.insert(id, Slot { meta, size, expiry: None, bucket: None });
        self.record(id, None, cfg);
        SetOutcome { inserted: true, key_joined, changed: true }
    }

    /// Removes a meta; returns its key and whether the key left.
    fn unset(&mut self, id: Id, cfg: &PresenceConfig) -> Option<(Arc<str>, bool)> {
        let slot = self.slots.remove(&id)?;
        self.list_bytes -= slot.size;
        let key = slot.meta.key.clone();
        let left = match self.keys.get_mut(&key) {
            Some(n) if *n > 1 => {
                *n -= 1;
                false
            }
            _ => {
                self.keys.remove(&key);
                true
            }
        };
        self.record(id, Some(slot.meta), cfg);
        Some((key, left))
    }

    /// Whether this change is the first of a window (the caller schedules
    /// the flush).
    fn arm_flush(&mut self) -> bool {
        !std::mem::replace(&mut self.flush_armed, true)
    }

    /// The expiry entry to schedule for a meta (token, when its earliest
    /// ephemeral flag expires), unless one is scheduled already.
    fn arm_expiry(&mut self, id: Id) -> Option<(u64, Instant)> {
        let slot = self.slots.get_mut(&id)?;
        if slot.expiry.is_some() {
            return None;
        }
        let at = slot.meta.ephemeral.values().map(|(_, d)| *d).min()?;
        self.next_token += 1;
        slot.expiry = Some(self.next_token);
        Some((self.next_token, at))
    }

    /// An expiry entry fired: drops the meta's expired flags. Returns whether
    /// the view changed, and the entry to schedule next.
    fn expire(&mut self, id: Id, token: u64, now: Instant, cfg: &PresenceConfig) -> (bool, Option<(u64, Instant)>) {
        let Some(slot) = self.slots.get_mut(&id) else { return (false, None) };
        if slot.expiry != Some(token) {
            return (false, None);
        }
        slot.expiry = None;
        let before_len = slot.meta.ephemeral.len();
        let before = slot.meta.clone();
        slot.meta.ephemeral.retain(|_, (_, d)| *d > now);
        let changed = slot.meta.ephemeral.len() != before_len;
        if changed {
            let size = wire::list_size(&slot.meta);
            self.list_bytes = self.list_bytes - slot.size + size;
            slot.size = size;
            self.record(id, Some(before), cfg);
        }
        (changed, self.arm_expiry(id))
    }

    /// Switches between member lists and counts as the room crosses the
    /// thresholds (with hysteresis); a switch makes everyone get the state
    /// again.
    fn update_mode(&mut self, cfg: &PresenceConfig) {
        let (keys, connections, bytes) = (self.keys.len(), self.slots.len(), self.list_bytes);
        let limit = cfg.counts_only_above;
        // Connections and bytes too, not only keys: one user with hundreds
        // of tabs, or big metas, must not grow the member list (and every
        // joiner's state) past a share of what a connection's queue holds.
        let conn_limit = limit.saturating_mul(2);
        let byte_limit = cfg.max_state_bytes;
        let want = if self.counts_mode {
            keys > limit - limit / 4 || connections > conn_limit - conn_limit / 4 || bytes > byte_limit - byte_limit / 4
        } else {
            keys > limit || connections > conn_limit || bytes > byte_limit
        };
        if want != self.counts_mode {
            self.counts_mode = want;
            self.full_pending = true;
            self.pending.clear();
        }
    }

    /// The `presence_state` for a joiner, in `wire`'s form: the view as the
    /// members have it (as of the last flush; the joiner's own meta and
    /// what else changed since come in the next diff, which it gets too).
    /// Encoded once per flush and form, then shared by every joiner: a join
    /// storm costs one encoding per batch window, not one per join. In a
    /// counts-only room, the current count.
    fn joiner_state(&mut self, room: &str, wire: Wire, cfg: &PresenceConfig) -> Option<Bytes> {
        // After an overflow the pending changes are gone, so the members'
        // view cannot be rebuilt: joiners get the view as it is (the flush
        // sends it to everyone), or its count if its list is over the bound.
        let overflowed_big = self.full_pending && self.list_bytes > cfg.max_state_bytes;
        if self.counts_mode || overflowed_big {
            let count = self.count();
            if self.last_count != Some(count) {
                // The joiner has a count the members have not: the flush
                // this join armed sends the count whatever it is then.
                self.last_count = None;
            }
            let data = StateData { count, presences: None };
            return encode(Kind::PresenceState, room, &data, wire.format)
                .map(|b| wire.prepare(Kind::PresenceState, None, b));
        }
        if let Some(bytes) = &self.joiner_states[wire.index()] {
            return Some(bytes.clone());
        }
        let bytes = if self.full_pending {
            encode(Kind::PresenceState, room, &state_data(&self.slots, self.count(), false), wire.format)
        } else {
            let metas = self
                .slots
                .iter()
                .filter(|(id, _)| !self.pending.contains_key(id))
                .map(|(_, s)| &s.meta)
                .chain(self.pending.values().filter_map(|p| p.before.as_ref()));
            let presences = wire::group(metas);
            let count = Count { keys: presences.len(), connections: presences.values().map(|m| m.0.len()).sum() };
            encode(Kind::PresenceState, room, &StateData { count, presences: Some(presences) }, wire.format)
        };
        let bytes = wire.prepare(Kind::PresenceState, None, bytes?);
        self.states_encoded += 1;
        self.joiner_states[wire.index()] = Some(bytes.clone());
        Some(bytes)
    }

    /// The end of a batch window: sends the room's members one diff (or the
    /// whole state, or the new count), then the whole state to receivers
    /// that were behind and have room now. Returns whether some are still
    /// behind: then the flush stays armed and runs again a window later.
    fn flush(&mut self, room: &str, cfg: &PresenceConfig) -> bool {
        self.update_mode(cfg);
        let count = self.count();
        let pending = std::mem::take(&mut self.pending);
        if std::mem::take(&mut self.full_pending) {
            // Everyone gets it, those behind included.
            self.behind.clear();
            let data = state_data(&self.slots, count, self.counts_mode);
            broadcast(&mut self.receivers, &mut self.behind, Kind::PresenceState, room, &data);
        } else if self.counts_mode {
            if self.last_count != Some(count) {
                let data = DiffData { count, joins: None, leaves: None, ephemeral: None };
                broadcast(&mut self.receivers, &mut self.behind, Kind::PresenceDiff, room, &data);
            }
        } else {
            let mut joins = Vec::new();
            let mut leaves = Vec::new();
            let mut flags = FlagChanges::new();
            for (id, p) in &pending {
                match (self.slots.get(id), &p.before) {
                    // Changed and back within the window.
                    (Some(slot), Some(before)) if slot.meta.same_view(before) => {}
                    (Some(slot), Some(before)) if wire::flags_only(before, &slot.meta) => {
                        let m = &slot.meta;
                        flags.entry(&m.key).or_default().insert(&m.conn_ref, wire::flag_changes(before, m));
                    }
                    (Some(slot), _) => joins.push(&slot.meta),
                    (None, Some(before)) => leaves.push(before),
                    (None, None) => {} // joined and left within the window
                }
            }
            if !(joins.is_empty() && leaves.is_empty() && flags.is_empty() && self.last_count == Some(count)) {
                let data = DiffData {
                    count,
                    joins: Some(wire::group(joins.into_iter())),
                    leaves: Some(wire::group(leaves.into_iter())),
                    ephemeral: (!flags.is_empty()).then_some(flags),
                };
                broadcast(&mut self.receivers, &mut self.behind, Kind::PresenceDiff, room, &data);
            }
        }
        self.last_count = Some(count);
        // The members have the view as it is now: so do the next joiners.
        self.joiner_states = Default::default();
        self.catch_up(room, cfg);
        self.flush_armed = !self.behind.is_empty();
        self.flush_armed
    }

    /// Receivers behind get the whole state if their queue has room for it
    /// now; the others stay behind until a later flush.
    fn catch_up(&mut self, room: &str, cfg: &PresenceConfig) {
        let ids: Vec<u64> = self.behind.iter().copied().collect();
        for id in ids {
            let Some(session) = self.receivers.get(&id).and_then(Weak::upgrade) else {
                self.receivers.remove(&id);
                self.behind.remove(&id);
                continue;
            };
            if self.joiner_state(room, session.wire(), cfg).is_some_and(|b| session.offer_prepared(b)) {
                crate::metrics::messages_out(Kind::PresenceState, 1);
                self.behind.remove(&id);
            }
        }
    }

    /// Applies another node's changes.
    fn apply_batch(
        &mut self,
        batch: NodeBatch,
        cfg: &PresenceConfig,
        events: &mut Events,
        expiries: &mut Vec<(Id, (u64, Instant))>,
    ) -> bool {
        let now = Instant::now();
        let mut changed = false;
        for c in batch.changes {
            let id = (batch.node, c.conn);
            if let Some(touched) = &mut self.reconciling {
                touched.insert(id);
            }
            match c.entry {
                Some(entry) => {
                    let out = self.set(id, Meta::from_wire(batch.node, c.conn, entry, now), cfg);
                    changed |= out.changed;
                    if out.key_joined {
                        events.push((self.slots[&id].meta.key.clone(), true, PresenceCause::Remote));
                    }
                    if let Some(armed) = self.arm_expiry(id) {
                        expiries.push((id, armed));
                    }
                }
                None => {
                    if let Some((key, left)) = self.unset(id, cfg) {
                        changed = true;
                        if left {
                            events.push((key, false, PresenceCause::Remote));
                        }
                    }
                }
            }
        }
        changed
    }

    /// Makes the other nodes' part of the view equal to the store's records,
    /// except for metas a backplane change touched during the listing.
    fn reconcile(
        &mut self,
        own: u64,
        records: Vec<PresenceRecord>,
        touched: &HashSet<Id>,
        cfg: &PresenceConfig,
        events: &mut Events,
    ) -> bool {
        let stored: HashMap<Id, PresenceRecord> = records
            .into_iter()
            .filter(|r| r.node != own)
            .map(|r| ((r.node, r.connection), r))
            .filter(|(id, _)| !touched.contains(id))
            .collect();
        let stale: Vec<Id> = self
            .slots
            .keys()
            .filter(|id| id.0 != own && !stored.contains_key(id) && !touched.contains(id))
            .copied()
            .collect();
        let mut changed = false;
        for id in stale {
            if let Some((key, left)) = self.unset(id, cfg) {
                changed = true;
                if left {
                    events.push((key, false, PresenceCause::Expired));
                }
            }
        }
        for (id, record) in stored {
            let ephemeral = match self.slots.get(&id) {
                Some(slot) if slot.meta.meta == record.meta && *slot.meta.key == *record.key => continue,
                Some(slot) => slot.meta.ephemeral.clone(),
                None => BTreeMap::new(),
            };
            let out = self.set(id, Meta::from_record(record, ephemeral), cfg);
            changed |= out.changed;
            if out.key_joined {
                events.push((self.slots[&id].meta.key.clone(), true, PresenceCause::Remote));
            }
        }
        changed
    }
}

fn state_data(slots: &HashMap<Id, Slot>, count: Count, counts_mode: bool) -> StateData<'_> {
    let presences = (!counts_mode).then(|| wire::group(slots.values().map(|s| &s.meta)));
    StateData { count, presences }
}

/// Queues a presence envelope to every receiver that is not behind, encoded
/// at most once per wire form, if it fits in the receiver's queue; a
/// receiver whose queue has no room is put `behind` (it gets the whole
/// state later), never closed. Forgets receivers that are gone.
fn broadcast<T: Serialize>(
    receivers: &mut HashMap<u64, Weak<Session>>,
    behind: &mut HashSet<u64>,
    kind: Kind,
    room: &str,
    data: &T,
) {
    let mut frames: [Option<Option<Bytes>>; Wire::COUNT] = Default::default();
    let mut sent = 0;
    receivers.retain(|id, weak| {
        let Some(session) = weak.upgrade() else {
            behind.remove(id);
            return false;
        };
        if behind.contains(id) {
            return true;
        }
        let wire = session.wire();
        let slot = &mut frames[wire.index()];
        if let Some(bytes) =
            slot.get_or_insert_with(|| encode(kind, room, data, wire.format).map(|b| wire.prepare(kind, None, b)))
        {
            if !session.offer_prepared(bytes.clone()) {
                behind.insert(*id);
            } else {
                sent += 1;
            }
        }
        true
    });
    crate::metrics::messages_out(kind, sent);
}

fn encode<T: Serialize>(kind: Kind, room: &str, data: &T, format: Format) -> Option<Bytes> {
    match Payload::encode(format, data) {
        Ok(p) => Some(Parts { room: Some(room), data: Some(p.bytes()), ..Parts::new(kind) }.encode(format)),
        Err(e) => {
            tracing::warn!(room, error = %e, "presence message does not encode");
            None
        }
    }
}

/// One presence room's view on this node.
pub(crate) struct RoomView {
    room: Arc<str>,
    state: Mutex<RoomState>,
    /// Loads the store's snapshot once (backplane only).
    loader: tokio::sync::OnceCell<()>,
    /// The forwarder of `$presence:<room>`, aborted with the view.
    subscription: Mutex<Option<AbortOnDrop>>,
}

/// A timer entry. It holds its view weakly: a timer of a view that was
/// dropped (and maybe replaced by a new one for the same room) does nothing.
enum TimerCmd {
    Flush(Weak<RoomView>),
    Expire(Weak<RoomView>, Id, u64),
}

/// What the hub shares with its presence tasks.
struct Shared {
    /// Timers to schedule: at most one flush per room and one expiry per
    /// meta are in flight (`RoomState::flush_armed`, `Slot::expiry`).
    timers: Mutex<Vec<(TimerCmd, Instant)>>,
    timers_notify: Notify,
    /// This node's metas to write and publish: room → connection → whether
    /// the store needs the write (ephemeral-only changes do not).
    outgoing: Mutex<HashMap<Arc<str>, HashMap<u64, bool>>>,
    outgoing_notify: Notify,
    stop: CancellationToken,
}

/// A hub's presence: configuration, store, hooks, views, tasks.
pub(crate) struct PresenceHub {
    pub(crate) config: PresenceConfig,
    node: u64,
    /// Whether the hub has a backplane (other nodes to tell).
    backplane: bool,
    store: Arc<dyn PresenceStore>,
    meta_fn: Option<MetaFn>,
    on_join: Option<PresenceHook>,
    on_leave: Option<PresenceHook>,
    views: RwLock<HashMap<Arc<str>, Arc<RoomView>>>,
    /// This node's metas per key, across rooms (for `is_user_online`).
    local_keys: Mutex<HashMap<Arc<str>, usize>>,
    shared: Arc<Shared>,
    /// Serializes store writes (a flush racing the sync task at shutdown).
    write_lock: tokio::sync::Mutex<()>,
    started: OnceLock<()>,
}

impl Drop for PresenceHub {
    fn drop(&mut self) {
        self.shared.stop.cancel();
    }
}

/// `now + d`, at most a year ahead (a peer node or a host setting may ask
/// for absurd durations, and `Instant` addition would panic).
fn later(now: Instant, d: Duration) -> Instant {
    const YEAR: Duration = Duration::from_secs(365 * 24 * 3600);
    now + d.min(YEAR)
}

impl PresenceHub {
    /// `store.list`, bounded by [`PresenceConfig::store_timeout`]: a hung
    /// store fails the call with [`ErrorKind::Presence`](crate::ErrorKind::Presence)
    /// instead of holding the sync lock (and so every room's writes, and
    /// shutdown) forever.
    fn store_list(
        &self,
        query: PresenceQuery,
    ) -> impl std::future::Future<Output = crate::Result<Vec<PresenceRecord>>> {
        bounded(self.config.store_timeout, ErrorKind::Presence, "presence store list", self.store.list(query))
    }

    /// `store.write`, bounded by [`PresenceConfig::store_timeout`].
    fn store_write(
        &self,
        changes: Vec<StoreChange>,
        ttl: Duration,
    ) -> impl std::future::Future<Output = crate::Result<()>> {
        bounded(self.config.store_timeout, ErrorKind::Presence, "presence store write", self.store.write(changes, ttl))
    }

    pub(crate) fn new(
        config: PresenceConfig,
        node: u64,
        backplane: bool,
        store: Arc<dyn PresenceStore>,
        meta_fn: Option<MetaFn>,
        on_join: Option<PresenceHook>,
        on_leave: Option<PresenceHook>,
    ) -> PresenceHub {
        PresenceHub {
            config,
            node,
            backplane,
            store,
            meta_fn,
            on_join,
            on_leave,
            views: RwLock::default(),
            local_keys: Mutex::default(),
            shared: Arc::new(Shared {
                timers: Mutex::default(),
                timers_notify: Notify::new(),
                outgoing: Mutex::default(),
                outgoing_notify: Notify::new(),
                stop: CancellationToken::new(),
            }),
            write_lock: tokio::sync::Mutex::new(()),
            started: OnceLock::new(),
        }
    }

    pub(crate) fn enabled(&self, room: &str) -> bool {
        self.config.rooms.matches(room)
    }

    pub(crate) fn hello(&self) -> PresenceHello {
        PresenceHello {
            ephemeral_ttl_ms: self.config.ephemeral_ttl.as_millis() as u64,
            max_meta_bytes: self.config.max_meta_bytes,
            update_rate: self.config.update_rate,
            update_burst: self.config.update_burst,
        }
    }

    fn view(&self, room: &str) -> Option<Arc<RoomView>> {
        self.views.read().get(room).cloned()
    }

    fn start(&self, hub: &Hub) {
        self.started.get_or_init(|| {
            let weak = hub.downgrade();
            tokio::spawn(timer_task(weak.clone(), self.shared.clone()));
            tokio::spawn(sync_task(weak, self.shared.clone(), self.config.refresh_interval()));
        });
    }

    fn schedule(&self, cmds: impl IntoIterator<Item = (TimerCmd, Instant)>) {
        let mut timers = self.shared.timers.lock();
        let before = timers.len();
        timers.extend(cmds);
        let added = timers.len() > before;
        drop(timers);
        if added {
            self.shared.timers_notify.notify_one();
        }
    }

    fn flush_cmd(&self, view: &Arc<RoomView>) -> (TimerCmd, Instant) {
        (TimerCmd::Flush(Arc::downgrade(view)), later(Instant::now(), self.config.batch_window))
    }

    fn mark(&self, room: &Arc<str>, conn: u64, store: bool) {
        *self.shared.outgoing.lock().entry(room.clone()).or_default().entry(conn).or_insert(false) |= store;
        self.shared.outgoing_notify.notify_one();
    }

    fn fire(&self, hub: &Hub, room: &str, events: Events) {
        for (key, joined, cause) in events {
            let hook = if joined { &self.on_join } else { &self.on_leave };
            if let Some(h) = hook {
                let event = PresenceEvent { room: room.to_owned(), key: key.to_string(), cause };
                if std::panic::catch_unwind(AssertUnwindSafe(|| h(hub, &event))).is_err() {
                    tracing::error!(room, "a presence hook panicked; the panic was contained");
                }
            }
        }
    }

    /// Counts this node's metas per key. Called under the view's lock (the
    /// index is a leaf lock), so increments and decrements of one meta are
    /// in order.
    fn local_key(&self, key: &Arc<str>, delta: isize) {
        let mut keys = self.local_keys.lock();
        let n = keys.entry(key.clone()).or_insert(0);
        *n = n.saturating_add_signed(delta);
        if *n == 0 {
            keys.remove(key);
        }
    }

    /// Before a join is answered: makes sure the room's view exists and
    /// holds the other nodes' metas (subscribed to their changes, then the
    /// store's snapshot). Called with the connection already a member.
    pub(crate) async fn prepare(&self, hub: &Hub, room: &str) -> crate::Result<()> {
        if !self.enabled(room) {
            return Ok(());
        }
        self.start(hub);
        let backplane = hub.backplane().is_some();
        let view = self
            .views
            .write()
            .entry(Arc::from(room))
            .or_insert_with(|| {
                Arc::new(RoomView {
                    room: Arc::from(room),
                    state: Mutex::new(RoomState::new(!backplane)),
                    loader: tokio::sync::OnceCell::new(),
                    subscription: Mutex::new(None),
                })
            })
            .clone();
        if !backplane {
            return Ok(());
        }
        view.loader.get_or_try_init(|| self.load(hub, &view)).await.map(|_| ())
    }

    async fn load(&self, hub: &Hub, view: &Arc<RoomView>) -> crate::Result<()> {
        let Some(backplane) = hub.backplane() else { return Ok(()) };
        // Subscribe first, then list: a change the snapshot misses was
        // published after the subscription started (nodes write the store
        // before they publish), so it is in the buffer.
        let sub = backplane.subscribe(&wire::topic(&view.room)).await?;
        let task = tokio::spawn(forward(sub, hub.downgrade(), Arc::downgrade(view), hub.task_guard()));
        *view.subscription.lock() = Some(AbortOnDrop(task));
        let records = match self.store_list(PresenceQuery::Room(view.room.to_string())).await {
            Ok(r) => r,
            Err(e) => {
                view.subscription.lock().take();
                return Err(e);
            }
        };
        let mut events = Vec::new();
        let mut expiries = Vec::new();
        {
            let mut st = view.state.lock();
            for record in records.into_iter().filter(|r| r.node != self.node) {
                let id = (record.node, record.connection);
                st.set(id, Meta::from_record(record, BTreeMap::new()), &self.config);
            }
            for batch in std::mem::take(&mut st.buffer) {
                st.apply_batch(batch, &self.config, &mut events, &mut expiries);
            }
            st.buffered = 0;
            // Nobody has the state yet: the first receivers get a snapshot.
            st.pending.clear();
            st.full_pending = false;
            st.joiner_states = Default::default();
            st.loaded = true;
        }
        self.schedule(
            expiries.into_iter().map(|(id, (token, at))| (TimerCmd::Expire(Arc::downgrade(view), id, token), at)),
        );
        self.fire(hub, &view.room, events);
        Ok(())
    }

    /// After a join reply (or a host join): tracks the connection's meta and
    /// sends it the room's state. Does nothing if it is no longer a member.
    pub(crate) fn after_join(&self, hub: &Hub, session: &Arc<Session>, room: &str) {
        if !self.enabled(room) {
            return;
        }
        let Some(view) = self.view(room) else { return };
        let host = match (&self.meta_fn, hub.connection(session.id)) {
            (Some(f), Some(conn)) => std::panic::catch_unwind(AssertUnwindSafe(|| f(&conn, room)))
                .unwrap_or_else(|_| {
                    tracing::error!(room, "the presence meta hook panicked; using an empty meta");
                    None
                })
                .unwrap_or_default(),
            _ => Map::new(),
        };
        let id = (self.node, session.id.get());
        let conn_ref: Arc<str> = conn_ref(id.0, id.1).into();
        let key: Arc<str> = match session.identity.user_id() {
            Some(user) => user.into(),
            None => format!("anon:{conn_ref}").into(),
        };
        let meta = Meta {
            key: key.clone(),
            conn_ref,
            joined_at: unix_ms(),
            meta: host.clone(),
            host,
            ephemeral: BTreeMap::new(),
        };
        let (outcome, flush) = {
            // Holding the connection's rooms lock: a concurrent leave either
            // ran before (not a member: nothing is tracked) or runs after
            // (and finds the meta to remove).
            let rooms = session.rooms.lock();
            if !rooms.iter().any(|r| &**r == room) {
                return;
            }
            let mut st = view.state.lock();
            if st.slots.contains_key(&id) {
                // Already tracked (a host join of a member): keep its meta.
                return;
            }
            let outcome = st.set(id, meta, &self.config);
            if let Some(slot) = st.slots.get_mut(&id) {
                slot.bucket.get_or_insert_with(|| TokenBucket::full(Instant::now()));
            }
            // The state and the receiver are added under the same lock as
            // flushes: every diff after this state is queued after it. The
            // state is the members' view, shared by this window's joiners;
            // this join (and a switch to counts it causes) comes in the
            // flush it arms. No room in the queue: the state follows when
            // there is (`catch_up`), never a close.
            let state = st.joiner_state(room, session.wire(), &self.config);
            if !state.is_some_and(|b| session.offer_prepared(b)) {
                st.behind.insert(id.1);
            } else {
                crate::metrics::messages_out(Kind::PresenceState, 1);
            }
            st.receivers.insert(id.1, Arc::downgrade(session));
            if outcome.inserted {
                // Under the view's lock, so a racing leave's decrement of the
                // same meta always comes after this increment.
                self.local_key(&key, 1);
            }
            drop(rooms);
            (outcome, st.arm_flush())
        };
        if flush {
            self.schedule([self.flush_cmd(&view)]);
        }
        if outcome.inserted {
            self.mark(&view.room, id.1, true);
        }
        if outcome.key_joined {
            self.fire(hub, room, vec![(key, true, PresenceCause::Local)]);
        }
    }

    /// After a connection left a room (by request, disconnect or rollback).
    /// `room_gone`: it was the room's last local member (a hint; the room's
    /// membership is checked again).
    pub(crate) fn leave(&self, hub: &Hub, session: &Session, room: &str, room_gone: bool) {
        if !self.enabled(room) {
            return;
        }
        if let Some(view) = self.view(room) {
            let id = (self.node, session.id.get());
            let (removed, flush) = {
                let mut st = view.state.lock();
                st.receivers.remove(&id.1);
                st.behind.remove(&id.1);
                match st.unset(id, &self.config) {
                    Some((key, left)) => {
                        self.local_key(&key, -1);
                        (Some((key, left)), st.arm_flush())
                    }
                    None => (None, false),
                }
            };
            if let Some((key, left)) = removed {
                if flush {
                    self.schedule([self.flush_cmd(&view)]);
                }
                self.mark(&view.room, id.1, true);
                if left {
                    self.fire(hub, room, vec![(key, false, PresenceCause::Local)]);
                }
            }
        }
        // The view goes when the room has no local members and holds none
        // of this node's metas. Checked after every leave, not only the one
        // that emptied the room: that leave's check can run late, after
        // another connection joined, got a meta and left the room again but
        // has not removed its meta yet; dropping the view then would strand
        // that meta (and its store record). Under the index's write lock, so
        // a join that made the room exist again either happened before (the
        // view stays) or creates a new view after.
        if room_gone || !hub.has_local_room(room) {
            let mut views = self.views.write();
            let unused = views.get(room).is_some_and(|v| v.state.lock().slots.keys().all(|id| id.0 != self.node));
            if unused && !hub.has_local_room(room) {
                views.remove(room);
            }
        }
    }

    /// A client's `presence` request: updates its own meta in one room.
    pub(crate) fn request(&self, session: &Arc<Session>, env: Envelope) {
        let reference = env.reference;
        let fail = |code: u32, msg: &str| session.send_error(reference, code, msg);
        let Some(room) = env.room.as_deref() else {
            return fail(ErrorCode::BAD_REQUEST.0, "`presence` needs a `room`");
        };
        if let Err(why) = validate_room_name(room) {
            return fail(ErrorCode::BAD_REQUEST.0, why);
        }
        if !self.enabled(room) {
            return fail(ErrorCode::BAD_REQUEST.0, "presence is not enabled in this room");
        }
        let Some(data) = &env.data else { return fail(ErrorCode::BAD_REQUEST.0, "`presence` needs `data`") };
        let req: UpdateRequest = match data.decode() {
            Ok(r) => r,
            Err(e) => return fail(ErrorCode::INVALID_PAYLOAD.0, &e.to_string()),
        };
        if req.meta.is_none() && req.ephemeral.is_none() {
            return fail(ErrorCode::BAD_REQUEST.0, "`presence` data needs `meta` or `ephemeral`");
        }
        let not_joined = || fail(ErrorCode::NOT_JOINED.0, "not a member of this room");
        let Some(view) = self.view(room) else { return not_joined() };
        let id = (self.node, session.id.get());
        let cfg = &self.config;
        let now = Instant::now();
        let (conn_ref, store, flush, expiry) = {
            let mut st = view.state.lock();
            let Some(slot) = st.slots.get_mut(&id) else {
                drop(st);
                return not_joined();
            };
            let bucket = slot.bucket.get_or_insert_with(|| TokenBucket::full(now));
            if let Err(wait) = bucket.take(now, Duration::from_secs(1) / cfg.update_rate.max(1), cfg.update_burst) {
                drop(st);
                return rate_limited(session, reference, wait);
            }
            let old = &slot.meta;
            if let Some(k) = req.meta.iter().flat_map(|m| m.keys()).find(|k| old.host.contains_key(*k)) {
                let msg = format!("meta key `{}` is set by the server", crate::protocol::truncate(k));
                drop(st);
                return fail(ErrorCode::FORBIDDEN.0, &msg);
            }
            let mut new = old.clone();
            if let Some(client) = req.meta {
                new.meta = client;
                new.meta.extend(old.host.iter().map(|(k, v)| (k.clone(), v.clone())));
            }
            for (k, v) in req.ephemeral.into_iter().flatten() {
                if v.is_null() {
                    new.ephemeral.remove(&k);
                } else {
                    new.ephemeral.insert(k, (v, later(now, cfg.ephemeral_ttl)));
                }
            }
            let client_part: Map = new
                .meta
                .iter()
                .filter(|(k, _)| !old.host.contains_key(*k))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            let flags: Map = new.ephemeral.iter().map(|(k, (v, _))| (k.clone(), v.clone())).collect();
            let size = serde_json::to_vec(&client_part)
                .map_or(usize::MAX, |v| v.len())
                .saturating_add(serde_json::to_vec(&flags).map_or(usize::MAX, |v| v.len()));
            if size > cfg.max_meta_bytes {
                drop(st);
                let msg = format!("presence meta and ephemeral flags larger than {} bytes", cfg.max_meta_bytes);
                return fail(ErrorCode::BAD_REQUEST.0, &msg);
            }
            let meta_changed = new.meta != old.meta;
            let conn_ref = new.conn_ref.clone();
            let outcome = st.set(id, new, cfg);
            let expiry = st.arm_expiry(id);
            let flush = outcome.changed && st.arm_flush();
            (conn_ref, meta_changed, flush, expiry)
        };
        let room_arc = view.room.clone();
        let mut cmds = Vec::new();
        if flush {
            cmds.push(self.flush_cmd(&view));
        }
        if let Some((token, at)) = expiry {
            cmds.push((TimerCmd::Expire(Arc::downgrade(&view), id, token), at));
        }
        self.schedule(cmds);
        // Other nodes need even a deadline-only refresh (they expire flags
        // on their own clocks); the store only needs meta changes.
        if store || self.backplane {
            self.mark(&room_arc, id.1, store);
        }
        if let Some(r) = reference {
            if let Ok(p) = Payload::encode(session.format, &UpdateReply { room, conn_ref: &conn_ref }) {
                session.send_reply(r, &p);
            }
        }
    }
}

/// `420 rate_limited` with `retry_after_ms`, as for the connection's
/// message rate limit.
fn rate_limited(session: &Session, reference: Option<u64>, wait: Duration) {
    let retry_after_ms = u64::try_from(wait.as_micros().div_ceil(1000)).unwrap_or(u64::MAX).max(1);
    session.send_error_data(
        reference,
        ErrorCode::RATE_LIMITED.0,
        "presence update rate exceeded",
        &serde_json::json!({ "retry_after_ms": retry_after_ms }),
    );
}

impl PresenceHub {
    /// A room's presence, from this node's view when it has one, from the
    /// store otherwise (then without ephemeral flags).
    pub(crate) async fn entries(&self, room: &str) -> crate::Result<Vec<PresenceEntry>> {
        if let Some(view) = self.view(room) {
            let st = view.state.lock();
            if st.loaded {
                let mut by_key: BTreeMap<&str, Vec<PresenceMeta>> = BTreeMap::new();
                for (id, slot) in &st.slots {
                    by_key.entry(&slot.meta.key).or_default().push(slot.meta.to_public(*id));
                }
                return Ok(finish(by_key));
            }
        }
        let records = self.store_list(PresenceQuery::Room(room.to_owned())).await?;
        let mut by_key: BTreeMap<&str, Vec<PresenceMeta>> = BTreeMap::new();
        for r in &records {
            let meta = Meta::from_record(r.clone(), BTreeMap::new());
            by_key.entry(&r.key).or_default().push(meta.to_public((r.node, r.connection)));
        }
        Ok(finish(by_key))
    }

    pub(crate) async fn count(&self, room: &str) -> crate::Result<PresenceCount> {
        if let Some(view) = self.view(room) {
            let st = view.state.lock();
            if st.loaded {
                let c = st.count();
                return Ok(PresenceCount { keys: c.keys, connections: c.connections });
            }
        }
        let records = self.store_list(PresenceQuery::Room(room.to_owned())).await?;
        let keys: HashSet<&str> = records.iter().map(|r| r.key.as_str()).collect();
        Ok(PresenceCount { keys: keys.len(), connections: records.len() })
    }

    /// This node's own metas are authoritative locally (the store may lag
    /// behind them by one sync); other nodes' come from the store.
    pub(crate) async fn user_online(&self, user: &str) -> crate::Result<bool> {
        if self.local_keys.lock().contains_key(user) {
            return Ok(true);
        }
        let records = self.store_list(PresenceQuery::Key(user.to_owned())).await?;
        Ok(records.iter().any(|r| r.node != self.node))
    }

    pub(crate) fn stats(&self) -> PresenceStats {
        let views: Vec<Arc<RoomView>> = self.views.read().values().cloned().collect();
        let mut stats = PresenceStats { rooms: views.len(), ..PresenceStats::default() };
        for view in views {
            let st = view.state.lock();
            stats.metas += st.slots.len();
            stats.receivers += st.receivers.len();
            stats.behind += st.behind.len();
            stats.pending += st.pending.len();
        }
        stats.unsynced = self.shared.outgoing.lock().values().map(HashMap::len).sum();
        stats
    }

    /// Writes this node's changes to the store, then publishes them; with
    /// `refresh`, rewrites all its entries and reconciles every view.
    ///
    /// Holds the write lock (an async one: it serializes the sync task and
    /// shutdown's flush, whose batches must reach the store and the other
    /// nodes in order) across host calls, each bounded: one store write
    /// ([`PresenceConfig::store_timeout`]), the rooms' publishes *at once*
    /// (one [`HubConfig::backplane_timeout`](crate::HubConfig::backplane_timeout)
    /// for all of them, not one per room), and with `refresh` one more store
    /// write. A hung store or backplane delays the next sync by that much,
    /// never more.
    pub(crate) async fn sync(&self, hub: &Hub, refresh: bool) {
        let write = self.write_lock.lock().await;
        let work = std::mem::take(&mut *self.shared.outgoing.lock());
        let now = Instant::now();
        let mut changes = Vec::new();
        let mut batches = Vec::new();
        for (room, conns) in work {
            let view = self.view(&room);
            let st = view.as_ref().map(|v| v.state.lock());
            let mut wire = Vec::with_capacity(conns.len());
            for (conn, store) in conns {
                let id = (self.node, conn);
                match st.as_ref().and_then(|s| s.slots.get(&id)) {
                    Some(slot) => {
                        if store {
                            changes.push(StoreChange::Put(slot.meta.to_record(&room, id)));
                        }
                        wire.push(WireChange { conn, entry: Some(slot.meta.to_wire(now)) });
                    }
                    None => {
                        changes.push(StoreChange::Remove { room: room.to_string(), node: self.node, connection: conn });
                        wire.push(WireChange { conn, entry: None });
                    }
                }
            }
            drop(st);
            batches.push((room, wire));
        }
        // The store first, then the backplane: a node that lists the store
        // after subscribing misses nothing (see `load`).
        if !changes.is_empty() {
            if let Err(e) = self.store_write(changes, self.config.ttl).await {
                tracing::warn!(error = %e, "presence store write failed; the next refresh retries");
            }
        }
        if let Some(backplane) = hub.backplane() {
            let publishes = batches.into_iter().map(|(room, changes)| {
                let batch = NodeBatch { v: wire::BATCH_VERSION, node: self.node, changes };
                let publish = backplane.publish(&wire::topic(&room), batch.encode());
                async move {
                    if let Err(e) = publish.await {
                        tracing::warn!(room = &*room, error = %e, "presence publish failed; other nodes reconcile from the store");
                    }
                }
            });
            futures::future::join_all(publishes).await;
        }
        if !refresh {
            return;
        }
        let views: Vec<Arc<RoomView>> = self.views.read().values().cloned().collect();
        let mut records = Vec::new();
        for view in &views {
            let st = view.state.lock();
            records.extend(
                st.slots
                    .iter()
                    .filter(|(id, _)| id.0 == self.node)
                    .map(|(id, s)| StoreChange::Put(s.meta.to_record(&view.room, *id))),
            );
        }
        if !records.is_empty() {
            if let Err(e) = self.store_write(records, self.config.ttl).await {
                tracing::warn!(error = %e, "presence store refresh failed");
            }
        }
        drop(write);
        if hub.backplane().is_some() {
            self.reconcile(hub, views).await;
        }
    }

    async fn reconcile(&self, hub: &Hub, views: Vec<Arc<RoomView>>) {
        let views: Vec<Arc<RoomView>> = views
            .into_iter()
            .filter(|v| {
                let mut st = v.state.lock();
                if st.loaded {
                    st.reconciling = Some(HashSet::new());
                }
                st.loaded
            })
            .collect();
        let mut lists = futures::stream::iter(views.into_iter().map(|view| {
            let list = self.store_list(PresenceQuery::Room(view.room.to_string()));
            async move { (view, list.await) }
        }))
        .buffer_unordered(16);
        while let Some((view, result)) = lists.next().await {
            let mut events = Vec::new();
            let flush = {
                let mut st = view.state.lock();
                let Some(touched) = st.reconciling.take() else { continue };
                match result {
                    Ok(records) => {
                        st.reconcile(self.node, records, &touched, &self.config, &mut events) && st.arm_flush()
                    }
                    Err(e) => {
                        tracing::warn!(room = &*view.room, error = %e, "presence store list failed");
                        false
                    }
                }
            };
            if flush {
                self.schedule([self.flush_cmd(&view)]);
            }
            self.fire(hub, &view.room, events);
        }
    }

    /// Applies a batch another node published.
    fn apply_remote(&self, hub: &Hub, view: &Arc<RoomView>, batch: NodeBatch) {
        let mut events = Vec::new();
        let mut expiries = Vec::new();
        let flush = {
            let mut st = view.state.lock();
            if !st.loaded {
                if st.buffered + batch.changes.len() <= MAX_BUFFERED {
                    st.buffered += batch.changes.len();
                    st.buffer.push(batch);
                } else {
                    tracing::warn!(room = &*view.room, "presence load buffer full; the next refresh reconciles");
                }
                return;
            }
            st.apply_batch(batch, &self.config, &mut events, &mut expiries) && st.arm_flush()
        };
        let mut cmds: Vec<(TimerCmd, Instant)> = expiries
            .into_iter()
            .map(|(id, (token, at))| (TimerCmd::Expire(Arc::downgrade(view), id, token), at))
            .collect();
        if flush {
            cmds.push(self.flush_cmd(view));
        }
        self.schedule(cmds);
        self.fire(hub, &view.room, events);
    }

    fn on_timer(&self, cmd: TimerCmd) -> Option<(TimerCmd, Instant)> {
        match cmd {
            TimerCmd::Flush(weak) => {
                let view = weak.upgrade()?;
                let again = view.state.lock().flush(&view.room, &self.config);
                // Receivers still behind: try again a window later.
                again.then(|| (TimerCmd::Flush(weak), later(Instant::now(), self.config.batch_window)))
            }
            TimerCmd::Expire(weak, id, token) => {
                let view = weak.upgrade()?;
                let (flush, next) = {
                    let mut st = view.state.lock();
                    let (changed, next) = st.expire(id, token, Instant::now(), &self.config);
                    (changed && st.arm_flush(), next)
                };
                if flush {
                    self.schedule([self.flush_cmd(&view)]);
                }
                next.map(|(token, at)| (TimerCmd::Expire(weak, id, token), at))
            }
        }
    }
}

fn finish(by_key: BTreeMap<&str, Vec<PresenceMeta>>) -> Vec<PresenceEntry> {
    by_key
        .into_iter()
        .map(|(key, mut metas)| {
            metas.sort_by(|a, b| (a.joined_at, &a.conn_ref).cmp(&(b.joined_at, &b.conn_ref)));
            PresenceEntry { key: key.to_owned(), metas }
        })
        .collect()
}

/// The timer task: batch-window flushes and ephemeral expiries.
async fn timer_task(hub: WeakHub, shared: Arc<Shared>) {
    let mut wheel: DelayQueue<TimerCmd> = DelayQueue::new();
    loop {
        tokio::select! {
            _ = shared.stop.cancelled() => return,
            _ = shared.timers_notify.notified() => {
                for (cmd, at) in std::mem::take(&mut *shared.timers.lock()) {
                    wheel.insert_at(cmd, at);
                }
            }
            Some(expired) = futures::future::poll_fn(|cx| wheel.poll_expired(cx)) => {
                let Some(hub) = hub.upgrade() else { return };
                let Some(presence) = hub.extension::<PresenceHub>() else { return };
                if let Some((cmd, at)) = presence.on_timer(expired.into_inner()) {
                    wheel.insert_at(cmd, at);
                }
            }
        }
    }
}

/// The sync task: store writes and backplane publishes of this node's
/// changes as they come, and a refresh every `ttl / 3`.
async fn sync_task(hub: WeakHub, shared: Arc<Shared>, every: Duration) {
    let mut tick = tokio::time::interval_at(later(Instant::now(), every), every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let refresh = tokio::select! {
            _ = shared.stop.cancelled() => return,
            _ = shared.outgoing_notify.notified() => false,
            _ = tick.tick() => true,
        };
        let Some(hub) = hub.upgrade() else { return };
        let Some(presence) = hub.extension::<PresenceHub>() else { return };
        presence.sync(&hub, refresh).await;
    }
}

/// Applies the changes other nodes publish on `$presence:<room>` to the
/// room's view. Aborted when the view is dropped.
async fn forward(mut sub: Subscription, hub: WeakHub, view: Weak<RoomView>, _guard: TaskGuard) {
    while let Some(item) = sub.next().await {
        let bytes = match item {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "presence subscription reported a problem; the next refresh reconciles");
                continue;
            }
        };
        let Some(batch) = NodeBatch::decode(&bytes) else {
            tracing::warn!("ignoring a malformed presence message");
            continue;
        };
        let (Some(hub), Some(view)) = (hub.upgrade(), view.upgrade()) else { return };
        if batch.node == hub.node_id() {
            continue;
        }
        if let Some(presence) = hub.extension::<PresenceHub>() {
            presence.apply_remote(&hub, &view, batch);
        }
    }
}

#[cfg(test)]
mod tests {
    //! The room state machine on its own: the joiners' shared state, flag
    //! diffs, and the byte bound of member lists.
    use super::*;
    use serde_json::json;

    fn meta(key: &str, conn: u64, client: Value) -> Meta {
        Meta {
            key: key.into(),
            conn_ref: conn_ref(1, conn).into(),
            joined_at: conn,
            host: Map::new(),
            meta: client.as_object().cloned().unwrap_or_default(),
            ephemeral: BTreeMap::new(),
        }
    }

    fn json_state(st: &mut RoomState, cfg: &PresenceConfig) -> (Bytes, Value) {
        let bytes = st.joiner_state("r", Wire::unframed(Format::Json), cfg).expect("encodes");
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        (bytes, v)
    }

    #[test]
    fn joiners_share_one_encoding_of_the_members_view_until_the_next_flush() {
        let cfg = PresenceConfig::default();
        let mut st = RoomState::new(true);
        st.set((1, 1), meta("ann", 1, json!({"name": "Ann"})), &cfg);
        assert!(!st.flush("r", &cfg), "nobody is behind");
        // Three joins in one window: each joiner gets the view as of the
        // last flush (ann only), the same bytes, encoded once.
        let (first, v) = json_state(&mut st, &cfg);
        assert_eq!(v["data"]["count"], json!({"keys": 1, "connections": 1}));
        assert_eq!(v["data"]["presences"]["ann"]["metas"][0]["meta"], json!({"name": "Ann"}));
        for c in 2..5 {
            st.set((1, c), meta(&format!("u{c}"), c, json!({})), &cfg);
            let (again, _) = json_state(&mut st, &cfg);
            assert_eq!(again.as_ptr(), first.as_ptr(), "re-encoded for joiner {c}");
        }
        // A change of ann's meta and a leave within the window: the joiners'
        // state still shows what the members have.
        st.set((1, 1), meta("ann", 1, json!({"name": "Queen Ann"})), &cfg);
        let (_, v) = json_state(&mut st, &cfg);
        assert_eq!(v["data"]["presences"]["ann"]["metas"][0]["meta"], json!({"name": "Ann"}));
        assert_eq!(st.states_encoded, 1);
        // After the flush: the view as it is, encoded once more.
        st.flush("r", &cfg);
        let (_, v) = json_state(&mut st, &cfg);
        assert_eq!(v["data"]["count"], json!({"keys": 4, "connections": 4}));
        assert_eq!(v["data"]["presences"]["ann"]["metas"][0]["meta"], json!({"name": "Queen Ann"}));
        json_state(&mut st, &cfg);
        assert_eq!(st.states_encoded, 2);
    }

    #[test]
    fn a_flag_change_is_diffed_as_the_flag_alone() {
        let cfg = PresenceConfig::default();
        let mut st = RoomState::new(true);
        let big = json!({"bio": "x".repeat(900)});
        st.set((1, 1), meta("ann", 1, big.clone()), &cfg);
        st.flush("r", &cfg);
        let mut typing = meta("ann", 1, big.clone());
        typing.ephemeral.insert("typing".into(), (json!(true), Instant::now() + Duration::from_secs(5)));
        st.set((1, 1), typing.clone(), &cfg);
        let before = st.pending[&(1, 1)].before.clone().unwrap();
        assert!(wire::flags_only(&before, &typing));
        assert_eq!(Value::Object(wire::flag_changes(&before, &typing)), json!({"typing": true}));
        assert_eq!(Value::Object(wire::flag_changes(&typing, &before)), json!({"typing": null}));
        // What the flush sends: the flag, not the 900-byte meta.
        let data = DiffData {
            count: st.count(),
            joins: Some(wire::group(std::iter::empty())),
            leaves: Some(wire::group(std::iter::empty())),
            ephemeral: Some(FlagChanges::from([(
                "ann",
                BTreeMap::from([(&*typing.conn_ref, wire::flag_changes(&before, &typing))]),
            )])),
        };
        let bytes = serde_json::to_vec(&data).unwrap();
        assert!(bytes.len() < 200, "{} bytes: {}", bytes.len(), String::from_utf8_lossy(&bytes));
        // A meta change is not flags only.
        let renamed = meta("ann", 1, json!({"bio": "y"}));
        assert!(!wire::flags_only(&before, &renamed));
    }

    #[test]
    fn a_member_list_over_max_state_bytes_switches_to_counts() {
        let cfg = PresenceConfig::default().max_state_bytes(20_000).counts_only_above(1000);
        let mut st = RoomState::new(true);
        let big = json!({"bio": "x".repeat(990)});
        let mut n = 0;
        // One key (one user, many tabs): neither the key nor the
        // connection threshold is near; the bytes are.
        loop {
            n += 1;
            st.set((1, n), meta("tabs", n, big.clone()), &cfg);
            st.flush("r", &cfg);
            if st.list_bytes > 20_000 {
                break;
            }
            assert!(!st.counts_mode, "counts with {n} metas, {} bytes", st.list_bytes);
            let (bytes, _) = json_state(&mut st, &cfg);
            assert!(bytes.len() <= 20_000, "a state of {} bytes", bytes.len());
        }
        assert!(n < 25, "{n} metas of ~1 KiB");
        assert!(st.counts_mode, "{} bytes", st.list_bytes);
        let (_, v) = json_state(&mut st, &cfg);
        assert!(v["data"].get("presences").is_none(), "{v}");
        // Back to lists at three quarters of the bound.
        while st.list_bytes > 15_000 {
            st.unset((1, n), &cfg);
            n -= 1;
            st.flush("r", &cfg);
            assert_eq!(st.counts_mode, st.list_bytes > 15_000);
        }
        assert!(!st.counts_mode);
        // The sizes add up to what is encoded.
        let listed: usize = st.slots.values().map(|s| s.size).sum();
        assert_eq!(listed, st.list_bytes);
        let (bytes, _) = json_state(&mut st, &cfg);
        assert!(bytes.len() <= st.list_bytes + 100, "{} > {}", bytes.len(), st.list_bytes);
    }

    #[test]
    fn a_key_joins_with_its_first_meta_and_leaves_with_its_last() {
        let cfg = PresenceConfig::default();
        let mut st = RoomState::new(true);
        let first = st.set((1, 1), meta("ann", 1, json!({})), &cfg);
        assert!(first.inserted && first.key_joined);
        // A second tab of the same user: a new meta, not a new key.
        let second = st.set((2, 7), meta("ann", 7, json!({})), &cfg);
        assert!(second.inserted && !second.key_joined);
        assert_eq!((st.count().keys, st.count().connections), (1, 2));
        // The same meta again changes nothing.
        let again = st.set((1, 1), meta("ann", 1, json!({})), &cfg);
        assert!(!again.inserted && !again.changed);
        assert_eq!(st.unset((1, 1), &cfg), Some((Arc::from("ann"), false)));
        assert_eq!(st.unset((1, 1), &cfg), None, "a meta leaves once");
        assert_eq!(st.unset((2, 7), &cfg), Some((Arc::from("ann"), true)));
        assert_eq!((st.count().keys, st.count().connections), (0, 0));
        assert_eq!(st.list_bytes, 0);
    }

    #[test]
    fn a_stale_expiry_does_nothing_and_the_current_one_drops_the_flag() {
        let cfg = PresenceConfig::default();
        let mut st = RoomState::new(true);
        let now = Instant::now();
        let mut typing = meta("ann", 1, json!({}));
        typing.ephemeral.insert("typing".into(), (json!(true), now + Duration::from_secs(5)));
        st.set((1, 1), typing, &cfg);
        let (token, at) = st.arm_expiry((1, 1)).expect("a flag to expire");
        assert_eq!(at, now + Duration::from_secs(5));
        assert!(st.arm_expiry((1, 1)).is_none(), "one expiry entry per meta");
        // An entry with another token (superseded) is ignored.
        assert_eq!(st.expire((1, 1), token + 1, now + Duration::from_secs(6), &cfg), (false, None));
        assert!(st.slots[&(1, 1)].meta.ephemeral.contains_key("typing"));
        // Too early: nothing expires, and the entry is armed again.
        let (changed, next) = st.expire((1, 1), token, now + Duration::from_secs(1), &cfg);
        assert!(!changed);
        let (token, _) = next.expect("armed again for the same deadline");
        let (changed, next) = st.expire((1, 1), token, now + Duration::from_secs(6), &cfg);
        assert!(changed && next.is_none());
        assert!(st.slots[&(1, 1)].meta.ephemeral.is_empty());
    }

    #[test]
    fn more_changes_than_max_pending_send_the_whole_state() {
        let cfg = PresenceConfig { max_pending: 2, ..PresenceConfig::default() };
        let mut st = RoomState::new(true);
        for c in 1..=2 {
            st.set((1, c), meta(&format!("u{c}"), c, json!({})), &cfg);
        }
        assert_eq!(st.pending.len(), 2);
        assert!(!st.full_pending);
        st.set((1, 3), meta("u3", 3, json!({})), &cfg);
        assert!(st.full_pending, "the diff would be bigger than the state");
        assert!(st.pending.is_empty(), "the per-meta changes are dropped for the state");
    }
}
