#!/usr/bin/env bash
# Benchmarks (not tests): each runs a baseline beside Freshet, same machine,
# same run, and prints Markdown tables. Results: tests/bench/README.md.
#   tests/bench/run.sh serve [--with-feast]
#                                  GetFeatures beside an empty tonic RPC, server pinned to one core
#                                  and the load to the other: capacity, latency, CPU per call, with
#                                  the project's generator and ghz; overload; tracing on/off;
#                                  --with-feast: Feast's Python feature server on the same data
#                                  (BENCH_SERVER_CPUS=0, BENCH_LOAD_CPUS=1 by default; everything
#                                  measured runs at BENCH_NICE, -10 as root, ahead of other builds)
#                                  BENCH_ONLY=hot-all,overload: only those parts (modes hot, hot-uncoalesced, hot-all,
#                                  redis, postgres; overload; tracing)
#   tests/bench/run.sh ingest      exactly-once ingest beside a raw rdkafka consume loop
#                                  (BENCH_RECORDS, BENCH_USERS, BENCH_BATCHES: one case of your own)
#   tests/bench/run.sh freshness   Kafka append -> servable at 5000 events/s
#   tests/bench/run.sh wal         Postgres commit -> servable through Debezium + Kafka and through the
#                                  direct source (a replication slot), one run, one table, one writer:
#                                  100 and 5000 rows/s, a ramp until lag grows, CPU seconds per path
#                                  (BENCH_WAL_SECONDS, BENCH_WAL_STEPS, BENCH_WAL_STEP_SECONDS)
#   tests/bench/run.sh soak        exactly-once under SIGKILLs, a freeze and a Postgres restart,
#                                  two instances; exact comparison (SOAK_EVENTS=200000)
#   tests/bench/run.sh props       the property tests with a long budget (PROPTEST_CASES=20000)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
SERVICES=$ROOT/deploy/local/services.sh
CACHE=${FRESHET_CACHE:-${HOME:?}/.cache/freshet} # as services.sh: grpcurl and ghz live in $CACHE/bin
case "${1:-}" in
  serve) bench=bench_serve; services=postgres,redis ;;
  ingest) bench=bench_ingest; services=postgres,kafka ;;
  freshness) bench=bench_freshness; services=postgres,kafka; set -- kafka ;;
  wal) bench=bench_wal; services=postgres,kafka,connect ;;
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
  *) sed -n '2,22p' "$0" >&2; exit 2 ;;
esac
[[ $bench == bench_freshness ]] || shift
with_feast=false
if [[ $bench == bench_serve && ${1:-} == --with-feast ]]; then with_feast=true; shift; fi
"$SERVICES" install >/dev/null
DIR=$(mktemp -d "${TMPDIR:-/tmp}/freshet-bench.XXXXXX")
FEAST_REDIS=
cleanup() {
  if [[ -n $FEAST_REDIS && $(cat "/proc/$FEAST_REDIS/comm" 2>/dev/null) == redis-server ]]; then kill "$FEAST_REDIS" || true; fi
  "$SERVICES" stop "$DIR" >/dev/null || true
  rm -rf "$DIR"
}
trap cleanup EXIT
"$SERVICES" start --only "$services" "$DIR" >/dev/null
# shellcheck source=/dev/null
source "$DIR/env"
export FRESHET_SERVICES_SCRIPT=$SERVICES # the soak restarts Postgres
cd "$ROOT"
cargo build --release --workspace --bins -q
run=("target/release/$bench")
if [[ $bench == bench_wal ]]; then
  # The application database and Debezium's connector on it (as demo.sh);
  # bench_wal adds the direct view's publication and charges CPU by pid.
  "$SERVICES" connector "$DIR" >/dev/null
  export BENCH_APP_URL=${FRESHET_DATABASE_URL%/*}/app BENCH_POSTGRES_PID BENCH_KAFKA_PID BENCH_CONNECT_PID
  BENCH_POSTGRES_PID=$(head -n 1 "$DIR/postgres/data/postmaster.pid")
  BENCH_KAFKA_PID=$(cat "$DIR/kafka/kafka.pid")
  BENCH_CONNECT_PID=$(cat "$DIR/connect/connect.pid")
fi
if [[ $bench == bench_serve ]]; then
  # The server gets a core of its own (bench_serve pins it); the generator,
  # ghz, wrk, Postgres and Redis share the other.
  export BENCH_SERVER_CPUS=${BENCH_SERVER_CPUS:-0} BENCH_LOAD_CPUS=${BENCH_LOAD_CPUS:-1}
  export BENCH_POSTGRES_PID BENCH_REDIS_PID BENCH_GHZ=$CACHE/bin/ghz
  BENCH_POSTGRES_PID=$(head -n 1 "$DIR/postgres/data/postmaster.pid")
  BENCH_REDIS_PID=$(cat "$DIR/redis/redis.pid")
  # Other builds may share the machine: what is measured goes first.
  nice=${BENCH_NICE:-$( ((EUID == 0)) && echo -10 || echo 0)}
  place() {
    taskset -a -cp "$BENCH_LOAD_CPUS" "$1" >/dev/null
    renice -n "$nice" -p "$1" >/dev/null
  }
  place "$BENCH_POSTGRES_PID" # backends fork from it: they inherit both
  place "$BENCH_REDIS_PID"
  [[ -x $BENCH_GHZ ]] || GOBIN=$CACHE/bin go install github.com/bojand/ghz/cmd/ghz@latest
  if $with_feast; then
    # The kit's setup: a venv with feast[redis] (kept in the cache), 10,000
    # users x 50 features materialized into a Redis of its own.
    export BENCH_FEAST_KIT=${FEAST_KIT:-$ROOT/../shared/peers/feast}
    export BENCH_FEAST_DIR=$CACHE/feast-bench BENCH_FEAST_REDIS_PID
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    BENCH="$BENCH_FEAST_DIR" REDIS_PORT=$port bash "$BENCH_FEAST_KIT/setup.sh" >"$DIR/feast-setup.log" 2>&1 \
      || { tail -n 30 "$DIR/feast-setup.log" >&2; exit 1; }
    FEAST_REDIS=$(cat "$BENCH_FEAST_DIR/redis.pid")
    BENCH_FEAST_REDIS_PID=$FEAST_REDIS
    place "$FEAST_REDIS"
  fi
  run=(nice -n "$nice" taskset -c "$BENCH_LOAD_CPUS" "${run[@]}")
  echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
fi
"${run[@]}" "$@"
[[ $bench != bench_serve ]] || echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
