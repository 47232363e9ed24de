//! A room's presence as the client sees it: `presence_state` replaces it,
//! `presence_diff` updates it (`docs/protocol.md` §3.11).

use crate::protocol::Payload;
use serde::Deserialize;
use serde_json::{Map, Value};
use std::collections::BTreeMap;

/// One connection's presence in a room.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[non_exhaustive]
pub struct PresenceMeta {
    /// The connection: `<node>.<connection_id>`.
    #[serde(rename = "ref")]
    pub reference: String,
    /// When the connection's presence started, Unix ms.
    #[serde(default)]
    pub joined_at: u64,
    /// The host's part merged with the client's part.
    #[serde(default)]
    pub meta: Map<String, Value>,
    /// Short-lived flags (`typing`, …).
    #[serde(default)]
    pub ephemeral: Map<String, Value>,
}

/// Keys and connections of a whole room, on every node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[non_exhaustive]
pub struct PresenceCount {
    /// Presence keys (users).
    #[serde(default)]
    pub keys: u64,
    /// Metas (connections).
    #[serde(default)]
    pub connections: u64,
}

/// The live presence of one room: members by presence key, each with one
/// meta per connection (oldest first), and the room's counts.
///
/// Read it through the `watch` of [`Room::presence`](super::Room::presence);
/// every applied state or diff notifies it. Its size is the server's: a
/// room over the server's member-list threshold (default 100 keys) sends
/// counts only, and then [`members`](PresenceView::members) stays empty.
#[derive(Debug, Clone, PartialEq, Default)]
#[non_exhaustive]
pub struct PresenceView {
    /// Members by key, each with its metas.
    pub members: BTreeMap<String, Vec<PresenceMeta>>,
    /// The room's counts, as the server last sent them.
    pub count: PresenceCount,
    /// The server sends counts only for this room (too many members).
    pub counts_only: bool,
    /// Whether a `presence_state` arrived since the last (re)join: until
    /// then the view is empty because it is unknown, not because the room is.
    pub synced: bool,
}

impl PresenceView {
    /// The keys present, sorted.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.members.keys().map(String::as_str)
    }

    /// Whether `key` is present.
    pub fn contains(&self, key: &str) -> bool {
        self.members.contains_key(key)
    }
}

#[derive(Deserialize)]
struct Entry {
    #[serde(default)]
    metas: Vec<PresenceMeta>,
}

#[derive(Deserialize)]
struct StateData {
    #[serde(default)]
    count: PresenceCount,
    presences: Option<BTreeMap<String, Entry>>,
}

#[derive(Deserialize)]
struct DiffData {
    #[serde(default)]
    count: Option<PresenceCount>,
    joins: Option<BTreeMap<String, Entry>>,
    leaves: Option<BTreeMap<String, Entry>>,
    /// key → ref → changed flags (`null`: gone).
    ephemeral: Option<BTreeMap<String, FlagsByRef>>,
}

/// One key's flag changes in a diff: ref → flags.
type FlagsByRef = BTreeMap<String, Map<String, Value>>;

/// Replaces `view` with a `presence_state`. An undecodable payload is an
/// error and leaves the view as it was.
pub(crate) fn apply_state(view: &mut PresenceView, data: &Payload) -> Result<(), String> {
    let state: StateData = data.decode().map_err(|e| e.to_string())?;
    view.members.clear();
    view.count = state.count;
    view.counts_only = state.presences.is_none();
    view.synced = true;
    for (key, entry) in state.presences.into_iter().flatten() {
        for meta in entry.metas {
            upsert(view, &key, meta);
        }
    }
    Ok(())
}

