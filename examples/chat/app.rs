//! The chat server: the hub (identity, handlers, presence) and the
//! axum router that serves the page and the WebSocket endpoint.
//!
//! Kept free of `main` so that `tests/browser.rs` can include it with
//! `#[path = "../examples/chat/app.rs"] mod app;` and serve it in-process.
//!
//! The app-level API (JSON envelopes of `docs/protocol.md`; the page talks
//! it through the served browser client, `docs/js-client.md`;
//! `docs/examples.md` has the whole list with payloads):
//!
//! - connect to `/ws?name=<display name>&id=<browser id>` (subprotocol
//!   `switchboard.v1.json`). `name` is trimmed, 1 to 32 characters, without
//!   control characters or `#`; `id` is optional, 16 to 64 characters of
//!   `A-Z a-z 0-9 - _` (the page keeps a random one in `localStorage`).
//!   Anything else is refused with HTTP 400 before the upgrade;
//! - the connection's user id, which is also its presence key and the
//!   `user` of its messages, is `<name>#<tag>` where the tag is the first
//!   12 hex digits of SHA-256(`id`): two people who type the same name stay
//!   two people, a browser's tabs stay one, and nobody can take another's
//!   key from what the room sees (the tag does not reveal the `id`). A
//!   client without `id` (such as `chat-cli`) is keyed by its name alone;
//!   no such key contains `#`, so it never collides with a browser's;
//! - every room has presence: the host part of each meta is
//!   `{"name": <display name>}`; the page lists members from
//!   `presence_state`/`presence_diff` and marks typing with the ephemeral
//!   flag `typing` (expires after 5 s);
//! - event `message` in a room: `{"text": "…"}` (1 to 2000 characters, not
//!   blank) is broadcast to the room, the sender included, as
//!   `{"from": <name>, "user": <key>, "text": "…", "at": <unix ms>}`; the
//!   reply is `{"ok": true}`;
//! - event `members` in a room replies `{"members": [<key>, …]}`, the room's
//!   presence keys on every node, sorted. Nothing is republished to the room
//!   on joins and leaves: presence already tells every member;
//! - every room is recoverable (history in memory, or in Redis with
//!   `app_on_redis`: the last 1000 messages, 5 minutes): events carry an
//!   `offset`; a first join may ask for recent messages with `rewind`, and a
//!   rejoin with `{offset, epoch}` gets exactly what was missed, or
//!   `recovered: false` (see docs/recovery.md).

use axum::http::StatusCode;
use axum::response::Html;
use axum::routing::get;
use axum::Router;
use serde::de::IgnoredAny;
use serde::Deserialize;
use serde_json::json;
use sha2::{Digest, Sha256};
use std::time::{SystemTime, UNIX_EPOCH};
use switchboard::history::{HistoryConfig, MemoryHistory};
use switchboard::transport::Handshake;
use switchboard::{hub::Connection, presence::PresenceConfig, Call, CallError, Hub, HubBuilder, Identity, Rejection};

/// The page, served at `/`.
const INDEX_HTML: &str = include_str!("index.html");

/// Longest display name, in characters (after trimming).
const MAX_NAME_CHARS: usize = 32;
/// Shortest and longest browser id, in characters.
const ID_CHARS: std::ops::RangeInclusive<usize> = 16..=64;
/// Hex digits of SHA-256(id) in a key's tag (48 bits: finding an id for a
/// given tag takes about 2^48 hashes).
const TAG_HEX: usize = 12;
/// Longest message, in characters.
const MAX_TEXT_CHARS: usize = 2000;

/// The display name of a connection, kept in its [`Identity`] (the user id
/// is the key, which may carry a tag).
struct DisplayName(String);

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
    build(Hub::builder().history(MemoryHistory::new(), HistoryConfig::all_rooms()))
}

