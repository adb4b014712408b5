"""The Python threads that run the sync clients' listeners.

A sync client's native client is in poll dispatch mode: its descriptor is readable while
events are queued. A small pool of daemon threads (``min(cpus, 4)``, as the library's own
dispatcher pool), each waiting for the descriptors of the clients pinned to it, takes
their events with ``wps_client_dispatch_into``: messages and the pipelined sends' acks as
records, the other events (and the sends' failures) through the callbacks, which only
convert them. The listeners run, and the sends' futures settle (see :mod:`._futures`),
once that call has returned, in plain Python, one client's in event order.

A client stays pinned to its thread, unless a listener of another client holds that
thread: the watchdog (a daemon thread that looks at the pool every ``_Watchdog.TICK``
while dispatches run, and sleeps once none has for a second) finds a thread that has
been inside one client's dispatch at two looks in a row (100 to 200 ms), and pins that
thread's other clients to another one (the pool's thread with the fewest clients that
is not held itself, or a new one when all are). They stay there, as the held client
stays on its thread. A move takes the client's lock, between two of its dispatches: the
new selector watches its descriptor before the old one leaves it (a thread refused leaves
it where it was, tried again at the next look), and the old thread skips it if it had
seen it readable before the move (:meth:`Dispatch.run`), so that its events keep their
order and its dispatch never runs on two threads at once. A new client is pinned to a
thread not held (a new one when all are: the watchdog may sleep meanwhile). A new thread
is added only when every other one is held, so the pool never exceeds the larger of
``min(cpus, 4)`` and one more than the threads held at once; a thread left without
clients stays in the pool, for new and moved clients. The workers only count their
dispatches and name the one running (no lock, no wake-up of the watchdog but by the
first dispatch after it slept).

Not on the library's threads: at interpreter exit Python ends a thread that takes the
interpreter lock again with ``pthread_exit``, and a listener still running then (a loop
that sleeps or waits with a timeout) would be ended inside the library's frames, which
aborts the process. Here it is ended in Python's and ctypes' frames only, as a listener
on the official client's daemon threads is.
"""

from __future__ import annotations

import ctypes
import itertools
import logging
import os
import select
import selectors
import threading
import time
import weakref
from typing import Any, Dict, List, Optional, Tuple, Union

from . import _base, _callbacks, _futures, _native
from ._native import lib
from .models import WebPubSubClientError, WebPubSubResult

_LOGGER = logging.getLogger("webpubsub_client")
_COUNTS = _native.DISPATCH_COUNTS.unpack_from
_ACK_RECORD_SIZE = _native.ACK_RECORD.size


