"""The sync client's pipelined sends (``begin_send_to_group``, ``begin_send_event``) against
the real library and the emulator: their futures get what the blocking forms return or
raise, settle on the listeners' thread, and never stay pending."""

from __future__ import annotations

import concurrent.futures
import gc
import logging
import os
import re
import subprocess
import sys
import textwrap
import threading
import time
import weakref
from pathlib import Path
from typing import Any, Callable, List, Optional

import pytest
from conftest import FAST, WAIT, Collector, FrameTap, Hub, Upstream, wait_until

from webpubsub_client import WebPubSubClient
from webpubsub_client._callbacks import REGISTRY
from webpubsub_client.models import (
    CallbackType,
    OnGroupDataMessageArgs,
    SendMessageError,
    WebPubSubClientError,
    WebPubSubDataType,
    WebPubSubResult,
)

TEXT = WebPubSubDataType.TEXT
Future = concurrent.futures.Future


def make(url: str, **kw: Any) -> WebPubSubClient:
    return WebPubSubClient(url, **{**FAST, **kw})


def settled(futures: List["Future[WebPubSubResult]"]) -> None:
    """Waits, at most ``WAIT``, until every future is done."""
    _done, pending = concurrent.futures.wait(futures, timeout=WAIT)
    assert not pending, f"{len(pending)} of {len(futures)} futures still pending after {WAIT} s"


def assert_same_error(begun: Optional[BaseException], raised: BaseException) -> None:
    """A future's exception is the one the blocking form raised: its type, text and
    error detail (numbers aside: ackIds, operation ids), and an ackId where that one has one."""
    assert type(begun) is type(raised)
    assert _numbers_masked(begun) == _numbers_masked(raised)
    if isinstance(raised, SendMessageError):
        assert isinstance(begun, SendMessageError)
        assert begun.error_detail is not None and raised.error_detail is not None
        assert begun.error_detail.name == raised.error_detail.name
        assert _numbers_masked(begun.error_detail.message) == _numbers_masked(raised.error_detail.message)
        assert (begun.ack_id is None) == (raised.ack_id is None)


def _numbers_masked(value: Any) -> str:
    return re.sub(r"\d+", "N", str(value))


# ---- results ---------------------------------------------------------------------------------


def test_the_futures_get_what_the_blocking_forms_return(hub: Hub, upstream: Upstream) -> None:
    """Acked, fire-and-forget and chosen-ackId sends to a group and events: each future's
    result is the blocking form's; a chosen ackId sent again is a duplicate, as there."""
    got = Collector()
    with make(hub.url("a")) as client:
        client.subscribe(CallbackType.GROUP_MESSAGE, got)
        client.join_group("g")
        acked = client.begin_send_to_group("g", "acked", TEXT)
        assert isinstance(acked, Future)
        assert not acked.cancel() and not acked.cancelled()  # running from the start
        result = acked.result(WAIT)
        assert isinstance(result.ack_id, int) and not result.is_duplicated
        blocking = client.send_to_group("g", "blocking", TEXT)
        assert blocking.ack_id == result.ack_id + 1  # one counter for both forms
        fire_and_forget = client.begin_send_to_group("g", "fire-and-forget", TEXT, ack=False, ack_id=9).result(WAIT)
        assert (fire_and_forget.ack_id, fire_and_forget.is_duplicated) == (None, False)
        chosen = client.begin_send_to_group("g", "chosen", TEXT, ack_id=1000).result(WAIT)
        assert (chosen.ack_id, chosen.is_duplicated) == (1000, False)
        again = client.begin_send_to_group("g", "chosen", TEXT, ack_id=1000).result(WAIT)
        assert (again.ack_id, again.is_duplicated) == (1000, True)
        no_echo = client.begin_send_to_group("g", "no-echo", TEXT, no_echo=True)
        event = client.begin_send_event("begun", {"n": 1}, WebPubSubDataType.JSON).result(WAIT)
        assert isinstance(event.ack_id, int) and not event.is_duplicated
        unacked_event = client.begin_send_event("begun", "ff", TEXT, ack=False).result(WAIT)
        assert (unacked_event.ack_id, unacked_event.is_duplicated) == (None, False)
        assert not no_echo.result(WAIT).is_duplicated
        client.send_to_group("g", "marker", TEXT)
        got.wait_for(5)
        assert not acked.cancel() and not acked.cancelled()
    assert [m.data for m in got.items] == ["acked", "blocking", "fire-and-forget", "chosen", "marker"]
    bodies = []
    while len(bodies) < 2:
        event_got = upstream.next_event()
        if event_got["event"] == "begun":
            bodies.append(event_got["body"])
    assert bodies == [b'{"n":1}', b"ff"]


