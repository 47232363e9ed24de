//! The Server-Sent Events endpoint (feature `sse`): a `text/event-stream`
//! response carries the server's envelopes, and HTTP `POST`s carry the
//! client's, so a page with only `EventSource` and `fetch` can do what a
//! WebSocket client does. `docs/sse.md` is the client's guide.
//!
//! ```no_run
//! # async fn run() -> std::io::Result<()> {
//! use axum::Router;
//! use switchboard::integration::sse::SseEndpoint;
//! use switchboard::Hub;
//!
//! let hub = Hub::builder().build();
//! let sse = SseEndpoint::new(hub.clone());
//! // GET streams, POST sends envelopes, OPTIONS answers CORS preflights.
//! let app: Router = Router::new().route("/events", switchboard::integration::axum::sse(sse));
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
//! // Body timeout for slow POSTs, head limits, connection caps at accept:
//! switchboard::integration::axum::serve(listener, app, Default::default()).await
//! # }
//! ```
//!
//! Without axum, call [`SseEndpoint::handle`] from a hyper `service_fn`: it
//! takes any `http::Request` whose body implements `http_body::Body` and
//! returns an `http::Response<SseBody>`.
//!
//! # How a stream runs
//!
//! - `GET` is admitted exactly like a WebSocket upgrade:
//!   [`Hub::admit`](crate::Hub::admit) (origin, connection limits and rate)
//!   and [`Hub::authenticate`](crate::Hub::authenticate). The stream's rooms
//!   (query `room=…`, repeated, and/or the host's [`SseEndpointBuilder::rooms`])
//!   are joined through the normal `join` path, so the join authorizer
//!   applies. The first event, `$session`, gives the session id and secret
//!   for POSTs.
//! - Every server envelope becomes one event: an `event` envelope is named
//!   by its event name, every other type `$<type>` (`$hello`, `$reply`, …);
//!   `data:` is the envelope's JSON. Events of a stream room that carry an
//!   `offset` get an `id:` describing every room's position, so the
//!   browser's `Last-Event-ID` resumes them all. The session, not the
//!   transport, joins the stream's rooms, names its events and keeps its
//!   ids (`hub/session/sse_stream`); the transport only moves frames.
//! - `POST` with `switchboard-session` and `switchboard-secret` headers and
//!   a body of one envelope or a JSON array of them: `202` when they were
//!   queued for the session, whichever node holds it (the backplane carries
//!   it there, module `route`).
//!
//! # Liveness
//!
//! The transport reports native pings: the hub's heartbeat ping is written
//! as a comment line, and once it is handed to the response body the
//! transport feeds the session a pong. A client that stops reading stops
//! taking the body, the ping is never handed over, and the heartbeat closes
//! the session (4001). Between pings, a keep-alive comment goes out when
//! nothing was written for [`SseConfig::keep_alive`]; a stream whose body
//! is not polled for a whole keep-alive period after one fell due is ended.
//! A client that disconnects drops the body, which ends the session at once.

mod route;

use crate::auth::{Identity, Rejection};
use crate::hub::room::validate_room_name;
use crate::hub::session::sse_stream::{resume, StreamSpec};
use crate::hub::Hub;
use crate::protocol::{Format, Version, SUBPROTOCOL_JSON, SUBPROTOCOL_V2_JSON};
use crate::security::OriginPolicy;
use crate::transport::sse::conn::{self, CloseRetry, Shared, StreamBody};
use crate::transport::sse::encode::Batch;
use crate::transport::{Frame, Handshake};
use crate::util::AbortOnDrop;
use bytes::Bytes;
use futures::StreamExt;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::BodyExt;
use parking_lot::Mutex;
use serde_json::value::RawValue;
use std::collections::HashMap;
use std::convert::Infallible;
use std::fmt;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::oneshot;

/// Header naming the session a POST is for.
pub const SESSION_HEADER: &str = "switchboard-session";
/// Header carrying the session's secret on a POST.
pub const SECRET_HEADER: &str = "switchboard-secret";

/// Forwarded POSTs waiting for the holding node's answer, per endpoint; more
/// are refused with 503.
const MAX_PENDING_FORWARDS: usize = 4096;

