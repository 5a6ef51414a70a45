"""Task throughput: Vigil side by side with procrastinate (a Python job queue on
PostgreSQL), on the same machine, the same PostgreSQL, the same concurrency and the same
durability, in one run.

task_throughput                Vigil, one `vigil up`, agents on long-lived sessions: tasks/s
                               end to end against procrastinate's jobs/s (goal: ratio ≥ 1),
                               and statements per lifecycle (goal ≤ 10)
task_throughput_procrastinate  procrastinate: jobs/s and defers/s
task_throughput_sessions_2r    Vigil, two `vigil up` replicas on one database, long-lived
task_throughput_oneshot        Vigil, one `vigil up`, one-shot agents (as wait-for-task)
task_throughput_oneshot_2r     the same on two replicas

Every round is TASKS tasks (jobs) sent by SENDERS concurrent senders in this process and
worked by WORKERS concurrent agents (workers) that do nothing but finish them:

- procrastinate: WORKER_PROCS `procrastinate worker` processes (bench.procrastinate_worker,
  `App.run_worker_async`, concurrency WORKERS / WORKER_PROCS each, LISTEN/NOTIFY on) on
  one queue; the senders `defer_async` through one app (a psycopg pool of SENDERS
  connections). A job: defer, fetch, run (a no-op), finish.
- Vigil: WORKERS custom roles in one chatroom, one agent per role (a role works on one
  task at a time), AGENT_PROCS processes of bench.throughput_agent, each agent with its
  own client and TCP connection and the chatroom token of its role; the senders are
  SENDERS clients (connections) of their own, as the admin, spreading the tasks over the
  roles. A lifecycle: send, claim, start, complete.

tasks/s = TASKS / (last completion - just before the first send), the completion time as
the database recorded it (procrastinate's `succeeded` event, Vigil's completed_at);
sends/s = TASKS / (last send answered - just before the first send). Each round is
checked: every task (job) sent once, completed once (one claim, start and complete each;
one start and success event each), by exactly one agent (worker), nothing left over.

PostgreSQL runs durable (fsync and synchronous_commit on, its defaults, as for the whole
bench; checked again on the benchmark's own connections to each database).
Statements per lifecycle: pg_stat_statements over a round, reset just before it, for
the system's database only, the benchmark's own statements excluded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import statistics
import subprocess
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg

from bench import common
from bench.common import Context, Goal
from vigil import testing as harness
from vigil.client import Client
from vigil.core.vocab import TaskStatus, TokenKind
from vigil.v1 import common_pb2
from vigil.v1 import tasks_pb2 as tpb

TASKS = 1_000  # per measured round
WORKERS = 20  # procrastinate's worker concurrency / Vigil's agents (one role each)
SENDERS = 20
WORKER_PROCS = 1  # procrastinate worker processes (WORKERS / WORKER_PROCS jobs at a time each)
AGENT_PROCS = 4  # Vigil agent processes (WORKERS / AGENT_PROCS agents each)
WARMUP = 2 * WORKERS  # tasks of an unmeasured round first (connections, prepared statements)
# Measured rounds: procrastinate and Vigil on long-lived sessions (one and two replicas)
# take turns, as do one-shot agents on one and two replicas; medians are reported.
ROUNDS = 5  # medians of 5: a round on this shared machine varies by ±15 %
ONESHOT_ROUNDS = 1
ROUND_TIMEOUT_S = 180.0
POLL_S = 0.05
READY_TIMEOUT_S = 60.0
RATIO_GOAL = 1.0  # Vigil (long-lived sessions, one server) / procrastinate, tasks/s
STATEMENTS_GOAL = 10.0  # per lifecycle, Vigil long-lived sessions
CHATROOM = "bench-throughput"
ROLES = [f"a{k:02d}" for k in range(WORKERS)]
UP = ("up",)
# Production heartbeats (the defaults; the harness's are 200 ms), and a pending timeout
# no round comes near.
VIGIL_ENV = {
    "VIGIL_HEARTBEAT_INTERVAL_MS": "30000",
    "VIGIL_HEARTBEAT_TTL_MS": "60000",
    "VIGIL_TASK_PENDING_TIMEOUT_MS": "600000",
}
DURABLE = {"fsync": "on", "synchronous_commit": "on"}
SHOWN_SETTINGS = (
    "fsync",
    "synchronous_commit",
    "full_page_writes",
    "wal_sync_method",
    "commit_delay",
    "wal_level",
    "shared_buffers",
)
PROCRASTINATE_DB = "procrastinate_bench"
BENCH_MARK = "/* bench */"  # the benchmark's own statements (not counted)

P = "procrastinate"
S1 = "sessions"
S2 = "sessions_2r"
O1 = "oneshot"
O2 = "oneshot_2r"
ENTRY = {
    P: "task_throughput_procrastinate",
    S1: "task_throughput",
    S2: "task_throughput_sessions_2r",
    O1: "task_throughput_oneshot",
    O2: "task_throughput_oneshot_2r",
}
LABEL = {
    P: "procrastinate",
    S1: "Vigil, long-lived sessions, 1 server",
    S2: "Vigil, long-lived sessions, 2 replicas",
    O1: "Vigil, one-shot agents, 1 server",
    O2: "Vigil, one-shot agents, 2 replicas",
}


# -- one round ---------------------------------------------------------------------------


@dataclass
class Round:
    """One round of `n` tasks (jobs) through one system."""

    name: str
    n: int
    elapsed_s: float  # just before the first send -> the last completion (database time)
    sends_s: float  # just before the first send -> the last send answered
    latencies_ms: list[float]  # per task: sent (database time) -> completed
    statements: list[tuple[str, int]] | None  # (query, calls) in the system's database
    cpu_pct: dict[str, float]
    problems: list[str]
    detected_s: float  # until the poller saw every task done (an upper bound)

    @property
    def tasks_per_s(self) -> float:
        return self.n / self.elapsed_s

    @property
    def sends_per_s(self) -> float:
        return self.n / self.sends_s

    @property
    def statement_count(self) -> int | None:
        return None if self.statements is None else sum(c for _q, c in self.statements)


async def _statements(conn: asyncpg.Connection) -> list[tuple[str, int]]:
    """What others ran in this connection's database since the last reset, (query,
    calls), most called first: the benchmark's own statements (marked) excluded."""
    rows = await conn.fetch(
        f"{BENCH_MARK} SELECT query, calls FROM pg_stat_statements "
        "WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())"
    )
    theirs = [
        (r["query"], r["calls"])
        for r in rows
        if "pg_stat_statements" not in r["query"] and BENCH_MARK not in r["query"]
    ]
    return sorted(theirs, key=lambda x: -x[1])


