"""Configuration, read once from the environment at the edge and passed down."""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from vigil.core.errors import ConfigError
from vigil.core.timings import Timings

DEFAULT_ADDR = "127.0.0.1:7070"
DEFAULT_METRICS_ADDR = "127.0.0.1:9464"
_ADDR = re.compile(r"^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.\-]+):(\d{1,5})$")


def parse_addr(value: str, var: str) -> tuple[str, int]:
    """'host:port' or '[v6]:port' -> (host, port); the error names the variable."""
    m = _ADDR.match(value.strip())
    if not m or not 0 <= int(m.group(2)) <= 65535:
        raise ConfigError(f"{var} must look like HOST:PORT (e.g. 127.0.0.1:7070), got {value!r}")
    return m.group(1), int(m.group(2))


@dataclass(frozen=True)
class Settings:
    addr: str = DEFAULT_ADDR
    metrics_addr: str = DEFAULT_METRICS_ADDR
    database_url: str | None = None
    data_dir: Path = Path(".vigil")
    timings: Timings = field(default_factory=Timings)
    replica_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    log_level: str = "INFO"
    # Where the task service finds the liveness service when it is not hosted alongside.
    liveness_addr: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        addr = env.get("VIGIL_ADDR") or DEFAULT_ADDR
        parse_addr(addr, "VIGIL_ADDR")
        metrics_addr = env.get("VIGIL_METRICS_ADDR") or DEFAULT_METRICS_ADDR
        parse_addr(metrics_addr, "VIGIL_METRICS_ADDR")
        url = env.get("DATABASE_URL") or None
        if url is not None and not url.startswith(("postgres://", "postgresql://")):
            raise ConfigError("DATABASE_URL must start with postgresql:// or postgres://")
        level = (env.get("VIGIL_LOG_LEVEL") or "INFO").upper()
        if level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ConfigError(
                f"VIGIL_LOG_LEVEL must be DEBUG, INFO, WARNING or ERROR, got {level!r}"
            )
        liveness_addr = env.get("VIGIL_LIVENESS_ADDR") or None
        if liveness_addr is not None:
            parse_addr(liveness_addr, "VIGIL_LIVENESS_ADDR")
        return cls(
            liveness_addr=liveness_addr,
            addr=addr,
            metrics_addr=metrics_addr,
            database_url=url,
            data_dir=Path(env.get("VIGIL_DATA_DIR") or ".vigil"),
            timings=Timings.from_env(env),
            log_level=level,
        )
