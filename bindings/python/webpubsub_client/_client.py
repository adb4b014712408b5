"""The synchronous client, with the API of ``azure.messaging.webpubsubclient.WebPubSubClient``."""

from __future__ import annotations

import concurrent.futures
import ctypes
import logging
import threading
import time
import weakref
from typing import Any, Callable, Dict, List, Literal, Optional, Protocol, Set, Tuple, Union, overload

from . import _base, _callbacks, _dispatcher, _futures, _native
from ._callbacks import REGISTRY
from ._native import lib
from .models import (
    CallbackType,
    InvokeEventResult,
    OnConnectedArgs,
    OnDisconnectedArgs,
    OnGroupDataMessageArgs,
    OnRejoinGroupFailedArgs,
    OnServerDataMessageArgs,
    OpenClientError,
    RetryMode,
    WebPubSubClientError,
    WebPubSubClientState,
    WebPubSubDataType,
    WebPubSubProtocolType,
    WebPubSubResult,
)

__all__ = ["WebPubSubClient", "WebPubSubClientCredential"]

_LOGGER = logging.getLogger("webpubsub_client")


class WebPubSubClientCredential:
    """Where the client gets its URL: a fixed client access URL, or a callable returning one.

    A callable is called (on a daemon thread of the package) before every *new*
    connection, so short-lived tokens are refreshed; a recovery of the same connection
    reuses the URL.

    :param client_access_url_provider: ``wss://.../client/hubs/{hub}?access_token=...``, or a
        callable taking no argument that returns such a URL.
    """

    def __init__(self, client_access_url_provider: Union[str, Callable[[], str]]) -> None:
        if isinstance(client_access_url_provider, str):
            _base.check_url(client_access_url_provider, "client_access_url_provider")
            url = client_access_url_provider
            self._client_access_url_provider: Callable[[], str] = lambda: url
        elif callable(client_access_url_provider):
            self._client_access_url_provider = client_access_url_provider
        else:
            raise TypeError(
                "client_access_url_provider must be a str or a callable returning a str, "
                f"got {type(client_access_url_provider).__name__}"
            )

    def get_client_access_url(self) -> str:
        """Return the client access URL (calls the provider)."""
        return self._client_access_url_provider()


class _HasClientAccessUrl(Protocol):
    """A credential of another kind that the client takes: an object with this method,
    such as the official package's ``WebPubSubClientCredential``."""

    def get_client_access_url(self) -> str: ...


class _Provider:
    """The application's URL provider as the library asks it: each request runs it on a
    daemon thread of its own, never on the library's thread (see
    :func:`._callbacks.quiesce_native`), which answers the request from there. Keeps what
    it raised: :meth:`WebPubSubClient.open` raises that exception itself, as the official
    ``open()`` (which calls the provider on the caller's thread) does. Holds no reference
    to the client."""

    def __init__(self, provider: Callable[[], str]) -> None:
        self.provider = provider
        # What the provider of the latest request raised, and that request's token: an
        # abandoned request that raises later must not stand for the next one. A
        # SystemExit or KeyboardInterrupt too: the official open() raises it (the program exits).
        self.error: Optional[BaseException] = None
        self._latest: Optional[int] = None
        self._lock = threading.Lock()
        self.failures = _base.ProviderErrors()  # for the stopped events' errors

    def __call__(self, result: int) -> None:
        with self._lock:
            self._latest, self.error = result, None
        try:
            threading.Thread(target=self._answer, args=(result,), name="webpubsub-credential", daemon=True).start()
        except RuntimeError as exc:  # refused (the thread limit): not the provider's own error
            refused = WebPubSubClientError(f"cannot start the credential provider's thread: {exc}")
            refused.__cause__ = exc
            self._fail(result, refused)

    def _answer(self, result: int) -> None:
        try:
            url = self.provider()
        except BaseException as exc:  # noqa: BLE001 - answered, and raised by open() if it is its request
            self._fail(result, exc)
            return
        _callbacks.answer_credential(result, url)

    def _fail(self, result: int, error: BaseException) -> None:
        """Answer request ``result`` with ``error``, kept for open() if it is the latest."""
        with self._lock:
            if result == self._latest:
                self.error = error
            self.failures.add(error)
        _callbacks.answer_credential(result, None, error)


# What a client's dispatch takes, in order: an event (its callback type and listener
# arguments), or ``(None, (future, outcome))``, a pipelined send's outcome that came
# through its completion callback (see :mod:`._futures`).
_Taken = Tuple[Optional[CallbackType], Tuple[Any, ...]]


