//! An EventSource-faithful test client over raw TCP (HTTP/1.1), and a raw
//! POST helper, for the SSE tests.
//!
//! It does what the HTML `EventSource` does: parses the event stream by the
//! spec's rules (CR, LF and CRLF line ends, a leading BOM, `data` lines
//! joined with LF, comments ignored, `retry` sets the reconnection delay,
//! `id` without NUL sets the last event id, which survives events without
//! one), reconnects after the stream ends, sending `Last-Event-ID`, and
//! stops for good on any answer but `200 text/event-stream` (204 included).
#![allow(dead_code)]

use serde_json::Value;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long a test waits for an expected event before failing.
pub const WAIT: Duration = Duration::from_secs(10);

/// One dispatched event, as `MessageEvent` shows it.
#[derive(Debug, Clone)]
pub struct Event {
    /// `lastEventId`: the last id set on this stream (or a previous one).
    pub id: String,
    /// The event type (`message` when none was given).
    pub event: String,
    pub data: String,
}

impl Event {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.data)
            .unwrap_or_else(|e| panic!("event {} data is not JSON ({e}): {:?}", self.event, self.data))
    }
}

/// What the stream produced next.
#[derive(Debug, Clone)]
pub enum Item {
    Event(Event),
    Comment(String),
    /// The stream ended and the client reconnected (the answer's status).
    Reconnected,
}

/// Why the client stopped for good.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stopped {
    pub status: u16,
    pub content_type: Option<String>,
}

struct Conn {
    stream: TcpStream,
    raw: Vec<u8>,
    chunked: bool,
    /// Bytes left in the current chunk (chunked) or the body (length).
    left: Option<usize>,
    eof: bool,
    text: Vec<u8>,
    bom_checked: bool,
}

pub struct EventSource {
    pub addr: SocketAddr,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub last_event_id: String,
    pub retry: Duration,
    /// Every `retry:` value seen, in order.
    pub retries: Vec<u64>,
    /// Status and headers of the last answer.
    pub status: u16,
    pub response_headers: Vec<(String, String)>,
    pub reconnects: usize,
    /// Whether the client reconnects when a stream ends (EventSource does).
    pub auto_reconnect: bool,
    conn: Option<Conn>,
    pending: VecDeque<Event>,
    // Parser buffers.
    event: String,
    data: String,
    has_data: bool,
}

impl EventSource {
    /// Opens a stream at `path` (with its query).
    pub async fn open(addr: SocketAddr, path: &str) -> Result<EventSource, Stopped> {
        EventSource::open_with(addr, path, &[]).await
    }

