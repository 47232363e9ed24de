//! A safe-by-default HTTP/1 server for an axum [`Router`]: what
//! `axum::serve` leaves open (it runs hyper without a timer, so request heads
//! and bodies never time out, and it counts nothing before a head arrives).
//! With the `tls` feature it serves HTTPS and WSS too ([`ServeConfig::tls`]).
//!
//! The limits are described on [`serve`].

use crate::security::{ip_key, IpNet, SecurityConfig};
use axum::extract::ConnectInfo;
use axum::Router;
use futures::FutureExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioIo, TokioTimer};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::future::{Future, IntoFuture};
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};

/// Limits of [`serve`]. Every default is safe on the open internet.
///
/// ```
/// use std::time::Duration;
/// use switchboard::integration::axum::ServeConfig;
/// let config = ServeConfig::default().header_read_timeout(Duration::from_secs(5)).max_connections(2_000);
/// assert_eq!(config.max_connections_per_ip, 128);
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ServeConfig {
    /// Time for a client to send a whole request head, counted from the
    /// connection's accept (or the end of its previous request). Also how
    /// long an idle keep-alive connection is kept. Default 10 s.
    pub header_read_timeout: Duration,
    /// Most bytes of a request head (request line and headers), and the
    /// size of hyper's read buffer (at least 8 KiB, hyper's minimum).
    /// Bigger heads get `431`. Default 8 KiB.
    pub max_head_size: usize,
    /// Most headers in a request head; more get `431`. Default 64.
    pub max_headers: usize,
    /// Time for a request body to arrive completely after its head (an SSE
    /// `POST`, a form); reading it fails after that, and the connection is
    /// closed. Default 10 s.
    pub body_timeout: Duration,
    /// Most sockets open at once, counted at accept (before the head) until
    /// the socket closes, WebSocket connections included; more are answered
    /// `503` and closed. Default 10,000. Keep it below the process's file
    /// descriptor limit (`ulimit -n`).
    pub max_connections: usize,
    /// Most sockets open at once from one client address (IPv6: one /64);
    /// more are answered `429` and closed. The peer is the TCP peer: behind
    /// a reverse proxy, list the proxy in `per_ip_exempt`. Default 128:
    /// twice the hub's per-address WebSocket limit, leaving room for the
    /// page loads of a household or office next to its sockets.
    pub max_connections_per_ip: usize,
    /// Addresses the per-address limit does not apply to. Default loopback,
    /// as [`SecurityConfig::per_ip_exempt`], for the same reason (a local
    /// reverse proxy).
    pub per_ip_exempt: Vec<IpNet>,
    /// Serve HTTPS (and so WSS) with this rustls configuration (feature
    /// `tls`). The TLS handshake must complete within
    /// [`ServeConfig::header_read_timeout`] of the accept, or the socket is
    /// closed. Default `None`: plain HTTP.
    #[cfg(feature = "tls")]
    #[cfg_attr(docsrs, doc(cfg(feature = "tls")))]
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            header_read_timeout: Duration::from_secs(10),
            max_head_size: 8 * 1024,
            max_headers: 64,
            body_timeout: Duration::from_secs(10),
            max_connections: 10_000,
            max_connections_per_ip: 128,
            per_ip_exempt: SecurityConfig::default().per_ip_exempt,
            #[cfg(feature = "tls")]
            tls: None,
        }
    }
}

impl ServeConfig {
    /// Sets [`ServeConfig::header_read_timeout`].
    pub fn header_read_timeout(mut self, timeout: Duration) -> Self {
        self.header_read_timeout = timeout;
        self
    }

    /// Sets [`ServeConfig::max_head_size`].
    pub fn max_head_size(mut self, bytes: usize) -> Self {
        self.max_head_size = bytes;
        self
    }

    /// Sets [`ServeConfig::max_headers`].
    pub fn max_headers(mut self, n: usize) -> Self {
        self.max_headers = n;
        self
    }

    /// Sets [`ServeConfig::body_timeout`].
    pub fn body_timeout(mut self, timeout: Duration) -> Self {
        self.body_timeout = timeout;
        self
    }

    /// Sets [`ServeConfig::max_connections`].
    pub fn max_connections(mut self, n: usize) -> Self {
        self.max_connections = n;
        self
    }

