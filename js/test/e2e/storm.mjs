// switchboard.js against a real server over real sockets, in Node's own
// WebSocket (a WHATWG WebSocket, like a browser's: a refused upgrade is
// only "1006"). Run by tests/storm.rs:
//
//   node --experimental-websocket js/test/e2e/storm.mjs ws://127.0.0.1:PORT/ws
//
// The server allows one connection at a time and refuses users named
// "bad…" (and requests without `user`) with 401. Browsers always send
// `Origin`, so the client's WebSocket here does too; the server then says
// its refusals after the upgrade, as close codes the page can see.
// Checks:
// 1. shed: with the one slot held, the client gets 1013 with a
//    `retry_after_ms` hint and waits at least that long (its own backoff is
//    set to at most 50 ms), then connects once the slot is free;
// 2. a refused sign-in (4501) stops the client with a clear status and no
//    more attempts;
// 3. with a token provider, one fresh token is tried, then it stops.
// Prints "js storm test passed" and exits 0, or exits 1 with a reason.

import { connect } from "../../switchboard.js";

const url = process.argv[2];
// The page's own origin (the server checks same-origin by default).
const ORIGIN = new URL(url).origin.replace(/^ws/, "http");
const OVERALL = 60_000;

setTimeout(() => fail(`still running after ${OVERALL / 1000} s`), OVERALL).unref();

function fail(message) {
  console.error(`js storm test FAILED: ${message}`);
  process.exit(1);
}

function check(cond, what) {
  if (!cond) fail(what);
}

/** Node's WebSocket with the `Origin` a browser would send; counts sockets. */
function browserSocket(counter) {
  return class extends WebSocket {
    constructor(u, protocols) {
      super(u, { protocols, headers: { origin: ORIGIN } });
      counter.n++;
    }
  };
}

/** Resolves with the first status that passes `f`. */
function waitStatus(client, statuses, f, what, ms = 20_000) {
  const hit = statuses.find(f);
  if (hit) return Promise.resolve(hit);
  return new Promise((resolve) => {
    const timer = setTimeout(() => fail(`timed out waiting for ${what}; statuses ${JSON.stringify(statuses.slice(-3))}`), ms);
    const off = client.onStatus((s) => {
      if (f(s)) {
        clearTimeout(timer);
        off?.();
        // The copy `watch` recorded (registered first), with its time.
        resolve(statuses.at(-1));
      }
    });
  });
}

function watch(client) {
  const statuses = [];
  client.onStatus((s) => statuses.push({ ...s, at: Date.now() }));
  return statuses;
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// 1. Shed with a hint, honoured on top of a tiny backoff.
{
  // The holder: a plain WebSocket (no Origin) that takes the one slot.
  const holder = new WebSocket(`${url}?user=holder`, ["switchboard.v1.json"]);
  await new Promise((resolve, reject) => {
    holder.onmessage = () => resolve();
    holder.onerror = () => reject(new Error("holder could not connect"));
  }).catch((e) => fail(e.message));

  const sockets = { n: 0 };
  const client = connect(`${url}?user=alice`, {
    WebSocket: browserSocket(sockets),
    backoff: { initial: 10, max: 50 },
  });
  const statuses = watch(client);
  const shed = await waitStatus(client, statuses, (s) => s.state === "reconnecting" && s.reason?.code === 1013 && s.retryAt != null, "a 1013 shed");
  const wait = shed.retryAt - shed.at;
  check(wait >= 1000, `the client waits the server's hint (at least 1 s), not its 50 ms backoff: ${wait} ms`);
  check(/busy/.test(shed.reason.message), `the status says the server is busy: ${shed.reason.message}`);
  const attempts = sockets.n;
  await sleep(Math.max(0, wait - 300));
  check(sockets.n === attempts, `no attempt before the hint: ${sockets.n} sockets, ${attempts} before`);
  holder.close(1000);
  const open = await waitStatus(client, statuses, (s) => s.state === "open", "the connection after the slot came free");
  check(open.at - shed.at >= wait - 50, "connected only after the hint");
  console.log(`shed: 1013 with a ${wait} ms hint, honoured; connected after ${open.at - shed.at} ms (${sockets.n} sockets)`);
  client.close();
  await sleep(100);
}

// 2. A refused sign-in stops the client.
{
  const sockets = { n: 0 };
  const client = connect(`${url}?user=bad`, { WebSocket: browserSocket(sockets), backoff: { initial: 10, max: 50 } });
  const statuses = watch(client);
  const closed = await waitStatus(client, statuses, (s) => s.state === "closed", "the client to stop after 4501");
  check(closed.reason.code === 4501 && closed.reason.kind === "unauthorized", `reason ${JSON.stringify(closed.reason)}`);
  check(/who are you/.test(closed.reason.message), `the server's words are in the status: ${closed.reason.message}`);
  await sleep(500);
  check(sockets.n === 1, `one attempt only, got ${sockets.n}`);
  console.log(`refused: closed with ${closed.reason.code} "${closed.reason.message}" after ${sockets.n} attempt`);
}

// 3. With a token provider: one fresh token, then stop.
{
  const sockets = { n: 0 };
  let tokens = 0;
  const client = connect(url, {
    WebSocket: browserSocket(sockets),
    backoff: { initial: 10, max: 50 },
    token: () => `bad${++tokens}`,
    tokenParam: "user",
  });
  const statuses = watch(client);
  const closed = await waitStatus(client, statuses, (s) => s.state === "closed", "the client to stop after two 4501");
  check(closed.reason.code === 4501, `reason ${JSON.stringify(closed.reason)}`);
  await sleep(500);
  check(sockets.n === 2 && tokens === 2, `two attempts with two tokens, got ${sockets.n} sockets, ${tokens} tokens`);
  console.log(`token: ${tokens} tokens tried, then closed`);
}

console.log("js storm test passed");
process.exit(0);
