"""Drop-in compatibility with the official ``azure-messaging-webpubsubclient`` 1.1.0.

The same scenario runs through the official client and through ours, against the
emulator, and what each received is compared. The public API surface is compared too.
"""

from __future__ import annotations

import asyncio
import datetime
import gc
import inspect
import json
import logging
import os
import subprocess
import sys
import time
import warnings
from typing import Any, Callable, Dict, Iterator, List, Tuple

import azure.messaging.webpubsubclient as official
import azure.messaging.webpubsubclient.aio as official_aio
import azure.messaging.webpubsubclient.models as official_models
import pytest
from azure.core.exceptions import AzureError
from conftest import Collector, Hub, Upstream, wait_until

import webpubsub_client as ours
import webpubsub_client.aio as ours_aio
import webpubsub_client.models as ours_models


@pytest.fixture(autouse=True)
def official_sockets_collected() -> Iterator[None]:
    """The official sync client leaves some of its sockets to the garbage collector
    (websocket-client does not close them on every path): collected after each test
    here, their ResourceWarning ignored, so that a run with ``-W error`` does not fail
    whichever later test happens to collect them."""
    yield
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


def _normalize(kind: str, args: Any) -> Tuple[Any, ...]:
    if kind == "connected":
        return (kind, args.user_id)
    data = args.data
    if isinstance(data, memoryview):
        data = bytes(data)
    data_type = str(getattr(args.data_type, "value", args.data_type))
    if kind == "group-message":
        return (kind, args.group, args.from_user_id, data_type, repr(data))
    return (kind, data_type, repr(data))


_FORBIDDEN = "The client does not have permission to join group 'not-allowed'."


def _failure(exc: Exception) -> Tuple[Any, ...]:
    """What the scenarios compare of an operation's error: its class, its detail's name
    and message, and whether it is an AzureError."""
    detail = getattr(exc, "error_detail", None)
    return (
        type(exc).__name__,
        getattr(detail, "name", None),
        getattr(detail, "message", None),
        isinstance(exc, AzureError),
    )


def run_scenario(package: Any, models: Any, hub: Hub) -> Dict[str, Any]:
    """Join, publish every data type, receive server messages, hit a Forbidden, close."""
    url = hub.url("compat-user", roles=["webpubsub.joinLeaveGroup.g", "webpubsub.sendToGroup.g"])
    client = package.WebPubSubClient(
        url,
        message_retry_total=0,
        reconnect_retry_total=0,
        # the official client sometimes misses an ack's wake-up and waits the whole ack timeout
        # before succeeding (a lost condition-variable notify): keep that wait short
        ack_timeout=1.0,
        start_timeout=5.0,
    )
    received = Collector()
    stopped = Collector()
    disconnected = Collector()
    for event in ("connected", "group-message", "server-message"):
        client.subscribe(models.CallbackType(event), lambda args, e=event: received((e, args)))
    client.subscribe(models.CallbackType.STOPPED, lambda: stopped("stopped"))
    client.subscribe(models.CallbackType.DISCONNECTED, disconnected)
    client.open()
    try:
        # the official open() may return before the "connected" frame: wait for the event
        connection_id = received.wait_until(lambda items: any(k == "connected" for k, _ in items))[0][1].connection_id
        client.join_group("g")
        client.send_to_group("g", "text message", models.WebPubSubDataType.TEXT)
        client.send_to_group("g", {"json": [1, "two", None]}, models.WebPubSubDataType.JSON)
        client.send_to_group("g", memoryview(b"\x00\x01binary"), models.WebPubSubDataType.BINARY)
        client.send_to_group("g", "no echo", models.WebPubSubDataType.TEXT, no_echo=True)
        client.send_to_group("g", "fire and forget", models.WebPubSubDataType.TEXT, ack=False)
        hub.service.send_to_connection(connection_id, "server text", content_type="text/plain")
        hub.service.send_to_connection(connection_id, {"server": "json"})
        hub.service.send_to_connection(connection_id, b"\x09server", content_type="application/octet-stream")
        client.send_event("evt", "upstream", models.WebPubSubDataType.TEXT)
        items = received.wait_for(1 + 4 + 3)
        try:
            client.join_group("not-allowed")
            error: Tuple[Any, ...] = ("no error",)
        except Exception as exc:  # noqa: BLE001 - compared below
            error = _failure(exc)
        with pytest.raises(Exception) as second_open:
            client.open()
        is_connected = client.is_connected()
    finally:
        client.close()
    stopped.wait_for(1)
    disconnected.wait_for(1)
    return {
        "received": sorted(_normalize(kind, args) for kind, args in items),
        "forbidden": error,
        "second_open": (type(second_open.value).__name__, isinstance(second_open.value, AzureError)),
        "connected_before_close": is_connected,
        "connected_after_close": client.is_connected(),
        "stopped_events": len(stopped),
        # (the message differs on purpose: ours says "stopped by the client", the official None)
        "disconnected_on_close": [d.connection_id == connection_id for d in disconnected.items],
    }


