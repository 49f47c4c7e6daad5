"""inventory: warehouses per channel, the channel's allocation strategy, warehouse coordinates.

One row per channel that has an allocation setting: its ordered warehouse list
(empty = every active warehouse by priority, as without a row) and its
strategy. The reserve path reads the rows of the channels of a batch in the
statement that locks the levels, so a channel without a row costs nothing.
Warehouse codes are checked when the list is set (warehouses are never
deleted, only deactivated).

Revision ID: inventory_0006
"""

from __future__ import annotations

from migrations.sql import script

revision = "inventory_0006"
down_revision = "inventory_0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    script(
        """
            CREATE TABLE inventory.channel_allocations (
                channel_slug text PRIMARY KEY REFERENCES platform.channels (slug),
                warehouse_codes text[] NOT NULL DEFAULT '{}',
                strategy text NOT NULL DEFAULT 'priority'
                    CHECK (strategy IN ('priority', 'high_stock', 'fewest_splits', 'nearest')),
                created_at timestamptz NOT NULL DEFAULT now(),
                updated_at timestamptz NOT NULL DEFAULT now()
            );
            ALTER TABLE inventory.warehouses
                ADD COLUMN latitude double precision CHECK (latitude BETWEEN -90 AND 90),
                ADD COLUMN longitude double precision CHECK (longitude BETWEEN -180 AND 180),
                ADD CONSTRAINT warehouses_location_both CHECK ((latitude IS NULL) = (longitude IS NULL));
            """
    )


def downgrade() -> None:
    script(
        """
            DROP TABLE inventory.channel_allocations;
            ALTER TABLE inventory.warehouses DROP CONSTRAINT warehouses_location_both,
                DROP COLUMN latitude, DROP COLUMN longitude;
            """
    )
