"""Recorded days: the HDF5 layout the recorder writes, and the API that reads it.

One file per trading day (``DIR/YYYY-MM-DD.h5``), written by :mod:`relay.sinks.recorder` in
HDF5's SWMR mode, so it can be read while it is being written and survives a killed writer.
Every group below is a set of column datasets of equal length (chunked, gzip + shuffle);
book columns are 2-D, ``(rows, levels)``.

``/ticks``
    Every record, in publish order. Record columns: ``sym`` (index into ``/symbols``),
    ``datetime`` (``S19``), ``yesterday_close`` ... ``volume`` (float64, as published),
    ``depth`` (book depth of the record), ``bid``/``bid_amount``/``ask``/``ask_amount``
    (``(rows, levels)`` float64), ``time_ms``, ``status``, ``trade_count`` (-1 = absent),
    ``seq`` (the ``SpotList`` message that carried it; 0 = unknown), ``publish_time_ms``
    and ``run`` (index into ``/runs``).
``/batches``
    One row per published batch: ``first_row``, ``n``, ``first_seq``, ``messages``,
    ``publish_time_ms``, ``run``, ``tmin``/``tmax`` (exchange time range of its records) and
    how many ``symbols``/``runs`` existed when it was committed. It is written after the
    rows it points to, so it is the commit log: a reader trusts ``/ticks`` up to the end of
    the last consistent batch. It is also the coarse time index.
``/symbols``, ``/runs``
    ``market``/``code``/``name`` (one entry per distinct triple) and ``run_id``/``source``.
``/periods``, ``/bycode``, ``/bindex``, ``/snap``
    Every ``index_interval`` seconds the recorder closes a period: it copies the period's
    rows sorted by symbol to ``/bycode`` (``/bindex`` lists each symbol's run: ``sym``,
    ``start``, ``n``), and writes the latest record of every symbol so far to ``/snap``
    (a market snapshot). ``/periods`` (``ticks_end``, ``bycode_end``, ``bindex_end``,
    ``snap_start``, ``snap_end``, ``tmax``) commits both.

So "all ticks of one code" reads one short run per period plus the open period's tail, and
"the market at time T" reads one snapshot plus the rows after it.
"""

from __future__ import annotations

import calendar
import csv
import datetime as _dt
import importlib
import os
import time as _time
from typing import (
    Any,
    Dict,
    Iterator,
    List,
    Mapping,
    NamedTuple,
    Optional,
    Sequence,
    TextIO,
    Tuple,
    Union,
)

import h5py
import numpy as np

from relay.records import SpotRecord

__all__ = [
    "BOOKS",
    "FORMAT",
    "RECORD_COLUMNS",
    "Day",
    "DayBatch",
    "Layout",
    "TimeLike",
    "export_csv",
    "open_day",
    "to_ms",
]

FORMAT = "qmt-relay-day"
VERSION = 1
MISSING = -1
"""Stored for an absent ``time_ms``, ``status`` or ``trade_count``."""

BOOKS = ("bid", "bid_amount", "ask", "ask_amount")
_FLOATS = ("yesterday_close", "open", "high", "low", "close", "amount", "volume")

# name -> (dtype, is a book column)
RECORD_COLUMNS: Dict[str, Tuple[str, bool]] = {
    "sym": ("u4", False),
    "datetime": ("S19", False),
    **{name: ("f8", False) for name in _FLOATS},
    "depth": ("u1", False),
    **{name: ("f8", True) for name in BOOKS},
    "time_ms": ("i8", False),
    "status": ("i4", False),
    "trade_count": ("i8", False),
    "seq": ("u8", False),
    "publish_time_ms": ("i8", False),
    "run": ("u4", False),
}

