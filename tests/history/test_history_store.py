"""hikyuu HDF5 layout: round trips, index tables, incremental writes, recovery, lock."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Dict, List, Tuple

import h5py
import numpy as np
import pytest

from relay.errors import HistoryError, HistoryLockedError
from relay.history.store import (
    BAR_DTYPE,
    INDEX_DTYPE,
    DirectoryLock,
    bars_to_records,
    bars_to_records_many,
    committed_rows,
    index_labels,
    open_file,
)


def _days(start: dt.date, n: int) -> List[dt.date]:
    out: List[dt.date] = []
    day = start
    while len(out) < n:
        if day.weekday() < 5:
            out.append(day)
        day += dt.timedelta(days=1)
    return out


def _day_rows(days: List[dt.date], seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = len(days)
    rows = np.zeros(n, dtype=BAR_DTYPE)
    rows["datetime"] = [int(d.strftime("%Y%m%d")) * 10000 for d in days]
    close = rng.integers(5000, 20000, n)
    rows["openPrice"] = close - rng.integers(0, 100, n)
    rows["closePrice"] = close
    rows["highPrice"] = close + rng.integers(0, 100, n)
    rows["lowPrice"] = rows["openPrice"] - rng.integers(0, 100, n)
    rows["transAmount"] = rng.integers(0, 10**9, n)
    rows["transCount"] = rng.integers(0, 10**7, n)
    return rows


def _minute_stamps(days: List[dt.date], step: int) -> List[int]:
    out: List[int] = []
    for d in days:
        base = int(d.strftime("%Y%m%d")) * 10000
        for start, end in ((9 * 60 + 30, 11 * 60 + 30), (13 * 60, 15 * 60)):
            for m in range(start + step, end + 1, step):
                out.append(base + m // 60 * 100 + m % 60)
    return out


def _label_by_calendar(day: dt.date, index: str) -> dt.date:
    """The period end label, computed with the datetime module (independent of the store)."""
    if index == "week":
        return day + dt.timedelta(days=4 - day.weekday())
    month_of_end = {"month": day.month, "quarter": (day.month - 1) // 3 * 3 + 3,
                    "halfyear": 6 if day.month <= 6 else 12, "year": 12}[index]
    first_next = dt.date(day.year + month_of_end // 12, month_of_end % 12 + 1, 1)
    return first_next - dt.timedelta(days=1)


def _aggregate(rows: np.ndarray, labels: List[int]) -> List[Tuple[int, ...]]:
    """Derived bars by grouping consecutive rows with the same label (plain Python)."""
    groups: Dict[int, List[np.void]] = {}
    order: List[int] = []
    for row, label in zip(rows, labels):
        if label not in groups:
            groups[label] = []
            order.append(label)
        groups[label].append(row)
    out = []
    for label in order:
        g = groups[label]
        out.append((label, int(g[0]["openPrice"]), max(int(r["highPrice"]) for r in g),
                    min(int(r["lowPrice"]) for r in g), int(g[-1]["closePrice"]),
                    sum(int(r["transAmount"]) for r in g), sum(int(r["transCount"]) for r in g)))
    return out


def _aggregate_by_index(rows: np.ndarray, index: np.ndarray) -> List[Tuple[int, ...]]:
    """Derived bars the way hikyuu reads an index table: each entry spans to the next."""
    out = []
    starts = [int(s) for s in index["start"]] + [len(rows)]
    for k, label in enumerate(index["datetime"]):
        g = rows[starts[k]:starts[k + 1]]
        out.append((int(label), int(g[0]["openPrice"]), int(g["highPrice"].max()),
                    int(g["lowPrice"].min()), int(g[-1]["closePrice"]),
                    int(g["transAmount"].sum()), int(g["transCount"].sum())))
    return out


def _assert_recovered_whole(path: Path, rows: np.ndarray) -> None:
    """SH600000's 40 day bars from 2024-01-02 are ``rows``, and its week index matches them
    (after a killed write was recovered and finished)."""
    with open_file(path, "SH", "day") as f:
        assert (f.read("SH600000") == rows).all()
        labels = [int(_label_by_calendar(d, "week").strftime("%Y%m%d")) * 10000
                  for d in _days(dt.date(2024, 1, 2), 40)]
        assert _aggregate(rows, labels) == _aggregate_by_index(rows,
                                                               f.read_index("SH600000", "week"))


def test_layout_round_trip_h5py(tmp_path: Path) -> None:
    """Written rows read back with plain h5py equal the input; the layout is hikyuu's."""
    rows = _day_rows(_days(dt.date(2023, 1, 2), 300))
    with open_file(tmp_path, "SH", "day", "a") as f:
        f.append("SH600000", rows)
    path = tmp_path / "sh_day.h5"
    with h5py.File(path, "r") as h5:
        ds = h5["data/SH600000"]
        assert ds.dtype.itemsize == 40
        assert ds.maxshape == (None,)
        assert ds.chunks is not None
        assert ds.compression == "gzip"
        assert {n: ds.dtype[n] for n in ds.dtype.names} == {
            "datetime": np.dtype("<u8"), "openPrice": np.dtype("<u4"),
            "highPrice": np.dtype("<u4"), "lowPrice": np.dtype("<u4"),
            "closePrice": np.dtype("<u4"), "transAmount": np.dtype("<u8"),
            "transCount": np.dtype("<u8")}
        assert (ds[:] == rows).all()
        # hikyuu's groups, and the store's commit record beside them
        assert set(h5.keys()) == {"data", "week", "month", "quarter", "halfyear", "year",
                                  "relay_state"}
        assert h5["week/SH600000"].dtype == INDEX_DTYPE
        # h5py's default format (superblock 0), not libver="latest"
        assert h5.libver[0] == "earliest"
    with open_file(tmp_path, "SH", "day") as f:
        info = f.tables()["SH600000"]
        assert (300, int(rows[0]["datetime"]), int(rows[-1]["datetime"])) == (
            info.rows, info.first, info.last)
        assert (f.read("SH600000") == rows).all()
        assert (f.read("SH600000", 202302010000, 202302280000)
                == rows[(rows["datetime"] >= 202302010000)
                        & (rows["datetime"] <= 202302280000)]).all()
        assert (f.read_after("SH600000", int(rows[9]["datetime"])) == rows[10:]).all()


