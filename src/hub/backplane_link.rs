//! Keeps the hub's backplane subscriptions in step with its local rooms.
//!
//! One manager task per hub (started with the first join) owns every room
//! subscription. Joins and leaves only *mark* a room as needing a look and
//! wake the manager; the manager then makes "subscribed" equal "the room has
//! local members" for each marked room, one room at a time, so a subscribe
//! racing an unsubscribe of the same room can never leave the two out of
//! step. A join waits for that step before it is answered, so a member never
//! misses a message published on another node after its join reply.
//!
//! Marks are kept in a map keyed by room (bounded by the number of rooms),
//! not a queue: churn on one room costs one entry.
//!
//! A subscription that ends (the backplane gave up on it) or could not be
//! made while the room has members is not left that way: its room is marked
//! again, after [`RESUBSCRIBE_DELAY`] (doubling to [`RESUBSCRIBE_MAX`] while
//! it keeps failing), and the manager subscribes anew if the room still has
//! members. A recoverable room reads what it missed from its history store
//! twice: at once when the subscription ends (for what the old one lost) and
//! again as soon as the new one is active (for what was published in
//! between, which no subscription saw).

use super::{Hub, HubInner, TaskGuard};
use crate::backplane::message::RoomMessage;
use crate::backplane::{Backplane, Subscription};
use crate::error::{Error, ErrorKind, Result};
use crate::util::AbortOnDrop;
use futures::StreamExt;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use tokio::sync::{oneshot, Notify};

type Waiter = oneshot::Sender<std::result::Result<(), String>>;

/// First wait before subscribing again to a room whose subscription ended
/// or failed while it had members.
const RESUBSCRIBE_DELAY: std::time::Duration = std::time::Duration::from_millis(100);
/// Longest wait between two attempts.
const RESUBSCRIBE_MAX: std::time::Duration = std::time::Duration::from_secs(5);

pub(crate) struct BackplaneLink {
    pub(crate) backplane: Arc<dyn Backplane>,
    pending: Mutex<HashMap<String, Vec<Waiter>>>,
    /// Rooms whose subscription ended: the manager drops it before looking.
    ended: Mutex<Vec<String>>,
    /// Consecutive failed attempts per room (for the retry delay).
    failures: Mutex<HashMap<String, u32>>,
    notify: Notify,
    started: OnceLock<()>,
    closed: AtomicBool,
}

impl BackplaneLink {
    pub(crate) fn new(backplane: Arc<dyn Backplane>) -> BackplaneLink {
        BackplaneLink {
            backplane,
            pending: Mutex::new(HashMap::new()),
            ended: Mutex::new(Vec::new()),
            failures: Mutex::new(HashMap::new()),
            notify: Notify::new(),
            started: OnceLock::new(),
            closed: AtomicBool::new(false),
        }
    }

    fn start(self: &Arc<Self>, hub: &Hub) {
        self.started.get_or_init(|| {
            tokio::spawn(manage(self.clone(), Arc::downgrade(&hub.inner)));
        });
    }

    /// Marks `room` and waits until the manager has brought its subscription
    /// in step.
    pub(crate) async fn ensure(self: &Arc<Self>, hub: &Hub, room: &str, _created: bool) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        self.pending.lock().entry(room.to_owned()).or_default().push(tx);
        self.start(hub);
        self.notify.notify_one();
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(Error::msg(ErrorKind::Backplane, e)),
            Err(_) => Err(Error::msg(ErrorKind::Backplane, "backplane manager stopped")),
        }
    }

    /// Marks `room` for a look without waiting (after a last leave).
    pub(crate) fn mark(self: &Arc<Self>, hub: &Hub, room: &str) {
        self.pending.lock().entry(room.to_owned()).or_default();
        self.start(hub);
        self.notify.notify_one();
    }

    /// Marks `room` again after a delay that grows with its failures.
    fn retry_later(self: &Arc<Self>, room: String, hub: Weak<HubInner>) {
        let n = {
            let mut f = self.failures.lock();
            let n = f.entry(room.clone()).or_insert(0);
            *n = n.saturating_add(1);
            *n
        };
        let delay = RESUBSCRIBE_DELAY.saturating_mul(1 << n.min(6).saturating_sub(1)).min(RESUBSCRIBE_MAX);
        let link = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            if hub.strong_count() == 0 || link.closed.load(Ordering::Acquire) {
                return;
            }
            link.pending.lock().entry(room).or_default();
            link.notify.notify_one();
        });
    }

    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.notify.notify_one();
    }
}

async fn manage(link: Arc<BackplaneLink>, hub: Weak<HubInner>) {
    let mut subs: HashMap<String, AbortOnDrop> = HashMap::new();
    loop {
        link.notify.notified().await;
        if link.closed.load(Ordering::Acquire) {
            return;
        }
        let work = std::mem::take(&mut *link.pending.lock());
        let Some(inner) = hub.upgrade() else { return };
        for room in std::mem::take(&mut *link.ended.lock()) {
            subs.remove(&room);
        }
        for (room, waiters) in work {
            let want = inner.rooms.contains(&room);
            let result = if want && !subs.contains_key(&room) {
                match link.backplane.subscribe(&room).await {
                    Ok(sub) => {
                        let task = tokio::spawn(forward(
                            sub,
                            room.clone(),
                            Arc::downgrade(&inner),
                            link.clone(),
                            TaskGuard::new(&inner),
                        ));
                        subs.insert(room.clone(), AbortOnDrop(task));
                        // Made again after an end or a failure while the room
                        // had members: what was published before this
                        // subscription was active went by unseen, so a
                        // recoverable room reads it from the store now (not
                        // at the next position check). The read at the end
                        // cannot cover it: it ran before the window closed.
                        if link.failures.lock().remove(&room).is_some() {
                            Hub { inner: inner.clone() }.backplane_gap(&room);
                        }
                        Ok(())
                    }
                    Err(e) => {
                        tracing::warn!(room, error = %e, "backplane subscribe failed");
                        // Members that joined earlier are still there (only
                        // the joins waiting now fail): try again later.
                        link.retry_later(room.clone(), Arc::downgrade(&inner));
                        Err(e.to_string())
                    }
                }
            } else {
                if !want {
                    subs.remove(&room);
                }
                Ok(())
            };
            for w in waiters {
                let _ = w.send(result.clone());
            }
        }
        // No strong reference is kept while idle, so the hub can drop.
        drop(inner);
    }
}

async fn forward(
    mut sub: Subscription,
    room: String,
    hub: Weak<HubInner>,
    link: Arc<BackplaneLink>,
    _guard: TaskGuard,
) {
    while let Some(item) = sub.next().await {
        let Some(inner) = hub.upgrade() else { return };
        match item {
            Ok(bytes) => match RoomMessage::decode(bytes) {
                Some(msg) => Hub { inner }.deliver_remote(&room, msg),
                None => tracing::warn!(room, "ignoring malformed backplane message"),
            },
            Err(e) => {
                tracing::warn!(room, error = %e, "backplane subscription reported a problem");
                // Messages may have been lost: a recoverable room reads what
                // it missed from the store at once.
                Hub { inner }.backplane_gap(&room);
            }
        }
    }
    tracing::warn!(room, "backplane subscription ended; subscribing again");
    crate::metrics::backplane_resubscribe();
    link.ended.lock().push(room.clone());
    link.retry_later(room.clone(), hub.clone());
    // Messages may have been lost between the end and the new subscription.
    if let Some(inner) = hub.upgrade() {
        Hub { inner }.backplane_gap(&room);
    }
}
