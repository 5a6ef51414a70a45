"""Liveness benchmarks.

kill_to_offline  SIGKILL a real `vigil wait-for-task` process (of a `vigil up`: the
                 command checks its role with the task service); time until the server
                 records it offline (`offline_at`, the server's timestamp) with reason
                 stream_dropped.
heartbeat_load   1,000 participants heartbeating every second on one server process,
                 each with a token of its own, driven by separate load-generator
                 processes; heartbeat ack latency, throughput, database statements per
                 heartbeat, expiries, memory. Measured in the same run on three servers,
                 in interleaved rounds: the real one (this entry), the same with TLS
                 (heartbeat_load_tls), and one that trusts every caller
                 (heartbeat_load_plain); heartbeat_load_auth_cost compares them.
liveness_capacity  one `vigil liveness serve` in the shape users run it: every agent its
                 own client and TCP connection (HTTP/2 keepalive at its defaults), the
                 default heartbeat interval (30 s) and TTL, a token of its own; agents
                 added step by step (1,000, 2,500, 5,000, 10,000), each step measured
                 over one heartbeat interval: the most agents held with heartbeat ack
                 p99 ≤ 100 ms, server RSS per agent, open connections, and kill → offline
                 of agent processes SIGKILLed while loaded. Goal: 10,000 agents.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg

from bench import common
from bench.common import Context, Goal
from vigil import testing as harness
from vigil.v1 import common_pb2
from vigil.v1 import tasks_pb2 as tpb
from vigil.v1 import tasks_pb2_grpc as tpb_grpc

NOTIFY_CHANNEL = "vigil_liveness"
PARTICIPANT_SQL = "SELECT * FROM liveness.participants WHERE chatroom = $1 AND role = $2"

# -- kill_to_offline -------------------------------------------------------------------

KILL_ITERATIONS = 50
# Agents are started in batches and killed one by one once all of them are idle, so no
# agent's start-up (a CPU-heavy Python import on a 2-core machine) runs during a kill.
KILL_BATCH = 5
KILL_SETTLE_S = 0.3  # after the whole batch is live
KILL_SPACING_S = 0.05  # between two kills
# Heartbeats every second and a TTL far away: the TTL can never be what takes them offline.
KILL_ENV = {"VIGIL_HEARTBEAT_INTERVAL_MS": "1000", "VIGIL_HEARTBEAT_TTL_MS": "5000"}
KILL_GOAL = Goal(median_ms=20, p99_ms=100)
KILL_CHATROOM = "bench-kill"


def _kill_role(i: int) -> str:
    return f"r{i:03d}"


async def _wait_all_live(conn: asyncpg.Connection, agents: list[harness.Agent]) -> None:
    roles = [a.role for a in agents]
    deadline = time.monotonic() + 30
    while True:
        rows = await conn.fetch(
            "SELECT role FROM liveness.participants "
            "WHERE chatroom = $1 AND role = ANY($2::text[]) AND status = 'live'",
            KILL_CHATROOM,
            roles,
        )
        if len(rows) == len(roles):
            return
        for a in agents:
            if a.proc.poll() is not None:
                raise RuntimeError(
                    f"agent {a.role} exited {a.proc.returncode} before going live:\n{a.stderr()}"
                )
        if time.monotonic() > deadline:
            live = {r["role"] for r in rows}
            raise RuntimeError(f"agents never went live: {sorted(set(roles) - live)}")
        await asyncio.sleep(0.02)


async def _kill_and_observe(
    conn: asyncpg.Connection, wake: asyncio.Event, agent: harness.Agent
) -> tuple[float, float, str]:
    """SIGKILL the agent; (kill -> offline_at ms, kill -> row seen offline ms, reason)."""
    wake.clear()
    t_kill = time.time()
    os.kill(agent.proc.pid, signal.SIGKILL)
    deadline = time.monotonic() + 15
    while True:
        # Woken by the NOTIFY that every presence change sends; a short timeout is only
        # the safety net in case a notification is missed.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wake.wait(), 0.02)
        wake.clear()
        row = await conn.fetchrow(PARTICIPANT_SQL, KILL_CHATROOM, agent.role)
        if row is not None and row["status"] == "offline":
            t_seen = time.time()
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"{agent.role}: still {row and row['status']} 15 s after SIGKILL")
    agent.proc.wait(5)
    offline_ms = (row["offline_at"].timestamp() - t_kill) * 1000
    return offline_ms, (t_seen - t_kill) * 1000, str(row["offline_reason"])


async def kill_to_offline(ctx: Context) -> dict[str, Any]:
    url = await ctx.new_database()
    # `vigil wait-for-task` checks its chatroom and role with the task service before it
    # joins: the server hosts both services (`vigil up`), the roles exist.
    server = await ctx.start_server(url, KILL_ENV, "kill", args=("up",))
    async with harness.channel(server.addr) as ch:
        await tpb_grpc.TasksStub(ch).CreateChatroom(
            tpb.CreateChatroomRequest(
                name=KILL_CHATROOM,
                roles=[
                    tpb.Role(role=_kill_role(i), kind=common_pb2.AGENT_KIND_CUSTOM)
                    for i in range(KILL_ITERATIONS)
                ],
            )
        )
    agent_env = dict(KILL_ENV)
    conn = await asyncpg.connect(url)
    wake = asyncio.Event()
    await conn.add_listener(NOTIFY_CHANNEL, lambda *_: wake.set())
    latencies: list[float] = []
    visible: list[float] = []
    reasons: Counter[str] = Counter()
    started = time.monotonic()
    meter = common.CpuMeter(ctx, server.proc.pid, {})
    meter.start()
    try:
        while len(latencies) < KILL_ITERATIONS:
            n = min(KILL_BATCH, KILL_ITERATIONS - len(latencies))
            agents = []
            for i in range(n):
                role = _kill_role(len(latencies) + i)
                agent = harness.spawn_agent(
                    server.addr, KILL_CHATROOM, role, ctx.tmp, env=agent_env
                )
                ctx.reaper.add(agent.proc)
                agents.append(agent)
            await _wait_all_live(conn, agents)
            await asyncio.sleep(KILL_SETTLE_S)
            for agent in agents:
                offline_ms, seen_ms, reason = await _kill_and_observe(conn, wake, agent)
                latencies.append(offline_ms)
                visible.append(seen_ms)
                reasons[reason] += 1
                await asyncio.sleep(KILL_SPACING_S)
            ctx.reaper.forget_finished()
        cpu_pct = meter.stop()
        samples = await common.scrape(server.metrics_port)
    except Exception:
        print(f"server log (tail):\n{common.log_tail(server.log)}")
        raise
    finally:
        await conn.close()
        await asyncio.to_thread(ctx.reaper.kill_all)
        await ctx.stop_server(server)
    elapsed = time.monotonic() - started

    detect_n = common.metric(
        samples, "vigil_offline_detection_seconds_count", reason="stream_dropped"
    )
    detect_sum = common.metric(
        samples, "vigil_offline_detection_seconds_sum", reason="stream_dropped"
    )
    commit_ms = detect_sum / detect_n * 1000 if detect_n else None
    visible_summary = common.summarize(visible)
    notes = [
        f"{len(latencies)} SIGKILLs in {elapsed:.1f} s; offline reasons: {dict(reasons)}",
        "kill -> row seen offline by a LISTENing client: median {median_ms} / p90 {p90_ms} / "
        "p99 {p99_ms} / max {max_ms} ms".format(**visible_summary),
    ]
    if commit_ms is not None:
        notes.append(f"server: stream close noticed -> offline committed, mean {commit_ms:.2f} ms")
    notes += common.cpu_notes(cpu_pct)
    return common.result(
        latencies,
        KILL_GOAL,
        checks={"reason stream_dropped": set(reasons) == {"stream_dropped"}},
        notes=notes,
        reasons=dict(reasons),
        visible=visible_summary,
        server_commit_mean_ms=commit_ms,
        cpu_pct=cpu_pct,
        elapsed_s=round(elapsed, 1),
    )


# -- heartbeat_load ----------------------------------------------------------------------

LOAD_PARTICIPANTS = 1000
LOAD_PROCESSES = 2
LOAD_CHANNELS = 10  # per load-generator process
LOAD_SETTLE_S = 3.0  # after everyone joined, before the measured window
LOAD_ENV = {"VIGIL_HEARTBEAT_INTERVAL_MS": "1000", "VIGIL_HEARTBEAT_TTL_MS": "10000"}
LOAD_GOAL = Goal(p99_ms=50)
LOAD_CHATROOM = "bench-load"
FLUSH_SQL_MARK = "last_heartbeat_at = greatest"  # the batched heartbeat UPDATE
# The three servers are measured one after another, in rounds of LOAD_WINDOW_S each, the
# order reversed in the second round (ABC CBA), so that a drift in what else the machine
# does weighs on each alike: 2 x 15 s = 30 s of heartbeats per variant.
LOAD_ROUNDS = (
    (common.PLAIN, common.AUTH, common.TLS),
    (common.TLS, common.AUTH, common.PLAIN),
)
LOAD_WINDOW_S = 15.0


async def _wait_joined(clients: list[tuple[subprocess.Popen[bytes], Path]], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    pending = list(clients)
    while pending:
        for proc, log in list(pending):
            text = log.read_text(errors="replace") if log.exists() else ""
            if "JOINED" in text:
                line = next(x for x in text.splitlines() if x.startswith("JOINED"))
                joined = int(line.split()[1])
                if " errors 0" not in line:
                    raise RuntimeError(f"load client could not join everyone: {line}\n{text}")
                if joined == 0:
                    raise RuntimeError(f"load client joined nobody:\n{text}")
                pending.remove((proc, log))
            elif proc.poll() is not None:
                raise RuntimeError(f"load client exited {proc.returncode}:\n{text}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"load clients did not join within {timeout:.0f} s")
        await asyncio.sleep(0.1)


async def _statement_counts(conn: asyncpg.Connection) -> tuple[int, int]:
    """(heartbeat flush statements, all statements) of this database since the reset."""
    rows = await conn.fetch(
        "SELECT query, calls FROM pg_stat_statements "
        "WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())"
    )
    flush = sum(r["calls"] for r in rows if FLUSH_SQL_MARK in r["query"])
    total = sum(r["calls"] for r in rows if "pg_stat_statements" not in r["query"])
    return flush, total


def _token_files(ctx: Context, tokens: dict[str, str], name: str, roles: list[str]) -> Path:
    """An owner-only file of these roles' tokens, for one load generator."""
    mine = {r: tokens[r] for r in roles}
    return common.write_secret(ctx.tmp / f"{name}.tokens.json", json.dumps(mine))


