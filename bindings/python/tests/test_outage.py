"""The service dies: its process is killed (every socket cut without a close frame), then
restarted on the same port without the sessions, or never restarted.

A killed emulator's port is free until it is restarted; another process may take it
meanwhile, which then fails the restart (rarely: the system hands out ports at random).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from typing import Any, Iterator, List

import pytest
from azure.messaging.webpubsubservice import WebPubSubServiceClient
from conftest import FAST, PROTOCOLS, WAIT, Collector, Emulator, Upstream, until, wait_until

import webpubsub_client.aio as aio
from webpubsub_client import WebPubSubClient, WebPubSubClientCredential
from webpubsub_client.models import (
    CallbackType,
    SendMessageError,
    WebPubSubClientState,
    WebPubSubDataType,
    WebPubSubProtocolType,
)

# Fixed, so that the tokens signed for the first emulator hold for the restarted one.
KEY = "outage-test-access-key-0123456789abcdefghijk"
TEXT = WebPubSubDataType.TEXT
CONNECTED = WebPubSubClientState.CONNECTED


class Service:
    """An emulator that can be killed and restarted on its port, and a URL provider for it
    that counts its calls."""

    def __init__(self, upstream: Upstream) -> None:
        self._upstream_url = upstream.url
        self.emulator = Emulator(self._upstream_url, "--access-key", KEY)
        self.port = self.emulator.port
        self._rest = WebPubSubServiceClient.from_connection_string(self.emulator.connection_string, hub="outage")
        self.calls = 0

    def url(self) -> str:
        self.calls += 1
        roles = ["webpubsub.joinLeaveGroup", "webpubsub.sendToGroup"]
        return self._rest.get_client_access_token(user_id="u", roles=roles)["url"]

    def restart(self) -> None:
        """A new emulator on the killed one's port, without its sessions."""
        self.emulator = Emulator(self._upstream_url, "--access-key", KEY, port=self.port)


@pytest.fixture
def service(upstream: Upstream) -> Iterator[Service]:
    """The service, and the upstream's ``held`` event ready to hold a send unacked."""
    upstream.holding.clear()
    upstream.release.clear()
    started = Service(upstream)
    yield started
    upstream.release.set()
    started.emulator.close()


@pytest.fixture(params=PROTOCOLS, ids=["reliable", "json"])
def protocol(request: Any) -> WebPubSubProtocolType:
    return request.param


def lifecycle(events: Collector) -> List[Any]:
    """The listeners of the lifecycle events, each adding ``(kind, connection id, close code)``."""
    return [
        (CallbackType.CONNECTED, lambda a: events(("connected", a.connection_id, None))),
        (CallbackType.DISCONNECTED, lambda a: events(("disconnected", a.connection_id, a.close_code))),
        (CallbackType.STOPPED, lambda: events(("stopped", None, None))),
    ]


def no_errors_logged(caplog: Any) -> None:
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []


def test_a_killed_service_that_comes_back_gets_a_new_connection_that_rejoins(
    service: Service, upstream: Upstream, protocol: WebPubSubProtocolType, caplog: Any
) -> None:
    """A group joined and a send waiting for its ack when the service dies: once it is back
    (without the session: a reliable client's recovery is refused with 1008), the client
    reports the loss (with no close code: the dying service sent none), connects anew
    with a fresh URL and rejoins the group; the send raises NotConnected with its ackId
    (to resend it with)."""
    reliable = protocol is WebPubSubProtocolType.JSON_RELIABLE
    events, got = Collector(), Collector()
    client = WebPubSubClient(
        WebPubSubClientCredential(service.url),
        protocol_type=protocol,
        **{**FAST, "message_retry_total": 0, "reconnect_retry_total": 50},
    )
    for kind, listener in lifecycle(events):
        client.subscribe(kind, listener)
    client.subscribe(CallbackType.GROUP_MESSAGE, lambda a: got(a.data))
    failures: List[SendMessageError] = []

    def send_held() -> None:
        try:
            client.send_event("held", "x", TEXT)
        except SendMessageError as exc:
            failures.append(exc)

    with client:
        client.join_group("g")
        old_id = client.connection_id
        sender = threading.Thread(target=send_held)
        sender.start()
        assert upstream.holding.wait(WAIT)
        service.emulator.kill()
        wait_until(lambda: client.state is not CONNECTED, what="the loss seen")
        service.restart()
        seen = events.wait_for(3)
        sender.join(WAIT)
        new_id = client.connection_id
        assert seen == [
            ("connected", old_id, None),
            ("disconnected", old_id, None),
            ("connected", new_id, None),
        ]
        assert new_id != old_id
        if reliable:
            assert service.calls == 2, "a recovery reuses the URL"
        assert [(type(e), e.error_detail.name, type(e.ack_id)) for e in failures] == [
            (SendMessageError, "NotConnected", int)
        ]
        client.send_to_group("g", "back", TEXT)
        assert got.wait_for(1) == ["back"]
    assert [kind for kind, _, _ in events.wait_for(5)] == [
        "connected",
        "disconnected",
        "connected",
        "disconnected",
        "stopped",
    ]
    no_errors_logged(caplog)


