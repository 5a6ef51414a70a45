"""Prometheus metrics of the task service (names are the contract: docs/metrics.md)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class TaskMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.tasks = Gauge(
            "vigil_tasks", "Tasks by status (from the database).", ["status"], registry=registry
        )
        self.needs_attention = Gauge(
            "vigil_tasks_needing_attention",
            "Open tasks past the redelivery cap, waiting for a person.",
            registry=registry,
        )
        self.oldest_overdue = Gauge(
            "vigil_task_oldest_overdue_seconds",
            "How long the oldest passed deadline has waited to be handled (0: none).",
            registry=registry,
        )
        self.transitions = Counter(
            "vigil_task_transitions_total",
            "Task status transitions, by FSM trigger.",
            ["trigger"],
            registry=registry,
        )
        self.recoveries = Counter(
            "vigil_task_recoveries_total",
            "Tasks sent back to pending, by trigger and why.",
            ["trigger", "reason"],
            registry=registry,
        )
        self.stale_attempts = Counter(
            "vigil_task_stale_attempt_rejections_total",
            "Start/complete requests refused because they named an old attempt.",
            registry=registry,
        )
        self.deadline_lag = Histogram(
            "vigil_task_deadline_lag_seconds",
            "Deadline handled at minus the deadline.",
            buckets=_LATENCY,
            registry=registry,
        )
        self.delivery = Histogram(
            "vigil_task_delivery_seconds",
            "Task created to task written to a waiting agent.",
            buckets=_LATENCY,
            registry=registry,
        )
        self.notifications = Counter(
            "vigil_notifications_total",
            "Notifications raised, by kind.",
            ["kind"],
            registry=registry,
        )
        self.restart_requests = Counter(
            "vigil_restart_requests_total",
            "Restart requests for remote roles: issued, or deduplicated (one was pending).",
            ["outcome"],
            registry=registry,
        )
        self.scheduler_pass = Histogram(
            "vigil_task_scheduler_pass_seconds",
            "One deadline-scheduler pass (find due tasks, decide, apply).",
            buckets=_LATENCY,
            registry=registry,
        )
        self.commands = Counter(
            "vigil_commands_total",
            "Daemon commands finished, by type and outcome.",
            ["type", "outcome"],
            registry=registry,
        )
        self.exits = Counter(
            "vigil_agent_exits_total",
            "Agent process exits reported by daemons, by classification, code and signal.",
            ["classification", "code", "signal"],
            registry=registry,
        )
        self.exit_report_latency = Histogram(
            "vigil_exit_report_latency_seconds",
            "Agent process exit to its report recorded.",
            buckets=_LATENCY,
            registry=registry,
        )
        self.circuit_open = Gauge(
            "vigil_agent_circuit_open",
            "1 while a role's restart circuit is open (crash loop), by chatroom and role.",
            ["chatroom", "role"],
            registry=registry,
        )
        self.daemons_online = Gauge(
            "vigil_daemons_online",
            "Machine daemons with a live presence.",
            registry=registry,
        )
        self.machines = Gauge(
            "vigil_machines_registered", "Registered machines.", registry=registry
        )
        self.waiting_agents = Gauge(
            "vigil_task_waiting_agents",
            "AwaitTask streams open on this replica.",
            registry=registry,
        )
        self.audit_ok = Gauge(
            "vigil_audit_verified",
            "1 if the last full audit verification on this replica found every chain "
            "whole, 0 if it found a broken link (absent before the first).",
            registry=registry,
        )
        self.audit_at = Gauge(
            "vigil_audit_verified_timestamp_seconds",
            "When the last full audit verification on this replica finished.",
            registry=registry,
        )
        self.audit_rows = Gauge(
            "vigil_audit_transitions_verified",
            "Audit rows the last full verification checked.",
            registry=registry,
        )
