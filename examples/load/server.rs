//! The servers under test, run as `load server --kind K`:
//!
//! - `switchboard`: a [`Hub`] behind the standalone `integration::ws::serve`
//!   listener; clients join room `bench`; a `pub` call is published to the
//!   room, the caller excluded (`Call::broadcast_others`).
//! - `raw`: the fastest honest broadcast server on tokio-tungstenite we know
//!   (see [`raw`]): tungstenite does the handshake and reads client frames,
//!   each broadcast is framed once, and one writer task per connection writes
//!   everything queued for it with one vectored write.
//! - `raw-select`: the textbook form: one task per connection, `select!` over
//!   the socket and a `tokio::sync::broadcast` receiver, `feed` + `flush`.
//!
//! Both raw servers speak no protocol: the server sends one text message
//! `welcome` when a connection is registered (so a client knows it will
//! receive broadcasts, as `hello` tells a switchboard client), the first
//! connection that sends a text message becomes the publisher, and every
//! text message it sends goes to every other connection.

use bytes::{BufMut, Bytes, BytesMut};
use futures::{SinkExt, StreamExt};
use parking_lot::RwLock;
use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;
use switchboard::integration::ws;
use switchboard::transport::ws::WsConfig;
use switchboard::{Call, CallError, Hub, HubConfig};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::broadcast;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

/// The room every switchboard client joins.
pub const ROOM: &str = "bench";
/// The raw servers' greeting.
pub const WELCOME: &[u8] = b"welcome";
/// Largest message any server accepts (switchboard's default).
const MAX_MESSAGE: usize = 64 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// Subscribers speak `switchboard.v1.json` (objects).
    Switchboard,
    /// Subscribers speak `switchboard.v2.json`: events are compact arrays.
    SwitchboardV2,
    /// Subscribers speak `switchboard.v1.msgpack` (binary frames).
    SwitchboardMsgpack,
    /// Subscribers speak `switchboard.v2.msgpack`.
    SwitchboardV2Msgpack,
    Raw,
    /// The `raw` server, with the publisher's payload padded so that a
    /// subscriber receives as many bytes per message as from switchboard
    /// (payload + `event` envelope): "what the machinery costs" at equal
    /// bytes, where `raw` against switchboard is "what a user gets" at
    /// equal payload.
    RawPadded,
    RawSelect,
    /// Server-Sent Events: a minimal hyper server broadcasting each
    /// published message as one `data:` event to every open stream
    /// ([`sse::raw`]).
    RawSse,
    /// Server-Sent Events: the switchboard hub's SSE transport
    /// (`integration::sse`), subscribers joining the room from the query.
    SbSse,
    /// [`Kind::SbSse`] with streams opened with `protocol=switchboard.v2.json`:
    /// events are unnamed, their data the compact array.
    SbSseV2,
}

impl Kind {
    pub fn parse(s: &str) -> Option<Kind> {
        Some(match s {
            "switchboard" | "sb" => Kind::Switchboard,
            "switchboard-v2" | "sb-v2" => Kind::SwitchboardV2,
            "switchboard-msgpack" | "sb-msgpack" => Kind::SwitchboardMsgpack,
            "switchboard-v2-msgpack" | "sb-v2-msgpack" => Kind::SwitchboardV2Msgpack,
            "raw" => Kind::Raw,
            "raw-padded" => Kind::RawPadded,
            "raw-select" => Kind::RawSelect,
            "raw-sse" => Kind::RawSse,
            "switchboard-sse" | "sb-sse" => Kind::SbSse,
            "switchboard-sse-v2" | "sb-sse-v2" => Kind::SbSseV2,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::Switchboard => "switchboard",
            Kind::SwitchboardV2 => "sb-v2",
            Kind::SwitchboardMsgpack => "sb-msgpack",
            Kind::SwitchboardV2Msgpack => "sb-v2-msgpack",
            Kind::Raw => "raw",
            Kind::RawPadded => "raw-padded",
            Kind::RawSelect => "raw-select",
            Kind::RawSse => "raw-sse",
            Kind::SbSse => "sb-sse",
            Kind::SbSseV2 => "sb-sse-v2",
        }
    }
}

impl Kind {
    /// Whether the server is switchboard (subscribers join, the publisher calls).
    pub fn is_switchboard(self) -> bool {
        self.subprotocol().is_some() || matches!(self, Kind::SbSse | Kind::SbSseV2)
    }

