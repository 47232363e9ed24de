//! Draining a hub before a deploy: readiness turns false, new connections
//! are refused, and the open ones are closed in batches over a period with
//! the reconnect code, so their clients move to other nodes without a
//! reconnect storm (Phoenix's connection drainer).

use super::*;

/// How [`Hub::drain`] closes connections.
///
/// ```
/// use std::time::Duration;
/// use switchboard::hub::DrainConfig;
/// let config = DrainConfig::default().period(Duration::from_secs(60)).batch(200);
/// assert_eq!(config.code, switchboard::protocol::CloseCode::RECONNECT);
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct DrainConfig {
    /// The time to spread the closes over. The connections open when the
    /// drain starts are split into `ceil(n / batch)` batches of equal size
    /// (at most `batch`), started at equal steps of `period / batches`, the
    /// first at once; the last starts before `period` ends. Default 30 s.
    pub period: Duration,
    /// Most connections closed in one batch. Default 100.
    pub batch: usize,
    /// The close code. Default 4002 "reconnect"
    /// ([`CloseCode::RECONNECT`]): clients reconnect with their usual
    /// jittered backoff, to another node. Keep it in the reconnect range
    /// (`docs/protocol.md` §7.1).
    pub code: CloseCode,
    /// The close reason. Default `"server draining, reconnect"`.
    pub reason: String,
    /// The `retry-after` of the `503` that refuses new connections while
    /// draining (whole seconds on the wire, rounded up). Default 2 s.
    pub retry_after: Duration,
}

impl Default for DrainConfig {
    fn default() -> Self {
        DrainConfig {
            period: Duration::from_secs(30),
            batch: 100,
            code: CloseCode::RECONNECT,
            reason: "server draining, reconnect".to_owned(),
            retry_after: Duration::from_secs(2),
        }
    }
}

impl DrainConfig {
    /// Sets [`DrainConfig::period`].
    pub fn period(mut self, period: Duration) -> Self {
        self.period = period;
        self
    }

    /// Sets [`DrainConfig::batch`] (0 counts as 1).
    pub fn batch(mut self, batch: usize) -> Self {
        self.batch = batch;
        self
    }

    /// Sets [`DrainConfig::code`].
    pub fn code(mut self, code: CloseCode) -> Self {
        self.code = code;
        self
    }

    /// Sets [`DrainConfig::reason`].
    pub fn reason(mut self, reason: impl Into<String>) -> Self {
        self.reason = reason.into();
        self
    }

    /// Sets [`DrainConfig::retry_after`].
    pub fn retry_after(mut self, retry_after: Duration) -> Self {
        self.retry_after = retry_after;
        self
    }
}

/// What a [`Hub::drain`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct DrainReport {
    /// Connections this drain closed.
    pub closed: usize,
    /// Batches it closed them in.
    pub batches: usize,
    /// Connections still open when it returned (closes that did not finish
    /// within the hub's close timeout; [`Hub::shutdown`] ends them).
    pub remaining: usize,
}

/// The drain's state: set once, by the first [`Hub::drain`].
#[derive(Default)]
pub(crate) struct Draining {
    on: AtomicBool,
    retry_after: parking_lot::Mutex<Duration>,
}

impl Hub {
    /// Whether this hub should get new connections: `false` from the start
    /// of [`Hub::drain`] or [`Hub::shutdown`] on. A load balancer's
    /// readiness probe reads it
    /// ([`integration::axum::health`](crate::integration::axum::health)
    /// serves it as `/readyz`).
    pub fn is_ready(&self) -> bool {
        !self.is_draining() && !self.is_shutting_down()
    }

    /// Whether [`Hub::drain`] has started.
    pub fn is_draining(&self) -> bool {
        self.inner.draining.on.load(Ordering::Acquire)
    }