/// Applies a `presence_diff`: joins (add or replace by `ref`), then leaves,
/// then the flag changes of `ephemeral` (set, or remove on `null`; a `ref`
/// the view does not have is skipped), then the count. Repeating what the
/// view already has is not an error.
pub(crate) fn apply_diff(view: &mut PresenceView, data: &Payload) -> Result<(), String> {
    let diff: DiffData = data.decode().map_err(|e| e.to_string())?;
    for (key, entry) in diff.joins.into_iter().flatten() {
        for meta in entry.metas {
            upsert(view, &key, meta);
        }
    }
    for (key, entry) in diff.leaves.into_iter().flatten() {
        if let Some(metas) = view.members.get_mut(&key) {
            for meta in entry.metas {
                metas.retain(|m| m.reference != meta.reference);
            }
            if metas.is_empty() {
                view.members.remove(&key);
            }
        }
    }
    for (key, refs) in diff.ephemeral.into_iter().flatten() {
        let Some(metas) = view.members.get_mut(&key) else { continue };
        for (reference, flags) in refs {
            let Some(meta) = metas.iter_mut().find(|m| m.reference == reference) else { continue };
            for (flag, value) in flags {
                if value.is_null() {
                    meta.ephemeral.remove(&flag);
                } else {
                    meta.ephemeral.insert(flag, value);
                }
            }
        }
    }
    if let Some(count) = diff.count {
        view.count = count;
    }
    Ok(())
}

fn upsert(view: &mut PresenceView, key: &str, meta: PresenceMeta) {
    let metas = view.members.entry(key.to_owned()).or_default();
    match metas.iter_mut().find(|m| m.reference == meta.reference) {
        Some(m) => *m = meta,
        None => {
            metas.push(meta);
            metas.sort_by_key(|m| m.joined_at);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Format;
    use serde_json::json;

    fn p(v: Value) -> Payload {
        Payload::encode(Format::Json, &v).unwrap()
    }

    fn meta(r: &str, at: u64) -> Value {
        json!({"ref": r, "joined_at": at, "meta": {}, "ephemeral": {}})
    }

    #[test]
    fn state_then_diffs() {
        let mut v = PresenceView::default();
        apply_state(
            &mut v,
            &p(json!({"count": {"keys": 2, "connections": 2}, "presences": {
                "ann": {"metas": [meta("n.1", 5)]}, "bob": {"metas": [meta("n.2", 1)]}}})),
        )
        .unwrap();
        assert!(v.synced && v.contains("ann") && v.contains("bob"));
        apply_diff(
            &mut v,
            &p(json!({"count": {"keys": 2, "connections": 3}, "joins": {"bob": {"metas": [meta("m.4", 9)]}}, "leaves": {}})),
        )
        .unwrap();
        assert_eq!(v.members["bob"].len(), 2);
        // A repeated join replaces by ref; a leave of an unknown ref is fine.
        apply_diff(
            &mut v,
            &p(json!({"count": {"keys": 1, "connections": 2},
                "joins": {"bob": {"metas": [{"ref": "m.4", "joined_at": 9, "meta": {}, "ephemeral": {"typing": true}}]}},
                "leaves": {"ann": {"metas": [meta("n.1", 5)]}, "zed": {"metas": [meta("z.1", 1)]}}})),
        )
        .unwrap();
        assert!(!v.contains("ann"));
        assert_eq!(v.members["bob"][1].ephemeral["typing"], json!(true));
        assert_eq!(v.count, PresenceCount { keys: 1, connections: 2 });
        // Flag changes only: the meta stays, one flag set, one cleared;
        // unknown keys and refs are skipped.
        apply_diff(
            &mut v,
            &p(json!({"count": {"keys": 1, "connections": 2}, "joins": {}, "leaves": {},
                "ephemeral": {"bob": {"m.4": {"typing": null, "cursor": 7}, "m.9": {"typing": true}},
                              "zed": {"z.1": {"typing": true}}}})),
        )
        .unwrap();
        assert_eq!(v.members["bob"][1].ephemeral, json!({"cursor": 7}).as_object().unwrap().clone());
        assert_eq!(v.members["bob"][1].joined_at, 9);
        assert!(!v.contains("zed") && v.members["bob"].len() == 2);
        // Counts only.
        apply_state(&mut v, &p(json!({"count": {"keys": 101, "connections": 117}}))).unwrap();
        assert!(v.counts_only && v.members.is_empty());
        assert!(apply_diff(&mut v, &p(json!([1, 2]))).is_err());
    }
}
