"""History benchmark: bars/second written to hikyuu's HDF5 files, bytes per bar, and the
incremental one-day import of the whole simulated market.

Run ``python -m relay.bench history [--securities N] [--years Y] [--minute-days D]``.

1. Day bars of every simulated security for ``years`` years (ending the day before the
   simulator's last day) are generated, converted (:func:`bars_to_records`) and written in
   chunks of ``--chunk`` securities; the three stages are timed separately and together.
2. 1min and 5min bars of every security for ``minute_days`` trading days, the same way.
3. The import end to end: :func:`~relay.history.importer.run_import` of the same day bars into
   an empty directory, as ``qmt-relay history import`` runs it (generated, converted and
   written, each market's file by a writer process of its own: ``history.writers``), timed
   from lock to summary.
4. The incremental run: :func:`~relay.history.importer.run_import` of the last trading day for
   all three periods of the whole market over the files of 1 and 2 (it re-reads the stored
   last day, finds it unchanged, and appends the new one), timed from lock to summary.

Prints figures; asserts nothing. The machine's load shows in them: compare runs on one machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import tempfile
import time
from datetime import date, timedelta
from typing import Dict, List, Optional, Sequence

from relay.config import Config, HistoryConfig, SimulatorConfig, SourceConfig
from relay.history.importer import ImportRequest, run_import
from relay.history.simulator import SimulatorHistory
from relay.history.store import MARKETS, bars_to_records, file_name, open_file, table_name


def _ymd(day: date) -> int:
    return day.year * 10000 + day.month * 100 + day.day


def _day(value: int) -> date:
    return date(value // 10000, value // 100 % 100, value % 100)


def _previous_weekday(day: date, back: int = 1) -> date:
    while back:
        day -= timedelta(days=1)
        if day.weekday() < 5:
            back -= 1
    return day


def _write(directory: str, source: SimulatorHistory, period: str, symbols: List[str],
           start: int, end: int, chunk: int, compression: int) -> Dict[str, float]:
    """Generate, convert and write ``period`` bars of ``symbols``; time each stage."""
    times = {"generate": 0.0, "convert": 0.0, "write": 0.0, "bars": 0.0}
    files = {m: open_file(directory, m, period, "a", compression=compression) for m in MARKETS}
    try:
        for k in range(0, len(symbols), chunk):
            group = symbols[k:k + chunk]
            t0 = time.perf_counter()
            fetched = source.fetch(period, group, start, end)
            t1 = time.perf_counter()
            records = {}
            for symbol, bars in fetched.bars.items():
                rec, _ = bars_to_records(bars.datetime, bars.open, bars.high, bars.low,
                                         bars.close, bars.amount, bars.volume)
                records[symbol] = rec
            t2 = time.perf_counter()
            for symbol, rec in records.items():
                files[symbol[-2:]].append(table_name(symbol), rec)
                times["bars"] += len(rec)
            for file in files.values():
                file.commit()
            t3 = time.perf_counter()
            times["generate"] += t1 - t0
            times["convert"] += t2 - t1
            times["write"] += t3 - t2
        t4 = time.perf_counter()
        for file in files.values():
            file.close()
        times["write"] += time.perf_counter() - t4
    finally:
        for file in files.values():
            file.close()
    size = sum(os.path.getsize(os.path.join(directory, file_name(m, period))) for m in MARKETS)
    times["bytes"] = float(size)
    return times


def _report(period: str, t: Dict[str, float]) -> None:
    bars = t["bars"]
    total = t["generate"] + t["convert"] + t["write"]
    print(f"{period:>5}: {bars:>12,.0f} bars | written {bars / t['write']:>12,.0f} bars/s "
          f"({t['write']:.1f} s) | generated {bars / t['generate']:>12,.0f}/s | converted "
          f"{bars / t['convert']:>12,.0f}/s | end to end {bars / total:>12,.0f}/s | "
          f"{t['bytes'] / bars:.1f} bytes/bar on disk")


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m relay.bench history",
                                     description="history writer benchmark")
    parser.add_argument("--securities", type=int, default=5200)
    parser.add_argument("--years", type=float, default=10.0)
    parser.add_argument("--minute-days", type=int, default=5,
                        help="trading days of 1min/5min bars written before the increment")
    parser.add_argument("--chunk", type=int, default=500, help="securities per commit")
    parser.add_argument("--date", default="2026-12-02",
                        help="the live simulator's date (history ends the day before)")
    parser.add_argument("--compression", type=int, default=HistoryConfig().compression,
                        help="gzip level of the tables written (history.compression)")
    parser.add_argument("--writers", type=int, default=HistoryConfig().writers,
                        help="writer processes of the imports (history.writers; 0 = per CPU)")
    parser.add_argument("--dir", help="where to write (default: a temporary directory)")
    args = parser.parse_args(argv)

    sim = SimulatorConfig(securities=args.securities, date=args.date)
    source = SimulatorHistory(sim)
    symbols = source.universe(MARKETS)
    last = _day(source.last_day())
    existing_end = _previous_weekday(last)
    day_start = existing_end - timedelta(days=int(args.years * 365.25))
    minute_start = _previous_weekday(existing_end, args.minute_days - 1)
    directory = args.dir or tempfile.mkdtemp(prefix="qmt-relay-history-bench-")
    print(f"history benchmark: {len(symbols)} securities, day bars "
          f"{day_start}..{existing_end}, minute bars {minute_start}..{existing_end}, "
          f"then the increment {last}; dir {directory}; {os.cpu_count()} CPUs")
    try:
        _report("day", _write(directory, source, "day", symbols, _ymd(day_start),
                              _ymd(existing_end), args.chunk, args.compression))
        for period in ("1min", "5min"):
            _report(period, _write(directory, source, period, symbols, _ymd(minute_start),
                                   _ymd(existing_end), max(50, args.chunk // 5),
                                   args.compression))
        hc = dataclasses.replace(HistoryConfig(), dir=directory, chunk_codes=args.chunk,
                                 compression=args.compression, writers=args.writers,
                                 progress_interval=3600.0)
        config = Config(source=SourceConfig(simulator=sim), history=hc)
        fresh = os.path.join(directory, "import")
        t0 = time.perf_counter()
        done = run_import(config, ImportRequest(dir=fresh, periods=("day",), markets=MARKETS,
                                                start=_ymd(day_start), end=_ymd(existing_end)),
                          SimulatorHistory(sim))
        elapsed = time.perf_counter() - t0
        writers = args.writers or min(os.cpu_count() or 1, 4)
        print(f"  day: {done.total_written:>12,} bars imported end to end (generated, "
              f"converted, written; {writers} writer processes) in {elapsed:.1f} s: "
              f"{done.total_written / elapsed:>12,.0f} bars/s")
        shutil.rmtree(fresh, ignore_errors=True)
        request = ImportRequest(dir=directory, periods=("day", "1min", "5min"),
                                markets=MARKETS)
        t0 = time.perf_counter()
        summary = run_import(config, request, SimulatorHistory(sim))
        elapsed = time.perf_counter() - t0
        print(f"incremental: one trading day ({last}) of {len(symbols)} securities into "
              f"day+1min+5min in {elapsed:.2f} s (target < 10 s); written "
              f"{summary.written}, re-read and unchanged {summary.unchanged}")
    finally:
        if not args.dir:
            shutil.rmtree(directory, ignore_errors=True)
