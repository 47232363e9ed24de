//! Transports move frames; they know nothing of rooms or envelopes.
//!
//! A [`Transport`] is a duplex of [`Frame`]s split into a sink (written by the
//! session's single writer task) and a stream (read by the session's reader).
//! What the connection's opening saw — peer address, URI, headers, the
//! negotiated subprotocol — travels beside it as a [`Handshake`].
//!
//! Implementations shipped here:
//! - [`ws`] (feature `ws`): WebSocket on tokio-tungstenite, standalone on a
//!   `TcpListener` or (feature `axum`) inside an axum router.
//! - [`sse`] (feature `sse`): Server-Sent Events streams with HTTP `POST`
//!   upstream, from plain hyper or (feature `axum`) an axum router.
//! - [`memory`]: an in-process pair, for tests and benchmarks.
//!
//! A host can write its own: implement [`Transport`] and hand it to
//! [`Hub::connect`](crate::Hub::connect).

pub(crate) mod event_stream;
pub mod memory;
#[cfg(feature = "sse")]
pub mod sse;
#[cfg(feature = "ws")]
pub mod ws;

use crate::protocol::{CloseCode, Format, Version};
use bytes::Bytes;
use futures::{Sink, Stream};
use http::{HeaderMap, Uri};
use std::net::{IpAddr, SocketAddr};

/// One frame on a transport.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A text message. Transports guarantee inbound text is valid UTF-8, and
    /// switchboard only ever sends UTF-8 text.
    Text(Bytes),
    /// A binary message.
    Binary(Bytes),
    /// A transport-level ping (WebSocket ping); transports without native
    /// pings never see one.
    Ping(Bytes),
    /// A transport-level pong.
    Pong(Bytes),
    /// Close, with an optional code and reason.
    Close(Option<CloseFrame>),
}

/// The code and reason of a close frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseFrame {
    /// The close code.
    pub code: CloseCode,
    /// A short human-readable reason (at most 123 bytes on WebSocket).
    pub reason: String,
}

/// Why a transport failed to read or write a frame.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// An inbound message exceeded the configured maximum size (close 1009).
    #[error("message exceeds the maximum size")]
    MessageTooBig,
    /// An inbound text message was not valid UTF-8 (close 1007).
    #[error("invalid UTF-8 in a text message")]
    InvalidUtf8,
    /// An inbound message's data was not what the negotiated encoding
    /// allows, e.g. a `permessage-deflate` message that is not valid
    /// deflate (close 1007).
    #[error("invalid message data: {0}")]
    InvalidData(String),
    /// The peer broke the transport's protocol (close 1002).
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// The connection is closed.
    #[error("connection closed")]
    Closed,
    /// An I/O error.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl TransportError {
    /// The close code the session sends in reply to this error, if the
    /// connection is still writable.
    pub fn close_code(&self) -> Option<CloseCode> {
        match self {
            TransportError::MessageTooBig => Some(CloseCode::TOO_BIG),
            TransportError::InvalidUtf8 | TransportError::InvalidData(_) => Some(CloseCode::INVALID_DATA),
            TransportError::Protocol(_) => Some(CloseCode::PROTOCOL_ERROR),
            TransportError::Closed | TransportError::Io(_) => None,
        }
    }
}

/// A connection that moves [`Frame`]s.
///
/// The session splits it once: the sink goes to the connection's single
/// writer (which feeds many frames and flushes once), the stream to its
/// reader. Both halves must be independent enough that a writer blocked on a
/// slow peer does not stop the reader.
pub trait Transport: Send + 'static {
    /// The writing half.
    type Sink: Sink<Frame, Error = TransportError> + Send + Unpin + 'static;
    /// The reading half. `None` means the peer went away.
    type Stream: Stream<Item = Result<Frame, TransportError>> + Send + Unpin + 'static;

    /// Splits the transport into its two halves.
    fn split(self) -> (Self::Sink, Self::Stream);

    /// What the transport can do: whether the peer answers on the same
    /// connection, whether it has its own ping frames, and the form its
    /// sink takes data frames in. Asked once, before [`Transport::split`].
    /// Default: [`Capabilities::default`] (bidirectional, native pings,
    /// payload-only data frames).
    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
    }

    /// The session will hand the sink data frames in `framing` (one this
    /// transport reported in [`Capabilities::framing`]): from now on its
    /// sink must write [`Frame::Text`] and [`Frame::Binary`] as they come.
    /// Called at most once, before [`Transport::split`]; a transport used
    /// without a session (or with one that does not pre-frame) never gets
    /// this call and keeps taking payloads. Default: does nothing.
    fn use_framing(&mut self, framing: Framing) {
        let _ = framing;
    }

    /// For a transport whose sink takes framed data frames
    /// ([`Transport::use_framing`]) and whose peer negotiated WebSocket
    /// `permessage-deflate` without server context takeover: the size (in
    /// bytes of payload) from which the hub should send data frames
    /// compressed. The hub then compresses each broadcast once, for every
    /// such recipient, into a final frame with RSV1 set (or frames it plain
    /// when it is smaller than this or does not shrink); the sink writes it
    /// as it is. Called once, before [`Transport::split`]. Default: `None`
    /// (never compressed).
    fn compress_above(&self) -> Option<usize> {
        None
    }

    /// How many frames each inbound message came in, when the transport
    /// assembles messages from several frames (WebSocket continuation
    /// fragments), for the rate limit: the session charges a message one
    /// token per frame, so every frame the peer sent counts (control frames
    /// are yielded on their own and cost one each). Called once, before
    /// [`Transport::split`]. Default: `None` (one frame per message).
    fn fragments(&self) -> Option<Fragments> {
        None
    }

    /// A short, fixed name for the kind of transport (`"websocket"`,
    /// `"sse"`, `"memory"`), shown by the admin API
    /// ([`ConnectionInfo::transport`](crate::hub::admin::ConnectionInfo::transport)).
    /// Called once, before [`Transport::split`]. Default: `"custom"`.
    fn name(&self) -> &'static str {
        "custom"
    }
}

