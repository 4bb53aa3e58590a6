"""hikyuu's HDF5 K-line layout: writer and reader of one market+period file.

The layout (the contract, see DESIGN.md "History"):

- one file per market and period, lower case: ``sh_day.h5``, ``sz_1min.h5``, ``bj_5min.h5``;
- one table per security under ``/data``, named market upper case + code (``/data/SH600000``),
  compound rows of :data:`BAR_DTYPE` (40 bytes): ``datetime`` uint64 ``YYYYMMDDhhmm`` (day bars
  end in ``0000``, minute bars carry their end minute), prices uint32 yuan x 1000,
  ``transAmount`` uint64 yuan / 1000, ``transCount`` uint64 lots; strictly increasing by
  datetime; chunked, unlimited first dimension, gzip + shuffle, h5py's default file format;
- index tables of the derived periods (:data:`INDEX_GROUPS`): ``/week``, ``/month``, ...
  in day files, ``/min15`` ... ``/hour2`` in 5min files; one table per security, rows of
  :data:`INDEX_DTYPE` ``(datetime, start)``: the period's end label and the ``/data`` row of
  its first bar.

Crash safety
------------
Writes are staged (:meth:`HistoryFile.append`, :meth:`HistoryFile.replace_from`,
:meth:`HistoryFile.merge`) and applied by :meth:`HistoryFile.commit` in flushed phases, with
two bookkeeping attributes per data table: ``relay_rows`` (rows known complete) and
``relay_indexed`` (rows the index tables cover), and a file attribute ``relay_dirty`` that is
set while a writer has the file open:

1. tables whose tail is replaced get ``relay_rows`` lowered to the first replaced row; flush;
2. rows are written (resize, then write; a new data table is created with both marks at 0);
   flush;
3. ``relay_rows`` is raised and index tables are extended; flush;
4. ``relay_indexed`` is raised; flush.

Opening a file whose ``relay_dirty`` is still set (its writer was killed) truncates every
table to its ``relay_rows`` and rebuilds the index tables of every table whose
``relay_indexed`` differs, so a table is always complete up to some bar. Tables written by
other tools (no attributes) are taken as they are. hikyuu and PyTables ignore the extra
attributes.

A file that HDF5 itself cannot open any more (a power loss in the middle of an HDF5 flush can
do that) is moved aside by :func:`open_file` with ``recover_corrupt=True`` and started anew.

Only one writer per directory: :class:`DirectoryLock`.

API at a glance
---------------
``open_file(dir, market, period, "r" | "a")`` -> :class:`HistoryFile` (a context manager):
``names()``, ``tables()`` / ``info(name)`` (rows, first and last datetime), ``last(name)``,
``read(name, start, end)`` / ``read_after(name, dt)`` (raw :data:`BAR_DTYPE` rows),
``read_index(name, index)``; writers stage ``append(name, rows)``,
``replace_from(name, dt, rows)`` or ``merge(name, rows)`` and ``commit()`` (``close()``
commits too); ``rebuild_index(name)``. :func:`iter_files` lists a directory's files,
:func:`bars_to_records` validates and converts plain-unit bars, :func:`index_labels` /
:func:`index_entries` compute index tables.
"""

from __future__ import annotations

import os
import time
import zlib
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from types import TracebackType
from typing import (
    Any,
    Deque,
    Dict,
    Iterator,
    List,
    Literal,
    Mapping,
    Optional,
    Sequence,
    Set,
    Tuple,
    Type,
    Union,
)

import h5py
import numpy as np
import numpy.typing as npt

from relay.errors import HistoryError, HistoryLockedError

__all__ = [
    "BAR_DTYPE",
    "INDEX_DTYPE",
    "INDEX_GROUPS",
    "MARKETS",
    "PERIODS",
    "DirectoryLock",
    "HistoryFile",
    "MergeResult",
    "TableInfo",
    "bars_to_records",
    "bars_to_records_many",
    "commit_record",
    "committed_rows",
    "file_name",
    "index_entries",
    "index_labels",
    "iter_files",
    "open_file",
    "open_table",
    "read_table",
    "search_datetime",
    "symbol_of",
    "table_name",
]

PERIODS: Tuple[str, ...] = ("day", "1min", "5min")
"""The periods stored, as in hikyuu's file names."""

MARKETS: Tuple[str, ...] = ("SH", "SZ", "BJ")

BAR_DTYPE = np.dtype([
    ("datetime", "<u8"),
    ("openPrice", "<u4"),
    ("highPrice", "<u4"),
    ("lowPrice", "<u4"),
    ("closePrice", "<u4"),
    ("transAmount", "<u8"),
    ("transCount", "<u8"),
])
"""hikyuu's bar record (40 bytes)."""

INDEX_DTYPE = np.dtype([("datetime", "<u8"), ("start", "<u8")])
"""A row of an index table: the derived period's end label and its first ``/data`` row."""

INDEX_GROUPS: Mapping[str, Tuple[str, ...]] = {
    "day": ("week", "month", "quarter", "halfyear", "year"),
    "1min": (),
    "5min": ("min15", "min30", "min60", "hour2"),
}

