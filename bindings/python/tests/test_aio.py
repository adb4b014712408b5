"""The asyncio client against the real library and the emulator."""

from __future__ import annotations

import asyncio
import contextvars
import ctypes
import gc
import logging
import select
import socket
import sys
import threading
import time
import weakref
from typing import Any, Awaitable, Callable, List

import pytest
from conftest import (
    FAST,
    PROTOCOLS,
    WAIT,
    FailingProvider,
    Hub,
    TokenServiceError,
    Upstream,
    assert_keywords_logged,
    every_operation,
    until,
    wait_until,
)

from webpubsub_client import WebPubSubClient as SyncClient
from webpubsub_client import _base, _callbacks, _native
from webpubsub_client._callbacks import REGISTRY
from webpubsub_client.aio import WebPubSubClient, WebPubSubClientCredential
from webpubsub_client.aio import _client as aio_client
from webpubsub_client.models import (
    CallbackType,
    InvokeEventError,
    OnConnectedArgs,
    OnDisconnectedArgs,
    OnGroupDataMessageArgs,
    OpenClientError,
    SendMessageError,
    WebPubSubClientError,
    WebPubSubClientState,
    WebPubSubDataType,
    WebPubSubProtocolType,
)


def make(url: Any, protocol: WebPubSubProtocolType = WebPubSubProtocolType.JSON_RELIABLE, **kw: Any) -> WebPubSubClient:
    return WebPubSubClient(url, protocol_type=protocol, **{**FAST, **kw})


@pytest.fixture(params=PROTOCOLS, ids=["reliable", "json"])
def protocol(request: Any) -> WebPubSubProtocolType:
    return request.param


class AsyncCollector:
    """Collects listener arguments on the event loop; ``wait_for`` is bounded."""

    def __init__(self) -> None:
        self.items: List[Any] = []
        self._changed = asyncio.Event()

    def __call__(self, *args: Any) -> None:
        self.items.append(args[0] if len(args) == 1 else args)
        self._changed.set()

    async def wait_for(self, count: int, timeout: float = WAIT) -> List[Any]:
        return await self.wait_until(lambda items: len(items) >= count, timeout, f"{count} items")

    async def wait_until(
        self, predicate: Callable[[List[Any]], bool], timeout: float = WAIT, what: str = "the condition"
    ) -> List[Any]:
        async def reached() -> None:
            while not predicate(self.items):
                self._changed.clear()
                await self._changed.wait()

        try:
            await asyncio.wait_for(reached(), timeout)
        except asyncio.TimeoutError:
            pytest.fail(f"expected {what} within {timeout} s, got {self.items!r}")
        return list(self.items)


async def test_open_close_and_async_listeners(hub: Hub, protocol: WebPubSubProtocolType) -> None:
    connected, stopped = AsyncCollector(), AsyncCollector()
    loop = asyncio.get_running_loop()
    threads: List[bool] = []

    async def on_connected(args: OnConnectedArgs) -> None:
        threads.append(asyncio.get_running_loop() is loop)
        connected(args)

    client = make(hub.url("alice"), protocol)
    await client.subscribe(CallbackType.CONNECTED, on_connected)
    await client.subscribe(CallbackType.STOPPED, lambda: stopped("stopped"))  # plain functions work too
    await client.open()
    assert client.is_connected()
    (args,) = await connected.wait_for(1)
    assert args.user_id == "alice" and args.connection_id == client.connection_id
    assert threads == [True]  # listeners run on the loop that opened the client
    with pytest.raises(OpenClientError):
        await client.open()
    await client.close()
    await stopped.wait_for(1)
    await client.close()
    assert client.state is WebPubSubClientState.STOPPED


async def test_a_cancelled_open_stops_the_client_and_it_opens_again(hub: Hub) -> None:
    """open() awaits the library's start without a thread; cancelling it stops the client,
    so no connection stays up behind the cancelled call, and a later open() works."""
    stopped = AsyncCollector()
    client = make(hub.url("alice"))
    await client.subscribe(CallbackType.STOPPED, lambda: stopped("stopped"))
    task = asyncio.ensure_future(client.open())
    await asyncio.sleep(0)  # the start is handed over; its completion cannot be dispatched before the cancel
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await stopped.wait_for(1)
    assert client.state is WebPubSubClientState.STOPPED
    await client.open()
    assert client.is_connected()
    await client.close()
    assert client.state is WebPubSubClientState.STOPPED


async def test_open_again_right_after_a_cancelled_open(hub: Hub) -> None:
    """A cancelled open() ends once the client is stopped, as a sync open() that Ctrl-C
    ends, so a retry after ``asyncio.wait_for(client.open(), t)`` timed out connects. (The
    client read Connecting, and the retry raised "Client can be only started when it's
    Stopped".)"""
    asked = asyncio.Event()

    async def provide() -> str:
        asked.set()
        await asyncio.sleep(3600)
        return hub.url()

    client = make(WebPubSubClientCredential(provide))
    opening = asyncio.ensure_future(client.open())
    await asyncio.wait_for(asked.wait(), WAIT)
    assert client.state is WebPubSubClientState.CONNECTING
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(opening, 0.01)
    assert client.state is WebPubSubClientState.STOPPED
    retry = make(hub.url())
    for each in (client, retry):
        task = asyncio.ensure_future(each.open())
        await asyncio.sleep(0)  # the start is handed over
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert each.state is WebPubSubClientState.STOPPED
    await retry.open()
    assert retry.is_connected()
    await retry.close()


@pytest.mark.parametrize("provider", ["sync", "async"])
async def test_open_cancelled_while_connecting_ends_stopped_and_opens_again(provider: str, hub: Hub) -> None:
    """An open() cancelled while it connects (its provider has answered, the service does
    not) ends with the client stopped: the next open() of that client connects."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        urls = [f"ws://127.0.0.1:{silent.getsockname()[1]}/client/hubs/h", hub.url()]

        def sync_url() -> str:
            return urls.pop(0)

        async def async_url() -> str:
            return urls.pop(0)

        client = make(WebPubSubClientCredential(sync_url if provider == "sync" else async_url), start_timeout=WAIT * 6)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(client.open(), 0.3)
        assert client.state is WebPubSubClientState.STOPPED
        await asyncio.wait_for(client.open(), WAIT)
        assert client.is_connected()
        await client.close()


async def test_a_send_refused_before_it_was_written_has_no_ack_id_but_its_own(hub: Hub) -> None:
    """Not open (IllegalState): an acked send's error has no ackId, unless it named its own."""
    client = make(hub.url())
    for ack_id in (None, 7):
        with pytest.raises(SendMessageError) as info:
            await client.send_to_group("g", "x", WebPubSubDataType.TEXT, ack_id=ack_id)
        assert info.value.error_detail is not None and info.value.error_detail.name == "IllegalState"
        assert info.value.ack_id == ack_id


async def test_join_and_leave_report_the_ack_id_their_frame_carried_async(hub: Hub) -> None:
    """As with the sync client: join_group and leave_group report the ackId their frame
    carried, not an ``ack_id`` given to them."""
    client = make(hub.url(), message_retry_total=0)
    for operation in (client.join_group, client.leave_group):
        with pytest.raises(SendMessageError) as before:
            await operation("g", ack_id=5000)
        assert before.value.error_detail is not None and before.value.error_detail.name == "IllegalState"
        assert before.value.ack_id is None
    async with client:
        last = (await client.send_to_group("g", "x", WebPubSubDataType.TEXT)).ack_id
        assert last is not None
        for operation in (client.join_group, client.leave_group):
            assert (await operation("g", ack_id=5000)).ack_id == last + 1
            with pytest.raises(SendMessageError) as refused:
                await operation("a\nb", ack_id=5000)  # the service refuses a line feed in a group name
            assert refused.value.error_detail is not None and refused.value.error_detail.name == "BadRequest"
            assert refused.value.ack_id == last + 2
            last += 2


async def test_close_called_while_open_runs_stops_the_client_as_officially(hub: Hub) -> None:
    """close() called once open() has begun stops the client: the open fails (or has just
    succeeded) and the client ends stopped, as with the official client. The state read
    Stopped until the library's connection task took the start: close() took the client
    for stopped and returned at once, and the open then connected (about one round in
    three)."""
    for _ in range(20):
        client = make(hub.url())
        opening = asyncio.ensure_future(client.open())
        await asyncio.sleep(0)  # the start is handed to the library
        await client.close()
        try:
            await opening
        except OpenClientError:
            pass  # stopped before it connected
        assert client.state is WebPubSubClientState.STOPPED
        await client.close()


async def test_context_manager_and_round_trip(hub: Hub, protocol: WebPubSubProtocolType) -> None:
    got = AsyncCollector()
    async with make(hub.url("bob"), protocol) as client:
        await client.subscribe(CallbackType.GROUP_MESSAGE, got)
        await client.join_group("g")
        r1 = await client.send_to_group("g", "text", WebPubSubDataType.TEXT)
        r2 = await client.send_to_group("g", {"j": [1]}, WebPubSubDataType.JSON)
        await client.send_to_group("g", b"\x00b", WebPubSubDataType.BINARY, ack=False)
        assert r1.ack_id is not None and r2.ack_id is not None and r1.ack_id != r2.ack_id
        messages = await got.wait_for(3)
        await client.leave_group("g")
    assert [m.data if m.data_type != "binary" else bytes(m.data) for m in messages] == ["text", {"j": [1]}, b"\x00b"]
    assert all(isinstance(m, OnGroupDataMessageArgs) and m.from_user_id == "bob" for m in messages)
    assert not client.is_connected()


async def test_json_with_lone_surrogates_round_trips_as_with_the_official_client(hub: Hub) -> None:
    """UTF-8 cannot carry a lone surrogate: the JSON writes it as an escape, as the
    official client's writes every non-ASCII character (was a UnicodeEncodeError). Text
    has no escape for it: a ValueError naming the content."""
    content = {"lone": "a\ud800b", "\udfffkey": ["\u00e9", "\U0001f600"]}
    got = AsyncCollector()
    async with make(hub.url("bob")) as client:
        await client.subscribe(CallbackType.GROUP_MESSAGE, got)
        await client.join_group("g")
        await client.send_to_group("g", content, WebPubSubDataType.JSON)
        with pytest.raises(ValueError, match="content is not valid Unicode text"):
            await client.send_to_group("g", "a\ud800b", WebPubSubDataType.TEXT)
        await client.send_to_group("g", "after", WebPubSubDataType.TEXT)
        messages = await got.wait_for(2)
    assert [m.data for m in messages] == [content, "after"]


async def test_an_ack_id_with_ack_false_is_ignored_as_by_the_official_client_async(hub: Hub) -> None:
    """As for the sync client: the ``ack_id`` of a fire-and-forget message is left out."""
    got = AsyncCollector()
    async with make(hub.url("a")) as client:
        await client.subscribe(CallbackType.GROUP_MESSAGE, got)
        await client.join_group("g")
        result = await client.send_to_group("g", "1", "text", ack=False, ack_id=7)
        assert vars(result) == {"ack_id": None, "is_duplicated": False}
        result = await client.send_event("e", "2", "text", ack=False, ack_id=7)
        assert vars(result) == {"ack_id": None, "is_duplicated": False}
        result = await client.send_to_group("g", "3", "text", ack_id=7)
        assert vars(result) == {"ack_id": 7, "is_duplicated": False}
        assert [m.data for m in await got.wait_for(2)] == ["1", "3"]


async def test_keyword_arguments_the_official_client_ignores_are_ignored_async(hub: Hub, caplog: Any) -> None:
    """As for the sync client (names of this test only: each is logged once per process)."""
    caplog.set_level(logging.WARNING, logger="webpubsub_client.native")  # first: each call sets the capture level too
    caplog.set_level(logging.DEBUG, logger="webpubsub_client")
    extra = {"retry_total": 1, "ackId": 7}
    got = AsyncCollector()
    client = make(hub.url(), connection_verify=False)
    await client.subscribe(CallbackType.GROUP_MESSAGE, got, **extra)
    async with client:
        for _ in range(2):
            await client.join_group("g", logging_enable=True, **extra)
            await client.send_to_group("g", "acked", "text", logging_enable=True, **extra)
            await client.send_to_group("g", "queued", "text", ack=False, **extra)
            await client.send_event("e", "event", "text", **extra)
            await client.leave_group("other", **extra)
        await got.wait_for(4)
        await client.unsubscribe(CallbackType.GROUP_MESSAGE, got, **extra)
    assert_keywords_logged(caplog, "connection_verify", extra)


async def test_client_logging_enable_logs_every_outgoing_message_async(hub: Hub, caplog: Any) -> None:
    """As for the sync client: the constructor's ``logging_enable=True`` logs each outgoing
    message at debug level, as officially."""
    caplog.set_level(logging.WARNING, logger="webpubsub_client.native")  # first: each call sets the capture level too
    caplog.set_level(logging.DEBUG, logger="webpubsub_client")
    async with make(hub.url(), logging_enable=True) as client:
        await client.join_group("g")
        await client.send_to_group("g", "acked", "text")
        await client.send_to_group("g", "queued", "text", ack=False)
        await client.send_event("e", "event", "text")
        await client.leave_group("g")
    messages = [r.getMessage() for r in caplog.records if r.name == "webpubsub_client"]
    for expected in ("join_group 'g'", "send_to_group 'g': b'acked'", "send_to_group 'g': b'queued'"):
        assert expected in messages, messages
    assert "send_event 'e': b'event'" in messages, messages
    assert "leave_group 'g'" in messages, messages


