"""History sync benchmark: bars/second mirrored over loopback, and one new day's sync time.

Run ``python -m relay.bench history-sync [--securities N] [--days N] [--dir DIR]``. It writes
a simulated market's history through the store (day bars for ``--days`` trading days, one
day of 1min and 5min bars), serves it from a history service in a child process (as the
relay does, so the mirror does not share its interpreter), and times:

1. a full-market day-bar sync into an empty directory (bars/second);
2. after one more trading day is appended on the server for all three periods, the sync of
   that day into the mirror (seconds), with the bars it fetched.

Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from typing import List, Optional, Sequence

from relay.config import SimulatorConfig
from relay.history.simulator import SimulatorHistory
from relay.history.store import bars_to_records, open_file

_SERVE = """
import sys
from relay.history.service import HistoryService
service = HistoryService(sys.argv[1], sys.argv[2])
service.start()
print("ready", flush=True)
sys.stdin.read()
service.close()
"""


def _write(directory: str, source: SimulatorHistory, markets: Sequence[str],
           periods: Sequence[str], start: int, end: int) -> int:
    total = 0
    for market in markets:
        symbols = source.universe([market])
        for period in periods:
            fetched = source.fetch(period, symbols, start, end)
            with open_file(directory, market, period, "a") as hf:
                for symbol, bars in fetched.bars.items():
                    recs, _ = bars_to_records(bars.datetime, bars.open, bars.high, bars.low,
                                              bars.close, bars.amount, bars.volume)
                    code, _, mk = symbol.partition(".")
                    hf.merge(mk + code, recs)
                    total += int(recs.shape[0])
    return total


def _trading_days(source: SimulatorHistory, count: int) -> List[int]:
    """The last ``count`` trading days of the source (from its day bars of an index)."""
    probe = source.universe(["SH"])[0]
    last = source.last_day()
    start = last - 10_000 * (count // 200 + 2)
    days = source.fetch("day", [probe], start, last).bars[probe].datetime // 10_000
    return [int(d) for d in days[-count:]]


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m relay.bench history-sync")
    parser.add_argument("--securities", type=int, default=5200)
    parser.add_argument("--days", type=int, default=500, help="trading days of day bars")
    parser.add_argument("--date", default="2024-12-02", help="the live simulator's date")
    parser.add_argument("--dir", help="work directory (default: a temporary one)")
    parser.add_argument("--reuse", action="store_true",
                        help="start from the server directory an earlier run with the same "
                             "options left in DIR (skips writing it)")
    args = parser.parse_args(argv)
    source = SimulatorHistory(SimulatorConfig(securities=args.securities, date=args.date))
    markets = ("SH", "SZ", "BJ")
    days = _trading_days(source, args.days + 1)
    work = args.dir or tempfile.mkdtemp(prefix="history-sync-bench-")
    server, mirror = os.path.join(work, "server"), os.path.join(work, "mirror")
    import shutil  # noqa: PLC0415

    base = os.path.join(work, "server-base")   # the server before the new day, for --reuse
    shutil.rmtree(mirror, ignore_errors=True)
    shutil.rmtree(server, ignore_errors=True)
    if args.reuse and os.path.exists(os.path.join(base, "sh_day.h5")):
        shutil.copytree(base, server)
    else:
        shutil.rmtree(base, ignore_errors=True)
        os.makedirs(server)
        t = time.perf_counter()
        n_day = _write(server, source, markets, ("day",), days[0], days[-2])
        written = time.perf_counter() - t
        print(f"server: {n_day:,} day bars ({args.securities} securities x {args.days} days) "
              f"generated and written through the store in {written:.1f} s "
              f"({n_day / written:,.0f} bars/s: the mirror writes through the same store)")
        t = time.perf_counter()
        n_min = _write(server, source, markets, ("1min", "5min"), days[-2], days[-2])
        print(f"server: {n_min:,} minute bars of {days[-2]} in {time.perf_counter() - t:.1f} s")
        if args.dir:
            shutil.copytree(server, base)

    from relay.history.sync import sync  # noqa: PLC0415

    url = f"tcp://127.0.0.1:{_free_port()}"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    child = subprocess.Popen([sys.executable, "-c", _SERVE, url, server], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert child.stdout is not None
        for line in child.stdout:
            if line.strip() == "ready":
                break
        t = time.perf_counter()
        full = sync(url, mirror, periods=["day"])
        elapsed = time.perf_counter() - t
        print(f"full-market day-bar sync into an empty dir: {full.bars:,} bars in "
              f"{elapsed:.2f} s = {full.bars / elapsed:,.0f} bars/s ({full.requests} requests, "
              f"{full.bytes / 1e6:.1f} MB, {full.index_rows:,} index rows)")
        t = time.perf_counter()
        minutes = sync(url, mirror, periods=["1min", "5min"])
        print(f"minute files of {days[-2]} into the mirror: {minutes.bars:,} bars in "
              f"{time.perf_counter() - t:.2f} s")
        t = time.perf_counter()
        added = _write(server, source, markets, ("day", "1min", "5min"), days[-1], days[-1])
        print(f"server: appended {days[-1]}, {added:,} bars in all three periods "
              f"({time.perf_counter() - t:.1f} s)")
        t = time.perf_counter()
        day = sync(url, mirror)
        elapsed = time.perf_counter() - t
        print(f"one new trading day, all three periods, whole market: {elapsed:.2f} s "
              f"({day.bars:,} bars, {day.index_rows:,} index rows, {day.tables:,} tables, "
              f"{day.requests} requests, {day.bytes / 1e6:.1f} MB)")
    finally:
        if child.stdin is not None:
            child.stdin.close()
        child.wait(30)
        if child.stdout is not None:
            child.stdout.close()
    if not args.dir:
        shutil.rmtree(work, ignore_errors=True)


def _free_port() -> int:
    import socket  # noqa: PLC0415

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


if __name__ == "__main__":
    main(sys.argv[1:])
