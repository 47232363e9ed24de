use super::Retention;
use std::time::Duration;

/// How one group of rooms keeps history. See [`HistoryConfig::rooms`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct RoomHistory {
    /// What the store keeps (default: 1000 events, 5 minutes).
    pub retention: Retention,
    /// Most events replayed to one recovering join (or sent for `rewind`).
    /// A client that missed more gets `recovered: false` and no replay.
    /// Default 1000.
    pub max_replay: usize,
}

impl Default for RoomHistory {
    fn default() -> Self {
        RoomHistory { retention: Retention::default(), max_replay: 1000 }
    }
}

impl RoomHistory {
    /// Sets the retention's [`Retention::max_len`].
    pub fn max_len(mut self, n: usize) -> Self {
        self.retention.max_len = n;
        self
    }

    /// Sets the retention's [`Retention::max_age`].
    pub fn max_age(mut self, age: Duration) -> Self {
        self.retention.max_age = age;
        self
    }

    /// Sets [`RoomHistory::max_replay`].
    pub fn max_replay(mut self, n: usize) -> Self {
        self.max_replay = n;
        self
    }
}

/// Which rooms are **recoverable**, and how. Given to
/// [`HubBuilder::history`](crate::HubBuilder::history) with the store.
///
/// Rooms are chosen by name prefix: a room uses the [`RoomHistory`] of the
/// longest prefix it starts with (`""` matches every room). A room no prefix
/// matches is not recoverable: its events carry no offset, are not stored
/// and cost nothing extra.
///
/// ```
/// use std::time::Duration;
/// use switchboard::history::{HistoryConfig, RoomHistory};
/// let config = HistoryConfig::default()
///     .rooms("chat:", RoomHistory::default().max_len(500))
///     .rooms("feed:", RoomHistory::default().max_age(Duration::from_secs(3600)).max_replay(200));
/// assert!(config.room("chat:lobby").is_some());
/// assert_eq!(config.room("feed:x").unwrap().max_replay, 200);
/// assert!(config.room("game:1").is_none());
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct HistoryConfig {
    /// `(prefix, settings)` pairs; the longest matching prefix wins.
    pub rules: Vec<(String, RoomHistory)>,
    /// How long an event that arrived ahead of its predecessors (from
    /// another node, or a concurrent publisher) waits for them before the
    /// hub reads the missing offsets from the store. Default 250 ms.
    pub gap_wait: Duration,
    /// How often each recoverable room with local members compares its
    /// position with the store's top (one read per room, shared by its
    /// members), to catch events whose backplane message was lost. Default
    /// 10 s.
    pub position_check: Duration,
    /// Most out-of-order events a room holds while waiting for a gap to
    /// fill; one more reads the store at once. Default 1000.
    pub max_pending: usize,
    /// How long the hub waits for the store to answer an append or a read
    /// before it gives up with [`ErrorKind::History`](crate::ErrorKind::History):
    /// a publish to a recoverable room fails (an append that timed out may
    /// still have been stored: publish with an idempotency key to retry
    /// safely), a join is refused with 503, a gap fill tries again later.
    /// Default 5 s.
    pub store_timeout: Duration,
}

impl Default for HistoryConfig {
    fn default() -> Self {
        HistoryConfig {
            rules: Vec::new(),
            gap_wait: Duration::from_millis(250),
            position_check: Duration::from_secs(10),
            max_pending: 1000,
            store_timeout: Duration::from_secs(5),
        }
    }
}

impl HistoryConfig {
    /// Every room recoverable with the default [`RoomHistory`].
    pub fn all_rooms() -> Self {
        HistoryConfig::default().rooms("", RoomHistory::default())
    }

    /// Makes rooms starting with `prefix` recoverable with `settings`.
    pub fn rooms(mut self, prefix: impl Into<String>, settings: RoomHistory) -> Self {
        let prefix = prefix.into();
        self.rules.retain(|(p, _)| *p != prefix);
        self.rules.push((prefix, settings));
        self
    }

    /// Sets [`HistoryConfig::gap_wait`].
    pub fn gap_wait(mut self, wait: Duration) -> Self {
        self.gap_wait = wait;
        self
    }

    /// Sets [`HistoryConfig::position_check`].
    pub fn position_check(mut self, every: Duration) -> Self {
        self.position_check = every;
        self
    }

    /// Sets [`HistoryConfig::store_timeout`].
    pub fn store_timeout(mut self, timeout: Duration) -> Self {
        self.store_timeout = timeout;
        self
    }

    /// Sets [`HistoryConfig::max_pending`].
    pub fn max_pending(mut self, n: usize) -> Self {
        self.max_pending = n;
        self
    }

    /// The settings of `room`, if it is recoverable.
    pub fn room(&self, room: &str) -> Option<&RoomHistory> {
        self.rules.iter().filter(|(p, _)| room.starts_with(p.as_str())).max_by_key(|(p, _)| p.len()).map(|(_, h)| h)
    }
}
