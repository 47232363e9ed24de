//! The [`Transport`] conformance suite.

use super::{Failure, WAIT};
use crate::protocol::CloseCode;
use crate::transport::memory::MemoryPeer;
use crate::transport::{CloseFrame, Frame, Transport, TransportError};
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::{FutureExt, SinkExt, StreamExt};
use std::future::Future;

const SUITE: &str = "transport";

/// The far end of a connection under test, driven by the
/// [`TransportSuite`]: it plays the client. Dropping it must make the
/// connection vanish without a close frame (a dropped socket).
pub trait Peer: Send + 'static {
    /// Sends `frame` to the transport under test (a [`Frame::Text`] with
    /// bytes that are not UTF-8 is sent as they are, where the wire allows).
    fn send(&mut self, frame: Frame) -> BoxFuture<'_, Result<(), TransportError>>;
    /// The next frame from the transport under test; `None` once the
    /// connection is gone.
    fn recv(&mut self) -> BoxFuture<'_, Option<Frame>>;
}

impl Peer for MemoryPeer {
    fn send(&mut self, frame: Frame) -> BoxFuture<'_, Result<(), TransportError>> {
        MemoryPeer::send(self, frame).boxed()
    }

    fn recv(&mut self) -> BoxFuture<'_, Option<Frame>> {
        MemoryPeer::recv(self).boxed()
    }
}

/// What a [`TransportSuite`] run did: the checks it ran and those the
/// transport's declared capabilities or options made inapplicable, with why.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Report {
    /// The checks that ran and passed, in order.
    pub passed: Vec<&'static str>,
    /// The checks skipped, and the reason.
    pub skipped: Vec<(&'static str, &'static str)>,
}

/// The [`Transport`] conformance suite. `connect` yields a fresh connected
/// pair for every check: the server-side transport under test and a
/// [`Peer`] playing the client. Checks, in order (the names are
/// [`TransportSuite::CHECKS`]):
///
/// 1. `transport.order`: many text and binary frames, interleaved, arrive
///    whole and in order both ways (pings and pongs may come between);
/// 2. `transport.close_sent`: a close frame the sink sends reaches the peer
///    with its code and reason;
/// 3. `transport.close_received`: the peer's close frame comes out of the
///    stream as [`Frame::Close`] with its code and reason;
/// 4. `transport.too_big` (with [`max_message_size`](Self::max_message_size)):
///    an inbound message of exactly the limit arrives, one byte more yields
///    [`TransportError::MessageTooBig`];
/// 5. `transport.invalid_utf8` (unless [`without_utf8_check`](Self::without_utf8_check)):
///    an inbound text message that is not UTF-8 yields
///    [`TransportError::InvalidUtf8`];
/// 6. `transport.vanish`: when the peer goes away without a close frame,
///    the stream ends or yields an error within [`WAIT`] instead of hanging;
/// 7. `transport.ping` (when [`Capabilities::native_ping`](crate::transport::Capabilities::native_ping)):
///    a ping reaches the peer as a ping, and the peer's ping comes out of the
///    stream as [`Frame::Ping`], payloads unchanged (a one-way transport's
///    ping needs no payload: nothing answers it);
/// 8. `transport.half_closed` (bidirectional): after the sink sent its close
///    frame, the stream still yields what the peer sends, up to the peer's
///    own close frame (the session waits for it to end the close handshake);
/// 9. `transport.one_way` (one-way only): what the peer sends through its
///    side channel comes out of the stream whole and in order, and a ping
///    the sink flushed is never answered by a pong the transport makes up
///    (nothing on a one-way connection can answer; the session counts the
///    flushed ping instead).
///
/// Checks of inbound frames on the connection itself (all but
/// `close_sent`, `vanish`, `one_way` and the outbound half of the others)
/// are skipped for a one-way transport
/// ([`Capabilities::bidirectional`](crate::transport::Capabilities::bidirectional)
/// false), whose peer writes through other requests. A text-only transport
/// ([`Capabilities::binary`](crate::transport::Capabilities::binary) false)
/// is sent text frames only. Every wait is bounded by [`WAIT`]: a transport
/// that hangs fails the check it hangs in.
///
/// ```no_run
/// # async fn run() {
/// use switchboard::testing::TransportSuite;
/// use switchboard::transport::memory;
/// let report = TransportSuite::new(|| async { memory::pair(16) })
///     .run()
///     .await
///     .unwrap_or_else(|failure| panic!("{failure}"));
/// assert!(report.skipped.iter().any(|(check, _)| *check == "transport.too_big"));
/// # }
/// ```
pub struct TransportSuite<F> {
    connect: F,
    max_message_size: Option<usize>,
    utf8: bool,
}

