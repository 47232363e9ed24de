//! A Rust client for switchboard servers (feature `client`): for services,
//! CLIs, bots and tests, and the reference for every other client's
//! behaviour (`docs/protocol.md` §12, "Client behaviour rules").
//!
//! It speaks the documented protocol over WebSocket, and on its own:
//!
//! - **reconnects** with full-jitter exponential backoff (1 s doubling to
//!   30 s, reset after 30 s up; [`Backoff`]), obeying the server's close
//!   codes: terminal codes stop it, `4003 token expired` asks the
//!   application's token provider for a new token first;
//! - **detects dead connections** from the heartbeat settings in `hello`
//!   (silence beyond `max(I, T) + T` closes and reconnects) and answers
//!   the server's pings;
//! - **rejoins** every room after a reconnect, with the last offset and
//!   epoch in rooms with history, so missed events are replayed before live
//!   ones, and tells the application when they could not be
//!   ([`RoomEvent::Rejoined`] with `recovered: false`);
//! - holds sends made while offline in a **bounded** buffer (by count and
//!   bytes, drop-oldest, counted) and flushes it in order after the rejoins;
//! - keeps each room's **presence** as a live view ([`PresenceView`]).
//!
//! Every buffer is bounded; the policies are on [`ClientConfig`]'s fields
//! and in `docs/client.md`.
//!
//! ```no_run
//! use serde_json::json;
//! use switchboard::client::{Client, RoomEvent};
//!
//! # async fn run() -> Result<(), switchboard::client::ClientError> {
//! let client = Client::builder("ws://127.0.0.1:3000/ws?name=ann").connect()?;
//! let mut status = client.status();
//! let lobby = client.join("lobby").await?;
//! let reply: serde_json::Value = lobby.call("message", &json!({ "text": "hi" })).await?;
//! while let Some(item) = lobby.recv().await {
//!     match item {
//!         RoomEvent::Event(e) => println!("{}: {}", e.event, e.data.bytes().len()),
//!         RoomEvent::Rejoined { recovered: false } => { /* refetch the room's state */ }
//!         other => println!("{other:?}"),
//!     }
//! }
//! # let _ = (reply, status.changed().await);
//! # Ok(())
//! # }
//! ```

mod config;
mod driver;
mod error;
mod presence;
mod room;
mod shared;
mod status;
pub mod sync;
#[cfg(feature = "tls")]
mod tls;
mod ws;

pub use config::{Backoff, ClientConfig, TokenPlacement};
pub use error::{ClientError, ClientErrorKind};
pub use presence::{PresenceCount, PresenceMeta, PresenceView};
pub use room::{Event, Gap, JoinOptions, Room, RoomEvent};
pub use status::{Disconnect, Status};

use crate::protocol::{Envelope, Format, Kind, Payload, Version};
use driver::{Connector, TokenProvider};
use room::EventQueue;
use serde::{de::DeserializeOwned, Serialize};
use shared::{Outgoing, PendingKind, RoomState, Shared};
use std::fmt;
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::sync::{oneshot, watch};

/// Counters of what the client dropped, discarded or recovered from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ClientStats {
    /// Connections established after the first.
    pub reconnects: u64,
    /// Replies and errors whose `ref` matched no waiting request (it timed
    /// out, or the server invented it): discarded.
    pub late_replies: u64,
    /// Buffered sends and calls dropped from the full offline buffer.
    pub offline_dropped: u64,
    /// Volatile sends dropped (offline, or the send queue was full).
    pub volatile_dropped: u64,
    /// Messages from the server that could not be decoded (ignored).
    pub malformed_messages: u64,
    /// Messages of a type this client does not know (ignored, §9).
    pub unknown_messages: u64,
    /// `error` messages without a `ref` (nothing to answer; logged).
    pub server_errors: u64,
    /// Events dropped from room or direct streams the application read too
    /// slowly.
    pub events_dropped: u64,
    /// Messages the server reported dropping for this client (`lagged`).
    pub server_lagged: u64,
    /// Messages in the offline buffer now.
    pub offline_buffered: usize,
    /// Bytes in the offline buffer now.
    pub offline_buffered_bytes: usize,
    /// Requests waiting for an answer now.
    pub pending_requests: usize,
}

