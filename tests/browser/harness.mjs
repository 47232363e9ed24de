// What the browser scripts (chat.mjs, sse.mjs) share: named steps that fail
// the run with the step's name, headless Chromium, pages that record dialogs
// and uncaught errors, and the layout check with its screenshots.

import { chromium } from "playwright-core";
import { mkdirSync } from "node:fs";
import { join } from "node:path";

/** A run of one script: `name` prefixes its verdict ("browser NAME test passed"). */
export class Run {
  /** @param {string} name @param {number} overallMs the whole script's limit */
  constructor(name, overallMs) {
    this.name = name;
    this.browser = null;
    this.dialogs = [];
    this.pageErrors = [];
    setTimeout(() => this.fail(`did not finish within ${overallMs / 1000} s`), overallMs).unref();
  }

  async fail(message) {
    console.error(`browser ${this.name} test FAILED: ${message}`);
    if (this.dialogs.length) console.error(`dialogs opened: ${this.dialogs.join("; ")}`);
    if (this.pageErrors.length) console.error(`page errors: ${this.pageErrors.join("; ")}`);
    try {
      await this.browser?.close();
    } catch {}
    process.exit(1);
  }

  /** Runs one named step; any exception fails the run with the step's name. */
  async step(what, fn) {
    try {
      return await fn();
    } catch (e) {
      await this.fail(`${what}: ${e && e.message ? e.message.split("\n")[0] : e}`);
    }
  }

  /** Launches Chromium ($CHROMIUM_PATH or /usr/bin/chromium), with `extra` flags. */
  async launch(extra = []) {
    const executablePath = process.env.CHROMIUM_PATH || "/usr/bin/chromium";
    this.browser = await this.step(`launch ${executablePath} (run \`bash .ci/install-browser.sh\`)`, () =>
      chromium.launch({
        executablePath,
        args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-quic",
          "--no-first-run", "--disable-component-update", "--disable-sync", ...extra],
      }),
    );
  }

  /** A new browser profile (its own localStorage). */
  profile(height = 800) {
    return this.browser.newContext({ viewport: { width: 1280, height } });
  }

  /** A page in `context` whose dialogs and uncaught errors are recorded. */
  async page(context, label, timeoutMs) {
    const page = await context.newPage();
    page.setDefaultTimeout(timeoutMs);
    page.label = label;
    page.on("dialog", async (d) => {
      this.dialogs.push(`${label}: ${d.type()}(${JSON.stringify(d.message())})`);
      await d.dismiss().catch(() => {});
    });
    page.on("pageerror", (e) => this.pageErrors.push(`${label}: ${e.message}`));
    return page;
  }

  /** Fails on any dialog or uncaught page error, else prints the verdict and exits 0. */
  async pass() {
    if (this.dialogs.length) await this.fail("a dialog was opened");
    if (this.pageErrors.length) await this.fail("uncaught errors in the page");
    await this.browser.close();
    console.log(`browser ${this.name} test passed`);
    process.exit(0);
  }
}

/**
 * Resizes `page` to `width` and checks that nothing scrolls sideways;
 * `more` (run in the page) returns extra problems as strings. Saves a
 * screenshot as `<dir>/<shot>-<width>.png` when `shot` is set: the whole
 * page on phones (up to 640 px), the window on wider screens (a full-page
 * capture of a wide window grows the viewport, and with it every height
 * given in `vh`, so it shows a layout no window has).
 */
export async function checkLayout(page, width, { dir, shot, more } = {}) {
  await page.setViewportSize({ width, height: page.viewportSize()?.height ?? 800 });
  // Let resize observers and layout settle (they run before the next paint).
  await page.evaluate(() => new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r))));
  const m = await page.evaluate(() => ({ page: document.scrollingElement.scrollWidth, view: innerWidth }));
  if (m.page > m.view) throw new Error(`the page is ${m.page} px wide in a ${m.view} px viewport`);
  const problems = more ? await page.evaluate(more, width) : [];
  if (problems.length) throw new Error(`at ${width} px: ${problems.join("; ")}`);
  if (shot) {
    mkdirSync(dir, { recursive: true });
    const path = join(dir, `${shot}-${width}.png`);
    await page.screenshot({ path, fullPage: width <= 640 });
    console.log(`screenshot: ${path}`);
  }
}
