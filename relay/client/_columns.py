"""NumPy columns read straight out of uniform ``SpotList`` messages (needs NumPy).

The relay writes every record of a message with the same size, vtable and offsets (names
padded to the longest), so the records of a message are rows of one fixed stride and every
field is a strided NumPy view of the message buffer. :func:`message_columns` proves that
layout with whole-column comparisons -- every table position, soffset, reference and length
against what the first record implies -- and returns ``None`` for any other message, which
the caller then decodes record by record. No Python code runs per record:

* numbers are strided views, copied once into the batch's arrays;
* each book field is a ``(records, levels)`` view;
* a string column is cut out as a ``(records, width)`` byte matrix; ASCII columns become a
  ``str`` array with one cast, others are decoded as UTF-8 in one call for the whole column
  and their code points scattered into the ``str`` array.

:func:`batch_arrays` joins the columns of a batch's messages; :func:`records_arrays` gives
the same arrays from records (the route for messages that are not uniform). Both give
identical arrays, dtypes included (tested).
"""

from __future__ import annotations

from itertools import chain, repeat
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from relay.records import FIELDS, SpotColumns, SpotRecord

__all__ = ["MessageColumns", "batch_arrays", "message_columns", "records_arrays",
           "spot_columns"]

# Field kinds, as in _codec: string, vector of double, double, long, int, ulong.
_STR, _VEC, _F64, _I64, _I32, _U64 = range(6)
_SCALAR_DTYPE = {_F64: np.dtype("<f8"), _I64: np.dtype("<i8"), _I32: np.dtype("<i4")}
_U32 = np.dtype("<u4")
_I32_DT = np.dtype("<i4")
_U8 = np.dtype("u1")
_F8 = np.dtype("<f8")
_STRING_NAMES = FIELDS[0:4]
_DOUBLE_NAMES = FIELDS[4:11]
_BOOK_NAMES = FIELDS[11:15]
_OPTIONAL_NAMES = FIELDS[15:18]
_EMPTY_STR = np.dtype("U1")


class MessageColumns:
    """The records of one uniform message, as NumPy arrays over (or from) its buffer.

    Attributes:
        n: number of records.
        strings: market, code, name, datetime as ``str`` arrays.
        chars: the length of each of those strings, in characters (a ``str`` array drops
            trailing NULs, so it cannot tell).
        doubles: the seven double fields, ``None`` where the vtable lacks one (the schema
            default 0.0 applies).
        books: bid, bid_amount, ask, ask_amount as ``(n, levels)`` views.
        optional: time_ms, status, trade_count views, ``None`` where absent.
    """

    __slots__ = ("books", "chars", "doubles", "n", "optional", "strings")

    def __init__(self, n: int, strings: List[Any], chars: List[Any], doubles: List[Any],
                 books: List[Any], optional: List[Any]) -> None:
        self.n = n
        self.strings = strings
        self.chars = chars
        self.doubles = doubles
        self.books = books
        self.optional = optional

    def select(self, index: Any) -> MessageColumns:
        """The records at positions ``index`` (copies)."""
        def pick(views: List[Any]) -> List[Any]:
            return [None if view is None else view[index] for view in views]

        return MessageColumns(len(index), pick(self.strings), pick(self.chars),
                              pick(self.doubles), pick(self.books), pick(self.optional))


def _empty(n: int) -> MessageColumns:
    return MessageColumns(n, [np.zeros(n, _EMPTY_STR) for _ in range(4)],
                          [np.zeros(n, np.int64) for _ in range(4)], [None] * 7,
                          [np.zeros((n, 0)) for _ in range(4)], [None] * 3)


def _strided(buf: bytes, at: int, count: int, size: int, dtype: Any) -> Any:
    """``count`` values of ``dtype``, ``size`` bytes apart from ``at`` (a read-only view)."""
    return np.ndarray((count,), dtype, buf, at, (size,))


