// The official Node SDKs (@azure/web-pubsub-client and @azure/web-pubsub) against
// the emulator binary named by WPS_EMULATOR_BIN. Run with `node --test`.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { existsSync } from "node:fs";
import { createInterface } from "node:readline";
import { createServer } from "node:http";
import { WebPubSubClient, WebPubSubJsonProtocol } from "@azure/web-pubsub-client";
import { WebPubSubServiceClient } from "@azure/web-pubsub";
import { WebPubSubEventHandler } from "@azure/web-pubsub-express";
import express from "express";

const HUB = "interop";
const ROLES = ["webpubsub.joinLeaveGroup", "webpubsub.sendToGroup"];
const WAIT_MS = 15000;

let emulator;
let connectionString;
let endpoint;
let service;
const started = [];

/** Starts the emulator binary; resolves to [process, connection string]. */
async function startEmulator(extraArgs = []) {
  const bin = process.env.WPS_EMULATOR_BIN;
  if (!bin || !existsSync(bin)) {
    throw new Error(
      `WPS_EMULATOR_BIN must name the built webpubsub-emulator binary (got ${JSON.stringify(bin)})`,
    );
  }
  const proc = spawn(bin, ["--port", "0", ...extraArgs], { stdio: ["ignore", "pipe", "ignore"] });
  const lines = createInterface({ input: proc.stdout });
  const line = await withTimeout(
    new Promise((resolve) => lines.once("line", resolve)),
    "the emulator's connection string",
  );
  return [proc, line];
}

async function stopEmulator(proc) {
  const exited = new Promise((resolve) => proc.once("exit", (code) => resolve(code)));
  proc.kill("SIGTERM");
  assert.equal(await withTimeout(exited, "the emulator to exit"), 0);
}

before(async () => {
  [emulator, connectionString] = await startEmulator();
  assert.match(connectionString, /^Endpoint=http:\/\/127\.0\.0\.1;Port=\d+;AccessKey=.+;Version=1\.0;$/);
  const port = /Port=(\d+);/.exec(connectionString)[1];
  endpoint = `http://127.0.0.1:${port}`;
  // The SDK refuses plain http unless told: the emulator serves http unless given --tls-*.
  service = new WebPubSubServiceClient(connectionString, HUB, { allowInsecureConnection: true });
});