    /// Sets [`ServeConfig::max_connections_per_ip`].
    pub fn max_connections_per_ip(mut self, n: usize) -> Self {
        self.max_connections_per_ip = n;
        self
    }

    /// Sets [`ServeConfig::per_ip_exempt`].
    pub fn per_ip_exempt(mut self, exempt: Vec<IpNet>) -> Self {
        self.per_ip_exempt = exempt;
        self
    }

    /// Sets [`ServeConfig::tls`].
    #[cfg(feature = "tls")]
    #[cfg_attr(docsrs, doc(cfg(feature = "tls")))]
    pub fn tls(mut self, config: Arc<rustls::ServerConfig>) -> Self {
        self.tls = Some(config);
        self
    }
}

/// Serves `router` on `listener` with the limits of `config`.
///
/// Per connection, from accept to close:
///
/// 1. **Counted at accept**, before a byte is read: at most
///    [`ServeConfig::max_connections`] sockets in total and
///    [`ServeConfig::max_connections_per_ip`] per client address (IPv6 per
///    /64). Over a limit, the socket gets a ready-made `503` or `429`
///    response and is closed at once (no task, no buffer). The slot is held
///    by the socket itself, so a connection upgraded to a WebSocket keeps it
///    until the socket closes.
/// 2. **The head**: hyper with a timer, so the whole head must arrive within
///    [`ServeConfig::header_read_timeout`] (also the longest a keep-alive
///    connection waits idle for its next request), at most
///    [`ServeConfig::max_head_size`] bytes and
///    [`ServeConfig::max_headers`] headers (`431` otherwise). hyper's read
///    buffer is capped at the head size too, instead of its ~400 KiB default.
/// 3. **The body**: every request body must be complete within
///    [`ServeConfig::body_timeout`] of its head; after that, reading it fails
///    (an SSE `POST` gets its error answer) and the connection is closed.
///
/// When the process runs out of file descriptors, `accept` fails with
/// `EMFILE`: the server then releases one descriptor it keeps in reserve,
/// accepts the waiting connection, answers `503` and closes it, and takes
/// the reserve again, so clients are refused cleanly instead of waiting in
/// the backlog until they time out.
///
/// Handlers see the peer as `ConnectInfo<SocketAddr>`, as with
/// `into_make_service_with_connect_info::<SocketAddr>()`, so the hub's
/// per-address limits work. Await it: it runs until the graceful shutdown
/// signal given to [`Serve::with_graceful_shutdown`] completes (without
/// one, forever; accept errors are logged and skipped).
///
/// ```no_run
/// use axum::{routing::get, Router};
/// use switchboard::integration::axum::{route, serve, ServeConfig};
/// use switchboard::Hub;
///
/// # async fn run() -> std::io::Result<()> {
/// let hub = Hub::builder().build();
/// let app = Router::new().route("/", get(|| async { "hello" })).route("/ws", route(hub.clone()));
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
/// serve(listener, app, ServeConfig::default())
///     .with_graceful_shutdown(async move { hub.shutdown(std::time::Duration::from_secs(5)).await })
///     .await
/// # }
/// ```
pub fn serve(listener: TcpListener, router: Router, config: ServeConfig) -> Serve {
    Serve { listener, router, config, signal: None }
}

/// The server [`serve`] returns; await it.
#[must_use = "a server does nothing until awaited"]
pub struct Serve {
    listener: TcpListener,
    router: Router,
    config: ServeConfig,
    signal: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
}

impl std::fmt::Debug for Serve {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Serve").field("listener", &self.listener).field("config", &self.config).finish_non_exhaustive()
    }
}

impl Serve {
    /// Stops accepting when `signal` completes, asks every connection to
    /// finish its current request, and completes when they have closed.
    /// (WebSocket connections already handed to the hub are the hub's: stop
    /// them with `Hub::shutdown`, typically inside `signal`.)
    pub fn with_graceful_shutdown<F>(mut self, signal: F) -> Serve
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.signal = Some(Box::pin(signal));
        self
    }
}

impl IntoFuture for Serve {
    type Output = io::Result<()>;
    type IntoFuture = Pin<Box<dyn Future<Output = io::Result<()>> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(run(self))
    }
}

