"""Where Vigil is and how to prove who we are, read once: endpoints, TLS files and the
bearer token, from flags (passed in) or the environment.

Endpoints: `HOST:PORT`; several replicas as `IP:PORT,IP:PORT` (gRPC's round-robin load
balancing with health checks spreads calls over them and leaves a dead one at once); or
any gRPC target such as `dns:///vigil.example.com:7070` (every address the name
resolves to). The liveness and task services may live apart: `VIGIL_LIVENESS_ADDR` and
`VIGIL_TASKS_ADDR` default to `VIGIL_ADDR`.

The token is looked up in this order: an explicit token file (`--token-file`),
`VIGIL_TOKEN_FILE`, `VIGIL_TOKEN`, then `$VIGIL_DATA_DIR/admin.token` (the bootstrap
token `vigil up` writes for the people on its own host).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from vigil.client._errors import ClientConfigError
from vigil.core.config import grpc_target, is_loopback_target
from vigil.core.timings import Timings

DEFAULT_ADDR = "127.0.0.1:7070"
DEFAULT_DATA_DIR = ".vigil"
ADMIN_TOKEN_FILE = "admin.token"


def read_secret_file(path: Path, what: str) -> str:
    """The one-line secret in an owner-only file; never echoes the content."""
    where = f"{what} {path}"
    try:
        with path.open("rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise ClientConfigError(f"{where} is not a regular file")
            mode = stat.S_IMODE(st.st_mode)
            if mode & 0o077:
                raise ClientConfigError(
                    f"{where} is readable by others (mode {mode:04o}); chmod 600 {path}"
                )
            raw = f.read(64 * 1024)
    except FileNotFoundError:
        raise ClientConfigError(f"{where} does not exist") from None
    except OSError as exc:
        raise ClientConfigError(f"cannot read {where}: {exc.strerror or exc}") from None
    except ValueError:  # a NUL byte in the path: no file can have that name
        raise ClientConfigError(f"{what} {str(path)!r} is not a valid path") from None
    try:
        secret = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ClientConfigError(f"{where} is not UTF-8 text") from None
    if not secret or any(c.isspace() for c in secret):
        raise ClientConfigError(f"{where} must hold one token on one line")
    return secret


@dataclass(frozen=True)
class TlsConfig:
    """Files for TLS: the CA that signed the server's certificate, and for mutual TLS
    this client's certificate and key. `server_name` overrides the name checked
    against the server's certificate (default: the host being dialled)."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    server_name: str | None = None

    @property
    def enabled(self) -> bool:
        return self.ca_file is not None

    def read(self) -> tuple[bytes, bytes | None, bytes | None]:
        """(ca, cert, key) contents; a missing or unreadable file is one clear error."""

        def load(path: Path | None, var: str) -> bytes | None:
            if path is None:
                return None
            try:
                return path.read_bytes()
            except OSError as exc:
                raise ClientConfigError(f"{var} {path}: {exc.strerror or exc}") from None

        if (self.cert_file is None) != (self.key_file is None):
            raise ClientConfigError("VIGIL_TLS_CERT and VIGIL_TLS_KEY go together")
        if self.cert_file is not None and self.ca_file is None:
            raise ClientConfigError("a client certificate needs VIGIL_TLS_CA (the server's CA)")
        ca = load(self.ca_file, "VIGIL_TLS_CA")
        assert ca is not None
        return ca, load(self.cert_file, "VIGIL_TLS_CERT"), load(self.key_file, "VIGIL_TLS_KEY")


@dataclass(frozen=True)
class ClientConfig:
    """Everything a `Client` needs to reach Vigil; `from_env` reads it the usual way."""

    liveness_addr: str = DEFAULT_ADDR
    tasks_addr: str = DEFAULT_ADDR
    token: str | None = field(default=None, repr=False)
    tls: TlsConfig = field(default_factory=TlsConfig)
    timings: Timings = field(default_factory=Timings)
    # Extra gRPC channel arguments (e.g. a separate connection per client).
    channel_options: tuple[tuple[str, int | str], ...] = ()
    # Send the token over plaintext to a host other than this one (VIGIL_INSECURE=1).
    insecure: bool = False

    def check_transport(self) -> None:
        """A credential travels in plaintext only to this host, unless `insecure`."""
        if self.token is None or self.tls.enabled or self.insecure:
            return
        for addr, var in (
            (self.liveness_addr, "VIGIL_LIVENESS_ADDR"),
            (self.tasks_addr, "VIGIL_ADDR"),
        ):
            if not is_loopback_target(grpc_target(addr, var)):
                raise ClientConfigError(
                    f"refusing to send a credential in plaintext to {addr}: set VIGIL_TLS_CA "
                    "to the CA that signed its certificate (or, knowing that anyone on the "
                    "path can read it, VIGIL_INSECURE=1)"
                )

    @classmethod
    def from_env(
        cls,
        env: Mapping[str, str] | None = None,
        *,
        addr: str | None = None,
        token_file: str | Path | None = None,
        data_dir: str | Path | None = None,
        timings: Timings | None = None,
    ) -> ClientConfig:
        env = os.environ if env is None else env
        base = addr or env.get("VIGIL_ADDR") or DEFAULT_ADDR
        liveness = (None if addr else env.get("VIGIL_LIVENESS_ADDR")) or base
        tasks = (None if addr else env.get("VIGIL_TASKS_ADDR")) or base
        for value, var in ((liveness, "VIGIL_LIVENESS_ADDR"), (tasks, "VIGIL_TASKS_ADDR")):
            grpc_target(value, var)  # refuse a malformed address now, naming the variable

        def path(var: str) -> Path | None:
            value = env.get(var)
            return Path(value) if value else None

        tls = TlsConfig(
            ca_file=path("VIGIL_TLS_CA"),
            cert_file=path("VIGIL_TLS_CERT"),
            key_file=path("VIGIL_TLS_KEY"),
            server_name=env.get("VIGIL_TLS_SERVER_NAME") or None,
        )
        folder = Path(data_dir or env.get("VIGIL_DATA_DIR") or DEFAULT_DATA_DIR)
        return cls(
            liveness_addr=liveness,
            tasks_addr=tasks,
            token=find_token(env, token_file, folder),
            tls=tls,
            timings=timings or Timings.from_env(env),
            insecure=(env.get("VIGIL_INSECURE") or "").strip().lower() in ("1", "true", "yes"),
        )

    def with_token(self, token: str | None) -> ClientConfig:
        return replace(self, token=token)


def find_token(env: Mapping[str, str], token_file: str | Path | None, data_dir: Path) -> str | None:
    """The bearer token by the documented lookup order; None when there is none."""
    if token_file:
        return read_secret_file(Path(token_file), "token file")
    if env.get("VIGIL_TOKEN_FILE"):
        return read_secret_file(Path(env["VIGIL_TOKEN_FILE"]), "VIGIL_TOKEN_FILE")
    if env.get("VIGIL_TOKEN"):
        token = env["VIGIL_TOKEN"].strip()
        if not token or any(c.isspace() for c in token):
            raise ClientConfigError("VIGIL_TOKEN must be one token with no spaces")
        return token
    bootstrap = data_dir / ADMIN_TOKEN_FILE
    if bootstrap.exists():
        return read_secret_file(bootstrap, "bootstrap token file")
    return None
