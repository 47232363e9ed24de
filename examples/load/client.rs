//! The load generator's WebSocket clients.
//!
//! - [`Lean`]: a minimal client for the thousands of subscribers: the
//!   opening handshake written by hand (the `Sec-WebSocket-Accept` answer is
//!   checked), server frames parsed in place from one read buffer per
//!   connection (FIN, RSV, opcode, mask bit, length encoding and control
//!   frame sizes checked; fragmented messages are refused, none of the
//!   servers sends any), pings answered with masked pongs, a close answered.
//!   It costs a fraction of a full client's CPU, which matters because it
//!   shares the machine with the server.
//! - [`Checked`]: a full tokio-tungstenite client, used for a few
//!   subscribers of every run, so that every server's frames are also
//!   validated by a complete RFC 6455 implementation (UTF-8 included).
//! - [`Sse`]: a minimal HTTP/1.1 Server-Sent Events client for the SSE
//!   kinds: a `GET` written by hand, the response head checked (`200`,
//!   `text/event-stream`), the chunked body decoded strictly (hex sizes, the
//!   CRLF after every chunk, the final chunk) and split into events at each
//!   blank line (`\n\n`; both SSE servers write LF line ends only).

use futures::{SinkExt, StreamExt};
use std::io;
use std::net::{IpAddr, SocketAddr};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::handshake::client::generate_key;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// A TCP connection to `addr`, from `source` (any port) when given.
pub async fn tcp(addr: SocketAddr, source: Option<IpAddr>) -> io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    if let Some(ip) = source {
        socket.bind(SocketAddr::new(ip, 0))?;
    }
    let stream = socket.connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

