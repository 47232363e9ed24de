/*! switchboard.js | MIT | the browser client of switchboard (protocol v1, v2); guide: docs/js-client.md */
export const VERSION = "0.1.0";
export const PROTOCOL = 2;
const SUBPROTOCOLS = ["switchboard.v2.json", "switchboard.v1.json"];
export class SwitchboardError extends Error {
    constructor(code, message, data) {
        super(message);
        this.name = "SwitchboardError";
        this.code = code;
        this.data = data;
    }
}
export class Backoff {
    constructor(o = {}, random = Math.random) {
        this.initial = o.initial ?? 1000;
        this.max = o.max ?? 30000;
        this.random = random;
        this.attempt = 0;
    }
    ceiling() {
        return Math.min(this.max, this.initial * 2 ** Math.min(this.attempt, 30));
    }
    next() {
        const d = Math.floor(this.random() * this.ceiling());
        this.attempt++;
        return d;
    }
    reset() {
        this.attempt = 0;
    }
}
export function closeAction(code) {
    const again = code === 1001 || code === 1006 || code === 1009 || (code >= 1011 && code <= 1014) || (code >= 4000 && code <= 4499);
    return again ? "reconnect" : "stop";
}
export function retryHint(code, reason) {
    if (closeAction(code) !== "reconnect")
        return 0;
    const m = /retry_after_ms=(\d+)/.exec(reason ?? "");
    return m ? Math.min(Number(m[1]), 3600000) : 0;
}
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
function closeWords(code) {
    return CLOSE_WORDS[code] ?? (closeAction(code) === "reconnect" ? "the connection was closed" : "the server closed the connection");
}
const TYPES = new Set(["hello", "reply", "error", "event", "ping", "pong", "lagged", "presence_state", "presence_diff", "gap", "leave"]);
const uint = (v) => typeof v === "number" && Number.isSafeInteger(v) && v >= 0;
const isObj = (v) => typeof v === "object" && v !== null && !Array.isArray(v);
export function utf8Length(s) {
    let n = s.length;
    for (let i = 0; i < s.length; i++) {
        const c = s.charCodeAt(i);
        if (c < 0x80)
            continue;
        if (c < 0x800)
            n += 1;
        else if (c >= 0xd800 && c < 0xdc00 && (s.charCodeAt(i + 1) & 0xfc00) === 0xdc00)
            n += 2, i++;
        else
            n += 2;
    }
    return n;
}
export function parseEnvelope(text, maxBytes = 16 << 20) {
    if (typeof text !== "string")
        return "not a text message";
    if (text.length > maxBytes)
        return `message larger than ${maxBytes} bytes`;
    let v;
    try {
        v = JSON.parse(text);
    }
    catch {
        return "not JSON";
    }
    if (Array.isArray(v))
        return eventArray(v);
    if (!isObj(v))
        return "not a JSON object";
    for (const k of ["ref", "offset"])
        if (v[k] != null && !uint(v[k]))
            return `bad ${k}`;
    for (const k of ["room", "event", "message", "epoch"])
        if (v[k] != null && typeof v[k] !== "string")
            return `bad ${k}`;
    if (v.code != null && !uint(v.code))
        return "bad code";
    if (typeof v.type !== "string")
        return "no type";
    if (!TYPES.has(v.type))
        return `unknown message type ${JSON.stringify(v.type.slice(0, 32))}`;
    const need = {
        hello: isObj(v.data) && uint(v.data.version) && uint(v.data.connection_id),
        reply: v.ref != null,
        error: v.code != null,
        event: v.event != null,
        presence_state: v.room != null && isObj(v.data),
        presence_diff: v.room != null && isObj(v.data),
        gap: v.room != null && isObj(v.data),
        leave: v.room != null,
    }[(v.type)];
    if (need === false)
        return `malformed ${v.type}`;
    return v;
}
function eventArray(a) {
    if (a.length < 3 || a.length > 4)
        return "malformed event";
    const [room, event, data, offset] = a;
    if (room !== null && typeof room !== "string")
        return "bad room";
    if (typeof event !== "string")
        return "bad event";
    if (offset !== undefined && !uint(offset))
        return "bad offset";
    const env = { type: "event", event, data };
    if (room !== null)
        env.room = room;
    if (offset !== undefined)
        env.offset = offset;
    return env;
}
export class PresenceView {
    constructor() {
        this.members = new Map();
        this.count = { keys: 0, connections: 0 };
        this.countsOnly = false;
        this.synced = false;
        this.self = "";
    }
    state(d) {
        this.members.clear();
        this.countsOnly = !isObj(d.presences);
        if (!this.countsOnly)
            this.#merge(d.presences, true);
        this.#count(d);
        this.synced = true;
    }
    diff(d) {
        if (isObj(d.joins))
            this.#merge(d.joins, true);
        if (isObj(d.leaves))
            this.#merge(d.leaves, false);
        if (isObj(d.ephemeral))
            this.#flags(d.ephemeral);
        this.#count(d);
    }
    #flags(byKey) {
        for (const [key, refs] of Object.entries(byKey)) {
            const metas = this.members.get(key);
            if (!metas || !isObj(refs))
                continue;
            for (const [ref, flags] of Object.entries(refs)) {
                const i = metas.findIndex((m) => m.ref === ref);
                if (i < 0 || !isObj(flags))
                    continue;
                const ephemeral = { ...(isObj(metas[i].ephemeral) ? metas[i].ephemeral : {}) };
                for (const [flag, value] of Object.entries(flags)) {
                    if (value === null)
                        delete ephemeral[flag];
                    else
                        ephemeral[flag] = value;
                }
                metas[i] = { ...metas[i], ephemeral };
            }
        }
    }
    #count(d) {
        if (isObj(d.count) && uint(d.count.keys) && uint(d.count.connections))
            this.count = { keys: d.count.keys, connections: d.count.connections };
    }
    #merge(byKey, join) {
        for (const [key, entry] of Object.entries(byKey)) {
            if (!isObj(entry) || !Array.isArray(entry.metas))
                continue;
            let metas = this.members.get(key) ?? [];
            for (const m of entry.metas) {
                if (!isObj(m) || typeof m.ref !== "string")
                    continue;
                metas = metas.filter((x) => x.ref !== m.ref);
                if (join)
                    metas.push(m);
            }
            if (metas.length)
                this.members.set(key, metas);
            else
                this.members.delete(key);
        }
    }
    list() {
        return [...this.members].map(([key, metas]) => {
            const ms = metas.map((m) => ({ ...m, self: m.ref === this.self }));
            return { key, metas: ms, self: ms.some((m) => m.self) };
        });
    }
}
function webSocket(WS, url, link) {
    const ws = new WS(url, SUBPROTOCOLS);
    let opened = false;
    let done = false;
    ws.onopen = () => {
        opened = true;
        link.open();
    };
    ws.onmessage = (e) => {
        link.alive();
        link.message(e.data);
    };
    ws.onclose = (e) => {
        if (!done)
            link.close({ code: e.code || 1006, reason: e.reason, opened });
        done = true;
    };
    ws.onerror = () => { };
    return {
        kind: "websocket",
        send: (text) => ws.send(text),
        close() {
            done = true;
            try {
                ws.close(1000);
            }
            catch { }
        },
    };
}
function sse(fetchFn, timers, url, lastId, link) {
    const abort = new AbortController();
    let session = null;
    let done = false;
    let retryMs = 0;
    const queue = [];
    let posting = false;
    const end = (code, reason) => {
        if (done)
            return;
        done = true;
        abort.abort();
        link.close({ code, reason, opened: session != null, retryMs });
    };
    const get = new URL(url, globalThis.location?.href);
    if (lastId)
        get.searchParams.set("lastEventId", lastId);
    get.searchParams.set("protocol", SUBPROTOCOLS[0]);
    const dispatch = (event, data) => {
        if (event === "$session") {
            try {
                session = JSON.parse(data);
            }
            catch { }
            if (!session?.session)
                return end(1006, "bad $session");
            retryMs = 0;
            link.open();
            pump();
        }
        else if (event === "$close") {
            let d = ({});
            try {
                d = JSON.parse(data);
            }
            catch { }
            end(uint(d.code) ? d.code : 1006, d.reason);
        }
        else if (!["$joined", "$join_error", "$resync"].includes(event)) {
            link.message(data);
        }
    };
    (async () => {
        const res = await fetchFn(get.href, { headers: { accept: "text/event-stream" }, cache: "no-store", signal: abort.signal });
        if (res.status === 204)
            return end(1000, "stream stopped");
        if (res.status !== 200 || !res.body || !(res.headers.get("content-type") ?? "").startsWith("text/event-stream")) {
            const s = res.status;
            const after = Number(res.headers.get("retry-after"));
            if ((s === 429 || s === 503) && after > 0)
                retryMs = Math.min(after, 3600) * 1000;
            return end(s === 401 || s === 403 ? 4501 : s >= 400 && s < 500 && s !== 429 && s !== 408 ? 1008 : 1006, `HTTP ${s}`);
        }
        const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
        let buf = "";
        let event = "";
        let data = ([]);
        for (;;) {
            const { value, done: eof } = await reader.read();
            if (eof)
                break;
            link.alive();
            buf += value;
            const lines = buf.split(/\r\n|\r|\n/);
            buf = lines.pop() ?? "";
            for (const line of lines) {
                if (line === "") {
                    if (data.length)
                        dispatch(event || "message", data.join("\n"));
                    event = "";
                    data = [];
                    continue;
                }
                if (line[0] === ":")
                    continue;
                const i = line.indexOf(":");
                const field = i < 0 ? line : line.slice(0, i);
                const val = i < 0 ? "" : line.slice(i + 1).replace(/^ /, "");
                if (field === "event")
                    event = val;
                else if (field === "data")
                    data.push(val);
                else if (field === "id")
                    link.id(val);
                else if (field === "retry" && /^\d+$/.test(val))
                    retryMs = +val;
            }
            if (done)
                return;
        }
        end(1006, "stream ended");
    })().catch(() => end(1006, "stream failed"));
    async function pump() {
        if (posting || !session || done)
            return;
        posting = true;
        while (queue.length && !done) {
            const max = session.max_post_envelopes || 32;
            const size = session.max_post_size || 65536;
            let n = 1;
            let bytes = utf8Length(queue[0]) + 2;
            for (let b; n < queue.length && n < max && bytes + (b = utf8Length(queue[n]) + 1) <= size; n++)
                bytes += b;
            const batch = queue.slice(0, n);
            let res;
            try {
                res = await fetchFn(url, {
                    method: "POST",
                    headers: { "content-type": "application/json", "switchboard-session": session.session, "switchboard-secret": session.secret },
                    body: `[${batch.join(",")}]`,
                });
            }
            catch {
                return end(1006, "POST failed");
            }
            if (res.status === 429)
                await new Promise((r) => timers.setTimeout(r, 1000));
            else if (res.status === 202)
                queue.splice(0, n);
            else
                return end(res.status === 404 || res.status >= 500 ? 1006 : 1008, `POST answered ${res.status}`);
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
class Listeners {
    constructor(oops) {
        this.map = new Map();
        this.oops = oops;
    }
    on(name, fn) {
        let s = this.map.get(name);
        if (!s)
            this.map.set(name, (s = new Set()));
        s.add(fn);
        return () => s.delete(fn);
    }
    emit(name, ...args) {
        for (const fn of [...(this.map.get(name) ?? [])]) {
            try {
                fn(...args);
            }
            catch (e) {
                this.oops(e);
            }
        }
    }
}
export class Room {
    constructor(client, name, opts, l) {
        this.name = name;
        this.client = client;
        this.opts = opts;
        this.l = l;
        this.joined = false;
        this.established = false;
        this.wanted = true;
        this.epoch = null;
        this.last = 0;
        this.missing = [];
        this.duplicates = 0;
        this.meta = undefined;
        this.ready = Promise.resolve(this);
        const view = new PresenceView();
        this.view = view;
        const room = this;
        this.presence = {
            list: () => view.list(),
            count: () => view.count,
            countsOnly: () => view.countsOnly,
            onChange: (fn) => l.on("$presence", fn),
            set(d) {
                if (d.meta !== undefined)
                    room.meta = d.meta;
                return room.client.request({ type: "presence", room: room.name, data: d }, { volatile: d.meta === undefined });
            },
        };
    }
    on(event, fn) {
        return this.l.on(`e:${event}`, fn);
    }
    onResync(fn) {
        return this.l.on("$resync", fn);
    }
    onGap(fn) {
        return this.l.on("$gap", fn);
    }
    onJoin(fn) {
        return this.l.on("$join", fn);
    }
    onClose(fn) {
        return this.l.on("$close", fn);
    }
    call(event, data, o) {
        return this.client.request({ type: "call", room: this.name, event, data }, o);
    }
    async leave() {
        if (!this.wanted)
            return;
        const joined = this.joined;
        this.client.rooms.delete(this.name);
        this.#end(null);
        if (joined) {
            await this.client.request({ type: "leave", room: this.name }, { volatile: true }).catch(() => { });
        }
    }
    #end(why) {
        this.wanted = false;
        this.joined = false;
        this.l.emit("$close", why);
    }
    joinMsg(from) {
        const m = { type: "join", room: this.name };
        if (this.opts.data !== undefined)
            m.data = this.opts.data;
        if (this.epoch != null && this.opts.recover !== false)
            Object.assign(m, { offset: from ?? this.last, epoch: this.epoch });
        else if (this.opts.rewind && this.epoch == null)
            m.rewind = this.opts.rewind;
        return m;
    }
    joinedWith(reply, rejoin) {
        this.joined = this.established = true;
        const h = this.client.hello;
        if (h)
            this.view.self = `${h.node}.${h.connection_id}`;
        this.view.synced = false;
        const d = isObj(reply) ? reply : {};
        const hist = typeof d.epoch === "string" && uint(d.offset);
        const recovered = typeof d.recovered === "boolean" ? d.recovered : null;
        if (hist) {
            if (recovered !== true) {
                this.missing = [];
                this.last = !rejoin && this.opts.rewind && this.epoch == null ? 0 : d.offset;
            }
            this.epoch = d.epoch;
        }
        this.l.emit("$join", { rejoin, recovered, reply: d });
        if (rejoin && (!hist || recovered === false))
            this.resync(hist ? "not_recovered" : "no_history");
        if (rejoin && this.meta !== undefined)
            this.client.request({ type: "presence", room: this.name, data: { meta: this.meta } }, { volatile: true }).catch(() => { });
    }
    resync(reason, gap) {
        this.l.emit("$resync", gap ? { reason, gap } : { reason });
    }
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
                this.missing.splice(i, 1, ...(([[a, o - 1], [o + 1, b]]).filter(([x, y]) => x <= y)));
            }
            else
                this.last = o;
        }
        const info = { event: (env.event), room: this.name, offset: o ?? null };
        this.l.emit(`e:${env.event}`, env.data ?? null, info);
        this.l.emit("e:*", env.data ?? null, info);
    }
    gap(g) {
        this.l.emit("$gap", g);
        if (g.reason === "epoch_changed" && typeof g.epoch === "string") {
            this.epoch = g.epoch;
            this.last = 0;
            this.missing = [];
            this.resync("epoch_changed", g);
        }
        else if (g.reason === "slow_consumer" && uint(g.from) && uint(g.to) && g.from >= 1 && this.epoch && this.missing.length < 16) {
            this.missing.push([g.from, g.to]);
            this.joined = false;
            this.client.send({ type: "leave", room: this.name });
            this.client.rejoin(this, g.from - 1);
        }
        else {
            if (uint(g.to) && g.to > this.last)
                this.last = g.to;
            this.resync(g.reason === "missed" ? "missed" : "gap_unrecovered", g);
        }
    }
    presenceMsg(type, data) {
        if (type === "presence_state")
            this.view.state(data);
        else
            this.view.diff(data);
        this.l.emit("$presence", this.view.list(), this.view);
    }
    refused(e) {
        this.client.rooms.delete(this.name);
        this.#end(e);
    }
}
export function connect(url, options) {
    return new Client(url, options);
}
export class Client {
    constructor(url, o = {}) {
        this.url = url;
        this.o = o;
        this.t = o.timers ?? globalThis;
        this.now = o.now ?? Date.now;
        this.win = o.window ?? globalThis;
        this.log = o.logger ?? console;
        this.backoff = new Backoff(o.backoff, o.random);
        this.status = { state: "connecting", reason: null, attempt: 0, retryAt: null, transport: null, connection: null };
        this.rooms = new Map();
        this.pending = new Map();
        this.buffer = [];
        this.stats = { malformed: 0, unknown: 0, late: 0, dropped: 0 };
        this.l = new Listeners((e) => this.#oops(e));
        this.ref = 0;
        this.tr = null;
        this.live = false;
        this.stopped = false;
        this.sseOnly = o.transport === "sse";
        this.closedByApp = false;
        this.refusedOnce = false;
        this.token = null;
        this.lastId = "";
        this.hello = null;
        this.openedAt = 0;
        this.lastRx = 0;
        this.garbage = 0;
        this.timer = null;
        this.beat = null;
        this.renew = null;
        this.liveBy = null;
        this.abandoned = new Map();
        this.joinQueue = [];
        const on = (ev, fn) => this.win.addEventListener?.(ev, fn);
        on("online", () => this.#wake());
        on("offline", () => this.tr && this.#drop(1006, "offline", "the network is offline"));
        this.win.document?.addEventListener?.("visibilitychange", () => {
            if (this.win.document.visibilityState === "visible")
                this.#wake();
        });
        this.#attempt();
    }
    onStatus(fn) {
        return this.l.on("status", fn);
    }
    onError(fn) {
        return this.l.on("error", fn);
    }
    onEvent(event, fn) {
        return this.l.on(`d:${event}`, fn);
    }
    join(name, opts = {}) {
        const have = this.rooms.get(name);
        if (have)
            return have.ready;
        const room = new Room(this, name, opts, new Listeners((e) => this.#oops(e)));
        this.rooms.set(name, room);
        let adopt;
        for (const [ref, n] of this.abandoned) {
            if (n === name) {
                adopt = ref;
                this.abandoned.delete(ref);
                break;
            }
        }
        return (room.ready = this.request(room.joinMsg(), { room, retry: true, timeout: opts.timeout, adopt }).then(() => room, (e) => {
            if (this.rooms.get(name) === room)
                this.rooms.delete(name);
            room.wanted = false;
            throw e;
        }));
    }
    call(event, data, o) {
        return this.request({ type: "call", event, data }, o);
    }
    retryNow() {
        if (this.tr || this.closedByApp)
            return;
        this.stopped = false;
        this.t.clearTimeout(this.timer);
        this.#attempt();
    }
    close() {
        this.stopped = this.closedByApp = true;
        this.t.clearTimeout(this.timer);
        this.tr?.close();
        this.#ended();
        this.#fail(this.buffer.splice(0), "closed", "the client was closed");
        this.#set({ state: "closed", reason: { code: 1000, kind: "closed", message: "closed by the application" }, retryAt: null, transport: null, connection: null });
    }
    request(msg, o = {}) {
        return new Promise((resolve, reject) => {
            if (this.stopped)
                return reject(new SwitchboardError("closed", "the client was closed"));
            if (o.volatile && !this.live)
                return reject(new SwitchboardError("offline", "not connected"));
            const ref = o.adopt ?? ++this.ref;
            const text = JSON.stringify({ ...msg, ref });
            const max = this.hello?.max_message_size;
            if (max && text.length * 3 > max && utf8Length(text) > max)
                return reject(new SwitchboardError("too_large", `message larger than the server's ${max} bytes`));
            const p = { ref, text, resolve, reject, timer: null, written: false, retry: !!o.retry, room: o.room };
            p.timer = this.t.setTimeout(() => {
                this.#forget(p);
                if (p.room && p.written)
                    this.abandoned.set(ref, p.room.name);
                reject(new SwitchboardError("timeout", "no answer in time"));
            }, o.timeout ?? this.o.callTimeout ?? 10000);
            this.pending.set(ref, p);
            if (o.adopt != null)
                p.written = true;
            else if (this.live)
                this.#write(p);
            else
                this.#buffer(p);
        });
    }
    send(msg) {
        if (this.tr && this.hello)
            this.tr.send(JSON.stringify(msg));
    }
    rejoin(room, from) {
        const ref = ++this.ref;
        const p = { ref, text: JSON.stringify({ ...room.joinMsg(from), ref }), resolve: () => { }, reject: () => { }, timer: null, written: false, retry: false, room, rejoin: true };
        this.pending.set(ref, p);
        this.joinQueue.push(p);
        this.#pumpJoins();
    }
    #set(s) {
        this.status = { ...this.status, ...s, attempt: this.backoff.attempt };
        this.l.emit("status", this.status);
    }
    #oops(e) {
        this.#error("handler", "an application handler threw", e);
    }
    #error(kind, message, error) {
        if (!this.l.map.get("error")?.size)
            return this.log.error(`switchboard: ${message}`, error ?? "");
        for (const fn of this.l.map.get("error") ?? []) {
            try {
                fn({ kind, message, error });
            }
            catch (e) {
                this.log.error("switchboard: an error handler threw", e);
            }
        }
    }
    #wake() {
        if (!this.tr && !this.stopped)
            this.retryNow();
    }
    async #attempt() {
        this.timer = null;
        if (this.win.navigator?.onLine === false) {
            return this.#set({ state: this.status.state === "connecting" ? "connecting" : "reconnecting", reason: { code: 1006, kind: "offline", message: "the network is offline" }, retryAt: null });
        }
        if (this.status.state !== "connecting")
            this.#set({ state: "reconnecting", retryAt: null });
        this.token = null;
        if (this.o.token) {
            try {
                this.token = await this.o.token();
            }
            catch (e) {
                return this.#schedule({ code: 1006, kind: "token", message: "could not get a sign-in token" });
            }
        }
        if (!this.tr && !this.stopped)
            this.#open(!this.sseOnly);
    }
    #open(ws) {
        const u = new URL(ws ? this.url : this.o.sse ?? this.url, this.win.location?.href ?? globalThis.location?.href);
        if (this.token)
            u.searchParams.set(this.o.tokenParam ?? "access_token", this.token);
        let me = null;
        let opened = false;
        const fallback = ws && !!this.o.sse && this.o.transport !== "websocket";
        const link = {
            open: () => {
                if (me !== this.tr)
                    return;
                opened = true;
                this.lastRx = this.now();
                if (!ws)
                    this.sseOnly = true;
            },
            alive: () => {
                if (me === this.tr)
                    this.lastRx = this.now();
            },
            message: (text) => me === this.tr && this.#message(text),
            id: (id) => {
                this.lastId = id;
            },
            close: (end) => {
                if (me !== this.tr)
                    return;
                this.tr = null;
                if (fallback && !end.opened)
                    return this.#open(false);
                this.#closed(end);
            },
        };
        if (ws) {
            u.protocol = u.protocol.replace(/^http/, "ws");
            me = webSocket(this.o.WebSocket ?? globalThis.WebSocket, u.href, link);
        }
        else
            me = sse(this.o.fetch ?? globalThis.fetch.bind(globalThis), this.t, u.href, this.lastId, link);
        this.tr = me;
        this.lastRx = this.now();
        this.#arm(this.o.connectTimeout ?? 10000, () => {
            if (fallback && !opened && me === this.tr) {
                me?.close();
                this.tr = null;
                return this.#open(false);
            }
            this.#drop(1006, "connect_timeout", "the server did not answer in time");
        });
    }
    #arm(ms, fn) {
        this.t.clearTimeout(this.beat);
        this.beat = this.t.setTimeout(fn, ms);
    }
    #heartbeat() {
        const h = this.hello;
        const I = h.heartbeat_interval_ms || 25000;
        const T = h.heartbeat_timeout_ms || 10000;
        const check = () => {
            const idle = this.now() - this.lastRx;
            if (idle < I)
                return this.#arm(I - idle, check);
            const sent = this.now();
            this.send({ type: "ping", ref: ++this.ref });
            this.#arm(T, () => (this.lastRx >= sent ? check() : this.#drop(4001, "heartbeat", "the server stopped answering")));
        };
        this.#arm(I, check);
    }
    #drop(code, kind, message) {
        const tr = this.tr;
        if (!tr)
            return;
        this.tr = null;
        tr.close();
        this.#closed({ code }, { code, kind, message });
    }
    #message(text) {
        const env = parseEnvelope(text, this.o.maxMessageBytes);
        if (typeof env === "string") {
            const unknown = env.startsWith("unknown");
            if (unknown)
                this.stats.unknown++;
            else
                this.stats.malformed++;
            this.#error(unknown ? "unknown_type" : "malformed", `ignored a server message: ${env}`);
            if (!this.hello || (!unknown && ++this.garbage >= 32))
                this.#drop(1006, "protocol", "the server sent something this client cannot read");
            return;
        }
        this.garbage = 0;
        if (!this.hello) {
            if (env.type !== "hello")
                return this.#drop(1006, "protocol", "the server did not start with hello");
            return this.#hello(env.data);
        }
        const room = env.room != null ? this.rooms.get(env.room) : undefined;
        switch (env.type) {
            case "reply":
            case "error":
                return this.#answer(env);
            case "event":
                if (env.room == null) {
                    const info = { event: (env.event), room: null, offset: null };
                    this.l.emit(`d:${env.event}`, env.data ?? null, info);
                    this.l.emit("d:*", env.data ?? null, info);
                }
                else if (room?.joined)
                    room.event(env);
                return;
            case "ping":
                return this.send(env.ref != null ? { type: "pong", ref: env.ref } : { type: "pong" });
            case "presence_state":
            case "presence_diff":
                if (room?.joined)
                    room.presenceMsg(env.type, env.data);
                return;
            case "gap":
                if (room?.joined)
                    room.gap(env.data);
                return;
            case "leave":
                if (room?.joined)
                    room.refused(new SwitchboardError("room_closed", env.message ?? "the server closed the room"));
                return;
            case "lagged":
                this.#error("lagged", "the server dropped messages for this client (it read too slowly)");
                for (const r of this.rooms.values())
                    if (r.epoch == null)
                        r.resync("lagged");
        }
    }
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
        for (const r of this.rooms.values())
            if (r.wanted && r.established)
                this.rejoin(r);
        this.#pumpJoins();
        if (!this.joinQueue.length && !this.#inJoin())
            this.#live();
        if (h.expires_in_ms && h.refresh && this.o.token)
            this.#renewIn(h.expires_in_ms);
        this.liveBy = this.t.setTimeout(() => this.#live(), this.o.callTimeout ?? 10000);
    }
    #inJoin() {
        for (const p of this.pending.values())
            if (p.rejoin && p.written)
                return true;
        return false;
    }
    #pumpJoins() {
        if (!this.hello || !this.tr)
            return;
        let inflight = 0;
        for (const p of this.pending.values())
            if (p.rejoin && p.written)
                inflight++;
        while (this.joinQueue.length && inflight < (this.hello.max_inflight || 16)) {
            const p = (this.joinQueue.shift());
            p.written = true;
            inflight++;
            this.tr.send(p.text);
        }
    }
    #live() {
        if (this.live || !this.tr)
            return;
        this.live = true;
        const h = this.hello;
        for (const p of this.buffer.splice(0))
            this.#write(p);
        this.#set({ state: "open", reason: null, retryAt: null, transport: (this.tr).kind, connection: `${h.node}.${h.connection_id}` });
    }
    #renewIn(ms) {
        this.t.clearTimeout(this.renew);
        this.renew = this.t.setTimeout(async () => {
            try {
                const token = await (this.o.token)();
                const r = await this.request({ type: "refresh", data: { token } }, { volatile: true });
                if (r?.expires_in_ms)
                    this.#renewIn(r.expires_in_ms);
            }
            catch (e) {
                this.#error("token", "refreshing the sign-in failed", e);
            }
        }, ms * 0.8);
    }
    #write(p) {
        p.written = true;
        (this.tr).send(p.text);
    }
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
            const old = (this.buffer.shift());
            bytes -= old.size ?? 0;
            this.stats.dropped++;
            this.#forget(old);
            old.reject(new SwitchboardError("dropped", "dropped from the full offline buffer"));
        }
    }
    #forget(p) {
        this.t.clearTimeout(p.timer);
        this.pending.delete(p.ref);
        const i = this.buffer.indexOf(p);
        if (i >= 0)
            this.buffer.splice(i, 1);
    }
    #answer(env) {
        const p = this.pending.get((env.ref));
        if (!p) {
            const gone = this.abandoned.get((env.ref));
            this.abandoned.delete((env.ref));
            if (gone != null && env.type === "reply" && !this.rooms.get(gone)?.joined)
                this.send({ type: "leave", room: gone });
            if (env.type === "error")
                this.#error("server", `server error ${env.code}: ${env.message ?? ""}`);
            else
                this.stats.late++;
            return;
        }
        this.#forget(p);
        const err = env.type === "error" ? new SwitchboardError((env.code), env.message ?? "error", env.data) : null;
        if (p.room) {
            const r = p.room;
            if (p.rejoin) {
                if (err?.code === 429) {
                    p.written = false;
                    this.pending.set(p.ref, p);
                    this.joinQueue.push(p);
                }
                else if (err)
                    r.refused(err);
                else if (r.wanted && this.rooms.get(r.name) === r)
                    r.joinedWith(env.data, true);
                this.#pumpJoins();
                if (!this.joinQueue.length && !this.#inJoin())
                    this.#live();
                return;
            }
            if (!err) {
                if (r.wanted)
                    r.joinedWith(env.data, false);
                else
                    this.send({ type: "leave", room: r.name });
            }
        }
        if (err)
            p.reject(err);
        else
            p.resolve(env.data ?? null);
    }
    #fail(list, code, message) {
        for (const p of list) {
            this.#forget(p);
            p.reject(new SwitchboardError(code, message));
        }
    }
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
    #closed(end, why) {
        const greeted = !!this.hello;
        const healthy = this.openedAt && this.hello && this.now() - this.openedAt >= (this.o.backoff?.resetAfter ?? 30000);
        this.#ended();
        if (healthy)
            this.backoff.reset();
        const again = [];
        for (const p of [...this.pending.values()]) {
            if (p.rejoin)
                this.pending.delete(p.ref);
            else if (p.written && p.retry) {
                p.written = false;
                again.push(p);
            }
            else if (p.written)
                this.#fail([p], "disconnected", "the connection dropped before the answer");
        }
        this.buffer.unshift(...again);
        const refused = !greeted && (end.code === 4500 || end.code === 4501);
        const words = refused ? `${closeWords(end.code)}: the server refused the connection` : closeWords(end.code);
        const reason = why ?? { code: end.code, kind: end.code === 1006 ? "dropped" : end.code === 4501 ? "unauthorized" : "closed", message: end.reason ? `${words} (${end.reason})` : words };
        const renew = end.code === 4501 && !!this.o.token && !this.refusedOnce && !this.stopped;
        this.refusedOnce = end.code === 4501;
        if (renew)
            return this.#schedule(reason, end.retryMs);
        if (closeAction(end.code) === "stop" || this.stopped) {
            this.stopped = true;
            this.#fail([...this.buffer.splice(0), ...this.pending.values()], "closed", "the connection was closed for good");
            return this.#set({ state: "closed", reason, retryAt: null, transport: null, connection: null });
        }
        this.#schedule(reason, Math.max(end.retryMs ?? 0, retryHint(end.code, end.reason)));
    }
    #schedule(reason, atLeast = 0) {
        if (this.win.navigator?.onLine === false)
            return this.#set({ state: "reconnecting", reason, retryAt: null, transport: null, connection: null });
        const wait = Math.max(this.backoff.next(), atLeast);
        this.timer = this.t.setTimeout(() => this.#attempt(), wait);
        this.#set({ state: "reconnecting", reason, retryAt: this.now() + wait, transport: null, connection: null });
    }
}