impl<F> std::fmt::Debug for TransportSuite<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TransportSuite")
            .field("max_message_size", &self.max_message_size)
            .field("utf8", &self.utf8)
            .finish_non_exhaustive()
    }
}

/// How many data frames `transport.order` sends each way.
const FRAMES: usize = 200;

fn data_frame(i: usize, binary: bool) -> Frame {
    if i % 2 == 0 || !binary {
        Frame::Text(Bytes::from(format!("text {i} \u{e9}")))
    } else {
        Frame::Binary(Bytes::from((0..i).map(|b| b as u8).collect::<Vec<u8>>()))
    }
}

fn is_control(frame: &Frame) -> bool {
    matches!(frame, Frame::Ping(_) | Frame::Pong(_))
}

/// Runs `f` for at most [`WAIT`], as `check`.
async fn bounded<T>(check: &'static str, what: &str, f: impl Future<Output = T>) -> Result<T, Failure> {
    tokio::time::timeout(WAIT, f)
        .await
        .map_err(|_| Failure::new(SUITE, check, format!("{what}: nothing within {WAIT:?}")))
}

/// The peer's next frame that is not a ping or pong.
async fn peer_next<P: Peer>(peer: &mut P) -> Option<Frame> {
    loop {
        match peer.recv().await {
            Some(f) if is_control(&f) => continue,
            other => return other,
        }
    }
}

/// The stream's next item that is not a ping or pong.
async fn stream_next<S>(stream: &mut S) -> Option<Result<Frame, TransportError>>
where
    S: futures::Stream<Item = Result<Frame, TransportError>> + Unpin,
{
    loop {
        match stream.next().await {
            Some(Ok(f)) if is_control(&f) => continue,
            other => return other,
        }
    }
}

impl<F> TransportSuite<F> {
    /// Every check, in the order they run.
    pub const CHECKS: &'static [&'static str] = &[
        "transport.order",
        "transport.close_sent",
        "transport.close_received",
        "transport.too_big",
        "transport.invalid_utf8",
        "transport.vanish",
        "transport.ping",
        "transport.half_closed",
        "transport.one_way",
    ];
}

