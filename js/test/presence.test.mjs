import { test } from "node:test";
import assert from "node:assert/strict";
import { PresenceView } from "../switchboard.js";
import { setup, answerJoin } from "./harness.mjs";

const meta = (ref, extra = {}) => ({ ref, joined_at: 1, meta: {}, ephemeral: {}, ...extra });
const keys = (v) => v.list().map((m) => `${m.key}:${m.metas.map((x) => x.ref).join("+")}`);

test("presence_state replaces everything; diffs add by ref, then remove, then count", () => {
  const v = new PresenceView();
  v.self = "n.1";
  v.state({ count: { keys: 2, connections: 2 }, presences: { ann: { metas: [meta("n.1")] }, bob: { metas: [meta("m.3")] } } });
  assert.deepEqual(keys(v), ["ann:n.1", "bob:m.3"]);
  assert.ok(v.synced);
  // Bob opens a second tab: one key, two metas.
  v.diff({ count: { keys: 2, connections: 3 }, joins: { bob: { metas: [meta("m.4")] } }, leaves: {} });
  assert.deepEqual(keys(v), ["ann:n.1", "bob:m.3+m.4"]);
  assert.deepEqual(v.count, { keys: 2, connections: 3 });
  // A changed meta comes in joins again: replaced by ref, not duplicated.
  v.diff({ joins: { ann: { metas: [meta("n.1", { ephemeral: { typing: true } })] } } });
  assert.deepEqual(keys(v), ["ann:n.1", "bob:m.3+m.4"]);
  assert.equal(v.list()[0].metas[0].ephemeral.typing, true);
  // Bob closes one tab: still online.
  v.diff({ leaves: { bob: { metas: [meta("m.3")] } } });
  assert.deepEqual(keys(v), ["ann:n.1", "bob:m.4"]);
  // ... and the other: gone.
  v.diff({ count: { keys: 1, connections: 1 }, leaves: { bob: { metas: [meta("m.4")] } } });
  assert.deepEqual(keys(v), ["ann:n.1"]);
  // Repeating a join it has, or a leave of what it lacks, is no error.
  v.diff({ joins: { ann: { metas: [meta("n.1")] } }, leaves: { zed: { metas: [meta("z.1")] } } });
  assert.deepEqual(keys(v), ["ann:n.1"]);
  // A new state replaces all.
  v.state({ count: { keys: 1, connections: 1 }, presences: { cy: { metas: [meta("c.1")] } } });
  assert.deepEqual(keys(v), ["cy:c.1"]);
});

test("ephemeral flag changes: set and cleared on the meta by ref, the rest of the meta kept", () => {
  const v = new PresenceView();
  v.state({ count: { keys: 1, connections: 2 }, presences: { ann: { metas: [meta("n.1", { meta: { name: "Ann" } }), meta("n.2", { ephemeral: { cursor: 3 } })] } } });
  v.diff({ count: { keys: 1, connections: 2 }, joins: {}, leaves: {}, ephemeral: { ann: { "n.1": { typing: true } } } });
  const [ann] = v.list();
  assert.deepEqual(ann.metas[0].ephemeral, { typing: true });
  assert.deepEqual(ann.metas[0].meta, { name: "Ann" });
  assert.deepEqual(ann.metas[1].ephemeral, { cursor: 3 });
  // null clears a flag; unknown keys, refs and malformed entries are skipped.
  v.diff({ ephemeral: { ann: { "n.1": { typing: null }, "n.2": { cursor: 4 }, "n.9": { typing: true } }, zed: { "z.1": { typing: true } }, bad: 3 } });
  const [ann2] = v.list();
  assert.deepEqual(ann2.metas[0].ephemeral, {});
  assert.deepEqual(ann2.metas[1].ephemeral, { cursor: 4 });
  assert.deepEqual(keys(v), ["ann:n.1+n.2"]);
});

test("a join and leave of the same ref in one diff: joins first, then leaves", () => {
  const v = new PresenceView();
  v.state({ presences: {} });
  v.diff({ joins: { a: { metas: [meta("x.1")] } }, leaves: { a: { metas: [meta("x.1")] } } });
  assert.deepEqual(keys(v), []);
});

test("self marks this connection's metas and its key (multi-tab user)", () => {
  const v = new PresenceView();
  v.self = "n.2";
  v.state({ presences: { ann: { metas: [meta("n.1"), meta("n.2")] }, bob: { metas: [meta("m.1")] } } });
  const [ann, bob] = v.list();
  assert.equal(ann.self, true);
  assert.deepEqual(ann.metas.map((m) => m.self), [false, true]);
  assert.equal(bob.self, false);
});

test("counts-only rooms keep no list; malformed entries are skipped", () => {
  const v = new PresenceView();
  v.state({ count: { keys: 101, connections: 117 } });
  assert.ok(v.countsOnly);
  assert.deepEqual(v.list(), []);
  v.diff({ count: { keys: 102, connections: 118 } });
  assert.deepEqual(v.count, { keys: 102, connections: 118 });
  v.state({ presences: { a: { metas: [null, 3, { ref: 7 }, meta("ok.1")] }, b: "nope", c: { metas: "x" } }, count: { keys: -1 } });
  assert.deepEqual(keys(v), ["a:ok.1"]);
  assert.deepEqual(v.count, { keys: 102, connections: 118 }, "a bad count is ignored");
});

test("the room feeds presence messages to its view and change listeners", async () => {
  const { client, sockets } = setup();
  sockets[0].start({ node: "nn", connection_id: 7 });
  const j = client.join("lobby");
  answerJoin(sockets[0], {});
  const room = await j;
  const seen = [];
  room.presence.onChange((list) => seen.push(list.map((m) => m.key + (m.self ? "(you)" : ""))));
  sockets[0].recv({ type: "presence_state", room: "lobby", data: { count: { keys: 1, connections: 1 }, presences: { ann: { metas: [meta("nn.7")] } } } });
  sockets[0].recv({ type: "presence_diff", room: "lobby", data: { joins: { bob: { metas: [meta("x.1")] } }, leaves: {} } });
  sockets[0].recv({ type: "presence_diff", room: "other", data: { joins: { eve: { metas: [meta("e.1")] } } } });
  assert.deepEqual(seen, [["ann(you)"], ["ann(you)", "bob"]]);
  assert.deepEqual(room.presence.count(), { keys: 1, connections: 1 });
});
