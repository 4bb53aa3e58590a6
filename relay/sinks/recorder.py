"""The HDF5 recorder: a sink that writes every published record to one file per trading day.

``write()`` (and ``write_records()``) only enqueue into a bounded queue and return; one
writer thread owns the h5py file. It appends what arrived and, every ``flush_interval``
seconds, commits it: data first, an HDF5 flush, then the ``/batches`` rows that point at
it, another flush. The file is in HDF5's SWMR mode, whose on-disk state is consistent after
every flush, so a ``kill -9`` loses at most what arrived since the last flush. The layout
is described in :mod:`relay.recording`.

A full queue drops batches (counted; ``recorder_dropping`` is logged once per episode and
``recorder_recovered`` when the queue accepts again); a failing disk (full, read-only, no
permission) logs ``recorder_failed``, drops what arrives and retries every
``retry_interval`` seconds. Nothing the recorder does raises into the relay.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import queue
import time
from typing import TYPE_CHECKING, Any, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import h5py
import numpy as np
import structlog

from relay.recording import (
    BOOKS,
    GROUPS,
    MISSING,
    RECORD_COLUMNS,
    Columns,
    Layout,
    concat,
    effective_ms,
    open_file,
)
from relay.records import SpotColumns, SpotRecord
from relay.supervise import ServiceHandle, Supervisor

if TYPE_CHECKING:
    from relay.config import Config
    from relay.security import Security
    from relay.sinks import PublishedBatch

__all__ = ["Recorder", "day_of"]

log = structlog.get_logger("relay.sinks.recorder")

_CN_MS = 8 * 3_600_000
_DAY_MS = 86_400_000
_COPY_ROWS = 1 << 20
_FLOATS = ("yesterday_close", "open", "high", "low", "close", "amount", "volume")
_STOP = object()


def parse_hhmm(value: str) -> int:
    """``"08:00"`` -> milliseconds after midnight; raises ValueError if malformed."""
    hh, sep, mm = value.partition(":")
    if not sep or not (hh.isdigit() and mm.isdigit()) or not (0 <= int(hh) < 24
                                                              and 0 <= int(mm) < 60):
        raise ValueError(f"expected HH:MM, got {value!r}")
    return (int(hh) * 60 + int(mm)) * 60_000


def day_of(ms: int, rollover_ms: int) -> str:
    """The trading day (file name) of exchange time ``ms``: days start at ``rollover_ms``."""
    days = (ms + _CN_MS - rollover_ms) // _DAY_MS
    return (_dt.date(1970, 1, 1) + _dt.timedelta(days=days)).isoformat()


class _Item(NamedTuple):
    records: Union[SpotColumns, Sequence[SpotRecord], PublishedBatch]
    first_seq: Optional[int]
    counts: Optional[Sequence[int]]
    messages: int
    run_id: str
    source: str
    publish_time_ms: Optional[int]


class _Latest:
    """The last record of every symbol so far (for the periodic market snapshots)."""

    def __init__(self, levels: int) -> None:
        self.levels = levels
        self.cols: Columns = self._empty(0)

    def _empty(self, n: int) -> Columns:
        out: Columns = {}
        for name, (dtype, book) in GROUPS["snap"].items():
            out[name] = np.zeros((n, self.levels) if book else (n,), dtype=dtype)
        out["row"] = np.zeros(n, dtype="i8") - 1
        return out

    def update(self, cols: Columns, rows: np.ndarray) -> None:
        sym = cols["sym"]
        if not len(sym):
            return
        need = int(sym.max()) + 1
        have = len(self.cols["row"])
        if need > have:
            grown = self._empty(max(need, 2 * have))
            for name, values in self.cols.items():
                grown[name][:have] = values
            self.cols = grown
        rev = sym[::-1]
        _, idx = np.unique(rev, return_index=True)
        last = len(sym) - 1 - idx
        where = sym[last]
        for name in RECORD_COLUMNS:
            self.cols[name][where] = cols[name][last]
        self.cols["row"][where] = rows[last]

    def snapshot(self) -> Columns:
        have = np.flatnonzero(self.cols["row"] >= 0)
        out = {name: values[have] for name, values in self.cols.items()}
        out["row"] = out["row"].astype("u8")
        return out


class _DayFile:
    """One open day file: its SWMR handle, symbol/run tables and uncommitted appends."""

    def __init__(self, path: str, day: str, *, levels: int, units: str, rollover: str,
                 clock: Any) -> None:
        self.path = path
        self._clock = clock
        existed = os.path.exists(path)
        if existed:
            _repair_if_crashed(path)
        file = h5py.File(path, "a", libver="latest")
        try:
            if "ticks" not in file:
                Layout.create(file, day=day, levels=levels, units=units, rollover=rollover)
            layout = Layout(file)
            self.levels = int(file.attrs["levels"])
            n = layout.committed()
            _truncate(layout, n)
            self._load(layout, n)
            file.swmr_mode = True
        except BaseException:
            file.close()
            raise
        self.file = file
        self.layout = layout
        self.appended = existed
        self.pending: List[Columns] = []
        self.pending_batches: List[Tuple[int, ...]] = []
        self.pending_symbols: List[Tuple[bytes, bytes, bytes]] = []
        self.pending_runs: List[Tuple[bytes, bytes]] = []
        self.pending_rows = 0
        self.period_started = clock()

    def _load(self, layout: Layout, n: Dict[str, int]) -> None:
        sy = layout.read("symbols", 0, n["symbols"])
        self.syms: Dict[Tuple[bytes, bytes, bytes], int] = {
            k: i for i, k in enumerate(zip(sy["market"].tolist(), sy["code"].tolist(),
                                           sy["name"].tolist()))}
        ru = layout.read("runs", 0, n["runs"])
        self.runs: Dict[Tuple[bytes, bytes], int] = {
            k: i for i, k in enumerate(zip(ru["run_id"].tolist(), ru["source"].tolist()))}
        self.n_ticks = n["ticks"]
        self.n_batches = n["batches"]
        self.latest = _Latest(self.levels)
        p = layout.read("periods", 0, n["periods"])
        if n["periods"]:
            self.period_end = int(p["ticks_end"][-1])
            self.tmax = int(p["tmax"][-1])
            snap = layout.read("snap", int(p["snap_start"][-1]), int(p["snap_end"][-1]))
            self.latest.update(snap, snap["row"].astype("i8"))
        else:
            self.period_end = 0
            self.tmax = MISSING
        self.bycode_end, self.bindex_end, self.snap_end = n["bycode"], n["bindex"], n["snap"]
        tail = layout.read("ticks", self.period_end, self.n_ticks)
        self.period: List[Columns] = [tail] if len(tail["sym"]) else []
        if self.period:
            self.latest.update(tail, np.arange(self.period_end, self.n_ticks))
            self.tmax = max(self.tmax, int(effective_ms(tail).max()))

    def sym_id(self, market: str, code: str, name: str) -> int:
        key = (market.encode(), code.encode(), name.encode())
        found = self.syms.get(key)
        if found is None:
            found = self.syms[key] = len(self.syms)
            self.pending_symbols.append(key)
        return found

    def run_id(self, run_id: str, source: str) -> int:
        key = (run_id.encode(), source.encode())
        found = self.runs.get(key)
        if found is None:
            found = self.runs[key] = len(self.runs)
            self.pending_runs.append(key)
        return found

    def add(self, cols: Columns, item: _Item, tmin: int, tmax: int) -> None:
        n = len(cols["sym"])
        first = self.n_ticks + self.pending_rows
        self.pending.append(cols)
        self.pending_rows += n
        self.pending_batches.append((
            first, n, item.first_seq or 0, item.messages, _or_missing(item.publish_time_ms),
            int(cols["run"][0]), tmin, tmax, len(self.syms), len(self.runs)))

    def commit(self) -> int:
        """Write and flush what was added; returns the rows committed."""
        if not self.pending_batches:
            return 0
        layout = self.layout
        if self.pending_symbols:
            market, code, name = zip(*self.pending_symbols)
            layout.append("symbols", {"market": market, "code": code, "name": name})
        if self.pending_runs:
            run_ids, sources = zip(*self.pending_runs)
            layout.append("runs", {"run_id": run_ids, "source": sources})
        cols = concat(self.pending)
        layout.append("ticks", cols)
        self.file.flush()   # the rows are on disk before the batch index points at them
        rows = np.array(self.pending_batches, dtype="i8")
        layout.append("batches", {name: rows[:, i] for i, name in enumerate(GROUPS["batches"])})
        self.file.flush()
        n = self.pending_rows
        self.period.append(cols)
        self.latest.update(cols, np.arange(self.n_ticks, self.n_ticks + n))
        self.tmax = max(self.tmax, int(max(r[7] for r in self.pending_batches)))
        self.n_ticks += n
        self.n_batches += len(self.pending_batches)
        self.pending, self.pending_batches, self.pending_rows = [], [], 0
        self.pending_symbols, self.pending_runs = [], []
        return n

    def close_period(self) -> None:
        """Copy the period's rows sorted by symbol, write a snapshot, commit the period."""
        self.period_started = self._clock()
        if not self.period:
            return
        cols = concat(self.period)
        n = len(cols["sym"])
        order = np.argsort(cols["sym"], kind="stable")
        bycode = {k: v[order] for k, v in cols.items()}
        bycode["row"] = (order + self.period_end).astype("u8")
        syms, starts, counts = np.unique(bycode["sym"], return_index=True, return_counts=True)
        snap = self.latest.snapshot()
        layout = self.layout
        layout.append("bycode", bycode)
        layout.append("bindex", {"sym": syms, "start": starts + self.bycode_end, "n": counts})
        layout.append("snap", snap)
        self.file.flush()
        snap_start = self.snap_end
        self.period_end += n
        self.bycode_end += n
        self.bindex_end += len(syms)
        self.snap_end += len(snap["sym"])
        layout.append("periods", {
            "ticks_end": [self.period_end], "bycode_end": [self.bycode_end],
            "bindex_end": [self.bindex_end], "snap_start": [snap_start],
            "snap_end": [self.snap_end], "tmax": [self.tmax]})
        self.file.flush()
        self.period = []

    def close(self) -> None:
        try:
            self.commit()
            self.close_period()
        finally:
            self.file.close()


