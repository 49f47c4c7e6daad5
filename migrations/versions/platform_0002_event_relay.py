"""platform: the event relay's cursor (where publishing to the broker stands).

Revision ID: platform_0002
"""

from __future__ import annotations

from alembic import op

revision = "platform_0002"
down_revision = "platform_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # One row per relay (sink and stream): the position (txid, event id) of the last
    # outbox event the broker acknowledged. Written only by the holder of the relay's
    # lease (platform.leases), see domain/platform/relay.py.
    op.execute(
        """
        CREATE TABLE platform.relay_cursors (
            name text PRIMARY KEY,
            txid xid8 NOT NULL,
            event_id bigint NOT NULL,
            published bigint NOT NULL DEFAULT 0,
            updated_at timestamptz NOT NULL DEFAULT now()
        )
        """
    )


def downgrade() -> None:
    op.execute("DROP TABLE platform.relay_cursors")
