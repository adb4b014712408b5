// The official Node SDKs (@azure/web-pubsub-client and @azure/web-pubsub) against
// the emulator binary named by WPS_EMULATOR_BIN. Run with `node --test`.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { existsSync } from "node:fs";
import { createInterface } from "node:readline";
import { createServer } from "node:http";
import { WebPubSubClient, WebPubSubJsonProtocol } from "@azure/web-pubsub-client";
import { WebPubSubServiceClient, odata } from "@azure/web-pubsub";
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
  const connected = await c.connected.next("connected");
  c.connectionId = connected.connectionId;
  c.userId = connected.userId;
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
  assert.equal(
    (await b.disconnected.next("disconnected")).message.message,
    "Application server closed the connection. Reason: bye now",
  );
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
  // A normal close: the client tries a recovery, which is refused, then tells the reason.
  assert.equal(
    (await c.disconnected.next("disconnected")).message.message,
    "Application server closed the connection. Reason: done",
  );
  assert.equal(await stopped.next("stopped"), true);
  assert.equal(await service.userExists("once"), false);
});

test("sample web-pubsub-express server: its handler answers the emulator's user events", async () => {
  // The sample's handler (handleConnect, onConnected, handleUserEvent, allowedEndpoints)
  // on an express app, with the emulator's --upstream at the handler's path. By default
  // the emulator sends no connect event (--upstream-system-events asks for it): the
  // sample's handleConnect is never called, and calledTime is never set. onDisconnected
  // is added: it gets the reason of a REST close.
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
    onDisconnected(req) {
      seen.push(["disconnected", req.context.connectionId, req.reason]);
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
    // The host name, without the port, as the service sends its own.
    const origin = /Endpoint=https?:\/\/([^;]+);Port=/.exec(cs)[1];
    const svc = new WebPubSubServiceClient(cs, "chat", { allowInsecureConnection: true });
    const c = await newClient((await svc.getClientAccessToken({ userId: "user1" })).url, {
      autoReconnect: false,
    });
    assert.deepEqual(await seen.next("onConnected"), ["connected", c.connectionId, origin]);
    await c.sdk.sendEvent("hello", "first", "text");
    assert.deepEqual(await seen.next("handleUserEvent"), ["user", c.connectionId, "first", origin]);
    assert.equal((await c.server.next("the handler's reply")).data, "Hello");
    await c.sdk.sendEvent("hello", "second", "text");
    assert.deepEqual(await seen.next("handleUserEvent"), ["user", c.connectionId, "second", origin]);
    assert.equal((await c.server.next("the handler's reply")).data, "Hello");
    await svc.closeConnection(c.connectionId, { reason: "bye" });
    assert.deepEqual(await seen.next("onDisconnected"), [
      "disconnected",
      c.connectionId,
      "Application server closed the connection. Reason: bye",
    ]);
  } finally {
    await stopEmulator(proc);
    server.closeAllConnections();
    server.close();
  }
});

// ---- The whole public surface of @azure/web-pubsub's WebPubSubServiceClient and
// WebPubSubGroup, each option included, observed by official clients. Each test has a
// hub of its own, so that hub-wide sends and closes reach only its clients. A client
// that must get nothing more is sent a marker on its own connection last: the next
// thing it sees must be that marker. ----

/** A service client for a hub of its own. */
function hubService(hub) {
  return new WebPubSubServiceClient(connectionString, hub, { allowInsecureConnection: true });
}

/** An official client of svc's hub. */
async function hubClient(svc, tokenOptions = {}, clientOptions = {}) {
  return newClient((await svc.getClientAccessToken(tokenOptions)).url, clientOptions);
}

async function nothingElse(svc, ...clients) {
  for (const c of clients) {
    await svc.sendToConnection(c.connectionId, "marker", { contentType: "text/plain" });
    assert.equal((await c.server.next("the marker")).data, "marker");
  }
}

function claims(token) {
  return JSON.parse(Buffer.from(token.split(".")[1], "base64url").toString());
}

