"""A chat on the local emulator: two clients, a group, every data type, server sends, reconnects.

Run by ``scripts/demo.sh`` (which starts the emulator); by hand, with the package installed
(or ``PYTHONPATH=bindings/python``):
``python examples/python/chat_demo.py "Endpoint=http://127.0.0.1;Port=PORT;AccessKey=KEY;Version=1.0;"``

Clients use this project's binding (``webpubsub_client``); tokens and server sends come
from the official server SDK (``azure-messaging-webpubsubservice``).
"""

import logging
import sys
import threading
import time
import urllib.request

from azure.messaging.webpubsubservice import WebPubSubServiceClient

from webpubsub_client import WebPubSubClient
from webpubsub_client.models import CallbackType, WebPubSubDataType

HUB = "chat"
GROUP = "lobby"
ROLES = ["webpubsub.joinLeaveGroup", "webpubsub.sendToGroup"]
WAIT_SECONDS = 10


class Inbox:
    """Counts what a client receives so the demo can wait for each step."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._count = 0

    def bump(self) -> None:
        with self._cond:
            self._count += 1
            self._cond.notify_all()

    def reached(self, count: int, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._count >= count, timeout=timeout)

    def wait_for(self, count: int, what: str) -> None:
        if not self.reached(count, WAIT_SECONDS):
            raise SystemExit(f"demo failed: timed out waiting for {what}")


def show(data_type, data) -> str:
    if str(data_type) == "binary":
        return f"binary {bytes(data)!r}"
    return f"{data_type} {data!r}"


def make_client(service: WebPubSubServiceClient, user: str, inbox: Inbox, events: Inbox) -> WebPubSubClient:
    url = service.get_client_access_token(user_id=user, roles=ROLES)["url"]
    client = WebPubSubClient(url, recovery_retry_interval=0.2, reconnect_retry_backoff_factor=0.2)

    def on_connected(e) -> None:
        print(f"  [{user}] connected as connection {e.connection_id}")
        events.bump()

    def on_disconnected(e) -> None:
        print(f"  [{user}] disconnected (close code {e.close_code}): {e.message}")

    def on_group(e) -> None:
        print(f"  [{user}] group {e.group} from {e.from_user_id}: {show(e.data_type, e.data)}")
        inbox.bump()

    def on_server(e) -> None:
        print(f"  [{user}] from the server: {show(e.data_type, e.data)}")
        inbox.bump()

    client.subscribe(CallbackType.CONNECTED, on_connected)
    client.subscribe(CallbackType.DISCONNECTED, on_disconnected)
    client.subscribe(CallbackType.GROUP_MESSAGE, on_group)
    client.subscribe(CallbackType.SERVER_MESSAGE, on_server)
    return client


def emulator_route(endpoint: str, path: str) -> None:
    """Calls one of the emulator's fault-injection routes (not part of the real service)."""
    request = urllib.request.Request(f"{endpoint}/_emulator/hubs/{HUB}{path}", method="POST")
    with urllib.request.urlopen(request, timeout=WAIT_SECONDS):
        pass


def main(connection_string: str) -> None:
    service = WebPubSubServiceClient.from_connection_string(connection_string, hub=HUB)
    endpoint = service._config.endpoint.rstrip("/")  # the emulator's http://127.0.0.1:PORT
    alice_in, bob_in, alice_ev, bob_ev = Inbox(), Inbox(), Inbox(), Inbox()
    alice = make_client(service, "alice", alice_in, alice_ev)
    bob = make_client(service, "bob", bob_in, bob_ev)

    print("1. both clients connect and join the group")
    with alice, bob:
        alice.join_group(GROUP)
        bob.join_group(GROUP)

        print("2. text, JSON and binary messages through the group")
        alice.send_to_group(GROUP, "hello from alice", WebPubSubDataType.TEXT, no_echo=True)
        bob_in.wait_for(1, "alice's text")
        bob.send_to_group(GROUP, {"emoji": "wave", "count": 3}, WebPubSubDataType.JSON, no_echo=True)
        alice_in.wait_for(1, "bob's JSON")
        alice.send_to_group(GROUP, b"\x00\x01binary\xff", WebPubSubDataType.BINARY, no_echo=True)
        bob_in.wait_for(2, "alice's binary")

        print("3. the server sends through the REST API: to the group, to a user, to a connection")
        service.send_to_group(GROUP, "server to the group", content_type="text/plain")
        service.send_to_user("bob", {"to": "bob"}, content_type="application/json")
        service.send_to_connection(alice.connection_id, b"\x10\x20", content_type="application/octet-stream")
        alice_in.wait_for(3, "the server messages")
        bob_in.wait_for(4, "the server messages")

        print("4. alice's socket drops; the reliable protocol recovers it silently")
        before = alice.connection_id
        emulator_route(endpoint, f"/connections/{before}/:drop")
        bob.send_to_group(GROUP, "sent while alice was recovering", WebPubSubDataType.TEXT, no_echo=True)
        alice_in.wait_for(4, "the message sent during recovery")
        print(f"  [alice] still connection {alice.connection_id} (same: {alice.connection_id == before}), no event raised")

        print("5. the server ends alice's session (1008); she reconnects and rejoins the group")
        emulator_route(endpoint, f"/connections/{alice.connection_id}/:close?code=1008&reason=demo")
        alice_ev.wait_for(2, "alice's new connection")
        # The rejoin follows the connected event; bob greets until alice hears it.
        deadline = time.monotonic() + WAIT_SECONDS
        while not alice_in.reached(5, 0.5) and time.monotonic() < deadline:
            bob.send_to_group(GROUP, "welcome back", WebPubSubDataType.TEXT, no_echo=True)
        alice_in.wait_for(5, "a message after the rejoin")
    print("done: every message arrived")


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="  (library log) %(message)s")
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    main(sys.argv[1])
