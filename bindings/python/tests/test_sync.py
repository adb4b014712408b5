"""The synchronous client against the real library and the emulator."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import hashlib
import io
import itertools
import json
import logging
import os
import re
import signal
import socket
import threading
import time
import weakref
from typing import Any, Dict, Iterator, List, Set

import pytest
from azure.core.pipeline.policies import RetryMode as CoreRetryMode
from conftest import (
    FAST,
    PROTOCOLS,
    WAIT,
    Collector,
    Emulator,
    FailingProvider,
    FrameTap,
    Hub,
    TokenServiceError,
    Upstream,
    assert_keywords_logged,
    every_operation,
    wait_until,
)

from webpubsub_client import (
    WebPubSubClient,
    WebPubSubClientCredential,
    _base,
    _callbacks,
    _client,
    _dispatcher,
    _native,
)
from webpubsub_client._callbacks import REGISTRY
from webpubsub_client.models import (
    CallbackType,
    InvokeEventError,
    OnConnectedArgs,
    OnDisconnectedArgs,
    OnGroupDataMessageArgs,
    OnRejoinGroupFailedArgs,
    OnServerDataMessageArgs,
    OpenClientError,
    RetryMode,
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


def pinned_beside(hub: Hub, client: WebPubSubClient, user_id: str) -> WebPubSubClient:
    """A new client pinned to the same dispatch thread as ``client`` (clients are pinned
    round robin, so one of the next few is)."""

    def worker(c: WebPubSubClient) -> Any:
        return c._finalizer.peek()[1].__self__.worker  # type: ignore[union-attr] # pylint: disable=protected-access

    for _ in range(len(_dispatcher._WORKERS) + 1):  # pylint: disable=protected-access
        other = make(hub.url(user_id))
        if worker(other) is worker(client):
            return other
    pytest.fail("no client pinned to the same dispatch thread")


# ---- lifecycle ---------------------------------------------------------------------------


def test_open_close_events_and_state(hub: Hub, protocol: WebPubSubProtocolType) -> None:
    client = make(hub.url("alice"), protocol)
    connected, stopped = Collector(), Collector()
    client.subscribe(CallbackType.CONNECTED, connected)
    client.subscribe("stopped", lambda: stopped("stopped"))
    assert client.state is WebPubSubClientState.STOPPED
    assert not client.is_connected()
    assert client.connection_id is None

    client.open()
    assert client.is_connected()
    assert client.state is WebPubSubClientState.CONNECTED
    (args,) = connected.wait_for(1)
    assert isinstance(args, OnConnectedArgs)
    assert args.user_id == "alice"
    assert args.connection_id and args.connection_id == client.connection_id

    client.close()
    stopped.wait_for(1)
    assert not client.is_connected()
    assert client.state is WebPubSubClientState.STOPPED


def test_user_ids_with_nul_arrive_whole(hub: Hub) -> None:
    # A token's user id may hold U+0000: the library gives it with its length, and the
    # binding reads all of it rather than the C string's prefix.
    connected, received = Collector(), Collector()
    client = make(hub.url("al\x00ice"))
    client.subscribe(CallbackType.CONNECTED, connected)
    client.subscribe(CallbackType.GROUP_MESSAGE, received)
    with client:
        client.join_group("room")
        client.send_to_group("room", "t\x00ext", WebPubSubDataType.TEXT)
        (message,) = received.wait_for(1)
    (args,) = connected.wait_for(1)
    assert args.user_id == "al\x00ice"
    assert (message.from_user_id, message.data) == ("al\x00ice", "t\x00ext")


def test_second_open_raises_and_close_is_idempotent(hub: Hub) -> None:
    client = make(hub.url())
    client.open()
    with pytest.raises(OpenClientError):
        client.open()
    assert client.is_connected()
    client.close()
    client.close()  # a second close is a no-op, as in the official client
    # a closed client can be opened again
    client.open()
    assert client.is_connected()
    client.close()


def test_close_before_open_is_a_no_op(hub: Hub) -> None:
    client = make(hub.url())
    client.close()
    assert client.state is WebPubSubClientState.STOPPED


@pytest.fixture
def patient_close(monkeypatch: Any) -> None:
    """``close()`` waits up to ``WAIT`` for the listeners of its events, not 1 s: a slow
    listener's 0.3 s then races no scheduling delay of a loaded machine."""
    monkeypatch.setattr(_client, "CLOSE_WAIT", WAIT)


@pytest.mark.usefixtures("patient_close")
def test_close_returns_once_the_listeners_of_its_events_have_run(hub: Hub) -> None:
    """A program may exit right after ``close()``: the disconnected and stopped listeners
    (on a daemon thread, which the exit would end) have run by then, a slow one too."""
    client = make(hub.url())
    seen: List[str] = []

    def on_disconnected(_args: OnDisconnectedArgs) -> None:
        time.sleep(0.3)  # still running when the stop is done
        seen.append("disconnected")

    client.subscribe(CallbackType.DISCONNECTED, on_disconnected)
    client.subscribe(CallbackType.STOPPED, lambda: seen.append("stopped"))
    for _ in range(2):  # and again after a reopen: the first stop's event is not taken twice
        client.open()
        client.close()
        assert seen == ["disconnected", "stopped"]
        seen.clear()


def test_close_waits_for_a_held_listener_no_longer_than_a_second(hub: Hub) -> None:
    client = make(hub.url())
    gate = threading.Event()
    stopped = Collector()
    client.subscribe(CallbackType.DISCONNECTED, lambda _args: gate.wait(WAIT))
    client.subscribe(CallbackType.STOPPED, lambda: stopped("stopped"))
    client.open()
    client.close()  # returns while the disconnected listener waits for the gate
    assert client.state is WebPubSubClientState.STOPPED
    assert not stopped.items
    gate.set()
    stopped.wait_for(1)


def stopped_by_the_service(hub: Hub, seen: List[str]) -> WebPubSubClient:
    """A client the service has just stopped (close code 1008, no reconnect), whose slow
    disconnected listener has not run yet (held until the stop is seen, then 0.3 s more);
    ``seen`` gets its events."""
    client = make(hub.url(), auto_reconnect=False)
    stop_seen = threading.Event()

    def on_disconnected(_args: OnDisconnectedArgs) -> None:
        stop_seen.wait(WAIT)
        time.sleep(0.3)
        seen.append("disconnected")

    client.subscribe(CallbackType.DISCONNECTED, on_disconnected)
    client.subscribe(CallbackType.STOPPED, lambda: seen.append("stopped"))
    client.open()
    hub.close_connection(client.connection_id, 1008)
    try:
        wait_until(lambda: client.state is WebPubSubClientState.STOPPED, what="stopped by the service")
        assert not seen
    finally:
        stop_seen.set()  # a failure does not hold the dispatch thread, shared with later tests
    return client


@pytest.mark.usefixtures("patient_close")
def test_close_of_a_client_stopped_by_the_service_returns_once_its_listeners_have_run(hub: Hub) -> None:
    """A program that exits once its client stopped on its own (``with client:`` left by
    the error of a send) gets the listeners of the stop's events run."""
    seen: List[str] = []
    client = stopped_by_the_service(hub, seen)
    client.close()
    assert seen == ["disconnected", "stopped"]


@pytest.mark.usefixtures("patient_close")
def test_close_after_a_reopen_waits_for_its_own_events_not_the_last_runs(hub: Hub) -> None:
    """Reopened while the listeners of the stop on its own still run, then closed: close()
    returns once its own stop's listeners have run, not once the first stop's have."""
    seen: List[str] = []
    client = stopped_by_the_service(hub, seen)
    client.open()
    client.close()
    assert seen == ["disconnected", "stopped", "disconnected", "stopped"]


def test_concurrent_closes_each_return_once_stopped(hub: Hub) -> None:
    """Three threads closing one client at once: none raises, each returns once the client
    is stopped (the official client's second close returns while the first still stops),
    and there is one stopped event; the client opens again."""
    client = make(hub.url())
    events = Collector()
    client.subscribe(CallbackType.CONNECTED, lambda _args: events("connected"))
    client.subscribe(CallbackType.STOPPED, lambda: events("stopped"))
    client.open()
    outcomes: List[Any] = []

    def close() -> None:
        try:
            client.close()
            outcomes.append(client.state)
        except BaseException as exc:  # noqa: BLE001 - checked below
            outcomes.append(exc)

    closers = [threading.Thread(target=close) for _ in range(3)]
    for closer in closers:
        closer.start()
    for closer in closers:
        closer.join(WAIT)
    assert outcomes == [WebPubSubClientState.STOPPED] * 3
    client.open()  # its events come after the first run's, a second stopped event included
    client.close()
    assert events.wait_for(4) == ["connected", "stopped", "connected", "stopped"]


def test_closes_racing_opens_on_another_thread_leave_each_client_stopped(hub: Hub, monkeypatch: Any) -> None:
    """50 rounds of close() on the main thread while open() runs on another: in half of
    them before that open() hands its start to the library (held there for a while), in
    the other half from just after that to just after it connected. close() returns with
    the client stopped, and no event comes after its stopped event; open() either
    returned (it connected first) or raised OpenClientError, as the official open() does
    when closed while it connects. Each client opens again, and once closed and dropped
    is collected: nothing holds it. Before, a close() that came before the start was
    handed over found the client stopped and returned, and the open then connected it."""
    entered = threading.Event()
    hold = [0.0]  # how long an open() waits, once entered, before it hands its start over
    enable = _callbacks.enable_native_logging

    def entering(**kwargs: Any) -> None:  # called by open() once it found the client stopped
        entered.set()
        time.sleep(hold[0])
        enable(**kwargs)

    delays = itertools.cycle([0.0, 1e-5, 1e-4, 5e-4, 1e-3, 3e-3, 6e-3])
    url = hub.url()
    clients: List["weakref.ref[WebPubSubClient]"] = []
    for round_ in range(50):
        client = make(url)
        events = Collector()
        client.subscribe(CallbackType.CONNECTED, lambda _args, events=events: events("connected"))
        client.subscribe(CallbackType.STOPPED, lambda events=events: events("stopped"))
        outcome: List[Any] = []

        def open_client(client: WebPubSubClient = client, outcome: List[Any] = outcome) -> None:
            try:
                client.open()
                outcome.append(None)
            except BaseException as exc:  # noqa: BLE001 - checked below
                outcome.append(exc)

        delay = next(delays)
        hold[0] = delay if round_ % 2 else 0.0
        entered.clear()
        with monkeypatch.context() as patch:
            patch.setattr(_callbacks, "enable_native_logging", entering)
            opener = threading.Thread(target=open_client)
            opener.start()
            assert entered.wait(WAIT)
            if not round_ % 2:
                time.sleep(delay)
            client.close()
            assert client.state is WebPubSubClientState.STOPPED
            opener.join(WAIT)
        assert not opener.is_alive()
        assert len(outcome) == 1 and (outcome[0] is None or isinstance(outcome[0], OpenClientError)), outcome
        assert client.state is WebPubSubClientState.STOPPED
        assert events.items in ([], ["stopped"], ["connected", "stopped"]), events.items
        client.open()
        client.close()
        assert events.items[-2:] == ["connected", "stopped"]
        clients.append(weakref.ref(client))
        del client, open_client, opener, outcome  # an exception's traceback holds the client
    # (a collection running on another thread, freeing a client, makes gc.collect() a no-op)
    wait_until(lambda: gc.collect() >= 0 and all(ref() is None for ref in clients), what="the clients collected")


def test_context_manager(hub: Hub) -> None:
    with make(hub.url()) as client:
        assert isinstance(client, WebPubSubClient)
        assert client.is_connected()
    assert not client.is_connected()


def test_open_with_bad_token_raises_open_client_error(hub: Hub) -> None:
    url = hub.url().split("access_token=")[0] + "access_token=not.a.jwt"
    client = make(url, reconnect_retry_total=0)
    started = time.monotonic()
    with pytest.raises(OpenClientError) as info:
        client.open()
    assert time.monotonic() - started < FAST["start_timeout"] + 1
    assert "Failed to open client" in str(info.value)
    assert client.state is WebPubSubClientState.STOPPED


def test_open_unreachable_server_raises_open_client_error() -> None:
    url = "ws://127.0.0.1:9/client/hubs/h?access_token=x"  # port 9 (discard): nothing listens
    client = WebPubSubClient(url, start_timeout=2.0, reconnect_retry_total=0)
    with pytest.raises(OpenClientError):
        client.open()


def test_ctrl_c_interrupts_an_open_that_waits_for_the_server(hub: Hub) -> None:
    """Ctrl-C (SIGINT) raises KeyboardInterrupt in an ``open()`` of the main thread at once,
    as in the official client, and leaves the client stopped and usable. It was only raised
    when the blocking native call returned: after ``start_timeout`` (30 s by default)."""
    assert threading.current_thread() is threading.main_thread()
    silent = socket.socket()  # accepts the connection, never answers the handshake
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)
    url = f"ws://127.0.0.1:{silent.getsockname()[1]}/client/hubs/h?access_token=x"
    client = WebPubSubClient(url, start_timeout=WAIT, reconnect_retry_total=0)
    stopped = Collector()
    client.subscribe(CallbackType.STOPPED, lambda: stopped("stopped"))
    interrupt = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT))
    started = time.monotonic()
    interrupt.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            client.open()
        elapsed = time.monotonic() - started
    finally:
        interrupt.join()
        silent.close()
    assert elapsed < WAIT / 2, f"KeyboardInterrupt came {elapsed:.1f} s after open()"
    wait_until(lambda: client.state is WebPubSubClientState.STOPPED, what="the interrupted open stopping")
    client.close()
    other = make(hub.url())  # the process goes on normally
    other.open()
    assert other.is_connected()
    other.close()


@contextlib.contextmanager
def _handling(handlers: Dict[int, Any]) -> Iterator[None]:
    """The signal handlers ``handlers`` (by signal) installed while the block runs."""
    previous = {signum: signal.signal(signum, handler) for signum, handler in handlers.items()}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@pytest.fixture(autouse=True)
