#!/usr/bin/env bash
# Real PostgreSQL, Redis, Kafka and Kafka Connect (with Debezium) on loopback,
# for tests and the demo.
#
#   services.sh install                    install/fetch everything (fast when done)
#   services.sh start [--only LIST] DIR    start services with data under DIR (LIST:
#                                          comma list of postgres,redis,kafka,connect;
#                                          default all; connect needs kafka)
#   services.sh stop DIR                   stop whatever runs under DIR
#   services.sh env DIR                    print DIR/env (export lines)
#   services.sh pg-stop|pg-start DIR       stop/start Postgres, same data and port
#   services.sh redis-stop|redis-start DIR stop/start Redis, same port
#   services.sh kafka-stop|kafka-start DIR stop/start Kafka, same data and ports
#   services.sh kafka-cli CLASS [ARGS...]  run a Kafka CLI class (e.g.
#                                          org.apache.kafka.tools.TopicCommand)
#   services.sh connect-stop|connect-start DIR
#                                          stop/start the Connect worker, same port;
#                                          start waits for its connectors to run
#   services.sh connector DIR              create database "app" (source-schema.sql)
#                                          and run the Debezium connector freshet-app
#                                          on it: topics app.public.<table>
#
# DIRs share only the read-only caches and a small port-claims file under
# $TMPDIR, so several instances may run at once. Environment:
#   FRESHET_CACHE          cache for Kafka/Connect jars and grpcurl (~/.cache/freshet)
#   FRESHET_KAFKA_VERSION  Kafka version to fetch from Maven Central (4.1.1)
#   FRESHET_KAFKA_TIMEOUT  seconds to wait for the broker (90)
#   FRESHET_CONNECT_VERSION   Kafka Connect worker version (= Kafka's)
#   FRESHET_DEBEZIUM_VERSION  Debezium connector version (3.6.1.Final)
#   FRESHET_CONNECT_TIMEOUT   seconds to wait for the worker / a connector (120)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE=${FRESHET_CACHE:-${HOME:?}/.cache/freshet}
# 4.1.x: current line whose jars are built for Java 17 (class major 61), the
# Java on these machines; its StorageTool still lives in kafka_2.13.
KAFKA_VERSION=${FRESHET_KAFKA_VERSION:-4.1.1}
KAFKA_HOME=$CACHE/kafka-$KAFKA_VERSION
KAFKA_TIMEOUT=${FRESHET_KAFKA_TIMEOUT:-90}
# The worker runs its own jars (same Kafka version as the broker by default);
# the Debezium connector is a plugin directory on its plugin.path.
CONNECT_VERSION=${FRESHET_CONNECT_VERSION:-$KAFKA_VERSION}
DEBEZIUM_VERSION=${FRESHET_DEBEZIUM_VERSION:-3.6.1.Final}
CONNECT_HOME=$CACHE/connect-$CONNECT_VERSION
CONNECT_TIMEOUT=${FRESHET_CONNECT_TIMEOUT:-120}
GRPCURL_VERSION=v1.9.3
PG_BIN=/usr/lib/postgresql/15/bin
PG_USER=postgres # postgres refuses to run as root; Debian's package creates this user
APT_PACKAGES=(postgresql redis-server protobuf-compiler gcc make perl pkg-config zlib1g-dev libssl-dev curl)
# -Xmx512m keeps several parallel brokers within the 24 GiB machine; SerialGC and
# C1-only JIT start faster on 2 cores and are plenty for tests.
KAFKA_JVM_OPTS=(-Xms128m -Xmx512m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 -Djava.awt.headless=true)
CONNECT_JVM_OPTS=(-Xms64m -Xmx384m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 -Djava.awt.headless=true)

log() { echo "services.sh: $*" >&2; }
die() { log "error: $*"; exit 1; }

as_root() { if [[ $EUID -eq 0 ]]; then "$@"; else sudo "$@"; fi; }

# Run a Postgres binary as the unprivileged user when we are root. cd / so
# postgres does not complain about an unreadable cwd such as /root.
as_pg() {
  if [[ $EUID -eq 0 ]]; then (cd / && runuser -u "$PG_USER" -- "$@"); else "$@"; fi
}