_ROW = {"row": ("u8", False)}
GROUPS: Dict[str, Dict[str, Tuple[str, bool]]] = {
    "ticks": RECORD_COLUMNS,
    "bycode": {**RECORD_COLUMNS, **_ROW},
    "snap": {**RECORD_COLUMNS, **_ROW},
    "batches": {name: ("i8", False) for name in (
        "first_row", "n", "first_seq", "messages", "publish_time_ms", "run", "tmin", "tmax",
        "symbols", "runs")},
    "symbols": {"market": ("S4", False), "code": ("S16", False), "name": ("S96", False)},
    "runs": {"run_id": ("S64", False), "source": ("S16", False)},
    "periods": {name: ("i8", False) for name in (
        "ticks_end", "bycode_end", "bindex_end", "snap_start", "snap_end", "tmax")},
    "bindex": {"sym": ("u4", False), "start": ("i8", False), "n": ("i8", False)},
}
_CHUNK_ROWS = {"ticks": 16384, "bycode": 16384, "snap": 8192, "batches": 1024,
               "symbols": 1024, "runs": 64, "periods": 256, "bindex": 8192}

Columns = Dict[str, np.ndarray]
Frame = Any
"""A ``pandas.DataFrame`` (pandas is optional, so it is not named in the types)."""
TimeLike = Union[int, float, str, _dt.datetime]
"""Epoch milliseconds, ``"YYYY-MM-DD HH:MM:SS"`` (China time) or a ``datetime``."""

_CHINA = _dt.timezone(_dt.timedelta(hours=8))


def to_ms(t: TimeLike) -> int:
    """Epoch milliseconds of ``t``; strings are China time, naive datetimes too."""
    if isinstance(t, str):
        t = _dt.datetime.fromisoformat(t)
    if isinstance(t, _dt.datetime):
        if t.tzinfo is None:
            t = t.replace(tzinfo=_CHINA)
        return round(t.timestamp() * 1000)
    return int(t)


def datetime_ms(values: np.ndarray) -> np.ndarray:
    """``S19`` China-time datetimes -> epoch ms (for records without ``time_ms``)."""
    out = np.empty(len(values), dtype="i8")
    for i, raw in enumerate(values.tolist()):
        try:
            t = _time.strptime(raw.decode(), "%Y-%m-%d %H:%M:%S")
            out[i] = (calendar.timegm(t) - 8 * 3600) * 1000
        except ValueError:
            out[i] = MISSING
    return out


def effective_ms(cols: Mapping[str, np.ndarray]) -> np.ndarray:
    """Exchange time of each row: ``time_ms``, or its ``datetime`` when absent."""
    t = np.asarray(cols["time_ms"], dtype="i8")
    missing = t < 0
    if missing.any():
        t = t.copy()
        t[missing] = datetime_ms(np.asarray(cols["datetime"])[missing])
    return t


# -- layout: reading and writing the groups ---------------------------------------------------


