//! The WebSocket transport on its own: every text and binary message is
//! echoed back, nothing else (no switchboard protocol). A conformance target
//! for external WebSocket test tools such as the Autobahn test suite.
//!
//! ```text
//! cargo run --example echo -- --addr 127.0.0.1:9001
//! ```

#[path = "common/cli.rs"]
mod cli;

use futures::{SinkExt, StreamExt};
use switchboard::transport::ws::{self, WsConfig};
use switchboard::transport::{Frame, Transport};
use tokio::net::TcpListener;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addr = cli::addr_arg("echo");
    let listener = TcpListener::bind(addr).await?;
    println!("echo listening on ws://{}/", listener.local_addr()?);
    // Autobahn sends messages up to 16 MiB.
    let max = 16 * 1024 * 1024;
    tokio::select! {
        _ = accept_loop(listener, max) => {}
        _ = cli::shutdown_signal() => println!("echo stopped"),
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