after(async () => {
  for (const c of started) c.stop();
  await stopEmulator(emulator);
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

test("sendEvent and invokeEvent through an upstream", async () => {
  // A tiny upstream: echoes the body back with its content type, records the CloudEvents headers.
  const seen = new Queue();
  const upstream = createServer((req, res) => {
    const chunks = [];
    req.on("data", (c) => chunks.push(c));
    req.on("end", () => {
      if (!String(req.headers["ce-type"]).startsWith("azure.webpubsub.user.")) {
        res.writeHead(204).end();
        return;
      }
      seen.push(req.headers);
      res.writeHead(200, { "content-type": req.headers["content-type"] });
      res.end(Buffer.concat(chunks));
    });
  });
  await new Promise((resolve) => upstream.listen(0, "127.0.0.1", resolve));
  const [proc, cs] = await startEmulator(["--upstream", `http://127.0.0.1:${upstream.address().port}/events`]);
  try {
    const svc = new WebPubSubServiceClient(cs, HUB, { allowInsecureConnection: true });
    const { url } = await svc.getClientAccessToken({ userId: "caller" });
    const c = await newClient(url);
    const result = await c.sdk.invokeEvent("echo", "ping?", "text");
    assert.equal(result.data, "ping?");
    assert.equal(result.dataType, "text");
    const headers = await seen.next("the invoke at the upstream");
    assert.equal(headers["ce-type"], "azure.webpubsub.user.echo");
    assert.equal(headers["ce-userid"], "caller");
    assert.equal(headers["ce-connectionid"], c.connectionId);
    const json = await c.sdk.invokeEvent("echo", { q: 1 }, "json");
    assert.deepEqual(json.data, { q: 1 });
    await c.sdk.sendEvent("echo", "event body", "text");
    assert.equal((await c.server.next("the upstream reply")).data, "event body");
    c.sdk.stop();
  } finally {
    await stopEmulator(proc);
    upstream.close();
  }
});

// ---- The official samples, re-typed: the same calls in the same order, with asserts. ----

test("sample web-pubsub-client helloworld: a getClientAccessUrl credential and group-scoped roles", async () => {
  const groupName = "testGroup";
  const fetchClientAccessUrl = async () =>
    (
      await service.getClientAccessToken({
        roles: [`webpubsub.joinLeaveGroup.${groupName}`, `webpubsub.sendToGroup.${groupName}`],
      })
    ).url;
  const c = await newClient({ getClientAccessUrl: fetchClientAccessUrl });
  await c.sdk.joinGroup(groupName);
  await c.sdk.sendToGroup(groupName, "hello world", "text", { fireAndForget: true });
  await c.sdk.sendToGroup(groupName, { a: 12, b: "hello" }, "json");
  await c.sdk.sendToGroup(groupName, "hello json", "json");
  const buf = Buffer.from("aGVsbG9w", "base64");
  await c.sdk.sendToGroup(groupName, buf.buffer.slice(buf.byteOffset, buf.byteOffset + buf.byteLength), "binary");
  const got = [];
  for (let i = 0; i < 4; i++) got.push(await c.group.next(`group message ${i}`));
  assert.deepEqual(got.map((m) => m.group), Array(4).fill(groupName));
  assert.deepEqual(got.slice(0, 3).map((m) => m.data), ["hello world", { a: 12, b: "hello" }, "hello json"]);
  assert.equal(Buffer.from(got[3].data).toString("base64"), "aGVsbG9w");
  c.sdk.stop();
  assert.equal((await c.disconnected.next("disconnected")).connectionId, c.connectionId);
});

test("samples web-pubsub broadcasting, directMessage and managingGroups", async () => {
  // The samples use made-up user and connection ids; real ones are used here, so that
  // their effect can be seen (adding an unknown connection is a 404 on the service too).
  const chatHub = service;
  const bterlson = await newClient(await clientUrl("bterlson"));
  const xirzec = await newClient(await clientUrl("xirzec"));
  await chatHub.group("admin").addUser("xirzec");

  // broadcasting
  await chatHub.sendToAll("Hi there!");
  const adminGroup = chatHub.group("admin");
  await adminGroup.sendToAll("Hi admins!");
  const data = new Uint8Array(10);
  for (let i = 0; i < 10; i++) data[i] = i;
  await chatHub.sendToAll(data.buffer);
  assert.equal((await bterlson.server.next()).data, "Hi there!");
  assert.deepEqual([...new Uint8Array((await bterlson.server.next()).data)], [...data]);
  assert.equal((await xirzec.server.next()).data, "Hi there!");
  assert.equal((await xirzec.server.next()).data, "Hi admins!");
  assert.deepEqual([...new Uint8Array((await xirzec.server.next()).data)], [...data]);

  // directMessage: to a user, then the sample's second call (a connection id as a user id)
  await chatHub.sendToUser("bterlson", "Hi there!");
  await chatHub.sendToUser(bterlson.connectionId, "Hi there!");
  assert.equal((await bterlson.server.next()).data, "Hi there!");

  // managingGroups
  await adminGroup.addUser("bterlson");
  await adminGroup.removeUser("xirzec");
  await adminGroup.addConnection(xirzec.connectionId);
  await adminGroup.removeConnection(xirzec.connectionId);
  await adminGroup.sendToAll("admins now", { contentType: "text/plain" });
  assert.equal((await bterlson.server.next()).data, "admins now");
  await chatHub.sendToConnection(xirzec.connectionId, "last", { contentType: "text/plain" });
  assert.equal((await xirzec.server.next()).data, "last", "xirzec is out of admin");
  await assert.rejects(adminGroup.addConnection("Tn3XcrAbHI0OE36XvbWwige4ac096c1"), (err) => err.statusCode === 404);
  assert.equal(bterlson.server.size, 0, "the connection id is not a user id");
});

test("README: WebPubSubJsonProtocol reconnects after a drop and rejoins its groups", async () => {
  // A client on json.webpubsub.azure.v1 cannot recover: a lost socket means a new
  // connection, and autoRejoinGroups joins again the groups the client joined itself.
  // One joined through a REST grant fails to rejoin ("rejoin-group-failed").
  const url = await clientUrl("rejoiner", ["webpubsub.joinLeaveGroup.mine"]);
  const c = await newClient(url, { protocol: WebPubSubJsonProtocol() });
  const failed = new Queue();
  c.sdk.on("rejoin-group-failed", (e) => failed.push(e.group));
  await c.sdk.joinGroup("mine");
  await service.grantPermission(c.connectionId, "joinLeaveGroup", { targetName: "granted" });
  await c.sdk.joinGroup("granted");
  assert.equal(await fault(c.connectionId, ":drop"), 200);
  assert.equal((await c.disconnected.next("disconnected")).connectionId, c.connectionId);
  assert.equal(await failed.next("rejoin-group-failed"), "granted");
  const again = (await c.connected.next("the new connection")).connectionId;
  assert.notEqual(again, c.connectionId);
  await service.group("mine").sendToAll("to mine", { contentType: "text/plain" });
  await service.group("granted").sendToAll("to granted", { contentType: "text/plain" });
  await service.sendToConnection(again, "marker", { contentType: "text/plain" });
  assert.equal((await c.server.next()).data, "to mine");
  assert.equal((await c.server.next()).data, "marker");
});

test("README: autoReconnect false stops the client when the server closes it", async () => {
  const c = await newClient(await clientUrl("once"), { autoReconnect: false });
  const stopped = new Queue();
  c.sdk.on("stopped", () => stopped.push(true));
  await service.closeUserConnections("once", { reason: "done" });
  assert.equal((await c.disconnected.next("disconnected")).message.message, "done");
  assert.equal(await stopped.next("stopped"), true);
  assert.equal(await service.userExists("once"), false);
});

test("sample web-pubsub-express server: its handler answers the emulator's user events", async () => {
  // The sample's handler (handleConnect, onConnected, handleUserEvent, allowedEndpoints)
  // on an express app, with the emulator's --upstream at the handler's path. The
  // emulator sends no connect event and keeps no connection state: handleConnect is
  // never called and the state the sample sets there is not sent back.
  const seen = new Queue();
  const handler = new WebPubSubEventHandler("chat", {
    handleConnect(req, res) {
      res.setState("calledTime", 1);
      res.success();
    },
    onConnected(connectedRequest) {
      seen.push(["connected", connectedRequest.context.connectionId, connectedRequest.context.origin]);
    },
    handleUserEvent(req, res) {
      const calledTime = req.context.states.calledTime++;
      seen.push(["user", req.context.connectionId, req.data, req.context.origin]);
      res.setState("calledTime", calledTime);
      res.success("Hello", "text");
    },
    allowedEndpoints: ["https://xxx.webpubsub.azure.com"],
  });
  const app = express();
  app.use(handler.getMiddleware());
  const server = await new Promise((resolve) => {
    const s = app.listen(0, "127.0.0.1", () => resolve(s));
  });
  const upstream = `http://127.0.0.1:${server.address().port}${handler.path}`;
  const [proc, cs] = await startEmulator(["--upstream", upstream]);
  try {
    const origin = /Endpoint=https?:\/\/([^;]+);Port=(\d+);/.exec(cs).slice(1).join(":");
    const svc = new WebPubSubServiceClient(cs, "chat", { allowInsecureConnection: true });
    const c = await newClient((await svc.getClientAccessToken({ userId: "user1" })).url);
    assert.deepEqual(await seen.next("onConnected"), ["connected", c.connectionId, origin]);
    await c.sdk.sendEvent("hello", "first", "text");
    assert.deepEqual(await seen.next("handleUserEvent"), ["user", c.connectionId, "first", origin]);
    assert.equal((await c.server.next("the handler's reply")).data, "Hello");
    await c.sdk.sendEvent("hello", "second", "text");
    assert.equal((await c.server.next("the handler's reply")).data, "Hello");
    c.sdk.stop();
  } finally {
    await stopEmulator(proc);
    server.closeAllConnections();
    server.close();
  }
});
