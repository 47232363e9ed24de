//! The order of a connection's lifecycle hooks: `on_join` and `on_leave`
//! strictly paired, and every hook of one connection run one at a time, in
//! the order of the changes they report.
//!
//! Memberships change on several threads at once: a join's task, the
//! client's own `leave`, `Hub::close_room` from host code, the connection's
//! end. Running a hook where its change happens would let `on_leave` run
//! for a join whose `on_join` never ran (the join was refused after the
//! room closed), or while its `on_join` is still running (on another
//! thread), or `on_join` after the `on_leave` of the same membership (the
//! room closed between a recovery's merge and the hook). So a change only
//! *queues* its hook, under one lock, and whoever finds no hook of that
//! connection running runs the queue, outside the lock; a hook that
//! changes memberships itself (an `on_join` calling `Hub::leave`) queues
//! behind itself instead of deadlocking. The queue of a connection exists
//! only while it has announced memberships or queued hooks, and only when
//! the hub has an `on_join` or `on_leave` hook: without either, the
//! connect and disconnect hooks run where they happen, as before.

use super::session::Session;
use super::{run_hook, Connection, ConnectionId, DisconnectReason, Hub};
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

/// Per connection: the memberships whose `on_join` was queued (and whose
/// `on_leave` is therefore owed), the hooks not yet run, and whether a
/// thread is running them.
#[derive(Default)]
pub(super) struct HookOrder(parking_lot::Mutex<HashMap<ConnectionId, Pending>>);

#[derive(Default)]
struct Pending {
    announced: Vec<Arc<str>>,
    queue: VecDeque<Due>,
    running: bool,
}

enum Due {
    Connect,
    Join(Arc<str>),
    Leave(Arc<str>),
    Disconnect(DisconnectReason),
}

impl Hub {
    /// Whether hooks go through the queue (see the module docs).
    fn ordered_hooks(&self) -> bool {
        self.inner.hooks.join.is_some() || self.inner.hooks.leave.is_some()
    }

    /// A join completed: queues `on_join` if the membership still stands
    /// (checked under the queue's lock, so a removal either comes before,
    /// and there is no `on_join`, or after, and its `on_leave` queues
    /// behind it).
    pub(super) fn hook_joined(&self, session: &Arc<Session>, room: &str) {
        if !self.ordered_hooks() {
            return;
        }
        let start = {
            let mut order = self.inner.hooks.order.0.lock();
            if !session.is_member(room) {
                return;
            }
            let pending = order.entry(session.id).or_default();
            if pending.announced.iter().any(|r| &**r == room) {
                return;
            }
            let room: Arc<str> = Arc::from(room);
            pending.announced.push(room.clone());
            pending.queue.push_back(Due::Join(room));
            !std::mem::replace(&mut pending.running, true)
        };
        if start {
            self.run_hooks(session);
        }
    }

    /// A membership was removed: queues `on_leave` if its `on_join` was.
    pub(super) fn hook_left(&self, session: &Arc<Session>, room: &str) {
        if !self.ordered_hooks() {
            return;
        }
        let start = {
            let mut order = self.inner.hooks.order.0.lock();
            let Some(pending) = order.get_mut(&session.id) else { return };
            let Some(pos) = pending.announced.iter().position(|r| &**r == room) else { return };
            let room = pending.announced.swap_remove(pos);
            pending.queue.push_back(Due::Leave(room));
            !std::mem::replace(&mut pending.running, true)
        };
        if start {
            self.run_hooks(session);
        }
    }

    pub(crate) fn hook_connect(&self, session: &Arc<Session>) {
        if self.inner.hooks.connect.is_some() {
            self.queue_hook(session, Due::Connect);
        }
    }

    pub(crate) fn hook_disconnect(&self, session: &Arc<Session>, reason: &DisconnectReason) {
        if self.inner.hooks.disconnect.is_some() {
            self.queue_hook(session, Due::Disconnect(reason.clone()));
        }
    }

    fn queue_hook(&self, session: &Arc<Session>, due: Due) {
        if !self.ordered_hooks() {
            return self.run_hook_now(session, due);
        }
        let start = {
            let mut order = self.inner.hooks.order.0.lock();
            let pending = order.entry(session.id).or_default();
            pending.queue.push_back(due);
            !std::mem::replace(&mut pending.running, true)
        };
        if start {
            self.run_hooks(session);
        }
    }

    /// Runs `session`'s queued hooks until none is left (hooks queued
    /// meanwhile, by other threads or by the hooks themselves, included).
    fn run_hooks(&self, session: &Arc<Session>) {
        loop {
            let due = {
                let mut order = self.inner.hooks.order.0.lock();
                let Some(pending) = order.get_mut(&session.id) else { return };
                match pending.queue.pop_front() {
                    Some(due) => due,
                    None => {
                        pending.running = false;
                        if pending.announced.is_empty() {
                            order.remove(&session.id);
                        }
                        return;
                    }
                }
            };
            self.run_hook_now(session, due);
        }
    }

    fn run_hook_now(&self, session: &Arc<Session>, due: Due) {
        let hooks = &self.inner.hooks;
        let conn = || Connection(session.clone(), self.clone());
        match due {
            Due::Connect => {
                if let Some(h) = &hooks.connect {
                    run_hook("connect", || h(&conn()));
                }
            }
            Due::Join(room) => {
                if let Some(h) = &hooks.join {
                    run_hook("join", || h(&conn(), &room));
                }
            }
            Due::Leave(room) => {
                if let Some(h) = &hooks.leave {
                    run_hook("leave", || h(&conn(), &room));
                }
            }
            Due::Disconnect(reason) => {
                if let Some(h) = &hooks.disconnect {
                    run_hook("disconnect", || h(&conn(), &reason));
                }
            }
        }
    }
}
