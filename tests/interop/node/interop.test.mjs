// The official Node SDKs (@azure/web-pubsub-client and @azure/web-pubsub) against
// the emulator binary named by WPS_EMULATOR_BIN. Run with `node --test`.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { existsSync } from "node:fs";
import { createInterface } from "node:readline";
import { WebPubSubClient } from "@azure/web-pubsub-client";
import { WebPubSubServiceClient } from "@azure/web-pubsub";

const HUB = "interop";
const ROLES = ["webpubsub.joinLeaveGroup", "webpubsub.sendToGroup"];
const WAIT_MS = 15000;

let emulator;
let connectionString;
let endpoint;
let service;
const started = [];

before(async () => {
  const bin = process.env.WPS_EMULATOR_BIN;
  if (!bin || !existsSync(bin)) {
    throw new Error(
      `WPS_EMULATOR_BIN must name the built webpubsub-emulator binary (got ${JSON.stringify(bin)})`,
    );
  }
  emulator = spawn(bin, ["--port", "0"], { stdio: ["ignore", "pipe", "ignore"] });
  const lines = createInterface({ input: emulator.stdout });
  connectionString = await withTimeout(
    new Promise((resolve) => lines.once("line", resolve)),
    "the emulator's connection string",
  );
  assert.match(connectionString, /^Endpoint=http:\/\/127\.0\.0\.1;Port=\d+;AccessKey=.+;Version=1\.0;$/);
  const port = /Port=(\d+);/.exec(connectionString)[1];
  endpoint = `http://127.0.0.1:${port}`;
  // The SDK refuses plain http unless told: the emulator serves http unless given --tls-*.
  service = new WebPubSubServiceClient(connectionString, HUB, { allowInsecureConnection: true });
});

after(async () => {
  for (const c of started) c.stop();
  const exited = new Promise((resolve) => emulator.once("exit", (code) => resolve(code)));
  emulator.kill("SIGTERM");
  assert.equal(await withTimeout(exited, "the emulator to exit"), 0);
});

