"""Enumerations with the names and values of ``azure.messaging.webpubsubclient.models``."""

from __future__ import annotations

from enum import Enum, EnumMeta
from typing import Any


class _CaseInsensitiveEnumMeta(EnumMeta):
    """Look members up by name case-insensitively (``WebPubSubDataType["text"]``)."""

    def __getitem__(cls, name: str) -> Any:
        return super().__getitem__(name.upper())

    def __getattr__(cls, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        try:
            return cls._member_map_[name.upper()]
        except KeyError as exc:
            raise AttributeError(name) from exc


class _StrEnum(str, Enum, metaclass=_CaseInsensitiveEnumMeta):
    """A str enum whose lookup by value ignores case (``WebPubSubDataType("TEXT")``)."""

    @classmethod
    def _missing_(cls, value: object) -> Any:
        if isinstance(value, str):
            for member in cls:
                if member.value.lower() == value.lower():
                    return member
        return None

    def __str__(self) -> str:
        return str(self.value)


class WebPubSubDataType(_StrEnum):
    """Type of a message's payload."""

    BINARY = "binary"
    JSON = "json"
    TEXT = "text"
    PROTOBUF = "protobuf"


class WebPubSubProtocolType(_StrEnum):
    """WebSocket subprotocol spoken with the service."""

    JSON = "json.webpubsub.azure.v1"
    JSON_RELIABLE = "json.reliable.webpubsub.azure.v1"


class CallbackType(_StrEnum):
    """Events a listener can subscribe to."""

    CONNECTED = "connected"
    DISCONNECTED = "disconnected"
    STOPPED = "stopped"
    SERVER_MESSAGE = "server-message"
    GROUP_MESSAGE = "group-message"
    REJOIN_GROUP_FAILED = "rejoin-group-failed"


class WebPubSubClientState(_StrEnum):
    """Lifecycle state of a client."""

    STOPPED = "Stopped"
    DISCONNECTED = "Disconnected"
    CONNECTING = "Connecting"
    CONNECTED = "Connected"
    RECOVERING = "Recovering"


class RetryMode(_StrEnum):
    """Delay policy between retries; ``azure.core.pipeline.policies.RetryMode`` values are accepted too."""

    Fixed = "fixed"
    Exponential = "exponential"
