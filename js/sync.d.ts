export function jsonDoc(state: any, op: any, cx: Context): any;
/**
 * Loads a joined room's synced state; resolves once the first state is in.
 * @param {Room} room @param {Reducer} [reducer] @param {ConstructorParameters<typeof Synced>[2]} [o]
 */
export function synced(room: Room, reducer?: Reducer, o?: ConstructorParameters<typeof Synced>[2]): Promise<Synced>;
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
    constructor(message: string, code?: number);
    code: number;
}
/**
 * A synced room's state on this page: the confirmed state and version, the
 * pending local ops, and the view (pending ops over the confirmed state).
 */
export class Synced {
    /**
     * @param {Room} room a joined room (from `client.join`)
     * @param {Reducer} [reducer] default `jsonDoc`
     * @param {{clientId?: string, gapWait?: number, maxPending?: number, timers?: {setTimeout: Function, clearTimeout: Function}}} [o]
     */
    constructor(room: Room, reducer?: Reducer, o?: {
        clientId?: string;
        gapWait?: number;
        maxPending?: number;
        timers?: {
            setTimeout: Function;
            clearTimeout: Function;
        };
    });
    room: import("./switchboard.js").Room;
    reducer: Reducer;
    clientId: string;
    t: {
        setTimeout: Function;
        clearTimeout: Function;
    };
    o: {
        clientId?: string;
        gapWait?: number;
        maxPending?: number;
        timers?: {
            setTimeout: Function;
            clearTimeout: Function;
        };
    };
    /** The confirmed state. @type {any} */
    confirmed: any;
    /** The confirmed version. */
    version: number;
    /** Local ops not confirmed yet, oldest first. @type {{seq: number, base: number, op: any, acked: number|null}[]} */
    pending: {
        seq: number;
        base: number;
        op: any;
        acked: number | null;
    }[];
    /** The predicted state the page shows. @type {any} */
    state: any;
    /** Whether the confirmed state is current (false from a reconnect to the resync). */
    synced: boolean;
    /** @type {string|null} */
    user: string | null;
    seq: number;
    /** Ops that came ahead of a missing one, by version. @type {Map<number, any>} */
    early: Map<number, any>;
    inflight: boolean;
    /** @type {any} */
    retry: any;
    /** @type {any} */
    gap: any;
    stopped: boolean;
    /** The resync running, if any. @type {Promise<void>|null} */
    busy: Promise<void> | null;
    again: boolean;
    /** @type {Set<Function>} */
    changeFns: Set<Function>;
    /** @type {Set<Function>} */
    rollbackFns: Set<Function>;
    /** Resolves once the first state arrived. @type {Promise<Synced>} */
    ready: Promise<Synced>;
    /** Called after every change of the view. @param {(s: Synced) => void} fn */
    onChange(fn: (s: Synced) => void): () => boolean;
    /** A local op was undone: show `message`. @param {(r: Rollback) => void} fn */
    onRollback(fn: (r: Rollback) => void): () => boolean;
    /**
     * Applies `op` to the view at once and queues it for the server. Throws
     * a `Reject` when the reducer refuses it here (nothing is queued).
     * @param {any} op
     */
    apply(op: any): void;
    /** Stops listening (the room stays joined). */
    stop(): void;
    /**
     * Asks for what was missed (`sync.get`), rebases, resends. One at a time:
     * a call while one runs makes it ask once more.
     * @param {boolean} [first]
     */
    resync(first?: boolean): Promise<void>;
    #private;
}
export type Room = import("./switchboard.js").Room;
/**
 * Who sent an op and what it was based on.
 */
export type Context = {
    room: string;
    client: string;
    user: string | null;
    base: number;
};
/**
 * The app's rule, the same as the server's (deterministic!): changes
 * `state` (a copy) for `op`, or throws a `Reject` to refuse it. A value it
 * returns replaces the state.
 */
export type Reducer = (state: any, op: any, cx: Context) => any;
/**
 * An op the server refused (or the reducer refused locally).
 */
export type Rollback = {
    op: any;
    /**
     * the server's code (409: the reducer refused)
     */
    code: number;
    /**
     * the reason, for the user
     */
    message: string;
};
