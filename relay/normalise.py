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
reason from :data:`DROP_REASONS`. :class:`Normaliser` gives the same results for a whole
batch at once (its fast path works on numpy columns), keeps the one piece of cross-tick state
validation needs (last cumulative volume per security, to catch a volume that goes backwards)
and counts drops by reason.

Numbers are read the way ``array("d")`` reads them (ints and floats, not strings or None),
prices rounded half to even at ``price_decimals`` as ``round(x * 10**d) / 10**d``, which gives
the double nearest the decimal value; every value in a record is a plain ``float`` (``int``
for the time, status and trade count).
"""

from __future__ import annotations

import re
import struct
import time as _time
from array import array
from collections import deque
from functools import lru_cache
from itertools import chain, repeat
from math import isfinite
from operator import itemgetter
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np

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
_INT32_MIN, _INT32_MAX = -(1 << 31), (1 << 31) - 1
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1
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


def _round(value: Any, scale: float) -> float:
    """Round half to even at ``log10(scale)`` decimals: ``value * scale`` to the nearest
    integer, divided back, which gives the double nearest the decimal (11.390000000000001 ->
    11.39). The fast path computes the same with numpy's ``rint``. ``OverflowError`` if the
    scaled value is infinite."""
    rounded: float = round(value * scale) / scale
    return rounded


def _book(code: str, values: Any, levels: int, scale: Optional[float]) -> Tuple[float, ...]:
    if values.__class__ is not list and values.__class__ is not tuple:
        raise BadTick(code, "bad_book")
    n = len(values)
    if n not in (levels, 0):
        raise BadTick(code, "bad_book")
    try:
        # array("d") reads each value as a double: None, strings and lists are refused
        vals = array("d", values)
    except (TypeError, OverflowError):
        raise BadTick(code, "bad_book") from None
    if not all(map(isfinite, vals)) or (n and min(vals) < 0):
        raise BadTick(code, "bad_book")
    if scale is None:
        return tuple(vals)  # sizes pass through as QMT sends them (as doubles)
    try:
        return tuple([_round(v, scale) for v in vals])
    except OverflowError:
        raise BadTick(code, "bad_book") from None


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
        # Read as doubles, the way array("d") does: None, strings and lists are refused
        # (TypeError), a number too large for a double overflows.
        nums = array("d", (last_close, open_, high, low, last, amount, volume))
    except TypeError:
        raise BadTick(symbol, "bad_type") from None
    except OverflowError:
        raise BadTick(symbol, "not_finite") from None
    if not all(map(isfinite, nums)):
        raise BadTick(symbol, "not_finite")
    if min(nums) < 0:
        raise BadTick(symbol, "negative")
    scale = 10.0 ** price_decimals
    try:
        prices = [_round(p, scale) for p in nums[:5]]
    except OverflowError:
        raise BadTick(symbol, "not_finite") from None
    amount, volume = nums[5], nums[6]
    bid_t = _book(symbol, bid, book_levels, scale)
    bid_amount_t = _book(symbol, bid_vol, book_levels, None)
    ask_t = _book(symbol, ask, book_levels, scale)
    ask_amount_t = _book(symbol, ask_vol, book_levels, None)
    if not (len(bid_t) == len(bid_amount_t) == len(ask_t) == len(ask_amount_t)):
        raise BadTick(symbol, "bad_book")
    status = tick.get("stockStatus")
    trades = tick.get("transactionNum")
    # Division by an exact power of ten gives the double nearest the true decimal value, so
    # 862127800.0 -> 86212.78 with no noise (multiplying by 0.0001 would add some).
    if units == "hikyuu":
        amount = amount / 10000
        volume = volume / 100 if shares is not None else volume
    elif shares is None:
        volume = volume * 100.0
    return SpotRecord(
        parts[0],
        parts[1],
        name,
        china_datetime(ms // 1000),
        prices[0],
        prices[1],
        prices[2],
        prices[3],
        prices[4],
        amount,
        volume,
        bid_t,
        bid_amount_t,
        ask_t,
        ask_amount_t,
        ms,
        # optional fields: absent unless a plain int that fits the schema's int / long
        status if status.__class__ is int and _INT32_MIN <= status <= _INT32_MAX else None,
        trades if trades.__class__ is int and _INT64_MIN <= trades <= _INT64_MAX else None,
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
_SEQUENCES = {list, tuple}
# Every field the fast path reads, in this order: three ints, the five prices, amount and
# shares, then the four book arrays.
_FIELDS = itemgetter("time", "stockStatus", "transactionNum", "lastClose", "open", "high",
                     "low", "lastPrice", "amount", "pvolume", "bidPrice", "bidVol", "askPrice",
                     "askVol")
# More distinct symbols than this (a hostile stream; the market has about 12,000) and the
# normaliser forgets them all and starts over, so memory stays bounded.
_UNIVERSE_LIMIT = 1 << 18
# Ticks read per chunk by the fast path: ~1 MB of dicts and numbers, so the passes over a
# chunk after the first find it in the CPU cache.
_CHUNK = 1000


@lru_cache(maxsize=64)
def _doubles(count: int) -> struct.Struct:
    return struct.Struct(f"={count}d")


@lru_cache(maxsize=64)
def _longs(count: int) -> struct.Struct:
    return struct.Struct(f"={count}q")


def _pack_numbers(row: Any, lo: int, items: List[Any]) -> None:
    """``items`` as doubles into ``row[lo:lo + len(items)]`` (a contiguous float64 array).

    ``Struct("d")`` reads each item the way ``array("d")`` does in the per-tick path. A
    Python int goes through a temporary float object that way, so a column that starts
    with an int (sizes and volumes, which QMT sends as ints) is first packed as int64 --
    exactly, with no objects -- and cast by numpy, which rounds an int to the nearest double
    as ``float()`` does; a float in it, or an int outside int64, makes that fail
    (``struct.error``) and the column is packed as doubles after all.
    """
    n = len(items)
    if n and items[0].__class__ is int:
        longs = np.empty(n, np.int64)
        try:
            _longs(n).pack_into(longs.data, 0, *items)
        except struct.error:
            pass
        else:
            row[lo:lo + n] = longs
            return
    _doubles(n).pack_into(row, 8 * lo, *items)


class _Universe(Dict[str, int]):
    """Every symbol seen so far, numbered from 0 on first sight.

    Per-symbol facts live in arrays indexed by that number, so a whole batch looks them up
    with one numpy take: the market, code and name strings, and the last cumulative volume
    (the one piece of state validation needs across ticks). A malformed symbol raises
    ``KeyError`` and gets no number.
    """

    def __init__(self, names: Mapping[str, str]) -> None:
        super().__init__()
        self._names = names
        self._markets: List[str] = []
        self._codes: List[str] = []
        self._symbols: List[str] = []
        self._strings: Optional[Tuple[Any, ...]] = None  # numpy arrays, built lazily
        self.volumes = np.full(1024, -1.0)  # last cumulative volume by number; -1 = none yet

    def __missing__(self, symbol: str) -> int:
        parts = split_symbol(symbol)
        if parts is None:
            raise KeyError(symbol)
        number = len(self._symbols)
        self._symbols.append(symbol)
        self._markets.append(parts[0])
        self._codes.append(parts[1])
        self._strings = None
        if number == len(self.volumes):
            self.volumes = np.concatenate([self.volumes, np.full(number, -1.0)])
        self[symbol] = number
        return number

    def set_names(self, names: Mapping[str, str]) -> None:
        self._names = names
        self._strings = None

    def columns(self, numbers: Any) -> Tuple[List[List[str]], Dict[str, Tuple[Any, Any]]]:
        """The market, code and name columns for an array of symbol numbers, as lists of str
        and in wire form (see :attr:`SpotColumns.wire <relay.records.SpotColumns>`)."""
        if self._strings is None:
            names = list(map(self._names.get, self._symbols, repeat("")))
            tables = []
            for column in (self._markets, self._codes, names):
                encoded = [value.encode() for value in column]
                tables.append(np.array(column, dtype=object))
                tables.append(np.array(list(map(len, encoded)), dtype=np.uint32))
                tables.append(np.array(encoded, dtype=f"S{max(map(len, encoded), default=1) or 1}"))
            self._strings = tuple(tables)
        t = self._strings
        text = [t[i][numbers].tolist() for i in (0, 3, 6)]
        wire = {field: (t[i + 1][numbers], t[i + 2][numbers])
                for field, i in (("market", 0), ("code", 3), ("name", 6))}
        return text, wire


class Normaliser:
    """Normalises whole batches; counts drops; remembers cumulative volume per security.

    A batch first goes through a columnar fast path: the fields of every tick are gathered
    into columns with C-level builtins (``map``, ``list.extend``, ``set``, ``Struct.pack``),
    a chunk of ticks at a time so that the chunk stays in the CPU cache, and every check and
    conversion of :func:`normalise_tick` is applied to whole numpy columns at once. Any doubt
    (a failed check, a ``get_full_tick`` record, a missing optional field) sends the batch
    down the per-tick path instead, which names and counts each bad tick. Both paths
    give identical records (tested), down to the Python types of their values.

    Args:
        names: security names by QMT symbol (missing names become ``""``).
        units, book_levels, price_decimals: see :func:`normalise_tick`.
        drop_auction: drop call-auction ticks (``stockStatus == 2``) instead of passing them.
    """

    __slots__ = ("_book_levels", "_decimals", "_drop_auction", "_names", "_scale", "_seconds",
                 "_units", "_universe", "_volume_day")

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
        self._scale = 10.0 ** price_decimals
        self._drop_auction = drop_auction
        self._universe = _Universe(self._names)
        self._volume_day = -1  # the China-time day the remembered volumes belong to
        self._seconds = Memo(china_datetime)

    def set_names(self, names: Mapping[str, str]) -> None:
        """Replace the name table (e.g. after the QMT source reloads instrument details)."""
        self._names = names
        self._universe.set_names(names)

    def normalise_batch(self, batch: Mapping[str, Any]) -> BatchResult:
        """Normalise every tick of ``batch``; bad ticks are dropped and counted, never raised."""
        if len(self._universe) > _UNIVERSE_LIMIT:
            self._universe = _Universe(self._names)
            self._volume_day = -1
        if batch:
            try:
                columns = self._fast(batch)
            except (KeyError, TypeError, ValueError, AttributeError, OverflowError,
                    struct.error):
                columns = None  # something is off: the per-tick path will say what
            if columns is not None:
                return BatchResult(None, {}, columns)
        return self._per_tick(batch)

    def _fast(self, batch: Mapping[str, Any]) -> Optional[SpotColumns]:
        """The columnar path; ``None`` (or an exception) means "use the per-tick path".

        Every check here is one the per-tick path makes, applied to a whole column.
        """
        ticks = list(batch.values())
        n = len(ticks)
        if set(map(type, ticks)) != _DICT:
            return None
        universe = self._universe
        numbers = np.fromiter(map(universe.__getitem__, batch), np.intp, n)
        # Every chunk packs its numbers straight into these (no per-chunk arrays to join).
        values = np.empty((7, n))
        ints = np.empty((3, n), np.int64)  # time, status, trade count
        book = np.empty((4, n * self._book_levels))
        depths = set()
        for lo in range(0, n, _CHUNK):
            depth = self._read(ticks[lo:lo + _CHUNK], values, ints, book, lo)
            if depth is None:
                return None
            depths.add(depth)
        if len(depths) != 1:
            return None
        levels = depths.pop()
        if not levels:
            book = book[:, :0]
        times, status, trades = ints
        first_ms, last_ms = int(times.min()), int(times.max())
        if first_ms < _MIN_MS or last_ms >= _MAX_MS:
            return None
        if status.min() < _INT32_MIN or status.max() > _INT32_MAX:
            return None  # the per-tick path reports such a status as absent
        if self._drop_auction and (status == _AUCTION_STATUS).any():
            return None
        if not (np.isfinite(values).all() and np.isfinite(book).all()):
            return None
        if values.min() < 0 or (levels and book.min() < 0):
            return None
        scale = self._scale
        # Round half to even at the given decimals: x * 10**d to the nearest integer, divided
        # back; the per-tick path computes exactly the same (round(x * scale) / scale).
        prices, bid, ask = values[:5], book[0], book[2]
        for col in (prices, bid, ask):  # in place: the raw values are not needed again
            np.multiply(col, scale, out=col)
            np.rint(col, out=col)
            np.divide(col, scale, out=col)
        if not (np.isfinite(prices).all() and np.isfinite(bid).all()
                and np.isfinite(ask).all()):
            return None
        amounts, volumes = values[5], values[6]
        if self._units == "hikyuu":
            np.divide(amounts, 10000.0, out=amounts)
            np.divide(volumes, 100.0, out=volumes)
        day = (first_ms + _OFFSET_MS) // _DAY_MS
        if (last_ms + _OFFSET_MS) // _DAY_MS != day:
            return None  # a batch across midnight: compare volumes tick by tick
        if day < self._volume_day:
            return None  # an earlier day's ticks are not compared: the per-tick path knows
        if day > self._volume_day:
            universe.volumes.fill(-1.0)
            self._volume_day = day
        elif (volumes < universe.volumes[numbers]).any():
            return None  # a volume went backwards: let the per-tick path name it
        universe.volumes[numbers] = volumes
        seconds, where = np.unique(times // 1000, return_inverse=True)
        texts = list(map(self._seconds.__getitem__, seconds.tolist()))
        where = where.reshape(-1)
        datetimes = np.array(texts, dtype=object)[where].tolist()
        stamps = np.array([text.encode() for text in texts], dtype="S19")[where]
        (market, code, name), wire = universe.columns(numbers)
        wire["datetime"] = (np.full(n, 19, dtype=np.uint32), stamps)
        columns = SpotColumns(n, levels, [
            market, code, name, datetimes,
            prices[0], prices[1], prices[2], prices[3], prices[4], amounts, volumes,
            bid, book[1], ask, book[3],
            times, status, trades,
        ])
        columns.wire = wire
        return columns

    def _read(self, ticks: List[Any], values: Any, ints: Any, book: Any,
              lo: int) -> Optional[int]:
        """One chunk of ticks, from position ``lo`` of the batch, read into columns: returns
        its book depth, or ``None`` if a check fails.

        The five prices, amount and shares go into ``values[:, lo:lo + m]``, time, status
        and trade count into ``ints[:, lo:lo + m]``, the four book arrays into
        ``book[:, lo * levels:(lo + m) * levels]``, packed in place. The chunk is small
        enough that its dicts, lists and numbers stay in the CPU cache across the passes
        over it.
        """
        m = len(ticks)
        # One pass over the dicts takes all fourteen fields of each tick; the fields of the
        # chunk then lie in one flat list, where field k is the slice [k::14].
        cells: List[Any] = []
        deque(map(cells.extend, map(_FIELDS, ticks)), maxlen=0)
        columns = cells[0::14], cells[1::14], cells[2::14]
        # Plain ints only (a bool or a float is judged tick by tick); an int past the int64
        # range fails to pack (struct.error), and the per-tick path says what it is.
        if set(map(type, chain(*columns))) != _INT:
            return None
        for k in range(3):
            _longs(m).pack_into(ints[k], 8 * lo, *columns[k])
        # Struct("d").pack reads a value as a double exactly as array("d") does in the
        # per-tick path: None, strings and lists are refused (struct.error), ints and bools
        # accepted; NaN, infinity and negatives are caught on the arrays after.
        for k in range(7):
            _pack_numbers(values[k], lo, cells[3 + k::14])
        lists = cells[10::14] + cells[11::14] + cells[12::14] + cells[13::14]
        lengths = set(map(len, lists))
        if not set(map(type, lists)) <= _SEQUENCES or len(lengths) != 1:
            return None
        levels: int = lengths.pop()
        if levels not in (self._book_levels, 0):
            return None
        if levels:
            for k in range(4):
                flat: List[Any] = []  # list.extend copies a short list without the iterator
                deque(map(flat.extend, lists[k * m:(k + 1) * m]), maxlen=0)  # object chain
                _pack_numbers(book[k], lo * levels, flat)  # makes per item: 2x faster
        return levels

    def _per_tick(self, batch: Mapping[str, Any]) -> BatchResult:
        records: List[SpotRecord] = []
        dropped: Dict[str, int] = {}
        names = self._names
        universe = self._universe
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
                number = universe[symbol]
                if day > self._volume_day:
                    universe.volumes.fill(-1.0)
                    self._volume_day = day
                if day == self._volume_day:  # a tick from an earlier day is not compared
                    if rec.volume < universe.volumes[number]:
                        raise BadTick(symbol, "volume_decreased")
                    universe.volumes[number] = rec.volume
            except BadTick as bad:
                dropped[bad.reason] = dropped.get(bad.reason, 0) + 1
                continue
            append(rec)
        return BatchResult(records, dropped)
