//! A safe-by-default HTTP/1.1 and HTTP/2 server for an axum [`Router`]: what
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
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::convert::Infallible;
use std::future::{Future, IntoFuture};
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
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
    /// Serve HTTP/2 as well as HTTP/1.1: over TLS when the client picks
    /// `h2` in ALPN (a [`ServeConfig::tls`] configuration with no ALPN
    /// protocols is given `h2` and `http/1.1`; one that lists its own is
    /// used as it is), and in cleartext when [`ServeConfig::http2_cleartext`]
    /// allows it. Default `true`.
    pub http2: bool,
    /// Serve HTTP/2 over cleartext TCP with prior knowledge (h2c: the
    /// client starts with the HTTP/2 preface; the `Upgrade: h2c` dance is
    /// not supported). Browsers never do this; reverse proxies and load
    /// balancers that speak HTTP/2 to their backends do. Every limit here
    /// applies to it exactly as over TLS, so it is on by default; only with
    /// [`ServeConfig::http2`] on.
    pub http2_cleartext: bool,
    /// Most streams (requests in flight, an SSE stream or a WebSocket over
    /// HTTP/2 included) one HTTP/2 connection carries at once
    /// (`SETTINGS_MAX_CONCURRENT_STREAMS`); a client opening more gets
    /// them refused with `REFUSED_STREAM`. Sessions (SSE streams,
    /// WebSockets) are also counted by the hub's per-address limit,
    /// however many connections carry them. Default 100, the least
    /// RFC 9113 recommends.
    pub max_concurrent_streams: u32,
    /// How often an HTTP/2 connection is pinged; a ping not answered
    /// within the same time closes the connection (a vanished peer). `None`
    /// turns pings off. Default 20 s.
    pub http2_keep_alive: Option<Duration>,
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
            http2: true,
            http2_cleartext: true,
            max_concurrent_streams: 100,
            http2_keep_alive: Some(Duration::from_secs(20)),
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

    /// Sets [`ServeConfig::http2`].
    pub fn http2(mut self, on: bool) -> Self {
        self.http2 = on;
        self
    }

    /// Sets [`ServeConfig::http2_cleartext`].
    pub fn http2_cleartext(mut self, on: bool) -> Self {
        self.http2_cleartext = on;
        self
    }

    /// Sets [`ServeConfig::max_concurrent_streams`].
    pub fn max_concurrent_streams(mut self, n: u32) -> Self {
        self.max_concurrent_streams = n;
        self
    }

    /// Sets [`ServeConfig::http2_keep_alive`].
    pub fn http2_keep_alive(mut self, interval: Option<Duration>) -> Self {
        self.http2_keep_alive = interval;
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
/// 4. **HTTP/2** ([`ServeConfig::http2`]): chosen by ALPN over TLS, and in
///    cleartext when the first bytes are the HTTP/2 preface
///    ([`ServeConfig::http2_cleartext`]; they must arrive within the head
///    timeout like a head). The same limits hold: a connection with no
///    request in flight for [`ServeConfig::header_read_timeout`] is closed
///    (checked in whole periods, so between one and two of them), a header
///    list is at most [`ServeConfig::max_head_size`] bytes (as HTTP/2
///    counts it: names, values and 32 bytes per field) and
///    [`ServeConfig::max_headers`] fields (`431`), bodies time out alike.
///    One connection carries at most [`ServeConfig::max_concurrent_streams`]
///    requests at once; it counts once against the socket limits of step 1
///    however many streams it carries, while every SSE stream and
///    WebSocket on it is a session of its own for the hub's per-address and
///    total limits. Idle connections are pinged
///    ([`ServeConfig::http2_keep_alive`]). A request without `Host` gets
///    one from its `:authority`, so origin checks work as over HTTP/1.1,
///    and extended `CONNECT` (RFC 8441) is on: the WebSocket route
///    ([`route`](super::route)) serves WebSockets over HTTP/2 streams.
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
    #[cfg(feature = "tls")]
    let tls = config.tls.clone().map(|tls| tokio_rustls::TlsAcceptor::from(offer_h2(tls, config.http2)));
    let builders = Arc::new(Builders::new(&config));
    let config = Arc::new(config);
    let counts = Arc::new(Counts::default());
    let mut signal = signal.unwrap_or_else(|| Box::pin(std::future::pending()));
    // `stop` tells connections to finish; `done` counts them: every
    // connection task holds a receiver, and shutdown waits for the last.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let (done_tx, done_rx) = tokio::sync::watch::channel(());
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
        let (router, config, builders, stop, done) =
            (router.clone(), config.clone(), builders.clone(), stop_rx.clone(), done_rx.clone());
        #[cfg(feature = "tls")]
        let tls = tls.clone();
        tokio::spawn(async move {
            let _done = done;
            let conn = Conn { slot, peer, router, config: &config, builders: &builders, stop };
            #[cfg(feature = "tls")]
            if let Some(acceptor) = tls {
                // The handshake is bounded like a request head: a client
                // that connects and says nothing holds its slot no longer.
                match tokio::time::timeout(config.header_read_timeout, acceptor.accept(stream)).await {
                    Ok(Ok(stream)) => {
                        let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
                        conn.serve(stream, if h2 && config.http2 { Proto::Http2 } else { Proto::Http1 }).await;
                    }
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                }
                return;
            }
            let proto = if config.http2 && config.http2_cleartext { Proto::Sniff } else { Proto::Http1 };
            conn.serve(stream, proto).await;
        });
    }
    drop(listener);
    let _ = stop_tx.send(true);
    drop(done_rx);
    done_tx.closed().await;
    Ok(())
}

