#!/usr/bin/env python3
"""Benchmark orchestrator: every client side by side against one local emulator.

    python3 benches/run.py --quick      # about 3 minutes
    python3 benches/run.py              # full mode: 5 s runs, 3 repeats, median (~20 min)

The Python contenders run in the venv .venv (made with the interpreter that runs this
script); WPS_BENCH_VENV names another, e.g. to measure them on another Python:
`WPS_BENCH_VENV=.venv-bench-3.13 python3.13 benches/run.py --quick`.

It builds what it needs (emulator, drivers), starts `webpubsub-emulator --port 0`
on 127.0.0.1, mints client URLs with the official server SDK, runs each
contender's driver for each scenario in turn, samples the emulator's CPU from
/proc while each one runs, and writes benches/BENCHMARKS.md and benches/chart.png.
A contender that is asked for and cannot run makes the whole run exit non-zero.
"""

import argparse
import bisect
import datetime
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benches"
OUT = BENCH / "out"
ANALYSIS = BENCH / "analysis.md"  # what we changed, what it bought, why misses miss
VENV = ROOT / os.environ.get("WPS_BENCH_VENV", ".venv")
RELEASE = ROOT / "target" / "release"
HUB = "bench"
ROLES = ["webpubsub.joinLeaveGroup", "webpubsub.sendToGroup"]
CLK_TCK = os.sysconf("SC_CLK_TCK")
NPROC = os.cpu_count() or 1
SATURATED_THREAD_PCT = 90.0
MIN_CPU_WINDOW = 0.5  # seconds; shorter measurements get no emulator CPU figure
WINDOW = 100  # acked sends in flight in the pipelined scenarios
OFFICIAL_SYNC_TIMEOUTS = 5.0
# The service keeps at most 1,000 unacknowledged frames / 16 MB per connection and
# closes it past that. Clients that acknowledge sequence ids once a second (the official
# clients) or every 300 (ours and the raw floor, at 64 KiB) overflow that at benchmark
# rates, so the limits are raised to measure throughput rather than that cut-off.
# --service-limits keeps the defaults, to see that cut-off.
# A subscriber that reads more slowly than its publisher sends makes the emulator queue
# what it has not read yet, closed past 64 MiB: raised too.
RAISED_LIMITS = [
    "--max-unacked-frames", "10000000", "--max-unacked-bytes", str(8 * 2**30),
    "--max-outbound-bytes", str(8 * 2**30),
]
# Each socket's read buffer as tungstenite's default (the emulator's own is 8 KiB, for
# idle clients' memory): with 8 KiB the emulator reads a fast publisher's bursts in
# sixteen times the calls, and the floor's s2-ff fell from 678k-921k to 331k-377k msgs/s
# in quick runs alternated at 867398e.
EMULATOR_ARGS = ["--read-buffer-bytes", str(128 * 1024)]

# ---------------------------------------------------------------- scenarios


@dataclass
class Scenario:
    key: str
    title: str
    driver: str  # seq | pub | ready | idle  (pub runs with a sub in another process)
    args: dict
    quick: dict
    full: dict
    what: str

    @property
    def pair(self):
        return self.driver == "pub"


SCENARIOS = [
    Scenario(
        "s1", "1. Sequential acked send_to_group", "seq", {"size": 16},
        {"count": 20000, "seconds": 1}, {"count": 200000, "seconds": 5},
        "one client sends 16-byte text messages to a group, waiting for each ack "
        "before the next: messages/s and ack latency.",
    ),
    Scenario(
        "s2-ff", "2a. Pipelined publishing, fire-and-forget", "pub", {"size": 16, "window": 0},
        {"count": 200000, "seconds": 1}, {"count": 2000000, "seconds": 5},
        "a publisher sends 16-byte text messages without ackIds as fast as it can; "
        "a subscriber of the same kind in another process counts them: "
        "messages/s delivered (first to last arrival).",
    ),
    Scenario(
        "s2-ack", f"2b. Pipelined publishing, {WINDOW} acks in flight", "pub",
        {"size": 16, "window": WINDOW},
        {"count": 200000, "seconds": 1}, {"count": 2000000, "seconds": 5},
        f"as 2a, but every message is acked and up to {WINDOW} are in flight "
        "(worker tasks/threads awaiting the ack): messages/s delivered.",
    ),
    Scenario(
        "s3", "3. Connect + join + first message", "ready", {"size": 16},
        {"count": 10, "seconds": 2}, {"count": 50, "seconds": 20},
        "a new client connects, joins a group, sends to it and waits for its own "
        "message to come back; repeated: time to ready.",
    ),
    Scenario(
        "s4", "4. 1,000 idle connected clients in one process", "idle", {"clients": 1000},
        {"seconds": 60}, {"seconds": 120},
        "VmRSS and Threads from /proc/self/status before any client, after 100 and "
        "after 1,000 connected clients; KiB per client is the growth from 100 to "
        "1,000 divided by 900.",
    ),
    Scenario(
        "s5-1k", f"5a. 1 KiB binary payloads, {WINDOW} acks in flight", "pub",
        {"size": 1024, "binary": True, "window": WINDOW},
        {"count": 100000, "seconds": 1}, {"count": 1000000, "seconds": 5},
        "as 2b with 1 KiB binary payloads (base64 on the wire): messages/s and MiB/s delivered.",
    ),
    Scenario(
        "s5-64k", f"5b. 64 KiB binary payloads, {WINDOW} acks in flight", "pub",
        {"size": 65536, "binary": True, "window": WINDOW},
        {"count": 10000, "seconds": 1}, {"count": 100000, "seconds": 5},
        "as 2b with 64 KiB binary payloads: messages/s and MiB/s delivered.",
    ),
]
SCENARIO_KEYS = [s.key for s in SCENARIOS]
THROUGHPUT = ["s1", "s2-ff", "s2-ack"]  # the scenarios the throughput targets speak of

# ---------------------------------------------------------------- contenders


@dataclass
class Contender:
    key: str
    label: str
    ours: bool
    style: str  # "sync" or "async": which official Python client it is compared with
    argv: list
    env: dict = field(default_factory=dict)
    missing: str = ""  # why it cannot run; empty when it can
    scenarios: tuple = ()  # the scenarios it runs; empty: all of them

    def runs(self, scn_key):
        return not self.scenarios or scn_key in self.scenarios


