"""Time jumps: the client's or the service's process is stopped (SIGSTOP) and resumed
(SIGCONT), as a debugger or a shell's job control does. The monotonic clock runs on
meanwhile, so every timer of the stopped process is overdue when it resumes. (A machine's
suspend does not advance it on Linux: its timers just resume late.)

The client runs in a child interpreter, which prints what happens to it, one line each."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Dict, Iterator, List

import pytest
from conftest import WAIT, Emulator, Hub, Upstream, wait_until

PACKAGE_ROOT = Path(__file__).resolve().parents[1]

CHILD = """
    import sys, threading
    from webpubsub_client import WebPubSubClient
    client = WebPubSubClient(sys.argv[1], **eval(sys.argv[2]))
    client.subscribe("connected", lambda e: print("connected", flush=True))
    client.subscribe("disconnected", lambda e: print("disconnected", flush=True))
    client.open()
    client.join_group("g")
    print("ready", flush=True)

    def send():
        try:
            client.send_to_group("g", "hello", "text")
            print("sent", flush=True)
        except Exception as e:
            print("failed", type(e).__name__, e, flush=True)

    for line in sys.stdin:
        if line.strip() == "send":
            print("sending", flush=True)
            threading.Thread(target=send).start()
    client.close()
"""


class Child:
    """The child interpreter's client, connected to ``url`` with ``options``."""

    def __init__(self, url: str, options: Dict[str, object]) -> None:
        env = {**os.environ, "PYTHONPATH": str(PACKAGE_ROOT)}
        self.process = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(CHILD), url, repr(options)],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        with self.process.stdout:
            for line in self.process.stdout:
                self.lines.put(line.strip())

    def next_line(self) -> str:
        return self.lines.get(timeout=WAIT)

    def tell(self, command: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()

    def close(self) -> List[str]:
        """Ends the child (it closes its client); what it printed meanwhile."""
        assert self.process.stdin is not None
        self.process.send_signal(signal.SIGCONT)
        self.process.stdin.close()
        try:
            assert self.process.wait(timeout=WAIT) == 0
        finally:
            self.process.kill()
        self._reader.join(timeout=WAIT)
        rest = []
        while not self.lines.empty():
            rest.append(self.lines.get())
        return rest


def stop(process: subprocess.Popen[str]) -> None:
    """Stops ``process`` (SIGSTOP), returning once every thread of it has stopped."""
    process.send_signal(signal.SIGSTOP)
    tasks = Path(f"/proc/{process.pid}/task")
    wait_until(
        lambda: all((task / "stat").read_text().rsplit(")", 1)[1].split()[0] == "T" for task in tasks.iterdir()),
        what="the process stopped",
    )


@pytest.fixture
def service(upstream: Upstream) -> Iterator[Emulator]:
    """An emulator of the test's own, which it may stop."""
    emulator = Emulator(upstream.url)
    yield emulator
    emulator.process.send_signal(signal.SIGCONT)
    emulator.close()


def test_an_ack_that_came_while_the_client_was_stopped_wins_over_its_timeout(service: Emulator) -> None:
    """The client sends; the service acks while the client's process is stopped, for longer
    than the ack timeout and the keep-alive timeout. Resumed, the client reads the ack it
    holds before acting on its overdue timers: the send succeeds, and the connection is
    kept (the ack ends the silence). Before, the timers acted first, as the runtime woke
    the task for them before it saw the socket readable: the send failed with a timeout
    although the service had processed it, and the connection was closed as silent (with
    the JSON protocol, its session lost)."""
    options = dict(
        protocol_type="json.webpubsub.azure.v1",
        ack_timeout=1.0,
        message_retry_total=0,
        keep_alive_interval=0.5,
        keep_alive_timeout=1.5,
    )
    child = Child(Hub(service).url(), options)
    try:
        assert [child.next_line(), child.next_line()] == ["connected", "ready"]
        stop(service.process)
        child.tell("send")
        assert child.next_line() == "sending"
        time.sleep(0.3)  # the frame is written, into the stopped service's socket
        stop(child.process)
        service.process.send_signal(signal.SIGCONT)
        time.sleep(2.0)  # the stop: the ack arrives, both timeouts pass
        child.process.send_signal(signal.SIGCONT)
        assert child.next_line() == "sent"
    finally:
        rest = child.close()
    assert rest == ["disconnected"]  # the close's, the only one