def test_sends_begun_from_one_thread_arrive_in_call_order(hub: Hub) -> None:
    """Acked and fire-and-forget messages, mixed, begun without waiting, arrive at a
    subscriber in call order, and every acked one has an ackId of its own."""
    count = 600
    got = Collector()
    with make(hub.url("sub")) as subscriber, make(hub.url("pub")) as publisher:
        subscriber.subscribe(CallbackType.GROUP_MESSAGE, got)
        subscriber.join_group("g")
        futures = [publisher.begin_send_to_group("g", str(i), TEXT, ack=i % 3 != 0) for i in range(count)]
        settled(futures)
        got.wait_for(count)
    assert [m.data for m in got.items] == [str(i) for i in range(count)]
    ack_ids = [f.result().ack_id for i, f in enumerate(futures) if i % 3 != 0]
    assert None not in ack_ids and len(set(ack_ids)) == len(ack_ids)


# ---- failures --------------------------------------------------------------------------------


def test_a_refusal_and_a_message_too_large_fail_the_future_as_the_blocking_form_raises(hub: Hub) -> None:
    """The service's refusal (Forbidden, with the refused ackId) and the library's own size
    check (ValueError) come in the future, as the exceptions the blocking forms raise."""
    with make(hub.url(roles=[])) as client:
        refused = client.begin_send_to_group("locked", "x", TEXT)
        with pytest.raises(SendMessageError) as blocking:
            client.send_to_group("locked", "x", TEXT)
        assert_same_error(refused.exception(WAIT), blocking.value)
        assert refused.exception() is not blocking.value
        chosen = client.begin_send_to_group("locked", "x", TEXT, ack_id=4242).exception(WAIT)
        assert isinstance(chosen, SendMessageError) and chosen.ack_id == 4242
        too_large = client.begin_send_event("e", "x" * (1 << 20), TEXT)
        with pytest.raises(ValueError) as blocking_too_large:
            client.send_event("e", "x" * (1 << 20), TEXT)
        assert_same_error(too_large.exception(WAIT), blocking_too_large.value)


def test_an_ack_timeout_and_a_stopped_client_fail_the_future_as_the_blocking_form_raises(hub: Hub) -> None:
    """Sends begun on a client not opened fail as the blocking form raises at once
    (IllegalState, the not-connected error); an ack that never comes fails with Timeout
    and the ackId, as the blocking form's."""
    client = make(hub.url(), message_retry_total=0, ack_timeout=0.5)
    not_started = client.begin_send_to_group("g", "x", TEXT)
    not_started_event = client.begin_send_event("e", "x", TEXT, ack=False)
    with pytest.raises(SendMessageError) as blocking:
        client.send_to_group("g", "x", TEXT)
    assert_same_error(not_started.exception(WAIT), blocking.value)
    with pytest.raises(SendMessageError) as blocking:
        client.send_event("e", "x", TEXT, ack=False)
    assert_same_error(not_started_event.exception(WAIT), blocking.value)
    with client:
        hub.drop_acks(client.connection_id, 1)
        timed_out = client.begin_send_to_group("g", "x", TEXT)
        error = timed_out.exception(WAIT)
        hub.drop_acks(client.connection_id, 1)
        with pytest.raises(SendMessageError) as blocking:
            client.send_to_group("g", "x", TEXT)
    assert_same_error(error, blocking.value)
    assert isinstance(error, SendMessageError) and error.error_detail is not None
    assert error.error_detail.name == "Timeout" and error.ack_id is not None


