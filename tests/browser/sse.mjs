// Drives the dashboard example (examples/dashboard, a page on the served
// browser client over SSE) in headless Chromium:
//
// - samples stream in: the cards fill, the chart has a load axis (0–100 %)
//   and a time axis with clock labels;
// - the status is in words and no internal id (session, event id, offset,
//   epoch) is shown anywhere;
// - a note with several lines, unicode and markup goes up with its author
//   and comes back on the stream with author and time, as text; a refused
//   note is explained in words;
// - a server-side drop and a server restart (on a shared history) are
//   followed by the client's own reconnect, which recovers every event
//   published meanwhile: no offset is missing, and no "could not be
//   recovered" notice shows;
// - the page works from another (allowed) origin through CORS, and a page
//   from a refused origin never goes live and says it is reconnecting;
// - nothing scrolls sideways from 360 to 1280 px (screenshots at 390 and
//   1280 px).
//
//   node tests/browser/sse.mjs http://127.0.0.1:A http://127.0.0.1:B http://127.0.0.1:C SCREENSHOT_DIR
//
// A serves the dashboard (with /test/kick and /test/restart); B and C serve
// the same page from other origins (B is allowed, C is not). Run by
// tests/sse_browser.rs. Exits 0 after printing "browser sse test passed", 1
// with a reason otherwise.

import { Run, checkLayout } from "./harness.mjs";

const [base, allowed, refused, shots] = process.argv.slice(2).map((u) => (u || "").replace(/\/+$/, ""));
const TIMEOUT = 15_000;
const NOTE = "first line\nsecond line — ünïcödé 🎉\n<img src=x onerror=alert(1)>";

const run = new Run("sse", 150_000);
const step = (what, fn) => run.step(what, fn);

async function open(url, name) {
  const page = await run.page(await run.profile(900), name, TIMEOUT);
  await page.goto(url);
  return page;
}

const text = (page, sel) => page.$eval(sel, (el) => el.textContent);
const waitText = (page, sel, want) =>
  page.waitForFunction(([s, w]) => document.querySelector(s)?.textContent === w, [sel, want]);
/** Offsets of every event the page shows (sample rows and notes), ascending. */
const offsets = (page) =>
  page.evaluate(() => [...document.querySelectorAll("[data-offset]")].map((e) => Number(e.dataset.offset)).sort((a, b) => a - b));
const top = async (page) => Math.max(...(await offsets(page)));
const waitOffsetAbove = (page, n) =>
  page.waitForFunction((m) => Math.max(...[...document.querySelectorAll("[data-offset]")].map((e) => Number(e.dataset.offset))) > m, n);

/** No offset missing from `from` on, and no resync notice. */
async function nothingMissed(page, from) {
  const seen = (await offsets(page)).filter((o) => o >= from);
  for (let i = 1; i < seen.length; i++) {
    if (seen[i] !== seen[i - 1] + 1) throw new Error(`events ${seen[i - 1] + 1}..${seen[i] - 1} are missing`);
  }
  const notice = await text(page, "#notice");
  if (notice) throw new Error(`the page says: ${notice}`);
}

async function sendNote(page, author, note) {
  await page.fill("#author", author);
  await page.fill("#note", note);
  await page.click("#send");
  await page.waitForFunction(() => !["", "Sending…"].includes(document.querySelector("#sent")?.textContent));
  return text(page, "#sent");
}

/** The dashboard's layout at `width`: nothing scrolls sideways, the time
 * labels do not overlap. */
const layout = (page, width, shot) =>
  checkLayout(page, width, {
    dir: shots,
    shot,
    more: () => {
      const labels = [...document.querySelectorAll("#chart .x-label")].map((l) => l.getBoundingClientRect());
      return labels.slice(1).some((l, i) => l.left < labels[i].right) ? ["time labels overlap"] : [];
    },
  });

await run.launch();

const page = await step("open the dashboard", () => open(`${base}/`, "same-origin"));
await step("the page goes live", () => waitText(page, "#status", "Live"));
await step("samples stream in", () => page.waitForFunction(() => document.querySelectorAll("#samples tr").length >= 5));
await step("the cards show values", async () => {
  for (const id of ["#load", "#rss", "#streams"]) {
    if (!/^\d+(\.\d)?$/.test(await text(page, id))) throw new Error(`${id}: ${await text(page, id)}`);
  }
  if (!/^\d\d:\d\d:\d\d$/.test(await text(page, "#last"))) throw new Error(`#last: ${await text(page, "#last")}`);
});
await step("the chart has a load axis and a time axis", async () => {
  const y = await page.$$eval("#chart .y-label", (ls) => ls.map((l) => l.textContent));
  if (y.join() !== "0%,25%,50%,75%,100%") throw new Error(`y labels ${y}`);
  const x = await page.$$eval("#chart .x-label", (ls) => ls.map((l) => l.textContent));
  if (x.length < 2 || !x.every((t) => /^\d\d:\d\d:\d\d$/.test(t))) throw new Error(`time labels ${x}`);
  const points = await page.$eval("#chart .line", (l) => l.getAttribute("points").split(" ").length);
  if (points < 5) throw new Error(`${points} points drawn`);
});
await step("no internal id is shown", async () => {
  const shown = await page.evaluate(() => document.body.innerText);
  if (/\bs\d+\.|session|offset|epoch|last event|\b[0-9a-f]{12,}\b/i.test(shown)) throw new Error(`shown: ${shown.slice(0, 400)}`);
});

