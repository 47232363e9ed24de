//! The metrics a host scrapes (feature `metrics`), read as an operator reads
//! them: the `chat` example runs with `--metrics`, real WebSocket clients
//! connect, join, call, get refused, lag and leave, and `/metrics` is
//! scraped over HTTP before and after each step. Each metric must move by
//! exactly what the step did. Run alone, build the examples first:
//! `cargo build --examples --all-features`.

mod support;

use futures::StreamExt;
use serde_json::json;
use std::collections::HashMap;
use std::net::SocketAddr;
use support::examples::Running;
use support::Client;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::MaybeTlsStream;

/// One scrape: every series (`name{labels}` as printed) and its value.
#[derive(Debug, Clone, Default)]
struct Scrape(HashMap<String, f64>);

impl Scrape {
    /// The value of `name` with exactly the labels `labels` (any order);
    /// 0 when the series does not exist yet.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let mut want: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
        want.sort();
        self.0
            .iter()
            .find(|(series, _)| {
                let (n, l) = match series.split_once('{') {
                    Some((n, l)) => (n, l.trim_end_matches('}')),
                    None => (series.as_str(), ""),
                };
                let mut have: Vec<String> =
                    if l.is_empty() { Vec::new() } else { l.split(',').map(str::to_owned).collect() };
                have.sort();
                n == name && have == want
            })
            .map_or(0.0, |(_, v)| *v)
    }

    /// The sum of every series of `name`, whatever its labels.
    fn total(&self, name: &str) -> f64 {
        self.0.iter().filter(|(s, _)| s.split('{').next() == Some(name)).map(|(_, v)| v).sum()
    }

    /// How much `name{labels}` moved since `before`.
    fn moved(&self, before: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels) - before.get(name, labels)
    }
}

/// GETs `/metrics` over a plain socket (HTTP/1.1, one request).
async fn scrape(addr: SocketAddr) -> Scrape {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect to /metrics");
    s.write_all(b"GET /metrics HTTP/1.1\r\nhost: metrics\r\nconnection: close\r\n\r\n").await.unwrap();
    let mut body = String::new();
    tokio::time::timeout(support::WAIT, s.read_to_string(&mut body)).await.expect("scrape in time").unwrap();
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    Scrape::parse(body.split_once("\r\n\r\n").expect("a body").1)
}

impl Scrape {
    /// The Prometheus text format, one series a line.
    fn parse(text: &str) -> Scrape {
        let mut series = HashMap::new();
        for line in text.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
            let (name, value) = line.rsplit_once(' ').expect("`series value`");
            series.insert(name.to_owned(), value.parse().unwrap_or_else(|_| panic!("a number: {line}")));
        }
        Scrape(series)
    }
}