class Layout:
    """The groups of one open day file and their committed lengths.

    Args:
        file: an open h5py file holding (or about to hold) a day.
    """

    def __init__(self, file: h5py.File) -> None:
        self.file = file

    @staticmethod
    def create(file: h5py.File, *, day: str, levels: int, units: str, rollover: str) -> None:
        """Create every group and dataset (empty) and the file attributes."""
        file.attrs.update({"format": FORMAT, "version": VERSION, "day": day,
                           "levels": levels, "units": units, "rollover": rollover})
        for group_name, columns in GROUPS.items():
            group = file.create_group(group_name)
            rows = _CHUNK_ROWS[group_name]
            for name, (dtype, book) in columns.items():
                shape: Tuple[int, ...] = (0, levels) if book else (0,)
                group.create_dataset(
                    name, shape=shape, maxshape=(None, *shape[1:]), dtype=dtype,
                    chunks=(rows, *shape[1:]), compression="gzip", compression_opts=1,
                    shuffle=True,
                )

    def dataset(self, group: str, name: str) -> h5py.Dataset:
        ds: h5py.Dataset = self.file[group][name]
        return ds

    def read(self, group: str, start: int = 0, stop: Optional[int] = None,
             names: Optional[Sequence[str]] = None) -> Columns:
        """Rows ``[start, stop)`` of ``group`` as numpy columns."""
        out: Columns = {}
        for name in names if names is not None else GROUPS[group]:
            ds = self.dataset(group, name)
            end = ds.shape[0] if stop is None else stop
            out[name] = ds[start:end] if end > start else np.zeros(
                (0, *ds.shape[1:]), dtype=ds.dtype)
        return out

    def take(self, group: str, rows: np.ndarray,
             names: Optional[Sequence[str]] = None) -> Columns:
        """Rows at sorted indices ``rows`` of ``group``: contiguous spans read as slices."""
        if not len(rows):
            return self.read(group, 0, 0, names)
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1
        starts = np.concatenate(([0], breaks))
        ends = np.concatenate((breaks, [len(rows)]))
        parts = [self.read(group, int(rows[a]), int(rows[b - 1]) + 1, names)
                 for a, b in zip(starts.tolist(), ends.tolist())]
        return concat(parts)

    def append(self, group: str, cols: Mapping[str, Any]) -> None:
        """Append columns (all the group's columns, equal lengths) to ``group``."""
        names = GROUPS[group]
        n = len(next(iter(cols.values())))
        if not n:
            return
        for name in names:
            ds = self.dataset(group, name)
            old = ds.shape[0]
            ds.resize(old + n, axis=0)
            ds[old:] = cols[name]

    def committed(self) -> Dict[str, int]:
        """How many rows of each group are committed (a crash can leave more, unfinished).

        ``/batches`` must chain (each starts where the previous ended, none empty) and point
        inside ``/ticks``; ``/periods`` must chain inside what those batches cover.
        """
        b = self.read("batches")
        ticks_len = min(self.dataset("ticks", name).shape[0] for name in RECORD_COLUMNS)
        ends = b["first_row"] + b["n"]
        ok = (b["n"] > 0) & (ends <= ticks_len)
        ok &= b["first_row"] == np.concatenate(([0], ends[:-1]))
        nb = int(np.argmin(ok)) if not ok.all() else len(ok)
        out = {
            "batches": nb,
            "ticks": int(ends[nb - 1]) if nb else 0,
            "symbols": int(b["symbols"][nb - 1]) if nb else 0,
            "runs": int(b["runs"][nb - 1]) if nb else 0,
        }
        p = self.read("periods")
        lens = {g: min(self.dataset(g, name).shape[0] for name in GROUPS[g])
                for g in ("bycode", "bindex", "snap")}
        good = 0
        prev = {"ticks_end": 0, "bycode_end": 0, "bindex_end": 0, "snap_end": 0}
        for i in range(len(p["ticks_end"])):
            row = {k: int(v[i]) for k, v in p.items()}
            if not (prev["ticks_end"] < row["ticks_end"] <= out["ticks"]
                    and row["bycode_end"] - prev["bycode_end"]
                    == row["ticks_end"] - prev["ticks_end"]
                    and row["bycode_end"] <= lens["bycode"]
                    and prev["bindex_end"] < row["bindex_end"] <= lens["bindex"]
                    and row["snap_start"] == prev["snap_end"]
                    and row["snap_start"] < row["snap_end"] <= lens["snap"]):
                break
            good = i + 1
            prev = row
        out["periods"] = good
        out["bycode"] = prev["bycode_end"]
        out["bindex"] = prev["bindex_end"]
        out["snap"] = prev["snap_end"]
        return out


def concat(parts: Sequence[Columns]) -> Columns:
    """Concatenate column dicts with the same keys."""
    if len(parts) == 1:
        return parts[0]
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


def open_file(path: Union[str, os.PathLike[str]]) -> h5py.File:
    """Open a day file for reading, even while a recorder writes it or after it was killed."""
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        if not os.path.exists(path):
            raise
        # Still open for writing (or its writer was killed): SWMR readers may open it.
        try:
            return h5py.File(path, "r", swmr=True)
        except OSError:
            raise exc from None


