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
//! - `wss://` URLs still go through tokio-tungstenite's `connect_async`
//!   (TLS comes from the application enabling one of its TLS features),
//!   without compression: tungstenite cannot read compressed frames.

use crate::protocol::CloseCode;
use crate::transport::ws::reader::{FrameReader, Limits, Role};
use crate::transport::{CloseFrame, Frame, TransportError};
use bytes::Bytes;
use futures::{Sink, Stream};
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::handshake::client::generate_key;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode as WsCloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame as WsCloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{self, Message, Utf8Bytes};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

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
    /// Anything else: the reason, in words.
    Other(String),
}

/// Settings of one connection.
#[derive(Debug, Clone, Copy)]
pub(crate) struct WsOptions {
    pub(crate) max_message_size: usize,
    pub(crate) read_buffer_size: usize,
    pub(crate) compression: bool,
}

/// A client WebSocket connection: a stream of frames and a sink of frames.
pub(crate) struct ClientWs {
    read: FrameReader,
    write: OwnedWriteHalf,
    /// Bytes to write (masked frames), from `start`.
    out: Vec<u8>,
    start: usize,
    /// Outbound compression: negotiated and allowed (window of 15 bits).
    compress: bool,
    /// A close frame was sent.
    close_sent: bool,
}

impl std::fmt::Debug for ClientWs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientWs").field("compress", &self.compress).finish_non_exhaustive()
    }
}

/// The client's connection: the crate's own (`ws://`), or tungstenite's
/// over TLS (`wss://`, uncompressed).
pub(crate) enum Ws {
    Own(ClientWs),
    Tls(Box<WebSocketStream<MaybeTlsStream<TcpStream>>>),
}

/// Connects to `request`'s URL and performs the opening handshake;
/// returns the connection with the `101` response.
pub(crate) async fn connect(
    request: http::Request<()>,
    options: WsOptions,
) -> Result<(Ws, http::Response<()>), ConnectError> {
    if request.uri().scheme_str() != Some("wss") {
        return connect_own(request, options).await.map(|(ws, resp)| (Ws::Own(ws), resp));
    }
    let mut config = WebSocketConfig::default();
    config.read_buffer_size = options.read_buffer_size.max(1024);
    config.max_message_size = Some(options.max_message_size);
    config.max_frame_size = Some(options.max_message_size);
    match tokio_tungstenite::connect_async_with_config(request, Some(config), true).await {
        Ok((ws, resp)) => Ok((Ws::Tls(Box::new(ws)), resp.map(|_| ()))),
        Err(tungstenite::Error::Http(resp)) => Err(ConnectError::Http {
            status: resp.status().as_u16(),
            headers: resp.headers().clone(),
            body: resp.body().clone().unwrap_or_default(),
        }),
        Err(e) => Err(ConnectError::Other(e.to_string())),
    }
}

