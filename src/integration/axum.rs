//! Mount the WebSocket endpoint in an axum router (feature `axum`).
//!
//! ```no_run
//! use axum::{routing::get, Router};
//! use switchboard::Hub;
//!
//! # async fn run() -> std::io::Result<()> {
//! let hub = Hub::builder().build();
//! let app: Router = Router::new()
//!     .route("/", get(|| async { "hello" }))
//!     .route("/ws", switchboard::integration::axum::route(hub.clone()));
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
//! switchboard::integration::axum::serve(listener, app, Default::default()).await
//! # }
//! ```
//!
//! Serve the router with [`serve`] (not `axum::serve`): it times out
//! request heads and bodies, limits head sizes, and counts connections per
//! address and in total from their accept ([`ServeConfig`]); `axum::serve`
//! does none of this. With another server, give the requests a
//! `ConnectInfo<SocketAddr>` extension
//! (`into_make_service_with_connect_info::<SocketAddr>()`), or the hub's
//! per-address limit is skipped.
//!
//! The upgrade goes through hyper directly (not axum's own `WebSocket`
//! type): the request is validated and negotiated exactly as the standalone
//! listener does, the hub's authenticator runs before any upgrade (a refusal
//! is its HTTP status), and the upgraded connection is handed to the same
//! tokio-tungstenite transport. The peer address is known when the app is
//! served with `into_make_service_with_connect_info::<SocketAddr>()`.
//!
//! Over HTTP/2 (with [`serve`], which advertises
//! `SETTINGS_ENABLE_CONNECT_PROTOCOL`) the route also accepts RFC 8441's
//! extended `CONNECT` with `:protocol = websocket`: the same negotiation
//! and gate, answered `200` instead of `101`, and the WebSocket runs on
//! that HTTP/2 stream, next to the page's other requests on one connection.

mod health;
mod serve;

pub use health::{health, liveness, readiness};
pub use serve::{serve, Serve, ServeConfig};

use crate::hub::Hub;
use crate::transport::ws::{negotiate, negotiate_h2, Refusal, WsConfig, WsTransport};
use crate::transport::Handshake;
use axum::body::Body;
use axum::extract::{ConnectInfo, Request};
use axum::response::Response;
use axum::routing::{get, MethodRouter};
use http::{header, HeaderValue, StatusCode};
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;

/// A `GET` route that upgrades to a switchboard WebSocket on `hub`, with the
/// default [`WsConfig`]. Usable in a router with any state type.
pub fn route<S>(hub: Hub) -> MethodRouter<S>
where
    S: Clone + Send + Sync + 'static,
{
    route_with_config(hub, WsConfig::default())
}

/// [`route`] with a custom [`WsConfig`].
pub fn route_with_config<S>(hub: Hub, config: WsConfig) -> MethodRouter<S>
where
    S: Clone + Send + Sync + 'static,
{
    // GET: the HTTP/1.1 upgrade; CONNECT: RFC 8441 over HTTP/2.
    let filter = axum::routing::MethodFilter::GET.or(axum::routing::MethodFilter::CONNECT);
    axum::routing::on(filter, move |req: Request| {
        let (hub, config) = (hub.clone(), config.clone());
        async move { upgrade(hub, config, req).await }
    })
}

fn refusal(r: Refusal) -> Response {
    let mut res = Response::new(Body::from(r.message));
    *res.status_mut() = r.status;
    res.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    for (k, v) in r.headers {
        if let Ok(v) = HeaderValue::from_str(&v) {
            res.headers_mut().insert(k, v);
        }
    }
    res
}

