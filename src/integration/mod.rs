//! Adapters that mount switchboard inside web frameworks.

#[cfg(feature = "axum")]
pub mod axum;
#[cfg(feature = "sse")]
#[cfg_attr(docsrs, doc(cfg(feature = "sse")))]
pub mod sse;
#[cfg(feature = "ws")]
pub mod ws;
