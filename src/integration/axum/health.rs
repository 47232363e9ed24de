//! Liveness and readiness probes for load balancers and orchestrators.

use crate::hub::Hub;
use axum::body::Body;
use axum::response::Response;
use axum::routing::{get, MethodRouter};
use axum::Router;
use http::{header, HeaderValue, StatusCode};

/// A router with the two probes, to merge into the app:
///
/// | path | `200` | `503` |
/// |---|---|---|
/// | `/healthz` | the process serves requests (always, while it does) | never |
/// | `/readyz` | the hub takes new connections ([`Hub::is_ready`]) | from the start of [`Hub::drain`] or [`Hub::shutdown`] on |
///
/// Bodies are short `text/plain` (`ok`, `ready`, `draining`, `shutting
/// down`), never cached. Liveness stays `200` during a drain and shutdown:
/// an orchestrator must not kill a node that is closing its connections
/// gently; readiness turns `503` before the first close, so the load
/// balancer sends new clients elsewhere first.
///
/// ```no_run
/// # let hub = switchboard::Hub::builder().build();
/// let app: axum::Router = axum::Router::new()
///     .route("/ws", switchboard::integration::axum::route(hub.clone()))
///     .merge(switchboard::integration::axum::health(hub));
/// ```
pub fn health<S>(hub: Hub) -> Router<S>
where
    S: Clone + Send + Sync + 'static,
{
    Router::new().route("/healthz", liveness()).route("/readyz", readiness(hub))
}

/// The liveness probe alone (mounted at `/healthz` by [`health`]): `200 ok`.
pub fn liveness<S>() -> MethodRouter<S>
where
    S: Clone + Send + Sync + 'static,
{
    get(|| async { probe(StatusCode::OK, "ok") })
}

/// The readiness probe alone (mounted at `/readyz` by [`health`]): `200
/// ready` while [`Hub::is_ready`], else `503 draining` or `503 shutting
/// down`.
pub fn readiness<S>(hub: Hub) -> MethodRouter<S>
where
    S: Clone + Send + Sync + 'static,
{
    get(move || {
        let hub = hub.clone();
        async move {
            if hub.is_shutting_down() {
                probe(StatusCode::SERVICE_UNAVAILABLE, "shutting down")
            } else if hub.is_draining() {
                probe(StatusCode::SERVICE_UNAVAILABLE, "draining")
            } else {
                probe(StatusCode::OK, "ready")
            }
        }
    })
}

fn probe(status: StatusCode, body: &'static str) -> Response {
    let mut res = Response::new(Body::from(body));
    *res.status_mut() = status;
    let h = res.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}