impl<F, Fut, T, P> TransportSuite<F>
where
    F: FnMut() -> Fut + Send,
    Fut: Future<Output = (T, P)> + Send,
    T: Transport,
    P: Peer,
{
    /// The suite on the pairs `connect` yields (a new pair per check).
    pub fn new(connect: F) -> Self {
        TransportSuite { connect, max_message_size: None, utf8: true }
    }

    /// The transport refuses inbound messages of more than `bytes`: enables
    /// `transport.too_big`.
    pub fn max_message_size(mut self, bytes: usize) -> Self {
        self.max_message_size = Some(bytes);
        self
    }

    /// Skips `transport.invalid_utf8`, for a transport whose peer cannot put
    /// text that is not UTF-8 on the wire (a transport whose only peer is a
    /// library that always sends valid text).
    pub fn without_utf8_check(mut self) -> Self {
        self.utf8 = false;
        self
    }

    /// Runs the checks; the first that fails is returned.
    pub async fn run(mut self) -> Result<Report, Failure> {
        let mut report = Report::default();
        let (probe, _) = (self.connect)().await;
        let caps = probe.capabilities();
        drop(probe);
        let inbound = caps.bidirectional;
        let binary = caps.binary;
        let one_way = "one-way transport (capabilities: bidirectional false)";
        let data_frame = |i| data_frame(i, binary);

        // 1. Order, both ways.
        let check = "transport.order";
        {
            let (t, mut peer) = (self.connect)().await;
            let (mut sink, mut stream) = t.split();
            let send = async {
                for i in 0..FRAMES {
                    sink.feed(data_frame(i)).await?;
                }
                sink.flush().await
            };
            let recv = async {
                let mut got = Vec::with_capacity(FRAMES);
                while got.len() < FRAMES {
                    match peer_next(&mut peer).await {
                        Some(f) => got.push(f),
                        None => break,
                    }
                }
                got
            };
            let (sent, got) = bounded(check, "sending frames to the peer", futures::future::join(send, recv)).await?;
            ensure!(sent.is_ok(), check, "the sink failed: {:?}", sent.err());
            for (i, f) in got.iter().enumerate() {
                ensure!(*f == data_frame(i), check, "outbound frame {i} arrived as {f:?}");
            }
            ensure!(got.len() == FRAMES, check, "the peer got {} of {FRAMES} frames", got.len());
            if inbound {
                let send = async {
                    for i in 0..FRAMES {
                        peer.send(data_frame(i)).await?;
                    }
                    Ok::<_, TransportError>(())
                };
                let recv = async {
                    let mut got = Vec::with_capacity(FRAMES);
                    while got.len() < FRAMES {
                        match stream_next(&mut stream).await {
                            Some(f) => got.push(f),
                            None => break,
                        }
                    }
                    got
                };
                let (sent, got) =
                    bounded(check, "receiving frames from the peer", futures::future::join(send, recv)).await?;
                ensure!(sent.is_ok(), check, "the peer could not send: {:?}", sent.err());
                for (i, f) in got.iter().enumerate() {
                    ensure!(matches!(f, Ok(f) if *f == data_frame(i)), check, "inbound frame {i} came out as {f:?}");
                }
                ensure!(got.len() == FRAMES, check, "the stream yielded {} of {FRAMES} frames", got.len());
            }
            report.passed.push(check);
        }

        // 2. A close frame reaches the peer.
        let check = "transport.close_sent";
        {
            let (t, mut peer) = (self.connect)().await;
            let (mut sink, _stream) = t.split();
            let close = CloseFrame { code: CloseCode(4000), reason: "conformance: bye \u{e9}".into() };
            let sent = bounded(check, "sending a close frame", sink.send(Frame::Close(Some(close.clone())))).await?;
            ensure!(sent.is_ok(), check, "the sink failed: {:?}", sent.err());
            let got = bounded(check, "the peer waiting for the close frame", peer_next(&mut peer)).await?;
            ensure!(got == Some(Frame::Close(Some(close.clone()))), check, "sent {close:?}, the peer got {got:?}");
            report.passed.push(check);
        }

        // 3. The peer's close frame comes out of the stream.
        let check = "transport.close_received";
        if inbound {
            let (t, mut peer) = (self.connect)().await;
            let (_sink, mut stream) = t.split();
            let close = CloseFrame { code: CloseCode(4001), reason: "conformance: peer leaves".into() };
            let sent =
                bounded(check, "the peer sending a close frame", peer.send(Frame::Close(Some(close.clone())))).await?;
            ensure!(sent.is_ok(), check, "the peer could not send: {:?}", sent.err());
            let got = bounded(check, "waiting for the peer's close frame", stream_next(&mut stream)).await?;
            ensure!(
                matches!(&got, Some(Ok(Frame::Close(Some(c)))) if *c == close),
                check,
                "the peer sent {close:?}, the stream yielded {got:?}"
            );
            report.passed.push(check);
        } else {
            report.skipped.push((check, one_way));
        }

        // 4. Size limit.
        let check = "transport.too_big";
        match self.max_message_size {
            _ if !inbound => report.skipped.push((check, one_way)),
            None => report.skipped.push((check, "no max_message_size declared")),
            Some(max) => {
                let (t, mut peer) = (self.connect)().await;
                let (_sink, mut stream) = t.split();
                let fits = Bytes::from(vec![7u8; max]);
                let sending = async {
                    let _ = peer.send(Frame::Binary(fits.clone())).await;
                    let _ = peer.send(Frame::Binary(Bytes::from(vec![8u8; max + 1]))).await;
                    // Keep the peer (and its socket) open while the stream reads.
                    futures::future::pending::<()>().await;
                };
                let reading = async {
                    let first = stream_next(&mut stream).await;
                    let second = stream_next(&mut stream).await;
                    (first, second)
                };
                let (first, second) = bounded(check, "reading a message at and over the limit", async {
                    futures::pin_mut!(sending);
                    futures::pin_mut!(reading);
                    match futures::future::select(sending, reading).await {
                        futures::future::Either::Right((r, _)) => r,
                        futures::future::Either::Left(((), _)) => unreachable!("the sender never ends"),
                    }
                })
                .await?;
                ensure!(
                    matches!(&first, Some(Ok(Frame::Binary(b))) if *b == fits),
                    check,
                    "a message of exactly {max} bytes came out as {:?}",
                    first.map(|r| r.map(|f| frame_summary(&f)))
                );
                ensure!(
                    matches!(second, Some(Err(TransportError::MessageTooBig))),
                    check,
                    "a message of {} bytes (limit {max}) came out as {:?}",
                    max + 1,
                    second.map(|r| r.map(|f| frame_summary(&f)))
                );
                report.passed.push(check);
            }
        }

        // 5. Invalid UTF-8.
        let check = "transport.invalid_utf8";
        if !inbound {
            report.skipped.push((check, one_way));
        } else if !self.utf8 {
            report.skipped.push((check, "without_utf8_check: the peer cannot send text that is not UTF-8"));
        } else {
            let (t, mut peer) = (self.connect)().await;
            let (_sink, mut stream) = t.split();
            let sent =
                bounded(check, "the peer sending bad text", peer.send(Frame::Text(Bytes::from_static(b"ok \xff\xfe"))))
                    .await?;
            ensure!(sent.is_ok(), check, "the peer could not send: {:?}", sent.err());
            let got = bounded(check, "reading a text message that is not UTF-8", stream_next(&mut stream)).await?;
            ensure!(
                matches!(got, Some(Err(TransportError::InvalidUtf8))),
                check,
                "text that is not UTF-8 came out as {got:?}"
            );
            drop(peer);
            report.passed.push(check);
        }

        // 6. A vanished peer ends the stream.
        let check = "transport.vanish";
        {
            let (t, peer) = (self.connect)().await;
            let (_sink, mut stream) = t.split();
            drop(peer);
            let end = async {
                loop {
                    match stream.next().await {
                        Some(Ok(_)) => continue,
                        None | Some(Err(_)) => return,
                    }
                }
            };
            bounded(
                check,
                "the stream after the peer went away without a close frame (it neither ended nor failed)",
                end,
            )
            .await?;
            report.passed.push(check);
        }

        // 7. Native pings.
        let check = "transport.ping";
        if !caps.native_ping {
            report.skipped.push((check, "no native ping (capabilities: native_ping false)"));
        } else {
            let (t, mut peer) = (self.connect)().await;
            let (mut sink, mut stream) = t.split();
            let ping = Bytes::from_static(b"conformance ping");
            let sent = bounded(check, "sending a ping", sink.send(Frame::Ping(ping.clone()))).await?;
            ensure!(sent.is_ok(), check, "the sink failed: {:?}", sent.err());
            let got = bounded(check, "the peer waiting for a ping", async {
                loop {
                    match peer.recv().await {
                        Some(Frame::Pong(_)) => continue,
                        other => return other,
                    }
                }
            })
            .await?;
            if inbound {
                ensure!(got == Some(Frame::Ping(ping.clone())), check, "sent a ping, the peer got {got:?}");
            } else {
                ensure!(matches!(got, Some(Frame::Ping(_))), check, "sent a ping, the peer got {got:?}");
            }
            if inbound {
                let sent = bounded(check, "the peer sending a ping", peer.send(Frame::Ping(ping.clone()))).await?;
                ensure!(sent.is_ok(), check, "the peer could not send: {:?}", sent.err());
                let got = bounded(check, "waiting for the peer's ping", async {
                    loop {
                        match stream.next().await {
                            Some(Ok(Frame::Pong(_))) => continue,
                            other => return other,
                        }
                    }
                })
                .await?;
                ensure!(
                    matches!(&got, Some(Ok(Frame::Ping(p))) if *p == ping),
                    check,
                    "the peer sent a ping, the stream yielded {got:?}"
                );
            }
            report.passed.push(check);
        }

        // 8. Half-closed: the peer's frames still come after our close.
        let check = "transport.half_closed";
        if inbound {
            let (t, mut peer) = (self.connect)().await;
            let (mut sink, mut stream) = t.split();
            let ours = CloseFrame { code: CloseCode(1000), reason: "conformance: closing".into() };
            let sent = bounded(check, "sending a close frame", sink.send(Frame::Close(Some(ours)))).await?;
            ensure!(sent.is_ok(), check, "the sink failed: {:?}", sent.err());
            // The peer had these in flight when our close reached it.
            let theirs = CloseFrame { code: CloseCode(1000), reason: "conformance: closing too".into() };
            let sent = bounded(check, "the peer sending after our close", async {
                peer.send(data_frame(0)).await?;
                peer.send(Frame::Close(Some(theirs.clone()))).await
            })
            .await?;
            ensure!(sent.is_ok(), check, "the peer could not send: {:?}", sent.err());
            let first = bounded(check, "reading after our close frame", stream_next(&mut stream)).await?;
            ensure!(
                matches!(&first, Some(Ok(f)) if *f == data_frame(0)),
                check,
                "after the sink's close, the peer's frame came out as {first:?}"
            );
            let second = bounded(check, "waiting for the peer's close after ours", stream_next(&mut stream)).await?;
            ensure!(
                matches!(&second, Some(Ok(Frame::Close(Some(c)))) if *c == theirs),
                check,
                "after the sink's close, the peer's close came out as {second:?}"
            );
            report.passed.push(check);
        } else {
            report.skipped.push((check, one_way));
        }

        // 9. One-way: the side channel in order, and no made-up pong.
        let check = "transport.one_way";
        if inbound {
            report.skipped.push((check, "bidirectional (capabilities: bidirectional true)"));
        } else {
            let (t, mut peer) = (self.connect)().await;
            let (mut sink, mut stream) = t.split();
            let sent = bounded(check, "sending a ping", sink.send(Frame::Ping(Bytes::new()))).await?;
            ensure!(sent.is_ok(), check, "the sink failed: {:?}", sent.err());
            const SIDE: usize = 20;
            let send = async {
                for i in 0..SIDE {
                    peer.send(data_frame(i)).await?;
                }
                Ok::<_, TransportError>(())
            };
            let recv = async {
                let mut got = Vec::with_capacity(SIDE);
                while got.len() < SIDE {
                    match stream.next().await {
                        Some(item) => got.push(item),
                        None => break,
                    }
                }
                got
            };
            let (sent, got) =
                bounded(check, "frames through the side channel", futures::future::join(send, recv)).await?;
            ensure!(sent.is_ok(), check, "the peer could not send: {:?}", sent.err());
            for (i, f) in got.iter().enumerate() {
                ensure!(
                    matches!(f, Ok(f) if *f == data_frame(i)),
                    check,
                    "side-channel frame {i} came out as {:?} (a one-way stream has no pongs to give)",
                    f.as_ref().map(frame_summary)
                );
            }
            ensure!(got.len() == SIDE, check, "the stream yielded {} of {SIDE} frames", got.len());
            report.passed.push(check);
        }
        Ok(report)
    }
}

