"""Exit classification: intentional > signal > exited_ok > crashed (lesson 4)."""

from __future__ import annotations

import pytest

from vigil.core.vocab import ExitClassification as X
from vigil.daemon.children import classify


@pytest.mark.parametrize(
    ("stopping", "returncode", "expected"),
    [
        (True, -15, (X.INTENTIONAL, None, 15)),  # told to stop, died of our SIGTERM
        (True, -9, (X.INTENTIONAL, None, 9)),  # told to stop, needed the SIGKILL
        (True, 0, (X.INTENTIONAL, 0, None)),
        (True, 1, (X.INTENTIONAL, 1, None)),
        (True, None, (X.INTENTIONAL, None, None)),
        (False, -9, (X.SIGNAL, None, 9)),  # killed by someone else
        (False, -11, (X.SIGNAL, None, 11)),
        (False, 0, (X.EXITED_OK, 0, None)),
        (False, 1, (X.CRASHED, 1, None)),
        (False, 137, (X.CRASHED, 137, None)),  # a shell's "killed" code is still a code
        (False, None, (X.CRASHED, None, None)),  # adopted, status unknown: not a clean exit
    ],
)
def test_classify(
    stopping: bool, returncode: int | None, expected: tuple[X, int | None, int | None]
) -> None:
    assert classify(stopping, returncode) == expected


def test_only_unexpected_exits_count_toward_restarts() -> None:
    assert {c for c in X if c.unexpected} == {X.SIGNAL, X.CRASHED, X.DAEMON_LOST}
