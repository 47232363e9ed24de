//! Abuse resistance: who may connect, from where, how often, and how fast
//! a connection may send.
//!
//! Every input from the network is untrusted. The defaults make a hub safe
//! to expose to the internet; the knobs are here and in
//! [`HubConfig`](crate::HubConfig):
//!
//! | what | where | default | when exceeded |
//! |---|---|---|---|
//! | `Origin` of a WebSocket upgrade | [`SecurityConfig::origin`] | [`OriginPolicy::SameOrigin`] | HTTP 403 before the upgrade |
//! | connections per hub | [`SecurityConfig::max_connections`] | 10,000 | HTTP 503 before the upgrade |
//! | connections per client address | [`SecurityConfig::max_connections_per_ip`] | 64 (loopback exempt) | HTTP 429 before the upgrade |
//! | new connections per second (hub-wide) | [`SecurityConfig::connection_rate`] | 1,000/s, burst 2,000 | HTTP 429 with `retry-after` before the upgrade |
//! | messages per connection | [`HubConfig::rate_limit`](crate::HubConfig::rate_limit) | 50/s, burst 200 | `error 420` with `retry_after_ms`; repeated: close 1008 |
//!
//! Admission (origin, counts, connection rate) runs in one function,
//! [`Hub::admit`](crate::Hub::admit), which both the standalone listener and
//! the axum route call after validating the upgrade request and before the
//! host's authenticator. The [`Admission`] it returns holds the connection's
//! slots until it is dropped, however the connection ends.
//!
//! `docs/security.md` has the threat model and the reasons for each default.

use crate::auth::Rejection;
use crate::metrics::{refused, refusing, Refusal};
use crate::util::Limiter;
pub use crate::util::RateLimit;
use http::{HeaderMap, HeaderName, StatusCode};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv6Addr};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Which `Origin` a WebSocket upgrade may come from (cross-site WebSocket
/// hijacking protection).
///
/// Browsers always send `Origin` on a WebSocket upgrade and scripts cannot
/// forge it, so it tells whose page opened the connection. A page on
/// another site could otherwise open a WebSocket to this server with the
/// user's cookies attached. Requests **without** `Origin` come from
/// non-browser clients (which could send anything anyway, and do not carry
/// a victim's cookies); they are accepted unless
/// [`SecurityConfig::require_origin`] is set.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum OriginPolicy {
    /// The `Origin`'s host and port must equal the request's `Host` (or,
    /// when the peer is a trusted proxy, its `X-Forwarded-Host`). Ports are
    /// compared after filling in the scheme's default (80 for `http`, 443
    /// for `https`). `Origin: null` is refused. The default.
    #[default]
    SameOrigin,
    /// Only these origins: `scheme://host[:port]`, compared case-insensitively
    /// with default ports filled in. An entry `https://*.example.com` allows
    /// any subdomain of `example.com` (not `example.com` itself).
    AllowList(Vec<String>),
    /// No check (the opt-out). Only for endpoints that authenticate with
    /// something a browser does not attach by itself (a token in the query
    /// or a subprotocol), never with cookies alone.
    Any,
}

/// An IP network: an address and a prefix length (`10.0.0.0/8`, `::1/128`).
/// Parses from `"10.0.0.0/8"` or a bare address (a single host).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IpNet {
    addr: IpAddr,
    prefix: u8,
}

impl IpNet {
    /// A network; `None` when `prefix` is longer than the address.
    pub fn new(addr: IpAddr, prefix: u8) -> Option<IpNet> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        (prefix <= max).then_some(IpNet { addr, prefix })
    }

    /// Whether `ip` is in this network (IPv4-mapped IPv6 addresses count as
    /// IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, canonical(ip)) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix)).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl FromStr for IpNet {
    type Err = String;

    fn from_str(s: &str) -> Result<IpNet, String> {
        let bad = || format!("`{s}` is not an IP address or network");
        let (addr, prefix) = match s.trim().split_once('/') {
            Some((a, p)) => (a, Some(p.parse::<u8>().map_err(|_| bad())?)),
            None => (s.trim(), None),
        };
        let addr = canonical(addr.parse::<IpAddr>().map_err(|_| bad())?);
        let prefix = prefix.unwrap_or(if addr.is_ipv4() { 32 } else { 128 });
        IpNet::new(addr, prefix).ok_or_else(bad)
    }
}

