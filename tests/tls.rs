//! TLS (issue 20): the Rust client's whole suite (`tests/client.rs`) once
//! more over `wss://` (module `suite`), and what only TLS has: certificate
//! errors that stop the client, private CAs and client certificates through
//! `ClientConfig::tls`. (Compression over `wss://`: `tests/deflate.rs`.)

#[path = "client.rs"]
mod suite;

use std::sync::Arc;
use suite::support::{self, tls::pki, WAIT};
use switchboard::client::{Client, ClientConfig, Disconnect, Status};
use switchboard::Hub;
use tokio::net::TcpListener;

async fn closed_reason(client: &Client) -> Disconnect {
    let mut rx = client.status();
    let s =
        tokio::time::timeout(WAIT, rx.wait_for(|s| s.is_closed())).await.expect("a terminal status").unwrap().clone();
    match s {
        Status::Closed { reason } => reason,
        _ => unreachable!(),
    }
}

/// A server whose certificate the client does not trust (its roots are
/// Mozilla's, the test CA is not among them): the client stops at once,
/// `Closed` with a TLS reason naming the problem, and never retries.
#[tokio::test]
async fn an_untrusted_certificate_is_terminal() {
    let hub = Hub::builder().build();
    let addr = support::tls::serve(&hub).await;
    let client = Client::builder(format!("wss://{addr}/")).connect().unwrap();
    let reason = closed_reason(&client).await;
    assert!(matches!(&reason, Disconnect::Tls(m) if m.contains("UnknownIssuer")), "{reason:?}");
    assert!(!reason.should_reconnect());
    assert!(reason.to_string().starts_with("TLS failed: "), "{reason}");
    assert_eq!(hub.stats().connections, 0);
}

/// A certificate for another name, from a trusted CA: terminal too.
#[tokio::test]
async fn a_certificate_for_another_name_is_terminal() {
    let other = support::tls::Pki::new("other CA", &["example.test"]);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = other.server_config(&[b"http/1.1"]);
    tokio::spawn(async move {
        let acceptor = tokio_rustls::TlsAcceptor::from(server);
        while let Ok((tcp, _)) = listener.accept().await {
            let _ = acceptor.accept(tcp).await;
        }
    });
    let client = Client::builder(format!("wss://{addr}/"))
        .config(ClientConfig::default().tls(other.client_config()))
        .connect()
        .unwrap();
    let reason = closed_reason(&client).await;
    assert!(matches!(&reason, Disconnect::Tls(m) if m.contains("not valid for name")), "{reason:?}");
}

/// A server that requires client certificates from a private CA: a client
/// configured with one (`ClientConfig::tls`) connects and works; one
/// without is refused by the server, and that refusal is terminal.
#[tokio::test]
async fn client_certificates_from_a_private_ca() {
    let clients = support::tls::Pki::new("client CA", &["client.test"]);
    let mut roots = rustls::RootCertStore::empty();
    roots.add(clients.ca.clone()).unwrap();
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), support::tls::provider())
            .build()
            .unwrap();
    let server = rustls::ServerConfig::builder_with_provider(support::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![pki().cert.clone()], pki().key())
        .unwrap();
    let hub = Hub::builder().on("echo", |_: switchboard::Call, v: serde_json::Value| async move { Ok(v) }).build();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new().route("/", switchboard::integration::axum::route(hub.clone()));
    let config = switchboard::integration::axum::ServeConfig::default().tls(Arc::new(server));
    tokio::spawn(std::future::IntoFuture::into_future(switchboard::integration::axum::serve(listener, app, config)));

    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki().ca.clone()).unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(support::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let with_cert = builder.clone().with_client_auth_cert(vec![clients.cert.clone()], clients.key()).unwrap();
    let client = Client::builder(format!("wss://localhost:{}/", addr.port()))
        .config(ClientConfig::default().tls(Arc::new(with_cert)).call_timeout(WAIT))
        .connect()
        .unwrap();
    let back: serde_json::Value =
        tokio::time::timeout(WAIT, client.call("echo", &serde_json::json!({"a": 1}))).await.unwrap().unwrap();
    assert_eq!(back, serde_json::json!({"a": 1}));

    let without = Client::builder(format!("wss://localhost:{}/", addr.port()))
        .config(ClientConfig::default().tls(Arc::new(builder.with_no_client_auth())))
        .connect()
        .unwrap();
    let reason = closed_reason(&without).await;
    assert!(matches!(&reason, Disconnect::Tls(m) if m.contains("CertificateRequired")), "{reason:?}");
    client.close().await;
}

