"""platform: channels, outbox, idempotency keys.

Revision ID: platform_0001
"""

from __future__ import annotations

from alembic import op

from migrations.sql import script

revision = "platform_0001"
down_revision = None
branch_labels = ("platform",)
depends_on = None


def upgrade() -> None:
    script(
        """
        CREATE SCHEMA IF NOT EXISTS platform;
        CREATE TABLE platform.channels (
            slug text PRIMARY KEY,
            name text NOT NULL,
            currency text NOT NULL,
            timezone text NOT NULL,
            active boolean NOT NULL DEFAULT true,
            created_at timestamptz NOT NULL DEFAULT now(),
            updated_at timestamptz NOT NULL DEFAULT now()
        );
        CREATE TABLE platform.outbox (
            id bigserial PRIMARY KEY,
            txid xid8 NOT NULL DEFAULT pg_current_xact_id(),
            topic text NOT NULL,
            aggregate_type text NOT NULL,
            aggregate_id text NOT NULL,
            channel text,
            payload jsonb NOT NULL,
            created_at timestamptz NOT NULL DEFAULT now()
        );
        CREATE INDEX ix_outbox_txid_id ON platform.outbox (txid, id);
        CREATE INDEX ix_outbox_topic_txid_id ON platform.outbox (topic, txid, id);
        CREATE INDEX ix_outbox_created_at ON platform.outbox (created_at);
        -- No NOTIFY trigger: a NOTIFY inside a transaction takes a cluster-wide
        -- lock through its commit, serialising every writer. Each process sends
        -- one debounced NOTIFY after its commits instead (domain/shared/outbox.py).

        CREATE TABLE platform.idempotency_keys (
            principal text NOT NULL,
            request_id text NOT NULL,
            method text NOT NULL,
            request_hash bytea NOT NULL,
            status_code integer,
            response bytea,
            created_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (principal, request_id)
        );
        CREATE INDEX ix_idempotency_keys_created_at ON platform.idempotency_keys (created_at);

        -- Leases for singleton background jobs (expiry sweeper, outbox retention)
        -- when several replicas run; see domain/shared/leases.py.
        CREATE TABLE platform.leases (
            name text PRIMARY KEY,
            holder text NOT NULL,
            expires_at timestamptz NOT NULL
        );
        """
    )


def downgrade() -> None:
    op.execute("DROP SCHEMA platform CASCADE")
