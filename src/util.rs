//! Small helpers shared by several layers, kept here once so that no module
//! has to import another layer for them: random ids, the wall clock, a task
//! handle that aborts on drop, and the one token bucket of the crate.
//!
//! Nothing here knows about hubs, sessions or the protocol.

use parking_lot::Mutex;
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// A random, odd `u64` (node ids, epochs, stream keys): never zero. Not for
/// secrets.
pub(crate) fn random_u64() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    RandomState::new().hash_one(t) | 1
}

/// A small, seedable pseudo-random generator for jitter (splitmix64). Not
/// for anything secret; it spreads reconnects (the client) and retry hints
/// (admission).
#[derive(Debug, Clone)]
pub(crate) struct Jitter(u64);

impl Jitter {
    pub(crate) fn new(seed: Option<u64>) -> Jitter {
        let seed = seed.unwrap_or_else(|| {
            use std::hash::{BuildHasher, Hasher};
            use std::sync::atomic::{AtomicU64, Ordering};
            static COUNTER: AtomicU64 = AtomicU64::new(0);
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
            if let Ok(t) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
                h.write_u128(t.as_nanos());
            }
            h.finish()
        });
        Jitter(seed)
    }

    /// The next draw in `[0, 1)`.
    pub(crate) fn unit(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// A host-supplied store's or backplane's `call`, bounded by `timeout`:
/// past it, an error of `kind` saying what did not answer. An answer ready
/// at once needs no timer (a publish polls once, possibly outside a
/// runtime); without a runtime there is no clock to bound it by.
pub(crate) fn bounded<T: Send + 'static>(
    timeout: Duration,
    kind: crate::ErrorKind,
    what: &'static str,
    call: futures::future::BoxFuture<'static, crate::Result<T>>,
) -> futures::future::BoxFuture<'static, crate::Result<T>> {
    use futures::FutureExt;
    Box::pin(async move {
        let mut call = call;
        if let Some(done) = (&mut call).now_or_never() {
            return done;
        }
        if tokio::runtime::Handle::try_current().is_err() {
            return call.await;
        }
        match tokio::time::timeout(timeout, call).await {
            Ok(done) => done,
            Err(_) => Err(crate::Error::msg(kind, format!("{what} did not answer within {timeout:?}"))),
        }
    })
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub(crate) fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// A spawned task that is aborted when this handle is dropped, so a
/// background task never outlives what owns it.
#[derive(Debug)]
pub(crate) struct AbortOnDrop(pub(crate) JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A token bucket of `burst` tokens that gets one back every `refill`,
/// kept as the time at which it will be full again (GCRA), so it needs no
/// refill task and its arithmetic is exact. Runs on tokio's clock:
/// `tokio::time::pause()` and `advance()` drive it in tests.
#[derive(Debug, Clone)]
pub(crate) struct TokenBucket {
    /// When the bucket would hold `burst` tokens again if nothing more were
    /// taken (at or before now: full).
    full_at: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub(crate) fn full(now: Instant) -> TokenBucket {
        TokenBucket { full_at: now }
    }

    /// Takes a token, or says how long until one is back (and takes
    /// nothing). `burst` is at least 1.
    pub(crate) fn take(&mut self, now: Instant, refill: Duration, burst: u32) -> Result<(), Duration> {
        // An interval too long for the clock never gives a token back.
        let Some(full_at) = self.full_at.max(now).checked_add(refill) else { return Err(refill) };
        // Taking is allowed while the bucket stays within `burst` refills of full.
        let Some(limit) = now.checked_add(refill.saturating_mul(burst.max(1))) else {
            self.full_at = full_at;
            return Ok(());
        };
        if full_at <= limit {
            self.full_at = full_at;
            Ok(())
        } else {
            Err(full_at - limit)
        }
    }
}

/// A [`TokenBucket`] with its limit, shared by reference (a short
/// uncontended lock; nothing awaits under it).
#[derive(Debug)]
pub(crate) struct Limiter {
    bucket: Mutex<TokenBucket>,
    refill: Duration,
    burst: u32,
}

impl Limiter {
    /// A full bucket of `burst` tokens, one back every `refill`.
    pub(crate) fn new(refill: Duration, burst: u32) -> Limiter {
        Limiter { bucket: Mutex::new(TokenBucket::full(Instant::now())), refill, burst: burst.max(1) }
    }

    /// Takes a token; `Err(wait)` when the bucket is empty, with the time
    /// until the next token.
    pub(crate) fn check(&self) -> Result<(), Duration> {
        self.bucket.lock().take(Instant::now(), self.refill, self.burst)
    }
}

/// A token bucket: a sustained rate of `messages` per `per`, with bursts of
/// up to `burst`.
///
/// A bucket starts full (`burst` tokens). Each message (or connection) takes
/// one token; tokens come back one every `per / messages`. Kept as the time
/// the bucket will be full again (GCRA), which is exactly this bucket
/// without a refill task.
///
/// ```
/// use std::time::Duration;
/// use switchboard::security::RateLimit;
/// let limit = RateLimit::per_second(10).burst(40);
/// assert_eq!(limit.refill_interval(), Duration::from_millis(100));
/// let slow = RateLimit::new(1, Duration::from_secs(60)).burst(5);
/// assert_eq!(slow.burst, 5);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct RateLimit {
    /// Tokens added per `per` (at least 1).
    pub messages: u32,
    /// The period `messages` refers to (at least 1 µs).
    pub per: Duration,
    /// Bucket size: how many may come at once after a quiet spell (at least 1).
    pub burst: u32,
}

