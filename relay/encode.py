"""SpotRecords -> ``SpotList`` FlatBuffers messages, chunked under a size limit.

The encoder writes the FlatBuffers binary format directly, front to back, rather than through
``flatbuffers.Builder``: every record of a message shares one vtable and one fixed table
layout. When every record of a batch has the same byte size (the normal case: names padded to
the longest), the message's records are a numpy structured array laid over the buffer and
each field is written for all records at once; otherwise a record costs one
``Struct.pack_into`` call. The output is an
ordinary FlatBuffer for ``schemas/spot.fbs`` -- the generated accessors, hikyuu's C++ agent
and any verifier read it -- with every scalar naturally aligned relative to the buffer start.

Message layout (offsets relative to the FlatBuffer, which follows the 6-byte ``:spot:``
prefix)::

    0    uoffset -> SpotList table
    4    SpotList vtable (14 bytes, padded to 16)
    20   Spot vtable, all fields present (40 bytes)
    60   SpotList table: soffset, seq u64, publish_time_ms i64, 3 uoffsets
    92   run_id string, source string
    ...  spot vector: count + one uoffset per record
    ...  per record (each table at a position = 4 mod 8): the 112-byte Spot table, then its
         four double vectors and four strings; a vtable for records that lack some optional
         field is written once, just before the first record that needs it.
"""

from __future__ import annotations

import struct
from typing import Any, Dict, Generator, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from relay.records import Memo, SpotColumns, SpotRecord
from relay.wire import SPOT_PREFIX

__all__ = ["SpotEncoder", "encode_spot_list"]

# Spot table: field id -> offset inside the table (the soffset to the vtable is at 0).
_SPOT_TABLE_SIZE = 112
_SPOT_FMT = "<i7dqqi8I"  # soffset, 7 doubles, time_ms, trade_count, status, 8 uoffsets
_SPOT_OFFSETS = (
    80, 84, 88, 92,                 # 0-3   market, code, name, datetime
    4, 12, 20, 28, 36, 44, 52,      # 4-10  yesterday_close .. volume
    96, 100, 104, 108,              # 11-14 bid, bid_amount, ask, ask_amount
    60, 76, 68,                     # 15-17 time_ms, status, trade_count
)
_UOFFSET_FIELDS = (80, 84, 88, 92, 96, 100, 104, 108)
_SPOT_VTABLE_SIZE = 4 + 2 * len(_SPOT_OFFSETS)  # 40
_OPTIONAL_IDS = (15, 16, 17)
_DOUBLES = ("yesterday_close", "open", "high", "low", "close", "amount", "volume")
_BOOK_NAMES = ("bid", "bid_amount", "ask", "ask_amount")
_INT_NAMES = ("time_ms", "trade_count", "status")

_SPOTLIST_VT_POS = 4
_SPOT_VT_POS = 20
_SPOTLIST_TABLE_POS = 60
# SpotList table: soffset, seq, publish_time_ms, spot, run_id, source.
_SPOTLIST_FMT = struct.Struct("<iQqIII")
_SPOTLIST_VTABLE = struct.pack("<7H", 14, 32, 20, 4, 24, 28, 12) + b"\0\0"
_HEADER_END = _SPOTLIST_TABLE_POS + _SPOTLIST_FMT.size  # 92
_PREFIX_LEN = len(SPOT_PREFIX)


def _spot_vtable(present: Tuple[bool, bool, bool]) -> bytes:
    offsets = list(_SPOT_OFFSETS)
    for fid, keep in zip(_OPTIONAL_IDS, present):
        if not keep:
            offsets[fid] = 0
    return struct.pack(f"<{2 + len(offsets)}H", _SPOT_VTABLE_SIZE, _SPOT_TABLE_SIZE, *offsets)


_FULL_VTABLE = _spot_vtable((True, True, True))


Records = Union[Sequence[SpotRecord], SpotColumns]
"""What the encoder takes: records, or the same as columns (the fast path)."""

_Item = Tuple[SpotRecord, "_Layout", Tuple[bytes, bytes, bytes, bytes]]


def _pad4(n: int) -> int:
    return (n + 3) & ~3


