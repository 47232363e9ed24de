//! The backplane conformance suite against the shipped in-memory backplane.

use switchboard::MemoryBackplane;

#[tokio::test]
async fn memory_backplane_conforms() {
    let engine = MemoryBackplane::new();
    switchboard::testing::backplane(engine.clone(), engine.clone()).await;
    // Everything the suite subscribed is unsubscribed again once its hubs and
    // subscriptions are dropped.
    support_eventually(|| engine.topic_count() == 0).await;
}

async fn support_eventually(mut f: impl FnMut() -> bool) {
    for _ in 0..2000 {
        if f() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    panic!("backplane topics were not released");
}

#[tokio::test]
async fn memory_history_conforms() {
    switchboard::testing::history(switchboard::history::MemoryHistory::new()).await;
}
