#!/usr/bin/env bash
# Runs every test suite of the project, in order, and prints one summary line per suite
# and a final "N passed, N failed" line over all suites.
#
# Installs what it needs itself: a Python venv in .venv (pytest, the official SDKs used
# in interop tests), npm packages for the Node interop tests, and apt packages (valgrind)
# when missing. A suite that cannot be set up, or that runs no test, fails the run.
#
# Usage: scripts/test-all.sh            all suites
#        SUITES="rust pytest" scripts/test-all.sh   a subset (names below)
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
LOG_DIR="$ROOT/target/test-logs"
mkdir -p "$LOG_DIR"
# One build per run: incremental compilation state would only add gigabytes of disk.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
ALL_SUITES="fmt clippy doc msrv rust header c-plain c-asan c-valgrind c-stress-asan c-stress-valgrind pytest pytest-py310 pytest-py312 pytest-py313 python-lint python-package interop-python interop-node examples"
SUITES="${SUITES:-$ALL_SUITES}"

TOTAL_PASSED=0
TOTAL_FAILED=0
SUMMARY=()

log() { printf '\n==> %s\n' "$*"; }
die() { printf 'test-all: %s\n' "$*" >&2; exit 2; }

# --- setup -----------------------------------------------------------------------------

need_apt() {
    local missing=()
    for pkg in "$@"; do
        dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    log "apt-get install ${missing[*]}"
    command -v apt-get >/dev/null || die "apt-get not found; install ${missing[*]} by hand"
    apt-get update -qq >/dev/null || die "apt-get update failed"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null ||
        die "apt-get install ${missing[*]} failed"
}

# make_venv DIR PYTHON: the venv DIR (made with PYTHON when missing) with the packages of
# scripts/requirements-test.txt.
make_venv() {
    local dir=$1 python=$2
    if [ ! -x "$dir/bin/python" ]; then
        log "creating $dir ($python)"
        "$python" -m venv "$dir" || die "$python -m venv failed"
    fi
    log "pip install into $dir (pytest, official SDKs)"
    "$dir/bin/pip" install -q --disable-pip-version-check -r scripts/requirements-test.txt ||
        die "pip install into $dir failed"
}

setup_venv() {
    [ -n "${VENV_READY:-}" ] && return 0
    command -v python3 >/dev/null || die "python3 not found"
    make_venv .venv python3
    VENV_READY=1
}

# find_python VERSION: an interpreter of that minor version that runs (pyenv's, or
# pythonVERSION on PATH), printed; fails the run when there is none.
find_python() {
    local version=$1 candidate
    for candidate in $(ls -d "$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")"/versions/"$version".*/bin/python"$version" \
        2>/dev/null | sort -rV) $(command -v "python$version"); do
        if "$candidate" -c 'import sys, venv' >/dev/null 2>&1; then
            echo "$candidate"
            return 0
        fi
    done
    die "no working python$version (pyenv or PATH); the binding is tested on it"
}

# setup_venv_for VERSION: .venv-VERSION with the test packages, for that interpreter.
setup_venv_for() {
    local python
    python=$(find_python "$1") || exit 2
    make_venv ".venv-$1" "$python"
}

setup_node() {
    [ -n "${NODE_READY:-}" ] && return 0
    command -v node >/dev/null || die "node not found"
    command -v npm >/dev/null || die "npm not found"
    log "npm install (official JS SDKs)"
    (cd tests/interop/node && npm install --no-audit --no-fund --loglevel=error) ||
        die "npm install failed"
    NODE_READY=1
}

build_native() {
    [ -n "${NATIVE_READY:-}" ] && return 0
    log "cargo build (library and emulator)"
    cargo build --workspace --quiet || die "cargo build failed"
    export WPS_EMULATOR_BIN="$ROOT/target/debug/webpubsub-emulator"
    export WEBPUBSUB_CLIENT_LIB="$ROOT/target/debug/libwebpubsub_client.so"
    NATIVE_READY=1
}

# --- result parsing --------------------------------------------------------------------

