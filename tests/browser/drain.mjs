// The browser client moved by a drain, in headless Chromium: a page
// connected through a load balancer to node A (the balancer sends each new
// connection to the first node whose /readyz is 200) joins room "r"; A is
// drained (close 4002 "reconnect", readiness false first); the client
// reconnects by itself through the same address, lands on node B, rejoins
// "r" and gets B's event.
//
//   node tests/browser/drain.mjs http://BALANCER http://CONTROL
//
// CONTROL has GET /drain (drains A, answers how many it closed) and GET
// /publish (publishes "hello" in "r" on B, answers B's member count of "r").
// Run by tests/drain.rs. Exits 0 after printing "browser drain test
// passed", 1 with a reason otherwise.

import { Run } from "./harness.mjs";

const [base, control] = process.argv.slice(2).map((u) => (u || "").replace(/\/+$/, ""));
const TIMEOUT = 15_000;

const run = new Run("drain", 120_000);
const step = (what, fn) => run.step(what, fn);

await run.launch();
const page = await run.page(await run.profile(), "page", TIMEOUT);

await step("load the page through the balancer", () => page.goto(`${base}/`));
await step("connect and join r", () =>
  page.evaluate(async () => {
    const { connect } = await import("/switchboard.js");
    window.statuses = [];
    window.got = [];
    const client = connect("/ws");
    client.onStatus((s) => window.statuses.push({ state: s.state, code: s.reason?.code ?? null }));
    const room = await client.join("r");
    room.on("hello", (data) => window.got.push(data));
    window.client = client;
  }),
);
await step("open", () => page.waitForFunction(() => window.statuses.some((s) => s.state === "open")));

const closed = await step("drain node A", async () => (await fetch(`${control}/drain`)).text());
if (closed !== "1") await run.fail(`the drain closed ${closed} connections, not 1`);

await step("told to reconnect with 4002, then open again", () =>
  page.waitForFunction(() => {
    const i = window.statuses.findIndex((s) => s.state === "reconnecting" && s.code === 4002);
    return i >= 0 && window.statuses.slice(i).some((s) => s.state === "open");
  }),
);

// Rejoined on B: B's publish reaches the page.
await step("B's event arrives", async () => {
  const deadline = Date.now() + TIMEOUT;
  for (;;) {
    const members = await (await fetch(`${control}/publish`)).text();
    if (members === "1") break;
    if (Date.now() > deadline) throw new Error(`the page never rejoined r on node B (members: ${members})`);
    await new Promise((r) => setTimeout(r, 50));
  }
  await page.waitForFunction(() => window.got.includes("from b"));
});

const statuses = await page.evaluate(() => window.statuses);
console.log(`statuses: ${statuses.map((s) => `${s.state}${s.code ? ` ${s.code}` : ""}`).join(" -> ")}`);
await run.pass();
