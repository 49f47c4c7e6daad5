"""inventory: an applied SyncStock event is claimed by its ledger row.

Every applied event already has its immutable ledger row (type `sync`, `source`
= the adapter, `reference` = the event id). A unique index on (source,
reference) of those rows makes that row the event's exactly-once claim, so an
applied event no longer writes a second row in `inventory.sync_events`; that
table keeps the events that were not applied (stale SETs, rejections) with
their outcome, so a replay answers the same.

Revision ID: inventory_0008
"""

from __future__ import annotations

from migrations.sql import script

revision = "inventory_0008"
down_revision = "inventory_0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    script(
        """
            CREATE UNIQUE INDEX ux_ledger_sync_event ON inventory.ledger (source, reference)
                WHERE type = 'sync';
            DELETE FROM inventory.sync_events WHERE outcome = 'a';
            ALTER TABLE inventory.sync_events DROP CONSTRAINT sync_events_outcome_check;
            ALTER TABLE inventory.sync_events ADD CONSTRAINT sync_events_outcome_check
                CHECK (outcome IN ('s', 'r'));
        """
    )


def downgrade() -> None:
    script(
        """
            ALTER TABLE inventory.sync_events DROP CONSTRAINT sync_events_outcome_check;
            ALTER TABLE inventory.sync_events ADD CONSTRAINT sync_events_outcome_check
                CHECK (outcome IN ('a', 's', 'r'));
            INSERT INTO inventory.sync_events (source, event_id, outcome)
                SELECT source, reference, 'a' FROM inventory.ledger WHERE type = 'sync';
            DROP INDEX inventory.ux_ledger_sync_event;
        """
    )
