//! The hub: the host's handle on rooms, connections, handlers and shutdown.

pub mod admin;
mod backplane_link;
mod builder;
mod config;
mod connection;
mod delivery;
mod drain;
pub(crate) mod extension;
mod gate;
pub mod handler;
mod heartbeat;
mod hooks;
mod lifecycle;
mod publish;
mod registry;
pub mod room;
pub(crate) mod session;
pub(crate) mod stream;

pub use builder::HubBuilder;
pub use config::{HubConfig, OverflowPolicy};
pub use connection::{Connection, ConnectionId, ConnectionState, DisconnectReason, HubStats};
pub use drain::{DrainConfig, DrainReport};
use publish::check_event;
pub(crate) use publish::{transcoding, Encoded, MAX_EVENT_NAME_LEN};
pub use publish::{Publish, Published};

use super::handler::{CallError, FieldErrors, Handler, TypedHandler};
use super::room::{validate_room_name, Member, Rooms};
use crate::auth::{Authenticate, AuthorizeJoin, Identity, JoinRequest, Refresh, Rejection};
use crate::backplane::message::RoomMessage;
use crate::backplane::Backplane;
use crate::error::{Error, ErrorKind, Result};
use crate::history::{HistoryConfig, HistoryRead, HistoryStore, StreamPosition};
use crate::protocol::{CloseCode, ErrorCode, Format, Kind, Parts, Payload, ProtocolError};
use crate::security::{Admission, AdmissionState, SecurityConfig};
use crate::transport::{Handshake, Transport};
use backplane_link::BackplaneLink;
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::FutureExt;
use parking_lot::RwLock;
use serde::de::DeserializeOwned;
use serde::Serialize;
use session::{JoinAnswer, Session, Wire};
use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

type ConnectHook = Arc<dyn Fn(&Connection) + Send + Sync>;
type DisconnectHook = Arc<dyn Fn(&Connection, &DisconnectReason) + Send + Sync>;
type RoomHook = Arc<dyn Fn(&Connection, &str) + Send + Sync>;

#[derive(Default)]
struct Hooks {
    connect: Option<ConnectHook>,
    disconnect: Option<DisconnectHook>,
    join: Option<RoomHook>,
    leave: Option<RoomHook>,
    /// Runs them in order per connection (`hooks.rs`).
    order: hooks::HookOrder,
}

pub(crate) struct HubInner {
    pub(crate) node: u64,
    pub(crate) config: HubConfig,
    pub(crate) handlers: HashMap<Arc<str>, Arc<dyn Handler>>,
    authenticate: Option<Box<dyn Authenticate>>,
    authorize_join: Option<Box<dyn AuthorizeJoin>>,
    pub(crate) refresh: Option<Box<dyn Refresh>>,
    pub(crate) security: SecurityConfig,
    admission: Arc<AdmissionState>,
    hooks: Hooks,
    pub(crate) rooms: Rooms,
    sessions: RwLock<HashMap<ConnectionId, Arc<Session>>>,
    users: RwLock<HashMap<Arc<str>, Vec<ConnectionId>>>,
    next_id: AtomicU64,
    pub(crate) tasks: AtomicUsize,
    heartbeat: OnceLock<mpsc::Sender<Weak<Session>>>,
    pub(crate) backplane: Option<Arc<BackplaneLink>>,
    /// Presence, when it is on (the hub knows it only as an extension).
    pub(crate) extension: Option<Arc<dyn extension::RoomExtension>>,
    pub(crate) history: Option<HistoryLink>,
    shutting_down: AtomicBool,
    draining: drain::Draining,
    shutdown: CancellationToken,
    sessions_changed: Notify,
}

/// The hub's history store and which rooms are recoverable.
pub(crate) struct HistoryLink {
    pub(crate) store: Arc<dyn HistoryStore>,
    pub(crate) config: HistoryConfig,
    /// The position-check task, started with the first recoverable room.
    pub(crate) checker: OnceLock<()>,
}

impl Drop for HubInner {
    fn drop(&mut self) {
        if let Some(link) = &self.backplane {
            link.close();
        }
    }
}

/// Counts a task in [`HubStats::tasks`] for as long as it lives.
pub(crate) struct TaskGuard(Weak<HubInner>);

impl TaskGuard {
    pub(crate) fn new(inner: &Arc<HubInner>) -> TaskGuard {
        inner.tasks.fetch_add(1, Ordering::Relaxed);
        TaskGuard(Arc::downgrade(inner))
    }
}

impl Drop for TaskGuard {
    fn drop(&mut self) {
        if let Some(inner) = self.0.upgrade() {
            inner.tasks.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// The host's handle: rooms, connections, publishing, shutdown.
///
/// Cheap to clone (an `Arc`); every clone is the same hub. Build one with
/// [`Hub::builder`].
#[derive(Clone)]
pub struct Hub {
    pub(crate) inner: Arc<HubInner>,
}

impl fmt::Debug for Hub {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hub").field("node", &self.inner.node).field("stats", &self.stats()).finish()
    }
}

/// Runs a host hook; a panic in it is logged and contained, so the
/// connection's own bookkeeping (rooms, registry, counts) still completes.
fn run_hook(name: &str, f: impl FnOnce()) {
    if std::panic::catch_unwind(AssertUnwindSafe(f)).is_err() {
        tracing::error!(hook = name, "a hook panicked; the panic was contained");
    }
}

impl Hub {
    pub(crate) fn history(&self) -> Option<&HistoryLink> {
        self.inner.history.as_ref()
    }

    /// The history settings of `room` when it is recoverable.
    fn recoverable(&self, room: &str) -> Option<&crate::history::RoomHistory> {
        self.inner.history.as_ref()?.config.room(room)
    }

    /// The configuration.
    pub fn config(&self) -> &HubConfig {
        &self.inner.config
    }

    /// This hub's node id (random per hub; used to tell nodes apart on the
    /// backplane).
    pub fn node_id(&self) -> u64 {
        self.inner.node
    }

    /// Current counts.
    pub fn stats(&self) -> HubStats {
        HubStats {
            connections: self.inner.sessions.read().len(),
            rooms: self.inner.rooms.count(),
            tasks: self.inner.tasks.load(Ordering::Relaxed),
            users: self.inner.users.read().len(),
            admitted: self.inner.admission.total(),
            client_addresses: self.inner.admission.addresses(),
        }
    }

    /// Open connections by [`Transport::name`] (the metrics' `transport` label).
    #[cfg_attr(not(feature = "metrics"), allow(dead_code))]
    pub(crate) fn connections_by_transport(&self) -> Vec<(&'static str, usize)> {
        let mut n: Vec<(&'static str, usize)> = Vec::new();
        for s in self.inner.sessions.read().values() {
            match n.iter_mut().find(|(t, _)| *t == s.origin.transport()) {
                Some((_, count)) => *count += 1,
                None => n.push((s.origin.transport(), 1)),
            }
        }
        n
    }

    /// The admission policy.
    pub fn security(&self) -> &SecurityConfig {
        &self.inner.security
    }
}

/// The hub's gauges, from its own counts, and the per-message counters'
/// tally.
#[cfg(feature = "metrics")]
impl crate::metrics::Sample for Hub {
    fn sample_metrics(&self) {
        let stats = self.stats();
        let members = self.inner.rooms.memberships();
        crate::metrics::hub_gauges(&self.connections_by_transport(), stats.rooms, members, stats.users, stats.tasks);
        crate::metrics::publish_tally();
    }
}
