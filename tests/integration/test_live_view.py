"""`vigil up` on a terminal draws the live view; `--log-format json` logs JSON lines."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from vigil import testing as harness
from vigil.cli.live_view import Snapshot, render
from vigil.core.timefmt import to_proto
from vigil.core.vocab import (
    AgentKind,
    AgentStatus,
    DesiredState,
    ExitClassification,
    NotificationKind,
    OfflineReason,
    ParticipantStatus,
    TaskStatus,
)
from vigil.v1 import liveness_pb2 as lpb
from vigil.v1 import machines_pb2 as mpb
from vigil.v1 import tasks_pb2 as tpb

# Spawns real processes (servers, agents, daemons, the CLI): not in `make test-fast`.
pytestmark = pytest.mark.slow


def test_render_shows_every_section() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    snap = Snapshot(
        participants=[
            lpb.Participant(
                chatroom="c",
                role="builder",
                kind=AgentKind.REMOTE.to_pb(),
                status=ParticipantStatus.OFFLINE.to_pb(),
                epoch=3,
                offline_reason=OfflineReason.STREAM_DROPPED.to_pb(),
                offline_at=to_proto(now - timedelta(seconds=5)),
                joined_at=to_proto(now),
            )
        ],
        agents=[
            mpb.Agent(
                chatroom="c",
                role="builder",
                machine_id="m1",
                desired_state=DesiredState.RUNNING.to_pb(),
                status=AgentStatus.BACKOFF.to_pb(),
                restart_count=2,
                has_last_exit=True,
                last_exit_signal=9,
                last_exit_classification=ExitClassification.SIGNAL.to_pb(),
                last_exit_at=to_proto(now - timedelta(seconds=3)),
            )
        ],
        tasks={TaskStatus.PENDING: 2, TaskStatus.COMPLETED: 5},
        notifications=[
            tpb.Notification(
                created_at=to_proto(now),
                kind=NotificationKind.CIRCUIT_OPEN.to_pb(),
                message="crash loop",
            )
        ],
    )
    text = render(snap, "vigil: serving", now)
    for expected in [
        "PARTICIPANTS",
        "c/builder",
        "stream_dropped",
        "5s ago",
        "AGENTS",
        "signal 9 (signal)",
        "backoff",
        "TASKS",
        "completed 5  pending 2",
        "NOTIFICATIONS",
        "[circuit_open] crash loop",
    ]:
        assert expected in text, text


def test_up_on_a_terminal_draws_the_live_view(tmp: Path) -> None:
    env = harness.child_env(
        {
            "VIGIL_DATA_DIR": str(tmp / "state"),
            "VIGIL_ADDR": "127.0.0.1:0",
            "VIGIL_METRICS_ADDR": "127.0.0.1:0",
        }
    )
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        harness.vigil_cmd("up"),
        env=env,
        stdin=follower,
        stdout=follower,
        stderr=follower,
        close_fds=True,
    )
    os.close(follower)
    seen = b""
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and b"NOTIFICATIONS" not in seen:
            ready, _, _ = select.select([leader], [], [], 0.5)
            if ready:
                seen += os.read(leader, 65536)
        assert b"\x1b[H\x1b[2J" in seen and b"PARTICIPANTS" in seen and b"AGENTS" in seen
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        os.close(leader)
    assert (tmp / "state" / "vigil.log").exists()  # logs went to the file, not the screen


def test_json_logs(tmp: Path) -> None:
    env = harness.child_env(
        {
            "VIGIL_DATA_DIR": str(tmp / "state"),
            "VIGIL_ADDR": "127.0.0.1:0",
            "VIGIL_METRICS_ADDR": "127.0.0.1:0",
            "VIGIL_LOG_LEVEL": "INFO",
        }
    )
    server = harness.start_server_process(["up", "--log-format", "json"], env, tmp / "up.log")
    server.stop(signal.SIGTERM)
    lines = [ln for ln in (tmp / "up.log").read_text().splitlines() if ln.startswith("{")]
    assert lines, (tmp / "up.log").read_text()
    for ln in lines:
        entry = json.loads(ln)
        assert {"ts", "level", "logger", "msg"} <= set(entry)
