// Drives the chat example (examples/chat, a page on the served browser
// client) in headless Chromium, as new users would:
//
// - two people chat in "lobby", see each other online ("(you)" on their own
//   entry) and typing; markup sent as a message is shown as text; a refused
//   message is explained in words, without a raw code;
// - two people who type the same name stay two entries, told apart by their
//   tag; one person's second tab is "2 tabs" on one entry;
// - the rooms panel never scrolls sideways and the message column gets the
//   width, from 360 px to 1280 px (screenshots at 390 and 1280 px);
// - the server is killed and restarted on the same port (in-memory history:
//   the rejoin answers `recovered: false`): the status says so in words with
//   a countdown and "Retry now", Connect while reconnecting keeps the rooms,
//   both pages come back by themselves, and every message sent after the
//   restart shows exactly once and in order on both;
// - "Retry now" connects before the countdown ends;
// - offline (Chromium's emulation) is said in words, and the page comes
//   back by itself when the network does, with what it missed;
// - a new name while connected keeps the rooms;
// - every connection negotiated permessage-deflate (the page's WebSocket
//   `extensions`, i.e. the Sec-WebSocket-Extensions response header), so
//   all of the above ran compressed.
//
//   node tests/browser/chat.mjs http://127.0.0.1:CHAT http://127.0.0.1:CONTROL SCREENSHOT_DIR
//
// CONTROL answers /kill and /start (tests/browser.rs). Needs Chromium at
// $CHROMIUM_PATH or /usr/bin/chromium and `npm ci` here (`bash
// .ci/install-browser.sh`). Exits 0 after printing "browser chat test
// passed", 1 with a reason otherwise.

import { Run, checkLayout } from "./harness.mjs";

const [base, control, shots] = process.argv.slice(2).map((u) => (u || "").replace(/\/+$/, ""));
const TIMEOUT = 15_000; // every single wait
const RECONNECT = 45_000; // a wait that includes a backoff (at most 30 s)
const XSS = "<img src=x onerror=alert(1)>";

const run = new Run("chat", 190_000);
const step = (what, fn) => run.step(what, fn);
const fail = (message) => run.fail(message);
const t0 = Date.now();
const ms = () => Date.now() - t0;

const lever = async (what) => {
  const res = await fetch(`${control}/${what}`);
  if (!res.ok) throw new Error(`${what}: HTTP ${res.status}`);
};

/** A new browser profile (its own localStorage, so its own browser id). */
const profile = () => run.profile();

/** Opens the page in `context` and connects as `name`. */
async function openUser(name, context) {
  const page = await run.page(context, name, TIMEOUT);
  // Every WebSocket the page opens and every frame, parsed, with times.
  page.sockets_ = [];
  page.frames_ = { sent: [], received: [] };
  page.on("websocket", (socket) => {
    page.sockets_.push(ms());
    const parse = (list) => (f) => {
      try {
        list.push({ at: ms(), ...JSON.parse(f.payload) });
      } catch {}
    };
    socket.on("framesent", parse(page.frames_.sent));
    socket.on("framereceived", parse(page.frames_.received));
  });
  // The extensions each WebSocket negotiated (its `extensions` attribute is
  // the Sec-WebSocket-Extensions response header the page saw).
  await page.addInitScript(() => {
    const Native = window.WebSocket;
    window.wsExtensions_ = [];
    window.WebSocket = class extends Native {
      constructor(...args) {
        super(...args);
        this.addEventListener("open", () => window.wsExtensions_.push(this.extensions));
      }
    };
  });
  await page.goto(`${base}/`);
  await page.fill("#name", name);
  await page.click("#connect");
  await waitConnected(page);
  // Chromium offers permessage-deflate; the server accepts it, without
  // context takeover either way (docs/performance.md).
  const extensions = await page.evaluate(() => window.wsExtensions_.at(-1));
  if (extensions !== "permessage-deflate; server_no_context_takeover; client_no_context_takeover") {
    throw new Error(`${name}: negotiated extensions ${JSON.stringify(extensions)}, not permessage-deflate`);
  }
  await page.waitForFunction(() => document.querySelector("#current-room")?.textContent === "# lobby");
  return page;
}

const waitConnected = (page, timeout = TIMEOUT) =>
  page.waitForFunction(() => document.querySelector("#status")?.textContent === "Connected", null, { timeout });

async function join(page, room) {
  await page.fill("#room", room);
  await page.click("#join");
  await page.waitForFunction((r) => document.querySelector("#current-room")?.textContent === `# ${r}`, room);
}

