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

use super::link::Link;
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
/// [`ErrorKind::Backplane`]; while Redis is unreachable, calls fail at once.
#[derive(Clone)]
pub struct RedisPresence {
    link: Arc<Link>,
    prefix: Arc<str>,
}

impl fmt::Debug for RedisPresence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisPresence").field("prefix", &self.prefix).field("link", &self.link).finish()
    }
}

const COMMON_LUA: &str = r#"
local prefix = ARGV[1]
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function data_key(room) return prefix .. 'presence:data:{' .. room .. '}' end
local function room_key(room) return prefix .. 'presence:room:{' .. room .. '}' end
local function key_key(key) return prefix .. 'presence:key:{' .. key .. '}' end
-- The presence key stored in front of a record.
local function key_of(value)
  local colon = string.find(value, ':', 1, true)
  local len = tonumber(string.sub(value, 1, colon - 1))
  return string.sub(value, colon + 1, colon + len)
end
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

static WRITE: LazyLock<Script> = LazyLock::new(|| Script::new(&format!("{COMMON_LUA}{WRITE_LUA}")));
static LIST: LazyLock<Script> = LazyLock::new(|| Script::new(&format!("{COMMON_LUA}{LIST_LUA}")));

impl RedisPresence {
    /// Connects to Redis. Fails when it cannot be reached now; later losses
    /// are repaired in the background (calls fail at once meanwhile).
    pub async fn connect(config: RedisConfig) -> Result<RedisPresence> {
        let link = Link::connect(&config).await?;
        Ok(RedisPresence { link, prefix: Arc::from(config.prefix.as_str()) })
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
        let link = self.link.clone();
        let prefix = self.prefix.clone();
        Box::pin(async move {
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
        let link = self.link.clone();
        let prefix = self.prefix.to_string();
        Box::pin(async move {
            let (kind, name) = match query {
                PresenceQuery::Room(room) => ("room", room),
                PresenceQuery::Key(key) => ("key", key),
            };
            let reply: Value = link
                .run("presence list", move |mut conn| async move {
                    LIST.arg(prefix).arg(kind).arg(name).invoke_async(&mut conn).await
                })
                .await?;
            let Value::Array(values) = &reply else {
                return Err(Error::msg(ErrorKind::Backplane, format!("redis presence: unexpected reply {reply:?}")));
            };
            values
                .iter()
                .map(|v| match v {
                    Value::BulkString(b) => decode(b),
                    _ => None,
                })
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| Error::msg(ErrorKind::Backplane, "redis presence: a stored record does not parse"))
        })
    }
}