def test_same_scenario_same_results(hub: Hub) -> None:
    expected = run_scenario(official, official_models, hub)
    actual = run_scenario(ours, ours_models, hub)
    assert actual == expected
    # error_detail.message is the service's own text, as officially (was prefixed "operation 1 failed: Forbidden: ")
    assert expected["forbidden"] == ("SendMessageError", "Forbidden", _FORBIDDEN, True)
    assert expected["second_open"] == ("OpenClientError", True)
    assert len(expected["received"]) == 8


async def run_async_scenario(package: Any, models: Any, hub: Hub) -> Dict[str, Any]:
    """The asyncio twin of :func:`run_scenario` (async listeners, as the official aio client requires)."""
    url = hub.url("compat-async", roles=["webpubsub.joinLeaveGroup.g", "webpubsub.sendToGroup.g"])
    client = package.WebPubSubClient(
        url, message_retry_total=0, reconnect_retry_total=0, ack_timeout=1.0, start_timeout=5.0
    )
    items: List[Tuple[str, Any]] = []
    changed = asyncio.Event()

    def listener(kind: str) -> Any:
        async def on_event(args: Any = None) -> None:
            items.append((kind, args))
            changed.set()

        return on_event

    async def wait_for(count: int) -> None:
        async def reached() -> None:
            while len(items) < count:
                changed.clear()
                await changed.wait()

        await asyncio.wait_for(reached(), 10)

    for event in ("connected", "group-message", "server-message", "stopped"):
        await client.subscribe(models.CallbackType(event), listener(event))
    await client.open()
    await wait_for(1)
    connection_id = items[0][1].connection_id
    loop = asyncio.get_running_loop()
    await client.join_group("g")
    await client.send_to_group("g", {"n": 1}, models.WebPubSubDataType.JSON)
    await client.send_to_group("g", memoryview(b"\x01"), models.WebPubSubDataType.BINARY)
    await loop.run_in_executor(
        None, lambda: hub.service.send_to_connection(connection_id, "srv", content_type="text/plain")
    )
    await wait_for(4)
    try:
        await client.join_group("not-allowed")
        error: Tuple[Any, ...] = ("no error",)
    except Exception as exc:  # noqa: BLE001 - compared below
        error = _failure(exc)
    await client.close()
    await wait_for(5)
    return {
        "received": sorted(_normalize(kind, args) for kind, args in items if kind != "stopped"),
        "stopped": [kind for kind, _ in items].count("stopped"),
        "forbidden": error,
    }


async def test_same_async_scenario_same_results(hub: Hub) -> None:
    expected = await run_async_scenario(official_aio, official_models, hub)
    actual = await run_async_scenario(ours_aio, ours_models, hub)
    assert actual == expected
    # error_detail.message is the service's own text, as officially (was prefixed "operation 1 failed: Forbidden: ")
    assert expected["forbidden"] == ("SendMessageError", "Forbidden", _FORBIDDEN, True)
    assert expected["stopped"] == 1 and len(expected["received"]) == 4


