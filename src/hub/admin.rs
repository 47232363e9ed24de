//! The admin API: what host code (an admin HTTP endpoint, a CLI, a
//! moderation tool) uses to see and steer the live connections of a hub.
//!
//! | question or action | method |
//! |---|---|
//! | which rooms, how many members | [`Hub::rooms`] |
//! | every connection | [`Hub::connections`] |
//! | one connection | [`Hub::connection_info`] |
//! | a room's connections | [`Hub::room_connections`] |
//! | a user's connections | [`Hub::user_connections`] |
//! | close one connection with a code and reason | [`Hub::disconnect`] |
//! | close all of a user's connections | [`Hub::disconnect_user`] |
//! | shut a room down (members are told with a `leave`) | [`Hub::close_room`] |
//!
//! Everything here is **local to this hub** (this node): lists show the
//! connections served here, and the actions reach them only. On a cluster
//! (a Redis or NATS backplane), run the same call on every node, for
//! example from a host-defined admin command each node subscribes to. Local
//! only is deliberate: the backplane carries room events, and a node that
//! is cut off from it must still answer its own admin calls exactly.
//!
//! Lists are snapshots: a connection may close right after it was listed,
//! and the actions on an id that is already gone do nothing (they return
//! `false` or a count without it).
//!
//! ```no_run
//! use switchboard::protocol::CloseCode;
//! # fn run(hub: switchboard::Hub) {
//! for room in hub.rooms() {
//!     println!("{}: {} members here", room.name, room.members);
//! }
//! for c in hub.user_connections("mallory") {
//!     println!("{} via {} from {:?} since {:?}", c.id, c.transport, c.peer_addr, c.connected_at);
//! }
//! // Ban: every connection of the user, a terminal code (clients do not
//! // reconnect after 4500-4999).
//! hub.disconnect_user("mallory", CloseCode::KICKED, "banned");
//! // Shut a room: each member gets {"type":"leave","room":"war-room","message":"closed by a moderator"}.
//! hub.close_room("war-room", "closed by a moderator");
//! # }
//! ```

use super::*;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, SystemTime};

/// Where and when a connection came from: kept on the session for
/// [`ConnectionInfo`]. Set once, never changed.
///
/// Packed, because every connection holds one for its whole life (issue
/// 16's idle memory): the transport's name as an index into the names seen
/// so far (2 bytes, not a 16-byte `&str`) and the connection time as
/// nanoseconds since the Unix epoch (8 bytes, not a 16-byte `SystemTime`,
/// and as exact): 64 bytes instead of 88.
pub(crate) struct Origin {
    connected_at_ns: u64,
    peer_addr: Option<SocketAddr>,
    /// The address the hub's admission counted (a trusted proxy's
    /// forwarded-for entry) when it differs from the peer's.
    forwarded: Option<IpAddr>,
    /// [`Transport::name`], interned ([`transport_name`]).
    transport: u16,
}

impl Origin {
    pub(crate) fn new(transport: &'static str, handshake: &Handshake) -> Origin {
        let peer_addr = handshake.peer_addr();
        let forwarded = handshake.client_ip().filter(|ip| peer_addr.map(|p| p.ip()) != Some(*ip));
        // A clock before 1970 (or past 2554) reads as the epoch.
        let connected_at_ns = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .ok()
            .and_then(|d| u64::try_from(d.as_nanos()).ok())
            .unwrap_or(0);
        Origin { connected_at_ns, peer_addr, forwarded, transport: intern_transport(transport) }
    }

    /// [`Transport::name`]; also the `transport` label of the metrics.
    pub(crate) fn transport(&self) -> &'static str {
        transport_name(self.transport)
    }

    fn connected_at(&self) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_nanos(self.connected_at_ns)
    }

    fn client_ip(&self) -> Option<IpAddr> {
        self.forwarded.or(self.peer_addr.map(|p| p.ip()))
    }
}

/// Every transport name a connection of this process had, in the order
/// first seen: a process has a handful (`websocket`, `sse`, `memory`, a
/// host's own), so a connection keeps an index. Written once per new name.
static TRANSPORT_NAMES: parking_lot::RwLock<Vec<&'static str>> = parking_lot::RwLock::new(Vec::new());

