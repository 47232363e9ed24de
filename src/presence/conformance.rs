//! The [`PresenceStore`] conformance suite (feature `testing`), re-exported
//! as `switchboard::testing::presence_store`.

use super::{PresenceQuery, PresenceRecord, PresenceStore, PresenceStoreExt, StoreChange};
use std::time::Duration;

fn sorted(mut records: Vec<PresenceRecord>) -> Vec<PresenceRecord> {
    records.sort_by(|a, b| (&a.room, a.node, a.connection).cmp(&(&b.room, b.node, b.connection)));
    records
}

/// Runs the [`PresenceStore`] conformance suite against `store`. Checks, in
/// order:
///
/// 1. a written record is listed by room and by key, unchanged;
/// 2. writing the same `(room, node, connection)` again replaces it;
/// 3. rooms and keys are isolated; a key is listed across rooms;
/// 4. removing deletes (and removing a missing record is fine);
/// 5. a batch is applied in order;
/// 6. a record expires `ttl` after its last write, and only then.
///
/// Step 6 waits on tokio's clock (about 1.5 s of it): run the suite in a
/// test with paused time for an in-memory store, or in real time for a
/// networked one. Rooms and keys are prefixed with a random tag, so the
/// suite can run against a shared store. It panics with a message naming
/// the broken rule.
///
/// ```no_run
/// # async fn run() {
/// switchboard::testing::presence_store(switchboard::MemoryPresence::new()).await;
/// # }
/// ```
pub async fn presence_store<S: PresenceStore>(store: S) {
    let tag = format!("conf{:x}", std::process::id() as u64 ^ crate::util::random_u64());
    let room = |name: &str| format!("{tag}.{name}");
    let key = |name: &str| format!("{tag}-{name}");
    let long = Duration::from_secs(60);
    let meta = |v: u64| {
        let mut m = super::Map::new();
        m.insert("v".into(), v.into());
        m.insert("nested".into(), serde_json::json!({"a": [1, "two", null, true]}));
        m
    };
    let rec = |r: &str, k: &str, node: u64, conn: u64, v: u64| {
        PresenceRecord::new(room(r), key(k), node, conn).with_joined_at(1_700_000_000_000 + v).with_meta(meta(v))
    };

    // 1. Write and read back.
    let a = rec("one", "alice", 1, 1, 1);
    store.put(a.clone(), long).await.expect("1. write");
    assert_eq!(store.list_room(&room("one")).await.expect("1. list"), vec![a.clone()], "1. by room");
    assert_eq!(store.list_key(&key("alice")).await.expect("1. list"), vec![a.clone()], "1. by key");

    // 2. Replace.
    let a2 = rec("one", "alice", 1, 1, 2);
    store.put(a2.clone(), long).await.expect("2. write");
    assert_eq!(store.list_room(&room("one")).await.expect("2. list"), vec![a2.clone()], "2. not replaced");

    // 3. Isolation; a key across rooms; same connection id on two nodes.
    let b = rec("one", "bob", 2, 1, 3);
    let a_two = rec("two", "alice", 1, 2, 4);
    store.write(vec![StoreChange::Put(b.clone()), StoreChange::Put(a_two.clone())], long).await.expect("3. write");
    assert_eq!(
        sorted(store.list_room(&room("one")).await.expect("3. list")),
        vec![a2.clone(), b.clone()],
        "3. room `one`"
    );
    assert_eq!(store.list_room(&room("two")).await.expect("3. list"), vec![a_two.clone()], "3. room `two`");
    assert_eq!(
        sorted(store.list(PresenceQuery::Key(key("alice"))).await.expect("3. list")),
        vec![a2.clone(), a_two.clone()],
        "3. key across rooms"
    );
    assert!(store.list_room(&room("none")).await.expect("3. list").is_empty(), "3. unknown room");

    // 4. Remove.
    store.remove(&room("one"), 1, 1).await.expect("4. remove");
    store.remove(&room("one"), 9, 9).await.expect("4. removing a missing record must succeed");
    assert_eq!(store.list_room(&room("one")).await.expect("4. list"), vec![b.clone()], "4. not removed");
    assert_eq!(store.list_key(&key("alice")).await.expect("4. list"), vec![a_two.clone()], "4. key index");

    // 5. Order within a batch.
    let c = rec("three", "carol", 3, 1, 5);
    let gone = StoreChange::Remove { room: room("three"), node: 3, connection: 1 };
    store.write(vec![StoreChange::Put(c.clone()), gone.clone()], long).await.expect("5. write");
    assert!(store.list_room(&room("three")).await.expect("5. list").is_empty(), "5. put then remove");
    store.write(vec![gone, StoreChange::Put(c.clone())], long).await.expect("5. write");
    assert_eq!(store.list_room(&room("three")).await.expect("5. list"), vec![c.clone()], "5. remove then put");

    // 6. Expiry: `d` is rewritten before its ttl and lives on; `e` is not.
    let ttl = Duration::from_millis(800);
    let d = rec("four", "dave", 4, 1, 6);
    let e = rec("four", "erin", 4, 2, 7);
    store.write(vec![StoreChange::Put(d.clone()), StoreChange::Put(e.clone())], ttl).await.expect("6. write");
    tokio::time::sleep(Duration::from_millis(500)).await;
    store.put(d.clone(), ttl).await.expect("6. rewrite");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        store.list_room(&room("four")).await.expect("6. list"),
        vec![d.clone()],
        "6. after 1 s: the record rewritten at 0.5 s must live, the other (ttl 0.8 s) must have expired"
    );
    assert!(store.list_key(&key("erin")).await.expect("6. list").is_empty(), "6. expired record still listed by key");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(store.list_room(&room("four")).await.expect("6. list").is_empty(), "6. rewritten record never expired");

    // Clean up what is left.
    let left = [(room("one"), 2, 1), (room("two"), 1, 2), (room("three"), 3, 1)];
    let changes =
        left.into_iter().map(|(room, node, connection)| StoreChange::Remove { room, node, connection }).collect();
    store.write(changes, long).await.expect("clean up");
}
