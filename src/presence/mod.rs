//! Presence: who is in a room, per presence key, across connections and
//! nodes.
//!
//! A hub with presence ([`HubBuilder::presence`](crate::HubBuilder::presence))
//! tracks, for each presence-enabled room, one **meta** per member
//! connection, grouped by **presence key**:
//!
//! - the key is the connection's user id ([`Identity::user`](crate::Identity::user));
//!   a connection without one is its own key, `anon:<ref>`. A user with three
//!   tabs open is one key with three metas, and leaves the room only when the
//!   last of them goes;
//! - a meta carries a server-assigned connection `ref` (`<node>.<connection
//!   id>`, as in `hello`), `joined_at` (Unix ms), `meta` (what the host put
//!   there when the connection joined, see
//!   [`HubBuilder::presence_meta`](crate::HubBuilder::presence_meta), plus
//!   what the client set) and `ephemeral` (client flags such as `typing`
//!   that expire by themselves after [`PresenceConfig::ephemeral_ttl`]).
//!
//! Members get the room's full state right after their join reply
//! (`presence_state`), then batched diffs (`presence_diff`, at most one per
//! [`PresenceConfig::batch_window`]); rooms with more than
//! [`PresenceConfig::counts_only_above`] keys send counts instead of member
//! lists. `docs/protocol.md` has the wire format and `docs/presence.md` the
//! semantics and consistency guarantees.
//!
//! ```no_run
//! use switchboard::presence::{PresenceConfig, PresenceEvent};
//! use switchboard::Hub;
//!
//! # async fn run() -> switchboard::Result<()> {
//! let hub = Hub::builder()
//!     // Presence in rooms whose name starts with `chat:`.
//!     .presence(PresenceConfig::default().room_prefixes(["chat:"]))
//!     // Host-supplied part of each meta (read-only for the client).
//!     .presence_meta(|conn: &switchboard::hub::Connection, _room: &str| {
//!         serde_json::json!({ "name": conn.user_id().unwrap_or("guest") })
//!     })
//!     // Once per key: first meta joined, last meta left (for "last seen").
//!     .on_presence_leave(|_hub: &Hub, e: &PresenceEvent| println!("{} left {}", e.key, e.room))
//!     .build();
//!
//! let who = hub.presence("chat:lobby").await?;
//! let count = hub.presence_count("chat:lobby").await?;
//! let online = hub.is_user_online("alice").await?;
//! # let _ = (who, count, online);
//! # Ok(())
//! # }
//! ```
//!
//! # Where presence lives
//!
//! Each node keeps, for every presence room it has local members in, the
//! room's full view (its own metas and every other node's). A
//! [`PresenceStore`] holds the metas of every node with a time to live: each
//! node rewrites its own entries every [`PresenceConfig::ttl`] / 3, so the
//! entries of a node that vanished expire, and the other nodes turn them
//! into leaves. Changes travel between nodes over the backplane (topic
//! `$presence:<room>`). [`MemoryPresence`] is the in-memory store: one per
//! hub by default, or one shared by several hubs in a process (with a
//! [`MemoryBackplane`](crate::backplane::MemoryBackplane)).

mod config;
mod engine;
mod hub;
mod memory;
mod wire;

pub use config::{PresenceConfig, PresenceRooms};
pub use memory::MemoryPresence;

pub(crate) use engine::PresenceHub;

use crate::error::Result;
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;

/// A JSON object: the `meta` and `ephemeral` parts of a presence meta.
pub type Map = serde_json::Map<String, serde_json::Value>;

/// One connection's presence in one room, as a [`PresenceStore`] keeps it.
///
/// Identified by `(room, node, connection)`. Ephemeral flags are not
/// stored: they travel between nodes in backplane diffs only.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct PresenceRecord {
    /// The room.
    pub room: String,
    /// The presence key (user id, or `anon:<ref>`).
    pub key: String,
    /// The node (hub) the connection is on.
    pub node: u64,
    /// The connection's id on that node.
    pub connection: u64,
    /// When the connection joined the room, in Unix milliseconds.
    pub joined_at: u64,
    /// The meta (host and client parts merged).
    pub meta: Map,
}

