//! [`RedisHistory`]: the [`HistoryStore`] on Redis streams.
//!
//! Per room, three keys sharing the hash tag `{<room>}` (so a future Redis
//! Cluster keeps them on one node, as a script needs):
//!
//! - `<prefix>history:{<room>}:stream`: a stream whose entry ids are the
//!   offsets (`<offset>-0`), with fields `t` (append time, Redis clock, ms),
//!   `e` (event), `f` (payload format: empty, `j` or `m`), `d` (payload);
//! - `<prefix>history:{<room>}:meta`: a hash with `epoch`, `top` (the newest
//!   offset ever assigned) and `age` (the last append's `max_age`, in ms,
//!   applied on reads too); it lives [`RedisHistory::meta_ttl`] after the
//!   room's last append or read (a read of a room without one creates it,
//!   so the position a first join gets stays valid);
//! - `<prefix>history:{<room>}:idem`: a sorted set of idempotency keys
//!   scored by their offset, trimmed with the stream.
//!
//! An append is **one Lua script**: it creates the meta with a new epoch when
//! it is missing (Redis restarted without its data, the keys expired or were
//! evicted — the old stream is deleted then, so nothing of another epoch is
//! ever served), drops entries older than `max_age`, checks the
//! idempotency key, assigns `top + 1`, adds the entry, trims to `max_len`,
//! and sets the stream and the keys to expire `max_age` after this append
//! (the meta: `meta_ttl`). Redis runs a
//! script alone, so offsets are gap-free and every node sees one sequence.
//! A read is a script too, so the meta and the entries it returns are one
//! snapshot.

use super::link::{self, Link};
use super::RedisConfig;
use crate::error::{Error, ErrorKind, Result};
use crate::history::{Append, Appended, HistoryRead, HistoryStore, Publication, StreamPosition};
use crate::protocol::{Format, Payload};
use ::redis::{Script, Value};
use bytes::Bytes;
use futures::future::BoxFuture;
use std::fmt;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

/// A [`HistoryStore`] on Redis: a stream per room plus a meta key, appends
/// in one Lua script. See the [module docs](super) and `docs/redis.md`.
///
/// Cheap to clone (clones share one connection). Hubs on several nodes
/// given `RedisHistory` handles on the same Redis share every room's
/// stream: offsets, epochs and retained events are the same everywhere.
///
/// Errors (Redis unreachable, a reply that does not parse) are of kind
/// [`ErrorKind::History`]; while Redis is unreachable, calls fail at once.
#[derive(Clone)]
pub struct RedisHistory {
    link: Arc<Link>,
    prefix: Arc<str>,
    meta_ttl_ms: u64,
}

/// How long an unused room keeps its epoch and top offset by default.
const DEFAULT_META_TTL: Duration = Duration::from_secs(24 * 3600);

impl fmt::Debug for RedisHistory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisHistory")
            .field("prefix", &self.prefix)
            .field("meta_ttl_ms", &self.meta_ttl_ms)
            .field("link", &self.link)
            .finish()
    }
}

static APPEND: LazyLock<Script> = LazyLock::new(|| Script::new(&script_source(APPEND_LUA)));
static READ: LazyLock<Script> = LazyLock::new(|| Script::new(&script_source(READ_LUA)));

/// Shared by both scripts (put in place of `COMMON`): the Redis clock in ms, and age expiry.
const COMMON_LUA: &str = r#"
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function offset_of(id)
  return tonumber(string.match(id, '^(%d+)'))
