"""Talking to a Vigil server from the CLI: channels, and errors as one line."""

from __future__ import annotations

import grpc

from vigil.core.config import parse_addr
from vigil.core.server import client_options
from vigil.core.timings import Timings


class CliError(Exception):
    """A one-line message for the user, and the exit code to leave with."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def channel(addr: str, timings: Timings) -> grpc.aio.Channel:
    parse_addr(addr, "--addr/VIGIL_ADDR")
    return grpc.aio.insecure_channel(addr, options=client_options(timings))


async def wait_ready(ch: grpc.aio.Channel, addr: str, timeout: float = 5.0) -> None:
    import asyncio

    try:
        await asyncio.wait_for(ch.channel_ready(), timeout)
    except TimeoutError:
        raise CliError(f"cannot reach Vigil at {addr} (is `vigil up` running?)") from None


def rpc_error(exc: grpc.aio.AioRpcError, addr: str) -> CliError:
    code = exc.code()
    if code == grpc.StatusCode.UNAVAILABLE:
        return CliError(f"cannot reach Vigil at {addr}: {exc.details()}")
    return CliError(f"{exc.details()} ({code.name})")
