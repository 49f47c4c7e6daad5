"""inventory: SyncStock bookkeeping (sources, applied event ids, SET watermarks).

Revision ID: inventory_0002
"""

from __future__ import annotations

from alembic import op

revision = "inventory_0002"
down_revision = "inventory_0001"
branch_labels = None
depends_on = None


STATEMENTS = [
    """
    -- One row per adapter: its cursor. Locked by each batch, so the batches of
    -- one source apply one at a time and in order, across server replicas.
    CREATE TABLE inventory.sync_sources (
        source text PRIMARY KEY CHECK (length(source) BETWEEN 1 AND 128),
        last_event_id text NOT NULL DEFAULT '',
        events_seen bigint NOT NULL DEFAULT 0,
        events_applied bigint NOT NULL DEFAULT 0,
        created_at timestamptz NOT NULL DEFAULT now(),
        updated_at timestamptz NOT NULL DEFAULT now()
    )
    """,
    """
    -- Exactly-once: an event id is claimed (INSERT ... ON CONFLICT DO NOTHING)
    -- in the same transaction as its stock change. The outcome is kept so a
    -- replay of a rejected event answers with the same reason.
    -- outcome: a = applied, s = stale SET, r = rejected.
    CREATE TABLE inventory.sync_events (
        source text NOT NULL,
        event_id text NOT NULL,
        outcome "char" NOT NULL CHECK (outcome IN ('a', 's', 'r')),
        reason text,
        message text,
        PRIMARY KEY (source, event_id)
    )
    """,
    """
    -- Last applied SET per source/SKU/warehouse (occurred_at in microseconds
    -- since the Unix epoch, exact): an older SET is stale.
    CREATE TABLE inventory.sync_watermarks (
        source text NOT NULL,
        sku text NOT NULL,
        warehouse_code text NOT NULL,
        last_set_us bigint NOT NULL,
        PRIMARY KEY (source, sku, warehouse_code)
    )
    """,
]


def upgrade() -> None:
    for statement in STATEMENTS:
        op.execute(statement)


def downgrade() -> None:
    op.execute("DROP TABLE inventory.sync_watermarks")
    op.execute("DROP TABLE inventory.sync_events")
    op.execute("DROP TABLE inventory.sync_sources")
