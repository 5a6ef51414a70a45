"""Durations on the command line: 90, 90s, 500ms, 5m, 1h."""

from __future__ import annotations

import re

from vigil.cli.rpc import CliError

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h)?$")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(text: str, flag: str) -> float:
    m = _DURATION.match(text.strip())
    if not m:
        raise CliError(f"{flag} must be a duration like 30s, 500ms, 5m or 1h, got {text!r}", 2)
    seconds = float(m.group(1)) * _UNIT[m.group(2)]
    if seconds <= 0:
        raise CliError(f"{flag} must be greater than zero", 2)
    return seconds
