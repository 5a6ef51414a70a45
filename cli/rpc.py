"""How CLI commands talk to Vigil: a client from the flags and environment (through
`vigil.client`), and every failure as one line with an exit code."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import AsyncIterator

import grpc

from vigil.client import Client, ClientConfig, RPCError
from vigil.core.errors import VigilError
from vigil.core.timings import Timings


class CliError(Exception):
    """A one-line message for the user, and the exit code to leave with."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def client_config(args: argparse.Namespace, timings: Timings | None = None) -> ClientConfig:
    """The client settings of a command: --addr and --token-file over the environment.
    A bad setting is a usage error (exit 2) naming it."""
    try:
        return ClientConfig.from_env(
            addr=getattr(args, "addr", None) or None,
            token_file=getattr(args, "token_file", None) or None,
            timings=timings,
        )
    except VigilError as exc:
        raise CliError(str(exc), 2) from None


def rpc_error(exc: RPCError, addr: str) -> CliError:
    """A refused or failed call as the one line the user sees."""
    if exc.code == grpc.StatusCode.UNAVAILABLE:
        return CliError(f"cannot reach Vigil at {addr}: {exc.message}")
    return CliError(str(exc))


@contextlib.asynccontextmanager
async def connected(config: ClientConfig, *, wait: bool = True) -> AsyncIterator[Client]:
    """A client for one command; any RPCError inside becomes a CliError line."""
    addr = config.tasks_addr
    async with Client(config) as client:
        if wait:
            try:
                await client.wait_ready()
            except RPCError as exc:
                raise CliError(exc.message) from None
        try:
            yield client
        except RPCError as exc:
            raise rpc_error(exc, addr) from None
