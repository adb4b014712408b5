"""Bad arguments raise TypeError/ValueError with clear messages before reaching the library."""

from __future__ import annotations

import enum
import gc
import logging
import math
import socket
import threading
import urllib.parse
import uuid
from typing import Any, Dict, List

import pytest

from webpubsub_client import WebPubSubClient, WebPubSubClientCredential, _base
from webpubsub_client.aio import WebPubSubClient as AsyncWebPubSubClient
from webpubsub_client.aio import WebPubSubClientCredential as AsyncWebPubSubClientCredential
from webpubsub_client.models import (
    CallbackType,
    OpenClientError,
    RetryMode,
    WebPubSubClientError,
    WebPubSubDataType,
    WebPubSubProtocolType,
)

URL = "ws://127.0.0.1:9/client/hubs/h?access_token=x"


@pytest.fixture
def client() -> WebPubSubClient:
    return WebPubSubClient(URL)


@pytest.mark.parametrize(
    "credential, error, text",
    [
        (None, TypeError, "credential must be a str or WebPubSubClientCredential"),
        (42, TypeError, "credential must be a str or WebPubSubClientCredential"),
        ("", ValueError, "must not be empty"),
        ("ws://x\0y", ValueError, "NUL"),
    ],
)
def test_bad_credential(credential: Any, error: type, text: str) -> None:
    with pytest.raises(error, match=text):
        WebPubSubClient(credential)


def test_bad_credential_provider() -> None:
    with pytest.raises(TypeError, match="client_access_url_provider must be a str or a callable"):
        WebPubSubClientCredential(3)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "url", ["not a url at all", "ftp://host/x", "ws:///no-host", "ws://?access_token=x", "ws://:80/x", "wss:/host/x"]
)
def test_unusable_url_is_a_value_error(url: str) -> None:
    with pytest.raises(ValueError, match="must be a ws:// or wss:// client access URL"):
        WebPubSubClient(url)
    with pytest.raises(ValueError, match="must be a ws:// or wss:// client access URL"):
        WebPubSubClientCredential(url)


def _urllib_cache_holds(text: str) -> bool:
    """Whether ``text`` is in a URL that ``urllib.parse`` keeps parsed: in the
    ``functools.lru_cache`` of ``urlsplit`` (Python 3.11 and later; its cache dict and
    entries are among its garbage-collector referents) or in ``_parse_cache`` (3.8 to 3.10)."""
    caches = [*gc.get_referents(urllib.parse.urlsplit), getattr(urllib.parse, "_parse_cache", None)]
    return any(text in repr(cache) for cache in caches)


def test_the_access_token_is_not_kept_in_urllibs_cache() -> None:
    """Checking a client access URL parses it without urllib, whose parse cache would keep
    the URL, and its access token, for the rest of the process; a refused URL's error does
    not repeat it either."""
    canary = uuid.uuid4().hex
    urllib.parse.urlsplit(f"wss://example.net/client/hubs/h?access_token={canary}")
    assert _urllib_cache_holds(canary)  # the probe sees the cache of this Python

    token = uuid.uuid4().hex
    url = f"wss://127.0.0.1:9/client/hubs/h?access_token={token}"
    WebPubSubClient(url)
    WebPubSubClientCredential(url)
    AsyncWebPubSubClient(url)
    AsyncWebPubSubClientCredential(url)
    with pytest.raises(ValueError) as refused:
        WebPubSubClient(f"ftp://127.0.0.1:9/client/hubs/h?access_token={token}")
    assert token not in str(refused.value)
    assert not _urllib_cache_holds(token)


@pytest.mark.parametrize(
    "url",
    [
        "ws://127.0.0.1:9/client/hubs/h?access_token=x",
        "WSS://example.net",
        "http://[::1]:8080/client",
        "https://user@example.net:443?access_token=x",
        "  wss://example.net/padded  ",
    ],
)
def test_usable_urls(url: str) -> None:
    WebPubSubClient(url)
    WebPubSubClientCredential(url)


