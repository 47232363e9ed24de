import { test } from "node:test";
import assert from "node:assert/strict";
import { setup, answerJoin } from "./harness.mjs";

async function joined(t, name, reply, opts) {
  const j = t.client.join(name, opts);
  const req = answerJoin(t.ws(), reply);
  const room = await j;
  const log = { events: [], resync: [], joins: [], gaps: [] };
  room.on("*", (d, i) => log.events.push(i.offset ?? d));
  room.onResync((r) => log.resync.push(r.reason));
  room.onJoin((x) => log.joins.push(x.recovered));
  room.onGap((g) => log.gaps.push(g.reason));
  return { room, log, req };
}
const ev = (room, offset) => ({ type: "event", room, event: "e", offset, data: null });

test("rejoin after a reconnect carries offset and epoch; replayed duplicates are dropped; exactly once, in order", async () => {
  const t = setup({ draws: [0] });
  t.sockets[0].start();
  const { room, log } = await joined(t, "chat:1", { epoch: "E1", offset: 5 });
  for (const o of [6, 7]) t.ws().recv(ev("chat:1", o));
  t.ws().drop();
  await t.clock.advance(0);
  t.ws().start({ connection_id: 2 });
  const rejoin = t.ws().last("join");
  assert.deepEqual({ room: rejoin.room, offset: rejoin.offset, epoch: rejoin.epoch }, { room: "chat:1", offset: 7, epoch: "E1" });
  answerJoin(t.ws(), { epoch: "E1", offset: 9, recovered: true });
  for (const o of [7, 8, 9, 10, 8]) t.ws().recv(ev("chat:1", o));
  assert.deepEqual(log.events, [6, 7, 8, 9, 10]);
  assert.equal(room.duplicates, 2);
  assert.deepEqual(log.joins, [true]);
  assert.deepEqual(log.resync, []);
});

test("recovered: false is reported and the position starts over at the new stream's head", async () => {
  const t = setup({ draws: [0] });
  t.sockets[0].start();
  const { log } = await joined(t, "chat:1", { epoch: "E1", offset: 20 });
  t.ws().recv(ev("chat:1", 21));
  t.ws().drop(1001);
  await t.clock.advance(0);
  t.ws().start();
  // The server restarted without history: a new epoch, offsets from 1 again.
  answerJoin(t.ws(), { epoch: "E2", offset: 2, recovered: false });
  for (const o of [3, 4, 5]) t.ws().recv(ev("chat:1", o));
  assert.deepEqual(log.events, [21, 3, 4, 5], "events of the new epoch are not taken for duplicates");
  assert.deepEqual(log.resync, ["not_recovered"]);
  t.ws().drop();
  await t.clock.advance(0);
  t.ws().start();
  const again = t.ws().last("join");
  assert.deepEqual([again.offset, again.epoch], [5, "E2"]);
});

test("a room without history asks for resync after a rejoin", async () => {
  const t = setup({ draws: [0] });
  t.sockets[0].start();
  const { log } = await joined(t, "plain", {});
  t.ws().drop();
  await t.clock.advance(0);
  t.ws().start();
  const j = t.ws().last("join");
  assert.equal(j.offset, undefined);
  answerJoin(t.ws(), {});
  assert.deepEqual(log.resync, ["no_history"]);
});

test("rewind on a first join delivers the rewound events; join data is sent on every join", async () => {
  const t = setup();
  t.sockets[0].start();
  const { log, req } = await joined(t, "chat:1", { epoch: "E", offset: 10 }, { rewind: 3, data: { invite: "k" } });
  assert.equal(req.rewind, 3);
  assert.deepEqual(req.data, { invite: "k" });
  for (const o of [8, 9, 10, 11]) t.ws().recv(ev("chat:1", o));
  assert.deepEqual(log.events, [8, 9, 10, 11]);
});