def _or_missing(value: Optional[int]) -> int:
    return MISSING if value is None else int(value)


def _truncate(layout: Layout, n: Dict[str, int]) -> None:
    """Cut every group back to its committed length (before SWMR mode starts)."""
    for group, columns in GROUPS.items():
        for name in columns:
            ds = layout.dataset(group, name)
            if ds.shape[0] > n[group]:
                ds.resize(n[group], axis=0)


def _repair_if_crashed(path: str) -> None:
    """A writer killed in SWMR mode leaves the file marked "open for writing": HDF5 then
    refuses to open it for writing again. Copy its committed part into a fresh file and
    put that in its place."""
    try:
        h5py.File(path, "a", libver="latest").close()
        return
    except OSError:
        pass
    log.warning("recorder_repairing", path=path)
    tmp = path + ".repair"
    with open_file(path) as src:
        layout = Layout(src)
        n = layout.committed()
        with h5py.File(tmp, "w", libver="latest") as dst:
            attrs = dict(src.attrs)
            Layout.create(dst, day=str(attrs["day"]), levels=int(attrs["levels"]),
                          units=str(attrs["units"]), rollover=str(attrs["rollover"]))
            out = Layout(dst)
            for group in GROUPS:
                for lo in range(0, n[group], _COPY_ROWS):
                    out.append(group, layout.read(group, lo, min(n[group], lo + _COPY_ROWS)))
    os.replace(tmp, path)
    log.warning("recorder_repaired", path=path, rows=n["ticks"], batches=n["batches"])


