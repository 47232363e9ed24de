//! placeholder
#![allow(missing_docs)]
pub mod auth;
pub mod backplane;
pub mod error;
pub mod handler;
mod hub;
pub mod integration;
pub mod protocol;
pub mod room;
pub mod transport;

pub use auth::{Authenticate, AuthorizeJoin, Identity, JoinRequest, Rejection};
pub use backplane::{Backplane, MemoryBackplane, Subscription};
pub use error::{Error, ErrorKind, Result};
pub use handler::{Call, CallError, Handler};
pub use hub::{
    Connection, ConnectionId, ConnectionState, DisconnectReason, Hub, HubBuilder, HubConfig, HubStats, OverflowPolicy,
    Publish,
};
pub use transport::{Frame, Handshake, Transport};
