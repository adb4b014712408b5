"""No access token or reconnection token in the binding's log records, errors or reprs.

Every record of the package's loggers is captured (the library's own at trace level,
``logging_enable=True``) through a connect, a recovery of a dropped socket (its URL
carries the reconnection token) and a start refused for a bad token.
"""

from __future__ import annotations

from typing import Any, List

import azure.messaging.webpubsubclient as official
import pytest
from conftest import FAST, Hub

from webpubsub_client import WebPubSubClient
from webpubsub_client.aio import WebPubSubClient as AsyncWebPubSubClient
from webpubsub_client.models import OpenClientError, WebPubSubDataType


def _leaks(text: str, secret: str) -> bool:
    """Whether ``text`` holds ``secret`` as is or as the hex of its bytes (frame dumps)."""
    return secret in text or secret.encode().hex() in text.lower()


def _redacted(text: str, key: str) -> bool:
    """Whether every ``key`` in ``text`` is followed by the redaction marker."""
    at = text.find(key)
    while at != -1:
        if not text.startswith("***", at + len(key)):
            return False
        at = text.find(key, at + 1)
    return True


def test_tokens_reach_no_log_record_error_or_repr(hub: Hub, caplog: Any) -> None:
    caplog.set_level(1, logger="webpubsub_client.native")
    caplog.set_level(1, logger="webpubsub_client")
    url = hub.url("u")
    token = url.split("access_token=", 1)[1]
    texts: List[str] = []
    client = WebPubSubClient(url, logging_enable=True, **FAST)
    with client:
        client.join_group("g")
        connection_id = client.connection_id
        hub.drop(connection_id)
        client.send_to_group("g", "after the drop", WebPubSubDataType.TEXT)
        assert client.connection_id == connection_id  # recovered, not reconnected
        texts += [repr(client), str(client)]
    assert hub.emulator.stats()["recoveries"] >= 1

    refused = WebPubSubClient(url + "x", **FAST)
    with pytest.raises(OpenClientError) as error:
        refused.open()
    texts += [str(error.value), repr(error.value), repr(refused)]

    records = [r.getMessage() for r in caplog.records]
    assert any("recover" in r for r in records), records
    assert any("access_token=***" in r for r in records), records  # the URL is logged, redacted
    assert any("401" in t for t in texts + records), texts
    texts += records
    for text in texts:
        assert not _leaks(text, token), text
        assert not _leaks(text, token.rsplit(".", 1)[-1]), text  # the signature alone
        assert not _leaks(text, "reconnectionToken"), text  # a dump of the connected frame
        assert _redacted(text, "access_token="), text
        assert _redacted(text, "awps_reconnection_token="), text


async def test_a_refused_open_says_why_as_the_official_client_does(hub: Hub) -> None:
    """The service's text of a 401 comes with it (it was "HTTP 401 Unauthorized" alone; the
    official client shows the response body too), in both clients, without the token."""
    url = hub.url("u") + "x"
    token = url.split("access_token=", 1)[1]
    why = 'HTTP 401 Unauthorized: "Unauthorized: invalid access token signature."'
    official_client = official.WebPubSubClient(url, start_timeout=FAST["start_timeout"])
    with pytest.raises(official.models.OpenClientError, match="Unauthorized: invalid access token signature."):
        official_client.open()
    with pytest.raises(OpenClientError) as failed:
        WebPubSubClient(url, **FAST).open()
    async_client = AsyncWebPubSubClient(url, **FAST)
    with pytest.raises(OpenClientError) as failed_async:
        await async_client.open()
    for error in (failed.value, failed_async.value):
        assert str(error).startswith("Failed to open client. connect failed: 127.0.0.1:"), error
        assert str(error).endswith(f"answered the WebSocket upgrade with {why}"), error
        assert not _leaks(str(error), token), error
