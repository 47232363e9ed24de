//! Admission under a reconnect storm (issue 18): a hub that sheds
//! connections (its connection limit or rate) answers with a jittered retry
//! hint — `503`/`429` with `retry-after` before the upgrade, and, for a
//! browser (a request with `Origin`), which cannot read a status, `101` and
//! close **1013** with `retry_after_ms=<n>` — and both clients wait at
//! least that long on top of their backoff. A refused sign-in is said to a
//! browser as **4501**, and the JS client stops on it.
//!
//! Real hubs on loopback (the standalone listener and axum), the Rust
//! client, raw tungstenite sockets, and `switchboard.js` in Node's own
//! WebSocket (`node --experimental-websocket js/test/e2e/storm.mjs`).
//! Nothing asserts a duration: hints and waits are values read from the
//! wire and from the clients' statuses.

mod support;

use std::net::SocketAddr;
use std::time::Duration;
use support::{refused_with, serve, serve_axum, try_connect, WAIT};
use switchboard::client::{Backoff, Client, ClientConfig, Disconnect, Status};
use switchboard::protocol::CloseCode;
use switchboard::security::{RateLimit, SecurityConfig};
use switchboard::transport::Handshake;
use switchboard::{Hub, Identity, Rejection};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// Users from `?user=`; no user, or one named `bad…`, is refused with 401.
fn hub(security: SecurityConfig) -> Hub {
    Hub::builder()
        .security(security)
        .authenticate(|hs: &Handshake| {
            let user = hs.query("user").filter(|u| !u.starts_with("bad"));
            std::future::ready(user.map(Identity::user).ok_or_else(|| Rejection::unauthorized("who are you?")))
        })
        .build()
}

/// One connection at a time, no rate.
fn one_slot() -> SecurityConfig {
    SecurityConfig::default().max_connections(1).connection_rate(None)
}

/// A client whose own backoff is tiny, so a wait of a second or more can
/// only be the server's hint.
fn tiny_backoff() -> ClientConfig {
    ClientConfig::default()
        .backoff(Backoff::default().initial(Duration::from_millis(10)).max(Duration::from_millis(50)))
        .jitter_seed(Some(7))
}

/// Upgrades with `Origin` (as a browser does) and expects `101` followed at
/// once by a close frame; returns its code and reason.
async fn shed_after_upgrade(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut req = format!("ws://{addr}{path}").into_client_request().unwrap();
    req.headers_mut().insert("origin", format!("http://{addr}").parse().unwrap());
    req.headers_mut().insert("sec-websocket-protocol", "switchboard.v1.json".parse().unwrap());
    let (mut ws, resp) = tokio_tungstenite::connect_async(req).await.expect("a browser's upgrade is accepted");
    assert_eq!(resp.headers()["sec-websocket-protocol"], "switchboard.v1.json");
    support::expect_close_frame(&mut ws).await.expect("a close frame, not a dropped socket")
}

async fn first_reconnecting(client: &Client) -> (Duration, Disconnect) {
    let mut rx = client.status();
    let s = tokio::time::timeout(WAIT, rx.wait_for(|s| matches!(s, Status::Reconnecting { .. })))
        .await
        .expect("a reconnecting status")
        .expect("status sender")
        .clone();
    let Status::Reconnecting { retry_in, reason, .. } = s else { unreachable!() };
    (retry_in, reason)
}

async fn connected(client: &Client) {
    let mut rx = client.status();
    tokio::time::timeout(WAIT, rx.wait_for(Status::is_connected)).await.expect("connected").expect("status sender");
}

#[tokio::test]
async fn a_full_hub_sheds_with_a_retry_hint_before_the_upgrade_and_the_rust_client_waits_for_it() {
    let hub = hub(one_slot());
    let (standalone, axum) = (serve(&hub).await, serve_axum(&hub).await);
    let holder = try_connect(standalone, "/?user=holder", &[]).await.expect("the one slot");
    for (addr, path) in [(standalone, "/"), (axum, "/ws")] {
        let (status, headers, body) = try_connect(addr, &format!("{path}?user=x"), &[]).await.err().expect("shed");
        assert_eq!((status, body.as_str()), (503, "server is at its connection limit"));
        let hint: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
        // At least the 1 s floor, plus the jitter (a calm hub: up to 1 s).
        assert!((1..=2).contains(&hint), "retry-after {hint}");
    }

    // The Rust client: a 50 ms backoff, so a wait of 1 s or more is the hint.
    let client = Client::builder(format!("ws://{standalone}/?user=alice")).config(tiny_backoff()).connect().unwrap();
    let (retry_in, reason) = first_reconnecting(&client).await;
    assert!(matches!(reason, Disconnect::Refused { status: 503, .. }), "{reason:?}");
    assert!(
        retry_in >= Duration::from_secs(1),
        "the client waits the server's retry-after, not its backoff: {retry_in:?}"
    );
    drop(holder);
    connected(&client).await;
    client.close().await;
}