def _spread(n: int, senders: int) -> list[range]:
    """Task indexes 0..n-1 in `senders` contiguous runs (sender k sends run k in order)."""
    per, extra = divmod(n, senders)
    out, lo = [], 0
    for k in range(senders):
        hi = lo + per + (k < extra)
        out.append(range(lo, hi))
        lo = hi
    return out


def _alive(procs: Sequence[subprocess.Popen[bytes]], what: str, logs: Sequence[Path]) -> None:
    for proc, log in zip(procs, logs, strict=True):
        if proc.poll() is not None:
            raise RuntimeError(
                f"{what} {proc.pid} exited {proc.returncode}:\n{common.log_tail(log)}"
            )


async def _wait_files(
    paths: Sequence[Path],
    procs: Sequence[subprocess.Popen[bytes]],
    logs: Sequence[Path],
    what: str,
    timeout: float,
) -> None:
    deadline = time.monotonic() + timeout
    while not all(p.exists() for p in paths):
        _alive(procs, what, logs)
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not ready within {timeout:.0f} s")
        await asyncio.sleep(0.05)


async def _stop_procs(
    procs: Sequence[subprocess.Popen[bytes]], outs: Sequence[Path], logs: Sequence[Path], what: str
) -> list[dict[str, Any]]:
    """SIGTERM each, wait, and read what each wrote to its out file."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    docs = []
    for p, out, log in zip(procs, outs, logs, strict=True):
        try:
            code = await asyncio.to_thread(p.wait, 30)
        except subprocess.TimeoutExpired:
            p.kill()
            raise RuntimeError(f"{what} {p.pid} did not stop:\n{common.log_tail(log)}") from None
        if code != 0 or not out.exists():
            raise RuntimeError(f"{what} {p.pid} exited {code}:\n{common.log_tail(log)}")
        docs.append(json.loads(out.read_text()))
    return docs


class System:
    """A system under measurement, started once and measured round after round."""

    name: str
    ctx: Context
    conn: asyncpg.Connection  # the benchmark's connection to the system's database
    procs: list[subprocess.Popen[bytes]]
    logs: list[Path]
    outs: list[Path]
    cpu_groups: dict[str, list[int]]
    rounds: list[Round]
    checks: dict[str, bool]
    facts: list[str]

    async def send_all(self, label: int, n: int) -> list[str]:
        """Send round `label`'s n tasks from SENDERS concurrent senders; their ids."""
        raise NotImplementedError

    async def done_count(self, label: int) -> int:
        raise NotImplementedError

    async def verify(self, label: int, sent: list[str]) -> tuple[float, list[float], list[str]]:
        """(last completion, epoch seconds; per-task latencies; problems) of round `label`."""
        raise NotImplementedError

    def alive(self) -> None:
        _alive(self.procs, f"{self.name} process", self.logs)

    async def round(self, label: int, n: int, measured: bool = True) -> Round:
        if self.ctx.pg_stat_statements:
            await self.conn.execute("SELECT pg_stat_statements_reset()")
        meter = common.CpuMeter(self.ctx, 0, self.cpu_groups)  # pid 0: no single server
        meter.start()
        t0 = time.time()
        sent = await self.send_all(label, n)
        sends_s = time.time() - t0
        deadline = time.monotonic() + ROUND_TIMEOUT_S
        while (done := await self.done_count(label)) < n:
            self.alive()
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{self.name} round {label}: {done}/{n} done after {ROUND_TIMEOUT_S:.0f} s"
                )
            await asyncio.sleep(POLL_S)
        detected_s = time.time() - t0
        cpu = meter.stop()
        statements = await _statements(self.conn) if self.ctx.pg_stat_statements else None
        end, latencies, problems = await self.verify(label, sent)
        if len(set(sent)) != n:
            problems.append(f"{n - len(set(sent))} duplicate ids among the sends")
        r = Round(self.name, n, end - t0, sends_s, latencies, statements, cpu, problems, detected_s)
        if measured:
            self.rounds.append(r)
        print(
            f"  {self.name} round {label}: {r.tasks_per_s:.1f} tasks/s, {r.sends_per_s:.1f} "
            f"sends/s{'' if measured else ' (warm-up)'}"
            + (f", {r.statement_count / n:.1f} statements each" if r.statement_count else "")
            + (f"; PROBLEMS: {'; '.join(problems)}" if problems else ""),
            flush=True,
        )
        return r

    async def stop(self) -> None:
        raise NotImplementedError