class _Layout:
    """Byte layout of one record for a given set of string and vector lengths."""

    __slots__ = ("_dtype", "size", "str_pos", "str_widths", "struct", "uoffsets", "vec_pos")

    def __init__(self, str_lens: Tuple[int, int, int, int], vec_lens: Tuple[int, ...]) -> None:
        # The table starts at a position = 4 (mod 8); ``pos`` tracks that invariant below.
        fmt = [_SPOT_FMT]
        pos = _SPOT_TABLE_SIZE
        vec_pos: List[int] = []
        for n in vec_lens:
            if pos % 8 != 0:  # the count sits 4 bytes before 8-aligned doubles
                fmt.append("4x")
                pos += 4
            vec_pos.append(pos)
            fmt.append(f"I{n}d")
            pos += 4 + 8 * n
        str_pos: List[int] = []
        for n in str_lens:
            str_pos.append(pos)
            width = _pad4(n + 1)  # bytes, NUL terminator, padding to 4
            fmt.append(f"I{width}s")
            pos += 4 + width
        if pos % 8 != 0:  # keep the next table at 4 (mod 8)
            fmt.append("4x")
            pos += 4
        self.vec_pos = tuple(vec_pos)
        self.str_pos = tuple(str_pos)
        self.str_widths = tuple(_pad4(n + 1) for n in str_lens)
        targets = str_pos + vec_pos  # in uoffset field order: 4 strings, then 4 vectors
        self.uoffsets = tuple(t - f for t, f in zip(targets, _UOFFSET_FIELDS))
        self.struct = struct.Struct("<" + "".join(f.lstrip("<") for f in fmt))
        self.size = pos
        assert self.struct.size == pos, (self.struct.size, pos)
        self._dtype: Optional[np.dtype[Any]] = None

    def dtype(self, levels: int) -> np.dtype[Any]:
        """This layout as a numpy structured dtype (every book ``levels`` deep): one item is
        one record, table and vectors and strings, fields at their byte offsets."""
        if self._dtype is None:
            fields: Dict[str, Tuple[Any, int]] = {"vtable": ("<i4", 0)}
            for name, offset in zip(_DOUBLES, range(4, 60, 8)):
                fields[name] = ("<f8", offset)
            fields["time_ms"] = ("<i8", 60)
            fields["trade_count"] = ("<i8", 68)
            fields["status"] = ("<i4", 76)
            fields["uoffsets"] = (("<u4", 8), 80)
            for k, pos in enumerate(self.vec_pos):
                fields[f"n{k}"] = ("<u4", pos)
                if levels:
                    fields[f"v{k}"] = (("<f8", levels), pos + 4)
            for k, (pos, width) in enumerate(zip(self.str_pos, self.str_widths)):
                fields[f"len{k}"] = ("<u4", pos)
                fields[f"s{k}"] = (f"S{width}", pos + 4)
            self._dtype = np.dtype({"names": list(fields),
                                    "formats": [f[0] for f in fields.values()],
                                    "offsets": [f[1] for f in fields.values()],
                                    "itemsize": self.size})
        return self._dtype


