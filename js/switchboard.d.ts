/**
 * What a client does after a close code (protocol §7.1, §12): "reconnect"
 * after 1001, 1006, 1009, 1011-1014 and 4000-4499; "stop" after everything
 * else (1000, 1002, 1003, 1005, 1007, 1008, 4500-4999, unknown codes).
 * @param {number} code
 * @returns {"reconnect"|"stop"}
 */
export function closeAction(code: number): "reconnect" | "stop";
/**
 * The wait a close asks for (protocol §7.1): the number after
 * `retry_after_ms=` in the reason of a reconnect code (the server sends it
 * with 1013 when it sheds a connection during a storm); 0 when there is
 * none. Capped at one hour.
 * @param {number} code
 * @param {string} [reason]
 * @returns {number} ms
 */
export function retryHint(code: number, reason?: string): number;
/**
 * The length of `s` in UTF-8 bytes, as it goes on the wire (a lone surrogate
 * as U+FFFD), without encoding it.
 * @param {string} s
 */
export function utf8Length(s: string): number;
/**
 * Parses and checks one server message. Returns the envelope, or a string
 * saying what is wrong with it (never throws).
 * @param {unknown} text
 * @param {number} [maxBytes] messages longer than this (in UTF-16 units) are refused
 * @returns {Envelope|string}
 */
export function parseEnvelope(text: unknown, maxBytes?: number): Envelope | string;
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
export function connect(url: string, options?: Options): Client;
/*! switchboard.js | MIT | the browser client of switchboard (protocol v1, v2); guide: docs/js-client.md */
/** This module's version; equal to the server crate's (checked against `hello`). */
export const VERSION: "0.1.0";
/** The newest wire protocol version this module speaks (it speaks 1 too). */
export const PROTOCOL: 2;
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
    constructor(code: number | string, message: string, data?: unknown);
    /** @type {number|string} */
    code: number | string;
    /** Structured details sent with the error (e.g. `{retry_after_ms}` with 420). */
    data: unknown;
}
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
    constructor(o?: {
        initial?: number;
        max?: number;
    }, random?: () => number);
    initial: number;
    max: number;
    random: () => number;
    /** Failures since the last healthy connection. */
    attempt: number;
    /** The ceiling of the next wait, in ms. */
    ceiling(): number;
    /** Draws the next wait (ms) and counts the attempt. */
    next(): number;
    reset(): void;
}
/** @typedef {{ref: string, joined_at?: number, meta?: Record<string, any>, ephemeral?: Record<string, any>, self?: boolean}} Meta */
/** @typedef {{key: string, metas: Meta[], self: boolean}} Member */
/** @typedef {{keys: number, connections: number}} Count */
/**
 * A room's presence, merged from `presence_state` and `presence_diff`
 * (protocol §3.11): a key (user) has one meta per connection (tab).
 */