# -- procrastinate -------------------------------------------------------------------------


class Procrastinate(System):
    def __init__(self, ctx: Context) -> None:
        self.name = P
        self.ctx = ctx
        self.procs, self.logs, self.outs = [], [], []
        self.rounds, self.checks, self.facts = [], {}, []
        self.deferred: list[tuple[int, int]] = []  # (round, n) of every job deferred
        self.app: Any = None
        self.task: Any = None

    async def start(self) -> None:
        from bench import procrastinate_worker as pw

        admin = await asyncpg.connect(self.ctx.admin_url)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{PROCRASTINATE_DB}"')
            await admin.execute(f'CREATE DATABASE "{PROCRASTINATE_DB}"')
        finally:
            await admin.close()
        self.url = harness.with_database(self.ctx.admin_url, PROCRASTINATE_DB)
        self.conn = await asyncpg.connect(self.url)
        if self.ctx.pg_stat_statements:
            await self.conn.execute(f"CREATE EXTENSION IF NOT EXISTS {common.PG_STAT_STATEMENTS}")
        self.app = pw.make_app(self.url, SENDERS)
        await self.app.open_async()
        await self.app.schema_manager.apply_schema_async()
        self.task = self.app.tasks[pw.TASK_NAME]
        per = WORKERS // WORKER_PROCS
        env = harness.child_env({"DATABASE_URL": self.url})
        for k in range(WORKER_PROCS):
            out = self.ctx.tmp / f"procrastinate-worker-{k}.json"
            self.outs.append(out)
            self.logs.append(self.ctx.tmp / f"procrastinate-worker-{k}.log")
            cmd = common.python_cmd(
                "bench.procrastinate_worker",
                "--name", f"bench-{k}",
                "--concurrency", str(per),
                "--out", str(out),
            )  # fmt: skip
            self.procs.append(self.ctx.spawn(cmd, env, f"procrastinate-worker-{k}"))
        # Ready: each worker registered (it listens right after).
        deadline = time.monotonic() + READY_TIMEOUT_S
        while await self.conn.fetchval(
            f"{BENCH_MARK} SELECT count(*) FROM procrastinate_workers"
        ) < len(self.procs):
            self.alive()
            if time.monotonic() > deadline:
                raise RuntimeError("procrastinate workers not registered in time")
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)  # their LISTEN
        self.cpu_groups = {"workers": [p.pid for p in self.procs]}
        self.facts.append(
            f"procrastinate {_version('procrastinate')} (psycopg {_version('psycopg')}, "
            f"{_psycopg_impl()} implementation), {WORKER_PROCS} worker process(es) "
            f"x concurrency {per} (a psycopg pool of {per} connections each, LISTEN/NOTIFY)"
        )

    async def send_all(self, label: int, n: int) -> list[str]:
        ids: list[str] = []

        async def sender(part: range) -> None:
            for i in part:
                ids.append(str(await self.task.defer_async(round=label, n=i)))

        await asyncio.gather(*(sender(part) for part in _spread(n, SENDERS)))
        self.deferred += [(label, i) for i in range(n)]
        return ids

    async def done_count(self, label: int) -> int:
        n: int = await self.conn.fetchval(
            f"{BENCH_MARK} SELECT count(*) FROM procrastinate_jobs "
            "WHERE (args->>'round')::int = $1 AND status = 'succeeded'",
            label,
        )
        return n

    async def verify(self, label: int, sent: list[str]) -> tuple[float, list[float], list[str]]:
        rows = await self.conn.fetch(
            f"{BENCH_MARK} SELECT j.id, j.status::text AS status, j.attempts, "
            "count(*) FILTER (WHERE e.type = 'started') AS started, "
            "count(*) FILTER (WHERE e.type = 'succeeded') AS succeeded, "
            "count(*) FILTER (WHERE e.type NOT IN ('deferred', 'started', 'succeeded')) "
            "AS other, min(e.at) FILTER (WHERE e.type = 'deferred') AS sent_at, "
            "max(e.at) FILTER (WHERE e.type = 'succeeded') AS done_at "
            "FROM procrastinate_jobs j LEFT JOIN procrastinate_events e ON e.job_id = j.id "
            "WHERE (j.args->>'round')::int = $1 GROUP BY j.id",
            label,
        )
        problems = []
        ids = {str(r["id"]) for r in rows}
        if ids != set(sent):
            problems.append(f"jobs of the round {len(ids)}, deferred {len(set(sent))}")
        bad = [
            r
            for r in rows
            if r["status"] != "succeeded"
            or r["attempts"] != 1
            or r["started"] != 1
            or r["succeeded"] != 1
            or r["other"]
        ]
        if bad:
            problems.append(f"{len(bad)} jobs not run exactly once and succeeded (e.g. {bad[0]})")
        end = max(r["done_at"] for r in rows).timestamp()
        lat = [(r["done_at"] - r["sent_at"]).total_seconds() * 1000 for r in rows]
        return end, lat, problems

    async def stop(self) -> None:
        try:
            docs = await _stop_procs(self.procs, self.outs, self.logs, "procrastinate worker")
            ran = Counter(tuple(x) for d in docs for x in d["executed"])
            twice = sum(1 for c in ran.values() if c > 1)
            missing = len(set(self.deferred) - set(ran))
            unknown = len(set(ran) - set(self.deferred))
            self.checks["every job run by exactly one worker, once"] = (
                twice == missing == unknown == 0
            )
            self.facts.append(
                f"the workers ran {sum(ran.values())} jobs ({len(self.deferred)} deferred in "
                f"all rounds): twice {twice}, never {missing}, not deferred {unknown}"
            )
        finally:
            if self.app is not None:
                await self.app.close_async()
            await self.conn.close()


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


