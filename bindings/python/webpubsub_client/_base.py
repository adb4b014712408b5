"""What the sync and asyncio clients share: argument checks, options, payloads, errors, handles."""

from __future__ import annotations

import collections
import ctypes
import json
import logging
import math
import platform
import threading
import weakref
from enum import Enum
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, List, Optional, Set, Tuple, Type, TypeVar, Union, cast

from . import _callbacks, _native
from ._callbacks import REGISTRY
from ._native import lib
from ._version import VERSION as PACKAGE_VERSION
from .models import (
    AckMessageError,
    CallbackType,
    InvokeEventError,
    InvokeEventResult,
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
    WebPubSubResult,
)

if TYPE_CHECKING:
    _JSONEncoder = json.JSONEncoder
else:
    try:
        # The official client's JSON encoder, which also writes datetimes, timedeltas
        # and bytes; azure-core is installed wherever the official client was.
        from azure.core.serialization import AzureJSONEncoder as _JSONEncoder
    except ImportError:
        _JSONEncoder = json.JSONEncoder

_LOGGER = logging.getLogger("webpubsub_client")
E = TypeVar("E", bound=Enum)

# Defaults of the official azure-messaging-webpubsubclient 1.1.0 (seconds).
DEFAULT_RETRY_TOTAL = 3
DEFAULT_RETRY_BACKOFF_FACTOR = 0.8
DEFAULT_RETRY_BACKOFF_MAX = 120.0
DEFAULT_ACK_TIMEOUT = 30.0
DEFAULT_START_TIMEOUT = 30.0
# Additions (the JavaScript client's values).
DEFAULT_KEEP_ALIVE_INTERVAL = 20.0
DEFAULT_KEEP_ALIVE_TIMEOUT = 120.0
DEFAULT_RECOVERY_TIMEOUT = 30.0
DEFAULT_RECOVERY_RETRY_INTERVAL = 1.0
DEFAULT_SEQUENCE_ACK_INTERVAL = 1.0
DEFAULT_EVENT_BACKLOG_BYTES = 64 << 20
DEFAULT_USER_AGENT = f"webpubsub-client-python/{PACKAGE_VERSION} Python/{platform.python_version()}"

_DATA_TYPES = {
    WebPubSubDataType.TEXT: _native.DATA_TYPE_TEXT,
    WebPubSubDataType.JSON: _native.DATA_TYPE_JSON,
    WebPubSubDataType.BINARY: _native.DATA_TYPE_BINARY,
    WebPubSubDataType.PROTOBUF: _native.DATA_TYPE_PROTOBUF,
}
_DATA_TYPES_BY_NUMBER = {number: member for member, number in _DATA_TYPES.items()}
# Each member under its exact value; a member hashes and compares as its value, so both find it.
_DATA_TYPE_VALUES: Dict[str, WebPubSubDataType] = {member.value: member for member in WebPubSubDataType}
_TEXT = WebPubSubDataType.TEXT
_JSON = WebPubSubDataType.JSON
_TEXT_NUMBER = _DATA_TYPES[_TEXT]

_STATES = {
    _native.STATE_STOPPED: WebPubSubClientState.STOPPED,
    _native.STATE_CONNECTING: WebPubSubClientState.CONNECTING,
    _native.STATE_CONNECTED: WebPubSubClientState.CONNECTED,
    _native.STATE_RECOVERING: WebPubSubClientState.RECOVERING,
    _native.STATE_DISCONNECTED: WebPubSubClientState.DISCONNECTED,
}

# error_detail.name for failures that did not come from the service
_LOCAL_ERROR_NAMES = {
    _native.STATUS_ILLEGAL_STATE: "IllegalState",
    _native.STATUS_NOT_CONNECTED: "NotConnected",
    _native.STATUS_TIMEOUT: "Timeout",
    _native.STATUS_CANCELLED: "Cancelled",
    _native.STATUS_STOPPED: "Stopped",
    _native.STATUS_INTERRUPTED: "Interrupted",
}
_ARGUMENT_STATUSES = (
    _native.STATUS_NULL_ARG,
    _native.STATUS_INVALID_UTF8,
    _native.STATUS_INVALID_ARGUMENT,
)

# ---- argument checks -----------------------------------------------------------------


_CHECKED_NAMES: Dict[str, bytes] = {}  # names that passed check_name, encoded
_CHECKED_NAMES_MAX = 256  # then the cache starts over: a program with many names pays the checks


def check_name(value: Any, what: str) -> bytes:
    """A group or event name as a NUL-terminated UTF-8 string, or TypeError/ValueError.

    A name that passed before is one dict hit: sends check their group or event name per message."""
    if value.__class__ is str:
        encoded = _CHECKED_NAMES.get(value)
        if encoded is not None:
            return encoded
    encoded = _check_new_name(value, what)
    if value.__class__ is str:
        if len(_CHECKED_NAMES) >= _CHECKED_NAMES_MAX:
            _CHECKED_NAMES.clear()
        _CHECKED_NAMES[value] = encoded
    return encoded


def _check_new_name(value: Any, what: str) -> bytes:
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str, got {type(value).__name__}")
    if not value:
        raise ValueError(f"{what} must not be empty")
    if "\0" in value:
        raise ValueError(f"{what} must not contain a NUL character")
    try:
        return value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{what} is not valid Unicode text: {exc}") from None


_URL_SCHEMES = ("ws", "wss", "http", "https")