impl fmt::Display for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// IPv4-mapped IPv6 (`::ffff:1.2.3.4`) as IPv4, so one client is one key.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Admission policy for new connections: origin check, connection counts,
/// connection rate, and which proxies to believe about the client's address.
///
/// Set it with [`HubBuilder::security`](crate::HubBuilder::security). Every
/// field has a safe default, written in its docs.
///
/// ```
/// use switchboard::security::{OriginPolicy, RateLimit, SecurityConfig};
/// let security = SecurityConfig::default()
///     .origin(OriginPolicy::AllowList(vec!["https://app.example.com".into()]))
///     .max_connections_per_ip(16)
///     .trusted_proxies(vec!["10.0.0.0/8".parse().unwrap()]);
/// assert_eq!(security.max_connections, 10_000);
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct SecurityConfig {
    /// Which `Origin`s may open a connection. Default
    /// [`OriginPolicy::SameOrigin`]; refused with 403.
    pub origin: OriginPolicy,
    /// Refuse upgrades that have no `Origin` header at all (only browsers
    /// send one). Default `false`: non-browser clients are accepted.
    pub require_origin: bool,
    /// Most connections the hub serves at once, counting handshakes in
    /// progress; more are refused with 503. Default 10,000.
    pub max_connections: usize,
    /// Most connections at once from one client address; more are refused
    /// with 429. IPv6 clients are counted per /64 network (one subscriber's
    /// allocation). Not applied when the peer's address is unknown (axum
    /// served without `into_make_service_with_connect_info`), nor to
    /// [`SecurityConfig::per_ip_exempt`] addresses. Default 64.
    pub max_connections_per_ip: usize,
    /// Client addresses the per-address limit does not apply to. Default
    /// loopback (`127.0.0.0/8`, `::1`): a local process is not a remote
    /// abuser, and a reverse proxy on the same machine that is not (yet) in
    /// [`SecurityConfig::trusted_proxies`] would otherwise cap the whole
    /// site at the per-address limit.
    pub per_ip_exempt: Vec<IpNet>,
    /// Hub-wide rate of new connections; more are refused with 429 and a
    /// `retry-after` header. `None` turns it off. Default 1,000 per second
    /// with a burst of 2,000.
    pub connection_rate: Option<RateLimit>,
    /// Proxies whose forwarded-for header is believed. When the direct peer
    /// is in this list, the client's address is taken from
    /// [`SecurityConfig::forwarded_header`] by the rightmost-untrusted rule
    /// (see `docs/security.md`), and `X-Forwarded-Host` stands in for `Host`
    /// in the same-origin check. Default empty: the peer address is the
    /// client, and forwarded headers are ignored.
    pub trusted_proxies: Vec<IpNet>,
    /// The header a trusted proxy puts the client's address in, a
    /// comma-separated list with the nearest hop last. Default
    /// `x-forwarded-for`.
    pub forwarded_header: HeaderName,
    /// Spread the retry hint of a shed connection (the connection limit or
    /// rate): the floor plus a random share of the time the hub needs to
    /// take back everyone it shed lately (`docs/protocol.md` §7.3), so a
    /// reconnect storm comes back spread out. `false`: the floor only (1 s
    /// for the limit, the wait for the next token for the rate), as before
    /// issue 18; for comparing storms. Default `true`.
    pub spread_retry_hint: bool,
}

impl Default for SecurityConfig {
    fn default() -> Self {
        SecurityConfig {
            origin: OriginPolicy::SameOrigin,
            require_origin: false,
            max_connections: 10_000,
            max_connections_per_ip: 64,
            per_ip_exempt: vec![
                IpNet { addr: IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), prefix: 8 },
                IpNet { addr: IpAddr::V6(Ipv6Addr::LOCALHOST), prefix: 128 },
            ],
            connection_rate: Some(RateLimit::per_second(1000).burst(2000)),
            trusted_proxies: Vec::new(),
            forwarded_header: HeaderName::from_static("x-forwarded-for"),
            spread_retry_hint: true,
        }
    }
}

impl SecurityConfig {
    /// Sets [`SecurityConfig::origin`].
    pub fn origin(mut self, origin: OriginPolicy) -> Self {
        self.origin = origin;
        self
    }

