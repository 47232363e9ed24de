// Drives the dashboard example (examples/dashboard) in headless Chromium with
// the browser's own EventSource and fetch: samples stream in, a note with
// several lines, unicode and markup goes up by POST and comes back on the
// stream as text, a server-side drop and a server restart are followed by
// the browser's own reconnect, which recovers every event published
// meanwhile from history through Last-Event-ID (no event missed, no
// resync), the page works from another (allowed) origin through CORS, and a
// page from a refused origin is stopped.
//
//   node tests/browser/sse.mjs http://127.0.0.1:A http://127.0.0.1:B http://127.0.0.1:C
//
// A serves the dashboard; B and C serve the same page from other origins (B
// is allowed, C is not). Run by tests/sse_browser.rs. Exits 0 after printing
// "browser sse test passed", 1 with a reason otherwise.

import { chromium } from "playwright-core";

const [base, allowed, refused] = process.argv.slice(2).map((u) => (u || "").replace(/\/+$/, ""));
const TIMEOUT = 15_000;
const OVERALL = 120_000;
const NOTE = "first line\nsecond line — ünïcödé 🎉\n<img src=x onerror=alert(1)>";

let browser = null;
const dialogs = [];
const pageErrors = [];

async function fail(message) {
  console.error(`browser sse test FAILED: ${message}`);
  if (dialogs.length) console.error(`dialogs opened: ${dialogs.join("; ")}`);
  if (pageErrors.length) console.error(`page errors: ${pageErrors.join("; ")}`);
  try {
    await browser?.close();
  } catch {}
  process.exit(1);
}

async function step(what, fn) {
  try {
    return await fn();
  } catch (e) {
    await fail(`${what}: ${e && e.message ? e.message.split("\n")[0] : e}`);
  }
}

async function open(url, name) {
  const context = await browser.newContext();
  const page = await context.newPage();
  page.setDefaultTimeout(TIMEOUT);
  page.on("dialog", async (d) => {
    dialogs.push(`${name}: ${d.type()}(${JSON.stringify(d.message())})`);
    await d.dismiss().catch(() => {});
  });
  page.on("pageerror", (e) => pageErrors.push(`${name}: ${e.message}`));
  await page.goto(url);
  return page;
}

const text = (page, sel) => page.$eval(sel, (el) => el.textContent);
const waitText = (page, sel, want) =>
  page.waitForFunction(([s, w]) => document.querySelector(s)?.textContent === w, [sel, want], { timeout: TIMEOUT });
const waitSeqAbove = (page, n) =>
  page.waitForFunction((m) => Number(document.querySelector("#seq")?.textContent) > m, n, { timeout: TIMEOUT });
const waitOffsetAbove = (page, n) =>
  page.waitForFunction((m) => Number(document.querySelector("#offset")?.textContent) > m, n, { timeout: TIMEOUT });
async function nothingMissed(page) {
  const [missed, resyncs] = [await text(page, "#missed"), await text(page, "#resyncs")];
  if (missed !== "0" || resyncs !== "0") throw new Error(`missed ${missed} events, ${resyncs} resyncs`);
}

async function sendNote(page, note) {
  await page.fill("#note", note);
  await page.click("#send");
  await page.waitForFunction(() => !["", "sending…"].includes(document.querySelector("#sent")?.textContent), null, {
    timeout: TIMEOUT,
  });
  return text(page, "#sent");
}

setTimeout(() => fail(`did not finish within ${OVERALL / 1000} s`), OVERALL).unref();

browser = await step("launch Chromium", () =>
  chromium.launch({ executablePath: process.env.CHROMIUM_PATH || "/usr/bin/chromium", args: ["--no-sandbox"] }),
);

const page = await step("open the dashboard", () => open(`${base}/`, "same-origin"));
await step("the stream goes live", () => waitText(page, "#status", "live"));
await step("samples stream in", () => waitSeqAbove(page, 2));

await step("a note goes up by POST and its reply comes back", async () => {
  const sent = await sendNote(page, NOTE);
  if (sent !== "sent") throw new Error(`#sent is ${JSON.stringify(sent)}`);
});
await step("the note comes back on the stream, every line and character intact, as text", async () => {
  await page.waitForFunction((n) => document.querySelector("#notes li")?.textContent === n, NOTE, { timeout: TIMEOUT });
  if (await page.$("#notes img")) throw new Error("markup in a note was rendered");
});
await step("a bad note is refused with its error on the stream", async () => {
  const sent = await sendNote(page, "   ");
  if (!sent.startsWith("refused: 400")) throw new Error(`#sent is ${JSON.stringify(sent)}`);
});

await step("the browser reconnects by itself after the server drops the stream, and misses nothing", async () => {
  const offset = Number(await text(page, "#offset"));
  const res = await fetch(`${base}/test/kick`);
  if (!res.ok) throw new Error(`kick: ${res.status}`);
  await waitText(page, "#reconnects", "1");
  await waitText(page, "#status", "live");
  await waitOffsetAbove(page, offset + 2);
  if (!(await text(page, "#last-id")).startsWith("s1.")) throw new Error("events carry no resumable id");
  await nothingMissed(page);
  const sent = await sendNote(page, "after the reconnect");
  if (sent !== "sent") throw new Error(`POST on the new session: ${JSON.stringify(sent)}`);
});

await step("a server restart: the browser comes back and recovers what was published meanwhile", async () => {
  const offset = Number(await text(page, "#offset"));
  const res = await fetch(`${base}/test/restart`);
  if (!res.ok) throw new Error(`restart: ${res.status}`);
  await waitText(page, "#reconnects", "2");
  await waitText(page, "#status", "live");
  await waitOffsetAbove(page, offset + 3);
  await nothingMissed(page);
});

const other = await step("open the page from an allowed origin", () => open(`${allowed}/?server=${encodeURIComponent(base)}`, "cross-origin"));
await step("the cross-origin stream goes live (CORS)", () => waitText(other, "#status", "live"));
await step("cross-origin samples stream in", () => waitSeqAbove(other, 0));
await step("a cross-origin POST (preflighted) gets its reply", async () => {
  const sent = await sendNote(other, "hello from another origin");
  if (sent !== "sent") throw new Error(`#sent is ${JSON.stringify(sent)}`);
  await page.waitForFunction(() => document.querySelector("#notes li")?.textContent === "hello from another origin", null, {
    timeout: TIMEOUT,
  });
});

const bad = await step("open the page from a refused origin", () => open(`${refused}/?server=${encodeURIComponent(base)}`, "refused"));
await step("EventSource gives up on the refused origin", () => waitText(bad, "#status", "stopped"));

if (dialogs.length) await fail("a dialog was opened");
if (pageErrors.length) await fail("the page threw");
await browser.close();
console.log("browser sse test passed");
process.exit(0);