async def _load_round(ctx: Context, variant: str, round_no: int) -> dict[str, Any]:
    """One server of `variant` with LOAD_PARTICIPANTS heartbeating, measured for
    LOAD_WINDOW_S: the raw figures of the round."""
    url = await ctx.new_database()
    name = f"load-{variant}-{round_no}"
    server = await ctx.start_server(url, LOAD_ENV, name, variant=variant)
    per = LOAD_PARTICIPANTS // LOAD_PROCESSES
    roles = [f"p{i:05d}" for i in range(LOAD_PARTICIPANTS)]
    tokens = await common.role_tokens(url, LOAD_CHATROOM, roles)
    clients: list[tuple[subprocess.Popen[bytes], Path]] = []
    outputs: list[Path] = []
    conn: asyncpg.Connection | None = None
    try:
        t_start = time.monotonic()
        for k in range(LOAD_PROCESSES):
            out = ctx.tmp / f"{name}-{k}.json"
            client_name = f"{name}-client-{k}"
            # Stream i of generator k is participant i * LOAD_PROCESSES + k.
            token_file = _token_files(
                ctx, tokens, client_name, [f"p{i * LOAD_PROCESSES + k:05d}" for i in range(per)]
            )
            cmd = common.python_cmd(
                "bench.load_client",
                "--addr", server.addr,
                "--chatroom", LOAD_CHATROOM,
                "--shard", str(k),
                "--shards", str(LOAD_PROCESSES),
                "--count", str(per),
                "--channels", str(LOAD_CHANNELS),
                "--interval-ms", LOAD_ENV["VIGIL_HEARTBEAT_INTERVAL_MS"],
                "--token-file", str(token_file),
                "--out", str(out),
            )  # fmt: skip
            proc = ctx.spawn(cmd, ctx.client_env(server), client_name)
            clients.append((proc, ctx.tmp / f"{client_name}.log"))
            outputs.append(out)
        await _wait_joined(clients, timeout=90)
        join_s = time.monotonic() - t_start
        await asyncio.sleep(LOAD_SETTLE_S)

        conn = await asyncpg.connect(url)
        if ctx.pg_stat_statements:
            await conn.execute("SELECT pg_stat_statements_reset()")
        m0 = await common.scrape(server.metrics_port, server.ca)
        meter = common.CpuMeter(
            ctx, server.proc.pid, {"load generators": [proc.pid for proc, _ in clients]}
        )
        meter.start()
        t0 = time.time()
        await asyncio.sleep(LOAD_WINDOW_S)
        t1 = time.time()
        cpu_pct = meter.stop()
        m1 = await common.scrape(server.metrics_port, server.ca)
        pss = await _statement_counts(conn) if ctx.pg_stat_statements else None
        rss = common.rss_mb(server.proc.pid)
        status_rows = await conn.fetch(
            "SELECT status, offline_reason, count(*) AS n FROM liveness.participants "
            "WHERE chatroom = $1 GROUP BY status, offline_reason",
            LOAD_CHATROOM,
        )

        for proc, _ in clients:
            proc.send_signal(signal.SIGTERM)
        for proc, log in clients:
            code = await asyncio.to_thread(proc.wait, 30)
            if code != 0:
                raise RuntimeError(f"load client exited {code}:\n{common.log_tail(log)}")
    except Exception:
        print(f"server log (tail):\n{common.log_tail(server.log)}")
        raise
    finally:
        if conn is not None:
            await conn.close()
        for proc, _ in clients:
            if proc.poll() is None:
                proc.kill()
                await asyncio.to_thread(proc.wait, 5)
        await ctx.stop_server(server)

    acks: list[float] = []
    lags: list[float] = []
    not_ok = stream_errors = 0
    errors: list[str] = []
    for out in outputs:
        doc = json.loads(out.read_text())
        for sent, ack, lag in zip(doc["send_wall"], doc["ack_ms"], doc["lag_ms"], strict=True):
            if t0 <= sent < t1:
                acks.append(ack)
                lags.append(lag)
        not_ok += doc["not_ok"]
        stream_errors += doc["stream_error_count"]
        errors += doc["stream_errors"]

    def delta(name: str, **labels: str) -> float:
        return common.metric(m1, name, **labels) - common.metric(m0, name, **labels)

    statuses = {f"{r['status']}/{r['offline_reason'] or '-'}": r["n"] for r in status_rows}
    return {
        "variant": variant,
        "round": round_no,
        "acks": acks,
        "lags": lags,
        "not_ok": not_ok,
        "stream_errors": stream_errors,
        "errors": errors,
        "beats": delta("vigil_heartbeats_total"),
        "statements": delta("vigil_heartbeat_flush_statements_total"),
        "rows": delta("vigil_heartbeat_flush_rows_total"),
        "expired": delta("vigil_participant_offline_total", reason="ttl_expired"),
        "pss": pss,
        "rss": rss,
        "statuses": statuses,
        "live": statuses.get("live/-", 0),
        "streams": common.metric(m1, "vigil_session_streams"),
        "cpu_pct": cpu_pct,
        "window": t1 - t0,
        "join_s": join_s,
    }


