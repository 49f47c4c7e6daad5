"""orders: the reissue chain, the external handoff acknowledgement, the inventory risk flag.

Revision ID: order_0002
"""

from __future__ import annotations

from migrations.sql import script

revision = "order_0002"
down_revision = "order_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    script(
        """
        ALTER TABLE orders.orders
            ADD COLUMN reissued_from_order_id uuid REFERENCES orders.orders (id),
            ADD COLUMN reissue_reason text NOT NULL DEFAULT '',
            ADD COLUMN external_handoff_reference text,
            ADD COLUMN external_handoff_acknowledged_at timestamptz,
            ADD COLUMN inventory_risk boolean NOT NULL DEFAULT false,
            ADD CONSTRAINT ck_orders_handoff CHECK (
                (external_handoff_reference IS NULL) = (external_handoff_acknowledged_at IS NULL));
        CREATE INDEX ix_orders_reissued_from ON orders.orders (reissued_from_order_id, created_at)
            WHERE reissued_from_order_id IS NOT NULL;
        -- The inventory hook finds the order of a reservation by its id.
        CREATE INDEX ix_orders_reservation ON orders.orders (reservation_id) WHERE reservation_id IS NOT NULL;
        CREATE INDEX ix_orders_channel_risk ON orders.orders (channel, created_at DESC) WHERE inventory_risk;
        CREATE INDEX ix_orders_channel_unacknowledged ON orders.orders (channel, created_at DESC)
            WHERE external_handoff_acknowledged_at IS NULL;

        -- The reissue link is part of the immutable intent; the handoff is set once.
        CREATE OR REPLACE FUNCTION orders.guard_order() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF (NEW.id, NEW.channel, NEW.source_system, NEW.intent_id, NEW.external_order_id, NEW.customer_ref,
                NEW.currency, NEW.subtotal_minor, NEW.tax_minor, NEW.shipping_minor, NEW.discount_minor,
                NEW.grand_total_minor, NEW.content_hash, NEW.submitted_at, NEW.created_at,
                NEW.reissued_from_order_id, NEW.reissue_reason)
               IS DISTINCT FROM
               (OLD.id, OLD.channel, OLD.source_system, OLD.intent_id, OLD.external_order_id, OLD.customer_ref,
                OLD.currency, OLD.subtotal_minor, OLD.tax_minor, OLD.shipping_minor, OLD.discount_minor,
                OLD.grand_total_minor, OLD.content_hash, OLD.submitted_at, OLD.created_at,
                OLD.reissued_from_order_id, OLD.reissue_reason) THEN
                RAISE EXCEPTION 'orders.orders: the intent and its money are immutable'
                    USING ERRCODE = 'restrict_violation';
            END IF;
            IF OLD.external_handoff_reference IS NOT NULL
               AND (NEW.external_handoff_reference, NEW.external_handoff_acknowledged_at)
                   IS DISTINCT FROM (OLD.external_handoff_reference, OLD.external_handoff_acknowledged_at) THEN
                RAISE EXCEPTION 'orders.orders: the handoff is acknowledged once'
                    USING ERRCODE = 'restrict_violation';
            END IF;
            RETURN NEW;
        END $$;
        """
    )


def downgrade() -> None:
    script(
        """
        CREATE OR REPLACE FUNCTION orders.guard_order() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF (NEW.id, NEW.channel, NEW.source_system, NEW.intent_id, NEW.external_order_id, NEW.customer_ref,
                NEW.currency, NEW.subtotal_minor, NEW.tax_minor, NEW.shipping_minor, NEW.discount_minor,
                NEW.grand_total_minor, NEW.content_hash, NEW.submitted_at, NEW.created_at)
               IS DISTINCT FROM
               (OLD.id, OLD.channel, OLD.source_system, OLD.intent_id, OLD.external_order_id, OLD.customer_ref,
                OLD.currency, OLD.subtotal_minor, OLD.tax_minor, OLD.shipping_minor, OLD.discount_minor,
                OLD.grand_total_minor, OLD.content_hash, OLD.submitted_at, OLD.created_at) THEN
                RAISE EXCEPTION 'orders.orders: the intent and its money are immutable'
                    USING ERRCODE = 'restrict_violation';
            END IF;
            RETURN NEW;
        END $$;
        ALTER TABLE orders.orders DROP COLUMN reissued_from_order_id, DROP COLUMN reissue_reason,
            DROP COLUMN external_handoff_reference, DROP COLUMN external_handoff_acknowledged_at,
            DROP COLUMN inventory_risk;
        """
    )
