"""End to end against the real relay as a subprocess: restarts, snapshot, the examples."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator, List, Tuple

import pytest
from helpers import REPO, relay_env, run_relay_with, tcp_address

from relay.client import (
    Batch,
    Connected,
    Disconnected,
    Restart,
    Subscriber,
    TransportError,
    fetch_snapshot,
)

CONFIG = """
source:
  simulator:
    speed: 20
publish:
  heartbeat_interval: 0.2
  snapshot_address: {snapshot}
logging:
  format: json
  stats_interval: 5
"""


def start_relay(tmp_path: Path, stream: str, snapshot: str) -> subprocess.Popen[str]:
    return run_relay_with(tmp_path, CONFIG.format(snapshot=snapshot), "--publish", stream,
                          quiet=True)


def reap(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(20)


@pytest.fixture(scope="module")
def relay_proc(tmp_path_factory: Any) -> Iterator[Tuple[str, str]]:
    """One relay subprocess shared by the snapshot and example tests."""
    stream, snapshot = tcp_address(), tcp_address()
    proc = start_relay(tmp_path_factory.mktemp("relay"), stream, snapshot)
    try:
        deadline = time.monotonic() + 60
        while True:  # until the whole simulated market has been published once
            assert proc.poll() is None, "relay exited"
            assert time.monotonic() < deadline, "relay never published a full market"
            try:
                if len(fetch_snapshot(snapshot, timeout=2)) >= 5000:
                    break
            except TransportError:
                pass
            time.sleep(0.2)
        yield stream, snapshot
    finally:
        reap(proc)


def test_kill_restart_reconnects_reports_restart_and_keeps_delivering(tmp_path: Path) -> None:
    """kill -9 the relay, start a new one on the same address: Restart, batches resume."""
    stream, snapshot = tcp_address(), tcp_address()
    events: List[Any] = []
    first = start_relay(tmp_path, stream, snapshot)
    second = None
    try:
        with Subscriber(stream, reconnect_wait=0.05, reconnect_wait_max=0.5,
                        heartbeat_timeout=5, on_event=events.append) as sub:
            before = [sub.recv(timeout=60) for _ in range(2)]
            old_run = sub.run_id
            first.kill()
            first.wait(20)
            deadline = time.monotonic() + 30
            while not any(isinstance(e, Disconnected) for e in events):
                assert time.monotonic() < deadline, "disconnect not noticed"
                sub.next_update(0.1)
            second = start_relay(tmp_path, stream, snapshot)
            after: List[Batch] = []
            deadline = time.monotonic() + 60
            while len(after) < 2:
                assert time.monotonic() < deadline, f"no batches after restart: {events}"
                batch = sub.recv(timeout=1)
                if batch is not None:
                    after.append(batch)
    finally:
        reap(first)
        if second is not None:
            reap(second)
    assert all(b is not None and b.run_id == old_run for b in before)
    restarts = [e for e in events if isinstance(e, Restart)]
    assert 1 == len(restarts) and old_run == restarts[0].old_run_id
    new_run = restarts[0].new_run_id
    assert new_run != old_run
    assert {new_run} == {b.run_id for b in after}
    assert 2 <= sum(isinstance(e, Connected) for e in events)
    assert events.index(restarts[0]) > next(i for i, e in enumerate(events)
                                            if isinstance(e, Disconnected))


def test_snapshot_then_stream_from_a_running_relay(relay_proc: Tuple[str, str]) -> None:
    """snapshot=True: a full-market snapshot first, then stream batches newer than it."""
    stream, snapshot = relay_proc
    with Subscriber(stream, snapshot=True, snapshot_url=snapshot) as sub:
        snap = sub.recv(timeout=30)
        nxt = sub.recv(timeout=30)
    assert snap is not None and snap.snapshot and len(snap) >= 5000
    assert len({r.symbol for r in snap.records}) == len(snap)
    assert nxt is not None and not nxt.snapshot
    assert snap.run_id == nxt.run_id
    assert snap.last_seq is not None and nxt.first_seq is not None
    assert nxt.first_seq > snap.last_seq
    pd = pytest.importorskip("pandas")
    frame = snap.to_pandas()
    assert isinstance(frame, pd.DataFrame) and len(snap) == len(frame)
    assert {"close", "bid1", "ask_amount5", "time_ms"} <= set(frame.columns)


def test_columns_mode_from_a_running_relay(relay_proc: Tuple[str, str]) -> None:
    """columns=True: the snapshot and stream batches as NumPy columns equal their records."""
    pytest.importorskip("numpy")
    from relay.client._columns import records_arrays

    stream, snapshot = relay_proc
    with Subscriber(stream, snapshot=True, snapshot_url=snapshot, columns=True) as sub:
        snap = sub.recv(timeout=30)
        nxt = sub.recv(timeout=30)
    assert snap is not None and nxt is not None and snap.snapshot and not nxt.snapshot
    for batch in (snap, nxt):
        assert batch._records is None  # nothing built yet
        arrays = batch.to_numpy()
        assert batch._arrays() is not None and batch._records is None  # the column route
        expected = records_arrays(batch.records)
        assert list(expected) == list(arrays)
        for name, want in expected.items():
            assert want.dtype == arrays[name].dtype
            assert want.tobytes() == arrays[name].tobytes(), name
    assert len(snap) >= 5000 and len(snap) == len(snap.to_numpy()["close"])


def run_example(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(REPO / "examples" / name), *args],
                          capture_output=True, text=True, timeout=60, env=relay_env())


def test_latest_prices_example(relay_proc: Tuple[str, str]) -> None:
    """examples/latest_prices.py prints prices of the asked codes and exits after --count."""
    stream, snapshot = relay_proc
    out = run_example("latest_prices.py", stream, "--snapshot", "--snapshot-url", snapshot,
                      "--codes", "000001.SH,399001.SZ", "--count", "2")
    assert 0 == out.returncode, out.stderr
    symbols = {line.split()[2] for line in out.stdout.splitlines()}
    assert {"000001.SH", "399001.SZ"} == symbols


def test_market_dataframe_example(relay_proc: Tuple[str, str]) -> None:
    """examples/market_dataframe.py builds the full market from the snapshot, then folds."""
    pytest.importorskip("pandas")
    stream, snapshot = relay_proc
    out = run_example("market_dataframe.py", stream, "--snapshot-url", snapshot,
                      "--count", "3")
    assert 0 == out.returncode, out.stderr
    lines = out.stdout.splitlines()
    assert 3 == len(lines)
    assert lines[0].startswith("snapshot seq")
    assert all(line.startswith("batch seq") for line in lines[1:])
    sizes = {int(line.split("market ")[1].split()[0]) for line in lines}
    assert 1 == len(sizes) and sizes.pop() >= 5000
