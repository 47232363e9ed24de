//! `load idle --listener axum|axum-tls` (features `axum` and `tls`): idle
//! connections to the hub served by `integration::axum::serve`, in
//! cleartext (`ws://`) or over rustls (`wss://`), so that the two differ by
//! TLS alone (`docs/performance.md`, "TLS: memory per idle connection").
//!
//! The generator makes a CA and a certificate for `127.0.0.1` at run time
//! (rcgen; nothing is written but two PEM files in a temporary directory,
//! removed at the end), starts `load server --listener axum-tls` with them,
//! and connects its clients with tokio-tungstenite over tokio-rustls,
//! trusting that CA only. Every client reads `hello`, joins the room and
//! then only reads (tungstenite answers the heartbeat pings).

use crate::bench::{IdleOpts, IdleReadings, IdleReport};
use crate::procfs;
use crate::server::{Listener, ROOM};
use futures::{SinkExt, StreamExt};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use switchboard::rustls;
use switchboard::rustls::pki_types::pem::PemObject;
use switchboard::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, Semaphore};
use tokio_tungstenite::tungstenite::Message;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A CA made for this run, the server's certificate (for `127.0.0.1`) in
/// PEM files, and a client configuration trusting that CA only.
struct Pki {
    dir: PathBuf,
    client: Arc<rustls::ClientConfig>,
}

impl Pki {
    fn new() -> io::Result<Pki> {
        let err = |e: rcgen::Error| io::Error::other(e.to_string());
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, "load test CA");
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().map_err(err)?).map_err(err)?;
        let key = KeyPair::generate().map_err(err)?;
        let cert =
            CertificateParams::new(vec!["127.0.0.1".to_owned()]).map_err(err)?.signed_by(&key, &ca).map_err(err)?;
        let dir = std::env::temp_dir().join(format!("switchboard-load-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("cert.pem"), cert.pem())?;
        std::fs::write(dir.join("key.pem"), key.serialize_pem())?;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.der().clone()).map_err(io::Error::other)?;
        let client = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(io::Error::other)?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Pki { dir, client: Arc::new(client) })
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The server's rustls configuration from the PEM files the generator
/// wrote (ALPN left empty: `serve` offers `h2` and `http/1.1`; the clients
/// offer nothing and get HTTP/1.1).
pub fn server_config(dir: &Path) -> io::Result<Arc<rustls::ServerConfig>> {
    let bad = |e: &dyn std::fmt::Display| io::Error::new(io::ErrorKind::InvalidData, format!("{}: {e}", dir.display()));
    let certs = CertificateDer::pem_file_iter(dir.join("cert.pem"))
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| bad(&e))?;
    let key = PrivateKeyDer::from_pem_file(dir.join("key.pem")).map_err(|e| bad(&e))?;
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(&e))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| bad(&e))?;
    Ok(Arc::new(config))
}

/// `load server --listener axum|axum-tls`, killed when dropped.
struct Server {
    _child: Child,
    pid: u32,
    addr: SocketAddr,
}

impl Server {
    async fn spawn(opts: &IdleOpts, listener: Listener, tls: Option<&Path>) -> io::Result<Server> {
        let mut cmd = Command::new(std::env::current_exe()?);
        cmd.args(["server", "--kind", "switchboard", "--addr", "127.0.0.1:0", "--listener", listener.name()]);
        if let Some(dir) = tls {
            cmd.arg("--tls-dir").arg(dir);
        }
        if let Some(h) = opts.conn.heartbeat_ms {
            cmd.args(["--heartbeat-ms", &h.to_string()]);
        }
        let mut child = cmd.stdout(Stdio::piped()).stdin(Stdio::null()).kill_on_drop(true).spawn()?;
        let pid = child.id().ok_or_else(|| io::Error::other("server exited at once"))?;
        let stdout = child.stdout.take().ok_or_else(|| io::Error::other("no stdout"))?;
        let line = tokio::time::timeout(Duration::from_secs(60), BufReader::new(stdout).lines().next_line())
            .await
            .map_err(|_| io::Error::other("server did not say ready"))??
            .ok_or_else(|| io::Error::other("server exited before ready"))?;
        let addr = line
            .strip_prefix("ready ")
            .and_then(|a| a.trim().parse().ok())
            .ok_or_else(|| io::Error::other(format!("unexpected server line: {line}")))?;
        Ok(Server { _child: child, pid, addr })
    }
}

/// Reads until a text message containing `needle`.
async fn until<S>(ws: &mut tokio_tungstenite::WebSocketStream<S>, needle: &str) -> io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    while let Some(m) = ws.next().await {
        if let Message::Text(t) = m.map_err(io::Error::other)? {
            if t.contains(needle) {
                return Ok(());
            }
        }
    }
    Err(io::Error::other(format!("closed before {needle}")))
}