    pub async fn open_with(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Result<EventSource, Stopped> {
        let mut es = EventSource {
            addr,
            path: path.to_owned(),
            headers: headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            last_event_id: String::new(),
            retry: Duration::from_millis(3000),
            retries: Vec::new(),
            status: 0,
            response_headers: Vec::new(),
            reconnects: 0,
            auto_reconnect: true,
            conn: None,
            pending: VecDeque::new(),
            event: String::new(),
            data: String::new(),
            has_data: false,
        };
        es.connect().await?;
        Ok(es)
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.response_headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    async fn connect(&mut self) -> Result<(), Stopped> {
        let mut stream = TcpStream::connect(self.addr).await.expect("connect");
        let mut req = format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nAccept: text/event-stream\r\nCache-Control: no-cache\r\n",
            self.path, self.addr
        );
        if !self.last_event_id.is_empty() {
            req.push_str(&format!("Last-Event-ID: {}\r\n", self.last_event_id));
        }
        for (k, v) in &self.headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        stream.write_all(req.as_bytes()).await.expect("write request");
        let (status, headers, rest) = read_head(&mut stream).await;
        self.status = status;
        self.response_headers = headers;
        let ct = self.header("content-type").map(str::to_owned);
        if status != 200 || !ct.as_deref().is_some_and(|c| c.starts_with("text/event-stream")) {
            return Err(Stopped { status, content_type: ct });
        }
        let chunked = self.header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked"));
        let left = if chunked { None } else { self.header("content-length").map(|v| v.parse().unwrap()) };
        self.conn = Some(Conn { stream, raw: rest, chunked, left, eof: false, text: Vec::new(), bom_checked: false });
        Ok(())
    }

    /// The next item: an event, a comment, or a reconnection.
    pub async fn next_item(&mut self) -> Result<Item, Stopped> {
        tokio::time::timeout(WAIT, self.next_item_inner()).await.expect("timed out waiting for the event stream")
    }

    async fn next_item_inner(&mut self) -> Result<Item, Stopped> {
        if let Some(e) = self.pending.pop_front() {
            return Ok(Item::Event(e));
        }
        self.read_item().await
    }

    /// Reads the next item off the wire (not from the events set aside).
    async fn read_item(&mut self) -> Result<Item, Stopped> {
        loop {
            let Some(conn) = self.conn.as_mut() else {
                // Reconnect after the delay, as EventSource does.
                tokio::time::sleep(self.retry).await;
                self.reconnects += 1;
                self.connect().await?;
                return Ok(Item::Reconnected);
            };
            // A complete line in the decoded text?
            if let Some((line, used)) = take_line(&conn.text, conn.eof) {
                conn.text.drain(..used);
                if let Some(item) = self.line(&line) {
                    return Ok(item);
                }
                continue;
            }
            if conn.eof {
                // The stream ended: a pending event without its blank line
                // is dropped, as the spec says.
                self.event.clear();
                self.data.clear();
                self.has_data = false;
                self.conn = None;
                if !self.auto_reconnect {
                    return Err(Stopped { status: 0, content_type: None });
                }
                continue;
            }
            conn.fill().await;
        }
    }

    /// The next event, ignoring comments and reconnections.
    pub async fn next(&mut self) -> Event {
        loop {
            match self.next_item().await {
                Ok(Item::Event(e)) => return e,
                Ok(_) => {}
                Err(s) => panic!("event stream stopped: {s:?}"),
            }
        }
    }

    /// The next event named `name`, keeping the others for later.
    pub async fn wait_for(&mut self, name: &str) -> Event {
        if let Some(pos) = self.pending.iter().position(|e| e.event == name) {
            return self.pending.remove(pos).unwrap();
        }
        loop {
            match self.next_item_inner_timeout().await {
                Ok(Item::Event(e)) if e.event == name => return e,
                Ok(Item::Event(e)) => self.pending.push_back(e),
                Ok(_) => {}
                Err(s) => panic!("event stream stopped while waiting for {name}: {s:?}"),
            }
        }
    }

    async fn next_item_inner_timeout(&mut self) -> Result<Item, Stopped> {
        tokio::time::timeout(WAIT, self.read_item()).await.expect("timed out waiting for the event stream")
    }

    /// Waits for the `$reply` or `$error` with `ref`.
    pub async fn reply_to(&mut self, r: u64) -> Value {
        if let Some(pos) =
            self.pending.iter().position(|e| (e.event == "$reply" || e.event == "$error") && e.json()["ref"] == r)
        {
            return self.pending.remove(pos).unwrap().json();
        }
        loop {
            match self.next_item_inner_timeout().await {
                Ok(Item::Event(e)) if (e.event == "$reply" || e.event == "$error") && e.json()["ref"] == r => {
                    return e.json()
                }
                Ok(Item::Event(e)) => self.pending.push_back(e),
                Ok(_) => {}
                Err(s) => panic!("event stream stopped while waiting for ref {r}: {s:?}"),
            }
        }
    }

    /// Handles one line; an item when it dispatched an event or was a comment.
    fn line(&mut self, line: &str) -> Option<Item> {
        if line.is_empty() {
            // Dispatch.
            let has = std::mem::take(&mut self.has_data);
            let mut data = std::mem::take(&mut self.data);
            let event = std::mem::take(&mut self.event);
            if !has {
                return None;
            }
            if data.ends_with('\n') {
                data.pop();
            }
            let event = if event.is_empty() { "message".to_owned() } else { event };
            return Some(Item::Event(Event { id: self.last_event_id.clone(), event, data }));
        }
        if let Some(c) = line.strip_prefix(':') {
            return Some(Item::Comment(c.trim_start().to_owned()));
        }
        let (name, value) = match line.find(':') {
            Some(i) => (&line[..i], &line[i + 1..]),
            None => (line, ""),
        };
        let value = value.strip_prefix(' ').unwrap_or(value);
        match name {
            "event" => self.event = value.to_owned(),
            "data" => {
                self.data.push_str(value);
                self.data.push('\n');
                self.has_data = true;
            }
            "id" if !value.contains('\0') => self.last_event_id = value.to_owned(),
            "retry" if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) => {
                let ms: u64 = value.parse().unwrap();
                self.retry = Duration::from_millis(ms);
                self.retries.push(ms);
            }
            _ => {}
        }
        None
    }

    /// Whether no event named `name` was set aside.
    pub fn pending_is_empty_of(&self, name: &str) -> bool {
        !self.pending.iter().any(|e| e.event == name)
    }

    /// Drops the connection (as a network failure would); the next read
    /// reconnects.
    pub fn drop_connection(&mut self) {
        self.conn = None;
    }

    /// Whether a connection is open.
    pub fn is_connected(&self) -> bool {
        self.conn.is_some()
    }
}

/// A complete line at the start of `text` (its terminator consumed); `None`
/// while more bytes are needed (a CR at the very end might be half a CRLF).
fn take_line(text: &[u8], eof: bool) -> Option<(String, usize)> {
    let i = text.iter().position(|&b| b == b'\n' || b == b'\r')?;
    let used = if text[i] == b'\r' {
        match text.get(i + 1) {
            Some(b'\n') => i + 2,
            Some(_) => i + 1,
            None if eof => i + 1,
            None => return None,
        }
    } else {
        i + 1
    };
    Some((String::from_utf8_lossy(&text[..i]).into_owned(), used))
}

