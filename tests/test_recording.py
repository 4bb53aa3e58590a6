"""The read API (relay.recording.open_day) and `qmt-relay export --csv`, on real HDF5 files."""

from __future__ import annotations

import asyncio
import csv
import sys
import time
from pathlib import Path
from typing import Dict, List, Tuple

import h5py
import pytest

from relay import cli
from relay.config import SimulatorConfig
from relay.normalise import Normaliser
from relay.recording import BOOKS, open_day, to_records
from relay.records import SpotRecord
from relay.sinks.recorder import Recorder
from relay.sources.simulator import SimulatorSource


def record_simulator(directory: Path, batches: int = 30) -> Tuple[Path, List[SpotRecord]]:
    """Record ``batches`` simulator batches with short index periods; returns file, records."""
    source = SimulatorSource(SimulatorConfig(securities=120, speed=200, date="2024-12-02"))
    published: List[SpotRecord] = []

    async def main() -> None:
        await source.start()
        normaliser = Normaliser(source.names)
        # a fake clock that advances a second per reading closes an index period every few
        # commits, so queries combine periods, snapshots and the open tail
        ticks = iter(range(1_000_000))
        rec = Recorder(str(directory), flush_interval=1.0, index_interval=7.0,
                       clock=lambda: float(next(ticks)))
        rec.start()
        seq = 1
        async for batch in source.batches():
            result = normaliser.normalise_batch(batch)
            rec.write_records(result.records, first_seq=seq, run_id="run1",
                              source="simulator", publish_time_ms=int(time.time() * 1000),
                              counts=[len(result)])
            published.extend(result.records)
            seq += 1
            if seq > batches:
                break
        await source.close()
        rec.close()

    asyncio.run(main())
    return directory / "2024-12-02.h5", published


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Tuple[Path, List[SpotRecord]]:
    return record_simulator(tmp_path_factory.mktemp("rec"))


def test_all_and_batches_give_back_every_record(
        recorded: Tuple[Path, List[SpotRecord]]) -> None:
    """all() and batches() return the published records in publish order."""
    path, published = recorded
    with open_day(path) as day:
        assert published == day.records()
        assert published == [r for b in day.batches(block=4) for r in b.records]
        assert 1 < day._n["periods"]   # the queries below cross periods


def test_ticks_of_one_code(recorded: Tuple[Path, List[SpotRecord]]) -> None:
    """ticks(code) equals the published records of that code, for every code."""
    path, published = recorded
    by_code: Dict[str, List[SpotRecord]] = {}
    for r in published:
        by_code.setdefault(r.symbol, []).append(r)
    with open_day(path) as day:
        assert sorted(by_code) == day.codes()
        for code, expected in by_code.items():
            cols = day.ticks(code)
            assert isinstance(cols, dict)
            assert expected == to_records(cols)
        bare = day.ticks("000001")
        assert isinstance(bare, dict) and {"SH"} == set(bare["market"].tolist())