def py_driver(client):
    return [str(VENV / "bin" / "python"), str(BENCH / "python" / "driver.py"), "--client", client]


def make_contenders():
    binding = ROOT / "bindings" / "python"
    py_env = {"PYTHONPATH": str(binding),
              "WEBPUBSUB_CLIENT_LIB": str(RELEASE / "libwebpubsub_client.so")}
    cs = [
        Contender("raw", "raw WebSocket floor", False, "async", [str(RELEASE / "bench-raw")]),
        Contender("rust", "ours: Rust API", True, "async", [str(RELEASE / "bench-rust")]),
        Contender("c", "ours: C API", True, "sync", [str(OUT / "bench-c")]),
        Contender("py", "ours: Python sync", True, "sync", py_driver("ours"), py_env),
        Contender("py-aio", "ours: Python asyncio", True, "async", py_driver("ours-aio"), py_env),
        # The sync binding publishes its pipelined acked sends from one thread, through
        # `begin_send_to_group` futures; this one sends as the official sync client must,
        # a blocking send on each of WINDOW threads.
        Contender("py-threads", f"ours: Python sync, {WINDOW} threads", True, "sync",
                  py_driver("ours") + ["--threads"], py_env, scenarios=("s2-ack",)),
        # Its default 30 s ack and start timeouts turn each lost wake-up (see BENCHMARKS.md)
        # into a 30 s stall; shorter ones keep runs bounded, and flatter it.
        Contender("py-official", "official Python 1.1.0 sync", False, "sync",
                  py_driver("official") + ["--timeouts", str(OFFICIAL_SYNC_TIMEOUTS)]),
        Contender("py-official-aio", "official Python 1.1.0 asyncio", False, "async",
                  py_driver("official-aio")),
        Contender("js-official", "official JS 1.1.0 (Node)", False, "async",
                  ["node", str(BENCH / "node" / "driver.mjs")]),
    ]
    return {c.key: c for c in cs}


def check_contender(c):
    """Sets c.missing when the contender cannot run here."""
    if c.key in ("raw", "rust", "c") and not Path(c.argv[0]).exists():
        c.missing = f"{Path(c.argv[0]).relative_to(ROOT)} missing (run without --no-build to build it)"
    elif c.key in ("py", "py-threads", "py-aio", "py-official", "py-official-aio"):
        module = {"py": "webpubsub_client", "py-threads": "webpubsub_client",
                  "py-aio": "webpubsub_client.aio",
                  "py-official": "azure.messaging.webpubsubclient",
                  "py-official-aio": "azure.messaging.webpubsubclient.aio"}[c.key]
        probe = subprocess.run([c.argv[0], "-c", f"import {module}"], env={**os.environ, **c.env},
                               capture_output=True, text=True, timeout=60)
        if probe.returncode != 0:
            last = (probe.stderr.strip().splitlines() or ["?"])[-1]
            c.missing = f"cannot import {module}: {last}"
    elif c.key == "js-official":
        if not (BENCH / "node" / "node_modules" / "@azure" / "web-pubsub-client").exists():
            c.missing = "benches/node/node_modules missing (npm ci failed?)"
        elif shutil.which("node") is None:
            c.missing = "node not found"


# ---------------------------------------------------------------- setup


def sh(cmd, **kw):
    print("+", " ".join(shlex.quote(str(x)) for x in cmd), flush=True)
    subprocess.run([str(x) for x in cmd], check=True, **kw)


def ensure_venv():
    """Creates .venv with the pinned requirements and re-runs this script in it."""
    req = BENCH / "python" / "requirements.txt"
    stamp = VENV / ".bench-requirements"
    if not (VENV / "bin" / "python").exists():
        sh([sys.executable, "-m", "venv", VENV])
    if not stamp.exists() or stamp.read_text() != req.read_text():
        sh([VENV / "bin" / "python", "-m", "pip", "install", "-q", "-r", req])
        stamp.write_text(req.read_text())
    if Path(sys.prefix).resolve() != VENV.resolve():
        py = VENV / "bin" / "python"
        os.execv(str(py), [str(py), str(Path(__file__).resolve()), *sys.argv[1:]])


def build(want):
    # bufferutil: ws's native frame masking, which ws documents for speed (without it
    # ws masks in JavaScript on this Node). Its absence means node_modules predates it.
    if not (BENCH / "node" / "node_modules" / "bufferutil").exists() and "js-official" in want:
        sh(["npm", "ci", "--no-audit", "--no-fund"], cwd=BENCH / "node")
    crates = ["-p", "webpubsub-emulator", "-p", "webpubsub-bench"]
    if {"c", "py", "py-threads", "py-aio"} & set(want):
        crates += ["-p", "webpubsub-client"]
    sh(["cargo", "build", "--release", *crates], cwd=ROOT)
    header = ROOT / "include" / "webpubsub_client.h"
    lib = RELEASE / "libwebpubsub_client.so"
    if "c" in want and header.exists() and lib.exists():
        OUT.mkdir(parents=True, exist_ok=True)
        sh(["cc", "-O2", "-Wall", "-Wextra", "-Werror", "-o", OUT / "bench-c",
            BENCH / "c" / "driver.c", f"-I{ROOT / 'include'}", f"-L{RELEASE}",
            f"-Wl,-rpath,{RELEASE}", "-lwebpubsub_client", "-lpthread"])


# ---------------------------------------------------------------- emulator


