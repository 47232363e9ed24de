// Drives the chat example (examples/chat) in headless Chromium: two users in
// two browser contexts chat in "lobby", see each other online and typing
// (presence), and markup sent as a message must be shown as text, never run.
//
//   node tests/browser/chat.mjs http://127.0.0.1:3000
//
// Run by tests/browser.rs against an in-process server. Needs Chromium at
// $CHROMIUM_PATH or /usr/bin/chromium and `npm ci` here: both come from
// `bash .ci/install-browser.sh`. Exits 0 after printing
// "browser chat test passed", 1 with a reason otherwise.

import { chromium } from "playwright-core";

const base = (process.argv[2] || "").replace(/\/+$/, "");
const TIMEOUT = 15_000; // every single wait
const OVERALL = 120_000; // the whole script
const XSS = "<img src=x onerror=alert(1)>";

let browser = null;
const dialogs = [];
const pageErrors = [];

async function fail(message) {
  console.error(`browser chat test FAILED: ${message}`);
  if (dialogs.length) console.error(`dialogs opened: ${dialogs.join("; ")}`);
  if (pageErrors.length) console.error(`page errors: ${pageErrors.join("; ")}`);
  try {
    await browser?.close();
  } catch {}
  process.exit(1);
}

/** Runs one named step; any exception fails the test with the step's name. */
async function step(what, fn) {
  try {
    return await fn();
  } catch (e) {
    await fail(`${what}: ${e && e.message ? e.message.split("\n")[0] : e}`);
  }
}

async function openUser(name) {
  const context = await browser.newContext();
  const page = await context.newPage();
  page.setDefaultTimeout(TIMEOUT);
  page.on("dialog", async (d) => {
    dialogs.push(`${name}: ${d.type()}(${JSON.stringify(d.message())})`);
    await d.dismiss().catch(() => {});
  });
  page.on("pageerror", (e) => pageErrors.push(`${name}: ${e.message}`));
  // Every WebSocket frame the page sends and receives, parsed.
  page.frames_ = { sent: [], received: [] };
  page.on("websocket", (socket) => {
    const parse = (list) => (f) => {
      try {
        list.push(JSON.parse(f.payload));
      } catch {}
    };
    socket.on("framesent", parse(page.frames_.sent));
    socket.on("framereceived", parse(page.frames_.received));
  });
  await page.goto(`${base}/`);
  await page.fill("#name", name);
  await page.click("#connect");
  await page.waitForFunction(() => document.querySelector("#status")?.textContent === "connected", null, { timeout: TIMEOUT });
  return page;
}

async function join(page, room) {
  await page.fill("#room", room);
  await page.click("#join");
  await page.waitForFunction((r) => document.querySelector("#current-room")?.textContent === r, room, { timeout: TIMEOUT });
}

/** Waits until the shown room's online list is exactly `names`, in order. */
async function waitOnlineExactly(page, names) {
  await page.waitForFunction(
    (want) =>
      [...document.querySelectorAll("#members li[data-online] .name")].map((e) => e.textContent).join(",") ===
      want.join(","),
    names,
    { timeout: TIMEOUT },
  );
}

/** Waits until the typing line reads exactly `text` ("" for nobody). */
async function waitTyping(page, text) {
  await page.waitForFunction((t) => document.querySelector("#typing")?.textContent === t, text, { timeout: TIMEOUT });
}

async function say(page, text) {
  await page.fill("#text", text);
  await page.click("#send");
}

/** Waits for a message from `from` with exactly `text` in the shown room. */
async function waitMessage(page, from, text) {
  await page.waitForFunction(
    ([f, t]) =>
      [...document.querySelectorAll("#messages .message")].some(
        (m) => m.querySelector(".from")?.textContent === f && m.querySelector(".text")?.textContent === t,
      ),
    [from, text],
    { timeout: TIMEOUT },
  );
}

async function texts(page) {
  return page.$$eval("#messages .message .text", (els) => els.map((e) => e.textContent));
}