def test_between_and_at(recorded: Tuple[Path, List[SpotRecord]]) -> None:
    """between(t0, t1) and at(t) equal brute-force answers at several times."""
    path, published = recorded
    times = sorted({r.time_ms for r in published if r.time_ms is not None})
    with open_day(path) as day:
        for t in (times[0], times[len(times) // 3], times[-2], times[-1] + 1):
            last: Dict[str, SpotRecord] = {}
            for r in published:
                assert r.time_ms is not None
                if r.time_ms <= t:
                    last[r.symbol] = r
            at = day.at(t)
            assert isinstance(at, dict)
            assert [last[k] for k in sorted(last)] == to_records(at)
            window = day.between(t - 6000, t)
            assert isinstance(window, dict)
            expected = [r for r in published if r.time_ms is not None
                        and t - 6000 <= r.time_ms < t]
            assert expected == to_records(window)
        text = day.at("2024-12-02 09:31:00")
        assert isinstance(text, dict)
        assert set(text["datetime"].tolist()) <= {r.datetime for r in published}


def test_pandas_output(recorded: Tuple[Path, List[SpotRecord]]) -> None:
    """pandas=True gives a DataFrame with books spread over bid1..bidN columns."""
    pytest.importorskip("pandas")
    path, published = recorded
    code = published[0].symbol
    with open_day(path) as day:
        frame = day.ticks(code, pandas=True)
        expected = [r for r in published if r.symbol == code]
        assert len(expected) == len(frame)
        assert [r.bid[0] for r in expected] == frame["bid1"].tolist()
        assert [r.close for r in expected] == frame["close"].tolist()
        assert {"run1"} == set(frame["run_id"])


def test_export_csv(recorded: Tuple[Path, List[SpotRecord]], tmp_path: Path) -> None:
    """`qmt-relay export DAY.h5 --csv OUT` writes one exact row per record."""
    path, published = recorded
    out = tmp_path / "day.csv"
    assert 0 == cli.main(["export", str(path), "--csv", str(out)])
    with open(out, encoding="utf-8", newline="") as file:
        rows = list(csv.DictReader(file))
    assert len(published) == len(rows)
    for r, row in zip(published, rows):
        assert (r.market, r.code, r.name, r.datetime) == (
            row["market"], row["code"], row["name"], row["datetime"])
        assert (r.close, r.amount, r.volume) == (
            float(row["close"]), float(row["amount"]), float(row["volume"]))
        for name in BOOKS:
            assert tuple(getattr(r, name)) == tuple(
                float(row[f"{name}{k + 1}"]) for k in range(len(getattr(r, name))))
        assert (r.time_ms, r.status, r.trade_count) == (
            int(row["time_ms"]), int(row["status"]), int(row["trade_count"]))
        assert ("run1", "simulator") == (row["run_id"], row["source"])


def test_export_default_name_and_errors(recorded: Tuple[Path, List[SpotRecord]],
                                        tmp_path: Path) -> None:
    """--csv without OUT writes DAY.csv beside the file; a non-recording is a clear error."""
    path, published = recorded
    copy = tmp_path / path.name
    copy.write_bytes(path.read_bytes())
    assert 0 == cli.main(["export", str(copy), "--csv"])
    assert len(published) + 1 == len(copy.with_suffix(".csv").read_text().splitlines())
    other = tmp_path / "other.h5"
    h5py.File(other, "w").close()
    assert cli.EXIT_FAILURE == cli.main(["export", str(other), "--csv"])
    assert cli.EXIT_CONFIG == cli.main(["export", str(copy)])


def test_open_day_rejects_other_files(tmp_path: Path) -> None:
    """open_day on an HDF5 file that is not a recording raises ValueError."""
    other = tmp_path / "other.h5"
    h5py.File(other, "w").close()
    with pytest.raises(ValueError, match="not a qmt-relay recording"):
        open_day(other)


def test_export_to_stdout_is_utf8_under_a_narrow_code_page(
        recorded: Tuple[Path, List[SpotRecord]], monkeypatch: pytest.MonkeyPatch) -> None:
    """`export --csv -` to a cp1252 stdout: UTF-8 bytes (Chinese names intact), no error."""
    import io

    path, published = recorded
    raw = io.BytesIO()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(raw, encoding="cp1252"))
    assert 0 == cli.main(["export", str(path), "--csv", "-"])
    rows = list(csv.DictReader(io.StringIO(raw.getvalue().decode("utf-8"), newline="")))
    assert [r.name for r in published] == [row["name"] for row in rows]


def test_export_to_missing_stdout_does_not_crash(
        recorded: Tuple[Path, List[SpotRecord]], monkeypatch: pytest.MonkeyPatch) -> None:
    """No stdout at all (pythonw, a service): export to - writes nothing and exits 0."""
    monkeypatch.setattr(sys, "stdout", None)
    monkeypatch.setattr(sys, "stderr", None)
    assert 0 == cli.main(["export", str(recorded[0]), "--csv", "-"])
