"""Fixtures: the real emulator binary (port 0), an upstream event handler, tokens, test routes.

The emulator is found through ``$WPS_EMULATOR_BIN``, else the repository's
``target/debug/webpubsub-emulator``; a missing binary fails the run loudly.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import json
import os
import queue
import socket
import subprocess
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import pytest
from azure.messaging.webpubsubservice import WebPubSubServiceClient

REPO_ROOT = Path(__file__).resolve().parents[3]
# Test the debug build of this checkout unless told otherwise (a stale release build in
# target/ would otherwise win the loader's search order).
_DEBUG_LIB = REPO_ROOT / "target" / "debug" / "libwebpubsub_client.so"
if "WEBPUBSUB_CLIENT_LIB" not in os.environ and _DEBUG_LIB.is_file():
    os.environ["WEBPUBSUB_CLIENT_LIB"] = str(_DEBUG_LIB)

from webpubsub_client.models import WebPubSubDataType, WebPubSubProtocolType  # noqa: E402 - after choosing the library

EMULATOR_BIN = Path(os.environ.get("WPS_EMULATOR_BIN", REPO_ROOT / "target" / "debug" / "webpubsub-emulator"))

PROTOCOLS = [WebPubSubProtocolType.JSON_RELIABLE, WebPubSubProtocolType.JSON]

# Short timers so that nothing in the suite waits for production defaults.
FAST = dict(
    message_retry_total=2,
    message_retry_backoff_factor=0.05,
    message_retry_backoff_max=0.2,
    reconnect_retry_total=5,
    reconnect_retry_backoff_factor=0.05,
    reconnect_retry_backoff_max=0.2,
    ack_timeout=3.0,
    start_timeout=5.0,
    recovery_retry_interval=0.1,
    sequence_ack_interval=0.1,
)

WAIT = 10.0  # upper bound for any single awaited condition


async def until(predicate: Callable[[], bool], what: str = "the condition") -> None:
    """Waits on the running loop until ``predicate()`` holds; fails after ``WAIT``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT
    while not predicate():
        if loop.time() > deadline:
            pytest.fail(f"{what} not met within {WAIT} s")
        await asyncio.sleep(0.01)


# ---- upstream event handler ------------------------------------------------------------


class Upstream:
    """An HTTP server the emulator posts CloudEvents to.

    Event ``echo`` answers with the request body; ``fail`` answers HTTP 500; ``slow``
    answers after ``slow_seconds``, ``slow-fail`` HTTP 500 after them; ``held`` sets
    ``holding`` and answers with the request body once ``release`` is set (or after
    ``WAIT``). Every user event is recorded in ``events``.
    """

    def __init__(self) -> None:
        self.events: "queue.Queue[Dict[str, Any]]" = queue.Queue()
        self.slow_seconds = 3.0
        self.holding, self.release = threading.Event(), threading.Event()
        upstream = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length)
                ce_type = self.headers.get("ce-type", "")
                event = self.headers.get("ce-eventName", "")
                content_type = self.headers.get("content-type", "")
                if ce_type.startswith("azure.webpubsub.user."):
                    upstream.events.put(
                        {
                            "event": event,
                            "user_id": self.headers.get("ce-userId"),
                            "connection_id": self.headers.get("ce-connectionId"),
                            "content_type": content_type,
                            "body": body,
                        }
                    )
                if event == "fail":
                    self._reply(500, b"upstream refused", "text/plain")
                elif event == "slow-fail":
                    time.sleep(upstream.slow_seconds)
                    self._reply(500, b"upstream refused", "text/plain")
                elif event == "slow":
                    time.sleep(upstream.slow_seconds)
                    self._reply(200, body, content_type)
                elif event == "echo":
                    self._reply(200, body, content_type)
                elif event == "held":
                    upstream.holding.set()
                    upstream.release.wait(WAIT)
                    self._reply(200, body, content_type)
                else:
                    self._reply(200, b"", "")

            def _reply(self, code: int, body: bytes, content_type: str) -> None:
                self.send_response(code)
                if content_type:
                    self.send_header("content-type", content_type)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                try:
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the emulator gave up on a slow reply (an invoke that timed out)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/upstream"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def next_event(self, timeout: float = WAIT) -> Dict[str, Any]:
        """The next recorded user event (fails the test after ``timeout``)."""
        try:
            return self.events.get(timeout=timeout)
        except queue.Empty:
            pytest.fail(f"the upstream received no event within {timeout} s")

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# ---- the emulator -----------------------------------------------------------------------


