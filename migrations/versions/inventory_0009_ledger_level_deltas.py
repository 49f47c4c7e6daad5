"""inventory: a level's ledger sums from its index alone.

The stock audit (server/background.py, hourly, and AuditStock) sums each level's
`on_hand_delta` and `reserved_delta` over its ledger rows. The rows of a level
are spread over the whole table (one page per movement in time order), so with
the per-level index (sku, warehouse_code, id) alone each sum fetched one heap
page per movement: on the aged database of bench/aged.py (5.2 M rows, 80,000
levels) an audit read the whole 1.9 GiB ledger at random and took a core for
the time it ran. With the two deltas in the index (INCLUDE) the sums are an
index-only scan of a level's adjacent index entries.

An index-only scan skips the heap only for pages the visibility map marks
all-visible, which is what a vacuum sets; the ledger is append-only, so only
insert-driven autovacuum visits it: every 1% of new rows here instead of 20%.

Revision ID: inventory_0009
"""

from __future__ import annotations

from migrations.sql import script

revision = "inventory_0009"
down_revision = "inventory_0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    script(
        """
            CREATE INDEX ix_ledger_level_deltas ON inventory.ledger (sku, warehouse_code, id)
                INCLUDE (on_hand_delta, reserved_delta);
            DROP INDEX inventory.ix_ledger_sku_warehouse;
            ALTER INDEX inventory.ix_ledger_level_deltas RENAME TO ix_ledger_sku_warehouse;
            ALTER TABLE inventory.ledger SET (autovacuum_vacuum_insert_scale_factor = 0.01);
        """
    )


def downgrade() -> None:
    script(
        """
            ALTER TABLE inventory.ledger RESET (autovacuum_vacuum_insert_scale_factor);
            CREATE INDEX ix_ledger_level_plain ON inventory.ledger (sku, warehouse_code, id);
            DROP INDEX inventory.ix_ledger_sku_warehouse;
            ALTER INDEX inventory.ix_ledger_level_plain RENAME TO ix_ledger_sku_warehouse;
        """
    )
