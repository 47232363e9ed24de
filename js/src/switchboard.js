/*! switchboard.js | MIT | the browser client of switchboard (protocol v1, v2); guide: docs/js-client.md */
// Source of the served module: `npm run build` writes ../switchboard.js (comments
// stripped) and ../switchboard.d.ts. Sections: errors, backoff, close codes,
// validation, presence, transports (WebSocket, SSE + POST), room, client.

/** This module's version; equal to the server crate's (checked against `hello`). */
export const VERSION = "0.1.0";
/** The newest wire protocol version this module speaks (it speaks 1 too). */
export const PROTOCOL = 2;
/** Offered newest first: the server selects the first it speaks (v2: events are compact arrays). */
const SUBPROTOCOLS = ["switchboard.v2.json", "switchboard.v1.json"];

// ---------------------------------------------------------------- errors

/**
 * A failed request. `code` is the protocol's error code (a number, e.g. 403,
 * 405, 420, 1000+) for an answer of the server, or a string for a local
 * failure: "timeout", "dropped" (pushed out of the full offline buffer),
 * "disconnected" (written on a connection that dropped; it may have run),
 * "closed" (the client was closed), "too_large", "offline", "not_joined".
 */
export class SwitchboardError extends Error {
  /**
   * @param {number|string} code
   * @param {string} message
   * @param {unknown} [data]
   */
  constructor(code, message, data) {
    super(message);
    this.name = "SwitchboardError";
    /** @type {number|string} */
    this.code = code;
    /** Structured details sent with the error (e.g. `{retry_after_ms}` with 420). */
    this.data = data;
  }
}

// ---------------------------------------------------------------- backoff

/**
 * Full-jitter backoff (protocol §7.2, §12): before attempt n (failures since
 * the last healthy connection, from 0) wait uniformly in
 * [0, min(max, initial * 2^n)].
 */
export class Backoff {
  /**
   * @param {{initial?: number, max?: number}} [o] milliseconds; defaults 1000 and 30000
   * @param {() => number} [random] uniform in [0, 1)
   */
  constructor(o = {}, random = Math.random) {
    this.initial = o.initial ?? 1000;
    this.max = o.max ?? 30000;
    this.random = random;
    /** Failures since the last healthy connection. */
    this.attempt = 0;
  }
  /** The ceiling of the next wait, in ms. */
  ceiling() {
    return Math.min(this.max, this.initial * 2 ** Math.min(this.attempt, 30));
  }
  /** Draws the next wait (ms) and counts the attempt. */
  next() {
    const d = Math.floor(this.random() * this.ceiling());
    this.attempt++;
    return d;
  }
  reset() {
    this.attempt = 0;
  }
}

// ---------------------------------------------------------------- close codes

/**
 * What a client does after a close code (protocol §7.1, §12): "reconnect"
 * after 1001, 1006, 1009, 1011-1014 and 4000-4499; "stop" after everything
 * else (1000, 1002, 1003, 1005, 1007, 1008, 4500-4999, unknown codes).
 * @param {number} code
 * @returns {"reconnect"|"stop"}
 */
export function closeAction(code) {
  const again = code === 1001 || code === 1006 || code === 1009 || (code >= 1011 && code <= 1014) || (code >= 4000 && code <= 4499);
  return again ? "reconnect" : "stop";
}

/**
 * The wait a close asks for (protocol §7.1): the number after
 * `retry_after_ms=` in the reason of a reconnect code (the server sends it
 * with 1013 when it sheds a connection during a storm); 0 when there is
 * none. Capped at one hour.
 * @param {number} code
 * @param {string} [reason]
 * @returns {number} ms
 */
export function retryHint(code, reason) {
  if (closeAction(code) !== "reconnect") return 0;
  const m = /retry_after_ms=(\d+)/.exec(reason ?? "");
  return m ? Math.min(Number(m[1]), 3600000) : 0;
}

/** @type {Record<number, string>} */
const CLOSE_WORDS = {
  1000: "the server ended the connection",
  1001: "the server is restarting",
  1006: "the connection was lost",
  1008: "the server refused this client (policy)",
  1009: "a message was too large",
  1011: "the server had an internal error",
  1013: "the server is busy",
  4000: "the connection was too slow",
  4001: "the server stopped hearing from this client",
  4002: "the server asked to reconnect",
  4003: "the sign-in expired",
  4500: "the server ended this session",
  4501: "not signed in",
};

/** @param {number} code */
function closeWords(code) {
  return CLOSE_WORDS[code] ?? (closeAction(code) === "reconnect" ? "the connection was closed" : "the server closed the connection");
}

// ---------------------------------------------------------------- validation

/** @typedef {{type: string, ref?: number, room?: string, event?: string, code?: number, message?: string, data?: any, offset?: number, epoch?: string}} Envelope */

const TYPES = new Set(["hello", "reply", "error", "event", "ping", "pong", "lagged", "presence_state", "presence_diff", "gap", "leave"]);
const uint = (/** @type {unknown} */ v) => typeof v === "number" && Number.isSafeInteger(v) && v >= 0;
const isObj = (/** @type {unknown} */ v) => typeof v === "object" && v !== null && !Array.isArray(v);

/**
 * The length of `s` in UTF-8 bytes, as it goes on the wire (a lone surrogate
 * as U+FFFD), without encoding it.
 * @param {string} s
 */
export function utf8Length(s) {
  let n = s.length;
  for (let i = 0; i < s.length; i++) {
    const c = s.charCodeAt(i);
    if (c < 0x80) continue;
    if (c < 0x800) n += 1;
    else if (c >= 0xd800 && c < 0xdc00 && (s.charCodeAt(i + 1) & 0xfc00) === 0xdc00) n += 2, i++;
    else n += 2;
  }
  return n;
}

/**
 * Parses and checks one server message. Returns the envelope, or a string
 * saying what is wrong with it (never throws).
 * @param {unknown} text
 * @param {number} [maxBytes] messages longer than this (in UTF-16 units) are refused
 * @returns {Envelope|string}
 */