def message_columns(buf: bytes, base: int, count: int, table_size: int,
                    present: Sequence[Tuple[int, int, int]]) -> Optional[MessageColumns]:
    """Read ``count`` Spot records as NumPy columns, or ``None`` if the layout is not uniform.

    Never raises for a malformed buffer: anything unexpected gives ``None`` and the record
    decoder, which then reads the message, says what is wrong.

    Args:
        buf: the SpotList FlatBuffer.
        base: position of the spot vector's first offset (just after its count).
        count: number of records (the vector already checked to lie inside ``buf``).
        table_size: the first record's vtable's table size.
        present: ``(offset in table, field id, kind)`` of every field that vtable has.
    """
    if not count:
        return _empty(0)
    n = len(buf)
    slots = np.frombuffer(buf, _U32, count, base)
    first = base + int(slots[0])
    if count > 1:
        size = base + 4 + int(slots[1]) - first
        steps = np.arange(count, dtype=np.int64)
        if not np.array_equal(slots, int(slots[0]) + steps * (size - 4)):
            return None
    else:
        size = n - first
        steps = np.zeros(1, dtype=np.int64)
    if size < max(table_size, 4) or first + count * size > n:
        return None
    soffsets = _strided(buf, first, count, size, _I32_DT)
    if count > 1 and not np.array_equal(soffsets, int(soffsets[0]) + steps * size):
        return None  # not every record points at the first record's vtable
    strings: List[Any] = [None] * 4
    chars: List[Any] = [None] * 4
    doubles: List[Any] = [None] * 7
    books: List[Any] = [None] * 4
    optional: List[Any] = [None] * 3
    pieces: List[Tuple[int, int]] = []  # (start, end) of every payload, relative to a record
    for off, fid, kind in present:
        if kind in _SCALAR_DTYPE:
            view = _strided(buf, first + off, count, size, _SCALAR_DTYPE[kind])
            if fid < 11:
                doubles[fid - 4] = view
            else:
                optional[fid - 15] = view
            continue
        refs = _strided(buf, first + off, count, size, _U32)
        ref = int(refs[0])
        if count > 1 and not (refs == ref).all():
            return None  # not the same relative position in every record
        rel = off + ref
        if rel < table_size or rel + 4 > size:
            return None
        lengths = _strided(buf, first + rel, count, size, _U32)
        if kind == _VEC:
            depth = int(lengths[0])
            end = rel + 4 + 8 * depth
            if end > size or (count > 1 and not (lengths == depth).all()):
                return None
            books[fid - 11] = np.ndarray((count, depth), _F8, buf, first + rel + 4, (size, 8))
        else:
            width = int(lengths.max())
            end = rel + 4 + width
            if end > size:
                return None
            matrix = np.ndarray((count, width), _U8, buf, first + rel + 4, (size, 1))
            text = _text(matrix, lengths)
            if text is None:
                return None
            strings[fid], chars[fid] = text
        pieces.append((rel, end))
    pieces.sort()
    for (_, end), (start, _) in zip(pieces, pieces[1:]):
        if start < end:
            return None  # overlapping payloads: leave it to the record decoder
    for k in range(4):
        if strings[k] is None:
            strings[k] = np.zeros(count, _EMPTY_STR)
            chars[k] = np.zeros(count, np.int64)
        if books[k] is None:
            books[k] = np.zeros((count, 0))
    return MessageColumns(count, strings, chars, doubles, books, optional)


def _text(matrix: Any, lengths: Any) -> Optional[Tuple[Any, Any]]:
    """A ``(count, width)`` matrix of UTF-8 bytes (``lengths`` of them used) as a str array,
    and the length of each value in characters; ``None`` if a value is not valid UTF-8."""
    count, width = matrix.shape
    if not width:
        return np.zeros(count, _EMPTY_STR), np.zeros(count, np.int64)
    # Bytes past a value's length are not part of it; when every value fills the width
    # (codes, dates) there is nothing to mask.
    data = (matrix if int(lengths.min()) == width
            else matrix * (np.arange(width) < lengths[:, None]))
    if int(data.max()) < 0x80:  # ASCII: each byte is its code point
        return data.astype(_U32, order="C").view(f"<U{width}").reshape(count), lengths
    # Names are the same message after message (the same securities, in the same order):
    # a column decoded before is taken from the memo, keyed by its bytes and lengths.
    if count * (width + 4) > _MEMO_COLUMN_BYTES:
        return _utf8_text(data, lengths)
    key = (count, width, data.tobytes() + lengths.astype(_U32).tobytes())
    known = _DECODED.get(key)
    if known is not None:
        return known
    decoded = _utf8_text(data, lengths)
    if decoded is not None:
        for column in decoded:
            column.flags.writeable = False  # shared by every message with this column
        _DECODED.put(key, decoded, len(key[2]) + sum(column.nbytes for column in decoded))
    return decoded


class _ColumnMemo:
    """Decoded UTF-8 string columns by ``(records, width, bytes + lengths)``; bounded by the
    bytes it holds (started over when full), so a hostile stream cannot grow it."""

    __slots__ = ("_bytes", "_items", "_limit")

    def __init__(self, limit: int) -> None:
        self._items: Dict[Tuple[int, int, bytes], Tuple[Any, Any]] = {}
        self._bytes = 0
        self._limit = limit

    def get(self, key: Tuple[int, int, bytes]) -> Optional[Tuple[Any, Any]]:
        return self._items.get(key)

    def put(self, key: Tuple[int, int, bytes], value: Tuple[Any, Any], size: int) -> None:
        if self._bytes + size > self._limit:
            self._items.clear()
            self._bytes = 0
        self._items[key] = value
        self._bytes += size


