"""The asyncio client, with the API of ``azure.messaging.webpubsubclient.aio.WebPubSubClient``."""

from __future__ import annotations

import asyncio
import collections
import contextvars
import ctypes
import functools
import inspect
import logging
import os
import sys
import threading
import time
import types
import weakref
from typing import (
    Any,
    Awaitable,
    Callable,
    Deque,
    Dict,
    List,
    Literal,
    Optional,
    Protocol,
    Set,
    Tuple,
    Union,
    cast,
    overload,
)

from .. import _base, _callbacks, _native
from .._callbacks import REGISTRY, Completion
from .._native import lib
from ..models import (
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
_STOPPED = CallbackType.STOPPED
_CONNECTED = CallbackType.CONNECTED

UrlProvider = Union[str, Callable[[], Awaitable[str]], Callable[[], str]]

# In a coroutine listener's task, and in the tasks it starts (gather, wait_for before
# Python 3.12, a TaskGroup): a one-item list holding that listener task (empty during the
# eager start of the task, when it is the current task). close() must not wait for the
# listener task it runs under, even through a task of its own. Emptied once the listener
# call is done (before Python 3.12 its task may go on with another, see ``_CallQueue``):
# the task holds its context, which holds the list, and such a cycle per event left
# every message to the garbage collector.
_LISTENER_TASK: "contextvars.ContextVar[List[asyncio.Future[Any]]]" = contextvars.ContextVar("_LISTENER_TASK")

# What close() waits for (see ``_AsyncSink.running_listeners``).
_Running = Tuple[List["asyncio.Future[Any]"], int]


@types.coroutine
def _resume(coro: Any, context: contextvars.Context, suspended_on: Any, thrown: Optional[BaseException] = None) -> Any:
    """Goes on with a coroutine whose first step, run in ``context``, suspended on
    ``suspended_on``, as awaiting it would have: what it yields goes to the task running
    this, what the task sends or throws goes to it, each step in ``context``. ``thrown``:
    what the task got before it ran this (a cancellation), thrown into it first."""
    step: Any = None if thrown is None else (coro.throw, thrown)
    while True:
        if step is None:
            try:
                step = (coro.send, (yield suspended_on))
            except GeneratorExit:  # this task is dropped unfinished
                coro.close()
                raise
            except BaseException as exc:  # noqa: BLE001 - thrown into the coroutine
                step = (coro.throw, exc)
        try:
            suspended_on = context.run(*step)
        except StopIteration:
            return
        step = None


class WebPubSubClientCredential:
    """Where the client gets its URL: a fixed URL, or a callable returning one, asked
    before every *new* connection. A coroutine function is awaited on the client's event
    loop; a plain function (an addition: the official client takes coroutine functions
    only) runs on a daemon thread of its own, so that one that blocks (a token fetched
    over HTTP) leaves the loop running. A plain function may return an awaitable (awaited
    on the loop), but not use the running loop itself.
    """

    def __init__(self, client_access_url_provider: UrlProvider) -> None:
        if isinstance(client_access_url_provider, str):
            _base.check_url(client_access_url_provider, "client_access_url_provider")
        elif not callable(client_access_url_provider):
            raise TypeError(
                "client_access_url_provider must be a str or a callable returning a str (or an awaitable "
                f"of one), got {type(client_access_url_provider).__name__}"
            )
        self._provider = client_access_url_provider

    async def get_client_access_url(self) -> str:
        """Return the client access URL (awaits the provider)."""
        if isinstance(self._provider, str):
            return self._provider
        return await _provided(self._provider)


async def _provided(provider: Callable[[], Any]) -> str:
    """What ``provider()`` returns, awaited if it is awaitable: a coroutine function is
    called on the loop, any other callable on a thread of its own (:func:`_off_loop`)."""
    if inspect.iscoroutinefunction(provider):
        return cast(str, await provider())
    result = await _off_loop(provider)
    if inspect.isawaitable(result):
        result = await result
    return cast(str, result)


async def _off_loop(function: Callable[[], Any]) -> Any:
    """``function()`` run on a daemon thread of its own (in a copy of this context) and
    awaited: the loop runs on meanwhile, a cancellation does not wait for it (its late
    outcome is dropped), nor does the end of ``asyncio.run``, which waits for the threads
    of the loop's default executor."""
    loop = asyncio.get_running_loop()
    future: "asyncio.Future[Tuple[bool, Any]]" = loop.create_future()
    context = contextvars.copy_context()

    def settle(outcome: Tuple[bool, Any]) -> None:
        if not future.done():  # cancelled
            future.set_result(outcome)

    def run() -> None:
        try:
            outcome: Tuple[bool, Any] = (True, context.run(function))
        except BaseException as exc:  # noqa: BLE001 - raised by the awaiting coroutine
            outcome = (False, exc)
        try:
            loop.call_soon_threadsafe(settle, outcome)
        except RuntimeError:
            pass  # the loop is closed: nothing awaits the outcome
        del outcome

    try:
        threading.Thread(target=run, name="webpubsub-credential", daemon=True).start()
    except RuntimeError as exc:  # refused (the thread limit): not the provider's own error
        raise WebPubSubClientError(f"cannot start the credential provider's thread: {exc}") from exc
    returned, value = await future
    if returned:
        return value
    try:
        raise value
    finally:
        del value  # no cycle through this frame, which the traceback holds


class _HasClientAccessUrl(Protocol):
    """A credential of another kind that the client takes: an object with this method,
    plain or coroutine, such as the official package's ``WebPubSubClientCredential``."""

    def get_client_access_url(self) -> Union[str, Awaitable[str]]: ...


class _LoopBatch:
    """Runs calls posted from other threads (a dispatch off the loop's thread) on one event
    loop, in order, waking the loop once per batch (one ``call_soon_threadsafe`` for all
    the calls posted before the loop got to them) instead of once per call."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._calls: "collections.deque[Tuple[Callable[..., None], Tuple[Any, ...]]]" = collections.deque()
        self._scheduled = False

    def post(self, function: Callable[..., None], *args: Any) -> None:
        """Queue ``function(*args)`` for the loop; RuntimeError when the loop is closed."""
        self._calls.append((function, args))
        if not self._scheduled:
            self._scheduled = True
            try:
                self.loop.call_soon_threadsafe(self._drain)
            except RuntimeError:
                self._scheduled = False
                self._calls.clear()
                raise

    def _drain(self) -> None:
        # Cleared before draining: a call posted meanwhile is either drained here or
        # schedules a new drain, never stranded.
        self._scheduled = False
        calls = self._calls
        while calls:
            function, args = calls.popleft()
            try:
                function(*args)
            except Exception:  # noqa: BLE001
                _LOGGER.exception("a queued call raised on the event loop")
            except BaseException:
                # It stops the loop (KeyboardInterrupt, SystemExit): the calls behind it
                # run when the loop runs again, not at the next post, which may never come.
                if calls and not self._scheduled:
                    self._scheduled = True
                    self.loop.call_soon(self._drain)
                raise


class _Keeper:
    """What the reader of a client's dispatch descriptor carries on the event loop the
    client dispatches on (an argument of the loop's handle): the client while it runs,
    else None, and the client's poller. The loop holds it until the reader is removed,
    or until the loop is closed (its selector, and with it every reader, is dropped
    then). When it goes, it lets the client go first, so that a client nothing else
    refers to is freed before the poller is told (see :meth:`_Poller.suspend_if_closed`)."""

    __slots__ = ("client", "poller", "__weakref__")

    def __init__(self, client: Any, poller: "_Poller") -> None:
        self.client = client
        self.poller = poller

    def __del__(self) -> None:
        self.client = None
        self.poller.suspend_if_closed()


class _LoopHeld(_base.HeldListeners):
    """The asyncio client's listeners, and the client while it runs, held through the
    event loop it dispatches on rather than by its sink: the reader of the client's
    descriptor carries a :class:`_Keeper` holding the client. A running client the
    application no longer refers to keeps running while that loop lives and is not
    closed, as the official client's tasks keep it. Once the loop is closed (an
    ``asyncio.run`` that ended without ``close()``), nothing can deliver its events or
    await its operations: the loop has dropped the keeper, the client is collected and
    its native client freed (its connection closed). A loop the application drops
    unclosed is collected with the client (see :class:`_NativeClient`). A client the
    application still refers to keeps running, its messages dropped until the next loop
    that uses it dispatches it, or dispatched by another loop that used it and is not
    closed (see :meth:`_Poller.suspend_if_closed`)."""

    def __init__(self, listeners: _base.Listeners) -> None:
        super().__init__(listeners)
        self._client: "Optional[weakref.ref[Any]]" = None  # the client while it runs
        self._keeper: "Optional[weakref.ref[_Keeper]]" = None  # carried by the reader

    def _keep(self, client: Any) -> None:
        self._client = None if client is None else weakref.ref(client)
        keeper = self._keeper() if self._keeper is not None else None
        if keeper is not None:
            keeper.client = client

    def keeper(self, poller: "_Poller") -> _Keeper:
        """A keeper for the reader on the loop the client dispatches on from now on (with
        ``poller``), holding the client if it runs; the previous one no longer holds it."""
        with self._lock:
            previous = self._keeper() if self._keeper is not None else None
            if previous is not None:
                previous.client = None
            keeper = _Keeper(self._client() if self._client is not None else None, poller)
            self._keeper = weakref.ref(keeper)
            return keeper


class _SinkRef:
    """What the callback registry holds for a client's events: its sink, weakly. The
    registry is a module global until the native client is freed, and the sink refers
    to the client's loop (and to its listeners' tasks): held from there, it kept a loop
    that the application dropped unclosed, and the open client that loop's reader holds,
    for good (see :class:`_NativeClient`). The client and its poller hold the sink; once
    they are collected, the events its free still brings have no listeners anyway."""

    __slots__ = ("_sink",)

    def __init__(self, sink: "_AsyncSink") -> None:
        self._sink = weakref.ref(sink)

    def on_native_event(self, event: _native.WpsEvent) -> None:
        sink = self._sink()
        if sink is not None:
            sink.on_native_event(event)


# A coroutine listener call whose first step suspended (see ``_CallQueue``): its
# coroutine, its context, what it suspended on, its callback type, and the one-item list
# naming the task it kept in ``_LISTENER_TASK``.
_Suspended = Tuple[Any, contextvars.Context, Any, CallbackType, List["asyncio.Future[Any]"]]


class _CallQueue:
    """Before Python 3.12, the coroutine listener calls of one loop not started yet, in
    event order, and the task that starts them next. That task starts them all in one
    step, one after another, each in a copy of its context: one that finishes without
    suspending costs no task of its own (a task per event cost 5 us of the 6 a trivial
    listener took on Python 3.11). The first that suspends keeps the task to itself; the
    next run under a task made then (the current task while they run), which the next
    that suspends keeps, and so on. So they all start before anything their first steps
    scheduled, or the code that a completion after their events resumes (as tasks of
    their own would); a listener that awaits holds none of the others back; and what one
    started from its first line (``asyncio.timeout``, a ``TaskGroup``) belongs to the
    task it runs in to its end. The sink's ``tasks`` and ``call_of`` (see there) get such
    a task."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        tasks: Dict["asyncio.Future[Any]", CallbackType],
        call_of: Dict["asyncio.Future[Any]", int],
    ) -> None:
        self.loop = loop
        self.tasks = tasks
        self.call_of = call_of
        self.waiting: Deque[Tuple[Any, CallbackType, int]] = collections.deque()
        self.task: Optional["asyncio.Task[None]"] = None

    def push(self, coro: Any, kind: CallbackType, call: int) -> None:
        """Queues call number ``call`` of a listener of ``kind``: its coroutine ``coro``."""
        self.waiting.append((coro, kind, call))
        if self.task is None:
            self._next()

    def _next(self) -> None:
        if not self.waiting:
            self.task = None
            return
        task = self.loop.create_task(self._drain())
        task.add_done_callback(self._drained)
        self.task = task

    async def _drain(self) -> None:
        """Starts the waiting calls in this task (see the class), then goes on with the
        one that kept it, if any."""
        task = asyncio.current_task(self.loop)
        assert task is not None  # run by ``_next``'s task
        kept: List[Any] = []
        try:
            self._start_waiting(task, kept)
        finally:
            if self.task is task:
                self.task = None
        if kept:
            await self._go_on(kept[0])

    def _start_waiting(self, task: "asyncio.Task[None]", kept: List[Any]) -> None:
        """Runs the first step of each waiting call, in order, in the step of ``task``:
        under ``task`` until one suspends and keeps it (put in ``kept``), then under a
        task made for the next ones (see ``_hosting``), entered as the current task, and
        so on. Each call's context names the task it runs under in ``_LISTENER_TASK``, in
        a list of its own emptied once the call ends, as a task of its own would be done:
        a task that a finished call started (one closing the client) does not take a later
        call that goes on in the same task for its own listener."""
        loop, waiting = self.loop, self.waiting
        host: "asyncio.Task[Any]" = task
        slot = kept
        try:
            while waiting:
                coro, kind, call = waiting.popleft()
                cell: List["asyncio.Future[Any]"] = [host]
                _LISTENER_TASK.set(cell)  # in this task's context, which the call's copies
                context = contextvars.copy_context()
                try:
                    suspended_on = context.run(coro.send, None)
                except StopIteration:
                    cell.clear()
                    continue
                except Exception:  # noqa: BLE001
                    cell.clear()
                    _base.log_listener_error(kind)
                    continue
                except BaseException as exc:  # KeyboardInterrupt, SystemExit: the loop stops here
                    cell.clear()
                    self._next()  # the calls after it start after it
                    if host is task:
                        raise
                    slot.append(exc)  # its host raises it, as the call's own task would have
                    return
                self.tasks[host] = kind
                self.call_of[host] = call
                slot.append((coro, context, suspended_on, kind, cell))
                if waiting:
                    slot = []
                    hosting = _hosting(self, slot)
                    hosting.send(None)  # to its first yield: a cancellation before its first step lands there
                    following = loop.create_task(hosting)
                    asyncio.tasks._leave_task(loop, host)
                    asyncio.tasks._enter_task(loop, following)
                    host = following
        finally:
            if host is not task:
                asyncio.tasks._leave_task(loop, host)
                asyncio.tasks._enter_task(loop, task)

    async def _go_on(self, call: _Suspended, thrown: Optional[BaseException] = None) -> None:
        """Goes on with ``call`` in the task it kept (``thrown``: see ``_resume``), logs what
        it raised, and forgets that task."""
        coro, context, suspended_on, kind, cell = call
        task = cell[0]
        try:
            await _resume(coro, context, suspended_on, thrown)
        except Exception:  # noqa: BLE001
            _base.log_listener_error(kind)
        finally:
            cell.clear()
            self.tasks.pop(task, None)
            self.call_of.pop(task, None)

    def _drained(self, task: "asyncio.Task[None]") -> None:
        """A task cancelled before it started (at the end of ``asyncio.run``) starts none
        of the calls waiting, as the tasks of listeners cancelled before their start."""
        if self.task is task:
            self.task = None
            while self.waiting:
                self.waiting.popleft()[0].close()


