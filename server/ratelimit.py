"""Per-principal rate limits: a token bucket per (token subject, method), in process.

ENTREPOT_RATE_LIMITS is a comma-separated list of `METHOD=RATE/UNIT[:BURST]`:
- METHOD: `inventory.v1.InventoryService/BulkAdjustStock` (the `entrepot.` package prefix and a
  leading `/` are optional), or `inventory.v1.InventoryService/*` for every method of a service;
- RATE/UNIT: calls per `s`, `m` or `h`; BURST: bucket size (default: one second's worth, at least 1).

Past the limit: RESOURCE_EXHAUSTED, reason RATE_LIMITED, with google.rpc.RetryInfo saying when a
token will be available. Limits are per replica (N replicas allow N times the rate); this is a
guard against a runaway client, not a quota system.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from dataclasses import dataclass

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2

from server import context as ctx
from server.errors import abort, build_status
from server.interceptors import Guard

UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}
MAX_BUCKETS = 100_000


@dataclass(frozen=True)
class Limit:
    rate: float  # tokens per second
    burst: float


def _method_key(raw: str) -> str:
    key = raw.strip().lstrip("/")
    if not key.startswith("entrepot."):
        key = "entrepot." + key
    if "/" not in key:
        raise ValueError(f"rate limit method {raw!r} must look like package.Service/Method")
    return "/" + key


def parse_rate_limits(spec: str) -> dict[str, Limit]:
    """'svc/Method=20/s,svc/*=100/m:10' -> {'/entrepot.svc/Method': Limit, '/entrepot.svc/*': Limit}."""
    out: dict[str, Limit] = {}
    for item in spec.split(","):
        if not item.strip():
            continue
        method, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"rate limit {item!r} must be METHOD=RATE/UNIT[:BURST]")
        rate_part, _, burst_part = value.strip().partition(":")
        count, slash, unit = rate_part.partition("/")
        try:
            per_second = float(count) / UNITS[unit.strip() if slash else "s"]
            burst = float(burst_part) if burst_part else max(1.0, math.ceil(per_second))
        except (KeyError, ValueError) as exc:
            raise ValueError(f"rate limit {item!r} must be METHOD=RATE/UNIT[:BURST], unit s, m or h") from exc
        if per_second <= 0 or burst < 1:
            raise ValueError(f"rate limit {item!r}: rate must be > 0 and burst >= 1")
        out[_method_key(method)] = Limit(per_second, burst)
    return out


class TokenBuckets:
    """Buckets keyed by (principal, method); least recently used ones are dropped past MAX_BUCKETS
    (a dropped bucket comes back full, which only ever errs on the side of allowing)."""

    def __init__(self, limits: dict[str, Limit], max_buckets: int = MAX_BUCKETS) -> None:
        self.limits = limits
        self.max_buckets = max_buckets
        self._buckets: OrderedDict[tuple[str, str], tuple[float, float]] = OrderedDict()

    def limit_for(self, method: str) -> Limit | None:
        found = self.limits.get(method)
        if found is None:
            found = self.limits.get(method.rsplit("/", 1)[0] + "/*")
        return found

    def take(self, principal: str, method: str, now: float | None = None) -> float:
        """0.0 when the call may proceed, else seconds until a token is available."""
        limit = self.limit_for(method)
        if limit is None:
            return 0.0
        now = time.monotonic() if now is None else now
        key = (principal, method)
        tokens, last = self._buckets.pop(key, (limit.burst, now))
        tokens = min(limit.burst, tokens + (now - last) * limit.rate)
        wait = 0.0
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            wait = (1.0 - tokens) / limit.rate
        self._buckets[key] = (tokens, now)
        if len(self._buckets) > self.max_buckets:
            self._buckets.popitem(last=False)
        return wait


class RateLimit:
    """The rate-limit stage: a pipeline guard (server/interceptors.py) after auth, which
    binds the caller whose subject names the bucket."""

    def __init__(self, limits: dict[str, Limit]) -> None:
        self.buckets = TokenBuckets(limits)

    def guard(self) -> Guard:
        return Guard("rate-limit", self.check)

    async def check(self, context: grpc.aio.ServicerContext, name: str) -> None:
        wait = self.buckets.take(ctx.current_caller().subject, name)
        if wait > 0:
            await abort(context, rate_limited(name, wait))


def rate_limited(name: str, wait: float) -> status_pb2.Status:
    status = build_status(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "RATE_LIMITED",
        f"too many calls to {name}; retry in {wait:.3f}s",
        {"method": name, "retry_after_ms": str(math.ceil(wait * 1000))},
    )
    delay = duration_pb2.Duration()
    delay.FromNanoseconds(math.ceil(wait * 1e9))
    packed = any_pb2.Any()
    packed.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    status.details.append(packed)
    return status
