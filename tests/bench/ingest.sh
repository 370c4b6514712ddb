#!/usr/bin/env bash
# Ingest benchmark (not a test): exactly-once ingest beside a raw rdkafka
# consume-only loop on the same topic, same machine, same run.
#   tests/bench/ingest.sh            (BENCH_RECORDS=200000 by default)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
SERVICES=$ROOT/deploy/local/services.sh
"$SERVICES" install >/dev/null
DIR=$(mktemp -d "${TMPDIR:-/tmp}/freshet-bench.XXXXXX")
trap '"$SERVICES" stop "$DIR" >/dev/null || true; rm -rf "$DIR"' EXIT
"$SERVICES" start --only postgres,kafka "$DIR" >/dev/null
# shellcheck source=/dev/null
source "$DIR/env"
cd "$ROOT"
cargo build --release --workspace --bins -q
target/release/bench_ingest