def _upstream_delay_restored(upstream: Upstream) -> Iterator[None]:
    """Tests set how long the upstream takes over its slow events; each starts from the default."""
    default = upstream.slow_seconds
    yield
    upstream.slow_seconds = default


def _signalled_during(call: Any, *signums: int) -> Any:
    """``call()`` on the main thread with a SIGINT (or ``signums``) sent 0.3 s into it;
    what it returned. Several are sent together, by one thread that holds the GIL across
    them: no check runs between them."""
    assert threading.current_thread() is threading.main_thread()

    def send() -> None:
        for signum in signums or (signal.SIGINT,):
            os.kill(os.getpid(), signum)

    interrupt = threading.Timer(0.3, send)
    interrupt.start()
    try:
        return call()
    finally:
        interrupt.join()


def _interrupted(call: Any, expected: Any, *signums: int) -> Any:
    """The exception (``expected``) that ``call`` raised with a SIGINT (or ``signums``)
    sent 0.3 s into it, once checked that it came at once."""
    started = time.monotonic()
    with pytest.raises(expected) as info:
        _signalled_during(call, *signums)
    elapsed = time.monotonic() - started
    assert elapsed < 3, f"{info.typename} came {elapsed:.1f} s after the call"
    return info.value


def test_ctrl_c_interrupts_blocking_operations_that_wait_for_the_service(hub: Hub, upstream: Upstream) -> None:
    """Ctrl-C raises KeyboardInterrupt in a send or an invocation of the main thread waiting
    for its ack or reply, as in the official client, and the client goes on. It was only
    raised once the blocking native call returned: here, after the upstream's 8 s."""
    upstream.slow_seconds = 8.0
    client = make(hub.url(), ack_timeout=WAIT)
    client.open()
    try:
        _interrupted(lambda: client.send_event("slow", "x", WebPubSubDataType.TEXT), KeyboardInterrupt)
        _interrupted(lambda: client.invoke_event("slow", "x", WebPubSubDataType.TEXT, timeout=WAIT), KeyboardInterrupt)
        assert client.send_to_group("g", "x", WebPubSubDataType.TEXT).ack_id is not None
    finally:
        client.close()


def test_with_a_sigint_handler_of_the_application_a_blocking_operation_goes_on(hub: Hub, upstream: Upstream) -> None:
    """A SIGINT handler of the application that returns (a graceful-shutdown flag) runs at
    once, and the send or invocation it came during goes on to its ack or reply, as the
    official client's wait does; one an event loop registered (``add_signal_handler``)
    sees that Ctrl-C once. (Raising SIGINT again to hand it back to Python wrote the
    loop's wakeup fd twice: servers such as uvicorn read a second SIGINT as 'force
    exit'.)"""
    upstream.slow_seconds = 1.5
    seen: List[int] = []
    loop = asyncio.new_event_loop()
    loop.add_signal_handler(signal.SIGINT, seen.append, signal.SIGINT)
    client = make(hub.url(), ack_timeout=WAIT)
    client.open()
    try:
        result = _signalled_during(lambda: client.send_event("slow", "x", WebPubSubDataType.TEXT))
        assert result.ack_id is not None
        loop.run_until_complete(asyncio.sleep(0.2))
        assert seen == [signal.SIGINT]
        flagged: List[float] = []
        with _handling({signal.SIGINT: lambda signum, frame: flagged.append(time.monotonic())}):
            started = time.monotonic()
            result = _signalled_during(lambda: client.send_event("slow", "y", WebPubSubDataType.TEXT))
            reply = _signalled_during(lambda: client.invoke_event("slow", "z", WebPubSubDataType.TEXT, timeout=WAIT))
            ended = time.monotonic()
        assert result.ack_id is not None and reply.data is not None
        assert len(flagged) == 2 and flagged[0] - started < 1.0, f"the handler ran {flagged[0] - started:.2f} s in"
        assert ended - flagged[1] > 0.5, "the invocation did not go on after the handler"
    finally:
        client.close()
        loop.remove_signal_handler(signal.SIGINT)
        loop.close()


def test_a_handler_of_any_signal_runs_during_a_blocking_call_and_its_exception_ends_it(
    hub: Hub, upstream: Upstream
) -> None:
    """The handler of any signal, not only SIGINT, runs while a blocking call of the main
    thread waits, as between two bytecodes; its exception (a SystemExit from a SIGTERM
    handler) comes out of the call at once, which is given up, and the client goes on.
    Before, such a handler ran only once the call returned: here after the upstream's
    8 s."""
    upstream.slow_seconds = 8.0
    client = make(hub.url(), ack_timeout=WAIT)
    client.open()
    ran: List[float] = []

    def shut_down(signum: int, frame: Any) -> None:
        ran.append(time.monotonic())
        raise SystemExit(f"signal {signum}")

    try:
        with _handling({signal.SIGTERM: shut_down}):
            started = time.monotonic()
            error = _interrupted(
                lambda: client.send_event("slow", "x", WebPubSubDataType.TEXT), SystemExit, signal.SIGTERM
            )
        assert str(error) == "signal 15"
        assert len(ran) == 1 and ran[0] - started < 1.0, f"the handler ran {ran[0] - started:.2f} s in"
        assert client.send_to_group("g", "after", WebPubSubDataType.TEXT).ack_id is not None
    finally:
        client.close()


