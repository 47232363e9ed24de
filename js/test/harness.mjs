// Test doubles for the unit tests: fake timers, a fake WebSocket the test
// answers as the server, and a client wired to both.
import { connect } from "../switchboard.js";

/** Fake timers: `advance(ms)` runs due timers in time order. */
export class Clock {
  now = 0;
  seq = 0;
  /** @type {{id: number, at: number, fn: Function}[]} */
  timers = [];
  setTimeout = (fn, ms) => {
    const id = ++this.seq;
    this.timers.push({ id, at: this.now + Math.max(0, Number(ms) || 0), fn });
    return id;
  };
  clearTimeout = (id) => {
    this.timers = this.timers.filter((t) => t.id !== id);
  };
  async advance(ms) {
    const end = this.now + ms;
    for (;;) {
      this.timers.sort((a, b) => a.at - b.at || a.id - b.id);
      const t = this.timers[0];
      if (!t || t.at > end) break;
      this.timers.shift();
      this.now = t.at;
      t.fn();
      await flush();
    }
    this.now = end;
    await flush();
  }
}

export const flush = () => new Promise((r) => setImmediate(r));

export function hello(over = {}) {
  return {
    type: "hello",
    data: { version: 1, server_version: "0.1.0", connection_id: 1, node: "n1", heartbeat_interval_ms: 25000, heartbeat_timeout_ms: 10000, max_message_size: 65536, max_rooms: 128, max_inflight: 16, ...over },
  };
}

/**
 * A client on fakes. `sockets` lists every WebSocket it opened; each has
 * `sent` (parsed envelopes), `open()`, `recv(msg)`, `drop(code, reason)`.
 */
export function setup(options = {}) {
  const clock = new Clock();
  const win = new EventTarget();
  win.navigator = { onLine: true };
  const sockets = [];
  const logged = [];
  class FakeWS {
    constructor(url, protocols) {
      Object.assign(this, { url, protocols, sent: [], closed: null });
      sockets.push(this);
    }
    send(text) {
      this.sent.push(JSON.parse(text));
    }
    close(code) {
      this.closed = code;
    }
    open() {
      this.onopen();
    }
    recv(msg) {
      this.onmessage({ data: typeof msg === "string" ? msg : JSON.stringify(msg) });
    }
    drop(code = 1006, reason = "") {
      this.onclose({ code, reason });
    }
    /** Opens and says hello. */
    start(over) {
      this.open();
      this.recv(hello(over));
    }
    last(type) {
      return this.sent.filter((m) => m.type === type).at(-1);
    }
  }
  let draws = options.draws ?? [0.5];
  let i = 0;
  const random = () => draws[Math.min(i++, draws.length - 1)];
  const errors = [];
  const statuses = [];
  const client = connect("ws://server.test/ws", {
    WebSocket: FakeWS,
    timers: clock,
    now: () => clock.now,
    random,
    window: win,
    logger: { error: (...a) => logged.push(a.join(" ")) },
    ...options.client,
  });
  client.onStatus((s) => statuses.push(s));
  if (!options.noErrorListener) client.onError((e) => errors.push(e));
  return { client, clock, win, sockets, errors, statuses, logged, ws: () => sockets.at(-1) };
}

/** Answers the last `join` of `ws` with `data` (and returns the request). */
export function answerJoin(ws, data) {
  const j = ws.last("join");
  ws.recv({ type: "reply", ref: j.ref, data: { room: j.room, ...data } });
  return j;
}
