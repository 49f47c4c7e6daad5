"""Read coalescing: concurrent point reads become one statement per batch.

While a batch is being fetched, new keys accumulate; when it returns, the
next batch goes out with all of them. Under no load a read goes out at once
(no timer, no added latency); under load N concurrent calls cost one query.
Each batch reads committed data as of its own statement, exactly like the
single reads it replaces.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Coalescer(Generic[K, V]):
    def __init__(
        self, fetch: Callable[[list[K]], Awaitable[dict[K, V]]], *, max_batch: int = 1000, in_flight: int = 1
    ) -> None:
        self._fetch = fetch
        self._max_batch = max_batch
        self._slots = in_flight
        self._pending: dict[K, list[asyncio.Future[V | None]]] = {}
        self._running = 0

    async def get(self, key: K) -> V | None:
        """The value for `key`, or None when the fetch did not return it."""
        fut: asyncio.Future[V | None] = asyncio.get_running_loop().create_future()
        self._pending.setdefault(key, []).append(fut)
        if self._running < self._slots:
            self._running += 1
            asyncio.get_running_loop().create_task(self._drain())
        return await fut

    async def _drain(self) -> None:
        try:
            while self._pending:
                keys = list(self._pending)[: self._max_batch]
                waiters = {k: self._pending.pop(k) for k in keys}
                try:
                    found = await self._fetch(keys)
                except BaseException as exc:  # every waiter of this batch gets the error
                    for futs in waiters.values():
                        for f in futs:
                            if not f.done():
                                f.set_exception(exc)
                    if isinstance(exc, asyncio.CancelledError):
                        raise
                    continue
                for k, futs in waiters.items():
                    value = found.get(k)
                    for f in futs:
                        if not f.done():
                            f.set_result(value)
        finally:
            self._running -= 1
