//! Client configuration: reconnect backoff, timeouts and buffer bounds.

use std::time::Duration;

/// Reconnect backoff: exponential with **full jitter**, as `docs/protocol.md`
/// §7.2 prescribes.
///
/// Before reconnect attempt `n` (failures since the last connection, from 0)
/// the client waits a uniformly random time in
/// `[0, min(max, initial × 2^n)]`. The **reset rule**: a connection that
/// stayed up for at least `reset_after` after its `hello` resets `n` to 0;
/// one that got its `hello` but ended sooner resets `n` to the number of
/// such short-lived connections before it in a row (0 for the first). So a
/// long outage's failures do not carry over to the next drop (the first
/// wait after a short-lived connection is up to `initial` again), while a
/// server that accepts and at once closes meets a growing backoff. Full jitter (rather than "delay ± 10 %")
/// spreads a crowd of clients whose server restarted over the whole window,
/// so the new instance is not hit by all of them at once.
///
/// ```
/// use std::time::Duration;
/// use switchboard::client::Backoff;
/// let b = Backoff::default();
/// assert_eq!(b.ceiling(0), Duration::from_secs(1));
/// assert_eq!(b.ceiling(3), Duration::from_secs(8));
/// assert_eq!(b.ceiling(10), Duration::from_secs(30));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Backoff {
    /// Ceiling of the first wait. Default 1 s.
    pub initial: Duration,
    /// Largest ceiling. Default 30 s.
    pub max: Duration,
    /// How long a connection must stay up (counted from its `hello`) for the
    /// attempt counter to start over at 0 and the count of short-lived
    /// connections to be forgotten (see the reset rule above). Default 30 s.
    pub reset_after: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { initial: Duration::from_secs(1), max: Duration::from_secs(30), reset_after: Duration::from_secs(30) }
    }
}

impl Backoff {
    /// Sets [`Backoff::initial`].
    pub fn initial(mut self, v: Duration) -> Self {
        self.initial = v;
        self
    }

    /// Sets [`Backoff::max`].
    pub fn max(mut self, v: Duration) -> Self {
        self.max = v;
        self
    }

    /// Sets [`Backoff::reset_after`].
    pub fn reset_after(mut self, v: Duration) -> Self {
        self.reset_after = v;
        self
    }

    /// The longest wait before attempt `attempt`: `min(max, initial × 2^attempt)`.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX);
        self.initial.checked_mul(factor).map_or(self.max, |d| d.min(self.max))
    }

    /// The wait before attempt `attempt` for a jitter draw `unit` in
    /// `[0, 1)`: `unit × ceiling(attempt)`.
    pub fn delay(&self, attempt: u32, unit: f64) -> Duration {
        self.ceiling(attempt).mul_f64(unit.clamp(0.0, 1.0))
    }
}

/// Where the client presents the token from its token provider
/// ([`ClientBuilder::token`](super::ClientBuilder::token)).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum TokenPlacement {
    /// `Authorization: Bearer <token>`: the first place the server's JWT
    /// authenticator looks. The default.
    #[default]
    BearerHeader,
    /// A query parameter, `?access_token=<token>` for the server's JWT
    /// authenticator (it may end up in access logs).
    Query(String),
}

