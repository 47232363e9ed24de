import { test } from "node:test";
import assert from "node:assert/strict";
import { setup, flush } from "./harness.mjs";

test("app-level ping after I ms of silence; dead when nothing comes within T", async () => {
  const t = setup({ draws: [0] });
  t.sockets[0].start({ heartbeat_interval_ms: 25000, heartbeat_timeout_ms: 10000 });
  await t.clock.advance(20000);
  t.ws().recv({ type: "event", event: "tick", data: 1 }); // traffic postpones the ping
  await t.clock.advance(24999);
  assert.equal(t.ws().last("ping"), undefined);
  await t.clock.advance(1);
  const ping = t.ws().last("ping");
  assert.ok(ping && Number.isInteger(ping.ref));
  t.ws().recv({ type: "pong", ref: ping.ref });
  await t.clock.advance(10000);
  assert.equal(t.client.status.state, "open", "answered: still open");
  // The next ping is not answered.
  await t.clock.advance(15000);
  assert.equal(t.ws().sent.filter((m) => m.type === "ping").length, 2);
  await t.clock.advance(9999);
  assert.equal(t.client.status.state, "open");
  await t.clock.advance(1);
  assert.equal(t.client.status.state, "reconnecting");
  assert.equal(t.client.status.reason.kind, "heartbeat");
  assert.equal(t.sockets[0].closed, 1000);
});

test("without server heartbeats (I = 0) the client still pings every 25 s", async () => {
  const t = setup();
  t.sockets[0].start({ heartbeat_interval_ms: 0, heartbeat_timeout_ms: 0 });
  await t.clock.advance(25000);
  assert.ok(t.ws().last("ping"));
  await t.clock.advance(10000);
  assert.equal(t.client.status.reason?.kind, "heartbeat");
});

test("server ping envelopes are answered with pong echoing the ref", () => {
  const t = setup();
  t.sockets[0].start();
  t.ws().recv({ type: "ping", ref: 77 });
  t.ws().recv({ type: "ping" });
  assert.deepEqual(t.ws().sent.filter((m) => m.type === "pong"), [{ type: "pong", ref: 77 }, { type: "pong" }]);
});

test("offline: the connection is dropped and nothing is tried until online, then at once", async () => {
  const t = setup({ draws: [0.9] });
  t.sockets[0].start();
  t.win.navigator.onLine = false;
  t.win.dispatchEvent(new Event("offline"));
  assert.equal(t.sockets[0].closed, 1000);
  assert.equal(t.client.status.state, "reconnecting");
  assert.equal(t.client.status.reason.kind, "offline");
  assert.equal(t.client.status.retryAt, null);
  await t.clock.advance(600000);
  assert.equal(t.sockets.length, 1, "no attempts while offline");
  t.win.navigator.onLine = true;
  t.win.dispatchEvent(new Event("online"));
  assert.equal(t.sockets.length, 2, "an attempt at once when back online");
  t.ws().start();
  assert.equal(t.client.status.state, "open");
});

test("a page that becomes visible again reconnects at once", async () => {
  const t = setup({ draws: [0.9] });
  const doc = new EventTarget();
  doc.visibilityState = "hidden";
  t.win.document = doc;
  // The document listener is installed at connect: make a client that sees it.
  const { connect } = await import("../switchboard.js");
  const sockets = [];
  class WS {
    constructor() {
      sockets.push(this);
    }
    close() {}
  }
  const c = connect("ws://x/ws", { WebSocket: WS, timers: t.clock, now: () => t.clock.now, random: () => 0.9, window: t.win });
  sockets[0].onclose({ code: 1006 });
  assert.ok(c.status.retryAt > 0);
  doc.visibilityState = "visible";
  doc.dispatchEvent(new Event("visibilitychange"));
  assert.equal(sockets.length, 2);
  c.close();
});

test("token: asked before every attempt, sent as access_token; refreshed at 80% of the lifetime", async () => {
  let n = 0;
  const t = setup({ draws: [0], client: { token: async () => `tok${++n}` } });
  await flush();
  assert.equal(new URL(t.ws().url).searchParams.get("access_token"), "tok1");
  t.ws().start({ expires_in_ms: 10000, refresh: true });
  await t.clock.advance(7999);
  assert.equal(t.ws().last("refresh"), undefined);
  await t.clock.advance(1);
  const r = t.ws().last("refresh");
  assert.deepEqual(r.data, { token: "tok2" });
  t.ws().recv({ type: "reply", ref: r.ref, data: { expires_in_ms: 5000 } });
  await flush();
  await t.clock.advance(3999);
  assert.equal(t.ws().last("refresh").ref, r.ref);
  await t.clock.advance(1);
  assert.deepEqual(t.ws().last("refresh").data, { token: "tok3" });
  t.ws().drop(4003);
  await t.clock.advance(0);
  await flush();
  assert.equal(new URL(t.ws().url).searchParams.get("access_token"), "tok4");
});

test("direct events reach onEvent listeners; events for rooms not joined are ignored", () => {
  const t = setup();
  t.sockets[0].start();
  const got = [];
  t.client.onEvent("notice", (d, i) => got.push(["notice", d, i.room]));
  t.client.onEvent("*", (d, i) => got.push(["*", i.event]));
  t.ws().recv({ type: "event", event: "notice", data: "noon" });
  t.ws().recv({ type: "event", room: "elsewhere", event: "notice", data: "x" });
  assert.deepEqual(got, [["notice", "noon", null], ["*", "notice"]]);
});
