#!/usr/bin/env bash
# The README's first command: Freshet end to end on this machine.
#   deploy/local/demo.sh [--keep]
# Starts Kafka, Postgres and Redis (deploy/local/services.sh), migrates the
# store, starts freshet-ingest and freshet-server on deploy/views/reference.toml,
# produces Debezium-shaped change events for user_events and orders at a
# steady rate with a 10x spike, shows progress and freshness while they flow,
# then asks the server for features with grpcurl. --keep leaves it running.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
SERVICES=$HERE/services.sh
export FRESHET_CACHE=${FRESHET_CACHE:-${HOME:?}/.cache/freshet}
KEEP=${1:-}
DIR=$ROOT/.freshet/demo
say() { printf '\033[1m== %s\033[0m\n' "$*"; }

cleanup() {
  [[ $KEEP == --keep ]] && { say "left running; stop with: $SERVICES stop $DIR && kill $(cat "$DIR"/*.pid 2>/dev/null | tr '\n' ' ')"; return; }
  pkill -f "demo_events.py" 2>/dev/null || true
  for pid in "$DIR"/*.pid; do [[ -f $pid ]] && kill "$(cat "$pid")" 2>/dev/null || true; done
  sleep 1
  "$SERVICES" stop "$DIR" >/dev/null || true
}
trap cleanup EXIT

say "installing what is missing (apt packages, Kafka jars, grpcurl)"
"$SERVICES" install >/dev/null
say "building Freshet"
(cd "$ROOT" && cargo build --release --bins -q)
BIN=$ROOT/target/release
export PATH=$FRESHET_CACHE/bin:$PATH

say "starting Kafka, Postgres and Redis under $DIR"
"$SERVICES" stop "$DIR" >/dev/null 2>&1 || true
rm -rf "$DIR"; mkdir -p "$DIR"
"$SERVICES" start "$DIR" >/dev/null
# shellcheck source=/dev/null
source "$DIR/env"
export FRESHET_VIEWS=$ROOT/deploy/views/reference.toml

say "migrating the store"
"$BIN/freshet-server" migrate
for topic in app.public.user_events app.public.orders; do
  "$SERVICES" kafka-cli org.apache.kafka.tools.TopicCommand --bootstrap-server "$FRESHET_KAFKA_BROKERS" \
    --create --topic "$topic" --partitions 3 --replication-factor 1 >/dev/null
done

say "starting freshet-ingest and freshet-server"
RUST_LOG=warn "$BIN/freshet-ingest" run >"$DIR/ingest.log" 2>&1 & echo $! >"$DIR/ingest.pid"
RUST_LOG=warn "$BIN/freshet-server" serve --listen 127.0.0.1:0 >"$DIR/server.log" 2>&1 & echo $! >"$DIR/server.pid"
for _ in $(seq 100); do grep -q "listening on" "$DIR/server.log" && break; sleep 0.1; done
ADDR=$(sed -n 's/^freshet-server listening on //p' "$DIR/server.log")
grpcurl -plaintext "$ADDR" list

say "producing change events: 200/s for 10 s, 2000/s for 5 s (the spike), 200/s for 10 s"
python3 "$HERE/demo_events.py" 200:10 2000:5 200:10 | \
  "$SERVICES" kafka-cli org.apache.kafka.tools.ConsoleProducer --bootstrap-server "$FRESHET_KAFKA_BROKERS" \
    --topic app.public.user_events --property parse.key=true --property key.separator='|' \
    >/dev/null 2>"$DIR/producer.log" &
PRODUCER=$!
echo "$PRODUCER" >"$DIR/producer.pid"

watch_freshness() {
  grpcurl -plaintext -d '{}' "$ADDR" freshet.v1.FeatureService/GetFreshness | python3 "$HERE/show_freshness.py"
}
while kill -0 "$PRODUCER" 2>/dev/null; do
  applied=$(psql -qtA "$FRESHET_DATABASE_URL" -c "SELECT coalesce(sum(records_applied),0) FROM ingest_offsets")
  say "$(date +%T) records applied: $applied"
  watch_freshness
  sleep 2
done
wait "$PRODUCER"
sleep 2
say "final freshness"
watch_freshness

say "features of users 1, 2 and 3 (grpcurl)"
grpcurl -plaintext -d '{"features": ["user_activity:events_10s", "user_activity:events_1m", "user_activity:events_1h", "user_activity:last_event_type"],
  "entities": [{"int64Key": "1"}, {"int64Key": "2"}, {"int64Key": "3"}]}' "$ADDR" freshet.v1.FeatureService/GetFeatures