async function switchTo(page, room) {
  await page.click(`#rooms button[data-room="${room}"]`);
  await page.waitForFunction((r) => document.querySelector("#current-room")?.textContent === `# ${r}`, room);
}

/** The online list of the shown room: [{name, tag, you, tabs}], in order. */
const members = (page) =>
  page.$$eval("#members li", (lis) =>
    lis.map((li) => ({
      name: li.querySelector(".name")?.textContent,
      tag: li.querySelector(".tag")?.textContent ?? "",
      you: !!li.querySelector(".you"),
      tabs: li.querySelector(".tabs")?.textContent ?? "",
    })),
  );

/** Waits until the online list's names are exactly `names` (sorted, own first). */
async function waitOnline(page, names) {
  await page.waitForFunction(
    (want) => [...document.querySelectorAll("#members li .name")].map((e) => e.textContent).join(",") === want.join(","),
    names,
  );
}

const waitTyping = (page, text) =>
  page.waitForFunction((t) => document.querySelector("#typing")?.textContent === t, text);

/** Sends `text` and waits until the server confirmed it (the input clears). */
async function say(page, text) {
  await page.fill("#text", text);
  await page.click("#send");
  await page.waitForFunction(() => document.querySelector("#text").value === "");
}

/** Waits for a message from `from` with exactly `text` in the shown room. */
async function waitMessage(page, from, text, timeout = TIMEOUT) {
  await page.waitForFunction(
    ([f, t]) =>
      [...document.querySelectorAll("#messages .message")].some(
        (m) => m.querySelector(".from")?.textContent === f && m.querySelector(".text")?.textContent === t,
      ),
    [from, text],
    { timeout },
  );
}

const texts = (page) => page.$$eval("#messages .message .text", (els) => els.map((e) => e.textContent));
const notices = (page) => page.$$eval("#messages .notice", (els) => els.map((e) => e.textContent));

/** The chat's layout rules at `width`: nothing scrolls sideways (the page,
 * the rooms panel), the message column gets the width, the status shows. */
const layout = (page, width, shot) =>
  checkLayout(page, width, {
    dir: shots,
    shot,
    more: (w) => {
      const problems = [];
      const rooms = document.querySelector("#rooms-panel");
      if (rooms.scrollWidth > rooms.clientWidth) problems.push(`the rooms panel scrolls sideways by ${rooms.scrollWidth - rooms.clientWidth} px`);
      const col = document.querySelector("#messages").getBoundingClientRect().width;
      const want = w <= 640 ? 0.8 * w : 400;
      if (col < want) problems.push(`the message column is ${col} px wide (want >= ${want})`);
      if (document.querySelector("#status").getBoundingClientRect().right > innerWidth) problems.push("the status is cut off");
      return problems;
    },
  });