/// SSE settings. Every default is in the field's docs.
///
/// ```
/// use std::time::Duration;
/// use switchboard::integration::sse::SseConfig;
/// let config = SseConfig::default().keep_alive(Duration::from_secs(30)).max_post_size(16 * 1024);
/// assert_eq!(config.retry, Duration::from_secs(3));
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct SseConfig {
    /// A comment line is written when nothing else was for this long, so
    /// proxies do not time the stream out; a stream that cannot take one
    /// for a whole period after it fell due is ended. Zero turns
    /// keep-alives (and that check) off. Default 15 s.
    pub keep_alive: Duration,
    /// The `retry:` sent when a stream opens: how long a browser waits
    /// before reconnecting after the stream drops. Default 3 s.
    pub retry: Duration,
    /// The `retry:` before a reconnectable `$close` (shutdown, slow
    /// consumer, …): each stream gets this plus a random share of it again,
    /// so a restarted server is not hit by every browser at once. Default 2 s.
    pub close_retry: Duration,
    /// Longest the hub's authenticator may take; over it the stream is
    /// refused like a 503. Default 10 s.
    pub handshake_timeout: Duration,
    /// Largest POST body, in bytes; larger gets 413. Each envelope must also
    /// fit [`HubConfig::max_message_size`](crate::HubConfig::max_message_size).
    /// Default 64 KiB.
    pub max_post_size: usize,
    /// Most envelopes in one POST (a JSON array); more gets 413. At most
    /// [`SseConfig::inbound_capacity`]. Default 32.
    pub max_post_envelopes: usize,
    /// Envelopes a session's inbound queue holds before its reader takes
    /// them; a POST that does not fit gets 429 (the whole POST: none of it
    /// is queued). Default 64.
    pub inbound_capacity: usize,
    /// How long a POST for a session on another node waits for that node's
    /// answer over the backplane before 504. Default 5 s.
    pub forward_timeout: Duration,
    /// Whether the query parameter `room` (repeatable) chooses rooms to
    /// join. Default `true`.
    pub query_rooms: bool,
    /// Answer refusals a client should retry (503 shutting down or full,
    /// 429 connection rate or per-address limit) with `200` and an event
    /// stream of just a `retry:` and a `$close` event, because
    /// `EventSource` gives up for good on any non-200 answer. Default `true`.
    pub retry_refusals: bool,
    /// When a room of the stream reports a `gap` of reason `slow_consumer`
    /// (events dropped for a slow reader, still in history), end the
    /// stream with `$close` 4002 after the `$gap` event, so the browser
    /// reconnects with its `Last-Event-ID` and the recovering join replays
    /// what was missed. With `false`, `$gap` is only passed on. (Gaps whose
    /// events are gone get `$resync` either way.) Default `true`.
    pub reconnect_on_gap: bool,
    /// Send `Access-Control-Allow-Credentials: true` to allowed cross-origin
    /// pages (cookies on `EventSource({withCredentials: true})` and
    /// `fetch({credentials: "include"})`). Never sent under
    /// [`OriginPolicy::Any`]. Default `true`.
    pub allow_credentials: bool,
}

impl Default for SseConfig {
    fn default() -> Self {
        SseConfig {
            keep_alive: Duration::from_secs(15),
            retry: Duration::from_secs(3),
            close_retry: Duration::from_secs(2),
            handshake_timeout: Duration::from_secs(10),
            max_post_size: 64 * 1024,
            max_post_envelopes: 32,
            inbound_capacity: 64,
            forward_timeout: Duration::from_secs(5),
            query_rooms: true,
            retry_refusals: true,
            reconnect_on_gap: true,
            allow_credentials: true,
        }
    }
}

macro_rules! setters {
    ($($name:ident: $ty:ty,)*) => {
        impl SseConfig {
            $(
                #[doc = concat!("Sets [`SseConfig::", stringify!($name), "`].")]
                pub fn $name(mut self, value: $ty) -> Self {
                    self.$name = value;
                    self
                }
            )*
        }
    };
}

setters! {
    keep_alive: Duration,
    retry: Duration,
    close_retry: Duration,
    handshake_timeout: Duration,
    max_post_size: usize,
    max_post_envelopes: usize,
    inbound_capacity: usize,
    forward_timeout: Duration,
    query_rooms: bool,
    retry_refusals: bool,
    reconnect_on_gap: bool,
    allow_credentials: bool,
}

type RoomsFn = Arc<dyn Fn(&Handshake, &Identity) -> Vec<String> + Send + Sync>;

struct Inner {
    hub: Hub,
    config: SseConfig,
    rooms: Option<RoomsFn>,
    /// Live sessions by key. Locked only to insert, remove or clone an
    /// entry; never across an await.
    sessions: Mutex<HashMap<u64, Arc<Shared>>>,
    /// Forwarded POSTs waiting for an answer, by request id (bounded by
    /// [`MAX_PENDING_FORWARDS`]).
    pending: Mutex<HashMap<u64, oneshot::Sender<u16>>>,
    next_request: AtomicU64,
    routing: tokio::sync::OnceCell<AbortOnDrop>,
    keepalive: OnceLock<AbortOnDrop>,
}

/// The SSE endpoint of a hub: serves streams (`GET`), upstream envelopes
/// (`POST`) and CORS preflights (`OPTIONS`) on one path.
///
/// Cheap to clone. Use **one endpoint per hub**: the endpoint keeps the
/// registry of its streams that POSTs (and POSTs forwarded from other
/// nodes) are delivered through.
#[derive(Clone)]
pub struct SseEndpoint {
    inner: Arc<Inner>,
}

impl fmt::Debug for SseEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SseEndpoint")
            .field("node", &format_args!("{:016x}", self.inner.hub.node_id()))
            .field("config", &self.inner.config)
            .field("streams", &self.streams())
            .finish()
    }
}

