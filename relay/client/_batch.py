"""A batch of records as delivered to a strategy, with columnar views."""

from __future__ import annotations

import importlib
from itertools import chain
from typing import Any, Dict, Iterator, List, Optional

from relay.records import FIELDS, SpotRecord

__all__ = ["BOOK_FIELDS", "Batch", "columns_of"]

BOOK_FIELDS = ("bid", "bid_amount", "ask", "ask_amount")
_STRING_FIELDS = ("market", "code", "name", "datetime")
_FLOAT_FIELDS = ("yesterday_close", "open", "high", "low", "close", "amount", "volume")
_OPTIONAL_FIELDS = ("time_ms", "status", "trade_count")


def columns_of(records: List[SpotRecord]) -> Dict[str, List[Any]]:
    """Every field of ``records`` as a list (books as lists of tuples), in schema order."""
    if not records:
        return {name: [] for name in FIELDS}
    return dict(zip(FIELDS, map(list, zip(*records))))


class Batch:
    """Every record published between one ``[start spot]`` and ``[end spot]`` pair.

    Attributes:
        records: the records, as :class:`~relay.records.SpotRecord` (filtered by ``codes``).
        first_seq, last_seq: sequence numbers of the first and last message of the batch
            (``None`` from a producer that sends none).
        run_id: the relay run that published it (changes when the relay restarts).
        source: ``"qmt"``, ``"simulator"`` or ``"replay"``.
        publish_time_ms: when the relay published it, epoch milliseconds.
        snapshot: ``True`` for the full-market snapshot a subscriber fetches on connecting.
    """

    __slots__ = ("_columns", "first_seq", "last_seq", "publish_time_ms", "records", "run_id",
                 "snapshot", "source")

    def __init__(self, records: List[SpotRecord], first_seq: Optional[int],
                 last_seq: Optional[int], run_id: Optional[str], source: Optional[str],
                 publish_time_ms: Optional[int], snapshot: bool = False) -> None:
        self.records = records
        self.first_seq = first_seq
        self.last_seq = last_seq
        self.run_id = run_id
        self.source = source
        self.publish_time_ms = publish_time_ms
        self.snapshot = snapshot
        self._columns: Optional[Dict[str, List[Any]]] = None

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[SpotRecord]:
        return iter(self.records)

    def __repr__(self) -> str:
        kind = "snapshot" if self.snapshot else "batch"
        return (f"<{kind} {len(self.records)} records seq {self.first_seq}..{self.last_seq} "
                f"run {self.run_id} source {self.source}>")

    @property
    def columns(self) -> Dict[str, List[Any]]:
        """Every field as a list, in schema order (books: one tuple per record); cached."""
        if self._columns is None:
            self._columns = columns_of(self.records)
        return self._columns

    @property
    def symbols(self) -> List[str]:
        """``"600000.SH"``-style symbols, one per record."""
        cols = self.columns
        return [f"{c}.{m}" for c, m in zip(cols["code"], cols["market"])]

    def to_numpy(self) -> Dict[str, Any]:
        """The batch as a dict of NumPy arrays, one per field (needs NumPy).

        Strings are object arrays; prices, amount and volume ``float64``; each book field is
        a 2-D ``float64`` array of shape ``(records, levels)`` (shorter books padded with
        NaN). ``time_ms``, ``status`` and ``trade_count`` are ``int64``; a field that no
        record carries (a plain hikyuu producer) is left out, and one that only some
        records carry is ``float64`` with NaN where absent.
        """
        import numpy as np  # noqa: PLC0415 - optional dependency

        cols = self.columns
        n = len(self.records)
        out: Dict[str, Any] = {}
        for name in _STRING_FIELDS:
            arr = np.empty(n, dtype=object)
            arr[:] = cols[name]
            out[name] = arr
        for name in _FLOAT_FIELDS:
            out[name] = np.fromiter(cols[name], dtype=np.float64, count=n)
        for name in BOOK_FIELDS:
            out[name] = _book_array(np, cols[name], n)
        for name in _OPTIONAL_FIELDS:
            col = cols[name]
            if None not in col:
                out[name] = np.fromiter(col, dtype=np.int64, count=n)
            elif any(v is not None for v in col):
                out[name] = np.array([np.nan if v is None else v for v in col], dtype=np.float64)
        return out

    def to_pandas(self) -> Any:
        """The batch as a ``pandas.DataFrame`` indexed by symbol (needs pandas).

        One column per scalar field; book levels become ``bid1 .. bidN``,
        ``bid_amount1 .. bid_amountN``, ``ask1 ..``, ``ask_amount1 ..``. Fields that no
        record carries are left out (see :meth:`to_numpy`).
        """
        # Optional dependency, typed as Any: pandas ships no type hints of its own.
        pd: Any = importlib.import_module("pandas")

        arrays = self.to_numpy()
        data: Dict[str, Any] = {}
        for name in FIELDS:
            if name not in arrays:
                continue
            arr = arrays[name]
            if name in BOOK_FIELDS:
                for level in range(arr.shape[1]):
                    data[f"{name}{level + 1}"] = arr[:, level]
            else:
                data[name] = arr
        index = pd.Index(self.symbols, name="symbol", dtype=object)
        return pd.DataFrame(data, index=index, copy=False)


def _book_array(np: Any, col: List[Any], n: int) -> Any:
    depths = set(map(len, col))
    if len(depths) <= 1:
        levels = depths.pop() if depths else 0
        flat = np.fromiter(chain.from_iterable(col), dtype=np.float64, count=n * levels)
        return flat.reshape(n, levels)
    levels = max(depths)
    arr = np.full((n, levels), np.nan)
    for i, book in enumerate(col):
        arr[i, :len(book)] = book
    return arr