def _psycopg_impl() -> str:
    import psycopg

    return str(psycopg.pq.__impl__)


# -- Vigil -----------------------------------------------------------------------------------

OWN_CONNECTION = (("grpc.use_local_subchannel_pool", 1),)
AGENT_TRIGGERS = {"claimTask", "startTask", "completeTask"}
ALLOWED_TRIGGERS = AGENT_TRIGGERS | {"promoteNextTask"}  # queued behind its role's task


class Vigil(System):
    def __init__(self, ctx: Context, name: str, mode: str, replicas: int) -> None:
        self.name = name
        self.ctx = ctx
        self.mode = mode
        self.replicas = replicas
        self.procs, self.logs, self.outs = [], [], []
        self.rounds, self.checks, self.facts = [], {}, []
        self.servers: list[common.Server] = []
        self.senders: list[Client] = []
        self.sent_ids: list[str] = []
        self.triggers: Counter[str] = Counter()

    def alive(self) -> None:
        super().alive()
        for s in self.servers:
            _alive([s.proc], "server", [s.log])

    async def start(self) -> None:
        self.url = await self.ctx.new_database()
        self.conn = await asyncpg.connect(self.url)
        env = dict(VIGIL_ENV)
        for k in range(self.replicas):
            server = await self.ctx.start_server(self.url, env, f"throughput-{self.name}-{k}", UP)
            self.servers.append(server)
            # Every replica accepts the same admin token (the first one registered it).
            env["VIGIL_BOOTSTRAP_TOKEN"] = harness.ADMIN_TOKENS[server.addr]
        addrs = ",".join(s.addr for s in self.servers)
        admin = harness.ADMIN_TOKENS[self.servers[0].addr]
        config = replace(harness.client_config(addrs, admin), channel_options=OWN_CONNECTION)
        self.senders = [Client(config) for _ in range(SENDERS)]
        tokens = {}
        async with Client(config) as client:
            await client.wait_ready()
            await client.create_chatroom(
                CHATROOM,
                [tpb.Role(role=r, kind=common_pb2.AGENT_KIND_CUSTOM) for r in ROLES],
            )
            for r in ROLES:
                reply = await client.create_token(
                    TokenKind.CHATROOM, f"bench {r}", chatroom=CHATROOM, role=r
                )
                tokens[r] = reply.secret
        token_file = common.write_secret(
            self.ctx.tmp / f"tokens-{self.name}.json", json.dumps(tokens)
        )
        child = harness.child_env({"VIGIL_ADDR": addrs, **VIGIL_ENV})
        per = len(ROLES) // AGENT_PROCS
        ready = []
        for k in range(AGENT_PROCS):
            roles = ROLES[k * per : (k + 1) * per] if k < AGENT_PROCS - 1 else ROLES[k * per :]
            name = f"agents-{self.name}-{k}"
            ready.append(self.ctx.tmp / f"{name}.ready")
            self.outs.append(self.ctx.tmp / f"{name}.json")
            self.logs.append(self.ctx.tmp / f"{name}.log")
            cmd = common.python_cmd(
                "bench.throughput_agent",
                "--mode", self.mode,
                "--chatroom", CHATROOM,
                "--roles", ",".join(roles),
                "--tokens", str(token_file),
                "--ready", str(ready[-1]),
                "--out", str(self.outs[-1]),
            )  # fmt: skip
            self.procs.append(self.ctx.spawn(cmd, child, name))
        await _wait_files(ready, self.procs, self.logs, "agents", READY_TIMEOUT_S)
        for c in self.senders:
            await c.wait_ready()
        self.cpu_groups = {
            "servers": [s.proc.pid for s in self.servers],
            "agents": [p.pid for p in self.procs],
        }
        self.facts.append(
            f"{self.replicas} `vigil up` process(es) on one database"
            + (
                " (clients given both addresses, VIGIL_ADDR=A,B: gRPC round-robin per call, "
                "a stream stays on the replica it opened on)"
                if self.replicas > 1
                else ""
            )
            + f"; {len(ROLES)} agents ({self.mode}) in {AGENT_PROCS} processes, each with "
            "its own client, connection and chatroom token of its role; senders as the admin"
        )

    async def send_all(self, label: int, n: int) -> list[str]:
        ids: list[str] = []

        async def sender(client: Client, part: range) -> None:
            for i in part:
                task = await client.send(CHATROOM, ROLES[i % len(ROLES)], f"r{label} t{i}")
                ids.append(task.id)

        parts = _spread(n, SENDERS)
        await asyncio.gather(*(sender(c, p) for c, p in zip(self.senders, parts, strict=True)))
        self.sent_ids += ids
        return ids

    async def done_count(self, label: int) -> int:
        n: int = await self.conn.fetchval(
            f"{BENCH_MARK} SELECT count(*) FROM tasks.tasks WHERE text LIKE $1 AND status = $2",
            f"r{label} t%",
            TaskStatus.COMPLETED.value,
        )
        return n

    async def verify(self, label: int, sent: list[str]) -> tuple[float, list[float], list[str]]:
        rows = await self.conn.fetch(
            f"{BENCH_MARK} SELECT t.id::text AS id, t.status, t.recoveries, t.created_at, "
            "t.completed_at, array_agg(x.trigger ORDER BY x.id) AS triggers "
            "FROM tasks.tasks t LEFT JOIN tasks.transitions x ON x.task_id = t.id "
            "WHERE t.text LIKE $1 GROUP BY t.id",
            f"r{label} t%",
        )
        problems = []
        ids = {r["id"] for r in rows}
        if ids != set(sent):
            problems.append(f"tasks of the round {len(ids)}, sent {len(set(sent))}")
        bad = []
        triggers: Counter[str] = Counter()
        for r in rows:
            seen = Counter(t for t in r["triggers"] if t is not None)
            triggers.update(seen)
            once = all(seen[t] == 1 for t in AGENT_TRIGGERS)
            if (
                r["status"] != TaskStatus.COMPLETED.value
                or r["recoveries"]
                or not once
                or set(seen) - ALLOWED_TRIGGERS
            ):
                bad.append(r)
        if bad:
            problems.append(
                f"{len(bad)} tasks not claimed, started and completed exactly once "
                f"(e.g. {dict(bad[0])})"
            )
        if label > 0:
            self.triggers.update(triggers)
        end = max(r["completed_at"] for r in rows).timestamp()
        lat = [_ms(r["completed_at"], r["created_at"]) for r in rows]
        return end, lat, problems

    async def stop(self) -> None:
        try:
            docs = await _stop_procs(self.procs, self.outs, self.logs, "agent process")
            done = Counter(t[0] for d in docs for tasks in d["done"].values() for t in tasks)
            twice = sum(1 for c in done.values() if c > 1)
            missing = len(set(self.sent_ids) - set(done))
            unknown = len(set(done) - set(self.sent_ids))
            self.checks["every task completed by exactly one agent, once"] = (
                twice == missing == unknown == 0
            )
            self.facts.append(
                "transitions of the measured rounds' tasks: "
                + ", ".join(f"{k} {v}" for k, v in sorted(self.triggers.items()))
            )
            self.facts.append(
                f"the agents completed {sum(done.values())} tasks ({len(self.sent_ids)} sent "
                f"in all rounds): twice {twice}, never {missing}, not sent {unknown}"
            )
            left = await self.conn.fetchval(
                f"{BENCH_MARK} SELECT count(*) FROM tasks.tasks WHERE status <> $1",
                TaskStatus.COMPLETED.value,
            )
            self.checks["no task left unfinished"] = left == 0
        finally:
            for c in self.senders:
                await c.close()
            await self.conn.close()
            for s in self.servers:
                await self.ctx.stop_server(s)


