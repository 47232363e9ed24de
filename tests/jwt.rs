//! JWT authentication end to end (feature `jwt`): tokens of each algorithm,
//! every way a token is refused, where tokens are found, the room claim,
//! expiry (close 4003) and `refresh` before and after it.
//!
//! Expiry on real sockets uses a token that expires within two seconds and
//! waits for the close frame; everything that needs longer spans runs on
//! paused time over the in-memory transport.

mod support;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::time::Duration;
use support::*;
use switchboard::auth::jwt::{unix_now, JwtAuth, JwtClaims, JwtKey, TokenSource};
use switchboard::transport::Handshake;
use switchboard::{hub::HubStats, Call, CallError, Hub, HubConfig};

const SECRET: &[u8] = b"switchboard test secret, 32+ bytes long";

// Test-only keys, generated for this file.
const RSA_PRIVATE: &str = r#"-----BEGIN PRIVATE KEY-----
MIIEvgIBADANBgkqhkiG9w0BAQEFAASCBKgwggSkAgEAAoIBAQD0YgNoxywW5DGH
mty3U1lYIhPDToPOreBlZzXpY707/Eg6nt3oOYDBTpg5L2ketIXvi4guZNSsbXFE
H/QahwnIoPoBGI1JG1wD2/WK1oy+pCNAQ3VIkOIG2VmE109yqivIEreLN5QD0kZt
6WzXE9XICvIIaw+KFviqAtPW8f5XdWxcEnxccH4kE4jVfmxS72XYp+gkmBJ58B9S
DJoVh0Qv8+DREEPxoG8uwgjrzebjCq9wRm9XjkZjh0ppvrr62tdEdsQWLtfODjt9
Cz8HnWepW+r9U+7xgiKJ7bpUlN6irI5KJpI7oXRj/7U20eqKcb8HL23WZe7Prkfu
2mAUFd0RAgMBAAECggEABGXGMccFlu4Eb7Asjpen6E7wXctslv/l1qrUtoW+Z5ye
9B0+9rMMqMZ1NRfDsmld9/A6m84wiOl5aDp/lhVi6oezCTgDMP9bbEuV++5xgXWj
cCLVY/2+NLf17Kd9+pM+bHF6ZR/urMUVNL8fGs7DaYTPrCeRp3o/un7XTJKm+xe5
OFNIA7FvgjqUyRb369QC8ELvEMwuT0uoTcTuthCaZhSzQgOqe5/UDeEd+VEDWWGR
pmGtHPtOapUl7QoxQ/sRUuzi2AXTcAcy5uOJNqi9SastuyKo88UWdDrNaSK+kZ+V
LUvo0OL/LuRpl6Na70Vg6QYtPqz89QMrNQdmMAm2EQKBgQD8mr8Qj8khTibbo6Nm
I/HxISFZu6Uta5f0W05jXn3BaXBtrwvSRg0JcXEppSkHDBniR5T69IKzi85CrxDf
8tpOauZjCr+lT9MJJ35pdspc17GP2FTUxvEw0O9XJ6FTdOiEcggMl/QkDl1Czs2k
0TTcXxHgO7PAnxRmY7Gi4YVYzQKBgQD3qvmceu9wNiuKyM+AAfP0iEwkTRfB/JFl
YbXgkdDA0+aQP+x1KfawF93NqloOOaDG5CShrgvBHusQgUuNx/4MFR0+u6N6wtsy
e21AoCWXy/hmbl3yFK7RnCI3X3rUa7Mqod1f6YyrnT2eQvD+xUaqISAEJLTDzjiu
6/5yE+DlVQKBgQCpn6A9ltAQtVISm0fWBr0oln62qvK4FU/snoN85q67efotLSZb
BP8sIClFNcrfGJkpAbhg7F/4ASF4VeaW+5Tso4whZc5bS8cClqqkV0h8H7r0ROhy
GUVM6oBNnicOy6p3hbsx+bfPnnWxrv0YeANvF8gBMxX5etlQCBH4tke84QKBgQCv
PQ+es7FlYT7P1SRUu40EscfGS7IKtQ2fgVJyUlo1hfl2iXRitk1w7YIoOme79vSW
pehxabexbpH+PK3b5O0RWYM21wdmHieAgaqc9nODA3R/7YmVdyL29xWSvoEnegjs
mlkLuzGoX/qwV0czzRwh1oxTwjEQ9oJO6nY/+2a+fQKBgGu5KxVs0Lad0rBm2BOf
G9FsXnKFmTdRu3cgJU8m2kWsvid/hlKWw1T7Qx6emAwF0tFKCh40yGt5+meY3p4b
ESY4xFzQi+ULKXt43Q6mW4ZXjX50gPFbPNfAWtM4HcmHsQ7CfPCeON8rwShiwZIN
nKn7w6tBvbfZV0UIcRgSMA5k
-----END PRIVATE KEY-----"#;
const RSA_PUBLIC: &str = r#"-----BEGIN PUBLIC KEY-----
MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA9GIDaMcsFuQxh5rct1NZ
WCITw06Dzq3gZWc16WO9O/xIOp7d6DmAwU6YOS9pHrSF74uILmTUrG1xRB/0GocJ
yKD6ARiNSRtcA9v1itaMvqQjQEN1SJDiBtlZhNdPcqoryBK3izeUA9JGbels1xPV
yAryCGsPihb4qgLT1vH+V3VsXBJ8XHB+JBOI1X5sUu9l2KfoJJgSefAfUgyaFYdE
L/Pg0RBD8aBvLsII683m4wqvcEZvV45GY4dKab66+trXRHbEFi7Xzg47fQs/B51n
qVvq/VPu8YIiie26VJTeoqyOSiaSO6F0Y/+1NtHqinG/By9t1mXuz65H7tpgFBXd
EQIDAQAB
-----END PUBLIC KEY-----"#;
const ED_PRIVATE: &str = r#"-----BEGIN PRIVATE KEY-----
MC4CAQAwBQYDK2VwBCIEICl/MdHpsyUch1RSLrtzq2mhusxTJMQgU2VpVjVCClXi
-----END PRIVATE KEY-----"#;
const ED_PUBLIC: &str = r#"-----BEGIN PUBLIC KEY-----
MCowBQYDK2VwAyEAYyadZA5U4wdvqAhrV4no0VcTn19QpU1einWBpDfnZL8=
-----END PUBLIC KEY-----"#;

