"""The idempotency store (AIP-155): the one place that claims request ids, stores
their answers and checks replays, in single and batch forms.

A key is (principal, request_id). The claim row is inserted in the same
transaction as the mutation, so an answer is stored if and only if the mutation
committed. A concurrent call with the same key blocks on the primary key until
the first commits, then reads the stored answer.

What identifies a request under its key is `request_hash`: the method, the
channel the call was made for, and the request body. The same key with another
hash (another body, another method, or another channel) is REQUEST_ID_REUSED,
so an answer is only ever replayed to the channel it was made on.

Forms:
- `claim` / `store` / `get`: one statement each (Runtime.mutate);
- `claim_cte`: the claim folded into a hot path's first statement (checkout);
- `Claim.answers`: the answer folded into a hot path's last statement (BATCH_STORE);
- `BATCH_CLAIM_CTE` / `BATCH_STORE` / `Answers` / `get_many`: many keys in one
  statement (the ReserveStock batcher);
- `check_replay`: a stored answer may be replayed to this request, or REQUEST_ID_REUSED;
- `once` / `StepMarkers`: a workflow activity's effect done once, marked in the
  module's own step table (refunds.refund_steps, registration.activity_effects).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from domain.shared.db import DriverStatement, driver_connection
from domain.shared.errors import AlreadyExists

Key = tuple[str, str]  # (principal, request_id)


def request_hash(method: str, channel: str | None, body: bytes) -> bytes:
    """What a request_id stands for. Calls bound to no channel keep the original
    form (method, body), so answers stored before channels were hashed still
    replay; a channel-bound call hashes its channel first, a form no stored
    hash can have (method names start with '/')."""
    if channel is None:
        return hashlib.sha256(method.encode() + b"\0" + body).digest()
    return hashlib.sha256(b"\0channel\0" + channel.encode() + b"\0" + method.encode() + b"\0" + body).digest()


@dataclass
class Claim:
    """One request's claim on its key.

    Folded into a statement (`claim_cte`): that statement makes every change
    conditional on `EXISTS (SELECT FROM claim)`, so a used key changes nothing,
    then calls `made(owned)`."""

    principal: str
    request_id: str
    method: str
    request_hash: bytes
    owned: bool | None = None
    # The answer the mutation's own last statement stores (`answers`); None: Runtime stores it.
    answer: bytes | None = None

    @property
    def key(self) -> Key:
        return (self.principal, self.request_id)

    def params(self) -> list[object]:
        return [self.principal, self.request_id, self.method, self.request_hash]

    def made(self, owned: bool) -> None:
        self.owned = owned
        if not owned:
            raise KeyTaken(self.request_id)

    def answers(self, body: bytes) -> Answers:
        """`body`, the response the RPC will return, as this claim's answer for
        the mutation's last statement to store with BATCH_STORE (its `answers`
        CTE, or the reservations' write): one round trip less than `store`.
        Runtime then stores nothing, and checks it returns this very answer."""
        self.answer = body
        answers = Answers()
        answers.add(self, 0, body)
        return answers


class KeyTaken(Exception):
    """The claim found the key used before: the caller answers with the stored response."""


@dataclass(frozen=True)
class StoredResponse:
    """The answer stored under a key: status_code 0 with the response message's
    bytes, or a gRPC status code with the google.rpc.Status bytes."""

    method: str
    request_hash: bytes
    status_code: int | None
    response: bytes | None


def check_replay(stored: StoredResponse, request_hash: bytes) -> StoredResponse:
    """The stored answer when it belongs to this very request; REQUEST_ID_REUSED otherwise."""
    if stored.request_hash != request_hash:
        raise AlreadyExists(
            "REQUEST_ID_REUSED",
            "this request_id was already used for a different request",
            metadata={"method": stored.method},
        )
    return stored


def claim_cte(first: int) -> str:
    """The `claim` CTE (one row when the key is ours), its four parameters
    numbered from `first` in Claim.params order. Its INSERT ... ON CONFLICT waits
    for a concurrent holder of the key like `claim` does, before anything else is locked."""
    p, r, m, h = (f"${first + i}" for i in range(4))
    return f"""claim AS (
        INSERT INTO platform.idempotency_keys (principal, request_id, method, request_hash)
        VALUES ({p}, {r}, {m}, {h})
        ON CONFLICT (principal, request_id) DO NOTHING RETURNING true AS owned
    )"""


# Many claims at once (parameters from `batch_claim_params`): the CTE `claimed`
# returns the keys this statement owns. Callers pass the claims sorted by key,
# so two batches never wait for each other's keys in opposite orders.
BATCH_CLAIM_CTE = """claimed AS (
        INSERT INTO platform.idempotency_keys (principal, request_id, method, request_hash)
        SELECT * FROM unnest(CAST(:claim_principals AS text[]), CAST(:claim_request_ids AS text[]),
                             CAST(:claim_methods AS text[]), CAST(:claim_hashes AS bytea[]))
        ON CONFLICT DO NOTHING
        RETURNING principal, request_id
    )"""


def batch_claim_params(claims: Sequence[Claim]) -> dict[str, object]:
    return {
        "claim_principals": [c.principal for c in claims],
        "claim_request_ids": [c.request_id for c in claims],
        "claim_methods": [c.method for c in claims],
        "claim_hashes": [c.request_hash for c in claims],
    }


# Many answers at once (parameters from `Answers.params`), to keys this
# transaction claimed. An upsert, not an UPDATE joined with unnest: ON CONFLICT
# finds each row through the primary key whatever plan the statement got (the
# cached generic plan of the UPDATE, made while the table was small, scanned the
# whole table per batch). The insert branch never runs.
BATCH_STORE = """
    INSERT INTO platform.idempotency_keys (principal, request_id, method, request_hash, status_code, response)
    SELECT * FROM unnest(CAST(:answer_principals AS text[]), CAST(:answer_request_ids AS text[]),
                         CAST(:answer_methods AS text[]), CAST(:answer_hashes AS bytea[]),
                         CAST(:answer_status_codes AS int[]), CAST(:answer_bodies AS bytea[]))
    ON CONFLICT (principal, request_id) DO UPDATE SET status_code = excluded.status_code, response = excluded.response
