//! [`RedisSnapshots`]: the [`SnapshotStore`] of synced rooms on Redis.
//!
//! Per room, four keys sharing the hash tag `{<room>}` (so a Redis Cluster
//! keeps them on one node, as a script needs):
//!
//! - `<prefix>sync:{<room>}:meta`: a hash with `v` (the room's version),
//!   `snap_v` and `snap` (the newest snapshot, JSON);
//! - `<prefix>sync:{<room>}:log`: a list of op records (JSON), in version
//!   order; its last entry is version `v`;
//! - `<prefix>sync:{<room>}:clients`: a hash of client id →
//!   `seq:version:user` (the client's last applied op), and
//!   `<prefix>sync:{<room>}:clients_v`, the same ids scored by that version
//!   (to evict the least recent past `max_clients`).
//!
//! An append is **one Lua script**: it compares the room's version with the
//! expected one and the client's last seq with the op's, and only then
//! pushes the op, bumps the version, records the client, stores the
//! snapshot if given, trims the log (every op after the snapshot is kept,
//! and `retain` before it) and refreshes the keys' time to live. Redis runs
//! a script alone, so two nodes never assign the same version. A load is a
//! script too, so the version, snapshot and ops it returns are one
//! snapshot of the room.

use super::history::{as_bytes, as_int};
use super::link::{self, Link};
use super::RedisConfig;
use crate::error::{Error, ErrorKind, Result};
use crate::sync::{Append, Appended, ClientRecord, Loaded, OpRecord, SnapshotStore};
use ::redis::{Script, Value};
use futures::future::BoxFuture;
use std::fmt;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

/// A [`SnapshotStore`] on Redis: an op log, a snapshot and client records
/// per room, compare-and-append in one Lua script. See the
/// module docs (`src/redis/sync.rs`), `docs/redis.md` and `docs/sync.md`.
///
/// Cheap to clone (clones share one connection). Hubs on several nodes
/// with `RedisSnapshots` on the same Redis serve the same synced rooms in
/// one order. Errors (Redis unreachable, a reply that does not parse) are of
/// kind [`ErrorKind::History`]; while Redis is unreachable, calls fail at
/// once (members get `503` and send again).
#[derive(Clone)]
pub struct RedisSnapshots {
    link: Arc<Link>,
    prefix: Arc<str>,
    retain: u64,
    max_clients: u64,
    ttl_ms: u64,
}

impl fmt::Debug for RedisSnapshots {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisSnapshots")
            .field("prefix", &self.prefix)
            .field("retain", &self.retain)
            .field("max_clients", &self.max_clients)
            .field("ttl_ms", &self.ttl_ms)
            .finish()
    }
}

const APPEND_LUA: &str = r#"
local meta, log, clients, by_v = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local expected, client, seq = tonumber(ARGV[1]), ARGV[3], tonumber(ARGV[4])
local retain, max_clients, ttl = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
local v = tonumber(redis.call('HGET', meta, 'v') or '0')
if v ~= expected then return {0, v, ''} end
local known = redis.call('HGET', clients, client)
if known then
  if tonumber(string.match(known, '^(%d+)')) >= seq then return {2, v, known} end
end
v = v + 1
redis.call('RPUSH', log, ARGV[2])
redis.call('HSET', meta, 'v', v)
redis.call('HSET', clients, client, seq .. ':' .. v .. ':' .. ARGV[5])
redis.call('ZADD', by_v, v, client)
if redis.call('ZCARD', by_v) > max_clients then
  local oldest = redis.call('ZPOPMIN', by_v, 1)
  redis.call('HDEL', clients, oldest[1])
end
if ARGV[6] ~= '' then redis.call('HSET', meta, 'snap_v', v, 'snap', ARGV[6]) end
local snap_v = tonumber(redis.call('HGET', meta, 'snap_v') or '0')
local first = v - redis.call('LLEN', log) + 1
local drop = (snap_v - retain) - first + 1
if drop > 0 then redis.call('LTRIM', log, drop, -1) end
for _, k in ipairs(KEYS) do redis.call('PEXPIRE', k, ttl) end
return {1, v, ''}
"#;

