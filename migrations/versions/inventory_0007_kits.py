"""inventory: kits and bundles (docs/kits.md).

- `items.is_kit`: the item is a kit of other items and has no stock of its
  own (stock changes and new levels refuse it); set with its components.
  Indexed where true: ListStockLevels merges the kits of its key range.
- `kit_components`: a kit's definition, (kit, component, units per kit).
  Components are simple items (no kit inside a kit).
- `reservation_lines.kit_sku` / `quantity_per_kit`: a component line of a
  reserved kit keeps the kit it came from and the definition it was reserved
  with, so release and fulfilment use that expansion whatever the kit's
  definition becomes.
- `ledger.kit_sku`: a component movement names the kit line it belongs to.

Revision ID: inventory_0007
"""

from __future__ import annotations

from migrations.sql import script

revision = "inventory_0007"
down_revision = "inventory_0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    script(
        """
            ALTER TABLE inventory.items ADD COLUMN is_kit boolean NOT NULL DEFAULT false;
            CREATE TABLE inventory.kit_components (
                kit_sku text NOT NULL REFERENCES inventory.items (sku),
                component_sku text NOT NULL REFERENCES inventory.items (sku),
                quantity bigint NOT NULL CHECK (quantity > 0),
                PRIMARY KEY (kit_sku, component_sku),
                CHECK (kit_sku <> component_sku)
            );
            CREATE INDEX ix_kit_components_component ON inventory.kit_components (component_sku, kit_sku);
            CREATE INDEX ix_items_kits ON inventory.items (sku) WHERE is_kit;
            ALTER TABLE inventory.reservation_lines
                ADD COLUMN kit_sku text,
                ADD COLUMN quantity_per_kit bigint,
                ADD CONSTRAINT reservation_lines_kit_both
                    CHECK ((kit_sku IS NULL) = (quantity_per_kit IS NULL) AND quantity_per_kit > 0);
            ALTER TABLE inventory.ledger ADD COLUMN kit_sku text;
            """
    )


def downgrade() -> None:
    script(
        """
            ALTER TABLE inventory.ledger DROP COLUMN kit_sku;
            ALTER TABLE inventory.reservation_lines DROP CONSTRAINT reservation_lines_kit_both,
                DROP COLUMN kit_sku, DROP COLUMN quantity_per_kit;
            DROP TABLE inventory.kit_components;
            ALTER TABLE inventory.items DROP COLUMN is_kit;
            """
    )