"""


@dataclass
class Answers:
    """Answers to store with BATCH_STORE."""

    claims: list[Claim] = field(default_factory=list)
    codes: list[int] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)

    def add(self, claim: Claim, status_code: int, body: bytes) -> None:
        self.claims.append(claim)
        self.codes.append(status_code)
        self.bodies.append(body)

    def params(self) -> dict[str, object]:
        return {
            "answer_principals": [c.principal for c in self.claims],
            "answer_request_ids": [c.request_id for c in self.claims],
            "answer_methods": [c.method for c in self.claims],
            "answer_hashes": [c.request_hash for c in self.claims],
            "answer_status_codes": self.codes,
            "answer_bodies": self.bodies,
        }


# Single-key statements on the session's asyncpg connection (building and
# compiling an ORM statement per call cost more than the round trip; `store`
# was 8% of CheckoutCart's server time in py-spy).
_CLAIM = DriverStatement(
    """
    INSERT INTO platform.idempotency_keys (principal, request_id, method, request_hash, status_code, response)
    VALUES (:p, :r, :m, CAST(:h AS bytea), CAST(:c AS int), CAST(:b AS bytea))
    ON CONFLICT (principal, request_id) DO NOTHING RETURNING true
    """
)
_STORE = DriverStatement(
    """
    UPDATE platform.idempotency_keys SET status_code = :c, response = :b
    WHERE principal = :p AND request_id = :r
    """
)
_GET = DriverStatement(
    """
    SELECT method, request_hash, status_code, response FROM platform.idempotency_keys
    WHERE principal = :p AND request_id = :r
    """
)
_GET_MANY = DriverStatement(
    """
    SELECT principal, request_id, method, request_hash, status_code, response FROM platform.idempotency_keys
    WHERE (principal, request_id) IN (SELECT * FROM unnest(CAST(:p AS text[]), CAST(:r AS text[])))
    """
)


async def claim(
    session: AsyncSession, claim: Claim, *, status_code: int | None = None, response: bytes | None = None
) -> bool:
    """True when this call owns the key (first use); False when it was used before.
    With `status_code`/`response` the answer is stored by the claim itself."""
    conn = await driver_connection(session)
    params: dict[str, object] = {
        "p": claim.principal,
        "r": claim.request_id,
        "m": claim.method,
        "h": claim.request_hash,
        "c": status_code,
        "b": response,
    }
    return bool(await _CLAIM.fetch(conn, params))


async def store(session: AsyncSession, claim: Claim, status_code: int, response: bytes) -> None:
    """The answer to a key this transaction claimed."""
    conn = await driver_connection(session)
    await _STORE.execute(conn, {"p": claim.principal, "r": claim.request_id, "c": status_code, "b": response})


def _stored(
    method: str, request_hash: bytes, status_code: int | None, response: bytes | None
) -> StoredResponse:
    return StoredResponse(
        method, bytes(request_hash), status_code, None if response is None else bytes(response)
    )


async def get(session: AsyncSession, key: Key) -> StoredResponse:
    conn = await driver_connection(session)
    rows = await _GET.fetch(conn, {"p": key[0], "r": key[1]})
    if len(rows) != 1:
        raise LookupError(f"idempotency key {key[1]!r} not found")  # the caller saw it claimed
    return _stored(*rows[0])


async def get_many(session: AsyncSession, keys: Sequence[Key]) -> dict[Key, StoredResponse]:
    conn = await driver_connection(session)
    rows = await _GET_MANY.fetch(conn, {"p": [k[0] for k in keys], "r": [k[1] for k in keys]})
    return {(r[0], r[1]): _stored(*r[2:]) for r in rows}


_PURGE = text(
    """
    DELETE FROM platform.idempotency_keys
    WHERE ctid = ANY(ARRAY(
        SELECT ctid FROM platform.idempotency_keys
        WHERE created_at < now() - make_interval(secs => :secs) LIMIT :limit))
    """
)


async def purge_older_than(session: AsyncSession, age: timedelta, limit: int = 10_000) -> int:
    """Forget keys older than the retention; a retry after that is a new request."""
    result = await session.execute(_PURGE, {"secs": age.total_seconds(), "limit": limit})
    return int(getattr(result, "rowcount", 0) or 0)


# ---------------------------------------------------------------- workflow step markers


class StepMarkers:
    """A module's table of workflow step markers: one row per effect a workflow
    activity must have once (a restock, a notification), unique on `columns`.

    `fixed` gives the SQL value of each other column that has no default."""

    def __init__(self, table: str, columns: Sequence[str], fixed: Mapping[str, str] | None = None) -> None:
        self.table = table
        self.columns = tuple(columns)
        names = [*self.columns, *(fixed or {})]
        values = [f":{c}" for c in self.columns] + list((fixed or {}).values())
        self.statement = text(
            f"INSERT INTO {table} ({', '.join(names)}) VALUES ({', '.join(values)}) "
            "ON CONFLICT DO NOTHING RETURNING true"
        )


async def once(session: AsyncSession, markers: StepMarkers, *key: object) -> bool:
    """Marks the step `key` (one value per marker column) done in the caller's
    transaction. True the first time, so the caller does the effect in this same
    transaction; False when it was done before (a retried or replayed activity)."""
    row = (await session.execute(markers.statement, dict(zip(markers.columns, key, strict=True)))).first()
    return row is not None