test("service SDK sends: every content type, excluded, filter and messageTtlSeconds", async () => {
  const svc = hubService("surface_send");
  const a = await hubClient(svc, { userId: "alice", roles: ROLES });
  const b = await hubClient(svc, { userId: "bob", roles: ROLES });
  const anon = await hubClient(svc);
  await a.sdk.joinGroup("room");
  await b.sdk.joinGroup("room");

  await svc.sendToAll("text", {
    contentType: "text/plain",
    excludedConnections: [a.connectionId],
    messageTtlSeconds: 60,
  });
  await svc.sendToAll({ json: [1, null] }, { filter: odata`userId ne ${null}` });
  await svc.sendToAll(new Uint8Array([0, 255]), { messageTtlSeconds: 0 });
  for (const c of [b, anon]) assert.equal((await c.server.next()).data, "text");
  for (const c of [a, b]) assert.deepEqual((await c.server.next()).data, { json: [1, null] });
  for (const c of [a, b, anon]) assert.deepEqual([...new Uint8Array((await c.server.next()).data)], [0, 255]);

  const room = svc.group("room");
  await room.sendToAll("to bob", {
    contentType: "text/plain",
    excludedConnections: [anon.connectionId],
    filter: odata`userId eq ${"bob"}`,
    messageTtlSeconds: 300,
  });
  await room.sendToAll("not bob", { contentType: "text/plain", excludedConnections: [b.connectionId] });
  await room.sendToAll([1, 2]);
  await room.sendToAll(new Uint8Array([1]).buffer);
  assert.equal((await b.server.next()).data, "to bob");
  assert.equal((await a.server.next()).data, "not bob");
  for (const c of [a, b]) {
    assert.deepEqual((await c.server.next()).data, [1, 2]);
    assert.deepEqual([...new Uint8Array((await c.server.next()).data)], [1]);
  }

  await svc.sendToUser("alice", "filtered out", { contentType: "text/plain", filter: "not('room' in groups)" });
  await svc.sendToUser("alice", { u: 1 }, { messageTtlSeconds: 10 });
  await svc.sendToUser("alice", new Uint8Array([2]));
  assert.deepEqual((await a.server.next()).data, { u: 1 });
  assert.deepEqual([...new Uint8Array((await a.server.next()).data)], [2]);

  await svc.sendToConnection(b.connectionId, { c: true }, { messageTtlSeconds: 10 });
  await svc.sendToConnection(b.connectionId, "plain", { contentType: "text/plain", messageTtlSeconds: 10 });
  await svc.sendToConnection(b.connectionId, new Uint8Array([3]));
  assert.deepEqual((await b.server.next()).data, { c: true });
  assert.equal((await b.server.next()).data, "plain");
  assert.deepEqual([...new Uint8Array((await b.server.next()).data)], [3]);

  await assert.rejects(
    svc.sendToAll("x", { contentType: "text/plain", filter: "userId eq" }),
    (e) => e.statusCode === 400,
  );
  await nothingElse(svc, a, b, anon);
});

test("service SDK membership: connections, users, filters, all groups", async () => {
  const svc = hubService("surface_groups");
  const a1 = await hubClient(svc, { userId: "alice", roles: ROLES });
  const a2 = await hubClient(svc, { userId: "alice", roles: ROLES });
  const b = await hubClient(svc, { userId: "bob", roles: ROLES });
  const anon = await hubClient(svc);

  const ug = svc.group("ug");
  await ug.addUser("alice");
  assert.equal(await svc.groupExists("ug"), true);
  await ug.sendToAll("ug 1", { contentType: "text/plain" });
  for (const c of [a1, a2]) assert.equal((await c.server.next()).data, "ug 1");
  await ug.removeUser("alice");
  assert.equal(await svc.groupExists("ug"), false);
  await ug.sendToAll("ug 2", { contentType: "text/plain" });

  await svc.group("x").addUser("alice");
  await a1.sdk.joinGroup("self");
  await svc.removeUserFromAllGroups("alice");
  for (const g of ["x", "self"]) {
    assert.equal(await svc.groupExists(g), false);
    await svc.group(g).sendToAll("gone", { contentType: "text/plain" });
  }

  const c = svc.group("c");
  await c.addConnection(a2.connectionId);
  await c.addConnection(b.connectionId);
  await svc.group("d").addConnection(b.connectionId);
  await c.sendToAll("c 1", { contentType: "text/plain" });
  assert.equal((await a2.server.next()).data, "c 1");
  assert.equal((await b.server.next()).data, "c 1");
  await c.removeConnection(b.connectionId);
  await c.sendToAll("c 2", { contentType: "text/plain" });
  assert.equal((await a2.server.next()).data, "c 2");
  await svc.removeConnectionFromAllGroups(a2.connectionId);
  assert.equal(await svc.groupExists("c"), false);
  assert.equal(await svc.groupExists("d"), true);
  await assert.rejects(c.addConnection("no-such-connection"), (e) => e.statusCode === 404);

  // Filter-based: every connection the filter selects joins or leaves every group.
  await svc.addConnectionsToGroups(["f1", "f2"], odata`userId eq ${"bob"} or userId eq ${null}`);
  for (const g of ["f1", "f2"]) {
    await svc.group(g).sendToAll(g, { contentType: "text/plain" });
    for (const x of [b, anon]) assert.equal((await x.server.next()).data, g);
  }
  await svc.removeConnectionsFromGroups(["f1"], "userId ne null");
  await svc.group("f1").sendToAll("f1 again", { contentType: "text/plain" });
  assert.equal((await anon.server.next()).data, "f1 again");
  await assert.rejects(svc.addConnectionsToGroups(["f3"], "userId eq"), (e) => e.statusCode === 400);
  assert.equal(await svc.groupExists("f3"), false);

  assert.equal(await svc.userExists("alice"), true);
  assert.equal(await svc.userExists("nobody"), false);
  assert.equal(await svc.connectionExists(b.connectionId), true);
  assert.equal(await svc.connectionExists("no-such-connection"), false);
  await nothingElse(svc, a1, a2, b, anon);
});

