"""Entrepot's typed Python client.

    async with Entrepot("127.0.0.1:50051", token, channel="default") as ep:
        level = await ep.inventory.get_stock_level(inventory_pb2.GetStockLevelRequest(sku="SKU-1"))

Every call carries the bearer token and the channel slug, has a default
deadline, retries idempotent reads on UNAVAILABLE, and raises a typed
EntrepotError subclass carrying the server's reason and details.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

import grpc

from entrepot_client._services import READ_METHODS, AsyncClients, SyncClients
from entrepot_client.base import DEFAULT_TIMEOUT, channel_options
from entrepot_client.errors import (
    AbortedError,
    AlreadyExistsError,
    DeadlineExceededError,
    EntrepotError,
    FailedPreconditionError,
    FieldViolation,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    PreconditionViolation,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
)

__all__ = [
    "AbortedError",
    "AlreadyExistsError",
    "DeadlineExceededError",
    "Entrepot",
    "EntrepotError",
    "EntrepotSync",
    "FailedPreconditionError",
    "FieldViolation",
    "InternalError",
    "InvalidArgumentError",
    "NotFoundError",
    "PermissionDeniedError",
    "PreconditionViolation",
    "ResourceExhaustedError",
    "UnauthenticatedError",
    "UnavailableError",
]

# The server's ENTREPOT_MAX_MESSAGE_BYTES default (server/settings.py): the server's
# configured value is the one truth for message sizes. Against a server configured with
# another value, pass the same number as max_message_bytes=.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024


def _metadata(token: str | None, channel: str | None) -> list[tuple[str, str]]:
    md = []
    if token:
        md.append(("authorization", f"Bearer {token}"))
    if channel:
        md.append(("x-channel-slug", channel))
    return md


class Entrepot(AsyncClients):
    """Async clients for every service over one grpc.aio channel."""

    def __init__(
        self,
        target: str,
        token: str | None,
        channel: str | None = None,
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
        credentials: grpc.ChannelCredentials | None = None,
        options: list[tuple[str, Any]] | None = None,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
    ) -> None:
        opts = channel_options(READ_METHODS, max_message_bytes) + list(options or [])
        if credentials is not None:
            self.grpc_channel = grpc.aio.secure_channel(target, credentials, options=opts)
        else:
            self.grpc_channel = grpc.aio.insecure_channel(target, options=opts)
        super().__init__(self.grpc_channel, _metadata(token, channel), timeout)

    async def close(self) -> None:
        await self.grpc_channel.close()

    async def __aenter__(self) -> Entrepot:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


class EntrepotSync(SyncClients):
    """Blocking clients for every service over one grpc channel."""

    def __init__(
        self,
        target: str,
        token: str | None,
        channel: str | None = None,
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
        credentials: grpc.ChannelCredentials | None = None,
        options: list[tuple[str, Any]] | None = None,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
    ) -> None:
        opts = channel_options(READ_METHODS, max_message_bytes) + list(options or [])
        if credentials is not None:
            self.grpc_channel = grpc.secure_channel(target, credentials, options=opts)
        else:
            self.grpc_channel = grpc.insecure_channel(target, options=opts)
        super().__init__(self.grpc_channel, _metadata(token, channel), timeout)

    def close(self) -> None:
        self.grpc_channel.close()

    def __enter__(self) -> EntrepotSync:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