async function main() {
  if (!/^https?:\/\//.test(base) || !/^https?:\/\//.test(control) || !shots) {
    await fail("usage: node chat.mjs http://HOST:PORT http://HOST:CONTROL_PORT SCREENSHOT_DIR");
  }
  await run.launch();

  const alice = await step("alice connects (and is put in lobby)", async () => openUser("alice", await profile()));
  const bob = await step("bob connects", async () => openUser("bob", await profile()));
  await step("alice sees herself first, then bob", () => waitOnline(alice, ["alice", "bob"]));
  await step("bob sees himself first, then alice", () => waitOnline(bob, ["bob", "alice"]));
  await step("each is marked (you) on their own entry only", async () => {
    for (const page of [alice, bob]) {
      const you = (await members(page)).filter((m) => m.you).map((m) => m.name);
      if (you.join() !== page.label) throw new Error(`${page.label}'s (you): ${JSON.stringify(you)}`);
    }
  });

  // Typing: shown to the others, live, and gone when the message is sent.
  await step("alice types without sending", () => alice.fill("#text", "hello b"));
  await step("bob sees 'alice is typing…'", () => waitTyping(bob, "alice is typing…"));
  await step("alice does not see herself typing", () => waitTyping(alice, ""));
  await step("alice sends 'hello bob'", () => say(alice, "hello bob"));
  await step("bob sees 'hello bob' from alice", () => waitMessage(bob, "alice", "hello bob"));
  await step("alice sees her own message, marked (you)", async () => {
    await waitMessage(alice, "alice", "hello bob");
    const you = await alice.$$eval("#messages .message .you", (e) => e.length);
    if (you !== 1) throw new Error(`${you} messages marked (you)`);
  });
  await step("bob no longer sees alice typing once she sent", () => waitTyping(bob, ""));
  await step("bob types, then stops", () => bob.fill("#text", "thinking about it"));
  await step("alice sees 'bob is typing…'", () => waitTyping(alice, "bob is typing…"));
  await step("bob's typing expires on alice's page (5 s)", () => waitTyping(alice, ""));
  await step("bob clears his input", () => bob.fill("#text", ""));

  // Two people called "ann" (two browsers): two entries, told apart.
  const annX = await step("ann opens the chat in one browser", async () => openUser("ann", await profile()));
  const annY = await step("another ann opens it in another browser", async () => openUser("ann", await profile()));
  await step("bob sees two anns, each with a different tag, not 'ann (2 tabs)'", async () => {
    await waitOnline(bob, ["bob", "alice", "ann", "ann"]);
    const anns = (await members(bob)).filter((m) => m.name === "ann");
    if (anns.some((a) => a.tabs !== "" || !/^#[0-9a-f]{4}$/.test(a.tag)) || anns[0].tag === anns[1].tag) {
      throw new Error(JSON.stringify(anns));
    }
  });
  await step("each ann sees (you) on one ann only", async () => {
    for (const page of [annX, annY]) {
      await waitOnline(page, ["ann", "alice", "ann", "bob"]);
      const you = (await members(page)).filter((m) => m.you);
      if (you.length !== 1 || you[0].name !== "ann") throw new Error(JSON.stringify(you));
    }
  });
  await step("the two anns' messages carry their tags on bob's page", async () => {
    await say(annX, "I am the first ann");
    await say(annY, "I am the second ann");
    await waitMessage(bob, "ann", "I am the second ann");
    const tags = await bob.$$eval("#messages .message", (ms) =>
      ms.filter((m) => m.querySelector(".from")?.textContent === "ann").map((m) => m.querySelector(".tag")?.textContent ?? ""),
    );
    if (tags.length !== 2 || tags[0] === tags[1] || tags.some((t) => !t)) throw new Error(JSON.stringify(tags));
  });
  const annX2 = await step("the first ann opens a second tab (same browser)", () => openUser("ann", annX.context()));
  await step("bob sees that ann once, with 2 tabs, and still two anns", async () => {
    await bob.waitForFunction(() => [...document.querySelectorAll("#members .tabs")].map((e) => e.textContent).join() === "2 tabs");
    await waitOnline(bob, ["bob", "alice", "ann", "ann"]);
  });
  await step("the anns leave", async () => {
    await annX2.context().close();
    await annY.context().close();
    await waitOnline(bob, ["bob", "alice"]);
  });

  // User text is text.
  await step("alice sends markup", () => say(alice, XSS));
  await step("bob sees the markup as text", () => waitMessage(bob, "alice", XSS));
  await new Promise((r) => setTimeout(r, 1000)); // give a wrongly inserted <img> time to fire onerror
  for (const page of [alice, bob]) {
    const imgs = await step(`count img in ${page.label}'s messages`, () => page.$$eval("#messages img", (e) => e.length));
    if (imgs !== 0) await fail(`${page.label}'s #messages contains ${imgs} <img>: user text was parsed as HTML`);
  }
  if (run.dialogs.length) await fail("a dialog was opened: user text ran as script");

  // A refused message is explained in words (the app's), with no raw code.
  await step("alice sends a 2001-character message and is told why it was refused", async () => {
    await alice.fill("#text", "x".repeat(2001));
    await alice.click("#send");
    await alice.waitForFunction(() => /Not sent: message is longer than 2000 characters/.test(document.querySelector("#send-error").textContent));
    const shown = await alice.$eval("#send-error", (e) => e.textContent);
    if (/\b[45]\d\d\b|error/i.test(shown)) throw new Error(`raw code or error jargon shown: ${shown}`);
    if ((await alice.inputValue("#text")).length !== 2001) throw new Error("the refused text was thrown away");
    await alice.fill("#text", "");
  });

  // Rooms are separate; a long room name does not widen anything.
  const LONG = "a-room-with-a-very-long-name-that-goes-on-and-on-and-on";
  await step("alice joins dev and a room with a long name", async () => {
    await join(alice, LONG);
    await join(alice, "dev");
    await waitOnline(alice, ["alice"]);
  });
  await step("alice sends in dev", () => say(alice, "only in dev"));
  await step("alice back in lobby sees lobby only", async () => {
    await switchTo(alice, "lobby");
    await waitMessage(alice, "alice", "hello bob");
    if ((await texts(alice)).includes("only in dev")) throw new Error("lobby shows a message sent to dev");
  });
  await step("bob's lobby does not get dev's message", async () => {
    await say(bob, "still here");
    await waitMessage(alice, "bob", "still here");
    if ((await texts(bob)).includes("only in dev")) throw new Error("bob got a message sent to dev");
  });
  await step("a newcomer sees the recent messages on joining", async () => {
    const carol = await openUser("carol", await profile());
    await waitMessage(carol, "bob", "still here");
    await carol.context().close();
  });

  // Layout from 360 px to wide, with screenshots to look at.
  for (const width of [360, 390, 800, 1280]) {
    const shot = width === 390 || width === 1280 ? "chat" : null;
    await step(`alice's page holds at ${width} px`, () => layout(alice, width, shot));
  }
  await step("back to 1280 px", () => alice.setViewportSize({ width: 1280, height: 800 }));

  // ---------------------------------------------------------- restart
  // Messages before the restart fill offsets the new server will use again.
  await step("20 messages before the restart", async () => {
    for (let i = 1; i <= 20; i++) await say(i % 2 ? alice : bob, `before ${i}`);
    await waitMessage(alice, "bob", "before 20");
    await waitMessage(bob, "bob", "before 20");
  });
  const killedAt = ms();
  const socketsBefore = [alice.sockets_.length, bob.sockets_.length];
  await step("the server is killed", () => lever("kill"));
  for (const page of [alice, bob]) {
    await step(`${page.label}'s page says it is reconnecting, in words, with a countdown and Retry now`, async () => {
      await page.waitForFunction(() => /Reconnecting in \d+ s/.test(document.querySelector("#banner-text")?.textContent));
      const banner = await page.$eval("#banner", (b) => ({ text: b.textContent, hidden: b.hidden }));
      if (banner.hidden || /\b1006\b|code/i.test(banner.text)) throw new Error(`banner: ${JSON.stringify(banner)}`);
      if (!(await page.isVisible("#retry-now"))) throw new Error("no Retry now button");
      if ((await page.textContent("#status")) !== "Reconnecting…") throw new Error(`status: ${await page.textContent("#status")}`);
    });
  }
  await step("alice clicks Connect while reconnecting: her rooms stay", async () => {
    await alice.click("#connect");
    await alice.waitForFunction(() => /Reconnecting/.test(document.querySelector("#banner-text")?.textContent));
    const rooms = await alice.$$eval("#rooms button", (bs) => bs.map((b) => b.dataset.room));
    if (rooms.join() !== ["lobby", LONG, "dev"].join()) throw new Error(`rooms after Connect: ${rooms}`);
    if (!(await texts(alice)).includes("before 20")) throw new Error("the messages were wiped");
  });
  await step("the server starts again on the same port", () => lever("start"));
  const startedAt = ms();
  await step("both pages reconnect by themselves", async () => {
    await waitConnected(alice, RECONNECT);
    await waitConnected(bob, RECONNECT);
  });
  await step("both pages say the missed messages could not be recovered", async () => {
    for (const page of [alice, bob]) {
      await page.waitForFunction(() => [...document.querySelectorAll("#messages .notice")].some((n) => /could not be recovered/.test(n.textContent)));
    }
  });
  // The rejoins (join frames with a position) and their answers.
  const rejoins = (page) => page.frames_.sent.filter((f) => f.type === "join" && f.at > killedAt && typeof f.offset === "number");
  await step("every room was rejoined from its position and answered recovered: false", async () => {
    for (const [page, n] of [[alice, 3], [bob, 1]]) {
      const sent = rejoins(page);
      if (new Set(sent.map((f) => f.room)).size !== n) throw new Error(`${page.label} rejoined ${JSON.stringify(sent.map((f) => f.room))}`);
      for (const f of sent) {
        const answer = page.frames_.received.find((r) => r.type === "reply" && r.ref === f.ref);
        if (!answer || answer.data.recovered !== false) throw new Error(`${f.room}: ${JSON.stringify(answer)}`);
      }
    }
  });
  const after = Array.from({ length: 26 }, (_, i) => `after ${i + 1}`);
  await step("26 messages after the restart, from both", async () => {
    for (const [i, text] of after.entries()) await say(i % 2 ? bob : alice, text);
  });
  for (const page of [alice, bob]) {
    await step(`${page.label} shows every message after the restart exactly once and in order`, async () => {
      await waitMessage(page, "bob", "after 26");
      const shown = (await texts(page)).filter((t) => /^after \d+$/.test(t));
      if (shown.join("|") !== after.join("|")) throw new Error(`shows ${shown.length}: ${shown.join(", ")}`);
      const before = (await texts(page)).filter((t) => /^before \d+$/.test(t));
      if (before.length !== 20) throw new Error(`${before.length} of the 20 messages from before`);
    });
  }
  // The timeline of this restart, for the record.
  const firstRetry = (page, i) => page.sockets_.slice(socketsBefore[i]).find((t) => t > killedAt);
  const recoveredAt = (page) => Math.max(...rejoins(page).map((f) => page.frames_.received.find((r) => r.ref === f.ref && r.type === "reply")?.at ?? Infinity));
  for (const [i, page] of [alice, bob].entries()) {
    console.log(
      `restart timeline (${page.label}): killed at 0 ms, first retry +${firstRetry(page, i) - killedAt} ms, ` +
        `server back +${startedAt - killedAt} ms, all ${rejoins(page).length} rooms rejoined +${recoveredAt(page) - killedAt} ms ` +
        `(${recoveredAt(page) - startedAt} ms after the server was back)`,
    );
  }
  await step("screenshots after the restart", async () => {
    for (const width of [390, 1280]) await layout(bob, width, "chat-bob-after-restart");
    await bob.setViewportSize({ width: 1280, height: 800 });
  });

  // "Retry now" connects before the countdown ends.
  await step("the server is killed again", () => lever("kill"));
  await step("bob's countdown reaches at least 4 s (backoff grows while the server is down)", () =>
    bob.waitForFunction(() => Number(/Reconnecting in (\d+) s/.exec(document.querySelector("#banner-text")?.textContent)?.[1]) >= 4, null, { timeout: 60_000 }),
  );
  await step("screenshot of the reconnecting banner", async () => {
    for (const width of [390, 1280]) await layout(bob, width, "chat-reconnecting");
    await bob.setViewportSize({ width: 1280, height: 800 });
  });
  await step("the server starts again", () => lever("start"));
  await step("Retry now connects before the countdown ends", async () => {
    const left = await bob.evaluate(() => Number(/Reconnecting in (\d+) s/.exec(document.querySelector("#banner-text")?.textContent)?.[1]));
    const deadline = Date.now() + (left - 1) * 1000; // the retry was due no earlier than this
    if (!(left >= 2)) throw new Error(`countdown too short to tell (${left} s)`);
    await bob.click("#retry-now");
    await waitConnected(bob);
    if (Date.now() >= deadline) throw new Error("connected only when the countdown ended");
  });
  await step("alice comes back by herself", () => waitConnected(alice, RECONNECT));
  await step("they chat again", async () => {
    await say(bob, "back once more");
    await waitMessage(alice, "bob", "back once more");
  });

  // The network goes away (Chromium's offline emulation) and comes back.
  await step("alice goes offline: the page says so, in words", async () => {
    await alice.context().setOffline(true);
    await alice.waitForFunction(() => /^You are offline\./.test(document.querySelector("#banner-text")?.textContent));
    if ((await alice.textContent("#online-count")) !== "offline") throw new Error("the online list is not marked offline");
  });
  await step("alice's network comes back: the page reconnects at once and gets what she missed", async () => {
    await say(bob, "while alice was offline");
    await alice.context().setOffline(false);
    await waitConnected(alice);
    await waitMessage(alice, "bob", "while alice was offline");
  });

  // A new name while connected: the same rooms, under the new name.
  await step("bob connects again as bobby: alice sees bobby, not bob", async () => {
    await bob.fill("#name", "bobby");
    await bob.click("#connect");
    await waitConnected(bob);
    await waitOnline(alice, ["alice", "bobby"]);
  });
  await step("bobby is back in lobby with its recent messages, each once", async () => {
    await waitOnline(bob, ["bobby", "alice"]);
    await waitMessage(bob, "bob", "back once more");
    const shown = (await texts(bob)).filter((t) => t === "back once more").length;
    if (shown !== 1) throw new Error(`"back once more" shown ${shown} times`);
  });

  // Bob leaves: alice's online list follows.
  await step("bob closes his page", () => bob.context().close());
  await step("alice sees bob gone", () => waitOnline(alice, ["alice"]));

  await run.pass();
}

main().catch((e) => fail(e && e.stack ? e.stack : String(e)));
