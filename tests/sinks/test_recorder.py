"""The HDF5 recorder: in a relay, as its own process, under kill -9, disk errors, overflow."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

from helpers import (
    CollectingSink,
    ScriptedSource,
    real_tick,
    relay_command,
    run_relay_with,
    tcp_address,
)
from structlog.testing import capture_logs

from relay.app import Relay
from relay.config import Config, PublishConfig, RecorderConfig
from relay.recording import open_day
from relay.records import SpotRecord
from relay.sinks.recorder import Recorder, day_of

DAY_MS = 1733118954000  # 2024-12-02 13:55:54 China time


def sim_config(directory: Path, *, flush: float = 0.2, securities: int = 300) -> str:
    return f"""
source:
  simulator:
    speed: 20
    securities: {securities}
    date: "2024-12-02"
publish:
  heartbeat_interval: 0.2
  snapshot_address: null
logging:
  level: debug
  format: json
  stats_interval: 5.0
recorder:
  enabled: true
  dir: "{directory}"
  flush_interval: {flush}
  index_interval: 0.5
"""


def run_relay(tmp_path: Path, config: str, address: str) -> subprocess.Popen[str]:
    return run_relay_with(tmp_path, config, "--publish", address,
                          name=f"relay-{time.monotonic_ns()}")


def events(proc: subprocess.Popen[str], name: str, count: int,
           lines: Optional[List[str]] = None) -> Iterator[Dict[str, Any]]:
    """Yield the first ``count`` JSON log lines with event ``name`` (reads stdout live)."""
    assert proc.stdout is not None
    seen = 0
    for line in proc.stdout:
        if lines is not None:
            lines.append(line)
        if line.startswith("{"):
            event = json.loads(line)
            if event.get("event") == name:
                yield event
                seen += 1
                if seen >= count:
                    return
    raise AssertionError(f"process ended before {count} {name} events: "
                         f"{proc.stderr.read() if proc.stderr else ''}")


def finish(proc: subprocess.Popen[str], sig: Optional[int] = signal.SIGTERM) -> Tuple[int, str]:
    if sig is not None and proc.poll() is None:
        proc.send_signal(sig)
    try:
        out, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise AssertionError("process did not stop") from None
    return proc.returncode, out + err


def ticks(n: int, base_ms: int = DAY_MS) -> Dict[str, Dict[str, Any]]:
    return {f"{600000 + i:06d}.SH": real_tick(time=base_ms + i, lastPrice=10.0 + i / 100)
            for i in range(n)}


def relay_config(directory: Path, **recorder: Any) -> Config:
    return Config(
        publish=PublishConfig(addresses=(tcp_address(),), snapshot_address=None),
        recorder=RecorderConfig(enabled=True, dir=str(directory), **recorder),
    )


def test_relay_records_every_published_record(tmp_path: Path) -> None:
    """A relay with the recorder enabled stores exactly what it published, with seq and run."""
    batches = [ticks(40), ticks(25, DAY_MS + 3000), ticks(7, DAY_MS + 6000)]
    sink = CollectingSink()
    relay = Relay(relay_config(tmp_path, flush_interval=0.05),
                  source=ScriptedSource(batches, {"600000.SH": "浦发银行"}, finish=True),
                  sinks=[sink])
    relay.run()
    with open_day(tmp_path / "2024-12-02.h5") as day:
        expected = [r for b in sink.batches for r in b.records]
        assert expected == day.records()
        got = list(day.batches())
        assert [b.first_seq for b in sink.batches] == [b.first_seq for b in got]
        assert [relay.run_id] * 3 == [b.run_id for b in got]
        assert [b.publish_time_ms for b in sink.batches] == [b.publish_time_ms for b in got]
        assert {"simulator"} == {b.source for b in got}
        assert "浦发银行" == day.names["600000.SH"]


def test_kill_9_keeps_every_flushed_record_and_restart_appends(
        tmp_path: Path, procs: List[subprocess.Popen[str]]) -> None:
    """After SIGKILL the day file opens with every flushed row; a restart repairs and appends."""
    rec_dir = tmp_path / "rec"
    proc = run_relay(tmp_path, sim_config(rec_dir, flush=0.1), tcp_address())
    procs.append(proc)
    flushed = list(events(proc, "recorder_flushed", 12))
    proc.send_signal(signal.SIGKILL)
    finish(proc, None)
    path = Path(flushed[-1]["path"])
    with open_day(path) as day:
        rows = len(day)
        records = day.records()
        assert flushed[-1]["rows"] <= rows
        assert rows == sum(len(b.columns["code"]) for b in day.batches())
        first_run = day.run_ids
    assert 1 == len(first_run)
    assert 300 <= rows   # at least the first full-market batch

    again = run_relay(tmp_path, sim_config(rec_dir, flush=0.1), tcp_address())
    procs.append(again)
    early: List[str] = []
    list(events(again, "recorder_flushed", 3, early))
    code, output = finish(again)
    assert 0 == code, output
    assert "recorder_repaired" in "".join(early)
    with open_day(path) as day:
        assert records == day.records()[:rows]
        assert rows < len(day)
        assert first_run == day.run_ids[:1] and 2 == len(day.run_ids)


def test_unwritable_directory_logs_and_relay_keeps_publishing(tmp_path: Path) -> None:
    """A directory that cannot be created logs recorder_failed; every batch is still published."""
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    sink = CollectingSink()
    relay = Relay(relay_config(blocker / "rec", flush_interval=0.05),
                  source=ScriptedSource([ticks(5), ticks(5, DAY_MS + 3000)], finish=True),
                  sinks=[sink])
    with capture_logs() as logs:
        relay.run()
    assert 2 == len(sink.batches)
    failed = [e for e in logs if e["event"] == "recorder_failed"]
    assert failed and "NotADirectoryError" in failed[0]["error"]
    assert not [e for e in logs if e["event"] in ("sink_failed", "batch_failed")]


def records(n: int, base_ms: int = DAY_MS) -> List[SpotRecord]:
    return [SpotRecord("SH", f"{600000 + i:06d}", "", "2024-12-02 13:55:54", 1.0, 1.0, 1.0,
                       1.0, 1.0, 2.0, 3.0, (1.0,) * 5, (2.0,) * 5, (3.0,) * 5, (4.0,) * 5,
                       base_ms + i, 3, 7) for i in range(n)]


def test_full_queue_drops_counts_and_logs_once_per_episode(tmp_path: Path) -> None:
    """Overflow is counted, logged once; recorder_recovered reports the episode's drops."""
    rec = Recorder(str(tmp_path), queue_size=1, flush_interval=0.05)
    with capture_logs() as logs:
        for _ in range(4):   # the writer is not running yet: only the first fits
            rec.write_records(records(3), first_seq=1, run_id="r", source="simulator",
                              publish_time_ms=DAY_MS)
        rec.start()
        deadline = time.monotonic() + 20
        while rec._queue.qsize() and time.monotonic() < deadline:
            time.sleep(0.01)
        rec.write_records(records(3), first_seq=2, run_id="r", source="simulator",
                          publish_time_ms=DAY_MS)
        rec.close()
    names = [e["event"] for e in logs if e["event"].startswith("recorder_d")
             or e["event"] == "recorder_recovered"]
    assert ["recorder_dropping", "recorder_recovered"] == names
    assert 9 == next(e for e in logs if e["event"] == "recorder_recovered")["dropped"]
    assert 9 == rec.dropped
    with open_day(tmp_path / "2024-12-02.h5") as day:
        assert 6 == len(day)


