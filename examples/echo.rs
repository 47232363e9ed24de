//! The WebSocket transport on its own: every text and binary message is
//! echoed back, nothing else (no switchboard protocol). A conformance target
//! for external WebSocket test tools such as the Autobahn test suite.
//!
//! ```text
//! cargo run --example echo -- --addr 127.0.0.1:9001
//! ```

use futures::{SinkExt, StreamExt};
use std::net::SocketAddr;
use switchboard::transport::ws::{self, WsConfig};
use switchboard::transport::{Frame, Transport};
use tokio::net::TcpListener;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addr = addr_arg();
    let listener = TcpListener::bind(addr).await?;
    println!("echo listening on ws://{}/", listener.local_addr()?);
    // Autobahn sends messages up to 16 MiB.
    let max = 16 * 1024 * 1024;
    tokio::select! {
        _ = accept_loop(listener, max) => {}
        _ = shutdown_signal() => println!("echo stopped"),
    }
    Ok(())
}

async fn accept_loop(listener: TcpListener, max: usize) {
    loop {
        let Ok((stream, peer)) = listener.accept().await else { continue };
        tokio::spawn(async move {
            let Ok(Some((transport, _handshake))) = ws::upgrade(stream, peer, &WsConfig::default(), max).await else {
                return;
            };
            let (mut sink, mut stream) = transport.split();
            while let Some(Ok(frame)) = stream.next().await {
                match frame {
                    Frame::Text(_) | Frame::Binary(_) => {
                        if sink.send(frame).await.is_err() {
                            return;
                        }
                    }
                    // tungstenite answers pings and close frames itself;
                    // flushing lets its queued replies out.
                    Frame::Close(_) => {
                        let _ = sink.close().await;
                        return;
                    }
                    Frame::Ping(_) | Frame::Pong(_) => {
                        let _ = sink.flush().await;
                    }
                }
            }
        });
    }
}

fn addr_arg() -> SocketAddr {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == "--addr")
        .and_then(|i| args.get(i + 1))
        .map(|a| a.parse().expect("--addr HOST:PORT"))
        .unwrap_or_else(|| "127.0.0.1:3000".parse().unwrap())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