export class PresenceView {
    /** @type {Map<string, Meta[]>} */
    members: Map<string, Meta[]>;
    /** @type {Count} */
    count: Count;
    /** True in rooms over the server's threshold: counts, no member list. */
    countsOnly: boolean;
    /** True once a `presence_state` arrived since the last (re)join. */
    synced: boolean;
    /** This connection's meta ref (`node.connection_id`), to mark own metas. */
    self: string;
    /** @param {any} d the `data` of `presence_state`; replaces everything */
    state(d: any): void;
    /** @param {any} d the `data` of `presence_diff`: joins replace by ref, then leaves, then ephemeral flag changes, then count */
    diff(d: any): void;
    /** The members, in the order they were first seen; `self` marks this connection's metas and key. @returns {Member[]} */
    list(): Member[];
    #private;
}
/** A room the application joined; rejoined and recovered after every reconnect. */
export class Room {
    /**
     * @param {Client} client
     * @param {string} name
     * @param {JoinOptions} opts
     * @param {Listeners} l
     */
    constructor(client: Client, name: string, opts: JoinOptions, l: Listeners);
    /** @readonly */
    readonly name: string;
    client: Client;
    opts: JoinOptions;
    l: Listeners;
    /** Joined on the current connection. */
    joined: boolean;
    /** The first join succeeded (so it is rejoined after reconnects). */
    established: boolean;
    /** Still wanted (not left, not refused). */
    wanted: boolean;
    /** Stream position in rooms with history (null otherwise). @type {string|null} */
    epoch: string | null;
    last: number;
    /** Offsets announced missing by `slow_consumer` gaps, being recovered. @type {[number, number][]} */
    missing: [number, number][];
    /** Duplicates dropped by recovery. */
    duplicates: number;
    /** Last client part of the presence meta, re-sent after a rejoin. @type {any} */
    meta: any;
    /** The first join: resolves with this room once the server accepted. @type {Promise<Room>} */
    ready: Promise<Room>;
    view: PresenceView;
    presence: {
        /** @returns {Member[]} */
        list: () => Member[];
        /** @returns {Count} */
        count: () => Count;
        countsOnly: () => boolean;
        /** @param {(members: Member[], view: PresenceView) => void} fn */
        onChange: (fn: (members: Member[], view: PresenceView) => void) => () => void;
        /**
         * Sets this connection's meta (client part; kept and re-sent after
         * rejoins) and/or ephemeral flags (volatile: refused with "offline"
         * while disconnected). @param {{meta?: object, ephemeral?: object}} d
         */
        set(d: {
            meta?: object;
            ephemeral?: object;
        }): Promise<any>;
    };
    /** Host events of this room; `"*"` gets every event. @param {string} event @param {EventHandler} fn */
    on(event: string, fn: EventHandler): () => void;
    /** The app must reload this room's state (events were lost). @param {(r: Resync) => void} fn */
    onResync(fn: (r: Resync) => void): () => void;
    /** Every `gap` notice, recovered or not. @param {(gap: any) => void} fn */
    onGap(fn: (gap: any) => void): () => void;
    /** Each (re)join: `{rejoin, recovered, reply}`. @param {(j: {rejoin: boolean, recovered: boolean|null, reply: any}) => void} fn */
    onJoin(fn: (j: {
        rejoin: boolean;
        recovered: boolean | null;
        reply: any;
    }) => void): () => void;
    /** The room ended for good (left, a rejoin was refused, or the server closed it: code `"room_closed"`). @param {(why: SwitchboardError|null) => void} fn */
    onClose(fn: (why: SwitchboardError | null) => void): () => void;
    /**
     * Calls the host's handler `event` in this room; resolves with its reply.
     * @param {string} event
     * @param {unknown} [data]
     * @param {{timeout?: number, retry?: boolean}} [o] `retry`: safe to send again when the connection dropped before the answer
     */
    call(event: string, data?: unknown, o?: {
        timeout?: number;
        retry?: boolean;
    }): Promise<any>;
    /** Leaves the room (and stops rejoining it). */
    leave(): Promise<void>;
    /** The `join` envelope for this room, with its position when it has one. @param {number} [from] */
    joinMsg(from?: number): any;
    /** @param {any} reply @param {boolean} rejoin */
    joinedWith(reply: any, rejoin: boolean): void;
    /** @param {Resync["reason"]} reason @param {any} [gap] */
    resync(reason: Resync["reason"], gap?: any): void;
    /** @param {Envelope} env */
    event(env: Envelope): void;
    /** @param {any} g */
    gap(g: any): void;
    /** @param {string} type @param {any} data */
    presenceMsg(type: string, data: any): void;
    /** The join was refused on a rejoin, or the server closed the room. @param {SwitchboardError} e */
    refused(e: SwitchboardError): void;
    #private;
}
export class Client {
    /** @param {string} url @param {Options} [o] */
    constructor(url: string, o?: Options);
    url: string;
    /** @private */
    private o;
    /** @private */
    private t;
    /** @private */
    private now;
    /** @private */
    private win;
    /** @private */
    private log;
    /** @private */
    private backoff;
    /** @type {Status} */
    status: Status;
    /** @type {Map<string, Room>} */
    rooms: Map<string, Room>;
    /** @type {Map<number, Pending>} @private */
    private pending;
    /** Requests waiting for a connection (the offline buffer). @type {Pending[]} */
    buffer: Pending[];
    /** Counters: malformed/unknown messages, late replies, offline drops. */
    stats: {
        malformed: number;
        unknown: number;
        late: number;
        dropped: number;
    };
    /** @private */
    private l;
    /** @private */
    private ref;
    /** @type {Transport|null} @private */
    private tr;
    /** @private */
    private live;
    /** @private */
    private stopped;
    /** @private */
    private sseOnly;
    /** @private */
    private closedByApp;
    /** The last connection ended with 4501 (a fresh token is tried once). @private */
    private refusedOnce;
    /** @type {string|null} @private */
    private token;
    /** @private */
    private lastId;
    /** @type {any} */
    hello: any;
    /** @private */
    private openedAt;
    /** @private */
    private lastRx;
    /** @private */
    private garbage;
    /** @type {any} @private */
    private timer;
    /** @type {any} @private */
    private beat;
    /** @type {any} @private */
    private renew;
    /** @type {any} @private */
    private liveBy;
    /** Joins given up (timed out) after they were written: ref -> room, left if they succeed. @type {Map<number, string>} @private */
    private abandoned;
    /** @type {Pending[]} @private */
    private joinQueue;
    /** Every status change. @param {(s: Status) => void} fn */
    onStatus(fn: (s: Status) => void): () => void;
    /** Problems that are not a request's: bad server messages, throwing handlers, version mismatch. @param {(e: {kind: string, message: string, error?: unknown}) => void} fn */
    onError(fn: (e: {
        kind: string;
        message: string;
        error?: unknown;
    }) => void): () => void;
    /** Direct events (no room); `"*"` gets all. @param {string} event @param {EventHandler} fn */
    onEvent(event: string, fn: EventHandler): () => void;
    /**
     * Joins a room; resolves once the server accepted (waits for the
     * connection while offline, within the call timeout).
     * @param {string} name
     * @param {JoinOptions} [opts]
     * @returns {Promise<Room>}
     */
    join(name: string, opts?: JoinOptions): Promise<Room>;
    /** A call without a room. @param {string} event @param {unknown} [data] @param {{timeout?: number, retry?: boolean}} [o] */
    call(event: string, data?: unknown, o?: {
        timeout?: number;
        retry?: boolean;
    }): Promise<any>;
    /** Connects now instead of waiting out the backoff (also after a stop). */
    retryNow(): void;
    /** Closes for good: pending and buffered requests fail with "closed". */
    close(): void;
    /**
     * Sends a request and resolves with its reply (rejects with a
     * SwitchboardError). While disconnected it waits in the offline buffer,
     * unless `volatile`.
     * @param {any} msg
     * @param {{timeout?: number, retry?: boolean, volatile?: boolean, room?: Room, adopt?: number}} [o]
     *   `adopt`: the ref of a request already written on this connection
     *   whose answer this one takes (nothing is sent).
     */
    request(msg: any, o?: {
        timeout?: number;
        retry?: boolean;
        volatile?: boolean;
        room?: Room;
        adopt?: number;
    }): Promise<any>;
    /** Fire and forget, only while connected. @param {any} msg */
    send(msg: any): void;
    /** Rejoins a room on this connection (after a reconnect or to recover a gap). @param {Room} room @param {number} [from] */
    rejoin(room: Room, from?: number): void;
    #private;
}
/**
 * what a transport tells the client
 */
