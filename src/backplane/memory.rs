//! In-process backplane: links hubs that live in the same process.

use super::{Backplane, Subscription};
use crate::error::{Error, ErrorKind, Result};
use bytes::Bytes;
use futures::channel::mpsc;
use futures::future::BoxFuture;
use futures::StreamExt;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// A [`Backplane`] inside one process: clone it and give each hub a clone.
///
/// Each subscription buffers at most `capacity` messages (default 4096).
/// **Overflow policy:** when a subscriber's buffer is full, the message is
/// dropped *for that subscriber only* and the subscription yields one
/// `Err` of kind [`ErrorKind::Backplane`] saying how many were dropped before
/// its next message; publishers never wait.
#[derive(Clone, Debug)]
pub struct MemoryBackplane {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    capacity: usize,
    next_id: AtomicU64,
    // Held only to look up or change the subscriber list, never across an await.
    topics: Mutex<HashMap<String, Vec<Subscriber>>>,
}

#[derive(Debug)]
struct Subscriber {
    id: u64,
    tx: mpsc::Sender<Bytes>,
    dropped: Arc<AtomicU64>,
}

impl Default for MemoryBackplane {
    fn default() -> Self {
        MemoryBackplane::new()
    }
}

impl MemoryBackplane {
    /// A backplane whose subscriptions buffer up to 4096 messages.
    pub fn new() -> MemoryBackplane {
        MemoryBackplane::with_capacity(4096)
    }

    /// A backplane whose subscriptions buffer up to `capacity` messages.
    pub fn with_capacity(capacity: usize) -> MemoryBackplane {
        MemoryBackplane {
            inner: Arc::new(Inner {
                capacity: capacity.max(1),
                next_id: AtomicU64::new(1),
                topics: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Number of topics with at least one subscriber.
    pub fn topic_count(&self) -> usize {
        self.inner.topics.lock().len()
    }
}

/// Removes the subscriber from its topic when the subscription is dropped.
struct Unsubscribe {
    inner: Arc<Inner>,
    topic: String,
    id: u64,
}

impl Drop for Unsubscribe {
    fn drop(&mut self) {
        let mut topics = self.inner.topics.lock();
        if let Some(subs) = topics.get_mut(&self.topic) {
            subs.retain(|s| s.id != self.id);
            if subs.is_empty() {
                topics.remove(&self.topic);
            }
        }
    }
}

impl Backplane for MemoryBackplane {
    fn publish(&self, topic: &str, message: Bytes) -> BoxFuture<'static, Result<()>> {
        if let Some(subs) = self.inner.topics.lock().get_mut(topic) {
            for sub in subs.iter_mut() {
                if sub.tx.try_send(message.clone()).is_err() {
                    sub.dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        Box::pin(async { Ok(()) })
    }

    fn subscribe(&self, topic: &str) -> BoxFuture<'static, Result<Subscription>> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        // futures' channel holds `capacity + 1` messages per sender.
        let (tx, rx) = mpsc::channel(self.inner.capacity.saturating_sub(1));
        let dropped = Arc::new(AtomicU64::new(0));
        self.inner.topics.lock().entry(topic.to_owned()).or_default().push(Subscriber {
            id,
            tx,
            dropped: dropped.clone(),
        });
        let guard = Unsubscribe { inner: self.inner.clone(), topic: topic.to_owned(), id };
        let stream = futures::stream::unfold((rx, dropped, guard), |(mut rx, dropped, guard)| async move {
            let lost = dropped.swap(0, Ordering::Relaxed);
            if lost > 0 {
                let err = Error::msg(ErrorKind::Backplane, format!("subscriber lagged: {lost} messages dropped"));
                return Some((Err(err), (rx, dropped, guard)));
            }
            let msg = rx.next().await?;
            Some((Ok(msg), (rx, dropped, guard)))
        });
        Box::pin(async move { Ok(Subscription::new(stream)) })
    }
}
