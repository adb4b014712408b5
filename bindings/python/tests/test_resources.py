"""Client lifecycles give back what they took. After repeated lifecycles of each kind
(opened and closed, never opened, failed, timed-out and cancelled opens, credential
providers answering or raising, recoveries, sends cancelled or pending at close, a loop
per client, a loop closed or dropped with its client open), of the sync and the asyncio
client, each client dropped and collected, the process holds no more descriptors of any
kind than after warm-up rounds (which make the shared runtime, the dispatch threads and
so on), no more threads,
no more objects of the binding's classes, no more entries in the callback registry, an
asyncio loop watches no more descriptors, and the native heap has not grown with the
rounds.

Linux only (it reads /proc), as the test suite is. Baselines are taken inside each
test, after its warm-up: other tests leave threads and clients behind in this process.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
import os
import socket
import threading
import time
import weakref
from collections import Counter
from typing import Any, Awaitable, Callable, Iterator, List, Optional

import pytest
from conftest import FAST, WAIT, Collector, Emulator, Hub, Upstream, until, wait_until

from webpubsub_client import WebPubSubClient, WebPubSubClientCredential
from webpubsub_client._callbacks import REGISTRY
from webpubsub_client.aio import WebPubSubClient as AsyncClient
from webpubsub_client.aio import WebPubSubClientCredential as AsyncCredential
from webpubsub_client.models import OpenClientError, WebPubSubDataType

HALF = 10  # rounds of a lifecycle in each of the two halves after its warm-up rounds
# Warm-up rounds: enough clients to start every dispatch thread of the sync client (one
# per processor, at most 4), each with its dispatch buffers.
WARM_UP = 4
THREAD_SLACK = 2  # the runtime's blocking pool keeps an idle thread for 10 s
# Native heap bytes each half may grow by, per round, in at least one of the two halves:
# a one-off growth lands in one half, a leak grows both. A coarse bound: this heap also
# holds the interpreter's larger objects and glibc's per-thread caches (each open() of
# the sync client runs on a new thread), and moves by up to ~25 KiB in a half without a
# leak. It catches a native client's state or dispatch buffers (tens of KiB);
# tests/resources.rs counts the library's own heap exactly.
HEAP_PER_ROUND = 8192


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


_LIBC = ctypes.CDLL(None)
_MALLINFO2 = getattr(_LIBC, "mallinfo2", None)
if _MALLINFO2 is not None:
    _MALLINFO2.restype = _MallInfo2


def native_heap() -> int:
    """Bytes malloc has handed out and not taken back (glibc), else the resident set size:
    the library's allocations, and the interpreter's larger ones."""
    if _MALLINFO2 is not None:
        info = _MALLINFO2()
        return int(info.uordblks + info.hblkhd)
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def binding_objects() -> Counter[str]:
    """Live objects of the binding's own classes (clients, sinks, dispatchers, ...), by class."""
    return Counter(
        type(obj).__qualname__ for obj in gc.get_objects() if str(type(obj).__module__).startswith("webpubsub_client")
    )


def descriptors() -> Counter[str]:
    """Open descriptors by kind: ``socket``, ``pipe``, ``eventfd``, ``eventpoll``, or a path."""
    kinds: Counter[str] = Counter()
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue  # the listing's own descriptor, closed by now
        kind, _, rest = target.partition(":")
        if kind == "anon_inode":
            kinds[rest.strip("[]")] += 1
        elif kind in ("socket", "pipe"):
            kinds[kind] += 1
        else:
            kinds[target] += 1
    return kinds


class Usage:
    """What the process holds now; ``loop``: also the descriptors that loop watches."""

    def __init__(self, loop: Optional[asyncio.AbstractEventLoop] = None) -> None:
        gc.collect()
        self.fds = descriptors()
        self.threads = len(os.listdir("/proc/self/task"))
        self.objects = binding_objects()
        self.registry = len(REGISTRY)
        self.watched = len(loop._selector.get_map()) if loop is not None else 0  # type: ignore[attr-defined]

    def within(self, baseline: "Usage") -> bool:
        return (
            all(count <= baseline.fds[kind] for kind, count in self.fds.items())
            and self.threads <= baseline.threads + THREAD_SLACK
            and all(count <= baseline.objects[kind] for kind, count in self.objects.items())
            and self.registry <= baseline.registry
            and self.watched <= baseline.watched
        )

    def __repr__(self) -> str:
        return (
            f"descriptors {dict(self.fds)}, {self.threads} threads, objects {dict(self.objects)}, "
            f"{self.registry} registry entries, {self.watched} descriptors watched by the loop"
        )


