"""The C callback trampolines and the table of Python objects behind their ``user_data``.

One module-level ``CFUNCTYPE`` object per callback type. ``user_data`` is never a
Python pointer: it is an integer key into :data:`REGISTRY`, a thread-safe table that
holds the Python side (an event sink, a credential provider, a completion handler)
until the library's ``user_data_free`` finalizer (or a one-shot completion) drops it.
No exception ever crosses into C: each trampoline catches and logs everything.
"""

from __future__ import annotations

import ctypes
import functools
import itertools
import logging
import threading
from typing import Any, Callable, Dict, Iterator, List, Optional, Set, cast

from . import _native
from ._native import lib

_LOGGER = logging.getLogger("webpubsub_client")
NATIVE_LOGGER = logging.getLogger("webpubsub_client.native")


class Registry:
    """Thread-safe table from integer keys (passed to C as ``user_data``) to Python objects.

    Needs no lock of its own: ``next`` on the key counter and each dict operation are
    single, atomic steps under the interpreter lock.
    """

    def __init__(self) -> None:
        self._items: Dict[int, Any] = {}
        self._keys = itertools.count(1)
        # ``get(key)``: the object stored under ``key``, or None (also for a None key).
        # The dict's own method, not a wrapper: one Python call less on every event.
        self.get = cast(Callable[[Optional[int]], Any], self._items.get)
        # ``take(key, None)``: remove and return what is stored under ``key`` (the
        # dict's own ``pop``, for the same reason: it runs once per acked send).
        self.take = cast(Callable[[int, None], Any], self._items.pop)

    def add(self, obj: Any) -> int:
        """Store ``obj`` and return its key (never 0, so it is never a NULL pointer)."""
        key = next(self._keys)
        self._items[key] = obj
        return key

    def pop(self, key: Optional[int]) -> Any:
        """Remove and return the object stored under ``key`` (None when absent)."""
        if key is None:
            return None
        return self._items.pop(key, None)

    def drop_where(self, predicate: Callable[[Any], bool]) -> None:
        """Remove every object for which ``predicate`` is true. A scan of the whole table,
        for rare clean-ups only; safe alongside the other operations (a key taken
        meanwhile is skipped)."""
        for key, obj in list(self._items.items()):
            if predicate(obj):
                self._items.pop(key, None)

    def __len__(self) -> int:
        return len(self._items)


REGISTRY = Registry()


def user_data(key: int) -> ctypes.c_void_p:
    """A registry key as the ``void *user_data`` argument."""
    return ctypes.c_void_p(key)


class Completion:
    """A Python copy of the borrowed ``wps_completion`` struct."""

    __slots__ = (
        "status",
        "op_id",
        "ack_id",
        "is_duplicated",
        "error_name",
        "error_message",
        "service_message",
        "data_type",
        "data",
    )

    def __init__(self, raw: _native.WpsCompletion) -> None:
        self.status: int = raw.status
        self.op_id: int = raw.op_id
        self.ack_id: Optional[int] = raw.ack_id if raw.has_ack_id else None
        self.is_duplicated: bool = bool(raw.is_duplicated)
        self.error_name = self.error_message = self.service_message = ""
        if self.status != _native.STATUS_OK:  # all three are NULL on success
            self.error_name = _native.decode(raw.error_name) or ""
            self.error_message = _native.decode(raw.error_message) or ""
            self.service_message = _native.decode(raw.service_message) or ""
        self.data_type: int = raw.data_type
        size = raw.data_len
        self.data: bytes = ctypes.string_at(raw.data, size) if size else b""


_gil_state_ensure = ctypes.pythonapi.PyGILState_Ensure
_gil_state_ensure.argtypes = []
_gil_state_ensure.restype = ctypes.c_int
_kept_threads: Set[int] = set()


