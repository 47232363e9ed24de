//! The hub: the host's handle on rooms, connections, handlers and shutdown.

mod backplane_link;
mod config;
pub(crate) mod extension;
pub mod handler;
mod heartbeat;
pub mod room;
pub(crate) mod session;
pub(crate) mod stream;

pub use config::{HubConfig, OverflowPolicy};

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
use session::{Session, Wire};
use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

/// Identifies a connection within its hub. Never reused by a hub.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnectionId(u64);

impl ConnectionId {
    /// The number behind the id (also what `hello` tells the client).
    pub fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for ConnectionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Where a connection is in its lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ConnectionState {
    /// Accepted; `hello` not yet sent.
    Connecting = 0,
    /// Exchanging messages.
    Open = 1,
    /// A close was decided; draining the queue and closing.
    Closing = 2,
    /// Gone.
    Closed = 3,
}

impl ConnectionState {
    fn from_u8(v: u8) -> ConnectionState {
        match v {
            0 => ConnectionState::Connecting,
            1 => ConnectionState::Open,
            2 => ConnectionState::Closing,
            _ => ConnectionState::Closed,
        }
    }
}

/// Why a connection ended, as given to the `on_disconnect` hook.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DisconnectReason {
    /// The client sent a close frame.
    ClientClosed {
        /// Its close code, if it gave one.
        code: Option<CloseCode>,
        /// Its reason text.
        reason: String,
    },
    /// The connection dropped without a close frame (or a write failed).
    ConnectionLost,
    /// No sign of life within the heartbeat timeout (close 4001).
    HeartbeatTimeout,
    /// The outbound queue overflowed under the disconnect policy (close 4000).
    SlowConsumer,
    /// The hub shut down (close 1001).
    ServerShutdown,
    /// The host closed it with [`Hub::disconnect`].
    Host(CloseCode),
    /// The client kept sending over its message rate limit (close 1008).
    RateLimited,
    /// The connection's credentials expired without a `refresh` (close 4003).
    TokenExpired,
    /// The client broke the transport's rules: too big (1009), invalid
    /// UTF-8 (1007), protocol error (1002).
    ProtocolViolation(CloseCode),
}

/// A host's view of one live connection (from hooks and [`Hub::connection`]).
///
/// Holds a handle on its hub ([`Connection::hub`]), so hooks can publish or
/// look things up without capturing the hub they are registered on.
#[derive(Clone)]
pub struct Connection(Arc<Session>, Hub);

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection").field("id", &self.0.id).field("identity", &self.0.identity).finish()
    }
}

impl Connection {
    /// Its id.
    pub fn id(&self) -> ConnectionId {
        self.0.id
    }

    /// The hub it belongs to.
    pub fn hub(&self) -> &Hub {
        &self.1
    }

    /// Its identity.
    pub fn identity(&self) -> &Identity {
        &self.0.identity
    }

    /// The user id of its identity.
    pub fn user_id(&self) -> Option<&str> {
        self.0.identity.user_id()
    }

    /// Its envelope format.
    pub fn format(&self) -> Format {
        self.0.format
    }

    /// Its lifecycle state.
    pub fn state(&self) -> ConnectionState {
        self.0.state()
    }

    /// The rooms it is in.
    pub fn rooms(&self) -> Vec<String> {
        self.0.rooms.lock().iter().map(|r| r.to_string()).collect()
    }

    /// Bytes queued for it and not yet written.
    pub fn queued_bytes(&self) -> usize {
        self.0.outbox.queued_bytes()
    }

    /// The most bytes ever queued for it at once (never above
    /// [`HubConfig::outbound_queue_bytes`]).
    pub fn peak_queued_bytes(&self) -> usize {
        self.0.outbox.peak_bytes()
    }

    /// Messages dropped for it under the drop-oldest policy.
    pub fn dropped_messages(&self) -> u64 {
        self.0.outbox.dropped()
    }
}

/// Counts for observability and leak tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct HubStats {
    /// Live connections (any state before closed).
    pub connections: usize,
    /// Rooms with at least one local member.
    pub rooms: usize,
    /// Live tasks belonging to connections and rooms: connection readers and
    /// writers, in-flight calls and joins, backplane room subscriptions.
    pub tasks: usize,
    /// Distinct user ids with at least one connection.
    pub users: usize,
    /// Admission slots held ([`SecurityConfig::max_connections`]): upgrades
    /// admitted and not yet ended, including handshakes in progress.
    pub admitted: usize,
    /// Distinct client addresses (IPv6: /64 networks) holding admission slots.
    pub client_addresses: usize,
}

type ConnectHook = Arc<dyn Fn(&Connection) + Send + Sync>;
type DisconnectHook = Arc<dyn Fn(&Connection, &DisconnectReason) + Send + Sync>;
type RoomHook = Arc<dyn Fn(&Connection, &str) + Send + Sync>;

