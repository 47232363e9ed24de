//! The [`SnapshotStore`] conformance suite.

use super::{cut_hook, long_names, retry, tag, Cut, Failure, Step};
use crate::room::MAX_ROOM_NAME_LEN;
use crate::sync::{Append, Appended, ClientRecord, Loaded, OpRecord, SnapshotStore};
use serde_json::json;
use std::future::Future;
use std::sync::Arc;

const SUITE: &str = "snapshot_store";

/// Runs the [`SnapshotStore`] conformance suite on **one** handle, without
/// the lost-connection check, and panics with the [`Failure`]. Kept for
/// stores that have a single handle; [`SnapshotSuite::new`] with two
/// handles (two connections, as two nodes have) also catches
/// compare-and-append races between connections.
///
/// ```no_run
/// # async fn run() {
/// switchboard::testing::snapshot_store(switchboard::sync::MemorySnapshots::new().retain(4)).await;
/// # }
/// ```
pub async fn snapshot_store<S: SnapshotStore>(store: S) {
    let store = Arc::new(store);
    if let Err(failure) = SnapshotSuite::new(store.clone(), store).run().await {
        panic!("{failure}");
    }
}

/// The [`SnapshotStore`] conformance suite. Checks, in order (the names are
/// [`SnapshotSuite::CHECKS`]):
///
/// 1. `snapshot_store.empty`: an unknown room loads (not an error) as
///    version 0, no snapshot, no ops, and has no client records;
/// 2. `snapshot_store.compare_and_append`: appends at the expected version
///    succeed and number the ops 1, 2, 3…; an append at a stale or future
///    version is a `Conflict` with the current version and writes nothing
///    (the other handle sees version 3);
/// 3. `snapshot_store.duplicate`: a client's op with a `seq` at or below its
///    last applied one is a `Duplicate` with that record (seq, version,
///    user), even at the right version, and writes nothing;
///    [`SnapshotStore::client`] returns the last record, on either handle;
/// 4. `snapshot_store.load_since`: `load(since)` returns exactly the ops
///    after `since`, unchanged and in order; `load(None)` every op while
///    there is no snapshot;
/// 5. `snapshot_store.snapshot`: after a snapshot, `load(None)` starts from
///    the newest one and returns the ops after it, and a `load(since)` for
///    a `since` whose ops the store no longer has returns the snapshot too
///    (never a partial list); recent ops are still returned as ops;
/// 6. `snapshot_store.concurrent_appends`: in each of 5 rounds, 32 appends
///    at the same version raced through *both* handles: exactly one wins,
///    the others conflict with the new version (so a compare and a write
///    that are two statements race between connections);
/// 7. `snapshot_store.room_names`: room names of up to
///    [`MAX_ROOM_NAME_LEN`] bytes of every allowed character are kept apart
///    exactly;
/// 8. `snapshot_store.lost_connection` (with
///    [`cut_connection`](Self::cut_connection)): after the cut, an append
///    retried until it succeeds (within [`WAIT`](super::WAIT)) is stored
///    once (`Done`, or `Duplicate` of itself when an attempt landed
///    unseen), right after the ops from before the cut.
///
/// Check 5 needs a store that keeps few ops before its snapshot: give it a
/// retention of at most 4 ops. Rooms are prefixed with a random tag, so
/// the suite can run against a shared store.
#[derive(Clone)]
pub struct SnapshotSuite<S> {
    a: S,
    b: S,
    cut: Option<Cut>,
}

impl<S> std::fmt::Debug for SnapshotSuite<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotSuite").field("cut_connection", &self.cut.is_some()).finish_non_exhaustive()
    }
}

fn record(version: u64, client: &str, seq: u64, user: Option<&str>) -> OpRecord {
    OpRecord {
        version,
        client: client.to_owned(),
        seq,
        user: user.map(str::to_owned),
        base: version - 1,
        op: json!({ "n": version, "text": "é \" \\ {}" }),
    }
}

fn append(expected: u64, record: OpRecord, snapshot: Option<u64>) -> Append {
    Append { expected, record, snapshot: snapshot.map(|n| json!({ "upto": n })) }
}

fn versions(loaded: &Loaded) -> Vec<u64> {
    loaded.ops.iter().map(|o| o.version).collect()
}

