//! JSON Web Token authentication (feature `jwt`, on the `jsonwebtoken` crate).
//!
//! [`JwtAuth`] verifies a token presented at the handshake and turns its
//! claims into the connection's [`Identity`]:
//!
//! | claim | becomes |
//! |---|---|
//! | `sub` (required) | the user id ([`Identity::user_id`]) |
//! | `exp` (required unless [`JwtAuth::require_exp`] is off) | the expiry ([`Identity::expires_at`]), plus the leeway: the connection is closed with 4003 then, unless the client sends `refresh` with a new token |
//! | `rooms` (optional; name set by [`JwtAuth::rooms_claim`]) | the rooms the client may join ([`Identity::with_rooms`]): an array of names, `prefix*` patterns allowed |
//! | all of them | [`JwtClaims`], reachable with `identity.data::<JwtClaims>()` |
//!
//! Each key is bound to one algorithm (HS256, RS256 or EdDSA). A token is
//! only checked against keys of the algorithm its header names, so a token
//! signed with another algorithm — `none`, or HS256 made with an RSA public
//! key as the secret — is refused.
//!
//! ```no_run
//! use switchboard::auth::jwt::{JwtAuth, JwtKey, TokenSource};
//! use switchboard::Hub;
//!
//! let auth = JwtAuth::new(JwtKey::hs256(b"a secret of at least 32 bytes, really"))
//!     .issuer(["https://auth.example.com"])
//!     .sources(vec![TokenSource::bearer_header(), TokenSource::subprotocol(), TokenSource::cookie("session")]);
//! let hub = Hub::builder().jwt(auth).build();
//! # drop(hub);
//! ```
//!
//! Where a token is found, in the order of [`JwtAuth::sources`] (default:
//! `Authorization: Bearer`, then the subprotocol, then the query):
//!
//! - `Authorization: Bearer <token>` (non-browser clients);
//! - a `Sec-WebSocket-Protocol` offer `bearer.<token>` next to the real
//!   subprotocol, because browsers cannot set headers on a WebSocket:
//!   `new WebSocket(url, ["switchboard.v1.json", "bearer." + token])`. The
//!   server never echoes the token offer back;
//! - a query parameter (`?access_token=…`; it may end up in access logs);
//! - a cookie (then keep the origin check on: cookies travel cross-site).
//!
//! Failures are refused before the upgrade with `401` and a short reason
//! (`missing token`, `token expired`, `invalid token`).

use super::{Authenticate, Identity, Refresh, Rejection};
use crate::error::{Error, ErrorKind};
use crate::protocol::CallError;
use crate::protocol::ErrorCode;
use crate::transport::Handshake;
use futures::future::BoxFuture;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A verification key, bound to one algorithm.
#[derive(Clone)]
pub struct JwtKey {
    algorithm: Algorithm,
    key: DecodingKey,
}

impl fmt::Debug for JwtKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwtKey").field("algorithm", &self.algorithm).finish_non_exhaustive()
    }
}

impl JwtKey {
    /// An HMAC-SHA256 shared secret (use at least 32 random bytes).
    pub fn hs256(secret: impl AsRef<[u8]>) -> JwtKey {
        JwtKey { algorithm: Algorithm::HS256, key: DecodingKey::from_secret(secret.as_ref()) }
    }

    /// An RSA public key (PKCS#1 or SPKI PEM) for RS256.
    pub fn rs256_pem(pem: impl AsRef<[u8]>) -> crate::Result<JwtKey> {
        let key = DecodingKey::from_rsa_pem(pem.as_ref()).map_err(|e| Error::with_source(ErrorKind::Config, e))?;
        Ok(JwtKey { algorithm: Algorithm::RS256, key })
    }

    /// An Ed25519 public key (SPKI PEM) for EdDSA.
    pub fn eddsa_pem(pem: impl AsRef<[u8]>) -> crate::Result<JwtKey> {
        let key = DecodingKey::from_ed_pem(pem.as_ref()).map_err(|e| Error::with_source(ErrorKind::Config, e))?;
        Ok(JwtKey { algorithm: Algorithm::EdDSA, key })
    }
}

/// Where to look for the token in the upgrade request.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum TokenSource {
    /// A header holding `Bearer <token>` (case-insensitive scheme).
    BearerHeader(http::HeaderName),
    /// A `Sec-WebSocket-Protocol` offer starting with this prefix; the rest
    /// is the token.
    Subprotocol(String),
    /// A query parameter.
    Query(String),
    /// A cookie.
    Cookie(String),
}

