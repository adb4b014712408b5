"""ctypes declarations of the C API (``include/webpubsub_client.h``) and the loader.

Every function used from Python is declared here with ``argtypes``/``restype``;
handles are ``c_void_p``. Nothing in this module raises across the C boundary:
the callback trampolines live in :mod:`webpubsub_client._callbacks`.
"""

from __future__ import annotations

import ctypes
import os
import struct
import sys
import sysconfig
from ctypes import (
    CFUNCTYPE,
    POINTER,
    Structure,
    c_bool,
    c_char,
    c_char_p,
    c_int,
    c_size_t,
    c_uint16,
    c_uint32,
    c_uint64,
    c_void_p,
)
from pathlib import Path
from typing import Any, Iterable, List, Optional

__all__ = ["lib", "load_library", "LibraryNotFoundError"]

# ---- constants (stable numbers from the header) -------------------------------------

STATUS_OK = 0
STATUS_NULL_ARG = 1
STATUS_INVALID_UTF8 = 2
STATUS_INVALID_ARGUMENT = 3
STATUS_ILLEGAL_STATE = 4
STATUS_NOT_CONNECTED = 5
STATUS_TIMEOUT = 6
STATUS_CANCELLED = 7
STATUS_ACK_ERROR = 8
STATUS_INVOKE_ERROR = 9
STATUS_CONNECT_FAILED = 10
STATUS_CREDENTIAL_FAILED = 11
STATUS_TLS = 12
STATUS_STOPPED = 13
STATUS_PANIC = 14
STATUS_FORKED = 15
STATUS_INTERRUPTED = 16
STATUS_INTERNAL = 99

DATA_TYPE_TEXT = 0
DATA_TYPE_JSON = 1
DATA_TYPE_BINARY = 2
DATA_TYPE_PROTOBUF = 3

PROTOCOL_JSON_RELIABLE = 0
PROTOCOL_JSON = 1

RETRY_FIXED = 0
RETRY_EXPONENTIAL = 1

STATE_STOPPED = 0
STATE_CONNECTING = 1
STATE_CONNECTED = 2
STATE_RECOVERING = 3
STATE_DISCONNECTED = 4

SEND_NO_ECHO = 1
SEND_FIRE_AND_FORGET = 2
SEND_DEFERRED = 4
SEND_RECORD = 8

DISPATCH_THREAD = 0
DISPATCH_POLL = 1

LOG_ERROR = 1
LOG_WARN = 2
LOG_INFO = 3
LOG_DEBUG = 4
LOG_TRACE = 5

EVENT_CONNECTED = 1
EVENT_DISCONNECTED = 2
EVENT_STOPPED = 3
EVENT_SERVER_MESSAGE = 4
EVENT_GROUP_MESSAGE = 5
EVENT_REJOIN_GROUP_FAILED = 6

MESSAGE_HAS_SEQUENCE_ID = 1
MESSAGE_HAS_FROM_USER_ID = 2

UINT32_MAX = 0xFFFF_FFFF
UINT64_MAX = 0xFFFF_FFFF_FFFF_FFFF
SIZE_MAX = (1 << (8 * ctypes.sizeof(c_size_t))) - 1

# ---- structs ------------------------------------------------------------------------


class WpsEvent(Structure):
    """``wps_event``: borrowed, valid only during the event callback. The ids and names are
    read with their ``*_len`` fields (:func:`name`): one holding U+0000 is longer than its
    C string."""

    _fields_ = [
        ("kind", c_uint32),
        ("connection_id", POINTER(c_char)),
        ("user_id", POINTER(c_char)),
        ("group", POINTER(c_char)),
        ("from_user_id", POINTER(c_char)),
        ("data_type", c_uint32),
        ("data", POINTER(c_char)),  # sliced to copy: cheaper than string_at
        ("data_len", c_size_t),
        ("has_sequence_id", c_bool),
        ("sequence_id", c_uint64),
        ("message", c_char_p),
        ("error_name", c_char_p),
        ("close_code", c_uint16),
        ("service_message", c_char_p),
        ("has_ack_id", c_bool),
        ("ack_id", c_uint64),
        ("connection_id_len", c_size_t),
        ("user_id_len", c_size_t),
        ("group_len", c_size_t),
        ("from_user_id_len", c_size_t),
        ("status", c_uint32),
    ]