test("gaps: slow_consumer is recovered by leave + join from from-1; missed and epoch_changed ask for resync", async () => {
  const t = setup();
  t.sockets[0].start();
  const { room, log } = await joined(t, "chat:1", { epoch: "E", offset: 0 });
  for (const o of [1, 2]) t.ws().recv(ev("chat:1", o));
  t.ws().recv({ type: "gap", room: "chat:1", data: { from: 3, to: 4, reason: "slow_consumer" } });
  t.ws().recv(ev("chat:1", 5)); // sent before the server saw the leave: dropped as not joined
  const sent = t.ws().sent.slice(-2);
  assert.deepEqual(sent.map((m) => m.type), ["leave", "join"]);
  assert.deepEqual([sent[1].offset, sent[1].epoch], [2, "E"]);
  answerJoin(t.ws(), { epoch: "E", offset: 5, recovered: true });
  for (const o of [3, 4, 5, 6]) t.ws().recv(ev("chat:1", o));
  assert.deepEqual(log.events, [1, 2, 3, 4, 5, 6]);
  assert.deepEqual(log.resync, []);
  t.ws().recv({ type: "gap", room: "chat:1", data: { from: 7, to: 9, reason: "missed" } });
  t.ws().recv(ev("chat:1", 10));
  assert.deepEqual(log.resync, ["missed"]);
  t.ws().recv({ type: "gap", room: "chat:1", data: { reason: "epoch_changed", epoch: "F" } });
  t.ws().recv(ev("chat:1", 1));
  assert.deepEqual(log.resync, ["missed", "epoch_changed"]);
  assert.deepEqual(log.events.slice(-2), [10, 1]);
  assert.deepEqual([room.epoch, room.last], ["F", 1]);
  assert.deepEqual(log.gaps, ["slow_consumer", "missed", "epoch_changed"]);
});

test("a refused rejoin closes the room; leave stops rejoining", async () => {
  const t = setup({ draws: [0] });
  t.sockets[0].start();
  const a = await joined(t, "a", {});
  const b = await joined(t, "b", {});
  let closedWith;
  a.room.onClose((why) => (closedWith = why));
  const left = b.room.leave();
  const leave = t.ws().last("leave");
  assert.equal(leave.room, "b");
  t.ws().recv({ type: "reply", ref: leave.ref, data: { room: "b" } });
  await left;
  t.ws().drop();
  await t.clock.advance(0);
  t.ws().start();
  const joins = t.ws().sent.filter((m) => m.type === "join");
  assert.deepEqual(joins.map((m) => m.room), ["a"]);
  t.ws().recv({ type: "error", ref: joins[0].ref, code: 403, message: "no" });
  assert.equal(closedWith.code, 403);
  assert.equal(t.client.rooms.size, 0);
  assert.equal(t.client.status.state, "open");
});

test("rejoins respect max_inflight and retry a 429 after another answer", async () => {
  const t = setup({ draws: [0] });
  t.sockets[0].start();
  for (const n of ["a", "b", "c"]) await joined(t, n, {});
  t.ws().drop();
  await t.clock.advance(0);
  t.ws().start({ max_inflight: 2 });
  let joins = t.ws().sent.filter((m) => m.type === "join");
  assert.deepEqual(joins.map((m) => m.room), ["a", "b"]);
  t.ws().recv({ type: "error", ref: joins[0].ref, code: 429, message: "busy" });
  joins = t.ws().sent.filter((m) => m.type === "join");
  assert.deepEqual(joins.map((m) => m.room), ["a", "b", "c"]);
  t.ws().recv({ type: "reply", ref: joins[1].ref, data: { room: "b" } });
  joins = t.ws().sent.filter((m) => m.type === "join");
  assert.deepEqual(joins.map((m) => m.room), ["a", "b", "c", "a"]);
  for (const j of joins.slice(2)) t.ws().recv({ type: "reply", ref: j.ref, data: { room: j.room } });
  assert.equal(t.client.status.state, "open");
});

