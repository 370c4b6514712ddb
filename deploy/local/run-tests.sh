#!/usr/bin/env bash
# Build and test the workspace against real services started just for this run:
#   deploy/local/run-tests.sh [cargo test args...]
# Services live in a throwaway directory and are stopped and removed on exit,
# also on failure or Ctrl-C. Exits with cargo's status.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
SERVICES=$HERE/services.sh
export FRESHET_CACHE=${FRESHET_CACHE:-${HOME:?}/.cache/freshet}

"$SERVICES" install

DIR=$(mktemp -d "${TMPDIR:-/tmp}/freshet-test.XXXXXX")
# shellcheck disable=SC2317 # called by the EXIT trap
cleanup() {
  "$SERVICES" stop "$DIR" || true
  rm -rf "$DIR"
}
trap cleanup EXIT
# Turn signals into a normal exit so the EXIT trap runs exactly once.
trap 'exit 130' INT
trap 'exit 143' TERM

"$SERVICES" start "$DIR"
# shellcheck source=/dev/null
source "$DIR/env"
# Tests call the script to simulate outages (pg-stop/pg-start, redis-stop/...).
export FRESHET_SERVICES_SCRIPT=$SERVICES
export PATH=$FRESHET_CACHE/bin:$PATH # grpcurl

cd "$ROOT"
cargo build --workspace --bins
status=0
# pipefail: the status is cargo's, not tee's.
cargo test --workspace "$@" 2>&1 | tee "$DIR/cargo-test.log" || status=$?
# One closing line for the whole run: cargo prints a summary per test binary.
awk '/^test result:/ {p += $4; f += $6} END {printf "tests: %d passed, %d failed\n", p, f}' "$DIR/cargo-test.log"
exit "$status"
