"""Models of :mod:`webpubsub_client`: the names of ``azure.messaging.webpubsubclient.models`` and a few more."""

from ._enums import (
    CallbackType,
    RetryMode,
    WebPubSubClientState,
    WebPubSubDataType,
    WebPubSubProtocolType,
)
from ._models import (
    AckMessageError,
    InvokeEventError,
    InvokeEventResult,
    OnConnectedArgs,
    OnDisconnectedArgs,
    OnGroupDataMessageArgs,
    OnRejoinGroupFailedArgs,
    OnServerDataMessageArgs,
    OpenClientError,
    SendMessageError,
    WebPubSubClientError,
    WebPubSubResult,
)

__all__ = [
    "AckMessageError",
    "CallbackType",
    "InvokeEventError",
    "InvokeEventResult",
    "OnConnectedArgs",
    "OnDisconnectedArgs",
    "OnGroupDataMessageArgs",
    "OnRejoinGroupFailedArgs",
    "OnServerDataMessageArgs",
    "OpenClientError",
    "RetryMode",
    "SendMessageError",
    "WebPubSubClientError",
    "WebPubSubClientState",
    "WebPubSubDataType",
    "WebPubSubProtocolType",
    "WebPubSubResult",
]