/// Builds a [`Client`]: `Client::builder(url)…connect()`.
pub struct ClientBuilder {
    url: String,
    config: ClientConfig,
    format: Format,
    version: Version,
    headers: Vec<(http::HeaderName, http::HeaderValue)>,
    token: Option<TokenProvider>,
    error: Option<String>,
}

impl fmt::Debug for ClientBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientBuilder")
            .field("url", &self.url)
            .field("config", &self.config)
            .field("format", &self.format)
            .field("version", &self.version)
            .field("token", &self.token.is_some())
            .finish()
    }
}

impl ClientBuilder {
    /// Sets the configuration (default [`ClientConfig::default`]).
    pub fn config(mut self, config: ClientConfig) -> Self {
        self.config = config;
        self
    }

    /// Sets the envelope format (default JSON).
    pub fn format(mut self, format: Format) -> Self {
        self.format = format;
        self
    }

    /// Sets the newest protocol version to offer (default [`Version::V2`]:
    /// compact `event` arrays, offered before version 1, so a server that
    /// speaks only version 1 still selects it). [`Version::V1`] offers
    /// version 1 only. Either way the client's API is the same.
    pub fn version(mut self, version: Version) -> Self {
        self.version = version;
        self
    }

    /// Adds a header to every upgrade request.
    pub fn header(mut self, name: &str, value: &str) -> Self {
        match (http::HeaderName::try_from(name), http::HeaderValue::try_from(value)) {
            (Ok(n), Ok(v)) => self.headers.push((n, v)),
            _ => self.error = Some(format!("invalid header {name:?}")),
        }
        self
    }

    /// Sets the token provider: called before the first connection, after
    /// the server closed with `4003 token expired`, and after a refused
    /// upgrade with 401 or 403 (once; a second refusal in a row stops the
    /// client). The token goes where [`ClientConfig::token_placement`] says
    /// (default `Authorization: Bearer`). An error is retried with backoff.
    pub fn token<F, Fut, E>(mut self, provider: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<String, E>> + Send + 'static,
        E: fmt::Display,
    {
        let provider = Arc::new(provider);
        self.token = Some(Arc::new(move || {
            let fut = provider();
            Box::pin(async move { fut.await.map_err(|e| e.to_string()) })
        }));
        self
    }

    /// Starts the client: spawns its connection task on the current tokio
    /// runtime and returns at once (watch [`Client::status`], or await
    /// [`Client::connected`]). Fails only for an invalid URL or header.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime.
    pub fn connect(self) -> Result<Client, ClientError> {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        if let Some(e) = self.error {
            return Err(ClientError::new(ClientErrorKind::Config, e));
        }
        if let Err(e) = self.url.as_str().into_client_request() {
            return Err(ClientError::new(ClientErrorKind::Config, format!("invalid URL {:?}: {e}", self.url)));
        }
        let shared = Arc::new(Shared::new(self.config, (self.format, self.version)));
        let connector = Connector { url: self.url, headers: self.headers, token: self.token };
        tokio::spawn(driver::run(shared.clone(), connector));
        Ok(Client { _owner: Arc::new(Owner { shared: shared.clone() }), shared })
    }
}

/// Stops the connection task when the last handle goes.
struct Owner {
    shared: Arc<Shared>,
}

impl Drop for Owner {
    fn drop(&mut self) {
        self.shared.stop.send_replace(true);
    }
}

/// A switchboard client. Cheap to clone; the connection task stops when the
/// last clone (and the last [`Room`]) is dropped, or at [`Client::close`].
#[derive(Clone)]
pub struct Client {
    pub(crate) shared: Arc<Shared>,
    _owner: Arc<Owner>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client").field("status", &*self.shared.status.borrow()).finish()
    }
}

/// The direct-event stream: events the server sent to this connection (or
/// to its user) without a room. Bounded like a room's stream.
pub struct DirectEvents {
    queue: Arc<EventQueue>,
    _client: Client,
}

impl fmt::Debug for DirectEvents {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DirectEvents").field("queue", &self.queue).finish()
    }
}