def _ms(a: datetime, b: datetime) -> float:
    return (a - b).total_seconds() * 1000


# -- durability ---------------------------------------------------------------------------


async def _settings(url: str) -> dict[str, str]:
    """The settings a new connection to `url`'s database gets (as every connection of
    the systems, opened after them, does), and any per-database or per-role override."""
    conn = await asyncpg.connect(url)
    try:
        out = {k: await conn.fetchval(f"SHOW {k}") for k in SHOWN_SETTINGS}
        overrides = await conn.fetch(f"{BENCH_MARK} SELECT setconfig FROM pg_db_role_setting")
        out["per-database/role overrides"] = (
            "; ".join(str(r["setconfig"]) for r in overrides) or "none"
        )
        return out
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def _durable(ctx: Context) -> AsyncIterator[None]:
    """fsync and synchronous_commit on (PostgreSQL's defaults) for the block, checked."""
    await common.make_durable(ctx.admin_url)
    now = await _settings(ctx.admin_url)
    if any(now[k] != v for k, v in DURABLE.items()):
        raise RuntimeError(f"PostgreSQL is not durable: {now}")
    yield


async def _wal_fsyncs(ctx: Context) -> float | None:
    """WAL fsyncs PostgreSQL counted so far (pg_stat_io, PostgreSQL 18), or None."""
    conn = await asyncpg.connect(ctx.admin_url)
    try:
        value = await conn.fetchval(
            f"{BENCH_MARK} SELECT sum(fsyncs) FROM pg_stat_io WHERE object = 'wal'"
        )
        return None if value is None else float(value)
    except asyncpg.PostgresError:
        return None
    finally:
        await conn.close()