    /// Whether subscribers read Server-Sent Events (the publisher still
    /// speaks WebSocket, as with every other kind).
    pub fn sse(self) -> bool {
        matches!(self, Kind::RawSse | Kind::SbSse | Kind::SbSseV2)
    }

    /// The path an SSE subscriber opens: switchboard's streams join the
    /// room named in the query.
    pub fn sse_path(self) -> String {
        match self {
            Kind::SbSse => format!("/events?room={ROOM}"),
            Kind::SbSseV2 => format!("/events?room={ROOM}&protocol=switchboard.v2.json"),
            _ => "/events".into(),
        }
    }

    /// The subprotocol switchboard subscribers offer.
    pub fn subprotocol(self) -> Option<&'static str> {
        Some(match self {
            Kind::Switchboard => "switchboard.v1.json",
            Kind::SwitchboardV2 => "switchboard.v2.json",
            Kind::SwitchboardMsgpack => "switchboard.v1.msgpack",
            Kind::SwitchboardV2Msgpack => "switchboard.v2.msgpack",
            _ => return None,
        })
    }

    /// Whether subscribers receive MessagePack (binary frames).
    pub fn msgpack(self) -> bool {
        self.subprotocol().is_some_and(|p| p.ends_with("msgpack"))
    }
}

/// Bytes of the `event` envelope a switchboard subscriber receives around a
/// published payload of `payload` bytes:
/// `{"type":"event","room":"bench","event":"pub","data":<payload>}`.
pub fn switchboard_event_len(payload: usize) -> usize {
    format!(r#"{{"type":"event","room":"{ROOM}","event":"pub","data":}}"#).len() + payload
}

/// Server options (`load server ...`).
#[derive(Debug, Clone)]
pub struct ServerOpts {
    pub kind: Kind,
    pub addr: SocketAddr,
    /// Heartbeat interval; `None` keeps switchboard's default (25 s) and
    /// gives the raw servers none.
    pub heartbeat: Option<Duration>,
    /// Calls a switchboard connection may have in flight (`max_inflight`).
    pub max_inflight: Option<usize>,
    /// How the switchboard kinds are served.
    pub listener: Listener,
    /// [`Listener::AxumTls`]: the directory with `cert.pem` and `key.pem`.
    pub tls_dir: Option<std::path::PathBuf>,
}

/// How `load server` serves a switchboard kind (`--listener`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    /// The standalone `integration::ws::serve` listener (the default).
    Standalone,
    /// The hub's route in an axum router on `integration::axum::serve`,
    /// plain HTTP (features `axum` and `tls`, as `axum-tls`, so that the
    /// two differ by TLS alone).
    Axum,
    /// The same over rustls: HTTPS and WSS.
    AxumTls,
}

impl Listener {
    pub fn parse(s: &str) -> Option<Listener> {
        [Listener::Standalone, Listener::Axum, Listener::AxumTls].into_iter().find(|l| l.name() == s)
    }

    pub fn name(self) -> &'static str {
        match self {
            Listener::Standalone => "standalone",
            Listener::Axum => "axum",
            Listener::AxumTls => "axum-tls",
        }
    }
}

/// A listener with a backlog large enough for thousands of connects in a
/// burst (the kernel caps it at `net.core.somaxconn`).
fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
}

