"""Input checks shared by every RPC and the CLI: names, ids, numbers, times and text,
with messages a person can act on (quoting at most a short prefix of the input)."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime

from vigil.core.errors import InvalidArgument, quote

MAX_NAME = 64
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
MAX_REQUEST_ID = 128
_REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]*")
# Text may hold tabs and newlines, never NUL or other control characters.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_LINE_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

# Documented maximum sizes of text fields.
MAX_TASK_TEXT = 64 * 1024
MAX_COMMAND = 4096
MAX_REASON = 1024
MAX_HOSTNAME = 255
# Linux pids fit in 22 bits; anything past a 32-bit integer is not a process.
MAX_PID = 2**31 - 1
# Timestamps a caller may send: the years PostgreSQL and people both handle sanely.
EARLIEST = datetime(2000, 1, 1, tzinfo=UTC)
LATEST = datetime(2200, 1, 1, tzinfo=UTC)


def name(value: str, what: str) -> str:
    """A name (chatroom, role, machine, harness): letters, digits, '.', '_', '-'."""
    if not value:
        raise InvalidArgument(f"{what} is required")
    if len(value) > MAX_NAME:
        raise InvalidArgument(f"{what} is {len(value)} characters long; the limit is {MAX_NAME}")
    if not _NAME.fullmatch(value):
        raise InvalidArgument(
            f"{what} {quote(value)} may contain only letters, digits, '.', '_' and '-', "
            "and must start with a letter or digit"
        )
    return value


def text(
    value: str, what: str, limit: int, *, required: bool = True, one_line: bool = False
) -> str:
    """Free text: within `limit` characters, no NUL or control characters (and no line
    breaks when `one_line`)."""
    if required and not value.strip():
        raise InvalidArgument(f"{what} is empty")
    if len(value) > limit:
        raise InvalidArgument(f"{what} is {len(value)} characters long; the limit is {limit}")
    bad = (_LINE_CONTROL if one_line else _CONTROL).search(value)
    if bad:
        raise InvalidArgument(
            f"{what} holds a control character ({bad.group()!r} at position {bad.start()})"
        )
    return value


def truncate(value: str, limit: int) -> str:
    """Text we store from elsewhere (a daemon's error, a reason), cut to `limit`."""
    return value if len(value) <= limit else value[: limit - 1] + "…"


def request_id(value: str, what: str) -> str:
    """A client-chosen idempotency key (a UUID, a ULID, `job-42:step-3`): 1 to
    MAX_REQUEST_ID letters, digits, '.', '_', ':' and '-', starting with a letter or
    digit."""
    if not value:
        raise InvalidArgument(f"{what} is empty")
    if len(value) > MAX_REQUEST_ID:
        raise InvalidArgument(
            f"{what} is {len(value)} characters long; the limit is {MAX_REQUEST_ID}"
        )
    if not _REQUEST_ID.fullmatch(value):
        raise InvalidArgument(
            f"{what} {quote(value)} may contain only letters, digits, '.', '_', ':' and "
            "'-', and must start with a letter or digit"
        )
    return value


def uuid_str(value: str, what: str) -> str:
    if not value:
        raise InvalidArgument(f"{what} is required (a UUID)")
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise InvalidArgument(f"{what} {quote(value)} is not a UUID") from None


def positive(value: int, what: str) -> int:
    if value <= 0:
        raise InvalidArgument(f"{what} must be a positive integer, got {value}")
    return value


def limit(value: int, maximum: int, what: str = "limit") -> int:
    """A page size: 0 means the server's default, otherwise 1..maximum."""
    if value < 0 or value > maximum:
        raise InvalidArgument(f"{what} must be between 0 (the default) and {maximum}, got {value}")
    return value


def pid(value: int, what: str = "pid") -> int:
    if not 0 < value <= MAX_PID:
        raise InvalidArgument(f"{what} must be a process id (1 to {MAX_PID}), got {value}")
    return value


def moment(value: datetime, what: str) -> datetime:
    """A time a caller sent: within years 2000 to 2200."""
    if not EARLIEST <= value < LATEST:
        raise InvalidArgument(f"{what} {value.isoformat()} is out of range (years 2000 to 2199)")
    return value
