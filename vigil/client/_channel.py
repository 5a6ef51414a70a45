"""gRPC channels, made in one place: target and load balancing, health checking, TLS,
keepalive, and gRPC's own retries of idempotent reads."""

from __future__ import annotations

import json
from typing import Any

import grpc

from vigil.client._config import ClientConfig, TlsConfig, grpc_target
from vigil.core.timings import Timings

# Read-only methods gRPC may retry by itself when a replica is unavailable.
_IDEMPOTENT = {
    "vigil.v1.Liveness": ["ListParticipants"],
    "vigil.v1.Tasks": [
        "GetChatroom",
        "ListChatrooms",
        "GetTask",
        "TaskHistory",
        "ListTasks",
        "CountTasks",
        "ListNotifications",
    ],
    "vigil.v1.Machines": ["ListMachines", "ListAgents", "ListCommands", "ListExits"],
}


def service_config(health_service: str) -> str:
    """Round-robin over every address of the target, skipping replicas whose health
    service says NOT_SERVING (a draining or broken replica), and bounded retries of
    reads on UNAVAILABLE."""
    return json.dumps(
        {
            "loadBalancingConfig": [{"round_robin": {}}],
            "healthCheckConfig": {"serviceName": health_service},
            "methodConfig": [
                {
                    "name": [
                        {"service": svc, "method": m} for svc, ms in _IDEMPOTENT.items() for m in ms
                    ],
                    "retryPolicy": {
                        "maxAttempts": 4,
                        "initialBackoff": "0.1s",
                        "maxBackoff": "1s",
                        "backoffMultiplier": 2,
                        "retryableStatusCodes": ["UNAVAILABLE"],
                    },
                }
            ],
        }
    )


def channel_options(timings: Timings, health_service: str) -> list[tuple[str, Any]]:
    return [
        # HTTP/2 keepalive: a vanished server (no FIN) is noticed in time + timeout,
        # well before the participant's TTL, and the client resumes elsewhere.
        ("grpc.keepalive_time_ms", timings.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", timings.keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", 1),
        # gRPC core waits for a ping's ack for its *ping* timeout (a minute by default),
        # not keepalive_timeout: hold both to keepalive_timeout.
        ("grpc.http2.ping_timeout_ms", timings.keepalive_timeout_ms),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 1_000),
        ("grpc.enable_retries", 1),
        ("grpc.service_config", service_config(health_service)),
    ]


def _credentials(tls: TlsConfig) -> grpc.ChannelCredentials:
    ca, cert, key = tls.read()
    return grpc.ssl_channel_credentials(
        root_certificates=ca, private_key=key, certificate_chain=cert
    )


def _first_host(target: str) -> str | None:
    """The name to check the certificates against when the target lists several
    endpoints (`ipv4:A:P,B:P`): gRPC would check the whole list as one name, which no
    certificate carries. It is the first endpoint's address, so every replica's
    certificate must name it (or set VIGIL_TLS_SERVER_NAME to a name they all carry)."""
    if not target.startswith(("ipv4:", "ipv6:")) or "," not in target:
        return None
    first = target.split(":", 1)[1].split(",", 1)[0]
    return first.rsplit(":", 1)[0].strip("[]")


def open_channel(
    addr: str, config: ClientConfig, health_service: str, var: str = "VIGIL_ADDR"
) -> grpc.aio.Channel:
    target = grpc_target(addr, var)
    options = channel_options(config.timings, health_service) + list(config.channel_options)
    if not config.tls.enabled:
        return grpc.aio.insecure_channel(target, options=options)
    server_name = config.tls.server_name or _first_host(target)
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    return grpc.aio.secure_channel(target, _credentials(config.tls), options=options)
