"""Decoder for ``SpotList`` FlatBuffers: pure Python (stdlib); NumPy only if already loaded.

It reads any valid buffer for ``schemas/spot.fbs``: the relay's own, and those built the
ordinary way with ``flatbuffers.Builder`` by other hikyuu-format producers. Speed comes from
compiling, once per distinct vtable, a ``struct.Struct`` that reads every inline field of a
table in one call; a producer that shares vtables (every Builder does) hits that cache on
every record.

When the application has NumPy loaded, the relay's uniform messages are read through the
NumPy column reader (:mod:`relay.client._columns`) before the records are built: same
records, less time. Without NumPy the column-at-a-time reader of :mod:`relay.client._uniform`
does the same in pure Python.

Every read is bounds-checked: a truncated or malformed buffer raises
:class:`~relay.errors.DecodeError`, never another exception, and a lying length cannot make
the decoder allocate more than the buffer holds.
"""

from __future__ import annotations

import struct
import sys
from functools import lru_cache
from operator import itemgetter
from typing import (
    Any,
    Callable,
    Dict,
    List,
    NamedTuple,
    Optional,
    Sequence,
    Tuple,
    TypeVar,
    Union,
)

from relay.client._uniform import uniform_columns
from relay.errors import DecodeError
from relay.records import SpotColumns, SpotRecord, _acyclic

__all__ = ["SpotList", "decode_spot_list"]

Buffer = Union[bytes, bytearray, memoryview]


class SpotList(NamedTuple):
    """One decoded ``SpotList`` message.

    ``seq``, ``run_id``, ``source`` and ``publish_time_ms`` are ``None`` when the producer did
    not send them (a plain hikyuu producer sends none of them).
    """

    records: List[SpotRecord]
    seq: Optional[int]
    run_id: Optional[str]
    source: Optional[str]
    publish_time_ms: Optional[int]


# Field kinds.
_STR, _VEC, _F64, _I64, _I32, _U64 = range(6)
_SPOT_KINDS = (
    (_STR, _STR, _STR, _STR)
    + (_F64,) * 7
    + (_VEC,) * 4
    + (_I64, _I32, _I64)
)
_SPOT_DEFAULTS: Tuple[object, ...] = (
    ("", "", "", "") + (0.0,) * 7 + ((), (), (), ()) + (None, None, None)
)
_LIST_KINDS = (_VEC, _U64, _STR, _STR, _I64)  # spot, seq, run_id, source, publish_time_ms
_LIST_DEFAULTS: Tuple[object, ...] = (None, None, None, None, None)
_CODE = {_STR: "I", _VEC: "I", _F64: "d", _I64: "q", _I32: "i", _U64: "Q"}
_SIZE = {_STR: 4, _VEC: 4, _F64: 8, _I64: 8, _I32: 4, _U64: 8}

_u32 = struct.Struct("<I").unpack_from
_i32 = struct.Struct("<i").unpack_from
_u16 = struct.Struct("<H").unpack_from
_new_record = tuple.__new__
_MAX_VTABLES = 256  # cache bound: a hostile stream cannot grow it without limit


class _Plan:
    """How to read one table whose vtable is a given byte string."""

    __slots__ = ("getter", "present", "read", "refs", "struct", "table_size", "tail")

    def __init__(self, vtable: bytes, kinds: Tuple[int, ...], defaults: Tuple[object, ...]):
        n = (len(vtable) - 4) // 2
        table_size = _u16(vtable, 2)[0]
        offsets = struct.unpack_from(f"<{n}H", vtable, 4) if n else ()
        present = []
        for fid, off in enumerate(offsets[: len(kinds)]):
            if off:
                kind = kinds[fid]
                if off < 4 or off + _SIZE[kind] > table_size:
                    raise DecodeError(f"field {fid} at offset {off} outside its table")
                present.append((off, fid, kind))
        present.sort()
        self.present = tuple(present)
        fmt = ["<"]
        pos = 0
        for off, fid, kind in present:
            if off < pos:
                raise DecodeError(f"field {fid} overlaps another field")
            if off > pos:
                fmt.append(f"{off - pos}x")
            fmt.append(_CODE[kind])
            pos = off + _SIZE[kind]
        self.struct = struct.Struct("".join(fmt))
        self.table_size = table_size
        # unpack_from() + tail gives every field's raw value; getter puts them in field order.
        slot_of = {fid: slot for slot, (_, fid, _) in enumerate(present)}
        absent = [fid for fid in range(len(kinds)) if fid not in slot_of]
        self.tail = tuple(defaults[fid] for fid in absent)
        for i, fid in enumerate(absent):
            slot_of[fid] = len(present) + i
        self.getter = itemgetter(*(slot_of[fid] for fid in range(len(kinds))))
        # Reference fields to resolve: (field id, offset of the field in the table, is string).
        self.refs = tuple((fid, off, kind == _STR) for off, fid, kind in present
                          if kind in (_STR, _VEC))
        self.read = _SpotReader(present, defaults, self.struct).read \
            if kinds is _SPOT_KINDS else None