/// Builds an [`SseEndpoint`].
#[must_use]
pub struct SseEndpointBuilder {
    hub: Hub,
    config: SseConfig,
    rooms: Option<RoomsFn>,
}

impl fmt::Debug for SseEndpointBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SseEndpointBuilder").field("config", &self.config).finish_non_exhaustive()
    }
}

impl SseEndpointBuilder {
    /// Replaces the configuration.
    pub fn config(mut self, config: SseConfig) -> Self {
        self.config = config;
        self
    }

    /// Rooms every stream joins, chosen by the host from the request and
    /// the authenticated identity; joined after the query's rooms, through
    /// the same `join` path (the join authorizer applies).
    pub fn rooms(mut self, f: impl Fn(&Handshake, &Identity) -> Vec<String> + Send + Sync + 'static) -> Self {
        self.rooms = Some(Arc::new(f));
        self
    }

    /// Builds the endpoint.
    pub fn build(self) -> SseEndpoint {
        let mut config = self.config;
        config.inbound_capacity = config.inbound_capacity.max(1);
        config.max_post_envelopes = config.max_post_envelopes.clamp(1, config.inbound_capacity);
        SseEndpoint {
            inner: Arc::new(Inner {
                hub: self.hub,
                config,
                rooms: self.rooms,
                sessions: Mutex::new(HashMap::new()),
                pending: Mutex::new(HashMap::new()),
                next_request: AtomicU64::new(1),
                routing: tokio::sync::OnceCell::new(),
                keepalive: OnceLock::new(),
            }),
        }
    }
}

/// The body of every response of an [`SseEndpoint`]: an event stream, or a
/// small JSON document.
pub struct SseBody(BodyKind);

enum BodyKind {
    Full(Option<Bytes>),
    Stream(Box<StreamBody>),
}

impl fmt::Debug for SseBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            BodyKind::Full(b) => f.debug_tuple("SseBody::Full").field(&b.as_ref().map(Bytes::len)).finish(),
            BodyKind::Stream(_) => f.write_str("SseBody::Stream"),
        }
    }
}

impl SseBody {
    fn full(b: impl Into<Bytes>) -> SseBody {
        SseBody(BodyKind::Full(Some(b.into())))
    }

    fn empty() -> SseBody {
        SseBody(BodyKind::Full(None))
    }
}

impl Body for SseBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
        match &mut self.get_mut().0 {
            BodyKind::Full(b) => Poll::Ready(b.take().map(|b| Ok(http_body::Frame::data(b)))),
            BodyKind::Stream(s) => s.poll_chunk(cx).map(|c| c.map(|b| Ok(http_body::Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(&self.0, BodyKind::Full(None))
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match &self.0 {
            BodyKind::Full(b) => http_body::SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            BodyKind::Stream(_) => http_body::SizeHint::default(),
        }
    }
}

/// What happened to a POST's envelopes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Delivery {
    Accepted(usize),
    UnknownSession,
    WrongSecret,
    Full,
}

impl Delivery {
    fn status(self) -> u16 {
        match self {
            Delivery::Accepted(_) => 202,
            Delivery::UnknownSession => 404,
            Delivery::WrongSecret => 403,
            Delivery::Full => 429,
        }
    }
}

fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    if getrandom::fill(&mut b).is_err() {
        // No OS randomness (never on supported platforms): fall back to
        // the hub's randomly keyed hash, one word at a time.
        for chunk in b.chunks_mut(8) {
            let w = crate::util::random_u64().to_le_bytes();
            chunk.copy_from_slice(&w[..chunk.len()]);
        }
    }
    b
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != N * 2 || !s.bytes().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[i * 2..i * 2 + 2], 16).ok()?;
    }
    Some(out)
}

/// `<node:16 hex><key:16 hex>`.
fn session_id(node: u64, key: u64) -> String {
    format!("{node:016x}{key:016x}")
}

fn parse_session_id(s: &str) -> Option<(u64, u64)> {
    let b: [u8; 16] = unhex(s)?;
    let node = u64::from_be_bytes(b[..8].try_into().ok()?);
    let key = u64::from_be_bytes(b[8..].try_into().ok()?);
    Some((node, key))
}

fn json_response(status: StatusCode, body: serde_json::Value) -> Response<SseBody> {
    let mut res = Response::new(SseBody::full(body.to_string()));
    *res.status_mut() = status;
    res.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    res.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}

fn error_response(status: StatusCode, message: &str) -> Response<SseBody> {
    json_response(status, serde_json::json!({ "status": status.as_u16(), "error": message }))
}

/// Whether the request's `Origin` is allowed, and which CORS headers to
/// send: `Ok(None)` when there is no `Origin` (same-origin or not a browser).
type CorsOrigin = Result<Option<HeaderValue>, Rejection>;

impl SseEndpoint {
    /// An endpoint with the default [`SseConfig`] and rooms from the query only.
    pub fn new(hub: Hub) -> SseEndpoint {
        SseEndpoint::builder(hub).build()
    }

