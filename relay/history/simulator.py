"""The simulated market's past: deterministic K-line history for the live simulator's universe.

The universe (codes, names, boards, tick sizes, price limits, previous closes, volatility
and liquidity) is the live simulator's own (:meth:`SimulatedMarket.profiles`), built from
the same ``source.simulator`` config, so the history ends the trading day before the live
simulator's date and each security's last close is that day's ``lastClose``.

The model
---------
Trading days are weekdays (the live simulator has no holiday calendar) from 2005-01-04.
Each security has a listing day (indices and about a third of the rest: the first day;
others spread over the years, at least 20 trading days before the end) and a few suspended
days (no bar). Day closes are a bounded random walk walked backwards from the final close,
each day's return kept well inside the board's price limit; open, high and low lie within
that day's limits too. Minute bars follow a bridge from the day's open to its close that
touches its high and low: 240 one-minute bars (09:31-11:30, 13:01-15:00) whose volumes sum
to the day's, and 48 five-minute bars aggregated from them. All randomness is a counter-based
hash of (seed, symbol, day, minute), so any window of any subset of securities gives the
same bars, and everything is vectorised NumPy.
"""

from __future__ import annotations

import time
import zlib
from datetime import date, timedelta
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import numpy.typing as npt

from relay.history.source import Bars, Fetched, Progress
from relay.sources.simulator import SecurityProfile, SimulatedMarket, simulated_date

if TYPE_CHECKING:
    from relay.config import Config, SimulatorConfig

__all__ = ["FIRST_DAY", "SimulatorHistory"]

FIRST_DAY = date(2005, 1, 4)
"""The simulated market's first trading day."""

_EPOCH_ORDINAL = date(1970, 1, 1).toordinal()
_U64 = np.uint64
_M1 = _U64(0x9E3779B97F4A7C15)
_M2 = _U64(0xBF58476D1CE4E5B9)
_M3 = _U64(0x94D049BB133111EB)
_BOUND = 1.6       # log-price excursion bound of the backward walk (a factor of ~5)

# End minutes of the 240 one-minute bars, as hhmm.
_MINUTES = np.array(
    [m // 60 * 100 + m % 60 for m in (*range(9 * 60 + 31, 11 * 60 + 31),
                                      *range(13 * 60 + 1, 15 * 60 + 1))], dtype=np.uint64)


def _mix(x: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    """splitmix64's finaliser, element-wise (wrapping uint64 arithmetic)."""
    x = x + _M1
    x = (x ^ (x >> _U64(30))) * _M2
    x = (x ^ (x >> _U64(27))) * _M3
    out: npt.NDArray[np.uint64] = x ^ (x >> _U64(31))
    return out


def _uniform(key: npt.NDArray[np.uint64]) -> npt.NDArray[np.float64]:
    """(0, 1) floats from uint64 keys."""
    out: npt.NDArray[np.float64] = ((_mix(key) >> _U64(11)).astype(np.float64) + 0.5) * 2.0**-53
    return out


def _normal(key: npt.NDArray[np.uint64]) -> npt.NDArray[np.float64]:
    """Standard normal floats from uint64 keys (Box-Muller on two hashes)."""
    u1 = _uniform(key)
    u2 = _uniform(key ^ _U64(0x5851F42D4C957F2D))
    out: npt.NDArray[np.float64] = np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)
    return out


def _keys(sym: npt.NDArray[np.uint64], day: npt.NDArray[np.int64], stream: int,
          minute: Optional[npt.NDArray[np.int64]] = None) -> npt.NDArray[np.uint64]:
    """Keys for (symbol, day[, minute], stream): broadcasted."""
    k = _mix(sym[:, None] ^ (day[None, :].astype(np.uint64) * _U64(0x100000001B3)
                             + _U64(stream) * _U64(0x9E3779B1)))
    if minute is not None:
        k = _mix(k[..., None] ^ (minute.astype(np.uint64) * _U64(0xD6E8FEB86659FD93)))
    return k