@types.coroutine
def _hosting(queue: _CallQueue, slot: List[Any]) -> Any:
    """The coroutine of a task that waiting calls run under (see
    ``_CallQueue._start_waiting``), taken to its first yield there. Its task goes on with
    the call that suspended under it, if any, and throws into it what the task got before
    its first step (a cancellation at the end of ``asyncio.run``); or it raises what a call
    raised in its first step (KeyboardInterrupt, SystemExit), as the call's own task would."""
    thrown: Optional[BaseException] = None
    try:
        yield
    except BaseException as exc:  # noqa: BLE001 - thrown into the call
        thrown = exc
    if slot and isinstance(slot[0], BaseException):
        raise slot[0]
    if slot:
        yield from queue._go_on(slot[0], thrown).__await__()
    elif thrown is not None:
        raise thrown


class _AsyncSink:
    """A client's events on their way to its listeners, on the client's event loop, in
    order: converted by the event callback during the poller's dispatch, then delivered
    by the poller once that call has returned (see :meth:`_Poller.dispatch`)."""

    LISTENER_GRACE = 1.0  # seconds close() waits for running listeners (the official client's)

    def __init__(self, listeners: _base.Listeners) -> None:
        self.listeners = _LoopHeld(listeners)
        self.stop_error: Optional[WebPubSubClientError] = None  # see WebPubSubClient.stop_error
        self.loop: Optional[asyncio.AbstractEventLoop] = None
        self.batch: Optional[_LoopBatch] = None
        self.thread = 0  # the thread running ``loop``
        # The running tasks of coroutine listeners (and awaitables a listener returned), by
        # the event they listen to: close() waits for them, as the official close() does.
        self._tasks: Dict["asyncio.Future[Any]", CallbackType] = {}
        # Before Python 3.12, the coroutine listener calls of ``loop`` not started yet
        # (see ``_CallQueue``). How many listener calls were numbered (an event's
        # listeners all get theirs before the first runs), and the number of the call
        # that each coroutine listener task still running runs (in ``_tasks`` too).
        self._queue: Optional[_CallQueue] = None
        self._calls = 0
        self._call_of: Dict["asyncio.Future[Any]", int] = {}
        # The listener tasks inside a close() of this client (directly or through a task
        # they await): a close() running meanwhile does not wait for them, as they wait
        # for the stop themselves; and the futures waking such a close() when one enters.
        self._closing: Dict["asyncio.Future[Any]", int] = {}
        self._close_wakers: List["asyncio.Future[None]"] = []
        # The listener tasks a close() has cancelled and still waits for: another close()
        # waits for them too, but neither cancels them again nor warns again.
        self._cancelled: Set["asyncio.Future[Any]"] = set()
        # What the credential's provider raised during an open() (which raises it), for
        # the latest request only: an abandoned one that raises later stands for nothing.
        self.credential_error: Optional[Exception] = None
        self.latest_request: Optional[int] = None
        self.provider_failures = _base.ProviderErrors()  # for the stopped events' errors
        # The provider tasks not answered yet (done callbacks to run): a stop cancels them
        # (their requests are over), as the official client's provider is cancelled with
        # its open().
        self._providers: Set["asyncio.Task[str]"] = set()
        # The provider tasks cancelled by ``_give_up``, until their done callbacks ran.
        self._given_up: Set["asyncio.Task[str]"] = set()

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Deliver events and completions to ``loop`` (running on this thread) from now on."""
        if self.loop is not loop:
            self.batch = _LoopBatch(loop)
            self._queue = _CallQueue(loop, self._tasks, self._call_of)
        self.loop = loop
        self.thread = threading.get_ident()

    def deliver(self, events: List["_Pending"], poller: "_Poller") -> None:
        """What one of the poller's dispatches took, in order (see :data:`_Pending`): the
        events for the listeners (none once the client is freed), the completions for
        their futures. Called once the native call has returned: no listener runs inside
        the library, where Python could end its thread at exit (SIGABRT)."""
        batch = self.batch
        here = batch is not None and _on_loop(batch.loop, self.thread)  # the poller's loop is usually ours
        for i, (kind, args) in enumerate(events):
            if kind is None:  # a completion: its future gets its result, in order
                args[0](*args[1:])
                continue
            if batch is None or not poller.alive:
                continue
            if not here:
                self.post(kind, args)
                continue
            try:
                self._dispatch(kind, args)
            except BaseException:  # KeyboardInterrupt, SystemExit: the loop stops here
                # The rest were taken from the library already: they arrive after it.
                if i + 1 < len(events):
                    batch.loop.call_soon(self.deliver, events[i + 1 :], poller)
                raise

    def on_native_event(self, event: _native.WpsEvent) -> None:
        converted = _base.event_args(event)
        if converted is None:
            return
        if converted[0] is _STOPPED:
            self.provider_failures.chain(converted[1][0])
        pending = _pending()
        if pending is not None:  # the poller's dispatch: delivered once it has returned
            pending.append(converted)
        else:  # a library thread, once the client is freed
            self.post(*converted)

    def post(self, kind: CallbackType, args: Tuple[Any, ...]) -> None:
        """An event's callback type and listener arguments, for the listeners on the
        client's loop, from another thread or loop (or a freed client's library thread)."""
        batch = self.batch
        if batch is None:
            return
        try:
            batch.post(self._dispatch, kind, args)
        except RuntimeError:
            _LOGGER.debug("event loop closed; dropping a %s event", kind.value)

    def _dispatch(self, kind: CallbackType, args: Tuple[Any, ...]) -> None:
        """Calls the listeners of ``kind``. A KeyboardInterrupt or SystemExit from one (or
        from the eager start of its task) is raised once the others had the event: it stops
        the loop, as the official client's listener task does."""
        interrupt: Optional[BaseException] = None
        listeners = self.listeners.get()
        if listeners is None:  # the client was collected; its handle is being freed
            return
        stopped = kind is _STOPPED
        if stopped:
            self.stop_error, args = args[0], ()
        elif kind is _CONNECTED:  # a new run's: a stop delivered since open() began was an earlier run's
            self.stop_error = None
        snapshot = listeners.snapshot(kind)
        # Numbered before the first runs: a close() one of them makes waits for the others.
        first = self._calls
        self._calls += len(snapshot)
        for offset, listener in enumerate(snapshot):
            try:
                result = listener(*args)
                if result is None:  # a plain function: skips two inspect calls (0.2 us an event)
                    continue
                if inspect.iscoroutine(result):
                    self._start(result, kind, first + offset)
                elif inspect.isawaitable(result):
                    self._track(asyncio.ensure_future(result), kind)
            except Exception:  # noqa: BLE001
                _base.log_listener_error(kind)
            except BaseException as exc:  # noqa: BLE001 - raised below
                if interrupt is not None:
                    _base.log_listener_error(kind)  # a second one: the first is raised
                else:
                    interrupt = exc
        if stopped:
            self.listeners.release_if_stopped()
        if interrupt is not None:
            raise interrupt

    def _start(self, coro: Any, kind: CallbackType, call: int) -> None:
        """Runs a coroutine listener in a task, as the official client does:
        ``asyncio.current_task()`` is a task, and ``asyncio.timeout``, ``TaskGroup`` and
        (from Python 3.12) ``asyncio.wait_for`` work from its first line. From Python 3.12
        it gets a task of its own that starts eagerly: at once, up to its first suspension,
        and one that finishes without suspending is never scheduled (about 1 us more than
        a plain call). Before, it starts on the loop's next pass, in a task of
        ``_CallQueue``. Either way coroutine listeners start in event order. ``call``: the
        call's number (see ``running_listeners``)."""
        loop = self.loop
        assert loop is not None  # bound before any event reaches the loop
        if sys.version_info >= (3, 12):
            cell: List["asyncio.Future[Any]"] = []
            context = contextvars.copy_context()
            context.run(_LISTENER_TASK.set, cell)
            task = asyncio.Task(coro, loop=loop, eager_start=True, context=context)
            if task.done():
                self._finished(task, kind=kind)
            else:
                cell.append(task)
                self._call_of[task] = call
                self._track(task, kind, cell)
            return
        assert self._queue is not None  # made with the loop
        self._queue.push(coro, kind, call)

    def _track(
        self, task: "asyncio.Future[Any]", kind: CallbackType, cell: Optional[List["asyncio.Future[Any]"]] = None
    ) -> None:
        self._tasks[task] = kind
        task.add_done_callback(functools.partial(self._finished, kind=kind, cell=cell))

    def _finished(
        self, task: "asyncio.Future[Any]", *, kind: CallbackType, cell: Optional[List["asyncio.Future[Any]"]] = None
    ) -> None:
        if cell is not None:
            cell.clear()
        self._tasks.pop(task, None)
        self._call_of.pop(task, None)
        if not task.cancelled() and task.exception() is not None:
            _LOGGER.error("a %s listener raised", kind.value, exc_info=task.exception())

    def running_listeners(self, own: Optional["asyncio.Future[Any]"]) -> "_Running":
        """The listener tasks running on this thread's loop, except the caller's own
        (``own``: the listener task it runs under, if any), and the number of listener
        calls numbered so far. Those calls are running too: the other listeners of the
        event a listener calling close() got, which start after it, and before Python
        3.12 the calls not started yet (started by the time close() waits: the loop ran
        since)."""
        loop = asyncio.get_running_loop()
        current = asyncio.current_task(loop)
        tasks = [
            task
            for task in self._tasks
            if task is not current and task is not own and not task.done() and task.get_loop() is loop
        ]
        return tasks, (self._calls if loop is self.loop else 0)

    def _still_running(self, running: "_Running") -> List["asyncio.Future[Any]"]:
        """What of ``running`` has not ended, except the tasks inside a close() (which
        wait for the stop, done by then): its tasks, and those of its calls that started
        later and suspended."""
        tasks, calls = running
        loop = asyncio.get_running_loop()
        later = [task for task, call in self._call_of.items() if call < calls and task.get_loop() is loop]
        return [task for task in dict.fromkeys([*tasks, *later]) if not task.done() and task not in self._closing]

    def enter_close(self) -> Optional["asyncio.Future[Any]"]:
        """A close() starts: the listener task it runs under (directly or through tasks
        of its own), if any, is marked as closing, and the close() calls waiting for it
        on this loop are woken: it waits for the stop itself, so none waits for it."""
        cell = _LISTENER_TASK.get(None)
        if cell is None:
            return None
        own = cell[0] if cell else asyncio.current_task()  # empty: its eager start
        if own is None:
            return None
        self._closing[own] = self._closing.get(own, 0) + 1
        loop = asyncio.get_running_loop()
        wakers, self._close_wakers = self._close_wakers, []
        for waker in wakers:
            if waker.get_loop() is not loop:
                self._close_wakers.append(waker)
            elif not waker.done():
                waker.set_result(None)
        return own

    def leave_close(self, own: Optional["asyncio.Future[Any]"]) -> None:
        """The close() that ``enter_close`` returned ``own`` for has ended."""
        if own is None:
            return
        count = self._closing.pop(own, 1) - 1
        if count > 0:
            self._closing[own] = count

    async def finish_listeners(self, running: "_Running") -> None:
        """Waits up to ``LISTENER_GRACE`` seconds for ``running`` (the listeners running when
        close() was called), then cancels those still running, with a warning, as the
        official close() does (not one a concurrent close() has cancelled); the cancelled
        ones get as long again to end."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.LISTENER_GRACE
        while True:
            # Not one that entered a close() meanwhile: it waits for the stop, done now.
            still = self._still_running(running)
            if not still:
                return
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            waker: "asyncio.Future[None]" = loop.create_future()
            self._close_wakers.append(waker)
            try:
                await asyncio.wait([*still, waker], timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
            finally:
                if not waker.done():
                    waker.cancel()
                    if waker in self._close_wakers:
                        self._close_wakers.remove(waker)
        cancelling = [task for task in still if task not in self._cancelled]
        for task in cancelling:
            kind = self._tasks.get(task)
            what = kind.value if kind is not None else "an event"
            _LOGGER.warning(
                "a %s listener was still running %g s after close(); cancelled",
                what,
                self.LISTENER_GRACE,
            )
            task.cancel()
        self._cancelled.update(cancelling)
        try:
            await asyncio.wait(still, timeout=self.LISTENER_GRACE)  # bounded: a task may ignore its cancellation
        finally:
            self._cancelled.difference_update(cancelling)

    def credential_request(self, credential: _HasClientAccessUrl, timeout: float) -> Callable[[int], None]:
        """The handler of the client's credential requests. Called on a library thread
        with the token of a request whose answer is deferred, it only schedules
        ``credential`` on the loop, where a done callback answers the request: no library
        thread runs or waits for the provider. After ``timeout`` the provider's task is
        cancelled (its connection attempt has given up by then). The handler, which the
        callback registry holds, holds the sink weakly (see :class:`_SinkRef`)."""
        sink = weakref.ref(self)

        def request(result: int) -> None:
            this = sink()
            loop = this.loop if this is not None else None
            if this is None or loop is None or loop.is_closed():
                raise RuntimeError("the client's event loop is not running")
            loop.call_soon_threadsafe(this._provide, loop, credential, result, timeout)

        return request

    def _provide(
        self, loop: asyncio.AbstractEventLoop, credential: _HasClientAccessUrl, result: int, timeout: float
    ) -> None:
        self.credential_error, self.latest_request = None, result
        task = loop.create_task(_client_access_url(credential))
        self._providers.add(task)
        timer = loop.call_later(timeout, self._give_up, task)
        task.add_done_callback(functools.partial(self._answer_credential, result, timer))

    def cancel_providers(self) -> None:
        """Cancel the provider tasks of this loop still running, once the client stopped:
        their requests were abandoned, and their answers would be refused."""
        loop = asyncio.get_running_loop()
        for task in list(self._providers):
            if task.get_loop() is loop:
                self._give_up(task)

    def _give_up(self, task: "asyncio.Task[str]") -> None:
        """Cancel a provider whose request the library has given up (its connection
        attempt timed out, or the client stops): it is not answered, and its cancellation
        is no credential failure to report (an answer could even reach a request not yet
        abandoned, and fail the start being stopped with a warning). One cancelled by
        someone else just before (``asyncio.run`` ending cancels every task) is given up too."""
        if task.cancel() or task.cancelled():
            self._given_up.add(task)

    def _answer_credential(self, result: int, timer: asyncio.TimerHandle, task: "asyncio.Task[str]") -> None:
        timer.cancel()
        self._providers.discard(task)
        given_up = task in self._given_up
        self._given_up.discard(task)
        if task.cancelled():
            if not given_up:  # not by its timeout or a stop, which abandon the request
                _callbacks.answer_credential(result, None, RuntimeError("the credential provider was cancelled"))
            return
        error = task.exception()
        if error is None:
            _callbacks.answer_credential(result, task.result())
            return
        if isinstance(error, Exception):
            self.provider_failures.add(error)
            if result == self.latest_request:
                self.credential_error = error  # the provider's own: open() raises it
        _callbacks.answer_credential(result, None, error)


async def _client_access_url(credential: _HasClientAccessUrl) -> str:
    """What ``credential.get_client_access_url()`` gives (see :func:`_provided`): a
    credential of the official sync package (a plain method) works too."""
    return await _provided(credential.get_client_access_url)


def _on_loop(loop: asyncio.AbstractEventLoop, thread: int) -> bool:
    """Whether this is ``loop``'s own thread (``thread``) with ``loop`` running on it.

    Cheaper than ``asyncio.get_running_loop()``, which makes a system call per call
    on Python 3.11.
    """
    return threading.get_ident() == thread and loop.is_running()


def _running_loop() -> Optional[asyncio.AbstractEventLoop]:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


_THREAD_BUFFERS = threading.local()

# What a poller's dispatch took, for after the native call, in order: an event (its
# callback type and listener arguments), or ``(None, (function, *args))``, a completion
# to run on the loop (a future's result), kept in its place among the events so that a
# coroutine listener's task is scheduled before the awaiting code resumes, as when the
# listeners ran inside the dispatch. ``_THREAD_BUFFERS.pending`` is the list of the
# dispatch running on this thread (None outside one), ``_THREAD_BUFFERS.loop`` the loop
# that runs it.
_Pending = Tuple[Optional[CallbackType], Tuple[Any, ...]]


def _pending() -> Optional[List[_Pending]]:
    """What the poller's dispatch running on this thread took so far; None outside one."""
    pending: Optional[List[_Pending]] = getattr(_THREAD_BUFFERS, "pending", None)
    return pending


