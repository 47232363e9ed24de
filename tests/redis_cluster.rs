//! The Redis integrations on a private 3-master Redis Cluster (started per
//! test on free ports by `support::redis::RedisCluster`): the conformance
//! suites of the backplane (sharded pub/sub), history, presence and synced
//! rooms' snapshot store; two hubs
//! on real WebSockets sharing rooms, presence and history; rooms spread over
//! every master; a killed master (its rooms fail while it is down, the
//! others keep working; after its restart its subscriptions come back with a
//! gap, and recoverable rooms get a new epoch); a failover to a replica and
//! a slot migration (the subscriptions move to the new owner, with a gap).

mod support;

use bytes::Bytes;
use serde_json::json;
use std::time::Duration;
use support::redis::{next, next_ok, until, RedisCluster};
use support::*;
use switchboard::history::{Append, HistoryConfig, HistoryStore, Retention};
use switchboard::presence::{PresenceConfig, PresenceQuery, PresenceRecord, PresenceStore, StoreChange};
use switchboard::redis::{RedisBackplane, RedisConfig, RedisHistory, RedisPresence, RedisSnapshots};
use switchboard::testing::{BackplaneSuite, HistorySuite, PresenceStoreSuite, SnapshotSuite};
use switchboard::{backplane::Backplane, Hub};

/// Settings for tests: fast reconnects, a probe that does not fire under a
/// loaded machine by accident.
fn config(cluster: &RedisCluster) -> RedisConfig {
    support::redis::quick(RedisConfig::cluster(cluster.urls()))
}

async fn backplane(cluster: &RedisCluster) -> RedisBackplane {
    RedisBackplane::connect(config(cluster)).await.expect("connect to the test cluster")
}

/// Shard channels of ours (not the probes) subscribed on each node.
async fn channels_per_node(cluster: &RedisCluster, pattern: &str) -> Vec<usize> {
    let mut counts = Vec::new();
    for i in 0..cluster.nodes.len() {
        counts.push(cluster.shard_channels(i, pattern).await.len());
    }
    counts
}

/// Keys matching `pattern` on each node.
async fn keys_per_node(cluster: &RedisCluster, pattern: &str) -> Vec<usize> {
    let mut counts = Vec::new();
    for i in 0..cluster.nodes.len() {
        counts.push(cluster.keys(i, pattern).await);
    }
    counts
}