#[derive(Default)]
struct Hooks {
    connect: Option<ConnectHook>,
    disconnect: Option<DisconnectHook>,
    join: Option<RoomHook>,
    leave: Option<RoomHook>,
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

/// Builds a [`Hub`]: configuration, handlers, auth hooks, lifecycle hooks,
/// backplane.
#[must_use]
pub struct HubBuilder {
    config: HubConfig,
    handlers: HashMap<Arc<str>, Arc<dyn Handler>>,
    authenticate: Option<Box<dyn Authenticate>>,
    authorize_join: Option<Box<dyn AuthorizeJoin>>,
    refresh: Option<Box<dyn Refresh>>,
    security: SecurityConfig,
    hooks: Hooks,
    backplane: Option<Arc<dyn Backplane>>,
    pub(crate) extension: Option<Box<dyn extension::ExtensionSetup>>,
    history: Option<(Arc<dyn HistoryStore>, HistoryConfig)>,
}

impl fmt::Debug for HubBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HubBuilder")
            .field("config", &self.config)
            .field("security", &self.security)
            .field("handlers", &self.handlers.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl HubBuilder {
    /// Replaces the configuration.
    pub fn config(mut self, config: HubConfig) -> Self {
        self.config = config;
        self
    }

    /// Registers a typed handler for `event`: the payload is deserialized
    /// into `Req` (a 422 error if it does not fit), the `Resp` is the reply.
    /// A second handler for the same event replaces the first.
    pub fn on<F, Fut, Req, Resp>(self, event: &str, handler: F) -> Self
    where
        F: Fn(crate::Call, Req) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<Resp, CallError>> + Send + 'static,
        Req: DeserializeOwned + Send + 'static,
        Resp: Serialize + Send + 'static,
    {
        self.handler(event, TypedHandler::new(handler, super::handler::no_validation::<Req>))
    }

    /// Like [`HubBuilder::on`], with a validator run on the deserialized
    /// payload before the handler: when it returns [`FieldErrors`], the
    /// client gets `error 422` "validation failed" with `data`
    /// `{"fields": [{"field", "code", "message"}, …]}` and the handler is not
    /// called. See the [`handler`](crate::handler) module for an example.
    pub fn on_validated<V, F, Fut, Req, Resp>(self, event: &str, validate: V, handler: F) -> Self
    where
        V: Fn(&Req) -> std::result::Result<(), FieldErrors> + Send + Sync + 'static,
        F: Fn(crate::Call, Req) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<Resp, CallError>> + Send + 'static,
        Req: DeserializeOwned + Send + 'static,
        Resp: Serialize + Send + 'static,
    {
        self.handler(event, TypedHandler::new(handler, validate))
    }

    /// Registers an untyped [`Handler`] for `event`.
    pub fn handler(mut self, event: &str, handler: impl Handler) -> Self {
        self.handlers.insert(Arc::from(event), Arc::new(handler));
        self
    }

    /// Sets the authenticator run before each upgrade (default: everyone is
    /// admitted, anonymous).
    pub fn authenticate(mut self, auth: impl Authenticate) -> Self {
        self.authenticate = Some(Box::new(auth));
        self
    }

    /// Sets the join authorizer (default: every valid room may be joined).
    pub fn authorize_join(mut self, auth: impl AuthorizeJoin) -> Self {
        self.authorize_join = Some(Box::new(auth));
        self
    }

    /// Sets the hook that checks a client's `refresh` token (default: none;
    /// a `refresh` then gets `error 400`, and `hello` does not offer it).
    pub fn refresh(mut self, refresh: impl Refresh) -> Self {
        self.refresh = Some(Box::new(refresh));
        self
    }

    /// Authenticates with JSON Web Tokens (feature `jwt`): sets both the
    /// authenticator and the `refresh` hook to `auth`.
    #[cfg(feature = "jwt")]
    pub fn jwt(self, auth: crate::auth::jwt::JwtAuth) -> Self {
        self.authenticate(auth.clone()).refresh(auth)
    }

    /// Replaces the admission policy: origin check, connection limits,
    /// connection rate, trusted proxies (default: [`SecurityConfig::default`]).
    pub fn security(mut self, security: SecurityConfig) -> Self {
        self.security = security;
        self
    }

    /// Called when a connection is open (after `hello` is queued). Runs on
    /// the connection's task: keep it short, spawn for anything slow.
    pub fn on_connect(mut self, f: impl Fn(&Connection) + Send + Sync + 'static) -> Self {
        self.hooks.connect = Some(Arc::new(f));
        self
    }

    /// Called once when a connection has ended, with the reason.
    pub fn on_disconnect(mut self, f: impl Fn(&Connection, &DisconnectReason) + Send + Sync + 'static) -> Self {
        self.hooks.disconnect = Some(Arc::new(f));
        self
    }

    /// Called after a connection joined a room.
    pub fn on_join(mut self, f: impl Fn(&Connection, &str) + Send + Sync + 'static) -> Self {
        self.hooks.join = Some(Arc::new(f));
        self
    }

    /// Called after a connection left a room (by request or by disconnecting).
    pub fn on_leave(mut self, f: impl Fn(&Connection, &str) + Send + Sync + 'static) -> Self {
        self.hooks.leave = Some(Arc::new(f));
        self
    }

    /// Links this hub to others through `backplane` (default: none, a single
    /// node).
    pub fn backplane(mut self, backplane: impl Backplane) -> Self {
        self.backplane = Some(Arc::new(backplane));
        self
    }

    /// Keeps the history of the rooms `config` makes recoverable in `store`
    /// (default: no room is recoverable). Hubs linked by a backplane must
    /// share one store (e.g. a clone of the same
    /// [`MemoryHistory`](crate::history::MemoryHistory) in one process).
    /// See [`history`](crate::history) and `docs/recovery.md`.
    pub fn history(mut self, store: impl HistoryStore, config: HistoryConfig) -> Self {
        self.history = Some((Arc::new(store), config));
        self
    }

    /// Builds the hub. Needs no runtime; tasks start with the first connection.
    pub fn build(self) -> Hub {
        let node = crate::util::random_u64();
        let has_backplane = self.backplane.is_some();
        Hub {
            inner: Arc::new(HubInner {
                node,
                config: self.config,
                handlers: self.handlers,
                authenticate: self.authenticate,
                authorize_join: self.authorize_join,
                refresh: self.refresh,
                admission: Arc::new(AdmissionState::new(&self.security)),
                security: self.security,
                hooks: self.hooks,
                rooms: Rooms::new(),
                sessions: RwLock::default(),
                users: RwLock::default(),
                next_id: AtomicU64::new(1),
                tasks: AtomicUsize::new(0),
                heartbeat: OnceLock::new(),
                extension: self.extension.and_then(|e| e.build(node, has_backplane)),
                backplane: self.backplane.map(|b| Arc::new(BackplaneLink::new(b))),
                history: self.history.map(|(store, config)| HistoryLink { store, config, checker: OnceLock::new() }),
                shutting_down: AtomicBool::new(false),
                shutdown: CancellationToken::new(),
                sessions_changed: Notify::new(),
            }),
        }
    }
}

/// The future returned by [`Hub::publish`]: resolves when the backplane
/// accepted the message (local members were queued when it was created; in
/// a recoverable room, when the store appended it — at once with an
/// in-memory store, otherwise in a task spawned by `publish`, so dropping
/// this future loses nothing).
#[must_use = "delivery is under way; await this to learn whether it was stored and reached other nodes"]
pub struct Publish(PublishState);

enum PublishState {
    Done(Option<Error>, Published),
    Backplane(futures::future::BoxFuture<'static, Result<()>>, Published),
    Task(futures::future::BoxFuture<'static, Result<Published>>),
}

/// What a completed [`Publish`] did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct Published {
    /// In a recoverable room, the event's position in the room's stream
    /// (for a duplicate, the original's); `None` in other rooms.
    pub position: Option<StreamPosition>,
    /// `true` when the idempotency key was seen before: nothing was stored
    /// or delivered again.
    pub duplicate: bool,
}

/// As `{"offset": 7, "epoch": "…", "duplicate": false}` (`null` offset and
/// epoch outside recoverable rooms), so a handler can return it as its
/// reply — e.g. to confirm an optimistic update with its stream position.
impl Serialize for Published {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut st = s.serialize_struct("Published", 3)?;
        st.serialize_field("offset", &self.position.as_ref().map(|p| p.offset))?;
        st.serialize_field("epoch", &self.position.as_ref().map(|p| &*p.epoch))?;
        st.serialize_field("duplicate", &self.duplicate)?;
        st.end()
    }
}

impl fmt::Debug for Publish {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Publish").finish_non_exhaustive()
    }
}

impl Future for Publish {
    type Output = Result<Published>;

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<Published>> {
        use std::task::Poll;
        match &mut self.0 {
            PublishState::Done(e, p) => Poll::Ready(match e.take() {
                Some(e) => Err(e),
                None => Ok(std::mem::take(p)),
            }),
            PublishState::Backplane(f, p) => match f.as_mut().poll(cx) {
                Poll::Ready(Ok(())) => Poll::Ready(Ok(std::mem::take(p))),
                Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                Poll::Pending => Poll::Pending,
            },
            PublishState::Task(f) => f.as_mut().poll(cx),
        }
    }
}

/// Runs a host hook; a panic in it is logged and contained, so the
/// connection's own bookkeeping (rooms, registry, counts) still completes.
fn run_hook(name: &str, f: impl FnOnce()) {
    if std::panic::catch_unwind(AssertUnwindSafe(f)).is_err() {
        tracing::error!(hook = name, "a hook panicked; the panic was contained");
    }
}

/// Takes back a membership whose join did not complete (see `add_member`).
struct Rollback<'a> {
    hub: &'a Hub,
    session: &'a Arc<Session>,
    room: &'a str,
    armed: bool,
}

