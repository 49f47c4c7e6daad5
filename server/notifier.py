"""One debounced `NOTIFY entrepot_outbox` per process after commits that wrote
outbox rows (see domain/shared/outbox.py for why NOTIFY is not sent inside
the writing transactions)."""

from __future__ import annotations

import asyncio
import logging

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from domain.shared import outbox

log = logging.getLogger("entrepot.notifier")

_NOTIFY = text(f"SELECT pg_notify('{outbox.NOTIFY_CHANNEL}', '')")


class OutboxNotifier:
    def __init__(self, engine: AsyncEngine, interval: float = 0.005) -> None:
        self.engine = engine.execution_options(isolation_level="AUTOCOMMIT")
        self.interval = interval
        self._pending = False
        self._tasks: set[asyncio.Task[None]] = set()

    def install(self) -> None:
        outbox.on_outbox_commit(self.poke)

    def poke(self) -> None:
        """Called after a commit; at most one NOTIFY per interval."""
        if self._pending:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # a commit outside the event loop (scripts): readers' polling covers it
        self._pending = True
        task = loop.create_task(self._send())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self) -> None:
        await asyncio.sleep(self.interval)
        self._pending = False
        try:
            async with self.engine.connect() as conn:
                await conn.execute(_NOTIFY)
        except Exception as exc:  # readers also poll; a lost wake-up only delays delivery
            log.warning("outbox notify failed", extra={"error": type(exc).__name__})

    async def close(self) -> None:
        outbox.remove_outbox_commit_hook(self.poke)
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            try:
                await task
            except asyncio.CancelledError:
                continue
