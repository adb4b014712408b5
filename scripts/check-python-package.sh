#!/usr/bin/env bash
# Installs bindings/python with pip into a throwaway venv (cargo builds the library and
# setuptools-rust puts it inside the package), then, from outside the repository and
# with no WEBPUBSUB_CLIENT_LIB, checks that the installed package loads its own copy of
# the library and round-trips a message through the emulator. Prints "N passed, N failed".
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
venv="$ROOT/target/package-venv"
rm -rf "$venv"
python3 -m venv "$venv"
"$venv/bin/pip" install -q --disable-pip-version-check ./bindings/python
. scripts/emulator.sh
start_emulator
url=$(.venv/bin/python -c 'import sys
from azure.messaging.webpubsubservice import WebPubSubServiceClient
s = WebPubSubServiceClient.from_connection_string(sys.argv[1], hub="pkg")
print(s.get_client_access_token(user_id="p", roles=["webpubsub.joinLeaveGroup", "webpubsub.sendToGroup"])["url"])' \
    "$WPS_CONNECTION_STRING")
cd "$(mktemp -d)"
if env -u WEBPUBSUB_CLIENT_LIB -u PYTHONPATH "$venv/bin/python" - "$url" "$venv" <<'PY'
import sys, threading
import webpubsub_client
from webpubsub_client import WebPubSubClient, _native
from webpubsub_client.models import CallbackType, WebPubSubDataType

url, venv = sys.argv[1], sys.argv[2]
path = _native.lib._name
assert path.startswith(venv), f"loaded {path}, not the installed copy under {venv}"
got = threading.Event()
client = WebPubSubClient(url)
client.subscribe(CallbackType.GROUP_MESSAGE, lambda e: got.set() if e.data == "ping" else None)
with client:
    client.join_group("g")
    client.send_to_group("g", "ping", WebPubSubDataType.TEXT)
    assert got.wait(10), "the message did not come back"
print(f"installed package works: {webpubsub_client.__file__}, library {path}")
PY
then echo "1 passed, 0 failed"; else echo "0 passed, 1 failed"; exit 1; fi
