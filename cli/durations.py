"""Durations on the command line: 90 (seconds), 90s, 500ms, 5m, 1h, and compounds such
as 1m30s or 1h15m."""

from __future__ import annotations

import re

from vigil.cli.rpc import CliError

_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_WHOLE = re.compile(r"(?:\d+(?:\.\d+)?(?:ms|h|m|s))+|\d+(?:\.\d+)?")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
MAX_S = 366 * 24 * 3600.0


def parse_duration(text: str, flag: str) -> float:
    """Seconds; a usage error (exit 2) naming the flag for anything else."""
    value = text.strip()
    if not _WHOLE.fullmatch(value):
        raise CliError(
            f"{flag} must be a duration like 30s, 500ms, 5m, 1h or 1m30s, got {value[:40]!r}", 2
        )
    parts = _PART.findall(value)
    seconds = sum(float(n) * _UNIT[u] for n, u in parts) if parts else float(value)
    if seconds <= 0:
        raise CliError(f"{flag} must be greater than zero", 2)
    if seconds > MAX_S:
        raise CliError(f"{flag} must be at most a year", 2)
    return seconds