    /// The refusal of a new connection while draining: `503` with
    /// `retry-after`.
    pub(super) fn drain_refusal(&self) -> Option<Rejection> {
        if !self.is_draining() {
            return None;
        }
        crate::metrics::refused(crate::metrics::Refusal::Draining);
        let after = *self.inner.draining.retry_after.lock();
        Some(Rejection::new(http::StatusCode::SERVICE_UNAVAILABLE, "server is draining").with_retry_after(after))
    }

    /// Drains the hub before it is stopped, so a rolling deploy moves its
    /// clients to other nodes without a reconnect storm:
    ///
    /// 1. readiness turns false at once ([`Hub::is_ready`]), before any
    ///    close, so the load balancer stops sending new clients here;
    /// 2. new connections are refused before the upgrade with `503 server
    ///    is draining` and `retry-after` ([`DrainConfig::retry_after`]);
    /// 3. the open connections are closed in batches of at most
    ///    [`DrainConfig::batch`], spread over [`DrainConfig::period`], with
    ///    [`DrainConfig::code`] (4002 "reconnect" by default), each after
    ///    what is already queued for it; the `on_disconnect` hook gets
    ///    [`DisconnectReason::Drained`] with the code;
    /// 4. it resolves once they are gone (each close waits at most the
    ///    hub's close timeout for the client) and reports what it did.
    ///
    /// Everything else keeps working meanwhile: the connections not yet
    /// closed publish, call and receive as before. Call [`Hub::shutdown`]
    /// afterwards to finish (presence flush, backplane). A drain is not
    /// undone: a second call, or one during shutdown, returns at once with
    /// an empty report. A dropped drain future stops closing; readiness
    /// stays false.
    pub async fn drain(&self, config: DrainConfig) -> DrainReport {
        if self.is_draining() || self.is_shutting_down() {
            return DrainReport::default();
        }
        // Before readiness turns: the first refusal already carries it.
        *self.inner.draining.retry_after.lock() = config.retry_after;
        if self.inner.draining.on.swap(true, Ordering::AcqRel) {
            return DrainReport::default();
        }
        let batch = config.batch.max(1);
        let open = |hub: &Hub| -> Vec<Arc<Session>> {
            let mut open: Vec<Arc<Session>> =
                hub.inner.sessions.read().values().filter(|s| !s.is_cancelled()).cloned().collect();
            open.sort_by_key(|s| s.id);
            open
        };
        let n = open(self).len();
        let batches = n.div_ceil(batch).max(1);
        // Equal batches (at most `batch` each) at equal steps.
        let size = n.div_ceil(batches).max(1);
        let step = config.period / u32::try_from(batches).unwrap_or(u32::MAX);
        let start = tokio::time::Instant::now();
        let mut report = DrainReport::default();
        // A batch takes the oldest connections still open each time, so a
        // connection whose handshake was in flight when the drain began
        // (admitted before readiness turned) is closed in a later batch;
        // after the planned batches, such stragglers get batches of their
        // own, one step apart.
        let mut i: u32 = 0;
        loop {
            if self.is_shutting_down() {
                break;
            }
            if open(self).is_empty() {
                break;
            }
            // Saturating: a period of years must not overflow an instant.
            tokio::time::sleep(step.saturating_mul(i).saturating_sub(start.elapsed())).await;
            let mut closed = 0;
            for s in open(self).iter().take(size) {
                let frame = crate::transport::CloseFrame { code: config.code, reason: config.reason.clone() };
                if s.close_with(DisconnectReason::Drained(config.code), Some(frame), false) {
                    closed += 1;
                }
            }
            if closed > 0 {
                report.closed += closed;
                report.batches += 1;
            }
            i = i.saturating_add(1);
            // A zero period closes batch after batch: let the writers run.
            tokio::task::yield_now().await;
        }
        let wait = self.inner.config.close_timeout.saturating_mul(2);
        let _ = tokio::time::timeout(wait, self.wait_empty()).await;
        report.remaining = self.inner.sessions.read().len();
        report
    }
}
