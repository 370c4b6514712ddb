#!/usr/bin/env bash
# The README's first command: the reference pipeline end to end on this machine.
#   deploy/local/demo.sh [--keep] [--direct]
#
# An application writes rows to Postgres (database "app"); Debezium on Kafka
# Connect publishes each change to Kafka in transactions; freshet-ingest
# applies them exactly once; freshet-server serves the features over gRPC.
# The load is steady with a 10x spike; the terminal shows progress, lag and
# freshness while it flows, then measures Postgres commit -> servable, and
# asks for features with the Rust client and with grpcurl. --keep leaves
# everything running. --direct runs the same load without Debezium, Kafka
# Connect or Kafka: freshet-ingest streams the app's tables from a logical
# replication slot (deploy/views/direct.toml).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
SERVICES=$HERE/services.sh
export FRESHET_CACHE=${FRESHET_CACHE:-${HOME:?}/.cache/freshet}
KEEP= DIRECT=
for arg in "$@"; do
  case $arg in
    --keep) KEEP=--keep ;;
    --direct) DIRECT=--direct ;;
    *) echo "usage: $0 [--keep] [--direct]" >&2; exit 2 ;;
  esac
done
# What ingest_offsets counts as applied: Kafka records, or source transactions.
APPLIED=records
[[ $DIRECT ]] && APPLIED=transactions
DIR=$ROOT/.freshet/demo
BIN=$ROOT/target/release
say() { printf '\033[1m== %s\033[0m\n' "$*"; }

