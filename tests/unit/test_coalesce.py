"""Read coalescing: concurrent gets share one fetch; errors reach every waiter of their batch."""

from __future__ import annotations

import asyncio

import pytest

from domain.shared.coalesce import Coalescer


async def test_concurrent_gets_share_batches_and_get_their_own_values() -> None:
    calls: list[list[int]] = []

    async def fetch(keys: list[int]) -> dict[int, str]:
        calls.append(keys)
        await asyncio.sleep(0.01)
        return {k: f"v{k}" for k in keys if k != 7}

    c: Coalescer[int, str] = Coalescer(fetch)
    keys = [1, 2, 3, 7, 1, 2] * 10
    got = await asyncio.gather(*(c.get(k) for k in keys))
    assert got == [None if k == 7 else f"v{k}" for k in keys]
    # All sixty gets of one tick: one statement for the four distinct keys.
    assert calls == [[1, 2, 3, 7]]


async def test_gets_arriving_during_a_fetch_go_out_together_next() -> None:
    calls: list[list[int]] = []

    async def fetch(keys: list[int]) -> dict[int, int]:
        calls.append(keys)
        await asyncio.sleep(0.01)
        return {k: k for k in keys}

    c: Coalescer[int, int] = Coalescer(fetch)
    first = asyncio.ensure_future(c.get(0))
    await asyncio.sleep(0.001)  # the first fetch is out
    later = [asyncio.ensure_future(c.get(k)) for k in range(1, 6)]
    assert await first == 0
    assert [await f for f in later] == [1, 2, 3, 4, 5]
    assert calls == [[0], [1, 2, 3, 4, 5]]


async def test_a_failed_fetch_fails_its_batch_only() -> None:
    attempts = 0

    async def fetch(keys: list[str]) -> dict[str, int]:
        nonlocal attempts
        attempts += 1
        await asyncio.sleep(0.01)
        if attempts == 1:
            raise ConnectionError("database went away")
        return {k: len(k) for k in keys}

    c: Coalescer[str, int] = Coalescer(fetch)
    first = asyncio.ensure_future(c.get("a"))
    await asyncio.sleep(0)
    rest = [asyncio.ensure_future(c.get(k)) for k in ("bb", "ccc")]
    with pytest.raises(ConnectionError):
        await first
    assert [await f for f in rest] == [2, 3]
