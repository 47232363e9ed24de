use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// Which rooms have presence. See [`PresenceConfig::rooms`].
#[derive(Clone, Default)]
#[non_exhaustive]
pub enum PresenceRooms {
    /// Every room. The default once presence is turned on with
    /// [`HubBuilder::presence`](crate::HubBuilder::presence).
    #[default]
    All,
    /// Rooms whose name starts with one of these prefixes.
    Prefixes(Vec<String>),
    /// Rooms for which the function returns `true` (called on every join,
    /// so keep it cheap and deterministic).
    Matching(Arc<dyn Fn(&str) -> bool + Send + Sync>),
}

impl PresenceRooms {
    pub(crate) fn matches(&self, room: &str) -> bool {
        match self {
            PresenceRooms::All => true,
            PresenceRooms::Prefixes(p) => p.iter().any(|p| room.starts_with(p.as_str())),
            PresenceRooms::Matching(f) => f(room),
        }
    }
}

impl fmt::Debug for PresenceRooms {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PresenceRooms::All => f.write_str("All"),
            PresenceRooms::Prefixes(p) => f.debug_tuple("Prefixes").field(p).finish(),
            PresenceRooms::Matching(_) => f.write_str("Matching(..)"),
        }
    }
}

/// Presence configuration. Presence is **off** unless the host passes one of
/// these to [`HubBuilder::presence`](crate::HubBuilder::presence) (as in
/// Phoenix and Centrifugo, where presence is enabled per channel or
/// namespace); once on, it covers every room unless narrowed with
/// [`PresenceConfig::room_prefixes`] or [`PresenceConfig::rooms_where`].
/// Every field has a default, written in its docs.
///
/// ```
/// use std::time::Duration;
/// use switchboard::presence::PresenceConfig;
/// let config = PresenceConfig::default()
///     .room_prefixes(["chat:", "doc:"])
///     .batch_window(Duration::from_millis(100))
///     .counts_only_above(500);
/// assert_eq!(config.ephemeral_ttl, Duration::from_secs(5));
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct PresenceConfig {
    /// Which rooms have presence. Default [`PresenceRooms::All`].
    pub rooms: PresenceRooms,
    /// Changes in a room are collected for this long after the first one
    /// and sent to its members as one `presence_diff` (joins and leaves of
    /// one meta within a window cancel out). Default 50 ms.
    pub batch_window: Duration,
    /// A room with more presence keys than this, or more than twice as many
    /// connections, sends counts (`{"keys", "connections"}`) instead of
    /// member lists and diffs; it goes back to member lists when both are at
    /// most three quarters of their thresholds. Default 100 (a member list
    /// longer than that is rarely shown; apps show "1,234 online" instead).
    /// `usize::MAX` turns it off. A member list thus holds at most `2 ×` this
    /// many metas, and at most [`PresenceConfig::max_state_bytes`] bytes.
    pub counts_only_above: usize,
    /// Largest member list a room sends, in bytes of its JSON encoding (its
    /// MessagePack encoding is smaller): a room whose list is larger sends
    /// counts instead, like a room over [`PresenceConfig::counts_only_above`],
    /// and goes back to lists at three quarters of it. So a `presence_state`
    /// never takes more than this of a connection's queue, and a diff (its
    /// joins from the list, its leaves from the list before) at most twice
    /// this. Default 256 KiB; never more than a quarter of
    /// `HubConfig::outbound_queue_bytes` (the hub lowers it to that), so with
    /// the default 1 MiB queue a state fills at most a quarter of it, however
    /// big hosts' metas or users' keys are.
    pub max_state_bytes: usize,
    /// How long an ephemeral flag (`typing`, …) lives unless the client sets
    /// it again. Default 5 s.
    pub ephemeral_ttl: Duration,
    /// Time to live of this node's entries in the [`PresenceStore`](super::PresenceStore);
    /// each node rewrites its entries every `ttl / 3`. When a node vanishes
    /// without a goodbye, the others drop its entries within about
    /// `ttl + ttl / 3`. Default 30 s (at least 3 ms).
    pub ttl: Duration,
    /// Largest client part of a meta (its `meta` and `ephemeral` objects as
    /// JSON), in bytes; a larger update gets `error 400`. Default 1024.
    pub max_meta_bytes: usize,
    /// Presence updates a connection may send per second in one room,
    /// sustained. Default 10.
    pub update_rate: u32,
    /// Presence updates a connection may send in a burst in one room; an
    /// update beyond the bucket gets `error 420` with `retry_after_ms`.
    /// Default 20.
    pub update_burst: u32,
    /// Most metas a room's pending diff tracks. When a window has more
    /// changes than this, the room's members get the full `presence_state`
    /// again instead of a diff. Default 256.
    pub max_pending: usize,
    /// Longest wait for one call of the [`PresenceStore`](super::PresenceStore)
    /// (a `write` or a `list`). Over it the call counts as failed with
    /// [`ErrorKind::Presence`](crate::ErrorKind::Presence): a join that needs
    /// the room's records gets `error 503`, a host read returns the error,
    /// and a periodic write is retried at the next refresh. So a store that
    /// hangs delays presence by at most this, never stalls it (nor
    /// shutdown). Default 5 s.
    pub store_timeout: Duration,
}

impl Default for PresenceConfig {
    fn default() -> Self {
        PresenceConfig {
            rooms: PresenceRooms::All,
            batch_window: Duration::from_millis(50),
            counts_only_above: 100,
            max_state_bytes: 256 * 1024,
            ephemeral_ttl: Duration::from_secs(5),
            ttl: Duration::from_secs(30),
            max_meta_bytes: 1024,
            update_rate: 10,
            update_burst: 20,
            max_pending: 256,
            store_timeout: Duration::from_secs(5),
        }
    }
}

impl PresenceConfig {
    /// Presence in rooms whose name starts with one of `prefixes` only.
    pub fn room_prefixes<I, S>(mut self, prefixes: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.rooms = PresenceRooms::Prefixes(prefixes.into_iter().map(Into::into).collect());
        self
    }

    /// Presence in rooms for which `f` returns `true` only.
    pub fn rooms_where(mut self, f: impl Fn(&str) -> bool + Send + Sync + 'static) -> Self {
        self.rooms = PresenceRooms::Matching(Arc::new(f));
        self
    }

    /// The interval at which each node rewrites its entries in the store.
    pub fn refresh_interval(&self) -> Duration {
        self.ttl.max(Duration::from_millis(3)) / 3
    }
}

macro_rules! setters {
    ($($(#[$doc:meta])* $name:ident: $ty:ty,)*) => {
        impl PresenceConfig {
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
    /// Sets [`PresenceConfig::rooms`].
    rooms: PresenceRooms,
    /// Sets [`PresenceConfig::batch_window`].
    batch_window: Duration,
    /// Sets [`PresenceConfig::counts_only_above`].
    counts_only_above: usize,
    /// Sets [`PresenceConfig::max_state_bytes`].
    max_state_bytes: usize,
    /// Sets [`PresenceConfig::ephemeral_ttl`].
    ephemeral_ttl: Duration,
    /// Sets [`PresenceConfig::ttl`].
    ttl: Duration,
    /// Sets [`PresenceConfig::max_meta_bytes`].
    max_meta_bytes: usize,
    /// Sets [`PresenceConfig::update_rate`].
    update_rate: u32,
    /// Sets [`PresenceConfig::update_burst`].
    update_burst: u32,
    /// Sets [`PresenceConfig::max_pending`].
    max_pending: usize,
    /// Sets [`PresenceConfig::store_timeout`].
    store_timeout: Duration,
}