impl Conn {
    /// Reads more bytes and decodes the transfer coding into `text`.
    async fn fill(&mut self) {
        loop {
            // Decode what is buffered first.
            if self.decode() {
                return;
            }
            let mut buf = [0u8; 8192];
            let n = self.stream.read(&mut buf).await.unwrap_or(0);
            if n == 0 {
                self.eof = true;
                return;
            }
            self.raw.extend_from_slice(&buf[..n]);
        }
    }

    /// Moves decoded body bytes from `raw` to `text`; true when some were
    /// moved or the body ended.
    fn decode(&mut self) -> bool {
        let before = self.text.len();
        loop {
            if self.chunked {
                match self.left {
                    Some(0) => {
                        // The CRLF after a chunk.
                        if self.raw.len() < 2 {
                            break;
                        }
                        self.raw.drain(..2);
                        self.left = None;
                    }
                    Some(n) => {
                        let take = n.min(self.raw.len());
                        if take == 0 {
                            break;
                        }
                        self.text.extend(self.raw.drain(..take));
                        self.left = Some(n - take);
                    }
                    None => {
                        let Some(pos) = self.raw.windows(2).position(|w| w == b"\r\n") else { break };
                        let size_line = String::from_utf8_lossy(&self.raw[..pos]).into_owned();
                        let size = usize::from_str_radix(size_line.split(';').next().unwrap().trim(), 16).unwrap();
                        self.raw.drain(..pos + 2);
                        if size == 0 {
                            self.eof = true;
                            return true;
                        }
                        self.left = Some(size);
                    }
                }
            } else {
                match self.left {
                    Some(0) => {
                        self.eof = true;
                        return true;
                    }
                    Some(n) => {
                        let take = n.min(self.raw.len());
                        if take == 0 {
                            break;
                        }
                        self.text.extend(self.raw.drain(..take));
                        self.left = Some(n - take);
                    }
                    None => {
                        if self.raw.is_empty() {
                            break;
                        }
                        self.text.append(&mut self.raw);
                    }
                }
            }
        }
        if !self.bom_checked && self.text.len() >= 3 {
            self.bom_checked = true;
            if self.text.starts_with(&[0xef, 0xbb, 0xbf]) {
                self.text.drain(..3);
            }
        }
        self.text.len() > before
    }
}

/// Reads an HTTP response head: status, headers, and the bytes after it.
pub async fn read_head(stream: &mut TcpStream) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let mut buf = Vec::new();
    loop {
        if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..pos]).into_owned();
            let rest = buf[pos + 4..].to_vec();
            let mut lines = head.split("\r\n");
            let status: u16 = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
            let headers = lines
                .filter_map(|l| l.split_once(':'))
                .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
                .collect();
            return (status, headers, rest);
        }
        let mut chunk = [0u8; 4096];
        let n =
            tokio::time::timeout(WAIT, stream.read(&mut chunk)).await.expect("timed out reading a response").unwrap();
        assert!(n > 0, "connection closed before the response head: {:?}", String::from_utf8_lossy(&buf));
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// A plain HTTP answer.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }
}

/// Sends one request with `Connection: close` and reads the whole answer.
pub async fn request(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Answer {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if method == "POST" || !body.is_empty() {
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(body);
    stream.write_all(&bytes).await.expect("write");
    let (status, headers, mut rest) = read_head(&mut stream).await;
    let chunked = headers.iter().any(|(k, v)| k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    tokio::time::timeout(WAIT, stream.read_to_end(&mut rest)).await.expect("timed out reading a body").ok();
    let body = if chunked { dechunk(&rest) } else { rest };
    Answer { status, headers, body: String::from_utf8_lossy(&body).into_owned() }
}

fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(pos) = raw.windows(2).position(|w| w == b"\r\n") {
        let size = usize::from_str_radix(std::str::from_utf8(&raw[..pos]).unwrap().trim(), 16).unwrap();
        raw = &raw[pos + 2..];
        if size == 0 {
            break;
        }
        out.extend_from_slice(&raw[..size]);
        raw = &raw[size + 2..];
    }
    out
}

/// POSTs `body` to the session `session` (the `$session` event's data).
pub async fn post(addr: SocketAddr, path: &str, session: &Value, body: &str) -> Answer {
    let id = session["session"].as_str().unwrap();
    let secret = session["secret"].as_str().unwrap();
    request(
        addr,
        "POST",
        path,
        &[("content-type", "application/json"), ("switchboard-session", id), ("switchboard-secret", secret)],
        body.as_bytes(),
    )
    .await
}