end
-- Drops entries appended before `cutoff` (ms); returns the oldest retained
-- offset (top + 1 when the stream is empty).
local function expire(stream, cutoff, top)
  while true do
    local batch = redis.call('XRANGE', stream, '-', '+', 'COUNT', 64)
    if #batch == 0 then return top + 1 end
    for _, entry in ipairs(batch) do
      local fields = entry[2]
      local t = 0
      for i = 1, #fields, 2 do
        if fields[i] == 't' then t = tonumber(fields[i + 1]) end
      end
      if t >= cutoff then
        local first = offset_of(entry[1])
        redis.call('XTRIM', stream, 'MINID', first .. '-0')
        return first
      end
    end
    local last = offset_of(batch[#batch][1])
    redis.call('XTRIM', stream, 'MINID', (last + 1) .. '-0')
  end
end
"#;

/// KEYS: stream, meta, idem. ARGV: event, format, data, idempotency key
/// (empty: none), max_len, max_age (ms), a new epoch (used only when the
/// stream starts), the meta's time to live (ms). Returns {epoch, offset,
/// duplicate (0/1)}.
const APPEND_LUA: &str = concat!(
    r#"
local stream, meta, idem = KEYS[1], KEYS[2], KEYS[3]
local max_len, max_age, meta_ttl = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[8])
"#,
    "COMMON",
    r#"
local now = now_ms()
local epoch = redis.call('HGET', meta, 'epoch')
if not epoch then
  -- No meta: the history was lost (or never was). Start a new epoch and
  -- drop whatever is left of an older one.
  redis.call('DEL', stream, idem)
  epoch = ARGV[7]
  redis.call('HSET', meta, 'epoch', epoch, 'top', 0)
end
local top = tonumber(redis.call('HGET', meta, 'top'))
redis.call('HSET', meta, 'age', max_age)
local oldest = expire(stream, now - max_age, top)
redis.call('ZREMRANGEBYSCORE', idem, '-inf', '(' .. oldest)
local key = ARGV[4]
if key ~= '' then
  local seen = redis.call('ZSCORE', idem, key)
  if seen then
    redis.call('PEXPIRE', meta, math.max(meta_ttl, max_age, 1))
    return {epoch, tonumber(seen), 1}
  end
end
top = top + 1
redis.call('XADD', stream, top .. '-0', 't', now, 'e', ARGV[1], 'f', ARGV[2], 'd', ARGV[3])
redis.call('HSET', meta, 'top', top)
redis.call('XTRIM', stream, 'MAXLEN', max_len)
if key ~= '' then
  redis.call('ZADD', idem, top, key)
end
local first = redis.call('XRANGE', stream, '-', '+', 'COUNT', 1)
if #first > 0 then
  redis.call('ZREMRANGEBYSCORE', idem, '-inf', '(' .. offset_of(first[1][1]))
else
  redis.call('DEL', idem)
end
-- Events of a room idle for a whole max_age have all expired; its epoch and
-- top stay for the meta's time to live after its last use.
local ttl = math.max(max_age, 1)
redis.call('PEXPIRE', stream, ttl)
redis.call('PEXPIRE', meta, math.max(meta_ttl, ttl))
if redis.call('EXISTS', idem) == 1 then redis.call('PEXPIRE', idem, ttl) end
return {epoch, top, 0}
"#
);

/// KEYS: stream, meta. ARGV: mode (`after` or `newest`), since offset,
/// expected epoch, limit, a new epoch (used only when there is no stream:
/// a read creates it), the meta's time to live (ms). Returns {epoch, top,
/// oldest, xlen, entries}
/// where entries are the stream entries after `since` (at most limit + 1,
/// oldest first) for `after` when the epoch matches, or the newest `limit`
/// (newest first) for `newest`.
const READ_LUA: &str = concat!(
    r#"
local stream, meta = KEYS[1], KEYS[2]
local mode, since, expected, limit = ARGV[1], tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
local meta_ttl = tonumber(ARGV[6])
"#,
    "COMMON",
    r#"
local epoch = redis.call('HGET', meta, 'epoch')
if not epoch then
  -- A read creates the stream, so the position it returns stays valid for
  -- the appends that follow.
  redis.call('DEL', stream, KEYS[3])
  epoch = ARGV[5]
  redis.call('HSET', meta, 'epoch', epoch, 'top', 0)
end
local top = tonumber(redis.call('HGET', meta, 'top'))
local age = tonumber(redis.call('HGET', meta, 'age') or '0')
redis.call('PEXPIRE', meta, math.max(meta_ttl, age, 1))
local oldest = top + 1
if age > 0 then
  oldest = expire(stream, now_ms() - age, top)
else
  local first = redis.call('XRANGE', stream, '-', '+', 'COUNT', 1)
  if #first > 0 then oldest = offset_of(first[1][1]) end
end
local xlen = redis.call('XLEN', stream)
local entries = {}
if mode == 'after' then
  if epoch == expected and since <= top then
    entries = redis.call('XRANGE', stream, (since + 1) .. '-0', '+', 'COUNT', limit + 1)
  end
elseif limit > 0 then
  entries = redis.call('XREVRANGE', stream, '+', '-', 'COUNT', limit)
end
return {epoch, top, oldest, xlen, entries}
"#
);

fn script_source(template: &str) -> String {
    template.replacen("COMMON", COMMON_LUA, 1)
}

impl RedisHistory {
    /// Connects to Redis. Fails when it cannot be reached now; later losses
    /// are repaired in the background (calls fail at once meanwhile).
    pub async fn connect(config: RedisConfig) -> Result<RedisHistory> {
        let link = Link::connect(&config).await?;
        let meta_ttl_ms = millis(DEFAULT_META_TTL);
        Ok(RedisHistory { link, prefix: Arc::from(config.prefix.as_str()), meta_ttl_ms })
    }

    /// How long a room's epoch and top offset are kept after its last use
    /// (an append or a read) once its events expired; then the room is
    /// forgotten and its next use starts a new epoch. Default 24 hours; at
    /// least the room's `max_age` in any case.
    pub fn meta_ttl(mut self, ttl: Duration) -> Self {
        self.meta_ttl_ms = millis(ttl).max(1);
        self
    }

    /// The keys of `room`: stream, meta, idempotency keys.
    fn keys(&self, room: &str) -> [String; 3] {
        let base = format!("{}history:{{{room}}}", self.prefix);
        [format!("{base}:stream"), format!("{base}:meta"), format!("{base}:idem")]
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn bad_reply(what: &str, v: &Value) -> Error {
    Error::msg(ErrorKind::History, format!("redis history: unexpected reply to {what}: {v:?}"))
}

/// An integer reply (also as text). Shared with the other Redis stores.
pub(super) fn as_int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(n) => Some(*n),
        Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        Value::SimpleString(s) => s.parse().ok(),
        _ => None,
    }
}

/// A string reply's bytes. Shared with the other Redis stores.
pub(super) fn as_bytes(v: &Value) -> Option<&[u8]> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

fn as_string(v: &Value) -> Option<String> {
    as_bytes(v).and_then(|b| String::from_utf8(b.to_vec()).ok())
}

fn format_tag(payload: Option<&Payload>) -> &'static str {
    match payload.map(Payload::format) {
        None => "",
        Some(Format::Json) => "j",
        Some(Format::MsgPack) => "m",
    }
}

