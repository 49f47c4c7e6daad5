"""Stock streams helpers: push WMS/ERP events with `sync_stock`, follow changes with `watch_stock`.

    async with Entrepot(target, token) as ep:
        progress = await sync_stock(ep, "wms-paris", events, batch_size=2000, on_progress=print)
        async for change in watch_stock(ep, skus=["SKU-1"]):
            ...

Both survive server restarts: `sync_stock` reconnects on UNAVAILABLE, learns
from the server's cursor which unacknowledged batches were committed, and
resends the rest (the server applies each (source, event_id) once anyway);
`watch_stock` reconnects and resumes after the last event it yielded.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import grpc
from google.protobuf import timestamp_pb2

from entrepot.inventory.v1 import inventory_pb2 as pb
from entrepot.platform.v1 import types_pb2
from entrepot_client.errors import AbortedError, ResourceExhaustedError, UnavailableError

log = logging.getLogger("entrepot_client.streams")

KINDS = {
    "set": pb.SYNC_EVENT_KIND_SET,
    "adjust": pb.SYNC_EVENT_KIND_ADJUST,
    "receive": pb.SYNC_EVENT_KIND_RECEIVE,
}


@dataclass(frozen=True)
class StockEvent:
    """One WMS/ERP event; `kind` is "set", "adjust" or "receive"."""

    event_id: str
    sku: str
    warehouse_code: str
    kind: str
    quantity: int
    occurred_at: datetime | None = None
    reason: str = ""
    # RECEIVE only: (amount in minor units, ISO-4217 currency).
    unit_cost: tuple[int, str] | None = None

    def to_proto(self) -> pb.SyncEvent:
        e = pb.SyncEvent(
            event_id=self.event_id,
            sku=self.sku,
            warehouse_code=self.warehouse_code,
            kind=KINDS.get(self.kind.lower(), pb.SYNC_EVENT_KIND_UNSPECIFIED),
            quantity=self.quantity,
            reason=self.reason,
        )
        if self.occurred_at is not None:
            t = timestamp_pb2.Timestamp()
            at = self.occurred_at if self.occurred_at.tzinfo else self.occurred_at.replace(tzinfo=UTC)
            t.FromDatetime(at.astimezone(UTC))
            e.occurred_at.CopyFrom(t)
        if self.unit_cost is not None:
            e.unit_cost.CopyFrom(
                types_pb2.Money(amount_minor=self.unit_cost[0], currency_code=self.unit_cost[1])
            )
        return e


@dataclass
class SyncProgress:
    source: str
    batches: int = 0
    applied: int = 0
    duplicate: int = 0
    stale: int = 0
    rejected: int = 0
    # Batches whose ack was lost in a disconnect but which the cursor showed committed.
    committed_unacked: int = 0
    reconnects: int = 0
    errors: list[pb.SyncEventError] = field(default_factory=list)
    cursor: pb.SyncCursor | None = None


@dataclass
class _Batch:
    seq: int
    message: pb.SyncStockRequest
    # Events of this source sent up to and including this batch (since `base`).
    end: int


def _inventory(client: Any) -> Any:
    return getattr(client, "inventory", client)


async def _aiter(events: Iterable[Any] | AsyncIterable[Any]) -> AsyncIterator[Any]:
    if isinstance(events, AsyncIterable):
        async for e in events:
            yield e
    else:
        for e in events:
            yield e


async def sync_stock(
    client: Any,
    source: str,
    events: Iterable[StockEvent | pb.SyncEvent] | AsyncIterable[StockEvent | pb.SyncEvent],
    batch_size: int = 1000,
    *,
    window: int = 4,
    on_progress: Callable[[SyncProgress], None] | None = None,
    max_retries: int = 30,
    retry_delay: float = 0.2,
    max_retry_delay: float = 2.0,
    retry_for: float = 120.0,
) -> SyncProgress:
    """Stream `events` to SyncStock in batches of `batch_size`, at most `window` unacked.

    Retries UNAVAILABLE (server restart, network) with capped exponential
    backoff until both `max_retries` attempts in a row and `retry_for` seconds
    without any answer are used up; other errors are raised. (gRPC channels
    back off reconnects too: see `reconnect_options()`.) Returns
    the totals; `on_progress` is called after every ack.
    """
    if not 1 <= batch_size <= 10_000:
        raise ValueError("batch_size must be 1 to 10,000")
    inv = _inventory(client)
    progress = SyncProgress(source)
    pending: deque[_Batch] = deque()
    source_iter = _aiter(events).__aiter__()
    exhausted = False
    seq = 0
    room = asyncio.Event()
    room.set()
    sent_events = 0

    async def next_batch() -> _Batch | None:
        nonlocal exhausted, seq, sent_events
        if exhausted:
            return None
        items: list[pb.SyncEvent] = []
        while len(items) < batch_size:
            try:
                e = await source_iter.__anext__()
            except StopAsyncIteration:
                exhausted = True
                break
            items.append(e.to_proto() if isinstance(e, StockEvent) else e)
        if not items:
            return None
        seq += 1
        sent_events += len(items)
        msg = pb.SyncStockRequest(batch=pb.SyncBatch(batch_seq=seq, events=items))
        return _Batch(seq, msg, sent_events)

    ready = asyncio.Event()
    # events_seen of the source when this run started (from the first `ready`).
    base: int | None = None
    # A failed call's request generator may still be pulled by gRPC: only the
    # current connection's generator may take new batches.
    generation = 0

    async def requests(gen: int) -> AsyncIterator[pb.SyncStockRequest]:
        yield pb.SyncStockRequest(start=pb.SyncStart(source=source))
        # The ready cursor first says which unacked batches were committed.
        await ready.wait()
        if gen != generation:
            return
        for old in list(pending):
            yield old.message
        while True:
            while len(pending) >= window:
                room.clear()
                await room.wait()
            if gen != generation:
                return
            b = await next_batch()
            if b is None:
                break
            pending.append(b)
            yield b.message
        # Keep the request side open until every batch is acked.
        while pending:
            room.clear()
            await room.wait()

    failures = 0
    last_ok = time.monotonic()
    while True:
        generation += 1
        ready = asyncio.Event()
        room.set()
        try:
            async for resp in inv.sync_stock(requests(generation)):
                failures = 0
                last_ok = time.monotonic()
                if resp.WhichOneof("message") == "ready":
                    progress.cursor = resp.ready
                    if base is None:
                        base = resp.ready.events_seen
                    _drop_committed(pending, resp.ready.events_seen - base, progress)
                    ready.set()
                    continue
                ack = resp.ack
                while pending and pending[0].seq != ack.batch_seq:
                    pending.popleft()
                if pending:
                    pending.popleft()
                progress.batches += 1
                progress.applied += ack.applied
                progress.duplicate += ack.duplicate
                progress.stale += ack.stale
                progress.rejected += ack.rejected
                progress.errors.extend(ack.errors)
                progress.cursor = ack.cursor
                room.set()
                if on_progress is not None:
                    on_progress(progress)
                if exhausted and not pending:
                    room.set()
            if exhausted and not pending:
                return progress
            raise UnavailableError(
                grpc.StatusCode.UNAVAILABLE, "SyncStock ended before every batch was acked"
            )
        except (UnavailableError, AbortedError) as err:
            failures += 1
            if failures > max_retries and time.monotonic() - last_ok > retry_for:
                raise
            progress.reconnects += 1
            log.info("SyncStock disconnected; resuming", extra={"error": str(err), "attempt": failures})
            await asyncio.sleep(min(max_retry_delay, retry_delay * 2 ** min(failures - 1, 6)))


def _drop_committed(pending: deque[_Batch], committed: int, progress: SyncProgress) -> None:
    """Batches of one source commit whole and in order, and the cursor counts every
    event committed: unacked batches ending at or below that count were committed
    (assumes one adapter per source at a time; a second one only costs duplicates)."""
    while pending and pending[0].end <= committed:
        pending.popleft()
        progress.committed_unacked += 1


def reconnect_options(max_backoff_ms: int = 2000) -> list[tuple[str, int]]:
    """Channel options (pass as `Entrepot(..., options=...)`) that cap gRPC's own
    reconnect backoff, which otherwise grows to minutes after repeated failures."""
    return [
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.min_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", max_backoff_ms),
    ]


class StockWatch:
    """Async iterator of StockChangeEvent that reconnects and resumes by itself.

    `cursor` is the resume point after the last event yielded (or a later
    position passed while filtered events were skipped); persist it to resume
    across process restarts with `after_event_id=cursor`.
    """

    def __init__(
        self,
        client: Any,
        *,
        skus: Iterable[str] = (),
        warehouse_codes: Iterable[str] = (),
        below_threshold_only: bool = False,
        after_event_id: int = 0,
        max_retries: int = 30,
        retry_delay: float = 0.2,
        max_retry_delay: float = 2.0,
        retry_for: float = 120.0,
    ) -> None:
        self._inv = _inventory(client)
        self._retry_for = retry_for
        self._skus = list(skus)
        self._whs = list(warehouse_codes)
        self._below = below_threshold_only
        self.cursor = after_event_id
        self.reconnects = 0
        self._max_retries = max_retries
        self._delay = retry_delay
        self._max_delay = max_retry_delay

    def __aiter__(self) -> AsyncIterator[pb.StockChangeEvent]:
        return self._run()

    async def _run(self) -> AsyncIterator[pb.StockChangeEvent]:
        failures = 0
        last_ok = time.monotonic()
        while True:
            request = pb.WatchStockChangesRequest(
                skus=self._skus,
                warehouse_codes=self._whs,
                below_threshold_only=self._below,
                after_event_id=self.cursor,
            )
            try:
                async for msg in self._inv.watch_stock_changes(request):
                    failures = 0
                    last_ok = time.monotonic()
                    for e in msg.events:
                        self.cursor = e.event_id
                        yield e
                    if msg.cursor:
                        self.cursor = msg.cursor
            except (UnavailableError, ResourceExhaustedError) as err:
                if isinstance(err, ResourceExhaustedError) and err.reason != "WATCHER_TOO_SLOW":
                    raise
                failures += 1
                if failures > self._max_retries and time.monotonic() - last_ok > self._retry_for:
                    raise
                self.reconnects += 1
                log.info("watch disconnected; resuming", extra={"error": str(err), "cursor": self.cursor})
                await asyncio.sleep(min(self._max_delay, self._delay * 2 ** min(failures - 1, 6)))


def watch_stock(client: Any, **kwargs: Any) -> StockWatch:
    """`async for change in watch_stock(ep, skus=[...], after_event_id=cursor)`: see StockWatch."""
    return StockWatch(client, **kwargs)


__all__ = ["StockEvent", "StockWatch", "SyncProgress", "reconnect_options", "sync_stock", "watch_stock"]
