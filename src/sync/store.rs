//! [`SnapshotStore`]: where a synced room's ops, snapshots and per-client
//! records live, and [`MemorySnapshots`], the in-memory default.

use crate::error::Result;
use futures::future::BoxFuture;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::Arc;

/// One applied op as the store keeps it and the room broadcasts it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OpRecord {
    /// The room version this op produced (the first op makes version 1).
    pub version: u64,
    /// The sending client's id (chosen by the client, stable across reconnects).
    pub client: String,
    /// The op's sequence number within its client (from 1, increasing).
    pub seq: u64,
    /// The sender's user id, when it was authenticated.
    #[serde(default)]
    pub user: Option<String>,
    /// The version the client based the op on.
    pub base: u64,
    /// The op, as JSON.
    pub op: serde_json::Value,
}

/// The last op of one client that the room applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientRecord {
    /// Its sequence number.
    pub seq: u64,
    /// The version it produced.
    pub version: u64,
    /// The user that sent it (the owner of the client id).
    pub user: Option<String>,
}

/// What [`SnapshotStore::load`] returns: a state to start from and the ops
/// after it, up to the room's current version.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Loaded {
    /// The room's current version (0: nothing was ever applied).
    pub version: u64,
    /// `Some((v, state))`: start from this snapshot of version `v`. `None`:
    /// start from the caller's state at the `since` it asked for (or from the
    /// empty state at version 0 when it asked for none).
    pub snapshot: Option<(u64, serde_json::Value)>,
    /// The ops after the starting point, in version order, up to `version`.
    pub ops: Vec<OpRecord>,
}

/// A compare-and-append request ([`SnapshotStore::append`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Append {
    /// The version the room must be at for the append to happen.
    pub expected: u64,
    /// The op; its `version` is `expected + 1`.
    pub record: OpRecord,
    /// The state after the op, when it is time to keep a snapshot.
    pub snapshot: Option<serde_json::Value>,
}

/// The outcome of [`SnapshotStore::append`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Appended {
    /// Appended: the room is now at `expected + 1`.
    Done,
    /// The room is not at `expected` (another node appended first); nothing
    /// was written.
    Conflict {
        /// The room's current version.
        version: u64,
    },
    /// The client already has an op with this or a later `seq` applied;
    /// nothing was written.
    Duplicate(ClientRecord),
}

/// Keeps synced rooms' op logs, snapshots and per-client records. Hubs that
/// serve the same synced rooms (through a backplane) must share one store:
/// [`append`](SnapshotStore::append) is the compare-and-append that orders
/// every op of a room, whichever node applied it.
///
/// Rules every implementation keeps (checked by the conformance suite
/// `switchboard::testing::SnapshotSuite`, on two handles):
///
/// - `append` is atomic: it writes only when the room is at `expected` and
///   the client's last applied `seq` is below the record's; it then records
///   the op, the client (seq, version, user), and the snapshot if given.
///   Atomic across connections too: a version read, then a write in a
///   second statement lets two nodes both "win" the same version (use one
///   script or transaction with the compare inside, as `RedisSnapshots`'
///   Lua script does).
/// - The client record is updated on every append (the last `seq`, not the
///   first), so a resend of any applied op is a `Duplicate`.
/// - `load(room, since)` returns the ops after `since` when it still has all
///   of them, else the newest snapshot and every op after it. It never
///   returns a partial list. An unknown room loads as version 0 with no
///   snapshot and no ops (not an error).
/// - The ops after the newest snapshot are always kept; older ones are kept
///   up to the store's retention.
/// - Room names are up to [`MAX_ROOM_NAME_LEN`](crate::room::MAX_ROOM_NAME_LEN)
///   bytes and must be kept apart exactly (no length cut in a key column).
/// - After a lost connection a handle reconnects by itself; its calls fail
///   with an error meanwhile (the hub answers the member 503 and it sends
///   again).
pub trait SnapshotStore: Send + Sync + 'static {
    /// The room's state from `since` (or from the start) to now.
    fn load<'a>(&'a self, room: &'a str, since: Option<u64>) -> BoxFuture<'a, Result<Loaded>>;
    /// Compare-and-append one op.
    fn append<'a>(&'a self, room: &'a str, append: Append) -> BoxFuture<'a, Result<Appended>>;
    /// The last applied op of `client` in `room`, if any is remembered.
    fn client<'a>(&'a self, room: &'a str, client: &'a str) -> BoxFuture<'a, Result<Option<ClientRecord>>>;
}

impl<S: SnapshotStore + ?Sized> SnapshotStore for Arc<S> {
    fn load<'a>(&'a self, room: &'a str, since: Option<u64>) -> BoxFuture<'a, Result<Loaded>> {
        (**self).load(room, since)
    }
    fn append<'a>(&'a self, room: &'a str, append: Append) -> BoxFuture<'a, Result<Appended>> {
        (**self).append(room, append)
    }
    fn client<'a>(&'a self, room: &'a str, client: &'a str) -> BoxFuture<'a, Result<Option<ClientRecord>>> {
        (**self).client(room, client)
    }
}

