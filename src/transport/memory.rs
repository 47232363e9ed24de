//! An in-process transport: two bounded channels of [`Frame`]s.
//!
//! [`pair`] returns the server half (a [`Transport`] to give to
//! [`Hub::connect`](crate::Hub::connect)) and a [`MemoryPeer`] that plays the
//! client. Used by the crate's own tests and benchmarks, and handy for a
//! host's tests of its handlers.

use super::{Capabilities, Frame, Transport, TransportError};
use futures::channel::mpsc;
use futures::{Sink, SinkExt, Stream, StreamExt};
use std::pin::Pin;
use std::task::{Context, Poll};

/// Server half of an in-memory connection.
#[derive(Debug)]
pub struct MemoryTransport {
    to_peer: mpsc::Sender<Frame>,
    from_peer: mpsc::Receiver<Result<Frame, TransportError>>,
    native_ping: bool,
    bidirectional: bool,
    utf8: bool,
}

/// Client half of an in-memory connection.
#[derive(Debug)]
pub struct MemoryPeer {
    to_server: mpsc::Sender<Result<Frame, TransportError>>,
    from_server: mpsc::Receiver<Frame>,
}

/// A connected pair; each direction buffers at most `capacity` frames.
pub fn pair(capacity: usize) -> (MemoryTransport, MemoryPeer) {
    let (to_peer, from_server) = mpsc::channel(capacity);
    let (to_server, from_peer) = mpsc::channel(capacity);
    (
        MemoryTransport { to_peer, from_peer, native_ping: true, bidirectional: true, utf8: true },
        MemoryPeer { to_server, from_server },
    )
}

impl MemoryTransport {
    /// Makes the transport report no native ping, so heartbeats use the
    /// protocol's `ping` envelope (as SSE-like transports do).
    pub fn without_native_ping(mut self) -> Self {
        self.native_ping = false;
        self
    }

    /// Makes the transport report itself one-way
    /// ([`Capabilities::bidirectional`] false), as an SSE stream does: the
    /// session then takes a heartbeat ping it flushed to the peer as the
    /// answer, so a peer that reads stays without answering pings.
    pub fn one_way(mut self) -> Self {
        self.bidirectional = false;
        self
    }

    /// Hands inbound text to the server without checking it is UTF-8,
    /// breaking the [`Frame::Text`] promise every transport keeps (by
    /// default this one, like the WebSocket transport, turns such a frame
    /// into [`TransportError::InvalidUtf8`], close 1007): for testing what
    /// a transport wrapper or a host does with a transport that does not
    /// check.
    pub fn unchecked_text(mut self) -> Self {
        self.utf8 = false;
        self
    }
}

impl MemoryPeer {
    /// Sends a frame to the server; `Err` when the server half is gone. A
    /// [`Frame::Text`] that is not UTF-8 goes as it is: the transport
    /// refuses it (unless [`MemoryTransport::unchecked_text`]).
    pub async fn send(&mut self, frame: Frame) -> Result<(), TransportError> {
        self.to_server.send(Ok(frame)).await.map_err(|_| TransportError::Closed)
    }

    /// Makes the server's reader see an error (e.g. a too-big message).
    pub async fn send_error(&mut self, error: TransportError) -> Result<(), TransportError> {
        self.to_server.send(Err(error)).await.map_err(|_| TransportError::Closed)
    }

    /// The next frame from the server; `None` once the server dropped its half.
    pub async fn recv(&mut self) -> Option<Frame> {
        self.from_server.next().await
    }

    /// Ends the client side, as if the socket was dropped without a close frame.
    pub fn disconnect(self) {}
}

/// Writing half of a [`MemoryTransport`].
#[derive(Debug)]
pub struct MemorySink(mpsc::Sender<Frame>);

/// Reading half of a [`MemoryTransport`].
#[derive(Debug)]
pub struct MemoryStream {
    from_peer: mpsc::Receiver<Result<Frame, TransportError>>,
    utf8: bool,
}

impl Transport for MemoryTransport {
    type Sink = MemorySink;
    type Stream = MemoryStream;

    fn name(&self) -> &'static str {
        "memory"
    }

    fn split(self) -> (MemorySink, MemoryStream) {
        (MemorySink(self.to_peer), MemoryStream { from_peer: self.from_peer, utf8: self.utf8 })
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::default().with_native_ping(self.native_ping).with_bidirectional(self.bidirectional)
    }
}

impl Sink<Frame> for MemorySink {
    type Error = TransportError;

    fn poll_ready(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), TransportError>> {
        self.0.poll_ready(cx).map_err(|_| TransportError::Closed)
    }

    fn start_send(mut self: Pin<&mut Self>, item: Frame) -> Result<(), TransportError> {
        self.0.start_send(item).map_err(|_| TransportError::Closed)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), TransportError>> {
        Pin::new(&mut self.0).poll_flush(cx).map_err(|_| TransportError::Closed)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), TransportError>> {
        Pin::new(&mut self.0).poll_close(cx).map_err(|_| TransportError::Closed)
    }
}

impl Stream for MemoryStream {
    type Item = Result<Frame, TransportError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let utf8 = self.utf8;
        self.from_peer.poll_next_unpin(cx).map(|item| match item {
            Some(Ok(Frame::Text(b))) if utf8 && std::str::from_utf8(&b).is_err() => {
                Some(Err(TransportError::InvalidUtf8))
            }
            item => item,
        })
    }
}