# Is PID alive and its command line matching PATTERN? (guards against pid reuse)
alive() {
  local pid=$1 pattern=$2
  [[ -n $pid && -r /proc/$pid/cmdline ]] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q -- "$pattern"
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Print a free port on 127.0.0.1. Ports come from below the kernel's ephemeral
# range, so client sockets and "bind to port 0" servers (e.g. in Rust tests)
# never take them; a claims file under a lock keeps parallel services.sh runs
# from handing out the same port before the service binds it.
pick_port() {
  local lock=${TMPDIR:-/tmp}/freshet-ports.lock
  (
    flock 9
    python3 - "${TMPDIR:-/tmp}/freshet-ports.claims" <<'PY'
import random, socket, sys, time
claims_path, now = sys.argv[1], time.time()
eph_low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
lo, hi = 15000, min(eph_low - 1, 32767)
if hi - lo < 1000:
    lo, hi = 1024, 65535
claims = {}
try:
    for line in open(claims_path):
        port, ts = line.split()
        if now - float(ts) < 600:  # a service binds well within 10 minutes
            claims[int(port)] = float(ts)
except (OSError, ValueError):
    pass
for _ in range(500):
    port = random.randint(lo, hi)
    if port in claims:
        continue
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            continue
    claims[port] = now
    with open(claims_path, "w") as f:
        f.writelines(f"{p} {t}\n" for p, t in claims.items())
    print(port)
    sys.exit(0)
sys.exit("no free port found")
PY
  ) 9>>"$lock"
}

# ---------------------------------------------------------------- install ---

install_apt() {
  local missing=() p
  for p in "${APT_PACKAGES[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  command -v mvn >/dev/null || missing+=(maven)
  command -v java >/dev/null || missing+=(openjdk-17-jre-headless)
  command -v python3 >/dev/null || missing+=(python3)
  [[ ${#missing[@]} -eq 0 ]] && return 0
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # Wait for another apt (e.g. a parallel install) instead of failing on its lock.
  local apt=(apt-get -y -q -o DPkg::Lock::Timeout=600)
  # A fresh machine has no (or stale) package lists: update first then; else
  # try without and update only when the install fails.
  if ! compgen -G '/var/lib/apt/lists/*_Packages' >/dev/null; then
    as_root "${apt[@]}" update
  fi
  as_root "${apt[@]}" install --no-install-recommends "${missing[@]}" \
    || { as_root "${apt[@]}" update && as_root "${apt[@]}" install --no-install-recommends "${missing[@]}"; }
}

# Kafka jars come from Maven Central (the only place reachable for them); the
# marker records version and pom hash, so a changed pom re-resolves.
install_kafka() {
  local libs=$KAFKA_HOME/libs marker want
  marker=$libs/.complete
  want="kafka=$KAFKA_VERSION pom=$(sha256sum "$HERE/kafka/pom.xml" | cut -d' ' -f1)"
  [[ -f $marker && $(<"$marker") == "$want" ]] && return 0
  log "fetching Kafka $KAFKA_VERSION jars with Maven"
  local tmp=$KAFKA_HOME/libs.tmp.$$
  rm -rf "$tmp"
  mkdir -p "$KAFKA_HOME"
  mvn -B -f "$HERE/kafka/pom.xml" -Dkafka.version="$KAFKA_VERSION" \
    dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory="$tmp" \
    >"$KAFKA_HOME/mvn.log" 2>&1 || { tail -n 40 "$KAFKA_HOME/mvn.log" >&2; die "maven failed"; }
  echo "$want" >"$tmp/.complete"
  rm -rf "$libs"
  mv "$tmp" "$libs"
}

# Kafka Connect: CONNECT_HOME/libs is the worker class path, and
# CONNECT_HOME/plugins the plugin.path, with one directory per plugin (each
# gets its own class loader), here just debezium-connector-postgres. Both are
# resolved with Maven into a temp dir and swapped in whole; the marker records
# the versions and pom hashes, so a change re-resolves.
install_connect() {
  local marker=$CONNECT_HOME/.complete want tmp log
  want="connect=$CONNECT_VERSION debezium=$DEBEZIUM_VERSION"
  want+=" pom=$(cat "$HERE/connect/pom.xml" "$HERE/connect/plugin-pom.xml" | sha256sum | cut -d' ' -f1)"
  [[ -f $marker && $(<"$marker") == "$want" ]] && return 0
  log "fetching Kafka Connect $CONNECT_VERSION and Debezium $DEBEZIUM_VERSION jars with Maven"
  tmp=$CONNECT_HOME.tmp.$$
  log=$CACHE/connect-mvn.log
  rm -rf "$tmp"
  mkdir -p "$tmp"
  {
    mvn -B -f "$HERE/connect/pom.xml" -Dconnect.version="$CONNECT_VERSION" \
      dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory="$tmp/libs" \
      && mvn -B -f "$HERE/connect/plugin-pom.xml" -Ddebezium.version="$DEBEZIUM_VERSION" \
        dependency:copy-dependencies -DincludeScope=runtime \
        -DoutputDirectory="$tmp/plugins/debezium-connector-postgres"
  } >"$log" 2>&1 || { tail -n 40 "$log" >&2; rm -rf "$tmp"; die "maven failed (log: $log)"; }
  echo "$want" >"$tmp/.complete"
  rm -rf "$CONNECT_HOME"
  mv "$tmp" "$CONNECT_HOME"
}

install_grpcurl() {
  local bin=$CACHE/bin/grpcurl
  # The module version is embedded in the binary's build info.
  [[ -x $bin ]] && go version -m "$bin" 2>/dev/null \
    | grep -qE "^\s+mod\s+github.com/fullstorydev/grpcurl\s+$GRPCURL_VERSION\s" && return 0
  log "building grpcurl $GRPCURL_VERSION with go install"
  # -X main.version: what release builds set, so `grpcurl -version` is right.
  GOBIN=$CACHE/bin go install -ldflags "-X main.version=$GRPCURL_VERSION" \
    "github.com/fullstorydev/grpcurl/cmd/grpcurl@$GRPCURL_VERSION"
}

cmd_install() {
  mkdir -p "$CACHE/bin"
  # One installer at a time per cache; parallel callers just wait, then skip.
  exec 8>>"$CACHE/install.lock"
  flock 8
  install_apt
  install_kafka
  install_connect
  install_grpcurl
  flock -u 8
  cat <<EOF
postgres:  $PG_BIN
redis:     $(command -v redis-server)
protoc:    $(command -v protoc)
kafka:     $KAFKA_HOME/libs ($KAFKA_VERSION)
connect:   $CONNECT_HOME/libs ($CONNECT_VERSION)
debezium:  $CONNECT_HOME/plugins/debezium-connector-postgres ($DEBEZIUM_VERSION)
grpcurl:   $CACHE/bin/grpcurl
EOF
}

# Only run the installer when something is missing, so `start` stays fast.
ensure_installed() {
  if [[ ! -x $PG_BIN/postgres ]] || ! command -v redis-server >/dev/null \
    || [[ ! -f $KAFKA_HOME/libs/.complete ]] || [[ ! -f $CONNECT_HOME/.complete ]]; then
    cmd_install >&2
  fi
}

# --------------------------------------------------------------- postgres ---

pg_pid() { head -n 1 "$DIR/postgres/data/postmaster.pid" 2>/dev/null || true; }
# Not `pg_ctl status`: it takes an unreaped (zombie) postmaster for a live one.
pg_running() { alive "$(pg_pid)" postgres; }

pg_write_conf() {
  local d=$DIR/postgres
  # Durability stays on (no fsync=off): tests kill processes and expect data.
  cat >"$d/data/freshet.conf" <<EOF
listen_addresses = '127.0.0.1'
port = $1
unix_socket_directories = '$d/sock'
max_connections = 200
shared_buffers = 32MB
wal_level = logical
max_replication_slots = 10
max_wal_senders = 10
EOF
  chown "$(stat -c %U "$d")" "$d/data/freshet.conf"
}

pg_launch() {
  local pid i
  # After a kill -9 the old postmaster may linger as a zombie until init reaps
  # it; postgres would see its pid in postmaster.pid and refuse to start.
  pid=$(pg_pid)
  for ((i = 0; i < 100; i++)); do
    [[ -n $pid && $(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) == Z ]] || break
    sleep 0.1
  done
  as_pg "$PG_BIN/pg_ctl" -D "$DIR/postgres/data" -l "$DIR/postgres/postgres.log" -w -t 60 start \
    >"$DIR/postgres/pg_ctl.out" 2>&1
}

pg_fail() {
  cat "$DIR/postgres/pg_ctl.out" >&2
  tail -n 30 "$DIR/postgres/postgres.log" >&2
  die "postgres failed to start (log: $DIR/postgres/postgres.log)"
}

pg_init() {
  local d=$DIR/postgres
  stop_postgres # leftovers of an earlier, failed first start
  rm -rf "$d"
  mkdir -p "$d/sock"
  if [[ $EUID -eq 0 ]]; then
    id "$PG_USER" >/dev/null 2>&1 || useradd --system --home-dir /var/lib/postgresql "$PG_USER"
    chmod a+x "$DIR" # mktemp -d makes 0700 dirs the postgres user can't enter
    chown -R "$PG_USER:" "$d"
    as_pg test -w "$d" || die "user $PG_USER cannot write $d: make its parent dirs traversable (e.g. use a dir under /tmp)"
  fi
  as_pg "$PG_BIN/initdb" -D "$d/data" -U freshet --auth=trust -E UTF8 --no-locale >"$d/initdb.log" 2>&1 \
    || { cat "$d/initdb.log" >&2; die "initdb failed"; }
  echo "include = 'freshet.conf'" >>"$d/data/postgresql.conf"
}

# DIR/<service>/port is written last, once the service is fully set up; its
# absence means "set up from scratch" (also after a half-done first start).
start_postgres() {
  local d=$DIR/postgres port try
  if [[ ! -f $d/port ]]; then
    pg_init
    # A port can still be taken by a foreign process between pick and bind: retry.
    for try in 1 2 3; do
      port=$(pick_port)
      pg_write_conf "$port"
      rm -f "$d/postgres.log"
      pg_launch && break
      if ((try == 3)) || ! grep -q 'could not bind\|Address already in use' "$d/postgres.log"; then pg_fail; fi
      log "postgres port $port taken, retrying"
    done
    "$PG_BIN/createdb" -h 127.0.0.1 -p "$port" -U freshet -O freshet freshet
    echo "$port" >"$d/port"
  elif ! pg_running; then
    pg_launch || pg_fail
  fi
}

stop_postgres() {
  pg_running || return 0
  as_pg "$PG_BIN/pg_ctl" -D "$DIR/postgres/data" -m fast -w -t 60 stop >/dev/null \
    || as_pg "$PG_BIN/pg_ctl" -D "$DIR/postgres/data" -m immediate -w stop >/dev/null
}

# ------------------------------------------------------------------ redis ---

redis_pid() { cat "$DIR/redis/redis.pid" 2>/dev/null || true; }
redis_running() { alive "$(redis_pid)" redis-server; }

redis_write_conf() {
  local d=$DIR/redis
  # No persistence: tests only want a cache that comes back empty.
  cat >"$d/redis.conf" <<EOF
port $1
bind 127.0.0.1
save ""
appendonly no
daemonize yes
pidfile $d/redis.pid
dir $d
logfile $d/redis.log
EOF
}

# redis-server forks before binding, so success is only visible later: Redis
# writes its pid file after it has bound the port (or exits on failure).
redis_launch() { # PORT
  local d=$DIR/redis i
  rm -f "$d/redis.pid"
  : >"$d/redis.log"
  redis-server "$d/redis.conf"
  for ((i = 0; i < 100; i++)); do
    redis_running && redis-cli -p "$1" ping 2>/dev/null | grep -q PONG && return 0
    grep -q 'Could not create server TCP\|Address already in use' "$d/redis.log" && return 1
    sleep 0.1
  done
  return 1
}

start_redis() {
  local d=$DIR/redis port try
  redis_running && return 0
  if [[ ! -f $d/port ]]; then
    stop_redis
    rm -rf "$d"
    mkdir -p "$d"
    for try in 1 2 3; do
      port=$(pick_port)
      redis_write_conf "$port"
      redis_launch "$port" && echo "$port" >"$d/port" && return 0
      if ((try == 3)) || ! grep -q 'Address already in use' "$d/redis.log"; then break; fi
      log "redis port $port taken, retrying"
    done
  else
    redis_launch "$(<"$d/port")" && return 0
  fi
  tail -n 30 "$d/redis.log" >&2
  die "redis failed to start (log: $d/redis.log)"
}

stop_redis() {
  local pid i
  pid=$(redis_pid)
  redis_running || return 0
  redis-cli -p "$(sed -n 's/^port //p' "$DIR/redis/redis.conf")" shutdown nosave >/dev/null 2>&1 \
    || kill "$pid" 2>/dev/null || true
  for ((i = 0; i < 100; i++)); do alive "$pid" redis-server || return 0; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
}

# ------------------------------------------------------------------ kafka ---

kafka_java() { # CLASS [ARGS...] with the quiet tools logging
  java -Xmx256m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 \
    -Dlog4j2.configurationFile="$HERE/kafka/log4j2-tools.properties" \
    -cp "$KAFKA_HOME/libs/*" "$@"
}

kafka_pid() { cat "$DIR/kafka/kafka.pid" 2>/dev/null || true; }
kafka_running() { alive "$(kafka_pid)" kafka.Kafka; }

kafka_write_conf() { # BROKER_PORT CONTROLLER_PORT
  local d=$DIR/kafka
  # Single combined KRaft node with a static quorum (controller.quorum.voters),
  # so storage is formatted without --standalone. Internal topics get one
  # replica and one partition: one broker, and fewer partitions start faster.
  cat >"$d/server.properties" <<EOF
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$2
listeners=PLAINTEXT://127.0.0.1:$1,CONTROLLER://127.0.0.1:$2
advertised.listeners=PLAINTEXT://127.0.0.1:$1
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
controller.listener.names=CONTROLLER
log.dirs=$d/data
num.partitions=1
auto.create.topics.enable=true
group.initial.rebalance.delay.ms=0
offsets.topic.replication.factor=1
offsets.topic.num.partitions=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
share.coordinator.state.topic.num.partitions=1
num.network.threads=2
num.io.threads=2
EOF
}

kafka_format() {
  local d=$DIR/kafka id
  # Cluster ids are base64url UUIDs; Kafka rejects ones starting with '-'.
  id=$(python3 -c 'import base64,uuid
while True:
    s = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
    if not s.startswith("-"): print(s); break')
  kafka_java kafka.tools.StorageTool format -t "$id" -c "$d/server.properties" >"$d/format.log" 2>&1 \
    || { cat "$d/format.log" >&2; die "kafka storage format failed"; }
}

# Start the broker detached (own session, no inherited stdio, so CI pipes and
# Ctrl-C of a caller don't reach it) and wait until it reports itself started.
kafka_launch() { # BROKER_PORT
  local d=$DIR/kafka pid i
  : >"$d/kafka.log"
  rm -f "$d/kafka.pid"
  # The wrapper records its own pid and execs java, so the pid file is right
  # even if setsid has to fork.
  # shellcheck disable=SC2016 # $$ and $0 belong to the inner bash
  setsid nohup bash -c 'echo $$ >"$0"; exec "$@"' "$d/kafka.pid" \
    java "${KAFKA_JVM_OPTS[@]}" \
    -Dlog4j2.configurationFile="$HERE/kafka/log4j2-broker.properties" \
    -cp "$KAFKA_HOME/libs/*" kafka.Kafka "$d/server.properties" \
    </dev/null >>"$d/kafka.log" 2>&1 &
  for ((i = 0; i < 50; i++)); do [[ -s $d/kafka.pid ]] && break; sleep 0.1; done
  pid=$(kafka_pid)
  for ((i = 0; i < KAFKA_TIMEOUT * 5; i++)); do
    alive "$pid" kafka.Kafka || return 1
    grep -q 'Kafka Server started' "$d/kafka.log" && port_open "$1" && return 0
    sleep 0.2
  done
  log "kafka not ready after ${KAFKA_TIMEOUT}s"
  kill -KILL "$pid" 2>/dev/null || true
  return 1
}

start_kafka() {
  local d=$DIR/kafka try port cport
  kafka_running && return 0
  if [[ ! -f $d/port ]]; then
    stop_kafka
    for try in 1 2 3; do
      rm -rf "$d"
      mkdir -p "$d"
      port=$(pick_port)
      cport=$(pick_port)
      kafka_write_conf "$port" "$cport"
      kafka_format
      kafka_launch "$port" && echo "$port" >"$d/port" && return 0
      if ((try == 3)) || ! grep -q 'Address already in use' "$d/kafka.log"; then break; fi
      log "kafka port taken, retrying with new ports"
    done
  else
    kafka_launch "$(<"$d/port")" && return 0
  fi
  tail -n 40 "$d/kafka.log" >&2
  die "kafka failed to start (log: $d/kafka.log)"
}

stop_kafka() {
  local pid i
  pid=$(kafka_pid)
  kafka_running || return 0
  kill -TERM "$pid" 2>/dev/null || true # triggers Kafka's clean shutdown hook
  for ((i = 0; i < 100; i++)); do alive "$pid" kafka.Kafka || return 0; sleep 0.2; done
  log "kafka did not stop within 20s, killing"
  kill -KILL "$pid" 2>/dev/null || true
}

# ---------------------------------------------------------------- connect ---

connect_pid() { cat "$DIR/connect/connect.pid" 2>/dev/null || true; }
connect_running() { alive "$(connect_pid)" ConnectDistributed; }

# Call the worker's REST API on port $CONNECT_PORT: sets HTTP_CODE (000 when
# nothing answers) and HTTP_BODY.
connect_http() { # METHOD PATH [JSON]
  local out args=(-sS -m 10 -X "$1" -w '\n%{http_code}' -H 'Accept: application/json')
  [[ -n ${3:-} ]] && args+=(-H 'Content-Type: application/json' --data-binary "$3")
  out=$(curl "${args[@]}" "http://127.0.0.1:$CONNECT_PORT$2" 2>/dev/null) || true
  HTTP_CODE=${out##*$'\n'}
  HTTP_BODY=${out%"$HTTP_CODE"}
}

connect_write_conf() { # REST_PORT
  local d=$DIR/connect id
  # The group and its internal topics are named after DIR, so workers of
  # different DIRs never join each other even on one broker.
  id=freshet-connect-$(printf %s "$DIR" | sha256sum | cut -c1-12)
  # Distributed mode (connector configs, offsets and statuses in Kafka topics)
  # with one worker. exactly.once.source.support=enabled (KIP-618): source
  # tasks write records and their offsets in one Kafka transaction, and the
  # worker fences zombie tasks. Internal topics: one replica (one broker), one
  # partition (faster to create). JSON without the schema envelope: values
  # are the bare Debezium envelope {"before","after","source","op",...}.
  # plugin.discovery=service_load: plugins are found through their
  # META-INF/services manifests (Debezium and Kafka ship them) instead of a
  # reflective scan of every jar, which makes startup faster.
  # scheduled.rebalance.max.delay.ms=0: a restarted worker gets its tasks back
  # at once instead of after the default 5 minutes' grace for a lost member.
  cat >"$d/worker.properties" <<EOF
bootstrap.servers=127.0.0.1:$(<"$DIR/kafka/port")
group.id=$id
config.storage.topic=$id-configs
offset.storage.topic=$id-offsets
status.storage.topic=$id-status
config.storage.replication.factor=1
offset.storage.replication.factor=1
offset.storage.partitions=1
status.storage.replication.factor=1
status.storage.partitions=1
exactly.once.source.support=enabled
key.converter=org.apache.kafka.connect.json.JsonConverter
key.converter.schemas.enable=false
value.converter=org.apache.kafka.connect.json.JsonConverter
value.converter.schemas.enable=false
offset.flush.interval.ms=1000
listeners=http://127.0.0.1:$1
rest.advertised.host.name=127.0.0.1
rest.advertised.port=$1
plugin.path=$CONNECT_HOME/plugins
plugin.discovery=service_load
scheduled.rebalance.max.delay.ms=0
EOF
}

# Start the worker detached (as kafka_launch) and wait until its REST API
# answers GET /connectors, which the herder serves once it has joined the
# group and read the config topic.
connect_launch() { # REST_PORT
  local d=$DIR/connect pid i
  CONNECT_PORT=$1
  connect_write_conf "$1" # again on restarts: Kafka's port may have changed
  : >"$d/connect.log"
  rm -f "$d/connect.pid"
  # shellcheck disable=SC2016 # $$ and $0 belong to the inner bash
  setsid nohup bash -c 'echo $$ >"$0"; exec "$@"' "$d/connect.pid" \
    java "${CONNECT_JVM_OPTS[@]}" \
    -Dlog4j2.configurationFile="$HERE/connect/log4j2-connect.properties" \
    -cp "$CONNECT_HOME/libs/*" org.apache.kafka.connect.cli.ConnectDistributed "$d/worker.properties" \
    </dev/null >>"$d/connect.log" 2>&1 &
  for ((i = 0; i < 50; i++)); do [[ -s $d/connect.pid ]] && break; sleep 0.1; done
  pid=$(connect_pid)
  for ((i = 0; i < CONNECT_TIMEOUT * 5; i++)); do
    alive "$pid" ConnectDistributed || return 1
    connect_http GET /connectors
    [[ $HTTP_CODE == 200 ]] && return 0
    sleep 0.2
  done
  log "connect not ready after ${CONNECT_TIMEOUT}s"
  kill -KILL "$pid" 2>/dev/null || true
  return 1
}

start_connect() {
  local d=$DIR/connect try port
  [[ -f $d/port ]] && CONNECT_PORT=$(<"$d/port")
  connect_running && return 0
  if [[ ! -f $DIR/kafka/port ]] || ! kafka_running; then
    die "connect needs the Kafka of $DIR running: start kafka first"
  fi
  if [[ ! -f $d/port ]]; then
    stop_connect
    for try in 1 2 3; do
      rm -rf "$d"
      mkdir -p "$d"
      port=$(pick_port)
      connect_launch "$port" && echo "$port" >"$d/port" && return 0
      if ((try == 3)) || ! grep -q 'Address already in use' "$d/connect.log"; then break; fi
      log "connect port $port taken, retrying"
    done
  else
    connect_launch "$(<"$d/port")" && return 0
  fi
  tail -n 40 "$d/connect.log" >&2
  die "kafka connect failed to start (log: $d/connect.log)"
}

# SIGTERM runs the worker's shutdown hook: tasks stop (committing what they
# have), the worker leaves the group. Stop it before Kafka and Postgres.
stop_connect() {
  local pid i
  pid=$(connect_pid)
  connect_running || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 150; i++)); do alive "$pid" ConnectDistributed || return 0; sleep 0.2; done
  log "connect did not stop within 30s, killing"
  kill -KILL "$pid" 2>/dev/null || true
}

# Wait until connector NAME and all its tasks are RUNNING; fail with the
# status JSON (incl. the stack trace) as soon as one is FAILED.
connect_wait_running() { # NAME
  local i state=
  for ((i = 0; i < CONNECT_TIMEOUT * 5; i++)); do
    connect_http GET "/connectors/$1/status"
    if [[ $HTTP_CODE == 200 ]]; then
      state=$(python3 -c 'import json, sys
s = json.load(sys.stdin)
states = [s["connector"]["state"]] + [t["state"] for t in s.get("tasks", [])]
print("FAILED" if "FAILED" in states else
      "RUNNING" if s.get("tasks") and set(states) == {"RUNNING"} else "WAIT")' <<<"$HTTP_BODY")
      [[ $state == RUNNING ]] && return 0
      if [[ $state == FAILED ]]; then
        python3 -m json.tool <<<"$HTTP_BODY" >&2 || echo "$HTTP_BODY" >&2
        die "connector $1 FAILED (log: $DIR/connect/connect.log)"
      fi
    fi
    sleep 0.2
  done
  echo "$HTTP_CODE $HTTP_BODY" >&2
  die "connector $1 not RUNNING after ${CONNECT_TIMEOUT}s (log: $DIR/connect/connect.log)"
}

# After a (re)start: wait until every connector the worker has is RUNNING
# again (and the app connector streaming), so a restart test can go on at
# once. Prints their names.
connect_wait_connectors() {
  local names name
  connect_http GET /connectors
  [[ $HTTP_CODE == 200 ]] || die "GET /connectors: HTTP $HTTP_CODE $HTTP_BODY"
  names=$(python3 -c 'import json, sys; print(" ".join(json.load(sys.stdin)))' <<<"$HTTP_BODY")
  for name in $names; do
    connect_wait_running "$name"
    [[ $name == "$APP_CONNECTOR" ]] || continue
    if pg_running; then
      app_wait_streaming
    else
      log "postgres of $DIR is down: $APP_CONNECTOR will stream once it is back"
    fi
  done
  echo "$names"
}

# ------------------------------------------------------ debezium source ---

# The reference application's database: source-schema.sql in database
# "app" of the same Postgres, captured by one Debezium connector into the
# topics app.public.<table>.
APP_DB=app
APP_CONNECTOR=freshet-app
APP_TOPIC_PREFIX=app
APP_TABLES=(public.user_events public.orders)
APP_SLOT=freshet_slot
APP_PUBLICATION=freshet_pub

app_psql() { # DB [PSQL ARGS...]
  local db=$1
  shift
  # client_min_messages: no "already exists, skipping" notices on re-runs.
  PGOPTIONS='-c client_min_messages=warning' "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 \
    -h 127.0.0.1 -p "$(<"$DIR/postgres/port")" -U freshet -d "$db" "$@"
}

# The connector's configuration (PUT /connectors/freshet-app/config).
# - pgoutput: the logical decoding plugin built into Postgres 10+; the
#   connector creates publication freshet_pub for just the included tables
#   (filtered) and the replication slot freshet_slot.
# - snapshot.mode=initial: on the very first start (no offsets yet) the
#   connector reads the rows that already exist (op "r"), then streams
#   changes from the slot; later starts find their offsets and only stream.
#   slot.drop.on.stop=false keeps the slot, so Postgres retains the WAL
#   while the worker is down and a restart resumes where it stopped.
# - heartbeat.interval.ms: a record on __debezium-heartbeat.app every second
#   lets offsets (and the slot's confirmed LSN) advance while the captured
#   tables are idle, so WAL from other databases' traffic is not retained.
# - decimal.handling.mode=string: numeric(12,2) comes out as "12.50" instead
#   of base64 bytes. timestamptz is always an ISO-8601 UTC string
#   ("2025-01-01T12:00:00.123456Z", io.debezium.time.ZonedTimestamp);
#   time.precision.mode only concerns timestamp/time/date columns.
# - exactly.once.support=required: registration fails unless the worker runs
#   exactly-once source support; transaction.boundary=poll: one Kafka
#   transaction per batch the task returns from poll(), offsets included, so
#   read_committed consumers never see a record twice or a half batch.
# - tombstones.on.delete: a delete is an op "d" envelope followed by a
#   record with the same key and a null value (for compacted topics).
# - poll.interval.ms=100 (default 500): how long Debezium sleeps when it
#   finds nothing to do, both reading the replication stream and handing
#   batches to Connect. Measured here: commit -> visible to a read_committed
#   consumer was median ~440 ms (max ~800) at 500 and ~120 ms (max ~200) at
#   100, for a few idle wake-ups a second.
# - retriable.restart.connector.wait.ms=1000 (default 10000): after losing
#   Postgres (e.g. a pg-stop/pg-start outage test) the task reconnects within
#   a second of Postgres being back instead of up to 10 s. Meanwhile the
#   connector and task still report RUNNING: only the slot's active flag
#   tells whether it streams.
# - topic.creation.*: Connect creates the topics (1 partition, so changes of
#   one table keep their order; one replica) instead of relying on the
#   broker's auto-creation.
app_connector_config() { # PG_PORT
  local tables
  tables=$(IFS=,; echo "${APP_TABLES[*]}")
  cat <<EOF
{
  "connector.class": "io.debezium.connector.postgresql.PostgresConnector",
  "tasks.max": "1",
  "plugin.name": "pgoutput",
  "database.hostname": "127.0.0.1",
  "database.port": "$1",
  "database.user": "freshet",
  "database.dbname": "$APP_DB",
  "topic.prefix": "$APP_TOPIC_PREFIX",
  "table.include.list": "$tables",
  "publication.name": "$APP_PUBLICATION",
  "publication.autocreate.mode": "filtered",
  "slot.name": "$APP_SLOT",
  "slot.drop.on.stop": "false",
  "heartbeat.interval.ms": "1000",
  "snapshot.mode": "initial",
  "decimal.handling.mode": "string",
  "time.precision.mode": "adaptive_time_microseconds",
  "tombstones.on.delete": "true",
  "exactly.once.support": "required",
  "transaction.boundary": "poll",
  "poll.interval.ms": "100",
  "retriable.restart.connector.wait.ms": "1000",
  "topic.creation.default.replication.factor": "1",
  "topic.creation.default.partitions": "1"
}
EOF
}

# Streaming has begun once a walsender holds the slot (after the snapshot).
# RUNNING alone does not say that: Debezium keeps its task RUNNING while it
# retries a lost database connection.
app_wait_streaming() {
  local i
  for ((i = 0; i < CONNECT_TIMEOUT * 5; i++)); do
    [[ $(app_psql "$APP_DB" -tAc "SELECT active FROM pg_replication_slots WHERE slot_name = '$APP_SLOT'" 2>/dev/null) == t ]] \
      && return 0
    sleep 0.2
  done
  connect_http GET "/connectors/$APP_CONNECTOR/status"
  echo "$HTTP_BODY" >&2
  tail -n 20 "$DIR/connect/connect.log" >&2
  die "slot $APP_SLOT not streaming after ${CONNECT_TIMEOUT}s (log: $DIR/connect/connect.log)"
}

cmd_connector() {
  local pg_port config i t0 ms table
  set_dir "${1:-}"
  if [[ ! -f $DIR/postgres/port ]] || ! pg_running; then die "postgres of $DIR is not running"; fi
  if [[ ! -f $DIR/connect/port ]] || ! connect_running; then die "connect of $DIR is not running"; fi
  pg_port=$(<"$DIR/postgres/port")
  CONNECT_PORT=$(<"$DIR/connect/port")
  t0=${EPOCHREALTIME/./}
  if [[ -z $(app_psql freshet -tAc "SELECT 1 FROM pg_database WHERE datname = '$APP_DB'") ]]; then
    "$PG_BIN/createdb" -h 127.0.0.1 -p "$pg_port" -U freshet -O freshet "$APP_DB"
  fi
  app_psql "$APP_DB" -f "$HERE/source-schema.sql"
  config=$(app_connector_config "$pg_port")
  # PUT creates or updates. 409: the group is rebalancing, try again.
  for ((i = 0; i < CONNECT_TIMEOUT * 2; i++)); do
    connect_http PUT "/connectors/$APP_CONNECTOR/config" "$config"
    [[ $HTTP_CODE == 409 || $HTTP_CODE == 000 ]] || break
    sleep 0.5
  done
  [[ $HTTP_CODE == 20[01] ]] || { echo "$HTTP_BODY" >&2; die "registering $APP_CONNECTOR: HTTP $HTTP_CODE"; }
  connect_wait_running "$APP_CONNECTOR"
  app_wait_streaming
  ms=$(((${EPOCHREALTIME/./} - t0) / 1000))
  log "connector $APP_CONNECTOR streaming database $APP_DB in $((ms / 1000)).$((ms % 1000 / 100))s; topics:"
  for table in "${APP_TABLES[@]}"; do echo "$APP_TOPIC_PREFIX.$table"; done
}

# ---------------------------------------------------------------- env/cli ---

# The env file lists every service configured under DIR.
write_env() {
  local f=$DIR/env p
  kv() { printf 'export %s=%q\n' "$1" "$2"; }
  {
    kv FRESHET_SERVICES_DIR "$DIR"
    if [[ -f $DIR/postgres/port ]]; then
      p=$(<"$DIR/postgres/port")
      kv FRESHET_DATABASE_URL "postgres://freshet@127.0.0.1:$p/freshet"
      kv FRESHET_PG_PORT "$p"
      kv FRESHET_PG_BIN "$PG_BIN"
      kv FRESHET_PG_DATA "$DIR/postgres/data"
    fi
    if [[ -f $DIR/redis/port ]]; then
      p=$(<"$DIR/redis/port")
      kv FRESHET_REDIS_URL "redis://127.0.0.1:$p/"
      kv FRESHET_REDIS_PORT "$p"
    fi
    if [[ -f $DIR/kafka/port ]]; then
      kv FRESHET_KAFKA_BROKERS "127.0.0.1:$(<"$DIR/kafka/port")"
    fi
    if [[ -f $DIR/connect/port ]]; then
      kv FRESHET_CONNECT_URL "http://127.0.0.1:$(<"$DIR/connect/port")"
    fi
  } >"$f.tmp"
  mv "$f.tmp" "$f"
}

set_dir() { # DIR [create] -> absolute $DIR
  [[ -n ${1:-} ]] || die "missing DIR (see the header of $0)"
  [[ ${2:-} == create ]] && mkdir -p "$1"
  [[ -d $1 ]] || die "no such directory: $1"
  DIR=$(cd "$1" && pwd)
}

SERVICES=(postgres redis kafka connect) # in start order

cmd_start() {
  local only all svc t0 ms names
  all=$(IFS=,; echo "${SERVICES[*]}")
  only=$all
  if [[ ${1:-} == --only ]]; then only=${2:?--only needs a list}; shift 2; fi
  if [[ ${1:-} == --only=* ]]; then only=${1#--only=}; shift; fi
  for svc in ${only//,/ }; do
    [[ ,$all, == *,$svc,* ]] || die "unknown service '$svc' ($all)"
  done
  set_dir "${1:-}" create
  ensure_installed
  for svc in "${SERVICES[@]}"; do
    [[ ,$only, == *,$svc,* ]] || continue
    t0=${EPOCHREALTIME/./}
    "start_$svc"
    names=
    [[ $svc == connect ]] && names=$(connect_wait_connectors)
    ms=$(((${EPOCHREALTIME/./} - t0) / 1000))
    log "$svc ready on 127.0.0.1:$(<"$DIR/$svc/port")${names:+ (connectors running: $names)} in $((ms / 1000)).$((ms % 1000 / 100))s"
  done
  write_env
  cat "$DIR/env"
}

cmd_stop() {
  [[ -d ${1:-} ]] || return 0 # nothing was ever started there
  set_dir "$1"
  # Connect first: it is a client of Kafka and Postgres. Then Kafka: it is the
  # slowest, and nothing else depends on it.
  stop_connect
  stop_kafka
  stop_redis
  stop_postgres
}

main() {
  local cmd=${1:-}
  shift || true
  case $cmd in
    install) cmd_install ;;
    start) cmd_start "$@" ;;
    stop) cmd_stop "$@" ;;
    env) set_dir "${1:-}"; cat "$DIR/env" ;;
    pg-stop) set_dir "${1:-}"; stop_postgres ;;
    pg-start) set_dir "${1:-}"; [[ -f $DIR/postgres/port ]] || die "no postgres under $DIR"; start_postgres ;;
    redis-stop) set_dir "${1:-}"; stop_redis ;;
    redis-start) set_dir "${1:-}"; [[ -f $DIR/redis/port ]] || die "no redis under $DIR"; start_redis ;;
    kafka-stop) set_dir "${1:-}"; stop_kafka ;;
    kafka-start) set_dir "${1:-}"; [[ -f $DIR/kafka/port ]] || die "no kafka under $DIR"; start_kafka ;;
    kafka-cli) [[ -f $KAFKA_HOME/libs/.complete ]] || die "run '$0 install' first"; kafka_java "$@" ;;
    connect-stop) set_dir "${1:-}"; stop_connect ;;
    connect-start)
      set_dir "${1:-}"
      [[ -f $DIR/connect/port ]] || die "no connect under $DIR"
      local t0 ms names
      t0=${EPOCHREALTIME/./}
      start_connect
      names=$(connect_wait_connectors)
      ms=$(((${EPOCHREALTIME/./} - t0) / 1000))
      log "connect ready${names:+ (connectors running: $names)} in $((ms / 1000)).$((ms % 1000 / 100))s"
      ;;
    connector) cmd_connector "$@" ;;
    *) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2 ;;
  esac
}

main "$@"
