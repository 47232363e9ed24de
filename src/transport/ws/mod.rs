//! WebSocket transport on tokio-tungstenite (feature `ws`).
//!
//! Two ways in:
//! - **Standalone**: [`serve`] runs an accept loop on a `TcpListener` (and
//!   [`accept`] serves one accepted socket). The handshake is read and
//!   answered here, so the hub's async authenticator runs *before* the
//!   upgrade and a refusal is a plain HTTP status on the same socket.
//! - **Inside axum** (feature `axum`): see [`crate::integration::axum`]; it
//!   validates the same way and upgrades through hyper, so both paths end in
//!   the same tungstenite stream and the same session code.
//!
//! tungstenite does the framing and the RFC 6455 rules (fragmentation,
//! UTF-8 validation of text, masking, control frames, the close handshake,
//! automatic pongs). Its default buffers (128 KiB read buffer per
//! connection) are far too large for a server holding many mostly idle
//! connections, so [`WsConfig`] defaults to small ones.

mod conn;
mod handshake;

pub use conn::{WsSink, WsStream, WsTransport};

#[cfg(feature = "axum")]
pub(crate) use handshake::{negotiate, Refusal};

/// The handshake negotiation, for the `handshake` fuzz target.
#[cfg(fuzzing)]
pub(crate) fn negotiate_for_fuzzing(method: &Method, headers: &HeaderMap) -> bool {
    handshake::negotiate(method, headers).is_ok()
}

use super::Handshake;
use crate::hub::Hub;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Uri};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite;

/// WebSocket settings. The message size limit comes from
/// [`HubConfig::max_message_size`](crate::HubConfig::max_message_size).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct WsConfig {
    /// tungstenite's read buffer, allocated per connection. Default 4 KiB
    /// (tungstenite's own default is 128 KiB).
    pub read_buffer_size: usize,
    /// Bytes tungstenite gathers before writing to the socket; the writer
    /// flushes after every batch anyway. Default 8 KiB.
    pub write_buffer_size: usize,
    /// Longest time a client may take to send its upgrade request (standalone
    /// listener), and longest the hub's authenticator may take (both paths;
    /// over it the upgrade is refused with 503). Default 10 s.
    pub handshake_timeout: Duration,
    /// Largest upgrade request head accepted (standalone listener); a larger
    /// one gets 431. Default 8 KiB.
    pub max_handshake_size: usize,
}

impl Default for WsConfig {
    fn default() -> Self {
        WsConfig {
            read_buffer_size: 4 * 1024,
            write_buffer_size: 8 * 1024,
            handshake_timeout: Duration::from_secs(10),
            max_handshake_size: 8 * 1024,
        }
    }
}

impl WsConfig {
    /// Sets [`WsConfig::read_buffer_size`].
    pub fn read_buffer_size(mut self, v: usize) -> Self {
        self.read_buffer_size = v;
        self
    }

    /// Sets [`WsConfig::write_buffer_size`].
    pub fn write_buffer_size(mut self, v: usize) -> Self {
        self.write_buffer_size = v;
        self
    }

    /// Sets [`WsConfig::handshake_timeout`].
    pub fn handshake_timeout(mut self, v: Duration) -> Self {
        self.handshake_timeout = v;
        self
    }

    /// Sets [`WsConfig::max_handshake_size`].
    pub fn max_handshake_size(mut self, v: usize) -> Self {
        self.max_handshake_size = v;
        self
    }

    pub(crate) fn tungstenite(&self, max_message_size: usize) -> tungstenite::protocol::WebSocketConfig {
        tungstenite::protocol::WebSocketConfig::default()
            .read_buffer_size(self.read_buffer_size)
            .write_buffer_size(self.write_buffer_size)
            .max_message_size(Some(max_message_size))
            .max_frame_size(Some(max_message_size))
    }
}

