//! Rooms: named groups of connections that receive the same events.
//!
//! A room exists while it has members: it is created by the first join and
//! removed with the last leave (or disconnect). Publishing goes to a room's
//! members only — there is no "broadcast to everyone".
//!
//! **Room names** are 1 to 128 bytes of `A–Z a–z 0–9` and `_ - . : / @ # = + ~`
//! ([`validate_room_name`]). The set is chosen so a name is safe as a Redis
//! channel, a NATS subject token and a URL path segment without escaping.

use super::session::log::{Cursor, RoomLog};
use super::session::{Session, Wire};
use super::stream::RoomStream;
use super::ConnectionId;
use super::OverflowPolicy;
use crate::history::RoomHistory;
use parking_lot::RwLock;
use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;

/// Longest room name, in bytes.
pub const MAX_ROOM_NAME_LEN: usize = 128;

/// The punctuation a room name may contain, besides ASCII letters and
/// digits.
pub const ROOM_NAME_PUNCTUATION: &str = "_-.:/@#=+~";

/// Checks a room name against the naming rules; `Err` says why it is invalid.
pub fn validate_room_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("room name is empty");
    }
    if name.len() > MAX_ROOM_NAME_LEN {
        return Err("room name is longer than 128 bytes");
    }
    let ok = name.bytes().all(|b| b.is_ascii_alphanumeric() || ROOM_NAME_PUNCTUATION.as_bytes().contains(&b));
    if !ok {
        return Err("room name has a character outside A-Z a-z 0-9 _ - . : / @ # = + ~");
    }
    Ok(())
}

/// One member of a room, as seen from the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// The member's connection.
    pub connection: ConnectionId,
    /// The user id of the connection's identity, if any.
    pub user_id: Option<Arc<str>>,
}

/// A room's members: each connection's session, the form its frames
/// are queued in, and its cursor in the room's log when it reads one
/// (`session/log.rs`). The form is kept here, beside the pointer, because
/// the fan-out loop reads it for every member: from the map's own memory
/// it costs nothing, from the session it would be one more cache line per
/// member (at 8,000 members, one more miss each).
pub(crate) type MemberMap = HashMap<ConnectionId, (Wire, Arc<Session>, Option<Arc<Cursor>>)>;

/// The members of one room. Publishers hold the read lock while they queue
/// to each member (queueing never awaits); joins and leaves take the write
/// lock briefly.
#[derive(Default)]
pub(crate) struct Room {
    pub(crate) members: RwLock<MemberMap>,
    /// The stream of a recoverable room (`None`: not recoverable, no cost).
    pub(crate) stream: Option<Arc<RoomStream>>,
    /// The logs its members read, one per wire form read
    /// (`session/log.rs`); changed under `members`' write lock only.
    pub(crate) logs: RwLock<Vec<Arc<RoomLog>>>,
}

impl Room {
    /// The member entry of `session`: with a cursor in the log of its form
    /// (made on first use) when it reads logs. Called with `members`' write
    /// lock held (`members` is its map), so nothing is appended meanwhile.
    fn entry(
        &self,
        weak: &std::sync::Weak<Room>,
        session: &Arc<Session>,
        bound: (usize, OverflowPolicy),
    ) -> (Wire, Arc<Session>, Option<Arc<Cursor>>) {
        let wire = session.wire();
        if self.stream.is_some() || !session.reads_logs() || session.outbox.reads_a_log() {
            return (wire, session.clone(), None);
        }
        let mut logs = self.logs.write();
        let log = match logs.iter().find(|l| l.wire == wire) {
            Some(log) => log.clone(),
            None => {
                let log = Arc::new(RoomLog::new(wire, bound.0, bound.1, weak.clone()));
                logs.push(log.clone());
                log
            }
        };
        let cursor = log.cursor();
        // Another join of the same session may have attached one meanwhile.
        if !session.outbox.attach(&cursor) {
            if log.unread() {
                logs.retain(|l| !Arc::ptr_eq(l, &log));
            }
            return (wire, session.clone(), None);
        }
        log.attached();
        (wire, session.clone(), Some(cursor))
    }
}

/// Every room of a hub, sharded by name hash so that joins in different
/// rooms do not contend and publishers only take a shard's read lock long
/// enough to clone the room's `Arc`.
pub(crate) struct Rooms {
    hasher: RandomState,
    shards: Box<[Shard]>,
    /// Each room log's bound and overflow policy: the hub's outbound
    /// queue's.
    log_bound: (usize, OverflowPolicy),
}

