"""The normalised record type shared by the relay and the subscriber library.

Stdlib only: :mod:`relay.client` imports this module, and must stay free of anything
compiled or heavy.
"""

from __future__ import annotations

import gc
import sys
from array import array
from contextlib import contextmanager
from itertools import chain, repeat
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

__all__ = ["FIELDS", "HIKYUU_FIELDS", "Memo", "SpotColumns", "SpotRecord"]


class SpotRecord(NamedTuple):
    """One security's spot (latest tick), in the units the relay publishes.

    The first fifteen fields mirror the hikyuu ``Spot`` table; the last three are the relay's
    appended fields and are ``None`` when a producer did not send them.

    Prices are in yuan (index points for indices). With the default ``hikyuu`` units,
    ``amount`` is in 10,000 yuan and ``volume`` in lots of 100 shares; with ``raw`` units they
    are yuan and shares. Book sizes (``bid_amount``/``ask_amount``) are passed through as QMT
    reports them.
    """

    market: str
    code: str
    name: str
    datetime: str
    yesterday_close: float
    open: float
    high: float
    low: float
    close: float
    amount: float
    volume: float
    bid: Tuple[float, ...]
    bid_amount: Tuple[float, ...]
    ask: Tuple[float, ...]
    ask_amount: Tuple[float, ...]
    time_ms: Optional[int] = None
    status: Optional[int] = None
    trade_count: Optional[int] = None

    @property
    def symbol(self) -> str:
        """The QMT-style symbol, e.g. ``"600000.SH"``."""
        return f"{self.code}.{self.market}"


FIELDS: Tuple[str, ...] = SpotRecord._fields
"""Every field name, in schema order."""

HIKYUU_FIELDS: Tuple[str, ...] = FIELDS[:15]
"""The fields a plain hikyuu producer sends."""


_new_record = tuple.__new__


# Whether _acyclic may promote: not on a free-threaded build, and never again once the
# application is seen to freeze objects itself (counting frozen objects walks them all).
_PROMOTE = {"ok": bool(getattr(sys, "_is_gil_enabled", lambda: True)())}


@contextmanager
def _acyclic() -> Iterator[None]:
    """Build acyclic objects without the cyclic garbage collector ever walking them.

    Every tuple is tracked by the collector, so a market's records (8,000 records and
    32,000 book tuples) would set off some fifty young-generation collections, or one large
    one, walking all of them -- costing about half as much as building them, and finding
    nothing: records hold only strings, numbers and tuples of numbers, which cannot form a
    reference cycle (they are freed by reference counting alone).

    So the young generations are collected first (objects the application made before the
    block are examined as usual), the collector is paused while the block builds, and what
    the block built is then moved straight to the oldest generation, uncounted, with
    ``gc.freeze()`` + ``gc.unfreeze()`` (both constant-time list moves). Skipped when the
    collector is disabled, on a free-threaded build (where freezing walks the heap), and from
    the first time the application is seen to have frozen objects itself (unfreezing would
    undo that): the block then runs with the collector paused only. If another thread
    allocates while the block runs, its objects are moved too and wait for the next full
    collection.
    """
    if not gc.isenabled():
        yield
        return
    promote = _PROMOTE["ok"] and _unfrozen()
    if promote:
        gc.collect(1)
    gc.disable()
    try:
        yield
    finally:
        if promote and _unfrozen():
            gc.freeze()
            gc.unfreeze()
        gc.enable()


def _unfrozen() -> bool:
    """No object is frozen (cheap while none is); once some are, promotion stops for good."""
    if gc.get_freeze_count():
        _PROMOTE["ok"] = False
        return False
    return True


