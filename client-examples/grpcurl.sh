#!/usr/bin/env bash
# The ad-hoc session a person types at freshet-server with grpcurl (see
# grpcurl.md). Reflection is on, so no .proto files are needed.
#
#   client-examples/grpcurl.sh ADDRESS TOKEN [USERS]
#
# ADDRESS  host:port of freshet-server, e.g. 127.0.0.1:50051
# TOKEN    a bearer token from the server's --tokens-file ("" if auth is off)
# USERS    comma-separated user ids for GetFeatures (default 1,2,404)
#
# Each step prints "== <what it runs>" and then grpcurl's answer.
# Environment: GRPCURL (default: grpcurl on PATH, else
# $FRESHET_CACHE/bin/grpcurl as installed by deploy/local/services.sh),
# FRESHET_TLS_CA (a CA PEM file: use TLS instead of plaintext).
set -euo pipefail

if [[ $# -lt 2 ]]; then
  sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
  exit 2
fi
ADDRESS=$1
TOKEN=$2
USERS=${3:-1,2,404}

GRPCURL=${GRPCURL:-$(command -v grpcurl || echo "${FRESHET_CACHE:-$HOME/.cache/freshet}/bin/grpcurl")}
[[ -x $GRPCURL ]] || { echo "grpcurl not found: deploy/local/services.sh install builds it" >&2; exit 1; }

# Flags every call shares: transport, the token, and a deadline (-max-time,
# seconds) so a stuck server cannot hang the session.
ARGS=(-max-time 5)
if [[ -n ${FRESHET_TLS_CA:-} ]]; then ARGS+=(-cacert "$FRESHET_TLS_CA"); else ARGS+=(-plaintext); fi
# -H goes with both the reflection calls and the RPCs.
[[ -n $TOKEN ]] && ARGS+=(-H "authorization: Bearer $TOKEN")

run() { # TITLE GRPCURL-ARGS...
  echo "== $1"
  shift
  "$GRPCURL" "${ARGS[@]}" "$@"
}

# 1. What does the server offer?
run "list" "$ADDRESS" list
run "describe freshet.v1.FeatureService" "$ADDRESS" describe freshet.v1.FeatureService
run "describe freshet.v1.GetFeaturesRequest" "$ADDRESS" describe freshet.v1.GetFeaturesRequest

# 2. Which views and features can be asked for?
run "ListFeatureViews" "$ADDRESS" freshet.v1.FeatureService/ListFeatureViews

# 3. Is the data fresh enough to trust?
run "GetFreshness" -d '{}' "$ADDRESS" freshet.v1.FeatureService/GetFreshness

# 4. Features of a batch of users, in request order. int64 keys are JSON
# strings in protobuf's JSON mapping ("1", not 1).
entities=$(IFS=,; for u in $USERS; do printf '{"int64Key": "%s"},' "$u"; done)
body=$(cat <<EOF
{
  "features": [
    "user_activity:events_1m",
    "user_activity:last_event_type",
    "user_activity:last_event_at",
    "orders:spend_1h",
    "orders:last_express"
  ],
  "entities": [${entities%,}]
}
EOF
)
run "GetFeatures" -d "$body" "$ADDRESS" freshet.v1.FeatureService/GetFeatures

# 5. Is it up? (the health service needs no token: probes carry no secret)
run "grpc.health.v1.Health/Check" -d '{"service": "freshet.v1.FeatureService"}' "$ADDRESS" grpc.health.v1.Health/Check
