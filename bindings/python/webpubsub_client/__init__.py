"""Azure Web PubSub client on a Rust core: the API of ``azure.messaging.webpubsubclient``, faster.

``from webpubsub_client import WebPubSubClient`` replaces
``from azure.messaging.webpubsubclient import WebPubSubClient``; models and errors
(``SendMessageError``...) are in :mod:`webpubsub_client.models` and the asyncio client
in :mod:`webpubsub_client.aio`.
"""

import atexit as _atexit
import os as _os

from . import _callbacks
from ._client import WebPubSubClient, WebPubSubClientCredential
from ._native import LibraryNotFoundError
from ._native import version as native_version
from ._version import VERSION

__version__ = VERSION

__all__ = [
    "LibraryNotFoundError",
    "WebPubSubClient",
    "WebPubSubClientCredential",
    "native_version",
]

# At exit, live clients are freed (or stopped) by their weakref finalizers, and the
# library stops calling into Python before it tears down (either order is safe).
_atexit.register(_callbacks.quiesce_native)
_callbacks.install_main_check()
_os.register_at_fork(after_in_child=_callbacks.install_main_check)
