//! The video-call server: one page, the switchboard endpoint, and the
//! signaling relay. See `main.rs` and `docs/video-call.md`.
//!
//! App-level API (on top of `docs/protocol.md`):
//!
//! - connect to `/ws?name=<display name>` (`name` trimmed, 1 to 32
//!   characters, no control characters). The server gives every connection
//!   its own peer id (`p<n>`), which is its user id and presence key: a
//!   page cannot pick another's id, so nobody can receive someone else's
//!   offers. A page that reconnects or reloads is a new peer.
//! - join any room: presence lists the peers in it, each meta is
//!   `{"name": <display name>}` and carries `joined_at`;
//! - `call` event `signal` in the room with
//!   `{"to": <peer id>, "kind": "offer" | "answer" | "candidate", "data": …}`:
//!   the server checks that `to` is in the room and sends `to` the direct
//!   event `signal` `{"from": <caller's peer id>, "room", "kind", "data"}`.
//!   Replies `{"ok": true}`; `422` for another `kind`, `404`-like host code
//!   `1004` "that peer is not in the room".

use axum::response::Html;
use axum::routing::get;
use axum::Router;
use http::StatusCode;
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicU64, Ordering};
use switchboard::{hub::Connection, presence::PresenceConfig, Call, CallError, Handshake, Hub, Identity, Rejection};

const INDEX_HTML: &str = include_str!("index.html");

/// Longest display name, in characters (after trimming).
const MAX_NAME_CHARS: usize = 32;

/// The host code for a signal to a peer that is not in the room.
pub const NOT_IN_ROOM: u32 = 1004;

/// The display name of a connection, kept in its [`Identity`].
#[derive(Clone, Debug)]
struct DisplayName(String);

#[derive(Deserialize)]
struct Signal {
    to: String,
    kind: String,
    #[serde(default)]
    data: Value,
}

/// The router (`/`, `/ws`, `/switchboard.js`) and its hub.
pub fn app() -> (Router, Hub) {
    let hub = Hub::builder()
        .authenticate(|hs: &Handshake| std::future::ready(identify(hs)))
        .on("signal", |call: Call, signal: Signal| async move {
            let room = call.room().ok_or_else(|| CallError::bad_request("`signal` needs a room"))?.to_owned();
            if !matches!(signal.kind.as_str(), "offer" | "answer" | "candidate") {
                return Err(CallError::new(422, "kind must be offer, answer or candidate"));
            }
            let from = call.user_id().unwrap_or_default().to_owned();
            // Only to a peer in this room: a page cannot reach strangers.
            let present = call.hub().presence(&room).await?.into_iter().any(|e| e.key == signal.to);
            if !present {
                return Err(CallError::new(NOT_IN_ROOM, "that peer is not in the room"));
            }
            let event = json!({ "from": from, "room": room, "kind": signal.kind, "data": signal.data });
            if call.hub().send_to_user(&signal.to, "signal", &event)? == 0 {
                return Err(CallError::new(NOT_IN_ROOM, "that peer is not in the room"));
            }
            Ok(json!({ "ok": true }))
        })
        .presence(PresenceConfig::default())
        .presence_meta(|conn: &Connection, _room: &str| {
            json!({ "name": conn.identity().data::<DisplayName>().map_or("?", |n| n.0.as_str()) })
        })
        .build();
    let router = Router::new()
        .route("/", get(|| async { Html(INDEX_HTML) }))
        .route("/switchboard.js", switchboard::integration::axum::client_js())
        .route("/ws", switchboard::integration::axum::route(hub.clone()));
    (router, hub)
}

/// A peer id for the connection, chosen by the server, and the display name
/// from the query.
fn identify(hs: &Handshake) -> Result<Identity, Rejection> {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let name = hs.query("name").unwrap_or_default();
    let name = name.trim();
    let len = name.chars().count();
    if len == 0 || len > MAX_NAME_CHARS || name.chars().any(char::is_control) {
        let msg = format!("name must be 1 to {MAX_NAME_CHARS} characters, without control characters");
        return Err(Rejection::new(StatusCode::BAD_REQUEST, msg));
    }
    let peer = format!("p{}", NEXT.fetch_add(1, Ordering::Relaxed));
    Ok(Identity::user(peer).with_data(DisplayName(name.to_owned())))
}
