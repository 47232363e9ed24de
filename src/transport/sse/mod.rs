//! Server-Sent Events transport (feature `sse`): the frames of one session
//! as a `text/event-stream` body going down ([`SseSink`]) and the envelopes
//! of HTTP `POST`s coming up ([`SseStream`]).
//!
//! This module moves frames and writes events; the HTTP endpoint that
//! admits and authenticates a stream, runs its session and routes `POST`s
//! to the node holding it is [`integration::sse`](crate::integration::sse).
//! `docs/sse.md` is the client's guide.

pub(crate) mod conn;
pub(crate) mod encode;

pub use conn::{SseSink, SseStream, SseTransport};
