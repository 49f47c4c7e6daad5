"""inventory: warehouses, items, stock levels, ledger, lots, reservations.

Revision ID: inventory_0001
"""

from __future__ import annotations

from alembic import op

revision = "inventory_0001"
down_revision = None
branch_labels = ("inventory",)
depends_on = "platform_0001"


STATEMENTS = [
    """
    CREATE TABLE inventory.warehouses (
        code text PRIMARY KEY,
        name text NOT NULL,
        address jsonb NOT NULL DEFAULT '{}'::jsonb,
        contact jsonb NOT NULL DEFAULT '{}'::jsonb,
        priority integer NOT NULL DEFAULT 0,
        active boolean NOT NULL DEFAULT true,
        created_at timestamptz NOT NULL DEFAULT now(),
        updated_at timestamptz NOT NULL DEFAULT now()
    )
    """,
    """
    -- Allocation order over active warehouses.
    CREATE INDEX ix_warehouses_allocation ON inventory.warehouses (priority, code) WHERE active
    """,
    """
    CREATE TABLE inventory.items (
        sku text PRIMARY KEY CHECK (length(sku) BETWEEN 1 AND 128),
        track_inventory boolean NOT NULL DEFAULT true,
        allow_backorder boolean NOT NULL DEFAULT false,
        -- 0 = unlimited (only meaningful with allow_backorder).
        max_backorder bigint NOT NULL DEFAULT 0 CHECK (max_backorder >= 0),
        -- 0 = no threshold.
        low_stock_threshold bigint NOT NULL DEFAULT 0 CHECK (low_stock_threshold >= 0),
        created_at timestamptz NOT NULL DEFAULT now(),
        updated_at timestamptz NOT NULL DEFAULT now()
    )
    """,
    """
    -- The counters. Changed only by conditional UPDATE ... RETURNING together
    -- with a ledger row and an outbox row (domain/inventory/stock.py).
    CREATE TABLE inventory.stock_levels (
        sku text NOT NULL REFERENCES inventory.items (sku),
        warehouse_code text NOT NULL REFERENCES inventory.warehouses (code),
        on_hand bigint NOT NULL DEFAULT 0,
        reserved bigint NOT NULL DEFAULT 0,
        updated_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (sku, warehouse_code),
        CONSTRAINT ck_stock_levels_on_hand_non_negative CHECK (on_hand >= 0),
        CONSTRAINT ck_stock_levels_reserved_non_negative CHECK (reserved >= 0)
    )
    """,
    """
    CREATE INDEX ix_stock_levels_warehouse ON inventory.stock_levels (warehouse_code, sku)
    """,
    """
    CREATE INDEX ix_stock_levels_backordered ON inventory.stock_levels (sku, warehouse_code)
        WHERE reserved > on_hand
    """,
    """
    -- Immutable ledger: one row per counter change.
    CREATE TABLE inventory.ledger (
        id bigserial PRIMARY KEY,
        sku text NOT NULL,
        warehouse_code text NOT NULL,
        type text NOT NULL CHECK (type IN
            ('receive', 'adjust', 'set', 'reserve', 'release', 'fulfil', 'return', 'import', 'sync')),
        on_hand_before bigint NOT NULL,
        on_hand_after bigint NOT NULL,
        reserved_before bigint NOT NULL,
        reserved_after bigint NOT NULL,
        on_hand_delta bigint GENERATED ALWAYS AS (on_hand_after - on_hand_before) STORED,
        reserved_delta bigint GENERATED ALWAYS AS (reserved_after - reserved_before) STORED,
        reason text NOT NULL DEFAULT '',
        source text NOT NULL DEFAULT '',
        actor text NOT NULL DEFAULT '',
        reference text NOT NULL DEFAULT '',
        reservation_id uuid,
        cost_minor bigint,
        cost_currency text,
        created_at timestamptz NOT NULL DEFAULT now(),
        CHECK ((cost_minor IS NULL) = (cost_currency IS NULL))
    )
    """,
    """
    CREATE INDEX ix_ledger_sku_warehouse ON inventory.ledger (sku, warehouse_code, id)
    """,
    """
    CREATE INDEX ix_ledger_warehouse ON inventory.ledger (warehouse_code, id)
    """,
    """
    CREATE INDEX ix_ledger_reference ON inventory.ledger (reference, id) WHERE reference <> ''
    """,
    """
    CREATE INDEX ix_ledger_reservation ON inventory.ledger (reservation_id) WHERE reservation_id IS NOT NULL
    """,
    """
    CREATE INDEX ix_ledger_created_at ON inventory.ledger (created_at, id)
    """,
    """
    CREATE FUNCTION inventory.ledger_immutable() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        RAISE EXCEPTION 'inventory.ledger is append-only';
    END $$
    """,
    """
    CREATE TRIGGER ledger_immutable BEFORE UPDATE OR DELETE ON inventory.ledger
        FOR EACH ROW EXECUTE FUNCTION inventory.ledger_immutable()
    """,
    """
    CREATE TRIGGER ledger_no_truncate BEFORE TRUNCATE ON inventory.ledger
        FOR EACH STATEMENT EXECUTE FUNCTION inventory.ledger_immutable()
    """,
    """
    -- Received lots, consumed FIFO (by id) on fulfilment.
    CREATE TABLE inventory.lots (
        id bigserial PRIMARY KEY,
        sku text NOT NULL,
        warehouse_code text NOT NULL,
        lot_code text NOT NULL DEFAULT '',
        received_quantity bigint NOT NULL CHECK (received_quantity > 0),
        remaining_quantity bigint NOT NULL,
        unit_cost_minor bigint NOT NULL CHECK (unit_cost_minor >= 0),
        currency text NOT NULL,
        ledger_id bigint NOT NULL REFERENCES inventory.ledger (id),
        received_at timestamptz NOT NULL DEFAULT now(),
        FOREIGN KEY (sku, warehouse_code) REFERENCES inventory.stock_levels (sku, warehouse_code),
        CHECK (remaining_quantity >= 0 AND remaining_quantity <= received_quantity)
    )
    """,
    """
    CREATE INDEX ix_lots_fifo ON inventory.lots (sku, warehouse_code, id) WHERE remaining_quantity > 0
    """,
    """
    -- Which lots a fulfilment consumed, at what cost.
    CREATE TABLE inventory.lot_consumptions (
        ledger_id bigint NOT NULL REFERENCES inventory.ledger (id),
        lot_id bigint NOT NULL REFERENCES inventory.lots (id),
        quantity bigint NOT NULL CHECK (quantity > 0),
        unit_cost_minor bigint NOT NULL,
        currency text NOT NULL,
        PRIMARY KEY (ledger_id, lot_id)
    )
    """,
    """
    CREATE TABLE inventory.reservations (
        id uuid PRIMARY KEY,
        reference text NOT NULL DEFAULT '',
        state text NOT NULL DEFAULT 'active'
            CHECK (state IN ('active', 'fulfilled', 'released', 'expired')),
        expires_at timestamptz,
        actor text NOT NULL DEFAULT '',
        created_at timestamptz NOT NULL DEFAULT now(),
        updated_at timestamptz NOT NULL DEFAULT now()
    )
    """,
    """
    CREATE INDEX ix_reservations_reference ON inventory.reservations (reference, created_at, id)
    """,
    """
    CREATE INDEX ix_reservations_state ON inventory.reservations (state, created_at, id)
    """,
    """
    -- The expiry sweeper's scan.
    CREATE INDEX ix_reservations_expiry ON inventory.reservations (expires_at)
        WHERE state = 'active' AND expires_at IS NOT NULL
    """,
    """
    -- One allocation: a SKU in one warehouse. Untracked items hold nothing on
    -- the counters (tracked = false).
    CREATE TABLE inventory.reservation_lines (
        reservation_id uuid NOT NULL REFERENCES inventory.reservations (id),
        line_no integer NOT NULL,
        sku text NOT NULL,
        warehouse_code text NOT NULL,
        tracked boolean NOT NULL DEFAULT true,
        quantity bigint NOT NULL CHECK (quantity > 0),
        backordered bigint NOT NULL DEFAULT 0,
        fulfilled bigint NOT NULL DEFAULT 0,
        released bigint NOT NULL DEFAULT 0,
        PRIMARY KEY (reservation_id, line_no),
        CHECK (backordered >= 0 AND backordered <= quantity),
        CHECK (fulfilled >= 0 AND released >= 0 AND fulfilled + released <= quantity)
    )
    """,
    """
    -- Open holds per level (invariant checks, diagnostics).
    CREATE INDEX ix_reservation_lines_open ON inventory.reservation_lines (sku, warehouse_code)
        WHERE fulfilled + released < quantity
    """,
]


def upgrade() -> None:
    op.execute("CREATE SCHEMA IF NOT EXISTS inventory")
    # One statement per execute: asyncpg prepares each statement separately.
    for statement in STATEMENTS:
        op.execute(statement)


def downgrade() -> None:
    op.execute("DROP SCHEMA inventory CASCADE")