class WpsAckResult(Structure):
    """``wps_ack_result``: written by the blocking operations on success."""

    _fields_ = [
        ("ack_id", c_uint64),
        ("has_ack_id", c_bool),
        ("is_duplicated", c_bool),
    ]


class WpsCompletion(Structure):
    """``wps_completion``: borrowed, valid only during the completion callback."""

    _fields_ = [
        ("status", c_uint32),
        ("op_id", c_uint64),
        ("has_ack_id", c_bool),
        ("ack_id", c_uint64),
        ("is_duplicated", c_bool),
        ("error_name", c_char_p),
        ("error_message", c_char_p),
        ("data_type", c_uint32),
        ("data", c_void_p),
        ("data_len", c_size_t),
        ("service_message", c_char_p),
    ]


class WpsAckRecord(Structure):
    """``wps_ack_record``: a successful send written by ``wps_client_dispatch_into``."""

    _fields_ = [
        ("user_data", c_void_p),
        ("op_id", c_uint64),
        ("ack_id", c_uint64),
        ("has_ack_id", c_bool),
        ("is_duplicated", c_bool),
    ]


class WpsMessageRecord(Structure):
    """``wps_message_record``: a message written by ``wps_client_dispatch_into``, followed
    by its group name, sender and payload bytes."""

    _fields_ = [
        ("size", c_uint32),
        ("kind", c_uint32),
        ("sequence_id", c_uint64),
        ("data_type", c_uint32),
        ("flags", c_uint32),
        ("group_len", c_uint32),
        ("from_user_id_len", c_uint32),
        ("data_len", c_uint64),
    ]


class WpsDispatchBuffers(Structure):
    """``wps_dispatch_buffers``: the arrays ``wps_client_dispatch_into`` writes to (set by
    the caller), then its counts (set by the call)."""

    _fields_ = [
        ("acks", POINTER(WpsAckRecord)),
        ("ack_cap", c_size_t),
        ("messages", c_void_p),
        ("message_cap", c_size_t),
        ("ran", c_size_t),
        ("acks_written", c_size_t),
        ("messages_written", c_size_t),
        ("message_bytes", c_size_t),
    ]


def _record_struct(record: Any, codes: str) -> struct.Struct:
    """The ctypes struct ``record`` as a ``struct`` format of ``codes`` (one per field,
    then the trailing padding): unpacking a buffer of records costs a fraction of reading
    each field through ctypes. Refuses a layout that differs from the library's."""
    # a field's offset in native alignment: the prefix ending with it, less its own size
    offsets = [struct.calcsize("@" + codes[: i + 1]) - struct.calcsize("@" + codes[i]) for i in range(len(codes))]
    if offsets != [getattr(record, field[0]).offset for field in record._fields_]:
        raise ImportError(f"webpubsub_client: {record.__name__} does not have the layout this binding reads")
    return struct.Struct(f"@{codes}{ctypes.sizeof(record) - struct.calcsize('@' + codes)}x")


# user_data, op_id, ack_id, has_ack_id, is_duplicated
ACK_RECORD = _record_struct(WpsAckRecord, "PQQ??")
# size, kind, sequence_id, data_type, flags, group_len, from_user_id_len, data_len
MESSAGE_RECORD = _record_struct(WpsMessageRecord, "IIQIIIIQ")
# the four counts at the end of wps_dispatch_buffers
DISPATCH_COUNTS = struct.Struct("@4N")
DISPATCH_COUNTS_OFFSET = WpsDispatchBuffers.ran.offset


# ---- callback types -----------------------------------------------------------------

EVENT_CB = CFUNCTYPE(None, c_void_p, POINTER(WpsEvent))
USER_DATA_FREE_CB = CFUNCTYPE(None, c_void_p)
CREDENTIAL_CB = CFUNCTYPE(None, c_void_p, c_void_p)
COMPLETION_CB = CFUNCTYPE(None, c_void_p, POINTER(WpsCompletion))
LOG_CB = CFUNCTYPE(None, c_void_p, c_uint32, c_char_p, c_char_p)
INTERRUPT_CB = CFUNCTYPE(c_int)

