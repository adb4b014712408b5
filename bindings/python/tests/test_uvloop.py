"""The asyncio client on uvloop's event loop, as an application that sets
``asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())`` (or runs ``uvloop.run``)
uses it: its own reader of the dispatch descriptor, thread-safe calls, handles and
debug mode differ from asyncio's loops (no ``_thread_id``, ``remove_reader`` returns
None, readers are libuv poll handles).

Each scenario runs in ``uvloop.run``, or on a loop it runs itself, with the loop in
debug mode; a scenario that compares uvloop with asyncio's loop runs on both. Nothing
may be logged by asyncio (a callback from the wrong thread, a slow callback, a
never-retrieved exception) nor warned (an unawaited coroutine, an unclosed resource).
uvloop is a test requirement (``scripts/requirements-test.txt``): without it these
tests fail, they do not skip.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import warnings
import weakref
from typing import Any, Awaitable, Callable, Iterator, List, Optional, TypeVar

import pytest
from conftest import FAST, WAIT, Emulator, Hub, Upstream, until, wait_until
from test_process import forgotten_clients_exit_cleanly

from webpubsub_client._callbacks import REGISTRY
from webpubsub_client.aio import WebPubSubClient
from webpubsub_client.models import CallbackType, OnGroupDataMessageArgs, SendMessageError, WebPubSubDataType

try:
    import uvloop
except ImportError:  # reported by the fixture below, as a failure of every test
    uvloop = None

T = TypeVar("T")


@pytest.fixture(autouse=True)
def clean_run(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Fails unless uvloop is installed; then records what asyncio logs at warning level
    and above, and every warning, during the test (the garbage it left collected): there
    must be none."""
    if uvloop is None:
        pytest.fail("uvloop is not installed: pip install -r scripts/requirements-test.txt")
    caplog.set_level(logging.WARNING, logger="asyncio")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
        gc.collect()
    logged = [r.getMessage() for r in caplog.records if r.name == "asyncio"]
    assert not logged, logged
    ours = [
        f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})"
        for w in caught
        if issubclass(w.category, (ResourceWarning, RuntimeWarning)) or "webpubsub_client" in w.filename
    ]
    assert not ours, ours


def run(main: Callable[[], Awaitable[T]], loop_factory: Optional[Callable[[], Any]] = None) -> T:
    """``main()`` in ``uvloop.run`` (a new uvloop loop in debug mode), bounded by a minute."""

    async def bounded() -> T:
        loop = asyncio.get_running_loop()
        assert isinstance(loop, uvloop.Loop) and loop.get_debug()
        # Debug mode's own cost (a traceback kept per handle and task) would make a busy
        # dispatch "slow": the other checks of debug mode are the ones wanted here.
        loop.slow_callback_duration = 10.0
        return await asyncio.wait_for(main(), 60)

    return uvloop.run(bounded(), loop_factory=loop_factory or uvloop.new_event_loop, debug=True)


def debug_loop(kind: str = "uvloop") -> Any:
    """A new loop in debug mode, uvloop's or asyncio's (``kind``), for a test that runs it
    itself (see ``run``)."""
    loop = uvloop.new_event_loop() if kind == "uvloop" else asyncio.new_event_loop()
    loop.set_debug(True)
    loop.slow_callback_duration = 10.0
    return loop


# A scenario that compares uvloop's loop with asyncio's runs on both.
KINDS = pytest.mark.parametrize("kind", ["uvloop", "asyncio"])


def make(url: Any, **kw: Any) -> WebPubSubClient:
    return WebPubSubClient(url, **{**FAST, **kw})


def test_open_join_send_receive_and_close(hub: Hub) -> None:
    """The round trip, with a plain and a coroutine listener, on the loop's thread, and a
    burst larger than one dispatch (the reader is called again while events are queued)."""
    burst = 600

    async def main() -> None:
        loop_thread = threading.get_ident()
        plain: List[str] = []
        threads: List[int] = []
        coroutine: List[str] = []
        events: List[str] = []

        def on_message(args: OnGroupDataMessageArgs) -> None:
            threads.append(threading.get_ident())
            plain.append(args.data)

        async def on_message_later(args: OnGroupDataMessageArgs) -> None:
            await asyncio.sleep(0)
            coroutine.append(args.data)

        client = make(hub.url())
        await client.subscribe(CallbackType.CONNECTED, lambda _args: events.append("connected"))
        await client.subscribe(CallbackType.STOPPED, lambda: events.append("stopped"))
        await client.subscribe(CallbackType.GROUP_MESSAGE, on_message)
        await client.subscribe(CallbackType.GROUP_MESSAGE, on_message_later)
        await client.open()
        assert (await client.join_group("g")).ack_id is not None
        result = await client.send_to_group("g", "hello", WebPubSubDataType.TEXT)
        assert result.ack_id is not None and not result.is_duplicated
        sends = [client.send_to_group("g", str(i), WebPubSubDataType.TEXT) for i in range(burst)]
        assert all(r.ack_id is not None for r in await asyncio.gather(*sends))
        expected = ["hello"] + [str(i) for i in range(burst)]
        await until(lambda: len(coroutine) == len(expected), "every message delivered")
        await client.close()
        await until(lambda: events[-1:] == ["stopped"], "the stopped event")
        assert plain == expected and sorted(coroutine, key=expected.index) == expected
        assert set(threads) == {loop_thread}
        assert events == ["connected", "stopped"]

    run(main)


