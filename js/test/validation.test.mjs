import { test } from "node:test";
import assert from "node:assert/strict";
import { parseEnvelope } from "../switchboard.js";
import { setup, answerJoin } from "./harness.mjs";

test("parseEnvelope refuses garbage with a reason and never throws", () => {
  const bad = [
    [undefined, "not a text message"],
    [new ArrayBuffer(3), "not a text message"],
    ["", "not JSON"],
    ["{", "not JSON"],
    ["[1,2]", "malformed event"],
    ['["r","e",1,2,3]', "malformed event"],
    ['[1,"e",null]', "bad room"],
    ['["r",null,null]', "bad event"],
    ['["r","e",null,-1]', "bad offset"],
    ["null", "not a JSON object"],
    ['"hello"', "not a JSON object"],
    ["{}", "no type"],
    ['{"type":5}', "no type"],
    ['{"type":"frob"}', 'unknown message type "frob"'],
    ['{"type":"reply","ref":-1}', "bad ref"],
    ['{"type":"reply","ref":1.5}', "bad ref"],
    ['{"type":"reply","ref":"1"}', "bad ref"],
    ['{"type":"event","event":"e","offset":-3}', "bad offset"],
    ['{"type":"event","event":7}', "bad event"],
    ['{"type":"event","room":{},"event":"e"}', "bad room"],
    ['{"type":"error","ref":1,"code":"403"}', "bad code"],
    ['{"type":"error","ref":1}', "malformed error"],
    ['{"type":"reply"}', "malformed reply"],
    ['{"type":"event"}', "malformed event"],
    ['{"type":"hello","data":{"version":"1"}}', "malformed hello"],
    ['{"type":"presence_diff","room":"r","data":[]}', "malformed presence_diff"],
    ['{"type":"gap","data":{}}', "malformed gap"],
  ];
  for (const [input, why] of bad) assert.equal(parseEnvelope(input), why, String(input));
  assert.equal(parseEnvelope('{"type":"pong"}'.padEnd(200, " "), 100), "message larger than 100 bytes");
  const ok = parseEnvelope('{"type":"event","room":"r","event":"e","offset":3,"data":{"x":1},"future":[1]}');
  assert.equal(typeof ok, "object");
  assert.equal(ok.data.x, 1);
  // Protocol v2's compact events read as the v1 envelopes they stand for.
  assert.deepEqual(parseEnvelope('["r","e",{"x":1}]'), { type: "event", room: "r", event: "e", data: { x: 1 } });
  assert.deepEqual(parseEnvelope('["r","e",null,7]'), { type: "event", room: "r", event: "e", data: null, offset: 7 });
  assert.deepEqual(parseEnvelope('[null,"e",[1]]'), { type: "event", event: "e", data: [1] });
});

test("protocol v2: offered before v1; compact events reach the room like v1 ones", async () => {
  const { client, sockets } = setup();
  assert.deepEqual(sockets[0].protocols, ["switchboard.v2.json", "switchboard.v1.json"]);
  sockets[0].start({ version: 2 });
  assert.equal(client.status.state, "open");
  const j = client.join("r");
  answerJoin(sockets[0], { epoch: "E", offset: 1 });
  const room = await j;
  const got = [];
  room.on("e", (d, info) => got.push([d, info.offset]));
  sockets[0].recv('["r","e",{"n":1},2]');
  sockets[0].recv({ type: "event", room: "r", event: "e", data: { n: 2 }, offset: 3 });
  sockets[0].recv('["other","e",{"n":9}]');
  assert.deepEqual(got, [[{ n: 1 }, 2], [{ n: 2 }, 3]]);
});