def _public(cls: Any) -> List[str]:
    return sorted(n for n, _ in inspect.getmembers(cls) if not n.startswith("_"))


@pytest.mark.parametrize(
    "official_cls, our_cls",
    [
        (official.WebPubSubClient, ours.WebPubSubClient),
        (official_aio.WebPubSubClient, ours_aio.WebPubSubClient),
        (official.WebPubSubClientCredential, ours.WebPubSubClientCredential),
        (official_aio.WebPubSubClientCredential, ours_aio.WebPubSubClientCredential),
    ],
)
def test_every_official_method_exists_with_the_same_parameters(official_cls: Any, our_cls: Any) -> None:
    missing = set(_public(official_cls)) - set(_public(our_cls))
    assert not missing
    for name in [*_public(official_cls), "__init__", "__enter__", "__exit__", "__aenter__", "__aexit__"]:
        theirs = getattr(official_cls, name, None)
        if not callable(theirs):
            continue
        mine = getattr(our_cls, name)
        assert inspect.iscoroutinefunction(mine) == inspect.iscoroutinefunction(theirs), name
        their_params = inspect.signature(theirs).parameters
        my_params = inspect.signature(mine).parameters
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in their_params.values()):
            assert any(p.kind is inspect.Parameter.VAR_KEYWORD for p in my_params.values()), (
                f"{our_cls.__name__}.{name} refuses the keyword arguments the official one ignores"
            )
        for param in their_params.values():
            if param.kind is inspect.Parameter.VAR_KEYWORD:
                continue
            assert param.name in my_params, f"{our_cls.__name__}.{name} lacks parameter {param.name}"
            if param.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD:
                position = list(their_params).index(param.name)
                assert list(my_params)[position] == param.name, f"{name}: {param.name} is not at {position}"


def test_models_have_the_official_names_and_values() -> None:
    for name in official_models.__all__:
        assert hasattr(ours_models, name), name
    for enum_name in ("WebPubSubDataType", "WebPubSubProtocolType", "CallbackType"):
        theirs = {m.name: m.value for m in getattr(official_models, enum_name)}
        mine = {m.name: m.value for m in getattr(ours_models, enum_name)}
        assert mine == theirs, enum_name
    error = ours_models.SendMessageError(
        "m", ack_id=3, error_detail=ours_models.AckMessageError(name="Forbidden", message="no")
    )
    assert (error.name, error.ack_id, error.error_detail.name) == ("SendMessageError", 3, "Forbidden")
    assert ours_models.OnDisconnectedArgs(connection_id="c", message="m").message == "m"


@pytest.mark.parametrize("models", [official_models, ours_models], ids=["official", "ours"])
def test_open_client_error_takes_the_azure_error_arguments(models: Any) -> None:
    """An application that raises ``OpenClientError`` itself (a wrapper, a test double)
    passes AzureError's arguments, as the official class, an AzureError, takes them."""
    cause = ConnectionError("refused")
    error = models.OpenClientError("cannot open", "more", error=cause, continuation_token="t")
    assert (error.message, error.args, error.inner_exception, error.continuation_token) == (
        "cannot open",
        ("cannot open", "more"),
        cause,
        "t",
    )


def run_unknown_events_scenario(package: Any, hub: Hub) -> List[str]:
    """Subscribe listeners to names that are no event, next to a real one, and receive a
    group message: what the listeners of the unknown names received, and the real one's."""
    client = package.WebPubSubClient(hub.url("unknown-events"), reconnect_retry_total=0, start_timeout=5.0)
    received = Collector()
    for name in ("foo", "group_message", "GroupMessage"):
        client.subscribe(name, lambda *args, name=name: received(name))
        client.unsubscribe(name, print)
    client.subscribe("group-message", lambda args: received(args.data))
    client.open()
    try:
        client.join_group("g")
        client.send_to_group("g", "hi", "text")
        received.wait_for(1)
    finally:
        client.close()
    return list(received.items)


