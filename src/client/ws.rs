//! The client's WebSocket: the opening handshake written here (so that
//! `permessage-deflate` can be offered and the bytes after the `101` kept),
//! frames read by the crate's frame reader (tungstenite cannot read
//! compressed frames) and written masked by this module.
//!
//! - The client offers `permessage-deflate; server_no_context_takeover;
//!   client_max_window_bits` when [`ClientConfig::compression`](super::ClientConfig)
//!   is on. An answer with anything but `server_no_context_takeover`
//!   included (the inflater keeps no window between messages), or with an
//!   unknown parameter, fails the connection; no answer means no
//!   compression.
//! - Outbound messages of at least 256 bytes are compressed, each on its
//!   own, unless the server limited the client's window below 15 bits
//!   (then nothing is compressed; sending uncompressed is always allowed).
//! - Pings are answered and a close is echoed from here, as tungstenite
//!   did: the driver only sees messages.
//! - `wss://` is the same handshake and frames over a rustls stream
//!   (feature `tls`, [`super::tls`]); without the feature a `wss://` URL
//!   fails for good with a message naming it.

use crate::protocol::CloseCode;
use crate::transport::ws::reader::{FrameReader, Limits, Role};
use crate::transport::{CloseFrame, Frame, TransportError};
use bytes::Bytes;
use futures::{Sink, Stream};
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::handshake::client::generate_key;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

/// What the client offers.
const OFFER: &str = "permessage-deflate; server_no_context_takeover; client_max_window_bits";
/// Outbound messages this big or bigger are compressed.
const COMPRESS_ABOVE: usize = 256;
/// The largest response head read.
const MAX_HEAD: usize = 16 * 1024;

/// A refused or failed handshake.
#[derive(Debug)]
pub(crate) enum ConnectError {
    /// The server answered with an HTTP status other than 101.
    Http { status: u16, headers: http::HeaderMap, body: Vec<u8> },
    /// TLS failed in a way a retry cannot cure (a certificate refused, no
    /// roots, no `tls` feature): the reason, in words.
    Tls(String),
    /// Anything else: the reason, in words.
    Other(String),
}

/// Settings of one connection.
#[derive(Debug, Clone)]
pub(crate) struct WsOptions {
    max_message_size: usize,
    read_buffer_size: usize,
    compression: bool,
    #[cfg(feature = "tls")]
    tls: Option<std::sync::Arc<rustls::ClientConfig>>,
}

impl WsOptions {
    pub(crate) fn new(config: &super::ClientConfig) -> WsOptions {
        WsOptions {
            max_message_size: config.max_message_size,
            read_buffer_size: config.read_buffer_size,
            compression: config.compression,
            #[cfg(feature = "tls")]
            tls: config.tls.clone(),
        }
    }
}

type BoxWrite = Box<dyn AsyncWrite + Send + Unpin>;

/// A client WebSocket connection (`ws://` or `wss://`): a stream of frames
/// and a sink of frames.
pub(crate) struct Ws {
    read: FrameReader,
    write: BoxWrite,
    /// Bytes to write (masked frames), from `start`.
    out: Vec<u8>,
    start: usize,
    /// Outbound compression: negotiated and allowed (window of 15 bits).
    compress: bool,
    /// A close frame was sent.
    close_sent: bool,
}

impl std::fmt::Debug for Ws {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ws").field("compress", &self.compress).finish_non_exhaustive()
    }
}

/// Connects to `request`'s URL (`ws://` or `wss://`) and performs the
/// opening handshake; returns the connection with the `101` response.
pub(crate) async fn connect(
    request: http::Request<()>,
    options: WsOptions,
) -> Result<(Ws, http::Response<()>), ConnectError> {
    let other = |e: &dyn std::fmt::Display| ConnectError::Other(e.to_string());
    let uri = request.uri().clone();
    let tls = match uri.scheme_str() {
        Some("ws") => false,
        Some("wss") => true,
        _ => return Err(ConnectError::Other(format!("not a ws:// or wss:// URL: {uri}"))),
    };
    if tls && cfg!(not(feature = "tls")) {
        return Err(ConnectError::Tls("wss:// needs switchboard's `tls` feature".into()));
    }
    let host = uri.host().ok_or_else(|| ConnectError::Other(format!("no host in {uri}")))?;
    let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let tcp = TcpStream::connect((host, port)).await.map_err(|e| other(&e))?;
    let _ = tcp.set_nodelay(true);
    #[cfg(feature = "tls")]
    if tls {
        let stream = super::tls::connect(tcp, host, options.tls.as_ref()).await?;
        let (read, write) = tokio::io::split(stream);
        return handshake(read, Box::new(write), &request, &options).await;
    }
    let (read, write) = tcp.into_split();
    handshake(read, Box::new(write), &request, &options).await
}