impl Drop for Rollback<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.hub.remove_member(self.session, self.room, false);
        }
    }
}

/// Encodes one publish at most once per format, however many recipients.
pub(crate) struct Encoded<'a> {
    pub(crate) room: Option<&'a str>,
    pub(crate) event: &'a str,
    /// The event's offset in a recoverable room.
    pub(crate) offset: Option<u64>,
    pub(crate) payload: &'a mut dyn FnMut(Format) -> std::result::Result<Option<Payload>, ProtocolError>,
    /// By [`Wire::index`].
    pub(crate) frames: [Option<Bytes>; Wire::COUNT],
}

/// The payload source of an [`Encoded`] for an event whose payload is
/// already encoded (from the backplane, the store): each format gets the
/// payload transcoded (or as it is, in its own format).
pub(crate) fn transcoding(
    source: Option<&Payload>,
) -> impl FnMut(Format) -> std::result::Result<Option<Payload>, ProtocolError> + '_ {
    move |format| source.map(|p| p.to_format(format)).transpose()
}

impl Encoded<'_> {
    /// The event in `wire`'s form: encoded once per format, framed once
    /// per framed form.
    pub(crate) fn get(&mut self, wire: Wire) -> std::result::Result<Bytes, ProtocolError> {
        if let Some(b) = &self.frames[wire.index()] {
            return Ok(b.clone());
        }
        let plain = Wire::plain(wire.format);
        let envelope = match &self.frames[plain.index()] {
            Some(b) => b.clone(),
            None => {
                let payload = (self.payload)(wire.format)?;
                let parts = Parts {
                    room: self.room,
                    event: Some(self.event),
                    data: payload.as_ref().map(|p| p.bytes().as_ref()),
                    offset: self.offset,
                    ..Parts::new(Kind::Event)
                };
                let bytes = parts.encode(wire.format);
                self.frames[plain.index()] = Some(bytes.clone());
                bytes
            }
        };
        let bytes = wire.prepare(envelope);
        self.frames[wire.index()] = Some(bytes.clone());
        Ok(bytes)
    }
}

pub(crate) const MAX_EVENT_NAME_LEN: usize = 128;

fn check_event(event: &str) -> Result<()> {
    if event.is_empty() || event.len() > MAX_EVENT_NAME_LEN {
        return Err(Error::msg(ErrorKind::Protocol, "event name must be 1 to 128 bytes"));
    }
    Ok(())
}