@contextlib.contextmanager
def _service_that_never_closes() -> Iterator[str]:
    """The URL of a service that takes one client connection, says it is connected, then
    reads and ignores everything: a close frame gets no answer."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            request = b""
            while b"\r\n\r\n" not in request:
                request += conn.recv(4096)
            key = re.search(rb"Sec-WebSocket-Key: *(\S+)", request, re.IGNORECASE)
            assert key is not None
            accept = base64.b64encode(hashlib.sha1(key.group(1) + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
            conn.sendall(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Accept: " + accept + b"\r\n"
                b"Sec-WebSocket-Protocol: json.reliable.webpubsub.azure.v1\r\n\r\n"
            )
            connected = b'{"type":"system","event":"connected","connectionId":"c1","reconnectionToken":"t"}'
            conn.sendall(bytes([0x81, len(connected)]) + connected)
            while conn.recv(4096):
                pass

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    try:
        yield f"ws://127.0.0.1:{listener.getsockname()[1]}/client/hubs/h?access_token=x"
    finally:
        listener.close()
        server.join(timeout=5)


def test_a_signal_handler_runs_during_close_and_its_exception_comes_once_stopped() -> None:
    """A signal handler runs while ``close()`` of the main thread waits for the service's
    close frame, as between two bytecodes; its exception comes once the client is stopped
    (a close is never left half done). Before, the handler ran only when the native stop
    returned: here after the 1 s the closing handshake waits for a silent service."""
    ran: List[float] = []

    def shut_down(signum: int, frame: Any) -> None:
        ran.append(time.monotonic())
        raise SystemExit(f"signal {signum}")

    with _service_that_never_closes() as url:
        client = WebPubSubClient(url)
        client.open()
        with _handling({signal.SIGTERM: shut_down}):
            started = time.monotonic()
            with pytest.raises(SystemExit, match="signal 15"):
                _signalled_during(client.close, signal.SIGTERM)
            ended = time.monotonic()
    assert len(ran) == 1 and ran[0] - started < 0.7, f"the handler ran {ran[0] - started:.2f} s in"
    assert ended - started > 0.9, f"close() ended {ended - started:.2f} s in, before its closing handshake"
    assert client.state is WebPubSubClientState.STOPPED


def test_a_signal_handler_may_make_blocking_calls_while_one_waits(
    hub: Hub, upstream: Upstream, monkeypatch: Any
) -> None:
    """A signal handler that itself sends (a goodbye before shutting down), run while a
    send of the main thread waits, sends and returns, and the send it came during goes on
    to its ack. Nothing is lost in the callback: no exception is left unraisable."""
    upstream.slow_seconds = 1.5
    unraisable: List[Any] = []
    monkeypatch.setattr("sys.unraisablehook", unraisable.append)
    got = Collector()
    peer = make(hub.url())
    peer.subscribe(CallbackType.GROUP_MESSAGE, got)
    peer.open()
    peer.join_group("bye")
    client = make(hub.url(), ack_timeout=WAIT)
    client.open()
    said: List[Any] = []

    def say_bye(signum: int, frame: Any) -> None:
        said.append(time.monotonic())
        said.append(client.send_to_group("bye", "bye", WebPubSubDataType.TEXT).ack_id)

    try:
        with _handling({signal.SIGUSR1: say_bye}):
            started = time.monotonic()
            result = _signalled_during(lambda: client.send_event("slow", "x", WebPubSubDataType.TEXT), signal.SIGUSR1)
        assert result.ack_id is not None and len(said) == 2 and said[1] is not None
        assert said[0] - started < 1.0, f"the handler ran {said[0] - started:.2f} s in"
        assert [m.data for m in got.wait_for(1)] == ["bye"]
        assert unraisable == []
    finally:
        client.close()
        peer.close()


def test_ctrl_c_interrupts_a_join_and_a_handler_of_the_application_lets_it_wait_on(hub: Hub) -> None:
    """A join of the main thread waiting for its ack (here one the service never sends)
    raises KeyboardInterrupt at once; with an application's SIGINT handler that returns,
    the handler runs at once and the join waits on, to its retry's ack. The client goes
    on either way."""
    got = Collector()
    client = make(hub.url(), ack_timeout=WAIT, message_retry_total=0)
    client.subscribe(CallbackType.GROUP_MESSAGE, got)
    client.open()
    retrying = make(hub.url(), ack_timeout=1.5, message_retry_total=1)
    retrying.open()
    try:
        hub.drop_acks(client.connection_id, 1)
        _interrupted(lambda: client.join_group("first"), KeyboardInterrupt)
        hub.drop_acks(retrying.connection_id, 1)
        flagged: List[float] = []
        with _handling({signal.SIGINT: lambda signum, frame: flagged.append(time.monotonic())}):
            started = time.monotonic()
            result = _signalled_during(lambda: retrying.join_group("second"))
            elapsed = time.monotonic() - started
        assert len(flagged) == 1 and flagged[0] - started < 1.0, f"the handler ran {flagged[0] - started:.2f} s in"
        assert result.ack_id is not None and elapsed > 1.5, f"joined after {elapsed:.1f} s"
        client.join_group("second")
        for group in ("first", "second"):  # the interrupted join had reached the service
            retrying.send_to_group(group, group, WebPubSubDataType.TEXT)
        assert [m.data for m in got.wait_for(2)] == ["first", "second"]
    finally:
        client.close()
        retrying.close()


def test_an_interrupted_fire_and_forget_send_raises_what_the_handler_raised(hub: Hub) -> None:
    """A fire-and-forget send blocks only while the library's queue is full; interrupted
    there, it raises what the signal handler raised in the check, or reports the
    interruption when the check kept nothing. (The check itself is tested with the acked
    calls; here the native send is stubbed to report an interruption.)"""
    client = make(hub.url())
    client.open()
    raised: List[Any] = [KeyboardInterrupt()]

    def interrupted(*args: Any) -> int:
        _callbacks._raised[0] = raised.pop() if raised else None  # pylint: disable=protected-access
        return _native.STATUS_INTERRUPTED

    forms = (interrupted, interrupted)
    flags = _native.SEND_FIRE_AND_FORGET

    def send() -> Any:
        return client._send(forms, b"g", 0, b"x", flags, False, None)  # pylint: disable=protected-access

    try:
        with pytest.raises(KeyboardInterrupt):
            send()
        with pytest.raises(SendMessageError, match="Interrupted"):
            send()
    finally:
        client.close()


def test_two_signals_at_once_raise_the_later_handlers_exception_and_the_check_goes_on(
    hub: Hub, upstream: Upstream, monkeypatch: Any
) -> None:
    """A SIGINT and a SIGTERM received together during a blocking call, both of whose
    handlers raise: the call raises the later handler's exception at once, as Python
    raises the later of two, nothing is lost in the callback, and a later call's Ctrl-C
    still raises. Before, the second handler ran outside the check's try: its exception
    was unraisable, and on Python 3.10 both were lost (SendMessageError 'Interrupted')."""
    upstream.slow_seconds = 8.0
    unraisable: List[Any] = []
    monkeypatch.setattr("sys.unraisablehook", unraisable.append)
    client = make(hub.url(), ack_timeout=WAIT)
    client.open()

    class Interrupted(Exception):
        """What the SIGINT handler raises: a KeyboardInterrupt would end the test run."""

    def interrupt(signum: int, frame: Any) -> None:
        raise Interrupted

    def terminate(signum: int, frame: Any) -> None:
        raise SystemExit("terminated")

    try:
        with _handling({signal.SIGINT: interrupt, signal.SIGTERM: terminate}):
            error = _interrupted(
                lambda: client.send_event("slow", "x", WebPubSubDataType.TEXT),
                SystemExit,
                signal.SIGINT,
                signal.SIGTERM,
            )
        assert str(error) == "terminated"
        assert unraisable == []
        _interrupted(lambda: client.send_event("slow", "y", WebPubSubDataType.TEXT), KeyboardInterrupt)
    finally:
        client.close()


def test_a_check_that_has_ended_is_replaced_by_the_next_blocking_call(
    hub: Hub, upstream: Upstream, monkeypatch: Any
) -> None:
    """The main thread's check ends when a third handler raises at the same check (its
    exception escapes the generator). The next blocking call installs a new one: Ctrl-C
    raises at once, and the ended one is not asked (each ask raised StopIteration in the
    callback, unraisable, and read an undefined answer). Simulated by closing it."""
    upstream.slow_seconds = 8.0
    unraisable: List[Any] = []
    monkeypatch.setattr("sys.unraisablehook", unraisable.append)
    client = make(hub.url(), ack_timeout=WAIT)
    client.open()
    try:
        _callbacks._checks[-1][0].close()  # pylint: disable=protected-access
        _interrupted(lambda: client.send_event("slow", "x", WebPubSubDataType.TEXT), KeyboardInterrupt)
        assert unraisable == []
    finally:
        client.close()


def test_a_client_whose_blocking_call_a_signal_ended_is_freed_without_the_cycle_collector(
    hub: Hub, upstream: Upstream
) -> None:
    """Once the KeyboardInterrupt of a Ctrl-C during a blocking call is handled, nothing
    keeps the client: closed and dropped, it is freed. Before, the exception and the frame
    that raised it referred to each other, and that frame's caller held the client until
    the cycle collector ran."""
    upstream.slow_seconds = 8.0

    def interrupted_client() -> Any:
        client = make(hub.url(), ack_timeout=WAIT)
        client.open()
        try:
            _signalled_during(lambda: client.send_event("slow", "x", WebPubSubDataType.TEXT))
        except KeyboardInterrupt:
            pass
        client.close()
        return weakref.ref(client)

    gc.collect()
    gc.disable()
    try:
        freed = interrupted_client()
        # the listeners hold an open client until its stopped event is delivered
        wait_until(lambda: freed() is None, what="the dropped client freed")
    finally:
        gc.enable()


# ---- group messages ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "data_type, content, expected",
    [
        (WebPubSubDataType.TEXT, "héllo", "héllo"),
        (WebPubSubDataType.JSON, {"a": [1, 2.5, None, True], "b": "x"}, {"a": [1, 2.5, None, True], "b": "x"}),
        (WebPubSubDataType.JSON, "just a string", "just a string"),
        (WebPubSubDataType.JSON, 42, 42),
        (WebPubSubDataType.BINARY, b"\x00\x01\xffbin", b"\x00\x01\xffbin"),
        (WebPubSubDataType.BINARY, memoryview(b"view"), b"view"),
        (WebPubSubDataType.PROTOBUF, bytearray(b"\x08\x96\x01"), b"\x08\x96\x01"),
        ("text", "lower-case data type", "lower-case data type"),
        ("JSON", {"upper": "case"}, {"upper": "case"}),
    ],
)
def test_send_to_group_round_trip(
    hub: Hub, protocol: WebPubSubProtocolType, data_type: Any, content: Any, expected: Any
) -> None:
    received = Collector()
    with make(hub.url("bob"), protocol) as client:
        client.subscribe(CallbackType.GROUP_MESSAGE, received)
        client.join_group("room")
        result = client.send_to_group("room", content, data_type)
        assert result.ack_id is not None and not result.is_duplicated
        (message,) = received.wait_for(1)
    assert isinstance(message, OnGroupDataMessageArgs)
    # built without its __init__ (the subscriber's hot path): exactly the attributes it sets
    rebuilt = OnGroupDataMessageArgs(
        data_type=message.data_type,
        data=message.data,
        group=message.group,
        from_user_id=message.from_user_id,
        sequence_id=message.sequence_id,
    )
    assert vars(message) == vars(rebuilt)
    assert message.group == "room"
    assert message.from_user_id == "bob"
    assert message.data_type == WebPubSubDataType(str(data_type))
    # A member equal to the official client's plain str, whose str() and f-strings give it.
    value = message.data_type.value
    assert type(message.data_type) is WebPubSubDataType
    assert (message.data_type, str(message.data_type), f"{message.data_type}") == (value, value, value)
    if isinstance(expected, bytes):
        assert isinstance(message.data, memoryview)
        assert bytes(message.data) == expected
    else:
        assert message.data == expected
    if protocol is WebPubSubProtocolType.JSON_RELIABLE:
        assert isinstance(message.sequence_id, int) and message.sequence_id > 0
    else:
        assert message.sequence_id is None


def test_no_echo_fire_and_forget_and_leave(hub: Hub, protocol: WebPubSubProtocolType) -> None:
    a_got, b_got = Collector(), Collector()
    with make(hub.url("a"), protocol) as a, make(hub.url("b"), protocol) as b:
        a.subscribe(CallbackType.GROUP_MESSAGE, a_got)
        b.subscribe(CallbackType.GROUP_MESSAGE, b_got)
        a.join_group("g")
        b.join_group("g")
        a.send_to_group("g", "1-no-echo", WebPubSubDataType.TEXT, no_echo=True)
        result = a.send_to_group("g", "2-fire-and-forget", WebPubSubDataType.TEXT, ack=False)
        assert result.ack_id is None
        b_got.wait_for(2)
        a_got.wait_for(1)
        b.leave_group("g")
        a.send_to_group("g", "3-after-leave", WebPubSubDataType.TEXT)
        a_got.wait_for(2)
        # b left before message 3 was sent, and a's copy of 3 arrived after a's copy of 2:
        # ordering on one connection makes "b has nothing more" a safe check once a has 3.
        b.send_to_group("g", "4-from-b", WebPubSubDataType.TEXT)
        a_got.wait_for(3)
    assert [m.data for m in b_got.items] == ["1-no-echo", "2-fire-and-forget"]
    assert [m.data for m in a_got.items] == ["2-fire-and-forget", "3-after-leave", "4-from-b"]


def test_a_message_over_the_size_limit_is_refused_before_it_is_sent(hub: Hub, upstream: Upstream) -> None:
    """A message whose frame is over the 1 MiB limit (binary data under it, as base64 over)
    raises ValueError at once, for every operation, acked or not; nothing is sent and the
    connection stays up (the official client sends it, and the service closes the
    connection)."""
    got = Collector()
    with make(hub.url()) as client:
        client.subscribe(CallbackType.GROUP_MESSAGE, got)
        client.join_group("g")
        calls = [
            lambda: client.send_to_group("g", "x" * (1 << 20), WebPubSubDataType.TEXT),
            lambda: client.send_to_group("g", b"\0" * 800_000, WebPubSubDataType.BINARY, ack=False),
            lambda: client.send_to_group("g", ["x" * (1 << 20)], WebPubSubDataType.JSON, ack_id=5),
            lambda: client.send_event("e", "x" * (1 << 20), WebPubSubDataType.TEXT),
            lambda: client.invoke_event("echo", "x" * (1 << 20), WebPubSubDataType.TEXT),
        ]
        for call in calls:
            # In words a Python user can act on: no option of the Rust API's.
            with pytest.raises(
                ValueError, match="over the limit of 1048576 bytes on a frame the service takes from a client$"
            ):
                call()
        connection_id = client.connection_id
        client.send_event("marker", "after", WebPubSubDataType.TEXT)
        client.send_to_group("g", "after", WebPubSubDataType.TEXT)
        assert [m.data for m in got.wait_for(1)] == ["after"]
        assert client.connection_id == connection_id
    events = [upstream.next_event()]  # (the upstream's queue may hold other tests' events)
    while events[-1]["event"] != "marker" or events[-1]["connection_id"] != connection_id:
        events.append(upstream.next_event())
    assert [e["body"] for e in events if e["connection_id"] == connection_id] == [b"after"]


def test_an_ack_id_with_ack_false_is_ignored_as_by_the_official_client(hub: Hub) -> None:
    """A fire-and-forget message has no ackId: the official client leaves out an ``ack_id``
    given with ``ack=False``; so does this one, where it raised ValueError. The id stays
    free: an acked send with it afterwards is no duplicate."""
    got = Collector()
    with make(hub.url("a")) as client:
        client.subscribe(CallbackType.GROUP_MESSAGE, got)
        client.join_group("g")
        assert vars(client.send_to_group("g", "1", "text", ack=False, ack_id=7)) == {
            "ack_id": None,
            "is_duplicated": False,
        }
        assert vars(client.send_event("e", "2", "text", ack=False, ack_id=7)) == {
            "ack_id": None,
            "is_duplicated": False,
        }
        assert vars(client.send_to_group("g", "3", "text", ack_id=7)) == {"ack_id": 7, "is_duplicated": False}
        assert [m.data for m in got.wait_for(2)] == ["1", "3"]


def test_keyword_arguments_the_official_client_ignores_are_ignored(hub: Hub, caplog: Any) -> None:
    """Code written for the official client runs unchanged: the constructor and the methods
    that take ``**kwargs`` there ignore what they do not use (an azure-core per-call option,
    a misspelt name), each name logged once per method at debug level, and an operation's
    ``logging_enable=True`` logs its outgoing message. (Names of this test only: each is
    logged once per process.)"""
    caplog.set_level(logging.WARNING, logger="webpubsub_client.native")  # first: each call sets the capture level too
    caplog.set_level(logging.DEBUG, logger="webpubsub_client")
    extra = {"timeout": 5, "noecho": True}
    got = Collector()
    client = make(hub.url(), transport=None)
    client.subscribe(CallbackType.GROUP_MESSAGE, got, **extra)
    with client:
        for _ in range(2):
            client.join_group("g", logging_enable=True, **extra)
            client.send_to_group("g", "acked", "text", logging_enable=True, **extra)
            client.send_to_group("g", "queued", "text", ack=False, **extra)
            client.send_event("e", "event", "text", **extra)
            client.leave_group("other", **extra)
        got.wait_for(4)
        client.unsubscribe(CallbackType.GROUP_MESSAGE, got, **extra)
    assert_keywords_logged(caplog, "transport", extra)


def test_client_logging_enable_logs_every_outgoing_message(hub: Hub, caplog: Any) -> None:
    """The constructor's ``logging_enable=True`` logs each outgoing message at debug level,
    as the official client's does, not only an operation's own ``logging_enable=True``."""
    caplog.set_level(logging.WARNING, logger="webpubsub_client.native")  # first: each call sets the capture level too
    caplog.set_level(logging.DEBUG, logger="webpubsub_client")
    with make(hub.url(), logging_enable=True) as client:
        client.join_group("g")
        client.send_to_group("g", "acked", "text")
        client.send_to_group("g", "queued", "text", ack=False)
        client.send_event("e", "event", "text")
        client.leave_group("g")
    messages = [r.getMessage() for r in caplog.records if r.name == "webpubsub_client"]
    for expected in ("join_group 'g'", "send_to_group 'g': b'acked'", "send_to_group 'g': b'queued'"):
        assert expected in messages, messages
    assert "send_event 'e': b'event'" in messages, messages
    assert "leave_group 'g'" in messages, messages


def test_client_logging_enable_passes_the_librarys_trace_records(hub: Hub, caplog: Any) -> None:
    """With the constructor's ``logging_enable=True`` the library's trace-level records
    (here its keep-alive pings) reach the ``webpubsub_client.native`` logger at level 5,
    even when that logger is set to it only after ``open()``."""
    caplog.set_level(logging.WARNING, logger="webpubsub_client.native")
    with make(hub.url(), logging_enable=True, keep_alive_interval=0.1):
        caplog.set_level(5, logger="webpubsub_client.native")
        wait_until(
            lambda: any(r.levelno == 5 and "keep-alive ping" in r.getMessage() for r in caplog.records),
            what="a trace record",
        )
    trace = [r for r in caplog.records if r.levelno == 5]
    assert {r.name for r in trace} == {"webpubsub_client.native"}
    assert {r.levelname for r in trace} == {"Level 5"}


def test_log_records_do_not_repeat_the_loggers_name(hub: Hub, caplog: Any) -> None:
    """Formatted as ``logging.basicConfig(format="%(name)s: %(message)s")`` prints them,
    the package's records and the library's name their logger once: "webpubsub_client:
    join_group 'g'", "webpubsub_client.native: [client::connection] connecting to ...".
    (They read "webpubsub_client: webpubsub_client: join_group 'g'" and
    "webpubsub_client.native: [webpubsub_client::client::connection] connecting to ...".)"""
    caplog.set_level(logging.DEBUG, logger="webpubsub_client.native")  # first: each call sets the capture level too
    caplog.set_level(logging.DEBUG, logger="webpubsub_client")
    formatter = logging.Formatter("%(name)s: %(message)s")

    def lines() -> List[str]:
        return [formatter.format(r) for r in caplog.records if r.name.startswith("webpubsub_client")]

    with make(hub.url()) as client:
        client.join_group("g", logging_enable=True)
        client.subscribe("no-such-event", print)
    wait_until(lambda: any(" connecting to " in line for line in lines()), what="the library's record of the connect")
    printed = lines()
    assert "webpubsub_client: join_group 'g'" in printed, printed
    assert any(line.startswith("webpubsub_client: subscribe ignores 'no-such-event'") for line in printed), printed
    assert any(line.startswith("webpubsub_client.native: [client::connection] connecting to ") for line in printed)
    assert [
        line for line in printed if "webpubsub_client: webpubsub_client" in line or "[webpubsub_client" in line
    ] == []


def test_user_agent_is_a_prefix_of_the_user_agent_header(hub: Hub, tap: FrameTap) -> None:
    """``user_agent`` comes first in the User-Agent header of the upgrade request, before
    the package's own (which is the whole header without it)."""
    for user_agent in ("my-app/1.0 (test)", None):
        with make(tap.url(hub.url()), user_agent=user_agent):
            pass
    agents = [
        line.split(b":", 1)[1].strip().decode()
        for head in tap.heads
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"user-agent:")
    ]
    assert agents == [f"my-app/1.0 (test) {_base.DEFAULT_USER_AGENT}", _base.DEFAULT_USER_AGENT]
    assert _base.DEFAULT_USER_AGENT.startswith("webpubsub-client-python/")


def test_unsubscribe_stops_delivery(hub: Hub, caplog: Any) -> None:
    """A listener subscribed twice runs twice per event and ``unsubscribe`` removes one
    registration, as officially; removing an absent one is logged at info level."""
    caplog.set_level(logging.INFO, logger="webpubsub_client")
    first, second = Collector(), Collector()
    with make(hub.url()) as client:
        client.subscribe(CallbackType.GROUP_MESSAGE, first)
        client.subscribe(CallbackType.GROUP_MESSAGE, second)
        client.subscribe(CallbackType.GROUP_MESSAGE, second)
        client.join_group("g")
        client.send_to_group("g", "one", "text")
        first.wait_for(1)
        second.wait_for(2)
        client.unsubscribe(CallbackType.GROUP_MESSAGE, first)
        client.unsubscribe(CallbackType.GROUP_MESSAGE, first)  # absent: ignored
        client.unsubscribe(CallbackType.GROUP_MESSAGE, second)
        client.send_to_group("g", "two", "text")
        client.send_to_group("g", "three", "text")
        second.wait_for(4)
    assert [m.data for m in first.items] == ["one"]
    assert [m.data for m in second.items] == ["one", "one", "two", "three"]
    absent = [r for r in caplog.records if "not subscribed" in r.getMessage()]
    assert [r.levelno for r in absent] == [logging.INFO]


