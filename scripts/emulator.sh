# Sourced by scripts: start_emulator runs target/debug/webpubsub-emulator on a free
# loopback port in the background, exports WPS_CONNECTION_STRING (its first stdout
# line) and stops it when the calling shell exits.
start_emulator() {
    local bin="${WPS_EMULATOR_BIN:-$ROOT/target/debug/webpubsub-emulator}"
    [ -x "$bin" ] || { echo "emulator binary not found at $bin (run cargo build)" >&2; return 1; }
    local out
    out="$(mktemp -d)/emulator.out"
    mkfifo "$out.fifo"
    "$bin" --host 127.0.0.1 --port 0 "$@" >"$out.fifo" 2>"$out.err" &
    WPS_EMULATOR_PID=$!
    trap 'kill "$WPS_EMULATOR_PID" 2>/dev/null; wait "$WPS_EMULATOR_PID" 2>/dev/null' EXIT
    exec {WPS_EMULATOR_FD}<"$out.fifo"
    if ! read -r -t 20 -u "$WPS_EMULATOR_FD" WPS_CONNECTION_STRING; then
        echo "emulator did not print its connection string; stderr:" >&2
        cat "$out.err" >&2
        return 1
    fi
    cat <&"$WPS_EMULATOR_FD" >/dev/null &
    export WPS_CONNECTION_STRING WPS_EMULATOR_PID
}