@pytest.mark.parametrize(
    "options, error, text",
    [
        ({"protocol_type": "mqtt"}, ValueError, "protocol_type must be one of"),
        ({"protocol_type": 1}, TypeError, "protocol_type must be a WebPubSubProtocolType or str"),
        ({"auto_rejoin_groups": "yes"}, TypeError, "auto_rejoin_groups must be a bool"),
        ({"message_retry_total": -1}, ValueError, "message_retry_total must be >= 0"),
        ({"message_retry_total": 1.5}, TypeError, "message_retry_total must be an int"),
        ({"reconnect_retry_total": True}, TypeError, "reconnect_retry_total must be an int"),
        ({"message_retry_backoff_factor": -0.1}, ValueError, "message_retry_backoff_factor must be a finite"),
        ({"reconnect_retry_backoff_max": math.inf}, ValueError, "reconnect_retry_backoff_max must be a finite"),
        ({"ack_timeout": "1"}, TypeError, "ack_timeout must be a number of seconds"),
        ({"ack_timeout": 0}, ValueError, "ack_timeout must be > 0"),
        ({"recovery_retry_interval": 0}, ValueError, "recovery_retry_interval must be > 0"),
        ({"start_timeout": math.nan}, ValueError, "start_timeout must be a finite"),
        ({"message_retry_mode": "sometimes"}, ValueError, "message_retry_mode must be one of"),
        ({"keep_alive_interval": -1}, ValueError, "keep_alive_interval"),
        ({"keep_alive_interval": 30, "keep_alive_timeout": 30}, ValueError, "must be longer than keep_alive_interval"),
        ({"ca_pem": 12}, TypeError, "ca_pem must be PEM text"),
        ({"ca_pem": "\ud800"}, ValueError, "ca_pem is not valid Unicode text"),
        ({"logging_enable": 1}, TypeError, "logging_enable must be a bool"),
        ({"user_agent": 5}, TypeError, "user_agent must be a str"),
        ({"user_agent": "two\nlines"}, ValueError, "user_agent must be printable ASCII"),
    ],
)
def test_bad_options(options: Dict[str, Any], error: type, text: str) -> None:
    with pytest.raises(error, match=text):
        WebPubSubClient(URL, **options)
    with pytest.raises(error, match=text):
        AsyncWebPubSubClient(URL, **options)


@pytest.mark.parametrize("seconds", [10**400, 1.7e308], ids=["int beyond float", "float beyond 2**64 ms"])
def test_durations_too_long_for_64_bit_milliseconds_mean_the_longest(seconds: Any) -> None:
    """As ``reconnect_retry_total=2**63`` does: no OverflowError from converting a huge int to
    float or a float product to int (were "int too large to convert to float" and
    "cannot convert float infinity to integer")."""
    options = _base.Options(ack_timeout=seconds, recovery_timeout=seconds, message_retry_backoff_factor=seconds)
    assert options.ack_timeout_ms == options.recovery[0] == options.message_retry[1] == _base._native.UINT64_MAX
    assert _base.check_timeout(seconds) == _base._native.UINT64_MAX
    WebPubSubClient(URL, start_timeout=seconds, recovery_timeout=seconds, message_retry_backoff_max=seconds)
    AsyncWebPubSubClient(URL, start_timeout=seconds, recovery_timeout=seconds, reconnect_retry_backoff_factor=seconds)


def test_a_positive_duration_under_a_millisecond_is_the_shortest_not_zero() -> None:
    """Rounded to 0 ms, a keep-alive interval of 0.0004 s turned keep-alive off, and an ack
    timeout of 0.0004 s was refused as "must be > 0"."""
    tiny = 0.0004
    options = _base.Options(
        ack_timeout=tiny,
        keep_alive_interval=tiny,
        keep_alive_timeout=0.002,
        recovery_retry_interval=tiny,
        sequence_ack_interval=tiny,
    )
    assert options.ack_timeout_ms == options.keep_alive[0] == options.recovery[1] == 1
    assert options.sequence_ack_interval_ms == 1
    assert _base.check_timeout(tiny) == 1
    WebPubSubClient(URL, ack_timeout=tiny, keep_alive_interval=tiny, keep_alive_timeout=0.002)


