"""Input checks shared by every RPC: names and ids, with messages a person can act on."""

from __future__ import annotations

import re
import uuid

from vigil.core.errors import InvalidArgument

MAX_NAME = 64
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def name(value: str, what: str) -> str:
    if not value:
        raise InvalidArgument(f"{what} is required")
    if len(value) > MAX_NAME:
        raise InvalidArgument(f"{what} is {len(value)} characters long; the limit is {MAX_NAME}")
    if not _NAME.match(value):
        raise InvalidArgument(
            f"{what} {value!r} may contain only letters, digits, '.', '_' and '-', "
            "and must start with a letter or digit"
        )
    return value


def uuid_str(value: str, what: str) -> str:
    if not value:
        raise InvalidArgument(f"{what} is required (a UUID)")
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise InvalidArgument(f"{what} {value[:80]!r} is not a UUID") from None


def positive(value: int, what: str) -> int:
    if value <= 0:
        raise InvalidArgument(f"{what} must be a positive integer, got {value}")
    return value


def limit(value: int, maximum: int, what: str = "limit") -> int:
    """A page size: 0 means the server's default, otherwise 1..maximum."""
    if value < 0 or value > maximum:
        raise InvalidArgument(f"{what} must be between 0 (the default) and {maximum}, got {value}")
    return value


# Linux pids fit in 22 bits; anything past a 32-bit integer is not a process.
MAX_PID = 2**31 - 1


def pid(value: int, what: str = "pid") -> int:
    if not 0 < value <= MAX_PID:
        raise InvalidArgument(f"{what} must be a process id (1 to {MAX_PID}), got {value}")
    return value
