//! The [`PresenceStore`] conformance suite.

use super::{cut_hook, long_names, retry, tag, Cut, Failure, Step};
use crate::presence::{PresenceQuery, PresenceRecord, PresenceStore, PresenceStoreExt, StoreChange};
use crate::room::MAX_ROOM_NAME_LEN;
use std::future::Future;
use std::time::Duration;

const SUITE: &str = "presence_store";

fn sorted(mut records: Vec<PresenceRecord>) -> Vec<PresenceRecord> {
    records.sort_by(|a, b| (&a.room, a.node, a.connection).cmp(&(&b.room, b.node, b.connection)));
    records
}

/// Runs the [`PresenceStore`] conformance suite without the lost-connection
/// check and panics with the [`Failure`]. `a` and `b` must be two handles
/// on the same store (two nodes' connections); for an in-memory store,
/// clones of one. See [`PresenceStoreSuite`] for the checks.
///
/// ```no_run
/// # async fn run() {
/// let store = switchboard::presence::MemoryPresence::new();
/// switchboard::testing::presence_store(store.clone(), store).await;
/// # }
/// ```
pub async fn presence_store<S: PresenceStore + Clone>(a: S, b: S) {
    if let Err(failure) = PresenceStoreSuite::new(a, b).run().await {
        panic!("{failure}");
    }
}

/// The [`PresenceStore`] conformance suite. Checks, in order (the names are
/// [`PresenceStoreSuite::CHECKS`]):
///
/// 1. `presence_store.write_read`: a written record is listed by room and by
///    key, unchanged;
/// 2. `presence_store.two_handles`: what one handle wrote, the other lists;
/// 3. `presence_store.replace`: writing the same `(room, node, connection)`
///    again replaces the record (meta and key);
/// 4. `presence_store.isolation`: rooms and keys are isolated (also a room
///    or key that is a prefix of another), a key is listed across rooms,
///    the same connection id on two nodes is two records;
/// 5. `presence_store.remove`: removing deletes that record only (and
///    removing a missing record is fine);
/// 6. `presence_store.batch_order`: a batch is applied in order;
/// 7. `presence_store.names`: room names of up to [`MAX_ROOM_NAME_LEN`]
///    bytes of every allowed character, and keys of any UTF-8 (the crate
///    sets no length limit on user ids; the suite uses 512 bytes), are kept
///    apart exactly; node and connection ids up to `u64::MAX` come back
///    unchanged;
/// 8. `presence_store.concurrent_writes`: writes racing through two handles
///    to one room all land (no lost update);
/// 9. `presence_store.expiry`: a record expires `ttl` after its last write
///    (by room and by key), and only then;
/// 10. `presence_store.lost_connection` (with
///     [`cut_connection`](Self::cut_connection)): after the cut, writes and
///     lists work again within [`WAIT`](super::WAIT), and records from
///     before the cut are still listed.
///
/// `presence_store.expiry` waits on tokio's clock (about 1.5 s of it): run
/// the suite in a test with paused time for an in-memory store, or in real
/// time for a networked one.
#[derive(Clone)]
pub struct PresenceStoreSuite<S> {
    a: S,
    b: S,
    cut: Option<Cut>,
}

impl<S> std::fmt::Debug for PresenceStoreSuite<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PresenceStoreSuite").field("cut_connection", &self.cut.is_some()).finish_non_exhaustive()
    }
}

