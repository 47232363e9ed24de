//! The [`Backplane`] conformance suite.

use super::{cut_hook, long_names, retry, tag, Cut, Failure, Step, WAIT};
use crate::backplane::{Backplane, Subscription, MAX_TOPIC_LEN};
use crate::transport::{memory, Frame, Handshake};
use crate::Hub;
use bytes::Bytes;
use futures::StreamExt;
use std::future::Future;
use std::time::Duration;

const SUITE: &str = "backplane";

/// Runs the [`Backplane`] conformance suite without the checks that need
/// the implementer's help (a cut connection, a declared bound) and panics
/// with the [`Failure`]. `a` and `b` must be two handles on the same engine
/// (two nodes). See [`BackplaneSuite`] for the checks.
pub async fn backplane<B: Backplane + Clone>(a: B, b: B) {
    if let Err(failure) = BackplaneSuite::new(a, b).run().await {
        panic!("{failure}");
    }
}

/// The [`Backplane`] conformance suite, with the options only the
/// implementer can provide. Checks, in order (the names are
/// [`BackplaneSuite::CHECKS`]):
///
/// 1. `backplane.delivery`: a message published on `a` after a subscription
///    on `b` resolved reaches it, unchanged (binary-safe, including a
///    64 KiB message);
/// 2. `backplane.order`: 500 messages from one publisher arrive in publish
///    order, each once;
/// 3. `backplane.isolation`: topics are isolated;
/// 4. `backplane.fan_out`: two subscriptions to one topic on one handle
///    both receive (the cross-node case is `backplane.hubs`);
/// 5. `backplane.drop_one`: dropping one of them leaves the other working;
/// 6. `backplane.no_replay`: a new subscription receives nothing published
///    before it existed, also while another subscription to the topic is
///    open on its handle;
/// 7. `backplane.topics`: topics of up to [`MAX_TOPIC_LEN`] bytes of the
///    room name characters (and the hub's `$`-prefixed ones) are kept apart
///    exactly: no two collide after an engine's length cut or escaping;
/// 8. `backplane.gap_reported`: a subscriber that does not read while many
///    messages arrive gets every one of them, or an `Err` item reporting
///    the loss — never a silent gap;
/// 9. `backplane.bounded` (with
///    [`subscription_capacity`](Self::subscription_capacity)): beyond the
///    declared bound messages are dropped and reported (so a stalled
///    subscriber costs bounded memory);
/// 10. `backplane.lost_connection` (with
///     [`cut_connection`](Self::cut_connection)): after the cut, an open
///     subscription yields an `Err` or ends within [`WAIT`] (it must not
///     hide what it missed), new subscriptions and publishes work again
///     within [`WAIT`] on both handles, and a subscription that went on
///     receives again;
/// 11. `backplane.hubs`: two [`Hub`]s, one on each handle, deliver a room
///     publish across, once: every node subscribed to a topic receives its
///     messages (not one of them, as a queue group or consumer group
///     would). A join refused with 503 is retried within [`WAIT`], as a
///     client would: after the cut a backplane may still be reconnecting
///     the part that serves the room (one shard of a cluster).
#[derive(Clone)]
pub struct BackplaneSuite<B> {
    a: B,
    b: B,
    cut: Option<Cut>,
    capacity: Option<usize>,
}

impl<B> std::fmt::Debug for BackplaneSuite<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackplaneSuite")
            .field("cut_connection", &self.cut.is_some())
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

