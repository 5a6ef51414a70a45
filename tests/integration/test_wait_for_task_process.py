"""`vigil wait-for-task` as a real process: killed, stopped, signalled, superseded,
broken; its participant always tells the truth."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from vigil import testing as harness
from vigil.testing import local_server, spawn_agent

# Spawns real processes (servers, agents, daemons, the CLI): not in `make test-fast`.
pytestmark = pytest.mark.slow

TIMINGS = harness.fast_timings()
TTL = TIMINGS.heartbeat_ttl


async def _wait_exit(agent: harness.Agent, timeout: float = 10) -> int:
    # Never block the loop: the in-process server must keep answering the leave.
    return await asyncio.to_thread(agent.proc.wait, timeout)


async def test_sigkill_is_offline_at_once_as_stream_dropped(db_url: str, tmp: Path) -> None:
    async with local_server(db_url, TIMINGS) as srv:
        await harness.make_room(srv)
        agent = spawn_agent(srv.addr, "room", "builder", tmp)
        await harness.wait_live(db_url, "room", "builder")
        killed_at = datetime.now(UTC)
        agent.proc.send_signal(signal.SIGKILL)
        row = await harness.wait_offline(db_url, "room", "builder", timeout=2)
        assert row["offline_reason"] == "stream_dropped"
        # Far below the TTL: the drop, not the deadline, took it offline.
        assert (row["offline_at"] - killed_at).total_seconds() < 0.5
        await _wait_exit(agent)


async def test_sigstop_is_dropped_by_keepalive_then_sigcont_rejoins_with_higher_epoch(
    db_url: str, tmp: Path
) -> None:
    async with local_server(db_url, TIMINGS) as srv:
        await harness.make_room(srv)
        agent = spawn_agent(srv.addr, "room", "builder", tmp)
        first = await harness.wait_live(db_url, "room", "builder")
        await asyncio.sleep(0.3)  # a few heartbeats
        stopped_at = datetime.now(UTC)
        agent.proc.send_signal(signal.SIGSTOP)
        try:
            row = await harness.wait_offline(db_url, "room", "builder", timeout=TTL + 2)
            # A stopped process answers no HTTP/2 ping: the server's keepalive closes
            # its transport (time + timeout, below the TTL) and the stream is dropped.
            keepalive = (TIMINGS.keepalive_time_ms + TIMINGS.keepalive_timeout_ms) / 1000
            assert keepalive < TTL
            assert row["offline_reason"] == "stream_dropped"
            assert (row["offline_at"] - stopped_at).total_seconds() <= keepalive + 1.0
        finally:
            agent.proc.send_signal(signal.SIGCONT)

        async def rejoined() -> object:
            r = await harness.participant_row(db_url, "room", "builder")
            return r if r and r["status"] == "live" and r["epoch"] > first["epoch"] else None

        again = await harness.wait_for(rejoined, timeout=5, what="rejoin after SIGCONT")
        assert again["connection_id"] == first["connection_id"]  # the same process
        assert "rejoining" in agent.stderr()
        agent.proc.send_signal(signal.SIGINT)
        assert await _wait_exit(agent) == 130


@pytest.mark.parametrize(
    ("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"]
)
async def test_signals_leave_with_reason_signal(
    db_url: str, tmp: Path, sig: signal.Signals, code: int
) -> None:
    async with local_server(db_url, TIMINGS) as srv:
        await harness.make_room(srv)
        agent = spawn_agent(srv.addr, "room", "builder", tmp)
        live = await harness.wait_live(db_url, "room", "builder")
        # While it runs, ready_until keeps moving forward.
        await asyncio.sleep(TIMINGS.heartbeat_interval * 2 + TIMINGS.heartbeat_flush_ms / 1000)
        later = await harness.participant_row(db_url, "room", "builder")
        assert later is not None and later["ready_until"] > live["ready_until"]
        agent.proc.send_signal(sig)
        assert await _wait_exit(agent) == code
        row = await harness.participant_row(db_url, "room", "builder")
        assert row is not None and row["status"] == "offline"
        assert row["offline_reason"] == "signal"


async def test_timeout_leaves_with_reason_left_and_exit_0(db_url: str, tmp: Path) -> None:
    async with local_server(db_url, TIMINGS) as srv:
        await harness.make_room(srv)
        agent = spawn_agent(srv.addr, "room", "builder", tmp, timeout="700ms")
        assert await _wait_exit(agent) == 0
        row = await harness.participant_row(db_url, "room", "builder")
        assert row is not None and row["offline_reason"] == "left"
        assert "no task within 0.7s; left" in agent.stderr()


async def test_an_error_leaves_with_reason_error(db_url: str, tmp: Path) -> None:
    """A real failure: the agent's stderr pipe is closed under it, so writing its
    status line fails; it still leaves, with reason `error`, and exits 1."""
    async with local_server(db_url, TIMINGS) as srv:
        await harness.make_room(srv)
        read_end, write_end = os.pipe()
        os.close(read_end)  # nobody will ever read: the first write raises EPIPE
        proc = subprocess.Popen(
            harness.vigil_cmd("wait-for-task", "--chatroom", "room", "--role", "builder"),
            env=harness.child_env({"VIGIL_ADDR": srv.addr}),
            stdout=subprocess.DEVNULL,
            stderr=write_end,
        )
        os.close(write_end)
        assert await asyncio.to_thread(proc.wait, 10) == 1
        row = await harness.wait_offline(db_url, "room", "builder", timeout=2)
        assert row["offline_reason"] == "error"


async def test_second_wait_for_task_supersedes_the_first(db_url: str, tmp: Path) -> None:
    async with local_server(db_url, TIMINGS) as srv:
        await harness.make_room(srv)
        first = spawn_agent(srv.addr, "room", "builder", tmp)
        one = await harness.wait_live(db_url, "room", "builder")
        second = spawn_agent(srv.addr, "room", "builder", tmp)
        assert await _wait_exit(first) == 3
        assert "superseded" in first.stderr()
        row = await harness.wait_live(db_url, "room", "builder")
        assert row["epoch"] == one["epoch"] + 1
        # The second stays live through several TTLs: the first never comes back.
        await asyncio.sleep(TTL * 1.5)
        row = await harness.participant_row(db_url, "room", "builder")
        assert row is not None and row["status"] == "live" and row["epoch"] == one["epoch"] + 1
        second.proc.send_signal(signal.SIGTERM)
        assert await _wait_exit(second) == 143


async def test_user_mistakes_are_one_line_errors(tmp: Path) -> None:
    cases = [
        (["wait-for-task", "--chatroom", "room"], 2, "--role"),
        (
            ["wait-for-task", "--chatroom", "room", "--role", "r", "--addr", "127.0.0.1:1"],
            1,
            "cannot reach Vigil",
        ),
        (["wait-for-task", "--chatroom", "bad name", "--role", "r"], 2, "may contain only"),
        (["wait-for-task", "--chatroom", "c", "--role", "r", "--timeout", "soon"], 2, "duration"),
        (["participants", "--addr", "127.0.0.1:1"], 1, "cannot reach Vigil at 127.0.0.1:1"),
        (["participants", "--addr", "nonsense"], 2, "HOST:PORT"),
        (["frobnicate"], 2, "invalid choice"),
    ]
    for args, code, text in cases:
        started = time.monotonic()
        res = subprocess.run(
            harness.vigil_cmd(*args), env=harness.child_env(), capture_output=True, timeout=20
        )
        err = res.stderr.decode()
        assert res.returncode == code, f"{args}: {res.returncode} {err}"
        assert text in err, f"{args}: {err}"
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert time.monotonic() - started < 15
    bad_env = harness.child_env({"VIGIL_HEARTBEAT_TTL_MS": "soon"})
    res = subprocess.run(harness.vigil_cmd("participants"), env=bad_env, capture_output=True)
    assert res.returncode == 2
    assert res.stderr.decode().strip() == (
        "vigil: error: VIGIL_HEARTBEAT_TTL_MS must be an integer, got 'soon'"
    )
