"""`python -m vigil.core.healthcheck`: ask a Vigil server on this host, through the
standard gRPC health service, whether it serves; exit 0 if it does, 1 if not.

For container health checks (the image's HEALTHCHECK, Kubernetes exec probes) it reads
the server's own settings, so it needs no flags next to the server it checks: the port
of `VIGIL_ADDR` (a wildcard host is dialled on loopback) and, when the server serves TLS
(`VIGIL_SERVER_TLS_CERT`/`_KEY`), the same TLS: it trusts `VIGIL_TLS_CA` (else the
server's certificate file), checks the name `VIGIL_TLS_SERVER_NAME` (else the first DNS
name of the server's certificate), and under mutual TLS (`VIGIL_SERVER_TLS_CLIENT_CA`)
presents the server's own certificate, as the task service does to the liveness service.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from vigil.core.config import DEFAULT_ADDR, parse_addr
from vigil.core.errors import ConfigError

_WILDCARDS = {"0.0.0.0": "127.0.0.1", "[::]": "[::1]", "::": "[::1]", "": "127.0.0.1"}


def local_target(addr: str) -> str:
    """Where to dial a server listening on `addr`: a wildcard host becomes loopback."""
    host, port = parse_addr(addr, "VIGIL_ADDR")
    return f"{_WILDCARDS.get(host, host)}:{port}"


def _first_dns_name(cert_pem: bytes) -> str | None:
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound):
        return None
    names = san.get_values_for_type(x509.DNSName)
    return names[0] if names else None


def _read(path: str, var: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{var} {path}: {exc.strerror or exc}") from None


def channel(target: str, env: Mapping[str, str]) -> grpc.Channel:
    """A channel to `target`, with the server's TLS when it serves TLS."""
    cert_file = env.get("VIGIL_SERVER_TLS_CERT")
    if not cert_file:
        return grpc.insecure_channel(target)
    cert = _read(cert_file, "VIGIL_SERVER_TLS_CERT")
    ca_file = env.get("VIGIL_TLS_CA")
    root = _read(ca_file, "VIGIL_TLS_CA") if ca_file else cert
    chain = key = None
    if env.get("VIGIL_SERVER_TLS_CLIENT_CA"):
        chain = cert
        key = _read(env.get("VIGIL_SERVER_TLS_KEY") or "", "VIGIL_SERVER_TLS_KEY")
    creds = grpc.ssl_channel_credentials(root, key, chain)
    name = env.get("VIGIL_TLS_SERVER_NAME") or _first_dns_name(cert)
    options = [("grpc.ssl_target_name_override", name)] if name else []
    return grpc.secure_channel(target, creds, options=options)


def check(target: str, env: Mapping[str, str], service: str = "", timeout: float = 3.0) -> str:
    """The health status name the server reports for `service` ("" = the whole server)."""
    with channel(target, env) as ch:
        reply = health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=timeout
        )
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    env = os.environ if env is None else env
    p = argparse.ArgumentParser(
        prog="python -m vigil.core.healthcheck",
        description="Exit 0 when the Vigil server on this host reports SERVING.",
    )
    p.add_argument("--addr", help="HOST:PORT to check (default: $VIGIL_ADDR, wildcard → loopback)")
    p.add_argument("--service", default="", help="a service name (default: the whole server)")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds (default 3)")
    args = p.parse_args(argv)
    try:
        target = local_target(args.addr or env.get("VIGIL_ADDR") or DEFAULT_ADDR)
        status = check(target, env, args.service, args.timeout)
    except ConfigError as exc:
        print(f"vigil healthcheck: {exc}", file=sys.stderr)
        return 2
    except grpc.RpcError as exc:
        code = exc.code() if isinstance(exc, grpc.Call) else None
        print(f"vigil healthcheck: {target}: {code.name if code else exc}", file=sys.stderr)
        return 1
    print(f"vigil healthcheck: {target}: {status}")
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
