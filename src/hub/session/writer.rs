//! The connection's writer: drains the outbox into the transport's sink,
//! one batch and one flush at a time.

use super::log::{LogReader, Read};
use super::outbox::{GapRanges, Taken};
use super::sse_stream::StreamWriter;
use super::*;

/// The writer: takes everything queued in one go, feeds it to the sink, and
/// flushes once per batch (coalescing many small frames into few writes; a
/// batch over [`WRITE_CHUNK`] once per chunk, so a close that discards the
/// queue can cut it short).
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
        let mut gaps: GapRanges = Vec::new();
        // An event stream's positions and the tags of its batch: the writer
        // gives each event its stream id as it writes it (`sse_stream.rs`).
        // Boxed: one word in every other connection's writer.
        let mut stream = session.stream.clone().map(|spec| Box::new(StreamWriter::new(spec)));
        // The room logs it reads (`log.rs`): boxed, and allocated by the
        // take that first finds a cursor (one word in the writer of a
        // connection that joined no room).
        let mut logs: Option<Box<LogReader>> = None;
        let may_read_logs = session.reads_logs();
        loop {
            let Taken { mut ping, mut pong, bytes: batch_bytes, mut lagged, mut close, closing } = session.outbox.take(
                &mut batch,
                &mut gaps,
                stream.as_mut().map(|s| &mut s.tags),
                may_read_logs.then_some(&mut logs),
            );
            let reads_logs = logs.as_ref().is_some_and(|l| !l.cursors.is_empty());
            if let Some(l) = logs.as_deref().filter(|_| reads_logs) {
                // Before reading them: an append after this wakes it again.
                session.outbox.log_woken.swap(false, Ordering::SeqCst);
                std::sync::atomic::fence(Ordering::SeqCst);
                if ping.is_some() && batch.is_empty() {
                    // Idle at a heartbeat: a room that went quiet gives
                    // back what its log still holds.
                    for c in &l.cursors {
                        c.log.trim_if_dirty();
                    }
                }
            }
            if ping.is_none()
                && pong.is_none()
                && batch.is_empty()
                && lagged == 0
                && gaps.is_empty()
                && close.is_none()
                && !logs.as_deref().is_some_and(|l| reads_logs && l.has_more())
            {
                if closing {
                    return false;
                }
                session.outbox.notify.notified().await;
                continue;
            }
            let closes = close.is_some();
            // A one-way transport's peer cannot answer the heartbeat: the
            // ping flushed is its answer (a peer that stopped reading shows
            // as a flush that does not finish; the heartbeat then times out).
            let ping_is_answer = ping.is_some() && !session.caps.bidirectional;
            let mut gap = 0;
            let mut index = 0u64;
            // Data bytes fed to the sink since its last flush.
            let mut fed = 0usize;
            // Bytes copied from room logs in this round.
            let mut log_bytes = 0usize;
            // Whether the logs may have something (before the batch's next
            // frame, or after the batch).
            let mut log_more = reads_logs;
            // In order: the pong, the heartbeat ping, the `lagged` notice, the
            // gap notices, the data (the logs' up to each frame's fence, then
            // the frame; after the batch, the logs' up to their ends), the
            // close frame; then one flush.
            let result = futures::future::poll_fn(|cx| {
                loop {
                    let more = pong.is_some()
                        || ping.is_some()
                        || stream.as_ref().is_some_and(|s| !s.extra.is_empty())
                        || lagged > 0
                        || gap < gaps.len()
                        || !batch.is_empty()
                        || log_more
                        || close.is_some();
                    if !more {
                        break;
                    }
                    if fed >= WRITE_CHUNK {
                        // A big batch goes out in chunks, each flushed before
                        // the next is fed. Between two, a close that discards
                        // the queue (slow consumer, heartbeat timeout) drops
                        // the rest of the batch as well, so the close frame
                        // is written next, behind at most one chunk and what
                        // the kernel holds: a client that reads slowly gets
                        // it (issue 18), instead of a socket ended after
                        // `close_timeout` with the frame still behind up to
                        // a whole queue's worth of data.
                        ready!(sink.poll_flush_unpin(cx))?;
                        fed = 0;
                        if close.is_none() && session.outbox.discarding() {
                            // (The close stopped the logs' cursors.)
                            batch.clear();
                            lagged = 0;
                            gap = gaps.len();
                            if let Some(s) = &mut stream {
                                s.extra.clear();
                            }
                            continue;
                        }
                    }
                    // Ready before taking a frame: a `Pending` here keeps it.
                    ready!(sink.poll_ready_unpin(cx))?;
                    let frame = if let Some(f) = pong.take() {
                        f
                    } else if let Some(f) = ping.take() {
                        f
                    } else if let Some(f) = stream.as_mut().and_then(|s| s.extra.pop_front()) {
                        f
                    } else if lagged > 0 {
                        crate::metrics::lagged(lagged);
                        let data = lagged_payload(session.format, std::mem::take(&mut lagged));
                        session.notice(Parts { data: Some(data.bytes()), ..Parts::new(Kind::Lagged) })
                    } else if let Some((room, from, to)) = gaps.get(gap) {
                        gap += 1;
                        crate::metrics::gap_notice();
                        let reason = super::super::stream::GapReason::SlowConsumer;
                        let data =
                            super::super::stream::gap_payload(session.format, Some(*from), Some(*to), reason, None);
                        let notice = session.notice(Parts {
                            room: Some(room),
                            data: Some(data.bytes()),
                            ..Parts::new(Kind::Gap)
                        });
                        if let Some(s) = &mut stream {
                            if let Some(i) = s.ids.index_of(room) {
                                s.ids.gap(i, reason, Some(*to), None, &mut s.extra);
                            }
                        }
                        notice
                    } else if let Some(l) = logs.as_deref_mut().filter(|_| log_more) {
                        match l.read(&session, (!batch.is_empty()).then_some(index)) {
                            Read::Chunk(chunk) => {
                                fed += chunk.len();
                                log_bytes += chunk.len();
                                session.frame(chunk)
                            }
                            // The `lagged` notice goes out next, before
                            // what follows the skipped events.
                            Read::Lagged(n) => {
                                lagged += n;
                                continue;
                            }
                            // Before a frame: that frame next, and the logs
                            // again after it.
                            Read::Done => {
                                log_more = false;
                                continue;
                            }
                        }
                    } else if let Some(bytes) = batch.pop_front() {
                        fed += bytes.len();
                        let frame = session.frame(bytes);
                        let i = index;
                        index += 1;
                        log_more = reads_logs;
                        match &mut stream {
                            Some(s) => s.write(frame, i),
                            None => frame,
                        }
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
            if let Some(s) = &mut stream {
                s.tags.clear();
                s.extra.clear();
            }
            if let Some(l) = &mut logs {
                l.fences.clear();
            }
            session.outbox.written(batch_bytes);
            if let Err(e) = result {
                tracing::debug!(connection = %session.id, error = %e, "write failed");
                session.close_with(DisconnectReason::ConnectionLost, None, true);
                return false;
            }
            crate::metrics::bytes_out(batch_bytes + log_bytes);
            if ping_is_answer {
                session.alive.store(true, Ordering::Relaxed);
            }
            if closes {
                return true;
            }
        }
    }
}

/// Data bytes the writer feeds the sink between two flushes of a big batch
/// (see the loop above). Batches up to this size go out in one flush.
const WRITE_CHUNK: usize = 64 * 1024;

pub(super) fn lagged_payload(format: Format, dropped: u64) -> Payload {
    #[derive(serde::Serialize)]
    struct Lag {
        dropped: u64,
    }
    Payload::encode(format, &Lag { dropped }).unwrap_or_else(|_| Payload::null(format))
}
