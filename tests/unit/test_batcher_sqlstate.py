"""The batcher retries deadlocks/serialization failures whichever layer raised them."""

from __future__ import annotations

import asyncpg
from sqlalchemy.exc import DBAPIError

from domain.inventory.batcher import RETRYABLE_SQLSTATES, _sqlstate


class _Orig(Exception):
    sqlstate = "40001"


def test_asyncpg_errors_carry_their_sqlstate() -> None:
    assert _sqlstate(asyncpg.exceptions.DeadlockDetectedError("deadlock")) in RETRYABLE_SQLSTATES
    assert _sqlstate(asyncpg.exceptions.UniqueViolationError("dup")) == "23505"


def test_sqlalchemy_errors_carry_the_driver_sqlstate() -> None:
    assert _sqlstate(DBAPIError("COMMIT", None, _Orig())) == "40001"


def test_other_errors_have_none() -> None:
    assert _sqlstate(RuntimeError("boom")) is None
    assert _sqlstate(DBAPIError("x", None, Exception("no state"))) is None
