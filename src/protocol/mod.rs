//! The wire protocol: envelopes, payloads, codecs, and the codes a client
//! sees.
//!
//! Every message on a connection is one [`Envelope`]. It is encoded in one of
//! two [`Format`]s, chosen per connection at the handshake (the WebSocket
//! subprotocols `switchboard.v1.json` and `switchboard.v1.msgpack`; JSON when
//! the client offers neither). JSON envelopes travel in text frames,
//! MessagePack envelopes in binary frames.
//!
//! [`Version::V2`] (`switchboard.v2.json`, `switchboard.v2.msgpack`) is
//! version 1 with one change: an `event` is a compact array
//! `[room, event, data]` (`[room, event, data, offset]` in a recoverable
//! room) instead of an object, 16 bytes of envelope around the payload
//! instead of about 50.
//!
//! The full specification, with a worked example of every message, is
//! `docs/protocol.md`; this module is its implementation and is what the
//! bundled clients use too.
//!
//! Payloads ([`Payload`]) are kept as the raw encoded bytes of the `data`
//! field: decoding an envelope never decodes the payload, and a payload is
//! only turned into a Rust type by the handler that wants it.

mod call_error;
mod codes;
mod json;
mod msgpack;

pub use call_error::{CallError, FieldError, FieldErrors};
pub use codes::{CloseCode, ErrorCode};
pub(crate) use json::truncate;

use bytes::Bytes;
use serde::{de::DeserializeOwned, Serialize};
use std::fmt;

/// The base protocol version: what `hello` reports on a connection that
/// did not negotiate [`Version::V2`] (which reports 2).
pub const VERSION: u32 = 1;

/// Subprotocol name for JSON envelopes in text frames.
pub const SUBPROTOCOL_JSON: &str = "switchboard.v1.json";
/// Subprotocol name for MessagePack envelopes in binary frames.
pub const SUBPROTOCOL_MSGPACK: &str = "switchboard.v1.msgpack";
/// Subprotocol name for [`Version::V2`] JSON: compact `event` arrays.
pub const SUBPROTOCOL_V2_JSON: &str = "switchboard.v2.json";
/// Subprotocol name for [`Version::V2`] MessagePack: compact `event` arrays.
pub const SUBPROTOCOL_V2_MSGPACK: &str = "switchboard.v2.msgpack";

/// The protocol version a connection speaks, chosen with its subprotocol
/// (`docs/protocol.md` §1.1 and §13).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Version {
    /// Every envelope is an object (a map in MessagePack):
    /// `switchboard.v1.*`, and connections that offer no subprotocol.
    #[default]
    V1,
    /// Version 1, except that `event` envelopes are arrays:
    /// `[room, event, data]`, `[room, event, data, offset]` in a recoverable
    /// room, `room` `null` for an event sent to one connection
    /// (`switchboard.v2.*`). Everything else is unchanged.
    V2,
}

impl Version {
    /// The subprotocol name of this version in `format`.
    pub fn subprotocol(self, format: Format) -> &'static str {
        match (self, format) {
            (Version::V1, Format::Json) => SUBPROTOCOL_JSON,
            (Version::V1, Format::MsgPack) => SUBPROTOCOL_MSGPACK,
            (Version::V2, Format::Json) => SUBPROTOCOL_V2_JSON,
            (Version::V2, Format::MsgPack) => SUBPROTOCOL_V2_MSGPACK,
        }
    }

    /// The version a subprotocol name selects, if it is one of ours.
    pub fn from_subprotocol(name: &str) -> Option<Version> {
        match name.trim() {
            SUBPROTOCOL_JSON | SUBPROTOCOL_MSGPACK => Some(Version::V1),
            SUBPROTOCOL_V2_JSON | SUBPROTOCOL_V2_MSGPACK => Some(Version::V2),
            _ => None,
        }
    }

    /// The number the `hello` envelope reports (`data.version`).
    pub fn number(self) -> u32 {
        match self {
            Version::V1 => 1,
            Version::V2 => 2,
        }
    }

    pub(crate) const COUNT: usize = 2;

    pub(crate) fn index(self) -> usize {
        match self {
            Version::V1 => 0,
            Version::V2 => 1,
        }
    }
}

