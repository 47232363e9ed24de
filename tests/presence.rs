//! Presence: multi-tab users, heartbeat and node expiry, ephemeral flags,
//! diff batching, counts-only rooms, two hubs on one backplane, churn, and
//! visibility to authorized members only. Timers are tested with paused
//! time over the in-memory transport; the rest over real sockets.

mod support;

use serde_json::{json, Value};
use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::*;
use switchboard::presence::{PresenceCause, PresenceConfig, PresenceEvent};
use switchboard::transport::memory::{self, MemoryPeer};
use switchboard::transport::{Frame, Handshake};
use switchboard::{backplane::MemoryBackplane, presence::MemoryPresence, CallError, Hub, HubBuilder, HubConfig};
use tokio::time::Instant;

/// Admits everyone; `?user=NAME` makes the connection user NAME.
/// What the presence hooks saw: (joined, room, key, cause).
type Log = Arc<Mutex<Vec<(bool, String, String, PresenceCause)>>>;

fn with_hooks(builder: HubBuilder) -> (HubBuilder, Log) {
    let log: Log = Arc::default();
    let (j, l) = (log.clone(), log.clone());
    let builder = builder
        .on_presence_join(move |_: &Hub, e: &PresenceEvent| {
            j.lock().unwrap().push((true, e.room.clone(), e.key.clone(), e.cause))
        })
        .on_presence_leave(move |_: &Hub, e: &PresenceEvent| {
            l.lock().unwrap().push((false, e.room.clone(), e.key.clone(), e.cause))
        });
    (builder, log)
}

fn events(log: &Log, key: &str) -> Vec<(bool, PresenceCause)> {
    log.lock().unwrap().iter().filter(|e| e.2 == key).map(|e| (e.0, e.3)).collect()
}

/// One room's presence as a client keeps it, following docs/protocol.md:
/// a `presence_state` replaces everything; a diff's `joins` add or replace
/// metas by `ref`, its `leaves` remove them, a key without metas is gone,
/// and its `ephemeral` sets (or with `null` clears) flags of metas by `ref`.
#[derive(Debug, Default, Clone)]
struct Model {
    keys: BTreeMap<String, BTreeMap<String, Value>>,
    count: Value,
    counts_only: bool,
    states: usize,
    diffs: usize,
}

impl Model {
    fn apply(&mut self, m: &Value) {
        let data = &m["data"];
        match m["type"].as_str() {
            Some("presence_state") => {
                self.states += 1;
                self.keys.clear();
                self.counts_only = data.get("presences").is_none();
                self.add(&data["presences"]);
            }
            Some("presence_diff") => {
                self.diffs += 1;
                assert_eq!(data.get("joins").is_none(), data.get("leaves").is_none(), "{m}");
                self.add(&data["joins"]);
                for (key, entry) in data["leaves"].as_object().into_iter().flatten() {
                    for meta in entry["metas"].as_array().unwrap() {
                        let metas = self.keys.get_mut(key).unwrap_or_else(|| panic!("leave of unknown key: {m}"));
                        metas.remove(meta["ref"].as_str().unwrap());
                        if metas.is_empty() {
                            self.keys.remove(key);
                        }
                    }
                }
                for (key, refs) in data["ephemeral"].as_object().into_iter().flatten() {
                    for (r, flags) in refs.as_object().unwrap() {
                        let meta = self.keys.get_mut(key).and_then(|m| m.get_mut(r));
                        let meta = meta.unwrap_or_else(|| panic!("flags of an unknown meta: {m}"));
                        let ephemeral = meta["ephemeral"].as_object_mut().unwrap();
                        for (flag, value) in flags.as_object().unwrap() {
                            if value.is_null() {
                                ephemeral.remove(flag);
                            } else {
                                ephemeral.insert(flag.clone(), value.clone());
                            }
                        }
                    }
                }
            }
            _ => return,
        }
        self.count = data["count"].clone();
        if !self.counts_only {
            let conns: usize = self.keys.values().map(BTreeMap::len).sum();
            assert_eq!(self.count, json!({"keys": self.keys.len(), "connections": conns}), "count disagrees: {m}");
        }
    }

    fn add(&mut self, presences: &Value) {
        for (key, entry) in presences.as_object().into_iter().flatten() {
            for meta in entry["metas"].as_array().unwrap() {
                for field in ["ref", "joined_at", "meta", "ephemeral"] {
                    assert!(meta.get(field).is_some(), "meta without `{field}`: {meta}");
                }
                let r = meta["ref"].as_str().unwrap().to_owned();
                self.keys.entry(key.clone()).or_default().insert(r, meta.clone());
            }
        }
    }

    fn metas(&self, key: &str) -> usize {
        self.keys.get(key).map_or(0, BTreeMap::len)
    }

    fn key_list(&self) -> Vec<&str> {
        self.keys.keys().map(String::as_str).collect()
    }

    /// The single meta of `key`.
    fn meta(&self, key: &str) -> &Value {
        let metas = &self.keys[key];
        assert_eq!(metas.len(), 1, "{key} has {} metas", metas.len());
        metas.values().next().unwrap()
    }
}

