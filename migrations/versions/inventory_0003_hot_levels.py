"""inventory: stock level updates stay HOT (heap-only tuples).

Every reservation, release, fulfilment and sync event updates a stock level. A
partial index whose predicate reads `on_hand` and `reserved` made each of those
updates a non-HOT one: new entries in the primary key and the warehouse index for
every change (measured: ~9 buffer touches per updated level in a SyncStock batch). Without it, and with
room left on each page, an update that changes only the counters writes no index
entry at all. ListStockLevels(backordered_only) filters `reserved > on_hand` on
the rows it scans instead (a back office listing, not a hot path).

Revision ID: inventory_0003
"""

from __future__ import annotations

from alembic import op

revision = "inventory_0003"
down_revision = "inventory_0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("DROP INDEX inventory.ix_stock_levels_backordered")
    # Pages written from now on keep 30% free for new row versions (existing
    # pages are not rewritten: no table lock; they gain room as rows are pruned).
    op.execute("ALTER TABLE inventory.stock_levels SET (fillfactor = 70)")


def downgrade() -> None:
    op.execute("ALTER TABLE inventory.stock_levels RESET (fillfactor)")
    op.execute(
        "CREATE INDEX ix_stock_levels_backordered ON inventory.stock_levels (sku, warehouse_code) "
        "WHERE reserved > on_hand"
    )
