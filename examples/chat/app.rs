//! The chat server: the hub (identity, handlers, member-list hooks) and the
//! axum router that serves the page and the WebSocket endpoint.
//!
//! Kept free of `main` so that `tests/browser.rs` can include it with
//! `#[path = "../examples/chat/app.rs"] mod app;` and serve it in-process.
//!
//! Wire protocol used by the page (JSON envelopes, see `docs/protocol.md`):
//!
//! - connect to `/ws?name=<name>` (subprotocol `switchboard.v1.json`); a name
//!   that is empty or longer than 32 characters after trimming is refused
//!   with HTTP 400 before the upgrade;
//! - `{"type":"join","ref":1,"room":"lobby"}` joins a room;
//! - `{"type":"call","ref":2,"room":"lobby","event":"message","data":{"text":"hi"}}`
//!   sends a message: every member of the room (the sender included) gets
//!   `{"type":"event","room":"lobby","event":"message","data":{"from":"ann","text":"hi","at":1700000000000}}`
//!   and the caller the reply `{"ok":true}`;
//! - `{"type":"call","ref":3,"room":"lobby","event":"members"}` replies
//!   `{"members":["ann","bob"]}`, and the same payload is published as event
//!   `members` to the room whenever someone joins or leaves it (for clients
//!   that do not use presence). On Redis (`app_on_redis`) the reply lists
//!   the room's presence on every node and no `members` event is published:
//!   presence covers it;
//! - presence is on in every room: after the join reply the page gets
//!   `presence_state`, then `presence_diff`s, and shows who is online (a
//!   user with two tabs is listed once). While its user types it sends
//!   `{"type":"presence","room":"lobby","data":{"ephemeral":{"typing":true}}}`
//!   (at most every 2 s), and `{"ephemeral":{"typing":null}}` once the
//!   message is sent or the input is cleared; a flag that is not refreshed
//!   expires after 5 s, so "X is typing…" never sticks after a drop;
//! - every room is recoverable (history in memory, or in Redis with
//!   `app_on_redis`: the last 1000 messages, 5 minutes): events carry an `offset`, the page's first join asks for the
//!   recent messages with `"rewind": 50`, and after a dropped connection it
//!   reconnects (full-jitter backoff, 1 s doubling to 30 s) and rejoins each
//!   room with `{"offset", "epoch"}`, so the messages sent meanwhile arrive
//!   exactly once — or the server says `recovered: false` and the page says
//!   some are missing (see docs/recovery.md).

use axum::http::StatusCode;
use axum::response::Html;
use axum::routing::get;
use axum::Router;
use serde::de::IgnoredAny;
use serde::Deserialize;
use serde_json::json;
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};
use switchboard::history::{HistoryConfig, MemoryHistory};
use switchboard::transport::Handshake;
use switchboard::{Call, CallError, Connection, Hub, HubBuilder, Identity, PresenceConfig, Rejection};

/// The page, served at `/`.
const INDEX_HTML: &str = include_str!("index.html");

/// Longest user name, in characters (after trimming).
const MAX_NAME_CHARS: usize = 32;
/// Longest message, in characters.
const MAX_TEXT_CHARS: usize = 2000;

/// The `data` of a `message` call.
#[derive(Deserialize)]
struct NewMessage {
    text: String,
}

/// Builds the chat server on one node: the router (page at `/`, WebSocket
/// at `/ws`) and its hub (keep a clone to shut it down). Rooms, presence and
/// history live in this process.
#[allow(dead_code)] // each includer (main, tests) uses one of the two builders
pub fn app() -> (Router, Hub) {
    build(Hub::builder().history(MemoryHistory::new(), HistoryConfig::all_rooms()), false)
}

/// Builds the chat server as one of several nodes that share the Redis at
/// `url` (`redis://host:port/`): rooms go through [`RedisBackplane`],
/// presence lives in [`RedisPresence`] and history in [`RedisHistory`], so
/// instances on different ports (or machines) share rooms, who is online,
/// and the recent messages a reconnecting client recovers. Fails when Redis
/// cannot be reached.
///
/// The `members` call then lists the room's presence (every node's users);
/// the `members` event is not published, since a node only knows its own
/// members and the presence messages already tell every client who comes
/// and goes.
#[cfg(feature = "redis")]
#[allow(dead_code)] // each includer (main, tests) uses one of the two builders
pub async fn app_on_redis(url: &str) -> switchboard::Result<(Router, Hub)> {
    use switchboard::redis::{RedisBackplane, RedisConfig, RedisHistory, RedisPresence};
    let config = RedisConfig::new(url);
    let builder = Hub::builder()
        .backplane(RedisBackplane::connect(config.clone()).await?)
        .presence_store(RedisPresence::connect(config.clone()).await?)
        .history(RedisHistory::connect(config).await?, HistoryConfig::all_rooms());
    Ok(build(builder, true))
}

