"""Operators' view: the Prometheus config and alert rules pass promtool, the Grafana
dashboard names only metrics a live Vigil exports, and a real Prometheus server scraping
a real Vigil sees the crash-loop alert go from inactive to firing."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import start_http_server
from prometheus_client.parser import text_string_to_metric_families

from vigil import testing as harness
from vigil.core.vocab import AgentStatus
from vigil.testing import local_server
from vigil.v1 import common_pb2
from vigil.v1 import machines_pb2 as mpb
from vigil.v1 import machines_pb2_grpc as mpb_grpc
from vigil.v1 import tasks_pb2 as tpb
from vigil.v1 import tasks_pb2_grpc as tpb_grpc

# Spawns real processes (servers, agents, daemons, the CLI): not in `make test-fast`.
pytestmark = pytest.mark.slow

ROOT = harness.ROOT
PROM_DIR = ROOT / "deploy" / "prometheus"
CONFIG = PROM_DIR / "prometheus.yml"
RULES = PROM_DIR / "rules" / "vigil.rules.yml"
RULE_TESTS = PROM_DIR / "tests" / "vigil.rules.test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "vigil.json"

CRASH_LOOP = "VigilAgentCrashLooping"

# A crash loop opens the circuit after 3 exits within a second or two; the long cool-down
# keeps it open for the whole test.
TIMINGS = harness.fast_timings(
    restart_backoff_base_ms=200,
    restart_backoff_cap_ms=2000,
    circuit_exits=3,
    circuit_window_ms=60_000,
    circuit_cooldown_ms=120_000,
)

# Grafana's interval variables, as a query editor would substitute them, and the
# dashboard's filters (job, instance, chatroom) set to "All".
GRAFANA_VARS = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "1h",
    "$job": ".*",
    "$instance": ".*",
    "$chatroom": ".*",
}
HISTOGRAM_PARTS = ("_bucket", "_sum", "_count")
METRIC = re.compile(r"\bvigil_[a-z0-9_]+")


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"`{name}` is not on PATH: install Debian's prometheus package "
            "(`make prometheus-tools`, which `make test` runs)"
        )
    return path


# -- promtool ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["check", "config", str(CONFIG)],
        ["check", "rules", str(RULES)],
        ["test", "rules", str(RULE_TESTS)],
    ],
    ids=["check-config", "check-rules", "test-rules"],
)
def test_promtool_passes(args: list[str]) -> None:
    run = subprocess.run(
        [tool("promtool"), *args], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert run.returncode == 0, f"promtool {' '.join(args)}:\n{run.stdout}\n{run.stderr}"


def test_every_alert_has_severity_annotations_and_a_unit_test() -> None:
    text = RULES.read_text()
    alerts = re.findall(r"(?m)^\s*- alert: (\S+)", text)
    assert {
        CRASH_LOOP,
        "VigilTasksStuckPastDeadline",
        "VigilDeadlineLagHigh",
        "VigilParticipantsExpiringInBulk",
        "VigilDaemonOffline",
        "VigilRestartStorm",
        "VigilExitReportsFailing",
    } <= set(alerts)
    blocks = re.split(r"(?m)^\s*- alert: ", text)[1:]
    for block in blocks:
        name = block.split()[0]
        assert re.search(r"(?m)^\s+severity: (critical|warning)$", block), name
        assert re.search(r"(?m)^\s+summary: ", block), name
        assert re.search(r"(?m)^\s+description: ", block), name
    tests = RULE_TESTS.read_text()
    for name in alerts:
        # each alert is expected both firing (an alert listed) and not firing ([]).
        firing = re.search(rf"alertname: {name}\n\s+exp_alerts:\s*(&\w+)?\n\s+- exp_labels", tests)
        quiet = re.search(rf"alertname: {name}\n\s+exp_alerts: \[\]", tests)
        assert firing and quiet, f"{name} needs a firing and a not-firing unit test"


# -- the dashboard -------------------------------------------------------------------


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def panels(dash: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for p in dash["panels"]:
        yield p
        yield from p.get("panels", [])  # collapsed rows nest their panels


def queries(dash: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(panel title, refId, expr with Grafana's variables substituted)."""
    out = []
    for p in panels(dash):
        for t in p.get("targets", []):
            expr = t["expr"]
            for var, value in GRAFANA_VARS.items():
                expr = expr.replace(var, value)
            out.append((p["title"], t["refId"], expr))
    return out