// The service requires targetName (the group); the SDK lets it be left out, and then
// the service answers 400. A grant or a revoke is for that group alone and overrides,
// for it, what the token's roles say.
test("service SDK permissions need a targetName and override the roles", async () => {
  const svc = hubService("surface_perms");
  const once = { messageRetryOptions: { maxRetries: 0 } };
  const a = await hubClient(svc, { userId: "alice" }, once);
  const b = await hubClient(svc, { userId: "bob", roles: ROLES }, once);
  await b.sdk.joinGroup("any");
  await b.sdk.joinGroup("perm");
  const forbidden = (err) => err.errorDetail?.name === "Forbidden";

  for (const call of ["grantPermission", "hasPermission", "revokePermission"]) {
    for (const permission of ["sendToGroup", "joinLeaveGroup"]) {
      await assert.rejects(svc[call](a.connectionId, permission), (e) => e.statusCode === 400);
    }
  }

  await assert.rejects(a.sdk.sendToGroup("perm", "x", "text"), forbidden);
  await svc.grantPermission(a.connectionId, "sendToGroup", { targetName: "perm" });
  assert.equal(await svc.hasPermission(a.connectionId, "sendToGroup", { targetName: "perm" }), true);
  assert.equal(await svc.hasPermission(a.connectionId, "sendToGroup", { targetName: "any" }), false);
  await a.sdk.sendToGroup("perm", "to perm", "text");
  assert.equal((await b.group.next()).data, "to perm");
  await assert.rejects(a.sdk.sendToGroup("any", "x", "text"), forbidden);
  await svc.revokePermission(a.connectionId, "sendToGroup", { targetName: "perm" });
  await assert.rejects(a.sdk.sendToGroup("perm", "x", "text"), forbidden);

  // b's roles grant every group; a revoke takes "perm" out, and only it.
  assert.equal(await svc.hasPermission(b.connectionId, "joinLeaveGroup", { targetName: "perm" }), true);
  await svc.revokePermission(b.connectionId, "joinLeaveGroup", { targetName: "perm" });
  assert.equal(await svc.hasPermission(b.connectionId, "joinLeaveGroup", { targetName: "perm" }), false);
  await assert.rejects(b.sdk.leaveGroup("perm"), forbidden);
  await b.sdk.joinGroup("joined");
  assert.equal(await svc.groupExists("joined"), true);
  await svc.grantPermission(b.connectionId, "joinLeaveGroup", { targetName: "perm" });
  await b.sdk.leaveGroup("perm");
  assert.equal(await svc.hasPermission("no-such-connection", "joinLeaveGroup", { targetName: "perm" }), false);
  assert.equal(b.group.size, 0);
});

// The close methods' option types declare only `reason`; the generated operations they
// call also send `excluded`, which the service takes.
test("service SDK closes with excluded and reason", async () => {
  const svc = hubService("surface_close");
  const once = { autoReconnect: false };
  const a1 = await hubClient(svc, { userId: "alice" }, once);
  const a2 = await hubClient(svc, { userId: "alice" }, once);
  const b = await hubClient(svc, { userId: "bob", groups: ["g"] }, once);
  const c = await hubClient(svc, { userId: "carol", groups: ["g"] }, once);
  const d = await hubClient(svc, {}, once);
  const e = await hubClient(svc, {}, once);
  // The service wraps the reason in its own text.
  const reason = async (x) =>
    (await x.disconnected.next("disconnected")).message.message.replace("Application server closed the connection. Reason: ", "");

  await svc.closeUserConnections("alice", { excluded: [a2.connectionId], reason: "alice out" });
  assert.equal(await reason(a1), "alice out");
  assert.equal(await svc.connectionExists(a1.connectionId), false);
  assert.equal(await svc.userExists("alice"), true);

  await svc.group("g").closeAllConnections({ excluded: [c.connectionId], reason: "group out" });
  assert.equal(await reason(b), "group out");
  assert.equal(await svc.userExists("bob"), false);

  await svc.closeAllConnections({ excluded: [d.connectionId, e.connectionId], reason: "all out" });
  for (const x of [a2, c]) assert.equal(await reason(x), "all out");
  assert.equal(await svc.groupExists("g"), false);
  assert.equal(await svc.connectionExists(d.connectionId), true);

  await svc.closeConnection(d.connectionId, { reason: "just d" });
  assert.equal(await reason(d), "just d");
  await svc.closeConnection(e.connectionId);
  assert.equal((await e.disconnected.next("disconnected")).connectionId, e.connectionId);
  // Closing what is gone is no error.
  await svc.closeConnection(d.connectionId);
  await svc.closeUserConnections("alice");
  await svc.group("g").closeAllConnections();
  await svc.closeAllConnections();
  for (const x of [a1, a2, b, c, d, e]) assert.equal(x.disconnected.size, 0);
});

