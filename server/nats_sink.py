"""The relay's NATS JetStream sink (server/relay.py EventSink; docs/events.md).

Subjects: `<prefix>.<topic>.<aggregate id>`, e.g. entrepot.inventory.stock_changed.SKU-1
(the topic's dots become subject tokens; the aggregate id is one token, see
`subject_token`). Message: a JSON envelope of the event; headers `Nats-Msg-Id` (the
outbox id: JetStream drops an id it already stored within the stream's duplicate window)
and `Entrepot-Position` (epoch:id, the relay's position: a new relay can tell where the
stream stands).

Publishing pipelines a batch on one connection and awaits the acks in order: JetStream
stores the messages of one connection in the order they were sent, so the acknowledged
events are always a prefix of the batch. A broken connection is dropped and opened again
on the next batch (no client-side buffering of messages while reconnecting).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import Header, StorageType, StreamConfig

from domain.shared import outbox
from server.relay import Position, Published
from server.settings import Settings

log = logging.getLogger("entrepot.relay")

POSITION_HEADER = "Entrepot-Position"
# Characters a subject token may hold as they are; any other is %XX-escaped (UTF-8).
_TOKEN_SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_:@+=,;!~")


def subject_token(value: str) -> str:
    """One subject token for an aggregate id: '.', '*', '>', whitespace and '%' (and every
    other character outside a plain set) are %XX-escaped; the empty id is '%'."""
    if not value:
        return "%"
    if all(c in _TOKEN_SAFE for c in value):
        return value
    return "".join(c if c in _TOKEN_SAFE else "".join(f"%{b:02X}" for b in c.encode()) for c in value)


def subject_for(prefix: str, event: outbox.StoredEvent) -> str:
    return f"{prefix}.{event.topic}.{subject_token(event.aggregate_id)}"


def envelope(event: outbox.StoredEvent) -> bytes:
    return json.dumps(
        {
            "id": event.id,
            "topic": event.topic,
            "aggregate_type": event.aggregate_type,
            "aggregate_id": event.aggregate_id,
            "channel": event.channel,
            "created_at": event.created_at.isoformat(),
            "payload": event.payload,
        },
        separators=(",", ":"),
    ).encode()


class NatsSink:
    def __init__(self, settings: Settings) -> None:
        assert settings.nats_url
        self.url = settings.nats_url
        self.stream = settings.events_stream
        self.prefix = settings.events_subject_prefix
        self.duplicate_window = settings.events_duplicate_window_seconds
        self.ack_timeout = settings.relay_ack_timeout_seconds
        self.name = f"nats:{self.stream}"
        self._nc: NATS | None = None
        self._js: JetStreamContext | None = None

    async def _connect(self) -> JetStreamContext:
        if self._js is not None and self._nc is not None and self._nc.is_connected:
            return self._js
        await self.close()
        nc = await nats.connect(
            self.url,
            name="entrepot-relay",
            allow_reconnect=False,
            connect_timeout=2,
            max_reconnect_attempts=0,
            error_cb=self._on_error,
        )
        js = nc.jetstream(timeout=self.ack_timeout)
        try:
            await js.stream_info(self.stream)
        except nats.js.errors.NotFoundError:
            # Created once with our defaults; an operator's own configuration is left alone.
            await js.add_stream(
                StreamConfig(
                    name=self.stream,
                    subjects=[f"{self.prefix}.>"],
                    duplicate_window=self.duplicate_window,
                    storage=StorageType.FILE,
                )
            )
        except BaseException:
            await nc.close()
            raise
        self._nc, self._js = nc, js
        return js

    @staticmethod
    async def _on_error(exc: Exception) -> None:
        log.warning("NATS connection error", extra={"error": type(exc).__name__, "detail": str(exc)[:200]})

    async def publish(self, events: Sequence[outbox.StoredEvent], epoch: int) -> Published:
        js = await self._connect()
        futures: list[asyncio.Future[Any]] = []
        error: Exception | None = None
        try:
            for e in events:
                headers = {Header.MSG_ID.value: str(e.id), POSITION_HEADER: f"{epoch}:{e.id}"}
                futures.append(
                    await js.publish_async(subject_for(self.prefix, e), envelope(e), headers=headers)
                )
        except (nats.errors.Error, OSError) as exc:
            error = exc  # the ones sent before may still be acknowledged
        acked = duplicates = 0
        try:
            if futures:
                await asyncio.wait(futures, timeout=self.ack_timeout)
            for fut in futures:
                if not fut.done():
                    error = error or TimeoutError(f"no ack from JetStream within {self.ack_timeout}s")
                    break
                failure = fut.exception()
                if failure is not None:
                    error = failure if isinstance(failure, Exception) else RuntimeError(str(failure))
                    break
                acked += 1
                duplicates += bool(fut.result().duplicate)
        finally:
            for fut in futures:
                fut.cancel()  # frees the client's slot of an ack that never came
        if error is not None:
            await self.close()  # start over on a fresh connection
        return Published(acked, duplicates, error)

    async def last_published(self) -> Position | None:
        js = await self._connect()
        try:
            msg = await js.get_last_msg(self.stream, f"{self.prefix}.>")
        except nats.js.errors.NotFoundError:
            return None
        value = (msg.headers or {}).get(POSITION_HEADER, "")
        epoch, _, event_id = value.partition(":")
        if not (epoch.isdigit() and event_id.isdigit()):
            return None
        return (int(epoch), int(event_id))

    async def close(self) -> None:
        nc, self._nc, self._js = self._nc, None, None
        if nc is not None and not nc.is_closed:
            try:
                await nc.close()
            except (nats.errors.Error, OSError) as exc:  # the connection is dropped either way
                log.warning("closing the NATS connection failed", extra={"error": type(exc).__name__})
