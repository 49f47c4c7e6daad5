"""platform: an outbox row's transaction id is assigned before its id is drawn; the
(topic, txid, id) index of the watch hub's former (txid, id) reads is gone.

Revision ID: platform_0003
"""

from __future__ import annotations

from alembic import op

revision = "platform_0003"
down_revision = "platform_0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Readers deliver the outbox in id order up to a final id (domain/shared/outbox.py,
    # `Horizon`): every id drawn before a snapshot must belong to a transaction that
    # snapshot counts as running or ended. A column default is evaluated in column order
    # (id before txid), and a transaction whose first write is this INSERT would otherwise
    # draw its id before it has a transaction id; CASE evaluates its condition first.
    op.execute(
        """
        ALTER TABLE platform.outbox ALTER COLUMN id SET DEFAULT
            CASE WHEN pg_current_xact_id() IS NOT NULL THEN nextval('platform.outbox_id_seq'::regclass) END
        """
    )
    op.execute("DROP INDEX platform.ix_outbox_topic_txid_id")


def downgrade() -> None:
    op.execute("CREATE INDEX ix_outbox_topic_txid_id ON platform.outbox (topic, txid, id)")
    op.execute(
        "ALTER TABLE platform.outbox ALTER COLUMN id SET DEFAULT nextval('platform.outbox_id_seq'::regclass)"
    )
