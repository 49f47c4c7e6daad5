"""carts: carts, lines, purchase limits, purchases (for per-customer limits).

Revision ID: cart_0001
"""

from __future__ import annotations

from alembic import op

from migrations.sql import script

revision = "cart_0001"
down_revision = None
branch_labels = ("carts",)
# Inventory and orders are reached only through their Python interfaces.
depends_on = "platform_0001"


def upgrade() -> None:
    script(
        """
        CREATE SCHEMA IF NOT EXISTS carts;
        CREATE TABLE carts.carts (
            id uuid PRIMARY KEY,
            channel text NOT NULL REFERENCES platform.channels (slug),
            customer_ref text NOT NULL,
            currency text NOT NULL,
            version bigint NOT NULL DEFAULT 1 CHECK (version >= 1),
            state text NOT NULL DEFAULT 'active' CHECK (state IN
                ('active', 'pending_approval', 'approved', 'approved_blocked_inventory', 'rejected',
                 'converted')),
            approval_required boolean NOT NULL DEFAULT false,
            created_by text NOT NULL,
            next_line_no integer NOT NULL DEFAULT 1,
            -- The stock hold: an inventory reservation (reference cart:<id>) and its ttl.
            hold_reservation_id uuid,
            hold_ttl_us bigint,
            hold_expires_at timestamptz,
            submitted_by text,
            submitted_at timestamptz,
            submit_note text NOT NULL DEFAULT '',
            decision text CHECK (decision IN ('approve', 'reject')),
            decided_by text,
            decided_at timestamptz,
            decision_reason text NOT NULL DEFAULT '',
            shortages jsonb NOT NULL DEFAULT '[]',
            order_id text,
            created_at timestamptz NOT NULL DEFAULT now(),
            updated_at timestamptz NOT NULL DEFAULT now()
        );
        CREATE INDEX ix_carts_channel_created ON carts.carts (channel, created_at DESC, id DESC);
        CREATE INDEX ix_carts_channel_customer ON carts.carts (channel, customer_ref, created_at DESC);

        CREATE TABLE carts.cart_lines (
            cart_id uuid NOT NULL REFERENCES carts.carts (id) ON DELETE CASCADE,
            line_id text NOT NULL,
            line_no integer NOT NULL,
            sku text NOT NULL,
            quantity bigint NOT NULL CHECK (quantity > 0),
            unit_price_minor bigint NOT NULL CHECK (unit_price_minor >= 0),
            PRIMARY KEY (cart_id, line_id),
            -- One line per SKU.
            UNIQUE (cart_id, sku)
        );

        CREATE TABLE carts.purchase_limits (
            channel text NOT NULL REFERENCES platform.channels (slug),
            sku text NOT NULL,
            min_quantity bigint NOT NULL DEFAULT 0 CHECK (min_quantity >= 0),
            order_multiple bigint NOT NULL DEFAULT 0 CHECK (order_multiple >= 0),
            max_per_order bigint NOT NULL DEFAULT 0 CHECK (max_per_order >= 0),
            max_per_customer bigint NOT NULL DEFAULT 0 CHECK (max_per_customer >= 0),
            updated_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (channel, sku)
        );

        -- What each customer bought through checkout: the per-customer rolling
        -- window sums these (checked under a per-(channel, customer, sku) lock).
        CREATE TABLE carts.purchases (
            id bigserial PRIMARY KEY,
            channel text NOT NULL,
            customer_ref text NOT NULL,
            sku text NOT NULL,
            quantity bigint NOT NULL CHECK (quantity > 0),
            cart_id uuid NOT NULL REFERENCES carts.carts (id),
            order_id text NOT NULL,
            purchased_at timestamptz NOT NULL DEFAULT now()
        );
        CREATE INDEX ix_purchases_window ON carts.purchases (channel, customer_ref, sku, purchased_at);
        """
    )


def downgrade() -> None:
    op.execute("DROP SCHEMA carts CASCADE")
