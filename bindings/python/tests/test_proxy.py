"""HTTP proxies from the environment, as the official (sync) client takes them."""

from __future__ import annotations

import asyncio
import socket
import socketserver
import threading
from typing import Any, List, Tuple
from urllib.parse import urlsplit

import azure.messaging.webpubsubclient as official
import pytest
from conftest import Collector, Hub

import webpubsub_client as ours
import webpubsub_client.aio as ours_aio
from webpubsub_client.models import OpenClientError

# A host name that resolves nowhere: only the proxy's tunnel reaches the emulator.
NOWHERE = "webpubsub.invalid"


class ConnectProxy(socketserver.ThreadingTCPServer):
    """Answers CONNECT requests with a tunnel to ``target``, whatever host they name,
    and records the requested targets."""

    daemon_threads = True

    def __init__(self, target: Tuple[str, int]) -> None:
        self.target = target
        self.requested: List[str] = []
        super().__init__(("127.0.0.1", 0), _Tunnel)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return "http://127.0.0.1:%d" % self.server_address[1]

    def close(self) -> None:
        self.shutdown()
        self.server_close()


class _Tunnel(socketserver.StreamRequestHandler):
    server: ConnectProxy

    def handle(self) -> None:
        request = self.rfile.readline().decode("latin-1").split()
        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
            pass
        if len(request) < 2 or request[0] != "CONNECT":
            self.wfile.write(b"HTTP/1.1 405 Method Not Allowed\r\n\r\n")
            return
        self.server.requested.append(request[1])
        upstream = socket.create_connection(self.server.target)
        self.wfile.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        self.wfile.flush()

        def pump(src: socket.socket, dst: socket.socket) -> None:
            try:
                while data := src.recv(65536):
                    dst.sendall(data)
            except OSError:
                pass
            finally:
                for s in (src, dst):
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

        back = threading.Thread(target=pump, args=(upstream, self.connection), daemon=True)
        back.start()
        pump(self.connection, upstream)
        back.join(30)
        upstream.close()


@pytest.fixture
def proxied(hub: Hub, monkeypatch: Any) -> Any:
    port = urlsplit(hub.url()).port
    assert port
    proxy = ConnectProxy(("127.0.0.1", port))
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("http_proxy", proxy.url)
    yield proxy, port
    proxy.close()


def _round_trip(package: Any, url: str) -> Any:
    client = package.WebPubSubClient(url, reconnect_retry_total=0, start_timeout=5.0)
    received = Collector()
    client.subscribe("group-message", lambda args: received(args.data))
    client.open()
    try:
        client.join_group("g")
        client.send_to_group("g", "through the proxy", "text")
        return received.wait_for(1)[0]
    finally:
        client.close()


def test_both_clients_take_http_proxy_from_the_environment(hub: Hub, proxied: Any) -> None:
    proxy, port = proxied
    url = hub.url().replace("127.0.0.1", NOWHERE)
    assert _round_trip(official, url) == "through the proxy"
    assert _round_trip(ours, url) == "through the proxy"
    assert proxy.requested == [f"{NOWHERE}:{port}"] * 2


def test_the_asyncio_client_takes_the_proxy_too(hub: Hub, proxied: Any) -> None:
    """The official asyncio client (aiohttp without ``trust_env``) ignores the variables;
    ours goes through the proxy as its sync client does."""
    proxy, port = proxied
    url = hub.url().replace("127.0.0.1", NOWHERE)

    async def run() -> Any:
        received: "asyncio.Queue[Any]" = asyncio.Queue()

        async def on_message(args: Any) -> None:
            await received.put(args.data)

        async with ours_aio.WebPubSubClient(url, reconnect_retry_total=0, start_timeout=5.0) as client:
            await client.subscribe("group-message", on_message)
            await client.join_group("g")
            await client.send_to_group("g", "async", "text")
            return await asyncio.wait_for(received.get(), 10)

    assert asyncio.run(run()) == "async"
    assert proxy.requested == [f"{NOWHERE}:{port}"]


def test_no_proxy_and_loopback_hosts_connect_directly(hub: Hub, proxied: Any, monkeypatch: Any) -> None:
    proxy, _ = proxied
    # Loopback: the official client would ask the proxy, whose loopback is not ours.
    assert _round_trip(ours, hub.url()) == "through the proxy"
    assert proxy.requested == []
    # Listed in no_proxy: connected directly, so the name that resolves nowhere fails.
    monkeypatch.setenv("no_proxy", "example.org, .invalid")
    with pytest.raises(OpenClientError, match=NOWHERE):
        _round_trip(ours, hub.url().replace("127.0.0.1", NOWHERE))
    assert proxy.requested == []
    monkeypatch.setenv("http_proxy", "socks5://127.0.0.1:1")
    monkeypatch.delenv("no_proxy")
    with pytest.raises(OpenClientError, match="proxy"):
        _round_trip(ours, hub.url().replace("127.0.0.1", NOWHERE))
    assert proxy.requested == []