def test_listeners_keep_their_thread_locals_between_events(hub: Hub) -> None:
    # Listeners run on a daemon thread of the package, the same one for every event of a
    # client: every threading.local must last from one event to the next.
    local = threading.local()
    seen = Collector()

    def listener(message: OnGroupDataMessageArgs) -> None:
        count = getattr(local, "count", 0) + 1
        local.count = count
        seen((threading.get_ident(), count))

    with make(hub.url()) as client:
        client.subscribe(CallbackType.GROUP_MESSAGE, listener)
        client.join_group("g")
        for i in range(5):
            client.send_to_group("g", str(i), "text")
        items = seen.wait_for(5)
    assert len({ident for ident, _ in items}) == 1  # one client: one daemon thread
    assert [count for _, count in items] == [1, 2, 3, 4, 5]


def test_events_and_messages_reach_the_listeners_in_order_on_a_python_thread(hub: Hub) -> None:
    """Messages reach the listeners as records, except those larger than the records
    buffer, which take the event callback, as the other events do: all in arrival order,
    with every field, on one daemon thread that Python started (not a library thread,
    which Python would see as a dummy thread), where a listener still running at exit
    is ended as the official client's are."""
    big = "x" * (_base.DispatchBuffers.MESSAGE_BYTES + 1)
    sent: List[Any] = ["a", big, {"j": "ü"}, b"\x00\xff" * 20_000, "é", b"", ""]
    kinds = [WebPubSubDataType.TEXT, WebPubSubDataType.TEXT, WebPubSubDataType.JSON, WebPubSubDataType.BINARY]
    kinds += [WebPubSubDataType.TEXT, WebPubSubDataType.BINARY, WebPubSubDataType.TEXT]
    seen = Collector()
    subscriber = make(hub.url("bob"))
    for event in (CallbackType.CONNECTED, CallbackType.GROUP_MESSAGE, CallbackType.STOPPED):
        subscriber.subscribe(event, lambda *args, e=event: seen((e, threading.current_thread(), args)))
    with subscriber, make(hub.url(None)) as anonymous:
        subscriber.join_group("g")
        for content, kind in zip(sent, kinds, strict=True):
            anonymous.send_to_group("g", content, kind, ack=False)
        seen.wait_for(1 + len(sent))
    items = seen.wait_for(2 + len(sent))
    assert [event for event, _, _ in items] == [
        CallbackType.CONNECTED,
        *[CallbackType.GROUP_MESSAGE] * len(sent),
        CallbackType.STOPPED,
    ]
    threads = {thread for _, thread, _ in items}
    assert len(threads) == 1
    (thread,) = threads
    assert thread.daemon and not isinstance(thread, threading._DummyThread)  # pylint: disable=protected-access
    messages = [args[0] for _, _, args in items[1:-1]]
    data = [bytes(m.data) if m.data_type is WebPubSubDataType.BINARY else m.data for m in messages]
    assert data == sent
    assert [m.data_type for m in messages] == kinds
    assert all(m.from_user_id is None and m.group == "g" for m in messages)
    ids = [m.sequence_id for m in messages]
    assert all(i is not None for i in ids) and ids == sorted(ids) and len(set(ids)) == len(ids)


def test_listener_exception_is_logged_and_others_still_run(hub: Hub, caplog: Any) -> None:
    got = Collector()

    def broken(_: Any) -> None:
        raise RuntimeError("listener bug")

    with make(hub.url()) as client:
        client.subscribe(CallbackType.GROUP_MESSAGE, broken)
        client.subscribe(CallbackType.GROUP_MESSAGE, got)
        client.join_group("g")
        client.send_to_group("g", "x", "text")
        client.send_to_group("g", "y", "text")
        got.wait_for(2)
    assert any(
        r.name == "webpubsub_client" and r.exc_info and str(r.exc_info[1]) == "listener bug" for r in caplog.records
    )


@pytest.mark.parametrize("raised", [SystemExit, KeyboardInterrupt, GeneratorExit])
def test_a_listener_raising_a_base_exception_ends_only_its_own_call(hub: Hub, caplog: Any, raised: type) -> None:
    """A SystemExit, KeyboardInterrupt or GeneratorExit from a listener ends only that call,
    as in the official client (a thread per call): the listeners after it get the event,
    the events after it arrive, and the exception is logged."""
    got, stopped = Collector(), Collector()

    def quitting(message: OnGroupDataMessageArgs) -> None:
        if message.data == "x":
            raise raised("listener quits")

    client = make(hub.url())
    client.subscribe(CallbackType.GROUP_MESSAGE, quitting)
    client.subscribe(CallbackType.GROUP_MESSAGE, lambda message: got(message.data))
    client.subscribe(CallbackType.STOPPED, lambda: stopped("stopped"))
    with client:
        client.join_group("g")
        client.send_to_group("g", "x", "text")
        client.send_to_group("g", "y", "text")
        got.wait_until(lambda items: "y" in items)
    stopped.wait_for(1)  # after the messages, on the same thread
    assert got.items == ["x", "y"]
    assert any(
        r.name == "webpubsub_client"
        and "group-message listener raised" in r.getMessage()
        and r.exc_info
        and r.exc_info[0] is raised
        for r in caplog.records
    ), caplog.records


def test_callback_may_send_from_inside_a_listener(hub: Hub, protocol: WebPubSubProtocolType) -> None:
    """The official suite's "callback deadlock" case: a listener sends and waits for the ack."""
    got = Collector()
    errors: List[BaseException] = []
    with make(hub.url(), protocol) as client:

        def on_message(message: OnGroupDataMessageArgs) -> None:
            got(message)
            if message.data == "ping":
                try:
                    client.send_to_group("g", "pong", WebPubSubDataType.TEXT)
                    client.join_group("other")
                except BaseException as exc:  # noqa: BLE001
                    errors.append(exc)

        client.subscribe(CallbackType.GROUP_MESSAGE, on_message)
        client.join_group("g")
        client.send_to_group("g", "ping", WebPubSubDataType.TEXT)
        got.wait_for(2)
    assert not errors
    assert [m.data for m in got.items] == ["ping", "pong"]


@pytest.mark.usefixtures("patient_close")
def test_close_from_inside_a_listener(hub: Hub) -> None:
    """close() from a listener of its client returns once stopped, without waiting for the
    listeners, which its own thread runs (it would wait for itself: here the ``WAIT`` of
    ``patient_close``), and raises nothing. The messages that came before the close reach
    the listeners after it, in order, then the disconnected and stopped events; nothing
    comes after them, not a message sent to the group once stopped."""
    seen = Collector()
    closed: List[Any] = []
    client = make(hub.url())

    def on_message(message: OnGroupDataMessageArgs) -> None:
        seen(message.data)
        if message.data == "stop now":
            started = time.monotonic()
            try:
                client.close()
                closed.append(time.monotonic() - started)
            except BaseException as exc:  # noqa: BLE001
                closed.append(exc)

    client.subscribe(CallbackType.GROUP_MESSAGE, on_message)
    client.subscribe(CallbackType.DISCONNECTED, lambda _args: seen("disconnected"))
    client.subscribe(CallbackType.STOPPED, lambda: seen("stopped"))
    client.open()
    client.join_group("g")
    witness = Collector()
    with make(hub.url("other")) as publisher, make(hub.url("witness")) as watcher:
        watcher.subscribe(CallbackType.GROUP_MESSAGE, lambda message: witness(message.data))
        watcher.join_group("g")
        for data in ("stop now", "1", "2", "3"):  # (the client's own send could be failed by its close)
            publisher.send_to_group("g", data, WebPubSubDataType.TEXT)
        seen.wait_until(lambda items: "stopped" in items)
        publisher.send_to_group("g", "after", WebPubSubDataType.TEXT)
        witness.wait_until(lambda items: "after" in items)
    assert len(closed) == 1 and isinstance(closed[0], float) and closed[0] < WAIT / 2, closed
    assert client.state is WebPubSubClientState.STOPPED
    delivered = seen.items[1:-2]
    assert seen.items[0] == "stop now" and seen.items[-2:] == ["disconnected", "stopped"], seen.items
    assert delivered == ["1", "2", "3"][: len(delivered)], seen.items


@pytest.mark.usefixtures("patient_close")
@pytest.mark.parametrize("taken_by", ["the process", "another thread"])
def test_ctrl_c_while_close_waits_for_the_listeners_raises_once_stopped(hub: Hub, taken_by: str) -> None:
    """Ctrl-C while close() of the main thread waits for the listeners of its events (here
    held for good) raises KeyboardInterrupt from close() at once, the client stopped: it
    waits for them no further. The held listeners' events then come, in order, and
    nothing after them. The SIGINT is the process's, as a terminal's Ctrl-C, which any of
    its threads may take, or taken by another thread than the main one: there, its
    handler ran only once the wait ended (here after ``WAIT``; by default after 1 s)."""
    assert threading.current_thread() is threading.main_thread()
    client = make(hub.url())
    seen = Collector()
    held, gate = threading.Event(), threading.Event()

    def on_disconnected(_args: OnDisconnectedArgs) -> None:
        held.set()
        gate.wait(WAIT)
        seen("disconnected")

    client.subscribe(CallbackType.DISCONNECTED, on_disconnected)
    client.subscribe(CallbackType.STOPPED, lambda: seen("stopped"))
    client.open()

    def ctrl_c() -> None:
        held.wait(WAIT)
        if taken_by == "the process":
            os.kill(os.getpid(), signal.SIGINT)
        else:
            signal.pthread_kill(threading.get_ident(), signal.SIGINT)

    interrupt = threading.Thread(target=ctrl_c)
    interrupt.start()
    started = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            client.close()
        elapsed = time.monotonic() - started
    finally:
        interrupt.join(WAIT)
        gate.set()
    assert elapsed < WAIT / 2, f"close() raised {elapsed:.1f} s in"
    assert client.state is WebPubSubClientState.STOPPED
    assert seen.wait_for(2) == ["disconnected", "stopped"]
    client.open()  # its events come after those
    client.close()
    assert seen.items == ["disconnected", "stopped", "disconnected", "stopped"]


def test_a_listener_may_close_and_reopen_its_own_client(hub: Hub) -> None:
    """A listener closing and reopening its client (on the thread that delivers the
    client's events): the events queued before the close still come, in order, then the
    first connection's stopped event, which must not let the reopened client go: held by
    nothing but its listeners, it runs on and receives."""
    seen = Collector()
    gate = threading.Event()

    def start(publisher: WebPubSubClient) -> "weakref.ref[WebPubSubClient]":
        client = make(hub.url("c"))

        def on_message(message: OnGroupDataMessageArgs) -> None:
            seen(message.data)
            if message.data == "hold":
                assert gate.wait(WAIT)
            elif message.data == "restart":
                client.close()
                client.open()
                client.join_group("g")

        client.subscribe(CallbackType.GROUP_MESSAGE, on_message)
        client.subscribe(CallbackType.CONNECTED, lambda _args: seen("connected"))
        client.subscribe(CallbackType.DISCONNECTED, lambda _args: seen("disconnected"))
        client.subscribe(CallbackType.STOPPED, lambda: seen("stopped"))
        client.open()
        client.join_group("g")
        for data in ("hold", "restart", "queued"):
            publisher.send_to_group("g", data, WebPubSubDataType.TEXT)
        client.join_group("sync")  # its ack comes behind the three messages
        return weakref.ref(client)

    with make(hub.url("p")) as publisher:
        reference = start(publisher)
        gate.set()
        seen.wait_until(lambda items: items.count("connected") == 2)
        gc.collect()
        publisher.send_to_group("g", "after", WebPubSubDataType.TEXT)
        seen.wait_until(lambda items: "after" in items)
    assert seen.items == ["connected", "hold", "restart", "queued", "disconnected", "stopped", "connected", "after"]
    client = reference()
    assert client is not None and client.is_connected()
    client.close()


def test_a_listener_may_make_blocking_calls_on_a_client_of_its_dispatch_thread(hub: Hub) -> None:
    """A listener of one client sends, joins, leaves, closes and reopens another client
    pinned to the same dispatch thread, which receives meanwhile: nothing deadlocks, and
    that client's events come in order (once the listener returns, or before on another
    thread if the listener ran past the stall threshold)."""
    first = make(hub.url("first"))
    second = pinned_beside(hub, first, "second")
    got = Collector()
    second.subscribe(CallbackType.GROUP_MESSAGE, lambda m: got(m.data))
    second.subscribe(CallbackType.STOPPED, lambda: got("stopped"))
    errors: List[BaseException] = []

    def on_message(_message: OnGroupDataMessageArgs) -> None:
        try:
            for n in range(3):
                second.send_to_group("g", f"sent {n}", WebPubSubDataType.TEXT)
            second.join_group("other")
            second.leave_group("other")
            second.close()
            second.open()
            second.join_group("g")
            second.send_to_group("g", "reopened", WebPubSubDataType.TEXT)
        except BaseException as exc:  # noqa: BLE001 - checked below
            errors.append(exc)
        got("listener done")

    first.subscribe(CallbackType.GROUP_MESSAGE, on_message)
    with first, second:
        second.join_group("g")
        first.join_group("go")
        first.send_to_group("go", "go", WebPubSubDataType.TEXT)
        got.wait_until(lambda items: "reopened" in items)
    assert not errors, errors
    assert "listener done" in got.items
    second_got = [item for item in got.items if item != "listener done"]
    assert second_got[:5] == ["sent 0", "sent 1", "sent 2", "stopped", "reopened"]


def thread_changes(threads: List[int]) -> List[int]:
    """``threads`` without repeats in a row: the threads a client's events ran on, in turn."""
    return [t for i, t in enumerate(threads) if i == 0 or threads[i - 1] != t]


