//! Real-time features for Rust web servers: rooms, request/reply, heartbeats
//! and bounded fan-out over WebSocket, with a pluggable backplane for running
//! several server instances.
//!
//! A host application builds a [`Hub`], registers handlers for the events
//! its clients send, mounts a transport (WebSocket standalone or inside
//! axum), and publishes events to rooms. Clients speak a small, documented,
//! versioned protocol (`docs/protocol.md`) in JSON or MessagePack.
//!
//! # A tour
//!
//! ```no_run
//! use serde::Deserialize;
//! use switchboard::{Call, CallError, Hub, HubConfig, Identity, Rejection};
//!
//! #[derive(Deserialize)]
//! struct Say {
//!     text: String,
//! }
//!
//! # async fn run() -> std::io::Result<()> {
//! let hub = Hub::builder()
//!     .config(HubConfig::default().max_rooms_per_connection(16))
//!     // Runs before the upgrade; a rejection is an HTTP status.
//!     .authenticate(|hs: &switchboard::Handshake| {
//!         let user = hs.query("user");
//!         async move { user.map(Identity::user).ok_or_else(|| Rejection::unauthorized("who are you?")) }
//!     })
//!     // A client `call` with event "say" in a room it joined.
//!     .on("say", |call: Call, say: Say| async move {
//!         let from = call.user_id().unwrap_or("?").to_owned();
//!         // `?` on a hub error: the client gets `503 temporarily unavailable,
//!         // retry` when the backplane is down, and the cause is logged.
//!         call.broadcast("said", &serde_json::json!({ "from": from, "text": say.text })).await?;
//!         Ok::<_, CallError>(())
//!     })
//!     .build();
//!
//! // The server pushes to a room whenever it likes:
//! hub.publish("lobby", "notice", &"maintenance at noon").await.ok();
//!
//! // Standalone WebSocket server (feature `ws`):
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
//! switchboard::integration::ws::serve(listener, hub.clone(), Default::default()).await
//! # }
//! ```
//!
//! Inside an axum app (feature `axum`), mount
//! [`integration::axum::route`] at a path instead.
//!
//! # What you get
//!
//! - **Rooms** created on first join and removed on last leave; publish to a
//!   room (optionally excluding the sender), send to one connection or to all
//!   connections of a user. Never a broadcast to everyone.
//! - **Request/reply**: typed handlers per event name with a per-connection
//!   concurrency bound and a timeout; unknown events, bad payloads and
//!   failures get numbered error replies.
//! - **Lifecycle**: connecting → open → closing → closed with hooks;
//!   heartbeats on one shared timer wheel per hub; graceful shutdown.
//! - **Bounded everything**: each connection's outbound queue is bounded in
//!   bytes with a documented overflow policy ([`hub::OverflowPolicy`]).
//! - **Safe to expose**: origin check, connection limits per hub and per
//!   address, a connection rate and a per-connection message rate, payload
//!   validation, and optional JWT authentication with in-band `refresh`
//!   ([`security`], `docs/security.md`).
//! - **Encode once per broadcast**: a publish is serialized once per envelope
//!   format and the same buffer is queued to every member.
//! - **Scaling out** through a [`backplane::Backplane`]: [`backplane::MemoryBackplane`] links hubs
//!   in one process; `redis::RedisBackplane` (feature `redis`) links hubs on
//!   several servers through Redis; a host can write its own.
//! - **Server-Sent Events** (feature `sse`, `transport::sse`): the same
//!   hub over `EventSource` streams with `POST` upstream, routed to the node
//!   holding the stream, with resume from `Last-Event-ID` (`docs/sse.md`).
//! - **Presence**: who is in a room, per user across tabs and nodes, with
//!   batched join/leave diffs, counts for large rooms, ephemeral flags such
//!   as "typing" that expire by themselves, and a [`presence::PresenceStore`] trait
//!   ([`presence`], `docs/presence.md`).
//! - **History and recovery**: recoverable rooms number their events; a
//!   client that reconnects rejoins with its last offset and gets exactly
//!   what it missed, in order, once — or `recovered: false`; a connected
//!   client is told of every gap ([`history`], `docs/recovery.md`).
//!
//! # Layout
//!
//! | module | what it holds |
//! |---|---|
//! | [`hub`] | [`Hub`], [`HubBuilder`], [`HubConfig`], [`hub::OverflowPolicy`], [`hub::Connection`], [`ConnectionId`], [`hub::HubStats`], publishing, shutdown |
//! | [`hub::admin`] | the admin API (list rooms and connections, kick, close a room), drain and readiness (`docs/operations.md`) |
//! | [`handler`] | [`Call`] context, [`CallError`], the [`handler::Handler`] trait |
//! | [`auth`] | [`Identity`], [`auth::Authenticate`], [`auth::AuthorizeJoin`], [`auth::Refresh`], [`Rejection`]; `auth::jwt` (feature `jwt`) |
//! | [`security`] | admission ([`security::SecurityConfig`]: origin check, connection limits, trusted proxies), [`security::RateLimit`] |
//! | [`room`] | room naming rules, [`room::Member`] |
//! | [`protocol`] | envelopes, payloads, JSON and MessagePack codecs, error and close codes |
//! | [`transport`] | the [`transport::Transport`] trait, [`transport::Frame`], [`Handshake`]; `ws`, `sse` and `memory` implementations |
//! | [`backplane`] | the [`backplane::Backplane`] trait and [`backplane::MemoryBackplane`] |
//! | [`presence`] | [`presence::PresenceConfig`], the [`presence::PresenceStore`] trait and [`presence::MemoryPresence`], presence entries and events (`docs/presence.md`) |
//! | [`history`] | [`history::HistoryConfig`], [`history::RoomHistory`], the [`history::HistoryStore`] trait and [`history::MemoryHistory`] (`docs/recovery.md`) |
//! | [`sync`] | synced rooms: [`sync::SyncRooms`], the [`sync::Reducer`] trait, [`sync::JsonDoc`], the [`sync::SnapshotStore`] trait (`docs/sync.md`) |
//! | [`integration`] | framework adapters (`axum`) |
//! | `client` | the Rust client: `Client`, `Room`, status, backoff, presence view (feature `client`, `docs/client.md`) |
//! | [`client_js`] | the browser client `switchboard.js` as bytes to serve, with its ETag (`docs/js-client.md`) |
//! | `testing` | conformance suites for host implementations of [`backplane::Backplane`], [`history::HistoryStore`], [`presence::PresenceStore`], [`sync::SnapshotStore`] (feature `testing`) |
//! | [`error`] | [`Error`], [`ErrorKind`], [`Result`] |
//!
//! Longer guides live in the repository's `docs/`: `protocol.md` (the wire
//! protocol), `architecture.md` (layers, data path, bounds, locks),
//! `security.md` (threat model, limits and their defaults, proxies), `sse.md`
//! (the Server-Sent Events transport), `client.md` (the Rust client),
//! `recovery.md` (history, recovery, gaps), `js-client.md` (the browser
//! client).
//!
//! # Features
//!
//! | feature | default | enables |
//! |---|---|---|
//! | `ws` | yes | WebSocket transport on tokio-tungstenite ([`transport::ws`]) |
//! | `axum` | yes | mounting the WebSocket endpoint in an axum router ([`integration::axum`]) |
//! | `sse` | no | Server-Sent Events transport (`transport::sse`), mountable with `integration::axum::sse` |
//! | `jwt` | no | JSON Web Token authentication and `refresh` (`auth::jwt`, the `jsonwebtoken` crate) |
//! | `redis` | no | `switchboard::redis`: a backplane on Redis pub/sub, history and presence stores on Redis or a Redis Cluster (the redis-rs crate; Rust 1.88) |
//! | `testing` | no | `switchboard::testing`: conformance suites for your own [`backplane::Backplane`], [`history::HistoryStore`], [`presence::PresenceStore`] and [`sync::SnapshotStore`] |
//! | `client` | no | `switchboard::client`: a reconnecting Rust client (rooms, recovery, calls, presence) |
//! | `metrics` | no | `switchboard::metrics`: counters, gauges and histograms through the `metrics` facade (`docs/operations.md`) |
//! | `tls` | no | TLS on rustls (`ring` provider): `wss://` in the client ([`client::ClientConfig::tls`]), HTTPS and WSS in `integration::axum::serve`; re-exports [`rustls`] |
//! | `tls-webpki-roots` | no | the client trusts Mozilla's roots (the `webpki-roots` crate) |
//! | `tls-native-roots` | no | the client trusts the platform's roots (the `rustls-native-certs` crate) |
//!
//! Logging goes through `tracing` (always on; silent without a subscriber).

