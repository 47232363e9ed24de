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
//! member and unsubscribes when the last one leaves. Messages are opaque
//! bytes to the backplane; the hub tags each with its node id and ignores its
//! own messages when a backplane echoes them back, so a backplane may or may
//! not deliver to the publisher.
//!
//! # The rules an implementation keeps
//!
//! `switchboard::testing::BackplaneSuite` (feature `testing`) checks each of
//! them; `docs/extending.md` walks through an implementation on a real
//! engine.
//!
//! 1. **Active on resolve.** A message published (by any node) after
//!    `subscribe` resolved is delivered to that subscription. Nothing
//!    published *before* the subscription existed is delivered to it — not
//!    even when the handle shares one engine subscription between several
//!    [`Subscription`]s of a topic and has messages buffered for the others.
//! 2. **Binary-safe and in order.** Messages arrive unchanged (any bytes,
//!    tens of KiB), each once, in publish order per publisher.
//! 3. **Per subscription.** Two subscriptions to one topic both receive;
//!    dropping one leaves the other working (count references when the
//!    engine subscription is shared).
//! 4. **Topics are kept apart exactly.** A topic is a room name (1 to
//!    [`MAX_ROOM_NAME_LEN`](crate::room::MAX_ROOM_NAME_LEN) bytes of
//!    `A–Z a–z 0–9` and [`ROOM_NAME_PUNCTUATION`](crate::room::ROOM_NAME_PUNCTUATION)
//!    `_ - . : / @ # = + ~`) or one of the hub's own topics,
//!    which start with `$` (`$presence:<room>`, `$sse.<node>`): at most
//!    [`MAX_TOPIC_LEN`] bytes of ASCII. No two topics may collide — mind an
//!    engine's own limits (a Postgres channel name is cut at 63 bytes; a
//!    NATS subject treats `.`, `*` and `>` specially): hash or hex-encode
//!    topics that do not fit.
//! 5. **Bounded, and losses are reported.** A subscriber that falls behind
//!    must not make the handle buffer without limit: drop messages and
//!    yield an `Err` of kind [`ErrorKind::Backplane`](crate::ErrorKind::Backplane)
//!    in their place. Never lose a message silently: the hub treats an
//!    `Err` item as "something may be missing" and resyncs recoverable
//!    rooms from history.
//! 6. **A lost connection is a loss.** When the connection under a
//!    subscription breaks, either yield an `Err` item (and go on once
//!    reconnected and resubscribed) or end the stream; the hub answers
//!    both by refilling recoverable rooms from history, and after an end
//!    it subscribes again. An `Err` item means "the stream goes on"; the
//!    end means "this subscription is over". Meanwhile `publish` and
//!    `subscribe` fail with an error (promptly, not after a long timeout)
//!    until the handle has reconnected by itself.
//! 7. **The first poll starts the work.** Both methods return boxed
//!    futures that own what they need (`'static`). A publish is ordered
//!    when its future is first polled: take the connection and queue the
//!    command there, with no `.await` before it (a pool checkout first lets
//!    a later publish overtake an earlier one).
//!
//! [`MemoryBackplane`] links hubs in one process. A host's own backplane is a
//! type implementing this trait.

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

/// Longest topic the hub uses, in bytes: a `$presence:` prefix (10 bytes)
/// and a room name of [`MAX_ROOM_NAME_LEN`](crate::room::MAX_ROOM_NAME_LEN)
/// bytes. A backplane must keep topics of up to this length apart exactly.
pub const MAX_TOPIC_LEN: usize = 10 + crate::room::MAX_ROOM_NAME_LEN;

/// A pub/sub engine linking hubs. See the [module docs](self) for the rules
/// an implementation keeps.
pub trait Backplane: Send + Sync + 'static {
    /// Publishes `message` to every subscriber of `topic` on every node.
    fn publish(&self, topic: &str, message: Bytes) -> BoxFuture<'static, Result<()>>;

    /// Subscribes to `topic`; resolves once the subscription is active, so a
    /// message published after this resolves is delivered, and nothing
    /// published before it existed is.
    fn subscribe(&self, topic: &str) -> BoxFuture<'static, Result<Subscription>>;
}

/// The host's backplane as the hub uses it: every call bounded by
/// [`HubConfig::backplane_timeout`](crate::HubConfig::backplane_timeout), so
/// a backplane that never answers fails a publish (or a subscription, which
/// is retried) with [`ErrorKind::Backplane`](crate::ErrorKind::Backplane)
/// instead of holding it forever.
pub(crate) struct Bounded {
    backplane: std::sync::Arc<dyn Backplane>,
    timeout: std::time::Duration,
}

impl Bounded {
    pub(crate) fn new(backplane: std::sync::Arc<dyn Backplane>, timeout: std::time::Duration) -> Bounded {
        Bounded { backplane, timeout }
    }
}

impl Backplane for Bounded {
    fn publish(&self, topic: &str, message: Bytes) -> BoxFuture<'static, Result<()>> {
        let call = self.backplane.publish(topic, message);
        crate::metrics::backplane_publish(crate::util::bounded(
            self.timeout,
            crate::ErrorKind::Backplane,
            "backplane publish",
            call,
        ))
    }

    fn subscribe(&self, topic: &str) -> BoxFuture<'static, Result<Subscription>> {
        let call = self.backplane.subscribe(topic);
        crate::util::bounded(self.timeout, crate::ErrorKind::Backplane, "backplane subscribe", call)
    }
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
    /// Wraps a stream of messages. An `Err` item reports a problem (dropped
    /// messages, a reconnect: something may be missing) and the stream goes
    /// on; the end of the stream means the subscription is over (the hub
    /// subscribes again). The stream must be bounded (see the
    /// [module docs](self)).
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
