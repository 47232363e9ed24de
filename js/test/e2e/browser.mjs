// switchboard.js end to end in headless Chromium (run by tests/js_client.rs):
//
//   node js/test/e2e/browser.mjs http://127.0.0.1:APP http://127.0.0.1:CONTROL
//
// APP serves the page, /switchboard.js, /ws and /events (SSE); CONTROL kills
// and restarts APP and publishes into it. Checks: the served file (type,
// ETag, 304, gzipped size); four pages (two WebSocket, one SSE chosen
// explicitly, one falling back to SSE by itself) join, call, chat across
// transports and see presence (a user with two tabs is one member with two
// metas, typing flags); a typed error; the server is killed and restarted on
// the same port and every page reconnects by itself, shows the status
// transitions and gets every event published meanwhile exactly once and in
// order, plus a call made while it was down; Chromium's offline emulation
// cuts one page off and back. Prints the measured timeline. Exits 0 after
// "js client browser test passed", 1 with a reason otherwise.

import { gzipSync } from "node:zlib";
import { chromium } from "../../../tests/browser/node_modules/playwright-core/index.mjs";

const [base, ctl] = process.argv.slice(2).map((u) => (u || "").replace(/\/+$/, ""));
const TIMEOUT = 20_000;
const OVERALL = 150_000;
const ROOM = "chat:lobby";

let browser = null;
const pageErrors = [];

async function fail(message) {
  console.error(`js client browser test FAILED: ${message}`);
  if (pageErrors.length) console.error(`page errors: ${pageErrors.join("; ")}`);
  try {
    await browser?.close();
  } catch {}
  process.exit(1);
}
setTimeout(() => fail(`still running after ${OVERALL / 1000} s`), OVERALL).unref();

function check(cond, what) {
  if (!cond) throw new Error(what);
}

async function step(what, fn) {
  try {
    return await fn();
  } catch (e) {
    await fail(`${what}: ${e && e.message ? e.message.split("\n").slice(0, 3).join(" | ") : e}`);
  }
}

const control = async (path) => Number(await (await fetch(`${ctl}${path}`)).text());

// In the page: connect, join ROOM, and log everything the client reports.
async function setup(page, opts) {
  await page.evaluate(async ({ url, o, room }) => {
    const log = (window.log = { status: [], events: [], resync: [], joins: [], errors: [], presence: [] });
    // The page's WebSockets, to read the subprotocol the server selected.
    const sockets = (window.sockets = []);
    o.WebSocket = class extends WebSocket {
      constructor(u, p) {
        super(u, p);
        sockets.push(this);
      }
    };
    const c = (window.c = window.sb.connect(url, o));
    c.onStatus((s) => log.status.push({ state: s.state, kind: s.reason?.kind ?? null, retryAt: s.retryAt, transport: s.transport, attempt: s.attempt, at: Date.now() }));
    c.onError((e) => log.errors.push(`${e.kind}: ${e.message}`));
    const r = (window.room = await c.join(room));
    r.on("said", (d, info) => log.events.push({ ...d, offset: info.offset }));
    r.onResync((x) => log.resync.push(x.reason));
    r.onJoin((j) => log.joins.push({ rejoin: j.rejoin, recovered: j.recovered, at: Date.now() }));
    r.presence.onChange((list) => {
      log.presence = list;
    });
    log.presence = r.presence.list();
  }, { url: opts.url, o: opts.o ?? {}, room: ROOM });
}

async function open(name, opts) {
  const context = await browser.newContext();
  const page = await context.newPage();
  page.setDefaultTimeout(TIMEOUT);
  page.on("pageerror", (e) => pageErrors.push(`${name}: ${e.message}`));
  page.on("console", (m) => {
    // The browser's own network messages (a refused WebSocket, a 404) are expected; the client's are not.
    if (m.type() === "error" && m.text().startsWith("switchboard")) pageErrors.push(`${name} console: ${m.text()}`);
  });
  await page.goto(base + "/");
  await page.waitForFunction(() => document.getElementById("state")?.textContent === "ready");
  await setup(page, opts);
  return { name, page, context };
}

