"""The servers run on uvloop unless VIGIL_EVENT_LOOP=asyncio; other commands (clients,
short administrative ones) on asyncio's own loop; a bad value is a one-line error."""

from __future__ import annotations

import asyncio

import pytest

from vigil.cli.main import _run
from vigil.core.errors import ConfigError


def _loop_of(command: str | None) -> str:
    seen: list[str] = []

    async def main() -> int:
        seen.append(type(asyncio.get_running_loop()).__module__.split(".")[0])
        return 0

    assert _run(main(), command) == 0
    return seen[0]


@pytest.mark.parametrize("command", ["up", "liveness", "task-service"])
def test_a_server_runs_on_uvloop(command: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VIGIL_EVENT_LOOP", raising=False)
    assert _loop_of(command) == "uvloop"


@pytest.mark.parametrize("command", ["send", "wait-for-task", "migrate", None])
def test_other_commands_run_on_asyncio(command: str | None) -> None:
    assert _loop_of(command) == "asyncio"


def test_a_server_can_opt_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VIGIL_EVENT_LOOP", "asyncio")
    assert _loop_of("up") == "asyncio"


def test_a_bad_choice_is_a_one_line_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VIGIL_EVENT_LOOP", "trio")
    with pytest.raises(ConfigError, match="VIGIL_EVENT_LOOP must be uvloop or asyncio"):
        _loop_of("up")