def test_a_listener_waiting_for_a_client_of_its_dispatch_thread_gets_its_event(hub: Hub) -> None:
    """A listener of one client waits for an event of another client pinned to the same
    dispatch thread (sent by a third): once the listener has run past the stall
    threshold, that client moves to another thread and gets it (before, its event
    waited behind the listener: a deadlock until the wait gave up)."""
    waiter = make(hub.url("waiter"))
    other = pinned_beside(hub, waiter, "other")
    publisher = make(hub.url("publisher"))
    delivered, outcome, other_threads = threading.Event(), Collector(), Collector()

    def on_other(_message: OnGroupDataMessageArgs) -> None:
        other_threads(threading.get_ident())
        delivered.set()

    def on_waiter(_message: OnGroupDataMessageArgs) -> None:
        publisher.send_to_group("to-other", "ping", WebPubSubDataType.TEXT)
        outcome((delivered.wait(WAIT), threading.get_ident()))

    other.subscribe(CallbackType.GROUP_MESSAGE, on_other)
    waiter.subscribe(CallbackType.GROUP_MESSAGE, on_waiter)
    with waiter, other, publisher:
        other.join_group("to-other")
        waiter.join_group("to-waiter")
        publisher.send_to_group("to-waiter", "go", WebPubSubDataType.TEXT)
        ((got_it, waiter_thread),) = outcome.wait_for(1, timeout=WAIT + 5)
    assert got_it, "the other client's event waited behind the listener"
    assert other_threads.items == [other_threads.items[0]] and other_threads.items[0] != waiter_thread


def test_a_held_thread_moves_its_other_clients_once_and_no_other_client(hub: Hub) -> None:
    """A listener holds its dispatch thread past the stall threshold while clients on
    every dispatch thread receive: the held client and those of the other threads keep
    their thread from one event to the next; those that shared the held one's thread
    move to another thread once, and stay there."""
    gate, held = threading.Event(), threading.Event()
    seen: Dict[str, List[int]] = {}
    lock = threading.Lock()

    def recorder(name: str) -> Any:
        def record(message: OnGroupDataMessageArgs) -> None:
            with lock:
                seen.setdefault(name, []).append(threading.get_ident())
            if name == "holder" and message.data == "hold":
                held.set()
                assert gate.wait(WAIT)

        return record

    holder = make(hub.url("holder"))
    beside = pinned_beside(hub, holder, "beside")
    # Enough clients that every dispatch thread has one (the pool is round robin).
    others = [make(hub.url(f"other-{n}")) for n in range(len(_dispatcher._WORKERS) + 1)]  # pylint: disable=protected-access
    receivers = {"holder": holder, "beside": beside, **{f"other-{n}": c for n, c in enumerate(others)}}
    for name, client in receivers.items():
        client.subscribe(CallbackType.GROUP_MESSAGE, recorder(name))

    def all_got(count: int) -> None:
        wait_until(lambda: all(len(seen.get(name, ())) >= count for name in receivers), what=f"{count} events each")

    with contextlib.ExitStack() as stack, make(hub.url("publisher")) as publisher:
        for client in receivers.values():
            stack.enter_context(client)
            client.join_group("g")
        publisher.send_to_group("g", "before", WebPubSubDataType.TEXT)
        all_got(1)
        publisher.send_to_group("g", "hold", WebPubSubDataType.TEXT)
        assert held.wait(WAIT)
        publisher.send_to_group("g", "during", WebPubSubDataType.TEXT)
        # Well within the hold (WAIT): the moved clients got "during" while it lasted.
        rest = [name for name in receivers if name != "holder"]
        wait_until(lambda: all(len(seen.get(name, ())) >= 3 for name in rest), timeout=WAIT / 2, what="3 each")
        gate.set()
        publisher.send_to_group("g", "after", WebPubSubDataType.TEXT)
        all_got(4)
    (held_thread,) = thread_changes(seen["holder"])
    for name in rest:
        threads = thread_changes(seen[name])
        if name == "beside" or threads[0] == held_thread:  # moved once: "during" came on the new thread
            assert len(threads) == 2 and threads[0] == held_thread, (name, threads)
            assert seen[name][2] == threads[1], (name, seen[name])
        else:
            assert len(threads) == 1, (name, threads)


def test_a_moved_client_gets_its_events_in_order_one_at_a_time(hub: Hub) -> None:
    """A client moves off a held dispatch thread while its messages keep coming, and the
    hold ends amid them, while the held thread still has the moved client among those it
    saw readable (both got the holding message together, while their thread was busy):
    each event arrives once, in order, and its listeners never run on two threads at once."""
    busy, held, gate = threading.Event(), threading.Event(), threading.Event()
    got: List[str] = []
    overlaps: List[str] = []
    running = threading.Lock()

    def hold(message: OnGroupDataMessageArgs) -> None:
        if message.data == "busy":  # below the stall threshold: nothing moves
            busy.set()
            time.sleep(0.05)
        elif message.data == "hold":
            held.set()
            assert gate.wait(WAIT)

    def on_mover(message: OnGroupDataMessageArgs) -> None:
        if not running.acquire(blocking=False):
            overlaps.append(message.data)
            return
        try:
            got.append(message.data)
            time.sleep(0.001)  # a listener with some work: the next events queue meanwhile
        finally:
            running.release()

    holder = make(hub.url("holder"))
    mover = pinned_beside(hub, holder, "mover")
    holder.subscribe(CallbackType.GROUP_MESSAGE, hold)
    mover.subscribe(CallbackType.GROUP_MESSAGE, on_mover)
    sent = [str(n) for n in range(400)]
    with holder, mover, make(hub.url("publisher")) as publisher:
        holder.join_group("h")
        holder.join_group("g")
        mover.join_group("g")
        publisher.send_to_group("h", "busy", WebPubSubDataType.TEXT)
        assert busy.wait(WAIT)
        publisher.send_to_group("g", "hold", WebPubSubDataType.TEXT)
        assert held.wait(WAIT)
        for data in sent[:200]:
            publisher.send_to_group("g", data, WebPubSubDataType.TEXT, ack=False)
        # Well within the hold (WAIT): the mover got them on another thread.
        wait_until(lambda: len(got) > 1, timeout=WAIT / 2, what="the mover's first events")
        for data in sent[200:]:  # queued while the mover's listener works through the first
            publisher.send_to_group("g", data, WebPubSubDataType.TEXT, ack=False)
        gate.set()
        wait_until(lambda: len(got) + len(overlaps) > len(sent), what="all the mover's events")
    assert not overlaps
    assert got == ["hold", *sent]


def test_listeners_subscribed_or_unsubscribed_by_a_listener_take_effect_from_the_next_event(hub: Hub) -> None:
    """A listener that unsubscribes itself and subscribes another while the messages of a
    burst wait behind it (delivered together): the next message goes to the new one only."""
    calls = Collector()
    client = make(hub.url())

    def second(message: OnGroupDataMessageArgs) -> None:
        calls(("second", message.data))

    def first(message: OnGroupDataMessageArgs) -> None:
        calls(("first", message.data))
        if message.data == "1":
            client.unsubscribe(CallbackType.GROUP_MESSAGE, first)
            client.subscribe(CallbackType.GROUP_MESSAGE, second)

    client.subscribe(CallbackType.GROUP_MESSAGE, first)
    with client, make(hub.url("p")) as publisher:
        client.join_group("g")
        for n in range(5):
            publisher.send_to_group("g", str(n), WebPubSubDataType.TEXT, ack=n == 4)
        calls.wait_for(5)
    assert calls.items == [("first", "0"), ("first", "1"), ("second", "2"), ("second", "3"), ("second", "4")]


# ---- server messages and events -----------------------------------------------------------


def test_server_messages_of_every_type(hub: Hub, protocol: WebPubSubProtocolType) -> None:
    got = Collector()
    with make(hub.url("carol"), protocol) as client:
        client.subscribe(CallbackType.SERVER_MESSAGE, got)
        hub.service.send_to_all("plain", content_type="text/plain")
        hub.service.send_to_user("carol", {"k": 1})
        hub.service.send_to_connection(client.connection_id, b"\x01\x02", content_type="application/octet-stream")
        messages = got.wait_for(3)
    assert all(isinstance(m, OnServerDataMessageArgs) for m in messages)
    assert [(m.data_type, m.data if m.data_type != "binary" else bytes(m.data)) for m in messages] == [
        (WebPubSubDataType.TEXT, "plain"),
        (WebPubSubDataType.JSON, {"k": 1}),
        (WebPubSubDataType.BINARY, b"\x01\x02"),
    ]


def test_json_too_deep_for_the_json_module_arrives_as_its_text(hub: Hub, caplog: Any) -> None:
    """Valid JSON nested deeper than ``json.loads`` reads (a RecursionError, not a
    ValueError) is passed as its text like any json that does not parse, in a message
    record (under 32 KiB) and in an event callback alike; it was dropped."""
    # Deeper than any supported Python's json module reads (3.13 reads a depth of 2,000);
    # 30,000 bytes fit a message record, 40,000 do not.
    small = "[" * 15000 + "]" * 15000
    large = "[" * 20000 + "]" * 20000
    got = Collector()
    with make(hub.url("deep")) as client:
        client.subscribe(CallbackType.SERVER_MESSAGE, lambda args: got((args.data_type, args.data)))
        for body in (small, large):
            raw = io.BytesIO(body.encode())  # sent as is (a str would be sent as a JSON string)
            hub.service.send_to_connection(client.connection_id, raw, content_type="application/json")
        hub.service.send_to_connection(client.connection_id, "end", content_type="text/plain")
        items = got.wait_for(3)
    assert items == [(WebPubSubDataType.JSON, small), (WebPubSubDataType.JSON, large), (WebPubSubDataType.TEXT, "end")]
    assert "received json data that does not parse; passing the text" in caplog.text


def test_send_event_reaches_the_upstream(hub: Hub, upstream: Upstream) -> None:
    while not upstream.events.empty():
        upstream.events.get_nowait()
    with make(hub.url("dave")) as client:
        result = client.send_event("notify", {"n": 1}, WebPubSubDataType.JSON)
        assert result.ack_id is not None
        first = upstream.next_event()
        client.send_event("notify", b"\x07", WebPubSubDataType.BINARY, ack=False)
        second = upstream.next_event()
    assert first["event"] == "notify" and first["user_id"] == "dave"
    assert json.loads(first["body"]) == {"n": 1}
    assert second["body"] == b"\x07"


def test_invoke_event(hub: Hub) -> None:
    with make(hub.url()) as client:
        text = client.invoke_event("echo", "hi", WebPubSubDataType.TEXT)
        assert (text.data_type, text.data) == (WebPubSubDataType.TEXT, "hi")
        value = client.invoke_event("echo", {"x": [1]}, WebPubSubDataType.JSON)
        assert (value.data_type, value.data) == (WebPubSubDataType.JSON, {"x": [1]})
        raw = client.invoke_event("echo", b"\x00\x01", WebPubSubDataType.BINARY)
        assert (raw.data_type, raw.data) == (WebPubSubDataType.BINARY, b"\x00\x01")
        empty = client.invoke_event("no-reply", "x", WebPubSubDataType.TEXT)  # an empty body
        assert (empty.data_type, empty.data) == (WebPubSubDataType.TEXT, "")
        with pytest.raises(InvokeEventError) as info:
            client.invoke_event("fail", "x", WebPubSubDataType.TEXT)
        assert info.value.error_detail is not None and info.value.error_detail.name
        assert not info.value.error_detail.message.startswith("invocation "), info.value.error_detail.message
        started = time.monotonic()
        with pytest.raises(InvokeEventError) as timed_out:
            client.invoke_event("slow", "x", WebPubSubDataType.TEXT, timeout=0.3)
        assert time.monotonic() - started < 2.5
        assert timed_out.value.error_detail is not None
        assert timed_out.value.error_detail.name == "Timeout"


# ---- errors from the service ----------------------------------------------------------------


def test_forbidden_join_fails_fast_without_retrying(hub: Hub) -> None:
    with make(hub.url(roles=[]), message_retry_total=3, message_retry_backoff_factor=1.0) as client:
        started = time.monotonic()
        with pytest.raises(SendMessageError) as info:
            client.join_group("locked")
        assert time.monotonic() - started < 1.0  # Forbidden is never retried
    assert info.value.error_detail is not None
    assert info.value.error_detail.name == "Forbidden"
    # str() adds the error detail to the official message (README, "Error texts differ")
    assert info.value.message == "Failed to send message."
    assert str(info.value) == (
        "Failed to send message. Forbidden: The client does not have permission to join group 'locked'."
    )
    assert info.value.ack_id is not None  # the refused ackId, as the official client reports it


def test_only_an_internal_server_error_is_retried_and_its_retries_keep_the_ack_id(
    hub: Hub, upstream: Upstream, tap: FrameTap
) -> None:
    """An ``InternalServerError`` ack (the upstream fails the event) is retried
    ``message_retry_total`` times, each attempt with the first one's ackId; ``Forbidden``,
    ``BadRequest`` and not connected (during a reconnect) are not retried."""
    while not upstream.events.empty():
        upstream.events.get_nowait()
    urls = [tap.url(hub.url(roles=["webpubsub.joinLeaveGroup"]))] * 2
    reconnecting, release = threading.Event(), threading.Event()

    def provide() -> str:
        if len(urls) == 1:  # the reconnect's: held until released
            reconnecting.set()
            assert release.wait(WAIT)
        return urls.pop()

    credential = WebPubSubClientCredential(provide)
    with make(credential, WebPubSubProtocolType.JSON, message_retry_total=2) as client:
        with pytest.raises(SendMessageError) as failed:
            client.send_event("fail", "x", WebPubSubDataType.TEXT)
        with pytest.raises(SendMessageError) as forbidden:
            client.send_to_group("g", "x", WebPubSubDataType.TEXT)
        with pytest.raises(SendMessageError) as bad:
            client.join_group("a\nb")  # the service refuses a line feed inside a group name
        hub.drop(client.connection_id)
        assert reconnecting.wait(WAIT)
        with pytest.raises(SendMessageError) as not_connected:
            client.send_event("e", "x", WebPubSubDataType.TEXT)
        release.set()
        wait_until(lambda: client.state is WebPubSubClientState.CONNECTED, what="the new connection")
        client.send_event("marker", "x", WebPubSubDataType.TEXT)
    names = [e.value.error_detail.name for e in (failed, forbidden, bad, not_connected)]  # type: ignore[union-attr]
    assert names == ["InternalServerError", "Forbidden", "BadRequest", "NotConnected"]
    assert [upstream.next_event()["event"] for _ in range(4)] == ["fail"] * 3 + ["marker"]
    events = [(frame["event"], frame["ackId"]) for _, frame in tap.sent("event")]
    marker = events[-1][1]
    assert events == [("fail", failed.value.ack_id)] * 3 + [("marker", marker)]
    assert [frame["ackId"] for _, frame in tap.sent("sendToGroup")] == [forbidden.value.ack_id]
    assert [frame["ackId"] for _, frame in tap.sent("joinGroup")] == [bad.value.ack_id]
    assert len(tap.heads) == 2