def test_recovery_and_reconnect(hub: Hub) -> None:
    """A dropped socket is recovered (same connection, nothing lost); an unrecoverable
    drop reconnects (a new connection), rejoins the group and delivers again."""

    async def main() -> None:
        got: List[str] = []
        connected: List[str] = []
        disconnected: List[Optional[str]] = []
        client = make(hub.url())
        await client.subscribe(CallbackType.GROUP_MESSAGE, lambda args: got.append(args.data))
        # a REST send to a group arrives as a message from the server
        await client.subscribe(CallbackType.SERVER_MESSAGE, lambda args: got.append(args.data))
        await client.subscribe(CallbackType.CONNECTED, lambda args: connected.append(args.connection_id))
        await client.subscribe(CallbackType.DISCONNECTED, lambda args: disconnected.append(args.connection_id))
        loop = asyncio.get_running_loop()
        async with client:
            await client.join_group("g")
            first = client.connection_id
            assert first is not None
            await loop.run_in_executor(None, hub.drop, first)
            await client.send_to_group("g", "recovered", WebPubSubDataType.TEXT)
            await until(lambda: got == ["recovered"], "the message after the recovery")
            assert client.connection_id == first and connected == [first]
            await loop.run_in_executor(None, lambda: hub.drop(first, recoverable=False))
            await until(lambda: len(connected) == 2, "a new connection")
            assert disconnected == [first] and connected[1] != first

            def in_group() -> bool:
                return connected[1] in [c.connection_id for c in hub.service.list_connections(group="g")]

            await until(in_group, "the new connection rejoined the group")
            await loop.run_in_executor(None, lambda: hub.service.send_to_group("g", "after", content_type="text/plain"))
            await until(lambda: got == ["recovered", "after"], "the message after the reconnect")

    run(main)


def test_a_cancelled_send_is_cancelled_and_the_client_stays_usable(hub: Hub) -> None:
    async def main() -> None:
        async with make(hub.url()) as client:
            connection_id = client.connection_id
            assert connection_id is not None
            await client.join_group("g")
            registered = len(REGISTRY)
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, hub.drop_acks, connection_id, 1)
            task = asyncio.ensure_future(client.send_to_group("g", "cancelled", WebPubSubDataType.TEXT))
            await asyncio.sleep(0.05)
            assert not task.done()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            after = await client.send_to_group("g", "after", WebPubSubDataType.TEXT)
            assert after.ack_id is not None
            assert len(REGISTRY) <= registered  # the cancelled send's entry is gone

    run(main)


def test_close_from_inside_a_listener(hub: Hub) -> None:
    """A coroutine listener awaits ``close()`` of its own client: the close does not wait
    for that listener, and the stopped event follows."""

    async def main() -> None:
        closed = asyncio.Event()
        stopped: List[str] = []
        client = make(hub.url())

        async def close_on_bye(args: OnGroupDataMessageArgs) -> None:
            if args.data == "bye":
                await client.close()
                closed.set()

        await client.subscribe(CallbackType.GROUP_MESSAGE, close_on_bye)
        await client.subscribe(CallbackType.STOPPED, lambda: stopped.append("stopped"))
        await client.open()
        await client.join_group("g")
        await client.send_to_group("g", "bye", WebPubSubDataType.TEXT)
        await asyncio.wait_for(closed.wait(), WAIT)
        await until(lambda: stopped == ["stopped"], "the stopped event")
        assert not client.is_connected()

    run(main)


def test_a_refused_send_completes_on_the_loop_without_a_thread_hop(hub: Hub) -> None:
    """The completion of a send the service refuses (a callback, not a record) is
    dispatched by the loop's reader, like the others: its future gets its error in its
    place among the events, with no ``call_soon_threadsafe`` from the loop's own thread.
    uvloop's loop has no ``_thread_id``, which the client read to tell the loop's
    dispatch from a library thread: each refused send took a thread hop."""
    hops: List[str] = []
    loop_thread = threading.get_ident()  # run() runs the loop on this thread

    class CountingLoop(uvloop.Loop):  # type: ignore[misc, name-defined]
        def call_soon_threadsafe(self, callback: Any, *args: Any, **kwargs: Any) -> Any:
            if threading.get_ident() == loop_thread:
                hops.append(getattr(callback, "__name__", repr(callback)))
            return super().call_soon_threadsafe(callback, *args, **kwargs)

    async def main() -> None:
        async with make(hub.url(roles=["webpubsub.joinLeaveGroup"]), message_retry_total=0) as client:
            sends = [client.send_to_group("g", str(i), WebPubSubDataType.TEXT) for i in range(20)]
            refused = await asyncio.gather(*sends, return_exceptions=True)
        assert all(isinstance(error, SendMessageError) for error in refused), refused

    run(main, loop_factory=CountingLoop)
    assert hops == []


