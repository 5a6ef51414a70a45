"""JSON logs are only JSON, and what happens is logged with its fields: a `vigil up
--log-format json` process through joins, claims, recoveries, restart commands, exits,
a circuit opening and notifications."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path

import pytest

from vigil import testing as harness
from vigil.core.vocab import AgentStatus
from vigil.v1 import common_pb2
from vigil.v1 import tasks_pb2 as tpb

# Spawns real processes (servers, agents, daemons, the CLI): not in `make test-fast`.
pytestmark = pytest.mark.slow

CIRCUIT_OPEN = AgentStatus.CIRCUIT_OPEN.to_pb()
EXPECTED = {
    "participant_joined": {"chatroom", "role", "epoch", "principal"},
    "participant_offline": {"chatroom", "role", "epoch", "reason"},
    "task_transition": {"task_id", "chatroom", "role", "trigger", "status", "attempt", "actor"},
    "command_issued": {"machine", "chatroom", "role", "type", "reason", "requested_by"},
    "command_result": {"machine", "chatroom", "role", "command_id", "type", "outcome"},
    "agent_exit": {"machine", "chatroom", "role", "pid", "classification", "status"},
    "circuit_opened": {"chatroom", "role", "machine", "reason"},
    "notification": {"kind", "chatroom", "role", "notification_id"},
}


async def test_json_logs_hold_every_event_with_its_fields(db_url: str, tmp: Path) -> None:
    env = harness.child_env(
        {
            "DATABASE_URL": db_url,
            "VIGIL_METRICS_ADDR": "127.0.0.1:0",
            "VIGIL_LOG_LEVEL": "INFO",
            "VIGIL_CIRCUIT_EXITS": "2",
            "VIGIL_RESTART_BACKOFF_BASE_MS": "100",
            "VIGIL_RESTART_BACKOFF_CAP_MS": "200",
        }
    )
    server = harness.start_server_process(
        ["up", "--addr", "127.0.0.1:0", "--log-format", "json"], env, tmp / "up.log"
    )
    daemon = None
    try:
        daemon = await harness.register_machine(server.addr, "m1", tmp)
        daemon.start()
        async with harness.client(server.addr) as admin:
            await admin.create_chatroom(
                "room",
                [
                    tpb.Role(role="reviewer", kind=common_pb2.AGENT_KIND_CUSTOM),
                    tpb.Role(
                        role="builder",
                        kind=common_pb2.AGENT_KIND_REMOTE,
                        machine="m1",
                        harness="crash",
                    ),
                ],
            )
            # A custom agent claims a task and leaves; the task is released (a
            # transition with a reason) and claimed again.
            sent = await admin.send("room", "reviewer", "have a look")
            agent = harness.spawn_agent(server.addr, "room", "reviewer", tmp)
            assert await asyncio.to_thread(agent.proc.wait, 15) == 0
            await admin.release_task(sent.id, "not now")
            # The remote builder crash-loops until its circuit opens.
            await admin.send("room", "builder", "crash please")

            async def circuit_open() -> bool:
                return any(a.status == CIRCUIT_OPEN for a in await admin.list_agents("room"))

            await harness.wait_for(circuit_open, 30, what="the circuit to open")
        await asyncio.sleep(0.5)
    finally:
        if daemon is not None:
            await daemon.stop()
        assert server.stop(signal.SIGTERM) == 0

    lines = (tmp / "up.log").read_text().splitlines()
    entries = [json.loads(line) for line in lines]  # every line is JSON, nothing else
    assert any("serving liveness, tasks on" in e["msg"] for e in entries)
    by_event: dict[str, list[dict[str, object]]] = {}
    for e in entries:
        assert {"ts", "level", "logger", "msg"} <= set(e)
        if "event" in e:
            by_event.setdefault(str(e["event"]), []).append(e)
    for name, fields in EXPECTED.items():
        assert name in by_event, f"no {name} event in {sorted(by_event)}"
        assert any(fields <= set(e) for e in by_event[name]), (name, by_event[name][:2])
    triggers = {e["trigger"] for e in by_event["task_transition"]}
    assert {"claimTask", "releaseTask"} <= triggers
    released = next(e for e in by_event["task_transition"] if e["trigger"] == "releaseTask")
    assert released["reason"] == "not now" and released["attempt"] == 1
    kinds = {e["kind"] for e in by_event["notification"]}
    assert "circuit_open" in kinds
