import { test } from "node:test";
import assert from "node:assert/strict";
import { Backoff, closeAction, retryHint } from "../switchboard.js";
import { setup, flush } from "./harness.mjs";

test("backoff ceilings double from 1 s to the 30 s cap, full jitter below them", () => {
  const b = new Backoff({}, () => 0.999999);
  const waits = Array.from({ length: 8 }, () => b.next());
  assert.deepEqual(waits, [999, 1999, 3999, 7999, 15999, 29999, 29999, 29999]);
  const low = new Backoff({}, () => 0);
  assert.deepEqual([low.next(), low.next(), low.next()], [0, 0, 0]);
  b.reset();
  assert.equal(b.attempt, 0);
  assert.equal(b.ceiling(), 1000);
  const big = new Backoff({ initial: 1000, max: 30000 }, () => 0.5);
  big.attempt = 5000; // no overflow to Infinity/NaN after many failures
  assert.equal(big.next(), 15000);
});

test("an attempt that gets no hello within connectTimeout is dropped and retried", async () => {
  const { clock, sockets, statuses } = setup({ draws: [0] });
  sockets[0].open();
  await clock.advance(9999);
  assert.equal(sockets[0].closed, null);
  await clock.advance(1);
  assert.equal(sockets[0].closed, 1000);
  assert.equal(statuses.at(-1).reason.kind, "connect_timeout");
  await clock.advance(0);
  assert.equal(sockets.length, 2);
});

test("the client waits random x ceiling before each attempt and counts attempts", async () => {
  const { clock, sockets, statuses } = setup({ draws: [0.5] });
  sockets[0].drop(); // never opened: attempt 0 failed
  let s = statuses.at(-1);
  assert.equal(s.state, "reconnecting");
  assert.equal(s.retryAt, 500);
  assert.equal(s.reason.kind, "dropped");
  await clock.advance(499);
  assert.equal(sockets.length, 1, "no attempt before the wait is over");
  await clock.advance(1);
  assert.equal(sockets.length, 2);
  sockets[1].drop();
  assert.equal(statuses.at(-1).retryAt, clock.now + 1000); // 0.5 x 2 s
  await clock.advance(1000);
  sockets[2].drop();
  assert.equal(statuses.at(-1).retryAt, clock.now + 2000); // 0.5 x 4 s
  assert.equal(statuses.at(-1).attempt, 3);
});

test("backoff resets only after a connection stayed up 30 s after hello", async () => {
  const { clock, sockets, statuses } = setup({ draws: [0.5] });
  for (let i = 0; i < 3; i++) {
    sockets.at(-1).drop();
    await clock.advance(statuses.at(-1).retryAt - clock.now);
  }
  assert.equal(statuses.at(-1).attempt, 3);
  // Up for 29 s: a flapping server does not reset the backoff.
  sockets.at(-1).start();
  await clock.advance(29000);
  sockets.at(-1).drop(1001);
  assert.equal(statuses.at(-1).attempt, 4);
  assert.equal(statuses.at(-1).retryAt - clock.now, 4000); // 0.5 x 2^3 s
  await clock.advance(4000);
  // Up for 30 s: healthy; the next wait is drawn from the first window again.
  sockets.at(-1).start();
  await clock.advance(30000);
  sockets.at(-1).drop(1001);
  assert.equal(statuses.at(-1).retryAt - clock.now, 500);
  assert.equal(statuses.at(-1).attempt, 1);
});

test("close-code classes: reconnect vs stop", () => {
  for (const c of [1001, 1006, 1009, 1011, 1012, 1013, 1014, 4000, 4001, 4002, 4003, 4499]) assert.equal(closeAction(c), "reconnect", `${c}`);
  for (const c of [1000, 1002, 1003, 1005, 1007, 1008, 1010, 1015, 3000, 4500, 4501, 4999, 5000]) assert.equal(closeAction(c), "stop", `${c}`);
});