export function parseEnvelope(text, maxBytes = 16 << 20) {
  if (typeof text !== "string") return "not a text message";
  if (text.length > maxBytes) return `message larger than ${maxBytes} bytes`;
  /** @type {any} */
  let v;
  try {
    v = JSON.parse(text);
  } catch {
    return "not JSON";
  }
  if (Array.isArray(v)) return eventArray(v);
  if (!isObj(v)) return "not a JSON object";
  for (const k of ["ref", "offset"]) if (v[k] != null && !uint(v[k])) return `bad ${k}`;
  for (const k of ["room", "event", "message", "epoch"]) if (v[k] != null && typeof v[k] !== "string") return `bad ${k}`;
  if (v.code != null && !uint(v.code)) return "bad code";
  if (typeof v.type !== "string") return "no type";
  if (!TYPES.has(v.type)) return `unknown message type ${JSON.stringify(v.type.slice(0, 32))}`;
  const need = {
    hello: isObj(v.data) && uint(v.data.version) && uint(v.data.connection_id),
    reply: v.ref != null,
    error: v.code != null,
    event: v.event != null,
    presence_state: v.room != null && isObj(v.data),
    presence_diff: v.room != null && isObj(v.data),
    gap: v.room != null && isObj(v.data),
    leave: v.room != null,
  }[/** @type {string} */ (v.type)];
  if (need === false) return `malformed ${v.type}`;
  return v;
}

/**
 * A protocol v2 compact event, `[room, event, data]` or `[room, event, data, offset]`
 * (`room` null for an event sent to this connection), as the v1 envelope it stands for.
 * @param {any[]} a
 * @returns {Envelope|string}
 */
function eventArray(a) {
  if (a.length < 3 || a.length > 4) return "malformed event";
  const [room, event, data, offset] = a;
  if (room !== null && typeof room !== "string") return "bad room";
  if (typeof event !== "string") return "bad event";
  if (offset !== undefined && !uint(offset)) return "bad offset";
  /** @type {Envelope} */
  const env = { type: "event", event, data };
  if (room !== null) env.room = room;
  if (offset !== undefined) env.offset = offset;
  return env;
}

// ---------------------------------------------------------------- presence

/** @typedef {{ref: string, joined_at?: number, meta?: Record<string, any>, ephemeral?: Record<string, any>, self?: boolean}} Meta */
/** @typedef {{key: string, metas: Meta[], self: boolean}} Member */
/** @typedef {{keys: number, connections: number}} Count */

/**
 * A room's presence, merged from `presence_state` and `presence_diff`
 * (protocol §3.11): a key (user) has one meta per connection (tab).
 */
export class PresenceView {
  constructor() {
    /** @type {Map<string, Meta[]>} */
    this.members = new Map();
    /** @type {Count} */
    this.count = { keys: 0, connections: 0 };
    /** True in rooms over the server's threshold: counts, no member list. */
    this.countsOnly = false;
    /** True once a `presence_state` arrived since the last (re)join. */
    this.synced = false;
    /** This connection's meta ref (`node.connection_id`), to mark own metas. */
    this.self = "";
  }
  /** @param {any} d the `data` of `presence_state`; replaces everything */
  state(d) {
    this.members.clear();
    this.countsOnly = !isObj(d.presences);
    if (!this.countsOnly) this.#merge(d.presences, true);
    this.#count(d);
    this.synced = true;
  }
  /** @param {any} d the `data` of `presence_diff`: joins replace by ref, then leaves, then ephemeral flag changes, then count */
  diff(d) {
    if (isObj(d.joins)) this.#merge(d.joins, true);
    if (isObj(d.leaves)) this.#merge(d.leaves, false);
    if (isObj(d.ephemeral)) this.#flags(d.ephemeral);
    this.#count(d);
  }
  /**
   * Flag changes of metas whose `meta` did not change: key → ref → flags
   * (`null`: gone). Unknown keys and refs are skipped.
   * @param {Record<string, any>} byKey
   */
  #flags(byKey) {
    for (const [key, refs] of Object.entries(byKey)) {
      const metas = this.members.get(key);
      if (!metas || !isObj(refs)) continue;
      for (const [ref, flags] of Object.entries(refs)) {
        const i = metas.findIndex((m) => m.ref === ref);
        if (i < 0 || !isObj(flags)) continue;
        const ephemeral = { ...(isObj(metas[i].ephemeral) ? metas[i].ephemeral : {}) };
        for (const [flag, value] of Object.entries(flags)) {
          if (value === null) delete ephemeral[flag];
          else ephemeral[flag] = value;
        }
        metas[i] = { ...metas[i], ephemeral };
      }
    }
  }
  /** @param {any} d */
  #count(d) {
    if (isObj(d.count) && uint(d.count.keys) && uint(d.count.connections)) this.count = { keys: d.count.keys, connections: d.count.connections };
  }
  /**
   * @param {Record<string, any>} byKey
   * @param {boolean} join
   */
  #merge(byKey, join) {
    for (const [key, entry] of Object.entries(byKey)) {
      if (!isObj(entry) || !Array.isArray(entry.metas)) continue;
      let metas = this.members.get(key) ?? [];
      for (const m of entry.metas) {
        if (!isObj(m) || typeof m.ref !== "string") continue;
        metas = metas.filter((x) => x.ref !== m.ref);
        if (join) metas.push(m);
      }
      if (metas.length) this.members.set(key, metas);
      else this.members.delete(key);
    }
  }
  /** The members, in the order they were first seen; `self` marks this connection's metas and key. @returns {Member[]} */
  list() {
    return [...this.members].map(([key, metas]) => {
      const ms = metas.map((m) => ({ ...m, self: m.ref === this.self }));
      return { key, metas: ms, self: ms.some((m) => m.self) };
    });
  }
}

// ---------------------------------------------------------------- transports

/**
 * @typedef {object} Link what a transport tells the client
 * @property {() => void} open the connection is usable
 * @property {(text: string) => void} message one server envelope (JSON text)
 * @property {() => void} alive any sign of life (SSE comments included)
 * @property {(end: {code: number, reason?: string, opened: boolean, retryMs?: number}) => void} close it ended
 */
/** @typedef {{kind: "websocket"|"sse", send: (text: string) => void, close: () => void}} Transport */

/**
 * @param {any} WS the WebSocket constructor
 * @param {string} url
 * @param {Link} link
 * @returns {Transport}
 */
function webSocket(WS, url, link) {
  const ws = new WS(url, SUBPROTOCOLS);
  let opened = false;
  let done = false;
  ws.onopen = () => {
    opened = true;
    link.open();
  };
  ws.onmessage = (/** @type {any} */ e) => {
    link.alive();
    link.message(e.data);
  };
  ws.onclose = (/** @type {any} */ e) => {
    if (!done) link.close({ code: e.code || 1006, reason: e.reason, opened });
    done = true;
  };
  ws.onerror = () => {};
  return {
    kind: "websocket",
    send: (text) => ws.send(text),
    close() {
      done = true;
      try {
        ws.close(1000);
      } catch {}
    },
  };
}

