//! [`JsonDoc`]: a ready reducer over a plain JSON document, with per-path
//! ops ([`JsonOp`]).

use super::{Context, Reducer, Reject};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// One step of a path into a JSON document: an object key or an array index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Seg {
    /// An array index.
    Index(usize),
    /// An object key.
    Key(String),
}

impl From<&str> for Seg {
    fn from(k: &str) -> Seg {
        Seg::Key(k.to_owned())
    }
}

impl From<String> for Seg {
    fn from(k: String) -> Seg {
        Seg::Key(k)
    }
}

impl From<usize> for Seg {
    fn from(i: usize) -> Seg {
        Seg::Index(i)
    }
}

/// A path: keys and indexes from the document's root, e.g.
/// `["items", "a1", "done"]` or `["order", 0]`. On the wire a JSON array of
/// strings and non-negative integers.
pub type Path = Vec<Seg>;

/// An op of [`JsonDoc`]. On the wire an object tagged by `type`:
///
/// ```json
/// {"type":"set","path":["items","a1"],"value":{"text":"milk","done":false}}
/// {"type":"delete","path":["items","a1"]}
/// {"type":"insert","path":["order"],"index":0,"value":"a1"}
/// {"type":"remove","path":["order"],"index":2}
/// {"type":"move","path":["order"],"from":2,"to":0}
/// {"type":"increment","path":["count"],"by":1}
/// ```
///
/// Any other `type` is refused where the op is decoded (a server answers
/// `422`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum JsonOp {
    /// Sets the value at `path`: a key of an existing object (added or
    /// replaced) or an index within an existing array (replaced). The
    /// parent must exist, so an edit of something deleted meanwhile is
    /// refused rather than bringing part of it back.
    Set {
        /// Where.
        path: Path,
        /// The new value.
        value: Value,
    },
    /// Removes the key at `path` from its object (refused when it is
    /// missing) or the element at an array index.
    Delete {
        /// Where.
        path: Path,
    },
    /// Inserts `value` into the array at `path` at `index` (at the end when
    /// `index` is absent).
    Insert {
        /// The array.
        path: Path,
        /// Where in it (0 ..= length).
        #[serde(default)]
        index: Option<usize>,
        /// The new element.
        value: Value,
    },
    /// Removes the element at `index` of the array at `path`.
    Remove {
        /// The array.
        path: Path,
        /// Which element.
        index: usize,
    },
    /// Moves the element at `from` of the array at `path` to `to`.
    Move {
        /// The array.
        path: Path,
        /// The element's index now.
        from: usize,
        /// Its index after the move.
        to: usize,
    },
    /// Adds `by` to the number at `path` (a missing key of an existing
    /// object counts as 0).
    Increment {
        /// Where.
        path: Path,
        /// How much (may be negative or fractional).
        by: f64,
    },
}

/// A reducer over a plain JSON document (the state is a
/// [`serde_json::Value`], an empty object at first) with the per-path ops
/// of [`JsonOp`]. Concurrent ops are applied in the room's order; an op
/// whose path no longer exists (deleted by someone else) is refused with
/// `409` and rolled back on its sender. Last writer wins per path.
///
/// The document's size is bounded by the room's
/// [`SyncConfig::max_state_bytes`](super::SyncConfig::max_state_bytes).
#[derive(Debug, Clone, Copy, Default)]
pub struct JsonDoc;

fn not_found(path: &[Seg]) -> Reject {
    let shown = serde_json::to_string(path).unwrap_or_default();
    Reject::new(format!("no value at {shown}"))
}

fn walk<'v>(mut v: &'v mut Value, path: &[Seg]) -> Result<&'v mut Value, Reject> {
    for (i, seg) in path.iter().enumerate() {
        v = match (v, seg) {
            (Value::Object(map), Seg::Key(k)) => map.get_mut(k).ok_or_else(|| not_found(&path[..=i]))?,
            (Value::Array(items), Seg::Index(n)) => items.get_mut(*n).ok_or_else(|| not_found(&path[..=i]))?,
            _ => return Err(not_found(&path[..=i])),
        };
    }
    Ok(v)
}

fn array<'v>(doc: &'v mut Value, path: &[Seg]) -> Result<&'v mut Vec<Value>, Reject> {
    match walk(doc, path)? {
        Value::Array(items) => Ok(items),
        _ => Err(Reject::new(format!("not an array at {}", serde_json::to_string(path).unwrap_or_default()))),
    }
}

impl Reducer for JsonDoc {
    type State = Value;
    type Op = JsonOp;