/// Reads `c` until `done(model)`, applying `room`'s presence messages.
async fn watch(c: &mut Client, room: &str, model: &mut Model, mut done: impl FnMut(&Model) -> bool) {
    while !done(model) {
        let m = c.recv().await;
        if m["room"] == room {
            model.apply(&m);
        }
    }
}

fn presence_hub() -> HubBuilder {
    Hub::builder().authenticate(user_from_query).presence(PresenceConfig::default())
}

// ---------------------------------------------------------------------------
// In-memory peers for paused-time tests.

/// A client over the in-memory transport that answers heartbeat pings
/// whenever it reads.
struct Peer {
    peer: MemoryPeer,
    hello: Value,
    next_ref: u64,
    pending: VecDeque<Value>,
    task: tokio::task::JoinHandle<()>,
}

async fn mem_connect(hub: &Hub, user: &str) -> Peer {
    let (transport, mut peer) = memory::pair(1024);
    let hs = Handshake::new().with_uri(format!("/?user={user}").parse().unwrap());
    let hub = hub.clone();
    let task = tokio::spawn(async move { hub.connect(transport, hs).await.unwrap() });
    let hello = match peer.recv().await.expect("hello") {
        Frame::Text(t) => serde_json::from_slice::<Value>(&t).unwrap(),
        other => panic!("expected hello, got {other:?}"),
    };
    assert_eq!(hello["type"], "hello", "{hello}");
    Peer { peer, hello, next_ref: 0, pending: VecDeque::new(), task }
}