def check_url(value: Any, what: str) -> bytes:
    """A client access URL (``ws``, ``wss``, ``http`` or ``https`` with a host) as C string bytes.

    The URL carries its access token, so it is kept nowhere: not in the cache of
    :func:`check_name`, not in ``urllib.parse``'s (``urlsplit`` keeps the results of its
    recent calls, in every Python version this package supports, so it is not used
    here), and a refused URL's error does not repeat it."""
    encoded = _check_new_name(value, what)
    scheme, separator, rest = value.strip().partition("://")
    if not separator or scheme.lower() not in _URL_SCHEMES or not _url_host(rest):
        raise ValueError(
            f"{what} must be a ws:// or wss:// client access URL (http:// and https:// are accepted too) "
            "with a host; the value is not shown, as it may hold an access token"
        )
    return encoded


def _url_host(after_scheme: str) -> str:
    """The host of a URL, from what follows its ``scheme://``: the authority (up to the
    first ``/``, ``?`` or ``#``) without user info and port; an IPv6 address without its
    brackets."""
    authority = after_scheme
    for end in "/?#":
        authority = authority.partition(end)[0]
    host = authority.rpartition("@")[2]
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.partition(":")[0]


def check_bool(value: Any, what: str) -> bool:
    """``value`` if it is a bool, else TypeError."""
    if not isinstance(value, bool):
        raise TypeError(f"{what} must be a bool, got {type(value).__name__}")
    return value


def check_int(value: Any, what: str, minimum: int = 0) -> int:
    """``value`` if it is an int (not bool) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{what} must be >= {minimum}, got {value}")
    return int(value)


_MAX_SECONDS = _native.UINT64_MAX // 1000  # longer durations are the longest the library takes


def seconds_to_ms(value: Any, what: str) -> int:
    """A non-negative, finite duration in seconds as whole milliseconds (at most 2**64 - 1);
    a positive one is at least 1 ms: 0 means "off" for some options and is refused by others."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} must be a number of seconds (int or float), got {type(value).__name__}")
    # NaN compares false to everything; an int is finite (and may be too large for a float)
    if not value >= 0 or (isinstance(value, float) and math.isinf(value)):
        raise ValueError(f"{what} must be a finite number of seconds >= 0, got {value!r}")
    if value > _MAX_SECONDS:
        return _native.UINT64_MAX
    ms = min(int(round(value * 1000)), _native.UINT64_MAX)  # a float product may round up to 2**64
    return 1 if ms == 0 and value > 0 else ms


def check_ack_id(ack_id: Any) -> Optional[int]:
    """None, or a positive ackId that fits in 64 bits."""
    if ack_id is None:
        return None
    check_int(ack_id, "ack_id", minimum=1)
    if ack_id > _native.UINT64_MAX:
        raise ValueError(f"ack_id must fit in 64 bits, got {ack_id}")
    return int(ack_id)


_IGNORED_KEYWORDS: Set[Tuple[str, str]] = set()  # (method, name) pairs logged already


def ignore_keywords(method: str, names: Iterable[str]) -> None:
    """Keyword arguments ``method`` has no use for, ignored as the official client's
    ``**kwargs`` ignores them (azure-core's per-call options, a misspelt name): each name
    is logged once per method, at debug level."""
    for name in names:
        if (method, name) not in _IGNORED_KEYWORDS:
            _IGNORED_KEYWORDS.add((method, name))
            _LOGGER.debug("%s ignores the keyword argument %r", method, name)


def operation_keywords(
    method: str, kwargs: Dict[str, Any], target: str, payload: Optional[bytes] = None, *, log: bool = False
) -> None:
    """The extra keyword arguments of an operation on group or event ``target``, as the
    official client treats them: ``logging_enable=True`` (or ``log``, the client's own
    ``logging_enable``) logs the outgoing message at debug level, the others are ignored
    (:func:`ignore_keywords`)."""
    if log or kwargs.get("logging_enable"):
        if payload is None:
            _LOGGER.debug("%s %r", method, target)
        else:
            _LOGGER.debug("%s %r: %r", method, target, payload)
    ignore_keywords(method, [name for name in kwargs if name != "logging_enable"])


def _enum_value(enum_cls: Type[E], value: Any, what: str) -> E:
    if isinstance(value, enum_cls):
        return value
    if isinstance(value, str):
        exact = enum_cls._value2member_map_.get(value)  # "text": a dict hit, no scan
        if exact is not None:
            return cast(E, exact)
        # also accepts other str enums with the same values (azure.core's RetryMode)
        member = enum_cls._missing_(str(value.value) if hasattr(value, "value") else value)
        if member is not None:
            return cast(E, member)
        valid = ", ".join(repr(m.value) for m in enum_cls)
        raise ValueError(f"{what} must be one of {valid}, got {value!r}")
    raise TypeError(f"{what} must be a {enum_cls.__name__} or str, got {type(value).__name__}")


class UnsupportedDataTypeError(TypeError, ValueError):
    """A ``data_type`` str that names no data type. A TypeError, as the official client
    raises ("Unsupported dataType"), so that a program that switched its import still
    catches it; a ValueError, as for the other options' unknown values."""


def data_type_of(value: Any) -> WebPubSubDataType:
    """``value`` as a :class:`WebPubSubDataType` (str values accepted, case-insensitively)."""
    if value.__class__ is str or value.__class__ is WebPubSubDataType:
        member = _DATA_TYPE_VALUES.get(value)  # the usual spellings: one dict hit (this runs per message)
        if member is not None:
            return member
    try:
        return _enum_value(WebPubSubDataType, value, "data_type")
    except ValueError as exc:
        raise UnsupportedDataTypeError(str(exc)) from None