impl TokenSource {
    /// `Authorization: Bearer <token>`.
    pub fn bearer_header() -> TokenSource {
        TokenSource::BearerHeader(http::header::AUTHORIZATION)
    }

    /// A subprotocol offer `bearer.<token>`.
    pub fn subprotocol() -> TokenSource {
        TokenSource::Subprotocol("bearer.".into())
    }

    /// `?access_token=<token>`.
    pub fn query() -> TokenSource {
        TokenSource::Query("access_token".into())
    }

    /// A cookie named `name`.
    pub fn cookie(name: impl Into<String>) -> TokenSource {
        TokenSource::Cookie(name.into())
    }

    fn find(&self, hs: &Handshake) -> Option<String> {
        match self {
            TokenSource::BearerHeader(name) => {
                let v = hs.headers().get(name)?.to_str().ok()?.trim();
                let (scheme, token) = v.split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| token.trim().to_owned())
            }
            TokenSource::Subprotocol(prefix) => hs
                .headers()
                .get_all(http::header::SEC_WEBSOCKET_PROTOCOL)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .find_map(|offer| offer.trim().strip_prefix(prefix.as_str()).map(str::to_owned)),
            TokenSource::Query(name) => hs.query(name),
            TokenSource::Cookie(name) => hs.cookie(name),
        }
        .filter(|t| !t.is_empty())
    }
}

/// A verified token's claims, attached to the [`Identity`] it produced.
#[derive(Debug, Clone, PartialEq)]
pub struct JwtClaims(pub serde_json::Map<String, serde_json::Value>);

impl JwtClaims {
    /// One claim.
    pub fn get(&self, name: &str) -> Option<&serde_json::Value> {
        self.0.get(name)
    }
}

struct Inner {
    keys: Vec<JwtKey>,
    sources: Vec<TokenSource>,
    leeway: Duration,
    audience: Option<Vec<String>>,
    issuer: Option<Vec<String>>,
    rooms_claim: Option<String>,
    require_exp: bool,
}

/// Verifies JSON Web Tokens at the handshake and in `refresh` messages.
/// Install it with [`HubBuilder::jwt`](crate::HubBuilder::jwt). Cheap to
/// clone. See the [module docs](self).
#[derive(Clone)]
pub struct JwtAuth(Arc<Inner>);

impl fmt::Debug for JwtAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwtAuth")
            .field("keys", &self.0.keys)
            .field("sources", &self.0.sources)
            .field("leeway", &self.0.leeway)
            .field("audience", &self.0.audience)
            .field("issuer", &self.0.issuer)
            .field("rooms_claim", &self.0.rooms_claim)
            .field("require_exp", &self.0.require_exp)
            .finish()
    }
}

impl JwtAuth {
    /// Verifies tokens signed with `key`. Defaults: sources
    /// `Authorization: Bearer`, subprotocol `bearer.`, query `access_token`;
    /// leeway 5 s; no audience or issuer check; room claim `rooms`; `exp`
    /// required.
    pub fn new(key: JwtKey) -> JwtAuth {
        JwtAuth(Arc::new(Inner {
            keys: vec![key],
            sources: vec![TokenSource::bearer_header(), TokenSource::subprotocol(), TokenSource::query()],
            leeway: Duration::from_secs(5),
            audience: None,
            issuer: None,
            rooms_claim: Some("rooms".into()),
            require_exp: true,
        }))
    }

    fn edit(mut self, f: impl FnOnce(&mut Inner)) -> JwtAuth {
        // Settings are made before the auth is shared, so this is a plain
        // mutation; a clone already shared gets its own copy.
        match Arc::get_mut(&mut self.0) {
            Some(inner) => f(inner),
            None => {
                let old = &self.0;
                let mut inner = Inner {
                    keys: old.keys.clone(),
                    sources: old.sources.clone(),
                    leeway: old.leeway,
                    audience: old.audience.clone(),
                    issuer: old.issuer.clone(),
                    rooms_claim: old.rooms_claim.clone(),
                    require_exp: old.require_exp,
                };
                f(&mut inner);
                self.0 = Arc::new(inner);
            }
        }
        self
    }

    /// Adds another key (key rotation, or several algorithms).
    pub fn key(self, key: JwtKey) -> JwtAuth {
        self.edit(|i| i.keys.push(key))
    }