@KINDS
@pytest.mark.parametrize("where", ["another thread runs the loop", "the loop is stopped"])
def test_a_send_from_a_thread_running_no_loop_raises_and_sends_nothing(hub: Hub, kind: str, where: str) -> None:
    """A send driven by hand on a thread that runs no event loop raises asyncio's
    "no running event loop" before anything is sent: whether the client's loop runs on
    another thread, or was stopped on this one."""
    loop = debug_loop(kind)
    client = make(hub.url())
    got: List[str] = []

    async def start() -> None:
        await client.subscribe(CallbackType.GROUP_MESSAGE, lambda args: got.append(args.data))
        await client.open()
        await client.join_group("g")
        await client.send_to_group("g", "first", WebPubSubDataType.TEXT)
        await until(lambda: got == ["first"], "the first message")

    async def finish() -> None:  # a stray message would arrive before this one
        await client.send_to_group("g", "after", WebPubSubDataType.TEXT)
        await until(lambda: got[-1:] == ["after"], "the message after")
        await client.close()

    def stray() -> None:
        send = client.send_to_group("g", "stray", WebPubSubDataType.TEXT)
        with pytest.raises(RuntimeError, match="no running event loop"):
            send.send(None)

    try:
        if where == "the loop is stopped":
            loop.run_until_complete(start())
            stray()
            loop.run_until_complete(finish())
        else:
            thread = threading.Thread(target=loop.run_forever)
            thread.start()
            try:
                asyncio.run_coroutine_threadsafe(start(), loop).result(WAIT)
                stray()
                asyncio.run_coroutine_threadsafe(finish(), loop).result(WAIT)
            finally:
                loop.call_soon_threadsafe(loop.stop)
                thread.join(WAIT)
    finally:
        loop.close()
    assert got == ["first", "after"]


def test_a_client_left_open_is_freed_once_its_loop_is_closed(hub: Hub) -> None:
    """``uvloop.run`` ends with the client open (no ``close()``): the loop is closed, and
    the client, which nothing refers to, is collected and its connection closed."""
    refs: List["weakref.ref[WebPubSubClient]"] = []
    connections: List[Optional[str]] = []

    async def forget() -> None:
        client = make(hub.url())
        await client.subscribe(CallbackType.GROUP_MESSAGE, lambda _args: None)
        await client.open()
        await client.join_group("g")
        await client.send_to_group("g", "hi", WebPubSubDataType.TEXT)
        refs.append(weakref.ref(client))
        connections.append(client.connection_id)

    run(forget)
    gc.collect()
    assert refs[0]() is None, "the client outlived its loop"
    assert connections[0] is not None
    connection_id = connections[0]

    async def closed() -> None:
        loop = asyncio.get_running_loop()

        async def gone() -> bool:
            return not await loop.run_in_executor(None, hub.service.connection_exists, connection_id)

        deadline = loop.time() + WAIT
        while not await gone():
            assert loop.time() < deadline, "the forgotten client's connection is still open"
            await asyncio.sleep(0.05)

    run(closed)


def test_clients_left_open_exit_cleanly_with_the_uvloop_policy(hub: Hub) -> None:
    """The interpreter-exit scenario of ``test_process`` with the uvloop policy set."""
    forgotten_clients_exit_cleanly(hub, "import uvloop; asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())")


def test_a_held_client_whose_loop_ended_open_drops_its_messages_until_the_next_loop(
    upstream: Upstream, caplog: pytest.LogCaptureFixture
) -> None:
    """``uvloop.run`` ends with the client open, and the application keeps it: the
    messages that come before the next ``uvloop.run`` uses it (server messages, as the
    service's REST API sends to a group) are dropped and counted (see test_resources for
    the asyncio loop and the memory), and the client works there. Before, they were
    queued, and the next loop got them all."""
    caplog.set_level(logging.WARNING, logger="webpubsub_client")
    emulator = Emulator(upstream.url)  # its own: its unacknowledged count is the held client's
    try:
        hub = Hub(emulator)
        client = make(hub.url("held"))
        got: List[str] = []

        async def first() -> None:
            await client.subscribe(CallbackType.GROUP_MESSAGE, lambda args: got.append(args.data))
            await client.subscribe(CallbackType.SERVER_MESSAGE, lambda args: got.append(args.data))
            await client.open()
            await client.join_group("g")
            await client.send_to_group("g", "first", WebPubSubDataType.TEXT)
            await until(lambda: got == ["first"], "the first message")

        run(first)
        for i in range(100):
            hub.service.send_to_group("g", f"between {i}", content_type="text/plain")
        wait_until(lambda: emulator.stats()["unackedMessages"] == 0, what="the held client acknowledged them")

        async def second() -> None:
            await client.send_to_group("g", "second", WebPubSubDataType.TEXT)
            await until(lambda: got[-1:] == ["second"], "the second message")
            await client.close()

        run(second)
        assert got == ["first", "second"]
        dropped = [r.getMessage() for r in caplog.records if "they were dropped" in r.getMessage()]
        assert dropped == [
            "100 messages came while no event loop ran the client (its loop was closed while it "
            "was open); they were dropped"
        ]
    finally:
        emulator.close()