/**
 * The SSE transport (docs/sse.md): a `GET` stream read with `fetch` (any
 * event name, no automatic reconnect: the client decides), and `POST`s of
 * the client's envelopes, one at a time and in order.
 * @param {typeof fetch} fetchFn
 * @param {{setTimeout: Function}} timers
 * @param {string} url
 * @param {string} lastId the last `id:` seen, for the stream's own resume
 * @param {Link & {id: (id: string) => void}} link
 * @returns {Transport}
 */
function sse(fetchFn, timers, url, lastId, link) {
  const abort = new AbortController();
  /** @type {any} */
  let session = null;
  let done = false;
  let retryMs = 0;
  /** @type {string[]} */
  const queue = [];
  let posting = false;
  /** @param {number} code @param {string} [reason] */
  const end = (code, reason) => {
    if (done) return;
    done = true;
    abort.abort();
    link.close({ code, reason, opened: session != null, retryMs });
  };
  const get = new URL(url, globalThis.location?.href);
  if (lastId) get.searchParams.set("lastEventId", lastId);
  // Protocol v2 (docs/sse.md §3.1): events are unnamed, their data the compact array.
  get.searchParams.set("protocol", SUBPROTOCOLS[0]);
  /** @param {string} event @param {string} data */
  const dispatch = (event, data) => {
    if (event === "$session") {
      try {
        session = JSON.parse(data);
      } catch {}
      if (!session?.session) return end(1006, "bad $session");
      // The stream's opening `retry:` is for EventSource; only one sent
      // later (before a `$close`) is the server's hint for this client.
      retryMs = 0;
      link.open();
      pump();
    } else if (event === "$close") {
      let d = /** @type {any} */ ({});
      try {
        d = JSON.parse(data);
      } catch {}
      end(uint(d.code) ? d.code : 1006, d.reason);
    } else if (!["$joined", "$join_error", "$resync"].includes(event)) {
      link.message(data);
    }
  };
  (async () => {
    const res = await fetchFn(get.href, { headers: { accept: "text/event-stream" }, cache: "no-store", signal: abort.signal });
    if (res.status === 204) return end(1000, "stream stopped");
    if (res.status !== 200 || !res.body || !(res.headers.get("content-type") ?? "").startsWith("text/event-stream")) {
      const s = res.status;
      // A shed (429/503): not before the server's `retry-after` (§7.3).
      const after = Number(res.headers.get("retry-after"));
      if ((s === 429 || s === 503) && after > 0) retryMs = Math.min(after, 3600) * 1000;
      return end(s === 401 || s === 403 ? 4501 : s >= 400 && s < 500 && s !== 429 && s !== 408 ? 1008 : 1006, `HTTP ${s}`);
    }
    const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
    let buf = "";
    let event = "";
    let data = /** @type {string[]} */ ([]);
    for (;;) {
      const { value, done: eof } = await reader.read();
      if (eof) break;
      link.alive();
      buf += value;
      const lines = buf.split(/\r\n|\r|\n/);
      buf = lines.pop() ?? "";
      for (const line of lines) {
        if (line === "") {
          if (data.length) dispatch(event || "message", data.join("\n"));
          event = "";
          data = [];
          continue;
        }
        if (line[0] === ":") continue;
        const i = line.indexOf(":");
        const field = i < 0 ? line : line.slice(0, i);
        const val = i < 0 ? "" : line.slice(i + 1).replace(/^ /, "");
        if (field === "event") event = val;
        else if (field === "data") data.push(val);
        else if (field === "id") link.id(val);
        else if (field === "retry" && /^\d+$/.test(val)) retryMs = +val;
      }
      if (done) return;
    }
    end(1006, "stream ended");
  })().catch(() => end(1006, "stream failed"));

  async function pump() {
    if (posting || !session || done) return;
    posting = true;
    while (queue.length && !done) {
      const max = session.max_post_envelopes || 32;
      const size = session.max_post_size || 65536;
      let n = 1;
      let bytes = utf8Length(queue[0]) + 2;
      for (let b; n < queue.length && n < max && bytes + (b = utf8Length(queue[n]) + 1) <= size; n++) bytes += b;
      const batch = queue.slice(0, n);
      let res;
      try {
        res = await fetchFn(url, {
          method: "POST",
          headers: { "content-type": "application/json", "switchboard-session": session.session, "switchboard-secret": session.secret },
          body: `[${batch.join(",")}]`,
        });
      } catch {
        return end(1006, "POST failed");
      }
      if (res.status === 429) await new Promise((r) => timers.setTimeout(r, 1000));
      else if (res.status === 202) queue.splice(0, n);
      else return end(res.status === 404 || res.status >= 500 ? 1006 : 1008, `POST answered ${res.status}`);
    }
    posting = false;
  }
  return {
    kind: "sse",
    send(text) {
      queue.push(text);
      pump();
    },
    close() {
      done = true;
      abort.abort();
    },
  };
}

// ---------------------------------------------------------------- rooms

/** @typedef {{rewind?: number, data?: unknown, recover?: boolean, timeout?: number}} JoinOptions `timeout`: ms for the first join (default the call timeout), also while offline */
/** @typedef {{reason: "not_recovered"|"no_history"|"missed"|"epoch_changed"|"lagged"|"gap_unrecovered", gap?: any}} Resync */
/** @typedef {{event: string, room: string|null, offset: number|null}} EventInfo */
/** @typedef {(data: any, info: EventInfo) => void} EventHandler */

/** A small set of listeners per name; `emit` isolates throwing listeners. */
class Listeners {
  /** @param {(e: unknown) => void} oops */
  constructor(oops) {
    /** @type {Map<string, Set<Function>>} */
    this.map = new Map();
    this.oops = oops;
  }
  /** @param {string} name @param {Function} fn @returns {() => void} */
  on(name, fn) {
    let s = this.map.get(name);
    if (!s) this.map.set(name, (s = new Set()));
    s.add(fn);
    return () => s.delete(fn);
  }
  /** @param {string} name @param {...any} args */
  emit(name, ...args) {
    for (const fn of [...(this.map.get(name) ?? [])]) {
      try {
        fn(...args);
      } catch (e) {
        this.oops(e);
      }
    }
  }
}

