//! permessage-deflate (RFC 7692) end to end, over real loopback sockets
//! with a raw WebSocket client written here (tungstenite cannot read
//! compressed frames): negotiation on the standalone listener and in axum,
//! compressed client messages (whole and fragmented), compressed broadcasts
//! shared by every member that negotiated while others get plain frames,
//! the threshold, and the bad inputs — RSV1 on a control frame, on a
//! continuation, without the extension, a deflate bomb, a corrupt stream —
//! each closing with its documented code while other connections go on.

mod support;

use flate2::{Compress, Decompress, FlushCompress, FlushDecompress};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use support::*;
use switchboard::transport::ws::{Compression, WsConfig};
use switchboard::{hub::HubStats, Call, Hub, HubConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const OFFER: &str = "permessage-deflate; client_max_window_bits";
const AGREED: &str = "permessage-deflate; server_no_context_takeover; client_no_context_takeover";

/// A raw WebSocket client: sends masked frames as given, reads frames as
/// they come (RSV1 and all).
struct Raw {
    tcp: TcpStream,
    buf: Vec<u8>,
    /// The `Sec-WebSocket-Extensions` response header.
    extensions: Option<String>,
}

/// One frame read: its first byte (FIN, RSV1, opcode) and payload.
struct Got {
    b0: u8,
    payload: Vec<u8>,
}

impl Got {
    fn rsv1(&self) -> bool {
        self.b0 & 0x40 != 0
    }
    fn opcode(&self) -> u8 {
        self.b0 & 0x0F
    }
}

fn deflate(data: &[u8]) -> Vec<u8> {
    let mut c = Compress::new(flate2::Compression::default(), false);
    let mut out = Vec::with_capacity(data.len() + 64);
    c.compress_vec(data, &mut out, FlushCompress::Sync).unwrap();
    assert_eq!(c.total_in() as usize, data.len());
    assert!(out.ends_with(&[0, 0, 0xff, 0xff]));
    out.truncate(out.len() - 4);
    out
}

fn inflate(data: &[u8]) -> Vec<u8> {
    let mut d = Decompress::new(false);
    let mut input = data.to_vec();
    input.extend_from_slice(&[0, 0, 0xff, 0xff]);
    let mut out = Vec::with_capacity(1 << 20);
    d.decompress_vec(&input, &mut out, FlushDecompress::Sync).unwrap();
    out
}

fn frame(fin: bool, rsv1: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![u8::from(fin) << 7 | u8::from(rsv1) << 6 | opcode];
    match payload.len() {
        n if n < 126 => f.push(0x80 | n as u8),
        n if n <= 0xFFFF => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(0x80 | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    let key = [0xA1, 0xB2, 0xC3, 0xD4];
    f.extend_from_slice(&key);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    f
}

impl Raw {
    async fn open(addr: SocketAddr, path: &str, offer: Option<&str>) -> Raw {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        let mut req = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        );
        if let Some(o) = offer {
            req.push_str(&format!("Sec-WebSocket-Extensions: {o}\r\n"));
        }
        req.push_str("\r\n");
        tcp.write_all(req.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 1024];
            let n = tokio::time::timeout(WAIT, tcp.read(&mut chunk)).await.expect("response head").unwrap();
            assert!(n > 0, "closed during the handshake");
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8(buf[..end].to_vec()).unwrap();
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        let extensions = head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("sec-websocket-extensions").then(|| v.trim().to_owned())
        });
        let mut raw = Raw { tcp, buf: buf[end..].to_vec(), extensions };
        let hello = raw.json().await;
        assert_eq!(hello["type"], "hello");
        raw
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.tcp.write_all(bytes).await.unwrap();
    }

    /// A text message, compressed or not, in one frame.
    async fn text(&mut self, v: &Value, compressed: bool) {
        let s = v.to_string();
        let payload = if compressed { deflate(s.as_bytes()) } else { s.into_bytes() };
        self.send(&frame(true, compressed, 0x1, &payload)).await;
    }

    async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 16 * 1024];
        let n = tokio::time::timeout(WAIT, self.tcp.read(&mut chunk)).await.expect("timed out reading").unwrap_or(0);
        self.buf.extend_from_slice(&chunk[..n]);
        n > 0
    }

    /// The next frame; `None` when the socket ends.
    async fn frame(&mut self) -> Option<Got> {
        loop {
            if self.buf.len() >= 2 {
                assert_eq!(self.buf[1] & 0x80, 0, "server frames are not masked");
                let (len, at) = match self.buf[1] {
                    126 if self.buf.len() >= 4 => (u16::from_be_bytes([self.buf[2], self.buf[3]]) as usize, 4),
                    127 if self.buf.len() >= 10 => {
                        (u64::from_be_bytes(self.buf[2..10].try_into().unwrap()) as usize, 10)
                    }
                    126 | 127 => (usize::MAX, 0),
                    n => (usize::from(n), 2),
                };
                if len != usize::MAX && self.buf.len() >= at + len {
                    let got = Got { b0: self.buf[0], payload: self.buf[at..at + len].to_vec() };
                    self.buf.drain(..at + len);
                    return Some(got);
                }
            }
            if !self.fill().await {
                return None;
            }
        }
    }

    /// The next data message as JSON, skipping pings, and whether it came
    /// compressed.
    async fn message(&mut self) -> (bool, Value) {
        loop {
            let f = self.frame().await.expect("a message, not the end");
            assert_eq!(f.b0 & 0x80, 0x80, "the server sends whole messages");
            match f.opcode() {
                0x9 | 0xA => continue,
                0x1 => {
                    let compressed = f.rsv1();
                    let data = if compressed { inflate(&f.payload) } else { f.payload };
                    return (compressed, serde_json::from_slice(&data).unwrap());
                }
                op => panic!("unexpected opcode {op}"),
            }
        }
    }

    async fn json(&mut self) -> Value {
        self.message().await.1
    }

    /// Waits for the reply to `r`, skipping other messages.
    async fn reply(&mut self, r: u64) -> Value {
        loop {
            let v = self.json().await;
            if v["ref"] == r {
                return v;
            }
        }
    }

    /// Reads until the close frame; returns its code.
    async fn close_code(&mut self) -> u16 {
        loop {
            let f = self.frame().await.expect("a close frame before the end");
            if f.opcode() == 0x8 {
                return u16::from_be_bytes([f.payload[0], f.payload[1]]);
            }
        }
    }
}

