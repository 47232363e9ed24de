//! What presence puts on the wire: the `data` of `presence_state` and
//! `presence_diff` for clients, the `data` of a client's `presence`
//! request, and the batches nodes exchange on `$presence:<room>` topics.

use super::engine::Meta;
use super::Map;
use serde::ser::{SerializeMap, Serializer};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// `{"keys": n, "connections": m}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub(super) struct Count {
    pub keys: usize,
    pub connections: usize,
}

/// One meta as clients see it: `{"ref", "joined_at", "meta", "ephemeral"}`.
pub(super) struct WireMeta<'a>(pub &'a Meta);

impl Serialize for WireMeta<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let m = self.0;
        let mut map = s.serialize_map(Some(4))?;
        map.serialize_entry("ref", &*m.conn_ref)?;
        map.serialize_entry("joined_at", &m.joined_at)?;
        map.serialize_entry("meta", &m.meta)?;
        map.serialize_entry("ephemeral", &Ephemeral(m))?;
        map.end()
    }
}

/// The ephemeral flags' values, without their deadlines.
struct Ephemeral<'a>(&'a Meta);

impl Serialize for Ephemeral<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.0.ephemeral.len()))?;
        for (k, (v, _)) in &self.0.ephemeral {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

/// `{"metas": [...]}` for one key.
pub(super) struct KeyMetas<'a>(pub Vec<&'a Meta>);

impl Serialize for KeyMetas<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        struct Metas<'a>(&'a [&'a Meta]);
        impl Serialize for Metas<'_> {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_seq(self.0.iter().map(|m| WireMeta(m)))
            }
        }
        let mut map = s.serialize_map(Some(1))?;
        map.serialize_entry("metas", &Metas(&self.0))?;
        map.end()
    }
}

/// Metas grouped by key, keys sorted, each key's metas oldest first.
pub(super) type Presences<'a> = BTreeMap<&'a str, KeyMetas<'a>>;

pub(super) fn group<'a>(metas: impl Iterator<Item = &'a Meta>) -> Presences<'a> {
    let mut out: Presences<'a> = BTreeMap::new();
    for m in metas {
        out.entry(&m.key).or_insert_with(|| KeyMetas(Vec::new())).0.push(m);
    }
    for v in out.values_mut() {
        v.0.sort_by(|a, b| (a.joined_at, &a.conn_ref).cmp(&(b.joined_at, &b.conn_ref)));
    }
    out
}

/// `data` of `presence_state`: the count, and the members unless the room
/// is in counts-only mode.
#[derive(Serialize)]
pub(super) struct StateData<'a> {
    pub count: Count,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub presences: Option<Presences<'a>>,
}

/// `data` of `presence_diff`: the count, and (unless counts-only) joins and
/// leaves, and the metas whose ephemeral flags alone changed.
#[derive(Serialize)]
pub(super) struct DiffData<'a> {
    pub count: Count,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub joins: Option<Presences<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub leaves: Option<Presences<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ephemeral: Option<FlagChanges<'a>>,
}

/// `ephemeral` of a `presence_diff`: key → ref → the flags that changed
/// (`null`: gone), for metas whose `meta` and `joined_at` did not change.
/// A typing toggle costs its flag, not the whole meta.
pub(super) type FlagChanges<'a> = BTreeMap<&'a str, BTreeMap<&'a str, Map>>;

/// Whether `before` and `after` differ in their ephemeral flags only.
pub(super) fn flags_only(before: &Meta, after: &Meta) -> bool {
    before.key == after.key && before.joined_at == after.joined_at && before.meta == after.meta
}

/// The flags of `after` that differ from `before`'s, and `null` for those
/// `before` had and `after` has not.
pub(super) fn flag_changes(before: &Meta, after: &Meta) -> Map {
    let mut out = Map::new();
    for (k, (v, _)) in &after.ephemeral {
        if before.ephemeral.get(k).map(|(b, _)| b) != Some(v) {
            out.insert(k.clone(), v.clone());
        }
    }
    for k in before.ephemeral.keys() {
        if !after.ephemeral.contains_key(k) {
            out.insert(k.clone(), serde_json::Value::Null);
        }
    }
    out
}

/// Bytes one meta adds to a member list in JSON: its object, its key and
/// the key's `{"metas":[…]}` (counted for every meta, so an upper bound).
pub(super) fn list_size(meta: &Meta) -> usize {
    struct Counter(usize);
    impl std::io::Write for Counter {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut n = Counter(0);
    // Writing to a counter fails only if the meta does not serialize, and
    // then it is never sent either.
    let _ = serde_json::to_writer(&mut n, &WireMeta(meta));
    let _ = serde_json::to_writer(&mut n, &*meta.key);
    // `:{"metas":[` `]}` and two commas.
    n.0 + 16
}

/// `data` of a client's `presence` request.
#[derive(Deserialize)]
pub(super) struct UpdateRequest {
    /// Replaces the client part of the connection's meta.
    #[serde(default)]
    pub meta: Option<Map>,
    /// Sets (or, with `null`, clears) ephemeral flags.
    #[serde(default)]
    pub ephemeral: Option<Map>,
}

/// `data` of the reply to a `presence` request.
#[derive(Serialize)]
pub(super) struct UpdateReply<'a> {
    pub room: &'a str,
    #[serde(rename = "ref")]
    pub conn_ref: &'a str,
}

/// Layout version of [`NodeBatch`].
pub(super) const BATCH_VERSION: u8 = 1;

/// What a node publishes on `$presence:<room>`: the latest state of some of
/// its own metas in the room (JSON).
///
/// ```text
/// {"v":1,"node":1234,"changes":[
///   {"conn":7,"entry":{"key":"alice","joined_at":1700000000000,"meta":{},"ephemeral":{"typing":[true,4950]}}},
///   {"conn":8}                                    # no entry: gone
/// ]}
/// ```
/// Ephemeral flags carry their remaining lifetime in ms, so every node
/// expires them on its own clock.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct NodeBatch {
    pub v: u8,
    pub node: u64,
    pub changes: Vec<WireChange>,
}

#[derive(Debug, Serialize, Deserialize)]
pub(super) struct WireChange {
    pub conn: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entry: Option<WireEntry>,
}

#[derive(Debug, Serialize, Deserialize)]
pub(super) struct WireEntry {
    pub key: String,
    pub joined_at: u64,
    pub meta: Map,
    #[serde(default)]
    pub ephemeral: BTreeMap<String, (serde_json::Value, u64)>,
}

impl NodeBatch {
    pub(super) fn encode(&self) -> bytes::Bytes {
        serde_json::to_vec(self).map(bytes::Bytes::from).unwrap_or_default()
    }

    pub(super) fn decode(bytes: &[u8]) -> Option<NodeBatch> {
        let batch: NodeBatch = serde_json::from_slice(bytes).ok()?;
        (batch.v == BATCH_VERSION).then_some(batch)
    }
}

/// The backplane topic of a room's presence (room names never contain `$`).
pub(super) fn topic(room: &str) -> String {
    format!("$presence:{room}")
}