/// Scrapes until `ready` holds (the server finishes a disconnect after the
/// client saw its close frame); fails after [`support::WAIT`].
async fn scrape_until(addr: SocketAddr, ready: impl Fn(&Scrape) -> bool) -> Scrape {
    let deadline = tokio::time::Instant::now() + support::WAIT;
    loop {
        let s = scrape(addr).await;
        if ready(&s) {
            return s;
        }
        assert!(tokio::time::Instant::now() < deadline, "the metrics never got there: {s:#?}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// The `host:port` in a "... http://HOST:PORT/..." line.
fn addr_in(line: &str) -> SocketAddr {
    let rest = line.split("http://").nth(1).expect("a URL");
    rest.split('/').next().unwrap().parse().expect("an address")
}

const WS: [(&str, &str); 1] = [("transport", "websocket")];

async fn join(c: &mut Client, room: &str) {
    c.join_ok(room).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_step_moves_its_metrics_by_exactly_what_it_did() {
    let mut chat = Running::spawn("chat", &["--addr", "127.0.0.1:0", "--metrics", "127.0.0.1:0"], &[]);
    let m = addr_in(&chat.line_with("chat metrics on").await);
    let addr = addr_in(&chat.line_with("listening on").await);

    // Connect: one connection, one hello.
    let s0 = scrape(m).await;
    let mut ann = support::connect_path(addr, "/ws?name=ann").await;
    let s1 = scrape(m).await;
    assert_eq!(s1.moved(&s0, "switchboard_connects_total", &WS), 1.0);
    assert_eq!(s1.moved(&s0, "switchboard_connections", &WS), 1.0);
    assert_eq!(s1.moved(&s0, "switchboard_users", &[]), 1.0);
    assert_eq!(s1.moved(&s0, "switchboard_messages_out_total", &[("type", "hello")]), 1.0);

    // Join: one message in, one room, one member.
    let joined = ann.join("lobby").await;
    assert_eq!(joined["type"], "reply", "{joined}");
    let (epoch, offset) = (joined["data"]["epoch"].clone(), joined["data"]["offset"].clone());
    let s2 = scrape(m).await;
    assert_eq!(s2.moved(&s1, "switchboard_messages_in_total", &[("type", "join")]), 1.0);
    assert_eq!(s2.moved(&s1, "switchboard_rooms", &[]), 1.0);
    assert_eq!(s2.moved(&s1, "switchboard_room_members", &[]), 1.0);

    // Call: one handler run, one broadcast fanned out to the one member
    // (the caller: `broadcast` includes it), one reply; a refused call is
    // an error by its code.
    let r = ann.call_in("lobby", "message", json!({ "text": "hello" })).await;
    assert_eq!(r["type"], "reply", "{r}");
    ann.event().await;
    let r = ann.call_in("lobby", "message", json!({ "text": "  " })).await;
    assert_eq!(r["code"], 400, "{r}");
    let s3 = scrape(m).await;
    assert_eq!(s3.moved(&s2, "switchboard_messages_in_total", &[("type", "call")]), 2.0);
    assert_eq!(s3.moved(&s2, "switchboard_call_duration_seconds_count", &[("outcome", "ok")]), 1.0);
    assert_eq!(s3.moved(&s2, "switchboard_call_duration_seconds_count", &[("outcome", "error")]), 1.0);
    assert_eq!(s3.moved(&s2, "switchboard_call_errors_total", &[("code", "400")]), 1.0);
    assert_eq!(s3.moved(&s2, "switchboard_publish_fanout_seconds_count", &[]), 1.0);
    assert_eq!(s3.moved(&s2, "switchboard_messages_out_total", &[("type", "event")]), 1.0);
    assert_eq!(s3.moved(&s2, "switchboard_messages_out_total", &[("type", "reply")]), 1.0);
    assert_eq!(s3.moved(&s2, "switchboard_messages_out_total", &[("type", "error")]), 1.0);
    assert!(s3.moved(&s2, "switchboard_bytes_out_total", &[]) > 0.0);

    // Recovery: carol joins lobby from before ann's message (recovered, one
    // event replayed), then a room from an epoch it never had (not
    // recovered), and leaves.
    let mut carol = support::connect_path(addr, "/ws?name=carol").await;
    let r = carol.request(json!({ "type": "join", "room": "lobby", "epoch": epoch, "offset": offset })).await;
    assert_eq!(r["data"]["recovered"], true, "{r}");
    carol.event().await;
    let r = carol.request(json!({ "type": "join", "room": "archive", "epoch": "gone", "offset": 5 })).await;
    assert_eq!(r["data"]["recovered"], false, "{r}");
    let s3r = scrape(m).await;
    assert_eq!(s3r.moved(&s3, "switchboard_recoveries_total", &[("outcome", "recovered")]), 1.0);
    assert_eq!(s3r.moved(&s3, "switchboard_recoveries_total", &[("outcome", "not_recovered")]), 1.0);
    assert_eq!(s3r.moved(&s3, "switchboard_replayed_events_total", &[]), 1.0);
    assert_eq!(s3r.moved(&s3, "switchboard_messages_out_total", &[("type", "event")]), 1.0);
    carol.ws.close(None).await.unwrap();
    while carol.ws.next().await.is_some() {}
    let closed = [("transport", "websocket"), ("reason", "client_closed"), ("code", "")];
    let s3 = scrape_until(m, |s| s.moved(&s3r, "switchboard_disconnects_total", &closed) == 1.0).await;
    assert_eq!(s3.moved(&s3r, "switchboard_rooms", &[]), -1.0, "archive is gone, lobby stays");

    // Refused handshakes: a foreign origin (403), no name (the
    // authenticator's 400). Neither is a connection.
    let mut req = format!("ws://{addr}/ws?name=eve").into_client_request().unwrap();
    req.headers_mut().insert("origin", "http://evil.example".parse().unwrap());
    let err = tokio_tungstenite::connect_async(req).await.expect_err("a foreign origin is refused");
    assert!(err.to_string().contains("403"), "{err}");
    let err = tokio_tungstenite::connect_async(format!("ws://{addr}/ws")).await.expect_err("no name");
    assert!(err.to_string().contains("400"), "{err}");
    let s4 = scrape(m).await;
    assert_eq!(s4.moved(&s3, "switchboard_handshake_refusals_total", &[("reason", "origin")]), 1.0);
    assert_eq!(s4.moved(&s3, "switchboard_handshake_refusals_total", &[("reason", "auth")]), 1.0);
    assert_eq!(s4.moved(&s3, "switchboard_connects_total", &WS), 0.0);

    // Over the message rate (50/s, burst 200): pings until one is refused
    // with 420. Every refusal the client saw is counted, and only those.
    let mut bob = support::connect_path(addr, "/ws?name=bob").await;
    let s5 = scrape(m).await;
    let (mut answered, mut refused) = (0u64, 0u64);
    while refused == 0 {
        assert!(answered < 2000, "never refused over the rate");
        let batch = if answered == 0 { 200 } else { 4 };
        for i in 0..batch {
            bob.send(json!({ "type": "ping", "ref": answered + i + 1 })).await;
        }
        for _ in 0..batch {
            let v = bob.recv().await;
            match v["type"].as_str() {
                Some("pong") => {}
                Some("error") => {
                    assert_eq!(v["code"], 420, "{v}");
                    refused += 1;
                }
                _ => panic!("{v}"),
            }
        }
        answered += batch;
    }
    let s6 = scrape(m).await;
    assert_eq!(s6.moved(&s5, "switchboard_rate_limited_total", &[("limit", "messages")]), refused as f64);
    assert_eq!(s6.moved(&s5, "switchboard_messages_in_total", &[("type", "ping")]), (answered - refused) as f64);
    assert_eq!(s6.moved(&s5, "switchboard_messages_out_total", &[("type", "pong")]), (answered - refused) as f64);
    assert_eq!(s6.total("switchboard_disconnects_total") - s5.total("switchboard_disconnects_total"), 0.0, "bob stays");

    // Lag: a reader with a small socket buffer stops reading while four
    // senders fill its 1 MiB queue; it is closed with 4000 and its queue's
    // peak (at most the bound) is recorded.
    let slow_socket = tokio::net::TcpSocket::new_v4().unwrap();
    slow_socket.set_recv_buffer_size(4096).unwrap();
    let stream = slow_socket.connect(addr).await.unwrap();
    let (ws, _) = tokio_tungstenite::client_async(format!("ws://{addr}/ws?name=slow"), MaybeTlsStream::Plain(stream))
        .await
        .expect("connect");
    let mut slow = Client::start(ws).await;
    join(&mut slow, "busy").await;
    let mut senders = Vec::new();
    for i in 0..4 {
        let mut c = support::connect_path(addr, &format!("/ws?name=sender{i}")).await;
        join(&mut c, "busy").await;
        senders.push(c);
    }
    let s7 = scrape(m).await;
    // The senders call until the slow reader is dropped from the room
    // (its queue overflowed: how much that takes depends on the kernel's
    // socket buffers, so they go on until it happens). Messages of 2,000
    // four-byte characters: 8 KB each. Each sender reads everything that
    // comes meanwhile, so none of them lags too.
    let text = "\u{1d11e}".repeat(2000);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for mut c in senders {
        let (text, stop) = (text.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut calls = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let r = c.call_in("busy", "message", json!({ "text": text })).await;
                assert_eq!(r["type"], "reply", "{r}");
                calls += 1;
            }
            (c, calls)
        }));
    }
    let members = s7.get("switchboard_room_members", &[]);
    scrape_until(m, |s| s.get("switchboard_room_members", &[]) == members - 1.0).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert_eq!(slow.closed().await, Some(4000), "the slow reader is closed as a slow consumer");
    let mut senders = Vec::new();
    let mut calls = 0;
    for t in tasks {
        let (c, n) = t.await.unwrap();
        senders.push(c);
        calls += n;
    }
    let s8 = scrape_until(m, |s| s.moved(&s7, "switchboard_disconnects_total", &slow_labels()) == 1.0).await;
    assert_eq!(s8.moved(&s7, "switchboard_connections", &WS), -1.0);
    assert_eq!(s8.moved(&s7, "switchboard_outbound_queue_peak_bytes_count", &[]), 1.0);
    // The queue filled up to within one message of its 1 MiB bound.
    let peak = s8.moved(&s7, "switchboard_outbound_queue_peak_bytes_sum", &[]);
    assert!((1024.0 * 1024.0 - 9000.0..=1024.0 * 1024.0).contains(&peak), "{peak}");
    assert_eq!(s8.moved(&s7, "switchboard_call_duration_seconds_count", &[("outcome", "ok")]), calls as f64);
    assert_eq!(s8.moved(&s7, "switchboard_publish_fanout_seconds_count", &[]), calls as f64);

    // Disconnect: ann closes; one client close, one connection and one
    // member fewer.
    ann.ws.close(None).await.unwrap();
    while ann.ws.next().await.is_some() {}
    let s9 = scrape_until(m, |s| s.moved(&s8, "switchboard_disconnects_total", &closed) == 1.0).await;
    assert_eq!(s9.moved(&s8, "switchboard_connections", &WS), -1.0);
    assert_eq!(s9.moved(&s8, "switchboard_rooms", &[]), -1.0, "lobby is gone");
    assert_eq!(s9.moved(&s8, "switchboard_room_members", &[]), -1.0);
    assert_eq!(s9.moved(&s8, "switchboard_disconnects_total", &slow_labels()), 0.0);

    // Totals agree with the gauges: 8 connected (ann, carol, bob, slow, 4
    // senders), 3 gone.
    assert_eq!(s9.moved(&s0, "switchboard_connects_total", &WS), 8.0);
    assert_eq!(s9.moved(&s0, "switchboard_connections", &WS), 5.0);
    drop((bob, senders));
    chat.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(chat.exit_code().await, Some(0));
}

fn slow_labels() -> [(&'static str, &'static str); 3] {
    [("transport", "websocket"), ("reason", "slow_consumer"), ("code", "4000")]
}

/// Without the exporter's feature the flag is refused, not ignored: see
/// `examples/chat/main.rs`. With it, an unparsable address is a usage error.
#[tokio::test]
async fn a_bad_metrics_address_is_a_usage_error() {
    let (code, _, err) = support::examples::run("chat", &["--metrics", "nowhere"], &[], support::WAIT).await;
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--metrics nowhere"), "{err}");
}

/// Call-level tracing for one user (`docs/operations.md`, "Tracing"): with
/// the filter `warn,switchboard[connection{user=ann}]=debug`, ann's calls
/// are logged inside her connection's and the call's spans, and bob's
/// calls in the same room are not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_users_calls_are_traced_in_their_spans_and_no_one_elses() {
    let filter = "warn,switchboard[connection{user=ann}]=debug";
    let (mut chat, line) =
        Running::start("chat", &["--addr", "127.0.0.1:0"], &[("RUST_LOG", filter)], "listening on").await;
    let addr = addr_in(&line);
    let mut bob = support::connect_path(addr, "/ws?name=bob").await;
    join(&mut bob, "lobby").await;
    let r = bob.call_in("lobby", "message", json!({ "text": "from bob" })).await;
    assert_eq!(r["type"], "reply", "{r}");
    let mut ann = support::connect_path(addr, "/ws?name=ann").await;
    join(&mut ann, "lobby").await;
    let r = ann.call_in("lobby", "message", json!({ "text": "from ann" })).await;
    assert_eq!(r["type"], "reply", "{r}");
    let answered = chat.line_with("call answered").await;
    for field in [
        "connection{",
        "user=",
        "ann",
        "transport=",
        "websocket",
        "peer=127.0.0.1:",
        "call{",
        "event=",
        "message",
        "ref=",
        "room=",
        "lobby",
    ] {
        assert!(answered.contains(field), "{field:?} in {answered:?}");
    }
    chat.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(chat.exit_code().await, Some(0));
    while let Ok(line) = chat.lines.try_recv() {
        chat.seen.push(line);
    }
    let traced: Vec<&String> = chat.seen.iter().filter(|l| l.contains("call answered")).collect();
    assert_eq!(traced.len(), 1, "only ann's call: {:#?}", chat.seen);
    assert!(!chat.seen.iter().any(|l| l.contains("bob")), "nothing of bob's: {:#?}", chat.seen);
}

