//! The [`SnapshotStore`] conformance suite (feature `testing`), re-exported
//! as `switchboard::testing::snapshot_store`.

use super::store::{Append, Appended, ClientRecord, OpRecord, SnapshotStore};
use serde_json::json;

fn record(version: u64, client: &str, seq: u64, user: Option<&str>) -> OpRecord {
    OpRecord {
        version,
        client: client.to_owned(),
        seq,
        user: user.map(str::to_owned),
        base: version - 1,
        op: json!({ "n": version }),
    }
}

async fn append<S: SnapshotStore>(store: &S, room: &str, expected: u64, rec: OpRecord, snap: Option<u64>) -> Appended {
    let snapshot = snap.map(|n| json!({ "upto": n }));
    store.append(room, Append { expected, record: rec, snapshot }).await.expect("append")
}

/// Runs the [`SnapshotStore`] conformance suite against `store`. Checks, in
/// order:
///
/// 1. an unknown room loads as version 0, no snapshot, no ops;
/// 2. appends at the expected version succeed and number the ops 1, 2, 3…;
///    an append at a stale or future version is a `Conflict` with the
///    current version and writes nothing;
/// 3. a client's op with a `seq` at or below its last applied one is a
///    `Duplicate` with that record (and writes nothing), even at the right
///    version; [`SnapshotStore::client`] returns the last record;
/// 4. `load(since)` returns exactly the ops after `since`; `load(None)`
///    returns every op when there is no snapshot;
/// 5. after a snapshot, `load(None)` starts from it and returns the ops
///    after it, and `load(since)` for a `since` the store no longer has ops
///    for returns the snapshot too (never a partial list);
/// 6. 32 concurrent appends at the same version: exactly one succeeds;
/// 7. rooms are isolated.
///
/// Rooms are prefixed with a random tag, so the suite can run against a
/// shared store. It panics with a message naming the broken rule.
///
/// ```no_run
/// # async fn run() {
/// switchboard::testing::snapshot_store(switchboard::sync::MemorySnapshots::new().retain(4)).await;
/// # }
/// ```
///
/// Step 5 needs a store that keeps few ops before a snapshot: give it a
/// retention of at most 4 ops.
pub async fn snapshot_store<S: SnapshotStore>(store: S) {
    let tag = format!("conf{:x}", std::process::id() as u64 ^ crate::util::random_u64());
    let room = |name: &str| format!("{tag}.{name}");

    // 1.
    let empty = store.load(&room("empty"), None).await.expect("load");
    assert_eq!((empty.version, empty.snapshot.is_none(), empty.ops.len()), (0, true, 0), "1: an unknown room is empty");
    assert_eq!(store.client(&room("empty"), "c").await.expect("client"), None, "1: no client record");

    // 2.
    let r = room("a");
    for v in 1..=3 {
        assert_eq!(
            append(&store, &r, v - 1, record(v, "c1", v, Some("ann")), None).await,
            Appended::Done,
            "2: append {v}"
        );
    }
    for expected in [0, 2, 7] {
        assert_eq!(
            append(&store, &r, expected, record(expected + 1, "c2", 1, None), None).await,
            Appended::Conflict { version: 3 },
            "2: an append at version {expected} while the room is at 3 conflicts"
        );
    }
    assert_eq!(store.load(&r, None).await.expect("load").version, 3, "2: conflicts wrote nothing");

    // 3.
    let last = ClientRecord { seq: 3, version: 3, user: Some("ann".into()) };
    for seq in [3, 2] {
        assert_eq!(
            append(&store, &r, 3, record(4, "c1", seq, Some("ann")), None).await,
            Appended::Duplicate(last.clone()),
            "3: seq {seq} of a client at seq 3 is a duplicate"
        );
    }
    assert_eq!(store.client(&r, "c1").await.expect("client"), Some(last), "3: the client's last record");
    assert_eq!(store.load(&r, None).await.expect("load").version, 3, "3: duplicates wrote nothing");

    // 4.
    let all = store.load(&r, None).await.expect("load");
    assert!(all.snapshot.is_none(), "4: no snapshot yet");
    assert_eq!(all.ops.iter().map(|o| o.version).collect::<Vec<_>>(), [1, 2, 3], "4: every op, in order");
    assert_eq!(all.ops[1], record(2, "c1", 2, Some("ann")), "4: ops come back unchanged");
    let after = store.load(&r, Some(1)).await.expect("load");
    assert!(after.snapshot.is_none(), "4: ops after 1 are all kept");
    assert_eq!(after.ops.iter().map(|o| o.version).collect::<Vec<_>>(), [2, 3], "4: exactly the ops after since");
    assert!(store.load(&r, Some(3)).await.expect("load").ops.is_empty(), "4: nothing after the top");

    // 5. A snapshot at 4, then 20 more ops with a snapshot at 20.
    assert_eq!(append(&store, &r, 3, record(4, "c1", 4, Some("ann")), Some(4)).await, Appended::Done, "5: append 4");
    let from_snap = store.load(&r, None).await.expect("load");
    assert_eq!(from_snap.snapshot, Some((4, json!({ "upto": 4 }))), "5: load starts from the snapshot");
    assert!(from_snap.ops.is_empty(), "5: no ops after the snapshot yet");
    for v in 5..=24 {
        let snap = (v == 20).then_some(20);
        assert_eq!(append(&store, &r, v - 1, record(v, "c3", v, None), snap).await, Appended::Done, "5: append {v}");
    }
    let from_snap = store.load(&r, None).await.expect("load");
    assert_eq!(from_snap.snapshot.as_ref().map(|s| s.0), Some(20), "5: the newest snapshot");
    assert_eq!(from_snap.ops.iter().map(|o| o.version).collect::<Vec<_>>(), [21, 22, 23, 24], "5: ops after it");
    let old = store.load(&r, Some(2)).await.expect("load");
    match &old.snapshot {
        Some((20, _)) => {
            assert_eq!(old.ops.iter().map(|o| o.version).collect::<Vec<_>>(), [21, 22, 23, 24], "5: ops after it")
        }
        Some((v, _)) => panic!("5: a load from 2 returned snapshot {v}, not the newest (20)"),
        None => panic!("5: a load from 2 returned ops although the store keeps at most 4 before its snapshot"),
    }
    let recent = store.load(&r, Some(22)).await.expect("load");
    assert!(recent.snapshot.is_none(), "5: recent ops are still there");
    assert_eq!(recent.ops.iter().map(|o| o.version).collect::<Vec<_>>(), [23, 24], "5: ops after 22");

    // 6.
    let race = room("race");
    let outcomes = futures::future::join_all(
        (0..32).map(|i| append(&store, &race, 0, record(1, &format!("r{i}"), 1, None), None)),
    )
    .await;
    let done = outcomes.iter().filter(|o| **o == Appended::Done).count();
    assert_eq!(done, 1, "6: exactly one of 32 concurrent appends at version 0 wins: {outcomes:?}");
    assert!(
        outcomes.iter().all(|o| matches!(o, Appended::Done | Appended::Conflict { version: 1 })),
        "6: the others conflict at version 1"
    );

    // 7.
    assert_eq!(store.load(&room("b"), None).await.expect("load").version, 0, "7: rooms are isolated");
    assert_eq!(store.client(&room("b"), "c1").await.expect("client"), None, "7: client records are per room");
}
