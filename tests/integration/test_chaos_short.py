"""The chaos soak, short: 60 s of seeded, overlapping faults on a real topology (two
`vigil up` replicas serving TLS on one PostgreSQL, two daemons running the example
agent, one of them in a network namespace of its own, custom roles driven by
`wait-for-task` loops, steady sends and a burst), then the independent checker over
what Vigil showed. Green only with zero violations of the invariants
(README, "Guarantees"), with the faults really injected and the tasks really done."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from vigil.testing import ROOT

SEED = 16  # its 60 s schedule draws 12 of the 13 fault kinds, partitions included
DURATION = "60s"


@pytest.mark.slow
@pytest.mark.soak
def test_a_short_chaos_soak_has_no_violation(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "chaos", "--seed", str(SEED), "--duration", DURATION,
         "--remote-roles", "6", "--out", str(tmp_path), "--quiet"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=420,
    )  # fmt: skip
    result_file = tmp_path / f"{SEED}.json"
    assert result_file.exists(), proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads(result_file.read_text())
    violations = result["violations"]
    assert proc.returncode == 0 and not violations, (
        f"seed {SEED}: {len(violations)} violations, the first:\n"
        + json.dumps(violations[:3], indent=1)
        + "\n"
        + proc.stdout[-3000:]
    )
    f = result["figures"]
    # The soak did what it says: faults of many kinds, and the work went through them.
    assert sum(f["faults"].values()) >= 10, f["faults"]
    assert len(f["faults"]) >= 10, f["faults"]
    assert f["partitions"] >= 1 and f["faults"].get("slow_network", 0) >= 1, f["faults"]
    assert f["live_checks"] >= 1 and f["live_violations"] == 0
    assert f["tasks_sent"] >= 100
    assert f["tasks_final"].get("completed", 0) >= 0.9 * f["tasks_sent"], f["tasks_final"]
    assert f["tasks_left_open_after_drain"] == 0
    assert f["transitions"] >= 3 * f["tasks_sent"]
    # the same seed gives the same schedule
    replay = subprocess.run(
        [sys.executable, "-c",
         "from chaos.run import plan, schedule_digest;"
         f"print(schedule_digest(plan({SEED}, 60.0, [f'r{{i}}' for i in range(6)],"
         " ['c0', 'c1', 'c2'])))"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert replay.stdout.strip() == result["schedule_digest"]