fn sign(alg: Algorithm, claims: &Value) -> String {
    let key = match alg {
        Algorithm::HS256 => EncodingKey::from_secret(SECRET),
        Algorithm::RS256 => EncodingKey::from_rsa_pem(RSA_PRIVATE.as_bytes()).unwrap(),
        Algorithm::EdDSA => EncodingKey::from_ed_pem(ED_PRIVATE.as_bytes()).unwrap(),
        other => panic!("no test key for {other:?}"),
    };
    jsonwebtoken::encode(&Header::new(alg), claims, &key).unwrap()
}

/// An HS256 token for `sub` expiring `secs` from now (negative: in the past).
fn token(sub: &str, secs: i64) -> String {
    sign(Algorithm::HS256, &json!({"sub": sub, "exp": unix_now() as i64 + secs}))
}

fn auth() -> JwtAuth {
    JwtAuth::new(JwtKey::hs256(SECRET))
        .key(JwtKey::rs256_pem(RSA_PUBLIC).unwrap())
        .key(JwtKey::eddsa_pem(ED_PUBLIC).unwrap())
        .leeway(Duration::ZERO)
}

fn hub_with(auth: JwtAuth, config: HubConfig) -> Hub {
    Hub::builder()
        .config(config)
        .jwt(auth)
        .on("whoami", |call: Call, _: Value| async move {
            let claims = call.identity().data::<JwtClaims>().ok_or_else(|| CallError::internal("no claims"))?;
            Ok(json!({"user": call.user_id(), "role": claims.get("role")}))
        })
        .on("shout", |call: Call, v: Value| async move {
            call.broadcast("tick", &v).await.map_err(|e| CallError::internal(e.to_string()))?;
            Ok(Value::Null)
        })
        .build()
}

fn bearer(t: &str) -> String {
    format!("Bearer {t}")
}

/// A connected, joined client whose events prove nobody else is disturbed.
async fn bystander(addr: SocketAddr) -> Client {
    let t = token("bystander", 3600);
    let mut c = try_connect(addr, "/", &[("authorization", &bearer(&t))]).await.expect("bystander admitted");
    c.join_ok("lobby").await;
    c
}

async fn still_flowing(hub: &Hub, by: &mut Client, seq: u64) {
    hub.publish("lobby", "tick", &json!({ "seq": seq })).await.unwrap();
    let r = by.call_in("lobby", "shout", json!({ "seq": seq + 1 })).await;
    assert_eq!(r["type"], "reply", "{r}");
    for s in [seq, seq + 1] {
        assert_eq!(by.event().await, json!({"type": "event", "room": "lobby", "event": "tick", "data": {"seq": s}}));
    }
}

