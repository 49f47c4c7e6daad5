"""registration: find registrations whose workflow never started (the reconciler).

Revision ID: registration_0002
"""

from __future__ import annotations

from alembic import op

revision = "registration_0002"
down_revision = "registration_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Only rows still `submitted` are candidates (the workflow's first step moves
    # every registration on), so the index stays as small as that backlog.
    op.execute(
        "CREATE INDEX ix_registrations_submitted_updated ON registration.registrations (updated_at) "
        "WHERE state = 'submitted'"
    )


def downgrade() -> None:
    op.execute("DROP INDEX registration.ix_registrations_submitted_updated")
