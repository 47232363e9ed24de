//! The conformance suites against the shipped in-memory implementations.

use switchboard::history::MemoryHistory;
use switchboard::testing::{BackplaneSuite, HistorySuite, PresenceStoreSuite};
use switchboard::{MemoryBackplane, MemoryPresence};

#[tokio::test]
async fn memory_backplane_conforms() {
    let engine = MemoryBackplane::with_capacity(256);
    BackplaneSuite::new(engine.clone(), engine.clone()).subscription_capacity(256).run().await.unwrap();
    // Everything the suite subscribed is unsubscribed again once its hubs and
    // subscriptions are dropped.
    eventually(|| engine.topic_count() == 0).await;
}

#[tokio::test]
async fn memory_backplane_with_the_default_capacity_conforms() {
    let engine = MemoryBackplane::new();
    switchboard::testing::backplane(engine.clone(), engine).await;
}

async fn eventually(mut f: impl FnMut() -> bool) {
    for _ in 0..2000 {
        if f() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    panic!("backplane topics were not released");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_history_conforms() {
    let store = MemoryHistory::new();
    HistorySuite::new(store.clone(), store).run().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn memory_presence_conforms() {
    let store = MemoryPresence::new();
    PresenceStoreSuite::new(store.clone(), store.clone()).run().await.unwrap();
    assert!(store.is_empty(), "the suite cleans up after itself");
}