/// The index standing for every name past the first 65,535 distinct ones
/// (only a transport making up a new name per connection gets there).
const OTHER_TRANSPORT: u16 = u16::MAX;

fn intern_transport(name: &'static str) -> u16 {
    let find = |names: &[&'static str]| names.iter().position(|n| *n == name);
    if let Some(i) = find(&TRANSPORT_NAMES.read()) {
        return i as u16;
    }
    let mut names = TRANSPORT_NAMES.write();
    if let Some(i) = find(&names) {
        return i as u16;
    }
    match u16::try_from(names.len()) {
        Ok(i) if i < OTHER_TRANSPORT => {
            names.push(name);
            i
        }
        _ => OTHER_TRANSPORT,
    }
}

fn transport_name(index: u16) -> &'static str {
    TRANSPORT_NAMES.read().get(usize::from(index)).copied().unwrap_or("other")
}

/// A snapshot of one connection, for the admin API.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConnectionInfo {
    /// Its id (what `hello` told the client as `connection_id`).
    pub id: ConnectionId,
    /// The user id of its identity, if it has one.
    pub user_id: Option<Arc<str>>,
    /// The transport's name ([`Transport::name`]): `"websocket"`, `"sse"`,
    /// `"memory"`, or a host transport's own (`"other"` for a name first
    /// seen after 65,535 distinct ones in this process).
    pub transport: &'static str,
    /// When the hub started serving it (wall clock).
    pub connected_at: SystemTime,
    /// The TCP peer, when the transport knew it (a proxy's address when
    /// the client is behind one). `None` for in-memory transports and for
    /// axum apps not served with `ConnectInfo`.
    pub peer_addr: Option<SocketAddr>,
    /// The client's address as admission counted it: from a trusted
    /// proxy's forwarded-for header (`docs/security.md` §5), else the
    /// peer's address.
    pub client_ip: Option<IpAddr>,
    /// Its lifecycle state (a listed connection may already be closing).
    pub state: ConnectionState,
    /// The rooms it is in on this hub, in no particular order.
    pub rooms: Vec<String>,
    /// Bytes queued for it and not yet written.
    pub queued_bytes: usize,
}

/// One room of the hub, for [`Hub::rooms`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RoomInfo {
    /// The room's name.
    pub name: String,
    /// Its members on this hub (other nodes' members are not counted).
    pub members: usize,
}

impl Session {
    pub(crate) fn info(&self) -> ConnectionInfo {
        let o = &self.origin;
        ConnectionInfo {
            id: self.id,
            user_id: self.identity.user_arc().cloned(),
            transport: o.transport(),
            connected_at: o.connected_at(),
            peer_addr: o.peer_addr,
            client_ip: o.client_ip(),
            state: self.state(),
            rooms: self.rooms.lock().iter().map(|r| r.to_string()).collect(),
            queued_bytes: self.outbox.queued_bytes(),
        }
    }
}

impl Connection {
    /// A snapshot of it for the admin API.
    pub fn info(&self) -> ConnectionInfo {
        self.0.info()
    }

    /// The transport's name ([`ConnectionInfo::transport`]).
    pub fn transport(&self) -> &'static str {
        self.0.origin.transport()
    }

    /// When the hub started serving it ([`ConnectionInfo::connected_at`]).
    pub fn connected_at(&self) -> SystemTime {
        self.0.origin.connected_at()
    }

    /// The TCP peer, if known ([`ConnectionInfo::peer_addr`]).
    pub fn peer_addr(&self) -> Option<SocketAddr> {
        self.0.origin.peer_addr
    }
}

/// Sorted by id: the order connections were accepted in.
fn infos(sessions: impl Iterator<Item = Arc<Session>>) -> Vec<ConnectionInfo> {
    let mut out: Vec<ConnectionInfo> = sessions.map(|s| s.info()).collect();
    out.sort_by_key(|c| c.id);
    out
}