def test_accepted_option_spellings() -> None:
    WebPubSubClient(
        URL,
        protocol_type="JSON.WEBPUBSUB.AZURE.V1",
        message_retry_mode="Fixed",
        reconnect_retry_mode=RetryMode.Exponential,
        reconnect_retry_total=2**63,  # the official default for "unbounded"
        keep_alive_interval=0,
        keep_alive_timeout=0,
        user_agent="my-app/1.0",
    )
    WebPubSubClient(URL, protocol_type=WebPubSubProtocolType.JSON, message_retry_mode=RetryMode.Fixed)


def test_azure_core_retry_mode_is_accepted() -> None:
    from azure.core.pipeline.policies import RetryMode as AzureRetryMode

    WebPubSubClient(URL, message_retry_mode=AzureRetryMode.Fixed, reconnect_retry_mode=AzureRetryMode.Exponential)


class _OtherStrEnum(str, enum.Enum):  # another library's str enum with the same values
    JSON = "json"


class _MyStr(str):
    pass


@pytest.mark.parametrize(
    "spelling, member",
    [
        (WebPubSubDataType.TEXT, WebPubSubDataType.TEXT),
        ("text", WebPubSubDataType.TEXT),
        ("binary", WebPubSubDataType.BINARY),
        ("TEXT", WebPubSubDataType.TEXT),
        ("Protobuf", WebPubSubDataType.PROTOBUF),
        (_OtherStrEnum.JSON, WebPubSubDataType.JSON),
        (_MyStr("json"), WebPubSubDataType.JSON),
    ],
)
def test_data_type_spellings(spelling: Any, member: WebPubSubDataType) -> None:
    """Members, exact values (the per-message fast path), other cases and other str types."""
    assert _base.data_type_of(spelling) is member


@pytest.mark.parametrize(
    "spelling, error, text",
    [
        ("xml", ValueError, "data_type must be one of"),
        (_MyStr("xml"), ValueError, "data_type must be one of"),
        (["text"], TypeError, "data_type must be a WebPubSubDataType or str, got list"),
        (None, TypeError, "data_type must be a WebPubSubDataType or str, got NoneType"),
    ],
)
def test_bad_data_type_spellings(spelling: Any, error: type, text: str) -> None:
    with pytest.raises(error, match=text):
        _base.data_type_of(spelling)


@pytest.mark.parametrize(
    "call, error, text",
    [
        (lambda c: c.join_group(None), TypeError, "group_name must be a str"),
        (lambda c: c.join_group(""), ValueError, "group_name must not be empty"),
        (lambda c: c.leave_group("a\0b"), ValueError, "group_name must not contain a NUL"),
        (lambda c: c.join_group("g", ack_id=0), ValueError, "ack_id must be >= 1"),
        (lambda c: c.join_group("g", ack_id="1"), TypeError, "ack_id must be an int"),
        (lambda c: c.send_to_group("g", b"x", WebPubSubDataType.TEXT), TypeError, "content must be a str"),
        (lambda c: c.send_to_group("g", "x", WebPubSubDataType.BINARY), TypeError, "content must be bytes"),
        (lambda c: c.send_to_group("g", {1, 2}, WebPubSubDataType.JSON), TypeError, "not JSON-serializable"),
        (lambda c: c.send_to_group("g", math.nan, WebPubSubDataType.JSON), ValueError, "not valid JSON"),
        (lambda c: c.send_to_group("g", "x", "xml"), ValueError, "data_type must be one of"),
        (lambda c: c.send_to_group("g", "x", 3), TypeError, "data_type must be a WebPubSubDataType"),
        (lambda c: c.send_to_group("g", "x", "text", ack="no"), TypeError, "ack must be a bool"),
        (lambda c: c.send_to_group("g", "a\ud800", "text"), ValueError, "content is not valid Unicode text"),
        (lambda c: c.send_event("e", "\udfff", "text"), ValueError, "content is not valid Unicode text"),
        (lambda c: c.invoke_event("e", "\udc80", "text"), ValueError, "content is not valid Unicode text"),
        (lambda c: c.send_to_group("g", "x", "text", no_echo=1), TypeError, "no_echo must be a bool"),
        (lambda c: c.send_event(1, "x", "text"), TypeError, "event_name must be a str"),
        (lambda c: c.send_event("e", "x", "text", ack_id=-3), ValueError, "ack_id must be >= 1"),
        (lambda c: c.send_event("e", "x", "text", ack=None), TypeError, "ack must be a bool"),
        (lambda c: c.send_event("e", "x", "text", ack_id=2**64), ValueError, "ack_id must fit in 64 bits"),
        (lambda c: c.send_event("e", "x", "text", ack=False, ack_id="2"), TypeError, "ack_id must be an int"),
        (lambda c: c.invoke_event("", "x", "text"), ValueError, "event_name must not be empty"),
        (lambda c: c.invoke_event("e", "x", "text", timeout=0), ValueError, "timeout must be > 0"),
        (lambda c: c.invoke_event("e", "x", "text", timeout="1"), TypeError, "timeout must be a number"),
        (lambda c: c.subscribe(CallbackType.CONNECTED, "not callable"), TypeError, "listener must be callable"),
        (lambda c: c.subscribe("nope", None), TypeError, "listener must be callable"),
    ],
)
def test_bad_operation_arguments(client: WebPubSubClient, call: Any, error: type, text: str) -> None:
    with pytest.raises(error, match=text):
        call(client)


