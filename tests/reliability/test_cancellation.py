"""R9: a deadline or a cancel mid-call either commits whole or not at all, and leaks nothing.

Creates and updates are cancelled (or given tiny deadlines) at random moments, and once while
provably inside their transaction (blocked on a row lock). Afterwards, per request: the row, its
outbox event and its idempotency record exist together or not at all; retrying with the same
request_id yields exactly one effect; the pool's connections are all back (pg_stat_activity for
the test database shows exactly the pool's idle connections, none idle in a transaction) and no
asyncio task is left behind.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import grpc
import pytest
from sqlalchemy import text

import migrations
from entrepot.platform.v1 import channel_pb2, channel_pb2_grpc
from server.app import App
from tests import pg
from tests.conftest import make_settings
from tests.procs import server_token
from tests.reliability.support import soak

SUB = "r9"


@pytest.fixture(scope="module")
def r9_database() -> Iterator[str]:
    """A database of its own, so pg_stat_activity shows only this test's server."""
    url, name = pg.create_database("entrepot_r9")
    migrations.upgrade(url)
    yield url
    pg.drop_database(name)


def create_req(slug: str, rid: str) -> channel_pb2.CreateChannelRequest:
    return channel_pb2.CreateChannelRequest(
        channel=channel_pb2.Channel(slug=slug, name="R9", currency="EUR"), request_id=rid
    )


def update_req(slug: str, rid: str, name: str) -> channel_pb2.UpdateChannelRequest:
    return channel_pb2.UpdateChannelRequest(
        channel=channel_pb2.Channel(slug=slug, name=name), update_mask={"paths": ["name"]}, request_id=rid
    )


async def interrupted(call: Any, rng: random.Random) -> grpc.StatusCode:
    """Cancel the call after a random delay (or let its short deadline hit); returns its code."""
    delay = rng.uniform(0, 0.04)
    if rng.random() < 0.5:
        await asyncio.sleep(delay)
        call.cancel()
    try:
        await call
    except asyncio.CancelledError:
        return grpc.StatusCode.CANCELLED
    except grpc.aio.AioRpcError as err:
        return err.code()
    return grpc.StatusCode.OK