def test_round_trip_pytables(tmp_path: Path) -> None:
    """PyTables opens the file, reads the rows and can append to the table."""
    tables = pytest.importorskip("tables", reason="PyTables is not installed in this venv")
    rows = _day_rows(_days(dt.date(2023, 1, 2), 50))
    with open_file(tmp_path, "SZ", "day", "a") as f:
        f.append("SZ000001", rows)
    with tables.open_file(str(tmp_path / "sz_day.h5"), "a") as h5:
        table = h5.get_node("/data/SZ000001")
        got = table.read()
        assert [tuple(r) for r in got[list(BAR_DTYPE.names)]] == [tuple(r) for r in rows]
        extra = _day_rows([dt.date(2024, 6, 3)], seed=9)
        table.append(extra[list(table.colnames)].astype(table.dtype))
        table.flush()
        assert table.nrows == 51


@pytest.mark.parametrize("index", ["week", "month", "quarter", "halfyear", "year"])
def test_day_index_tables_match_independent_aggregation(tmp_path: Path, index: str) -> None:
    """Each index table groups day bars exactly as calendar arithmetic does."""
    days = _days(dt.date(2022, 12, 20), 420)
    rows = _day_rows(days)
    with open_file(tmp_path, "SH", "day", "a") as f:
        f.append("SH600000", rows[:200])
        f.commit()
        f.append("SH600000", rows[200:201])   # incremental: one bar
        f.commit()
        f.append("SH600000", rows[201:])
    labels = [int(_label_by_calendar(d, index).strftime("%Y%m%d")) * 10000 for d in days]
    with open_file(tmp_path, "SH", "day") as f:
        assert _aggregate(rows, labels) == _aggregate_by_index(rows, f.read_index("SH600000",
                                                                                  index))