/** A room the application joined; rejoined and recovered after every reconnect. */
export class Room {
  /**
   * @param {Client} client
   * @param {string} name
   * @param {JoinOptions} opts
   * @param {Listeners} l
   */
  constructor(client, name, opts, l) {
    /** @readonly */
    this.name = name;
    this.client = client;
    this.opts = opts;
    this.l = l;
    /** Joined on the current connection. */
    this.joined = false;
    /** The first join succeeded (so it is rejoined after reconnects). */
    this.established = false;
    /** Still wanted (not left, not refused). */
    this.wanted = true;
    /** Stream position in rooms with history (null otherwise). @type {string|null} */
    this.epoch = null;
    this.last = 0;
    /** Offsets announced missing by `slow_consumer` gaps, being recovered. @type {[number, number][]} */
    this.missing = [];
    /** Duplicates dropped by recovery. */
    this.duplicates = 0;
    /** Last client part of the presence meta, re-sent after a rejoin. @type {any} */
    this.meta = undefined;
    /** The first join: resolves with this room once the server accepted. @type {Promise<Room>} */
    this.ready = Promise.resolve(this);
    const view = new PresenceView();
    this.view = view;
    const room = this;
    this.presence = {
      /** @returns {Member[]} */
      list: () => view.list(),
      /** @returns {Count} */
      count: () => view.count,
      countsOnly: () => view.countsOnly,
      /** @param {(members: Member[], view: PresenceView) => void} fn */
      onChange: (fn) => l.on("$presence", fn),
      /**
       * Sets this connection's meta (client part; kept and re-sent after
       * rejoins) and/or ephemeral flags (volatile: refused with "offline"
       * while disconnected). @param {{meta?: object, ephemeral?: object}} d
       */
      set(d) {
        if (d.meta !== undefined) room.meta = d.meta;
        return room.client.request({ type: "presence", room: room.name, data: d }, { volatile: d.meta === undefined });
      },
    };
  }
  /** Host events of this room; `"*"` gets every event. @param {string} event @param {EventHandler} fn */
  on(event, fn) {
    return this.l.on(`e:${event}`, fn);
  }
  /** The app must reload this room's state (events were lost). @param {(r: Resync) => void} fn */
  onResync(fn) {
    return this.l.on("$resync", fn);
  }
  /** Every `gap` notice, recovered or not. @param {(gap: any) => void} fn */
  onGap(fn) {
    return this.l.on("$gap", fn);
  }
  /** Each (re)join: `{rejoin, recovered, reply}`. @param {(j: {rejoin: boolean, recovered: boolean|null, reply: any}) => void} fn */
  onJoin(fn) {
    return this.l.on("$join", fn);
  }
  /** The room ended for good (left, a rejoin was refused, or the server closed it: code `"room_closed"`). @param {(why: SwitchboardError|null) => void} fn */
  onClose(fn) {
    return this.l.on("$close", fn);
  }
  /**
   * Calls the host's handler `event` in this room; resolves with its reply.
   * @param {string} event
   * @param {unknown} [data]
   * @param {{timeout?: number, retry?: boolean}} [o] `retry`: safe to send again when the connection dropped before the answer
   */
  call(event, data, o) {
    return this.client.request({ type: "call", room: this.name, event, data }, o);
  }
  /** Leaves the room (and stops rejoining it). */
  async leave() {
    if (!this.wanted) return;
    const joined = this.joined;
    this.client.rooms.delete(this.name);
    this.#end(null);
    if (joined) {
      await this.client.request({ type: "leave", room: this.name }, { volatile: true }).catch(() => {});
    }
  }
  /** @param {SwitchboardError|null} why */
  #end(why) {
    this.wanted = false;
    this.joined = false;
    this.l.emit("$close", why);
  }
  /** The `join` envelope for this room, with its position when it has one. @param {number} [from] */
  joinMsg(from) {
    /** @type {any} */
    const m = { type: "join", room: this.name };
    if (this.opts.data !== undefined) m.data = this.opts.data;
    if (this.epoch != null && this.opts.recover !== false) Object.assign(m, { offset: from ?? this.last, epoch: this.epoch });
    else if (this.opts.rewind && this.epoch == null) m.rewind = this.opts.rewind;
    return m;
  }
  /** @param {any} reply @param {boolean} rejoin */
  joinedWith(reply, rejoin) {
    this.joined = this.established = true;
    const h = this.client.hello;
    if (h) this.view.self = `${h.node}.${h.connection_id}`;
    this.view.synced = false;
    const d = isObj(reply) ? reply : {};
    const hist = typeof d.epoch === "string" && uint(d.offset);
    const recovered = typeof d.recovered === "boolean" ? d.recovered : null;
    if (hist) {
      if (recovered !== true) {
        this.missing = [];
        // A first join with rewind: the rewound events (offsets <= head) follow.
        this.last = !rejoin && this.opts.rewind && this.epoch == null ? 0 : d.offset;
      }
      this.epoch = d.epoch;
    }
    this.l.emit("$join", { rejoin, recovered, reply: d });
    if (rejoin && (!hist || recovered === false)) this.resync(hist ? "not_recovered" : "no_history");
    if (rejoin && this.meta !== undefined) this.client.request({ type: "presence", room: this.name, data: { meta: this.meta } }, { volatile: true }).catch(() => {});
  }
  /** @param {Resync["reason"]} reason @param {any} [gap] */
  resync(reason, gap) {
    this.l.emit("$resync", gap ? { reason, gap } : { reason });
  }
  /** @param {Envelope} env */
  event(env) {
    const o = env.offset;
    if (o != null && this.epoch != null) {
      if (o <= this.last) {
        const i = this.missing.findIndex(([a, b]) => o >= a && o <= b);
        if (i < 0) {
          this.duplicates++;
          return;
        }
        const [a, b] = this.missing[i];
        this.missing.splice(i, 1, ...(/** @type {[number, number][]} */ ([[a, o - 1], [o + 1, b]]).filter(([x, y]) => x <= y)));
      } else this.last = o;
    }
    const info = { event: /** @type {string} */ (env.event), room: this.name, offset: o ?? null };
    this.l.emit(`e:${env.event}`, env.data ?? null, info);
    this.l.emit("e:*", env.data ?? null, info);
  }
  /** @param {any} g */
  gap(g) {
    this.l.emit("$gap", g);
    if (g.reason === "epoch_changed" && typeof g.epoch === "string") {
      this.epoch = g.epoch;
      this.last = 0;
      this.missing = [];
      this.resync("epoch_changed", g);
    } else if (g.reason === "slow_consumer" && uint(g.from) && uint(g.to) && g.from >= 1 && this.epoch && this.missing.length < 16) {
      // Recover from history: leave, then rejoin from `from - 1`; the replay
      // delivers exactly the missing offsets (possibly after newer ones).
      this.missing.push([g.from, g.to]);
      this.joined = false;
      this.client.send({ type: "leave", room: this.name });
      this.client.rejoin(this, g.from - 1);
    } else {
      if (uint(g.to) && g.to > this.last) this.last = g.to;
      this.resync(g.reason === "missed" ? "missed" : "gap_unrecovered", g);
    }
  }
  /** @param {string} type @param {any} data */
  presenceMsg(type, data) {
    if (type === "presence_state") this.view.state(data);
    else this.view.diff(data);
    this.l.emit("$presence", this.view.list(), this.view);
  }
  /** The join was refused on a rejoin, or the server closed the room. @param {SwitchboardError} e */
  refused(e) {
    this.client.rooms.delete(this.name);
    this.#end(e);
  }
}

