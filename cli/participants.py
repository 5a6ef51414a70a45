"""`vigil participants`: who is alive, as a table or JSON."""

from __future__ import annotations

import json
from typing import Any

from vigil.cli.rpc import channel, rpc_error, wait_ready
from vigil.core.timefmt import from_proto, rfc3339
from vigil.core.timings import Timings
from vigil.v1 import liveness_pb2 as pb
from vigil.v1 import liveness_pb2_grpc as pb_grpc

_KIND = {pb.AGENT_KIND_REMOTE: "remote", pb.AGENT_KIND_CUSTOM: "custom"}
_STATUS = {pb.PARTICIPANT_STATUS_LIVE: "live", pb.PARTICIPANT_STATUS_OFFLINE: "offline"}
_REASON = {
    v: k.removeprefix("OFFLINE_REASON_").lower()
    for k, v in pb.OfflineReason.items()
    if v != pb.OFFLINE_REASON_UNSPECIFIED
}


def participant_json(p: pb.Participant) -> dict[str, Any]:
    return {
        "chatroom": p.chatroom,
        "role": p.role,
        "kind": _KIND.get(p.kind, "unknown"),
        "status": _STATUS.get(p.status, "unknown"),
        "epoch": p.epoch,
        "connection_id": p.connection_id,
        "ready_until": rfc3339(from_proto(p.ready_until)) if p.HasField("ready_until") else None,
        "joined_at": rfc3339(from_proto(p.joined_at)) if p.HasField("joined_at") else None,
        "offline_at": rfc3339(from_proto(p.offline_at)) if p.HasField("offline_at") else None,
        "offline_reason": _REASON.get(p.offline_reason),
        "revision": p.revision,
    }


def render_table(rows: list[dict[str, Any]]) -> str:
    cols = ["chatroom", "role", "kind", "status", "epoch", "ready_until", "offline_reason"]
    if not rows:
        return "no participants"
    cells = [[str(r[c] if r[c] is not None else "-") for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(cols, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(line.rstrip() for line in lines)


async def participants(
    addr: str, chatroom: str | None, live_only: bool, as_json: bool, timings: Timings
) -> int:
    import grpc

    ch = channel(addr, timings)
    try:
        await wait_ready(ch, addr)
        stub = pb_grpc.LivenessStub(ch)
        try:
            reply = await stub.ListParticipants(
                pb.ListParticipantsRequest(chatroom=chatroom or "", live_only=live_only),
                timeout=10,
            )
        except grpc.aio.AioRpcError as exc:
            raise rpc_error(exc, addr) from None
    finally:
        await ch.close()
    rows = [participant_json(p) for p in reply.participants]
    if as_json:
        print(json.dumps(rows, indent=2))
    else:
        print(render_table(rows))
    return 0