# record NAME PASSED FAILED RC: adds a suite's counts; a suite that ran nothing fails.
record() {
    local name=$1 passed=$2 failed=$3 rc=$4 status=ok
    if [ "$rc" -ne 0 ] && [ "$failed" -eq 0 ]; then failed=1; fi
    if [ "$passed" -eq 0 ] && [ "$failed" -eq 0 ]; then
        failed=1
        status="FAILED (ran no test)"
    elif [ "$failed" -ne 0 ]; then
        status="FAILED (see target/test-logs/$name.log)"
    fi
    TOTAL_PASSED=$((TOTAL_PASSED + passed))
    TOTAL_FAILED=$((TOTAL_FAILED + failed))
    SUMMARY+=("$(printf '%-16s %5d passed, %3d failed  %s' "$name" "$passed" "$failed" "$status")")
    printf '%s: %d passed, %d failed (%s)\n' "$name" "$passed" "$failed" "$status"
}

sum_matches() { # sum_matches REGEX FILE: sums the first number captured on matching lines
    grep -Eo "$1" "$2" | grep -Eo '[0-9]+' | awk '{s+=$1} END {print s+0}'
}

# run_check NAME CMD...: a single check (formatting, lints, header) counts as one test.
run_check() {
    local name=$1; shift
    log "$name: $*"
    "$@" >"$LOG_DIR/$name.log" 2>&1
    local rc=$?
    tail -n 20 "$LOG_DIR/$name.log"
    if [ $rc -eq 0 ]; then record "$name" 1 0 0; else record "$name" 0 1 $rc; fi
}

# run_counted NAME KIND CMD...: KIND says how to read the runner's own counts.
run_counted() {
    local name=$1 kind=$2; shift 2
    log "$name: $*"
    # The `|| true` stays inside the braces: outside, a failing runner (pipefail) would
    # run it and PIPESTATUS would then hold its 0 instead of the runner's status.
    "$@" 2>&1 | tee "$LOG_DIR/$name.log" | { grep -E --line-buffered \
        '^(test result:|=+ .* in [0-9.]+s|# (pass|fail)|[0-9]+ passed, [0-9]+ failed|FAIL|error)' || true; }
    local rc=${PIPESTATUS[0]} passed failed
    case $kind in
        cargo)
            passed=$(sum_matches '[0-9]+ passed;' "$LOG_DIR/$name.log")
            failed=$(sum_matches '[0-9]+ failed;' "$LOG_DIR/$name.log") ;;
        pytest)
            # The closing line, e.g. "3 failed, 120 passed, 1 skipped in 9.1s"; a skip is a failure.
            local closing
            closing=$(grep -E '([0-9]+ (passed|failed|errors?|skipped)(, )?)+.* in [0-9.]+s' "$LOG_DIR/$name.log" | tail -n 1)
            passed=$(echo "$closing" | sum_matches '[0-9]+ passed' /dev/stdin)
            failed=$(echo "$closing" | sum_matches '[0-9]+ (failed|errors?|skipped)' /dev/stdin) ;;
        node)
            passed=$(sum_matches '^# pass [0-9]+' "$LOG_DIR/$name.log")
            failed=$(sum_matches '^# fail [0-9]+' "$LOG_DIR/$name.log") ;;
        plain)
            # The runner's last "N passed, N failed" line; valgrind's leak report may follow it.
            local closing
            closing=$(grep -E '^[0-9]+ passed, [0-9]+ failed' "$LOG_DIR/$name.log" | tail -n 1)
            passed=$(echo "$closing" | sum_matches '^[0-9]+ passed' /dev/stdin)
            failed=$(echo "$closing" | sum_matches ' [0-9]+ failed' /dev/stdin) ;;
    esac
    record "$name" "$passed" "$failed" "$rc"
    if [ "$rc" -ne 0 ] || [ "$failed" -ne 0 ]; then show_failures "$LOG_DIR/$name.log"; fi
}

