"""QMT tick dict -> :class:`~relay.records.SpotRecord`.

A pushed tick, as xtquant's ``subscribe_whole_quote`` callback delivers it (real sample)::

    "600000.SH": {'time': 1733118954000, 'lastPrice': 11.39, 'open': 11.39, 'high': 11.4,
      'low': 11.31, 'lastClose': 11.38, 'amount': 862127800.0, 'volume': 758613,
      'pvolume': 75861284, 'stockStatus': 3, 'openInt': 13, 'transactionNum': 37062,
      'lastSettlementPrice': 11.38, 'settlementPrice': 0.0, 'pe': 0.0,
      'askPrice': [11.4, 11.41, 11.42, 11.43, 11.44],
      'bidPrice': [11.39, 11.38, 11.37, 11.36, 11.35],
      'askVol': [1932, 2410, 1810, 1130, 2006], 'bidVol': [313, 5219, 2996, 2420, 1638],
      'volRatio': 0.0, 'speed1Min': 0.0, 'speed5Min': 0.0}

``time`` is epoch milliseconds; ``amount`` is yuan, ``pvolume`` shares, ``volume`` lots.
``get_full_tick`` records may carry ``timetag`` ("20241202 13:55:54", China time) instead of
``time`` and whole-number prices as ints; both are accepted.

:func:`normalise_tick` is pure: a bad tick raises :class:`~relay.errors.BadTick` with a short
reason from :data:`DROP_REASONS`. :class:`Normaliser` applies it to a whole batch, keeps the
one piece of cross-tick state validation needs (last cumulative volume per security, to catch
a volume that goes backwards) and counts drops by reason.
"""

from __future__ import annotations

import re
import time as _time
from array import array
from functools import lru_cache
from itertools import chain, repeat
from math import isfinite
from operator import floordiv, itemgetter, lt, methodcaller, truediv
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from relay.errors import BadTick
from relay.records import Memo, SpotColumns, SpotRecord

__all__ = [
    "DROP_REASONS",
    "BatchResult",
    "Normaliser",
    "china_datetime",
    "normalise_tick",
    "split_symbol",
]

DROP_REASONS: Tuple[str, ...] = (
    "not_a_dict",        # the tick is not a mapping
    "bad_code",          # symbol is not NNNNNN.SH / .SZ / .BJ
    "missing_field",     # a required key is absent
    "bad_type",          # None, a string, a list where a number belongs, ...
    "not_finite",        # NaN or infinity
    "negative",          # negative price, volume or amount
    "bad_book",          # book arrays of the wrong length or with bad entries
    "seed_record",       # time == 0: QMT's seed record after subscribing, not a real tick
    "bad_time",          # time missing, unparseable or absurd
    "volume_decreased",  # cumulative volume went backwards within a day
    "auction",           # call-auction tick (stockStatus 2), only when configured to drop them
)

_CHINA_OFFSET_S = 8 * 3600
_SYMBOL_RE = re.compile(r"^(\d{6})\.(SH|SZ|BJ)$")
# Sane bounds for an exchange timestamp: 2000-01-01 .. 2100-01-01 (epoch ms).
_MIN_MS = 946_684_800_000
_MAX_MS = 4_102_444_800_000
_AUCTION_STATUS = 2
_new_record = tuple.__new__


@lru_cache(maxsize=8192)
def split_symbol(symbol: str) -> Optional[Tuple[str, str]]:
    """``"600000.SH" -> ("SH", "600000")``; ``None`` if the symbol is malformed."""
    m = _SYMBOL_RE.match(symbol) if isinstance(symbol, str) else None
    return (m.group(2), m.group(1)) if m else None


@lru_cache(maxsize=4096)
def china_datetime(epoch_s: int) -> str:
    """Epoch seconds -> ``"YYYY-MM-DD HH:MM:SS"`` in China time (UTC+8), whatever the host zone."""
    t = _time.gmtime(epoch_s + _CHINA_OFFSET_S)
    return (
        f"{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d} "
        f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}"
    )


@lru_cache(maxsize=4096)
def _timetag_ms(timetag: str) -> int:
    """``"20241202 13:55:54"`` (China time) -> epoch ms; raises ValueError if malformed."""
    tag = timetag.strip()
    date, _, clock = tag.partition(" ")
    if len(date) != 8 or not date.isdigit():
        raise ValueError(timetag)
    parts = clock.split(":") if clock else ["0", "0", "0"]
    hh, mm, ss = (int(float(p)) for p in parts) if len(parts) == 3 else (-1, 0, 0)
    t = _time.struct_time((int(date[:4]), int(date[4:6]), int(date[6:]), hh, mm, ss, 0, 0, 0))
    if not (1 <= t.tm_mon <= 12 and 1 <= t.tm_mday <= 31 and 0 <= hh < 24 and 0 <= mm < 60):
        raise ValueError(timetag)
    import calendar  # noqa: PLC0415 - cold path, only for get_full_tick records

    return (calendar.timegm(t) - _CHINA_OFFSET_S) * 1000


