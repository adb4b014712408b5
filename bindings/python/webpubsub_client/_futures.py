"""The futures of the sync client's pipelined sends (``begin_send_to_group``, ``begin_send_event``).

A send starts with the C asynchronous form and ``WPS_SEND_RECORD``, its future stored in
the callback registry under the send's ``user_data``. A success comes back as a
``wps_ack_record`` that the client's dispatch writes (:meth:`._dispatcher.Dispatch.run`,
then :func:`settle`): no foreign callback per message. A failure, and any outcome once the
client is freed, comes through :data:`COMPLETION_TRAMPOLINE`, which only converts it:
the client's dispatch settles it once the native call has returned, in order with the
events (:meth:`._dispatcher.Dispatch.complete`). So the futures settle, and their
done-callbacks run, on the thread that runs the client's listeners (those left at the
client's free: on the freeing thread, or on a thread of their own), never inside the
library's frames.
"""

from __future__ import annotations

import concurrent.futures
import logging
from typing import TYPE_CHECKING, Any, Optional, Union

from . import _base, _native
from ._callbacks import REGISTRY
from .models import WebPubSubClientError, WebPubSubResult

if TYPE_CHECKING:
    from ._dispatcher import Dispatch

_LOGGER = logging.getLogger("webpubsub_client")

_WOULD_DEADLOCK = (
    "this send's future is not done, and it is settled on this very thread, which runs the "
    "client's listeners and done-callbacks: waiting here would wait for ever. Wait for it "
    "on another thread, or use add_done_callback()"
)
_FORKED = (
    "this send's future is not done, and this process is a fork() child of the one that began "
    "the send: the threads that settle it are the parent's, it is never settled here"
)


class SendFuture(concurrent.futures.Future[WebPubSubResult]):
    """The future of a pipelined send: running from the start (a message handed to the
    connection cannot be taken back, so ``cancel()`` returns False), settled by the
    client's dispatch. Its ``result()`` and ``exception()``, called unfinished with a
    timeout other than 0 where it would never be settled meanwhile (on the thread that
    settles it, or in a fork() child), raise at once instead of waiting in vain."""

    def __init__(self, dispatch: Dispatch, ack_id: Optional[int]) -> None:
        super().__init__()
        self.set_running_or_notify_cancel()
        # The client's, until settled: a future kept longer does not keep it (and its
        # credential provider) alive.
        self.dispatch: Optional[Dispatch] = dispatch
        self.ack_id = ack_id  # the caller's, for a failure that carries none

    def result(self, timeout: Optional[float] = None) -> WebPubSubResult:
        """The send's :class:`WebPubSubResult`; raises its ``SendMessageError`` (see
        :meth:`concurrent.futures.Future.result`)."""
        self._check_wait(timeout)
        return super().result(timeout)

    def exception(self, timeout: Optional[float] = None) -> Optional[BaseException]:
        """The send's exception, or None once it succeeded (see
        :meth:`concurrent.futures.Future.exception`)."""
        self._check_wait(timeout)
        return super().exception(timeout)

    def _check_wait(self, timeout: Optional[float]) -> None:
        """Raises when a wait of ``timeout`` seconds (None: no limit) for this future, on
        this thread, would wait in vain; one of 0 or less does not wait (a future not done
        then raises ``concurrent.futures.TimeoutError``, as any future's)."""
        dispatch = self.dispatch  # None: settled, or being settled on another thread
        if (timeout is not None and timeout <= 0) or dispatch is None or self.done():
            return
        if dispatch.settles_here():
            raise WebPubSubClientError(_WOULD_DEADLOCK)
        if dispatch.in_fork_child():
            raise WebPubSubClientError(_FORKED, status=_native.STATUS_FORKED)


def settle_one(future: SendFuture, outcome: Union[WebPubSubResult, Exception]) -> None:
    """Gives ``future`` its result, or its error when ``outcome`` is an exception. A
    done-callback's ``Exception`` is logged by ``concurrent.futures``; anything else it
    raises (``SystemExit``) is logged here and ends only that future's callbacks."""
    future.dispatch = None
    try:
        if isinstance(outcome, Exception):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)
    except BaseException:  # noqa: BLE001 - the thread settles the client's other futures too
        _LOGGER.exception("a done-callback of a send's future raised")


def settle(records: memoryview) -> None:
    """The futures of the sends in ``records`` (``wps_ack_record``s written by
    ``wps_client_dispatch_into``) get their results."""
    take = REGISTRY.take
    for key, _op_id, ack_id, has_ack_id, is_duplicated in _native.ACK_RECORD.iter_unpack(records):
        future = take(key, None)
        if future is not None:
            future.dispatch = None  # settle_one, written out: this runs per message
            try:
                future.set_result(WebPubSubResult(ack_id if has_ack_id else None, is_duplicated))
            except BaseException:  # noqa: BLE001 - as in settle_one
                _LOGGER.exception("a done-callback of a send's future raised")


def _on_completion(key: Optional[int], raw: Any) -> None:
    """Completion of a pipelined send that was not written as a record: a failure, or any
    outcome once the client was freed (a library thread then runs what was left)."""
    try:
        future: Optional[SendFuture] = REGISTRY.pop(key)
        if future is not None and future.dispatch is not None:  # out of the registry once: unsettled
            future.dispatch.complete(future, _base.completion_outcome(raw.contents, future.ack_id))
    except BaseException:  # noqa: BLE001 - nothing may propagate into C
        _LOGGER.exception("error while completing a send")


COMPLETION_TRAMPOLINE = _native.COMPLETION_CB(_on_completion)
