//! A private `nats-server` per test on a free loopback port, stopped on
//! drop (for the custom-backplane example's test).
#![allow(dead_code)]

use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

pub struct NatsServer {
    port: u16,
    child: Child,
}

impl NatsServer {
    /// Starts `nats-server -p <free port>` and waits until it greets.
    pub async fn start() -> NatsServer {
        let nats = super::process::require_binary("nats-server", "Debian: `apt-get install nats-server`");
        for _ in 0..5 {
            let port = super::process::free_port();
            let mut child = Command::new(nats)
                .args(["-a", "127.0.0.1", "-p", &port.to_string()])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn nats-server");
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while tokio::time::Instant::now() < deadline {
                if child.try_wait().ok().flatten().is_some() {
                    break; // exited (port taken?): try another port
                }
                if let Ok(mut tcp) = TcpStream::connect(("127.0.0.1", port)).await {
                    let mut buf = [0u8; 4];
                    if tcp.read_exact(&mut buf).await.is_ok() && &buf == b"INFO" {
                        return NatsServer { port, child };
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("nats-server did not start");
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
