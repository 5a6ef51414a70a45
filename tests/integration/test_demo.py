"""`vigil demo` runs to completion, shows every step, and leaves nothing running."""

from __future__ import annotations

import os
import re
import subprocess
import time

import pytest

from vigil import testing as harness

# Spawns real processes (servers, agents, daemons, the CLI): not in `make test-fast`.
pytestmark = pytest.mark.slow


def test_demo_shows_each_step_and_leaves_nothing_running() -> None:
    started = time.monotonic()
    res = subprocess.run(
        harness.vigil_cmd("demo"), env=harness.child_env(), capture_output=True, timeout=120
    )
    elapsed = time.monotonic() - started
    out = res.stdout.decode()
    assert res.returncode == 0, out + res.stderr.decode()
    assert elapsed < 120
    for expected in [
        "its daemon is online",
        "restart issued once: stop, start commands",
        "daemon started the example agent: pid",
        "claimed, started and completed by the agent",
        "signal 9, classification signal",
        "recovered: pending, attempt 1",
        "restarted once after backoff",
        "completed by the new agent on attempt 1",
        "circuit circuit_open",
        "[circuit_open]",
        "[pending_timeout]",
        "done: nothing left running",
    ]:
        assert expected in out, f"missing {expected!r} in:\n{out}"
    assert "Traceback" not in res.stderr.decode()
    # Every agent it started is gone.
    for pid in map(int, re.findall(r"pid (\d+)", out)):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        raise AssertionError(f"process {pid} from the demo is still running")