/// Accepts WebSocket connections on `listener` and serves each on its own
/// task, until the hub starts shutting down. Connections already accepted
/// keep running; [`Hub::shutdown`] closes them.
pub async fn serve(listener: TcpListener, hub: Hub, config: WsConfig) -> std::io::Result<()> {
    let stop = hub.shutdown_started();
    tokio::pin!(stop);
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut stop => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Running out of file descriptors and similar are
                    // transient: log, back off briefly, keep accepting.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let (hub, config) = (hub.clone(), config.clone());
        // The handshake runs on a short-lived task; the session gets a task
        // of its own, so the memory of the handshake's state (the request
        // head, the admission and authentication futures) is freed once it
        // is done instead of being kept for the connection's whole life:
        // a task's allocation is sized for the largest state of its future.
        tokio::spawn(async move {
            match admit_and_upgrade(stream, peer, &hub, &config).await {
                Ok(Some((transport, hs, identity, admission))) => {
                    let session = hub.serve(transport, &hs, identity);
                    drop(hs);
                    spawn_session(session, admission);
                }
                Ok(None) => {}
                Err(e) => tracing::debug!(%peer, error = %e, "handshake failed"),
            }
        });
    }
}

/// Runs a connection's session on a task of its own, holding its admission
/// slots until it ends (or the task is dropped).
pub(crate) fn spawn_session(
    session: impl std::future::Future<Output = ()> + Send + 'static,
    admission: Option<crate::security::Admission>,
) {
    use futures::FutureExt;
    // `map`, not `async move { session.await; … }`: such a wrapper keeps both
    // the captured future and the one being awaited, doubling the task
    // (about 1 KB per connection).
    tokio::spawn(session.map(move |()| drop(admission)));
}

/// The handshake of [`accept`], without serving the session.
async fn admit_and_upgrade(
    stream: TcpStream,
    peer: SocketAddr,
    hub: &Hub,
    config: &WsConfig,
) -> std::io::Result<Option<Admitted>> {
    let max = hub.config().max_message_size;
    let admit = |hs: &mut Handshake| hub.admit(hs).map(Some);
    handshake(stream, peer, config, max, admit, |hs| hub.authenticate(hs)).await
}

/// Serves one accepted TCP connection: reads the upgrade request, runs the
/// hub's admission ([`Hub::admit`]: origin, connection limits and rate) and
/// authenticator, answers `101` or an HTTP error, then serves the WebSocket
/// until it closes.
pub async fn accept(stream: TcpStream, peer: SocketAddr, hub: &Hub, config: &WsConfig) -> std::io::Result<()> {
    if let Some((transport, hs, identity, admission)) = admit_and_upgrade(stream, peer, hub, config).await? {
        hub.serve(transport, &hs, identity).await;
        // The connection's admission slots are freed only now (and on any
        // early exit of this task, by the drop).
        drop(admission);
    }
    Ok(())
}

/// Performs the server handshake on an accepted socket without a hub:
/// `Ok(None)` when the request was refused (and answered with an HTTP
/// error). For using the transport on its own, as `examples/echo.rs` does.
pub async fn upgrade(
    stream: TcpStream,
    peer: SocketAddr,
    config: &WsConfig,
    max_message_size: usize,
) -> std::io::Result<Option<(WsTransport, Handshake)>> {
    let admitted =
        handshake(stream, peer, config, max_message_size, |_| Ok(None), |_| async { Ok(crate::Identity::anonymous()) })
            .await?;
    Ok(admitted.map(|(t, hs, _, _)| (t, hs)))
}

type Admitted = (WsTransport, Handshake, crate::Identity, Option<crate::security::Admission>);

