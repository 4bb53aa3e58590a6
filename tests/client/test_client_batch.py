"""Batch: records, columns, NumPy and pandas views."""

from __future__ import annotations

import math

import pytest
from client_helpers import record

from relay.client import Batch
from relay.records import FIELDS


def sample() -> Batch:
    recs = [record("600000", close=11.5), record("000001", "SZ", close=9.25)]
    return Batch(recs, 4, 5, "run", "simulator", 123)


def test_columns_are_lists_in_schema_order() -> None:
    """batch.columns has one list per field, books as tuples."""
    cols = sample().columns
    assert list(FIELDS) == list(cols)
    assert [11.5, 9.25] == cols["close"]
    assert (11.39, 11.38, 11.37, 11.36, 11.35) == cols["bid"][0]
    assert ["600000.SH", "000001.SZ"] == sample().symbols


def test_empty_batch_columns() -> None:
    """An empty batch gives empty columns, not an error."""
    assert {name: [] for name in FIELDS} == Batch([], None, None, None, None, None).columns


def test_to_numpy_dtypes_shapes_and_values() -> None:
    """to_numpy: float64 prices, (n, levels) books, int64 optional fields."""
    np = pytest.importorskip("numpy")
    arrays = sample().to_numpy()
    assert np.float64 == arrays["close"].dtype
    assert [11.5, 9.25] == arrays["close"].tolist()
    assert (2, 5) == arrays["ask_amount"].shape
    assert [1932.0, 2410.0, 1810.0, 1130.0, 2006.0] == arrays["ask_amount"][1].tolist()
    assert np.int64 == arrays["time_ms"].dtype
    assert ["600000", "000001"] == arrays["code"].tolist()


def test_to_numpy_mixed_optional_and_uneven_books() -> None:
    """Partly absent optional fields become NaN; shorter books are padded with NaN."""
    pytest.importorskip("numpy")
    short = record("000002", "SZ", time_ms=None)._replace(bid=(1.0,))
    arrays = Batch([record(), short], None, None, None, None, None).to_numpy()
    assert 1733118954000.0 == arrays["time_ms"][0] and math.isnan(arrays["time_ms"][1])
    assert 1.0 == arrays["bid"][1][0] and math.isnan(arrays["bid"][1][4])


def test_to_pandas_is_indexed_by_symbol_with_book_levels() -> None:
    """to_pandas: symbol index, scalar columns, bid1..bid5 etc."""
    pytest.importorskip("pandas")
    frame = sample().to_pandas()
    assert ["600000.SH", "000001.SZ"] == list(frame.index)
    assert "symbol" == frame.index.name
    assert 9.25 == frame.loc["000001.SZ", "close"]
    assert 11.35 == frame.loc["600000.SH", "bid5"]
    assert {"bid1", "bid_amount5", "ask3", "ask_amount1", "trade_count"} <= set(frame.columns)
    assert 2 == len(frame)


def test_repr_and_iteration() -> None:
    """A batch iterates over its records and says what it is."""
    batch = sample()
    assert batch.records == list(batch)
    assert "seq 4..5" in repr(batch) and 2 == len(batch)