def _load_result(variant: str, rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One variant's entry, from its rounds."""
    acks = [x for r in rounds for x in r["acks"]]
    lags = [x for r in rounds for x in r["lags"]]
    window = sum(r["window"] for r in rounds)
    beats = sum(r["beats"] for r in rounds)
    statements = sum(r["statements"] for r in rounds)
    rows_written = sum(r["rows"] for r in rounds)
    expired = sum(r["expired"] for r in rounds)
    not_ok = sum(r["not_ok"] for r in rounds)
    stream_errors = sum(r["stream_errors"] for r in rounds)
    errors = [e for r in rounds for e in r["errors"]]
    live = min(r["live"] for r in rounds)
    rss = max(r["rss"] for r in rounds)
    pss = (
        (sum(r["pss"][0] for r in rounds), sum(r["pss"][1] for r in rounds))
        if all(r["pss"] is not None for r in rounds)
        else None
    )
    cpu_pct = {
        k: round(sum(r["cpu_pct"][k] * r["window"] for r in rounds) / window, 1)
        for k in rounds[0]["cpu_pct"]
    }
    beats_s = beats / window
    stmts_s = statements / window
    per_stmt = beats / statements if statements else float("inf")
    lag = common.summarize(lags)
    per_round = [
        {
            "round": r["round"],
            "window_s": round(r["window"], 2),
            **{
                k: v
                for k, v in common.summarize(r["acks"]).items()
                if k in ("n", "median_ms", "p99_ms")
            },
            "live_at_end": r["live"],
            "statuses_at_end": r["statuses"],
            "cpu_pct": r["cpu_pct"],
            "join_s": round(r["join_s"], 1),
        }
        for r in rounds
    ]
    notes = [
        f"server: {common.DESCRIBE[variant]}",
        f"{len(rounds)} rounds of {LOAD_WINDOW_S:.0f} s (a fresh server and database each, "
        f"interleaved with the other variants' rounds: "
        + " then ".join(", ".join(common.LABEL[v] for v in order) for order in LOAD_ROUNDS)
        + "); per round: "
        + "; ".join(
            f"round {p['round']}: median {p.get('median_ms')} / p99 {p.get('p99_ms')} ms"
            for p in per_round
        ),
        f"each participant authenticates with a chatroom token of its own role, as a "
        f"deployed agent does ({LOAD_PARTICIPANTS} tokens; {LOAD_CHANNELS} connections per "
        "generator process, the streams of a connection sharing it)",
        f"heartbeats/s {beats_s:.0f}, heartbeat DB statements/s {stmts_s:.2f} "
        f"({per_stmt:.0f} beats per statement); rows written/s {rows_written / window:.0f}",
        f"acks measured in the {window:.1f} s of windows: {len(acks)} "
        f"(expected ~{LOAD_PARTICIPANTS * window:.0f}); not OK {not_ok}; "
        f"stream errors {stream_errors}",
        "at the end of each round: "
        + "; ".join(f"{p['live_at_end']}/{LOAD_PARTICIPANTS} live" for p in per_round)
        + f" ({rounds[-1]['statuses']}); open streams {rounds[-1]['streams']:.0f}; "
        f"TTL expiries in the windows {expired:.0f}",
        f"server RSS {rss:.1f} MiB (largest of the rounds)",
        *common.cpu_notes(cpu_pct),
        "generator send lag behind schedule: median {median_ms} / p99 {p99_ms} / "
        "max {max_ms} ms".format(**lag),
        f"{LOAD_PARTICIPANTS} joins ({LOAD_PROCESSES} processes starting included) took "
        + " / ".join(f"{p['join_s']:.1f}" for p in per_round)
        + " s",
    ]
    if pss is not None:
        notes.append(
            f"pg_stat_statements: heartbeat UPDATEs/s {pss[0] / window:.2f}, "
            f"all statements of the database/s {pss[1] / window:.1f} (BEGIN/COMMIT and the "
            "authenticator's token reads included)"
        )
    if errors:
        notes.append(f"stream errors (first): {errors[:3]}")
    return common.result(
        acks,
        LOAD_GOAL,
        checks={
            f"all {LOAD_PARTICIPANTS} live at the end": live == LOAD_PARTICIPANTS,
            "every heartbeat OK": not_ok == 0 and stream_errors == 0,
        },
        notes=notes,
        variant=common.LABEL[variant],
        heartbeats_per_s=round(beats_s, 1),
        heartbeat_db_statements_per_s=round(stmts_s, 3),
        beats_per_statement=round(per_stmt, 1),
        pg_stat_statements_heartbeat_per_s=round(pss[0] / window, 3) if pss else None,
        pg_stat_statements_all_per_s=round(pss[1] / window, 2) if pss else None,
        live_at_end=live,
        statuses_at_end=rounds[-1]["statuses"],
        ttl_expired_in_window=expired,
        server_rss_mb=round(rss, 1),
        cpu_pct=cpu_pct,
        generator_lag=lag,
        window_s=round(window, 2),
        rounds=per_round,
    )


async def heartbeat_load(ctx: Context) -> dict[str, Any]:
    """The real server (auth, plaintext) is this benchmark's entry; the plain and TLS
    variants, measured in the same run, and their comparison are filed beside it."""
    started = time.monotonic()
    rounds: dict[str, list[dict[str, Any]]] = {v: [] for v in common.VARIANTS}
    for k, order in enumerate(LOAD_ROUNDS, 1):
        for variant in order:
            print(f"[liveness] heartbeat_load: round {k}, {common.LABEL[variant]}", flush=True)
            rounds[variant].append(await _load_round(ctx, variant, k))
    elapsed = time.monotonic() - started
    entries = {v: _load_result(v, rounds[v]) for v in common.VARIANTS}
    paired = [
        f"round {k + 1}: auth {common.fmt_pct(common.added_pct(a['median_ms'], p['median_ms']))}, "
        f"auth+TLS {common.fmt_pct(common.added_pct(t['median_ms'], p['median_ms']))}"
        for k, (p, a, t) in enumerate(
            zip(*(entries[v]["rounds"] for v in common.VARIANTS), strict=True)
        )
    ]
    cost = common.auth_cost(
        entries,
        "heartbeat ack at 1,000 participants",
        notes=[
            "median added vs plain per round (a fresh server each): " + "; ".join(paired),
            f"all {len(LOAD_ROUNDS) * len(common.VARIANTS)} rounds took {elapsed:.0f} s",
        ],
    )
    return {
        **entries[common.AUTH],
        common.EXTRA_ENTRIES: {
            "heartbeat_load_plain": entries[common.PLAIN],
            "heartbeat_load_tls": entries[common.TLS],
            "heartbeat_load_auth_cost": cost,
        },
    }


# -- liveness_capacity --------------------------------------------------------------------

# The shape users run: every agent its own client and TCP connection (HTTP/2 keepalive on,
# at its defaults: TTL/3 and TTL/6), the default heartbeat interval and TTL, a token of
# its own; one `vigil liveness serve` process. Agents are added step by step; each step is
# measured over one whole heartbeat interval, so every agent beats once in the window.
CAP_ENV = {"VIGIL_HEARTBEAT_INTERVAL_MS": "30000", "VIGIL_HEARTBEAT_TTL_MS": "60000"}
CAP_STEPS = (1000, 2500, 5000, 10000)
CAP_PER_PROCESS = 1250  # agents per load-generator process (each step adds processes)
CAP_JOIN_CONCURRENCY = 100  # joins in flight per generator process
CAP_SETTLE_S = 3.0
CAP_WINDOW_S = 30.0  # one heartbeat interval: every agent beats once
CAP_ACK_GRACE_S = 1.0  # after the window, for its last acks, before the samples are read
CAP_JOIN_TIMEOUT_S = 150.0
CAP_BUDGET_S = 240.0  # no new step starts after this long
CAP_P99_MS = 100.0
CAP_MIN_RATE = 0.95  # heartbeats/s achieved vs offered, for a step to count as sustained
CAP_GOAL_AGENTS = 10_000
CAP_KILLS = 5  # per step: agent processes holding one participant each, SIGKILLed in the window
CAP_KILL_MAX_MS = 100.0
CAP_CHATROOM = "bench-capacity"
CAP_VICTIM_OFFSET = 900_000  # role numbers of the killed agents (p900000, ...)


def _take_part(path: Path) -> dict[str, Any] | None:
    """A generator's dumped samples (the file is then removed), or None if not there yet."""
    try:
        doc: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    path.unlink()
    return doc


async def _dump_parts(
    clients: list[tuple[subprocess.Popen[bytes], Path]], outs: list[Path], part: list[int]
) -> list[dict[str, Any]]:
    """SIGUSR1 every generator; its samples since the previous dump."""
    for proc, _ in clients:
        proc.send_signal(signal.SIGUSR1)
    docs = []
    deadline = time.monotonic() + 60
    for i, ((proc, log), out) in enumerate(zip(clients, outs, strict=True)):
        part[i] += 1
        path = Path(f"{out}.part{part[i]}")
        while (doc := _take_part(path)) is None:
            if proc.poll() is not None:
                raise RuntimeError(f"load client exited {proc.returncode}:\n{common.log_tail(log)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"load client did not dump its samples: {log}")
            await asyncio.sleep(0.05)
        docs.append(doc)
    return docs


def _joined_line(log: Path) -> tuple[int, int] | None:
    """(joined, join errors) once a generator printed its JOINED line."""
    text = log.read_text(errors="replace") if log.exists() else ""
    for line in text.splitlines():
        if line.startswith("JOINED"):
            parts = line.split()
            return int(parts[1]), int(parts[3])
    return None


async def _wait_joined_counts(
    clients: list[tuple[subprocess.Popen[bytes], Path]], timeout: float
) -> tuple[int, int, bool]:
    """(joined, join errors, every generator reported in time)."""
    deadline = time.monotonic() + timeout
    counts: dict[int, tuple[int, int]] = {}
    while len(counts) < len(clients):
        for i, (proc, log) in enumerate(clients):
            if i in counts:
                continue
            got = _joined_line(log)
            if got is not None:
                counts[i] = got
            elif proc.poll() is not None:
                raise RuntimeError(f"load client exited {proc.returncode}:\n{common.log_tail(log)}")
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    joined = sum(c[0] for c in counts.values())
    errors = sum(c[1] for c in counts.values())
    return joined, errors, len(counts) == len(clients)


async def _kill_victim(
    conn: asyncpg.Connection, wake: asyncio.Event, proc: subprocess.Popen[bytes], role: str
) -> tuple[float, str]:
    """SIGKILL an agent process holding one participant; (kill -> offline_at ms, reason)."""
    wake.clear()
    t_kill = time.time()
    os.kill(proc.pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while True:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wake.wait(), 0.05)
        wake.clear()
        row = await conn.fetchrow(PARTICIPANT_SQL, CAP_CHATROOM, role)
        if row is not None and row["status"] == "offline":
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"{role}: still {row and row['status']} 30 s after SIGKILL")
    await asyncio.to_thread(proc.wait, 5)
    return (row["offline_at"].timestamp() - t_kill) * 1000, str(row["offline_reason"])


def _chunks(add: int) -> list[int]:
    out = [CAP_PER_PROCESS] * (add // CAP_PER_PROCESS)
    if add % CAP_PER_PROCESS:
        out.append(add % CAP_PER_PROCESS)
    return out


async def liveness_capacity(ctx: Context) -> dict[str, Any]:
    url = await ctx.new_database()
    server = await ctx.start_server(url, CAP_ENV, "capacity")
    clients: list[tuple[subprocess.Popen[bytes], Path]] = []
    outs: list[Path] = []
    parts: list[int] = []
    steps: list[dict[str, Any]] = []
    step_acks: list[list[float]] = []
    started = time.monotonic()
    stopped_because = f"reached the last step ({CAP_STEPS[-1]:,})"
    conn = await asyncpg.connect(url)
    wake = asyncio.Event()
    await conn.add_listener(NOTIFY_CHANNEL, lambda *_: wake.set())
    client_env = ctx.client_env(server, CAP_ENV)
    try:
        await asyncio.sleep(1.0)
        rss_idle = common.rss_mb(server.proc.pid)
        participants = 0
        for step_no, target in enumerate(CAP_STEPS):
            if time.monotonic() - started > CAP_BUDGET_S:
                stopped_because = f"time budget ({CAP_BUDGET_S:.0f} s) spent"
                break
            print(f"[liveness] liveness_capacity: {target:,} agents", flush=True)
            new_clients = []
            chunks = _chunks(target - participants)
            t_join = time.monotonic()
            for k, count in enumerate(chunks):
                idx = len(clients)
                out = ctx.tmp / f"capacity-{idx}.json"
                name = f"capacity-client-{idx}"
                offset = participants + sum(chunks[:k])
                roles = [f"p{offset + i:05d}" for i in range(count)]
                tokens = await common.role_tokens(url, CAP_CHATROOM, roles)
                cmd = common.python_cmd(
                    "bench.load_client",
                    "--addr", server.addr,
                    "--chatroom", CAP_CHATROOM,
                    "--shard", "0",
                    "--shards", "1",
                    "--count", str(count),
                    "--own-connections",
                    "--join-concurrency", str(CAP_JOIN_CONCURRENCY),
                    "--interval-ms", CAP_ENV["VIGIL_HEARTBEAT_INTERVAL_MS"],
                    "--join-timeout", str(CAP_JOIN_TIMEOUT_S),
                    "--role-offset", str(offset),
                    "--token-file", str(_token_files(ctx, tokens, name, roles)),
                    "--out", str(out),
                )  # fmt: skip
                proc = ctx.spawn(cmd, client_env, name)
                clients.append((proc, ctx.tmp / f"{name}.log"))
                new_clients.append(clients[-1])
                outs.append(out)
                parts.append(0)
            # The agents killed in this step's window: one participant per process.
            victims: list[tuple[subprocess.Popen[bytes], Path, str]] = []
            v_roles = [f"p{CAP_VICTIM_OFFSET + step_no * 100 + i:05d}" for i in range(CAP_KILLS)]
            v_tokens = await common.role_tokens(url, CAP_CHATROOM, v_roles)
            for i, role in enumerate(v_roles):
                name = f"capacity-victim-{step_no}-{i}"
                cmd = common.python_cmd(
                    "bench.load_client",
                    "--addr", server.addr,
                    "--chatroom", CAP_CHATROOM,
                    "--count", "1",
                    "--own-connections",
                    "--interval-ms", CAP_ENV["VIGIL_HEARTBEAT_INTERVAL_MS"],
                    "--role-offset", str(CAP_VICTIM_OFFSET + step_no * 100 + i),
                    "--token-file", str(_token_files(ctx, v_tokens, name, [role])),
                    "--out", str(ctx.tmp / f"{name}.json"),
                )  # fmt: skip
                proc = ctx.spawn(cmd, client_env, name)
                victims.append((proc, ctx.tmp / f"{name}.log", role))
            joined, join_errors, reported = await _wait_joined_counts(
                new_clients, CAP_JOIN_TIMEOUT_S
            )
            v_joined, _v_errors, _ = await _wait_joined_counts(
                [(p, log) for p, log, _r in victims], 60
            )
            join_s = time.monotonic() - t_join
            added = target - participants
            participants = target
            if not reported or joined < added:
                steps.append(
                    {
                        "participants": target,
                        "joined": joined,
                        "join_errors": join_errors,
                        "join_s": round(join_s, 1),
                        "sustained": False,
                    }
                )
                stopped_because = (
                    f"{target:,} agents: {joined:,} of {added:,} new agents joined "
                    f"({join_errors} errors) within {CAP_JOIN_TIMEOUT_S:.0f} s"
                )
                print(f"[liveness] liveness_capacity: {stopped_because}", flush=True)
                break
            await asyncio.sleep(CAP_SETTLE_S)
            # Discard what the generators sampled while joining.
            await _dump_parts(clients, outs, parts)

            m0 = await common.scrape(server.metrics_port)
            gen_pids = [proc.pid for proc, _ in clients]
            meter = common.CpuMeter(ctx, server.proc.pid, {"load generators": gen_pids})
            meter.start()
            t0 = time.time()

            async def kills(
                victims: list[tuple[subprocess.Popen[bytes], Path, str]] = victims,
            ) -> list[tuple[float, str]]:
                out = []
                for proc, _log, role in victims:
                    await asyncio.sleep(CAP_WINDOW_S / (len(victims) + 1))
                    if proc.poll() is None:
                        out.append(await _kill_victim(conn, wake, proc, role))
                return out

            killing = asyncio.create_task(kills())
            await asyncio.sleep(CAP_WINDOW_S)
            t1 = time.time()
            cpu_pct = meter.stop()
            m1 = await common.scrape(server.metrics_port)
            rss = common.rss_mb(server.proc.pid)
            gen_rss = sum(common.rss_mb(pid) for pid in gen_pids)
            connections = common.tcp_established(server.port)
            killed = await killing
            ctx.reaper.forget_finished()
            await asyncio.sleep(CAP_ACK_GRACE_S)
            docs = await _dump_parts(clients, outs, parts)

            acks: list[float] = []
            lags: list[float] = []
            for doc in docs:
                for sent, ack, lag in zip(
                    doc["send_wall"], doc["ack_ms"], doc["lag_ms"], strict=True
                ):
                    if t0 <= sent < t1:
                        acks.append(ack)
                        lags.append(lag)
            not_ok = sum(d["not_ok"] for d in docs)
            stream_errors = sum(d["stream_error_count"] for d in docs)
            window = t1 - t0

            def delta(name: str, m0: Any = m0, m1: Any = m1, **labels: str) -> float:
                return common.metric(m1, name, **labels) - common.metric(m0, name, **labels)

            beats_s = delta("vigil_heartbeats_total") / window
            expired = delta("vigil_participant_offline_total", reason="ttl_expired")
            ack = common.summarize(acks)
            lag = common.summarize(lags)
            kill_ms = [k[0] for k in killed]
            kill = common.summarize(kill_ms)
            offered = participants / (int(CAP_ENV["VIGIL_HEARTBEAT_INTERVAL_MS"]) / 1000)
            sustained = (
                ack.get("p99_ms", math.inf) <= CAP_P99_MS
                and beats_s >= CAP_MIN_RATE * offered
                and not_ok == 0
                and stream_errors == 0
                and expired == 0
            )
            step = {
                "participants": participants,
                "joined": joined,
                "join_errors": join_errors,
                "join_s": round(join_s, 1),
                "joins_per_s": round(added / join_s, 1),
                "heartbeats_per_s": round(beats_s, 1),
                "heartbeats_offered_per_s": round(offered, 1),
                "acks": ack.get("n", 0),
                "ack_median_ms": ack.get("median_ms"),
                "ack_p90_ms": ack.get("p90_ms"),
                "ack_p99_ms": ack.get("p99_ms"),
                "ack_max_ms": ack.get("max_ms"),
                "generator_lag_p99_ms": lag.get("p99_ms"),
                "server_rss_mb": round(rss, 1),
                "rss_per_agent_kib": round((rss - rss_idle) * 1024 / participants, 1),
                "generators_rss_mb": round(gen_rss, 1),
                "generator_rss_per_agent_kib": round(gen_rss * 1024 / participants, 1),
                "open_connections": connections,
                "open_streams": common.metric(m1, "vigil_session_streams"),
                "kill_to_offline_ms": [round(x, 2) for x in kill_ms],
                "kill_to_offline_median_ms": kill.get("median_ms"),
                "kill_to_offline_max_ms": kill.get("max_ms"),
                "kill_reasons": dict(Counter(k[1] for k in killed)),
                "victims_joined": v_joined,
                "not_ok": not_ok,
                "stream_errors": stream_errors,
                "ttl_expired": expired,
                "generator_processes": len(clients),
                "cpu_pct": cpu_pct,
                "sustained": sustained,
            }
            steps.append(step)
            step_acks.append(acks)
            print(
                f"[liveness] liveness_capacity: {participants:,} agents, {connections:,} "
                f"connections, {beats_s:.0f} beats/s, ack p50 {ack.get('median_ms')} / p99 "
                f"{ack.get('p99_ms')} ms, kill → offline max {kill.get('max_ms')} ms, RSS "
                f"{rss:.0f} MiB ({step['rss_per_agent_kib']} KiB/agent), joins "
                f"{step['joins_per_s']}/s, {'sustained' if sustained else 'NOT sustained'}",
                flush=True,
            )
            if not sustained:
                stopped_because = f"{participants:,} agents not sustained"
                break

        for proc, _ in clients:
            proc.send_signal(signal.SIGTERM)
        for proc, log in clients:
            code = await asyncio.to_thread(proc.wait, 60)
            if code != 0:
                raise RuntimeError(f"load client exited {code}:\n{common.log_tail(log)}")
    except Exception:
        print(f"server log (tail):\n{common.log_tail(server.log)}")
        raise
    finally:
        await conn.close()
        for proc, _ in clients:
            if proc.poll() is None:
                proc.kill()
                await asyncio.to_thread(proc.wait, 5)
        await asyncio.to_thread(ctx.reaper.kill_all)
        await ctx.stop_server(server)
    elapsed = time.monotonic() - started
    return _capacity_result(steps, step_acks, rss_idle, stopped_because, elapsed)


def _capacity_result(
    steps: list[dict[str, Any]],
    step_acks: list[list[float]],
    rss_idle: float,
    stopped_because: str,
    elapsed: float,
) -> dict[str, Any]:
    good = [i for i, st in enumerate(steps) if st["sustained"]]
    best = steps[good[-1]] if good else None
    acks = step_acks[good[-1]] if good else []
    kills_at_best = best["kill_to_offline_ms"] if best else []
    all_kills = [x for st in steps for x in st.get("kill_to_offline_ms", [])]
    interval_s = int(CAP_ENV["VIGIL_HEARTBEAT_INTERVAL_MS"]) / 1000
    notes = [
        f"one `vigil liveness serve` process (one Python process: one core at most); every "
        f"agent a client of its own, its own TCP connection (gRPC use_local_subchannel_pool) "
        f"with HTTP/2 keepalive on at its defaults (time TTL/3, timeout TTL/6) and the health "
        f"check watch every client channel opens, a chatroom token of its own role; default "
        f"heartbeat interval {interval_s:.0f} s and TTL "
        f"{int(CAP_ENV['VIGIL_HEARTBEAT_TTL_MS']) / 1000:.0f} s",
        f"agents added step by step ({', '.join(f'{x:,}' for x in CAP_STEPS)}) by load-"
        f"generator processes of up to {CAP_PER_PROCESS:,} agents each, on the same machine; "
        f"each step measured over {CAP_WINDOW_S:.0f} s, one heartbeat interval, so every "
        "agent's beat falls in the window once (beats spread evenly over the interval)",
        f"a step is sustained when heartbeat ack p99 ≤ {CAP_P99_MS:g} ms, heartbeats/s ≥ "
        f"{CAP_MIN_RATE:.0%} of agents / interval, every beat OK, no stream error and nobody "
        f"expired; stopped: {stopped_because} ({elapsed:.0f} s)",
        f"kill → offline while loaded: in each step's window, {CAP_KILLS} more agent processes "
        "holding one participant each (own connection) are SIGKILLed one by one, spaced over "
        "the window; latency = the server's offline_at - the kill",
        f"server RSS idle {rss_idle:.1f} MiB; RSS per agent = (RSS - idle) / agents; "
        "open connections = TCP connections ESTABLISHED to the server's port",
        f"the load generators compete with the server for the machine's {os.cpu_count()} "
        "cores (and their RSS is on the same machine: see the steps): the figure found is "
        "the machine's (server + generators + PostgreSQL), a floor for a replica on a "
        "machine of its own",
    ]
    for st in steps:
        if "acks" not in st:
            notes.append(
                f"{st['participants']:,} agents: only {st['joined']:,} joined "
                f"({st['join_errors']} errors) in {st['join_s']} s"
            )
            continue
        cpu = st["cpu_pct"]
        notes.append(
            f"{st['participants']:,} agents: {st['open_connections']:,} connections, "
            f"{st['heartbeats_per_s']:.0f} beats/s, ack median {st['ack_median_ms']} / p99 "
            f"{st['ack_p99_ms']} / max {st['ack_max_ms']} ms (n {st['acks']}), kill → offline "
            f"{st['kill_to_offline_ms']} ms, server RSS {st['server_rss_mb']} MiB "
            f"({st['rss_per_agent_kib']} KiB/agent), generators {st['generators_rss_mb']} MiB, "
            f"joins {st['joins_per_s']}/s; CPU % of a core: server {cpu.get('server', 0):.0f}, "
            f"postgres {cpu.get('postgres', 0):.0f}, generators "
            f"{cpu.get('load generators', 0):.0f}, other work {max(0.0, cpu.get('others', 0)):.0f}"
            + (" (NOISY)" if cpu.get("others", 0) > common.NOISY_PCT else "")
            + f"; {'sustained' if st['sustained'] else 'NOT sustained'}"
        )
    if best is not None:
        notes.insert(
            0,
            f"max sustained: {best['participants']:,} agents on {best['open_connections']:,} "
            f"connections, {best['heartbeats_per_s']:.0f} heartbeats/s, ack p50 "
            f"{best['ack_median_ms']} / p99 {best['ack_p99_ms']} ms, "
            f"{best['rss_per_agent_kib']} KiB server RSS per agent, kill → offline max "
            f"{best['kill_to_offline_max_ms']} ms",
        )
    return common.result(
        acks,
        Goal(),
        checks={
            f"≥ {CAP_GOAL_AGENTS:,} agents with ack p99 ≤ {CAP_P99_MS:g} ms": bool(
                best and best["participants"] >= CAP_GOAL_AGENTS
            ),
            f"kill → offline ≤ {CAP_KILL_MAX_MS:g} ms at that load (every kill)": bool(
                kills_at_best and max(kills_at_best) <= CAP_KILL_MAX_MS
            ),
        },
        notes=notes,
        max_agents=best["participants"] if best else 0,
        goal_agents=CAP_GOAL_AGENTS,
        max_heartbeats_per_s=best["heartbeats_per_s"] if best else 0.0,
        rss_per_agent_kib=best["rss_per_agent_kib"] if best else None,
        open_connections=best["open_connections"] if best else 0,
        kill_to_offline=common.summarize(kills_at_best),
        kill_to_offline_all_steps=common.summarize(all_kills),
        heartbeat_interval_ms=int(CAP_ENV["VIGIL_HEARTBEAT_INTERVAL_MS"]),
        server_rss_idle_mb=round(rss_idle, 1),
        steps=steps,
        stopped_because=stopped_because,
        elapsed_s=round(elapsed, 1),
    )


# -- the group --------------------------------------------------------------------------

BENCHMARKS: dict[str, Callable[[Context], Awaitable[dict[str, Any]]]] = {
    "kill_to_offline": kill_to_offline,
    "heartbeat_load": heartbeat_load,
    "liveness_capacity": liveness_capacity,
}


async def run(ctx: Context) -> dict[str, Any]:
    return await common.run_group("liveness", BENCHMARKS, ctx)
