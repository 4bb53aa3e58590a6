"""The history import job: source bars -> hikyuu's HDF5 files, incrementally and safely.

For each period and market the job opens ``DIR/<market>_<period>.h5`` and, for every
security, asks the source for the bars from the **last stored trading day** on (that day is
re-read: an intraday run stores a partial day), or from the default start when nothing is
stored (day bars: from listing; minute bars: ``minute_days`` back from the end; ``start``
overrides). Securities sharing a start are fetched in chunks of ``chunk_codes`` and, for
minute bars, windows of ``chunk_days``; each chunk is validated
(:func:`~relay.history.store.bars_to_records_many`), merged (unchanged bars are left alone, a
changed tail is replaced, new bars appended) and committed before the next, so a killed run
keeps everything committed and the next run goes on from there.

One run per directory at a time (:class:`~relay.history.store.DirectoryLock`).
"""

from __future__ import annotations

import datetime as _dt
import multiprocessing
import multiprocessing.connection
import os
import queue
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    Dict,
    List,
    Optional,
    Sequence,
    TextIO,
    Tuple,
    Union,
)

import structlog

from relay.errors import EXIT_INTERRUPTED, HistoryError
from relay.history.store import DirectoryLock, bars_to_records_many, open_file, table_name

if TYPE_CHECKING:
    from relay.config import Config, HistoryConfig
    from relay.history.source import HistorySource

__all__ = ["ImportRequest", "ImportSummary", "run_import"]

log = structlog.get_logger(__name__)

_FROM_LISTING = 19900101