const until = (p, fn, arg) => p.page.waitForFunction(fn, arg, { timeout: TIMEOUT, polling: 20 });
const get = (p, fn, arg) => p.page.evaluate(fn, arg);
const state = (p) => get(p, () => window.c.status.state);
const tagged = (p, tag) => get(p, (t) => window.log.events.filter((e) => e.tag === t).map((e) => e.n), tag);

/** Every event of a page once, offsets strictly increasing. */
async function inOrder(p) {
  const offsets = await get(p, () => window.log.events.map((e) => e.offset));
  for (let i = 1; i < offsets.length; i++) check(offsets[i] > offsets[i - 1], `${p.name}: offsets out of order or repeated: ${offsets.join(",")}`);
}

const seq = (n) => Array.from({ length: n }, (_, i) => i);
const same = (a, b) => JSON.stringify(a) === JSON.stringify(b);

browser = await step("launch chromium", () =>
  chromium.launch({ executablePath: process.env.CHROMIUM_PATH || "/usr/bin/chromium", args: ["--no-sandbox"] }),
);

// -- the served file
const size = await step("served file", async () => {
  const res = await fetch(`${base}/switchboard.js`);
  check(res.status === 200, `status ${res.status}`);
  check(res.headers.get("content-type") === "text/javascript; charset=utf-8", `content-type ${res.headers.get("content-type")}`);
  check(res.headers.get("cache-control") === "no-cache", `cache-control ${res.headers.get("cache-control")}`);
  const etag = res.headers.get("etag");
  check(/^"sb-0\.1\.0-[0-9a-f]{16}"$/.test(etag ?? ""), `etag ${etag}`);
  const body = Buffer.from(await res.arrayBuffer());
  const again = await fetch(`${base}/switchboard.js`, { headers: { "if-none-match": etag } });
  check(again.status === 304, `If-None-Match answered ${again.status}`);
  check((await again.arrayBuffer()).byteLength === 0, "304 with a body");
  check(again.headers.get("etag") === etag, "304 without the same etag");
  const other = await fetch(`${base}/switchboard.js`, { headers: { "if-none-match": '"other"' } });
  check(other.status === 200, `a stale ETag answered ${other.status}`);
  const gz = gzipSync(body, { level: 9 }).length;
  check(gz <= 10 * 1024, `gzipped ${gz} bytes, over the 10 KiB budget`);
  return { bytes: body.length, gz };
});

// -- four pages: WebSocket, WebSocket, SSE (explicit), SSE (fallback: no WebSocket at /nows)
const ann = await step("open ann", () => open("ann", { url: "/ws?user=ann" }));
const bob = await step("open bob", () => open("bob", { url: "/ws?user=bob" }));
const cid = await step("open cid", () => open("cid", { url: "/events?user=cid", o: { transport: "sse" } }));
const dan = await step("open dan", () => open("dan", { url: "/nows?user=dan", o: { sse: "/events?user=dan" } }));
const pages = [ann, bob, cid, dan];

await step("transports", async () => {
  for (const p of pages) await until(p, () => window.c.status.state === "open");
  const kinds = await Promise.all(pages.map((p) => get(p, () => window.c.status.transport)));
  check(same(kinds, ["websocket", "websocket", "sse", "sse"]), `transports ${kinds}`);
  // Protocol v2 (compact event arrays) on the WebSocket pages: every event below arrives as an array there.
  const protocols = await Promise.all([ann, bob].map((p) => get(p, () => window.sockets.at(-1)?.protocol)));
  check(same(protocols, ["switchboard.v2.json", "switchboard.v2.json"]), `subprotocols ${protocols}`);
  // The SSE pages ask for it with `protocol=` and the server's hello says it is on.
  const versions = await Promise.all(pages.map((p) => get(p, () => window.c.hello?.version)));
  check(same(versions, [2, 2, 2, 2]), `protocol versions ${versions}`);
});

