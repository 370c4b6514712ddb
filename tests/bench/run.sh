#!/usr/bin/env bash
# Benchmarks (not tests): each runs a baseline beside Freshet, same machine,
# same run, and prints Markdown tables. Results: tests/bench/README.md.
#   tests/bench/run.sh serve       GetFeatures beside an empty tonic RPC; overload; tracing on/off
#   tests/bench/run.sh ingest      exactly-once ingest beside a raw rdkafka consume loop
#                                  (BENCH_RECORDS, BENCH_USERS, BENCH_BATCHES: one case of your own)
#   tests/bench/run.sh freshness   Kafka append -> servable at 5000 events/s
#   tests/bench/run.sh soak        exactly-once under SIGKILLs, a freeze and a Postgres restart,
#                                  two instances; exact comparison (SOAK_EVENTS=200000)
#   tests/bench/run.sh props       the property tests with a long budget (PROPTEST_CASES=20000)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
SERVICES=$ROOT/deploy/local/services.sh
case "${1:-}" in
  serve) bench=bench_serve; services=postgres,redis ;;
  ingest) bench=bench_ingest; services=postgres,kafka ;;
  freshness) bench=bench_freshness; services=postgres,kafka; set -- kafka ;;
  soak) bench=bench_soak; services=postgres,kafka ;;
  props)
    # No services: the decoder, codec, view-file and request properties.
    cd "$ROOT"
    export PROPTEST_CASES=${PROPTEST_CASES:-20000}
    cargo test --release -q -p freshet-store -p freshet-ingest -p freshet-server -- \
      any_record_decodes doubles_decode every_state_round_trips arbitrary_bytes_never_panic arbitrary_text_never_panics \
      generated_files_are_refused edited_reference_files any_request_is_planned valid_requests_are_accepted 2>&1 |
      awk '/^test result:/ {p += $4; f += $6} /panicked|FAILED/ {print} END {printf "property tests: %d passed, %d failed, '"$PROPTEST_CASES"' cases each\n", p, f}'
    exit 0 ;;
  *) sed -n '2,10p' "$0" >&2; exit 2 ;;
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