fn hub() -> Hub {
    Hub::builder()
        .config(HubConfig::default().max_message_size(64 * 1024))
        .on("echo", |_: Call, v: Value| async move { Ok(v) })
        .build()
}

#[tokio::test]
async fn negotiated_on_the_listener_and_in_axum_with_no_context_takeover() {
    let hub = hub();
    let addr = serve(&hub).await;
    let raw = Raw::open(addr, "/", Some(OFFER)).await;
    assert_eq!(raw.extensions.as_deref(), Some(AGREED));
    // An offer we cannot honour (a smaller server window) is declined, the
    // next one taken; a foreign extension alone gets none.
    let raw = Raw::open(addr, "/", Some("permessage-deflate; server_max_window_bits=10, permessage-deflate")).await;
    assert_eq!(raw.extensions.as_deref(), Some(AGREED));
    let raw = Raw::open(addr, "/", Some("permessage-deflate; server_max_window_bits=10")).await;
    assert_eq!(raw.extensions, None);
    let raw = Raw::open(addr, "/", Some("x-webkit-deflate-frame")).await;
    assert_eq!(raw.extensions, None);
    let raw = Raw::open(addr, "/", None).await;
    assert_eq!(raw.extensions, None);
    let axum = serve_axum(&hub).await;
    let raw = Raw::open(axum, "/ws", Some(OFFER)).await;
    assert_eq!(raw.extensions.as_deref(), Some(AGREED));
    // Off: never negotiated.
    let off = serve_with(&hub, WsConfig::default().compression(Compression::Off)).await;
    let raw = Raw::open(off, "/", Some(OFFER)).await;
    assert_eq!(raw.extensions, None);
}

