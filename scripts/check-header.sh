#!/usr/bin/env bash
# Fails when the committed C header differs from the one build.rs generates.
# build.rs rewrites include/webpubsub_client.h during `cargo build`, so after a build
# any difference from the committed file shows in git.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
cargo build --quiet --lib
if ! git diff --exit-code -- include/webpubsub_client.h; then
    echo "include/webpubsub_client.h differs from the generated header: commit the regenerated file" >&2
    exit 1
fi
if [ -n "$(git ls-files --others --exclude-standard include/)" ]; then
    echo "include/ has generated files that are not committed" >&2
    exit 1
fi
echo "header matches the generated one"