/// The in-memory [`SnapshotStore`]: for one process (clones share the
/// data, so hubs in one process can share it).
///
/// Bounds: per room, the ops after the newest snapshot plus at most
/// `retain` (default 1,000) older ones; at most `max_clients` (default
/// 10,000) client records, the one with the oldest last op evicted first
/// (an evicted client's resend of that op is no longer recognized as a
/// duplicate). Rooms are kept until the process ends.
#[derive(Clone)]
pub struct MemorySnapshots {
    rooms: Arc<Mutex<HashMap<String, MemRoom>>>,
    retain: usize,
    max_clients: usize,
}

#[derive(Default)]
struct MemRoom {
    version: u64,
    snapshot: Option<(u64, serde_json::Value)>,
    log: VecDeque<OpRecord>,
    clients: HashMap<String, ClientRecord>,
}

impl fmt::Debug for MemorySnapshots {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemorySnapshots")
            .field("rooms", &self.rooms.lock().len())
            .field("retain", &self.retain)
            .field("max_clients", &self.max_clients)
            .finish()
    }
}

impl Default for MemorySnapshots {
    fn default() -> Self {
        MemorySnapshots::new()
    }
}

impl MemorySnapshots {
    /// An empty store with the default bounds.
    pub fn new() -> MemorySnapshots {
        MemorySnapshots { rooms: Arc::default(), retain: 1000, max_clients: 10_000 }
    }

    /// Sets how many ops older than the newest snapshot are kept per room
    /// (default 1,000): a client at most this far behind gets the ops it
    /// missed instead of a snapshot.
    pub fn retain(mut self, ops: usize) -> Self {
        self.retain = ops;
        self
    }

    /// Sets how many client records a room keeps (default 10,000).
    pub fn max_clients(mut self, clients: usize) -> Self {
        self.max_clients = clients.max(1);
        self
    }
}

impl SnapshotStore for MemorySnapshots {
    fn load<'a>(&'a self, room: &'a str, since: Option<u64>) -> BoxFuture<'a, Result<Loaded>> {
        let rooms = self.rooms.lock();
        let loaded = match rooms.get(room) {
            None => Loaded::default(),
            Some(r) => load_from(r.version, r.snapshot.as_ref(), r.log.iter(), since),
        };
        Box::pin(async move { Ok(loaded) })
    }

    fn append<'a>(&'a self, room: &'a str, append: Append) -> BoxFuture<'a, Result<Appended>> {
        let mut rooms = self.rooms.lock();
        let r = rooms.entry(room.to_owned()).or_default();
        let outcome = if r.version != append.expected {
            Appended::Conflict { version: r.version }
        } else if let Some(c) = r.clients.get(&append.record.client).filter(|c| c.seq >= append.record.seq) {
            Appended::Duplicate(c.clone())
        } else {
            let rec = append.record;
            r.version = append.expected + 1;
            r.clients
                .insert(rec.client.clone(), ClientRecord { seq: rec.seq, version: r.version, user: rec.user.clone() });
            if r.clients.len() > self.max_clients {
                if let Some(oldest) = r.clients.iter().min_by_key(|(_, c)| c.version).map(|(k, _)| k.clone()) {
                    r.clients.remove(&oldest);
                }
            }
            r.log.push_back(OpRecord { version: r.version, ..rec });
            if let Some(state) = append.snapshot {
                r.snapshot = Some((r.version, state));
            }
            // Keep every op after the snapshot, and `retain` before it.
            let snap = r.snapshot.as_ref().map_or(0, |(v, _)| *v);
            while r.log.front().is_some_and(|op| op.version + self.retain as u64 <= snap) {
                r.log.pop_front();
            }
            Appended::Done
        };
        Box::pin(async move { Ok(outcome) })
    }

    fn client<'a>(&'a self, room: &'a str, client: &'a str) -> BoxFuture<'a, Result<Option<ClientRecord>>> {
        let record = self.rooms.lock().get(room).and_then(|r| r.clients.get(client).cloned());
        Box::pin(async move { Ok(record) })
    }
}

/// The rule of [`SnapshotStore::load`] over a log held in version order:
/// the ops after `since` when the log still has them all, else the
/// snapshot and the ops after it. Shared by the stores.
pub(crate) fn load_from<'a>(
    version: u64,
    snapshot: Option<&(u64, serde_json::Value)>,
    log: impl Iterator<Item = &'a OpRecord> + Clone,
    since: Option<u64>,
) -> Loaded {
    let first = log.clone().next().map(|op| op.version);
    if let Some(since) = since.filter(|s| *s <= version) {
        // `since == version` needs nothing; otherwise the log must start at or before `since + 1`.
        if since == version || first.is_some_and(|f| f <= since + 1) {
            return Loaded { version, snapshot: None, ops: log.filter(|op| op.version > since).cloned().collect() };
        }
    }
    match snapshot {
        Some((v, state)) => Loaded {
            version,
            snapshot: Some((*v, state.clone())),
            ops: log.filter(|op| op.version > *v).cloned().collect(),
        },
        None => Loaded { version, snapshot: None, ops: log.cloned().collect() },
    }
}
