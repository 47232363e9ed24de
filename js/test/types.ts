// Compile-only check (tsc -p tsconfig.test.json, run by .ci/js.sh) that the
// shipped declarations (switchboard.d.ts) describe the documented API.
import { Synced, synced, jsonDoc, Reject } from "../sync.js";
import { connect, SwitchboardError, closeAction, VERSION, type Status, type Member } from "../switchboard.js";

const client = connect("/ws?user=ann", { sse: "/events?user=ann", token: async () => "t", backoff: { initial: 500 } });
const off: () => void = client.onStatus((s: Status) => {
  const state: "connecting" | "open" | "reconnecting" | "closed" = s.state;
  const at: number | null = s.retryAt;
  const words: string | undefined = s.reason?.message;
  void [state, at, words];
});
off();
client.onError((e) => e.kind.toUpperCase());
client.onEvent("notice", (data, info) => info.event.length + String(data));
client.retryNow();

async function use(): Promise<void> {
  const room = await client.join("chat:1", { rewind: 10, data: { invite: "x" }, timeout: 5000 });
  room.on("said", (data, { offset }) => (offset ?? 0) + data.text.length);
  room.onResync(({ reason }) => reason === "not_recovered");
  room.onJoin(({ recovered }) => recovered === false);
  room.presence.onChange((members: Member[]) => members.filter((m) => m.self).map((m) => m.metas.length));
  const count: number = room.presence.count().connections;
  await room.presence.set({ ephemeral: { typing: true } });
  try {
    await room.call("say", { text: "hi" }, { timeout: 1000, retry: false });
  } catch (e) {
    if (e instanceof SwitchboardError && e.code === 420) console.log(e.data, count);
  }
  await room.leave();
  client.close();
}
void use;
const action: "reconnect" | "stop" = closeAction(1006);
const v: string = VERSION;
void [action, v];

// The synced-room module (sync.js).
async function useSync(): Promise<void> {
  const room = await client.join("todo:1");
  const doc: Synced = await synced(room, jsonDoc, { clientId: "tab1", gapWait: 500 });
  doc.onChange((s) => console.log(s.state, s.version, s.pending.length, s.synced));
  doc.onRollback(({ op, code, message }) => console.log(op, code + 1, message.length));
  doc.apply({ type: "set", path: ["items", "a"], value: { text: "milk" } });
  const counter = new Synced(room, (state: { n: number } | null, op: { add: number }) => {
    const n = (state?.n ?? 0) + op.add;
    if (n > 10) throw new Reject("at most 10", 1001);
    return { n };
  });
  await counter.ready;
  counter.stop();
}
void useSync;