export type Link = {
    /**
     * the connection is usable
     */
    open: () => void;
    /**
     * one server envelope (JSON text)
     */
    message: (text: string) => void;
    /**
     * any sign of life (SSE comments included)
     */
    alive: () => void;
    /**
     * it ended
     */
    close: (end: {
        code: number;
        reason?: string;
        opened: boolean;
        retryMs?: number;
    }) => void;
};
export type Transport = {
    kind: "websocket" | "sse";
    send: (text: string) => void;
    close: () => void;
};
export type Status = {
    state: "connecting" | "open" | "reconnecting" | "closed";
    /**
     * why the last connection ended (words, no raw codes needed)
     */
    reason: {
        code: number;
        kind: string;
        message: string;
    } | null;
    /**
     * failed attempts since the last healthy connection
     */
    attempt: number;
    /**
     * when the next attempt starts (ms, the `now` clock); null while one runs, while offline, or when closed
     */
    retryAt: number | null;
    transport: "websocket" | "sse" | null;
    /**
     * this connection's presence ref (`node.connection_id`) while open
     */
    connection: string | null;
};
export type Options = {
    /**
     * "auto" (default): WebSocket, falling back to SSE (when `sse` is set) if a WebSocket cannot open
     */
    transport?: "websocket" | "sse" | "auto" | undefined;
    /**
     * URL of the server's SSE endpoint
     */
    sse?: string | undefined;
    /**
     * called before every connection attempt and before the credentials expire; sent as the query parameter `tokenParam`
     */
    token?: (() => Promise<string> | string) | undefined;
    /**
     * default "access_token"
     */
    tokenParam?: string | undefined;
    /**
     * ms, default 10000
     */
    callTimeout?: number | undefined;
    /**
     * ms until `hello`, default 10000
     */
    connectTimeout?: number | undefined;
    /**
     * ms; defaults 1000, 30000, 30000
     */
    backoff?: {
        initial?: number;
        max?: number;
        resetAfter?: number;
    } | undefined;
    /**
     * defaults 256 messages, 1 MiB
     */
    offlineBuffer?: {
        messages?: number;
        bytes?: number;
    } | undefined;
    /**
     * largest server message accepted, default 16 MiB
     */
    maxMessageBytes?: number | undefined;
    /**
     * injectable for tests
     */
    WebSocket?: any;
    fetch?: typeof fetch | undefined;
    timers?: {
        setTimeout: Function;
        clearTimeout: Function;
    } | undefined;
    random?: (() => number) | undefined;
    now?: (() => number) | undefined;
    /**
     * the object with `online`/`offline` events, `navigator` and `document` (default: globalThis)
     */
    window?: any;
    /**
     * default console
     */
    logger?: {
        error: (...a: any[]) => void;
    } | undefined;
};
/**
 * a request waiting for its answer
 */