impl<S: SnapshotStore + Clone> SnapshotSuite<S> {
    /// Every check, in the order they run.
    pub const CHECKS: &'static [&'static str] = &[
        "snapshot_store.empty",
        "snapshot_store.compare_and_append",
        "snapshot_store.duplicate",
        "snapshot_store.load_since",
        "snapshot_store.snapshot",
        "snapshot_store.concurrent_appends",
        "snapshot_store.room_names",
        "snapshot_store.lost_connection",
    ];

    /// The suite on two handles `a` and `b` of the same store (for an
    /// in-memory store, clones of one).
    pub fn new(a: S, b: S) -> Self {
        SnapshotSuite { a, b, cut: None }
    }

    /// A hook that cuts both handles' connections to the store (the store
    /// keeps its data; the handles must reconnect by themselves). Enables
    /// `snapshot_store.lost_connection`.
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
        let tag = tag("snap");
        let room = |n: &str| format!("{tag}-{n}");
        let (a, b) = (&self.a, &self.b);

        // 1. An unknown room.
        let check = "snapshot_store.empty";
        for since in [None, Some(0)] {
            let empty = a.load(&room("empty"), since).await.step(SUITE, check, "load of an unknown room")?;
            ensure!(
                empty == Loaded::default(),
                check,
                "an unknown room loads (since {since:?}) as version 0, no snapshot, no ops; got {empty:?}"
            );
        }
        let none = b.client(&room("empty"), "c1").await.step(SUITE, check, "client")?;
        ensure!(none.is_none(), check, "an unknown room has no client record; got {none:?}");

        // 2. Compare-and-append.
        let check = "snapshot_store.compare_and_append";
        let r = room("a");
        for v in 1..=3 {
            let done = a
                .append(&r, append(v - 1, record(v, "c1", v, Some("ann")), None))
                .await
                .step(SUITE, check, "append")?;
            ensure!(done == Appended::Done, check, "append {v} at version {} got {done:?}", v - 1);
        }
        for expected in [0, 2, 7] {
            let got = a
                .append(&r, append(expected, record(expected + 1, "c2", 1, None), None))
                .await
                .step(SUITE, check, "append")?;
            ensure!(
                got == Appended::Conflict { version: 3 },
                check,
                "an append expecting version {expected} while the room is at 3 must conflict; got {got:?}"
            );
        }
        let seen = b.load(&r, None).await.step(SUITE, check, "load")?;
        ensure!(
            seen.version == 3 && versions(&seen) == [1, 2, 3],
            check,
            "the other handle must see versions 1 to 3 and nothing of the conflicts; got version {}, ops {:?}",
            seen.version,
            versions(&seen)
        );
        ensure!(
            b.client(&r, "c2").await.step(SUITE, check, "client")?.is_none(),
            check,
            "a conflict recorded a client"
        );

        // 3. Duplicates and client records.
        let check = "snapshot_store.duplicate";
        let last = ClientRecord { seq: 3, version: 3, user: Some("ann".into()) };
        for seq in [3, 2] {
            let got =
                b.append(&r, append(3, record(4, "c1", seq, Some("ann")), None)).await.step(SUITE, check, "append")?;
            ensure!(
                got == Appended::Duplicate(last.clone()),
                check,
                "seq {seq} of a client whose last applied seq is 3 must be a duplicate with {last:?}; got {got:?}"
            );
        }
        for (name, handle) in [("a", a), ("b", b)] {
            let got = handle.client(&r, "c1").await.step(SUITE, check, "client")?;
            ensure!(got.as_ref() == Some(&last), check, "handle {name}: the client's last record is {got:?}");
        }
        let version = a.load(&r, None).await.step(SUITE, check, "load")?.version;
        ensure!(version == 3, check, "duplicates must write nothing; the room is at {version}");

        // 4. Loads from a version.
        let check = "snapshot_store.load_since";
        let all = b.load(&r, None).await.step(SUITE, check, "load")?;
        ensure!(all.snapshot.is_none(), check, "no snapshot was stored, yet load returned {:?}", all.snapshot);
        ensure!(
            versions(&all) == [1, 2, 3],
            check,
            "load(None) must return every op in order; got {:?}",
            versions(&all)
        );
        ensure!(all.ops[1] == record(2, "c1", 2, Some("ann")), check, "ops must come back unchanged: {:?}", all.ops[1]);
        for (since, want) in [(0, &[1, 2, 3][..]), (1, &[2, 3]), (2, &[3]), (3, &[])] {
            let got = a.load(&r, Some(since)).await.step(SUITE, check, "load")?;
            ensure!(
                got.version == 3 && got.snapshot.is_none() && versions(&got) == want,
                check,
                "load(since {since}) must return exactly the ops after it, {want:?}; got version {}, snapshot {:?}, ops {:?}",
                got.version,
                got.snapshot.as_ref().map(|s| s.0),
                versions(&got)
            );
        }

        // 5. Snapshots: one at 4, then 20 more ops with one at 20.
        let check = "snapshot_store.snapshot";
        let done =
            a.append(&r, append(3, record(4, "c1", 4, Some("ann")), Some(4))).await.step(SUITE, check, "append")?;
        ensure!(done == Appended::Done, check, "append 4 with a snapshot got {done:?}");
        let from = b.load(&r, None).await.step(SUITE, check, "load")?;
        ensure!(
            from.snapshot == Some((4, json!({ "upto": 4 }))) && from.ops.is_empty() && from.version == 4,
            check,
            "load(None) must start from the snapshot of version 4 with no ops after it; got snapshot {:?}, ops {:?}",
            from.snapshot,
            versions(&from)
        );
        for v in 5..=24 {
            let snap = (v == 20).then_some(20);
            let done =
                a.append(&r, append(v - 1, record(v, "c3", v, None), snap)).await.step(SUITE, check, "append")?;
            ensure!(done == Appended::Done, check, "append {v} got {done:?}");
        }
        let from = b.load(&r, None).await.step(SUITE, check, "load")?;
        ensure!(
            from.snapshot.as_ref().map(|s| s.0) == Some(20) && versions(&from) == [21, 22, 23, 24],
            check,
            "load(None) must start from the newest snapshot (20) and return 21 to 24; got snapshot {:?}, ops {:?}",
            from.snapshot.as_ref().map(|s| s.0),
            versions(&from)
        );
        let old = b.load(&r, Some(2)).await.step(SUITE, check, "load")?;
        ensure!(
            old.snapshot.as_ref().map(|s| s.0) == Some(20) && versions(&old) == [21, 22, 23, 24],
            check,
            "load(since 2), whose ops are gone (keep at most 4 before the snapshot), must return the snapshot of 20 \
             and 21 to 24, never a partial list; got snapshot {:?}, ops {:?}",
            old.snapshot.as_ref().map(|s| s.0),
            versions(&old)
        );
        let recent = b.load(&r, Some(22)).await.step(SUITE, check, "load")?;
        ensure!(
            recent.snapshot.is_none() && versions(&recent) == [23, 24],
            check,
            "load(since 22) must return the ops 23 and 24; got snapshot {:?}, ops {:?}",
            recent.snapshot.as_ref().map(|s| s.0),
            versions(&recent)
        );

        // 6. Races through two handles.
        let check = "snapshot_store.concurrent_appends";
        let race = room("race");
        for round in 0..5u64 {
            let tasks: Vec<_> = (0..32)
                .map(|i| {
                    let store = if i % 2 == 0 { a.clone() } else { b.clone() };
                    let (room, add) =
                        (race.clone(), append(round, record(round + 1, &format!("r{i}"), round + 1, None), None));
                    tokio::spawn(async move { store.append(&room, add).await })
                })
                .collect();
            let mut outcomes = Vec::new();
            for t in tasks {
                outcomes.push(t.await.expect("an append task panicked").step(SUITE, check, "append")?);
            }
            let won = outcomes.iter().filter(|o| **o == Appended::Done).count();
            ensure!(
                won == 1,
                check,
                "{won} of 32 appends at version {round} raced through two handles succeeded; exactly one must"
            );
            ensure!(
                outcomes.iter().all(|o| *o == Appended::Done || *o == Appended::Conflict { version: round + 1 }),
                check,
                "the losers of the race at version {round} must conflict with version {}: {outcomes:?}",
                round + 1
            );
        }
        let log = a.load(&race, Some(0)).await.step(SUITE, check, "load")?;
        ensure!(
            log.version == 5 && versions(&log) == [1, 2, 3, 4, 5],
            check,
            "after 5 races the room must be at 5 with one op each; got version {}, ops {:?}",
            log.version,
            versions(&log)
        );

        // 7. Long room names, every character.
        let check = "snapshot_store.room_names";
        let names = long_names(&format!("{tag}:"), MAX_ROOM_NAME_LEN);
        for name in &names {
            let mine = OpRecord { op: json!({ "room": name }), ..record(1, "c1", 1, None) };
            let got = a.append(name, append(0, mine, None)).await.step(
                SUITE,
                check,
                &format!("append to a {}-byte room", name.len()),
            )?;
            ensure!(got == Appended::Done, check, "the first append to room {name:?} got {got:?}: room names collide");
        }
        for name in &names {
            let got = b.load(name, None).await.step(SUITE, check, "load")?;
            ensure!(
                got.version == 1 && got.ops.len() == 1 && got.ops[0].op == json!({ "room": name }),
                check,
                "room {name:?} loads version {}, ops {:?}: room names collide",
                got.version,
                got.ops.iter().map(|o| &o.op).collect::<Vec<_>>()
            );
        }

        // 8. A lost connection.
        if let Some(cut) = &self.cut {
            let check = "snapshot_store.lost_connection";
            let r = room("cut");
            let before = a.append(&r, append(0, record(1, "k", 1, None), None)).await.step(SUITE, check, "append")?;
            ensure!(before == Appended::Done, check, "the append before the cut got {before:?}");
            cut().await;
            let add = append(1, record(2, "k", 2, None), None);
            let after = retry(SUITE, check, "append", || a.append(&r, add.clone())).await?;
            let mine = Appended::Duplicate(ClientRecord { seq: 2, version: 2, user: None });
            ensure!(
                after == Appended::Done || after == mine,
                check,
                "the append retried after the cut got {after:?}: the store lost its version or client record"
            );
            let loaded = retry(SUITE, check, "load", || b.load(&r, None)).await?;
            ensure!(
                loaded.version == 2 && versions(&loaded) == [1, 2],
                check,
                "after the cut, the retried append must be stored once right after the one before; got version {}, \
                 ops {:?}",
                loaded.version,
                versions(&loaded)
            );
        }
        Ok(())
    }
}