    fn apply(&self, doc: &mut Value, op: &JsonOp, _cx: &Context) -> Result<(), Reject> {
        if doc.is_null() {
            *doc = Value::Object(Default::default());
        }
        match op {
            JsonOp::Set { path, value } => {
                let Some((last, parent)) = path.split_last() else {
                    *doc = value.clone();
                    return Ok(());
                };
                match (walk(doc, parent)?, last) {
                    (Value::Object(map), Seg::Key(k)) => {
                        map.insert(k.clone(), value.clone());
                    }
                    (Value::Array(items), Seg::Index(n)) if *n < items.len() => items[*n] = value.clone(),
                    _ => return Err(not_found(path)),
                }
            }
            JsonOp::Delete { path } => {
                let Some((last, parent)) = path.split_last() else { return Err(Reject::new("cannot delete the root")) };
                match (walk(doc, parent)?, last) {
                    (Value::Object(map), Seg::Key(k)) => {
                        map.remove(k).ok_or_else(|| not_found(path))?;
                    }
                    (Value::Array(items), Seg::Index(n)) if *n < items.len() => {
                        items.remove(*n);
                    }
                    _ => return Err(not_found(path)),
                }
            }
            JsonOp::Insert { path, index, value } => {
                let items = array(doc, path)?;
                let at = index.unwrap_or(items.len());
                if at > items.len() {
                    return Err(Reject::new(format!("index {at} is past the end ({})", items.len())));
                }
                items.insert(at, value.clone());
            }
            JsonOp::Remove { path, index } => {
                let items = array(doc, path)?;
                if *index >= items.len() {
                    return Err(Reject::new(format!("no element {index} (length {})", items.len())));
                }
                items.remove(*index);
            }
            JsonOp::Move { path, from, to } => {
                let items = array(doc, path)?;
                if *from >= items.len() || *to >= items.len() {
                    return Err(Reject::new(format!("move {from} → {to} outside 0..{}", items.len())));
                }
                let v = items.remove(*from);
                items.insert(*to, v);
            }
            JsonOp::Increment { path, by } => {
                let Some((last, parent)) = path.split_last() else {
                    return Err(Reject::new("cannot increment the root"));
                };
                let slot = match (walk(doc, parent)?, last) {
                    (Value::Object(map), Seg::Key(k)) => map.entry(k.clone()).or_insert(Value::from(0)),
                    (Value::Array(items), Seg::Index(n)) if *n < items.len() => &mut items[*n],
                    _ => return Err(not_found(path)),
                };
                let sum = match slot {
                    Value::Number(n) if n.is_i64() && by.fract() == 0.0 => {
                        n.as_i64().and_then(|a| a.checked_add(*by as i64)).map(Value::from)
                    }
                    Value::Number(n) => {
                        n.as_f64().and_then(|a| serde_json::Number::from_f64(a + by)).map(Value::Number)
                    }
                    _ => return Err(Reject::new("not a number")),
                };
                *slot = sum.ok_or_else(|| Reject::new("the result is not a finite number"))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn run(doc: &mut Value, op: Value) -> Result<(), Reject> {
        let op: JsonOp = serde_json::from_value(op).expect("op");
        JsonDoc.apply(doc, &op, &Context::new("r", "c", None, 0))
    }

    #[test]
    fn every_op_does_what_it_says() {
        let mut d = Value::Null;
        run(&mut d, json!({"type":"set","path":["items"],"value":{}})).unwrap();
        run(&mut d, json!({"type":"set","path":["items","a"],"value":{}})).unwrap();
        run(&mut d, json!({"type":"set","path":["items","a","text"],"value":"milk"})).unwrap();
        run(&mut d, json!({"type":"set","path":["order"],"value":[]})).unwrap();
        run(&mut d, json!({"type":"insert","path":["order"],"value":"a"})).unwrap();
        run(&mut d, json!({"type":"insert","path":["order"],"index":0,"value":"b"})).unwrap();
        run(&mut d, json!({"type":"move","path":["order"],"from":0,"to":1})).unwrap();
        run(&mut d, json!({"type":"increment","path":["n"],"by":2})).unwrap();
        run(&mut d, json!({"type":"increment","path":["n"],"by":-0.5})).unwrap();
        assert_eq!(d, json!({"items":{"a":{"text":"milk"}},"order":["a","b"],"n":1.5}));
        run(&mut d, json!({"type":"remove","path":["order"],"index":0})).unwrap();
        run(&mut d, json!({"type":"delete","path":["items","a"]})).unwrap();
        run(&mut d, json!({"type":"set","path":["order",0],"value":"z"})).unwrap();
        assert_eq!(d, json!({"items":{},"order":["z"],"n":1.5}));
    }

    #[test]
    fn bad_paths_are_refused_and_leave_the_document() {
        let mut d = json!({"order":["a"],"s":"x"});
        let before = d.clone();
        for op in [
            json!({"type":"delete","path":["items","a"]}),
            json!({"type":"remove","path":["order"],"index":1}),
            json!({"type":"insert","path":["order"],"index":5,"value":1}),
            json!({"type":"insert","path":["s"],"value":1}),
            json!({"type":"move","path":["order"],"from":0,"to":3}),
            json!({"type":"increment","path":["s"],"by":1}),
            json!({"type":"set","path":["s","k"],"value":1}),
            json!({"type":"delete","path":[]}),
            json!({"type":"set","path":["gone","text"],"value":1}),
            json!({"type":"increment","path":["gone","n"],"by":1}),
        ] {
            let e = run(&mut d, op.clone()).expect_err(&op.to_string());
            assert_eq!(e.code(), 409, "{op}");
            assert_eq!(d, before, "{op}");
        }
        assert!(serde_json::from_value::<JsonOp>(json!({"type":"frob","path":[]})).is_err());
        assert!(serde_json::from_value::<JsonOp>(json!({"type":"remove","path":["a"],"index":-1})).is_err());
    }
}
