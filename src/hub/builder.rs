//! [`HubBuilder`]: collects the configuration, handlers, hooks, backplane
//! and history of a hub, and builds it.

use super::*;

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
    ///
    /// **Order.** With an `on_join` or `on_leave` hook set, `on_join` and
    /// `on_leave` are strictly paired per connection and room: `on_leave`
    /// runs once for each `on_join`, after it has returned, and never for
    /// a join that did not stand (refused, cancelled, or taken out — by
    /// [`Hub::close_room`](crate::Hub::close_room) or the client's own
    /// `leave` — before it completed; that join is answered `403`). A
    /// connection's hooks (`on_connect`, `on_join`, `on_leave`,
    /// `on_disconnect`) never run at the same time as each other, and run
    /// in the order of the changes they report, `on_disconnect` last. A
    /// hook may change memberships itself (call [`Hub::leave`](crate::Hub::leave)
    /// in `on_join`): the hook that change causes runs after the current
    /// one returns, on the same thread. The price of the order: a hook may
    /// run on the thread of another change of the same connection (the one
    /// that found a hook of it already running), just after that change's
    /// own hook, so a `join` may be answered just before its `on_join` ran.
    pub fn on_join(mut self, f: impl Fn(&Connection, &str) + Send + Sync + 'static) -> Self {
        self.hooks.join = Some(Arc::new(f));
        self
    }

    /// Called after a connection left a room (by request, by
    /// [`Hub::close_room`](crate::Hub::close_room), or by disconnecting),
    /// once for each `on_join` and after it: see [`on_join`](Self::on_join)
    /// for the order.
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
        let queue_bytes = self.config.outbound_queue_bytes;
        let overflow = self.config.overflow;
        let backplane_timeout = self.config.backplane_timeout;
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
                rooms: Rooms::new((queue_bytes, overflow)),
                sessions: RwLock::default(),
                users: RwLock::default(),
                next_id: AtomicU64::new(1),
                tasks: AtomicUsize::new(0),
                heartbeat: OnceLock::new(),
                extension: self.extension.and_then(|e| e.build(node, has_backplane, queue_bytes)),
                backplane: self.backplane.map(|b| {
                    let bounded = crate::backplane::Bounded::new(b, backplane_timeout);
                    Arc::new(BackplaneLink::new(Arc::new(bounded)))
                }),
                history: self.history.map(|(store, config)| HistoryLink {
                    store: Arc::new(crate::history::Bounded::new(store, config.store_timeout)),
                    config,
                    checker: OnceLock::new(),
                }),
                shutting_down: AtomicBool::new(false),
                draining: Default::default(),
                shutdown: CancellationToken::new(),
                sessions_changed: Notify::new(),
            }),
        }
    }
}