#[tokio::test]
async fn valid_tokens_of_each_algorithm_become_the_identity() {
    let hub = hub_with(auth(), HubConfig::default());
    let addr = serve(&hub).await;
    for (i, alg) in [Algorithm::HS256, Algorithm::RS256, Algorithm::EdDSA].into_iter().enumerate() {
        let sub = format!("user-{i}");
        let t = sign(alg, &json!({"sub": sub, "exp": unix_now() + 600, "role": "admin"}));
        let mut c = try_connect(addr, "/", &[("authorization", &bearer(&t))]).await.expect("admitted");
        let hello = &c.hello["data"];
        assert_eq!(hello["refresh"], true);
        let left = hello["expires_in_ms"].as_u64().unwrap();
        assert!((590_000..=600_000).contains(&left), "expires_in_ms {left}");
        let me = c.call("whoami", Value::Null).await;
        assert_eq!(me["data"], json!({"user": sub, "role": "admin"}), "{alg:?}");
        // The subject is the user id the hub routes by.
        assert_eq!(hub.send_to_user(&sub, "note", &json!(i)).unwrap(), 1);
        assert_eq!(c.event().await, json!({"type": "event", "event": "note", "data": i}));
    }
}

#[tokio::test]
async fn missing_forged_expired_and_wrong_algorithm_tokens_get_401_before_the_upgrade() {
    let hub = hub_with(auth(), HubConfig::default());
    let standalone = serve(&hub).await;
    let axum = serve_axum(&hub).await;
    let mut by = bystander(standalone).await;
    let now = unix_now();

    let forged = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &json!({"sub": "mallory", "exp": now + 600}),
        &EncodingKey::from_secret(b"not the server's secret, but long enough"),
    )
    .unwrap();
    // The classic confusion: HS256 "signed" with the server's RSA public key.
    let rsa_only = JwtAuth::new(JwtKey::rs256_pem(RSA_PUBLIC).unwrap());
    let confused = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &json!({"sub": "mallory", "exp": now + 600}),
        &EncodingKey::from_secret(RSA_PUBLIC.as_bytes()),
    )
    .unwrap();
    use base64_free::b64;
    let none = format!(
        "{}.{}.",
        b64(r#"{"alg":"none","typ":"JWT"}"#),
        b64(&json!({"sub": "mallory", "exp": now + 600}).to_string())
    );
    let mut tampered = token("ann", 600);
    tampered.insert(tampered.find('.').unwrap() + 2, 'x');
    let cases: Vec<(String, &str)> = vec![
        (token("ann", -3600), "token expired"),
        (forged, "invalid token"),
        (confused.clone(), "invalid token"),
        (none, "invalid token"),
        (tampered, "invalid token"),
        (sign(Algorithm::HS256, &json!({"exp": now + 600})), "invalid token"),
        (sign(Algorithm::HS256, &json!({"sub": "ann"})), "invalid token"),
        (sign(Algorithm::HS256, &json!({"sub": "ann", "exp": now + 600, "rooms": "lobby"})), "invalid token"),
        ("not.a.jwt".into(), "invalid token"),
    ];
    for (addr, path) in [(standalone, "/"), (axum, "/ws")] {
        assert_eq!(refused_with(addr, path, &[]).await, (401, "missing token".into()));
        assert_eq!(refused_with(addr, path, &[("authorization", "Basic abc")]).await, (401, "missing token".into()));
        for (t, why) in &cases {
            assert_eq!(refused_with(addr, path, &[("authorization", &bearer(t))]).await, (401, (*why).into()), "{t}");
        }
    }
    still_flowing(&hub, &mut by, 1).await;
    assert_eq!(hub.stats().connections, 1);
    // The confused token is refused by an RS256-only verifier too.
    let rs = hub_with(rsa_only, HubConfig::default());
    let addr = serve(&rs).await;
    assert_eq!(refused_with(addr, "/", &[("authorization", &bearer(&confused))]).await, (401, "invalid token".into()));
}

/// Base64url without padding, for hand-made tokens.
mod base64_free {
    pub fn b64(s: &str) -> String {
        const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let b = s.as_bytes();
        let mut out = String::new();
        for chunk in b.chunks(3) {
            let n = chunk.iter().enumerate().fold(0u32, |acc, (i, x)| acc | (u32::from(*x) << (16 - 8 * i)));
            for i in 0..=chunk.len() {
                out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
            }
        }
        out
    }
}

