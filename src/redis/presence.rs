//! [`RedisPresence`]: the [`PresenceStore`] on Redis.
//!
//! Keys (the room or presence key in a hash tag, so each index and its data
//! stay together in a future Redis Cluster):
//!
//! - `<prefix>presence:data:{<room>}`: a hash, field `<node>.<connection>`
//!   (node in 16 hex digits) → `<key length>:<key><record JSON>`;
//! - `<prefix>presence:room:{<room>}`: a sorted set of the same fields,
//!   scored by expiry time (Redis clock, ms);
//! - `<prefix>presence:key:{<key>}`: a sorted set of
//!   `<node>.<connection>.<room>`, scored by expiry time.
//!
//! A `write` is one Lua script applying the batch in order (the Redis clock
//! sets every expiry, so nodes with skewed clocks agree); a `list` is one
//! script that first removes what expired from the index it reads (and the
//! data behind it), then returns the live records. Every key gets a TTL at
//! least as long as its newest record's, so a room whose nodes all vanished
//! leaves nothing behind.
//!
//! On a Redis Cluster a script may only touch keys of one slot, so the work
//! is split by slot: a `write` runs one script per room of the batch (its
//! data and room index, in the room's slot; the batch's order is kept
//! within each room, and rooms are independent), and then one script per
//! presence key applying the index changes those returned (in the key's
//! slot). Listing a room is one script; listing a key reads its index, then
//! the records of each room it names (`HMGET`, one per room). The two steps
//! of a write are not atomic together: a crash between them leaves an index
//! entry missing until the record's next refresh, or stale until its score
//! (the record's expiry) passes; a key listing skips index entries whose
//! record is gone or carries another key. No key is shared by all rooms:
//! the busiest key is the index of one presence key (one user).

use super::link::{self, Link};
use super::RedisConfig;
use crate::error::{Error, ErrorKind, Result};
use crate::presence::{PresenceQuery, PresenceRecord, PresenceStore, StoreChange};
use ::redis::{Script, Value};
use futures::future::BoxFuture;
use std::fmt;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

/// A [`PresenceStore`] on Redis: hubs on several nodes given
/// `RedisPresence` handles on the same Redis (and a
/// [`RedisBackplane`](super::RedisBackplane) each) share presence; the
/// entries of a node that stops refreshing them expire after their TTL.
///
/// Cheap to clone (clones share one connection). Errors are of kind
/// [`ErrorKind::Presence`]; while Redis is unreachable, calls fail at once.
#[derive(Clone)]
pub struct RedisPresence {
    link: Arc<Link>,
    prefix: Arc<str>,
    cluster: bool,
}

impl fmt::Debug for RedisPresence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisPresence").field("prefix", &self.prefix).field("link", &self.link).finish()
    }
}

/// The Redis clock and the record format, for every script.
const CLOCK_LUA: &str = r#"
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
-- The presence key stored in front of a record.
local function key_of(value)
  local colon = string.find(value, ':', 1, true)
  local len = tonumber(string.sub(value, 1, colon - 1))
  return string.sub(value, colon + 1, colon + len)
end
"#;

/// The single-Redis scripts' helpers (key names built in the script).
const COMMON_LUA: &str = r#"
local prefix = ARGV[1]
local function data_key(room) return prefix .. 'presence:data:{' .. room .. '}' end
local function room_key(room) return prefix .. 'presence:room:{' .. room .. '}' end
local function key_key(key) return prefix .. 'presence:key:{' .. key .. '}' end
local function remove(room, id)
  local value = redis.call('HGET', data_key(room), id)
  if value then
    redis.call('HDEL', data_key(room), id)
    redis.call('ZREM', key_key(key_of(value)), id .. '.' .. room)
  end
  redis.call('ZREM', room_key(room), id)