impl PresenceRecord {
    /// A record with `joined_at` 0 and an empty meta.
    pub fn new(room: impl Into<String>, key: impl Into<String>, node: u64, connection: u64) -> PresenceRecord {
        PresenceRecord { room: room.into(), key: key.into(), node, connection, joined_at: 0, meta: Map::new() }
    }

    /// Sets `joined_at`.
    pub fn with_joined_at(mut self, joined_at: u64) -> Self {
        self.joined_at = joined_at;
        self
    }

    /// Sets the meta.
    pub fn with_meta(mut self, meta: Map) -> Self {
        self.meta = meta;
        self
    }

    /// The connection ref clients see: `<node as 16 hex digits>.<connection>`.
    pub fn conn_ref(&self) -> String {
        conn_ref(self.node, self.connection)
    }
}

pub(crate) fn conn_ref(node: u64, connection: u64) -> String {
    format!("{node:016x}.{connection}")
}

/// One change in a [`PresenceStore::write`] batch.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum StoreChange {
    /// Insert the record, or replace the one with the same `(room, node,
    /// connection)`; it expires `ttl` from now unless written again.
    Put(PresenceRecord),
    /// Remove the record of `(room, node, connection)`, if there is one.
    Remove {
        /// The room.
        room: String,
        /// The node.
        node: u64,
        /// The connection on that node.
        connection: u64,
    },
}

/// What [`PresenceStore::list`] returns.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum PresenceQuery {
    /// Every live record of a room.
    Room(String),
    /// Every live record with a presence key, in any room.
    Key(String),
}

/// Where presence records live, shared by the nodes of a deployment.
///
/// One job: keep records with a time to live. Every hub writes its own
/// connections' records and rewrites all of them every
/// [`PresenceConfig::ttl`] / 3; a record not rewritten within its `ttl`
/// expires and must no longer be listed. That is how the entries of a node
/// that crashed disappear. Removing expired records for good (so nothing
/// accumulates) is up to the store; [`MemoryPresence`] does it on every
/// call.
///
/// The rules an implementation keeps (the conformance suite
/// `switchboard::testing::PresenceStoreSuite`, feature `testing`, checks
/// each of them with two handles on the store; `docs/extending.md` shows a
/// store on SQL):
///
/// - A record is identified by `(room, node, connection)`: writing it again
///   replaces it entirely — key, meta and expiry (an upsert, not an
///   "insert unless present"), and the same connection id on two nodes is
///   two records.
/// - Listing by room or by key matches exactly (no prefix or pattern
///   match: `chat:1` is not `chat:10`), sees what every handle wrote, and
///   never returns an expired record, whether or not it was purged yet.
/// - A [`write`](Self::write) batch is applied in order (a `Put` then a
///   `Remove` of the same record leaves nothing); writes racing through
///   different handles to one room all land (no read-modify-write of a
///   room's whole list).
/// - Room names are 1 to
///   [`MAX_ROOM_NAME_LEN`](crate::room::MAX_ROOM_NAME_LEN) bytes of room
///   name characters; keys are user ids, any UTF-8 of any length the host
///   allows (or `anon:<ref>`): keep both apart exactly.
/// - While the store is unreachable calls fail with an error; once the
///   handle reconnected by itself they work again, and records written
///   before are still there until they expire.
///
/// A Redis store fits this shape: a hash per record with `PEXPIRE`, a
/// sorted set per room and per key scored by expiry time, `write` as one
/// pipeline.
///
/// Both methods must be cancel-safe enough that a dropped future leaves the
/// store usable; the hub never runs two `write`s of one node at once.
pub trait PresenceStore: Send + Sync + 'static {
    /// Applies `changes` in order. Records written by a [`StoreChange::Put`]
    /// expire `ttl` after this call.
    fn write(&self, changes: Vec<StoreChange>, ttl: Duration) -> BoxFuture<'static, Result<()>>;

    /// The records matching `query` that have not expired, in any order.
    fn list(&self, query: PresenceQuery) -> BoxFuture<'static, Result<Vec<PresenceRecord>>>;
}