/// Frames per inbound message, reported by a transport that assembles
/// messages from several frames ([`Transport::fragments`]). The transport
/// calls [`Fragments::message_read`] for every data message it reads, in
/// order, before its stream yields it; the session takes the counts as it
/// receives the messages. Clones share the counts.
#[derive(Debug, Clone, Default)]
pub struct Fragments {
    inner: std::sync::Arc<FragmentsInner>,
}

#[derive(Debug, Default)]
struct FragmentsInner {
    /// Messages read, and messages taken by the session, so far.
    read: std::sync::atomic::AtomicU64,
    taken: std::sync::atomic::AtomicU64,
    /// `(message number, frames)` of the messages read in more than one
    /// frame and not taken yet: empty (no allocation, no lock taken by the
    /// session) while clients send whole messages. At most the messages the
    /// transport reads ahead of its stream.
    split: parking_lot::Mutex<std::collections::VecDeque<(u64, u32)>>,
    split_len: std::sync::atomic::AtomicUsize,
}

impl Fragments {
    /// Counts for a new connection.
    pub fn new() -> Fragments {
        Fragments::default()
    }

    /// The transport read a whole data message, in `frames` frames.
    pub fn message_read(&self, frames: u32) {
        use std::sync::atomic::Ordering::Relaxed;
        let number = self.inner.read.fetch_add(1, Relaxed);
        if frames > 1 {
            self.inner.split.lock().push_back((number, frames));
            self.inner.split_len.fetch_add(1, Relaxed);
        }
    }

    /// The frames of the next message the stream yields (1 when unknown).
    pub(crate) fn next_message(&self) -> u32 {
        use std::sync::atomic::Ordering::Relaxed;
        let number = self.inner.taken.fetch_add(1, Relaxed);
        if self.inner.split_len.load(Relaxed) == 0 {
            return 1;
        }
        let mut split = self.inner.split.lock();
        match split.front() {
            Some(&(n, frames)) if n == number => {
                split.pop_front();
                self.inner.split_len.fetch_sub(1, Relaxed);
                frames
            }
            _ => 1,
        }
    }
}

