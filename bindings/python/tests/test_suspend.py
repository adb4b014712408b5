"""Time jumps: the client's or the service's process is stopped (SIGSTOP) and resumed
(SIGCONT), as a debugger or a shell's job control does. The monotonic clock runs on
meanwhile, so every timer of the stopped process is overdue when it resumes. (A machine's
suspend does not advance it on Linux: its timers just resume late.)

The client runs in a child interpreter, which prints what happens to it, one line each."""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Callable, Dict, Iterator, List

import pytest
from conftest import WAIT, Emulator, Hub, Upstream, wait_until

PACKAGE_ROOT = Path(__file__).resolve().parents[1]

CHILD = """
    import sys, threading
    from webpubsub_client import WebPubSubClient
    client = WebPubSubClient(sys.argv[1], **eval(sys.argv[2]))
    printing = threading.Lock()

    def say(*words):
        with printing:  # one line at a time: print writes each word on its own
            print(*words, flush=True)

    connected = threading.Event()

    def on_connected(e):
        say("connected")
        connected.set()

    client.subscribe("connected", on_connected)
    client.subscribe("disconnected", lambda e: say("disconnected"))

    def run(command):
        try:
            if command == "open":
                client.open()
                connected.wait()  # its line first: the event comes on a thread of its own
                client.join_group("g")
            elif command == "send":
                client.send_to_group("g", "hello", "text")
            elif command == "flood":  # 12 MB, more than the sockets' buffers hold
                for _ in range(24):
                    client.send_to_group("nobody", "x" * 500_000, "text", ack=False)
            say("done", command)
        except Exception as e:
            say("failed", command, type(e).__name__, e)

    for line in sys.stdin:
        say("running", line.strip())
        threading.Thread(target=run, args=(line.strip(),)).start()
    client.close()
"""


class Child:
    """The child interpreter's client, for ``url`` with ``options``; each command told
    (``open``, ``send``, ``flood``) runs on a thread of its own."""

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
        """Has the child run ``command``, which it says it does."""
        assert self.process.stdin is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        assert self.next_line() == f"running {command}"

    def expect(self, *lines: str) -> None:
        """The child prints ``lines`` next, in that order."""
        assert [self.next_line() for _ in lines] == list(lines)

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


def overdue_on_resume(child: Child, service: Emulator, meanwhile: Callable[[], None] = lambda: None) -> None:
    """Stops the client's process and resumes the service's for 2 s, past every timeout of
    the client (the service answers meanwhile, and ``meanwhile`` runs), then resumes the
    client."""
    stop(child.process)
    service.process.send_signal(signal.SIGCONT)
    meanwhile()
    time.sleep(2.0)
    child.process.send_signal(signal.SIGCONT)


class Relay:
    """A TCP relay on loopback to the service's ``port``, whose connections it can cut."""

    def __init__(self, port: int) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._target = port
        self._sockets: List[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with self._listener:
            while True:
                try:
                    client, _ = self._listener.accept()
                except OSError:  # closed
                    return
                service = socket.create_connection(("127.0.0.1", self._target))
                with self._lock:
                    self._sockets += [client, service]
                for source, sink in ((client, service), (service, client)):
                    threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
            sink.shutdown(socket.SHUT_WR)
        except OSError:  # cut
            pass

    def cut(self) -> None:
        """Ends every connection relayed so far, on both sides, as a network failure may."""
        # The client reconnects through the relay at once: not one of those is cut.
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:  # the peer ended it already
                pass
            sock.close()

    def close(self) -> None:
        self._listener.close()
        self.cut()


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
        child.tell("open")
        child.expect("connected", "done open")
        stop(service.process)
        child.tell("send")
        time.sleep(0.3)  # the frame is written, into the stopped service's socket
        overdue_on_resume(child, service)
        child.expect("done send")
    finally:
        rest = child.close()
    assert rest == ["disconnected"]  # the close's, the only one


def test_a_connected_frame_that_came_while_the_client_was_stopped_wins_over_the_start_timeout(
    service: Emulator,
) -> None:
    """The client opens towards a stopped service, and is stopped itself past its start
    timeout while the service answers. Resumed, it reads the connected frame it holds
    before failing the start: the start succeeds. Before, the start failed with its
    timeout although the connection was there."""
    url = Hub(service).url()
    stop(service.process)
    child = Child(url, dict(start_timeout=1.0))
    try:
        child.tell("open")
        time.sleep(0.3)  # the upgrade request is written, into the stopped service's socket
        overdue_on_resume(child, service)
        child.expect("connected", "done open")
    finally:
        rest = child.close()
    assert rest == ["disconnected"]  # the close's, the only one


def test_a_write_that_the_socket_took_while_the_client_was_stopped_wins_over_its_stall_limit(
    service: Emulator,
) -> None:
    """The client writes more than the socket's buffers hold to a stopped service, and is
    stopped itself past the write's stall limit (the keep-alive timeout) while the service
    reads it all. Resumed, it writes on before failing the write: the connection is kept.
    Before, the stall limit closed it ("no write went through"; with the JSON protocol,
    its session lost). The service sends the client a message meanwhile: the pings queued
    behind the write went out late, so without it the silence timeout would close the
    connection too."""
    options = dict(
        protocol_type="json.webpubsub.azure.v1",
        keep_alive_interval=0.5,
        keep_alive_timeout=1.5,
    )
    hub = Hub(service)
    child = Child(hub.url(), options)
    try:
        child.tell("open")
        child.expect("connected", "done open")
        stop(service.process)
        child.tell("flood")
        time.sleep(0.5)  # the socket's buffers fill up: a write waits
        overdue_on_resume(child, service, lambda: hub.service.send_to_group("g", "hi", content_type="text/plain"))
        child.expect("done flood")
        child.tell("send")
        child.expect("done send")
    finally:
        rest = child.close()
    assert rest == ["disconnected"]  # the close's, the only one


def test_a_recovery_answered_while_the_client_was_stopped_wins_over_its_attempt_timeout(
    service: Emulator,
) -> None:
    """The connection is cut while the service is stopped, and the client's recovery
    attempt waits for its upgrade answer; the client is then stopped past the attempt's
    timeout and the recovery window while the service answers. Resumed, it reads the
    answer before failing the attempt: the connection is recovered. Before, the attempt
    timed out and, the window over, the session was lost (``disconnected``)."""
    relay = Relay(service.port)
    url = Hub(service).url().replace(f":{service.port}/", f":{relay.port}/", 1)
    child = Child(url, dict(start_timeout=1.0, recovery_timeout=1.5))
    try:
        child.tell("open")
        child.expect("connected", "done open")
        stop(service.process)
        relay.cut()
        time.sleep(0.3)  # the client's recovery attempt waits for the stopped service
        overdue_on_resume(child, service)
        child.tell("send")
        child.expect("done send")
    finally:
        rest = child.close()
        relay.close()
    assert rest == ["disconnected"]  # the close's, the only one