@pytest.mark.parametrize(("index", "labels"), [
    ("min15", [945, 1000, 1015, 1030, 1045, 1100, 1115, 1130, 1315, 1330, 1345, 1400, 1415,
               1430, 1445, 1500]),
    ("min30", [1000, 1030, 1100, 1130, 1330, 1400, 1430, 1500]),
    ("min60", [1030, 1130, 1400, 1500]),
    ("hour2", [1130, 1500]),
])
def test_intraday_index_tables(tmp_path: Path, index: str, labels: List[int]) -> None:
    """5min files carry min15 ... hour2 tables labelled by the period's end minute."""
    days = _days(dt.date(2024, 3, 1), 3)
    stamps = _minute_stamps(days, 5)
    assert len(stamps) == 48 * 3
    rows = np.zeros(len(stamps), dtype=BAR_DTYPE)
    rows["datetime"] = stamps
    rows["openPrice"] = rows["closePrice"] = rows["highPrice"] = rows["lowPrice"] = 1000
    rows["highPrice"] += np.arange(len(stamps), dtype=np.uint32)
    rows["transCount"] = 1
    with open_file(tmp_path, "SH", "5min", "a") as f:
        f.append("SH600000", rows[:100])
        f.commit()
        f.append("SH600000", rows[100:])
    expected_labels = []
    for s in stamps:
        hhmm = s % 10000
        label = next(x for x in labels if x >= hhmm)
        expected_labels.append(s // 10000 * 10000 + label)
    with open_file(tmp_path, "SH", "5min") as f:
        idx = f.read_index("SH600000", index)
        assert _aggregate(rows, expected_labels) == _aggregate_by_index(rows, idx)
        assert len(idx) == len(labels) * 3
    with h5py.File(tmp_path / "sh_5min.h5", "r") as h5:
        assert set(h5.keys()) == {"data", "min15", "min30", "min60", "hour2", "relay_state"}


def test_one_minute_file_has_only_data(tmp_path: Path) -> None:
    """1min files carry no index tables."""
    rows = np.zeros(240, dtype=BAR_DTYPE)
    rows["datetime"] = _minute_stamps([dt.date(2024, 3, 1)], 1)
    rows["openPrice"] = rows["closePrice"] = rows["highPrice"] = rows["lowPrice"] = 1
    with open_file(tmp_path, "BJ", "1min", "a") as f:
        f.append("BJ830799", rows)
    with h5py.File(tmp_path / "bj_1min.h5", "r") as h5:
        assert list(h5.keys()) == ["data", "relay_state"]   # no index groups
        assert h5["data/BJ830799"][-1]["datetime"] == 202403011500


def test_week_label_is_friday_even_on_a_holiday() -> None:
    """A week ending in a holiday still gets its Friday label; periods are calendar ends."""
    got = index_labels(np.array([202410080000, 202402290000, 202312290000], dtype=np.uint64),
                       "week")
    assert [202410110000, 202403010000, 202312290000] == got.tolist()
    assert [202402290000] == index_labels(np.array([202402010000], np.uint64), "month").tolist()
    assert [202409300000] == index_labels(np.array([202407010000], np.uint64), "quarter").tolist()
    assert [202412310000] == index_labels(np.array([202407010000], np.uint64),
                                          "halfyear").tolist()


def test_merge_appends_and_replaces_a_changed_tail(tmp_path: Path) -> None:
    """merge: unchanged prefix kept, the changed last day replaced, new bars appended."""
    rows = _day_rows(_days(dt.date(2024, 1, 2), 30))
    with open_file(tmp_path, "SH", "day", "a") as f:
        f.merge("SH600000", rows[:20])
        f.commit()
        changed = rows.copy()
        changed[19]["closePrice"] += 7          # the partial last day completed differently
        result = f.merge("SH600000", changed[19:])
        assert (11, 0, 1) == (result.written, result.unchanged, result.replaced)
        f.commit()
        again = f.merge("SH600000", changed[19:])
        assert (0, 11, 0) == (again.written, again.unchanged, again.replaced)
        assert f.staged == 0
    with open_file(tmp_path, "SH", "day") as f:
        assert (f.read("SH600000") == changed).all()
        week = f.read_index("SH600000", "week")
        assert int(week["start"][-1]) < 30
        assert (np.diff(week["datetime"].astype(np.int64)) > 0).all()


def test_append_refuses_rows_not_after_stored(tmp_path: Path) -> None:
    """Out-of-order or duplicate rows never reach the file."""
    rows = _day_rows(_days(dt.date(2024, 1, 2), 10))
    with open_file(tmp_path, "SH", "day", "a") as f:
        f.append("SH600000", rows)
        f.commit()
        with pytest.raises(HistoryError, match="not after"):
            f.append("SH600000", rows[-1:])
        with pytest.raises(HistoryError, match="strictly increasing"):
            f.append("SH600001", rows[::-1])
        with pytest.raises(HistoryError, match="table name"):
            f.append("sh600000", rows)
    with open_file(tmp_path, "SH", "day") as f:
        assert ["SH600000"] == f.names()
        with pytest.raises(HistoryError, match="read-only"):
            f.append("SH600000", rows)


def test_bars_to_records_rounds_and_rejects() -> None:
    """Prices round half away from zero (1.005 -> 1005); bad bars are counted, not kept."""
    nan = float("nan")
    rec, rejected = bars_to_records(
        [202401020000, 202401030000, 202401040000, 202401050000, 202401050000,
         202401040000, 202401080000, 20240109, 202401100000],
        [1.005, 0.0, 10.0, 10.0, 10.0, 10.0, 10.0, 10.0, 19.89],
        [1.01, 10.0, 9.0, 10.5, 10.5, 10.5, nan, 10.0, 19.9],
        [1.0, 10.0, 10.0, 9.5, 9.5, 9.5, 9.0, 10.0, 19.8],
        [1.005, 10.0, 10.0, 10.370000000000001, 10.2, 10.2, 10.0, 10.0, 19.89],
        [123456.0, 1.0, 1.0, 1499.0, 1.0, 1.0, 1.0, 1.0, 2500.0],
        [10.4, 1.0, 1.0, 3.0, 1.0, 1.0, 1.0, 1.0, -1.0],
    )
    assert {"bad_price": 2, "high_below_low": 1, "not_increasing": 2, "bad_datetime": 1,
            "bad_volume": 1} == rejected
    assert [(202401020000, 1005, 1010, 1000, 1005, 123, 10),
            (202401050000, 10000, 10500, 9500, 10370, 1, 3)] == [tuple(int(v) for v in r)
                                                                 for r in rec]


def test_killed_writer_is_recovered_on_open(tmp_path: Path) -> None:
    """Uncommitted rows past relay_rows are dropped and stale index tables rebuilt."""
    rows = _day_rows(_days(dt.date(2024, 1, 2), 40))
    with open_file(tmp_path, "SH", "day", "a") as f:
        f.append("SH600000", rows[:30])
    # simulate a writer killed between writing rows and committing them
    with h5py.File(tmp_path / "sh_day.h5", "a") as h5:
        ds = h5["data/SH600000"]
        ds.resize((40,))
        ds[30:35] = rows[30:35]          # rows 35..39 stay zero-filled (torn)
        h5["week/SH600000"].resize((1,))
        h5.attrs["relay_dirty"] = 1
    with open_file(tmp_path, "SH", "day", "a") as f:
        assert ["SH600000"] == f.recovered
        assert (f.read("SH600000") == rows[:30]).all()
        f.append("SH600000", rows[30:])
    _assert_recovered_whole(tmp_path, rows)


def test_corrupt_file_moved_aside(tmp_path: Path) -> None:
    """A file HDF5 cannot open is kept aside and a new one started, when asked."""
    (tmp_path / "sh_day.h5").write_bytes(b"not hdf5 at all")
    with pytest.raises(HistoryError, match="cannot open"):
        open_file(tmp_path, "SH", "day", "a")
    with open_file(tmp_path, "SH", "day", "a", recover_corrupt=True) as f:
        assert [] == f.names()
    assert len(list(tmp_path.glob("sh_day.h5.corrupt-*"))) == 1


def test_directory_lock_refuses_a_second_writer(tmp_path: Path) -> None:
    """A held lock makes a second writer fail at once with HistoryLockedError."""
    import subprocess
    import sys

    with DirectoryLock(tmp_path):
        code = ("import sys; from relay.history.store import DirectoryLock\n"
                "from relay.errors import HistoryLockedError\n"
                "try:\n DirectoryLock(sys.argv[1]).acquire()\n"
                "except HistoryLockedError as e:\n print(e); sys.exit(7)\n")
        proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)],
                              capture_output=True, text=True, timeout=60)
        assert 7 == proc.returncode
        assert "locked" in proc.stdout
    with DirectoryLock(tmp_path):
        pass
    with pytest.raises(HistoryLockedError), DirectoryLock(tmp_path):
        DirectoryLock(tmp_path).acquire()