export type Pending = {
    ref: number;
    text: string;
    resolve: (v: any) => void;
    reject: (e: SwitchboardError) => void;
    timer: any;
    written: boolean;
    retry: boolean;
    /**
     * a join's room
     */
    room?: Room | undefined;
    rejoin?: boolean | undefined;
    /**
     * its UTF-8 length, once it waits in the offline buffer
     */
    size?: number | undefined;
};
export type Envelope = {
    type: string;
    ref?: number;
    room?: string;
    event?: string;
    code?: number;
    message?: string;
    data?: any;
    offset?: number;
    epoch?: string;
};
export type Meta = {
    ref: string;
    joined_at?: number;
    meta?: Record<string, any>;
    ephemeral?: Record<string, any>;
    self?: boolean;
};
export type Member = {
    key: string;
    metas: Meta[];
    self: boolean;
};
export type Count = {
    keys: number;
    connections: number;
};
/**
 * `timeout`: ms for the first join (default the call timeout), also while offline
 */
export type JoinOptions = {
    rewind?: number;
    data?: unknown;
    recover?: boolean;
    timeout?: number;
};
export type Resync = {
    reason: "not_recovered" | "no_history" | "missed" | "epoch_changed" | "lagged" | "gap_unrecovered";
    gap?: any;
};
export type EventInfo = {
    event: string;
    room: string | null;
    offset: number | null;
};
export type EventHandler = (data: any, info: EventInfo) => void;
/** @typedef {{rewind?: number, data?: unknown, recover?: boolean, timeout?: number}} JoinOptions `timeout`: ms for the first join (default the call timeout), also while offline */
/** @typedef {{reason: "not_recovered"|"no_history"|"missed"|"epoch_changed"|"lagged"|"gap_unrecovered", gap?: any}} Resync */
/** @typedef {{event: string, room: string|null, offset: number|null}} EventInfo */
/** @typedef {(data: any, info: EventInfo) => void} EventHandler */
/** A small set of listeners per name; `emit` isolates throwing listeners. */
declare class Listeners {
    /** @param {(e: unknown) => void} oops */
    constructor(oops: (e: unknown) => void);
    /** @type {Map<string, Set<Function>>} */
    map: Map<string, Set<Function>>;
    oops: (e: unknown) => void;
    /** @param {string} name @param {Function} fn @returns {() => void} */
    on(name: string, fn: Function): () => void;
    /** @param {string} name @param {...any} args */
    emit(name: string, ...args: any[]): void;
}
export {};
