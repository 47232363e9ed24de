// The todo example (examples/todo) in headless Chromium, boards on Redis:
// two pages add, check, reorder and delete; both edit one item at once and
// converge; the server is killed (CONTROL /kill): both pages say so in
// words with a countdown and "Retry now", keep editing offline (their
// changes are marked as waiting), and after /start one page's changes land
// first, so the other's edit of an item it deleted is rolled back and the
// page says why; a new page then sees the same board (the restart lost
// nothing); one page alone goes offline and edits while the other edits
// live, and back online both show one board with its edits applied once.
// Layout from 360 to 1280 px, screenshots at 390 and 1280 px.
//
// Usage: node tests/browser/todo.mjs <base url> <control url> <screenshot dir>

import { Run, checkLayout } from "./harness.mjs";

const [base, control, shots] = process.argv.slice(2);
const lever = async (what) => {
  const res = await fetch(`${control}/${what}`);
  if (!res.ok) throw new Error(`${what}: ${res.status}`);
};
const run = new Run("todo", 150_000);
const step = (what, fn) => run.step(what, fn);
await run.launch();

async function open(label) {
  const context = await run.profile();
  const page = await run.page(context, label, 20_000);
  await page.goto(`${base}/?board=t1`);
  await page.waitForFunction(() => window.todo && window.todo.doc().synced);
  return page;
}
const doc = (page) => page.evaluate(() => window.todo.doc());
/** JSON with object keys sorted: equal documents, whatever their key order. */
const canon = (v) => JSON.stringify(v, (_, x) => (x && typeof x === "object" && !Array.isArray(x) ? Object.fromEntries(Object.entries(x).sort(([a], [b]) => (a < b ? -1 : 1))) : x));
const texts = (page) => page.locator("#items li .text").allTextContents();
async function until(page, what, fn) {
  const deadline = Date.now() + 15_000;
  for (;;) {
    const d = await doc(page);
    if (fn(d)) return d;
    if (Date.now() > deadline) throw new Error(`${page.label}: ${what}: ${JSON.stringify(d)}`);
    await page.waitForTimeout(50);
  }
}
const settled = (page) => until(page, "settled", (d) => d.pending === 0 && d.synced);
async function add(page, text) {
  await page.fill("#new", text);
  await page.click("#add button");
}
const row = (page, text) => page.locator("#items li", { has: page.locator(".text", { hasText: text }) });

const ann = await step("ann opens the board", () => open("ann"));
const bob = await step("bob opens the board", () => open("bob"));

await step("ann adds items: shown at once, then saved; bob sees them as text", async () => {
  await add(ann, "Milk <b>oat</b>");
  const shown = await texts(ann);
  if (shown[0] !== "Milk <b>oat</b>") throw new Error(`ann's view right after adding: ${JSON.stringify(shown)}`);
  await add(ann, "Eggs");
  await add(ann, "Bread");
  await settled(ann);
  await until(bob, "three items", (d) => Object.keys(d.state?.items ?? {}).length === 3);
  const seen = await texts(bob);
  if (JSON.stringify(seen) !== JSON.stringify(["Milk <b>oat</b>", "Eggs", "Bread"])) throw new Error(JSON.stringify(seen));
  if ((await bob.locator("#items b").count()) !== 0) throw new Error("user text was rendered as HTML");
  if ((await ann.locator("#saved").textContent()) !== "All changes saved.") throw new Error(await ann.locator("#saved").textContent());
});

await step("bob checks, reorders and deletes; ann follows", async () => {
  await row(bob, "Eggs").locator("input[type=checkbox]").check();
  await row(bob, "Bread").getByRole("button", { name: "Move up" }).click();
  await settled(bob);
  await until(ann, "bob's changes", (d) => d.version === 5);
  const order = await texts(ann);
  if (JSON.stringify(order) !== JSON.stringify(["Milk <b>oat</b>", "Bread", "Eggs"])) throw new Error(JSON.stringify(order));
  if (!(await row(ann, "Eggs").getAttribute("class"))?.includes("done")) throw new Error("Eggs is not checked on ann's page");
  await add(bob, "Temporary");
  await settled(bob);
  await row(bob, "Temporary").getByRole("button", { name: "Delete" }).click();
  await settled(bob);
  await until(ann, "the deletion", (d) => d.version === 7 && !Object.values(d.state.items).some((i) => i.text === "Temporary"));
});