impl DirectEvents {
    /// The next direct event ([`RoomEvent::Event`] with no room), or a
    /// [`RoomEvent::Lagged`] / [`RoomEvent::ServerLagged`] notice; `None`
    /// once the client is closed.
    pub async fn recv(&mut self) -> Option<RoomEvent> {
        self.queue.recv().await
    }
}

impl Client {
    /// A builder for a client of the server at `url` (`ws://host:port/path?query`).
    pub fn builder(url: impl Into<String>) -> ClientBuilder {
        ClientBuilder {
            url: url.into(),
            config: ClientConfig::default(),
            format: Format::Json,
            version: Version::V2,
            headers: Vec::new(),
            token: None,
            error: None,
        }
    }

    /// The connection status, live.
    pub fn status(&self) -> watch::Receiver<Status> {
        self.shared.status.subscribe()
    }

    /// Waits until the client is connected (rooms rejoined, offline buffer
    /// flushed). Fails if it closes first.
    pub async fn connected(&self) -> Result<(), ClientError> {
        let mut rx = self.status();
        let status = rx.wait_for(|s| s.is_connected() || s.is_closed()).await.map_err(|_| ClientError::closed())?;
        match &*status {
            Status::Closed { reason } => {
                Err(ClientError::new(ClientErrorKind::Closed, format!("the client is closed: {reason}")))
            }
            _ => Ok(()),
        }
    }

    /// Counters: drops, late replies, malformed messages, buffer levels.
    pub fn stats(&self) -> ClientStats {
        self.shared.stats()
    }

    /// The encoding in use.
    pub fn format(&self) -> Format {
        self.shared.format
    }

    /// Joins `room`; see [`Client::join_with`].
    pub async fn join(&self, room: &str) -> Result<Room, ClientError> {
        self.join_with(room, JoinOptions::default()).await
    }

    /// Joins `room` and returns its handle once the server accepted. While
    /// offline the join waits for the connection (within the call timeout).
    /// A room can have one handle at a time ([`ClientErrorKind::AlreadyJoined`]).
    pub async fn join_with(&self, room: &str, options: JoinOptions) -> Result<Room, ClientError> {
        let shared = &self.shared;
        let params = options.params.as_ref().map(|p| shared.payload(p)).transpose()?;
        let (tx, rx) = oneshot::channel();
        let id = shared.next_room_id.fetch_add(1, Ordering::Relaxed);
        let queue = EventQueue::new(shared.config.room_buffer);
        let (presence_tx, presence_rx) = watch::channel(PresenceView::default());
        let send = {
            let mut st = shared.state.lock();
            if st.closed {
                return Err(ClientError::closed());
            }
            if st.rooms.contains_key(room) {
                return Err(ClientError::new(
                    ClientErrorKind::AlreadyJoined,
                    format!("room {room:?} is already joined"),
                ));
            }
            st.rooms.insert(
                room.to_owned(),
                RoomState {
                    id,
                    params,
                    rewind: options.rewind,
                    queue: queue.clone(),
                    presence: presence_tx,
                    epoch: None,
                    last_offset: None,
                    missing: Vec::new(),
                    sent_on: None,
                    join_ref: None,
                    joined: false,
                    ever_joined: false,
                    waiter: Some(tx),
                    recovering: false,
                    recovery_attempts: 0,
                },
            );
            // A join of this room given up while still in flight on this
            // connection (its reply was to make the client leave) is taken
            // over instead of sending a second `join`: the server would
            // answer that one as a join of a room already joined, without
            // the stream's position, and the next reconnect could not
            // recover (issue 18: `load storm` against a low connection rate).
            if let Some((r, generation)) = shared.abandoned_join(&st, room) {
                if let Some(p) = st.pending.get_mut(&r) {
                    p.kind = PendingKind::Join { room: room.to_owned() };
                }
                let state = st.rooms.get_mut(room).expect("just inserted");
                state.join_ref = Some(r);
                state.sent_on = Some(generation);
                None
            } else {
                // Live: join now. Otherwise the connection task joins it
                // when the next connection is up.
                match st.link.as_ref().map(|l| (l.tx.clone(), l.generation)) {
                    Some((link, generation)) => shared.join_message(&mut st, room, generation).map(|out| (link, out)),
                    None => None,
                }
            }
        };
        if let Some((link, out)) = send {
            // If the connection ends meanwhile, the next one rejoins.
            let _ = link.send(out).await;
        }
        let handle =
            Room { client: self.clone(), name: room.to_owned(), queue, presence: presence_rx, id, left: false.into() };
        match tokio::time::timeout(shared.config.call_timeout, rx).await {
            Ok(Ok(Ok(()))) => Ok(handle),
            Ok(Ok(Err(e))) => Err(e),
            Ok(Err(_)) => Err(ClientError::closed()),
            Err(_) => Err(ClientError::timeout()), // dropping the handle forgets the room
        }
    }