/// One stream entry `[id, [field, value, …]]` as a publication.
fn publication(entry: &Value) -> Option<Publication> {
    let Value::Array(parts) = entry else { return None };
    let [id, Value::Array(fields)] = parts.as_slice() else { return None };
    let id = as_string(id)?;
    let offset: u64 = id.split('-').next()?.parse().ok()?;
    let (mut time_ms, mut event, mut format, mut data) = (0u64, None, "", None);
    for pair in fields.chunks(2) {
        let [name, value] = pair else { return None };
        match as_bytes(name)? {
            b"t" => time_ms = as_int(value)?.try_into().ok()?,
            b"e" => event = as_string(value),
            b"f" => {
                format = match as_bytes(value)? {
                    b"j" => "j",
                    b"m" => "m",
                    _ => "",
                }
            }
            b"d" => data = Some(Bytes::copy_from_slice(as_bytes(value)?)),
            _ => {}
        }
    }
    let data = match format {
        "j" => Some(Payload::from_encoded(Format::Json, data?).ok()?),
        "m" => Some(Payload::from_encoded(Format::MsgPack, data?).ok()?),
        _ => None,
    };
    Some(Publication { offset, event: event?, data, time_ms })
}

impl HistoryStore for RedisHistory {
    fn append(&self, room: &str, append: Append) -> BoxFuture<'static, Result<Appended>> {
        let [stream, meta, idem] = self.keys(room);
        let link = self.link.clone();
        let meta_ttl = self.meta_ttl_ms;
        link::store_call(ErrorKind::History, async move {
            let format = format_tag(append.data.as_ref());
            let data: Vec<u8> = append.data.as_ref().map(|p| p.bytes().to_vec()).unwrap_or_default();
            let key = append.idempotency_key.unwrap_or_default();
            let max_age = millis(append.retention.max_age);
            let epoch = format!("{:016x}", crate::util::random_u64());
            let reply: Value = link
                .run("history append", move |mut conn| async move {
                    APPEND
                        .key(stream)
                        .key(meta)
                        .key(idem)
                        .arg(append.event)
                        .arg(format)
                        .arg(data)
                        .arg(key)
                        .arg(append.retention.max_len)
                        .arg(max_age)
                        .arg(epoch)
                        .arg(meta_ttl)
                        .invoke_async(&mut conn)
                        .await
                })
                .await?;
            let parsed = match &reply {
                Value::Array(v) if v.len() == 3 => {
                    as_string(&v[0]).zip(as_int(&v[1])).zip(as_int(&v[2])).map(|((e, o), d)| (e, o, d))
                }
                _ => None,
            };
            let (epoch, offset, duplicate) = parsed.ok_or_else(|| bad_reply("append", &reply))?;
            let offset = u64::try_from(offset).map_err(|_| bad_reply("append", &reply))?;
            Ok(Appended { position: StreamPosition { offset, epoch: Arc::from(epoch) }, duplicate: duplicate == 1 })
        })
    }

    fn read(&self, room: &str, since: Option<StreamPosition>, limit: usize) -> BoxFuture<'static, Result<HistoryRead>> {
        let [stream, meta, idem] = self.keys(room);
        let link = self.link.clone();
        let meta_ttl = self.meta_ttl_ms;
        link::store_call(ErrorKind::History, async move {
            let new_epoch = format!("{:016x}", crate::util::random_u64());
            let (mode, since_offset, expected) = match &since {
                Some(p) => ("after", p.offset, p.epoch.to_string()),
                None => ("newest", 0, String::new()),
            };
            let reply: Value = link
                .run("history read", move |mut conn| async move {
                    READ.key(stream)
                        .key(meta)
                        .key(idem)
                        .arg(mode)
                        .arg(since_offset)
                        .arg(expected)
                        .arg(limit)
                        .arg(new_epoch)
                        .arg(meta_ttl)
                        .invoke_async(&mut conn)
                        .await
                })
                .await?;
            let Value::Array(parts) = &reply else { return Err(bad_reply("read", &reply)) };
            let [epoch, top, oldest, xlen, Value::Array(entries)] = parts.as_slice() else {
                return Err(bad_reply("read", &reply));
            };
            let bad = || bad_reply("read", &reply);
            let epoch = as_string(epoch).ok_or_else(bad)?;
            let top = u64::try_from(as_int(top).ok_or_else(bad)?).map_err(|_| bad())?;
            let oldest = u64::try_from(as_int(oldest).ok_or_else(bad)?).map_err(|_| bad())?;
            let xlen = u64::try_from(as_int(xlen).ok_or_else(bad)?).map_err(|_| bad())?;
            let mut publications = entries.iter().map(publication).collect::<Option<Vec<_>>>().ok_or_else(bad)?;
            let top_position = StreamPosition { offset: top, epoch: Arc::from(epoch.as_str()) };
            let complete = match since {
                Some(pos) if *pos.epoch != *epoch || pos.offset > top => {
                    publications.clear();
                    false
                }
                Some(pos) => {
                    let nothing_trimmed = pos.offset == top || oldest <= pos.offset + 1;
                    let cut = publications.len() > limit;
                    publications.truncate(limit);
                    nothing_trimmed && !cut
                }
                None => {
                    publications.reverse();
                    xlen <= limit as u64 && oldest == 1
                }
            };
            Ok(HistoryRead { publications, top: top_position, complete })
        })
    }
}
