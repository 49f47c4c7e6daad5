"""Group commit for ReserveStock: concurrent requests share one transaction.

A hot SKU is limited by its row lock: one transaction per reservation means
one lock hold + one commit (fsync) per unit. The batcher collects the requests
that arrive while a batch is in flight (plus an optional short window) and
applies them in ONE transaction: one locking SELECT, one guarded UPDATE per
level, multi-row inserts for reservations, lines, ledger and outbox, then one
commit. Each caller's future resolves only after that commit, so durability
is unchanged (synchronous_commit stays on). Never oversell: the guarded UPDATE
holds with any number of processes and batchers on one database.

Idempotency (AIP-155). A batched request cannot go through rt.mutate (one
transaction per request), so the batch uses the batch forms of the same
idempotency API (domain/platform/idempotency.py) inside the batch transaction:
  - claim: idempotency.BATCH_CLAIM_CTE, keys in sorted order (no deadlock
    between batches), in the same statement that loads and locks the levels;
  - a key already present (committed by an earlier call, or by a concurrent
    transaction we waited for) is not executed: after commit the caller gets
    its StoredResponse and the server replays it or answers REQUEST_ID_REUSED,
    exactly as rt.mutate does;
  - store: the answers of every executed keyed request (idempotency.Answers)
    are written by the batch's write statement, before the same commit.
Two requests with the same key in one batch: the second waits for the next
batch and then sees the first's stored row.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from domain.inventory.reservations import ReserveRequest, reserve_claimed
from domain.inventory.types import Reservation
from domain.platform.idempotency import Answers, Claim, StoredResponse, get_many
from domain.shared.errors import DomainError
from domain.shared.uow import UnitOfWork, retrying

# Encodes an outcome for the idempotency store: (status code, bytes); 0 = OK.
Encoder = Callable[[Reservation | DomainError], tuple[int, bytes]]


@dataclass(frozen=True)
class Executed:
    """A granted request: the reservation and, when it had an idempotency key, the
    response bytes stored for it (the caller can answer with exactly those)."""

    reservation: Reservation
    response: bytes | None


@dataclass
class _Pending:
    request: ReserveRequest
    claim: Claim | None
    future: asyncio.Future[Executed | StoredResponse]


class ReserveBatcher:
    """In-process group commit for reservations; one per server process."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        *,
        encode: Encoder | None = None,
        window: float = 0.0,
        max_batch: int = 256,
        max_inflight: int = 2,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        self._sessions = sessions
        self._on_batch = on_batch
        self._encode = encode
        self._window = window
        self._max_batch = max_batch
        self._inflight = asyncio.Semaphore(max_inflight)
        self._pending: list[_Pending] = []
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.batches = 0
        self.requests = 0

    async def submit(
        self, request: ReserveRequest, claim: Claim | None = None
    ) -> Reservation | StoredResponse:
        """Reservation, or the StoredResponse of a replayed key; raises the request's DomainError."""
        out = await self.submit_encoded(request, claim)
        return out.reservation if isinstance(out, Executed) else out

    async def submit_encoded(
        self, request: ReserveRequest, claim: Claim | None = None
    ) -> Executed | StoredResponse:
        """Like submit, with the stored response bytes of a granted keyed request (so the
        server does not build and encode the response a second time)."""
        if claim is not None and self._encode is None:
            raise RuntimeError("a batcher without an encoder cannot store idempotent responses")
        fut: asyncio.Future[Executed | StoredResponse] = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(request, claim, fut))
        self._wake.set()
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.create_task(self._loop(), name="reserve-batcher")
        return await fut

    async def close(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):  # we cancelled it just above
                await self._loop_task
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for p in self._pending:
            if not p.future.done():
                p.future.set_exception(RuntimeError("the reservation batcher was closed"))
        self._pending.clear()

    async def _loop(self) -> None:
        while True:
            await self._wake.wait()
            await self._inflight.acquire()
            if self._window:
                await asyncio.sleep(self._window)
            else:
                await asyncio.sleep(0)  # let requests of the same tick join
            batch: list[_Pending] = []
            rest: list[_Pending] = []
            seen: set[tuple[str, str]] = set()
            for p in self._pending:
                key = p.claim.key if p.claim else None
                if len(batch) < self._max_batch and (key is None or key not in seen):
                    batch.append(p)
                    if key is not None:
                        seen.add(key)
                else:
                    rest.append(p)
            self._pending = rest
            if not self._pending:
                self._wake.clear()
            if not batch:
                self._inflight.release()
                continue
            task = asyncio.create_task(self._run(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: list[_Pending]) -> None:
        try:
            executed, duplicates = await retrying(lambda: self._apply(batch), what="reserve batch")
            self.batches += 1
            self.requests += len(batch)
            if self._on_batch is not None:
                self._on_batch(len(batch))
            for p, result, body in executed:
                if p.future.done():
                    continue
                if isinstance(result, DomainError):
                    p.future.set_exception(result)
                else:
                    p.future.set_result(Executed(result, body))
            if duplicates:
                stored = await self._read_stored([p.claim for p in duplicates if p.claim])
                for p in duplicates:
                    if p.future.done() or p.claim is None:
                        continue
                    s = stored.get(p.claim.key)
                    if s is None:
                        p.future.set_exception(RuntimeError("idempotency key vanished"))
                    else:
                        p.future.set_result(s)
        except BaseException as exc:
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
        finally:
            self._inflight.release()

    async def _apply(
        self, batch: Sequence[_Pending]
    ) -> tuple[list[tuple[_Pending, Reservation | DomainError, bytes | None]], list[_Pending]]:
        # A UnitOfWork, not a bare session: the batch runs on the driver connection,
        # and the unit of work closes that connection when it died or was interrupted.
        async with UnitOfWork(self._sessions) as uow:
            session = uow.session
            claims = [p.claim for p in batch]

            bodies: dict[int, bytes] = {}  # batch index -> stored response of a granted request

            def store(results: list[Reservation | DomainError | None]) -> Answers:
                rows = Answers()
                bodies.clear()  # (results of this attempt only)
                if self._encode is None:
                    return rows
                for i, (p, r) in enumerate(zip(batch, results, strict=True)):
                    if p.claim is not None and r is not None:
                        code, body = self._encode(r)
                        rows.add(p.claim, code, body)
                        if not isinstance(r, DomainError):
                            bodies[i] = body
                return rows

            # The claim goes with the load statement (see reserve_claimed).
            results = await reserve_claimed(session, [p.request for p in batch], claims, store_answers=store)
            await uow.commit()
        executed: list[tuple[_Pending, Reservation | DomainError, bytes | None]] = []
        dups: list[_Pending] = []
        for i, (p, r) in enumerate(zip(batch, results, strict=True)):
            if r is None:
                dups.append(p)
            else:
                executed.append((p, r, bodies.get(i)))
        return executed, dups

    async def _read_stored(self, claims: Sequence[Claim]) -> dict[tuple[str, str], StoredResponse]:
        async with UnitOfWork(self._sessions) as uow:
            return await get_many(uow.session, [c.key for c in claims])
