//! The server side of the WebSocket opening handshake (RFC 6455 §4.2),
//! shared by the standalone listener and the axum integration so both
//! accept, negotiate and reject exactly alike.

use super::deflate::{self, Compression, Deflate};
use crate::protocol::{Format, Version};
use http::{HeaderMap, HeaderValue, Method, StatusCode};
use std::borrow::Cow;

/// What a valid upgrade request negotiated.
#[derive(Debug)]
pub(crate) struct Negotiated {
    /// `Sec-WebSocket-Accept` value (empty over HTTP/2, which has none).
    pub accept: String,
    /// The subprotocol chosen (the client's first offer that we speak), if any.
    pub subprotocol: Option<&'static str>,
    /// `permessage-deflate`, when offered and accepted.
    pub deflate: Option<Deflate>,
}

/// A refused handshake: status, extra headers, body.
#[derive(Debug)]
pub(crate) struct Refusal {
    pub status: StatusCode,
    pub headers: Vec<(&'static str, Cow<'static, str>)>,
    pub message: String,
    /// Say it after the upgrade instead: `101`, then a close frame with this
    /// code and reason (for browsers, which cannot read a status; §7.3).
    pub close: Option<(u16, String)>,
}

impl Refusal {
    pub(crate) fn new(status: StatusCode, message: &str) -> Refusal {
        Refusal { status, headers: Vec::new(), message: message.to_owned(), close: None }
    }

    /// A refusal with `retry-after` (whole seconds, rounded up) when there
    /// is a hint.
    pub(crate) fn with_retry_after(
        status: StatusCode,
        message: &str,
        retry_after: Option<std::time::Duration>,
    ) -> Refusal {
        let mut r = Refusal::new(status, message);
        if let Some(after) = retry_after {
            let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
            r.headers.push(("retry-after", secs.max(1).to_string().into()));
        }
        r
    }
}

fn header_has_token(headers: &HeaderMap, name: http::header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Validates an upgrade request and negotiates the subprotocol.
///
/// - not an upgrade at all (a plain GET) → 426 Upgrade Required;
/// - wrong method → 405; a version other than 13 → 426 with
///   `Sec-WebSocket-Version: 13`; a missing or malformed key → 400.
/// - Subprotocol: the first of the client's offers that is ours
///   (`switchboard.v{1,2}.json`, `switchboard.v{1,2}.msgpack`); no offer at all →
///   none selected, the connection speaks JSON; offers but none of ours → 400.
/// - Extensions: `permessage-deflate` when `compression` is not
///   [`Compression::Off`] and the client offers one we can honour
///   ([`deflate::negotiate`]); anything else offered is ignored.
pub(crate) fn negotiate(method: &Method, headers: &HeaderMap, compression: Compression) -> Result<Negotiated, Refusal> {
    use http::header::{CONNECTION, SEC_WEBSOCKET_KEY, SEC_WEBSOCKET_VERSION, UPGRADE};
    if !header_has_token(headers, UPGRADE, "websocket") || !header_has_token(headers, CONNECTION, "upgrade") {
        let mut r = Refusal::new(StatusCode::UPGRADE_REQUIRED, "this endpoint only speaks WebSocket");
        r.headers.push(("upgrade", "websocket".into()));
        r.headers.push(("connection", "upgrade".into()));
        return Err(r);
    }
    if method != Method::GET {
        return Err(Refusal::new(StatusCode::METHOD_NOT_ALLOWED, "WebSocket upgrades use GET"));
    }
    if headers.get(SEC_WEBSOCKET_VERSION).map(HeaderValue::as_bytes) != Some(b"13") {
        let mut r = Refusal::new(StatusCode::UPGRADE_REQUIRED, "unsupported WebSocket version");
        r.headers.push(("sec-websocket-version", "13".into()));
        return Err(r);
    }
    let key = headers.get(SEC_WEBSOCKET_KEY).map(HeaderValue::as_bytes).unwrap_or_default();
    // A key is 16 random bytes in base64: 24 characters ending in "==".
    if key.len() != 24 || !key.ends_with(b"==") {
        return Err(Refusal::new(StatusCode::BAD_REQUEST, "missing or malformed Sec-WebSocket-Key"));
    }
    negotiate_options(headers, compression, tokio_tungstenite::tungstenite::handshake::derive_accept_key(key))
}

/// Validates a WebSocket request over HTTP/2 (RFC 8441: an extended
/// `CONNECT` whose `:protocol` is `protocol`) and negotiates like
/// [`negotiate`]; there is no key, and no `Sec-WebSocket-Accept` (the
/// answer is `200`). Not `CONNECT` → 405; another protocol → 400.
#[cfg(feature = "axum")]
pub(crate) fn negotiate_h2(
    method: &Method,
    protocol: Option<&str>,
    headers: &HeaderMap,
    compression: Compression,
) -> Result<Negotiated, Refusal> {
    if method != Method::CONNECT {
        return Err(Refusal::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "WebSockets over HTTP/2 use an extended CONNECT (RFC 8441)",
        ));
    }
    if protocol != Some("websocket") {
        return Err(Refusal::new(StatusCode::BAD_REQUEST, "this endpoint only speaks the websocket protocol"));
    }
    if headers.get(http::header::SEC_WEBSOCKET_VERSION).map(HeaderValue::as_bytes) != Some(b"13") {
        let mut r = Refusal::new(StatusCode::BAD_REQUEST, "unsupported WebSocket version");
        r.headers.push(("sec-websocket-version", "13".into()));
        return Err(r);
    }
    negotiate_options(headers, compression, String::new())
}