impl<B: Backplane + Clone> BackplaneSuite<B> {
    /// Every check, in the order they run.
    pub const CHECKS: &'static [&'static str] = &[
        "backplane.delivery",
        "backplane.order",
        "backplane.isolation",
        "backplane.fan_out",
        "backplane.drop_one",
        "backplane.no_replay",
        "backplane.topics",
        "backplane.gap_reported",
        "backplane.bounded",
        "backplane.lost_connection",
        "backplane.hubs",
    ];

    /// The suite on two handles `a` and `b` of the same engine.
    pub fn new(a: B, b: B) -> Self {
        BackplaneSuite { a, b, cut: None, capacity: None }
    }

    /// A hook that cuts both handles' connections to the engine, as a
    /// network failure or a restarted server would (the engine itself may
    /// lose nothing or everything; the handles must reconnect by
    /// themselves). Enables `backplane.lost_connection`.
    pub fn cut_connection<F, Fut>(mut self, cut: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.cut = Some(cut_hook(cut));
        self
    }

    /// Declares that a subscription holds at most `n` messages its reader
    /// has not taken (in every buffer of the handle together). Enables
    /// `backplane.bounded`; the suite publishes `2 n + 100` messages to a
    /// subscriber that does not read.
    pub fn subscription_capacity(mut self, n: usize) -> Self {
        self.capacity = Some(n);
        self
    }

    /// Runs the checks; the first that fails is returned.
    pub async fn run(self) -> Result<(), Failure> {
        let tag = tag("conf");
        let t = |name: &str| format!("{tag}.{name}");
        let (a, b) = (&self.a, &self.b);

        // 1. Delivery across nodes, binary-safe.
        let check = "backplane.delivery";
        let mut sub_b = b.subscribe(&t("one")).await.step(SUITE, check, "subscribe")?;
        let payloads =
            [Bytes::from_static(b"hello"), Bytes::from_static(&[0, 255, 10, 13, 0]), Bytes::from(vec![7u8; 64 * 1024])];
        for p in &payloads {
            a.publish(&t("one"), p.clone()).await.step(SUITE, check, "publish")?;
            let got = next(&mut sub_b, check, "a message published after the subscription resolved").await?;
            ensure!(got == p, check, "message changed in transit: sent {} bytes, got {} bytes", p.len(), got.len());
        }

        // 2. Order per publisher.
        let check = "backplane.order";
        // In batches of 50, so a subscription bound of 50 is enough.
        for batch in 0..10u32 {
            for i in batch * 50..(batch + 1) * 50 {
                a.publish(&t("one"), Bytes::from(i.to_be_bytes().to_vec())).await.step(SUITE, check, "publish")?;
            }
            for i in batch * 50..(batch + 1) * 50 {
                let got = next(&mut sub_b, check, "500 messages from one publisher").await?;
                ensure!(
                    got.as_ref() == i.to_be_bytes(),
                    check,
                    "expected message #{i}, got {got:?}: reordered, lost or duplicated"
                );
            }
        }

        // 3. Isolation: a message to another topic does not arrive here.
        let check = "backplane.isolation";
        let mut sub_other = b.subscribe(&t("other")).await.step(SUITE, check, "subscribe")?;
        a.publish(&t("one"), Bytes::from_static(b"for one")).await.step(SUITE, check, "publish")?;
        a.publish(&t("other"), Bytes::from_static(b"for other")).await.step(SUITE, check, "publish")?;
        let got = next(&mut sub_other, check, "the message of the other topic").await?;
        ensure!(got.as_ref() == b"for other", check, "a message of another topic arrived: {got:?}");
        let got = next(&mut sub_b, check, "the message of this topic").await?;
        ensure!(got.as_ref() == b"for one", check, "a message of another topic arrived: {got:?}");
        drop(sub_other);

        drop(sub_b);

        // 4. Two subscriptions to one topic, made before anything was
        //    published to it.
        let check = "backplane.fan_out";
        let mut fan1 = b.subscribe(&t("fan")).await.step(SUITE, check, "subscribe")?;
        let mut fan2 = b.subscribe(&t("fan")).await.step(SUITE, check, "subscribe")?;
        a.publish(&t("fan"), Bytes::from_static(b"both")).await.step(SUITE, check, "publish")?;
        let got = next(&mut fan1, check, "the first subscription").await?;
        ensure!(got.as_ref() == b"both", check, "first subscription got {got:?}");
        let got = next(&mut fan2, check, "the second subscription").await?;
        ensure!(got.as_ref() == b"both", check, "second subscription got {got:?}");

        // 5. Dropping one subscription keeps the other.
        let check = "backplane.drop_one";
        drop(fan1);
        a.publish(&t("fan"), Bytes::from_static(b"still")).await.step(SUITE, check, "publish")?;
        let got = next(&mut fan2, check, "the subscription left after dropping its sibling").await?;
        ensure!(got.as_ref() == b"still", check, "got {got:?}");

        // 6. No replay: `fan2` stays open (an engine that shares one upstream
        //    subscription per topic is tempted to hand out what it has).
        let check = "backplane.no_replay";
        for m in [&b"old 1"[..], b"old 2", b"old 3"] {
            a.publish(&t("fan"), Bytes::from_static(m)).await.step(SUITE, check, "publish")?;
            let got = next(&mut fan2, check, "an old message on the open subscription").await?;
            ensure!(got.as_ref() == m, check, "open subscription got {got:?}");
        }
        let mut fresh = b.subscribe(&t("fan")).await.step(SUITE, check, "subscribe")?;
        a.publish(&t("fan"), Bytes::from_static(b"fresh")).await.step(SUITE, check, "publish")?;
        let got = next(&mut fresh, check, "the first message after subscribing").await?;
        ensure!(got.as_ref() == b"fresh", check, "a new subscription received {got:?}, published before it existed");
        drop((fresh, fan2));
        // The same across a drop and a resubscription.
        a.publish(&t("fan"), Bytes::from_static(b"nobody")).await.step(SUITE, check, "publish")?;
        let mut again = b.subscribe(&t("fan")).await.step(SUITE, check, "subscribe")?;
        a.publish(&t("fan"), Bytes::from_static(b"again")).await.step(SUITE, check, "publish")?;
        let got = next(&mut again, check, "the first message after resubscribing").await?;
        ensure!(got.as_ref() == b"again", check, "a new subscription received {got:?}, published before it existed");
        drop(again);

        // 7. Long topics, every character, the hub's own `$` topics.
        let check = "backplane.topics";
        let mut topics = long_names(&format!("{tag}:"), MAX_TOPIC_LEN);
        topics.extend(long_names(&format!("$presence:{tag}:"), MAX_TOPIC_LEN));
        let mut subs = Vec::new();
        for topic in &topics {
            subs.push(b.subscribe(topic).await.step(
                SUITE,
                check,
                &format!("subscribe to a {}-byte topic", topic.len()),
            )?);
        }
        for topic in &topics {
            a.publish(topic, Bytes::from(topic.clone())).await.step(SUITE, check, "publish")?;
        }
        for (topic, sub) in topics.iter().zip(&mut subs) {
            let got = next(sub, check, &format!("the message of topic {topic:?}")).await?;
            ensure!(
                got.as_ref() == topic.as_bytes(),
                check,
                "topic {topic:?} received the message of {:?}: topics collide",
                String::from_utf8_lossy(&got)
            );
        }
        drop(subs);

        // 8, 9. A subscriber that does not read: no silent gap; bounded.
        self.flood(&t("flood")).await?;

        // 10. A lost connection.
        if let Some(cut) = &self.cut {
            self.lost_connection(cut, &t("cut")).await?;
        }

        // 11. Two hubs, one per handle.
        hubs_deliver_across(a.clone(), b.clone(), &tag).await
    }

    async fn flood(&self, topic: &str) -> Result<(), Failure> {
        let check = "backplane.gap_reported";
        let count = self.capacity.map_or(10_000, |n| 2 * n + 100) as u32;
        let mut sub = self.b.subscribe(topic).await.step(SUITE, check, "subscribe")?;
        for i in 0..count {
            self.a.publish(topic, Bytes::from(i.to_be_bytes().to_vec())).await.step(SUITE, check, "publish")?;
        }
        // Read what was kept, until nothing more comes; then a marker.
        let (mut got, mut errors, mut last) = (0u32, 0u32, None::<u32>);
        let mut silent = None;
        // The marker goes again after every quiet spell (one published while
        // the buffer was still full may be dropped), for at most WAIT.
        let quiet = Duration::from_millis(300);
        let mut quiet_spells = 0u32;
        loop {
            match tokio::time::timeout(quiet, sub.next()).await {
                Ok(Some(Ok(m))) if m.as_ref() == b"marker" => break,
                Ok(Some(Ok(m))) => {
                    let Ok(n) = <[u8; 4]>::try_from(m.as_ref()).map(u32::from_be_bytes) else {
                        return Err(Failure::new(SUITE, check, format!("a stray message {m:?}")));
                    };
                    let expected = last.map_or(0, |l| l + 1);
                    ensure!(n >= expected, check, "message #{n} after #{expected}: reordered or duplicated");
                    if n > expected && errors == 0 && silent.is_none() {
                        silent = Some((expected, n));
                    }
                    last = Some(n);
                    got += 1;
                }
                Ok(Some(Err(_))) => errors += 1,
                Ok(None) => return Err(Failure::new(SUITE, check, "the subscription ended")),
                Err(_) if quiet * quiet_spells >= WAIT => {
                    return Err(Failure::new(SUITE, check, format!("no marker arrived within {WAIT:?} of the flood")))
                }
                Err(_) => {
                    quiet_spells += 1;
                    self.a.publish(topic, Bytes::from_static(b"marker")).await.step(SUITE, check, "publish")?;
                    continue;
                }
            }
            quiet_spells = 0;
        }
        let lost = count - got;
        ensure!(
            lost == 0 || errors > 0,
            check,
            "{lost} of {count} messages were lost without an Err item reporting it{}",
            silent.map(|(a, b)| format!(" (first gap: #{a}..#{b})")).unwrap_or_default()
        );
        if let Some(capacity) = self.capacity {
            ensure!(
                lost > 0 && errors > 0,
                "backplane.bounded",
                "a subscriber that did not read received all {count} messages although the declared bound is {capacity}: its buffer is not bounded"
            );
        }
        Ok(())
    }

    async fn lost_connection(&self, cut: &Cut, topic: &str) -> Result<(), Failure> {
        let check = "backplane.lost_connection";
        let (a, b) = (&self.a, &self.b);
        let mut sub = b.subscribe(topic).await.step(SUITE, check, "subscribe")?;
        a.publish(topic, Bytes::from_static(b"before")).await.step(SUITE, check, "publish")?;
        let got = next(&mut sub, check, "the message before the cut").await?;
        ensure!(got.as_ref() == b"before", check, "got {got:?}");
        cut().await;
        let goes_on = match tokio::time::timeout(WAIT, sub.next()).await {
            Ok(Some(Err(_))) => true,
            Ok(None) => false,
            Ok(Some(Ok(m))) => {
                return Err(Failure::new(SUITE, check, format!("after the cut the subscription yielded {m:?}, published before it, instead of an error or its end")))
            }
            Err(_) => {
                return Err(Failure::new(
                    SUITE,
                    check,
                    format!("within {WAIT:?} of the cut the subscription neither yielded an error nor ended: what it missed would go unnoticed"),
                ))
            }
        };
        let mut fresh = retry(SUITE, check, "subscribe", || b.subscribe(topic)).await?;
        publish_until_received(a, topic, &mut fresh, check, "a new subscription after the cut").await?;
        // Both handles were cut: the other one must subscribe again too
        // (a node whose subscriptions stay broken refuses every join). On
        // a topic of its own, so this is the only subscriber.
        let topic_a = format!("{topic}.again");
        let mut fresh_a = retry(SUITE, check, "subscribe on the other handle", || a.subscribe(&topic_a)).await?;
        publish_until_received(
            b,
            &topic_a,
            &mut fresh_a,
            check,
            "a new subscription on the other handle after the cut",
        )
        .await?;
        if goes_on {
            publish_until_received(a, topic, &mut sub, check, "the subscription that went on after its error").await?;
        }
        Ok(())
    }
}

