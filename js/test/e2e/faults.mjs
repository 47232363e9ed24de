// switchboard.js against a server that stops sending, over real sockets in
// Node's own WebSocket. Run by tests/faults.rs:
//
//   node --experimental-websocket js/test/e2e/faults.mjs ws://PROXY/ http://CONTROL
//
// The client reaches the server through the test's fault proxy; the control
// server gives the levers: `/stall` (the proxy stops passing what the server
// sends, on this connection and on new ones; every socket stays open),
// `/resume`, `/publish?from=A&to=B` (events `m` {n} into recoverable room
// "r"). The server's heartbeat is I = T = 500 ms, said in `hello`.
// Checks:
// 1. the stalled server is found by the client's liveness rule (a ping
//    after I ms of silence, nothing within T): status "reconnecting",
//    reason "heartbeat";
// 2. while the network holds new connections, attempts end by the connect
//    timeout (reason "connect_timeout") and are tried again;
// 3. once bytes flow again: status "open", the room rejoined with
//    `recovered: true`, the events published meanwhile once each, in order,
//    no resync; then live events again.
// Prints "js faults test passed" and exits 0, or exits 1 with a reason.

import { connect } from "../../switchboard.js";

const [url, ctl] = process.argv.slice(2);
const OVERALL = 60_000;
setTimeout(() => fail(`still running after ${OVERALL / 1000} s`), OVERALL).unref();

function fail(message) {
  console.error(`js faults test FAILED: ${message}`);
  process.exit(1);
}

function check(cond, what) {
  if (!cond) fail(what);
}

async function lever(path) {
  const r = await fetch(`${ctl}${path}`);
  check(r.ok, `control ${path}: ${r.status}`);
}

/** Resolves once `f()` is true (polled), or fails after `ms`. */
async function until(what, f, ms = 20_000) {
  const end = Date.now() + ms;
  while (!f()) {
    if (Date.now() > end) fail(`timed out waiting for ${what}; ${JSON.stringify(log)}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

const log = { status: [], events: [], joins: [], resync: [] };
const client = connect(url, { backoff: { initial: 50, max: 300 }, connectTimeout: 1500 });
client.onStatus((s) => log.status.push({ state: s.state, kind: s.reason?.kind ?? null, at: Date.now() }));
const room = await client.join("r");
room.on("m", (d, info) => log.events.push({ n: d.n, offset: info.offset }));
room.onJoin((j) => log.joins.push({ rejoin: j.rejoin, recovered: j.recovered }));
room.onResync((r) => log.resync.push(r.reason));
check(client.status.state === "open", `open after the join: ${client.status.state}`);

await lever("/publish?from=1&to=3");
await until("events 1..3", () => log.events.length === 3);

// 1. The server's bytes stop; nothing is closed.
const stalled = Date.now();
await lever("/stall");
await until("the heartbeat to find the silent server", () => log.status.some((s) => s.state === "reconnecting" && s.kind === "heartbeat"));
const found = log.status.find((s) => s.kind === "heartbeat").at - stalled;
await lever("/publish?from=4&to=8");
// 2. Attempts through the stalled network hang and are given up.
await until("an attempt to time out", () => log.status.some((s) => s.state === "reconnecting" && s.kind === "connect_timeout"));
check(client.status.state !== "open", "not open while the server's bytes are held");
check(log.events.length === 3, `nothing arrives while stalled: ${log.events.length}`);

// 3. The network flows again.
await lever("/resume");
await until("open again", () => client.status.state === "open");
await until("events 4..8 recovered", () => log.events.length >= 8);
await lever("/publish?from=9&to=9");
await until("event 9 live", () => log.events.length >= 9);
await new Promise((r) => setTimeout(r, 300));
const ns = log.events.map((e) => e.n);
check(JSON.stringify(ns) === JSON.stringify([1, 2, 3, 4, 5, 6, 7, 8, 9]), `each event once, in order: ${ns}`);
const offsets = log.events.map((e) => e.offset);
check(offsets.every((o, i) => o === i + 1), `offsets 1..9: ${offsets}`);
const rejoin = log.joins.filter((j) => j.rejoin);
check(rejoin.length === 1 && rejoin[0].recovered === true, `one rejoin, recovered: ${JSON.stringify(log.joins)}`);
check(log.resync.length === 0, `no resync: ${log.resync}`);
const timeouts = log.status.filter((s) => s.kind === "connect_timeout").length;
console.log(`stalled server found by the heartbeat after ${found} ms; ${timeouts} attempts timed out while stalled; recovered 4..8 once each, in order`);
client.close();
console.log("js faults test passed");
process.exit(0);