def test_unknown_event_names_are_ignored_as_by_the_official_client(hub: Hub, caplog: pytest.LogCaptureFixture) -> None:
    """Code written for the official client runs unchanged: a name that is no event raises
    nothing, its listener never runs, and each call is logged at error level."""
    caplog.set_level(logging.ERROR)
    outcomes = {}
    # each package's logger, and the words of its message about a name that is no event
    for package, logger, words in (
        (official, "azure.messaging.webpubsubclient", "wrong event type"),
        (ours, "webpubsub_client", "which is not an event"),
    ):
        caplog.clear()
        received = run_unknown_events_scenario(package, hub)
        errors = [
            r
            for r in caplog.records
            if r.name.startswith(logger) and r.levelno == logging.ERROR and words in r.getMessage()
        ]
        outcomes[package.__name__] = (received, len(errors))
    assert outcomes["webpubsub_client"] == outcomes["azure.messaging.webpubsubclient"] == (["hi"], 6)


def test_without_azure_core_the_errors_are_plain_exceptions() -> None:
    """azure-core is not a dependency: without it the package imports, and its errors
    derive from Exception alone (with it, they are AzureErrors: the scenario above), which
    takes further positional arguments but no AzureError keywords."""
    code = (
        "import sys; sys.modules['azure.core.exceptions'] = None\n"
        "from webpubsub_client.models import OpenClientError, SendMessageError, WebPubSubClientError\n"
        "assert WebPubSubClientError.__bases__ == (Exception,), WebPubSubClientError.__mro__\n"
        "assert 'azure.core' not in sys.modules\n"
        "error = OpenClientError('m', 'more', status=3)\n"
        "assert (error.message, error.args, error.status) == ('m', ('m', 'more'), 3), error.args\n"
        "try:\n"
        "    OpenClientError('m', error=ValueError())\n"
        "except TypeError:\n"
        "    print(SendMessageError('m').message)\n"
    )
    package_dir = os.path.dirname(os.path.dirname(ours.__file__))
    env = {**os.environ, "PYTHONPATH": package_dir}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert (done.returncode, done.stdout, done.stderr) == (0, "m\n", "")


# ---- JSON content the official client's encoder (azure-core's AzureJSONEncoder) accepts --------


def _json_values() -> List[Any]:
    """JSON content with values the standard json module refuses and the official client's
    encoder writes: datetimes (as UTC, RFC 3339), dates, times, timedeltas (ISO 8601
    durations), bytes and bytearrays (base64), nested and at the top; and strings with
    lone surrogates, which UTF-8 cannot carry (written as ``\\ud800`` escapes)."""
    utc = datetime.timezone.utc
    return [
        {"at": datetime.datetime(2024, 1, 2, 3, 4, 5, 123456, tzinfo=utc)},
        {"at": datetime.datetime(2024, 1, 2, 3, 4, 5, tzinfo=datetime.timezone(datetime.timedelta(hours=2)))},
        {"naive": datetime.datetime(2024, 1, 2, 3, 4, 5)},  # local time, in both clients
        [datetime.date(2024, 2, 29), datetime.time(23, 59, 1, 5)],
        {
            "durations": [
                datetime.timedelta(days=1, seconds=5),
                datetime.timedelta(seconds=90.25),
                datetime.timedelta(0),
                datetime.timedelta(hours=-1),
            ]
        },
        {"raw": b"\x00\x01\xff", "more": bytearray(b"abc")},
        b"top-level bytes",
        (1, {"nested": [{"deeper": datetime.date(2000, 1, 1)}]}),
        {"lone": "a\ud800b\udfff", "\udc00key": ["\u00e9\U0001f600", "\ud83d"]},
    ]


