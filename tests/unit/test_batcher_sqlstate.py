"""Retries (reserve batcher, SyncStock) and the error interceptor read the SQLSTATE whichever layer raised it."""

from __future__ import annotations

import asyncpg
from sqlalchemy.exc import DBAPIError

from domain.shared.db import RETRYABLE_SQLSTATES, sqlstate


class _Orig(Exception):
    sqlstate = "40001"


def test_asyncpg_errors_carry_theirsqlstate() -> None:
    assert sqlstate(asyncpg.exceptions.DeadlockDetectedError("deadlock")) in RETRYABLE_SQLSTATES
    assert sqlstate(asyncpg.exceptions.UniqueViolationError("dup")) == "23505"


def test_sqlalchemy_errors_carry_the_driversqlstate() -> None:
    assert sqlstate(DBAPIError("COMMIT", None, _Orig())) == "40001"


def test_other_errors_have_none() -> None:
    assert sqlstate(RuntimeError("boom")) is None
    assert sqlstate(DBAPIError("x", None, Exception("no state"))) is None