    /// Sets [`SecurityConfig::require_origin`].
    pub fn require_origin(mut self, require: bool) -> Self {
        self.require_origin = require;
        self
    }

    /// Sets [`SecurityConfig::spread_retry_hint`].
    pub fn spread_retry_hint(mut self, spread: bool) -> Self {
        self.spread_retry_hint = spread;
        self
    }

    /// Sets [`SecurityConfig::max_connections`].
    pub fn max_connections(mut self, max: usize) -> Self {
        self.max_connections = max;
        self
    }

    /// Sets [`SecurityConfig::max_connections_per_ip`].
    pub fn max_connections_per_ip(mut self, max: usize) -> Self {
        self.max_connections_per_ip = max;
        self
    }

    /// Sets [`SecurityConfig::per_ip_exempt`].
    pub fn per_ip_exempt(mut self, exempt: Vec<IpNet>) -> Self {
        self.per_ip_exempt = exempt;
        self
    }

    /// Sets [`SecurityConfig::connection_rate`].
    pub fn connection_rate(mut self, rate: Option<RateLimit>) -> Self {
        self.connection_rate = rate;
        self
    }

    /// Sets [`SecurityConfig::trusted_proxies`].
    pub fn trusted_proxies(mut self, proxies: Vec<IpNet>) -> Self {
        self.trusted_proxies = proxies;
        self
    }

    /// Sets [`SecurityConfig::forwarded_header`].
    pub fn forwarded_header(mut self, header: HeaderName) -> Self {
        self.forwarded_header = header;
        self
    }

    fn is_trusted(&self, ip: IpAddr) -> bool {
        self.trusted_proxies.iter().any(|n| n.contains(ip))
    }
}

/// The client's address: the peer, or — when the peer is a trusted proxy —
/// the rightmost address of the forwarded-for list that is not a trusted
/// proxy (all trusted: the leftmost). A malformed entry met on that walk is
/// a 400: only trusted proxies wrote the part of the list that is read.
pub(crate) fn client_ip(config: &SecurityConfig, peer: IpAddr, headers: &HeaderMap) -> Result<IpAddr, Rejection> {
    let peer = canonical(peer);
    if !config.is_trusted(peer) {
        return Ok(peer);
    }
    let entries: Vec<&str> = headers
        .get_all(&config.forwarded_header)
        .iter()
        .map(|v| v.to_str().unwrap_or("\u{0}"))
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    let mut client = peer;
    for entry in entries.iter().rev() {
        let ip = parse_forwarded_ip(entry).ok_or_else(|| {
            Rejection::new(StatusCode::BAD_REQUEST, format!("malformed {} header", config.forwarded_header))
        })?;
        client = canonical(ip);
        if !config.is_trusted(client) {
            break;
        }
    }
    Ok(client)
}

/// `1.2.3.4`, `1.2.3.4:5678`, `::1`, `[::1]`, `[::1]:5678`.
pub(crate) fn parse_forwarded_ip(entry: &str) -> Option<IpAddr> {
    if let Ok(ip) = entry.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Some(rest) = entry.strip_prefix('[') {
        let (ip, tail) = rest.split_once(']')?;
        if !(tail.is_empty() || tail.strip_prefix(':').is_some_and(|p| p.parse::<u16>().is_ok())) {
            return None;
        }
        return ip.parse::<Ipv6Addr>().ok().map(IpAddr::V6);
    }
    entry.parse::<std::net::SocketAddrV4>().ok().map(|s| IpAddr::V4(*s.ip()))
}

/// An origin or host, split for comparison: lowercase host, port with the
/// scheme's default filled in.
#[derive(Debug, PartialEq, Eq)]
struct Site {
    scheme: Option<String>,
    host: String,
    port: Option<u16>,
}

fn default_port(scheme: &str) -> Option<u16> {
    match scheme {
        "http" | "ws" => Some(80),
        "https" | "wss" => Some(443),
        _ => None,
    }
}

