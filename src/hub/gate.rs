//! The admission gate: every transport's way in. [`Hub::admit`] (limits,
//! origin, rate), [`Hub::authenticate`], both in one place for the
//! servers (`open_gate`), and the entry points that run a session.

use super::*;

impl Hub {
    /// Decides whether an upgrade request may proceed, before the
    /// authenticator and the upgrade: shutdown (503), a drain (503 with
    /// `retry-after`, [`Hub::drain`]), the client's address (from the
    /// peer, or from a trusted proxy's forwarded-for header; a malformed one
    /// is 400), the `Origin` check (403), the connection limit
    /// (503), the per-address limit (429) and the connection rate (429 with
    /// `retry-after`). Both the standalone listener and the axum route call
    /// it; a host's own transport should too.
    ///
    /// On success the handshake's [`Handshake::client_ip`] is set, and the
    /// returned [`Admission`] holds the connection's slots until dropped:
    /// keep it alive as long as the connection.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Refused`] (or [`ErrorKind::ShuttingDown`] during
    /// shutdown); [`Error::rejection`] is the HTTP answer to send.
    pub fn admit(&self, handshake: &mut Handshake) -> Result<Admission> {
        self.gate_admit(handshake).map_err(|r| self.refused(r))
    }

    /// A refused handshake as the host-facing error: `ShuttingDown` once
    /// shutdown has started (the flag never goes back), else `Refused`.
    fn refused(&self, rejection: Rejection) -> Error {
        let kind = if self.is_shutting_down() { ErrorKind::ShuttingDown } else { ErrorKind::Refused };
        Error::with_source(kind, rejection)
    }

