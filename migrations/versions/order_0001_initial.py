"""orders: canonical orders, lines, payments, append-only status history, shipments, refunds.

Revision ID: order_0001
"""

from __future__ import annotations

from alembic import op

from migrations.sql import script

revision = "order_0001"
down_revision = None
branch_labels = ("orders",)
# Inventory is reached only through its Python interface, never its tables.
depends_on = "platform_0001"


def upgrade() -> None:
    script(
        """
        CREATE SCHEMA IF NOT EXISTS orders;
        CREATE TABLE orders.orders (
            id uuid PRIMARY KEY,
            channel text NOT NULL REFERENCES platform.channels (slug),
            source_system text NOT NULL,
            intent_id text NOT NULL,
            external_order_id text NOT NULL DEFAULT '',
            customer_ref text NOT NULL DEFAULT '',
            currency text NOT NULL,
            subtotal_minor bigint NOT NULL CHECK (subtotal_minor >= 0),
            tax_minor bigint NOT NULL CHECK (tax_minor >= 0),
            shipping_minor bigint NOT NULL CHECK (shipping_minor >= 0),
            discount_minor bigint NOT NULL CHECK (discount_minor >= 0),
            grand_total_minor bigint NOT NULL CHECK (grand_total_minor >= 0),
            state text NOT NULL CHECK (state IN
                ('pending', 'processing', 'partially_shipped', 'shipped', 'delivered', 'cancelled')),
            -- sha256 of the canonical intent content, and the content itself so
            -- a conflicting resubmission can say what differs.
            content_hash bytea NOT NULL,
            content jsonb NOT NULL,
            reservation_id text,
            submitted_at timestamptz NOT NULL,
            created_at timestamptz NOT NULL DEFAULT now(),
            updated_at timestamptz NOT NULL DEFAULT now(),
            CONSTRAINT uq_orders_intent UNIQUE (source_system, intent_id),
            CONSTRAINT ck_orders_totals CHECK (
                grand_total_minor = subtotal_minor + tax_minor + shipping_minor - discount_minor)
        );
        CREATE UNIQUE INDEX uq_orders_external_id ON orders.orders (channel, source_system, external_order_id)
            WHERE external_order_id <> '';
        CREATE INDEX ix_orders_channel_created ON orders.orders (channel, created_at DESC, id DESC);
        CREATE INDEX ix_orders_channel_customer ON orders.orders (channel, customer_ref, created_at DESC)
            WHERE customer_ref <> '';

        CREATE TABLE orders.order_lines (
            order_id uuid NOT NULL REFERENCES orders.orders (id),
            line_id text NOT NULL,
            position integer NOT NULL,
            sku text NOT NULL,
            quantity bigint NOT NULL CHECK (quantity > 0),
            unit_price_minor bigint NOT NULL CHECK (unit_price_minor >= 0),
            shipped_quantity bigint NOT NULL DEFAULT 0 CHECK (shipped_quantity BETWEEN 0 AND quantity),
            refunded_quantity bigint NOT NULL DEFAULT 0 CHECK (refunded_quantity BETWEEN 0 AND quantity),
            PRIMARY KEY (order_id, line_id)
        );

        CREATE TABLE orders.payments (
            order_id uuid NOT NULL REFERENCES orders.orders (id),
            tender_id text NOT NULL,
            position integer NOT NULL,
            method text NOT NULL,
            captured_minor bigint NOT NULL CHECK (captured_minor >= 0),
            gateway_reference text NOT NULL DEFAULT '',
            refunded_minor bigint NOT NULL DEFAULT 0 CHECK (refunded_minor BETWEEN 0 AND captured_minor),
            PRIMARY KEY (order_id, tender_id)
        );

        CREATE TABLE orders.status_entries (
            id bigserial PRIMARY KEY,
            order_id uuid NOT NULL REFERENCES orders.orders (id),
            code text NOT NULL,
            module text NOT NULL,
            category text NOT NULL DEFAULT '',
            severity text NOT NULL CHECK (severity IN ('info', 'warning', 'blocking')),
            payload jsonb NOT NULL DEFAULT '{}'::jsonb,
            recorded_at timestamptz NOT NULL,
            written_by text NOT NULL,
            created_at timestamptz NOT NULL DEFAULT now(),
            closed_at timestamptz,
            closed_by text,
            close_note text
        );
        CREATE INDEX ix_status_entries_order ON orders.status_entries (order_id, id);
        CREATE INDEX ix_status_entries_open_blocking ON orders.status_entries (order_id)
            WHERE severity = 'blocking' AND closed_at IS NULL;

        CREATE TABLE orders.shipments (
            id uuid PRIMARY KEY,
            order_id uuid NOT NULL REFERENCES orders.orders (id),
            tracking_number text NOT NULL DEFAULT '',
            carrier text NOT NULL DEFAULT '',
            created_by text NOT NULL,
            created_at timestamptz NOT NULL DEFAULT now()
        );
        CREATE INDEX ix_shipments_order ON orders.shipments (order_id, created_at);
        CREATE TABLE orders.shipment_lines (
            shipment_id uuid NOT NULL REFERENCES orders.shipments (id),
            line_id text NOT NULL,
            quantity bigint NOT NULL CHECK (quantity > 0),
            PRIMARY KEY (shipment_id, line_id)
        );

        -- Refunds recorded against the order (written by the refund module
        -- through domain.order's interface); idempotent per (order, refund).
        CREATE TABLE orders.refunds (
            order_id uuid NOT NULL REFERENCES orders.orders (id),
            refund_id text NOT NULL,
            content_hash bytea NOT NULL,
            lines jsonb NOT NULL,
            amounts jsonb NOT NULL,
            recorded_by text NOT NULL,
            created_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (order_id, refund_id)
        );

        -- Immutability enforced by the database, not only by the code: lines,
        -- money and the intent never change; history entries only get closed.
        CREATE FUNCTION orders.forbid_change() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            RAISE EXCEPTION 'orders.%: % is not allowed', TG_TABLE_NAME, TG_OP USING ERRCODE = 'restrict_violation';
        END $$;
        CREATE FUNCTION orders.guard_order() RETURNS trigger LANGUAGE plpgsql AS $$
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
        CREATE FUNCTION orders.guard_line() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF (NEW.order_id, NEW.line_id, NEW.position, NEW.sku, NEW.quantity, NEW.unit_price_minor)
               IS DISTINCT FROM
               (OLD.order_id, OLD.line_id, OLD.position, OLD.sku, OLD.quantity, OLD.unit_price_minor) THEN
                RAISE EXCEPTION 'orders.order_lines: lines are immutable' USING ERRCODE = 'restrict_violation';
            END IF;
            RETURN NEW;
        END $$;
        CREATE FUNCTION orders.guard_payment() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF (NEW.order_id, NEW.tender_id, NEW.position, NEW.method, NEW.captured_minor, NEW.gateway_reference)
               IS DISTINCT FROM
               (OLD.order_id, OLD.tender_id, OLD.position, OLD.method, OLD.captured_minor, OLD.gateway_reference) THEN
                RAISE EXCEPTION 'orders.payments: payments are immutable' USING ERRCODE = 'restrict_violation';
            END IF;
            RETURN NEW;
        END $$;
        CREATE FUNCTION orders.guard_status_entry() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF OLD.closed_at IS NOT NULL OR NEW.closed_at IS NULL
               OR (NEW.id, NEW.order_id, NEW.code, NEW.module, NEW.category, NEW.severity, NEW.payload,
                   NEW.recorded_at, NEW.written_by, NEW.created_at)
                  IS DISTINCT FROM
                  (OLD.id, OLD.order_id, OLD.code, OLD.module, OLD.category, OLD.severity, OLD.payload,
                   OLD.recorded_at, OLD.written_by, OLD.created_at) THEN
                RAISE EXCEPTION 'orders.status_entries: append-only; an entry can only be closed once'
                    USING ERRCODE = 'restrict_violation';
            END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER guard_order BEFORE UPDATE ON orders.orders
            FOR EACH ROW EXECUTE FUNCTION orders.guard_order();
        CREATE TRIGGER guard_line BEFORE UPDATE ON orders.order_lines
            FOR EACH ROW EXECUTE FUNCTION orders.guard_line();
        CREATE TRIGGER guard_payment BEFORE UPDATE ON orders.payments
            FOR EACH ROW EXECUTE FUNCTION orders.guard_payment();
        CREATE TRIGGER guard_status_entry BEFORE UPDATE ON orders.status_entries
            FOR EACH ROW EXECUTE FUNCTION orders.guard_status_entry();
        CREATE TRIGGER no_delete BEFORE DELETE ON orders.orders
            FOR EACH ROW EXECUTE FUNCTION orders.forbid_change();
        CREATE TRIGGER no_delete BEFORE DELETE ON orders.order_lines
            FOR EACH ROW EXECUTE FUNCTION orders.forbid_change();
        CREATE TRIGGER no_delete BEFORE DELETE ON orders.payments
            FOR EACH ROW EXECUTE FUNCTION orders.forbid_change();
        CREATE TRIGGER no_delete BEFORE DELETE ON orders.status_entries
            FOR EACH ROW EXECUTE FUNCTION orders.forbid_change();
        CREATE TRIGGER no_change BEFORE UPDATE OR DELETE ON orders.shipments
            FOR EACH ROW EXECUTE FUNCTION orders.forbid_change();
        CREATE TRIGGER no_change BEFORE UPDATE OR DELETE ON orders.shipment_lines
            FOR EACH ROW EXECUTE FUNCTION orders.forbid_change();
        CREATE TRIGGER no_change BEFORE UPDATE OR DELETE ON orders.refunds
            FOR EACH ROW EXECUTE FUNCTION orders.forbid_change();
        """
    )


def downgrade() -> None:
    op.execute("DROP SCHEMA orders CASCADE")
