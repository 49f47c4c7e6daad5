"""inventory: per-level ledger sums checkpointed at a ledger id.

The stock audit compares each level's on_hand and reserved with the sums of its
ledger deltas. `inventory.ledger_checkpoints` keeps those sums through a ledger
id per level, so an audit adds only the level's ledger rows after it (the
checkpoint's tail) instead of re-summing the level's whole history each run
(domain/inventory/audit_store.py says why a checkpoint is safe to take).
`resummed_at` is when the sums were last taken over the whole ledger: the
audit job re-sums a level in full once that is older than
ENTREPOT_STOCK_AUDIT_FULL_SECONDS (direct edits of old ledger rows are what
only a full re-sum finds). No foreign key to stock_levels: its KEY SHARE lock
on every write would make the hot counter updates of the level take a
MultiXact; the rows describe ledger rows, which outlive any level anyway.

Revision ID: inventory_0010
"""

from __future__ import annotations

from migrations.sql import script

revision = "inventory_0010"
down_revision = "inventory_0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    script(
        """
            CREATE TABLE inventory.ledger_checkpoints (
                sku text NOT NULL,
                warehouse_code text NOT NULL,
                through_id bigint NOT NULL,
                on_hand bigint NOT NULL,
                reserved bigint NOT NULL,
                resummed_at timestamptz NOT NULL,
                PRIMARY KEY (sku, warehouse_code)
            );
        """
    )


def downgrade() -> None:
    script("DROP TABLE inventory.ledger_checkpoints;")
