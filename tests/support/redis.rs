//! A private `redis-server` per test (never the shared one on 6379): started
//! on a free loopback port without persistence, killable with SIGKILL and
//! restartable on the same port, stopped on drop. A private 3-master Redis
//! Cluster ([`RedisCluster`]) made of such servers. Plus a tiny RESP client
//! for assertions (`PUBSUB NUMSUB`, `CLIENT KILL`, …) and a TCP proxy that
//! can silently freeze the pub/sub connections passing through it (a
//! [`FaultProxy`]).
#![allow(dead_code)]

use super::fault_proxy::FaultProxy;
use bytes::Bytes;
use futures::StreamExt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use switchboard::backplane::Backplane;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// Polls `f` until it holds; fails after twice `WAIT` (a cluster's restart
/// and resubscription take a few round trips more than one server's).
pub async fn until<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + 2 * super::WAIT;
    while !f().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The next item of a backplane subscription (a message or an error).
pub async fn next(sub: &mut switchboard::backplane::Subscription, what: &str) -> switchboard::Result<Bytes> {
    tokio::time::timeout(2 * super::WAIT, sub.next())
        .await
        .unwrap_or_else(|_| panic!("{what}: nothing within {:?}", 2 * super::WAIT))
        .unwrap_or_else(|| panic!("{what}: subscription ended"))
}

/// The next message of a backplane subscription; an error item fails.
pub async fn next_ok(sub: &mut switchboard::backplane::Subscription, what: &str) -> Bytes {
    next(sub, what).await.unwrap_or_else(|e| panic!("{what}: unexpected error item: {e}"))
}

/// How long to wait for a server to answer after starting it.
const START_WAIT: Duration = Duration::from_secs(10);

/// A `redis-server` child process on `127.0.0.1:port`.
pub struct RedisServer {
    port: u16,
    child: Option<Child>,
    dir: PathBuf,
    /// Arguments added to the defaults (the cluster settings of a node).
    extra: Vec<String>,
}