type Shard = RwLock<HashMap<Arc<str>, Arc<Room>>>;

const SHARDS: usize = 64;

impl Rooms {
    pub(crate) fn new(log_bound: (usize, OverflowPolicy)) -> Rooms {
        Rooms { hasher: RandomState::new(), shards: (0..SHARDS).map(|_| RwLock::default()).collect(), log_bound }
    }

    fn shard(&self, name: &str) -> &Shard {
        &self.shards[(self.hasher.hash_one(name) as usize) % SHARDS]
    }

    pub(crate) fn get(&self, name: &str) -> Option<Arc<Room>> {
        self.shard(name).read().get(name).cloned()
    }

    /// Adds a member; returns `(room name, created, stream)` where `created`
    /// says the room did not exist before. Membership changes happen under
    /// the shard's write lock so that a room being emptied cannot be joined
    /// through a stale `Arc` and leak.
    ///
    /// A new room is recoverable when `history` is given. In a recoverable
    /// room the member is added as *recovering*: it gets no live event until
    /// its join has merged history and the live stream (see `hub::stream`).
    pub(crate) fn join(
        &self,
        name: &str,
        session: &Arc<Session>,
        history: Option<&RoomHistory>,
    ) -> (Arc<str>, bool, Option<Arc<RoomStream>>) {
        let mut shard = self.shard(name).write();
        if let Some((key, room)) = shard.get_key_value(name) {
            if let Some(stream) = &room.stream {
                stream.add_recovering(session.id);
            }
            let mut members = room.members.write();
            if let std::collections::hash_map::Entry::Vacant(slot) = members.entry(session.id) {
                slot.insert(room.entry(&Arc::downgrade(room), session, self.log_bound));
            }
            drop(members);
            return (key.clone(), false, room.stream.clone());
        }
        let key: Arc<str> = Arc::from(name);
        let room = Arc::new_cyclic(|weak| {
            let room = Room {
                members: RwLock::default(),
                stream: history.map(|h| Arc::new(RoomStream::new(key.clone(), *h, weak.clone()))),
                logs: RwLock::default(),
            };
            let entry = room.entry(weak, session, self.log_bound);
            room.members.write().insert(session.id, entry);
            room
        });
        if let Some(stream) = &room.stream {
            stream.add_recovering(session.id);
        }
        let stream = room.stream.clone();
        shard.insert(key.clone(), room);
        (key, true, stream)
    }

    /// Removes a member; returns `Some(removed_room)` when it was a member,
    /// with `true` when the room is now gone.
    pub(crate) fn leave(&self, name: &str, id: ConnectionId) -> Option<bool> {
        let mut shard = self.shard(name).write();
        let room = shard.get(name)?;
        let mut members = room.members.write();
        let (_, _, cursor) = members.remove(&id)?;
        if let Some(c) = cursor {
            if c.log.detached() {
                // Its last reader: no more appends (`RoomLog::readers`).
                room.logs.write().retain(|l| !Arc::ptr_eq(l, &c.log));
            }
            // It reads what was published while it was a member, no more.
            c.log.clone().depart(c);
        }
        let empty = members.is_empty();
        drop(members);
        // After the members lock: deliveries lock the stream, then members.
        if let Some(stream) = &room.stream {
            stream.remove_recovering(id);
        }
        if empty {
            shard.remove(name);
        }
        Some(empty)
    }

    pub(crate) fn contains(&self, name: &str) -> bool {
        self.shard(name).read().contains_key(name)
    }

    /// The recoverable rooms with local members (for the position check).
    pub(crate) fn streams(&self) -> Vec<Arc<RoomStream>> {
        self.shards
            .iter()
            .flat_map(|s| s.read().values().filter_map(|r| r.stream.clone()).collect::<Vec<_>>())
            .collect()
    }

    /// Every room and its member count (one shard locked at a time).
    pub(crate) fn list(&self) -> Vec<(Arc<str>, usize)> {
        self.shards
            .iter()
            .flat_map(|s| s.read().iter().map(|(k, r)| (k.clone(), r.members.read().len())).collect::<Vec<_>>())
            .collect()
    }

    pub(crate) fn count(&self) -> usize {
        self.shards.iter().map(|s| s.read().len()).sum()
    }