#[tokio::test]
async fn tokens_are_found_in_the_header_the_subprotocol_the_query_and_a_cookie() {
    let with_cookie = auth().sources(vec![
        TokenSource::bearer_header(),
        TokenSource::subprotocol(),
        TokenSource::query(),
        TokenSource::cookie("session"),
    ]);
    let hub = hub_with(with_cookie, HubConfig::default());
    let addr = serve(&hub).await;
    let t = token("ann", 600);

    // What browsers do: the real subprotocol, plus the token as an offer.
    let offer = format!("switchboard.v1.json, bearer.{t}");
    let mut req =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(format!("ws://{addr}/"))
            .unwrap();
    req.headers_mut().insert("sec-websocket-protocol", offer.parse().unwrap());
    let (ws, resp) = tokio_tungstenite::connect_async(req).await.expect("subprotocol token admitted");
    assert_eq!(resp.headers()["sec-websocket-protocol"], "switchboard.v1.json", "the token is never echoed");
    let mut c = Client::start(ws).await;
    assert_eq!(c.call("whoami", Value::Null).await["data"]["user"], "ann");

    let mut c = try_connect(addr, &format!("/?access_token={t}"), &[]).await.expect("query token admitted");
    assert_eq!(c.call("whoami", Value::Null).await["data"]["user"], "ann");
    let cookie = format!("theme=dark; session={t}");
    let mut c = try_connect(addr, "/", &[("cookie", &cookie)]).await.expect("cookie token admitted");
    assert_eq!(c.call("whoami", Value::Null).await["data"]["user"], "ann");
    // The first source that has a token decides.
    let bad = format!("/?access_token={}", token("ann", -3600));
    let (status, body) = refused_with(addr, &bad, &[]).await;
    assert_eq!((status, body.as_str()), (401, "token expired"));
    assert!(try_connect(addr, &bad, &[("authorization", &bearer(&t))]).await.is_ok());
}

#[tokio::test]
async fn the_rooms_claim_restricts_joins() {
    let hub = hub_with(auth(), HubConfig::default());
    let addr = serve(&hub).await;
    let mut by = bystander(addr).await;
    let t = sign(Algorithm::HS256, &json!({"sub": "ann", "exp": unix_now() + 600, "rooms": ["lobby", "team:42:*"]}));
    let mut c = try_connect(addr, "/", &[("authorization", &bearer(&t))]).await.unwrap();
    c.join_ok("lobby").await;
    c.join_ok("team:42:chat").await;
    for room in ["team:43:chat", "team:42", "lobby2"] {
        let r = c.join(room).await;
        assert_eq!((r["type"].as_str(), r["code"].as_u64()), (Some("error"), Some(403)), "{room}: {r}");
        assert_eq!(r["message"], "token does not allow this room");
        assert_eq!(hub.room_len(room), 0);
    }
    still_flowing(&hub, &mut by, 1).await;
    // Both members of lobby got the bystander's events.
    assert_eq!(c.event().await["data"]["seq"], 1);
    assert_eq!(c.event().await["data"]["seq"], 2);
    // The host is not restricted by the client's token.
    let id = member_id(&hub, "lobby", c.connection_id());
    hub.join(id, "team:43:chat").await.unwrap();
    assert_eq!(hub.room_len("team:43:chat"), 1);
}

#[tokio::test]
async fn an_expired_session_is_closed_with_4003_and_must_reconnect_with_a_new_token() {
    let hub = hub_with(auth(), HubConfig::default());
    let addr = serve(&hub).await;
    let mut by = bystander(addr).await;
    let t = token("ann", 2);
    let mut c = try_connect(addr, "/", &[("authorization", &bearer(&t))]).await.unwrap();
    c.join_ok("lobby").await;
    assert!(c.hello["data"]["expires_in_ms"].as_u64().unwrap() <= 2000);
    // Waits for the close itself, at most two seconds.
    assert_eq!(expect_close_frame(&mut c.ws).await, Some((4003, "token expired: refresh and reconnect".to_owned())));
    eventually("ann is gone", || hub.stats().connections == 1).await;
    still_flowing(&hub, &mut by, 1).await;
    // A stale token is refused; a fresh one is welcome.
    let stale = token("ann", -1);
    assert_eq!(refused_with(addr, "/", &[("authorization", &bearer(&stale))]).await, (401, "token expired".into()));
    let mut c = try_connect(addr, "/", &[("authorization", &bearer(&token("ann", 600)))]).await.unwrap();
    assert_eq!(c.call("whoami", Value::Null).await["data"]["user"], "ann");
}

