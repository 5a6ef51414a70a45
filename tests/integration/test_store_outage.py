"""With PostgreSQL stopped, what needs the store answers UNAVAILABLE with a message a
person can act on (never UNKNOWN or INTERNAL), on a stream as on a unary call, and
everything works again once the store is back."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from vigil import testing as harness
from vigil.core.embedded import EmbeddedPostgres
from vigil.v1 import liveness_pb2 as pb


async def test_a_stream_refused_by_a_stopped_store_ends_unavailable(
    own_pg: tuple[EmbeddedPostgres, str],
) -> None:
    pg, url = own_pg
    async with harness.local_server(url, harness.fast_timings()) as srv:
        await harness.make_room(srv)
        await asyncio.to_thread(pg.stop)
        ch, st = harness.stub(srv.addr)
        try:
            call = st.Session()
            await call.write(pb.SessionRequest(join=harness.join_request("room", "builder")))
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await asyncio.wait_for(call.read(), 10)
            assert exc.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "database is unavailable" in (exc.value.details() or "")

            with pytest.raises(grpc.aio.AioRpcError) as unary:
                await st.ListParticipants(pb.ListParticipantsRequest(), timeout=10)
            assert unary.value.code() == grpc.StatusCode.UNAVAILABLE

            await asyncio.to_thread(pg.start)
            call = st.Session()
            await call.write(pb.SessionRequest(join=harness.join_request("room", "builder")))
            first = await asyncio.wait_for(call.read(), 10)
            assert first.WhichOneof("msg") == "joined"
            call.cancel()
        finally:
            await ch.close()
