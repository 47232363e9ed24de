//! The WebSocket transport on its own: every text and binary message is
//! echoed back, nothing else (no switchboard protocol). A conformance target
//! for external WebSocket test tools such as the Autobahn test suite.
//!
//! ```text
//! cargo run --example echo -- --addr 127.0.0.1:9001
//! ```
//!
//! `permessage-deflate` is negotiated when offered, and every echoed
//! message is compressed (`Compression::On`), so the suite's compression
//! cases (groups 12 and 13) exercise both directions.

#[path = "common/cli.rs"]
mod cli;

use futures::{SinkExt, StreamExt};
use switchboard::transport::ws::{self, Compression, WsConfig};
use switchboard::transport::{CloseFrame, Frame, Transport};
use tokio::net::TcpListener;

const USAGE: cli::Usage = cli::Usage {
    program: "echo",
    about: "a WebSocket echo server (no switchboard protocol): every text and binary\nmessage comes back as it was sent. A target for WebSocket test suites such as Autobahn.",
    flags: "",
    details: "",
};

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addr = cli::addr_arg(&USAGE);
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
            // Autobahn sends a 4 MiB message in 64-byte fragments (65,536
            // of them, cases 9.3.1 and 9.4.1): the default of 64 fragments a
            // message is a limit for production servers, not for a suite.
            let config = WsConfig::default().compression(Compression::On).max_fragments(1 << 20);
            let Ok(Some((transport, _handshake))) = ws::upgrade(stream, peer, &config, max).await else {
                return;
            };
            let (mut sink, mut stream) = transport.split();
            while let Some(item) = stream.next().await {
                let frame = match item {
                    Ok(frame) => frame,
                    // A broken frame or message: fail the connection with
                    // its close code (1002, 1007, 1009), as RFC 6455 asks.
                    Err(e) => {
                        if let Some(code) = e.close_code() {
                            let close = CloseFrame { code, reason: String::new() };
                            let _ = sink.send(Frame::Close(Some(close))).await;
                        }
                        let _ = sink.close().await;
                        return;
                    }
                };
                // The transport leaves answering pings and closes to its user.
                let reply = match frame {
                    Frame::Text(_) | Frame::Binary(_) => frame,
                    Frame::Ping(payload) => Frame::Pong(payload),
                    Frame::Pong(_) => continue,
                    Frame::Close(close) => {
                        let _ = sink.send(Frame::Close(close)).await;
                        let _ = sink.close().await;
                        return;
                    }
                };
                if sink.send(reply).await.is_err() {
                    return;
                }
            }
        });
    }
}
