"""Every reliability timing in one place, with the original plan's defaults.

Each value can be overridden by an environment variable (milliseconds or a count)
so tests run the same code with millisecond timings.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields

from vigil.core.errors import ConfigError

# name -> (environment variable, default in ms or count; None means derived)
_ENV: dict[str, tuple[str, int | None]] = {
    "heartbeat_interval_ms": ("VIGIL_HEARTBEAT_INTERVAL_MS", 30_000),
    "heartbeat_ttl_ms": ("VIGIL_HEARTBEAT_TTL_MS", 60_000),
    "keepalive_time_ms": ("VIGIL_KEEPALIVE_TIME_MS", None),
    "keepalive_timeout_ms": ("VIGIL_KEEPALIVE_TIMEOUT_MS", None),
    "heartbeat_flush_ms": ("VIGIL_HEARTBEAT_FLUSH_MS", None),
    "sweep_max_sleep_ms": ("VIGIL_SWEEP_MAX_SLEEP_MS", 1_000),
    "reconnect_jitter_ms": ("VIGIL_RECONNECT_JITTER_MS", 1_000),
    "shutdown_grace_ms": ("VIGIL_SHUTDOWN_GRACE_MS", 5_000),
    "task_pending_timeout_ms": ("VIGIL_TASK_PENDING_TIMEOUT_MS", 300_000),
    "task_ack_timeout_ms": ("VIGIL_TASK_ACK_TIMEOUT_MS", 120_000),
    "task_max_attempts": ("VIGIL_TASK_MAX_ATTEMPTS", 3),
    "command_deadline_ms": ("VIGIL_COMMAND_DEADLINE_MS", 120_000),
    "circuit_exits": ("VIGIL_CIRCUIT_EXITS", 3),
    "circuit_window_ms": ("VIGIL_CIRCUIT_WINDOW_MS", 300_000),
    "circuit_cooldown_ms": ("VIGIL_CIRCUIT_COOLDOWN_MS", 60_000),
    "restart_backoff_base_ms": ("VIGIL_RESTART_BACKOFF_BASE_MS", 1_000),
    "restart_backoff_cap_ms": ("VIGIL_RESTART_BACKOFF_CAP_MS", 60_000),
    "agent_min_uptime_ms": ("VIGIL_AGENT_MIN_UPTIME_MS", 10_000),
    "role_series_kept_ms": ("VIGIL_ROLE_SERIES_KEPT_MS", 3_600_000),
}


@dataclass(frozen=True)
class Timings:
    heartbeat_interval_ms: int = 30_000
    heartbeat_ttl_ms: int = 60_000
    # HTTP/2 keepalive: time + timeout stays below the TTL, so a client notices a
    # vanished server and resumes elsewhere before its participant would expire.
    keepalive_time_ms: int = 20_000
    keepalive_timeout_ms: int = 10_000
    # Longest a heartbeat waits in memory before its ready_until reaches the database.
    heartbeat_flush_ms: int = 1_000
    # Longest the TTL sweeper sleeps when it knows of no earlier deadline.
    sweep_max_sleep_ms: int = 1_000
    reconnect_jitter_ms: int = 1_000
    shutdown_grace_ms: int = 5_000
    task_pending_timeout_ms: int = 300_000
    task_ack_timeout_ms: int = 120_000
    task_max_attempts: int = 3
    command_deadline_ms: int = 120_000
    circuit_exits: int = 3
    circuit_window_ms: int = 300_000
    circuit_cooldown_ms: int = 60_000
    restart_backoff_base_ms: int = 1_000
    restart_backoff_cap_ms: int = 60_000
    # An agent process that ends sooner than this after it started failed to start,
    # whatever its exit code (supervisord's `startsecs`): it counts toward backoff and
    # the circuit like a crash.
    agent_min_uptime_ms: int = 10_000
    # vigil_role_live keeps a role offline for longer than this out of its series.
    role_series_kept_ms: int = 3_600_000

    def __post_init__(self) -> None:
        for f in fields(self):
            if getattr(self, f.name) <= 0:
                raise ConfigError(f"{_ENV[f.name][0]} must be a positive integer")
        if self.heartbeat_interval_ms >= self.heartbeat_ttl_ms:
            raise ConfigError(
                "VIGIL_HEARTBEAT_INTERVAL_MS must be below VIGIL_HEARTBEAT_TTL_MS "
                f"(got {self.heartbeat_interval_ms} >= {self.heartbeat_ttl_ms})"
            )
        if self.keepalive_time_ms + self.keepalive_timeout_ms >= self.heartbeat_ttl_ms:
            raise ConfigError(
                "VIGIL_KEEPALIVE_TIME_MS + VIGIL_KEEPALIVE_TIMEOUT_MS must stay below "
                f"VIGIL_HEARTBEAT_TTL_MS (got {self.keepalive_time_ms} + "
                f"{self.keepalive_timeout_ms} >= {self.heartbeat_ttl_ms})"
            )
        if self.heartbeat_flush_ms * 2 > self.heartbeat_ttl_ms - self.heartbeat_interval_ms:
            raise ConfigError(
                "VIGIL_HEARTBEAT_FLUSH_MS must be at most half of "
                "(VIGIL_HEARTBEAT_TTL_MS - VIGIL_HEARTBEAT_INTERVAL_MS)"
            )

    @property
    def heartbeat_interval(self) -> float:
        return self.heartbeat_interval_ms / 1000

    @property
    def heartbeat_ttl(self) -> float:
        return self.heartbeat_ttl_ms / 1000

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Timings:
        values: dict[str, int] = {}
        for name, (var, _default) in _ENV.items():
            raw = env.get(var)
            if raw is None or raw.strip() == "":
                continue
            try:
                values[name] = int(raw.strip())
            except ValueError:
                raise ConfigError(f"{var} must be an integer, got {raw!r}") from None
        interval = values.get("heartbeat_interval_ms", cls.heartbeat_interval_ms)
        ttl = values.get("heartbeat_ttl_ms", cls.heartbeat_ttl_ms)
        # Derived defaults keep the relations valid when only the TTL is overridden.
        values.setdefault("keepalive_time_ms", max(1, ttl // 3))
        values.setdefault("keepalive_timeout_ms", max(1, ttl // 6))
        values.setdefault("heartbeat_flush_ms", max(1, min(1_000, (ttl - interval) // 4)))
        values.setdefault("sweep_max_sleep_ms", max(1, min(1_000, ttl // 4)))
        return cls(**values)