/// The notices a writer makes itself are messages out too (issue 17): under
/// the drop-oldest policy a reader of a recoverable room that stops reading
/// is told `lagged` (how many were dropped) and each lost offset range as a
/// `gap`; each notice it receives is counted once in
/// `switchboard_messages_out_total` by its type, and the drops in
/// `switchboard_lagged_dropped_total`. In this process, with this test
/// binary's own Prometheus recorder (the other tests here scrape the chat
/// example's); the counters are the hub's tally, published by `sample`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lagged_and_gap_notices_are_counted_as_messages_out() {
    use switchboard::history::{HistoryConfig, MemoryHistory, RoomHistory};
    use switchboard::hub::OverflowPolicy;
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .expect("the only recorder of this test binary");
    switchboard::metrics::describe();
    const BOUND: usize = 64 * 1024;
    let config = switchboard::HubConfig::default().outbound_queue_bytes(BOUND).overflow(OverflowPolicy::DropOldest);
    let hub = switchboard::Hub::builder()
        .config(config)
        .history(MemoryHistory::new(), HistoryConfig::default().rooms("", RoomHistory::default().max_len(100_000)))
        .build();
    let addr = support::serve(&hub).await;
    let mut slow = support::connect(addr).await;
    slow.join_ok("r").await;
    let conn = hub.connection(support::member_id(&hub, "r", slow.connection_id())).unwrap();
    let scraped = |hub: &switchboard::Hub| {
        switchboard::metrics::sample(hub);
        Scrape::parse(&handle.render())
    };
    let before = scraped(&hub);

    // The client reads nothing until the oldest queued events were dropped
    // (socket buffers, then the 64 KiB queue), and 20 events more.
    let end_offset = support::publish_until_dropped(&hub, "r", &conn).await;

    // Everything comes before `end`: the writer sends its notices ahead of
    // the data of the same batch.
    let (mut gaps, mut lagged, mut dropped) = (0u64, 0u64, 0u64);
    loop {
        let m = slow.recv().await;
        match m["type"].as_str().unwrap() {
            "event" if m["offset"].as_u64() == Some(end_offset) => break,
            "event" => {}
            "gap" => gaps += 1,
            "lagged" => {
                lagged += 1;
                dropped += m["data"]["dropped"].as_u64().unwrap();
            }
            other => panic!("unexpected {other}: {m}"),
        }
    }
    assert!(gaps > 0 && lagged > 0, "drops happened but were not told: {gaps} gaps, {lagged} lagged");
    assert_eq!(dropped, conn.dropped_messages());
    let after = scraped(&hub);
    let out = "switchboard_messages_out_total";
    assert_eq!(after.moved(&before, out, &[("type", "gap")]), gaps as f64);
    assert_eq!(after.moved(&before, out, &[("type", "lagged")]), lagged as f64);
    assert_eq!(after.moved(&before, "switchboard_lagged_dropped_total", &[]), dropped as f64);
    // Every event was queued once (dropped ones included): one recipient.
    assert_eq!(after.moved(&before, out, &[("type", "event")]), end_offset as f64);
    assert!(after.moved(&before, "switchboard_bytes_out_total", &[]) > 0.0);
}