test("garbage, unknown types and oversized frames are reported and change nothing", async () => {
  const { client, sockets, errors } = setup({ client: { maxMessageBytes: 1000 } });
  sockets[0].start();
  const j = client.join("r");
  answerJoin(sockets[0], { epoch: "E", offset: 1 });
  const room = await j;
  const got = [];
  room.on("e", (d, info) => got.push([d, info.offset]));
  const call = client.call("c", null);
  for (const junk of ["nope", "[]", '{"type":"frob","ref":1}', '{"type":"reply","ref":"x"}', "x".repeat(2000), '{"type":"event","room":"r","event":"e","offset":2,"data":"' + "y".repeat(2000) + '"}'])
    sockets[0].recv(junk);
  assert.deepEqual(errors.map((e) => e.kind), ["malformed", "malformed", "unknown_type", "malformed", "malformed", "malformed"]);
  assert.equal(client.stats.unknown, 1);
  assert.equal(client.stats.malformed, 5);
  // Nothing broke: still open, the room still delivers, the call still resolves.
  assert.equal(client.status.state, "open");
  sockets[0].recv({ type: "event", room: "r", event: "e", offset: 2, data: 2 });
  sockets[0].recv({ type: "reply", ref: sockets[0].last("call").ref, data: "done" });
  assert.equal(await call, "done");
  assert.deepEqual(got, [[2, 2]]);
  assert.equal(sockets.length, 1);
});

test("32 unreadable messages in a row drop the connection; a first message other than hello too", async () => {
  const { sockets, statuses, clock } = setup({ draws: [0] });
  sockets[0].start();
  for (let i = 0; i < 31; i++) sockets[0].recv("garbage");
  assert.equal(statuses.at(-1).state, "open");
  sockets[0].recv("garbage");
  assert.equal(statuses.at(-1).state, "reconnecting");
  assert.equal(statuses.at(-1).reason.kind, "protocol");
  await clock.advance(0);
  sockets[1].open();
  sockets[1].recv({ type: "pong" });
  assert.equal(sockets[1].closed, 1000);
  assert.equal(statuses.at(-1).reason.message, "the server did not start with hello");
});

test("handlers that throw are reported; other handlers and later events still run", async () => {
  const { client, sockets, errors } = setup();
  sockets[0].start();
  const j = client.join("r");
  answerJoin(sockets[0], {});
  const room = await j;
  const got = [];
  room.on("e", () => {
    throw new Error("app bug");
  });
  room.on("e", (d) => got.push(d));
  room.on("*", (d) => got.push(`*${d}`));
  client.onEvent("direct", () => {
    throw new TypeError("also a bug");
  });
  client.onStatus(() => {
    throw new Error("status handler bug");
  });
  sockets[0].recv({ type: "event", room: "r", event: "e", data: 1 });
  sockets[0].recv({ type: "event", event: "direct", data: 0 });
  sockets[0].recv({ type: "event", room: "r", event: "e", data: 2 });
  assert.deepEqual(got, [1, "*1", 2, "*2"]);
  assert.deepEqual(errors.map((e) => [e.kind, e.error.message]), [["handler", "app bug"], ["handler", "also a bug"], ["handler", "app bug"]]);
  assert.equal(client.status.state, "open");
});

test("an error listener that throws falls back to the logger; no listener logs to it", async () => {
  const { client, sockets, logged } = setup({ noErrorListener: true });
  sockets[0].start();
  sockets[0].recv("junk");
  assert.match(logged.at(-1), /ignored a server message: not JSON/);
  client.onError(() => {
    throw new Error("bad listener");
  });
  sockets[0].recv("junk");
  assert.match(logged.at(-1), /an error handler threw/);
  assert.equal(client.status.state, "open");
});

test("version: another protocol stops the client; another crate version is reported", async () => {
  const a = setup();
  a.sockets[0].start({ version: 3 });
  assert.equal(a.client.status.state, "closed");
  assert.equal(a.client.status.reason.kind, "version");
  assert.match(a.logged[0], /the server speaks protocol v3, this client v2/);
  const b = setup();
  b.sockets[0].start({ server_version: "0.2.0" });
  assert.equal(b.client.status.state, "open");
  assert.equal(b.errors[0].kind, "version");
  assert.match(b.logged[0], /switchboard.js 0.1.0 talks to a server of crate version 0.2.0/);
});
