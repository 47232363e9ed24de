//! Metrics through the [`metrics`](https://docs.rs/metrics) facade (feature
//! `metrics`): every name, unit and label the crate records, in one place.
//!
//! The host installs a recorder (an exporter such as
//! `metrics-exporter-prometheus`), calls [`describe`] once so the exporter
//! knows each metric's unit and help text, and calls [`sample`] before each
//! scrape (or on an interval) to bring the gauges and the per-message
//! counters up to date. Without a
//! recorder every call is a no-op; without the feature the recording
//! functions below are empty inline functions, so their call sites cost
//! nothing.
//!
//! **One source of truth.** Where the crate already keeps a count —
//! `HubStats`, the registry of connections, the rooms'
//! member lists, a connection's outbound queue peak — the metric is read
//! from it ([`sample`]) or recorded at the one place that count changes; no
//! second, parallel count is kept.
//!
//! **Hot paths cost an atomic add.** The counters moved once per message
//! or per write — messages in and out by type, bytes out, `lagged` drops,
//! rate-limit refusals, replayed events — are not looked up in the
//! recorder where they happen (with the Prometheus recorder a `counter!`
//! is a hash and a registry lookup, once per writer batch for bytes out).
//! They are added to the crate's own tally (relaxed atomics, one shard per
//! thread so the runtime's workers do not share a cache line) and
//! [`sample`] publishes the totals, so those counters too are as fresh as
//! the last `sample`. The tally is the only count of these; it is
//! process-wide, like the recorder (two hubs in one process add up).
//!
//! **Labels** have a small, fixed set of values: never a room name, a user
//! id or a connection id. The table of every metric (name, type, unit,
//! labels, meaning) is in `docs/operations.md`.
//!
//! ```no_run
//! # #[cfg(feature = "metrics")]
//! # fn run(hub: &switchboard::Hub) {
//! // Once, after installing the recorder:
//! switchboard::metrics::describe();
//! // Before rendering each scrape:
//! switchboard::metrics::sample(hub);
//! # }
//! ```

#[cfg(feature = "metrics")]
use ::metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Unit};

use crate::protocol::Kind;

