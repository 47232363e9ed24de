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
//! suite against [`NatsBackplane`] on a private `nats-server`, and runs
//! this program as a user would.
//!
//! Try it without writing a client: the servers speak the protocol of
//! `docs/protocol.md` on a plain WebSocket, so a command-line WebSocket
//! client will do, for example [websocat](https://github.com/vi/websocat),
//! one per server:
//!
//! ```text
//! websocat ws://127.0.0.1:3001/          # and ws://127.0.0.1:3002/ in another terminal
//! {"type":"join","ref":1,"room":"lobby"}
//! {"type":"call","ref":2,"room":"lobby","event":"say","data":"hello from 3001"}
//! ```
//!
//! Both terminals then show `{"type":"event","room":"lobby","event":"said","data":"hello from 3001"}`.
//! (The `chat-cli` example speaks the `chat` example's events, not these.)
//!
//! **When NATS is down.** Started without a reachable NATS, the program
//! says which URL it tried and exits with status 1. When NATS goes away
//! later, async-nats reconnects in the background; meanwhile a `subscribe`
//! or `publish` fails **at once** (the client's connection state is checked
//! first, and a round trip gives up after [`REQUEST_TIMEOUT`] when the loss
//! is not noticed yet), so a join or a `say` gets `503 temporarily
//! unavailable, retry` instead of hanging for async-nats's default 10 s
//! request timeout. Ctrl-C or SIGTERM closes every connection with a close
//! frame (1001) before exiting.
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
//! - *a lost connection is a loss*: async-nats reconnects and resubscribes
//!   by itself, silently — messages published meanwhile are gone. The
//!   client's event callback counts losses (disconnected, reconnected,
//!   async-nats's own buffer overflowing: `SlowConsumer`) and every open
//!   subscription yields an error for each, so the hub refills recoverable
//!   rooms from history. (Found by the conformance suite's lost-connection
//!   check: without it, a gap during a NATS restart went unnoticed.)
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
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use switchboard::{backplane::Backplane, backplane::Subscription, Call, CallError, Error, ErrorKind, Hub};

/// Messages a subscription buffers before it drops and reports.
pub const CAPACITY: usize = 4096;

/// How long a round trip to NATS may take before a `publish` or a
/// `subscribe` fails (async-nats's default is 10 s, which a join would wait
/// through when NATS is gone and the loss not noticed yet).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// A [`Backplane`] on NATS core.
#[derive(Clone, Debug)]
pub struct NatsBackplane {
    client: async_nats::Client,
    /// A subject nobody subscribes to, for round trips.
    sync_subject: String,
    /// The server's URL, for error messages.
    url: Arc<str>,
    /// Bumped on every event that may have lost messages; subscriptions
    /// watch it.
    losses: Arc<tokio::sync::watch::Sender<u64>>,
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
        let losses = Arc::new(tokio::sync::watch::Sender::new(0u64));
        let (tx, down) = (losses.clone(), Arc::new(AtomicBool::new(false)));
        let client = async_nats::ConnectOptions::new()
            .event_callback(move |event| {
                let (tx, down) = (tx.clone(), down.clone());
                async move {
                    let lost = match event {
                        async_nats::Event::Disconnected => {
                            down.store(true, Ordering::Relaxed);
                            true
                        }
                        // The first connect is no loss; a reconnect ends
                        // one (messages may have gone before the resubscribe).
                        async_nats::Event::Connected => down.swap(false, Ordering::Relaxed),
                        async_nats::Event::SlowConsumer(_) => true,
                        _ => false,
                    };
                    if lost {
                        tx.send_modify(|n| *n += 1);
                    }
                }
            })
            // async-nats's own per-subscription buffer; our relay drains it.
            .subscription_capacity(CAPACITY)
            .request_timeout(Some(REQUEST_TIMEOUT))
            .connect(url)
            .await
            .map_err(backplane_error)?;
        let sync_subject = format!("switchboard-sync.{}", client.new_inbox());
        Ok(NatsBackplane { client, sync_subject, url: Arc::from(url), losses })
    }

    /// Fails at once while the client is not connected to NATS (it keeps
    /// reconnecting in the background).
    fn connected(&self) -> Result<(), Error> {
        match self.client.connection_state() {
            async_nats::connection::State::Connected => Ok(()),
            _ => Err(Error::with_source(
                ErrorKind::Backplane,
                format!("NATS at {} is unreachable (reconnecting)", self.url),
            )),
        }
    }

    /// Waits until the server has processed everything this connection sent
    /// so far.
    async fn round_trip(&self) -> Result<(), Error> {
        self.connected()?;
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
            this.connected()?;
            this.client.publish(subject, message).await.map_err(backplane_error)?;
            this.round_trip().await
        })
    }

    fn subscribe(&self, topic: &str) -> BoxFuture<'static, switchboard::Result<Subscription>> {
        let this = self.clone();
        let subject = subject(topic);
        Box::pin(async move {
            this.connected()?;
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
            let mut losses = this.losses.subscribe();
            losses.mark_unchanged();
            let state = (rx, dropped, guard, losses);
            let stream = futures::stream::unfold(state, |(mut rx, dropped, guard, mut losses)| async move {
                let lost = dropped.swap(0, Ordering::Relaxed);
                if lost > 0 {
                    let err = Error::with_source(ErrorKind::Backplane, format!("lagged: {lost} messages dropped"));
                    return Some((Err(err), (rx, dropped, guard, losses)));
                }
                tokio::select! {
                    // The sender lives as long as the client: `Err` only
                    // when the whole backplane is gone.
                    Ok(()) = losses.changed() => {
                        let err = Error::with_source(
                            ErrorKind::Backplane,
                            "the connection to NATS was lost or lagged: messages may be missing",
                        );
                        Some((Err(err), (rx, dropped, guard, losses)))
                    }
                    msg = rx.next() => Some((Ok(msg?), (rx, dropped, guard, losses))),
                }
            });
            Ok(Subscription::new(stream))
        })
    }
}