class Emulator:
    """A running ``webpubsub-emulator`` process, on ``port`` (0: the OS picks one)."""

    def __init__(self, upstream_url: str, *extra_args: str, port: int = 0) -> None:
        if not EMULATOR_BIN.is_file():
            pytest.exit(
                f"emulator binary not found at {EMULATOR_BIN}: run `cargo build -p webpubsub-emulator` "
                "at the repository root or set WPS_EMULATOR_BIN",
                returncode=2,
            )
        self.stderr_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"wps-emulator-{uuid.uuid4().hex}.log"
        self._stderr = open(self.stderr_path, "wb")
        self.process = subprocess.Popen(
            [
                str(EMULATOR_BIN),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--upstream",
                upstream_url,
                "--recovery-window-ms",
                "5000",
                *extra_args,
            ],
            stdout=subprocess.PIPE,
            stderr=self._stderr,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline().decode().strip()
        if not line.startswith("Endpoint="):
            self.close()
            pytest.exit(f"the emulator did not print its connection string (got {line!r}); see {self.stderr_path}")
        self.connection_string = line
        parts = dict(p.split("=", 1) for p in line.strip(";").split(";"))
        self.port = int(parts["Port"])
        self.base = f"http://127.0.0.1:{self.port}"
        # keep draining stdout so that the process never blocks on a full pipe; closed at
        # its end (an unclosed pipe is a ResourceWarning, an error under ``-W error``)
        self._drain = threading.Thread(target=self._drain_stdout, args=(self.process.stdout,), daemon=True)
        self._drain.start()

    @staticmethod
    def _drain_stdout(stdout: Any) -> None:
        with stdout:
            stdout.read()

    def post(self, path: str) -> int:
        """POST to an emulator-only test route; returns the HTTP status."""
        request = urllib.request.Request(self.base + path, data=b"", method="POST")
        with urllib.request.urlopen(request, timeout=WAIT) as response:
            return response.status

    def drop(self, hub: str, connection_id: str, recoverable: bool = True) -> None:
        """Abruptly drop a connection's socket (no close frame)."""
        query = "" if recoverable else "?recoverable=false"
        self.post(f"/_emulator/hubs/{hub}/connections/{connection_id}/:drop{query}")

    def close_connection(self, hub: str, connection_id: str, code: int, reason: str = "test") -> None:
        """Send a close frame with ``code`` and forget the session."""
        self.post(f"/_emulator/hubs/{hub}/connections/{connection_id}/:close?code={code}&reason={reason}")

    def drop_acks(self, hub: str, connection_id: str, count: int) -> None:
        """Process the next ``count`` frames with an ackId but send no ack for them."""
        self.post(f"/_emulator/hubs/{hub}/connections/{connection_id}/:dropAcks?count={count}")

    def mute(self, hub: str, connection_id: str, ms: int) -> None:
        """Send nothing at all to this connection for ``ms`` (frames are discarded)."""
        self.post(f"/_emulator/hubs/{hub}/connections/{connection_id}/:mute?ms={ms}")

    def stats(self) -> Dict[str, Any]:
        with urllib.request.urlopen(self.base + "/_emulator/stats", timeout=WAIT) as response:
            return json.loads(response.read())

    def kill(self) -> None:
        """Kill the process (SIGKILL): every socket is cut without a close frame, as when
        the service dies. Its port is free again."""
        self.process.kill()
        self.process.wait(timeout=WAIT)
        self.close()
        self.stderr_path.unlink()  # its death was no failure of its own

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        drain: Optional[threading.Thread] = getattr(self, "_drain", None)
        if drain is not None:
            drain.join(timeout=10)  # it closes the pipe at its end
        elif self.process.stdout is not None:
            self.process.stdout.close()  # it did not print its connection string
        self._stderr.close()
        if self.process.returncode == 0:
            self.stderr_path.unlink()  # kept only when the emulator did not exit cleanly


@pytest.fixture(scope="session")
def upstream() -> Iterator[Upstream]:
    server = Upstream()
    yield server
    server.close()


@pytest.fixture(scope="session")
def emulator(upstream: Upstream) -> Iterator[Emulator]:
    emu = Emulator(upstream.url)
    yield emu
    emu.close()


class Hub:
    """A fresh hub on the emulator with helpers for tokens and server-side sends."""

    def __init__(self, emulator: Emulator) -> None:
        self.emulator = emulator
        self.name = "h" + uuid.uuid4().hex[:12]
        self.service = WebPubSubServiceClient.from_connection_string(emulator.connection_string, hub=self.name)

    def url(self, user_id: Optional[str] = "user", roles: Optional[List[str]] = None) -> str:
        """A client access URL for ``user_id`` with ``roles`` (default: join/leave and send to any group)."""
        if roles is None:
            roles = ["webpubsub.joinLeaveGroup", "webpubsub.sendToGroup"]
        kwargs: Dict[str, Any] = {"roles": roles}
        if user_id is not None:
            kwargs["user_id"] = user_id
        return self.service.get_client_access_token(**kwargs)["url"]

    def drop(self, connection_id: str, recoverable: bool = True) -> None:
        self.emulator.drop(self.name, connection_id, recoverable)

    def close_connection(self, connection_id: str, code: int, reason: str = "test") -> None:
        self.emulator.close_connection(self.name, connection_id, code, reason)

    def drop_acks(self, connection_id: str, count: int) -> None:
        self.emulator.drop_acks(self.name, connection_id, count)

    def mute(self, connection_id: str, ms: int) -> None:
        self.emulator.mute(self.name, connection_id, ms)


@pytest.fixture
def hub(emulator: Emulator) -> Hub:
    return Hub(emulator)


# ---- a tap between a client and the emulator ------------------------------------------


class FrameTap:
    """A TCP relay to the emulator that records each connection's upgrade request head
    and the client's text frames (unmasked, with their ``time.monotonic()``); ``url(u)``
    turns the emulator's client URL ``u`` into one through the tap."""

    def __init__(self, emulator: Emulator) -> None:
        self.target = ("127.0.0.1", emulator.port)
        self.heads: List[bytes] = []
        self.frames: List[Tuple[float, Dict[str, Any]]] = []
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, emulator_url: str) -> str:
        return emulator_url.replace(f"127.0.0.1:{self.target[1]}", f"127.0.0.1:{self.port}", 1)

    def sent(self, kind: str) -> List[Tuple[float, Dict[str, Any]]]:
        """The recorded frames of type ``kind``, in order, with their times."""
        with self._lock:
            return [(at, frame) for at, frame in self.frames if frame.get("type") == kind]

    def close(self) -> None:
        self._server.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _relay(self, client: socket.socket) -> None:
        with client, socket.create_connection(self.target) as service:
            reader = client.makefile("rb")
            head = b""
            while not head.endswith(b"\r\n\r\n"):
                line = reader.readline()
                if not line:
                    return
                head += line
            with self._lock:
                self.heads.append(head)
            service.sendall(head)
            threading.Thread(target=self._pump, args=(service, client), daemon=True).start()
            try:
                self._frames(reader, service)
            except (OSError, ValueError):
                pass
            finally:
                with contextlib.suppress(OSError):
                    service.shutdown(socket.SHUT_RDWR)

    def _frames(self, reader: Any, service: socket.socket) -> None:
        """Forwards the client's frames one by one, recording the text ones (unfragmented)."""
        while True:
            header = reader.read(2)
            if len(header) < 2:
                return
            length, raw = header[1] & 0x7F, header
            if length >= 126:
                extended = reader.read(2 if length == 126 else 8)
                length, raw = int.from_bytes(extended, "big"), raw + extended
            mask = reader.read(4) if header[1] & 0x80 else b""
            payload = reader.read(length)
            service.sendall(raw + mask + payload)
            if header[0] & 0x0F == 1:  # text
                if mask:
                    payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
                with self._lock:
                    self.frames.append((time.monotonic(), json.loads(payload)))

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def tap(emulator: Emulator) -> Iterator[FrameTap]:
    relay = FrameTap(emulator)
    yield relay
    relay.close()