async function main() {
  if (!/^https?:\/\//.test(base)) await fail("usage: node chat.mjs http://HOST:PORT");
  const executablePath = process.env.CHROMIUM_PATH || "/usr/bin/chromium";
  browser = await step(`launch ${executablePath} (run \`bash .ci/install-browser.sh\`)`, () =>
    chromium.launch({
      executablePath,
      args: [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-quic",
        "--no-first-run",
        "--disable-component-update",
        "--disable-sync",
      ],
    }),
  );

  const alice = await step("alice connects", () => openUser("alice"));
  const bob = await step("bob connects", () => openUser("bob"));
  await step("alice joins lobby", () => join(alice, "lobby"));
  await step("bob joins lobby", () => join(bob, "lobby"));
  await step("alice sees alice and bob online", () => waitOnlineExactly(alice, ["alice", "bob"]));
  await step("bob sees alice and bob online", () => waitOnlineExactly(bob, ["alice", "bob"]));

  // Typing: shown to the others, live, and gone when the message is sent.
  await step("alice types without sending", () => alice.fill("#text", "hello b"));
  await step("bob sees 'alice is typing…'", () => waitTyping(bob, "alice is typing…"));
  await step("alice does not see herself typing", () => waitTyping(alice, ""));

  await step("alice sends 'hello bob'", () => say(alice, "hello bob"));
  await step("bob sees 'hello bob' from alice", () => waitMessage(bob, "alice", "hello bob"));
  await step("alice sees her own message", () => waitMessage(alice, "alice", "hello bob"));
  await step("bob no longer sees alice typing once she sent", () => waitTyping(bob, ""));

  // A typing flag that is not refreshed expires by itself (5 s TTL).
  await step("bob types, then stops", () => bob.fill("#text", "thinking about it"));
  await step("alice sees 'bob is typing…'", () => waitTyping(alice, "bob is typing…"));
  await step("bob's typing expires on alice's page", () => waitTyping(alice, ""));
  await step("bob clears his input", () => bob.fill("#text", ""));

  // A second tab of alice: still one alice in bob's list.
  const alice2 = await step("alice opens a second tab", () => openUser("alice"));
  await step("alice's second tab joins lobby", () => join(alice2, "lobby"));
  await step("bob sees alice once, with two tabs", () =>
    bob.waitForFunction(
      () => [...document.querySelectorAll("#members li")].some(
        (li) => li.querySelector(".name")?.textContent === "alice" && li.querySelector(".tabs")?.textContent === "(2 tabs)",
      ),
      null,
      { timeout: TIMEOUT },
    ),
  );
  await step("bob still lists alice once", () => waitOnlineExactly(bob, ["alice", "bob"]));
  await step("alice closes her second tab", () => alice2.context().close());
  await step("bob sees alice with one tab again", () =>
    bob.waitForFunction(() => !document.querySelector("#members .tabs"), null, { timeout: TIMEOUT }),
  );

  await step("alice sends markup", () => say(alice, XSS));
  await step("bob sees the markup as text", () => waitMessage(bob, "alice", XSS));
  await step("alice sees the markup as text", () => waitMessage(alice, "alice", XSS));
  // Give a wrongly inserted <img> time to fail loading and fire onerror.
  await new Promise((r) => setTimeout(r, 1000));
  for (const [name, page] of [["alice", alice], ["bob", bob]]) {
    const imgs = await step(`count img in ${name}'s #messages`, () => page.$$eval("#messages img", (e) => e.length));
    if (imgs !== 0) await fail(`${name}'s #messages contains ${imgs} <img> element(s): user text was parsed as HTML`);
  }
  if (dialogs.length) await fail("a dialog was opened: user text ran as script");

  // A message the server refuses: the error envelope (code + message) is shown.
  await step("alice sends a 2001-character message", () => say(alice, "x".repeat(2001)));
  await step("alice is shown the 400 error", () =>
    alice.waitForFunction(() => /error 400: .*2000/.test(document.querySelector("#errors")?.textContent || ""), null, {
      timeout: TIMEOUT,
    }),
  );

  // Bob's connection drops (the page closes its socket with 4000, a
  // "reconnect" code); alice keeps talking. Bob's page reconnects with
  // backoff, rejoins lobby from its last offset, and shows what he missed
  // exactly once.
  await step("bob's connection drops", () => bob.evaluate(() => ws.close(4000, "test drop")));
  await step("alice says while bob is away (1)", () => say(alice, "while you were away 1"));
  // (The page clears its input when the server confirms: wait for that
  // before typing the next one.)
  await step("alice's first message is confirmed", () =>
    alice.waitForFunction(() => document.querySelector("#text").value === "", null, { timeout: TIMEOUT }),
  );
  await step("alice says while bob is away (2)", () => say(alice, "while you were away 2"));
  await step("bob reconnects", () =>
    bob.waitForFunction(() => document.querySelector("#status")?.textContent === "connected", null, {
      timeout: TIMEOUT,
    }),
  );
  await step("bob recovers the first missed message", () => waitMessage(bob, "alice", "while you were away 1"));
  await step("bob recovers the second missed message", () => waitMessage(bob, "alice", "while you were away 2"));
  // The rejoin carried the room's position and the server replayed from it.
  const rejoin = bob.frames_.sent.find((m) => m.type === "join" && m.room === "lobby" && typeof m.offset === "number");
  if (!rejoin || typeof rejoin.epoch !== "string") await fail("bob's page did not rejoin lobby with {offset, epoch}");
  const answer = bob.frames_.received.find((m) => m.type === "reply" && m.ref === rejoin.ref);
  if (!answer || answer.data.recovered !== true) await fail(`the rejoin was not recovered: ${JSON.stringify(answer)}`);
  const first = bob.frames_.sent.find((m) => m.type === "join" && m.room === "lobby");
  if (first.rewind !== 50) await fail(`bob's first join did not ask for recent messages: ${JSON.stringify(first)}`);
  await step("bob says after recovering", () => say(bob, "back again"));
  await step("alice sees bob's message after his reconnect", () => waitMessage(alice, "bob", "back again"));
  await step("bob sees his own message", () => waitMessage(bob, "bob", "back again"));
  for (const [name, page] of [["alice", alice], ["bob", bob]]) {
    const shown = await step(`read ${name}'s lobby after the reconnect`, () => texts(page));
    for (const text of ["hello bob", "while you were away 1", "while you were away 2", "back again"]) {
      const n = shown.filter((t) => t === text).length;
      if (n !== 1) await fail(`${name} shows "${text}" ${n} times (expected exactly once)`);
    }
    const order = ["while you were away 1", "while you were away 2", "back again"].map((t) => shown.indexOf(t));
    if (!(order[0] < order[1] && order[1] < order[2])) await fail(`${name} shows the messages out of order`);
  }

  // A newcomer sees the recent messages on joining (rewind).
  const carol = await step("open carol", () => openUser("carol"));
  await step("carol joins lobby", () => join(carol, "lobby"));
  await step("carol sees earlier messages", () => waitMessage(carol, "alice", "while you were away 2"));
  await step("carol closes her page", () => carol.context().close());

  // Rooms are separate: a message in "dev" reaches neither bob nor lobby's view.
  await step("alice joins dev", () => join(alice, "dev"));
  await step("alice alone in dev", () => waitOnlineExactly(alice, ["alice"]));
  await step("alice sends in dev", () => say(alice, "only in dev"));
  await step("alice sees it in dev", () => waitMessage(alice, "alice", "only in dev"));
  await step("alice switches back to lobby", async () => {
    await alice.click('#rooms button[data-room="lobby"]');
    await alice.waitForFunction(() => document.querySelector("#current-room")?.textContent === "lobby", null, {
      timeout: TIMEOUT,
    });
  });
  await step("alice's lobby shows the lobby messages", () => waitMessage(alice, "alice", "hello bob"));
  await step("bob says in lobby", () => say(bob, "last one"));
  await step("alice sees bob's message", () => waitMessage(alice, "bob", "last one"));
  for (const [name, page] of [["alice", alice], ["bob", bob]]) {
    const shown = await step(`read ${name}'s lobby`, () => texts(page));
    if (shown.includes("only in dev")) await fail(`${name}'s lobby shows a message sent to dev`);
  }

  // Bob leaves: alice's online list follows.
  await step("bob closes his page", () => bob.context().close());
  await step("alice sees bob gone from the online list", () => waitOnlineExactly(alice, ["alice"]));

  if (dialogs.length) await fail("a dialog was opened");
  if (pageErrors.length) await fail("uncaught errors in the page");
  await browser.close();
  console.log("browser chat test passed");
  process.exit(0);
}

setTimeout(() => fail(`did not finish within ${OVERALL / 1000} s`), OVERALL).unref();
main().catch((e) => fail(e && e.stack ? e.stack : String(e)));