/// Connects to `request`'s `ws://` URL and performs the opening handshake.
/// Returns the connection and the `101` response.
async fn connect_own(
    request: http::Request<()>,
    options: WsOptions,
) -> Result<(ClientWs, http::Response<()>), ConnectError> {
    let other = |e: &dyn std::fmt::Display| ConnectError::Other(e.to_string());
    let uri = request.uri().clone();
    if uri.scheme_str() != Some("ws") {
        return Err(ConnectError::Other(format!("not a ws:// or wss:// URL: {uri}")));
    }
    let host = uri.host().ok_or_else(|| ConnectError::Other(format!("no host in {uri}")))?;
    let port = uri.port_u16().unwrap_or(80);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let mut tcp = TcpStream::connect((host, port)).await.map_err(|e| other(&e))?;
    let _ = tcp.set_nodelay(true);

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
    tcp.write_all(head.as_bytes()).await.map_err(|e| other(&e))?;

    // The response head, and whatever came after it.
    let mut buf = Vec::with_capacity(1024);
    let (status, headers, len) = loop {
        let mut chunk = [0u8; 2048];
        let n = tcp.read(&mut chunk).await.map_err(|e| other(&e))?;
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
            match tokio::time::timeout(std::time::Duration::from_secs(1), tcp.read(&mut chunk)).await {
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

    let (read, write) = tcp.into_split();
    let limits = Limits {
        max_message_size: options.max_message_size,
        // The server never fragments; a peer that does is still bounded.
        max_fragments: 1024,
        read_buffer_size: options.read_buffer_size.max(1024),
        deflate: agreed.is_some(),
    };
    let read = FrameReader::new(Box::new(read), rest, Role::Client, limits);
    let ws = ClientWs { read, write, out: Vec::new(), start: 0, compress: agreed == Some(true), close_sent: false };
    Ok((ws, response))
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

impl ClientWs {
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

impl Stream for ClientWs {
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

impl Sink<Frame> for ClientWs {
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

fn from_message(m: Message) -> Option<Frame> {
    Some(match m {
        Message::Text(t) => Frame::Text(t.into()),
        Message::Binary(b) => Frame::Binary(b),
        Message::Ping(b) => Frame::Ping(b),
        Message::Pong(b) => Frame::Pong(b),
        Message::Close(c) => {
            Frame::Close(c.map(|c| CloseFrame { code: CloseCode(c.code.into()), reason: c.reason.to_string() }))
        }
        Message::Frame(_) => return None,
    })
}

fn to_message(f: Frame) -> Message {
    match f {
        // Text is UTF-8 by the `Frame` contract.
        Frame::Text(b) => Utf8Bytes::try_from(b).map_or_else(|_| Message::Binary(Bytes::new()), Message::Text),
        Frame::Binary(b) => Message::Binary(b),
        Frame::Ping(b) => Message::Ping(b),
        Frame::Pong(b) => Message::Pong(b),
        Frame::Close(c) => {
            Message::Close(c.map(|c| WsCloseFrame { code: WsCloseCode::from(c.code.0), reason: c.reason.into() }))
        }
    }
}

fn from_tungstenite(e: tungstenite::Error) -> TransportError {
    use tungstenite::Error as E;
    match e {
        E::Capacity(_) => TransportError::MessageTooBig,
        E::Utf8(_) => TransportError::InvalidUtf8,
        E::Io(io) => TransportError::Io(io),
        E::ConnectionClosed | E::AlreadyClosed => TransportError::Closed,
        other => TransportError::Protocol(other.to_string()),
    }
}

impl Stream for Ws {
    type Item = Result<Frame, TransportError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match &mut *self {
            Ws::Own(ws) => Pin::new(ws).poll_next(cx),
            Ws::Tls(ws) => loop {
                return Poll::Ready(match ready!(Pin::new(&mut **ws).poll_next(cx)) {
                    None => None,
                    Some(Ok(m)) => match from_message(m) {
                        Some(f) => Some(Ok(f)),
                        None => continue,
                    },
                    // The server went away without a close frame: the end.
                    Some(Err(tungstenite::Error::Protocol(
                        tungstenite::error::ProtocolError::ResetWithoutClosingHandshake,
                    ))) => None,
                    Some(Err(e)) => Some(Err(from_tungstenite(e))),
                });
            },
        }
    }
}

impl Sink<Frame> for Ws {
    type Error = TransportError;

    fn poll_ready(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), TransportError>> {
        match &mut *self {
            Ws::Own(ws) => Pin::new(ws).poll_ready(cx),
            Ws::Tls(ws) => Pin::new(&mut **ws).poll_ready(cx).map_err(from_tungstenite),
        }
    }

    fn start_send(mut self: Pin<&mut Self>, frame: Frame) -> Result<(), TransportError> {
        match &mut *self {
            Ws::Own(ws) => Pin::new(ws).start_send(frame),
            Ws::Tls(ws) => Pin::new(&mut **ws).start_send(to_message(frame)).map_err(from_tungstenite),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), TransportError>> {
        match &mut *self {
            Ws::Own(ws) => Pin::new(ws).poll_flush(cx),
            Ws::Tls(ws) => Pin::new(&mut **ws).poll_flush(cx).map_err(from_tungstenite),
        }
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), TransportError>> {
        match &mut *self {
            Ws::Own(ws) => Pin::new(ws).poll_close(cx),
            Ws::Tls(ws) => Pin::new(&mut **ws).poll_close(cx).map_err(from_tungstenite),
        }
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