def _limits(prev: npt.NDArray[np.int64], pct: npt.NDArray[np.int64]
            ) -> Tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Limit-down and limit-up in ticks, as the live simulator (and the exchanges) round."""
    down = np.maximum((prev * (100 - pct) + 50) // 100, 1)
    up = (prev * (100 + pct) + 50) // 100
    unlimited = pct <= 0
    return np.where(unlimited, 1, down), np.where(unlimited, np.int64(1) << 60, up)


def _day_number(day: date) -> int:
    return day.toordinal() - _EPOCH_ORDINAL


def _weekdays(first: date, last: date) -> npt.NDArray[np.int64]:
    """Epoch day numbers of the weekdays from ``first`` to ``last`` inclusive."""
    days = np.arange(_day_number(first), _day_number(last) + 1, dtype=np.int64)
    return days[(days + 3) % 7 < 5]


def _ymd(days: npt.NDArray[np.int64]) -> npt.NDArray[np.uint64]:
    d = days.astype("M8[D]")
    y = d.astype("M8[Y]")
    m = d.astype("M8[M]")
    out: npt.NDArray[np.uint64] = (
        (y.astype(np.int64) + 1970) * 10000 + ((m - y.astype("M8[M]")).astype(np.int64) + 1) * 100
        + (d - m.astype("M8[D]")).astype(np.int64) + 1).astype(np.uint64)
    return out


class _DayPaths:
    """Day bars (in ticks) of a group of securities from calendar day ``first`` to the end.

    A close depends only on the returns after it (the walk goes backwards from the final
    close) and every random draw is keyed by day, so any ``first`` gives the same bars.
    """

    def __init__(self, profiles: Sequence[SecurityProfile], keys: npt.NDArray[np.uint64],
                 calendar: npt.NDArray[np.int64], first: int) -> None:
        total = calendar.shape[0]
        days = calendar[first:]
        self.first = first
        pct = np.array([p.limit_pct for p in profiles], dtype=np.int64)
        vol = np.array([max(p.daily_volatility, 0.004) for p in profiles])
        final = np.array([p.prev_ticks for p in profiles], dtype=np.int64)
        # listing day (index into the whole calendar) and suspensions
        lu = _uniform(_mix(keys ^ _U64(0xA5A5)))
        is_index = pct == 0
        spread = np.clip((lu - 0.35) / 0.65, 0.0, 1.0)
        listing = np.where(is_index | (lu < 0.35), 0,
                           (spread * max(total - 21, 0)).astype(np.int64))
        self.listing = np.minimum(listing, max(total - 20, 0))
        col = np.arange(first, total)
        suspended = _uniform(_keys(keys, days, 1)) < 0.004
        suspended[:, -1] = False
        suspended &= col[None, :] != self.listing[:, None]
        suspended[is_index, :] = False
        self.suspended = suspended
        # backward bounded walk of log closes; each bound has slope <= 1, so a day's move
        # never exceeds its drawn return, kept at 70 % of the limit: rounding to ticks (the
        # prices stay above 150 ticks) cannot push a close past its limit
        edge = np.where(is_index, 0.08, 0.7 * pct / 100.0)
        r = np.clip(_normal(_keys(keys, days, 2)) * vol[:, None],
                    np.log1p(-edge)[:, None], np.log1p(edge)[:, None])
        r[suspended] = 0.0
        back = np.cumsum(r[:, ::-1], axis=1)[:, ::-1]      # sum of r[j] for j >= t
        z = _BOUND * np.tanh(-(back - r) / _BOUND)          # log(c[t] / final), bounded
        floor = np.log(np.minimum(150.0 / final, 1.0))[:, None] - 0.05
        z = floor + np.logaddexp(0.0, z - floor)            # soft floor (softplus)
        z[:, -1] = 0.0
        close = np.maximum(np.rint(final[:, None] * np.exp(z)).astype(np.int64), 1)
        close[:, -1] = final
        prev = np.empty_like(close)
        prev[:, 1:] = close[:, :-1]
        prev[:, 0] = np.rint(close[:, 0] * np.exp(-r[:, 0])).astype(np.int64)
        down, up = _limits(prev, pct[:, None])
        close = np.clip(close, down, up)   # a no-op by construction; the limits are the rule
        close[:, -1] = final
        gap = _normal(_keys(keys, days, 3)) * vol[:, None] * 0.3
        open_ = np.clip(np.rint(prev * np.exp(gap)).astype(np.int64), down, up)
        hi_move = np.abs(_normal(_keys(keys, days, 4))) * vol[:, None] * 0.5
        lo_move = np.abs(_normal(_keys(keys, days, 5))) * vol[:, None] * 0.5
        top = np.maximum(open_, close)
        bottom = np.minimum(open_, close)
        self.high = np.clip(np.rint(top * np.exp(hi_move)).astype(np.int64), top, up)
        self.low = np.clip(np.rint(bottom * np.exp(-lo_move)).astype(np.int64), down, bottom)
        self.open = open_
        self.close = close
        lots = np.array([p.daily_lots for p in profiles])
        noise = np.exp(0.45 * _normal(_keys(keys, days, 6)))
        self.volume = np.maximum(np.rint(lots[:, None] * noise), 1.0)
        self.div = np.array([p.tick_divisor for p in profiles], dtype=np.float64)
        self.share_price = np.array([p.share_price for p in profiles])
        self.is_index = is_index

    def amount(self, rows: npt.NDArray[np.int64], volume: npt.NDArray[np.float64],
               typical_ticks: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """Turnover in whole yuan of ``volume`` lots at ``typical_ticks``."""
        price = np.where(self.is_index[rows][:, None], self.share_price[rows][:, None],
                         typical_ticks / self.div[rows][:, None])
        out: npt.NDArray[np.float64] = np.rint(volume * 100.0 * price)
        return out


class SimulatorHistory:
    """The simulated market's K-line history as a :class:`~relay.history.source.HistorySource`.

    Args:
        config: the ``source.simulator`` section (seed, securities, date, start).
        clock: wall clock in epoch seconds (default :func:`time.time`), for the date.
    """

    kind = "simulator"
    parallel = True
    """Copies of it in writer processes give the same bars: the importer may write several
    files at once."""

    def __init__(self, config: SimulatorConfig, *, clock: Optional[object] = None) -> None:
        now = clock() if callable(clock) else time.time()
        live_day = simulated_date(config, float(now))
        self.live_date = live_day
        market = SimulatedMarket(seed=config.seed, securities=config.securities,
                                 trading_date=live_day)
        self._profiles: Dict[str, SecurityProfile] = {p.symbol: p for p in market.profiles()}
        self._order = [p.symbol for p in market.profiles()]
        self.names = market.names
        last = live_day - timedelta(days=1)
        while last.weekday() >= 5:
            last -= timedelta(days=1)
        self._last = last
        self._days = _weekdays(FIRST_DAY, last)
        self._ymd = _ymd(self._days)
        self._seed = config.seed
        self._cache: Dict[Tuple[str, ...], _DayPaths] = {}

    def __getstate__(self) -> Dict[str, Any]:
        """Picklable (sent to writer processes): the names as a plain dict, no cache."""
        state = dict(vars(self))
        state["names"] = dict(self.names)
        state["_cache"] = {}
        return state

    @classmethod
    def from_config(cls, config: Config, **options: object) -> SimulatorHistory:
        """Build from ``config.source.simulator``."""
        return cls(config.source.simulator, clock=options.get("clock"))

    def open(self) -> None:
        """Nothing to connect to."""

    def close(self) -> None:
        """Nothing to release."""

    def universe(self, markets: Sequence[str]) -> List[str]:
        """The live simulator's symbols in ``markets``, in its order."""
        wanted = {m.upper() for m in markets}
        return [s for s in self._order if s.rpartition(".")[2] in wanted]

    def last_day(self) -> int:
        """The trading day before the live simulator's date."""
        return int(self._last.strftime("%Y%m%d"))

    def profile(self, symbol: str) -> Optional[SecurityProfile]:
        """The live simulator's description of ``symbol``."""
        return self._profiles.get(symbol)

    def _paths(self, symbols: Tuple[str, ...], first: int) -> _DayPaths:
        cached = self._cache.get(symbols)
        if cached is not None and cached.first <= first:
            return cached
        profiles = [self._profiles[s] for s in symbols]
        keys = np.array([zlib.crc32(f"{self._seed}/{s}".encode()) for s in symbols],
                        dtype=np.uint64) * _U64(0x2545F4914F6CDD1D)
        paths = _DayPaths(profiles, keys, self._days, first)
        self._cache = {symbols: paths}    # one group at a time: bounded memory
        return paths

    def fetch(self, period: str, symbols: Sequence[str], start: int, end: int,
              progress: Optional[Progress] = None) -> Fetched:
        """Bars of ``symbols`` (unknown ones fail) for days ``start`` to ``end``."""
        result = Fetched()
        known = tuple(s for s in symbols if s in self._profiles)
        for s in symbols:
            if s not in self._profiles:
                result.failed[s] = "unknown code"
        if known:
            lo = int(np.searchsorted(self._ymd, np.uint64(start), side="left"))
            hi = int(np.searchsorted(self._ymd, np.uint64(end), side="right"))
            if hi > lo:
                paths = self._paths(known, max(lo - 1, 0))
                if period == "day":
                    self._day_bars(paths, known, lo, hi, result)
                else:
                    self._minute_bars(paths, known, lo, hi, 1 if period == "1min" else 5,
                                      result)
        if progress is not None:
            progress(len(symbols))
        return result

    def _day_bars(self, p: _DayPaths, symbols: Tuple[str, ...], lo: int, hi: int,
                  out: Fetched) -> None:
        cols = np.arange(lo, hi)
        rows = np.arange(len(symbols))
        at = slice(lo - p.first, hi - p.first)     # the paths start at calendar day p.first
        o, h, lw, c = (a[:, at].astype(np.float64) for a in (p.open, p.high, p.low, p.close))
        vol = p.volume[:, at]
        amount = p.amount(rows, vol, (o + h + lw + c) / 4.0)
        stamps = self._ymd[lo:hi] * _U64(10000)
        present = ~p.suspended[:, at] & (cols[None, :] >= p.listing[:, None])
        for i, symbol in enumerate(symbols):
            keep = present[i]
            if not keep.any():
                continue
            div = p.div[i]
            out.bars[symbol] = Bars(stamps[keep], o[i, keep] / div, h[i, keep] / div,
                                    lw[i, keep] / div, c[i, keep] / div, amount[i, keep],
                                    vol[i, keep])

    def _minute_bars(self, p: _DayPaths, symbols: Tuple[str, ...], lo: int, hi: int,
                     step: int, out: Fetched) -> None:
        cols = np.arange(lo, hi)
        n, t = len(symbols), hi - lo
        rows = np.arange(n)
        keys = np.array([zlib.crc32(f"{self._seed}/{s}/m".encode()) for s in symbols],
                        dtype=np.uint64)
        minute_no = np.arange(240, dtype=np.int64)
        z = _normal(_keys(keys, self._days[lo:hi], 7, minute_no))      # (n, t, 240)
        w = np.cumsum(z, axis=2)
        frac = (minute_no + 1) / 240.0
        bridge = w - frac * w[..., -1:]
        at = slice(lo - p.first, hi - p.first)     # the paths start at calendar day p.first
        o = p.open[:, at, None].astype(np.float64)
        c = p.close[:, at, None].astype(np.float64)
        h = p.high[:, at, None].astype(np.float64)
        low = p.low[:, at, None].astype(np.float64)
        span = np.maximum(bridge.max(axis=2, keepdims=True) - bridge.min(axis=2, keepdims=True),
                          1e-9)
        raw = o + (c - o) * frac + bridge * ((h - low) / span * 0.9)
        path = np.clip(np.rint(raw), low, h)
        path[..., -1] = c[..., 0]
        close = path
        open_ = np.concatenate((o, path[..., :-1]), axis=2)
        high = np.maximum(open_, close)
        lowp = np.minimum(open_, close)
        top = np.argmax(raw, axis=2)[..., None]
        bottom = np.argmin(raw, axis=2)[..., None]
        np.put_along_axis(high, top, h, axis=2)
        np.put_along_axis(lowp, bottom, low, axis=2)
        # volumes: an intraday "U" with noise, summing exactly to the day's volume
        shape = np.where(minute_no < 30, 1.5 - 0.02 * minute_no,
                         np.where(minute_no >= 210, 0.9 + 0.013 * (minute_no - 210), 0.9))
        weight = shape * np.exp(0.3 * _normal(_keys(keys, self._days[lo:hi], 8, minute_no)))
        day_vol = p.volume[:, at, None]
        lots = np.floor(day_vol * weight / weight.sum(axis=2, keepdims=True))
        lots[..., -1] += day_vol[..., 0] - lots.sum(axis=2)
        typical = (open_ + high + lowp + close) / 4.0
        amount = p.amount(rows, lots.reshape(n, -1),
                          typical.reshape(n, -1)).reshape(n, t, 240)
        if step == 5:
            shp = (n, t, 48, 5)
            open_ = open_.reshape(shp)[..., 0]
            close = close.reshape(shp)[..., -1]
            high = high.reshape(shp).max(axis=3)
            lowp = lowp.reshape(shp).min(axis=3)
            lots = lots.reshape(shp).sum(axis=3)
            amount = amount.reshape(shp).sum(axis=3)
            minutes = _MINUTES[4::5]
        else:
            minutes = _MINUTES
        per_day = minutes.shape[0]
        stamps = (self._ymd[lo:hi, None] * _U64(10000) + minutes[None, :]).ravel()
        present = ~p.suspended[:, at] & (cols[None, :] >= p.listing[:, None])
        for i, symbol in enumerate(symbols):
            keep = np.repeat(present[i], per_day)
            if not keep.any():
                continue
            div = p.div[i]
            out.bars[symbol] = Bars(stamps[keep], open_[i].ravel()[keep] / div,
                                    high[i].ravel()[keep] / div, lowp[i].ravel()[keep] / div,
                                    close[i].ravel()[keep] / div, amount[i].ravel()[keep],
                                    lots[i].ravel()[keep])