async def test_async_listener_may_await_client_calls(hub: Hub, protocol: WebPubSubProtocolType) -> None:
    """The "callback deadlock" case for asyncio: a listener awaits a send."""
    got = AsyncCollector()
    async with make(hub.url(), protocol) as client:

        async def on_message(message: OnGroupDataMessageArgs) -> None:
            got(message)
            if message.data == "ping":
                await client.send_to_group("g", "pong", WebPubSubDataType.TEXT)

        await client.subscribe(CallbackType.GROUP_MESSAGE, on_message)
        await client.join_group("g")
        await client.send_to_group("g", "ping", WebPubSubDataType.TEXT)
        await got.wait_for(2)
    assert [m.data for m in got.items] == ["ping", "pong"]


@pytest.mark.parametrize("suspends", [False, True], ids=["returns", "suspends"])
async def test_coroutine_listeners_leave_nothing_to_the_garbage_collector(hub: Hub, suspends: bool) -> None:
    """Each coroutine listener runs in a task of its own; a done one (and its coroutine) is
    freed by its last reference, not left in a cycle (a task per message made the
    collector run often)."""
    got = AsyncCollector()

    async def on_message(message: OnGroupDataMessageArgs) -> None:
        if suspends:
            await asyncio.sleep(0)
        got(message)

    async with make(hub.url()) as client:
        await client.subscribe(CallbackType.GROUP_MESSAGE, on_message)
        await client.join_group("g")
        gc.collect()
        gc.disable()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            for i in range(50):
                await client.send_to_group("g", str(i), WebPubSubDataType.TEXT, ack=False)
            await got.wait_for(50)
            await asyncio.sleep(0.05)  # the last listener tasks are done and dropped
            gc.collect()
            # Only the coroutines of listener calls (the listener's, and before Python
            # 3.12 those of the tasks running them and their resumer): objects of
            # earlier tests' clients may become garbage meanwhile on other threads.
            calls = (
                on_message.__code__,
                aio_client._CallQueue._drain.__code__,  # pylint: disable=protected-access
                aio_client._CallQueue._go_on.__code__,  # pylint: disable=protected-access
                aio_client._hosting.__code__,  # pylint: disable=protected-access
                aio_client._resume.__code__,  # pylint: disable=protected-access
            )
            left = [o for o in gc.garbage if getattr(o, "cr_code", getattr(o, "gi_code", None)) in calls]
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            gc.enable()
    assert [m.data for m in got.items] == [str(i) for i in range(50)]
    assert left == []


async def test_server_messages_and_events(hub: Hub, upstream: Upstream) -> None:
    got = AsyncCollector()
    async with make(hub.url("carol")) as client:
        await client.subscribe(CallbackType.SERVER_MESSAGE, got)
        await asyncio.get_running_loop().run_in_executor(None, lambda: hub.service.send_to_user("carol", {"a": 1}))
        (message,) = await got.wait_for(1)
        assert message.data == {"a": 1} and message.data_type is WebPubSubDataType.JSON
        while not upstream.events.empty():
            upstream.events.get_nowait()
        await client.send_event("notify", "hello", WebPubSubDataType.TEXT)
        event = await asyncio.get_running_loop().run_in_executor(None, upstream.next_event)
    assert event["event"] == "notify" and event["body"] == b"hello"


async def test_invoke_and_cancellation(hub: Hub) -> None:
    async with make(hub.url()) as client:
        result = await client.invoke_event("echo", {"q": 1}, WebPubSubDataType.JSON)
        assert result.data == {"q": 1}
        with pytest.raises(InvokeEventError):
            await client.invoke_event("fail", "x", WebPubSubDataType.TEXT)
        started = time.monotonic()
        task = asyncio.ensure_future(client.invoke_event("slow", "x", WebPubSubDataType.TEXT))
        await asyncio.sleep(0)  # let the invocation start
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert time.monotonic() - started < 1.0
        # the client is still usable after a cancelled operation
        # (the emulator may finish the slow upstream call first: allow for it)
        again = await client.invoke_event("echo", "still here", WebPubSubDataType.TEXT, timeout=WAIT)
        assert again.data == "still here"


async def test_forbidden_and_not_connected_errors(hub: Hub) -> None:
    """Before ``open()`` and after ``close()`` every operation fails at once with
    ``error_detail.name`` "IllegalState", as in the sync client."""
    client = make(hub.url(roles=[]), message_retry_total=3, message_retry_backoff_factor=5.0)
    operations = every_operation(client)

    async def all_illegal() -> None:
        for n, operation in enumerate(operations):
            with pytest.raises(SendMessageError) as info:
                await asyncio.wait_for(operation(), 2.5)  # a retry would wait 5 s first
            assert isinstance(info.value, InvokeEventError) == (n == 6)
            assert info.value.error_detail is not None and info.value.error_detail.name == "IllegalState", n

    await all_illegal()
    async with client:
        with pytest.raises(SendMessageError) as info:
            await client.join_group("g")
    assert info.value.error_detail is not None and info.value.error_detail.name == "Forbidden"
    await all_illegal()


async def test_acked_sends_report_refusals_and_unsendable_states(hub: Hub) -> None:
    """An acked send's errors reach its awaiting coroutine: refused by the service (with
    the ackId and the service's error name) and not connected (before and after)."""
    client = make(hub.url(roles=["webpubsub.joinLeaveGroup"]), message_retry_total=0)
    with pytest.raises(SendMessageError):
        await client.send_to_group("g", "before open", WebPubSubDataType.TEXT)
    async with client:
        refused = await asyncio.gather(
            *(client.send_to_group("g", str(i), WebPubSubDataType.TEXT) for i in range(20)), return_exceptions=True
        )
        event = await client.send_event("notify", "x", WebPubSubDataType.TEXT)
    assert all(isinstance(e, SendMessageError) for e in refused), refused
    assert all(e.error_detail is not None and e.error_detail.name == "Forbidden" for e in refused)
    ack_ids = [e.ack_id for e in refused]
    assert None not in ack_ids and len(set(ack_ids)) == len(ack_ids)
    assert event.ack_id is not None and not event.is_duplicated
    with pytest.raises(SendMessageError):
        await client.send_event("notify", "after close", WebPubSubDataType.TEXT)


async def test_a_cancelled_send_is_cancelled_and_the_client_stays_usable(hub: Hub, caplog: Any) -> None:
    """Cancelling the coroutine awaiting an acked send raises CancelledError there; its
    completion, when it comes, is dropped without a trace or a leak, and later sends go on."""
    got = AsyncCollector()
    async with make(hub.url()) as client:
        await client.subscribe(CallbackType.GROUP_MESSAGE, got)
        await client.join_group("g")
        registered = len(REGISTRY)
        task = asyncio.ensure_future(client.send_to_group("g", "cancelled", WebPubSubDataType.TEXT))
        await asyncio.sleep(0)  # the send starts; its ack cannot be dispatched before the cancel
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        after = await client.send_to_group("g", "after", WebPubSubDataType.TEXT)
        assert after.ack_id is not None
        items = await got.wait_until(lambda items: "after" in [m.data for m in items])
        # at most: a client an earlier test left open is freed once its loop is closed,
        # and its entry may go meanwhile
        assert len(REGISTRY) <= registered
    assert [m.data for m in items][-1] == "after"
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.records


async def test_a_send_cancelled_after_its_client_was_freed_does_not_reach_the_freed_handle(
    hub: Hub, monkeypatch: Any
) -> None:
    """The await of a send is cancelled after the client's finalizer freed it (interpreter
    exit, a daemon loop still running): the cancellation is not passed to the freed
    handle, and the await ends cancelled."""
    cancels: List[Any] = []
    real = aio_client.lib.wps_client_cancel
    monkeypatch.setattr(aio_client.lib, "wps_client_cancel", lambda *args: cancels.append(args) or real(*args))
    client = make(hub.url())
    await client.open()
    task = asyncio.ensure_future(client.send_to_group("g", "late", WebPubSubDataType.TEXT))
    await asyncio.sleep(0)  # the send starts; its ack cannot be dispatched before the free
    client._finalizer()  # pylint: disable=protected-access
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not cancels, "no call with the freed handle"


async def test_a_send_completed_off_its_loop_thread_settles_on_its_loop() -> None:
    """A completion that the library runs on its own thread (the client was freed)
    reaches the future through its loop: a result and an error alike."""
    loop = asyncio.get_running_loop()
    ok_future = loop.create_future()
    failed_future = loop.create_future()
    ok = _native.WpsCompletion(status=_native.STATUS_OK, has_ack_id=True, ack_id=5)
    failed = _native.WpsCompletion(
        status=_native.STATUS_ACK_ERROR, has_ack_id=True, ack_id=6, error_name=b"Forbidden", error_message=b"no"
    )
    ok_key, failed_key = REGISTRY.add(ok_future), REGISTRY.add(failed_future)

    def complete() -> None:
        aio_client._ACKED_TRAMPOLINE(ok_key, ctypes.pointer(ok))  # pylint: disable=protected-access
        aio_client._ACKED_TRAMPOLINE(failed_key, ctypes.pointer(failed))  # pylint: disable=protected-access

    thread = threading.Thread(target=complete)
    thread.start()
    thread.join(WAIT)
    result = await asyncio.wait_for(ok_future, WAIT)
    assert (result.ack_id, result.is_duplicated) == (5, False)
    with pytest.raises(SendMessageError) as info:
        await asyncio.wait_for(failed_future, WAIT)
    assert info.value.ack_id == 6
    assert info.value.error_detail is not None and info.value.error_detail.name == "Forbidden"
    assert REGISTRY.get(ok_key) is None and REGISTRY.get(failed_key) is None


async def test_a_send_after_a_quiet_spell_is_not_held_for_the_next_loop_pass(hub: Hub) -> None:
    """Acked sends are deferred to the end of the loop pass, except one that follows a
    quiet spell: it reaches the service while its coroutine waits, even if the loop does
    not run again (here it is blocked on purpose)."""
    arrived = threading.Event()
    with SyncClient(hub.url(), **FAST) as subscriber:
        subscriber.subscribe(CallbackType.GROUP_MESSAGE, lambda _message: arrived.set())
        subscriber.join_group("g")
        async with make(hub.url()) as publisher:
            await asyncio.sleep(0.05)  # quiet
            send = publisher.send_to_group("g", "at once", "text")
            ack = send.send(None)  # runs the coroutine up to its wait for the ack
            try:
                assert arrived.wait(WAIT), "the message was held until the next loop pass"
            finally:  # finish the send as its task would: once the ack's future is done
                await asyncio.wait((ack,), timeout=WAIT)
                with pytest.raises(StopIteration) as done:
                    send.send(None)
            assert done.value.value.ack_id is not None


async def test_a_long_run_of_sends_is_handed_over_without_waiting_for_the_loop(hub: Hub, monkeypatch: Any) -> None:
    """In a run of acked sends the last of every ``FLUSH_EVERY`` is handed over at once,
    taking the deferred ones before it along: a long run travels while the loop is busy
    (here blocked on purpose), in order. No send counts as quiet here, so that no
    timing can start a new run."""
    monkeypatch.setattr(aio_client._Poller, "QUIET", float("inf"))
    run = aio_client._Poller.FLUSH_EVERY
    got: List[str] = []
    arrived = threading.Event()

    def on_message(message: Any) -> None:
        got.append(message.data)
        if len(got) == run:
            arrived.set()

    with SyncClient(hub.url(), **FAST) as subscriber:
        subscriber.subscribe(CallbackType.GROUP_MESSAGE, on_message)
        subscriber.join_group("g")
        async with make(hub.url()) as publisher:
            sends = [publisher.send_to_group("g", str(i), "text") for i in range(run)]
            acks = [send.send(None) for send in sends]  # each runs up to its wait for the ack
            try:
                assert arrived.wait(WAIT), f"{len(got)} of {run} arrived while the loop was blocked"
            finally:
                await asyncio.wait(acks, timeout=WAIT)
                for send in sends:
                    with pytest.raises(StopIteration):
                        send.send(None)
    assert got == [str(i) for i in range(run)]


async def test_fire_and_forget_in_every_state(hub: Hub) -> None:
    """A fire-and-forget send is queued on the loop thread: an error at once when the
    client is not open or closed; no error (the frame is queued) around a dropped socket."""
    client = make(hub.url(), message_retry_total=0)
    with pytest.raises(SendMessageError):
        await client.send_to_group("g", "before open", "text", ack=False)
    got = AsyncCollector()
    loop = asyncio.get_running_loop()
    async with make(hub.url()) as subscriber:
        await subscriber.subscribe(CallbackType.GROUP_MESSAGE, got)
        await subscriber.join_group("g")
        async with client:
            await client.send_to_group("g", "connected", "text", ack=False)
            await got.wait_for(1)
            await loop.run_in_executor(None, hub.drop, client.connection_id)
            for _ in range(100):  # while the client notices the drop and recovers
                result = await client.send_to_group("g", "around the drop", "text", ack=False)
                assert result.ack_id is None
            await client.send_to_group("g", "last", "text")  # acked: sent after the recovery
            await got.wait_until(lambda items: bool(items) and items[-1].data == "last")
        with pytest.raises(SendMessageError):
            await client.send_to_group("g", "after close", "text", ack=False)
    assert got.items[0].data == "connected"