#[tokio::test]
async fn a_browser_is_shed_after_the_upgrade_with_1013_and_a_hint_the_rust_client_honours_too() {
    let hub = hub(one_slot());
    let (standalone, axum) = (serve(&hub).await, serve_axum(&hub).await);
    let holder = try_connect(standalone, "/?user=holder", &[]).await.expect("the one slot");
    for (addr, path) in [(standalone, "/?user=x"), (axum, "/ws?user=x")] {
        let (code, reason) = shed_after_upgrade(addr, path).await;
        assert_eq!(code, 1013, "{path}: try again later");
        let hint = CloseCode(code).retry_hint(&reason).unwrap_or_else(|| panic!("no hint in {reason:?}"));
        assert!(hint >= Duration::from_secs(1) && hint < Duration::from_secs(2), "{reason}");
        assert!(reason.starts_with("try again later; retry_after_ms="), "{reason}");
    }
    // The refused browsers hold no slot.
    assert_eq!(hub.stats().admitted, 1);

    // The Rust client, sending an Origin, is told the same way and waits.
    let client = Client::builder(format!("ws://{axum}/ws?user=alice"))
        .header("origin", &format!("http://{axum}"))
        .config(tiny_backoff())
        .connect()
        .unwrap();
    let (retry_in, reason) = first_reconnecting(&client).await;
    assert!(matches!(&reason, Disconnect::Closed { code, .. } if *code == CloseCode::TRY_AGAIN_LATER), "{reason:?}");
    assert!(retry_in >= Duration::from_secs(1), "the 1013 hint, not the backoff: {retry_in:?}");
    drop(holder);
    connected(&client).await;
    client.close().await;
}

#[tokio::test]
async fn the_connection_rate_sheds_with_a_hint_and_a_refused_sign_in_reaches_a_browser_as_4501() {
    let security =
        SecurityConfig::default().connection_rate(Some(RateLimit::new(1, Duration::from_secs(3600)).burst(2)));
    let hub = hub(security);
    let addr = serve_axum(&hub).await;
    // A refused sign-in: 401 for a non-browser, 4501 after the upgrade for a
    // browser. Each spends a rate token (admission runs first).
    assert_eq!(refused_with(addr, "/ws?user=bad", &[]).await, (401, "who are you?".into()));
    assert_eq!(shed_after_upgrade(addr, "/ws?user=bad").await, (4501, "who are you?".into()));
    // The bucket is empty: the rate sheds, with a hint of about an hour.
    let (status, headers, _) = try_connect(addr, "/ws?user=x", &[]).await.err().expect("shed");
    assert_eq!(status, 429);
    let hint: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((3000..=3700).contains(&hint), "retry-after {hint}");
    let (code, reason) = shed_after_upgrade(addr, "/ws?user=x").await;
    assert_eq!(code, 1013);
    assert!(CloseCode(code).retry_hint(&reason).unwrap() > Duration::from_secs(3000), "{reason}");
    // The cross-origin check stays an HTTP 403: no upgrade for a foreign page.
    let evil = [("origin", "http://evil.example")];
    assert_eq!(refused_with(addr, "/ws?user=x", &evil).await.0, 403);
}

#[tokio::test]
async fn the_js_client_honours_the_shed_hint_and_stops_on_a_refused_sign_in_over_real_sockets() {
    let hub = hub(one_slot());
    let addr = serve_axum(&hub).await;
    let args = [format!("ws://{addr}/ws")];
    let stdout = support::browser::run_node("js/test/e2e/storm.mjs", &args, "js storm test passed").await;
    print!("{stdout}");
    support::eventually("the script's connections are gone", || hub.stats().admitted == 0).await;
}

// ---------------------------------------------------------------------------
// Presence under a storm.

/// What a watcher saw of a room's presence messages: how many diffs and
/// states, their bytes on the wire, and the last count.
#[derive(Debug, Default)]
struct PresenceTraffic {
    diffs: usize,
    states: usize,
    bytes: usize,
    /// Messages that listed members while the room had more keys than the
    /// counts-only threshold (100): there must be none.
    listed_above: usize,
    keys: u64,
}

/// Reads the watcher's socket (as raw text frames, to count their bytes)
/// until the room's count (keys, connections) satisfies `done`.
async fn presence_until(
    watcher: &mut support::Client,
    room: &str,
    t: &mut PresenceTraffic,
    done: impl Fn(u64, u64) -> bool,
) {
    use futures::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    let deadline = tokio::time::Instant::now() + 3 * WAIT;
    loop {
        let msg = tokio::time::timeout_at(deadline, watcher.ws.next())
            .await
            .unwrap_or_else(|_| panic!("the count never came as expected: {t:?}"))
            .expect("watcher's stream ended")
            .expect("watcher's read failed");
        let Message::Text(text) = msg else { continue };
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        if v["room"] != room {
            continue;
        }
        match v["type"].as_str() {
            Some("presence_diff") => t.diffs += 1,
            Some("presence_state") => t.states += 1,
            _ => continue,
        }
        t.bytes += text.len();
        let data = v["data"].as_object().unwrap();
        t.keys = v["data"]["count"]["keys"].as_u64().unwrap();
        if t.keys > 100 && data.keys().any(|k| k != "count") {
            t.listed_above += 1;
        }
        let connections = v["data"]["count"]["connections"].as_u64().unwrap();
        if done(t.keys, connections) {
            return;
        }
    }
}

