"""The asyncio client: ``from webpubsub_client.aio import WebPubSubClient``."""

from ._client import WebPubSubClient, WebPubSubClientCredential

__all__ = ["WebPubSubClient", "WebPubSubClientCredential"]