impl<S: PresenceStore + ?Sized> PresenceStore for Arc<S> {
    fn write(&self, changes: Vec<StoreChange>, ttl: Duration) -> BoxFuture<'static, Result<()>> {
        (**self).write(changes, ttl)
    }

    fn list(&self, query: PresenceQuery) -> BoxFuture<'static, Result<Vec<PresenceRecord>>> {
        (**self).list(query)
    }
}

/// Shorthands over [`PresenceStore`], for every store.
pub trait PresenceStoreExt: PresenceStore {
    /// Writes one record.
    fn put(&self, record: PresenceRecord, ttl: Duration) -> BoxFuture<'static, Result<()>> {
        self.write(vec![StoreChange::Put(record)], ttl)
    }

    /// Removes one record.
    fn remove(&self, room: &str, node: u64, connection: u64) -> BoxFuture<'static, Result<()>> {
        self.write(vec![StoreChange::Remove { room: room.to_owned(), node, connection }], Duration::ZERO)
    }

    /// The live records of a room.
    fn list_room(&self, room: &str) -> BoxFuture<'static, Result<Vec<PresenceRecord>>> {
        self.list(PresenceQuery::Room(room.to_owned()))
    }

    /// The live records of a presence key, in any room.
    fn list_key(&self, key: &str) -> BoxFuture<'static, Result<Vec<PresenceRecord>>> {
        self.list(PresenceQuery::Key(key.to_owned()))
    }
}

impl<S: PresenceStore + ?Sized> PresenceStoreExt for S {}

/// One presence key in a room and its metas, as the host reads it
/// ([`Hub::presence`](crate::Hub::presence)).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct PresenceEntry {
    /// The presence key.
    pub key: String,
    /// One meta per connection, oldest join first.
    pub metas: Vec<PresenceMeta>,
}

/// One connection's meta.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct PresenceMeta {
    /// The connection ref clients see (`<node>.<connection>`).
    pub conn_ref: String,
    /// The node the connection is on.
    pub node: u64,
    /// The connection's id on that node (a [`ConnectionId`](crate::ConnectionId)
    /// of this hub when `node` is [`Hub::node_id`](crate::Hub::node_id)).
    pub connection: u64,
    /// When it joined the room (Unix ms).
    pub joined_at: u64,
    /// Host and client meta, merged.
    pub meta: Map,
    /// Ephemeral flags still alive (empty when read from the store).
    pub ephemeral: Map,
}

/// How many keys and connections a room's presence has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct PresenceCount {
    /// Distinct presence keys.
    pub keys: usize,
    /// Metas (connections).
    pub connections: usize,
}

/// A presence key joined (its first meta appeared) or left (its last meta
/// went) a room, as seen by this node. See
/// [`HubBuilder::on_presence_join`](crate::HubBuilder::on_presence_join).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PresenceEvent {
    /// The room.
    pub room: String,
    /// The presence key.
    pub key: String,
    /// What caused it.
    pub cause: PresenceCause,
}

/// What caused a [`PresenceEvent`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum PresenceCause {
    /// A connection of this node joined or left (including a disconnect or
    /// a heartbeat timeout).
    Local,
    /// Another node said so over the backplane (or the store showed an
    /// entry this node had missed).
    Remote,
    /// Another node's entries expired in the store: that node stopped
    /// refreshing them (it crashed or lost its store).
    Expired,
}

/// Counts of a hub's presence state, for observability and leak tests
/// ([`Hub::presence_stats`](crate::Hub::presence_stats)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct PresenceStats {
    /// Rooms this node keeps a presence view of.
    pub rooms: usize,
    /// Metas in those views (this node's and other nodes').
    pub metas: usize,
    /// Local connections receiving presence messages.
    pub receivers: usize,
    /// Receivers whose queue had no room for a presence message: they get
    /// the room's whole state as soon as it fits.
    pub behind: usize,
    /// Changes waiting for the next diff, summed over rooms.
    pub pending: usize,
    /// This node's own changes waiting to be written to the store and the
    /// backplane.
    pub unsynced: usize,
}