class _SpotReader:
    """Reads Spot tables of one vtable layout; learns record shapes to read them in one go.

    The slow path follows every offset field by field. Once a record has been read that way,
    its *shape* -- where each string and vector sits relative to the table and how long it
    is -- becomes one ``struct.Struct`` covering all of them, keyed by the table's offset
    values. Records from the same producer mostly share a few shapes (ours always do), so the
    next record with the same offsets costs two ``unpack_from`` calls and a length check.
    Every generated function embeds only integers from an already validated vtable or shape.
    """

    __slots__ = ("_defaults", "_ref_slots", "_scalar_slots", "_shapes", "_slow", "_table", "read")

    def __init__(self, present: List[Tuple[int, int, int]], defaults: Tuple[object, ...],
                 table: struct.Struct) -> None:
        self._table = table
        self._shapes: Dict[Tuple[int, ...], Optional[Callable[..., Optional[SpotRecord]]]] = {}
        self._ref_slots = [(off, fid, kind) for off, fid, kind in present
                           if kind in (_STR, _VEC)]
        self._slow = self._compile_slow(present, defaults)
        self.read = self._compile_fast(present, defaults)

    def _compile_fast(self, present: List[Tuple[int, int, int]],
                      defaults: Tuple[object, ...]) -> Callable[[bytes, int, int], SpotRecord]:
        names = [f"f{fid}" for _, fid, _ in present]
        key = "".join(f"f{fid}, " for _, fid, _ in self._ref_slots)  # "()" when none
        scalars = ", ".join(f"f{fid}" for _, fid, kind in present if kind not in (_STR, _VEC))
        lines = ["def read(buf, tpos, n):"]
        if names:
            lines.append(f"    {', '.join(names)}, = unpack(buf, tpos)")
        lines += [
            f"    key = ({key})",
            "    shape = shapes_get(key)",
            "    if shape is not None:",
            f"        rec = shape(buf, tpos, {scalars})" if scalars else
            "        rec = shape(buf, tpos)",
            "        if rec is not None:",
            "            return rec",
            f"    return slow(buf, tpos, n, key, {', '.join(names)})" if names else
            "    return slow(buf, tpos, n, key)",
        ]
        ns: Dict[str, Any] = {"unpack": self._table.unpack_from,
                              "shapes_get": self._shapes.get, "slow": self._slow_and_learn}
        exec("\n".join(lines), ns)
        return ns["read"]  # type: ignore[no-any-return]

    def _compile_slow(self, present: List[Tuple[int, int, int]],
                      defaults: Tuple[object, ...]) -> Callable[..., Tuple[SpotRecord, Any]]:
        names = [f"f{fid}" for _, fid, _ in present]
        lines = [f"def slow(buf, tpos, n, {', '.join(names)}):" if names else
                 "def slow(buf, tpos, n):"]
        value: Dict[int, str] = {}
        learned = []
        for off, fid, kind in present:
            var = f"f{fid}"
            if kind in (_STR, _VEC):
                lines += [f"    a{fid} = tpos + {off} + {var}", f"    c{fid} = u32(buf, a{fid})[0]"]
                learned.append(f"({off} + {var}, c{fid}, {int(kind == _STR)}, {fid})")
            if kind == _STR:
                lines += [
                    f"    if a{fid} + 4 + c{fid} > n:",
                    f"        raise DecodeError('string field {fid} runs past the end', a{fid})",
                    f"    v{fid} = buf[a{fid} + 4:a{fid} + 4 + c{fid}].decode()",
                ]
                value[fid] = f"v{fid}"
            elif kind == _VEC:
                lines += [
                    f"    if a{fid} + 4 + 8 * c{fid} > n:",
                    f"        raise DecodeError('vector field {fid} runs past the end', a{fid})",
                    f"    v{fid} = doubles(c{fid})(buf, a{fid} + 4)",
                ]
                value[fid] = f"v{fid}"
            else:
                value[fid] = var
        args = ", ".join(value.get(fid, f"d{fid}") for fid in range(len(_SPOT_KINDS)))
        # A record with no string or vector field learns nothing: "()" , never "(,)".
        pieces = "".join(f"{piece}, " for piece in learned)
        lines.append(f"    return new(SpotRecord, ({args},)), ({pieces})")
        ns: Dict[str, Any] = {"u32": _u32, "doubles": _doubles_struct,
                              "DecodeError": DecodeError, "new": _new_record,
                              "SpotRecord": SpotRecord}
        ns.update({f"d{fid}": defaults[fid] for fid in range(len(_SPOT_KINDS))})
        exec("\n".join(lines), ns)
        self._scalar_slots = [fid for _, fid, kind in present if kind not in (_STR, _VEC)]
        self._defaults = defaults
        return ns["slow"]  # type: ignore[no-any-return]

    def _slow_and_learn(self, buf: bytes, tpos: int, n: int, key: Tuple[int, ...],
                        *fields: Any) -> SpotRecord:
        rec, pieces = self._slow(buf, tpos, n, *fields)
        if key not in self._shapes:
            if len(self._shapes) >= _MAX_SHAPES:
                self._shapes.clear()
            self._shapes[key] = self._compile_shape(pieces)
        return rec

    def _compile_shape(self, pieces: Sequence[Tuple[int, int, int, int]]
                       ) -> Optional[Callable[..., Optional[SpotRecord]]]:
        """One struct for every string and vector of a record, from the table's position."""
        ordered = sorted(pieces)
        if not ordered:
            return None
        fmt = ["<"]
        pos = ordered[0][0]
        start = pos
        count_idx: List[int] = []
        counts: List[int] = []
        value: Dict[int, str] = {}
        idx = 0
        for rel, count, is_str, fid in ordered:
            if rel < pos:
                return None  # shared or overlapping payloads: keep the slow path
            if rel > pos:
                fmt.append(f"{rel - pos}x")
            fmt.append("I")
            count_idx.append(idx)
            counts.append(count)
            idx += 1
            if is_str:
                fmt.append(f"{count}s")
                value[fid] = f"p[{idx}].decode()"
                idx += 1
                pos = rel + 4 + count
            else:
                fmt.append(f"{count}d")
                value[fid] = f"p[{idx}:{idx + count}]"
                idx += count
                pos = rel + 4 + 8 * count
        scalars = self._scalar_slots
        args = []
        for fid in range(len(_SPOT_KINDS)):
            if fid in value:
                args.append(value[fid])
            elif fid in scalars:
                args.append(f"f{fid}")
            else:
                args.append(f"d{fid}")
        params = "".join(f", f{fid}" for fid in scalars)
        lines = [
            f"def shape(buf, tpos{params}):",
            "    try:",
            f"        p = unpack(buf, tpos + {start})",
            "    except error:",  # a shorter record near the end: let the slow path judge
            "        return None",
            "    if counts_of(p) != counts:",
            "        return None",
            f"    return new(SpotRecord, ({', '.join(args)},))",
        ]
        ns: Dict[str, Any] = {
            "unpack": struct.Struct("".join(fmt)).unpack_from,
            "counts_of": itemgetter(*count_idx) if len(count_idx) > 1 else
            (lambda p, i=count_idx[0]: (p[i],)),
            "counts": tuple(counts) if len(counts) > 1 else (counts[0],),
            "new": _new_record, "SpotRecord": SpotRecord, "error": struct.error,
        }
        if len(count_idx) > 1:
            ns["counts"] = tuple(counts)
        ns.update({f"d{fid}": self._defaults[fid] for fid in range(len(_SPOT_KINDS))})
        exec("\n".join(lines), ns)
        return ns["shape"]  # type: ignore[no-any-return]