@dataclass(frozen=True)
class ImportRequest:
    """What to import: the ``history`` config with command-line values applied.

    ``start``/``end`` are ``YYYYMMDD`` (None: defaults); ``codes`` empty = the universe.
    """

    dir: str
    periods: Tuple[str, ...]
    markets: Tuple[str, ...]
    codes: Tuple[str, ...] = ()
    start: Optional[int] = None
    end: Optional[int] = None

    @classmethod
    def from_config(cls, history: HistoryConfig, **overrides: Any) -> ImportRequest:
        """The config's request, with non-None ``overrides`` (dir, periods, ...) applied."""
        values: Dict[str, Any] = {
            "dir": history.dir, "periods": history.periods, "markets": history.markets,
            "codes": history.codes,
            "start": int(history.start) if history.start else None, "end": None,
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


@dataclass
class ImportSummary:
    """The outcome of a run (also logged as ``history_import_done``)."""

    source: str
    securities: int = 0
    written: Dict[str, int] = field(default_factory=dict)      # bars by period
    unchanged: Dict[str, int] = field(default_factory=dict)    # bars by period
    replaced: Dict[str, int] = field(default_factory=dict)     # stored bars rewritten
    rejected: Dict[str, int] = field(default_factory=dict)     # bars by reason
    failed: Dict[str, str] = field(default_factory=dict)       # "600000.SH day" -> reason
    recovered: List[str] = field(default_factory=list)         # tables repaired on open
    elapsed: float = 0.0

    @property
    def total_written(self) -> int:
        return sum(self.written.values())

    @property
    def exit_code(self) -> int:
        """0 done, 1 some securities failed."""
        return 1 if self.failed else 0

    def lines(self) -> List[str]:
        """The closing summary, for people."""
        out = [f"history import ({self.source}): {self.securities} securities, "
               f"{self.elapsed:.1f} s"]
        if not self.total_written and not self.replaced:
            out.append("nothing new: every table was already up to date; nothing written")
        for period in sorted(set(self.written) | set(self.unchanged)):
            out.append(f"  {period:>5}: {self.written.get(period, 0):,} bars written, "
                       f"{self.unchanged.get(period, 0):,} unchanged, "
                       f"{self.replaced.get(period, 0):,} replaced")
        if self.rejected:
            reasons = ", ".join(f"{k} {v}" for k, v in sorted(self.rejected.items()))
            out.append(f"  rejected bars: {reasons}")
        if self.recovered:
            out.append(f"  repaired after an interrupted run: {len(self.recovered)} tables")
        if self.failed:
            out.append(f"  FAILED ({len(self.failed)}):")
            out.extend(f"    {what}: {why}" for what, why in sorted(self.failed.items()))
        return out


class _Progress:
    """Securities done (x periods) and bars written: a tqdm bar on a terminal, else log lines.

    ``partial`` may be called from any thread (the QMT source's download callbacks).
    """

    def __init__(self, total: int, *, interval: float, stream: TextIO,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._total = total
        self._interval = interval
        self._clock = clock
        self._t0 = clock()
        self._last_log = self._t0
        self._done = 0
        self._partial = 0
        self._bars = 0
        self._lock = threading.Lock()
        self._bar: Any = None
        if stream.isatty():
            try:
                from tqdm import tqdm  # noqa: PLC0415 - optional extra "history"
            except ImportError:
                pass
            else:
                self._bar = tqdm(total=total, unit="sec", file=stream, dynamic_ncols=True,
                                 desc="history")

    def partial(self, finished: int) -> None:
        """Securities finished so far within the running chunk."""
        with self._lock:
            self._partial = max(0, finished)
        self._render()

    def advance(self, securities: int, bars: int) -> None:
        """A chunk is committed."""
        with self._lock:
            self._done += securities
            self._partial = 0
            self._bars += bars
        self._render()

    def _render(self) -> None:
        with self._lock:
            done = min(self._total, self._done + self._partial)
            bars = self._bars
        now = self._clock()
        elapsed = max(now - self._t0, 1e-9)
        if self._bar is not None:
            self._bar.n = done
            self._bar.set_postfix(bars=f"{bars:,}", rate=f"{bars / elapsed:,.0f}/s",
                                  refresh=False)
            self._bar.refresh()
            return
        if now - self._last_log >= self._interval:
            self._last_log = now
            eta = (self._total - done) * elapsed / done if done else None
            log.info("history_progress", done=done, total=self._total, bars=bars,
                     bars_per_s=round(bars / elapsed), eta_s=round(eta, 1) if eta else None)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _day_of(stamp: int) -> int:
    return stamp // 10000


def _shift(day: int, days: int) -> int:
    d = _dt.date(day // 10000, day // 100 % 100, day % 100) + _dt.timedelta(days=days)
    return d.year * 10000 + d.month * 100 + d.day


def _windows(start: int, end: int, span: int) -> List[Tuple[int, int]]:
    out: List[Tuple[int, int]] = []
    while start <= end:
        stop = min(end, _shift(start, span - 1))
        out.append((start, stop))
        start = _shift(stop, 1)
    return out


def run_import(config: Config, request: ImportRequest, source: HistorySource, *,
               stream: Optional[TextIO] = None) -> ImportSummary:
    """Run one import into ``request.dir``.

    Args:
        config: the relay config (its ``history`` section: chunking, progress, compression).
        request: what to import.
        source: an unopened history source; opened and closed here.
        stream: where the progress bar goes when it is a terminal (default stderr).

    Returns:
        The summary (``exit_code`` 1 when some securities failed).

    Raises:
        HistoryLockedError: another run holds the directory.
        HistoryUnavailableError: the source cannot start.
        HistoryError: a file cannot be opened or written.
    """
    hc = config.history
    t0 = time.monotonic()
    summary = ImportSummary(source=source.kind)
    lock = DirectoryLock(request.dir)
    lock.acquire()
    try:
        source.open()
        try:
            _import(hc, request, source, summary, stream or sys.stderr)
        finally:
            source.close()
    finally:
        lock.release()
    summary.elapsed = time.monotonic() - t0
    log.info("history_import_done", source=summary.source, securities=summary.securities,
             written=summary.written, unchanged=summary.unchanged, replaced=summary.replaced,
             rejected=summary.rejected, failed=len(summary.failed),
             elapsed_s=round(summary.elapsed, 2))
    for what, why in sorted(summary.failed.items()):
        log.warning("history_security_failed", security=what, reason=why)
    return summary


def _import(hc: HistoryConfig, request: ImportRequest, source: HistorySource,
            summary: ImportSummary, stream: TextIO) -> None:
    markets = tuple(m.upper() for m in request.markets)
    if request.codes:
        symbols = [c for c in request.codes if c.rpartition(".")[2].upper() in markets]
    else:
        symbols = source.universe(markets)
    summary.securities = len(symbols)
    last = source.last_day()
    end = min(request.end, last) if request.end else last
    by_market: Dict[str, List[str]] = {}
    for s in symbols:
        by_market.setdefault(s.rpartition(".")[2].upper(), []).append(s)
    progress = _Progress(len(symbols) * len(request.periods), interval=hc.progress_interval,
                         stream=stream)
    log.info("history_import_started", source=source.kind, dir=request.dir,
             securities=len(symbols), periods=list(request.periods), end=end)
    jobs = [(period, market, by_market[market]) for period in request.periods
            for market in markets if by_market.get(market)]
    writers = _writers(hc, source, len(jobs))
    try:
        if writers > 1:
            _import_parallel(hc, request, source, summary, progress, jobs, end, writers)
        else:
            for period, market, codes in jobs:
                part = ImportSummary(source=summary.source)
                try:
                    _import_file(hc, request, source, part, progress, period, market, codes,
                                 end)
                finally:
                    _fold(summary, part)
    finally:
        progress.close()


def _writers(hc: HistoryConfig, source: HistorySource, files: int) -> int:
    """Files written at once: several only for a source that can be copied into writer
    processes (the simulator; the QMT source keeps its one xtdata client)."""
    if not getattr(source, "parallel", False) or files < 2:
        return 1
    wanted = hc.writers or min(os.cpu_count() or 1, 4)
    return max(1, min(wanted, files))


def _fold(summary: ImportSummary, part: ImportSummary) -> None:
    """Add one file's outcome to the run's (and log the tables it repaired)."""
    for mine, theirs in ((summary.written, part.written), (summary.unchanged, part.unchanged),
                         (summary.replaced, part.replaced), (summary.rejected, part.rejected)):
        for key, count in theirs.items():
            mine[key] = mine.get(key, 0) + count
    summary.failed.update(part.failed)
    summary.recovered.extend(part.recovered)
    if part.recovered:
        files = sorted({entry.rpartition(":")[0] for entry in part.recovered})
        log.warning("history_tables_recovered", files=files, tables=len(part.recovered))


def _import_parallel(hc: HistoryConfig, request: ImportRequest, source: HistorySource,
                     summary: ImportSummary, progress: _Progress,
                     jobs: Sequence[Tuple[str, str, List[str]]], end: int, writers: int) -> None:
    """Each file imported by a writer process of its own, ``writers`` at a time (the
    HDF5 library serialises every call of a process); progress comes back on a queue."""
    context = multiprocessing.get_context("spawn")   # the same on every OS
    events: Any = context.Queue()
    with ProcessPoolExecutor(max_workers=writers, mp_context=context,
                             initializer=_writer_start, initargs=(events,)) as pool:
        # the longest files first, so that no writer is left with a big one at the end
        order = sorted(jobs, key=lambda job: -len(job[2]) * _COST[job[0]])
        futures = [pool.submit(_writer_job, hc, request, source, period, market, codes, end)
                   for period, market, codes in order]
        try:
            pending = set(futures)
            while pending:
                _drain(events, progress, timeout=0.1)
                pending = {f for f in pending if not f.done()}
            _drain(events, progress, timeout=0.0)
            for future in futures:
                try:
                    part = future.result()
                except BrokenProcessPool as exc:
                    raise HistoryError(request.dir, "a writer process died") from exc
                _fold(summary, part)
        except BaseException:
            for future in futures:
                future.cancel()
            raise


def _drain(events: Any, progress: _Progress, *, timeout: float) -> None:
    try:
        securities, bars = events.get(timeout=timeout) if timeout else events.get_nowait()
        progress.advance(securities, bars)
        while True:
            securities, bars = events.get_nowait()
            progress.advance(securities, bars)
    except queue.Empty:
        return


_COST = {"day": 2, "1min": 2, "5min": 3}   # relative work of a file per security (tables
                                          # touched, rows written)
_EVENTS: List[Any] = []     # a writer process's progress queue (set once, at its start)


def _writer_start(events: Any) -> None:
    """A writer process: it dies with the importer (its parent), as a killed run must leave
    no process writing; its progress goes to ``events``."""
    _EVENTS.append(events)
    if sys.platform.startswith("linux"):
        # the kernel kills it with the importer, even by SIGKILL
        import ctypes  # noqa: PLC0415
        import signal  # noqa: PLC0415

        ctypes.CDLL(None).prctl(1, int(signal.SIGKILL))   # PR_SET_PDEATHSIG
    parent = multiprocessing.parent_process()
    if parent is not None:
        def watch() -> None:
            multiprocessing.connection.wait([parent.sentinel])
            os._exit(EXIT_INTERRUPTED)

        threading.Thread(target=watch, name="history-parent-watch", daemon=True).start()


class _RemoteProgress:
    """The progress of a writer process, sent to the importer."""

    def __init__(self, events: Any) -> None:
        self._events = events

    def partial(self, finished: int) -> None:
        """Within-chunk progress is the importer's own source's business: not sent."""

    def advance(self, securities: int, bars: int) -> None:
        self._events.put((securities, bars))


def _writer_job(hc: HistoryConfig, request: ImportRequest, source: HistorySource,
                period: str, market: str, codes: Sequence[str], end: int) -> ImportSummary:
    part = ImportSummary(source=source.kind)
    source.open()
    try:
        _import_file(hc, request, source, part, _RemoteProgress(_EVENTS[0]), period, market,
                     codes, end)
    finally:
        source.close()
    return part


def _import_file(hc: HistoryConfig, request: ImportRequest, source: HistorySource,
                 summary: ImportSummary, progress: Union[_Progress, _RemoteProgress],
                 period: str, market: str, codes: Sequence[str], end: int) -> None:
    default_start = request.start
    if default_start is None:
        default_start = _FROM_LISTING if period == "day" else _shift(end, -hc.minute_days + 1)
    with open_file(request.dir, market, period, "a", compression=hc.compression,
                   recover_corrupt=True) as file:
        if file.recovered:
            summary.recovered.extend(f"{market}:{period}:{n}" for n in file.recovered)
        groups: Dict[int, List[str]] = {}
        for symbol in codes:
            last_stored = file.last(table_name(symbol))
            start = default_start
            if last_stored is not None:
                start = _day_of(last_stored)         # re-read the last stored day
                if request.start is not None:
                    info = file.info(table_name(symbol))
                    if info is not None and info.first is not None \
                            and request.start < _day_of(info.first):
                        start = request.start        # a backfill before the stored bars
            if start > end:
                progress.advance(1, 0)
                continue
            groups.setdefault(start, []).append(symbol)
        rejected: Counter[str] = Counter()
        for start, members in sorted(groups.items()):
            span = 1_000_000 if period == "day" else hc.chunk_days
            windows = _windows(start, end, span)
            for k in range(0, len(members), hc.chunk_codes):
                chunk = members[k:k + hc.chunk_codes]
                live = list(chunk)
                for w_start, w_end in windows:
                    if not live:
                        break
                    fetched = source.fetch(period, live, w_start, w_end, progress.partial)
                    bars_written = 0
                    for symbol, why in fetched.failed.items():
                        summary.failed[f"{symbol} {period}"] = why
                    live = [s for s in live if s not in fetched.failed]
                    present = [s for s in live if len(fetched.bars.get(s) or ())]
                    converted, bad = bars_to_records_many([fetched.bars[s] for s in present])
                    rejected.update(bad)
                    for symbol, rec in zip(present, converted):
                        try:
                            merged = file.merge(table_name(symbol), rec)
                        except HistoryError as exc:
                            summary.failed[f"{symbol} {period}"] = exc.reason
                            continue
                        bars_written += merged.written
                        summary.written[period] = summary.written.get(period, 0) + \
                            merged.written
                        summary.unchanged[period] = summary.unchanged.get(period, 0) + \
                            merged.unchanged
                        if merged.replaced:
                            summary.replaced[period] = summary.replaced.get(period, 0) + \
                                merged.replaced
                    file.commit()
                    progress.advance(0, bars_written)
                progress.advance(len(chunk), 0)
        for reason, count in rejected.items():
            summary.rejected[reason] = summary.rejected.get(reason, 0) + count
        summary.written.setdefault(period, summary.written.get(period, 0))
        summary.unchanged.setdefault(period, summary.unchanged.get(period, 0))
