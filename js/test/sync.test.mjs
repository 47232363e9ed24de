import { test } from "node:test";
import assert from "node:assert/strict";
import { Synced, jsonDoc, Reject } from "../sync.js";
import { setup, answerJoin, flush } from "./harness.mjs";

/** The last call of `event` the page sent. */
const lastCall = (ws, event) => ws.sent.filter((m) => m.type === "call" && m.event === event).at(-1);
const reply = (ws, req, data) => ws.recv({ type: "reply", ref: req.ref, data });
const opEvent = (ws, data) => ws.recv({ type: "event", room: "doc:1", event: "sync.op", data });

async function synced(t, state = { items: {} }, version = 3) {
  t.sockets[0].start();
  const j = t.client.join("doc:1");
  answerJoin(t.ws(), {});
  const room = await j;
  const s = new Synced(room, jsonDoc, { clientId: "me", timers: t.clock });
  await flush();
  reply(t.ws(), lastCall(t.ws(), "sync.get"), { version, user: "ann", client_seq: 0, state });
  await s.ready;
  const undone = [];
  s.onRollback((r) => undone.push(r));
  return { s, undone };
}

test("jsonDoc: every op, and refusals for missing paths", () => {
  let d = jsonDoc(null, { type: "set", path: ["items"], value: {} });
  d = jsonDoc(d, { type: "set", path: ["items", "a"], value: { text: "milk" } });
  d = jsonDoc(d, { type: "set", path: ["order"], value: [] });
  d = jsonDoc(d, { type: "insert", path: ["order"], value: "a" });
  d = jsonDoc(d, { type: "insert", path: ["order"], index: 0, value: "b" });
  d = jsonDoc(d, { type: "move", path: ["order"], from: 0, to: 1 });
  d = jsonDoc(d, { type: "increment", path: ["n"], by: 2 });
  assert.deepEqual(d, { items: { a: { text: "milk" } }, order: ["a", "b"], n: 2 });
  d = jsonDoc(d, { type: "remove", path: ["order"], index: 0 });
  d = jsonDoc(d, { type: "delete", path: ["items", "a"] });
  assert.deepEqual(d, { items: {}, order: ["b"], n: 2 });
  for (const op of [
    { type: "delete", path: ["items", "a"] },
    { type: "set", path: ["gone", "x"], value: 1 },
    { type: "remove", path: ["order"], index: 1 },
    { type: "move", path: ["order"], from: 0, to: 2 },
    { type: "increment", path: ["order"], by: 1 },
  ]) {
    assert.throws(() => jsonDoc(structuredClone(d), op), (e) => e instanceof Reject && e.code === 409, JSON.stringify(op));
  }
});

test("a local op shows at once, is sent once with its id, and leaves the queue with its broadcast", async () => {
  const t = setup({ draws: [0] });
  const { s } = await synced(t);
  assert.deepEqual([s.state, s.version, s.synced], [{ items: {} }, 3, true]);
  s.apply({ type: "set", path: ["items", "a"], value: { text: "milk" } });
  s.apply({ type: "set", path: ["items", "b"], value: { text: "eggs" } });
  assert.deepEqual(Object.keys(s.state.items), ["a", "b"], "predicted at once");
  assert.deepEqual(s.confirmed, { items: {} });
  await flush();
  const ops = t.ws().sent.filter((m) => m.event === "sync.op");
  assert.equal(ops.length, 1, "one op in flight at a time");
  assert.deepEqual(ops[0].data, { client: "me", seq: 1, base: 3, op: { type: "set", path: ["items", "a"], value: { text: "milk" } } });
  // Someone else's op first: rebased under the pending ones.
  opEvent(t.ws(), { version: 4, client: "other", seq: 9, user: "bob", base: 3, op: { type: "set", path: ["title"], value: "T" } });
  assert.deepEqual(s.state, { items: { a: { text: "milk" }, b: { text: "eggs" } }, title: "T" });
  opEvent(t.ws(), { version: 5, client: "me", seq: 1, user: "ann", base: 3, op: ops[0].data.op });
  reply(t.ws(), ops[0], { version: 5 });
  await flush();
  assert.equal(s.pending.length, 1);
  const second = lastCall(t.ws(), "sync.op");
  assert.equal(second.data.seq, 2);
  reply(t.ws(), second, { version: 6 });
  await flush();
  assert.equal(s.pending.length, 1, "acknowledged, waiting for its broadcast");
  opEvent(t.ws(), { version: 6, client: "me", seq: 2, user: "ann", base: 3, op: second.data.op });
  assert.deepEqual([s.pending.length, s.version], [0, 6]);
  assert.deepEqual(s.state, s.confirmed);
});

