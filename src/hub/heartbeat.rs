//! Heartbeats for every connection of a hub, on one shared timer wheel.
//!
//! One task per hub owns a `DelayQueue` (a hierarchical timer wheel) with one
//! entry per connection, holding only a `Weak` to the session. An entry fires
//! in one of two phases:
//!
//! - **Idle → ping**: `interval` after the connection opened (or after its
//!   previous check), the session's `alive` flag is cleared, a ping is queued,
//!   and the entry comes back `timeout` later.
//! - **Awaiting → check**: if any frame arrived since the ping (`alive` set
//!   again by the reader), the next ping is due `interval` after the previous
//!   one; otherwise the connection is closed with code 4001.
//!
//! So a peer silent from the start is closed exactly `interval + timeout`
//! after it connected, and any silent peer at most `max(interval, timeout) +
//! timeout` after its last sign of life; a live one costs one timer entry and
//! one ping per interval — no sleeping future per connection. The task runs
//! on the runtime of the hub's first connection.

use super::session::Session;
use super::DisconnectReason;
use crate::protocol::CloseCode;
use std::sync::atomic::Ordering;
use std::sync::Weak;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::time::DelayQueue;

enum Phase {
    Idle,
    Awaiting,
}

struct Entry {
    session: Weak<Session>,
    phase: Phase,
}

/// Capacity of the registration channel; `register` waits when it is full.
pub(crate) const REGISTRATION_CAPACITY: usize = 1024;

pub(crate) fn spawn(interval: Duration, timeout: Duration) -> mpsc::Sender<Weak<Session>> {
    let (tx, mut rx) = mpsc::channel::<Weak<Session>>(REGISTRATION_CAPACITY);
    tokio::spawn(async move {
        let mut wheel: DelayQueue<Entry> = DelayQueue::new();
        let after_check = interval.saturating_sub(timeout);
        loop {
            tokio::select! {
                reg = rx.recv() => match reg {
                    Some(session) => { wheel.insert(Entry { session, phase: Phase::Idle }, interval); }
                    // The hub is gone.
                    None => return,
                },
                Some(expired) = futures::future::poll_fn(|cx| wheel.poll_expired(cx)) => {
                    let entry = expired.into_inner();
                    let Some(session) = entry.session.upgrade() else { continue };
                    if session.is_cancelled() {
                        continue;
                    }
                    match entry.phase {
                        Phase::Idle => {
                            session.alive.store(false, Ordering::Relaxed);
                            session.send_ping();
                            wheel.insert(Entry { session: entry.session, phase: Phase::Awaiting }, timeout);
                        }
                        Phase::Awaiting if session.alive.load(Ordering::Relaxed) => {
                            if after_check.is_zero() {
                                session.alive.store(false, Ordering::Relaxed);
                                session.send_ping();
                                wheel.insert(Entry { session: entry.session, phase: Phase::Awaiting }, timeout);
                            } else {
                                wheel.insert(Entry { session: entry.session, phase: Phase::Idle }, after_check);
                            }
                        }
                        Phase::Awaiting => session.close(
                            DisconnectReason::HeartbeatTimeout,
                            CloseCode::HEARTBEAT_TIMEOUT,
                            "heartbeat timeout",
                            true,
                        ),
                    }
                }
            }
        }
    });
    tx
}
