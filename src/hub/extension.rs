//! The seam between the hub and the room features built on top of it
//! (presence today). The hub calls a [`RoomExtension`] at fixed points of a
//! connection's life and never names the feature's types; the feature
//! reaches the hub only through the narrow methods below, never through
//! its private state. So the dependency points one way: the feature
//! depends on the hub, not the other way round.

use super::session::Session;
use super::{Hub, HubBuilder, HubInner, TaskGuard};
use crate::backplane::Backplane;
use crate::protocol::{Envelope, ErrorCode};
use futures::future::BoxFuture;
use serde::Serialize;
use std::any::Any;
use std::sync::{Arc, Weak};

/// `hello`'s `presence` field: the limits a client's presence updates
/// must respect (`docs/protocol.md`).
#[derive(Debug, Clone, Serialize)]
pub(crate) struct PresenceHello {
    pub(crate) ephemeral_ttl_ms: u64,
    pub(crate) max_meta_bytes: usize,
    pub(crate) update_rate: u32,
    pub(crate) update_burst: u32,
}

/// A room feature above the hub. Every call is made without hub locks held.
pub(crate) trait RoomExtension: Send + Sync + 'static {
    /// What `hello` says about the feature.
    fn hello(&self) -> PresenceHello;
    /// Before a join completes: the feature's room state is ready (an
    /// `Err` refuses the join: a client gets the 503 of every outage).
    fn prepare<'a>(&'a self, hub: &'a Hub, room: &'a str) -> BoxFuture<'a, crate::Result<()>>;
    /// After a join was answered.
    fn after_join(&self, hub: &Hub, session: &Arc<Session>, room: &str);
    /// After a member left (`room_gone`: it was the last one here).
    fn leave(&self, hub: &Hub, session: &Session, room: &str, room_gone: bool);
    /// A client's `presence` envelope.
    fn request(&self, session: &Arc<Session>, env: Envelope);
    /// At the end of a shutdown: push out what the closed connections left.
    fn flush<'a>(&'a self, hub: &'a Hub) -> BoxFuture<'a, ()>;
    /// For the feature's own host-facing methods on [`Hub`].
    fn as_any(&self) -> &dyn Any;
}

/// What the builder collects for a [`RoomExtension`] before the hub exists.
pub(crate) trait ExtensionSetup: Send + 'static {
    /// The extension, if the collected settings turn it on. `queue_bytes`:
    /// the bound of each connection's outbound queue
    /// (`HubConfig::outbound_queue_bytes`), which the feature's messages
    /// must stay well within.
    fn build(self: Box<Self>, node: u64, backplane: bool, queue_bytes: usize) -> Option<Arc<dyn RoomExtension>>;
    /// For [`HubBuilder::extension_setup`].
    fn as_any_mut(&mut self) -> &mut dyn Any;
}

impl HubBuilder {
    /// The builder's settings of type `T`, created on first use.
    pub(crate) fn extension_setup<T: ExtensionSetup + Default>(&mut self) -> &mut T {
        let fresh = self.extension.as_mut().is_none_or(|e| !e.as_any_mut().is::<T>());
        if fresh {
            self.extension = Some(Box::new(T::default()));
        }
        match self.extension.as_mut().and_then(|e| e.as_any_mut().downcast_mut::<T>()) {
            Some(setup) => setup,
            None => unreachable!("the setup was just stored with this type"),
        }
    }
}

/// A hub that does not keep it alive: for a feature's background tasks.
#[derive(Clone)]
pub(crate) struct WeakHub(Weak<HubInner>);

impl WeakHub {
    /// The hub, while it is alive.
    pub(crate) fn upgrade(&self) -> Option<Hub> {
        self.0.upgrade().map(|inner| Hub { inner })
    }
}

impl Hub {
    /// A handle that does not keep the hub alive.
    pub(crate) fn downgrade(&self) -> WeakHub {
        WeakHub(Arc::downgrade(&self.inner))
    }

    /// The backplane linking this hub to others, if any.
    pub(crate) fn backplane(&self) -> Option<&Arc<dyn Backplane>> {
        self.inner.backplane.as_ref().map(|link| &link.backplane)
    }

    /// Counts a background task in [`HubStats::tasks`](crate::hub::HubStats::tasks)
    /// until the guard is dropped.
    pub(crate) fn task_guard(&self) -> TaskGuard {
        TaskGuard::new(&self.inner)
    }

    /// Whether `room` has members on this node.
    pub(crate) fn has_local_room(&self, room: &str) -> bool {
        self.inner.rooms.contains(room)
    }

    /// After a successful join: the extension's part (a presence meta).
    pub(crate) fn extension_joined(&self, session: &Arc<Session>, room: &str) {
        if let Some(ext) = &self.inner.extension {
            ext.after_join(self, session, room);
        }
    }

    /// A client's `presence` envelope: 400 when no extension takes it.
    pub(crate) fn extension_request(&self, session: &Arc<Session>, env: Envelope) {
        match &self.inner.extension {
            Some(ext) => ext.request(session, env),
            None => session.send_error(env.reference, ErrorCode::BAD_REQUEST.0, "presence is not enabled"),
        }
    }

    /// The room extension of type `T`, if it is on.
    pub(crate) fn extension<T: RoomExtension>(&self) -> Option<&T> {
        self.inner.extension.as_ref().and_then(|e| e.as_any().downcast_ref::<T>())
    }
}
