"""fetch_bars and fetch_catalogue in a process where pynng, NumPy, pandas and h5py cannot be
imported: the history client is pure Python (stdlib + flatbuffers)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from helpers import relay_env, tcp_address
from history_helpers import simulator, write_history

from relay.client import fetch_bars
from relay.history.service import HistoryService

CHILD = r"""
import importlib.abc, json, sys

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("pynng", "numpy", "pandas", "h5py", "structlog"):
            raise ImportError(f"{name} is blocked in this test")
        return None

sys.meta_path.insert(0, Block())
from relay.client import fetch_bars, fetch_catalogue

url, symbol = sys.argv[1], sys.argv[2]
catalogue = fetch_catalogue(url)
bars = fetch_bars(url, symbol, "5min", start="2024-06-03")
try:
    bars.to_numpy()
    numpy = "imported"
except ImportError as exc:
    numpy = str(exc)
print(json.dumps({"tables": len(catalogue), "bars": len(bars), "raw": bars.raw.hex(),
                  "first": str(bars.records[0].datetime), "numpy": numpy}))
"""


def test_history_client_needs_nothing_compiled(tmp_path: Path) -> None:
    """Catalogue and bars arrive in a process that cannot import pynng/NumPy/pandas/h5py."""
    write_history(tmp_path, simulator(), start={"day": 20240520, "1min": 20240604,
                                                "5min": 20240603}, end=20240604,
                  markets=("SH",))
    url = tcp_address()
    service = HistoryService(url, str(tmp_path), max_reply_bytes=8192)
    service.start()
    try:
        symbol = "000001.SH"
        want = fetch_bars(url, symbol, "5min", start="2024-06-03")
        out = subprocess.run([sys.executable, "-c", CHILD, url, symbol], capture_output=True,
                             text=True, env=relay_env(), timeout=60)
    finally:
        service.close()
    assert 0 == out.returncode, out.stderr
    got = json.loads(out.stdout)
    assert (96, want.raw.hex(), "2024-06-03 09:35:00") == (got["bars"], got["raw"], got["first"])
    assert got["tables"] > 0
    assert "blocked" in got["numpy"]