def test_a_lost_session_fails_the_futures_in_flight_as_the_blocking_form_raises(hub: Hub, tap: FrameTap) -> None:
    """Sends whose acks are pending when the session is lost (auto-reconnect off) fail with
    NotConnected and their ackIds, as a blocking send pending then raises."""
    with make(tap.url(hub.url()), reconnect_retry_total=0, ack_timeout=WAIT * 2) as client:
        hub.drop_acks(client.connection_id, 1000)
        futures = [client.begin_send_to_group("g", str(i), TEXT) for i in range(50)]
        raised: List[BaseException] = []

        def blocking_send() -> None:
            try:
                client.send_to_group("g", "blocking", TEXT)
            except BaseException as exc:  # noqa: BLE001 - compared below
                raised.append(exc)

        thread = threading.Thread(target=blocking_send)
        thread.start()
        wait_until(
            lambda: any(frame["data"] == "blocking" for _at, frame in tap.sent("sendToGroup")),
            what="the blocking send written",
        )
        hub.drop(client.connection_id, recoverable=False)
        settled(futures)
        thread.join(WAIT)
        assert not thread.is_alive()
    (blocking_error,) = raised
    for future in futures:
        assert_same_error(future.exception(), blocking_error)
    assert isinstance(blocking_error, SendMessageError) and blocking_error.error_detail is not None
    assert blocking_error.error_detail.name == "NotConnected"


# ---- what raises at once ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda c: c.begin_send_to_group("", "x", TEXT), ValueError, "group_name must not be empty"),
        (lambda c: c.begin_send_to_group(1, "x", TEXT), TypeError, "group_name must be a str"),
        (lambda c: c.begin_send_to_group("g", b"x", TEXT), TypeError, "content must be a str"),
        (lambda c: c.begin_send_to_group("g", "x", "xml"), ValueError, "data_type must be one of"),
        (lambda c: c.begin_send_to_group("g", "x", TEXT, ack="no"), TypeError, "ack must be a bool"),
        (lambda c: c.begin_send_to_group("g", "x", TEXT, no_echo=1), TypeError, "no_echo must be a bool"),
        (lambda c: c.begin_send_to_group("g", "x", TEXT, ack_id=0), ValueError, "ack_id must be >= 1"),
        (lambda c: c.begin_send_event("e\0", "x", TEXT), ValueError, "event_name must not contain a NUL"),
        (lambda c: c.begin_send_event("e", {1}, WebPubSubDataType.JSON), TypeError, "not JSON-serializable"),
        (lambda c: c.begin_send_event("e", "x", TEXT, ack_id=2**64), ValueError, "ack_id must fit in 64 bits"),
    ],
)
def test_bad_arguments_raise_at_once_and_start_nothing(
    hub: Hub, call: Callable[[WebPubSubClient], Any], error: type, match: str
) -> None:
    client = make(hub.url())
    before = len(REGISTRY)
    with pytest.raises(error, match=match):
        call(client)
    assert len(REGISTRY) == before


def test_a_freed_client_raises_at_once_as_the_blocking_form(hub: Hub) -> None:
    client = make(hub.url())
    client._finalizer()  # pylint: disable=protected-access
    with pytest.raises(WebPubSubClientError, match="the client was freed"):
        client.begin_send_to_group("g", "x", TEXT)
    with pytest.raises(WebPubSubClientError, match="the client was freed"):
        client.begin_send_event("e", "x", TEXT, ack=False)
    with pytest.raises(WebPubSubClientError, match="the client was freed"):
        client.send_to_group("g", "x", TEXT)


def test_unused_keywords_are_ignored_and_logged_once_and_logging_enable_logs(
    hub: Hub, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG, logger="webpubsub_client"), make(hub.url()) as client:
        for _ in range(2):
            client.begin_send_to_group("g", "x", TEXT, timeout=3).result(WAIT)
            client.begin_send_event("e", "x", TEXT, logging_enable=True).result(WAIT)
    messages = [r.getMessage() for r in caplog.records if r.name == "webpubsub_client"]
    assert messages.count("begin_send_to_group ignores the keyword argument 'timeout'") == 1
    assert messages.count("begin_send_event 'e': b'x'") == 2


