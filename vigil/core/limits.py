"""Caps that keep one caller from exhausting a server for everyone, read once from the
environment like the timings (documented in the README)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields

from vigil.core.errors import ConfigError

_ENV = {
    "streams_per_token": "VIGIL_MAX_STREAMS_PER_TOKEN",
    "participants_per_token": "VIGIL_MAX_PARTICIPANTS_PER_TOKEN",
}


@dataclass(frozen=True)
class Limits:
    # Open streams (sessions, waits, watches) one credential may hold on one replica.
    streams_per_token: int = 1000
    # Live participants one credential may hold (admins: no cap).
    participants_per_token: int = 1000

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Limits:
        values: dict[str, int] = {}
        for f in fields(cls):
            raw = env.get(_ENV[f.name])
            if raw is None or not raw.strip():
                continue
            try:
                value = int(raw)
            except ValueError:
                raise ConfigError(f"{_ENV[f.name]} must be an integer, got {raw!r}") from None
            if value <= 0:
                raise ConfigError(f"{_ENV[f.name]} must be a positive integer")
            values[f.name] = value
        return cls(**values)