#[tokio::test]
async fn compressed_client_messages_whole_and_fragmented_are_read() {
    let hub = hub();
    for (addr, path) in [(serve(&hub).await, "/"), (serve_axum(&hub).await, "/ws")] {
        let mut c = Raw::open(addr, path, Some(OFFER)).await;
        let text = "héllo ".repeat(2000);
        c.text(&json!({"type": "call", "ref": 1, "event": "echo", "data": text}), true).await;
        let v = c.reply(1).await;
        assert_eq!(v["data"], text.as_str(), "{v}");
        // In three fragments (the deflate stream cut anywhere), a ping between.
        let z =
            deflate(json!({"type": "call", "ref": 2, "event": "echo", "data": "fragmented"}).to_string().as_bytes());
        let (a, rest) = z.split_at(3);
        let (b, d) = rest.split_at(rest.len() / 2);
        let mut s = frame(false, true, 0x1, a);
        s.extend(frame(true, false, 0x9, b"ping"));
        s.extend(frame(false, false, 0x0, b));
        s.extend(frame(true, false, 0x0, d));
        c.send(&s).await;
        assert_eq!(c.reply(2).await["data"], "fragmented");
        // Uncompressed messages still work on the same connection.
        c.text(&json!({"type": "call", "ref": 3, "event": "echo", "data": 7}), false).await;
        assert_eq!(c.reply(3).await["data"], 7);
    }
}

/// A member of `room` on a plain (tungstenite) connection, to show that a
/// bad input on another connection leaves it untouched.
async fn bystander(addr: SocketAddr, room: &str) -> Client {
    let mut c = connect(addr).await;
    c.join_ok(room).await;
    c
}

async fn still_served(hub: &Hub, c: &mut Client, room: &str, n: u64) {
    hub.publish(room, "tick", &n).await.unwrap();
    let v = c.event().await;
    assert_eq!(v["data"], n, "{v}");
}

#[tokio::test]
async fn bad_compressed_input_closes_with_its_code_and_others_go_on() {
    let hub = hub();
    let addr = serve(&hub).await;
    let mut other = bystander(addr, "r").await;
    let small = deflate(b"{\"type\":\"ping\"}");
    // RSV1 on a control frame: 1002.
    let mut c = Raw::open(addr, "/", Some(OFFER)).await;
    c.send(&frame(true, true, 0x9, b"")).await;
    assert_eq!(c.close_code().await, 1002);
    still_served(&hub, &mut other, "r", 1).await;
    // RSV1 on a continuation frame: 1002.
    let mut c = Raw::open(addr, "/", Some(OFFER)).await;
    let mut s = frame(false, true, 0x1, &small[..2]);
    s.extend(frame(true, true, 0x0, &small[2..]));
    c.send(&s).await;
    assert_eq!(c.close_code().await, 1002);
    still_served(&hub, &mut other, "r", 2).await;
    // RSV1 without the extension negotiated: 1002.
    let mut c = Raw::open(addr, "/", None).await;
    c.send(&frame(true, true, 0x1, &small)).await;
    assert_eq!(c.close_code().await, 1002);
    still_served(&hub, &mut other, "r", 3).await;
    // A bomb: 64 MiB of spaces in a 64 KiB-limited hub, sent as some 64
    // KiB of deflate. Closed 1009 once 64 KiB + 1 byte came out.
    let mut c = Raw::open(addr, "/", Some(OFFER)).await;
    let bomb = deflate(&vec![b' '; 64 << 20]);
    assert!(bomb.len() < 64 * 1024, "{}", bomb.len());
    c.send(&frame(true, true, 0x1, &bomb)).await;
    assert_eq!(c.close_code().await, 1009);
    still_served(&hub, &mut other, "r", 4).await;
    // A corrupt stream (reserved block type): 1007.
    let mut c = Raw::open(addr, "/", Some(OFFER)).await;
    c.send(&frame(true, true, 0x1, &[0xff, 0xff, 0xff, 0x00])).await;
    assert_eq!(c.close_code().await, 1007);
    // Valid deflate of invalid UTF-8 in a text message: 1007.
    let mut c = Raw::open(addr, "/", Some(OFFER)).await;
    c.send(&frame(true, true, 0x1, &deflate(&[0xC0, 0x80, b'a']))).await;
    assert_eq!(c.close_code().await, 1007);
    still_served(&hub, &mut other, "r", 5).await;
    drop(other);
    eventually("hub empty", || hub.stats() == HubStats::default()).await;
}

