#!/usr/bin/env bash
# Builds the library (cargo, debug), the emulator and the C harness, then runs the
# harness against the real emulator.
#
#   tests/c/run.sh [plain|asan|valgrind]
#
# plain:    the harness as is.
# asan:     the harness and the example built with -fsanitize=address,undefined, the
#           library built normally; leaks detected (ASAN_OPTIONS=detect_leaks=1) with
#           tests/c/lsan.supp, which only covers the library's intentional process-wide
#           statics (see that file).
# valgrind: valgrind --error-exitcode=1 --leak-check=full with tests/c/valgrind.supp
#           (same scope, documented there).
# Every mode first checks that the committed header is the generated one and that it
# compiles as C99, C11, C++11 and C++17 with -Wall -Wextra -Wpedantic -Werror (C99 and
# C++11 are the oldest standards it supports: it needs <stdbool.h> and <stdint.h>).
set -euo pipefail

mode=${1:-plain}
case "$mode" in plain|asan|valgrind) ;; *) echo "usage: $0 [plain|asan|valgrind]" >&2; exit 2 ;; esac
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
cd "$root"

# The build fails when include/webpubsub_client.h differs from what cbindgen generates.
WPS_CHECK_HEADER=1 cargo build --quiet -p webpubsub-client -p webpubsub-emulator
lib_dir="${CARGO_TARGET_DIR:-$root/target}/debug"
emulator="$lib_dir/webpubsub-emulator"
out="${CARGO_TARGET_DIR:-$root/target}/c-tests/$mode"
mkdir -p "$out"

# The emulator logs to stderr; keep only its warnings unless asked otherwise.
export RUST_LOG=${RUST_LOG:-warn}

cc=${CC:-cc}
cxx=${CXX:-c++}
warn=(-Wall -Wextra -Wpedantic -Werror)
flags=(-g -O1 -pthread -I"$root/include" -I"$here")
link=(-L"$lib_dir" -Wl,-rpath,"$lib_dir" -lwebpubsub_client -pthread)
if [ "$mode" = asan ]; then
    flags+=(-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined)
    link+=(-fsanitize=address,undefined)
fi

"$cxx" -std=c++17 "${warn[@]}" "${flags[@]}" "$here/header_check.cpp" "${link[@]}" -o "$out/header_check"
echo '#include "webpubsub_client.h"' | "$cc" -std=c99 "${warn[@]}" -I"$root/include" -x c -fsyntax-only -
echo '#include "webpubsub_client.h"' | "$cxx" -std=c++11 "${warn[@]}" -I"$root/include" -x c++ -fsyntax-only -
"$cc" -std=c11 "${warn[@]}" "${flags[@]}" "$here/harness.c" "$here/support.c" "${link[@]}" -o "$out/harness"
"$cc" -std=c11 "${warn[@]}" "${flags[@]}" "$root/examples/c/chat.c" "${link[@]}" -o "$out/chat"
# As its comment builds it: -lpthread, not -pthread (which would define _REENTRANT for it).
"$cc" -std=c11 "${warn[@]}" -I"$root/include" -fsyntax-only "$root/examples/c/chat.c"

# A throwaway test CA and a 127.0.0.1 server certificate for the wss test.
tls="$out/tls"
"$here/make-test-certs.sh" "$tls"

case "$mode" in
plain)
    "$out/header_check"
    exec "$out/harness" "$emulator" "$out/chat" "$tls"
    ;;
asan)
    export ASAN_OPTIONS=detect_leaks=1:abort_on_error=0:halt_on_error=1
    export LSAN_OPTIONS=suppressions="$here/lsan.supp":print_suppressions=0
    export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
    "$out/header_check"
    exec "$out/harness" "$emulator" "$out/chat" "$tls"
    ;;
valgrind)
    if ! command -v valgrind >/dev/null; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
            apt-get update -qq && apt-get install -y -qq valgrind >/dev/null
        fi
        command -v valgrind >/dev/null || { echo "valgrind is not installed (apt-get install valgrind)" >&2; exit 2; }
    fi
    vg=(valgrind --quiet --error-exitcode=1 --leak-check=full --errors-for-leak-kinds=definite,possible --num-callers=40
        --suppressions="$here/valgrind.supp" --trace-children=no)
    "${vg[@]}" "$out/header_check"
    exec "${vg[@]}" "$out/harness" "$emulator" "$out/chat" "$tls"
    ;;
esac
