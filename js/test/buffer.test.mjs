import { test } from "node:test";
import assert from "node:assert/strict";
import { setup, answerJoin } from "./harness.mjs";
import { utf8Length } from "../switchboard.js";

const outcome = (p) => p.then((v) => ({ ok: v }), (e) => ({ err: e.code }));

test("offline buffer: bounded by count, drops the oldest first and rejects it with `dropped`", async () => {
  const { client, sockets } = setup({ client: { offlineBuffer: { messages: 3 } } });
  const calls = [1, 2, 3, 4, 5].map((n) => outcome(client.call("n", n)));
  assert.deepEqual(await calls[0], { err: "dropped" });
  assert.deepEqual(await calls[1], { err: "dropped" });
  assert.equal(client.stats.dropped, 2);
  assert.equal(client.buffer.length, 3);
  // Flushed in order once connected.
  sockets[0].start();
  const sent = sockets[0].sent.filter((m) => m.type === "call");
  assert.deepEqual(sent.map((m) => m.data), [3, 4, 5]);
  for (const m of sent) sockets[0].recv({ type: "reply", ref: m.ref, data: m.data * 10 });
  assert.deepEqual(await Promise.all(calls.slice(2)), [{ ok: 30 }, { ok: 40 }, { ok: 50 }]);
});

test("offline buffer: bounded by bytes; a message over the bound is refused", async () => {
  const { client } = setup({ client: { offlineBuffer: { messages: 100, bytes: 200 } } });
  const big = "x".repeat(80);
  const a = outcome(client.call("e", big));
  client.call("e", big).catch(() => {});
  client.call("e", big).catch(() => {}); // 3 x ~110 bytes > 200: the oldest goes
  assert.deepEqual(await a, { err: "dropped" });
  assert.equal(client.buffer.length, 1);
  assert.deepEqual(await outcome(client.call("e", "y".repeat(300))), { err: "too_large" });
});

test("a call written on a dropped connection fails once and is not replayed; `retry: true` is sent again", async () => {
  const { client, clock, sockets } = setup({ draws: [0] });
  sockets[0].start();
  const once = outcome(client.call("pay", 1));
  const safe = outcome(client.call("read", 2, { retry: true }));
  assert.equal(sockets[0].sent.filter((m) => m.type === "call").length, 2);
  sockets[0].drop();
  assert.deepEqual(await once, { err: "disconnected" });
  await clock.advance(0);
  sockets[1].start();
  const again = sockets[1].sent.filter((m) => m.type === "call");
  assert.deepEqual(again.map((m) => m.event), ["read"]);
  sockets[1].recv({ type: "reply", ref: again[0].ref, data: "ok" });
  assert.deepEqual(await safe, { ok: "ok" });
});

test("calls time out; late replies are counted and ignored", async () => {
  const { client, clock, sockets } = setup();
  sockets[0].start();
  const p = outcome(client.call("slow", null, { timeout: 500 }));
  const ref = sockets[0].last("call").ref;
  await clock.advance(500);
  assert.deepEqual(await p, { err: "timeout" });
  sockets[0].recv({ type: "reply", ref, data: 1 });
  sockets[0].recv({ type: "reply", ref: 9999, data: 1 });
  assert.equal(client.stats.late, 2);
  // A timed-out call waiting in the buffer leaves it.
  sockets[0].drop();
  const q = outcome(client.call("x", null, { timeout: 100 }));
  assert.equal(client.buffer.length, 1);
  await clock.advance(100);
  assert.deepEqual(await q, { err: "timeout" });
  assert.equal(client.buffer.length, 0);
});

test("server errors reject with the protocol code and data", async () => {
  const { client, sockets } = setup();
  sockets[0].start();
  const p = client.call("fast", 1);
  sockets[0].recv({ type: "error", ref: sockets[0].last("call").ref, code: 420, message: "rate limit exceeded", data: { retry_after_ms: 20 } });
  await assert.rejects(p, (e) => e.name === "SwitchboardError" && e.code === 420 && e.data.retry_after_ms === 20);
});

test("buffered messages go out after the rejoins, and status is open only then", async () => {
  const { client, sockets, statuses } = setup({ draws: [0] });
  sockets[0].start();
  const joining = client.join("chat:1");
  answerJoin(sockets[0], { epoch: "E", offset: 4 });
  const room = await joining;
  sockets[0].drop();
  const call = outcome(room.call("say", "hi"));
  client.retryNow();
  sockets[1].start();
  assert.deepEqual(sockets[1].sent.map((m) => m.type), ["join"], "only the rejoin before its reply");
  assert.equal(statuses.at(-1).state, "reconnecting");
  answerJoin(sockets[1], { epoch: "E", offset: 4, recovered: true });
  assert.deepEqual(sockets[1].sent.map((m) => m.type), ["join", "call"]);
  assert.equal(statuses.at(-1).state, "open");
  sockets[1].recv({ type: "reply", ref: sockets[1].last("call").ref, data: { ok: true } });
  assert.deepEqual(await call, { ok: { ok: true } });
});

test("ephemeral presence flags are volatile: refused while offline", async () => {
  const { client, sockets } = setup();
  sockets[0].start();
  const j = client.join("r");
  answerJoin(sockets[0], {});
  const room = await j;
  sockets[0].drop();
  assert.deepEqual(await outcome(room.presence.set({ ephemeral: { typing: true } })), { err: "offline" });
  assert.equal(client.buffer.length, 0);
});

test("offline buffer: the byte bound counts UTF-8 bytes, as they go on the wire", async () => {
  const { client } = setup({ client: { offlineBuffer: { messages: 100, bytes: 300 } } });
  // 200 UTF-16 units, 400 bytes: over the bound.
  assert.deepEqual(await outcome(client.call("e", "é".repeat(200))), { err: "too_large" });
  assert.equal(client.buffer.length, 0);
});

test("utf8Length is TextEncoder's length, surrogate pairs and lone surrogates included", () => {
  const enc = new TextEncoder();
  for (const s of ["", "abc", "é", "€uro", "😀", "a😀b", "\ud83d", "x\ude00y", "\ud83d\ud83d\ude00", "日本語", "\u07ff\u0800\uffff"]) {
    assert.equal(utf8Length(s), enc.encode(s).length, JSON.stringify(s));
  }
});
