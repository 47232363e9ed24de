//! In-process presence store.

use super::{PresenceQuery, PresenceRecord, PresenceStore, StoreChange};
use crate::error::Result;
use futures::future::BoxFuture;
use parking_lot::Mutex;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// A [`PresenceStore`] in memory.
///
/// A hub with presence and no store of its own gets a private one. Give
/// several hubs in one process clones of the same `MemoryPresence` (and of
/// the same [`MemoryBackplane`](crate::backplane::MemoryBackplane)) and they share
/// presence as separate nodes would.
///
/// Expiry runs on tokio's clock, so tests with paused time control it.
/// Expired records are removed for good on every `write` and `list` (an
/// index ordered by expiry makes that cost proportional to what expired),
/// so nothing accumulates. All the work happens under one mutex, held only
/// for in-memory work.
#[derive(Clone, Debug, Default)]
pub struct MemoryPresence {
    inner: Arc<Mutex<State>>,
}

type Id = (String, u64, u64);

#[derive(Debug, Default)]
struct State {
    records: HashMap<Id, (PresenceRecord, Instant)>,
    by_room: HashMap<String, HashSet<(u64, u64)>>,
    by_key: HashMap<String, HashSet<Id>>,
    expiry: BTreeSet<(Instant, Id)>,
}

impl State {
    fn remove(&mut self, id: &Id) {
        let Some((record, deadline)) = self.records.remove(id) else { return };
        self.expiry.remove(&(deadline, id.clone()));
        if let Some(set) = self.by_room.get_mut(&id.0) {
            set.remove(&(id.1, id.2));
            if set.is_empty() {
                self.by_room.remove(&id.0);
            }
        }
        if let Some(set) = self.by_key.get_mut(&record.key) {
            set.remove(id);
            if set.is_empty() {
                self.by_key.remove(&record.key);
            }
        }
    }

    fn put(&mut self, record: PresenceRecord, deadline: Instant) {
        let id: Id = (record.room.clone(), record.node, record.connection);
        self.remove(&id);
        self.by_room.entry(id.0.clone()).or_default().insert((id.1, id.2));
        self.by_key.entry(record.key.clone()).or_default().insert(id.clone());
        self.expiry.insert((deadline, id.clone()));
        self.records.insert(id, (record, deadline));
    }

    fn purge(&mut self, now: Instant) {
        while let Some((deadline, _)) = self.expiry.first() {
            if *deadline > now {
                break;
            }
            let (_, id) = self.expiry.pop_first().expect("checked above");
            self.remove(&id);
        }
    }
}

impl MemoryPresence {
    /// An empty store.
    pub fn new() -> MemoryPresence {
        MemoryPresence::default()
    }

    /// Records that have not expired.
    pub fn len(&self) -> usize {
        let mut st = self.inner.lock();
        st.purge(Instant::now());
        st.records.len()
    }

    /// Whether no record is live.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl PresenceStore for MemoryPresence {
    fn write(&self, changes: Vec<StoreChange>, ttl: Duration) -> BoxFuture<'static, Result<()>> {
        let now = Instant::now();
        // At most a year ahead: `Instant` addition panics on overflow.
        let deadline = now + ttl.min(Duration::from_secs(365 * 24 * 3600));
        let mut st = self.inner.lock();
        st.purge(now);
        for change in changes {
            match change {
                StoreChange::Put(record) => st.put(record, deadline),
                StoreChange::Remove { room, node, connection } => st.remove(&(room, node, connection)),
            }
        }
        drop(st);
        Box::pin(async { Ok(()) })
    }

    fn list(&self, query: PresenceQuery) -> BoxFuture<'static, Result<Vec<PresenceRecord>>> {
        let mut st = self.inner.lock();
        st.purge(Instant::now());
        let out: Vec<PresenceRecord> = match &query {
            PresenceQuery::Room(room) => st
                .by_room
                .get(room)
                .into_iter()
                .flatten()
                .filter_map(|(node, conn)| st.records.get(&(room.clone(), *node, *conn)).map(|r| r.0.clone()))
                .collect(),
            PresenceQuery::Key(key) => st
                .by_key
                .get(key)
                .into_iter()
                .flatten()
                .filter_map(|id| st.records.get(id).map(|r| r.0.clone()))
                .collect(),
        };
        drop(st);
        Box::pin(async move { Ok(out) })
    }
}

#[cfg(test)]
mod tests {
    use super::super::PresenceStoreExt;
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn expiry_and_indexes() {
        let store = MemoryPresence::new();
        let ttl = Duration::from_secs(3);
        store.put(PresenceRecord::new("r", "alice", 1, 1), ttl).await.unwrap();
        store.put(PresenceRecord::new("r", "alice", 1, 2), ttl).await.unwrap();
        store.put(PresenceRecord::new("s", "alice", 2, 1), Duration::from_secs(10)).await.unwrap();
        assert_eq!(store.list_room("r").await.unwrap().len(), 2);
        assert_eq!(store.list_key("alice").await.unwrap().len(), 3);
        tokio::time::advance(Duration::from_secs(2)).await;
        // Rewriting extends the first one only.
        store.put(PresenceRecord::new("r", "alice", 1, 1), ttl).await.unwrap();
        tokio::time::advance(Duration::from_secs(2)).await;
        let left: Vec<u64> = store.list_room("r").await.unwrap().iter().map(|r| r.connection).collect();
        assert_eq!(left, vec![1]);
        store.remove("r", 1, 1).await.unwrap();
        assert_eq!(store.len(), 1);
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(store.is_empty());
        let st = store.inner.lock();
        assert!(st.by_room.is_empty() && st.by_key.is_empty() && st.expiry.is_empty());
    }
}
