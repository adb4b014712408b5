#!/usr/bin/env bash
# AddressSanitizer run of the Python binding's tests: the library (with std and tokio)
# built with nightly's -Zsanitizer=address -Zbuild-std, driven by an uninstrumented
# CPython through ctypes. rustc links no sanitizer runtime into a cdylib, and ships its
# ASan runtime only as a static archive, so that archive (less asan_preinit.o, whose
# .preinit_array a shared object may not have) is linked into a shared object that is
# LD_PRELOADed. PYTHONMALLOC=malloc puts Python's own buffers (the dispatch buffers the
# library writes to, the payloads it reads) under ASan too. Child interpreters inherit
# all of it. Leak checking is off: the children that exit with daemon threads, fork()
# children and the C compiler test_layout runs all report leaks that are not the library's.
#
#   scripts/asan-python.sh [pytest args]     (about 2.5 minutes from a built tree on 2 cores)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
target=x86_64-unknown-linux-gnu
dir="${CARGO_TARGET_DIR:-$root/target}/asan"
python=${PYTHON:-$root/.venv/bin/python}
RUSTFLAGS=-Zsanitizer=address cargo +nightly build -q -Zbuild-std --target "$target" --target-dir "$dir" -p webpubsub-client
cargo build -q -p webpubsub-emulator
rt="$dir/librustc_asan.so"
archive="$(rustc +nightly --print sysroot)/lib/rustlib/$target/lib/librustc-nightly_rt.asan.a"
if [ ! -f "$rt" ] || [ "$archive" -nt "$rt" ]; then
    objs=$(mktemp -d)
    (cd "$objs" && ar x "$archive" && rm asan_preinit.cpp.o)
    gcc -shared -o "$rt" "$objs"/*.o -lpthread -ldl -lm -lrt
    rm -r "$objs"
fi
logs=$(mktemp -d)
status=0
WEBPUBSUB_CLIENT_LIB="$dir/$target/debug/libwebpubsub_client.so" LD_PRELOAD="$rt" PYTHONMALLOC=malloc \
    ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:detect_stack_use_after_return=1:log_path=$logs/asan" \
    RUST_BACKTRACE=0 "$python" -m pytest -q -p no:cacheprovider --timeout 600 bindings/python/tests "$@" || status=$?
if ls "$logs"/asan.* >/dev/null 2>&1; then
    cat "$logs"/asan.*
    status=1
fi
rm -r "$logs"
exit "$status"