# show_failures LOG: what a failed run said of its failures (panics, assertions, a
# runner that died on a signal), so that the summary a CI service keeps names the cause.
show_failures() {
    printf -- '--- failure details from %s\n' "${1#"$ROOT"/}"
    grep -E -A12 "panicked at|^---- |Caused by|process didn't exit|signal: |^FAILED |^E  |AssertionError|not ok |Error: |ERROR:|Segmentation|Aborted" "$1" |
        head -n 200
}

# --- suites ----------------------------------------------------------------------------

suite_fmt() { run_check fmt cargo fmt --all -- --check; }
suite_clippy() { run_check clippy cargo clippy --workspace --all-targets --quiet -- -D warnings; }
suite_doc() { RUSTDOCFLAGS="-D warnings" run_check doc cargo doc --workspace --no-deps --quiet; }
suite_msrv() { run_check msrv scripts/check-msrv.sh; }
# Uncaptured: a test binary that dies (a signal, a panic in a callback across the C
# ABI) takes the output libtest captured with it, and the log would not say why.
suite_rust() { run_counted rust cargo cargo test --workspace --no-fail-fast -- --nocapture; }
suite_header() { build_native; run_check header scripts/check-header.sh; }
suite_c-plain() { build_native; run_counted c-plain plain tests/c/run.sh plain; }
suite_c-asan() { build_native; run_counted c-asan plain tests/c/run.sh asan; }
suite_c-valgrind() { need_apt valgrind; build_native; run_counted c-valgrind plain tests/c/run.sh valgrind; }
suite_c-stress-asan() { build_native; run_counted c-stress-asan plain tests/c/stress/run.sh asan; }
suite_c-stress-valgrind() {
    need_apt valgrind; build_native
    run_counted c-stress-valgrind plain tests/c/stress/run.sh valgrind
}
suite_pytest() {
    build_native; setup_venv
    run_counted pytest pytest .venv/bin/python -m pytest -q --timeout 300 bindings/python/tests
}
# The binding's suite again on every other Python it supports: 3.10, the oldest, 3.12
# (coroutine listeners start eagerly from 3.12) and 3.13, the newest here; on the newest
# in Python's development mode with asyncio's debug mode and every warning an error (an
# unawaited coroutine, an unclosed resource, a call from the wrong thread, a deprecation).
suite_pytest-py310() { pytest_on 3.10 pytest-py310; }
suite_pytest-py312() { pytest_on 3.12 pytest-py312; }
suite_pytest-py313() { PYTHONASYNCIODEBUG=1 pytest_on 3.13 pytest-py313 -X dev -W error; }
pytest_on() {
    local version=$1 name=$2
    shift 2
    build_native; setup_venv_for "$version"
    run_counted "$name" pytest ".venv-$version/bin/python" "$@" -m pytest -q --timeout 300 bindings/python/tests
}
suite_python-lint() {
    setup_venv
    run_check python-lint bash -c 'cd bindings/python && ../../.venv/bin/ruff check webpubsub_client tests &&
        ../../.venv/bin/ruff format --check webpubsub_client tests && ../../.venv/bin/mypy'
}
suite_python-package() { build_native; setup_venv; run_counted python-package plain scripts/check-python-package.sh; }
suite_interop-python() {
    build_native; setup_venv
    run_counted interop-python pytest .venv/bin/python -m pytest -q --timeout 300 tests/interop/python
}
suite_interop-node() {
    build_native; setup_node
    run_counted interop-node node node --test tests/interop/node/
}
suite_examples() { need_apt pkg-config binutils; build_native; setup_venv; run_counted examples plain scripts/run-examples.sh; }

START=$(date +%s)
for suite in $SUITES; do
    case " $ALL_SUITES " in *" $suite "*) ;; *) die "unknown suite '$suite' (known: $ALL_SUITES)" ;; esac
    "suite_$suite"
done

printf '\n==> summary (%ss)\n' "$(($(date +%s) - START))"
printf '%s\n' "${SUMMARY[@]}"
printf '%d passed, %d failed\n' "$TOTAL_PASSED" "$TOTAL_FAILED"
[ "$TOTAL_FAILED" -eq 0 ]
