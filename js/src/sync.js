// switchboard-sync.js: synced rooms for the browser client (docs/sync.md,
// protocol §3.13). A separate module, so pages without shared state do not
// load it: `import { synced, jsonDoc } from "/switchboard-sync.js"`.

/** @typedef {import("./switchboard.js").Room} Room */

/**
 * Who sent an op and what it was based on.
 * @typedef {object} Context
 * @property {string} room
 * @property {string} client
 * @property {string|null} user
 * @property {number} base
 */

/**
 * The app's rule, the same as the server's (deterministic!): changes
 * `state` (a copy) for `op`, or throws a `Reject` to refuse it. A value it
 * returns replaces the state.
 * @typedef {(state: any, op: any, cx: Context) => any} Reducer
 */

/**
 * An op the server refused (or the reducer refused locally).
 * @typedef {object} Rollback
 * @property {any} op
 * @property {number} code the server's code (409: the reducer refused)
 * @property {string} message the reason, for the user
 */

/** A refusal: throw one from a reducer. */
export class Reject extends Error {
  /** @param {string} message @param {number} [code] */
  constructor(message, code = 409) {
    super(message);
    this.name = "Reject";
    this.code = code;
  }
}

const isObj = (/** @type {any} */ v) => v !== null && typeof v === "object" && !Array.isArray(v);
const uint = (/** @type {any} */ v) => Number.isSafeInteger(v) && v >= 0;
const copy = (/** @type {any} */ v) => (v === undefined ? null : structuredClone(v));
const at = (/** @type {any[]} */ p) => `no value at ${JSON.stringify(p)}`;

/**
 * The parent of the last step of `path`, which must exist.
 * @param {any} doc @param {any[]} path
 */
function parent(doc, path) {
  let v = doc;
  for (const s of path.slice(0, -1)) {
    if (v === null || typeof v !== "object" || !(s in v)) throw new Reject(at(path));
    v = v[s];
  }
  return v;
}

/** @param {any} doc @param {any[]} path @returns {any[]} */
function array(doc, path) {
  const a = path.length ? parent(doc, path)[path[path.length - 1]] : doc;
  if (!Array.isArray(a)) throw new Reject(`not an array at ${JSON.stringify(path)}`);
  return a;
}

/**
 * The JSON document reducer, the server's `JsonDoc`: ops `set`, `delete`,
 * `insert`, `remove`, `move`, `increment` by path (docs/sync.md).
 * @type {Reducer}
 */
export function jsonDoc(doc, op) {
  if (doc === null || doc === undefined) doc = {};
  const p = op.path;
  const last = p[p.length - 1];
  const idx = (/** @type {any[]} */ a, /** @type {any} */ i, end = a.length) => {
    if (!uint(i) || i >= end) throw new Reject(`index ${i} outside 0..${a.length}`);
    return i;
  };
  switch (op.type) {
    case "set": {
      if (!p.length) return op.value;
      const o = parent(doc, p);
      if (Array.isArray(o) ? !(typeof last === "number" && last < o.length) : !isObj(o) || typeof last !== "string") throw new Reject(at(p));
      o[last] = op.value;
      return doc;
    }
    case "delete": {
      if (!p.length) throw new Reject("cannot delete the root");
      const o = parent(doc, p);
      if (Array.isArray(o) && typeof last === "number" && last < o.length) o.splice(last, 1);
      else if (isObj(o) && typeof last === "string" && last in o) delete o[last];
      else throw new Reject(at(p));
      return doc;
    }
    case "insert": {
      const a = array(doc, p);
      a.splice(idx(a, op.index ?? a.length, a.length + 1), 0, op.value);
      return doc;
    }
    case "remove": {
      const a = array(doc, p);
      a.splice(idx(a, op.index), 1);
      return doc;
    }
    case "move": {
      const a = array(doc, p);
      const [v] = a.splice(idx(a, op.from), 1);
      a.splice(idx(a, op.to, a.length + 1), 0, v);
      return doc;
    }
    case "increment": {
      if (!p.length) throw new Reject("cannot increment the root");
      const o = parent(doc, p);
      const cur = isObj(o) ? (o[last] ?? 0) : Array.isArray(o) ? o[last] : undefined;
      if (typeof cur !== "number") throw new Reject("not a number");
      o[last] = cur + op.by;
      return doc;
    }
  }
  throw new Reject(`unknown op type ${op.type}`, 422);
}

/** A random client id (16 hex digits or more). */
function clientId() {
  const b = new Uint8Array(12);
  globalThis.crypto.getRandomValues(b);
  return Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
}

/** Codes after which an op is sent again (not processed). */
const RETRY = new Set([405, 408, 420, 429, 503, "timeout", "disconnected", "dropped", "offline", "not_joined"]);

