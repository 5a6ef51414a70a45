"""Changing and deleting chatrooms through the CLI against a real server: roles come and
go, a role or chatroom with unfinished work is kept until that work is dealt with, a
removed remote role's agent is stopped, and history survives a deletion."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path

import pytest

from vigil import testing as harness
from vigil.core.vocab import CommandType, DesiredState
from vigil.testing import local_server
from vigil.v1 import tasks_pb2 as tpb

# Spawns real processes (the CLI): not in `make test-fast`.
pytestmark = pytest.mark.slow


async def vigil(addr: str, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *harness.vigil_cmd(*args),
        env=harness.child_env({"VIGIL_ADDR": addr}),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_roles_change_and_a_deleted_chatroom_keeps_its_history(
    db_url: str, tmp: Path
) -> None:
    async with local_server(db_url, harness.fast_timings()) as srv:
        await harness.register_machine_direct(srv, "m1")
        rc, _, err = await vigil(
            srv.addr, "chatroom", "create", "team", "--role", "a=custom",
            "--role", "b=remote:m1:idle",
        )  # fmt: skip
        assert rc == 0, err
        rc, out, err = await vigil(
            srv.addr, "chatroom", "update", "team", "--add-role", "c=custom", "--json"
        )
        assert rc == 0, err
        assert sorted(r["role"] for r in json.loads(out)["roles"]) == ["a", "b", "c"]

        async with harness.client(srv.addr) as admin:
            busy = await admin.send("team", "a", "unfinished")
        # A role with unfinished work stays; a removed remote role's agent is stopped.
        rc, _, err = await vigil(srv.addr, "chatroom", "update", "team", "--remove-role", "a")
        assert rc == 1 and "unfinished tasks" in err
        rc, out, err = await vigil(
            srv.addr, "chatroom", "update", "team", "--remove-role", "b", "--json"
        )
        assert rc == 0, err
        assert sorted(r["role"] for r in json.loads(out)["roles"]) == ["a", "c"]
        async with harness.client(srv.addr) as admin:
            (agent,) = await admin.list_agents("team")
            assert agent.desired_state == DesiredState.STOPPED.to_pb()
            stops = [c for c in await admin.list_commands("m1") if c.role == "b"]
            assert [c.type for c in stops] == [CommandType.STOP.to_pb()]
        # The removed name stays taken by its history.
        rc, _, err = await vigil(srv.addr, "chatroom", "update", "team", "--add-role", "b=custom")
        assert rc == 1 and "was removed" in err

        # Deleting: refused with unfinished work, unless it is closed.
        rc, _, err = await vigil(srv.addr, "chatroom", "delete", "team")
        assert rc == 1 and "--cancel-open" in err
        rc, out, err = await vigil(
            srv.addr, "chatroom", "delete", "team", "--cancel-open", "--reason", "done"
        )
        assert rc == 0, err
        assert "1 unfinished task(s) closed" in out
        rc, out, _ = await vigil(srv.addr, "chatrooms", "--json")
        assert json.loads(out) == []
        rc, _, err = await vigil(srv.addr, "send", "--chatroom", "team", "--role", "a", "x")
        assert rc == 1 and "no chatroom 'team'" in err
        rc, _, err = await vigil(srv.addr, "chatroom", "create", "team", "--role", "a=custom")
        assert rc == 1 and "was deleted" in err
        async with harness.client(srv.addr) as admin:
            task = await admin.get_task(busy.id)
            history = await admin.task_history(busy.id)
        assert task.status == tpb.TASK_STATUS_CLOSED  # kept, closed
        assert [(h.trigger, h.reason) for h in history][-1] == ("cancelTask", "done")