impl Hub {
    /// A builder with the default configuration.
    pub fn builder() -> HubBuilder {
        HubBuilder {
            config: HubConfig::default(),
            handlers: HashMap::new(),
            authenticate: None,
            authorize_join: None,
            refresh: None,
            security: SecurityConfig::default(),
            hooks: Hooks::default(),
            backplane: None,
            extension: None,
            history: None,
        }
    }

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

    /// The admission policy.
    pub fn security(&self) -> &SecurityConfig {
        &self.inner.security
    }

    /// Decides whether an upgrade request may proceed, before the
    /// authenticator and the upgrade: shutdown (503), the client's address
    /// (from the peer, or from a trusted proxy's forwarded-for header; a
    /// malformed one is 400), the `Origin` check (403), the connection limit
    /// (503), the per-address limit (429) and the connection rate (429 with
    /// `retry-after`). Both the standalone listener and the axum route call
    /// it; a host's own transport should too.
    ///
    /// On success the handshake's [`Handshake::client_ip`] is set, and the
    /// returned [`Admission`] holds the connection's slots until dropped:
    /// keep it alive as long as the connection.
    pub fn admit(&self, handshake: &mut Handshake) -> std::result::Result<Admission, Rejection> {
        if self.is_shutting_down() {
            return Err(Rejection::new(http::StatusCode::SERVICE_UNAVAILABLE, "server is shutting down"));
        }
        let peer = handshake.peer_addr().map(|p| p.ip());
        let (ticket, client) =
            crate::security::admit(&self.inner.security, &self.inner.admission, peer, handshake.headers())?;
        if let Some(ip) = client {
            handshake.set_client_ip(ip);
        }
        Ok(ticket)
    }

