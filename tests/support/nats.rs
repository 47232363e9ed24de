//! A private `nats-server` per test on a free loopback port, stopped on
//! drop (for the custom-backplane example's test).
#![allow(dead_code)]

use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

pub struct NatsServer {
    port: u16,
    child: Arc<Mutex<Child>>,
}

fn spawn(port: u16) -> Child {
    let nats = super::process::require_binary("nats-server", "Debian: `apt-get install nats-server`");
    Command::new(nats)
        .args(["-a", "127.0.0.1", "-p", &port.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn nats-server")
}

/// Waits until the server on `port` greets; `false` if it exited first or
/// took more than 10 s.
async fn greets(port: u16, child: &Mutex<Child>) -> bool {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while tokio::time::Instant::now() < deadline {
        if child.lock().unwrap().try_wait().ok().flatten().is_some() {
            return false; // exited (port taken?)
        }
        if let Ok(mut tcp) = TcpStream::connect(("127.0.0.1", port)).await {
            let mut buf = [0u8; 4];
            if tcp.read_exact(&mut buf).await.is_ok() && &buf == b"INFO" {
                return true;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

impl NatsServer {
    /// Starts `nats-server -p <free port>` and waits until it greets.
    pub async fn start() -> NatsServer {
        for _ in 0..5 {
            let port = super::process::free_port();
            let child = Arc::new(Mutex::new(spawn(port)));
            if greets(port, &child).await {
                return NatsServer { port, child };
            }
            let mut child = child.lock().unwrap();
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("nats-server did not start");
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// A hook that kills the server (every client connection breaks) and
    /// starts it again on its port: the conformance suite's
    /// `cut_connection`.
    pub fn restarter(&self) -> impl Fn() -> futures::future::BoxFuture<'static, ()> + Send + Sync + 'static {
        let (port, child) = (self.port, self.child.clone());
        move || {
            let child = child.clone();
            Box::pin(async move {
                {
                    let mut c = child.lock().unwrap();
                    let _ = c.kill();
                    let _ = c.wait();
                }
                for _ in 0..50 {
                    *child.lock().unwrap() = spawn(port);
                    if greets(port, &child).await {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                panic!("nats-server did not restart on port {port}");
            })
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let mut child = self.child.lock().unwrap();
        let _ = child.kill();
        let _ = child.wait();
    }
}
