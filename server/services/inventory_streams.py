"""InventoryService streams: SyncStock, GetSyncCursor, WatchStockChanges.

`InventoryStreamsMixin` is inherited by InventoryServicer (it only needs
`self.rt`). Their settings (ENTREPOT_SYNC_UNKNOWN_SKU, ENTREPOT_SYNC_MAX_IN_FLIGHT,
ENTREPOT_WATCH_BUFFER_EVENTS, ENTREPOT_WATCH_HEARTBEAT_SECONDS, ENTREPOT_WATCH_CURSOR_*) are in
server/settings.py with the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import TypeAlias

import grpc

from domain.inventory import sync, watch
from domain.inventory.channel_allocation import sellable_warehouses
from domain.inventory.types import Cost
from domain.shared.errors import DomainError, InvalidArgument
from domain.shared.uow import retrying
from entrepot.inventory.v1 import inventory_pb2 as pb
from server.context import current_caller
from server.convert import timestamp_micros, ts
from server.runtime import Runtime
from server.services.inventory_convert import MOVEMENT_TO_PROTO
from server.watch_hub import CursorRule, watch_stock

log = logging.getLogger("entrepot.sync")

Ctx: TypeAlias = grpc.aio.ServicerContext  # type: ignore[type-arg]

_KINDS = {
    pb.SYNC_EVENT_KIND_SET: "set",
    pb.SYNC_EVENT_KIND_ADJUST: "adjust",
    pb.SYNC_EVENT_KIND_RECEIVE: "receive",
}
# The reader task's end-of-stream marker on the queue.
_END = object()


def events_from_proto(batch: pb.SyncBatch) -> list[sync.SyncEvent]:
    kinds = _KINDS
    event = sync.SyncEvent
    out: list[sync.SyncEvent] = []
    append = out.append
    for e in batch.events:
        occurred_us = None
        if e.HasField("occurred_at"):
            occurred_us = timestamp_micros(e.occurred_at, "batch.events.occurred_at")
        cost = None
        if e.HasField("unit_cost"):
            cost = Cost(e.unit_cost.amount_minor, e.unit_cost.currency_code)
        append(
            event(
                e.event_id,
                e.sku,
                e.warehouse_code,
                kinds.get(e.kind, "unspecified"),
                e.quantity,
                e.reason,
                occurred_us,
                cost,
            )
        )
    return out


def cursor_to_proto(c: sync.Cursor) -> pb.SyncCursor:
    return pb.SyncCursor(
        source=c.source,
        last_event_id=c.last_event_id,
        events_seen=c.events_seen,
        events_applied=c.events_applied,
        update_time=ts(c.updated_at),
    )


def ack_to_proto(seq: int, r: sync.BatchResult) -> pb.SyncAck:
    assert r.cursor is not None
    return pb.SyncAck(
        batch_seq=seq,
        applied=r.applied,
        duplicate=r.duplicate,
        stale=r.stale,
        rejected=r.rejected,
        errors=[pb.SyncEventError(event_id=e.event_id, reason=e.reason, message=e.message) for e in r.errors],
        cursor=cursor_to_proto(r.cursor),
    )


def event_to_proto(e: watch.StockEvent) -> pb.StockChangeEvent:
    return pb.StockChangeEvent(
        event_id=e.event_id,
        sku=e.sku,
        warehouse_code=e.warehouse_code,
        type=MOVEMENT_TO_PROTO.get(e.type, pb.MOVEMENT_TYPE_UNSPECIFIED),
        on_hand_delta=e.on_hand_delta,
        reserved_delta=e.reserved_delta,
        on_hand=e.on_hand,
        reserved=e.reserved,
        available=e.available,
        reason=e.reason,
        time=ts(e.time),
        below_threshold=e.below_threshold,
        movement_id=e.movement_id,
        kit_sku=e.kit_sku,
        first_movement_id=e.first_movement_id,
    )


async def apply_batch(
    rt: Runtime,
    source: str,
    events: list[sync.SyncEvent] | sync.PreparedBatch,
    unknown_sku: str,
    actor: str,
) -> sync.BatchResult:
    """One batch, one transaction; retried whole on deadlock/serialization failure."""

    async def attempt() -> sync.BatchResult:
        async with rt.uow() as uow:
            result = await sync.apply_batch(uow.session, source, events, unknown_sku=unknown_sku, actor=actor)
            await uow.commit()
            return result

    return await retrying(attempt, what="SyncStock batch")


class InventoryStreamsMixin:
    """SyncStock, GetSyncCursor and WatchStockChanges for InventoryServicer."""

    rt: Runtime

    async def GetSyncCursor(self, request: pb.GetSyncCursorRequest, context: Ctx) -> pb.SyncCursor:
        cursor = await self.rt.read(lambda s: sync.get_cursor(s, request.source))
        return cursor_to_proto(cursor)

    async def SyncStock(
        self, request_iterator: AsyncIterator[pb.SyncStockRequest], context: Ctx
    ) -> AsyncIterator[pb.SyncStockResponse]:
        cfg = self.rt.settings
        try:
            first = await anext(aiter(request_iterator))
        except StopAsyncIteration:
            return
        if first.WhichOneof("message") != "start":
            raise InvalidArgument(
                "SYNC_START_REQUIRED", "the first SyncStock message must be `start` naming the source"
            )
        source = sync.check_source(first.start.source)
        actor = current_caller().subject
        ready = await self.rt.read(lambda s: sync.get_cursor(s, source))
        yield pb.SyncStockResponse(ready=cursor_to_proto(ready))

        slots = asyncio.Semaphore(max(1, cfg.sync_max_in_flight))
        queue: asyncio.Queue[object] = asyncio.Queue()

        async def read() -> None:
            # Decoding runs here, overlapping the previous batch's transaction.
            try:
                while True:
                    await slots.acquire()
                    try:
                        req = await anext(aiter(request_iterator))
                    except StopAsyncIteration:
                        return
                    if req.WhichOneof("message") != "batch":
                        raise InvalidArgument("SYNC_START_REPEATED", "only the first message may be `start`")
                    events = events_from_proto(req.batch)
                    if not 1 <= len(events) <= sync.MAX_BATCH:
                        raise InvalidArgument(
                            "INVALID_BATCH",
                            f"a batch holds 1 to {sync.MAX_BATCH} events",
                            metadata={"batch_seq": str(req.batch.batch_seq)},
                        )
                    # Validation too: it runs while the previous batch is in its transaction.
                    await queue.put((req.batch.batch_seq, sync.prepare(events)))
            except DomainError as err:
                await queue.put(err)
            finally:
                await queue.put(_END)

        reader = asyncio.create_task(read(), name="sync-reader")
        try:
            while True:
                item = await queue.get()
                if item is _END:
                    break
                if isinstance(item, DomainError):
                    raise item
                assert isinstance(item, tuple)
                seq: int = item[0]
                batch: sync.PreparedBatch = item[1]
                result = await apply_batch(self.rt, source, batch, cfg.sync_unknown_sku, actor)
                slots.release()
                yield pb.SyncStockResponse(ack=ack_to_proto(seq, result))
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader

    async def WatchStockChanges(
        self, request: pb.WatchStockChangesRequest, context: Ctx
    ) -> AsyncIterator[pb.WatchStockChangesResponse]:
        cfg = self.rt.settings
        sellable = None
        if request.channel:
            sellable = await self.rt.read(lambda s: sellable_warehouses(s, request.channel))
        skus = list(request.skus)
        if skus and len(skus) <= watch.MAX_FILTER:
            skus = await self.rt.read(lambda s: watch.with_kit_components(s, skus))
        flt = watch.make_filter(skus, list(request.warehouse_codes), request.below_threshold_only, sellable)
        async for msg in watch_stock(
            self.rt,
            flt,
            request.after_event_id,
            max_events=cfg.watch_buffer_events,
            heartbeat_seconds=cfg.watch_heartbeat_seconds,
            cursor_rule=CursorRule(cfg.watch_cursor_gap_events, cfg.watch_cursor_seconds),
        ):
            yield pb.WatchStockChangesResponse(
                events=[event_to_proto(e) for e in msg.events], cursor=msg.cursor
            )