@pytest.mark.parametrize(
    "mode, fixed",
    [(RetryMode.Fixed, True), (CoreRetryMode.Fixed, True), (CoreRetryMode.Exponential, False)],
    ids=["fixed", "azure-core-fixed", "azure-core-exponential"],
)
def test_message_retry_mode_fixed_waits_the_same_before_each_retry(
    hub: Hub, tap: FrameTap, mode: Any, fixed: bool
) -> None:
    """Retries 0.5 s apart with ``RetryMode.Fixed`` (azure.core's too): the last delay
    under 1.25 s, where that of ``Exponential`` (0.5, 1, 2 s) is 2 s. The bounds leave
    0.2 s or more for the relay thread's scheduling on a loaded machine."""
    with make(
        tap.url(hub.url()),
        message_retry_total=3,
        message_retry_backoff_factor=0.5,
        message_retry_backoff_max=10.0,
        message_retry_mode=mode,
    ) as client:
        with pytest.raises(SendMessageError):
            client.send_event("fail", "x", WebPubSubDataType.TEXT)
    times = [at for at, _ in tap.sent("event")]
    assert len(times) == 4
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert min(gaps) > 0.3, gaps
    if fixed:
        assert gaps[2] < 1.25, gaps
    else:
        assert gaps[2] > 1.25 and gaps[1] > 0.7, gaps


def test_a_refused_send_reports_its_ack_id(hub: Hub) -> None:
    with make(hub.url(roles=["webpubsub.joinLeaveGroup"]), message_retry_total=0) as client:
        refused = []
        for text in ("one", "two"):
            with pytest.raises(SendMessageError) as info:
                client.send_to_group("g", text, WebPubSubDataType.TEXT)
            refused.append(info.value)
        with pytest.raises(SendMessageError) as chosen:
            client.send_to_group("g", "three", WebPubSubDataType.TEXT, ack_id=900)
    assert all(e.error_detail is not None and e.error_detail.name == "Forbidden" for e in refused)
    assert refused[0].ack_id is not None and refused[1].ack_id is not None
    assert refused[0].ack_id != refused[1].ack_id
    assert chosen.value.ack_id == 900


def test_a_send_refused_before_it_was_written_has_no_ack_id_but_its_own(hub: Hub) -> None:
    """Refused before it was written (here not open: IllegalState), an acked operation's
    error has no ackId, unless a send named its own: the error then carries it."""
    client = make(hub.url())
    for operation, expected in (
        (lambda: client.send_to_group("g", "x", WebPubSubDataType.TEXT), None),
        (lambda: client.send_event("e", "x", WebPubSubDataType.TEXT), None),
        (lambda: client.join_group("g"), None),
        (lambda: client.send_to_group("g", "x", WebPubSubDataType.TEXT, ack_id=7), 7),
        (lambda: client.send_event("e", "x", WebPubSubDataType.TEXT, ack_id=8), 8),
    ):
        with pytest.raises(SendMessageError) as info:
            operation()
        assert info.value.error_detail is not None and info.value.error_detail.name == "IllegalState"
        assert info.value.ack_id == expected


def test_join_and_leave_report_the_ack_id_their_frame_carried(hub: Hub) -> None:
    """The library numbers join and leave messages itself: an ``ack_id`` given to
    join_group or leave_group is checked, and their result and error report the ackId
    the frame carried (none for one never written), the next of the client's own."""
    client = make(hub.url(), message_retry_total=0)
    for operation in (client.join_group, client.leave_group):
        with pytest.raises(SendMessageError) as before:
            operation("g", ack_id=5000)
        assert before.value.error_detail is not None and before.value.error_detail.name == "IllegalState"
        assert before.value.ack_id is None
    with client:
        last = client.send_to_group("g", "x", WebPubSubDataType.TEXT).ack_id
        assert last is not None
        for operation in (client.join_group, client.leave_group):
            assert operation("g", ack_id=5000).ack_id == last + 1
            with pytest.raises(SendMessageError) as refused:
                operation("a\nb", ack_id=5000)  # the service refuses a line feed in a group name
            assert refused.value.error_detail is not None and refused.value.error_detail.name == "BadRequest"
            assert refused.value.ack_id == last + 2
            last += 2


def test_operations_when_not_connected_raise_send_message_error(hub: Hub) -> None:
    """Before ``open()`` and after ``close()`` every operation, fire-and-forget sends
    included, fails at once (the official client retries for about 5.6 s) with
    ``error_detail.name`` "IllegalState" (README, "Differences to know")."""
    client = make(hub.url(), message_retry_total=3, message_retry_backoff_factor=5.0)
    operations = every_operation(client)
    for when in ("before open", "after close"):
        for n, operation in enumerate(operations):
            started = time.monotonic()
            with pytest.raises(SendMessageError) as info:
                operation()
            assert time.monotonic() - started < 2.5, (when, n)  # a retry would wait 5 s first
            assert isinstance(info.value, InvokeEventError) == (n == 6)
            assert info.value.error_detail is not None and info.value.error_detail.name == "IllegalState", (when, n)
        client.open()
        client.close()


def test_lost_ack_times_out_then_a_retry_keeps_its_ack_id(hub: Hub) -> None:
    with make(hub.url(), message_retry_total=0, ack_timeout=0.5) as client:
        hub.drop_acks(client.connection_id, 1)
        with pytest.raises(SendMessageError) as info:
            client.join_group("g")
        assert info.value.error_detail is not None and info.value.error_detail.name == "Timeout"
        assert info.value.ack_id is not None
    got = Collector()
    with make(hub.url(), message_retry_total=2, ack_timeout=0.5) as client:
        client.subscribe(CallbackType.GROUP_MESSAGE, got)
        client.join_group("g")
        hub.drop_acks(client.connection_id, 1)
        result = client.send_to_group("g", "once", WebPubSubDataType.TEXT)
        assert result.is_duplicated  # the retry reused the ackId; the service had it already
        client.send_to_group("g", "marker", WebPubSubDataType.TEXT)
        got.wait_for(2)
    assert [m.data for m in got.items] == ["once", "marker"]


def test_a_timed_out_send_reports_its_ack_id_and_a_resend_with_it_is_deduplicated(hub: Hub) -> None:
    got = Collector()
    with make(hub.url(), message_retry_total=0, ack_timeout=0.5) as client:
        client.subscribe(CallbackType.GROUP_MESSAGE, got)
        client.join_group("g")
        hub.drop_acks(client.connection_id, 1)  # delivered, its ack swallowed
        with pytest.raises(SendMessageError) as info:
            client.send_to_group("g", "once", WebPubSubDataType.TEXT)
        assert info.value.error_detail is not None and info.value.error_detail.name == "Timeout"
        lost = info.value.ack_id
        assert lost is not None
        again = client.send_to_group("g", "once", WebPubSubDataType.TEXT, ack_id=lost)
        assert (again.ack_id, again.is_duplicated) == (lost, True)
        client.send_to_group("g", "marker", WebPubSubDataType.TEXT)
        got.wait_for(2)
    assert [m.data for m in got.items] == ["once", "marker"]


def test_a_send_pending_at_close_reports_its_ack_id(hub: Hub) -> None:
    got = Collector()
    outcome: List[BaseException] = []

    def send(client: WebPubSubClient) -> None:
        try:
            client.send_to_group("g", "held", WebPubSubDataType.TEXT)
        except BaseException as e:  # checked below, whatever it is
            outcome.append(e)

    with make(hub.url()) as client:
        client.subscribe(CallbackType.GROUP_MESSAGE, got)
        client.join_group("g")
        hub.drop_acks(client.connection_id, 1)  # delivered, its ack swallowed
        sender = threading.Thread(target=send, args=(client,))
        sender.start()
        got.wait_for(1)  # the service has it: the client took it in
        client.close()
        sender.join(WAIT)
    assert not sender.is_alive() and len(outcome) == 1
    error = outcome[0]
    assert isinstance(error, SendMessageError), repr(error)
    assert error.ack_id is not None
    assert error.error_detail is not None and error.error_detail.name == "Stopped"
    assert str(error.ack_id) in error.error_detail.message


def test_caller_chosen_ack_id_deduplicates(hub: Hub, upstream: Upstream) -> None:
    got = Collector()
    with make(hub.url()) as client:
        client.subscribe(CallbackType.GROUP_MESSAGE, got)
        client.join_group("g")
        first = client.send_to_group("g", "once", WebPubSubDataType.TEXT, ack_id=1000)
        again = client.send_to_group("g", "once", WebPubSubDataType.TEXT, ack_id=1000)
        assert (first.ack_id, first.is_duplicated) == (1000, False)
        assert (again.ack_id, again.is_duplicated) == (1000, True)
        event = client.send_event("notify", "e", WebPubSubDataType.TEXT, ack_id=2000)
        assert (event.ack_id, event.is_duplicated) == (2000, False)
        client.send_to_group("g", "marker", WebPubSubDataType.TEXT)
        got.wait_for(2)
    assert [m.data for m in got.items] == ["once", "marker"]


def test_automatic_ack_ids_never_reuse_one_chosen_ahead_of_them(hub: Hub) -> None:
    """The service answers a reused ackId with Duplicate and drops the message: the
    automatic ids must step over the chosen ones."""
    got = Collector()
    with make(hub.url()) as client:
        client.subscribe(CallbackType.GROUP_MESSAGE, got)
        joined = client.join_group("g").ack_id
        assert joined is not None
        chosen = [joined + 2, joined + 4]
        for n, ack_id in enumerate(chosen):
            result = client.send_to_group("g", f"chosen {n}", WebPubSubDataType.TEXT, ack_id=ack_id)
            assert (result.ack_id, result.is_duplicated) == (ack_id, False)
        for n in range(5):
            result = client.send_to_group("g", f"automatic {n}", WebPubSubDataType.TEXT)
            assert not result.is_duplicated and result.ack_id not in chosen, (n, result.ack_id)
        got.wait_for(7)
    expected = [f"chosen {n}" for n in range(2)] + [f"automatic {n}" for n in range(5)]
    assert sorted(m.data for m in got.items) == sorted(expected)


def test_keep_alive_timeout_recovers_a_silent_connection(hub: Hub) -> None:
    """While muted the service discards frames; only a keep-alive recovery gets them replayed."""
    got, disconnected = Collector(), Collector()
    with make(hub.url(), keep_alive_interval=0.1, keep_alive_timeout=0.6) as subscriber, make(hub.url()) as publisher:
        subscriber.subscribe(CallbackType.GROUP_MESSAGE, got)
        subscriber.subscribe(CallbackType.DISCONNECTED, disconnected)
        subscriber.join_group("g")
        connection_id = subscriber.connection_id
        hub.mute(connection_id, 3000)
        publisher.send_to_group("g", "sent while muted", WebPubSubDataType.TEXT)
        got.wait_for(1, timeout=2.5)  # well before the mute ends
        assert subscriber.connection_id == connection_id
        assert disconnected.items == []
    assert got.items[0].data == "sent while muted"


# ---- connection loss ----------------------------------------------------------------------------


def test_recovery_after_a_dropped_socket_loses_and_duplicates_nothing(hub: Hub) -> None:
    got, disconnected = Collector(), Collector()
    total = 60
    with make(hub.url("sub")) as subscriber, make(hub.url("pub")) as publisher:
        subscriber.subscribe(CallbackType.GROUP_MESSAGE, got)
        subscriber.subscribe(CallbackType.DISCONNECTED, disconnected)
        subscriber.join_group("g")
        connection_id = subscriber.connection_id
        for i in range(total):
            if i == total // 3:
                hub.drop(connection_id)
            if i == 2 * total // 3:
                hub.drop(publisher.connection_id)  # the publisher recovers mid-stream too
            publisher.send_to_group("g", str(i), WebPubSubDataType.TEXT)
        got.wait_for(total)
        assert subscriber.connection_id == connection_id  # recovered, not reconnected
        publisher.send_to_group("g", "end", WebPubSubDataType.TEXT)
        got.wait_for(total + 1)
        assert disconnected.items == []  # a recovery raises no disconnected event
    assert [m.data for m in got.items] == [str(i) for i in range(total)] + ["end"]
    sequence_ids = [m.sequence_id for m in got.items]
    assert sequence_ids == sorted(set(sequence_ids))