async def test_a_fire_and_forget_send_waiting_for_room_raises_what_a_signal_handler_raised(hub: Hub) -> None:
    """A fire-and-forget send waits on the loop thread while the library's queue is full;
    on the main thread a signal handler runs meanwhile, and what it raised (Ctrl-C's
    KeyboardInterrupt) comes out of the send, not a SendMessageError 'Interrupted' that
    left the exception behind for a later call. (The check is tested with the sync
    client's waits; here the native send is stubbed to report its interruption.)"""

    def interrupted(*args: Any) -> int:
        _callbacks._raised[0] = KeyboardInterrupt()  # pylint: disable=protected-access
        return _native.STATUS_INTERRUPTED

    async with make(hub.url()) as client:
        with pytest.raises(KeyboardInterrupt):
            await client._send((interrupted, None, None), b"g", 0, b"x", 0, False, None)  # pylint: disable=protected-access
        assert _callbacks._raised == [None]  # pylint: disable=protected-access
        await client.send_to_group("g", "after", "text", ack=False)


async def test_async_credential_is_awaited_for_every_new_connection(hub: Hub) -> None:
    calls: List[str] = []

    async def provide() -> str:
        await asyncio.sleep(0)
        calls.append("called")
        return hub.url()

    connected = AsyncCollector()
    client = make(WebPubSubClientCredential(provide))
    await client.subscribe(CallbackType.CONNECTED, connected)
    async with client:
        await connected.wait_for(1)
        first = client.connection_id
        await asyncio.get_running_loop().run_in_executor(None, lambda: hub.drop(first, recoverable=False))
        again = (await connected.wait_for(2))[1]
        assert again.connection_id != first
    assert len(calls) == 2


async def test_async_credential_error_fails_open(hub: Hub) -> None:
    async def broken() -> str:
        raise RuntimeError("token service down")

    client = make(WebPubSubClientCredential(broken), reconnect_retry_total=0)
    # the provider's own exception, as the official open() raises it (test_compat)
    with pytest.raises(RuntimeError, match="token service down"):
        await client.open()
    assert client.state is WebPubSubClientState.STOPPED


async def test_the_async_credential_runs_on_the_loop_and_is_cancelled_after_the_start_timeout(
    hub: Hub, caplog: Any
) -> None:
    """The provider runs in a task on the client's loop, and the library's thread neither
    runs nor waits for it: the request is answered from the task's done callback. One
    still running once its connection attempt gave up (``start_timeout``) is cancelled,
    and not reported as the credential's failure (the start timed out)."""
    threads: List[int] = []
    cancelled = asyncio.Event()
    slow = [True]

    async def provide() -> str:
        threads.append(threading.get_ident())
        if slow[0]:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                cancelled.set()
                raise
        return hub.url()

    client = make(WebPubSubClientCredential(provide), start_timeout=0.5, reconnect_retry_total=0)
    with pytest.raises(OpenClientError):
        await client.open()
    await asyncio.wait_for(cancelled.wait(), WAIT)
    await asyncio.sleep(0.05)  # the cancelled provider's done callback has run
    assert not [r for r in caplog.records if "the credential failed" in r.getMessage()]
    slow[0] = False
    async with client:
        assert client.is_connected()
    assert threads == [threading.get_ident()] * 2


@pytest.mark.parametrize("how", ["close", "cancel"])
async def test_a_stop_during_open_cancels_the_async_credential(how: str, caplog: Any) -> None:
    """A close() during open(), or a cancelled open(), cancels the provider at once, as the
    official open() cancels the provider it awaits: its request is over. (It ran on until
    the start timeout.) The cancellation is no failure to warn about."""
    asked, cancelled = asyncio.Event(), asyncio.Event()

    async def provide() -> str:
        asked.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return "ws://127.0.0.1:9/client/hubs/h"

    client = make(WebPubSubClientCredential(provide), start_timeout=WAIT * 6, reconnect_retry_total=0)
    opening = asyncio.ensure_future(client.open())
    await asyncio.wait_for(asked.wait(), WAIT)
    if how == "close":
        await client.close()
        with pytest.raises(OpenClientError, match="stopped"):
            await opening
    else:
        opening.cancel()
        with pytest.raises(asyncio.CancelledError):
            await opening
    await asyncio.wait_for(cancelled.wait(), WAIT)
    assert client.state is WebPubSubClientState.STOPPED
    await asyncio.sleep(0.05)  # the cancelled provider's done callback has run
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


@pytest.mark.parametrize("first", ["open", "provider"])
async def test_a_provider_cancelled_with_the_open_is_no_failure_either(first: str, caplog: Any) -> None:
    """A cancelled open() cancels its provider before awaiting the stop: one cancelled
    along with it, as ``asyncio.run`` ending cancels every task in one pass (in either
    order), is no credential failure to warn about either. (It was warned about: the
    provider's cancellation was seen while the stop was awaited.)"""
    asked = asyncio.Event()

    async def provide() -> str:
        asked.set()
        await asyncio.sleep(3600)
        return "ws://127.0.0.1:9/client/hubs/h"

    client = make(WebPubSubClientCredential(provide), start_timeout=WAIT * 6, reconnect_retry_total=0)
    others = asyncio.all_tasks()
    opening = asyncio.ensure_future(client.open())
    await asyncio.wait_for(asked.wait(), WAIT)
    (provider,) = asyncio.all_tasks() - others - {opening}
    for task in (opening, provider) if first == "open" else (provider, opening):
        task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await opening
    assert client.state is WebPubSubClientState.STOPPED
    await asyncio.wait_for(asyncio.wait([provider]), WAIT)
    await asyncio.sleep(0.05)  # the cancelled provider's done callback has run
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


async def test_a_plain_provider_blocking_past_the_start_timeout_fails_open_only(hub: Hub) -> None:
    """A plain function provider cannot be cancelled: one that blocks past the start
    timeout fails that open() with the timeout, its late answer is dropped, and the next
    open() connects."""
    calls: List[int] = []

    def provide() -> str:
        calls.append(1)
        if len(calls) == 1:
            time.sleep(1.0)
        return hub.url()

    client = make(WebPubSubClientCredential(provide), start_timeout=0.3, reconnect_retry_total=0)
    with pytest.raises(OpenClientError, match="timed out after 0.3 s waiting for the credential"):
        await client.open()
    async with client:
        assert client.is_connected()
    assert len(calls) == 2


async def test_a_plain_providers_thread_refused_fails_open_with_a_client_error(hub: Hub, monkeypatch: Any) -> None:
    """The system refuses the thread a plain provider runs on (its thread limit): open()
    raises a WebPubSubClientError chained from the RuntimeError, as the sync clients'
    dispatch pool does, and the next open() connects. Before, the bare RuntimeError came
    out of open() as if the provider had raised it."""
    real_start = threading.Thread.start

    def start(thread: threading.Thread) -> None:
        if thread.name == "webpubsub-credential":
            raise RuntimeError("can't start new thread")
        real_start(thread)

    client = make(WebPubSubClientCredential(hub.url), reconnect_retry_total=0)
    monkeypatch.setattr(threading.Thread, "start", start)
    with pytest.raises(WebPubSubClientError) as info:
        await client.open()
    assert isinstance(info.value.__cause__, RuntimeError)
    assert "credential provider's thread" in str(info.value)
    monkeypatch.undo()
    async with client:
        assert client.is_connected()


async def test_a_plain_provider_runs_off_the_loop_and_a_cancelled_open_does_not_wait_for_it(hub: Hub) -> None:
    """A plain function provider (the official aio client takes coroutine functions only)
    runs on a thread of its own: while it blocks, the loop runs on, and an open()
    cancelled meanwhile ends without waiting for it; its late answer is dropped, and the
    next open() connects. (It ran on the loop, which it blocked, the cancel with it.)"""
    asked, release, finished = threading.Event(), threading.Event(), threading.Event()
    threads: List[int] = []

    def provide() -> str:
        threads.append(threading.get_ident())
        if len(threads) == 1:
            asked.set()
            release.wait(WAIT)
            finished.set()
        return hub.url()

    client = make(WebPubSubClientCredential(provide), start_timeout=WAIT * 6, reconnect_retry_total=0)
    opening = asyncio.ensure_future(client.open())
    await until(asked.is_set, "the provider's call")
    assert not finished.is_set(), "the loop ran only once the provider had returned"
    opening.cancel()
    with pytest.raises(asyncio.CancelledError):
        await opening
    assert not finished.is_set(), "the cancelled open() waited for the provider"
    assert client.state is WebPubSubClientState.STOPPED
    release.set()
    await until(finished.is_set, "the provider's return")
    async with client:
        assert client.is_connected()
    assert len(threads) == 2 and threading.get_ident() not in threads


async def test_a_wrong_async_credential_answer_fails_open(hub: Hub) -> None:
    async def not_a_str() -> Any:
        return 42

    async def with_nul() -> str:
        return hub.url() + "\0"

    for provide, text in ((not_a_str, "str URL"), (with_nul, "NUL")):
        client = make(WebPubSubClientCredential(provide), reconnect_retry_total=0)
        with pytest.raises(OpenClientError, match=text):
            await client.open()


async def test_an_abandoned_async_providers_late_error_is_not_raised_by_the_next_open(hub: Hub) -> None:
    """The provider of a request abandoned by its start timeout (its task lives on until
    cancelled, at 1 s at the least) raises while the next open() waits on a request of
    its own, which fails otherwise: that open() raises its own failure."""
    go = asyncio.Event()
    calls = [0]

    async def provide() -> Any:
        calls[0] += 1
        if calls[0] == 1:
            await go.wait()
            raise ValueError("stale")
        go.set()
        await asyncio.sleep(0.2)  # the stale request raises meanwhile
        return 42

    client = make(WebPubSubClientCredential(provide), start_timeout=0.5, reconnect_retry_total=0)
    with pytest.raises(OpenClientError):
        await client.open()
    with pytest.raises(OpenClientError, match="str URL"):
        await client.open()


async def test_recovery_after_drop_async(hub: Hub) -> None:
    got = AsyncCollector()
    total = 30
    async with make(hub.url()) as subscriber, make(hub.url()) as publisher:
        await subscriber.subscribe(CallbackType.GROUP_MESSAGE, got)
        await subscriber.join_group("g")
        connection_id = subscriber.connection_id
        loop = asyncio.get_running_loop()
        for i in range(total):
            if i == total // 2:
                await loop.run_in_executor(None, hub.drop, connection_id)
            await publisher.send_to_group("g", str(i), WebPubSubDataType.TEXT)
        await got.wait_for(total)
        assert subscriber.connection_id == connection_id
    assert [m.data for m in got.items] == [str(i) for i in range(total)]


async def _result_of(future: "asyncio.Future[Any]") -> Any:
    return await future


async def test_recorded_sends_settle_their_futures_on_their_own_loops() -> None:
    """Records (successes written by ``wps_client_dispatch_into``) settle their
    futures: on the dispatching loop at once, on another loop through that loop; a
    cancelled future and a key that is gone are skipped."""
    loop = asyncio.get_running_loop()
    other = asyncio.new_event_loop()
    thread = threading.Thread(target=other.run_forever)
    thread.start()
    try:
        here, cancelled = loop.create_future(), loop.create_future()
        cancelled.cancel()
        there = other.create_future()  # settled on its thread by the call_soon_threadsafe it gets
        keys = [REGISTRY.add(f) for f in (here, cancelled, there)]
        gone = REGISTRY.add(None)
        REGISTRY.pop(gone)
        records = (_native.WpsAckRecord * 4)(
            _native.WpsAckRecord(keys[0], 1, 7, True, False),
            _native.WpsAckRecord(keys[1], 2, 8, True, False),
            _native.WpsAckRecord(keys[2], 3, 9, True, True),
            _native.WpsAckRecord(gone, 4, 10, True, False),
        )
        aio_client._settle(loop, memoryview(records).cast("B"))  # pylint: disable=protected-access
        assert (here.result().ack_id, here.result().is_duplicated) == (7, False)
        result = asyncio.run_coroutine_threadsafe(_result_of(there), other).result(WAIT)
        assert (result.ack_id, result.is_duplicated) == (9, True)
        assert all(REGISTRY.get(key) is None for key in keys)
    finally:
        other.call_soon_threadsafe(other.stop)
        thread.join(WAIT)
        other.close()


async def test_a_record_for_a_closed_loop_is_skipped_and_the_ones_after_it_settle() -> None:
    """A send whose loop was closed before its ack came (nothing awaits it any more) is
    skipped: the records after it in the same call still settle their futures."""
    loop = asyncio.get_running_loop()
    closed = asyncio.new_event_loop()
    orphan = closed.create_future()
    closed.close()
    here = loop.create_future()
    keys = [REGISTRY.add(f) for f in (orphan, here)]
    records = (_native.WpsAckRecord * 2)(
        _native.WpsAckRecord(keys[0], 1, 7, True, False),
        _native.WpsAckRecord(keys[1], 2, 8, True, False),
    )
    aio_client._settle(loop, memoryview(records).cast("B"))  # pylint: disable=protected-access
    assert here.result().ack_id == 8
    assert not orphan.done()
    assert all(REGISTRY.get(key) is None for key in keys)