/**
 * A synced room's state on this page: the confirmed state and version, the
 * pending local ops, and the view (pending ops over the confirmed state).
 */
export class Synced {
  /** The view no longer is the pending ops over the confirmed state. */
  #stale = false;
  /**
   * @param {Room} room a joined room (from `client.join`)
   * @param {Reducer} [reducer] default `jsonDoc`
   * @param {{clientId?: string, gapWait?: number, maxPending?: number, timers?: {setTimeout: Function, clearTimeout: Function}}} [o]
   */
  constructor(room, reducer = jsonDoc, o = {}) {
    this.room = room;
    this.reducer = reducer;
    this.clientId = o.clientId ?? clientId();
    this.t = o.timers ?? globalThis;
    this.o = o;
    /** The confirmed state. @type {any} */
    this.confirmed = null;
    /** The confirmed version. */
    this.version = 0;
    /** Local ops not confirmed yet, oldest first. @type {{seq: number, base: number, op: any, acked: number|null}[]} */
    this.pending = [];
    /** The predicted state the page shows. @type {any} */
    this.state = null;
    /** Whether the confirmed state is current (false from a reconnect to the resync). */
    this.synced = false;
    /** @type {string|null} */
    this.user = null;
    this.seq = 1;
    /** Ops that came ahead of a missing one, by version. @type {Map<number, any>} */
    this.early = new Map();
    this.inflight = false;
    /** @type {any} */
    this.retry = null;
    /** @type {any} */
    this.gap = null;
    this.stopped = false;
    /** The resync running, if any. @type {Promise<void>|null} */
    this.busy = null;
    this.again = false;
    /** @type {Set<Function>} */
    this.changeFns = new Set();
    /** @type {Set<Function>} */
    this.rollbackFns = new Set();
    room.on("sync.op", (d) => this.#record(d));
    // After a rejoin: a room with history replays the missed `sync.op`
    // events (recovered); otherwise the room asks for a resync.
    room.onResync(() => this.resync());
    room.onClose(() => this.stop());
    /** Resolves once the first state arrived. @type {Promise<Synced>} */
    this.ready = this.resync(true).then(() => this);
  }
  /** Called after every change of the view. @param {(s: Synced) => void} fn */
  onChange(fn) {
    this.changeFns.add(fn);
    return () => this.changeFns.delete(fn);
  }
  /** A local op was undone: show `message`. @param {(r: Rollback) => void} fn */
  onRollback(fn) {
    this.rollbackFns.add(fn);
    return () => this.rollbackFns.delete(fn);
  }
  /**
   * Applies `op` to the view at once and queues it for the server. Throws
   * a `Reject` when the reducer refuses it here (nothing is queued).
   * @param {any} op
   */
  apply(op) {
    if (this.pending.length >= (this.o.maxPending ?? 1000)) throw new Reject("too many changes waiting for the server", 429);
    this.state = this.#run(this.state, op, this.#cx(this.clientId, this.user, this.version));
    this.pending.push({ seq: this.seq++, base: this.version, op, acked: null });
    this.#emit();
    this.#pump();
  }
  /** Stops listening (the room stays joined). */
  stop() {
    this.stopped = true;
    this.t.clearTimeout(this.retry);
    this.t.clearTimeout(this.gap);
  }
  /** @param {string} client @param {string|null} user @param {number} base @returns {Context} */
  #cx(client, user, base) {
    return { room: this.room.name, client, user, base };
  }
  /** @param {any} state @param {any} op @param {Context} cx */
  #run(state, op, cx) {
    const draft = copy(state);
    const out = this.reducer(draft, op, cx);
    return out === undefined ? draft : out;
  }
  /**
   * Recomputes the view (pending ops over the confirmed state) when it is
   * stale. The acknowledgement of the oldest pending op, in order, leaves it
   * as it was, so a long queue drains without a replay per op.
   */
  #view() {
    if (!this.#stale) return;
    this.#stale = false;
    let s = this.confirmed;
    for (const p of this.pending) {
      try {
        s = this.#run(s, p.op, this.#cx(this.clientId, this.user, p.base));
      } catch {
        // Refused over the new state: the server will refuse it too.
      }
    }
    this.state = s;
  }
  #emit() {
    for (const fn of this.changeFns) {
      try {
        fn(this);
      } catch (e) {
        console.error(e);
      }
    }
  }
  /** A server op. @param {any} r */
  #record(r) {
    if (!isObj(r) || !uint(r.version) || typeof r.client !== "string" || !uint(r.seq)) return;
    if (r.version <= this.version) return;
    if (r.version > this.version + 1) {
      if (this.early.size < 4096) this.early.set(r.version, r);
    } else {
      this.#confirm(r);
      for (let n; (n = this.early.get(this.version + 1)); ) this.#confirm(n);
    }
    for (const v of this.early.keys()) if (v <= this.version) this.early.delete(v);
    this.#settle();
    this.#view();
    this.#emit();
  }
  /** @param {any} r */
  #confirm(r) {
    this.early.delete(r.version);
    const head = this.pending[0];
    // Our oldest pending op, applied by the view with the same context.
    let same = r.client === this.clientId && (r.user ?? null) === this.user && head?.seq === r.seq && head.base === r.base;
    try {
      this.confirmed = this.#run(this.confirmed, r.op, this.#cx(r.client, r.user ?? null, r.base));
    } catch (e) {
      same = false;
      console.error("sync: a confirmed op is refused here: the reducer is not deterministic", e);
    }
    if (!same) this.#stale = true;
    this.version = r.version;
    if (r.client === this.clientId) this.pending = this.pending.filter((p) => p.seq > r.seq);
  }
  /** Acknowledged ops the confirmed state has reached leave; a missing op starts the resync timer. */
  #settle() {
    const n = this.pending.length;
    this.pending = this.pending.filter((p) => p.acked === null || p.acked > this.version);
    if (this.pending.length !== n) this.#stale = true;
    const waiting = this.early.size > 0 || this.pending.some((p) => p.acked !== null);
    if (!waiting) {
      this.t.clearTimeout(this.gap);
      this.gap = null;
    } else if (!this.gap) this.gap = this.t.setTimeout(() => ((this.gap = null), this.resync()), this.o.gapWait ?? 1000);
  }
  /**
   * Asks for what was missed (`sync.get`), rebases, resends. One at a time:
   * a call while one runs makes it ask once more.
   * @param {boolean} [first]
   */
  resync(first) {
    this.synced = false;
    this.#emit();
    if (this.busy) {
      this.again = true;
      return this.busy;
    }
    this.busy = this.#load(first).finally(() => (this.busy = null));
    return this.busy;
  }
  /** @param {boolean} [first] */
  async #load(first) {
    do {
      this.again = false;
      for (;;) {
        if (this.stopped) return;
        try {
          /** @type {any} */
          const d = await this.room.call("sync.get", { since: first ? null : this.version, client: this.clientId }, { retry: true });
          if (!isObj(d) || !uint(d.version)) throw new Error("bad sync.get reply");
          this.user = d.user ?? null;
          if (first) this.seq = (uint(d.client_seq) ? d.client_seq : 0) + 1;
          if ("state" in d) {
            this.confirmed = d.state;
            this.version = d.version;
            this.early.clear();
          }
          for (const r of Array.isArray(d.ops) ? d.ops : []) this.#record(r);
          this.pending = this.pending.filter((p) => p.seq > (d.client_seq ?? 0));
          first = false;
          break;
        } catch (e) {
          const code = /** @type {any} */ (e)?.code;
          if (code === "closed") return this.stop();
          // `since` unknown to the server (its store was reset): start over.
          if (code === 400) first = true;
          await new Promise((r) => this.t.setTimeout(r, 1000));
        }
      }
    } while (this.again);
    this.synced = true;
    this.#stale = true;
    this.#settle();
    this.#view();
    this.#emit();
    this.#pump();
  }
  /** Sends the head of the queue, one op at a time. */
  #pump() {
    const head = this.pending[0];
    if (this.inflight || this.retry || !this.synced || this.stopped || !head || head.acked !== null) return;
    this.inflight = true;
    const data = { client: this.clientId, seq: head.seq, base: head.base, op: head.op };
    this.room.call("sync.op", data, { retry: true }).then(
      (/** @type {any} */ d) => {
        head.acked = uint(d?.version) ? d.version : 0;
        this.#done();
      },
      (/** @type {any} */ e) => {
        if (e.code === "closed") return this.stop();
        if (RETRY.has(e.code)) {
          const wait = e.code === 420 && uint(e.data?.retry_after_ms) ? e.data.retry_after_ms : 1000;
          this.retry = this.t.setTimeout(() => ((this.retry = null), this.#pump()), wait);
        } else {
          this.pending = this.pending.filter((p) => p !== head);
          this.#stale = true;
          const r = { op: head.op, code: typeof e.code === "number" ? e.code : 400, message: String(e.message) };
          for (const fn of this.rollbackFns) {
            try {
              fn(r);
            } catch (x) {
              console.error(x);
            }
          }
        }
        this.#done();
      },
    );
  }
  #done() {
    this.inflight = false;
    this.#settle();
    this.#view();
    this.#emit();
    this.#pump();
  }
}

/**
 * Loads a joined room's synced state; resolves once the first state is in.
 * @param {Room} room @param {Reducer} [reducer] @param {ConstructorParameters<typeof Synced>[2]} [o]
 */
export function synced(room, reducer, o) {
  return new Synced(room, reducer, o).ready;
}