/// Adds identity, handlers and presence to `builder` (which brings the
/// history store, and the backplane if any). `shared`: the hub is one of
/// several nodes, so member lists come from presence (see `app_on_redis`).
fn build(builder: HubBuilder, shared: bool) -> (Router, Hub) {
    let builder = builder
        .authenticate(|hs: &Handshake| std::future::ready(identify(hs)))
        .on("message", |call: Call, msg: NewMessage| async move {
            let room = call.room().ok_or_else(|| CallError::bad_request("`message` needs a room"))?;
            let user = call.user_id().unwrap_or("anonymous").to_owned();
            let text = msg.text;
            if text.trim().is_empty() {
                return Err(CallError::bad_request("message is empty"));
            }
            if text.chars().count() > MAX_TEXT_CHARS {
                return Err(CallError::bad_request(format!("message is longer than {MAX_TEXT_CHARS} characters")));
            }
            tracing::debug!(room, user, "message");
            call.broadcast("message", &json!({ "from": user, "text": text, "at": unix_millis() }))
                .await
                .map_err(|e| CallError::internal(e.to_string()))?;
            Ok(json!({ "ok": true }))
        })
        .on("members", move |call: Call, _: IgnoredAny| async move {
            let room = call.room().ok_or_else(|| CallError::bad_request("`members` needs a room"))?;
            let members = if shared {
                presence_members(call.hub(), room).await.map_err(|e| CallError::internal(e.to_string()))?
            } else {
                members(call.hub(), room)
            };
            Ok(json!({ "members": members }))
        })
        // Who is online and who is typing, in every room.
        .presence(PresenceConfig::default());
    let builder = if shared {
        // Presence diffs reach every node's clients; a list of this node's
        // members alone would be wrong on every other node.
        builder
    } else {
        // Serializes "read the member list, queue it to the room" so that
        // two joins racing on different threads cannot leave an older list
        // last.
        let publishing = Arc::new(Mutex::new(()));
        let on_change = move |conn: &Connection, room: &str| publish_members(conn.hub(), room, &publishing);
        builder.on_join(on_change.clone()).on_leave(on_change)
    };
    let hub = builder.build();

    let router = Router::new()
        .route("/", get(|| async { Html(INDEX_HTML) }))
        .route("/ws", switchboard::integration::axum::route(hub.clone()));
    (router, hub)
}

/// The identity is the `name` query parameter, trimmed, 1 to 32 characters.
fn identify(hs: &Handshake) -> Result<Identity, Rejection> {
    let name = hs.query("name").unwrap_or_default();
    let name = name.trim();
    let len = name.chars().count();
    if len == 0 || len > MAX_NAME_CHARS {
        return Err(Rejection::new(StatusCode::BAD_REQUEST, format!("name must be 1 to {MAX_NAME_CHARS} characters")));
    }
    if name.chars().any(char::is_control) {
        return Err(Rejection::new(StatusCode::BAD_REQUEST, "name must not contain control characters"));
    }
    Ok(Identity::user(name))
}

/// The user ids in `room`, sorted, each once (a user may have several tabs).
fn members(hub: &Hub, room: &str) -> Vec<String> {
    let ids: BTreeSet<String> =
        hub.room_members(room).into_iter().filter_map(|m| m.user_id.map(|u| u.to_string())).collect();
    ids.into_iter().collect()
}

/// The presence keys (user ids) in `room` on every node, sorted.
async fn presence_members(hub: &Hub, room: &str) -> switchboard::Result<Vec<String>> {
    Ok(hub.presence(room).await?.into_iter().map(|e| e.key).collect())
}

/// Publishes the current member list of `room` to the room. Local members
/// are queued right here (under `lock`, so lists go out in the order they
/// were read); the spawned task only waits for the backplane, if any.
fn publish_members(hub: &Hub, room: &str, lock: &Mutex<()>) {
    let publish = {
        let _guard = lock.lock().unwrap_or_else(|e| e.into_inner());
        hub.publish(room, "members", &json!({ "members": members(hub, room) }))
    };
    let room = room.to_owned();
    tokio::spawn(async move {
        if let Err(e) = publish.await {
            tracing::warn!(room, error = %e, "publishing the member list failed");
        }
    });
}

fn unix_millis() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}