def _tick_ms(code: str, tick: Mapping[str, Any]) -> int:
    ms = tick.get("time")
    if ms is None:
        tag = tick.get("timetag")
        if tag is None:
            raise BadTick(code, "missing_field")
        if not isinstance(tag, str):
            raise BadTick(code, "bad_time")
        try:
            return _timetag_ms(tag)
        except ValueError:
            raise BadTick(code, "bad_time") from None
    if ms.__class__ is not int:
        if isinstance(ms, float) and isfinite(ms) and ms == int(ms):
            ms = int(ms)
        elif isinstance(ms, bool) or not isinstance(ms, int):
            raise BadTick(code, "bad_time")
    if ms == 0:
        raise BadTick(code, "seed_record")
    if not _MIN_MS <= ms < _MAX_MS:
        raise BadTick(code, "bad_time")
    return int(ms)


def _book(code: str, values: Any, levels: int, decimals: Optional[int]) -> Tuple[float, ...]:
    if values.__class__ is not list and values.__class__ is not tuple:
        raise BadTick(code, "bad_book")
    n = len(values)
    if n not in (levels, 0):
        raise BadTick(code, "bad_book")
    try:
        total = sum(values)
    except TypeError:
        raise BadTick(code, "bad_book") from None
    if not isfinite(total) or (n and min(values) < 0):
        raise BadTick(code, "bad_book")
    if decimals is None:
        return tuple(values)  # sizes pass through as QMT sends them
    return tuple([round(v, decimals) for v in values])


