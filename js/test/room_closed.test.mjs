import { test } from "node:test";
import assert from "node:assert/strict";
import { setup, answerJoin } from "./harness.mjs";

async function join(t, name) {
  const j = t.client.join(name);
  answerJoin(t.ws(), {});
  return j;
}

test("a server leave ends the room with room_closed; events after it are ignored; it is not rejoined", async () => {
  const t = setup({ draws: [0] });
  t.sockets[0].start();
  const closed = await join(t, "war-room");
  await join(t, "lobby");
  const got = [];
  const why = [];
  closed.on("*", (d) => got.push(d));
  closed.onClose((e) => why.push(e && { code: e.code, message: e.message }));
  t.ws().recv({ type: "event", room: "war-room", event: "e", data: 1 });
  t.ws().recv({ type: "leave", room: "war-room", message: "closed by a moderator" });
  t.ws().recv({ type: "event", room: "war-room", event: "e", data: 2 });
  assert.deepEqual(got, [1]);
  assert.deepEqual(why, [{ code: "room_closed", message: "closed by a moderator" }]);
  assert.equal(t.client.stats.unknown, 0);
  // A leave without a room is malformed, not a closed room.
  t.ws().recv({ type: "leave" });
  assert.equal(t.client.stats.malformed, 1);

  t.ws().drop();
  await t.clock.advance(0);
  t.ws().start({ connection_id: 2 });
  assert.deepEqual(t.ws().sent.filter((m) => m.type === "join").map((m) => m.room), ["lobby"]);
});