    /// A call without a room: the handler for `event` gets `data`; its
    /// reply is decoded into `R`. Buffered while offline; fails with
    /// [`ClientErrorKind::Timeout`] after [`ClientConfig::call_timeout`].
    pub async fn call<T: Serialize + ?Sized, R: DeserializeOwned>(
        &self,
        event: &str,
        data: &T,
    ) -> Result<R, ClientError> {
        self.call_in(None, event, data).await
    }

    /// [`Client::call`] returning the reply's raw payload.
    pub async fn call_raw<T: Serialize + ?Sized>(&self, event: &str, data: &T) -> Result<Payload, ClientError> {
        let env = self.call_envelope(None, event, data)?;
        self.shared.request(env).await
    }

    pub(crate) async fn call_in<T: Serialize + ?Sized, R: DeserializeOwned>(
        &self,
        room: Option<&str>,
        event: &str,
        data: &T,
    ) -> Result<R, ClientError> {
        let env = self.call_envelope(room, event, data)?;
        let reply = self.shared.request(env).await?;
        reply.decode().map_err(|e| ClientError::new(ClientErrorKind::Codec, e.to_string()))
    }

    fn call_envelope<T: Serialize + ?Sized>(
        &self,
        room: Option<&str>,
        event: &str,
        data: &T,
    ) -> Result<Envelope, ClientError> {
        let mut env = Envelope::new(Kind::Call).with_event(event).with_data(self.shared.payload(data)?);
        if let Some(room) = room {
            env = env.with_room(room);
        }
        Ok(env)
    }

    /// A fire-and-forget call without a room, held in the offline buffer
    /// while disconnected (bounded, drop-oldest) and sent in order after
    /// the reconnect. Errors the server sends back for it carry no `ref`
    /// (counted in [`ClientStats::server_errors`]).
    pub async fn send<T: Serialize + ?Sized>(&self, event: &str, data: &T) -> Result<(), ClientError> {
        self.send_in(None, event, data, true).await
    }

    /// A fire-and-forget call that is dropped ([`ClientErrorKind::Offline`])
    /// when there is no connection or its send queue is full: for updates
    /// that are worthless late (cursor positions, typing).
    pub async fn send_volatile<T: Serialize + ?Sized>(&self, event: &str, data: &T) -> Result<(), ClientError> {
        self.send_in(None, event, data, false).await
    }

    pub(crate) async fn send_in<T: Serialize + ?Sized>(
        &self,
        room: Option<&str>,
        event: &str,
        data: &T,
        buffered: bool,
    ) -> Result<(), ClientError> {
        let env = self.call_envelope(room, event, data)?;
        let bytes = self.shared.encode(&env)?;
        self.shared.enqueue(Outgoing::app(bytes, None, buffered)).await
    }

    /// Takes the direct-event stream (events without a room). `None` if it
    /// was already taken: it has one reader.
    pub fn direct_events(&self) -> Option<DirectEvents> {
        if self.shared.direct_taken.swap(true, Ordering::Relaxed) {
            return None;
        }
        Some(DirectEvents { queue: self.shared.direct.clone(), _client: self.clone() })
    }

    /// Closes the connection (close 1000) and stops the client for good:
    /// pending requests fail with [`ClientErrorKind::Closed`], streams end.
    pub async fn close(&self) {
        self.shared.stop.send_replace(true);
        let mut rx = self.status();
        let _ = rx.wait_for(Status::is_closed).await;
    }
}