/// `tls` with `h2` and `http/1.1` offered in ALPN when it offers nothing
/// and HTTP/2 is on; as it is otherwise.
#[cfg(feature = "tls")]
fn offer_h2(tls: Arc<rustls::ServerConfig>, http2: bool) -> Arc<rustls::ServerConfig> {
    if !http2 || !tls.alpn_protocols.is_empty() {
        return tls;
    }
    let mut tls = (*tls).clone();
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Arc::new(tls)
}

/// hyper's connection builders, made once per server.
struct Builders {
    http1: hyper::server::conn::http1::Builder,
    http2: hyper::server::conn::http2::Builder<TokioExecutor>,
}

impl Builders {
    fn new(config: &ServeConfig) -> Builders {
        let mut http1 = hyper::server::conn::http1::Builder::new();
        http1
            .timer(TokioTimer::new())
            .header_read_timeout(config.header_read_timeout)
            .max_buf_size(config.max_head_size.max(8192))
            .max_header_size(config.max_head_size)
            .max_headers(config.max_headers);
        // HTTP/2 has no head timeout of its own: `Activity` closes a
        // connection with no request in flight for `header_read_timeout`,
        // and the header count is checked per request (`too_many_headers`).
        let mut http2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        http2
            .timer(TokioTimer::new())
            .max_header_list_size(u32::try_from(config.max_head_size).unwrap_or(u32::MAX))
            .max_concurrent_streams(config.max_concurrent_streams)
            .enable_connect_protocol();
        if let Some(interval) = config.http2_keep_alive {
            http2.keep_alive_interval(interval).keep_alive_timeout(interval);
        }
        Builders { http1, http2 }
    }
}

/// Which HTTP a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Proto {
    Http1,
    Http2,
    /// HTTP/2 if the first bytes are its preface (h2c with prior
    /// knowledge), HTTP/1.1 otherwise.
    Sniff,
}

/// The HTTP/2 connection preface (RFC 9113 §3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Reads until the bytes are not (or are all of) the HTTP/2 preface:
/// whether they are, and the bytes read.
async fn sniff<S: tokio::io::AsyncRead + Unpin>(stream: &mut S) -> io::Result<(bool, bytes::Bytes)> {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; PREFACE.len()];
    let mut n = 0;
    while n < buf.len() {
        let got = stream.read(&mut buf[n..]).await?;
        n += got;
        if got == 0 || buf[..n] != PREFACE[..n] {
            return Ok((false, bytes::Bytes::copy_from_slice(&buf[..n])));
        }
    }
    Ok((true, bytes::Bytes::copy_from_slice(&buf)))
}

/// One accepted connection, before its protocol is known.
struct Conn<'a> {
    slot: Slot,
    peer: std::net::SocketAddr,
    router: Router,
    config: &'a ServeConfig,
    builders: &'a Builders,
    stop: tokio::sync::watch::Receiver<bool>,
}

impl Conn<'_> {
    /// Serves HTTP on the accepted (and maybe TLS-wrapped) socket until it
    /// closes, `stop` asks it to finish, or it has been idle (no request in
    /// flight) for [`ServeConfig::header_read_timeout`].
    async fn serve<S>(self, mut stream: S, proto: Proto)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
    {
        let Conn { slot, peer, router, config, builders, stop } = self;
        let (proto, prefix) = match proto {
            Proto::Sniff => match tokio::time::timeout(config.header_read_timeout, sniff(&mut stream)).await {
                Ok(Ok((true, prefix))) => (Proto::Http2, prefix),
                Ok(Ok((false, prefix))) => (Proto::Http1, prefix),
                Ok(Err(e)) => return tracing::debug!(%peer, error = %e, "reading the first bytes failed"),
                Err(_) => return tracing::debug!(%peer, "no request within the head timeout"),
            },
            proto => (proto, bytes::Bytes::new()),
        };
        let io = Counted { io: TokioIo::new(stream), prefix, _slot: slot };
        let activity = Arc::new(Activity::default());
        let (body_timeout, max_headers) = (config.body_timeout, config.max_headers);
        let service_activity = activity.clone();
        let service = hyper::service::service_fn(move |req: http::Request<Incoming>| {
            let open = Open(Arc::new(service_activity.begin()));
            let mut req = req.map(|body| axum::body::Body::new(Timed::new(body, body_timeout)));
            let mut router = router.clone();
            async move {
                if req.headers().len() > max_headers {
                    return Ok::<_, Infallible>(too_many_headers().map(|body| Tracked { body, _open: open }));
                }
                authority_as_host(&mut req);
                req.extensions_mut().insert(ConnectInfo(peer));
                req.extensions_mut().insert(open.clone());
                let res = tower_service::Service::call(&mut router, req).await?;
                Ok(res.map(|body| Tracked { body, _open: open }))
            }
        });
        let idle = activity.idle(config.header_read_timeout);
        if proto == Proto::Http2 {
            let conn = builders.http2.serve_connection(io, service);
            drive(conn, |c| c.graceful_shutdown(), idle, stop).await;
        } else {
            let conn = builders.http1.serve_connection(io, service).with_upgrades();
            drive(conn, |c| c.graceful_shutdown(), idle, stop).await;
        }
    }
}

