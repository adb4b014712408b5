"""The official Python SDKs' own samples, re-typed as tests against the emulator.

Each test makes the same SDK calls in the same order as one sample of
azure-messaging-webpubsubclient (samples/) or azure-messaging-webpubsubservice
(samples/), with the emulator's connection string, and asserts what the sample only
prints. Where a sample cannot run unchanged on the installed SDK versions for a
reason that has nothing to do with the server, the test says what it adapted.

The client samples run twice: with the official client, and with this project's
binding imported in its place (`webpubsub_client` for
`azure.messaging.webpubsubclient`), the one change its users make to switch.

The synchronous client 1.1.0 can lose the wake-up of an ack that arrives before it
starts waiting (see test_official_sdks.py): its calls then succeed only after
`ack_timeout`. The sync samples run with a short `ack_timeout` so that such a miss
costs seconds, not 30 s each.
"""

import asyncio
import importlib
import io
import json
import pathlib
import queue
import sys
import threading
import time
import types

import pytest
import websocket
from azure.core.rest import HttpRequest
from azure.messaging.webpubsubservice import WebPubSubServiceClient
from azure.messaging.webpubsubservice.aio import WebPubSubServiceClient as AsyncServiceClient

ROLES = ["webpubsub.joinLeaveGroup", "webpubsub.sendToGroup"]
# The binding is imported from its source folder; it loads the library from target/.
BINDING = pathlib.Path(__file__).resolve().parents[3] / "bindings" / "python"
WAIT = 15
SYNC_ACK_TIMEOUT = 3


@pytest.fixture(params=["azure.messaging.webpubsubclient", "webpubsub_client"], ids=["official", "ours"])
def sdk(request):
    """The client package a sample imports: its sync and asyncio clients and credentials
    and the models it uses, under the names the samples give them."""
    if request.param == "webpubsub_client" and str(BINDING) not in sys.path:
        sys.path.insert(0, str(BINDING))
    package = importlib.import_module(request.param)
    aio = importlib.import_module(request.param + ".aio")
    models = importlib.import_module(request.param + ".models")
    return types.SimpleNamespace(
        WebPubSubClient=package.WebPubSubClient,
        WebPubSubClientCredential=package.WebPubSubClientCredential,
        AsyncClient=aio.WebPubSubClient,
        AsyncCredential=aio.WebPubSubClientCredential,
        CallbackType=models.CallbackType,
        OpenClientError=models.OpenClientError,
        SendMessageError=models.SendMessageError,
        WebPubSubDataType=models.WebPubSubDataType,
    )


def drain(q, n, what="a message"):
    """The next n items of a queue.Queue, each within WAIT seconds."""
    out = []
    for _ in range(n):
        try:
            out.append(q.get(timeout=WAIT))
        except queue.Empty:
            pytest.fail(f"timed out waiting for {what} ({len(out)} of {n} came)")
    return out


def test_hello_world_async(emulator, sdk):
    """samples/hello_world_async.py. The sample passes the sync package's credential
    (a plain callable) to the asyncio client, which 1.1.0 refuses with a TypeError
    before any I/O; the asyncio credential with an async provider is used instead."""
    service = WebPubSubServiceClient.from_connection_string(connection_string=emulator.connection_string, hub="hub")

    async def url():
        return service.get_client_access_token(roles=ROLES)["url"]

    async def body():
        got = asyncio.Queue()
        disconnected = asyncio.Queue()

        async def on_group_message(msg):
            got.put_nowait(msg)

        async def on_disconnected(msg):
            disconnected.put_nowait(msg)

        async def on_connected(msg):
            pass

        client = sdk.AsyncClient(credential=sdk.AsyncCredential(client_access_url_provider=url))
        async with client:
            await client.subscribe("connected", on_connected)
            await client.subscribe("disconnected", on_disconnected)
            await client.subscribe("group-message", on_group_message)
            await client.join_group("test")
            await client.send_to_group("test", "hello text", "text", no_echo=False, ack=False)
            await client.send_to_group("test", {"hello": "json"}, "json")
            await client.send_to_group("test", "hello text", "text")
            await client.send_to_group("test", memoryview("hello binary".encode()), "binary")
            msgs = [await asyncio.wait_for(got.get(), WAIT) for _ in range(4)]
        assert [m.group for m in msgs] == ["test"] * 4
        assert [m.data for m in msgs[:3]] == ["hello text", {"hello": "json"}, "hello text"]
        assert bytes(msgs[3].data) == b"hello binary"
        await asyncio.wait_for(disconnected.get(), WAIT)

    asyncio.run(body())