# ---- where the futures settle ------------------------------------------------------------------


def test_futures_settle_and_run_their_callbacks_on_the_listeners_thread(hub: Hub) -> None:
    """Acked, fire-and-forget, refused and duplicate sends: their done-callbacks run on the
    thread that runs the client's listeners (held by a listener meanwhile, so that the
    callbacks are added before any future is done)."""
    listener_threads: List[str] = []
    callback_threads: List[str] = []
    release = threading.Event()

    def on_message(args: OnGroupDataMessageArgs) -> None:
        listener_threads.append(threading.current_thread().name)
        if args.data == "hold":
            release.wait(WAIT)

    with make(hub.url(roles=["webpubsub.joinLeaveGroup", "webpubsub.sendToGroup.g"])) as client:
        client.subscribe(CallbackType.GROUP_MESSAGE, on_message)
        client.join_group("g")
        client.send_to_group("g", "hold", TEXT, ack_id=777)
        wait_until(lambda: len(listener_threads) == 1, what="the listener holding its thread")
        futures = [client.begin_send_to_group("g", str(i), TEXT) for i in range(20)]
        futures.append(client.begin_send_to_group("g", "ff", TEXT, ack=False))
        futures.append(client.begin_send_to_group("locked", "x", TEXT))  # refused: its completion callback
        futures.append(client.begin_send_to_group("g", "dup", TEXT, ack_id=777))  # a duplicate: not published
        for future in futures:
            future.add_done_callback(lambda _f: callback_threads.append(threading.current_thread().name))
        assert not any(f.done() for f in futures)
        release.set()
        settled(futures)
        wait_until(lambda: len(callback_threads) == len(futures) and len(listener_threads) == 22)
    assert futures[-1].result().is_duplicated and isinstance(futures[-2].exception(), SendMessageError)
    assert set(callback_threads) == set(listener_threads)
    (name,) = set(callback_threads)
    assert name.startswith("webpubsub-dispatch-")


def test_waiting_on_an_unfinished_future_on_the_listeners_thread_raises_at_once(hub: Hub) -> None:
    """``result()``/``exception()`` of a future not done yet, in a listener or a
    done-callback of the same client, raise WebPubSubClientError at once instead of
    waiting for ever (the thread they block settles the future); a finished future's
    return normally there, and the unfinished ones settle afterwards."""
    outcomes: List[Any] = []
    late: List["Future[WebPubSubResult]"] = []
    finished: List["Future[WebPubSubResult]"] = []

    def attempt(call: Callable[[], Any]) -> None:
        started = time.monotonic()
        try:
            outcomes.append(call())
        except Exception as exc:  # noqa: BLE001 - recorded for the asserts
            outcomes.append(exc)
        outcomes.append(time.monotonic() - started)

    def on_message(args: OnGroupDataMessageArgs) -> None:
        if args.data == "trigger":
            begun = client.begin_send_to_group("g", "from listener", TEXT)
            late.append(begun)
            attempt(lambda: begun.result(timeout=3))
            attempt(lambda: begun.exception(timeout=3))
            attempt(lambda: finished[0].result(timeout=3))
            attempt(lambda: finished[0].exception(timeout=3))
            # added here, where the future cannot be done yet: its callback runs on this thread
            client.begin_send_to_group("g", "x", TEXT).add_done_callback(on_done)

    def on_done(_future: "Future[WebPubSubResult]") -> None:
        begun = client.begin_send_to_group("g", "from callback", TEXT)
        late.append(begun)
        attempt(lambda: begun.result(timeout=3))

    with make(hub.url()) as client:
        client.subscribe(CallbackType.GROUP_MESSAGE, on_message)
        client.join_group("g")
        finished.append(client.begin_send_to_group("g", "first", TEXT))
        finished[0].result(WAIT)
        client.send_to_group("g", "trigger", TEXT)
        wait_until(lambda: len(outcomes) == 10 and len(late) == 2, what="the listener and the callback")
        settled(late)
    errors = outcomes[0:4:2] + outcomes[8:9]
    for error in errors:
        assert isinstance(error, WebPubSubClientError), outcomes
        assert "would wait for ever" in str(error)
    assert all(seconds < 1 for seconds in outcomes[1::2]), outcomes
    assert isinstance(outcomes[4], WebPubSubResult) and outcomes[6] is None
    assert all(isinstance(f.result(), WebPubSubResult) for f in late)