_status = c_uint32
_handle = c_void_p
_bytes = c_void_p  # (const uint8_t *data): passed as a ctypes buffer or None
_out_ack = POINTER(WpsAckResult)
_out_u64 = POINTER(c_uint64)

# name -> (restype, argtypes)
_SIGNATURES = {
    "wps_status_str": (c_char_p, [c_uint32]),
    "wps_last_error_message": (c_char_p, []),
    "wps_last_error_name": (c_char_p, []),
    "wps_last_error_service_message": (c_char_p, []),
    "wps_version": (c_char_p, []),
    # options
    "wps_options_new": (_handle, []),
    "wps_options_free": (None, [_handle]),
    "wps_options_set_protocol": (_status, [_handle, c_uint32]),
    "wps_options_set_auto_reconnect": (_status, [_handle, c_bool]),
    "wps_options_set_auto_rejoin_groups": (_status, [_handle, c_bool]),
    "wps_options_set_message_retry": (_status, [_handle, c_uint32, c_uint64, c_uint64, c_uint32]),
    "wps_options_set_reconnect_retry": (_status, [_handle, c_uint32, c_uint64, c_uint64, c_uint32]),
    "wps_options_set_keep_alive": (_status, [_handle, c_uint64, c_uint64]),
    "wps_options_set_ack_timeout_ms": (_status, [_handle, c_uint64]),
    "wps_options_set_start_timeout_ms": (_status, [_handle, c_uint64]),
    "wps_options_set_recovery": (_status, [_handle, c_uint64, c_uint64]),
    "wps_options_set_sequence_ack_interval_ms": (_status, [_handle, c_uint64]),
    "wps_options_set_event_backlog_bytes": (_status, [_handle, c_size_t]),
    "wps_options_add_ca_pem": (_status, [_handle, _bytes, c_size_t]),
    # credential
    "wps_credential_result_set_url": (_status, [_handle, c_char_p]),
    "wps_credential_result_set_error": (_status, [_handle, c_char_p]),
    "wps_credential_result_defer": (_status, [_handle]),
    # client
    "wps_client_new": (
        _status,
        [c_char_p, _handle, EVENT_CB, c_void_p, USER_DATA_FREE_CB, POINTER(_handle)],
    ),
    "wps_client_new_with_credential": (
        _status,
        [
            CREDENTIAL_CB,
            c_void_p,
            USER_DATA_FREE_CB,
            _handle,
            EVENT_CB,
            c_void_p,
            USER_DATA_FREE_CB,
            POINTER(_handle),
        ],
    ),
    "wps_client_free": (None, [_handle]),
    "wps_client_start": (_status, [_handle]),
    "wps_client_stop": (_status, [_handle]),
    "wps_client_state": (c_uint32, [_handle]),
    "wps_client_connection_id": (_status, [_handle, c_void_p, c_size_t, POINTER(c_size_t)]),
    # blocking operations
    "wps_client_join_group": (_status, [_handle, c_char_p, _out_ack]),
    "wps_client_leave_group": (_status, [_handle, c_char_p, _out_ack]),
    "wps_client_send_to_group": (
        _status,
        [_handle, c_char_p, c_uint32, _bytes, c_size_t, c_uint32, _out_ack],
    ),
    "wps_client_send_event": (
        _status,
        [_handle, c_char_p, c_uint32, _bytes, c_size_t, c_uint32, _out_ack],
    ),
    "wps_client_invoke_event": (
        _status,
        [_handle, c_char_p, c_uint32, _bytes, c_size_t, c_uint64, POINTER(_handle)],
    ),
    "wps_invoke_response_data_type": (c_uint32, [_handle]),
    "wps_invoke_response_data": (c_void_p, [_handle, POINTER(c_size_t)]),
    "wps_invoke_response_free": (None, [_handle]),
    # asynchronous operations
    "wps_client_start_async": (_status, [_handle, COMPLETION_CB, c_void_p, _out_u64]),
    "wps_client_stop_async": (_status, [_handle, COMPLETION_CB, c_void_p, _out_u64]),
    "wps_client_join_group_async": (
        _status,
        [_handle, c_char_p, COMPLETION_CB, c_void_p, _out_u64],
    ),
    "wps_client_leave_group_async": (
        _status,
        [_handle, c_char_p, COMPLETION_CB, c_void_p, _out_u64],
    ),
    "wps_client_send_to_group_async": (
        _status,
        [_handle, c_char_p, c_uint32, _bytes, c_size_t, c_uint32, COMPLETION_CB, c_void_p, _out_u64],
    ),
    "wps_client_send_event_async": (
        _status,
        [_handle, c_char_p, c_uint32, _bytes, c_size_t, c_uint32, COMPLETION_CB, c_void_p, _out_u64],
    ),
    "wps_client_invoke_event_async": (
        _status,
        [_handle, c_char_p, c_uint32, _bytes, c_size_t, c_uint64, COMPLETION_CB, c_void_p, _out_u64],
    ),
    "wps_client_cancel": (_status, [_handle, c_uint64]),
    "wps_client_flush_deferred": (_status, [_handle]),
    # poll dispatch mode (callbacks run on the event loop's thread)
    "wps_options_set_dispatch_mode": (_status, [_handle, c_uint32]),
    "wps_client_dispatch_fd": (_status, [_handle, POINTER(c_int)]),
    "wps_client_dispatch": (_status, [_handle, c_size_t, POINTER(c_size_t)]),
    "wps_client_dispatch_into": (_status, [_handle, c_size_t, POINTER(WpsDispatchBuffers)]),
    "wps_client_dispatch_suspend": (_status, [_handle]),
    "wps_client_dispatch_resume": (_status, [_handle, _out_u64]),
    # logging
    "wps_set_log_callback": (_status, [LOG_CB, c_void_p, c_uint32]),
    "wps_callbacks_disable": (_status, [c_uint32]),
    "wps_set_thread_interrupt_check": (_status, [INTERRUPT_CB, c_uint32]),
    # caller-chosen ackIds and the user agent
    "wps_client_send_to_group_with_ack_id": (
        _status,
        [_handle, c_char_p, c_uint32, _bytes, c_size_t, c_uint32, c_uint64, _out_ack],
    ),
    "wps_client_send_event_with_ack_id": (
        _status,
        [_handle, c_char_p, c_uint32, _bytes, c_size_t, c_uint32, c_uint64, _out_ack],
    ),
    "wps_client_send_to_group_with_ack_id_async": (
        _status,
        [_handle, c_char_p, c_uint32, _bytes, c_size_t, c_uint32, c_uint64, COMPLETION_CB, c_void_p, _out_u64],
    ),
    "wps_client_send_event_with_ack_id_async": (
        _status,
        [_handle, c_char_p, c_uint32, _bytes, c_size_t, c_uint32, c_uint64, COMPLETION_CB, c_void_p, _out_u64],
    ),
    "wps_options_set_user_agent": (_status, [_handle, c_char_p]),
}