end
-- Removes the records of `room` that expired by `now`.
local function purge_room(room, now)
  local gone = redis.call('ZRANGEBYSCORE', room_key(room), '-inf', now)
  for _, id in ipairs(gone) do
    remove(room, id)
  end
end
"#;

/// ARGV: prefix, ttl (ms), then per change either `P room key id value` or
/// `R room id`.
const WRITE_LUA: &str = r#"
local ttl = math.max(tonumber(ARGV[2]), 1)
local now = now_ms()
local expires = now + ttl
local function extend(k)
  local left = redis.call('PTTL', k)
  if left >= 0 and left < ttl then redis.call('PEXPIRE', k, ttl) end
end
local i = 3
while i <= #ARGV do
  if ARGV[i] == 'P' then
    local room, key, id, value = ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4]
    purge_room(room, now)
    remove(room, id)
    redis.call('HSET', data_key(room), id, value)
    redis.call('ZADD', room_key(room), expires, id)
    redis.call('ZADD', key_key(key), expires, id .. '.' .. room)
    -- New keys get the TTL; existing ones keep the longer of the two.
    for _, k in ipairs({data_key(room), room_key(room), key_key(key)}) do
      if redis.call('PTTL', k) == -1 then redis.call('PEXPIRE', k, ttl) else extend(k) end
    end
    i = i + 5
  else
    remove(ARGV[i + 1], ARGV[i + 2])
    i = i + 3
  end
end
return 1
"#;

/// ARGV: prefix, `room` or `key`, the room or key. Returns the live
/// records' values.
const LIST_LUA: &str = r#"
local now = now_ms()
local kind, name = ARGV[2], ARGV[3]
local out = {}
if kind == 'room' then
  purge_room(name, now)
  local ids = redis.call('ZRANGEBYSCORE', room_key(name), '(' .. now, '+inf')
  for _, id in ipairs(ids) do
    local value = redis.call('HGET', data_key(name), id)
    if value then table.insert(out, value) end
  end
else
  local index = key_key(name)
  local gone = redis.call('ZRANGEBYSCORE', index, '-inf', now)
  for _, member in ipairs(gone) do
    local node, conn, room = string.match(member, '^([^.]*)%.([^.]*)%.(.*)$')
    if room then purge_room(room, now) end
    redis.call('ZREM', index, member)
  end
  local members = redis.call('ZRANGEBYSCORE', index, '(' .. now, '+inf')
  for _, member in ipairs(members) do
    local node, conn, room = string.match(member, '^([^.]*)%.([^.]*)%.(.*)$')
    local value = nil
    if room then value = redis.call('HGET', data_key(room), node .. '.' .. conn) end
    if value and key_of(value) == name then
      table.insert(out, value)
    else
      -- A stale index entry (the record was replaced under another key).
      redis.call('ZREM', index, member)
    end
  end
end
return out
"#;

/// Cluster: one room's changes. KEYS: data, room index. ARGV: ttl (ms),
/// room, then per change `P key id value` or `R id`. Returns the key index
/// changes to make, flat: `+`/`-`, presence key, member (`id.room`).
const ROOM_WRITE_LUA: &str = r#"
local data, index = KEYS[1], KEYS[2]
local ttl = math.max(tonumber(ARGV[1]), 1)
local room = ARGV[2]
local now = now_ms()
local out = {}
local function remove(id)
  local value = redis.call('HGET', data, id)
  if value then
    redis.call('HDEL', data, id)
    table.insert(out, '-')
    table.insert(out, key_of(value))
    table.insert(out, id .. '.' .. room)
  end
  redis.call('ZREM', index, id)
end
for _, id in ipairs(redis.call('ZRANGEBYSCORE', index, '-inf', now)) do
  remove(id)
