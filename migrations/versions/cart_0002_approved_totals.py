"""carts: what an approval approved (grand total and lines).

Revision ID: cart_0002
"""

from __future__ import annotations

from migrations.sql import script

revision = "cart_0002"
down_revision = "cart_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    script(
        """
        ALTER TABLE carts.carts
            ADD COLUMN approved_grand_total_minor bigint,
            ADD COLUMN approved_lines jsonb;
        """
    )


def downgrade() -> None:
    script("ALTER TABLE carts.carts DROP COLUMN approved_grand_total_minor, DROP COLUMN approved_lines;")
