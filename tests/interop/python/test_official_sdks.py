"""The official Python SDKs (azure-messaging-webpubsubclient and
azure-messaging-webpubsubservice) against the emulator binary.

The client's asyncio API is used: the synchronous client 1.1.0 can miss an ack that
arrives before it starts waiting (a lost condition-variable wake-up), which a local
server answering within a millisecond triggers, costing its 30 s ack timeout.
"""

import asyncio
import contextlib
import urllib.error
import urllib.request

import pytest
from azure.core.exceptions import HttpResponseError
from azure.core.rest import HttpRequest
from azure.messaging.webpubsubclient.aio import WebPubSubClient
from azure.messaging.webpubsubclient.models import (
    CallbackType,
    SendMessageError,
    WebPubSubDataType,
)
from conftest import HUB

ROLES = ["webpubsub.joinLeaveGroup", "webpubsub.sendToGroup"]
WAIT = 15


def recorder(q):
    async def callback(event):
        q.put_nowait(event)

    return callback


async def get(q):
    return await asyncio.wait_for(q.get(), WAIT)


class Client:
    """An official client that records what it receives."""

    async def start(self, url, **kwargs):
        self.sdk = WebPubSubClient(url, **kwargs)
        self.group = asyncio.Queue()
        self.server = asyncio.Queue()
        self.connected = asyncio.Queue()
        self.disconnected = asyncio.Queue()
        await self.sdk.subscribe(CallbackType.GROUP_MESSAGE, recorder(self.group))
        await self.sdk.subscribe(CallbackType.SERVER_MESSAGE, recorder(self.server))
        await self.sdk.subscribe(CallbackType.CONNECTED, recorder(self.connected))
        await self.sdk.subscribe(CallbackType.DISCONNECTED, recorder(self.disconnected))
        await self.sdk.open()
        self.connection_id = (await get(self.connected)).connection_id
        return self


@contextlib.asynccontextmanager
async def clients():
    made = []

    async def new(url, **kwargs):
        c = await Client().start(url, **kwargs)
        made.append(c)
        return c

    try:
        yield new
    finally:
        # At once: each close waits about a second for the client's own tasks.
        await asyncio.gather(*(c.sdk.close() for c in made))


def test_group_messages_text_json_binary(client_url):
    async def body():
        async with clients() as new:
            a = await new(client_url("alice", ROLES))
            b = await new(client_url("bob", ROLES))
            await b.sdk.join_group("room")
            await a.sdk.send_to_group("room", "hello", WebPubSubDataType.TEXT)
            await a.sdk.send_to_group("room", {"n": 1, "list": [1, 2]}, WebPubSubDataType.JSON)
            await a.sdk.send_to_group("room", memoryview(b"\x00\x01\xff"), WebPubSubDataType.BINARY)
            got = [await get(b.group) for _ in range(3)]
            assert [m.group for m in got] == ["room"] * 3
            assert [m.from_user_id for m in got] == ["alice"] * 3
            assert got[0].data == "hello"
            assert got[1].data == {"n": 1, "list": [1, 2]}
            assert bytes(got[2].data) == b"\x00\x01\xff"
            assert [m.sequence_id for m in got] == [1, 2, 3]

    asyncio.run(body())


def test_no_echo(client_url):
    async def body():
        async with clients() as new:
            a = await new(client_url("alice", ROLES))
            await a.sdk.join_group("echo")
            await a.sdk.send_to_group("echo", "silent", WebPubSubDataType.TEXT, no_echo=True)
            await a.sdk.send_to_group("echo", "loud", WebPubSubDataType.TEXT, no_echo=False)
            assert (await get(a.group)).data == "loud"

    asyncio.run(body())


def test_server_sends_through_the_service_sdk(service, client_url):
    async def body():
        async with clients() as new:
            a = await new(client_url("alice", ROLES))
            b = await new(client_url("bob", ROLES))
            await b.sdk.join_group("news")
            service.send_to_all("to everyone", content_type="text/plain")
            for c in (a, b):
                assert (await get(c.server)).data == "to everyone"
            service.send_to_group("news", {"headline": "x"})
            assert (await get(b.server)).data == {"headline": "x"}
            service.send_to_user("alice", "just alice", content_type="text/plain")
            assert (await get(a.server)).data == "just alice"
            service.send_to_connection(b.connection_id, b"\x07\x08", content_type="application/octet-stream")
            assert bytes((await get(b.server)).data) == b"\x07\x08"
            # Nothing else reached a: the next thing it sees is this.
            service.send_to_connection(a.connection_id, "last", content_type="text/plain")
            assert (await get(a.server)).data == "last"

    asyncio.run(body())