/// Maximum nesting depth of arrays and maps in an envelope's `data`, in both
/// formats; a deeper one is refused when the envelope is decoded (400).
pub const MAX_DEPTH: usize = 128;

/// How envelopes are encoded on one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Format {
    /// JSON text (`switchboard.v1.json`), sent in text frames. The default.
    #[default]
    Json,
    /// MessagePack (`switchboard.v1.msgpack`), sent in binary frames.
    MsgPack,
}

impl Format {
    /// The version 1 subprotocol name that selects this format (see
    /// [`Version::subprotocol`] for the others).
    pub fn subprotocol(self) -> &'static str {
        Version::V1.subprotocol(self)
    }

    /// The format a subprotocol name selects, if it is one of ours (of
    /// either [`Version`]).
    pub fn from_subprotocol(name: &str) -> Option<Format> {
        match name.trim() {
            SUBPROTOCOL_JSON | SUBPROTOCOL_V2_JSON => Some(Format::Json),
            SUBPROTOCOL_MSGPACK | SUBPROTOCOL_V2_MSGPACK => Some(Format::MsgPack),
            _ => None,
        }
    }

    /// Whether envelopes in this format travel in binary frames.
    pub fn is_binary(self) -> bool {
        matches!(self, Format::MsgPack)
    }

    /// How many formats there are (for per-format caches).
    pub(crate) const COUNT: usize = 2;

    pub(crate) fn index(self) -> usize {
        match self {
            Format::Json => 0,
            Format::MsgPack => 1,
        }
    }
}

/// The `type` of an envelope.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Kind {
    /// Server → client, first message on every connection.
    Hello,
    /// Client → server: join a room (`room`, optional `data` params); replied to.
    Join,
    /// Client → server: leave a room; replied to.
    Leave,
    /// Client → server: invoke the handler for `event` (optionally in `room`).
    /// Replied to when it carries a `ref`.
    Call,
    /// Server → client: successful answer to the request with the same `ref`.
    Reply,
    /// Server → client: failure, with `code` and `message`; carries the `ref`
    /// of the failed request when there was one.
    Error,
    /// Server → client: an event pushed to a room (with `room`) or straight
    /// to this connection (without).
    Event,
    /// Application-level ping (either direction); answered by `pong`.
    Ping,
    /// Answer to `ping`, echoing its `ref`.
    Pong,
    /// Client → server: updates this connection's presence meta in `room`
    /// (`data: {"meta": {…}, "ephemeral": {…}}`); replied to.
    Presence,
    /// Server → client: the whole presence of `room` (after the join reply,
    /// and again whenever the client must start over).
    PresenceState,
    /// Server → client: the presence changes of `room` in one batch window.
    PresenceDiff,
    /// Server → client: the server dropped `data.dropped` messages for this
    /// connection because it read too slowly (drop-oldest overflow policy).
    Lagged,
    /// Client → server: renews the connection's credentials before they
    /// expire (`data: {"token": "…"}`); replied to.
    Refresh,
    /// Server → client: events of the recoverable `room` were lost for this
    /// connection (`data: {"from", "to", "reason", "epoch"}`); the client
    /// recovers them by rejoining from its last position, or resyncs.
    Gap,
}

impl Kind {
    /// Every kind, in declaration order (`kind as usize` indexes it).
    #[cfg_attr(not(feature = "metrics"), allow(dead_code))]
    pub(crate) const ALL: [Kind; 15] = [
        Kind::Hello,
        Kind::Join,
        Kind::Leave,
        Kind::Call,
        Kind::Reply,
        Kind::Error,
        Kind::Event,
        Kind::Ping,
        Kind::Pong,
        Kind::Presence,
        Kind::PresenceState,
        Kind::PresenceDiff,
        Kind::Lagged,
        Kind::Refresh,
        Kind::Gap,
    ];

