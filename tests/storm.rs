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
use std::path::Path;
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
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let run = tokio::process::Command::new("node")
        .arg("--experimental-websocket")
        .arg("js/test/e2e/storm.mjs")
        .arg(format!("ws://{addr}/ws"))
        .current_dir(root)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(90), run)
        .await
        .expect("node js/test/e2e/storm.mjs did not finish")
        .expect("`node` must be on PATH");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("js storm test passed"),
        "js storm test failed ({})\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}",
        out.status
    );
    print!("{stdout}");
    support::eventually("the script's connections are gone", || hub.stats().admitted == 0).await;
}