class Halves:
    """What a lifecycle's two halves left: their usage, and how much the heap grew in each."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.ends: List[Usage] = []
        self.growth: List[int] = []

    def check(self, baseline: Usage) -> None:
        """Fails unless each half ended ``within`` the baseline, and unless the heap grew
        within its bound in at least one half."""
        for half, end in enumerate(self.ends, 1):
            assert end.within(baseline), f"{self.name}: after {half * HALF} rounds {end!r}; baseline {baseline!r}"
        print(f"{self.name}: {baseline!r}; heap growth per half {self.growth} B")
        assert min(self.growth) < HALF * HEAP_PER_ROUND, (
            f"{self.name}: the native heap grew by {self.growth} B in halves of {HALF} rounds"
        )


def lifecycles(name: str, round_: Callable[[], None]) -> None:
    """Runs ``round_`` ``WARM_UP`` times, then two halves of ``HALF`` rounds; fails unless
    what the process holds came back after each half (waiting for it a bounded time),
    and unless the native heap stayed put in at least one half."""
    before = Usage()
    for _ in range(WARM_UP):
        round_()
    deadline = time.monotonic() + WAIT
    baseline = Usage()
    while baseline.registry > before.registry and time.monotonic() < deadline:  # the warm-up's clients go
        time.sleep(0.02)
        baseline = Usage()
    halves = Halves(name)
    for _ in range(2):
        start = native_heap()
        for _ in range(HALF):
            round_()
        deadline = time.monotonic() + WAIT
        end = Usage()
        while not end.within(baseline) and time.monotonic() < deadline:
            time.sleep(0.02)
            end = Usage()
        halves.ends.append(end)
        halves.growth.append(native_heap() - start)
    halves.check(baseline)


async def alifecycles(name: str, round_: Callable[[], Awaitable[None]]) -> None:
    """:func:`lifecycles` on the running loop, whose watched descriptors count too; each
    round bounded by ``WAIT``."""
    loop = asyncio.get_running_loop()
    before = Usage(loop)
    for _ in range(WARM_UP):
        await asyncio.wait_for(round_(), WAIT)
    deadline = time.monotonic() + WAIT
    baseline = Usage(loop)
    while baseline.registry > before.registry and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
        baseline = Usage(loop)
    halves = Halves(name)
    for _ in range(2):
        start = native_heap()
        for _ in range(HALF):
            await asyncio.wait_for(round_(), WAIT)
        deadline = time.monotonic() + WAIT
        end = Usage(loop)
        while not end.within(baseline) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
            end = Usage(loop)
        halves.ends.append(end)
        halves.growth.append(native_heap() - start)
    halves.check(baseline)


# ---- fixtures ---------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def quiet(caplog: pytest.LogCaptureFixture) -> None:
    """No log records of the library: pytest would keep each one (a failed open logs)."""
    caplog.set_level(logging.CRITICAL, logger="webpubsub_client")


@pytest.fixture
def refused_url() -> str:
    """A client URL whose port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"ws://127.0.0.1:{port}/client/hubs/h?access_token=t"


@pytest.fixture
def silent_url() -> Iterator[str]:
    """A client URL of a server that accepts and never answers; it closes each socket
    once the client has closed its end."""
    listener = socket.create_server(("127.0.0.1", 0))

    def hold(conn: socket.socket) -> None:
        with conn:
            while conn.recv(1024):
                pass

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=hold, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    yield f"ws://127.0.0.1:{listener.getsockname()[1]}/client/hubs/h?access_token=t"
    listener.close()


def unauthorized(hub: Hub) -> str:
    """A client URL of the hub whose token the emulator refuses (401)."""
    return hub.url().split("access_token=")[0] + "access_token=bad"


# ---- sync client ------------------------------------------------------------------------