/// 200 members (twice the counts-only threshold) of one presence room, each a Rust client (its real
/// reconnect policy) through a fault proxy, all lose their connections at
/// once (a reset of every socket) and come back. A member watching from
/// outside the storm gets counts-only diffs, at most one per batch window,
/// so the storm's presence traffic per watcher is bounded by its length,
/// not by its 2,000 changes; and once it is over, the room's presence is
/// exactly the connected members: one meta per member, each the member's
/// current connection, as a fresh client is told too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_under_a_reconnect_storm_is_batched_and_ends_with_no_stale_member() {
    use futures::future::join_all;
    use std::collections::BTreeSet;
    use support::fault_proxy::{Cut, FaultProxy};
    use switchboard::presence::PresenceConfig;

    const MEMBERS: u64 = 200;
    // Each member: its socket, two at the proxy, one at the server.
    let want = 4 * MEMBERS + 1024;
    let (soft, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
    if soft < want {
        nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, want.min(hard), hard).unwrap();
    }
    let window = Duration::from_millis(50);
    let hub = Hub::builder()
        .authenticate(support::user_from_query)
        .presence(PresenceConfig::default().batch_window(window))
        .build();
    let addr = serve(&hub).await;
    let proxy = FaultProxy::start(addr).await;
    let mut watcher = support::connect_path(addr, "/?user=watcher").await;
    watcher.join_ok("lobby").await;
    let mut before = PresenceTraffic::default();

    let clients: Vec<Client> =
        (0..MEMBERS).map(|i| Client::builder(proxy.ws_url(&format!("/?user=u{i}"))).connect().unwrap()).collect();
    let rooms: Vec<_> = join_all(clients.iter().map(|c| async move {
        let deadline = tokio::time::Instant::now() + 6 * WAIT;
        loop {
            match c.join("lobby").await {
                Ok(room) => return room,
                Err(e) => assert!(tokio::time::Instant::now() < deadline, "join: {e}"),
            }
        }
    }))
    .await;
    let all = |k: u64, c: u64| k == MEMBERS + 1 && c == MEMBERS + 1;
    presence_until(&mut watcher, "lobby", &mut before, all).await;

    // The storm: every member's connection is reset at once.
    proxy.cut(Cut::Reset);
    let t0 = tokio::time::Instant::now();
    let mut storm = PresenceTraffic::default();
    // First the count drops (the leaves), then it comes back.
    presence_until(&mut watcher, "lobby", &mut storm, |k, _| k <= MEMBERS).await;
    presence_until(&mut watcher, "lobby", &mut storm, all).await;
    let took = t0.elapsed();
    for c in &clients {
        let mut status = c.status();
        tokio::time::timeout(WAIT, status.wait_for(Status::is_connected)).await.expect("reconnected").unwrap();
    }
    eprintln!(
        "presence storm: {MEMBERS} members back in {:.1} s; the watcher got {} diffs, {} states, {} bytes \
         ({:.2} bytes per member)",
        took.as_secs_f64(),
        storm.diffs,
        storm.states,
        storm.bytes,
        storm.bytes as f64 / MEMBERS as f64
    );
    // Counts only above 100 keys (lists while the storm emptied the room
    // below 75), batched: at most one message per window (and one more at
    // each end), whatever the churn.
    assert_eq!(storm.listed_above, 0, "counts-only diffs above 100 keys: {storm:?}");
    let windows = (took.as_millis() / window.as_millis()) as usize + 2;
    assert!(storm.diffs + storm.states <= windows, "{storm:?} in {took:?}: more than one per window");

    // No stale member: one meta per key, each the member's live connection.
    let members: BTreeSet<String> = hub.room_members("lobby").iter().map(|m| m.connection.get().to_string()).collect();
    assert_eq!(members.len() as u64, MEMBERS + 1);
    let entries = hub.presence("lobby").await.unwrap();
    assert_eq!(entries.len() as u64, MEMBERS + 1, "one key per member");
    let mut refs = BTreeSet::new();
    for e in &entries {
        assert_eq!(e.metas.len(), 1, "{} has {} metas: a stale one", e.key, e.metas.len());
        refs.insert(e.metas[0].connection.to_string());
    }
    assert_eq!(refs, members, "each meta is a live connection's");
    // A fresh client is told the same count (in a counts-only room, the
    // current one: its own connection included).
    let mut fresh = support::connect_path(addr, "/?user=fresh").await;
    fresh.join_ok("lobby").await;
    let state = fresh.recv().await;
    assert_eq!(state["type"], "presence_state", "{state}");
    assert_eq!(state["data"], serde_json::json!({"count": {"keys": MEMBERS + 2, "connections": MEMBERS + 2}}));
    drop(rooms);
    join_all(clients.iter().map(Client::close)).await;
    support::eventually("the members are gone", || hub.stats().connections == 2).await;
}