# -- the benchmark ------------------------------------------------------------------------


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def _figures(s: System) -> dict[str, Any]:
    rounds = s.rounds
    per_lc = [r.statement_count / r.n for r in rounds if r.statement_count is not None and r.n]
    return {
        "tasks_per_s": _round1(_median([r.tasks_per_s for r in rounds])),
        "sends_per_s": _round1(_median([r.sends_per_s for r in rounds])),
        "statements_per_lifecycle": _round1(_median(per_lc)),
        "rounds": [
            {
                "tasks": r.n,
                "tasks_per_s": round(r.tasks_per_s, 1),
                "sends_per_s": round(r.sends_per_s, 1),
                "elapsed_s": round(r.elapsed_s, 3),
                "detected_s": round(r.detected_s, 3),
                "statements_per_lifecycle": None
                if r.statement_count is None
                else round(r.statement_count / r.n, 2),
                "cpu_pct": r.cpu_pct,
                "problems": r.problems,
            }
            for r in rounds
        ],
    }


def _round1(x: float | None) -> float | None:
    return None if x is None else round(x, 1)


def _top_statements(rounds: Sequence[Round], k: int = 8) -> str:
    total: Counter[str] = Counter()
    n = 0
    for r in rounds:
        if r.statements is None:
            continue
        n += r.n
        for q, c in r.statements:
            total[" ".join(q.split())[:90]] += c
    if not n:
        return "-"
    return "; ".join(f"{c / n:.2f} x `{q}`" for q, c in total.most_common(k))


def _send_statements(rounds: Sequence[Round]) -> str | None:
    """How the measured rounds' sends reached the database: statements that sent one
    task and statements that sent several (the server's group commit), from
    pg_stat_statements; None for a system without them (procrastinate)."""
    one = many = n = 0
    for r in rounds:
        if r.statements is None:
            continue
        n += r.n
        for q, c in r.statements:
            if "tasks.send_tasks(" in q:
                many += c
            elif "tasks.send_task(" in q:
                one += c
    if not n or not (one or many):
        return None
    return (
        f"sends: {one + many:,} statements for {n:,} sends ({one:,} of one send, {many:,} "
        f"of several: the server's group commit), {n / (one + many):.1f} sends a statement"
    )