def run_json_scenario(package: Any, models: Any, hub: Hub, upstream: Upstream, event: str) -> Dict[str, Any]:
    """Publish and send as events each of :func:`_json_values` as json; what the group
    received and what the upstream got."""
    client = package.WebPubSubClient(
        hub.url("json-user"),
        message_retry_total=0,
        reconnect_retry_total=0,
        ack_timeout=1.0,  # the official client's lost ack wake-ups wait this long (see run_scenario)
        start_timeout=5.0,
    )
    received = Collector()
    client.subscribe(models.CallbackType.GROUP_MESSAGE, lambda args: received(args.data))
    outcomes: List[Any] = []
    bodies: List[Any] = []
    client.open()
    try:
        client.join_group("g")
        for value in _json_values():
            try:
                client.send_to_group("g", value, models.WebPubSubDataType.JSON)
                outcomes.append("sent")
            except Exception as exc:  # noqa: BLE001 - compared below
                outcomes.append(type(exc).__name__)
            try:
                client.send_event(event, value, models.WebPubSubDataType.JSON)
                bodies.append(json.loads(_next_event_named(upstream, event)["body"]))
            except Exception as exc:  # noqa: BLE001 - compared below
                bodies.append(type(exc).__name__)
        items = received.wait_for(outcomes.count("sent"))
    finally:
        client.close()
    return {"outcomes": outcomes, "received": items, "upstream": bodies}


def _next_event_named(upstream: Upstream, name: str) -> Dict[str, Any]:
    """The next upstream event called ``name`` (events of other names are skipped)."""
    while True:
        event = upstream.next_event()
        if event["event"] == name:
            return event


def test_json_content_is_encoded_as_by_the_official_client(hub: Hub, upstream: Upstream) -> None:
    expected = run_json_scenario(official, official_models, hub, upstream, "json-official")
    actual = run_json_scenario(ours, ours_models, hub, upstream, "json-ours")
    assert actual == expected
    assert expected["outcomes"] == ["sent"] * len(_json_values())
    assert expected["received"][0] == {"at": "2024-01-02T03:04:05.123456Z"}
    assert expected["received"][1] == {"at": "2024-01-02T01:04:05Z"}
    assert expected["received"][4] == {"durations": ["P1DT00H00M05S", "PT01M30.25S", "PT00S", "P-1DT23H00M00S"]}
    assert expected["received"][5] == {"raw": "AAH/", "more": "YWJj"}


# ---- the credential's own error ------------------------------------------------------------------


class _TokenServiceDown(Exception):
    """What an application's URL provider raises."""


def _open_failing(package: Any, provider: Callable[[], str]) -> Tuple[Any, Tuple[type, str, bool]]:
    """A client of ``package`` whose credential is ``provider``, and what its open() raised."""
    client = package.WebPubSubClient(
        package.WebPubSubClientCredential(provider), reconnect_retry_total=0, start_timeout=5.0
    )
    with pytest.raises(BaseException) as info:
        client.open()
    return client, (type(info.value), str(info.value), client.is_connected())


def test_a_failing_credential_raises_its_own_error_from_open(hub: Hub) -> None:
    """The official open() calls the provider itself, so the provider's exception reaches
    the caller unchanged (an application catching its token service's error there)."""

    def broken() -> str:
        raise _TokenServiceDown("token service down")

    outcomes: List[Any] = []
    for package in (official, ours):
        client, outcome = _open_failing(package, broken)
        outcomes.append(outcome)
        # and the client is still usable: a second open calls the provider again
        with pytest.raises(Exception) as again:
            client.open()
        outcomes.append((type(again.value), str(again.value)))
    assert outcomes[2:] == outcomes[:2]
    assert outcomes[0] == (_TokenServiceDown, "token service down", False)