#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod auth;
pub mod backplane;
#[cfg(feature = "client")]
#[cfg_attr(docsrs, doc(cfg(feature = "client")))]
pub mod client;
pub mod client_js;
pub mod error;
#[cfg(all(fuzzing, feature = "ws"))]
#[doc(hidden)]
pub mod fuzzing;
pub mod history;
pub mod hub;
pub use hub::{handler, room};
/// The rustls this crate was built with (feature `tls`), for building a
/// `ClientConfig` or `ServerConfig` of the same version.
#[cfg(feature = "tls")]
#[cfg_attr(docsrs, doc(cfg(feature = "tls")))]
pub use rustls;
pub mod integration;
#[cfg(feature = "metrics")]
#[cfg_attr(docsrs, doc(cfg(feature = "metrics")))]
pub mod metrics;
#[cfg(not(feature = "metrics"))]
mod metrics;
pub mod presence;
pub mod protocol;
#[cfg(feature = "redis")]
pub mod redis;
pub mod security;
pub mod sync;
#[cfg(feature = "testing")]
pub mod testing;
pub mod transport;
mod util;

// The root holds what the tour above uses and what a newcomer reaches for
// first; everything else (stores, backplanes, admission, presence and history
// types, connection details) is named through its module.
pub use auth::{Identity, Rejection};
pub use error::{Error, ErrorKind, Result};
pub use handler::{Call, CallError};
pub use hub::{ConnectionId, Hub, HubBuilder, HubConfig};
pub use transport::Handshake;

/// Compiles the README's code blocks as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