/// Client configuration. Every field has a safe default, written in its
/// docs; setters take and return the config by value.
///
/// ```
/// use std::time::Duration;
/// use switchboard::client::{Backoff, ClientConfig};
/// let config = ClientConfig::default()
///     .call_timeout(Duration::from_secs(5))
///     .backoff(Backoff::default().max(Duration::from_secs(10)));
/// assert_eq!(config.offline_buffer_messages, 256);
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ClientConfig {
    /// Reconnect backoff. Default [`Backoff::default`] (1 s, doubling, 30 s
    /// cap, reset after 30 s up).
    pub backoff: Backoff,
    /// Seed of the jitter generator; `None` (the default) seeds it randomly
    /// per client. Set it to make a test's delays reproducible.
    pub jitter_seed: Option<u64>,
    /// Longest time from starting a connection attempt (TCP, upgrade) to
    /// receiving the server's `hello`. Default 10 s.
    pub connect_timeout: Duration,
    /// How long a call or join waits for its reply, counted from when it was
    /// made (time spent in the offline buffer included). Default 10 s.
    pub call_timeout: Duration,
    /// Client pings: when set, the client sends a `ping` envelope after this
    /// much silence and declares the connection dead if nothing arrives
    /// within the server's heartbeat timeout after it. Default `None`: the
    /// client relies on the server's heartbeats, and pings every 25 s only
    /// when the server announces none (`heartbeat_interval_ms: 0`).
    pub ping_interval: Option<Duration>,
    /// Extra silence tolerated on top of the protocol's dead-connection rule
    /// (`max(I, T) + T`, §8), for slow networks. Default 0.
    pub heartbeat_grace: Duration,
    /// Offline buffer bound in messages: buffered sends and calls made while
    /// disconnected wait here and are sent, in order, after the rooms were
    /// rejoined. When full, the **oldest** is dropped (counted in
    /// [`ClientStats::offline_dropped`](super::ClientStats::offline_dropped);
    /// a dropped call fails with [`ClientErrorKind::Dropped`](super::ClientErrorKind::Dropped)).
    /// Default 256.
    pub offline_buffer_messages: usize,
    /// Offline buffer bound in encoded bytes, with the same drop-oldest
    /// policy; a single message larger than this is refused. Default 1 MiB.
    pub offline_buffer_bytes: usize,
    /// Messages waiting for the connection's writer. A buffered send or call
    /// waits for room here (backpressure); a volatile send finding it full
    /// is dropped and counted. Default 256.
    pub send_queue: usize,
    /// Events a room's stream holds for the application. When the
    /// application reads too slowly the **oldest** is dropped, counted, and
    /// reported with [`RoomEvent::Lagged`](super::RoomEvent::Lagged) before
    /// the next event it reads. Default 1024. The same bound applies to the
    /// direct-event stream ([`Client::direct_events`](super::Client::direct_events)).
    pub room_buffer: usize,
    /// Largest message accepted from the server, in bytes; a larger one is
    /// a fatal error and the client reconnects. Default 16 MiB.
    pub max_message_size: usize,
    /// Socket read buffer per connection. Default 8 KiB.
    pub read_buffer_size: usize,
    /// Bytes gathered before writing to the socket (the client flushes after
    /// every batch anyway). Default 8 KiB.
    pub write_buffer_size: usize,
    /// Where the token from the token provider goes. Default
    /// [`TokenPlacement::BearerHeader`].
    pub token_placement: TokenPlacement,
    /// Offer `permessage-deflate` (RFC 7692) when connecting. When the
    /// server accepts, compressed messages from it are inflated (capped at
    /// `max_message_size`) and messages of 256 bytes or more are sent
    /// compressed. Default `true`.
    pub compression: bool,
    /// The rustls configuration of `wss://` connections (feature `tls`):
    /// your own roots (a private CA), client certificates, protocol
    /// versions. Its ALPN list is replaced by `http/1.1`. Default `None`:
    /// the roots the `tls-native-roots` and `tls-webpki-roots` features
    /// select, no client certificate.
    #[cfg(feature = "tls")]
    #[cfg_attr(docsrs, doc(cfg(feature = "tls")))]
    pub tls: Option<std::sync::Arc<rustls::ClientConfig>>,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            backoff: Backoff::default(),
            jitter_seed: None,
            connect_timeout: Duration::from_secs(10),
            call_timeout: Duration::from_secs(10),
            ping_interval: None,
            heartbeat_grace: Duration::ZERO,
            offline_buffer_messages: 256,
            offline_buffer_bytes: 1024 * 1024,
            send_queue: 256,
            room_buffer: 1024,
            max_message_size: 16 * 1024 * 1024,
            read_buffer_size: 8 * 1024,
            write_buffer_size: 8 * 1024,
            token_placement: TokenPlacement::BearerHeader,
            compression: true,
            #[cfg(feature = "tls")]
            tls: None,
        }
    }
}