_MEMO_COLUMN_BYTES = 1 << 20  # larger columns (not the relay's 512 KiB messages) are not kept
_DECODED = _ColumnMemo(16 << 20)


def _utf8_text(data: Any, lengths: Any) -> Optional[Tuple[Any, Any]]:
    """:func:`_text` for a column that is not all ASCII (``data`` masked to the lengths)."""
    count, width = data.shape
    # UTF-8: one decode for the whole column. A zero byte after every value keeps each value
    # apart, so the column decodes if and only if every value does on its own.
    padded = np.zeros((count, width + 1), _U8)
    padded[:, :width] = data
    try:
        points = np.frombuffer(padded.tobytes().decode().encode("utf-32-le"), _U32)
    except UnicodeDecodeError:
        return None
    # Characters per value: its bytes minus its continuation bytes (10xxxxxx). In the decoded
    # column, value i is followed by the zeros after it; its characters start where the
    # characters and zeros of the values before it end.
    lengths = lengths.astype(np.int64)
    chars = lengths - np.count_nonzero(data.view(np.int8) < -64, axis=1)  # 0x80..0xBF
    taken = chars + (width + 1) - lengths
    starts = np.cumsum(taken) - taken
    most = int(chars.max()) or 1
    index = np.arange(most)
    out = points.take(starts[:, None] + index, mode="clip")
    out *= index < chars[:, None]
    return out.view(f"<U{most}").reshape(count), chars


def spot_columns(buf: bytes, base: int, count: int, table_size: int,
                 present: Sequence[Tuple[int, int, int]]) -> Optional[SpotColumns]:
    """:func:`message_columns` as :class:`~relay.records.SpotColumns` (which builds records
    with plain Python values), or ``None`` where :func:`message_columns` gives ``None``, the
    book depths differ or a string ends in NUL."""
    cols = message_columns(buf, base, count, table_size, present)
    if cols is None:
        return None
    depths = {book.shape[1] for book in cols.books}
    if len(depths) != 1:
        return None
    for text, chars in zip(cols.strings, cols.chars):
        points = text.view(_U32).reshape(count, -1)
        last = points[np.arange(count), np.maximum(chars, 1) - 1]
        if ((last == 0) & (chars > 0)).any():
            return None  # a value ends in NUL, which its str array element has lost
    columns: List[Any] = [_values(text) for text in cols.strings]
    columns += [[0.0] * count if view is None else view for view in cols.doubles]
    columns += [_contiguous(book).reshape(-1) for book in cols.books]
    columns += [[None] * count if view is None else view for view in cols.optional]
    if cols.optional[0] is not None:  # timestamps often come in runs: shared ints
        columns[15] = _values(cols.optional[0])
    return SpotColumns(count, depths.pop(), columns)


def _values(column: Any) -> List[Any]:
    """A 1-D array as a list of Python values; a run of equal values shares one object.

    A message's market column comes in long runs (SH, then SZ), and its timestamps often do
    (a snapshot at one second): one string or int per run instead of one per record saves
    making and later freeing thousands of objects. Columns with many runs (codes, names)
    are converted value by value, after one vectorised comparison.
    """
    count = len(column)
    if count < 64:
        return column.tolist()  # type: ignore[no-any-return]
    changes = np.flatnonzero(column[1:] != column[:-1]) + 1
    if len(changes) * 16 > count:
        return column.tolist()  # type: ignore[no-any-return]
    starts = np.concatenate(([0], changes))
    lengths = np.diff(np.append(starts, count))
    return list(chain.from_iterable(map(repeat, column[starts].tolist(), lengths.tolist())))


