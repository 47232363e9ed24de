//! What the room-log tests of each transport share (`tests/ws.rs`,
//! `tests/sse.rs`): a burst that mixes what a member reads from a room's
//! log with what reaches it through its queue, and a publisher paced by a
//! member that reads while another one stalls.
#![allow(dead_code)]

use futures::{Stream, StreamExt};
use serde_json::json;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use switchboard::{ConnectionId, Hub};

/// Operations in [`mixed_burst`].
const BURST: u64 = 3000;

/// One burst of [`BURST`] operations: publishes to `a` (the room whose log
/// `id` reads), `send`s to `id`, publishes to `b` (queued as before), and
/// publishes to `a` that leave `id` out. Returns the values `id` gets, in
/// the order it must get them.
pub async fn mixed_burst(hub: &Hub, id: ConnectionId) -> Vec<u64> {
    let mut expected = Vec::new();
    for i in 0..BURST {
        match i % 5 {
            0 | 1 => {
                hub.publish("a", "ev", &i).await.unwrap();
                expected.push(i);
            }
            2 => {
                hub.send(id, "direct", &i).unwrap();
                expected.push(i);
            }
            3 => {
                hub.publish("b", "ev", &i).await.unwrap();
                expected.push(i);
            }
            _ => {
                hub.publish_except("a", "ev", &i, id).await.unwrap();
            }
        }
        if i % 64 == 0 {
            tokio::task::yield_now().await;
        }
    }
    expected
}

/// What a member of `a` reading all along gets from [`mixed_burst`]:
/// every event of `a`, the ones that left `id` out too.
pub fn events_of_a() -> Vec<u64> {
    (0..BURST).filter(|i| matches!(i % 5, 0 | 1 | 4)).collect()
}

/// The first place `got` and `expected` differ, with what `got` has from
/// there (for the assertion's message).
pub fn first_difference(got: &[u64], expected: &[u64]) -> Option<(usize, Vec<u64>)> {
    let at = got.iter().zip(expected).position(|(g, e)| g != e)?;
    Some((at, got[at..].iter().take(8).copied().collect()))
}

/// Publishes `total` events `{"i": i, "pad": 1,000 bytes}` to `room`
/// while another member reads them (`reader`: the `i` of each event it
/// gets), never more than 32 ahead of it, so that only a member that
/// stopped reading (`slow`) falls behind. Checks that the reader got every
/// event in order, and that what was queued for `slow` (sampled every 32
/// events) stayed within `bound` and what is appended between two trims
/// of the log (16 KiB).
pub async fn publish_beside_a_reader(
    hub: &Hub,
    room: &str,
    total: u64,
    slow: ConnectionId,
    bound: usize,
    reader: impl Stream<Item = u64> + Send + 'static,
) {
    let seen = Arc::new(AtomicU64::new(0));
    let reader = tokio::spawn({
        let seen = seen.clone();
        async move {
            let mut reader = std::pin::pin!(reader);
            for i in 0..total {
                let got = reader.next().await.expect("the reading member's stream ended");
                assert_eq!(got, i, "the reading member got every event in order");
                seen.store(i + 1, Ordering::Release);
            }
        }
    });
    let pad = "p".repeat(1000);
    let mut most_queued = 0;
    for i in 0..total {
        while i >= seen.load(Ordering::Acquire) + 32 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        hub.publish(room, "ev", &json!({"i": i, "pad": pad})).await.unwrap();
        if i % 32 == 0 {
            most_queued = most_queued.max(hub.connection(slow).unwrap().queued_bytes());
        }
    }
    reader.await.unwrap();
    assert!(most_queued <= bound + 17 * 1024, "queued {most_queued} bytes over a bound of {bound}");
    println!("at most {most_queued} bytes queued for the stalled member");
}

/// What a member that stalled behind a room log's bound got, as it reads
/// at last: events (in order) and `lagged` counts.
#[derive(Debug, Default)]
pub struct Tally {
    pub received: u64,
    pub dropped: u64,
    pub last: Option<u64>,
}

impl Tally {
    /// An event `i`: after every earlier one.
    pub fn event(&mut self, i: u64) {
        assert!(self.last.is_none_or(|l| i > l), "{i} after {:?}", self.last);
        self.last = Some(i);
        self.received += 1;
    }

    /// A `lagged` notice of `n`.
    pub fn lagged(&mut self, n: u64) {
        self.dropped += n;
    }

    /// Whether every one of `total` events was received or counted.
    pub fn done(&self, total: u64) -> bool {
        self.received + self.dropped >= total
    }

    /// Nothing lost uncounted, the bound applied, the newest event came,
    /// and the hub counted the same drops for `id`.
    pub fn check(&self, total: u64, hub: &Hub, id: ConnectionId) {
        assert_eq!(self.received + self.dropped, total, "every event delivered or counted as dropped");
        assert!(self.dropped > 0, "the bound never applied");
        assert_eq!(self.last, Some(total - 1), "the newest event arrives");
        assert_eq!(hub.connection(id).unwrap().dropped_messages(), self.dropped, "counted where the outbox counts");
    }
}
