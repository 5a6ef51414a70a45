"""gRPC server plumbing shared by every service: keepalive, health, reflection,
Prometheus metrics over HTTP, and graceful shutdown in a fixed order."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import platform
import signal
import time
from collections.abc import AsyncIterator, Callable
from typing import Protocol

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, Histogram, Info, start_http_server

from vigil.core.aio import cancel_and_wait
from vigil.core.auth.tls import ServerTls
from vigil.core.config import parse_addr
from vigil.core.errors import ConfigError
from vigil.core.timings import Timings
from vigil.core.version import VERSION

log = logging.getLogger(__name__)


class Service(Protocol):
    """One service hosted by a server."""

    service_names: list[str]

    def register(self, server: grpc.aio.Server) -> None: ...

    async def start(self) -> None: ...

    async def drain(self) -> None:
        """Graceful shutdown: tell streams to reconnect elsewhere, mark nobody offline."""
        ...

    async def close(self) -> None: ...


HEALTH_POLL_S = 0.25  # how often health looks at the services' stores


def _status(ok: bool) -> health_pb2.HealthCheckResponse.ServingStatus.ValueType:
    return (
        health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
    )


def server_options(timings: Timings) -> list[tuple[str, int]]:
    return [
        # Ping idle clients so a vanished peer's transport is closed (layer 3).
        ("grpc.keepalive_time_ms", timings.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", timings.keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", 1),
        # gRPC core closes a transport whose ping goes unanswered after its *ping*
        # timeout (a minute by default), whatever keepalive_timeout says: hold both
        # to keepalive_timeout, so a half-open client is gone in time + timeout.
        ("grpc.http2.ping_timeout_ms", timings.keepalive_timeout_ms),
        ("grpc.http2.max_pings_without_data", 0),
        # Let clients ping as often as their own keepalive says.
        ("grpc.http2.min_ping_interval_without_data_ms", min(timings.keepalive_time_ms, 5_000)),
        ("grpc.http2.max_ping_strikes", 0),
        ("grpc.so_reuseport", 0),
    ]


class Server:
    """A started gRPC server hosting `services`; `port` is the bound port."""

    def __init__(
        self,
        server: grpc.aio.Server,
        port: int,
        health_servicer: health.aio.HealthServicer,
        services: list[Service],
        timings: Timings,
    ) -> None:
        self.grpc = server
        self.port = port
        self.health = health_servicer
        self.services = services
        self.timings = timings
        self._store_watch = asyncio.create_task(self._watch_stores(), name="health-stores")

    async def _watch_stores(self) -> None:
        """The server's overall health ("") follows the stores: NOT_SERVING while a
        service's store is unreachable (its `store_ok` is False), SERVING again when it
        answers; open streams are not touched. The per-service names, which clients'
        load balancing checks, stay SERVING: replicas share the store, so no replica is
        better than this one, and a caller gets this server's own UNAVAILABLE, saying
        the database is away, rather than "no healthy backend"."""
        shown = True
        while True:
            ok = all(bool(getattr(svc, "store_ok", True)) for svc in self.services)
            if ok != shown:
                shown = ok
                await self.health.set("", _status(ok))
            await asyncio.sleep(HEALTH_POLL_S)

    async def stop(self) -> None:
        """health NOT_SERVING -> stop accepting RPCs -> tell streams to reconnect ->
        wait for the grace -> close the services."""
        grace = self.timings.shutdown_grace_ms / 1000
        stopping: asyncio.Task[None] | None = None
        await cancel_and_wait(self._store_watch)
        try:
            await self.health.enter_graceful_shutdown()
            stopping = asyncio.create_task(self.grpc.stop(grace))
            for svc in self.services:
                try:
                    await svc.drain()
                except Exception:
                    log.exception("draining a service failed")
        finally:
            await (stopping if stopping is not None else self.grpc.stop(grace))
            for svc in reversed(self.services):
                try:
                    await svc.close()
                except Exception:
                    log.exception("closing a service failed")


async def create_server(
    addr: str,
    services: list[Service],
    timings: Timings,
    on_bound: Callable[[int], None] | None = None,
    *,
    tls: ServerTls | None = None,
    reflection_on: bool = False,
) -> Server:
    """Bind (with TLS when given), start the services, then serve. `on_bound(port)` runs
    once the port is known and before the services start (port 0 binds a free port).
    Health checks are open to all; reflection, when on, lists every service."""
    host, port = parse_addr(addr, "VIGIL_ADDR")
    server = grpc.aio.server(options=server_options(timings))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [health_pb2.DESCRIPTOR.services_by_name["Health"].full_name]
    for svc in services:
        svc.register(server)
        names.extend(svc.service_names)
    if reflection_on:
        reflection.enable_server_reflection([*names, reflection.SERVICE_NAME], server)
    bind_host = f"[{host.strip('[]')}]" if ":" in host.strip("[]") else host
    try:
        if tls is not None:
            bound = server.add_secure_port(f"{bind_host}:{port}", tls.credentials())
        else:
            bound = server.add_insecure_port(f"{bind_host}:{port}")
    except RuntimeError:  # grpc raises rather than returning 0 on a failed bind
        bound = 0
    if bound == 0:
        raise ConfigError(f"cannot listen on {addr}: address in use or not available")
    if on_bound is not None:
        on_bound(bound)
    for svc in services:
        await svc.start()
    await server.start()
    for svc in services:
        for name in svc.service_names:
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    return Server(server, bound, health_servicer, services, timings)


# Python's cyclic garbage collector, kept off the serving path. Its automatic full
# collection walks every tracked object: ~170 per connected agent (gRPC call state,
# tasks, coroutines), 0.35 s at 2,500 agents on a loaded 2-core machine, and the steady
# stream of beats triggered one every ~15 s, stalling every RPC meanwhile. A server
# process therefore freezes what start-up made (never garbage, never scanned again),
# keeps the young collections (cheap: they scan only new objects) and runs the full
# collection itself, every FULL_GC_S, so such a pause comes once in that while.
FULL_GC_S = 600.0
NO_AUTOMATIC_FULL = 2**31 - 1  # gc threshold of the oldest generation: never reached


class Collector(Protocol):
    """What GcSchedule uses of the `gc` module (a fake in tests)."""

    def collect(self) -> int: ...

    def freeze(self) -> None: ...

    def unfreeze(self) -> None: ...

    def get_threshold(self) -> tuple[int, int, int]: ...

    def set_threshold(self, threshold0: int, threshold1: int, threshold2: int) -> None: ...


class GcSchedule:
    """The collector's policy in a server process: `start()` once the services serve,
    `stop()` before they close (the previous thresholds back, start-up unfrozen)."""

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        interval_s: float = FULL_GC_S,
        *,
        collector: Collector = gc,
        timer: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.interval_s = interval_s
        self._gc = collector
        self._timer = timer
        self._saved: tuple[int, int, int] | None = None
        self._task: asyncio.Task[None] | None = None
        self.pause = Histogram(
            "vigil_gc_full_pause_seconds",
            "Full garbage collections of this process (every FULL_GC_S): how long each "
            "held the event loop",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
            registry=registry,
        )

    def start(self) -> None:
        self._gc.collect()
        self._gc.freeze()
        self._saved = self._gc.get_threshold()
        young, middle = self._saved[0], self._saved[1]
        self._gc.set_threshold(young, middle, NO_AUTOMATIC_FULL)
        self._task = asyncio.create_task(self._run(), name="gc-full")

    def collect(self) -> float:
        """One full collection now; its pause in seconds."""
        began = self._timer()
        found = self._gc.collect()
        took = self._timer() - began
        self.pause.observe(took)
        log.debug("full garbage collection: %.3f s, %d unreachable objects", took, found)
        return took

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            self.collect()

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)
            self._task = None
        if self._saved is not None:
            self._gc.set_threshold(*self._saved)
            self._gc.unfreeze()
            self._saved = None


@contextlib.asynccontextmanager
async def steady_gc(registry: CollectorRegistry) -> AsyncIterator[GcSchedule]:
    """The collector's policy for the life of a serving process (see GcSchedule)."""
    schedule = GcSchedule(registry)
    schedule.start()
    try:
        yield schedule
    finally:
        await schedule.stop()


def start_metrics(addr: str, registry: CollectorRegistry, tls: ServerTls | None = None) -> int:
    """Serve /metrics over HTTP (HTTPS with `tls`), `vigil_build_info` included; returns
    the bound port."""
    host, port = parse_addr(addr, "VIGIL_METRICS_ADDR")
    Info("vigil_build", "What this process runs", registry=registry).info(
        {
            "version": VERSION,
            "python": platform.python_version(),
            "grpcio": grpc.__version__,
        }
    )
    try:
        httpd, _thread = start_http_server(
            port,
            addr=host.strip("[]"),
            registry=registry,
            certfile=str(tls.cert_file) if tls else None,
            keyfile=str(tls.key_file) if tls else None,
        )
    except OSError as exc:
        raise ConfigError(f"cannot serve metrics on {addr}: {exc.strerror}") from exc
    return int(httpd.server_port)


async def wait_for_signal() -> int:
    """Wait for SIGTERM or SIGINT; returns the signal number."""
    loop = asyncio.get_running_loop()
    got: asyncio.Future[int] = loop.create_future()

    def _got(sig: int) -> None:
        if not got.done():
            got.set_result(sig)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, _got, sig)
    try:
        return await got
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
