//! Conformance suites for implementations of the crate's extension traits
//! (feature `testing`): one per trait a host implements.
//!
//! | suite | trait | shorthand | with options |
//! |---|---|---|---|
//! | backplane | [`Backplane`](crate::backplane::Backplane) | [`backplane(a, b)`](backplane()) | [`BackplaneSuite`] |
//! | history store | [`HistoryStore`](crate::history::HistoryStore) | [`history(a, b)`](history()) | [`HistorySuite`] |
//! | presence store | [`PresenceStore`](crate::presence::PresenceStore) | [`presence_store(a, b)`](presence_store()) | [`PresenceStoreSuite`] |
//! | transport | [`Transport`](crate::transport::Transport) | — | [`TransportSuite`] (a connected pair per check) |
//! | synced-room snapshot store | [`SnapshotStore`](crate::sync::SnapshotStore) | [`snapshot_store(store)`](snapshot_store()) (one handle) | [`SnapshotSuite`] |
//!
//! The store and backplane suites take **two handles on the same engine** (`a` and `b`: two
//! connections, as two nodes would have), because several rules are about
//! what one node sees of another's work and about races between them.
//! A host that writes its own [`Backplane`](crate::backplane::Backplane) proves it
//! behaves like ours with one call in a test:
//!
//! ```no_run
//! # async fn run() {
//! use switchboard::backplane::MemoryBackplane;
//! let engine = MemoryBackplane::new();
//! switchboard::testing::backplane(engine.clone(), engine).await;
//! # }
//! ```
//!
//! The shorthands panic with the [`Failure`]; the `…Suite` builders return
//! it, and take what only the implementer can provide: a hook that **cuts
//! the handles' connections** to the engine (the suite then checks what the
//! trait docs ask of a lost connection), and for a backplane the declared
//! subscription bound (the suite then checks that overflow is reported).
//!
//! ```no_run
//! # async fn run() {
//! use switchboard::testing::BackplaneSuite;
//! let engine = switchboard::backplane::MemoryBackplane::with_capacity(64);
//! BackplaneSuite::new(engine.clone(), engine)
//!     .subscription_capacity(64)
//!     // .cut_connection(|| async { /* e.g. restart the engine's server */ })
//!     .run()
//!     .await
//!     .unwrap_or_else(|failure| panic!("{failure}"));
//! # }
//! ```
//!
//! A failure names the check that tripped ([`Failure::check`], one of the
//! suite's `CHECKS`) and what was seen. Every check is tripped by at least
//! one deliberately broken implementation in the crate's own tests
//! (`tests/mutants.rs`; the table is in `docs/extending.md`). The suites
//! use names prefixed with a random tag, so they can run against a shared
//! engine, and leave nothing behind but what expires by itself.

/// Returns the failure of `$check` (in the calling suite, its `SUITE`)
/// unless `$cond` holds.
macro_rules! ensure {
    ($cond:expr, $check:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(Failure::new(SUITE, $check, format!($($msg)+)));
        }
    };
}

mod backplane;
mod history;
mod presence_store;
mod snapshot_store;
mod transport;

pub use backplane::{backplane, BackplaneSuite};
pub use history::{history, HistorySuite};
pub use presence_store::{presence_store, PresenceStoreSuite};
pub use snapshot_store::{snapshot_store, SnapshotSuite};
pub use transport::{Peer, Report, TransportSuite};

use futures::future::BoxFuture;
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

/// How long a suite waits for something that must happen before declaring
/// it lost (a message, a recovery after a cut connection).
pub const WAIT: Duration = Duration::from_secs(5);

/// Which check of a conformance suite failed, and what it saw.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Failure {
    /// The suite: `"backplane"`, `"history"`, `"presence_store"`,
    /// `"snapshot_store"` or `"transport"`.
    pub suite: &'static str,
    /// The check, one of the suite's `CHECKS` (e.g. `"history.max_age"`).
    pub check: &'static str,
    /// What was expected and what happened instead.
    pub message: String,
}

impl Failure {
    pub(crate) fn new(suite: &'static str, check: &'static str, message: impl Into<String>) -> Failure {
        Failure { suite, check, message: message.into() }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} conformance check `{}` failed: {}", self.suite, self.check, self.message)
    }
}

impl fmt::Debug for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::error::Error for Failure {}

/// The implementer's hook that cuts the handles' connections to the engine
/// (see the suites' `cut_connection`).
pub(crate) type Cut = Arc<dyn Fn() -> BoxFuture<'static, ()> + Send + Sync>;

pub(crate) fn cut_hook<F, Fut>(f: F) -> Cut
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    Arc::new(move || Box::pin(f()))
}

/// A random tag of fixed width (16 hex digits), so names built from it have
/// known lengths.
pub(crate) fn tag(prefix: &str) -> String {
    format!("{prefix}{:016x}", crate::util::random_u64())
}

/// Two distinct names of exactly `len` bytes that start with `prefix`, use
/// the characters a name may have and differ only in their last byte, plus
/// names that a careless escaping would map onto each other.
pub(crate) fn long_names(prefix: &str, len: usize) -> Vec<String> {
    let mut base = String::from(prefix);
    // Every character a room name may contain (see `crate::room`).
    let chars: Vec<u8> =
        (b'A'..=b'Z').chain(b'a'..=b'z').chain(b'0'..=b'9').chain(crate::room::ROOM_NAME_PUNCTUATION.bytes()).collect();
    let mut i = 0;
    while base.len() < len - 1 {
        base.push(char::from(chars[i % chars.len()]));
        i += 1;
    }
    let mut names = vec![format!("{base}a"), format!("{base}b")];
    // Every separator (an engine might escape them alike), and case.
    for sep in crate::room::ROOM_NAME_PUNCTUATION.chars().chain(['A', 'a']) {
        names.push(format!("{prefix}x{sep}y"));
    }
    names
}

/// Maps a store or engine error to a failure of `check`.
pub(crate) trait Step<T> {
    fn step(self, suite: &'static str, check: &'static str, what: &str) -> Result<T, Failure>;
}

impl<T> Step<T> for crate::Result<T> {
    fn step(self, suite: &'static str, check: &'static str, what: &str) -> Result<T, Failure> {
        self.map_err(|e| Failure::new(suite, check, format!("{what} failed: {e}")))
    }
}

/// Runs `f` until it succeeds, for at most [`WAIT`] (after a cut connection).
pub(crate) async fn retry<T, Fut>(
    suite: &'static str,
    check: &'static str,
    what: &str,
    mut f: impl FnMut() -> Fut,
) -> Result<T, Failure>
where
    Fut: Future<Output = crate::Result<T>>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout(WAIT, f()).await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) if tokio::time::Instant::now() >= deadline => {
                return Err(Failure::new(suite, check, format!("{what} still fails {WAIT:?} after the cut: {e}")))
            }
            Err(_) => return Err(Failure::new(suite, check, format!("{what} did not answer within {WAIT:?}"))),
            Ok(Err(_)) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}