/// Handles one upgrade request: validate, authenticate, answer `101`, and
/// serve the connection on a spawned task once hyper hands it over.
pub async fn upgrade(hub: Hub, config: WsConfig, mut req: Request) -> Response {
    // HTTP/2: RFC 8441's extended CONNECT, answered `200`.
    let h2 = req.version() == http::Version::HTTP_2;
    let negotiated = if h2 {
        let protocol = req.extensions().get::<hyper::ext::Protocol>().map(hyper::ext::Protocol::as_str);
        negotiate_h2(req.method(), protocol, req.headers(), config.compression)
    } else {
        negotiate(req.method(), req.headers(), config.compression)
    };
    let negotiated = match negotiated {
        Ok(n) => n,
        Err(r) => return refusal(r),
    };
    // `serve`'s count of the connection's requests in flight: an HTTP/2
    // stream stays open as long as the WebSocket on it. (Over HTTP/1.1 the
    // upgrade ends the HTTP connection: nothing to keep.)
    let stream = req.extensions_mut().remove::<serve::Open>().filter(|_| h2);
    let Some(on_upgrade) = req.extensions_mut().remove::<hyper::upgrade::OnUpgrade>() else {
        return refusal(Refusal {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            headers: Vec::new(),
            message: "connection cannot be upgraded (served without upgrade support)".into(),
            close: None,
        });
    };
    let peer = req.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0);
    let (parts, _body) = req.into_parts();
    let mut hs = Handshake::new().with_uri(parts.uri).with_headers(parts.headers);
    if let Some(p) = peer {
        hs = hs.with_peer(p);
    }
    if let Some(p) = negotiated.subprotocol {
        hs = hs.with_subprotocol(p);
    }
    // The same gate as the standalone listener, before the upgrade.
    let (admission, identity) = match hub.open_gate(&mut hs, config.handshake_timeout).await {
        Ok(admitted) => admitted,
        Err(rej) => match super::ws::refusal(&rej) {
            // Said after the upgrade, for a browser (§7.3).
            Refusal { close: Some((code, reason)), .. } => {
                tokio::spawn(async move {
                    if let Ok(upgraded) = on_upgrade.await {
                        crate::transport::ws::close_upgraded(TokioIo::new(upgraded), code, &reason).await;
                    }
                    drop(stream);
                });
                return switching_protocols(&negotiated, h2);
            }
            r => return refusal(r),
        },
    };
    let deflate = negotiated.deflate;
    tracing::trace!(peer = ?peer, compressed = deflate.is_some(), "websocket upgrade accepted");
    tokio::spawn(async move {
        // The admission is held until the connection ends, whichever way:
        // the session task's end (or its cancellation) drops it and frees
        // the slots. The session gets a task of its own, so this one's
        // state (the upgrade, the handshake's headers) is freed at once.
        match on_upgrade.await {
            Ok(upgraded) => {
                let max = hub.config().max_message_size;
                let transport = WsTransport::upgraded(TokioIo::new(upgraded), &config, max, deflate);
                let session = hub.serve(transport, &hs, identity);
                super::ws::spawn_session(session, (admission, stream));
            }
            Err(e) => tracing::debug!(error = %e, "upgrade failed"),
        }
    });
    switching_protocols(&negotiated, h2)
}

/// The answer to a negotiated upgrade: `101` over HTTP/1.1, `200` over
/// HTTP/2 (RFC 8441 §5, with no upgrade headers and no accept key).
fn switching_protocols(negotiated: &crate::transport::ws::Negotiated, h2: bool) -> Response {
    let mut res = Response::new(Body::empty());
    if !h2 {
        *res.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    }
    let h = res.headers_mut();
    if !h2 {
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        if let Ok(v) = HeaderValue::from_str(&negotiated.accept) {
            h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
        }
    }
    if let Some(p) = negotiated.subprotocol {
        h.insert(header::SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static(p));
    }
    if negotiated.deflate.is_some() {
        h.insert(header::SEC_WEBSOCKET_EXTENSIONS, HeaderValue::from_static(crate::transport::ws::DEFLATE_RESPONSE));
    }
    res
}

/// A route serving an [`SseEndpoint`](crate::integration::sse::SseEndpoint)
/// (feature `sse`): `GET` opens a stream, `POST` delivers envelopes,
/// `OPTIONS` answers CORS preflights, other methods get 405. The peer
/// address is known when the app is served with
/// `into_make_service_with_connect_info::<SocketAddr>()`.
#[cfg(feature = "sse")]
pub fn sse<S>(endpoint: crate::integration::sse::SseEndpoint) -> MethodRouter<S>
where
    S: Clone + Send + Sync + 'static,
{
    axum::routing::any(move |req: Request| serve_sse(endpoint.clone(), req))
}

#[cfg(feature = "sse")]
async fn serve_sse(endpoint: crate::integration::sse::SseEndpoint, req: Request) -> Response {
    let peer = req.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0);
    endpoint.handle(req, peer).await.map(Body::new)
}

/// A `GET` route serving the browser client `switchboard.js`
/// ([`client_js::SOURCE`](crate::client_js::SOURCE)) as `text/javascript`,
/// with a strong `ETag` from its content hash and `Cache-Control: no-cache`
/// (browsers revalidate; an unchanged file costs a `304 Not Modified`).
///
/// ```no_run
/// # let hub = switchboard::Hub::builder().build();
/// let app: axum::Router = axum::Router::new()
///     .route("/switchboard.js", switchboard::integration::axum::client_js())
///     .route("/ws", switchboard::integration::axum::route(hub));
/// ```
pub fn client_js<S>() -> MethodRouter<S>
where
    S: Clone + Send + Sync + 'static,
{
    get(|req: Request| async move { serve_client_js(req.headers()) })
}

fn serve_client_js(headers: &http::HeaderMap) -> Response {
    use crate::client_js;
    let fresh = headers.get_all(header::IF_NONE_MATCH).iter().any(|v| v.to_str().is_ok_and(client_js::matches_etag));
    let mut res = if fresh {
        let mut res = Response::new(Body::empty());
        *res.status_mut() = StatusCode::NOT_MODIFIED;
        res
    } else {
        let mut res = Response::new(Body::from(client_js::SOURCE));
        res.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(client_js::CONTENT_TYPE));
        res
    };
    let h = res.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static(client_js::CACHE_CONTROL));
    h.insert(header::ETAG, HeaderValue::from_static(client_js::etag()));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    res
}
