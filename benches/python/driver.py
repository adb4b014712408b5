"""Benchmark driver for the Python clients.

The same code drives the official ``azure-messaging-webpubsubclient`` and our
``webpubsub_client`` binding (whose API mirrors it), each in its sync and its
asyncio form; only the import differs. Command line and output are the ones
every driver shares (see ``benches/BENCHMARKS.md``): one JSON result line on
stdout, preceded by a ``START`` (or ``READY``) marker line.
"""

import argparse
import asyncio
import collections
import functools
import importlib
import json
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

IDLE_MIDPOINT = 100
IDLE_CONNECT_PARALLEL = 50

CLIENTS = {
    "official": ("azure.messaging.webpubsubclient", False),
    "official-aio": ("azure.messaging.webpubsubclient", True),
    "ours": ("webpubsub_client", False),
    "ours-aio": ("webpubsub_client", True),
}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--client", choices=sorted(CLIENTS), required=True)
    p.add_argument("scenario", choices=["seq", "pub", "sub", "ready", "idle"])
    p.add_argument("--url", required=True)
    p.add_argument("--group", default="bench")
    p.add_argument("--count", type=int, default=1000)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--size", type=int, default=16)
    p.add_argument("--binary", action="store_true")
    p.add_argument("--window", type=int, default=0)
    p.add_argument("--clients", type=int, default=1000)
    p.add_argument("--idle-ms", type=int, default=500)
    p.add_argument("--go", action="store_true", help="publisher: wait for a stdin line")
    p.add_argument("--threads", action="store_true",
                   help="pipelined acked sends: a blocking send on each of --window threads, "
                        "even where the client has begin_send_to_group")
    p.add_argument("--timeouts", type=float,
                   help="ack and start timeouts in seconds; default: the client's own")
    return p.parse_args(argv)


def mark(line):
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def wait_for_go(args):
    if args.go:
        sys.stdin.readline()


def emit(args, fields):
    mark(json.dumps({"driver": "python-" + args.client, "scenario": args.scenario, **fields}))


def percentile(sorted_values, q):
    if not sorted_values:
        return 0.0
    rank = -(-q * len(sorted_values) // 1)
    return sorted_values[min(max(int(rank), 1), len(sorted_values)) - 1]


def seq_result(latencies_us, elapsed, cpu_s):
    latencies_us.sort()
    n = len(latencies_us)
    return {
        "count": n,
        "seconds": elapsed,
        "rate": n / elapsed,
        "p50_us": percentile(latencies_us, 0.50),
        "p99_us": percentile(latencies_us, 0.99),
        "cpu_s": cpu_s,
    }


def ready_result(times_ms):
    times_ms.sort()
    n = len(times_ms)
    return {
        "count": n,
        "p50_ms": percentile(times_ms, 0.50),
        "p99_ms": percentile(times_ms, 0.99),
        "mean_ms": sum(times_ms) / max(n, 1),
    }


def pub_result(sent, acked, elapsed, cpu_s):
    return {"sent": sent, "acked": acked, "seconds": elapsed, "rate": sent / elapsed,
            "cpu_s": cpu_s}


def proc_status():
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "Threads"):
                fields[key] = int(rest.split()[0])
    return fields.get("VmRSS", 0), fields.get("Threads", 0)


def settled_status():
    """proc_status once the thread count is steady: threads of a just-joined connect pool
    may still be exiting. Bounded: at most 1 s."""
    last = proc_status()
    for _ in range(20):
        time.sleep(0.05)
        now = proc_status()
        if now[1] == last[1]:
            return now
        last = now
    return last


def idle_result(clients, before, mid, after, connect_seconds):
    marginal = max(clients - IDLE_MIDPOINT, 1)
    return {
        "clients": clients,
        "rss_before_kib": before[0],
        "rss_mid_kib": mid[0],
        "rss_after_kib": after[0],
        "threads_before": before[1],
        "threads_mid": mid[1],
        "threads_after": after[1],
        "rss_per_client_kib": max(after[0] - mid[0], 0) / marginal,
        "rss_total_per_client_kib": max(after[0] - before[0], 0) / max(clients, 1),
        "connect_seconds": connect_seconds,
    }


class Receipts:
    """What a subscriber has received; `record` may run on any thread."""

    def __init__(self, args):
        self.args = args
        self.first = None
        self.last = None
        self.count = 0
        self.bytes = 0
        self.full = threading.Event()

    def record(self, data):
        now = time.monotonic()
        if self.first is None:
            self.first = now
        self.last = now
        self.count += 1
        self.bytes += len(data)
        if self.count >= self.args.count:
            self.full.set()

    def done(self, deadline, sent):
        now = time.monotonic()
        if self.count >= self.args.count or now >= deadline:
            return True
        if sent.at is None:
            return False
        if sent.total is not None and self.count >= sent.total:
            return True
        quiet_from = sent.at if self.last is None else max(self.last, sent.at)
        return now - quiet_from >= self.args.idle_ms / 1000

    def poll_interval(self):
        return min(max(self.args.idle_ms, 1), 100) / 1000

    def result(self, cpu_start):
        span = (self.last - self.first) if self.first is not None else 0.0
        rate = (self.count - 1) / span if span > 0 else 0.0
        return {"received": self.count, "bytes": self.bytes, "seconds": span, "rate": rate,
                "cpu_s": time.process_time() - cpu_start}