/// The opening handshake on a connected stream (its two halves).
async fn handshake<R: AsyncRead + Send + Unpin + 'static>(
    mut read: R,
    mut write: BoxWrite,
    request: &http::Request<()>,
    options: &WsOptions,
) -> Result<(Ws, http::Response<()>), ConnectError> {
    let uri = request.uri();
    let host = uri.host().unwrap_or_default().trim_start_matches('[').trim_end_matches(']');
    let key = generate_key();
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let authority = uri.authority().map_or(host, |a| a.as_str());
    let mut head = format!(
        "GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n"
    );
    if options.compression {
        head.push_str(&format!("Sec-WebSocket-Extensions: {OFFER}\r\n"));
    }
    for (k, v) in request.headers() {
        let v = v.to_str().map_err(|_| ConnectError::Other(format!("header {k} is not text")))?;
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    write.write_all(head.as_bytes()).await.map_err(io_failed)?;

    // The response head, and whatever came after it.
    let mut buf = Vec::with_capacity(1024);
    let (status, headers, len) = loop {
        let mut chunk = [0u8; 2048];
        let n = read.read(&mut chunk).await.map_err(io_failed)?;
        if n == 0 {
            return Err(ConnectError::Other("the server closed the connection during the handshake".into()));
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut raw = [httparse::EMPTY_HEADER; 64];
        let mut resp = httparse::Response::new(&mut raw);
        match resp.parse(&buf) {
            Ok(httparse::Status::Complete(len)) => {
                let mut headers = http::HeaderMap::new();
                for h in resp.headers.iter() {
                    if let (Ok(k), Ok(v)) =
                        (http::HeaderName::from_bytes(h.name.as_bytes()), http::HeaderValue::from_bytes(h.value))
                    {
                        headers.append(k, v);
                    }
                }
                break (resp.code.unwrap_or(0), headers, len);
            }
            Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => {}
            Ok(httparse::Status::Partial) => return Err(ConnectError::Other("response head too large".into())),
            Err(e) => return Err(ConnectError::Other(format!("malformed HTTP response: {e}"))),
        }
    };
    let rest = buf.split_off(len);
    if status != 101 {
        // The body, as much as has come (a refusal is a short text).
        let mut body = rest;
        let want = headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
            .unwrap_or(0)
            .min(4096);
        while body.len() < want {
            let mut chunk = [0u8; 1024];
            match tokio::time::timeout(std::time::Duration::from_secs(1), read.read(&mut chunk)).await {
                Ok(Ok(n)) if n > 0 => body.extend_from_slice(&chunk[..n]),
                _ => break,
            }
        }
        return Err(ConnectError::Http { status, headers, body });
    }
    let accept = headers.get(http::header::SEC_WEBSOCKET_ACCEPT).map(http::HeaderValue::as_bytes);
    if accept != Some(derive_accept_key(key.as_bytes()).as_bytes()) {
        return Err(ConnectError::Other("wrong or missing Sec-WebSocket-Accept".into()));
    }
    let agreed = match headers.get(http::header::SEC_WEBSOCKET_EXTENSIONS) {
        None => None,
        Some(v) => {
            let v = v.to_str().map_err(|_| ConnectError::Other("unreadable Sec-WebSocket-Extensions".into()))?;
            Some(accepted(v, options.compression).map_err(ConnectError::Other)?)
        }
    };
    let mut response = http::Response::new(());
    *response.status_mut() = http::StatusCode::SWITCHING_PROTOCOLS;
    *response.headers_mut() = headers;

    let limits = Limits {
        max_message_size: options.max_message_size,
        // The server never fragments; a peer that does is still bounded.
        max_fragments: 1024,
        read_buffer_size: options.read_buffer_size.max(1024),
        deflate: agreed.is_some(),
    };
    let read = FrameReader::new(Box::new(read), rest, Role::Client, limits);
    let ws = Ws { read, write, out: Vec::new(), start: 0, compress: agreed == Some(true), close_sent: false };
    Ok((ws, response))
}

/// A read or write of the handshake failed (TLS alerts about certificates
/// are terminal, see [`super::tls::classify`]).
fn io_failed(e: io::Error) -> ConnectError {
    #[cfg(feature = "tls")]
    return super::tls::classify(e, "the handshake failed");
    #[cfg(not(feature = "tls"))]
    ConnectError::Other(e.to_string())
}

/// Checks the server's `Sec-WebSocket-Extensions` answer: `Ok(true)` for
/// `permessage-deflate` with compression allowed both ways, `Ok(false)`
/// when the client must not compress (a window under 15 bits).
fn accepted(answer: &str, offered: bool) -> Result<bool, String> {
    let bad = |why: &str| Err(format!("the server answered `{answer}`: {why}"));
    if !offered {
        return bad("no extension was offered");
    }
    if answer.contains(',') {
        return bad("more than one extension");
    }
    let mut parts = answer.split(';').map(str::trim);
    if !parts.next().is_some_and(|n| n.eq_ignore_ascii_case("permessage-deflate")) {
        return bad("not permessage-deflate");
    }
    let (mut server_reset, mut compress) = (false, true);
    for p in parts {
        let (name, value) = match p.split_once('=') {
            Some((n, v)) => (n.trim(), Some(v.trim().trim_matches('"'))),
            None => (p, None),
        };
        let bits = || value.and_then(|v| v.parse::<u8>().ok()).filter(|b| (8..=15).contains(b));
        match name.to_ascii_lowercase().as_str() {
            "server_no_context_takeover" if value.is_none() => server_reset = true,
            "client_no_context_takeover" if value.is_none() => {}
            "server_max_window_bits" if bits().is_some() => {}
            "client_max_window_bits" if bits().is_some() => compress &= bits() == Some(15),
            _ => return bad("an unknown or malformed parameter"),
        }
    }
    if !server_reset {
        return bad("without server_no_context_takeover, which was asked for");
    }
    Ok(compress)
}

fn mask_into(out: &mut Vec<u8>, b0: u8, payload: &[u8]) {
    let key = (crate::util::random_u64() as u32).to_ne_bytes();
    crate::transport::ws::reader::masked_frame(out, b0, payload, key);
}

impl Ws {
    fn queue(&mut self, frame: Frame) {
        let (b0, payload): (u8, Bytes) = match frame {
            Frame::Text(b) => (0x81, b),
            Frame::Binary(b) => (0x82, b),
            Frame::Ping(b) => (0x89, b.slice(..b.len().min(125))),
            Frame::Pong(b) => (0x8A, b.slice(..b.len().min(125))),
            Frame::Close(c) => {
                self.close_sent = true;
                let mut p = Vec::new();
                if let Some(c) = c {
                    p.extend_from_slice(&c.code.0.to_be_bytes());
                    let mut end = c.reason.len().min(123);
                    while !c.reason.is_char_boundary(end) {
                        end -= 1;
                    }
                    p.extend_from_slice(&c.reason.as_bytes()[..end]);
                }
                (0x88, Bytes::from(p))
            }
        };
        if self.compress && b0 & 0x0F < 8 && payload.len() >= COMPRESS_ABOVE {
            if let Some(body) = crate::transport::ws::deflate::compress_body(&payload) {
                mask_into(&mut self.out, b0 | 0x40, &body);
                return;
            }
        }
        mask_into(&mut self.out, b0, &payload);
    }

    fn poll_write_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.start < self.out.len() {
            let n = ready!(Pin::new(&mut self.write).poll_write(cx, &self.out[self.start..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.start += n;
        }
        self.out.clear();
        self.start = 0;
        if self.out.capacity() > 64 * 1024 {
            self.out = Vec::new();
        }
        Pin::new(&mut self.write).poll_flush(cx)
    }
}

impl Stream for Ws {
    type Item = Result<Frame, TransportError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        let item = ready!(this.read.poll_frame(cx));
        // Pings are answered, a close echoed, as soon as they are read
        // (written now if the socket takes them, else with the next flush).
        match &item {
            Some(Ok(Frame::Ping(p))) => this.queue(Frame::Pong(p.clone())),
            Some(Ok(Frame::Close(c))) if !this.close_sent => {
                let code = c.as_ref().map_or(CloseCode::NORMAL, |c| c.code);
                this.queue(Frame::Close(Some(CloseFrame { code, reason: String::new() })));
            }
            _ => {}
        }
        if this.start < this.out.len() {
            let _ = this.poll_write_out(cx);
        }
        Poll::Ready(item)
    }
}

impl Sink<Frame> for Ws {
    type Error = TransportError;

    fn poll_ready(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Result<(), TransportError>> {
        Poll::Ready(Ok(()))
    }

    fn start_send(mut self: Pin<&mut Self>, frame: Frame) -> Result<(), TransportError> {
        if self.close_sent {
            return Err(TransportError::Closed);
        }
        self.queue(frame);
        Ok(())
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), TransportError>> {
        ready!(self.poll_write_out(cx))?;
        Poll::Ready(Ok(()))
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), TransportError>> {
        ready!(self.poll_write_out(cx))?;
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers() {
        let agreed = "permessage-deflate; server_no_context_takeover; client_no_context_takeover";
        assert_eq!(accepted(agreed, true), Ok(true));
        assert_eq!(
            accepted("permessage-deflate; server_no_context_takeover; client_max_window_bits=15", true),
            Ok(true)
        );
        assert_eq!(
            accepted("permessage-deflate; server_no_context_takeover; client_max_window_bits=10", true),
            Ok(false)
        );
        // Context takeover by the server: the inflater keeps no window.
        assert!(accepted("permessage-deflate", true).is_err());
        assert!(accepted("permessage-deflate; server_no_context_takeover; foo", true).is_err());
        assert!(accepted("x-other", true).is_err());
        assert!(accepted(agreed, false).is_err());
    }
}
