//! `wss://`: TLS on rustls (feature `tls`) under the client's own
//! WebSocket handshake and frame reader, so `wss://` gets what `ws://` has
//! (`permessage-deflate` included).
//!
//! - The rustls configuration is [`ClientConfig::tls`](super::ClientConfig::tls)
//!   when set (private CAs, client certificates), else one built once per
//!   process from the roots the features select: `tls-native-roots` (the
//!   platform's store) and/or `tls-webpki-roots` (Mozilla's, compiled in).
//!   With neither and no configuration of its own, a `wss://` connection
//!   fails for good with a message that says so.
//! - ALPN offers `http/1.1` only: the WebSocket handshake here is HTTP/1.1,
//!   and a server that also speaks h2 must not pick it.
//! - Errors a retry cannot cure end the client ([`Disconnect::Tls`](super::Disconnect::Tls)):
//!   a server certificate that does not verify (unknown issuer, expired,
//!   wrong name, ...), a client certificate the server refused, no roots.
//!   Everything else (a reset or a timeout mid-handshake) is a failed attempt
//!   like a refused TCP connection, and the client retries.

use super::ws::ConnectError;
use rustls::pki_types::ServerName;
use rustls::AlertDescription as Alert;
use std::sync::{Arc, OnceLock};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// The ALPN protocol offered.
const HTTP_1_1: &[u8] = b"http/1.1";

/// Runs the TLS handshake with `host` on `tcp`.
pub(crate) async fn connect(
    tcp: TcpStream,
    host: &str,
    custom: Option<&Arc<rustls::ClientConfig>>,
) -> Result<TlsStream<TcpStream>, ConnectError> {
    let config = match custom {
        Some(c) => with_alpn(c),
        None => default_config().map_err(ConnectError::Tls)?,
    };
    let name = ServerName::try_from(host.to_owned())
        .map_err(|e| ConnectError::Tls(format!("{host:?} is not a valid TLS server name: {e}")))?;
    tokio_rustls::TlsConnector::from(config).connect(name, tcp).await.map_err(|e| classify(e, "TLS handshake failed"))
}

/// `config` offering `http/1.1` only (a clone when it offers anything else).
fn with_alpn(config: &Arc<rustls::ClientConfig>) -> Arc<rustls::ClientConfig> {
    if config.alpn_protocols == [HTTP_1_1] {
        return config.clone();
    }
    let mut c = (**config).clone();
    c.alpn_protocols = vec![HTTP_1_1.to_vec()];
    Arc::new(c)
}

/// The configuration used without [`ClientConfig::tls`](super::ClientConfig::tls):
/// built at the first `wss://` connection, kept for the process.
fn default_config() -> Result<Arc<rustls::ClientConfig>, String> {
    static CONFIG: OnceLock<Result<Arc<rustls::ClientConfig>, String>> = OnceLock::new();
    CONFIG.get_or_init(build_default).clone()
}

fn build_default() -> Result<Arc<rustls::ClientConfig>, String> {
    #[allow(unused_mut)]
    let mut roots = rustls::RootCertStore::empty();
    #[cfg(feature = "tls-native-roots")]
    {
        let found = rustls_native_certs::load_native_certs();
        for e in &found.errors {
            tracing::warn!(error = %e, "switchboard client: reading the platform's root certificates");
        }
        let (added, ignored) = roots.add_parsable_certificates(found.certs);
        tracing::debug!(added, ignored, "switchboard client: platform root certificates");
    }
    #[cfg(feature = "tls-webpki-roots")]
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if roots.is_empty() {
        return Err(if cfg!(feature = "tls-native-roots") {
            "no root certificates found on this platform: set ClientConfig::tls or enable the \
             `tls-webpki-roots` feature"
                .into()
        } else {
            "no root certificates: enable the `tls-webpki-roots` or `tls-native-roots` feature, or \
             set ClientConfig::tls"
                .into()
        });
    }
    let mut config = provider_builder()?.with_root_certificates(roots).with_no_client_auth();
    config.alpn_protocols = vec![HTTP_1_1.to_vec()];
    Ok(Arc::new(config))
}

/// A `rustls::ClientConfig` builder on the `ring` provider, whatever
/// provider the process installed as its default (none, or aws-lc-rs
/// through another dependency, which would make `ClientConfig::builder`
/// panic when both are compiled in).
fn provider_builder() -> Result<rustls::ConfigBuilder<rustls::ClientConfig, rustls::WantsVerifier>, String> {
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())
}

/// Sorts an I/O error of a TLS stream: terminal ([`ConnectError::Tls`])
/// when it is about certificates, a plain failed attempt otherwise. Also
/// applied to the WebSocket handshake's reads: under TLS 1.3 the server's
/// verdict on the client's certificate arrives after the client finished
/// its side of the TLS handshake.
pub(crate) fn classify(e: std::io::Error, what: &str) -> ConnectError {
    let terminal = match e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()) {
        Some(rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented) => true,
        Some(rustls::Error::AlertReceived(alert)) => matches!(
            alert,
            Alert::BadCertificate
                | Alert::UnsupportedCertificate
                | Alert::CertificateRevoked
                | Alert::CertificateExpired
                | Alert::CertificateUnknown
                | Alert::UnknownCA
                | Alert::CertificateRequired
                | Alert::AccessDenied
        ),
        _ => false,
    };
    if terminal {
        ConnectError::Tls(format!("{what}: {e}"))
    } else {
        ConnectError::Other(format!("{what}: {e}"))
    }
}
