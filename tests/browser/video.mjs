// The video-call example in headless Chromium with a fake camera and
// microphone: two pages join one room and call each other; each
// RTCPeerConnection reaches "connected" and decodes video frames
// (getStats: framesDecoded > 0). Then one page reloads mid-call: it comes
// back into the room as a new peer, the other drops the old connection and
// both reach "connected" again with new frames. The layout holds from 360 to
// 1280 px (screenshots at 390 and 1280 px).
//
// The server is then killed (CONTROL /kill): the video keeps flowing (it is
// peer to peer), both pages say they are reconnecting with a countdown;
// after /start, "Retry now" reconnects at once and the call is signaled
// again between the new peers.
//
// Usage: node tests/browser/video.mjs <base url> <control url> <screenshot dir>

import { Run, checkLayout } from "./harness.mjs";

const [base, control, shots] = process.argv.slice(2);
const lever = async (what) => {
  const res = await fetch(`${control}/${what}`);
  if (!res.ok) throw new Error(`${what}: ${res.status}`);
};
const run = new Run("video", 150_000);
const step = (what, fn) => run.step(what, fn);
await run.launch(["--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"]);

async function join(label, name) {
  const context = await run.profile();
  const page = await run.page(context, label, 20_000);
  await page.goto(`${base}/`);
  await page.fill("#name", name);
  await page.fill("#room", "standup");
  await page.click("#call");
  return page;
}

/** Waits until `page` has exactly `n` remote peers, all connected and each
 * past `frames` decoded frames; returns the stats. */
async function connected(page, n, frames = 0) {
  const deadline = Date.now() + 30_000;
  for (;;) {
    const stats = await page.evaluate(() => window.callStats());
    if (stats.length === n && stats.every((s) => s.state === "connected" && s.framesDecoded > frames)) return stats;
    if (Date.now() > deadline) throw new Error(`${page.label}: ${JSON.stringify(stats)}`);
    await page.waitForTimeout(200);
  }
}

const ann = await step("ann starts a call", () => join("ann", "Ann <b>"));
const bob = await step("bob joins the same room", () => join("bob", "Bob"));
const annStats = await step("ann's connection to bob is connected and decodes video", () => connected(ann, 1));
await step("bob's connection to ann is connected and decodes video", () => connected(bob, 1));
await step("presence lists both, names as text", async () => {
  const people = await ann.locator("#people li").allTextContents();
  if (people.length !== 2 || !people.some((t) => t.startsWith("Ann <b>")) || !people.some((t) => t.startsWith("Bob")))
    throw new Error(JSON.stringify(people));
  const label = await bob.locator('.tile:not([data-peer="self"]) .label').textContent();
  if (label !== "Ann <b>") throw new Error(`bob's tile for ann says ${label}`);
});
await step("the status says connected in words", async () => {
  for (const p of [ann, bob]) if ((await p.textContent("#status")) !== "Connected") throw new Error(p.label);
});

// Bob reloads mid-call: a new peer, a new negotiation.
const before = annStats[0].key;
await step("bob reloads the page mid-call", () => bob.reload());
const again = await step("bob is back in the call, connected, decoding video", () => connected(bob, 1));
const annAgain = await step("ann renegotiated with the reloaded bob and decodes his new video", () => connected(ann, 1));
await step("ann's peer for bob is the new one", async () => {
  if (annAgain[0].key === before) throw new Error(`still the old peer ${before}`);
  if ((await ann.locator(".tile").count()) !== 2) throw new Error("an old tile was left behind");
  if (again[0].name !== "Ann <b>") throw new Error(JSON.stringify(again));
});

// The signaling server goes away: the call does not.
await step("the server is killed", () => lever("kill"));
await step("both pages say they are reconnecting, with a countdown and Retry now", async () => {
  for (const p of [ann, bob]) {
    await p.waitForFunction(() => /Reconnecting in \d+ s/.test(document.getElementById("banner-text").textContent));
    if (!(await p.isVisible("#retry-now"))) throw new Error(`${p.label}: no Retry now`);
    if (/\b1006\b|Error/.test(await p.textContent("#banner-text"))) throw new Error(`${p.label}: a raw code`);
  }
});
const during = await step("the video keeps flowing peer to peer meanwhile", () => connected(ann, 1, annAgain[0].framesDecoded));
await step("ann's next retry is a few seconds away", () =>
  ann.waitForFunction(() => {
    const m = /Reconnecting in (\d+) s/.exec(document.getElementById("banner-text").textContent);
    return m && Number(m[1]) >= 3;
  }, null, { timeout: 60000 }),
);
await step("the server is back", () => lever("start"));
await step("Retry now reconnects without waiting for the countdown", async () => {
  await ann.click("#retry-now", { timeout: 2000 });
  await ann.waitForFunction(() => document.getElementById("status").textContent === "Connected", null, { timeout: 5000 });
});
await step("both are connected again and signaled a new call", async () => {
  await bob.waitForFunction(() => document.getElementById("status").textContent === "Connected", null, { timeout: 30000 });
  const a = await connected(ann, 1, 0);
  await connected(bob, 1, 0);
  if (a[0].key === during[0].key) throw new Error("the call was not signaled again");
});
await step("every tile is labeled with its person's name, as text", async () => {
  for (const [p, other] of [[ann, "Bob"], [bob, "Ann <b>"]]) {
    await p.waitForFunction((want) => {
      const label = document.querySelector('.tile:not([data-peer="self"]) .label');
      return label && label.textContent === want;
    }, other, { timeout: 10000 });
  }
});

for (const width of [360, 390, 768, 1280]) {
  await step(`layout at ${width} px`, () =>
    checkLayout(ann, width, { dir: shots, shot: width === 390 || width === 1280 ? "video-call" : undefined }),
  );
}
await run.pass();