# ---- waiting helpers ---------------------------------------------------------------------


def every_operation(client: Any) -> List[Callable[[], Any]]:
    """One call of each operation of ``client`` (sync or asyncio): join, leave, acked and
    fire-and-forget sends to a group and events, an invocation."""
    text = WebPubSubDataType.TEXT
    return [
        lambda: client.join_group("g"),
        lambda: client.leave_group("g"),
        lambda: client.send_to_group("g", "x", text),
        lambda: client.send_to_group("g", "x", text, ack=False),
        lambda: client.send_event("e", "x", text),
        lambda: client.send_event("e", "x", text, ack=False),
        lambda: client.invoke_event("echo", "x", text),
    ]


class TokenServiceError(Exception):
    """An application's own error, raised by its credential provider."""


class FailingProvider:
    """A plain credential provider that answers ``url``, but raises a new
    :class:`TokenServiceError` ("401 (call N)") on the calls, numbered from 1, that
    ``fails`` picks; ``raised`` keeps what it raised, in order."""

    def __init__(self, url: str, fails: Callable[[int], bool]) -> None:
        self.url = url
        self.fails = fails
        self.calls = 0
        self.raised: List[BaseException] = []

    def __call__(self) -> str:
        self.calls += 1
        if self.fails(self.calls):
            self.raised.append(TokenServiceError(f"401 (call {self.calls})"))
            raise self.raised[-1]
        return self.url


