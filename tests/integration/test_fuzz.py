"""Property-based fuzzing of the wire contract against a real server and PostgreSQL:
every unary and server-streaming RPC with requests built from its descriptor (control
characters, NULs, huge and negative numbers, out-of-range timestamps, oversized
fields, unknown enum values) gets a caller's-mistake status or an answer — never
INTERNAL, UNKNOWN or UNAVAILABLE — and a refused request changes nothing in the
database; random message orders on both bidirectional streams always end with a
status within a second."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vigil import testing as harness
from vigil.core.vocab import AgentKind
from vigil.task_service.model import Role
from vigil.v1 import liveness_pb2, machines_pb2, tasks_pb2, tokens_pb2
from vigil.v1 import liveness_pb2_grpc as lpb_grpc
from vigil.v1 import machines_pb2_grpc as mpb_grpc
from vigil.v1 import tasks_pb2_grpc as tpb_grpc
from vigil.v1 import tokens_pb2_grpc as kpb_grpc

pytestmark = pytest.mark.slow

ANSWERS = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
STUBS = {
    "vigil.v1.Liveness": lpb_grpc.LivenessStub,
    "vigil.v1.Tasks": tpb_grpc.TasksStub,
    "vigil.v1.Machines": mpb_grpc.MachinesStub,
    "vigil.v1.Tokens": kpb_grpc.TokensStub,
}
# Every table of every schema, as one fingerprint: a refused request changes none.
TABLES = (
    "liveness.participants",
    "liveness.events",
    "liveness.revision",
    "tasks.chatrooms",
    "tasks.roles",
    "tasks.tasks",
    "tasks.transitions",
    "tasks.notifications",
    "tasks.machines",
    "tasks.agents",
    "tasks.agent_exits",
    "tasks.commands",
    "auth.tokens",
)
FINGERPRINT = " UNION ALL ".join(
    f"SELECT '{t}', md5(coalesce(string_agg(x::text, ',' ORDER BY x::text), '')) FROM {t} x"
    for t in TABLES
)

# -- values a fuzzer would send --------------------------------------------------------

NAMES = st.sampled_from(["room", "builder", "m1", "reviewer", "a", ""])
NASTY = st.one_of(
    st.text(max_size=40),
    st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=31), min_size=1, max_size=8),
    st.sampled_from(
        ["room\n", "a\x00b", "x" * 70_000, "é" * 70, "../etc", "vigil.machines", " ", "\u202e"]
    ),
    st.uuids().map(str),
    NAMES,
)
_INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}


def _int(lo: int, hi: int) -> st.SearchStrategy[int]:
    edges = [v for v in (0, 1, -1, 2, 2**31 - 1, 2**40, -(2**31), lo, hi) if lo <= v <= hi]
    return st.one_of(st.sampled_from(edges), st.integers(lo, hi))


# Fields that name something: mostly what exists (so the nasty values reach the code
# behind the lookups), sometimes anything.
KNOWN = {
    "chatroom": st.just("room"),
    "name": st.just("room"),
    "role": st.sampled_from(["builder", "reviewer"]),
    "machine_id": st.just("m1"),
    "connection_id": st.uuids().map(str),
}


def _scalar(f: Any) -> st.SearchStrategy[Any]:
    if f.type == FieldDescriptor.TYPE_STRING:
        known = KNOWN.get(f.name)
        return st.one_of(known, known, NASTY) if known is not None else NASTY
    if f.type == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if f.type == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=64)
    if f.type == FieldDescriptor.TYPE_ENUM:
        return st.integers(-3, 12)  # known values and unknown ones
    if f.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return st.floats(allow_nan=True)
    lo, hi = _INT_RANGES[f.type]
    return _int(lo, hi)


def message(desc: Any, depth: int = 0) -> st.SearchStrategy[dict[str, Any]]:
    """Field values for a message of `desc` (any subset of its fields)."""
    parts: dict[str, st.SearchStrategy[Any]] = {}
    for f in desc.fields:
        if f.type == FieldDescriptor.TYPE_MESSAGE:
            if f.message_type.full_name == "google.protobuf.Timestamp":
                value: st.SearchStrategy[Any] = st.fixed_dictionaries(
                    {"seconds": _int(-(2**40), 2**40), "nanos": _int(-(2**31), 2**31 - 1)}
                )
            elif depth >= 2:
                continue
            else:
                value = message(f.message_type, depth + 1)
        else:
            value = _scalar(f)
        if f.is_repeated:
            value = st.lists(value, max_size=3)
        parts[f.name] = value
    return st.fixed_dictionaries({}, optional=parts)


def _desc(d: Any) -> Descriptor:
    assert d is not None
    return d


def build(cls: type[Message], fields: dict[str, Any]) -> Message:
    msg = cls()
    for name, value in fields.items():
        f = cls.DESCRIPTOR.fields_by_name[name]
        target = getattr(msg, name)
        if f.type == FieldDescriptor.TYPE_MESSAGE:
            sub = GetMessageClass(_desc(f.message_type))
            if f.is_repeated:
                for v in value:
                    target.add().CopyFrom(build(sub, v))
            else:
                target.CopyFrom(build(sub, value))
        elif f.is_repeated:
            target.extend(value)
        else:
            setattr(msg, name, value)
    return msg


# -- a real server on a loop of its own (hypothesis drives a blocking client) ------------


class Served:
    def __init__(self, db_url: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.stop = asyncio.Event()
        self.db_url = db_url
        self.thread = threading.Thread(target=self._run, args=(db_url,), daemon=True)
        self.addr = ""
        self.token = ""
        self.machine_token = ""
        self.srv: harness.LocalServer | None = None
        self.error: BaseException | None = None

    def _run(self, db_url: str) -> None:
        try:
            self.loop.run_until_complete(self._serve(db_url))
        except BaseException as exc:  # reported to the test
            self.error = exc
            self.ready.set()

    async def _serve(self, db_url: str) -> None:
        self.stop = asyncio.Event()
        async with harness.local_server(db_url, harness.fast_timings()) as srv:
            self.srv = srv
            self.machine_token = await harness.register_machine_direct(srv, "m1")
            await srv.tasks.svc.create_chatroom(
                "room",
                [
                    Role("builder", AgentKind.CUSTOM),
                    Role("reviewer", AgentKind.REMOTE, "m1", "idle"),
                ],
            )
            await srv.tasks.svc.send("room", "builder", "a task", harness.ADMIN)
            self.addr, self.token = srv.addr, srv.admin_token
            self.ready.set()
            await self.stop.wait()

    def run(self, coro: Any) -> Any:
        fut: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return fut.result(30)

    async def _fingerprint(self) -> list[tuple[str, str]]:
        conn = await asyncpg.connect(self.db_url)  # the owner sees every schema
        try:
            rows = await conn.fetch(FINGERPRINT)
        finally:
            await conn.close()
        return [(r[0], r[1]) for r in rows]

    def fingerprint(self) -> list[tuple[str, str]]:
        return list(self.run(self._fingerprint()))

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(30)


@pytest.fixture(scope="module")
def served(pg_admin_url: str) -> Iterator[Served]:
    db_url = asyncio.run(harness.create_database_from(pg_admin_url, "vigil_template"))
    s = Served(db_url)
    s.thread.start()
    s.ready.wait(60)
    if s.error is not None:
        raise s.error
    try:
        yield s
    finally:
        s.close()


def _methods(kinds: set[str]) -> list[tuple[str, Any]]:
    found = []
    for module in (liveness_pb2, tasks_pb2, machines_pb2, tokens_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            for m in service.methods:
                kind = (
                    "bidi"
                    if m.client_streaming
                    else "server_stream"
                    if m.server_streaming
                    else "unary"
                )
                if kind in kinds:
                    found.append((f"{service.full_name}/{m.name}", m))
    return found


def _call(served: Served, full: str, request: Message, token: str) -> grpc.StatusCode:
    service, name = full.rsplit("/", 1)
    with grpc.insecure_channel(served.addr) as ch:
        method = getattr(STUBS[service](ch), name)
        md = (("authorization", f"Bearer {token}"),)
        try:
            reply = method(request, metadata=md, timeout=10)
            if hasattr(reply, "__iter__") and not isinstance(reply, Message):
                try:
                    for _ in reply:
                        break  # the first message shows it was let in
                finally:
                    reply.cancel()
            return grpc.StatusCode.OK
        except grpc.RpcError as exc:
            code: grpc.StatusCode = exc.code()
            if code == grpc.StatusCode.CANCELLED:
                return grpc.StatusCode.OK  # we cancelled a stream that was let in
            return code


def _unary_case(full: str, m: Any) -> Callable[[Served, dict[str, Any]], None]:
    cls = GetMessageClass(_desc(m.input_type))

    def case(served: Served, fields: dict[str, Any]) -> None:
        request = build(cls, fields)
        before = served.fingerprint()
        code = _call(served, full, request, served.token)
        assert code in ANSWERS, f"{full}({request!r:.300}) -> {code.name}"
        if code != grpc.StatusCode.OK:
            assert served.fingerprint() == before, f"{full} refused but changed the database"

    return case


EDGES: dict[int, list[Any]] = {
    FieldDescriptor.TYPE_STRING: ["a\x00b", "line\nbreak", "x" * 70_000, "\x1b[31m"],
    FieldDescriptor.TYPE_INT32: [2**31 - 1, -(2**31)],
    FieldDescriptor.TYPE_INT64: [2**40, -(2**40), 2**63 - 1],
    FieldDescriptor.TYPE_ENUM: [99, -1],
}


def edge_requests(desc: Any) -> list[dict[str, Any]]:
    """The known names filled in, and one field at a time set to each edge value (and
    every timestamp out of range): a systematic pass before the random one."""
    base = {f.name: "room" if f.name in ("chatroom", "name") else None for f in desc.fields}
    base |= {"role": "builder", "machine_id": "m1"}
    base = {k: v for k, v in base.items() if v is not None and k in desc.fields_by_name}
    out = []
    for f in desc.fields:
        if f.is_repeated:
            continue
        if f.type == FieldDescriptor.TYPE_MESSAGE:
            if f.message_type.full_name == "google.protobuf.Timestamp":
                out.append({**base, f.name: {"seconds": 2**40, "nanos": 0}})
                out.append({**base, f.name: {"seconds": -(2**40), "nanos": -1}})
            continue
        for value in EDGES.get(f.type, []):
            out.append({**base, f.name: value})
    return out


@pytest.mark.parametrize(("full", "m"), _methods({"unary"}), ids=lambda v: str(v)[:60])
def test_a_fuzzed_unary_call_gets_a_callers_status_and_a_refusal_changes_nothing(
    served: Served, full: str, m: Any
) -> None:
    case = _unary_case(full, m)
    for fields in edge_requests(m.input_type):
        case(served, fields)

    @settings(
        max_examples=25,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        database=None,
    )
    @given(message(m.input_type))
    def run(fields: dict[str, Any]) -> None:
        case(served, fields)

    run()


@pytest.mark.parametrize(("full", "m"), _methods({"server_stream"}), ids=lambda v: str(v)[:60])
def test_a_fuzzed_stream_request_gets_a_callers_status(served: Served, full: str, m: Any) -> None:
    cls = GetMessageClass(_desc(m.input_type))

    @settings(max_examples=15, deadline=None, database=None)
    @given(message(m.input_type))
    def run(fields: dict[str, Any]) -> None:
        request = build(cls, fields)
        service, name = full.rsplit("/", 1)
        with grpc.insecure_channel(served.addr) as ch:
            call = getattr(STUBS[service](ch), name)(
                request, metadata=(("authorization", f"Bearer {served.token}"),), timeout=1.5
            )
            try:
                for _ in call:
                    pass
                code = grpc.StatusCode.OK
            except grpc.RpcError as exc:
                code = exc.code()
        # A valid request waits (our own deadline ends it); anything else is answered.
        assert code in ANSWERS | {grpc.StatusCode.DEADLINE_EXCEEDED}, f"{full} -> {code.name}"

    run()


# -- bidirectional streams: any order of messages ends with a status -------------------

SESSION = st.lists(
    st.one_of(
        message(liveness_pb2.SessionRequest.DESCRIPTOR),
        st.builds(
            lambda conn, epoch, which: {
                which: {
                    "chatroom": "room",
                    "role": "builder",
                    "connection_id": conn,
                    "epoch": epoch,
                    "kind": 2,
                }
            },
            st.uuids().map(str),
            st.integers(0, 3),
            st.sampled_from(["join", "resume", "heartbeat", "leave"]),
        ),
    ),
    max_size=5,
)
DAEMON = st.lists(
    st.one_of(
        message(machines_pb2.DaemonMessage.DESCRIPTOR),
        st.just({"hello": {"machine_id": "m1"}}),
        st.builds(lambda i: {"received": {"command_id": i}}, st.integers(-1, 5)),
    ),
    max_size=5,
)


def _bidi(
    served: Served, full: str, cls: type[Message], msgs: list[dict[str, Any]], token: str
) -> tuple[grpc.StatusCode, float]:
    """Send `msgs`, half-close, and return (final status, seconds it took to end)."""
    requests = []
    for fields in msgs:
        try:
            requests.append(build(cls, _fit(cls, fields)))
        except (ValueError, TypeError):
            continue  # a value protobuf itself refuses to hold
    service, name = full.rsplit("/", 1)
    with grpc.insecure_channel(served.addr) as ch:
        call = getattr(STUBS[service](ch), name)(
            iter(requests), metadata=(("authorization", f"Bearer {token}"),), timeout=10
        )
        start = time.monotonic()
        try:
            for _ in call:
                pass
            code = grpc.StatusCode.OK
        except grpc.RpcError as exc:
            code = exc.code()
        return code, time.monotonic() - start


def _fit(cls: type[Message], fields: dict[str, Any]) -> dict[str, Any]:
    """Drop keys the message does not have (the hand-written cases name oneof members
    with fields of their own)."""
    out = {}
    for k, v in fields.items():
        if k not in cls.DESCRIPTOR.fields_by_name:
            continue
        f = cls.DESCRIPTOR.fields_by_name[k]
        if f.type == FieldDescriptor.TYPE_MESSAGE and isinstance(v, dict):
            v = _fit(GetMessageClass(_desc(f.message_type)), v)
        out[k] = v
    return out


@settings(max_examples=40, deadline=None, database=None)
@given(SESSION)
def test_any_order_of_session_messages_ends_with_a_status(
    served: Served, msgs: list[dict[str, Any]]
) -> None:
    code, took = _bidi(
        served, "vigil.v1.Liveness/Session", liveness_pb2.SessionRequest, msgs, served.token
    )
    assert code in ANSWERS, f"Session {msgs!r:.300} -> {code.name}"
    assert took < 1.5, f"Session {msgs!r:.300} took {took:.2f}s to end"


@settings(max_examples=40, deadline=None, database=None)
@given(DAEMON)
def test_any_order_of_daemon_messages_ends_with_a_status(
    served: Served, msgs: list[dict[str, Any]]
) -> None:
    code, took = _bidi(
        served,
        "vigil.v1.Machines/DaemonSession",
        machines_pb2.DaemonMessage,
        msgs,
        served.machine_token,
    )
    assert code in ANSWERS, f"DaemonSession {msgs!r:.300} -> {code.name}"
    assert took < 1.5, f"DaemonSession {msgs!r:.300} took {took:.2f}s to end"