def encode_content(content: Any, data_type: Any) -> Tuple[int, bytes]:
    """The C data type and payload bytes for ``content`` sent as ``data_type``.

    text: a ``str`` (UTF-8 on the wire, so without lone surrogates); json: any
    JSON-serializable value (with azure-core installed, also datetimes, timedeltas and
    bytes, as the official client writes them); binary/protobuf: ``bytes``,
    ``bytearray`` or ``memoryview``.
    """
    kind = data_type_of(data_type)
    if kind is _TEXT:
        if not isinstance(content, str):
            raise TypeError(f"content must be a str when data_type is text, got {type(content).__name__}")
        try:
            return _TEXT_NUMBER, content.encode()  # UTF-8, strict
        except UnicodeEncodeError as exc:
            # The library's text is UTF-8, which has no form for a lone surrogate (JSON's
            # "\ud800" escape has one: send such a string as json).
            raise ValueError(f"content is not valid Unicode text: {exc}") from None
    if kind is _JSON:
        try:
            text = json.dumps(content, cls=_JSONEncoder, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
            try:
                payload = text.encode("utf-8")
            except UnicodeEncodeError:
                # A lone surrogate, which UTF-8 cannot carry: written as an escape, as the
                # official client writes every character beyond ASCII.
                payload = json.dumps(content, cls=_JSONEncoder, separators=(",", ":"), allow_nan=False).encode("ascii")
        except TypeError as exc:
            raise TypeError(f"content is not JSON-serializable: {exc}") from None
        except ValueError as exc:
            raise ValueError(f"content is not valid JSON: {exc}") from None
        return _DATA_TYPES[kind], payload
    if isinstance(content, (bytes, bytearray, memoryview)):
        return _DATA_TYPES[kind], bytes(content)
    raise TypeError(
        f"content must be bytes, bytearray or memoryview when data_type is {kind.value}, got {type(content).__name__}"
    )


def decode_content(data_type: int, data: bytes, binary: Callable[[bytes], Any]) -> Tuple[Any, Any]:
    """``(data_type, value)`` for a received payload; ``binary`` wraps binary payloads."""
    kind = _DATA_TYPES_BY_NUMBER.get(data_type)
    if kind is _TEXT:
        return kind, data.decode("utf-8", errors="replace")
    if kind is _JSON:
        try:
            return kind, json.loads(data.decode("utf-8"))
        except (ValueError, RecursionError):  # valid JSON too: too large an integer, too deep a nesting
            _LOGGER.warning("received json data that does not parse; passing the text")
            return kind, data.decode("utf-8", errors="replace")
    if kind is None:
        _LOGGER.warning("received unknown data type %d; passing bytes", data_type)
        return data_type, binary(data)
    return kind, binary(data)


# ---- options -----------------------------------------------------------------------


def _retry_mode(value: Any, what: str) -> int:
    mode = _enum_value(RetryMode, value, what)
    return _native.RETRY_FIXED if mode is RetryMode.Fixed else _native.RETRY_EXPONENTIAL


def _retry_total(value: Any, what: str) -> int:
    return min(check_int(value, what), _native.UINT32_MAX)


class Options:
    """Validated client options (every official keyword plus the additions), in C units."""

    def __init__(
        self,
        *,
        protocol_type: Union[WebPubSubProtocolType, str] = WebPubSubProtocolType.JSON_RELIABLE,
        auto_rejoin_groups: bool = True,
        auto_reconnect: Optional[bool] = None,
        message_retry_total: int = DEFAULT_RETRY_TOTAL,
        message_retry_backoff_factor: float = DEFAULT_RETRY_BACKOFF_FACTOR,
        message_retry_backoff_max: float = DEFAULT_RETRY_BACKOFF_MAX,
        message_retry_mode: Union[RetryMode, str] = RetryMode.Exponential,
        reconnect_retry_total: int = DEFAULT_RETRY_TOTAL,
        reconnect_retry_backoff_factor: float = DEFAULT_RETRY_BACKOFF_FACTOR,
        reconnect_retry_backoff_max: float = DEFAULT_RETRY_BACKOFF_MAX,
        reconnect_retry_mode: Union[RetryMode, str] = RetryMode.Exponential,
        ack_timeout: float = DEFAULT_ACK_TIMEOUT,
        start_timeout: float = DEFAULT_START_TIMEOUT,
        keep_alive_interval: float = DEFAULT_KEEP_ALIVE_INTERVAL,
        keep_alive_timeout: float = DEFAULT_KEEP_ALIVE_TIMEOUT,
        recovery_timeout: float = DEFAULT_RECOVERY_TIMEOUT,
        recovery_retry_interval: float = DEFAULT_RECOVERY_RETRY_INTERVAL,
        sequence_ack_interval: float = DEFAULT_SEQUENCE_ACK_INTERVAL,
        event_backlog_bytes: int = DEFAULT_EVENT_BACKLOG_BYTES,
        ca_pem: Optional[Union[str, bytes, bytearray, memoryview]] = None,
        logging_enable: bool = False,
        user_agent: Optional[str] = None,
    ) -> None:
        protocol = _enum_value(WebPubSubProtocolType, protocol_type, "protocol_type")
        self.protocol = (
            _native.PROTOCOL_JSON if protocol is WebPubSubProtocolType.JSON else _native.PROTOCOL_JSON_RELIABLE
        )
        self.auto_rejoin_groups = check_bool(auto_rejoin_groups, "auto_rejoin_groups")
        self.message_retry = (
            _retry_total(message_retry_total, "message_retry_total"),
            seconds_to_ms(message_retry_backoff_factor, "message_retry_backoff_factor"),
            seconds_to_ms(message_retry_backoff_max, "message_retry_backoff_max"),
            _retry_mode(message_retry_mode, "message_retry_mode"),
        )
        self.reconnect_retry = (
            _retry_total(reconnect_retry_total, "reconnect_retry_total"),
            seconds_to_ms(reconnect_retry_backoff_factor, "reconnect_retry_backoff_factor"),
            seconds_to_ms(reconnect_retry_backoff_max, "reconnect_retry_backoff_max"),
            _retry_mode(reconnect_retry_mode, "reconnect_retry_mode"),
        )
        # Like the official client: no reconnect retries means no automatic reconnect.
        self.auto_reconnect = (
            reconnect_retry_total > 0 if auto_reconnect is None else check_bool(auto_reconnect, "auto_reconnect")
        )
        self.ack_timeout_ms = seconds_to_ms(ack_timeout, "ack_timeout")
        self.start_timeout_ms = seconds_to_ms(start_timeout, "start_timeout")
        if self.ack_timeout_ms == 0:
            raise ValueError("ack_timeout must be > 0")
        if self.start_timeout_ms == 0:
            raise ValueError("start_timeout must be > 0")
        self.keep_alive = (
            seconds_to_ms(keep_alive_interval, "keep_alive_interval"),
            seconds_to_ms(keep_alive_timeout, "keep_alive_timeout"),
        )
        self.recovery = (
            seconds_to_ms(recovery_timeout, "recovery_timeout"),
            seconds_to_ms(recovery_retry_interval, "recovery_retry_interval"),
        )
        if self.recovery[1] == 0:
            raise ValueError("recovery_retry_interval must be > 0")
        self.sequence_ack_interval_ms = seconds_to_ms(sequence_ack_interval, "sequence_ack_interval")
        if self.sequence_ack_interval_ms == 0:
            raise ValueError("sequence_ack_interval must be > 0")
        self.event_backlog_bytes = min(check_int(event_backlog_bytes, "event_backlog_bytes"), _native.SIZE_MAX)
        self.ca_pem: Optional[bytes] = None
        if ca_pem is not None:
            if isinstance(ca_pem, str):
                try:
                    self.ca_pem = ca_pem.encode("utf-8")
                except UnicodeEncodeError as exc:
                    raise ValueError(f"ca_pem is not valid Unicode text: {exc}") from None
            elif isinstance(ca_pem, (bytes, bytearray, memoryview)):
                self.ca_pem = bytes(ca_pem)
            else:
                raise TypeError(f"ca_pem must be PEM text (str or bytes), got {type(ca_pem).__name__}")
        self.logging_enable = check_bool(logging_enable, "logging_enable")
        # Like the official client: the caller's user agent goes in front of the package's own.
        agent = DEFAULT_USER_AGENT
        if user_agent is not None:
            check_name(user_agent, "user_agent")
            if not all(" " <= c <= "~" for c in user_agent):
                raise ValueError(f"user_agent must be printable ASCII, got {user_agent!r}")
            agent = f"{user_agent} {DEFAULT_USER_AGENT}"
        self.user_agent: Optional[bytes] = agent.encode("utf-8")

    def build(self) -> int:
        """A new ``wps_options`` handle holding these options (the caller frees it)."""
        handle: Optional[int] = lib.wps_options_new()
        if not handle:
            raise MemoryError("wps_options_new failed")
        try:
            self._apply(handle)
        except BaseException:
            lib.wps_options_free(handle)
            raise
        return handle

    def _apply(self, handle: int) -> None:
        calls: List[Tuple[str, Tuple[Any, ...]]] = [
            ("wps_options_set_protocol", (self.protocol,)),
            ("wps_options_set_auto_reconnect", (self.auto_reconnect,)),
            ("wps_options_set_auto_rejoin_groups", (self.auto_rejoin_groups,)),
            ("wps_options_set_message_retry", self.message_retry),
            ("wps_options_set_reconnect_retry", self.reconnect_retry),
            ("wps_options_set_keep_alive", self.keep_alive),
            ("wps_options_set_ack_timeout_ms", (self.ack_timeout_ms,)),
            ("wps_options_set_start_timeout_ms", (self.start_timeout_ms,)),
            ("wps_options_set_recovery", self.recovery),
            ("wps_options_set_sequence_ack_interval_ms", (self.sequence_ack_interval_ms,)),
            ("wps_options_set_event_backlog_bytes", (self.event_backlog_bytes,)),
        ]
        if self.ca_pem is not None:
            calls.append(("wps_options_add_ca_pem", (self.ca_pem, len(self.ca_pem))))
        if self.user_agent is not None:
            calls.append(("wps_options_set_user_agent", (self.user_agent,)))
        for name, args in calls:
            status = getattr(lib, name)(handle, *args)
            if status != _native.STATUS_OK:
                raise ValueError(f"invalid client option ({name}): {_detail(status)}")


# ---- errors -------------------------------------------------------------------------


# How the library's own texts name the kinds whose status names read otherwise.
_OWN_KIND_NAMES = {
    _native.STATUS_TIMEOUT: "timed out",
    _native.STATUS_TLS: "TLS failed",
    _native.STATUS_STOPPED: "client stopped",
}


def _detail(status: int, message: Optional[str] = None) -> str:
    text = _native.last_error_message() if message is None else message
    name = _native.status_str(status)
    # the library's own errors name their kind
    if not text or text.startswith((name, _OWN_KIND_NAMES.get(status, name))):
        return text or name
    return f"{name}: {text}"


def open_error(status: int, message: Optional[str] = None) -> Exception:
    """The exception for a failed ``wps_client_start`` (read on the calling thread)."""
    text = _native.last_error_message() if message is None else message
    if status == _native.STATUS_ILLEGAL_STATE:
        return OpenClientError(f"Client can be only started when it's Stopped ({_detail(status, text)})", status=status)
    return OpenClientError(f"Failed to open client. {_detail(status, text)}", status=status)


def stop_error(status: int, message: Optional[str]) -> Optional[WebPubSubClientError]:
    """Why a stopped event's client stopped on its own: an :class:`OpenClientError` with
    the last reconnect attempt's failure, a :class:`WebPubSubClientError` with status
    ``NOT_CONNECTED`` for a session lost with auto-reconnect off, or ``PANIC`` for a bug
    in the library that ended the client's connection task; None when ``close()``
    stopped it."""
    if status == _native.STATUS_OK:
        return None
    if status in (_native.STATUS_NOT_CONNECTED, _native.STATUS_PANIC):
        return WebPubSubClientError(_detail(status, message), status=status)
    return OpenClientError(f"Failed to reconnect. {_detail(status, message)}", status=status)


class ProviderErrors:
    """The last few exceptions a client's credential provider raised (a reopen does not
    forget them), to chain to a stopped event's error (see :func:`stop_error`) when the
    last attempt failed for its credential: the application may then tell its own errors
    by type. The one chained is the latest whose text the error tells, so a stop taken
    late, after a reopen asked the provider again, still finds its own."""

    KEPT = 4

    def __init__(self) -> None:
        self._recent: collections.deque[BaseException] = collections.deque(maxlen=self.KEPT)

    def add(self, raised: BaseException) -> None:
        self._recent.append(raised)

    def forget(self, raised: BaseException) -> None:
        """``open()`` raises ``raised`` itself: its traceback then holds ``open()``'s
        frame, and the client with it, which the client must not keep."""
        kept = [e for e in self._recent if e is not raised]
        self._recent.clear()
        self._recent.extend(kept)

    def chain(self, error: Optional[WebPubSubClientError]) -> None:
        if error is None or error.status != _native.STATUS_CREDENTIAL_FAILED:
            return
        text = str(error)
        for raised in reversed(self._recent):
            if _callbacks.credential_error_text(raised) in text:
                error.__cause__ = raised
                return


def operation_error(
    status: int,
    *,
    invoke: bool = False,
    ack_id: Optional[int] = None,
    name: Optional[str] = None,
    message: Optional[str] = None,
    service_message: Optional[str] = None,
) -> Exception:
    """The exception for a failed operation. The service's error name, the library's
    message and the service's own text default to this thread's last error; a refusal's
    ``error_detail`` has the service's name and text, as the official client's."""
    if message is None:
        message = _native.last_error_message()
    if name is None:
        name = _native.last_error_name()
    if service_message is None:
        service_message = _native.last_error_service_message()
    if status in _ARGUMENT_STATUSES:
        return ValueError(_detail(status, message))
    if status in (_native.STATUS_ACK_ERROR, _native.STATUS_INVOKE_ERROR) or status in _LOCAL_ERROR_NAMES:
        if status in (_native.STATUS_ACK_ERROR, _native.STATUS_INVOKE_ERROR):
            message = service_message
        detail = AckMessageError(name=name or _LOCAL_ERROR_NAMES.get(status, "Error"), message=message)
        if invoke:
            return InvokeEventError("Failed to invoke event.", detail, status=status)
        return SendMessageError("Failed to send message.", ack_id, detail, status=status)
    return WebPubSubClientError(_detail(status, message), status=status)


def check_status(status: int) -> None:
    """Raise for a failed call that is neither open nor an operation."""
    if status == _native.STATUS_OK:
        return
    if status in _ARGUMENT_STATUSES:
        raise ValueError(_detail(status))
    raise WebPubSubClientError(_detail(status), status=status)


def ack_result(out: Union[_native.WpsAckResult, _native.WpsCompletion]) -> WebPubSubResult:
    """An operation's ``wps_ack_result`` (or ``wps_completion``, same fields) as a
    :class:`WebPubSubResult`."""
    return WebPubSubResult(out.ack_id if out.has_ack_id else None, bool(out.is_duplicated))


def failed_ack_id(
    out: Union[_native.WpsAckResult, _native.WpsCompletion], chosen: Optional[int] = None
) -> Optional[int]:
    """The ackId of a failed operation, which the library wrote to ``out`` when it had
    one (refused, timed out after its retries, connection lost or client closed after it
    was sent), else
    the caller's ``chosen`` one."""
    return out.ack_id if out.has_ack_id else chosen


def completion_outcome(
    completion: _native.WpsCompletion, chosen: Optional[int] = None
) -> Union[WebPubSubResult, Exception]:
    """What the borrowed ``wps_completion`` of an asynchronous send gives its caller: the
    :class:`WebPubSubResult`, or the exception the blocking form raises for the same
    failure (the ackId the library wrote, else the caller's ``chosen`` one)."""
    status = completion.status
    if status == _native.STATUS_OK:
        return ack_result(completion)
    return operation_error(
        status,
        ack_id=failed_ack_id(completion, chosen),
        name=_native.decode(completion.error_name) or "",
        message=_native.decode(completion.error_message) or "",
        service_message=_native.decode(completion.service_message) or "",
    )


def invoke_result(data_type: int, data: bytes) -> InvokeEventResult:
    """An invoke response: text as ``str``, json parsed, binary as ``bytes``."""
    kind, value = decode_content(data_type, data, bytes)
    return InvokeEventResult(kind, value)


# ---- events -------------------------------------------------------------------------


def _payload(event: _native.WpsEvent) -> bytes:
    """A copy of the event's borrowed ``data`` (slicing the ``char *``: cheaper than ``string_at``)."""
    size = event.data_len
    return event.data[:size] if size and event.data else b""


_new = object.__new__


def _group_message(event: _native.WpsEvent) -> Tuple[CallbackType, Tuple[Any, ...]]:
    # The hottest path of a subscriber in thread mode, written out: each field read once,
    # text decoded here.
    size = event.data_len
    pointer = event.data
    data = pointer[:size] if size and pointer else b""
    number = event.data_type
    if number == _TEXT_NUMBER:
        data_type, value = _TEXT, data.decode("utf-8", "replace")
    else:
        data_type, value = decode_content(number, data, memoryview)
    group = event.group
    sender = event.from_user_id
    return _group_message_args(
        data_type,
        value,
        group[: event.group_len].decode("utf-8", "replace") if group else "",
        sender[: event.from_user_id_len].decode("utf-8", "replace") if sender else None,
        event.sequence_id if event.has_sequence_id else None,
    )


def _group_message_args(
    data_type: Any, data: Any, group: str, from_user_id: Optional[str], sequence_id: Optional[int]
) -> Tuple[CallbackType, Tuple[Any, ...]]:
    """A group message's callback type and listener arguments, for both ways messages
    arrive (event callback, records). The arguments object is filled in directly: its
    keyword-only ``__init__`` costs 0.34 us a message; test_sync checks the result
    against ``__init__``'s."""
    args = _new(OnGroupDataMessageArgs)
    args.data_type = data_type
    args.data = data
    args.group = group
    args.from_user_id = from_user_id
    args.sequence_id = sequence_id
    return _GROUP_MESSAGE, (args,)


class DispatchBuffers:
    """What ``wps_client_dispatch_into`` writes to: ack records, message records and the
    counts. One set per dispatching thread, shared by the clients it dispatches (the
    native dispatch never runs inside another on one thread, and its records are
    converted before any listener runs), so that an idle client holds none."""

    ACKS = 32  # ack records per native call
    MESSAGE_BYTES = 32 * 1024  # message records per native call; a larger message takes its callback

    def __init__(self) -> None:
        self.acks = (_native.WpsAckRecord * self.ACKS)()
        self.ack_view = memoryview(self.acks).cast("B")
        self.messages = (ctypes.c_uint64 * (self.MESSAGE_BYTES // 8))()  # 8-byte aligned
        self.message_view = memoryview(self.messages).cast("B")
        self.buffers = _native.WpsDispatchBuffers(
            self.acks, self.ACKS, ctypes.addressof(self.messages), self.MESSAGE_BYTES
        )
        self.ref = ctypes.byref(self.buffers)
        self.counts = memoryview(self.buffers).cast("B")


def message_records(view: memoryview, count: int) -> List[Tuple[CallbackType, Tuple[Any, ...]]]:
    """The callback types and listener arguments of the ``count`` ``wps_message_record``s
    at the start of ``view`` (written by ``wps_client_dispatch_into``), as
    :func:`event_args` converts the same messages from the event callback. A message
    that fails to convert is logged and left out, as its callback would drop it."""
    unpack = _native.MESSAGE_RECORD.unpack_from
    converted: List[Tuple[CallbackType, Tuple[Any, ...]]] = []
    at = 0
    for _ in range(count):
        size = unpack(view, at)[0]
        try:
            converted.append(_message_record(view, at, unpack))
        except Exception:  # noqa: BLE001 - the rest of the records still go out
            _LOGGER.exception("error while converting a message")
        at += size
    return converted


def _message_record(view: memoryview, at: int, unpack: Any) -> Tuple[CallbackType, Tuple[Any, ...]]:
    """The record at ``at`` of ``view`` converted (see :func:`message_records`)."""
    _size, kind, sequence_id, number, flags, group_len, from_len, data_len = unpack(view, at)
    start = at + _native.MESSAGE_RECORD.size
    sender_at = start + group_len
    data_at = sender_at + from_len
    data = view[data_at : data_at + data_len]
    if number == _TEXT_NUMBER:
        data_type, value = _TEXT, str(data, "utf-8", "replace")
    else:
        data_type, value = decode_content(number, bytes(data), memoryview)
    has_sequence_id = flags & _native.MESSAGE_HAS_SEQUENCE_ID
    if kind != _native.EVENT_GROUP_MESSAGE:
        server = OnServerDataMessageArgs(data_type, value, sequence_id if has_sequence_id else None)
        return CallbackType.SERVER_MESSAGE, (server,)
    has_sender = flags & _native.MESSAGE_HAS_FROM_USER_ID
    return _group_message_args(
        data_type,
        value,
        str(view[start:sender_at], "utf-8", "replace"),
        str(view[sender_at:data_at], "utf-8", "replace") if has_sender else None,
        sequence_id if has_sequence_id else None,
    )


def _server_message(event: _native.WpsEvent) -> Tuple[CallbackType, Tuple[Any, ...]]:
    data_type, data = decode_content(event.data_type, _payload(event), memoryview)
    sequence_id = event.sequence_id if event.has_sequence_id else None
    return CallbackType.SERVER_MESSAGE, (OnServerDataMessageArgs(data_type, data, sequence_id),)


def _connected(event: _native.WpsEvent) -> Tuple[CallbackType, Tuple[Any, ...]]:
    name = _native.name
    connection_id = name(event.connection_id, event.connection_id_len) or ""
    return CallbackType.CONNECTED, (OnConnectedArgs(connection_id, name(event.user_id, event.user_id_len)),)


def _disconnected(event: _native.WpsEvent) -> Tuple[CallbackType, Tuple[Any, ...]]:
    connection_id = _native.name(event.connection_id, event.connection_id_len)
    args = OnDisconnectedArgs(connection_id, _native.decode(event.message), event.close_code or None)
    return CallbackType.DISCONNECTED, (args,)


def _stopped(event: _native.WpsEvent) -> Tuple[CallbackType, Tuple[Any, ...]]:
    # Not the listeners' argument (the official stopped listener takes none): the sink
    # keeps it as the client's ``stop_error``.
    return CallbackType.STOPPED, (stop_error(event.status, _native.decode(event.message)),)


def _rejoin_group_failed(event: _native.WpsEvent) -> Tuple[CallbackType, Tuple[Any, ...]]:
    dec = _native.decode
    name = dec(event.error_name) or ""
    service_message = dec(event.service_message)
    message = (dec(event.message) or "") if service_message is None else service_message
    detail = AckMessageError(name=name or "Error", message=message)
    ack_id = event.ack_id if event.has_ack_id else None
    error = SendMessageError("Failed to rejoin group.", ack_id, detail)
    group = _native.name(event.group, event.group_len) or ""
    return CallbackType.REJOIN_GROUP_FAILED, (OnRejoinGroupFailedArgs(group, error),)


_GROUP_MESSAGE = CallbackType.GROUP_MESSAGE

# Native event kind -> its converter: one dict lookup per event.
_EVENT_CONVERTERS: Dict[int, Callable[[_native.WpsEvent], Tuple[CallbackType, Tuple[Any, ...]]]] = {
    _native.EVENT_CONNECTED: _connected,
    _native.EVENT_DISCONNECTED: _disconnected,
    _native.EVENT_STOPPED: _stopped,
    _native.EVENT_SERVER_MESSAGE: _server_message,
    _native.EVENT_GROUP_MESSAGE: _group_message,
    _native.EVENT_REJOIN_GROUP_FAILED: _rejoin_group_failed,
}


def event_args(event: _native.WpsEvent) -> Optional[Tuple[CallbackType, Tuple[Any, ...]]]:
    """The callback type and listener arguments for a borrowed native event (copied)."""
    convert = _EVENT_CONVERTERS.get(event.kind)
    if convert is None:
        _LOGGER.debug("ignoring unknown event kind %d", event.kind)
        return None
    return convert(event)


def callback_type_of(event: Any) -> Optional[CallbackType]:
    """``event`` as a :class:`CallbackType` (a member, or its value in any case); None
    for anything else."""
    try:
        return _enum_value(CallbackType, event, "event")
    except (TypeError, ValueError):
        return None


_EVENT_NAMES = ", ".join(repr(kind.value) for kind in CallbackType)


class Listeners:
    """The listeners of one client, per event type (thread-safe).

    Each type holds an immutable tuple, replaced on every change: events read it without
    a lock or a copy, and a listener added or removed during a dispatch takes effect from
    the next event.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_type: Dict[CallbackType, Tuple[Callable[..., Any], ...]] = {t: () for t in CallbackType}

    def add(self, event: Any, listener: Any) -> None:
        """Append ``listener`` for ``event`` (the same listener may be added twice, as officially).

        An ``event`` that names no event is logged at error level and ignored, as the
        official client does (see ``WebPubSubClient.subscribe``); a ``listener`` that is
        not callable raises TypeError."""
        if not callable(listener):
            raise TypeError(f"listener must be callable, got {type(listener).__name__}")
        kind = self._known(event, "subscribe")
        if kind is None:
            return
        with self._lock:
            self._by_type[kind] = self._by_type[kind] + (listener,)

    def remove(self, event: Any, listener: Any) -> None:
        """Remove one registration of ``listener``; absent listeners, and events that name no
        event (logged at error level), are ignored."""
        kind = self._known(event, "unsubscribe")
        if kind is None:
            return
        with self._lock:
            current = list(self._by_type[kind])
            try:
                current.remove(listener)
            except ValueError:
                _LOGGER.info("listener to remove is not subscribed to %s", kind.value)
                return
            self._by_type[kind] = tuple(current)

    @staticmethod
    def _known(event: Any, method: str) -> Optional[CallbackType]:
        """``event`` as a :class:`CallbackType`, or None, logged at error level, when it names no event."""
        kind = callback_type_of(event)
        if kind is None:
            _LOGGER.error("%s ignores %r, which is not an event (the events: %s)", method, event, _EVENT_NAMES)
        return kind

    def snapshot(self, kind: CallbackType) -> Tuple[Callable[..., Any], ...]:
        """The listeners of ``kind`` now (an immutable tuple)."""
        return self._by_type[kind]


class HeldListeners:
    """A client's listeners, and the client, as its event sink holds them. The sink lives
    in the callback registry (a module global) until the native client is freed, so what
    it holds strongly is never collected before: it holds them strongly only while the
    client runs (from ``open()`` to its ``stopped`` event), weakly otherwise. A running
    client referred to by nothing else keeps running, as the official client's threads
    keep it, but a stopped, dropped one (and its native handle) is collected."""

    def __init__(self, listeners: Listeners) -> None:
        self._ref = weakref.ref(listeners)
        self._held: Any = None  # the running client, which holds its listeners
        self._lock = threading.Lock()
        self.handle = 0  # set once the native client exists

    def get(self) -> Optional[Listeners]:
        """The listeners; None once the client was collected (its handle is being freed)."""
        return self._ref()

    def hold(self, client: Any) -> None:
        """``client`` runs (or is opening): keep it, and through it its listeners."""
        with self._lock:
            self._keep(client)

    def release_if_stopped(self) -> None:
        """Let the listeners and the client go once the client is stopped."""
        with self._lock:
            if state_of(self.handle) is WebPubSubClientState.STOPPED:
                self._keep(None)

    def _keep(self, client: Any) -> None:
        """Hold ``client`` strongly (None: nothing), under the lock. The asyncio client's
        sink holds it through its event loop instead (see ``aio._client._LoopHeld``)."""
        self._held = client


def is_credential(credential: Any) -> bool:
    """Whether ``credential`` is a credential: an object with a ``get_client_access_url()``
    method. Not only this package's ``WebPubSubClientCredential``: a program that switched
    the client's import may still make the official package's."""
    return callable(getattr(credential, "get_client_access_url", None))


# ---- native client handle -------------------------------------------------------------


# The native clients not freed yet. At exit the first one stopped starts the stop of
# them all, so that they close together: one at a time, each whose peer no longer answers
# held the exit for its close timeout (1 s), 100 such clients 100 s.
_LIVE_HANDLES: Set[int] = set()
_LIVE_LOCK = threading.Lock()
_NO_COMPLETION = _native.COMPLETION_CB()


def free_client(handle: int) -> None:
    """Free a native client: stops it, completes pending operations, waits for callbacks.

    At interpreter exit it is only stopped (which is safe alongside other calls), and its
    memory is left to the end of the process: a daemon thread may be inside a call on
    it, and a callback still running (an asyncio listener of an event other than a
    message) would be waited for without end (the exit hook then waits for running
    callbacks a bounded time)."""
    if not threading.main_thread().is_alive():
        with _LIVE_LOCK:
            for live in _LIVE_HANDLES:
                lib.wps_client_stop_async(live, _NO_COMPLETION, None, None)
            _LIVE_HANDLES.clear()
        lib.wps_client_stop(handle)
        return
    with _LIVE_LOCK:  # before the free: the exit's stops never reach a freed handle
        _LIVE_HANDLES.discard(handle)
    lib.wps_client_free(handle)


def new_native_client(
    url_or_provider: Union[str, Callable[[int], None]],
    options: Options,
    sink: Any,
) -> int:
    """Create a native client whose events go to ``sink.on_native_event``; returns its handle.

    Its URL is ``url_or_provider``, or comes from it: called with the token of each
    credential request, whose answer the credential callback has deferred, it starts
    the application's provider elsewhere and returns at once; the provider's outcome
    answers the token (:func:`._callbacks.answer_credential`).

    It is in poll dispatch mode: its callbacks run only in a dispatch of the client
    (``wps_client_dispatch_into``), on the thread that calls it, never on a library thread.

    The caller frees it with :func:`free_client` (a ``weakref.finalize`` on the
    Python client, which also runs at interpreter exit). ``sink`` may hold that client
    only while it runs (:class:`HeldListeners`), or the finalizer of a stopped client
    could never run before exit.
    """
    _callbacks.enable_native_logging(trace=options.logging_enable)
    opts = options.build()
    if lib.wps_options_set_dispatch_mode(opts, _native.DISPATCH_POLL) != _native.STATUS_OK:
        lib.wps_options_free(opts)
        raise RuntimeError(f"poll dispatch mode: {_native.last_error_message()}")
    out = ctypes.c_void_p()
    sink_key = REGISTRY.add(sink)
    cred_key = 0
    try:
        if isinstance(url_or_provider, str):
            url = check_url(url_or_provider, "credential")
            status = lib.wps_client_new(
                url,
                opts,
                _callbacks.EVENT_TRAMPOLINE,
                _callbacks.user_data(sink_key),
                _callbacks.FREE_TRAMPOLINE,
                ctypes.byref(out),
            )
        else:
            cred_key = REGISTRY.add(url_or_provider)
            status = lib.wps_client_new_with_credential(
                _callbacks.CREDENTIAL_TRAMPOLINE,
                _callbacks.user_data(cred_key),
                _callbacks.FREE_TRAMPOLINE,
                opts,
                _callbacks.EVENT_TRAMPOLINE,
                _callbacks.user_data(sink_key),
                _callbacks.FREE_TRAMPOLINE,
                ctypes.byref(out),
            )
    finally:
        lib.wps_options_free(opts)
    if status != _native.STATUS_OK or not out.value:
        # On failure the library did not take the user data: release it here.
        REGISTRY.pop(sink_key)
        REGISTRY.pop(cred_key)
        if status in _ARGUMENT_STATUSES:
            raise ValueError(f"cannot create the client: {_detail(status)}")
        raise WebPubSubClientError(f"cannot create the client: {_detail(status)}", status=status)
    handle: int = out.value
    with _LIVE_LOCK:
        _LIVE_HANDLES.add(handle)
    return handle


def state_of(handle: int) -> WebPubSubClientState:
    """The client's current state."""
    return _STATES.get(lib.wps_client_state(handle), WebPubSubClientState.STOPPED)


def connection_id_of(handle: int) -> Optional[str]:
    """The current connection id, or None when there is none."""
    size = 128
    for _ in range(4):
        buf = ctypes.create_string_buffer(size)
        out_len = ctypes.c_size_t(0)
        status = lib.wps_client_connection_id(handle, buf, size, ctypes.byref(out_len))
        if status == _native.STATUS_OK:
            return buf.raw[: out_len.value].decode("utf-8", errors="replace") or None
        if status == _native.STATUS_INVALID_ARGUMENT and out_len.value >= size:
            size = out_len.value + 1
            continue
        return None
    return None


def send_flags(ack: Any, no_echo: Any = False, ack_id: Any = None) -> Tuple[int, Optional[int]]:
    """The ``WPS_SEND_*`` flags of a send and the ackId to send it with, after checking its
    options: ``ack`` and ``no_echo`` bools, ``ack_id`` None or a positive 64-bit int. With
    ``ack=False`` the ackId is None: a fire-and-forget message has none, and the official
    client leaves out an ``ack_id`` given with it (logged here at debug level). One call
    for all of them: this runs per message."""
    if not isinstance(ack, bool):
        check_bool(ack, "ack")
    if not isinstance(no_echo, bool):
        check_bool(no_echo, "no_echo")
    if ack_id is not None:
        check_ack_id(ack_id)
        if not ack:
            _LOGGER.debug("ack_id %d is not sent: a message sent with ack=False has no ackId", ack_id)
            ack_id = None
    flags = 0 if ack else _native.SEND_FIRE_AND_FORGET
    return (flags | _native.SEND_NO_ECHO) if no_echo else flags, ack_id


def check_timeout(timeout: Any) -> int:
    """An invoke timeout in seconds (None = the ack timeout) as milliseconds (0 = ack timeout)."""
    if timeout is None:
        return 0
    ms = seconds_to_ms(timeout, "timeout")
    if ms == 0:
        raise ValueError("timeout must be > 0 seconds (or None for the ack timeout)")
    return ms


def log_listener_error(kind: CallbackType) -> None:
    """Log the exception a listener raised (it never reaches the library)."""
    _LOGGER.exception("a %s listener raised", kind.value)