def test_service_sdk_group_and_connection_management(service, client_url):
    async def body():
        async with clients() as new:
            a = await new(client_url("alice"), reconnect_retry_total=0)
            assert service.connection_exists(a.connection_id)
            assert service.user_exists("alice")
            assert not service.group_exists("managed")
            service.add_connection_to_group("managed", a.connection_id)
            assert service.group_exists("managed")
            service.send_to_group("managed", "in", content_type="text/plain")
            assert (await get(a.server)).data == "in"
            service.remove_connection_from_group("managed", a.connection_id)
            assert not service.group_exists("managed")
            service.grant_permission("joinLeaveGroup", a.connection_id, target_name="perm")
            assert service.has_permission("joinLeaveGroup", a.connection_id, target_name="perm")
            await a.sdk.join_group("perm")
            service.revoke_permission("joinLeaveGroup", a.connection_id, target_name="perm")
            assert not service.has_permission("joinLeaveGroup", a.connection_id, target_name="perm")
            service.close_connection(a.connection_id, reason="bye now")
            assert (await get(a.disconnected)).message == "Application server closed the connection. Reason: bye now"
            assert not service.connection_exists(a.connection_id)

    asyncio.run(body())


def test_service_sdk_filtered_sends_and_group_updates(service, client_url):
    """The SDK's `filter` keyword; `:addToGroups` / `:removeFromGroups` (which
    azure-messaging-webpubsubservice 1.3.0 has no method for) through its own pipeline."""

    def update_groups(action, groups, filter):
        request = HttpRequest(
            "POST",
            f"/api/hubs/{HUB}/:{action}",
            params={"api-version": "2024-01-01"},
            json={"groups": groups, "filter": filter},
        )
        return service.send_request(request).status_code

    async def body():
        async with clients() as new:
            a = await new(client_url("alice", ROLES))
            b = await new(client_url("bob", ROLES))
            anon = await new(client_url())

            async def nothing_else(c):
                service.send_to_connection(c.connection_id, "marker", content_type="text/plain")
                assert (await get(c.server)).data == "marker"

            await a.sdk.join_group("room")
            await b.sdk.join_group("room")
            service.send_to_all("not bob", content_type="text/plain", filter="userId ne 'bob'")
            assert (await get(a.server)).data == "not bob"
            assert (await get(anon.server)).data == "not bob"
            await nothing_else(b)
            service.send_to_group("room", "alice", content_type="text/plain", filter="userId eq 'alice'")
            assert (await get(a.server)).data == "alice"
            await nothing_else(b)
            service.send_to_user("bob", "none", content_type="text/plain", filter="not('room' in groups)")
            await nothing_else(b)

            assert update_groups("addToGroups", ["vip"], "userId eq 'bob' or userId eq null") == 200
            service.send_to_group("vip", "vip", content_type="text/plain")
            assert (await get(b.server)).data == "vip"
            assert (await get(anon.server)).data == "vip"
            await nothing_else(a)
            assert update_groups("removeFromGroups", ["vip", "room"], "userId ne null") == 200
            service.send_to_group("vip", "still vip", content_type="text/plain")
            assert (await get(anon.server)).data == "still vip"
            await nothing_else(b)
            assert not service.group_exists("room")

            with pytest.raises(HttpResponseError) as err:
                service.send_to_all("x", content_type="text/plain", filter="userId = 'bob'")
            assert err.value.status_code == 400
            assert "Invalid filter" in str(err.value)
            assert update_groups("addToGroups", ["g"], "userId eq") == 400
            for c in (a, b, anon):
                await nothing_else(c)

    asyncio.run(body())


def test_forbidden_without_roles(client_url):
    async def body():
        async with clients() as new:
            a = await new(client_url("nobody"), message_retry_total=0)
            with pytest.raises(SendMessageError) as err:
                await a.sdk.join_group("closed")
            assert err.value.error_detail.name == "Forbidden"
            with pytest.raises(SendMessageError) as err:
                await a.sdk.send_to_group("closed", "x", WebPubSubDataType.TEXT)
            assert err.value.error_detail.name == "Forbidden"

    asyncio.run(body())


def test_reliable_recovery_after_drop_loses_and_duplicates_nothing(emulator, client_url):
    async def body():
        async with clients() as new:
            sender = await new(client_url("sender", ROLES))
            receiver = await new(client_url("receiver", ROLES))
            await receiver.sdk.join_group("stream")
            total = 60
            for i in range(total):
                if i == 20:
                    assert emulator.fault(receiver.connection_id, ":drop") == 200
                await sender.sdk.send_to_group("stream", str(i), WebPubSubDataType.TEXT)
            got = [(await get(receiver.group)).data for _ in range(total)]
            assert got == [str(i) for i in range(total)]
            # Recovered, not reconnected: same connection, still in the group.
            await sender.sdk.send_to_group("stream", "after", WebPubSubDataType.TEXT)
            assert (await get(receiver.group)).data == "after"
            assert receiver.connected.empty(), "a recovery must not look like a new connection"
            assert receiver.group.empty()
            assert emulator.stats()["recoveries"] == 1

    asyncio.run(body())


def test_bad_token_is_401(client_url):
    url = client_url("alice", ROLES)
    bad = url[:-4] + ("AAAA" if not url.endswith("AAAA") else "BBBB")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(bad.replace("ws://", "http://", 1), timeout=10)
    assert err.value.code == 401

    async def body():
        client = WebPubSubClient(bad, reconnect_retry_total=0, start_timeout=5)
        with pytest.raises(Exception):
            await client.open()
        await client.close()

    asyncio.run(body())