    fn gate_admit(&self, handshake: &mut Handshake) -> std::result::Result<Admission, Rejection> {
        if self.is_shutting_down() {
            crate::metrics::refused(crate::metrics::Refusal::Shutdown);
            return Err(Rejection::new(http::StatusCode::SERVICE_UNAVAILABLE, "server is shutting down"));
        }
        if let Some(refusal) = self.drain_refusal() {
            return Err(refusal);
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
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Refused`] with the authenticator's answer (or
    /// [`ErrorKind::ShuttingDown`] during shutdown); [`Error::rejection`] is
    /// the HTTP answer to send.
    pub fn authenticate(&self, handshake: &Handshake) -> BoxFuture<'static, Result<Identity>> {
        let hub = self.clone();
        let fut = self.gate_authenticate(handshake);
        Box::pin(async move { fut.await.map_err(|r| hub.refused(r)) })
    }

    fn gate_authenticate(&self, handshake: &Handshake) -> BoxFuture<'static, std::result::Result<Identity, Rejection>> {
        if self.is_shutting_down() {
            return Box::pin(async {
                Err(Rejection::new(http::StatusCode::SERVICE_UNAVAILABLE, "server is shutting down"))
            });
        }
        if let Some(refusal) = self.drain_refusal() {
            return Box::pin(async { Err(refusal) });
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
    ///
    /// A browser (a request with `Origin`) cannot read the status of a
    /// refused upgrade, so two refusals are marked to be said after the
    /// upgrade instead, as a close the page can see (protocol §7.3): a shed
    /// with a retry hint (the connection limit or rate) as **1013** with
    /// `retry_after_ms=<n>` in the reason, and the authenticator's 401 or
    /// 403 as **4501** (the origin check's 403 stays an HTTP answer).
    #[cfg_attr(not(any(feature = "ws", feature = "sse")), allow(dead_code))] // only the built-in servers open the gate
    pub(crate) async fn open_gate(
        &self,
        handshake: &mut Handshake,
        timeout: Duration,
    ) -> std::result::Result<(Admission, Identity), Rejection> {
        let browser = handshake.headers().contains_key(http::header::ORIGIN);
        let admission = match self.gate_admit(handshake) {
            Ok(a) => a,
            Err(rejection) => {
                return Err(match rejection.retry_after() {
                    Some(after) if browser => {
                        rejection.close_after_upgrade(CloseCode::TRY_AGAIN_LATER, &CloseCode::retry_reason(after))
                    }
                    _ => rejection,
                })
            }
        };
        match tokio::time::timeout(timeout, self.gate_authenticate(handshake)).await {
            Ok(Ok(identity)) => Ok((admission, identity)),
            Ok(Err(rejection)) => {
                let rejection = crate::metrics::refusing(crate::metrics::Refusal::Auth, rejection);
                if browser && matches!(rejection.status().as_u16(), 401 | 403) {
                    let reason = rejection.message().to_owned();
                    return Err(rejection.close_after_upgrade(CloseCode::UNAUTHORIZED, &reason));
                }
                Err(rejection)
            }
            Err(_) => Err(crate::metrics::refusing(
                crate::metrics::Refusal::AuthTimeout,
                Rejection::new(http::StatusCode::SERVICE_UNAVAILABLE, "authentication timed out"),
            )),
        }
    }

    /// Authenticates and then serves a connection of any [`Transport`] until
    /// it ends. For transports that have no HTTP step to reject at; a
    /// rejected handshake is returned as `Err` (as from
    /// [`Hub::authenticate`]) and the transport dropped.
    pub async fn connect<T: Transport>(&self, transport: T, handshake: Handshake) -> Result<()> {
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
        self.serve_session(transport, handshake, identity, None)
    }

    /// [`Hub::serve`] for an event stream (SSE) whose session joins
    /// `stream`'s rooms itself and gives its events the stream's ids.
    #[cfg(feature = "sse")]
    pub(crate) fn serve_stream<T: Transport>(
        &self,
        transport: T,
        handshake: &Handshake,
        identity: Identity,
        stream: super::session::sse_stream::StreamSpec,
    ) -> impl Future<Output = ()> + Send + 'static {
        self.serve_session(transport, handshake, identity, Some(stream))
    }

    fn serve_session<T: Transport>(
        &self,
        transport: T,
        handshake: &Handshake,
        identity: Identity,
        stream: Option<super::session::sse_stream::StreamSpec>,
    ) -> impl Future<Output = ()> + Send + 'static {
        let id = ConnectionId(self.inner.next_id.fetch_add(1, Ordering::Relaxed));
        let mut transport = transport;
        let caps = transport.capabilities();
        if let Some(framing) = caps.framing {
            transport.use_framing(framing);
        }
        let compress = transport.compress_above().filter(|_| caps.framing.is_some());
        let origin = admin::Origin::new(transport.name(), handshake);
        // `docs/operations.md`, "Tracing": everything the connection logs,
        // its calls included, is inside this span.
        let span = tracing::info_span!(
            "connection",
            id = id.0,
            user = identity.user_id(),
            transport = transport.name(),
            peer = handshake.peer_addr().map(tracing::field::display),
        );
        let session =
            Session::new(id, (handshake.format(), handshake.version()), identity, (caps, compress), origin, self);
        let session = Arc::new(session.with_stream(stream));
        self.register(&session);
        if self.is_shutting_down() {
            session.close(DisconnectReason::ServerShutdown, CloseCode::GOING_AWAY, "server shutting down", true);
        }
        InSpan::new(session::run(self.clone(), session, transport), span)
    }
}

/// A future run inside a span, as `tracing::Instrument` does it, but
/// holding the span only when something listens to it: a disabled span is
/// dropped and an enabled one is boxed, so the connection's task carries
/// one word for it instead of a 40-byte `Span` (issue 16's idle memory).
/// Dropping a disabled span loses nothing it would have recorded, except
/// `tracing`'s `log` fallback of span enter and exit lines (TRACE, target
/// `tracing::span::active`), which no dispatcher receives anyway.
#[pin_project::pin_project(PinnedDrop)]
pub(crate) struct InSpan<F> {
    span: Option<Box<tracing::Span>>,
    /// `None` only while dropping (in the span, as `Instrumented` does).
    #[pin]
    future: Option<F>,
}

impl<F> InSpan<F> {
    fn new(future: F, span: tracing::Span) -> InSpan<F> {
        let span = (!span.is_disabled()).then(|| Box::new(span));
        InSpan { span, future: Some(future) }
    }
}

impl<F: Future> Future for InSpan<F> {
    type Output = F::Output;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<F::Output> {
        let this = self.project();
        let _entered = this.span.as_deref().map(tracing::Span::enter);
        match this.future.as_pin_mut() {
            Some(future) => future.poll(cx),
            None => unreachable!("polled after drop"),
        }
    }
}

#[pin_project::pinned_drop]
impl<F> PinnedDrop for InSpan<F> {
    fn drop(self: std::pin::Pin<&mut Self>) {
        let mut this = self.project();
        let _entered = this.span.as_deref().map(tracing::Span::enter);
        this.future.set(None);
    }
}
