// HTTP/2 in headless Chromium (issue 20): one page over HTTPS opens ten
// EventSource streams to one origin, more than the six connections
// HTTP/1.1 would allow, and every one is live: each gets the event
// published after all ten have joined. The page's own load and the publish
// request went over HTTP/2 (`nextHopProtocol` "h2", and the server saw
// HTTP/2). Then a WebSocket from the same page goes over HTTP/2 too (RFC
// 8441 extended CONNECT: the server saw `HTTP/2.0 CONNECT`), gets its hello
// and the reply to a call. Chromium ignores certificate errors for this run only (the
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
await step("a WebSocket on the same origin gets its hello and a reply", async () => {
  const reply = await page.evaluate(
    () =>
      new Promise((resolve, reject) => {
        const ws = new WebSocket(location.origin.replace("https:", "wss:") + "/ws", "switchboard.v1.json");
        ws.onerror = () => reject(new Error("the WebSocket failed"));
        ws.onmessage = (m) => {
          const msg = JSON.parse(m.data);
          if (msg.type === "hello") ws.send(JSON.stringify({ type: "call", ref: 1, event: "echo", data: "over h2" }));
          if (msg.type === "reply" || msg.type === "error") resolve(msg);
        };
      }),
  );
  if (reply.type !== "reply" || reply.data !== "over h2") throw new Error(JSON.stringify(reply));
});
await step("the WebSocket came over HTTP/2 (extended CONNECT)", async () => {
  const seen = await page.evaluate(() => fetch("/test/ws-versions").then((r) => r.text()));
  if (seen !== "HTTP/2.0 CONNECT") throw new Error(`the WebSocket requests came as: ${seen}`);
});
await step("screenshot", async () => {
  mkdirSync(shots, { recursive: true });
  const path = join(shots, "h2-sse.png");
  await page.screenshot({ path });
  console.log(`screenshot: ${path}`);
});
await run.pass();