/// A frame for a failure message, without a large payload.
fn frame_summary(frame: &Frame) -> String {
    match frame {
        Frame::Text(b) => format!("Text({} bytes)", b.len()),
        Frame::Binary(b) => format!("Binary({} bytes)", b.len()),
        other => format!("{other:?}"),
    }
}

/// The suite on the SSE transport, with its real response body and inbound
/// queue (here, not in the transport: `testing` depends on `transport`).
#[cfg(all(test, feature = "sse"))]
mod sse {
    use super::*;
    use crate::transport::event_stream;
    use crate::transport::sse::conn::{CloseRetry, Posted, Shared, SseTransport, StreamBody};
    use std::collections::VecDeque;
    use std::sync::Arc;

    /// The far end of an SSE stream for the transport suite: it reads the
    /// response body as a client does (events back into frames: unnamed
    /// events are text, `$close` the close frame, `: ping` a ping) and
    /// sends through the inbound queue, as a POST does.
    struct SsePeer {
        body: StreamBody,
        inbound: Arc<Shared>,
        text: String,
        ready: VecDeque<Frame>,
    }

    impl Peer for SsePeer {
        fn send(&mut self, frame: Frame) -> futures::future::BoxFuture<'_, Result<(), TransportError>> {
            // As a POST delivers; a client retries one refused with 429
            // (the queue is full) once the reader took some.
            Box::pin(async move {
                loop {
                    match self.inbound.post(vec![frame.clone()]) {
                        Posted::Queued => return Ok(()),
                        Posted::Full => tokio::task::yield_now().await,
                        Posted::Closed => return Err(TransportError::Closed),
                    }
                }
            })
        }