    /// The wire name (`"join"`, `"reply"`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Hello => "hello",
            Kind::Join => "join",
            Kind::Leave => "leave",
            Kind::Call => "call",
            Kind::Reply => "reply",
            Kind::Error => "error",
            Kind::Event => "event",
            Kind::Ping => "ping",
            Kind::Pong => "pong",
            Kind::Presence => "presence",
            Kind::PresenceState => "presence_state",
            Kind::PresenceDiff => "presence_diff",
            Kind::Lagged => "lagged",
            Kind::Refresh => "refresh",
            Kind::Gap => "gap",
        }
    }

    /// Parses a wire name.
    pub fn parse(name: &str) -> Option<Kind> {
        Some(match name {
            "hello" => Kind::Hello,
            "join" => Kind::Join,
            "leave" => Kind::Leave,
            "call" => Kind::Call,
            "reply" => Kind::Reply,
            "error" => Kind::Error,
            "event" => Kind::Event,
            "ping" => Kind::Ping,
            "pong" => Kind::Pong,
            "presence" => Kind::Presence,
            "presence_state" => Kind::PresenceState,
            "presence_diff" => Kind::PresenceDiff,
            "lagged" => Kind::Lagged,
            "refresh" => Kind::Refresh,
            "gap" => Kind::Gap,
            _ => return None,
        })
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An encoded value: the `data` field of an envelope, kept as bytes in the
/// format it arrived in (or was produced in).
///
/// Cloning is a reference-count bump. Converting to the other format
/// transcodes once.
#[derive(Clone, PartialEq, Eq)]
pub struct Payload {
    format: Format,
    bytes: Bytes,
}

impl fmt::Debug for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.format {
            Format::Json => write!(f, "Payload(json {})", String::from_utf8_lossy(&self.bytes)),
            Format::MsgPack => write!(f, "Payload(msgpack {} bytes)", self.bytes.len()),
        }
    }
}

impl Payload {
    /// Serializes `value` into a payload of the given format.
    ///
    /// A [`serde_json::value::RawValue`] (a handler relaying a client's
    /// `data` untouched, at any depth) becomes the MessagePack value of its
    /// JSON text.
    pub fn encode<T: Serialize + ?Sized>(format: Format, value: &T) -> Result<Payload, ProtocolError> {
        let bytes = match format {
            Format::Json => serde_json::to_vec(value).map_err(|e| ProtocolError::Encode(e.to_string()))?,
            Format::MsgPack => {
                let bytes = rmp_serde::to_vec_named(value).map_err(|e| ProtocolError::Encode(e.to_string()))?;
                // rmp_serde writes a RawValue as serde_json's private marker
                // struct, a map `{"$serde_json::private::RawValue": "<json>"}`:
                // only serde_json knows it, so go through JSON then.
                if memchr::memmem::find(&bytes, RAW_VALUE_TOKEN).is_some() {
                    return Payload::encode(Format::Json, value)?.to_format(Format::MsgPack);
                }
                bytes
            }
        };
        Ok(Payload { format, bytes: Bytes::from(bytes) })
    }

    /// Wraps bytes that are already a complete value in `format`.
    ///
    /// The bytes are checked: JSON must parse, MessagePack must be exactly one
    /// well-formed value no deeper than [`MAX_DEPTH`].
    pub fn from_encoded(format: Format, bytes: Bytes) -> Result<Payload, ProtocolError> {
        match format {
            Format::Json => {
                serde_json::from_slice::<serde::de::IgnoredAny>(&bytes)
                    .map_err(|e| ProtocolError::Malformed(e.to_string()))?;
            }
            Format::MsgPack => {
                let mut rest: &[u8] = &bytes;
                msgpack::skip_value(&mut rest, 0)?;
                if !rest.is_empty() {
                    return Err(ProtocolError::Malformed("trailing bytes after value".into()));
                }
            }
        }
        Ok(Payload { format, bytes })
    }