def test_calls_queued_behind_one_that_stops_the_loop_run_when_it_runs_again() -> None:
    """A call posted to the loop (an event from the dispatcher thread) that raises
    KeyboardInterrupt stops the loop; the calls queued behind it run once the loop runs
    again, without waiting for a next post, which may never come."""
    loop = asyncio.new_event_loop()
    batch = aio_client._LoopBatch(loop)  # pylint: disable=protected-access
    ran: List[str] = []

    def interrupting() -> None:
        ran.append("interrupting")
        raise KeyboardInterrupt

    try:
        for call in (interrupting, lambda: ran.append("second"), lambda: ran.append("third")):
            batch.post(call)
        with pytest.raises(KeyboardInterrupt):
            loop.run_until_complete(asyncio.sleep(WAIT))
        assert ran == ["interrupting"]
        loop.run_until_complete(asyncio.sleep(0.05))
        assert ran == ["interrupting", "second", "third"]
    finally:
        loop.close()


async def _until(got: List[str], count: int) -> None:
    """Returns once ``got`` holds ``count`` items, or after WAIT seconds."""
    deadline = time.monotonic() + WAIT
    while len(got) < count and time.monotonic() < deadline:
        await asyncio.sleep(0.01)


def test_a_listener_interrupting_the_loop_loses_none_of_the_messages_after_it(hub: Hub, monkeypatch: Any) -> None:
    """A KeyboardInterrupt from a listener stops the loop in the middle of a call's
    records: the messages after it, already taken from the library, arrive once the
    loop runs again, in order."""
    batches: List[int] = []
    real = aio_client._base.message_records  # pylint: disable=protected-access

    def counting(view: Any, count: int) -> Any:
        batches.append(count)
        return real(view, count)

    monkeypatch.setattr(aio_client._base, "message_records", counting)  # pylint: disable=protected-access
    got: List[str] = []
    interrupted: List[bool] = []

    def listener(message: OnGroupDataMessageArgs) -> None:
        got.append(message.data)
        if message.data == "2" and not interrupted:
            interrupted.append(True)
            raise KeyboardInterrupt

    loop = asyncio.new_event_loop()
    client = make(hub.url())
    try:
        loop.run_until_complete(client.subscribe(CallbackType.GROUP_MESSAGE, listener))
        loop.run_until_complete(client.open())
        loop.run_until_complete(client.join_group("g"))
        # Published while the loop does not run: the messages wait in the library, and
        # the loop's next dispatch takes them in one call.
        with SyncClient(hub.url()) as publisher:
            for i in range(1, 6):
                publisher.send_to_group("g", str(i), "text")
        time.sleep(0.3)
        with pytest.raises(KeyboardInterrupt):
            loop.run_until_complete(_until(got, 5))
        assert got == ["1", "2"]
        loop.run_until_complete(_until(got, 5))
        loop.run_until_complete(client.close())
    finally:
        loop.close()
    assert got == ["1", "2", "3", "4", "5"]
    assert max(batches) >= 3, f"the messages came in batches {batches}: no call held the ones after the interrupt"


@pytest.mark.parametrize("raised", [KeyboardInterrupt, SystemExit])
def test_a_listener_interrupting_the_loop_leaves_the_event_to_the_listeners_after_it(hub: Hub, raised: type) -> None:
    """A KeyboardInterrupt or SystemExit from a listener stops the loop, as in the official
    client (whose listener task re-raises it), once the listeners after it had the event:
    from a message record, and from an event that a library callback delivers (connected),
    which the poller raises once the native call has returned (it was logged before)."""
    connected: List[str] = []
    got: List[str] = []

    def payload_of(args: Any) -> str:
        return str(args.connection_id if isinstance(args, OnConnectedArgs) else args.data)

    def interrupting(args: Any) -> None:
        if payload_of(args) in ("1", client.connection_id):
            raise raised

    loop = asyncio.new_event_loop()
    client = make(hub.url())
    try:
        for kind, sink in ((CallbackType.CONNECTED, connected), (CallbackType.GROUP_MESSAGE, got)):
            loop.run_until_complete(client.subscribe(kind, interrupting))
            loop.run_until_complete(client.subscribe(kind, lambda args, sink=sink: sink.append(payload_of(args))))

        async def open_and_wait() -> None:
            await client.open()
            await _until(connected, 1)

        with pytest.raises(raised):
            loop.run_until_complete(open_and_wait())
        loop.run_until_complete(_until(connected, 1))
        loop.run_until_complete(client.join_group("g"))
        assert connected == [client.connection_id]
        with SyncClient(hub.url()) as publisher:
            publisher.send_to_group("g", "1", "text")
            publisher.send_to_group("g", "2", "text")
        with pytest.raises(raised):
            loop.run_until_complete(_until(got, 2))
        assert got[:1] == ["1"]
        loop.run_until_complete(_until(got, 2))
        loop.run_until_complete(client.close())
    finally:
        loop.close()
    assert got == ["1", "2"]


async def test_a_refused_dispatch_is_logged_and_its_stale_counts_are_not_read(hub: Hub, caplog: Any) -> None:
    """A dispatch the library refuses (one nested in a callback of the native dispatch)
    writes no counts: it is logged, and the records of the call before it are not settled
    again. No listener runs inside the native dispatch: the nested dispatch is made from
    the event callback itself."""
    results: List[Any] = []
    client = make(hub.url())
    poller = client._poller  # pylint: disable=protected-access
    sink = client._sink  # pylint: disable=protected-access
    convert = sink.on_native_event

    def nested(event: Any) -> None:
        convert(event)
        if not results:
            results.append(event)
            poller.dispatch()

    sink.on_native_event = nested  # type: ignore[method-assign]
    async with client:
        first = await client.send_to_group("g", "one", WebPubSubDataType.TEXT)
        second = await client.send_to_group("g", "two", WebPubSubDataType.TEXT)
    assert results, "the nested dispatch ran"
    assert first.ack_id is not None and second.ack_id == first.ack_id + 1
    refusals = [r for r in caplog.records if "dispatch failed" in r.getMessage()]
    assert refusals and "already running" in refusals[0].getMessage(), caplog.records


async def test_listeners_run_outside_the_native_dispatch(hub: Hub) -> None:
    """The listeners of the events the event callback brings (connected, disconnected,
    stopped, a message too big for the records buffer) run once the native dispatch has
    returned, as those of messages written as records do: a dispatch of the client made
    from one is not refused as nested. Inside the library, a listener still running at
    interpreter exit would be ended there, which aborts the process."""
    client = make(hub.url())
    statuses: List[Any] = []

    def probe(kind: str) -> Callable[..., None]:
        def listener(*_event: Any) -> None:
            statuses.append((kind, _native.lib.wps_client_dispatch(client._handle, 0, None)))

        return listener

    for kind in (CallbackType.CONNECTED, CallbackType.GROUP_MESSAGE, CallbackType.DISCONNECTED, CallbackType.STOPPED):
        await client.subscribe(kind, probe(kind.value))
    async with client:
        await client.join_group("g")
        await client.send_to_group("g", "x" * (_base.DispatchBuffers.MESSAGE_BYTES + 1), WebPubSubDataType.TEXT)
        await client.send_to_group("g", "small", WebPubSubDataType.TEXT)
        deadline = time.monotonic() + WAIT
        while sum(kind == "group-message" for kind, _ in statuses) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
    ok = _native.STATUS_OK
    expected = [(k, ok) for k in ("connected", "group-message", "group-message", "disconnected", "stopped")]
    assert statuses == expected


async def test_coroutine_listeners_start_before_the_awaiting_code_resumes(hub: Hub) -> None:
    """A coroutine listener of connected has started when open() returns, as when the
    listeners ran inside the native dispatch: the completion that resumes open() comes
    after the event, so its future gets its result after the listener's task is made."""
    seen: List[str] = []
    client = make(hub.url())

    async def on_connected(_event: Any) -> None:
        seen.append("connected")

    await client.subscribe(CallbackType.CONNECTED, on_connected)
    await client.open()
    seen.append("open returned")
    await client.close()
    assert seen == ["connected", "open returned"]


@pytest.mark.parametrize("awaiting_first", [False, True], ids=["alone", "after-an-awaiting-one"])
async def test_the_echo_of_an_acked_send_has_started_its_coroutine_listener_when_the_send_returns(
    hub: Hub, awaiting_first: bool
) -> None:
    """The service sends a group message to the group (the sender too) before it acks the
    send: when an awaited send returns, the coroutine listener of its echo has started,
    as in the official client and as when the ack takes the completion callback (a
    caller-chosen ackId). The ack, written as a record, was settled before the messages
    written as records in the same dispatch, so before Python 3.12 (no eager start) the
    sending code resumed before that listener's task first ran. So too behind a listener
    that awaits, as each in a task of its own: before Python 3.12 the calls after one
    that suspended were left to a task scheduled then, after the sending code the ack
    resumed (and never started if an asyncio.run ended meanwhile)."""
    seen: List[str] = []

    async def awaiting(_args: OnGroupDataMessageArgs) -> None:
        await asyncio.sleep(0)

    async def on_message(args: OnGroupDataMessageArgs) -> None:
        seen.append(args.data)

    late: List[str] = []
    async with make(hub.url()) as client:
        if awaiting_first:
            await client.subscribe(CallbackType.GROUP_MESSAGE, awaiting)
        await client.subscribe(CallbackType.GROUP_MESSAGE, on_message)
        await client.join_group("g")
        for n in range(20):
            await client.send_to_group("g", str(n), WebPubSubDataType.TEXT)
            if str(n) not in seen:
                late.append(str(n))
            await client.send_to_group("g", f"chosen {n}", WebPubSubDataType.TEXT, ack_id=1000 + n)
            if f"chosen {n}" not in seen:
                late.append(f"chosen {n}")
    assert not late, f"returned before the echo's listener started: {late}"


async def test_messages_written_as_records_and_by_callback_arrive_in_order(hub: Hub) -> None:
    """Messages reach listeners as records, except those larger than the records buffer,
    which take the event callback: in arrival order, with every field."""
    big = "x" * (_base.DispatchBuffers.MESSAGE_BYTES + 1)
    sent: List[Any] = ["a", big, {"j": "ü"}, b"\x00\xff" * 20_000, "é", b"", ""]
    kinds = [WebPubSubDataType.TEXT, WebPubSubDataType.TEXT, WebPubSubDataType.JSON, WebPubSubDataType.BINARY]
    kinds += [WebPubSubDataType.TEXT, WebPubSubDataType.BINARY, WebPubSubDataType.TEXT]
    got = AsyncCollector()
    async with make(hub.url("bob")) as subscriber, make(hub.url(None)) as anonymous:
        await subscriber.subscribe(CallbackType.GROUP_MESSAGE, got)
        await subscriber.join_group("g")
        for content, kind in zip(sent, kinds, strict=True):
            await anonymous.send_to_group("g", content, kind, ack=False)
        await got.wait_for(len(sent))
        await subscriber.send_to_group("g", "mine", WebPubSubDataType.TEXT)  # after the others: one sender at a time
        messages = await got.wait_for(len(sent) + 1)
    data = [bytes(m.data) if m.data_type is WebPubSubDataType.BINARY else m.data for m in messages]
    assert data == [*sent, "mine"]
    assert [m.data_type for m in messages] == [*kinds, WebPubSubDataType.TEXT]
    assert [m.from_user_id for m in messages] == [None] * len(sent) + ["bob"]
    assert all(m.group == "g" for m in messages)
    ids = [m.sequence_id for m in messages]
    assert all(i is not None for i in ids) and ids == sorted(ids) and len(set(ids)) == len(ids)


async def test_a_message_that_fails_to_convert_is_logged_and_the_others_arrive(
    hub: Hub, monkeypatch: Any, caplog: Any
) -> None:
    """One bad message among records is dropped with an error in the log, as its event
    callback would drop it; the messages around it still reach the listeners."""
    real = aio_client._base.decode_content  # pylint: disable=protected-access

    def decode(number: int, data: bytes, binary: Any) -> Any:
        if data == b'"boom"':
            raise RecursionError("hostile")
        return real(number, data, binary)

    monkeypatch.setattr(aio_client._base, "decode_content", decode)  # pylint: disable=protected-access
    got = AsyncCollector()
    async with make(hub.url()) as client:
        await client.subscribe(CallbackType.GROUP_MESSAGE, got)
        await client.join_group("g")
        for content in [1, "boom", 3]:
            await client.send_to_group("g", content, WebPubSubDataType.JSON, ack=False)
        await client.send_to_group("g", "end", WebPubSubDataType.TEXT)
        messages = await got.wait_for(3)
    assert [m.data for m in messages] == [1, 3, "end"]
    assert any("converting a message" in r.getMessage() for r in caplog.records)