    /// A builder for an endpoint of `hub`.
    pub fn builder(hub: Hub) -> SseEndpointBuilder {
        SseEndpointBuilder { hub, config: SseConfig::default(), rooms: None }
    }

    /// The configuration.
    pub fn config(&self) -> &SseConfig {
        &self.inner.config
    }

    /// Streams open on this endpoint now.
    pub fn streams(&self) -> usize {
        self.inner.sessions.lock().len()
    }

    /// Serves one request: `GET` opens a stream, `POST` delivers envelopes
    /// to a stream's session, `OPTIONS` answers a CORS preflight; anything
    /// else gets 405. `peer` is the client's socket address when known (the
    /// per-address limit and trusted proxies need it).
    pub async fn handle<B>(&self, req: Request<B>, peer: Option<SocketAddr>) -> Response<SseBody>
    where
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let method = req.method().clone();
        // Boxed: a hyper HTTP/1 connection keeps the allocation of its
        // request's future (sized for this one) for as long as it lives,
        // and a stream's connection lives long; the opening and the POST
        // futures are large and needed only until the response is made.
        if method == Method::GET {
            Box::pin(self.stream(req, peer)).await
        } else if method == Method::POST {
            Box::pin(self.post(req, peer)).await
        } else if method == Method::OPTIONS {
            self.preflight(req.headers(), peer)
        } else {
            let mut res = error_response(StatusCode::METHOD_NOT_ALLOWED, "use GET, POST or OPTIONS");
            res.headers_mut().insert(header::ALLOW, HeaderValue::from_static("GET, POST, OPTIONS"));
            res
        }
    }

    /// The origin decision for a request (the hub's origin policy, as for a
    /// WebSocket upgrade; `X-Forwarded-Host` counts only from a trusted proxy).
    fn cors_origin(&self, headers: &HeaderMap, peer: Option<SocketAddr>) -> CorsOrigin {
        let security = self.inner.hub.security();
        let trusted = peer.is_some_and(|p| security.trusted_proxies.iter().any(|n| n.contains(p.ip())));
        let forwarded = headers
            .get("x-forwarded-host")
            .and_then(|v| v.to_str().ok())
            .map(|v| v.split(',').next().unwrap_or("").trim());
        let host = match forwarded {
            Some(h) if trusted => Some(h),
            _ => headers.get(header::HOST).and_then(|v| v.to_str().ok()),
        };
        crate::security::check_origin(security, headers, host, "cross-origin request refused")?;
        Ok(headers.get(header::ORIGIN).cloned())
    }

    fn add_cors(&self, res: &mut Response<SseBody>, origin: Option<HeaderValue>) {
        let Some(origin) = origin else { return };
        let h = res.headers_mut();
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        h.append(header::VARY, HeaderValue::from_static("origin"));
        if self.inner.config.allow_credentials && self.inner.hub.security().origin != OriginPolicy::Any {
            h.insert(header::ACCESS_CONTROL_ALLOW_CREDENTIALS, HeaderValue::from_static("true"));
        }
    }

    fn preflight(&self, headers: &HeaderMap, peer: Option<SocketAddr>) -> Response<SseBody> {
        let origin = match self.cors_origin(headers, peer) {
            Ok(o) => o,
            Err(rej) => return error_response(rej.status(), rej.message()),
        };
        let mut res = Response::new(SseBody::empty());
        *res.status_mut() = StatusCode::NO_CONTENT;
        self.add_cors(&mut res, origin);
        let h = res.headers_mut();
        h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, HeaderValue::from_static("GET, POST"));
        h.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static(
                "content-type, last-event-id, authorization, switchboard-session, switchboard-secret",
            ),
        );
        h.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static("600"));
        res
    }

    /// A refusal of a stream: its HTTP status, or — for the ones a client
    /// should retry, when [`SseConfig::retry_refusals`] — a 200 event
    /// stream of a `retry:` and a `$close`, because `EventSource` stops on
    /// any non-200 answer.
    fn refuse_stream(&self, rej: &Rejection, origin: Option<HeaderValue>) -> Response<SseBody> {
        let status = rej.status();
        let retryable = status == StatusCode::SERVICE_UNAVAILABLE || status == StatusCode::TOO_MANY_REQUESTS;
        let mut res = if retryable && self.inner.config.retry_refusals {
            let wait = rej.retry_after().unwrap_or_default().max(self.inner.config.retry);
            let mut batch = Batch::default();
            batch.retry(wait.as_millis() as u64);
            let data = serde_json::json!({
                "code": 1013, "reason": rej.message(), "reconnect": true, "status": status.as_u16()
            });
            batch.event(None, Some("$close"), &Bytes::from(data.to_string()));
            let mut res = Response::new(SseBody::full(batch.take().concat()));
            stream_headers(res.headers_mut());
            res
        } else {
            let mut res = error_response(status, rej.message());
            if let Some(after) = rej.retry_after() {
                let secs = after.as_secs_f64().ceil().max(1.0) as u64;
                res.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
            }
            res
        };
        self.add_cors(&mut res, origin);
        res
    }

    async fn stream<B>(&self, req: Request<B>, peer: Option<SocketAddr>) -> Response<SseBody> {
        let inner = &self.inner;
        let hub = &inner.hub;
        let (parts, _body) = req.into_parts();
        // A reconnect after a terminal close: tell the browser to stop.
        let last_id = parts
            .headers
            .get("last-event-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .or_else(|| query_values(&parts.uri, "lastEventId").into_iter().next());
        let max_rooms = hub.config().max_rooms_per_connection;
        let last = last_id.as_deref().map(|id| resume::decode(id.trim(), max_rooms));
        if let Some(Some(resume::LastId::Stop)) = last {
            let mut res = Response::new(SseBody::empty());
            *res.status_mut() = StatusCode::NO_CONTENT;
            let origin = self.cors_origin(&parts.headers, peer).ok().flatten();
            self.add_cors(&mut res, origin);
            return res;
        }
        let mut hs = Handshake::new().with_uri(parts.uri.clone()).with_headers(parts.headers.clone());
        if let Some(p) = peer {
            hs = hs.with_peer(p);
        }
        let cors = self.cors_origin(&parts.headers, peer);
        let origin = cors.as_ref().ok().cloned().flatten();
        // The protocol version, as a WebSocket client picks it with its
        // subprotocol (`EventSource` sets no headers, so it is a query
        // parameter): version 2 sends compact `event` arrays (`docs/sse.md` §3.1).
        if let Some(protocol) = query_values(&parts.uri, "protocol").into_iter().next() {
            match stream_protocol(&protocol) {
                Some(name) => hs = hs.with_subprotocol(name),
                None => {
                    let msg = format!("protocol {protocol:?} is not {SUBPROTOCOL_V2_JSON} or {SUBPROTOCOL_JSON}");
                    let mut res = error_response(StatusCode::BAD_REQUEST, &msg);
                    self.add_cors(&mut res, origin);
                    return res;
                }
            }
        }
        let (admission, identity) = match hub.open_gate(&mut hs, inner.config.handshake_timeout).await {
            Ok(admitted) => admitted,
            // The hub's origin refusal is worded for a WebSocket upgrade;
            // the same decision, worded for this request, is in `cors`
            // (admission refuses a bad origin before the authenticator runs).
            Err(rej) => {
                let rej = match cors {
                    Err(own) if rej.status() == StatusCode::FORBIDDEN => own,
                    _ => rej,
                };
                return self.refuse_stream(&rej, origin);
            }
        };

        // The stream's rooms: the query's, then the host's; each once.
        let mut names: Vec<String> = Vec::new();
        if inner.config.query_rooms {
            names.extend(query_values(&parts.uri, "room"));
        }
        if let Some(f) = &inner.rooms {
            names.extend(f(&hs, &identity));
        }
        let mut rooms: Vec<Arc<str>> = Vec::new();
        for name in names {
            if let Err(why) = validate_room_name(&name) {
                let mut res = error_response(StatusCode::BAD_REQUEST, &format!("room {name:?}: {why}"));
                self.add_cors(&mut res, origin);
                return res;
            }
            if !rooms.iter().any(|r| **r == *name) {
                rooms.push(Arc::from(name));
            }
        }
        if rooms.len() > max_rooms {
            let msg = format!("at most {max_rooms} rooms per stream");
            let mut res = error_response(StatusCode::BAD_REQUEST, &msg);
            self.add_cors(&mut res, origin);
            return res;
        }

        // Where to resume each room from.
        let fingerprint = resume::fingerprint(&rooms);
        let mut positions = vec![None; rooms.len()];
        let mut resync_all = false;
        match last {
            Some(Some(resume::LastId::Positions { fingerprint: f, positions: found })) if f == fingerprint => {
                for (i, p) in found {
                    if let Some(slot) = positions.get_mut(i) {
                        *slot = Some(p);
                    }
                }
            }
            Some(_) => resync_all = !rooms.is_empty(),
            None => {}
        }

        if let Err(e) = self.ensure_routing().await {
            tracing::warn!(error = %e, "SSE: backplane subscription failed");
            let rej = Rejection::new(StatusCode::SERVICE_UNAVAILABLE, "backplane unavailable");
            return self.refuse_stream(&rej, origin);
        }
        self.ensure_keepalive();

        let key = u64::from_le_bytes(random_bytes::<8>());
        let secret = random_bytes::<16>();
        let shared = Arc::new(Shared::new(key, secret, inner.config.inbound_capacity));
        inner.sessions.lock().insert(key, shared.clone());
        let weak = Arc::downgrade(inner);
        let on_drop = Box::new(move || {
            if let Some(inner) = weak.upgrade() {
                inner.sessions.lock().remove(&key);
            }
        });

        // `rewind=N`: rooms without a position start with their N newest
        // retained events (rooms with history; ignored by the others).
        let rewind = query_values(&parts.uri, "rewind").first().and_then(|v| v.parse::<u64>().ok()).filter(|n| *n > 0);
        let mut first = Batch::default();
        first.retry(inner.config.retry.as_millis() as u64);
        let session = serde_json::json!({
            "session": session_id(hub.node_id(), key),
            "secret": hex(&secret),
            "node": format!("{:016x}", hub.node_id()),
            "rooms": rooms.iter().map(|r| &**r).collect::<Vec<_>>(),
            "keep_alive_ms": inner.config.keep_alive.as_millis() as u64,
            "max_post_size": inner.config.max_post_size,
            "max_post_envelopes": inner.config.max_post_envelopes,
        });
        first.event(None, Some("$session"), &Bytes::from(session.to_string()));
        if resync_all {
            for room in &rooms {
                let data = serde_json::json!({ "room": &**room, "reason": "Last-Event-ID not understood" });
                first.event(None, Some("$resync"), &Bytes::from(data.to_string()));
            }
        }
        let first = Bytes::from(first.take().concat());

        let base = inner.config.close_retry.as_millis() as u64;
        let jitter = if base == 0 { 0 } else { u64::from_le_bytes(random_bytes::<8>()) % base };
        let close = CloseRetry { retry_ms: base + jitter };
        let mut spec = StreamSpec::new(rooms, positions);
        spec.rewind = rewind;
        spec.reconnect_on_gap = inner.config.reconnect_on_gap;
        crate::metrics::sse_stream(spec.positions.iter().any(Option::is_some));
        let body = StreamBody::new(first, shared.clone());
        let transport = conn::SseTransport::new(shared, close, on_drop);
        // The session is registered now; its task does not keep the
        // handshake (the request's headers) for the stream's life.
        let serve = hub.serve_stream(transport, &hs, identity, spec);
        drop(hs);
        tokio::spawn(async move {
            // Held until the session ends, whichever way.
            let _admission = admission;
            serve.await;
        });

        let mut res = Response::new(SseBody(BodyKind::Stream(Box::new(body))));
        stream_headers(res.headers_mut());
        self.add_cors(&mut res, origin);
        res
    }

    async fn post<B>(&self, req: Request<B>, peer: Option<SocketAddr>) -> Response<SseBody>
    where
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let origin = match self.cors_origin(req.headers(), peer) {
            Ok(o) => o,
            Err(rej) => return error_response(rej.status(), rej.message()),
        };
        let mut res = self.post_inner(req).await;
        self.add_cors(&mut res, origin);
        res
    }

    async fn post_inner<B>(&self, req: Request<B>) -> Response<SseBody>
    where
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let inner = &self.inner;
        let cfg = &inner.config;
        let (parts, body) = req.into_parts();
        let header_str = |name: &str| parts.headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim);
        let Some((node, key)) = header_str(SESSION_HEADER).and_then(parse_session_id) else {
            return error_response(StatusCode::BAD_REQUEST, "missing or malformed switchboard-session header");
        };
        let Some(secret) = header_str(SECRET_HEADER).and_then(unhex::<16>) else {
            return error_response(StatusCode::FORBIDDEN, "missing or malformed switchboard-secret header");
        };
        let too_big = || error_response(StatusCode::PAYLOAD_TOO_LARGE, "body too large");
        if let Some(len) = header_str("content-length").and_then(|v| v.parse::<u64>().ok()) {
            if len > cfg.max_post_size as u64 {
                return too_big();
            }
        }
        drop(parts);
        let body = match http_body_util::Limited::new(body, cfg.max_post_size).collect().await {
            Ok(c) => c.to_bytes(),
            Err(e) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => return too_big(),
            Err(_) => return error_response(StatusCode::BAD_REQUEST, "could not read the body"),
        };
        let envelopes = match split_envelopes(&body, cfg.max_post_envelopes, inner.hub.config().max_message_size) {
            Ok(e) => e,
            Err((status, why)) => return error_response(status, why),
        };
        let delivery = if node == inner.hub.node_id() {
            inner.deliver(key, &secret, envelopes)
        } else {
            match self.forward(node, key, &secret, envelopes).await {
                Ok(d) => d,
                Err(res) => return res,
            }
        };
        match delivery {
            Delivery::Accepted(n) => json_response(StatusCode::ACCEPTED, serde_json::json!({ "accepted": n })),
            Delivery::UnknownSession => error_response(StatusCode::NOT_FOUND, "unknown session"),
            Delivery::WrongSecret => error_response(StatusCode::FORBIDDEN, "wrong secret"),
            Delivery::Full => {
                let mut res = error_response(StatusCode::TOO_MANY_REQUESTS, "the session's inbound queue is full");
                res.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                res
            }
        }
    }

    /// Sends envelopes to the node holding the session and waits for its
    /// answer.
    async fn forward(
        &self,
        node: u64,
        key: u64,
        secret: &[u8; 16],
        envelopes: Vec<Bytes>,
    ) -> Result<Delivery, Response<SseBody>> {
        let inner = &self.inner;
        let Some(backplane) = backplane_of(&inner.hub) else { return Ok(Delivery::UnknownSession) };
        if let Err(e) = self.ensure_routing().await {
            tracing::warn!(error = %e, "SSE: backplane subscription failed");
            return Err(error_response(StatusCode::SERVICE_UNAVAILABLE, "backplane unavailable"));
        }
        let id = inner.next_request.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut pending = inner.pending.lock();
            if pending.len() >= MAX_PENDING_FORWARDS {
                return Err(error_response(StatusCode::SERVICE_UNAVAILABLE, "too many forwarded requests"));
            }
            pending.insert(id, tx);
        }
        // Removes the entry however this ends (answer, timeout, the client
        // going away and the future being dropped).
        struct Forget<'a>(&'a Inner, u64);
        impl Drop for Forget<'_> {
            fn drop(&mut self) {
                self.0.pending.lock().remove(&self.1);
            }
        }
        let _forget = Forget(inner, id);
        let msg = route::encode_request(inner.hub.node_id(), id, key, secret, &envelopes);
        if let Err(e) = backplane.publish(&route::topic(node), msg).await {
            tracing::warn!(error = %e, "SSE: forwarding a POST failed");
            return Err(error_response(StatusCode::SERVICE_UNAVAILABLE, "backplane unavailable"));
        }
        let n = envelopes.len();
        match tokio::time::timeout(inner.config.forward_timeout, rx).await {
            Ok(Ok(202)) => Ok(Delivery::Accepted(n)),
            Ok(Ok(403)) => Ok(Delivery::WrongSecret),
            Ok(Ok(429)) => Ok(Delivery::Full),
            Ok(Ok(_)) => Ok(Delivery::UnknownSession),
            Ok(Err(_)) | Err(_) => {
                Err(error_response(StatusCode::GATEWAY_TIMEOUT, "the node holding the session did not answer"))
            }
        }
    }

    /// Subscribes this node's `$sse.<node>` topic once (when the hub has a
    /// backplane), before the first stream is answered, so a POST forwarded
    /// from another node always finds the subscription.
    async fn ensure_routing(&self) -> crate::Result<()> {
        let Some(backplane) = backplane_of(&self.inner.hub) else { return Ok(()) };
        let topic = route::topic(self.inner.hub.node_id());
        let weak = Arc::downgrade(&self.inner);
        self.inner
            .routing
            .get_or_try_init(|| async move {
                let sub = backplane.subscribe(&topic).await?;
                Ok(AbortOnDrop(tokio::spawn(routing_task(sub, weak, backplane))))
            })
            .await
            .map(|_| ())
    }

    fn ensure_keepalive(&self) {
        let period = self.inner.config.keep_alive;
        if period.is_zero() {
            return;
        }
        let weak = Arc::downgrade(&self.inner);
        self.inner.keepalive.get_or_init(|| AbortOnDrop(tokio::spawn(keepalive_task(weak, period))));
    }
}

