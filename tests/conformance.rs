//! The conformance suites against the shipped in-memory implementations.

use switchboard::history::MemoryHistory;
use switchboard::testing::{BackplaneSuite, HistorySuite, PresenceStoreSuite};
use switchboard::{backplane::MemoryBackplane, presence::MemoryPresence};

#[tokio::test]
async fn memory_backplane_conforms() {
    let engine = MemoryBackplane::with_capacity(256);
    BackplaneSuite::new(engine.clone(), engine.clone()).subscription_capacity(256).run().await.unwrap();
    // Everything the suite subscribed is unsubscribed again once its hubs and
    // subscriptions are dropped.
    eventually(|| engine.topic_count() == 0).await;
}

#[tokio::test]
async fn memory_backplane_with_the_default_capacity_conforms() {
    let engine = MemoryBackplane::new();
    switchboard::testing::backplane(engine.clone(), engine).await;
}

async fn eventually(mut f: impl FnMut() -> bool) {
    for _ in 0..2000 {
        if f() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    panic!("backplane topics were not released");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_history_conforms() {
    let store = MemoryHistory::new();
    HistorySuite::new(store.clone(), store).run().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn memory_presence_conforms() {
    let store = MemoryPresence::new();
    PresenceStoreSuite::new(store.clone(), store.clone()).run().await.unwrap();
    assert!(store.is_empty(), "the suite cleans up after itself");
}

// ---------------------------------------------------------------------------
// Transports

use switchboard::testing::TransportSuite;
use switchboard::transport::memory;

#[tokio::test]
async fn memory_transport_conforms() {
    let report = TransportSuite::new(|| async { memory::pair(16) }).run().await.unwrap();
    assert_eq!(report.passed.len(), 7, "{report:?}");
    assert!(report.passed.contains(&"transport.invalid_utf8"), "{report:?}");
    let skipped: Vec<&str> = report.skipped.iter().map(|(c, _)| *c).collect();
    assert_eq!(skipped, ["transport.too_big", "transport.one_way"]);
}

#[tokio::test]
async fn one_way_memory_transport_skips_inbound_checks() {
    let report = TransportSuite::new(|| async {
        let (t, p) = memory::pair(16);
        (t.one_way().without_native_ping(), p)
    })
    .max_message_size(1024)
    .run()
    .await
    .unwrap();
    assert_eq!(report.passed, ["transport.order", "transport.close_sent", "transport.vanish", "transport.one_way"]);
    assert_eq!(report.skipped.len(), 5, "{report:?}");
}

/// The WebSocket transport on a real loopback socket.
#[cfg(feature = "ws")]
mod websocket {
    use super::*;
    use futures::future::BoxFuture;
    use futures::{FutureExt, SinkExt, StreamExt};
    use switchboard::protocol::CloseCode;
    use switchboard::testing::Peer;
    use switchboard::transport::{CloseFrame, Frame, TransportError};
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode as WsCode, Data, OpCode};
    use tokio_tungstenite::tungstenite::protocol::frame::{CloseFrame as WsClose, Frame as WsFrame};
    use tokio_tungstenite::tungstenite::Message;

    /// A tokio-tungstenite client on a real loopback socket.
    struct WsPeer(tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>);

    impl Peer for WsPeer {
        fn send(&mut self, frame: Frame) -> BoxFuture<'_, Result<(), TransportError>> {
            let message = match frame {
                // As raw bytes, so that text that is not UTF-8 reaches the wire.
                Frame::Text(b) => Message::Frame(WsFrame::message(b, OpCode::Data(Data::Text), true)),
                Frame::Binary(b) => Message::Binary(b),
                Frame::Ping(b) => Message::Ping(b),
                Frame::Pong(b) => Message::Pong(b),
                Frame::Close(c) => {
                    Message::Close(c.map(|c| WsClose { code: WsCode::from(c.code.0), reason: c.reason.into() }))
                }
            };
            async move { self.0.send(message).await.map_err(|e| TransportError::Io(std::io::Error::other(e))) }.boxed()
        }

        fn recv(&mut self) -> BoxFuture<'_, Option<Frame>> {
            async move {
                Some(match self.0.next().await?.ok()? {
                    Message::Text(t) => Frame::Text(bytes::Bytes::copy_from_slice(t.as_bytes())),
                    Message::Binary(b) => Frame::Binary(b),
                    Message::Ping(b) => Frame::Ping(b),
                    Message::Pong(b) => Frame::Pong(b),
                    Message::Close(c) => Frame::Close(c.map(|c| CloseFrame {
                        code: CloseCode(u16::from(c.code)),
                        reason: c.reason.as_str().to_owned(),
                    })),
                    Message::Frame(_) => return None,
                })
            }
            .boxed()
        }
    }

    #[tokio::test]
    async fn websocket_transport_conforms() {
        use switchboard::transport::ws::{upgrade, WsConfig};
        const MAX: usize = 64 * 1024;
        let connect = || async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let url = format!("ws://{addr}/");
            let server = async {
                let (stream, peer) = listener.accept().await.unwrap();
                upgrade(stream, peer, &WsConfig::default(), MAX).await.unwrap().expect("upgrade refused").0
            };
            let client = async {
                tokio_tungstenite::client_async(url, tokio::net::TcpStream::connect(addr).await.unwrap()).await
            };
            let (transport, client) = tokio::join!(server, client);
            (transport, WsPeer(client.unwrap().0))
        };
        let report = TransportSuite::new(connect).max_message_size(MAX).run().await.unwrap();
        let bidirectional: Vec<&str> =
            TransportSuite::<()>::CHECKS.iter().copied().filter(|c| *c != "transport.one_way").collect();
        assert_eq!(report.passed, bidirectional);
        assert_eq!(report.skipped.iter().map(|(c, _)| *c).collect::<Vec<_>>(), ["transport.one_way"]);
    }
}
