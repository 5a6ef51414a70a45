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
streams_scaling  one server, participants added step by step (500, 1,000, 1,500, ...)
                 until heartbeat ack p99 passes 100 ms: the most streams it sustains, its
                 heartbeats/s, and server RSS per stream (each participant with a token
                 of its own, as in heartbeat_load).
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


# -- streams_scaling ---------------------------------------------------------------------

SCALE_STEPS = (500, 1000, 1500, 2000, 3000, 4000, 6000, 8000, 12000, 16000)
SCALE_PER_PROCESS = 500  # streams per load-generator process (each step adds processes)
SCALE_PER_CHANNEL = 50  # streams per TCP connection
SCALE_SETTLE_S = 3.0
SCALE_WINDOW_S = 10.0
SCALE_ACK_GRACE_S = 1.0  # after the window, for its last acks, before the samples are read
SCALE_BUDGET_S = 150.0  # no new step starts after this long
SCALE_P99_MS = 100.0
SCALE_MIN_RATE = 0.95  # heartbeats/s achieved vs offered, for a step to count as sustained
SCALE_MIN_STREAMS = 1000
SCALE_CHATROOM = "bench-scale"


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


async def streams_scaling(ctx: Context) -> dict[str, Any]:
    url = await ctx.new_database()
    server = await ctx.start_server(url, LOAD_ENV, "scale")
    clients: list[tuple[subprocess.Popen[bytes], Path]] = []
    outs: list[Path] = []
    parts: list[int] = []
    steps: list[dict[str, Any]] = []
    step_acks: list[list[float]] = []
    started = time.monotonic()
    stopped_because = f"reached the last step ({SCALE_STEPS[-1]})"
    try:
        await asyncio.sleep(1.0)
        rss_idle = common.rss_mb(server.proc.pid)
        participants = 0
        for target in SCALE_STEPS:
            if time.monotonic() - started > SCALE_BUDGET_S:
                stopped_because = f"time budget ({SCALE_BUDGET_S:.0f} s) spent"
                break
            print(f"[liveness] streams_scaling: {target} participants", flush=True)
            new_clients = []
            add = target - participants
            chunks = [SCALE_PER_PROCESS] * (add // SCALE_PER_PROCESS)
            if add % SCALE_PER_PROCESS:
                chunks.append(add % SCALE_PER_PROCESS)
            t_join = time.monotonic()
            for k, count in enumerate(chunks):
                idx = len(clients)
                out = ctx.tmp / f"scale-{idx}.json"
                name = f"scale-client-{idx}"
                cmd = common.python_cmd(
                    "bench.load_client",
                    "--addr", server.addr,
                    "--chatroom", SCALE_CHATROOM,
                    "--shard", str(k),
                    "--shards", str(len(chunks)),
                    "--count", str(count),
                    "--channels", str(max(1, count // SCALE_PER_CHANNEL)),
                    "--interval-ms", LOAD_ENV["VIGIL_HEARTBEAT_INTERVAL_MS"],
                    "--join-timeout", "120",
                    "--out", str(out),
                )  # fmt: skip
                # Roles must not collide with the earlier steps' participants.
                offset = participants + sum(chunks[:k])
                cmd += ["--role-offset", str(offset)]
                # Each participant with a token of its own, as in heartbeat_load.
                roles = [f"p{offset + i * len(chunks) + k:05d}" for i in range(count)]
                tokens = await common.role_tokens(url, SCALE_CHATROOM, roles)
                cmd += ["--token-file", str(_token_files(ctx, tokens, name, roles))]
                proc = ctx.spawn(cmd, ctx.client_env(server), name)
                clients.append((proc, ctx.tmp / f"{name}.log"))
                new_clients.append(clients[-1])
                outs.append(out)
                parts.append(0)
            await _wait_joined(new_clients, timeout=150)
            join_s = time.monotonic() - t_join
            participants = target
            await asyncio.sleep(SCALE_SETTLE_S)

            m0 = await common.scrape(server.metrics_port)
            meter = common.CpuMeter(
                ctx, server.proc.pid, {"load generators": [proc.pid for proc, _ in clients]}
            )
            meter.start()
            t0 = time.time()
            await asyncio.sleep(SCALE_WINDOW_S)
            t1 = time.time()
            cpu_pct = meter.stop()
            m1 = await common.scrape(server.metrics_port)
            rss = common.rss_mb(server.proc.pid)
            await asyncio.sleep(SCALE_ACK_GRACE_S)
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
            sustained = (
                ack.get("p99_ms", math.inf) <= SCALE_P99_MS
                and beats_s >= SCALE_MIN_RATE * participants
                and not_ok == 0
                and stream_errors == 0
                and expired == 0
            )
            step = {
                "participants": participants,
                "heartbeats_per_s": round(beats_s, 1),
                "acks": ack.get("n", 0),
                "ack_median_ms": ack.get("median_ms"),
                "ack_p90_ms": ack.get("p90_ms"),
                "ack_p99_ms": ack.get("p99_ms"),
                "ack_max_ms": ack.get("max_ms"),
                "generator_lag_p99_ms": lag.get("p99_ms"),
                "server_rss_mb": round(rss, 1),
                "rss_per_stream_kib": round((rss - rss_idle) * 1024 / participants, 1),
                "open_streams": common.metric(m1, "vigil_session_streams"),
                "not_ok": not_ok,
                "stream_errors": stream_errors,
                "ttl_expired": expired,
                "generator_processes": len(clients),
                "join_s": round(join_s, 1),
                "cpu_pct": cpu_pct,
                "sustained": sustained,
            }
            steps.append(step)
            step_acks.append(acks)
            print(
                f"[liveness] streams_scaling: {participants} participants, "
                f"{beats_s:.0f} beats/s, ack p50 {ack.get('median_ms')} / p99 "
                f"{ack.get('p99_ms')} ms, RSS {rss:.0f} MiB, "
                f"{'sustained' if sustained else 'NOT sustained'}",
                flush=True,
            )
            if not sustained:
                stopped_because = f"{participants} participants not sustained"
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
        for proc, _ in clients:
            if proc.poll() is None:
                proc.kill()
                await asyncio.to_thread(proc.wait, 5)
        await ctx.stop_server(server)
    elapsed = time.monotonic() - started

    good = [i for i, st in enumerate(steps) if st["sustained"]]
    best = steps[good[-1]] if good else None
    acks = step_acks[good[-1]] if good else []
    notes = [
        f"one `vigil liveness serve` process; participants heartbeat every "
        f"{LOAD_ENV['VIGIL_HEARTBEAT_INTERVAL_MS']} ms, added step by step by load-generator "
        f"processes of up to {SCALE_PER_PROCESS} streams ({SCALE_PER_CHANNEL} per connection) "
        f"on the same machine; each step measured over {SCALE_WINDOW_S:.0f} s",
        f"a step is sustained when ack p99 ≤ {SCALE_P99_MS:g} ms, heartbeats/s ≥ "
        f"{SCALE_MIN_RATE:.0%} of participants, every beat OK and nobody expired; "
        f"stopped: {stopped_because} ({elapsed:.0f} s)",
        f"server RSS idle {rss_idle:.1f} MiB; RSS per stream = (RSS - idle) / participants",
        f"the load generators compete with the server for the machine's {os.cpu_count()} "
        "cores: the limit found is the machine's (server + generators), a floor for the "
        "server alone",
    ]
    if best is not None:
        notes.insert(
            0,
            f"max sustained: {best['participants']} streams, {best['heartbeats_per_s']:.0f} "
            f"heartbeats/s, ack p50 {best['ack_median_ms']} / p99 {best['ack_p99_ms']} ms, "
            f"{best['rss_per_stream_kib']} KiB RSS per stream",
        )
    return common.result(
        acks,
        Goal(),
        checks={
            f"≥ {SCALE_MIN_STREAMS} streams with ack p99 ≤ {SCALE_P99_MS:g} ms": bool(
                best and best["participants"] >= SCALE_MIN_STREAMS
            )
        },
        notes=notes,
        max_streams=best["participants"] if best else 0,
        max_heartbeats_per_s=best["heartbeats_per_s"] if best else 0.0,
        rss_per_stream_kib=best["rss_per_stream_kib"] if best else None,
        server_rss_idle_mb=round(rss_idle, 1),
        steps=steps,
        stopped_because=stopped_because,
        elapsed_s=round(elapsed, 1),
    )


# -- the group --------------------------------------------------------------------------

BENCHMARKS: dict[str, Callable[[Context], Awaitable[dict[str, Any]]]] = {
    "kill_to_offline": kill_to_offline,
    "heartbeat_load": heartbeat_load,
    "streams_scaling": streams_scaling,
}


async def run(ctx: Context) -> dict[str, Any]:
    return await common.run_group("liveness", BENCHMARKS, ctx)
