#!/usr/bin/env bash
# Serving benchmark (not a test): GetFeatures beside an empty tonic RPC,
# same machine, same run. Results are printed as Markdown tables.
#   tests/bench/serve.sh
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
SERVICES=$ROOT/deploy/local/services.sh
"$SERVICES" install >/dev/null
DIR=$(mktemp -d "${TMPDIR:-/tmp}/freshet-bench.XXXXXX")
trap '"$SERVICES" stop "$DIR" >/dev/null || true; rm -rf "$DIR"' EXIT
"$SERVICES" start --only postgres,redis "$DIR" >/dev/null
# shellcheck source=/dev/null
source "$DIR/env"
cd "$ROOT"
cargo build --release --workspace --bins -q
target/release/bench_serve