impl Peer {
    async fn read(&mut self) -> Value {
        // Virtual time: a test waiting for something that never comes fails
        // fast in real time. One deadline per read, so answering heartbeat
        // pings does not extend it.
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let frame = tokio::time::timeout_at(deadline, self.peer.recv()).await;
            match frame.expect("nothing within 120 s (paused time)").expect("connection closed") {
                Frame::Text(t) => return serde_json::from_slice(&t).unwrap(),
                Frame::Ping(p) => self.peer.send(Frame::Pong(p)).await.unwrap(),
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    async fn recv(&mut self) -> Value {
        match self.pending.pop_front() {
            Some(v) => v,
            None => self.read().await,
        }
    }

    async fn send(&mut self, v: Value) {
        self.peer.send(Frame::Text(v.to_string().into())).await.unwrap();
    }

    async fn request(&mut self, mut v: Value) -> Value {
        self.next_ref += 1;
        let r = self.next_ref;
        v["ref"] = json!(r);
        self.send(v).await;
        loop {
            let m = self.read().await;
            if m["ref"] == r && ["reply", "error", "pong"].contains(&m["type"].as_str().unwrap_or_default()) {
                return m;
            }
            self.pending.push_back(m);
        }
    }

    async fn join_ok(&mut self, room: &str) {
        let r = self.request(json!({"type": "join", "room": room})).await;
        assert_eq!(r["type"], "reply", "{r}");
    }

    async fn watch(&mut self, room: &str, model: &mut Model, mut done: impl FnMut(&Model) -> bool) {
        while !done(model) {
            let m = self.recv().await;
            if m["room"] == room {
                model.apply(&m);
            }
        }
    }

    /// The next presence message of `room`.
    async fn next_presence(&mut self, room: &str) -> Value {
        loop {
            let m = self.recv().await;
            if m["room"] == room && m["type"].as_str().is_some_and(|t| t.starts_with("presence_")) {
                return m;
            }
        }
    }
}

// ---------------------------------------------------------------------------

#[tokio::test]
async fn multi_tab_user_is_one_key_that_leaves_with_its_last_tab() {
    let (builder, log) = with_hooks(presence_hub());
    let hub = builder.build();
    let addr = serve(&hub).await;
    let mut bob = connect_path(addr, "/?user=bob").await;
    assert_eq!(bob.hello["data"]["presence"]["ephemeral_ttl_ms"], 5000, "{}", bob.hello);
    bob.join_ok("lobby").await;
    let mut model = Model::default();
    // The state comes right after the join reply: the room as its members
    // have it (empty); bob's own join comes in the next diff.
    let state = bob.recv().await;
    assert_eq!(state["type"], "presence_state", "{state}");
    model.apply(&state);
    assert_eq!(model.key_list(), Vec::<&str>::new());
    watch(&mut bob, "lobby", &mut model, |m| m.metas("bob") == 1).await;
    assert_eq!(model.key_list(), ["bob"]);
    let node = bob.hello["data"]["node"].as_str().unwrap().to_owned();
    assert_eq!(model.meta("bob")["ref"], format!("{node}.{}", bob.connection_id()), "ref is <node>.<connection_id>");

    let mut tabs = Vec::new();
    for _ in 0..3 {
        let mut tab = connect_path(addr, "/?user=alice").await;
        tab.join_ok("lobby").await;
        tabs.push(tab);
    }
    watch(&mut bob, "lobby", &mut model, |m| m.metas("alice") == 3).await;
    assert_eq!(model.key_list(), ["alice", "bob"]);
    let entries = hub.presence("lobby").await.unwrap();
    let shape: Vec<(&str, usize)> = entries.iter().map(|e| (e.key.as_str(), e.metas.len())).collect();
    assert_eq!(shape, [("alice", 3), ("bob", 1)]);
    let count = hub.presence_count("lobby").await.unwrap();
    assert_eq!((count.keys, count.connections), (2, 4));
    assert!(hub.is_user_online("alice").await.unwrap());
    assert!(!hub.is_user_online("carol").await.unwrap());
    assert_eq!(events(&log, "alice"), [(true, PresenceCause::Local)], "one join for three tabs");

    // Two tabs go: one with a close frame, one without. Alice stays.
    let mut first = tabs.remove(0);
    first.ws.close(None).await.unwrap();
    drop(tabs.remove(0));
    watch(&mut bob, "lobby", &mut model, |m| m.metas("alice") == 1).await;
    assert_eq!(events(&log, "alice"), [(true, PresenceCause::Local)], "alice left while a tab was still open");
    assert!(hub.is_user_online("alice").await.unwrap());

    // The last one goes: alice leaves, once.
    let mut last = tabs.remove(0);
    let r = last.request(json!({"type": "leave", "room": "lobby"})).await;
    assert_eq!(r["type"], "reply", "{r}");
    watch(&mut bob, "lobby", &mut model, |m| m.metas("alice") == 0).await;
    assert_eq!(model.key_list(), ["bob"]);
    assert_eq!(events(&log, "alice"), [(true, PresenceCause::Local), (false, PresenceCause::Local)]);
    assert!(!hub.is_user_online("alice").await.unwrap());

    // A MessagePack client gets the same state, in MessagePack.
    let (mut mp, _) = connect_protocol(addr, "switchboard.v1.msgpack").await;
    assert_eq!(next_msgpack(&mut mp).await["type"], "hello");
    send_msgpack(&mut mp, &json!({"type": "join", "ref": 1, "room": "lobby"})).await;
    assert_eq!(next_msgpack(&mut mp).await["type"], "reply");
    let state = next_msgpack(&mut mp).await;
    assert_eq!(state["type"], "presence_state", "{state}");
    assert_eq!(state["data"]["count"], json!({"keys": 1, "connections": 1}), "bob; the joiner comes in a diff");
    assert!(state["data"]["presences"]["bob"]["metas"][0]["ref"].is_string(), "{state}");
    let diff = next_msgpack(&mut mp).await;
    assert_eq!(diff["type"], "presence_diff", "{diff}");
    assert_eq!(diff["data"]["count"], json!({"keys": 2, "connections": 2}), "bob and the anonymous client");
    let anon: Vec<&String> = diff["data"]["joins"].as_object().unwrap().keys().collect();
    assert!(anon.len() == 1 && anon[0].starts_with("anon:"), "an anonymous connection is its own key: {anon:?}");
}

#[tokio::test(start_paused = true)]
async fn a_silent_connection_leaves_after_the_heartbeat_timeout() {
    let config =
        HubConfig::default().heartbeat_interval(Duration::from_secs(25)).heartbeat_timeout(Duration::from_secs(10));
    let (builder, log) = with_hooks(presence_hub().config(config));
    let hub = builder.build();
    let mut watcher = mem_connect(&hub, "watcher").await;
    let connected = Instant::now();
    let mut ghost = mem_connect(&hub, "ghost").await;
    watcher.join_ok("r").await;
    ghost.join_ok("r").await;
    let mut model = Model::default();
    watcher.watch("r", &mut model, |m| m.metas("ghost") == 1).await;

    // The ghost never reads nor answers again, like a peer whose network
    // vanished without a close. The watcher keeps answering pings.
    watcher.watch("r", &mut model, |m| m.metas("ghost") == 0).await;
    let gone = connected.elapsed();
    // Closed with 4001 at interval + timeout, announced one batch window later.
    assert!(gone >= Duration::from_secs(35) && gone <= Duration::from_millis(35_200), "left after {gone:?}");
    assert_eq!(model.key_list(), ["watcher"]);
    assert_eq!(events(&log, "ghost"), [(true, PresenceCause::Local), (false, PresenceCause::Local)]);
    assert_eq!(hub.presence_count("r").await.unwrap().connections, 1);
    drop(ghost);
}

#[tokio::test(start_paused = true)]
async fn typing_expires_after_its_ttl_unless_refreshed() {
    let hub = presence_hub().build();
    let mut alice = mem_connect(&hub, "alice").await;
    let mut bob = mem_connect(&hub, "bob").await;
    alice.join_ok("r").await;
    bob.join_ok("r").await;
    let mut model = Model::default();
    bob.watch("r", &mut model, |m| m.metas("alice") == 1).await;
    let typing = |m: &Model| m.meta("alice")["ephemeral"]["typing"] == true;

    let t0 = Instant::now();
    let r = alice.request(json!({"type": "presence", "room": "r", "data": {"ephemeral": {"typing": true}}})).await;
    assert_eq!(r["type"], "reply", "{r}");
    let node = alice.hello["data"]["node"].as_str().unwrap();
    let id = alice.hello["data"]["connection_id"].as_u64().unwrap();
    assert_eq!(r["data"], json!({"room": "r", "ref": format!("{node}.{id}")}));
    bob.watch("r", &mut model, typing).await;
    assert!(t0.elapsed() <= Duration::from_millis(60), "typing shown after {:?}", t0.elapsed());
    bob.watch("r", &mut model, |m| !typing(m)).await;
    let gone = t0.elapsed();
    assert!(gone >= Duration::from_secs(5) && gone <= Duration::from_millis(5_100), "typing expired after {gone:?}");
    assert_eq!(model.meta("alice")["ephemeral"], json!({}));

    // Refreshed before its TTL, it lives on for a TTL from the refresh.
    let t1 = Instant::now();
    alice.request(json!({"type": "presence", "room": "r", "data": {"ephemeral": {"typing": true}}})).await;
    bob.watch("r", &mut model, typing).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    alice.request(json!({"type": "presence", "room": "r", "data": {"ephemeral": {"typing": true}}})).await;
    bob.watch("r", &mut model, |m| !typing(m)).await;
    let gone = t1.elapsed();
    assert!(
        gone >= Duration::from_secs(8) && gone <= Duration::from_millis(8_100),
        "refreshed typing expired after {gone:?}"
    );

    // `null` clears a flag at once (within one batch window).
    alice.request(json!({"type": "presence", "room": "r", "data": {"ephemeral": {"typing": true}}})).await;
    bob.watch("r", &mut model, typing).await;
    let t2 = Instant::now();
    alice.request(json!({"type": "presence", "room": "r", "data": {"ephemeral": {"typing": null}}})).await;
    bob.watch("r", &mut model, |m| !typing(m)).await;
    assert!(t2.elapsed() <= Duration::from_millis(60), "cleared after {:?}", t2.elapsed());
    assert_eq!(hub.presence_stats().pending, 0);
}

#[tokio::test(start_paused = true)]
async fn joins_in_one_window_arrive_as_one_diff() {
    let config = PresenceConfig::default().batch_window(Duration::from_secs(1));
    let hub = Hub::builder().authenticate(user_from_query).presence(config).build();
    let mut watcher = mem_connect(&hub, "watcher").await;
    watcher.join_ok("r").await;
    let state = watcher.next_presence("r").await;
    assert_eq!(state["type"], "presence_state");
    // The watcher's own join is still in the first window: let it pass.
    let own = watcher.next_presence("r").await;
    assert_eq!(own["type"], "presence_diff", "{own}");

    let t0 = Instant::now();
    let mut peers = Vec::new();
    for i in 0..10 {
        let mut p = mem_connect(&hub, &format!("u{i}")).await;
        p.join_ok("r").await;
        peers.push(p);
    }
    // One that joins and leaves within the window never shows up.
    let mut brief = mem_connect(&hub, "brief").await;
    brief.join_ok("r").await;
    assert_eq!(brief.request(json!({"type": "leave", "room": "r"})).await["type"], "reply");
    assert!(t0.elapsed() < Duration::from_secs(1), "the joins took {:?} of paused time", t0.elapsed());

    let diff = watcher.next_presence("r").await;
    assert_eq!(diff["type"], "presence_diff", "{diff}");
    let joins: Vec<&String> = diff["data"]["joins"].as_object().unwrap().keys().collect();
    let want: Vec<String> = (0..10).map(|i| format!("u{i}")).collect();
    assert_eq!(joins, want.iter().collect::<Vec<_>>(), "all ten joins in one diff");
    assert_eq!(diff["data"]["leaves"], json!({}), "{diff}");
    assert_eq!(diff["data"]["count"], json!({"keys": 11, "connections": 11}));
    // Nothing else was queued: the next message is the answer to a ping.
    assert_eq!(watcher.request(json!({"type": "ping"})).await["type"], "pong");
    assert!(watcher.pending.is_empty(), "more presence messages: {:?}", watcher.pending);
}

/// A hub switching to counts above 4 keys (8 connections), and a watcher
/// in its room `big`.
async fn counts_room() -> (Hub, std::net::SocketAddr, Client, Model) {
    let config = PresenceConfig::default().counts_only_above(4);
    let hub = Hub::builder().authenticate(user_from_query).presence(config).build();
    let addr = serve(&hub).await;
    let mut watcher = connect_path(addr, "/?user=watcher").await;
    watcher.join_ok("big").await;
    (hub, addr, watcher, Model::default())
}

#[tokio::test]
async fn a_large_room_switches_to_counts_and_back() {
    let (_hub, addr, mut watcher, mut model) = counts_room().await;
    let mut others = Vec::new();
    for (i, name) in ["a", "b", "c", "d"].into_iter().enumerate() {
        let mut c = connect_path(addr, &format!("/?user={name}")).await;
        c.join_ok("big").await;
        others.push(c);
        watch(&mut watcher, "big", &mut model, |m| m.count["keys"] == i + 2).await;
        // Up to 4 keys: member lists; above: counts only.
        assert_eq!(model.counts_only, i + 2 > 4, "with {} keys: {model:?}", i + 2);
    }
    assert_eq!(model.count, json!({"keys": 5, "connections": 5}));
    assert!(model.keys.is_empty(), "counts-only state still lists members");
    // The switch came as a new state; then counts-only diffs.
    assert_eq!(model.states, 2);

    // A newcomer in counts-only mode gets the count only.
    let mut late = connect_path(addr, "/?user=late").await;
    late.join_ok("big").await;
    let state = late.recv().await;
    assert_eq!(state["type"], "presence_state");
    assert_eq!(state["data"], json!({"count": {"keys": 6, "connections": 6}}));
    let r = late.request(json!({"type": "leave", "room": "big"})).await;
    assert_eq!(r["type"], "reply");

    // Back to lists at 3/4 of the threshold (3 keys), not before.
    for n in [4, 3] {
        let mut c = others.pop().unwrap();
        assert_eq!(c.request(json!({"type": "leave", "room": "big"})).await["type"], "reply");
        watch(&mut watcher, "big", &mut model, |m| m.count["keys"] == n).await;
        assert_eq!(model.counts_only, n > 3, "with {n} keys: {model:?}");
    }
    assert_eq!(model.key_list(), ["a", "b", "watcher"]);
    assert_eq!(model.states, 3);
}

#[tokio::test]
async fn two_hubs_on_one_backplane_agree_on_presence() {
    let bp = MemoryBackplane::new();
    let store = MemoryPresence::new();
    let (b1, log1) = with_hooks(presence_hub().backplane(bp.clone()).presence_store(store.clone()));
    let hub1 = b1.build();
    let hub2 = presence_hub().backplane(bp.clone()).presence_store(store.clone()).build();
    let (addr1, addr2) = (serve(&hub1).await, serve(&hub2).await);

    let mut alice1 = connect_path(addr1, "/?user=alice").await;
    alice1.join_ok("r").await;
    let mut bob2 = connect_path(addr2, "/?user=bob").await;
    bob2.join_ok("r").await;
    let mut alice2 = connect_path(addr2, "/?user=alice").await;
    alice2.join_ok("r").await;

    let full = |m: &Model| m.metas("alice") == 2 && m.metas("bob") == 1;
    let mut m1 = Model::default();
    let mut m2 = Model::default();
    let mut m3 = Model::default();
    watch(&mut alice1, "r", &mut m1, full).await;
    watch(&mut bob2, "r", &mut m2, full).await;
    watch(&mut alice2, "r", &mut m3, full).await;
    assert_eq!(m1.keys, m2.keys, "the two nodes' clients disagree");
    assert_eq!(m2.keys, m3.keys);
    let view = |entries: Vec<switchboard::presence::PresenceEntry>| -> Vec<(String, Vec<String>)> {
        entries.into_iter().map(|e| (e.key, e.metas.into_iter().map(|m| m.conn_ref).collect())).collect()
    };
    assert_eq!(view(hub1.presence("r").await.unwrap()), view(hub2.presence("r").await.unwrap()));
    assert!(hub1.is_user_online("bob").await.unwrap(), "bob is on the other node");
    assert_eq!(events(&log1, "bob"), [(true, PresenceCause::Remote)]);

    // Ephemeral flags cross nodes too.
    let r = alice2.request(json!({"type": "presence", "room": "r", "data": {"ephemeral": {"typing": true}}})).await;
    assert_eq!(r["type"], "reply", "{r}");
    let alice2_ref = r["data"]["ref"].as_str().unwrap().to_owned();
    watch(&mut alice1, "r", &mut m1, |m| m.keys["alice"][&alice2_ref]["ephemeral"]["typing"] == true).await;

    // A late joiner on node 1 gets everyone from the start, and itself in
    // the next diff.
    let mut carol1 = connect_path(addr1, "/?user=carol").await;
    carol1.join_ok("r").await;
    let mut m4 = Model::default();
    m4.apply(&carol1.recv().await);
    assert_eq!((m4.metas("alice"), m4.metas("bob"), m4.metas("carol")), (2, 1, 0), "{m4:?}");
    watch(&mut carol1, "r", &mut m4, |m| m.metas("carol") == 1).await;
    assert_eq!((m4.metas("alice"), m4.metas("bob")), (2, 1), "{m4:?}");

    // Bob leaves node 2: node 1 sees it, and its hook fires once.
    drop(bob2);
    watch(&mut alice1, "r", &mut m1, |m| m.metas("bob") == 0).await;
    assert_eq!(events(&log1, "bob"), [(true, PresenceCause::Remote), (false, PresenceCause::Remote)]);

    for mut c in [alice1, alice2, carol1] {
        assert_eq!(c.request(json!({"type": "leave", "room": "r"})).await["type"], "reply");
    }
    eventually("store emptied", || store.is_empty()).await;
    eventually("backplane topics released", || bp.topic_count() == 0).await;
    eventually("no presence state left", || hub1.presence_stats() == Default::default()).await;
    eventually("no presence state left", || hub2.presence_stats() == Default::default()).await;
}

#[tokio::test(start_paused = true)]
async fn a_vanished_nodes_entries_expire() {
    let bp = MemoryBackplane::new();
    let store = MemoryPresence::new();
    let config = || PresenceConfig::default().ttl(Duration::from_secs(3));
    let node = |bp: &MemoryBackplane, store: &MemoryPresence| {
        Hub::builder()
            .authenticate(user_from_query)
            .presence(config())
            .backplane(bp.clone())
            .presence_store(store.clone())
    };
    let hub_a = node(&bp, &store).build();
    let (builder_b, log_b) = with_hooks(node(&bp, &store));
    let hub_b = builder_b.build();

    let mut alice = mem_connect(&hub_a, "alice").await;
    let mut carol = mem_connect(&hub_a, "carol").await;
    alice.join_ok("r").await;
    carol.join_ok("r").await;
    let mut bob = mem_connect(&hub_b, "bob").await;
    bob.join_ok("r").await;
    let mut model = Model::default();
    bob.watch("r", &mut model, |m| m.key_list() == ["alice", "bob", "carol"]).await;
    // Longer than several refreshes: live entries do not expire.
    tokio::time::sleep(Duration::from_secs(10)).await;
    bob.request(json!({"type": "ping"})).await;
    assert_eq!(hub_b.presence_count("r").await.unwrap().keys, 3);
    assert_eq!(store.len(), 3);

    // Node A dies without a word: its tasks stop, nothing is said.
    let crashed = Instant::now();
    for p in [&alice, &carol] {
        p.task.abort();
    }
    drop(hub_a);
    bob.watch("r", &mut model, |m| m.key_list() == ["bob"]).await;
    let after = crashed.elapsed();
    // Within ttl + one refresh interval (+ a batch window) of its last refresh.
    assert!(after <= Duration::from_millis(4_100), "expired {after:?} after the crash");
    let mut expired: Vec<_> = log_b.lock().unwrap().iter().filter(|e| !e.0).map(|e| (e.2.clone(), e.3)).collect();
    expired.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(expired, [("alice".to_owned(), PresenceCause::Expired), ("carol".to_owned(), PresenceCause::Expired)]);
    assert_eq!(store.len(), 1, "the dead node's records are gone from the store");
    assert!(!hub_b.is_user_online("alice").await.unwrap());
    drop((alice, carol));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_leaves_no_presence_behind() {
    const CYCLES: usize = 2_000;
    let store = MemoryPresence::new();
    let (builder, log) = with_hooks(presence_hub().presence_store(store.clone()));
    let hub = builder.build();
    let addr = serve(&hub).await;
    futures::stream::StreamExt::for_each_concurrent(futures::stream::iter(0..CYCLES), 50, |i| async move {
        let mut c = connect_path(addr, &format!("/?user=u{}", i % 7)).await;
        let room = format!("room-{}", i % 5);
        c.join_ok(&room).await;
        if i % 3 == 0 {
            let data = json!({"meta": {"n": i}, "ephemeral": {"typing": true}});
            c.send(json!({"type": "presence", "room": room, "data": data})).await;
        }
        if i % 2 == 0 {
            futures::SinkExt::close(&mut c.ws).await.unwrap();
            while let Some(Ok(_)) = futures::StreamExt::next(&mut c.ws).await {}
        } else {
            drop(c); // no close frame
        }
    })
    .await;
    eventually("all counts zero", || hub.stats() == Default::default()).await;
    eventually("no presence state left", || hub.presence_stats() == Default::default()).await;
    eventually("store emptied", || store.is_empty()).await;
    for u in 0..7 {
        assert!(!hub.is_user_online(&format!("u{u}")).await.unwrap(), "u{u} still online after churn");
    }
    let log = log.lock().unwrap();
    let joins = log.iter().filter(|e| e.0).count();
    assert!(joins > 0);
    assert_eq!(joins, log.len() - joins, "every key that joined a room left it");
}

#[tokio::test]
async fn presence_is_only_visible_to_authorized_members() {
    let hub = Hub::builder()
        .authenticate(user_from_query)
        .authorize_join(|req: switchboard::auth::JoinRequest| async move {
            match (req.room.as_str(), req.identity.user_id()) {
                ("secret", Some("eve")) => Err(CallError::forbidden("not for you")),
                _ => Ok(()),
            }
        })
        .presence(PresenceConfig::default().room_prefixes(["secret", "lobby"]))
        .presence_meta(|conn: &switchboard::hub::Connection, _room: &str| json!({"name": conn.user_id()}))
        .build();
    let addr = serve(&hub).await;
    let mut alice = connect_path(addr, "/?user=alice").await;
    let mut bob = connect_path(addr, "/?user=bob").await;
    let mut eve = connect_path(addr, "/?user=eve").await;
    alice.join_ok("secret").await;
    bob.join_ok("secret").await;
    let refused = eve.join("secret").await;
    assert_eq!((refused["type"].as_str(), refused["code"].as_u64()), (Some("error"), Some(403)), "{refused}");
    let e = eve.request(json!({"type": "presence", "room": "secret", "data": {"meta": {"spy": true}}})).await;
    assert_eq!(e["code"], 405, "a non-member cannot set presence: {e}");
    eve.join_ok("lobby").await;

    // A change in the secret room reaches its members only.
    let r = alice.request(json!({"type": "presence", "room": "secret", "data": {"meta": {"status": "away"}}})).await;
    assert_eq!(r["type"], "reply", "{r}");
    let mut model = Model::default();
    watch(&mut bob, "secret", &mut model, |m| m.metas("alice") == 1 && m.meta("alice")["meta"]["status"] == "away")
        .await;
    assert_eq!(model.meta("alice")["meta"], json!({"name": "alice", "status": "away"}), "host and client parts");
    // Eve's queue up to now: lobby's presence only.
    eve.send(json!({"type": "ping", "ref": 99})).await;
    loop {
        let m = eve.recv().await;
        assert_ne!(m["room"], "secret", "eve saw the secret room: {m}");
        if m["type"] == "pong" {
            break;
        }
    }

    // Rooms outside the configured prefixes have no presence.
    alice.join_ok("plain").await;
    let e = alice.request(json!({"type": "presence", "room": "plain", "data": {"meta": {}}})).await;
    assert_eq!(e["code"], 400, "{e}");
    assert!(hub.presence("plain").await.unwrap().is_empty());
}

#[tokio::test]
async fn presence_updates_are_checked_and_rate_limited() {
    let config = PresenceConfig::default().update_burst(3).update_rate(1).max_meta_bytes(64);
    let hub = Hub::builder()
        .authenticate(user_from_query)
        .presence(config)
        .presence_meta(|conn: &switchboard::hub::Connection, room: &str| json!({"name": conn.user_id(), "room": room}))
        .build();
    let addr = serve(&hub).await;
    let mut alice = connect_path(addr, "/?user=alice").await;
    let code = |v: Value| v["code"].as_u64().unwrap_or_else(|| panic!("not an error: {v}"));

    // Refused before anything is counted.
    assert_eq!(code(alice.request(json!({"type": "presence", "room": "r", "data": {"meta": {}}})).await), 405);
    alice.join_ok("r").await;
    assert_eq!(code(alice.request(json!({"type": "presence", "data": {"meta": {}}})).await), 400);
    assert_eq!(code(alice.request(json!({"type": "presence", "room": "r"})).await), 400);
    assert_eq!(code(alice.request(json!({"type": "presence", "room": "r", "data": {}})).await), 400);
    assert_eq!(code(alice.request(json!({"type": "presence", "room": "r", "data": "x"})).await), 422);
    assert_eq!(code(alice.request(json!({"type": "presence", "room": "r", "data": {"meta": [1]}})).await), 422);
    assert_eq!(code(alice.request(json!({"type": "presence", "room": "bad room", "data": {"meta": {}}})).await), 400);

    // Each of these takes a token (burst 3, then 1 per second).
    let ok = alice.request(json!({"type": "presence", "room": "r", "data": {"meta": {"status": "busy"}}})).await;
    assert_eq!(ok["type"], "reply", "{ok}");
    let host_key = alice.request(json!({"type": "presence", "room": "r", "data": {"meta": {"name": "mallory"}}})).await;
    assert_eq!(code(host_key), 403, "the host's keys are read-only");
    let big = json!({"type": "presence", "room": "r", "data": {"ephemeral": {"x": "y".repeat(64)}}});
    assert_eq!(code(alice.request(big).await), 400, "over max_meta_bytes");
    let limited = alice.request(json!({"type": "presence", "room": "r", "data": {"meta": {"status": "idle"}}})).await;
    assert_eq!(code(limited.clone()), 420, "{limited}");
    let wait = limited["data"]["retry_after_ms"].as_u64().unwrap();
    assert!(wait > 0 && wait <= 1000, "{limited}");

    let entries = hub.presence("r").await.unwrap();
    assert_eq!(entries.len(), 1);
    let meta = &entries[0].metas[0].meta;
    assert_eq!(serde_json::Value::Object(meta.clone()), json!({"name": "alice", "room": "r", "status": "busy"}));
}

#[tokio::test]
async fn a_host_join_tracks_presence_once() {
    let hub = presence_hub().build();
    let addr = serve(&hub).await;
    let mut alice = connect_path(addr, "/?user=alice").await;
    alice.join_ok("a").await;
    let id = member_id(&hub, "a", alice.connection_id());

    // The host joins her to `r`: no reply, but the state comes.
    hub.join(id, "r").await.unwrap();
    let mut model = Model::default();
    watch(&mut alice, "r", &mut model, |m| m.states == 1 && m.metas("alice") == 1).await;
    let r = alice.request(json!({"type": "presence", "room": "r", "data": {"meta": {"status": "busy"}}})).await;
    assert_eq!(r["type"], "reply", "{r}");
    watch(&mut alice, "r", &mut model, |m| m.meta("alice")["meta"]["status"] == "busy").await;
    let joined_at = model.meta("alice")["joined_at"].clone();

    // Joining a member again changes nothing: no second state, same meta.
    hub.join(id, "r").await.unwrap();
    alice.send(json!({"type": "ping", "ref": 99})).await;
    loop {
        let m = alice.recv().await;
        assert_ne!(m["type"], "presence_state", "a second state: {m}");
        if m["type"] == "pong" {
            break;
        }
        model.apply(&m);
    }
    let entries = hub.presence("r").await.unwrap();
    assert_eq!(entries.len(), 1);
    let meta = &entries[0].metas[0];
    assert_eq!(meta.meta.get("status"), Some(&json!("busy")), "the client's part was lost");
    assert_eq!(json!(meta.joined_at), joined_at);

    assert!(hub.leave(id, "r"));
    eventually("alice's presence in r is gone", || hub.presence_stats().rooms == 1).await;
}

#[tokio::test]
async fn one_user_with_many_tabs_switches_the_room_to_counts() {
    // The attack (issue #24): counts-only mode switched on by keys (users)
    // only, so one user with ~960 tabs, each with a 990-byte meta, kept the
    // full member list and `presence_state` outgrew the 1 MiB queue: every
    // joiner was closed with 4000. Now a room also switches when it has
    // more than twice `counts_only_above` connections, so a member list
    // holds at most that many metas.
    let (_hub, addr, mut watcher, mut model) = counts_room().await;
    let mut tabs = Vec::new();
    for n in 2..=9usize {
        let mut tab = connect_path(addr, "/?user=tabs").await;
        tab.join_ok("big").await;
        tabs.push(tab);
        watch(&mut watcher, "big", &mut model, |m| m.count["connections"] == n).await;
        // Two keys throughout: up to 8 connections a member list, above
        // counts only.
        assert_eq!(model.counts_only, n > 8, "with {n} connections: {model:?}");
    }
    assert_eq!(model.count, json!({"keys": 2, "connections": 9}));
    assert!(model.keys.is_empty(), "counts-only state still lists members");
    // Back to lists at three quarters (6 connections), not before.
    for n in [8usize, 7, 6] {
        let mut tab = tabs.pop().unwrap();
        assert_eq!(tab.request(json!({"type": "leave", "room": "big"})).await["type"], "reply");
        watch(&mut watcher, "big", &mut model, |m| m.count["connections"] == n).await;
        assert_eq!(model.counts_only, n > 6, "with {n} connections: {model:?}");
    }
    assert_eq!(model.metas("tabs"), 5);
}

/// A presence store that never answers.
struct HungStore;

impl switchboard::presence::PresenceStore for HungStore {
    fn write(
        &self,
        _: Vec<switchboard::presence::StoreChange>,
        _: Duration,
    ) -> futures::future::BoxFuture<'static, switchboard::Result<()>> {
        Box::pin(std::future::pending())
    }

    fn list(
        &self,
        _: switchboard::presence::PresenceQuery,
    ) -> futures::future::BoxFuture<'static, switchboard::Result<Vec<switchboard::presence::PresenceRecord>>> {
        Box::pin(std::future::pending())
    }
}

#[tokio::test(start_paused = true)]
async fn a_hung_store_delays_presence_by_its_timeout_and_never_stalls_it() {
    let timeout = Duration::from_secs(2);
    let hub =
        presence_hub().presence(PresenceConfig::default().store_timeout(timeout)).presence_store(HungStore).build();
    let mut alice = mem_connect(&hub, "alice").await;
    alice.join_ok("a").await;
    assert_eq!(alice.next_presence("a").await["type"], "presence_state");

    // A host read of a room this node has no view of asks the store: the
    // hung call fails after the timeout, with its own kind.
    let asked = Instant::now();
    let read = tokio::time::timeout(Duration::from_secs(60), hub.presence("elsewhere")).await;
    let err = read.expect("a host read hung on the store").unwrap_err();
    assert_eq!(err.kind(), switchboard::ErrorKind::Presence, "{err}");
    assert!(asked.elapsed() >= timeout);

    // The periodic write (every ttl / 3 = 10 s) hangs in the store and is
    // given up; presence goes on for everyone, in every room.
    tokio::time::sleep(Duration::from_secs(15)).await;
    let mut bob = mem_connect(&hub, "bob").await;
    bob.join_ok("b").await;
    assert_eq!(bob.next_presence("b").await["type"], "presence_state");
    bob.join_ok("a").await;
    let mut model = Model::default();
    bob.watch("a", &mut model, |m| m.metas("alice") == 1 && m.metas("bob") == 1).await;

    // Shutdown's final write cannot stall it either.
    let shutdown = tokio::time::timeout(Duration::from_secs(60), hub.shutdown(Duration::from_secs(5))).await;
    shutdown.expect("shutdown stalled on the hung presence store");
}

/// A backplane whose presence publishes never answer (room messages and
/// every subscription work): the presence sync must not hold its lock for
/// one backplane timeout per room.
struct HungPresencePublish(MemoryBackplane);

impl switchboard::backplane::Backplane for HungPresencePublish {
    fn publish(
        &self,
        topic: &str,
        message: bytes::Bytes,
    ) -> futures::future::BoxFuture<'static, switchboard::Result<()>> {
        if topic.starts_with("$presence:") {
            return Box::pin(std::future::pending());
        }
        self.0.publish(topic, message)
    }