cleanup() {
  if [[ $KEEP == --keep ]]; then
    say "left running (server on $ADDR); stop with: kill \$(cat $DIR/*.pid); $SERVICES stop $DIR"
    return
  fi
  for pid in "$DIR"/*.pid; do [[ -f $pid ]] && kill "$(cat "$pid")" 2>/dev/null || true; done
  sleep 1
  "$SERVICES" stop "$DIR" >/dev/null || true
}
ADDR=
trap cleanup EXIT

say "installing what is missing (apt packages, Kafka, Kafka Connect and Debezium jars, grpcurl)"
"$SERVICES" install >/dev/null
say "building Freshet (release)"
(cd "$ROOT" && cargo build --release --bins --example client -q)
export PATH=$FRESHET_CACHE/bin:$PATH

"$SERVICES" stop "$DIR" >/dev/null 2>&1 || true
rm -rf "$DIR"; mkdir -p "$DIR"
if [[ $DIRECT ]]; then
  say "starting Postgres and Redis under $DIR (no Kafka: --direct)"
  "$SERVICES" start --only postgres,redis "$DIR" >/dev/null
else
  say "starting Postgres, Redis, Kafka and Kafka Connect under $DIR"
  "$SERVICES" start "$DIR" >/dev/null
fi
# shellcheck source=/dev/null
source "$DIR/env"
APP_URL=${FRESHET_DATABASE_URL%/*}/app

if [[ $DIRECT ]]; then
  say "migrating Freshet's store; creating the app's tables and a publication (freshet-ingest makes the slot)"
  export FRESHET_VIEWS=$ROOT/deploy/views/direct.toml FRESHET_SOURCE_DATABASE_URL=$APP_URL
  "$BIN/freshet-server" migrate
  psql -q "$FRESHET_DATABASE_URL" -c "CREATE DATABASE app"
  psql -q "$APP_URL" -f "$HERE/source-schema.sql" -c "CREATE PUBLICATION freshet FOR TABLE public.user_events, public.orders"
else
  export FRESHET_VIEWS=$ROOT/deploy/views/reference.toml
  say "migrating Freshet's store; creating the app's tables and the Debezium connector"
  "$BIN/freshet-server" migrate
  "$SERVICES" connector "$DIR"
fi

say "starting freshet-ingest and freshet-server"
RUST_LOG=warn "$BIN/freshet-ingest" run --metrics-listen 127.0.0.1:0 >"$DIR/ingest.log" 2>&1 & echo $! >"$DIR/ingest.pid"
RUST_LOG=warn "$BIN/freshet-server" serve --listen 127.0.0.1:0 --source-database-url "$APP_URL" >"$DIR/server.log" 2>&1 & echo $! >"$DIR/server.pid"
for _ in $(seq 100); do grep -q "listening on" "$DIR/server.log" && break; sleep 0.1; done
ADDR=$(sed -n 's/^freshet-server listening on //p' "$DIR/server.log")
INGEST_METRICS=$(sed -n 's/^freshet-ingest metrics on //p' "$DIR/ingest.log")
grpcurl -plaintext "$ADDR" list

# The application: one psql session, a statement every 100 ms inserting
# RATE/10 events (and a fifth as many orders), each its own transaction.
load() {
  for phase in "$@"; do
    local rate=${phase%:*} seconds=${phase#*:} ticks
    ticks=$((seconds * 10))
    for ((i = 0; i < ticks; i++)); do
      echo "INSERT INTO user_events (user_id, event_type, occurred_at)
              SELECT 1 + (random() * 49)::int, (ARRAY['view','click','add_to_cart','purchase'])[1 + (random() * 3)::int], clock_timestamp()
              FROM generate_series(1, $((rate / 10)));"
      echo "INSERT INTO orders (user_id, amount, items, express, ordered_at)
              SELECT 1 + (random() * 49)::int, round((random() * 200)::numeric, 2), 1 + (random() * 4)::int, random() < 0.3, clock_timestamp()
              FROM generate_series(1, $((rate / 50 + 1)));"
      sleep 0.1
    done
  done
}

show() {
  local inserted applied dead
  inserted=$(psql -qtA "$APP_URL" -c "SELECT (SELECT count(*) FROM user_events) + (SELECT count(*) FROM orders)")
  applied=$(psql -qtA "$FRESHET_DATABASE_URL" -c "SELECT coalesce(sum(records_applied), 0) FROM ingest_offsets")
  dead=$(psql -qtA "$FRESHET_DATABASE_URL" -c "SELECT coalesce(sum(records_dead), 0) FROM ingest_offsets")
  say "$(date +%T) rows inserted: $inserted   $APPLIED applied: $applied   dead-lettered: $dead"
  grpcurl -plaintext -d '{}' "$ADDR" freshet.v1.FeatureService/GetFreshness | python3 "$HERE/show_freshness.py"
  curl -s "$INGEST_METRICS" | awk '
    /^freshet_ingest_paused_partitions /{p=$2} /^freshet_ingest_pauses_total /{t=$2}
    /^freshet_ingest_commit_duration_seconds_count /{c=$2} /^freshet_ingest_batch_records_sum /{r=$2}
    END {printf "  ingest: paused partitions %d (pauses so far %d), %d commits, %.0f records per batch on average\n", p, t, c, (c ? r / c : 0)}'
}

say "the application writes: 200 rows/s for 15 s, 2000 rows/s for 10 s (the spike), 200 rows/s for 10 s"
load 200:15 2000:10 200:10 | psql -q "$APP_URL" >/dev/null 2>"$DIR/load.log" &
LOAD=$!
echo $LOAD >"$DIR/load.pid"
while kill -0 "$LOAD" 2>/dev/null; do
  show
  sleep 2
done
sleep 2
say "after the load"
show

say "measuring Postgres commit -> servable (100 marker rows/s for 10 s, polled through GetFeatures)"
"$BIN/bench_freshness" "$([[ $DIRECT ]] && echo direct || echo debezium)" "$ADDR" "$APP_URL" 10

say "features of users 1, 2 and 3 with the Rust client (client-examples/rust)"
"$ROOT/target/release/examples/client" --address "$ADDR" --users 1,2,3

say "the same with grpcurl"
grpcurl -plaintext -d '{"features": ["user_activity:events_10s", "user_activity:events_1m", "user_activity:last_event_type", "orders:spend_1h", "orders:last_express"],
  "entities": [{"int64Key": "1"}, {"int64Key": "2"}, {"int64Key": "3"}]}' "$ADDR" freshet.v1.FeatureService/GetFeatures
