//! Adapters that mount switchboard inside web frameworks.

#[cfg(feature = "axum")]
pub mod axum;
