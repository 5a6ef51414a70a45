"""Configuration, read once from the environment at the edge and passed down."""

from __future__ import annotations

import ipaddress
import os
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from vigil.core.auth.tls import ServerTls
from vigil.core.errors import ConfigError
from vigil.core.limits import Limits
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


_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:")


def _host_port(item: str, var: str) -> tuple[str, int]:
    host, sep, port = item.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535:
        raise ConfigError(
            f"{var} must be HOST:PORT, IP:PORT,IP:PORT or a gRPC target such as "
            f"dns:///HOST:PORT; got {item[:80]!r}"
        )
    return host, int(port)


def grpc_target(addr: str, var: str = "VIGIL_ADDR") -> str:
    """The gRPC target for an address setting (see the module docstring)."""
    addr = addr.strip()
    if addr.startswith(_SCHEMES):
        return addr
    items = [a for a in addr.split(",") if a.strip()]
    if not items:
        raise ConfigError(f"{var} is empty")
    if len(items) == 1:
        host, port = _host_port(items[0], var)
        return f"{host}:{port}"
    families: set[int] = set()
    parts = []
    for item in items:
        host, port = _host_port(item, var)
        try:
            ip = ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            raise ConfigError(
                f"{var}: several endpoints must be IP addresses ({host!r} is a name); "
                "for names give one DNS name that resolves to every replica, "
                "e.g. dns:///vigil.example.com:7070"
            ) from None
        families.add(ip.version)
        parts.append(f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}")
    if len(families) > 1:
        raise ConfigError(f"{var}: do not mix IPv4 and IPv6 endpoints")
    return ("ipv6:" if 6 in families else "ipv4:") + ",".join(parts)


def is_loopback_target(target: str) -> bool:
    """Whether every endpoint of a target is this host (127.0.0.0/8, ::1, localhost)."""
    if target.startswith(("unix:", "unix-abstract:")):
        return True
    body = target.split(":", 1)[1] if target.startswith(("ipv4:", "ipv6:")) else target
    if body.startswith("dns:"):
        body = body.removeprefix("dns:").lstrip("/")
    for item in body.split(","):
        host = item.rpartition(":")[0].strip("[]")
        if host == "localhost":
            continue
        try:
            if not ipaddress.ip_address(host).is_loopback:
                return False
        except ValueError:
            return False
    return True


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
    # TLS of the listeners (None: plaintext, allowed on loopback only unless `insecure`).
    tls: ServerTls | None = None
    insecure: bool = False
    reflection: bool = False
    limits: Limits = field(default_factory=Limits)
    # An admin token to accept (created if missing), e.g. from a deployment's secret.
    bootstrap_token: str | None = field(default=None, repr=False)
    # Each service's own database login (default: DATABASE_URL taking the service's role).
    liveness_database_url: str | None = field(default=None, repr=False)
    tasks_database_url: str | None = field(default=None, repr=False)
    # Apply migrations and grants at start-up (needs DATABASE_URL to be the owner).
    migrate: bool = True

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        addr = env.get("VIGIL_ADDR") or DEFAULT_ADDR
        parse_addr(addr, "VIGIL_ADDR")
        metrics_addr = env.get("VIGIL_METRICS_ADDR") or DEFAULT_METRICS_ADDR
        parse_addr(metrics_addr, "VIGIL_METRICS_ADDR")
        url = _database_url(env, "DATABASE_URL")
        live_url = _database_url(env, "VIGIL_LIVENESS_DATABASE_URL")
        tasks_url = _database_url(env, "VIGIL_TASKS_DATABASE_URL")
        migrate = (env.get("VIGIL_MIGRATE") or "1").strip() not in ("0", "false", "no")
        if url is None and (live_url or tasks_url) and migrate:
            raise ConfigError(
                "with only the services' own database URLs set, set VIGIL_MIGRATE=0 and "
                "run `vigil migrate` with the owner's DATABASE_URL before starting"
            )
        level = (env.get("VIGIL_LOG_LEVEL") or "INFO").upper()
        if level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ConfigError(
                f"VIGIL_LOG_LEVEL must be DEBUG, INFO, WARNING or ERROR, got {level!r}"
            )
        liveness_addr = env.get("VIGIL_LIVENESS_ADDR") or None
        if liveness_addr is not None:
            grpc_target(liveness_addr, "VIGIL_LIVENESS_ADDR")
        cert, key = env.get("VIGIL_SERVER_TLS_CERT"), env.get("VIGIL_SERVER_TLS_KEY")
        client_ca = env.get("VIGIL_SERVER_TLS_CLIENT_CA")
        if bool(cert) != bool(key):
            raise ConfigError("--tls-cert and --tls-key (VIGIL_SERVER_TLS_CERT/_KEY) go together")
        if client_ca and not cert:
            raise ConfigError("--tls-client-ca needs --tls-cert and --tls-key")
        tls = (
            ServerTls(Path(cert), Path(key), Path(client_ca) if client_ca else None)
            if cert and key
            else None
        )
        settings = cls(
            liveness_addr=liveness_addr,
            addr=addr,
            metrics_addr=metrics_addr,
            database_url=url,
            data_dir=Path(env.get("VIGIL_DATA_DIR") or ".vigil"),
            timings=Timings.from_env(env),
            log_level=level,
            tls=tls,
            insecure=_flag(env, "VIGIL_INSECURE"),
            reflection=_flag(env, "VIGIL_REFLECTION"),
            limits=Limits.from_env(env),
            bootstrap_token=env.get("VIGIL_BOOTSTRAP_TOKEN") or None,
            liveness_database_url=live_url,
            tasks_database_url=tasks_url,
            migrate=migrate,
        )
        settings.check_exposure()
        return settings

    def check_exposure(self) -> None:
        """Plaintext only on loopback, unless the operator said --insecure."""
        if self.tls is not None or self.insecure:
            return
        for addr, var in ((self.addr, "VIGIL_ADDR"), (self.metrics_addr, "VIGIL_METRICS_ADDR")):
            host, _port = parse_addr(addr, var)
            if not is_loopback_target(f"{host}:1"):
                raise ConfigError(
                    f"{var} {addr} is not a loopback address: serve it with TLS "
                    "(--tls-cert and --tls-key) or, knowing what that exposes, --insecure"
                )


def _database_url(env: Mapping[str, str], var: str) -> str | None:
    url = env.get(var) or None
    if url is not None and not url.startswith(("postgres://", "postgresql://")):
        raise ConfigError(f"{var} must start with postgresql:// or postgres://")
    return url


def _flag(env: Mapping[str, str], var: str) -> bool:
    value = (env.get(var) or "").strip().lower()
    if value in ("", "0", "false", "no"):
        return False
    if value in ("1", "true", "yes"):
        return True
    raise ConfigError(f"{var} must be 1 or 0, got {value!r}")