/// The header of a final, unmasked WebSocket frame (RFC 6455 §5.2) with
/// `len` bytes of payload: the bytes and how many of them are used (2, 4
/// or 10). Server frames are never masked, so a frame is this header
/// followed by the payload unchanged.
pub(crate) fn ws_header(opcode: u8, len: usize) -> ([u8; 10], u8) {
    let mut head = [0u8; 10];
    head[0] = 0x80 | opcode;
    let n = if len < 126 {
        head[1] = len as u8;
        2
    } else if len <= usize::from(u16::MAX) {
        head[1] = 126;
        head[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        4
    } else {
        head[1] = 127;
        head[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        10
    };
    (head, n)
}

/// WebSocket opcodes of data frames.
pub(crate) const WS_TEXT: u8 = 0x1;
pub(crate) const WS_BINARY: u8 = 0x2;

/// What a [`Transport`] can do ([`Transport::capabilities`]). The session
/// adapts to it: heartbeats, liveness and the form of queued data frames
/// come from here, never from the transport's type.
///
/// ```
/// use switchboard::transport::{Capabilities, Framing};
/// // A one-way stream whose peer cannot answer a ping on it.
/// let caps = Capabilities::default().with_bidirectional(false);
/// assert!(caps.native_ping && !caps.bidirectional && caps.framing.is_none());
/// let ws = Capabilities::default().with_framing(Some(Framing::WebSocket));
/// assert_eq!(ws.framing, Some(Framing::WebSocket));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Capabilities {
    /// The peer writes on this same connection, so it can answer a ping.
    /// `false` for a one-way stream (Server-Sent Events: what the peer sends
    /// comes through other requests): the session then counts a heartbeat
    /// ping the sink flushed as the answer, so a peer that stops reading
    /// still shows as a write that does not finish. Default: `true`.
    pub bidirectional: bool,
    /// The transport has its own ping/pong frames ([`Frame::Ping`]). When
    /// it does not, heartbeats use the protocol's `ping` envelope instead.
    /// Default: `true`.
    pub native_ping: bool,
    /// A form the sink can also take [`Frame::Text`] and [`Frame::Binary`]
    /// in, already framed for the wire by [`Framing::frame`]: the session
    /// then calls [`Transport::use_framing`] and frames each broadcast once
    /// for all its recipients instead of once per recipient in each sink.
    /// A framed data frame may hold **several** frames of the framing back
    /// to back (a run of a room's events copied from the room's log in one
    /// buffer): the sink writes it as it is, and must not read it as one
    /// message. Control frames are never pre-framed. `None`: data frames
    /// always carry the payload only. Default: `None`.
    pub framing: Option<Framing>,
    /// The sink carries [`Frame::Binary`]. `false` for a text-only wire
    /// (Server-Sent Events, whose sessions speak JSON): binary frames are
    /// not written. Default: `true`.
    pub binary: bool,
}

impl Default for Capabilities {
    fn default() -> Capabilities {
        Capabilities { bidirectional: true, native_ping: true, framing: None, binary: true }
    }
}

impl Capabilities {
    /// Sets [`Capabilities::bidirectional`].
    pub fn with_bidirectional(mut self, bidirectional: bool) -> Self {
        self.bidirectional = bidirectional;
        self
    }

    /// Sets [`Capabilities::native_ping`].
    pub fn with_native_ping(mut self, native_ping: bool) -> Self {
        self.native_ping = native_ping;
        self
    }

    /// Sets [`Capabilities::binary`].
    pub fn with_binary(mut self, binary: bool) -> Self {
        self.binary = binary;
        self
    }

    /// Sets [`Capabilities::framing`].
    pub fn with_framing(mut self, framing: Option<Framing>) -> Self {
        self.framing = framing;
        self
    }
}

/// A wire framing the session can apply to data frames before they reach
/// a sink ([`Capabilities::framing`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Framing {
    /// Whole final, unmasked WebSocket frames (RFC 6455 §5.2), each the
    /// 2–10 byte header, then the payload unchanged. Server frames are
    /// never masked, so one framed buffer serves every recipient.
    WebSocket,
    /// A whole `text/event-stream` event (Server-Sent Events): an `event:`
    /// line naming it, then the payload as `data:` lines, then the empty
    /// line that ends it. The session names each event from the envelope
    /// it encoded (`docs/sse.md`: an `event` by its event name, any other
    /// type `$<type>`), frames it once per broadcast, and writes a
    /// stream's own `id:` line as a text frame of its own right before the
    /// event that carries it; the sink appends what it is given.
    EventStream,
}

impl Framing {
    /// A data frame of `payload` (binary or text) in this framing: one
    /// copy, made once per broadcast.
    pub fn frame(self, binary: bool, payload: &[u8]) -> Bytes {
        match self {
            Framing::WebSocket => {
                let (head, n) = ws_header(if binary { WS_BINARY } else { WS_TEXT }, payload.len());
                let mut out = bytes::BytesMut::with_capacity(usize::from(n) + payload.len());
                out.extend_from_slice(&head[..usize::from(n)]);
                out.extend_from_slice(payload);
                out.freeze()
            }
            // An unnamed event (a `message` to `EventSource`).
            Framing::EventStream => event_stream::event(None, None, payload),
        }
    }

    /// A data frame of `payload` in this framing, for a transport whose
    /// framing names its messages ([`Framing::EventStream`]: the event's
    /// name); other framings ignore `name`, as [`Framing::frame`].
    pub fn frame_named(self, binary: bool, name: &str, payload: &[u8]) -> Bytes {
        match self {
            Framing::EventStream => event_stream::event(None, Some(name), payload),
            Framing::WebSocket => self.frame(binary, payload),
        }
    }

    /// A data frame of `payload` compressed with `permessage-deflate`
    /// (RSV1 set, no context kept), in this framing; `None` when
    /// compressing does not make it smaller (or without the `ws` feature).
    pub(crate) fn frame_compressed(self, binary: bool, payload: &[u8]) -> Option<Bytes> {
        match self {
            #[cfg(feature = "ws")]
            Framing::WebSocket => ws::compressed_frame(if binary { WS_BINARY } else { WS_TEXT }, payload),
            #[cfg(not(feature = "ws"))]
            Framing::WebSocket => {
                let _ = (binary, payload);
                None
            }
            Framing::EventStream => None,
        }
    }
}

