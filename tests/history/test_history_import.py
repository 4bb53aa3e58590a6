"""Simulator history, the import job (incremental, safe) and the history CLI."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any, Dict

import h5py
import numpy as np
import pytest
from helpers import relay_env

from relay.config import Config, HistoryConfig, SimulatorConfig, SourceConfig
from relay.errors import HistoryLockedError
from relay.history import open_dir
from relay.history.importer import ImportRequest, run_import
from relay.history.simulator import SimulatorHistory
from relay.history.store import DirectoryLock, committed_rows, open_file
from relay.sources.simulator import SimulatedMarket, SimulatorSource

LIVE_DATE = "2024-12-04"   # a Wednesday: history ends Tuesday 2024-12-03
SIM = SimulatorConfig(securities=12, date=LIVE_DATE, seed=7)


def _config(tmp_path: Path, **history: Any) -> Config:
    history.setdefault("writers", 1)     # in-process; parallel writers have tests of their own
    hc = dataclasses.replace(HistoryConfig(), dir=str(tmp_path / "data"), chunk_codes=10,
                             **history)
    return Config(source=SourceConfig(simulator=SIM), history=hc)


def _request(config: Config, **changes: Any) -> ImportRequest:
    base = ImportRequest(dir=config.history.dir, periods=("day", "1min", "5min"),
                         markets=("SH", "SZ", "BJ"), start=20241125)
    return dataclasses.replace(base, **changes)


def test_simulator_history_matches_the_live_universe() -> None:
    """Same codes and names as the live simulator; last close = its yesterday_close."""
    history = SimulatorHistory(SIM)
    live = SimulatorSource(SIM)
    symbols = history.universe(["SH", "SZ", "BJ"])
    assert list(live.market.symbols) == symbols
    assert dict(live.names) == dict(history.names)
    assert 20241203 == history.last_day()
    fetched = history.fetch("day", symbols, 19900101, 20241203)
    snapshot = live.market.snapshot(0)
    for symbol in symbols:
        bars = fetched.bars[symbol]
        assert snapshot[symbol]["lastClose"] == bars.close[-1]
        assert 202412030000 == int(bars.datetime[-1])
        assert np.all(np.diff(bars.datetime.astype(np.int64)) > 0)
        weekday = [date(int(d) // 100000000, int(d) // 1000000 % 100,
                        int(d) // 10000 % 100).weekday() for d in bars.datetime[::50]]
        assert max(weekday) < 5
        assert np.all(bars.low <= np.minimum(bars.open, bars.close))
        assert np.all(bars.high >= np.maximum(bars.open, bars.close))
    # daily price limits against the previous close (main board 10 %, ST 5 %, ...)
    market = SimulatedMarket(seed=7, securities=12, trading_date=date(2024, 12, 4))
    for profile in market.profiles():
        if profile.limit_pct:
            bars = fetched.bars[profile.symbol]
            prev = np.rint(bars.close[:-1] * profile.tick_divisor)
            up = (prev * (100 + profile.limit_pct) + 50) // 100
            assert np.all(np.rint(bars.high[1:] * profile.tick_divisor) <= up)


def test_simulator_minute_bars_session_layout_and_consistency() -> None:
    """240 one-minute and 48 five-minute bars a day, stamped by end minute, adding up to the day."""
    history = SimulatorHistory(SIM)
    symbol = history.universe(["SZ"])[3]
    day = history.fetch("day", [symbol], 20241202, 20241203).bars[symbol]
    one = history.fetch("1min", [symbol], 20241202, 20241203).bars[symbol]
    five = history.fetch("5min", [symbol], 20241202, 20241203).bars[symbol]
    per_day = len(day)
    assert 240 * per_day == len(one)
    assert 48 * per_day == len(five)
    stamps = [int(s) % 10000 for s in one.datetime[:240]]
    assert (931, 1130, 1301, 1500) == (stamps[0], stamps[119], stamps[120], stamps[239])
    assert [935, 1130, 1305, 1500] == [int(s) % 10000 for s in five.datetime[[0, 23, 24, 47]]]
    last = slice(-240, None)
    assert (day.open[-1], day.high[-1], day.low[-1], day.close[-1], day.volume[-1]) == (
        one.open[last][0], one.high[last].max(), one.low[last].min(), one.close[-1],
        one.volume[last].sum())
    assert five.volume[-48:].sum() == one.volume[last].sum()
    # windows and subsets give the same bars (counter-based randomness)
    alone = history.fetch("1min", [symbol], 20241203, 20241203).bars[symbol]
    assert one.close[-240:].tolist() == alone.close.tolist()


def test_import_incremental_and_nothing_new(tmp_path: Path) -> None:
    """A re-run writes nothing and says so; a later end appends only the new days."""
    config = _config(tmp_path)
    first = run_import(config, _request(config, end=20241129), SimulatorHistory(SIM))
    assert 0 == first.exit_code
    assert first.written["1min"] == 240 * first.written["day"]
    again = run_import(config, _request(config, end=20241129), SimulatorHistory(SIM))
    assert 0 == again.total_written
    assert "nothing new" in again.lines()[1]
    more = run_import(config, _request(config), SimulatorHistory(SIM))   # to 2024-12-03
    days = more.written["day"]
    assert days > 0
    assert 240 * days == more.written["1min"]
    assert 48 * days == more.written["5min"]
    # the re-read last day is found unchanged
    assert more.unchanged["day"] > 0
    full = tmp_path / "full"
    run_import(config, dataclasses.replace(_request(config), dir=str(full), periods=("5min",)),
               SimulatorHistory(SIM))
    with open_dir(config.history.dir) as a, open_dir(full) as b:
        for symbol in a.symbols("5min"):
            assert a.raw(symbol, "5min").tolist() == b.raw(symbol, "5min").tolist()


def test_parallel_writers_write_what_one_process_writes(tmp_path: Path) -> None:
    """Files written by writer processes (one per file, two at a time) equal those of an
    in-process import, and so does the summary; a re-run finds nothing new."""
    from history_helpers import assert_same_tables

    one = _config(tmp_path / "one", writers=1)
    two = _config(tmp_path / "two", writers=2)
    first = run_import(one, _request(one), SimulatorHistory(SIM))
    second = run_import(two, _request(two), SimulatorHistory(SIM))
    assert first.written == second.written and first.total_written > 0
    assert (first.unchanged, first.rejected, first.failed) == (
        second.unchanged, second.rejected, second.failed)
    assert_same_tables(Path(one.history.dir), Path(two.history.dir))
    again = run_import(two, _request(two), SimulatorHistory(SIM))
    assert 0 == again.total_written


def test_partial_last_day_is_replaced(tmp_path: Path) -> None:
    """A partial (intraday) last day stored earlier is completed by the next run."""
    config = _config(tmp_path)
    run_import(config, _request(config, periods=("5min",)), SimulatorHistory(SIM))
    with open_file(config.history.dir, "SH", "5min", "a") as f:
        name = f.names()[0]
        rows = f.read(name)
        f.replace_from(name, int(rows[-30]["datetime"]), rows[-30:-20])   # a partial day
        partial = rows[-30:-20].copy()
        partial["closePrice"] += 1                                       # intraday values
        f.commit()
        f.replace_from(name, int(rows[-30]["datetime"]), partial)
    summary = run_import(config, _request(config, periods=("5min",)), SimulatorHistory(SIM))
    assert summary.replaced["5min"] == 10
    with open_file(config.history.dir, "SH", "5min") as f:
        assert rows.tolist() == f.read(name).tolist()


def test_second_concurrent_run_is_refused(tmp_path: Path) -> None:
    """The directory lock turns a second writer away."""
    config = _config(tmp_path)
    with DirectoryLock(config.history.dir), pytest.raises(HistoryLockedError):
        run_import(config, _request(config, periods=("day",)), SimulatorHistory(SIM))


def _cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "relay", "history", *args],
                          capture_output=True, text=True, env=relay_env(), cwd=tmp_path,
                          timeout=120)


def test_cli_import_show_and_exit_codes(tmp_path: Path) -> None:
    """history import writes hikyuu files; show prints them; bad input exits 2, a lock 3."""
    cfg = tmp_path / "relay.yaml"
    cfg.write_text(f"source:\n  simulator:\n    securities: 12\n    date: '{LIVE_DATE}'\n")
    data = tmp_path / "hikyuu"
    done = _cli(tmp_path, "import", "--dir", str(data), "--config", str(cfg),
                "--periods", "day,5min", "--start", "20241125")
    assert 0 == done.returncode, done.stderr
    assert "5min:" in done.stderr
    lines = [json.loads(x) for x in done.stdout.splitlines() if x.startswith("{")]
    assert "history_import_done" in [x["event"] for x in lines]
    assert {"sh_day.h5", "sh_5min.h5", "sz_day.h5", "bj_5min.h5"} <= {
        p.name for p in data.iterdir()}
    shown = _cli(tmp_path, "show", "--dir", str(data), "000001.SH", "--period", "day",
                 "--tail", "3")
    assert 0 == shown.returncode, shown.stderr
    assert "2024-12-03" in shown.stdout.splitlines()[-1]
    assert 5 == len(shown.stdout.splitlines())
    bad = _cli(tmp_path, "import", "--dir", str(data), "--periods", "day,week")
    assert 2 == bad.returncode
    assert "--periods" in bad.stderr
    with DirectoryLock(data):
        locked = _cli(tmp_path, "import", "--dir", str(data), "--config", str(cfg))
    assert 3 == locked.returncode
    assert "locked" in locked.stderr


def test_killed_import_leaves_readable_files_and_rerun_completes(tmp_path: Path) -> None:
    """SIGKILL in the middle of writing: every file opens, every table is a clean prefix."""
    if sys.platform == "win32":
        pytest.skip("SIGKILL is POSIX; Windows has no equivalent signal to test with")
    cfg = tmp_path / "relay.yaml"
    cfg.write_text(f"source:\n  simulator:\n    securities: 12\n    seed: 7\n"
                   f"    date: '{LIVE_DATE}'\n"
                   "history:\n  chunk_codes: 2\n  progress_interval: 0.01\n")
    data = tmp_path / "hikyuu"
    proc = subprocess.Popen([sys.executable, "-m", "relay", "history", "import", "--dir",
                             str(data), "--config", str(cfg), "--periods", "1min",
                             "--start", "20241111"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env=relay_env(), cwd=tmp_path)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:     # wait until bars are being written, then kill
            if '"history_progress"' in line and json.loads(line)["bars"] > 0:
                break
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
        if proc.stdout is not None:
            proc.stdout.close()
    files = list(data.glob("*.h5"))
    assert files
    for path in files:
        with _open_when_free(path) as h5:
            marks = committed_rows(h5)
            for name, ds in h5["data"].items():
                rows = ds[: marks.get(name, (ds.shape[0], 0))[0]]
                assert np.all(np.diff(rows["datetime"].astype(np.int64)) > 0), name
    rerun = _cli(tmp_path, "import", "--dir", str(data), "--config", str(cfg), "--periods",
                 "1min", "--start", "20241111")
    assert 0 == rerun.returncode, rerun.stderr
    reference = tmp_path / "reference"
    config = _config(tmp_path)
    run_import(config, _request(config, dir=str(reference), periods=("1min",),
                                start=20241111), SimulatorHistory(SIM))
    with open_dir(data) as a, open_dir(reference) as b:
        for period in ("1min",):
            assert a.symbols(period) == b.symbols(period)
            for symbol in a.symbols(period):
                assert a.raw(symbol, period).tolist() == b.raw(symbol, period).tolist()


def _open_when_free(path: Path) -> h5py.File:
    """Open read-only once HDF5's file lock is free (the writer processes of a killed
    import die with it, within moments)."""
    deadline = time.monotonic() + 10
    while True:
        try:
            return h5py.File(path, "r")
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_open_dir_plain_units(tmp_path: Path) -> None:
    """open_dir gives yuan, shares and datetime64, as NumPy and pandas."""
    config = _config(tmp_path)
    run_import(config, _request(config, periods=("day",), markets=("SH",)),
               SimulatorHistory(SIM))
    history = SimulatorHistory(SIM)
    symbol = history.universe(["SH"])[0]
    source = history.fetch("day", [symbol], 20241125, 20241203).bars[symbol]
    with open_dir(config.history.dir) as hist:
        bars = hist.bars(symbol, "day", start="2024-11-25")
        frame = hist.frame(symbol, "day", start="20241125", end="2024-12-03")
        raw: Dict[str, Any] = {"n": len(hist.raw(symbol, "day"))}
    assert np.allclose(source.close, bars["close"])
    assert np.allclose(np.rint(source.volume) * 100, bars["volume"])
    assert str(bars["datetime"][-1]) == "2024-12-03T00:00"
    assert len(frame) == len(bars) == raw["n"]
    assert list(frame.columns) == ["open", "high", "low", "close", "amount", "volume"]