@pytest.mark.parametrize("raised", [SystemExit, KeyboardInterrupt])
def test_a_credential_raising_a_base_exception_raises_it_from_open(raised: type) -> None:
    """A provider that calls ``sys.exit()`` (or raises KeyboardInterrupt): the official
    open() raises that itself, so the program exits; ours wrapped it in OpenClientError."""

    def stop() -> str:
        raise raised("token service says stop")

    outcomes = [_open_failing(package, stop)[1] for package in (official, ours)]
    assert outcomes[1] == outcomes[0]
    assert outcomes[0] == (raised, "token service says stop", False)


async def test_a_failing_async_credential_raises_its_own_error_from_open(hub: Hub) -> None:
    async def broken() -> str:
        raise _TokenServiceDown("token service down")

    outcomes = []
    for package in (official_aio, ours_aio):
        client = package.WebPubSubClient(
            package.WebPubSubClientCredential(broken), reconnect_retry_total=0, start_timeout=5.0
        )
        with pytest.raises(Exception) as info:
            await client.open()
        outcomes.append((type(info.value), str(info.value), client.is_connected()))
    assert outcomes[1] == outcomes[0]
    assert outcomes[0] == (_TokenServiceDown, "token service down", False)


# ---- the official package's credential with our clients -----------------------------------------


def test_the_official_credential_works_with_our_client(hub: Hub) -> None:
    """A program that switched the client's import and kept the official credential's
    (``from azure.messaging.webpubsubclient import WebPubSubClientCredential``) still runs:
    the credential is used through its ``get_client_access_url``, for every new connection."""
    calls = []

    def provide() -> str:
        calls.append("called")
        return hub.url("official-credential")

    with ours.WebPubSubClient(official.WebPubSubClientCredential(provide), start_timeout=5.0) as client:
        client.join_group("g")
        assert client.send_to_group("g", "hi", "text").ack_id is not None
    assert calls == ["called"]
    with pytest.raises(TypeError, match="credential must be a str or WebPubSubClientCredential"):
        ours.WebPubSubClient(object())  # type: ignore[arg-type]


async def test_the_official_async_credential_works_with_our_async_client(hub: Hub) -> None:
    calls = []

    async def provide() -> str:
        calls.append("called")
        return hub.url("official-credential")

    async with ours_aio.WebPubSubClient(official_aio.WebPubSubClientCredential(provide), start_timeout=5.0) as client:
        await client.join_group("g")
        assert (await client.send_to_group("g", "hi", "text")).ack_id is not None
    # the sync package's credential too, whose get_client_access_url is a plain method
    sync_credential = official.WebPubSubClientCredential(lambda: hub.url("official-credential"))
    async with ours_aio.WebPubSubClient(sync_credential, start_timeout=5.0) as client:
        await client.join_group("g")
    assert calls == ["called"]
    with pytest.raises(TypeError, match="credential must be a str or WebPubSubClientCredential"):
        ours_aio.WebPubSubClient(object())  # type: ignore[arg-type]


# ---- the lifecycle: before open, close, close again, open again, a lost connection ------------