def make(url: Any, **kw: Any) -> WebPubSubClient:
    return WebPubSubClient(url, **{**FAST, **kw})


def test_sync_lifecycles_give_back_what_they_took(hub: Hub, refused_url: str, silent_url: str) -> None:
    def used() -> None:
        with make(hub.url()) as client:
            client.join_group("g")
            client.send_to_group("g", "hi", WebPubSubDataType.TEXT)

    def never_opened() -> None:
        make(hub.url())

    def open_fails(url: str, **kw: Any) -> Callable[[], None]:
        def round_() -> None:
            with pytest.raises(OpenClientError):
                make(url, **kw).open()

        return round_

    def provided() -> None:
        with make(WebPubSubClientCredential(hub.url)) as client:
            client.join_group("g")

    def provider_raises() -> None:
        def refuse() -> str:
            raise LookupError("no token")

        with pytest.raises(LookupError):
            make(WebPubSubClientCredential(refuse)).open()

    lifecycles("sync: open, join, send, close", used)
    lifecycles("sync: never opened", never_opened)
    lifecycles("sync: open refused", open_fails(refused_url))
    lifecycles("sync: open unauthorized", open_fails(unauthorized(hub)))
    lifecycles("sync: open over TLS to a plain server", open_fails(hub.url().replace("ws://", "wss://", 1)))
    lifecycles("sync: open timeout", open_fails(silent_url, start_timeout=0.05))
    lifecycles("sync: credential provider", provided)
    lifecycles("sync: credential provider raising", provider_raises)


def test_a_dropped_sync_client_is_collected_while_its_dispatch_thread_waits(hub: Hub) -> None:
    """A closed client dropped by the application goes at once, with its listener (an
    object the client's listeners hold, which received its messages) and the parts of it
    that its dispatch thread used for its last events (its sink): the thread, now idle,
    does not keep them until another client's events wake it up."""

    class Listener:
        def __init__(self) -> None:
            self.messages = Collector()
            self.stopped = threading.Event()

    def run() -> List["weakref.ref[Any]"]:
        listener = Listener()
        client = make(hub.url())
        client.subscribe("group-message", listener.messages)
        client.subscribe("stopped", listener.stopped.set)
        client.open()
        client.join_group("g")
        client.send_to_group("g", "hi", WebPubSubDataType.TEXT)
        listener.messages.wait_for(1)
        client.close()
        assert listener.stopped.wait(WAIT)
        return [weakref.ref(client), weakref.ref(listener), weakref.ref(client._sink)]

    references = run()

    def collected() -> bool:
        gc.collect()
        return all(reference() is None for reference in references)

    wait_until(collected, what="the dropped client, its listener and its sink collected")


def test_sync_recoveries_give_back_what_they_took(hub: Hub) -> None:
    with make(hub.url(), recovery_retry_interval=0.02, recovery_timeout=120.0) as client:
        connection_id = client.connection_id
        assert connection_id is not None

        def recovered() -> None:
            hub.drop(connection_id)
            client.send_to_group("g", "hi", WebPubSubDataType.TEXT)
            assert client.connection_id == connection_id, "recovered, not reconnected"

        lifecycles("sync: recoveries", recovered)


# ---- asyncio client ---------------------------------------------------------------------


def amake(url: Any, **kw: Any) -> AsyncClient:
    return AsyncClient(url, **{**FAST, **kw})


async def test_async_lifecycles_give_back_what_they_took(hub: Hub, refused_url: str, silent_url: str) -> None:
    async def used() -> None:
        async with amake(hub.url()) as client:
            await client.join_group("g")
            await client.send_to_group("g", "hi", WebPubSubDataType.TEXT)

    async def never_opened() -> None:
        amake(hub.url())

    def open_fails(url: str) -> Callable[[], Awaitable[None]]:
        async def round_() -> None:
            with pytest.raises(OpenClientError):
                await amake(url).open()

        return round_

    async def open_cancelled() -> None:
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(amake(silent_url).open(), 0.05)

    async def provided() -> None:
        async def provide() -> str:
            return hub.url()

        async with amake(AsyncCredential(provide)) as client:
            await client.join_group("g")

    async def provider_raises() -> None:
        async def refuse() -> str:
            raise LookupError("no token")

        with pytest.raises(LookupError):
            await amake(AsyncCredential(refuse)).open()

    await alifecycles("asyncio: open, join, send, close", used)
    await alifecycles("asyncio: never opened", never_opened)
    await alifecycles("asyncio: open refused", open_fails(refused_url))
    await alifecycles("asyncio: open unauthorized", open_fails(unauthorized(hub)))
    await alifecycles("asyncio: open cancelled", open_cancelled)
    await alifecycles("asyncio: credential provider", provided)
    await alifecycles("asyncio: credential provider raising", provider_raises)


