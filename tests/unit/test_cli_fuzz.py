"""The CLI never shows a traceback, whatever argv (and stdin) it is given: a property
test over random command lines built from the parser's own commands and flags. Calls
that would reach a server find none (the connection fails at once), so every command
runs to its one-line answer."""

from __future__ import annotations

import argparse
import io
import sys
from collections.abc import Iterator

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vigil.cli import main as cli_main
from vigil.client import Client, RPCError

# Commands that start servers, daemons or long waits, or write files: their parsing is
# still fuzzed (with a flag that cannot parse), never their running.
NOT_RUN = {"up", "liveness", "task-service", "demo", "daemon", "migrate", "tls"}


def _leaves(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
        return
    for name, sub in subs[0].choices.items():
        yield from _leaves(sub, (*path, name))


PARSER = cli_main.build_parser()
LEAVES = list(_leaves(PARSER))
VALUES = st.one_of(
    st.sampled_from(
        [
            "",
            "-",
            "--",
            "x",
            "room",
            "builder=custom",
            "builder=remote:m1:claude",
            "1m30s",
            "0",
            "-5",
            "99999999999999999999",
            "a\nb",
            "\x00",
            "é" * 80,
            "127.0.0.1:1",
            "dns:///x:1",
            "6f1c5b4e-0000-4000-8000-000000000000",
            "0123456789abcdef",
        ]
    ),
    st.text(max_size=12),
)


@st.composite
def argv(draw: st.DrawFn) -> list[str]:
    path, parser = draw(st.sampled_from(LEAVES))
    flags = [o for a in parser._actions for o in a.option_strings if o not in ("-h", "--help")]
    tail = draw(
        st.lists(st.one_of(st.sampled_from(flags) if flags else VALUES, VALUES), max_size=6)
    )
    if path and path[0] in NOT_RUN:
        tail.append("--no-such-flag")  # parse it, never run it
    return [*path, *tail]


@pytest.fixture(autouse=True)
def no_server(monkeypatch: pytest.MonkeyPatch, tmp_path: object) -> None:
    async def unreachable(self: Client, timeout: float = 0) -> None:
        raise RPCError(grpc.StatusCode.UNAVAILABLE, "cannot reach Vigil (test)")

    monkeypatch.setattr(Client, "wait_ready", unreachable)
    monkeypatch.setenv("VIGIL_ADDR", "127.0.0.1:1")
    monkeypatch.setenv("VIGIL_TOKEN", "vigil_0123456789abcdef_" + "a" * 43)
    monkeypatch.setenv("VIGIL_DATA_DIR", str(tmp_path))


def _run(args: list[str], stdin: bytes) -> tuple[int, str]:
    err = io.StringIO()
    old_err, old_out, old_in = sys.stderr, sys.stdout, sys.stdin
    sys.stderr, sys.stdout = err, io.StringIO()
    sys.stdin = io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8")
    try:
        try:
            code = cli_main.main(args)
        except SystemExit as exc:  # --help and --version
            code = exc.code if isinstance(exc.code, int) else 2
    finally:
        sys.stderr, sys.stdout, sys.stdin = old_err, old_out, old_in
    return code, err.getvalue()


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    database=None,
)
@given(argv(), st.binary(max_size=16))
def test_no_argv_gets_a_traceback(args: list[str], stdin: bytes) -> None:
    code, err = _run(args, stdin)
    assert "Traceback" not in err, (args, err)
    assert code in (0, 1, 2), (args, code, err)
    if code != 0:
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("vigil: error: "), (args, err)


@pytest.mark.parametrize(
    "args",
    [
        ["send", "--chatroom", "room", "--role", "r", "-"],  # stdin not UTF-8
        ["task", "complete", "6f1c5b4e-0000-4000-8000-000000000000", "--attempt", "9" * 20],
        ["commands", "--limit", "9" * 20],
        ["wait-for-task", "--chatroom", "room", "--role", "r", "--timeout", ""],
        ["no-such-command"],
        ["send", "--chatroom", "room", "--role", "r", "--token-file", "a\x00b", "x"],
    ],
)
def test_known_mistakes_are_usage_errors(args: list[str]) -> None:
    code, err = _run(args, b"\xff\xfe not utf-8")
    assert code == 2, (args, err)
    assert err.startswith("vigil: error: ") and err.count("\n") == 1, err
