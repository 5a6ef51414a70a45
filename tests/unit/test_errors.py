"""Errors become statuses in one place: domain errors keep their code, database
failures are mapped by constraint name and SQLSTATE, anything else is INTERNAL."""

from __future__ import annotations

import asyncpg
import grpc
import pytest

from vigil.core.db import db_error, mapped_errors
from vigil.core.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    StorageError,
    quote,
    status_for,
)


def pg(code: str, message: str = "boom", constraint: str | None = None) -> asyncpg.PostgresError:
    fields = {"C": code, "M": message}
    if constraint:
        fields["n"] = constraint
    return asyncpg.PostgresError.new(fields)


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (InvalidArgument("bad"), grpc.StatusCode.INVALID_ARGUMENT),
        (NotFound("none"), grpc.StatusCode.NOT_FOUND),
        (FailedPrecondition("stale"), grpc.StatusCode.FAILED_PRECONDITION),
        (StorageError("down"), grpc.StatusCode.UNAVAILABLE),
        (RuntimeError("a bug"), grpc.StatusCode.INTERNAL),
    ],
)
def test_status_for(exc: Exception, code: grpc.StatusCode) -> None:
    got, message = status_for(exc)
    assert got == code
    assert message and "Traceback" not in message
    if code == grpc.StatusCode.INTERNAL:
        assert message == "internal error: RuntimeError"  # no internals leak to a caller


@pytest.mark.parametrize(
    ("state", "code"),
    [
        ("VG001", grpc.StatusCode.FAILED_PRECONDITION),  # the FSM guard
        ("22021", grpc.StatusCode.INVALID_ARGUMENT),  # bad encoding (a NUL byte)
        ("22003", grpc.StatusCode.INVALID_ARGUMENT),  # number out of range
        ("22008", grpc.StatusCode.INVALID_ARGUMENT),  # datetime out of range
        ("54000", grpc.StatusCode.INVALID_ARGUMENT),  # too large to index
        ("23514", grpc.StatusCode.INVALID_ARGUMENT),  # a CHECK
        ("40001", grpc.StatusCode.ABORTED),  # serialization failure: retry
        ("40P01", grpc.StatusCode.ABORTED),  # deadlock: retry
        ("57P01", grpc.StatusCode.UNAVAILABLE),  # admin shutdown
        ("08006", grpc.StatusCode.UNAVAILABLE),  # connection failure
        ("25006", grpc.StatusCode.UNAVAILABLE),  # a standby refusing a write (a switch)
        ("53300", grpc.StatusCode.UNAVAILABLE),  # too many connections
        ("23505", grpc.StatusCode.INTERNAL),  # a unique violation nobody declared: a bug
        ("42P01", grpc.StatusCode.INTERNAL),  # undefined table: a bug
    ],
)
def test_database_errors_by_sqlstate(state: str, code: grpc.StatusCode) -> None:
    assert db_error(pg(state)).code == code


def test_database_errors_by_constraint_first() -> None:
    declared = {"roles_pkey": lambda exc: AlreadyExists("a role with that name already exists")}
    mapped = db_error(pg("23505", constraint="roles_pkey"), declared)
    assert isinstance(mapped, AlreadyExists) and "role" in str(mapped)
    # The same SQLSTATE on another constraint is not "already exists".
    assert db_error(pg("23505", constraint="other_key"), declared).code == grpc.StatusCode.INTERNAL


@pytest.mark.parametrize(
    "exc",
    [
        OSError("refused"),
        asyncpg.InterfaceError("closed pool"),
        asyncpg.InternalClientError(
            "cannot switch to state 12; another operation (2) is in progress"
        ),
    ],
)
def test_an_unreachable_database_is_unavailable(exc: Exception) -> None:
    assert db_error(exc).code == grpc.StatusCode.UNAVAILABLE


async def test_a_driver_error_leaves_a_store_block_unavailable() -> None:
    with pytest.raises(StorageError):
        async with mapped_errors():
            raise asyncpg.InternalClientError("another operation is in progress")


def test_messages_quote_only_a_prefix_of_input() -> None:
    huge = "x" * 4_000_000
    shown = quote(huge)
    assert len(shown) < 200 and "4000000 characters" in shown
    assert quote("a\nb") == "'a\\nb'"