end
local i = 3
while i <= #ARGV do
  if ARGV[i] == 'P' then
    local key, id, value = ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
    remove(id)
    redis.call('HSET', data, id, value)
    redis.call('ZADD', index, now + ttl, id)
    for _, k in ipairs({data, index}) do
      local left = redis.call('PTTL', k)
      if left == -1 or (left >= 0 and left < ttl) then redis.call('PEXPIRE', k, ttl) end
    end
    table.insert(out, '+')
    table.insert(out, key)
    table.insert(out, id .. '.' .. room)
    i = i + 4
  else
    remove(ARGV[i + 1])
    i = i + 2
  end
end
return out
"#;

/// Cluster: one presence key's index changes. KEYS: the key index. ARGV:
/// ttl (ms), then pairs `+`/`-`, member.
const KEY_WRITE_LUA: &str = r#"
local index = KEYS[1]
local ttl = math.max(tonumber(ARGV[1]), 1)
local now = now_ms()
local added = false
for i = 2, #ARGV, 2 do
  if ARGV[i] == '+' then
    redis.call('ZADD', index, now + ttl, ARGV[i + 1])
    added = true
  else
    redis.call('ZREM', index, ARGV[i + 1])
  end
end
redis.call('ZREMRANGEBYSCORE', index, '-inf', now)
if added then
  local left = redis.call('PTTL', index)
  if left == -1 or (left >= 0 and left < ttl) then redis.call('PEXPIRE', index, ttl) end
end
return 1
"#;

/// Cluster: the live records of one room. KEYS: data, room index.
const ROOM_LIST_LUA: &str = r#"
local data, index = KEYS[1], KEYS[2]
local now = now_ms()
for _, id in ipairs(redis.call('ZRANGEBYSCORE', index, '-inf', now)) do
  -- The key index entry expires by its own score.
  redis.call('HDEL', data, id)
  redis.call('ZREM', index, id)
