// Benchmark driver for the official JavaScript client (@azure/web-pubsub-client).
// Command line and output are the ones every driver shares (benches/BENCHMARKS.md):
// one JSON result line on stdout, preceded by a START (or READY) marker line.

import { readFileSync } from "node:fs";
import { createInterface } from "node:readline";
import { parseArgs } from "node:util";
import { WebPubSubClient } from "@azure/web-pubsub-client";

const IDLE_MIDPOINT = 100;
const IDLE_CONNECT_PARALLEL = 50;

const { values: opts, positionals } = parseArgs({
  allowPositionals: true,
  options: {
    url: { type: "string" },
    group: { type: "string", default: "bench" },
    count: { type: "string", default: "1000" },
    seconds: { type: "string", default: "5" },
    size: { type: "string", default: "16" },
    binary: { type: "boolean", default: false },
    window: { type: "string", default: "0" },
    clients: { type: "string", default: "1000" },
    "idle-ms": { type: "string", default: "500" },
    go: { type: "boolean", default: false },
  },
});
const scenario = positionals[0];
const args = {
  url: opts.url,
  group: opts.group,
  count: Number(opts.count),
  seconds: Number(opts.seconds),
  size: Number(opts.size),
  binary: opts.binary,
  window: Number(opts.window),
  clients: Number(opts.clients),
  idleMs: Number(opts["idle-ms"]),
  go: opts.go,
};
if (!args.url || !["seq", "pub", "sub", "ready", "idle"].includes(scenario)) {
  console.error("usage: driver.mjs seq|pub|sub|ready|idle --url URL [options]");
  process.exit(2);
}

const now = () => Number(process.hrtime.bigint()) / 1e9;
// CPU seconds used by this process since `start` (a process.cpuUsage() reading).
const cpuSince = (start) => {
  const d = process.cpuUsage(start);
  return (d.user + d.system) / 1e6;
};
const mark = (line) => process.stdout.write(line + "\n");
const emit = (fields) => mark(JSON.stringify({ driver: "node-official", scenario, ...fields }));
const dataType = args.binary ? "binary" : "text";
const content = args.binary
  ? Uint8Array.from({ length: args.size }, (_, i) => i % 251).buffer
  : "x".repeat(args.size);
const newClient = () => new WebPubSubClient(args.url);

// Stops a client and waits (at most 5 s) for its "stopped" event.
function stopClient(client) {
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, 5000);
    client.on("stopped", () => {
      clearTimeout(timer);
      resolve();
    });
    client.stop();
  });
}

function percentile(sorted, q) {
  if (sorted.length === 0) return 0;
  const rank = Math.ceil(q * sorted.length);
  return sorted[Math.min(Math.max(rank, 1), sorted.length) - 1];
}

function procStatus() {
  const text = readFileSync("/proc/self/status", "utf8");
  const field = (name) => Number((text.match(new RegExp(`^${name}:\\s+(\\d+)`, "m")) || [])[1] || 0);
  return { rss: field("VmRSS"), threads: field("Threads") };
}

function payloadLength(data) {
  return typeof data === "string" ? data.length : data.byteLength;
}

async function seq() {
  const client = newClient();
  await client.start();
  const latencies = [];
  mark("START");
  const cpu = process.cpuUsage();
  const start = now();
  const deadline = start + args.seconds;
  for (let i = 0; i < args.count; i++) {
    const t0 = now();
    if (t0 >= deadline) break;
    await client.sendToGroup(args.group, content, dataType);
    latencies.push((now() - t0) * 1e6);
  }
  const elapsed = now() - start;
  latencies.sort((a, b) => a - b);
  emit({
    count: latencies.length,
    seconds: elapsed,
    rate: latencies.length / elapsed,
    p50_us: percentile(latencies, 0.5),
    p99_us: percentile(latencies, 0.99),
    cpu_s: cpuSince(cpu),
  });
  await stopClient(client);
}

// With --go, resolves when a line (or EOF) arrives on stdin: the subscriber is ready.
function waitForGo() {
  if (!args.go) return Promise.resolve();
  return new Promise((resolve) => {
    const rl = createInterface({ input: process.stdin });
    const done = () => {
      rl.close();
      resolve();
    };
    rl.once("line", done);
    rl.once("close", done);
  });
}