/// Publishes `after-N` every 200 ms until `sub` receives one (errors in
/// between are skipped), within [`WAIT`].
async fn publish_until_received<B: Backplane>(
    a: &B,
    topic: &str,
    sub: &mut Subscription,
    check: &'static str,
    what: &str,
) -> Result<(), Failure> {
    let deadline = tokio::time::Instant::now() + WAIT;
    for i in 0u32.. {
        let _ = tokio::time::timeout(WAIT, a.publish(topic, Bytes::from(format!("after-{i}")))).await;
        let round = tokio::time::Instant::now() + Duration::from_millis(200);
        loop {
            match tokio::time::timeout_at(round, sub.next()).await {
                Ok(Some(Ok(m))) if m.starts_with(b"after-") => return Ok(()),
                Ok(Some(Ok(m))) => return Err(Failure::new(SUITE, check, format!("{what} received {m:?}"))),
                Ok(Some(Err(_))) => continue,
                Ok(None) => return Err(Failure::new(SUITE, check, format!("{what} ended"))),
                Err(_) => break,
            }
        }
        if tokio::time::Instant::now() >= deadline {
            break;
        }
    }
    Err(Failure::new(SUITE, check, format!("{what} received nothing within {WAIT:?} of publishing again")))
}

async fn next(sub: &mut Subscription, check: &'static str, what: &str) -> Result<Bytes, Failure> {
    match tokio::time::timeout(WAIT, sub.next()).await {
        Ok(Some(Ok(b))) => Ok(b),
        Ok(Some(Err(e))) => Err(Failure::new(SUITE, check, format!("{what}: the subscription yielded an error: {e}"))),
        Ok(None) => Err(Failure::new(SUITE, check, format!("{what}: the subscription ended"))),
        Err(_) => Err(Failure::new(SUITE, check, format!("{what}: no message within {WAIT:?}"))),
    }
}