test("group.listConnections pages with top, maxPageSize and continuation", async () => {
  const svc = hubService("surface_list");
  const expected = new Map();
  for (const userId of ["u0", "u1", "u2", "u3", undefined]) {
    const c = await hubClient(svc, { userId, groups: ["listed"] });
    expected.set(c.connectionId, userId);
  }
  await hubClient(svc, { userId: "outsider" });
  const listed = svc.group("listed");
  // A connection without a user is listed with userId null.
  const member = (m) => [m.connectionId, m.userId ?? undefined];
  const pages = async (options, settings) => {
    const out = [];
    for await (const page of (await listed.listConnections(options)).byPage(settings)) {
      out.push(page.map(member));
    }
    return out;
  };

  const all = [];
  for await (const m of await listed.listConnections()) all.push(member(m));
  assert.deepEqual(new Map(all), expected);
  assert.equal(all.length, 5);
  assert.deepEqual((await pages({ top: 3 })).map((p) => p.length), [3]);
  assert.deepEqual(await pages(), [all]);
  const none = [];
  for await (const m of await svc.group("nobody").listConnections()) none.push(m);
  assert.deepEqual(none, []);

  const byTwo = await pages({ maxPageSize: 2 });
  assert.deepEqual(byTwo.map((p) => p.length), [2, 2, 1]);
  assert.deepEqual(new Map(byTwo.flat()), expected);
  const topped = await pages({ top: 3, maxPageSize: 2 });
  assert.deepEqual(topped, [byTwo[0], byTwo[1].slice(0, 1)]);

  // byPage's continuationToken is a page's nextLink; the continuationToken option is
  // the service's token inside it.
  let nextLink;
  const onResponse = (r) => {
    nextLink ??= r.parsedBody.nextLink;
  };
  const first = await (await listed.listConnections({ maxPageSize: 2, onResponse })).byPage().next();
  assert.deepEqual(first.value.map(member), byTwo[0]);
  assert.ok(nextLink);
  assert.deepEqual(await pages({ maxPageSize: 2 }, { continuationToken: nextLink }), byTwo.slice(1));
  const token = new URL(nextLink, endpoint).searchParams.get("continuationToken");
  assert.deepEqual(await pages({ maxPageSize: 2, continuationToken: token }), byTwo.slice(1));
});

test("getClientAccessToken: userId, roles, groups, expirationTimeInMinutes, clientProtocol", async () => {
  const svc = hubService("surface_token");
  const listener = await hubClient(svc, { userId: "listener", roles: ROLES });
  await listener.sdk.joinGroup("only");
  const token = await svc.getClientAccessToken({
    userId: "tok",
    roles: ["webpubsub.sendToGroup.only"],
    groups: ["g1", "g2"],
    expirationTimeInMinutes: 2,
  });
  const got = claims(token.token);
  assert.equal(got.exp - got.iat, 120);
  assert.equal(got.aud, `${endpoint}/client/hubs/surface_token`);
  assert.equal(token.baseUrl, `${endpoint.replace("http", "ws")}/client/hubs/surface_token`);
  const c = await newClient(token.url, { messageRetryOptions: { maxRetries: 0 } });
  assert.equal(await svc.userExists("tok"), true);
  assert.equal(await svc.groupExists("g1"), true);
  await svc.group("g2").sendToAll("to g2", { contentType: "text/plain" });
  assert.equal((await c.server.next()).data, "to g2");
  await c.sdk.sendToGroup("only", "from tok", "text");
  const m = await listener.group.next();
  assert.deepEqual([m.data, m.fromUserId], ["from tok", "tok"]);
  const forbidden = (err) => err.errorDetail?.name === "Forbidden";
  await assert.rejects(c.sdk.joinGroup("other"), forbidden);
  await assert.rejects(c.sdk.sendToGroup("other", "x", "text"), forbidden);

  const expired = await svc.getClientAccessToken({ expirationTimeInMinutes: -1 });
  assert.equal((await fetch(expired.url.replace("ws://", "http://"))).status, 401);

  // MQTT and Socket.IO clients have their own paths; the emulator serves neither and says so.
  for (const clientProtocol of ["mqtt", "socketio"]) {
    const other = await svc.getClientAccessToken({ clientProtocol });
    assert.match(other.url, new RegExp(`/clients/${clientProtocol}/hubs/surface_token\\?access_token=`));
    const resp = await fetch(other.url.replace("ws://", "http://"));
    assert.equal(resp.status, 501);
    assert.match(await resp.text(), /not supported/);
  }
  const plain = await svc.getClientAccessToken({ clientProtocol: "default" });
  assert.match(plain.url, /\/client\/hubs\/surface_token\?access_token=/);
  await newClient(plain.url);
});