def _on_own_thread(loop: asyncio.AbstractEventLoop) -> bool:
    """Whether this thread runs ``loop``: a poller's dispatch on it, or any code while it
    runs here. The dispatch is told apart by the loop it records, not by the loop's
    ``_thread_id``, which only asyncio's own loops have (uvloop's has none: every
    completion of a failed send then took a thread hop from the loop's own thread)."""
    return getattr(_THREAD_BUFFERS, "loop", None) is loop or getattr(loop, "_thread_id", None) == threading.get_ident()


def _defer(function: Callable[..., None], *args: Any) -> bool:
    """Inside a poller's dispatch on this thread: queue ``function(*args)`` after the
    events taken so far (True); else False, for the caller to run it now."""
    pending = _pending()
    if pending is None:
        return False
    pending.append((None, (function, *args)))
    return True


def _dispatch_buffers() -> _base.DispatchBuffers:
    """This thread's dispatch buffers (made on first use)."""
    buffers: Optional[_base.DispatchBuffers] = getattr(_THREAD_BUFFERS, "buffers", None)
    if buffers is None:
        buffers = _THREAD_BUFFERS.buffers = _base.DispatchBuffers()
    return buffers


class _NativeClient:
    """The native client as the client's finalizer frees it: its handle, the lock that
    orders the calls on it, and the reader of its dispatch descriptor, which the free
    removes. The finalizer stays in a module global (``weakref.finalize``'s registry)
    until it runs, so this holds the loop watching the descriptor only weakly: a loop
    that the application drops unclosed, with an open client on it (whose reader holds
    the client, see :class:`_Keeper`), is then garbage with that client, and the
    collector frees both, as the official client's tasks go with their loop. The
    :class:`_Poller`, which only the client and the reader hold, keeps the loop strongly
    (the send path reads it per message)."""

    __slots__ = ("handle", "lock", "fd", "loop", "pid")

    def __init__(self, handle: int) -> None:
        self.handle = handle
        self.lock = threading.RLock()
        self.fd = -1  # the dispatch descriptor, once a loop watches it
        self.loop: "Optional[weakref.ref[asyncio.AbstractEventLoop]]" = None  # the loop watching it
        self.pid = os.getpid()  # a fork() child leaves the client and the loop alone

    def remove_reader(self) -> None:
        """Stop watching the descriptor, unless its loop is closed or collected (its
        selector, and the reader with it, is gone then)."""
        loop = self.loop() if self.loop is not None else None
        self.loop = None
        if loop is not None and not loop.is_closed():
            loop.remove_reader(self.fd)

    def in_fork_child(self) -> bool:
        """True in a fork() child of the process that made the client."""
        return os.getpid() != self.pid

    def free(self) -> None:
        """Stop dispatching and free the native client (the client's finalizer). Not in a
        fork() child: its copy of the loop's epoll instance is the parent's, so removing
        the reader there would remove it from the parent's loop."""
        if self.in_fork_child():
            return
        loop = self.loop() if self.loop is not None else None
        if loop is not None and loop.is_running() and _running_loop() is not loop:
            # Another thread runs the loop: unregister and free there, so that the
            # descriptor is never closed while the loop still watches it.
            try:
                loop.call_soon_threadsafe(self.free_now)
                return
            except RuntimeError:
                pass
        self.free_now()

    def free_now(self) -> None:
        """Stop dispatching and free the native client, on the thread of the loop watching
        its descriptor (or with that loop not running)."""
        with self.lock:
            handle, self.handle = self.handle, 0
            if handle:
                self.remove_reader()
                _base.free_client(handle)


