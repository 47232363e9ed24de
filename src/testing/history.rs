//! The [`HistoryStore`] conformance suite.

use super::{cut_hook, long_names, retry, tag, Cut, Failure, Step};
use crate::history::{Append, HistoryRead, HistoryStore, Retention, StreamPosition, MAX_EPOCH_LEN};
use crate::protocol::{Format, Payload};
use crate::room::MAX_ROOM_NAME_LEN;
use futures::future::BoxFuture;
use std::future::Future;
use std::time::Duration;

const SUITE: &str = "history";

/// Runs the [`HistoryStore`] conformance suite without the lost-connection
/// check and panics with the [`Failure`]. `a` and `b` must be two handles
/// on the same store (two nodes' connections). See [`HistorySuite`] for the
/// checks.
pub async fn history<H: HistoryStore + Clone>(a: H, b: H) {
    if let Err(failure) = HistorySuite::new(a, b).run().await {
        panic!("{failure}");
    }
}

/// The [`HistoryStore`] conformance suite. Checks, in order (the names are
/// [`HistorySuite::CHECKS`]):
///
/// 1. `history.first_offset`: a room's first append gets offset 1, the next
///    ones 2, 3, … in one epoch;
/// 2. `history.rooms`: rooms are separate streams;
/// 3. `history.epoch`: epochs are 1 to [`MAX_EPOCH_LEN`] bytes (a longer one
///    makes every recovering join fail with 400);
/// 4. `history.concurrent_offsets`: 200 appends made concurrently through
///    *two* handles get distinct, consecutive offsets;
/// 5. `history.start_order`: appends whose futures were first polled in an
///    order get offsets in that order (the first poll starts the work);
/// 6. `history.read_after`: reading after a position returns exactly the
///    later events, oldest first, unchanged, `complete`, with the top;
/// 7. `history.limit`: a read cut by its limit is not `complete`;
/// 8. `history.foreign_position`: a position of another epoch or beyond the
///    top replays nothing and is not `complete`;
/// 9. `history.u64_offsets`: positions above `i64::MAX` (up to `u64::MAX`)
///    are beyond the top, not wrapped into negative numbers;
/// 10. `history.since_none`: a read with `since: None` returns the newest
///     events and is `complete` exactly when they are all the stream ever
///     had;
/// 11. `history.max_len`: exactly `max_len` events are kept, and a read
///     that would need a trimmed one is not `complete`;
/// 12. `history.max_age`: reads apply `max_age` (an event older than it is
///     not returned, though nothing was appended since), and a read that
///     would need an expired one is not `complete`;
/// 13. `history.idempotency`: an idempotency key stores once, and the retry
///     gets the original position and takes no offset;
/// 14. `history.concurrent_retries`: retries with one key racing through
///     two handles store once;
/// 15. `history.room_names`: room names of up to [`MAX_ROOM_NAME_LEN`]
///     bytes of every allowed character are kept apart exactly;
/// 16. `history.fresh_read`: a read of a room without a stream creates it,
///     and the first append keeps that epoch;
/// 17. `history.lost_connection` (with
///     [`cut_connection`](Self::cut_connection)): after the cut, an append
///     retried with its idempotency key until it succeeds (within
///     [`WAIT`](super::WAIT)) is stored once, in the same epoch, right
///     after the events from before the cut.
///
/// `history.max_age` waits 1.3 s of real time (the store's clock is the
/// wall clock: [`Publication::time_ms`](crate::history::Publication::time_ms)).
#[derive(Clone)]
pub struct HistorySuite<H> {
    a: H,
    b: H,
    cut: Option<Cut>,
}

impl<H> std::fmt::Debug for HistorySuite<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HistorySuite").field("cut_connection", &self.cut.is_some()).finish_non_exhaustive()
    }
}

fn append(event: &str, key: Option<&str>, retention: Retention) -> Append {
    Append {
        event: event.to_owned(),
        data: Some(Payload::encode(Format::Json, &event).expect("a string encodes")),
        idempotency_key: key.map(str::to_owned),
        retention,
    }
}

fn events(read: &HistoryRead) -> Vec<(u64, &str)> {
    read.publications.iter().map(|p| (p.offset, p.event.as_str())).collect()
}