/// `host[:port]` (IPv6 in brackets); the host lowercased.
fn split_host_port(authority: &str) -> Option<(String, Option<u16>)> {
    if authority.is_empty() || authority.contains(['/', '@', '?', '#', ' ']) {
        return None;
    }
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (h, tail) = rest.split_once(']')?;
        h.parse::<Ipv6Addr>().ok()?;
        let port = match tail {
            "" => None,
            t => Some(t.strip_prefix(':')?.parse::<u16>().ok()?),
        };
        (format!("[{}]", h.to_ascii_lowercase()), port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_ascii_lowercase(), Some(p.parse::<u16>().ok()?)),
            None => (authority.to_ascii_lowercase(), None),
        }
    };
    if host.is_empty() {
        return None;
    }
    Some((host, port))
}

/// Parses `scheme://host[:port]` (an `Origin` value or an allowlist entry).
fn parse_origin(origin: &str) -> Option<Site> {
    let (scheme, authority) = origin.trim().split_once("://")?;
    let scheme = scheme.to_ascii_lowercase();
    let authority = authority.strip_suffix('/').unwrap_or(authority);
    let (host, port) = split_host_port(authority)?;
    let port = port.or_else(|| default_port(&scheme));
    Some(Site { scheme: Some(scheme), host, port })
}

/// Checks `Origin` against the policy. `host` is the request's `Host` (or a
/// trusted proxy's `X-Forwarded-Host`). `refused` is the reason a
/// same-origin refusal gives, worded for the transport that asks
/// ("cross-origin WebSocket refused", "cross-origin request refused").
pub(crate) fn check_origin(
    config: &SecurityConfig,
    headers: &HeaderMap,
    host: Option<&str>,
    refused: &str,
) -> Result<(), Rejection> {
    let origins: Vec<&http::HeaderValue> = headers.get_all(http::header::ORIGIN).iter().collect();
    let forbidden = |why: &str| Err(Rejection::forbidden(why.to_owned()));
    let origin = match origins.as_slice() {
        [] if config.require_origin => return forbidden("an Origin header is required"),
        [] => return Ok(()),
        [one] => one.to_str().unwrap_or(""),
        _ => return forbidden("more than one Origin header"),
    };
    match &config.origin {
        OriginPolicy::Any => Ok(()),
        OriginPolicy::SameOrigin => {
            let Some(o) = parse_origin(origin) else { return forbidden(refused) };
            let Some((h, p)) = host.and_then(split_host_port) else {
                return forbidden(&format!("{refused} (no Host)"));
            };
            let p = p.or_else(|| o.scheme.as_deref().and_then(default_port));
            if o.host == h && o.port == p {
                Ok(())
            } else {
                forbidden(refused)
            }
        }
        OriginPolicy::AllowList(list) => {
            let Some(o) = parse_origin(origin) else { return forbidden("origin not allowed") };
            let allowed = list.iter().filter_map(|e| parse_origin(e)).any(|a| {
                let host_ok = match a.host.strip_prefix("*.") {
                    Some(domain) => o.host.strip_suffix(domain).is_some_and(|sub| sub.len() > 1 && sub.ends_with('.')),
                    None => a.host == o.host,
                };
                a.scheme == o.scheme && host_ok && a.port == o.port
            });
            if allowed {
                Ok(())
            } else {
                forbidden("origin not allowed")
            }
        }
    }
}

/// The address a connection is counted under: IPv4 as is, IPv6 by /64.
pub(crate) fn ip_key(ip: IpAddr) -> IpAddr {
    match canonical(ip) {
        IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & (u128::MAX << 64))),
        v4 => v4,
    }
}

/// The hub's admission counters. Shared with every [`Admission`].
pub(crate) struct AdmissionState {
    total: AtomicUsize,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    rate: Option<Limiter>,
    warned_no_peer: AtomicBool,
    /// Recent sheds, for the spread of the retry hint.
    shed: Mutex<ShedWindow>,
    /// How many new connections a second the hub takes back during a storm
    /// (the connection rate, or [`STORM_DRAIN_PER_SEC`] without one).
    drain_per_sec: f64,
    /// [`SecurityConfig::spread_retry_hint`].
    spread: bool,
}

/// Connections a second a hub without a connection rate is assumed to take
/// back during a storm, for the spread of the retry hint.
const STORM_DRAIN_PER_SEC: f64 = 1000.0;
/// Ceiling of the retry hint's spread.
const MAX_HINT_SPREAD: Duration = Duration::from_secs(30);

