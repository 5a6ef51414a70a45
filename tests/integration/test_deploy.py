"""The deploy artefacts (deploy/), checked with the tools this machine has offline: the
Kubernetes base renders with `kubectl kustomize` and every object passes a structural
schema check; the compose file and the container image's Dockerfile have the shape
docs/operations.md describes, and the image's build stage, run here on a copy of its
context, builds a wheel carrying the health check; the health check answers for a real
server, plaintext and under mutual TLS; `systemd-analyze` accepts the daemon's unit; and
the Grafana dashboard provisions from files (a datasource variable, job/instance/
chatroom filters) and, like the alert rules, names only metrics the code exports.

The wheel path itself (deploy/wheel.sh build from `git archive HEAD`, install into a
fresh virtualenv, run) is tests/integration/test_readme.py's."""

from __future__ import annotations

import ast
import asyncio
import base64
import fnmatch
import json
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from vigil import testing as harness
from vigil.core.auth.tls import dev_ca

ROOT = harness.ROOT
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE = DEPLOY / "compose.yaml"
DOCKERFILE = DEPLOY / "Dockerfile"
DOCKERIGNORE = DEPLOY / "Dockerfile.dockerignore"
WHEEL_SH = DEPLOY / "wheel.sh"
UNIT = DEPLOY / "systemd" / "vigil-daemon.service"
DASHBOARD = DEPLOY / "grafana" / "vigil.json"
PROVISIONING = DEPLOY / "grafana" / "provisioning"
RULES = DEPLOY / "prometheus" / "rules" / "vigil.rules.yml"
PROM_CONFIGS = [DEPLOY / "prometheus" / "prometheus.yml", DEPLOY / "compose" / "prometheus.yml"]

# What the shipped code is made of (vigil/ links these folders in).
SOURCES = ["vigil", "cli", "daemon", "liveness_service", "task_service"]
# libpq-style variables asyncpg reads (passwords never go in a URL).
PG_VARS = {"PGPASSFILE", "PGPASSWORD"}


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"`{name}` is not on PATH: the deploy checks need it (see docs/operations.md)")
    return path


def python_sources() -> Iterator[Path]:
    seen: set[Path] = set()
    for top in SOURCES:
        for path in sorted((ROOT / top).rglob("*.py")):
            real = path.resolve()
            if real not in seen and "/v1/" not in str(real):
                seen.add(real)
                yield real


def env_vars_the_code_reads() -> set[str]:
    names: set[str] = set()
    for path in python_sources():
        names.update(re.findall(r"\b(VIGIL_[A-Z0-9_]+|DATABASE_URL)\b", path.read_text()))
    return names


# -- metrics the code exports ---------------------------------------------------------

METRIC_TYPES = {"Counter", "Gauge", "Histogram", "Summary", "Info"}


def exported_metrics() -> dict[str, set[str]]:
    """Every series name a metrics constructor in the shipped code exports, with its
    label names (histograms: _bucket/_sum/_count, counters: _total)."""
    out: dict[str, set[str]] = {}
    for path in python_sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call) or not node.args:
                continue
            func = node.func
            kind = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            first = node.args[0]
            if kind not in METRIC_TYPES or not isinstance(first, ast.Constant):
                continue
            name = first.value
            if not isinstance(name, str) or not name.startswith("vigil_"):
                continue
            labels: set[str] = set()
            label_arg = node.args[2] if len(node.args) > 2 else None
            for kw in node.keywords:
                if kw.arg == "labelnames":
                    label_arg = kw.value
            if isinstance(label_arg, ast.List | ast.Tuple):
                labels = {
                    e.value
                    for e in label_arg.elts
                    if isinstance(e, ast.Constant) and isinstance(e.value, str)
                }
            if kind == "Counter":
                series = [name if name.endswith("_total") else f"{name}_total"]
            elif kind == "Histogram":
                series = [f"{name}_bucket", f"{name}_sum", f"{name}_count"]
            elif kind == "Summary":
                series = [name, f"{name}_sum", f"{name}_count"]
            elif kind == "Info":
                series = [f"{name}_info"]
            else:
                series = [name]
            for s in series:
                out[s] = labels | ({"le"} if s.endswith("_bucket") else set())
    return out


METRIC = re.compile(r"\b(vigil_[a-z0-9_]+)\s*(\{[^}]*\})?")


def test_the_metric_scan_finds_the_code_s_metrics() -> None:
    """The scan the checks below rely on sees what the services and the daemon define."""
    metrics = exported_metrics()
    assert len(metrics) >= 40, sorted(metrics)
    assert metrics["vigil_agent_circuit_open"] == {"chatroom", "role"}
    assert "vigil_offline_detection_seconds_bucket" in metrics
    assert "vigil_daemon_children" in metrics  # daemon/metrics.py
    assert "vigil_heartbeats_total" in metrics


# -- Kubernetes ---------------------------------------------------------------------------

