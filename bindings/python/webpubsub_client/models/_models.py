"""Event arguments, results and exceptions, with the fields of the official package."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional, Union

from ._enums import WebPubSubDataType

if TYPE_CHECKING:
    _ErrorBase = Exception
else:
    try:
        # Wherever the official client was installed, azure-core is too: then, as there,
        # every error of this package is an AzureError, and `except AzureError` catches it.
        from azure.core.exceptions import AzureError as _ErrorBase
    except ImportError:
        _ErrorBase = Exception

__all__ = [
    "AckMessageError",
    "InvokeEventError",
    "InvokeEventResult",
    "OnConnectedArgs",
    "OnDisconnectedArgs",
    "OnGroupDataMessageArgs",
    "OnRejoinGroupFailedArgs",
    "OnServerDataMessageArgs",
    "OpenClientError",
    "SendMessageError",
    "WebPubSubClientError",
    "WebPubSubResult",
]


def _repr(obj: object) -> str:
    fields = ", ".join(f"{k}={v!r}" for k, v in vars(obj).items())
    return f"{type(obj).__name__}({fields})"


class AckMessageError:
    """Error details the service sent (``name`` such as ``"Forbidden"``, and ``message``).

    For failures that never reached the service, ``name`` tells what happened locally
    (``"Timeout"``, ``"NotConnected"``, ``"IllegalState"`` (not open), ``"Stopped"``,
    ``"Cancelled"``, ``"Interrupted"``).
    """

    def __init__(self, *, name: str, message: str) -> None:
        self.name = name
        self.message = message

    def __repr__(self) -> str:
        return _repr(self)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AckMessageError) and vars(self) == vars(other)


class WebPubSubClientError(_ErrorBase):
    """Base of every error the clients raise (besides TypeError/ValueError for bad arguments);
    an ``azure.core.exceptions.AzureError`` when azure-core is installed, as in the official client.

    :ivar status: the native library's status code (0 when raised by Python code).

    Further arguments are AzureError's (``error=`` the inner exception), as the official
    ``OpenClientError`` takes them (``SendMessageError`` takes only its own, as there);
    without azure-core, only positional ones.
    """

    def __init__(self, message: str, *args: Any, status: int = 0, **kwargs: Any) -> None:
        super().__init__(message, *args, **kwargs)
        self.message = message
        self.status = status


class OpenClientError(WebPubSubClientError):
    """The client could not be opened (connect failed, timed out, or it is not stopped)."""


class SendMessageError(WebPubSubClientError):
    """An operation (join, leave, send, invoke) failed.

    :ivar ack_id: the ackId of the failed message when it had one: refused, timed out
        (a resend with it is deduplicated by the service), or sent (or queued during a
        recovery) when its connection was lost, the client was closed or Ctrl-C gave it
        up. In the error of a failed rejoin, the ackId of its joinGroup. None for one
        refused before it was written, which never reached the service (``IllegalState``;
        ``NotConnected`` at once, while connecting or with the recovery queue full;
        ``Stopped``/``NotConnected`` while still queued behind others), unless a send
        named its own ``ack_id``: the error carries it. None in an ``InvokeEventError``.
    :ivar error_detail: what went wrong (:class:`AckMessageError`).
    """

    def __init__(
        self,
        message: str,
        ack_id: Optional[int] = None,
        error_detail: Optional[AckMessageError] = None,
        *,
        status: int = 0,
    ) -> None:
        super().__init__(message, status=status)
        self.name = "SendMessageError"
        self.ack_id = ack_id
        self.error_detail = error_detail

    def __str__(self) -> str:
        if self.error_detail is None:
            return self.message
        return f"{self.message} {self.error_detail.name}: {self.error_detail.message}"


class InvokeEventError(SendMessageError):
    """``invoke_event`` failed: the upstream answered with an error, timed out, or was cancelled."""

    def __init__(
        self,
        message: str,
        error_detail: Optional[AckMessageError] = None,
        *,
        status: int = 0,
    ) -> None:
        super().__init__(message, None, error_detail, status=status)
        self.name = "InvokeEventError"


class WebPubSubResult:
    """Outcome of an acknowledged operation.

    :ivar ack_id: the ackId used (None for a fire-and-forget send).
    :ivar is_duplicated: True when the service had already processed this ackId.
    """

    def __init__(self, ack_id: Optional[int] = None, is_duplicated: bool = False) -> None:
        self.ack_id = ack_id
        self.is_duplicated = is_duplicated

    def __repr__(self) -> str:
        return _repr(self)


class InvokeEventResult:
    """Response of ``invoke_event``: ``data`` is ``str`` (text), a JSON value (json) or ``bytes``;
    a reply without data (the upstream answered with an empty body) is the text ``""``."""

    def __init__(self, data_type: WebPubSubDataType, data: Any) -> None:
        self.data_type = data_type
        self.data = data

    def __repr__(self) -> str:
        return _repr(self)


class OnConnectedArgs:
    """Arguments of the ``connected`` event."""

    def __init__(self, connection_id: str, user_id: Optional[str] = None) -> None:
        self.connection_id = connection_id
        self.user_id = user_id

    def __repr__(self) -> str:
        return _repr(self)


class OnDisconnectedArgs:
    """Arguments of the ``disconnected`` event (``close_code`` is an addition: None when unknown).

    After a failed recovery (refused with 1008, answered as another connection, or out of
    time), ``message`` and ``close_code`` tell how the connection dropped, not how the
    recovery ended (that is logged)."""

    def __init__(
        self,
        connection_id: Optional[str] = None,
        message: Optional[str] = None,
        close_code: Optional[int] = None,
    ) -> None:
        self.connection_id = connection_id
        self.message = message
        self.close_code = close_code

    def __repr__(self) -> str:
        return _repr(self)


class OnServerDataMessageArgs:
    """A message from the server: ``data`` is ``str`` (text), a JSON value (json) or ``memoryview`` (binary)."""

    def __init__(
        self,
        data_type: Union[WebPubSubDataType, str],
        data: Any,
        sequence_id: Optional[int] = None,
    ) -> None:
        self.data_type = data_type
        self.data = data
        self.sequence_id = sequence_id

    def __repr__(self) -> str:
        return _repr(self)


class OnGroupDataMessageArgs:
    """A message published to a joined group; ``data`` as in :class:`OnServerDataMessageArgs`."""

    def __init__(
        self,
        *,
        data_type: Union[WebPubSubDataType, str],
        data: Any,
        group: str,
        from_user_id: Optional[str] = None,
        sequence_id: Optional[int] = None,
    ) -> None:
        self.data_type = data_type
        self.data = data
        self.group = group
        self.from_user_id = from_user_id
        self.sequence_id = sequence_id

    def __repr__(self) -> str:
        return _repr(self)


class OnRejoinGroupFailedArgs:
    """A group could not be rejoined on a new connection; ``error`` is a :class:`SendMessageError`."""

    def __init__(self, group: str, error: Exception) -> None:
        self.group = group
        self.error = error

    def __repr__(self) -> str:
        return _repr(self)
