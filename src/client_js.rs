//! The browser client, `switchboard.js`, as bytes a server can serve
//! (`docs/js-client.md`).
//!
//! One dependency-free ES module (the `js/` package of the repository,
//! built from `js/src/switchboard.js`), whose version is this crate's. With
//! axum, mount [`integration::axum::client_js`](crate::integration::axum)
//! (feature `axum`); with another framework serve [`SOURCE`] as
//! [`CONTENT_TYPE`] with the [`etag`] and [`CACHE_CONTROL`], and answer
//! `304 Not Modified` when `If-None-Match` names the ETag.
//!
//! ```
//! assert!(switchboard::client_js::SOURCE.contains("export function connect"));
//! assert!(switchboard::client_js::etag().starts_with('"'));
//! ```

use std::sync::OnceLock;

/// The module's source, exactly as a browser should load it.
pub const SOURCE: &str = include_str!("../js/switchboard.js");

/// The synced-room part (`sync.js`, `docs/sync.md`): a separate module a
/// page imports next to [`SOURCE`] when it uses synced rooms. Serve it like
/// [`SOURCE`] (same content type).
pub const SYNC_SOURCE: &str = include_str!("../js/sync.js");
/// Its TypeScript declarations (`sync.d.ts`).
pub const SYNC_TYPES: &str = include_str!("../js/sync.d.ts");
/// Its TypeScript declarations (`switchboard.d.ts`).
pub const TYPES: &str = include_str!("../js/switchboard.d.ts");

/// The module's version: always this crate's version.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// `Content-Type` to serve [`SOURCE`] with.
pub const CONTENT_TYPE: &str = "text/javascript; charset=utf-8";

/// `Cache-Control` to serve [`SOURCE`] with: browsers keep the file but ask
/// again each time (a cheap `304` with the [`etag`]), so a page never runs a
/// client older than its server after an upgrade.
pub const CACHE_CONTROL: &str = "no-cache";

/// A strong `ETag` (quoted) from a 64-bit FNV-1a hash of [`SOURCE`]: it
/// changes whenever the file does.
pub fn etag() -> &'static str {
    static ETAG: OnceLock<String> = OnceLock::new();
    ETAG.get_or_init(|| {
        let hash =
            SOURCE.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
        format!("\"sb-{VERSION}-{hash:016x}\"")
    })
}

/// Whether an `If-None-Match` header value names [`etag`] (or is `*`).
pub fn matches_etag(if_none_match: &str) -> bool {
    let tag = etag();
    if_none_match.split(',').map(str::trim).any(|t| t == "*" || t == tag || t.strip_prefix("W/") == Some(tag))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_version_is_the_crate_version() {
        assert!(
            SOURCE.contains(&format!("export const VERSION = \"{VERSION}\";")),
            "js/switchboard.js has another VERSION"
        );
        let package = include_str!("../js/package.json");
        assert!(package.contains(&format!("\"version\": \"{VERSION}\"")), "js/package.json has another version");
    }

    #[test]
    fn etag_matching() {
        let tag = etag();
        assert!(matches_etag(tag));
        assert!(matches_etag(&format!("\"x\", W/{tag}")));
        assert!(matches_etag("*"));
        assert!(!matches_etag("\"sb-0.0.0-0000000000000000\""));
        assert!(!matches_etag(""));
    }
}