/// Every metric name, so docs, tests and call sites agree.
#[cfg_attr(not(feature = "metrics"), allow(dead_code))]
pub mod names {
    /// Gauge: open connections, label `transport`.
    pub const CONNECTIONS: &str = "switchboard_connections";
    /// Counter: connections opened, label `transport`.
    pub const CONNECTS: &str = "switchboard_connects_total";
    /// Counter: connections ended, labels `transport`, `reason`, `code`.
    pub const DISCONNECTS: &str = "switchboard_disconnects_total";
    /// Counter: handshakes refused before the upgrade, label `reason`.
    pub const HANDSHAKE_REFUSALS: &str = "switchboard_handshake_refusals_total";
    /// Gauge: rooms with at least one local member.
    pub const ROOMS: &str = "switchboard_rooms";
    /// Gauge: room memberships of local connections.
    pub const ROOM_MEMBERS: &str = "switchboard_room_members";
    /// Gauge: distinct users with at least one connection.
    pub const USERS: &str = "switchboard_users";
    /// Gauge: live connection and room tasks.
    pub const TASKS: &str = "switchboard_tasks";
    /// Counter: envelopes received from clients, label `type`.
    pub const MESSAGES_IN: &str = "switchboard_messages_in_total";
    /// Counter: envelopes queued to clients, label `type`.
    pub const MESSAGES_OUT: &str = "switchboard_messages_out_total";
    /// Counter: bytes of data frames written to transports.
    pub const BYTES_OUT: &str = "switchboard_bytes_out_total";
    /// Histogram: a connection's outbound queue peak, recorded when it ends.
    pub const QUEUE_PEAK: &str = "switchboard_outbound_queue_peak_bytes";
    /// Counter: messages dropped under the drop-oldest policy (`lagged`).
    pub const LAGGED: &str = "switchboard_lagged_dropped_total";
    /// Counter: messages refused over a connection's rate, label `limit`.
    pub const RATE_LIMITED: &str = "switchboard_rate_limited_total";
    /// Histogram: handler run time, label `outcome`.
    pub const CALL_DURATION: &str = "switchboard_call_duration_seconds";
    /// Counter: calls answered with an error, label `code`.
    pub const CALL_ERRORS: &str = "switchboard_call_errors_total";
    /// Histogram: time to queue one publish to this node's members.
    pub const FANOUT_DURATION: &str = "switchboard_publish_fanout_seconds";
    /// Histogram: time a backplane publish took, label `outcome`.
    pub const BACKPLANE_PUBLISH: &str = "switchboard_backplane_publish_seconds";
    /// Counter: backplane publishes that failed (or timed out).
    pub const BACKPLANE_ERRORS: &str = "switchboard_backplane_publish_errors_total";
    /// Counter: times a room's backplane subscription ended and was made again.
    pub const BACKPLANE_RESUBSCRIBES: &str = "switchboard_backplane_resubscribes_total";
    /// Counter: times messages may have been lost on the backplane (a
    /// recoverable room then reads the store).
    pub const BACKPLANE_GAPS: &str = "switchboard_backplane_gaps_total";
    /// Counter: joins with an offset, label `outcome` (`recovered`, `not_recovered`).
    pub const RECOVERIES: &str = "switchboard_recoveries_total";
    /// Counter: events replayed to joining clients (recoveries and rewinds).
    pub const REPLAYED: &str = "switchboard_replayed_events_total";
    /// Counter: Server-Sent Events streams opened, label `resumed`.
    pub const SSE_STREAMS: &str = "switchboard_sse_streams_total";
    /// Counter: Redis pub/sub reconnects (from the backplane's `RedisStats`).
    pub const REDIS_PUBSUB_RECONNECTS: &str = "switchboard_redis_pubsub_reconnects_total";
    /// Counter: Redis command connection reconnects.
    pub const REDIS_COMMAND_RECONNECTS: &str = "switchboard_redis_command_reconnects_total";
    /// Counter: messages the Redis backplane dropped (a full subscription queue).
    pub const REDIS_DROPPED: &str = "switchboard_redis_dropped_total";
    /// Gauge: 1 when the Redis connection is up, label `connection` (`pubsub`, `commands`).
    pub const REDIS_UP: &str = "switchboard_redis_up";
}

/// Registers the unit and help text of every metric with the installed
/// recorder. Call once, after installing it.
#[cfg(feature = "metrics")]
pub fn describe() {
    use names::*;
    handles::renew();
    describe_gauge!(CONNECTIONS, Unit::Count, "Open connections (any state before closed), by transport.");
    describe_counter!(CONNECTS, Unit::Count, "Connections opened, by transport.");
    describe_counter!(DISCONNECTS, Unit::Count, "Connections ended, by transport, reason and close code.");
    describe_counter!(HANDSHAKE_REFUSALS, Unit::Count, "Handshakes refused before the upgrade, by reason.");
    describe_gauge!(ROOMS, Unit::Count, "Rooms with at least one local member.");
    describe_gauge!(ROOM_MEMBERS, Unit::Count, "Room memberships of local connections.");
    describe_gauge!(USERS, Unit::Count, "Distinct user ids with at least one local connection.");
    describe_gauge!(TASKS, Unit::Count, "Live connection, call and room tasks.");
    describe_counter!(MESSAGES_IN, Unit::Count, "Envelopes received from clients, by type.");
    describe_counter!(MESSAGES_OUT, Unit::Count, "Envelopes queued to clients, by type.");
    describe_counter!(BYTES_OUT, Unit::Bytes, "Bytes of data frames written to transports.");
    describe_histogram!(QUEUE_PEAK, Unit::Bytes, "Peak outbound queue bytes of each ended connection.");
    describe_counter!(LAGGED, Unit::Count, "Messages dropped under the drop-oldest overflow policy.");
    describe_counter!(RATE_LIMITED, Unit::Count, "Messages refused over a connection's rate, by limit.");
    describe_histogram!(CALL_DURATION, Unit::Seconds, "Handler run time of calls, by outcome.");
    describe_counter!(CALL_ERRORS, Unit::Count, "Calls answered with an error, by error code.");
    describe_histogram!(FANOUT_DURATION, Unit::Seconds, "Time to queue one publish to this node's members.");
    describe_histogram!(BACKPLANE_PUBLISH, Unit::Seconds, "Time a backplane publish took, by outcome.");
    describe_counter!(BACKPLANE_ERRORS, Unit::Count, "Backplane publishes that failed or timed out.");
    describe_counter!(BACKPLANE_RESUBSCRIBES, Unit::Count, "Room subscriptions that ended and were made again.");
    describe_counter!(BACKPLANE_GAPS, Unit::Count, "Times messages may have been lost on the backplane.");
    describe_counter!(RECOVERIES, Unit::Count, "Joins with an offset, by outcome.");
    describe_counter!(REPLAYED, Unit::Count, "Events replayed to joining clients.");
    describe_counter!(SSE_STREAMS, Unit::Count, "Server-Sent Events streams opened, by whether they resumed.");
    describe_counter!(REDIS_PUBSUB_RECONNECTS, Unit::Count, "Redis pub/sub reconnects.");
    describe_counter!(REDIS_COMMAND_RECONNECTS, Unit::Count, "Redis command connection reconnects.");
    describe_counter!(REDIS_DROPPED, Unit::Count, "Messages the Redis backplane dropped (full subscription queue).");
    describe_gauge!(REDIS_UP, Unit::Count, "1 when the Redis connection is up, by connection.");
}