async def test_a_listener_that_frees_the_client_stops_the_messages_after_it(hub: Hub) -> None:
    """Once a listener frees the client, no later message of the same records reaches a
    listener, as no event callback runs after a free."""
    got: List[Any] = []
    async with make(hub.url()) as sender:
        client = make(hub.url())

        def listener(message: OnGroupDataMessageArgs) -> None:
            got.append(message.data)
            client._finalizer()  # pylint: disable=protected-access

        await client.subscribe(CallbackType.GROUP_MESSAGE, listener)
        await client.open()
        await client.join_group("g")
        for i in range(50):
            await sender.send_to_group("g", str(i), WebPubSubDataType.TEXT, ack=False)
        await sender.send_to_group("g", "last", WebPubSubDataType.TEXT)
        deadline = time.monotonic() + WAIT
        while not got and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)
    assert got == ["0"]
    assert not client.is_connected()


async def test_a_dispatch_nested_in_a_message_listener_keeps_the_order(hub: Hub) -> None:
    """A message listener runs after the records are read, outside the native dispatch:
    a dispatch of its client nested in it returns at once, and the messages after it in
    the same records, then the next ones, still arrive in order."""
    got: List[Any] = []
    async with make(hub.url()) as client:
        poller = client._poller  # pylint: disable=protected-access

        def listener(message: OnGroupDataMessageArgs) -> None:
            got.append(message.data)
            poller.dispatch()

        await client.subscribe(CallbackType.GROUP_MESSAGE, listener)
        await client.join_group("g")
        for i in range(100):
            await client.send_to_group("g", str(i), WebPubSubDataType.TEXT, ack=False)
        results = await asyncio.gather(*(client.send_to_group("g", f"a{i}", WebPubSubDataType.TEXT) for i in range(50)))
        deadline = time.monotonic() + WAIT
        while len(got) < 150 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
    assert got == [str(i) for i in range(100)] + [f"a{i}" for i in range(50)]
    assert len({r.ack_id for r in results}) == 50


async def test_concurrent_operations_on_one_loop(hub: Hub) -> None:
    got = AsyncCollector()
    async with make(hub.url()) as client:
        await client.subscribe(CallbackType.GROUP_MESSAGE, got)
        await client.join_group("g")
        results = await asyncio.gather(*(client.send_to_group("g", str(i), "text") for i in range(50)))
        assert len({r.ack_id for r in results}) == 50
        await got.wait_for(50)
    assert sorted(int(m.data) for m in got.items) == list(range(50))


async def test_sends_started_together_arrive_in_start_order(hub: Hub) -> None:
    """Acked sends are deferred and sent together once per loop iteration (or every 32);
    fire-and-forget sends go at once and take the deferred ones along, in order."""
    total = 200
    got = AsyncCollector()
    async with make(hub.url()) as publisher, make(hub.url()) as subscriber:
        await subscriber.subscribe(CallbackType.GROUP_MESSAGE, got)
        await subscriber.join_group("g")
        results = await asyncio.gather(
            *(publisher.send_to_group("g", str(i), "text", ack=i % 7 != 0) for i in range(total))
        )
        assert sum(r.ack_id is not None for r in results) == total - len(range(0, total, 7))
        await got.wait_for(total)
        # one more, after a quiet spell: handed over at once
        await publisher.send_to_group("g", "last", "text")
        await got.wait_for(total + 1)
    assert [m.data for m in got.items] == [str(i) for i in range(total)] + ["last"]


async def test_sends_of_every_form_arrive_in_the_order_they_start(hub: Hub) -> None:
    """Sends from one loop reach the service in the order their coroutines start them,
    whatever their form: acked (deferred and handed over together), fire-and-forget (the
    blocking form, which hands the deferred ones over first) or with a caller-chosen
    ackId. A send awaited directly starts before the tasks made before it, which start on
    the loop's next pass (a fire-and-forget send does not suspend, so they start at the
    next acked one): the order is that of the calls, not of the task creations."""
    forms = [
        lambda text: publisher.send_to_group("g", text, WebPubSubDataType.TEXT),
        lambda text: publisher.send_to_group("g", text, WebPubSubDataType.TEXT, ack=False),
        lambda text: publisher.send_to_group("g", text, WebPubSubDataType.TEXT, ack_id=10_000 + int(text)),
    ]
    got = AsyncCollector()
    async with make(hub.url()) as publisher, make(hub.url()) as subscriber:
        await subscriber.subscribe(CallbackType.GROUP_MESSAGE, got)
        await subscriber.join_group("g")
        await asyncio.gather(*(forms[n % 3](str(n)) for n in range(1000)))
        expected = [str(n) for n in range(1000)]
        tasks, waiting = [], []
        for n in range(1000, 1100):
            if n % 10 == 0:  # awaited here: before the tasks made since the last suspension
                await forms[n % 3](str(n))
                expected.append(str(n))
                if n % 3 != 1:  # it waited for its ack: the tasks started meanwhile
                    expected += waiting
                    waiting = []
            else:
                tasks.append(asyncio.ensure_future(forms[n % 3](str(n))))
                waiting.append(str(n))
        await asyncio.gather(*tasks)
        messages = await got.wait_for(len(expected + waiting))
        expected += waiting
    assert [m.data for m in messages] == expected


def test_async_client_works_across_asyncio_run_calls(hub: Hub) -> None:
    """Each asyncio.run gets a new loop; opening again binds the listeners to the new loop."""
    client = make(hub.url())
    seen: List[str] = []

    async def session(tag: str) -> None:
        got = AsyncCollector()
        await client.subscribe(CallbackType.GROUP_MESSAGE, got)
        async with client:
            await client.join_group("g")
            await client.send_to_group("g", tag, "text")
            await got.wait_for(1)
        await client.unsubscribe(CallbackType.GROUP_MESSAGE, got)
        seen.extend(m.data for m in got.items)

    asyncio.run(session("first"))
    asyncio.run(session("second"))
    assert seen == ["first", "second"]


async def test_caller_chosen_ack_id_async(hub: Hub) -> None:
    async with make(hub.url()) as client:
        await client.join_group("g")
        first = await client.send_to_group("g", "x", WebPubSubDataType.TEXT, ack_id=77)
        again = await client.send_to_group("g", "x", WebPubSubDataType.TEXT, ack_id=77)
        event = await client.send_event("notify", "x", WebPubSubDataType.TEXT, ack_id=78)
    assert (first.ack_id, first.is_duplicated, again.is_duplicated) == (77, False, True)
    assert (event.ack_id, event.is_duplicated) == (78, False)


async def test_a_timed_out_send_reports_its_ack_id_and_a_resend_with_it_is_deduplicated(hub: Hub) -> None:
    got = AsyncCollector()
    async with make(hub.url(), message_retry_total=0, ack_timeout=0.5) as client:
        await client.subscribe(CallbackType.GROUP_MESSAGE, got)
        await client.join_group("g")
        hub.drop_acks(client.connection_id, 2)  # both delivered, their acks swallowed
        lost = []
        for text in ("one", "two"):
            with pytest.raises(SendMessageError) as info:
                await client.send_to_group("g", text, WebPubSubDataType.TEXT)
            assert info.value.error_detail is not None and info.value.error_detail.name == "Timeout"
            lost.append(info.value.ack_id)
        assert None not in lost and lost[0] != lost[1]
        for text, ack_id in zip(("one", "two"), lost, strict=True):
            again = await client.send_to_group("g", text, WebPubSubDataType.TEXT, ack_id=ack_id)
            assert (again.ack_id, again.is_duplicated) == (ack_id, True)
        await client.send_to_group("g", "marker", WebPubSubDataType.TEXT)
        await got.wait_for(3)
    assert [m.data for m in got.items] == ["one", "two", "marker"]


async def test_a_send_pending_at_close_reports_its_ack_id_async(hub: Hub) -> None:
    got = AsyncCollector()
    async with make(hub.url()) as client:
        await client.subscribe(CallbackType.GROUP_MESSAGE, got)
        await client.join_group("g")
        hub.drop_acks(client.connection_id, 1)  # delivered, its ack swallowed
        send = asyncio.ensure_future(client.send_to_group("g", "held", WebPubSubDataType.TEXT))
        await got.wait_for(1)  # the service has it: the client took it in
        await client.close()
        with pytest.raises(SendMessageError) as info:
            await asyncio.wait_for(send, WAIT)
    assert info.value.ack_id is not None
    assert info.value.error_detail is not None and info.value.error_detail.name == "Stopped"
    assert str(info.value.ack_id) in info.value.error_detail.message


async def test_stop_error_is_the_last_reconnect_attempts_failure_async(hub: Hub) -> None:
    """As in test_sync: a provider that starts failing; a coroutine stopped listener finds
    the last reconnect attempt's failure in ``stop_error``, and None after ``close()``."""
    url = hub.url()
    calls: List[int] = []

    async def provide() -> str:
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError(f"the token service answered 401 (call {len(calls)})")
        return url

    client = make(WebPubSubClientCredential(provide), reconnect_retry_total=2)
    seen = AsyncCollector()

    async def on_stopped() -> None:
        seen(client.stop_error)

    await client.subscribe(CallbackType.STOPPED, on_stopped)
    await client.open()
    loop = asyncio.get_running_loop()
    connection_id = client.connection_id
    assert connection_id is not None
    await loop.run_in_executor(None, lambda: hub.close_connection(connection_id, 1008))
    (error,) = await seen.wait_for(1)
    assert isinstance(error, OpenClientError)
    assert error.status == _native.STATUS_CREDENTIAL_FAILED
    # the start, then one attempt and 2 retries
    assert "RuntimeError: the token service answered 401 (call 4)" in str(error)
    assert len(calls) == 4
    calls.clear()
    await client.open()
    await client.close()
    assert (await seen.wait_for(2))[1] is None
    assert client.stop_error is None


@pytest.mark.parametrize("coroutine", [True, False], ids=["coroutine", "plain"])
async def test_stop_error_chains_what_the_provider_raised_async(hub: Hub, coroutine: bool) -> None:
    """As in test_sync: the reconnects give up because the provider (a coroutine function,
    or a plain one run on a thread) raises, and ``stop_error`` carries that exception as
    its ``__cause__``."""
    provide = FailingProvider(hub.url(), lambda call: call > 1)

    async def provide_async() -> str:
        return provide()

    client = make(WebPubSubClientCredential(provide_async if coroutine else provide), reconnect_retry_total=1)
    seen = AsyncCollector()
    await client.subscribe(CallbackType.STOPPED, lambda: seen(client.stop_error))
    await client.open()
    connection_id = client.connection_id
    assert connection_id is not None
    await asyncio.get_running_loop().run_in_executor(None, lambda: hub.close_connection(connection_id, 1008))
    (error,) = await seen.wait_for(1)
    assert isinstance(error, OpenClientError) and error.status == _native.STATUS_CREDENTIAL_FAILED
    assert len(provide.raised) == 2
    assert error.__cause__ is provide.raised[-1]  # the last attempt's
    await client.close()


async def test_open_clears_the_stop_error_async(hub: Hub) -> None:
    """As in test_sync: an ``open()`` clears ``stop_error`` as it begins, so a reopened
    client (or one whose reopen failed, which raised why) shows None."""
    url = hub.url()
    failing = False

    async def provide() -> str:
        if failing:
            raise TokenServiceError("401")
        return url

    client = make(WebPubSubClientCredential(provide), reconnect_retry_total=0, auto_reconnect=True)
    seen = AsyncCollector()
    await client.subscribe(CallbackType.STOPPED, lambda: seen(client.stop_error))
    await client.open()
    failing = True
    connection_id = client.connection_id
    assert connection_id is not None
    await asyncio.get_running_loop().run_in_executor(None, lambda: hub.close_connection(connection_id, 1008))
    assert isinstance((await seen.wait_for(1))[0], OpenClientError)
    assert isinstance(client.stop_error, OpenClientError)
    with pytest.raises(TokenServiceError):
        await client.open()
    assert client.stop_error is None
    failing = False
    await client.open()
    assert client.stop_error is None
    await client.close()
    assert client.stop_error is None


async def test_a_stop_whose_event_comes_after_a_reopen_does_not_outlive_it_async(hub: Hub) -> None:
    """As in test_sync: the state is the library's, read at once, and ``stop_error`` is set
    as the stopped event reaches the listeners, on the loop. Read before the loop ran
    (the loop held here), the state is Stopped and ``stop_error`` still None; an ``open()``
    then connects, the stopped listeners find the stop's error, and the new connection's
    ``connected`` event, which comes after, clears it. Before, the late stop's error
    stayed while connected."""
    client = make(hub.url(), reconnect_retry_total=0)
    stopped = AsyncCollector()
    await client.subscribe(CallbackType.STOPPED, lambda: stopped(client.stop_error))
    await client.open()
    connection_id = client.connection_id
    assert connection_id is not None
    hub.drop(connection_id, recoverable=False)  # on the loop: its reader does not run until the open()
    deadline = time.monotonic() + WAIT
    while client.state is not WebPubSubClientState.STOPPED:
        assert time.monotonic() < deadline, "not stopped"
        time.sleep(0.001)
    assert client.stop_error is None
    await client.open()
    (error,) = await stopped.wait_for(1)
    assert isinstance(error, WebPubSubClientError) and error.status == _native.STATUS_NOT_CONNECTED
    assert client.is_connected()
    assert client.stop_error is None
    await client.close()


