//! The standalone WebSocket server (feature `ws`): an accept loop on a
//! `TcpListener` ([`serve`]) or one accepted socket ([`accept`]).
//!
//! The handshake is read and answered by the transport
//! ([`transport::ws`](crate::transport::ws)); between reading and answering,
//! the hub's gate runs (admission: origin, connection limits and rate; then
//! the async authenticator, bounded by [`WsConfig::handshake_timeout`]), so
//! a refusal is a plain HTTP status on the same socket, before any upgrade.
//! Inside axum, use [`integration::axum`](crate::integration::axum) instead:
//! the same gate, the same transport, the same session code.

use crate::auth::Rejection;
use crate::hub::Hub;
use crate::security::Admission;
use crate::transport::ws::{handshake, Refusal, WsConfig, WsTransport};
use crate::transport::Handshake;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};

/// Accepts WebSocket connections on `listener` and serves each on its own
/// task, until the hub starts shutting down. Connections already accepted
/// keep running; [`Hub::shutdown`] closes them.
pub async fn serve(listener: TcpListener, hub: Hub, config: WsConfig) -> std::io::Result<()> {
    let stop = hub.shutdown_started();
    tokio::pin!(stop);
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut stop => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Running out of file descriptors and similar are
                    // transient: log, back off briefly, keep accepting.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let (hub, config) = (hub.clone(), config.clone());
        // The handshake runs on a short-lived task; the session gets a task
        // of its own, so the memory of the handshake's state (the request
        // head, the admission and authentication futures) is freed once it
        // is done instead of being kept for the connection's whole life:
        // a task's allocation is sized for the largest state of its future.
        tokio::spawn(async move {
            match admit_and_upgrade(stream, peer, &hub, &config).await {
                Ok(Some((transport, hs, (admission, identity)))) => {
                    let session = hub.serve(transport, &hs, identity);
                    drop(hs);
                    spawn_session(session, admission);
                }
                Ok(None) => {}
                Err(e) => tracing::debug!(%peer, error = %e, "handshake failed"),
            }
        });
    }
}

/// Serves one accepted TCP connection: reads the upgrade request, runs the
/// hub's admission ([`Hub::admit`]: origin, connection limits and rate) and
/// authenticator, answers `101` or an HTTP error, then serves the WebSocket
/// until it closes.
pub async fn accept(stream: TcpStream, peer: SocketAddr, hub: &Hub, config: &WsConfig) -> std::io::Result<()> {
    if let Some((transport, hs, (admission, identity))) = admit_and_upgrade(stream, peer, hub, config).await? {
        hub.serve(transport, &hs, identity).await;
        // The connection's admission slots are freed only now (and on any
        // early exit of this task, by the drop).
        drop(admission);
    }
    Ok(())
}

/// Runs a connection's session on a task of its own, holding its admission
/// slots (and whatever else `admission` holds) until it ends (or the task
/// is dropped).
pub(crate) fn spawn_session<A: Send + 'static>(
    session: impl std::future::Future<Output = ()> + Send + 'static,
    admission: A,
) {
    use futures::FutureExt;
    // `map`, not `async move { session.await; … }`: such a wrapper keeps both
    // the captured future and the one being awaited, doubling the task
    // (about 1 KB per connection).
    tokio::spawn(session.map(move |()| drop(admission)));
}

/// The HTTP answer to a rejection by the hub's gate: its status and
/// message, and `retry-after` when it has a hint.
pub(crate) fn refusal(rejection: &Rejection) -> Refusal {
    let mut r = Refusal::with_retry_after(rejection.status(), rejection.message(), rejection.retry_after());
    r.close = rejection.close().map(|(code, reason)| (code.0, reason.clone()));
    r
}

type Admitted = (WsTransport, Handshake, (Admission, crate::auth::Identity));

/// The handshake of [`accept`], without serving the session.
async fn admit_and_upgrade(
    stream: TcpStream,
    peer: SocketAddr,
    hub: &Hub,
    config: &WsConfig,
) -> std::io::Result<Option<Admitted>> {
    let max = hub.config().max_message_size;
    let timeout = config.handshake_timeout;
    handshake(stream, peer, config, max, |mut hs| async move {
        let decision = hub.open_gate(&mut hs, timeout).await.map_err(|rej| refusal(&rej));
        (hs, decision)
    })
    .await
}