class Dispatch:
    """How one sync client's events reach its listeners: its native handle until the
    client's finalizer (:meth:`free`) frees it, its descriptor, watched by the worker
    it is pinned to, and its ``sink``, which converts the events of the event callback
    and keeps the pipelined sends' outcomes among them (``sink.defer(future, outcome)``,
    both taken by ``sink.take()``), then calls the listeners and settles those futures
    (``sink.deliver(events, dispatch)``)."""

    BATCH = 256  # callbacks per native call; a client with more queued stays readable

    def __init__(self, handle: int, sink: Any, client: Any) -> None:
        fd = ctypes.c_int(-1)
        status = lib.wps_client_dispatch_fd(handle, ctypes.byref(fd))
        if status != _native.STATUS_OK:
            message = f"{_native.status_str(status)}: {_native.last_error_message()}"
            raise WebPubSubClientError(message, status=status)
        self.handle = handle
        # Excludes a dispatch from the free of the handle and from a move to another
        # worker. Reentrant: the client may be collected on its worker thread, during a
        # dispatch (its finalizer then frees it).
        self.lock = threading.RLock()
        self._sink = sink
        self._client = weakref.ref(client)
        self._fd = fd.value
        self._pid = os.getpid()
        # True from a dispatch's take of events until their listeners have run; its end
        # is notified while a close waits (see wait_delivered).
        self._running = False
        self._waiting = 0
        self._delivered = threading.Condition()
        # The pipelined sends' outcomes that the library runs at the client's free, on its
        # own thread: settled by one Python thread at a time (see complete), ``_settling``
        # while one will (the freeing thread once the free returns, or a thread of its own).
        self._left_lock = threading.Lock()
        self._settling = False
        self._left: List[Tuple[_futures.SendFuture, Union[WebPubSubResult, Exception]]] = []
        self._settler: Optional[int] = None  # the thread that settles them, while it does
        with self.lock:
            try:
                self.worker = _assign()
                self.worker.watch(self._fd, self)
            except OSError as exc:  # no descriptor for a new worker's selector (EMFILE)
                raise WebPubSubClientError(
                    f"cannot create the client: cannot watch its dispatch descriptor: {exc}"
                ) from exc
            except RuntimeError as exc:  # Thread.start refused (the thread limit): the watchdog's or the worker's
                raise WebPubSubClientError(f"cannot create the client: cannot start a dispatch thread: {exc}") from exc

    def run(self, out: _base.DispatchBuffers, worker: _Worker) -> None:
        """On ``worker``'s thread, once the descriptor is readable: take the queued events
        (up to ``BATCH`` callbacks and the records that fit ``out``), then hand them to
        the listeners, those of the event callback first (they came before the records),
        the pipelined sends' failures among them in their place (see :meth:`complete`),
        and last the futures of the sends that succeeded (``wps_ack_record``s): a group
        message comes before the ack of the send that published it, and its listeners
        run before that send's future is done. Nothing if the client was moved to
        another worker since (the descriptor was seen readable before the move)."""
        with self.lock:
            handle = self.handle
            if not handle or self.worker is not worker:
                return
            self._running = True
            status = lib.wps_client_dispatch_into(handle, self.BATCH, out.ref)
        try:
            events: List[Any] = self._sink.take()
            acks = 0
            if status != _native.STATUS_OK:  # the counts were not written
                _LOGGER.error("dispatch failed: %s", _native.last_error_message())
            else:
                _ran, acks, messages, size = _COUNTS(out.counts, _native.DISPATCH_COUNTS_OFFSET)
                if messages:
                    events += _base.message_records(out.message_view[:size], messages)
            try:
                if events:
                    self._sink.deliver(events, self)
            finally:  # no listener can reuse ``out``: only this loop dispatches on this thread
                if acks:
                    _futures.settle(out.ack_view[: acks * _ACK_RECORD_SIZE])
        finally:
            self._running = False
            if self._waiting:  # after the flag: a waiter counted later sees it cleared
                with self._delivered:
                    self._delivered.notify_all()

    def in_fork_child(self) -> bool:
        """True in a fork() child of the process that made the client."""
        return os.getpid() != self._pid

    def settles_here(self) -> bool:
        """True on the thread that runs this client's listeners and settles its pipelined
        sends' futures, while it does: inside the client's dispatch, or settling what its
        free left. A future not done yet would wait for ever there."""
        return self._dispatching_here() or self._settler == threading.get_ident()

    def _dispatching_here(self) -> bool:
        """True inside this client's dispatch, on its worker's thread."""
        worker = self.worker
        return worker.current is self and worker.is_current()

    def complete(self, future: _futures.SendFuture, outcome: Union[WebPubSubResult, Exception]) -> None:
        """The outcome of a pipelined send that came through its completion callback (see
        :mod:`._futures`): inside this client's dispatch, it is settled after the native
        call, in order with the events. Else the library runs it at the client's free, on
        its own thread, where no application code may run (see
        :func:`._callbacks.quiesce_native`): it is settled by the freeing thread once the
        free has returned, or, when the library deferred the teardown (a free from inside
        a callback: a collection during one), by a thread of its own (:meth:`_settle_left`)."""
        if self._dispatching_here():
            self._sink.defer(future, outcome)
            return
        _callbacks.keep_thread_state()
        with self._left_lock:
            self._left.append((future, outcome))
            if self._settling:
                return
            self._settling = True
        try:
            threading.Thread(target=self._settle_left, name="webpubsub-settle", daemon=True).start()
        except RuntimeError:  # refused (the thread limit): settled here rather than never
            self._settle_left()

    def wait_delivered(self, timeout: float) -> None:
        """Waits, at most ``timeout`` seconds, until the listeners of the events queued by
        now have run: none is queued (the descriptor, readable while one is, cleared by
        the dispatch that takes the last) and none is being delivered. Not on the thread
        that runs them (a listener of this client, or of one pinned to the same thread),
        nor in a fork() child (it has no worker; the descriptor is the parent's). It wakes
        as often as the library's interrupt check: a signal that another thread of the
        process took has its handler run on the main thread meanwhile (Ctrl-C ends the wait)."""
        if self.worker.is_current() or self.in_fork_child():
            return
        queued = select.poll()
        queued.register(self._fd, select.POLLIN)
        deadline = time.monotonic() + timeout
        with self._delivered:
            self._waiting += 1
            try:  # the descriptor first: the dispatch that cleared it is running
                while queued.poll(0) or self._running:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return
                    self._delivered.wait(min(remaining, _callbacks.INTERRUPT_CHECK_MS / 1000))
            finally:
                self._waiting -= 1

    def move(self, old: _Worker, new: _Worker) -> None:
        """Pin the client to ``new`` if it is pinned to ``old`` and its dispatch is not
        running there: ``new`` watches its descriptor (or refuses, and nothing changed)
        before it leaves ``old``'s selector, and ``old`` no longer runs it (see
        :meth:`run`). The client is held meanwhile, so that its finalizer cannot free it
        (and close the descriptor) halfway."""
        client = self._client()
        if client is None:  # being freed
            return
        with self.lock:
            if self.handle and self.worker is old and old.current is not self:
                new.watch(self._fd, self)
                old.unwatch(self._fd)
                self.worker = new

    def free(self) -> None:
        """Free the native client (the client's finalizer), its descriptor no longer
        watched and no dispatch running. At interpreter exit and in a fork() child it is
        left to :func:`_base.free_client` alone: at exit the client is only stopped, its
        last events still reach the listeners; in a child the worker's polling instance is
        the parent's, which must keep watching the descriptor."""
        if self.in_fork_child() or not threading.main_thread().is_alive():
            _base.free_client(self.handle)
            return
        with self.lock:
            handle, self.handle = self.handle, 0
            worker = self.worker
        if handle:
            worker.unwatch(self._fd)
            with self._left_lock:
                self._settling = True
            try:
                _base.free_client(handle)
            finally:
                self._settle_left()

    def _settle_left(self) -> None:
        """Settle the futures whose outcomes the free left, on this thread (the freeing
        one, or one of its own), until none is left (``_settling`` set by the caller)."""
        self._settler = threading.get_ident()
        try:
            while True:
                with self._left_lock:
                    left, self._left = self._left, []
                    if not left:
                        self._settling = False
                        return
                for future, outcome in left:
                    _futures.settle_one(future, outcome)
        finally:
            self._settler = None