// ---------------------------------------------------------------- client

/**
 * @typedef {object} Status
 * @property {"connecting"|"open"|"reconnecting"|"closed"} state
 * @property {{code: number, kind: string, message: string}|null} reason why the last connection ended (words, no raw codes needed)
 * @property {number} attempt failed attempts since the last healthy connection
 * @property {number|null} retryAt when the next attempt starts (ms, the `now` clock); null while one runs, while offline, or when closed
 * @property {"websocket"|"sse"|null} transport
 * @property {string|null} connection this connection's presence ref (`node.connection_id`) while open
 */

/**
 * @typedef {object} Options
 * @property {"auto"|"websocket"|"sse"} [transport] "auto" (default): WebSocket, falling back to SSE (when `sse` is set) if a WebSocket cannot open
 * @property {string} [sse] URL of the server's SSE endpoint
 * @property {() => Promise<string>|string} [token] called before every connection attempt and before the credentials expire; sent as the query parameter `tokenParam`
 * @property {string} [tokenParam] default "access_token"
 * @property {number} [callTimeout] ms, default 10000
 * @property {number} [connectTimeout] ms until `hello`, default 10000
 * @property {{initial?: number, max?: number, resetAfter?: number}} [backoff] ms; defaults 1000, 30000, 30000
 * @property {{messages?: number, bytes?: number}} [offlineBuffer] defaults 256 messages, 1 MiB
 * @property {number} [maxMessageBytes] largest server message accepted, default 16 MiB
 * @property {any} [WebSocket] injectable for tests
 * @property {typeof fetch} [fetch]
 * @property {{setTimeout: Function, clearTimeout: Function}} [timers]
 * @property {() => number} [random]
 * @property {() => number} [now]
 * @property {any} [window] the object with `online`/`offline` events, `navigator` and `document` (default: globalThis)
 * @property {{error: (...a: any[]) => void}} [logger] default console
 */

/**
 * @typedef {object} Pending a request waiting for its answer
 * @property {number} ref
 * @property {string} text
 * @property {(v: any) => void} resolve
 * @property {(e: SwitchboardError) => void} reject
 * @property {any} timer
 * @property {boolean} written
 * @property {boolean} retry
 * @property {Room} [room] a join's room
 * @property {boolean} [rejoin]
 * @property {number} [size] its UTF-8 length, once it waits in the offline buffer
 */

/**
 * Opens a client. It connects at once, and reconnects by itself until
 * `close()` or a close code that says stop.
 * @param {string} url the WebSocket URL (relative URLs are resolved against the page, http becomes ws)
 * @param {Options} [options]
 */
export function connect(url, options) {
  return new Client(url, options);
}