def keep_thread_state() -> None:
    """Keep this thread's Python thread state from one callback to the next.

    A ctypes callback on a thread that Python did not start (the library's dispatcher
    threads) gets a new thread state for each call and frees it on return: two system
    calls (the frame stack's ``mmap``/``munmap``) and more than half the cost of a small
    event. One ``PyGILState_Ensure`` that is never released keeps it. The dispatcher
    threads are a fixed pool of at most four, so at most that many states are kept;
    on a Python thread the extra count is harmless (the state ends with the thread).
    """
    ident = threading.get_ident()
    if ident not in _kept_threads:
        _kept_threads.add(ident)
        _gil_state_ensure()


def _on_event(key: Optional[int], event: Any) -> None:
    # Only ever inside a dispatch of a client in poll mode, on a Python thread: a sync
    # client's dispatcher thread, an asyncio client's event loop.
    try:
        sink = REGISTRY.get(key)
        if sink is not None:
            sink.on_native_event(event.contents)
    except BaseException:  # noqa: BLE001 - nothing may propagate into C
        _LOGGER.exception("error while handling an event")


def _on_free(key: Optional[int]) -> None:
    try:
        REGISTRY.pop(key)
    except BaseException:  # noqa: BLE001
        _LOGGER.exception("error while releasing callback data")


def _on_credential(key: Optional[int], result: Optional[int]) -> None:
    # On a library thread, where no application code may run (see `quiesce_native`): the
    # answer is deferred, and the client's request handler only starts the provider
    # elsewhere (a daemon thread of the sync client, the asyncio client's loop), which
    # answers from there with `answer_credential`.
    try:
        request: Optional[Callable[[int], None]] = REGISTRY.get(key)
        if request is None:
            raise RuntimeError("the credential provider was released")
        if lib.wps_credential_result_defer(result) != _native.STATUS_OK:
            raise RuntimeError(f"cannot defer the credential: {_native.last_error_message()}")
        request(cast(int, result))
    except BaseException as exc:  # noqa: BLE001 - nothing may propagate into C
        try:
            answer_credential(result, None, exc)
        except BaseException:  # noqa: BLE001
            _LOGGER.exception("cannot report the credential error")


def credential_error_text(error: BaseException) -> str:
    """What the library is told of a credential's ``error``: its type's name and its text."""
    return f"{type(error).__name__}: {error}".replace("\0", " ")


def answer_credential(result: Optional[int], url: Any, error: Optional[BaseException] = None) -> None:
    """Answer the credential request ``result`` with ``url``, a str without NUL (anything
    else is an error), or with ``error``. A request no longer pending (its connection
    attempt timed out, or the client stopped) refuses the answer: logged at debug level."""
    if error is None:
        try:
            if not isinstance(url, str):
                raise TypeError(f"the credential must return a str URL, got {type(url).__name__}")
            if "\0" in url:
                raise ValueError("the URL returned by the credential contains a NUL character")
            status = lib.wps_credential_result_set_url(result, url.encode("utf-8"))
        except Exception as exc:  # noqa: BLE001 - reported as the credential's error
            error = exc
    if error is not None:
        _LOGGER.warning("the credential failed: %r", error)
        message = credential_error_text(error)
        status = lib.wps_credential_result_set_error(result, message.encode("utf-8", errors="replace"))
    if status != _native.STATUS_OK:
        _LOGGER.debug("the credential's answer came too late: %s", _native.last_error_message())


def _on_completion(key: Optional[int], completion: Any) -> None:
    try:
        keep_thread_state()
        handler = REGISTRY.pop(key)
        if handler is not None:
            handler(Completion(completion.contents))
    except BaseException:  # noqa: BLE001
        _LOGGER.exception("error while completing an operation")


_CRATE = "webpubsub_client::"  # how the library's log targets begin

_PY_LEVELS = {
    _native.LOG_ERROR: logging.ERROR,
    _native.LOG_WARN: logging.WARNING,
    _native.LOG_INFO: logging.INFO,
    _native.LOG_DEBUG: logging.DEBUG,
    _native.LOG_TRACE: 5,
}