/// The next connection; failures (running out of file descriptors and
/// the like) are transient: log, back off briefly, accept again.
async fn accept(listener: &TcpListener, who: &str) -> (TcpStream, SocketAddr) {
    loop {
        match listener.accept().await {
            Ok(a) => return a,
            Err(e) => {
                eprintln!("{who}: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Runs a server until the process is killed. Prints `ready <addr>` on
/// stdout once it listens.
pub async fn run(opts: ServerOpts) -> io::Result<()> {
    crate::procfs::raise_nofile(u64::MAX);
    let listener = listen(opts.addr)?;
    let addr = listener.local_addr()?;
    match opts.kind {
        Kind::Switchboard | Kind::SwitchboardV2 | Kind::SwitchboardMsgpack | Kind::SwitchboardV2Msgpack => {
            let hub = switchboard_hub(&opts);
            record_metrics(&hub);
            if opts.listener != Listener::Standalone {
                return serve_axum(listener, hub, &opts).await;
            }
            println!("ready {addr}");
            ws::serve(listener, hub, WsConfig::default()).await
        }
        // The padded kind differs only in what the publisher sends.
        Kind::Raw | Kind::RawPadded => {
            println!("ready {addr}");
            raw::serve(listener, opts.heartbeat).await
        }
        Kind::RawSelect => {
            println!("ready {addr}");
            raw_select::serve(listener, opts.heartbeat).await
        }
        #[cfg(all(feature = "sse", feature = "axum"))]
        Kind::SbSse | Kind::SbSseV2 => {
            let hub = switchboard_hub(&opts);
            record_metrics(&hub);
            println!("ready {addr}");
            sse::switchboard(listener, hub).await
        }
        #[cfg(all(feature = "sse", feature = "axum"))]
        Kind::RawSse => {
            println!("ready {addr}");
            sse::raw::serve(listener, opts.heartbeat).await
        }
        #[cfg(not(all(feature = "sse", feature = "axum")))]
        Kind::SbSse | Kind::SbSseV2 | Kind::RawSse => {
            Err(io::Error::other("the SSE kinds need the `sse` and `axum` features"))
        }
    }
}

/// The hub on `integration::axum::serve` at `/`, over TLS with the
/// certificate in `opts.tls_dir` for [`Listener::AxumTls`]; its connection
/// caps raised past what the generator opens.
#[cfg(all(feature = "axum", feature = "tls"))]
async fn serve_axum(listener: TcpListener, hub: Hub, opts: &ServerOpts) -> io::Result<()> {
    use switchboard::integration::axum::{route, serve, ServeConfig};
    let mut config = ServeConfig::default().max_connections(1 << 20);
    if opts.listener == Listener::AxumTls {
        let dir = opts.tls_dir.as_deref().ok_or_else(|| io::Error::other("--listener axum-tls needs --tls-dir"))?;
        config = config.tls(crate::tls::server_config(dir)?);
    }
    println!("ready {}", listener.local_addr()?);
    serve(listener, axum::Router::new().route("/", route(hub)), config).await
}

#[cfg(not(all(feature = "axum", feature = "tls")))]
async fn serve_axum(_: TcpListener, _: Hub, opts: &ServerOpts) -> io::Result<()> {
    let dir = opts.tls_dir.as_ref().map_or(String::new(), |d| format!(" --tls-dir {}", d.display()));
    Err(io::Error::other(format!("--listener {}{dir} needs the `axum` and `tls` features", opts.listener.name())))
}

/// Built with the `metrics` feature, the switchboard servers record into a
/// Prometheus recorder (sampled and rendered every 5 s, as a scrape
/// would), so that `compare` measures what metrics cost a real deployment
/// (`docs/performance.md`, "Metrics on and off").
#[cfg(feature = "metrics")]
fn record_metrics(hub: &Hub) {
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder().expect("one recorder");
    switchboard::metrics::describe();
    let hub = hub.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            switchboard::metrics::sample(&hub);
            std::hint::black_box(handle.render());
        }
    });
}

#[cfg(not(feature = "metrics"))]
fn record_metrics(_hub: &Hub) {}

fn switchboard_hub(opts: &ServerOpts) -> Hub {
    let mut config = HubConfig::default();
    if let Some(h) = opts.heartbeat {
        // Keep the default proportions (25 s interval, 10 s timeout): a
        // timeout at or above the interval would ping only once per timeout.
        config = config.heartbeat_interval(h).heartbeat_timeout(h * 2 / 5);
    }
    if let Some(n) = opts.max_inflight {
        config = config.max_inflight(n);
    }
    // The publisher sends as fast as the server keeps up, far beyond the
    // default per-connection rate limit (50/s, burst 200), which protects a
    // public server from one client; a benchmark measures fan-out instead.
    config = config.rate_limit(None);
    // Likewise the admission limits (connection rate 429s, total cap):
    // the generator opens thousands of connections in a burst.
    let security = switchboard::security::SecurityConfig::default().connection_rate(None).max_connections(1 << 20);
    Hub::builder()
        .config(config)
        .security(security)
        // What a host writes to relay a client's message to the rest of the
        // room: the payload is kept as raw JSON (validated, not re-parsed
        // into a value) and published once to everyone but the sender.
        .on("pub", |call: Call, data: Box<serde_json::value::RawValue>| async move {
            // The reply stays `null` (the publish position is not needed).
            call.broadcast_others("pub", &*data).await.map(|_| ()).map_err(|e| CallError::internal(e.to_string()))
        })
        .build()
}

/// The tungstenite settings both raw servers use: switchboard's
/// `WsConfig` defaults (4 KiB read buffer, 8 KiB write buffer) and the same
/// message limit, so the three servers buffer alike.
fn raw_ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4 * 1024)
        .write_buffer_size(8 * 1024)
        .max_message_size(Some(MAX_MESSAGE))
        .max_frame_size(Some(MAX_MESSAGE))
}