def test_writer_killed_after_writing_a_new_table_before_its_marks(tmp_path: Path) -> None:
    """A new table whose rows reached the file but not its commit marks is truncated on open
    (not taken as another tool's table without index tables); the next write completes it."""
    import subprocess
    import sys

    rows = _day_rows(_days(dt.date(2024, 1, 2), 40))
    np.save(tmp_path / "rows.npy", rows)
    code = ("import os, sys, numpy as np\n"
            "from relay.history import store\n"
            "def die(*args, **kwargs): os._exit(9)\n"
            "store.HistoryFile._update_indexes = die   # killed right after phase 2\n"
            "f = store.open_file(sys.argv[1], 'SH', 'day', 'a')\n"
            "f.append('SH600000', np.load(os.path.join(sys.argv[1], 'rows.npy')))\n"
            "f.commit()\n")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                          text=True, timeout=60)
    assert 9 == proc.returncode, proc.stderr
    with open_file(tmp_path, "SH", "day", "a") as f:
        assert ["SH600000"] == f.recovered
        assert 0 == f.read("SH600000").shape[0]
        f.merge("SH600000", rows)
    _assert_recovered_whole(tmp_path, rows)


def _to_legacy_marks(path: Path, extra: int = 0) -> None:
    """Rewrite a store file as the first release wrote it: marks as attributes of each
    table, no commit record; ``extra`` uncommitted rows appended to every table."""
    with h5py.File(path, "a") as h5:
        record = h5["relay_state"][:]
        del h5["relay_state"]
        for row in record:
            ds = h5["data"][row["name"].decode()]
            ds.attrs["relay_rows"] = int(row["rows"])
            ds.attrs["relay_indexed"] = int(row["indexed"])
            if extra:
                ds.resize((ds.shape[0] + extra,))
        h5.attrs["relay_dirty"] = 1 if extra else 0


