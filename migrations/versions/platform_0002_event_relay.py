"""platform: the event relay's cursor (where publishing to the broker stands: epoch and event id).

Revision ID: platform_0002
"""

from __future__ import annotations

from alembic import op

revision = "platform_0002"
down_revision = "platform_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # One row per relay (sink and stream): the epoch it is publishing (the outbox events
    # whose transactions are visible in snapshot epoch_end and not in epoch_start; the
    # last of them is last_id) and the id of the last of them the broker acknowledged. Written only by the holder of
    # the relay's lease (platform.leases), see domain/platform/relay.py.
    op.execute(
        """
        CREATE TABLE platform.relay_cursors (
            name text PRIMARY KEY,
            epoch bigint NOT NULL,
            epoch_start pg_snapshot NOT NULL,
            epoch_end pg_snapshot NOT NULL,
            last_id bigint NOT NULL,
            event_id bigint NOT NULL,
            published bigint NOT NULL DEFAULT 0,
            updated_at timestamptz NOT NULL DEFAULT now()
        )
        """
    )


def downgrade() -> None:
    op.execute("DROP TABLE platform.relay_cursors")
