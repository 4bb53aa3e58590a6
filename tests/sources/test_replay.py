"""The replay source: tick dicts that normalise back exactly, and a full record -> replay run."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import threading
from pathlib import Path
from typing import List, Tuple

import pytest
from helpers import run_relay_with, tcp_address

from relay.client import Subscriber
from relay.config import Config, ReplayConfig, SimulatorConfig, SourceConfig
from relay.errors import SourceError
from relay.normalise import Normaliser
from relay.recording import open_day
from relay.records import SpotRecord
from relay.sinks.recorder import Recorder
from relay.sources import create_source
from relay.sources.replay import ReplaySource, _invert, tick_dicts
from relay.sources.simulator import SimulatorSource


def record(directory: Path, units: str) -> Path:
    """Record 15 simulator batches normalised in ``units``."""
    source = SimulatorSource(SimulatorConfig(securities=150, speed=200, date="2024-12-02"))

    async def main() -> None:
        await source.start()
        normaliser = Normaliser(source.names, units=units)
        rec = Recorder(str(directory), units=units)
        rec.start()
        n = 0
        async for batch in source.batches():
            n += 1
            rec.write_records(normaliser.normalise_batch(batch).records, first_seq=n,
                              run_id="r", source="simulator", publish_time_ms=n * 1000)
            if n == 15:
                break
        await source.close()
        rec.close()

    asyncio.run(main())
    return directory / "2024-12-02.h5"


@pytest.mark.parametrize("units", ["hikyuu", "raw"])
def test_tick_dicts_normalise_back_to_the_same_records(tmp_path: Path, units: str) -> None:
    """Every recorded batch, turned into QMT tick dicts and normalised again, is unchanged."""
    with open_day(record(tmp_path, units)) as day:
        normaliser = Normaliser(day.names, units=units)
        batches = list(day.batches())
        assert 15 == len(batches)
        for batch in batches:
            assert batch.records == normaliser.normalise_batch(
                tick_dicts(batch.columns, day.units)).records


def test_invert_finds_the_exact_preimage() -> None:
    """_invert(x / f, f) / f == x / f for awkward amounts and volumes."""
    for raw in (862127800.0, 0.1, 123456789.123, 1e15 + 1, 3.3, 75861284.0, 7.000000000000001):
        for factor in (100, 10000):
            stored = raw / factor
            assert stored == _invert(stored, factor) / factor


def test_source_errors_and_registry(tmp_path: Path) -> None:
    """kind "replay" builds a ReplaySource; a missing or foreign file is a SourceError."""
    missing = Config(source=SourceConfig(kind="replay",
                                         replay=ReplayConfig(file=str(tmp_path / "no.h5"))))
    source = create_source(missing)
    assert isinstance(source, ReplaySource)
    with pytest.raises(SourceError, match=r"cannot open .*no\.h5"):
        asyncio.run(source.start())
    with pytest.raises(SourceError, match="no file to replay"):
        asyncio.run(ReplaySource(ReplayConfig()).start())


def test_replay_paces_by_publish_time_and_ends(tmp_path: Path) -> None:
    """With a fake clock, batches come out when (publish time - first) / speed has passed."""
    path = record(tmp_path, "hikyuu")
    now = [100.0]
    waits: List[float] = []
    source = ReplaySource(ReplayConfig(file=str(path), speed=4.0), clock=lambda: now[0])

    async def fake_wait(_stop: asyncio.Event, seconds: float) -> bool:
        waits.append(seconds)
        now[0] += seconds
        return False

    source._wait = fake_wait  # type: ignore[method-assign,assignment]

    async def main() -> int:
        await source.start()
        return len([b async for b in source.batches()])

    assert 15 == asyncio.run(main())
    assert [0.25] * 14 == [round(w, 6) for w in waits]   # 1000 ms apart, at speed 4


# -- end to end: record a relay, replay the file through another -----------------------------


def relay(tmp_path: Path, name: str, config: str, *args: str) -> subprocess.Popen[str]:
    return run_relay_with(tmp_path, config, *args, name=name)


class Collector:
    """Subscribes in a thread and keeps every batch (records, source)."""

    def __init__(self, url: str) -> None:
        self.sub = Subscriber(url)
        self.batches: List[Tuple[List[SpotRecord], str]] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        for batch in self.sub:
            self.batches.append((batch.records, batch.source or ""))

    def stop(self) -> List[Tuple[List[SpotRecord], str]]:
        self.sub.close()
        self.thread.join(10)
        return self.batches

    def heartbeat(self) -> bool:
        return self.sub.last_heartbeat is not None


COMMON = """
publish:
  heartbeat_interval: 0.1
  snapshot_address: null
logging:
  format: json
  level: debug
"""


def wait_for(proc: subprocess.Popen[str], event: str, count: int) -> None:
    assert proc.stdout is not None
    seen = 0
    for line in proc.stdout:
        if f'"event": "{event}"' in line:
            seen += 1
            if seen >= count:
                return
    raise AssertionError(f"{event} x{count} never logged")


def test_subscriber_sees_the_same_records_live_and_replayed(
        tmp_path: Path, procs: List[subprocess.Popen[str]]) -> None:
    """Record the simulator through a relay, replay the file: the subscriber gets equal batches."""
    rec_dir = tmp_path / "rec"
    live_url, replay_url = tcp_address(), tcp_address()
    live = Collector(live_url)
    a = relay(tmp_path, "a", COMMON + f"""
source:
  simulator: {{speed: 20, securities: 300, date: "2024-12-02"}}
recorder: {{enabled: true, dir: "{rec_dir}", flush_interval: 0.2, index_interval: 0.5}}
""", "--publish", live_url)
    procs.append(a)
    wait_for(a, "recorder_flushed", 8)
    a.send_signal(signal.SIGTERM)
    a.communicate(timeout=30)
    assert 0 == a.returncode
    live_batches = live.stop()
    (path,) = rec_dir.iterdir()

    replayed = Collector(replay_url)
    b = relay(tmp_path, "b", COMMON + """
source:
  replay: {start_delay: 2.0}
""", "--source", "replay", "--file", str(path), "--speed", "1", "--publish", replay_url)
    procs.append(b)
    out, err = b.communicate(timeout=60)   # the relay stops by itself at the end of the file
    assert 0 == b.returncode, err
    assert '"event": "replay_finished"' in out
    replay_batches = replayed.stop()

    with open_day(path) as day:
        recorded = [batch.records for batch in day.batches()]
    assert recorded == [records for records, _ in replay_batches]
    assert {"replay"} == {source for _, source in replay_batches}
    assert {"simulator"} == {source for _, source in live_batches}
    live_records = [records for records, _ in live_batches]
    assert 5 <= len(live_records)
    start = recorded.index(live_records[0])
    assert live_records == recorded[start:start + len(live_records)]