async def test_disconnected_rejoin_failed_and_stopped_async(hub: Hub) -> None:
    """A lost session: disconnected, then a new connection whose URL may not rejoin the group."""
    urls = [hub.url(roles=["webpubsub.joinLeaveGroup"]), hub.url(roles=[])]

    async def provide() -> str:
        return urls.pop(0) if len(urls) > 1 else urls[0]

    disconnected, failed, stopped = AsyncCollector(), AsyncCollector(), AsyncCollector()
    client = make(WebPubSubClientCredential(provide))
    await client.subscribe(CallbackType.DISCONNECTED, disconnected)
    await client.subscribe(CallbackType.REJOIN_GROUP_FAILED, failed)
    await client.subscribe(CallbackType.STOPPED, lambda: stopped("stopped"))
    await client.open()
    await client.join_group("g")
    first = client.connection_id
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, lambda: hub.drop(first, recoverable=False))
    (lost,) = await disconnected.wait_for(1)
    assert lost.connection_id == first
    (rejoin,) = await failed.wait_for(1)
    assert rejoin.group == "g"
    assert isinstance(rejoin.error, SendMessageError)
    assert rejoin.error.error_detail is not None and rejoin.error.error_detail.name == "Forbidden"
    await client.close()
    await stopped.wait_for(1)


async def test_async_listener_exception_is_logged(hub: Hub, caplog: Any) -> None:
    got = AsyncCollector()

    async def broken(_: Any) -> None:
        raise RuntimeError("async listener bug")

    async with make(hub.url()) as client:
        await client.subscribe(CallbackType.GROUP_MESSAGE, broken)
        await client.subscribe(CallbackType.GROUP_MESSAGE, got)
        await client.join_group("g")
        await client.send_to_group("g", "x", WebPubSubDataType.TEXT)
        await client.send_to_group("g", "y", WebPubSubDataType.TEXT)
        await got.wait_for(2)
    assert any(
        r.name == "webpubsub_client" and r.exc_info and str(r.exc_info[1]) == "async listener bug"
        for r in caplog.records
    )


async def test_listeners_and_completions_run_on_the_loop_thread(hub: Hub) -> None:
    """The native callbacks are dispatched by the loop itself (poll mode): no thread hop."""
    loop_thread = threading.get_ident()
    threads: List[int] = []
    got = AsyncCollector()

    def on_message(args: OnGroupDataMessageArgs) -> None:
        threads.append(threading.get_ident())
        got(args)

    client = make(hub.url())
    await client.subscribe(CallbackType.GROUP_MESSAGE, on_message)
    async with client:
        await client.join_group("loop")
        sends = (client.send_to_group("loop", f"m{i}", WebPubSubDataType.TEXT) for i in range(200))
        results = await asyncio.gather(*sends)
        assert all(r.ack_id is not None for r in results)
        items = await got.wait_for(200)
    assert [a.data for a in items] == [f"m{i}" for i in range(200)]
    assert set(threads) == {loop_thread}


async def test_client_dropped_without_close_leaves_the_loop_clean(hub: Hub) -> None:
    """An open client that nothing refers to keeps running, as the official asyncio
    client's tasks keep it; closed and dropped, it is freed and its descriptor no longer
    watched."""
    loop = asyncio.get_running_loop()
    client = make(hub.url())
    await client.open()
    await client.join_group("g")
    fd = client._poller._native.fd  # pylint: disable=protected-access
    ref = weakref.ref(client)
    del client
    gc.collect()
    kept = ref()
    assert kept is not None and kept.is_connected()
    await kept.close()
    del kept
    for _ in range(50):  # the stopped event that lets it go may still be on its way
        gc.collect()
        if ref() is None:
            break
        await asyncio.sleep(0.05)
    assert ref() is None
    assert loop.remove_reader(fd) is False, "the dispatch descriptor is still watched"
    other = make(hub.url())
    async with other:
        assert (await other.join_group("g")).ack_id is not None


async def test_coroutine_listeners_start_in_order_and_may_suspend(hub: Hub, caplog: Any) -> None:
    """Coroutine listeners start in event order and may suspend (awaiting futures, sleeping,
    failing after an await); their errors are logged."""
    order: List[str] = []
    resumed = AsyncCollector()

    async def quick(args: OnGroupDataMessageArgs) -> None:
        order.append(args.data)

    async def slow(args: OnGroupDataMessageArgs) -> None:
        await asyncio.sleep(0)  # a bare yield
        await asyncio.sleep(0.01)  # a future
        if args.data == "boom":
            raise RuntimeError("late listener bug")
        resumed(args.data)

    async with make(hub.url()) as client:
        await client.subscribe(CallbackType.GROUP_MESSAGE, quick)
        await client.subscribe(CallbackType.GROUP_MESSAGE, slow)
        await client.join_group("g")
        for text in ["a", "boom", "b"]:
            await client.send_to_group("g", text, WebPubSubDataType.TEXT)
        assert await resumed.wait_for(2) == ["a", "b"]
    assert order == ["a", "boom", "b"]
    assert any(r.exc_info and str(r.exc_info[1]) == "late listener bug" for r in caplog.records)


async def test_a_coroutine_listener_runs_in_a_task_of_its_own(hub: Hub) -> None:
    """As in the official client, a coroutine listener runs in a task: ``asyncio.current_task()``
    is its own, and what needs a task works from its first line (``asyncio.timeout``, and
    ``asyncio.wait_for`` from Python 3.12). They raised RuntimeError("Timeout should be used
    inside a task") when the listener started outside any task."""
    outcomes = AsyncCollector()
    tasks: List[Any] = []

    async with make(hub.url()) as client:

        async def reply(args: OnGroupDataMessageArgs) -> None:
            try:
                tasks.append(asyncio.current_task())
                if hasattr(asyncio, "timeout"):  # Python 3.11+
                    async with asyncio.timeout(WAIT):
                        await client.send_to_group("replies", f"timeout {args.data}", WebPubSubDataType.TEXT)
                await asyncio.wait_for(
                    client.send_to_group("replies", f"wait_for {args.data}", WebPubSubDataType.TEXT), WAIT
                )
                outcomes("ok")
            except Exception as exc:  # noqa: BLE001 - reported below
                outcomes(repr(exc))

        await client.subscribe(CallbackType.GROUP_MESSAGE, reply)
        await client.join_group("g")
        for text in ["a", "b"]:
            await client.send_to_group("g", text, WebPubSubDataType.TEXT)
        assert await outcomes.wait_for(2) == ["ok", "ok"]
    assert all(task is not None for task in tasks) and len(set(map(id, tasks))) == 2


async def test_coroutine_listeners_of_one_burst_each_get_a_context_of_their_own(hub: Hub) -> None:
    """Each coroutine listener call runs in a copy of the context, as a task of its own
    would: what one sets is not seen by the next, even when they run one after another
    in one task (before Python 3.12, a burst's listeners that do not suspend)."""
    var: "contextvars.ContextVar[str]" = contextvars.ContextVar("var", default="unset")
    seen = AsyncCollector()

    async def on_message(args: OnGroupDataMessageArgs) -> None:
        seen(var.get())
        var.set(args.data)

    async with make(hub.url()) as client:
        await client.subscribe(CallbackType.GROUP_MESSAGE, on_message)
        await client.join_group("g")
        for n in range(50):
            await client.send_to_group("g", str(n), WebPubSubDataType.TEXT, ack=False)
        assert await seen.wait_for(50) == ["unset"] * 50
    assert var.get() == "unset"


# What close() logs for a group-message listener it cancels after its grace.
CANCELLED_AT_CLOSE = "a group-message listener was still running 1 s after close(); cancelled"


def warnings(caplog: Any) -> List[str]:
    """The warnings logged so far."""
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def sleeping_listener(log: List[str]) -> Callable[[Any], Awaitable[None]]:
    """A coroutine listener that logs "start", sleeps well past close()'s grace, and logs
    "cancelled" if it is cancelled."""

    async def sleeper(_args: Any) -> None:
        log.append("start")
        try:
            await asyncio.sleep(3 * WAIT)
        except asyncio.CancelledError:
            log.append("cancelled")
            raise

    return sleeper


async def test_close_waits_for_the_coroutine_listener_calls_not_started_yet(hub: Hub, caplog: Any) -> None:
    """A coroutine listener call that has not started when close() is called (before
    Python 3.12, it waits for the loop's next pass) is running as far as close() goes:
    close() waits for it, and cancels it 1 s after the stop, as a task created for it
    and not started yet. The calls after one that suspends go on in a task of their own;
    close() did not wait for them."""
    log: List[str] = []

    async def quick(_args: Any) -> None:
        log.append("quick")

    client = make(hub.url())
    await client.subscribe(CallbackType.GROUP_MESSAGE, sleeping_listener(log))
    await client.subscribe(CallbackType.GROUP_MESSAGE, quick)
    await client.open()
    # As a dispatch delivers an event, on the loop, just before close() is called.
    client._sink._dispatch(CallbackType.GROUP_MESSAGE, (None,))  # pylint: disable=protected-access
    started = time.monotonic()
    await client.close()
    took = time.monotonic() - started
    assert log == ["start", "quick", "cancelled"], log
    assert 0.9 < took < 2.5, took
    assert warnings(caplog) == [CANCELLED_AT_CLOSE]


async def test_close_from_a_coroutine_listener_waits_for_the_other_listeners_of_its_event(
    hub: Hub, caplog: Any
) -> None:
    """A close() made by one coroutine listener waits (up to 1 s) for the other listeners
    of the same event, which start after it, as for the tasks the official client makes
    for them together; then cancels them, with a warning. From Python 3.12, where the
    first listener's task starts eagerly, the second one's task did not exist yet when
    close() looked, and close() returned without it."""
    log: List[str] = []
    closed = asyncio.Event()
    client = make(hub.url())

    async def closer(_args: OnGroupDataMessageArgs) -> None:
        started = time.monotonic()
        await client.close()
        log.append(f"closed after {time.monotonic() - started:.1f} s")
        closed.set()

    await client.subscribe(CallbackType.GROUP_MESSAGE, closer)
    await client.subscribe(CallbackType.GROUP_MESSAGE, sleeping_listener(log))
    await client.open()
    await client.join_group("g")
    await client.send_to_group("g", "x", WebPubSubDataType.TEXT, ack=False)
    await asyncio.wait_for(closed.wait(), 3 * WAIT)
    assert log[:2] == ["start", "cancelled"], log
    assert 0.9 < float(log[2].split()[2]) < 2.5, log
    assert warnings(caplog) == [CANCELLED_AT_CLOSE]


async def test_close_from_a_task_a_finished_coroutine_listener_started_waits_for_the_listeners_after_it(
    hub: Hub,
) -> None:
    """A coroutine listener that returns at once, having started a task that closes the
    client, is done: close() waits for the other listeners running, the ones after it in
    the same loop pass too. Before Python 3.12 that task took the listener after it (which
    suspended in the task the finished one had run in) for its own, and close() returned
    without it."""
    closing: List["asyncio.Task[None]"] = []
    finished: List[str] = []
    client = make(hub.url())

    async def on_stop(args: OnGroupDataMessageArgs) -> None:
        if args.data == "stop":
            closing.append(asyncio.get_running_loop().create_task(client.close()))

    async def slow(args: OnGroupDataMessageArgs) -> None:
        await asyncio.sleep(0.3)
        finished.append(args.data)

    await client.subscribe(CallbackType.GROUP_MESSAGE, on_stop)
    await client.subscribe(CallbackType.GROUP_MESSAGE, slow)
    await client.open()
    await client.join_group("g")
    await client.send_to_group("g", "stop", WebPubSubDataType.TEXT, ack=False)
    await until(lambda: bool(closing), "the close() started by the listener")
    await asyncio.wait_for(closing[0], WAIT)
    assert finished == ["stop"]


def test_listeners_follow_the_client_to_a_new_loop_once_the_loop_that_opened_it_closed(hub: Hub) -> None:
    """The client is opened in one asyncio.run and used, still open, in the next: its
    listeners then run on the new loop. They were left on the closed one, so every event
    after it (messages, disconnected, stopped) was dropped while sends kept working."""
    client = make(hub.url())
    got: List[str] = []
    stopped: List[str] = []

    async def first() -> None:
        await client.subscribe(CallbackType.GROUP_MESSAGE, lambda args: got.append(args.data))
        await client.subscribe(CallbackType.STOPPED, lambda: stopped.append("stopped"))
        await client.open()
        await client.join_group("g")
        await client.send_to_group("g", "first", WebPubSubDataType.TEXT)
        await until(lambda: "first" in got)

    async def second() -> None:
        try:
            await client.send_to_group("g", "second", WebPubSubDataType.TEXT)
            await until(lambda: "second" in got)
        finally:
            await client.close()
        await until(lambda: bool(stopped))

    asyncio.run(first())
    asyncio.run(second())
    assert got == ["first", "second"] and stopped == ["stopped"]


def test_a_fire_and_forget_send_moves_the_client_to_a_new_loop(hub: Hub) -> None:
    """The client is opened in one asyncio.run and used, still open, in the next only
    through fire-and-forget sends: its listeners run on the new loop. That send never
    attached the client to the loop, so its events waited in the library, unbounded, for
    an operation that would."""
    client = make(hub.url())
    got: List[str] = []

    async def first() -> None:
        await client.subscribe(CallbackType.GROUP_MESSAGE, lambda args: got.append(args.data))
        await client.open()
        await client.join_group("g")
        await client.send_to_group("g", "first", WebPubSubDataType.TEXT)
        await until(lambda: got == ["first"])

    async def second() -> None:
        try:
            await client.send_to_group("g", "second", WebPubSubDataType.TEXT, ack=False)
            await until(lambda: got == ["first", "second"])
        finally:
            await client.close()

    asyncio.run(first())
    asyncio.run(second())