await step("both edit the same item at once and converge", async () => {
  await Promise.all([ann, bob].map((p) => row(p, "Bread").getByRole("button", { name: "Edit" }).click()));
  await Promise.all([
    (async () => { await ann.fill("#items li form input", "Bread (ann)"); await ann.press("#items li form input", "Enter"); })(),
    (async () => { await bob.fill("#items li form input", "Bread (bob)"); await bob.press("#items li form input", "Enter"); })(),
  ]);
  const a = await settled(ann);
  const b = await settled(bob);
  const [x, y] = [await until(ann, "version 9", (d) => d.version === 9), await until(bob, "version 9", (d) => d.version === 9)];
  if (canon(x.state) !== canon(y.state)) throw new Error(`diverged: ${JSON.stringify([x.state, y.state])}`);
  const t = await texts(ann);
  if (!t.includes("Bread (ann)") && !t.includes("Bread (bob)")) throw new Error(JSON.stringify(t));
  void a, b;
});

await step("the server dies: both pages say so in words with a countdown and Retry now", async () => {
  await lever("kill");
  for (const p of [ann, bob]) {
    await p.waitForFunction(() => /Reconnecting in \d+ s/.test(document.getElementById("banner-text").textContent));
    const text = await p.locator("#banner-text").textContent();
    if (/\b1006\b|Error:|undefined/.test(text)) throw new Error(`raw codes in the banner: ${text}`);
    if (!(await p.locator("#retry-now").isVisible())) throw new Error("no Retry now");
  }
});

await step("offline: ann deletes Milk, bob edits it and checks Eggs; both marked waiting", async () => {
  await row(ann, "Milk").getByRole("button", { name: "Delete" }).click();
  await row(bob, "Milk").getByRole("button", { name: "Edit" }).click();
  await bob.fill("#items li form input", "Milk (2 bottles)");
  await bob.press("#items li form input", "Enter");
  await row(bob, "Eggs").locator("input[type=checkbox]").uncheck();
  await until(bob, "two pending", (d) => d.pending === 2);
  const saved = await bob.locator("#saved").textContent();
  if (saved !== "2 changes will be sent when you are back online.") throw new Error(saved);
  if ((await bob.locator("#items .saving").count()) !== 2) throw new Error("the waiting items are not marked");
  if ((await texts(bob)).includes("Milk (2 bottles)") !== true) throw new Error("bob's offline edit is not shown");
  await checkLayout(bob, 390, { dir: shots, shot: "todo-offline" });
  await bob.setViewportSize({ width: 1280, height: 800 });
});

await step("back: ann's delete lands first; bob's edit is rolled back with a reason, his check kept", async () => {
  // Bob's network stays down until ann's changes are in, so the order is known.
  await bob.context().setOffline(true);
  await lever("start");
  const retry = async (p) => (await p.locator("#retry-now").isVisible()) && (await p.click("#retry-now", { timeout: 2000 }).catch(() => {}));
  await retry(ann);
  await settled(ann);
  await bob.context().setOffline(false);
  await retry(bob);
  await settled(bob);
  await bob.waitForSelector("#undone li");
  const msg = await bob.locator("#undone li span").first().textContent();
  if (msg !== "Your change (editing an item) was undone: someone else deleted that item.") throw new Error(msg);
  const a = await until(ann, "bob's check", (d) => d.version === 11);
  const b = await until(bob, "same version", (d) => d.version === 11);
  if (canon(a.state) !== canon(b.state)) throw new Error("diverged after the restart");
  const t = await texts(bob);
  if (t.some((x) => x.startsWith("Milk"))) throw new Error(`Milk is still there: ${JSON.stringify(t)}`);
  if ((await row(bob, "Eggs").getAttribute("class"))?.includes("done")) throw new Error("bob's uncheck was lost");
});

