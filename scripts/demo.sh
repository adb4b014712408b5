#!/usr/bin/env bash
# The chat demo: starts the emulator on a free loopback port, then two clients of the
# Python binding chat in a group (text, JSON, binary), the server sends through the REST
# API, and a dropped socket and a lost session are recovered. Installs what it needs:
# a Python venv in .venv with the official server SDK (tokens and REST sends).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

echo "==> building the library and the emulator"
cargo build --workspace --quiet
if [ ! -x .venv/bin/python ]; then
    echo "==> creating .venv"
    python3 -m venv .venv
fi
echo "==> installing the official server SDK into .venv"
.venv/bin/pip install -q --disable-pip-version-check -r scripts/requirements-test.txt

. scripts/emulator.sh
start_emulator
echo "==> emulator running: $WPS_CONNECTION_STRING"
WEBPUBSUB_CLIENT_LIB="$ROOT/target/debug/libwebpubsub_client.so" PYTHONPATH="$ROOT/bindings/python" \
    .venv/bin/python examples/python/chat_demo.py "$WPS_CONNECTION_STRING"
