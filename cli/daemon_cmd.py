"""`vigil daemon start` (and the `vigil-daemon` entry point): run this machine's daemon."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from prometheus_client import CollectorRegistry

from vigil.cli.rpc import CliError, connected
from vigil.client import ClientConfig
from vigil.core import validation
from vigil.core.errors import VigilError
from vigil.core.server import start_metrics
from vigil.daemon.metrics import DaemonMetrics


def agent_environment(
    config: ClientConfig, agent_tls: tuple[str | None, str | None] = (None, None)
) -> dict[str, str]:
    """Where the agents this daemon starts find Vigil: the daemon's own endpoints and
    TLS trust, and under mutual TLS the agents' own client certificate (never the
    daemon's credentials: each agent gets its own token)."""
    cert, key = agent_tls
    if bool(cert) != bool(key):
        raise CliError("--agent-tls-cert and --agent-tls-key go together", 2)
    env = {
        "VIGIL_ADDR": config.tasks_addr,
        "VIGIL_LIVENESS_ADDR": config.liveness_addr,
        "VIGIL_TASKS_ADDR": config.tasks_addr,
    }
    if config.tls.ca_file is not None:
        env["VIGIL_TLS_CA"] = str(config.tls.ca_file.resolve())
    if config.tls.server_name:
        env["VIGIL_TLS_SERVER_NAME"] = config.tls.server_name
    if cert and key:
        for var, path in (("VIGIL_TLS_CERT", cert), ("VIGIL_TLS_KEY", key)):
            if not Path(path).is_file():
                raise CliError(f"--agent-tls-{var[10:].lower()} {path}: no such file", 2)
            env[var] = str(Path(path).resolve())
    return env


async def daemon_start(
    config: ClientConfig,
    machine_id: str,
    credential_file: str | None,
    state_dir: str | None,
    leave_agents: bool,
    metrics_addr: str | None = None,
    harness_file: str | None = None,
    allow_any_command: bool = False,
    agent_tls: tuple[str | None, str | None] = (None, None),
) -> int:
    from vigil.cli.machine_cmds import (
        default_credential_path,
        default_harness_path,
        read_credential,
    )
    from vigil.daemon.harnesses import Harnesses
    from vigil.daemon.runner import Daemon

    try:
        validation.name(machine_id, "--machine-id")
    except VigilError as exc:
        raise CliError(str(exc), 2) from None
    path = Path(credential_file) if credential_file else default_credential_path(machine_id)
    if config.tls.cert_file is not None and not credential_file and not path.exists():
        # Mutual TLS: the machine's client certificate is its identity.
        identity = config.with_token(None)
        proof = f"its client certificate {config.tls.cert_file}"
    else:
        file_machine, credential = read_credential(path)
        if file_machine != machine_id:
            raise CliError(
                f"{path} holds the credential of machine {file_machine!r}, not {machine_id!r}"
            )
        identity = config.with_token(credential)
        proof = f"credential {path}"
    harnesses = Harnesses.load(
        Path(harness_file) if harness_file else default_harness_path(machine_id),
        allow_any_command=allow_any_command,
    )
    data = Path(os.environ.get("VIGIL_DATA_DIR") or ".vigil")
    folder = Path(state_dir) if state_dir else data / "daemon" / machine_id
    registry = CollectorRegistry()
    metrics = DaemonMetrics(registry)
    where = ""
    if metrics_addr:
        port = start_metrics(metrics_addr, registry)
        where = f", metrics http://{metrics_addr.rsplit(':', 1)[0]}:{port}/metrics"
    env = agent_environment(config, agent_tls)
    async with connected(identity) as client:
        runs = ", ".join(sorted(harnesses.programs)) or "no harnesses"
        anything = "; and any command line" if harnesses.allow_any_command else ""
        print(
            f"vigil: daemon for machine {machine_id} serving {config.tasks_addr} "
            f"(as {proof}; runs {runs}{anything}; state in {folder}{where})",
            file=sys.stderr,
            flush=True,
        )
        daemon = Daemon(
            client,
            machine_id,
            folder,
            config.timings,
            agent_env=env,
            harnesses=harnesses,
            stop_agents_on_exit=not leave_agents,
            metrics=metrics,
        )
        return await daemon.run()


def main() -> None:
    """The `vigil-daemon` entry point: `vigil daemon start` under its own name."""
    from vigil.cli.main import main as vigil_main

    sys.exit(vigil_main(["daemon", "start", *sys.argv[1:]]))
