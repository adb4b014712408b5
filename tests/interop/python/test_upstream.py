"""The official Python client's send_event through the emulator to an upstream."""

import asyncio
import http.server
import queue
import threading

from azure.messaging.webpubsubservice import WebPubSubServiceClient
from conftest import HUB, running_emulator
from test_official_sdks import Client, get


class Echo(http.server.BaseHTTPRequestHandler):
    """Echoes user events back with their content type; records their CloudEvents headers."""

    seen = queue.Queue()

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        if not self.headers.get("ce-type", "").startswith("azure.webpubsub.user."):
            self.send_response(204)
            self.end_headers()
            return
        Echo.seen.put(dict(self.headers))
        self.send_response(200)
        self.send_header("content-type", self.headers.get("content-type", "text/plain"))
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_send_event_reaches_the_upstream_and_its_reply_comes_back():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        upstream = f"http://127.0.0.1:{server.server_address[1]}/events"
        with running_emulator("--upstream", upstream) as emu:
            service = WebPubSubServiceClient.from_connection_string(emu.connection_string, hub=HUB)
            url = service.get_client_access_token(user_id="pyuser")["url"]

            async def body():
                c = await Client().start(url)
                try:
                    await c.sdk.send_event("greet", "hello upstream", "text")
                    headers = {k.lower(): v for k, v in Echo.seen.get(timeout=15).items()}
                    assert headers["ce-type"] == "azure.webpubsub.user.greet"
                    assert headers["ce-userid"] == "pyuser"
                    assert headers["ce-connectionid"] == c.connection_id
                    assert headers["ce-hub"] == HUB
                    assert headers["ce-specversion"] == "1.0"
                    assert (await get(c.server)).data == "hello upstream"
                    await c.sdk.send_event("greet", {"k": [1]}, "json")
                    assert (await get(c.server)).data == {"k": [1]}
                finally:
                    await c.sdk.close()

            asyncio.run(body())
    finally:
        server.shutdown()
        server.server_close()
