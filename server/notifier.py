"""One debounced `NOTIFY entrepot_outbox` per process after commits that wrote
outbox rows (see domain/shared/outbox.py for why NOTIFY is not sent inside
the writing transactions)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from domain.shared import outbox

log = logging.getLogger("entrepot.notifier")

NOTIFY_SQL = f"SELECT pg_notify('{outbox.NOTIFY_CHANNEL}', '')"


class OutboxNotifier:
    """`send` runs NOTIFY_SQL in autocommit (the runtime's asyncpg read pool: one round
    trip; a pooled session connection cost a checkout and a reset ROLLBACK per NOTIFY)."""

    def __init__(self, send: Callable[[], Awaitable[object]], interval: float = 0.005) -> None:
        self.send = send
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
            await self.send()
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
