#!/usr/bin/env bash
# Installs what the example clients need and generates their code from proto/:
#   client-examples/setup.sh
# Idempotent, and fast when nothing changed (stamps under the cache and the
# generated dirs). Needs python3 (with venv), go, and the registries (PyPI,
# the Go module proxy) on a cold cache; no system protoc: the one bundled in
# grpcio-tools generates both the Python and (with the Go plugins) Go code.
#
# Installs:
#   $FRESHET_CACHE/py             Python venv with python/requirements.txt
#   $FRESHET_CACHE/bin            protoc-gen-go, protoc-gen-go-grpc
# Generates (gitignored, never committed):
#   client-examples/python/gen    freshet/v1/feature_service_pb2{,_grpc}.py
#   client-examples/go/gen        freshet/v1/feature_service{,_grpc}.pb.go
# Builds, after `go vet ./...`:
#   client-examples/go/bin/freshet-example
# Environment: FRESHET_CACHE (default ~/.cache/freshet).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
CACHE=${FRESHET_CACHE:-${HOME:?}/.cache/freshet}
PY=$CACHE/py
BIN=$CACHE/bin
# protoc-gen-go's version is the google.golang.org/protobuf of go/go.mod (the
# generated code's runtime); protoc-gen-go-grpc v1.6 needs grpc >= 1.64.
PROTOC_GEN_GO_VERSION=v1.36.12
PROTOC_GEN_GO_GRPC_VERSION=v1.6.2
PROTO=freshet/v1/feature_service.proto

log() { echo "setup.sh: $*" >&2; }

mkdir -p "$CACHE" "$BIN"
# One setup at a time per cache (tests may call this in parallel): the others
# wait, then find everything done.
exec 9>>"$CACHE/clients-setup.lock"
flock 9

hash_of() { cat "$@" | sha256sum | cut -d' ' -f1; }

# ------------------------------------------------------------------ python
want="$(hash_of "$HERE/python/requirements.txt") $(python3 -c 'import sys; print(sys.version.split()[0])')"
if [[ ! -x $PY/bin/python || ! -f $PY/.requirements || $(<"$PY/.requirements") != "$want" ]]; then
  log "creating the Python venv $PY"
  rm -rf "$PY"
  python3 -m venv "$PY"
  "$PY/bin/pip" install -q --disable-pip-version-check -r "$HERE/python/requirements.txt"
  echo "$want" >"$PY/.requirements"
fi

# Generated code is remade when the proto or the generator changes. Into a
# temp dir first, so an interrupted run never leaves half a package.
generate() { # DIR STAMP COMMAND...
  local dir=$1 stamp=$2 tmp
  shift 2
  [[ -f $dir/.stamp && $(<"$dir/.stamp") == "$stamp" ]] && return 0
  log "generating $dir"
  tmp=$dir.tmp.$$
  rm -rf "$tmp"
  mkdir -p "$tmp"
  (cd "$ROOT/proto" && "$@" "$tmp")
  echo "$stamp" >"$tmp/.stamp"
  rm -rf "$dir"
  mv "$tmp" "$dir"
}

protoc_python() { # OUT
  "$PY/bin/python" -m grpc_tools.protoc -I. --python_out="$1" --pyi_out="$1" --grpc_python_out="$1" "$PROTO"
}
generate "$HERE/python/gen" "$(hash_of "$ROOT/proto/$PROTO" "$HERE/python/requirements.txt")" protoc_python

# ---------------------------------------------------------------------- go
go_install() { # BINARY MODULE VERSION PACKAGE
  # The module version is in the binary's build info.
  [[ -x $BIN/$1 ]] && go version -m "$BIN/$1" 2>/dev/null | grep -qE "^\s+mod\s+$2\s+$3\s" && return 0
  log "installing $1 $3"
  GOBIN=$BIN go install "$4@$3"
}
go_install protoc-gen-go google.golang.org/protobuf "$PROTOC_GEN_GO_VERSION" google.golang.org/protobuf/cmd/protoc-gen-go
go_install protoc-gen-go-grpc google.golang.org/grpc/cmd/protoc-gen-go-grpc "$PROTOC_GEN_GO_GRPC_VERSION" \
  google.golang.org/grpc/cmd/protoc-gen-go-grpc

protoc_go() { # OUT
  # The proto declares no go_package: M maps it to the package under gen/.
  local m="M$PROTO=freshetclient/gen/freshet/v1;freshetv1"
  "$PY/bin/python" -m grpc_tools.protoc -I. \
    --plugin=protoc-gen-go="$BIN/protoc-gen-go" --plugin=protoc-gen-go-grpc="$BIN/protoc-gen-go-grpc" \
    --go_out="$1" --go_opt=paths=source_relative,"$m" \
    --go-grpc_out="$1" --go-grpc_opt=paths=source_relative,"$m" \
    "$PROTO"
}
generate "$HERE/go/gen" "$(hash_of "$ROOT/proto/$PROTO" "$HERE/python/requirements.txt") $PROTOC_GEN_GO_VERSION $PROTOC_GEN_GO_GRPC_VERSION" protoc_go

(
  cd "$HERE/go"
  go vet ./...
  go build -o bin/freshet-example ./cmd/freshet-example
)

flock -u 9
cat <<EOF
python:  $PY/bin/python (PYTHONPATH=$HERE/python python -m freshet_client.example)
go:      $HERE/go/bin/freshet-example
EOF
