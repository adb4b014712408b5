"""Every public method of azure-messaging-webpubsubservice's WebPubSubServiceClient,
with each of its options, against the emulator binary. What each call did is read
from official clients connected over WebSocket (azure-messaging-webpubsubclient's
asyncio API): a message arrives or not, a connection closes with the reason, a
membership shows in the group messages that arrive.

A client that must receive nothing more is sent a marker on its own connection last:
the next thing it sees must be that marker.
"""

import asyncio
import io
import urllib.error
import urllib.parse
import urllib.request

import jwt
import pytest
from azure.core.exceptions import HttpResponseError, ResourceNotFoundError
from azure.core.rest import HttpRequest
from azure.messaging.webpubsubclient.models import SendMessageError, WebPubSubDataType
from conftest import HUB
from test_official_sdks import ROLES, clients, get

# What the service tells a client closed through REST, before the given reason.
CLOSED = "Application server closed the connection. Reason: "


async def nothing_else(service, *cs):
    """Each client's next server message is a marker sent to it now."""
    for c in cs:
        service.send_to_connection(c.connection_id, "marker", content_type="text/plain")
        assert (await get(c.server)).data == "marker"


def test_sends_with_every_content_type_excluded_filter_and_ttl(service, client_url):
    async def body():
        async with clients() as new:
            a = await new(client_url("alice", ROLES))
            b = await new(client_url("bob", ROLES))
            anon = await new(client_url())
            await a.sdk.join_group("room")
            await b.sdk.join_group("room")

            # send_to_all: each content type, excluded, filter.
            service.send_to_all("text", content_type="text/plain", excluded=[a.connection_id])
            service.send_to_all({"json": [1, None]})
            service.send_to_all("a json string", content_type="application/json")
            service.send_to_all(io.BytesIO(b"\x00\xff"), content_type="application/octet-stream")
            service.send_to_all("not anon", content_type="text/plain", filter="userId ne null")
            for c in (b, anon):
                assert (await get(c.server)).data == "text"
            for c in (a, b, anon):
                assert (await get(c.server)).data == {"json": [1, None]}
                assert (await get(c.server)).data == "a json string"
                assert bytes((await get(c.server)).data) == b"\x00\xff"
            for c in (a, b):
                assert (await get(c.server)).data == "not anon"
            await nothing_else(service, a, anon)

            # send_to_group: excluded and filter together, then each content type.
            service.send_to_group(
                "room", "to bob", content_type="text/plain", excluded=[anon.connection_id], filter="userId eq 'bob'"
            )
            service.send_to_group("room", "not bob", content_type="text/plain", excluded=[b.connection_id])
            service.send_to_group("room", [1, 2], content_type="application/json")
            service.send_to_group("room", b"\x01", content_type="application/octet-stream")
            assert (await get(b.server)).data == "to bob"
            assert (await get(a.server)).data == "not bob"
            for c in (a, b):
                assert (await get(c.server)).data == [1, 2]
                assert bytes((await get(c.server)).data) == b"\x01"
            await nothing_else(service, a, b, anon)

            # send_to_user: filter, each content type.
            service.send_to_user("alice", "filtered out", content_type="text/plain", filter="not('room' in groups)")
            service.send_to_user("alice", {"u": 1})
            service.send_to_user("alice", "plain", content_type="text/plain")
            service.send_to_user("alice", io.BytesIO(b"\x02"), content_type="application/octet-stream")
            assert (await get(a.server)).data == {"u": 1}
            assert (await get(a.server)).data == "plain"
            assert bytes((await get(a.server)).data) == b"\x02"

            # send_to_connection: each content type.
            service.send_to_connection(b.connection_id, {"c": True})
            service.send_to_connection(b.connection_id, "plain", content_type="text/plain")
            service.send_to_connection(b.connection_id, b"\x03", content_type="application/octet-stream")
            assert (await get(b.server)).data == {"c": True}
            assert (await get(b.server)).data == "plain"
            assert bytes((await get(b.server)).data) == b"\x03"

            # messageTtlSeconds: 1.3.0's send methods have no keyword for it; it goes in
            # `params`. 0 to 300 is accepted, more is refused.
            for ttl in (0, 300):
                service.send_to_all("ttl", content_type="text/plain", params={"messageTtlSeconds": ttl})
                service.send_to_group("room", "ttl", content_type="text/plain", params={"messageTtlSeconds": ttl})
                service.send_to_user("bob", "ttl", content_type="text/plain", params={"messageTtlSeconds": ttl})
                service.send_to_connection(
                    b.connection_id, "ttl", content_type="text/plain", params={"messageTtlSeconds": ttl}
                )
            for c, count in ((a, 4), (b, 8), (anon, 2)):
                assert [(await get(c.server)).data for _ in range(count)] == ["ttl"] * count
            with pytest.raises(HttpResponseError) as err:
                service.send_to_all("x", content_type="text/plain", params={"messageTtlSeconds": 301})
            assert err.value.status_code == 400
            assert "messageTtlSeconds" in str(err.value)

            with pytest.raises(ValueError):
                service.send_to_all("x", content_type="text/html")
            await nothing_else(service, a, b, anon)

    asyncio.run(body())