const LOAD_LUA: &str = r#"
local meta, log = KEYS[1], KEYS[2]
local since = tonumber(ARGV[1])
local v = tonumber(redis.call('HGET', meta, 'v') or '0')
local snap_v = tonumber(redis.call('HGET', meta, 'snap_v') or '0')
local first = v - redis.call('LLEN', log) + 1
if since >= 0 and since <= v and (since == v or first <= since + 1) then
  if since == v then return {v, -1, '', {}} end
  return {v, -1, '', redis.call('LRANGE', log, since + 1 - first, -1)}
end
if snap_v > 0 then
  return {v, snap_v, redis.call('HGET', meta, 'snap'), redis.call('LRANGE', log, snap_v + 1 - first, -1)}
end
return {v, -1, '', redis.call('LRANGE', log, 0, -1)}
"#;

static APPEND: LazyLock<Script> = LazyLock::new(|| Script::new(APPEND_LUA));
static LOAD: LazyLock<Script> = LazyLock::new(|| Script::new(LOAD_LUA));

impl RedisSnapshots {
    /// Connects (keys under `config`'s prefix). Defaults: `retain` 1,000
    /// ops before the newest snapshot, 10,000 client records per room, and
    /// a room's keys expire 30 days after its last op.
    pub async fn connect(config: RedisConfig) -> Result<RedisSnapshots> {
        let link = Link::connect(&config).await?;
        Ok(RedisSnapshots {
            link,
            prefix: Arc::from(config.prefix.as_str()),
            retain: 1000,
            max_clients: 10_000,
            ttl_ms: 30 * 24 * 3600 * 1000,
        })
    }

    /// Sets how many ops older than the newest snapshot are kept per room
    /// (default 1,000).
    pub fn retain(mut self, ops: u64) -> Self {
        self.retain = ops;
        self
    }

    /// Sets how many client records a room keeps (default 10,000; the one
    /// whose last op is oldest is evicted first).
    pub fn max_clients(mut self, clients: u64) -> Self {
        self.max_clients = clients.max(1);
        self
    }

    /// Sets how long a room's keys live after its last op (default 30
    /// days). A room that expired starts again at version 0; its members
    /// resync.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        self
    }

    fn keys(&self, room: &str) -> [String; 4] {
        let base = format!("{}sync:{{{room}}}", self.prefix);
        [format!("{base}:meta"), format!("{base}:log"), format!("{base}:clients"), format!("{base}:clients_v")]
    }
}

fn bad_reply(what: &str, v: &Value) -> Error {
    Error::msg(ErrorKind::History, format!("redis snapshots: unexpected reply to {what}: {v:?}"))
}

fn as_str(v: &Value) -> Option<&str> {
    as_bytes(v).and_then(|b| std::str::from_utf8(b).ok())
}

/// `seq:version:user`, the user being `=<id>` or empty.
fn client_record(s: &str) -> Option<ClientRecord> {
    let mut parts = s.splitn(3, ':');
    let seq = parts.next()?.parse().ok()?;
    let version = parts.next()?.parse().ok()?;
    let user = match parts.next()? {
        "" => None,
        u => Some(u.strip_prefix('=')?.to_owned()),
    };
    Some(ClientRecord { seq, version, user })
}

fn encode_user(user: Option<&str>) -> String {
    user.map_or_else(String::new, |u| format!("={u}"))
}