end
local out = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', index, '(' .. now, '+inf')) do
  local value = redis.call('HGET', data, id)
  if value then table.insert(out, value) end
end
return out
"#;

/// Cluster: the live members (`id.room`) of one key index. KEYS: the index.
const KEY_LIST_LUA: &str = r#"
local index = KEYS[1]
local now = now_ms()
redis.call('ZREMRANGEBYSCORE', index, '-inf', now)
return redis.call('ZRANGEBYSCORE', index, '(' .. now, '+inf')
"#;

static WRITE: LazyLock<Script> = LazyLock::new(|| Script::new(&format!("{CLOCK_LUA}{COMMON_LUA}{WRITE_LUA}")));
static LIST: LazyLock<Script> = LazyLock::new(|| Script::new(&format!("{CLOCK_LUA}{COMMON_LUA}{LIST_LUA}")));
static ROOM_WRITE: LazyLock<Script> = LazyLock::new(|| Script::new(&format!("{CLOCK_LUA}{ROOM_WRITE_LUA}")));
static KEY_WRITE: LazyLock<Script> = LazyLock::new(|| Script::new(&format!("{CLOCK_LUA}{KEY_WRITE_LUA}")));
static ROOM_LIST: LazyLock<Script> = LazyLock::new(|| Script::new(&format!("{CLOCK_LUA}{ROOM_LIST_LUA}")));
static KEY_LIST: LazyLock<Script> = LazyLock::new(|| Script::new(&format!("{CLOCK_LUA}{KEY_LIST_LUA}")));

impl RedisPresence {
    /// Connects to Redis (or a Redis Cluster: see [`RedisConfig::cluster`]).
    /// Fails when it cannot be reached now; later losses are repaired in the
    /// background (calls fail at once meanwhile).
    pub async fn connect(config: RedisConfig) -> Result<RedisPresence> {
        let link = Link::connect(&config).await?;
        Ok(RedisPresence { link, prefix: Arc::from(config.prefix.as_str()), cluster: config.is_cluster() })
    }

    fn data_key(&self, room: &str) -> String {
        format!("{}presence:data:{{{room}}}", self.prefix)
    }

    fn room_key(&self, room: &str) -> String {
        format!("{}presence:room:{{{room}}}", self.prefix)
    }

    fn key_key(&self, key: &str) -> String {
        format!("{}presence:key:{{{key}}}", self.prefix)
    }

    /// Cluster: a write split by slot (see the module docs).
    async fn write_sharded(&self, changes: Vec<StoreChange>, ttl: Duration) -> Result<()> {
        // Each room's changes, in batch order.
        let mut rooms: Vec<(String, Vec<String>)> = Vec::new();
        for change in &changes {
            let room = match change {
                StoreChange::Put(r) => &r.room,
                StoreChange::Remove { room, .. } => room,
            };
            let at = match rooms.iter().position(|(r, _)| r == room) {
                Some(at) => at,
                None => {
                    rooms.push((room.clone(), Vec::new()));
                    rooms.len() - 1
                }
            };
            let args = &mut rooms[at].1;
            match change {
                StoreChange::Put(r) => {
                    args.extend(["P".to_owned(), r.key.clone(), id(r.node, r.connection), encode(r)?]);
                }
                StoreChange::Remove { node, connection, .. } => {
                    args.extend(["R".to_owned(), id(*node, *connection)]);
                }
            }
        }
        let ttl_ms = ttl.as_millis().to_string();
        let scripts = rooms.into_iter().map(|(room, args)| {
            let (data, index, ttl_ms) = (self.data_key(&room), self.room_key(&room), ttl_ms.clone());
            self.link.run("presence write", move |mut conn| async move {
                ROOM_WRITE
                    .key(data)
                    .key(index)
                    .arg(ttl_ms)
                    .arg(room)
                    .arg(args)
                    .invoke_async::<Vec<String>>(&mut conn)
                    .await
            })
        });
        // Then the key indexes, each key's changes in the order returned.
        let mut keys: Vec<(String, Vec<String>)> = Vec::new();
        for ops in futures::future::try_join_all(scripts).await? {
            for op in ops.chunks(3) {
                let [sign, key, member] = op else { continue };
                let at = match keys.iter().position(|(k, _)| k == key) {
                    Some(at) => at,
                    None => {
                        keys.push((key.clone(), Vec::new()));
                        keys.len() - 1
                    }
                };
                keys[at].1.extend([sign.clone(), member.clone()]);
            }
        }
        let scripts = keys.into_iter().map(|(key, args)| {
            let (index, ttl_ms) = (self.key_key(&key), ttl_ms.clone());
            self.link.run("presence write", move |mut conn| async move {
                KEY_WRITE.key(index).arg(ttl_ms).arg(args).invoke_async::<Value>(&mut conn).await
            })
        });
        futures::future::try_join_all(scripts).await.map(|_| ())
    }

    /// Cluster: a listing (see the module docs).
    async fn list_sharded(&self, query: PresenceQuery) -> Result<Vec<Value>> {
        match query {
            PresenceQuery::Room(room) => {
                let (data, index) = (self.data_key(&room), self.room_key(&room));
                let values: Vec<Value> = self
                    .link
                    .run("presence list", move |mut conn| async move {
                        ROOM_LIST.key(data).key(index).invoke_async(&mut conn).await
                    })
                    .await?;
                Ok(values)
            }
            PresenceQuery::Key(key) => {
                let index = self.key_key(&key);
                let members: Vec<String> =
                    self.link
                        .run("presence list", move |mut conn| async move {
                            KEY_LIST.key(index).invoke_async(&mut conn).await
                        })
                        .await?;
                // The connection ids per room.
                let mut rooms: Vec<(String, Vec<String>)> = Vec::new();
                for member in &members {
                    let mut parts = member.splitn(3, '.');
                    let (Some(node), Some(conn), Some(room)) = (parts.next(), parts.next(), parts.next()) else {
                        continue;
                    };
                    let id = format!("{node}.{conn}");
                    match rooms.iter_mut().find(|(r, _)| r == room) {
                        Some((_, ids)) => ids.push(id),
                        None => rooms.push((room.to_owned(), vec![id])),
                    }
                }
                let reads = rooms.into_iter().map(|(room, ids)| {
                    let data = self.data_key(&room);
                    self.link.run("presence list", move |mut conn| async move {
                        ::redis::cmd("HMGET").arg(data).arg(ids).query_async::<Vec<Value>>(&mut conn).await
                    })
                });
                let mut out = Vec::new();
                for values in futures::future::try_join_all(reads).await? {
                    // Skip records gone since, or now under another key.
                    out.extend(values.into_iter().filter(|v| match v {
                        Value::BulkString(b) => decode(b).is_some_and(|r| r.key == key),
                        _ => false,
                    }));
                }
                Ok(out)
            }
        }
    }
}

fn id(node: u64, connection: u64) -> String {
    format!("{node:016x}.{connection}")
}

fn encode(record: &PresenceRecord) -> Result<String> {
    let json = serde_json::to_string(record).map_err(|e| Error::with_source(ErrorKind::Protocol, e))?;
    Ok(format!("{}:{}{json}", record.key.len(), record.key))
}

fn decode(value: &[u8]) -> Option<PresenceRecord> {
    let colon = value.iter().position(|b| *b == b':')?;
    let len: usize = std::str::from_utf8(&value[..colon]).ok()?.parse().ok()?;
    let json = value.get(colon + 1 + len..)?;
    serde_json::from_slice(json).ok()
}

impl PresenceStore for RedisPresence {
    fn write(&self, changes: Vec<StoreChange>, ttl: Duration) -> BoxFuture<'static, Result<()>> {
        if self.cluster {
            let this = self.clone();
            return link::store_call(ErrorKind::Presence, async move {
                if changes.is_empty() {
                    return Ok(());
                }
                this.write_sharded(changes, ttl).await
            });
        }
        let link = self.link.clone();
        let prefix = self.prefix.clone();
        link::store_call(ErrorKind::Presence, async move {
            if changes.is_empty() {
                return Ok(());
            }
            let mut args: Vec<String> = vec![prefix.to_string(), ttl.as_millis().to_string()];
            for change in &changes {
                match change {
                    StoreChange::Put(r) => {
                        args.extend(["P".to_owned(), r.room.clone(), r.key.clone(), id(r.node, r.connection)]);
                        args.push(encode(r)?);
                    }
                    StoreChange::Remove { room, node, connection } => {
                        args.extend(["R".to_owned(), room.clone(), id(*node, *connection)]);
                    }
                }
            }
            link.run(
                "presence write",
                move |mut conn| async move { WRITE.arg(args).invoke_async::<Value>(&mut conn).await },
            )
            .await
            .map(|_| ())
        })
    }

    fn list(&self, query: PresenceQuery) -> BoxFuture<'static, Result<Vec<PresenceRecord>>> {
        let this = self.clone();
        link::store_call(ErrorKind::Presence, async move {
            let values = if this.cluster {
                this.list_sharded(query).await?
            } else {
                let prefix = this.prefix.to_string();
                let (kind, name) = match query {
                    PresenceQuery::Room(room) => ("room", room),
                    PresenceQuery::Key(key) => ("key", key),
                };
                let reply: Value = this
                    .link
                    .run("presence list", move |mut conn| async move {
                        LIST.arg(prefix).arg(kind).arg(name).invoke_async(&mut conn).await
                    })
                    .await?;
                let Value::Array(values) = reply else {
                    return Err(Error::msg(ErrorKind::Presence, format!("redis presence: unexpected reply {reply:?}")));
                };
                values
            };
            values
                .iter()
                .map(|v| match v {
                    Value::BulkString(b) => decode(b),
                    _ => None,
                })
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| Error::msg(ErrorKind::Presence, "redis presence: a stored record does not parse"))
        })
    }
}
