"""The outbox has one writer: domain/shared/outbox.py."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
INSERT = re.compile(r"INSERT\s+INTO\s+platform\.outbox\b", re.IGNORECASE)


def test_nothing_but_the_outbox_module_inserts_into_the_outbox() -> None:
    writers = sorted(
        str(p.relative_to(ROOT))
        for top in ("domain", "server", "clients/python", "scripts", "migrations")
        for p in (ROOT / top).rglob("*.py")
        if INSERT.search(p.read_text(encoding="utf-8"))
    )
    assert writers == ["domain/shared/outbox.py"]