test("a refusal drops the op, recomputes the view and raises a rollback", async () => {
  const t = setup({ draws: [0] });
  const { s, undone } = await synced(t, { items: { a: { text: "milk" } } });
  s.apply({ type: "set", path: ["items", "a", "done"], value: true });
  s.apply({ type: "set", path: ["items", "c"], value: { text: "tea" } });
  await flush();
  const op = lastCall(t.ws(), "sync.op");
  t.ws().recv({ type: "error", ref: op.ref, code: 409, message: 'no value at ["items","a","done"]', data: { version: 4 } });
  opEvent(t.ws(), { version: 4, client: "x", seq: 1, user: "bob", base: 3, op: { type: "delete", path: ["items", "a"] } });
  await flush();
  assert.deepEqual(undone.map((r) => [r.code, r.message]), [[409, 'no value at ["items","a","done"]']]);
  assert.deepEqual(s.state, { items: { c: { text: "tea" } } });
  assert.equal(lastCall(t.ws(), "sync.op").data.seq, 2, "the next op goes out");
  // A local refusal throws and queues nothing.
  assert.throws(() => s.apply({ type: "delete", path: ["items", "zz"] }), Reject);
  assert.equal(s.pending.length, 1);
});

test("ops out of order wait for the missing one; a missing one is fetched after gapWait", async () => {
  const t = setup({ draws: [0] });
  const { s } = await synced(t);
  const inc = (v) => ({ version: v, client: "x", seq: v, user: null, base: v - 1, op: { type: "increment", path: ["n"], by: 1 } });
  opEvent(t.ws(), inc(5));
  assert.equal(s.version, 3, "5 waits for 4");
  opEvent(t.ws(), inc(4));
  assert.deepEqual([s.version, s.state.n], [5, 2]);
  opEvent(t.ws(), inc(7));
  opEvent(t.ws(), { garbage: true });
  await t.clock.advance(1000);
  const get = lastCall(t.ws(), "sync.get");
  assert.deepEqual(get.data, { since: 5, client: "me" });
  reply(t.ws(), get, { version: 7, user: "ann", client_seq: 0, ops: [inc(6), inc(7)] });
  await flush();
  assert.deepEqual([s.version, s.state.n], [7, 4]);
});

test("pending ops survive a reconnect: resync from the version, then resent with the same ids", async () => {
  const t = setup({ draws: [0] });
  const { s } = await synced(t);
  s.apply({ type: "increment", path: ["items", "n"], by: 1 });
  s.apply({ type: "increment", path: ["items", "n"], by: 1 });
  await flush();
  const first = lastCall(t.ws(), "sync.op");
  t.ws().drop();
  await t.clock.advance(0);
  t.ws().start({ connection_id: 2 });
  answerJoin(t.ws(), {});
  await flush();
  assert.equal(s.synced, false);
  const get = lastCall(t.ws(), "sync.get");
  assert.deepEqual(get.data, { since: 3, client: "me" });
  // The first op had been applied before the drop: the server says so.
  reply(t.ws(), get, {
    version: 4, user: "ann", client_seq: 1,
    ops: [{ version: 4, client: "me", seq: 1, user: "ann", base: 3, op: first.data.op }],
  });
  await flush();
  // The library resends the unanswered call (same id): a duplicate ack.
  const resent = t.ws().sent.filter((m) => m.event === "sync.op");
  for (const m of resent) if (m.data.seq === 1) reply(t.ws(), m, { version: 4, duplicate: true });
  await flush();
  const next = lastCall(t.ws(), "sync.op");
  assert.deepEqual([next.data.seq, next.data.base], [2, 3], "the second op, with its original id and base");
  assert.deepEqual([s.synced, s.pending.length, s.state.items.n], [true, 1, 2]);
});

