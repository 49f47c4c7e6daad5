"""The server's one configuration: every setting, from the environment (pydantic-settings,
prefix ENTREPOT_). Code reads `rt.settings` / `App.settings`; no module keeps settings of
its own or falls back to defaults of its own. The table of every setting: docs/operations.md."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def _env(name: str) -> AliasChoices:
    return AliasChoices(name)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ENTREPOT_", extra="ignore", populate_by_name=True)

    database_url: str | None = Field(default=None, validation_alias=_env("DATABASE_URL"))
    temporal_address: str | None = Field(default=None, validation_alias=_env("TEMPORAL_ADDRESS"))
    temporal_namespace: str = Field(default="default", validation_alias=_env("TEMPORAL_NAMESPACE"))
    temporal_task_queue: str = Field(default="entrepot", validation_alias=_env("TEMPORAL_TASK_QUEUE"))
    # The event relay (server/relay.py, docs/events.md): set, every outbox event is published
    # to this NATS JetStream server; unset, no relay runs.
    nats_url: str | None = Field(default=None, validation_alias=_env("NATS_URL"))
    # How long an RPC waits for the start of the workflow its commit asked for; past it (Temporal
    # down or slow) the answer stands and the reconcilers start the workflow (server/runtime.py).
    temporal_start_timeout_seconds: float = 3.0

    listen: str = "127.0.0.1:50051"
    # 0 disables the metrics endpoint.
    metrics_port: int = 9464
    metrics_host: str = "127.0.0.1"
    # The worker's Prometheus port (Temporal SDK metrics and activity outcomes); 0 disables.
    worker_metrics_port: int = 0
    data_dir: Path = Path(".entrepot")
    log_level: str = "INFO"
    access_log: bool = True
    # The server process's event loop: uvloop (measured faster on the reservation paths,
    # docs/performance.md) or the standard library's, for debugging or a platform without uvloop.
    event_loop: Literal["uvloop", "asyncio"] = "uvloop"

    # Auth: HS256 with a shared secret (dev) and/or RS256 keys from a JWKS file.
    jwt_issuer: str = "entrepot"
    jwt_audience: str = "entrepot"
    jwt_algorithms: Annotated[list[str], NoDecode] = ["HS256", "RS256"]
    jwt_hs256_secret: SecretStr | None = None
    jwt_jwks_file: Path | None = None
    jwt_leeway_seconds: int = 30
    token_cache_size: int = 10_000
    # How long a resolved channel is trusted before it is read again (seconds).
    channel_cache_seconds: float = 2.0

    # Transport limits. max_message_bytes is the one truth for message sizes: the server
    # receives and sends at most this much, and the Python client's default
    # (entrepot_client.MAX_MESSAGE_BYTES) is the same number (tests/unit/test_settings.py);
    # a deployment that changes it passes the same value to clients (max_message_bytes=).
    max_message_bytes: int = 4 * 1024 * 1024
    max_metadata_bytes: int = 16 * 1024
    # Per HTTP/2 connection. Python gRPC clients do not queue past the limit (the
    # server refuses the stream: UNAVAILABLE), so it is sized for busy shared channels.
    max_concurrent_streams: int = 1000
    max_concurrent_rpcs: int = 2000
    keepalive_time_ms: int = 30_000
    keepalive_timeout_ms: int = 10_000
    max_connection_idle_ms: int = 300_000
    max_connection_age_ms: int = 0
    grace_seconds: float = 10.0
    # Between reporting NOT_SERVING and refusing new calls, so load balancers notice first.
    shutdown_delay_seconds: float = 1.0

    # Database. The pool keeps enough connections for a busy replica's concurrent
    # transactions (plus the notifier, sweeper and health checks): connections
    # past it are opened and closed per burst, a new PostgreSQL backend each time.
    db_pool_size: int = 20
    db_max_overflow: int = 10
    # Connections (asyncpg, autocommit) for coalesced single-statement reads (GetStockLevel).
    db_read_pool_size: int = 2
    db_statement_timeout_ms: int = 15_000

    # TLS (server/tls.py): serve TLS when cert and key are set; with a client CA, client
    # certificates are required and the token's `sub` must be named by the certificate.
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_client_ca_file: Path | None = None

    # Per-principal rate limits (server/ratelimit.py), e.g.
    # "inventory.v1.InventoryService/BulkAdjustStock=20/s,order.v1.OrderService/*=100/m:20".
    rate_limits: str = ""

    # Proxies (addresses or networks, comma-separated) whose x-forwarded-for is believed:
    # the client address SignAgreement records (server/client_address.py).
    trusted_proxies: str = ""

    # Retention of idempotency keys and outbox events (hours).
    idempotency_retention_hours: int = 72
    outbox_retention_hours: int = 168

    # Inventory: group commit for ReserveStock (false = one transaction per call),
    # an optional collection window, batches in flight, expiry sweep period.
    # One batch in flight: the server is CPU-bound before the database is, and
    # requests that arrive during a batch make the next one bigger (measured on
    # P2/P3: batches ~12 instead of ~6, ~20% more reservations/s than 2).
    reserve_batching: bool = True
    reserve_batch_window_ms: float = 0.0
    reserve_batch_inflight: int = 1
    reservation_sweep_seconds: float = 1.0
    # Stock audit (server/background.py): how often the leased job audits every level and
    # updates the entrepot_stock_drift gauge; 0 turns the job off. It adds a level's ledger
    # rows since its checkpoint, and re-sums the level's whole ledger once its last full
    # re-sum is older than stock_audit_full_seconds (0: every run).
    stock_audit_seconds: float = 3600.0
    stock_audit_full_seconds: float = 86400.0

    # Inventory streams (server/services/inventory_streams.py).
    # SyncStock: an unknown SKU becomes a tracked item with default policy (create) or the
    # event is rejected with UNKNOWN_SKU (reject).
    sync_unknown_sku: Literal["create", "reject"] = "create"
    # Batches of one SyncStock stream read from the network but not yet acked; the next
    # batch is read only when fewer are in flight (HTTP/2 flow control holds the adapter back).
    sync_max_in_flight: int = 4
    # WatchStockChanges: events buffered per watcher before it is cut off
    # (RESOURCE_EXHAUSTED / WATCHER_TOO_SLOW); how often an idle watcher is looked at
    # (seconds; its first message comes within this, and WatchOrderEvents heartbeats at it);
    # an idle stock watcher is sent its advanced cursor once it is this many event ids
    # behind, or has not been sent it for this many seconds.
    watch_buffer_events: int = 10_000
    watch_heartbeat_seconds: float = 2.0
    watch_cursor_gap_events: int = 10_000
    watch_cursor_seconds: float = 60.0

    # Event relay (server/relay.py). The JetStream stream it publishes to (created when
    # missing, with this de-duplication window in seconds) and the subjects' first token:
    # <prefix>.<topic>.<aggregate id>, e.g. entrepot.inventory.stock_changed.SKU-1.
    events_stream: str = "ENTREPOT"
    events_subject_prefix: str = "entrepot"
    events_duplicate_window_seconds: float = 120.0
    # Events read and published per batch; seconds the broker has to acknowledge a batch.
    relay_batch_size: int = 500
    relay_ack_timeout_seconds: float = 5.0
    # One relay runs across replicas, under a lease of this many seconds: a replica takes
    # over this long after the holder died. Between wake-ups (NOTIFY) it polls every
    # relay_poll_seconds.
    relay_lease_seconds: float = 6.0
    relay_poll_seconds: float = 1.0
    # Health `entrepot.relay` turns NOT_SERVING when the oldest unpublished event has
    # waited longer than this (seconds).
    relay_max_lag_seconds: float = 30.0

    @field_validator("jwt_algorithms", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        """Accept "HS256,RS256" from the environment."""
        return [p.strip() for p in value.split(",") if p.strip()] if isinstance(value, str) else value
