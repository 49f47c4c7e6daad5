"""Hypothesis strategies built from protobuf message descriptors, biased towards what breaks
servers: edge integers (negative, zero, int32/int64 limits), unknown enum values, long and odd
Unicode (NFC/NFD and full-width look-alikes, bidi overrides, NUL, zero-width), empty and
duplicated repeated entries, missing fields, deep nesting of recursive types."""

from __future__ import annotations

from typing import Any

from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import strategies as st

MAX_DEPTH = 3

INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}

TRICKY_STRINGS = [
    "",
    " ",
    " \t\n ",
    "MUG-1",
    "mug-1",
    "MUG-1 ",
    "\uff2d\uff35\uff27\uff0d\uff11",  # full-width look-alike of MUG-1
    "MUG\u20111",  # non-breaking hyphen
    "caf\u00e9",  # NFC
    "cafe\u0301",  # NFD: looks identical
    "\u212bngstr\u00f6m",  # Angstrom sign vs A-ring
    "I\u0307stanbul",
    "stra\u00dfe",
    "\u202egnp.exe",  # right-to-left override
    "a\u200bb",  # zero-width space
    "\ufeffBOM",
    "nul\x00byte",
    "\U0001f600" * 50,
    "x" * 256,
    "y" * 5000,
    "'; DROP TABLE x; --",
    "%s%s%n",
    "../../etc/passwd",
    "PAR",
    "EUR",
    "eur",
    "XXX",
    "test",
    "*",
    "default",
    "Europe/Paris",
    "name",
    "channel.name",
    "-1",
    "9" * 40,
    "1e309",
    "NaN",
]


def _ints(lo: int, hi: int) -> st.SearchStrategy[int]:
    edges = [
        v
        for v in (0, 1, -1, 2, lo, hi, lo + 1, hi - 1, 10**6, -(10**6), 2**31 - 1, -(2**31), 2**53)
        if lo <= v <= hi
    ]
    return st.one_of(
        st.sampled_from(edges), st.integers(lo, hi), st.integers(-5, 100).filter(lambda v: lo <= v <= hi)
    )


def _strings() -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from(TRICKY_STRINGS),
        st.text(max_size=40),
        st.text(st.characters(codec="utf-8"), min_size=100, max_size=600),
    )


def _scalar(field: FieldDescriptor) -> st.SearchStrategy[Any]:
    t = field.type
    if t in INT_RANGES:
        return _ints(*INT_RANGES[t])
    if t == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t == FieldDescriptor.TYPE_STRING:
        return _strings()
    if t == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=64)
    if t == FieldDescriptor.TYPE_FLOAT:
        return st.floats(width=32)
    if t == FieldDescriptor.TYPE_DOUBLE:
        return st.floats()
    if t == FieldDescriptor.TYPE_ENUM:
        known = [v.number for v in field.enum_type.values]
        return st.one_of(st.sampled_from(known), _ints(-(2**31), 2**31 - 1))  # unknown values too
    raise TypeError(f"unsupported field type {t} for {field.full_name}")


_cache: dict[tuple[str, int], st.SearchStrategy[Message]] = {}


def messages(desc: Descriptor, depth: int = 0) -> st.SearchStrategy[Message]:
    """Messages of type `desc`; every field may be missing."""
    key = (desc.full_name, depth)
    if key in _cache:
        return _cache[key]
    cls = message_factory.GetMessageClass(desc)
    if depth >= MAX_DEPTH:
        strategy: st.SearchStrategy[Message] = st.builds(cls)
    else:
        optional = {f.name: _field(f, depth) for f in desc.fields}
        strategy = st.fixed_dictionaries({}, optional=optional).map(lambda values: _build(cls, desc, values))
    _cache[key] = strategy
    return strategy


def _is_map(field: FieldDescriptor) -> bool:
    return field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type.GetOptions().map_entry


def _single(field: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return messages(field.message_type, depth + 1)
    return _scalar(field)


def _field(field: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    if _is_map(field):
        entry = field.message_type
        k, v = entry.fields_by_name["key"], entry.fields_by_name["value"]
        return st.dictionaries(_single(k, depth), _single(v, depth), max_size=4)
    if field.is_repeated:
        one = _single(field, depth)
        # Empty lists, short lists, and the same entry twice.
        return st.one_of(st.lists(one, max_size=4), one.map(lambda x: [x, x]))
    return _single(field, depth)


def _build(cls: type[Message], desc: Descriptor, values: dict[str, Any]) -> Message:
    msg = cls()
    for name, value in values.items():
        field = desc.fields_by_name[name]
        target = getattr(msg, name) if field.is_repeated else None
        if _is_map(field):
            assert target is not None
            for k, v in value.items():
                if isinstance(v, Message):
                    target[k].CopyFrom(v)
                else:
                    target[k] = v
        elif target is not None:
            for v in value:
                if isinstance(v, Message):
                    target.add().CopyFrom(v)
                else:
                    target.append(v)
        elif isinstance(value, Message):
            getattr(msg, name).CopyFrom(value)
        else:
            setattr(msg, name, value)
    return msg