async fn handshake<A, F, Fut>(
    mut stream: TcpStream,
    peer: SocketAddr,
    config: &WsConfig,
    max_message_size: usize,
    admit: A,
    authenticate: F,
) -> std::io::Result<Option<Admitted>>
where
    A: FnOnce(&mut Handshake) -> Result<Option<crate::security::Admission>, crate::Rejection>,
    F: FnOnce(&Handshake) -> Fut,
    Fut: std::future::Future<Output = Result<crate::Identity, crate::Rejection>>,
{
    let _ = stream.set_nodelay(true);
    let head = tokio::time::timeout(config.handshake_timeout, read_head(&mut stream, config.max_handshake_size)).await;
    let refuse = |r: handshake::Refusal| handshake::refusal_response(&r);
    let (method, uri, headers, leftover) = match head {
        Err(_) => return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "handshake timed out")),
        Ok(Err(HeadError::Io(e))) => return Err(e),
        Ok(Err(HeadError::Refused(r))) => {
            stream.write_all(refuse(r).as_bytes()).await?;
            return Ok(None);
        }
        Ok(Ok(h)) => h,
    };
    let negotiated = match handshake::negotiate(&method, &headers) {
        Ok(n) => n,
        Err(r) => {
            stream.write_all(refuse(r).as_bytes()).await?;
            return Ok(None);
        }
    };
    let mut hs = Handshake::new().with_peer(peer).with_uri(uri).with_headers(headers);
    if let Some(p) = negotiated.subprotocol {
        hs = hs.with_subprotocol(p);
    }
    // Admission before the authenticator: a refused client costs no
    // authentication work, and a reconnect storm is cut off here.
    let admission = match admit(&mut hs) {
        Ok(a) => a,
        Err(rej) => {
            stream.write_all(refuse(handshake::Refusal::from_rejection(&rej)).as_bytes()).await?;
            return Ok(None);
        }
    };
    // The authenticator gets the same bound as reading the request.
    let identity = match tokio::time::timeout(config.handshake_timeout, authenticate(&hs)).await {
        Ok(Ok(id)) => id,
        Err(_) => {
            let msg = "authentication timed out".to_owned();
            let r =
                handshake::Refusal { status: http::StatusCode::SERVICE_UNAVAILABLE, headers: Vec::new(), message: msg };
            stream.write_all(refuse(r).as_bytes()).await?;
            return Ok(None);
        }
        Ok(Err(rej)) => {
            stream.write_all(refuse(handshake::Refusal::from_rejection(&rej)).as_bytes()).await?;
            return Ok(None);
        }
    };
    stream.write_all(handshake::switching_protocols(&negotiated).as_bytes()).await?;
    let (read, write) = stream.into_split();
    let transport = WsTransport::from_halves(Box::new(read), Box::new(write), leftover, config, max_message_size).await;
    Ok(Some((transport, hs, identity, admission)))
}

enum HeadError {
    Io(std::io::Error),
    Refused(handshake::Refusal),
}

pub(crate) type Head = (Method, Uri, HeaderMap, Vec<u8>);

/// Reads an HTTP/1.1 request head; returns it with any bytes read past it.
async fn read_head(stream: &mut TcpStream, max: usize) -> Result<Head, HeadError> {
    let mut buf = Vec::with_capacity(1024);
    loop {
        let mut chunk = [0u8; 1024];
        let n = stream.read(&mut chunk).await.map_err(HeadError::Io)?;
        if n == 0 {
            return Err(HeadError::Io(std::io::ErrorKind::UnexpectedEof.into()));
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(head) = parse_head(&buf, max).map_err(HeadError::Refused)? {
            return Ok(head);
        }
    }
}

/// Parses what has arrived of a request head: `Ok(None)` while it is
/// incomplete and under `max` bytes. Synchronous and socket-free, so the
/// fuzz target `handshake` drives it directly.
pub(crate) fn parse_head(buf: &[u8], max: usize) -> Result<Option<Head>, handshake::Refusal> {
    let mut raw_headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut raw_headers);
    let refuse = |status, msg: &str| handshake::Refusal::new(status, msg);
    match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) if len > max => {
            Err(refuse(http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, "request head too large"))
        }
        Ok(httparse::Status::Complete(len)) => {
            let method = Method::from_bytes(req.method.unwrap_or("").as_bytes())
                .map_err(|_| refuse(http::StatusCode::BAD_REQUEST, "bad method"))?;
            let uri: Uri = req
                .path
                .unwrap_or("/")
                .parse()
                .map_err(|_| refuse(http::StatusCode::BAD_REQUEST, "bad request target"))?;
            let mut headers = HeaderMap::with_capacity(req.headers.len());
            for h in req.headers.iter() {
                let name = HeaderName::from_bytes(h.name.as_bytes())
                    .map_err(|_| refuse(http::StatusCode::BAD_REQUEST, "bad header"))?;
                let value = HeaderValue::from_bytes(h.value)
                    .map_err(|_| refuse(http::StatusCode::BAD_REQUEST, "bad header"))?;
                headers.append(name, value);
            }
            Ok(Some((method, uri, headers, buf[len..].to_vec())))
        }
        Ok(httparse::Status::Partial) if buf.len() < max => Ok(None),
        Ok(httparse::Status::Partial) | Err(httparse::Error::TooManyHeaders) => {
            Err(refuse(http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, "request head too large"))
        }
        Err(_) => Err(refuse(http::StatusCode::BAD_REQUEST, "malformed HTTP request")),
    }
}