def _cpu_line(rounds: Sequence[Round]) -> str:
    if not rounds:
        return ""
    keys = [k for k in rounds[0].cpu_pct if k != "machine"]
    mean = {k: statistics.mean(r.cpu_pct.get(k, 0.0) for r in rounds) for k in keys}
    machine = statistics.mean(r.cpu_pct.get("machine", 0.0) for r in rounds)
    return (
        "CPU while measured (mean of the rounds), % of one core: "
        + ", ".join(f"{k} {v:.0f}" for k, v in mean.items())
        + f"; machine busy {machine:.0f} of 200"
    )


def _entry(
    s: System,
    base: System | None,
    goal_checks: Mapping[str, bool],
    notes: Sequence[str],
    **extra: Any,
) -> dict[str, Any]:
    fig = _figures(s)
    round_problems = [p for r in s.rounds for p in r.problems]
    checks = {
        **goal_checks,
        f"every round's {TASKS:,} tasks completed exactly once": not round_problems,
        **s.checks,
    }
    ratio = None
    if base is not None and base.rounds and fig["tasks_per_s"]:
        base_rate = _figures(base)["tasks_per_s"]
        ratio = round(fig["tasks_per_s"] / base_rate, 2) if base_rate else None
    lines = [
        f"{LABEL[s.name]}: {fig['tasks_per_s']} tasks/s, {fig['sends_per_s']} sends/s "
        f"(medians of {len(s.rounds)} round(s) of {TASKS:,}; per round "
        + ", ".join(f"{r.tasks_per_s:.1f}" for r in s.rounds)
        + " tasks/s)"
        + (f"; Vigil / procrastinate = {ratio}" if ratio is not None else ""),
        *s.facts,
        *notes,
        f"statements per lifecycle (pg_stat_statements, top-level, its database): "
        f"{fig['statements_per_lifecycle']}; most called: {_top_statements(s.rounds)}"
        if fig["statements_per_lifecycle"] is not None
        else "statements not counted (pg_stat_statements unavailable)",
        *([line] if (line := _send_statements(s.rounds)) else []),
        _cpu_line(s.rounds),
        *[f"round problem: {p}" for p in round_problems],
    ]
    if any(r.cpu_pct.get("others", 0) > common.NOISY_PCT for r in s.rounds):
        lines.append("NOISY: other work on the machine during a round")
    return common.result(
        [x for r in s.rounds for x in r.latencies_ms],
        Goal(),
        checks=checks,
        notes=lines,
        system=LABEL[s.name],
        ratio_to_procrastinate=ratio,
        **fig,
        **extra,
    )


async def _schedule(plan: Sequence[System], rounds: int) -> None:
    """`rounds` measured rounds of each system, taking turns (the order rotating)."""
    for k in range(rounds):
        order = list(plan[k % len(plan) :]) + list(plan[: k % len(plan)])
        for s in order:
            await s.round(k + 1, TASKS)


async def task_throughput(ctx: Context) -> dict[str, Any]:
    try:
        import procrastinate  # noqa: F401
    except ImportError:
        raise RuntimeError(
            "procrastinate is not installed: pip install -c requirements.lock -e '.[bench]'"
        ) from None
    started = time.monotonic()
    systems: dict[str, System] = {}
    settings: dict[str, dict[str, str]] = {}
    fsyncs0 = await _wal_fsyncs(ctx)
    try:
        async with _durable(ctx):
            prc = Procrastinate(ctx)
            systems[P] = prc
            await prc.start()
            s1 = Vigil(ctx, S1, "session", 1)
            systems[S1] = s1
            await s1.start()
            s2 = Vigil(ctx, S2, "session", 2)
            systems[S2] = s2
            await s2.start()
            settings[P] = await _settings(prc.url)
            settings["Vigil"] = await _settings(s1.url)
            for s in (prc, s1, s2):
                await s.round(0, WARMUP, measured=False)
            await _schedule([prc, s1, s2], ROUNDS)
            for name in (P, S1, S2):
                await systems.pop(name).stop()
            o1 = Vigil(ctx, O1, "oneshot", 1)
            systems[O1] = o1
            await o1.start()
            o2 = Vigil(ctx, O2, "oneshot", 2)
            systems[O2] = o2
            await o2.start()
            for s in (o1, o2):
                await s.round(0, WARMUP, measured=False)
            await _schedule([o1, o2], ONESHOT_ROUNDS)
            for name in (O1, O2):
                await systems.pop(name).stop()
    except Exception:
        for left in systems.values():
            for log in left.logs:
                print(f"{log.name} (tail):\n{common.log_tail(log)}")
            if isinstance(left, Vigil):
                for server in left.servers:
                    print(f"{server.log.name} (tail):\n{common.log_tail(server.log)}")
        raise
    finally:
        for left in systems.values():
            with contextlib.suppress(Exception):
                await left.stop()
        await asyncio.to_thread(ctx.reaper.kill_all)
    await asyncio.sleep(1.1)  # PostgreSQL's I/O statistics are flushed about once a second
    fsyncs1 = await _wal_fsyncs(ctx)
    elapsed = time.monotonic() - started
    return _results(prc, s1, s2, o1, o2, settings, fsyncs0, fsyncs1, elapsed, ctx)