/// Builds the chat server as one of several nodes that share the Redis at
/// `url` (`redis://host:port/`): rooms go through [`RedisBackplane`],
/// presence lives in [`RedisPresence`] and history in [`RedisHistory`], so
/// instances on different ports (or machines) share rooms, who is online,
/// and the recent messages a reconnecting client recovers. Fails when Redis
/// cannot be reached.
#[cfg(feature = "redis")]
#[allow(dead_code)] // each includer (main, tests) uses one of the two builders
pub async fn app_on_redis(url: &str) -> switchboard::Result<(Router, Hub)> {
    use switchboard::redis::{RedisBackplane, RedisConfig, RedisHistory, RedisPresence};
    let config = RedisConfig::new(url);
    let builder = Hub::builder()
        .backplane(RedisBackplane::connect(config.clone()).await?)
        .presence_store(RedisPresence::connect(config.clone()).await?)
        .history(RedisHistory::connect(config).await?, HistoryConfig::all_rooms());
    Ok(build(builder))
}

/// Adds identity, handlers and presence to `builder` (which brings the
/// history store, and the backplane if any). Member lists come from
/// presence, which covers every node.
fn build(builder: HubBuilder) -> (Router, Hub) {
    let hub = builder
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
            let from = display_name(call.identity());
            // `?`: with Redis down the sender gets `503 temporarily
            // unavailable, retry`; the cause goes to the server log.
            call.broadcast("message", &json!({ "from": from, "user": user, "text": text, "at": unix_millis() }))
                .await?;
            Ok(json!({ "ok": true }))
        })
        .on("members", |call: Call, _: IgnoredAny| async move {
            let room = call.room().ok_or_else(|| CallError::bad_request("`members` needs a room"))?;
            let members: Vec<String> = call.hub().presence(room).await?.into_iter().map(|e| e.key).collect();
            Ok(json!({ "members": members }))
        })
        // Who is online and who is typing, in every room; each meta carries
        // the display name (read-only for clients: nobody renames another).
        .presence(PresenceConfig::default())
        .presence_meta(|conn: &Connection, _room: &str| json!({ "name": display_name(conn.identity()) }))
        .build();

    let router = Router::new()
        .route("/", get(|| async { Html(INDEX_HTML) }))
        .route("/switchboard.js", switchboard::integration::axum::client_js())
        .route("/ws", switchboard::integration::axum::route(hub.clone()));
    (router, hub)
}

/// The identity from the query: `name` (trimmed, 1 to 32 characters, no
/// control characters, no `#`) and an optional browser `id`; see the module
/// docs for the key they make.
fn identify(hs: &Handshake) -> Result<Identity, Rejection> {
    let bad = |msg: String| Err(Rejection::new(StatusCode::BAD_REQUEST, msg));
    let name = hs.query("name").unwrap_or_default();
    let name = name.trim();
    let len = name.chars().count();
    if len == 0 || len > MAX_NAME_CHARS {
        return bad(format!("name must be 1 to {MAX_NAME_CHARS} characters"));
    }
    if name.chars().any(|c| c.is_control() || c == '#') {
        return bad("name must not contain control characters or `#`".into());
    }
    let key = match hs.query("id") {
        None => name.to_owned(),
        Some(id) => {
            let valid =
                ID_CHARS.contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            if !valid {
                return bad(format!(
                    "id must be {} to {} characters of A-Z, a-z, 0-9, - and _",
                    ID_CHARS.start(),
                    ID_CHARS.end()
                ));
            }
            format!("{name}#{}", tag(&id))
        }
    };
    Ok(Identity::user(key).with_data(DisplayName(name.to_owned())))
}

/// The first [`TAG_HEX`] hex digits of SHA-256(`id`).
fn tag(id: &str) -> String {
    Sha256::digest(id.as_bytes()).iter().take(TAG_HEX / 2).map(|b| format!("{b:02x}")).collect()
}

/// The display name `identify` stored (every connection has one).
fn display_name(identity: &Identity) -> &str {
    identity.data::<DisplayName>().map_or("anonymous", |n| n.0.as_str())
}

fn unix_millis() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}