fn proto(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// The reading half of a lean client.
pub struct LeanReader {
    rd: OwnedReadHalf,
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

/// The writing half of a lean client (client frames are masked).
pub struct LeanWriter {
    wr: OwnedWriteHalf,
    out: Vec<u8>,
    mask_state: u32,
}

/// Writes a request head and reads the response head into a new read
/// buffer: `(buffer, head length, bytes read)`; what follows the head is
/// the start of the body (or of the frames).
async fn request(stream: &mut TcpStream, req: &str) -> io::Result<(Vec<u8>, usize, usize)> {
    stream.write_all(req.as_bytes()).await?;
    let mut buf = vec![0u8; READ_BUF];
    let mut end = 0;
    loop {
        let n = stream.read(&mut buf[end..]).await?;
        if n == 0 {
            return Err(proto("server closed before the response head"));
        }
        end += n;
        if let Some(p) = find(&buf[..end], b"\r\n\r\n") {
            return Ok((buf, p + 4, end));
        }
        if end == buf.len() {
            return Err(proto("response head too large"));
        }
    }
}

/// A lean client connection.
pub struct Lean {
    pub rd: LeanReader,
    pub wr: LeanWriter,
}

/// Read buffer per lean connection: large enough for a coalesced write of
/// dozens of ~150-byte frames in one `read`.
const READ_BUF: usize = 16 * 1024;

impl Lean {
    /// Opens the WebSocket on a connected socket, offering `subprotocol`.
    pub async fn handshake(
        mut stream: TcpStream,
        addr: SocketAddr,
        seed: u32,
        subprotocol: Option<&str>,
    ) -> io::Result<Lean> {
        let key = generate_key();
        let offer = subprotocol.map_or(String::new(), |p| format!("Sec-WebSocket-Protocol: {p}\r\n"));
        let req = format!(
            "GET / HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{offer}\r\n"
        );
        let (buf, head_len, end) = request(&mut stream, &req).await?;
        let head = std::str::from_utf8(&buf[..head_len]).map_err(|_| proto("non-UTF-8 response head"))?;
        if !head.starts_with("HTTP/1.1 101") {
            return Err(proto(format!("upgrade refused: {}", head.lines().next().unwrap_or(""))));
        }
        let accept = derive_accept_key(key.as_bytes());
        let accepted = head.lines().any(|l| {
            l.split_once(':').is_some_and(|(k, v)| k.eq_ignore_ascii_case("sec-websocket-accept") && v.trim() == accept)
        });
        if !accepted {
            return Err(proto("wrong or missing Sec-WebSocket-Accept"));
        }
        if let Some(p) = subprotocol {
            let selected = head.lines().any(|l| {
                l.split_once(':')
                    .is_some_and(|(k, v)| k.eq_ignore_ascii_case("sec-websocket-protocol") && v.trim() == p)
            });
            if !selected {
                return Err(proto(format!("the server did not select {p}")));
            }
        }
        let (rd, wr) = stream.into_split();
        Ok(Lean {
            rd: LeanReader { rd, buf, start: head_len, end },
            wr: LeanWriter { wr, out: Vec::with_capacity(256), mask_state: seed | 1 },
        })
    }

    /// The next data message (text or binary), answering pings and a close on
    /// the way; `None` when the connection ended. `f` sees the payload.
    pub async fn next_data<R>(&mut self, f: impl FnOnce(&[u8]) -> R) -> io::Result<Option<R>> {
        loop {
            let (op, range) = match self.rd.frame().await? {
                Some(x) => x,
                None => return Ok(None),
            };
            match op {
                OP_TEXT | OP_BINARY => return Ok(Some(f(&self.rd.buf[range]))),
                OP_PING => {
                    let payload = self.rd.buf[range].to_vec();
                    self.wr.send(OP_PONG, &payload).await?;
                }
                OP_CLOSE => {
                    let code = self.rd.buf[range].get(..2).map(<[u8]>::to_vec).unwrap_or_default();
                    let _ = self.wr.send(OP_CLOSE, &code).await;
                    return Ok(None);
                }
                _ => {}
            }
        }
    }
}

impl LeanReader {
    /// A payload returned by [`LeanReader::frame`].
    pub fn data(&self, r: std::ops::Range<usize>) -> &[u8] {
        &self.buf[r]
    }

    /// Reads the next frame; returns its opcode and where its payload is in
    /// the buffer (valid until the next call). `None` at end of stream.
    pub async fn frame(&mut self) -> io::Result<Option<(u8, std::ops::Range<usize>)>> {
        loop {
            if let Some((op, hdr, len)) = parse_header(&self.buf[self.start..self.end])? {
                let total = hdr + len;
                if self.end - self.start >= total {
                    let range = self.start + hdr..self.start + total;
                    self.start += total;
                    return Ok(Some((op, range)));
                }
                if total > self.buf.len() {
                    self.buf.resize(total.next_power_of_two(), 0);
                }
            }
            // Need more bytes.
            if read_more(&mut self.rd, &mut self.buf, &mut self.start, &mut self.end).await? == 0 {
                return Ok(None);
            }
        }
    }
}

/// Moves what is left of `buf[*start..*end]` to the front (growing the
/// buffer when it is full) and reads more after it: the bytes read, 0 at
/// the end of the stream.
async fn read_more(
    rd: &mut (impl tokio::io::AsyncRead + Unpin),
    buf: &mut Vec<u8>,
    start: &mut usize,
    end: &mut usize,
) -> io::Result<usize> {
    if *start > 0 {
        buf.copy_within(*start..*end, 0);
        *end -= *start;
        *start = 0;
    }
    if *end == buf.len() {
        buf.resize(buf.len() * 2, 0);
    }
    let n = rd.read(&mut buf[*end..]).await?;
    *end += n;
    Ok(n)
}

/// Parses a server frame header: `(opcode, header length, payload length)`,
/// `None` when more bytes are needed; an error for anything a server must
/// not send.
fn parse_header(b: &[u8]) -> io::Result<Option<(u8, usize, usize)>> {
    if b.len() < 2 {
        return Ok(None);
    }
    let (b0, b1) = (b[0], b[1]);
    if b0 & 0x70 != 0 {
        return Err(proto("reserved bits set"));
    }
    let op = b0 & 0x0F;
    if b0 & 0x80 == 0 {
        return Err(proto("fragmented message (not expected from these servers)"));
    }
    if !matches!(op, OP_TEXT | OP_BINARY | OP_CLOSE | OP_PING | OP_PONG) {
        return Err(proto(format!("bad opcode {op}")));
    }
    if b1 & 0x80 != 0 {
        return Err(proto("masked server frame"));
    }
    let (hdr, len) = match b1 & 0x7F {
        126 => {
            if b.len() < 4 {
                return Ok(None);
            }
            let len = u16::from_be_bytes([b[2], b[3]]) as usize;
            if len < 126 {
                return Err(proto("non-minimal length"));
            }
            (4, len)
        }
        127 => {
            if b.len() < 10 {
                return Ok(None);
            }
            let mut l = [0u8; 8];
            l.copy_from_slice(&b[2..10]);
            let len = u64::from_be_bytes(l);
            if len <= u16::MAX as u64 || len >> 63 != 0 {
                return Err(proto("bad 64-bit length"));
            }
            (10, len as usize)
        }
        n => (2, n as usize),
    };
    if op >= 0x8 && len > 125 {
        return Err(proto("control frame too long"));
    }
    Ok(Some((op, hdr, len)))
}

impl LeanWriter {
    /// Sends one masked frame.
    pub async fn send(&mut self, opcode: u8, payload: &[u8]) -> io::Result<()> {
        // xorshift32: masking keys need not be cryptographic for a load test
        // against our own servers, only present.
        let mut x = self.mask_state;
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        self.mask_state = x;
        let mask = x.to_be_bytes();
        let len = payload.len();
        self.out.clear();
        self.out.push(0x80 | opcode);
        if len < 126 {
            self.out.push(0x80 | len as u8);
        } else if len <= u16::MAX as usize {
            self.out.push(0x80 | 126);
            self.out.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            self.out.push(0x80 | 127);
            self.out.extend_from_slice(&(len as u64).to_be_bytes());
        }
        self.out.extend_from_slice(&mask);
        self.out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i & 3]));
        self.wr.write_all(&self.out).await
    }

    pub async fn text(&mut self, payload: &[u8]) -> io::Result<()> {
        self.send(OP_TEXT, payload).await
    }
}