async def test_async_recoveries_give_back_what_they_took(hub: Hub) -> None:
    async with amake(hub.url(), recovery_retry_interval=0.02, recovery_timeout=120.0) as client:
        connection_id = client.connection_id
        assert connection_id is not None

        async def recovered() -> None:
            hub.drop(connection_id)  # a blocking HTTP request: no executor thread
            await client.send_to_group("g", "hi", WebPubSubDataType.TEXT)
            assert client.connection_id == connection_id, "recovered, not reconnected"

        await alifecycles("asyncio: recoveries", recovered)

        async def cancelled() -> None:
            hub.drop_acks(connection_id, 1)
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(client.send_to_group("g", "hi", WebPubSubDataType.TEXT), 0.05)

        await alifecycles("asyncio: sends cancelled", cancelled)


async def test_async_sends_pending_at_close_give_back_what_they_took(hub: Hub) -> None:
    async def pending_at_close() -> None:
        async with amake(hub.url()) as client:
            assert client.connection_id is not None
            hub.drop_acks(client.connection_id, 100)
            sends = [asyncio.ensure_future(client.send_to_group("g", "hi", WebPubSubDataType.TEXT)) for _ in range(5)]
            await asyncio.sleep(0.02)
        outcomes = await asyncio.gather(*sends, return_exceptions=True)
        assert all(isinstance(outcome, Exception) for outcome in outcomes), outcomes

    await alifecycles("asyncio: sends pending at close", pending_at_close)


def test_a_loop_per_client_gives_back_what_it_took(hub: Hub) -> None:
    """Each client opened, used and closed in an ``asyncio.run`` of its own (its reader
    on a loop that is closed before the client is collected)."""

    async def session() -> None:
        async with amake(hub.url()) as client:
            await client.send_to_group("g", "hi", WebPubSubDataType.TEXT)

    lifecycles("asyncio: a loop per client", lambda: asyncio.run(session()))


async def _open_and_forget(client: AsyncClient, connections: List[str], *, listener_waits: bool = False) -> None:
    """Opens ``client``, joins a group, sends and gets a message (through a coroutine
    listener, which then waits for an hour if ``listener_waits``), appends its
    connection id to ``connections`` and returns with the client open: no ``close()``."""
    got = asyncio.Event()

    async def on_message(_args: Any) -> None:
        got.set()
        if listener_waits:
            await asyncio.sleep(3600)  # still waiting when the loop goes

    await client.subscribe("group-message", on_message)
    await client.open()
    await client.join_group("g")
    await client.send_to_group("g", "hi", WebPubSubDataType.TEXT)
    await asyncio.wait_for(got.wait(), WAIT)
    assert client.connection_id is not None
    connections.append(client.connection_id)


def _wait_closed(hub: Hub, connections: List[str]) -> None:
    """Waits until the service has closed the connections of the last rounds' clients,
    which the application let go without ``close()``."""
    wait_until(
        lambda: not any(hub.service.connection_exists(c) for c in connections[-3:]),
        what="the let-go clients' connections closed",
    )


def test_an_open_client_whose_loop_ended_without_close_is_freed_once_dropped(hub: Hub) -> None:
    """A user forgets ``close()``: each client is opened, joins a group, sends and gets
    a message (a coroutine listener too) in an ``asyncio.run`` that ends with it open,
    and the application keeps no reference to it. Its loop is closed, so nothing can
    deliver its events or await its operations any more: it is collected and its native
    client freed (its connection closed), instead of staying connected, with its socket,
    descriptor and registry entry, until the interpreter exits."""
    connections: List[str] = []

    async def forget() -> None:
        await _open_and_forget(amake(hub.url()), connections)  # asyncio.run ends with it open

    lifecycles("asyncio: loop ended without close()", lambda: asyncio.run(forget()))
    _wait_closed(hub, connections)


