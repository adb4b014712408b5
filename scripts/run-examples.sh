#!/usr/bin/env bash
# Runs the examples against a fresh emulator, so they never rot: the Rust chat, the
# README's C quick start (examples/c/hello.c), the C event-loop example
# (examples/c/event_loop.c), the C++ one (examples/c/raii.cpp), the same hello.c against
# the library as scripts/install.sh installs it (shared and static, found by pkg-config)
# and the Python demo (examples/c/chat.c is built and run by tests/c/run.sh). Prints
# "N passed, N failed".
# Expects .venv with scripts/requirements-test.txt installed (scripts/test-all.sh does it).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
. scripts/emulator.sh
start_emulator || exit 1
PY=.venv/bin/python
passed=0 failed=0

run() { # run NAME CMD...
    echo "--- example $1"
    if "${@:2}"; then passed=$((passed + 1)); else failed=$((failed + 1)); echo "example $1 FAILED"; fi
}

client_url() { # client_url USER: a client access URL with the join and send roles
    "$PY" -c 'import sys
from azure.messaging.webpubsubservice import WebPubSubServiceClient
s = WebPubSubServiceClient.from_connection_string(sys.argv[1], hub="chat")
print(s.get_client_access_token(user_id=sys.argv[2], roles=["webpubsub.joinLeaveGroup", "webpubsub.sendToGroup"])["url"])' \
        "$WPS_CONNECTION_STRING" "$1"
}

run rust timeout 120 cargo run --quiet --example chat -- "$(client_url alice)" "$(client_url bob)"
hello="$ROOT/target/examples-c/hello"
mkdir -p "$(dirname "$hello")"
run c-hello sh -c 'cc -std=c11 -Wall -Wextra -Werror "$1" -I include -L target/debug -lwebpubsub_client -lpthread -o "$2" &&
    LD_LIBRARY_PATH=target/debug timeout 60 "$2" "$3"' _ examples/c/hello.c "$hello" "$(client_url carol)"
event_loop="$ROOT/target/examples-c/event_loop"
run c-event-loop sh -c 'cc -std=c11 -Wall -Wextra -Werror "$1" -I include -L target/debug -lwebpubsub_client -lpthread -o "$2" &&
    LD_LIBRARY_PATH=target/debug timeout 60 "$2" "$3"' _ examples/c/event_loop.c "$event_loop" "$(client_url dave)"
raii="$ROOT/target/examples-c/raii"
run cpp-raii sh -c '"${CXX:-c++}" -std=c++17 -Wall -Wextra -Wpedantic -Werror "$1" -I include -L target/debug -lwebpubsub_client -lpthread -o "$2" &&
    LD_LIBRARY_PATH=target/debug timeout 60 "$2" "$3"' _ examples/c/raii.cpp "$raii" "$(client_url grace)"
# The installed library: scripts/install.sh into a prefix, then hello.c built with
# pkg-config, once against the shared library and once against the static one alone.
prefix="$ROOT/target/install-test"
rm -rf "$prefix"
installed() { # installed shared|static URL
    local pc="env PKG_CONFIG_PATH=$prefix/lib/pkgconfig pkg-config"
    local out="$ROOT/target/examples-c/hello-$1"
    if [ "$1" = shared ]; then
        cc -std=c11 -Wall -Werror examples/c/hello.c $($pc --cflags --libs webpubsub_client) -o "$out" &&
            LD_LIBRARY_PATH="$prefix/lib" timeout 60 "$out" "$2"
    else
        cc -std=c11 -Wall -Werror examples/c/hello.c $($pc --cflags webpubsub_client) "$prefix/lib/libwebpubsub_client.a" \
            $($pc --static --libs-only-l webpubsub_client | sed 's/-lwebpubsub_client//') -o "$out" &&
            ! readelf -d "$out" | grep -q libwebpubsub_client && timeout 60 "$out" "$2"
    fi
}
run install scripts/install.sh --prefix "$prefix" --profile dev
run installed-shared installed shared "$(client_url erin)"
run installed-static installed static "$(client_url frank)"
run python env WEBPUBSUB_CLIENT_LIB="$ROOT/target/debug/libwebpubsub_client.so" PYTHONPATH="$ROOT/bindings/python" \
    timeout 120 "$PY" examples/python/chat_demo.py "$WPS_CONNECTION_STRING"
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