async fn hubs_deliver_across<B: Backplane + Clone>(a: B, b: B, tag: &str) -> Result<(), Failure> {
    let check = "backplane.hubs";
    let hub_a = Hub::builder().backplane(a).build();
    let hub_b = Hub::builder().backplane(b).build();
    let room = format!("{tag}-room");
    let mut peer_a = join(&hub_a, &room).await?;
    let mut peer_b = join(&hub_b, &room).await?;
    hub_a.publish(&room, "ping", &1).await.step(SUITE, check, "a hub's publish")?;
    for (peer, name) in [(&mut peer_a, "publishing hub"), (&mut peer_b, "other hub")] {
        let v = recv_event(peer, name).await?;
        ensure!(v["event"] == "ping", check, "the {name}'s member got the wrong event: {v}");
    }
    // Exactly once: a second publish is the next event on both.
    hub_b.publish(&room, "pong", &2).await.step(SUITE, check, "a hub's publish")?;
    for (peer, name) in [(&mut peer_a, "other hub"), (&mut peer_b, "publishing hub")] {
        let v = recv_event(peer, name).await?;
        ensure!(v["event"] == "pong", check, "the {name}'s member got a duplicate or stray event: {v}");
    }
    Ok(())
}

async fn join(hub: &Hub, room: &str) -> Result<memory::MemoryPeer, Failure> {
    let (transport, mut peer) = memory::pair(64);
    let hub2 = hub.clone();
    tokio::spawn(async move {
        let _ = hub2.connect(transport, Handshake::new()).await;
    });
    // A 503 ("temporarily unavailable, retry") is retried as a client
    // would: after a cut (the check before this one) a backplane may
    // still be reconnecting the part that serves this room, for instance
    // one shard of a cluster. Anything else, or a 503 past WAIT, fails.
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut r = 0u64;
    loop {
        r += 1;
        let join = serde_json::json!({"type": "join", "ref": r, "room": room}).to_string();
        peer.send(Frame::Text(join.into()))
            .await
            .map_err(|e| Failure::new(SUITE, "backplane.hubs", format!("sending a join failed: {e}")))?;
        loop {
            let v = recv_json(&mut peer, "join").await?;
            if v["ref"] != r {
                continue;
            }
            if v["type"] == "reply" {
                return Ok(peer);
            }
            let retry = v["type"] == "error" && v["code"] == 503 && tokio::time::Instant::now() < deadline;
            ensure!(retry, "backplane.hubs", "a join failed: {v}");
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn recv_json(peer: &mut memory::MemoryPeer, what: &str) -> Result<serde_json::Value, Failure> {
    loop {
        match tokio::time::timeout(WAIT, peer.recv()).await {
            Ok(Some(Frame::Text(t))) => {
                return serde_json::from_slice(&t)
                    .map_err(|e| Failure::new(SUITE, "backplane.hubs", format!("{what}: invalid JSON: {e}")))
            }
            Ok(Some(_)) => continue,
            Ok(None) => return Err(Failure::new(SUITE, "backplane.hubs", format!("{what}: connection closed"))),
            Err(_) => return Err(Failure::new(SUITE, "backplane.hubs", format!("{what}: nothing within {WAIT:?}"))),
        }
    }
}

async fn recv_event(peer: &mut memory::MemoryPeer, what: &str) -> Result<serde_json::Value, Failure> {
    loop {
        let v = recv_json(peer, what).await?;
        if v["type"] == "event" {
            return Ok(v);
        }
    }
}