/// Handshake, `hello`, join (then `permit` goes back and `ready` is told);
/// then reads until the connection ends, counting pings (tungstenite
/// queues the pong and sends it on the next read).
async fn hold<S>(
    stream: S,
    url: String,
    ready: mpsc::UnboundedSender<io::Result<()>>,
    pings: Arc<AtomicU64>,
    permit: impl Sized,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let opened = async {
        let (mut ws, _) = tokio_tungstenite::client_async(url, stream).await.map_err(io::Error::other)?;
        until(&mut ws, "\"hello\"").await?;
        let join = format!(r#"{{"type":"join","ref":1,"room":"{ROOM}"}}"#);
        ws.send(Message::text(join)).await.map_err(io::Error::other)?;
        until(&mut ws, "\"reply\"").await?;
        Ok::<_, io::Error>(ws)
    }
    .await;
    drop(permit);
    let mut ws = match opened {
        Ok(ws) => {
            let _ = ready.send(Ok(()));
            ws
        }
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    while let Some(Ok(m)) = ws.next().await {
        if m.is_ping() {
            pings.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Holds `opts.connections` idle connections for `opts.seconds` to the hub
/// on `integration::axum::serve`, over TLS for [`Listener::AxumTls`].
pub async fn idle(opts: &IdleOpts, listener: Listener) -> io::Result<IdleReport> {
    let n = opts.connections;
    procfs::raise_nofile(n as u64 + 256);
    let pki = if listener == Listener::AxumTls { Some(Pki::new()?) } else { None };
    let server = Server::spawn(opts, listener, pki.as_ref().map(|p| p.dir.as_path())).await?;
    let addr = server.addr;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss_before = procfs::rss_kib(server.pid).unwrap_or(0);
    let connector = pki.as_ref().map(|p| tokio_rustls::TlsConnector::from(p.client.clone()));
    let pings = Arc::new(AtomicU64::new(0));
    let (ready_tx, mut ready_rx) = mpsc::unbounded_channel::<io::Result<()>>();
    let sem = Arc::new(Semaphore::new(opts.conn.concurrency.max(1)));
    let sources = opts.conn.source_ips;
    let t = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let (sem, ready, pings, connector) = (sem.clone(), ready_tx.clone(), pings.clone(), connector.clone());
        tasks.spawn(async move {
            let permit = sem.acquire_owned().await;
            let source = (sources > 0).then(|| IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + (i % sources) as u8)));
            let tcp = match crate::client::tcp(addr, source).await {
                Ok(tcp) => tcp,
                Err(e) => {
                    let _ = ready.send(Err(e));
                    return;
                }
            };
            match connector {
                None => hold(tcp, format!("ws://{addr}/"), ready, pings, permit).await,
                Some(c) => match c.connect(ServerName::IpAddress(addr.ip().into()), tcp).await {
                    Ok(tls) => hold(tls, format!("wss://{addr}/"), ready, pings, permit).await,
                    Err(e) => {
                        let _ = ready.send(Err(e));
                    }
                },
            }
        });
    }
    drop(ready_tx);
    crate::bench::wait_all(&mut ready_rx, n, "connect").await?;
    let connect_s = t.elapsed().as_secs_f64();
    // Let the last handshakes' transient allocations settle.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_connected = procfs::rss_kib(server.pid).unwrap_or(0);
    let cpu = || procfs::cpu_seconds(server.pid).unwrap_or(f64::NAN);
    let gen = || procfs::cpu_seconds(std::process::id()).unwrap_or(f64::NAN);
    let (cpu0, gen0, pings0, t0) = (cpu(), gen(), pings.load(Ordering::Relaxed), Instant::now());
    tokio::time::sleep(Duration::from_secs_f64(opts.seconds)).await;
    let secs = t0.elapsed().as_secs_f64();
    let (cpu, gen, pings_received) = (cpu() - cpu0, gen() - gen0, pings.load(Ordering::Relaxed) - pings0);
    let rss_after = procfs::rss_kib(server.pid).unwrap_or(0);
    drop(server);
    tasks.abort_all();
    let readings = IdleReadings {
        seconds: secs,
        connect_s,
        rss_kib: [rss_before, rss_connected, rss_after],
        // This server child is not asked for its heap (`heap.rs`).
        heap_per_connection: (f64::NAN, f64::NAN),
        server_cpu_s: cpu,
        generator_cpu_s: gen,
        pings_received,
    };
    Ok(IdleReport::new(opts, n, readings))
}