ENV_VAR = "WEBPUBSUB_CLIENT_LIB"


class LibraryNotFoundError(OSError):
    """The native library could not be found or loaded; the message lists every path tried."""


def _library_file_names() -> List[str]:
    if sys.platform == "win32":
        return ["webpubsub_client.dll"]
    if sys.platform == "darwin":
        return ["libwebpubsub_client.dylib"]
    return ["libwebpubsub_client.so"]


def _candidates() -> List[Path]:
    """Every path the loader tries, in order."""
    paths: List[Path] = []
    env = os.environ.get(ENV_VAR)
    if env:
        paths.append(Path(env))
    package_dir = Path(__file__).resolve().parent
    ext_suffix = sysconfig.get_config_var("EXT_SUFFIX") or ""
    # setuptools-rust names the copied library after the extension target.
    if ext_suffix:
        paths.append(package_dir / f"libwebpubsub_client{ext_suffix}")
    paths.extend(package_dir / name for name in _library_file_names())
    # A source checkout: bindings/python/webpubsub_client -> the repository root.
    repo_root = package_dir.parent.parent.parent
    if (repo_root / "Cargo.toml").is_file():
        target_dir = Path(os.environ.get("CARGO_TARGET_DIR", repo_root / "target"))
        for profile in ("release", "debug"):
            paths.extend(target_dir / profile / name for name in _library_file_names())
    return paths