macro_rules! setters {
    ($($(#[$doc:meta])* $name:ident: $ty:ty,)*) => {
        impl ClientConfig {
            $(
                $(#[$doc])*
                pub fn $name(mut self, value: $ty) -> Self {
                    self.$name = value;
                    self
                }
            )*
        }
    };
}

setters! {
    /// Sets [`ClientConfig::backoff`].
    backoff: Backoff,
    /// Sets [`ClientConfig::jitter_seed`].
    jitter_seed: Option<u64>,
    /// Sets [`ClientConfig::connect_timeout`].
    connect_timeout: Duration,
    /// Sets [`ClientConfig::call_timeout`].
    call_timeout: Duration,
    /// Sets [`ClientConfig::ping_interval`].
    ping_interval: Option<Duration>,
    /// Sets [`ClientConfig::heartbeat_grace`].
    heartbeat_grace: Duration,
    /// Sets [`ClientConfig::offline_buffer_messages`].
    offline_buffer_messages: usize,
    /// Sets [`ClientConfig::offline_buffer_bytes`].
    offline_buffer_bytes: usize,
    /// Sets [`ClientConfig::send_queue`].
    send_queue: usize,
    /// Sets [`ClientConfig::room_buffer`].
    room_buffer: usize,
    /// Sets [`ClientConfig::max_message_size`].
    max_message_size: usize,
    /// Sets [`ClientConfig::read_buffer_size`].
    read_buffer_size: usize,
    /// Sets [`ClientConfig::write_buffer_size`].
    write_buffer_size: usize,
    /// Sets [`ClientConfig::compression`].
    compression: bool,
    /// Sets [`ClientConfig::token_placement`].
    token_placement: TokenPlacement,
}

#[cfg(feature = "tls")]
impl ClientConfig {
    /// Sets [`ClientConfig::tls`].
    ///
    /// ```
    /// # use std::sync::Arc;
    /// use switchboard::client::ClientConfig;
    /// use switchboard::rustls;
    /// let mut roots = rustls::RootCertStore::empty();
    /// // roots.add(my_private_ca)?;
    /// let provider = Arc::new(rustls::crypto::ring::default_provider());
    /// let tls = rustls::ClientConfig::builder_with_provider(provider)
    ///     .with_safe_default_protocol_versions()
    ///     .unwrap()
    ///     .with_root_certificates(roots)
    ///     .with_no_client_auth();
    /// let config = ClientConfig::default().tls(Arc::new(tls));
    /// ```
    pub fn tls(mut self, config: std::sync::Arc<rustls::ClientConfig>) -> Self {
        self.tls = Some(config);
        self
    }
}

pub(crate) use crate::util::Jitter;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceilings_double_then_cap() {
        let b = Backoff::default();
        let secs: Vec<u64> = (0..8).map(|a| b.ceiling(a).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 30, 30, 30]);
        assert_eq!(b.ceiling(u32::MAX), Duration::from_secs(30));
    }

    #[test]
    fn jitter_is_in_range_and_seedable() {
        let mut a = Jitter::new(Some(7));
        let mut b = Jitter::new(Some(7));
        let xs: Vec<f64> = (0..1000).map(|_| a.unit()).collect();
        let ys: Vec<f64> = (0..1000).map(|_| b.unit()).collect();
        assert_eq!(xs, ys);
        assert!(xs.iter().all(|x| (0.0..1.0).contains(x)));
        let mean = xs.iter().sum::<f64>() / xs.len() as f64;
        assert!((0.4..0.6).contains(&mean), "mean {mean}");
    }
}
