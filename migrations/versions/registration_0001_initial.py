"""registration: forms, rules, document types, agreements, invitation codes,
registrations, pending accounts, documents (content in PostgreSQL), signatures.

Revision ID: registration_0001
"""

from __future__ import annotations

from alembic import op

from migrations.sql import script

revision = "registration_0001"
down_revision = None
branch_labels = ("registration",)
depends_on = "platform_0001"


def upgrade() -> None:
    op.execute("CREATE SCHEMA IF NOT EXISTS registration")
    script(SCHEMA)


SCHEMA = """
        CREATE TABLE registration.forms (
            id text PRIMARY KEY,
            channel text NOT NULL REFERENCES platform.channels (slug),
            slug text NOT NULL,
            version integer NOT NULL DEFAULT 1,
            active boolean NOT NULL DEFAULT true,
            created_at timestamptz NOT NULL DEFAULT now(),
            updated_at timestamptz NOT NULL DEFAULT now(),
            UNIQUE (channel, slug)
        );
        -- Every version is kept: a submission points at the version it used.
        CREATE TABLE registration.form_versions (
            form_id text NOT NULL REFERENCES registration.forms (id),
            version integer NOT NULL,
            name text NOT NULL,
            description text NOT NULL DEFAULT '',
            customer_group text NOT NULL DEFAULT '',
            invitation_required boolean NOT NULL DEFAULT false,
            expire_after_seconds bigint NOT NULL,
            steps jsonb NOT NULL,
            created_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (form_id, version)
        );

        CREATE TABLE registration.rules (
            id text PRIMARY KEY,
            channel text NOT NULL REFERENCES platform.channels (slug),
            name text NOT NULL,
            type text NOT NULL CHECK (type IN ('require', 'block', 'exempt')),
            geo jsonb NOT NULL,
            requirements jsonb NOT NULL,
            reason text NOT NULL DEFAULT '',
            priority integer NOT NULL DEFAULT 0,
            form_id text REFERENCES registration.forms (id),
            active boolean NOT NULL DEFAULT true,
            created_at timestamptz NOT NULL DEFAULT now()
        );
        CREATE INDEX ix_rules_channel ON registration.rules (channel, created_at, id);

        CREATE TABLE registration.document_types (
            code text PRIMARY KEY,
            name text NOT NULL,
            description text NOT NULL DEFAULT '',
            allowed_content_types text[] NOT NULL,
            max_size_bytes bigint NOT NULL CHECK (max_size_bytes > 0),
            requires_expiration_date boolean NOT NULL DEFAULT false,
            requires_number boolean NOT NULL DEFAULT false,
            requires_issuing_authority boolean NOT NULL DEFAULT false,
            active boolean NOT NULL DEFAULT true,
            created_at timestamptz NOT NULL DEFAULT now(),
            updated_at timestamptz NOT NULL DEFAULT now()
        );

        CREATE TABLE registration.agreement_templates (
            code text NOT NULL,
            version integer NOT NULL,
            title text NOT NULL,
            body text NOT NULL,
            body_sha256 text NOT NULL,
            signature_required boolean NOT NULL,
            created_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (code, version)
        );

        CREATE TABLE registration.invitation_codes (
            channel text NOT NULL REFERENCES platform.channels (slug),
            code text NOT NULL,
            form_id text REFERENCES registration.forms (id),
            customer_group text NOT NULL DEFAULT '',
            max_uses integer NOT NULL CHECK (max_uses > 0),
            uses integer NOT NULL DEFAULT 0,
            expires_at timestamptz,
            active boolean NOT NULL DEFAULT true,
            created_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (channel, code),
            -- Belt and braces: redemption is a conditional UPDATE (uses < max_uses).
            CHECK (uses >= 0 AND uses <= max_uses)
        );

        CREATE TABLE registration.registrations (
            id text PRIMARY KEY,
            channel text NOT NULL REFERENCES platform.channels (slug),
            form_id text NOT NULL,
            form_version integer NOT NULL,
            state text NOT NULL,
            answers jsonb NOT NULL,
            address jsonb NOT NULL,
            invitation_code text NOT NULL DEFAULT '',
            customer_group text NOT NULL DEFAULT '',
            requirements jsonb NOT NULL,
            decision text NOT NULL DEFAULT '',
            decision_note text NOT NULL DEFAULT '',
            reviewer text NOT NULL DEFAULT '',
            submitted_by text NOT NULL,
            expires_at timestamptz NOT NULL,
            created_at timestamptz NOT NULL DEFAULT now(),
            updated_at timestamptz NOT NULL DEFAULT now(),
            FOREIGN KEY (form_id, form_version) REFERENCES registration.form_versions (form_id, version)
        );
        CREATE INDEX ix_registrations_inbox ON registration.registrations (channel, created_at DESC, id DESC);

        CREATE TABLE registration.invitation_redemptions (
            channel text NOT NULL,
            code text NOT NULL,
            registration_id text NOT NULL REFERENCES registration.registrations (id),
            redeemed_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (channel, code, registration_id),
            FOREIGN KEY (channel, code) REFERENCES registration.invitation_codes (channel, code)
        );

        CREATE TABLE registration.history (
            id bigserial PRIMARY KEY,
            registration_id text NOT NULL REFERENCES registration.registrations (id),
            from_state text NOT NULL,
            to_state text NOT NULL,
            actor text NOT NULL,
            note text NOT NULL DEFAULT '',
            at timestamptz NOT NULL DEFAULT clock_timestamp()
        );
        CREATE INDEX ix_history_registration ON registration.history (registration_id, id);

        CREATE TABLE registration.accounts (
            id text PRIMARY KEY,
            channel text NOT NULL REFERENCES platform.channels (slug),
            registration_id text NOT NULL UNIQUE REFERENCES registration.registrations (id),
            status text NOT NULL CHECK (status IN ('pending', 'active', 'denied', 'expired')),
            company_name text NOT NULL DEFAULT '',
            email text NOT NULL DEFAULT '',
            customer_group text NOT NULL DEFAULT '',
            address jsonb NOT NULL,
            attributes jsonb NOT NULL,
            created_at timestamptz NOT NULL DEFAULT now(),
            updated_at timestamptz NOT NULL DEFAULT now()
        );

        -- Content behind the storage interface (PostgresDocumentStorage): every replica sees it.
        CREATE TABLE registration.document_blobs (
            key text PRIMARY KEY,
            content bytea NOT NULL,
            size_bytes bigint NOT NULL,
            sha256 text NOT NULL,
            created_at timestamptz NOT NULL DEFAULT now()
        );

        CREATE TABLE registration.documents (
            id text PRIMARY KEY,
            registration_id text NOT NULL REFERENCES registration.registrations (id),
            document_type_code text NOT NULL REFERENCES registration.document_types (code) ON DELETE RESTRICT,
            filename text NOT NULL,
            content_type text NOT NULL,
            size_bytes bigint NOT NULL,
            sha256 text NOT NULL,
            storage_key text NOT NULL,
            number text NOT NULL DEFAULT '',
            issuing_authority text NOT NULL DEFAULT '',
            expiration_date date,
            created_at timestamptz NOT NULL DEFAULT now()
        );
        CREATE INDEX ix_documents_registration ON registration.documents (registration_id, created_at);

        CREATE TABLE registration.verifications (
            document_id text PRIMARY KEY REFERENCES registration.documents (id),
            status text NOT NULL,
            ocr_strategy text NOT NULL DEFAULT '',
            verification_strategy text NOT NULL DEFAULT '',
            confidence_bps integer NOT NULL DEFAULT 0 CHECK (confidence_bps BETWEEN 0 AND 10000),
            extracted jsonb NOT NULL DEFAULT '{}',
            note text NOT NULL DEFAULT '',
            updated_at timestamptz NOT NULL DEFAULT now()
        );

        CREATE TABLE registration.signatures (
            id text PRIMARY KEY,
            registration_id text NOT NULL REFERENCES registration.registrations (id),
            agreement_code text NOT NULL,
            agreement_version integer NOT NULL,
            method text NOT NULL,
            signer_name text NOT NULL,
            signer_email text NOT NULL DEFAULT '',
            ip_address text NOT NULL DEFAULT '',
            user_agent text NOT NULL DEFAULT '',
            content_sha256 text NOT NULL,
            external_reference text NOT NULL DEFAULT '',
            provider text NOT NULL,
            signed_at timestamptz NOT NULL DEFAULT now(),
            FOREIGN KEY (agreement_code, agreement_version)
                REFERENCES registration.agreement_templates (code, version)
        );
        CREATE INDEX ix_signatures_registration ON registration.signatures (registration_id, signed_at);

        -- Effects of Temporal activities, keyed by workflow id + step, so a
        -- retried or replayed activity never acts twice.
        CREATE TABLE registration.activity_effects (
            key text PRIMARY KEY,
            result jsonb NOT NULL,
            created_at timestamptz NOT NULL DEFAULT now()
        );
"""


def downgrade() -> None:
    op.execute("DROP SCHEMA registration CASCADE")