impl Hub {
    /// The rooms with members on this hub and how many, sorted by name.
    pub fn rooms(&self) -> Vec<RoomInfo> {
        let mut out: Vec<RoomInfo> = self
            .inner
            .rooms
            .list()
            .into_iter()
            .map(|(name, members)| RoomInfo { name: name.to_string(), members })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// Every connection of this hub (closing ones included until they are
    /// gone), sorted by id.
    pub fn connections(&self) -> Vec<ConnectionInfo> {
        let sessions: Vec<Arc<Session>> = self.inner.sessions.read().values().cloned().collect();
        infos(sessions.into_iter())
    }

    /// One connection of this hub, if it is still here.
    pub fn connection_info(&self, id: ConnectionId) -> Option<ConnectionInfo> {
        let session = self.inner.sessions.read().get(&id).cloned();
        session.map(|s| s.info())
    }

    /// The connections in `room` on this hub, sorted by id (empty when the
    /// room has no members here).
    pub fn room_connections(&self, room: &str) -> Vec<ConnectionInfo> {
        let Some(r) = self.inner.rooms.get(room) else { return Vec::new() };
        // Cloned out first: `info` locks each session's rooms, which is
        // never done under a room's members lock (sessions lock first).
        let sessions: Vec<Arc<Session>> = r.members.read().values().map(|(_, s, _)| s.clone()).collect();
        infos(sessions.into_iter())
    }

    /// The connections of the user `user` (its identity's user id) on this
    /// hub, sorted by id.
    pub fn user_connections(&self, user: &str) -> Vec<ConnectionInfo> {
        infos(self.user_sessions(user).into_iter())
    }

    pub(super) fn user_sessions(&self, user: &str) -> Vec<Arc<Session>> {
        let users = self.inner.users.read();
        let sessions = self.inner.sessions.read();
        users.get(user).map(|ids| ids.iter().filter_map(|i| sessions.get(i).cloned()).collect()).unwrap_or_default()
    }

    /// Closes every connection of `user` on this hub with `code` and
    /// `reason`, each after what is already queued for it (as
    /// [`Hub::disconnect`]). Returns how many were closed by this call
    /// (connections already closing keep their first reason and are not
    /// counted). The `on_disconnect` hook gets
    /// [`DisconnectReason::Host`].
    ///
    /// Pick the code by what the client should do next (`docs/protocol.md`
    /// §7.1): 4500–4999 (for example [`CloseCode::KICKED`]) and clients stay
    /// away; 4000–4499 (for example [`CloseCode::RECONNECT`]) and they come
    /// back. The reason is cut to 123 bytes on the wire.
    pub fn disconnect_user(&self, user: &str, code: CloseCode, reason: &str) -> usize {
        self.user_sessions(user).iter().filter(|s| s.close_by_host(code, reason)).count()
    }

    /// Shuts `room` down on this hub: every local member is taken out of it
    /// (the `on_leave` hook runs, presence tells the others) and then sent
    ///
    /// ```json
    /// {"type":"leave","room":"<room>","message":"<reason>"}
    /// ```
    ///
    /// after the room's events already queued for it, so it knows it is no
    /// longer a member and must not rejoin on its own (`docs/protocol.md`
    /// §3.3.1). The connections stay open. Returns how many members were
    /// removed.
    ///
    /// A join of the room still on its way (waiting for the backplane or
    /// presence) counts as a member here: it gets the `leave` and its join
    /// then fails with `403 the room was left or closed while joining`.
    ///
    /// The room is gone once its last member left; whether a later `join`
    /// may recreate it is the join authorizer's decision (refuse it there to
    /// keep the room closed). Members on other nodes are not touched: call
    /// this on each node.
    pub fn close_room(&self, room: &str, reason: &str) -> usize {
        let Some(r) = self.inner.rooms.get(room) else { return 0 };
        let sessions: Vec<Arc<Session>> = r.members.read().values().map(|(_, s, _)| s.clone()).collect();
        let mut removed = 0;
        for s in sessions {
            // Out of the room first: from then on no event of the room is
            // queued for it, so the notice is the last thing it gets.
            if self.leave_session(&s, room) {
                removed += 1;
                s.send_parts(&Parts { room: Some(room), message: Some(reason), ..Parts::new(Kind::Leave) });
            }
        }
        removed
    }
}

impl Session {
    /// A host's close; `false` if a close was already decided.
    pub(super) fn close_by_host(&self, code: CloseCode, reason: &str) -> bool {
        let frame = crate::transport::CloseFrame { code, reason: reason.to_owned() };
        self.close_with(DisconnectReason::Host(code), Some(frame), false)
    }
}
