//! WebSocket transport on tokio-tungstenite (feature `ws`).
//!
//! This module moves frames: it reads and answers the opening handshake
//! ([`upgrade`] on an accepted socket) and turns the socket into a
//! [`WsTransport`]. It knows nothing of hubs; the servers that admit,
//! authenticate and run a session on top of it are
//! [`integration::ws`](crate::integration::ws) (standalone) and
//! `integration::axum` (inside axum), and both end in the same
//! tungstenite stream and the same session code.
//!
//! The crate reads frames itself (`reader`: the RFC 6455 rules, the
//! limits, and `permessage-deflate`, which tungstenite cannot read) and
//! writes them itself (`conn`); tungstenite is used for the accept key
//! only. The read buffer is small by default (4 KiB per connection), as a
//! server holds many mostly idle connections.
//!
//! **Compression** (`permessage-deflate`, RFC 7692) is negotiated per
//! [`WsConfig::compression`], always without context takeover in either
//! direction (see [`Compression`] and docs/performance.md).

mod conn;
pub(crate) mod deflate;
mod handshake;
pub(crate) mod reader;

pub use conn::{WsSink, WsStream, WsTransport};
pub use deflate::Compression;

pub(crate) use deflate::compressed_frame;
#[cfg(feature = "axum")]
pub(crate) use deflate::RESPONSE as DEFLATE_RESPONSE;
pub(crate) use handshake::Refusal;
#[cfg(feature = "axum")]
pub(crate) use handshake::{close_upgraded, negotiate, negotiate_h2, Negotiated};

/// The handshake negotiation, for the `handshake` fuzz target.
#[cfg(fuzzing)]
pub(crate) fn negotiate_for_fuzzing(method: &Method, headers: &HeaderMap) -> bool {
    handshake::negotiate(method, headers, Compression::On).is_ok()
}

/// Reads frames from `data` as a server with `permessage-deflate`
/// negotiated (a 4 KiB message limit), for the `ws_frames` fuzz target:
/// the first byte picks how many bytes each read returns.
#[cfg(fuzzing)]
pub(crate) fn read_frames_for_fuzzing(data: &[u8]) {
    reader::read_for_fuzzing(data)
}

use super::Handshake;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Uri};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// WebSocket settings. The message size limit comes from
/// [`HubConfig::max_message_size`](crate::HubConfig::max_message_size).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct WsConfig {
    /// The frame reader's buffer: bytes read from the socket at a time (it
    /// grows to hold a larger frame whole). Held only while there is
    /// something to read: a connection waiting between frames gives it
    /// back, so an idle connection holds none. Default 4 KiB.
    pub read_buffer_size: usize,
    /// Unused since the writer writes each batch with vectored writes of
    /// the shared buffers (kept for compatibility). Default 8 KiB.
    pub write_buffer_size: usize,
    /// Longest time a client may take to send its upgrade request (standalone
    /// listener), and longest the hub's authenticator may take (both paths;
    /// over it the upgrade is refused with 503). Default 10 s.
    pub handshake_timeout: Duration,
    /// Largest upgrade request head accepted (standalone listener); a larger
    /// one gets 431. Default 8 KiB.
    pub max_handshake_size: usize,
    /// Most frames one inbound message may come in (its first frame and
    /// continuations); a message in more is refused with close 1009, as too
    /// big. Browsers and the crate's client never fragment; every fragment
    /// also counts toward the rate limit. Default 64.
    pub max_fragments: u32,
    /// `permessage-deflate` (RFC 7692): whether it is negotiated with
    /// clients that offer it (every browser does), and which outbound
    /// messages are then compressed. Inbound compressed messages are
    /// inflated whatever the threshold, capped at the message size limit.
    /// Default `Above(256)`: chat lines and presence diffs under 256 bytes
    /// gain little and cost CPU, larger envelopes shrink 3 to 10 times
    /// (measured in docs/performance.md). A room broadcast is compressed
    /// once and the frame shared by every member that negotiated it; no
    /// connection keeps deflate state between messages.
    pub compression: Compression,
}

impl Default for WsConfig {
    fn default() -> Self {
        WsConfig {
            read_buffer_size: 4 * 1024,
            write_buffer_size: 8 * 1024,
            handshake_timeout: Duration::from_secs(10),
            max_handshake_size: 8 * 1024,
            max_fragments: 64,
            compression: Compression::Above(256),
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

    /// Sets [`WsConfig::max_fragments`] (at least 1).
    pub fn max_fragments(mut self, n: u32) -> Self {
        self.max_fragments = n.max(1);
        self
    }

    /// Sets [`WsConfig::compression`].
    pub fn compression(mut self, v: Compression) -> Self {
        self.compression = v;
        self
    }
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
    let admitted = handshake(stream, peer, config, max_message_size, |hs| async { (hs, Ok(())) }).await?;
    Ok(admitted.map(|(t, hs, ())| (t, hs)))
}

/// The server handshake on an accepted socket: reads and validates the
/// request head (bounded in size and by [`WsConfig::handshake_timeout`]),
/// then lets `gate` decide on the [`Handshake`] (the host's admission and
/// authentication live above this layer), and answers `101` or the gate's
/// refusal. `Ok(None)` when the request was refused and answered.
pub(crate) async fn handshake<G, Fut, X>(
    mut stream: TcpStream,
    peer: SocketAddr,
    config: &WsConfig,
    max_message_size: usize,
    gate: G,
) -> std::io::Result<Option<(WsTransport, Handshake, X)>>
where
    G: FnOnce(Handshake) -> Fut,
    Fut: std::future::Future<Output = (Handshake, Result<X, Refusal>)>,
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
    let negotiated = match handshake::negotiate(&method, &headers, config.compression) {
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
    let (hs, decision) = gate(hs).await;
    let admitted = match decision {
        Ok(x) => x,
        Err(handshake::Refusal { close: Some((code, reason)), .. }) => {
            // Said after the upgrade, for a browser (§7.3).
            stream.write_all(handshake::switching_protocols(&negotiated).as_bytes()).await?;
            handshake::close_upgraded(stream, code, &reason).await;
            return Ok(None);
        }
        Err(r) => {
            stream.write_all(refuse(r).as_bytes()).await?;
            return Ok(None);
        }
    };
    tracing::trace!(%peer, compressed = negotiated.deflate.is_some(), "websocket upgrade accepted");
    stream.write_all(handshake::switching_protocols(&negotiated).as_bytes()).await?;
    let (read, write) = stream.into_split();
    let transport = WsTransport::from_halves(
        Box::new(read),
        Box::new(write),
        leftover,
        config,
        max_message_size,
        negotiated.deflate,
    );
    Ok(Some((transport, hs, admitted)))
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
        // Straight into the buffer's spare room: a stack chunk held across
        // the read would make the handshake task 1 KB larger.
        buf.reserve(1024);
        let n = stream.read_buf(&mut buf).await.map_err(HeadError::Io)?;
        if n == 0 {
            return Err(HeadError::Io(std::io::ErrorKind::UnexpectedEof.into()));
        }
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
