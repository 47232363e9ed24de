// The video-call example in headless Chromium with a fake camera and
// microphone: two pages join one room and call each other; each
// RTCPeerConnection reaches "connected" and decodes video frames
// (getStats: framesDecoded > 0). Then one page reloads mid-call: it comes
// back into the room as a new peer, the other drops the old connection and
// both reach "connected" again with new frames. The layout holds from 360 to
// 1280 px (screenshots at 390 and 1280 px).
//
// Usage: node tests/browser/video.mjs <base url> <screenshot dir>

import { Run, checkLayout } from "./harness.mjs";

const [base, shots] = process.argv.slice(2);
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

for (const width of [360, 390, 768, 1280]) {
  await step(`layout at ${width} px`, () =>
    checkLayout(ann, width, { dir: shots, shot: width === 390 || width === 1280 ? "video-call" : undefined }),
  );
}
await run.pass();
