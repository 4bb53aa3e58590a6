"""Column-at-a-time decoding of a ``SpotList`` whose records all share one layout.

The relay's encoder writes every record of a message with the same size, vtable and
offsets (names padded to the longest). Such a message is a table of fixed-stride rows, so
each field can be read for all records at once through a strided ``memoryview`` -- no Python
code per record. :func:`uniform_columns` proves the layout really is uniform (every table
offset, soffset, reference and length is checked column-wise against what the first record
implies) and returns ``None`` for anything else, which the general decoder then reads
record by record. Both give identical results (tested).
"""

from __future__ import annotations

import struct
from array import array
from itertools import repeat
from operator import getitem, itemgetter
from typing import Any, Dict, List, Optional, Sequence, Tuple

from relay.records import FIELDS, Memo, SpotColumns

__all__ = ["uniform_columns"]

# Field kinds, as in _codec: string, vector of double, double, long, int, ulong.
_STR, _VEC, _F64, _I64, _I32, _U64 = range(6)
_SCALAR_CODE = {_F64: "d", _I64: "q", _I32: "i", _U64: "Q"}
_SCALAR_SIZE = {_F64: 8, _I64: 8, _I32: 4, _U64: 8}
_STRING_FIELDS = (0, 1, 2, 3)
_BOOK_FIELDS = (11, 12, 13, 14)


def _column(mem: memoryview, at: int, count: int, size: int, code: str, width: int) -> Any:
    """Values of one fixed-stride field: ``count`` items ``size`` bytes apart from ``at``."""
    view = mem[at:at + (count - 1) * size + width].cast(code)  # type: ignore[call-overload]
    return view[0::size // width]


def _array(mem: memoryview, at: int, count: int, size: int, code: str,
           width: int) -> array[Any]:
    """Like :func:`_column`, as an ``array`` (copied in C: no per-item objects)."""
    out: array[Any] = array(code)
    out.frombytes(_column(mem, at, count, size, code, width).tobytes())
    return out


# UTF-8 bytes -> str: codes, names and timestamps repeat message after message.
_STRINGS = Memo(bytes.decode, limit=1 << 16)


def uniform_columns(buf: bytes, base: int, count: int, table_size: int,
                    present: Sequence[Tuple[int, int, int]]) -> Optional[SpotColumns]:
    """Read ``count`` Spot records as columns, or ``None`` if their layout is not uniform.

    Args:
        buf: the SpotList FlatBuffer.
        base: position of the spot vector's first offset (just after its count).
        count: number of records.
        table_size: the (shared) vtable's table size.
        present: ``(offset in table, field id, kind)`` of every field the vtable has.
    """
    if count < 2:
        return None
    n = len(buf)
    mem = memoryview(buf)
    slots = array("I", mem[base:base + 4 * count].cast("I"))
    first = base + slots[0]
    size = base + 4 + slots[1] - first
    if size < max(table_size, 8) or size % 8 or first + count * size > n:
        return None
    if slots != array("I", range(slots[0], slots[0] + count * (size - 4), size - 4)):
        return None
    region = mem[first:first + count * size]
    soffsets = _array(region, 0, count, size, "i", 4)
    vt = first - soffsets[0]
    if soffsets != array("i", range(first - vt, first - vt + count * size, size)):
        return None
    cols: List[Any] = [None] * len(FIELDS)
    pieces: List[Tuple[int, int]] = []  # (start, end) of every payload, relative to a record
    levels: Dict[int, int] = {}
    for off, fid, kind in present:
        if kind in _SCALAR_CODE:
            cols[fid] = _column(region, off, count, size, _SCALAR_CODE[kind],
                                _SCALAR_SIZE[kind]).tolist()
            continue
        refs = _array(region, off, count, size, "I", 4)
        if refs.count(refs[0]) != count:
            return None  # not the same relative position in every record
        rel = off + refs[0]
        if rel < table_size or rel + 4 > size:
            return None
        lengths = _array(region, rel, count, size, "I", 4)
        if kind == _VEC:
            depth = lengths[0]
            end = rel + 4 + 8 * depth
            if lengths.count(depth) != count or end > size:
                return None
            flat = array("d", bytes(8 * depth * count))
            for j in range(depth):
                flat[j::depth] = _array(region, rel + 4 + 8 * j, count, size, "d", 8)
            cols[fid] = flat
            levels[fid] = depth
        else:
            width = max(lengths)
            end = rel + 4 + width
            if end > size:
                return None
            cut = struct.Struct(f"<{rel + 4}x{width}s{size - end}x").iter_unpack(region)
            chunks = map(itemgetter(0), cut)
            if lengths.count(width) != count:
                chunks = map(getitem, chunks, map(slice, repeat(None), lengths))
            cols[fid] = list(map(_STRINGS.__getitem__, chunks))
        pieces.append((rel, end))
    pieces.sort()
    for (_, end), (start, _) in zip(pieces, pieces[1:]):
        if start < end:
            return None  # overlapping payloads: leave it to the general decoder
    depth_set = {levels.get(fid, 0) for fid in _BOOK_FIELDS}
    if len(depth_set) != 1:
        return None
    (depth,) = depth_set
    for fid in range(len(FIELDS)):
        if cols[fid] is None:  # absent from the vtable: the schema default
            if fid in _STRING_FIELDS:
                cols[fid] = [""] * count
            elif fid in _BOOK_FIELDS:
                cols[fid] = array("d")
            elif fid <= 10:
                cols[fid] = [0.0] * count
            else:
                cols[fid] = [None] * count
    return SpotColumns(count, depth, cols)
