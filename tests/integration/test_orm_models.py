"""The ORM classes that are kept (domain/*/models.py) against the tables the migrations
create: same columns, types, nullability and primary keys, and no column the ORM leaves
out that an ORM insert could not fill. Unused ORM classes are deleted, not kept."""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil

import pytest
from sqlalchemy import Table, text
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import create_async_engine

import domain
from domain.shared.db import Base

for _mod in pkgutil.iter_modules(domain.__path__):
    if importlib.util.find_spec(f"domain.{_mod.name}.models") is not None:
        importlib.import_module(f"domain.{_mod.name}.models")

TABLES = Base.metadata.sorted_tables

COLUMNS = text(
    """
    SELECT a.attname, format_type(a.atttypid, a.atttypmod), NOT a.attnotnull, a.atthasdef,
           coalesce(a.attnum = ANY (i.indkey), false)
    FROM pg_attribute a
    LEFT JOIN pg_index i ON i.indrelid = a.attrelid AND i.indisprimary
    WHERE a.attrelid = to_regclass(:table) AND a.attnum > 0 AND NOT a.attisdropped
    """
)


def test_every_models_module_is_checked() -> None:
    schemas = {t.schema for t in TABLES}
    assert {"inventory", "orders", "platform"} <= schemas, schemas


@pytest.mark.parametrize("table", TABLES, ids=lambda t: f"{t.schema}.{t.name}")
async def test_orm_table_matches_the_migrated_table(database_url: str, table: Table) -> None:
    engine = create_async_engine(database_url.replace("postgresql://", "postgresql+asyncpg://", 1))
    try:
        async with engine.connect() as conn:
            rows = (await conn.execute(COLUMNS, {"table": f"{table.schema}.{table.name}"})).all()
    finally:
        await engine.dispose()
    assert rows, f"{table.schema}.{table.name} does not exist after the migrations"
    db = {name: (type_, nullable, has_default, pk) for name, type_, nullable, has_default, pk in rows}
    for column in table.columns:
        assert column.name in db, f"{table.name}.{column.name} is not in the migrated table"
        type_, nullable, _, _ = db[column.name]
        assert column.type.compile(dialect=postgresql.dialect()).lower() == type_, column
        assert column.nullable == nullable, f"{table.name}.{column.name}: nullable differs"
    orm_pk = {c.name for c in table.primary_key.columns}
    assert orm_pk == {name for name, (_, _, _, pk) in db.items() if pk}, "primary keys differ"
    for name, (_, nullable, has_default, _) in db.items():
        if name not in table.columns:
            assert nullable or has_default, f"{table.name}.{name}: NOT NULL without default, not in the ORM"