    /// Runs the authenticator on a handshake. Transports call this *before*
    /// upgrading, and answer a rejection with its HTTP status. During
    /// shutdown every handshake is rejected with 503.
    /// The returned future does not borrow the handshake.
    pub fn authenticate(&self, handshake: &Handshake) -> BoxFuture<'static, std::result::Result<Identity, Rejection>> {
        if self.is_shutting_down() {
            return Box::pin(async {
                Err(Rejection::new(http::StatusCode::SERVICE_UNAVAILABLE, "server is shutting down"))
            });
        }
        let Some(auth) = &self.inner.authenticate else { return Box::pin(async { Ok(Identity::anonymous()) }) };
        // A panicking authenticator refuses with 500 instead of dropping the
        // socket without an answer.
        let failed = || Rejection::new(http::StatusCode::INTERNAL_SERVER_ERROR, "authentication failed");
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| auth.authenticate(handshake))) {
            Ok(fut) => {
                Box::pin(async move { AssertUnwindSafe(fut).catch_unwind().await.unwrap_or_else(|_| Err(failed())) })
            }
            Err(_) => Box::pin(async move { Err(failed()) }),
        }
    }

    /// The gate every transport's opening goes through, in this order:
    /// [`Hub::admit`] (a refused client costs no authentication work, and a
    /// reconnect storm is cut off here), then [`Hub::authenticate`] bounded
    /// by `timeout` (over it: 503 "authentication timed out"). The
    /// [`Admission`] holds the connection's slots until it is dropped.
    pub(crate) async fn open_gate(
        &self,
        handshake: &mut Handshake,
        timeout: Duration,
    ) -> std::result::Result<(Admission, Identity), Rejection> {
        let admission = self.admit(handshake)?;
        match tokio::time::timeout(timeout, self.authenticate(handshake)).await {
            Ok(Ok(identity)) => Ok((admission, identity)),
            Ok(Err(rejection)) => Err(rejection),
            Err(_) => Err(Rejection::new(http::StatusCode::SERVICE_UNAVAILABLE, "authentication timed out")),
        }
    }

    /// Authenticates and then serves a connection of any [`Transport`] until
    /// it ends. For transports that have no HTTP step to reject at; a
    /// rejected handshake is returned as `Err` and the transport dropped.
    pub async fn connect<T: Transport>(
        &self,
        transport: T,
        handshake: Handshake,
    ) -> std::result::Result<(), Rejection> {
        let identity = self.authenticate(&handshake).await?;
        self.serve(transport, &handshake, identity).await;
        Ok(())
    }

    /// Serves an authenticated connection until it ends. Resolves after the
    /// connection is closed and forgotten (rooms left, hooks run).
    ///
    /// The connection is registered when this is called; the returned future
    /// does not borrow the handshake, so the caller can drop it (and its
    /// headers) right away instead of keeping it for the connection's life.
    pub fn serve<T: Transport>(
        &self,
        transport: T,
        handshake: &Handshake,
        identity: Identity,
    ) -> impl Future<Output = ()> + Send + 'static {
        let id = ConnectionId(self.inner.next_id.fetch_add(1, Ordering::Relaxed));
        let mut transport = transport;
        let wire = (transport.native_ping(), transport.prefer_framed());
        let session = Arc::new(Session::new(id, handshake.format(), identity, wire, self));
        self.register(&session);
        if self.is_shutting_down() {
            session.close(DisconnectReason::ServerShutdown, CloseCode::GOING_AWAY, "server shutting down", true);
        }
        session::run(self.clone(), session, transport)
    }

    fn register(&self, session: &Arc<Session>) {
        self.inner.sessions.write().insert(session.id, session.clone());
        if let Some(user) = session.identity.user_arc() {
            self.inner.users.write().entry(user.clone()).or_default().push(session.id);
        }
    }

    pub(crate) fn deregister(&self, session: &Session) {
        self.inner.sessions.write().remove(&session.id);
        if let Some(user) = session.identity.user_arc() {
            let mut users = self.inner.users.write();
            if let Some(ids) = users.get_mut(user) {
                ids.retain(|i| *i != session.id);
                if ids.is_empty() {
                    users.remove(user);
                }
            }
        }
    }

    pub(crate) fn session_ended(&self) {
        self.inner.sessions_changed.notify_waiters();
    }

    pub(crate) async fn register_heartbeat(&self, session: &Arc<Session>) {
        let cfg = &self.inner.config;
        if cfg.heartbeat_interval.is_zero() {
            return;
        }
        let tx = self.inner.heartbeat.get_or_init(|| heartbeat::spawn(cfg.heartbeat_interval, cfg.heartbeat_timeout));
        let _ = tx.send(Arc::downgrade(session)).await;
    }

    pub(crate) fn send_hello(&self, session: &Session) {
        #[derive(Serialize)]
        struct Hello {
            version: u32,
            server_version: &'static str,
            connection_id: u64,
            node: String,
            heartbeat_interval_ms: u64,
            heartbeat_timeout_ms: u64,
            max_message_size: usize,
            max_rooms: usize,
            max_inflight: usize,
            #[serde(skip_serializing_if = "Option::is_none")]
            presence: Option<extension::PresenceHello>,
            #[serde(skip_serializing_if = "Option::is_none")]
            rate_limit: Option<RateHello>,
            #[serde(skip_serializing_if = "Option::is_none")]
            expires_in_ms: Option<u64>,
            #[serde(skip_serializing_if = "std::ops::Not::not")]
            refresh: bool,
        }
        #[derive(Serialize)]
        struct RateHello {
            messages: u32,
            per_ms: u64,
            burst: u32,
        }
        let cfg = &self.inner.config;
        let rate = session.identity.rate_limit_or(cfg.rate_limit);
        let hello = Hello {
            version: crate::protocol::VERSION,
            server_version: env!("CARGO_PKG_VERSION"),
            connection_id: session.id.0,
            node: format!("{:016x}", self.inner.node),
            heartbeat_interval_ms: cfg.heartbeat_interval.as_millis() as u64,
            heartbeat_timeout_ms: cfg.heartbeat_timeout.as_millis() as u64,
            max_message_size: cfg.max_message_size,
            max_rooms: cfg.max_rooms_per_connection,
            max_inflight: cfg.max_inflight,
            presence: self.inner.extension.as_ref().map(|e| e.hello()),
            rate_limit: rate.map(|r| RateHello {
                messages: r.messages,
                per_ms: r.per.as_millis().try_into().unwrap_or(u64::MAX),
                burst: r.burst,
            }),
            expires_in_ms: session
                .deadline()
                .map(|d| d.saturating_duration_since(tokio::time::Instant::now()).as_millis() as u64),
            refresh: self.inner.refresh.is_some(),
        };
        let payload = Payload::encode(session.format, &hello).unwrap_or_else(|_| Payload::null(session.format));
        session.send_parts(&Parts { data: Some(payload.bytes()), ..Parts::new(Kind::Hello) });
    }

    pub(crate) fn hook_connect(&self, session: &Arc<Session>) {
        if let Some(h) = &self.inner.hooks.connect {
            run_hook("connect", || h(&Connection(session.clone(), self.clone())));
        }
    }

    pub(crate) fn hook_disconnect(&self, session: &Arc<Session>, reason: &DisconnectReason) {
        if let Some(h) = &self.inner.hooks.disconnect {
            run_hook("disconnect", || h(&Connection(session.clone(), self.clone()), reason));
        }
    }

    /// A live connection by id.
    pub fn connection(&self, id: ConnectionId) -> Option<Connection> {
        self.inner.sessions.read().get(&id).cloned().map(|s| Connection(s, self.clone()))
    }

    /// Joins a connection to a room, as if it had sent `join` (the join
    /// authorizer is not asked: the host decided). Errors if the room name
    /// is invalid or the connection's room limit is reached.
    pub async fn join(&self, id: ConnectionId, room: &str) -> std::result::Result<(), CallError> {
        let session = self.inner.sessions.read().get(&id).cloned();
        let session = session.ok_or_else(|| CallError::with_code(ErrorCode::BAD_REQUEST, "not connected"))?;
        validate_room_name(room).map_err(CallError::bad_request)?;
        self.add_member(&session, room, stream::Want::Live, None).await?;
        self.extension_joined(&session, room);
        Ok(())
    }

    /// Removes a connection from a room; `false` if it was not a member.
    pub fn leave(&self, id: ConnectionId, room: &str) -> bool {
        let session = self.inner.sessions.read().get(&id).cloned();
        session.is_some_and(|s| self.leave_session(&s, room))
    }

    /// A client's join: the authorizer, then the membership. Returns
    /// whether the reply was already queued (recoverable rooms queue it
    /// before their replay).
    pub(crate) async fn join_session(
        &self,
        session: &Arc<Session>,
        room: &str,
        params: Option<Payload>,
        want: stream::Want,
        reference: Option<u64>,
    ) -> std::result::Result<bool, CallError> {
        if let Some(auth) = &self.inner.authorize_join {
            let req = JoinRequest {
                room: room.to_owned(),
                params,
                identity: session.identity.clone(),
                connection: session.id,
            };
            auth.authorize(req).await?;
        }
        self.add_member(session, room, want, reference).await
    }

    /// Adds the membership; returns whether a reply was queued (only with a
    /// `reference`, in a recoverable room).
    async fn add_member(
        &self,
        session: &Arc<Session>,
        room: &str,
        want: stream::Want,
        reference: Option<u64>,
    ) -> std::result::Result<bool, CallError> {
        if self.is_shutting_down() {
            return Err(CallError::with_code(ErrorCode::UNAVAILABLE, "server is shutting down"));
        }
        let created = {
            let mut rooms = session.rooms.lock();
            if rooms.iter().any(|r| &**r == room) {
                return Ok(false);
            }
            if rooms.len() >= self.inner.config.max_rooms_per_connection {
                return Err(CallError::with_code(ErrorCode::TOO_MANY_ROOMS, "room limit reached"));
            }
            if session.is_cancelled() {
                return Err(CallError::with_code(ErrorCode::UNAVAILABLE, "connection is closing"));
            }
            let (name, created, stream) = self.inner.rooms.join(room, session, self.recoverable(room));
            rooms.push(name);
            (created, stream)
        };
        let (created, stream) = created;
        // Until the join is complete (subscription in step, hook run), a
        // failure — or the caller dropping this future, e.g. on a timeout —
        // takes the membership back without an `on_leave` for a join that
        // never finished.
        let mut rollback = Rollback { hub: self, session, room, armed: true };
        if let Some(link) = &self.inner.backplane {
            if let Err(e) = link.ensure(self, room, created).await {
                return Err(CallError::from(e));
            }
        }
        // The room's presence view (and other nodes' metas) is ready before
        // the reply, so the state sent right after it is complete.
        if let Some(ext) = &self.inner.extension {
            if let Err(e) = ext.prepare(self, room).await {
                // The client gets the short 503 of every outage; the cause
                // goes to the log only.
                tracing::warn!(error = %e, room, "join failed: presence unavailable");
                return Err(CallError::with_code(ErrorCode::UNAVAILABLE, crate::protocol::UNAVAILABLE_MESSAGE));
            }
        }
        // A recoverable room: merge history and the live stream, queue the
        // reply and the replay, make the member live.
        let replied = match &stream {
            Some(stream) => {
                self.start_position_check();
                self.join_stream(session, stream, want, reference).await?;
                reference.is_some()
            }
            None => false,
        };
        rollback.armed = false;
        if let Some(h) = &self.inner.hooks.join {
            run_hook("join", || h(&Connection(session.clone(), self.clone()), room));
        }
        Ok(replied)
    }

    /// Removes a membership; with `hook`, runs `on_leave`. `false` if the
    /// session was not a member.
    fn remove_member(&self, session: &Arc<Session>, room: &str, hook: bool) -> bool {
        let removed = {
            let mut rooms = session.rooms.lock();
            let Some(pos) = rooms.iter().position(|r| &**r == room) else { return false };
            rooms.swap_remove(pos);
            self.inner.rooms.leave(room, session.id)
        };
        if removed == Some(true) {
            if let Some(link) = &self.inner.backplane {
                link.mark(self, room);
            }
        }
        if let Some(ext) = &self.inner.extension {
            ext.leave(self, session, room, removed == Some(true));
        }
        if hook {
            if let Some(h) = &self.inner.hooks.leave {
                run_hook("leave", || h(&Connection(session.clone(), self.clone()), room));
            }
        }
        true
    }

    pub(crate) fn leave_session(&self, session: &Arc<Session>, room: &str) -> bool {
        self.remove_member(session, room, true)
    }

    pub(crate) fn leave_all(&self, session: &Arc<Session>) {
        let rooms: Vec<Arc<str>> = session.rooms.lock().clone();
        for room in rooms {
            self.leave_session(session, &room);
        }
    }

    /// Number of local members of a room (0 if it does not exist).
    pub fn room_len(&self, room: &str) -> usize {
        self.inner.rooms.get(room).map_or(0, |r| r.members.read().len())
    }

    /// The local members of a room.
    pub fn room_members(&self, room: &str) -> Vec<Member> {
        let Some(r) = self.inner.rooms.get(room) else { return Vec::new() };
        let members = r.members.read();
        let mut out: Vec<Member> =
            members.values().map(|s| Member { connection: s.id, user_id: s.identity.user_arc().cloned() }).collect();
        out.sort_by_key(|m| m.connection);
        out
    }

    /// Whether `room` currently has local members.
    pub fn room_exists(&self, room: &str) -> bool {
        self.inner.rooms.contains(room)
    }

    /// Publishes `event` with `data` to every member of `room`, on this node
    /// and (through the backplane) on every other. The data is serialized at
    /// most once per envelope format, whatever the number of members.
    ///
    /// Local members are queued *when this is called*; the returned future
    /// resolves once the backplane accepted the message (at once without a
    /// backplane). It errors when the room or event name is invalid, the data
    /// does not serialize (nothing is delivered then), or the backplane fails
    /// (local members were served). The future is `'static` and `Send`, so
    /// it can be spawned.
    pub fn publish<T: Serialize + ?Sized>(&self, room: &str, event: &str, data: &T) -> Publish {
        Publish(self.publish_now(room, event, data, 0, None))
    }

    /// Like [`Hub::publish`], with an idempotency key: in a recoverable room,
    /// a retried publish with a key the room's retained history has seen is
    /// stored and delivered once (the retry resolves with the original's
    /// position and [`Published::duplicate`]). In other rooms the key is
    /// ignored.
    pub fn publish_idempotent<T: Serialize + ?Sized>(&self, room: &str, event: &str, data: &T, key: &str) -> Publish {
        Publish(self.publish_now(room, event, data, 0, Some(key)))
    }

    /// A page of `room`'s history, read from the store: the retained events
    /// after `since` (or the newest ones with `None`), at most `limit`, and
    /// the stream's top position. Errors with
    /// [`ErrorKind::Config`] when the room is not recoverable.
    pub fn history_page(
        &self,
        room: &str,
        since: Option<StreamPosition>,
        limit: usize,
    ) -> BoxFuture<'static, Result<HistoryRead>> {
        let Some(link) = self.history() else {
            return Box::pin(async { Err(Error::msg(ErrorKind::Config, "no history store")) });
        };
        if link.config.room(room).is_none() {
            return Box::pin(async { Err(Error::msg(ErrorKind::Config, "room is not recoverable")) });
        }
        link.store.read(room, since, limit)
    }

    /// The live position of a recoverable room on this node (the offset of
    /// the last event delivered to its members here), if it has local
    /// members.
    pub fn room_position(&self, room: &str) -> Option<StreamPosition> {
        self.inner.rooms.get(room)?.stream.as_ref()?.position()
    }

    /// Like [`Hub::publish`], skipping the connection `except` (typically the
    /// sender), here and on other nodes.
    pub fn publish_except<T: Serialize + ?Sized>(
        &self,
        room: &str,
        event: &str,
        data: &T,
        except: ConnectionId,
    ) -> Publish {
        Publish(self.publish_now(room, event, data, except.0, None))
    }

    fn publish_now<T: Serialize + ?Sized>(
        &self,
        room: &str,
        event: &str,
        data: &T,
        exclude: u64,
        key: Option<&str>,
    ) -> PublishState {
        let done = |e: Error| PublishState::Done(Some(e), Published::default());
        if let Err(why) = validate_room_name(room) {
            return done(Error::msg(ErrorKind::InvalidRoom, why));
        }
        if let Err(e) = check_event(event) {
            return done(e);
        }
        if let Some(settings) = self.recoverable(room) {
            let payload = match Payload::encode(Format::Json, data).or_else(|_| Payload::encode(Format::MsgPack, data))
            {
                Ok(p) => p,
                Err(e) => return done(e.into()),
            };
            return self.publish_positioned(room, event, payload, exclude, key, settings.retention);
        }
        let mut payloads: [Option<Payload>; 2] = [None, None];
        let mut payload_fn = |format: Format| -> std::result::Result<Option<Payload>, ProtocolError> {
            if let Some(p) = &payloads[format.index()] {
                return Ok(Some(p.clone()));
            }
            let p = Payload::encode(format, data)?;
            payloads[format.index()] = Some(p.clone());
            Ok(Some(p))
        };
        let mut encoded =
            Encoded { room: Some(room), event, offset: None, payload: &mut payload_fn, frames: Default::default() };
        if let Err(e) = self.deliver_local(room, exclude, &mut encoded) {
            return done(e.into());
        }
        let Some(link) = &self.inner.backplane else { return PublishState::Done(None, Published::default()) };
        // Other nodes get whichever encoding exists already (JSON first), so
        // the value is serialized no more often than local delivery needed.
        let [json, msgpack] = payloads;
        let payload = match json.or(msgpack) {
            Some(p) => p,
            None => match Payload::encode(Format::Json, data).or_else(|_| Payload::encode(Format::MsgPack, data)) {
                Ok(p) => p,
                Err(e) => return done(e.into()),
            },
        };
        let msg = RoomMessage::encode(self.inner.node, exclude, event, Some(&payload), None);
        PublishState::Backplane(link.backplane.publish(room, msg), Published::default())
    }

    /// A publish to a recoverable room: append (the store assigns the
    /// offset), deliver locally in offset order, then tell other nodes. The
    /// work is polled once here, so with a store that answers at once local
    /// delivery has happened when `publish` returns; otherwise it goes on in
    /// a spawned task.
    fn publish_positioned(
        &self,
        room: &str,
        event: &str,
        payload: Payload,
        exclude: u64,
        key: Option<&str>,
        retention: crate::history::Retention,
    ) -> PublishState {
        let Some(link) = self.history() else { unreachable!("recoverable rooms need a history store") };
        let append = crate::history::Append {
            event: event.to_owned(),
            data: Some(payload.clone()),
            idempotency_key: key.map(str::to_owned),
            retention,
        };
        let appending = link.store.append(room, append);
        let (hub, room, event) = (self.clone(), room.to_owned(), Arc::<str>::from(event));
        let work = async move {
            let appended = appending.await?;
            let position = appended.position;
            let published = Published { position: Some(position.clone()), duplicate: appended.duplicate };
            if appended.duplicate {
                return Ok(published);
            }
            let ev = stream::Positioned {
                offset: position.offset,
                epoch: position.epoch.clone(),
                event: event.clone(),
                payload: Some(payload.clone()),
                exclude,
            };
            hub.deliver_positioned(&room, ev);
            if let Some(link) = &hub.inner.backplane {
                let msg = RoomMessage::encode(hub.inner.node, exclude, &event, Some(&payload), Some(&position));
                link.backplane.publish(&room, msg).await?;
            }
            Ok(published)
        };
        let mut work: BoxFuture<'static, Result<Published>> = Box::pin(work);
        if let Some(result) = (&mut work).now_or_never() {
            return match result {
                Ok(p) => PublishState::Done(None, p),
                Err(e) => PublishState::Done(Some(e), Published::default()),
            };
        }
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                let task = rt.spawn(work);
                PublishState::Task(Box::pin(async move {
                    task.await.unwrap_or_else(|e| Err(Error::msg(ErrorKind::Backplane, format!("publish task: {e}"))))
                }))
            }
            Err(_) => PublishState::Task(work),
        }
    }

    /// Queues the event to every local member of `room` but `exclude`.
    fn deliver_local(
        &self,
        room: &str,
        exclude: u64,
        encoded: &mut Encoded<'_>,
    ) -> std::result::Result<usize, ProtocolError> {
        let Some(room) = self.inner.rooms.get(room) else { return Ok(0) };
        // Read lock held while queueing: queueing never awaits or blocks on
        // a peer, so publishers to the same room proceed in parallel.
        let members = room.members.read();
        let mut delivered = 0;
        let mut failed: [Option<ProtocolError>; 2] = [None, None];
        for (id, session) in members.iter() {
            if id.0 == exclude {
                continue;
            }
            // A value one format cannot represent (a map with non-string
            // keys in JSON) still reaches the members using the other one;
            // the error is returned once every member was tried.
            let slot = &mut failed[session.format.index()];
            if slot.is_some() {
                continue;
            }
            match encoded.get(session.wire()) {
                Ok(bytes) => {
                    session.push_prepared(bytes);
                    delivered += 1;
                }
                Err(e) => *slot = Some(e),
            }
        }
        match failed {
            [Some(e), _] | [None, Some(e)] => Err(e),
            [None, None] => Ok(delivered),
        }
    }

    /// Delivers a message that arrived over the backplane to local members.
    pub(crate) fn deliver_remote(&self, room: &str, msg: RoomMessage) {
        if msg.origin == self.inner.node {
            return;
        }
        if let Some(position) = msg.position {
            let ev = stream::Positioned {
                offset: position.offset,
                epoch: position.epoch,
                event: Arc::from(msg.event),
                payload: msg.payload,
                exclude: 0,
            };
            return self.deliver_positioned(room, ev);
        }
        // `msg.exclude` is a connection id of the origin node, which already
        // skipped it; ids are per hub, so here it would name an unrelated
        // connection that happens to have the same number.
        self.deliver_encoded(room, &msg.event, msg.payload.as_ref(), 0);
    }

    /// Queues an event whose payload is already encoded to every local
    /// member of `room` but `exclude`, without an offset.
    pub(crate) fn deliver_encoded(&self, room: &str, event: &str, payload: Option<&Payload>, exclude: u64) {
        let mut payload_fn = transcoding(payload);
        let mut encoded =
            Encoded { room: Some(room), event, offset: None, payload: &mut payload_fn, frames: Default::default() };
        if let Err(e) = self.deliver_local(room, exclude, &mut encoded) {
            tracing::warn!(room, error = %e, "dropping undeliverable event");
        }
    }

    /// Sends `event` straight to one connection of this node (an `event`
    /// envelope without `room`). Errors if it is not connected here.
    pub fn send<T: Serialize + ?Sized>(&self, id: ConnectionId, event: &str, data: &T) -> Result<()> {
        check_event(event)?;
        let session = self.inner.sessions.read().get(&id).cloned();
        let session = session.ok_or_else(|| Error::new(ErrorKind::NotConnected))?;
        let payload = Payload::encode(session.format, data)?;
        session.send_parts(&Parts { event: Some(event), data: Some(payload.bytes()), ..Parts::new(Kind::Event) });
        Ok(())
    }

    /// Sends `event` to every connection of `user` on this node; returns how
    /// many connections it was queued to. Serializes once per format.
    pub fn send_to_user<T: Serialize + ?Sized>(&self, user: &str, event: &str, data: &T) -> Result<usize> {
        check_event(event)?;
        let sessions: Vec<Arc<Session>> = {
            let users = self.inner.users.read();
            let sessions = self.inner.sessions.read();
            users.get(user).map(|ids| ids.iter().filter_map(|i| sessions.get(i).cloned()).collect()).unwrap_or_default()
        };
        let mut payload_fn = |format: Format| Payload::encode(format, data).map(Some);
        let mut encoded =
            Encoded { room: None, event, offset: None, payload: &mut payload_fn, frames: Default::default() };
        // As in a room publish: a format that cannot encode the value skips
        // its connections, the others are served, the error is returned.
        let mut error = None;
        let mut sent = 0;
        for s in &sessions {
            match encoded.get(s.wire()) {
                Ok(bytes) => {
                    s.push_prepared(bytes);
                    sent += 1;
                }
                Err(e) => error = Some(e),
            }
        }
        match error {
            Some(e) => Err(e.into()),
            None => Ok(sent),
        }
    }

    /// Closes a connection with `code` and `reason` after what is already
    /// queued for it has been written. `false` if it is not connected here.
    pub fn disconnect(&self, id: ConnectionId, code: CloseCode, reason: &str) -> bool {
        let session = self.inner.sessions.read().get(&id).cloned();
        match session {
            Some(s) => {
                s.close(DisconnectReason::Host(code), code, reason, false);
                true
            }
            None => false,
        }
    }

    /// Whether [`Hub::shutdown`] has started.
    pub fn is_shutting_down(&self) -> bool {
        self.inner.shutting_down.load(Ordering::Acquire)
    }

    /// Resolves when shutdown starts; accept loops select on it to stop
    /// accepting.
    pub fn shutdown_started(&self) -> impl Future<Output = ()> + Send + 'static {
        self.inner.shutdown.clone().cancelled_owned()
    }

    /// Shuts down gracefully: stops accepting (new handshakes get 503),
    /// closes every connection with 1001 "going away" in batches of
    /// [`HubConfig::shutdown_batch`] after its queue drains, and waits until
    /// all are gone or `deadline` passes, when the rest are dropped. Resolves
    /// when no connection is left.
    pub async fn shutdown(&self, deadline: Duration) {
        self.inner.shutting_down.store(true, Ordering::Release);
        self.inner.shutdown.cancel();
        let sessions: Vec<Arc<Session>> = self.inner.sessions.read().values().cloned().collect();
        for batch in sessions.chunks(self.inner.config.shutdown_batch.max(1)) {
            for s in batch {
                s.close(DisconnectReason::ServerShutdown, CloseCode::GOING_AWAY, "server shutting down", false);
            }
            tokio::task::yield_now().await;
        }
        if tokio::time::timeout(deadline, self.wait_empty()).await.is_err() {
            let rest: Vec<Arc<Session>> = self.inner.sessions.read().values().cloned().collect();
            for s in rest {
                s.kill();
            }
            self.wait_empty().await;
        }
        if let Some(ext) = &self.inner.extension {
            ext.flush(self).await;
        }
    }

    async fn wait_empty(&self) {
        loop {
            let changed = self.inner.sessions_changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.inner.sessions.read().is_empty() {
                return;
            }
            changed.await;
        }
    }
}