NAMESPACED = {"ConfigMap", "Secret", "Service", "Deployment", "PodDisruptionBudget", "Job"}
KNOWN_KINDS = {
    ("v1", "Namespace"),
    ("v1", "ConfigMap"),
    ("v1", "Secret"),
    ("v1", "Service"),
    ("apps/v1", "Deployment"),
    ("policy/v1", "PodDisruptionBudget"),
    ("batch/v1", "Job"),
}
DNS_1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
QUANTITY = re.compile(r"^\d+(\.\d+)?(m|Ki|Mi|Gi)?$")
EXAMPLE = "EXAMPLE"


def render_k8s(path: Path = K8S) -> list[dict[str, Any]]:
    run = subprocess.run(
        [tool("kubectl"), "kustomize", str(path)], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, f"kubectl kustomize {path} failed:\n{run.stderr}"
    return [doc for doc in yaml.safe_load_all(run.stdout) if doc]


def _quantity(q: str) -> float:
    m = re.match(r"^(\d+(?:\.\d+)?)(m|Ki|Mi|Gi)?$", str(q))
    assert m, q
    scale = {None: 1.0, "m": 0.001, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}[m.group(2)]
    return float(m.group(1)) * scale


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def _containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    containers: list[dict[str, Any]] = obj["spec"]["template"]["spec"]["containers"]
    return containers


def k8s_problems(objs: list[dict[str, Any]]) -> list[str]:
    """Everything wrong with the rendered objects, as one line each."""
    problems: list[str] = []
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for obj in objs:
        api, kind = obj.get("apiVersion"), obj.get("kind")
        meta = obj.get("metadata") or {}
        name = meta.get("name", "")
        where = f"{kind}/{name}"
        if (api, kind) not in KNOWN_KINDS:
            problems.append(f"{where}: unknown apiVersion/kind {api}/{kind}")
            continue
        if not DNS_1123.match(name) or len(name) > 63:
            problems.append(f"{where}: name is not a DNS-1123 label")
        if kind in NAMESPACED and not meta.get("namespace"):
            problems.append(f"{where}: no namespace")
        by_kind.setdefault(str(kind), []).append(obj)

    configmaps = {o["metadata"]["name"]: o.get("data") or {} for o in by_kind.get("ConfigMap", [])}
    secrets = {o["metadata"]["name"]: o.get("data") or {} for o in by_kind.get("Secret", [])}
    code_vars = env_vars_the_code_reads()

    for s in by_kind.get("Secret", []):
        where = f"Secret/{s['metadata']['name']}"
        if "stringData" in s:
            problems.append(f"{where}: stringData (plaintext in the manifest)")
        if not s.get("data"):
            problems.append(f"{where}: no data")
        for key, value in (s.get("data") or {}).items():
            text = base64.b64decode(value).decode(errors="replace")
            if EXAMPLE not in text:
                problems.append(f"{where}: {key} is not a clearly marked example value")

    workloads = by_kind.get("Deployment", []) + by_kind.get("Job", [])
    pod_labels: dict[str, dict[str, str]] = {}
    pod_ports: dict[str, dict[str, int]] = {}
    replicas: dict[str, int] = {}
    for w in workloads:
        kind, name = w["kind"], w["metadata"]["name"]
        where = f"{kind}/{name}"
        spec = w.get("spec") or {}
        template = spec.get("template") or {}
        labels = (template.get("metadata") or {}).get("labels") or {}
        pod = template.get("spec") or {}
        if kind == "Deployment":
            selector = (spec.get("selector") or {}).get("matchLabels") or {}
            if not _matches(selector, labels):
                problems.append(f"{where}: selector {selector} does not match its pods {labels}")
            pod_labels[name] = labels
            replicas[name] = int(spec.get("replicas", 1))
        elif pod.get("restartPolicy") not in ("OnFailure", "Never"):
            problems.append(f"{where}: a Job's restartPolicy must be OnFailure or Never")
        psc = pod.get("securityContext") or {}
        if psc.get("runAsNonRoot") is not True or not psc.get("runAsUser"):
            problems.append(f"{where}: pod not runAsNonRoot with a non-zero runAsUser")
        if pod.get("automountServiceAccountToken") is not False:
            problems.append(f"{where}: mounts a service account token it does not need")
        volumes = {v["name"]: v for v in pod.get("volumes") or []}
        for v in volumes.values():
            ref = (v.get("secret") or {}).get("secretName")
            if ref is not None and ref not in secrets:
                problems.append(f"{where}: volume {v['name']} names no Secret {ref}")
        containers = pod.get("containers") or []
        if not containers:
            problems.append(f"{where}: no containers")
        for c in containers:
            cw = f"{where} container {c.get('name')}"
            if not c.get("image"):
                problems.append(f"{cw}: no image")
            sc = c.get("securityContext") or {}
            if sc.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{cw}: root filesystem not read-only")
            if sc.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{cw}: allowPrivilegeEscalation not false")
            if "ALL" not in ((sc.get("capabilities") or {}).get("drop") or []):
                problems.append(f"{cw}: capabilities not dropped")
            res = c.get("resources") or {}
            for part in ("requests", "limits"):
                for r in ("cpu", "memory"):
                    q = (res.get(part) or {}).get(r)
                    if q is None or not QUANTITY.match(str(q)):
                        problems.append(f"{cw}: no {part}.{r}")
            for r in ("cpu", "memory"):
                req, lim = (res.get("requests") or {}).get(r), (res.get("limits") or {}).get(r)
                if req and lim and _quantity(req) > _quantity(lim):
                    problems.append(f"{cw}: {r} request above its limit")
            for m in c.get("volumeMounts") or []:
                if m["name"] not in volumes:
                    problems.append(f"{cw}: mounts an undeclared volume {m['name']}")
            ports = {p["name"]: p["containerPort"] for p in c.get("ports") or [] if "name" in p}
            pod_ports.setdefault(name, {}).update(ports)
            env = {e["name"]: e for e in c.get("env") or []}
            for var, e in env.items():
                if var.startswith("VIGIL_") or var == "DATABASE_URL":
                    if var not in code_vars:
                        problems.append(f"{cw}: {var} is read by no Vigil code")
                elif var not in PG_VARS:
                    problems.append(f"{cw}: unexpected variable {var}")
                if "value" in e and re.search(r"(TOKEN|PASSWORD|SECRET)$", var):
                    problems.append(f"{cw}: {var} has a literal value (use a secretKeyRef)")
                if "value" in e and re.search(r"://[^/@:]+:[^/@]+@", str(e["value"])):
                    problems.append(f"{cw}: {var} holds a password in a URL")
                ref = e.get("valueFrom") or {}
                if "secretKeyRef" in ref:
                    s_ref = ref["secretKeyRef"]
                    if s_ref["key"] not in secrets.get(s_ref["name"], {}):
                        problems.append(f"{cw}: {var} names no Secret key {s_ref}")
                if "configMapKeyRef" in ref:
                    c_ref = ref["configMapKeyRef"]
                    if c_ref["key"] not in configmaps.get(c_ref["name"], {}):
                        problems.append(f"{cw}: {var} names no ConfigMap key {c_ref}")
            if kind != "Deployment":
                continue
            # probes: the gRPC health service on the serving port, which is declared
            addr = (env.get("VIGIL_ADDR") or {}).get("value", "")
            serving = int(addr.rsplit(":", 1)[1]) if ":" in addr else None
            if serving is None or serving not in ports.values():
                problems.append(f"{cw}: VIGIL_ADDR {addr!r} is not on a declared containerPort")
            for probe_name in ("readinessProbe", "livenessProbe"):
                probe = c.get(probe_name)
                if not probe:
                    problems.append(f"{cw}: no {probe_name}")
                    continue
                if "grpc" in probe:
                    port = probe["grpc"].get("port")
                    if port != serving:
                        problems.append(f"{cw}: {probe_name} grpc port {port} != serving port")
                elif "exec" in probe:
                    cmd = probe["exec"]["command"]
                    if cmd[:3] != ["python", "-m", "vigil.core.healthcheck"]:
                        problems.append(f"{cw}: {probe_name} does not ask the gRPC health check")
                    target = cmd[cmd.index("--addr") + 1] if "--addr" in cmd else addr
                    # By service name: "" (the whole server) is NOT_SERVING while the
                    # database is away, and an outage must not restart or unready pods.
                    if "--service" not in cmd or not cmd[cmd.index("--service") + 1]:
                        problems.append(f"{cw}: {probe_name} does not name the service")
                    if not target.endswith(f":{serving}"):
                        problems.append(f"{cw}: {probe_name} checks {target}, not the serving port")
                else:
                    problems.append(f"{cw}: {probe_name} is neither grpc nor the health check")

    for svc in by_kind.get("Service", []):
        where = f"Service/{svc['metadata']['name']}"
        spec = svc.get("spec") or {}
        if spec.get("clusterIP") != "None":
            problems.append(f"{where}: not headless (clusterIP: None) for client-side balancing")
        selector = spec.get("selector") or {}
        selected = [d for d, labels in pod_labels.items() if _matches(selector, labels)]
        if len(selected) != 1:
            problems.append(f"{where}: selector {selector} selects {selected}")
            continue
        for port in spec.get("ports") or []:
            target = port.get("targetPort", port.get("port"))
            known = pod_ports[selected[0]]
            if target not in known and target not in known.values():
                problems.append(f"{where}: targetPort {target} is not a port of {selected[0]}")

    covered = set()
    for pdb in by_kind.get("PodDisruptionBudget", []):
        where = f"PodDisruptionBudget/{pdb['metadata']['name']}"
        spec = pdb.get("spec") or {}
        selector = (spec.get("selector") or {}).get("matchLabels") or {}
        selected = [d for d, labels in pod_labels.items() if _matches(selector, labels)]
        if len(selected) != 1:
            problems.append(f"{where}: selector {selector} selects {selected}")
            continue
        covered.add(selected[0])
        if not 1 <= int(spec.get("minAvailable", 0)) < replicas[selected[0]]:
            problems.append(f"{where}: minAvailable must be ≥ 1 and below the replicas")
    for name in pod_labels:
        if name not in covered:
            problems.append(f"Deployment/{name}: no PodDisruptionBudget")
    return problems


@pytest.fixture(scope="module")
def k8s() -> list[dict[str, Any]]:
    return render_k8s()


def test_the_kubernetes_base_renders_and_passes_the_schema_check(k8s: list[dict[str, Any]]) -> None:
    kinds = sorted((o["kind"], o["metadata"]["name"].rsplit("-", 1)[0]) for o in k8s)
    assert [k for k, _ in kinds].count("Deployment") == 2, kinds
    assert [k for k, _ in kinds].count("Service") == 2, kinds
    assert [k for k, _ in kinds].count("PodDisruptionBudget") == 2, kinds
    assert [k for k, _ in kinds].count("Job") == 1, kinds
    assert {n for k, n in kinds if k == "Secret"} == {"vigil-tokens", "vigil-db", "vigil-tls"}
    assert k8s_problems(k8s) == []
    deployments = {o["metadata"]["name"]: o for o in k8s if o["kind"] == "Deployment"}
    assert _containers(deployments["vigil-liveness"])[0]["args"] == ["liveness", "serve"]
    assert _containers(deployments["vigil-tasks"])[0]["args"] == ["task-service", "serve"]
    assert all(d["spec"]["replicas"] >= 2 for d in deployments.values())
    (job,) = (o for o in k8s if o["kind"] == "Job")
    assert _containers(job)[0]["args"] == ["migrate"]
    # the servers serve TLS and never migrate; the task service follows the liveness
    # service through its headless Service, with round_robin over `dns:///`
    for d in deployments.values():
        env = {e["name"]: e for e in _containers(d)[0]["env"]}
        assert env["VIGIL_MIGRATE"]["value"] == "0"
        assert {"VIGIL_SERVER_TLS_CERT", "VIGIL_SERVER_TLS_KEY"} <= set(env)
    config = next(o for o in k8s if o["kind"] == "ConfigMap")["data"]
    assert config["VIGIL_LIVENESS_ADDR"] == "dns:///vigil-liveness:7070"


def test_the_resources_say_which_benchmark_sized_them() -> None:
    for name in ("liveness.yaml", "tasks.yaml"):
        text = (K8S / name).read_text()
        m = re.search(r"((?:\s*#.*\n)+)\s*resources:", text)
        assert m and "make bench" in m.group(1) and "docs/bench/REPORT.md" in m.group(1), name


@pytest.mark.parametrize(
    "mutation, expected",
    [
        ("selector", "does not match its pods"),
        ("service-selector", "selects []"),
        ("pdb-selector", "selects []"),
        ("not-headless", "not headless"),
        ("probe-port", "not the serving port"),
        ("probe-service", "does not name the service"),
        ("plain-secret", "not a clearly marked example"),
        ("root", "runAsNonRoot"),
        ("env", "read by no Vigil code"),
    ],
)
def test_the_schema_check_catches_a_broken_manifest(
    k8s: list[dict[str, Any]], mutation: str, expected: str
) -> None:
    objs = json.loads(json.dumps(k8s))
    find = {
        (o["kind"], o["metadata"]["name"].split("-")[1]): o
        for o in objs
        if "-" in o["metadata"]["name"]
    }
    live = find[("Deployment", "liveness")]
    if mutation == "selector":
        live["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] = "livenes"
    elif mutation == "service-selector":
        find[("Service", "liveness")]["spec"]["selector"]["app.kubernetes.io/component"] = "x"
    elif mutation == "pdb-selector":
        pdb = find[("PodDisruptionBudget", "liveness")]
        pdb["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] = "x"
    elif mutation == "not-headless":
        del find[("Service", "tasks")]["spec"]["clusterIP"]
    elif mutation == "probe-port":
        command = _containers(live)[0]["readinessProbe"]["exec"]["command"]
        command[command.index("--addr") + 1] = "127.0.0.1:9464"
    elif mutation == "probe-service":
        command = _containers(live)[0]["livenessProbe"]["exec"]["command"]
        del command[command.index("--service") :]
    elif mutation == "plain-secret":
        secret = next(o for o in objs if o["kind"] == "Secret")
        key = next(iter(secret["data"]))
        secret["data"][key] = base64.b64encode(b"hunter2").decode()
    elif mutation == "root":
        live["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] = False
    elif mutation == "env":
        _containers(live)[0]["env"].append({"name": "VIGIL_LIVENESS_DB_URL", "value": "x"})
    problems = k8s_problems(objs)
    assert any(expected in p for p in problems), problems


# -- compose ------------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


def _command(svc: dict[str, Any]) -> list[str]:
    cmd = svc.get("command") or []
    return cmd.split() if isinstance(cmd, str) else list(cmd)


def test_the_compose_file_runs_the_topology() -> None:
    c = compose()
    services: dict[str, dict[str, Any]] = c["services"]
    assert {"postgres", "migrate", "liveness", "tasks", "daemon", "prometheus", "grafana"} <= set(
        services
    )
    assert services["postgres"]["image"].startswith("postgres:")
    assert _command(services["migrate"]) == ["migrate"]
    assert services["migrate"]["restart"] == "no"
    assert services["migrate"]["environment"]["DATABASE_URL"].startswith(
        "postgresql://vigil_owner@"
    )
    # two replicas of each service, each its own login, after the owner migrated
    for name, cmd, url in (
        ("liveness", ["liveness", "serve"], "VIGIL_LIVENESS_DATABASE_URL"),
        ("tasks", ["task-service", "serve"], "VIGIL_TASKS_DATABASE_URL"),
    ):
        svc = services[name]
        assert _command(svc) == cmd, name
        assert svc["deploy"]["replicas"] == 2, name
        env = svc["environment"]
        assert env["VIGIL_MIGRATE"] == "0" and "DATABASE_URL" not in env, name
        assert env[url].startswith(f"postgresql://vigil_{name}@postgres:"), name
        assert svc["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
        assert "ports" not in svc, f"{name}: replicas cannot share a published port"
        assert svc["read_only"] is True and "healthcheck" not in svc  # the image's
    assert services["tasks"]["environment"]["VIGIL_LIVENESS_ADDR"] == "dns:///liveness:7070"
    # one daemon, proving itself with its machine's credential
    daemon = services["daemon"]
    assert (daemon.get("deploy") or {}).get("replicas", 1) == 1
    assert _command(daemon)[:2] == ["daemon", "start"] and "--credential-file" in _command(daemon)
    assert "VIGIL_TOKEN_FILE" not in daemon["environment"]
    # one-shots and processes that serve no gRPC have no health check to fail
    for name, svc in services.items():
        if svc.get("restart") == "no" or name == "daemon":
            assert svc.get("healthcheck") == {"disable": True}, name
    # every dependency exists and waits for the right condition
    for name, svc in services.items():
        deps = svc.get("depends_on") or {}
        for dep, cond in deps.items() if isinstance(deps, dict) else [(d, None) for d in deps]:
            assert dep in services, (name, dep)
            if cond is not None and services[dep].get("restart") == "no":
                assert cond["condition"] == "service_completed_successfully", (name, dep)


def test_the_compose_file_keeps_secrets_out_and_names_real_variables() -> None:
    services: dict[str, dict[str, Any]] = compose()["services"]
    code_vars = env_vars_the_code_reads()
    text = COMPOSE.read_text()
    assert not re.search(r"vigil_[0-9a-f]{16}_", text), "a token in the compose file"
    for name, svc in services.items():
        env = svc.get("environment") or {}
        for var, value in env.items():
            if var.startswith("VIGIL_") or var == "DATABASE_URL":
                assert var in code_vars, f"{name}: {var} is read by no Vigil code"
            assert not re.search(r"://[^/@:]+:[^/@]+@", str(value)), f"{name}: password in {var}"
            if re.search(r"(TOKEN|PASSWORD|SECRET)$", var):
                pytest.fail(f"{name}: {var} holds a secret in the compose file")
            if var.endswith(("_FILE", "PASSFILE")) or var == "PGPASSFILE":
                assert str(value).startswith("/secrets/"), (name, var)
        # bind mounts name files that exist
        for vol in svc.get("volumes") or []:
            src = vol.split(":", 1)[0]
            if src.startswith("."):
                assert (DEPLOY / src).exists(), f"{name}: {src} does not exist"
        if "build" in svc:
            build = DEPLOY / svc["build"]["context"] / svc["build"]["dockerfile"]
            assert build.resolve() == DOCKERFILE, build
    # the bootstrap token reaches the task service from its file, through the shell
    entry = services["tasks"]["entrypoint"]
    assert "$$(cat /secrets/vigil/admin.token)" in entry[2] and entry[2].endswith(
        'exec vigil "$$@"'
    )
    init = (DEPLOY / "compose" / "init-secrets.sh").read_text()
    assert "umask 077" in init
    for made in (
        "admin.token",
        "pgpass-$role",
        "for role in owner liveness tasks",
        "admin.password",
    ):
        assert made in init, made


def _mounts(svc: dict[str, Any]) -> dict[str, str]:
    """source -> target of a service's short-syntax volumes."""
    return {v.split(":")[0]: v.split(":")[1] for v in svc.get("volumes") or []}


def test_compose_prometheus_loads_the_rules_and_grafana_the_dashboard(tmp: Path) -> None:
    services: dict[str, dict[str, Any]] = compose()["services"]
    mounts = _mounts(services["prometheus"])
    assert mounts["./prometheus/rules"] == "/etc/prometheus/rules"
    config_path = DEPLOY / "compose" / "prometheus.yml"
    assert mounts["./compose/prometheus.yml"] == "/etc/prometheus/prometheus.yml"
    config = yaml.safe_load(config_path.read_text())
    assert config["rule_files"] == ["/etc/prometheus/rules/*.yml"]
    # promtool, with the rules where compose puts them: config and rules both valid
    local = tmp / "prometheus.yml"
    local.write_text(config_path.read_text().replace("/etc/prometheus/rules", str(RULES.parent)))
    run = subprocess.run(
        [tool("promtool"), "check", "config", str(local)], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stdout + run.stderr
    found = re.search(r"SUCCESS: (\d+) rules found", run.stdout)
    assert "1 rule files found" in run.stdout and found and int(found.group(1)) >= 9, run.stdout
    # Grafana: the provider's folder is where compose mounts the dashboard
    g_mounts = _mounts(services["grafana"])
    provider = yaml.safe_load((PROVISIONING / "dashboards" / "vigil.yaml").read_text())
    (prov,) = provider["providers"]
    assert prov["type"] == "file"
    assert Path(g_mounts["./grafana/vigil.json"]).parent == Path(prov["options"]["path"])
    assert g_mounts["./grafana/provisioning/dashboards"] == "/etc/grafana/provisioning/dashboards"
    datasources = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yaml").read_text())
    (ds,) = datasources["datasources"]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090"
    assert ds["isDefault"] is True
    assert services["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD__FILE"].startswith(
        "/secrets/"
    )


def test_the_rules_name_only_scraped_jobs() -> None:
    """`up{job="…"}` in a rule means nothing unless both Prometheus configs scrape it."""
    jobs = set(re.findall(r'job="([^"]+)"', RULES.read_text()))
    assert jobs
    for path in PROM_CONFIGS:
        scraped = {j["job_name"] for j in yaml.safe_load(path.read_text())["scrape_configs"]}
        assert jobs <= scraped, (path, jobs - scraped)


# -- the container image ----------------------------------------------------------------


def dockerfile_stages() -> list[tuple[str, list[str]]]:
    """(stage name, its instructions with continuation lines joined)."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    stages: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.match(r"FROM\s+(\S+)(?:\s+AS\s+(\S+))?", line, re.I)
        if m:
            stages.append((m.group(2) or "", [line]))
        elif stages:
            stages[-1][1].append(line)
    return stages


def test_the_dockerfile_is_multi_stage_non_root_and_health_checked() -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r"(?m)^ARG PYTHON_IMAGE=python:3\.11-slim", text)
    stages = dockerfile_stages()
    assert [name for name, _ in stages] == ["build", "runtime"]
    build, runtime = stages[0][1], stages[1][1]
    # the build stage runs the tested script: build the wheel, install it into a venv
    runs = " ".join(i for i in build if i.startswith("RUN"))
    assert re.search(r"deploy/wheel\.sh build /dist /src", runs), runs
    assert re.search(r"deploy/wheel\.sh install /opt/vigil/bin/python /dist", runs), runs
    # the runtime stage has only that venv: no source, no build tools
    copies = [i for i in runtime if i.startswith(("COPY", "ADD"))]
    assert copies == ["COPY --from=build /opt/vigil /opt/vigil"], copies
    users = [i.split()[1] for i in runtime if i.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("0", "root"), users
    (health,) = [i for i in runtime if i.startswith("HEALTHCHECK")]
    assert '"-m", "vigil.core.healthcheck"' in health, health
    assert any(i.startswith("ENTRYPOINT") and '"vigil"' in i for i in runtime)
    # the context the build stage copies never holds generated code
    ignored = DOCKERIGNORE.read_text().split()
    assert {"vigil/v1/*_pb2*", ".git", ".venv"} <= set(ignored)


def _docker_ignored(rel: str, patterns: list[str]) -> bool:
    parts = rel.split("/")
    for i in range(1, len(parts) + 1):
        prefix = "/".join(parts[:i])
        for pat in patterns:
            if fnmatch.fnmatch(prefix, pat):
                return True
            if pat.startswith("**/") and fnmatch.fnmatch(parts[i - 1], pat[3:]):
                return True
    return False


def test_the_image_build_stage_builds_a_wheel_with_the_health_check(tmp: Path) -> None:
    """deploy/Dockerfile's build stage, run here: copy the context as Docker would (with
    Dockerfile.dockerignore), then `wheel.sh build /dist /src` on it."""
    patterns = [
        ln.strip()
        for ln in DOCKERIGNORE.read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    src = tmp / "src"

    def ignore(folder: str, names: list[str]) -> set[str]:
        rel = Path(folder).relative_to(ROOT)
        return {n for n in names if _docker_ignored(str(rel / n).removeprefix("./"), patterns)}

    shutil.copytree(ROOT, src, symlinks=True, ignore=ignore)
    assert not list((src / "vigil" / "v1").glob("*_pb2*")), "generated code in the context"
    dist = tmp / "dist"
    run = subprocess.run(
        [str(WHEEL_SH), "build", str(dist), str(src)],
        env={**harness.child_env(), "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    (wheel,) = dist.glob("vigil-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "vigil/core/healthcheck.py" in names  # the image's HEALTHCHECK and probes
    assert "vigil/v1/health_pb2.py" not in names  # grpcio-health-checking's, not ours
    assert (dist / "requirements.lock").read_text() == (src / "requirements.lock").read_text()


def test_the_wheel_script_refuses_a_source_holding_generated_code(tmp: Path) -> None:
    src = tmp / "src"
    (src / "vigil" / "v1").mkdir(parents=True)
    (src / "pyproject.toml").write_text("")
    (src / "vigil" / "v1" / "tasks_pb2.py").write_text("")
    run = subprocess.run(
        [str(WHEEL_SH), "build", str(tmp / "dist"), str(src)], capture_output=True, text=True
    )
    assert run.returncode != 0 and "generated code comes from the build" in run.stderr


# -- the health check ---------------------------------------------------------------------


def healthcheck(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vigil.core.healthcheck", *args],
        env=harness.child_env(env),
        capture_output=True,
        text=True,
        timeout=30,
    )


async def test_the_health_check_asks_the_server_s_health_service(db_url: str) -> None:
    async with harness.local_server(db_url, harness.fast_timings()) as srv:
        port = srv.server.port
        ok = await asyncio.to_thread(healthcheck, {"VIGIL_ADDR": f"0.0.0.0:{port}"})
        named = await asyncio.to_thread(
            healthcheck, {}, "--addr", srv.addr, "--service", "vigil.v1.Liveness"
        )
        unknown = await asyncio.to_thread(
            healthcheck, {}, "--addr", srv.addr, "--service", "no.such.Service"
        )
    assert ok.returncode == 0 and f"127.0.0.1:{port}: SERVING" in ok.stdout, ok.stderr
    assert named.returncode == 0, named.stderr
    assert unknown.returncode == 1 and "NOT_FOUND" in unknown.stderr, unknown
    gone = await asyncio.to_thread(healthcheck, {}, "--addr", f"127.0.0.1:{harness.free_port()}")
    assert gone.returncode == 1 and "UNAVAILABLE" in gone.stderr, gone
    bad = await asyncio.to_thread(healthcheck, {"VIGIL_ADDR": "nonsense"})
    assert bad.returncode == 2 and "VIGIL_ADDR" in bad.stderr


async def test_the_health_check_speaks_the_server_s_mutual_tls(db_url: str, tmp: Path) -> None:
    certs = tmp / "certs"
    # named for a host other than the one dialled: the check uses the certificate's name
    dev_ca(certs, hosts=("vigil-test", "127.0.0.1"))
    tls = {
        "VIGIL_SERVER_TLS_CERT": str(certs / "server.pem"),
        "VIGIL_SERVER_TLS_KEY": str(certs / "server.key"),
        "VIGIL_SERVER_TLS_CLIENT_CA": str(certs / "ca.pem"),
        "VIGIL_TLS_CA": str(certs / "ca.pem"),
    }
    env = harness.child_env(
        {"DATABASE_URL": db_url, "VIGIL_METRICS_ADDR": "127.0.0.1:0", "VIGIL_DATA_DIR": "d", **tls}
    )
    server = await asyncio.to_thread(
        harness.start_server_process, ["up", "--addr", "127.0.0.1:0"], env, tmp / "up.log"
    )
    try:
        addr = f"0.0.0.0:{server.port}"
        ok = await asyncio.to_thread(healthcheck, {"VIGIL_ADDR": addr, **tls})
        plaintext = await asyncio.to_thread(healthcheck, {"VIGIL_ADDR": addr})
        no_client_cert = {k: v for k, v in tls.items() if k != "VIGIL_SERVER_TLS_CLIENT_CA"}
        refused = await asyncio.to_thread(healthcheck, {"VIGIL_ADDR": addr, **no_client_cert})
    finally:
        await asyncio.to_thread(server.stop)
    assert ok.returncode == 0 and "SERVING" in ok.stdout, ok.stdout + ok.stderr
    assert plaintext.returncode == 1, plaintext
    assert refused.returncode == 1, refused


# -- systemd ------------------------------------------------------------------------------


def _unit_for_verify(tmp: Path, text: str) -> Path:
    """The unit with its ExecStart program at an existing path: this checkout's `vigil`
    (systemd-analyze verify refuses a program that does not exist)."""
    vigil = Path(sys.executable).parent / "vigil"
    assert vigil.exists(), vigil
    assert "ExecStart=/opt/vigil/bin/vigil " in text
    path = tmp / "vigil-daemon.service"
    path.write_text(text.replace("ExecStart=/opt/vigil/bin/vigil ", f"ExecStart={vigil} "))
    return path


def verify_unit(tmp: Path, text: str) -> str:
    """systemd-analyze verify's complaints about the unit ("" when none)."""
    unit = _unit_for_verify(tmp, text)
    run = subprocess.run(
        [tool("systemd-analyze"), "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    lines = [ln for ln in (run.stdout + run.stderr).splitlines() if unit.name in ln]
    if run.returncode != 0 and not lines:
        lines = [f"exit {run.returncode}: {run.stderr.strip()}"]
    return "\n".join(lines)


def test_the_daemon_unit_verifies_and_is_hardened(tmp: Path) -> None:
    text = UNIT.read_text()
    assert verify_unit(tmp, text) == ""
    for directive in (
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "StateDirectory=vigil-daemon",
        "LoadCredential=machine.credential:",
        "CapabilityBoundingSet=\n",
    ):
        assert directive in text, directive
    exec_start = next(ln for ln in text.splitlines() if ln.startswith("ExecStart="))
    assert "--credential-file %d/machine.credential" in exec_start
    assert "--token" not in exec_start and "VIGIL_TOKEN" not in text
    # systemd's own exposure score, offline
    unit = _unit_for_verify(tmp, text)
    run = subprocess.run(
        [tool("systemd-analyze"), "security", "--offline=yes", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", run.stdout + run.stderr)
    assert m, run.stdout + run.stderr
    assert float(m.group(1)) <= 2.5, run.stdout[-3000:]


@pytest.mark.parametrize(
    "old, new",
    [("NoNewPrivileges=yes", "NoNewPrivilege=yes"), ("ProtectSystem=strict", "ProtectSystem=no!")],
)
def test_a_broken_unit_is_caught(tmp: Path, old: str, new: str) -> None:
    text = UNIT.read_text()
    assert old in text
    assert verify_unit(tmp, text.replace(old, new)) != ""


# -- the dashboard and the rules ----------------------------------------------------------

DS_VAR = {"type": "prometheus", "uid": "${datasource}"}
FILTERS = {"job": "$job", "instance": "$instance"}


def dashboard_panels(dash: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for p in dash["panels"]:
        yield p
        yield from p.get("panels", [])


def dashboard_problems(dash: dict[str, Any], text: str) -> list[str]:
    problems = []
    if "${DS_" in text or "__inputs" in dash:
        problems.append("an import input (${DS_…}/__inputs) left: file provisioning breaks")
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    ds = variables.get("datasource", {})
    if ds.get("type") != "datasource" or ds.get("query") != "prometheus":
        problems.append("no `datasource` variable of type datasource (prometheus)")
    exported = exported_metrics()
    for name in ("job", "instance", "chatroom"):
        v = variables.get(name)
        if v is None:
            problems.append(f"no `{name}` variable")
            continue
        if v.get("type") != "query" or v.get("datasource") != DS_VAR:
            problems.append(f"`{name}`: not a query on ${{datasource}}")
        if not (v.get("includeAll") and v.get("allValue") == ".*"):
            problems.append(f"`{name}`: no All (.*)")
        query = v.get("definition", "")
        for metric, _sel in METRIC.findall(query):
            if metric not in exported:
                problems.append(f"`{name}`: {metric} is exported by no code")
    for p in dashboard_panels(dash):
        if p["type"] == "row":
            continue
        if p.get("datasource") != DS_VAR:
            problems.append(f"{p['title']!r}: datasource is not ${{datasource}}")
        for t in p.get("targets", []):
            where = f"{p['title']!r} {t['refId']}"
            if t.get("datasource", DS_VAR) != DS_VAR:
                problems.append(f"{where}: datasource is not ${{datasource}}")
            for metric, sel in METRIC.findall(t["expr"]):
                if metric not in exported:
                    problems.append(f"{where}: {metric} is exported by no code")
                    continue
                matchers = dict(re.findall(r'(\w+)\s*=~\s*"([^"]*)"', sel))
                for label, var in FILTERS.items():
                    if matchers.get(label) != var:
                        problems.append(f"{where}: {metric} not filtered by {label}=~{var!r}")
                has_chatroom = "chatroom" in exported[metric]
                if has_chatroom and matchers.get("chatroom") != "$chatroom":
                    problems.append(f"{where}: {metric} not filtered by chatroom")
                if not has_chatroom and "chatroom" in matchers:
                    problems.append(f"{where}: {metric} has no chatroom label")
    return problems


def test_the_dashboard_provisions_from_files_with_its_variables() -> None:
    text = DASHBOARD.read_text()
    dash = json.loads(text)
    assert dashboard_problems(dash, text) == []
    names = [v["name"] for v in dash["templating"]["list"]]
    assert names[:4] == ["datasource", "job", "instance", "chatroom"]


@pytest.mark.parametrize("mutation", ["ds-input", "panel-ds", "unfiltered", "unknown-metric"])
def test_the_dashboard_check_catches_a_broken_dashboard(mutation: str) -> None:
    text = DASHBOARD.read_text()
    dash = json.loads(text)
    graph = next(p for p in dashboard_panels(dash) if p["type"] != "row")
    if mutation == "ds-input":
        text = text.replace('"${datasource}"', '"${DS_PROMETHEUS}"', 1)
    elif mutation == "panel-ds":
        graph["datasource"] = {"type": "prometheus", "uid": "prometheus"}
    elif mutation == "unfiltered":
        graph["targets"][0]["expr"] = graph["targets"][0]["expr"].replace('job=~"$job", ', "")
    elif mutation == "unknown-metric":
        graph["targets"][0]["expr"] = "sum(vigil_no_such_metric{job=~'$job'})"
    assert dashboard_problems(dash, text) != []


def test_every_alert_rule_names_metrics_the_code_exports() -> None:
    exported = exported_metrics()
    groups = yaml.safe_load(RULES.read_text())["groups"]
    rules = [r for g in groups for r in g["rules"]]
    assert len(rules) >= 9
    for rule in rules:
        for metric, _sel in METRIC.findall(rule["expr"]):
            assert metric in exported, f"{rule.get('alert')}: {metric} is exported by no code"