def test_sockets_dropped_every_100_ms_lose_and_duplicate_nothing(upstream: Upstream) -> None:
    """The features table's measurement (the official client delivered some messages twice).

    Publishes until the emulator has dropped both sockets several times (bounded), then
    checks that every message arrived exactly once and in order.
    """
    emulator = Emulator(upstream.url, "--fault-drop-every-ms", "100")
    try:
        hub = Hub(emulator)
        got = Collector()
        sent = 0
        options = dict(ack_timeout=1.0, message_retry_total=10)
        with make(hub.url("sub"), **options) as subscriber, make(hub.url("pub"), **options) as publisher:
            subscriber.subscribe(CallbackType.GROUP_MESSAGE, got)
            subscriber.join_group("g")
            deadline = time.monotonic() + 30
            while sent < 200 or emulator.stats()["recoveries"] < 10:
                assert sent < 20_000 and time.monotonic() < deadline, f"too few recoveries: {emulator.stats()}"
                publisher.send_to_group("g", str(sent), WebPubSubDataType.TEXT)
                sent += 1
            publisher.send_to_group("g", "end", WebPubSubDataType.TEXT)
            got.wait_until(lambda items: bool(items) and items[-1].data == "end", timeout=30)
            stats = emulator.stats()
    finally:
        emulator.close()
    assert stats["recoveries"] >= 10 and stats["faultDrops"] >= 10
    assert [m.data for m in got.items] == [str(i) for i in range(sent)] + ["end"]


def test_unrecoverable_drop_reconnects_and_rejoins_groups(hub: Hub, protocol: WebPubSubProtocolType) -> None:
    connected, disconnected, got = Collector(), Collector(), Collector()
    client = make(hub.url("r"), protocol)
    client.subscribe(CallbackType.CONNECTED, connected)
    client.subscribe(CallbackType.DISCONNECTED, disconnected)
    client.subscribe(CallbackType.SERVER_MESSAGE, got)  # a REST send to a group arrives from "server"
    with client:
        client.join_group("g")
        (first,) = connected.wait_for(1)
        first_id = client.connection_id
        assert first.connection_id == first_id
        hub.drop(first_id, recoverable=False)
        (lost,) = disconnected.wait_for(1)
        assert isinstance(lost, OnDisconnectedArgs)
        assert lost.connection_id == first_id
        again = connected.wait_for(2)[1]
        assert again.connection_id != first_id
        wait_until(client.is_connected, what="reconnected")
        # auto-rejoin: the new connection is put back in the group without joining again
        wait_until(
            lambda: again.connection_id in [c.connection_id for c in hub.service.list_connections(group="g")],
            what="the new connection rejoined the group",
        )
        hub.service.send_to_group("g", "after", content_type="text/plain")
        got.wait_for(1)
    assert got.items[0].data == "after"


@pytest.mark.parametrize("rejoin", [True, False])
def test_an_open_after_a_close_rejoins_the_groups(hub: Hub, rejoin: bool) -> None:
    """``auto_rejoin_groups`` rejoins on an ``open()`` after a ``close()`` too, and only then."""

    def members() -> List[str]:
        return [c.connection_id for c in hub.service.list_connections(group="g")]

    client = make(hub.url(), auto_rejoin_groups=rejoin)
    with client:
        client.join_group("g")
    with client:
        if rejoin:
            wait_until(lambda: client.connection_id in members(), what="the reopened client rejoined")
        else:
            client.join_group("other")  # acked after anything sent on open
            assert client.connection_id not in members()


def test_connection_id_is_none_once_the_connection_is_lost(hub: Hub, protocol: WebPubSubProtocolType) -> None:
    """A ``disconnected`` listener finds ``connection_id`` None and ``is_connected()``
    False (README: "``connection_id`` is ``None`` once the connection is lost"); the
    reconnect's URL is held until it has looked, as the first attempt follows at once."""
    seen = Collector()
    release = threading.Event()
    urls: List[str] = []

    def provide() -> str:
        if urls:
            assert release.wait(WAIT)
        urls.append(hub.url())
        return urls[-1]

    with make(WebPubSubClientCredential(provide), protocol) as client:
        client.subscribe(CallbackType.DISCONNECTED, lambda _: seen((client.connection_id, client.is_connected())))
        hub.drop(client.connection_id, recoverable=False)
        try:
            assert seen.wait_for(1) == [(None, False)]
        finally:
            release.set()
        wait_until(client.is_connected, what="reconnected")


@pytest.mark.parametrize("auto_reconnect", [None, True])
def test_reconnect_retry_total_0_with_auto_reconnect_makes_one_attempt(hub: Hub, auto_reconnect: Any) -> None:
    """``reconnect_retry_total=0`` disables reconnecting, unless ``auto_reconnect=True``:
    then one attempt, whose failure is the ``stop_error``."""
    calls: List[int] = []

    def provide() -> str:
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("no token")
        return hub.url()

    stopped = Collector()
    kw = {} if auto_reconnect is None else {"auto_reconnect": auto_reconnect}
    client = make(WebPubSubClientCredential(provide), reconnect_retry_total=0, **kw)
    client.subscribe(CallbackType.STOPPED, lambda: stopped(client.stop_error))
    client.open()
    hub.drop(client.connection_id, recoverable=False)
    (error,) = stopped.wait_for(1)
    if auto_reconnect:
        assert len(calls) == 2
        assert isinstance(error, OpenClientError) and error.status == _native.STATUS_CREDENTIAL_FAILED
    else:
        assert len(calls) == 1
        assert not isinstance(error, OpenClientError) and error.status == _native.STATUS_NOT_CONNECTED


def test_close_code_1008_disconnects_then_stops_without_reconnect(hub: Hub) -> None:
    disconnected, stopped = Collector(), Collector()
    client = make(hub.url(), reconnect_retry_total=0)
    client.subscribe(CallbackType.DISCONNECTED, disconnected)
    client.subscribe(CallbackType.STOPPED, lambda: stopped("stopped"))
    client.open()
    hub.close_connection(client.connection_id, 1008, "policy")
    disconnected.wait_for(1)
    stopped.wait_for(1)
    assert client.state is WebPubSubClientState.STOPPED
    assert disconnected.items[0].close_code in (None, 1008)
    assert isinstance(client.stop_error, WebPubSubClientError)
    assert client.stop_error.status == _native.STATUS_NOT_CONNECTED
    client.close()


def test_stop_error_is_the_last_reconnect_attempts_failure(hub: Hub) -> None:
    """A provider that starts failing (its token service answers 401, say): the reconnects
    give up, and the stopped listener (no argument, as in the official client) finds the
    last attempt's failure in ``stop_error``; after ``close()`` it is None."""
    url = hub.url()
    calls: List[int] = []

    def provide() -> str:
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError(f"the token service answered 401 (call {len(calls)})")
        return url

    client = make(WebPubSubClientCredential(provide), reconnect_retry_total=2)
    seen = Collector()
    client.subscribe(CallbackType.STOPPED, lambda: seen(client.stop_error))
    client.open()
    hub.close_connection(client.connection_id, 1008)
    (error,) = seen.wait_for(1)
    assert isinstance(error, OpenClientError)
    assert error.status == _native.STATUS_CREDENTIAL_FAILED
    # the start, then one attempt and 2 retries
    assert "RuntimeError: the token service answered 401 (call 4)" in str(error)
    assert len(calls) == 4
    calls.clear()
    client.open()
    client.close()
    assert seen.wait_for(2)[1] is None
    assert client.stop_error is None


def test_stop_error_chains_what_the_provider_raised(hub: Hub) -> None:
    """The reconnects give up because the provider raises: ``stop_error`` carries that
    exception object as its ``__cause__``, so that the application can tell its own
    errors by type."""
    provide = FailingProvider(hub.url(), lambda call: call > 1)
    client = make(WebPubSubClientCredential(provide), reconnect_retry_total=1)
    seen = Collector()
    client.subscribe(CallbackType.STOPPED, lambda: seen(client.stop_error))
    client.open()
    hub.close_connection(client.connection_id, 1008)
    (error,) = seen.wait_for(1)
    assert isinstance(error, OpenClientError) and error.status == _native.STATUS_CREDENTIAL_FAILED
    assert len(provide.raised) == 2
    assert error.__cause__ is provide.raised[-1]  # the last attempt's
    client.close()


def test_a_late_stop_is_chained_to_its_own_requests_exception(hub: Hub) -> None:
    """A stop whose event is taken only after a reopen's credential request failed too
    (a listener held the dispatch thread): each stop is chained to the exception of its
    own run's request, not to the provider's latest."""
    # It fails the reconnect of the first run, then that of the second.
    provide = FailingProvider(hub.url(), lambda call: call in (2, 4))
    gate, held = threading.Event(), threading.Event()
    client = make(WebPubSubClientCredential(provide), reconnect_retry_total=0, auto_reconnect=True)
    client.subscribe(CallbackType.DISCONNECTED, lambda _: (held.set(), gate.wait(WAIT)))
    stopped = Collector()
    client.subscribe(CallbackType.STOPPED, lambda: stopped(client.stop_error))
    client.open()
    try:
        hub.close_connection(client.connection_id, 1008)
        assert held.wait(WAIT)
        wait_until(lambda: client.state is WebPubSubClientState.STOPPED, what="the first stop")
        client.open()  # the first stop's event waits behind the held listener
        hub.close_connection(client.connection_id, 1008)
        wait_until(
            lambda: len(provide.raised) == 2 and client.state is WebPubSubClientState.STOPPED, what="the second stop"
        )
    finally:
        gate.set()
    first, second = stopped.wait_for(2)
    assert "(call 2)" in str(first) and first.__cause__ is provide.raised[0]
    assert second.__cause__ is provide.raised[1]
    client.close()


def test_open_clears_the_stop_error(hub: Hub) -> None:
    """``stop_error`` is about the latest run: an ``open()`` clears it as it begins, so a
    reopened client (or one whose reopen failed, which raised why) shows None."""
    url = hub.url()
    failing = threading.Event()

    def provide() -> str:
        if failing.is_set():
            raise TokenServiceError("401")
        return url

    client = make(WebPubSubClientCredential(provide), reconnect_retry_total=0, auto_reconnect=True)
    seen = Collector()
    client.subscribe(CallbackType.STOPPED, lambda: seen(client.stop_error))
    client.open()
    failing.set()
    hub.close_connection(client.connection_id, 1008)
    assert isinstance(seen.wait_for(1)[0], OpenClientError)
    assert isinstance(client.stop_error, OpenClientError)
    with pytest.raises(TokenServiceError):
        client.open()
    assert client.stop_error is None
    failing.clear()
    client.open()
    assert client.stop_error is None
    client.close()
    assert client.stop_error is None


def test_a_stop_whose_listeners_run_after_a_reopen_does_not_outlive_it(hub: Hub) -> None:
    """The state is the library's, read at once; ``stop_error`` is set as the stopped event
    reaches the listeners. With a listener of the lost session's ``disconnected`` event
    still running, the state reads Stopped while ``stop_error`` is still None, and an
    ``open()`` then connects. The stopped listeners still find the stop's error, and the
    new connection's ``connected`` event, which comes after, clears it. Before, the late
    stop's error stayed while connected."""
    gate, held = threading.Event(), threading.Event()
    client = make(hub.url(), reconnect_retry_total=0)
    client.subscribe(CallbackType.DISCONNECTED, lambda _args: (held.set(), gate.wait(WAIT)))
    stopped, connected = Collector(), Collector()
    client.subscribe(CallbackType.STOPPED, lambda: stopped(client.stop_error))
    client.subscribe(CallbackType.CONNECTED, connected)
    client.open()
    try:
        hub.drop(client.connection_id, recoverable=False)
        assert held.wait(WAIT)
        wait_until(lambda: client.state is WebPubSubClientState.STOPPED, what="stopped")
        assert client.stop_error is None  # the stopped event waits behind the held listener
        client.open()
        assert client.stop_error is None
    finally:
        gate.set()
    (error,) = stopped.wait_for(1)
    assert isinstance(error, WebPubSubClientError) and error.status == _native.STATUS_NOT_CONNECTED
    connected.wait_for(2)
    assert client.is_connected()
    assert client.stop_error is None
    client.close()


def test_rejoin_failure_is_reported(hub: Hub) -> None:
    """The second URL has no permission to join, so rejoining after a reconnect fails."""
    urls = [hub.url(roles=["webpubsub.joinLeaveGroup"]), hub.url(roles=[])]
    calls: List[str] = []

    def provide() -> str:
        calls.append("called")
        return urls[min(len(calls) - 1, 1)]

    failed = Collector()
    with make(WebPubSubClientCredential(provide)) as client:
        client.subscribe(CallbackType.REJOIN_GROUP_FAILED, failed)
        client.join_group("g")
        hub.drop(client.connection_id, recoverable=False)
        (args,) = failed.wait_for(1)
    assert isinstance(args, OnRejoinGroupFailedArgs)
    assert args.group == "g"
    assert isinstance(args.error, SendMessageError)
    assert args.error.message == "Failed to rejoin group."  # the official one says "Failed to send message."
    assert args.error.error_detail is not None and args.error.error_detail.name == "Forbidden"
    # the service's own text, as in a join's error (was prefixed "operation N failed: Forbidden: ")
    assert args.error.error_detail.message == "The client does not have permission to join group 'g'."
    # the ackId of the refused rejoin, as in the official client (the join before it had 1)
    assert isinstance(args.error.ack_id, int) and args.error.ack_id > 1
    assert len(calls) >= 2  # the provider is called again for the new connection


def test_credential_errors_fail_open(hub: Hub) -> None:
    def broken() -> str:
        raise RuntimeError("no token for you")

    client = make(WebPubSubClientCredential(broken), reconnect_retry_total=0)
    # the provider's own exception, as the official open() raises it (test_compat)
    with pytest.raises(RuntimeError, match="no token for you"):
        client.open()
    assert client.state is WebPubSubClientState.STOPPED

    wrong_type = make(WebPubSubClientCredential(lambda: 123), reconnect_retry_total=0)  # type: ignore[arg-type,return-value]
    with pytest.raises(OpenClientError):
        wrong_type.open()

    with_nul = make(WebPubSubClientCredential(lambda: hub.url() + "\0"), reconnect_retry_total=0)
    with pytest.raises(OpenClientError, match="NUL"):
        with_nul.open()


