#!/usr/bin/env bash
# Benchmarks (not tests): each runs a baseline beside Freshet, same machine,
# same run, and prints Markdown tables. Results: tests/bench/README.md.
#   tests/bench/run.sh serve       GetFeatures beside an empty tonic RPC; overload; tracing on/off
#   tests/bench/run.sh ingest      exactly-once ingest beside a raw rdkafka consume loop
#                                  (BENCH_RECORDS=200000 by default)
#   tests/bench/run.sh freshness   Kafka append -> servable at 5000 events/s
#   tests/bench/run.sh soak        exactly-once under SIGKILLs, a freeze and a Postgres restart,
#                                  two instances; exact comparison (SOAK_EVENTS=200000)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
SERVICES=$ROOT/deploy/local/services.sh
case "${1:-}" in
  serve) bench=bench_serve; services=postgres,redis ;;
  ingest) bench=bench_ingest; services=postgres,kafka ;;
  freshness) bench=bench_freshness; services=postgres,kafka; set -- kafka ;;
  soak) bench=bench_soak; services=postgres,kafka ;;
  *) sed -n '2,9p' "$0" >&2; exit 2 ;;
esac
[[ $bench == bench_freshness ]] || shift
"$SERVICES" install >/dev/null
DIR=$(mktemp -d "${TMPDIR:-/tmp}/freshet-bench.XXXXXX")
trap '"$SERVICES" stop "$DIR" >/dev/null || true; rm -rf "$DIR"' EXIT
"$SERVICES" start --only "$services" "$DIR" >/dev/null
# shellcheck source=/dev/null
source "$DIR/env"
export FRESHET_SERVICES_SCRIPT=$SERVICES # the soak restarts Postgres
cd "$ROOT"
cargo build --release --workspace --bins -q
"target/release/$bench" "$@"