def test_files_with_per_table_marks_are_read_and_adopted(tmp_path: Path) -> None:
    """A file whose commit marks are per-table attributes (the first release) reads with
    its committed rows only, and a writer adopts the marks (recovering a killed write)."""
    rows = _day_rows(_days(dt.date(2024, 1, 2), 60))
    with open_file(tmp_path, "SZ", "day", "a") as f:
        f.append("SZ000001", rows[:40])
        f.append("SZ000002", rows[:20])
    _to_legacy_marks(tmp_path / "sz_day.h5", extra=3)
    with open_file(tmp_path, "SZ", "day") as f:
        assert 40 == f.read("SZ000001").shape[0]
        assert 20 == f.rows("SZ000002")
    with h5py.File(tmp_path / "sz_day.h5", "r") as h5:
        assert {"SZ000001": (40, 40), "SZ000002": (20, 20)} == committed_rows(h5)
    with open_file(tmp_path, "SZ", "day", "a") as f:
        assert ["SZ000001", "SZ000002"] == sorted(f.recovered)
        f.merge("SZ000001", rows)
    with open_file(tmp_path, "SZ", "day") as f:
        assert (f.read("SZ000001") == rows).all()
        assert (f.read("SZ000002") == rows[:20]).all()
        labels = [int(_label_by_calendar(d, "month").strftime("%Y%m%d")) * 10000
                  for d in _days(dt.date(2024, 1, 2), 60)]
        assert _aggregate(rows, labels) == _aggregate_by_index(
            rows, f.read_index("SZ000001", "month"))
    with h5py.File(tmp_path / "sz_day.h5", "r") as h5:
        assert {"SZ000001": (60, 60), "SZ000002": (20, 20)} == committed_rows(h5)