/// A `GET` over HTTPS trusting the test CA: the status line and everything
/// read until `until` appears in it (or the server closes).
async fn https_get(addr: std::net::SocketAddr, path: &str, until: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(pki().client_config());
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = connector.connect(name, tcp).await.expect("TLS handshake with the example");
    let req = format!("GET {path} HTTP/1.1\r\nHost: localhost:{}\r\nConnection: close\r\n\r\n", addr.port());
    tls.write_all(req.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains(until) {
        match tokio::time::timeout(WAIT, tls.read(&mut buf)).await.expect("the example answers") {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

/// Starts example `name` with `--tls-cert` and `--tls-key` (the test
/// certificate, written for it), checks that it says `https://` and serves
/// its page over HTTPS; returns it, its address and the PEM files' guard.
async fn start_with_tls(name: &str) -> (support::examples::Running, std::net::SocketAddr, support::tls::TempDir) {
    let dir = pki().write_pem();
    let (cert, key) = (dir.0.join("cert.pem"), dir.0.join("key.pem"));
    let args = ["--addr", "127.0.0.1:0", "--tls-cert", cert.to_str().unwrap(), "--tls-key", key.to_str().unwrap()];
    let (running, line) = support::examples::Running::start(name, &args, &[], "listening on").await;
    assert!(line.contains("https://"), "{line}");
    let addr = support::examples::listening_addr(&line);
    let page = https_get(addr, "/", "</html>").await;
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    (running, addr, dir)
}

/// `chat --tls-cert --tls-key` with a certificate made here: the page over
/// HTTPS, and the Rust client over WSS (join, say, hear it back).
#[tokio::test]
async fn the_chat_example_serves_https_and_wss() {
    let (_chat, addr, _pem) = start_with_tls("chat").await;

    let config = ClientConfig::default().tls(pki().client_config()).call_timeout(WAIT);
    let client =
        Client::builder(format!("wss://localhost:{}/ws?name=ann", addr.port())).config(config).connect().unwrap();
    let room = tokio::time::timeout(WAIT, client.join("lobby")).await.unwrap().unwrap();
    let ok: serde_json::Value =
        tokio::time::timeout(WAIT, room.call("message", &serde_json::json!({"text": "over tls"})))
            .await
            .unwrap()
            .unwrap();
    assert_eq!(ok, serde_json::json!({"ok": true}));
    let heard = async {
        loop {
            if let switchboard::client::RoomEvent::Event(e) = room.recv().await.expect("room stream") {
                if e.decode::<serde_json::Value>().unwrap().to_string().contains("over tls") {
                    return;
                }
            }
        }
    };
    tokio::time::timeout(WAIT, heard).await.expect("the chat line comes back over wss://");
    client.close().await;
}

/// `dashboard --tls-cert --tls-key`: the page and a live SSE stream over
/// HTTPS.
#[tokio::test]
async fn the_dashboard_example_serves_https_and_sse() {
    let (_dashboard, addr, _pem) = start_with_tls("dashboard").await;
    // The first sample comes within a second of the start.
    let stream = https_get(addr, "/events?room=metrics", "sample").await;
    assert!(stream.starts_with("HTTP/1.1 200") && stream.contains("text/event-stream"), "{stream}");
    assert!(stream.contains("data:") && stream.contains("sample"), "{stream}");
}