async def test_close_waits_for_the_listener_tasks_running_as_officially(hub: Hub, caplog: Any) -> None:
    """As the official close(), ours waits (up to 1 s) for the coroutine listeners still
    running when it is called, and cancels those still running then, with a warning. It
    returned at once, so such a listener was cancelled by the asyncio.run ending after an
    ``async with``; the disconnected and stopped listeners, started by the close itself,
    are not waited for (one may reopen the client), nor is a listener that calls close()."""
    log: List[str] = []
    closed_in_listener = asyncio.Event()
    client = make(hub.url())

    async def on_message(args: OnGroupDataMessageArgs) -> None:
        if args.data == "close":
            await client.close()  # from a listener: close() does not wait for its own task
            closed_in_listener.set()
            return
        log.append(f"start {args.data}")
        await asyncio.sleep(0.2 if args.data == "short" else 3 * WAIT)
        log.append(f"end {args.data}")

    async def on_stopped() -> None:
        await asyncio.sleep(1.5)
        log.append("stopped listener done")

    await client.subscribe(CallbackType.GROUP_MESSAGE, on_message)
    await client.subscribe(CallbackType.STOPPED, on_stopped)
    async with client:
        await client.join_group("g")
        await client.send_to_group("g", "short", WebPubSubDataType.TEXT)
        await client.send_to_group("g", "long", WebPubSubDataType.TEXT)
        while len(log) < 2:
            await asyncio.sleep(0.01)
        started = time.monotonic()
    took = time.monotonic() - started
    assert log == ["start short", "start long", "end short"], log
    assert 0.9 < took < 2.5, took
    assert warnings(caplog) == [CANCELLED_AT_CLOSE]
    await asyncio.sleep(1.6)
    assert log[-1] == "stopped listener done", "the stopped listener is not cancelled"

    await client.open()
    await client.join_group("g")
    started = time.monotonic()
    await client.send_to_group("g", "close", WebPubSubDataType.TEXT)
    await asyncio.wait_for(closed_in_listener.wait(), WAIT)
    assert time.monotonic() - started < 0.9
    assert client.state is WebPubSubClientState.STOPPED


async def test_concurrent_closes_cancel_a_listener_still_running_once(hub: Hub, caplog: Any) -> None:
    """Two close() calls at once, a coroutine listener still running 1 s later: it is
    cancelled once, with one warning, its cleanup after the cancellation runs to its end,
    and both calls return once it has. Before, each close() cancelled it and warned: the
    second cancellation cut its cleanup short."""
    client = make(hub.url())
    started = asyncio.Event()
    log: List[str] = []

    async def on_message(_args: OnGroupDataMessageArgs) -> None:
        started.set()
        try:
            await asyncio.sleep(3 * WAIT)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            assert task is not None
            log.append(f"cancelled {task.cancelling() if sys.version_info >= (3, 11) else 1} time(s)")
            await asyncio.sleep(0.2)  # its cleanup
            log.append("cleaned up")
            raise

    await client.subscribe(CallbackType.GROUP_MESSAGE, on_message)
    await client.open()
    await client.join_group("g")
    await client.send_to_group("g", "x", WebPubSubDataType.TEXT)
    await asyncio.wait_for(started.wait(), WAIT)
    await asyncio.wait_for(asyncio.gather(client.close(), client.close()), WAIT)
    assert log == ["cancelled 1 time(s)", "cleaned up"]
    assert warnings(caplog) == [CANCELLED_AT_CLOSE]
    assert client.state is WebPubSubClientState.STOPPED


@pytest.fixture
def patient_close(monkeypatch: Any) -> None:
    """``close()`` waits up to ``WAIT`` for the running listeners, not 1 s: a slow
    listener's 0.3 s then races no scheduling delay of a loaded machine."""
    monkeypatch.setattr(aio_client._AsyncSink, "LISTENER_GRACE", WAIT)


async def stopped_by_the_service(hub: Hub, seen: List[str], release: asyncio.Event) -> WebPubSubClient:
    """A client the service has just stopped (close code 1008, no reconnect), with a slow
    plain disconnected listener and a slow coroutine stopped listener, held from its start
    until ``release`` is set; ``seen`` gets what they did. The loop is held until the
    library has stopped the client: none of the stop's events has reached the loop yet."""
    client = make(hub.url(), auto_reconnect=False)

    def on_disconnected(_args: OnDisconnectedArgs) -> None:
        time.sleep(0.3)
        seen.append("disconnected")

    async def on_stopped() -> None:
        seen.append("stopped start")
        await release.wait()
        await asyncio.sleep(0.3)
        seen.append("stopped")

    await client.subscribe(CallbackType.DISCONNECTED, on_disconnected)
    await client.subscribe(CallbackType.STOPPED, on_stopped)
    await client.open()
    connection_id = client.connection_id
    assert connection_id is not None
    hub.close_connection(connection_id, 1008)
    wait_until(lambda: client.state is WebPubSubClientState.STOPPED, what="stopped by the service")
    assert not seen
    return client


@pytest.mark.usefixtures("patient_close")
@pytest.mark.parametrize("dispatched", [False, True], ids=["queued", "dispatched"])
async def test_close_of_a_client_stopped_by_the_service_returns_once_its_listeners_have_run_async(
    hub: Hub, caplog: Any, dispatched: bool
) -> None:
    """A program that leaves ``async with client:`` once its client stopped on its own,
    and ends ``asyncio.run`` then, gets the listeners of the stop's events run: close()
    returns once their events, queued or dispatched already, have reached the loop and
    their coroutine listeners have ended (as those running when it is called). Before,
    close() of a stopped client returned at once: the stop's events were still queued,
    or its coroutine listener still ran, and the end of ``asyncio.run`` lost them."""
    seen: List[str] = []
    release = asyncio.Event()
    release.set()
    client = await stopped_by_the_service(hub, seen, release)
    if dispatched:
        await until(lambda: "stopped start" in seen, "the stopped listener started")
    await client.close()
    assert seen == ["disconnected", "stopped start", "stopped"]
    assert not [w for w in warnings(caplog) if "after close()" in w]


@pytest.mark.usefixtures("patient_close")
async def test_close_after_a_reopen_waits_for_the_listeners_of_the_stop_before_it_async(hub: Hub) -> None:
    """Reopened while the coroutine listener of the stop on its own still runs (held until
    close() is called, however long the open took), then closed: close() returns once
    that listener has ended, as one running when it is called (so it did before the fix
    of a stopped client's close())."""
    seen: List[str] = []
    release = asyncio.Event()
    client = await stopped_by_the_service(hub, seen, release)
    await client.open()
    assert seen == ["disconnected", "stopped start"]
    release.set()
    await client.close()
    assert seen.count("disconnected") == 2 and seen.count("stopped start") == 2, seen
    assert "stopped" in seen


async def test_close_from_a_listener_of_a_stop_on_its_own_does_not_wait_for_itself(hub: Hub, caplog: Any) -> None:
    """A coroutine stopped listener of a client the service stopped closes it: that close()
    neither waits for its own listener nor deadlocks, and the close() of the program
    leaving ``async with client:`` meanwhile does not wait for a listener inside a close()
    (either would cancel it after 1 s, with a warning, and it would never finish)."""
    closed = asyncio.Event()
    client = make(hub.url(), auto_reconnect=False)

    async def on_stopped() -> None:
        await client.close()
        closed.set()

    await client.subscribe(CallbackType.STOPPED, on_stopped)
    async with client:
        connection_id = client.connection_id
        assert connection_id is not None
        hub.close_connection(connection_id, 1008)
        wait_until(lambda: client.state is WebPubSubClientState.STOPPED, what="stopped by the service")
    await asyncio.wait_for(closed.wait(), WAIT)
    assert not [w for w in warnings(caplog) if "after close()" in w]


def test_sends_on_a_loop_are_flushed_by_that_loop_while_another_holds_a_pending_flush(
    hub: Hub, monkeypatch: Any
) -> None:
    """Deferred sends are handed over by a flush that the loop sending them runs on its
    next pass. One flag said "a flush is scheduled" for every loop: once a loop stopped
    with its flush still pending (stopped from a callback, from another thread, or
    abandoned), or while that loop was busy in another thread, the sends of every other
    loop were deferred with no flush of their own and hung until some later send."""
    monkeypatch.setattr(aio_client._Poller, "QUIET", float("inf"))  # every send is deferred
    client = make(hub.url())
    first = asyncio.new_event_loop()
    try:
        first.run_until_complete(client.open())
        first.run_until_complete(client.join_group("g"))

        def burst() -> None:
            for i in range(3):
                first.create_task(client.send_to_group("g", f"first {i}", WebPubSubDataType.TEXT))
            first.call_soon(first.stop)  # runs after the sends, before their flush

        first.call_soon(burst)
        first.run_forever()  # stops with the flush pending

        async def second() -> List[Any]:
            try:
                sends = [client.send_to_group("g", f"second {i}", WebPubSubDataType.TEXT) for i in range(3)]
                return await asyncio.wait_for(asyncio.gather(*sends), WAIT / 2)
            finally:
                await client.close()

        results = asyncio.run(second())
        assert all(result.ack_id is not None for result in results)
    finally:
        for task in asyncio.all_tasks(first):
            task.cancel()
        first.run_until_complete(asyncio.sleep(0))  # the first loop's own flush runs at last
        first.close()


async def test_a_dispatch_its_loop_began_before_another_thread_moved_the_client_is_left_to_the_new_loop(
    hub: Hub, monkeypatch: Any
) -> None:
    """A client used from loops on two threads dispatches on the loop of its latest
    operation. When another thread moves it while its loop is about to run the reader (a
    pass took the reader's handle before it was removed), that dispatch took what had come
    for the new loop and settled the new loop's futures from the old loop's thread, which
    asyncio forbids: the new loop, asleep, was not woken, and in debug mode the call raised
    and the send never completed. The reader's call is simulated here as that pass makes it."""
    monkeypatch.setattr(aio_client._Poller, "QUIET", 0.0)  # every send handed over at once
    loop = asyncio.get_running_loop()
    async with make(hub.url()) as client:
        await client.join_group("g")
        fd = client._poller._native.fd  # pylint: disable=protected-access
        reader = loop._selector.get_key(fd).data[0]  # type: ignore[attr-defined]
        dispatch, args = reader._callback, reader._args  # what the pass calls, taken before the move
        started, resume = threading.Event(), threading.Event()
        outcome: List[Any] = []

        async def send_from_another_loop() -> None:
            send = asyncio.ensure_future(client.send_to_group("g", "there", WebPubSubDataType.TEXT))
            await asyncio.sleep(0)  # the send starts: the client dispatches on this loop now
            started.set()
            resume.wait(WAIT)  # this loop runs nothing meanwhile
            outcome.append(await asyncio.wait_for(send, WAIT / 2))

        def another_thread() -> None:
            other = asyncio.new_event_loop()
            other.set_debug(True)  # a call from another thread raises
            try:
                other.run_until_complete(send_from_another_loop())
            except BaseException as exc:  # noqa: BLE001 - reported below
                outcome.append(exc)
            finally:
                other.close()

        thread = threading.Thread(target=another_thread, daemon=True)  # a hung loop must not hang the exit
        thread.start()
        try:
            assert await loop.run_in_executor(None, started.wait, WAIT)
            readable, _, _ = await loop.run_in_executor(None, select.select, [fd], [], [], WAIT)
            assert readable, "the ack came"
            dispatch(*args)
        finally:
            resume.set()
            await loop.run_in_executor(None, thread.join, WAIT)
        assert len(outcome) == 1 and getattr(outcome[0], "ack_id", None) is not None, outcome
        after = await client.send_to_group("g", "here", WebPubSubDataType.TEXT)  # back on this loop
        assert after.ack_id is not None


async def test_a_loop_closed_while_it_dispatched_the_client_hands_it_to_a_loop_still_using_it(
    hub: Hub, upstream: Upstream
) -> None:
    """A client dispatches on the loop of its latest operation. When another thread's loop
    took it while this loop awaited an operation, and that loop was closed (its
    ``asyncio.run`` ended), the completion that came next had no loop to run it: the
    awaited operation never completed, and the client was suspended, dropping the
    messages for this loop's listeners. This loop dispatches the client again instead."""
    loop = asyncio.get_running_loop()
    messages = AsyncCollector()
    upstream.holding.clear()
    upstream.release.clear()
    async with make(hub.url()) as client:
        await client.subscribe(CallbackType.SERVER_MESSAGE, messages)
        invoke = asyncio.ensure_future(client.invoke_event("held", "late", WebPubSubDataType.TEXT, timeout=WAIT))
        try:
            assert await loop.run_in_executor(None, upstream.holding.wait, WAIT)
            outcome: List[Any] = []

            def another_thread() -> None:
                try:
                    outcome.append(asyncio.run(client.join_group("g"), debug=True))  # closes its loop
                except BaseException as exc:  # noqa: BLE001 - reported below
                    outcome.append(exc)

            thread = threading.Thread(target=another_thread, daemon=True)
            thread.start()
            await loop.run_in_executor(None, thread.join, WAIT)
            assert len(outcome) == 1 and getattr(outcome[0], "ack_id", None) is not None, outcome
            await loop.run_in_executor(None, lambda: hub.service.send_to_group("g", "after", content_type="text/plain"))
        finally:
            upstream.release.set()
        assert (await asyncio.wait_for(invoke, WAIT)).data == "late"
        assert [message.data for message in await messages.wait_for(1)] == ["after"]