# Intraday labels (minutes after midnight): a bar belongs to the first label at or after it.
def _minutes(*hhmm: int) -> npt.NDArray[np.int64]:
    return np.array([h // 100 * 60 + h % 100 for h in hhmm], dtype=np.int64)


def _label_range(first: int, last: int, step: int) -> List[int]:
    start, end = first // 100 * 60 + first % 100, last // 100 * 60 + last % 100
    return [m // 60 * 100 + m % 60 for m in range(start, end + 1, step)]


_INTRADAY_LABELS: Mapping[str, npt.NDArray[np.int64]] = {
    "min15": _minutes(*_label_range(945, 1130, 15), *_label_range(1315, 1500, 15)),
    "min30": _minutes(*_label_range(1000, 1130, 30), *_label_range(1330, 1500, 30)),
    "min60": _minutes(1030, 1130, 1400, 1500),
    "hour2": _minutes(1130, 1500),
}

_MAX_PRICE = (2**32 - 1) / 1000.0
_DIRTY_ATTR = "relay_dirty"
_LOCK_NAME = ".qmt-relay-history.lock"
_LOCK_WAIT = 5.0                 # seconds a writer waits for a file HDF5 reports locked
_OPEN_TABLES = 32                # data tables a file keeps open (the ones just used)
_TAIL = 256                      # rows of a table's end read for incremental work

Mode = Literal["r", "a"]


# -- names ------------------------------------------------------------------------------

def file_name(market: str, period: str) -> str:
    """``("SH", "day") -> "sh_day.h5"``.

    Raises:
        ValueError: unknown market or period.
    """
    if market.upper() not in MARKETS:
        raise ValueError(f"unknown market {market!r}; valid: {', '.join(MARKETS)}")
    if period not in PERIODS:
        raise ValueError(f"unknown period {period!r}; valid: {', '.join(PERIODS)}")
    return f"{market.lower()}_{period}.h5"


def table_name(symbol: str) -> str:
    """``"600000.SH" -> "SH600000"`` (the market upper case: hikyuu finds no lower-case table).

    Raises:
        ValueError: not ``CODE.MARKET``.
    """
    code, dot, market = symbol.partition(".")
    if not dot or not code or not market.isalpha():
        raise ValueError(f"expected CODE.MARKET such as 600000.SH, got {symbol!r}")
    return market.upper() + code


def symbol_of(table: str) -> str:
    """``"SH600000" -> "600000.SH"``."""
    return f"{table[2:]}.{table[:2]}"


# -- conversion and validation ------------------------------------------------------------

def bars_to_records(
    datetime: npt.ArrayLike,
    open_: npt.ArrayLike,
    high: npt.ArrayLike,
    low: npt.ArrayLike,
    close: npt.ArrayLike,
    amount: npt.ArrayLike,
    volume: npt.ArrayLike,
) -> Tuple[npt.NDArray[np.void], Dict[str, int]]:
    """Plain-unit bars -> hikyuu records, rejecting bad ones.

    Args:
        datetime: ``YYYYMMDDhhmm`` integers (day bars ``YYYYMMDD0000``).
        open_, high, low, close: prices in yuan.
        amount: turnover in yuan.
        volume: volume in lots (100 shares).

    Returns:
        ``(records, rejected)``: the valid bars as :data:`BAR_DTYPE` rows (prices rounded half
        away from zero to 0.001 yuan, amount to 1,000 yuan, volume to lots), strictly
        increasing by datetime; and a count of the rejected ones by reason: ``bad_price``
        (zero, negative, non-finite or too large), ``high_below_low``, ``bad_volume``
        (negative or non-finite amount or volume), ``bad_datetime`` (not 12 digits) and
        ``not_increasing`` (a datetime not after the previous kept one: out of order or
        duplicate; the first occurrence is kept).
    """
    rec, rejected, _ = _convert(datetime, (open_, high, low, close), amount, volume, None)
    return rec, rejected


def bars_to_records_many(bars: Sequence[Any]
                         ) -> Tuple[List[npt.NDArray[np.void]], Dict[str, int]]:
    """:func:`bars_to_records` of many securities at once (one vectorised pass).

    Args:
        bars: per security, an object with ``datetime``, ``open``, ``high``, ``low``,
            ``close``, ``amount`` and ``volume`` arrays (a source's bars).

    Returns:
        The records of each security, in order, and the rejected bars of all by reason.
    """
    if not bars:
        return [], {}
    lengths = np.array([len(b.datetime) for b in bars], dtype=np.int64)
    columns = [np.concatenate([np.asarray(getattr(b, f)).ravel() for b in bars])
               for f in ("datetime", "open", "high", "low", "close", "amount", "volume")]
    segment = np.repeat(np.arange(len(bars), dtype=np.uint64), lengths)
    rec, rejected, keep = _convert(columns[0], columns[1:5], columns[5], columns[6], segment)
    counts = np.bincount(segment[keep].astype(np.int64), minlength=len(bars))
    return np.split(rec, np.cumsum(counts)[:-1]), rejected


def _convert(datetime: npt.ArrayLike, prices: Sequence[npt.ArrayLike], amount: npt.ArrayLike,
             volume: npt.ArrayLike, segment: Optional[npt.NDArray[np.uint64]]
             ) -> Tuple[npt.NDArray[np.void], Dict[str, int], npt.NDArray[np.intp]]:
    """Validate and convert; ``segment`` numbers the security of each bar (the order check
    is within a security). Returns the records, rejections and the kept bars' positions."""
    dt = np.asarray(datetime).astype(np.uint64, copy=False).ravel()
    cols = [np.asarray(c, dtype=np.float64).ravel() for c in prices]
    amt = np.asarray(amount, dtype=np.float64).ravel()
    vol = np.asarray(volume, dtype=np.float64).ravel()
    n = dt.shape[0]
    if any(c.shape[0] != n for c in (*cols, amt, vol)):
        raise ValueError("bar columns differ in length")
    rejected: Dict[str, int] = {}
    with np.errstate(invalid="ignore"):
        prices_ = np.stack(cols) if n else np.zeros((4, 0))
        bad_dt = (dt < 100_000_000_000) | (dt > 999_999_999_999)
        bad_price = ~bad_dt & ~np.all(np.isfinite(prices_) & (prices_ > 0)
                                      & (prices_ <= _MAX_PRICE), axis=0)
        ok = ~bad_dt & ~bad_price
        hl = ok & (cols[1] < cols[2])
        ok &= ~hl
        bad_vol = ok & ~(np.isfinite(amt) & (amt >= 0) & np.isfinite(vol) & (vol >= 0))
        ok &= ~bad_vol
    for reason, mask in (("bad_datetime", bad_dt), ("bad_price", bad_price),
                         ("high_below_low", hl), ("bad_volume", bad_vol)):
        count = int(np.count_nonzero(mask))
        if count:
            rejected[reason] = count
    keep = np.flatnonzero(ok)
    # the order key: datetimes (12 digits) after the security's number, so that the
    # running maximum starts anew with each security
    kdt = dt[keep] if segment is None else segment[keep] * np.uint64(10**12) + dt[keep]
    if kdt.shape[0] > 1:
        # keep a bar only if it is after every kept bar before it
        prior = np.maximum.accumulate(kdt)
        increasing = np.ones(kdt.shape[0], dtype=bool)
        increasing[1:] = kdt[1:] > prior[:-1]
        dropped = int(kdt.shape[0] - np.count_nonzero(increasing))
        if dropped:
            rejected["not_increasing"] = dropped
            keep = keep[increasing]
    rec = np.empty(keep.shape[0], dtype=BAR_DTYPE)
    rec["datetime"] = dt[keep]
    for name, col in zip(("openPrice", "highPrice", "lowPrice", "closePrice"), cols):
        rec[name] = np.floor(col[keep] * 1000.0 + 0.5)
    rec["transAmount"] = np.floor(amt[keep] / 1000.0 + 0.5)
    rec["transCount"] = np.floor(vol[keep] + 0.5)
    return rec, rejected, keep


# -- index labels -----------------------------------------------------------------------

def _to_days(ymd: npt.NDArray[np.uint64]) -> npt.NDArray[np.datetime64]:
    y = (ymd // 10000).astype(np.int64)
    m = (ymd // 100 % 100).astype(np.int64)
    d = (ymd % 100).astype(np.int64)
    months = ((y - 1970) * 12 + (m - 1)).astype("m8[M]")
    days: npt.NDArray[np.datetime64] = (
        (np.datetime64("1970-01", "M") + months).astype("M8[D]") + (d - 1).astype("m8[D]"))
    return days


def _to_label(days: npt.NDArray[np.datetime64]) -> npt.NDArray[np.uint64]:
    years = days.astype("M8[Y]")
    months = days.astype("M8[M]")
    y = years.astype(np.int64) + 1970
    m = (months - years.astype("M8[M]")).astype(np.int64) + 1
    d = (days - months.astype("M8[D]")).astype(np.int64) + 1
    label: npt.NDArray[np.uint64] = ((y * 10000 + m * 100 + d) * 10000).astype(np.uint64)
    return label


def _month_end(months: npt.NDArray[np.datetime64]) -> npt.NDArray[np.datetime64]:
    return (months + np.timedelta64(1, "M")).astype("M8[D]") - np.timedelta64(1, "D")


def index_labels(datetimes: npt.ArrayLike, index: str) -> npt.NDArray[np.uint64]:
    """The end label of the derived period each bar belongs to.

    Args:
        datetimes: ``YYYYMMDDhhmm`` of day bars (for week ... year) or 5min bars (for min15
            ... hour2).
        index: one of :data:`INDEX_GROUPS`' names.

    Returns:
        ``YYYYMMDDhhmm`` labels: week = that week's Friday, month = the month's last day,
        quarter = 03-31/06-30/09-30/12-31, halfyear = 06-30/12-31, year = 12-31 (all ``0000``);
        min15/min30/min60/hour2 = the first label at or after the bar's time that day.

    Raises:
        ValueError: unknown index name.
    """
    dt = np.asarray(datetimes, dtype=np.uint64)
    if dt.shape[0] > 64:
        # many bars share few distinct days or minutes: label those, then map back
        unique, inverse = np.unique(dt, return_inverse=True)
        if unique.shape[0] * 2 < dt.shape[0]:
            out: npt.NDArray[np.uint64] = index_labels(unique, index)[inverse.ravel()]
            return out
    if index in _INTRADAY_LABELS:
        labels = _INTRADAY_LABELS[index]
        hhmm = (dt % 10000).astype(np.int64)
        minute = hhmm // 100 * 60 + hhmm % 100
        pos = np.minimum(np.searchsorted(labels, minute, side="left"), labels.shape[0] - 1)
        chosen = labels[pos]
        stamped: npt.NDArray[np.uint64] = (
            dt // 10000 * 10000 + (chosen // 60 * 100 + chosen % 60).astype(np.uint64)
        ).astype(np.uint64)
        return stamped
    days = _to_days(dt // 10000)
    if index == "week":
        weekday = (days.astype(np.int64) + 3) % 7       # Monday = 0 (1970-01-01: Thursday)
        return _to_label(days + ((4 - weekday) % 7).astype("m8[D]"))
    months = days.astype("M8[M]")
    month0 = (months - days.astype("M8[Y]").astype("M8[M]")).astype(np.int64)   # 0-11
    if index == "month":
        return _to_label(_month_end(months))
    span = {"quarter": 3, "halfyear": 6, "year": 12}.get(index)
    if span is None:
        raise ValueError(f"unknown index {index!r}")
    last = months + (span - 1 - month0 % span).astype("m8[M]")
    return _to_label(_month_end(last))


def index_entries(datetimes: npt.ArrayLike, index: str, offset: int = 0) -> npt.NDArray[np.void]:
    """Index rows for consecutive bars whose first row in ``/data`` is ``offset``.

    Returns:
        :data:`INDEX_DTYPE` rows: one per derived period met, ``(label, first row)``.
    """
    return _entries(index_labels(datetimes, index), offset)


def _entries(labels: npt.NDArray[np.uint64], offset: int) -> npt.NDArray[np.void]:
    out = np.empty(0, dtype=INDEX_DTYPE)
    if labels.shape[0]:
        starts = np.flatnonzero(np.concatenate(([True], labels[1:] != labels[:-1])))
        out = np.empty(starts.shape[0], dtype=INDEX_DTYPE)
        out["datetime"] = labels[starts]
        out["start"] = starts.astype(np.uint64) + np.uint64(offset)
    return out


# -- low-level HDF5 access (the incremental path touches thousands of tables; h5py's
#    high-level objects cost several times the HDF5 work for a one-row read) -----------

_BAR_TID = h5py.h5t.py_create(BAR_DTYPE, logical=True)
_INDEX_TID = h5py.h5t.py_create(INDEX_DTYPE, logical=True)


def _tid_of(dtype: np.dtype[Any]) -> Any:
    if dtype == BAR_DTYPE:
        return _BAR_TID
    if dtype == INDEX_DTYPE:
        return _INDEX_TID
    return h5py.h5t.py_create(dtype, logical=True)


Table = Any
"""A table as the store's internals handle it: h5py's low-level ``DatasetID`` (the
high-level ``h5py.Dataset`` is accepted too and costs a wrapper per table)."""


def _dsid(ds: Table) -> Any:
    return ds.id if isinstance(ds, h5py.Dataset) else ds


def _read_rows(ds: Table, lo: int, hi: int, dtype: np.dtype[Any] = BAR_DTYPE, *,
               zeroed: bool = False) -> npt.NDArray[np.void]:
    """Rows ``[lo, hi)`` of a one-dimensional compound dataset, read as ``dtype`` (HDF5
    converts fields by name; ``zeroed``: a field the table lacks reads as 0, not garbage)."""
    n = max(hi - lo, 0)
    out: npt.NDArray[np.void] = (np.zeros if zeroed else np.empty)(n, dtype=dtype)
    if n:
        dsid = _dsid(ds)
        fspace = dsid.get_space()
        fspace.select_hyperslab((lo,), (n,))
        dsid.read(h5py.h5s.create_simple((n,)), fspace, out, _tid_of(dtype))
    return out


def _write_rows(ds: Table, lo: int, rows: npt.NDArray[np.void]) -> None:
    """Write ``rows`` at row ``lo`` of a one-dimensional dataset (already large enough)."""
    n = int(rows.shape[0])
    if n:
        dsid = _dsid(ds)
        fspace = dsid.get_space()
        fspace.select_hyperslab((lo,), (n,))
        dsid.write(h5py.h5s.create_simple((n,)), fspace, np.ascontiguousarray(rows),
                   _tid_of(rows.dtype))


def _size(ds: Table) -> int:
    return int(_dsid(ds).shape[0])


def _set_size(ds: Table, rows: int) -> None:
    _dsid(ds).set_extent((rows,))


def open_table(group: h5py.Group, name: str, dapl: Any = None) -> Optional[Table]:
    """``group[name]`` (a name or a path such as ``data/SH600000``; ``group`` may be the
    file) as a low-level dataset id when it is a dataset, else None (one HDF5 lookup)."""
    try:
        dsid = h5py.h5d.open(group.id, name.encode(), dapl=dapl)
    except (KeyError, ValueError, TypeError):
        return None
    return dsid


def _get_int_attr(ds: Table, name: str) -> Optional[int]:
    try:
        attr = h5py.h5a.open(_dsid(ds), name.encode())
    except KeyError:
        return None
    buf = np.empty(attr.shape, dtype=attr.dtype)
    attr.read(buf)
    return int(buf.ravel()[0]) if buf.size else None


# -- our own chunks: the tables this store creates are chunked, shuffled and deflated, so
#    it reads and writes their chunks directly (HDF5 applies filters on the calling thread
#    and re-reads a chunk it rewrites; here the chunks of a commit are compressed on every
#    core and the last chunk of a table is decoded once, from the bytes already read)

def _shuffled(rows: npt.NDArray[np.void], chunk: int) -> List[Any]:
    """``rows`` cut into chunks of ``chunk`` rows (the last zero-padded), each shuffled as
    HDF5's shuffle filter does (byte ``j`` of every element together); the chunks are
    contiguous views of one array (zlib reads them as they are)."""
    size = rows.dtype.itemsize
    n = int(rows.shape[0])
    count = -(-n // chunk)
    raw = np.zeros((count * chunk, size), dtype=np.uint8)
    raw[:n] = np.ascontiguousarray(rows).view(np.uint8).reshape(n, size)
    blocks = np.ascontiguousarray(raw.reshape(count, chunk, size).transpose(0, 2, 1))
    return list(blocks.reshape(count, chunk * size))


def _decode_chunk(dsid: Any, lo: int, chunk: int, dtype: np.dtype[Any]
                  ) -> Optional[npt.NDArray[np.void]]:
    """The ``chunk`` rows of the stored chunk starting at row ``lo`` (None: not stored, or
    not in the store's own shuffle+deflate form)."""
    try:
        mask, blob = _dsid(dsid).read_direct_chunk((lo,))
    except (KeyError, ValueError, RuntimeError, OSError):
        return None
    if mask:
        return None
    data = zlib.decompress(blob)
    size = dtype.itemsize
    if len(data) != chunk * size:
        return None
    rows: npt.NDArray[np.void] = np.frombuffer(data, dtype=np.uint8).reshape(
        size, chunk).T.copy().view(dtype).ravel()
    return rows


_STATE_NAME = "relay_state"
STATE_DTYPE = np.dtype([
    ("name", "S32"),        # table name under /data
    ("rows", "<u8"),        # rows known complete
    ("indexed", "<u8"),     # rows the index tables describe
    ("chunk", "<u4"),       # rows per chunk of the /data table when the store made it, else 0
    ("ichunk", "<u4"),      # the same for its index tables
    ("last", "<u8"),        # datetime of row rows - 1 (0: not recorded)
])
"""The commit record of a file (the dataset ``/relay_state``), one row per table the store
writes; tables without a row are another tool's and taken as they are."""


class _State:
    """A file's commit record, loaded once and written whole by :meth:`save`.

    Files written before the record existed kept the marks as attributes of each table
    (``relay_rows``, ``relay_indexed``): read-only, those are read table by table; a writer
    converts them to a record when it opens the file.
    """

    def __init__(self, file: h5py.File) -> None:
        self._file = file
        self.rows: Dict[str, List[int]] = {}
        self.legacy = False
        self.dirty = False
        ds = file.get(_STATE_NAME)
        if isinstance(ds, h5py.Dataset):
            record = ds[:]
            for row in record:
                self.rows[row["name"].decode()] = [int(row["rows"]), int(row["indexed"]),
                                                   int(row["chunk"]), int(row["ichunk"]),
                                                   int(row["last"])]
        else:
            self.legacy = True

    def get(self, name: str, ds: Optional[Table] = None) -> Optional[List[int]]:
        found = self.rows.get(name)
        if found is None and self.legacy and ds is not None:
            rows = _get_int_attr(ds, "relay_rows")
            if rows is None:
                return None
            indexed = _get_int_attr(ds, "relay_indexed")
            found = [rows, 0 if indexed is None else indexed, 0, 0, 0]
        return found

    def set(self, name: str, rows: int, indexed: int, chunk: int = -1,
            ichunk: int = -1, last: int = -1) -> None:
        """Record a table's marks (``-1``: keep that value; ``last`` is forgotten when the
        rows change without it)."""
        row = self.rows.get(name)
        if row is None:
            row = self.rows[name] = [rows, indexed, max(chunk, 0), max(ichunk, 0),
                                     max(last, 0)]
        else:
            if last >= 0:
                row[4] = last
            elif row[0] != rows:
                row[4] = 0
            row[0], row[1] = rows, indexed
            if chunk >= 0:
                row[2] = chunk
            if ichunk >= 0:
                row[3] = ichunk
        self.dirty = True

    def save(self) -> None:
        if not self.dirty:
            return
        record = np.zeros(len(self.rows), dtype=STATE_DTYPE)
        if self.rows:
            record["name"] = [n.encode() for n in self.rows]
            values = np.array(list(self.rows.values()), dtype=np.int64)
            for k, field in enumerate(("rows", "indexed", "chunk", "ichunk", "last")):
                record[field] = values[:, k]
        ds = self._file.get(_STATE_NAME)
        if not isinstance(ds, h5py.Dataset):
            ds = self._file.create_dataset(_STATE_NAME, shape=(0,), maxshape=(None,),
                                           dtype=STATE_DTYPE, chunks=(2048,))
        # rows only ever change in place or are added at the end (a row is never dropped,
        # even when its table is gone): a kill mid-write leaves each row old or new
        if ds.shape[0] != record.shape[0]:
            ds.resize((record.shape[0],))
        if record.shape[0]:
            ds[:] = record
        self.dirty = False
        self.legacy = False


def committed_rows(file: h5py.File) -> Dict[str, Tuple[int, int]]:
    """``{table: (rows committed, rows indexed)}`` of the tables the store wrote in ``file``
    (an open h5py file, e.g. a reader's); tables not listed are another tool's, complete as
    they are. Files written before the commit record are read from their tables' marks."""
    return {name: (row[0], row[1]) for name, row in commit_record(file).items()}


def commit_record(file: h5py.File) -> Dict[str, Tuple[int, int, int, int]]:
    """``{table: (rows committed, rows indexed, rows per chunk, rows per index chunk)}``:
    :func:`committed_rows` with the layout of the store's own tables (0: unknown), for
    :func:`read_table`."""
    state = _State(file)
    if state.legacy:
        data = file.get("data")
        if isinstance(data, h5py.Group):
            for name in data:
                ds = data[name]
                found = state.get(name, ds) if isinstance(ds, h5py.Dataset) else None
                if found is not None:
                    state.rows[name] = found
    return {name: (row[0], row[1], row[2], row[3]) for name, row in state.rows.items()}


def read_table(ds: Table, lo: int, hi: int, dtype: np.dtype[Any], chunk: int = 0
               ) -> npt.NDArray[np.void]:
    """Rows ``[lo, hi)`` of a table as ``dtype`` (fields by name; a field the table lacks
    reads as 0). ``chunk``: its rows per chunk when the store made it (from
    :func:`commit_record`): its chunks are then decoded directly, without HDF5's type
    conversion."""
    n = max(hi - lo, 0)
    if n and chunk:
        parts = []
        for at in range(lo // chunk * chunk, hi, chunk):
            part = _decode_chunk(ds, at, chunk, dtype)
            if part is None:
                break
            parts.append(part[max(lo - at, 0):min(hi - at, chunk)])
        else:
            return parts[0] if len(parts) == 1 else np.concatenate(parts)
    return _read_rows(ds, lo, hi, dtype, zeroed=True)


# -- the file -----------------------------------------------------------------------------

@dataclass(frozen=True)
class TableInfo:
    """A stored table: its name (``SH600000``), row count, first and last ``datetime``."""

    name: str
    rows: int
    first: Optional[int]
    last: Optional[int]


@dataclass(frozen=True)
class MergeResult:
    """What :meth:`HistoryFile.merge` staged: new rows, rows found unchanged, rows replaced."""

    written: int
    unchanged: int
    replaced: int


@dataclass
class _Pending:
    keep: int                       # stored rows kept (the rest is replaced)
    rows: npt.NDArray[np.void]      # rows to write after them
    last: Optional[int] = None      # datetime of stored row keep-1, when it is a pure append


class HistoryFile:
    """One market+period file in hikyuu's layout. Use :func:`open_file` to get one.

    Reads return only committed rows. Writes are staged and applied by :meth:`commit`
    (and by :meth:`close`).
    """

    def __init__(self, file: h5py.File, period: str, *, mode: Mode, chunk_rows: int,
                 compression: int) -> None:
        self._file = file
        self.period = period
        self.path = str(file.filename)
        self.mode = mode
        self._chunk_rows = chunk_rows
        self._index_chunk = max(64, chunk_rows // 8)
        self._compression = compression
        self._pending: Dict[str, _Pending] = {}
        self._indexes = INDEX_GROUPS[period]
        self._dcpl: Dict[int, Any] = {}
        self._open: Dict[str, Table] = {}
        self._absent: Set[str] = set()
        self._groups: Dict[str, h5py.Group] = {}
        # a writer keeps the tables of a file open through a pass; their own chunks are
        # read and written directly, so a small chunk cache each is enough
        self._dapl: Any = None
        if mode == "a":
            self._dapl = h5py.h5p.create(h5py.h5p.DATASET_ACCESS)
            self._dapl.set_chunk_cache(101, 64 * 1024, 0.75)
        # the last rows of tables read this session (rows committed, those rows): the
        # incremental path reads each table's tail once for its last bar and its last day
        self._tails: Dict[str, Tuple[int, npt.NDArray[np.void]]] = {}
        # writer only: (committed rows, last datetime or None) of tables seen, so one
        # incremental pass reads each table's row count and last bar once
        self._known: Dict[str, Tuple[int, Optional[int]]] = {}
        self._executor: Optional[ThreadPoolExecutor] = None
        self._state = _State(file)
        self.recovered: List[str] = []
        """Tables truncated or re-indexed when the file was opened after a killed writer."""
        if mode == "a":
            self._layout()
            if self._state.legacy:
                self._adopt_legacy_marks()
            if self._file.attrs.get(_DIRTY_ATTR, 0):
                self._recover()
            self._file.attrs[_DIRTY_ATTR] = 1
            self._state.save()
            self._file.flush()

    # -- context manager ------------------------------------------------------------------

    def __enter__(self) -> HistoryFile:
        return self

    def __exit__(self, exc_type: Optional[Type[BaseException]],
                 exc: Optional[BaseException], tb: Optional[TracebackType]) -> None:
        if exc_type is not None:
            self._pending.clear()   # a failed run stages nothing half-made
        self.close()

    # -- reading --------------------------------------------------------------------------

    def names(self) -> List[str]:
        """Table names under ``/data``, sorted."""
        group = self._file.get("data")
        return sorted(group.keys()) if group is not None else []

    def info(self, name: str) -> Optional[TableInfo]:
        """Rows and first/last datetime of table ``name``, or None when absent."""
        ds = self._data(name)
        if ds is None:
            return None
        rows = self._rows_of(name, ds)
        if rows == 0:
            return TableInfo(name, 0, None, None)
        first = int(_read_rows(ds, 0, 1)[0]["datetime"])
        last = int(self._tail(name, ds, rows)[-1]["datetime"])
        return TableInfo(name, rows, first, last)

    def tables(self) -> Dict[str, TableInfo]:
        """Every table's :class:`TableInfo`, by name."""
        out: Dict[str, TableInfo] = {}
        for name in self.names():
            info = self.info(name)
            if info is not None:
                out[name] = info
        return out

    def rows(self, name: str) -> int:
        """Committed rows of table ``name`` (0 when absent)."""
        ds = self._data(name)
        return 0 if ds is None else self._rows_of(name, ds)

    def read(self, name: str, start: Optional[int] = None,
             end: Optional[int] = None) -> npt.NDArray[np.void]:
        """Rows of table ``name`` with ``start <= datetime <= end`` (raw :data:`BAR_DTYPE`).

        Args:
            name: table name, e.g. ``SH600000``.
            start: first ``YYYYMMDDhhmm`` wanted (None: from the first row).
            end: last ``YYYYMMDDhhmm`` wanted, inclusive (None: to the last row).

        Returns:
            The rows (empty when the table is absent).
        """
        ds = self._data(name)
        if ds is None:
            return np.empty(0, dtype=BAR_DTYPE)
        rows = self._rows_of(name, ds)
        if start is not None and end is None and rows:
            tail = self._tail(name, ds, rows, start)    # incremental work: the tail
            if tail.shape[0] == rows or int(tail[0]["datetime"]) < start:
                picked: npt.NDArray[np.void] = tail[tail["datetime"] >= np.uint64(start)]
                return picked
        lo = 0 if start is None else search_datetime(ds, rows, start, "left")
        hi = rows if end is None else search_datetime(ds, rows, end, "right")
        if hi <= lo:
            return np.empty(0, dtype=BAR_DTYPE)
        return _read_rows(ds, lo, hi)

    def read_after(self, name: str, after: int) -> npt.NDArray[np.void]:
        """Rows of ``name`` with datetime strictly after ``after``."""
        return self.read(name, after + 1)

    def read_index(self, name: str, index: str) -> npt.NDArray[np.void]:
        """The index table ``/<index>/<name>`` (:data:`INDEX_DTYPE` rows; empty when absent)."""
        ds = self._file.get(f"{index}/{name}")
        if ds is None:
            return np.empty(0, dtype=INDEX_DTYPE)
        out: npt.NDArray[np.void] = ds[:]
        return out

    # -- writing --------------------------------------------------------------------------

    def append(self, name: str, rows: npt.NDArray[np.void]) -> int:
        """Stage ``rows`` after the last row of ``name`` (created when absent).

        Raises:
            HistoryError: rows are not strictly increasing, or not after the stored ones.
        """
        self._writable()
        rows = self._check_rows(name, rows)
        pend = self._pending.get(name)
        if pend is not None:
            last = int(pend.rows[-1]["datetime"]) if pend.rows.shape[0] else None
            if last is None:
                stored = self._stored_last(name, pend.keep)
                last = stored
            if rows.shape[0] and last is not None and int(rows[0]["datetime"]) <= last:
                raise HistoryError(self.path, f"{name}: rows not after the staged ones")
            pend.rows = np.concatenate((pend.rows, rows))
            return int(rows.shape[0])
        ds = self._data(name)
        keep = self._rows_of(name, ds) if ds is not None else 0
        last = self._stored_last(name, keep)
        if rows.shape[0] and last is not None and int(rows[0]["datetime"]) <= last:
            raise HistoryError(self.path, f"{name}: rows not after the last stored bar {last}")
        self._pending[name] = _Pending(keep, rows, last)
        return int(rows.shape[0])

    def replace_from(self, name: str, datetime: int, rows: npt.NDArray[np.void]) -> int:
        """Stage: drop stored rows of ``name`` at or after ``datetime``, then append ``rows``.

        Raises:
            HistoryError: rows are not strictly increasing or start before ``datetime``.
        """
        self._writable()
        rows = self._check_rows(name, rows)
        if rows.shape[0] and int(rows[0]["datetime"]) < datetime:
            raise HistoryError(self.path, f"{name}: replacement rows start before {datetime}")
        if name in self._pending:
            self.commit()
        ds = self._data(name)
        keep = 0
        if ds is not None:
            keep = search_datetime(ds, self._rows_of(name, ds), datetime, "left")
        self._pending[name] = _Pending(keep, rows)
        return int(rows.shape[0])

    def merge(self, name: str, rows: npt.NDArray[np.void]) -> MergeResult:
        """Stage ``rows`` (strictly increasing) into ``name`` the incremental way.

        Stored rows from ``rows``' first datetime on are compared with ``rows``: a matching
        prefix is left alone; from the first difference on the stored tail is replaced.
        Rows after the stored ones are appended.

        Returns:
            How many rows are written, found unchanged, and replaced.
        """
        self._writable()
        rows = self._check_rows(name, rows)
        if not rows.shape[0]:
            return MergeResult(0, 0, 0)
        if name in self._pending:
            self.commit()
        stored = self.read(name, int(rows[0]["datetime"]))
        n = min(stored.shape[0], rows.shape[0])
        same = stored[:n] == rows[:n]
        diff = int(np.argmin(same)) if n and not same.all() else n
        if diff == stored.shape[0]:
            new = rows[diff:]
            if new.shape[0]:
                self.append(name, new)
            return MergeResult(int(new.shape[0]), diff, 0)
        self.replace_from(name, int(stored[diff]["datetime"]), rows[diff:])
        return MergeResult(int(rows.shape[0] - diff), diff, int(stored.shape[0] - diff))

    @property
    def staged(self) -> int:
        """Rows staged and not yet committed."""
        return sum(int(p.rows.shape[0]) for p in self._pending.values())

    def commit(self) -> Dict[str, int]:
        """Write what was staged, in the crash-safe phases the module docstring lists.

        Returns:
            Rows written by table name.
        """
        if not self._pending:
            return {}
        self._writable()
        pending, self._pending = self._pending, {}
        data = self._file.require_group("data")
        for name in pending:
            self._known.pop(name, None)
        state = self._state
        # 1. lower the committed mark of tables whose tail will be overwritten; record new
        #    tables (nothing committed) before they exist, and adopt other tools' tables
        for name, pend in pending.items():
            row = state.rows.get(name)
            if row is not None and pend.keep == row[0]:
                continue       # a pure append to a table of ours: nothing to record yet
            ds = self._data(name)
            row = state.get(name, ds)
            if ds is None:
                state.set(name, 0, 0, self._chunk_rows, self._index_chunk)
            elif row is None:
                state.set(name, _size(ds), 0, _layout_of(ds), 0)
            elif pend.keep < row[0] or pend.keep < _size(ds):
                state.set(name, pend.keep, min(row[1], pend.keep))
        if state.dirty:
            state.save()
            self._file.flush()
        # 2. the rows (every chunk of a commit compressed on every core)
        written: Dict[str, int] = {}
        fresh: List[Tuple[h5py.Group, str, npt.NDArray[np.void]]] = []
        chunks = _Chunks(self)
        for name, pend in pending.items():
            ds = self._data(name)
            if ds is None:
                fresh.append((data, name, pend.rows))
            else:
                tail = self._tails.get(name)
                prefix = None
                if tail is not None and tail[0] == pend.keep:
                    prefix = tail[1]
                chunks.put(ds, pend.keep, pend.rows, state.rows[name][2], prefix)
            written[name] = int(pend.rows.shape[0])
        self._create_tables(fresh, chunks)
        chunks.write()
        for name in pending:
            self._tails.pop(name, None)
        self._file.flush()
        # 3. commit marks, index tables
        for name, pend in pending.items():
            row = state.rows[name]
            n = int(pend.rows.shape[0])
            state.set(name, pend.keep + n, row[1],
                      last=int(pend.rows[-1]["datetime"]) if n else -1)
        self._update_indexes(pending)
        for name, pend in pending.items():
            if pend.rows.shape[0]:
                self._known[name] = (pend.keep + int(pend.rows.shape[0]),
                                     int(pend.rows[-1]["datetime"]))
        state.save()
        self._file.flush()
        # 4. the index tables are complete
        for name, pend in pending.items():
            total = pend.keep + int(pend.rows.shape[0])
            state.set(name, total, total)
        state.save()
        self._file.flush()
        return written

    def put_index(self, name: str, index: str, start: int, rows: npt.NDArray[np.void]) -> bool:
        """Make ``/<index>/<name>`` rows ``[start, ...)`` be ``rows`` (index tables another
        tool derived, mirrored as they are; the caller flushes). Returns whether it wrote."""
        self._writable()
        rows = np.asarray(rows).astype(INDEX_DTYPE, copy=False)
        idx = self._index(index, name)
        chunks = _Chunks(self)
        row = self._state.rows.get(name)
        if idx is not None:
            local = _read_rows(idx, start, _size(idx), INDEX_DTYPE)
            if local.shape[0] >= rows.shape[0] and bool(np.all(local[:rows.shape[0]] == rows)):
                return False
            chunks.put(idx, start, rows, row[3] if row is not None else 0)
        else:
            group = self._group(index) or self._file.require_group(index)
            self._create_tables([(group, name, rows)], chunks)
        chunks.write()
        return True

    def rebuild_index(self, name: str) -> None:
        """Recompute every index table of ``name`` from its ``/data`` rows."""
        self._writable()
        ds = self._data(name)
        if ds is None:
            return
        rows = self._rows_of(name, ds)
        self._reindex(name, ds, rows)
        self._state.save()
        self._file.flush()

    def flush(self) -> None:
        """Commit what is staged and flush the file (a no-op for a read-only file)."""
        if self.mode == "a":
            self.commit()
            self._file.flush()

    def close(self) -> None:
        """Commit, clear the dirty mark and close. Idempotent."""
        if not self._file.id.valid:
            return
        try:
            if self.mode == "a":
                self.commit()
                self._state.save()
                self._file.attrs[_DIRTY_ATTR] = 0
                self._file.flush()
        finally:
            self._open.clear()
            self._groups.clear()
            self._file.close()
            if self._executor is not None:
                self._executor.shutdown()
                self._executor = None

    # -- internals ------------------------------------------------------------------------

    def _writable(self) -> None:
        if self.mode != "a":
            raise HistoryError(self.path, "opened read-only")

    def _layout(self) -> None:
        self._file.require_group("data")
        for index in self._indexes:
            self._file.require_group(index)

    def _adopt_legacy_marks(self) -> None:
        """A file written before the commit record: its tables' marks become the record."""
        state = self._state
        data = self._group("data")
        names = sorted(data.keys()) if data is not None else []
        for name in names:
            ds = self._data(name)
            found = state.get(name, ds) if ds is not None else None
            if ds is None or found is None:
                continue
            chunk = _layout_of(ds)
            ichunks = set()
            for index in self._indexes:
                idx = self._index(index, name)
                ichunks.add(_layout_of(idx, INDEX_DTYPE) if idx is not None else 0)
            ichunk = ichunks.pop() if len(ichunks) == 1 else 0
            state.rows[name] = [found[0], found[1], chunk, ichunk, 0]
        state.legacy = False
        state.dirty = True

    def _group(self, name: str) -> Optional[h5py.Group]:
        group = self._groups.get(name)
        if group is None:
            found = self._file.get(name)
            if not isinstance(found, h5py.Group):
                return None
            group = self._groups[name] = found
        return group

    def _data(self, name: str) -> Optional[Table]:
        ds = self._open.get(name)
        if ds is None:
            if name in self._absent:
                return None
            group = self._group("data")
            found = open_table(group, name, self._dapl) if group is not None else None
            if found is None:
                if self.mode == "a":      # a writer alone adds tables: remember the misses
                    self._absent.add(name)
                return None
            # a few only: HDF5 opens and closes datasets slower the more are open
            if len(self._open) >= _OPEN_TABLES:
                del self._open[next(iter(self._open))]
            ds = self._open[name] = found
        return ds

    def _index(self, index: str, name: str) -> Optional[Table]:
        group = self._group(index)
        return open_table(group, name, self._dapl) if group is not None else None

    def _tail(self, name: str, ds: Table, rows: int, start: Optional[int] = None
              ) -> npt.NDArray[np.void]:
        """The end of the first ``rows`` rows of ``name``: at least its last row, and every
        row from ``start`` on when given (up to :data:`_TAIL` rows; read once, then grown
        backwards a chunk at a time as asked)."""
        cached = self._tails.get(name)
        tail = cached[1] if cached is not None and cached[0] == rows else None
        if tail is not None and (start is None or tail.shape[0] >= min(rows, _TAIL)
                                 or int(tail[0]["datetime"]) < start):
            return tail
        row = self._state.get(name)
        chunk = row[2] if row is not None else 0
        if chunk and rows:
            have = 0 if tail is None else int(tail.shape[0])
            parts = [] if tail is None else [tail]
            while have < min(rows, _TAIL):
                end = rows - have
                at = (end - 1) // chunk * chunk
                part = _decode_chunk(ds, at, chunk, BAR_DTYPE)
                if part is None:
                    parts = []
                    break
                parts.insert(0, part[:end - at])
                have += end - at
                if start is None or int(part[0]["datetime"]) < start:
                    break
            tail = (parts[0] if len(parts) == 1 else np.concatenate(parts)) if parts else None
        else:
            tail = None
        if tail is None:
            tail = _read_rows(ds, max(rows - _TAIL, 0), rows)
        if self.mode == "a":    # a writer's pass reads each tail twice; a reader keeps none
            if len(self._tails) >= 8192:
                self._tails.clear()
            self._tails[name] = (rows, tail)
        return tail

    def last(self, name: str) -> Optional[int]:
        """The last stored ``datetime`` of ``name`` (None: absent or empty); reads one row
        (a writer knows it of the tables it wrote from the commit record)."""
        row = self._state.rows.get(name)
        if self.mode == "a" and row is not None and row[0] and row[4] \
                and name not in self._pending:
            return row[4]
        ds = self._data(name)
        if ds is None:
            return None
        return self._stored_last(name, self._rows_of(name, ds))

    def last_rows(self, name: str, count: int, group: str = "data"
                  ) -> Tuple[int, npt.NDArray[np.void]]:
        """``(rows, the last count of them)`` of ``/<group>/<name>`` (committed rows of a
        ``/data`` table; ``(0, empty)`` when absent). Reads the commit record and the table
        only, no cache, so another thread may call it."""
        dtype = BAR_DTYPE if group == "data" else INDEX_DTYPE
        dsid = open_table(self._file, f"{group}/{name}")
        if dsid is None:
            return 0, np.empty(0, dtype=dtype)
        row = self._state.rows.get(name)
        if group == "data":
            rows, chunk = self.committed(name, dsid), (0 if row is None else row[2])
        else:
            rows, chunk = _size(dsid), (0 if row is None else row[3])
        return rows, read_table(dsid, max(0, rows - count), rows, dtype, chunk)

    def committed(self, name: str, ds: Table) -> int:
        """Committed rows of table ``name`` open as ``ds`` (its whole size when another
        tool wrote it); reads the commit record only, so another thread may call it."""
        row = self._state.get(name, ds)
        n = _size(ds)
        return n if row is None else min(n, row[0])

    def _rows_of(self, name: str, ds: Table) -> int:
        """Committed rows of ``name`` (remembered by a writer)."""
        if self.mode == "a":
            known = self._known.get(name)
            if known is not None:
                return known[0]
        rows = self.committed(name, ds)
        if self.mode == "a":
            self._known[name] = (rows, None)
        return rows

    def _stored_last(self, name: str, keep: int) -> Optional[int]:
        ds = self._data(name)
        if ds is None or keep == 0:
            return None
        known = self._known.get(name)
        if known is not None and known[0] == keep and known[1] is not None:
            return known[1]
        last = int(self._tail(name, ds, keep)[-1]["datetime"])
        if self.mode == "a" and known is not None and known[0] == keep:
            self._known[name] = (keep, last)
        return last

    def _check_rows(self, name: str, rows: npt.NDArray[np.void]) -> npt.NDArray[np.void]:
        table_ok = len(name) > 2 and name[:2].isupper() and name[:2].isalpha()
        if not table_ok:
            raise HistoryError(self.path, f"bad table name {name!r}, expected e.g. SH600000")
        rows = np.asarray(rows)
        if rows.dtype != BAR_DTYPE:
            try:
                rows = rows.astype(BAR_DTYPE)
            except (TypeError, ValueError) as exc:
                raise HistoryError(self.path, f"{name}: rows are not bar records") from exc
        dt = rows["datetime"]
        if dt.shape[0] > 1 and not bool(np.all(dt[1:] > dt[:-1])):
            raise HistoryError(self.path, f"{name}: rows not strictly increasing by datetime")
        return rows

    def _reindex(self, name: str, ds: Table, total: int) -> None:
        """Make every index table of ``name`` describe ``/data`` rows ``[0, total)``."""
        row = self._state.rows.get(name)
        if row is None:
            self._state.set(name, total, 0, _layout_of(ds), 0)
        self._state.set(name, total, 0)
        self._update_indexes({name: _Pending(0, np.empty(0, BAR_DTYPE))}, reread=True)
        self._state.set(name, total, total)

    def _update_indexes(self,
                        pending: Mapping[str, _Pending], *, reread: bool = False) -> None:
        """Extend the index tables of the tables just written.

        For each table, entries describing rows before ``keep`` (the rows the write kept) are
        trusted, except the last period starting there, which may have grown; from there on
        the entries are recomputed from the datetimes (stored ones read back, new ones from
        memory). Labels of all tables are computed in one vectorised call per index.
        """
        if not self._indexes:
            return
        state = self._state
        plans: List[Tuple[str, int, npt.NDArray[np.uint64], List[Tuple[Any, int, int]]]] = []
        appended: List[Tuple[str, npt.NDArray[np.uint64], int]] = []
        for name, pend in pending.items():
            indexed = state.rows[name][1]
            if not reread and pend.last is not None and pend.keep > 0 and indexed == pend.keep:
                # a pure append to a consistent table: only periods that start in the new
                # rows add entries; nothing needs reading
                appended.append((name, np.concatenate((np.array([pend.last], np.uint64),
                                                       pend.rows["datetime"])), pend.keep))
                continue
            keep = pend.keep if not reread else 0
            valid = 0 if reread else min(pend.keep, indexed)
            per_index: List[Tuple[Any, int, int]] = []
            for index in self._indexes:
                idx = self._index(index, name) if pend.keep or reread else None
                kept, start_row = 0, 0
                if idx is not None and valid > 0 and _size(idx):
                    size = _size(idx)
                    last_start = int(_read_rows(idx, size - 1, size, INDEX_DTYPE)[0]["start"])
                    if last_start <= valid - 1:   # the usual append: the last period grows
                        kept, start_row = size - 1, last_start
                    else:
                        starts = np.asarray(_read_rows(idx, 0, size, INDEX_DTYPE)["start"],
                                            dtype=np.int64)
                        kept = max(int(np.searchsorted(starts, valid - 1, side="right")) - 1,
                                   0)
                        start_row = int(starts[kept])
                        if start_row > valid:
                            kept, start_row = 0, 0
                per_index.append((idx, kept, start_row))
            first = min(p[2] for p in per_index)
            stop = state.rows[name][0] if reread else keep    # stored rows read back
            ds = self._data(name) if stop > first else None
            if reread:
                dts = (_read_rows(ds, first, stop)["datetime"] if ds is not None
                       else np.empty(0, dtype=np.uint64))
            else:
                head = (_read_rows(ds, first, stop)["datetime"] if ds is not None
                        else np.empty(0, dtype=np.uint64))
                dts = np.concatenate((head, pend.rows["datetime"]))
            plans.append((name, first, np.asarray(dts, dtype=np.uint64), per_index))
        every = np.concatenate([p[2] for p in plans] + [a[1] for a in appended]
                               ) if plans or appended else np.empty(0, np.uint64)
        unique, inverse = _unique_inverse(every)
        fresh: List[Tuple[h5py.Group, str, npt.NDArray[np.void]]] = []
        broken: Set[str] = set()
        chunks = _Chunks(self)
        for k, index in enumerate(self._indexes):
            labels_all = index_labels(unique, index)[inverse]
            offset = sum(int(p[2].shape[0]) for p in plans)
            for name, dts, keep in appended:
                labels = labels_all[offset:offset + dts.shape[0]]
                offset += dts.shape[0]
                entries = _entries(labels, keep - 1)[1:]   # [0] is the stored last period
                if not entries.shape[0]:
                    continue
                idx = self._index(index, name)
                if idx is None:       # an index table gone missing: rebuild it below
                    broken.add(name)
                    continue
                chunks.put(idx, _size(idx), entries, state.rows[name][3])
            offset = 0
            for name, first, dts, per_index in plans:
                idx, kept, start_row = per_index[k]
                labels = labels_all[offset + start_row - first:offset + dts.shape[0]]
                offset += dts.shape[0]
                entries = _entries(labels, start_row)
                if idx is None:
                    group = self._group(index) or self._file.require_group(index)
                    fresh.append((group, name, entries))
                    continue
                chunks.put(idx, kept, entries, state.rows[name][3])
        self._create_tables(fresh, chunks)
        chunks.write()
        for name in sorted(broken):
            for index in self._indexes:
                if name in self._file[index]:
                    del self._file[index][name]
            ds = self._data(name)
            if ds is not None:
                self._reindex(name, ds, state.rows[name][0])

    def _create_tables(self, tables: List[Tuple[h5py.Group, str, npt.NDArray[np.void]]],
                       chunks: _Chunks) -> Dict[str, Table]:
        """Create chunked, extendable, gzip+shuffle tables holding the given rows (their
        chunks go to ``chunks``, which compresses them while the next tables are made)."""
        out: Dict[str, Table] = {}
        for group, name, rows in tables:
            dtype = rows.dtype
            is_data = dtype == BAR_DTYPE
            chunk = self._chunk_rows if is_data else self._index_chunk
            chunks.queue(rows, chunk)
            dcpl = self._dcpl.get(chunk)
            if dcpl is None:
                dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
                dcpl.set_chunk((chunk,))
                dcpl.set_shuffle()
                dcpl.set_deflate(self._compression)
                dcpl.set_obj_track_times(False)     # as h5py's create_dataset
                dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)   # every row is written
                self._dcpl[chunk] = dcpl
            space = h5py.h5s.create_simple((rows.shape[0],), (h5py.h5s.UNLIMITED,))
            try:
                dsid = h5py.h5d.create(group.id, name.encode(), _tid_of(dtype), space,
                                       dcpl=dcpl)
            except ValueError:   # a stray table left by an interrupted run: start it anew
                del group[name]
                dsid = h5py.h5d.create(group.id, name.encode(), _tid_of(dtype), space,
                                       dcpl=dcpl)
            ds = dsid
            row = self._state.rows.get(name)
            if is_data:
                self._absent.discard(name)
                if row is not None:
                    row[2] = chunk
            elif row is not None and row[3] != chunk:   # made by another setting: generic
                row[3] = 0
            chunks.assign(ds, chunk)
            out[name] = ds
        return out

    def _pool(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1),
                                                thread_name_prefix="history-zlib")
        return self._executor

    def _recover(self) -> None:
        """After a killed writer: truncate to committed rows, rebuild stale index tables."""
        for name, row in list(self._state.rows.items()):
            ds = self._data(name)
            if ds is None:
                continue
            committed, indexed = row[0], row[1]
            changed = False
            if _size(ds) != committed:
                ds.set_extent((committed,))
                changed = True
            if changed or indexed != committed:
                self._reindex(name, ds, committed)
                changed = True
            if changed:
                self.recovered.append(name)
        self._known.clear()
        self._tails.clear()
        self._state.save()
        self._file.flush()


class _Chunks:
    """The chunks of one commit phase: shuffled at once, compressed on a thread pool (zlib
    releases the GIL) while the caller goes on, and written (``write_direct_chunk``) as
    they come back, so that few tables stay open; the files are exactly what HDF5's own
    shuffle + deflate filters would have written."""

    _BATCH = 64        # chunks per compression task
    _AHEAD = 4         # tasks in flight before the caller waits for the oldest

    def __init__(self, owner: HistoryFile) -> None:
        self._owner = owner
        self._level = owner._compression
        self._targets: List[List[Any]] = []     # [table or None until made, first row]
        self._raw: List[Any] = []
        self._flight: Deque[Tuple[Future[List[bytes]], List[List[Any]]]] = deque()
        self._waiting: List[List[Any]] = []     # targets of the table being made

    def put(self, ds: Table, keep: int, rows: npt.NDArray[np.void], chunk: int,
            prefix: Optional[npt.NDArray[np.void]] = None) -> None:
        """Make rows ``[keep, keep + len(rows))`` of ``ds`` be ``rows`` and its size their
        end. ``chunk``: the table's rows per chunk when the store made it (0: another
        layout, written through HDF5). ``prefix``: stored rows ending at ``keep``, if known."""
        n = int(rows.shape[0])
        total = keep + n
        start = keep // chunk * chunk if chunk else keep
        head = keep - start
        if n and chunk and head:
            part: Optional[npt.NDArray[np.void]] = None
            if prefix is not None and prefix.shape[0] >= head:
                part = prefix[prefix.shape[0] - head:]
            else:
                decoded = _decode_chunk(ds, start, chunk, rows.dtype)
                part = decoded[:head] if decoded is not None else None
            if part is None:
                chunk = 0
            else:
                rows = np.concatenate((part, rows))
        _set_size(ds, total)
        if not chunk or not n:
            _write_rows(ds, keep, rows)
            return
        for k, piece in enumerate(_shuffled(rows, chunk)):
            self._targets.append([ds, start + k * chunk])
            self._raw.append(piece)
        self._submit()
        self._drain()

    def queue(self, rows: npt.NDArray[np.void], chunk: int) -> None:
        """Chunks of a table about to be created (see :meth:`assign`)."""
        pieces = _shuffled(rows, chunk) if rows.shape[0] else []
        for k, piece in enumerate(pieces):
            target: List[Any] = [None, k * chunk]
            self._waiting.append(target)
            self._targets.append(target)
            self._raw.append(piece)
        self._submit()

    def assign(self, ds: Table, chunk: int) -> None:
        """The table :meth:`queue` was called for now exists."""
        for target in self._waiting:
            target[0] = ds
        self._waiting.clear()
        self._drain()

    def _submit(self, force: bool = False) -> None:
        while len(self._raw) >= self._BATCH or (force and self._raw):
            batch, self._raw = self._raw[:self._BATCH], self._raw[self._BATCH:]
            targets, self._targets = self._targets[:len(batch)], self._targets[len(batch):]
            if force and not self._flight and len(batch) < 8:
                done: Future[List[bytes]] = Future()
                done.set_result(_deflate(batch, self._level))
                self._flight.append((done, targets))
            else:
                self._flight.append((self._owner._pool().submit(_deflate, batch, self._level),
                                     targets))

    def _drain(self, everything: bool = False) -> None:
        """Write the compressed batches that are back (all of them, or wait while too many
        are in flight), oldest first."""
        while self._flight:
            future, targets = self._flight[0]
            if not (everything or len(self._flight) > self._AHEAD or future.done()):
                return
            if any(t[0] is None for t in targets):   # a table not made yet
                if not everything:
                    return
                raise AssertionError("chunks of a table that was never made")
            self._flight.popleft()
            for (ds, offset), blob in zip(targets, future.result()):
                ds.write_direct_chunk((offset,), blob)

    def write(self) -> None:
        """Write every chunk still pending."""
        self._submit(force=True)
        self._drain(everything=True)


def _unique_inverse(values: npt.NDArray[np.uint64]
                    ) -> Tuple[npt.NDArray[np.uint64], npt.NDArray[np.intp]]:
    """``np.unique(values, return_inverse=True)``, faster for what is passed here: runs of
    sorted datetimes (a stable sort merges the runs)."""
    ordered = np.sort(values, kind="stable")
    if ordered.shape[0]:
        ordered = ordered[np.concatenate(([True], ordered[1:] != ordered[:-1]))]
    return ordered, np.searchsorted(ordered, values)


def _deflate(batch: List[Any], level: int) -> List[bytes]:
    return [zlib.compress(raw, level) for raw in batch]


def _layout_of(dsid: Any, dtype: np.dtype[Any] = BAR_DTYPE) -> int:
    """Rows per chunk of a one-dimensional dataset of exactly ``dtype`` filtered by exactly
    shuffle then deflate (the store's own layout, whose chunks it reads and writes
    directly), else 0."""
    try:
        dsid = _dsid(dsid)
        if dsid.dtype != dtype or len(dsid.shape) != 1:
            return 0
        dcpl = dsid.get_create_plist()
        if dcpl.get_layout() != h5py.h5d.CHUNKED or dcpl.get_nfilters() != 2:
            return 0
        if [dcpl.get_filter(k)[0] for k in range(2)] != [h5py.h5z.FILTER_SHUFFLE,
                                                         h5py.h5z.FILTER_DEFLATE]:
            return 0
        return int(dcpl.get_chunk()[0])
    except (ValueError, RuntimeError, TypeError):
        return 0


def search_datetime(ds: Table, rows: int, value: int,
                    side: Literal["left", "right"]) -> int:
    """Binary search of ``datetime`` over the first ``rows`` rows of a ``/data`` table,
    reading few chunks. Incremental work looks near the end: the last rows are tried first.
    """
    if rows > _TAIL:
        tail = _read_rows(ds, rows - _TAIL, rows)["datetime"]
        if int(tail[0]) < value:
            return rows - _TAIL + int(np.searchsorted(tail, np.uint64(value), side=side))
    lo, hi = 0, rows
    # narrow down on a coarse sample first, then read one stretch
    while hi - lo > 4096:
        mid = (lo + hi) // 2
        v = int(_read_rows(ds, mid, mid + 1)[0]["datetime"])
        if v < value or (side == "right" and v == value):
            lo = mid + 1
        else:
            hi = mid
    if hi <= lo:
        return lo
    block = _read_rows(ds, lo, hi)["datetime"]
    return lo + int(np.searchsorted(block, np.uint64(value), side=side))


def open_file(
    directory: Union[str, os.PathLike[str]],
    market: str,
    period: str,
    mode: Mode = "r",
    *,
    chunk_rows: Optional[int] = None,
    compression: int = 1,
    recover_corrupt: bool = False,
) -> HistoryFile:
    """Open (``"r"``) or open/create (``"a"``) ``DIR/<market>_<period>.h5``.

    A writer should hold the directory's :class:`DirectoryLock`.

    Args:
        directory: the hikyuu data directory.
        market: ``SH``, ``SZ`` or ``BJ``.
        period: ``day``, ``1min`` or ``5min``.
        mode: ``"r"`` read-only (the file must exist) or ``"a"`` read/write.
        chunk_rows: rows per chunk of new tables (default 256: an append recompresses the
            table's last chunk, so small chunks keep the incremental run cheap; 256 rows
            compress to ~7% more bytes than 1024).
        compression: gzip level of new tables (1-9; level 1 costs ~30% less CPU than 4 for
            ~2% more bytes on shuffled bars).
        recover_corrupt: in ``"a"`` mode, move a file HDF5 cannot open aside
            (``<name>.corrupt-<epoch>``) and start a new one instead of raising.

    Returns:
        The open file; use it as a context manager.

    Raises:
        HistoryError: unknown market/period, missing file (``"r"``), or a file HDF5
            cannot open.
    """
    try:
        name = file_name(market, period)
    except ValueError as exc:
        raise HistoryError(os.fspath(directory), str(exc)) from exc
    path = os.path.join(os.fspath(directory), name)
    rows = chunk_rows or 256
    if mode == "r" and not os.path.exists(path):
        raise HistoryError(path, "no such file")
    if mode == "a":
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        if not os.path.exists(path):
            _create_file(path, period)
    deadline = time.monotonic() + _LOCK_WAIT
    while True:
        try:
            file = h5py.File(path, mode)   # h5py's default format: hikyuu and PyTables read it
            break
        except OSError as exc:
            if _locked(exc):
                # HDF5's own file lock: another program has it open (a viewer, or the
                # writer process of a killed import still exiting): wait a little, then
                # give up; never take a locked file for a broken one
                if time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                raise HistoryError(path, "in use by another program (HDF5 file lock); "
                                         "close it and run again") from exc
            if mode != "a" or not recover_corrupt or not os.path.exists(path):
                raise HistoryError(path, f"cannot open: {exc}") from exc
            os.replace(path, f"{path}.corrupt-{int(time.time())}")
            file = h5py.File(path, mode)
            break
    try:
        return HistoryFile(file, period, mode=mode, chunk_rows=rows, compression=compression)
    except Exception:
        file.close()
        raise


def _create_file(path: str, period: str) -> None:
    """A new file with its groups, made under a temporary name and renamed into place, so
    that a kill at any moment never leaves a half-made file under the real name."""
    tmp = f"{path}.new-{os.getpid()}"
    with h5py.File(tmp, "w") as file:
        for group in ("data", *INDEX_GROUPS[period]):
            file.create_group(group)
    os.replace(tmp, path)


def _locked(exc: OSError) -> bool:
    """An HDF5 open refused because of its file lock (not a broken file)."""
    return isinstance(exc, BlockingIOError) or "unable to lock file" in str(exc)


def iter_files(directory: Union[str, os.PathLike[str]]) -> Iterator[Tuple[str, str, str]]:
    """``(market, period, path)`` of every hikyuu K-line file present in ``directory``."""
    for market in MARKETS:
        for period in PERIODS:
            path = os.path.join(os.fspath(directory), file_name(market, period))
            if os.path.exists(path):
                yield market, period, path


class DirectoryLock:
    """The one-writer-per-directory lock (a lock file, released when the process dies).

    Args:
        directory: the data directory (created when missing).

    Raises:
        HistoryLockedError: from :meth:`acquire` / ``with`` when another process holds it.
    """

    def __init__(self, directory: Union[str, os.PathLike[str]]) -> None:
        from filelock import FileLock  # noqa: PLC0415 - only writers need it

        self.directory = os.fspath(directory)
        self.path = os.path.join(self.directory, _LOCK_NAME)
        self._lock = FileLock(self.path, timeout=0)

    def acquire(self) -> None:
        """Take the lock or raise :class:`~relay.errors.HistoryLockedError` at once."""
        from filelock import Timeout  # noqa: PLC0415

        os.makedirs(self.directory, exist_ok=True)
        try:
            self._lock.acquire()
        except Timeout:
            raise HistoryLockedError(self.directory) from None

    def release(self) -> None:
        self._lock.release()

    def __enter__(self) -> DirectoryLock:
        self.acquire()
        return self

    def __exit__(self, exc_type: Optional[Type[BaseException]],
                 exc: Optional[BaseException], tb: Optional[TracebackType]) -> None:
        self.release()
