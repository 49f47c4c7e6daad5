"""registration: the commerce mode (B2B, B2C, both) a form version serves.

Revision ID: registration_0003
"""

from __future__ import annotations

from alembic import op

revision = "registration_0003"
down_revision = "registration_0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        "ALTER TABLE registration.form_versions ADD COLUMN commerce_mode text NOT NULL DEFAULT 'both' "
        "CHECK (commerce_mode IN ('b2b', 'b2c', 'both'))"
    )


def downgrade() -> None:
    op.execute("ALTER TABLE registration.form_versions DROP COLUMN commerce_mode")
