#!/usr/bin/env bash
# Installs the C library for C and C++ programs: the shared and static libraries, the
# header and a pkg-config file, under a prefix.
#
# Usage: scripts/install.sh [--prefix DIR] [--profile release|dev]
#   --prefix   where to install (default /usr/local): DIR/lib, DIR/include,
#              DIR/lib/pkgconfig/webpubsub_client.pc
#   --profile  the cargo profile to build (default release)
# Then: cc app.c $(pkg-config --cflags --libs webpubsub_client)
# (with PKG_CONFIG_PATH=DIR/lib/pkgconfig for a prefix pkg-config does not search).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
prefix=/usr/local
profile=release
while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) prefix="$2"; shift 2 ;;
        --profile) profile="$2"; shift 2 ;;
        *) echo "install.sh: unknown argument $1 (see the top of this script)" >&2; exit 2 ;;
    esac
done
case "$profile" in
    release) dir=target/release ;;
    dev) dir=target/debug ;;
    *) echo "install.sh: --profile is release or dev" >&2; exit 2 ;;
esac
cargo build --quiet --lib --profile "$profile"
version="$(sed -n 's/^#define WPS_VERSION "\(.*\)"$/\1/p' include/webpubsub_client.h)"
[ -n "$version" ] || { echo "install.sh: no WPS_VERSION in the header" >&2; exit 1; }
install -d "$prefix/lib/pkgconfig" "$prefix/include"
install -m 0755 "$dir/libwebpubsub_client.so" "$prefix/lib/"
install -m 0644 "$dir/libwebpubsub_client.a" "$prefix/lib/"
install -m 0644 include/webpubsub_client.h "$prefix/include/"
# Libs.private: what the static library needs besides libc (rustc --print native-static-libs).
cat > "$prefix/lib/pkgconfig/webpubsub_client.pc" <<PC
prefix=$prefix
libdir=\${prefix}/lib
includedir=\${prefix}/include

Name: webpubsub_client
Description: Azure Web PubSub client library (C API)
Version: $version
Libs: -L\${libdir} -lwebpubsub_client
Libs.private: -lgcc_s -lutil -lrt -lpthread -lm -ldl
Cflags: -I\${includedir}
PC
echo "installed webpubsub_client $version under $prefix"
