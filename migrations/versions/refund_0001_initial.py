"""refunds: requests, per-tender progress, exactly-once step markers, workflow faults,
and the simulated PSP's own tables.

Revision ID: refund_0001
"""

from __future__ import annotations

from alembic import op

from migrations.sql import script

revision = "refund_0001"
down_revision = None
branch_labels = ("refunds",)
# Orders and inventory are reached only through their Python interfaces.
depends_on = "platform_0001"


def upgrade() -> None:
    script(
        """
        CREATE SCHEMA IF NOT EXISTS refunds;

        CREATE TABLE refunds.refunds (
            id uuid PRIMARY KEY,
            channel text NOT NULL REFERENCES platform.channels (slug),
            order_id text NOT NULL,
            customer_ref text NOT NULL DEFAULT '',
            order_submitted_at timestamptz NOT NULL,
            currency text NOT NULL,
            amount_minor bigint NOT NULL CHECK (amount_minor >= 0),
            reason text NOT NULL,
            restock boolean NOT NULL DEFAULT false,
            restock_warehouse_code text NOT NULL DEFAULT '',
            state text NOT NULL CHECK (state IN
                ('pending_approval', 'denied', 'executing', 'completed', 'faulted')),
            requested_by text NOT NULL,
            decided_by text NOT NULL DEFAULT '',
            decision_note text NOT NULL DEFAULT '',
            execution_attempt integer NOT NULL DEFAULT 0,
            fault_message text NOT NULL DEFAULT '',
            created_at timestamptz NOT NULL DEFAULT now(),
            updated_at timestamptz NOT NULL DEFAULT now(),
            decided_at timestamptz,
            completed_at timestamptz
        );
        CREATE INDEX ix_refunds_channel_created ON refunds.refunds (channel, created_at DESC, id DESC);
        CREATE INDEX ix_refunds_order ON refunds.refunds (order_id);
        -- The reconciler scans executions that may have lost their workflow start.
        CREATE INDEX ix_refunds_executing ON refunds.refunds (updated_at) WHERE state = 'executing';

        CREATE TABLE refunds.refund_lines (
            refund_id uuid NOT NULL REFERENCES refunds.refunds (id),
            line_id text NOT NULL,
            sku text NOT NULL,
            quantity bigint NOT NULL CHECK (quantity > 0),
            amount_minor bigint NOT NULL CHECK (amount_minor >= 0),
            PRIMARY KEY (refund_id, line_id)
        );
        CREATE INDEX ix_refund_lines_sku ON refunds.refund_lines (sku);

        CREATE TABLE refunds.refund_tenders (
            refund_id uuid NOT NULL REFERENCES refunds.refunds (id),
            tender_id text NOT NULL,
            seq integer NOT NULL,
            method text NOT NULL DEFAULT '',
            gateway_reference text NOT NULL DEFAULT '',
            amount_minor bigint NOT NULL CHECK (amount_minor > 0),
            state text NOT NULL CHECK (state IN ('pending', 'succeeded')),
            idempotency_key text NOT NULL UNIQUE,
            gateway_refund_id text NOT NULL DEFAULT '',
            attempts integer NOT NULL DEFAULT 0,
            refunded_at timestamptz,
            PRIMARY KEY (refund_id, tender_id)
        );

        -- One row per side effect done exactly once (restock, history entries).
        CREATE TABLE refunds.refund_steps (
            refund_id uuid NOT NULL REFERENCES refunds.refunds (id),
            step text NOT NULL,
            done_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (refund_id, step)
        );

        CREATE TABLE refunds.workflow_faults (
            id bigserial PRIMARY KEY,
            channel text NOT NULL,
            workflow_id text NOT NULL,
            subject_type text NOT NULL,
            subject_id text NOT NULL,
            step text NOT NULL,
            error_type text NOT NULL,
            message text NOT NULL,
            created_at timestamptz NOT NULL DEFAULT now(),
            resolved_at timestamptz
        );
        CREATE INDEX ix_workflow_faults_channel ON refunds.workflow_faults (channel, id DESC);
        CREATE INDEX ix_workflow_faults_subject ON refunds.workflow_faults (subject_type, subject_id);

        -- The simulated PSP: what a real PSP keeps on its side, keyed by idempotency key.
        CREATE TABLE refunds.sim_psp_refunds (
            idempotency_key text PRIMARY KEY,
            psp_refund_id text NOT NULL UNIQUE,
            gateway_reference text NOT NULL,
            amount_minor bigint NOT NULL CHECK (amount_minor > 0),
            currency text NOT NULL,
            created_at timestamptz NOT NULL DEFAULT now()
        );
        -- Behaviours for tests and demos, per gateway reference of a tender.
        CREATE TABLE refunds.sim_psp_rules (
            gateway_reference text PRIMARY KEY,
            fail_times integer NOT NULL DEFAULT 0,
            fail_forever boolean NOT NULL DEFAULT false,
            timeout_after_charge_times integer NOT NULL DEFAULT 0,
            timeout_seconds double precision NOT NULL DEFAULT 1,
            attempts integer NOT NULL DEFAULT 0
        );
        """
    )


def downgrade() -> None:
    op.execute("DROP SCHEMA IF EXISTS refunds CASCADE")