const USAGE: cli::Usage = cli::Usage {
    program: "custom-backplane",
    about: "a switchboard server whose backplane is NATS core, written outside the crate.\nServers pointed at one nats-server share rooms; a `call` of event `say` in a room\nbroadcasts `said` to it. WebSocket endpoint at ws://ADDR/.",
    flags: "",
    details: "  NATS_URL=URL       the NATS server (default nats://127.0.0.1:4222)\n  RUST_LOG=LEVEL     log filter for stderr (default warn)\n",
};

#[allow(dead_code)] // the test includes this file for `NatsBackplane` only
#[tokio::main]
async fn main() -> std::process::ExitCode {
    let addr = cli::addr_arg(&USAGE);
    cli::init_logging();
    let url = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned());
    let backplane = match NatsBackplane::connect(&url).await {
        Ok(b) => b,
        Err(e) => {
            let cause = std::error::Error::source(&e).map(ToString::to_string).unwrap_or_else(|| e.to_string());
            eprintln!(
                "custom-backplane: cannot reach NATS at {url} ({cause}).\n\
                 Start one (`nats-server -p 4222`) or point NATS_URL at yours."
            );
            return std::process::ExitCode::FAILURE;
        }
    };
    let hub = Hub::builder()
        .backplane(backplane)
        .on("say", |call: Call, text: String| async move {
            // `?`: with NATS down the client gets `503 temporarily
            // unavailable, retry`; the cause goes to the log.
            call.broadcast("said", &text).await?;
            Ok::<_, CallError>(())
        })
        .build();
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("custom-backplane: cannot listen on {addr}: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match listener.local_addr() {
        Ok(local) => println!("custom-backplane listening on ws://{local}/ (NATS at {url})"),
        Err(e) => eprintln!("custom-backplane: {e}"),
    }
    tokio::select! {
        r = switchboard::integration::ws::serve(listener, hub.clone(), Default::default()) => {
            if let Err(e) = r {
                eprintln!("custom-backplane: {e}");
                return std::process::ExitCode::FAILURE;
            }
        }
        _ = cli::shutdown_signal() => {
            // Every connection gets a close frame (1001 going away).
            hub.shutdown(Duration::from_secs(5)).await;
            println!("custom-backplane stopped");
        }
    }
    std::process::ExitCode::SUCCESS
}
