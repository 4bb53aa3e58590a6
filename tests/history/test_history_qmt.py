"""The QMT history source and the importer against the hostile xtdata fake (tests/fakes)."""

from __future__ import annotations

import dataclasses
import json
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Dict, Iterator, List

import numpy as np
import pytest

from relay.config import Config, HistoryConfig, QmtConfig, SourceConfig
from relay.errors import HistoryUnavailableError
from relay.history.importer import ImportRequest, run_import
from relay.history.qmt import QmtHistory
from relay.history.store import BAR_DTYPE, open_file, table_name

FAKES = Path(__file__).resolve().parent.parent / "fakes"
CHINA = timezone(timedelta(hours=8))
AFTER_CLOSE = datetime(2024, 12, 2, 16, 0, tzinfo=CHINA).timestamp()   # the fake's day


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Dict[str, Any]]:
    """Environment for worker processes importing the fake; yields its state and log paths."""
    monkeypatch.syspath_prepend(str(FAKES))
    state = tmp_path / "xt-history.json"
    log = tmp_path / "xt-calls.jsonl"
    monkeypatch.setenv("FAKE_XTDATA_HISTORY", str(state))
    monkeypatch.setenv("FAKE_XTDATA_SECURITIES", "20")
    monkeypatch.setenv("FAKE_XTDATA_LOG", str(log))
    yield {"state": state, "log": log}


def _config(tmp_path: Path, **history: Any) -> Config:
    values: Dict[str, Any] = {"dir": str(tmp_path / "data"), "chunk_codes": 4,
                              "chunk_days": 70, "retry_min": 0.01, "retry_max": 0.05,
                              "chunk_timeout": 20.0}
    values.update(history)
    hc = dataclasses.replace(HistoryConfig(), **values)
    qmt = dataclasses.replace(QmtConfig(), connect_timeout=20.0)
    return Config(source=SourceConfig(kind="qmt", qmt=qmt), history=hc)


def _source(config: Config) -> QmtHistory:
    return QmtHistory(config.source.qmt, config.history, clock=lambda: AFTER_CLOSE)


def _expected(code: str, period: str) -> np.ndarray:
    """The fake's bars converted by hand: x1000 rounded, amount / 1000 rounded, lots."""
    from xtquant import xtdata

    frame = xtdata.expected_frame(code, {"day": "1d", "1min": "1m", "5min": "5m"}[period])
    rows = np.zeros(len(frame), dtype=BAR_DTYPE)
    for k, (stamp, bar) in enumerate(frame.iterrows()):
        text = str(stamp)
        rows[k]["datetime"] = int(text[:8] + "0000") if period == "day" else int(text[:12])
        for field, col in (("openPrice", "open"), ("highPrice", "high"), ("lowPrice", "low"),
                           ("closePrice", "close")):
            rows[k][field] = int(float(bar[col]) * 1000 + 0.5)
        rows[k]["transAmount"] = int(float(bar["amount"]) / 1000 + 0.5)
        rows[k]["transCount"] = int(bar["volume"])
    return rows


def _stored(config: Config, code: str, period: str) -> np.ndarray:
    with open_file(config.history.dir, code[-2:], period) as f:
        return f.read(table_name(code))


def _calls(log: Path) -> List[Dict[str, Any]]:
    return [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines()]


def test_import_equals_the_fakes_bars(fake: Dict[str, Any], tmp_path: Path) -> None:
    """Day, 1min and 5min bars land field for field; every xtdata call from one thread."""
    config = _config(tmp_path)
    request = ImportRequest(dir=config.history.dir, periods=("day", "5min"),
                            markets=("SH", "SZ", "BJ"),
                            codes=("000001.SH", "899050.BJ"))
    source = _source(config)
    summary = run_import(config, request, source)
    assert {} == summary.failed
    for code in request.codes:
        for period in request.periods:
            expected = _expected(code, period)
            assert len(expected) > 0
            assert expected.tolist() == _stored(config, code, period).tolist()
    calls = _calls(fake["log"])
    downloads = [c for c in calls if c["call"] == "download_history_data2"]
    reads = [c for c in calls if c["call"] == "get_market_data_ex"]
    assert downloads and reads
    assert all(c["fill_data"] is False and c["dividend_type"] == "none" for c in reads)
    assert len({c["thread"] for c in calls if not c["call"].startswith("_")}) == 1


def test_hostile_fake_hang_drop_errors_and_bad_bars(fake: Dict[str, Any],
                                                    tmp_path: Path) -> None:
    """A hang (worker killed), a drop (resumed), total<0, no-data and bad bars are handled."""
    fake["state"].write_text(json.dumps({"hang": 1, "drop": 1, "fail_total": 1,
                                         "no_data": ["000300.SH"], "bad": ["399001.SZ"]}))
    config = _config(tmp_path, chunk_timeout=2.5, retries=4)
    codes = ("000001.SH", "399001.SZ", "000300.SH", "399006.SZ", "600000.SH")
    request = ImportRequest(dir=config.history.dir, periods=("day",), markets=("SH", "SZ"),
                            codes=codes)
    source = _source(config)
    summary = run_import(config, request, source)
    assert source.restarts >= 1                      # the hang killed a worker
    assert "000300.SH day" in summary.failed
    assert "no data" in summary.failed["000300.SH day"]
    assert "600000.SH day" in summary.failed          # not in the fake's universe
    assert 1 == summary.exit_code
    assert {"bad_price": 2, "high_below_low": 1, "not_increasing": 2} == summary.rejected
    for code in ("000001.SH", "399006.SZ"):
        assert _expected(code, "day").tolist() == _stored(config, code, "day").tolist()
    good = _expected("399001.SZ", "day")
    kept = [r for k, r in enumerate(good.tolist()) if k not in (1, 2, 3, 5)]
    assert kept == _stored(config, "399001.SZ", "day").tolist()
    downloads = [c for c in _calls(fake["log"]) if c["call"] == "download_history_data2"]
    # the drop came half-way: the retry downloaded only the codes not finished before it
    assert any(c["codes"] < len(codes) - 1 for c in downloads[1:])


def test_missing_xtquant_and_unreachable_miniqmt(fake: Dict[str, Any], tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Could not start: a clear HistoryUnavailableError either way."""
    config = _config(tmp_path)
    missing = QmtHistory(config.source.qmt, config.history, module="no_such_xtquant.xtdata")
    with pytest.raises(HistoryUnavailableError, match="cannot import"):
        missing.open()
    monkeypatch.setenv("FAKE_XTDATA_REFUSE_CONNECTS", "5")
    with pytest.raises(HistoryUnavailableError, match="unreachable"):
        _source(config).open()