class _Worker:
    """A daemon thread (started with its first client) that runs the dispatch of each of
    its clients whose descriptor is readable. Clients join and leave it from any thread:
    the selector (epoll, kqueue) takes them while the thread waits.

    For the watchdog: ``runs`` counts the dispatches begun, and ``current`` is the one
    running (None between them), set after the count (read before it: a dispatch seen
    running with the count of the last look has run since then)."""

    def __init__(self, index: int) -> None:
        self._selector = selectors.DefaultSelector()
        self.name = f"webpubsub-dispatch-{index}"
        self._thread: Optional[threading.Thread] = None
        self.clients: Dict[int, Dispatch] = {}  # by descriptor
        self.runs = 0
        self.current: Optional[Dispatch] = None
        self.seen = 0  # ``runs`` at the watchdog's last look
        self.held = False  # inside one dispatch at the watchdog's last two looks

    def watch(self, fd: int, dispatch: Dispatch) -> None:
        """Run ``dispatch`` whenever ``fd`` is readable (the thread started first: a
        descriptor is never left registered by a client that failed to start)."""
        with _POOL_LOCK:
            if self._thread is None:
                thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                thread.start()
                self._thread = thread
        self._selector.register(fd, selectors.EVENT_READ, dispatch)
        self.clients[fd] = dispatch

    def is_current(self) -> bool:
        """True on this worker's thread."""
        return self._thread is threading.current_thread()

    def unwatch(self, fd: int) -> None:
        """Stop watching ``fd`` (before it is closed, or watched by another worker)."""
        self.clients.pop(fd, None)
        try:
            self._selector.unregister(fd)
        except (KeyError, ValueError):
            pass

    def _run(self) -> None:
        out = _base.DispatchBuffers()
        while True:
            self._dispatch_ready(out)

    def _dispatch_ready(self, out: _base.DispatchBuffers) -> None:
        """Waits for readable descriptors, then runs their clients' dispatches. A call of
        its own, so that what the last dispatch used (the client's :class:`Dispatch` and
        its sink) is let go when it returns: the loop's variables would keep it while the
        thread waits for the next events, which may never come."""
        for key, _events in self._selector.select():
            self.runs += 1
            if _WATCHDOG.asleep:
                _WATCHDOG.wake()
            self.current = dispatch = key.data
            try:
                dispatch.run(out, self)
            except Exception:  # noqa: BLE001 - the thread serves the other clients too
                _LOGGER.exception("error while dispatching events")
            self.current = None


