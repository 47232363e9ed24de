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
        stream.write_all(req.as_bytes()).await?;
        let mut buf = vec![0u8; READ_BUF];
        let mut end = 0;
        let head_len = loop {
            let n = stream.read(&mut buf[end..]).await?;
            if n == 0 {
                return Err(proto("server closed during the handshake"));
            }
            end += n;
            if let Some(p) = find(&buf[..end], b"\r\n\r\n") {
                break p + 4;
            }
            if end == buf.len() {
                return Err(proto("handshake response too large"));
            }
        };
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
            // Need more bytes: move what is left to the front and read.
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            if self.end == self.buf.len() {
                let len = self.buf.len() * 2;
                self.buf.resize(len, 0);
            }
            let n = self.rd.read(&mut self.buf[self.end..]).await?;
            if n == 0 {
                return Ok(None);
            }
            self.end += n;
        }
    }
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

/// Either kind of subscriber connection.
pub enum Client {
    Lean(Box<Lean>),
    Checked(Box<Checked>),
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
        }
    }

    pub async fn text(&mut self, payload: &[u8]) -> io::Result<()> {
        match self {
            Client::Lean(c) => c.wr.text(payload).await,
            Client::Checked(c) => c.text(payload).await,
        }
    }

    pub async fn binary(&mut self, payload: &[u8]) -> io::Result<()> {
        match self {
            Client::Lean(c) => c.wr.send(OP_BINARY, payload).await,
            Client::Checked(c) => c.binary(payload).await,
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