impl Inner {
    /// Queues a POST's envelopes for a session of this node, all or none.
    fn deliver(&self, key: u64, secret: &[u8], envelopes: Vec<Bytes>) -> Delivery {
        let Some(shared) = self.sessions.lock().get(&key).cloned() else { return Delivery::UnknownSession };
        if !shared.secret_matches(secret) {
            return Delivery::WrongSecret;
        }
        let n = envelopes.len();
        if n == 0 {
            return Delivery::Accepted(0);
        }
        match shared.post(envelopes.into_iter().map(Frame::Text).collect()) {
            conn::Posted::Queued => Delivery::Accepted(n),
            conn::Posted::Full => Delivery::Full,
            conn::Posted::Closed => Delivery::UnknownSession,
        }
    }
}

fn backplane_of(hub: &Hub) -> Option<Arc<dyn crate::backplane::Backplane>> {
    hub.backplane().cloned()
}

/// The headers of an event stream: its type, and no caching or buffering
/// by proxies (`X-Accel-Buffering` is nginx's).
fn stream_headers(h: &mut HeaderMap) {
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream; charset=utf-8"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache, no-transform"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
}

/// The subprotocol a stream's `protocol` query parameter names, if it is
/// one of ours in JSON (a stream carries text only): read as a WebSocket
/// offer is, so a new version needs no change here.
fn stream_protocol(name: &str) -> Option<&'static str> {
    if Format::from_subprotocol(name)? != Format::Json {
        return None;
    }
    Some(Version::from_subprotocol(name)?.subprotocol(Format::Json))
}