await step("presence: everyone, self marked", async () => {
  await until(ann, () => window.log.presence.map((m) => m.key).sort().join() === "ann,bob,cid,dan");
  const me = await get(ann, () => window.log.presence.filter((m) => m.self).map((m) => m.key));
  check(same(me, ["ann"]), `ann's own key marked ${me}`);
  await until(cid, () => window.log.presence.length === 4);
});

await step("presence: a second tab of bob is one member with two metas", async () => {
  const bob2 = await open("bob2", { url: "/ws?user=bob" });
  await until(ann, () => window.log.presence.find((m) => m.key === "bob")?.metas.length === 2);
  await until(ann, () => window.log.presence.length === 4);
  await bob2.context.close();
  await until(ann, () => window.log.presence.find((m) => m.key === "bob")?.metas.length === 1);
});

await step("presence: typing flag", async () => {
  await get(bob, () => window.room.presence.set({ ephemeral: { typing: true } }));
  await until(ann, () => window.log.presence.find((m) => m.key === "bob")?.metas[0].ephemeral?.typing === true);
});

await step("chat across WebSocket and SSE", async () => {
  const reply = await get(ann, () => window.room.call("say", { text: "hi from ann" }));
  check(reply?.ok === true, `reply ${JSON.stringify(reply)}`);
  await get(cid, () => window.room.call("say", { text: "hi from cid (sse)" }));
  await get(dan, () => window.room.call("say", { text: "hi from dan (sse fallback)" }));
  for (const p of pages)
    await until(p, () => window.log.events.filter((e) => e.text?.startsWith("hi from")).map((e) => e.from).join() === "ann,cid,dan");
});

await step("typed errors", async () => {
  const e = await get(ann, () => window.c.call("nope").then(() => null, (e) => ({ name: e.name, code: e.code, is: e instanceof window.sb.SwitchboardError })));
  check(e?.name === "SwitchboardError" && e.code === 404 && e.is, `no handler: ${JSON.stringify(e)}`);
  const bad = await get(ann, () => window.room.call("say", { nope: 1 }).then(() => null, (e) => e.code));
  check(bad === 422, `bad payload: ${bad}`);
  const t = await get(ann, () => window.room.call("say", { text: "x" }, { timeout: 0 }).then(() => null, (e) => e.code));
  check(t === "timeout", `timeout: ${t}`);
});

// -- kill the server, publish while it is gone, start it on the same port
const timeline = await step("server killed and restarted", async () => {
  const ws = [ann, bob, cid, dan];
  const killed = await control("/kill");
  for (const p of ws) await until(p, () => window.c.status.state === "reconnecting");
  const firstRetry = await get(ann, () => window.log.status.find((s) => s.state === "reconnecting").retryAt);
  // A call while down waits in the offline buffer.
  const down = get(ann, () => window.room.call("say", { text: "while down" }).then((r) => r.ok, (e) => `${e.code}`));
  // Let the first retry fail against the dead port (attempt counts up).
  await until(ann, () => window.c.status.attempt >= 2 && window.c.status.state === "reconnecting");
  const started = await control(`/start?publish=20&room=${encodeURIComponent(ROOM)}&tag=restart`);
  check((await down) === true, `the buffered call failed: ${await down}`);
  for (const p of ws) {
    await until(p, () => window.c.status.state === "open" && window.log.joins.some((j) => j.rejoin));
    await until(p, () => window.log.events.filter((e) => e.tag === "restart").length >= 20);
    await until(p, () => window.log.events.some((e) => e.text === "while down"));
    const got = await tagged(p, "restart");
    check(same(got, seq(20)), `${p.name} got ${got}`);
    await inOrder(p);
    const joins = await get(p, () => window.log.joins.filter((j) => j.rejoin).map((j) => j.recovered));
    check(same(joins, [true]), `${p.name} rejoins ${joins}`);
    const resync = await get(p, () => window.log.resync);
    check(resync.length === 0, `${p.name} resync ${resync}`);
    const states = await get(p, () => window.log.status.map((s) => s.state));
    check(same(states.slice(0, 2), ["open", "reconnecting"]) && states.at(-1) === "open", `${p.name} status ${states}`);
    const reason = await get(p, () => window.log.status.find((s) => s.state === "reconnecting").kind);
    check(reason === "dropped", `${p.name} reason ${reason}`);
  }
  const opened = await Promise.all(ws.map((p) => get(p, () => window.log.status.findLast((s) => s.state === "open").at)));
  const recovered = await Promise.all(ws.map((p) => get(p, () => window.log.joins.findLast((j) => j.rejoin).at)));
  return { killed, firstRetry, started, opened, recovered };
});