impl<S: PresenceStore + Clone> PresenceStoreSuite<S> {
    /// Every check, in the order they run.
    pub const CHECKS: &'static [&'static str] = &[
        "presence_store.write_read",
        "presence_store.two_handles",
        "presence_store.replace",
        "presence_store.isolation",
        "presence_store.remove",
        "presence_store.batch_order",
        "presence_store.names",
        "presence_store.concurrent_writes",
        "presence_store.expiry",
        "presence_store.lost_connection",
    ];

    /// The suite on two handles `a` and `b` of the same store.
    pub fn new(a: S, b: S) -> Self {
        PresenceStoreSuite { a, b, cut: None }
    }

    /// A hook that cuts both handles' connections to the store (the store
    /// keeps its data; the handles must reconnect by themselves). Enables
    /// `presence_store.lost_connection`.
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
        let tag = tag("conf");
        let room = |name: &str| format!("{tag}.{name}");
        let key = |name: &str| format!("{tag}-{name}");
        let (store, other) = (&self.a, &self.b);
        let long = Duration::from_secs(60);
        let meta = |v: u64| {
            let mut m = crate::presence::Map::new();
            m.insert("v".into(), v.into());
            m.insert("nested".into(), serde_json::json!({"a": [1, "two", null, true, "\u{e9}\"'"]}));
            m
        };
        let rec = |r: &str, k: &str, node: u64, conn: u64, v: u64| {
            PresenceRecord::new(room(r), key(k), node, conn).with_joined_at(1_700_000_000_000 + v).with_meta(meta(v))
        };

        // 1. Write and read back.
        let check = "presence_store.write_read";
        let a = rec("one", "alice", 1, 1, 1);
        store.put(a.clone(), long).await.step(SUITE, check, "write")?;
        let got = store.list_room(&room("one")).await.step(SUITE, check, "list")?;
        ensure!(got == vec![a.clone()], check, "listed by room: {got:?}");
        let got = store.list_key(&key("alice")).await.step(SUITE, check, "list")?;
        ensure!(got == vec![a.clone()], check, "listed by key: {got:?}");

        // 2. The other handle sees it.
        let check = "presence_store.two_handles";
        let got = other.list_room(&room("one")).await.step(SUITE, check, "list")?;
        ensure!(got == vec![a.clone()], check, "the other handle lists the room as {got:?}");
        let got = other.list_key(&key("alice")).await.step(SUITE, check, "list")?;
        ensure!(got == vec![a.clone()], check, "the other handle lists the key as {got:?}");

        // 3. Replace.
        let check = "presence_store.replace";
        let a2 = rec("one", "alice", 1, 1, 2);
        other.put(a2.clone(), long).await.step(SUITE, check, "write")?;
        let got = store.list_room(&room("one")).await.step(SUITE, check, "list")?;
        ensure!(got == vec![a2.clone()], check, "after a rewrite the room lists {got:?}");
        let renamed = rec("one", "renamed", 1, 1, 2);
        store.put(renamed.clone(), long).await.step(SUITE, check, "write")?;
        let got = store.list_key(&key("alice")).await.step(SUITE, check, "list")?;
        ensure!(got.is_empty(), check, "a record rewritten with another key is still listed by its old key");
        store.put(a2.clone(), long).await.step(SUITE, check, "write")?;
        let got = store.list_key(&key("renamed")).await.step(SUITE, check, "list")?;
        ensure!(got.is_empty(), check, "a record rewritten with another key is still listed by its old key");

        // 4. Isolation; a key across rooms; same connection id on two nodes.
        let check = "presence_store.isolation";
        let b = rec("one", "bob", 2, 1, 3);
        let a_two = rec("two", "alice", 1, 2, 4);
        let prefixed = rec("one:x", "alice:x", 1, 3, 5);
        let changes =
            vec![StoreChange::Put(b.clone()), StoreChange::Put(a_two.clone()), StoreChange::Put(prefixed.clone())];
        store.write(changes, long).await.step(SUITE, check, "write")?;
        let got = sorted(store.list_room(&room("one")).await.step(SUITE, check, "list")?);
        ensure!(got == vec![a2.clone(), b.clone()], check, "room `one` lists {got:?}");
        let got = store.list_room(&room("two")).await.step(SUITE, check, "list")?;
        ensure!(got == vec![a_two.clone()], check, "room `two` lists {got:?}");
        let got = sorted(store.list(PresenceQuery::Key(key("alice"))).await.step(SUITE, check, "list")?);
        ensure!(got == vec![a2.clone(), a_two.clone()], check, "key `alice` across rooms lists {got:?}");
        let got = store.list_room(&room("none")).await.step(SUITE, check, "list")?;
        ensure!(got.is_empty(), check, "an unknown room lists {got:?}");

        // 5. Remove.
        let check = "presence_store.remove";
        store.remove(&room("one"), 1, 1).await.step(SUITE, check, "remove")?;
        store.remove(&room("one"), 9, 9).await.step(SUITE, check, "removing a missing record")?;
        let got = store.list_room(&room("one")).await.step(SUITE, check, "list")?;
        ensure!(got == vec![b.clone()], check, "after removing node 1's connection 1 the room lists {got:?}");
        let got = store.list_key(&key("alice")).await.step(SUITE, check, "list")?;
        ensure!(got == vec![a_two.clone()], check, "after the remove the key lists {got:?}");

        // 6. Order within a batch.
        let check = "presence_store.batch_order";
        let c = rec("three", "carol", 3, 1, 5);
        let gone = StoreChange::Remove { room: room("three"), node: 3, connection: 1 };
        store.write(vec![StoreChange::Put(c.clone()), gone.clone()], long).await.step(SUITE, check, "write")?;
        let got = store.list_room(&room("three")).await.step(SUITE, check, "list")?;
        ensure!(got.is_empty(), check, "put then remove in one batch left {got:?}");
        store.write(vec![gone, StoreChange::Put(c.clone())], long).await.step(SUITE, check, "write")?;
        let got = store.list_room(&room("three")).await.step(SUITE, check, "list")?;
        ensure!(got == vec![c.clone()], check, "remove then put in one batch left {got:?}");

        // 7. Long room names, every character; keys of any UTF-8.
        let check = "presence_store.names";
        let rooms = long_names(&format!("{tag}:"), MAX_ROOM_NAME_LEN);
        let mut keys = long_names(&format!("{tag}~"), 512);
        keys.extend(["*", "%", "_", "?", " ", "\u{e9}", "\u{1f600}", "[a]", "\\"].map(|k| format!("{tag}~{k}")));
        let mut written = Vec::new();
        for (i, r) in rooms.iter().enumerate() {
            written.push(PresenceRecord::new(r.clone(), key("names"), 5, i as u64));
        }
        for (i, k) in keys.iter().enumerate() {
            written.push(PresenceRecord::new(room("names"), k.clone(), 6, i as u64));
        }
        // Node ids are random u64s, half of them above i64::MAX.
        written.push(PresenceRecord::new(room("ids"), key("ids"), u64::MAX, u64::MAX - 1));
        let changes = written.iter().cloned().map(StoreChange::Put).collect();
        store.write(changes, long).await.step(SUITE, check, "write")?;
        for r in written.iter().take(rooms.len()) {
            let got = other.list_room(&r.room).await.step(SUITE, check, "list")?;
            ensure!(got == vec![r.clone()], check, "room {:?} ({} bytes) lists {got:?}", r.room, r.room.len());
        }
        for r in written.iter().skip(rooms.len()) {
            let got = other.list_key(&r.key).await.step(SUITE, check, "list")?;
            ensure!(got == vec![r.clone()], check, "key {:?} ({} bytes) lists {got:?}", r.key, r.key.len());
        }
        let removes = written.iter().map(|r| StoreChange::Remove {
            room: r.room.clone(),
            node: r.node,
            connection: r.connection,
        });
        store.write(removes.collect(), long).await.step(SUITE, check, "write")?;

        // 8. Writes racing through two handles.
        let check = "presence_store.concurrent_writes";
        let tasks: Vec<_> = (0..40u64)
            .map(|i| {
                let handle = if i % 2 == 0 { store.clone() } else { other.clone() };
                let r = rec("race", &format!("k{i}"), 7, i, i);
                tokio::spawn(async move { handle.put(r, long).await })
            })
            .collect();
        for t in tasks {
            t.await.expect("a write task panicked").step(SUITE, check, "write")?;
        }
        let got = store.list_room(&room("race")).await.step(SUITE, check, "list")?;
        ensure!(got.len() == 40, check, "40 records written concurrently through two handles, {} listed", got.len());
        let removes = (0..40).map(|i| StoreChange::Remove { room: room("race"), node: 7, connection: i });
        store.write(removes.collect(), long).await.step(SUITE, check, "write")?;

        // 9. Expiry: `d` is rewritten before its ttl and lives on; `e` is not.
        let check = "presence_store.expiry";
        let ttl = Duration::from_millis(800);
        let d = rec("four", "dave", 4, 1, 6);
        let e = rec("four", "erin", 4, 2, 7);
        store
            .write(vec![StoreChange::Put(d.clone()), StoreChange::Put(e.clone())], ttl)
            .await
            .step(SUITE, check, "write")?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        store.put(d.clone(), ttl).await.step(SUITE, check, "rewrite")?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let got = store.list_room(&room("four")).await.step(SUITE, check, "list")?;
        ensure!(
            got == vec![d.clone()],
            check,
            "after 1 s the record rewritten at 0.5 s must live and the other (ttl 0.8 s) must have expired; listed {got:?}"
        );
        let got = store.list_key(&key("erin")).await.step(SUITE, check, "list")?;
        ensure!(got.is_empty(), check, "an expired record is still listed by key");
        tokio::time::sleep(Duration::from_millis(500)).await;
        let got = store.list_room(&room("four")).await.step(SUITE, check, "list")?;
        ensure!(got.is_empty(), check, "a record never expired: {got:?}");

        // 10. A lost connection.
        if let Some(cut) = &self.cut {
            let check = "presence_store.lost_connection";
            let f = rec("five", "fred", 8, 1, 8);
            store.put(f.clone(), long).await.step(SUITE, check, "write")?;
            cut().await;
            let g = rec("five", "gina", 8, 2, 9);
            retry(SUITE, check, "write", || store.put(g.clone(), long)).await?;
            let got = sorted(retry(SUITE, check, "list", || other.list_room(&room("five"))).await?);
            ensure!(got == vec![f.clone(), g.clone()], check, "after the cut the room lists {got:?}");
            let gone =
                [(8, 1), (8, 2)].map(|(node, connection)| StoreChange::Remove { room: room("five"), node, connection });
            retry(SUITE, check, "write", || store.write(gone.to_vec(), long)).await?;
        }

        // Clean up what is left.
        let left = [(room("one"), 2, 1), (room("two"), 1, 2), (room("three"), 3, 1), (room("one:x"), 1, 3)];
        let changes =
            left.into_iter().map(|(room, node, connection)| StoreChange::Remove { room, node, connection }).collect();
        store.write(changes, long).await.step(SUITE, "presence_store.remove", "clean up")?;
        Ok(())
    }
}