def _declare(cdll: ctypes.CDLL, names: Iterable[str] = _SIGNATURES) -> None:
    """Declares the functions ``names`` (all by default) of ``cdll`` from ``_SIGNATURES``."""
    for name in names:
        restype, argtypes = _SIGNATURES[name]
        func = getattr(cdll, name)
        func.restype = restype
        func.argtypes = argtypes


def load_library() -> ctypes.CDLL:
    """Load the native library: ``$WEBPUBSUB_CLIENT_LIB``, the package folder, then ``target/``.

    Raises :class:`LibraryNotFoundError` listing every path tried (and why it failed).
    """
    tried: List[str] = []
    env_set = bool(os.environ.get(ENV_VAR))
    for index, path in enumerate(_candidates()):
        if not path.is_file():
            tried.append(f"{path} (not found)")
            if index == 0 and env_set:
                break
            continue
        try:
            cdll = ctypes.CDLL(str(path))
            _declare(cdll)
        except (OSError, AttributeError) as exc:
            tried.append(f"{path} ({exc})")
            if index == 0 and env_set:
                break
            continue
        return cdll
    hint = (
        f"${ENV_VAR} is set, so no other path was tried. "
        if env_set
        else f"Build it with `cargo build` at the repository root or set ${ENV_VAR}. "
    )
    raise LibraryNotFoundError(
        "webpubsub_client: cannot load the native library libwebpubsub_client. "
        + hint
        + "Tried:\n  "
        + "\n  ".join(tried)
    )


lib: ctypes.CDLL = load_library()


def _held_handle(names: List[str]) -> ctypes.PyDLL:
    """A second handle to the loaded library, through which ``names`` are called with the
    interpreter lock held (``PyDLL``), declared as on ``lib``."""
    held = ctypes.PyDLL(lib._name)
    _declare(held, names)
    return held


# The asynchronous sends, called with the interpreter lock held: they never wait (a full
# operation queue queues them further), their work is bounded by the message (a 1 MiB
# one is encoded in about a millisecond), and they run no callback (a poll-mode client's
# run in its dispatch), nor wait on a lock that a library thread holds while it calls
# into Python (the library's callbacks run without its locks, as any may call back into
# it). Releasing the lock for each of them let the thread that dispatches a sync client's
# completions take it: a hand-off, and a wait to get it back, per pipelined send.
lib_held = _held_handle(
    [
        "wps_client_send_to_group_async",
        "wps_client_send_to_group_with_ack_id_async",
        "wps_client_send_event_async",
        "wps_client_send_event_with_ack_id_async",
    ]
)


def name(pointer: Any, length: int) -> Optional[str]:
    """An id or name of ``wps_event`` (a ``char *`` and its length) as ``str``, whole;
    NULL gives None."""
    if not pointer:
        return None
    data: bytes = pointer[:length]
    return data.decode("utf-8", errors="replace")


def decode(value: Optional[bytes]) -> Optional[str]:
    """A borrowed C string (``c_char_p`` result) as ``str``; NULL gives None."""
    if value is None:
        return None
    return value.decode("utf-8", errors="replace")


def last_error_message() -> str:
    """The thread-local detail message of the last failure on this thread."""
    return decode(lib.wps_last_error_message()) or ""


def last_error_name() -> str:
    """The service error name of the last ack/invoke failure on this thread, or ``""``."""
    return decode(lib.wps_last_error_name()) or ""


def last_error_service_message() -> str:
    """The service's own text of the last ack/invoke failure on this thread, or ``""``."""
    return decode(lib.wps_last_error_service_message()) or ""


def status_str(status: int) -> str:
    """The library's static name of a status code."""
    return decode(lib.wps_status_str(status)) or f"status {status}"


def version() -> str:
    """The native library's version string."""
    return decode(lib.wps_version()) or ""
