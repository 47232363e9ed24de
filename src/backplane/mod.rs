//! The backplane carries room publishes between hub instances (nodes).
//!
//! A hub with no backplane is a single node: publishes reach its own
//! connections only. Give several hubs the same backplane and a publish on
//! any of them reaches the room's members on all of them.
//!
//! The contract is deliberately small — the shape of every pub/sub engine
//! (Redis, NATS, Postgres `LISTEN`, …):
//!
//! - [`Backplane::subscribe`] to a topic returns a [`Subscription`]: a stream
//!   of the raw messages published to that topic by any node, in publish
//!   order per publisher. Dropping it unsubscribes.
//! - [`Backplane::publish`] sends raw bytes to a topic; it resolves once the
//!   engine accepted the message (or with an error, which the hub returns to
//!   whoever published).
//!
//! The hub subscribes to a room's topic while the room has at least one local
//! member and unsubscribes when the last one leaves. Topics are room names
//! (room names never start with `$`; topics starting with `$` are reserved for
//! the hub's own use). Messages are opaque bytes to the backplane; the hub
//! tags each with its node id and ignores its own messages when a backplane
//! echoes them back, so a backplane may or may not deliver to the publisher.
//!
//! Subscriptions must be bounded: when a subscriber falls behind, the
//! backplane drops messages and yields an error of kind
//! [`ErrorKind::Backplane`](crate::ErrorKind::Backplane) in their place, so
//! the gap is reported rather than hidden.
//!
//! [`MemoryBackplane`] links hubs in one process. A host's own backplane is a
//! type implementing this trait; the conformance suite in
//! `switchboard::testing` (feature `testing`) checks it behaves like ours.

mod memory;
pub(crate) mod message;

pub use memory::MemoryBackplane;

use crate::error::Result;
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::{BoxStream, Stream};
use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};

/// A pub/sub engine linking hubs. See the [module docs](self).
pub trait Backplane: Send + Sync + 'static {
    /// Publishes `message` to every subscriber of `topic` on every node.
    fn publish(&self, topic: &str, message: Bytes) -> BoxFuture<'static, Result<()>>;

    /// Subscribes to `topic`; resolves once the subscription is active, so a
    /// message published after this resolves is delivered.
    fn subscribe(&self, topic: &str) -> BoxFuture<'static, Result<Subscription>>;
}

impl<B: Backplane + ?Sized> Backplane for std::sync::Arc<B> {
    fn publish(&self, topic: &str, message: Bytes) -> BoxFuture<'static, Result<()>> {
        (**self).publish(topic, message)
    }

    fn subscribe(&self, topic: &str) -> BoxFuture<'static, Result<Subscription>> {
        (**self).subscribe(topic)
    }
}

/// The messages of one subscribed topic; dropping it unsubscribes.
pub struct Subscription {
    stream: BoxStream<'static, Result<Bytes>>,
}

impl Subscription {
    /// Wraps a stream of messages. An `Err` item reports a problem (a gap, a
    /// reconnect) and the stream goes on; the end of the stream means the
    /// subscription is over.
    pub fn new(stream: impl Stream<Item = Result<Bytes>> + Send + 'static) -> Subscription {
        Subscription { stream: Box::pin(stream) }
    }
}

impl fmt::Debug for Subscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscription").finish_non_exhaustive()
    }
}

impl Stream for Subscription {
    type Item = Result<Bytes>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.stream.as_mut().poll_next(cx)
    }
}