class Emulator:
    """The emulator process plus a thread sampling its CPU time every 50 ms."""

    def __init__(self, exe, extra_args, log_path):
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen([str(exe), "--port", "0", *extra_args], stdout=subprocess.PIPE,
                                     stderr=self.log, text=True)
        line = read_line_within(self.proc.stdout, 30)
        m = re.match(r"Endpoint=http://127\.0\.0\.1;Port=(\d+);AccessKey=[^;]+;Version=1\.0;$",
                     (line or "").strip())
        if not m:
            self.stop()
            raise SystemExit(f"emulator did not print a connection string (got {line!r})")
        self.connection_string = line.strip()
        self.port = int(m.group(1))
        self.samples = []  # (monotonic, total ticks, {tid: ticks})
        self.running = True
        self.sampler = threading.Thread(target=self._sample, daemon=True)
        self.sampler.start()

    def _sample(self):
        while self.running:
            t = time.monotonic()
            per = {}
            try:
                for tid in os.listdir(f"/proc/{self.proc.pid}/task"):
                    per[tid] = stat_ticks(f"/proc/{self.proc.pid}/task/{tid}/stat")
                total = stat_ticks(f"/proc/{self.proc.pid}/stat")
            except OSError:
                return
            self.samples.append((t, total, per))
            time.sleep(0.05)

    def cpu(self, a, b):
        """Emulator CPU between monotonic times a and b: total % of one core,
        hottest thread %, and whether it was saturated."""
        s = self.samples
        if b - a < MIN_CPU_WINDOW or len(s) < 2:  # too short for 10 ms CPU ticks
            return {"cpu_pct": None, "hot_thread_pct": None, "saturated": False}
        times = [x[0] for x in s]
        i = max(bisect.bisect_right(times, a) - 1, 0)
        j = min(bisect.bisect_left(times, b), len(s) - 1)
        if j <= i:
            j = min(i + 1, len(s) - 1)
        span = s[j][0] - s[i][0]
        total = (s[j][1] - s[i][1]) / CLK_TCK / span * 100
        hot = max(((s[j][2].get(t, v) - v) for t, v in s[i][2].items()), default=0)
        hot = hot / CLK_TCK / span * 100
        saturated = hot >= SATURATED_THREAD_PCT or total >= SATURATED_THREAD_PCT * NPROC
        return {"cpu_pct": round(total, 1), "hot_thread_pct": round(hot, 1), "saturated": saturated}

    def client_url(self):
        from azure.messaging.webpubsubservice import WebPubSubServiceClient

        svc = WebPubSubServiceClient.from_connection_string(self.connection_string, hub=HUB)
        return svc.get_client_access_token(roles=ROLES, minutes_to_expire=24 * 60)["url"]

    def stop(self):
        self.running = False
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def stat_ticks(path):
    with open(path) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def read_line_within(stream, seconds):
    box = []
    t = threading.Thread(target=lambda: box.append(stream.readline()), daemon=True)
    t.start()
    t.join(seconds)
    return box[0] if box else None


# ---------------------------------------------------------------- driver runs