await step("a note goes up with its author and comes back on the stream", async () => {
  const sent = await sendNote(page, "Dana", NOTE);
  if (sent !== "Sent.") throw new Error(`#sent is ${JSON.stringify(sent)}`);
  await page.waitForFunction((n) => document.querySelector("#notes li .text")?.textContent === n, NOTE);
  const head = await page.$eval("#notes li", (li) => ({ author: li.querySelector(".author").textContent, at: li.querySelector(".at").textContent }));
  if (head.author !== "Dana" || !/^\d\d:\d\d:\d\d$/.test(head.at)) throw new Error(JSON.stringify(head));
  if (await page.$("#notes img")) throw new Error("markup in a note was rendered");
});
await step("a blank note is refused, in words", async () => {
  const sent = await sendNote(page, "Dana", "   ");
  if (sent !== "Not sent: a note has 1 to 500 characters.") throw new Error(`#sent is ${JSON.stringify(sent)}`);
});

for (const width of [360, 390, 800, 1280]) {
  const shot = width === 390 || width === 1280 ? "dashboard" : null;
  await step(`the page holds at ${width} px`, () => layout(page, width, shot));
}

await step("the client reconnects by itself after the server drops the stream, and misses nothing", async () => {
  const from = await top(page);
  const res = await fetch(`${base}/test/kick`);
  if (!res.ok) throw new Error(`kick: ${res.status}`);
  await page.waitForFunction(() => document.querySelector("#status")?.textContent !== "Live");
  await waitText(page, "#status", "Live");
  await waitOffsetAbove(page, from + 5);
  await nothingMissed(page, from);
  const sent = await sendNote(page, "Dana", "after the reconnect");
  if (sent !== "Sent.") throw new Error(`a note on the new session: ${JSON.stringify(sent)}`);
});

await step("a server restart: the client comes back and recovers what was published meanwhile", async () => {
  const from = await top(page);
  const res = await fetch(`${base}/test/restart`);
  if (!res.ok) throw new Error(`restart: ${res.status}`);
  await page.waitForFunction(() => document.querySelector("#status")?.textContent !== "Live");
  await waitText(page, "#status", "Live");
  await waitOffsetAbove(page, from + 5);
  await nothingMissed(page, from);
});

const other = await step("open the page from an allowed origin", () => open(`${allowed}/?server=${encodeURIComponent(base)}`, "cross-origin"));
await step("the cross-origin page goes live (CORS)", () => waitText(other, "#status", "Live"));
await step("cross-origin samples stream in", () => other.waitForFunction(() => document.querySelectorAll("#samples tr").length >= 2));
await step("a cross-origin note (preflighted POST) gets through", async () => {
  const sent = await sendNote(other, "Eve", "hello from another origin");
  if (sent !== "Sent.") throw new Error(`#sent is ${JSON.stringify(sent)}`);
  await page.waitForFunction(() => document.querySelector("#notes li .text")?.textContent === "hello from another origin");
});

const bad = await step("open the page from a refused origin", () => open(`${refused}/?server=${encodeURIComponent(base)}`, "refused"));
// The server refuses the origin with 403 and no CORS headers, so the page's
// fetch sees only a failed request, like a network error: the client keeps
// retrying with backoff, and the page says so in words. It never goes live.
await step("the refused page never goes live and says it is reconnecting, in words", async () => {
  await bad.waitForFunction(() => /Reconnecting in \d+ s\./.test(document.querySelector("#banner-text")?.textContent));
  const said = await text(bad, "#banner-text");
  if (/\b[0-9]{3,4}\b(?! s)|HTTP|code|fetch|TypeError/i.test(said)) throw new Error(`banner: ${said}`);
  await layout(bad, 390, "dashboard-refused");
  // The allowed pages got more samples meanwhile; this one got none.
  await waitOffsetAbove(page, (await top(page)) + 3);
  if ((await text(bad, "#status")) === "Live" || (await bad.$$("#samples tr")).length !== 0) throw new Error("the refused page got data");
});

await run.pass();