/// Sheds (refusals with a retry hint) in the current and the previous
/// one-second window, and the hint's random state.
struct ShedWindow {
    start: tokio::time::Instant,
    previous: u32,
    current: u32,
    jitter: crate::util::Jitter,
}

impl ShedWindow {
    /// Counts one shed at `now`; returns the sheds in the last one to two
    /// seconds.
    fn count(&mut self, now: tokio::time::Instant) -> u32 {
        let elapsed = now.saturating_duration_since(self.start);
        if elapsed >= Duration::from_secs(2) {
            (self.previous, self.current, self.start) = (0, 0, now);
        } else if elapsed >= Duration::from_secs(1) {
            (self.previous, self.current) = (self.current, 0);
            self.start += Duration::from_secs(1);
        }
        self.current = self.current.saturating_add(1);
        self.previous.saturating_add(self.current)
    }
}

impl AdmissionState {
    pub(crate) fn new(config: &SecurityConfig) -> AdmissionState {
        AdmissionState {
            total: AtomicUsize::new(0),
            per_ip: Mutex::new(HashMap::new()),
            rate: config.connection_rate.as_ref().map(RateLimit::limiter),
            warned_no_peer: AtomicBool::new(false),
            shed: Mutex::new(ShedWindow {
                start: tokio::time::Instant::now(),
                previous: 0,
                current: 0,
                jitter: crate::util::Jitter::new(None),
            }),
            drain_per_sec: config
                .connection_rate
                .map_or(STORM_DRAIN_PER_SEC, |r| 1.0 / r.refill_interval().as_secs_f64().max(1e-9)),
            spread: config.spread_retry_hint,
        }
    }

    /// The retry hint for a shed connection: at least `floor`, plus a
    /// random share of the time the hub needs to take back everyone it shed
    /// lately (sheds in the last one to two seconds over the drain rate;
    /// at least 1 s, at most 30 s). Jittered per refusal, so clients shed
    /// in the same instant come back spread over that time instead of all
    /// at once (`docs/protocol.md` §7.3).
    pub(crate) fn retry_hint(&self, floor: Duration) -> Duration {
        if !self.spread {
            return floor;
        }
        let mut shed = self.shed.lock();
        let recent = shed.count(tokio::time::Instant::now());
        let spread = Duration::from_secs_f64(f64::from(recent) / self.drain_per_sec)
            .clamp(Duration::from_secs(1), MAX_HINT_SPREAD);
        floor + spread.mul_f64(shed.jitter.unit())
    }

    /// Admitted connections (and handshakes) holding a slot.
    pub(crate) fn total(&self) -> usize {
        self.total.load(Ordering::Acquire)
    }

    /// Distinct client addresses (IPv6: /64 networks) holding a slot.
    pub(crate) fn addresses(&self) -> usize {
        self.per_ip.lock().len()
    }
}

/// A connection's admission slot, from [`Hub::admit`](crate::Hub::admit).
///
/// It counts towards [`SecurityConfig::max_connections`] and
/// [`SecurityConfig::max_connections_per_ip`] until it is dropped. Hold it
/// for the life of the connection; dropping it (normally, by a panic or by a
/// cancelled task) frees the slots.
#[must_use = "the connection's slots are freed when this is dropped"]
pub struct Admission {
    state: Arc<AdmissionState>,
    ip: Option<IpAddr>,
}

impl fmt::Debug for Admission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Admission").field("ip", &self.ip).finish()
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        if let Some(ip) = self.ip {
            let mut per_ip = self.state.per_ip.lock();
            if let Some(n) = per_ip.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    per_ip.remove(&ip);
                }
            }
        }
        self.state.total.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The admission decision for one upgrade request: origin, then the total