/// Every value of query parameter `name`, percent-decoded.
fn query_values(uri: &http::Uri, name: &str) -> Vec<String> {
    let Some(q) = uri.query() else { return Vec::new() };
    q.split('&')
        .filter_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (crate::transport::percent_decode(k)? == name).then(|| crate::transport::percent_decode(v)).flatten()
        })
        .collect()
}

/// A POST body as envelopes: one JSON object, or an array of them.
fn split_envelopes(
    body: &Bytes,
    max_envelopes: usize,
    max_message_size: usize,
) -> Result<Vec<Bytes>, (StatusCode, &'static str)> {
    let not_json = (StatusCode::BAD_REQUEST, "the body must be a JSON object or an array of objects");
    let text = std::str::from_utf8(body).map_err(|_| not_json)?;
    let trimmed = text.trim_matches(|c: char| c.is_ascii_whitespace());
    let envelopes: Vec<Bytes> = if trimmed.starts_with('[') {
        let items: Vec<&RawValue> = serde_json::from_str(trimmed).map_err(|_| not_json)?;
        if items.len() > max_envelopes {
            return Err((StatusCode::PAYLOAD_TOO_LARGE, "too many envelopes in one POST"));
        }
        let mut out = Vec::with_capacity(items.len());
        for item in items {
            if !item.get().starts_with('{') {
                return Err(not_json);
            }
            out.push(Bytes::copy_from_slice(item.get().as_bytes()));
        }
        out
    } else if trimmed.starts_with('{') {
        serde_json::from_str::<&RawValue>(trimmed).map_err(|_| not_json)?;
        let start = trimmed.as_ptr() as usize - text.as_ptr() as usize;
        vec![body.slice(start..start + trimmed.len())]
    } else {
        return Err(not_json);
    };
    if envelopes.iter().any(|e| e.len() > max_message_size) {
        return Err((StatusCode::PAYLOAD_TOO_LARGE, "an envelope is larger than the maximum message size"));
    }
    Ok(envelopes)
}