/// Open sockets, in total and per address.
#[derive(Debug, Default)]
struct Counts {
    // Locked for one map operation per accept and per close; nothing awaits
    // under it.
    state: Mutex<CountState>,
}

#[derive(Debug, Default)]
struct CountState {
    total: usize,
    per_ip: HashMap<IpAddr, usize>,
}

/// One socket's place in [`Counts`], given back on drop.
#[derive(Debug)]
struct Slot {
    counts: Arc<Counts>,
    /// The address counted (`None`: exempt).
    ip: Option<IpAddr>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut st = self.counts.state.lock();
        st.total -= 1;
        if let Some(ip) = self.ip {
            if let Some(n) = st.per_ip.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    st.per_ip.remove(&ip);
                }
            }
        }
    }
}

/// Why a connection was refused at accept.
#[derive(Debug, Clone, Copy)]
enum Full {
    Total,
    Address,
}

impl Full {
    /// The whole response, written in one non-blocking write.
    fn response(self) -> &'static [u8] {
        match self {
            Full::Total => {
                b"HTTP/1.1 503 Service Unavailable\r\nretry-after: 1\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: 12\r\nconnection: close\r\n\r\nserver busy\n"
            }
            Full::Address => {
                b"HTTP/1.1 429 Too Many Requests\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: 38\r\nconnection: close\r\n\r\ntoo many connections from this address"
            }
        }
    }
}

impl Counts {
    fn admit(self: &Arc<Self>, peer: IpAddr, config: &ServeConfig) -> Result<Slot, Full> {
        let mut st = self.state.lock();
        if st.total >= config.max_connections {
            return Err(Full::Total);
        }
        let ip = (!config.per_ip_exempt.iter().any(|n| n.contains(peer))).then(|| ip_key(peer));
        if let Some(ip) = ip {
            let n = st.per_ip.entry(ip).or_insert(0);
            if *n >= config.max_connections_per_ip {
                return Err(Full::Address);
            }
            *n += 1;
        }
        st.total += 1;
        Ok(Slot { counts: self.clone(), ip })
    }
}

/// Answers a refused socket without reading it and closes it. The response
/// fits any fresh socket's send buffer; if even that fails, the close alone
/// tells the client.
fn refuse(stream: TcpStream, full: Full) {
    let _ = stream.try_write(full.response());
    drop(stream);
}

/// A descriptor kept open so that, when the process has no other left, one
/// can be freed to accept (and refuse) a waiting connection.
fn reserve_descriptor() -> Option<std::fs::File> {
    #[cfg(unix)]
    {
        std::fs::File::open("/dev/null").ok()
    }
    #[cfg(not(unix))]
    {
        None
    }
}

fn out_of_descriptors(e: &io::Error) -> bool {
    // EMFILE (24) and ENFILE (23) on Linux and the BSDs.
    cfg!(unix) && matches!(e.raw_os_error(), Some(23 | 24))
}