#[tokio::test]
async fn a_message_over_the_limit_once_inflated_is_refused_and_one_at_it_is_read() {
    let hub = hub();
    let addr = serve(&hub).await;
    let max = 64 * 1024;
    let envelope = |len: usize| {
        let head = r#"{"type":"call","ref":1,"event":"echo","data":""#;
        let data = "a".repeat(len - head.len() - 2);
        format!("{head}{data}\"}}")
    };
    let mut c = Raw::open(addr, "/", Some(OFFER)).await;
    let at = envelope(max);
    assert_eq!(at.len(), max);
    c.send(&frame(true, true, 0x1, &deflate(at.as_bytes()))).await;
    assert_eq!(c.reply(1).await["type"], "reply");
    let mut c = Raw::open(addr, "/", Some(OFFER)).await;
    c.send(&frame(true, true, 0x1, &deflate(envelope(max + 1).as_bytes()))).await;
    assert_eq!(c.close_code().await, 1009);
}

#[tokio::test]
async fn a_broadcast_is_compressed_once_for_members_that_negotiated_and_plain_for_others() {
    let hub = hub();
    for (addr, path) in [(serve(&hub).await, "/"), (serve_axum(&hub).await, "/ws")] {
        let mut a = Raw::open(addr, path, Some(OFFER)).await;
        let mut b = Raw::open(addr, path, Some(OFFER)).await;
        let mut plain = Raw::open(addr, path, None).await;
        for (i, c) in [&mut a, &mut b, &mut plain].into_iter().enumerate() {
            c.text(&json!({"type": "join", "ref": i, "room": "lobby"}), false).await;
            assert_eq!(c.reply(i as u64).await["type"], "reply");
        }
        // Over the 256-byte threshold: compressed, the same bytes for both.
        let line = json!({"user": "ann", "text": "hello everyone, ".repeat(30)});
        hub.publish("lobby", "message", &line).await.unwrap();
        let fa = a.frame().await.unwrap();
        let fb = b.frame().await.unwrap();
        let fp = plain.frame().await.unwrap();
        assert!(fa.rsv1() && fb.rsv1(), "compressed for members that negotiated");
        assert_eq!(fa.payload, fb.payload);
        assert!(!fp.rsv1(), "plain for the member that did not");
        assert_eq!(inflate(&fa.payload), fp.payload);
        assert!(fa.payload.len() * 3 < fp.payload.len(), "{} vs {}", fa.payload.len(), fp.payload.len());
        let v: Value = serde_json::from_slice(&fp.payload).unwrap();
        assert_eq!(v["data"], line);
        // Under it: plain (RSV1 clear) for everyone.
        hub.publish("lobby", "message", &json!({"text": "hi"})).await.unwrap();
        for c in [&mut a, &mut b, &mut plain] {
            let (compressed, v) = c.message().await;
            assert!(!compressed);
            assert_eq!(v["data"]["text"], "hi");
        }
        // A reply to one connection is compressed for it too.
        a.text(&json!({"type": "call", "ref": 9, "event": "echo", "data": "x".repeat(1000)}), true).await;
        let f = a.frame().await.unwrap();
        assert!(f.rsv1());
        let v: Value = serde_json::from_slice(&inflate(&f.payload)).unwrap();
        assert_eq!((v["ref"].as_u64(), v["data"].as_str().map(str::len)), (Some(9), Some(1000)));
    }
    // Compression::On compresses small ones too, when they shrink.
    let on = serve_with(&hub, WsConfig::default().compression(Compression::On)).await;
    let mut c = Raw::open(on, "/", Some(OFFER)).await;
    c.text(&json!({"type": "call", "ref": 1, "event": "echo", "data": "abababababababababababab"}), false).await;
    let (compressed, v) = c.message().await;
    assert!(compressed);
    assert_eq!(v["ref"], 1);
}