    fn subscribe(
        &self,
        topic: &str,
    ) -> futures::future::BoxFuture<'static, switchboard::Result<switchboard::backplane::Subscription>> {
        self.0.subscribe(topic)
    }
}

#[tokio::test(start_paused = true)]
async fn a_hung_backplane_holds_presence_sync_for_one_timeout_not_one_per_room() {
    let timeout = Duration::from_secs(2);
    let rooms = 12;
    let hub = presence_hub()
        .config(HubConfig::default().backplane_timeout(timeout))
        .backplane(HungPresencePublish(MemoryBackplane::new()))
        .build();
    let mut alice = mem_connect(&hub, "alice").await;
    for i in 0..rooms {
        let room = format!("r{i}");
        alice.join_ok(&room).await;
        assert_eq!(alice.next_presence(&room).await["type"], "presence_state");
    }
    // The sync task is inside its publishes of the joins (all rooms at
    // once, one timeout for all; at most one more sync is queued behind
    // it); shutdown's flush waits for the lock, then publishes every room's
    // leave the same way: at most three timeouts in all, where one timeout
    // per room would be 12 x 2 s for the flush alone.
    let shutdown = tokio::time::timeout(timeout * 5, hub.shutdown(Duration::from_secs(1))).await;
    shutdown.expect("shutdown waited on one backplane timeout per room");
    drop(alice);
}