def test_bars_to_records_many_equals_one_by_one() -> None:
    """Converting many securities in one pass gives each one's records and the summed
    rejections, the order check starting anew with each security."""
    from types import SimpleNamespace

    rng = np.random.default_rng(5)
    securities = []
    for _ in range(6):
        n = int(rng.integers(0, 40))
        dt_ = np.sort(rng.choice(np.arange(202401020000, 202401020000 + 400), n,
                                 replace=False)).astype(np.uint64)
        if n > 3:
            dt_[2] = dt_[1]                  # a duplicate
        close = rng.uniform(1, 50, n)
        if n > 5:
            close[4] = np.nan
        securities.append(SimpleNamespace(datetime=dt_, open=close, high=close + 1,
                                          low=close - 0.5, close=close,
                                          amount=rng.uniform(0, 1e6, n),
                                          volume=rng.uniform(0, 1e4, n)))
    securities.append(SimpleNamespace(**{f: np.empty(0) for f in (
        "datetime", "open", "high", "low", "close", "amount", "volume")}))
    many, rejected = bars_to_records_many(securities)
    total: Dict[str, int] = {}
    assert len(many) == len(securities)
    for got, bars in zip(many, securities):
        one, bad = bars_to_records(bars.datetime, bars.open, bars.high, bars.low,
                                   bars.close, bars.amount, bars.volume)
        assert one.tolist() == got.tolist()
        for reason, count in bad.items():
            total[reason] = total.get(reason, 0) + count
    assert total == rejected
    assert rejected.get("not_increasing", 0) > 0


def test_a_file_another_program_holds_is_waited_for_never_moved_aside(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """HDF5's file lock held by another process (a viewer) makes a writer wait, then fail
    with a clear error; even with recover_corrupt the file is not taken for a broken one."""
    import subprocess
    import sys

    from relay.history import store

    with open_file(tmp_path, "SH", "day", "a") as f:
        f.append("SH600000", _day_rows(_days(dt.date(2024, 1, 2), 5)))
    path = tmp_path / "sh_day.h5"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time, h5py\n"
         "f = h5py.File(sys.argv[1], 'r'); print('open', flush=True); time.sleep(60)",
         str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and "open" in holder.stdout.readline()
        monkeypatch.setattr(store, "_LOCK_WAIT", 0.3)
        with pytest.raises(HistoryError, match="in use by another program"):
            open_file(tmp_path, "SH", "day", "a", recover_corrupt=True)
        assert [] == list(tmp_path.glob("*.corrupt-*"))
    finally:
        holder.kill()
        holder.wait(timeout=30)
        if holder.stdout is not None:
            holder.stdout.close()
    with open_file(tmp_path, "SH", "day", "a", recover_corrupt=True) as f:
        assert 5 == f.rows("SH600000")