/// Frames a server-to-client message: FIN + opcode, unmasked length
/// (7, 7+16 or 7+64 bits), payload. RFC 6455 §5.2.
pub fn server_frame(opcode: u8, payload: &[u8]) -> Bytes {
    let len = payload.len();
    let mut out = BytesMut::with_capacity(len + 10);
    out.put_u8(0x80 | opcode);
    if len < 126 {
        out.put_u8(len as u8);
    } else if len <= u16::MAX as usize {
        out.put_u8(126);
        out.put_u16(len as u16);
    } else {
        out.put_u8(127);
        out.put_u64(len as u64);
    }
    out.put_slice(payload);
    out.freeze()
}

/// Sizes of the raw servers' per-connection task futures (`load sizes`).
pub fn future_sizes() -> Vec<(&'static str, usize)> {
    raw::future_sizes()
}

pub mod raw {
    //! The fast raw server.
    //!
    //! The socket is shared (`Arc<TcpStream>`) between tungstenite, which
    //! reads from it through [`SharedIo`], and the connection's writer task,
    //! which writes with `try_write_vectored`. tungstenite never writes to
    //! the socket after the handshake: the few frames it produces itself
    //! (pong replies, the close reply) are handed to the writer's queue as
    //! whole frames, so they can never interleave with broadcast frames.

    use super::*;
    use parking_lot::Mutex;
    use std::sync::atomic::AtomicBool;
    use tokio::sync::Notify;

    /// A connection's outbound queue: frames waiting for its writer.
    #[derive(Default)]
    struct Outq {
        frames: Mutex<Vec<Bytes>>,
        notify: Notify,
        closed: AtomicBool,
    }

    impl Outq {
        fn push(&self, frame: Bytes) {
            self.frames.lock().push(frame);
            self.notify.notify_one();
        }

        fn close(&self) {
            self.closed.store(true, Ordering::Release);
            self.notify.notify_one();
        }
    }

    /// Broadcast state: every connection's queue, and who the publisher is.
    #[derive(Default)]
    struct State {
        conns: RwLock<HashMap<u64, Arc<Outq>>>,
        publisher: AtomicU64,
        next_id: AtomicU64,
    }

    pub async fn serve(listener: TcpListener, heartbeat: Option<Duration>) -> io::Result<()> {
        let state = Arc::new(State { next_id: AtomicU64::new(1), ..State::default() });
        if let Some(every) = heartbeat {
            tokio::spawn(heartbeats(state.clone(), every));
        }
        loop {
            let (stream, _) = accept(&listener, "raw").await;
            let state = state.clone();
            tokio::spawn(async move {
                let _ = connection(stream, state).await;
            });
        }
    }