/// What can bring its own metrics up to date: the hub (its gauges, from
/// its own counts: `Hub::stats`, its registry of connections, its rooms)
/// and, with the `redis` feature, the Redis backplane (its `RedisStats`,
/// set as absolute values).
#[cfg(feature = "metrics")]
pub trait Sample {
    /// Sets this source's gauges and counters from its own counts.
    fn sample_metrics(&self);
}

/// Brings `source`'s metrics up to date: call before rendering a scrape
/// (or on an interval) for the hub, and for the Redis backplane if there is
/// one. The gauges, and the counters moved per message (messages in and
/// out, bytes out, `lagged` drops, rate-limit refusals, replayed events:
/// see the module docs), are only as fresh as the last call.
#[cfg(feature = "metrics")]
pub fn sample(source: &impl Sample) {
    handles::renew();
    source.sample_metrics();
}

/// The per-message counters: one relaxed atomic add where they happen,
/// published as absolute values by [`sample`] (see the module docs).
#[cfg(feature = "metrics")]
mod tally {
    use crate::protocol::Kind;
    use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

    const KINDS: usize = Kind::ALL.len();

    /// One counter of the tally.
    #[derive(Debug, Clone, Copy)]
    pub(super) enum Count {
        BytesOut,
        Lagged,
        Replayed,
        /// Refused over the message rate (`limit="messages"`).
        RateMessages,
        /// Refused over the join rate (`limit="joins"`).
        RateJoins,
        In(Kind),
        Out(Kind),
    }

    const FIXED: usize = 5;
    const SLOTS: usize = FIXED + 2 * KINDS;

    impl Count {
        fn slot(self) -> usize {
            match self {
                Count::BytesOut => 0,
                Count::Lagged => 1,
                Count::Replayed => 2,
                Count::RateMessages => 3,
                Count::RateJoins => 4,
                Count::In(kind) => FIXED + kind as usize,
                Count::Out(kind) => FIXED + KINDS + kind as usize,
            }
        }
    }

    /// A thread's counters, on cache lines of their own.
    #[repr(align(128))]
    struct Shard([AtomicU64; SLOTS]);

    /// Enough for the runtime's workers of a small machine to each have
    /// one; threads beyond share (still correct, only less spread).
    const SHARDS: usize = 8;