fn handshake_with(t: &str) -> Handshake {
    let mut headers = http::HeaderMap::new();
    headers.insert("authorization", bearer(t).parse().unwrap());
    Handshake::new().with_headers(headers)
}

#[tokio::test]
async fn refresh_before_expiry_keeps_the_session_and_a_failed_refresh_changes_nothing() {
    tokio::time::pause();
    let hub = hub_with(auth(), HubConfig::default().heartbeat_interval(Duration::ZERO));
    let mut c = MemClient::connect(&hub, handshake_with(&token("ann", 60))).await.unwrap();
    let left = c.hello["data"]["expires_in_ms"].as_u64().unwrap();
    assert!((59_000..=60_000).contains(&left), "{left}");

    // Refusals, each with its code; the connection keeps its old expiry.
    let cases = [
        (json!({"type": "refresh", "ref": 1, "data": {"token": "garbage"}}), 401, "invalid token"),
        (json!({"type": "refresh", "ref": 2, "data": {"token": token("ann", -600)}}), 401, "token expired"),
        (json!({"type": "refresh", "ref": 3, "data": {"token": token("bob", 3600)}}), 403, "token is for another user"),
        (json!({"type": "refresh", "ref": 4}), 400, "`refresh` needs `data: {\"token\": \"…\"}`"),
        (json!({"type": "refresh", "ref": 5, "data": {"jwt": "x"}}), 400, "`refresh` needs `data: {\"token\": \"…\"}`"),
    ];
    for (msg, code, text) in cases {
        let r = msg["ref"].clone();
        c.send(msg).await;
        assert_eq!(c.recv().await, json!({"type": "error", "ref": r, "code": code, "message": text}));
    }

    // A good refresh 30 s before expiry: the reply gives the new lifetime.
    tokio::time::advance(Duration::from_secs(30)).await;
    c.send(json!({"type": "refresh", "ref": 6, "data": {"token": token("ann", 3600)}})).await;
    let r = c.recv().await;
    assert_eq!((r["type"].as_str(), r["ref"].as_u64()), (Some("reply"), Some(6)), "{r}");
    let left = r["data"]["expires_in_ms"].as_u64().unwrap();
    assert!((3_599_000..=3_600_000).contains(&left), "{left}");
    // Past the old expiry: still open.
    tokio::time::advance(Duration::from_secs(120)).await;
    c.send(json!({"type": "ping", "ref": 7})).await;
    assert_eq!(c.recv().await, json!({"type": "pong", "ref": 7}));
    // Past the new one: closed with 4003.
    tokio::time::advance(Duration::from_secs(3600)).await;
    assert_eq!(c.closed().await, Some(4003));
    eventually("gone", || hub.stats() == HubStats::default()).await;
}

#[tokio::test]
async fn without_a_refresh_the_old_expiry_holds_and_refresh_comes_too_late_after_it() {
    tokio::time::pause();
    let hub = hub_with(auth(), HubConfig::default().heartbeat_interval(Duration::ZERO));
    let mut c = MemClient::connect(&hub, handshake_with(&token("ann", 60))).await.unwrap();
    // A failed refresh does not extend anything.
    c.send(json!({"type": "refresh", "ref": 1, "data": {"token": token("ann", -1)}})).await;
    assert_eq!(c.recv().await["code"], 401);
    tokio::time::advance(Duration::from_secs(61)).await;
    assert_eq!(c.closed().await, Some(4003));
    // A refresh after the expiry reaches a closed connection: nothing answers.
    let late = json!({"type": "refresh", "ref": 2, "data": {"token": token("ann", 3600)}});
    let _ = c.peer.send(switchboard::transport::Frame::Text(late.to_string().into())).await;
    assert!(!matches!(c.recv_frame().await, Some(switchboard::transport::Frame::Text(_))));
    eventually("gone", || hub.stats() == HubStats::default()).await;

    // A hub without a refresh hook says so.
    let plain = Hub::builder().config(HubConfig::default().heartbeat_interval(Duration::ZERO)).build();
    let mut c = MemClient::connect(&plain, Handshake::new()).await.unwrap();
    assert!(c.hello["data"].get("refresh").is_none());
    assert!(c.hello["data"].get("expires_in_ms").is_none());
    c.send(json!({"type": "refresh", "ref": 1, "data": {"token": "t"}})).await;
    assert_eq!(
        c.recv().await,
        json!({"type": "error", "ref": 1, "code": 400, "message": "this server does not accept `refresh`"})
    );
}
