#!/usr/bin/env bash
# Checks that the library and the emulator build with the oldest Rust each declares
# (`rust-version` in its Cargo.toml), with the committed Cargo.lock. Installs a missing
# toolchain with rustup (minimal profile); fails when it cannot.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

rust_version_of() { # rust_version_of MANIFEST: the package's declared rust-version
    sed -n 's/^rust-version *= *"\([0-9.]*\)"/\1/p' "$1"
}

# check PACKAGE MANIFEST CARGO_ARGS...
check() {
    local package=$1 manifest=$2; shift 2
    local version
    version=$(rust_version_of "$manifest")
    [ -n "$version" ] || { echo "$manifest declares no rust-version" >&2; exit 1; }
    if ! rustup run "$version" rustc --version >/dev/null 2>&1; then
        echo "installing Rust $version"
        rustup toolchain install "$version" --profile minimal --no-self-update
    fi
    echo "$package with Rust $version: cargo check $*"
    # A target directory of its own: another compiler's artifacts would evict the build's.
    CARGO_TARGET_DIR=target/msrv cargo "+$version" check --locked --quiet -p "$package" "$@"
}

check webpubsub-client Cargo.toml --lib
check webpubsub-emulator emulator/Cargo.toml --lib --bins
echo "both build with their declared rust-version"
