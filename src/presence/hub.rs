//! Presence on [`HubBuilder`] and [`Hub`]: configuration, host reads, and
//! the calls the hub makes on joins, leaves and `presence` requests.

use super::engine::{MetaFn, PresenceHook};
use super::{
    MemoryPresence, PresenceConfig, PresenceCount, PresenceEntry, PresenceEvent, PresenceHub, PresenceStats,
    PresenceStore,
};
use crate::hub::extension::{ExtensionSetup, PresenceHello, RoomExtension};
use crate::hub::session::Session;
use crate::hub::{Connection, Hub, HubBuilder};
use crate::protocol::Envelope;
use futures::future::BoxFuture;
use serde::Serialize;
use std::any::Any;
use std::sync::Arc;

/// What the builder collects for presence.
#[derive(Default)]
pub(crate) struct Setup {
    config: Option<PresenceConfig>,
    store: Option<Arc<dyn PresenceStore>>,
    meta: Option<MetaFn>,
    on_join: Option<PresenceHook>,
    on_leave: Option<PresenceHook>,
}

impl ExtensionSetup for Setup {
    fn build(self: Box<Self>, node: u64, backplane: bool, queue_bytes: usize) -> Option<Arc<dyn RoomExtension>> {
        let this = *self;
        let mut config = this.config?;
        // A state never takes more than a quarter of a connection's queue.
        config.max_state_bytes = config.max_state_bytes.min(queue_bytes / 4);
        let store = this.store.unwrap_or_else(|| Arc::new(MemoryPresence::new()));
        Some(Arc::new(PresenceHub::new(config, node, backplane, store, this.meta, this.on_join, this.on_leave)))
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

impl RoomExtension for PresenceHub {
    fn hello(&self) -> PresenceHello {
        PresenceHub::hello(self)
    }

    fn prepare<'a>(&'a self, hub: &'a Hub, room: &'a str) -> BoxFuture<'a, crate::Result<()>> {
        Box::pin(PresenceHub::prepare(self, hub, room))
    }

    fn after_join(&self, hub: &Hub, session: &Arc<Session>, room: &str) {
        PresenceHub::after_join(self, hub, session, room);
    }

    fn leave(&self, hub: &Hub, session: &Session, room: &str, room_gone: bool) {
        PresenceHub::leave(self, hub, session, room, room_gone);
    }

    fn request(&self, session: &Arc<Session>, env: Envelope) {
        PresenceHub::request(self, session, env);
    }

    /// Writes and publishes the leaves of the connections that just closed,
    /// so other nodes do not wait for the TTL.
    fn flush<'a>(&'a self, hub: &'a Hub) -> BoxFuture<'a, ()> {
        Box::pin(self.sync(hub, false))
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl HubBuilder {
    /// Turns presence on (default: off), for the rooms
    /// [`PresenceConfig::rooms`] selects (default: all). See the
    /// [`presence`](crate::presence) module.
    pub fn presence(mut self, config: PresenceConfig) -> Self {
        self.extension_setup::<Setup>().config = Some(config);
        self
    }

    /// Where presence records live (default: a private
    /// [`MemoryPresence`]). Hubs that share a backplane must share a store.
    /// Has no effect unless [`HubBuilder::presence`] turns presence on.
    pub fn presence_store(mut self, store: impl PresenceStore) -> Self {
        self.extension_setup::<Setup>().store = Some(Arc::new(store));
        self
    }

    /// Computes the host's part of a connection's meta when it joins a
    /// presence room (default: empty). The value must serialize to a JSON
    /// object; clients cannot change its keys. Runs on the joining
    /// connection's task after its join reply, without locks held: keep it
    /// short.
    pub fn presence_meta<F, M>(mut self, f: F) -> Self
    where
        F: Fn(&Connection, &str) -> M + Send + Sync + 'static,
        M: Serialize,
    {
        self.extension_setup::<Setup>().meta =
            Some(Arc::new(move |conn: &Connection, room: &str| match serde_json::to_value(f(conn, room)) {
                Ok(serde_json::Value::Object(map)) => Some(map),
                Ok(serde_json::Value::Null) => None,
                Ok(_) | Err(_) => {
                    tracing::warn!(room, "the presence meta hook did not return an object; using an empty meta");
                    None
                }
            }));
        self
    }

    /// Called when a presence key joins a room as seen by this node: its
    /// first meta appeared. With several nodes, every node that has members
    /// in the room sees the transition; [`PresenceEvent::cause`] says whether
    /// one of this node's connections caused it. Never runs under a lock;
    /// keep it short (spawn for I/O).
    pub fn on_presence_join(mut self, f: impl Fn(&Hub, &PresenceEvent) + Send + Sync + 'static) -> Self {
        self.extension_setup::<Setup>().on_join = Some(Arc::new(f));
        self
    }

    /// Called when a presence key leaves a room as seen by this node: its
    /// last meta went (a leave, a disconnect, a heartbeat timeout, or the
    /// expiry of a vanished node's entries). For "last seen" bookkeeping.
    pub fn on_presence_leave(mut self, f: impl Fn(&Hub, &PresenceEvent) + Send + Sync + 'static) -> Self {
        self.extension_setup::<Setup>().on_leave = Some(Arc::new(f));
        self
    }
}

impl Hub {
    /// Who is in `room`: one entry per presence key, sorted by key, each
    /// with its metas. For a room this node has members in, its live view
    /// (every node's metas, ephemeral flags included); otherwise the
    /// store's records. Empty when presence is off.
    pub async fn presence(&self, room: &str) -> crate::Result<Vec<PresenceEntry>> {
        match self.extension::<PresenceHub>() {
            Some(p) => p.entries(room).await,
            None => Ok(Vec::new()),
        }
    }

    /// How many keys and connections `room`'s presence has (same sources as
    /// [`Hub::presence`]).
    pub async fn presence_count(&self, room: &str) -> crate::Result<PresenceCount> {
        match self.extension::<PresenceHub>() {
            Some(p) => p.count(room).await,
            None => Ok(PresenceCount::default()),
        }
    }

    /// Whether `user` has presence in any room, on any node: a connection of
    /// this node in a presence room, or a live record of another node in the
    /// store. `false` when presence is off.
    pub async fn is_user_online(&self, user: &str) -> crate::Result<bool> {
        match self.extension::<PresenceHub>() {
            Some(p) => p.user_online(user).await,
            None => Ok(false),
        }
    }

    /// Counts of this node's presence state (all zero when presence is off).
    pub fn presence_stats(&self) -> PresenceStats {
        self.extension::<PresenceHub>().map(PresenceHub::stats).unwrap_or_default()
    }
}
