#!/usr/bin/env bash
# Checks the `rust-version` the library and the emulator declare in their Cargo.toml.
#
#   scripts/check-msrv.sh           every crate they build, with the committed Cargo.lock,
#                                   declares no newer rust-version (offline; the test run's
#                                   msrv suite); clippy's incompatible_msrv lint checks
#                                   the standard library APIs they use
#   scripts/check-msrv.sh --build   that, then compiles both (cargo check) with the Rust
#                                   they declare, installed with rustup when missing
#                                   (needs the network)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

case "${1:-}" in
    "") build=false ;;
    --build) build=true ;;
    *) echo "usage: $0 [--build]" >&2; exit 2 ;;
esac

rust_version_of() { # rust_version_of MANIFEST: the package's declared rust-version
    sed -n 's/^rust-version *= *"\([0-9.]*\)"/\1/p' "$1"
}

# The workspace's packages and dependency graph, with the committed lock, on this host.
METADATA=$(cargo metadata --locked --format-version 1 \
    --filter-platform "$(rustc -vV | sed -n 's/^host: //p')")

# Fails naming every crate that PACKAGE builds (normal and build dependencies, on this
# host) whose rust-version is newer than VERSION.
check_dependencies() {
    local package=$1 version=$2
    printf '%s' "$METADATA" |
        python3 -c '
import json, sys

package, declared = sys.argv[1], sys.argv[2]
meta = json.load(sys.stdin)
version = lambda v: (tuple(int(x) for x in v.split(".")) + (0, 0))[:3]
by_id = {p["id"]: p for p in meta["packages"]}
edges = {n["id"]: n["deps"] for n in meta["resolve"]["nodes"]}
root = next(p["id"] for p in meta["packages"] if p["name"] == package)
built, todo = {root}, [root]
while todo:
    for dep in edges[todo.pop()]:
        kinds = {k["kind"] for k in dep["dep_kinds"]}
        if kinds - {"dev"} and dep["pkg"] not in built:
            built.add(dep["pkg"])
            todo.append(dep["pkg"])
needs = {i: by_id[i].get("rust_version") for i in built}
newer = sorted(
    "{name} {version} ({rust_version})".format(**by_id[i])
    for i, needed in needs.items()
    if needed and version(needed) > version(declared)
)
if newer:
    sys.exit(f"{package} declares rust-version {declared}, but builds: " + ", ".join(newer))
print(f"{package}: the {len(built) - 1} crates it builds need at most Rust {declared}")
' "$package" "$version"
}

# check PACKAGE MANIFEST CARGO_ARGS...
check() {
    local package=$1 manifest=$2; shift 2
    local version
    version=$(rust_version_of "$manifest")
    [ -n "$version" ] || { echo "$manifest declares no rust-version" >&2; exit 1; }
    check_dependencies "$package" "$version"
    "$build" || return 0
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
