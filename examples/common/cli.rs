//! What every server example shares: `--help`, the `--addr` flag, logging,
//! and stopping on Ctrl-C or SIGTERM. Included with
//! `#[path = "../common/cli.rs"] mod cli;`.

#![allow(dead_code)] // each example uses its own part of this file

use std::io::IsTerminal;
use std::net::SocketAddr;

/// What an example says about itself, in `--help` and in a usage error.
pub struct Usage {
    /// The program name (`cargo run --example NAME`).
    pub program: &'static str,
    /// What it is, in a line or two.
    pub about: &'static str,
    /// Flags besides `--addr`, as they appear in the usage line
    /// (`" [--redis URL]"`), or `""`.
    pub flags: &'static str,
    /// One line per extra flag or environment variable, indented, or `""`.
    pub details: &'static str,
}

impl Usage {
    fn line(&self) -> String {
        format!("usage: {} [--addr HOST:PORT]{}", self.program, self.flags)
    }

    /// The whole `--help` text.
    pub fn help(&self) -> String {
        format!(
            "{}: {}\n\n{}\n\n  --addr HOST:PORT   where to listen (default 127.0.0.1:3000)\n{}  -h, --help         print this help and exit\n",
            self.program,
            self.about,
            self.line(),
            self.details
        )
    }

    /// Prints `msg` and the usage line to stderr, and exits with status 2.
    pub fn fail(&self, msg: &str) -> ! {
        eprintln!("{}: {msg}\n{}   (--help for more)", self.program, self.line());
        std::process::exit(2);
    }

    /// Prints the help to stdout and exits with status 0 when `args` ask
    /// for it (`-h`, `--help`).
    pub fn help_if_asked<'a>(&self, args: impl IntoIterator<Item = &'a String>) {
        if args.into_iter().any(|a| a == "-h" || a == "--help") {
            print!("{}", self.help());
            std::process::exit(0);
        }
    }
}

/// `--addr HOST:PORT` (or `--addr=HOST:PORT`) from the command line, default
/// `127.0.0.1:3000`; answers `--help`, exits with the usage on anything
/// else.
pub fn addr_arg(usage: &Usage) -> SocketAddr {
    addr_from(usage, std::env::args().skip(1).collect())
}

/// [`addr_arg`] over `args` (what is left after a program took its own
/// flags).
pub fn addr_from(usage: &Usage, args: Vec<String>) -> SocketAddr {
    usage.help_if_asked(&args);
    match parse_addr(args.into_iter()) {
        Ok(a) => a,
        Err(msg) => usage.fail(&msg),
    }
}

fn parse_addr(mut args: impl Iterator<Item = String>) -> Result<SocketAddr, String> {
    let mut addr = None;
    while let Some(arg) = args.next() {
        let value = match arg.strip_prefix("--addr") {
            Some("") => args.next().ok_or("--addr needs a value")?,
            Some(v) if v.starts_with('=') => v[1..].to_owned(),
            _ => return Err(format!("unknown argument `{arg}`")),
        };
        addr = Some(value.parse().map_err(|e| format!("--addr {value}: {e}"))?);
    }
    Ok(addr.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 3000))))
}

/// Logs to stderr, filtered by `RUST_LOG` (default `warn`). Colours only
/// when stderr is a terminal: a log written to a file or a pipe (a service
/// manager, `2> log`) gets no escape codes.
pub fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

/// The certificate chain and key files of `--tls-cert` and `--tls-key`.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
}

/// Takes `--tls-cert FILE` and `--tls-key FILE` (both or neither) out of
/// `args`; exits with the usage on a half pair.
pub fn tls_args(usage: &Usage, args: Vec<String>) -> (Option<TlsFiles>, Vec<String>) {
    let (cert, args) = take_flag("--tls-cert", args).unwrap_or_else(|e| usage.fail(&e));
    let (key, args) = take_flag("--tls-key", args).unwrap_or_else(|e| usage.fail(&e));
    match (cert, key) {
        (Some(cert), Some(key)) => (Some(TlsFiles { cert: cert.into(), key: key.into() }), args),
        (None, None) => (None, args),
        _ => usage.fail("--tls-cert and --tls-key go together"),
    }
}

/// Takes `FLAG VALUE` (or `FLAG=VALUE`) out of `args`; returns the value,
/// if any, and the other arguments.
pub fn take_flag(flag: &str, args: Vec<String>) -> Result<(Option<String>, Vec<String>), String> {
    let mut value = None;
    let mut rest = Vec::new();
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        match arg.strip_prefix(flag) {
            Some("") => value = Some(args.next().ok_or(format!("{flag} needs a value"))?),
            Some(v) if v.starts_with('=') => value = Some(v[1..].to_owned()),
            _ => rest.push(arg),
        }
    }
    Ok((value, rest))
}

/// A rustls server configuration from PEM files, offering HTTP/2 and
/// HTTP/1.1 (ALPN `h2`, `http/1.1`).
#[cfg(feature = "tls")]
pub fn tls_config(files: &TlsFiles) -> std::io::Result<std::sync::Arc<switchboard::rustls::ServerConfig>> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    use switchboard::rustls;
    let bad = |what: &std::path::Path, e: &dyn std::fmt::Display| {
        std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{}: {e}", what.display()))
    };
    let certs = CertificateDer::pem_file_iter(&files.cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| bad(&files.cert, &e))?;
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| bad(&files.key, &e))?;
    let mut config =
        rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| bad(&files.cert, &e))?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(|e| bad(&files.cert, &e))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(std::sync::Arc::new(config))
}

/// Binds `addr`, prints "`program` listening on http://ADDR/", and serves
/// `router` on switchboard's HTTP server (`integration::axum::serve`, with
/// its safe limits) until Ctrl-C or SIGTERM; then shuts `hub` down: every
/// connection gets a close frame (within 5 s) before the exit.
#[cfg(feature = "axum")]
pub async fn serve_app(
    program: &str,
    addr: SocketAddr,
    router: axum::Router,
    hub: switchboard::Hub,
) -> std::io::Result<()> {
    serve_app_tls(program, addr, None, router, hub).await
}

/// [`serve_app`], over HTTPS/WSS when `tls` names a certificate and key
/// (then the line says `https://`).
#[cfg(feature = "axum")]
pub async fn serve_app_tls(
    program: &str,
    addr: SocketAddr,
    tls: Option<TlsFiles>,
    router: axum::Router,
    hub: switchboard::Hub,
) -> std::io::Result<()> {
    use switchboard::integration::axum::{serve, ServeConfig};
    #[allow(unused_mut)]
    let mut config = ServeConfig::default();
    let scheme = match tls {
        None => "http",
        #[cfg(feature = "tls")]
        Some(files) => {
            config = config.tls(tls_config(&files)?);
            "https"
        }
        #[cfg(not(feature = "tls"))]
        Some(_) => {
            eprintln!("{program}: --tls-cert and --tls-key need the `tls` feature: cargo run --example {program} --features tls -- ...");
            std::process::exit(2);
        }
    };
    let listener = tokio::net::TcpListener::bind(addr).await?;
    println!("{program} listening on {scheme}://{}/", listener.local_addr()?);
    serve(listener, router, config)
        .with_graceful_shutdown(async move {
            shutdown_signal().await;
            hub.shutdown(std::time::Duration::from_secs(5)).await;
        })
        .await
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}