/// A switchboard `join` of `room` with ref 1, as a MessagePack map.
pub fn msgpack_join(room: &str) -> Vec<u8> {
    let mut out = vec![0x83, 0xa4];
    out.extend_from_slice(b"type\xa4join\xa3ref\x01\xa4room");
    out.push(0xa0 | room.len() as u8);
    out.extend_from_slice(room.as_bytes());
    out
}

/// The MessagePack unsigned integer right after `key` (an encoded key,
/// e.g. `\xa3seq`) in `hay`.
pub fn msgpack_uint_after(hay: &[u8], key: &[u8]) -> Option<u64> {
    let at = find(hay, key)? + key.len();
    let rest = hay.get(at..)?;
    let be = |n: usize| rest.get(1..1 + n).map(|b| b.iter().fold(0u64, |acc, x| (acc << 8) | u64::from(*x)));
    match *rest.first()? {
        m @ 0x00..=0x7f => Some(u64::from(m)),
        0xcc => be(1),
        0xcd => be(2),
        0xce => be(4),
        0xcf => be(8),
        _ => None,
    }
}

/// A full tokio-tungstenite client.
pub struct Checked {
    ws: WebSocketStream<TcpStream>,
}

impl Checked {
    pub async fn handshake(stream: TcpStream, addr: SocketAddr, subprotocol: Option<&str>) -> io::Result<Checked> {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let config = WebSocketConfig::default().read_buffer_size(16 * 1024);
        let mut req = format!("ws://{addr}/").into_client_request().map_err(|e| proto(e.to_string()))?;
        if let Some(p) = subprotocol {
            req.headers_mut().insert("sec-websocket-protocol", p.parse().map_err(|_| proto("bad subprotocol"))?);
        }
        let (ws, _) = tokio_tungstenite::client_async_with_config(req, stream, Some(config))
            .await
            .map_err(|e| proto(e.to_string()))?;
        Ok(Checked { ws })
    }

    /// The next data message; tungstenite answers pings by itself.
    pub async fn next_data<R>(&mut self, f: impl FnOnce(&[u8]) -> R) -> io::Result<Option<R>> {
        loop {
            match self.ws.next().await {
                None | Some(Ok(Message::Close(_))) => return Ok(None),
                Some(Ok(Message::Text(t))) => return Ok(Some(f(t.as_bytes()))),
                Some(Ok(Message::Binary(b))) => return Ok(Some(f(&b))),
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(proto(format!("tungstenite: {e}"))),
            }
        }
    }