@pytest.mark.filterwarnings("ignore:unclosed event loop:ResourceWarning")
def test_an_open_client_whose_loop_was_dropped_unclosed_is_freed_with_it(hub: Hub) -> None:
    """A user forgets ``close()`` and ``loop.close()`` too: each client (its URL from a
    credential) is opened, joins a group, sends and gets a message (its coroutine
    listener still waiting) in a ``run_until_complete`` of a loop of its own, which the
    application then drops without closing it, keeping no reference to the client
    either. The collector frees the loop with the client, as the official client's tasks
    go with their loop, and the native client (its connection closed). Before, the
    client's finalizer and its event sink (and credential handler), reachable from
    module globals, held the loop, whose reader holds the running client: each round
    kept its connection, its descriptors and the loop's for good."""
    connections: List[str] = []
    loops: List["weakref.ref[asyncio.AbstractEventLoop]"] = []

    async def provide() -> str:
        return hub.url()

    def dropped() -> None:
        loop = asyncio.new_event_loop()
        loop.run_until_complete(_open_and_forget(amake(AsyncCredential(provide)), connections, listener_waits=True))
        loops.append(weakref.ref(loop))
        # no loop.close(): the loop is dropped

    # The collected loop logs "Task was destroyed but it is pending!" for the waiting
    # listener each round, which is what the test makes happen: a record pytest would
    # keep (with a traceback under -X dev) and count as heap growth.
    asyncio_logger = logging.getLogger("asyncio")
    level = asyncio_logger.level
    asyncio_logger.setLevel(logging.CRITICAL)
    try:
        lifecycles("asyncio: loop dropped without loop.close()", dropped)
    finally:
        asyncio_logger.setLevel(level)
    gc.collect()
    assert not [loop for loop in loops if loop() is not None], "dropped loops still alive"
    _wait_closed(hub, connections)


def test_a_client_whose_loop_was_closed_with_operations_pending_is_freed_once_dropped(
    hub: Hub, caplog: pytest.LogCaptureFixture
) -> None:
    """The application closes its loop by hand (``loop.close()``, which cancels no task,
    unlike ``asyncio.run``) while sends and a join of an open client await their acks,
    and drops the client. Nothing can dispatch those completions any more: the client
    is collected and its native client freed (its connection closed). Before, the
    callback registry held each pending operation's future, whose waiting task held the
    client, and each round kept the client, its connection and its registry entries."""
    caplog.set_level(logging.CRITICAL, logger="asyncio")  # "Task was destroyed but it is pending!"
    connections: List[str] = []

    async def pending() -> None:
        client = amake(hub.url())
        await client.open()
        assert client.connection_id is not None
        connections.append(client.connection_id)
        hub.drop_acks(client.connection_id, 100)
        for n in range(3):
            asyncio.ensure_future(client.send_to_group("g", f"m{n}", WebPubSubDataType.TEXT))
        asyncio.ensure_future(client.send_to_group("g", "with id", WebPubSubDataType.TEXT, ack_id=7))
        asyncio.ensure_future(client.join_group("g2"))
        await asyncio.sleep(0)  # the operations start
        # no close()

    def closed_by_hand() -> None:
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(pending())
        finally:
            loop.close()

    lifecycles("asyncio: loop closed with operations pending", closed_by_hand)
    _wait_closed(hub, connections)


HELD_MESSAGES = 20_000  # of 1 KiB each
HELD_CHUNK = 800  # published before waiting for their acks: the emulator keeps 1000 unacknowledged