# -- the read API --------------------------------------------------------------------------


class DayBatch(NamedTuple):
    """One published batch of a recorded day."""

    columns: Columns
    publish_time_ms: int
    run_id: str
    source: str
    first_seq: int

    @property
    def records(self) -> List[SpotRecord]:
        return to_records(self.columns)


class Day:
    """A recorded day, opened by :func:`open_day`.

    Every query returns a dict of numpy arrays (``market``, ``code``, ``name``, ``datetime``,
    the prices, ``bid`` ... ``ask_amount`` as ``(rows, levels)`` arrays with ``depth``,
    ``time_ms``, ``status``, ``trade_count`` (-1 = absent), ``seq``, ``publish_time_ms``,
    ``run_id``, ``source``, ``row``), or a pandas DataFrame with ``pandas=True`` (books as
    ``bid1`` ... ``bidN`` columns; pandas must be installed). Rows come in publish order.
    Times are exchange times (``time_ms``; the ``datetime`` field when it is absent).
    """

    def __init__(self, path: Union[str, os.PathLike[str]]) -> None:
        self.path = os.fspath(path)
        self._file = open_file(path)
        attrs = self._file.attrs
        if attrs.get("format") != FORMAT:
            self._file.close()
            raise ValueError(f"{self.path}: not a qmt-relay recording")
        self.day = str(attrs["day"])
        self.levels = int(attrs["levels"])
        self.units = str(attrs["units"])
        self._layout = Layout(self._file)
        self._n = self._layout.committed()
        sy = self._layout.read("symbols", 0, self._n["symbols"])
        self._market = np.char.decode(sy["market"], "utf-8")
        self._code = np.char.decode(sy["code"], "utf-8")
        self._name = np.char.decode(sy["name"], "utf-8")
        self._symbol = np.char.add(np.char.add(self._code, "."), self._market)
        ru = self._layout.read("runs", 0, self._n["runs"])
        self._run_id = np.char.decode(ru["run_id"], "utf-8")
        self._source = np.char.decode(ru["source"], "utf-8")
        self._batches = self._layout.read("batches", 0, self._n["batches"])
        self._periods = self._layout.read("periods", 0, self._n["periods"])

    def __enter__(self) -> Day:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()

    def __len__(self) -> int:
        return self._n["ticks"]

    @property
    def names(self) -> Dict[str, str]:
        """Security name by symbol (the latest one recorded)."""
        return dict(zip(self._symbol.tolist(), self._name.tolist()))

    @property
    def run_ids(self) -> List[str]:
        return list(self._run_id.tolist())

    def codes(self) -> List[str]:
        """Every symbol recorded (``"600000.SH"``), sorted."""
        return sorted(set(self._symbol.tolist()))

    def all(self, *, pandas: bool = False) -> Union[Columns, Frame]:
        """Every record of the day."""
        return self._out(self._layout.read("ticks", 0, self._n["ticks"]),
                         np.arange(self._n["ticks"], dtype="u8"), pandas)

    def ticks(self, code: str, *, pandas: bool = False) -> Union[Columns, Frame]:
        """Every record of one security (``"600000.SH"``; a bare ``"600000"`` also matches)."""
        ids = np.flatnonzero((self._symbol == code) | (self._code == code)).astype("u4")
        n = self._n
        bi = self._layout.read("bindex", 0, n["bindex"])
        runs = np.flatnonzero(np.isin(bi["sym"], ids))
        parts = []
        if len(runs):
            rows = np.concatenate([np.arange(s, s + k) for s, k in
                                   zip(bi["start"][runs].tolist(), bi["n"][runs].tolist())])
            parts.append(self._layout.take("bycode", np.sort(rows)))
        tail = int(self._periods["ticks_end"][-1]) if n["periods"] else 0
        sym = self._layout.read("ticks", tail, n["ticks"], ["sym"])["sym"]
        hit = np.flatnonzero(np.isin(sym, ids))
        rest = self._layout.take("ticks", hit + tail)
        rest["row"] = (hit + tail).astype("u8")
        parts.append(rest)
        cols = concat(parts)
        order = np.argsort(cols["row"], kind="stable")
        cols = {k: v[order] for k, v in cols.items()}
        return self._out(cols, cols.pop("row"), pandas)

    def _span(self, t0: int, t1: int) -> Tuple[int, int]:
        """Rows that can hold exchange times in ``[t0, t1]`` (from the batch index)."""
        b = self._batches
        if not len(b["n"]):
            return 0, 0
        late = np.flatnonzero(b["tmax"] >= t0)
        early = np.flatnonzero(b["tmin"] <= t1)
        if not len(late) or not len(early):
            return 0, 0
        first, last = int(late[0]), int(early[-1])
        if last < first:
            return 0, 0
        return int(b["first_row"][first]), int(b["first_row"][last] + b["n"][last])

    def between(self, t0: TimeLike, t1: TimeLike, *,
                pandas: bool = False) -> Union[Columns, Frame]:
        """Records with exchange time in ``[t0, t1)``, in publish order."""
        a, b = to_ms(t0), to_ms(t1)
        lo, hi = self._span(a, b)
        cols = self._layout.read("ticks", lo, hi)
        t = effective_ms(cols)
        keep = np.flatnonzero((t >= a) & (t < b))
        return self._out({k: v[keep] for k, v in cols.items()},
                         (keep + lo).astype("u8"), pandas)

    def at(self, t: TimeLike, *, pandas: bool = False) -> Union[Columns, Frame]:
        """The market at time ``t``: the last record of every security with time <= ``t``.

        Rows are sorted by symbol.
        """
        when = to_ms(t)
        p = self._periods
        usable = np.flatnonzero(p["tmax"] <= when)
        if len(usable):
            k = int(usable[-1])
            base = self._layout.read("snap", int(p["snap_start"][k]), int(p["snap_end"][k]))
            start = int(p["ticks_end"][k])
        else:
            base = self._layout.read("snap", 0, 0)
            start = 0
        _, hi = self._span(-(1 << 62), when)
        tail = self._layout.read("ticks", start, max(start, hi))
        tail["row"] = np.arange(start, start + len(tail["sym"]), dtype="u8")
        tail = {k: v[effective_ms(tail) <= when] for k, v in tail.items()}
        cols = concat([base, tail])
        # the last row of each symbol: unique over the reversed order
        sym = cols["sym"][::-1]
        _, idx = np.unique(sym, return_index=True)
        keep = len(sym) - 1 - idx
        cols = {k: v[keep] for k, v in cols.items()}
        order = np.argsort(self._symbol[cols["sym"]], kind="stable")
        cols = {k: v[order] for k, v in cols.items()}
        return self._out(cols, cols.pop("row"), pandas)

    def batches(self, block: int = 64) -> Iterator[DayBatch]:
        """Every batch as published, in order (reads ``block`` batches at a time)."""
        b = self._batches
        total = len(b["n"])
        for i in range(0, total, block):
            j = min(total, i + block)
            lo = int(b["first_row"][i])
            cols = self._layout.read("ticks", lo, int(b["first_row"][j - 1] + b["n"][j - 1]))
            out = self._columns(cols, np.arange(lo, lo + len(cols["sym"]), dtype="u8"))
            for k in range(i, j):
                a = int(b["first_row"][k]) - lo
                part = {name: v[a:a + int(b["n"][k])] for name, v in out.items()}
                run = int(b["run"][k])
                yield DayBatch(part, int(b["publish_time_ms"][k]), str(self._run_id[run]),
                               str(self._source[run]), int(b["first_seq"][k]))

    def records(self) -> List[SpotRecord]:
        """Every record as :class:`~relay.records.SpotRecord` (small days: tests, tools)."""
        cols = self.all()
        assert isinstance(cols, dict)
        return to_records(cols)

    def _columns(self, raw: Columns, rows: np.ndarray) -> Columns:
        sym = raw["sym"]
        run = raw["run"]
        out: Columns = {
            "market": self._market[sym], "code": self._code[sym], "name": self._name[sym],
            "datetime": np.char.decode(raw["datetime"], "ascii"),
        }
        for name in (*_FLOATS, "depth", *BOOKS, "time_ms", "status", "trade_count", "seq",
                     "publish_time_ms"):
            out[name] = raw[name]
        out["run_id"] = self._run_id[run]
        out["source"] = self._source[run]
        out["row"] = rows
        return out

    def _out(self, raw: Columns, rows: np.ndarray,
             pandas: bool) -> Union[Columns, Frame]:
        cols = self._columns(raw, rows)
        if not pandas:
            return cols
        try:
            pd: Any = importlib.import_module("pandas")  # optional, and untyped
        except ImportError as exc:
            raise ImportError("pandas=True needs pandas: pip install pandas") from exc
        flat: Dict[str, Any] = {}
        for name, values in cols.items():
            if values.ndim == 2:
                for level in range(values.shape[1]):
                    flat[f"{name}{level + 1}"] = values[:, level]
            else:
                flat[name] = values
        return pd.DataFrame(flat)