async def test_cancel_and_deadline_commit_whole_or_nothing(r9_database: str) -> None:
    app = App(make_settings(r9_database, None, db_pool_size=4, db_max_overflow=4))
    await app.start()
    rng = random.Random(int(time.time()))
    md = [("authorization", f"Bearer {server_token(SUB)}")]
    prefix = "r9-" + uuid.uuid4().hex[:6]
    n = soak(60, 600)
    try:
        tasks_before = set(asyncio.all_tasks())
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as ch:
            stub = channel_pb2_grpc.ChannelServiceStub(ch)

            # 1. Creates interrupted at random moments, 8 at a time.
            creates = {f"{prefix}-c{i}": f"{prefix}-{i}" for i in range(n)}
            outcomes: dict[str, grpc.StatusCode] = {}
            sem = asyncio.Semaphore(8)

            async def one_create(rid: str, slug: str) -> None:
                async with sem:
                    timeout = rng.uniform(0.005, 0.05) if rng.random() < 0.5 else 10
                    outcomes[rid] = await interrupted(
                        stub.CreateChannel(create_req(slug, rid), metadata=md, timeout=timeout), rng
                    )

            await asyncio.gather(*(one_create(r, s) for r, s in creates.items()))
            interrupted_count = sum(c != grpc.StatusCode.OK for c in outcomes.values())
            assert interrupted_count > 0, "no call was interrupted: the test proves nothing"
            assert set(outcomes.values()) <= {
                grpc.StatusCode.OK,
                grpc.StatusCode.CANCELLED,
                grpc.StatusCode.DEADLINE_EXCEEDED,
            }, set(outcomes.values())
            await asyncio.sleep(0.5)  # let interrupted handlers finish rolling back
            state = await _create_state(r9_database, prefix)
            for rid, slug in creates.items():
                row, events, key = state.get(slug, (0, 0, None)), None, None
                rows, events, key = row
                assert (rows, events) in ((0, 0), (1, 1)), (slug, rows, events)
                assert key == ("done" if rows else None), (rid, rows, key)
                if outcomes[rid] == grpc.StatusCode.OK:
                    assert rows == 1
            # Retrying with the same request_id: exactly one effect each.
            for rid, slug in creates.items():
                await stub.CreateChannel(create_req(slug, rid), metadata=md, timeout=10)
            state = await _create_state(r9_database, prefix)
            assert all(v == (1, 1, "done") for v in state.values()) and len(state) == n

            # 2. An update cancelled while provably inside its transaction (waiting on a row lock).
            slug = creates[f"{prefix}-c0"]
            async with app.rt.sessions() as s, s.begin():
                await s.execute(
                    text("SELECT 1 FROM platform.channels WHERE slug = :s FOR UPDATE"), {"s": slug}
                )
                call = stub.UpdateChannel(
                    update_req(slug, f"{prefix}-u-locked", "LOCKED"), metadata=md, timeout=10
                )
                await asyncio.sleep(0.3)
                assert not call.done()
                call.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await call
            await asyncio.sleep(0.3)
            assert await _updates(r9_database, slug, [f"{prefix}-u-locked"]) == ("R9", 0, 0)

            # 3. Updates of one channel interrupted at random moments.
            rids = [f"{prefix}-u{i}" for i in range(n // 2)]
            names = {rid: f"name-{i}" for i, rid in enumerate(rids)}

            async def one_update(rid: str) -> grpc.StatusCode:
                async with sem:
                    timeout = rng.uniform(0.005, 0.05) if rng.random() < 0.5 else 10
                    return await interrupted(
                        stub.UpdateChannel(update_req(slug, rid, names[rid]), metadata=md, timeout=timeout),
                        rng,
                    )

            codes = await asyncio.gather(*(one_update(r) for r in rids))
            await asyncio.sleep(0.5)
            name, events, done = await _updates(r9_database, slug, rids)
            ok = sum(c == grpc.StatusCode.OK for c in codes)
            assert events == done >= ok, (events, done, ok)
            assert name in {"R9", *names.values()}

        # 4. Nothing leaked: every connection is back in the pool, idle, and no task lingers.
        await _assert_no_leaks(app, r9_database, tasks_before)
    finally:
        await app.stop(grace=0.5)


async def _create_state(url: str, prefix: str) -> dict[str, tuple[int, int, str | None]]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            """
            SELECT c.slug,
                   1 AS rows,
                   (SELECT count(*) FROM platform.outbox o
                     WHERE o.topic = 'channel.created' AND o.aggregate_id = c.slug) AS events
              FROM platform.channels c WHERE c.slug LIKE $1
            """,
            prefix + "-%",
        )
        keys = await conn.fetch(
            "SELECT request_id, status_code, response IS NOT NULL AS has_response"
            " FROM platform.idempotency_keys WHERE principal = $1 AND request_id LIKE $2",
            SUB,
            prefix + "-c%",
        )
        orphan_events = await conn.fetchval(
            "SELECT count(*) FROM platform.outbox o WHERE o.topic = 'channel.created' AND o.aggregate_id LIKE $1"
            " AND NOT EXISTS (SELECT 1 FROM platform.channels c WHERE c.slug = o.aggregate_id)",
            prefix + "-%",
        )
    finally:
        await conn.close()
    assert orphan_events == 0, "an outbox event without its row"
    state: dict[str, tuple[int, int, str | None]] = {r["slug"]: (1, r["events"], None) for r in rows}
    for k in keys:
        slug = prefix + "-" + k["request_id"].removeprefix(prefix + "-c")
        rows_, events, _ = state.get(slug, (0, 0, None))
        assert k["status_code"] == 0 and k["has_response"], f"half-done idempotency record {k['request_id']}"
        state[slug] = (rows_, events, "done")
    return state


async def _updates(url: str, slug: str, rids: list[str]) -> tuple[str, int, int]:
    conn = await asyncpg.connect(url)
    try:
        name = await conn.fetchval("SELECT name FROM platform.channels WHERE slug = $1", slug)
        events = await conn.fetchval(
            "SELECT count(*) FROM platform.outbox WHERE topic = 'channel.updated' AND aggregate_id = $1", slug
        )
        done = await conn.fetchval(
            "SELECT count(*) FROM platform.idempotency_keys WHERE principal = $1 AND request_id = ANY($2::text[])"
            " AND status_code = 0",
            SUB,
            rids,
        )
        pending = await conn.fetchval(
            "SELECT count(*) FROM platform.idempotency_keys WHERE principal = $1 AND request_id = ANY($2::text[])"
            " AND status_code IS NULL",
            SUB,
            rids,
        )
    finally:
        await conn.close()
    assert pending == 0, "an idempotency record claimed but never completed"
    return str(name), int(events), int(done)


async def _assert_no_leaks(app: App, url: str, tasks_before: set[asyncio.Task[Any]]) -> None:
    pool: Any = app.rt.engine.pool
    # The asyncpg read pool (GetStockLevel, the outbox NOTIFY) has its own connections.
    read_pool: Any = app.rt._read_pool
    dbname = urlsplit(url).path.lstrip("/")
    deadline = time.monotonic() + 10
    while True:
        conn = await asyncpg.connect(url)
        try:
            sessions = await conn.fetch(
                "SELECT application_name, state FROM pg_stat_activity WHERE datname = $1 "
                "AND application_name IN ('entrepot', 'entrepot-read')",
                dbname,
            )
        finally:
            await conn.close()
        states = [r["state"] for r in sessions if r["application_name"] == "entrepot"]
        read_states = [r["state"] for r in sessions if r["application_name"] == "entrepot-read"]
        read_open = read_pool.get_size() if read_pool is not None else 0
        read_idle = read_pool.get_idle_size() if read_pool is not None else 0
        settled = (
            pool.checkedout() == 0
            and states == ["idle"] * pool.checkedin()
            and read_idle == read_open
            and read_states == ["idle"] * read_open
        )
        if settled or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    assert pool.checkedout() == 0, f"{pool.checkedout()} connections still checked out"
    assert states == ["idle"] * pool.checkedin(), (states, pool.checkedin())
    assert read_idle == read_open, f"{read_open - read_idle} read-pool connections still acquired"
    assert read_states == ["idle"] * read_open, (read_states, read_open)
    # Background loops start short-lived tasks all the time (wait_for(event.wait(), 1s) ticks);
    # a leaked task is one that is still the same pending task after a while.
    first = _new_pending(tasks_before)
    await asyncio.sleep(2.5)
    lingering = first & _new_pending(tasks_before)
    assert not lingering, [t.get_coro() for t in lingering]


def _new_pending(tasks_before: set[asyncio.Task[Any]]) -> set[asyncio.Task[Any]]:
    return {
        t
        for t in asyncio.all_tasks() - tasks_before
        if not t.done() and t is not asyncio.current_task() and not _server_loop(t)
    }


def _server_loop(task: asyncio.Task[Any]) -> bool:
    """grpc.aio's own accept loop (it waits for the next call, one task at a time): not a leak."""
    return "_request_registered_call" in repr(task) or "AioServer._request_call" in repr(task)