@pytest.mark.parametrize(
    "call, error, text",
    [
        (lambda c: c.join_group(5), TypeError, "group_name must be a str"),
        (lambda c: c.send_to_group("g", 1, "text"), TypeError, "content must be a str"),
        (lambda c: c.send_event("e", "x", "bogus"), ValueError, "data_type must be one of"),
        (lambda c: c.send_to_group("g", "\ud800", "text"), ValueError, "content is not valid Unicode text"),
        (lambda c: c.invoke_event("e", "\ud800", "text"), ValueError, "content is not valid Unicode text"),
        (lambda c: c.send_to_group("g", "x", "text", no_echo="yes"), TypeError, "no_echo must be a bool"),
        (lambda c: c.send_event("e", "x", "text", ack=1), TypeError, "ack must be a bool"),
        (lambda c: c.invoke_event("e", "x", "text", timeout=-1), ValueError, "timeout must be a finite"),
        (lambda c: c.subscribe("connected", 1), TypeError, "listener must be callable"),
    ],
)
async def test_bad_async_operation_arguments(call: Any, error: type, text: str) -> None:
    client = AsyncWebPubSubClient(URL)
    with pytest.raises(error, match=text):
        await call(client)


_UNKNOWN_DATA_TYPE_CALLS = [
    lambda c: c.send_to_group("g", "x", "xml"),
    lambda c: c.send_event("e", "x", "xml"),
    lambda c: c.invoke_event("e", "x", "xml"),
]


@pytest.mark.parametrize("call", _UNKNOWN_DATA_TYPE_CALLS)
@pytest.mark.parametrize("expected", [TypeError, ValueError])
def test_an_unknown_data_type_is_a_type_error_as_officially_and_a_value_error(call: Any, expected: type) -> None:
    """The official client raises TypeError ("Unsupported dataType: xml"): a program that
    switched its import catches it as before (was a ValueError only)."""
    with pytest.raises(expected, match="data_type must be one of"):
        call(WebPubSubClient(URL))


@pytest.mark.parametrize("call", _UNKNOWN_DATA_TYPE_CALLS)
@pytest.mark.parametrize("expected", [TypeError, ValueError])
async def test_an_unknown_data_type_is_a_type_error_as_officially_and_a_value_error_async(
    call: Any, expected: type
) -> None:
    with pytest.raises(expected, match="data_type must be one of"):
        await call(AsyncWebPubSubClient(URL))