class Collector:
    """A thread-safe list of received items with a bounded wait."""

    def __init__(self) -> None:
        self.items: List[Any] = []
        self._cv = threading.Condition()

    def __call__(self, *args: Any) -> None:
        with self._cv:
            self.items.append(args[0] if len(args) == 1 else args)
            self._cv.notify_all()

    def wait_for(self, count: int, timeout: float = WAIT) -> List[Any]:
        """Wait until at least ``count`` items arrived; fail after ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while len(self.items) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    pytest.fail(f"expected {count} items within {timeout} s, got {len(self.items)}: {self.items!r}")
                self._cv.wait(remaining)
            return list(self.items)

    def wait_until(self, predicate: Callable[[List[Any]], bool], timeout: float = WAIT) -> List[Any]:
        """Wait until ``predicate(items)`` holds; fail after ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while not predicate(self.items):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    pytest.fail(f"condition not met within {timeout} s; items: {self.items!r}")
                self._cv.wait(remaining)
            return list(self.items)

    def __len__(self) -> int:
        with self._cv:
            return len(self.items)


def wait_until(predicate: Callable[[], bool], timeout: float = WAIT, what: str = "condition") -> None:
    """Poll ``predicate`` every 20 ms until it holds; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not met within {timeout} s")
        time.sleep(0.02)


def assert_keywords_logged(caplog: Any, constructor_keyword: str, extra: Dict[str, Any]) -> None:
    """What the keyword-argument tests of both clients logged: each ignored name once per
    method (the constructor's ``constructor_keyword``, the ``extra`` of six methods), and
    the two operations called with ``logging_enable=True`` twice each."""
    methods = ("subscribe", "join_group", "send_to_group", "send_event", "leave_group", "unsubscribe")
    expected = [f"WebPubSubClient ignores the keyword argument {constructor_keyword!r}"]
    expected += [f"{method} ignores the keyword argument {name!r}" for method in methods for name in extra]
    messages = [r.getMessage() for r in caplog.records if r.name == "webpubsub_client"]
    ignored = [m for m in messages if "ignores the keyword argument" in m]
    assert sorted(ignored) == sorted(expected)
    assert messages.count("join_group 'g'") == 2
    assert messages.count("send_to_group 'g': b'acked'") == 2
