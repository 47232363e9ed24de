//! Synced rooms: one piece of state per room that every member sees the
//! same, that each member changes optimistically, and that the server
//! orders and applies with the host's reducer (`docs/sync.md`).
//!
//! The host registers a [`Reducer`] per room-name prefix and mounts the
//! rooms on the hub; clients (`switchboard::client::sync`, or
//! `switchboard.js`'s `sync`) send ops and keep a predicted view.
//!
//! ```
//! use switchboard::sync::{JsonDoc, MemorySnapshots, SyncRooms};
//! use switchboard::Hub;
//!
//! let rooms = SyncRooms::new(MemorySnapshots::new()).room("todo:", JsonDoc);
//! let hub = Hub::builder().sync(rooms).build();
//! # drop(hub);
//! ```
//!
//! A custom reducer decides the conflict rule itself:
//!
//! ```
//! use serde::{Deserialize, Serialize};
//! use switchboard::sync::{Context, Reducer, Reject};
//!
//! #[derive(Clone, Default, Serialize, Deserialize)]
//! struct Counter { n: i64 }
//! #[derive(Clone, Serialize, Deserialize)]
//! enum CounterOp { Add(i64) }
//!
//! struct Bounded;
//! impl Reducer for Bounded {
//!     type State = Counter;
//!     type Op = CounterOp;
//!     fn apply(&self, s: &mut Counter, op: &CounterOp, _cx: &Context) -> Result<(), Reject> {
//!         let CounterOp::Add(d) = op;
//!         let n = s.n + d;
//!         if !(0..=100).contains(&n) {
//!             return Err(Reject::new("the counter stays within 0..=100"));
//!         }
//!         s.n = n;
//!         Ok(())
//!     }
//! }
//! ```
//!
//! # Wire
//!
//! Two calls in the room and one event (`docs/protocol.md` §3.13):
//! `sync.op` `{client, seq, base, op}` answered `{version}` or an error
//! whose `data` has the room's `version`; `sync.get` `{since?, client?}`
//! answered `{version, state}` or `{version, ops}`; every applied op is
//! broadcast to the room as the event `sync.op`, an [`OpRecord`].

mod engine;
mod json;
mod store;

pub use engine::SyncRooms;
pub use json::{JsonDoc, JsonOp, Path, Seg};
pub use store::{Append, Appended, ClientRecord, Loaded, MemorySnapshots, OpRecord, SnapshotStore};

use serde::de::DeserializeOwned;
use serde::Serialize;
use std::fmt;
use std::time::Duration;

/// The host's rule for a synced room: how an op changes the state.
///
/// It must be **deterministic**: the server and every client apply the same
/// ops in the same order to the same state and must get the same result
/// (no clocks, no randomness, no iteration over hash maps whose order
/// matters). When it returns `Err`, the state it was given is discarded
/// (both sides apply to a copy), so it may leave it half-changed.
pub trait Reducer: Send + Sync + 'static {
    /// The room's state (the empty room's state is `Default`).
    type State: Clone + Default + Serialize + DeserializeOwned + Send + Sync + 'static;
    /// An op.
    type Op: Clone + Serialize + DeserializeOwned + Send + Sync + 'static;
    /// Applies `op` to `state`, or refuses it.
    fn apply(&self, state: &mut Self::State, op: &Self::Op, cx: &Context) -> Result<(), Reject>;
}

/// Who sent an op, and what it was based on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Context {
    room: String,
    client: String,
    user: Option<String>,
    base: u64,
}

impl Context {
    /// A context (the server and the clients build it; tests too).
    pub fn new(room: &str, client: &str, user: Option<&str>, base: u64) -> Context {
        Context { room: room.to_owned(), client: client.to_owned(), user: user.map(str::to_owned), base }
    }

    /// The room.
    pub fn room(&self) -> &str {
        &self.room
    }

    /// The sending client's id.
    pub fn client(&self) -> &str {
        &self.client
    }

    /// The sender's user id, when it was authenticated.
    pub fn user(&self) -> Option<&str> {
        self.user.as_deref()
    }

    /// The room version the sender based the op on: a reducer that wants to
    /// refuse stale ops compares it with versions it keeps in the state.
    pub fn base(&self) -> u64 {
        self.base
    }
}

/// A reducer's refusal: an error code and a message the sender gets (and
/// its client shows as a rollback).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reject {
    code: u32,
    message: String,
}

impl Reject {
    /// A refusal with code 409 (`conflict`).
    pub fn new(message: impl Into<String>) -> Reject {
        Reject { code: 409, message: message.into() }
    }

    /// A refusal with the host's own code (1000 and above) or a protocol one.
    pub fn with_code(code: u32, message: impl Into<String>) -> Reject {
        Reject { code, message: message.into() }
    }

    /// The code.
    pub fn code(&self) -> u32 {
        self.code
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for Reject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.message, self.code)
    }
}

impl std::error::Error for Reject {}

/// Bounds and tuning of synced rooms.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct SyncConfig {
    /// The largest state, as JSON, an op may produce (default 1 MiB); an op
    /// that would make it larger is refused with `413`.
    pub max_state_bytes: usize,
    /// The largest op, as JSON (default 16 KiB); larger ones get `413`.
    pub max_op_bytes: usize,
    /// Ops per second per member and room (default 20, bursts of
    /// [`SyncConfig::op_burst`]); over it `420` with `retry_after_ms`.
    pub op_rate: u32,
    /// Burst of [`SyncConfig::op_rate`] (default 40).
    pub op_burst: u32,
    /// A snapshot is stored every this many ops (default 100).
    pub snapshot_every: u64,
    /// How many refusals per client a node remembers to answer a resend of
    /// a refused op the same way (default 64).
    pub refusal_window: usize,
    /// How long a member's `sync.op` waits for the store before `503`
    /// (default 5 s).
    pub store_timeout: Duration,
}

impl Default for SyncConfig {
    fn default() -> Self {
        SyncConfig {
            max_state_bytes: 1 << 20,
            max_op_bytes: 16 << 10,
            op_rate: 20,
            op_burst: 40,
            snapshot_every: 100,
            refusal_window: 64,
            store_timeout: Duration::from_secs(5),
        }
    }
}

macro_rules! setters {
    ($($(#[$doc:meta])* $name:ident: $ty:ty),* $(,)?) => {
        impl SyncConfig {
            $($(#[$doc])* pub fn $name(mut self, value: $ty) -> Self { self.$name = value; self })*
        }
    };
}

setters! {
    /// Sets [`SyncConfig::max_state_bytes`].
    max_state_bytes: usize,
    /// Sets [`SyncConfig::max_op_bytes`].
    max_op_bytes: usize,
    /// Sets [`SyncConfig::op_rate`].
    op_rate: u32,
    /// Sets [`SyncConfig::op_burst`].
    op_burst: u32,
    /// Sets [`SyncConfig::snapshot_every`] (at least 1).
    snapshot_every: u64,
    /// Sets [`SyncConfig::refusal_window`].
    refusal_window: usize,
    /// Sets [`SyncConfig::store_timeout`].
    store_timeout: Duration,
}

/// The longest client id (bytes, `A–Z a–z 0–9 _ -`).
pub const MAX_CLIENT_ID: usize = 64;

/// Whether `id` is a valid client id: 1–64 bytes of `A–Z a–z 0–9 _ -`.
pub fn valid_client_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_CLIENT_ID
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}
