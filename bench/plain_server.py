"""FOR MEASUREMENT ONLY: a Vigil server that trusts every caller. Never ship it, never
run it anywhere but a benchmark on this host.

The benchmarks' "plain" baseline: the real server (`vigil.server.running()`, the same
services, queries, rules and listener as `vigil up` / `vigil liveness serve`) with one
difference, its authenticator: `TrustEveryone` answers every call with an admin
principal and looks nothing up (no token parsed, hashed, cached or read; no stream
watched for revocation). What the real server costs on top of this is the price of
authentication; served with TLS, the price of authentication and TLS.

    python -m bench.plain_server up          # both services (as `vigil up`)
    python -m bench.plain_server liveness    # the liveness service (as `vigil liveness serve`)

Settings come from the environment as for `vigil` (DATABASE_URL is required: no embedded
PostgreSQL). It serves plaintext on loopback only and refuses anything else. It prints the
same `vigil: serving ... on HOST:PORT (plaintext; metrics http://HOST:PORT/metrics ...`
line as `vigil`, so the harness finds its ports the same way.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from typing import Any

from vigil.core import logs
from vigil.core.auth import Authenticator, Principal
from vigil.core.config import Settings, is_loopback_target, parse_addr
from vigil.core.server import start_metrics, steady_gc, wait_for_signal
from vigil.core.vocab import TokenKind
from vigil.server import running

SERVICES = {"up": ("liveness", "tasks"), "liveness": ("liveness",)}

# Every caller, whatever it sends (or does not send).
EVERYONE = Principal(TokenKind.ADMIN, "bench", token_id=None)


class TrustEveryone(Authenticator):
    """FOR MEASUREMENT ONLY: every call is an admin's, nothing looked up. A principal
    without a token id is never watched for revocation either (see `Authenticator.watch`)."""

    async def authenticate(self, context: Any) -> Principal:
        return EVERYONE


def _refuse_exposure(settings: Settings) -> None:
    if settings.tls is not None or settings.insecure:
        raise SystemExit("bench.plain_server: plaintext on loopback only (no TLS, no --insecure)")
    for addr, var in ((settings.addr, "VIGIL_ADDR"), (settings.metrics_addr, "VIGIL_METRICS_ADDR")):
        host, _port = parse_addr(addr, var)
        if not is_loopback_target(f"{host}:1"):
            raise SystemExit(f"bench.plain_server: {var} {addr} is not a loopback address")
    if not settings.database_url:
        raise SystemExit("bench.plain_server: DATABASE_URL is required")


async def serve(settings: Settings, services: tuple[str, ...]) -> int:
    assert settings.database_url is not None
    async with (
        running(settings, settings.database_url, services, authenticator=TrustEveryone) as vigil,
        steady_gc(vigil.registry),  # the same collector policy as `vigil up`
    ):
        metrics_port = start_metrics(settings.metrics_addr, vigil.registry, None)
        host = settings.addr.rsplit(":", 1)[0]
        mhost = settings.metrics_addr.rsplit(":", 1)[0]
        print(
            "vigil: bench.plain_server TRUSTS EVERY CALLER (no authentication): "
            "for measurement only",
            file=sys.stderr,
            flush=True,
        )
        print(
            f"vigil: serving {', '.join(services)} on {host}:{vigil.port} (plaintext; "
            f"metrics http://{mhost}:{metrics_port}/metrics, database: DATABASE_URL, "
            f"replica {settings.replica_id}, authentication: none (bench only))",
            file=sys.stderr,
            flush=True,
        )
        sig = await wait_for_signal()
        print(f"vigil: signal {sig}: shutting down gracefully", file=sys.stderr, flush=True)
    return 0


def main() -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.plain_server", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("services", choices=sorted(SERVICES))
    args = p.parse_args()
    settings = Settings.from_env(os.environ)
    _refuse_exposure(settings)
    logs.configure(settings.log_level, "text")
    return asyncio.run(serve(settings, SERVICES[args.services]))


if __name__ == "__main__":
    sys.exit(main())
