import { test } from "node:test";
import assert from "node:assert/strict";
import { connect } from "../switchboard.js";
import { Clock, flush, hello } from "./harness.mjs";

/** A fake `fetch` for the SSE endpoint: streams the test writes, POSTs it answers. */
function sseServer() {
  const gets = [];
  const posts = [];
  let postStatus = () => 202;
  const fetch = async (url, init = {}) => {
    if (init.method === "POST") {
      const post = { url, headers: init.headers, body: JSON.parse(init.body), bytes: new TextEncoder().encode(init.body).length };
      posts.push(post);
      const status = postStatus(post);
      if (status instanceof Promise) return new Response(null, { status: await status });
      return new Response(status === 202 ? "{}" : null, { status });
    }
    if (gets.status) {
      const status = gets.status;
      gets.status = 0;
      return new Response(null, { status });
    }
    let ctl;
    const body = new ReadableStream({ start: (c) => (ctl = c) });
    const enc = new TextEncoder();
    gets.push({
      url: new URL(url),
      write: (text) => ctl.enqueue(enc.encode(text)),
      end: () => ctl.close(),
      aborted: () => init.signal?.aborted,
    });
    return new Response(body, { status: 200, headers: { "content-type": "text/event-stream; charset=utf-8" } });
  };
  return { fetch, gets, posts, setPostStatus: (f) => (postStatus = f) };
}

const session = { session: "a".repeat(32), secret: "b".repeat(32), node: "n", rooms: [], keep_alive_ms: 15000, max_post_size: 65536, max_post_envelopes: 32 };
const ev = (name, data, id) => `${id ? `id: ${id}\n` : ""}event: ${name}\ndata: ${JSON.stringify(data)}\n\n`;

async function start(opts = {}) {
  const srv = sseServer();
  const clock = new Clock();
  const win = new EventTarget();
  win.navigator = { onLine: true };
  const statuses = [];
  const client = connect("http://s.test/events?user=ann", {
    transport: "sse",
    fetch: srv.fetch,
    timers: clock,
    now: () => clock.now,
    random: () => 0,
    window: win,
    ...opts,
  });
  client.onStatus((s) => statuses.push(s));
  await flush();
  return { srv, clock, client, statuses, stream: () => srv.gets.at(-1) };
}

async function open(t, sess = session) {
  // Chunks split mid-line, CRLF and LF mixed, comments in between.
  const text = "retry: 3000\r\n\r\n" + ev("$session", sess) + ": keep-alive\n\n" + ev("$hello", hello({ connection_id: 4 }));
  for (const part of [text.slice(0, 7), text.slice(7, 50), text.slice(50)]) {
    t.stream().write(part);
    await flush();
  }
  await flush();
}

test("SSE: the stream opens the session; envelopes go up by POST with its headers, answers come on the stream", async () => {
  const t = await start();
  assert.equal(t.stream().url.searchParams.get("user"), "ann");
  assert.equal(t.stream().url.searchParams.get("protocol"), "switchboard.v2.json", "asks for compact events");
  await open(t);
  assert.equal(t.client.status.state, "open");
  assert.equal(t.client.status.transport, "sse");
  const joining = t.client.join("chat:1");
  await flush();
  const post = t.srv.posts[0];
  assert.equal(post.headers["switchboard-session"], session.session);
  assert.equal(post.headers["switchboard-secret"], session.secret);
  assert.equal(post.body[0].type, "join");
  t.stream().write(ev("$reply", { type: "reply", ref: post.body[0].ref, data: { room: "chat:1", epoch: "E", offset: 0 } }));
  const room = await joining;
  const got = [];
  room.on("said", (d, i) => got.push([d.text, i.offset]));
  t.stream().write(ev("said", { type: "event", room: "chat:1", event: "said", offset: 1, data: { text: "hi" } }, "s1.x"));
  t.stream().write(ev("$event", { type: "event", room: "chat:1", event: "said", offset: 2, data: { text: "line\nbreak" } }));
  // Protocol v2: an unnamed event (`message`) whose data is the compact array.
  t.stream().write(`id: s1.y\ndata: ${JSON.stringify(["chat:1", "said", { text: "v2" }, 3])}\n\n`);
  await flush();
  assert.deepEqual(got, [["hi", 1], ["line\nbreak", 2], ["v2", 3]]);
});

test("SSE: POSTs go one at a time, in order, batched; a 429 sends the same batch again after 1 s", async () => {
  const t = await start();
  await open(t);
  let release;
  t.srv.setPostStatus(() => new Promise((r) => (release = r)));
  const calls = [1, 2, 3].map((n) => t.client.call("n", n).catch(() => {}));
  await flush();
  assert.equal(t.srv.posts.length, 1, "one POST in flight");
  assert.deepEqual(t.srv.posts[0].body.map((m) => m.data), [1]);
  t.srv.setPostStatus(() => 429);
  release(202);
  await flush();
  await flush();
  assert.deepEqual(t.srv.posts[1].body.map((m) => m.data), [2, 3], "the rest in one batch");
  t.srv.setPostStatus(() => 202);
  await t.clock.advance(1000);
  await flush();
  assert.deepEqual(t.srv.posts.map((p) => p.body.map((m) => m.data)), [[1], [2, 3], [2, 3]]);
  void calls;
});

