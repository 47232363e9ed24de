//! The `text/event-stream` wire format (the HTML standard's Server-Sent
//! Events): fields, events, comments. Used by [`Framing::EventStream`]
//! (the session frames data frames as events once per broadcast) and by
//! the SSE transport's sink.
//!
//! An event is a block of `field: value` lines ended by an empty line. Only
//! CR, LF and CRLF end a line, so a value must never contain them: `data` is
//! split into one `data:` line per line of the payload (the client joins them
//! back with LF), and `id` and `event` values are checked
//! ([`is_field_safe`]; an unsafe one is left out rather than written).
//!
//! [`Framing::EventStream`]: super::Framing::EventStream

use bytes::{BufMut, Bytes, BytesMut};

/// The `id:` of a terminal `$close`: a reconnect carrying it is answered
/// `204 No Content`, which makes browsers stop (`docs/sse.md` §5).
pub(crate) const STOP_ID: &str = "stop";

/// Whether `value` can be written as an `id:` or `event:` value: no CR, no
/// LF (which would end the line) and no NUL (browsers ignore an `id` with
/// one).
pub(crate) fn is_field_safe(value: &str) -> bool {
    !value.bytes().any(|b| b == b'\n' || b == b'\r' || b == 0)
}

/// Appends a `name: value` line.
pub(crate) fn put_field(out: &mut BytesMut, name: &str, value: &str) {
    out.reserve(name.len() + value.len() + 3);
    out.put_slice(name.as_bytes());
    out.put_slice(b": ");
    out.put_slice(value.as_bytes());
    out.put_u8(b'\n');
}

/// Whether `data` fits on one `data:` line.
#[cfg_attr(not(feature = "sse"), allow(dead_code))] // the SSE sink's batch
pub(crate) fn is_single_line(data: &[u8]) -> bool {
    !data.iter().any(|&b| b == b'\n' || b == b'\r')
}

/// Appends the `data:` lines of `data` and the empty line that ends the
/// event: `data` is split on CR, LF and CRLF.
pub(crate) fn put_data(out: &mut BytesMut, data: &[u8]) {
    out.reserve(data.len() + 8);
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
        out.put_slice(b"data: ");
        out.put_slice(line);
        out.put_u8(b'\n');
        match next {
            Some(n) => rest = n,
            None => break,
        }
    }
    out.put_u8(b'\n');
}

/// Appends one whole event. `id` and `event` are left out when they do not
/// pass [`is_field_safe`].
pub(crate) fn put_event(out: &mut BytesMut, id: Option<&str>, event: Option<&str>, data: &[u8]) {
    if let Some(id) = id.filter(|v| is_field_safe(v)) {
        put_field(out, "id", id);
    }
    if let Some(event) = event.filter(|v| is_field_safe(v)) {
        put_field(out, "event", event);
    }
    put_data(out, data);
}

/// One whole event as its own buffer.
pub(crate) fn event(id: Option<&str>, event: Option<&str>, data: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(data.len() + 32);
    put_event(&mut out, id, event, data);
    out.freeze()
}

/// An `id:` line on its own: written right before an event framed once
/// for every stream, it gives that event this stream's id. `None` when
/// `id` is not [field-safe](is_field_safe).
pub(crate) fn id_field(id: &str) -> Option<Bytes> {
    if !is_field_safe(id) {
        return None;
    }
    let mut out = BytesMut::with_capacity(id.len() + 5);
    put_field(&mut out, "id", id);
    Some(out.freeze())
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

    #[test]
    fn multi_line_data_round_trips() {
        let cases = ["a\nb", "a\r\nb", "a\rb", "a\n", "\n", "", "é🎉\n\n  spaced", "x\r\n\r\ny"];
        for case in cases {
            let s = String::from_utf8(event(None, Some("e"), case.as_bytes()).to_vec()).unwrap();
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
        assert_eq!(&event(Some("1\n2"), Some("x\ny"), b"d")[..], b"data: d\n\n");
        assert_eq!(id_field("1\n2"), None);
        let mut s = id_field("7").unwrap().to_vec();
        s.extend_from_slice(&event(None, Some("tick"), b"{}"));
        assert_eq!(parse(std::str::from_utf8(&s).unwrap()), [("7".into(), "tick".into(), "{}".into())]);
    }
}
