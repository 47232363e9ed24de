//! A connection's and the hub's life: the `hello` a session starts with,
//! forced disconnects and shutdown (the hooks are in `hooks.rs`).

use super::*;

impl Hub {
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
            version: session.version.number(),
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

    /// Closes a connection with `code` and `reason` after what is already
    /// queued for it has been written. `false` if it is not connected here
    /// or a close was already decided for it (which keeps its first code).
    pub fn disconnect(&self, id: ConnectionId, code: CloseCode, reason: &str) -> bool {
        let session = self.inner.sessions.read().get(&id).cloned();
        session.is_some_and(|s| s.close_by_host(code, reason))
    }

    /// Whether [`Hub::shutdown`] has started.
    pub fn is_shutting_down(&self) -> bool {
        self.inner.shutting_down.load(Ordering::Acquire)
    }

    /// `Err(ShuttingDown)` once [`Hub::shutdown`] has started: the host-facing
    /// calls that would start new work (publish, send) fail with it.
    pub(crate) fn taking_work(&self) -> Result<()> {
        if self.is_shutting_down() {
            return Err(Error::new(ErrorKind::ShuttingDown));
        }
        Ok(())
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

    pub(super) async fn wait_empty(&self) {
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