def test_user_and_connection_group_membership(service, client_url):
    async def body():
        async with clients() as new:
            a1 = await new(client_url("alice", ROLES))
            a2 = await new(client_url("alice", ROLES))
            b = await new(client_url("bob", ROLES))

            service.add_user_to_group("ug", "alice")
            assert service.group_exists("ug")
            service.send_to_group("ug", "ug 1", content_type="text/plain")
            for c in (a1, a2):
                assert (await get(c.server)).data == "ug 1"
            service.remove_user_from_group("ug", "alice")
            assert not service.group_exists("ug")
            service.send_to_group("ug", "ug 2", content_type="text/plain")

            # remove_user_from_all_groups: groups added through REST and joined by the
            # client itself alike.
            service.add_user_to_group("x", "alice")
            service.add_user_to_group("y", "alice")
            await a1.sdk.join_group("self")
            service.remove_user_from_all_groups("alice")
            for g in ("x", "y", "self"):
                assert not service.group_exists(g)
                service.send_to_group(g, "gone", content_type="text/plain")

            # Connection by connection.
            service.add_connection_to_group("c", a2.connection_id)
            service.add_connection_to_group("c", b.connection_id)
            service.add_connection_to_group("d", b.connection_id)
            service.send_to_group("c", "c 1", content_type="text/plain")
            assert (await get(a2.server)).data == "c 1"
            assert (await get(b.server)).data == "c 1"
            service.remove_connection_from_group("c", b.connection_id)
            service.send_to_group("c", "c 2", content_type="text/plain")
            assert (await get(a2.server)).data == "c 2"
            service.remove_connection_from_all_groups(a2.connection_id)
            assert not service.group_exists("c")
            assert service.group_exists("d")
            service.send_to_group("c", "c 3", content_type="text/plain")
            with pytest.raises(ResourceNotFoundError):
                service.add_connection_to_group("c", "no-such-connection")
            # Leaving what one is not in, or removing an unknown user, is no error.
            service.remove_connection_from_group("c", b.connection_id)
            service.remove_user_from_group("c", "nobody")
            service.remove_user_from_all_groups("nobody")
            await nothing_else(service, a1, a2, b)

    asyncio.run(body())


def test_permissions_need_a_target_name_and_override_roles(service, client_url):
    """The service requires `target_name` (the group); the SDKs let it be left out, and
    then the service answers 400. A grant or a revoke is for that group alone and
    overrides, for it, what the token's roles say."""

    async def body():
        async with clients() as new:
            a = await new(client_url("alice"), message_retry_total=0)
            b = await new(client_url("bob", ROLES), message_retry_total=0)
            await b.sdk.join_group("any")
            await b.sdk.join_group("perm")

            for call in (service.grant_permission, service.has_permission, service.revoke_permission):
                for permission in ("sendToGroup", "joinLeaveGroup"):
                    with pytest.raises(HttpResponseError) as err:
                        call(permission, a.connection_id)
                    assert err.value.status_code == 400
            with pytest.raises(HttpResponseError) as err:
                service.grant_permission("sendToGroup", a.connection_id)
            assert "targetName" in str(err.value)

            with pytest.raises(SendMessageError):
                await a.sdk.send_to_group("perm", "x", WebPubSubDataType.TEXT)
            service.grant_permission("sendToGroup", a.connection_id, target_name="perm")
            assert service.has_permission("sendToGroup", a.connection_id, target_name="perm")
            assert not service.has_permission("sendToGroup", a.connection_id, target_name="any")
            await a.sdk.send_to_group("perm", "to perm", WebPubSubDataType.TEXT)
            assert (await get(b.group)).data == "to perm"
            with pytest.raises(SendMessageError) as err:
                await a.sdk.send_to_group("any", "x", WebPubSubDataType.TEXT)
            assert err.value.error_detail.name == "Forbidden"
            service.revoke_permission("sendToGroup", a.connection_id, target_name="perm")
            with pytest.raises(SendMessageError):
                await a.sdk.send_to_group("perm", "x", WebPubSubDataType.TEXT)

            # b's roles grant every group; a revoke takes "perm" out, and only it.
            assert service.has_permission("joinLeaveGroup", b.connection_id, target_name="perm")
            service.revoke_permission("joinLeaveGroup", b.connection_id, target_name="perm")
            assert not service.has_permission("joinLeaveGroup", b.connection_id, target_name="perm")
            with pytest.raises(SendMessageError) as err:
                await b.sdk.leave_group("perm")
            assert err.value.error_detail.name == "Forbidden"
            await b.sdk.join_group("joined")
            assert service.group_exists("joined")
            service.grant_permission("joinLeaveGroup", b.connection_id, target_name="perm")
            await b.sdk.leave_group("perm")

            assert not service.has_permission("joinLeaveGroup", "no-such-connection", target_name="perm")
            assert b.group.empty()

    asyncio.run(body())


