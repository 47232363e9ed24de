//! Smoke test: one join, one call, one broadcast over a real socket.
mod support;
use serde_json::json;
use support::*;
use switchboard::{Call, CallError, Hub};

#[tokio::test]
async fn join_call_publish() {
    let hub = Hub::builder()
        .on("say", |call: Call, text: String| async move {
            call.broadcast("said", &json!({"text": text})).await.map_err(|e| CallError::internal(e.to_string()))?;
            Ok(json!({"ok": true}))
        })
        .build();
    let addr = serve(&hub).await;
    let mut a = connect(addr).await;
    let mut b = connect(addr).await;
    a.join_ok("lobby").await;
    b.join_ok("lobby").await;
    let r = a.call_in("lobby", "say", json!("hi")).await;
    assert_eq!(r["data"], json!({"ok": true}), "{r}");
    let e = b.event().await;
    assert_eq!(e, json!({"type": "event", "room": "lobby", "event": "said", "data": {"text": "hi"}}));
    let e = a.event().await;
    assert_eq!(e["data"]["text"], "hi");
    assert_eq!(hub.stats().connections, 2);
    drop(a);
    drop(b);
    eventually("all gone", || hub.stats() == Default::default()).await;
}
