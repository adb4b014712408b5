"""The Python threads that run the sync clients' listeners.

A sync client's native client is in poll dispatch mode: its descriptor is readable while
events are queued. A small pool of daemon threads (``min(cpus, 4)``, as the library's own
dispatcher pool), each waiting for the descriptors of the clients pinned to it, takes
their events with ``wps_client_dispatch_into``: messages as records, the other events
through the event callback, which only converts them. The listeners run once that call
has returned, in plain Python, one client's in event order.

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
import selectors
import threading
from typing import Any, List, Optional

from . import _base, _native
from ._native import lib
from .models import WebPubSubClientError

_LOGGER = logging.getLogger("webpubsub_client")
_COUNTS = _native.DISPATCH_COUNTS.unpack_from


class Dispatch:
    """How one sync client's events reach its listeners: its native handle until the
    client's finalizer (:meth:`free`) frees it, its descriptor, watched by the worker
    it is pinned to, and its ``sink``, which converts the events of the event callback
    (``sink.take()``) and calls the listeners (``sink.deliver(events, dispatch)``)."""

    BATCH = 256  # callbacks per native call; a client with more queued stays readable

    def __init__(self, handle: int, sink: Any) -> None:
        fd = ctypes.c_int(-1)
        status = lib.wps_client_dispatch_fd(handle, ctypes.byref(fd))
        if status != _native.STATUS_OK:
            message = f"{_native.status_str(status)}: {_native.last_error_message()}"
            raise WebPubSubClientError(message, status=status)
        self.handle = handle
        # Excludes a dispatch from the free of the handle. Reentrant: the client may be
        # collected on its worker thread, during a dispatch (its finalizer then frees it).
        self.lock = threading.RLock()
        self._sink = sink
        self._fd = fd.value
        self._pid = os.getpid()
        self._worker = _assign()
        self._worker.watch(self._fd, self)

    def run(self, out: _base.DispatchBuffers) -> None:
        """On the worker thread, once the descriptor is readable: take the queued events
        (up to ``BATCH`` callbacks and the records that fit ``out``), then hand them to
        the listeners, those of the event callback first (they came before the records)."""
        with self.lock:
            handle = self.handle
            if not handle:
                return
            status = lib.wps_client_dispatch_into(handle, self.BATCH, out.ref)
        events: List[Any] = self._sink.take()
        if status != _native.STATUS_OK:  # the counts were not written
            _LOGGER.error("webpubsub_client: dispatch failed: %s", _native.last_error_message())
        else:
            _ran, _acks, messages, size = _COUNTS(out.counts, _native.DISPATCH_COUNTS_OFFSET)
            if messages:
                events += _base.message_records(out.message_view[:size], messages)
        if events:
            self._sink.deliver(events, self)

    def free(self) -> None:
        """Free the native client (the client's finalizer), its descriptor no longer
        watched and no dispatch running. At interpreter exit and in a fork() child it is
        left to :func:`_base.free_client` alone: at exit the client is only stopped, its
        last events still reach the listeners; in a child the worker's polling instance is
        the parent's, which must keep watching the descriptor."""
        if os.getpid() != self._pid or not threading.main_thread().is_alive():
            _base.free_client(self.handle)
            return
        with self.lock:
            handle, self.handle = self.handle, 0
        if handle:
            self._worker.unwatch(self._fd)
            _base.free_client(handle)


class _Worker:
    """A daemon thread (started with its first client) that runs the dispatch of each of
    its clients whose descriptor is readable. Clients join and leave it from any thread:
    the selector (epoll, kqueue) takes them while the thread waits."""

    def __init__(self, index: int) -> None:
        self._selector = selectors.DefaultSelector()
        self._name = f"webpubsub-dispatch-{index}"
        self._thread: Optional[threading.Thread] = None

    def watch(self, fd: int, dispatch: Dispatch) -> None:
        """Run ``dispatch`` whenever ``fd`` is readable (the thread started first: a
        descriptor is never left registered by a client that failed to start)."""
        with _POOL_LOCK:
            if self._thread is None:
                thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                thread.start()
                self._thread = thread
        self._selector.register(fd, selectors.EVENT_READ, dispatch)

    def unwatch(self, fd: int) -> None:
        """Stop watching ``fd`` (before it is closed)."""
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
            try:
                key.data.run(out)
            except Exception:  # noqa: BLE001 - the thread serves the other clients too
                _LOGGER.exception("webpubsub_client: error while dispatching events")


_POOL_LOCK = threading.Lock()
_WORKERS: List[_Worker] = []
_NEXT = itertools.count()


def _assign() -> _Worker:
    """The worker a new client is pinned to (round robin; the pool is made on first use)."""
    with _POOL_LOCK:
        if not _WORKERS:
            _WORKERS.extend(_Worker(i) for i in range(min(os.cpu_count() or 1, 4)))
    return _WORKERS[next(_NEXT) % len(_WORKERS)]