/// Polls a connection to its end; asks it to finish gracefully when `stop`
/// says so or when `idle` completes.
async fn drive<C, E>(
    conn: C,
    graceful: impl FnOnce(Pin<&mut C>),
    idle: impl Future<Output = ()>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) where
    C: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    tokio::pin!(conn);
    tokio::select! {
        result = conn.as_mut() => {
            if let Err(e) = result {
                tracing::debug!(error = %e, "http connection ended with an error");
            }
            return;
        }
        // (The `Ref` `wait_for` returns is not `Send`: not kept.)
        () = async { drop(stop.wait_for(|stop| *stop).await) } => {}
        () = idle => {}
    }
    graceful(conn.as_mut());
    if let Err(e) = conn.await {
        tracing::debug!(error = %e, "http connection ended with an error");
    }
}

/// An HTTP/2 request names its host in `:authority` (the URI) and usually
/// sends no `Host`; the origin checks of the WebSocket and SSE endpoints
/// (and most handlers) read `Host`, so it is filled in from the authority,
/// as RFC 9113 §8.3.1 says a translation to HTTP/1.1 does.
fn authority_as_host<B>(req: &mut http::Request<B>) {
    if req.headers().contains_key(http::header::HOST) {
        return;
    }
    if let Some(host) = req.uri().authority().and_then(|a| http::HeaderValue::from_str(a.as_str()).ok()) {
        req.headers_mut().insert(http::header::HOST, host);
    }
}

/// The `431` for a request with more than [`ServeConfig::max_headers`]
/// headers (hyper counts them itself over HTTP/1.1, not over HTTP/2).
fn too_many_headers() -> http::Response<axum::body::Body> {
    let mut res = http::Response::new(axum::body::Body::from("too many request headers"));
    *res.status_mut() = http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE;
    res.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("text/plain; charset=utf-8"));
    res
}

/// Requests in flight on one connection: from the request's arrival until
/// its response body is dropped (an SSE stream counts as long as it runs),
/// or until an [`Open`] kept from its extensions is (a WebSocket over
/// HTTP/2 keeps its stream's).
#[derive(Debug, Default)]
struct Activity {
    open: AtomicUsize,
    /// Bumped at every request's start and end.
    epoch: AtomicU64,
    /// Woken when the last open request ends.
    idle: tokio::sync::Notify,
}

/// One request's place in its connection's [`Activity`], given back on drop.
#[derive(Debug)]
pub(crate) struct InFlight(Arc<Activity>);

/// A request's [`InFlight`] place, shared between its response body and
/// whatever takes it from the request's extensions.
#[derive(Debug, Clone)]
pub(crate) struct Open(#[allow(dead_code)] Arc<InFlight>);

impl Activity {
    fn begin(self: &Arc<Self>) -> InFlight {
        self.open.fetch_add(1, Ordering::AcqRel);
        self.epoch.fetch_add(1, Ordering::AcqRel);
        InFlight(self.clone())
    }

    /// Completes once the connection has had no request open for a whole
    /// `timeout` (checked in whole periods: between one and two `timeout`s
    /// after it became idle).
    async fn idle(&self, timeout: Duration) {
        loop {
            loop {
                let notified = self.idle.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if self.open.load(Ordering::Acquire) == 0 {
                    break;
                }
                notified.await;
            }
            let epoch = self.epoch.load(Ordering::Acquire);
            tokio::time::sleep(timeout).await;
            if self.open.load(Ordering::Acquire) == 0 && self.epoch.load(Ordering::Acquire) == epoch {
                return;
            }
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.epoch.fetch_add(1, Ordering::AcqRel);
        if self.0.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// A response body that holds its request's [`Open`] place.
#[pin_project::pin_project]
struct Tracked {
    #[pin]
    body: axum::body::Body,
    _open: Open,
}

impl Body for Tracked {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        self.project().body.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A socket that holds its [`Slot`]: the count drops when the socket is
/// closed, also after hyper handed it over as an upgraded WebSocket.
#[pin_project::pin_project]
struct Counted<S> {
    #[pin]
    io: TokioIo<S>,
    /// Bytes read before hyper took over (looking for the HTTP/2 preface),
    /// read again first.
    prefix: bytes::Bytes,
    _slot: Slot,
}

impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite> hyper::rt::Read for Counted<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        mut buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix.split_to(n));
            return Poll::Ready(Ok(()));
        }
        this.io.poll_read(cx, buf)
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