    pub async fn text(&mut self, payload: &[u8]) -> io::Result<()> {
        let text = std::str::from_utf8(payload).map_err(|_| proto("not UTF-8"))?;
        self.ws.send(Message::text(text)).await.map_err(|e| proto(e.to_string()))
    }

    pub async fn binary(&mut self, payload: &[u8]) -> io::Result<()> {
        self.ws.send(Message::binary(payload.to_vec())).await.map_err(|e| proto(e.to_string()))
    }
}

/// A Server-Sent Events subscriber.
pub struct Sse {
    stream: TcpStream,
    /// Bytes as read from the socket (`raw[rs..re]` not decoded yet).
    raw: Vec<u8>,
    rs: usize,
    re: usize,
    chunked: bool,
    /// Bytes of the current chunk not decoded yet.
    chunk_left: usize,
    /// A chunk's data was read; its CRLF comes next.
    crlf_due: bool,
    /// The body ended (final chunk, or the connection closed).
    ended: bool,
    /// The decoded body (`body[bs..]` not handed out yet).
    body: Vec<u8>,
    bs: usize,
    /// Bytes read from the socket after the response head.
    wire: u64,
}

impl Sse {
    /// Sends `GET path` on a connected socket and reads the response head.
    pub async fn open(mut stream: TcpStream, addr: SocketAddr, path: &str) -> io::Result<Sse> {
        let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n\r\n");
        let (raw, head_len, end) = request(&mut stream, &req).await?;
        let head = std::str::from_utf8(&raw[..head_len]).map_err(|_| proto("non-UTF-8 response head"))?;
        if !head.starts_with("HTTP/1.1 200") {
            return Err(proto(format!("stream refused: {}", head.lines().next().unwrap_or(""))));
        }
        let header = |name: &str| {
            head.lines().find_map(|l| {
                l.split_once(':')
                    .filter(|(k, _)| k.eq_ignore_ascii_case(name))
                    .map(|(_, v)| v.trim().to_ascii_lowercase())
            })
        };
        if !header("content-type").is_some_and(|t| t.starts_with("text/event-stream")) {
            return Err(proto("not text/event-stream"));
        }
        let chunked = header("transfer-encoding").is_some_and(|t| t == "chunked");
        if !chunked && header("content-length").is_some() {
            return Err(proto("an event stream with a content-length"));
        }
        Ok(Sse {
            stream,
            wire: (end - head_len) as u64,
            raw,
            rs: head_len,
            re: end,
            chunked,
            chunk_left: 0,
            crlf_due: false,
            ended: false,
            body: Vec::with_capacity(1024),
            bs: 0,
        })
    }

    /// Bytes read after the response head (chunk framing included).
    pub fn wire_bytes(&self) -> u64 {
        self.wire
    }

    /// The next event (or comment) block, with its terminating blank line;
    /// `None` when the stream ended. `f` sees the block.
    pub async fn next_event<R>(&mut self, f: impl FnOnce(&[u8]) -> R) -> io::Result<Option<R>> {
        loop {
            if let Some(p) = find(&self.body[self.bs..], b"\n\n") {
                let block = self.bs..self.bs + p + 2;
                self.bs = block.end;
                return Ok(Some(f(&self.body[block])));
            }
            if self.ended {
                return Ok(None);
            }
            // Only a partial event is left: move it to the front.
            self.body.drain(..self.bs);
            self.bs = 0;
            self.fill().await?;
        }
    }

    /// Decodes at least one more body byte, or ends the body.
    async fn fill(&mut self) -> io::Result<()> {
        loop {
            let before = self.body.len();
            self.decode()?;
            if self.body.len() > before || self.ended {
                return Ok(());
            }
            let n = read_more(&mut self.stream, &mut self.raw, &mut self.rs, &mut self.re).await?;
            if n == 0 {
                self.ended = true;
                return Ok(());
            }
            self.wire += n as u64;
        }
    }