def test_closes_with_excluded_and_reason(service, client_url):
    # reconnect_retry_total=0 turns the official client's auto-reconnect off (it has no
    # auto_reconnect option): a closed client stays gone.
    async def body():
        async with clients() as new:
            a1 = await new(client_url("alice"), reconnect_retry_total=0)
            a2 = await new(client_url("alice"), reconnect_retry_total=0)
            b = await new(client_url("bob", groups=["g"]), reconnect_retry_total=0)
            c = await new(client_url("carol", groups=["g"]), reconnect_retry_total=0)
            d = await new(client_url(), reconnect_retry_total=0)

            service.close_user_connections("alice", excluded=[a2.connection_id], reason="alice out")
            assert (await get(a1.disconnected)).message == CLOSED + "alice out"
            assert not service.connection_exists(a1.connection_id)
            assert service.user_exists("alice")

            service.close_group_connections("g", excluded=[c.connection_id], reason="group out")
            assert (await get(b.disconnected)).message == CLOSED + "group out"
            assert not service.user_exists("bob")
            assert service.group_exists("g")

            service.close_all_connections(excluded=[d.connection_id], reason="all out")
            for gone in (a2, c):
                assert (await get(gone.disconnected)).message == CLOSED + "all out"
                assert not service.connection_exists(gone.connection_id)
            assert not service.user_exists("alice")
            assert not service.group_exists("g")
            assert service.connection_exists(d.connection_id)

            service.close_connection(d.connection_id)
            assert (await get(d.disconnected)).connection_id == d.connection_id
            assert not service.connection_exists(d.connection_id)
            # Closing what is gone is no error.
            service.close_connection(d.connection_id, reason="again")
            service.close_user_connections("alice")
            service.close_group_connections("g")
            service.close_all_connections()
            # The SDK takes the service's normal close for a drop: its recovery is refused,
            # and it may report that one close more than once. Nothing else comes.
            for x in (a1, a2, b, c, d):
                while not x.disconnected.empty():
                    again = x.disconnected.get_nowait()
                    assert again.connection_id == x.connection_id
                    assert again.message.startswith("Application server closed the connection.")

    asyncio.run(body())


def test_list_connections_pages_with_top_maxpagesize_and_continuation(service, client_url):
    """A group's members, page by page: `maxpagesize` (a keyword the generated client
    takes), `top`, the SDK's continuation (the page's nextLink) and the service's
    `continuationToken` (`continuation_token_parameter`)."""

    def first_page(group, **params):
        request = HttpRequest(
            "GET",
            f"/api/hubs/{HUB}/groups/{group}/connections",
            params={"api-version": "2024-12-01", **params},
        )
        response = service.send_request(request)
        response.raise_for_status()
        return response.json()

    def pages(paged):
        return [[(m.connection_id, m.user_id) for m in page] for page in paged]

    async def body():
        async with clients() as new:
            expected = set()
            for user in ("user0", "user1", "user2", "user3", None):
                expected.add(((await new(client_url(user, groups=["listed"]))).connection_id, user))
            await new(client_url("outsider"))

            everyone = [(m.connection_id, m.user_id) for m in service.list_connections(group="listed")]
            assert sorted(everyone, key=str) == sorted(expected, key=str)
            assert len(list(service.list_connections(group="listed", top=3))) == 3
            assert list(service.list_connections(group="nobody")) == []

            by_two = pages(service.list_connections(group="listed", maxpagesize=2).by_page())
            assert [len(p) for p in by_two] == [2, 2, 1]
            assert {m for p in by_two for m in p} == expected
            topped = pages(service.list_connections(group="listed", top=3, maxpagesize=2).by_page())
            assert [len(p) for p in topped] == [2, 1]
            assert topped == by_two[:1] + [by_two[1][:1]]

            first = first_page("listed", maxpagesize=2)
            assert len(first["value"]) == 2
            rest = pages(
                service.list_connections(group="listed", maxpagesize=2).by_page(continuation_token=first["nextLink"])
            )
            assert rest == by_two[1:]
            query = urllib.parse.parse_qs(urllib.parse.urlparse(first["nextLink"]).query)
            token = query["continuationToken"][0]
            after = service.list_connections(group="listed", maxpagesize=2, continuation_token_parameter=token)
            assert pages(after.by_page()) == by_two[1:]
            last = first_page("listed", maxpagesize=2, continuationToken=token, top=1)
            assert "nextLink" not in last or last["nextLink"] is None

            for bad in ({"maxpagesize": 201}, {"maxpagesize": 0}, {"top": 0}):
                with pytest.raises(HttpResponseError) as err:
                    first_page("listed", **bad)
                assert err.value.status_code == 400

    asyncio.run(body())