fn binary(name: &'static str) -> &'static str {
    super::process::require_binary(name, "Debian: `apt-get install redis-server`, which brings redis-cli too")
}

use super::process::free_port;

impl RedisServer {
    /// Starts a server on a free port and waits until it answers `PING`.
    pub async fn start() -> RedisServer {
        RedisServer::start_with(&scratch_dir(), |_| Vec::new()).await
    }

    /// Starts a server in `dir` with the arguments `extra(port)` added.
    async fn start_with(dir: &std::path::Path, extra: impl Fn(u16) -> Vec<String>) -> RedisServer {
        std::fs::create_dir_all(dir).expect("create a scratch directory for redis-server");
        // A port found free may be taken before redis binds it: retry.
        for _ in 0..5 {
            let port = free_port();
            let mut server = RedisServer { port, child: None, dir: dir.to_owned(), extra: extra(port) };
            if server.spawn().await {
                return server;
            }
        }
        panic!("redis-server did not start (see the messages above)");
    }

    /// Spawns the process on `self.port`; `true` once it answers.
    async fn spawn(&mut self) -> bool {
        let port = self.port.to_string();
        let child = Command::new(binary("redis-server"))
            .args(["--port", &port, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--daemonize", "no", "--loglevel", "warning"])
            .args(&self.extra)
            .arg("--dir")
            .arg(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn redis-server");
        self.child = Some(child);
        let deadline = tokio::time::Instant::now() + START_WAIT;
        while tokio::time::Instant::now() < deadline {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                eprintln!("redis-server on port {} exited at start: {status}", self.port);
                self.child = None;
                return false;
            }
            if let Ok(mut c) = Resp::connect(self.port).await {
                if c.cmd(&["PING"]).await.is_ok_and(|v| v == Reply::Status("PONG".into())) {
                    return true;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.kill();
        false
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// `kill -9`: the server dies at once, with all its data (no
    /// persistence), and its connections are reset.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill(); // SIGKILL
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port (empty: nothing was saved).
    pub async fn restart(&mut self) {
        self.kill();
        for _ in 0..50 {
            if self.spawn().await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("redis-server did not restart on port {}", self.port);
    }

    /// Sends one command on a fresh connection and returns the reply.
    pub async fn cmd(&self, args: &[&str]) -> Reply {
        let mut c = Resp::connect(self.port).await.expect("connect to the test redis-server");
        c.cmd(args).await.expect("redis command")
    }

    /// Subscribers of `channel` on the server (`PUBSUB NUMSUB`).
    pub async fn numsub(&self, channel: &str) -> i64 {
        match self.cmd(&["PUBSUB", "NUMSUB", channel]).await {
            Reply::Array(items) if items.len() == 2 => match &items[1] {
                Reply::Int(n) => *n,
                other => panic!("NUMSUB: unexpected {other:?}"),
            },
            other => panic!("NUMSUB: unexpected {other:?}"),
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn scratch_dir() -> PathBuf {
    std::env::temp_dir().join(format!("switchboard-redis-{}-{}", std::process::id(), free_port()))
}

/// A private Redis Cluster of three masters (no replicas) on free loopback
/// ports, each node a [`RedisServer`] without persistence (its cluster
/// config file survives a kill, so a restarted node rejoins with its slots
/// and no data). Stopped on drop.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
    dir: PathBuf,
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        self.nodes.clear();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl RedisCluster {
    /// Starts three nodes, creates the cluster (`redis-cli --cluster
    /// create`) and waits for `cluster_state:ok` on every node.
    pub async fn start() -> RedisCluster {
        RedisCluster::start_with_replicas(0).await
    }

    /// Three masters with `replicas` replicas each (nodes 0–2 are the
    /// masters at the start).
    pub async fn start_with_replicas(replicas: usize) -> RedisCluster {
        binary("redis-cli");
        let dir = scratch_dir();
        let mut nodes = Vec::new();
        for _ in 0..3 * (1 + replicas) {
            let node_dir = dir.join(format!("node{}", nodes.len()));
            nodes.push(
                RedisServer::start_with(&node_dir, |port| {
                    let bus = free_port().to_string();
                    [
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        &format!("nodes-{port}.conf"),
                        "--cluster-port",
                        &bus,
                        // Shards that are up keep serving while one is down.
                        "--cluster-require-full-coverage",
                        "no",
                        "--cluster-node-timeout",
                        "3000",
                        // A replica syncs at once (a replica that never
                        // synced cannot be promoted).
                        "--repl-diskless-sync-delay",
                        "0",
                    ]
                    .map(str::to_owned)
                    .to_vec()
                })
                .await,
            );
        }
        let cluster = RedisCluster { nodes, dir };
        let addrs: Vec<String> = cluster.nodes.iter().map(|n| format!("127.0.0.1:{}", n.port())).collect();
        let out = Command::new(binary("redis-cli"))
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("run redis-cli --cluster create");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        cluster.wait_ok().await;
        cluster
    }

    /// Waits until every running node says `cluster_state:ok` and agrees
    /// that every slot is served, and every replica is in sync with its
    /// master.
    pub async fn wait_ok(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let mut ok = true;
            for node in self.nodes.iter().filter(|n| n.child.is_some()) {
                let Ok(mut c) = Resp::connect(node.port()).await else {
                    ok = false;
                    break;
                };
                let info = match c.cmd(&["CLUSTER", "INFO"]).await {
                    Ok(Reply::Bulk(Some(b))) => String::from_utf8_lossy(&b).into_owned(),
                    _ => String::new(),
                };
                let replication = match c.cmd(&["INFO", "replication"]).await {
                    Ok(Reply::Bulk(Some(b))) => String::from_utf8_lossy(&b).into_owned(),
                    _ => String::new(),
                };
                let synced = !replication.contains("role:slave") || replication.contains("master_link_status:up");
                if !info.contains("cluster_state:ok") || !info.contains("cluster_slots_ok:16384") || !synced {
                    ok = false;
                    break;
                }
            }
            if ok {
                return;
            }
            assert!(tokio::time::Instant::now() < deadline, "the test Redis Cluster did not reach cluster_state:ok");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The seed URLs of every node.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    /// The index of the node serving `slot`.
    pub async fn owner(&self, slot: u16) -> usize {
        let node = self.nodes.iter().find(|n| n.child.is_some()).expect("a running node");
        let Reply::Array(ranges) = node.cmd(&["CLUSTER", "SLOTS"]).await else { panic!("CLUSTER SLOTS") };
        for range in ranges {
            let Reply::Array(parts) = range else { continue };
            let (Reply::Int(a), Reply::Int(b), Reply::Array(master)) = (&parts[0], &parts[1], &parts[2]) else {
                continue;
            };
            if (*a..=*b).contains(&i64::from(slot)) {
                let Reply::Int(port) = master[1] else { panic!("CLUSTER SLOTS port") };
                return self.nodes.iter().position(|n| i64::from(n.port()) == port).expect("a node of ours");
            }
        }
        panic!("no node serves slot {slot}")
    }

    /// The slot of `key` (`CLUSTER KEYSLOT`).
    pub async fn keyslot(&self, key: &str) -> u16 {
        let node = self.nodes.iter().find(|n| n.child.is_some()).expect("a running node");
        match node.cmd(&["CLUSTER", "KEYSLOT", key]).await {
            Reply::Int(n) => n as u16,
            other => panic!("CLUSTER KEYSLOT: {other:?}"),
        }
    }

    /// The shard channels matching `pattern` subscribed on node `i`
    /// (`PUBSUB SHARDCHANNELS`).
    pub async fn shard_channels(&self, i: usize, pattern: &str) -> Vec<String> {
        match self.nodes[i].cmd(&["PUBSUB", "SHARDCHANNELS", pattern]).await {
            Reply::Array(items) => items
                .into_iter()
                .map(|r| match r {
                    Reply::Bulk(Some(b)) => String::from_utf8(b).unwrap(),
                    other => panic!("SHARDCHANNELS item {other:?}"),
                })
                .collect(),
            other => panic!("PUBSUB SHARDCHANNELS: {other:?}"),
        }
    }

    /// Subscribers of shard channel `channel` on node `i`
    /// (`PUBSUB SHARDNUMSUB`).
    pub async fn shard_numsub(&self, i: usize, channel: &str) -> i64 {
        match self.nodes[i].cmd(&["PUBSUB", "SHARDNUMSUB", channel]).await {
            Reply::Array(items) if items.len() == 2 => match items[1] {
                Reply::Int(n) => n,
                ref other => panic!("SHARDNUMSUB: unexpected {other:?}"),
            },
            other => panic!("SHARDNUMSUB: unexpected {other:?}"),
        }
    }

    /// Keys matching `pattern` on node `i`.
    pub async fn keys(&self, i: usize, pattern: &str) -> usize {
        match self.nodes[i].cmd(&["KEYS", pattern]).await {
            Reply::Array(items) => items.len(),
            other => panic!("KEYS: {other:?}"),
        }
    }

    /// Moves an empty `slot` to node `to` (`CLUSTER SETSLOT … IMPORTING /
    /// MIGRATING / NODE`), as a resharding does; returns once every node
    /// agrees.
    pub async fn migrate_slot(&self, slot: u16, to: usize) {
        let from = self.owner(slot).await;
        let id = |i: usize| async move {
            match self.nodes[i].cmd(&["CLUSTER", "MYID"]).await {
                Reply::Bulk(Some(b)) => String::from_utf8(b).unwrap(),
                other => panic!("CLUSTER MYID: {other:?}"),
            }
        };
        let (src, dst) = (id(from).await, id(to).await);
        let slot = slot.to_string();
        let ok = Reply::Status("OK".into());
        assert_eq!(self.nodes[to].cmd(&["CLUSTER", "SETSLOT", &slot, "IMPORTING", &src]).await, ok);
        assert_eq!(self.nodes[from].cmd(&["CLUSTER", "SETSLOT", &slot, "MIGRATING", &dst]).await, ok);
        assert_eq!(self.nodes[to].cmd(&["CLUSTER", "SETSLOT", &slot, "NODE", &dst]).await, ok);
        assert_eq!(self.nodes[from].cmd(&["CLUSTER", "SETSLOT", &slot, "NODE", &dst]).await, ok);
        let other = 3 - from - to;
        let _ = self.nodes[other].cmd(&["CLUSTER", "SETSLOT", &slot, "NODE", &dst]).await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while self.owner(slot.parse().unwrap()).await != to {
            assert!(tokio::time::Instant::now() < deadline, "slot {slot} did not move");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `kill -9` of node `i` (its data is lost; its slots stay assigned to
    /// it).
    pub fn kill(&mut self, i: usize) {
        self.nodes[i].kill();
    }

    /// Starts node `i` again on its port (empty, with its cluster config)
    /// and waits for the cluster to be whole again.
    pub async fn restart(&mut self, i: usize) {
        self.nodes[i].restart().await;
        self.wait_ok().await;
    }
}

/// Cuts every client connection of the servers on `ports` (`CLIENT KILL
/// TYPE normal`, then `pubsub`), as a network failure would; the data
/// stays. The conformance suites' `cut_connection` hook.
pub async fn cut_clients(ports: Vec<u16>) {
    for port in ports {
        let mut c = Resp::connect(port).await.expect("connect to the test redis-server");
        for kind in ["normal", "pubsub"] {
            c.cmd(&["CLIENT", "KILL", "TYPE", kind]).await.expect("CLIENT KILL");
        }
    }
}

/// The Redis that holds a scenario's room: `kill -9` it, then start it
/// again empty. A single server, or one master of a cluster ([`Master`]).
pub trait Outage {
    fn kill(&mut self);
    fn restart(&mut self) -> impl std::future::Future<Output = ()> + Send;
}

impl Outage for RedisServer {
    fn kill(&mut self) {
        RedisServer::kill(self);
    }

    fn restart(&mut self) -> impl std::future::Future<Output = ()> + Send {
        RedisServer::restart(self)
    }
}

/// Master `node` of a cluster, as an [`Outage`].
pub struct Master<'a> {
    pub cluster: &'a mut RedisCluster,
    pub node: usize,
}

impl Outage for Master<'_> {
    fn kill(&mut self) {
        self.cluster.kill(self.node);
    }

    fn restart(&mut self) -> impl std::future::Future<Output = ()> + Send {
        self.cluster.restart(self.node)
    }
}

/// Redis loses a recoverable room's data under two hubs, end to end on real
/// WebSockets: a member on each hub has events 1..=3; the room's Redis is
/// killed (a publish then fails, which also proves the room lives there)
/// and restarted empty. Then
/// (a) each member is told, before anyone publishes, with exactly
///     `{"type":"gap","room":…,"data":{"reason":"epoch_changed","epoch":E2}}`,
///     E2 the store's new epoch, one for both hubs (the hub reads the store
///     when the backplane reports its reconnect, and at each position
///     check), and each hub's live position is `(0, E2)`;
/// (b) a client rejoining with its old `{offset, epoch}`, on either hub,
///     gets `recovered: false`, the new epoch and offset 0, and no replay;
/// (c) events published after the restart, from both hubs, reach all four
///     clients in order with the new epoch's offsets 1, 2, 3.
///
/// The hubs must keep `room` recoverable on `RedisBackplane` +
/// `RedisHistory`. Their backplane and store connections heal on their own
/// after the restart: a publish is retried (with an idempotency key, so an
/// attempt whose append landed is not stored twice) until it succeeds.
pub async fn resync_after_redis_loses_the_room(hubs: [&switchboard::Hub; 2], room: &str, redis: &mut impl Outage) {
    use serde_json::json;
    use switchboard::history::StreamPosition;

    let addrs = [super::serve(hubs[0]).await, super::serve(hubs[1]).await];
    let mut clients = Vec::new();
    let mut epochs = Vec::new();
    for addr in addrs {
        let mut member = super::connect(addr).await;
        let reply = member.join(room).await;
        assert_eq!(reply["type"], "reply", "{reply}");
        epochs.push(reply["data"]["epoch"].as_str().unwrap_or_else(|| panic!("no epoch: {reply}")).to_owned());
        clients.push(member);
    }
    assert_eq!(epochs[0], epochs[1], "one stream for both hubs");
    let old = epochs.swap_remove(0);
    super::publish_range(hubs[0], room, 1..=3).await;
    for member in &mut clients {
        for n in 1..=3 {
            assert_eq!(super::next_offset(member).await, (n, n));
        }
    }

    redis.kill();
    let err = hubs[0].publish(room, "m", &json!({"n": 0})).await.expect_err("a publish while the room's redis is down");
    assert_eq!(err.kind(), switchboard::ErrorKind::History, "the history append fails first: {err}");
    redis.restart().await;

    // (a) Nobody publishes: the hubs find the new epoch themselves.
    let mut fresh: Option<String> = None;
    for (member, hub) in clients.iter_mut().zip(hubs) {
        let gap = member.recv().await;
        let epoch = gap["data"]["epoch"].as_str().unwrap_or_else(|| panic!("expected an epoch_changed gap: {gap}"));
        let fresh = fresh.get_or_insert_with(|| epoch.to_owned());
        assert_ne!(*fresh, old, "{gap}");
        assert_eq!(gap, json!({"type": "gap", "room": room, "data": {"reason": "epoch_changed", "epoch": fresh}}));
        assert_eq!(hub.room_position(room), Some(StreamPosition { offset: 0, epoch: fresh.as_str().into() }));
    }
    let fresh = fresh.unwrap();

    // (b) A rejoin with the lost position cannot recover, on either hub.
    for addr in addrs {
        let mut late = super::connect(addr).await;
        let reply = late.request(json!({"type": "join", "room": room, "offset": 3, "epoch": old})).await;
        assert_eq!(reply["type"], "reply", "{reply}");
        assert_eq!(reply["data"], json!({"room": room, "epoch": fresh, "offset": 0, "recovered": false}));
        clients.push(late);
    }

    // (c) The new stream, from both hubs, from offset 1.
    for (offset, (hub, n)) in (1..).zip([(hubs[0], 4), (hubs[1], 5), (hubs[0], 6)]) {
        let key = format!("after-{n}");
        let deadline = tokio::time::Instant::now() + 2 * super::WAIT;
        let published = loop {
            match hub.publish_idempotent(room, "m", &json!({"n": n}), &key).await {
                Ok(p) => break p,
                Err(e) => assert!(e.is_backplane() && tokio::time::Instant::now() < deadline, "publish {n}: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        assert_eq!(published.position, Some(StreamPosition { offset, epoch: fresh.as_str().into() }));
    }
    for client in &mut clients {
        for (offset, n) in [(1, 4), (2, 5), (3, 6)] {
            assert_eq!(super::next_offset(client).await, (offset, n));
        }
        assert_eq!(client.pending_events(), 0);
    }
}

/// A RESP reply.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    Status(String),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Vec<Reply>),
}

/// A minimal RESP2 client for test assertions.
pub struct Resp {
    io: BufReader<TcpStream>,
}

impl Resp {
    pub async fn connect(port: u16) -> std::io::Result<Resp> {
        let tcp = TcpStream::connect(("127.0.0.1", port)).await?;
        Ok(Resp { io: BufReader::new(tcp) })
    }

    pub async fn cmd(&mut self, args: &[&str]) -> std::io::Result<Reply> {
        let mut out = format!("*{}\r\n", args.len()).into_bytes();
        for a in args {
            out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            out.extend_from_slice(a.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        self.io.get_mut().write_all(&out).await?;
        tokio::time::timeout(Duration::from_secs(10), self.read())
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no reply"))?
    }

    fn read(&mut self) -> std::pin::Pin<Box<dyn std::future::Future<Output = std::io::Result<Reply>> + Send + '_>> {
        Box::pin(async move {
            let mut line = String::new();
            if self.io.read_line(&mut line).await? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            let line = line.trim_end_matches("\r\n");
            let (kind, rest) = line.split_at(1);
            let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, format!("bad reply line {line:?}"));
            Ok(match kind {
                "+" => Reply::Status(rest.to_owned()),
                "-" => Reply::Error(rest.to_owned()),
                ":" => Reply::Int(rest.parse().map_err(|_| bad())?),
                "$" => {
                    let n: i64 = rest.parse().map_err(|_| bad())?;
                    if n < 0 {
                        Reply::Bulk(None)
                    } else {
                        let mut buf = vec![0; n as usize + 2];
                        self.io.read_exact(&mut buf).await?;
                        buf.truncate(n as usize);
                        Reply::Bulk(Some(buf))
                    }
                }
                "*" => {
                    let n: i64 = rest.parse().map_err(|_| bad())?;
                    let mut items = Vec::new();
                    for _ in 0..n.max(0) {
                        items.push(self.read().await?);
                    }
                    Reply::Array(items)
                }
                _ => return Err(bad()),
            })
        })
    }
}

/// A TCP proxy in front of a Redis server (a [`FaultProxy`]).
/// [`Proxy::freeze_subscribers`] silences the connections that subscribed
/// to something: their sockets stay open but nothing passes any more, in
/// either direction — a pub/sub connection that silently stopped
/// delivering.
pub struct Proxy {
    pub faults: FaultProxy,
    pub addr: SocketAddr,
}

impl Proxy {
    pub async fn start(upstream_port: u16) -> Proxy {
        let faults = FaultProxy::start(SocketAddr::from(([127, 0, 0, 1], upstream_port))).await;
        Proxy { addr: faults.addr, faults }
    }

    pub fn url(&self) -> String {
        format!("redis://{}/", self.addr)
    }

    /// Freezes every connection, and every later one: whatever is behind
    /// the proxy is cut off from Redis, silently. Returns how many open
    /// connections were frozen.
    pub fn freeze_all(&self) -> usize {
        let open = self.faults.links().iter().filter(|l| !l.is_closed() && !l.is_half_open()).count();
        self.faults.half_open();
        open
    }

    /// Freezes every connection that sent a SUBSCRIBE; returns how many.
    pub fn freeze_subscribers(&self) -> usize {
        let links = self.faults.links();
        let subscribers = links.iter().filter(|l| l.sent(b"SUBSCRIBE") && !l.is_half_open());
        subscribers.map(|l| l.half_open()).count()
    }
}

// ---------------------------------------------------------------------------
// Measurements (the `measure` tests, run by hand in release mode).

/// Cross-node latency: publish on `a`, receive on `b`'s subscription, at
/// about 2,000 messages a second; returns a printable line.
pub async fn latency<B: Backplane + Clone>(name: &str, a: &B, b: &B) -> String {
    const N: u64 = 5_000;
    let base = std::time::Instant::now();
    let mut sub = b.subscribe("latency").await.unwrap();
    let reader = tokio::spawn(async move {
        let mut h = hdrhistogram::Histogram::<u64>::new(3).unwrap();
        for _ in 0..N {
            let m = next_ok(&mut sub, "latency").await;
            let sent = u64::from_be_bytes(m[..8].try_into().unwrap());
            h.record(base.elapsed().as_micros() as u64 - sent).unwrap();
        }
        h
    });
    // About 2,000 messages a second.
    let mut tick = tokio::time::interval(Duration::from_micros(500));
    for _ in 0..N {
        tick.tick().await;
        let mut msg = (base.elapsed().as_micros() as u64).to_be_bytes().to_vec();
        msg.extend_from_slice(&[0u8; 120]);
        a.publish("latency", Bytes::from(msg)).await.unwrap();
    }
    let h = reader.await.unwrap();
    format!(
        "{name}: cross-node latency at ~2,000 msg/s, 128-byte messages, {N} samples: p50 {} µs, p99 {} µs, max {} µs",
        h.value_at_quantile(0.5),
        h.value_at_quantile(0.99),
        h.max()
    )
}

/// Publish throughput of 64 concurrent publishers on `a`; returns a
/// printable line.
pub async fn throughput<B: Backplane + Clone>(name: &str, a: &B) -> String {
    const PER_TASK: u64 = 2_000;
    const TASKS: u64 = 64;
    let start = std::time::Instant::now();
    let tasks: Vec<_> = (0..TASKS)
        .map(|_| {
            let a = a.clone();
            tokio::spawn(async move {
                for _ in 0..PER_TASK {
                    a.publish("throughput", Bytes::from_static(&[0u8; 128])).await.unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let secs = start.elapsed().as_secs_f64();
    format!(
        "{name}: {} publishes/s ({TASKS} concurrent publishers, 128-byte messages)",
        ((TASKS * PER_TASK) as f64 / secs) as u64
    )
}

/// Test settings on top of `config`: reconnects within 20–300 ms, a probe
/// every second.
#[cfg(feature = "redis")]
pub fn quick(config: switchboard::redis::RedisConfig) -> switchboard::redis::RedisConfig {
    config
        .reconnect_backoff(Duration::from_millis(20), Duration::from_millis(300))
        .probe(Duration::from_secs(1), Duration::from_secs(5))
}

/// A hub on `RedisBackplane` and `RedisHistory` (both on `config`), with
/// `history` deciding which rooms are recoverable.
#[cfg(feature = "redis")]
pub async fn recoverable_node(
    config: switchboard::redis::RedisConfig,
    history: switchboard::history::HistoryConfig,
) -> switchboard::Hub {
    let store = switchboard::redis::RedisHistory::connect(config.clone()).await.expect("connect the history store");
    let backplane = switchboard::redis::RedisBackplane::connect(config).await.expect("connect the backplane");
    switchboard::Hub::builder().backplane(backplane).history(store, history).build()
}