class SentCount:
    """What run.py tells a subscriber on stdin once the publisher is done: how
    many messages it sent (EOF without a number: done, count unknown)."""

    def __init__(self):
        self.total = None
        self.at = None
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        line = sys.stdin.readline().strip()
        self.total = int(line) if line.isdigit() else None
        self.at = time.monotonic()


class Bench:
    """Scenario code shared by the sync and asyncio forms."""

    def __init__(self, args):
        self.args = args
        module, self.is_async = CLIENTS[args.client]
        pkg = importlib.import_module(module + (".aio" if self.is_async else ""))
        models = importlib.import_module(module + ".models")
        kwargs = {}
        if args.timeouts is not None:
            kwargs = {"ack_timeout": args.timeouts, "start_timeout": args.timeouts}
        self.client_class = functools.partial(pkg.WebPubSubClient, **kwargs)
        self.group_message = models.CallbackType.GROUP_MESSAGE
        data_type = models.WebPubSubDataType
        if args.binary:
            self.data_type = data_type.BINARY
            self.content = memoryview(bytes(i % 251 for i in range(args.size)))
        else:
            self.data_type = data_type.TEXT
            self.content = "x" * args.size

    def deadline(self):
        return time.monotonic() + self.args.seconds


class SyncBench(Bench):
    def seq(self):
        a = self.args
        client = self.client_class(a.url)
        client.open()
        latencies = []
        mark("START")
        cpu = time.process_time()
        start = time.monotonic()
        deadline = start + a.seconds
        for _ in range(a.count):
            t0 = time.monotonic()
            if t0 >= deadline:
                break
            client.send_to_group(a.group, self.content, self.data_type)
            latencies.append((time.monotonic() - t0) * 1e6)
        emit(a, seq_result(latencies, time.monotonic() - start, time.process_time() - cpu))
        client.close()

    def pub(self):
        a = self.args
        client = self.client_class(a.url)
        client.open()
        wait_for_go(a)
        mark("START")
        cpu = time.process_time()
        start = time.monotonic()
        deadline = start + a.seconds
        if a.window == 0:
            sent = 0
            while sent < a.count and time.monotonic() < deadline:
                client.send_to_group(a.group, self.content, self.data_type, ack=False)
                sent += 1
            acked = 0
        elif hasattr(client, "begin_send_to_group") and not a.threads:
            sent, acked = self.pub_futures(client, deadline)
        else:
            lock = threading.Lock()
            counts = {"sent": 0, "acked": 0}

            def worker():
                while True:
                    with lock:
                        if counts["sent"] >= a.count or time.monotonic() >= deadline:
                            return
                        counts["sent"] += 1
                    client.send_to_group(a.group, self.content, self.data_type)
                    with lock:
                        counts["acked"] += 1

            with ThreadPoolExecutor(a.window) as pool:
                for f in [pool.submit(worker) for _ in range(a.window)]:
                    f.result()
            sent, acked = counts["sent"], counts["acked"]
        elapsed = time.monotonic() - start
        client.close()  # CPU counted until everything queued is written and closed
        emit(a, pub_result(sent, acked, elapsed, time.process_time() - cpu))

    def pub_futures(self, client, deadline):
        """Keeps --window acked sends in flight from this thread: (sent, acked)."""
        a = self.args
        in_flight = collections.deque()
        sent = acked = 0
        while sent < a.count and time.monotonic() < deadline:
            if len(in_flight) >= a.window:
                in_flight.popleft().result()
                acked += 1
            in_flight.append(client.begin_send_to_group(a.group, self.content, self.data_type))
            sent += 1
        for future in in_flight:
            future.result()
            acked += 1
        return sent, acked

    def sub(self):
        a = self.args
        got = Receipts(a)
        client = self.client_class(a.url)
        client.subscribe(self.group_message, lambda e: got.record(e.data))
        client.open()
        client.join_group(a.group)
        sent = SentCount()
        mark("READY")
        cpu = time.process_time()
        deadline = self.deadline()
        while not got.done(deadline, sent):
            got.full.wait(got.poll_interval())
        emit(a, got.result(cpu))
        client.close()

    def ready(self):
        a = self.args
        times = []
        mark("START")
        deadline = self.deadline()
        for _ in range(a.count):
            if time.monotonic() >= deadline:
                break
            t0 = time.monotonic()
            arrived = threading.Event()
            client = self.client_class(a.url)
            client.subscribe(self.group_message, lambda _e, ev=arrived: ev.set())
            client.open()
            client.join_group(a.group)
            client.send_to_group(a.group, self.content, self.data_type)
            if not arrived.wait(30):
                raise TimeoutError("group message did not arrive within 30 s")
            times.append((time.monotonic() - t0) * 1e3)
            client.close()
            # released here, untimed, as the C and Rust drivers free theirs: rebinding
            # `client` in the next round would count this one's teardown in that round
            del client
        emit(a, ready_result(times))

    def idle(self):
        a = self.args
        before = proc_status()
        mark("START")
        start = time.monotonic()
        clients = []

        def open_one(_):
            c = self.client_class(a.url)
            c.open()
            return c

        first = min(a.clients, IDLE_MIDPOINT)
        with ThreadPoolExecutor(IDLE_CONNECT_PARALLEL) as pool:
            clients.extend(pool.map(open_one, range(first)))
        mid = settled_status()
        with ThreadPoolExecutor(IDLE_CONNECT_PARALLEL) as pool:
            clients.extend(pool.map(open_one, range(a.clients - first)))
        elapsed = time.monotonic() - start
        emit(a, idle_result(a.clients, before, mid, settled_status(), elapsed))