    /// `null` in the given format.
    pub fn null(format: Format) -> Payload {
        let bytes: &'static [u8] = match format {
            Format::Json => b"null",
            Format::MsgPack => &[0xc0],
        };
        Payload { format, bytes: Bytes::from_static(bytes) }
    }

    /// The format of the bytes.
    pub fn format(&self) -> Format {
        self.format
    }

    /// The encoded bytes.
    pub fn bytes(&self) -> &Bytes {
        &self.bytes
    }

    /// Whether this is the encoded `null` (or nil).
    pub fn is_null(&self) -> bool {
        match self.format {
            Format::Json => self.bytes.as_ref() == b"null",
            Format::MsgPack => self.bytes.as_ref() == [0xc0],
        }
    }

    /// Whether arrays and maps nest deeper than `max` levels (the value
    /// itself is level 1 when it is an array or map).
    pub fn exceeds_depth(&self, max: usize) -> bool {
        match self.format {
            Format::Json => json::check_depth_max(&self.bytes, max).is_err(),
            Format::MsgPack => {
                let mut rest: &[u8] = &self.bytes;
                msgpack::skip_value_max(&mut rest, 0, max).is_err()
            }
        }
    }

    /// Deserializes the payload into `T`.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, ProtocolError> {
        match self.format {
            Format::Json => serde_json::from_slice(&self.bytes).map_err(|e| ProtocolError::Payload(e.to_string())),
            Format::MsgPack => rmp_serde::from_slice(&self.bytes).map_err(|e| ProtocolError::Payload(e.to_string())),
        }
    }

    /// The same value in `format`: free when it already is, one transcode
    /// otherwise.
    pub fn to_format(&self, format: Format) -> Result<Payload, ProtocolError> {
        if format == self.format {
            return Ok(self.clone());
        }
        match self.format {
            Format::Json => {
                let mut de = serde_json::Deserializer::from_slice(&self.bytes);
                let mut out = Vec::with_capacity(self.bytes.len());
                let mut ser = rmp_serde::Serializer::new(&mut out).with_struct_map();
                transcode(&mut de, &mut ser)?;
                Ok(Payload { format, bytes: out.into() })
            }
            Format::MsgPack => {
                // MessagePack is richer than JSON (binary, non-string keys):
                // go through serde_json::Value, which rejects what JSON cannot hold.
                let value: serde_json::Value =
                    rmp_serde::from_slice(&self.bytes).map_err(|e| ProtocolError::Payload(e.to_string()))?;
                Payload::encode(format, &value)
            }
        }
    }
}

/// The name under which serde_json serializes a `RawValue` (a private
/// detail of serde_json, stable since 1.0.29; the test
/// `msgpack_payload_of_a_raw_value_is_its_value` notices a change).
const RAW_VALUE_TOKEN: &[u8] = b"$serde_json::private::RawValue";

fn transcode<'de, D, S>(de: D, ser: S) -> Result<(), ProtocolError>
where
    D: serde::Deserializer<'de>,
    S: serde::Serializer,
{
    // A JSON value deserializes into serde_json::Value without loss, and
    // Value serializes into any format.
    let value = <serde_json::Value as serde::Deserialize>::deserialize(de)
        .map_err(|e| ProtocolError::Payload(e.to_string()))?;
    value.serialize(ser).map_err(|e| ProtocolError::Encode(e.to_string()))?;
    Ok(())
}