/// What the opening of a connection saw, before any frame.
#[derive(Debug, Clone, Default)]
pub struct Handshake {
    peer: Option<SocketAddr>,
    uri: Uri,
    headers: HeaderMap,
    subprotocol: Option<String>,
    client_ip: Option<IpAddr>,
}

impl Handshake {
    /// An empty handshake (no peer, URI `/`, no headers, no subprotocol).
    pub fn new() -> Handshake {
        Handshake::default()
    }

    /// Sets the peer address.
    pub fn with_peer(mut self, peer: SocketAddr) -> Self {
        self.peer = Some(peer);
        self
    }

    /// Sets the request URI.
    pub fn with_uri(mut self, uri: Uri) -> Self {
        self.uri = uri;
        self
    }

    /// Sets the request headers.
    pub fn with_headers(mut self, headers: HeaderMap) -> Self {
        self.headers = headers;
        self
    }

    /// Sets the negotiated subprotocol.
    pub fn with_subprotocol(mut self, subprotocol: impl Into<String>) -> Self {
        self.subprotocol = Some(subprotocol.into());
        self
    }

    /// The peer's address, when the transport knows it (axum only knows it
    /// when the app serves with `into_make_service_with_connect_info`).
    pub fn peer_addr(&self) -> Option<SocketAddr> {
        self.peer
    }

    /// The client's address: the peer's, or, when the peer is one of the
    /// hub's [trusted proxies](crate::security::SecurityConfig::trusted_proxies),
    /// the address it forwarded (set by [`Hub::admit`](crate::Hub::admit)).
    pub fn client_ip(&self) -> Option<IpAddr> {
        self.client_ip.or_else(|| self.peer.map(|p| p.ip()))
    }

    pub(crate) fn set_client_ip(&mut self, ip: IpAddr) {
        self.client_ip = Some(ip);
    }

    /// The request URI.
    pub fn uri(&self) -> &Uri {
        &self.uri
    }

    /// The request headers.
    pub fn headers(&self) -> &HeaderMap {
        &self.headers
    }

    /// The negotiated subprotocol, if any.
    pub fn subprotocol(&self) -> Option<&str> {
        self.subprotocol.as_deref()
    }

    /// The envelope format the subprotocol selects (JSON when none).
    pub fn format(&self) -> Format {
        self.subprotocol.as_deref().and_then(Format::from_subprotocol).unwrap_or_default()
    }

    /// The protocol version the subprotocol selects (version 1 when none).
    pub fn version(&self) -> Version {
        self.subprotocol.as_deref().and_then(Version::from_subprotocol).unwrap_or_default()
    }

    /// The first value of query parameter `name`, percent-decoded.
    pub fn query(&self, name: &str) -> Option<String> {
        self.uri.query()?.split('&').find_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k)? == name).then(|| percent_decode(v)).flatten()
        })
    }

    /// The value of cookie `name` from the `Cookie` headers.
    pub fn cookie(&self, name: &str) -> Option<String> {
        self.headers.get_all(http::header::COOKIE).iter().filter_map(|v| v.to_str().ok()).find_map(|line| {
            line.split(';').find_map(|kv| {
                let (k, v) = kv.trim().split_once('=')?;
                (k == name).then(|| v.trim_matches('"').to_owned())
            })
        })
    }

    /// A header's value as text, if present and visible ASCII.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name)?.to_str().ok()
    }
}

pub(crate) fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                // Exactly two hex digits (from_str_radix alone would accept "+1").
                let hex = bytes.get(i + 1..i + 3)?;
                if !hex.iter().all(u8::is_ascii_hexdigit) {
                    return None;
                }
                out.push(u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_and_cookie() {
        let mut headers = HeaderMap::new();
        headers.insert(http::header::COOKIE, "a=1; session=xyz; b=2".parse().unwrap());
        let hs = Handshake::new().with_uri("/ws?name=J%C3%BCrgen+K&x&token=abc".parse().unwrap()).with_headers(headers);
        assert_eq!(hs.query("name").as_deref(), Some("Jürgen K"));
        assert_eq!(hs.query("x").as_deref(), Some(""));
        assert_eq!(hs.query("token").as_deref(), Some("abc"));
        assert_eq!(hs.query("missing"), None);
        let bad = Handshake::new().with_uri("/ws?name=%+1&ok=%41".parse().unwrap());
        assert_eq!(bad.query("name"), None, "a sign is not a hex digit");
        assert_eq!(bad.query("ok").as_deref(), Some("A"));
        assert_eq!(hs.cookie("session").as_deref(), Some("xyz"));
        assert_eq!(hs.cookie("nope"), None);
    }
}