def normalise_tick(
    symbol: str,
    tick: Any,
    *,
    name: str = "",
    units: str = "hikyuu",
    book_levels: int = 5,
    price_decimals: int = 4,
) -> SpotRecord:
    """Validate one QMT tick and convert it to a :class:`SpotRecord`.

    Args:
        symbol: QMT symbol, e.g. ``"600000.SH"``.
        tick: the tick dict as QMT delivered it.
        name: the security's name, if known.
        units: ``"hikyuu"`` (amount in 10k yuan, volume in lots) or ``"raw"`` (yuan, shares).
        book_levels: expected length of each book array (empty arrays are accepted too).
        price_decimals: prices are rounded to this many decimals to remove float noise.

    Returns:
        The normalised record.

    Raises:
        BadTick: the tick is malformed; ``reason`` is one of :data:`DROP_REASONS`.
    """
    parts = split_symbol(symbol)
    if parts is None:
        raise BadTick(str(symbol), "bad_code")
    if not isinstance(tick, dict):
        raise BadTick(symbol, "not_a_dict")
    ms = _tick_ms(symbol, tick)
    try:
        last_close = tick["lastClose"]
        open_ = tick["open"]
        high = tick["high"]
        low = tick["low"]
        last = tick["lastPrice"]
        amount = tick["amount"]
        shares = tick.get("pvolume")
        lots = tick["volume"] if shares is None else None
        bid = tick["bidPrice"]
        bid_vol = tick["bidVol"]
        ask = tick["askPrice"]
        ask_vol = tick["askVol"]
    except KeyError:
        raise BadTick(symbol, "missing_field") from None
    volume: Any = shares if shares is not None else lots
    try:
        # One sum tells finiteness and type for all scalars at once (None/str raise TypeError).
        total = last_close + open_ + high + low + last + amount + volume
    except TypeError:
        raise BadTick(symbol, "bad_type") from None
    if total.__class__ is not float and total.__class__ is not int:
        raise BadTick(symbol, "bad_type")  # e.g. a bool-only sum or a numpy scalar
    if not isfinite(total):
        raise BadTick(symbol, "not_finite")
    if min(last_close, open_, high, low, last, amount, volume) < 0:
        raise BadTick(symbol, "negative")
    d = price_decimals
    bid_t = _book(symbol, bid, book_levels, d)
    bid_amount_t = _book(symbol, bid_vol, book_levels, None)
    ask_t = _book(symbol, ask, book_levels, d)
    ask_amount_t = _book(symbol, ask_vol, book_levels, None)
    if not (len(bid_t) == len(bid_amount_t) == len(ask_t) == len(ask_amount_t)):
        raise BadTick(symbol, "bad_book")
    status = tick.get("stockStatus")
    trades = tick.get("transactionNum")
    # Division by an exact power of ten gives the double nearest the true decimal value, so
    # 862127800.0 -> 86212.78 with no noise (multiplying by 0.0001 would add some).
    if units == "hikyuu":
        amount = amount / 10000
        volume = volume / 100 if shares is not None else float(volume)
    else:
        amount = float(amount)
        volume = float(volume) if shares is not None else volume * 100.0
    return SpotRecord(
        parts[0],
        parts[1],
        name,
        china_datetime(ms // 1000),
        round(last_close, d),
        round(open_, d),
        round(high, d),
        round(low, d),
        round(last, d),
        amount,
        volume,
        bid_t,
        bid_amount_t,
        ask_t,
        ask_amount_t,
        ms,
        status if status.__class__ is int else None,
        trades if trades.__class__ is int else None,
    )


class BatchResult:
    """What :meth:`Normaliser.normalise_batch` returns: the good ticks and the drops by reason.

    The good ticks come as :class:`~relay.records.SpotColumns` from the fast path or as a
    list of records from the per-tick path; each form is built from the other on demand.
    """

    __slots__ = ("_columns", "_records", "dropped")

    def __init__(self, records: Optional[List[SpotRecord]], dropped: Dict[str, int],
                 columns: Optional[SpotColumns] = None) -> None:
        self._records = records
        self._columns = columns
        self.dropped = dropped

    def __len__(self) -> int:
        if self._columns is not None:
            return self._columns.n
        return len(self._records or ())

    @property
    def records(self) -> List[SpotRecord]:
        if self._records is None:
            assert self._columns is not None
            self._records = self._columns.records
        return self._records

    @property
    def columns(self) -> Optional[SpotColumns]:
        """Columns, or ``None`` when the records' book depths differ."""
        if self._columns is None:
            self._columns = SpotColumns.from_records(self.records)
        return self._columns


_DAY_MS = 86_400_000
_OFFSET_MS = _CHINA_OFFSET_S * 1000
_INT = {int}
_DICT = {dict}
_LIST = {list}
_FIELDS_GET = tuple(itemgetter(key) for key in (
    "time", "lastClose", "open", "high", "low", "lastPrice", "amount", "pvolume",
    "bidPrice", "bidVol", "askPrice", "askVol"))
_STATUS = methodcaller("get", "stockStatus")
_TRADES = methodcaller("get", "transactionNum")
_INF = float("inf")


def _price_rounder(decimals: int) -> Callable[[Any], Any]:
    """A price check-and-round for a :class:`~relay.records.Memo`: a price is checked once,
    when first seen, and only finite, non-negative numbers get in, so every value the memo
    returns is valid and ``map(memo.__getitem__, prices)`` validates and rounds a column at
    C speed."""

    def check_and_round(price: Any) -> Any:
        if price.__class__ is not float and price.__class__ is not int:
            raise TypeError("price is not a number")
        if not 0 <= price < _INF:  # also false for NaN
            raise ValueError("price is negative or not finite")
        return round(price, decimals)

    return check_and_round


class Normaliser:
    """Normalises whole batches; counts drops; remembers cumulative volume per security.

    A batch first goes through a columnar fast path: every check of :func:`normalise_tick`
    applied to whole columns with C-level builtins (``map``, ``zip``, ``min``, ``sum``), and
    every conversion done the same way. Any doubt (a failed check, a ``get_full_tick``
    record, a missing optional field) sends the batch down the per-tick path instead, which
    names and counts each bad tick. Both paths give identical records (tested).

    Args:
        names: security names by QMT symbol (missing names become ``""``).
        units, book_levels, price_decimals: see :func:`normalise_tick`.
        drop_auction: drop call-auction ticks (``stockStatus == 2``) instead of passing them.
    """

    __slots__ = ("_book_levels", "_decimals", "_drop_auction", "_last_volume", "_names",
                 "_prices", "_seconds", "_symbols", "_units", "_volume_day")

    def __init__(
        self,
        names: Optional[Mapping[str, str]] = None,
        *,
        units: str = "hikyuu",
        book_levels: int = 5,
        price_decimals: int = 4,
        drop_auction: bool = False,
    ) -> None:
        self._names: Mapping[str, str] = names if names is not None else {}
        self._units = units
        self._book_levels = book_levels
        self._decimals = price_decimals
        self._drop_auction = drop_auction
        # cumulative volume of the last accepted tick per symbol, on day _volume_day
        self._last_volume: Dict[str, float] = {}
        self._volume_day = -1
        self._prices = Memo(_price_rounder(price_decimals))
        self._seconds = Memo(china_datetime)
        self._symbols = Memo(split_symbol)

    def set_names(self, names: Mapping[str, str]) -> None:
        """Replace the name table (e.g. after the QMT source reloads instrument details)."""
        self._names = names

    def normalise_batch(self, batch: Mapping[str, Any]) -> BatchResult:
        """Normalise every tick of ``batch``; bad ticks are dropped and counted, never raised."""
        if batch:
            try:
                columns = self._fast(batch)
            except (KeyError, TypeError, ValueError, AttributeError, OverflowError):
                columns = None  # something is off: the per-tick path will say what
            if columns is not None:
                return BatchResult(None, {}, columns)
        return self._per_tick(batch)

    def _fast(self, batch: Mapping[str, Any]) -> Optional[SpotColumns]:
        """The columnar path; ``None`` (or an exception) means "use the per-tick path"."""
        symbols = list(batch)
        ticks = list(batch.values())
        n = len(ticks)
        if set(map(type, ticks)) != _DICT:
            return None
        times, lc, op, hi, lo, last, amount, volume, bp, bv, ap, av = (
            list(map(get, ticks)) for get in _FIELDS_GET)
        parts = list(map(self._symbols.__getitem__, symbols))
        if None in parts:
            return None
        if set(map(type, times)) != _INT or min(times) < _MIN_MS or max(times) >= _MAX_MS:
            return None
        # Prices are validated as they are rounded (see _price_rounder); the rest here. sum()
        # raises TypeError on None/str/lists, and is finite only if every term is.
        price = self._prices.__getitem__
        lc, op, hi, lo, last = (list(map(price, col)) for col in (lc, op, hi, lo, last))
        if not isfinite(sum(amount) + sum(volume)) or min(*amount, *volume) < 0:
            return None
        levels = len(bp[0]) if bp[0].__class__ is list else -1
        if levels not in (self._book_levels, 0):
            return None
        for col in (bp, bv, ap, av):
            if set(map(len, col)) != {levels}:
                return None
        bid = array("d", map(price, chain.from_iterable(bp)))
        ask = array("d", map(price, chain.from_iterable(ap)))
        sizes = []
        for col in (bv, av):
            flat = list(chain.from_iterable(col))
            if levels and (not isfinite(sum(flat)) or min(flat) < 0):
                return None
            sizes.append(array("d", flat))
        status = list(map(_STATUS, ticks))
        trades = list(map(_TRADES, ticks))
        if set(map(type, status)) != _INT or set(map(type, trades)) != _INT:
            return None
        if self._drop_auction and _AUCTION_STATUS in status:
            return None
        if set(map(type, volume)) == _INT:
            volumes = list(map(truediv, volume, repeat(100 if self._units == "hikyuu" else 1)))
        else:
            return None  # fractional share counts: let the per-tick path round them
        amounts = (list(map(truediv, amount, repeat(10000))) if self._units == "hikyuu"
                   else list(map(float, amount)))
        day = (min(times) + _OFFSET_MS) // _DAY_MS
        if (max(times) + _OFFSET_MS) // _DAY_MS != day:
            return None  # a batch across midnight: compare volumes tick by tick
        last_volume = self._last_volume
        if day != self._volume_day:
            last_volume.clear()
            self._volume_day = day
        elif any(map(lt, volumes, map(last_volume.get, symbols, repeat(-1.0)))):
            return None  # a volume went backwards: let the per-tick path name it
        last_volume.update(zip(symbols, volumes))
        return SpotColumns(n, levels, [
            list(map(itemgetter(0), parts)),
            list(map(itemgetter(1), parts)),
            list(map(self._names.get, symbols, repeat(""))),
            list(map(self._seconds.__getitem__, map(floordiv, times, repeat(1000)))),
            lc, op, hi, lo, last, amounts, volumes, bid, sizes[0], ask, sizes[1],
            times, status, trades,
        ])

    def _per_tick(self, batch: Mapping[str, Any]) -> BatchResult:
        records: List[SpotRecord] = []
        dropped: Dict[str, int] = {}
        names = self._names
        last_volume = self._last_volume
        units, levels, dec = self._units, self._book_levels, self._decimals
        drop_auction = self._drop_auction
        append = records.append
        for symbol, tick in batch.items():
            try:
                rec = normalise_tick(
                    symbol, tick, name=names.get(symbol, ""),
                    units=units, book_levels=levels, price_decimals=dec,
                )
                if drop_auction and rec.status == _AUCTION_STATUS:
                    raise BadTick(symbol, "auction")
                day = ((rec.time_ms or 0) + _OFFSET_MS) // _DAY_MS
                if day > self._volume_day:
                    last_volume.clear()
                    self._volume_day = day
                if day == self._volume_day:  # a tick from an earlier day is not compared
                    if rec.volume < last_volume.get(symbol, -1.0):
                        raise BadTick(symbol, "volume_decreased")
                    last_volume[symbol] = rec.volume
            except BadTick as bad:
                dropped[bad.reason] = dropped.get(bad.reason, 0) + 1
                continue
            append(rec)
        return BatchResult(records, dropped)