/// One protocol message.
///
/// Fields a [`Kind`] does not use are `None`. Unknown fields on the wire are
/// ignored (forward compatibility); a missing required field is an error.
/// Build one with [`Envelope::new`] and the `with_*` setters (fields may be
/// added in a minor release).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Envelope {
    /// The `type` field.
    pub kind: Kind,
    /// The `ref` field: a client-chosen number that correlates a request with
    /// its `reply` or `error`.
    pub reference: Option<u64>,
    /// The `room` field.
    pub room: Option<String>,
    /// The `event` field.
    pub event: Option<String>,
    /// The `code` field of an `error` (see [`ErrorCode`]).
    pub code: Option<u32>,
    /// The `message` field of an `error`: human-readable text.
    pub message: Option<String>,
    /// The `data` field.
    pub data: Option<Payload>,
    /// The `offset` field: on an `event` of a recoverable room, the event's
    /// position in the room's stream; on a `join`, the last offset the
    /// client saw (with `epoch`), asking to recover what it missed.
    pub offset: Option<u64>,
    /// The `epoch` field of a recovering `join`: the stream epoch of
    /// `offset`.
    pub epoch: Option<String>,
    /// The `rewind` field of a `join` without a position: also send up to
    /// this many of the room's newest retained events before live ones.
    pub rewind: Option<u64>,
}

impl Envelope {
    /// An envelope of `kind` with every other field empty.
    pub fn new(kind: Kind) -> Envelope {
        Envelope {
            kind,
            reference: None,
            room: None,
            event: None,
            code: None,
            message: None,
            data: None,
            offset: None,
            epoch: None,
            rewind: None,
        }
    }

    /// Sets `ref`.
    pub fn with_ref(mut self, reference: u64) -> Self {
        self.reference = Some(reference);
        self
    }

    /// Sets `room`.
    pub fn with_room(mut self, room: impl Into<String>) -> Self {
        self.room = Some(room.into());
        self
    }

    /// Sets `event`.
    pub fn with_event(mut self, event: impl Into<String>) -> Self {
        self.event = Some(event.into());
        self
    }

    /// Sets `data`.
    pub fn with_data(mut self, data: Payload) -> Self {
        self.data = Some(data);
        self
    }

    /// Sets `offset` and `epoch`: the stream position a `join` recovers from.
    pub fn with_position(mut self, offset: u64, epoch: impl Into<String>) -> Self {
        self.offset = Some(offset);
        self.epoch = Some(epoch.into());
        self
    }

    /// Sets `rewind`.
    pub fn with_rewind(mut self, n: u64) -> Self {
        self.rewind = Some(n);
        self
    }

    /// An `error` envelope.
    pub fn error(reference: Option<u64>, code: u32, message: impl Into<String>) -> Envelope {
        Envelope { code: Some(code), message: Some(message.into()), reference, ..Envelope::new(Kind::Error) }
    }

    /// Decodes one version 1 envelope from a frame's bytes.
    pub fn decode(format: Format, bytes: &Bytes) -> Result<Envelope, ProtocolError> {
        match format {
            Format::Json => json::decode(bytes),
            Format::MsgPack => msgpack::decode(bytes),
        }
    }

    /// Decodes one envelope of `version` from a frame's bytes: in
    /// [`Version::V2`] an array is a compact `event`, anything else is
    /// decoded as in version 1.
    pub fn decode_as(format: Format, version: Version, bytes: &Bytes) -> Result<Envelope, ProtocolError> {
        match (version, format) {
            (Version::V2, Format::Json) if json::is_array(bytes) => json::decode_event_array(bytes),
            (Version::V2, Format::MsgPack) if msgpack::is_array(bytes) => msgpack::decode_event_array(bytes),
            _ => Envelope::decode(format, bytes),
        }
    }

    /// Best effort: the `ref` of a frame that [`Envelope::decode`] refused,
    /// when the frame is readable that far and its `ref` is a valid
    /// unsigned integer, so the error reply can still be correlated.
    pub fn reference_of(format: Format, bytes: &[u8]) -> Option<u64> {
        match format {
            Format::Json => json::reference_of(bytes),
            Format::MsgPack => msgpack::reference_of(bytes),
        }
    }