def run_lifecycle(package: Any, models: Any, hub: Hub) -> Dict[str, Any]:
    """Which events each step of a client's life brings, and how operations fail outside it.

    The official client runs each listener in a thread of its own, so the events of one
    step are compared as a sorted list (their order is not its contract)."""
    client = package.WebPubSubClient(
        hub.url("life-user"),
        message_retry_total=0,  # the official client retries a send before open for 5.6 s otherwise
        reconnect_retry_total=2,
        reconnect_retry_backoff_factor=0.1,
        ack_timeout=1.0,  # see run_scenario
        start_timeout=5.0,
    )
    events = Collector()
    for kind in ("connected", "disconnected", "stopped", "group-message"):
        client.subscribe(models.CallbackType(kind), lambda *args, k=kind: events((k, args[0] if args else None)))
    result: Dict[str, Any] = {}

    def failure(call: Callable[[], Any]) -> Any:
        try:
            call()
            return "no error"
        except Exception as exc:  # noqa: BLE001 - compared below
            return (type(exc).__name__, isinstance(exc, AzureError))

    def step(name: str, count: int) -> List[Any]:
        items = events.wait_for(count)
        time.sleep(0.3)  # nothing more comes
        result[name] = sorted(kind for kind, _ in events.items)
        del events.items[:]
        return items

    text = models.WebPubSubDataType.TEXT
    result["join_before_open"] = failure(lambda: client.join_group("g"))
    result["fire_and_forget_before_open"] = failure(lambda: client.send_to_group("g", "x", text, ack=False))
    result["connected_before_open"] = client.is_connected()
    client.open()
    first = step("open", 1)[0][1].connection_id
    client.join_group("g")
    client.close()
    stopped = step("close", 2)
    result["close_names_the_connection"] = [
        args.connection_id == first for kind, args in stopped if kind == "disconnected"
    ]
    client.close()  # again: nothing happens
    step("close_again", 0)
    result["connected_after_close"] = client.is_connected()
    result["join_after_close"] = failure(lambda: client.join_group("g"))
    with client:  # open again
        second = step("reopen", 1)[0][1].connection_id
        result["new_connection"] = second != first
        client.send_to_group("g", "rejoined on open", text)  # the group is rejoined
        step("send_after_reopen", 1)
        hub.drop(second, recoverable=False)  # a new connection, the group rejoined again
        step("lost", 2)
        wait_until(client.is_connected, what="reconnected")
        client.send_to_group("g", "rejoined after reconnect", text)
        step("send_after_reconnect", 1)
    step("exit", 2)
    result["connected_after_exit"] = client.is_connected()
    return result


def test_the_lifecycle_brings_the_same_events(hub: Hub) -> None:
    expected = run_lifecycle(official, official_models, hub)
    actual = run_lifecycle(ours, ours_models, hub)
    assert actual == expected
    assert expected["close"] == expected["exit"] == ["disconnected", "stopped"]
    assert expected["lost"] == ["connected", "disconnected"]
    assert expected["join_before_open"] == expected["join_after_close"] == ("SendMessageError", True)


# ---- a REST close by the application server ---------------------------------------------------


def run_rest_close(package: Any, models: Any, hub: Hub, reconnect_retry_total: int) -> List[Any]:
    """The events of a connection closed through the service SDK: the service's
    `disconnected` message, then a recovery refused with 1008, then a reconnect or a stop.

    Sorted, as the official client raises each event on a thread of its own."""
    client = package.WebPubSubClient(
        hub.url("rest-user"),
        reconnect_retry_total=reconnect_retry_total,
        reconnect_retry_backoff_factor=0.1,
        start_timeout=5.0,
    )
    events = Collector()
    for kind in ("connected", "disconnected", "stopped"):
        client.subscribe(models.CallbackType(kind), lambda *args, k=kind: events((k, args[0] if args else None)))
    client.open()
    first = events.wait_for(1)[0][1].connection_id
    hub.service.close_connection(first, reason="maintenance")
    events.wait_for(3)
    time.sleep(0.3)  # nothing more comes
    seen = [
        (kind, args.connection_id == first, args.message) if kind == "disconnected" else (kind,)
        for kind, args in events.items[1:]
    ]
    client.close()
    return sorted(seen, key=repr)


@pytest.mark.parametrize("reconnect_retry_total", [0, 2])
def test_a_rest_close_brings_the_same_events(hub: Hub, reconnect_retry_total: int) -> None:
    expected = run_rest_close(official, official_models, hub, reconnect_retry_total)
    actual = run_rest_close(ours, ours_models, hub, reconnect_retry_total)
    assert actual == expected
    reason = "Application server closed the connection. Reason: maintenance"
    assert ("disconnected", True, reason) in expected