function withTimeout(promise, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out waiting for ${what}`)), WAIT_MS);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

/** An async FIFO of events. */
class Queue {
  items = [];
  waiters = [];
  push(item) {
    const w = this.waiters.shift();
    if (w) w(item);
    else this.items.push(item);
  }
  next(what = "an event") {
    if (this.items.length) return Promise.resolve(this.items.shift());
    return withTimeout(new Promise((resolve) => this.waiters.push(resolve)), what);
  }
  get size() {
    return this.items.length;
  }
}

async function clientUrl(userId, roles = []) {
  const token = await service.getClientAccessToken({ userId, roles });
  return token.url;
}

/**
 * Starts an official client that records what it receives. Short keep-alive timers:
 * the client's keep-alive monitor sleeps a third of keepAliveTimeoutInMs (40 s by
 * default) after stop(), which would hold node's test runner that long.
 */
async function newClient(url, options = {}) {
  const sdk = new WebPubSubClient(url, {
    keepAliveIntervalInMs: 1000,
    keepAliveTimeoutInMs: 6000,
    ...options,
  });
  const c = { sdk, group: new Queue(), server: new Queue(), connected: new Queue(), disconnected: new Queue() };
  sdk.on("group-message", (e) => c.group.push(e.message));
  sdk.on("server-message", (e) => c.server.push(e.message));
  sdk.on("connected", (e) => c.connected.push(e));
  sdk.on("disconnected", (e) => c.disconnected.push(e));
  await sdk.start();
  c.connectionId = (await c.connected.next("connected")).connectionId;
  started.push(sdk);
  return c;
}

async function fault(connectionId, action) {
  const resp = await fetch(`${endpoint}/_emulator/hubs/${HUB}/connections/${connectionId}/${action}`, {
    method: "POST",
  });
  return resp.status;
}

test("group messages: text, json and binary reach the other official client", async () => {
  const a = await newClient(await clientUrl("alice", ROLES));
  const b = await newClient(await clientUrl("bob", ROLES));
  await b.sdk.joinGroup("room");
  await a.sdk.sendToGroup("room", "hello", "text");
  await a.sdk.sendToGroup("room", { n: 1, list: [1, 2] }, "json");
  await a.sdk.sendToGroup("room", new Uint8Array([0, 1, 255]).buffer, "binary");
  const got = [await b.group.next(), await b.group.next(), await b.group.next()];
  assert.deepEqual(got.map((m) => m.group), ["room", "room", "room"]);
  assert.deepEqual(got.map((m) => m.fromUserId), ["alice", "alice", "alice"]);
  assert.equal(got[0].data, "hello");
  assert.deepEqual(got[1].data, { n: 1, list: [1, 2] });
  assert.deepEqual([...new Uint8Array(got[2].data)], [0, 1, 255]);
  assert.deepEqual(got.map((m) => Number(m.sequenceId)), [1, 2, 3]);
});

test("noEcho keeps a message from its sender", async () => {
  const a = await newClient(await clientUrl("alice", ROLES));
  await a.sdk.joinGroup("echo");
  await a.sdk.sendToGroup("echo", "silent", "text", { noEcho: true });
  await a.sdk.sendToGroup("echo", "loud", "text", { noEcho: false });
  assert.equal((await a.group.next()).data, "loud");
});

test("server sends through the official service SDK", async () => {
  const a = await newClient(await clientUrl("alice", ROLES));
  const b = await newClient(await clientUrl("bob", ROLES));
  await b.sdk.joinGroup("news");
  await service.sendToAll("to everyone", { contentType: "text/plain" });
  assert.equal((await a.server.next()).data, "to everyone");
  assert.equal((await b.server.next()).data, "to everyone");
  await service.group("news").sendToAll({ headline: "x" });
  assert.deepEqual((await b.server.next()).data, { headline: "x" });
  await service.sendToUser("alice", "just alice", { contentType: "text/plain" });
  assert.equal((await a.server.next()).data, "just alice");
  await service.sendToConnection(b.connectionId, new Uint8Array([7, 8]).buffer, {
    contentType: "application/octet-stream",
  });
  assert.deepEqual([...new Uint8Array((await b.server.next()).data)], [7, 8]);
  await service.sendToConnection(a.connectionId, "last", { contentType: "text/plain" });
  assert.equal((await a.server.next()).data, "last", "nothing else reached alice");
  assert.equal(await service.connectionExists(a.connectionId), true);
  await service.group("managed").addConnection(a.connectionId);
  assert.equal(await service.groupExists("managed"), true);
  await service.closeConnection(b.connectionId, { reason: "bye now" });
  assert.equal((await b.disconnected.next("disconnected")).message.message, "bye now");
});

test("Forbidden without roles", async () => {
  const a = await newClient(await clientUrl("nobody"), { messageRetryOptions: { maxRetries: 0 } });
  await assert.rejects(a.sdk.joinGroup("closed"), (err) => err.errorDetail?.name === "Forbidden");
  await assert.rejects(
    a.sdk.sendToGroup("closed", "x", "text"),
    (err) => err.errorDetail?.name === "Forbidden",
  );
});

test("reliable recovery after :drop loses and duplicates nothing", async () => {
  const sender = await newClient(await clientUrl("sender", ROLES));
  const receiver = await newClient(await clientUrl("receiver", ROLES));
  await receiver.sdk.joinGroup("stream");
  const total = 60;
  for (let i = 0; i < total; i++) {
    if (i === 20) assert.equal(await fault(receiver.connectionId, ":drop"), 200);
    await sender.sdk.sendToGroup("stream", String(i), "text");
  }
  const got = [];
  for (let i = 0; i < total; i++) got.push((await receiver.group.next(`message ${i}`)).data);
  assert.deepEqual(got, Array.from({ length: total }, (_, i) => String(i)));
  await sender.sdk.sendToGroup("stream", "after", "text");
  assert.equal((await receiver.group.next()).data, "after");
  assert.equal(receiver.connected.size, 0, "a recovery must not look like a new connection");
  assert.equal(receiver.disconnected.size, 0);
  const stats = await (await fetch(`${endpoint}/_emulator/stats`)).json();
  assert.equal(stats.recoveries, 1);
});

test("a bad token gets 401 before the upgrade", async () => {
  const url = await clientUrl("alice", ROLES);
  const bad = url.slice(0, -4) + (url.endsWith("AAAA") ? "BBBB" : "AAAA");
  const resp = await fetch(bad.replace("ws://", "http://"));
  assert.equal(resp.status, 401);
  const client = new WebPubSubClient(bad, {
    reconnectRetryOptions: { maxRetries: 0 },
    keepAliveIntervalInMs: 1000,
    keepAliveTimeoutInMs: 3000,
  });
  await assert.rejects(client.start());
  client.stop();
});