/// What both handshakes negotiate alike: the subprotocol and
/// `permessage-deflate`.
fn negotiate_options(headers: &HeaderMap, compression: Compression, accept: String) -> Result<Negotiated, Refusal> {
    use http::header::{SEC_WEBSOCKET_EXTENSIONS, SEC_WEBSOCKET_PROTOCOL};
    let mut offers = headers
        .get_all(SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .peekable();
    let offered_any = offers.peek().is_some();
    let subprotocol =
        offers.find_map(|offer| Some(Version::from_subprotocol(offer)?.subprotocol(Format::from_subprotocol(offer)?)));
    if offered_any && subprotocol.is_none() {
        // Answering 101 without selecting one of the offers makes browsers
        // fail the connection (1006) with no reason given: say why instead.
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            "no supported subprotocol offered: offer switchboard.v2.json, switchboard.v2.msgpack, \
             switchboard.v1.json or switchboard.v1.msgpack",
        ));
    }
    let extensions = headers.get_all(SEC_WEBSOCKET_EXTENSIONS).iter().filter_map(|v| v.to_str().ok());
    let deflate = deflate::negotiate(extensions, compression);
    Ok(Negotiated { accept, subprotocol, deflate })
}

/// The raw `101 Switching Protocols` response.
pub(crate) fn switching_protocols(n: &Negotiated) -> String {
    let mut out = format!(
        "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-accept: {}\r\n",
        n.accept
    );
    if let Some(p) = n.subprotocol {
        out.push_str("sec-websocket-protocol: ");
        out.push_str(p);
        out.push_str("\r\n");
    }
    if n.deflate.is_some() {
        out.push_str("sec-websocket-extensions: ");
        out.push_str(deflate::RESPONSE);
        out.push_str("\r\n");
    }
    out.push_str("\r\n");
    out
}

/// A raw plain-text HTTP error response that closes the connection.
pub(crate) fn refusal_response(r: &Refusal) -> String {
    let mut out = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\n",
        r.status.as_u16(),
        r.status.canonical_reason().unwrap_or(""),
        r.message.len()
    );
    // The socket is closed after this response; a 426 says `connection:
    // upgrade` instead (with `upgrade: websocket`), never both.
    if !r.headers.iter().any(|(k, _)| *k == "connection") {
        out.push_str("connection: close\r\n");
    }
    for (k, v) in &r.headers {
        out.push_str(k);
        out.push_str(": ");
        out.push_str(v);
        out.push_str("\r\n");
    }
    out.push_str("\r\n");
    out.push_str(&r.message);
    out
}

/// A server close frame (unmasked): `code` and `reason` (at most 123 bytes,
/// cut at a character boundary).
pub(crate) fn close_frame(code: u16, reason: &str) -> Vec<u8> {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut out = Vec::with_capacity(4 + end);
    out.push(0x88);
    out.push(2 + end as u8);
    out.extend_from_slice(&code.to_be_bytes());
    out.extend_from_slice(&reason.as_bytes()[..end]);
    out
}