impl<H: HistoryStore + Clone> HistorySuite<H> {
    /// Every check, in the order they run.
    pub const CHECKS: &'static [&'static str] = &[
        "history.first_offset",
        "history.rooms",
        "history.epoch",
        "history.concurrent_offsets",
        "history.start_order",
        "history.read_after",
        "history.limit",
        "history.foreign_position",
        "history.u64_offsets",
        "history.since_none",
        "history.max_len",
        "history.max_age",
        "history.idempotency",
        "history.concurrent_retries",
        "history.room_names",
        "history.fresh_read",
        "history.lost_connection",
    ];

    /// The suite on two handles `a` and `b` of the same store.
    pub fn new(a: H, b: H) -> Self {
        HistorySuite { a, b, cut: None }
    }

    /// A hook that cuts both handles' connections to the store (the store
    /// keeps its data; the handles must reconnect by themselves). Enables
    /// `history.lost_connection`.
    pub fn cut_connection<F, Fut>(mut self, cut: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.cut = Some(cut_hook(cut));
        self
    }

    /// Runs the checks; the first that fails is returned.
    pub async fn run(self) -> Result<(), Failure> {
        let tag = tag("hist");
        let room = |n: &str| format!("{tag}-{n}");
        let (a, b) = (&self.a, &self.b);
        let keep = Retention::default().max_len(50);

        // 1. Consecutive offsets from 1.
        let check = "history.first_offset";
        let first = a.append(&room("a"), append("e1", None, keep)).await.step(SUITE, check, "append")?;
        ensure!(first.position.offset == 1, check, "the first offset is {}, not 1", first.position.offset);
        for i in 2..=5 {
            let got = a.append(&room("a"), append(&format!("e{i}"), None, keep)).await.step(SUITE, check, "append")?;
            ensure!(got.position.offset == i, check, "append #{i} got offset {}", got.position.offset);
            ensure!(got.position.epoch == first.position.epoch, check, "the epoch changed without a reason");
        }

        // 2. Rooms are separate.
        let check = "history.rooms";
        let other = a.append(&room("b"), append("o", None, keep)).await.step(SUITE, check, "append")?;
        ensure!(other.position.offset == 1, check, "another room's first append got offset {}", other.position.offset);

        // 3. Epoch limits.
        let check = "history.epoch";
        let epoch = &first.position.epoch;
        ensure!(
            !epoch.is_empty() && epoch.len() <= MAX_EPOCH_LEN,
            check,
            "the epoch {epoch:?} is {} bytes; it must be 1 to {MAX_EPOCH_LEN}",
            epoch.len()
        );

        // 4. Concurrent appends through two handles.
        let check = "history.concurrent_offsets";
        let tasks: Vec<_> = (0..200)
            .map(|i| {
                let store = if i % 2 == 0 { a.clone() } else { b.clone() };
                let (room, add) = (room("c"), append(&format!("c{i}"), None, Retention::default()));
                tokio::spawn(async move { store.append(&room, add).await.map(|a| a.position.offset) })
            })
            .collect();
        let mut offsets = Vec::new();
        for t in tasks {
            offsets.push(t.await.expect("an append task panicked").step(SUITE, check, "append")?);
        }
        offsets.sort_unstable();
        ensure!(
            offsets == (1..=200).collect::<Vec<u64>>(),
            check,
            "200 concurrent appends through two handles got duplicate or missing offsets: {:?}…",
            &offsets[..20]
        );

        // 5. Appends started in order get offsets in that order.
        let check = "history.start_order";
        let futures: Vec<BoxFuture<'static, crate::Result<crate::history::Appended>>> =
            (0..20).map(|i| a.append(&room("s"), append(&format!("s{i}"), None, keep))).collect();
        let mut done = Vec::new();
        let mut pending = Vec::new();
        for (i, mut f) in futures.into_iter().enumerate() {
            match futures::poll!(f.as_mut()) {
                std::task::Poll::Ready(r) => done.push((i, r)),
                std::task::Poll::Pending => pending.push(async move { (i, f.await) }),
            }
        }
        done.extend(futures::future::join_all(pending).await);
        done.sort_by_key(|(i, _)| *i);
        let mut got = Vec::new();
        for (_, r) in done {
            got.push(r.step(SUITE, check, "append")?.position.offset);
        }
        ensure!(
            got == (1..=20).collect::<Vec<u64>>(),
            check,
            "appends first polled in order got offsets {got:?}: the work must start on the first poll"
        );

        // 6. Exact reads.
        let check = "history.read_after";
        let read = b.read(&room("a"), Some(first.position.clone()), 100).await.step(SUITE, check, "read")?;
        let want: Vec<String> = (2..=5).map(|i| format!("e{i}")).collect();
        let want: Vec<(u64, &str)> = (2..=5).zip(want.iter().map(String::as_str)).collect();
        ensure!(events(&read) == want, check, "read after offset 1 returned {:?}", events(&read));
        ensure!(read.complete, check, "a read of retained events must be complete");
        ensure!(read.top.offset == 5 && read.top.epoch == first.position.epoch, check, "wrong top {:?}", read.top);
        let data: Option<String> = read.publications[0].data.as_ref().and_then(|d| d.decode().ok());
        ensure!(data.as_deref() == Some("e2"), check, "payload changed: {data:?}");

        // 7. Limits.
        let check = "history.limit";
        let read = b.read(&room("a"), Some(first.position.clone()), 2).await.step(SUITE, check, "read")?;
        ensure!(events(&read) == want[..2], check, "a read with limit 2 returned {:?}", events(&read));
        ensure!(!read.complete, check, "a read cut by its limit is not complete");

        // 8, 9. Positions of another epoch, beyond the top, beyond i64.
        for (bad, check) in [
            (StreamPosition { offset: 1, epoch: format!("{epoch}x").into() }, "history.foreign_position"),
            (StreamPosition { offset: 99, epoch: epoch.clone() }, "history.foreign_position"),
            (StreamPosition { offset: i64::MAX as u64 + 2, epoch: epoch.clone() }, "history.u64_offsets"),
            (StreamPosition { offset: u64::MAX, epoch: epoch.clone() }, "history.u64_offsets"),
        ] {
            let read = b.read(&room("a"), Some(bad.clone()), 100).await.step(SUITE, check, "read")?;
            ensure!(
                !read.complete && read.publications.is_empty(),
                check,
                "a read after {bad:?} returned {:?}, complete: {}; it must replay nothing and not be complete",
                events(&read),
                read.complete
            );
        }

        // 10. since: None.
        let check = "history.since_none";
        let read = b.read(&room("a"), None, 100).await.step(SUITE, check, "read")?;
        ensure!(
            read.complete && read.publications.len() == 5,
            check,
            "all 5 events, complete: got {:?}, complete: {}",
            events(&read),
            read.complete
        );
        let read = b.read(&room("a"), None, 2).await.step(SUITE, check, "read")?;
        ensure!(events(&read) == [(4, "e4"), (5, "e5")], check, "the newest 2 events: got {:?}", events(&read));
        ensure!(!read.complete, check, "the newest 2 of 5 events are not complete");

        // 11. Trimming to exactly max_len.
        let check = "history.max_len";
        let small = Retention::default().max_len(3);
        let mut last = first.position.clone();
        for i in 1..=6 {
            last = a
                .append(&room("t"), append(&format!("t{i}"), None, small))
                .await
                .step(SUITE, check, "append")?
                .position;
        }
        let read = b.read(&room("t"), None, 100).await.step(SUITE, check, "read")?;
        ensure!(
            events(&read) == [(4, "t4"), (5, "t5"), (6, "t6")],
            check,
            "with max_len 3 after 6 appends, kept {:?}",
            events(&read)
        );
        ensure!(!read.complete, check, "a `since: None` read missing trimmed events is not complete");
        let at = |offset| Some(StreamPosition { offset, epoch: last.epoch.clone() });
        let read = b.read(&room("t"), at(2), 100).await.step(SUITE, check, "read")?;
        ensure!(!read.complete, check, "offset 3 was trimmed: a read after 2 must not be complete");
        let read = b.read(&room("t"), at(3), 100).await.step(SUITE, check, "read")?;
        ensure!(read.complete && read.publications.len() == 3, check, "a read after 3 needs only retained events");

        // 12. Age, applied by reads.
        let check = "history.max_age";
        let short = Retention::default().max_age(Duration::from_secs(1));
        let aged = a.append(&room("age"), append("old", None, short)).await.step(SUITE, check, "append")?.position;
        tokio::time::sleep(Duration::from_millis(1300)).await;
        let before = StreamPosition { offset: 0, epoch: aged.epoch.clone() };
        let read = b.read(&room("age"), Some(before), 100).await.step(SUITE, check, "read")?;
        ensure!(
            read.publications.is_empty() && !read.complete,
            check,
            "an event 1.3 s old with max_age 1 s was read back ({:?}, complete: {}): reads must apply max_age",
            events(&read),
            read.complete
        );
        let read = b.read(&room("age"), None, 100).await.step(SUITE, check, "read")?;
        ensure!(read.publications.is_empty(), check, "a `since: None` read returned an expired event");

        // 13. Idempotency.
        let check = "history.idempotency";
        let x = a.append(&room("i"), append("x", Some("key-1"), keep)).await.step(SUITE, check, "append")?;
        let y = b.append(&room("i"), append("x", Some("key-1"), keep)).await.step(SUITE, check, "append")?;
        ensure!(
            !x.duplicate && y.duplicate,
            check,
            "the retry must be reported as a duplicate (first: {x:?}, retry: {y:?})"
        );
        ensure!(x.position == y.position, check, "the duplicate must return the original position");
        let z = a.append(&room("i"), append("y", Some("key-2"), keep)).await.step(SUITE, check, "append")?;
        ensure!(z.position.offset == 2, check, "a duplicate must not take an offset (next got {})", z.position.offset);

        // 14. Concurrent retries through two handles.
        let check = "history.concurrent_retries";
        for round in 0..5 {
            let key = format!("race-{round}");
            let tasks: Vec<_> = (0..8)
                .map(|i| {
                    let store = if i % 2 == 0 { a.clone() } else { b.clone() };
                    let (room, add) = (room("r"), append("retry", Some(&key), keep));
                    tokio::spawn(async move { store.append(&room, add).await })
                })
                .collect();
            let mut stored = Vec::new();
            for t in tasks {
                let done = t.await.expect("an append task panicked").step(SUITE, check, "append")?;
                ensure!(
                    done.position.offset == round + 1,
                    check,
                    "a retry of one key got offset {} in round {}",
                    done.position.offset,
                    round + 1
                );
                stored.push(done.duplicate);
            }
            let originals = stored.iter().filter(|d| !**d).count();
            ensure!(originals == 1, check, "8 concurrent retries with one key stored {originals} times");
        }

        // 15. Long room names, every character.
        let check = "history.room_names";
        let names = long_names(&format!("{tag}:"), MAX_ROOM_NAME_LEN);
        for name in &names {
            let got = a.append(name, append(name, None, keep)).await.step(
                SUITE,
                check,
                &format!("append to a {}-byte room", name.len()),
            )?;
            ensure!(
                got.position.offset == 1,
                check,
                "room {name:?} got offset {}: room names collide",
                got.position.offset
            );
        }
        for name in &names {
            let read = b.read(name, None, 10).await.step(SUITE, check, "read")?;
            ensure!(events(&read) == [(1, name.as_str())], check, "room {name:?} read {:?}", events(&read));
        }

        // 16. A read creates the stream.
        let check = "history.fresh_read";
        let fresh = b.read(&room("fresh"), None, 10).await.step(SUITE, check, "read")?;
        ensure!(fresh.top.offset == 0, check, "a fresh room starts at offset 0, not {}", fresh.top.offset);
        ensure!(!fresh.top.epoch.is_empty(), check, "a read must create the stream's epoch");
        let got = a.append(&room("fresh"), append("f1", None, keep)).await.step(SUITE, check, "append")?;
        ensure!(got.position.epoch == fresh.top.epoch, check, "the first append must keep the epoch a read created");
        let read = b.read(&room("fresh"), Some(fresh.top.clone()), 10).await.step(SUITE, check, "read")?;
        ensure!(read.complete && read.publications.len() == 1, check, "a position from the fresh read continues");

        // 17. A lost connection.
        if let Some(cut) = &self.cut {
            let check = "history.lost_connection";
            let before = a.append(&room("cut"), append("before", None, keep)).await.step(SUITE, check, "append")?;
            cut().await;
            let add = append("after", Some("after-cut"), keep);
            let after = retry(SUITE, check, "append", || a.append(&room("cut"), add.clone())).await?;
            let read = retry(SUITE, check, "read", || b.read(&room("cut"), Some(before.position.clone()), 10)).await?;
            ensure!(
                after.position.epoch == before.position.epoch,
                check,
                "the epoch changed across a cut connection (the store lost nothing)"
            );
            ensure!(
                read.complete && events(&read) == [(2, "after")],
                check,
                "after the cut, the retried append must be stored once right after the one before; read {:?}",
                events(&read)
            );
        }
        Ok(())
    }
}