class _SyncSink:
    """A client's events on their way to its listeners: converted by the event callback
    during the client's dispatch, then delivered by its worker thread (see
    :mod:`._dispatcher`), once the dispatch has returned, in order, with the outcomes of
    the pipelined sends that came among them."""

    def __init__(self, listeners: _base.Listeners, provider: Optional[_Provider]) -> None:
        self.listeners = _base.HeldListeners(listeners)
        self._provider = provider
        self._events: List[_Taken] = []
        self.stop_error: Optional[WebPubSubClientError] = None  # see WebPubSubClient.stop_error

    def on_native_event(self, event: _native.WpsEvent) -> None:
        converted = _base.event_args(event)
        if converted is not None:
            if converted[0] is _STOPPED and self._provider is not None:
                self._provider.failures.chain(converted[1][0])
            self._events.append(converted)

    def defer(self, future: _futures.SendFuture, outcome: Union[WebPubSubResult, Exception]) -> None:
        """A pipelined send's outcome, from its completion callback during the dispatch:
        settled in its place among the events."""
        self._events.append((None, (future, outcome)))

    def take(self) -> List[_Taken]:
        """The events the event callback converted, and the outcomes deferred, since the last call."""
        events, self._events = self._events, []
        return events

    def deliver(self, events: List[_Taken], dispatch: _dispatcher.Dispatch) -> None:
        """Calls the listeners of each event in turn, and settles the futures among them;
        no listener runs once the client is freed, but the futures still settle."""
        listeners = self.listeners.get()
        snapshot = None if listeners is None else listeners.snapshot  # None: collected, being freed
        for kind, args in events:
            if kind is None:
                _futures.settle_one(*args)
                continue
            if snapshot is None or not dispatch.handle:  # collected, or freed by a listener
                continue
            stopped = kind is _STOPPED
            if stopped:
                self.stop_error, args = args[0], ()
            elif kind is _CONNECTED:  # a new run's: a stop delivered since open() began was an earlier run's
                self.stop_error = None
            for listener in snapshot(kind):
                try:
                    listener(*args)
                except BaseException:  # noqa: BLE001 - a listener's error must not stop the others
                    # SystemExit and KeyboardInterrupt too: in the official client they end only
                    # the listener's own thread, and here there is no caller to raise them to.
                    _base.log_listener_error(kind)
            if stopped:
                with dispatch.lock:  # the handle is read: not during its free
                    if dispatch.handle:
                        self.listeners.release_if_stopped()


_STOPPED = CallbackType.STOPPED
_CONNECTED = CallbackType.CONNECTED
CLOSE_WAIT = 1.0  # seconds close() waits for the listeners of the events before it


# The C forms (plain, with_ack_id) of each send, looked up once.
_GROUP_FORMS = (lib.wps_client_send_to_group, lib.wps_client_send_to_group_with_ack_id)
_EVENT_FORMS = (lib.wps_client_send_event, lib.wps_client_send_event_with_ack_id)
# The asynchronous forms (plain, with_ack_id) of each send, for the pipelined sends, called
# with the interpreter lock held (see ``_native.lib_held``).
_HELD = _native.lib_held
_GROUP_ASYNC_FORMS = (_HELD.wps_client_send_to_group_async, _HELD.wps_client_send_to_group_with_ack_id_async)
_EVENT_ASYNC_FORMS = (_HELD.wps_client_send_event_async, _HELD.wps_client_send_event_with_ack_id_async)
_COMPLETION = _futures.COMPLETION_TRAMPOLINE