def test_a_zero_timeout_polls_on_the_listeners_thread(hub: Hub) -> None:
    """``result(timeout=0)`` and ``exception(timeout=0)`` of a future not done yet, in a
    listener of its client, do not wait: they raise concurrent.futures.TimeoutError (the
    builtin TimeoutError from Python 3.11), as any future's, not the error of a wait that
    would never end."""
    raised: List[BaseException] = []

    def on_connected(_args: Any) -> None:
        begun = client.begin_send_to_group("g", "x", TEXT)
        for call in (begun.result, begun.exception):
            try:
                call(timeout=0)
            except BaseException as exc:  # noqa: BLE001 - recorded for the asserts
                raised.append(exc)

    client = make(hub.url())
    client.subscribe(CallbackType.CONNECTED, on_connected)
    with client:
        wait_until(lambda: len(raised) == 2, what="the listener's two polls")
    assert all(isinstance(exc, concurrent.futures.TimeoutError) for exc in raised), raised


def test_a_raising_done_callback_is_logged_and_spares_the_others(hub: Hub, caplog: pytest.LogCaptureFixture) -> None:
    """An Exception is logged by concurrent.futures, a SystemExit by the package; the
    other callbacks and futures of the client are settled all the same, and the
    listeners keep running."""
    calls: List[str] = []

    def raising(_future: Any) -> None:
        calls.append("raising")
        raise RuntimeError("callback boom")

    def exiting(_future: Any) -> None:
        calls.append("exiting")
        raise SystemExit(3)

    got = Collector()
    held, release = threading.Event(), threading.Event()

    def hold(args: OnGroupDataMessageArgs) -> None:
        if args.data == "hold":
            held.set()
            release.wait(WAIT)

    with make(hub.url()) as client:
        client.subscribe(CallbackType.GROUP_MESSAGE, got)
        client.subscribe(CallbackType.GROUP_MESSAGE, hold)
        client.join_group("g")
        client.send_to_group("g", "hold", TEXT)
        assert held.wait(WAIT)  # the listeners' thread held: no future is done before its callbacks are added
        futures = [client.begin_send_to_group("g", str(i), TEXT) for i in range(30)]
        futures[0].add_done_callback(raising)
        futures[0].add_done_callback(lambda _f: calls.append("after raising"))
        futures[1].add_done_callback(exiting)
        futures[2].add_done_callback(lambda _f: calls.append("third"))
        release.set()
        settled(futures)
        wait_until(lambda: len(calls) == 4, what="the callbacks")
        client.send_to_group("g", "after", TEXT)
        got.wait_until(lambda items: items and items[-1].data == "after")
    assert sorted(calls) == ["after raising", "exiting", "raising", "third"]
    assert all(f.exception() is None for f in futures)
    assert any("callback boom" in r.exc_text for r in caplog.records if r.exc_text)
    assert any("SystemExit" in r.exc_text for r in caplog.records if r.exc_text)


def test_a_done_callback_may_begin_the_next_send(hub: Hub) -> None:
    """A chain of sends, each begun by the previous one's done-callback, all arrive in order."""
    got = Collector()
    chain: List["Future[WebPubSubResult]"] = []
    last = threading.Event()

    def next_send(future: "Future[WebPubSubResult]") -> None:
        future.result()  # done: returns on this thread
        if len(chain) == 10:
            last.set()
            return
        chain.append(client.begin_send_to_group("g", str(len(chain)), TEXT))
        chain[-1].add_done_callback(next_send)

    with make(hub.url()) as client:
        client.subscribe(CallbackType.GROUP_MESSAGE, got)
        client.join_group("g")
        chain.append(client.begin_send_to_group("g", "0", TEXT))
        chain[0].add_done_callback(next_send)
        assert last.wait(WAIT)
        got.wait_for(10)
    assert [m.data for m in got.items] == [str(i) for i in range(10)]


