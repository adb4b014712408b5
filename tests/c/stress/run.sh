#!/usr/bin/env bash
# Lifecycle stress of the C API (tests/c/stress/stress.c) against the real emulator.
#
#   tests/c/stress/run.sh [asan|valgrind|plain]      (default: asan)
#
# asan:     built with -fsanitize=address,undefined; LeakSanitizer on, with
#           tests/c/lsan.supp (the library's intentional process-wide statics only).
#           10,000 create/start/stop/free cycles, 2,000 pending acks.
# valgrind: --leak-check=full with tests/c/valgrind.supp; 300 cycles, 500 pending acks
#           (valgrind is ~50x slower).
# plain:    no instrumentation, the asan counts.
# Counts can be overridden: WPS_STRESS_CYCLES=N WPS_STRESS_PENDING=N.
# Prints one line per test, then "N passed, N failed"; exits non-zero on any failure.
set -euo pipefail

mode=${1:-asan}
case "$mode" in plain|asan|valgrind) ;; *) echo "usage: $0 [asan|valgrind|plain]" >&2; exit 2 ;; esac
here=$(cd "$(dirname "$0")" && pwd)
c_dir=$(cd "$here/.." && pwd)
root=$(cd "$here/../../.." && pwd)
cd "$root"

cargo build --quiet -p webpubsub-client -p webpubsub-emulator
lib_dir="${CARGO_TARGET_DIR:-$root/target}/debug"
emulator="$lib_dir/webpubsub-emulator"
out="${CARGO_TARGET_DIR:-$root/target}/c-stress/$mode"
mkdir -p "$out"

flags=(-std=c11 -Wall -Wextra -Werror -g -O1 -pthread -I"$root/include" -I"$c_dir")
link=(-L"$lib_dir" -Wl,-rpath,"$lib_dir" -lwebpubsub_client -pthread)
cycles=${WPS_STRESS_CYCLES:-10000}
pending=${WPS_STRESS_PENDING:-2000}
if [ "$mode" = asan ]; then
    flags+=(-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined)
    link+=(-fsanitize=address,undefined)
fi
"${CC:-cc}" "${flags[@]}" "$here/stress.c" "$c_dir/support.c" "${link[@]}" -o "$out/stress"

# The emulator logs only warnings (thousands of connections are expected here).
export RUST_LOG=${RUST_LOG:-warn}
case "$mode" in
plain)
    exec "$out/stress" "$emulator" "$cycles" "$pending"
    ;;
asan)
    export ASAN_OPTIONS=detect_leaks=1:abort_on_error=0:halt_on_error=1
    export LSAN_OPTIONS=suppressions="$c_dir/lsan.supp":print_suppressions=0
    export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
    exec "$out/stress" "$emulator" "$cycles" "$pending"
    ;;
valgrind)
    command -v valgrind >/dev/null || { echo "valgrind is not installed (apt-get install valgrind)" >&2; exit 2; }
    exec valgrind --quiet --error-exitcode=1 --leak-check=full --errors-for-leak-kinds=definite,possible \
        --suppressions="$c_dir/valgrind.supp" --trace-children=no \
        "$out/stress" "$emulator" "${WPS_STRESS_CYCLES:-300}" "${WPS_STRESS_PENDING:-500}"
    ;;
esac