    static TALLY: [Shard; SHARDS] = [const { Shard([const { AtomicU64::new(0) }; SLOTS]) }; SHARDS];
    static NEXT_SHARD: AtomicUsize = AtomicUsize::new(0);

    thread_local! {
        static SHARD: usize = NEXT_SHARD.fetch_add(1, Ordering::Relaxed) % SHARDS;
    }

    #[inline]
    pub(super) fn add(count: Count, n: u64) {
        let shard = SHARD.try_with(|s| *s).unwrap_or(0);
        TALLY[shard].0[count.slot()].fetch_add(n, Ordering::Relaxed);
    }

    /// The total of `count` over every thread.
    pub(super) fn total(count: Count) -> u64 {
        TALLY.iter().map(|s| s.0[count.slot()].load(Ordering::Relaxed)).sum()
    }
}

/// The histograms recorded once per publish or call, as handles: looked
/// up in the recorder once per thread (not per record), and again after
/// each [`describe`] or [`sample`], so a recorder installed later, or an
/// exporter that drops idle metrics and registers them afresh, is picked
/// up by the next record after the next scrape. Before the first
/// `describe` or `sample` every record looks its histogram up, as
/// `histogram!` does: the recorder may not be installed yet.
#[cfg(feature = "metrics")]
mod handles {
    use super::names::*;
    use ::metrics::{histogram, Histogram};
    use std::cell::RefCell;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// One histogram with its labels (labels have fixed values).
    #[derive(Debug, Clone, Copy)]
    pub(super) enum Hist {
        Fanout,
        CallOk,
        CallError,
        BackplaneOk,
        BackplaneError,
    }

    const ALL: [Hist; 5] = [Hist::Fanout, Hist::CallOk, Hist::CallError, Hist::BackplaneOk, Hist::BackplaneError];

    impl Hist {
        fn register(self) -> Histogram {
            match self {
                Hist::Fanout => histogram!(FANOUT_DURATION),
                Hist::CallOk => histogram!(CALL_DURATION, "outcome" => "ok"),
                Hist::CallError => histogram!(CALL_DURATION, "outcome" => "error"),
                Hist::BackplaneOk => histogram!(BACKPLANE_PUBLISH, "outcome" => "ok"),
                Hist::BackplaneError => histogram!(BACKPLANE_PUBLISH, "outcome" => "error"),
            }
        }
    }

    /// Bumped by `describe` and `sample`; 0: neither ran yet.
    static GENERATION: AtomicU64 = AtomicU64::new(0);

    thread_local! {
        /// This thread's handles and the generation they were looked up in.
        static CACHE: RefCell<Option<(u64, [Histogram; 5])>> = const { RefCell::new(None) };
    }

    pub(super) fn renew() {
        GENERATION.fetch_add(1, Ordering::Relaxed);
    }

    /// Records `value` into `which`.
    #[inline]
    pub(super) fn record(which: Hist, value: f64) {
        let generation = GENERATION.load(Ordering::Relaxed);
        if generation != 0 {
            let cached = CACHE.try_with(|cache| {
                let mut cache = cache.borrow_mut();
                let handles = match &mut *cache {
                    Some((g, handles)) if *g == generation => handles,
                    stale => &mut stale.insert((generation, ALL.map(Hist::register))).1,
                };
                handles[which as usize].record(value);
            });
            if cached.is_ok() {
                return;
            }
        }
        // Before the first `describe`/`sample`, or while this thread's
        // locals are torn down.
        which.register().record(value);
    }
}

/// Publishes the tally (`Sample` for the hub): every per-message counter
/// that moved, as its absolute total.
#[cfg(feature = "metrics")]
pub(crate) fn publish_tally() {
    use names::*;
    use tally::{total, Count};
    let set = |n: u64, counter: ::metrics::Counter| {
        if n > 0 {
            counter.absolute(n);
        }
    };
    set(total(Count::BytesOut), counter!(BYTES_OUT));
    set(total(Count::Lagged), counter!(LAGGED));
    set(total(Count::Replayed), counter!(REPLAYED));
    set(total(Count::RateMessages), counter!(RATE_LIMITED, "limit" => "messages"));
    set(total(Count::RateJoins), counter!(RATE_LIMITED, "limit" => "joins"));
    for kind in Kind::ALL {
        set(total(Count::In(kind)), counter!(MESSAGES_IN, "type" => kind.as_str()));
        set(total(Count::Out(kind)), counter!(MESSAGES_OUT, "type" => kind.as_str()));
    }
}