class Recorder:
    """Records published batches to ``DIR/YYYY-MM-DD.h5``, one file per trading day.

    Args:
        directory: where the day files go (created if missing).
        flush_interval: seconds between commits; a killed process loses at most this much.
        queue_size: batches waiting for the writer; beyond it batches are dropped (counted).
        rollover: ``HH:MM`` China time at which a trading day's file begins (by exchange time).
        index_interval: seconds between index periods (per-code copy and market snapshot).
        retry_interval: seconds to wait after a disk error before trying again.
        units: the units of the records (``hikyuu`` or ``raw``), kept for replay.
        levels: book depth stored; ``None`` takes the first batch's.
        clock: monotonic seconds (periods and retries).
        supervisor: runs the writer thread (restarted if it dies); a private one if None.
    """

    def __init__(
        self,
        directory: str,
        *,
        flush_interval: float = 1.0,
        queue_size: int = 1024,
        rollover: str = "08:00",
        index_interval: float = 300.0,
        retry_interval: float = 30.0,
        units: str = "hikyuu",
        levels: Optional[int] = None,
        clock: Any = time.monotonic,
        supervisor: Optional[Supervisor] = None,
    ) -> None:
        self.directory = os.fspath(directory)
        self.flush_interval = flush_interval
        self.index_interval = index_interval
        self.retry_interval = retry_interval
        self.units = units
        self.levels = levels
        self._rollover_text = rollover
        self._rollover = parse_hhmm(rollover)
        self._clock = clock
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=queue_size)
        self._supervisor = supervisor or Supervisor()
        self._thread: Optional[ServiceHandle] = None
        self._day: Optional[_DayFile] = None
        self._dropping = 0          # batches dropped in the current episode
        self._retry_at: Optional[float] = None
        self._truncated_logged = False
        self.dropped = 0            # records dropped because the queue was full
        self.lost = 0               # records lost to disk errors
        self.written = 0            # records committed
        self.failures = 0

    @classmethod
    def from_config(cls, config: Config, *, supervisor: Optional[Supervisor] = None,
                    security: Optional[Security] = None) -> Recorder:
        """The recorder ``config.recorder`` describes, in ``config.normalise`` units.

        ``security`` is unused (the recorder listens on nothing).
        """
        rc = config.recorder
        return cls(rc.dir, flush_interval=rc.flush_interval, queue_size=rc.queue_size,
                   rollover=rc.rollover, index_interval=rc.index_interval,
                   retry_interval=rc.retry_interval, units=config.normalise.units,
                   levels=config.normalise.book_levels, supervisor=supervisor)

    def counters(self) -> Dict[str, int]:
        """Counters for the metrics endpoint."""
        return {"recorder_rows": self.written, "recorder_dropped": self.dropped,
                "recorder_lost": self.lost, "recorder_failures": self.failures,
                "recorder_queue": self._queue.qsize()}

    # -- the sink interface (event loop side) -----------------------------------------------

    def start(self) -> None:
        """Start the writer thread."""
        if self._thread is not None:
            return
        self._thread = self._supervisor.thread("recorder", self._run)
        log.info("recorder_started", dir=self.directory, flush_interval=self.flush_interval)

    def write(self, batch: PublishedBatch) -> None:
        """Enqueue one published batch; never blocks."""
        self._put(_Item(batch, batch.first_seq, batch.counts, len(batch.messages),
                        batch.run_id, batch.source, batch.publish_time_ms), sum(batch.counts))

    def write_records(
        self,
        records: Union[SpotColumns, Sequence[SpotRecord]],
        *,
        first_seq: Optional[int],
        run_id: Optional[str],
        source: Optional[str],
        publish_time_ms: Optional[int],
        counts: Optional[Sequence[int]] = None,
        messages: int = 1,
    ) -> None:
        """Enqueue records that arrived some other way (a subscriber); never blocks.

        Args:
            records: the batch's records.
            first_seq: ``seq`` of its first message (``None`` if unknown).
            run_id, source, publish_time_ms: as the producer sent them.
            counts: records per message, to give each record its own message ``seq``;
                ``None`` stores ``first_seq`` for every record.
            messages: how many messages carried the batch.
        """
        n = len(records)
        if n:
            self._put(_Item(records, first_seq, counts, messages, run_id or "", source or "",
                            publish_time_ms), n)

    def _put(self, item: _Item, n: int) -> None:
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            self.dropped += n
            if not self._dropping:
                log.warning("recorder_dropping", queue_size=self._queue.maxsize)
            self._dropping += n
            return
        if self._dropping:
            log.warning("recorder_recovered", dropped=self._dropping)
            self._dropping = 0

    def close(self) -> None:
        """Commit everything queued, close the file and stop the writer. Idempotent."""
        thread = self._thread
        if thread is None:
            return
        self._thread = None
        self._queue.put(_STOP)
        thread.join()
        thread.stop()
        log.info("recorder_closed", written=self.written, dropped=self.dropped,
                 lost=self.lost, failures=self.failures)

    # -- the writer thread ------------------------------------------------------------------

    def _run(self) -> None:
        next_flush = self._clock() + self.flush_interval
        while True:
            try:
                item = self._queue.get(timeout=max(0.0, next_flush - self._clock()))
            except queue.Empty:
                item = None
            if item is _STOP:
                break
            if item is not None:
                self._guard(self._handle, item)
            now = self._clock()
            if now >= next_flush:
                next_flush = now + self.flush_interval
                self._guard(self._commit)
        self._guard(self._close_day)

    def _guard(self, action: Any, *args: Any) -> None:
        """Run a writer step; any failure is logged and the day file given up (retried)."""
        try:
            action(*args)
        except Exception as exc:
            self.failures += 1
            day = self._day
            self._day = None
            if day is not None:
                self.lost += day.pending_rows
                with contextlib.suppress(Exception):  # already broken; the error is logged
                    day.file.close()
            log.error("recorder_failed", dir=self.directory,
                      path=day.path if day is not None else None, error=repr(exc),
                      retry_in=self.retry_interval)
            self._retry_at = self._clock() + self.retry_interval

    def _handle(self, item: _Item) -> None:
        if self._retry_at is not None:
            if self._clock() < self._retry_at:
                self.lost += _count(item)
                return
            self._retry_at = None
            log.info("recorder_resumed", dir=self.directory)
        cols, tmin, tmax = self._columns(item)
        if not len(cols["datetime"]):
            return
        when = tmax if tmax >= 0 else _or_missing(item.publish_time_ms)
        if when < 0:
            when = int(time.time() * 1000)
        day = day_of(when, self._rollover)
        current = self._day
        if current is None or not os.path.basename(current.path).startswith(day):
            self._close_day()
            os.makedirs(self.directory, exist_ok=True)
            path = os.path.join(self.directory, f"{day}.h5")
            current = self._day = _DayFile(
                path, day, levels=self._levels(cols), units=self.units,
                rollover=self._rollover_text, clock=self._clock)
            log.info("recorder_file_opened", path=path, appending=current.appended,
                     rows=current.n_ticks)
        self._fill_ids(current, cols, item)
        current.add(self._fit(current, cols), item, tmin, tmax)

    def _levels(self, cols: Columns) -> int:
        if self.levels is not None:
            return self.levels
        return max(1, int(cols["bid"].shape[1]))

    def _commit(self) -> None:
        day = self._day
        if day is None:
            return
        n = day.commit()
        if n:
            self.written += n
            log.debug("recorder_flushed", path=day.path, rows=day.n_ticks,
                      batches=day.n_batches)
        if self._clock() - day.period_started >= self.index_interval:
            day.close_period()

    def _close_day(self) -> None:
        day = self._day
        if day is None:
            return
        self._day = None
        n = day.pending_rows
        day.close()
        self.written += n
        log.info("recorder_file_closed", path=day.path, rows=day.n_ticks)

    # -- records -> columns -----------------------------------------------------------------

    def _columns(self, item: _Item) -> Tuple[Columns, int, int]:
        """The item's records as numpy columns (``sym``/``run`` filled in later)."""
        src = item.records
        if not isinstance(src, (SpotColumns, list, tuple)):  # a PublishedBatch
            batch: Any = src
            src = batch.columns if batch.columns is not None else batch.records
        if isinstance(src, SpotColumns):
            cols = _from_columns(src)
        else:
            columns = SpotColumns.from_records(src)
            cols = _from_columns(columns) if columns is not None else _from_records(src)
        n = len(cols["datetime"])
        if item.counts is not None and sum(item.counts) == n:
            base = item.first_seq or 0
            cols["seq"] = np.repeat(np.arange(base, base + len(item.counts), dtype="u8"),
                                    item.counts)
        else:
            cols["seq"] = np.full(n, item.first_seq or 0, dtype="u8")
        cols["publish_time_ms"] = np.full(n, _or_missing(item.publish_time_ms), dtype="i8")
        t = effective_ms(cols) if n else np.zeros(0, dtype="i8")
        valid = t[t >= 0]
        tmin = int(valid.min()) if len(valid) else MISSING
        tmax = int(valid.max()) if len(valid) else MISSING
        return cols, tmin, tmax

    @staticmethod
    def _fill_ids(day: _DayFile, cols: Columns, item: _Item) -> None:
        keys = cols.pop("_keys")
        sym_id = day.sym_id
        cols["sym"] = np.fromiter((sym_id(*k) for k in keys), dtype="u4", count=len(keys))
        cols["run"] = np.full(len(keys), day.run_id(item.run_id, item.source), dtype="u4")

    def _fit(self, day: _DayFile, cols: Columns) -> Columns:
        """Pad or cut the book columns to the file's depth."""
        levels = day.levels
        have = cols["bid"].shape[1]
        if have == levels:
            return cols
        n = len(cols["sym"])
        for name in BOOKS:
            out = np.zeros((n, levels), dtype="f8")
            k = min(levels, have)
            out[:, :k] = cols[name][:, :k]
            cols[name] = out
        if have > levels:
            np.minimum(cols["depth"], levels, out=cols["depth"])
            if not self._truncated_logged:
                self._truncated_logged = True
                log.warning("recorder_book_truncated", levels=levels, got=have)
        return cols


