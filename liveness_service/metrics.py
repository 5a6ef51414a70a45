"""Prometheus metrics of the liveness service (names are the contract: docs/metrics.md)."""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_LATENESS_BUCKETS = (-1, -0.1, -0.01, 0, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60)


class LivenessMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.participants = Gauge(
            "vigil_participants",
            "Participants by agent kind and status (all replicas, from the database).",
            ["kind", "status"],
            registry=registry,
        )
        self.role_live = Gauge(
            "vigil_role_live",
            "1 while the role's participant is live, 0 when offline (one series per role; "
            "a role offline for longer than VIGIL_ROLE_SERIES_KEPT_MS drops out).",
            ["chatroom", "role"],
            registry=registry,
        )
        self.role_series = RoleSeries(self.role_live)
        self.heartbeats = Counter(
            "vigil_heartbeats_total", "Heartbeats received.", registry=registry
        )
        self.offline = Counter(
            "vigil_participant_offline_total",
            "Participants taken offline, by reason.",
            ["reason"],
            registry=registry,
        )
        self.detection = Histogram(
            "vigil_offline_detection_seconds",
            "Time from the moment a death became knowable to its offline record: "
            "stream close to commit (stream_dropped) or deadline to commit (ttl_expired).",
            ["reason"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.lateness = Histogram(
            "vigil_heartbeat_lateness_seconds",
            "Heartbeat arrival minus its expected time (previous beat + interval).",
            buckets=_LATENESS_BUCKETS,
            registry=registry,
        )
        self.streams = Gauge(
            "vigil_session_streams", "Open Session streams on this replica.", registry=registry
        )
        self.flush_statements = Counter(
            "vigil_heartbeat_flush_statements_total",
            "Database statements spent writing heartbeats (batched).",
            registry=registry,
        )
        self.flush_rows = Counter(
            "vigil_heartbeat_flush_rows_total",
            "Heartbeat deadlines written to the database.",
            registry=registry,
        )


class RoleSeries:
    """vigil_role_live, kept equal to the roles last read: only the series that changed
    are touched (rebuilding thousands of series every few seconds held the event loop
    for tens of milliseconds, delaying every heartbeat meanwhile)."""

    def __init__(self, gauge: Gauge) -> None:
        self._gauge = gauge
        self._shown: dict[tuple[str, str], int] = {}

    def show(self, live: Mapping[tuple[str, str], bool]) -> int:
        """One series per (chatroom, role) of `live`, 1 while live, 0 when not; the
        others are removed. Returns how many series were set or removed."""
        wanted = {key: 1 if up else 0 for key, up in live.items()}
        changed = 0
        for key in self._shown.keys() - wanted.keys():
            self._gauge.remove(*key)
            changed += 1
        for key, value in wanted.items():
            if self._shown.get(key) != value:
                self._gauge.labels(*key).set(value)
                changed += 1
        self._shown = wanted
        return changed