def test_a_service_that_never_comes_back_is_retried_per_the_policy_then_the_client_stops(
    service: Service, upstream: Upstream, protocol: WebPubSubProtocolType, caplog: Any
) -> None:
    """A send waiting for its ack fails within its ack timeout (while a reliable client
    still recovers); the client opens new connections per ``reconnect_retry_total``,
    then stops once, and ``close()`` then does nothing."""
    reliable = protocol is WebPubSubProtocolType.JSON_RELIABLE
    events = Collector()
    client = WebPubSubClient(
        WebPubSubClientCredential(service.url),
        protocol_type=protocol,
        **{**FAST, "ack_timeout": 1.0, "message_retry_total": 0, "reconnect_retry_total": 2, "recovery_timeout": 2.0},
    )
    for kind, listener in lifecycle(events):
        client.subscribe(kind, listener)
    outcome: List[Any] = []

    def send_held() -> None:
        sent = time.monotonic()
        try:
            client.send_event("held", "x", TEXT)
        except SendMessageError as exc:
            outcome.append((exc.error_detail.name, type(exc.ack_id), client.state, time.monotonic() - sent))

    client.open()
    sender = threading.Thread(target=send_held)
    sender.start()
    assert upstream.holding.wait(WAIT)
    service.emulator.kill()
    sender.join(WAIT)
    ((name, ack_id_type, state, waited),) = outcome
    if reliable:
        assert (name, ack_id_type, state) == ("Timeout", int, WebPubSubClientState.RECOVERING)
        assert waited < 1.8, "the ack timeout ran on during the recovery"
    else:
        assert (name, ack_id_type) == ("NotConnected", int)
    events.wait_until(lambda items: items[-1][0] == "stopped")
    assert client.state is WebPubSubClientState.STOPPED
    assert service.calls == 1 + 1 + 2, "open, then the first attempt and its 2 retries"
    time.sleep(0.3)  # nothing comes after the stop
    assert [kind for kind, _, _ in events.items] == ["connected", "disconnected", "stopped"]
    client.close()
    assert len(events) == 3
    no_errors_logged(caplog)


async def test_an_asyncio_client_through_two_outages(
    service: Service, upstream: Upstream, protocol: WebPubSubProtocolType, caplog: Any
) -> None:
    """The loop runs on while the service is away, and a send cancelled during the outage
    leaves the client usable once the service is back. ``close()`` during a second outage
    returns at once; the send still waiting for its ack then raises with its ackId
    (reliable: Stopped; json: NotConnected, at the loss)."""
    reliable = protocol is WebPubSubProtocolType.JSON_RELIABLE
    loop = asyncio.get_running_loop()
    ticks: List[float] = []

    async def tick() -> None:
        while True:
            ticks.append(loop.time())
            await asyncio.sleep(0.02)

    async def held_send_during_an_outage() -> "asyncio.Task[Any]":
        """A send the upstream holds unacked, then the service killed."""
        upstream.holding.clear()
        held = asyncio.create_task(client.send_event("held", "x", TEXT))
        assert await loop.run_in_executor(None, upstream.holding.wait, WAIT)
        await loop.run_in_executor(None, service.emulator.kill)
        await until(lambda: client.state is not CONNECTED, "the loss seen")
        return held

    events, got = Collector(), Collector()
    client = aio.WebPubSubClient(
        aio.WebPubSubClientCredential(service.url), protocol_type=protocol, **{**FAST, "reconnect_retry_total": 50}
    )
    for kind, listener in lifecycle(events):
        await client.subscribe(kind, listener)
    await client.subscribe(CallbackType.GROUP_MESSAGE, lambda a: got(a.data))
    ticker = asyncio.create_task(tick())
    try:
        await client.open()
        await client.join_group("g")
        first = await held_send_during_an_outage()
        ticks.clear()
        given_up = asyncio.create_task(client.send_to_group("g", "never", TEXT))
        await asyncio.sleep(0)
        given_up.cancel()
        with pytest.raises((asyncio.CancelledError, SendMessageError)):
            await given_up
        await until(lambda: len(ticks) >= 10, "ten ticks of the loop during the outage")
        await loop.run_in_executor(None, service.restart)
        await until(lambda: len(events) >= 3, "the new connection")
        # The loop ticked all along, from the loss to the new connection.
        assert max(b - a for a, b in itertools.pairwise(ticks)) < 0.5
        with pytest.raises(SendMessageError) as raised:
            await first
        assert raised.value.error_detail.name == "NotConnected"
        await client.send_to_group("g", "back", TEXT)  # the group rejoined
        await until(lambda: got.items == ["back"], "the message back")

        second = await held_send_during_an_outage()
        started = loop.time()
        await asyncio.wait_for(client.close(), WAIT)
        assert loop.time() - started < 1.0
        with pytest.raises(SendMessageError) as raised:
            await second
        assert raised.value.error_detail.name == ("Stopped" if reliable else "NotConnected")
        assert isinstance(raised.value.ack_id, int)
    finally:
        ticker.cancel()
    await until(lambda: len(events) >= 5, "the stop")
    kinds = [kind for kind, _, _ in events.items]
    assert kinds == ["connected", "disconnected", "connected", "disconnected", "stopped"]
    assert client.state is WebPubSubClientState.STOPPED
    assert got.items == ["back"]
    no_errors_logged(caplog)