def test_hello_world_sync(emulator, sdk):
    """samples/hello_world.py: the synchronous client as a context manager."""
    service = WebPubSubServiceClient.from_connection_string(connection_string=emulator.connection_string, hub="hub")
    client = sdk.WebPubSubClient(
        credential=sdk.WebPubSubClientCredential(
            client_access_url_provider=lambda: service.get_client_access_token(roles=ROLES)["url"]
        ),
        ack_timeout=SYNC_ACK_TIMEOUT,
    )
    got = queue.Queue()
    with client:
        client.subscribe(sdk.CallbackType.CONNECTED, lambda e: None)
        client.subscribe(sdk.CallbackType.DISCONNECTED, lambda e: None)
        client.subscribe(sdk.CallbackType.GROUP_MESSAGE, got.put)
        client.join_group("test")
        client.send_to_group("test", "hello text", sdk.WebPubSubDataType.TEXT, no_echo=False, ack=False)
        client.send_to_group("test", {"hello": "json"}, sdk.WebPubSubDataType.JSON)
        client.send_to_group("test", "hello text", sdk.WebPubSubDataType.TEXT)
        client.send_to_group("test", memoryview("hello binary".encode()), sdk.WebPubSubDataType.BINARY)
        msgs = drain(got, 4)
    assert [m.data for m in msgs[:3]] == ["hello text", {"hello": "json"}, "hello text"]
    assert bytes(msgs[3].data) == b"hello binary"


def test_hello_world_exceptions(emulator, sdk):
    """samples/hello_world_exceptions.py: open and join_group in retry loops that catch
    OpenClientError / SendMessageError; against a healthy server both pass first time."""
    service = WebPubSubServiceClient.from_connection_string(connection_string=emulator.connection_string, hub="hub")
    client = sdk.WebPubSubClient(
        credential=sdk.WebPubSubClientCredential(
            client_access_url_provider=lambda: service.get_client_access_token(roles=ROLES)["url"]
        ),
        ack_timeout=SYNC_ACK_TIMEOUT,
    )
    errors = []
    for _ in range(3):
        try:
            client.open()
            break
        except sdk.OpenClientError as err:
            errors.append(err)
    for _ in range(3):
        try:
            client.join_group(group_name="test")
            break
        except sdk.SendMessageError as err:
            errors.append(err)
    client.close()
    assert errors == []


def test_send_compare_between_async_sync(emulator, sdk):
    """samples/send_compare_between_async_sync.py: 100 acked JSON sends with the sync
    client, then 100 concurrent ones with the asyncio client. The sample builds its
    service clients with DefaultAzureCredential (Entra ID, which the emulator does not
    serve); the connection string is used instead. The sync client joined the group it
    sends to, so its 100 messages come back to it."""
    count = 100

    def url():
        service = WebPubSubServiceClient.from_connection_string(emulator.connection_string, hub="hub")
        return service.get_client_access_token(roles=ROLES)["url"]

    async def url_async():
        async with AsyncServiceClient.from_connection_string(emulator.connection_string, hub="hub") as service:
            return (await service.get_client_access_token(roles=ROLES))["url"]

    got = queue.Queue()
    client = sdk.WebPubSubClient(
        credential=sdk.WebPubSubClientCredential(client_access_url_provider=url), ack_timeout=SYNC_ACK_TIMEOUT
    )
    client.subscribe(sdk.CallbackType.GROUP_MESSAGE, got.put)
    with client:
        client.join_group("test")
        for _ in range(count):
            client.send_to_group("test", {"hello": "json"}, sdk.WebPubSubDataType.JSON)
        assert [m.data for m in drain(got, count)] == [{"hello": "json"}] * count

    async def send_async():
        client_async = sdk.AsyncClient(credential=sdk.AsyncCredential(client_access_url_provider=url_async))
        async with client_async:
            await client_async.join_group("send_compare_between_async_sync")
            await asyncio.wait_for(
                asyncio.gather(
                    *[
                        client_async.send_to_group("test", {"hello": "json"}, sdk.WebPubSubDataType.JSON)
                        for _ in range(count)
                    ]
                ),
                WAIT,
            )

    asyncio.run(send_async())