def _on_log(_key: Optional[int], level: int, target: Optional[bytes], message: Optional[bytes]) -> None:
    try:
        source = _native.decode(target) or ""
        if level >= _native.LOG_TRACE and source.startswith("tungstenite"):
            return  # the WebSocket library's trace records print frame payloads (reconnection tokens)
        py_level = _PY_LEVELS.get(level, logging.DEBUG)
        if NATIVE_LOGGER.isEnabledFor(py_level):
            # the library's module without its crate, which the logger's name already gives
            NATIVE_LOGGER.log(py_level, "[%s] %s", source.removeprefix(_CRATE), _native.decode(message))
    except BaseException:  # noqa: BLE001
        pass  # logging failed; there is nowhere left to report it


# The one C function pointer per callback type; module globals, so never collected.
EVENT_TRAMPOLINE = _native.EVENT_CB(_on_event)
FREE_TRAMPOLINE = _native.USER_DATA_FREE_CB(_on_free)
CREDENTIAL_TRAMPOLINE = _native.CREDENTIAL_CB(_on_credential)
COMPLETION_TRAMPOLINE = _native.COMPLETION_CB(_on_completion)
LOG_TRAMPOLINE = _native.LOG_CB(_on_log)

_log_lock = threading.Lock()
_log_level = 0


def _native_level_for(py_level: int, trace: bool) -> int:
    if trace or py_level <= 5:
        return _native.LOG_TRACE
    if py_level <= logging.DEBUG:
        return _native.LOG_DEBUG
    if py_level <= logging.INFO:
        return _native.LOG_INFO
    if py_level <= logging.WARNING:
        return _native.LOG_WARN
    return _native.LOG_ERROR


def enable_native_logging(trace: bool = False) -> None:
    """Route the library's logs into the ``webpubsub_client.native`` logger.

    The native filter follows the logger's effective level when called (``trace``
    forces every level); it only ever widens, so a later, quieter client does not
    silence an earlier one. Python's own filtering still applies to each record.
    """
    global _log_level  # noqa: PLW0603 - process-wide, like the C function it wraps
    wanted = _native_level_for(NATIVE_LOGGER.getEffectiveLevel(), trace)
    with _log_lock:
        if wanted <= _log_level:
            return
        status = lib.wps_set_log_callback(LOG_TRAMPOLINE, None, wanted)
        if status == _native.STATUS_OK:
            _log_level = wanted
        else:
            _LOGGER.warning(
                "cannot install the log callback: %s: %s",
                _native.status_str(status),
                _native.last_error_message(),
            )


# How long the exit hook waits for the callbacks running on library threads.
_QUIESCE_MS = 2000


def quiesce_native() -> None:
    """At interpreter exit, before Python tears down: the library's logs stop, then every
    callback of the library for good, once the running ones have returned (waited for up
    to ``_QUIESCE_MS``). A thread that entered Python from inside the library during its
    finalization would be stopped there (Python ends such threads with ``pthread_exit``),
    which aborts the process. No application code runs in such a callback, so none is
    waited for here: the listeners run once the library's dispatch has returned (the sync
    client's, see :mod:`._dispatcher`; the asyncio client's, on its loop, see
    ``_Poller.dispatch``), and a credential provider runs after the credential callback
    has deferred its answer and returned (the sync client's on a daemon thread of its
    own, the asyncio client's on its loop), answering from there. One still running at
    exit is ended as any daemon thread is (a pending request is abandoned)."""
    global _log_level  # noqa: PLW0603
    with _log_lock:
        lib.wps_set_log_callback(_native.LOG_CB(), None, 0)
        _log_level = 0
    if lib.wps_callbacks_disable(_QUIESCE_MS) != _native.STATUS_OK:
        _LOGGER.warning("a callback still ran at exit: %s", _native.last_error_message())