    /// One shared timer: every interval, the same pre-framed empty ping is
    /// queued to every connection.
    async fn heartbeats(state: Arc<State>, every: Duration) {
        let ping = server_frame(0x9, b"");
        let mut tick = tokio::time::interval(every);
        tick.tick().await;
        loop {
            tick.tick().await;
            for q in state.conns.read().values() {
                q.push(ping.clone());
            }
        }
    }

    /// The socket as tungstenite sees it: reads go to the socket; writes go
    /// to the socket during the handshake and to the writer's queue after.
    struct SharedIo {
        tcp: Arc<TcpStream>,
        queue: Option<Arc<Outq>>,
    }

    impl AsyncRead for SharedIo {
        fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
            loop {
                ready!(self.tcp.poll_read_ready(cx))?;
                match self.tcp.try_read(buf.initialize_unfilled()) {
                    Ok(n) => {
                        buf.advance(n);
                        return Poll::Ready(Ok(()));
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Poll::Ready(Err(e)),
                }
            }
        }
    }

    impl AsyncWrite for SharedIo {
        fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
            match &self.queue {
                // tungstenite writes whole frames from its buffer; taking all
                // of it keeps frames whole.
                Some(q) => {
                    q.push(Bytes::copy_from_slice(buf));
                    Poll::Ready(Ok(buf.len()))
                }
                None => loop {
                    ready!(self.tcp.poll_write_ready(cx))?;
                    match self.tcp.try_write(buf) {
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                        r => return Poll::Ready(r),
                    }
                },
            }
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    async fn connection(stream: TcpStream, state: Arc<State>) -> io::Result<()> {
        stream.set_nodelay(true)?;
        let tcp = Arc::new(stream);
        let io = SharedIo { tcp: tcp.clone(), queue: None };
        let mut ws = tokio_tungstenite::accept_async_with_config(io, Some(raw_ws_config()))
            .await
            .map_err(|e| io::Error::other(e.to_string()))?;
        let queue = Arc::new(Outq::default());
        ws.get_mut().queue = Some(queue.clone());
        let id = state.next_id.fetch_add(1, Ordering::Relaxed);
        state.conns.write().insert(id, queue.clone());
        queue.push(server_frame(0x1, WELCOME));
        let writer = tokio::spawn(write_loop(tcp, queue.clone()));

        while let Some(msg) = ws.next().await {
            match msg {
                Ok(Message::Text(text)) => {
                    let publisher = match state.publisher.compare_exchange(0, id, Ordering::AcqRel, Ordering::Acquire) {
                        Ok(_) => id,
                        Err(p) => p,
                    };
                    if publisher == id {
                        // Framed once; every recipient gets the same bytes.
                        let frame = server_frame(0x1, text.as_bytes());
                        for (other, q) in state.conns.read().iter() {
                            if *other != id {
                                q.push(frame.clone());
                            }
                        }
                    }
                }
                // Pings are answered by tungstenite on the next read (through
                // the queue); a close is answered the same way, and the next
                // read ends the stream.
                Ok(_) => {}
                Err(_) => break,
            }
        }
        state.conns.write().remove(&id);
        // The writer finishes what is queued, then ends.
        queue.close();
        let _ = writer.await;
        Ok(())
    }

    pub(super) fn future_sizes() -> Vec<(&'static str, usize)> {
        /// The size of the future an async fn returns, without calling it.
        fn returned<A, B, F: std::future::Future>(_: impl FnOnce(A, B) -> F) -> usize {
            std::mem::size_of::<F>()
        }
        vec![
            ("raw: connection future (reader task)", returned(connection)),
            ("raw: write_loop future (writer task)", returned(write_loop)),
        ]
    }