export class Client {
  /** @param {string} url @param {Options} [o] */
  constructor(url, o = {}) {
    this.url = url;
    /** @private */
    this.o = o;
    /** @private */
    this.t = o.timers ?? globalThis;
    /** @private */
    this.now = o.now ?? Date.now;
    /** @private */
    this.win = o.window ?? globalThis;
    /** @private */
    this.log = o.logger ?? console;
    /** @private */
    this.backoff = new Backoff(o.backoff, o.random);
    /** @type {Status} */
    this.status = { state: "connecting", reason: null, attempt: 0, retryAt: null, transport: null, connection: null };
    /** @type {Map<string, Room>} */
    this.rooms = new Map();
    /** @type {Map<number, Pending>} @private */
    this.pending = new Map();
    /** Requests waiting for a connection (the offline buffer). @type {Pending[]} */
    this.buffer = [];
    /** Counters: malformed/unknown messages, late replies, offline drops. */
    this.stats = { malformed: 0, unknown: 0, late: 0, dropped: 0 };
    /** @private */
    this.l = new Listeners((e) => this.#oops(e));
    /** @private */
    this.ref = 0;
    /** @type {Transport|null} @private */
    this.tr = null;
    /** @private */
    this.live = false;
    /** @private */
    this.stopped = false;
    /** @private */
    this.sseOnly = o.transport === "sse";
    /** @private */
    this.closedByApp = false;
    /** The last connection ended with 4501 (a fresh token is tried once). @private */
    this.refusedOnce = false;
    /** @type {string|null} @private */
    this.token = null;
    /** @private */
    this.lastId = "";
    /** @type {any} */
    this.hello = null;
    /** @private */
    this.openedAt = 0;
    /** @private */
    this.lastRx = 0;
    /** @private */
    this.garbage = 0;
    /** @type {any} @private */
    this.timer = null;
    /** @type {any} @private */
    this.beat = null;
    /** @type {any} @private */
    this.renew = null;
    /** @type {any} @private */
    this.liveBy = null;
    /** Joins given up (timed out) after they were written: ref -> room, left if they succeed. @type {Map<number, string>} @private */
    this.abandoned = new Map();
    /** @type {Pending[]} @private */
    this.joinQueue = [];
    const on = (/** @type {string} */ ev, /** @type {Function} */ fn) => this.win.addEventListener?.(ev, fn);
    on("online", () => this.#wake());
    on("offline", () => this.tr && this.#drop(1006, "offline", "the network is offline"));
    this.win.document?.addEventListener?.("visibilitychange", () => {
      if (this.win.document.visibilityState === "visible") this.#wake();
    });
    this.#attempt();
  }

  /** Every status change. @param {(s: Status) => void} fn */
  onStatus(fn) {
    return this.l.on("status", fn);
  }
  /** Problems that are not a request's: bad server messages, throwing handlers, version mismatch. @param {(e: {kind: string, message: string, error?: unknown}) => void} fn */
  onError(fn) {
    return this.l.on("error", fn);
  }
  /** Direct events (no room); `"*"` gets all. @param {string} event @param {EventHandler} fn */
  onEvent(event, fn) {
    return this.l.on(`d:${event}`, fn);
  }

  /**
   * Joins a room; resolves once the server accepted (waits for the
   * connection while offline, within the call timeout).
   * @param {string} name
   * @param {JoinOptions} [opts]
   * @returns {Promise<Room>}
   */
  join(name, opts = {}) {
    const have = this.rooms.get(name);
    if (have) return have.ready;
    const room = new Room(this, name, opts, new Listeners((e) => this.#oops(e)));
    this.rooms.set(name, room);
    // A join of this room given up while still in flight on this
    // connection is taken over rather than sent again: the server would
    // answer a second `join` as one of a room already joined, without the
    // stream's position, and the next reconnect could not recover.
    let adopt;
    for (const [ref, n] of this.abandoned) {
      if (n === name) {
        adopt = ref;
        this.abandoned.delete(ref);
        break;
      }
    }
    return (room.ready = this.request(room.joinMsg(), { room, retry: true, timeout: opts.timeout, adopt }).then(
      () => room,
      (e) => {
        if (this.rooms.get(name) === room) this.rooms.delete(name);
        room.wanted = false;
        throw e;
      },
    ));
  }
  /** A call without a room. @param {string} event @param {unknown} [data] @param {{timeout?: number, retry?: boolean}} [o] */
  call(event, data, o) {
    return this.request({ type: "call", event, data }, o);
  }
  /** Connects now instead of waiting out the backoff (also after a stop). */
  retryNow() {
    if (this.tr || this.closedByApp) return;
    this.stopped = false;
    this.t.clearTimeout(this.timer);
    this.#attempt();
  }
  /** Closes for good: pending and buffered requests fail with "closed". */
  close() {
    this.stopped = this.closedByApp = true;
    this.t.clearTimeout(this.timer);
    this.tr?.close();
    this.#ended();
    this.#fail(this.buffer.splice(0), "closed", "the client was closed");
    this.#set({ state: "closed", reason: { code: 1000, kind: "closed", message: "closed by the application" }, retryAt: null, transport: null, connection: null });
  }

  /**
   * Sends a request and resolves with its reply (rejects with a
   * SwitchboardError). While disconnected it waits in the offline buffer,
   * unless `volatile`.
   * @param {any} msg
   * @param {{timeout?: number, retry?: boolean, volatile?: boolean, room?: Room, adopt?: number}} [o]
   *   `adopt`: the ref of a request already written on this connection
   *   whose answer this one takes (nothing is sent).
   */
  request(msg, o = {}) {
    return new Promise((resolve, reject) => {
      if (this.stopped) return reject(new SwitchboardError("closed", "the client was closed"));
      if (o.volatile && !this.live) return reject(new SwitchboardError("offline", "not connected"));
      const ref = o.adopt ?? ++this.ref;
      const text = JSON.stringify({ ...msg, ref });
      const max = this.hello?.max_message_size;
      if (max && text.length * 3 > max && utf8Length(text) > max) return reject(new SwitchboardError("too_large", `message larger than the server's ${max} bytes`));
      /** @type {Pending} */
      const p = { ref, text, resolve, reject, timer: null, written: false, retry: !!o.retry, room: o.room };
      p.timer = this.t.setTimeout(() => {
        this.#forget(p);
        if (p.room && p.written) this.abandoned.set(ref, p.room.name);
        reject(new SwitchboardError("timeout", "no answer in time"));
      }, o.timeout ?? this.o.callTimeout ?? 10000);
      this.pending.set(ref, p);
      if (o.adopt != null) p.written = true;
      else if (this.live) this.#write(p);
      else this.#buffer(p);
    });
  }
  /** Fire and forget, only while connected. @param {any} msg */
  send(msg) {
    if (this.tr && this.hello) this.tr.send(JSON.stringify(msg));
  }
  /** Rejoins a room on this connection (after a reconnect or to recover a gap). @param {Room} room @param {number} [from] */
  rejoin(room, from) {
    const ref = ++this.ref;
    /** @type {Pending} */
    const p = { ref, text: JSON.stringify({ ...room.joinMsg(from), ref }), resolve: () => {}, reject: () => {}, timer: null, written: false, retry: false, room, rejoin: true };
    this.pending.set(ref, p);
    this.joinQueue.push(p);
    this.#pumpJoins();
  }

  // -- internals

  /** @param {Partial<Status>} s */
  #set(s) {
    this.status = { ...this.status, ...s, attempt: this.backoff.attempt };
    this.l.emit("status", this.status);
  }
  /** @param {unknown} e */
  #oops(e) {
    this.#error("handler", "an application handler threw", e);
  }
  /** @param {string} kind @param {string} message @param {unknown} [error] */
  #error(kind, message, error) {
    if (!this.l.map.get("error")?.size) return this.log.error(`switchboard: ${message}`, error ?? "");
    for (const fn of this.l.map.get("error") ?? []) {
      try {
        fn({ kind, message, error });
      } catch (e) {
        this.log.error("switchboard: an error handler threw", e);
      }
    }
  }
  #wake() {
    if (!this.tr && !this.stopped) this.retryNow();
  }
  async #attempt() {
    this.timer = null;
    if (this.win.navigator?.onLine === false) {
      return this.#set({ state: this.status.state === "connecting" ? "connecting" : "reconnecting", reason: { code: 1006, kind: "offline", message: "the network is offline" }, retryAt: null });
    }
    if (this.status.state !== "connecting") this.#set({ state: "reconnecting", retryAt: null });
    this.token = null;
    if (this.o.token) {
      try {
        this.token = await this.o.token();
      } catch (e) {
        return this.#schedule({ code: 1006, kind: "token", message: "could not get a sign-in token" });
      }
    }
    if (!this.tr && !this.stopped) this.#open(!this.sseOnly);
  }
  /** @param {boolean} ws */
  #open(ws) {
    const u = new URL(ws ? this.url : this.o.sse ?? this.url, this.win.location?.href ?? globalThis.location?.href);
    if (this.token) u.searchParams.set(this.o.tokenParam ?? "access_token", this.token);
    /** @type {Transport|null} */
    let me = null;
    let opened = false;
    const fallback = ws && !!this.o.sse && this.o.transport !== "websocket";
    /** @type {Link & {id: (id: string) => void}} */
    const link = {
      open: () => {
        if (me !== this.tr) return;
        opened = true;
        this.lastRx = this.now();
        if (!ws) this.sseOnly = true;
      },
      alive: () => {
        if (me === this.tr) this.lastRx = this.now();
      },
      message: (text) => me === this.tr && this.#message(text),
      id: (id) => {
        this.lastId = id;
      },
      close: (end) => {
        if (me !== this.tr) return;
        this.tr = null;
        // "auto": a WebSocket that never opened: try SSE at once (kept once it works).
        if (fallback && !end.opened) return this.#open(false);
        this.#closed(end);
      },
    };
    if (ws) {
      u.protocol = u.protocol.replace(/^http/, "ws");
      me = webSocket(this.o.WebSocket ?? globalThis.WebSocket, u.href, link);
    } else me = sse(this.o.fetch ?? globalThis.fetch.bind(globalThis), this.t, u.href, this.lastId, link);
    this.tr = me;
    this.lastRx = this.now();
    this.#arm(this.o.connectTimeout ?? 10000, () => {
      // A WebSocket upgrade that hangs (a proxy holding it) falls back too.
      if (fallback && !opened && me === this.tr) {
        me?.close();
        this.tr = null;
        return this.#open(false);
      }
      this.#drop(1006, "connect_timeout", "the server did not answer in time");
    });
  }
  /** @param {number} ms @param {() => void} fn */
  #arm(ms, fn) {
    this.t.clearTimeout(this.beat);
    this.beat = this.t.setTimeout(fn, ms);
  }
  /** Liveness (protocol §8): ping after I ms of silence; dead if nothing within T after it. */
  #heartbeat() {
    const h = this.hello;
    const I = h.heartbeat_interval_ms || 25000;
    const T = h.heartbeat_timeout_ms || 10000;
    const check = () => {
      const idle = this.now() - this.lastRx;
      if (idle < I) return this.#arm(I - idle, check);
      const sent = this.now();
      this.send({ type: "ping", ref: ++this.ref });
      this.#arm(T, () => (this.lastRx >= sent ? check() : this.#drop(4001, "heartbeat", "the server stopped answering")));
    };
    this.#arm(I, check);
  }
  /** Ends the current connection from this side. @param {number} code @param {string} kind @param {string} message */
  #drop(code, kind, message) {
    const tr = this.tr;
    if (!tr) return;
    this.tr = null;
    tr.close();
    this.#closed({ code }, { code, kind, message });
  }
  /** @param {string} text */
  #message(text) {
    const env = parseEnvelope(text, this.o.maxMessageBytes);
    if (typeof env === "string") {
      const unknown = env.startsWith("unknown");
      if (unknown) this.stats.unknown++;
      else this.stats.malformed++;
      this.#error(unknown ? "unknown_type" : "malformed", `ignored a server message: ${env}`);
      if (!this.hello || (!unknown && ++this.garbage >= 32)) this.#drop(1006, "protocol", "the server sent something this client cannot read");
      return;
    }
    this.garbage = 0;
    if (!this.hello) {
      if (env.type !== "hello") return this.#drop(1006, "protocol", "the server did not start with hello");
      return this.#hello(env.data);
    }
    const room = env.room != null ? this.rooms.get(env.room) : undefined;
    switch (env.type) {
      case "reply":
      case "error":
        return this.#answer(env);
      case "event":
        if (env.room == null) {
          const info = { event: /** @type {string} */ (env.event), room: null, offset: null };
          this.l.emit(`d:${env.event}`, env.data ?? null, info);
          this.l.emit("d:*", env.data ?? null, info);
        } else if (room?.joined) room.event(env);
        return;
      case "ping":
        return this.send(env.ref != null ? { type: "pong", ref: env.ref } : { type: "pong" });
      case "presence_state":
      case "presence_diff":
        if (room?.joined) room.presenceMsg(env.type, env.data);
        return;
      case "gap":
        if (room?.joined) room.gap(env.data);
        return;
      case "leave":
        // The host closed the room (protocol §3.3.1): the room ends, and
        // is not rejoined after a reconnect.
        if (room?.joined) room.refused(new SwitchboardError("room_closed", env.message ?? "the server closed the room"));
        return;
      case "lagged":
        this.#error("lagged", "the server dropped messages for this client (it read too slowly)");
        for (const r of this.rooms.values()) if (r.epoch == null) r.resync("lagged");
    }
  }
  /** @param {any} h */
  #hello(h) {
    if (h.version < 1 || h.version > PROTOCOL) {
      this.log.error(`switchboard: the server speaks protocol v${h.version}, this client v${PROTOCOL}`);
      this.stopped = true;
      return this.#drop(1002, "version", "this page's client does not match the server: reload the page");
    }
    if (h.server_version && h.server_version !== VERSION) {
      const m = `switchboard.js ${VERSION} talks to a server of crate version ${h.server_version}: load the client from that server`;
      this.log.error(`switchboard: ${m}`);
      this.#error("version", m);
    }
    this.hello = h;
    this.openedAt = this.now();
    this.lastRx = this.now();
    this.#heartbeat();
    // Rejoin every room joined before (a first join waits in the buffer).
    for (const r of this.rooms.values()) if (r.wanted && r.established) this.rejoin(r);
    this.#pumpJoins();
    if (!this.joinQueue.length && !this.#inJoin()) this.#live();
    if (h.expires_in_ms && h.refresh && this.o.token) this.#renewIn(h.expires_in_ms);
    // Rejoins that stay unanswered must not hold the buffer forever.
    this.liveBy = this.t.setTimeout(() => this.#live(), this.o.callTimeout ?? 10000);
  }
  #inJoin() {
    for (const p of this.pending.values()) if (p.rejoin && p.written) return true;
    return false;
  }
  #pumpJoins() {
    if (!this.hello || !this.tr) return;
    let inflight = 0;
    for (const p of this.pending.values()) if (p.rejoin && p.written) inflight++;
    while (this.joinQueue.length && inflight < (this.hello.max_inflight || 16)) {
      const p = /** @type {Pending} */ (this.joinQueue.shift());
      p.written = true;
      inflight++;
      this.tr.send(p.text);
    }
  }
  #live() {
    if (this.live || !this.tr) return;
    this.live = true;
    const h = this.hello;
    for (const p of this.buffer.splice(0)) this.#write(p);
    this.#set({ state: "open", reason: null, retryAt: null, transport: /** @type {Transport} */ (this.tr).kind, connection: `${h.node}.${h.connection_id}` });
  }
  /** @param {number} ms */
  #renewIn(ms) {
    this.t.clearTimeout(this.renew);
    this.renew = this.t.setTimeout(async () => {
      try {
        const token = await /** @type {Function} */ (this.o.token)();
        const r = await this.request({ type: "refresh", data: { token } }, { volatile: true });
        if (r?.expires_in_ms) this.#renewIn(r.expires_in_ms);
      } catch (e) {
        this.#error("token", "refreshing the sign-in failed", e);
      }
    }, ms * 0.8);
  }
  /** @param {Pending} p */
  #write(p) {
    p.written = true;
    /** @type {Transport} */ (this.tr).send(p.text);
  }
  /** Offline buffer: bounded by count and bytes; the oldest is dropped (and its promise rejected). @param {Pending} p */
  #buffer(p) {
    const maxN = this.o.offlineBuffer?.messages ?? 256;
    const maxB = this.o.offlineBuffer?.bytes ?? 1 << 20;
    p.size = utf8Length(p.text);
    if (p.size > maxB) {
      this.#forget(p);
      return p.reject(new SwitchboardError("too_large", "message larger than the offline buffer"));
    }
    this.buffer.push(p);
    let bytes = this.buffer.reduce((n, q) => n + (q.size ?? 0), 0);
    while (this.buffer.length > maxN || bytes > maxB) {
      const old = /** @type {Pending} */ (this.buffer.shift());
      bytes -= old.size ?? 0;
      this.stats.dropped++;
      this.#forget(old);
      old.reject(new SwitchboardError("dropped", "dropped from the full offline buffer"));
    }
  }
  /** @param {Pending} p */
  #forget(p) {
    this.t.clearTimeout(p.timer);
    this.pending.delete(p.ref);
    const i = this.buffer.indexOf(p);
    if (i >= 0) this.buffer.splice(i, 1);
  }
  /** @param {Envelope} env */
  #answer(env) {
    const p = this.pending.get(/** @type {number} */ (env.ref));
    if (!p) {
      const gone = this.abandoned.get(/** @type {number} */ (env.ref));
      this.abandoned.delete(/** @type {number} */ (env.ref));
      // A join that timed out here but succeeded there: leave again (unless joined since).
      if (gone != null && env.type === "reply" && !this.rooms.get(gone)?.joined) this.send({ type: "leave", room: gone });
      if (env.type === "error") this.#error("server", `server error ${env.code}: ${env.message ?? ""}`);
      else this.stats.late++;
      return;
    }
    this.#forget(p);
    const err = env.type === "error" ? new SwitchboardError(/** @type {number} */ (env.code), env.message ?? "error", env.data) : null;
    if (p.room) {
      const r = p.room;
      if (p.rejoin) {
        if (err?.code === 429) {
          // In-flight limit: retry after another answer.
          p.written = false;
          this.pending.set(p.ref, p);
          this.joinQueue.push(p);
        } else if (err) r.refused(err);
        else if (r.wanted && this.rooms.get(r.name) === r) r.joinedWith(env.data, true);
        this.#pumpJoins();
        if (!this.joinQueue.length && !this.#inJoin()) this.#live();
        return;
      }
      if (!err) {
        if (r.wanted) r.joinedWith(env.data, false);
        // A join given up (timed out or left) before its reply: leave again.
        else this.send({ type: "leave", room: r.name });
      }
    }
    if (err) p.reject(err);
    else p.resolve(env.data ?? null);
  }
  /** @param {Pending[]} list @param {string} code @param {string} message */
  #fail(list, code, message) {
    for (const p of list) {
      this.#forget(p);
      p.reject(new SwitchboardError(code, message));
    }
  }
  /** Stops the timers of a connection that ended. */
  #ended() {
    this.t.clearTimeout(this.beat);
    this.t.clearTimeout(this.renew);
    this.t.clearTimeout(this.liveBy);
    this.abandoned.clear();
    this.live = false;
    this.hello = null;
    this.joinQueue = [];
    for (const r of this.rooms.values()) {
      r.joined = false;
      r.view.synced = false;
    }
  }
  /** @param {{code: number, reason?: string, retryMs?: number}} end @param {Status["reason"]} [why] */
  #closed(end, why) {
    const greeted = !!this.hello;
    const healthy = this.openedAt && this.hello && this.now() - this.openedAt >= (this.o.backoff?.resetAfter ?? 30000);
    this.#ended();
    if (healthy) this.backoff.reset();
    // Requests written on the lost connection may or may not have run:
    // they fail, unless the caller said they are safe to send again.
    /** @type {Pending[]} */
    const again = [];
    for (const p of [...this.pending.values()]) {
      if (p.rejoin) this.pending.delete(p.ref);
      else if (p.written && p.retry) {
        p.written = false;
        again.push(p);
      } else if (p.written) this.#fail([p], "disconnected", "the connection dropped before the answer");
    }
    this.buffer.unshift(...again);
    const refused = !greeted && (end.code === 4500 || end.code === 4501);
    const words = refused ? `${closeWords(end.code)}: the server refused the connection` : closeWords(end.code);
    const reason = why ?? { code: end.code, kind: end.code === 1006 ? "dropped" : end.code === 4501 ? "unauthorized" : "closed", message: end.reason ? `${words} (${end.reason})` : words };
    // A refusal for the credentials (4501, or an SSE 401/403) before any
    // `hello`: one fresh token may cure it; refused again, the client stops.
    const renew = end.code === 4501 && !!this.o.token && !this.refusedOnce && !this.stopped;
    this.refusedOnce = end.code === 4501;
    if (renew) return this.#schedule(reason, end.retryMs);
    if (closeAction(end.code) === "stop" || this.stopped) {
      this.stopped = true;
      this.#fail([...this.buffer.splice(0), ...this.pending.values()], "closed", "the connection was closed for good");
      return this.#set({ state: "closed", reason, retryAt: null, transport: null, connection: null });
    }
    // The server's hint (a 1013 shed, an SSE `retry-after` or `retry:`), on
    // top of the backoff: never sooner than either.
    this.#schedule(reason, Math.max(end.retryMs ?? 0, retryHint(end.code, end.reason)));
  }
  /** @param {NonNullable<Status["reason"]>} reason @param {number} [atLeast] */
  #schedule(reason, atLeast = 0) {
    // Offline: no attempts (no spinning); the `online` event starts one.
    if (this.win.navigator?.onLine === false) return this.#set({ state: "reconnecting", reason, retryAt: null, transport: null, connection: null });
    const wait = Math.max(this.backoff.next(), atLeast);
    this.timer = this.t.setTimeout(() => this.#attempt(), wait);
    this.#set({ state: "reconnecting", reason, retryAt: this.now() + wait, transport: null, connection: null });
  }
}