# Signals during a blocking call of the main thread. Python runs signal handlers on its
# main thread only, between bytecodes, so none would run while that thread waits in the
# library. The main thread therefore has an interrupt check of its own
# (`wps_set_thread_interrupt_check`), asked every INTERRUPT_CHECK_MS while it waits,
# which runs the handlers of the signals received meanwhile, as Python would between
# bytecodes. A handler that returns (a graceful-shutdown flag, an event loop's
# add_signal_handler) lets the wait go on; the exception of one that raises (the default
# SIGINT handler's KeyboardInterrupt, sys.exit's SystemExit) is kept, the check ends the
# wait, and the call raises it (`raise_interrupt`).
#
# The check is a generator's: Python runs pending handlers at the first bytecode of a
# call, where a plain function has entered no try yet (an exception raised there is lost
# in the ctypes callback), while a generator resumes inside its try. Once a handler has
# raised, Python runs the next pending one at the next jump, on the way out of the try
# that caught it: with two signals at once (SIGINT and SIGTERM), so that try sits in
# another. A third handler raising at the same check ends the generator, its exception
# lost; the next blocking call installs a new one. The library never asks the check from
# inside itself: a blocking call a handler makes waits unchecked.
#
# Only the main interpreter installs it: signal handlers run in that one alone, and a
# sub-interpreter's check, on the same thread, would take the place of its own (the
# library keeps one check per thread, not per interpreter).
INTERRUPT_CHECK_MS = 50
_check_signals = ctypes.pythonapi.PyErr_CheckSignals
_check_signals.restype = ctypes.c_int
_check_signals.argtypes = []
_interpreter_state = ctypes.PYFUNCTYPE(ctypes.c_void_p)  # a C function returning a PyInterpreterState *
_IN_MAIN_INTERPRETER = (
    _interpreter_state(("PyInterpreterState_Get", ctypes.pythonapi))()
    == _interpreter_state(("PyInterpreterState_Main", ctypes.pythonapi))()
)
_raised: List[Optional[BaseException]] = [None]  # the exception a handler raised in the check
_checks: List[Any] = []  # every check made (generator, callback): a wait may still ask one
_main_check_missing = True  # not yet installed on the main thread


def _signal_checks() -> Iterator[int]:
    """The main thread's interrupt check: 1 once a handler has raised (the last one to
    raise is kept in _raised, as Python raises the last). Once ended, the next blocking
    call installs a new one."""
    global _main_check_missing  # noqa: PLW0603
    interrupted = 0
    try:
        while True:
            try:
                while True:  # the loop's own bytecodes stay inside the outer try
                    try:
                        while True:  # the loop's own bytecodes stay inside the inner try
                            yield interrupted
                            interrupted = 0
                            _check_signals()
                    except GeneratorExit:  # closed (interpreter exit)
                        return
                    except BaseException as error:  # noqa: BLE001  # pylint: disable=broad-exception-caught
                        _raised[0] = error
                        interrupted = 1
            except BaseException as error:  # noqa: BLE001  # pylint: disable=broad-exception-caught
                _raised[0] = error  # a second handler's, run on the way out of the inner try
                interrupted = 1
    finally:
        _main_check_missing = True


def install_main_check() -> None:
    """Install the interrupt check, if this thread is the main thread of the main
    interpreter (called at import, by a blocking call of the main thread when imported on
    another one, and in a child of ``fork()``, whose forking thread is its main thread)."""
    global _main_check_missing  # noqa: PLW0603
    if threading.current_thread() is not threading.main_thread() or not _IN_MAIN_INTERPRETER:
        return
    checks = _signal_checks()
    next(checks)  # runs to its first yield, inside the try
    callback = _native.INTERRUPT_CB(functools.partial(next, checks, 0))  # ended: 0, no StopIteration
    _checks.append((checks, callback))
    if lib.wps_set_thread_interrupt_check(callback, INTERRUPT_CHECK_MS) != _native.STATUS_OK:
        _LOGGER.warning("cannot install the interrupt check: %s", _native.last_error_message())
    _main_check_missing = False


def ensure_main_check() -> None:
    """Called before a blocking call: install the check if this is the main thread and the
    module was imported on another one, or the check has ended."""
    if _main_check_missing:
        install_main_check()


def raise_interrupt() -> None:
    """A blocking call of the main thread returned STATUS_INTERRUPTED, or a stop (which
    the check does not end) returned: raise the exception a signal handler raised in the
    check. Returns when there is none (after an interrupted call: the check itself failed,
    and the caller reports the interrupted operation)."""
    error, _raised[0] = _raised[0], None
    if error is not None:
        try:
            raise error
        finally:
            del error  # no cycle through this frame, which the traceback holds: it holds the caller