def _results(
    prc: Procrastinate,
    s1: Vigil,
    s2: Vigil,
    o1: Vigil,
    o2: Vigil,
    settings: Mapping[str, Mapping[str, str]],
    fsyncs0: float | None,
    fsyncs1: float | None,
    elapsed: float,
    ctx: Context,
) -> dict[str, Any]:
    shown = ", ".join(f"{k} {v}" for k, v in settings[P].items())
    same = all(settings[P][k] == settings["Vigil"][k] for k in SHOWN_SETTINGS)
    lifecycles = sum(r.n for s in (prc, s1, s2, o1, o2) for r in s.rounds) + 5 * WARMUP
    durability = [
        f"PostgreSQL durable for this benchmark: {shown} (SHOW on new connections to both "
        f"databases{', identical' if same else ', DIFFERENT: ' + str(dict(settings))}); data "
        f"directory on {common.filesystem(ctx.tmp)}",
        "WAL fsyncs over the benchmark (pg_stat_io): "
        + (
            f"{fsyncs1 - fsyncs0:.0f}, {(fsyncs1 - fsyncs0) / lifecycles:.2f} per task or job"
            if fsyncs0 is not None and fsyncs1 is not None
            else "not available"
        ),
    ]
    method = [
        f"{TASKS:,} tasks per round from {SENDERS} concurrent senders (this process, each "
        f"sender {TASKS // SENDERS} in a row), {WORKERS} concurrent workers/agents doing "
        "nothing but finishing them; tasks/s = tasks / (last completion as the database "
        "recorded it - just before the first send), sends/s = tasks / (last send answered - "
        "just before the first send); latency columns: each task's sent → completed "
        "(database times)",
        f"one unmeasured warm-up round of {WARMUP} first; long-lived rounds taken in turns "
        f"with procrastinate (rotating order), {ROUNDS} each; one-shot: {ONESHOT_ROUNDS} "
        "each, one and two replicas in turns",
        f"2 cores shared by everything: PostgreSQL, the server(s) or workers, the agents, "
        f"the senders; the whole benchmark took {elapsed:.0f} s",
    ]
    fp, f1 = _figures(prc), _figures(s1)
    ratio = (
        round(f1["tasks_per_s"] / fp["tasks_per_s"], 2)
        if f1["tasks_per_s"] and fp["tasks_per_s"]
        else None
    )
    stmts = f1["statements_per_lifecycle"]
    main = _entry(
        s1,
        prc,
        {
            f"Vigil / procrastinate tasks/s ≥ {RATIO_GOAL:g}": ratio is not None
            and ratio >= RATIO_GOAL,
            f"statements per lifecycle ≤ {STATEMENTS_GOAL:g}": stmts is not None
            and stmts <= STATEMENTS_GOAL,
        },
        [*method, *durability],
        procrastinate_jobs_per_s=fp["tasks_per_s"],
        procrastinate_defers_per_s=fp["sends_per_s"],
        side_by_side={
            name: {
                "label": LABEL[name],
                **{k: v for k, v in _figures(s).items() if k != "rounds"},
                "ratio_to_procrastinate": _ratio(s, prc),
                "rounds": len(s.rounds),
            }
            for name, s in ((P, prc), (S1, s1), (S2, s2), (O1, o1), (O2, o2))
        },
        durability=dict(settings[P]),
        goal_ratio=RATIO_GOAL,
        goal_statements_per_lifecycle=STATEMENTS_GOAL,
        elapsed_s=round(elapsed, 1),
    )
    main["ratio_to_procrastinate"] = ratio
    extra = {
        ENTRY[P]: _entry(prc, None, {}, [*method, *durability]),
        ENTRY[S2]: _entry(s2, prc, {}, [f"1 server: {f1['tasks_per_s']} tasks/s"]),
        ENTRY[O1]: _entry(o1, prc, {}, []),
        ENTRY[O2]: _entry(o2, prc, {}, [f"1 server: {_figures(o1)['tasks_per_s']} tasks/s"]),
    }
    return {**main, common.EXTRA_ENTRIES: extra}


def _ratio(s: System, base: System) -> float | None:
    a, b = _figures(s)["tasks_per_s"], _figures(base)["tasks_per_s"]
    return round(a / b, 2) if a and b else None


BENCHMARKS: dict[str, Callable[[Context], Awaitable[dict[str, Any]]]] = {
    "task_throughput": task_throughput,
}


async def run(ctx: Context) -> dict[str, Any]:
    return await common.run_group("throughput", BENCHMARKS, ctx)
