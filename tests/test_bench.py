"""The hot-path benchmarks run and print their JSON figures (no timing is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.parametrize("argv, keys", [
    (["--records", "300", "--bursts", "50", "--repeat", "1"],
     ("encode_speedup", "decode_speedup", "columns_numpy_rps", "columns_numpy_speedup",
      "columns_pandas_rps", "e2e_p50_ms", "e2e_p99_ms", "e2e_columns_p50_ms",
      "e2e_columns_p99_ms", "heap_kept")),
    (["client", "--records", "300", "--bursts", "5", "--repeat", "1"],
     ("decode_objects_speedup", "columns_numpy_speedup", "e2e_columns_p99_ms", "heap_kept")),
])
def test_bench_prints_its_figures(argv: list, keys: tuple) -> None:
    out = subprocess.run([sys.executable, "-m", "relay.bench", *argv], capture_output=True,
                         text=True, timeout=240, check=True).stdout
    figures = json.loads(out.strip().splitlines()[-1])
    assert figures["records"] == 300
    for key in keys:
        assert key in figures, key
    assert all(figures[k] > 0 for k in keys if k != "heap_kept")
    assert isinstance(figures["heap_kept"], bool)