    /// Where to look for the token, in order (default: bearer header,
    /// subprotocol, query).
    pub fn sources(self, sources: Vec<TokenSource>) -> JwtAuth {
        self.edit(|i| i.sources = sources)
    }

    /// Clock-skew allowance for `exp` and `nbf`, also added to the
    /// connection's expiry (default 5 s).
    pub fn leeway(self, leeway: Duration) -> JwtAuth {
        self.edit(|i| i.leeway = leeway)
    }

    /// Requires `aud` to be one of these (default: not checked).
    pub fn audience<I: IntoIterator<Item = S>, S: Into<String>>(self, audience: I) -> JwtAuth {
        self.edit(|i| i.audience = Some(audience.into_iter().map(Into::into).collect()))
    }

    /// Requires `iss` to be one of these (default: not checked).
    pub fn issuer<I: IntoIterator<Item = S>, S: Into<String>>(self, issuer: I) -> JwtAuth {
        self.edit(|i| i.issuer = Some(issuer.into_iter().map(Into::into).collect()))
    }

    /// The claim listing the rooms the token may join (default `rooms`);
    /// `None` ignores room claims.
    pub fn rooms_claim(self, claim: Option<&str>) -> JwtAuth {
        self.edit(|i| i.rooms_claim = claim.map(str::to_owned))
    }

    /// Whether a token must have `exp` (default `true`: a token without one
    /// would never expire).
    pub fn require_exp(self, require: bool) -> JwtAuth {
        self.edit(|i| i.require_exp = require)
    }

    /// Verifies `token` and builds the identity its claims describe.
    pub fn verify(&self, token: &str) -> Result<Identity, Rejection> {
        let invalid = || Rejection::unauthorized("invalid token");
        let header = jsonwebtoken::decode_header(token).map_err(|_| invalid())?;
        let inner = &self.0;
        let mut last = invalid();
        for key in inner.keys.iter().filter(|k| k.algorithm == header.alg) {
            let mut validation = Validation::new(key.algorithm);
            validation.leeway = inner.leeway.as_secs();
            validation.validate_exp = true;
            validation.validate_nbf = true;
            let mut required = vec!["sub"];
            if inner.require_exp {
                required.push("exp");
            }
            validation.set_required_spec_claims(&required);
            match &inner.audience {
                Some(aud) => validation.set_audience(aud),
                None => validation.validate_aud = false,
            }
            if let Some(iss) = &inner.issuer {
                validation.set_issuer(iss);
            }
            match jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(token, &key.key, &validation) {
                Ok(data) => return self.identity(data.claims).ok_or_else(invalid),
                Err(e) => {
                    if matches!(e.kind(), jsonwebtoken::errors::ErrorKind::ExpiredSignature) {
                        last = Rejection::unauthorized("token expired");
                    }
                }
            }
        }
        Err(last)
    }

    fn identity(&self, claims: serde_json::Map<String, serde_json::Value>) -> Option<Identity> {
        let sub = claims.get("sub")?.as_str()?.to_owned();
        let mut identity = Identity::user(sub);
        if let Some(exp) = claims.get("exp") {
            let exp = exp.as_u64()?;
            identity = identity.with_expiry(UNIX_EPOCH + Duration::from_secs(exp) + self.0.leeway);
        }
        if let Some(name) = &self.0.rooms_claim {
            if let Some(rooms) = claims.get(name) {
                let rooms: Vec<String> =
                    rooms.as_array()?.iter().map(|r| r.as_str().map(str::to_owned)).collect::<Option<_>>()?;
                identity = identity.with_rooms(rooms);
            }
        }
        Some(identity.with_data(JwtClaims(claims)))
    }

    fn token(&self, hs: &Handshake) -> Option<String> {
        self.0.sources.iter().find_map(|s| s.find(hs))
    }
}

impl Authenticate for JwtAuth {
    fn authenticate(&self, handshake: &Handshake) -> BoxFuture<'static, Result<Identity, Rejection>> {
        let result = match self.token(handshake) {
            None => Err(Rejection::unauthorized("missing token")),
            Some(token) => self.verify(&token),
        };
        Box::pin(async move { result })
    }
}

impl Refresh for JwtAuth {
    fn refresh(&self, _current: &Identity, token: String) -> BoxFuture<'static, Result<Identity, CallError>> {
        let result =
            self.verify(&token).map_err(|rej| CallError::with_code(ErrorCode::UNAUTHORIZED, rej.message().to_owned()));
        Box::pin(async move { result })
    }
}

/// Seconds since the Unix epoch, for building `exp` claims.
pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}
