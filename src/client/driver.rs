//! The connection task: connects, reads `hello`, rejoins, flushes the
//! offline buffer, serves the connection (reads, writes, heartbeats), and
//! reconnects with backoff after it ends.
//!
//! One task per client owns the socket; the application's handles talk to
//! it through the shared state and the live connection's bounded send
//! queue. Nothing here awaits with the state lock held.

use super::config::{Jitter, TokenPlacement};
use super::error::{ClientError, ClientErrorKind};
use super::presence;
use super::room::{Event, Gap, RoomEvent};
use super::shared::{fail, Link, Outgoing, Pending, PendingKind, RoomState, Shared, State, MAX_MISSING};
use super::status::{Disconnect, Status};
use super::ws::{ConnectError, Ws, WsOptions};
use crate::protocol::{CloseCode, Envelope, Format, Kind, Payload, ProtocolError, Version};
use crate::transport::{CloseFrame, Frame as Message, TransportError};
use futures::future::BoxFuture;
use futures::{SinkExt, StreamExt};
use serde::Deserialize;
use std::collections::{HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// The application's token provider.
pub(crate) type TokenProvider = Arc<dyn Fn() -> BoxFuture<'static, Result<String, String>> + Send + Sync>;

/// How long the client waits for the server to finish a close handshake.
const CLOSE_WAIT: Duration = Duration::from_secs(1);
/// Most messages written per batch before a flush.
const WRITE_BATCH: usize = 64;
/// Client ping interval when the server announces no heartbeats and the
/// application configured none.
const DEFAULT_PING: Duration = Duration::from_secs(25);
/// Undecodable messages in a row after which the connection is considered
/// broken (a garbage-sending server) and the client reconnects.
const MAX_MALFORMED_STREAK: u32 = 32;
/// Restarts of one gap recovery after `lagged` notices (its join reply may
/// have been dropped) before the client gives up and reports the room as
/// not recovered.
const MAX_RECOVERY_ATTEMPTS: u8 = 3;
/// Ceiling for a server's retry hint (`retry-after`, or a 1013's
/// `retry_after_ms`): a hint above the backoff's ceiling is honoured, up to
/// this.
const MAX_RETRY_HINT: Duration = Duration::from_secs(3600);
/// Ceiling for durations read from `hello` (a hostile value must not overflow).
const MAX_HELLO_DURATION: Duration = Duration::from_secs(24 * 3600);

/// Where and how to connect.
pub(crate) struct Connector {
    pub url: String,
    pub headers: Vec<(http::HeaderName, http::HeaderValue)>,
    pub token: Option<TokenProvider>,
}

impl Connector {
    fn request(
        &self,
        (format, version): (Format, Version),
        placement: &TokenPlacement,
        token: Option<&str>,
    ) -> Result<http::Request<()>, String> {
        let mut url = self.url.clone();
        if let (Some(t), TokenPlacement::Query(name)) = (token, placement) {
            let sep = if url.contains('?') { '&' } else { '?' };
            url = format!("{url}{sep}{}={}", percent_encode(name), percent_encode(t));
        }
        let mut req = url.into_client_request().map_err(|e| e.to_string())?;
        let headers = req.headers_mut();
        // The newest version first: the server selects the first it speaks.
        let offer = match version {
            Version::V1 => http::HeaderValue::from_static(format.subprotocol()),
            _ => http::HeaderValue::try_from(format!("{}, {}", version.subprotocol(format), format.subprotocol()))
                .map_err(|e| e.to_string())?,
        };
        headers.insert(http::header::SEC_WEBSOCKET_PROTOCOL, offer);
        for (k, v) in &self.headers {
            headers.append(k.clone(), v.clone());
        }
        if let (Some(t), TokenPlacement::BearerHeader) = (token, placement) {
            let value = http::HeaderValue::try_from(format!("Bearer {t}")).map_err(|e| e.to_string())?;
            headers.insert(http::header::AUTHORIZATION, value);
        }
        Ok(req)
    }
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

async fn stopped(stop: &mut watch::Receiver<bool>) {
    // The sender lives in `Shared`, which outlives this task.
    let _ = stop.wait_for(|s| *s).await;
}

/// What one connection (or attempt) ended with.
struct Outcome {
    reason: Disconnect,
    /// It stayed up for at least `reset_after` after its `hello`.
    stable: bool,
    /// It got as far as the server's `hello`.
    greeted: bool,
    /// The server's `retry-after` on a 429/503 refusal.
    retry_after: Option<Duration>,
}

impl From<Disconnect> for Outcome {
    fn from(reason: Disconnect) -> Self {
        Outcome { reason, stable: false, greeted: false, retry_after: None }
    }
}

/// The client's task: connect, serve, back off, repeat, until a terminal
/// close or the application closes the client.
pub(crate) async fn run(shared: Arc<Shared>, connector: Connector) {
    let mut stop = shared.stop.subscribe();
    let mut jitter = Jitter::new(shared.config.jitter_seed);
    let backoff = shared.config.backoff.clone();
    let mut attempt: u32 = 0;
    // Connections in a row that got their `hello` but ended before
    // `reset_after` (see `Backoff`).
    let mut short_lived: u32 = 0;
    // The latest token; an in-band `refresh` replaces it too.
    let token: Arc<parking_lot::Mutex<Option<String>>> = Arc::default();
    let mut need_token = connector.token.is_some();
    let mut refused_unauthorized = false;
    loop {
        let outcome = 'attempt: {
            if need_token {
                let Some(provider) = connector.token.as_ref() else {
                    break 'attempt Disconnect::Token("no provider".into()).into();
                };
                tokio::select! {
                    _ = stopped(&mut stop) => break 'attempt Disconnect::ClientClosed.into(),
                    t = provider() => match t {
                        Ok(t) => {
                            *token.lock() = Some(t);
                            need_token = false;
                        }
                        Err(e) => break 'attempt Disconnect::Token(e).into(),
                    },
                }
            }
            connect_and_serve(&shared, &connector, &token, &mut stop).await
        };
        // The reset rule (`Backoff`): a stable connection starts over at 0;
        // one that got its `hello` but ended sooner starts over at the
        // number of such connections in a row, so the failures of the
        // outage before it do not carry over, while a server that accepts
        // and closes at once still meets a growing backoff.
        if outcome.stable {
            attempt = 0;
            short_lived = 0;
        } else if outcome.greeted {
            attempt = short_lived;
            short_lived = short_lived.saturating_add(1);
        }
        let reason = outcome.reason;
        let retry = match &reason {
            Disconnect::ClientClosed => false,
            Disconnect::Closed { code, .. } if *code == CloseCode::TOKEN_EXPIRED => {
                need_token = connector.token.is_some();
                true
            }
            // One fresh token may cure a refused handshake; a second refusal
            // in a row stops the client (§7.3).
            Disconnect::Refused { status: 401 | 403, .. } if connector.token.is_some() && !refused_unauthorized => {
                refused_unauthorized = true;
                need_token = true;
                true
            }
            r => r.should_reconnect(),
        };
        if !matches!(reason, Disconnect::Refused { status: 401 | 403, .. }) {
            refused_unauthorized = false;
        }
        if !retry {
            finish(&shared, reason);
            return;
        }
        let mut delay = backoff.delay(attempt, jitter.unit());
        // The server's hint: `retry-after` on a 429/503, or the wait in a
        // 1013's reason (a shed after the upgrade, §7.1); never sooner.
        let hint = match &reason {
            Disconnect::Closed { code, reason } => outcome.retry_after.or_else(|| code.retry_hint(reason)),
            _ => outcome.retry_after,
        };
        if let Some(after) = hint {
            delay = delay.max(after.min(MAX_RETRY_HINT));
        }
        tracing::debug!(attempt, ?delay, %reason, "switchboard client: reconnecting");
        shared.status.send_replace(Status::Reconnecting { attempt, retry_in: delay, reason });
        attempt = attempt.saturating_add(1);
        tokio::select! {
            _ = stopped(&mut stop) => {
                finish(&shared, Disconnect::ClientClosed);
                return;
            }
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// Terminal: fail everything waiting, end every stream, publish `Closed`.
fn finish(shared: &Shared, reason: Disconnect) {
    let (pending, rooms) = {
        let mut st = shared.state.lock();
        st.closed = true;
        st.link = None;
        st.offline.clear();
        st.offline_bytes = 0;
        (std::mem::take(&mut st.pending), std::mem::take(&mut st.rooms))
    };
    let err = ClientError::new(ClientErrorKind::Closed, format!("the client is closed: {reason}"));
    for (_, p) in pending {
        fail(p, err.clone());
    }
    for (_, mut room) in rooms {
        if let Some(w) = room.waiter.take() {
            let _ = w.send(Err(err.clone()));
        }
        room.queue.close();
    }
    shared.direct.close();
    shared.status.send_replace(Status::Closed { reason });
}

async fn connect_and_serve(
    shared: &Arc<Shared>,
    connector: &Connector,
    token: &Arc<parking_lot::Mutex<Option<String>>>,
    stop: &mut watch::Receiver<bool>,
) -> Outcome {
    let config = &shared.config;
    let deadline = Instant::now() + config.connect_timeout;
    let current = token.lock().clone();
    let request = match connector.request((shared.format, shared.version), &config.token_placement, current.as_deref())
    {
        Ok(r) => r,
        Err(e) => return Disconnect::Connect(e).into(),
    };
    let connect = super::ws::connect(request, WsOptions::new(config));
    let ws = tokio::select! {
        _ = stopped(stop) => return Disconnect::ClientClosed.into(),
        r = tokio::time::timeout_at(deadline, connect) => match r {
            Err(_) => return Disconnect::Connect("timed out".into()).into(),
            Ok(Err(ConnectError::Http { status, headers, body })) => {
                let retry_after = headers
                    .get(http::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .map(Duration::from_secs);
                let body = String::from_utf8_lossy(&body[..body.len().min(256)]).into_owned();
                return Outcome {
                    reason: Disconnect::Refused { status, body },
                    stable: false,
                    greeted: false,
                    retry_after,
                };
            }
            Ok(Err(ConnectError::Other(e))) => return Disconnect::Connect(e).into(),
            Ok(Err(ConnectError::Tls(e))) => return Disconnect::Tls(e).into(),
            Ok(Ok((ws, resp))) => {
                let chosen = resp.headers().get(http::header::SEC_WEBSOCKET_PROTOCOL).and_then(|v| v.to_str().ok());
                // A server that answers without a subprotocol speaks JSON (§1.1).
                let format = chosen.and_then(Format::from_subprotocol).unwrap_or(Format::Json);
                let version = chosen.and_then(Version::from_subprotocol).unwrap_or(Version::V1);
                if format != shared.format || version > shared.version {
                    return Disconnect::Protocol(format!("the server selected {chosen:?}, not {}", shared.format.subprotocol())).into();
                }
                (ws, version)
            }
        },
    };
    let (ws, version) = ws;
    let mut session = Session::new(shared.clone(), ws, version);
    session.refresh = connector.token.clone().map(|provider| (provider, token.clone()));
    session.serve(deadline, stop).await
}

#[derive(Deserialize, Default)]
struct Hello {
    #[serde(default)]
    connection_id: u64,
    #[serde(default)]
    node: String,
    #[serde(default)]
    heartbeat_interval_ms: u64,
    #[serde(default)]
    heartbeat_timeout_ms: u64,
    #[serde(default)]
    max_message_size: u64,
    #[serde(default)]
    max_inflight: u64,
    expires_in_ms: Option<u64>,
    #[serde(default)]
    refresh: bool,
}

#[derive(Deserialize)]
struct RefreshReply {
    expires_in_ms: Option<u64>,
}

#[derive(Deserialize, Default)]
struct JoinReply {
    epoch: Option<String>,
    offset: Option<u64>,
    recovered: Option<bool>,
}

#[derive(Deserialize)]
struct GapData {
    /// Absent for `epoch_changed`.
    #[serde(default)]
    from: u64,
    #[serde(default)]
    to: u64,
    #[serde(default)]
    reason: String,
    epoch: Option<String>,
}

#[derive(Deserialize)]
struct LaggedData {
    #[serde(default)]
    dropped: u64,
}

/// Renew at 80 % of a credential lifetime (§3.10).
fn renew_after(lifetime_ms: u64) -> Duration {
    ms(lifetime_ms).mul_f64(0.8)
}

fn ms(v: u64) -> Duration {
    Duration::from_millis(v).min(MAX_HELLO_DURATION)
}

/// Liveness: when to ping, when to give up.
#[derive(Debug, Clone, Copy)]
enum Liveness {
    /// Dead after this much silence (server heartbeats).
    Server { limit: Duration },
    /// Ping after `every` of silence; dead `timeout` after the ping.
    Ping { every: Duration, timeout: Duration },
}

struct Session {
    shared: Arc<Shared>,
    ws: Ws,
    /// The protocol version the server selected for this connection.
    version: Version,
    generation: u64,
    last_rx: Instant,
    pinged: bool,
    live: bool,
    /// Rejoins waiting for an in-flight slot, and the refs in flight.
    rejoin_waiting: VecDeque<String>,
    rejoin_inflight: HashSet<u64>,
    window: usize,
    /// Messages to write after handling the current frame.
    out: Vec<Outgoing>,
    hello: Hello,
    malformed_streak: u32,
    /// When the connection was found ended (before any close handshake
    /// wait), for the backoff's "stayed up" rule.
    ended_at: Option<Instant>,
    /// The token provider and the token slot, for in-band `refresh`.
    refresh: Option<(TokenProvider, Arc<parking_lot::Mutex<Option<String>>>)>,
    /// When to renew the credentials (80 % of their lifetime).
    refresh_at: Option<Instant>,
}

enum Step {
    Continue,
    End(Disconnect),
}

impl Session {
    fn new(shared: Arc<Shared>, ws: Ws, version: Version) -> Session {
        Session {
            shared,
            ws,
            version,
            generation: 0,
            last_rx: Instant::now(),
            pinged: false,
            live: false,
            rejoin_waiting: VecDeque::new(),
            rejoin_inflight: HashSet::new(),
            window: 1,
            out: Vec::new(),
            hello: Hello::default(),
            malformed_streak: 0,
            ended_at: None,
            refresh: None,
            refresh_at: None,
        }
    }

    fn decode(&self, msg: Message) -> Option<Result<Envelope, ProtocolError>> {
        let bytes = match (msg, self.shared.format) {
            (Message::Text(t), Format::Json) => t,
            (Message::Binary(b), Format::MsgPack) => b,
            (Message::Text(_) | Message::Binary(_), _) => {
                return Some(Err(ProtocolError::Malformed("frame of the wrong kind for the format".into())))
            }
            _ => return None,
        };
        Some(Envelope::decode_as(self.shared.format, self.version, &bytes))
    }

    async fn serve(mut self, deadline: Instant, stop: &mut watch::Receiver<bool>) -> Outcome {
        // 1. `hello`, first.
        let hello = loop {
            let msg = tokio::select! {
                _ = stopped(stop) => return self.close_gracefully().await.into(),
                m = tokio::time::timeout_at(deadline, self.ws.next()) => match m {
                    Err(_) => return Disconnect::Protocol("no hello within the connect timeout".into()).into(),
                    Ok(m) => m,
                },
            };
            let msg = match read_result(msg) {
                Ok(m) => m,
                Err(reason) => return reason.into(),
            };
            if let Message::Close(frame) = msg {
                return self.closed_by_server(frame).await.into();
            }
            match self.decode(msg) {
                None => continue,
                Some(Ok(env)) if env.kind == Kind::Hello => break env,
                Some(Ok(env)) => {
                    self.shared.count_malformed();
                    return Disconnect::Protocol(format!("first message was `{}`, not hello", env.kind)).into();
                }
                Some(Err(e)) => {
                    self.shared.count_malformed();
                    return Disconnect::Protocol(format!("first message is not a hello: {e}")).into();
                }
            }
        };
        self.hello = match hello.data.as_ref().map(Payload::decode::<Hello>) {
            Some(Ok(h)) => h,
            other => {
                self.shared.count_malformed();
                return Disconnect::Protocol(format!("invalid hello: {:?}", other.and_then(Result::err))).into();
            }
        };
        let connected_at = Instant::now();
        self.last_rx = connected_at;
        if self.refresh.is_some() && self.hello.refresh {
            self.refresh_at = self.hello.expires_in_ms.map(|ms| connected_at + renew_after(ms));
        }
        self.window = usize::try_from(self.hello.max_inflight).unwrap_or(usize::MAX).clamp(1, 1024);
        let (tx, rx) = mpsc::channel(self.shared.config.send_queue.max(1));
        {
            let mut st = self.shared.state.lock();
            st.generation += 1;
            self.generation = st.generation;
            st.max_message_size = usize::try_from(self.hello.max_message_size).ok().filter(|m| *m > 0);
            // Every room the application wants is (re)joined on this connection.
            let mut rooms: Vec<(&String, &RoomState)> = st.rooms.iter().collect();
            rooms.sort_by_key(|(_, r)| r.id);
            self.rejoin_waiting = rooms.into_iter().map(|(name, _)| name.clone()).collect();
            for name in &self.rejoin_waiting {
                if let Some(r) = st.rooms.get_mut(name) {
                    r.sent_on = Some(self.generation);
                    r.joined = false;
                }
            }
        }
        if self.generation > 1 {
            self.shared.counters.reconnects.fetch_add(1, Ordering::Relaxed);
        }
        let reason = self.run(tx, rx, stop).await;
        let ended_at = self.ended_at.unwrap_or_else(Instant::now);
        let stable = ended_at - connected_at >= self.shared.config.backoff.reset_after;
        Outcome { reason, stable, greeted: true, retry_after: None }
    }

    fn liveness(&self) -> Liveness {
        let config = &self.shared.config;
        let interval = ms(self.hello.heartbeat_interval_ms);
        let timeout = ms(self.hello.heartbeat_timeout_ms);
        let after_ping = if timeout.is_zero() { Duration::from_secs(10) } else { timeout } + config.heartbeat_grace;
        match config.ping_interval {
            Some(every) => Liveness::Ping { every, timeout: after_ping },
            None if interval.is_zero() => Liveness::Ping { every: DEFAULT_PING, timeout: after_ping },
            None => Liveness::Server { limit: interval.max(timeout) + timeout + config.heartbeat_grace },
        }
    }

    fn next_check(&self, l: Liveness) -> Instant {
        match l {
            Liveness::Server { limit } => self.last_rx + limit,
            Liveness::Ping { every, .. } if !self.pinged => self.last_rx + every,
            Liveness::Ping { every, timeout } => self.last_rx + every + timeout,
        }
    }

    async fn run(
        &mut self,
        tx: mpsc::Sender<Outgoing>,
        mut rx: mpsc::Receiver<Outgoing>,
        stop: &mut watch::Receiver<bool>,
    ) -> Disconnect {
        let liveness = self.liveness();
        let check = tokio::time::sleep_until(self.next_check(liveness));
        tokio::pin!(check);
        let far = || Instant::now() + MAX_HELLO_DURATION;
        let mut armed = self.refresh_at;
        let renew = tokio::time::sleep_until(armed.unwrap_or_else(far));
        tokio::pin!(renew);
        let mut renewing: Option<BoxFuture<'static, Result<String, String>>> = None;
        // Rejoins that take longer than a call may do not hold the offline
        // buffer back forever: the connection goes live without them (their
        // rooms join when the answers come).
        let rejoin_deadline = tokio::time::sleep(self.shared.config.call_timeout);
        tokio::pin!(rejoin_deadline);
        self.send_rejoins();
        let reason = loop {
            if !self.live && self.rejoin_inflight.is_empty() && self.rejoin_waiting.is_empty() {
                self.go_live(&tx);
            }
            if !self.out.is_empty() {
                if let Err(e) = self.write_out().await {
                    break e;
                }
            }
            if armed != self.refresh_at {
                armed = self.refresh_at;
                renew.as_mut().reset(armed.unwrap_or_else(far));
            }
            tokio::select! {
                biased;
                _ = stopped(stop) => break self.close_gracefully().await,
                msg = self.ws.next() => {
                    self.last_rx = Instant::now();
                    self.pinged = false;
                    let msg = match read_result(msg) {
                        Ok(m) => m,
                        Err(reason) => break reason,
                    };
                    if let Message::Close(frame) = msg {
                        break self.closed_by_server(frame).await;
                    }
                    if let Step::End(reason) = self.handle(msg) {
                        break reason;
                    }
                }
                Some(first) = rx.recv(), if self.live => {
                    self.out.push(first);
                    while self.out.len() < WRITE_BATCH {
                        match rx.try_recv() {
                            Ok(o) => self.out.push(o),
                            Err(_) => break,
                        }
                    }
                }
                _ = &mut rejoin_deadline, if !self.live => {
                    tracing::warn!(waiting = self.rejoin_waiting.len() + self.rejoin_inflight.len(), "switchboard client: rejoins unanswered; going live");
                    // Joins not sent yet go out now, without a window.
                    let rest: Vec<String> = self.rejoin_waiting.drain(..).collect();
                    let generation = self.generation;
                    let mut st = self.shared.state.lock();
                    for name in rest {
                        if let Some(out) = self.shared.join_message(&mut st, &name, generation) {
                            self.out.push(out);
                        }
                    }
                    drop(st);
                    self.rejoin_inflight.clear();
                }
                _ = &mut renew, if armed.is_some() && renewing.is_none() => {
                    self.refresh_at = None;
                    renewing = self.refresh.as_ref().map(|(provider, _)| provider());
                }
                t = async { renewing.as_mut().expect("guarded").await }, if renewing.is_some() => {
                    renewing = None;
                    match t {
                        Ok(t) => self.send_refresh(t),
                        // The server closes with 4003 when the credentials
                        // run out; the reconnect asks the provider again.
                        Err(e) => tracing::warn!(error = %e, "switchboard client: token provider failed; not refreshing"),
                    }
                }
                _ = &mut check => {
                    let now = Instant::now();
                    if now >= self.next_check(liveness) {
                        match liveness {
                            Liveness::Ping { .. } if !self.pinged => {
                                self.pinged = true;
                                let env = Envelope::new(Kind::Ping).with_ref(self.shared.next_ref());
                                if let Ok(bytes) = self.shared.encode(&env) {
                                    self.out.push(Outgoing::control(bytes, None));
                                }
                            }
                            _ => break Disconnect::HeartbeatTimeout,
                        }
                    }
                    check.as_mut().reset(self.next_check(liveness));
                }
            }
        };
        self.end(rx);
        reason
    }

    /// Sends `refresh` with a new token (and keeps it for reconnects).
    fn send_refresh(&mut self, token: String) {
        if let Some((_, slot)) = &self.refresh {
            *slot.lock() = Some(token.clone());
        }
        let r = self.shared.next_ref();
        let data = match self.shared.payload(&serde_json::json!({ "token": token })) {
            Ok(d) => d,
            Err(_) => return,
        };
        let env = Envelope::new(Kind::Refresh).with_ref(r).with_data(data);
        if let Ok(bytes) = self.shared.encode(&env) {
            self.shared.state.lock().pending.insert(r, Pending { kind: PendingKind::Refresh, sent_on: None });
            self.out.push(Outgoing::control(bytes, Some(r)));
        }
    }

    /// Sends joins for waiting rooms, up to the server's in-flight window.
    fn send_rejoins(&mut self) {
        while self.rejoin_inflight.len() < self.window {
            let Some(name) = self.rejoin_waiting.pop_front() else { break };
            let mut st = self.shared.state.lock();
            if let Some(out) = self.shared.join_message(&mut st, &name, self.generation) {
                if let Some(r) = out.reference {
                    self.rejoin_inflight.insert(r);
                }
                self.out.push(out);
            }
        }
    }

    /// Rejoins are done: flush the offline buffer and publish `Connected`.
    fn go_live(&mut self, tx: &mpsc::Sender<Outgoing>) {
        self.live = true;
        let generation = self.generation;
        {
            let mut st = self.shared.state.lock();
            // Rooms the application joined while the rejoins were in flight.
            let late: Vec<String> =
                st.rooms.iter().filter(|(_, r)| r.sent_on != Some(generation)).map(|(n, _)| n.clone()).collect();
            for name in late {
                if let Some(out) = self.shared.join_message(&mut st, &name, generation) {
                    self.out.push(out);
                }
            }
            self.out.extend(st.offline.drain(..));
            st.offline_bytes = 0;
            st.link = Some(Link { tx: tx.clone(), generation });
        }
        let status = Status::Connected { connection_id: self.hello.connection_id, node: self.hello.node.clone() };
        self.shared.status.send_replace(status);
    }

    async fn write_out(&mut self) -> Result<(), Disconnect> {
        let items = std::mem::take(&mut self.out);
        {
            let mut st = self.shared.state.lock();
            for o in &items {
                if let Some(p) = o.reference.and_then(|r| st.pending.get_mut(&r)) {
                    p.sent_on = Some(self.generation);
                }
            }
        }
        for o in items {
            // Our JSON encoder writes UTF-8.
            let msg = match self.shared.format {
                Format::Json => Message::Text(o.bytes),
                Format::MsgPack => Message::Binary(o.bytes),
            };
            self.ws.feed(msg).await.map_err(write_error)?;
        }
        self.ws.flush().await.map_err(write_error)
    }

    async fn close_gracefully(&mut self) -> Disconnect {
        self.ended_at.get_or_insert_with(Instant::now);
        let frame = CloseFrame { code: CloseCode::NORMAL, reason: "client closed".into() };
        let _ = tokio::time::timeout(CLOSE_WAIT, async {
            if self.ws.send(Message::Close(Some(frame))).await.is_ok() {
                while let Some(Ok(_)) = self.ws.next().await {}
            }
        })
        .await;
        Disconnect::ClientClosed
    }

    async fn closed_by_server(&mut self, frame: Option<CloseFrame>) -> Disconnect {
        self.ended_at.get_or_insert_with(Instant::now);
        // The close was echoed when it was read; keep reading until the
        // server ends the socket (bounded).
        let _ = tokio::time::timeout(CLOSE_WAIT, async { while let Some(Ok(_)) = self.ws.next().await {} }).await;
        match frame {
            Some(f) => Disconnect::Closed { code: f.code, reason: f.reason },
            // A close frame without a status (1005) is "any other code".
            None => Disconnect::Closed { code: CloseCode(1005), reason: String::new() },
        }
    }

    /// The connection ended: forget the link, put unsent messages back in
    /// the offline buffer, fail requests that were written on it.
    fn end(&mut self, mut rx: mpsc::Receiver<Outgoing>) {
        let generation = self.generation;
        let mut failed = Vec::new();
        {
            let mut st = self.shared.state.lock();
            if st.link.as_ref().is_some_and(|l| l.generation == generation) {
                st.link = None;
            }
            rx.close();
            let mut unsent: Vec<Outgoing> = std::mem::take(&mut self.out);
            while let Ok(o) = rx.try_recv() {
                unsent.push(o);
            }
            for o in &unsent {
                if let Some(p) = o.reference.and_then(|r| st.pending.get_mut(&r)) {
                    p.sent_on = None;
                }
            }
            self.shared.requeue_front(&mut st, unsent);
            // Requests written on this connection fail; joins and control
            // messages belong to it and go with it.
            let written: Vec<u64> = st
                .pending
                .iter()
                .filter(|(_, p)| p.sent_on == Some(generation) || !matches!(p.kind, PendingKind::Request(_)))
                .map(|(r, _)| *r)
                .collect();
            for r in written {
                if let Some(p) = st.pending.remove(&r) {
                    failed.push(p);
                }
            }
            for room in st.rooms.values_mut() {
                room.joined = false;
                room.recovering = false;
                room.join_ref = None;
                room.presence.send_modify(|v| v.synced = false);
            }
        }
        let err = ClientError::new(ClientErrorKind::Disconnected, "the connection dropped before the answer");
        for p in failed {
            fail(p, err.clone());
        }
    }

    /// Handles one non-close frame.
    fn handle(&mut self, msg: Message) -> Step {
        let env = match self.decode(msg) {
            None => return Step::Continue,
            Some(Ok(env)) => env,
            Some(Err(ProtocolError::UnknownType(t))) => {
                // §9: unknown message types are ignored.
                tracing::debug!(r#type = %t, "switchboard client: ignoring an unknown message type");
                self.shared.count_unknown();
                return Step::Continue;
            }
            Some(Err(e)) => {
                tracing::warn!(error = %e, "switchboard client: ignoring a malformed message from the server");
                self.shared.count_malformed();
                self.malformed_streak += 1;
                if self.malformed_streak >= MAX_MALFORMED_STREAK {
                    return Step::End(Disconnect::Protocol(format!(
                        "{} undecodable messages in a row (last: {e})",
                        self.malformed_streak
                    )));
                }
                return Step::Continue;
            }
        };
        self.malformed_streak = 0;
        match env.kind {
            Kind::Reply | Kind::Error => self.answer(env),
            Kind::Event => self.event(env),
            Kind::Ping => {
                let mut pong = Envelope::new(Kind::Pong);
                pong.reference = env.reference;
                if let Ok(bytes) = self.shared.encode(&pong) {
                    self.out.push(Outgoing::control(bytes, None));
                }
            }
            Kind::Pong | Kind::Hello => {}
            Kind::Lagged => {
                let dropped = env.data.and_then(|d| d.decode::<LaggedData>().ok()).map_or(0, |d| d.dropped);
                self.shared.counters.server_lagged.fetch_add(dropped.max(1), Ordering::Relaxed);
                let mut queues = self.lagged_rooms();
                if self.shared.direct_taken.load(Ordering::Relaxed) {
                    queues.push(self.shared.direct.clone());
                }
                for q in &queues {
                    self.shared.deliver(q, RoomEvent::ServerLagged { dropped });
                }
            }
            Kind::PresenceState | Kind::PresenceDiff => self.presence(env),
            Kind::Gap => self.gap(env),
            Kind::Leave => self.room_closed(env),
            _ => {
                // A client → server type from the server: ignore it.
                self.shared.count_unknown();
            }
        }
        Step::Continue
    }

    /// After a `lagged`: the streams to tell (rooms without history, whose
    /// losses nothing else reports; rooms with history get exact `gap`s),
    /// and recoveries whose join reply may have been among the dropped
    /// messages are restarted (at most [`MAX_RECOVERY_ATTEMPTS`] times, then
    /// the room is reported as not recovered).
    fn lagged_rooms(&mut self) -> Vec<Arc<super::room::EventQueue>> {
        let generation = self.generation;
        let shared = self.shared.clone();
        let mut st = shared.state.lock();
        let mut tell = Vec::new();
        let mut given_up = Vec::new();
        let mut retry = Vec::new();
        for (name, room) in st.rooms.iter_mut() {
            if room.epoch.is_none() {
                tell.push(room.queue.clone());
            }
            if room.recovering && room.join_ref.is_some() {
                if room.recovery_attempts < MAX_RECOVERY_ATTEMPTS {
                    room.recovery_attempts += 1;
                    retry.push(name.clone());
                } else {
                    room.recovering = false;
                    room.recovery_attempts = 0;
                    room.missing.clear();
                    room.join_ref = None; // a late reply is stale now
                    given_up.push(room.queue.clone());
                }
            }
        }
        for name in retry {
            self.recovery_messages(&mut st, &name, generation);
        }
        drop(st);
        for q in given_up {
            shared.deliver(&q, RoomEvent::Rejoined { recovered: false });
        }
        tell
    }

    /// Queues `leave` then a `join` from just before the oldest missing
    /// offset, for a room recovering a gap.
    fn recovery_messages(&mut self, st: &mut State, name: &str, generation: u64) {
        let r = self.shared.next_ref();
        st.pending.insert(r, Pending { kind: PendingKind::Internal, sent_on: None });
        let leave = Envelope::new(Kind::Leave).with_room(name).with_ref(r);
        if let Ok(bytes) = self.shared.encode(&leave) {
            self.out.push(Outgoing::control(bytes, Some(r)));
        }
        if let Some(out) = self.shared.join_message(st, name, generation) {
            self.out.push(out);
        }
    }

    fn answer(&mut self, env: Envelope) {
        let Some(r) = env.reference else {
            if env.kind == Kind::Error {
                self.shared.count_server_error();
                tracing::warn!(code = ?env.code, message = ?env.message, "switchboard client: server error without ref");
            } else {
                self.shared.count_malformed();
            }
            return;
        };
        let result = if env.kind == Kind::Reply {
            Ok(env.data.unwrap_or_else(|| Payload::null(self.shared.format)))
        } else {
            Err(ClientError::server(env.code.unwrap_or(0), env.message.unwrap_or_default(), env.data))
        };
        let pending = self.shared.state.lock().pending.remove(&r);
        if !matches!(pending, Some(Pending { kind: PendingKind::Join { .. }, .. })) && self.rejoin_inflight.remove(&r) {
            // A rejoin whose room was given up meanwhile: free its slot.
            self.send_rejoins();
        }
        let Some(pending) = pending else {
            // A reply to a request that timed out (or was never made).
            self.shared.count_late();
            return;
        };
        match pending.kind {
            PendingKind::Request(tx) => {
                let _ = tx.send(result);
            }
            PendingKind::Internal => {}
            PendingKind::Join { room } => self.join_answer(&room, r, result),
            PendingKind::LeaveOnJoin { room } => {
                let wanted = self.shared.state.lock().rooms.contains_key(&room);
                if result.is_ok() && !wanted {
                    let r = self.shared.next_ref();
                    let leave = Envelope::new(Kind::Leave).with_room(room).with_ref(r);
                    if let Ok(bytes) = self.shared.encode(&leave) {
                        self.shared
                            .state
                            .lock()
                            .pending
                            .insert(r, Pending { kind: PendingKind::Internal, sent_on: None });
                        self.out.push(Outgoing::control(bytes, Some(r)));
                    }
                }
            }
            PendingKind::Refresh => match result {
                Ok(data) => {
                    let expires = data.decode::<RefreshReply>().ok().and_then(|d| d.expires_in_ms);
                    self.refresh_at = expires.map(|ms| Instant::now() + renew_after(ms));
                }
                Err(e) => tracing::warn!(error = %e, "switchboard client: refresh refused"),
            },
        }
    }

    fn join_answer(&mut self, name: &str, r: u64, result: Result<Payload, ClientError>) {
        let in_rejoin = self.rejoin_inflight.remove(&r);
        let shared = self.shared.clone();
        let mut st = shared.state.lock();
        let Some(room) = st.rooms.get_mut(name).filter(|room| room.join_ref == Some(r)) else {
            drop(st);
            if in_rejoin {
                self.send_rejoins();
            }
            return;
        };
        match result {
            Ok(data) => {
                room.join_ref = None;
                room.joined = true;
                let reply: JoinReply = data.decode().unwrap_or_default();
                let rejoin = room.ever_joined;
                let recovering_gap = std::mem::take(&mut room.recovering);
                room.recovery_attempts = 0;
                room.ever_joined = true;
                match (&reply.epoch, reply.offset) {
                    (Some(epoch), Some(head)) => {
                        let same_epoch = room.epoch.as_deref() == Some(epoch.as_str());
                        if reply.recovered != Some(true) || !same_epoch {
                            // Start over at the head (or `rewind` before it
                            // on a first join): nothing older is coming.
                            let floor = if rejoin { head } else { head.saturating_sub(room.rewind.unwrap_or(0)) };
                            room.last_offset = Some(floor);
                            room.missing.clear();
                        }
                        room.epoch = Some(epoch.clone());
                    }
                    _ => {
                        room.epoch = None;
                        room.last_offset = None;
                        room.missing.clear();
                    }
                }
                let recovered = reply.recovered == Some(true);
                if !recovered && rejoin {
                    tracing::debug!(room = name, r, ?reply.recovered, ?reply.offset, recovering_gap, "rejoin not recovered");
                }
                if (rejoin && !recovering_gap) || (recovering_gap && !recovered) {
                    let q = room.queue.clone();
                    drop(st);
                    shared.deliver(&q, RoomEvent::Rejoined { recovered });
                    st = shared.state.lock();
                }
                if let Some(w) = st.rooms.get_mut(name).and_then(|r| r.waiter.take()) {
                    let _ = w.send(Ok(()));
                }
            }
            Err(e) if in_rejoin && e.code().is_some_and(|c| c.0 == 429) => {
                // Over the in-flight limit: try again after another answer.
                room.join_ref = None;
                self.rejoin_waiting.push_back(name.to_owned());
            }
            Err(e) => {
                // Refused: the client stops rejoining this room.
                let room = st.rooms.remove(name).expect("checked above");
                room.queue.close();
                if let Some(w) = room.waiter {
                    let _ = w.send(Err(e));
                } else {
                    tracing::warn!(room = name, error = %e, "switchboard client: rejoin refused");
                    st.closed_rooms.insert((name.to_owned(), room.id), e);
                }
            }
        }
        drop(st);
        if in_rejoin {
            self.send_rejoins();
        }
    }

    fn event(&mut self, env: Envelope) {
        let data = env.data.unwrap_or_else(|| Payload::null(self.shared.format));
        let Some(event) = env.event else {
            self.shared.count_malformed();
            return;
        };
        let item = Event { room: env.room.clone(), event, data, offset: env.offset };
        let Some(name) = env.room else {
            // Nobody reads direct events until the stream is taken: do not
            // fill (and count drops in) a stream without a reader.
            if self.shared.direct_taken.load(Ordering::Relaxed) {
                self.shared.deliver(&self.shared.direct, RoomEvent::Event(item));
            }
            return;
        };
        let queue = {
            let mut st = self.shared.state.lock();
            let Some(room) = st.rooms.get_mut(&name) else { return }; // left: ignore (§3.7)
            if let Some(off) = env.offset {
                if let Some(i) = room.missing.iter().position(|(a, b)| (*a..=*b).contains(&off)) {
                    // A recovered event from a gap.
                    let (a, b) = room.missing.remove(i);
                    if a < off {
                        room.missing.push((a, off - 1));
                    }
                    if off < b {
                        room.missing.push((off + 1, b));
                    }
                    room.missing.truncate(MAX_MISSING);
                } else if room.last_offset.is_some_and(|last| off <= last) {
                    return; // already delivered
                } else {
                    room.last_offset = Some(off);
                }
            }
            room.queue.clone()
        };
        self.shared.deliver(&queue, RoomEvent::Event(item));
    }

    fn presence(&mut self, env: Envelope) {
        let (Some(name), Some(data)) = (env.room, env.data) else {
            self.shared.count_malformed();
            return;
        };
        let st = self.shared.state.lock();
        let Some(room) = st.rooms.get(&name) else { return };
        let mut result = Ok(());
        room.presence.send_modify(|view| {
            result = if env.kind == Kind::PresenceState {
                presence::apply_state(view, &data)
            } else {
                presence::apply_diff(view, &data)
            };
        });
        drop(st);
        if let Err(e) = result {
            tracing::warn!(room = name, error = %e, "switchboard client: invalid presence message");
            self.shared.count_malformed();
        }
    }

    /// A server `leave` (protocol §3.3.1): the host closed the room. The
    /// client stops rejoining it and ends its stream; the reason is the
    /// room's [`Room::closed_reason`](super::Room::closed_reason).
    fn room_closed(&mut self, env: Envelope) {
        let Some(name) = env.room else { return self.shared.count_malformed() };
        let mut st = self.shared.state.lock();
        // Only a room joined on this connection: a join still in flight was
        // not yet a member when the room was closed.
        if !st.rooms.get(&name).is_some_and(|r| r.joined && r.join_ref.is_none()) {
            return;
        }
        let room = st.rooms.remove(&name).expect("checked above");
        room.queue.close();
        let why = env.message.unwrap_or_default();
        let e = ClientError::new(ClientErrorKind::Closed, format!("the server closed the room: {why}"));
        st.closed_rooms.insert((name, room.id), e);
    }

    fn gap(&mut self, env: Envelope) {
        let (Some(name), Some(gap)) = (env.room, env.data.and_then(|d| d.decode::<GapData>().ok())) else {
            self.shared.count_malformed();
            return;
        };
        let generation = self.generation;
        let shared = self.shared.clone();
        let mut st = shared.state.lock();
        let Some(room) = st.rooms.get_mut(&name) else { return };
        // Only a slow-consumer gap can be recovered: `missed` events are no
        // longer in the store (a rejoin would answer `recovered: false`).
        let recovering = gap.reason == "slow_consumer"
            && room.epoch.is_some()
            && gap.epoch.as_ref().is_none_or(|e| room.epoch.as_ref() == Some(e))
            && gap.from > 0
            && gap.from <= gap.to
            && room.missing.len() < MAX_MISSING
            && room.joined;
        let queue = room.queue.clone();
        // A recovery already under way covers this range too: its rejoin
        // replays from before the first missing offset up to the head.
        let start_recovery = recovering && !room.recovering;
        if recovering {
            room.missing.push((gap.from, gap.to));
            room.recovering = true;
        } else if gap.reason == "epoch_changed" {
            // Positions start over in the new epoch, from offset 1.
            room.epoch = gap.epoch.clone();
            room.last_offset = room.epoch.as_ref().map(|_| 0);
            room.missing.clear();
        } else if gap.to > 0 {
            // Lost for good: carry on after it (the application resyncs).
            room.last_offset = Some(room.last_offset.map_or(gap.to, |l| l.max(gap.to)));
        }
        if start_recovery {
            // Leave, then rejoin from just before the gap: the server
            // replays from there; the event path delivers only the missing
            // offsets and newer ones.
            self.recovery_messages(&mut st, &name, generation);
        }
        drop(st);
        let item = Gap { from: gap.from, to: gap.to, reason: gap.reason, recovering };
        self.shared.deliver(&queue, RoomEvent::Gap(item));
    }
}

fn read_result(msg: Option<Result<Message, TransportError>>) -> Result<Message, Disconnect> {
    match msg {
        // A killed server (or a reset on the way): the TCP connection ended
        // without a close frame. That is a dropped connection (1006), not
        // something the server did wrong.
        None => Err(Disconnect::Dropped("the server went away without a close frame".into())),
        Some(Ok(m)) => Ok(m),
        Some(Err(e)) => Err(read_error(e)),
    }
}

fn read_error(e: TransportError) -> Disconnect {
    match e {
        TransportError::Closed | TransportError::Io(_) => Disconnect::Dropped(e.to_string()),
        other => Disconnect::Protocol(other.to_string()),
    }
}

fn write_error(e: TransportError) -> Disconnect {
    Disconnect::Dropped(format!("write failed: {e}"))
}

impl Shared {
    /// Builds the `join` for `name` on connection `generation` and records
    /// it (the room's `join_ref`, a pending entry). The position sent is
    /// the last delivered offset, or just before the oldest missing range.
    pub(crate) fn join_message(&self, st: &mut State, name: &str, generation: u64) -> Option<Outgoing> {
        let r = self.next_ref();
        let room = st.rooms.get_mut(name)?;
        let mut env = Envelope::new(Kind::Join).with_room(name).with_ref(r);
        if let Some(params) = &room.params {
            env = env.with_data(params.clone());
        }
        match (&room.epoch, room.last_offset) {
            (Some(epoch), Some(last)) if room.ever_joined => {
                let from = room.missing.iter().map(|(a, _)| a.saturating_sub(1)).min().map_or(last, |m| m.min(last));
                env = env.with_position(from, epoch.clone());
            }
            _ if !room.ever_joined => {
                if let Some(n) = room.rewind {
                    env = env.with_rewind(n);
                }
            }
            _ => {}
        }
        let bytes = self.encode(&env).ok()?;
        room.join_ref = Some(r);
        room.sent_on = Some(generation);
        st.pending.insert(r, Pending { kind: PendingKind::Join { room: name.to_owned() }, sent_on: None });
        Some(Outgoing::control(bytes, Some(r)))
    }
}