def open_day(path: Union[str, os.PathLike[str]]) -> Day:
    """Open a recorded day (``DIR/YYYY-MM-DD.h5``) for reading.

    Works on a file being recorded right now and on one whose recorder was killed: it reads
    up to the last completed flush.

    Raises:
        OSError: the file cannot be opened.
        ValueError: it is not a qmt-relay recording.
    """
    return Day(path)


def to_records(cols: Mapping[str, np.ndarray]) -> List[SpotRecord]:
    """Columns as returned by :class:`Day` -> records, exactly as they were published."""
    out = []
    depth = cols["depth"].tolist()
    books = [cols[name].tolist() for name in BOOKS]
    opt = [cols[name].tolist() for name in ("time_ms", "status", "trade_count")]
    for i, row in enumerate(zip(cols["market"].tolist(), cols["code"].tolist(),
                                cols["name"].tolist(), cols["datetime"].tolist(),
                                *(cols[name].tolist() for name in _FLOATS))):
        d = depth[i]
        out.append(SpotRecord(
            *row,
            *(tuple(book[i][:d]) for book in books),
            *(None if v[i] < 0 else v[i] for v in opt),
        ))
    return out


# -- CSV export -----------------------------------------------------------------------------

_SCALARS = ("market", "code", "name", "datetime", *_FLOATS)
_TAIL = ("time_ms", "status", "trade_count", "seq", "run_id", "source", "publish_time_ms")


def export_csv(day: Day, out: TextIO) -> int:
    """Write every record of ``day`` as CSV (one row per record, books as ``bid1``...).

    Absent values (``time_ms``, ``status``, ``trade_count``, book levels beyond a
    record's depth) are empty cells. Floats are written so they read back exactly.

    Returns:
        How many records were written.
    """
    levels = day.levels
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([*_SCALARS, *(f"{b}{k + 1}" for b in BOOKS for k in range(levels)),
                     *_TAIL])
    count = 0
    for batch in day.batches(block=256):
        cols = batch.columns
        scal = [cols[name].tolist() for name in _SCALARS]
        books = [cols[name].tolist() for name in BOOKS]
        tail = [cols[name].tolist() for name in _TAIL]
        depth = cols["depth"].tolist()
        for i in range(len(depth)):
            d = depth[i]
            row: List[Any] = [col[i] for col in scal]
            for book in books:
                row.extend(book[i][:d])
                row.extend([""] * (levels - d))
            row.extend("" if (name in ("time_ms", "status", "trade_count")
                              and col[i] < 0) else col[i]
                       for name, col in zip(_TAIL, tail))
            writer.writerow(row)
        count += len(depth)
    return count
