// HTTP/2 in headless Chromium (issue 20): one page over HTTPS opens ten
// EventSource streams to one origin, more than the six connections
// HTTP/1.1 would allow, and every one is live: each gets the event
// published after all ten have joined. The page's own load and the publish
// request went over HTTP/2 (`nextHopProtocol` "h2", and the server saw
// HTTP/2). Chromium ignores certificate errors for this run only (the
// server's certificate is made by the test).
//
//   node tests/browser/h2.mjs https://127.0.0.1:PORT SCREENSHOT_DIR
//
// Run by tests/h2_browser.rs. Exits 0 after printing "browser h2 test
// passed", 1 with a reason otherwise.

import { Run } from "./harness.mjs";
import { join } from "node:path";
import { mkdirSync } from "node:fs";

const [base, shots] = process.argv.slice(2);
const TIMEOUT = 20_000;
const STREAMS = 10;

const run = new Run("h2", 90_000);
const step = (what, fn) => run.step(what, fn);

await run.launch(["--ignore-certificate-errors"]);
const page = await run.page(await run.profile(), "page", TIMEOUT);
await step("open the page over HTTPS", () => page.goto(base + "/"));
await step("the page came over h2", async () => {
  const proto = await page.evaluate(() => performance.getEntriesByType("navigation")[0].nextHopProtocol);
  if (proto !== "h2") throw new Error(`nextHopProtocol is ${proto}`);
});
await step(`${STREAMS} streams open and join`, () =>
  page.waitForFunction((n) => window.joined === n && window.sources.every((s) => s.readyState === 1), STREAMS),
);
await step("publish once all are open; the server sees HTTP/2", async () => {
  const version = await page.evaluate(() => fetch("/test/publish", { method: "POST" }).then((r) => r.text()));
  if (version !== "HTTP/2.0") throw new Error(`the publish request came as ${version}`);
});
await step(`every one of the ${STREAMS} streams gets the event`, () =>
  page.waitForFunction((n) => window.got.size === n, STREAMS),
);
await step("screenshot", async () => {
  mkdirSync(shots, { recursive: true });
  const path = join(shots, "h2-sse.png");
  await page.screenshot({ path });
  console.log(`screenshot: ${path}`);
});
await run.pass();