        fn recv(&mut self) -> futures::future::BoxFuture<'_, Option<Frame>> {
            Box::pin(async move {
                loop {
                    if let Some(f) = self.ready.pop_front() {
                        return Some(f);
                    }
                    let chunk = futures::future::poll_fn(|cx| self.body.poll_chunk(cx)).await?;
                    self.text.push_str(std::str::from_utf8(&chunk).expect("the body is UTF-8"));
                    while let Some(end) = self.text.find("\n\n") {
                        let block: String = self.text.drain(..end + 2).collect();
                        if block.starts_with(": ping") {
                            self.ready.push_back(Frame::Ping(Bytes::new()));
                            continue;
                        }
                        for (_, name, data) in event_stream::parse(&block) {
                            self.ready.push_back(match name.as_str() {
                                "$close" => {
                                    let v: serde_json::Value = serde_json::from_str(&data).expect("$close is JSON");
                                    let code = CloseCode(v["code"].as_u64().expect("a code") as u16);
                                    let reason = v["reason"].as_str().unwrap_or("").to_owned();
                                    Frame::Close(Some(CloseFrame { code, reason }))
                                }
                                _ => Frame::Text(Bytes::from(data)),
                            });
                        }
                    }
                }
            })
        }
    }

    /// The transport conformance suite on the SSE transport: its sink and
    /// stream with the real response body and inbound queue.
    #[tokio::test]
    async fn sse_transport_conforms() {
        let connect = || async {
            let shared = Arc::new(Shared::new(1, [0; 16], 16));
            let body = StreamBody::new(Bytes::new(), shared.clone());
            let t = SseTransport::new(shared.clone(), CloseRetry { retry_ms: 10 }, Box::new(|| {}));
            (t, SsePeer { body, inbound: shared, text: String::new(), ready: VecDeque::new() })
        };
        let report = TransportSuite::new(connect).run().await.unwrap_or_else(|f| panic!("{f}"));
        assert_eq!(
            report.passed,
            ["transport.order", "transport.close_sent", "transport.vanish", "transport.ping", "transport.one_way"]
        );
        let skipped: Vec<&str> = report.skipped.iter().map(|(c, _)| *c).collect();
        assert_eq!(
            skipped,
            ["transport.close_received", "transport.too_big", "transport.invalid_utf8", "transport.half_closed"]
        );
    }
}