/// `counts` (per master) add up to `total`, and each master has at least a
/// fifth of it.
fn fair_share(what: &str, counts: Vec<usize>, total: usize) {
    assert_eq!(counts.iter().sum::<usize>(), total, "{what}: {counts:?}");
    for (i, n) in counts.iter().enumerate() {
        assert!(n * 5 >= total, "master {i} has {n} of {total} {what}: {counts:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_backplane_conforms_with_sharded_pubsub() {
    let cluster = RedisCluster::start().await;
    // A small declared bound, so the suite checks overflow is reported.
    let small = || RedisBackplane::connect(config(&cluster).subscription_capacity(256));
    let (a, b) = (small().await.unwrap(), small().await.unwrap());
    assert_eq!(a.stats().shards, 3, "one pub/sub connection per master");
    assert_eq!(a.channel("lobby"), "switchboard:{lobby}", "the topic is the hash tag");
    let ports = cluster.nodes.iter().map(|n| n.port()).collect::<Vec<_>>();
    BackplaneSuite::new(a.clone(), b.clone())
        .subscription_capacity(256)
        .cut_connection(move || support::redis::cut_clients(ports.clone()))
        .run()
        .await
        .unwrap();
    // Everything the suite subscribed is unsubscribed again, here and on
    // every node: only the probes' shard channels are left (one per master
    // and handle), and no classic channel was ever used.
    until("local channels released", || async { a.stats().channels == 0 && b.stats().channels == 0 }).await;
    // Each master holds exactly the two handles' probe channels for it.
    until("server channels released", || async {
        for i in 0..3 {
            let all = cluster.shard_channels(i, "switchboard:*").await;
            if all.len() != 2 || all.iter().any(|c| !c.starts_with("switchboard:$probe:")) {
                return false;
            }
        }
        true
    })
    .await;
    for node in &cluster.nodes {
        assert_eq!(
            node.cmd(&["PUBSUB", "CHANNELS", "*"]).await,
            support::redis::Reply::Array(vec![]),
            "classic pub/sub is not used on a cluster"
        );
    }
    assert_eq!(a.stats().subscriptions + b.stats().subscriptions, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rooms_spread_over_every_master() {
    let cluster = RedisCluster::start().await;
    let bp = backplane(&cluster).await;
    let history = RedisHistory::connect(config(&cluster)).await.unwrap();
    const ROOMS: usize = 300;
    let mut subs = Vec::new();
    for i in 0..ROOMS {
        subs.push(bp.subscribe(&format!("room-{i}")).await.expect("subscribe"));
        history.append(&format!("room-{i}"), append("hello")).await.expect("append");
    }
    assert_eq!(bp.stats().channels, ROOMS);
    // Each room's channel is on the master of its slot, and so are its
    // history keys.
    for i in [0, 77, 299] {
        let room = format!("room-{i}");
        let slot = cluster.keyslot(&bp.channel(&room)).await;
        assert_eq!(slot, cluster.keyslot(&format!("switchboard:history:{{{room}}}:stream")).await);
        let owner = cluster.owner(slot).await;
        assert_eq!(cluster.shard_numsub(owner, &bp.channel(&room)).await, 1, "{room} on its slot's master");
    }
    fair_share("room channels", channels_per_node(&cluster, "switchboard:{room-*").await, ROOMS);
    fair_share("history streams", keys_per_node(&cluster, "switchboard:history:{room-*}:stream").await, ROOMS);
    // Presence: each room's keys on its slot's master, spread the same way.
    let presence = RedisPresence::connect(config(&cluster)).await.unwrap();
    let changes = (0..ROOMS)
        .map(|i| StoreChange::Put(PresenceRecord::new(format!("room-{i}"), format!("user-{}", i % 7), 1, i as u64)))
        .collect();
    presence.write(changes, Duration::from_secs(60)).await.expect("presence write");
    fair_share("presence hashes", keys_per_node(&cluster, "switchboard:presence:data:{room-*}").await, ROOMS);
    let user = presence.list(PresenceQuery::Key("user-3".into())).await.unwrap();
    assert_eq!(user.len(), (0..ROOMS).filter(|i| i % 7 == 3).count(), "a key is listed across rooms and shards");
    drop(subs);
    until("all channels released", || async { channels_per_node(&cluster, "switchboard:{room-*").await == [0, 0, 0] })
        .await;
}

fn append(event: &str) -> Append {
    Append {
        event: event.to_owned(),
        data: Some(switchboard::protocol::Payload::encode(switchboard::protocol::Format::Json, &event).unwrap()),
        idempotency_key: None,
        retention: Retention::default(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_history_conforms() {
    let cluster = RedisCluster::start().await;
    let a = RedisHistory::connect(config(&cluster)).await.expect("connect");
    let b = RedisHistory::connect(config(&cluster)).await.expect("connect");
    let ports = cluster.nodes.iter().map(|n| n.port()).collect::<Vec<_>>();
    HistorySuite::new(a, b).cut_connection(move || support::redis::cut_clients(ports.clone())).run().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_presence_conforms() {
    let cluster = RedisCluster::start().await;
    let a = RedisPresence::connect(config(&cluster)).await.expect("connect");
    let b = RedisPresence::connect(config(&cluster)).await.expect("connect");
    let ports = cluster.nodes.iter().map(|n| n.port()).collect::<Vec<_>>();
    PresenceStoreSuite::new(a, b)
        .cut_connection(move || support::redis::cut_clients(ports.clone()))
        .run()
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_snapshots_conform() {
    let cluster = RedisCluster::start().await;
    let a = RedisSnapshots::connect(config(&cluster)).await.expect("connect").retain(4);
    let b = RedisSnapshots::connect(config(&cluster)).await.expect("connect").retain(4);
    let ports = cluster.nodes.iter().map(|n| n.port()).collect::<Vec<_>>();
    SnapshotSuite::new(a, b).cut_connection(move || support::redis::cut_clients(ports.clone())).run().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hubs_on_the_cluster_share_rooms_and_presence_over_websockets() {
    let cluster = RedisCluster::start().await;
    let mut hubs = Vec::new();
    for _ in 0..2 {
        hubs.push(
            Hub::builder()
                .authenticate(user_from_query)
                .presence(PresenceConfig::default().ttl(Duration::from_secs(5)))
                .backplane(backplane(&cluster).await)
                .presence_store(RedisPresence::connect(config(&cluster)).await.unwrap())
                .build(),
        );
    }
    let (addr1, addr2) = (serve(&hubs[0]).await, serve(&hubs[1]).await);
    let mut alice = support::connect_path(addr1, "/?user=alice").await;
    let mut bob = support::connect_path(addr2, "/?user=bob").await;
    // Rooms on every master, so delivery crosses each shard.
    let rooms = ["chat-a", "chat-b", "chat-c", "chat-d", "chat-e", "chat-f"];
    let mut owners = Vec::new();
    for room in rooms {
        owners.push(cluster.owner(cluster.keyslot(&format!("switchboard:{{{room}}}")).await).await);
        alice.join_ok(room).await;
        bob.join_ok(room).await;
    }
    owners.sort_unstable();
    owners.dedup();
    assert_eq!(owners, [0, 1, 2], "the rooms cover every master");
    for (n, room) in rooms.iter().enumerate() {
        hubs[n % 2].publish(room, "news", &json!(n)).await.expect("publish");
        for c in [&mut alice, &mut bob] {
            let e = c.event().await;
            assert_eq!((e["room"].as_str(), e["data"].as_u64()), (Some(*room), Some(n as u64)), "{e}");
        }
    }
    for hub in &hubs {
        until("both users present on each node", || async { keys_of(hub, "chat-a").await == ["alice", "bob"] }).await;
        assert!(hub.is_user_online("bob").await.unwrap() && hub.is_user_online("alice").await.unwrap());
    }
    drop(bob);
    until("bob gone on node 1", || async { keys_of(&hubs[0], "chat-c").await == ["alice"] }).await;
    assert!(!hubs[0].is_user_online("bob").await.unwrap());
}

async fn recoverable_node(cluster: &RedisCluster, history: HistoryConfig) -> Hub {
    support::redis::recoverable_node(config(cluster), history).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hubs_on_the_cluster_share_one_stream_and_a_client_recovers_on_the_other_node() {
    let cluster = RedisCluster::start().await;
    let all = HistoryConfig::all_rooms;
    let (hub1, hub2) = (recoverable_node(&cluster, all()).await, recoverable_node(&cluster, all()).await);
    support::two_nodes_share_one_stream(&hub1, &hub2, 100).await;
}

/// A topic whose channel's slot is served by master `node`.
async fn topic_on(cluster: &RedisCluster, bp: &RedisBackplane, node: usize, tag: &str) -> String {
    for i in 0.. {
        let topic = format!("{tag}-{i}");
        if cluster.owner(cluster.keyslot(&bp.channel(&topic)).await).await == node {
            return topic;
        }
    }
    unreachable!()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_master_fails_its_rooms_only_and_its_subscriptions_come_back_with_a_gap() {
    let mut cluster = RedisCluster::start().await;
    let (a, b) = (backplane(&cluster).await, backplane(&cluster).await);
    let history = RedisHistory::connect(config(&cluster)).await.unwrap();
    let down = topic_on(&cluster, &a, 0, "down").await;
    let up = topic_on(&cluster, &a, 1, "up").await;
    let mut sub_down = b.subscribe(&down).await.expect("subscribe");
    let mut sub_up = b.subscribe(&up).await.expect("subscribe");
    a.publish(&down, Bytes::from_static(b"one")).await.unwrap();
    assert_eq!(next_ok(&mut sub_down, "before the kill").await.as_ref(), b"one");
    let before = history.append(&down, append("before")).await.unwrap().position;

    cluster.kill(0);
    // Publishes to the dead master's rooms fail; the others work.
    let err = a.publish(&down, Bytes::from_static(b"lost")).await.expect_err("its master is down");
    assert!(err.is_backplane(), "{err}");
    let err = history.append(&down, append("lost")).await.expect_err("its master is down");
    assert_eq!(err.kind(), switchboard::ErrorKind::History, "{err}");
    a.publish(&up, Bytes::from_static(b"still")).await.expect("another master's room works");
    assert_eq!(next_ok(&mut sub_up, "another shard during the outage").await.as_ref(), b"still");
    history.append(&up, append("still")).await.expect("another master's history works");
    until("the shard to notice", || async { !b.stats().pubsub_connected }).await;

    cluster.restart(0).await;
    let gap = next(&mut sub_down, "after the restart").await.expect_err("the outage must be reported as a gap");
    assert!(gap.is_backplane() && gap.to_string().contains("reconnected"), "{gap}");
    until("both shards back", || async { a.stats().pubsub_connected && b.stats().pubsub_connected }).await;
    until("a publish to succeed", || async { a.publish(&down, Bytes::from_static(b"after")).await.is_ok() }).await;
    assert_eq!(next_ok(&mut sub_down, "after the restart").await.as_ref(), b"after");
    assert_eq!(cluster.shard_numsub(0, &a.channel(&down)).await, 1, "subscribed again on the restarted master");
    // The other shard's subscription saw no gap.
    a.publish(&up, Bytes::from_static(b"two")).await.unwrap();
    assert_eq!(next_ok(&mut sub_up, "another shard after").await.as_ref(), b"two");
    // The restarted master lost its data: the room starts a new epoch.
    let fresh = history.append(&down, append("after")).await.unwrap().position;
    assert_ne!(fresh.epoch, before.epoch, "history was lost with the master: the epoch must change");
    assert_eq!(fresh.offset, 1);
    let kept = history.append(&up, append("kept")).await.unwrap().position;
    assert_eq!(kept.offset, 2, "the other master kept its room");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_restarted_without_data_tells_the_members_of_its_rooms_to_resync() {
    let mut cluster = RedisCluster::start().await;
    // The hubs' fill on the backplane's reconnect gap first reads while the
    // restarted master still answers CLUSTERDOWN; it backs off and reads
    // again until the master answers. The position check is put out of
    // reach, so the notice must come from that fill.
    let history = || HistoryConfig::all_rooms().position_check(Duration::from_secs(600));
    let (hub1, hub2) = (recoverable_node(&cluster, history()).await, recoverable_node(&cluster, history()).await);
    let room = topic_on(&cluster, &backplane(&cluster).await, 0, "resync").await;
    let mut master = support::redis::Master { cluster: &mut cluster, node: 0 };
    support::redis::resync_after_redis_loses_the_room([&hub1, &hub2], &room, &mut master).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_to_a_replica_moves_the_subscriptions_with_a_gap() {
    let mut cluster = RedisCluster::start_with_replicas(1).await;
    let (a, b) = (backplane(&cluster).await, backplane(&cluster).await);
    assert_eq!(b.stats().shards, 3, "replicas are not shards");
    let master = cluster.owner(0).await;
    let topic = topic_on(&cluster, &a, master, "failing").await;
    let mut sub = b.subscribe(&topic).await.expect("subscribe");
    a.publish(&topic, Bytes::from_static(b"one")).await.unwrap();
    assert_eq!(next_ok(&mut sub, "before the failover").await.as_ref(), b"one");

    // The master dies; after the node timeout its replica is promoted.
    let slot = cluster.keyslot(&a.channel(&topic)).await;
    cluster.kill(master);
    until("the replica to take over", || async { cluster.owner(slot).await != master }).await;
    let promoted = cluster.owner(slot).await;
    let gap = next(&mut sub, "after the failover").await.expect_err("the failover must be reported as a gap");
    assert!(gap.is_backplane() && gap.to_string().contains("reconnected"), "{gap}");
    until("the channel on the promoted replica", || async {
        cluster.shard_numsub(promoted, &a.channel(&topic)).await == 1
    })
    .await;
    assert!(b.stats().topology_changes >= 1, "{:?}", b.stats());
    until("a publish to succeed", || async { a.publish(&topic, Bytes::from_static(b"two")).await.is_ok() }).await;
    assert_eq!(next_ok(&mut sub, "after the failover").await.as_ref(), b"two");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_shard_connection_is_replaced_and_only_its_subscriptions_see_a_gap() {
    let cluster = RedisCluster::start().await;
    let (a, b) = (backplane(&cluster).await, backplane(&cluster).await);
    let hit = topic_on(&cluster, &a, 0, "hit").await;
    let spared = topic_on(&cluster, &a, 1, "spared").await;
    let mut sub_hit = b.subscribe(&hit).await.expect("subscribe");
    let mut sub_spared = b.subscribe(&spared).await.expect("subscribe");

    // Node 0's pub/sub connections (one per handle) die; the command
    // connections are not pub/sub clients and stay.
    let killed = cluster.nodes[0].cmd(&["CLIENT", "KILL", "TYPE", "pubsub"]).await;
    assert_eq!(killed, support::redis::Reply::Int(2), "each handle's connection to master 0");
    let gap = next(&mut sub_hit, "after CLIENT KILL").await.expect_err("the reconnect must be reported");
    assert!(gap.to_string().contains("reconnected"), "{gap}");
    a.publish(&hit, Bytes::from_static(b"one")).await.unwrap();
    assert_eq!(next_ok(&mut sub_hit, "after").await.as_ref(), b"one");
    // The other shard's subscription saw no gap: its next item is the
    // message.
    a.publish(&spared, Bytes::from_static(b"two")).await.unwrap();
    assert_eq!(next_ok(&mut sub_spared, "the other shard").await.as_ref(), b"two");
    assert!(b.stats().pubsub_reconnects >= 1 && b.stats().topology_changes == 0, "{:?}", b.stats());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migrated_slot_moves_its_subscriptions_with_a_gap() {
    let cluster = RedisCluster::start().await;
    let (a, b) = (backplane(&cluster).await, backplane(&cluster).await);
    let moving = topic_on(&cluster, &a, 0, "moving").await;
    let staying = topic_on(&cluster, &a, 2, "staying").await;
    let mut sub = b.subscribe(&moving).await.expect("subscribe");
    let mut other = b.subscribe(&staying).await.expect("subscribe");
    a.publish(&moving, Bytes::from_static(b"one")).await.unwrap();
    assert_eq!(next_ok(&mut sub, "before the move").await.as_ref(), b"one");

    // Redis unsubscribes the slot's shard channels when it gives the slot
    // away (a `sunsubscribe` push): the backplane reads the new slot map
    // and subscribes on the new owner.
    let slot = cluster.keyslot(&a.channel(&moving)).await;
    cluster.migrate_slot(slot, 1).await;
    let gap = next(&mut sub, "after the move").await.expect_err("the move must be reported as a gap");
    assert!(gap.is_backplane() && gap.to_string().contains("reconnected"), "{gap}");
    until("the channel on its new master", || async { cluster.shard_numsub(1, &a.channel(&moving)).await == 1 }).await;
    assert_eq!(cluster.shard_numsub(0, &a.channel(&moving)).await, 0);
    assert!(b.stats().topology_changes >= 1, "{:?}", b.stats());
    until("a publish to succeed", || async { a.publish(&moving, Bytes::from_static(b"two")).await.is_ok() }).await;
    assert_eq!(next_ok(&mut sub, "after the move").await.as_ref(), b"two");
    // Every subscription is carried over (with a gap: the shards were
    // replaced) and keeps receiving.
    a.publish(&staying, Bytes::from_static(b"still")).await.unwrap();
    loop {
        match next(&mut other, "another shard").await {
            Ok(m) => {
                assert_eq!(m.as_ref(), b"still");
                break;
            }
            Err(e) => assert!(e.to_string().contains("reconnected"), "{e}"),
        }
    }
}

/// Measures what the cluster adds (run by hand, in release mode):
/// `cargo test --release --all-features --test redis_cluster -- --ignored --nocapture measure`.
/// The same figures as `tests/redis.rs`'s `measure` (cross-node latency,
/// publish throughput of 64 concurrent publishers to one topic, so one
/// shard), on the 3-master cluster. Asserts nothing about timings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement, run by hand"]
async fn measure() {
    let cluster = RedisCluster::start().await;
    let (a, b) = (backplane(&cluster).await, backplane(&cluster).await);
    println!("{}", support::redis::latency("redis cluster", &a, &b).await);
    println!("{}", support::redis::throughput("redis cluster", &a).await);
}
