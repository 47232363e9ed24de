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