def test_client_access_token_options(emulator, service, client_url):
    async def body():
        token = service.get_client_access_token(
            user_id="tok", roles=["webpubsub.sendToGroup.only"], minutes_to_expire=2, groups=["g1", "g2"]
        )
        claims = jwt.decode(token["token"], options={"verify_signature": False})
        assert abs(claims["exp"] - claims["iat"] - 120) <= 1
        assert claims["aud"] == f"{emulator.endpoint}/client/hubs/{HUB}"
        async with clients() as new:
            listener = await new(client_url("listener", ROLES))
            await listener.sdk.join_group("only")
            c = await new(token["url"], message_retry_total=0)
            assert service.user_exists("tok")
            service.send_to_group("g2", "to g2", content_type="text/plain")
            assert (await get(c.server)).data == "to g2"
            assert service.group_exists("g1")
            await c.sdk.send_to_group("only", "from tok", WebPubSubDataType.TEXT)
            got = await get(listener.group)
            assert (got.data, got.from_user_id) == ("from tok", "tok")
            with pytest.raises(SendMessageError) as err:
                await c.sdk.join_group("other")
            assert err.value.error_detail.name == "Forbidden"
            with pytest.raises(SendMessageError):
                await c.sdk.send_to_group("other", "x", WebPubSubDataType.TEXT)

            default = service.get_client_access_token(client_protocol="Default")
            assert default["baseUrl"] == f"ws://127.0.0.1:{emulator.port}/client/hubs/{HUB}"
            await new(default["url"])

    asyncio.run(body())

    expired = service.get_client_access_token(user_id="late", minutes_to_expire=-1)
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(expired["url"].replace("ws://", "http://", 1), timeout=10)
    assert err.value.code == 401

    # MQTT and Socket.IO clients have their own paths; the emulator serves neither
    # and says so.
    for protocol in ("mqtt", "socketio"):
        other = service.get_client_access_token(client_protocol=protocol)
        assert f"/clients/{protocol}/hubs/{HUB}?" in other["url"]
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(other["url"].replace("ws://", "http://", 1), timeout=10)
        assert err.value.code == 501
        assert "not supported" in err.value.read().decode()


def test_generate_token_route_through_send_request(service):
    """`POST :generateToken`, which the SDK calls only with an Entra ID credential,
    through its own pipeline: every query parameter, and `clientType`."""

    def generate(**params):
        request = HttpRequest("POST", f"/api/hubs/{HUB}/:generateToken", params={"api-version": "2024-12-01", **params})
        return service.send_request(request)

    response = generate(userId="gen", role=["r1", "r2"], group=["g"], minutesToExpire=3)
    assert response.status_code == 200
    claims = jwt.decode(response.json()["token"], options={"verify_signature": False})
    assert claims["sub"] == "gen"
    assert claims["role"] == ["r1", "r2"]
    assert claims["webpubsub.group"] == ["g"]
    assert abs(claims["exp"] - claims["iat"] - 180) <= 1
    assert claims["aud"].endswith(f"/client/hubs/{HUB}")
    for client_type, path in (("Default", "client"), ("mqtt", "clients/mqtt"), ("MQTT", "clients/mqtt")):
        response = generate(clientType=client_type)
        assert response.status_code == 200
        claims = jwt.decode(response.json()["token"], options={"verify_signature": False})
        assert claims["aud"].endswith(f"/{path}/hubs/{HUB}"), (client_type, claims["aud"])
    assert generate(clientType="carrier-pigeon").status_code == 400
