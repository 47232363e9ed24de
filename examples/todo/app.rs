//! The todo board's server: the page, the switchboard endpoint, the two
//! client modules, and the board's rules on top of `JsonDoc`.
//!
//! A board is the synced room `todo:<name>` holding
//! `{"items": {<id>: {"text": …, "done": bool, "pos": number}}}` (a new
//! board starts as `{"items": {}}`); the page orders items by `pos`. Ops are `JsonDoc`'s (`docs/sync.md`). On top,
//! the server refuses (code 1001, rolled back on the sender) a state with
//! more than 100 items, a text that is not 1 to 200 characters, or an
//! item that is not `{text, done, pos}`.

use axum::response::{Html, IntoResponse};
use axum::routing::get;
use axum::Router;
use serde_json::Value;
use switchboard::sync::{Context, JsonDoc, JsonOp, Reducer, Reject, SnapshotStore, SyncRooms};
use switchboard::Hub;

const INDEX_HTML: &str = include_str!("index.html");

/// Most items on a board.
pub const MAX_ITEMS: usize = 100;
/// Longest item text, in characters.
pub const MAX_TEXT: usize = 200;
/// The code of the board's own refusals.
pub const RULES: u32 = 1001;

/// `JsonDoc` plus the board's rules.
pub struct Board;

impl Reducer for Board {
    type State = Value;
    type Op = JsonOp;

    fn apply(&self, doc: &mut Value, op: &JsonOp, cx: &Context) -> Result<(), Reject> {
        // A new board (the page's reducer does the same).
        if doc.is_null() {
            *doc = serde_json::json!({ "items": {} });
        }
        JsonDoc.apply(doc, op, cx)?;
        let Some(items) = doc.get("items").and_then(Value::as_object) else {
            return Err(Reject::with_code(RULES, "a board holds its items"));
        };
        if items.len() > MAX_ITEMS {
            return Err(Reject::with_code(RULES, format!("a board holds at most {MAX_ITEMS} items")));
        }
        for item in items.values() {
            let text = item.get("text").and_then(Value::as_str).unwrap_or("");
            let chars = text.trim().chars().count();
            if chars == 0 || chars > MAX_TEXT {
                return Err(Reject::with_code(RULES, format!("a todo has 1 to {MAX_TEXT} characters")));
            }
            if !item.get("done").is_some_and(Value::is_boolean) || !item.get("pos").is_some_and(Value::is_number) {
                return Err(Reject::with_code(RULES, "a todo has text, done and pos"));
            }
        }
        Ok(())
    }
}

/// The router and hub on `store`, from `hub` (a builder that may carry a
/// backplane).
pub fn build(store: impl SnapshotStore, hub: switchboard::HubBuilder) -> (Router, Hub) {
    let hub = hub.sync(SyncRooms::new(store).room("todo:", Board)).build();
    let router = Router::new()
        .route("/", get(|| async { Html(INDEX_HTML) }))
        .route("/switchboard.js", switchboard::integration::axum::client_js())
        .route("/switchboard-sync.js", get(sync_js))
        .route("/ws", switchboard::integration::axum::route(hub.clone()));
    (router, hub)
}

async fn sync_js() -> impl IntoResponse {
    use switchboard::client_js::{CACHE_CONTROL, CONTENT_TYPE, SYNC_SOURCE};
    ([(http::header::CONTENT_TYPE, CONTENT_TYPE), (http::header::CACHE_CONTROL, CACHE_CONTROL)], SYNC_SOURCE)
}

/// The app on one node, boards in memory.
pub fn app() -> (Router, Hub) {
    build(switchboard::sync::MemorySnapshots::new(), Hub::builder())
}

/// The app with boards in Redis, shared with other instances.
#[cfg(feature = "redis")]
#[allow(dead_code)] // the browser test uses `app` only
pub async fn app_on_redis(url: &str) -> switchboard::Result<(Router, Hub)> {
    use switchboard::redis::{RedisBackplane, RedisConfig, RedisSnapshots};
    let config = RedisConfig::new(url);
    let store = RedisSnapshots::connect(config.clone()).await?;
    let backplane = RedisBackplane::connect(config).await?;
    Ok(build(store, Hub::builder().backplane(backplane)))
}