class AsyncBench(Bench):
    async def open(self, on_group_message=None):
        client = self.client_class(self.args.url)
        if on_group_message is not None:
            await client.subscribe(self.group_message, on_group_message)
        await client.open()
        return client

    async def seq(self):
        a = self.args
        client = await self.open()
        latencies = []
        mark("START")
        cpu = time.process_time()
        start = time.monotonic()
        deadline = start + a.seconds
        for _ in range(a.count):
            t0 = time.monotonic()
            if t0 >= deadline:
                break
            await client.send_to_group(a.group, self.content, self.data_type)
            latencies.append((time.monotonic() - t0) * 1e6)
        emit(a, seq_result(latencies, time.monotonic() - start, time.process_time() - cpu))
        await client.close()

    async def pub(self):
        a = self.args
        client = await self.open()
        wait_for_go(a)
        mark("START")
        cpu = time.process_time()
        start = time.monotonic()
        deadline = start + a.seconds
        if a.window == 0:
            sent = 0
            while sent < a.count and time.monotonic() < deadline:
                await client.send_to_group(a.group, self.content, self.data_type, ack=False)
                sent += 1
            acked = 0
        else:
            counts = {"sent": 0, "acked": 0}

            async def worker():
                while counts["sent"] < a.count and time.monotonic() < deadline:
                    counts["sent"] += 1
                    await client.send_to_group(a.group, self.content, self.data_type)
                    counts["acked"] += 1

            await asyncio.gather(*(worker() for _ in range(a.window)))
            sent, acked = counts["sent"], counts["acked"]
        elapsed = time.monotonic() - start
        await client.close()  # CPU counted until everything queued is written and closed
        emit(a, pub_result(sent, acked, elapsed, time.process_time() - cpu))

    async def sub(self):
        a = self.args
        got = Receipts(a)

        async def on_message(e):
            got.record(e.data)

        client = await self.open(on_message)
        await client.join_group(a.group)
        sent = SentCount()
        mark("READY")
        cpu = time.process_time()
        deadline = self.deadline()
        while not got.done(deadline, sent):
            await asyncio.sleep(got.poll_interval())
        emit(a, got.result(cpu))
        await client.close()

    async def ready(self):
        a = self.args
        times = []
        mark("START")
        deadline = self.deadline()
        for _ in range(a.count):
            if time.monotonic() >= deadline:
                break
            t0 = time.monotonic()
            arrived = asyncio.Event()

            async def on_message(_e, ev=arrived):
                ev.set()

            client = await self.open(on_message)
            await client.join_group(a.group)
            await client.send_to_group(a.group, self.content, self.data_type)
            await asyncio.wait_for(arrived.wait(), 30)
            times.append((time.monotonic() - t0) * 1e3)
            await client.close()
            del client  # untimed, as in the sync driver
        emit(a, ready_result(times))

    async def idle(self):
        a = self.args
        before = proc_status()
        mark("START")
        start = time.monotonic()
        clients = []
        limit = asyncio.Semaphore(IDLE_CONNECT_PARALLEL)

        async def open_one():
            async with limit:
                return await self.open()

        first = min(a.clients, IDLE_MIDPOINT)
        clients.extend(await asyncio.gather(*(open_one() for _ in range(first))))
        mid = proc_status()
        clients.extend(await asyncio.gather(*(open_one() for _ in range(a.clients - first))))
        elapsed = time.monotonic() - start
        emit(a, idle_result(a.clients, before, mid, proc_status(), elapsed))


def main(argv):
    args = parse_args(argv)
    bench = (AsyncBench if CLIENTS[args.client][1] else SyncBench)(args)
    run = getattr(bench, args.scenario)
    if bench.is_async:
        asyncio.run(run())
    else:
        run()
    if args.scenario == "idle":
        # Closing 1,000 clients one by one measures nothing; the result is out.
        sys.stdout.flush()
        os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1:])