class _Watchdog:
    """Relieves the workers held by a listener (see the module's docstring): a daemon
    thread, asleep until a dispatch begins, that looks at the workers every ``TICK``
    until none has begun one for ``QUIET`` looks. 100 to 200 ms of one dispatch is far
    beyond a listener's usual time (microseconds; a few milliseconds for a database
    write), so that a client is seldom moved for a pause of the process (a garbage
    collection, the interpreter lock held elsewhere), and short enough that the other
    clients' events are barely late."""

    TICK = 0.1
    QUIET = 10

    def __init__(self) -> None:
        self.asleep = True
        self._awake = threading.Event()

    def start(self) -> None:
        threading.Thread(target=self._run, name="webpubsub-dispatch-watchdog", daemon=True).start()

    def wake(self) -> None:
        """Called by a worker that began a dispatch while the watchdog sleeps."""
        self.asleep = False
        self._awake.set()

    def _run(self) -> None:
        while True:
            self._awake.wait()
            quiet = 0
            while quiet < self.QUIET:
                time.sleep(self.TICK)
                try:
                    quiet = quiet + 1 if self._look() else 0
                except Exception:  # noqa: BLE001 - a thread or descriptor refused: tried again
                    _LOGGER.exception("the dispatch watchdog could not relieve a thread")
                    quiet = 0
            self._awake.clear()
            self.asleep = True
            # A worker that began a dispatch since the last look, while ``asleep`` was
            # still false, did not wake it: its count tells.
            if any(worker.runs != worker.seen for worker in _WORKERS):
                self.wake()

    def _look(self) -> bool:
        """Mark the workers inside the same dispatch as at the last look as held, then
        relieve them; whether no worker began a dispatch since the last look."""
        quiet = True
        for worker in _WORKERS:
            running = worker.current is not None  # before the count: see _Worker
            runs = worker.runs
            worker.held = running and runs == worker.seen
            quiet = quiet and runs == worker.seen
            worker.seen = runs
        for worker in _WORKERS:
            if worker.held:
                _relieve(worker)
        return quiet


def _relieve(held: _Worker) -> None:
    """Pin the clients of ``held`` but the one whose dispatch holds it to the worker that
    is not held with the fewest clients, or to a new worker if all are held."""
    current = held.current
    moving = [dispatch for dispatch in list(held.clients.values()) if dispatch is not current]
    if not moving:
        return
    with _POOL_LOCK:
        candidates = [worker for worker in _WORKERS if not worker.held]
        target = min(candidates, key=lambda worker: len(worker.clients)) if candidates else _new_worker()
    _LOGGER.debug("a listener holds %s: %d clients move to %s", held.name, len(moving), target.name)
    for dispatch in moving:
        dispatch.move(held, target)


_POOL_LOCK = threading.Lock()
_WORKERS: List[_Worker] = []
_NEXT = itertools.count()
_WATCHDOG = _Watchdog()


def _new_worker() -> _Worker:
    """A worker added to the pool (``_POOL_LOCK`` held)."""
    worker = _Worker(len(_WORKERS))
    _WORKERS.append(worker)
    return worker


def _assign() -> _Worker:
    """The worker a new client is pinned to (round robin over those not held, a new one
    when all are; the pool and its watchdog are made on first use)."""
    with _POOL_LOCK:
        if not _WORKERS:
            # Made whole before it is kept: a refusal (no descriptor for a selector, no
            # thread for the watchdog) leaves no pool short of threads or watchdog.
            workers = [_Worker(i) for i in range(min(os.cpu_count() or 1, 4))]
            _WATCHDOG.start()
            _WORKERS.extend(workers)
        workers = [worker for worker in _WORKERS if not worker.held] or [_new_worker()]
    return workers[next(_NEXT) % len(workers)]