    /// Moves what `raw` holds into `body`, undoing the chunked encoding.
    fn decode(&mut self) -> io::Result<()> {
        if !self.chunked {
            self.body.extend_from_slice(&self.raw[self.rs..self.re]);
            self.rs = self.re;
            return Ok(());
        }
        loop {
            if self.chunk_left > 0 {
                let take = self.chunk_left.min(self.re - self.rs);
                if take == 0 {
                    return Ok(());
                }
                self.body.extend_from_slice(&self.raw[self.rs..self.rs + take]);
                self.rs += take;
                self.chunk_left -= take;
                self.crlf_due = self.chunk_left == 0;
                continue;
            }
            if self.crlf_due {
                if self.re - self.rs < 2 {
                    return Ok(());
                }
                if &self.raw[self.rs..self.rs + 2] != b"\r\n" {
                    return Err(proto("chunk data not followed by CRLF"));
                }
                self.rs += 2;
                self.crlf_due = false;
            }
            let Some(p) = find(&self.raw[self.rs..self.re], b"\r\n") else {
                if self.re - self.rs > 64 {
                    return Err(proto("chunk size line too long"));
                }
                return Ok(());
            };
            let line = &self.raw[self.rs..self.rs + p];
            let hex = line.split(|b| *b == b';').next().unwrap_or_default();
            let size = std::str::from_utf8(hex)
                .ok()
                .filter(|h| !h.is_empty() && h.len() <= 8)
                .and_then(|h| usize::from_str_radix(h, 16).ok())
                .ok_or_else(|| proto(format!("bad chunk size line {:?}", String::from_utf8_lossy(line))))?;
            self.rs += p + 2;
            if size == 0 {
                self.ended = true;
                return Ok(());
            }
            self.chunk_left = size;
        }
    }
}

/// Either kind of subscriber connection.
pub enum Client {
    Lean(Box<Lean>),
    Checked(Box<Checked>),
    Sse(Box<Sse>),
}

impl Client {
    pub async fn connect(
        addr: SocketAddr,
        source: Option<IpAddr>,
        checked: bool,
        seed: u32,
        subprotocol: Option<&str>,
    ) -> io::Result<Client> {
        let stream = tcp(addr, source).await?;
        Ok(if checked {
            Client::Checked(Box::new(Checked::handshake(stream, addr, subprotocol).await?))
        } else {
            Client::Lean(Box::new(Lean::handshake(stream, addr, seed, subprotocol).await?))
        })
    }

    pub async fn next_data<R>(&mut self, f: impl FnOnce(&[u8]) -> R) -> io::Result<Option<R>> {
        match self {
            Client::Lean(c) => c.next_data(f).await,
            Client::Checked(c) => c.next_data(f).await,
            Client::Sse(c) => c.next_event(f).await,
        }
    }

    /// An SSE subscriber's [`Sse::wire_bytes`].
    pub fn wire_bytes(&self) -> Option<u64> {
        match self {
            Client::Sse(c) => Some(c.wire_bytes()),
            _ => None,
        }
    }

    pub async fn text(&mut self, payload: &[u8]) -> io::Result<()> {
        match self {
            Client::Lean(c) => c.wr.text(payload).await,
            Client::Checked(c) => c.text(payload).await,
            Client::Sse(_) => Err(proto("an SSE subscriber sends nothing")),
        }
    }

    pub async fn binary(&mut self, payload: &[u8]) -> io::Result<()> {
        match self {
            Client::Lean(c) => c.wr.send(OP_BINARY, payload).await,
            Client::Checked(c) => c.binary(payload).await,
            Client::Sse(_) => Err(proto("an SSE subscriber sends nothing")),
        }
    }
}

/// Position of `needle` in `hay` (memchr's SIMD substring search: a naive
/// window-by-window compare cost the generator over half its CPU on
/// switchboard's envelopes, whose `data` comes after ~50 bytes of header,
/// and so skewed every ratio against switchboard).
pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    memchr::memmem::find(hay, needle)
}

/// The unsigned integer right after `key` (e.g. `"seq":`) in `hay`.
pub fn number_after(hay: &[u8], key: &[u8]) -> Option<u64> {
    let at = find(hay, key)? + key.len();
    let digits = hay[at..].iter().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 {
        return None;
    }
    hay[at..at + digits].iter().try_fold(0u64, |n, d| n.checked_mul(10)?.checked_add(u64::from(d - b'0')))
}