test("web-pubsub-express handleConnect sets the user and groups, and setState carries across events", async () => {
  const seen = new Queue();
  const handler = new WebPubSubEventHandler("chat", {
    handleConnect(req, res) {
      seen.push(["connect", req.context.connectionId, req.context.userId, req.subprotocols, "access_token" in req.queries]);
      if (req.claims.sub?.[0] === "denied") {
        res.fail(401, "no entry");
        return;
      }
      res.setState("from", "connect");
      res.success({ userId: "fromUpstream", groups: ["room"] });
    },
    onConnected(req) {
      seen.push(["connected", req.context.connectionId, req.context.userId, req.context.states]);
    },
    handleUserEvent(req, res) {
      const count = req.context.states.count ?? 0;
      seen.push(["user", req.data, req.context.userId, { ...req.context.states }]);
      res.setState("count", count + 1);
      res.success(`count ${count}`, "text");
    },
  });
  const app = express();
  app.use(handler.getMiddleware());
  const server = await new Promise((resolve) => {
    const s = app.listen(0, "127.0.0.1", () => resolve(s));
  });
  const upstream = `http://127.0.0.1:${server.address().port}${handler.path}`;
  const [proc, cs] = await startEmulator([
    "--upstream",
    upstream,
    "--upstream-system-events",
    "connect,connected,disconnected",
  ]);
  try {
    const svc = new WebPubSubServiceClient(cs, "chat", { allowInsecureConnection: true });
    // An anonymous token: the user comes from handleConnect.
    const c = await newClient((await svc.getClientAccessToken()).url);
    const [connect, connectionId, tokenUser, subprotocols, hasToken] = await seen.next("handleConnect");
    assert.deepEqual(
      [connect, connectionId, tokenUser, subprotocols, hasToken],
      ["connect", c.connectionId, undefined, ["json.reliable.webpubsub.azure.v1"], true],
    );
    assert.deepEqual(await seen.next("onConnected"), ["connected", c.connectionId, "fromUpstream", { from: "connect" }]);
    assert.equal(c.userId, "fromUpstream");
    // In the group handleConnect named.
    await svc.group("room").sendToAll("to the room", { contentType: "text/plain" });
    assert.equal((await c.server.next("the message to the group")).data, "to the room");
    // The state set by one reply comes with the next request.
    await c.sdk.sendEvent("count", "first", "text");
    assert.deepEqual(await seen.next("handleUserEvent"), ["user", "first", "fromUpstream", { from: "connect" }]);
    assert.equal((await c.server.next("the handler's reply")).data, "count 0");
    await c.sdk.sendEvent("count", "second", "text");
    assert.deepEqual(await seen.next("handleUserEvent"), ["user", "second", "fromUpstream", { from: "connect", count: 1 }]);
    assert.equal((await c.server.next("the handler's reply")).data, "count 1");
    // fail(401) refuses the handshake: start rejects, and onConnected is not called.
    const denied = new WebPubSubClient((await svc.getClientAccessToken({ userId: "denied" })).url, {
      reconnectRetryOptions: { maxRetries: 0 },
      keepAliveIntervalInMs: 1000,
      keepAliveTimeoutInMs: 3000,
    });
    await assert.rejects(denied.start());
    denied.stop();
    assert.equal((await seen.next("handleConnect"))[2], "denied");
    c.sdk.stop();
    assert.equal(seen.size, 0);
  } finally {
    await stopEmulator(proc);
    server.closeAllConnections();
    server.close();
  }
});