_MAX_SHAPES = 1024  # per vtable; a hostile stream cannot grow the cache without limit
_V5 = struct.Struct("<5d")


@lru_cache(maxsize=64)
def _doubles_struct(count: int) -> Callable[[bytes, int], Tuple[float, ...]]:
    return struct.Struct(f"<{count}d").unpack_from


class _Decoder:
    __slots__ = ("_list_plans", "_spot_plans", "_uniform", "_vec_structs")

    def __init__(self, *, uniform: bool = True) -> None:
        self._uniform = uniform  # try the column-at-a-time path first (tests turn it off)
        self._spot_plans: Dict[bytes, _Plan] = {}
        self._list_plans: Dict[bytes, _Plan] = {}
        self._vec_structs: Dict[int, struct.Struct] = {}

    def _plan(self, buf: bytes, tpos: int, cache: Dict[bytes, _Plan], kinds: Tuple[int, ...],
              defaults: Tuple[object, ...]) -> _Plan:
        vt = tpos - _i32(buf, tpos)[0]
        if vt < 0 or vt + 4 > len(buf):
            raise DecodeError("vtable outside the buffer", tpos)
        vt_size = _u16(buf, vt)[0]
        if vt_size < 4 or vt_size & 1 or vt + vt_size > len(buf):
            raise DecodeError("bad vtable size", vt)
        key = bytes(buf[vt:vt + vt_size])
        plan = cache.get(key)
        if plan is None:
            plan = _Plan(key, kinds, defaults)
            if len(cache) >= _MAX_VTABLES:
                cache.clear()
            cache[key] = plan
        if tpos + plan.table_size > len(buf):
            raise DecodeError("table runs past the end", tpos)
        return plan

    def _table(self, buf: bytes, tpos: int, plan: _Plan, doubles: bool) -> List[Any]:
        values = list(plan.getter(plan.struct.unpack_from(buf, tpos) + plan.tail))
        n = len(buf)
        for fid, off, is_str in plan.refs:
            at = tpos + off + values[fid]
            if at + 4 > n:
                raise DecodeError(f"field {fid} points outside the buffer", tpos + off)
            count = _u32(buf, at)[0]
            if is_str:
                end = at + 4 + count
                if end > n:
                    raise DecodeError(f"string field {fid} runs past the end", at)
                try:
                    values[fid] = str(buf[at + 4:end], "utf-8")
                except UnicodeDecodeError:
                    raise DecodeError(f"string field {fid} is not UTF-8", at) from None
            elif doubles:
                if at + 4 + 8 * count > n:
                    raise DecodeError(f"vector field {fid} runs past the end", at)
                st = self._vec_structs.get(count)
                if st is None:
                    st = self._vec_structs[count] = struct.Struct(f"<{count}d")
                values[fid] = st.unpack_from(buf, at + 4)
            else:
                values[fid] = (at, count)
        return values

    def decode(self, buf: Buffer, offset: int = 0) -> SpotList:
        records, head = _guarded(self._decode_body, _flat(buf, offset))
        return SpotList(records.records if isinstance(records, SpotColumns) else records,
                        head[1], head[2], head[3], head[4])

    def columns(self, buf: Buffer, offset: int = 0) -> Tuple[Union[SpotColumns, List[SpotRecord]],
                                                          List[Any]]:
        """The records of one message as :class:`SpotColumns` when their layout is uniform
        (no record objects built), else as a list of records; and the header fields."""
        return _guarded(self._decode_body, _flat(buf, offset))

    def header(self, view: Union[bytes, memoryview]) -> Tuple[List[Any], int, int, Optional[_Plan]]:
        """:meth:`locate`, raising only :class:`DecodeError`; ``view`` is not copied."""
        return _guarded(self.locate, view)

    def locate(self, buf: bytes) -> Tuple[List[Any], int, int, Optional[_Plan]]:
        """The header fields, the spot vector's base and count, and the first record's plan.

        ``head`` holds the SpotList table's fields in schema order (the spot vector as
        ``(position, count)`` or ``None``); the plan is ``None`` for an empty message.
        """
        n = len(buf)
        if n < 8:
            raise DecodeError(f"{n} bytes is too short for a SpotList")
        root = _u32(buf, 0)[0]
        if root + 4 > n:
            raise DecodeError("root offset outside the buffer", 0)
        lplan = self._plan(buf, root, self._list_plans, _LIST_KINDS, _LIST_DEFAULTS)
        head = self._table(buf, root, lplan, False)
        spot_ref = head[0]
        if spot_ref is None:
            return head, 0, 0, None
        vat, count = spot_ref
        if vat + 4 + 4 * count > n:
            raise DecodeError("spot vector runs past the end", vat)
        base = vat + 4
        if not count:
            return head, base, 0, None
        first = base + _u32(buf, base)[0]
        if first + 4 > n:
            raise DecodeError("record 0 outside the buffer", base)
        return head, base, count, self._plan(buf, first, self._spot_plans, _SPOT_KINDS,
                                             _SPOT_DEFAULTS)

    def _decode_body(self, buf: bytes) -> Tuple[Union[SpotColumns, List[SpotRecord]], List[Any]]:
        head, base, count, first_plan = self.locate(buf)
        records: List[SpotRecord] = []
        if first_plan is not None:
            n = len(buf)
            if count > 1 and self._uniform:
                if sys.modules.get("numpy") is not None:  # loaded by the application: use it
                    from relay.client._columns import spot_columns  # noqa: PLC0415

                    columns = spot_columns(buf, base, count, first_plan.table_size,
                                           first_plan.present)
                    if columns is not None:
                        return columns, head
                columns = uniform_columns(buf, base, count, first_plan.table_size,
                                          first_plan.present)
                if columns is not None:
                    return columns, head
            slots = struct.unpack_from(f"<{count}I", buf, base)
            cache = self._spot_plans
            plan_of = self._plan
            append = records.append
            last_key = None
            plan: Optional[_Plan] = None
            with _acyclic():
                for i, rel in enumerate(slots):
                    tpos = base + 4 * i + rel
                    if tpos + 4 > n:
                        raise DecodeError(f"record {i} outside the buffer", base + 4 * i)
                    # Fast path: same vtable position as the previous record (every Builder
                    # and our encoder share one vtable); the plan already checked that vtable.
                    vt = tpos - _i32(buf, tpos)[0]
                    if vt != last_key or plan is None:
                        plan = plan_of(buf, tpos, cache, _SPOT_KINDS, _SPOT_DEFAULTS)
                        last_key = vt
                    elif tpos + plan.table_size > n:
                        raise DecodeError("table runs past the end", tpos)
                    append(plan.read(buf, tpos, n))  # type: ignore[misc]  # set for Spot plans
        return records, head


def _flat(buf: Buffer, offset: int) -> bytes:
    data = buf[offset:] if offset or buf.__class__ is not bytes else buf
    return data if data.__class__ is bytes else bytes(data)


_T = TypeVar("_T")


def _guarded(fn: Callable[[Any], _T], data: Union[bytes, memoryview]) -> _T:
    """``fn(data)``, with every sign of a malformed buffer turned into DecodeError."""
    try:
        return fn(data)
    except DecodeError:
        raise
    except struct.error as exc:
        raise DecodeError(f"truncated or malformed ({exc})") from None
    except UnicodeDecodeError as exc:
        raise DecodeError(f"a string is not UTF-8 ({exc.reason})") from None


_DEFAULT = _Decoder()


def decode_spot_list(buf: Buffer, offset: int = 0) -> SpotList:
    """Decode one ``SpotList`` FlatBuffer starting at ``offset`` of ``buf``.

    Args:
        buf: the message bytes.
        offset: where the FlatBuffer starts (6 to skip the ``:spot:`` topic prefix).

    Returns:
        The records and the message's header fields.

    Raises:
        DecodeError: the buffer is truncated or malformed.
    """
    return _DEFAULT.decode(buf, offset)