def test_rollover_time_splits_days_and_close_reopen_appends(tmp_path: Path) -> None:
    """Records before the rollover time go to the previous day's file; reopening appends."""
    before = DAY_MS - 6 * 3_600_000   # 07:55:54 China time, before an 08:00 rollover
    assert "2024-12-01" == day_of(before, 8 * 3_600_000)
    for _ in range(2):
        rec = Recorder(str(tmp_path), rollover="08:00")
        rec.start()
        rec.write_records(records(2, before), first_seq=1, run_id="a", source="qmt",
                          publish_time_ms=None)
        rec.write_records(records(3), first_seq=2, run_id="a", source="qmt",
                          publish_time_ms=None)
        rec.close()
    assert ["2024-12-01.h5", "2024-12-02.h5"] == sorted(os.listdir(tmp_path))
    with open_day(tmp_path / "2024-12-02.h5") as day:
        assert records(3) * 2 == day.records()
        assert ["a"] == day.run_ids


def test_record_command_records_a_running_relay(
        tmp_path: Path, procs: List[subprocess.Popen[str]]) -> None:
    """`qmt-relay record URL --dir` stores a relay's stream and stops cleanly on SIGTERM."""
    address = tcp_address()
    relay = run_relay(tmp_path, sim_config(tmp_path / "unused").replace(
        "enabled: true", "enabled: false"), address)
    procs.append(relay)
    out = tmp_path / "rec"
    recorder = relay_command(tmp_path, "record", address, "--dir", str(out), "--codes",
                             "000001.SH,399001.SZ", "--log-level", "debug")
    procs.append(recorder)
    list(events(recorder, "recorder_flushed", 3))
    code, output = finish(recorder)
    assert 0 == code, output
    assert "recorder_closed" in output
    finish(relay)
    (path,) = out.iterdir()
    with open_day(path) as day:
        assert {"000001.SH", "399001.SZ"} == set(day.codes())
        assert {"simulator"} == {b.source for b in day.batches()}
        assert 2 <= len(day)
