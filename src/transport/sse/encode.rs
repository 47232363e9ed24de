//! The body side of the `text/event-stream` format: a [`Batch`] of events,
//! comments and pre-framed chunks handed to the response body at once.
//! The format itself (fields, `data:` lines) is `transport::event_stream`.
//! Every writer here appends complete events (or an `id:` line that the
//! next chunk's event completes, see [`Batch::at_boundary`]), so whatever is
//! sent between two batches (a keep-alive comment) never lands inside one.

use crate::transport::event_stream;
use bytes::{BufMut, Bytes, BytesMut};

pub(crate) use crate::transport::event_stream::is_field_safe;

/// Builds a batch of events as a list of buffers: headers are written into
/// a scratch buffer; a pre-framed event (whatever its size) and a payload of
/// 256 bytes or more are queued as the same `Bytes` the hub made once for
/// every recipient (no copy: the response body gathers small ones into one
/// chunk when hyper asks, `conn::StreamBody`).
#[derive(Debug, Default)]
pub(crate) struct Batch {
    scratch: BytesMut,
    chunks: Vec<Bytes>,
    len: usize,
    /// The last thing appended was an `id:` line whose event has not
    /// followed yet.
    open: bool,
}

/// Chunks this large are shared rather than copied into the scratch buffer.
const SHARE_FROM: usize = 256;

impl Batch {
    /// Bytes queued (written and pending in the scratch buffer).
    pub(crate) fn len(&self) -> usize {
        self.len + self.scratch.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the batch ends between two events (it can be handed over).
    pub(crate) fn at_boundary(&self) -> bool {
        !self.open
    }

    /// Takes the batch's buffers, leaving it empty.
    pub(crate) fn take(&mut self) -> Vec<Bytes> {
        self.cut();
        self.len = 0;
        std::mem::take(&mut self.chunks)
    }

    /// Moves the batch's buffers to the end of `out` (when `out` is empty,
    /// the two lists trade places: no buffer is allocated or copied).
    /// Returns the bytes moved.
    pub(crate) fn move_into(&mut self, out: &mut Vec<Bytes>) -> usize {
        self.cut();
        if out.is_empty() {
            std::mem::swap(out, &mut self.chunks);
        } else {
            out.append(&mut self.chunks);
        }
        std::mem::take(&mut self.len)
    }

    /// Gives back the chunk list's memory when it is empty (an idle stream
    /// keeps no buffer grown by an earlier burst).
    pub(crate) fn shrink(&mut self) {
        if self.chunks.is_empty() {
            self.chunks = Vec::new();
        }
        if self.scratch.is_empty() {
            self.scratch = BytesMut::new();
        }
    }

    fn cut(&mut self) {
        if !self.scratch.is_empty() {
            let b = self.scratch.split().freeze();
            self.len += b.len();
            self.chunks.push(b);
        }
    }

    fn share(&mut self, b: &Bytes) {
        if b.len() >= SHARE_FROM {
            self.push(b.clone());
        } else {
            self.scratch.put_slice(b);
        }
    }

    /// Queues `b` itself, after what the scratch buffer holds.
    fn push(&mut self, b: Bytes) {
        self.cut();
        self.len += b.len();
        self.chunks.push(b);
    }

    /// A `retry:` field on its own (it sets the client's reconnection delay
    /// and dispatches no event).
    pub(crate) fn retry(&mut self, ms: u64) {
        event_stream::put_field(&mut self.scratch, "retry", &ms.to_string());
        self.scratch.put_u8(b'\n');
    }

    /// A comment line (ignored by clients; keeps proxies from timing out).
    pub(crate) fn comment(&mut self, text: &str) {
        debug_assert!(is_field_safe(text));
        self.scratch.put_slice(b": ");
        self.scratch.put_slice(text.as_bytes());
        self.scratch.put_slice(b"\n\n");
    }

    /// Event-stream bytes framed by the session
    /// ([`Framing::EventStream`](crate::transport::Framing::EventStream)):
    /// whole events, or an `id:` line (not ending in an empty line) that
    /// the next chunk's event completes. Queued as it is, never copied:
    /// an event framed once per broadcast is the same buffer in every
    /// stream's batch.
    pub(crate) fn framed(&mut self, chunk: Bytes) {
        self.open = !chunk.ends_with(b"\n\n");
        self.push(chunk);
    }

    /// One event. `id` and `event` must pass [`is_field_safe`] (an unsafe
    /// one is left out rather than written). `data` is split on CR, LF and
    /// CRLF into `data:` lines.
    pub(crate) fn event(&mut self, id: Option<&str>, event: Option<&str>, data: &Bytes) {
        self.open = false;
        if !event_stream::is_single_line(data) || data.len() < SHARE_FROM {
            return event_stream::put_event(&mut self.scratch, id, event, data);
        }
        if let Some(id) = id.filter(|v| is_field_safe(v)) {
            event_stream::put_field(&mut self.scratch, "id", id);
        }
        if let Some(event) = event.filter(|v| is_field_safe(v)) {
            event_stream::put_field(&mut self.scratch, "event", event);
        }
        // Share the payload buffer instead of copying it.
        self.scratch.put_slice(b"data: ");
        self.share(data);
        self.scratch.put_slice(b"\n\n");
    }
}

#[cfg(test)]
pub(crate) use crate::transport::event_stream::parse;

#[cfg(test)]
mod tests {
    use super::*;

    fn text(b: &mut Batch) -> String {
        let chunks = b.take();
        String::from_utf8(chunks.concat()).unwrap()
    }

    #[test]
    fn single_line_and_shared_payload() {
        let mut b = Batch::default();
        let big = Bytes::from("x".repeat(300));
        b.event(Some("7"), Some("tick"), &Bytes::from_static(b"{\"a\":1}"));
        b.event(None, None, &big);
        assert_eq!(b.chunks.len() + usize::from(!b.scratch.is_empty()), 3, "the big payload is its own chunk");
        let s = text(&mut b);
        assert!(s.starts_with("id: 7\nevent: tick\ndata: {\"a\":1}\n\n"));
        let events = parse(&s);
        assert_eq!(events[1], ("7".into(), "message".into(), "x".repeat(300)));
    }

    #[test]
    fn framed_chunks_are_shared_and_ids_hold_the_boundary() {
        let mut b = Batch::default();
        let framed = event_stream::event(None, Some("tick"), "y".repeat(300).as_bytes());
        b.framed(event_stream::id_field("s1.x").unwrap());
        assert!(!b.at_boundary(), "an id line waits for its event");
        b.framed(framed.clone());
        assert!(b.at_boundary());
        let chunks = b.take();
        assert!(chunks.iter().any(|c| c.as_ptr() == framed.as_ptr()), "the broadcast's buffer itself");
        let events = parse(&String::from_utf8(chunks.concat()).unwrap());
        assert_eq!(events, [("s1.x".into(), "tick".into(), "y".repeat(300))]);
    }

    #[test]
    fn comments_and_retry() {
        let mut b = Batch::default();
        b.event(Some("1\n2"), Some("x\ny"), &Bytes::from_static(b"d"));
        b.comment("keep-alive");
        b.retry(1500);
        let s = text(&mut b);
        assert_eq!(s, "data: d\n\n: keep-alive\n\nretry: 1500\n\n");
    }
}