/// and per-address counts, then the connection rate. Counts are taken before
/// the rate, so a refusal for being full spends no rate token.
pub(crate) fn admit(
    config: &SecurityConfig,
    state: &Arc<AdmissionState>,
    peer: Option<IpAddr>,
    headers: &HeaderMap,
) -> Result<(Admission, Option<IpAddr>), Rejection> {
    let client = match peer {
        Some(p) => Some(client_ip(config, p, headers).map_err(|r| refusing(Refusal::Address, r))?),
        None => None,
    };
    let via_proxy = peer.is_some_and(|p| config.is_trusted(canonical(p)));
    let forwarded_host =
        headers.get("x-forwarded-host").and_then(|v| v.to_str().ok()).map(|v| v.split(',').next().unwrap_or("").trim());
    let host = match forwarded_host {
        Some(h) if via_proxy => Some(h),
        _ => headers.get(http::header::HOST).and_then(|v| v.to_str().ok()),
    };
    check_origin(config, headers, host, "cross-origin WebSocket refused").map_err(|r| refusing(Refusal::Origin, r))?;

    // Total first: fetch_add, and undo when over (never blocks, never races
    // past the bound by more than the requests refused at that instant).
    if state.total.fetch_add(1, Ordering::AcqRel) >= config.max_connections {
        state.total.fetch_sub(1, Ordering::AcqRel);
        refused(Refusal::Limit);
        return Err(Rejection::new(StatusCode::SERVICE_UNAVAILABLE, "server is at its connection limit")
            .with_retry_after(state.retry_hint(Duration::from_secs(1))));
    }
    // From here the slot is held by `ticket`: an early return frees it.
    let mut ticket = Admission { state: state.clone(), ip: None };
    match client {
        Some(ip) if config.per_ip_exempt.iter().any(|n| n.contains(ip)) => {}
        Some(ip) => {
            let key = ip_key(ip);
            let mut per_ip = state.per_ip.lock();
            let n = per_ip.entry(key).or_insert(0);
            if *n >= config.max_connections_per_ip {
                if *n == 0 {
                    per_ip.remove(&key);
                }
                refused(Refusal::AddressLimit);
                return Err(Rejection::new(StatusCode::TOO_MANY_REQUESTS, "too many connections from this address"));
            }
            *n += 1;
            ticket.ip = Some(key);
        }
        None => {
            if !state.warned_no_peer.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    "peer address unknown: the per-address connection limit is not applied (serve axum with \
                     into_make_service_with_connect_info::<SocketAddr>())"
                );
            }
        }
    }
    if let Some(rate) = &state.rate {
        if let Err(wait) = rate.check() {
            refused(Refusal::Rate);
            return Err(Rejection::new(StatusCode::TOO_MANY_REQUESTS, "too many new connections, retry later")
                .with_retry_after(state.retry_hint(wait)));
        }
    }
    Ok((ticket, client))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
        }
        h
    }

    #[test]
    fn ip_nets() {
        let net: IpNet = "10.0.0.0/8".parse().unwrap();
        assert!(net.contains("10.1.2.3".parse().unwrap()));
        assert!(net.contains("::ffff:10.1.2.3".parse().unwrap()));
        assert!(!net.contains("11.0.0.1".parse().unwrap()));
        let host: IpNet = "127.0.0.1".parse().unwrap();
        assert!(host.contains("127.0.0.1".parse().unwrap()));
        assert!(!host.contains("127.0.0.2".parse().unwrap()));
        let v6: IpNet = "fd00::/8".parse().unwrap();
        assert!(v6.contains("fd12::1".parse().unwrap()));
        assert!(!v6.contains("fe80::1".parse().unwrap()));
        let all: IpNet = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("8.8.8.8".parse().unwrap()));
        assert!("10.0.0.0/33".parse::<IpNet>().is_err());
        assert!("nope".parse::<IpNet>().is_err());
    }

    #[test]
    fn rightmost_untrusted_forwarded_for() {
        let cfg = SecurityConfig::default().trusted_proxies(vec!["10.0.0.0/8".parse().unwrap()]);
        let proxy: IpAddr = "10.0.0.1".parse().unwrap();
        let h = headers(&[("x-forwarded-for", "6.6.6.6, 1.2.3.4, 10.0.0.7")]);
        assert_eq!(client_ip(&cfg, proxy, &h).unwrap(), "1.2.3.4".parse::<IpAddr>().unwrap());
        // Not from a trusted proxy: the header is ignored.
        let direct: IpAddr = "5.5.5.5".parse().unwrap();
        assert_eq!(client_ip(&cfg, direct, &h).unwrap(), direct);
        // Several header lines are one list, in order.
        let h = headers(&[("x-forwarded-for", "1.1.1.1"), ("x-forwarded-for", "2.2.2.2:443")]);
        assert_eq!(client_ip(&cfg, proxy, &h).unwrap(), "2.2.2.2".parse::<IpAddr>().unwrap());
        // All trusted: the leftmost.
        let h = headers(&[("x-forwarded-for", "10.9.9.9, 10.0.0.2")]);
        assert_eq!(client_ip(&cfg, proxy, &h).unwrap(), "10.9.9.9".parse::<IpAddr>().unwrap());
        // No header: the proxy itself.
        assert_eq!(client_ip(&cfg, proxy, &HeaderMap::new()).unwrap(), proxy);
        // Garbage where a trusted proxy should have written an address.
        let h = headers(&[("x-forwarded-for", "1.2.3.4, junk")]);
        assert_eq!(client_ip(&cfg, proxy, &h).unwrap_err().status(), StatusCode::BAD_REQUEST);
        // Garbage left of the client is never read.
        let h = headers(&[("x-forwarded-for", "junk, 1.2.3.4")]);
        assert_eq!(client_ip(&cfg, proxy, &h).unwrap(), "1.2.3.4".parse::<IpAddr>().unwrap());
        assert_eq!(parse_forwarded_ip("[::1]:80"), Some("::1".parse().unwrap()));
        assert_eq!(parse_forwarded_ip("[::1]x"), None);
    }

    #[test]
    fn origins() {
        let same = SecurityConfig::default();
        let check = |cfg: &SecurityConfig, origin: Option<&str>, host: Option<&str>| {
            let mut h = HeaderMap::new();
            if let Some(o) = origin {
                h.insert(http::header::ORIGIN, o.parse().unwrap());
            }
            check_origin(cfg, &h, host, "refused").is_ok()
        };
        assert!(check(&same, None, Some("a.example")), "no Origin: a non-browser client");
        assert!(check(&same, Some("http://a.example"), Some("a.example")));
        assert!(check(&same, Some("http://A.Example:80"), Some("a.example")));
        assert!(check(&same, Some("https://a.example"), Some("a.example:443")));
        assert!(check(&same, Some("http://127.0.0.1:3000"), Some("127.0.0.1:3000")));
        assert!(check(&same, Some("http://[::1]:3000"), Some("[::1]:3000")));
        assert!(!check(&same, Some("http://evil.example"), Some("a.example")));
        assert!(!check(&same, Some("http://a.example:8080"), Some("a.example")));
        assert!(!check(&same, Some("null"), Some("a.example")));
        assert!(!check(&same, Some("http://a.example"), None));
        assert!(!check(&same.clone().require_origin(true), None, Some("a.example")));
        let list = SecurityConfig::default()
            .origin(OriginPolicy::AllowList(vec!["https://app.example.com".into(), "https://*.example.org".into()]));
        assert!(check(&list, Some("https://app.example.com"), Some("ws.example.com")));
        assert!(check(&list, Some("https://app.example.com:443"), Some("x")));
        assert!(!check(&list, Some("http://app.example.com"), Some("x")));
        assert!(check(&list, Some("https://a.b.example.org"), Some("x")));
        assert!(!check(&list, Some("https://example.org"), Some("x")));
        assert!(!check(&list, Some("https://badexample.org"), Some("x")));
        let any = SecurityConfig::default().origin(OriginPolicy::Any);
        assert!(check(&any, Some("http://evil.example"), Some("a.example")));
    }

    #[tokio::test(start_paused = true)]
    async fn admission_counts_and_rate() {
        let cfg = SecurityConfig::default()
            .max_connections(3)
            .max_connections_per_ip(2)
            .connection_rate(Some(RateLimit::per_second(1).burst(4)));
        // Loopback is exempt by default.
        let state = Arc::new(AdmissionState::new(&cfg));
        let local: IpAddr = "127.0.0.1".parse().unwrap();
        let held: Vec<_> = (0..3).map(|_| admit(&cfg, &state, Some(local), &HeaderMap::new()).unwrap()).collect();
        assert_eq!((state.total(), state.addresses()), (3, 0));
        drop(held);
        let state = Arc::new(AdmissionState::new(&cfg));
        let a: IpAddr = "1.1.1.1".parse().unwrap();
        let b: IpAddr = "2.2.2.2".parse().unwrap();
        let h = HeaderMap::new();
        let t1 = admit(&cfg, &state, Some(a), &h).unwrap();
        let t2 = admit(&cfg, &state, Some(a), &h).unwrap();
        assert_eq!(admit(&cfg, &state, Some(a), &h).unwrap_err().status(), StatusCode::TOO_MANY_REQUESTS);
        let t3 = admit(&cfg, &state, Some(b), &h).unwrap();
        assert_eq!(admit(&cfg, &state, Some(b), &h).unwrap_err().status(), StatusCode::SERVICE_UNAVAILABLE);
        drop((t1, t2, t3));
        assert_eq!((state.total(), state.addresses()), (0, 0));
        // Three tokens spent; one left, then the rate refuses with a hint.
        let t4 = admit(&cfg, &state, Some(b), &h).unwrap();
        let err = admit(&cfg, &state, Some(b), &h).unwrap_err();
        assert_eq!(err.status(), StatusCode::TOO_MANY_REQUESTS);
        // The wait for the next token (1 s), plus jitter of up to the time
        // the hub needs to take back its two recent sheds (the 503 above
        // and this one) at 1/s: 2 s.
        let hint = err.retry_after().unwrap();
        assert!(hint >= Duration::from_secs(1) && hint < Duration::from_secs(3), "{hint:?}");
        assert_eq!((state.total(), state.addresses()), (1, 1), "a refusal holds no slot");
        tokio::time::advance(Duration::from_secs(1)).await;
        let t5 = admit(&cfg, &state, Some(a), &h).unwrap();
        drop((t4, t5));
        assert_eq!((state.total(), state.addresses()), (0, 0));
        // IPv6 clients count per /64.
        let cfg = SecurityConfig::default().max_connections_per_ip(1).connection_rate(None);
        let state = Arc::new(AdmissionState::new(&cfg));
        let _t = admit(&cfg, &state, Some("2001:db8::1".parse().unwrap()), &h).unwrap();
        assert!(admit(&cfg, &state, Some("2001:db8::2".parse().unwrap()), &h).is_err());
        assert!(admit(&cfg, &state, Some("2001:db8:0:1::1".parse().unwrap()), &h).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn a_storm_of_sheds_gets_hints_spread_over_the_time_to_take_it_back() {
        // Drain rate 100/s: 1,000 sheds in one instant need about 10 s.
        let cfg = SecurityConfig::default().connection_rate(Some(RateLimit::per_second(100).burst(1)));
        let state = AdmissionState::new(&cfg);
        let floor = Duration::from_millis(10);
        let hints: Vec<Duration> = (0..1000).map(|_| state.retry_hint(floor)).collect();
        assert!(hints.iter().all(|h| *h >= floor && *h < floor + MAX_HINT_SPREAD));
        // The spread grows with the storm: the first sheds (few so far) get
        // a hint within about a second, the last ones within about 10 s.
        assert!(hints[..50].iter().all(|h| *h < floor + Duration::from_secs(1)));
        let late = &hints[900..];
        let max = late.iter().max().unwrap();
        let min = late.iter().min().unwrap();
        assert!(*max > Duration::from_secs(7) && *min < Duration::from_secs(2), "{min:?}..{max:?}");
        // Spread, not clustered: every second of the window gets some.
        let mut buckets = [0u32; 10];
        for h in late {
            buckets[(h.as_secs() as usize).min(9)] += 1;
        }
        assert!(buckets[..9].iter().all(|&n| n > 0), "{buckets:?}");
        // Two quiet seconds later the storm is forgotten.
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(state.retry_hint(floor) < floor + Duration::from_secs(1));
        // Turned off: the floor, every time.
        let state = AdmissionState::new(&cfg.spread_retry_hint(false));
        assert!((0..100).all(|_| state.retry_hint(floor) == floor));
    }

    #[tokio::test(start_paused = true)]
    async fn limiter_follows_tokio_time() {
        let l = RateLimit::new(1, Duration::from_secs(10)).burst(2).limiter();
        assert!(l.check().is_ok());
        assert!(l.check().is_ok());
        assert_eq!(l.check(), Err(Duration::from_secs(10)));
        tokio::time::advance(Duration::from_secs(4)).await;
        assert_eq!(l.check(), Err(Duration::from_secs(6)));
        tokio::time::advance(Duration::from_secs(6)).await;
        assert!(l.check().is_ok());
        assert!(l.check().is_err());
    }
}