class Driver:
    """One driver process; a thread records when each stdout line arrived."""

    def __init__(self, argv, env, log_path, stdin=subprocess.DEVNULL):
        self.argv = argv
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(argv, stdin=stdin, stdout=subprocess.PIPE, stderr=self.log,
                                     text=True, env={**os.environ, **env}, cwd=ROOT)
        self.lines = []  # (monotonic, text)
        self.cond = threading.Condition()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.proc.stdout:
            with self.cond:
                self.lines.append((time.monotonic(), line.strip()))
                self.cond.notify_all()
        with self.cond:
            self.lines.append((time.monotonic(), None))
            self.cond.notify_all()

    def wait_line(self, predicate, timeout):
        """The (time, text) of the first line matching predicate, or None on EOF/timeout."""
        end = time.monotonic() + timeout
        with self.cond:
            while True:
                for t, text in self.lines:
                    if text is None:
                        return None
                    if predicate(text):
                        return t, text
                left = end - time.monotonic()
                if left <= 0:
                    return None
                self.cond.wait(left)

    def finish(self, timeout):
        """Waits for exit (killing it past timeout); returns (result dict, error)."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            self.reader.join(5)
            self.log.close()
            return None, f"timed out after {timeout:.0f} s"
        self.reader.join(5)
        self.log.close()
        result = self.result()
        if self.proc.returncode != 0 or result is None:
            tail = Path(self.log.name).read_text().strip().splitlines()[-3:]
            return None, f"exit {self.proc.returncode}: {' | '.join(tail) or 'no result line'}"
        return result[1], None

    def result(self):
        found = self.wait_line(lambda s: s.startswith("{"), 0)
        return (found[0], json.loads(found[1])) if found else None

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def driver_args(scn, params, role=None):
    a = {**scn.args, **params}
    out = [role or scn.driver]
    for k, v in a.items():
        if k == "binary":
            if v:
                out.append("--binary")
        else:
            out += [f"--{k.replace('_', '-')}", str(v)]
    return out


def run_one(emu, url, c, scn, params, tag):
    """Runs contender c once on scenario scn; returns a record."""
    rec = {"contender": c.key, "scenario": scn.key}
    log = OUT / "logs" / f"{tag}-{scn.key}-{c.key}"
    common = ["--url", url, "--group", f"g-{tag}-{scn.key}-{c.key}"]
    if not scn.pair:
        d = Driver(c.argv + driver_args(scn, params) + common, c.env, f"{log}.log")
        limit = params["seconds"] + 120
        start = d.wait_line(lambda s: s == "START", 60)
        result, err = d.finish(limit)
        if err:
            rec["error"] = err
            return rec
        rec["result"] = result
        t_end = d.result()[0]
        rec["emulator"] = emu.cpu(start[0] if start else t_end, t_end)
        return rec
    drain = 10 if params["seconds"] < 5 else 60  # for the subscriber to catch up
    sub_params = {**params, "seconds": params["seconds"] + drain, "idle_ms": 500}
    sub_params.pop("window", None)
    sub = Driver(c.argv + driver_args(scn, sub_params, "sub") + common, c.env, f"{log}-sub.log",
                 stdin=subprocess.PIPE)
    # The publisher starts at once too, connects, and waits for GO on stdin.
    pub = Driver(c.argv + driver_args(scn, params) + common + ["--go"], c.env,
                 f"{log}-pub.log", stdin=subprocess.PIPE)
    if not sub.wait_line(lambda s: s == "READY", 60):
        for d in (sub, pub):
            d.kill()
        _, err = sub.finish(1)
        pub.finish(1)
        rec["error"] = f"subscriber never ready ({err})"
        return rec
    try:
        pub.proc.stdin.write("GO\n")
        pub.proc.stdin.close()
    except OSError:
        pass  # the publisher died; finish() reports why
    start = pub.wait_line(lambda s: s == "START", 60)
    pub_result, err = pub.finish(params["seconds"] + 120)
    if err:
        sub.kill()
        sub.finish(1)
        rec["error"] = f"publisher: {err}"
        return rec
    try:  # the subscriber stops once this many arrived (or after idle_ms of quiet)
        sub.proc.stdin.write(f"{pub_result['sent']}\n")
        sub.proc.stdin.close()
    except OSError:
        pass  # the subscriber died; finish() reports why
    sub_result, err = sub.finish(sub_params["seconds"] + 60)
    if err:
        rec["error"] = f"subscriber: {err}"
        return rec
    rec["result"] = sub_result
    rec["pub"] = pub_result
    t_end = sub.result()[0]
    if sub_result["received"] < pub_result["sent"]:
        t_end -= 0.5  # the subscriber waited idle_ms after the last message
    t_start = start[0] if start else pub.result()[0] - pub_result["seconds"]
    rec["emulator"] = emu.cpu(t_start, t_end)
    return rec


# ---------------------------------------------------------------- metrics


def primary(scn_key, res):
    """(value, higher_is_better) of a result: the figure ratios are taken on."""
    if scn_key == "s3":
        return res["p50_ms"], False
    if scn_key == "s4":
        return res["rss_per_client_kib"], False
    return res["rate"], True


def cpu_per_msg_us(rec):
    """Client CPU µs per message: the sender's, plus the subscriber's in 2 and 5."""
    res = rec["result"]
    if "pub" in rec:
        n = res["received"]
        cpu = rec["pub"].get("cpu_s", 0) + res.get("cpu_s", 0)
    else:
        n = res.get("count", 0)
        cpu = res.get("cpu_s", 0)
    return cpu / n * 1e6 if n and cpu else None


def speed_ratio(scn_key, mine, other):
    """How many times better `mine` is than `other` (>1 = better)."""
    a, hi = primary(scn_key, mine)
    b, _ = primary(scn_key, other)
    if hi:
        return a / b if b > 0 else None
    return b / a if a > 0 else None


def median_record(records, scn_key):
    """The median run of a cell by its primary figure, with every run's figure kept beside it
    (`repeat_figures`, in run order; None for a failed run) and the failed runs' errors
    (`failed_runs`). Of an even number of good runs (one of three failed), the worse middle one."""
    ok = [r for r in records if "result" in r]
    if not ok:
        return records[-1]

    def worst_first(r):
        value, higher_is_better = primary(scn_key, r["result"])
        return value if higher_is_better else -value

    ok.sort(key=worst_first)
    rec = dict(ok[(len(ok) - 1) // 2])
    rec["repeat_figures"] = [primary(scn_key, r["result"])[0] if "result" in r else None for r in records]
    failed = [r["error"] for r in records if "result" not in r]
    if failed:
        rec["failed_runs"] = failed
    return rec


def official_py_for(c):
    return "py-official" if c.style == "sync" else "py-official-aio"


def fmt_num(v, digits=0):
    if v is None:
        return "–"
    if digits == 0 and abs(v) < 100:
        return f"{v:.3g}"
    return f"{v:,.{digits}f}"


def fmt_ratio(r):
    if r is None:
        return "–"
    return f"{r:,.0f}×" if r >= 100 else f"{r:.2f}×"


def fmt_pct(r):
    return "–" if r is None else f"{100 * r:.0f}%"


# ---------------------------------------------------------------- report


def targets(results, contenders):
    """[(target, contender, {scenario: (figure, met)})] as the issue states them;
    met is None where it was not measured."""
    out = []

    def get(ck, sk):
        r = results.get((ck, sk))
        return r["result"] if r and "result" in r else None

    def ratio_row(name, ck, other_of, fmt, goal):
        cells = {}
        for sk in THROUGHPUT:
            mine, other = get(ck, sk), get(other_of, sk)
            r = speed_ratio(sk, mine, other) if mine and other else None
            fig = fmt(r)
            if sk == "s1" and r is not None and mine["p50_us"] > 0:
                # msgs/s hides stalls and outliers; the median ack latency shows the common case
                fig += f" (p50 latency {other['p50_us'] / mine['p50_us']:.1f}×)"
            floor = get("raw", sk)
            bound = speed_ratio(sk, floor, other) if other_of != "raw" and floor and other else None
            if r is not None and r < goal and bound is not None and bound < goal:
                # no client can beat the bare socket, so the goal is out of reach here
                fig += f"; unreachable: the raw floor itself is {fmt_ratio(bound)}"
            cells[sk] = (fig, None if r is None else r >= goal)
        out.append((name, ck, cells))

    for ck in ("py", "py-aio"):
        off = official_py_for(contenders[ck])
        ratio_row(f"≥ 10× {contenders[off].label}, msgs/s", ck, off, fmt_ratio, 10)
    for ck in ("rust", "c"):
        ratio_row("≥ 3× official JS, msgs/s", ck, "js-official", fmt_ratio, 3)
    for ck in ("rust", "c", "py", "py-aio"):
        ratio_row("within 20% of the raw floor (≥ 80% of its msgs/s)", ck, "raw", fmt_pct, 0.8)
    for ck in ("rust", "c", "py", "py-aio"):
        res = get(ck, "s4")
        if res is None:
            out.append(("≤ 64 KiB RSS per idle client", ck, {"s4": ("–", None)}))
            out.append(("threads do not grow with clients", ck, {"s4": ("–", None)}))
            continue
        kib = res["rss_per_client_kib"]
        out.append(("≤ 64 KiB RSS per idle client", ck, {"s4": (f"{kib:.1f} KiB", kib <= 64)}))
        grow = res["threads_after"] - res["threads_mid"]
        fig = (f"{res['threads_mid']} → {res['threads_after']} threads "
               f"(100 → {res['clients']:,} clients)")
        out.append(("threads do not grow with clients", ck, {"s4": (fig, grow <= 2)}))
    return out


def met_word(met):
    return {True: "met", False: "**MISSED**", None: "not measured"}[met]


def scenario_table(scn, results, contenders, order):
    lines = []
    if scn.key == "s1":
        head = ["msgs/s", "p50 ack µs", "p99 ack µs", "client CPU µs/msg"]
    elif scn.key == "s3":
        head = ["p50 ms", "p99 ms", "mean ms", "runs"]
    elif scn.key == "s4":
        head = ["KiB/client", "KiB/client incl. fixed", "threads at 0 / 100 / 1,000",
                "connect s"]
    elif scn.key.startswith("s5"):
        head = ["delivered msgs/s", "MiB/s", "published msgs/s", "lost", "client CPU µs/msg"]
    else:
        head = ["delivered msgs/s", "published msgs/s", "lost", "client CPU µs/msg"]
    head += ["vs raw floor", "vs official Py", "vs official JS", "emulator CPU (hottest thread)"]
    lines.append("| contender | " + " | ".join(head) + " |")
    lines.append("|---|" + "---:|" * len(head))
    floor = results.get(("raw", scn.key), {}).get("result")
    js = results.get(("js-official", scn.key), {}).get("result")
    for ck in order:
        c = contenders[ck]
        if not c.runs(scn.key):
            continue
        rec = results.get((ck, scn.key))
        name = f"**{c.label}**" if c.ours else c.label
        if rec is None or "result" not in rec:
            why = c.missing or (rec or {}).get("error", "not run")
            lines.append(f"| {name} | FAILED: {why} |" + " |" * (len(head) - 1))
            continue
        res = rec["result"]
        if scn.key == "s1":
            cells = [fmt_num(res["rate"]), fmt_num(res["p50_us"]), fmt_num(res["p99_us"]),
                     fmt_num(cpu_per_msg_us(rec), 1)]
        elif scn.key == "s3":
            cells = [fmt_num(res["p50_ms"], 1), fmt_num(res["p99_ms"], 1),
                     fmt_num(res["mean_ms"], 1), str(res["count"])]
        elif scn.key == "s4":
            cells = [fmt_num(res["rss_per_client_kib"], 1),
                     fmt_num(res["rss_total_per_client_kib"], 1),
                     f"{res['threads_before']} / {res['threads_mid']} / {res['threads_after']}",
                     fmt_num(res["connect_seconds"], 2)]
        else:
            lost = rec["pub"]["sent"] - res["received"]
            cells = [fmt_num(res["rate"])]
            if scn.key.startswith("s5"):
                cells.append(fmt_num(res["rate"] * scn.args["size"] / 2**20, 1))
            cells += [fmt_num(rec["pub"]["rate"]), str(lost), fmt_num(cpu_per_msg_us(rec), 1)]
        off = results.get((official_py_for(c), scn.key), {}).get("result")
        cells += [
            fmt_pct(speed_ratio(scn.key, res, floor)) if floor and ck != "raw" else "–",
            fmt_ratio(speed_ratio(scn.key, res, off)) if off and not ck.startswith("py-official") else "–",
            fmt_ratio(speed_ratio(scn.key, res, js)) if js and ck != "js-official" else "–",
        ]
        cells.append(emulator_cell(rec["emulator"]))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def emulator_cell(e):
    if e["cpu_pct"] is None:
        return "– (too short)"
    sat = " **SATURATED**" if e["saturated"] else ""
    return f"{e['cpu_pct']:.0f}% ({e['hot_thread_pct']:.0f}%){sat}"


def machine_info():
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kib = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal"):
                mem_kib = int(line.split()[1])
    return f"{cpu}, {NPROC} cores, {mem_kib / 2**20:.0f} GiB, Linux {platform.release()}"


def versions():
    def cmd(argv):
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout.strip()
        except OSError:
            return "?"

    from importlib.metadata import version

    def node_version(package):
        path = BENCH / "node" / "node_modules" / package / "package.json"
        return json.loads(path.read_text())["version"] if path.exists() else "absent"

    ours = re.search(r'^version\s*=\s*"([^"]+)"', (ROOT / "Cargo.toml").read_text(), re.M)
    return {
        "webpubsub-client (ours)": f"{ours.group(1) if ours else '?'} "
                                   f"(commit {cmd(['git', '-C', str(ROOT), 'rev-parse', '--short', 'HEAD'])})",
        "azure-messaging-webpubsubclient": version("azure-messaging-webpubsubclient"),
        "@azure/web-pubsub-client": node_version("@azure/web-pubsub-client"),
        "bufferutil (ws's native masking, for the JS client)": node_version("bufferutil"),
        "rustc": cmd(["rustc", "--version"]).removeprefix("rustc "),
        "python": platform.python_version(),
        "node": cmd(["node", "--version"]),
    }


def write_report(path, run, results, contenders, order):
    lines = [
        "# Benchmarks",
        "",
        "Every client of the Web PubSub client protocol side by side, against one local",
        "emulator on 127.0.0.1, in one run. Figures are ratios first: against the raw",
        "WebSocket floor (a bare tokio-tungstenite socket writing the same JSON frames, which no",
        "client can beat) and against each official client. Absolute numbers depend on the",
        "machine (and on whatever else it is doing), ratios much less.",
        "",
        "Regenerate (builds what it needs, writes this file and `chart.png`):",
        "",
        "```",
        "python3 benches/run.py --quick   # ~3 minutes, 1 run per cell",
        "python3 benches/run.py           # full: 5 s runs, median of 3 (about 20 minutes)",
        "python3 benches/run.py --quick --contenders raw,rust,js-official --scenarios s1,s2-ff",
        "python3 benches/run.py --render  # this file again from benches/out/results.json",
        "```",
        "",
        "## This run",
        "",
        f"- command: `{run['command']}` ({run['mode']} mode, {run['repeats']} run(s) per cell, "
        f"median shown)",
        f"- date: {run['date']}, duration {run['duration_s']:.0f} s",
        f"- machine: {run['machine']}; load average {run['load_before']} before, "
        f"{run['load_after']} after (the machine may be shared: compare ratios)",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in run["versions"].items()),
        f"- emulator: `webpubsub-emulator {run['emulator_args']}`",
        f"- protocol: `json.reliable.webpubsub.azure.v1` for every contender; tokens minted by "
        f"`azure-messaging-webpubsubservice` (roles {', '.join(ROLES)})",
        "",
    ]
    missing = [c for c in contenders.values() if c.key in order and c.missing]
    failed = [r for r in results.values() if "error" in r and not contenders[r["contender"]].missing]
    partial = [r for r in results.values() if r.get("failed_runs")]
    if missing or failed or partial:
        lines += ["## Not measured", ""]
        lines += [f"- **{c.label}** (`{c.key}`): {c.missing}" for c in missing]
        lines += [f"- **{contenders[r['contender']].label}** in {r['scenario']}: {r['error']}"
                  for r in failed]
        lines += [f"- **{contenders[r['contender']].label}** in {r['scenario']}: "
                  f"{len(r['failed_runs'])} of {len(r['repeat_figures'])} runs failed "
                  f"({r['failed_runs'][0]}); its figure is from the others"
                  for r in partial]
        lines.append("")
    saturated = [r for r in results.values() if r.get("emulator", {}).get("saturated")]
    lines += ["## Emulator load", ""]
    if saturated:
        lines.append(f"**THE EMULATOR SATURATED in {len(saturated)} run(s)**: there the figures "
                     "measure the emulator, not the client:")
        lines += [f"- {r['scenario']} / {r['contender']}: {r['emulator']['cpu_pct']:.0f}% CPU, "
                  f"hottest thread {r['emulator']['hot_thread_pct']:.0f}%" for r in saturated]
    else:
        lines.append(f"The emulator never saturated (no thread ≥ {SATURATED_THREAD_PCT:.0f}% "
                     f"of a core, total < {SATURATED_THREAD_PCT * NPROC:.0f}%). Its CPU use "
                     "during each measurement is the last column of every table "
                     "(% of one core; hottest thread in brackets).")
    cols = THROUGHPUT + ["s4"]
    lines += ["", "## Targets", "",
              "Reported, not asserted. Threads may grow by at most 2 between 100 and 1,000 "
              "clients (lazily started pool threads).", "",
              "| target | contender | " + " | ".join(cols) + " |",
              "|---|---|" + "---|" * len(cols)]
    for name, ck, cells in targets(results, contenders):
        row = [f"{cells[k][0]} {met_word(cells[k][1])}" if k in cells else "" for k in cols]
        lines.append(f"| {name} | {contenders[ck].label} | " + " | ".join(row) + " |")
    if ANALYSIS.exists():
        lines += ["", ANALYSIS.read_text().strip()]
    lines += ["", "## Results", "", "![chart](chart.png)", "",
              "Ratios: *vs raw floor* is the share of the floor's speed reached (100% = as "
              "fast as a bare socket); *vs official* columns say how many times better "
              "(faster, or less memory in 4) than that client, > 1× = better. Python "
              "contenders are compared with the official Python client of the same style "
              "(sync or asyncio), the C API with the sync one, the Rust API and the raw floor "
              "with the asyncio one. "
              "**Bold** rows are ours.", ""]
    for scn in SCENARIOS:
        if scn.key not in run["scenarios"]:
            continue
        lines += [f"### {scn.title} (`{scn.key}`)", "", scn.what[0].upper() + scn.what[1:], ""]
        lines += scenario_table(scn, results, contenders, order)
        lines.append("")
    lines += [
        "## Method",
        "",
        "- One emulator process (`target/release/webpubsub-emulator --port 0`) serves the whole "
        "run. Each contender runs each scenario in its own process(es), one after another, "
        "never two at once. In full mode the three repeats go round the contenders (one run "
        "of each, then the next round), so that a slower or faster spell of the shared "
        "machine does not hold all of one contender's runs. Scenarios 2 and 5 start a "
        "subscriber process, wait until it has joined, then start the publisher.",
        "- Every run is bounded in count and time; the figures are computed from what was "
        "achieved. Drivers print one JSON line; the raw logs and all records are kept in "
        "`benches/out/` (not committed).",
        "- Drivers: `benches/src/bin/bench-raw.rs` (floor), `benches/src/bin/bench-rust.rs` "
        "(Rust API), `benches/c/driver.c` (C API), `benches/python/driver.py` (the same code "
        "for the official Python client and ours, sync and asyncio: only the import differs), "
        "`benches/node/driver.mjs` (official JS client).",
        "- The raw floor runs on a single-threaded tokio runtime (socket, parsing and the "
        "driver's loop on one thread: no thread hand-off at all) and keeps tokio-tungstenite's "
        "default buffers (a 128 KiB read buffer per socket): it is a floor for speed, not for "
        "memory, so scenario 4 compares the clients with each other. It writes each frame "
        "from a borrowed struct and reads each into one (serde derive, no JSON tree), as a "
        "lean client would: its client CPU per message must stay below every client's.",
        "- The Rust API driver runs its work as a task on the library's runtime, as a tokio "
        "application would; the C driver makes blocking calls with the default dispatch mode "
        "(callbacks on the library's dispatcher thread), and its pipelined acked sends in poll "
        "mode (completions on its own thread, as an event loop runs them); the Python asyncio "
        "binding dispatches on the event loop and the sync binding on daemon threads of its "
        "own (both poll mode).",
        "- Pipelined acked sends: async clients run "
        f"{WINDOW} tasks each awaiting its ack; the official sync Python client {WINDOW} "
        "threads, each blocking in its send; our sync binding keeps "
        f"{WINDOW} `begin_send_to_group` futures outstanding from one thread (it waits for the "
        f"oldest before starting the next), and, as *ours: Python sync, {WINDOW} threads* in "
        "2b, also sends the official client's way; the C "
        f"driver keeps {WINDOW} asynchronous sends outstanding from one thread.",
        "- Emulator CPU: utime + stime of the emulator process and of each of its threads "
        "(`/proc/PID/task/*/stat`), sampled every 50 ms, over the measured window. A thread at "
        f"≥ {SATURATED_THREAD_PCT:.0f}% of a core (or the process at ≥ "
        f"{SATURATED_THREAD_PCT:.0f}% of all cores) marks the run **SATURATED**.",
        "- The client and the emulator share the machine's cores: a client that burns more "
        "CPU leaves less for the emulator, which is part of what is measured.",
        "- The service keeps at most 1,000 unacknowledged frames or 16 MB per connection for "
        "replay and closes the connection for good past that. Frames still in socket buffers "
        "count as unacknowledged, and clients acknowledge sequence ids once a second (the "
        "official clients; the JS client also at once when one message's id is more than 300 "
        "past the previous one's, which a steady stream never is; ours also once more than 300 "
        "arrived since its last acknowledgement) or every 300 (the raw floor): with "
        "`--service-limits`, every subscriber of scenarios 2 and 5 is cut off at "
        "these rates, the raw floor included. The emulator's limits are therefore raised (see "
        "the emulator line above) so that throughput is measured rather than that cut-off.",
        "",
        "## Notes on the official clients",
        "",
        "- `azure-messaging-webpubsubclient` 1.1.0, sync client: sending with an ack (and "
        "`open()`) writes the frame (or starts the reader thread) first and only then waits on "
        "a condition variable that the reader thread notifies. When the ack (or the "
        "`connected` frame) arrives in between, the notification is lost and the call waits "
        "out its whole timeout (30 s by default) although the ack is there. Against the "
        "emulator this hits a few percent of back-to-back sends and nearly always the first "
        "acked call after `open()`. It runs here with `ack_timeout` and `start_timeout` of "
        f"{OFFICIAL_SYNC_TIMEOUTS:g} s to keep runs bounded (shorter ones make its 64 KiB "
        "pipelined sends fail with ack timeouts), which flatters it; its p50 latency shows "
        "its speed when the race is not hit. Its asyncio client has no such race.",
        "- `@azure/web-pubsub-client` 1.1.0 declares `node >= 22`; it runs here on the "
        "machine's Node (see versions) without complaint, with the optional `bufferutil` "
        "addon that its WebSocket library (`ws`) recommends for speed: without it `ws` masks "
        "every outgoing frame in JavaScript (about 0.5 → 1.7 µs for a 16-byte message's "
        "frame, 10 → 260 µs for a 64 KiB one, on a busy host).",
        "",
    ]
    path.write_text("\n".join(lines))


def write_chart(path, results, contenders, order):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("s1", "1. sequential acked: msgs/s", lambda r: r["rate"], True),
        ("s2-ff", "2a. fire-and-forget delivered: msgs/s", lambda r: r["rate"], True),
        ("s2-ack", f"2b. {WINDOW} acks in flight delivered: msgs/s", lambda r: r["rate"], True),
        ("s5-1k", "5a. 1 KiB binary delivered: MiB/s", lambda r: r["rate"] / 1024, True),
        ("s5-64k", "5b. 64 KiB binary delivered: MiB/s", lambda r: r["rate"] / 16, True),
        ("s3", "3. time to ready p50: ms (lower is better)", lambda r: r["p50_ms"], False),
        ("s4", "4. RSS per idle client: KiB (lower is better)",
         lambda r: r["rss_per_client_kib"], False),
        ("s2-ack", "2b. client CPU per message: µs (lower better)",
         None, True),
    ]
    colors = {"raw": "#444444", "rust": "#c2410c", "c": "#1d4ed8", "py": "#15803d",
              "py-threads": "#166534",
              "py-aio": "#65a30d", "py-official": "#a3a3a3", "py-official-aio": "#d4d4d4",
              "js-official": "#facc15"}
    fig, axes = plt.subplots(2, 4, figsize=(18, 8.5))
    for ax, (sk, title, get, log) in zip(axes.flat, panels):
        names, vals, cols = [], [], []
        for ck in order:
            rec = results.get((ck, sk))
            if rec and "result" in rec:
                v = get(rec["result"]) if get else cpu_per_msg_us(rec)
                if v is None:
                    continue
                names.append(contenders[ck].label.replace("official ", "off. ").replace("ours: ", ""))
                vals.append(max(v, 1e-9))
                cols.append(colors[ck])
        ax.set_title(title, fontsize=10)
        if not vals:
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
            ax.set_axis_off()
            continue
        bars = ax.barh(names[::-1], vals[::-1], color=cols[::-1])
        if log and max(vals) / min(vals) > 20:
            ax.set_xscale("log")
        for b, v in zip(bars, vals[::-1]):
            label = f" {v:,.0f}" if v >= 1000 else f" {v:.3g}"
            ax.text(b.get_width(), b.get_y() + b.get_height() / 2, label, va="center", fontsize=8)
        ax.tick_params(axis="y", labelsize=8)
        ax.margins(x=0.25)
    fig.suptitle("webpubsub-client benchmarks (loopback, one local emulator). Ours: Rust (orange), "
                 "C (blue), Python (greens); raw floor (dark grey); official Python (greys), "
                 "JS (yellow)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=80)


# ---------------------------------------------------------------- main


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="short runs, one repeat (about 3 minutes)")
    p.add_argument("--contenders", default=",".join(make_contenders()),
                   help="comma-separated, from: " + ", ".join(make_contenders()))
    p.add_argument("--scenarios", default=",".join(SCENARIO_KEYS),
                   help="comma-separated, from: " + ", ".join(SCENARIO_KEYS))
    p.add_argument("--no-build", action="store_true", help="use what is already built")
    p.add_argument("--emulator", default=str(RELEASE / "webpubsub-emulator"),
                   help="emulator executable (default: the release build)")
    p.add_argument("--service-limits", action="store_true",
                   help="keep the emulator's replay limits (1,000 frames / 16 MB per connection)")
    p.add_argument("--report", default=str(BENCH / "BENCHMARKS.md"),
                   help="where to write the markdown (the chart goes beside it)")
    p.add_argument("--render", action="store_true",
                   help="measure nothing: write the report and chart again from the last run's "
                        "benches/out/results.json (after editing benches/analysis.md)")
    a = p.parse_args()
    a.contenders = [x for x in a.contenders.split(",") if x]
    a.scenarios = [x for x in a.scenarios.split(",") if x]
    bad = [x for x in a.contenders if x not in make_contenders()] + \
          [x for x in a.scenarios if x not in SCENARIO_KEYS]
    if bad:
        p.error(f"unknown: {', '.join(bad)}")
    return a


def render(args):
    """Writes the report and chart of the last run again, from its results.json."""
    saved = json.loads((OUT / "results.json").read_text())
    run, records = saved["run"], saved["records"]
    contenders = make_contenders()
    present = {r["contender"] for r in records}
    order = [k for k in contenders if k in present]
    results = {(r["contender"], r["scenario"]): r for r in records}
    write_outputs(Path(args.report), run, results, contenders, order, f"from {OUT / 'results.json'}")
    return 0


def write_outputs(report, run, results, contenders, order, how):
    """Writes the markdown report and the chart beside it; `how` ends the message."""
    report.parent.mkdir(parents=True, exist_ok=True)
    write_report(report, run, results, contenders, order)
    write_chart(report.with_name("chart.png"), results, contenders, order)
    print(f"\nwrote {report} and {report.with_name('chart.png')} {how}")


def main():
    args = parse_args()  # first: --help and bad arguments need no environment
    ensure_venv()
    if args.render:
        return render(args)
    started = time.monotonic()
    command = "python3 benches/run.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    if not args.no_build:
        build(args.contenders)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "logs").mkdir(exist_ok=True)
    contenders = make_contenders()
    order = [k for k in contenders if k in args.contenders]
    for ck in order:
        check_contender(contenders[ck])
        if contenders[ck].missing:
            print(f"\n!!! CONTENDER {ck} NOT AVAILABLE: {contenders[ck].missing}\n", flush=True)
    repeats = 1 if args.quick else 3
    emu_args = [*EMULATOR_ARGS, *([] if args.service_limits else RAISED_LIMITS)]
    run = {
        "command": command.strip(),
        "mode": "quick" if args.quick else "full",
        "repeats": repeats,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_info(),
        "load_before": open("/proc/loadavg").read().split()[0],
        "scenarios": args.scenarios,
        "emulator_args": " ".join(["--port", "0", *emu_args]),  # as Emulator starts it
    }
    emu = Emulator(args.emulator, emu_args, OUT / "logs" / "emulator.log")
    results = {}
    try:
        url = emu.client_url()
        print(f"emulator on port {emu.port}", flush=True)
        for scn in SCENARIOS:
            if scn.key not in args.scenarios:
                continue
            params = scn.quick if args.quick else scn.full
            runs = [ck for ck in order if contenders[ck].runs(scn.key)]
            present = [ck for ck in runs if not contenders[ck].missing]
            for ck in runs:
                if contenders[ck].missing:
                    results[(ck, scn.key)] = {"contender": ck, "scenario": scn.key,
                                              "error": contenders[ck].missing}
            # The repeats go round the contenders (one run of each, then the next round):
            # this shared machine drifts between faster and slower spells lasting minutes,
            # and a contender's repeats run back to back would all land in one of them.
            recs = {ck: [] for ck in present}
            wall = dict.fromkeys(present, 0.0)
            for i in range(repeats):
                for ck in present:
                    t0 = time.monotonic()
                    recs[ck].append(run_one(emu, url, contenders[ck], scn, params, f"r{i}"))
                    wall[ck] += time.monotonic() - t0
            for ck in present:
                rec = median_record(recs[ck], scn.key)
                rec["wall_s"] = round(wall[ck], 1)
                results[(ck, scn.key)] = rec
                print(progress_line(scn, contenders[ck], rec), flush=True)
    finally:
        emu.stop()
    run["duration_s"] = time.monotonic() - started
    run["load_after"] = open("/proc/loadavg").read().split()[0]
    run["versions"] = versions()
    (OUT / "results.json").write_text(json.dumps(
        {"run": run, "records": list(results.values())}, indent=1))
    write_outputs(Path(args.report), run, results, contenders, order, f"in {run['duration_s']:.0f} s")
    return summarize(results, contenders, order)


def progress_line(scn, c, rec):
    head = f"[{scn.key:6}] {c.key:16} {rec['wall_s']:5.1f}s"
    if "result" not in rec:
        return f"{head} FAILED: {rec['error']}"
    r = rec["result"]
    if scn.key == "s3":
        fig = f"p50 {r['p50_ms']:.1f} ms  p99 {r['p99_ms']:.1f} ms"
    elif scn.key == "s4":
        fig = (f"{r['rss_per_client_kib']:.1f} KiB/client, threads "
               f"{r['threads_before']}/{r['threads_mid']}/{r['threads_after']}")
    elif scn.key == "s1":
        fig = (f"{r['rate']:,.0f} msg/s  p50 {r['p50_us']:.0f} µs  p99 {r['p99_us']:.0f} µs"
               f"  cpu {cpu_per_msg_us(rec) or 0:.1f} µs/msg")
    else:
        fig = (f"{r['rate']:,.0f} msg/s delivered ({rec['pub']['sent'] - r['received']} lost)"
               f"  cpu {cpu_per_msg_us(rec) or 0:.1f} µs/msg")
    figures = rec.get("repeat_figures", [])
    if len(figures) > 1:
        fig += "  (runs: " + ", ".join("failed" if v is None else fmt_num(v) for v in figures) + ")"
    e = rec["emulator"]
    sat = "  <<< EMULATOR SATURATED" if e["saturated"] else ""
    return f"{head} {fig}   [emulator {emulator_cell(e)}]{sat}"


def summarize(results, contenders, order):
    bad = False
    saturated = [r for r in results.values() if r.get("emulator", {}).get("saturated")]
    if saturated:
        print("\n" + "!" * 78)
        print(f"!!! THE EMULATOR SATURATED in {len(saturated)} run(s): those figures measure the"
              " emulator, not the client")
        for r in saturated:
            print(f"!!!   {r['scenario']} / {r['contender']}: {r['emulator']['cpu_pct']:.0f}% cpu, "
                  f"hottest thread {r['emulator']['hot_thread_pct']:.0f}%")
        print("!" * 78)
    partial = [(r, e) for r in results.values() for e in r.get("failed_runs", [])]
    if partial:  # the cell has a figure from its other runs; the report names these too
        print(f"\n!!! {len(partial)} repeat(s) failed, left out of their cell's median:")
        for r, e in partial:
            print(f"!!!   {r['scenario']} / {r['contender']}: {e}")
    failed = [r for r in results.values() if "error" in r]
    if failed:
        bad = True
        print("\n" + "!" * 78)
        print(f"!!! {len(failed)} run(s) FAILED or could not run:")
        for r in failed:
            print(f"!!!   {r['scenario']} / {r['contender']}: {r['error']}")
        print("!" * 78)
    print("\ntargets:")
    for name, ck, cells in targets(results, contenders):
        if ck in order:
            for sk, (fig, met) in cells.items():
                state = {True: "met", False: "MISSED", None: "not measured"}[met]
                print(f"  {state:12} {name}: {ck} {sk} {fig}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
