"""Prometheus metrics per method, served on their own port.

Unary calls and server streams are timed by separate histograms with buckets that fit each:
a watch stream lives minutes to hours, and sharing a histogram with unary calls would make
`histogram_quantile` over unary latency read the streams' lifetimes.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

RPC_TOTAL = Counter("entrepot_rpc_total", "RPCs handled, by method and status code", ["method", "code"])
RPC_SECONDS = Histogram(
    "entrepot_rpc_duration_seconds",
    "Unary RPC latency by method (streams: entrepot_stream_duration_seconds)",
    ["method"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
STREAM_SECONDS = Histogram(
    "entrepot_stream_duration_seconds",
    "Server-streaming RPC lifetime by method, from the call to its end",
    ["method"],
    buckets=(0.1, 1, 10, 30, 60, 300, 900, 1800, 3600, 4 * 3600, 12 * 3600, 24 * 3600),
)
RPC_IN_FLIGHT = Gauge("entrepot_rpc_in_flight", "RPCs in progress, by method", ["method"])
RESERVE_BATCH_SIZE = Histogram(
    "entrepot_reserve_batch_size",
    "ReserveStock requests per group-committed transaction",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
ORDER_INTENTS = Counter(
    "entrepot_order_intents_total",
    "Order intents by source system and outcome: created, duplicate (the same intent "
    "again, answered with its order) or conflict (other content under an accepted key)",
    ["source_system", "outcome"],
)
# Source systems are the callers' words: past this many, the others share one label.
MAX_SOURCE_SYSTEM_LABELS = 200
OTHER_SOURCES = "_other"
_source_labels: set[str] = set()


def count_order_intent(source_system: str, outcome: str) -> None:
    """One order intent decided (`outcome`: created, duplicate or conflict)."""
    if source_system not in _source_labels:
        if len(_source_labels) >= MAX_SOURCE_SYSTEM_LABELS:
            source_system = OTHER_SOURCES
        else:
            _source_labels.add(source_system)
    ORDER_INTENTS.labels(source_system, outcome).inc()


class IntentOutcome:
    """An order intent's outcome, counted once per call: the transaction function
    sets it (a retried attempt sets it again, from scratch), and the servicer
    counts it after the call's transaction ended, so a rolled-back attempt is
    never counted and a request_id replay, which runs nothing, neither."""

    def __init__(self, source_system: str) -> None:
        self.source_system = source_system
        self.outcome = ""

    def count(self) -> None:
        if self.outcome:
            count_order_intent(self.source_system, self.outcome)


STOCK_DRIFT = Gauge(
    "entrepot_stock_drift",
    "Stock levels whose counters drift, by kind (on_hand, reserved, lots), as of the last audit "
    "run by the replica holding the stock-audit lease",
    ["kind"],
)


class MethodMetrics:
    """Label children resolved once per method, not per call."""

    __slots__ = ("_codes", "in_flight", "latency", "method")

    def __init__(self, method: str, streaming: bool) -> None:
        self.method = method
        self.latency = (STREAM_SECONDS if streaming else RPC_SECONDS).labels(method)
        self.in_flight = RPC_IN_FLIGHT.labels(method)
        self._codes: dict[str, Counter] = {}

    def count(self, code: str) -> None:
        child = self._codes.get(code)
        if child is None:
            child = self._codes[code] = RPC_TOTAL.labels(self.method, code)
        child.inc()


_by_method: dict[str, MethodMetrics] = {}


def for_method(method: str, streaming: bool) -> MethodMetrics:
    m = _by_method.get(method)
    if m is None:
        m = _by_method[method] = MethodMetrics(method, streaming)
    return m


def serve_metrics(port: int, host: str = "127.0.0.1") -> None:
    if port:
        start_http_server(port, addr=host)


# The event relay (server/relay.py). Lag is computed by every replica from the database
# (the cursor and the outbox), so it is reported even while the relaying replica is down.
RELAY_PUBLISHED = Counter("entrepot_relay_published_total", "Outbox events the broker acknowledged")
RELAY_DUPLICATES = Counter(
    "entrepot_relay_duplicates_total",
    "Events published again (after a relay died between the broker's ack and its cursor) "
    "that the broker recognised by message id and did not store twice",
)
RELAY_LAG_EVENTS = Gauge("entrepot_relay_lag_events", "Committed outbox events not yet published")
RELAY_LAG_SECONDS = Gauge(
    "entrepot_relay_lag_seconds", "How long the oldest unpublished outbox event has waited (0: none)"
)