test("SSE: a POST batch stays within the server's max_post_size in UTF-8 bytes, not UTF-16 units", async () => {
  const t = await start();
  await open(t, { ...session, max_post_size: 400 });
  let release;
  t.srv.setPostStatus(() => new Promise((r) => (release = r)));
  const text = "é".repeat(60); // 60 UTF-16 units, 120 bytes
  const calls = [1, 2, 3, 4].map((n) => t.client.call("say", { n, text }).catch(() => {}));
  await flush();
  release(202);
  t.srv.setPostStatus(() => 202);
  for (let i = 0; i < 6; i++) await flush();
  const sizes = t.srv.posts.map((p) => p.bytes);
  assert.deepEqual(t.srv.posts.flatMap((p) => p.body.map((m) => m.data.n)), [1, 2, 3, 4]);
  assert.ok(sizes.every((n) => n <= 400), `POST bodies of ${sizes} bytes`);
  assert.ok(t.srv.posts.some((p) => p.body.length > 1), "still batched where it fits");
  void calls;
});

test("SSE: $close with a reconnect code waits the server's retry hint; the new stream carries lastEventId", async () => {
  const t = await start();
  await open(t);
  t.stream().write(ev("said", { type: "event", event: "said", data: 1 }, "s1.abc.0:5:E"));
  t.stream().write("retry: 2500\n\n" + ev("$close", { code: 1001, reason: "server shutting down", reconnect: true }));
  await flush();
  await flush();
  assert.equal(t.client.status.state, "reconnecting");
  assert.equal(t.client.status.retryAt, t.clock.now + 2500, "the hint, not the stream's opening retry: 3000");
  await t.clock.advance(2500);
  await flush();
  assert.equal(t.srv.gets.length, 2);
  assert.equal(t.stream().url.searchParams.get("lastEventId"), "s1.abc.0:5:E");
});

test("SSE: $close that says stop, and 204, stop the client; a stream that ends reconnects", async () => {
  const a = await start();
  await open(a);
  a.stream().write(ev("$close", { code: 4500, reason: "kicked", reconnect: false }));
  await flush();
  assert.equal(a.client.status.state, "closed");
  assert.equal(a.client.status.reason.code, 4500);

  const b = await start();
  await open(b);
  b.stream().end();
  await flush();
  await flush();
  assert.equal(b.client.status.state, "reconnecting");
  assert.equal(b.client.status.retryAt, b.clock.now, "the stream's opening retry: is not a wait for this client");
  b.srv.gets.status = 204;
  await b.clock.advance(0);
  await flush();
  await flush();
  assert.equal(b.client.status.state, "closed");
});

/** A client in "auto" mode whose WebSockets never open by themselves. */
function autoClient(opts = {}) {
  const srv = sseServer();
  const clock = new Clock();
  const sockets = [];
  class WS {
    constructor(url) {
      this.url = url;
      sockets.push(this);
    }
    close() {
      this.closed = true;
    }
  }
  const client = connect("http://s.test/ws?user=ann", { sse: "http://s.test/events?user=ann", WebSocket: WS, fetch: srv.fetch, timers: clock, now: () => clock.now, random: () => 0, window: new EventTarget(), ...opts });
  return { srv, clock, sockets, client };
}

test("auto: a WebSocket that cannot open falls back to SSE at once, and stays there", async () => {
  const { srv, clock, sockets, client } = autoClient();
  assert.equal(sockets[0].url, "ws://s.test/ws?user=ann");
  sockets[0].onclose({ code: 1006 });
  await flush();
  assert.equal(srv.gets.length, 1);
  assert.equal(srv.gets[0].url.pathname, "/events");
  srv.gets[0].write(ev("$session", session) + ev("$hello", hello()));
  await flush();
  await flush();
  assert.equal(client.status.state, "open");
  assert.equal(client.status.transport, "sse");
  srv.gets[0].end();
  await flush();
  await flush();
  await clock.advance(0);
  await flush();
  assert.equal(sockets.length, 1, "no new WebSocket once SSE worked");
  assert.equal(srv.gets.length, 2);
  client.close();
});

test("auto: a WebSocket upgrade that hangs falls back to SSE after connectTimeout", async () => {
  const { srv, clock, sockets, client } = autoClient({ connectTimeout: 3000 });
  await clock.advance(2999);
  assert.equal(srv.gets.length, 0);
  await clock.advance(1);
  await flush();
  assert.ok(sockets[0].closed);
  assert.equal(srv.gets.length, 1);
  srv.gets[0].write(ev("$session", session) + ev("$hello", hello()));
  await flush();
  await flush();
  assert.equal(client.status.state, "open");
  assert.equal(client.status.transport, "sse");
  client.close();
});