    /// Takes everything queued and writes it with as few vectored writes as
    /// the socket allows (usually one).
    async fn write_loop(tcp: Arc<TcpStream>, queue: Arc<Outq>) {
        let mut batch: Vec<Bytes> = Vec::new();
        loop {
            std::mem::swap(&mut *queue.frames.lock(), &mut batch);
            if batch.is_empty() {
                if queue.closed.load(Ordering::Acquire) {
                    return;
                }
                queue.notify.notified().await;
                continue;
            }
            if write_all(&tcp, &batch).await.is_err() {
                return;
            }
            batch.clear();
        }
    }

    async fn write_all(tcp: &TcpStream, batch: &[Bytes]) -> io::Result<()> {
        const MAX_IOV: usize = 64;
        let (mut idx, mut off) = (0usize, 0usize);
        while idx < batch.len() {
            tcp.writable().await?;
            let mut iov = [io::IoSlice::new(&[]); MAX_IOV];
            let mut n_iov = 0;
            for (k, b) in batch[idx..].iter().take(MAX_IOV).enumerate() {
                iov[k] = io::IoSlice::new(if k == 0 { &b[off..] } else { &b[..] });
                n_iov += 1;
            }
            match tcp.try_write_vectored(&iov[..n_iov]) {
                Ok(mut n) => {
                    while n > 0 {
                        let left = batch[idx].len() - off;
                        if n >= left {
                            n -= left;
                            idx += 1;
                            off = 0;
                        } else {
                            off += n;
                            n = 0;
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

pub mod raw_select {
    //! The textbook raw server: one task per connection selecting over its
    //! socket and a broadcast receiver, tungstenite framing every message
    //! for every connection, `feed` what is waiting and `flush` once.

    use super::*;

    /// Messages the broadcast channel keeps for a slow receiver; past that
    /// it lags (and loses messages, which the load generator reports).
    const CAPACITY: usize = 4096;

    pub async fn serve(listener: TcpListener, heartbeat: Option<Duration>) -> io::Result<()> {
        let (tx, _) = broadcast::channel::<Message>(CAPACITY);
        let publisher = Arc::new(AtomicU64::new(0));
        let next_id = AtomicU64::new(1);
        let (ping_tx, _) = broadcast::channel::<()>(1);
        if let Some(every) = heartbeat {
            let ping_tx = ping_tx.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(every);
                tick.tick().await;
                loop {
                    tick.tick().await;
                    let _ = ping_tx.send(());
                }
            });
        }
        loop {
            let (stream, _) = accept(&listener, "raw-select").await;
            let id = next_id.fetch_add(1, Ordering::Relaxed);
            let (tx, rx, pings, publisher) = (tx.clone(), tx.subscribe(), ping_tx.subscribe(), publisher.clone());
            tokio::spawn(async move {
                let _ = connection(stream, id, tx, rx, pings, publisher).await;
            });
        }
    }

    async fn connection(
        stream: TcpStream,
        id: u64,
        tx: broadcast::Sender<Message>,
        mut rx: broadcast::Receiver<Message>,
        mut pings: broadcast::Receiver<()>,
        publisher: Arc<AtomicU64>,
    ) -> Result<(), tokio_tungstenite::tungstenite::Error> {
        stream.set_nodelay(true)?;
        let mut ws = tokio_tungstenite::accept_async_with_config(stream, Some(raw_ws_config())).await?;
        ws.send(Message::text(std::str::from_utf8(WELCOME).unwrap_or("welcome"))).await?;
        loop {
            tokio::select! {
                msg = ws.next() => match msg {
                    Some(Ok(Message::Text(text))) => {
                        let p = match publisher.compare_exchange(0, id, Ordering::AcqRel, Ordering::Acquire) {
                            Ok(_) => id,
                            Err(p) => p,
                        };
                        if p == id {
                            let _ = tx.send(Message::Text(text));
                        }
                    }
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => return Ok(()),
                },
                got = rx.recv() => match got {
                    Ok(msg) => {
                        if publisher.load(Ordering::Relaxed) == id {
                            continue;
                        }
                        ws.feed(msg).await?;
                        while let Ok(more) = rx.try_recv() {
                            ws.feed(more).await?;
                        }
                        ws.flush().await?;
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => eprintln!("raw-select: connection {id} lagged {n}"),
                    Err(broadcast::error::RecvError::Closed) => return Ok(()),
                },
                Ok(()) = pings.recv() => ws.send(Message::Ping(Bytes::new())).await?,
            }
        }
    }
}

#[cfg(all(feature = "sse", feature = "axum"))]
pub mod sse {
    //! The SSE servers. Both are plain hyper HTTP/1.1 connections (one
    //! accept loop, [`serve_http`]): `GET /events` opens a stream, any other
    //! path upgrades to WebSocket, which is how the publisher connects to
    //! either server (the same publisher as every other kind).

    use super::*;
    use axum::body::Body;
    use hyper::body::Incoming;
    use hyper::{Request, Response};
    use hyper_util::rt::TokioIo;
    use std::convert::Infallible;
    use std::future::Future;

    /// Serves every accepted connection with hyper's HTTP/1.1 server
    /// (upgrades allowed), answering each request with `handle`.
    async fn serve_http<F, Fut>(listener: TcpListener, handle: F) -> io::Result<()>
    where
        F: Fn(Request<Incoming>, SocketAddr) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = Response<Body>> + Send + 'static,
    {
        loop {
            let (stream, peer) = accept(&listener, "sse").await;
            let handle = handle.clone();
            tokio::spawn(async move {
                let _ = stream.set_nodelay(true);
                let svc = hyper::service::service_fn(move |req| {
                    let fut = handle(req, peer);
                    async move { Ok::<_, Infallible>(fut.await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .with_upgrades()
                    .await;
            });
        }
    }

    /// `sb-sse`: the hub's [`SseEndpoint`](switchboard::integration::sse::SseEndpoint)
    /// on `/events` (streams join the rooms of their query), its WebSocket
    /// upgrade (`integration::axum::upgrade`) everywhere else.
    pub async fn switchboard(listener: TcpListener, hub: Hub) -> io::Result<()> {
        use switchboard::integration::sse::SseEndpoint;
        let endpoint = SseEndpoint::new(hub.clone());
        serve_http(listener, move |req: Request<Incoming>, peer| {
            let (endpoint, hub) = (endpoint.clone(), hub.clone());
            async move {
                if req.uri().path() == "/events" {
                    endpoint.handle(req, Some(peer)).await.map(Body::new)
                } else {
                    let mut req = req.map(Body::new);
                    req.extensions_mut().insert(axum::extract::ConnectInfo(peer));
                    // Boxed (as axum boxes its routes' futures): hyper keeps
                    // an allocation the size of this future for each
                    // connection's life, streams included, and only the
                    // publisher's connection upgrades.
                    Box::pin(switchboard::integration::axum::upgrade(hub, WsConfig::default(), req)).await
                }
            }
        })
        .await
    }

    pub mod raw {
        //! `raw-sse`: the minimal fair SSE broadcast server. Each stream's
        //! body reads an unbounded channel of pre-formatted events (as the
        //! raw WebSocket server's writer reads its queue), everything queued
        //! as one chunk; a published
        //! message is formatted once (`data: <payload>\n\n`) and the same
        //! bytes are queued to every stream. No envelope, no ids, no event
        //! names: what the payload costs and nothing else.

        use super::*;
        use tokio::sync::mpsc;
        use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
        use tokio_tungstenite::tungstenite::protocol::Role;
        use tokio_tungstenite::WebSocketStream;

        #[derive(Default)]
        struct State {
            streams: RwLock<HashMap<u64, mpsc::UnboundedSender<Bytes>>>,
            next_id: AtomicU64,
        }

        /// A stream's body: what is queued when hyper asks, as one chunk
        /// (copied together, as switchboard's batch does for small events).
        /// Leaves the map when the connection ends.
        struct Stream {
            rx: mpsc::UnboundedReceiver<Bytes>,
            id: u64,
            state: Arc<State>,
        }

        impl http_body::Body for Stream {
            type Data = Bytes;
            type Error = Infallible;

            fn poll_frame(
                mut self: Pin<&mut Self>,
                cx: &mut Context<'_>,
            ) -> Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
                let Some(first) = ready!(self.rx.poll_recv(cx)) else { return Poll::Ready(None) };
                // Everything queued goes out as one chunk, as switchboard
                // batches its events: one event per chunk cost hyper a
                // frame, a chunk header and a body poll per event (1.3x
                // switchboard's CPU per delivery).
                let Ok(second) = self.rx.try_recv() else {
                    return Poll::Ready(Some(Ok(http_body::Frame::data(first))));
                };
                let mut batch = BytesMut::with_capacity(first.len() * 16);
                batch.put_slice(&first);
                batch.put_slice(&second);
                while let Ok(more) = self.rx.try_recv() {
                    batch.put_slice(&more);
                }
                Poll::Ready(Some(Ok(http_body::Frame::data(batch.freeze()))))
            }
        }

        impl Drop for Stream {
            fn drop(&mut self) {
                self.state.streams.write().remove(&self.id);
            }
        }

        /// `data: <text>\n\n`, the text being one line (compact JSON).
        pub fn event(text: &[u8]) -> Bytes {
            let mut b = BytesMut::with_capacity(text.len() + 8);
            b.put_slice(b"data: ");
            b.put_slice(text);
            b.put_slice(b"\n\n");
            b.freeze()
        }

        pub async fn serve(listener: TcpListener, heartbeat: Option<Duration>) -> io::Result<()> {
            let state = Arc::new(State { next_id: AtomicU64::new(1), ..State::default() });
            if let Some(every) = heartbeat {
                // One shared timer, one pre-formatted comment for every stream.
                let state = state.clone();
                tokio::spawn(async move {
                    let ping = Bytes::from_static(b": ping\n\n");
                    let mut tick = tokio::time::interval(every);
                    tick.tick().await;
                    loop {
                        tick.tick().await;
                        for tx in state.streams.read().values() {
                            let _ = tx.send(ping.clone());
                        }
                    }
                });
            }
            serve_http(listener, move |req: Request<Incoming>, _peer| {
                let state = state.clone();
                async move { handle(req, state) }
            })
            .await
        }

        fn handle(mut req: Request<Incoming>, state: Arc<State>) -> Response<Body> {
            if req.uri().path() == "/events" {
                let (tx, rx) = mpsc::unbounded_channel();
                // The greeting tells the client it is registered.
                let _ = tx.send(event(WELCOME));
                let id = state.next_id.fetch_add(1, Ordering::Relaxed);
                state.streams.write().insert(id, tx);
                return Response::builder()
                    .header("content-type", "text/event-stream")
                    .header("cache-control", "no-cache")
                    .body(Body::new(Stream { rx, id, state }))
                    .unwrap_or_default();
            }
            // The publisher: a WebSocket upgrade; every text message it
            // sends is broadcast.
            let key = req.headers().get("sec-websocket-key").map(|k| derive_accept_key(k.as_bytes()));
            let (Some(accept), Some(on_upgrade)) = (key, req.extensions_mut().remove::<hyper::upgrade::OnUpgrade>())
            else {
                return Response::builder()
                    .status(400)
                    .body(Body::from("not an SSE or WebSocket request"))
                    .unwrap_or_default();
            };
            tokio::spawn(async move {
                let Ok(upgraded) = on_upgrade.await else { return };
                let mut ws =
                    WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(raw_ws_config())).await;
                if ws.send(Message::text("welcome")).await.is_err() {
                    return;
                }
                while let Some(Ok(msg)) = ws.next().await {
                    if let Message::Text(text) = msg {
                        // Formatted once; every stream gets the same bytes.
                        let ev = event(text.as_bytes());
                        for tx in state.streams.read().values() {
                            let _ = tx.send(ev.clone());
                        }
                    }
                }
            });
            Response::builder()
                .status(101)
                .header("upgrade", "websocket")
                .header("connection", "upgrade")
                .header("sec-websocket-accept", accept)
                .body(Body::empty())
                .unwrap_or_default()
        }
    }
}