await step("offline emulation", async () => {
  await ann.context.setOffline(true);
  await until(ann, () => window.c.status.state === "reconnecting" && window.c.status.reason?.kind === "offline");
  const s = await get(ann, () => window.c.status);
  check(s.retryAt === null, `retry scheduled while offline: ${JSON.stringify(s)}`);
  await control(`/publish?n=5&room=${encodeURIComponent(ROOM)}&tag=offline`);
  await until(bob, () => window.log.events.filter((e) => e.tag === "offline").length === 5);
  const before = await get(ann, () => window.log.status.length);
  await ann.context.setOffline(false);
  await until(ann, () => window.c.status.state === "open");
  await until(ann, () => window.log.events.filter((e) => e.tag === "offline").length >= 5);
  check(same(await tagged(ann, "offline"), seq(5)), `ann got ${await tagged(ann, "offline")}`);
  await inOrder(ann);
  // Back online: at once (reconnecting, then open), not after a backoff wait.
  const after = await get(ann, (n) => window.log.status.slice(n), before);
  check(after.every((x) => x.retryAt === null), `waited for a backoff after coming online: ${JSON.stringify(after)}`);
});

await step("restart without history: recovered false, resync, nothing of the new stream lost", async () => {
  await control("/kill");
  for (const p of pages) await until(p, () => window.c.status.state === "reconnecting");
  await control("/start?fresh=1");
  for (const p of pages) {
    await until(p, () => window.c.status.state === "open" && window.log.resync.length === 1);
    const r = await get(p, () => [window.log.resync, window.log.joins.at(-1).recovered]);
    check(same(r, [["not_recovered"], false]), `${p.name}: ${JSON.stringify(r)}`);
  }
  // The new stream's offsets start over: none of these may be taken for a duplicate.
  for (let i = 0; i < 3; i++) {
    await get(ann, (i) => window.room.call("say", { text: `fresh ann ${i}` }), i);
    await get(cid, (i) => window.room.call("say", { text: `fresh cid ${i}` }), i);
  }
  const want = ["ann 0", "cid 0", "ann 1", "cid 1", "ann 2", "cid 2"].map((x) => `fresh ${x}`);
  for (const p of pages) {
    await until(p, (n) => window.log.events.filter((e) => e.text?.startsWith("fresh")).length >= n, want.length);
    const got = await get(p, () => window.log.events.filter((e) => e.text?.startsWith("fresh")).map((e) => e.text));
    check(same(got, want), `${p.name} got ${got}`);
  }
});

await step("no errors reported", async () => {
  for (const p of pages) {
    const errors = await get(p, () => window.log.errors);
    check(errors.length === 0, `${p.name}: ${errors.join("; ")}`);
  }
  check(pageErrors.length === 0, pageErrors.join("; "));
});

await browser.close();
const t = timeline;
const rel = (x) => `${x - t.killed} ms`;
console.log(`served file: ${size.bytes} bytes, ${size.gz} bytes gzipped (-9)`);
console.log(`restart timeline (from the kill): first retry scheduled at +${rel(t.firstRetry)}; server listening again at +${rel(t.started)}`);
console.log(`  pages open again at ${t.opened.map(rel).join(", ")}; rooms recovered at ${t.recovered.map(rel).join(", ")}`);
console.log(`  after the server was back: all rooms recovered within ${Math.max(...t.recovered) - t.started} ms`);
console.log("js client browser test passed");
process.exit(0);