/// Reads this node's `$sse.<node>` topic: delivers forwarded POSTs and
/// hands answers to the POSTs waiting for them.
async fn routing_task(
    mut sub: crate::backplane::Subscription,
    inner: Weak<Inner>,
    backplane: Arc<dyn crate::backplane::Backplane>,
) {
    while let Some(item) = sub.next().await {
        let Some(inner) = inner.upgrade() else { return };
        let bytes = match item {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "SSE: routing subscription reported a problem");
                continue;
            }
        };
        match route::decode(bytes, inner.config.max_post_envelopes) {
            Some(route::Message::Request { from, id, key, secret, envelopes }) => {
                let status = inner.deliver(key, &secret, envelopes).status();
                // Answer without holding up the next request.
                let publish = backplane.publish(&route::topic(from), route::encode_answer(id, status));
                tokio::spawn(async move {
                    if let Err(e) = publish.await {
                        tracing::warn!(error = %e, "SSE: answering a forwarded POST failed");
                    }
                });
            }
            Some(route::Message::Answer { id, status }) => {
                if let Some(tx) = inner.pending.lock().remove(&id) {
                    let _ = tx.send(status);
                }
            }
            None => tracing::warn!("SSE: ignoring a malformed routing message"),
        }
    }
}

/// One task per endpoint: every half keep-alive period, each stream that
/// wrote nothing since the last look gets a keep-alive comment due (one
/// timer for all streams, not one per stream).
async fn keepalive_task(inner: Weak<Inner>, period: Duration) {
    let mut tick = tokio::time::interval((period / 2).max(Duration::from_millis(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        let streams: Vec<Arc<Shared>> = inner.sessions.lock().values().cloned().collect();
        drop(inner);
        for s in streams {
            s.tick();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[allow(dead_code)]
    fn handle_is_send(e: SseEndpoint, r: Request<http_body_util::Empty<Bytes>>) {
        fn send<T: Send>(_: T) {}
        send(e.handle(r, None));
    }

    #[test]
    fn ids_and_bodies() {
        let id = session_id(0xabc, 0x123);
        assert_eq!(parse_session_id(&id), Some((0xabc, 0x123)));
        assert_eq!(parse_session_id("xyz"), None);
        assert_eq!(unhex::<2>("0aff"), Some([0x0a, 0xff]));
        assert_eq!(hex(&[0x0a, 0xff]), "0aff");
        let max = 1024;
        let one = Bytes::from_static(b"  {\"type\":\"ping\"}\n");
        assert_eq!(split_envelopes(&one, 4, max).unwrap(), vec![Bytes::from_static(b"{\"type\":\"ping\"}")]);
        let arr = Bytes::from_static(b"[{\"type\":\"ping\"}, {\"a\":[1]}]");
        assert_eq!(split_envelopes(&arr, 4, max).unwrap().len(), 2);
        assert_eq!(split_envelopes(&arr, 1, max).unwrap_err().0, StatusCode::PAYLOAD_TOO_LARGE);
        for bad in ["", "nope", "[1]", "{\"a\":", "[{}", "\"s\"", "{} {}"] {
            assert_eq!(split_envelopes(&Bytes::from(bad), 4, max).unwrap_err().0, StatusCode::BAD_REQUEST, "{bad}");
        }
        assert_eq!(split_envelopes(&Bytes::from(vec![0xff, b'{']), 4, max).unwrap_err().0, StatusCode::BAD_REQUEST);
        let big = Bytes::from(format!("{{\"data\":\"{}\"}}", "x".repeat(2000)));
        assert_eq!(split_envelopes(&big, 4, max).unwrap_err().0, StatusCode::PAYLOAD_TOO_LARGE);
    }
}