class SpotColumns:
    """A batch of records stored column by column (the relay's hot-path form).

    Every attribute named like a :class:`SpotRecord` field is a sequence with one entry per
    record, except the four book arrays, which are flat: ``levels`` entries per record, record
    after record (``bid[i * levels + j]`` is level ``j`` of record ``i``). Every record of a
    ``SpotColumns`` has the same book depth.

    The string columns are lists of ``str``. The numeric ones are lists, ``array`` objects or,
    from the relay's normaliser, numpy arrays; anything with a ``tolist()`` method is read
    through it, so :attr:`records` always holds plain Python ``float`` and ``int`` values.
    This module itself stays stdlib-only.

    ``wire`` optionally carries the string columns already in the encoder's form, by field
    name: ``(lengths, padded)``, the UTF-8 byte length of each value and the values as a
    numpy ``S`` array (UTF-8, NUL-padded to a common width). The normaliser fills it from
    its per-symbol tables; the encoder uses it when present and computes it otherwise.
    """

    __slots__ = (*FIELDS, "_records", "levels", "n", "wire")

    market: List[str]
    code: List[str]
    name: List[str]
    datetime: List[str]
    yesterday_close: Sequence[float]
    open: Sequence[float]
    high: Sequence[float]
    low: Sequence[float]
    close: Sequence[float]
    amount: Sequence[float]
    volume: Sequence[float]
    bid: Sequence[float]
    bid_amount: Sequence[float]
    ask: Sequence[float]
    ask_amount: Sequence[float]
    time_ms: Sequence[Optional[int]]
    status: Sequence[Optional[int]]
    trade_count: Sequence[Optional[int]]

    def __init__(self, n: int, levels: int, columns: Sequence[Any]) -> None:
        if len(columns) != len(FIELDS):
            raise ValueError(f"expected {len(FIELDS)} columns, got {len(columns)}")
        self.n = n
        self.levels = levels
        for name, col in zip(FIELDS, columns):
            setattr(self, name, col)
        self._records: Optional[List[SpotRecord]] = None
        self.wire: Optional[Dict[str, Tuple[Any, Any]]] = None

    def __len__(self) -> int:
        return self.n

    def column(self, name: str) -> Sequence[Any]:
        """The column of field ``name`` (book arrays flat, see the class docstring)."""
        if name not in FIELDS:
            raise KeyError(name)
        col: Sequence[Any] = getattr(self, name)
        return col

    @property
    def records(self) -> List[SpotRecord]:
        """The records as :class:`SpotRecord` objects (built once, on first use)."""
        if self._records is None:
            levels, n = self.levels, self.n
            cols: List[Any] = [None] * len(FIELDS)
            with _acyclic():
                for i, name in enumerate(FIELDS):
                    col = getattr(self, name)
                    cols[i] = _rows(col, levels, n) if i in _BOOKS else _plain(col)
                self._records = list(map(_new_record, repeat(SpotRecord), zip(*cols)))
        return self._records

    def record(self, i: int) -> SpotRecord:
        """Record ``i`` alone, equal to ``records[i]``, without building the others."""
        if self._records is not None:
            return self._records[i]
        levels = self.levels
        start = i * levels
        values: List[Any] = []
        for k, name in enumerate(FIELDS):
            col = getattr(self, name)
            if k in _BOOKS:
                values.append(tuple(_plain(col[start:start + levels])))
            else:
                value = col[i]
                item = getattr(value, "item", None)  # a numpy scalar
                values.append(item() if item is not None else value)
        return SpotRecord(*values)

    @classmethod
    def from_records(cls, records: Sequence[SpotRecord]) -> Optional[SpotColumns]:
        """Columns of ``records``, or ``None`` if their book depths differ."""
        n = len(records)
        if not n:
            return cls(0, 0, [[] for _ in FIELDS])
        cols: List[Sequence[Any]] = [list(c) for c in zip(*records)]
        depth = set(map(len, cols[11]))
        for i in (12, 13, 14):
            depth.update(map(len, cols[i]))
        if len(depth) != 1:
            return None
        (levels,) = depth
        for i in (11, 12, 13, 14):
            cols[i] = array("d", chain.from_iterable(cols[i]))
        out = cls(n, levels, cols)
        out._records = list(records)
        return out


_BOOKS = frozenset((11, 12, 13, 14))


def _rows(flat: Sequence[float], levels: int, n: int) -> List[Tuple[float, ...]]:
    """A flat book column cut into one tuple per record.

    ``tolist()`` makes every float in one C loop and ``zip`` groups them: about 1.7x faster
    than unpacking each record's book with ``struct`` (which parses its format per call).
    """
    if not levels:
        return [()] * n
    values = iter(_plain(flat))
    return list(zip(*[values] * levels))


def _plain(column: Sequence[Any]) -> Sequence[Any]:
    """``column`` with plain Python values: numpy arrays and ``array`` objects via tolist()."""
    tolist = getattr(column, "tolist", None)
    return tolist() if tolist is not None else column


class Memo(dict):  # type: ignore[type-arg]
    """``memo[x]`` is ``fn(x)``, computed once per distinct ``x``.

    Columns go through it with ``map(memo.__getitem__, column)``, at C speed for every value
    seen before: prices, codes, names and timestamps repeat all day. Bounded: it starts over
    when it holds ``limit`` entries, so a hostile stream cannot grow it without limit. An
    exception from ``fn`` propagates and nothing is stored.
    """

    __slots__ = ("_fn", "_limit")

    def __init__(self, fn: Callable[[Any], Any], limit: int = 1 << 20) -> None:
        super().__init__()
        self._fn = fn
        self._limit = limit

    def __missing__(self, key: Any) -> Any:
        value = self._fn(key)
        if len(self) >= self._limit:
            self.clear()
        self[key] = value
        return value
