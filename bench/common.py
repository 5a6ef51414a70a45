"""Shared machinery of the benchmarks: the environment (an embedded PostgreSQL, a migrated
template database, child processes that are always reaped), statistics, metrics scraping
and the report."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import math
import os
import platform
import re
import resource
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import grpc
from prometheus_client.parser import text_string_to_metric_families

from vigil import testing as harness
from vigil.core.auth.principal import new_token
from vigil.core.auth.tls import dev_ca
from vigil.core.embedded import EmbeddedPostgres, Postmaster, bin_dir

TEMPLATE = "vigil_bench_template"
RESULTS_DIR = harness.ROOT / "bench" / "results"
PG_STAT_STATEMENTS = "pg_stat_statements"

# -- statistics ----------------------------------------------------------------


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) of sorted values, interpolating between closest ranks."""
    if not sorted_values:
        return math.nan
    pos = (len(sorted_values) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summarize(values_ms: Iterable[float]) -> dict[str, Any]:
    v = sorted(values_ms)
    if not v:
        return {"n": 0}
    return {
        "n": len(v),
        "min_ms": round(v[0], 3),
        "median_ms": round(percentile(v, 50), 3),
        "p90_ms": round(percentile(v, 90), 3),
        "p99_ms": round(percentile(v, 99), 3),
        "max_ms": round(v[-1], 3),
        "mean_ms": round(sum(v) / len(v), 3),
    }


@dataclass(frozen=True)
class Goal:
    """Upper bounds on percentiles of a latency, in milliseconds."""

    median_ms: float | None = None
    p99_ms: float | None = None

    def bounds(self) -> dict[str, float]:
        return {
            k: v
            for k, v in (("median_ms", self.median_ms), ("p99_ms", self.p99_ms))
            if v is not None
        }

    def describe(self) -> str:
        return ", ".join(f"{k.removesuffix('_ms')} ≤ {v:g} ms" for k, v in self.bounds().items())

    def misses(self, summary: Mapping[str, Any]) -> list[str]:
        out = []
        for key, bound in self.bounds().items():
            value = summary.get(key)
            if value is None or value > bound:
                out.append(f"{key.removesuffix('_ms')} {value} ms > {bound:g} ms")
        return out


def result(
    values_ms: Iterable[float],
    goal: Goal,
    checks: Mapping[str, bool] | None = None,
    notes: Sequence[str] = (),
    **extra: Any,
) -> dict[str, Any]:
    """One benchmark's entry in the report: percentiles, goal, pass/fail, the samples
    (for the plots) and extras. `checks` are further conditions of passing (name -> held)."""
    values = list(values_ms)
    summary = summarize(values)
    missed = goal.misses(summary) + [name for name, ok in (checks or {}).items() if not ok]
    goal_text = goal.describe()
    if checks:
        goal_text = "; ".join(x for x in [goal_text, *checks] if x)
    return {
        **summary,
        "goal": goal_text,
        "pass": not missed,
        "missed": missed,
        "notes": list(notes),
        **stored_samples(values),
        **extra,
    }


MAX_STORED_SAMPLES = 10_000


def stored_samples(values_ms: Sequence[float]) -> dict[str, Any]:
    """The samples as kept in the results file: all of them, in measurement order, up to
    MAX_STORED_SAMPLES; beyond that, that many evenly spaced order statistics (sorted),
    which keep the distribution (and its tail) for the plots."""
    if len(values_ms) <= MAX_STORED_SAMPLES:
        return {"samples_ms": [round(x, 3) for x in values_ms]}
    v = sorted(values_ms)
    k = MAX_STORED_SAMPLES
    picked = [v[round(i * (len(v) - 1) / (k - 1))] for i in range(k)]
    return {"samples_ms": [round(x, 3) for x in picked], "samples_thinned_from": len(v)}


# -- processes -------------------------------------------------------------------


class Reaper:
    """Every child process a benchmark starts; all of them end with the run."""

    def __init__(self) -> None:
        self._procs: list[subprocess.Popen[bytes]] = []

    def add(self, proc: subprocess.Popen[bytes]) -> subprocess.Popen[bytes]:
        self._procs.append(proc)
        return proc

    def forget_finished(self) -> None:
        self._procs = [p for p in self._procs if p.poll() is None]

    def kill_all(self, grace: float = 3.0) -> None:
        """SIGTERM every child still running, SIGKILL those still there after `grace`."""
        live = [p for p in self._procs if p.poll() is None]
        for p in live:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for p in live:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(5)
        self._procs.clear()


def rss_mb(pid: int) -> float:
    """Resident set size of a process (VmRSS), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return math.nan


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return ticks / os.sysconf("SC_CLK_TCK")


def cpu_of(pids: Iterable[int]) -> float:
    """CPU seconds of the processes still running among `pids`."""
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError, ValueError, IndexError):
            total += cpu_seconds(pid)
    return total


def machine_busy_seconds() -> float:
    """CPU time the whole machine has been busy since boot (all cores, all processes)."""
    values = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    busy = sum(values[:8]) - values[3] - values[4]  # minus idle and iowait
    return busy / os.sysconf("SC_CLK_TCK")


NOISY_PCT = 25.0  # other work on the machine above this (% of one core) taints a figure


class CpuMeter:
    """Where the machine's CPU went during a measured window, in % of one core: the server,
    PostgreSQL, named groups of our processes, this process with the children it already
    reaped (e.g. killed agents), and everything else (other people's work: noise)."""

    def __init__(self, ctx: Context, server_pid: int, groups: Mapping[str, list[int]]) -> None:
        self._ctx = ctx
        self._server = server_pid
        self._groups = dict(groups)
        self._start: dict[str, float] = {}
        self._t0 = 0.0

    def _snapshot(self) -> dict[str, float]:
        machine = machine_busy_seconds()
        me = resource.getrusage(resource.RUSAGE_SELF)
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        parts = {
            "server": cpu_of([self._server]),
            "postgres": cpu_of(self._ctx.postgres_pids()),
            **{name: cpu_of(pids) for name, pids in self._groups.items()},
            "bench": me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime,
        }
        return {**parts, "others": machine - sum(parts.values()), "machine": machine}

    def start(self) -> None:
        self._t0 = time.monotonic()
        self._start = self._snapshot()

    def stop(self) -> dict[str, float]:
        end = self._snapshot()
        elapsed = max(1e-9, time.monotonic() - self._t0)
        return {k: round((end[k] - self._start[k]) / elapsed * 100, 1) for k in end}


def cpu_notes(pct: Mapping[str, float]) -> list[str]:
    parts = ", ".join(f"{k} {v:.0f}" for k, v in pct.items() if k not in ("others", "machine"))
    notes = [
        f"CPU, % of one core: {parts}; everything else on the machine {pct['others']:.0f} "
        f"(machine busy {pct['machine']:.0f} of {(os.cpu_count() or 1) * 100})"
    ]
    if pct["others"] > NOISY_PCT:
        notes.append(
            f"NOISY: other work used {pct['others']:.0f}% of a core meanwhile; "
            "tail latencies are pessimistic"
        )
    return notes


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# -- metrics ---------------------------------------------------------------------


def _sample_key(name: str, labels: Mapping[str, str]) -> str:
    if not labels:
        return name
    return name + "{" + ",".join(f"{k}={v}" for k, v in sorted(labels.items())) + "}"


def scrape_sync(port: int, ca: Path | None = None) -> dict[str, float]:
    """A server's /metrics as {'name{label=value,...}': value} (over HTTPS, verified with
    `ca`, when the server serves TLS)."""
    if ca is None:
        url, context = f"http://127.0.0.1:{port}/metrics", None
    else:
        url, context = f"https://127.0.0.1:{port}/metrics", ssl.create_default_context(cafile=ca)
    with urllib.request.urlopen(url, timeout=5, context=context) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[_sample_key(s.name, s.labels)] = s.value
    return out


async def scrape(port: int, ca: Path | None = None) -> dict[str, float]:
    return await asyncio.to_thread(scrape_sync, port, ca)


def metric(samples: Mapping[str, float], name: str, **labels: str) -> float:
    return samples.get(_sample_key(name, labels), 0.0)


# -- server variants: what authentication and TLS cost ------------------------------------

PLAIN = "plain"
AUTH = "auth"
TLS = "tls"
VARIANTS = (PLAIN, AUTH, TLS)
LABEL = {PLAIN: "plain", AUTH: "auth", TLS: "auth+TLS"}
DESCRIBE = {
    PLAIN: "bench.plain_server: the same server with an authenticator that trusts every "
    "caller and looks nothing up (for measurement only), plaintext",
    AUTH: "the real server: every call's bearer token checked, plaintext (as deployed on loopback)",
    TLS: "the real server with --tls-cert/--tls-key (development CA, ECDSA P-256): bearer "
    "tokens checked, every client verifying it with VIGIL_TLS_CA",
}
# Of a median, what authentication (or authentication and TLS) may add to the plain
# server's: the goal of the *_auth_cost entries.
COST_GOAL_PCT = 10.0
# A benchmark returns its other entries (e.g. the variants it measured in the same run)
# under this key; run_group files them beside it.
EXTRA_ENTRIES = "extra_entries"


@dataclass
class Server(harness.ServerProcess):
    """A server process of one variant; `ca` is its certificate's CA when it serves TLS
    (its clients and /metrics scrapes verify it)."""

    variant: str = AUTH
    ca: Path | None = None


@dataclass(frozen=True)
class TlsFiles:
    ca: Path
    cert: Path
    key: Path


_SERVING = re.compile(rb"serving .* on [^ ]+:(\d+) \([^;)]*; metrics https?://[^:]+:(\d+)/")


def _start_plain_server(services: str, env: Mapping[str, str], log: Path) -> Server:
    """`python -m bench.plain_server SERVICES` in the log's folder, as the harness starts
    `vigil` (it accepts a made-up bootstrap admin token, known to the harness's clients
    by address, so that every variant's clients send the same credentials)."""
    env = dict(env)
    token = env.setdefault("VIGIL_BOOTSTRAP_TOKEN", new_token()[1])
    with log.open("wb") as out:
        proc = subprocess.Popen(
            python_cmd("bench.plain_server", services),
            env=env,
            cwd=log.parent,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        m = _SERVING.search(log.read_bytes())
        if m:
            server = Server(proc, int(m.group(1)), int(m.group(2)), log, PLAIN)
            harness.ADMIN_TOKENS[server.addr] = token
            return server
        if proc.poll() is not None:
            raise RuntimeError(f"plain server exited {proc.returncode}:\n{log.read_text()}")
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"plain server did not start:\n{log.read_text()}")


def channel(server: Server, token: str | None = None) -> grpc.aio.Channel:
    """A raw channel to `server` as its admin (or with `token`), as `harness.channel`
    makes one, over TLS (verified with the server's CA) when the server serves TLS."""
    if server.ca is None:
        return harness.channel(server.addr, token)
    token = harness.ADMIN_TOKENS.get(server.addr) if token is None else token
    creds = grpc.ssl_channel_credentials(root_certificates=server.ca.read_bytes())
    return grpc.aio.secure_channel(
        server.addr, creds, interceptors=harness.bearer_interceptors(token)
    )


async def role_tokens(url: str, chatroom: str, roles: Sequence[str]) -> dict[str, str]:
    """A chatroom token scoped to each role, as each deployed agent holds a credential
    of its own, written straight into auth.tokens (as CreateToken stores it: id, hash of
    the secret); role -> bearer token."""
    rows = []
    tokens = {}
    for role in roles:
        token_id, token, digest = new_token()
        rows.append((token_id, digest, "chatroom", f"bench {role}", chatroom, role, "bench"))
        tokens[role] = token
    conn = await asyncpg.connect(url)
    try:
        await conn.copy_records_to_table(
            "tokens",
            schema_name="auth",
            records=rows,
            columns=["id", "secret_sha256", "kind", "name", "chatroom", "role", "created_by"],
        )
    finally:
        await conn.close()
    return tokens


def write_secret(path: Path, text: str) -> Path:
    """An owner-only file (tokens never travel on a command line)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path


def fmt_pct(pct: float | None) -> str:
    return "-" if pct is None else f"{pct:+.1f} %"


def added_pct(value: float | None, base: float | None) -> float | None:
    if value is None or not base:
        return None
    return round((value - base) / base * 100, 1)


def auth_cost(
    entries: Mapping[str, Mapping[str, Any]], what: str, notes: Sequence[str] = ()
) -> dict[str, Any]:
    """The entry comparing one benchmark's variants (variant -> its result): medians and
    p99 of each, and what authentication (and TLS) add to the plain server's median,
    against COST_GOAL_PCT."""
    plain = entries[PLAIN]
    figures = {
        LABEL[v]: {k: entries[v].get(k) for k in ("n", "median_ms", "p90_ms", "p99_ms")}
        for v in VARIANTS
    }
    added_median = {
        LABEL[v]: added_pct(entries[v].get("median_ms"), plain.get("median_ms"))
        for v in (AUTH, TLS)
    }
    added_p99 = {
        LABEL[v]: added_pct(entries[v].get("p99_ms"), plain.get("p99_ms")) for v in (AUTH, TLS)
    }
    checks = {
        f"{label} adds ≤ {COST_GOAL_PCT:g} % to the plain median": pct is not None
        and pct <= COST_GOAL_PCT
        for label, pct in added_median.items()
    }
    missed = [
        f"{label} adds {fmt_pct(pct)} to the plain median (goal ≤ {COST_GOAL_PCT:g} %)"
        if pct is not None
        else f"{label}: no median"
        for label, pct in added_median.items()
        if pct is None or pct > COST_GOAL_PCT
    ]
    lines = [
        f"{LABEL[v]}: median {entries[v].get('median_ms')} ms, p99 {entries[v].get('p99_ms')} ms"
        + (
            ""
            if v == PLAIN
            else f" ({fmt_pct(added_median[LABEL[v]])} median, {fmt_pct(added_p99[LABEL[v]])} "
            "p99 vs plain)"
        )
        + f", n {entries[v].get('n')}"
        for v in VARIANTS
    ]
    return {
        "what": what,
        "goal": "; ".join(checks),
        "pass": not missed,
        "missed": missed,
        "notes": [*lines, *notes],
        "servers": {LABEL[v]: DESCRIBE[v] for v in VARIANTS},
        "variants": figures,
        "added_median_pct": added_median,
        "added_p99_pct": added_p99,
        "goal_added_median_pct": COST_GOAL_PCT,
    }


# -- the environment ---------------------------------------------------------------


@dataclass
class Context:
    """What every benchmark group gets: a PostgreSQL with a migrated template, a scratch
    directory, and the reaper of child processes."""

    admin_url: str
    template: str
    tmp: Path
    reaper: Reaper
    pg_stat_statements: bool
    postmaster_pid: int
    only: set[str] = field(default_factory=set)  # benchmark names to run; empty: all
    _tls: TlsFiles | None = field(default=None, repr=False)

    def tls_files(self) -> TlsFiles:
        """A development CA and a certificate for 127.0.0.1 (made once per run)."""
        if self._tls is None:
            folder = self.tmp / "tls"
            dev_ca(folder, hosts=("127.0.0.1",))
            self._tls = TlsFiles(folder / "ca.pem", folder / "server.pem", folder / "server.key")
        return self._tls

    def postgres_pids(self) -> list[int]:
        """The postmaster and its backends (as of now)."""
        import psutil

        try:
            children = psutil.Process(self.postmaster_pid).children(recursive=True)
        except psutil.Error:
            return [self.postmaster_pid]
        return [self.postmaster_pid, *(c.pid for c in children)]

    async def new_database(self) -> str:
        url = await harness.create_database_from(self.admin_url, self.template)
        if self.pg_stat_statements:
            conn = await asyncpg.connect(url)
            try:
                await conn.execute(f"CREATE EXTENSION IF NOT EXISTS {PG_STAT_STATEMENTS}")
            finally:
                await conn.close()
        return url

    async def start_server(
        self,
        url: str,
        env: Mapping[str, str],
        name: str,
        args: Sequence[str] = ("liveness", "serve"),
        variant: str = AUTH,
    ) -> Server:
        """`vigil ARGS` (default `vigil liveness serve`; `("up",)` hosts every service) as a
        child process on loopback ports picked by the OS: the real server (AUTH), the
        same with TLS (TLS), or `bench.plain_server`, which trusts every caller (PLAIN)."""
        extra = {
            "DATABASE_URL": url,
            "VIGIL_ADDR": "127.0.0.1:0",
            "VIGIL_METRICS_ADDR": "127.0.0.1:0",
            **env,
        }
        log = self.tmp / f"server-{name}.log"
        if variant == PLAIN:
            services = "up" if tuple(args) == ("up",) else "liveness"
            if tuple(args) not in (("up",), ("liveness", "serve")):
                raise ValueError(f"no plain server for vigil {' '.join(args)}")
            env_plain = harness.child_env(extra)
            server = await asyncio.to_thread(_start_plain_server, services, env_plain, log)
            self.reaper.add(server.proc)
            return server
        ca = None
        if variant == TLS:
            tls = self.tls_files()
            ca = tls.ca
            args = [*args, "--tls-cert", str(tls.cert), "--tls-key", str(tls.key)]
            # The task service follows the liveness service over the same TLS.
            extra["VIGIL_TLS_CA"] = str(tls.ca)
        elif variant != AUTH:
            raise ValueError(f"unknown server variant {variant!r}")
        started = await asyncio.to_thread(
            harness.start_server_process, list(args), harness.child_env(extra), log
        )
        self.reaper.add(started.proc)
        return Server(started.proc, started.port, started.metrics_port, started.log, variant, ca)

    def client_env(self, server: Server, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """The environment of a client process of `server`: its address (so the harness
        adds its admin token unless `extra` names a token), and its CA under TLS."""
        env = {"VIGIL_ADDR": server.addr, **(extra or {})}
        if server.ca is not None:
            env["VIGIL_TLS_CA"] = str(server.ca)
        return harness.child_env(env)

    async def stop_server(self, server: harness.ServerProcess) -> None:
        try:
            await asyncio.to_thread(server.stop, signal.SIGTERM, 15)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            await asyncio.to_thread(server.proc.wait, 5)

    def spawn(
        self, args: Sequence[str], env: Mapping[str, str], name: str
    ) -> subprocess.Popen[bytes]:
        """A child process whose stdout and stderr go to a log file in the scratch dir."""
        log = (self.tmp / f"{name}.log").open("wb")
        try:
            proc = subprocess.Popen(list(args), env=dict(env), stdout=log, stderr=subprocess.STDOUT)
        finally:
            log.close()
        return self.reaper.add(proc)


def _pg_stat_statements_available() -> bool:
    return (bin_dir().parent / "lib" / f"{PG_STAT_STATEMENTS}.so").exists()


def _start_postgres(root: Path) -> tuple[EmbeddedPostgres, str, bool]:
    """A throwaway embedded PostgreSQL; pg_stat_statements preloaded when the wheel has
    it (it counts the statements the server really runs)."""
    pss = _pg_stat_statements_available()
    # Room for several servers' pools beside procrastinate's (bench/throughput.py).
    settings = {"max_connections": "400"}
    if pss:
        settings["shared_preload_libraries"] = PG_STAT_STATEMENTS
    server = EmbeddedPostgres(root, settings)
    url = server.start()
    return server, url, pss


# -- durability ---------------------------------------------------------------------

# The settings that make a commit durable; the bench runs with PostgreSQL's defaults
# (both on), as users do. Recorded with every entry (`postgres`), and shown in the report.
DURABLE = {"fsync": "on", "synchronous_commit": "on"}
SHOWN_SETTINGS = ("fsync", "synchronous_commit", "full_page_writes", "wal_sync_method")


async def postgres_settings(url: str) -> dict[str, str]:
    """What a new connection to `url` gets for SHOWN_SETTINGS."""
    conn = await asyncpg.connect(url)
    try:
        return {k: str(await conn.fetchval(f"SHOW {k}")) for k in SHOWN_SETTINGS}
    finally:
        await conn.close()


def is_durable(settings: Mapping[str, Any] | None) -> bool:
    return settings is not None and all(settings.get(k) == v for k, v in DURABLE.items())


async def make_durable(admin_url: str) -> dict[str, str]:
    """PostgreSQL's own defaults for fsync and synchronous_commit (on): any ALTER SYSTEM
    override removed and the configuration reloaded (a benchmark that switched them,
    e.g. bench/throughput.py's `_durable` on its way out, is undone). Returns the settings
    a new connection then gets; raises if they are not durable within 10 s."""
    conn = await asyncpg.connect(admin_url)
    try:
        for k in DURABLE:
            await conn.execute(f"ALTER SYSTEM RESET {k}")
        await conn.execute("SELECT pg_reload_conf()")
    finally:
        await conn.close()
    deadline = time.monotonic() + 10
    while True:
        now = await postgres_settings(admin_url)
        if is_durable(now):
            return now
        if time.monotonic() > deadline:
            raise RuntimeError(f"PostgreSQL did not return to durable settings: {now}")
        await asyncio.sleep(0.05)


def write_json(path: str | Path, doc: Any) -> None:
    """`doc` to `path`, whole or not at all (a benchmark reads it once its writer ends)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f)
    os.replace(tmp, path)


def filesystem(path: Path) -> str:
    """The file system holding `path` (type and device), from /proc/self/mounts."""
    best = ("", "?", "?")
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mounts").read_text().splitlines():
            dev, mount, fstype, *_ = line.split()
            if str(path.resolve()).startswith(mount) and len(mount) >= len(best[0]):
                best = (mount, fstype, dev)
    return f"{best[1]} on {best[2]}"


def describe_postgres(settings: Mapping[str, Any] | None) -> str:
    """'durable (fsync on, synchronous_commit on, ...)', or the mode, labelled."""
    if not settings:
        return "NOT DURABLE (settings not recorded: a run before durable benchmarks, fsync off)"
    shown = ", ".join(f"{k} {v}" for k, v in settings.items() if k in SHOWN_SETTINGS)
    return f"durable ({shown})" if is_durable(settings) else f"NOT DURABLE ({shown})"


# -- processes' limits and connections ------------------------------------------------


def raise_nofile() -> tuple[int, int]:
    """Raise this process's open-file limit to its hard limit (children inherit it);
    returns (soft, hard) as now set."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def tcp_established(port: int) -> int:
    """TCP connections ESTABLISHED whose local port is `port` (a server's accepted
    connections), from /proc/net/tcp and tcp6."""
    n = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "01" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    n += 1
    return n


@contextlib.asynccontextmanager
async def environment() -> AsyncIterator[Context]:
    """An embedded PostgreSQL in a temporary directory with a migrated template, with
    PostgreSQL's durable defaults (fsync, synchronous_commit on); on exit, every child
    process is ended, PostgreSQL stopped and its data deleted."""
    tmp = Path(tempfile.mkdtemp(prefix="vigil-bench-"))
    reaper = Reaper()
    atexit.register(reaper.kill_all)  # even when the loop dies without running `finally`
    server: EmbeddedPostgres | None = None
    try:
        started, url, pss = await asyncio.to_thread(_start_postgres, tmp)
        server = started
        # Durable, as users run it: the figures include what a commit costs on this disk.
        await make_durable(url)
        await harness.create_template(url, TEMPLATE)
        pm = Postmaster.read(started.pgdata)
        assert pm is not None
        yield Context(url, TEMPLATE, tmp, reaper, pss, pm.pid)
    finally:
        await asyncio.to_thread(reaper.kill_all)
        if server is not None:
            await asyncio.to_thread(server.stop)
        shutil.rmtree(tmp, ignore_errors=True)


# -- the report ----------------------------------------------------------------------


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _memory_gib() -> float | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    return None


def machine_info() -> dict[str, Any]:
    return {
        "cores": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "memory_gib": _memory_gib(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.1f}" if value >= 100 else f"{value:.2f}"
    return "-" if value is None else str(value)


def print_table(results: Mapping[str, Mapping[str, Any]]) -> None:
    header = ("benchmark", "n", "median ms", "p90 ms", "p99 ms", "max ms", "goal", "result")
    rows = []
    for name, r in results.items():
        verdict = "BROKEN" if "error" in r else "pass" if r.get("pass") else "MISSED"
        rows.append(
            (
                name,
                _fmt(r.get("n")),
                _fmt(r.get("median_ms")),
                _fmt(r.get("p90_ms")),
                _fmt(r.get("p99_ms")),
                _fmt(r.get("max_ms")),
                str(r.get("goal", "")),
                verdict,
            )
        )
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=False)]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    print()
    print(line.format(*header))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print(line.format(*row))
    for name, r in results.items():
        notes = r.get("notes") or []
        if "error" in r:
            notes = [*notes, f"BROKEN: {r['error']}"]
        if notes or r.get("missed"):
            print(f"\n{name}:")
            for n in notes:
                print(f"  {n}")
            for m in r.get("missed") or []:
                print(f"  MISSED: {m}")
    print()


# Benchmarks that no longer exist (their last entries are dropped from the results file):
# streams_scaling (1 s beats, 50 streams per connection) became liveness_capacity.
RETIRED = ("streams_scaling",)


def write_results(results: Mapping[str, Any], path: Path) -> None:
    """Update `path` with these results: benchmarks not run this time keep their last
    entry (each entry carries its own date)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        doc = json.loads(path.read_text())
    machine = machine_info()
    for name in RETIRED:
        doc.pop(name, None)
    for name, r in results.items():
        doc[name] = {**r, "date": machine["date"]}
    doc["machine"] = machine
    path.write_text(dumps(doc))


_NUMBER_LIST = re.compile(r"\[\s*(-?[0-9][-+0-9.eE]*(?:,\s*-?[0-9][-+0-9.eE]*)*)\s*\]")


def dumps(doc: Any) -> str:
    """Indented JSON with lists of numbers (the samples) on one line each."""
    text = json.dumps(doc, indent=2)
    one_line = _NUMBER_LIST.sub(
        lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]", text
    )
    return one_line + "\n"


def python_cmd(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


async def run_group(
    group: str,
    benchmarks: dict[str, Callable[[Context], Awaitable[dict[str, Any]]]],
    ctx: Context,
) -> dict[str, Any]:
    """Run a group's benchmarks (those in ctx.only, if given); a benchmark that breaks
    is recorded as an error and the group goes on. A benchmark may return further
    entries (its variants) under EXTRA_ENTRIES; they are filed beside it."""
    results: dict[str, Any] = {}
    for name, bench in benchmarks.items():
        # A variant's entry (e.g. heartbeat_load_tls) is measured by its benchmark.
        if ctx.only and not any(o == name or o.startswith(f"{name}_") for o in ctx.only):
            continue
        print(f"[{group}] {name} ...", flush=True)
        t = time.monotonic()
        try:
            # Every benchmark starts durable (whatever the previous one left), and its
            # entries record the settings they ran with.
            settings = await make_durable(ctx.admin_url)
            settings["data directory on"] = filesystem(ctx.tmp)
            entry = await bench(ctx)
            extra = entry.pop(EXTRA_ENTRIES, {})
            results[name] = entry
            results.update(extra)
            for r in (entry, *extra.values()):
                r.setdefault("postgres", settings)
        except Exception as exc:
            traceback.print_exc()
            results[name] = {"error": f"{type(exc).__name__}: {exc}", "pass": False}
        print(f"[{group}] {name} done in {time.monotonic() - t:.1f} s", flush=True)
    return results
