//! A backplane written outside the crate, on another real engine: NATS core
//! (through `async-nats`), using nothing but switchboard's public API. Two
//! of these servers pointed at one `nats-server` share rooms.
//!
//! ```text
//! nats-server -p 4222 &
//! cargo run --example custom-backplane -- --addr 127.0.0.1:3001 &
//! cargo run --example custom-backplane -- --addr 127.0.0.1:3002
//! ```
//!
//! `NATS_URL` picks the server (default `nats://127.0.0.1:4222`). Clients
//! of either server that join the same room get each other's `say` calls.
//! `tests/custom_backplane.rs` runs switchboard's backplane conformance
//! suite against [`NatsBackplane`] on a private `nats-server`.
//!
//! What the `Backplane` contract asks, and how NATS core gives it:
//!
//! - *`subscribe` resolves once the subscription is active*: NATS has no
//!   subscribe acknowledgement, but a server handles one connection's
//!   commands in order. After `SUB` we send a request to a subject nobody
//!   serves; the server's "no responders" answer comes back only after it
//!   processed everything sent before, the `SUB` included.
//! - *`publish` resolves once the engine accepted the message*: core NATS
//!   has no publish acknowledgement either; the same round trip after the
//!   `PUB` says the server has routed it.
//! - *subscriptions are bounded and report gaps*: each subscription is
//!   drained by a relay task into a bounded queue; when it is full the
//!   message is dropped for that subscription and the next item is an
//!   error saying how many were lost.
//! - *dropping a subscription unsubscribes*: dropping it stops the relay,
//!   whose NATS subscriber unsubscribes when dropped.
//!
//! Topics become subjects `switchboard.<topic as hex>`: a topic may contain
//! characters that are special in subjects (`.`, `*`, `>`, spaces).

#[path = "common/cli.rs"]
mod cli;

use bytes::Bytes;
use futures::channel::mpsc;
use futures::future::BoxFuture;
use futures::StreamExt;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use switchboard::{Backplane, Call, CallError, Error, ErrorKind, Hub, Subscription};

/// Messages a subscription buffers before it drops and reports.
const CAPACITY: usize = 4096;

/// A [`Backplane`] on NATS core.
#[derive(Clone, Debug)]
pub struct NatsBackplane {
    client: async_nats::Client,
    /// A subject nobody subscribes to, for round trips.
    sync_subject: String,
}

fn backplane_error(e: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::with_source(ErrorKind::Backplane, e)
}

fn subject(topic: &str) -> String {
    let mut s = String::with_capacity(12 + 2 * topic.len());
    s.push_str("switchboard.");
    for b in topic.bytes() {
        let _ = write!(s, "{b:02x}");
    }
    s
}

impl NatsBackplane {
    /// Connects to the NATS server at `url`.
    pub async fn connect(url: &str) -> Result<NatsBackplane, Error> {
        let client = async_nats::ConnectOptions::new()
            // async-nats's own per-subscription buffer; our relay drains it.
            .subscription_capacity(CAPACITY)
            .connect(url)
            .await
            .map_err(backplane_error)?;
        let sync_subject = format!("switchboard-sync.{}", client.new_inbox());
        Ok(NatsBackplane { client, sync_subject })
    }

    /// Waits until the server has processed everything this connection sent
    /// so far.
    async fn round_trip(&self) -> Result<(), Error> {
        match self.client.request(self.sync_subject.clone(), Bytes::new()).await {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == async_nats::RequestErrorKind::NoResponders => Ok(()),
            Err(e) => Err(backplane_error(e)),
        }
    }
}

/// Aborts the relay task (and so unsubscribes) when the subscription is
/// dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Backplane for NatsBackplane {
    fn publish(&self, topic: &str, message: Bytes) -> BoxFuture<'static, switchboard::Result<()>> {
        let this = self.clone();
        let subject = subject(topic);
        Box::pin(async move {
            this.client.publish(subject, message).await.map_err(backplane_error)?;
            this.round_trip().await
        })
    }

    fn subscribe(&self, topic: &str) -> BoxFuture<'static, switchboard::Result<Subscription>> {
        let this = self.clone();
        let subject = subject(topic);
        Box::pin(async move {
            let mut nats = this.client.subscribe(subject).await.map_err(backplane_error)?;
            this.round_trip().await?;
            // futures' channel holds `capacity + 1` messages per sender.
            let (mut tx, rx) = mpsc::channel::<Bytes>(CAPACITY - 1);
            let dropped = Arc::new(AtomicU64::new(0));
            let counter = dropped.clone();
            let relay = tokio::spawn(async move {
                while let Some(msg) = nats.next().await {
                    match tx.try_send(msg.payload) {
                        Ok(()) => {}
                        Err(e) if e.is_full() => {
                            counter.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(_) => return, // the subscription is gone
                    }
                }
            });
            let guard = AbortOnDrop(relay);
            let stream = futures::stream::unfold((rx, dropped, guard), |(mut rx, dropped, guard)| async move {
                let lost = dropped.swap(0, Ordering::Relaxed);
                if lost > 0 {
                    let err = Error::with_source(ErrorKind::Backplane, format!("lagged: {lost} messages dropped"));
                    return Some((Err(err), (rx, dropped, guard)));
                }
                let msg = rx.next().await?;
                Some((Ok(msg), (rx, dropped, guard)))
            });
            Ok(Subscription::new(stream))
        })
    }
}

#[allow(dead_code)] // the test includes this file for `NatsBackplane` only
#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addr = cli::addr_arg("custom-backplane");
    let url = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned());
    let backplane = NatsBackplane::connect(&url).await.map_err(std::io::Error::other)?;
    let hub = Hub::builder()
        .backplane(backplane)
        .on("say", |call: Call, text: String| async move {
            call.broadcast("said", &text).await.map_err(|e| CallError::internal(e.to_string()))?;
            Ok(())
        })
        .build();
    let listener = tokio::net::TcpListener::bind(addr).await?;
    println!("custom-backplane listening on ws://{}/ (NATS at {url})", listener.local_addr()?);
    tokio::select! {
        r = switchboard::transport::ws::serve(listener, hub.clone(), Default::default()) => r?,
        _ = cli::shutdown_signal() => println!("custom-backplane stopped"),
    }
    Ok(())
}
