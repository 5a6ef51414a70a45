"""Prometheus metrics of the machine daemon (names are the contract: docs/metrics.md)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class DaemonMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.children = Gauge(
            "vigil_daemon_children", "Agent processes this daemon runs.", registry=registry
        )
        self.exits = Counter(
            "vigil_daemon_child_exits_total",
            "Agent process exits seen by this daemon, by classification.",
            ["classification"],
            registry=registry,
        )
        self.outbox = Gauge(
            "vigil_daemon_outbox_pending",
            "Exit reports on disk not yet acknowledged by the server.",
            registry=registry,
        )
        self.reports = Counter(
            "vigil_daemon_exit_reports_total",
            "Exit report attempts, by outcome (sent, retry, refused).",
            ["outcome"],
            registry=registry,
        )
        self.commands = Counter(
            "vigil_daemon_commands_total",
            "Commands this daemon handled, by type and outcome (done, failed, expired).",
            ["type", "outcome"],
            registry=registry,
        )