# ---- none stays pending ----------------------------------------------------------------------


def test_close_returns_with_every_future_begun_before_it_settled(hub: Hub) -> None:
    """Thousands of sends in flight (their acks withheld; more than the library lets
    await their acks, so that some still wait queued) are all settled when close()
    returns: acked before, or failed with Stopped."""
    with make(hub.url(), ack_timeout=WAIT * 2) as client:
        client.send_to_group("g", "warm-up", TEXT)
        hub.drop_acks(client.connection_id, 1500)
        futures = [client.begin_send_to_group("g", str(i), TEXT) for i in range(3000)]
        futures += [client.begin_send_event("e", str(i), TEXT, ack=i % 2 == 0) for i in range(200)]
    pending = [f for f in futures if not f.done()]
    assert not pending, f"{len(pending)} of {len(futures)} pending after close()"
    stopped = [f.exception() for f in futures if f.exception() is not None]
    assert len(stopped) >= 1500
    for error in stopped:
        assert isinstance(error, SendMessageError) and error.error_detail is not None
        assert error.error_detail.name == "Stopped"


def test_a_client_freed_with_futures_in_flight_fails_them_on_the_freeing_thread(hub: Hub) -> None:
    """The client's finalizer (its collection, interpreter exit) with sends in flight:
    each future fails with Stopped, settled by the freeing thread once the free returned
    (the library runs the completions on its own thread), never left pending."""
    client = make(hub.url(), ack_timeout=WAIT * 2)
    client.open()
    hub.drop_acks(client.connection_id, 2000)
    futures = [client.begin_send_to_group("g", str(i), TEXT) for i in range(1500)]
    threads: List[str] = []
    for future in futures:
        future.add_done_callback(lambda _f: threads.append(threading.current_thread().name))
    client._finalizer()  # pylint: disable=protected-access
    settled(futures)
    assert all(f.done() for f in futures)
    for future in futures:
        error = future.exception()
        assert isinstance(error, SendMessageError) and error.error_detail is not None
        assert error.error_detail.name == "Stopped"
    assert set(threads) == {threading.current_thread().name}


def test_a_client_freed_inside_a_callback_settles_its_futures_on_a_python_thread(hub: Hub) -> None:
    """A client freed from inside a callback of the library (collected while another
    client's event is converted: the library defers its teardown and runs its completions
    on its own thread once that callback returned): its futures fail with Stopped,
    settled, and their done-callbacks run, on a thread of the package, never on the
    library's thread, where waiting on another of its futures not done yet raises at once
    as on the other threads that settle them."""
    victim = make(hub.url("victim"), ack_timeout=WAIT * 2)
    victim.open()
    hub.drop_acks(victim.connection_id, 100)
    futures = [victim.begin_send_to_group("g", str(i), TEXT) for i in range(50)]
    threads: List[str] = []
    waited: List[BaseException] = []

    def wait_for_the_last(_future: Any) -> None:
        try:
            futures[-1].exception(timeout=1)
        except BaseException as exc:  # noqa: BLE001 - recorded for the asserts
            waited.append(exc)

    futures[0].add_done_callback(wait_for_the_last)
    for future in futures:
        future.add_done_callback(lambda _f: threads.append(threading.current_thread().name))
    other = make(hub.url("other"))
    converting = other._sink.on_native_event  # pylint: disable=protected-access

    def on_native_event(event: Any) -> None:  # as if a collection freed the victim meanwhile
        victim._finalizer()  # pylint: disable=protected-access
        converting(event)

    other._sink.on_native_event = on_native_event  # type: ignore[method-assign]  # pylint: disable=protected-access
    with other:
        settled(futures)
        wait_until(lambda: len(threads) == len(futures), what="the done-callbacks")
    for future in futures:
        error = future.exception()
        assert isinstance(error, SendMessageError) and error.error_detail is not None
        assert error.error_detail.name == "Stopped"
    assert {name.split("-")[0] for name in threads} == {"webpubsub"}, set(threads)
    assert len(waited) == 1 and isinstance(waited[0], WebPubSubClientError), waited
    assert "would wait for ever" in str(waited[0])