test("a snapshot after the reconnect replaces the confirmed state and the pending ops rebase on it", async () => {
  const t = setup({ draws: [0] });
  const { s } = await synced(t);
  s.apply({ type: "set", path: ["items", "mine"], value: 1 });
  t.ws().drop();
  await t.clock.advance(0);
  t.ws().start({ connection_id: 2 });
  answerJoin(t.ws(), {});
  await flush();
  reply(t.ws(), lastCall(t.ws(), "sync.get"), { version: 90, user: "ann", client_seq: 0, state: { items: { theirs: 2 } } });
  await flush();
  assert.deepEqual(s.state, { items: { theirs: 2, mine: 1 } });
  assert.equal(s.version, 90);
  assert.equal(lastCall(t.ws(), "sync.op").data.seq, 1);
});

test("the pending-op cap: the 1,001st op is refused here with 429, nothing queued, and room is made by a confirmation", async () => {
  const t = setup({ draws: [0] });
  const { s, undone } = await synced(t, { n: 0 });
  const inc = { type: "increment", path: ["n"], by: 1 };
  for (let i = 0; i < 1000; i++) s.apply(inc);
  await flush();
  assert.deepEqual([s.pending.length, s.state.n, s.confirmed.n], [1000, 1000, 0]);
  let changes = 0;
  s.onChange(() => changes++);
  assert.throws(() => s.apply(inc), (e) => e instanceof Reject && e.code === 429 && /too many changes/.test(e.message));
  assert.deepEqual([s.pending.length, s.state.n, s.pending.at(-1).seq, changes], [1000, 1000, 1000, 0], "the refused op left no trace");
  assert.deepEqual(undone, [], "a local refusal is thrown, not rolled back");
  const sent = t.ws().sent.filter((m) => m.event === "sync.op");
  assert.deepEqual(sent.map((m) => m.data.seq), [1], "still one op in flight, the first");
  // The first op confirmed: one slot frees, and the next op gets the next seq.
  opEvent(t.ws(), { version: 4, client: "me", seq: 1, user: "ann", base: 3, op: inc });
  reply(t.ws(), sent[0], { version: 4 });
  await flush();
  assert.equal(s.pending.length, 999);
  s.apply(inc);
  assert.deepEqual([s.pending.length, s.pending.at(-1).seq, s.state.n, s.confirmed.n], [1000, 1001, 1001, 1]);
  assert.throws(() => s.apply(inc), (e) => e instanceof Reject && e.code === 429);
});

test("draining 1,000 pending ops applies each once more, not the whole queue per acknowledgement", async () => {
  const t = setup({ draws: [0] });
  t.sockets[0].start();
  const j = t.client.join("doc:1");
  answerJoin(t.ws(), {});
  const room = await j;
  let runs = 0;
  const counting = (doc, op, cx) => (runs++, jsonDoc(doc, op, cx));
  const s = new Synced(room, counting, { clientId: "me", timers: t.clock });
  await flush();
  reply(t.ws(), lastCall(t.ws(), "sync.get"), { version: 3, user: "ann", client_seq: 0, state: { n: 0 } });
  await s.ready;
  const inc = { type: "increment", path: ["n"], by: 1 };
  for (let i = 0; i < 1000; i++) s.apply(inc);
  await flush();
  const before = runs;
  for (let seq = 1; seq <= 1000; seq++) {
    const sent = t.ws().sent.filter((m) => m.event === "sync.op").at(-1);
    assert.equal(sent.data.seq, seq);
    opEvent(t.ws(), { version: 3 + seq, client: "me", seq, user: "ann", base: sent.data.base, op: inc });
    reply(t.ws(), sent, { version: 3 + seq });
    await flush();
  }
  assert.deepEqual([s.pending.length, s.state.n, s.confirmed.n, s.version], [0, 1000, 1000, 1003]);
  // One application per op (to the confirmed state); replaying the queue on
  // each acknowledgement would be about 500,000.
  assert.ok(runs - before <= 2000, `${runs - before} reducer runs`);
});