async function pub() {
  const client = newClient();
  await client.start();
  await waitForGo();
  mark("START");
  const cpu = process.cpuUsage();
  const start = now();
  const deadline = start + args.seconds;
  let sent = 0;
  let acked = 0;
  if (args.window === 0) {
    while (sent < args.count && now() < deadline) {
      await client.sendToGroup(args.group, content, dataType, { fireAndForget: true });
      sent++;
    }
  } else {
    const worker = async () => {
      while (sent < args.count && now() < deadline) {
        sent++;
        await client.sendToGroup(args.group, content, dataType);
        acked++;
      }
    };
    await Promise.all(Array.from({ length: args.window }, worker));
  }
  const elapsed = now() - start;
  await stopClient(client); // CPU counted until everything queued is written and closed
  emit({ sent, acked, seconds: elapsed, rate: sent / elapsed, cpu_s: cpuSince(cpu) });
}

async function sub() {
  const client = newClient();
  let first = null;
  let last = null;
  let received = 0;
  let bytes = 0;
  client.on("group-message", (e) => {
    const t = now();
    if (first === null) first = t;
    last = t;
    received++;
    bytes += payloadLength(e.message.data);
  });
  await client.start();
  await client.joinGroup(args.group);
  // run.py writes the publisher's sent count on stdin once it is done (EOF: count unknown).
  let sentTotal = null;
  let sentAt = null;
  const rl = createInterface({ input: process.stdin });
  const onSent = (line) => {
    if (sentAt !== null) return;
    sentTotal = /^\d+$/.test(line?.trim() ?? "") ? Number(line.trim()) : null;
    sentAt = now();
    rl.close();
  };
  rl.once("line", onSent);
  rl.once("close", () => onSent(null));
  mark("READY");
  const cpu = process.cpuUsage();
  const deadline = now() + args.seconds;
  const poll = Math.min(Math.max(args.idleMs, 1), 100);
  const done = () => {
    const t = now();
    if (received >= args.count || t >= deadline) return true;
    if (sentAt === null) return false;
    if (sentTotal !== null && received >= sentTotal) return true;
    return t - Math.max(last ?? sentAt, sentAt) >= args.idleMs / 1000;
  };
  while (!done()) {
    await new Promise((resolve) => setTimeout(resolve, poll));
  }
  const span = first === null ? 0 : last - first;
  emit({
    received,
    bytes,
    seconds: span,
    rate: span > 0 ? (received - 1) / span : 0,
    cpu_s: cpuSince(cpu),
  });
  await stopClient(client);
}

async function ready() {
  const times = [];
  mark("START");
  const deadline = now() + args.seconds;
  for (let i = 0; i < args.count && now() < deadline; i++) {
    const t0 = now();
    const client = newClient();
    const arrived = new Promise((resolve) => client.on("group-message", resolve));
    await client.start();
    await client.joinGroup(args.group);
    await client.sendToGroup(args.group, content, dataType);
    let timer;
    await Promise.race([
      arrived,
      new Promise((_, reject) => {
        timer = setTimeout(() => reject(new Error("group message did not arrive within 30 s")), 30000);
      }),
    ]);
    clearTimeout(timer);
    times.push((now() - t0) * 1e3);
    await stopClient(client);
  }
  times.sort((a, b) => a - b);
  emit({
    count: times.length,
    p50_ms: percentile(times, 0.5),
    p99_ms: percentile(times, 0.99),
    mean_ms: times.reduce((a, b) => a + b, 0) / Math.max(times.length, 1),
  });
}

async function connectMany(n, clients) {
  let next = 0;
  const worker = async () => {
    while (next < n) {
      next++;
      const c = newClient();
      await c.start();
      clients.push(c);
    }
  };
  await Promise.all(Array.from({ length: Math.min(IDLE_CONNECT_PARALLEL, n) }, worker));
}

async function idle() {
  const before = procStatus();
  mark("START");
  const start = now();
  const clients = [];
  const first = Math.min(args.clients, IDLE_MIDPOINT);
  await connectMany(first, clients);
  const mid = procStatus();
  await connectMany(args.clients - first, clients);
  const elapsed = now() - start;
  const after = procStatus();
  emit({
    clients: args.clients,
    rss_before_kib: before.rss,
    rss_mid_kib: mid.rss,
    rss_after_kib: after.rss,
    threads_before: before.threads,
    threads_mid: mid.threads,
    threads_after: after.threads,
    rss_per_client_kib: Math.max(after.rss - mid.rss, 0) / Math.max(args.clients - IDLE_MIDPOINT, 1),
    rss_total_per_client_kib: Math.max(after.rss - before.rss, 0) / Math.max(args.clients, 1),
    connect_seconds: elapsed,
  });
  // Stopping 1,000 clients one by one measures nothing; the result is out.
  process.exit(0);
}

const scenarios = { seq, pub, sub, ready, idle };
scenarios[scenario]()
  .then(() => process.exit(0))
  .catch((e) => {
    console.error(`node driver: ${e?.stack ?? e}`);
    process.exit(1);
  });