def refused_after(send: Any, most: int) -> int:
    """Calls ``send()`` until it raises (at most ``most`` times); the number of calls it
    took. The refusal must be NotConnected, and at once (not once the 30 s recovery ends)."""
    for n in range(most):
        started = time.monotonic()
        try:
            send()
        except SendMessageError as exc:
            assert exc.error_detail is not None and exc.error_detail.name == "NotConnected", exc
            assert time.monotonic() - started < 5.0
            return n
    pytest.fail(f"{most} operations queued without a refusal")


def test_a_recovery_queues_16384_operations_or_16_mib_of_fire_and_forget_ones(service: Service) -> None:
    """While the service is away, a recovering client queues operations until 16,384 are
    queued or 16 MiB of fire-and-forget messages; new ones then raise NotConnected at
    once. (The queue may pass a limit by what was on its way when it filled.)"""
    options = {**FAST, "recovery_timeout": 30.0}
    many, large = (WebPubSubClient(WebPubSubClientCredential(service.url), **options) for _ in range(2))
    with many, large:
        service.emulator.kill()
        wait_until(lambda: many.state is large.state is WebPubSubClientState.RECOVERING, what="recovering")
        queued = refused_after(lambda: many.send_to_group("g", "x", TEXT, ack=False), 20_000)
        assert 16_384 <= queued <= 16_384 + 1024
        assert refused_after(lambda: many.send_to_group("g", "x", TEXT, ack=False), 1) == 0
        half_mib = "x" * (1 << 19)  # a frame holds at most 1 MiB
        queued = refused_after(lambda: large.send_to_group("g", half_mib, TEXT, ack=False), 100)
        assert 32 <= queued <= 36
        assert many.state is large.state is WebPubSubClientState.RECOVERING


async def test_a_recovery_takes_no_acked_operation_once_999_are_pending(service: Service) -> None:
    """Acked operations of an asyncio client queue during a recovery until 999 are pending
    (the 999th is taken); new ones then raise NotConnected at once, those pending wait on."""
    client = aio.WebPubSubClient(
        aio.WebPubSubClientCredential(service.url), **{**FAST, "recovery_timeout": 30.0, "ack_timeout": 30.0}
    )
    async with client:
        await asyncio.get_running_loop().run_in_executor(None, service.emulator.kill)
        await until(lambda: client.state is WebPubSubClientState.RECOVERING, "recovering")
        pending = [asyncio.create_task(client.send_to_group("g", str(n), TEXT)) for n in range(998)]
        await asyncio.sleep(0.3)
        await client.send_to_group("g", "queued", TEXT, ack=False)  # the queue takes more
        pending.append(asyncio.create_task(client.send_to_group("g", "998", TEXT)))
        await asyncio.sleep(0.3)
        started = asyncio.get_running_loop().time()
        with pytest.raises(SendMessageError) as refused:
            await client.send_to_group("g", "one more", TEXT)
        assert asyncio.get_running_loop().time() - started < 5.0  # not once the 30 s recovery ends
        assert refused.value.error_detail is not None and refused.value.error_detail.name == "NotConnected"
        with pytest.raises(SendMessageError):
            await client.send_to_group("g", "queued", TEXT, ack=False)
        assert not any(task.done() for task in pending)
    outcomes = await asyncio.gather(*pending, return_exceptions=True)
    assert {e.error_detail.name for e in outcomes} == {"Stopped"}  # type: ignore[union-attr]
