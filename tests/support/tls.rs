//! TLS for the tests: a certificate authority and a server certificate for
//! `localhost` and `127.0.0.1`, made at run time with rcgen (no key is ever
//! committed), and servers that speak WSS with them.

use super::Io;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use switchboard::Hub;
use tokio::net::TcpListener;

/// A CA and one certificate it signed.
pub struct Pki {
    /// The CA's certificate (what clients trust).
    pub ca: CertificateDer<'static>,
    pub ca_pem: String,
    /// The leaf: its chain (leaf only) and key, in DER and PEM.
    pub cert: CertificateDer<'static>,
    pub cert_pem: String,
    pub key_pem: String,
    key_der: Vec<u8>,
}

impl Pki {
    /// A new CA named `ca_name` and a certificate for `names` signed by it.
    pub fn new(ca_name: &str, names: &[&str]) -> Pki {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, ca_name);
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        let key = KeyPair::generate().unwrap();
        let mut leaf = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
        leaf.distinguished_name.push(DnType::CommonName, names[0]);
        let cert = leaf.signed_by(&key, &ca).unwrap();
        Pki {
            ca: ca.der().clone(),
            ca_pem: ca.pem(),
            cert: cert.der().clone(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            key_der: key.serialize_der(),
        }
    }

    pub fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()))
    }

    /// A server configuration presenting this certificate, offering `alpn`.
    pub fn server_config(&self, alpn: &[&[u8]]) -> Arc<rustls::ServerConfig> {
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![self.cert.clone()], self.key())
            .unwrap();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    }

    /// A client configuration trusting this CA only.
    pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca.clone()).unwrap();
        Arc::new(
            rustls::ClientConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth(),
        )
    }

    /// Writes `cert.pem` and `key.pem` into a new temporary directory
    /// (removed with the returned guard) for a process to read.
    pub fn write_pem(&self) -> TempDir {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("switchboard-tls-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("cert.pem"), &self.cert_pem).unwrap();
        std::fs::write(dir.join("key.pem"), &self.key_pem).unwrap();
        TempDir(dir)
    }
}

/// A directory removed on drop.
pub struct TempDir(pub std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The process's test PKI: a CA and a certificate for `localhost` and
/// `127.0.0.1`.
pub fn pki() -> &'static Pki {
    static PKI: OnceLock<Pki> = OnceLock::new();
    PKI.get_or_init(|| Pki::new("switchboard test CA", &["localhost", "127.0.0.1"]))
}

/// Serves `hub` at `/` over HTTPS/WSS (`integration::axum::serve` with
/// TLS) on `listener`, until the hub starts shutting down.
pub fn serve_hub(listener: TcpListener, hub: &Hub) {
    use std::future::IntoFuture;
    let app = axum::Router::new().route("/", switchboard::integration::axum::route(hub.clone()));
    let config = switchboard::integration::axum::ServeConfig::default().tls(pki().server_config(&[b"http/1.1"]));
    let server =
        switchboard::integration::axum::serve(listener, app, config).with_graceful_shutdown(hub.shutdown_started());
    tokio::spawn(server.into_future());
}

/// [`serve_hub`] on a free loopback port.
pub async fn serve(hub: &Hub) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    serve_hub(listener, hub);
    addr
}

/// Runs the server side of a TLS handshake on `tcp` with the test
/// certificate.
pub async fn accept(tcp: tokio::net::TcpStream) -> std::io::Result<Box<dyn Io>> {
    static ACCEPTOR: OnceLock<tokio_rustls::TlsAcceptor> = OnceLock::new();
    let acceptor = ACCEPTOR.get_or_init(|| tokio_rustls::TlsAcceptor::from(pki().server_config(&[b"http/1.1"])));
    Ok(Box::new(acceptor.accept(tcp).await?))
}