class RawClients:
    """websocket-client apps as the service samples run them, recording what they get."""

    def __init__(self, subprotocol=None):
        self.subprotocol = subprotocol
        self.apps = []
        self.messages = queue.Queue()
        self.connection_ids = queue.Queue()
        self.opened = queue.Queue()

    def add(self, url):
        def on_message(app, message):
            if self.subprotocol is None:
                self.messages.put(message)
                return
            message = json.loads(message)
            if message["type"] == "message":
                self.messages.put(message["data"])
            if message["type"] == "system" and message["event"] == "connected":
                self.connection_ids.put(message["connectionId"])

        kwargs = {"subprotocols": [self.subprotocol]} if self.subprotocol else {}
        app = websocket.WebSocketApp(
            url, on_open=lambda app: self.opened.put(app), on_message=on_message, **kwargs
        )
        self.apps.append(app)
        threading.Thread(target=app.run_forever, daemon=True).start()

    def close(self):
        for app in self.apps:
            app.close()


def counts_until(q, expected, marker_count):
    """Reads q until the marker has come marker_count times; returns what came before,
    as {message: count}. The marker is sent last, so everything sent before it to
    those connections has come by then."""
    seen = {}
    markers = 0
    deadline = time.monotonic() + WAIT
    while markers < marker_count:
        try:
            m = q.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            pytest.fail(f"timed out; got {seen} and {markers} markers, expected {expected}")
        if m == "marker":
            markers += 1
        else:
            seen[m] = seen.get(m, 0) + 1
    return seen


def test_integration_sample(emulator):
    """samples/integration_sample.py: five json.webpubsub.azure.v1 sockets whose tokens
    put them in InitGroup, then sends to all / group / filter / user and
    remove_connection_from_all_groups. The sample passes `filter_string=`, the keyword
    of an older SDK (1.3.0 hands it to requests, a TypeError); `filter=` is used. Its
    `time.sleep(5)` is replaced by a final marker to every connection."""
    service = WebPubSubServiceClient.from_connection_string(emulator.connection_string, hub="hub", logging_enable=False)
    clients = RawClients("json.webpubsub.azure.v1")
    try:
        for i in range(5):
            token = service.get_client_access_token(groups=["InitGroup"], user_id="User%d" % i)
            clients.add(token["url"])
        ids = drain(clients.connection_ids, 5, "connected")
        service.send_to_all(message="Message_For_All", content_type="text/plain")
        service.send_to_group(group="InitGroup", message="Message_For_InitGroup", content_type="text/plain")
        service.send_to_all("Message_Not_For_User0", filter="userId ne 'User0'", content_type="text/plain")
        # The sample takes the first connection to report; that may be any user's.
        first = ids[0]
        group_names = ["Group%d" % i for i in range(3)]
        for group in group_names:
            service.add_connection_to_group(group, first)
            service.send_to_group(group, "Message_For_RemoveFromAll", content_type="text/plain")
        service.remove_connection_from_all_groups(first)
        for group in group_names:
            service.send_to_group(group, "Message_For_RemoveFromAll", content_type="text/plain")
        service.send_to_user("User0", message="Message_For_User0", content_type="text/plain")
        service.send_to_all("marker", content_type="text/plain")
        seen = counts_until(clients.messages, "the sample's counts", 5)
        # remove_connection_from_all_groups took `first` out of InitGroup too; four remain.
        assert service.group_exists("InitGroup") is True
        assert seen == {
            "Message_For_All": 5,
            "Message_For_InitGroup": 5,
            "Message_Not_For_User0": 4,
            "Message_For_User0": 1,
            "Message_For_RemoveFromAll": 3,
        }
    finally:
        clients.close()