impl RateLimit {
    /// `messages` per `per`, with a burst of `messages`.
    pub fn new(messages: u32, per: Duration) -> RateLimit {
        RateLimit { messages: messages.max(1), per: per.max(Duration::from_micros(1)), burst: messages.max(1) }
    }

    /// `n` per second, with a burst of `n`.
    pub fn per_second(n: u32) -> RateLimit {
        RateLimit::new(n, Duration::from_secs(1))
    }

    /// Sets [`RateLimit::burst`] (at least 1).
    pub fn burst(mut self, burst: u32) -> RateLimit {
        self.burst = burst.max(1);
        self
    }

    /// Time for one token to come back: `per / messages`.
    pub fn refill_interval(&self) -> Duration {
        (self.per / self.messages.max(1)).max(Duration::from_nanos(1))
    }

    /// A full bucket of this limit.
    pub(crate) fn limiter(&self) -> Limiter {
        Limiter::new(self.refill_interval(), self.burst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn bucket_refills_one_token_per_interval() {
        let mut b = TokenBucket::full(Instant::now());
        let (t, burst) = (Duration::from_secs(10), 2);
        assert!(b.take(Instant::now(), t, burst).is_ok());
        assert!(b.take(Instant::now(), t, burst).is_ok());
        assert_eq!(b.take(Instant::now(), t, burst), Err(Duration::from_secs(10)));
        tokio::time::advance(Duration::from_secs(4)).await;
        assert_eq!(b.take(Instant::now(), t, burst), Err(Duration::from_secs(6)), "a refusal takes nothing");
        tokio::time::advance(Duration::from_secs(6)).await;
        assert!(b.take(Instant::now(), t, burst).is_ok());
        assert!(b.take(Instant::now(), t, burst).is_err());
        // A long quiet spell refills to `burst`, not beyond.
        tokio::time::advance(Duration::from_secs(3600)).await;
        assert!(b.take(Instant::now(), t, burst).is_ok());
        assert!(b.take(Instant::now(), t, burst).is_ok());
        assert!(b.take(Instant::now(), t, burst).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn huge_intervals_do_not_overflow() {
        let mut b = TokenBucket::full(Instant::now());
        let year = Duration::from_secs(365 * 86_400);
        assert!(b.take(Instant::now(), year, u32::MAX).is_ok());
        let mut b = TokenBucket::full(Instant::now());
        assert!(b.take(Instant::now(), Duration::MAX, 1).is_err());
    }
}
