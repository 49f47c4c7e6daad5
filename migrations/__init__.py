"""Alembic migrations: one branch per module (`alembic upgrade heads`)."""

from __future__ import annotations

import threading
from pathlib import Path

from alembic import command
from alembic.config import Config

HERE = Path(__file__).resolve().parent


def alembic_config(database_url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(HERE))
    cfg.set_main_option("path_separator", "os")
    cfg.set_main_option("version_locations", str(HERE / "versions"))
    cfg.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return cfg


def upgrade(database_url: str, target: str = "heads") -> None:
    """Apply every module's migrations. Safe to call from inside an event loop
    (alembic's env runs its own loop, so it runs in a thread)."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            command.upgrade(alembic_config(database_url), target)
        except BaseException as exc:  # re-raised in the caller's thread below
            errors.append(exc)

    t = threading.Thread(target=run, name="alembic-upgrade")
    t.start()
    t.join()
    if errors:
        raise errors[0]
