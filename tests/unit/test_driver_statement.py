"""DriverStatement: `:name` parameters become asyncpg's `$n`, one number per name."""

from __future__ import annotations

import pytest

from domain.shared.db import DriverStatement


def test_names_numbered_in_order_of_first_use() -> None:
    st = DriverStatement("SELECT CAST(:a AS int), :b, CAST(:a AS int) + :c")
    assert st.sql == "SELECT CAST($1 AS int), $2, CAST($1 AS int) + $3"
    assert st.names == ("a", "b", "c")
    assert st.args({"c": 3, "a": 1, "b": 2, "unused": 9}) == [1, 2, 3]


def test_casts_and_strings_without_parameters_are_left_alone() -> None:
    st = DriverStatement("SELECT NULL::boolean AS b1, x::text[], 'sku' FROM t WHERE y = :y_1")
    assert st.sql == "SELECT NULL::boolean AS b1, x::text[], 'sku' FROM t WHERE y = $1"
    assert st.names == ("y_1",)


def test_missing_parameter_is_an_error() -> None:
    with pytest.raises(KeyError):
        DriverStatement("SELECT :a").args({})