_UNKNOWN_EVENTS = ["nope", "group_message", 7, None, ("connected",)]
# What subscribe and unsubscribe log for each of them, in turn.
_IGNORED = [f"{m} ignores {e!r}" for e in _UNKNOWN_EVENTS for m in ("subscribe", "unsubscribe")]


def _ignored_events(caplog: pytest.LogCaptureFixture) -> List[str]:
    return [
        r.getMessage().split(", which is not an event")[0]
        for r in caplog.records
        if r.name == "webpubsub_client" and r.levelno == logging.ERROR
    ]


def test_unknown_events_are_logged_and_ignored(client: WebPubSubClient, caplog: pytest.LogCaptureFixture) -> None:
    """As in the official client: no error raised, none of the listeners kept (so never called),
    each call logged at error level. Other spellings of an event's value still subscribe."""
    for event in _UNKNOWN_EVENTS:
        client.subscribe(event, print)  # type: ignore[call-overload]
        client.unsubscribe(event, print)  # type: ignore[call-overload]
    assert all(client._listeners.snapshot(kind) == () for kind in CallbackType)
    assert _ignored_events(caplog) == _IGNORED
    client.subscribe("Group-Message", print)  # type: ignore[call-overload]
    assert client._listeners.snapshot(CallbackType.GROUP_MESSAGE) == (print,)


async def test_unknown_async_events_are_logged_and_ignored(caplog: pytest.LogCaptureFixture) -> None:
    client = AsyncWebPubSubClient(URL)
    for event in _UNKNOWN_EVENTS:
        await client.subscribe(event, print)  # type: ignore[call-overload]
        await client.unsubscribe(event, print)  # type: ignore[call-overload]
    assert all(client._listeners.snapshot(kind) == () for kind in CallbackType)
    assert _ignored_events(caplog) == _IGNORED


def test_an_open_error_names_its_kind_once() -> None:
    """The library's message already starts with the status name (was "connect failed: connect failed: ...")."""
    client = WebPubSubClient("ws://127.0.0.1:1/client/hubs/h?access_token=t", reconnect_retry_total=0)
    with pytest.raises(OpenClientError) as failed:
        client.open()
    assert str(failed.value).startswith("Failed to open client. connect failed: TCP connect to 127.0.0.1:1")
    assert str(failed.value).count("connect failed") == 1


def test_tls_and_timeout_open_errors_name_their_kind_once() -> None:
    """Was "TLS error: TLS failed: ..." and "timeout: timed out": the library's texts
    name these kinds in other words than the status names."""
    with socket.socket() as silent, socket.socket() as plain:
        for listener in (silent, plain):
            listener.bind(("127.0.0.1", 0))
            listener.listen(1)

        def answer_in_plain_http() -> None:
            conn, _ = plain.accept()
            with conn:
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                conn.recv(1)

        threading.Thread(target=answer_in_plain_http, daemon=True).start()
        cases = (
            (plain, "wss", "Failed to open client. TLS failed: handshake with 127.0.0.1:", "TLS error"),
            (silent, "ws", "Failed to open client. timed out after 0.5 s waiting for 127.0.0.1:", "timeout"),
        )
        for listener, scheme, start, status_name in cases:
            port = listener.getsockname()[1]
            client = WebPubSubClient(f"{scheme}://127.0.0.1:{port}/client/hubs/h?access_token=t", start_timeout=0.5)
            with pytest.raises(OpenClientError) as failed:
                client.open()
            assert str(failed.value).startswith(start), failed.value
            assert status_name not in str(failed.value), failed.value


def test_a_stop_by_a_bug_in_the_library_is_no_reconnect_failure() -> None:
    """The library's stopped event with status PANIC (its connection task panicked): the
    client's ``stop_error`` says so, not "Failed to reconnect"."""
    text = "internal error: the connection task panicked (a bug in the library): boom"
    error = _base.stop_error(_base._native.STATUS_PANIC, text)
    assert type(error) is WebPubSubClientError
    assert error.status == _base._native.STATUS_PANIC
    assert "Failed to reconnect" not in str(error) and text in str(error)