def _count(item: _Item) -> int:
    if item.counts is not None:
        return int(sum(item.counts))
    src = item.records
    return len(src) if isinstance(src, (SpotColumns, list, tuple)) else 0


def _optional(values: Sequence[Optional[int]], dtype: str) -> np.ndarray:
    try:
        return np.array(values, dtype=dtype)
    except TypeError:  # some are None
        return np.array([MISSING if v is None else v for v in values], dtype=dtype)


def _from_columns(c: SpotColumns) -> Columns:
    n, levels = c.n, c.levels
    cols: Columns = {
        "_keys": list(zip(c.market, c.code, c.name)),  # type: ignore[dict-item]
        "datetime": np.array(c.datetime, dtype="S19"),
    }
    for name in _FLOATS:
        cols[name] = np.array(getattr(c, name), dtype="f8")
    cols["depth"] = np.full(n, levels, dtype="u1")
    for name in BOOKS:
        cols[name] = np.frombuffer(getattr(c, name), dtype="f8").reshape(n, levels).copy() \
            if levels else np.zeros((n, 0), dtype="f8")
    cols["time_ms"] = _optional(c.time_ms, "i8")
    cols["status"] = _optional(c.status, "i4")
    cols["trade_count"] = _optional(c.trade_count, "i8")
    return cols


def _from_records(records: Sequence[SpotRecord]) -> Columns:
    """Records whose book depths differ: each padded to the deepest."""
    n = len(records)
    levels = max(max(len(r.bid), len(r.bid_amount), len(r.ask), len(r.ask_amount))
                 for r in records)
    cols: Columns = {
        "_keys": [(r.market, r.code, r.name) for r in records],  # type: ignore[dict-item]
        "datetime": np.array([r.datetime for r in records], dtype="S19"),
    }
    for i, name in enumerate(_FLOATS, start=4):
        cols[name] = np.array([r[i] for r in records], dtype="f8")
    depth = np.zeros(n, dtype="u1")
    for name in BOOKS:
        cols[name] = np.zeros((n, levels), dtype="f8")
    for i, r in enumerate(records):
        d = min(len(r.bid), len(r.bid_amount), len(r.ask), len(r.ask_amount))
        depth[i] = d
        for name in BOOKS:
            cols[name][i, :d] = getattr(r, name)[:d]
    cols["depth"] = depth
    cols["time_ms"] = _optional([r.time_ms for r in records], "i8")
    cols["status"] = _optional([r.status for r in records], "i4")
    cols["trade_count"] = _optional([r.trade_count for r in records], "i8")
    return cols