test("a stop code closes the client for good; retryNow starts again", async () => {
  const { client, clock, sockets, statuses } = setup();
  sockets[0].start();
  const pending = client.call("x", 1);
  sockets[0].drop(4500);
  assert.equal(statuses.at(-1).state, "closed");
  assert.equal(statuses.at(-1).reason.code, 4500);
  assert.equal(statuses.at(-1).reason.message, "the server ended this session");
  await assert.rejects(pending, { code: "disconnected" });
  await clock.advance(120000);
  assert.equal(sockets.length, 1, "no reconnect after a stop code");
  client.retryNow();
  assert.equal(sockets.length, 2);
  sockets[1].start();
  assert.equal(client.status.state, "open");
  client.close();
  assert.equal(client.status.state, "closed");
  client.retryNow();
  await flush();
  assert.equal(sockets.length, 2, "retryNow does nothing after close()");
});

test("the retry hint of a close: retry_after_ms in a reconnect code's reason", () => {
  assert.equal(retryHint(1013, "try again later; retry_after_ms=2345"), 2345);
  assert.equal(retryHint(4002, "retry_after_ms=10 please"), 10);
  assert.equal(retryHint(1013, "try again later"), 0);
  assert.equal(retryHint(1013, undefined), 0);
  assert.equal(retryHint(4500, "retry_after_ms=1000"), 0, "a stop code has no retry");
  assert.equal(retryHint(1013, "retry_after_ms=99999999999"), 3600000, "capped at an hour");
});

test("a 1013 shed waits at least the server's hint, on top of the backoff", async () => {
  const { clock, sockets, statuses } = setup({ draws: [0.5] });
  // The server upgraded only to say "busy": open, then 1013 with the hint.
  sockets[0].open();
  sockets[0].drop(1013, "try again later; retry_after_ms=4321");
  let s = statuses.at(-1);
  assert.equal(s.state, "reconnecting");
  assert.equal(s.retryAt, 4321, "the hint, not the 500 ms backoff draw");
  assert.match(s.reason.message, /busy/);
  await clock.advance(4320);
  assert.equal(sockets.length, 1, "no attempt before the hint");
  await clock.advance(1);
  assert.equal(sockets.length, 2);
  // A small hint does not shorten the backoff: 0.5 x 2 s.
  sockets[1].open();
  sockets[1].drop(1013, "try again later; retry_after_ms=10");
  assert.equal(statuses.at(-1).retryAt - clock.now, 1000);
});

test("a refused handshake said after the upgrade (4501) stops with a clear status", async () => {
  const { clock, sockets, statuses } = setup();
  sockets[0].open();
  sockets[0].drop(4501, "who are you?");
  const s = statuses.at(-1);
  assert.equal(s.state, "closed");
  assert.equal(s.reason.kind, "unauthorized");
  assert.equal(s.reason.code, 4501);
  assert.match(s.reason.message, /refused.*who are you\?/);
  await clock.advance(120000);
  assert.equal(sockets.length, 1, "no retries after a terminal refusal");
});

test("with a token provider, a 4501 refusal gets one fresh token, then stops", async () => {
  let tokens = 0;
  const { clock, sockets, statuses } = setup({ client: { token: () => `t${++tokens}` } });
  await flush();
  assert.match(sockets[0].url, /access_token=t1/);
  sockets[0].open();
  sockets[0].drop(4501, "token expired");
  assert.equal(statuses.at(-1).state, "reconnecting");
  await clock.advance(statuses.at(-1).retryAt - clock.now);
  await flush();
  assert.equal(sockets.length, 2);
  assert.match(sockets[1].url, /access_token=t2/);
  sockets[1].open();
  sockets[1].drop(4501, "token expired");
  assert.equal(statuses.at(-1).state, "closed");
  assert.equal(statuses.at(-1).reason.kind, "unauthorized");
  await clock.advance(120000);
  assert.equal(sockets.length, 2);
});

test("retryNow while waiting connects at once", async () => {
  const { client, sockets, statuses } = setup({ draws: [0.9] });
  sockets[0].drop();
  assert.ok(statuses.at(-1).retryAt > 0);
  client.retryNow();
  assert.equal(sockets.length, 2);
  assert.equal(client.status.retryAt, null);
  client.retryNow(); // an attempt is running: no second socket
  assert.equal(sockets.length, 2);
});