/// The hub's gauges (`Sample` for the hub).
#[cfg(feature = "metrics")]
pub(crate) fn hub_gauges(open: &[(&'static str, usize)], rooms: usize, members: usize, users: usize, tasks: usize) {
    use names::*;
    // Every transport seen so far gets a value, so one whose last
    // connection ended reads 0 rather than its last count.
    let mut seen = SEEN_TRANSPORTS.lock();
    for (transport, _) in open {
        if !seen.contains(transport) {
            seen.push(transport);
        }
    }
    for transport in seen.iter() {
        let n = open.iter().find(|(t, _)| t == transport).map_or(0, |(_, n)| *n);
        gauge!(CONNECTIONS, "transport" => *transport).set(n as f64);
    }
    gauge!(ROOMS).set(rooms as f64);
    gauge!(ROOM_MEMBERS).set(members as f64);
    gauge!(USERS).set(users as f64);
    gauge!(TASKS).set(tasks as f64);
}

/// The Redis backplane's metrics (`Sample` for it): its reconnect and drop
/// counters as they are, and whether each connection is up.
#[cfg(all(feature = "metrics", feature = "redis"))]
pub(crate) fn redis_gauges(pubsub_reconnects: u64, command_reconnects: u64, dropped: u64, up: [bool; 2]) {
    use names::*;
    counter!(REDIS_PUBSUB_RECONNECTS).absolute(pubsub_reconnects);
    counter!(REDIS_COMMAND_RECONNECTS).absolute(command_reconnects);
    counter!(REDIS_DROPPED).absolute(dropped);
    gauge!(REDIS_UP, "connection" => "pubsub").set(f64::from(u8::from(up[0])));
    gauge!(REDIS_UP, "connection" => "commands").set(f64::from(u8::from(up[1])));
}

/// The transports (`Transport::name`) [`sample`] has seen, whose connection gauges it keeps setting.
#[cfg(feature = "metrics")]
static SEEN_TRANSPORTS: parking_lot::Mutex<Vec<&'static str>> = parking_lot::Mutex::new(Vec::new());

/// Why a handshake was refused (the `reason` label of
/// `switchboard_handshake_refusals_total`).
#[derive(Debug, Clone, Copy)]
pub(crate) enum Refusal {
    /// The hub is shutting down (503).
    Shutdown,
    /// The hub is draining (503, `Hub::drain`).
    Draining,
    /// A malformed forwarded-for header (400).
    Address,
    /// The `Origin` check (403).
    Origin,
    /// The hub's connection limit (503).
    Limit,
    /// The per-address connection limit (429).
    AddressLimit,
    /// The connection rate (429).
    Rate,
    /// The authenticator refused.
    #[cfg_attr(not(any(feature = "ws", feature = "sse")), allow(dead_code))] // counted by `Hub::open_gate`
    Auth,
    /// The authenticator did not answer in time (503).
    #[cfg_attr(not(any(feature = "ws", feature = "sse")), allow(dead_code))]
    AuthTimeout,
}

impl Refusal {
    #[cfg(feature = "metrics")]
    fn as_str(self) -> &'static str {
        match self {
            Refusal::Shutdown => "shutdown",
            Refusal::Draining => "draining",
            Refusal::Address => "address",
            Refusal::Origin => "origin",
            Refusal::Limit => "limit",
            Refusal::AddressLimit => "address_limit",
            Refusal::Rate => "rate",
            Refusal::Auth => "auth",
            Refusal::AuthTimeout => "auth_timeout",
        }
    }
}

/// A handshake was refused.
#[inline]
#[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
pub(crate) fn refused(why: Refusal) {
    #[cfg(feature = "metrics")]
    counter!(names::HANDSHAKE_REFUSALS, "reason" => why.as_str()).increment(1);
}

/// Counts a refusal and passes its rejection on (for `map_err`).
#[inline]
pub(crate) fn refusing<T>(why: Refusal, rejection: T) -> T {
    refused(why);
    rejection
}

/// A connection opened.
#[inline]
#[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
pub(crate) fn connected(transport: &'static str) {
    #[cfg(feature = "metrics")]
    counter!(names::CONNECTS, "transport" => transport).increment(1);
}

/// A connection ended, with the most bytes ever queued for it.
#[inline]
#[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
pub(crate) fn disconnected(
    transport: &'static str,
    (why, code): (&'static str, Option<crate::protocol::CloseCode>),
    peak_queued: usize,
) {
    #[cfg(feature = "metrics")]
    {
        let code = code.map_or(::metrics::SharedString::from(""), |c| c.0.to_string().into());
        counter!(names::DISCONNECTS, "transport" => transport, "reason" => why, "code" => code).increment(1);
        histogram!(names::QUEUE_PEAK).record(peak_queued as f64);
    }
}

/// An envelope of type `kind` arrived from a client.
#[inline]
#[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
pub(crate) fn message_in(kind: Kind) {
    #[cfg(feature = "metrics")]
    tally::add(tally::Count::In(kind), 1);
}

/// `n` envelopes of type `kind` were queued to clients.
#[inline]
#[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
pub(crate) fn messages_out(kind: Kind, n: usize) {
    #[cfg(feature = "metrics")]
    if n > 0 {
        tally::add(tally::Count::Out(kind), n as u64);
    }
}

/// A writer wrote a batch of data frames of `bytes` bytes.
#[inline]
#[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
pub(crate) fn bytes_out(bytes: usize) {
    #[cfg(feature = "metrics")]
    if bytes > 0 {
        tally::add(tally::Count::BytesOut, bytes as u64);
    }
}

/// The writer told its client that `n` messages were dropped (`lagged`).
#[inline]
#[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
pub(crate) fn lagged(n: u64) {
    messages_out(Kind::Lagged, 1);
    #[cfg(feature = "metrics")]
    tally::add(tally::Count::Lagged, n);
}

/// The writer told its client that events of a recoverable room were
/// dropped for it (a `gap` notice), or a room's gap was announced to it.
#[inline]
pub(crate) fn gap_notice() {
    messages_out(Kind::Gap, 1);
}

/// A message was refused over the connection's rate: `joins` for the join
/// rate, otherwise the message rate.
#[inline]
#[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
pub(crate) fn rate_limited(joins: bool) {
    #[cfg(feature = "metrics")]
    tally::add(if joins { tally::Count::RateJoins } else { tally::Count::RateMessages }, 1);
}

/// A join with an offset was answered (`recovered`: `None` for a join
/// without one); `replayed` events were queued with it.
#[inline]
#[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
pub(crate) fn recovery(recovered: Option<bool>, replayed: usize) {
    messages_out(Kind::Event, replayed);
    #[cfg(feature = "metrics")]
    {
        if let Some(ok) = recovered {
            counter!(names::RECOVERIES, "outcome" => if ok { "recovered" } else { "not_recovered" }).increment(1);
        }
        if replayed > 0 {
            tally::add(tally::Count::Replayed, replayed as u64);
        }
    }
}

/// Messages of a room may have been lost on the backplane.
#[inline]
pub(crate) fn backplane_gap() {
    #[cfg(feature = "metrics")]
    counter!(names::BACKPLANE_GAPS).increment(1);
}

/// A room's backplane subscription ended (it is made again).
#[inline]
pub(crate) fn backplane_resubscribe() {
    #[cfg(feature = "metrics")]
    counter!(names::BACKPLANE_RESUBSCRIBES).increment(1);
}

/// Times a backplane publish and counts its failure; without the feature,
/// the publish itself.
#[inline]
pub(crate) fn backplane_publish(
    call: futures::future::BoxFuture<'static, crate::Result<()>>,
) -> futures::future::BoxFuture<'static, crate::Result<()>> {
    #[cfg(feature = "metrics")]
    return Box::pin(async move {
        let start = std::time::Instant::now();
        let result = call.await;
        let hist = if result.is_ok() { handles::Hist::BackplaneOk } else { handles::Hist::BackplaneError };
        handles::record(hist, start.elapsed().as_secs_f64());
        if result.is_err() {
            counter!(names::BACKPLANE_ERRORS).increment(1);
        }
        result
    });
    #[cfg(not(feature = "metrics"))]
    call
}

/// A Server-Sent Events stream opened; `resumed`: from a `Last-Event-ID`.
#[inline]
#[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
#[cfg_attr(not(feature = "sse"), allow(dead_code))]
pub(crate) fn sse_stream(resumed: bool) {
    #[cfg(feature = "metrics")]
    counter!(names::SSE_STREAMS, "resumed" => if resumed { "true" } else { "false" }).increment(1);
}

/// A start time, taken only when the feature is on (zero-sized otherwise).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timer(#[cfg(feature = "metrics")] std::time::Instant);

impl Timer {
    #[inline]
    pub(crate) fn start() -> Timer {
        Timer(
            #[cfg(feature = "metrics")]
            std::time::Instant::now(),
        )
    }

    /// A handler call ended: `error` is its error code, if it failed.
    #[inline]
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    pub(crate) fn call_done(self, error: Option<u32>) {
        #[cfg(feature = "metrics")]
        {
            let hist = if error.is_some() { handles::Hist::CallError } else { handles::Hist::CallOk };
            handles::record(hist, self.0.elapsed().as_secs_f64());
            if let Some(code) = error {
                counter!(names::CALL_ERRORS, "code" => code.to_string()).increment(1);
            }
        }
    }

    /// A publish was queued to `n` local members.
    #[inline]
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    pub(crate) fn fanout_done(self, n: usize) {
        messages_out(Kind::Event, n);
        #[cfg(feature = "metrics")]
        handles::record(handles::Hist::Fanout, self.0.elapsed().as_secs_f64());
    }
}

#[cfg(all(test, feature = "metrics"))]
mod tests {
    use super::tally::{add, total, Count};
    use crate::protocol::Kind;

    /// `Kind::ALL` is every kind once, in the order `kind as usize`
    /// indexes: each kind has its own counter in the tally.
    #[test]
    fn every_kind_has_its_own_slot() {
        for (i, kind) in Kind::ALL.into_iter().enumerate() {
            assert_eq!(kind as usize, i, "{kind}");
            assert_eq!(Kind::parse(kind.as_str()), Some(kind));
        }
        // A kind added to the enum but not to `Kind::ALL` would index past
        // the tally (a panic on the hot path): this match stops compiling
        // until the new kind is listed here, and then the loop above fails
        // until it is in `Kind::ALL` too.
        let listed = |kind: Kind| match kind {
            Kind::Hello
            | Kind::Join
            | Kind::Leave
            | Kind::Call
            | Kind::Reply
            | Kind::Error
            | Kind::Event
            | Kind::Ping
            | Kind::Pong
            | Kind::Presence
            | Kind::PresenceState
            | Kind::PresenceDiff
            | Kind::Lagged
            | Kind::Refresh
            | Kind::Gap => kind as usize,
        };
        assert_eq!(listed(Kind::Gap) + 1, Kind::ALL.len(), "the last kind closes `Kind::ALL`");
    }

    /// Adds from several threads all reach the total (other tests may add
    /// too, so at least what these added).
    #[test]
    fn the_tally_sums_every_threads_adds() {
        let count = Count::Out(Kind::Refresh);
        let before = total(count);
        let threads: Vec<_> =
            (0..12).map(|_| std::thread::spawn(move || (0..1000).for_each(|_| add(count, 2)))).collect();
        for t in threads {
            t.join().unwrap();
        }
        assert!(total(count) >= before + 24_000);
    }
}