    /// Room memberships of local connections (the sum of member counts).
    #[cfg_attr(not(feature = "metrics"), allow(dead_code))]
    pub(crate) fn memberships(&self) -> usize {
        self.shards.iter().map(|s| s.read().values().map(|r| r.members.read().len()).sum::<usize>()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(validate_room_name("lobby").is_ok());
        assert!(validate_room_name("org:42/chan_1.a-b@c#d=e+f~g").is_ok());
        assert!(validate_room_name(&"a".repeat(128)).is_ok());
        assert!(validate_room_name(&"a".repeat(129)).is_err());
        assert!(validate_room_name("").is_err());
        assert!(validate_room_name("has space").is_err());
        assert!(validate_room_name("$sys").is_err());
        assert!(validate_room_name("wild*").is_err());
        assert!(validate_room_name("ünï").is_err());
    }

    /// A room keeps one log per wire form its members read, and drops a
    /// form's log with its last reader: a form nobody reads costs no
    /// encode and no append per publish. Real WebSocket clients on
    /// loopback, one per form (JSON and MessagePack).
    #[cfg(feature = "ws")]
    #[tokio::test]
    async fn a_room_drops_the_log_of_a_form_nobody_reads() {
        use crate::protocol::Format;
        use crate::transport::{ws::WsTransport, Handshake};
        use crate::Hub;
        use futures::StreamExt;
        use tokio_tungstenite::tungstenite::{protocol::Role, Message};
        use tokio_tungstenite::WebSocketStream;

        // Upgraded sockets without the HTTP handshake (the hub is below
        // the listeners): the server side a `WsTransport`, the client a
        // tokio-tungstenite stream on the other end of a loopback socket.
        let hub = Hub::builder().build();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let wait = std::time::Duration::from_secs(10);
        let mut ids = Vec::new();
        let mut clients = Vec::new();
        for protocol in ["switchboard.v1.json", "switchboard.v1.msgpack"] {
            let client = tokio::net::TcpStream::connect(addr).await.unwrap();
            let (server, _) = listener.accept().await.unwrap();
            let transport = WsTransport::from_upgraded(server, &Default::default(), 64 * 1024).await;
            let hub = hub.clone();
            tokio::spawn(async move { hub.connect(transport, Handshake::new().with_subprotocol(protocol)).await });
            let mut ws = WebSocketStream::from_raw_socket(client, Role::Client, None).await;
            let hello: serde_json::Value = match tokio::time::timeout(wait, ws.next()).await.unwrap().unwrap().unwrap()
            {
                Message::Text(t) => serde_json::from_str(&t).unwrap(),
                Message::Binary(b) => rmp_serde::from_slice(&b).unwrap(),
                other => panic!("hello expected, got {other:?}"),
            };
            ids.push(ConnectionId(hello["data"]["connection_id"].as_u64().unwrap()));
            clients.push(ws);
        }
        let forms = || {
            let room = hub.inner.rooms.get("r");
            let logs = room.as_ref().map(|r| r.logs.read().iter().map(|l| l.wire.format).collect::<Vec<_>>());
            logs.unwrap_or_default()
        };
        for id in &ids {
            hub.join(*id, "r").await.unwrap();
        }
        assert_eq!(forms(), [Format::Json, Format::MsgPack], "one log per form read");
        assert!(hub.leave(ids[1], "r"));
        assert_eq!(forms(), [Format::Json], "the MessagePack form's last reader left");
        hub.publish("r", "e", &1).await.unwrap();
        let got = tokio::time::timeout(wait, clients[0].next()).await.unwrap().unwrap().unwrap();
        assert!(got.to_text().unwrap().contains(r#""event":"e""#), "{got:?}");
        // A reader of the form again: a new log.
        hub.join(ids[1], "r").await.unwrap();
        assert_eq!(forms(), [Format::Json, Format::MsgPack]);
        hub.publish("r", "e", &2).await.unwrap();
        let got = tokio::time::timeout(wait, clients[1].next()).await.unwrap().unwrap().unwrap();
        let got: serde_json::Value = rmp_serde::from_slice(&got.into_data()).unwrap();
        assert_eq!((got["event"].as_str(), got["data"].as_u64()), (Some("e"), Some(2)));
        assert!(hub.leave(ids[0], "r") && hub.leave(ids[1], "r"));
        assert!(forms().is_empty() && !hub.inner.rooms.contains("r"), "the room went with its last member");
    }
}