test("a join that timed out but succeeded on the server is left again", async () => {
  const t = setup();
  t.sockets[0].start();
  const j = t.client.join("late", { timeout: 1000 }).catch((e) => e.code);
  const req = t.ws().last("join");
  await t.clock.advance(1000);
  assert.equal(await j, "timeout");
  t.ws().recv({ type: "reply", ref: req.ref, data: { room: "late" } });
  assert.deepEqual(t.ws().last("leave"), { type: "leave", room: "late" });
  assert.equal(t.client.rooms.size, 0);
});

test("a join made again while a given-up join is in flight takes it over and keeps its position", async () => {
  const t = setup({ draws: [0] });
  t.sockets[0].start();
  const j = t.client.join("late", { timeout: 1000 }).catch((e) => e.code);
  const req = t.ws().last("join");
  await t.clock.advance(1000);
  assert.equal(await j, "timeout");
  const again = t.client.join("late");
  await t.clock.advance(0);
  assert.equal(t.ws().sent.filter((m) => m.type === "join").length, 1, "no second join is sent");
  t.ws().recv({ type: "reply", ref: req.ref, data: { room: "late", epoch: "E1", offset: 5 } });
  const room = await again;
  assert.equal(room.name, "late");
  assert.equal(t.ws().last("leave"), undefined, "the taken-over join is not left");
  t.ws().recv(ev("late", 6));
  t.ws().drop();
  await t.clock.advance(0);
  t.ws().start({ connection_id: 2 });
  const rejoin = t.ws().last("join");
  assert.deepEqual({ offset: rejoin.offset, epoch: rejoin.epoch }, { offset: 6, epoch: "E1" }, "the rejoin carries the position");
});

test("unanswered rejoins do not hold the offline buffer forever", async () => {
  const t = setup({ draws: [0] });
  t.sockets[0].start();
  await joined(t, "a", {});
  t.ws().drop();
  const call = t.client.call("c", 1, { timeout: 60000 }).catch((e) => e.code);
  await t.clock.advance(0);
  t.ws().start();
  assert.deepEqual(t.ws().sent.map((m) => m.type), ["join"]);
  await t.clock.advance(10000);
  assert.deepEqual(t.ws().sent.map((m) => m.type), ["join", "call"]);
  assert.equal(t.client.status.state, "open");
  // The late answer still joins the room.
  t.ws().recv({ type: "reply", ref: t.ws().sent[0].ref, data: { room: "a" } });
  assert.equal(t.client.rooms.get("a").joined, true);
  t.ws().recv({ type: "reply", ref: t.ws().sent[1].ref, data: 2 });
  assert.equal(await call, 2);
});

test("after not_recovered a page can reload with leave + join(rewind)", async () => {
  const t = setup({ draws: [0] });
  t.sockets[0].start();
  const { room } = await joined(t, "chat:1", { epoch: "E1", offset: 3 });
  t.ws().drop();
  await t.clock.advance(0);
  t.ws().start();
  answerJoin(t.ws(), { epoch: "E2", offset: 7, recovered: false });
  const left = room.leave();
  t.ws().recv({ type: "reply", ref: t.ws().last("leave").ref, data: { room: "chat:1" } });
  await left;
  const again = t.client.join("chat:1", { rewind: 5 });
  const req = answerJoin(t.ws(), { epoch: "E2", offset: 7 });
  assert.equal(req.rewind, 5);
  assert.equal(req.offset, undefined);
  const fresh = await again;
  assert.notEqual(fresh, room);
  const got = [];
  fresh.on("*", (_d, i) => got.push(i.offset));
  for (const o of [3, 4, 5, 6, 7, 8]) t.ws().recv({ type: "event", room: "chat:1", event: "e", offset: o, data: null });
  assert.deepEqual(got, [3, 4, 5, 6, 7, 8]);
});