def test_a_fork_child_raises_at_once_for_an_unfinished_future_of_its_parent(hub: Hub) -> None:
    """In a fork() child, a future its parent began that was not done at the fork is never
    settled (the threads that settle it are the parent's): its ``result()`` and
    ``exception()`` raise WebPubSubClientError (FORKED) at once instead of waiting in vain,
    a zero timeout raises TimeoutError; the parent's future settles as usual."""
    code = f"""
        import concurrent.futures, os, signal, threading, time
        from webpubsub_client import WebPubSubClient
        from webpubsub_client.models import WebPubSubClientError
        client = WebPubSubClient({hub.url("forker")!r}, start_timeout=5.0)
        held, release = threading.Event(), threading.Event()
        client.subscribe("connected", lambda _args: (held.set(), release.wait(10)))
        client.open()
        assert held.wait(10)  # the listener holds the thread that settles the future
        future = client.begin_send_to_group("g", "x", "text")
        pid = os.fork()
        if pid == 0:
            signal.alarm(20)  # a child that waits for ever does not outlive the test
            outcomes = []
            for call in (future.result, future.exception, lambda: future.result(timeout=5)):
                started = time.monotonic()
                try:
                    call()
                except BaseException as exc:
                    outcomes.append(type(exc).__name__ + ":" + str(getattr(exc, "status", "")))
                outcomes.append(str(time.monotonic() - started < 1))
            try:
                future.result(timeout=0)
            except concurrent.futures.TimeoutError:
                outcomes.append("TimeoutError")
            print(*outcomes, flush=True)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        release.set()
        print(os.waitstatus_to_exitcode(status), future.result(10).ack_id is not None, flush=True)
        client.close()
    """
    environment = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, (result.returncode, result.stderr[-2000:])
    forked = "WebPubSubClientError:15 True"
    assert result.stdout.split("\n")[:2] == [f"{forked} {forked} {forked} TimeoutError", "0 True"], result.stdout


def test_a_collected_client_leaves_no_future_pending(hub: Hub) -> None:
    """Sends begun on a client never opened, then dropped at once: collected, its futures
    all settle with the not-connected error, whether its dispatch or its free ran them."""
    client = make(hub.url())
    futures = [client.begin_send_to_group("g", str(i), TEXT) for i in range(200)]
    reference = weakref.ref(client)
    del client
    wait_until(lambda: gc.collect() >= 0 and reference() is None, what="the client collected")
    settled(futures)
    for future in futures:
        error = future.exception()
        assert isinstance(error, SendMessageError) and error.error_detail is not None
        assert error.error_detail.name in ("IllegalState", "Stopped")


def test_a_future_kept_after_its_client_is_gone_does_not_keep_the_client(hub: Hub) -> None:
    """Futures outlive their client (kept in a list, say): settled ones, acked or failed,
    no longer hold the client's dispatch, and with it its listeners' sink and its
    credential provider."""
    client = make(hub.url(), ack_timeout=WAIT * 2)
    client.open()
    futures = [client.begin_send_to_group("g", str(i), TEXT) for i in range(50)]
    settled(futures)
    hub.drop_acks(client.connection_id, 50)
    futures += [client.begin_send_to_group("g", str(i), TEXT) for i in range(50)]
    dispatch = weakref.ref(client._dispatch)  # pylint: disable=protected-access
    client.close()
    settled(futures)
    assert sum(f.exception() is not None for f in futures) == 50
    del client
    wait_until(lambda: gc.collect() >= 0 and dispatch() is None, what="the client's dispatch collected")