    /// Encodes the envelope in version 1; `data` is transcoded if it is in
    /// the other format.
    pub fn encode(&self, format: Format) -> Result<Bytes, ProtocolError> {
        self.encode_as(format, Version::V1)
    }

    /// Encodes the envelope in `version` (an `event` with an `event` name is
    /// an array in [`Version::V2`]); `data` is transcoded if it is in the
    /// other format.
    pub fn encode_as(&self, format: Format, version: Version) -> Result<Bytes, ProtocolError> {
        let data = match &self.data {
            Some(p) => Some(p.to_format(format)?),
            None => None,
        };
        let parts = Parts {
            kind: self.kind,
            reference: self.reference,
            room: self.room.as_deref(),
            event: self.event.as_deref(),
            code: self.code,
            message: self.message.as_deref(),
            data: data.as_ref().map(|p| p.bytes.as_ref()),
            offset: self.offset,
            epoch: self.epoch.as_deref(),
            rewind: self.rewind,
        };
        Ok(parts.encode_as(format, version))
    }
}

/// Borrowed view of an envelope used by the encoders; `data` must already be
/// in the target format. This is what the hot path uses to encode without
/// building an owned [`Envelope`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct Parts<'a> {
    pub kind: Kind,
    pub reference: Option<u64>,
    pub room: Option<&'a str>,
    pub event: Option<&'a str>,
    pub code: Option<u32>,
    pub message: Option<&'a str>,
    pub data: Option<&'a [u8]>,
    pub offset: Option<u64>,
    pub epoch: Option<&'a str>,
    pub rewind: Option<u64>,
}

impl<'a> Parts<'a> {
    pub(crate) fn new(kind: Kind) -> Parts<'a> {
        Parts {
            kind,
            reference: None,
            room: None,
            event: None,
            code: None,
            message: None,
            data: None,
            offset: None,
            epoch: None,
            rewind: None,
        }
    }

    /// Encodes in version 1.
    pub(crate) fn encode(&self, format: Format) -> Bytes {
        match format {
            Format::Json => json::encode(self),
            Format::MsgPack => msgpack::encode(self),
        }
    }

    /// Encodes in `version`: the compact array for an `event` in
    /// [`Version::V2`], as [`Parts::encode`] otherwise.
    pub(crate) fn encode_as(&self, format: Format, version: Version) -> Bytes {
        match (version, self.kind, self.event) {
            (Version::V2, Kind::Event, Some(event)) => match format {
                Format::Json => json::encode_event_array(self.room, event, self.data, self.offset),
                Format::MsgPack => msgpack::encode_event_array(self.room, event, self.data, self.offset),
            },
            _ => self.encode(format),
        }
    }
}

/// Why bytes could not be decoded as a protocol message or payload.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolError {
    /// Not a well-formed document (bad JSON or MessagePack), or not an object/map.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// Well-formed, but a field is missing or has the wrong type.
    #[error("invalid message: {0}")]
    Invalid(String),
    /// The `type` is not one this version knows.
    #[error("unknown message type `{0}`")]
    UnknownType(String),
    /// The payload does not have the shape the handler expects.
    #[error("invalid payload: {0}")]
    Payload(String),
    /// A value could not be serialized.
    #[error("encode failed: {0}")]
    Encode(String),
}

impl ProtocolError {
    /// The wire error code a client receives for this failure.
    pub fn code(&self) -> ErrorCode {
        match self {
            ProtocolError::Payload(_) => ErrorCode::INVALID_PAYLOAD,
            ProtocolError::Encode(_) => ErrorCode::INTERNAL,
            _ => ErrorCode::BAD_REQUEST,
        }
    }
}

#[cfg(test)]
mod tests;