class SpotEncoder:
    """Encodes records into ``:spot:``-prefixed ``SpotList`` messages.

    Args:
        run_id: this relay run's id, sent in every message.
        source: the source kind (``"qmt"``, ``"simulator"``, ``"replay"``).
        max_message_bytes: no message (prefix included) is larger than this.
    """

    __slots__ = ("_bytes", "_header_strings", "_layouts", "_max", "_scratch", "_source_rel",
                 "_strings_size")

    def __init__(self, run_id: str, source: str, max_message_bytes: int = 512 * 1024) -> None:
        if max_message_bytes < 4096:
            raise ValueError("max_message_bytes must be at least 4096")
        self._max = max_message_bytes
        self._layouts: Dict[Tuple[int, ...], _Layout] = {}
        self._bytes = Memo(str.encode)  # codes, names and timestamps repeat all day
        run_b, src_b = run_id.encode(), source.encode()
        run_obj = struct.pack(f"<I{_pad4(len(run_b) + 1)}s", len(run_b), run_b)
        src_obj = struct.pack(f"<I{_pad4(len(src_b) + 1)}s", len(src_b), src_b)
        self._header_strings = run_obj + src_obj
        self._strings_size = len(self._header_strings)
        self._source_rel = len(run_obj)  # where the source string starts, after run_id
        # A message buffer kept between batches: writing a fresh one touches fresh pages
        # (a page fault every 4 KiB). A list, so that a batch takes it with one pop() and a
        # second batch encoded at the same time (another thread) makes its own.
        self._scratch: List[bytearray] = []

    def _layout(self, key: Tuple[int, ...]) -> _Layout:
        layout = self._layouts.get(key)
        if layout is None:
            layout = _Layout(key[:4], key[4:])  # type: ignore[arg-type]
            self._layouts[key] = layout
        return layout

    def encode(
        self, records: Records, *, first_seq: int, publish_time_ms: int
    ) -> List[bytes]:
        """Encode ``records`` into one or more messages, numbered from ``first_seq``.

        Always returns at least one message (an empty ``SpotList`` for no records). Each
        message is ``b":spot:" + SpotList``.
        """
        return list(self.iter_messages(records, first_seq=first_seq,
                                       publish_time_ms=publish_time_ms))

    def encode_chunks(
        self, records: Records, *, first_seq: int, publish_time_ms: int
    ) -> Tuple[List[bytes], List[int]]:
        """Like :meth:`encode`, also returning how many records went into each message."""
        chunks = list(self.iter_chunks(records, first_seq=first_seq,
                                       publish_time_ms=publish_time_ms))
        return [m for m, _ in chunks], [n for _, n in chunks]

    def iter_messages(
        self, records: Records, *, first_seq: int, publish_time_ms: int
    ) -> Iterator[bytes]:
        """Yield the messages one at a time, so the first can be sent while the rest encode."""
        for message, _ in self.iter_chunks(records, first_seq=first_seq,
                                           publish_time_ms=publish_time_ms):
            yield message

    def iter_chunks(
        self, records: Records, *, first_seq: int, publish_time_ms: int
    ) -> Iterator[Tuple[bytes, int]]:
        """Yield ``(message, record count)`` pairs one message at a time.

        ``records`` may be a sequence of :class:`SpotRecord` or a :class:`SpotColumns`.
        """
        columns = records if isinstance(records, SpotColumns) else (
            SpotColumns.from_records(records) if len(records) > 1 else None)
        if columns is not None and columns.n:
            plan = self._uniform_plan(columns)
            if plan is not None:
                yield from self._iter_uniform(columns, plan, first_seq, publish_time_ms)
                return
        if isinstance(records, SpotColumns):
            records = records.records
        items, cuts = self._prepare(records)
        for seq, (a, b) in enumerate(zip([0, *cuts], cuts), first_seq):
            yield self._message(items[a:b], seq, publish_time_ms), b - a

    def _header(self, n: int, seq: int, publish_time_ms: int, body: int,
                scratch: Optional[bytearray] = None) -> Tuple[bytearray, int, int]:
        """A message buffer for ``n`` records with its header written.

        Writes the prefix, vtables, SpotList table, strings and the spot vector's count, in a
        zeroed buffer with room for ``body`` more bytes after the first record's position:
        the start of ``scratch`` if it is large enough (zeroed here), else a new buffer.
        Returns the buffer, the spot vector's position and the position of the first record
        table, both relative to the FlatBuffer.
        """
        vec_pos = _HEADER_END + self._strings_size
        pos = vec_pos + 4 + 4 * n
        if pos % 8 != 4:
            pos += 4
        p = _PREFIX_LEN
        total = p + pos + body
        if scratch is not None and len(scratch) >= total:
            buf = scratch
            np.frombuffer(buf, np.uint8, total).fill(0)
        else:
            buf = bytearray(total)
        buf[:p] = SPOT_PREFIX
        struct.pack_into("<I", buf, p, _SPOTLIST_TABLE_POS)
        buf[p + _SPOTLIST_VT_POS:p + _SPOTLIST_VT_POS + 16] = _SPOTLIST_VTABLE
        buf[p + _SPOT_VT_POS:p + _SPOT_VT_POS + _SPOT_VTABLE_SIZE] = _FULL_VTABLE
        _SPOTLIST_FMT.pack_into(
            buf, p + _SPOTLIST_TABLE_POS,
            _SPOTLIST_TABLE_POS - _SPOTLIST_VT_POS, seq, publish_time_ms,
            vec_pos - (_SPOTLIST_TABLE_POS + 20),
            _HEADER_END - (_SPOTLIST_TABLE_POS + 24),
            _HEADER_END + self._source_rel - (_SPOTLIST_TABLE_POS + 28),
        )
        buf[p + _HEADER_END:p + vec_pos] = self._header_strings
        struct.pack_into("<I", buf, p + vec_pos, n)
        return buf, vec_pos, pos

    def _uniform_plan(self, cols: SpotColumns) -> Optional[_UniformPlan]:
        """How to pack ``cols`` column-wise, or ``None`` if its records' layouts differ.

        Uniform means: every optional field present, and the same byte length for market,
        code and datetime in every record (names may differ: they are padded to the
        longest). Book depth is uniform in a :class:`SpotColumns` by construction.
        """
        # A None, or an int too large for int64, makes an object array: not uniform.
        ints = [np.asarray(getattr(cols, name)) for name in _INT_NAMES]
        if any(col.dtype.kind != "i" for col in ints):
            return None
        status = ints[2]
        if status.min() < -(1 << 31) or status.max() >= 1 << 31:
            return None  # not an int32: the record path refuses it (numpy would wrap it)
        memo = self._bytes.__getitem__
        wire = cols.wire or {}
        strings: List[Tuple[Any, Any]] = []
        key: List[int] = []
        for name in ("market", "code", "name", "datetime"):
            if name in wire:
                lengths, padded = wire[name]
            else:
                data = list(map(memo, getattr(cols, name)))
                lengths = np.array(list(map(len, data)), dtype=np.uint32)
                # numpy pads each value with NULs to the array's width
                padded = np.array(data, dtype=f"S{int(lengths.max()) or 1}")
            width = padded.dtype.itemsize  # names are padded to the longest
            if name != "name" and (int(lengths.min()) != width or int(lengths.max()) != width):
                return None
            strings.append((lengths, padded))
            key.append(width)
        levels = cols.levels
        layout = self._layout((*key, levels, levels, levels, levels))
        return _UniformPlan(layout, strings, ints)

    def _iter_uniform(self, cols: SpotColumns, plan: _UniformPlan, first_seq: int,
                      publish_time_ms: int) -> Iterator[Tuple[bytes, int]]:
        """Fast path: every record has the same layout, so whole columns are written at once.

        Names are padded to the batch's widest name (a FlatBuffers string may be followed by
        padding), which makes every record the same size. The records of a message are then
        one numpy structured array laid over the message buffer (:meth:`_Layout.dtype`), and
        each field is written for every record with one assignment: no Python code runs per
        record, and the soffsets and the spot vector's offsets are arithmetic progressions.
        """
        n = cols.n
        dtype = plan.layout.dtype(cols.levels)
        header = _PREFIX_LEN + _HEADER_END + self._strings_size + 4 + 4
        per_message = max(1, (self._max - header) // (plan.layout.size + 4))
        doubles = [np.asarray(getattr(cols, name), dtype=np.float64) for name in _DOUBLES]
        books = [np.asarray(getattr(cols, name), dtype=np.float64).reshape(n, cols.levels)
                 for name in _BOOK_NAMES]
        pool = self._scratch
        buf = pool.pop() if pool else None
        try:
            for seq, start in enumerate(range(0, n, per_message), first_seq):
                end = min(n, start + per_message)
                buf = yield from self._uniform_message(
                    cols, plan, dtype, doubles, books, buf, seq, start, end, publish_time_ms)
        finally:
            if buf is not None and not pool:
                pool.append(buf)

    def _uniform_message(self, cols: SpotColumns, plan: _UniformPlan, dtype: np.dtype[Any],
                         doubles: List[Any], books: List[Any], scratch: Optional[bytearray],
                         seq: int, start: int, end: int,
                         publish_time_ms: int) -> Generator[Tuple[bytes, int], None, bytearray]:
        """Records ``start:end`` as one message, written in ``scratch`` when it is large
        enough; yields the message and returns the buffer it used, for the next message."""
        layout = plan.layout
        size = layout.size
        levels = cols.levels
        count = end - start
        buf, vec_pos, first = self._header(count, seq, publish_time_ms, count * size, scratch)
        slot0 = first - (vec_pos + 4)
        at = _PREFIX_LEN + vec_pos + 4
        np.frombuffer(buf, np.uint32, count, at)[:] = np.arange(
            slot0, slot0 + count * (size - 4), size - 4, dtype=np.uint32)
        rec = np.frombuffer(buf, dtype, count, _PREFIX_LEN + first)
        rec["vtable"] = np.arange(first - _SPOT_VT_POS, first - _SPOT_VT_POS + count * size,
                                  size, dtype=np.int32)
        for name, col in zip(_DOUBLES, doubles):
            rec[name] = col[start:end]
        for name, col in zip(_INT_NAMES, plan.ints):
            rec[name] = col[start:end]
        rec["uoffsets"] = layout.uoffsets
        for k, col in enumerate(books):
            rec[f"n{k}"] = levels
            if levels:
                rec[f"v{k}"] = col[start:end]
        for k, (lengths, data) in enumerate(plan.strings):
            rec[f"len{k}"] = lengths[start:end]
            rec[f"s{k}"] = data[start:end]
        total = _PREFIX_LEN + first + count * size
        with memoryview(buf) as view:
            yield bytes(view[:total]), count
        return buf

    def _prepare(self, records: Sequence[SpotRecord]) -> Tuple[List[_Item], List[int]]:
        """Each record's layout (cached by string/vector lengths) and the message cut points."""
        encoded: List[_Item] = []
        cuts: List[int] = []
        header = _PREFIX_LEN + _HEADER_END + self._strings_size + 4 + 8  # + count + align slack
        budget = self._max - header
        used = 0
        layouts = self._layouts
        for rec in records:
            strs = (rec[0].encode(), rec[1].encode(), rec[2].encode(), rec[3].encode())
            key = (
                len(strs[0]), len(strs[1]), len(strs[2]), len(strs[3]),
                len(rec[11]), len(rec[12]), len(rec[13]), len(rec[14]),
            )
            layout = layouts.get(key) or self._layout(key)
            cost = layout.size + 4
            if rec[15] is None or rec[16] is None or rec[17] is None:
                cost += _SPOT_VTABLE_SIZE  # may need a vtable of its own
            if used + cost > budget and used:
                cuts.append(len(encoded))
                used = 0
            used += cost
            encoded.append((rec, layout, strs))
        cuts.append(len(encoded))
        return encoded, cuts

    def _message(
        self,
        items: Sequence[_Item],
        seq: int,
        publish_time_ms: int,
    ) -> bytes:
        n = len(items)
        # room for every record plus the vtables of up to 7 other optional-field variants
        body = sum(item[1].size for item in items) + _SPOT_VTABLE_SIZE * 8
        buf, vec_pos, pos = self._header(n, seq, publish_time_ms, body)
        p = _PREFIX_LEN
        vtables: Dict[Tuple[bool, bool, bool], int] = {(True, True, True): _SPOT_VT_POS}
        slot = vec_pos + 4
        pack_slot = struct.Struct("<I").pack_into
        for rec, layout, strs in items:
            tm, st, tc = rec[15], rec[16], rec[17]
            if tm is None or st is None or tc is None:
                variant = (tm is not None, st is not None, tc is not None)
                vt = vtables.get(variant)
                if vt is None:
                    vt = vtables[variant] = pos
                    buf[p + pos:p + pos + _SPOT_VTABLE_SIZE] = _spot_vtable(variant)
                    pos += _SPOT_VTABLE_SIZE
                tm, st, tc = tm or 0, st or 0, tc or 0
            else:
                vt = _SPOT_VT_POS
            pack_slot(buf, p + slot, pos - slot)
            slot += 4
            bid, bid_amount, ask, ask_amount = rec[11], rec[12], rec[13], rec[14]
            layout.struct.pack_into(
                buf, p + pos,
                pos - vt, rec[4], rec[5], rec[6], rec[7], rec[8], rec[9], rec[10],
                tm, tc, st, *layout.uoffsets,
                len(bid), *bid, len(bid_amount), *bid_amount,
                len(ask), *ask, len(ask_amount), *ask_amount,
                len(strs[0]), strs[0], len(strs[1]), strs[1],
                len(strs[2]), strs[2], len(strs[3]), strs[3],
            )
            pos += layout.size
        return bytes(memoryview(buf)[:p + pos])


class _UniformPlan:
    __slots__ = ("ints", "layout", "strings")

    def __init__(self, layout: _Layout, strings: List[Tuple[Any, Any]], ints: List[Any]) -> None:
        self.layout = layout
        self.strings = strings  # (lengths, NUL-padded bytes) per string field, numpy arrays
        self.ints = ints  # time_ms, trade_count, status as numpy int arrays


def encode_spot_list(
    records: Sequence[SpotRecord],
    *,
    seq: int = 1,
    run_id: str = "",
    source: str = "",
    publish_time_ms: Optional[int] = None,
) -> bytes:
    """Encode ``records`` as one bare ``SpotList`` FlatBuffer (no topic prefix, no size limit).

    A convenience for tests and tools; the relay itself uses :class:`SpotEncoder`.
    """
    enc = SpotEncoder(run_id, source, max_message_bytes=1 << 62)
    (msg,) = enc.encode(records, first_seq=seq, publish_time_ms=publish_time_ms or 0)
    return msg[_PREFIX_LEN:]