def test_ws_sample(emulator):
    """samples/ws_sample.py: simple WebSocket clients (no subprotocol) get raw text
    frames. The sample has WEBSOCKET_N = 1 yet sends to "user1" and expects one
    message, which no server can deliver; two sockets are used, so user1 exists. The
    sample sends without waiting for its sockets to open; the test waits for them."""
    service = WebPubSubServiceClient.from_connection_string(emulator.connection_string, hub="hub", logging_enable=True)
    clients = RawClients()
    n = 2
    try:
        for i in range(n):
            token = service.get_client_access_token(groups=["InitGroup"], user_id="user%d" % i)
            clients.add(token["url"])
        drain(clients.opened, n, "the sockets to open")
        service.send_to_all(message="Message_For_All", content_type="text/plain")
        service.send_to_group(group="InitGroup", message="Message_For_InitGroup", content_type="text/plain")
        service.send_to_all("Message_Not_For_user0", filter="userId ne 'user0'", content_type="text/plain")
        service.send_to_user("user1", message="Message_For_user0", content_type="text/plain")
        service.send_to_all("marker", content_type="text/plain")
        seen = counts_until(clients.messages, "the sample's counts", n)
        assert service.group_exists("InitGroup") is True
        assert seen == {
            "Message_For_All": n,
            "Message_For_InitGroup": n,
            "Message_Not_For_user0": n - 1,
            "Message_For_user0": 1,
        }
    finally:
        clients.close()


@pytest.mark.parametrize("proxy", [False, True], ids=["connection_string", "apim_proxy"])
def test_send_messages_connection_string(emulator, proxy):
    """samples/send_messages_connection_string.py and
    send_messages_connection_string_apim_proxy.py: JSON, text and a stream body to
    everyone. The first sample calls `client.web_pub_sub.send_to_all('Hub', ...)`, an
    older SDK's shape (1.3.0 has no `web_pub_sub`); the hub goes to the constructor.
    The proxy sample's reverse_proxy_endpoint is the emulator itself under another
    host name, so requests go to `localhost` signed for `127.0.0.1`."""
    options = {"reverse_proxy_endpoint": f"http://localhost:{emulator.port}"} if proxy else {}
    client = WebPubSubServiceClient.from_connection_string(
        emulator.connection_string, hub="Hub", logging_enable=True, **options
    )
    clients = RawClients("json.webpubsub.azure.v1")
    try:
        clients.add(client.get_client_access_token()["url"])
        drain(clients.connection_ids, 1, "connected")
        client.send_to_all(message={"Hello": "all!"})
        client.send_to_all(message="hello, text!", content_type="text/plain")
        stream_type = "application/octet-stream" if proxy else "application/json"
        client.send_to_all(message=io.BytesIO(b'{ "hello": "world" }'), content_type=stream_type)
        got = drain(clients.messages, 3)
        assert got[:2] == [{"Hello": "all!"}, "hello, text!"]
        # A JSON stream arrives as JSON; an octet-stream one as base64 binary.
        assert got[2] == ({"hello": "world"} if not proxy else "eyAiaGVsbG8iOiAid29ybGQiIH0=")
    finally:
        clients.close()


def test_get_client_access_token_sync_and_async(emulator):
    """samples/get_client_access_token.py and get_client_access_token_async.py, with
    the connection string (their Entra ID halves need Azure): a token from each
    client, with no user, no roles, no groups, connects."""
    client_key = WebPubSubServiceClient.from_connection_string(emulator.connection_string, hub="hub")
    token_key = client_key.get_client_access_token()

    async def get_async():
        async with AsyncServiceClient.from_connection_string(emulator.connection_string, hub="hub") as client:
            return await client.get_client_access_token()

    token_async = asyncio.run(get_async())
    for token in (token_key, token_async):
        assert token["url"] == f"{token['baseUrl']}?access_token={token['token']}"
        ws = websocket.create_connection(token["url"], subprotocols=["json.webpubsub.azure.v1"], timeout=WAIT)
        try:
            connected = json.loads(ws.recv())
            assert connected["event"] == "connected"
            assert "userId" not in connected or connected["userId"] is None
        finally:
            ws.close()


def test_get_service_status(service):
    """azure-sdk-for-js web-pubsub samples-dev/getServiceStatusSample.ts: the Health
    API, `HEAD /api/health`, through the SDK's own pipeline (signed as every REST call);
    the Python SDK 1.3.0 has no method for it. The service answers 200."""
    request = HttpRequest("HEAD", "/api/health", params={"api-version": "2024-12-01"})
    assert service.send_request(request).status_code == 200