impl SnapshotStore for RedisSnapshots {
    fn load<'a>(&'a self, room: &'a str, since: Option<u64>) -> BoxFuture<'a, Result<Loaded>> {
        let [meta, log, _, _] = self.keys(room);
        let link = self.link.clone();
        let since = since.and_then(|s| i64::try_from(s).ok()).unwrap_or(-1);
        link::store_call(ErrorKind::History, async move {
            let reply: Value = link
                .run("sync load", move |mut conn| async move {
                    LOAD.key(meta).key(log).arg(since).invoke_async(&mut conn).await
                })
                .await?;
            let Value::Array(parts) = &reply else { return Err(bad_reply("load", &reply)) };
            let [v, snap_v, snap, Value::Array(ops)] = parts.as_slice() else { return Err(bad_reply("load", &reply)) };
            let version = as_int(v).and_then(|v| u64::try_from(v).ok()).ok_or_else(|| bad_reply("load", &reply))?;
            let snap_v = as_int(snap_v).ok_or_else(|| bad_reply("load", &reply))?;
            let snapshot = match u64::try_from(snap_v) {
                Ok(sv) => {
                    let state = as_str(snap).and_then(|s| serde_json::from_str(s).ok());
                    Some((sv, state.ok_or_else(|| bad_reply("load (snapshot)", &reply))?))
                }
                Err(_) => None,
            };
            let ops = ops
                .iter()
                .map(|op| as_str(op).and_then(|s| serde_json::from_str::<OpRecord>(s).ok()))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| bad_reply("load (ops)", &reply))?;
            Ok(Loaded { version, snapshot, ops })
        })
    }

    fn append<'a>(&'a self, room: &'a str, append: Append) -> BoxFuture<'a, Result<Appended>> {
        let [meta, log, clients, by_v] = self.keys(room);
        let link = self.link.clone();
        let (retain, max_clients, ttl) = (self.retain, self.max_clients, self.ttl_ms);
        link::store_call(ErrorKind::History, async move {
            let record = OpRecord { version: append.expected + 1, ..append.record };
            let json = serde_json::to_string(&record).map_err(|e| Error::msg(ErrorKind::Protocol, e.to_string()))?;
            let snapshot = match &append.snapshot {
                Some(s) => serde_json::to_string(s).map_err(|e| Error::msg(ErrorKind::Protocol, e.to_string()))?,
                None => String::new(),
            };
            let user = encode_user(record.user.as_deref());
            let reply: Value = link
                .run("sync append", move |mut conn| async move {
                    APPEND
                        .key(meta)
                        .key(log)
                        .key(clients)
                        .key(by_v)
                        .arg(append.expected)
                        .arg(json)
                        .arg(record.client)
                        .arg(record.seq)
                        .arg(user)
                        .arg(snapshot)
                        .arg(retain)
                        .arg(max_clients)
                        .arg(ttl)
                        .invoke_async(&mut conn)
                        .await
                })
                .await?;
            let Value::Array(parts) = &reply else { return Err(bad_reply("append", &reply)) };
            let [outcome, v, known] = parts.as_slice() else { return Err(bad_reply("append", &reply)) };
            let v = as_int(v).and_then(|v| u64::try_from(v).ok()).ok_or_else(|| bad_reply("append", &reply))?;
            match as_int(outcome) {
                Some(1) => Ok(Appended::Done),
                Some(0) => Ok(Appended::Conflict { version: v }),
                Some(2) => as_str(known)
                    .and_then(client_record)
                    .map(Appended::Duplicate)
                    .ok_or_else(|| bad_reply("append", &reply)),
                _ => Err(bad_reply("append", &reply)),
            }
        })
    }

    fn client<'a>(&'a self, room: &'a str, client: &'a str) -> BoxFuture<'a, Result<Option<ClientRecord>>> {
        let [_, _, clients, _] = self.keys(room);
        let link = self.link.clone();
        let client = client.to_owned();
        link::store_call(ErrorKind::History, async move {
            let reply: Value = link
                .run("sync client", move |mut conn| async move {
                    ::redis::cmd("HGET").arg(clients).arg(client).query_async(&mut conn).await
                })
                .await?;
            match &reply {
                Value::Nil => Ok(None),
                v => as_str(v).and_then(client_record).map(Some).ok_or_else(|| bad_reply("client", &reply)),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_records_round_trip_users_with_colons() {
        for user in [None, Some("ann"), Some("a:b:c"), Some("")] {
            let s = format!("7:42:{}", encode_user(user));
            assert_eq!(client_record(&s), Some(ClientRecord { seq: 7, version: 42, user: user.map(str::to_owned) }));
        }
        assert_eq!(client_record("x:1:"), None);
        assert_eq!(client_record("1:2:ann"), None, "a user is always `=`-prefixed");
    }
}