/// How long a connection refused after its upgrade waits for the client's
/// close frame before the socket is dropped.
const REFUSED_CLOSE_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// Ends an upgraded connection at once with a close frame (a refusal said
/// after the upgrade, §7.3): writes the frame, then waits up to a second
/// for the client's answer (any bytes, or its end of the stream) so the
/// browser sees a clean close, and drops the socket.
pub(crate) async fn close_upgraded<S>(mut io: S, code: u16, reason: &str)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    if io.write_all(&close_frame(code, reason)).await.is_err() || io.flush().await.is_err() {
        return;
    }
    let mut buf = [0u8; 256];
    let _ = tokio::time::timeout(REFUSED_CLOSE_WAIT, io.read(&mut buf)).await;
    let _ = io.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_frames_are_short_and_cut_at_a_character() {
        assert_eq!(close_frame(1013, "x"), [0x88, 3, 0x03, 0xF5, b'x']);
        let long = "é".repeat(100);
        let f = close_frame(4501, &long);
        assert_eq!(f.len(), 4 + 122);
        assert_eq!(usize::from(f[1]), f.len() - 2);
        assert!(std::str::from_utf8(&f[4..]).is_ok());
    }

    fn upgrade_headers() -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("upgrade", "websocket".parse().unwrap());
        h.insert("connection", "keep-alive, Upgrade".parse().unwrap());
        h.insert("sec-websocket-version", "13".parse().unwrap());
        h.insert("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==".parse().unwrap());
        h
    }

    #[test]
    fn rfc_sample_key() {
        let n = negotiate(&Method::GET, &upgrade_headers(), Compression::On).unwrap();
        assert_eq!(n.accept, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
        assert_eq!(n.subprotocol, None);
    }

    #[test]
    fn picks_first_offer_we_speak() {
        let mut h = upgrade_headers();
        h.insert("sec-websocket-protocol", "chat, switchboard.v1.msgpack, switchboard.v1.json".parse().unwrap());
        assert_eq!(negotiate(&Method::GET, &h, Compression::On).unwrap().subprotocol, Some("switchboard.v1.msgpack"));
    }

    #[test]
    fn permessage_deflate_is_accepted_unless_off() {
        let mut h = upgrade_headers();
        h.insert("sec-websocket-extensions", "permessage-deflate; client_max_window_bits".parse().unwrap());
        let n = negotiate(&Method::GET, &h, Compression::Above(64)).unwrap();
        assert_eq!(n.deflate, Some(Deflate { threshold: 64 }));
        let text = switching_protocols(&n);
        assert!(
            text.contains("sec-websocket-extensions: permessage-deflate; server_no_context_takeover; client_no_context_takeover\r\n"),
            "{text}"
        );
        let n = negotiate(&Method::GET, &h, Compression::Off).unwrap();
        assert_eq!(n.deflate, None);
        assert!(!switching_protocols(&n).contains("extensions"));
        assert_eq!(negotiate(&Method::GET, &upgrade_headers(), Compression::On).unwrap().deflate, None);
    }

    #[test]
    fn version_2_offers_are_selected_by_their_own_names() {
        for (offer, chosen) in [
            ("switchboard.v2.json, switchboard.v1.json", "switchboard.v2.json"),
            ("chat, switchboard.v2.msgpack", "switchboard.v2.msgpack"),
            ("switchboard.v1.json, switchboard.v2.json", "switchboard.v1.json"),
        ] {
            let mut h = upgrade_headers();
            h.insert("sec-websocket-protocol", offer.parse().unwrap());
            assert_eq!(negotiate(&Method::GET, &h, Compression::On).unwrap().subprotocol, Some(chosen), "{offer}");
        }
    }

    #[test]
    fn foreign_subprotocols_only_is_refused() {
        let mut h = upgrade_headers();
        h.insert("sec-websocket-protocol", "chat, mqtt".parse().unwrap());
        assert_eq!(negotiate(&Method::GET, &h, Compression::On).unwrap_err().status, StatusCode::BAD_REQUEST);
    }

    #[test]
    fn one_connection_header_in_426() {
        let r = negotiate(&Method::GET, &HeaderMap::new(), Compression::On).unwrap_err();
        let text = refusal_response(&r);
        assert_eq!(text.matches("connection:").count(), 1, "{text}");
        assert!(text.contains("connection: upgrade"), "{text}");
    }

    #[test]
    fn refusals() {
        assert_eq!(
            negotiate(&Method::GET, &HeaderMap::new(), Compression::On).unwrap_err().status,
            StatusCode::UPGRADE_REQUIRED
        );
        assert_eq!(
            negotiate(&Method::POST, &upgrade_headers(), Compression::On).unwrap_err().status,
            StatusCode::METHOD_NOT_ALLOWED
        );
        let mut h = upgrade_headers();
        h.insert("sec-websocket-version", "8".parse().unwrap());
        assert_eq!(negotiate(&Method::GET, &h, Compression::On).unwrap_err().status, StatusCode::UPGRADE_REQUIRED);
        let mut h = upgrade_headers();
        h.insert("sec-websocket-key", "short".parse().unwrap());
        assert_eq!(negotiate(&Method::GET, &h, Compression::On).unwrap_err().status, StatusCode::BAD_REQUEST);
    }
}