def batch_arrays(parts: Sequence[MessageColumns],
                 positions: Optional[Any] = None) -> Dict[str, Any]:
    """The columns of a batch's messages joined into one array per field.

    Args:
        parts: the messages' columns, in batch order.
        positions: keep only the records at these positions (the batch's code filter).
    """
    if positions is not None:
        parts = _select(parts, positions)
    parts = [part for part in parts if part.n]  # an empty message decides no dtype
    total = sum(part.n for part in parts)
    out: Dict[str, Any] = {}
    for k, name in enumerate(_STRING_NAMES):
        if not parts:
            out[name] = np.zeros(0, _EMPTY_STR)
            continue
        col = np.concatenate([part.strings[k] for part in parts])
        if positions is None:  # each str array is as wide as its longest value
            width = max(part.strings[k].dtype.itemsize for part in parts) // 4
        else:  # the records kept may all be shorter
            width = max(int(part.chars[k].max()) for part in parts) or 1
        out[name] = col if col.dtype.itemsize == 4 * width else col.astype(f"<U{width}")
    # Allocate every numeric column, then fill them message by message: all fields of a
    # message are gathered while its buffer is in the CPU cache.
    numeric: List[Tuple[Any, int, Any]] = []  # (output, kind, fill for an absent field)
    for k, name in enumerate(_DOUBLE_NAMES):
        out[name] = np.empty(total)
        numeric.append((out[name], k, 0.0))
    for k, name in enumerate(_BOOK_NAMES):
        levels = max((part.books[k].shape[1] for part in parts), default=0)
        out[name] = np.empty((total, levels))
        numeric.append((out[name], 7 + k, np.nan))
    for k, name in enumerate(_OPTIONAL_NAMES):
        carried = [part.optional[k] is not None for part in parts]
        if any(carried):  # else no record carries it: left out, as from records
            out[name] = np.empty(total, np.int64) if all(carried) else np.empty(total)
            numeric.append((out[name], 11 + k, np.nan))
    at = 0
    for part in parts:
        end = at + part.n
        views = part.doubles + part.books + part.optional
        for col, k, fill in numeric:
            view = views[k]
            if view is None:
                col[at:end] = fill
            elif col.ndim == 1:
                col[at:end] = view
            else:
                depth = view.shape[1]
                if depth == col.shape[1] and depth:
                    # Each record's book is `depth` contiguous doubles: copied as one item
                    # each (a strided copy of whole rows is ~2x faster than per double).
                    _rows_of(col[at:end])[...] = _rows_of(view)
                    continue
                col[at:end, :depth] = view
                if depth < col.shape[1]:
                    col[at:end, depth:] = fill
        at = end
    return out


def _rows_of(matrix: Any) -> Any:
    """A ``(n, depth)`` float64 array whose rows are contiguous as ``n`` opaque items of
    ``8 * depth`` bytes (a view of the same memory)."""
    return matrix.view(f"V{8 * matrix.shape[1]}")[:, 0]


def _contiguous(matrix: Any) -> Any:
    """A C-contiguous copy of a ``(n, depth)`` float64 view, record by record (see
    :func:`_rows_of`)."""
    if not matrix.shape[1]:
        return np.zeros(matrix.shape)
    out = np.empty(matrix.shape)
    _rows_of(out)[...] = _rows_of(matrix)
    return out


def _select(parts: Sequence[MessageColumns], positions: Any) -> List[MessageColumns]:
    """Each part cut down to the records at ``positions`` of the whole batch."""
    out = []
    start = 0
    for part in parts:
        end = start + part.n
        local = positions[(positions >= start) & (positions < end)] - start
        out.append(part.select(local))
        start = end
    return out


def records_arrays(records: Sequence[SpotRecord]) -> Dict[str, Any]:
    """The same arrays as :func:`batch_arrays`, from records."""
    n = len(records)
    cols: List[Any] = list(zip(*records)) if n else [()] * len(FIELDS)
    out: Dict[str, Any] = {}
    for i, name in enumerate(_STRING_NAMES):
        out[name] = np.array(cols[i], dtype=str) if n else np.zeros(0, _EMPTY_STR)
    for i, name in enumerate(_DOUBLE_NAMES, 4):
        out[name] = np.fromiter(cols[i], dtype=np.float64, count=n)
    for i, name in enumerate(_BOOK_NAMES, 11):
        out[name] = _book_array(cols[i], n)
    for i, name in enumerate(_OPTIONAL_NAMES, 15):
        col = cols[i]
        if None not in col:
            if n:
                out[name] = np.fromiter(col, dtype=np.int64, count=n)
        elif any(v is not None for v in col):
            out[name] = np.array([np.nan if v is None else v for v in col], dtype=np.float64)
    return out


def _book_array(col: Sequence[Tuple[float, ...]], n: int) -> Any:
    depths = set(map(len, col))
    if len(depths) <= 1:
        levels = depths.pop() if depths else 0
        flat = np.fromiter(chain.from_iterable(col), dtype=np.float64, count=n * levels)
        return flat.reshape(n, levels)
    levels = max(depths)
    arr = np.full((n, levels), np.nan)
    for i, book in enumerate(col):
        arr[i, :len(book)] = book
    return arr
