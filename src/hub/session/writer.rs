//! The connection's writer: drains the outbox into the transport's sink,
//! one batch and one flush at a time.

use super::*;

/// The writer: takes everything queued in one go, feeds it to the sink, and
/// flushes once per batch (coalescing many small frames into few writes).
///
/// Returns whether the close frame was sent. Not an `async fn`, and the
/// batch is fed by one `poll_fn` rather than a `feed(..).await` per frame:
/// this future lives as long as the connection, and each await point of
/// an `async` body keeps its own state (the writer task was ~900 bytes).
#[allow(clippy::manual_async_fn)] // an `async fn` would hold its arguments twice
pub(super) fn write_loop<S>(session: Arc<Session>, mut sink: S) -> impl Future<Output = bool> + Send
where
    S: Sink<Frame, Error = TransportError> + Send + Unpin,
{
    async move {
        let mut batch: VecDeque<Bytes> = VecDeque::new();
        let mut gaps: Vec<(Arc<str>, u64, u64)> = Vec::new();
        loop {
            let (mut ping, mut pong, batch_bytes, mut lagged, mut close, closing) = {
                let mut st = session.outbox.state.lock();
                std::mem::swap(&mut st.queue, &mut batch);
                // Taken frames are on their way: no longer droppable.
                st.head += batch.len() as u64;
                st.tags.clear();
                // From here a push must wake the writer again (Notify keeps the
                // permit if the writer is not waiting yet).
                st.woken = false;
                // Everything counted in `bytes` is in the queue just taken: the
                // previous batch was subtracted when it was written.
                let bytes = st.bytes;
                debug_assert_eq!(bytes, batch.iter().map(Bytes::len).sum::<usize>());
                if !st.gaps.is_empty() {
                    std::mem::swap(&mut st.gaps, &mut gaps);
                }
                let ping = st.ping.take();
                if ping.is_some() && batch.is_empty() {
                    // A heartbeat ping with no data since the last write: the
                    // connection is idle, so its two queue buffers (grown by
                    // earlier traffic) are given back rather than kept for
                    // the next burst. A busy connection keeps them: its pings
                    // travel with data.
                    st.queue = VecDeque::new();
                    st.tags = VecDeque::new();
                    batch = VecDeque::new();
                }
                (ping, st.pong.take(), bytes, std::mem::take(&mut st.lagged), st.close_frame.take(), st.closing)
            };
            if ping.is_none() && pong.is_none() && batch.is_empty() && lagged == 0 && gaps.is_empty() && close.is_none()
            {
                if closing {
                    return false;
                }
                session.outbox.notify.notified().await;
                continue;
            }
            let closes = close.is_some();
            let mut gap = 0;
            // In order: the pong, the heartbeat ping, the `lagged` notice, the
            // gap notices, the data, the close frame; then one flush.
            let result = futures::future::poll_fn(|cx| {
                loop {
                    let more = pong.is_some()
                        || ping.is_some()
                        || lagged > 0
                        || gap < gaps.len()
                        || !batch.is_empty()
                        || close.is_some();
                    if !more {
                        break;
                    }
                    // Ready before taking a frame: a `Pending` here keeps it.
                    ready!(sink.poll_ready_unpin(cx))?;
                    let frame = if let Some(f) = pong.take() {
                        f
                    } else if let Some(f) = ping.take() {
                        f
                    } else if lagged > 0 {
                        let data = lagged_payload(session.format, std::mem::take(&mut lagged));
                        session.notice(Parts { data: Some(data.bytes()), ..Parts::new(Kind::Lagged) })
                    } else if let Some((room, from, to)) = gaps.get(gap) {
                        gap += 1;
                        let reason = super::super::stream::GapReason::SlowConsumer;
                        let data =
                            super::super::stream::gap_payload(session.format, Some(*from), Some(*to), reason, None);
                        session.notice(Parts { room: Some(room), data: Some(data.bytes()), ..Parts::new(Kind::Gap) })
                    } else if let Some(bytes) = batch.pop_front() {
                        session.frame(bytes)
                    } else {
                        // Only the close frame is left (`more` above).
                        Frame::Close(close.take())
                    };
                    sink.start_send_unpin(frame)?;
                }
                sink.poll_flush_unpin(cx)
            })
            .await;
            gaps.clear();
            batch.clear();
            session.outbox.state.lock().bytes -= batch_bytes;
            if let Err(e) = result {
                tracing::debug!(connection = %session.id, error = %e, "write failed");
                session.close_with(DisconnectReason::ConnectionLost, None, true);
                return false;
            }
            if closes {
                return true;
            }
        }
    }
}

pub(super) fn lagged_payload(format: Format, dropped: u64) -> Payload {
    #[derive(serde::Serialize)]
    struct Lag {
        dropped: u64,
    }
    Payload::encode(format, &Lag { dropped }).unwrap_or_else(|_| Payload::null(format))
}