/// A TCP proxy in front of `to` that counts the bytes each way and keeps
/// the first bytes the server sent (its `101` response).
async fn counting_proxy(to: SocketAddr) -> (SocketAddr, Arc<Counts>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let counts = Arc::new(Counts::default());
    let c = counts.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let server = TcpStream::connect(to).await.unwrap();
            let (mut cr, mut cw) = client.into_split();
            let (mut sr, mut sw) = server.into_split();
            let up = c.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 8192];
                while let Ok(n @ 1..) = cr.read(&mut buf).await {
                    up.up.fetch_add(n as u64, Ordering::Relaxed);
                    if sw.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
            let down = c.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 8192];
                while let Ok(n @ 1..) = sr.read(&mut buf).await {
                    down.down.fetch_add(n as u64, Ordering::Relaxed);
                    {
                        let mut head = down.head.lock().unwrap();
                        if head.len() < 1024 {
                            head.extend_from_slice(&buf[..n.min(1024)]);
                        }
                    }
                    if cw.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    (addr, counts)
}

#[derive(Default)]
struct Counts {
    up: AtomicU64,
    down: AtomicU64,
    head: std::sync::Mutex<Vec<u8>>,
}

/// The Rust client offers the extension, reads compressed events and
/// replies, and sends its big messages compressed: through a counting
/// proxy, the same session costs a fraction of the bytes it costs with
/// compression off.
#[tokio::test]
async fn the_rust_client_negotiates_and_both_directions_shrink() {
    client_traffic_shrinks(false).await;
}

/// The same over `wss://` (issue 19's leftover, issue 20): the proxy counts
/// TLS records, which track the WebSocket bytes inside them.
#[cfg(feature = "tls")]
#[tokio::test]
async fn the_rust_client_compresses_over_wss_too() {
    client_traffic_shrinks(true).await;
}

async fn client_traffic_shrinks(tls: bool) {
    use switchboard::client::{Client, ClientConfig, RoomEvent};
    let hub = hub();
    #[cfg(feature = "tls")]
    let server = if tls { support::tls::serve(&hub).await } else { serve(&hub).await };
    #[cfg(not(feature = "tls"))]
    let server = serve(&hub).await;
    let mut totals = Vec::new();
    for compression in [true, false] {
        let (addr, counts) = counting_proxy(server).await;
        let config = ClientConfig::default().compression(compression).call_timeout(WAIT);
        #[cfg(feature = "tls")]
        let config = if tls { config.tls(support::tls::pki().client_config()) } else { config };
        let url = if tls { format!("wss://localhost:{}/", addr.port()) } else { format!("ws://{addr}/") };
        let client = Client::builder(url).config(config).connect().unwrap();
        let room = tokio::time::timeout(WAIT, client.join("lobby")).await.unwrap().unwrap();
        let sample = |i: usize| json!({"i": i, "text": "a dashboard sample that repeats itself; ".repeat(100)});
        for i in 0..20 {
            hub.publish("lobby", "sample", &sample(i)).await.unwrap();
        }
        for i in 0..20 {
            match tokio::time::timeout(WAIT, room.recv()).await.unwrap().unwrap() {
                RoomEvent::Event(e) => assert_eq!(e.decode::<Value>().unwrap(), sample(i)),
                other => panic!("{other:?}"),
            }
        }
        for i in 0..20 {
            let back: Value = tokio::time::timeout(WAIT, client.call("echo", &sample(i))).await.unwrap().unwrap();
            assert_eq!(back, sample(i));
        }
        client.close().await;
        if !tls {
            let head = String::from_utf8_lossy(&counts.head.lock().unwrap()).to_lowercase();
            assert_eq!(head.contains("sec-websocket-extensions: permessage-deflate"), compression, "{head}");
        }
        totals.push((counts.up.load(Ordering::Relaxed), counts.down.load(Ordering::Relaxed)));
    }
    let [(up_on, down_on), (up_off, down_off)] = totals[..] else { unreachable!() };
    assert!(up_on * 5 < up_off, "client to server: {up_on} compressed, {up_off} plain");
    assert!(down_on * 5 < down_off, "server to client: {down_on} compressed, {down_off} plain");
}