await step("a new page after the restart sees the whole board", async () => {
  const carl = await open("carl");
  const c = await settled(carl);
  const a = await doc(ann);
  if (c.version !== a.version || canon(c.state) !== canon(a.state)) throw new Error(JSON.stringify([c, a]));
  await carl.close();
});

await step("ann alone goes offline and edits while bob edits live; back online both show one board, her edits applied once", async () => {
  const v0 = (await settled(ann)).version;
  await settled(bob);
  // Only ann's browser context loses the network; the server and bob stay up.
  await ann.context().setOffline(true);
  await ann.waitForFunction(() => document.getElementById("status").dataset.state !== "open");
  await add(ann, "Jam");
  await row(ann, "Eggs").locator("input[type=checkbox]").check();
  await until(ann, "two pending", (d) => d.pending === 2);
  // Meanwhile bob adds an item and renames another, confirmed at once.
  await add(bob, "Butter");
  await row(bob, "Bread").getByRole("button", { name: "Edit" }).click();
  await bob.fill("#items li form input", "Bread (rye)");
  await bob.press("#items li form input", "Enter");
  await settled(bob);
  await until(bob, "bob's two edits", (d) => d.version === v0 + 2);
  const offline = await doc(ann);
  if (offline.version !== v0) throw new Error(`ann saw bob's edits while offline: ${JSON.stringify(offline)}`);
  const saved = await ann.locator("#saved").textContent();
  if (saved !== "2 changes will be sent when you are back online.") throw new Error(saved);
  const banner = await ann.locator("#banner-text").textContent();
  if (!/offline/i.test(banner)) throw new Error(`ann's banner: ${banner}`);
  if ((await texts(ann)).includes("Butter")) throw new Error("ann shows bob's item while offline");
  await checkLayout(ann, 390, { dir: shots, shot: "todo-one-offline" });
  await checkLayout(ann, 1280, { dir: shots, shot: "todo-one-offline" });

  await ann.context().setOffline(false);
  if (await ann.locator("#retry-now").isVisible()) await ann.click("#retry-now", { timeout: 2000 }).catch(() => {});
  await settled(ann);
  const a = await until(ann, "both pages' edits", (d) => d.version === v0 + 4);
  const b = await until(bob, "ann's offline edits", (d) => d.version === v0 + 4);
  if (canon(a.state) !== canon(b.state)) throw new Error(`diverged: ${JSON.stringify([a.state, b.state])}`);
  for (const p of [ann, bob]) {
    const t = await texts(p);
    if (t.filter((x) => x === "Jam").length !== 1) throw new Error(`${p.label}: ann's offline item is not there once: ${JSON.stringify(t)}`);
    if (!t.includes("Butter") || !t.includes("Bread (rye)")) throw new Error(`${p.label}: bob's live edits are missing: ${JSON.stringify(t)}`);
    if (!(await row(p, "Eggs").getAttribute("class"))?.includes("done")) throw new Error(`${p.label}: ann's offline check was lost`);
  }
  if (JSON.stringify(await texts(ann)) !== JSON.stringify(await texts(bob))) throw new Error("the pages show different boards");
  if ((await ann.locator("#undone li").count()) !== 0) throw new Error("ann got a rollback");
  await checkLayout(ann, 390, { dir: shots, shot: "todo-one-back" });
  await checkLayout(bob, 1280, { dir: shots, shot: "todo-one-back" });
});

await step("the layout holds from 360 to 1280 px", async () => {
  await add(bob, "A long item: " + "word ".repeat(30));
  await settled(bob);
  for (const width of [360, 390, 640, 1024, 1280]) {
    await checkLayout(bob, width, { dir: shots, shot: width === 390 || width === 1280 ? "todo" : undefined });
  }
});

await run.pass();