class _Poller:
    """Runs the native client's callbacks on the event loop that opened it.

    The client is in poll dispatch mode: its descriptor becomes readable when callbacks
    are queued, and a reader on the loop runs them with ``wps_client_dispatch_into``.
    Completions then reach their futures with no thread hop, and events their listeners,
    once that call has returned. Once the client is freed, the library runs what is left
    on its own thread (posted to the loop).
    """

    BATCH = 256  # callbacks and records per reader wake-up; the descriptor stays readable for more
    FLUSH_EVERY = 32  # messages per run handed over at once; bounds how long the first waits
    QUIET = 50e-6  # seconds: a message this long after the previous one is sent at once

    def __init__(self, native: _NativeClient, sink: _AsyncSink) -> None:
        self._native = native  # what the client's finalizer frees
        self._lock = native.lock
        self._sink = sink  # where the events go
        self._delivering = False  # their listeners are running
        # The loop watching the descriptor (``native.loop``, held strongly here); left set
        # once the client is freed, when nothing is dispatched any more.
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        # The loops that dispatched the client: when the one dispatching it is closed, those
        # still open may await its operations (see :meth:`suspend_if_closed`).
        self._loops: "weakref.WeakSet[asyncio.AbstractEventLoop]" = weakref.WeakSet()
        # The loop on which a flush of the deferred sends is scheduled. Per loop: a send
        # deferred on one loop may count only on a flush of its own loop, which runs after
        # it on that loop's next pass, never on one of a loop that may never run again
        # (stopped) or that runs on another thread (busy, or its flush ran before the send).
        self._flush_loop: Optional[asyncio.AbstractEventLoop] = None
        self._deferred = 0  # messages deferred since the last hand-over
        self._last_send = 0.0  # time.monotonic() of the last acked send

    @property
    def alive(self) -> bool:
        """Whether the native client is not freed yet."""
        return bool(self._native.handle)

    def running_loop(self) -> asyncio.AbstractEventLoop:
        """This thread's running loop: the attached one when it runs on this thread (read
        without ``asyncio.get_running_loop()``, a system call per call on Python 3.11)."""
        loop = self._loop
        if loop is not None and getattr(loop, "_thread_id", None) == threading.get_ident():
            return loop
        return asyncio.get_running_loop()

    def in_fork_child(self) -> bool:
        """True in a fork() child of the process that made the client (see ``free``)."""
        return self._native.in_fork_child()

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Dispatch on ``loop`` (the running loop) from now on. A client suspended since
        its last loop was closed resumes; the messages it dropped meanwhile are logged."""
        if self._loop is loop:
            return
        with self._lock:
            native = self._native
            if self._loop is loop or not native.handle:
                return
            # Asked first: refused (in a fork() child), the reader is left on the old loop,
            # whose epoll instance is the parent's there.
            fd = ctypes.c_int(-1)
            status = lib.wps_client_dispatch_fd(native.handle, ctypes.byref(fd))
            if status != _native.STATUS_OK:
                message = f"{_native.status_str(status)}: {_native.last_error_message()}"
                raise WebPubSubClientError(message, status=status)
            self._loop = None
            native.remove_reader()
            dropped = ctypes.c_uint64(0)
            lib.wps_client_dispatch_resume(native.handle, ctypes.byref(dropped))
            if dropped.value:
                _LOGGER.warning(
                    "%d messages came while no event loop ran the client (its loop was "
                    "closed while it was open); they were dropped",
                    dropped.value,
                )
            # The reader carries the keeper: this loop holds the running client now.
            loop.add_reader(fd.value, self.dispatch, self._sink.listeners.keeper(self), loop)
            self._loop, native.fd, native.loop = loop, fd.value, weakref.ref(loop)
            self._loops.add(loop)
            sink_loop = self._sink.loop
            if sink_loop is not None and sink_loop.is_closed():
                # The loop that opened the client is gone (an asyncio.run ended): the
                # listeners move to this one, which dispatches now, instead of every event
                # being dropped on the way to the closed loop.
                self._sink.bind(loop)

    def orphaned(self) -> bool:
        """Whether the loop the client dispatches on was closed while it was open (read
        by a fire-and-forget send, which otherwise never attaches the client)."""
        loop = self._loop
        return loop is not None and loop.is_closed()

    def suspend_if_closed(self) -> None:
        """The loop dispatching the client let its reader go. If that loop was closed (an
        ``asyncio.run`` ended with the client open) and the client is not freed (the
        application refers to it), the loops that dispatched it before and are not closed
        are asked to dispatch it again: another thread's loop that awaits an operation it
        started before this loop took the client over gets its completion, and the
        listeners their events (the first of them to run takes it). With none, nothing
        runs its events until another loop uses it: the library drops and counts the
        messages that come meanwhile, rather than queueing them without end (its other
        events are kept). The client goes on (sequence acks, recoveries, reconnections),
        and :meth:`attach` resumes it on the next loop, with a warning that counts them.
        Not when the reader was removed (the client moved to another loop, or is being
        freed).
        A client in a reference cycle is suspended (or taken over) too, until the
        collector frees it: as that cannot be told from one the application refers to,
        the warning waits for the next loop.
        The registry's handlers of the operations awaited on closed loops are dropped
        (their completions, which no loop can deliver, are skipped then): a closed
        loop's task awaiting one (a ``loop.close()`` by hand cancels none, unlike
        ``asyncio.run``) held the client through them, for good."""
        with self._lock:
            if not self._native.handle or not self.orphaned():
                return
            REGISTRY.drop_where(_undeliverable)
            handed = False
            for loop in list(self._loops):
                if loop.is_closed():
                    self._loops.discard(loop)
                    continue
                try:
                    loop.call_soon_threadsafe(self._adopt, loop)
                    handed = True
                except RuntimeError:  # closed meanwhile
                    self._loops.discard(loop)
            if not handed:
                lib.wps_client_dispatch_suspend(self._native.handle)

    def _adopt(self, loop: asyncio.AbstractEventLoop) -> None:
        """On ``loop``, asked by :meth:`suspend_if_closed`: dispatch the client here,
        unless another loop took it since."""
        with self._lock:
            if self.orphaned():
                self.attach(loop)

    def dispatch(self, _keeper: Optional[_Keeper] = None, loop: Optional[asyncio.AbstractEventLoop] = None) -> None:
        """Run the queued callbacks, which only take what they bring (the event callback
        converts its event, a completion on this loop is kept for its future), and the
        records the library wrote instead: acked sends (``SEND_RECORD``) and messages (no
        foreign callback per message). Then, once the native call has returned, the
        listeners get the events and the futures their results: the callbacks' in the
        order they came, then the messages', then the acked sends'. On the loop's thread;
        up to ``BATCH`` of them, and the descriptor stays readable for more. What the
        reader passes: ``_keeper`` (see :class:`_LoopHeld`), unused here, and ``loop``,
        the loop it was added to."""
        if self._delivering:  # nested in a listener of our events: after them, in order
            return
        out = _dispatch_buffers()
        counts = _native.DISPATCH_COUNTS.unpack_from
        native = self._native
        with self._lock:
            if loop is not None and loop is not self._loop:
                # Another thread moved the client to its loop after this one took the reader
                # to run: what comes is that loop's to dispatch (its futures, its wake-up).
                return
            done = 0
            while done < self.BATCH and native.handle:  # a listener may free the client
                events: List[_Pending] = []
                outer = _pending()  # None but in a test's nested call
                outer_loop = getattr(_THREAD_BUFFERS, "loop", None)
                _THREAD_BUFFERS.pending, _THREAD_BUFFERS.loop = events, self._loop
                try:
                    status = lib.wps_client_dispatch_into(native.handle, self.BATCH - done, out.ref)
                finally:
                    _THREAD_BUFFERS.pending, _THREAD_BUFFERS.loop = outer, outer_loop
                # all taken from the buffers first: a listener may dispatch another client of this thread
                step = 0
                if status != _native.STATUS_OK:  # the counts were not written
                    _LOGGER.error("dispatch failed: %s", _native.last_error_message())
                else:
                    ran, acks, messages, message_bytes = counts(out.counts, _native.DISPATCH_COUNTS_OFFSET)
                    if messages:
                        events += _base.message_records(out.message_view[:message_bytes], messages)
                    if acks:
                        # After the messages, whose order against them the library does not
                        # keep: the service sends a group message before the ack of the send
                        # that published it, and the listeners of that message start before
                        # the sending code resumes, as in the official client.
                        records = out.ack_view[: acks * _native.ACK_RECORD.size]
                        if events:  # copied: the buffer is reused
                            events.append((None, (_settle, self._loop, bytes(records))))
                        else:
                            _settle(self._loop, records)
                    step = ran + acks + messages
                if events:
                    self._delivering = True
                    try:
                        self._sink.deliver(events, self)
                    finally:
                        self._delivering = False
                if not step:
                    break
                done += step

    def prepare_send(self) -> Tuple[asyncio.AbstractEventLoop, int]:
        """For an acked send from the running loop: that loop, attached so that it
        dispatches the completion, and the send's handover flag. One call per message.

        The flag is usually ``SEND_DEFERRED``, with a flush scheduled for once the loop
        has run the callbacks ready now: the flush writes the run of messages itself, as
        one batch, or wakes the library's thread once for it, instead of once each. It is
        ``0`` (handed over at once, after the deferred ones) every ``FLUSH_EVERY``
        messages, so that the first of a long run already travel, and for a message
        ``QUIET`` seconds after the previous one: it most likely starts no run
        (sequential awaited sends), and waiting for the next loop pass would only add
        that pass to its round trip."""
        loop = self._loop
        if loop is None or getattr(loop, "_thread_id", None) != threading.get_ident():
            loop = asyncio.get_running_loop()
            self.attach(loop)
        now = time.monotonic()
        quiet = now - self._last_send >= self.QUIET
        self._last_send = now
        if quiet or self._deferred >= self.FLUSH_EVERY - 1:
            self._deferred = 0
            return loop, 0
        self._deferred += 1
        if self._flush_loop is not loop:
            self._flush_loop = loop
            loop.call_soon(self._flush_later, loop)
        return loop, _native.SEND_DEFERRED

    def _flush_later(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._flush_loop is loop:  # else another loop's is scheduled since
            self._flush_loop = None
        self._deferred = 0  # before the call: a message deferred after it counts again
        with self._lock:
            if self._native.handle:
                lib.wps_client_flush_deferred(self._native.handle)

    def cancel(self, op_id: int) -> None:
        """Cancels operation ``op_id`` of the native client, unless it is freed already (its
        operations were then completed): a cancelled await must not reach a freed handle."""
        with self._lock:
            if self._native.handle:
                lib.wps_client_cancel(self._native.handle, op_id)


def _settle(loop: Optional[asyncio.AbstractEventLoop], records: Union[memoryview, bytes]) -> None:
    """The futures of the acked sends in ``records`` (``wps_ack_record``s written by
    ``wps_client_dispatch_into`` on ``loop``'s thread) get their results."""
    take = REGISTRY.take
    for key, _op_id, ack_id, has_ack_id, is_duplicated in _native.ACK_RECORD.iter_unpack(records):
        future = take(key, None)
        if future is None or future.done():
            continue
        result = WebPubSubResult(ack_id if has_ack_id else None, is_duplicated)
        own = future.get_loop()
        if own is loop:
            future.set_result(result)
            continue
        try:  # sent from another loop, which awaits it
            own.call_soon_threadsafe(_resolve, future, result)
        except RuntimeError:  # closed: nothing awaits the future any more
            _LOGGER.debug("event loop closed before a send completed")


def _on_acked(key: Optional[int], raw: Any) -> None:
    """Completion of a send with an automatic ackId (see ``WebPubSubClient._send``) that
    was not written as a record: a failure, or any outcome once the client was freed (a
    library thread then runs what was left). Its future, stored under ``key``, gets the
    result or the error."""
    try:
        future = REGISTRY.pop(key)
        if future is None:
            return
        outcome = _base.completion_outcome(raw.contents)
        loop = future.get_loop()
        if _on_own_thread(loop):  # dispatched by the loop (poll mode)
            if not _defer(_resolve, future, outcome):
                _resolve(future, outcome)
            return
        _callbacks.keep_thread_state()  # a library thread (the client was freed) or another loop
        loop.call_soon_threadsafe(_resolve, future, outcome)
    except RuntimeError:
        _LOGGER.debug("event loop closed before a send completed")
    except BaseException:  # noqa: BLE001 - nothing may propagate into C
        _LOGGER.exception("error while completing a send")


def _resolve(future: "asyncio.Future[Any]", outcome: Any) -> None:
    """Gives ``future`` its result, or its error when ``outcome`` is an exception,
    unless it is done already (cancelled)."""
    if future.done():
        return
    if isinstance(outcome, Exception):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


_ACKED_TRAMPOLINE = _native.COMPLETION_CB(_on_acked)

# The C forms (plain, async, with_ack_id_async) of each send.
_GROUP_FORMS = (
    lib.wps_client_send_to_group,
    lib.wps_client_send_to_group_async,
    lib.wps_client_send_to_group_with_ack_id_async,
)
_EVENT_FORMS = (lib.wps_client_send_event, lib.wps_client_send_event_async, lib.wps_client_send_event_with_ack_id_async)


class WebPubSubClient:  # pylint: disable=too-many-instance-attributes
    """The asyncio Web PubSub client; same keywords as :class:`webpubsub_client.WebPubSubClient`
    (unused ones ignored as there).

    ``credential``: the client access URL, or a :class:`WebPubSubClientCredential` (or another
    object with a ``get_client_access_url()`` method, plain or coroutine, such as the official
    package's credential).

    Every operation is a coroutine; cancelling one cancels it in the library (an invoke
    sends ``cancelInvocation``). Listeners may be plain functions or coroutine functions;
    they run on the event loop that called :meth:`open`, in event order (a coroutine
    listener runs in a task of its own, as in the official client: started at once from
    Python 3.12, on the loop's next pass before).
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
        if not isinstance(credential, str) and not _base.is_credential(credential):
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
        self._listeners = _base.Listeners()
        self._sink = _AsyncSink(self._listeners)
        source: Union[str, Callable[[int], None]]
        if isinstance(credential, str):
            _base.check_url(credential, "credential")
            source = credential
        else:
            source = self._sink.credential_request(credential, max(start_timeout, 1.0))
        self._handle = _base.new_native_client(source, options, _SinkRef(self._sink))
        self._sink.listeners.handle = self._handle
        native = _NativeClient(self._handle)
        self._poller = _Poller(native, self._sink)
        self._finalizer = weakref.finalize(self, native.free)

    # ---- lifecycle ---------------------------------------------------------------

    async def open(self) -> None:
        """Connect to the service; returns once connected. Cancelled (``asyncio.wait_for``),
        it stops the client and ends once it is stopped, so that ``open()`` may be retried.

        :raises OpenClientError: the client is not stopped, or the connection failed. An
            exception the credential's provider raised is raised as it is, as officially.
        """
        handle = self._live_handle()
        if _base.state_of(handle) is not WebPubSubClientState.STOPPED:
            raise OpenClientError("Client can be only started when it's Stopped")
        self._sink.bind(asyncio.get_running_loop())
        self._sink.credential_error = None
        self._sink.stop_error = None  # it tells why the latest run stopped
        _callbacks.enable_native_logging(trace=self._log_messages)  # the logger's level now (see the sync client)
        self._sink.listeners.hold(self)
        try:
            completion = await self._run(lib.wps_client_start_async, handle, checked=False)
        except asyncio.CancelledError:
            # No connection behind a cancelled open: it ends once the client is stopped (as
            # a sync open() that Ctrl-C ends), so that the next open() may follow at once.
            # Its provider is cancelled at once, before its own cancellation (by the end
            # of ``asyncio.run``) is seen as a failure; one asked for meanwhile, once stopped.
            self._sink.cancel_providers()
            try:
                await self._run(lib.wps_client_stop_async, handle, checked=False)
            finally:
                self._sink.cancel_providers()
            raise
        finally:
            # Again after the start: a stopped event of an earlier run, delivered while this
            # one started, may have let the listeners go.
            self._sink.listeners.hold(self)
            self._sink.listeners.release_if_stopped()
        if completion.status != _native.STATUS_OK:
            error = self._sink.credential_error
            if completion.status == _native.STATUS_CREDENTIAL_FAILED and error is not None:
                self._sink.credential_error = None
                self._sink.provider_failures.forget(error)
                raise error  # what the provider raised, as the official open() raises it
            raise _base.open_error(completion.status, completion.error_message)

    async def close(self) -> None:
        """Stop the client. Returns once it is stopped and the coroutine listeners that were
        running when it was called have ended: as officially, those still running 1 s after
        the stop are cancelled (with a warning). On a client already stopped (by the
        service, say), the events of that stop reach their listeners first, and its
        coroutine listeners are waited for as running ones: a program may end
        ``asyncio.run`` right after. A listener still running is cancelled once, however
        many close() calls wait for it. In a fork() child it does nothing: the client and its
        connection are the parent's."""
        if not self._finalizer.alive or self._poller.in_fork_child():
            return
        stopped = _base.state_of(self._handle) is WebPubSubClientState.STOPPED
        # The listeners running now are waited for once stopped, as officially; not those
        # the stop starts (disconnected, stopped: one may reopen), nor the caller's own
        # (even through a task it awaits), nor one that closes the client too. On a stopped
        # client, those running once the stop completed: it brought no events, and those
        # delivered meanwhile came before it.
        own = self._sink.enter_close()
        try:
            listeners = None if stopped else self._sink.running_listeners(own)
            # completes after the disconnected and stopped events, dispatched before it; on
            # a stopped client, after the events queued by then (those of its stop too)
            completion = await self._run(lib.wps_client_stop_async, self._handle, checked=False)
            if listeners is None:
                listeners = self._sink.running_listeners(own)
            self._sink.cancel_providers()
            status = completion.status
            if status not in (_native.STATUS_OK, _native.STATUS_ILLEGAL_STATE):
                raise WebPubSubClientError(f"{_native.status_str(status)}: {completion.error_message}", status=status)
            await self._sink.finish_listeners(listeners)
        finally:
            self._sink.leave_close(own)

    def is_connected(self) -> bool:
        """True while the client has an open connection."""
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

    async def __aenter__(self) -> "WebPubSubClient":
        await self.open()
        return self

    async def __aexit__(self, exc_type: Any, exc_val: Any, exc_tb: Any) -> None:
        await self.close()

    # ---- listeners ---------------------------------------------------------------

    @overload
    async def subscribe(
        self,
        event: Literal[CallbackType.CONNECTED, "connected"],
        listener: Callable[[OnConnectedArgs], Any],
    ) -> None: ...

    @overload
    async def subscribe(
        self,
        event: Literal[CallbackType.DISCONNECTED, "disconnected"],
        listener: Callable[[OnDisconnectedArgs], Any],
    ) -> None: ...

    @overload
    async def subscribe(
        self,
        event: Literal[CallbackType.STOPPED, "stopped"],
        listener: Callable[[], Any],
    ) -> None: ...

    @overload
    async def subscribe(
        self,
        event: Literal[CallbackType.SERVER_MESSAGE, "server-message"],
        listener: Callable[[OnServerDataMessageArgs], Any],
    ) -> None: ...

    @overload
    async def subscribe(
        self,
        event: Literal[CallbackType.GROUP_MESSAGE, "group-message"],
        listener: Callable[[OnGroupDataMessageArgs], Any],
    ) -> None: ...

    @overload
    async def subscribe(
        self,
        event: Literal[CallbackType.REJOIN_GROUP_FAILED, "rejoin-group-failed"],
        listener: Callable[[OnRejoinGroupFailedArgs], Any],
    ) -> None: ...

    async def subscribe(self, event: Union[CallbackType, str], listener: Callable[..., Any], **kwargs: Any) -> None:
        """Call ``listener`` (a function or coroutine function) for every ``event``.

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
    async def unsubscribe(
        self,
        event: Literal[CallbackType.CONNECTED, "connected"],
        listener: Callable[[OnConnectedArgs], Any],
    ) -> None: ...

    @overload
    async def unsubscribe(
        self,
        event: Literal[CallbackType.DISCONNECTED, "disconnected"],
        listener: Callable[[OnDisconnectedArgs], Any],
    ) -> None: ...

    @overload
    async def unsubscribe(
        self,
        event: Literal[CallbackType.STOPPED, "stopped"],
        listener: Callable[[], Any],
    ) -> None: ...

    @overload
    async def unsubscribe(
        self,
        event: Literal[CallbackType.SERVER_MESSAGE, "server-message"],
        listener: Callable[[OnServerDataMessageArgs], Any],
    ) -> None: ...

    @overload
    async def unsubscribe(
        self,
        event: Literal[CallbackType.GROUP_MESSAGE, "group-message"],
        listener: Callable[[OnGroupDataMessageArgs], Any],
    ) -> None: ...

    @overload
    async def unsubscribe(
        self,
        event: Literal[CallbackType.REJOIN_GROUP_FAILED, "rejoin-group-failed"],
        listener: Callable[[OnRejoinGroupFailedArgs], Any],
    ) -> None: ...

    async def unsubscribe(self, event: Union[CallbackType, str], listener: Callable[..., Any], **kwargs: Any) -> None:
        """Remove a listener added with :meth:`subscribe`.

        An ``event`` that names no event is logged at error level and ignored, as in
        :meth:`subscribe`; so is a listener that is not subscribed (logged at info level).
        """
        if kwargs:
            _base.ignore_keywords("unsubscribe", kwargs)
        self._listeners.remove(event, listener)

    # ---- operations --------------------------------------------------------------

    async def join_group(self, group_name: str, *, ack_id: Optional[int] = None, **kwargs: Any) -> WebPubSubResult:
        """Join ``group_name`` (see the sync client).

        :raises SendMessageError: the service refused, the ack timed out, or not connected.
        """
        return await self._group_op(lib.wps_client_join_group_async, "join_group", group_name, ack_id, kwargs)

    async def leave_group(self, group_name: str, *, ack_id: Optional[int] = None, **kwargs: Any) -> WebPubSubResult:
        """Leave ``group_name`` (see the sync client).

        :raises SendMessageError: the service refused, the ack timed out, or not connected.
        """
        return await self._group_op(lib.wps_client_leave_group_async, "leave_group", group_name, ack_id, kwargs)

    async def _group_op(
        self, start: Any, method: str, group_name: str, ack_id: Optional[int], kwargs: Dict[str, Any]
    ) -> WebPubSubResult:
        """Joins or leaves (``start``, the asynchronous C form) ``group_name``, the checks
        of both done (``ack_id`` as for the sync client)."""
        group = _base.check_name(group_name, "group_name")
        _base.check_ack_id(ack_id)
        if kwargs or self._log_messages:
            _base.operation_keywords(method, kwargs, group_name, log=self._log_messages)
        handle = self._live_handle()
        return _ack_result(await self._run(start, handle, group))

    async def send_to_group(
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
        """Publish ``content`` to ``group_name`` (see the sync client).

        :raises SendMessageError: the service refused, the ack timed out, or not connected.
        """
        group = _base.check_name(group_name, "group_name")
        kind, payload = _base.encode_content(content, data_type)
        if kwargs or self._log_messages:
            _base.operation_keywords("send_to_group", kwargs, group_name, payload, log=self._log_messages)
        if ack is True and no_echo is False and ack_id is None:  # the hot path: one coroutine frame
            future, op_id = self._start_acked(_GROUP_FORMS[1], group, kind, payload, 0)
            try:
                return await future
            except asyncio.CancelledError:
                self._poller.cancel(op_id)
                raise
        flags, ack_id = _base.send_flags(ack, no_echo, ack_id)
        return await self._send(_GROUP_FORMS, group, kind, payload, flags, ack, ack_id)

    async def send_event(
        self,
        event_name: str,
        content: Any,
        data_type: Union[WebPubSubDataType, str],
        *,
        ack_id: Optional[int] = None,
        ack: bool = True,
        **kwargs: Any,
    ) -> WebPubSubResult:
        """Send ``content`` as event ``event_name`` to the upstream (see the sync client).

        :raises SendMessageError: the service refused, the ack timed out, or not connected.
        """
        event = _base.check_name(event_name, "event_name")
        kind, payload = _base.encode_content(content, data_type)
        if kwargs or self._log_messages:
            _base.operation_keywords("send_event", kwargs, event_name, payload, log=self._log_messages)
        flags, ack_id = _base.send_flags(ack, ack_id=ack_id)
        return await self._send(_EVENT_FORMS, event, kind, payload, flags, ack, ack_id)

    async def _send(
        self, forms: Any, target: bytes, kind: int, payload: bytes, flags: int, ack: bool, ack_id: Optional[int]
    ) -> WebPubSubResult:
        """Sends through the C forms ``(plain, async, with_ack_id_async)`` of send_to_group or send_event."""
        plain, plain_async, with_ack_id_async = forms
        if ack_id is not None:
            handle = self._live_handle()
            flags |= self._poller.prepare_send()[1]
            completion = await self._run(
                with_ack_id_async, handle, target, kind, payload, len(payload), flags, ack_id, ack_id=ack_id
            )
            return _ack_result(completion)
        if not ack:
            # queued at once on this thread: the blocking form returns when the frame is queued
            _callbacks.ensure_main_check()
            handle = self._live_handle()
            if self._poller.orphaned():  # its loop was closed: this one dispatches it from now on
                self._poller.attach(self._poller.running_loop())
            _queue_now(plain(handle, target, kind, payload, len(payload), flags, None))
            return WebPubSubResult(None, False)
        future, op_id = self._start_acked(plain_async, target, kind, payload, flags)
        try:
            return await future
        except asyncio.CancelledError:
            self._poller.cancel(op_id)
            raise

    def _start_acked(
        self, start: Any, target: bytes, kind: int, payload: bytes, flags: int
    ) -> Tuple["asyncio.Future[WebPubSubResult]", int]:
        """Starts an acked send with an automatic ackId through the C form ``start``: its
        future, settled from the send's record (``SEND_RECORD``) or by ``_on_acked`` on
        failure, and its operation id. A plain function, not a coroutine: this is the hot
        path, and ``_run``'s extra calls and frames cost ~1 us per send."""
        handle = self._live_handle()
        loop, handover = self._poller.prepare_send()
        future: "asyncio.Future[WebPubSubResult]" = loop.create_future()
        key = REGISTRY.add(future)
        op_id = ctypes.c_uint64(0)
        flags |= handover | _native.SEND_RECORD
        status = start(handle, target, kind, payload, len(payload), flags, _ACKED_TRAMPOLINE, key, op_id)
        if status != _native.STATUS_OK:
            REGISTRY.pop(key)
            raise _base.operation_error(status)
        return future, op_id.value

    async def invoke_event(
        self,
        event_name: str,
        content: Any,
        data_type: Union[WebPubSubDataType, str],
        *,
        timeout: Optional[float] = None,
    ) -> InvokeEventResult:
        """Send ``content`` as event ``event_name`` and return the upstream's response (see
        the sync client: ``timeout`` in seconds, default ``ack_timeout``). Cancelling the
        awaiting task cancels the invocation at the service.

        :raises InvokeEventError: the upstream answered with an error, the call timed out, or
            not connected. It is not retried.
        """
        event = _base.check_name(event_name, "event_name")
        kind, payload = _base.encode_content(content, data_type)
        timeout_ms = _base.check_timeout(timeout)
        handle = self._live_handle()
        size = len(payload)
        completion = await self._run(
            lib.wps_client_invoke_event_async, handle, event, kind, payload, size, timeout_ms, invoke=True
        )
        return _base.invoke_result(completion.data_type, completion.data)

    # ---- internals ---------------------------------------------------------------

    def _live_handle(self) -> int:
        if not self._finalizer.alive:
            raise WebPubSubClientError("the client was freed (interpreter exit)")
        return self._handle

    async def _run(
        self,
        start: Callable[..., int],
        *args: Any,
        invoke: bool = False,
        ack_id: Optional[int] = None,
        checked: bool = True,
    ) -> Completion:
        """Start the asynchronous C operation ``start(*args, callback, user_data, op_id)``
        and await its completion on this loop (``checked``: a failed completion raises,
        else the caller reads its status)."""
        loop = self._poller.running_loop()
        self._poller.attach(loop)  # completions are dispatched by the loop awaiting them
        future: "asyncio.Future[Completion]" = loop.create_future()

        batch = self._sink.batch
        if batch is None or batch.loop is not loop:
            batch = _LoopBatch(loop)
        key = REGISTRY.add(_Completer(future, threading.get_ident(), batch))
        op_id = ctypes.c_uint64(0)
        status = start(*args, _callbacks.COMPLETION_TRAMPOLINE, key, op_id)
        if status != _native.STATUS_OK:
            REGISTRY.pop(key)
            raise _base.operation_error(status, invoke=invoke, ack_id=ack_id)
        try:
            completion = await future
        except asyncio.CancelledError:
            self._poller.cancel(op_id.value)
            raise
        if checked and completion.status != _native.STATUS_OK:
            raise _base.operation_error(
                completion.status,
                invoke=invoke,
                ack_id=completion.ack_id if completion.ack_id is not None else ack_id,
                name=completion.error_name,
                message=completion.error_message,
                service_message=completion.service_message,
            )
        return completion


class _Completer:
    """The completion handler of an operation that :meth:`WebPubSubClient._run` awaits
    (``future``, of the loop ``batch`` runs on, which runs on ``thread``): run by that
    loop's dispatch (poll mode), else posted to it through ``batch`` (from a library
    thread once the client was freed, or from another loop), after the events posted
    before it. A class, not a closure: :func:`_undeliverable` tells it apart."""

    __slots__ = ("future", "thread", "batch")

    def __init__(self, future: "asyncio.Future[Completion]", thread: int, batch: _LoopBatch) -> None:
        self.future = future
        self.thread = thread
        self.batch = batch

    def __call__(self, completion: Completion) -> None:
        future = self.future
        if _on_loop(self.batch.loop, self.thread):  # dispatched by this loop (poll mode)
            if not _defer(_resolve, future, completion):
                _resolve(future, completion)
            return
        try:  # from a library thread (after the client was freed) or another loop
            self.batch.post(_resolve, future, completion)
        except RuntimeError:
            _LOGGER.debug("event loop closed before an operation completed")


def _undeliverable(entry: Any) -> bool:
    """Whether a callback registry entry is the handler of an operation awaited on a
    closed loop, whose completion no loop can deliver any more: an acked send's future
    (see :meth:`WebPubSubClient._start_acked`), or a :class:`_Completer`."""
    if isinstance(entry, _Completer):
        entry = entry.future
    return isinstance(entry, asyncio.Future) and entry.get_loop().is_closed()


def _queue_now(status: int) -> None:
    """Check the status of a fire-and-forget message queued by the blocking C call.

    That call returns as soon as the frame is queued, or at once with an error when the
    client is not connected, so it runs on the loop thread: no executor, completion
    callback or thread hop. It waits only while the library's operation queue is full,
    which the connection task empties in every state (a recovering connection queues
    what it takes, and once its own queue is full new sends fail at once instead): that
    wait is the backpressure a fast producer needs. On the main thread, signal handlers
    run during that wait (see ``_callbacks``): the exception one raised is raised here.
    """
    if status == _native.STATUS_INTERRUPTED:
        _callbacks.raise_interrupt()
    if status != _native.STATUS_OK:
        raise _base.operation_error(status)


def _ack_result(completion: Completion) -> WebPubSubResult:
    return WebPubSubResult(completion.ack_id, completion.is_duplicated)