async fn run(serve: Serve) -> io::Result<()> {
    let Serve { listener, router, config, signal } = serve;
    let config = Arc::new(config);
    let counts = Arc::new(Counts::default());
    let mut signal = signal.unwrap_or_else(|| Box::pin(std::future::pending()));
    // `stop` tells connections to finish; `done` counts them: every
    // connection task holds a receiver, and shutdown waits for the last.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let (done_tx, done_rx) = tokio::sync::watch::channel(());
    #[cfg(feature = "tls")]
    let tls = config.tls.clone().map(tokio_rustls::TlsAcceptor::from);
    let mut reserve = reserve_descriptor();
    // Out of descriptors since the last successful accept (warned once).
    let mut exhausted = false;
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut signal => break,
        };
        let (stream, peer) = match accepted {
            Ok(pair) => pair,
            Err(e) if out_of_descriptors(&e) => {
                // Free the reserve, take a waiting connection if there is
                // one, refuse it, and take the reserve back. Linux reports
                // EMFILE before it looks at the queue, so there may be none:
                // then pause instead of spinning on accept.
                if !exhausted {
                    tracing::warn!("out of file descriptors: refusing new connections");
                    exhausted = true;
                }
                drop(reserve.take());
                let refused = match listener.accept().now_or_never() {
                    Some(Ok((stream, _))) => {
                        refuse(stream, Full::Total);
                        true
                    }
                    _ => false,
                };
                reserve = reserve_descriptor();
                if !refused {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                continue;
            }
            Err(e) => {
                // Per-connection errors (a reset before accept) are not the
                // listener's: go on.
                tracing::debug!(error = %e, "accept failed");
                continue;
            }
        };
        exhausted = false;
        let slot = match counts.admit(peer.ip(), &config) {
            Ok(slot) => slot,
            Err(full) => {
                refuse(stream, full);
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let (router, config, stop, done) = (router.clone(), config.clone(), stop_rx.clone(), done_rx.clone());
        #[cfg(feature = "tls")]
        let tls = tls.clone();
        tokio::spawn(async move {
            let _done = done;
            #[cfg(feature = "tls")]
            if let Some(acceptor) = tls {
                // The handshake is bounded like a request head: a client
                // that connects and says nothing holds its slot no longer.
                match tokio::time::timeout(config.header_read_timeout, acceptor.accept(stream)).await {
                    Ok(Ok(stream)) => serve_connection(stream, slot, peer, router, &config, stop).await,
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                }
                return;
            }
            serve_connection(stream, slot, peer, router, &config, stop).await;
        });
    }
    drop(listener);
    let _ = stop_tx.send(true);
    drop(done_rx);
    done_tx.closed().await;
    Ok(())
}

/// Serves HTTP on one accepted (and maybe TLS-wrapped) socket until it
/// closes or `stop` asks it to finish.
async fn serve_connection<S>(
    stream: S,
    slot: Slot,
    peer: std::net::SocketAddr,
    router: Router,
    config: &ServeConfig,
    mut stop: tokio::sync::watch::Receiver<bool>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let io = Counted { io: TokioIo::new(stream), _slot: slot };
    let body_timeout = config.body_timeout;
    let service = hyper::service::service_fn(move |req: http::Request<Incoming>| {
        let mut req = req.map(|body| axum::body::Body::new(Timed::new(body, body_timeout)));
        req.extensions_mut().insert(ConnectInfo(peer));
        let mut router = router.clone();
        async move { tower_service::Service::call(&mut router, req).await }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(config.header_read_timeout)
        .max_buf_size(config.max_head_size.max(8192))
        .max_header_size(config.max_head_size)
        .max_headers(config.max_headers);
    let conn = builder.serve_connection(io, service).with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        result = conn.as_mut() => {
            if let Err(e) = result {
                tracing::debug!(error = %e, "http connection ended with an error");
            }
        }
        // (The `Ref` `wait_for` returns is not `Send`: not kept.)
        () = async { drop(stop.wait_for(|stop| *stop).await) } => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

/// A socket that holds its [`Slot`]: the count drops when the socket is
/// closed, also after hyper handed it over as an upgraded WebSocket.
#[pin_project::pin_project]
struct Counted<S> {
    #[pin]
    io: TokioIo<S>,
    _slot: Slot,
}

impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite> hyper::rt::Read for Counted<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        self.project().io.poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite> hyper::rt::Write for Counted<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.project().io.poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().io.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().io.poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.project().io.poll_write_vectored(cx, bufs)
    }
}

/// A request body that fails when it is not complete by its deadline. The
/// timer is only registered if the body is ever waited for (most requests
/// have none, or all of it arrived with the head).
#[pin_project::pin_project]
struct Timed {
    #[pin]
    body: Incoming,
    deadline: tokio::time::Instant,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Timed {
    fn new(body: Incoming, timeout: Duration) -> Timed {
        Timed { body, deadline: tokio::time::Instant::now() + timeout, sleep: None }
    }
}

/// The error a [`Timed`] body fails with.
#[derive(Debug, thiserror::Error)]
#[error("request body timed out")]
struct BodyTimedOut;

impl Body for Timed {
    type Data = bytes::Bytes;
    type Error = axum::BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        if let Poll::Ready(frame) = this.body.poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        let deadline = *this.deadline;
        let sleep = this.sleep.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(BodyTimedOut.into()))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
