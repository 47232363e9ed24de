//! The `text/event-stream` wire format: fields, events, comments.
//!
//! An event is a block of `field: value` lines ended by an empty line. Only
//! CR, LF and CRLF end a line, so a value must never contain them: `data` is
//! split into one `data:` line per line of the payload (the client joins them
//! back with LF), and `id` and `event` values are checked by the callers
//! (see [`is_field_safe`]). Every writer here appends complete events, so
//! whatever is sent between two of them (a keep-alive comment) can never
//! land inside one.

use bytes::{BufMut, Bytes, BytesMut};

/// Whether `value` can be written as an `id:` or `event:` value: no CR, no
/// LF (which would end the line) and no NUL (browsers ignore an `id` with
/// one).
pub(crate) fn is_field_safe(value: &str) -> bool {
    !value.bytes().any(|b| b == b'\n' || b == b'\r' || b == 0)
}

/// Builds a batch of events as a list of buffers: headers are written into
/// a scratch buffer, and a payload without line breaks is queued as the
/// same `Bytes` the hub encoded once for every recipient (no copy).
#[derive(Debug, Default)]
pub(crate) struct Batch {
    scratch: BytesMut,
    chunks: Vec<Bytes>,
    len: usize,
}

impl Batch {
    /// Bytes queued (written and pending in the scratch buffer).
    pub(crate) fn len(&self) -> usize {
        self.len + self.scratch.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Takes the batch's buffers, leaving it empty.
    pub(crate) fn take(&mut self) -> Vec<Bytes> {
        self.cut();
        self.len = 0;
        std::mem::take(&mut self.chunks)
    }

    fn cut(&mut self) {
        if !self.scratch.is_empty() {
            let b = self.scratch.split().freeze();
            self.len += b.len();
            self.chunks.push(b);
        }
    }

    fn field(&mut self, name: &str, value: &str) {
        self.scratch.reserve(name.len() + value.len() + 3);
        self.scratch.put_slice(name.as_bytes());
        self.scratch.put_slice(b": ");
        self.scratch.put_slice(value.as_bytes());
        self.scratch.put_u8(b'\n');
    }

    /// A `retry:` field on its own (it sets the client's reconnection delay
    /// and dispatches no event).
    pub(crate) fn retry(&mut self, ms: u64) {
        self.field("retry", &ms.to_string());
        self.scratch.put_u8(b'\n');
    }

    /// A comment line (ignored by clients; keeps proxies from timing out).
    pub(crate) fn comment(&mut self, text: &str) {
        debug_assert!(is_field_safe(text));
        self.scratch.put_slice(b": ");
        self.scratch.put_slice(text.as_bytes());
        self.scratch.put_slice(b"\n\n");
    }

    /// One event. `id` and `event` must pass [`is_field_safe`] (callers
    /// check; an unsafe one is left out rather than written). `data` is
    /// split on CR, LF and CRLF into `data:` lines.
    pub(crate) fn event(&mut self, id: Option<&str>, event: Option<&str>, data: &Bytes) {
        if let Some(id) = id.filter(|v| is_field_safe(v)) {
            self.field("id", id);
        }
        if let Some(event) = event.filter(|v| is_field_safe(v)) {
            self.field("event", event);
        }
        if !data.iter().any(|&b| b == b'\n' || b == b'\r') {
            self.scratch.put_slice(b"data: ");
            if data.len() >= 256 {
                // Share the payload buffer instead of copying it.
                self.cut();
                self.len += data.len();
                self.chunks.push(data.clone());
            } else {
                self.scratch.put_slice(data);
            }
            self.scratch.put_slice(b"\n\n");
            return;
        }
        let mut rest: &[u8] = data;
        loop {
            let end = rest.iter().position(|&b| b == b'\n' || b == b'\r');
            let (line, next) = match end {
                Some(i) => {
                    let skip = if rest[i] == b'\r' && rest.get(i + 1) == Some(&b'\n') { 2 } else { 1 };
                    (&rest[..i], Some(&rest[i + skip..]))
                }
                None => (rest, None),
            };
            self.scratch.put_slice(b"data: ");
            self.scratch.put_slice(line);
            self.scratch.put_u8(b'\n');
            match next {
                Some(n) => rest = n,
                None => break,
            }
        }
        self.scratch.put_u8(b'\n');
    }
}

#[cfg(test)]
/// What a client following the HTML event-stream parsing rules makes of
/// `stream`: (id, event, data) of each dispatched event.
pub(crate) fn parse(stream: &str) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    let (mut id, mut event, mut data) = (String::new(), String::new(), String::new());
    let normalized = stream.replace("\r\n", "\n").replace('\r', "\n");
    for line in normalized.split('\n') {
        if line.is_empty() {
            if !data.is_empty() {
                data.pop();
                out.push((id.clone(), if event.is_empty() { "message".into() } else { event.clone() }, data));
            }
            data = String::new();
            event.clear();
            continue;
        }
        if line.starts_with(':') {
            continue;
        }
        let (name, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match name {
            "id" => id = value.to_owned(),
            "event" => event = value.to_owned(),
            "data" => {
                data.push_str(value);
                data.push('\n');
            }
            _ => {}
        }
    }
    out
}

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
    fn multi_line_data_round_trips() {
        let cases = ["a\nb", "a\r\nb", "a\rb", "a\n", "\n", "", "é🎉\n\n  spaced", "x\r\n\r\ny"];
        for case in cases {
            let mut b = Batch::default();
            b.event(None, Some("e"), &Bytes::from(case.to_owned()));
            let s = text(&mut b);
            // Framing survives: exactly one event, and no line but the
            // separators is empty.
            let events = parse(&s);
            if case.is_empty() {
                assert!(events.is_empty() || events[0].2.is_empty(), "{case:?}: {s:?}");
                continue;
            }
            assert_eq!(events.len(), 1, "{case:?}: {s:?}");
            let want = case.replace("\r\n", "\n").replace('\r', "\n");
            assert_eq!(events[0].2, want, "{case:?}: {s:?}");
            assert!(s.ends_with("\n\n") && !s[..s.len() - 2].contains("\n\n"), "{case:?}: {s:?}");
        }
    }

    #[test]
    fn unsafe_fields_are_left_out() {
        assert!(!is_field_safe("a\nb"));
        assert!(!is_field_safe("a\rb"));
        assert!(!is_field_safe("a\0b"));
        let mut b = Batch::default();
        b.event(Some("1\n2"), Some("x\ny"), &Bytes::from_static(b"d"));
        b.comment("keep-alive");
        b.retry(1500);
        let s = text(&mut b);
        assert_eq!(s, "data: d\n\n: keep-alive\n\nretry: 1500\n\n");
    }
}
