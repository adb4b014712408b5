"""Fixtures: the emulator binary from WPS_EMULATOR_BIN, started on a free port."""

import json
import os
import queue
import re
import signal
import subprocess
import threading
import urllib.request

import pytest
from azure.messaging.webpubsubservice import WebPubSubServiceClient

HUB = "interop"


class Emulator:
    """A running emulator process and its connection string."""

    def __init__(self, proc, connection_string):
        self.proc = proc
        self.connection_string = connection_string
        self.port = int(re.search(r"Port=(\d+);", connection_string).group(1))
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def stats(self):
        """GET /_emulator/stats as a dict."""
        with urllib.request.urlopen(f"{self.endpoint}/_emulator/stats", timeout=10) as resp:
            return json.load(resp)

    def fault(self, connection_id, action):
        """POSTs an emulator-only fault route and returns the HTTP status."""
        url = f"{self.endpoint}/_emulator/hubs/{HUB}/connections/{connection_id}/{action}"
        req = urllib.request.Request(url, method="POST", data=b"")
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status


@pytest.fixture
def emulator():
    binary = os.environ.get("WPS_EMULATOR_BIN")
    if not binary or not os.path.isfile(binary):
        pytest.fail(
            "WPS_EMULATOR_BIN must name the built webpubsub-emulator binary "
            f"(got {binary!r}); build it with `cargo build -p webpubsub-emulator`"
        )
    proc = subprocess.Popen(
        [binary, "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    lines = queue.Queue()
    threading.Thread(target=lambda: lines.put(proc.stdout.readline()), daemon=True).start()
    try:
        first = lines.get(timeout=20)
    except queue.Empty:
        proc.kill()
        pytest.fail("the emulator printed no connection string within 20 s")
    assert first.startswith("Endpoint=http://127.0.0.1;Port="), first
    emu = Emulator(proc, first.strip())
    yield emu
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the emulator did not stop on SIGTERM within 10 s")
    assert code == 0, f"the emulator exited with {code} on SIGTERM"


@pytest.fixture
def service(emulator):
    """The official server SDK, built from the printed connection string."""
    return WebPubSubServiceClient.from_connection_string(emulator.connection_string, hub=HUB)


@pytest.fixture
def client_url(service):
    """Makes client URLs with tokens signed by the official server SDK."""

    def make(user_id=None, roles=None, groups=None):
        token = service.get_client_access_token(user_id=user_id, roles=roles or [], groups=groups or [])
        return token["url"]

    return make
