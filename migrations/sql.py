"""Run a multi-statement SQL script inside a migration.

asyncpg prepares each statement, so `op.execute` takes one statement only;
scripts go through the driver's simple-query protocol instead.
"""

from __future__ import annotations

from alembic import op
from sqlalchemy.util import await_only


def script(sql: str) -> None:
    driver_connection = op.get_bind().connection.driver_connection
    await_only(driver_connection.execute(sql))