def test_the_credential_provider_runs_on_a_daemon_thread_of_the_package(hub: Hub) -> None:
    """Not on a library thread, where Python would end it inside the library at exit
    (see test_process); the library's thread only defers the answer and returns."""
    threads: List[threading.Thread] = []

    def provide() -> str:
        threads.append(threading.current_thread())
        return hub.url()

    with make(WebPubSubClientCredential(provide)) as client:
        assert client.is_connected()
    (thread,) = threads
    assert thread.name == "webpubsub-credential" and thread.daemon
    assert not isinstance(thread, threading._DummyThread)  # pylint: disable=protected-access


def test_a_providers_thread_refused_fails_open_with_a_client_error(hub: Hub, monkeypatch: Any) -> None:
    """The system refuses the thread the provider runs on (its thread limit): open()
    raises a WebPubSubClientError chained from the RuntimeError, as the asyncio client
    does, the provider not called, and the next open() connects. Before, an
    OpenClientError told the RuntimeError in its text only."""
    real_start = threading.Thread.start
    calls: List[int] = []

    def start(thread: threading.Thread) -> None:
        if thread.name == "webpubsub-credential":
            raise RuntimeError("can't start new thread")
        real_start(thread)

    def provide() -> str:
        calls.append(1)
        return hub.url()

    client = make(WebPubSubClientCredential(provide), reconnect_retry_total=0)
    monkeypatch.setattr(threading.Thread, "start", start)
    with pytest.raises(WebPubSubClientError) as info:
        client.open()
    assert type(info.value) is WebPubSubClientError and isinstance(info.value.__cause__, RuntimeError)
    assert "credential provider's thread" in str(info.value)
    assert not calls
    monkeypatch.undo()
    with client:
        assert client.is_connected()


def test_a_provider_slower_than_the_start_timeout_fails_open_and_its_late_answer_is_ignored(hub: Hub) -> None:
    release = threading.Event()
    answered = threading.Event()
    slow = [True]

    def provide() -> str:
        if slow[0]:
            release.wait(WAIT)
            answered.set()
        return hub.url()

    client = make(WebPubSubClientCredential(provide), start_timeout=0.5, reconnect_retry_total=0)
    started = time.monotonic()
    with pytest.raises(OpenClientError):
        client.open()
    assert time.monotonic() - started < WAIT / 2
    assert client.state is WebPubSubClientState.STOPPED
    release.set()
    assert answered.wait(WAIT)
    slow[0] = False
    client.open()  # the abandoned request's answer reached nothing
    assert client.is_connected()
    client.close()


def test_an_abandoned_providers_late_error_is_not_raised_by_the_next_open(hub: Hub) -> None:
    """The provider of a request abandoned by its start timeout raises while the next
    open() waits on a request of its own, which fails otherwise: that open() raises its
    own failure, not the stale exception."""
    go = threading.Event()
    calls = [0]

    def provide() -> str:
        calls[0] += 1
        if calls[0] == 1:
            go.wait(WAIT)
            raise ValueError("stale")
        go.set()
        time.sleep(0.3)  # the stale request raises meanwhile
        return 42  # type: ignore[return-value]

    client = make(WebPubSubClientCredential(provide), start_timeout=1.0, reconnect_retry_total=0)
    with pytest.raises(OpenClientError):
        client.open()
    with pytest.raises(OpenClientError, match="str URL"):
        client.open()
    client.close()


# ---- concurrency and lifetime --------------------------------------------------------------------


def test_many_threads_share_one_client(hub: Hub) -> None:
    got = Collector()
    with make(hub.url()) as client:
        client.subscribe(CallbackType.GROUP_MESSAGE, got)
        client.join_group("g")
        errors: List[BaseException] = []

        def work(n: int) -> None:
            try:
                for i in range(10):
                    client.send_to_group("g", f"{n}-{i}", WebPubSubDataType.TEXT)
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT)
        assert not errors
        got.wait_for(40)
    assert sorted(m.data for m in got.items) == sorted(f"{n}-{i}" for n in range(4) for i in range(10))


def registered() -> Set[int]:
    """The callback registry's keys now. Compared as sets: the clients of earlier tests
    may still be releasing theirs while a test runs."""
    return set(REGISTRY._items)  # pylint: disable=protected-access


def test_a_closed_client_dropped_while_its_events_wait_gets_them_then_is_collected(hub: Hub) -> None:
    """A client's listener holds its dispatch thread while the client receives more (a
    held client stays on its thread): its blocking calls still work; closed and dropped
    with its events waiting, it is kept until they and its stopped event reached its
    listeners, in order, none twice, and collected then."""
    before = registered()
    gate, blocked = threading.Event(), threading.Event()
    got = Collector()

    def on_message(message: OnGroupDataMessageArgs) -> None:
        got(message.data)
        if message.data == "block":
            blocked.set()
            assert gate.wait(WAIT)

    client = make(hub.url("client"))
    client.subscribe(CallbackType.GROUP_MESSAGE, on_message)
    client.subscribe(CallbackType.STOPPED, lambda: got("stopped"))
    with make(hub.url("publisher")) as publisher:
        client.open()
        client.join_group("g")
        publisher.send_to_group("g", "block", WebPubSubDataType.TEXT)
        assert blocked.wait(WAIT)
        for n in range(50):  # the last acked: the service has them all
            publisher.send_to_group("g", str(n), WebPubSubDataType.TEXT, ack=n == 49)
        assert client.send_to_group("g", "own", WebPubSubDataType.TEXT).ack_id is not None
        client.close()
        reference = weakref.ref(client)
        del client
        gc.collect()
        assert reference() is not None and got.items == ["block"]
        gate.set()
        expected = ["block", *map(str, range(50)), "own", "stopped"]
        assert got.wait_until(lambda items: "stopped" in items) == expected
        wait_until(lambda: gc.collect() >= 0 and reference() is None, what="the dropped client collected")
    del publisher
    wait_until(lambda: gc.collect() >= 0 and not registered() - before, what="the other clients released")


def test_an_open_client_referred_to_by_nothing_runs_until_closed(hub: Hub) -> None:
    """As the official client's threads keep it: an open client that nothing refers to
    (its listener neither) keeps running and delivering; once closed and dropped, it is
    collected and its callbacks released (before, it was collected and closed while open)."""
    before = registered()
    got = Collector()
    client = make(WebPubSubClientCredential(hub.url()))
    client.subscribe(CallbackType.GROUP_MESSAGE, got)
    client.open()
    client.join_group("kept")
    mine = registered() - before
    assert len(mine) == 2  # the event sink and the credential provider
    ref = weakref.ref(client)
    del client
    gc.collect()
    kept = ref()
    assert kept is not None and kept.is_connected()
    del kept
    with make(hub.url("other")) as other:
        other.send_to_group("kept", "still here", WebPubSubDataType.TEXT)
    del other
    assert [m.data for m in got.wait_for(1)] == ["still here"]
    kept = ref()
    assert kept is not None
    kept.close()
    del kept
    gc.collect()
    wait_until(lambda: gc.collect() >= 0 and not mine & registered(), what="registry entries released")
    assert ref() is None


def test_a_closed_client_its_listeners_refer_to_is_collected(hub: Hub) -> None:
    """A listener that refers to its client (an echo bot's ``client.send_to_group``) keeps
    a running client alive, as the official client's threads do, but not a closed, dropped
    one: it is collected and its native client freed (before, its event sink in the
    callback registry kept the listener, and through it the client, until exit)."""
    before = registered()
    got = Collector()

    def start_echo_bot() -> "weakref.ref[WebPubSubClient]":
        bot = make(hub.url("bot"))
        bot.subscribe(
            CallbackType.GROUP_MESSAGE,
            lambda m: m.data == "ping" and bot.send_to_group("g", "pong", WebPubSubDataType.TEXT),
        )
        bot.open()
        bot.join_group("g")
        return weakref.ref(bot)

    bot_ref = start_echo_bot()
    gc.collect()  # the running bot is kept alive by its listener
    bots = registered() - before
    with make(hub.url("other")) as other:
        other.subscribe(CallbackType.GROUP_MESSAGE, got)
        other.join_group("g")
        other.send_to_group("g", "ping", WebPubSubDataType.TEXT)
        got.wait_until(lambda items: [m.data for m in items][-1:] == ["pong"])
    del other
    for _ in range(3):
        client = make(hub.url())
        client.subscribe(CallbackType.GROUP_MESSAGE, lambda _m, c=client: c.join_group("x"))
        client.subscribe(CallbackType.STOPPED, lambda c=client: c.state)
        client.open()
        client.close()
        del client

    def sinks_left(sinks: Set[int]) -> bool:
        # close() returns once the client stopped; its stopped event, which lets the
        # listeners go, may still be on its way to the dispatcher thread: collect again.
        gc.collect()
        return registered() - before == sinks

    wait_until(lambda: sinks_left(bots), what="closed clients freed")  # the bot's sink is left
    bot = bot_ref()
    assert bot is not None
    bot.close()
    del bot
    wait_until(lambda: sinks_left(set()), what="the closed bot freed")


# ---- a listener that falls behind --------------------------------------------------------

BACKLOG_MESSAGES = 360  # of 32 KiB: 11.25 MiB, under the emulator's 16 MiB unacked per connection


def backlog_body(n: int) -> str:
    return f"{n:05}".ljust(32 * 1024, ".")  # distinct, in order


def held_by_the_emulator(emulator: Emulator) -> None:
    """Once the emulator has every message (the last was acked): most are still
    unacknowledged a second and a half later. The subscriber stopped reading: one that
    reads, even slowly, reads and acknowledges them within that time. (The emulator's
    buffer for the socket is no sign: the kernel's socket buffers may take megabytes.)"""
    time.sleep(1.5)
    assert emulator.stats()["unackedMessages"] >= BACKLOG_MESSAGES // 2, emulator.stats()


def test_a_listener_that_falls_behind_pauses_reading_and_may_still_send(hub: Hub) -> None:
    release = threading.Event()
    got = Collector()
    sent: List[Any] = []

    def on_message(args: OnGroupDataMessageArgs) -> None:
        got((args.data[:5], len(args.data)))  # a failure prints these, not 32 KiB each
        if len(got) == 1:  # held: the messages behind it wait, then the reading
            assert release.wait(WAIT)
            sent.append(subscriber.send_to_group("other", "from the listener", WebPubSubDataType.TEXT))

    subscriber = make(hub.url("sub"), event_backlog_bytes=256 << 10)
    subscriber.subscribe(CallbackType.GROUP_MESSAGE, on_message)
    publisher = make(hub.url("pub"))
    with subscriber, publisher:
        subscriber.join_group("g")
        for n in range(BACKLOG_MESSAGES):  # the last acked: the emulator then has them all
            publisher.send_to_group("g", backlog_body(n), WebPubSubDataType.TEXT, ack=n == BACKLOG_MESSAGES - 1)
        held_by_the_emulator(hub.emulator)
        # The listener's blocking send lets the reading go on until its ack comes.
        release.set()
        got.wait_for(BACKLOG_MESSAGES)
        assert got.items == [(f"{n:05}", 32 * 1024) for n in range(BACKLOG_MESSAGES)]
        wait_until(lambda: len(sent) == 1, what="the listener's send")
        assert sent[0].ack_id is not None


ONE_PER_DISPATCH = 24_000  # text bytes: one such message per dispatch of a sync client (32 KiB of records)


def test_reading_paused_by_the_event_backlog_resumes_once_it_is_down_to_half(hub: Hub, tap: FrameTap) -> None:
    """Reading pauses once more than ``event_backlog_bytes`` of messages wait for the
    listeners, and resumes only once they are down to half of it. With a limit of 8.5
    messages, the subscriber reads 9 while its listener holds the one before them; the
    messages sent then are not read (not sequence-acknowledged) while 8 to 5 wait, and
    are once 4 do. Each dispatch takes one message, so the listener's calls tell how
    many wait."""
    entered = Collector()
    steps = threading.Semaphore(0)

    def on_message(args: OnGroupDataMessageArgs) -> None:
        entered((args.data[:5], args.sequence_id))
        assert steps.acquire(timeout=WAIT)

    def body(n: int) -> str:
        return f"{n:05}".ljust(ONE_PER_DISPATCH, ".")

    def read_through(n: int) -> bool:
        """The subscriber acknowledged message ``n``: its library read it."""
        return any(frame["sequenceId"] >= first + n for _, frame in tap.sent("sequenceAck"))

    subscriber = make(tap.url(hub.url("sub")), event_backlog_bytes=ONE_PER_DISPATCH * 17 // 2)
    subscriber.subscribe(CallbackType.GROUP_MESSAGE, on_message)
    with subscriber, make(hub.url("pub")) as publisher:
        subscriber.join_group("g")
        publisher.send_to_group("g", body(0), WebPubSubDataType.TEXT)
        first = entered.wait_for(1)[0][1]  # its call holds the dispatch: the next messages wait
        for n in range(1, 10):
            publisher.send_to_group("g", body(n), WebPubSubDataType.TEXT)
        wait_until(lambda: read_through(9), what="the 9 messages over the limit read")
        for n in range(10, 15):  # acked: the service has them
            publisher.send_to_group("g", body(n), WebPubSubDataType.TEXT)
        for taken in range(1, 5):
            steps.release()
            entered.wait_for(taken + 1)  # message ``taken`` in its listener: 9 - taken wait
        time.sleep(1.0)  # ten sequence-ack intervals: nothing to await, a read would be acknowledged by now
        assert not read_through(10), "reading resumed with 5 messages waiting, over half the limit"
        steps.release()
        entered.wait_for(6)  # 4 wait
        wait_until(lambda: read_through(10), what="reading resumed with 4 messages waiting, under half the limit")
        for _ in range(15):
            steps.release()
        entered.wait_for(15)
    assert [data for data, _ in entered.items] == [f"{n:05}" for n in range(15)]


def test_event_backlog_bytes_is_checked() -> None:
    with pytest.raises(ValueError, match="event_backlog_bytes"):
        WebPubSubClient("ws://127.0.0.1:1/client/hubs/h", event_backlog_bytes=-1)
    with pytest.raises(TypeError, match="event_backlog_bytes"):
        WebPubSubClient("ws://127.0.0.1:1/client/hubs/h", event_backlog_bytes=1.5)  # type: ignore[arg-type]