class WebPubSubClient:  # pylint: disable=too-many-instance-attributes
    """A Web PubSub client: ``open()``, join groups, send, receive through ``subscribe``.

    :param credential: the client access URL, or a :class:`WebPubSubClientCredential` (or
        another object with its ``get_client_access_url()`` method, such as the official
        package's credential).
    :keyword protocol_type: ``WebPubSubProtocolType.JSON_RELIABLE`` (default) or ``JSON``.
    :keyword bool auto_rejoin_groups: rejoin the joined groups on every new connection: after a
        reconnect, and on an ``open()`` after a ``close()`` (default True).
    :keyword int message_retry_total: retries of an operation whose ack timed out or was
        ``InternalServerError`` (default 3); a retry keeps its ackId. Other failures
        (``Forbidden``, ``BadRequest``, not connected) are not retried.
    :keyword float message_retry_backoff_factor: first retry delay in seconds (default 0.8).
    :keyword float message_retry_backoff_max: longest retry delay in seconds (default 120).
    :keyword message_retry_mode: ``RetryMode.Exponential`` (default; delay doubles per
        attempt) or ``RetryMode.Fixed``; azure.core's ``RetryMode`` works too.
    :keyword int reconnect_retry_total: retries of a failed attempt to open a new
        connection after the session is lost (default 3: four attempts); 0 disables
        automatic reconnect, unless ``auto_reconnect=True`` (then one attempt).
    :keyword float reconnect_retry_backoff_factor: as for messages (default 0.8).
    :keyword float reconnect_retry_backoff_max: as for messages (default 120).
    :keyword reconnect_retry_mode: as for messages (default exponential).
    :keyword float ack_timeout: seconds to wait for the service's ack (default 30), from
        each attempt's write. It runs on during a recovery, from the call for an operation
        made meanwhile, and a resend after a recovery does not restart it: no call waits
        for a recovery longer than for its acks.
    :keyword float start_timeout: seconds ``open()`` waits for the connection (default 30).
    :keyword bool logging_enable: log every outgoing message at debug level on the
        ``webpubsub_client`` logger, as the official client does, and also pass the
        library's trace-level logs (Python level 5) to the ``webpubsub_client.native``
        logger (default False).
    :keyword str user_agent: a prefix for the User-Agent header.

    Additions to the official client:

    :keyword bool auto_reconnect: open a new connection when the session is lost
        (default: ``reconnect_retry_total > 0``).
    :keyword float keep_alive_interval: seconds between keep-alive pings; 0 disables (default 20).
    :keyword float keep_alive_timeout: close and recover when nothing arrives for this
        long; 0 disables (default 120). Longer than ``keep_alive_interval`` when both are set.
    :keyword float recovery_timeout: how long a reliable connection tries to recover
        (default 30).
    :keyword float recovery_retry_interval: delay between recovery attempts (default 1).
    :keyword float sequence_ack_interval: how often delivered sequence ids are
        acknowledged (default 1).
    :keyword int event_backlog_bytes: how many bytes of received messages may wait for
        the listeners before the client stops reading its connection, until they are
        down to half (default 64 MiB; 0: no limit). The service holds the messages
        meanwhile; a blocking call of the client lets reading go on until it returns.
    :keyword ca_pem: extra trusted root certificate(s), PEM text, for ``wss://``.

    Keyword arguments that the official client takes in ``**kwargs`` without using them
    (azure-core's per-call options, a misspelt name) are ignored as there, each name logged
    once per method at debug level; an operation's ``logging_enable=True`` logs its
    outgoing message at debug level.

    Listeners run on a daemon thread of the package, one event at a time and in order;
    they may call any method of the client (a listener sending a message is fine). Keep
    them short: clients share a small pool of such threads.

    :meth:`begin_send_to_group` and :meth:`begin_send_event` (additions too) return at
    once a future of the send's outcome: many acked messages in flight without a thread each.
    """

    def __init__(
        self,
        credential: Union[WebPubSubClientCredential, str, _HasClientAccessUrl],
        *,
        protocol_type: Union[WebPubSubProtocolType, str] = WebPubSubProtocolType.JSON_RELIABLE,
        auto_rejoin_groups: bool = True,
        auto_reconnect: Optional[bool] = None,
        message_retry_total: int = _base.DEFAULT_RETRY_TOTAL,
        message_retry_backoff_factor: float = _base.DEFAULT_RETRY_BACKOFF_FACTOR,
        message_retry_backoff_max: float = _base.DEFAULT_RETRY_BACKOFF_MAX,
        message_retry_mode: Union[RetryMode, str] = RetryMode.Exponential,
        reconnect_retry_total: int = _base.DEFAULT_RETRY_TOTAL,
        reconnect_retry_backoff_factor: float = _base.DEFAULT_RETRY_BACKOFF_FACTOR,
        reconnect_retry_backoff_max: float = _base.DEFAULT_RETRY_BACKOFF_MAX,
        reconnect_retry_mode: Union[RetryMode, str] = RetryMode.Exponential,
        ack_timeout: float = _base.DEFAULT_ACK_TIMEOUT,
        start_timeout: float = _base.DEFAULT_START_TIMEOUT,
        keep_alive_interval: float = _base.DEFAULT_KEEP_ALIVE_INTERVAL,
        keep_alive_timeout: float = _base.DEFAULT_KEEP_ALIVE_TIMEOUT,
        recovery_timeout: float = _base.DEFAULT_RECOVERY_TIMEOUT,
        recovery_retry_interval: float = _base.DEFAULT_RECOVERY_RETRY_INTERVAL,
        sequence_ack_interval: float = _base.DEFAULT_SEQUENCE_ACK_INTERVAL,
        event_backlog_bytes: int = _base.DEFAULT_EVENT_BACKLOG_BYTES,
        ca_pem: Optional[Union[str, bytes, bytearray, memoryview]] = None,
        logging_enable: bool = False,
        user_agent: Optional[str] = None,
        **kwargs: Any,
    ) -> None:
        if kwargs:
            _base.ignore_keywords("WebPubSubClient", kwargs)
        self._provider: Optional[_Provider] = None
        if isinstance(credential, str):
            source: Union[str, Callable[[int], None]] = credential
        elif _base.is_credential(credential):
            self._provider = _Provider(credential.get_client_access_url)
            source = self._provider
        else:
            raise TypeError(f"credential must be a str or WebPubSubClientCredential, got {type(credential).__name__}")
        options = _base.Options(
            protocol_type=protocol_type,
            auto_rejoin_groups=auto_rejoin_groups,
            auto_reconnect=auto_reconnect,
            message_retry_total=message_retry_total,
            message_retry_backoff_factor=message_retry_backoff_factor,
            message_retry_backoff_max=message_retry_backoff_max,
            message_retry_mode=message_retry_mode,
            reconnect_retry_total=reconnect_retry_total,
            reconnect_retry_backoff_factor=reconnect_retry_backoff_factor,
            reconnect_retry_backoff_max=reconnect_retry_backoff_max,
            reconnect_retry_mode=reconnect_retry_mode,
            ack_timeout=ack_timeout,
            start_timeout=start_timeout,
            keep_alive_interval=keep_alive_interval,
            keep_alive_timeout=keep_alive_timeout,
            recovery_timeout=recovery_timeout,
            recovery_retry_interval=recovery_retry_interval,
            sequence_ack_interval=sequence_ack_interval,
            event_backlog_bytes=event_backlog_bytes,
            ca_pem=ca_pem,
            logging_enable=logging_enable,
            user_agent=user_agent,
        )
        self._log_messages = options.logging_enable
        # The open() calls running, each one's thread by an object of its own: see close().
        self._openers: Dict[object, int] = {}
        self._opening = threading.Condition()
        self._listeners = _base.Listeners()
        self._sink = _SyncSink(self._listeners, self._provider)
        self._handle = _base.new_native_client(source, options, self._sink)
        self._sink.listeners.handle = self._handle
        try:
            self._dispatch = _dispatcher.Dispatch(self._handle, self._sink, self)
        except BaseException:
            _base.free_client(self._handle)
            raise
        self._finalizer = weakref.finalize(self, self._dispatch.free)

    # ---- lifecycle ---------------------------------------------------------------

    def open(self) -> None:
        """Connect to the service; returns once connected. On the main thread, signal
        handlers run while it waits; the exception one raises (Ctrl-C's KeyboardInterrupt)
        ends the wait and stops the client.

        :raises OpenClientError: the client is not stopped (already open or opening), or
            the connection failed within ``start_timeout``.

        An exception that the credential's provider raised is raised as it is, as in the
        official client.
        """
        handle = self._live_handle()
        call = object()
        with self._opening:  # before the state is read (see close)
            self._openers[call] = threading.get_ident()
        try:
            self._open(handle)
        finally:
            with self._opening:
                del self._openers[call]
                self._opening.notify_all()

    def _open(self, handle: int) -> None:
        """open(), once its call is recorded."""
        if _base.state_of(handle) is not WebPubSubClientState.STOPPED:
            raise OpenClientError("Client can be only started when it's Stopped")
        provider = self._provider
        if provider is not None:
            provider.error = None
        self._sink.stop_error = None  # it tells why the latest run stopped
        # The logger's level may have been set since the client was made (logging
        # configured after an import-time client): the library's filter follows it now.
        _callbacks.enable_native_logging(trace=self._log_messages)
        self._sink.listeners.hold(self)
        try:
            status = lib.wps_client_start(self._blocking_handle())
            message = None if status == _native.STATUS_OK else _native.last_error_message()
            if status == _native.STATUS_INTERRUPTED:  # a signal handler raised; the start goes on
                lib.wps_client_stop(handle)
                _callbacks.raise_interrupt()
        except BaseException:
            # Raised in the wait or just after it (the official open() is then given up
            # too): the client is left stopped, not connecting or connected.
            lib.wps_client_stop(handle)
            raise
        finally:
            # Again after the start: a stopped event of an earlier run, delivered while this
            # one started, may have let the listeners go.
            self._sink.listeners.hold(self)
            self._sink.listeners.release_if_stopped()
        if status != _native.STATUS_OK:
            if status == _native.STATUS_CREDENTIAL_FAILED and provider is not None and provider.error is not None:
                error, provider.error = provider.error, None
                provider.failures.forget(error)
                raise error
            raise _base.open_error(status, message)

    def close(self) -> None:
        """Stop the client and close the connection. Returns once the client is stopped and
        the listeners of the events that came before, its ``disconnected`` and ``stopped``
        events (or those of a stop on its own) included, have run, and the futures of the
        sends begun before it (:meth:`begin_send_to_group`) are settled, so that a program
        may exit right after. It waits at most 1 s for them, and not at all on the thread
        that runs them (called by a listener, they run once it has returned; no event comes
        after them). A signal handler that raises while it waits (on the main thread: Ctrl-C's
        KeyboardInterrupt) has its exception raised once the client is stopped, with no
        further wait for the listeners. An ``open()`` running on another thread meanwhile
        leaves the client stopped too: it raises OpenClientError, unless it connected first.
        In a fork() child it does nothing: the client and its connection are the parent's."""
        if not self._finalizer.alive or self._dispatch.in_fork_child():
            return
        thread = threading.get_ident()
        with self._opening:  # not this thread's: a signal handler run by its open() closes
            racing = {call for call, opener in self._openers.items() if opener != thread}
        # Asked of a stopped client too: the library sets the state before it queues the
        # stopped event, and answers a stop only after that.
        status = lib.wps_client_stop(self._blocking_handle())
        if racing:
            status = self._stop_racing_starts(racing, status)
        # The stop runs the signal handlers as it waits, and never ends half done.
        _callbacks.raise_interrupt()
        if status not in (_native.STATUS_OK, _native.STATUS_ILLEGAL_STATE):
            _base.check_status(status)
        # The stop's events are queued by now, behind those of any earlier stop.
        self._dispatch.wait_delivered(CLOSE_WAIT)

    def _stop_racing_starts(self, racing: Set[object], status: int) -> int:
        """After close()'s stop, the ``racing`` open() calls (running on other threads when
        close() began) may hand their start to the library, which then connects: each is
        waited for until it has ended or handed its start over (the state is no longer
        Stopped), and such a start is stopped in turn. At most ``CLOSE_WAIT``: an open()
        blocks on nothing before the hand-over. The status of the last stop."""
        deadline = time.monotonic() + CLOSE_WAIT
        while True:
            with self._opening:
                while not racing.isdisjoint(self._openers) and self.state is WebPubSubClientState.STOPPED:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._opening.wait(min(remaining, 0.001))  # the hand-over notifies nothing
            if self.state is WebPubSubClientState.STOPPED:
                return status
            status = lib.wps_client_stop(self._handle)
            if time.monotonic() > deadline:
                return status

    def is_connected(self) -> bool:
        """True while the client has an open connection (not while recovering or reconnecting)."""
        return self._finalizer.alive and _base.state_of(self._handle) is WebPubSubClientState.CONNECTED

    @property
    def state(self) -> WebPubSubClientState:
        """The client's state: Stopped, Connecting, Connected, Recovering or Disconnected."""
        if not self._finalizer.alive:
            return WebPubSubClientState.STOPPED
        return _base.state_of(self._handle)

    @property
    def connection_id(self) -> Optional[str]:
        """The id of the current connection, or None when there is none."""
        if not self._finalizer.alive:
            return None
        return _base.connection_id_of(self._handle)

    @property
    def stop_error(self) -> Optional[WebPubSubClientError]:
        """Why the client stopped on its own, as of its latest ``stopped`` event (set before
        that event's listeners run, which take no argument, as in the official client): an
        :class:`OpenClientError` with the last reconnect attempt's failure once the
        reconnect retries ran out (its ``__cause__`` what the credential's provider raised,
        when that failed the attempt), a :class:`WebPubSubClientError` with status
        ``NOT_CONNECTED`` when the session was lost with auto-reconnect off (the
        ``disconnected`` event before tells why), or ``PANIC`` for a bug in the library
        that ended its connection task. None when ``close()`` stopped it, before any
        stopped event, and from the start of each ``open()``.

        It follows the events, where :attr:`state` is the library's, read at once: the
        state reads Stopped as the client stops, this is set once the stopped event
        reaches the listeners, after those of the events before it. Read it in a
        ``stopped`` listener, or after ``close()``, which waits for a stopped client's
        events too. A stop whose event comes only after a new ``open()`` began sets it
        for its listeners; the new connection's ``connected`` event clears it."""
        return self._sink.stop_error

    def __enter__(self) -> "WebPubSubClient":
        self.open()
        return self

    def __exit__(self, exc_type: Any, exc_val: Any, exc_tb: Any) -> None:
        self.close()

    # ---- listeners ---------------------------------------------------------------

    @overload
    def subscribe(
        self,
        event: Literal[CallbackType.CONNECTED, "connected"],
        listener: Callable[[OnConnectedArgs], Any],
    ) -> None: ...

    @overload
    def subscribe(
        self,
        event: Literal[CallbackType.DISCONNECTED, "disconnected"],
        listener: Callable[[OnDisconnectedArgs], Any],
    ) -> None: ...

    @overload
    def subscribe(
        self,
        event: Literal[CallbackType.STOPPED, "stopped"],
        listener: Callable[[], Any],
    ) -> None: ...

    @overload
    def subscribe(
        self,
        event: Literal[CallbackType.SERVER_MESSAGE, "server-message"],
        listener: Callable[[OnServerDataMessageArgs], Any],
    ) -> None: ...

    @overload
    def subscribe(
        self,
        event: Literal[CallbackType.GROUP_MESSAGE, "group-message"],
        listener: Callable[[OnGroupDataMessageArgs], Any],
    ) -> None: ...

    @overload
    def subscribe(
        self,
        event: Literal[CallbackType.REJOIN_GROUP_FAILED, "rejoin-group-failed"],
        listener: Callable[[OnRejoinGroupFailedArgs], Any],
    ) -> None: ...

    def subscribe(self, event: Union[CallbackType, str], listener: Callable[..., Any], **kwargs: Any) -> None:
        """Call ``listener`` for every ``event`` (a :class:`CallbackType` or its value).

        ``connected`` gets ``OnConnectedArgs``, ``disconnected`` ``OnDisconnectedArgs``,
        ``stopped`` no argument (why: :attr:`stop_error`), ``server-message``
        ``OnServerDataMessageArgs``, ``group-message`` ``OnGroupDataMessageArgs``,
        ``rejoin-group-failed`` ``OnRejoinGroupFailedArgs``.

        An ``event`` that names no event (``"foo"``, a misspelt name, a number) is logged at
        error level on the ``webpubsub_client`` logger and ignored: the listener is never
        called. The official client does the same, and code written for it must run
        unchanged here, so this does not raise. Event values match in any case
        (``"CONNECTED"``), which the official client ignores.
        """
        if kwargs:
            _base.ignore_keywords("subscribe", kwargs)
        self._listeners.add(event, listener)

    @overload
    def unsubscribe(
        self,
        event: Literal[CallbackType.CONNECTED, "connected"],
        listener: Callable[[OnConnectedArgs], Any],
    ) -> None: ...

    @overload
    def unsubscribe(
        self,
        event: Literal[CallbackType.DISCONNECTED, "disconnected"],
        listener: Callable[[OnDisconnectedArgs], Any],
    ) -> None: ...

    @overload
    def unsubscribe(
        self,
        event: Literal[CallbackType.STOPPED, "stopped"],
        listener: Callable[[], Any],
    ) -> None: ...

    @overload
    def unsubscribe(
        self,
        event: Literal[CallbackType.SERVER_MESSAGE, "server-message"],
        listener: Callable[[OnServerDataMessageArgs], Any],
    ) -> None: ...

    @overload
    def unsubscribe(
        self,
        event: Literal[CallbackType.GROUP_MESSAGE, "group-message"],
        listener: Callable[[OnGroupDataMessageArgs], Any],
    ) -> None: ...

    @overload
    def unsubscribe(
        self,
        event: Literal[CallbackType.REJOIN_GROUP_FAILED, "rejoin-group-failed"],
        listener: Callable[[OnRejoinGroupFailedArgs], Any],
    ) -> None: ...

    def unsubscribe(self, event: Union[CallbackType, str], listener: Callable[..., Any], **kwargs: Any) -> None:
        """Remove a listener added with :meth:`subscribe`.

        An ``event`` that names no event is logged at error level and ignored, as in
        :meth:`subscribe`; so is a listener that is not subscribed (logged at info level).
        """
        if kwargs:
            _base.ignore_keywords("unsubscribe", kwargs)
        self._listeners.remove(event, listener)

    # ---- operations --------------------------------------------------------------

    def join_group(self, group_name: str, *, ack_id: Optional[int] = None, **kwargs: Any) -> WebPubSubResult:
        """Join ``group_name``; waits for the service's ack.

        ``ack_id`` is accepted for compatibility and checked, but the library numbers
        join messages itself (joining is idempotent, so a chosen ackId adds nothing): the
        result and the error report the ackId the frame carried (the official client's
        frame carries the chosen one).

        :raises SendMessageError: the service refused, the ack timed out, or not connected.
        """
        return self._group_op(lib.wps_client_join_group, "join_group", group_name, ack_id, kwargs)

    def leave_group(self, group_name: str, *, ack_id: Optional[int] = None, **kwargs: Any) -> WebPubSubResult:
        """Leave ``group_name``; waits for the service's ack (``ack_id`` as for :meth:`join_group`).

        :raises SendMessageError: the service refused, the ack timed out, or not connected.
        """
        return self._group_op(lib.wps_client_leave_group, "leave_group", group_name, ack_id, kwargs)

    def _group_op(
        self, call: Any, method: str, group_name: str, ack_id: Optional[int], kwargs: Dict[str, Any]
    ) -> WebPubSubResult:
        """Joins or leaves (``call``, the blocking C form) ``group_name``, the checks of both done."""
        group = _base.check_name(group_name, "group_name")
        _base.check_ack_id(ack_id)
        if kwargs or self._log_messages:
            _base.operation_keywords(method, kwargs, group_name, log=self._log_messages)
        out = _native.WpsAckResult()
        status = call(self._blocking_handle(), group, ctypes.byref(out))
        if status == _native.STATUS_INTERRUPTED:
            _callbacks.raise_interrupt()
        if status != _native.STATUS_OK:
            raise _base.operation_error(status, ack_id=_base.failed_ack_id(out))
        return _base.ack_result(out)

    def send_to_group(
        self,
        group_name: str,
        content: Any,
        data_type: Union[WebPubSubDataType, str],
        *,
        ack_id: Optional[int] = None,
        ack: bool = True,
        no_echo: bool = False,
        **kwargs: Any,
    ) -> WebPubSubResult:
        """Publish ``content`` to ``group_name``.

        ``content``: a ``str`` for text, any JSON value for json (with azure-core installed,
        also datetimes, timedeltas and bytes, as the official client writes them),
        ``bytes``/``bytearray``/``memoryview`` for binary and protobuf. With ``ack=False``
        the message is sent without an ackId (an ``ack_id`` given too is left out, as by the
        official client) and the call returns once it is queued; ``no_echo=True`` keeps it
        from coming back to this connection. A message over 1 MiB encoded (the service's
        limit on a client's frame) raises ValueError, and nothing is sent.

        :raises SendMessageError: the service refused, the ack timed out, or not connected.
        """
        group = _base.check_name(group_name, "group_name")
        kind, payload = _base.encode_content(content, data_type)
        if kwargs or self._log_messages:
            _base.operation_keywords("send_to_group", kwargs, group_name, payload, log=self._log_messages)
        flags, ack_id = _base.send_flags(ack, no_echo, ack_id)
        return self._send(_GROUP_FORMS, group, kind, payload, flags, ack, ack_id)

    def send_event(
        self,
        event_name: str,
        content: Any,
        data_type: Union[WebPubSubDataType, str],
        *,
        ack_id: Optional[int] = None,
        ack: bool = True,
        **kwargs: Any,
    ) -> WebPubSubResult:
        """Send ``content`` to the upstream event handler as event ``event_name`` (content as for
        :meth:`send_to_group`).

        :raises SendMessageError: the service refused, the ack timed out, or not connected.
        """
        event = _base.check_name(event_name, "event_name")
        kind, payload = _base.encode_content(content, data_type)
        if kwargs or self._log_messages:
            _base.operation_keywords("send_event", kwargs, event_name, payload, log=self._log_messages)
        flags, ack_id = _base.send_flags(ack, ack_id=ack_id)
        return self._send(_EVENT_FORMS, event, kind, payload, flags, ack, ack_id)

    def _send(
        self, forms: Any, target: bytes, kind: int, payload: bytes, flags: int, ack: bool, ack_id: Optional[int]
    ) -> WebPubSubResult:
        """Sends through the C forms ``(plain, with_ack_id)`` of send_to_group or send_event."""
        plain, with_ack_id = forms
        handle = self._blocking_handle()
        if not ack and ack_id is None:
            # no ack to read: no out-struct, and the call returns once the frame is queued
            status = plain(handle, target, kind, payload, len(payload), flags, None)
            if status == _native.STATUS_INTERRUPTED:  # while it waited for room in a full queue
                _callbacks.raise_interrupt()
            if status != _native.STATUS_OK:
                raise _base.operation_error(status)
            return WebPubSubResult(None, False)
        out = _native.WpsAckResult()
        if ack_id is not None:
            status = with_ack_id(handle, target, kind, payload, len(payload), flags, ack_id, ctypes.byref(out))
        else:
            status = plain(handle, target, kind, payload, len(payload), flags, ctypes.byref(out))
        if status == _native.STATUS_INTERRUPTED:
            _callbacks.raise_interrupt()
        if status != _native.STATUS_OK:
            raise _base.operation_error(status, ack_id=_base.failed_ack_id(out, ack_id))
        return _base.ack_result(out)

    def begin_send_to_group(
        self,
        group_name: str,
        content: Any,
        data_type: Union[WebPubSubDataType, str],
        *,
        ack_id: Optional[int] = None,
        ack: bool = True,
        no_echo: bool = False,
        **kwargs: Any,
    ) -> "concurrent.futures.Future[WebPubSubResult]":
        """Start publishing ``content`` to ``group_name`` and return at once, with a future
        of what :meth:`send_to_group` returns or raises (an addition to the official client).

        Arguments as for :meth:`send_to_group`; a bad one raises at once, as there. The
        call never blocks (while the library's operation queue is full, the message waits
        queued), so that many acked messages are in flight without a thread each; the
        messages begun from one thread are written in call order. The future gets the
        :class:`WebPubSubResult` once the service acked the message (with ``ack=False``:
        ``WebPubSubResult(None, False)`` once it is queued for the connection), or the
        :class:`SendMessageError` that :meth:`send_to_group` raises: refused, ack timed
        out, not connected, the client closed or the session lost (a message over 1 MiB
        encoded, which the library measures, gets ValueError there).

        The futures settle on the thread that runs this client's listeners, which runs their
        done-callbacks too (keep them short, as listeners; one may begin another send).
        ``result()`` or ``exception()`` of a future not done yet, called there (in a
        listener or a done-callback of this client), would wait for ever: it raises
        :class:`WebPubSubClientError` instead (with a timeout of 0, which does not wait,
        ``concurrent.futures.TimeoutError``), as it does in a fork() child for a future of
        its parent, which is never settled there. ``concurrent.futures.wait()`` and
        ``as_completed()`` are not guarded: there, without a timeout, they wait for ever. A
        future cannot be cancelled (``cancel()`` returns False): a message handed to the
        connection cannot be taken back. :meth:`close` returns once the futures of the
        sends begun before it are settled (not when called by a listener, whose thread
        settles them once it returns). A client freed with sends in flight fails them with
        "Stopped", settled on the freeing thread (or, freed during a callback of the
        library, on a thread of the package).

        A sliding window of 100 acked messages::

            window = collections.deque()
            for item in items:
                if len(window) == 100:
                    window.popleft().result()  # raises the oldest's SendMessageError
                window.append(client.begin_send_to_group("chat", item, WebPubSubDataType.TEXT))
            for future in window:
                future.result()

        :raises WebPubSubClientError: the client was freed.
        """
        group = _base.check_name(group_name, "group_name")
        kind, payload = _base.encode_content(content, data_type)
        if kwargs or self._log_messages:
            _base.operation_keywords("begin_send_to_group", kwargs, group_name, payload, log=self._log_messages)
        flags, ack_id = _base.send_flags(ack, no_echo, ack_id)
        return self._begin(_GROUP_ASYNC_FORMS, group, kind, payload, flags, ack_id)

    def begin_send_event(
        self,
        event_name: str,
        content: Any,
        data_type: Union[WebPubSubDataType, str],
        *,
        ack_id: Optional[int] = None,
        ack: bool = True,
        **kwargs: Any,
    ) -> "concurrent.futures.Future[WebPubSubResult]":
        """Start sending ``content`` as event ``event_name`` and return at once, with a future
        of what :meth:`send_event` returns or raises (see :meth:`begin_send_to_group`; an
        addition to the official client).

        :raises WebPubSubClientError: the client was freed.
        """
        event = _base.check_name(event_name, "event_name")
        kind, payload = _base.encode_content(content, data_type)
        if kwargs or self._log_messages:
            _base.operation_keywords("begin_send_event", kwargs, event_name, payload, log=self._log_messages)
        flags, ack_id = _base.send_flags(ack, ack_id=ack_id)
        return self._begin(_EVENT_ASYNC_FORMS, event, kind, payload, flags, ack_id)

    def _begin(
        self, forms: Any, target: bytes, kind: int, payload: bytes, flags: int, ack_id: Optional[int]
    ) -> _futures.SendFuture:
        """Starts a send through the C asynchronous forms ``(plain, with_ack_id)`` of
        send_to_group or send_event: its future is settled from its record
        (``SEND_RECORD``) or by its completion callback (see :mod:`._futures`)."""
        handle = self._live_handle()
        future = _futures.SendFuture(self._dispatch, ack_id)
        key = REGISTRY.add(future)
        flags |= _native.SEND_RECORD
        if ack_id is None:
            status = forms[0](handle, target, kind, payload, len(payload), flags, _COMPLETION, key, None)
        else:
            status = forms[1](handle, target, kind, payload, len(payload), flags, ack_id, _COMPLETION, key, None)
        if status != _native.STATUS_OK:  # refused: the client is being freed
            REGISTRY.pop(key)
            raise _base.operation_error(status, ack_id=ack_id)
        return future

    def invoke_event(
        self,
        event_name: str,
        content: Any,
        data_type: Union[WebPubSubDataType, str],
        *,
        timeout: Optional[float] = None,
    ) -> InvokeEventResult:
        """Send ``content`` as event ``event_name`` and return the upstream's response.

        ``timeout`` in seconds (default: ``ack_timeout``); on timeout the invocation is
        cancelled at the service. The response's ``data`` is ``str``, a JSON value or ``bytes``.

        :raises InvokeEventError: the upstream answered with an error, the call timed out, or
            not connected. It is not retried.
        """
        event = _base.check_name(event_name, "event_name")
        kind, payload = _base.encode_content(content, data_type)
        timeout_ms = _base.check_timeout(timeout)
        response = ctypes.c_void_p()
        status = lib.wps_client_invoke_event(
            self._blocking_handle(), event, kind, payload, len(payload), timeout_ms, ctypes.byref(response)
        )
        if status == _native.STATUS_INTERRUPTED:  # cancelled at the service
            _callbacks.raise_interrupt()
        if status != _native.STATUS_OK:
            raise _base.operation_error(status, invoke=True)
        try:
            size = ctypes.c_size_t(0)
            pointer = lib.wps_invoke_response_data(response, ctypes.byref(size))
            data = ctypes.string_at(pointer, size.value) if pointer and size.value else b""
            return _base.invoke_result(lib.wps_invoke_response_data_type(response), data)
        finally:
            lib.wps_invoke_response_free(response)

    # ---- internals ---------------------------------------------------------------

    def _blocking_handle(self) -> int:
        """The handle, for a blocking call: one a signal handler may end (see _callbacks)."""
        _callbacks.ensure_main_check()
        return self._live_handle()

    def _live_handle(self) -> int:
        if not self._finalizer.alive:
            raise WebPubSubClientError("the client was freed (interpreter exit)")
        return self._handle
