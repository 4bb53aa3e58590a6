"""Helpers for the history service and sync tests: a small simulated history directory."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import h5py
import numpy as np

from relay.config import SimulatorConfig
from relay.history.simulator import SimulatorHistory
from relay.history.store import bars_to_records, file_name, open_file

LIVE_DATE = "2024-06-05"   # a Wednesday: history ends Tuesday 2024-06-04
PERIODS = ("day", "1min", "5min")


def simulator(securities: int = 10) -> SimulatorHistory:
    return SimulatorHistory(SimulatorConfig(securities=securities, date=LIVE_DATE))


def write_history(directory: Path, source: SimulatorHistory, *, start: Dict[str, int],
                  end: int, markets: Sequence[str] = ("SH", "SZ"),
                  periods: Sequence[str] = PERIODS) -> Dict[Tuple[str, str], int]:
    """Append the source's bars of days ``start[period]``..``end`` through the store.

    Returns:
        Rows written per (market, period).
    """
    written: Dict[Tuple[str, str], int] = {}
    directory.mkdir(parents=True, exist_ok=True)
    for market in markets:
        symbols = source.universe([market])
        for period in periods:
            fetched = source.fetch(period, symbols, start[period], end)
            with open_file(directory, market, period, "a") as hf:
                n = 0
                for symbol, bars in fetched.bars.items():
                    recs, _ = bars_to_records(bars.datetime, bars.open, bars.high, bars.low,
                                              bars.close, bars.amount, bars.volume)
                    code, _, mk = symbol.partition(".")
                    hf.merge(mk + code, recs)
                    n += int(recs.shape[0])
            written[(market, period)] = n
    return written


def tables_of(directory: Path) -> Dict[str, Dict[str, np.ndarray]]:
    """Every hikyuu table of every history file: {file name: {"/group/table": rows}} (the
    store's own commit record, ``relay_state``, is bookkeeping and left out)."""
    out: Dict[str, Dict[str, np.ndarray]] = {}
    for market in ("SH", "SZ", "BJ"):
        for period in PERIODS:
            path = directory / file_name(market, period)
            if not path.exists():
                continue
            found: Dict[str, np.ndarray] = {}
            with h5py.File(path, "r") as f:
                def visit(name: str, obj: object, found: Dict[str, np.ndarray] = found) -> None:
                    if isinstance(obj, h5py.Dataset) and name != "relay_state":
                        found[name] = obj[:]
                f.visititems(visit)
            out[path.name] = found
    return out


def assert_same_tables(server: Path, mirror: Path, names: List[str] | None = None) -> None:
    """The mirror holds exactly the server's datasets, field for field."""
    want, got = tables_of(server), tables_of(mirror)
    if names is not None:
        want = {k: v for k, v in want.items() if k in names}
    assert sorted(want) == sorted(got)
    for fname, tables in want.items():
        assert sorted(tables) == sorted(got[fname]), fname
        for key, rows in tables.items():
            other = got[fname][key]
            assert rows.dtype.names == other.dtype.names, (fname, key)
            for field in rows.dtype.names or ():
                assert rows[field].tolist() == other[field].tolist(), (fname, key, field)