def test_a_held_client_whose_loop_ended_open_drops_its_messages_until_a_new_loop_uses_it(
    upstream: Upstream, caplog: pytest.LogCaptureFixture
) -> None:
    """The application keeps a client (a global) that an ``asyncio.run`` opened and
    left open. Its loop is closed, so nothing can run its events until another loop uses
    it: the library drops its messages instead of queueing them without end. The client stays
    connected and acknowledges what it gets. The next loop that uses it resumes it: one
    warning counts the dropped events, and the client works there.

    Before, 20,000 messages of 1 KiB grew the native heap by about 46 MiB, and the next
    loop got them all at once."""
    caplog.set_level(logging.WARNING, logger="webpubsub_client")
    emulator = Emulator(upstream.url)  # its own: its unacknowledged count is the held client's
    try:
        hub = Hub(emulator)
        client = amake(hub.url("held"))
        got: List[str] = []

        async def first() -> None:
            await client.subscribe("group-message", lambda args: got.append(args.data[:6]))
            await client.open()
            await client.join_group("g")
            await client.send_to_group("g", "first", WebPubSubDataType.TEXT)
            await until(lambda: got == ["first"])
            # no close(): asyncio.run ends with the client open

        asyncio.run(first())
        heap = native_heap()
        payload = "x" * 1024
        with make(hub.url("publisher")) as publisher:
            for _ in range(HELD_MESSAGES // HELD_CHUNK):
                for _ in range(HELD_CHUNK - 1):
                    publisher.send_to_group("g", payload, WebPubSubDataType.TEXT, ack=False, no_echo=True)
                publisher.send_to_group("g", payload, WebPubSubDataType.TEXT, no_echo=True)  # all of them are out
                wait_until(
                    lambda: emulator.stats()["unackedMessages"] == 0,
                    what="the held client acknowledged every message",
                )
        grown = native_heap() - heap
        assert grown < HELD_MESSAGES * 1024 // 4, f"the native heap grew by {grown} B"
        assert client.is_connected()

        async def second() -> None:
            with pytest.raises(OpenClientError):
                await client.open()  # still open
            await client.send_to_group("g", "second", WebPubSubDataType.TEXT)
            await until(lambda: got[-1:] == ["second"])
            await client.close()

        asyncio.run(second())
        assert got == ["first", "second"]
        messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert messages == [
            f"{HELD_MESSAGES} messages came while no event loop ran the client (its loop was "
            "closed while it was open); they were dropped",
        ], messages
    finally:
        emulator.close()


def test_a_paused_client_whose_loop_ended_open_reads_on_and_drops_what_comes(
    upstream: Upstream, caplog: pytest.LogCaptureFixture
) -> None:
    """As above, for a client whose loop fell behind while the messages came: its reading
    was paused then (its backlog full). Once its loop is closed, it reads on and drops
    what comes; it does not wait for a loop that may never come, holding the service's
    buffer meanwhile. The next loop gets what waited, in order, and the warning counts
    the rest."""
    caplog.set_level(logging.WARNING, logger="webpubsub_client")
    emulator = Emulator(upstream.url)  # its own: its counters are the held client's
    try:
        hub = Hub(emulator)
        client = amake(hub.url("held"), event_backlog_bytes=256 << 10)
        got: List[str] = []
        count = 360

        async def first() -> None:
            await client.subscribe("group-message", lambda args: got.append(args.data[:5]))
            await client.open()
            await client.join_group("g")

        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(first())
            # The loop runs no more: the client's reading pauses once its backlog is full.
            with make(hub.url("publisher")) as publisher:
                for n in range(count):  # the last acked: the emulator then has them all
                    text = f"{n:05}".ljust(32 * 1024, ".")
                    publisher.send_to_group("g", text, WebPubSubDataType.TEXT, ack=n == count - 1)
                time.sleep(1.5)  # a client that reads would have acknowledged them by then
                assert emulator.stats()["unackedMessages"] >= count // 2, emulator.stats()
        finally:
            loop.close()  # with the client open
        wait_until(
            lambda: emulator.stats()["unackedMessages"] == 0 and emulator.stats()["outboundBytes"] == 0,
            what="the held client read and acknowledged every message",
        )
        assert client.is_connected()

        async def second() -> None:
            await client.send_to_group("g", "after", WebPubSubDataType.TEXT)
            await until(lambda: got[-1:] == ["after"])
            await client.close()

        asyncio.run(second())
        kept = got[:-1]
        assert kept == [f"{n:05}" for n in range(len(kept))]
        messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert messages == [
            f"{count - len(kept)} messages came while no event loop ran the client (its loop was "
            "closed while it was open); they were dropped",
        ], messages
    finally:
        emulator.close()
