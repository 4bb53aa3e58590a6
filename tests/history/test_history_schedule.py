"""The running relay's scheduled import: a child process at China times on trading days."""

from __future__ import annotations

import dataclasses
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from structlog.testing import capture_logs

from relay.config import Config, HistoryConfig, QmtConfig, SimulatorConfig, SourceConfig
from relay.history import open_dir
from relay.history.schedule import HistorySchedule

CHINA = timezone(timedelta(hours=8))


def _config(tmp_path: Path, holidays: tuple = ()) -> Config:
    hc = dataclasses.replace(HistoryConfig(), dir=str(tmp_path / "data"), schedule=("15:35",),
                             periods=("day",), start="20241125")
    sim = SimulatorConfig(securities=10, date="2024-12-04")
    qmt = dataclasses.replace(QmtConfig(), holidays=holidays)
    return Config(source=SourceConfig(simulator=sim, qmt=qmt), history=hc)


def test_runs_the_import_once_after_its_time(tmp_path: Path) -> None:
    """Past 15:35 on a trading day: one child import runs and its outcome is logged."""
    now = datetime(2024, 12, 4, 15, 40, tzinfo=CHINA).timestamp()
    schedule = HistorySchedule(_config(tmp_path), clock=lambda: now, check_interval=0.05,
                               command=[sys.executable, "-m", "relay", "history", "import"])
    with capture_logs() as logs:
        schedule.start()
        try:
            deadline = time.monotonic() + 60
            while not schedule.outcomes and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.2)      # a second check of the clock must not start another run
        finally:
            schedule.close()
    assert [0] == schedule.outcomes
    done = [e for e in logs if e["event"] == "history_schedule_done"]
    assert 1 == len(done)
    with open_dir(tmp_path / "data") as hist:
        assert len(hist.symbols("day")) == 10


def test_nothing_on_a_holiday_or_before_the_time(tmp_path: Path) -> None:
    """A configured holiday, or a time not reached yet, starts nothing."""
    holiday = datetime(2024, 12, 4, 16, 0, tzinfo=CHINA).timestamp()
    early = datetime(2024, 12, 5, 15, 0, tzinfo=CHINA).timestamp()
    for clock, holidays in ((holiday, ("2024-12-04",)), (early, ())):
        schedule = HistorySchedule(_config(tmp_path, holidays), clock=lambda c=clock: c,
                                   check_interval=0.02, command=[sys.executable, "-c", ""])
        schedule.start()
        time.sleep(0.15)
        schedule.close()
        assert [] == schedule.outcomes
