"""inventory: the `audit` ledger movement (RepairStock records every repair in the ledger).

Revision ID: inventory_0005
"""

from __future__ import annotations

from alembic import op

revision = "inventory_0005"
down_revision = "inventory_0003"
branch_labels = None
depends_on = None

_TYPES = "'receive', 'adjust', 'set', 'reserve', 'release', 'fulfil', 'return', 'import', 'sync'"


def upgrade() -> None:
    op.execute("ALTER TABLE inventory.ledger DROP CONSTRAINT ledger_type_check")
    op.execute(
        "ALTER TABLE inventory.ledger ADD CONSTRAINT ledger_type_check "
        f"CHECK (type IN ({_TYPES}, 'audit')) NOT VALID"
    )
    # Every existing row already satisfies the wider check; validating takes no write lock.
    op.execute("ALTER TABLE inventory.ledger VALIDATE CONSTRAINT ledger_type_check")


def downgrade() -> None:
    op.execute("ALTER TABLE inventory.ledger DROP CONSTRAINT ledger_type_check")
    op.execute(f"ALTER TABLE inventory.ledger ADD CONSTRAINT ledger_type_check CHECK (type IN ({_TYPES}))")