def test_one_client_used_from_loops_on_two_threads_at_once(hub: Hub) -> None:
    """Each operation moves the client to its own loop (the one dispatching its
    completions), so one client used from two loops in two threads moves back and forth:
    every send completes, each thread's messages arrive in its order, the listeners stay
    on the loop that opened the client, and neither loop is called from the other's
    thread (both in debug mode, where such a call raises). The other loop, closed
    first, leaves the client to the opener's, still using it."""
    client = make(hub.url())
    got: List[str] = []
    listener_threads = set()
    opened, other_done = threading.Event(), threading.Event()
    outcomes: List[Any] = []

    def on_message(message: OnGroupDataMessageArgs) -> None:
        got.append(message.data)
        listener_threads.add(threading.get_ident())

    async def burst(tag: str) -> None:
        for round_ in range(10):
            sends = (
                client.send_to_group("g", f"{tag}{round_}.{n}", WebPubSubDataType.TEXT, ack=n % 5 != 0)
                for n in range(25)
            )
            await asyncio.wait_for(asyncio.gather(*sends), WAIT)
            await client.join_group(f"{tag}{round_}")

    async def opener() -> None:
        await client.subscribe(CallbackType.GROUP_MESSAGE, on_message)
        await client.open()
        try:
            await client.join_group("g")
            opened.set()
            await burst("a")
            # and the other loop's sends acked: a stop fails those still waiting for their acks
            await until(lambda: len(got) == 500 and other_done.is_set(), "every message and the other burst")
        finally:
            await client.close()

    def run(main: Callable[[], Any]) -> None:
        loop = asyncio.new_event_loop()
        loop.set_debug(True)
        loop.slow_callback_duration = WAIT
        try:
            loop.run_until_complete(main())
            outcomes.append(None)
        except BaseException as exc:  # noqa: BLE001 - reported below
            outcomes.append(exc)
        finally:
            loop.close()

    def run_other() -> None:
        if opened.wait(WAIT):
            run(lambda: burst("b"))
        other_done.set()

    other = threading.Thread(target=run_other, daemon=True)
    other.start()
    run(opener)
    other.join(WAIT)
    assert outcomes == [None, None], [(outcome, getattr(outcome, "error_detail", None)) for outcome in outcomes]
    for tag in "ab":
        assert [text for text in got if text.startswith(tag)] == [f"{tag}{r}.{n}" for r in range(10) for n in range(25)]
    assert listener_threads == {threading.get_ident()}


def test_a_send_started_as_its_loop_stopped_completes_when_that_loop_runs_again(hub: Hub, monkeypatch: Any) -> None:
    """An acked send waits for the flush its loop runs on its next pass: a loop stopped
    right after the send started (``run_until_complete`` returning) hands it over when
    it runs again, and the send completes there."""
    monkeypatch.setattr(aio_client._Poller, "QUIET", float("inf"))  # every send is deferred
    got: List[str] = []
    client = make(hub.url())
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(client.subscribe(CallbackType.GROUP_MESSAGE, lambda args: got.append(args.data)))
        loop.run_until_complete(client.open())
        loop.run_until_complete(client.join_group("g"))
        sends: List[Any] = []

        async def start() -> None:
            sends.append(asyncio.ensure_future(client.send_to_group("g", "held", WebPubSubDataType.TEXT)))
            await asyncio.sleep(0)  # the send starts; the loop stops before the flush

        loop.run_until_complete(start())
        assert not sends[0].done() and got == []
        result = loop.run_until_complete(asyncio.wait_for(sends[0], WAIT))
        assert result.ack_id is not None
        loop.run_until_complete(until(lambda: got == ["held"]))
    finally:
        loop.run_until_complete(client.close())
        loop.close()


async def test_sends_deferred_around_a_close_complete_or_fail_at_once(hub: Hub, monkeypatch: Any) -> None:
    """Acked sends still deferred when close() starts (before it, or after it in the
    same loop pass) are handed over before the stop or refused by it: each completes, or
    fails with "Stopped" (or "IllegalState" once stopped), at once rather than after its ack timeout."""
    monkeypatch.setattr(aio_client._Poller, "QUIET", float("inf"))  # every send is deferred

    def sends(client: WebPubSubClient, numbers: range) -> List["asyncio.Future[Any]"]:
        return [asyncio.ensure_future(client.send_to_group("g", str(n), WebPubSubDataType.TEXT)) for n in numbers]

    for close_first in (False, True):
        client = make(hub.url(), ack_timeout=WAIT)
        await client.open()
        await client.join_group("g")
        before = sends(client, range(5))
        await asyncio.sleep(0)  # they start, deferred
        closing = asyncio.ensure_future(client.close())
        after = sends(client, range(5, 10)) if close_first else []
        started = time.monotonic()
        outcomes = await asyncio.wait_for(asyncio.gather(*before, *after, return_exceptions=True), WAIT)
        await closing
        assert time.monotonic() - started < WAIT / 2
        for outcome in outcomes:
            if isinstance(outcome, SendMessageError):
                # "Stopped" while the stop runs, "IllegalState" once the client is stopped.
                names = ("Stopped", "IllegalState")
                assert outcome.error_detail is not None and outcome.error_detail.name in names, outcome
            else:
                assert outcome.ack_id is not None, outcome


async def test_a_closed_client_its_listeners_refer_to_is_collected(hub: Hub) -> None:
    """As in the sync client: a listener that refers to its client keeps a running client
    alive (an echo bot made in a function), but not a closed, dropped one, whose sink in
    the callback registry held the listener, and through it the client, until exit."""
    got = AsyncCollector()

    async def start_echo_bot() -> "weakref.ref[WebPubSubClient]":
        bot = make(hub.url("bot"))

        async def echo(message: Any) -> None:
            if message.data == "ping":
                await bot.send_to_group("g", "pong", WebPubSubDataType.TEXT)

        await bot.subscribe(CallbackType.GROUP_MESSAGE, echo)
        await bot.open()
        await bot.join_group("g")
        return weakref.ref(bot)

    bot_ref = await start_echo_bot()
    gc.collect()  # the running bot is kept alive by its listener
    async with make(hub.url("other")) as other:
        await other.subscribe(CallbackType.GROUP_MESSAGE, got)
        await other.join_group("g")
        await other.send_to_group("g", "ping", WebPubSubDataType.TEXT)
        await got.wait_until(lambda items: [m.data for m in items][-1:] == ["pong"])
    del other
    # Their own sinks, not the registry's size: a client an earlier test left open on its
    # loop is freed once that loop is closed, and its entry may go during this test.
    sinks = []
    for _ in range(3):
        client = make(hub.url())
        await client.subscribe(CallbackType.GROUP_MESSAGE, lambda _m, c=client: c.is_connected())
        await client.open()
        await client.close()
        sinks.append(weakref.ref(client._sink))  # pylint: disable=protected-access
        del client
    deadline = time.monotonic() + WAIT
    while any(sink() is not None for sink in sinks):  # a sink leaves the registry once freed
        left = sum(sink() is not None for sink in sinks)
        assert time.monotonic() < deadline, f"closed clients not freed: {left} sinks left"
        gc.collect()
        await asyncio.sleep(0.05)
    bot = bot_ref()
    assert bot is not None
    await bot.close()


async def test_close_awaited_by_a_listener_through_another_task_does_not_wait_for_that_listener(
    hub: Hub, caplog: Any
) -> None:
    """close() waits for the listener tasks running when it is called, except the
    caller's own; but a listener that awaits close() through a task of its own
    (``asyncio.gather``, ``asyncio.wait_for`` before Python 3.12, a ``TaskGroup``) was
    waited for by the very close() it awaits: 1 s lost, a warning, and the listener
    cancelled, so the rest of it never ran. Two listeners closing at once waited for
    each other the same way."""
    log: List[str] = []
    done = asyncio.Event()
    both = asyncio.Event()
    client = make(hub.url())

    async def on_message(args: OnGroupDataMessageArgs) -> None:
        try:
            if args.data == "gather":
                await asyncio.gather(client.close())
            elif args.data == "wait_for":
                await asyncio.wait_for(client.close(), 3 * WAIT)
            else:  # two listeners, each closing once both run
                log.append(f"start {args.data}")
                if sum(entry.startswith("start") for entry in log) == 2:
                    both.set()
                await both.wait()  # both go on in the same pass of the loop
                await client.close()
            log.append(f"after {args.data}")
        finally:
            done.set()

    await client.subscribe(CallbackType.GROUP_MESSAGE, on_message)
    for how in ("gather", "wait_for"):
        done.clear()
        await client.open()
        await client.join_group("g")
        started = time.monotonic()
        # Not acked: the echo's listener closes the client, which may come before the ack.
        await client.send_to_group("g", how, WebPubSubDataType.TEXT, ack=False)
        await asyncio.wait_for(done.wait(), WAIT)
        took = time.monotonic() - started
        assert log[-1:] == [f"after {how}"], (how, log)
        assert took < 0.9, (how, took)
        assert client.state is WebPubSubClientState.STOPPED

    # two listeners closing the client at once
    sender = make(hub.url())
    await sender.open()
    log.clear()
    await client.open()
    await client.join_group("g")
    started = time.monotonic()
    await sender.send_to_group("g", "one", WebPubSubDataType.TEXT, no_echo=True)
    await sender.send_to_group("g", "two", WebPubSubDataType.TEXT, no_echo=True)
    deadline = time.monotonic() + WAIT
    while len(log) < 4 and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    took = time.monotonic() - started
    await sender.close()
    assert sorted(log) == ["after one", "after two", "start one", "start two"], log
    assert took < 0.9, took
    assert not warnings(caplog)


# ---- a loop that falls behind ------------------------------------------------------------


BEHIND_BODY = [f"{n:05}".ljust(32 * 1024, ".") for n in range(360)]  # 11.25 MiB


def publish_while_the_loop_waits(hub: Hub) -> None:
    """Publishes ``BEHIND_BODY`` to group ``g`` from a sync client on the loop's thread.
    The loop runs nothing meanwhile: a subscriber with a small backlog stops reading, and
    most messages are still unacknowledged a second and a half later (a client that
    reads, even slowly, reads and acknowledges them within that time)."""
    with SyncClient(hub.url("pub"), **FAST) as publisher:
        for n, text in enumerate(BEHIND_BODY):  # the last acked: the emulator then has them all
            publisher.send_to_group("g", text, WebPubSubDataType.TEXT, ack=n == len(BEHIND_BODY) - 1)
        time.sleep(1.5)
        assert hub.emulator.stats()["unackedMessages"] >= len(BEHIND_BODY) // 2, hub.emulator.stats()


async def test_a_loop_that_falls_behind_pauses_reading_and_loses_nothing(hub: Hub) -> None:
    got: List[Any] = []

    async def on_message(args: OnGroupDataMessageArgs) -> None:
        got.append(args.data)

    subscriber = make(hub.url("sub"), event_backlog_bytes=256 << 10)
    await subscriber.subscribe(CallbackType.GROUP_MESSAGE, on_message)
    async with subscriber:
        await subscriber.join_group("g")
        publish_while_the_loop_waits(hub)
        await until(lambda: len(got) == len(BEHIND_BODY), "every message")
        assert got == BEHIND_BODY


async def test_listeners_awaiting_sends_while_the_reading_is_paused_all_get_their_acks(hub: Hub) -> None:
    """Each message's coroutine listener awaits an acked send, whose ack comes behind the
    messages the paused reading left unread: the loop dispatches the rest meanwhile, the
    backlog falls, and every ack comes."""
    got: List[Any] = []
    acked: List[Any] = []

    async def on_message(args: OnGroupDataMessageArgs) -> None:
        got.append(args.data)
        result = await subscriber.send_to_group("other", args.data[:5], WebPubSubDataType.TEXT)
        acked.append(result.ack_id)

    subscriber = make(hub.url("sub"), event_backlog_bytes=256 << 10)
    await subscriber.subscribe(CallbackType.GROUP_MESSAGE, on_message)
    async with subscriber:
        await subscriber.join_group("g")
        publish_while_the_loop_waits(hub)
        await until(lambda: len(acked) == len(BEHIND_BODY), "every listener's ack")
        assert got == BEHIND_BODY
        assert None not in acked


async def test_a_client_closed_while_its_reading_is_paused_closes_at_once(hub: Hub) -> None:
    got: List[Any] = []
    subscriber = make(hub.url("sub"), event_backlog_bytes=256 << 10)
    await subscriber.subscribe(CallbackType.GROUP_MESSAGE, lambda args: got.append(args.data[:5]))
    await subscriber.open()
    await subscriber.join_group("g")
    publish_while_the_loop_waits(hub)
    started = time.monotonic()
    await asyncio.wait_for(subscriber.close(), WAIT)
    assert time.monotonic() - started < 2.0
    assert subscriber.state is WebPubSubClientState.STOPPED
    assert got == [f"{n:05}" for n in range(len(got))]  # what waited, in order
