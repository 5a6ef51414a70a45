"""Prometheus metrics of the liveness service (names are the contract: docs/metrics.md)."""

from __future__ import annotations

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
