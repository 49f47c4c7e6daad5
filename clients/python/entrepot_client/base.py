"""Connection, metadata, deadlines, retries and error translation shared by all service clients."""

from __future__ import annotations

import json
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator, Sequence
from typing import Any

import grpc

from entrepot_client.errors import from_rpc_error

Metadata = Sequence[tuple[str, str]]

DEFAULT_TIMEOUT = 10.0


def service_config(read_methods: Sequence[tuple[str, str]]) -> str:
    """Retry idempotent reads on UNAVAILABLE with backoff; mutations are retried by the
    caller with the same request_id, which the server deduplicates."""
    return json.dumps(
        {
            "methodConfig": [
                {
                    "name": [{"service": s, "method": m} for s, m in read_methods],
                    "retryPolicy": {
                        "maxAttempts": 4,
                        "initialBackoff": "0.1s",
                        "maxBackoff": "2s",
                        "backoffMultiplier": 2,
                        "retryableStatusCodes": ["UNAVAILABLE"],
                    },
                }
            ]
        }
    )


def channel_options(read_methods: Sequence[tuple[str, str]], max_message_bytes: int) -> list[tuple[str, Any]]:
    return [
        ("grpc.service_config", service_config(read_methods)),
        ("grpc.enable_retries", 1),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 10_000),
    ]


class _Common:
    stub_class: Any = None

    def __init__(self, channel: Any, metadata: Metadata, timeout: float | None) -> None:
        self._stub = self.stub_class(channel)
        self._metadata = tuple(metadata)
        self._timeout = timeout

    def _md(self, extra: Metadata | None) -> tuple[tuple[str, str], ...]:
        return self._metadata + tuple(extra) if extra else self._metadata

    def _t(self, timeout: float | None) -> float | None:
        return timeout if timeout is not None else self._timeout


class AsyncServiceClient(_Common):
    async def _unary(
        self, method: str, request: Any, timeout: float | None, metadata: Metadata | None
    ) -> Any:
        try:
            return await getattr(self._stub, method)(
                request, timeout=self._t(timeout), metadata=self._md(metadata)
            )
        except grpc.aio.AioRpcError as err:
            raise from_rpc_error(err) from None

    async def _server_stream(
        self, method: str, request: Any, timeout: float | None, metadata: Metadata | None
    ) -> AsyncIterator[Any]:
        # Streams have no default deadline: they are long-lived by design.
        call = getattr(self._stub, method)(request, timeout=timeout, metadata=self._md(metadata))
        try:
            async for item in call:
                yield item
        except grpc.aio.AioRpcError as err:
            raise from_rpc_error(err) from None
        finally:
            call.cancel()

    async def _client_stream(
        self,
        method: str,
        requests: AsyncIterable[Any] | Iterable[Any],
        timeout: float | None,
        metadata: Metadata | None,
    ) -> Any:
        try:
            return await getattr(self._stub, method)(
                requests, timeout=self._t(timeout), metadata=self._md(metadata)
            )
        except grpc.aio.AioRpcError as err:
            raise from_rpc_error(err) from None

    async def _bidi_stream(
        self,
        method: str,
        requests: AsyncIterable[Any] | Iterable[Any],
        timeout: float | None,
        metadata: Metadata | None,
    ) -> AsyncIterator[Any]:
        call = getattr(self._stub, method)(requests, timeout=timeout, metadata=self._md(metadata))
        try:
            async for item in call:
                yield item
        except grpc.aio.AioRpcError as err:
            raise from_rpc_error(err) from None
        finally:
            call.cancel()


class SyncServiceClient(_Common):
    def _unary(self, method: str, request: Any, timeout: float | None, metadata: Metadata | None) -> Any:
        try:
            return getattr(self._stub, method)(request, timeout=self._t(timeout), metadata=self._md(metadata))
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None

    def _server_stream(
        self, method: str, request: Any, timeout: float | None, metadata: Metadata | None
    ) -> Iterator[Any]:
        call = getattr(self._stub, method)(request, timeout=timeout, metadata=self._md(metadata))
        try:
            yield from call
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        finally:
            call.cancel()

    def _client_stream(
        self, method: str, requests: Iterable[Any], timeout: float | None, metadata: Metadata | None
    ) -> Any:
        try:
            return getattr(self._stub, method)(
                iter(requests), timeout=self._t(timeout), metadata=self._md(metadata)
            )
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None

    def _bidi_stream(
        self, method: str, requests: Iterable[Any], timeout: float | None, metadata: Metadata | None
    ) -> Iterator[Any]:
        call = getattr(self._stub, method)(iter(requests), timeout=timeout, metadata=self._md(metadata))
        try:
            yield from call
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        finally:
            call.cancel()