def base_name(name: str) -> str:
    for suffix in HISTOGRAM_PARTS:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def test_dashboard_is_a_grafana_dashboard() -> None:
    dash = dashboard()
    assert dash["title"] and dash["uid"]
    assert isinstance(dash["schemaVersion"], int) and dash["schemaVersion"] >= 36
    assert dash["id"] is None  # importable anywhere
    # provisioned from files: the datasource is a template variable, not an import input
    # (tests/integration/test_deploy.py checks the templating in full)
    assert "__inputs" not in dash
    assert dash["templating"]["list"][0]["name"] == "datasource"
    assert {"from", "to"} <= set(dash["time"])
    ids = [p["id"] for p in panels(dash)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    occupied: set[tuple[int, int]] = set()
    graphs = 0
    for p in panels(dash):
        assert p["type"] in {"row", "timeseries", "stat", "table", "gauge", "bargauge"}, p
        assert p["title"], p
        g = p["gridPos"]
        assert g["w"] > 0 and g["h"] > 0 and 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        cells = {(g["x"] + dx, g["y"] + dy) for dx in range(g["w"]) for dy in range(g["h"])}
        assert not cells & occupied, f"panel {p['title']!r} overlaps another"
        occupied |= cells
        if p["type"] == "row":
            continue
        graphs += 1
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"], f"panel {p['title']!r} has no query"
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["expr"].strip(), p["title"]
            assert t.get("datasource", p["datasource"]) == p["datasource"]
            legend_labels = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", t.get("legendFormat", "")))
            grouped = {
                label.strip()
                for group in re.findall(r"\bby\s*\(([^)]*)\)", t["expr"])
                for label in group.split(",")
            }
            assert legend_labels <= grouped, (p["title"], legend_labels, grouped)
    assert graphs >= 20
    # the operators' topics
    exprs = " ".join(e for _, _, e in queries(dash))
    for metric in (
        "vigil_participants",  # live agents by kind
        "vigil_participant_offline_total",  # offline reasons
        "vigil_offline_detection_seconds_bucket",  # detection latency
        "vigil_exit_report_latency_seconds_bucket",  # exit-report latency
        "vigil_tasks",  # tasks by status
        "vigil_task_transitions_total",
        "vigil_task_recoveries_total",
        "vigil_restart_requests_total",
        "vigil_agent_circuit_open",
        "vigil_task_deadline_lag_seconds_bucket",
    ):
        assert re.search(rf"\b{metric}\b", exprs), f"the dashboard does not chart {metric}"


def test_dashboard_queries_are_valid_promql(tmp: Path) -> None:
    """promtool parses every dashboard query (as a recording rule)."""
    lines = ["groups:", "  - name: dashboard", "    rules:"]
    for i, (title, ref, expr) in enumerate(queries(dashboard())):
        lines.append(f"      - record: dashboard:query_{i}  # {title} {ref}")
        lines.append(f"        expr: {json.dumps(expr)}")
    path = tmp / "dashboard.rules.yml"
    path.write_text("\n".join(lines) + "\n")
    run = subprocess.run(
        [tool("promtool"), "check", "rules", str(path)], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stdout + run.stderr


# -- a live Vigil and daemon -----------------------------------------------------------


@contextlib.contextmanager
def metrics_http(registry: Any) -> Iterator[int]:
    """Serve REGISTRY on a free loopback port, as `vigil up` does on VIGIL_METRICS_ADDR."""
    httpd, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    try:
        yield int(httpd.server_port)
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


def http_get(url: str, timeout: float = 5) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as reply:  # loopback only
        body: bytes = reply.read()
    return body.decode()


async def get(url: str) -> str:
    """Off the event loop: the in-process server must keep running meanwhile."""
    return await asyncio.to_thread(http_get, url)


class Daemon(harness.MachineDaemon):
    """A real `vigil daemon start` process serving its metrics on a loopback port."""

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    async def metrics(self, timeout: float = 15) -> str:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while True:
            try:
                return await get(self.metrics_url)
            except (urllib.error.URLError, ConnectionError) as exc:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(
                        f"the daemon started with --metrics-addr 127.0.0.1:{self.metrics_port} "
                        f"serves no {self.metrics_url} ({exc}); its log:\n"
                        + self.log.read_text(errors="replace")
                    ) from None
            await asyncio.sleep(0.1)


@contextlib.asynccontextmanager
async def machine_daemon(addr: str, tmp: Path, machine_id: str = "m1") -> AsyncIterator[Daemon]:
    async with harness.channel(addr) as ch:
        reply = await mpb_grpc.MachinesStub(ch).RegisterMachine(
            mpb.RegisterMachineRequest(machine_id=machine_id, hostname="test")
        )
    d = Daemon(addr, machine_id, reply.credential, tmp, metrics=True)
    d.start()
    try:
        yield d
    finally:
        await d.stop()


async def crash_room(addr: str, machine: str = "m1") -> None:
    """Chatroom `room`: builder (remote, an agent that exits 1 at once), reviewer (custom)."""
    async with harness.channel(addr) as ch:
        await tpb_grpc.TasksStub(ch).CreateChatroom(
            tpb.CreateChatroomRequest(
                name="room",
                roles=[
                    tpb.Role(
                        role="builder",
                        kind=common_pb2.AGENT_KIND_REMOTE,
                        machine=machine,
                        harness="crash",
                    ),
                    tpb.Role(role="reviewer", kind=common_pb2.AGENT_KIND_CUSTOM),
                ],
            )
        )


async def send(addr: str, role: str, text: str) -> None:
    async with harness.channel(addr) as ch:
        await tpb_grpc.TasksStub(ch).SendMessage(
            tpb.SendMessageRequest(chatroom="room", role=role, text=text)
        )


async def builder_status(addr: str) -> str:
    async with harness.channel(addr) as ch:
        reply = await mpb_grpc.MachinesStub(ch).ListAgents(mpb.ListAgentsRequest(chatroom="room"))
    return next(AgentStatus.from_pb(a.status).value for a in reply.agents if a.role == "builder")


async def wait_circuit_open(addr: str, timeout: float = 20) -> None:
    async def is_open() -> bool:
        return await builder_status(addr) == "circuit_open"

    await harness.wait_for(is_open, timeout, interval=0.05, what="builder's circuit open")


class Exposition:
    """What one /metrics page says: metric types, and the labels samples carry."""

    def __init__(self, *pages: str) -> None:
        self.types: dict[str, str] = {}
        self.labels: dict[str, set[str]] = {}
        for page in pages:
            for name, kind in re.findall(r"(?m)^# TYPE (\S+) (\S+)$", page):
                self.types[name] = kind
            for family in text_string_to_metric_families(page):
                for sample in family.samples:
                    self.labels.setdefault(base_name(sample.name), set()).update(sample.labels)

    def check(self, name: str) -> str | None:
        """Why NAME (as written in a query) is not exported, or None."""
        base = base_name(name)
        if name != base:
            if self.types.get(base) != "histogram":
                return f"{name}: no histogram {base} is exported"
            return None
        if name not in self.types:
            return f"{name}: not exported"
        if self.types[name] == "histogram":
            return f"{name}: a histogram; query {name}_bucket/_sum/_count"
        return None


def check_queries(dash: dict[str, Any], live: Exposition) -> list[str]:
    problems = []
    ignored_labels = {"le", "instance", "job", "alertname", "alertstate"}
    for title, ref, expr in queries(dash):
        where = f"{title!r} {ref}"
        names = set(METRIC.findall(expr))
        for name in sorted(names):
            why = live.check(name)
            if why:
                problems.append(f"{where}: {why}")
        for fn, name in re.findall(r"\b(rate|increase|irate)\((vigil_[a-z0-9_]+)", expr):
            if live.types.get(name) == "gauge":
                problems.append(f"{where}: {fn}() over the gauge {name}")
        # labels in selectors and groupings must exist on the metrics queried (when the
        # live page has samples of all of them to tell)
        used = {
            label
            for sel in re.findall(r"\bvigil_[a-z0-9_]+\{([^}]*)\}", expr)
            for label in re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", sel)
        } | {
            label.strip()
            for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr)
            for label in group.split(",")
        }
        bases = {base_name(n) for n in names}
        if bases and all(b in live.labels for b in bases):
            known = set().union(*(live.labels[b] for b in bases))
            for label in sorted(used - ignored_labels - known):
                problems.append(f"{where}: no metric in it has a label {label!r}")
    return problems


async def test_every_dashboard_query_names_a_metric_a_live_vigil_exports(
    db_url: str, tmp: Path
) -> None:
    dash = dashboard()
    async with local_server(db_url, TIMINGS) as srv, machine_daemon(srv.addr, tmp) as daemon:
        with metrics_http(srv.registry) as port:
            await crash_room(srv.addr)
            # activity, so that labelled metrics have samples: a custom agent joins,
            # takes a task and leaves; the remote builder crash-loops until its circuit opens
            await send(srv.addr, "reviewer", "have a look")
            reviewer = harness.spawn_agent(srv.addr, "room", "reviewer", tmp, timeout="10s")
            await send(srv.addr, "builder", "crash please")
            await wait_circuit_open(srv.addr)
            assert await asyncio.to_thread(reviewer.proc.wait, 15) == 0, reviewer.stderr()
            await asyncio.sleep(2.5)  # one refresh of the database-backed gauges
            server_page = await get(f"http://127.0.0.1:{port}/metrics")
            daemon_page = await daemon.metrics()
    live = Exposition(server_page, daemon_page)
    used = {n for _, _, e in queries(dash) for n in METRIC.findall(e)}
    assert len(used) >= 25
    problems = check_queries(dash, live)
    assert not problems, "\n".join(problems)
    # the activity above reached the metrics the dashboard shows for it
    assert 'vigil_agent_circuit_open{chatroom="room",role="builder"} 1.0' in server_page
    assert re.search(r'vigil_agent_exits_total\{classification="crashed"[^}]*\} [1-9]', server_page)
    assert re.search(
        r'vigil_daemon_child_exits_total\{classification="crashed"\} [1-9]', daemon_page
    )
    assert re.search(r'vigil_daemon_exit_reports_total\{outcome="sent"\} [1-9]', daemon_page)
    # and every exported vigil_ metric is on the dashboard
    exported = {n for n in live.types if n.startswith("vigil_") and not n.endswith("_created")}
    charted = {base_name(n) for n in used}
    assert exported <= charted, f"not on the dashboard: {sorted(exported - charted)}"


# -- a real Prometheus -----------------------------------------------------------------


def shortened_rules(text: str) -> str:
    """The shipped rules with every `for:` cut to 1s (rule expressions untouched)."""
    out, n = re.subn(r"(?m)^(\s+for:\s*)\S+\s*$", r"\g<1>1s", text)
    assert n >= 7
    return out


class Prometheus:
    def __init__(self, tmp: Path, scrape_port: int) -> None:
        self.port = harness.free_port()
        self.dir = tmp / "prometheus"
        self.dir.mkdir()
        (self.dir / "vigil.rules.yml").write_text(shortened_rules(RULES.read_text()))
        (self.dir / "prometheus.yml").write_text(
            "global:\n"
            "  scrape_interval: 1s\n"
            "  scrape_timeout: 1s\n"
            "  evaluation_interval: 1s\n"
            "rule_files:\n"
            "  - vigil.rules.yml\n"
            "scrape_configs:\n"
            "  - job_name: vigil\n"
            "    static_configs:\n"
            f"      - targets: ['127.0.0.1:{scrape_port}']\n"
        )
        self.log = self.dir / "prometheus.log"
        self.proc = subprocess.Popen(
            [
                tool("prometheus"),
                f"--config.file={self.dir / 'prometheus.yml'}",
                f"--storage.tsdb.path={self.dir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdout=subprocess.DEVNULL,
            stderr=self.log.open("wb"),
        )

    def url(self, path: str, **params: str) -> str:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        return f"http://127.0.0.1:{self.port}{path}{query}"

    async def api(self, path: str, **params: str) -> Any:
        reply = json.loads(await get(self.url(path, **params)))
        assert reply["status"] == "success", reply
        return reply["data"]

    async def wait(self, what: str, predicate: Any, timeout: float = 30) -> Any:
        async def check() -> Any:
            if self.proc.poll() is not None:
                raise AssertionError(f"prometheus exited {self.proc.returncode}:\n{self.logs()}")
            with contextlib.suppress(urllib.error.URLError, ConnectionError):
                return await predicate()
            return None

        try:
            return await harness.wait_for(check, timeout, interval=0.2, what=what)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nprometheus log:\n{self.logs()}") from None

    async def crash_loop_rule(self) -> dict[str, Any]:
        data = await self.api("/api/v1/rules", type="alert")
        return next(r for g in data["groups"] for r in g["rules"] if r["name"] == CRASH_LOOP)

    def logs(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@contextlib.contextmanager
def prometheus(tmp: Path, scrape_port: int) -> Iterator[Prometheus]:
    p = Prometheus(tmp, scrape_port)
    try:
        yield p
    finally:
        p.stop()


async def test_a_real_prometheus_sees_the_crash_loop_alert_fire(db_url: str, tmp: Path) -> None:
    async with local_server(db_url, TIMINGS) as srv, machine_daemon(srv.addr, tmp):
        with metrics_http(srv.registry) as port, prometheus(tmp, port) as prom:
            await crash_room(srv.addr)

            async def ready() -> bool:
                return await get(prom.url("/-/ready")) != ""

            await prom.wait("prometheus ready", ready)

            async def scraped() -> bool:
                targets = (await prom.api("/api/v1/targets"))["activeTargets"]
                return bool(targets) and all(t["health"] == "up" for t in targets)

            await prom.wait("the vigil target scraped", scraped)

            # the builder's circuit gauge is in Prometheus, closed, and the rule has
            # evaluated over it: the alert is inactive
            async def closed_circuit_seen() -> bool:
                result = (
                    await prom.api(
                        "/api/v1/query",
                        query='vigil_agent_circuit_open{chatroom="room",role="builder"}',
                    )
                )["result"]
                return [r["value"][1] for r in result] == ["0"]

            await prom.wait("the closed circuit scraped", closed_circuit_seen)
            seen_at = time.time()

            async def evaluated() -> dict[str, Any] | None:
                rule = await prom.crash_loop_rule()
                last = rule["lastEvaluation"]
                return rule if last[:4] != "0001" and _unix(last) > seen_at + 1 else None

            rule = await prom.wait("the crash-loop rule evaluated", evaluated)
            assert rule["health"] == "ok", rule
            assert rule["state"] == "inactive" and rule["alerts"] == [], rule
            alerts = (await prom.api("/api/v1/alerts"))["alerts"]
            assert not [a for a in alerts if a["labels"]["alertname"] == CRASH_LOOP]

            # drive a crash loop: the daemon starts the crashing agent until the
            # circuit opens
            await send(srv.addr, "builder", "crash please")
            started = time.monotonic()
            await wait_circuit_open(srv.addr)
            opened = time.monotonic()
            states = ["inactive"]

            async def firing() -> dict[str, Any] | None:
                rule = await prom.crash_loop_rule()
                if rule["state"] != states[-1]:
                    states.append(rule["state"])
                for a in (await prom.api("/api/v1/alerts"))["alerts"]:
                    if a["labels"]["alertname"] == CRASH_LOOP and a["state"] == "firing":
                        return a
                return None

            alert = await prom.wait("the crash-loop alert firing", firing, timeout=60)
            fired = time.monotonic()
            assert alert["labels"] == {
                "alertname": CRASH_LOOP,
                "chatroom": "room",
                "role": "builder",
                "severity": "warning",
            }
            assert "room/builder" in alert["annotations"]["summary"]
            assert states[0] == "inactive" and states[-1] == "firing", states
            print(
                f"\ncircuit open {opened - started:.1f}s after the task; alert firing "
                f"{fired - opened:.1f}s after that; rule states {states}"
            )

            # every dashboard query runs in the real Prometheus
            for title, ref, expr in queries(dashboard()):
                data = await prom.api("/api/v1/query", query=expr)
                assert data["resultType"] in ("vector", "scalar"), (title, ref)


def _unix(rfc3339: str) -> float:
    """Prometheus's RFC 3339 timestamps (nanoseconds, Z or offset) as a Unix time."""
    from datetime import datetime

    m = re.match(r"(.*?T\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)$", rfc3339)
    assert m, rfc3339
    base = datetime.fromisoformat(m.group(1) + (m.group(3).replace("Z", "+00:00")))
    return base.timestamp() + float(m.group(2) or 0)
