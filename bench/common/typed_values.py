"""Values for any request field, drawn from the protocol's own types (``msgspec.inspect``).

The fuzz generators (``harness.FrameGen``) know the meaning of the fields they were written
for (live engine ids, stored hashes, owned slots). Every other field, including those of ops
added since, gets values from its declared type here: valid ones, values at and just past
its ``Meta`` bounds (``ge``/``le``/``gt``/``lt``, ``min_length``/``max_length``), and values
of the wrong type. Nothing here is written per op, so a new op or field is covered as soon
as it is in ``protocol.REQUEST_TYPES``.
"""

from __future__ import annotations

import math
import random
from typing import Any

import msgspec
import msgspec.inspect as mi

from tokencake import protocol as p

_WRONG: list[Any] = [None, True, -1, 2**64 - 1, 1.5, math.nan, "", "x", b"\x00", [], {}, [None]]


def _fields(cls: type[msgspec.Struct]) -> dict[str, mi.Type]:
    info = mi.type_info(cls)
    assert isinstance(info, mi.StructType)
    return {f.encode_name: f.type for f in info.fields}


OP_FIELD_TYPES: dict[str, dict[str, mi.Type]] = {
    op: _fields(cls) for op, cls in p.REQUEST_TYPES.items()
}
"""op -> field (wire name) -> declared type, for every request of the protocol."""


class TypedValues:
    """Seeded values for a declared type; ``valid`` keeps within it, ``value`` tests it."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def value(self, t: mi.Type, depth: int = 0) -> Any:
        """Mostly the type's edges; sometimes a valid value; sometimes the wrong type."""
        r = self.rng.random()
        if r < 0.1 or depth > 3:
            return self.rng.choice(_WRONG)
        if r < 0.45:
            return self.valid(t, depth)
        return self._edge(t, depth)

    def valid(self, t: mi.Type, depth: int = 0) -> Any:
        r = self.rng
        if isinstance(t, mi.IntType):
            lo, hi = _int_bounds(t)
            return r.randint(lo, min(hi, lo + 4096))
        if isinstance(t, mi.FloatType):
            flo, fhi = _float_bounds(t)
            return flo + (min(fhi, flo + 100.0) - flo) * r.random()
        if isinstance(t, (mi.StrType, mi.BytesType)):
            lo, hi = t.min_length or 0, t.max_length if t.max_length is not None else 16
            n = r.randint(max(lo, 1 if hi else 0), min(hi, max(lo, 1) + 15))
            text = "".join(r.choice("abcdefgh#-_") for _ in range(n))
            return text if isinstance(t, mi.StrType) else text.encode()
        if isinstance(t, mi.BoolType):
            return r.random() < 0.5
        if isinstance(t, (mi.ListType, mi.VarTupleType, mi.SetType, mi.FrozenSetType)):
            lo = t.min_length or 0
            hi = t.max_length if t.max_length is not None else 4
            return [self.valid(t.item_type, depth + 1) for _ in range(r.randint(lo, min(hi, 4)))]
        if isinstance(t, mi.TupleType):
            return [self.valid(item, depth + 1) for item in t.item_types]
        if isinstance(t, mi.StructType):
            return {f.encode_name: self.valid(f.type, depth + 1) for f in t.fields if f.required}
        if isinstance(t, mi.UnionType):
            return self.valid(r.choice(t.types), depth)
        if isinstance(t, mi.LiteralType):
            return r.choice(t.values)
        if isinstance(t, mi.NoneType):
            return None
        if isinstance(t, mi.DictType):
            return {}
        return None

    def _edge(self, t: mi.Type, depth: int) -> Any:
        r = self.rng
        if isinstance(t, mi.IntType):
            lo, hi = _int_bounds(t)
            return r.choice([lo - 1, lo, hi, hi + 1, 0, -1, 2**63 - 1, -(2**63), 2**64 - 1])
        if isinstance(t, mi.FloatType):
            flo, fhi = _float_bounds(t)
            return r.choice([flo, fhi, math.nan, math.inf, -math.inf, -0.0, 1e308, -1.0])
        if isinstance(t, (mi.StrType, mi.BytesType)):
            cap = t.max_length if t.max_length is not None else p.MAX_NAME_CHARS
            n = r.choice([0, max((t.min_length or 0) - 1, 0), cap, cap + 1, 4 * cap])
            text = r.choice(["a", "é", "\x00", "#", "\U0001f600"]) * n
            return text if isinstance(t, mi.StrType) else text.encode()[: 4 * cap + 8]
        if isinstance(t, (mi.ListType, mi.VarTupleType, mi.SetType, mi.FrozenSetType)):
            cap = t.max_length if t.max_length is not None else p.MAX_HASHES_PER_REQUEST
            item = self.valid(t.item_type, depth + 1)
            return r.choice([[], [item] * (cap + 1), [item, item], [self.value(t.item_type)]])
        if isinstance(t, mi.StructType):
            out = {f.encode_name: self.value(f.type, depth + 1) for f in t.fields}
            if out and r.random() < 0.3:
                del out[r.choice(list(out))]
            return out
        if isinstance(t, mi.UnionType):
            return self._edge(r.choice(t.types), depth)
        return r.choice(_WRONG)


def _int_bounds(t: mi.IntType) -> tuple[int, int]:
    lo = t.ge if t.ge is not None else (t.gt + 1 if t.gt is not None else -(2**31))
    hi = t.le if t.le is not None else (t.lt - 1 if t.lt is not None else 2**31)
    return lo, hi


def _float_bounds(t: mi.FloatType) -> tuple[float, float]:
    lo = t.ge if t.ge is not None else (t.gt if t.gt is not None else -1e6)
    hi = t.le if t.le is not None else (t.lt if t.lt is not None else 1e6)
    return float(lo), float(hi)
