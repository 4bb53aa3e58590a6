"""A simulated China A-share market: the embedded default source.

Nothing here is real market data. :class:`SimulatedMarket` is a plain, synchronous model that
tests drive directly; :class:`SimulatorSource` wraps it in the :class:`~relay.sources.Source`
interface and paces it against a wall clock.

The model
---------
**Universe.** ``securities`` symbols (5,200 by default, indices included) spread across the
boards in roughly the real market's proportions, using real code ranges: SH main board
(600/601/603/605), STAR (688), SZ main board (000-003), ChiNext (300/301), Beijing
(43/83/87/920), ETFs (SH 510/512/588, SZ 159) and ten real indices under their real
names (上证指数, 沪深300, 创业板指, 北证50, ...; fewer in universes under 27 symbols).
Stock names join a two-character prefix and an industry suffix (科技, 银行, 医药, ...);
a few main-board stocks are "ST"/"*ST"; ETF names end in "ETF". Everything is drawn
from the seed, so one seed always gives the same market.

**Prices.** Each security has a previous close (stocks mostly 3-60 yuan, a few far higher;
ETFs 0.5-5 yuan on a 0.001 tick; indices at realistic point levels), a beta to one common
market factor, its own volatility and a daily drift (a few percent of stocks get a strong
one, so some reach their limit each day). Prices follow a continuous "fair value" and are
published rounded to the tick and clamped to the daily limit computed from the previous
close: main board ±10 %, ST ±5 %, ChiNext/STAR ±20 %, Beijing ±30 %, ETFs ±10 %; indices
have no limit and move with the market factor. ``low <= open, lastPrice <= high`` always.

**Book.** Five levels a side in tick steps: bids at or below ``lastPrice``, asks above it,
so every bid is below every ask. Levels beyond the limit price are empty (price 0, size 0):
at limit-up the ask side is empty and the best bid is a large sealed queue; at limit-down
the bid side is empty. Sizes are positive lots. Indices carry five zeros on every side.

**Volume.** ``pvolume`` (shares), ``volume`` (lots, ``pvolume / 100`` rounded),
``amount`` (yuan) and ``transactionNum`` only grow during a day; each trade adds
``lots * 100 * price`` with a price between the old and the new ``lastPrice``, so
``amount / pvolume`` stays between ``low`` and ``high``. Activity follows the intraday
"U": busier at the open and the close.

**Trading day** (China time, weekdays; there is no holiday calendar). ``stockStatus`` is
QMT's: 0 = not trading, 2 = call auction, 3 = trading (continuous or matched):

========================  ======  ==========================================================
China time                status  what happens
========================  ======  ==========================================================
before 09:15              0       nothing pushed; ``lastPrice`` = previous close
09:15-09:25 (auction)     2       indicative ``lastPrice`` moves; open/high/low/volume = 0
09:25:00 (match)          3       open = high = low = match price, first volume; all pushed
09:25-09:30               3       nothing pushed
09:30-11:30, 13:00-15:00  3       continuous trading (11:30:00 and 15:00:00 are pushed)
11:30-13:00 (lunch)       3       nothing pushed
15:00-15:05 (closed)      0       trailing pushes resend each final tick once, status 0
after 15:05               0       the market rolls to the next weekday: previous close :=
                                  today's last price, volumes reset; next push 09:15
========================  ======  ==========================================================

``openInt`` is 13 while ``stockStatus`` is 3 (as in a real continuous-trading tick) and 0
otherwise; the settlement, ``pe`` and speed fields are constants as QMT sends them for
stocks.

**Pushes.** The first batch a :class:`SimulatorSource` yields is the full market, like
QMT's first delivery after ``subscribe_whole_quote``. Every later push (``push_interval``
simulated seconds apart, 3 s by default) carries only the securities that changed since
the previous push, about 20-60 % of the market in continuous trading; a push with no change
is skipped, never sent empty. Given a seed and the same sequence of clock readings, the
batches are identical.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
from bisect import bisect_right
from datetime import date, datetime, timedelta, timezone
from types import MappingProxyType
from typing import (
    TYPE_CHECKING,
    AsyncIterator,
    Dict,
    List,
    Mapping,
    NamedTuple,
    Optional,
    Set,
    Tuple,
)

import structlog

from relay.errors import ConfigError, SourceError
from relay.sources import Batch, Clock

if TYPE_CHECKING:
    from relay.config import Config, SimulatorConfig

__all__ = [
    "CHINA_TZ",
    "MAX_SECURITIES",
    "MIN_SECURITIES",
    "SecurityProfile",
    "SimulatedMarket",
    "SimulatorSource",
    "china_ms",
    "simulated_date",
]

CHINA_TZ = timezone(timedelta(hours=8), "CST")
"""China Standard Time (UTC+8, no daylight saving): every simulated instant is in this zone."""

MIN_SECURITIES = 10
"""Smallest universe: 上证指数 and at least one security on every board."""

MAX_SECURITIES = 20000
"""Largest universe; past about 8,000 the boards whose code ranges fill up spill into others."""

_DAY_MS = 86_400_000
_CN_OFFSET_MS = 8 * 3_600_000
_EPOCH_ORDINAL = date(1970, 1, 1).toordinal()
_TRADING_SECONDS = 4 * 3600.0   # continuous trading per day (09:30-11:30, 13:00-15:00)


def _hms(hour: int, minute: int, second: int = 0) -> int:
    return ((hour * 60 + minute) * 60 + second) * 1000


# Milliseconds since China midnight.
_T0915 = _hms(9, 15)
_T0925 = _hms(9, 25)
_T0930 = _hms(9, 30)
_T1130 = _hms(11, 30)
_T1300 = _hms(13, 0)
_T1500 = _hms(15, 0)
_T1505 = _hms(15, 5)

# Closed windows during which pushes happen (09:25:00 is the auction match push).
_PUSH_WINDOWS: Tuple[Tuple[int, int], ...] = ((_T0915, _T0925), (_T0930, _T1130), (_T1300, _T1505))

# Market states within a day.
_PRE, _AUCTION, _MATCHED, _CLOSED = 0, 1, 2, 3

_SHAPES = 1024   # how many book-size shapes a market draws

_ZERO_PRICES: Tuple[float, ...] = (0.0,) * 5
_ZERO_SIZES: Tuple[int, ...] = (0,) * 5

# Real indices: symbol, name, level (points), beta to the market factor,
# daily volume (lots), average share price (for amount). Most important first: a small
# universe keeps only the head of this list.
_INDICES: Tuple[Tuple[str, str, float, float, float, float], ...] = (
    ("000001.SH", "上证指数", 3300.0, 1.0, 4.0e8, 11.0),
    ("399001.SZ", "深证成指", 10500.0, 1.1, 5.0e8, 12.0),
    ("000300.SH", "沪深300", 3900.0, 0.9, 1.5e8, 16.0),
    ("399006.SZ", "创业板指", 2150.0, 1.3, 1.0e8, 25.0),
    ("899050.BJ", "北证50", 1300.0, 1.5, 8.0e6, 14.0),
    ("000016.SH", "上证50", 2700.0, 0.8, 6.0e7, 18.0),
    ("000905.SH", "中证500", 5800.0, 1.1, 1.2e8, 13.0),
    ("000852.SH", "中证1000", 6100.0, 1.2, 2.0e8, 12.0),
    ("000688.SH", "科创50", 1000.0, 1.4, 2.0e7, 45.0),
    ("399005.SZ", "中小100", 6500.0, 1.1, 5.0e7, 15.0),
)

# Boards: name, market, share of the non-index universe, code prefixes with weights and
# capacity, daily limit in percent, price divisor (100: 0.01 tick, 1000: 0.001 tick),
# median previous close, daily volatility.
_Prefixes = Tuple[Tuple[str, int, float], ...]
_BOARDS: Tuple[Tuple[str, str, float, _Prefixes, int, int, float, float], ...] = (
    ("main", "SH", 0.29,
     (("600", 1000, 0.45), ("601", 1000, 0.15), ("603", 1000, 0.30), ("605", 1000, 0.10)),
     10, 100, 11.0, 0.02),
    ("star", "SH", 0.10, (("688", 999, 1.0),), 20, 100, 30.0, 0.03),
    ("main", "SZ", 0.26,
     (("000", 1000, 0.35), ("001", 1000, 0.05), ("002", 1000, 0.50), ("003", 1000, 0.10)),
     10, 100, 10.0, 0.02),
    ("chinext", "SZ", 0.24, (("300", 1000, 0.70), ("301", 1000, 0.30)), 20, 100, 20.0, 0.03),
    ("bj", "BJ", 0.05,
     (("43", 10000, 0.10), ("83", 10000, 0.55), ("87", 10000, 0.20), ("920", 1000, 0.15)),
     30, 100, 12.0, 0.035),
    ("etf", "SH", 0.035, (("510", 1000, 0.40), ("512", 1000, 0.40), ("588", 1000, 0.20)),
     10, 1000, 1.3, 0.012),
    ("etf", "SZ", 0.025, (("159", 999, 1.0),), 10, 1000, 1.3, 0.012),
)

_ST_SHARE = 0.03   # share of main-board stocks under risk warning (ST, ±5 %)

_NAME_FIRST = (
    "华中东南西北海金天新长国恒宏永泰安光明大正鼎深江浙粤"
    "川湘鲁闽京沪汉瑞嘉信和兴盛隆德成通达远万龙凯精创"
)
_NAME_SECOND = (
    "信达通源盛泰科创远峰瑞联宇宏力电华海光星辰"
    "阳翔新锐邦润晶微威航能美康鑫诚胜元益丰"
)
_NAME_SUFFIX = (
    "科技", "银行", "医药", "电子", "股份", "能源", "材料", "智能", "化工", "电气", "机械",
    "汽车", "食品", "传媒", "环保", "证券", "地产", "药业", "信息", "新材", "光电", "生物",
    "软件", "通信", "农业", "物流", "重工", "精工", "钢铁", "水务", "集团", "控股", "实业",
    "电力", "建设", "装备",
)
_ETF_THEMES = (
    "沪深300", "中证500", "中证1000", "上证50", "科创50", "创业板", "红利", "证券", "银行",
    "医药", "医疗", "芯片", "半导体", "新能源", "光伏", "军工", "消费", "酒", "黄金", "恒生",
    "纳指", "标普", "传媒", "游戏", "通信", "人工智能", "机器人", "煤炭", "有色", "钢铁",
    "地产", "农业", "养殖", "家电", "汽车", "电池", "稀土", "央企", "国企", "港股通",
    "恒生科技", "中概互联", "计算机", "软件", "云计算", "大数据", "5G", "碳中和", "基建",
    "化工", "保险", "券商", "创新药", "生物医药", "中药", "食品饮料", "旅游", "物流", "电力",
    "油气", "国债", "可转债", "科创100", "双创50", "质量", "价值", "成长", "低波",
)
_ETF_ISSUERS = (
    "", "华夏", "易方达", "南方", "嘉实", "广发", "博时", "华泰柏瑞", "国泰", "富国", "汇添富",
    "招商", "鹏华", "天弘", "工银", "建信", "银华", "华宝", "平安", "景顺", "万家", "大成",
    "海富通",
)


def china_ms(day: date, hour: int, minute: int, second: int = 0) -> int:
    """Epoch milliseconds of a China-time (UTC+8) wall-clock instant, whatever the host zone.

    Args:
        day: the calendar date in China.
        hour: hour of day, 0-23.
        minute: minute, 0-59.
        second: second, 0-59.

    Returns:
        Milliseconds since the Unix epoch, as QMT's tick ``time``.
    """
    return (day.toordinal() - _EPOCH_ORDINAL) * _DAY_MS - _CN_OFFSET_MS + _hms(hour, minute, second)


def _epoch_day(ms: int) -> int:
    """Days since 1970-01-01 of the China calendar date containing ``ms``."""
    return (ms + _CN_OFFSET_MS) // _DAY_MS


def _is_weekday(epoch_day: int) -> bool:
    return (epoch_day + 3) % 7 < 5   # 1970-01-01 was a Thursday


def _session_day(ms: int) -> int:
    """Epoch day of the trading day that owns instant ``ms``.

    A weekday owns itself until 15:05; after that (and over a weekend) the next weekday does.
    """
    day = _epoch_day(ms)
    if _is_weekday(day) and (ms + _CN_OFFSET_MS) % _DAY_MS <= _T1505:
        return day
    day += 1
    while not _is_weekday(day):
        day += 1
    return day


def _trading_seconds(mod: int) -> float:
    """Seconds of continuous trading elapsed at ``mod`` ms after China midnight."""
    if mod <= _T0930:
        return 0.0
    if mod <= _T1130:
        return (mod - _T0930) / 1000.0
    if mod <= _T1300:
        return 7200.0
    if mod <= _T1500:
        return 7200.0 + (mod - _T1300) / 1000.0
    return _TRADING_SECONDS


def _intraday_activity(tsec: float) -> float:
    """Relative trading intensity: the intraday "U" (busy open, quiet midday, busy close)."""
    if tsec < 1800.0:
        return 1.5 - 0.6 * tsec / 1800.0
    if tsec > 12600.0:
        return 0.9 + 0.4 * (tsec - 12600.0) / 1800.0
    return 0.9


def _limit_ticks(prev: int, pct: int) -> Tuple[int, int]:
    """Limit-down and limit-up in ticks, rounded half up as the exchanges do."""
    down = (prev * (100 - pct) + 50) // 100
    up = (prev * (100 + pct) + 50) // 100
    return max(down, 1), up


class _Security:
    """Mutable state of one simulated security (prices in integer ticks)."""

    __slots__ = (
        "amount", "amount_price", "ask_p", "ask_v", "beta", "bid_p", "bid_v", "board",
        "book_lots", "div", "down", "drift", "fair", "high", "is_index", "last", "limit_pct",
        "lots_per_sec", "low", "m_ref", "name", "open", "prev", "pvolume", "rate", "sigma",
        "status", "symbol", "trade_lots", "ts", "txn", "up",
    )

    def __init__(self, symbol: str, name: str, *, board: str, div: int, limit_pct: int,
                 prev: int) -> None:
        self.symbol = symbol
        self.name = name
        self.board = board
        self.div = div
        self.limit_pct = limit_pct
        self.is_index = board == "index"
        self.prev = prev
        self.down, self.up = self.limits()
        self.last = prev
        self.fair = float(prev)
        self.open = self.high = self.low = 0
        self.pvolume = 0
        self.amount = 0.0
        self.txn = 0
        self.status = 0
        self.bid_p: List[float] = list(_ZERO_PRICES)
        self.ask_p: List[float] = list(_ZERO_PRICES)
        self.bid_v: List[int] = list(_ZERO_SIZES)
        self.ask_v: List[int] = list(_ZERO_SIZES)
        # Static behaviour, drawn by the universe builder.
        self.beta = 1.0
        self.sigma = 0.0          # volatility per sqrt(trading second)
        self.drift = 0.0          # drift per trading second (redrawn daily)
        self.rate = 0.0           # changes per simulated second at average activity
        self.lots_per_sec = 1.0
        self.trade_lots = 10.0
        self.book_lots = 10.0
        self.amount_price = 0.0   # indices: average share price behind their volume
        # Dynamic references for the next move.
        self.ts = 0.0             # trading seconds at the last move
        self.m_ref = 0.0          # market factor at the last move

    def limits(self) -> Tuple[int, int]:
        if self.is_index:
            return 1, 1 << 60
        return _limit_ticks(self.prev, self.limit_pct)

    def tick(self, time_ms: int) -> Dict[str, object]:
        div = self.div
        prev = self.prev / div
        status = self.status
        pvolume = self.pvolume
        return {
            "time": time_ms,
            "lastPrice": self.last / div,
            "open": self.open / div,
            "high": self.high / div,
            "low": self.low / div,
            "lastClose": prev,
            "amount": self.amount,
            "volume": (pvolume + 50) // 100,
            "pvolume": pvolume,
            "stockStatus": status,
            "openInt": 13 if status == 3 else 0,
            "transactionNum": self.txn,
            "lastSettlementPrice": prev,
            "settlementPrice": 0.0,
            "pe": 0.0,
            "askPrice": self.ask_p[:],
            "bidPrice": self.bid_p[:],
            "askVol": self.ask_v[:],
            "bidVol": self.bid_v[:],
            "volRatio": 0.0,
            "speed1Min": 0.0,
            "speed5Min": 0.0,
        }


class SecurityProfile(NamedTuple):
    """What a simulated security is, for models built on the same universe (history)."""

    symbol: str
    name: str
    board: str                # main, st, star, chinext, bj, etf, index
    tick_divisor: int         # 100: prices on a 0.01 tick; 1000: on a 0.001 tick
    limit_pct: int            # daily price limit in percent (0: none, indices)
    prev_ticks: int           # previous close in ticks (the day's ``lastClose`` x divisor)
    daily_volatility: float   # standard deviation of a day's log return
    daily_lots: float         # typical volume of a day, in lots
    share_price: float        # indices: the average share price behind their amount


class SimulatedMarket:
    """A deterministic model of the A-share market, driven by simulated time.

    Methods take the simulated instant as epoch milliseconds (China time is implied by the
    UTC+8 conversion, see :func:`china_ms`) and never read a clock, so tests step the market
    without sleeping. Time must not go backwards between calls.

    Args:
        seed: seeds the universe and every random move.
        securities: number of symbols, indices included
            (:data:`MIN_SECURITIES` to :data:`MAX_SECURITIES`).
        trading_date: the first trading day; the market starts before its 09:15 auction. A
            weekend date rolls to the following Monday at the first call.
        push_interval: simulated seconds between pushes, used by :meth:`next_push_time`.

    Raises:
        ValueError: ``securities`` or ``push_interval`` is out of range.
    """

    def __init__(self, *, seed: int = 20240101, securities: int = 5200,
                 trading_date: date, push_interval: float = 3.0) -> None:
        if not MIN_SECURITIES <= securities <= MAX_SECURITIES:
            raise ValueError(
                f"securities must be between {MIN_SECURITIES} and {MAX_SECURITIES}")
        if not push_interval > 0:
            raise ValueError("push_interval must be positive")
        self._interval_ms = max(1, round(push_interval * 1000))
        self._secs = _build_universe(random.Random(f"qmt-relay/universe/{seed}"), securities)
        self._rng = random.Random(f"qmt-relay/market/{seed}")
        self._names: Mapping[str, str] = MappingProxyType(
            {s.symbol: s.name for s in self._secs})
        self._boards: Mapping[str, str] = MappingProxyType(
            {s.symbol: s.board for s in self._secs})
        self._dirty: Set[int] = set()
        # Book-size shapes (ten multipliers, bids then asks), drawn once: one lookup per book.
        self._shapes = [tuple(0.1 + 1.9 * self._rng.random() for _ in range(10))
                        for _ in range(_SHAPES)]
        self._trailing: List[int] = []
        self._m = 0.0                     # log market factor since the previous close
        self._mkt_sigma = 0.012 / math.sqrt(_TRADING_SECONDS)
        self._mkt_drift = 0.0
        self._day = trading_date.toordinal() - _EPOCH_ORDINAL
        self._day_ms = self._day * _DAY_MS - _CN_OFFSET_MS
        self._state = _PRE
        self._last_ms = self._day_ms
        self._last_tsec = 0.0
        self._new_day()

    # -- public API ---------------------------------------------------------------------

    @property
    def symbols(self) -> Tuple[str, ...]:
        """Every symbol, in batch order (indices included)."""
        return tuple(s.symbol for s in self._secs)

    @property
    def names(self) -> Mapping[str, str]:
        """Security names by symbol, e.g. ``"000300.SH" -> "沪深300"``."""
        return self._names

    @property
    def boards(self) -> Mapping[str, str]:
        """Board by symbol: ``main``, ``st``, ``star``, ``chinext``, ``bj``, ``etf``, ``index``."""
        return self._boards

    def profiles(self) -> Tuple[SecurityProfile, ...]:
        """Every security's static description and current previous close, in batch order."""
        root = math.sqrt(_TRADING_SECONDS)
        return tuple(
            SecurityProfile(s.symbol, s.name, s.board, s.div, s.limit_pct, s.prev,
                            s.sigma * root if not s.is_index else 0.012 * s.beta,
                            s.lots_per_sec * _TRADING_SECONDS, s.amount_price)
            for s in self._secs)

    @property
    def trading_date(self) -> date:
        """The trading day the market is in (or preparing for)."""
        return date.fromordinal(self._day + _EPOCH_ORDINAL)

    def snapshot(self, sim_ms: int) -> Batch:
        """Every security's current tick, stamped ``sim_ms``.

        Applies any phase change due by ``sim_ms`` (auction start, match, close, roll to the
        next day) but moves no prices. Afterwards no change is pending: the next
        :meth:`step` returns only what changes after this snapshot.

        Args:
            sim_ms: the simulated instant, epoch milliseconds.

        Returns:
            ``{symbol: tick}`` for the whole universe.
        """
        self._sync(sim_ms)
        self._dirty.clear()
        return {s.symbol: s.tick(sim_ms) for s in self._secs}

    def step(self, sim_ms: int) -> Batch:
        """Advance the market to ``sim_ms`` and return what changed since the last push.

        Outside the push windows (before 09:15, 09:25-09:30, lunch, after 15:05, weekends)
        the market still applies phase changes but returns ``{}``; the changes are kept and
        delivered by the next push inside a window.

        Args:
            sim_ms: the simulated instant, epoch milliseconds (normally a value returned by
                :meth:`next_push_time`).

        Returns:
            ``{symbol: tick}`` for the securities that changed, stamped ``sim_ms``; may be
            empty.
        """
        self._sync(sim_ms)
        mod = sim_ms - self._day_ms
        elapsed_s = max(0.0, (sim_ms - self._last_ms) / 1000.0)
        self._last_ms = max(self._last_ms, sim_ms)
        if _T0915 <= mod < _T0925:
            self._auction_step(elapsed_s)
        elif _T0930 <= mod <= _T1130 or _T1300 <= mod <= _T1500:
            tsec = _trading_seconds(mod)
            dts = tsec - self._last_tsec
            self._last_tsec = max(self._last_tsec, tsec)
            if dts > 0:
                self._continuous_step(tsec, dts)
        elif _T1500 < mod <= _T1505:
            self._trailing_step()
        if not any(a <= mod <= b for a, b in _PUSH_WINDOWS) or not self._dirty:
            return {}
        secs = self._secs
        batch = {secs[i].symbol: secs[i].tick(sim_ms) for i in sorted(self._dirty)}
        self._dirty.clear()
        return batch

    def next_push_time(self, after_ms: int) -> int:
        """The first push instant strictly after ``after_ms``.

        Pushes are ``push_interval`` apart inside the windows 09:15-09:25, 09:30-11:30 and
        13:00-15:05 of each weekday; a window's start and end, and 15:00:00, are always push
        instants.

        Args:
            after_ms: epoch milliseconds.

        Returns:
            Epoch milliseconds of the next push.
        """
        day = _epoch_day(after_ms)
        for offset in range(8):
            if not _is_weekday(day + offset):
                continue
            midnight = (day + offset) * _DAY_MS - _CN_OFFSET_MS
            for start, end in _PUSH_WINDOWS:
                if after_ms < midnight + start:
                    return midnight + start
                if after_ms < midnight + end:
                    candidate = after_ms + self._interval_ms
                    close = midnight + _T1500
                    if after_ms < close < candidate:
                        return close
                    return min(candidate, midnight + end)
        raise AssertionError("unreachable: a weekday occurs within 8 days")

    # -- phases -------------------------------------------------------------------------

    def _sync(self, sim_ms: int) -> None:
        """Apply the day roll and phase changes due by ``sim_ms``."""
        day = _session_day(sim_ms)
        if day > self._day:
            self._day = day
            self._day_ms = day * _DAY_MS - _CN_OFFSET_MS
            self._new_day()
        mod = sim_ms - self._day_ms
        if self._state == _PRE and mod >= _T0915:
            self._start_auction()
        if self._state == _AUCTION and mod >= _T0925:
            self._match()
        if self._state == _MATCHED and mod > _T1500:
            self._close()

    def _new_day(self) -> None:
        """Start a trading day before its auction: yesterday's last becomes the close."""
        rng = self._rng
        traded = self._state >= _MATCHED
        for s in self._secs:
            if traded:
                s.prev = s.last
            s.down, s.up = s.limits()
            s.last = s.prev
            s.fair = float(s.prev)
            s.open = s.high = s.low = 0
            s.pvolume = 0
            s.amount = 0.0
            s.txn = 0
            s.status = 0
            s.bid_p = list(_ZERO_PRICES)
            s.ask_p = list(_ZERO_PRICES)
            s.bid_v = list(_ZERO_SIZES)
            s.ask_v = list(_ZERO_SIZES)
            s.ts = 0.0
            s.m_ref = 0.0
            if s.is_index:
                s.drift = 0.0
                continue
            # Most securities drift little; a few trend hard enough to reach their limit.
            daily = rng.gauss(0.0, 0.01)
            if rng.random() < 0.03:
                daily = math.copysign(rng.uniform(0.6, 1.5) * s.limit_pct / 100.0,
                                      rng.random() - 0.45)
            s.drift = daily / _TRADING_SECONDS
        self._m = 0.0
        self._mkt_drift = rng.gauss(0.0, 0.004) / _TRADING_SECONDS
        self._state = _PRE
        self._last_ms = max(self._last_ms, self._day_ms + _T0915)
        self._last_tsec = 0.0
        self._trailing = []
        self._dirty.update(range(len(self._secs)))

    def _start_auction(self) -> None:
        """09:15: every security gets an indicative price around its gapped open."""
        rng = self._rng
        gauss = rng.gauss
        self._m = gap = gauss(0.0, 0.006)
        for s in self._secs:
            s.status = 2
            s.m_ref = gap
            if s.is_index:
                continue
            s.fair = s.prev * math.exp(s.beta * gap + gauss(0.0, s.sigma * 40.0))
            s.last = min(s.up, max(s.down, round(s.fair)))
            self._book(s)
        self._state = _AUCTION
        self._dirty.update(range(len(self._secs)))

    def _match(self) -> None:
        """09:25: the call auction matches; open, first volume and first trades are set."""
        if self._state == _PRE:
            self._start_auction()
        rng = self._rng
        rnd = rng.random
        m = self._m
        for s in self._secs:
            if s.is_index:
                s.fair = s.prev * math.exp(s.beta * m + rng.gauss(0.0, 0.0005))
                s.last = max(1, round(s.fair))
            s.open = s.high = s.low = s.last
            s.status = 3
            s.ts = 0.0
            s.m_ref = m
            lots = int(s.lots_per_sec * _TRADING_SECONDS * (0.003 + 0.009 * rnd())) + 1
            self._trade(s, lots, s.last, s.last)
            if not s.is_index:
                self._book(s)
        self._state = _MATCHED
        self._last_tsec = 0.0
        self._dirty.update(range(len(self._secs)))

    def _close(self) -> None:
        """After 15:00: trading stops; each final tick is resent once with status 0."""
        for s in self._secs:
            s.status = 0
        self._state = _CLOSED
        self._trailing = list(range(len(self._secs)))

    # -- moves --------------------------------------------------------------------------

    def _auction_step(self, elapsed_s: float) -> None:
        """Indicative prices wander during the call auction; nothing trades."""
        if elapsed_s <= 0:
            return
        rng = self._rng
        rnd = rng.random
        gauss = rng.gauss
        exp = math.exp
        dirty = self._dirty
        for i, s in enumerate(self._secs):
            if s.is_index or rnd() < exp(-0.5 * s.rate * elapsed_s):
                continue
            s.fair *= exp(gauss(0.0, s.sigma * 4.0 * math.sqrt(elapsed_s)))
            s.fair = min(s.up + 0.49, max(s.down - 0.49, s.fair))
            s.last = min(s.up, max(s.down, round(s.fair)))
            self._book(s)
            dirty.add(i)

    def _continuous_step(self, tsec: float, dts: float) -> None:
        """Continuous trading: an activity-weighted random subset trades and moves."""
        rng = self._rng
        rnd = rng.random
        gauss = rng.gauss
        exp = math.exp
        sqrt = math.sqrt
        self._m += self._mkt_sigma * sqrt(dts) * gauss(0.0, 1.0) + self._mkt_drift * dts
        m = self._m
        activity = _intraday_activity(tsec)
        k = activity * dts
        dirty = self._dirty
        for i, s in enumerate(self._secs):
            if rnd() < exp(-s.rate * k):
                continue
            dt = tsec - s.ts
            if dt <= 0.0:
                dt = 0.5
            move = (s.beta * (m - s.m_ref) + s.drift * dt
                    + s.sigma * sqrt(dt) * gauss(0.0, 1.0))
            s.ts = tsec
            s.m_ref = m
            fair = s.fair * exp(move)
            up = s.up
            down = s.down
            fair = min(up + 0.49, max(down - 0.49, fair))
            s.fair = fair
            old = s.last
            new = min(up, max(down, round(fair)))
            s.last = new
            if dt > 600.0 and not s.is_index:
                # A long gap (e.g. starting mid-session): widen the range as trading would.
                swing = s.sigma * sqrt(dt) * abs(gauss(0.0, 1.0))
                s.high = max(s.high, min(up, round(max(old, new) * (1.0 + swing))))
                s.low = min(s.low, max(down, round(min(old, new) * (1.0 - swing))))
            if new > s.high:
                s.high = new
            elif new < s.low:
                s.low = new
            lots = int(s.lots_per_sec * dt * activity * (0.3 + 1.4 * rnd())) + 1
            self._trade(s, lots, old, new)
            if not s.is_index:
                self._book(s)
            dirty.add(i)

    def _trailing_step(self) -> None:
        """15:00-15:05: resend a part of the market's final ticks (each once)."""
        rnd = self._rng.random
        keep: List[int] = []
        for i in self._trailing:
            if rnd() < 0.35:
                self._dirty.add(i)
            else:
                keep.append(i)
        self._trailing = keep

    def _trade(self, s: _Security, lots: int, old: int, new: int) -> None:
        """Add ``lots`` traded between the old and the new price to the day's totals."""
        shares = lots * 100
        # Indices: an average share price; securities: between the old and the new price.
        price = (s.amount_price if s.is_index
                 else (old + (new - old) * self._rng.random()) / s.div)
        s.pvolume += shares
        s.amount += float(round(shares * price))   # whole yuan, as QMT reports
        s.txn += 1 + int(lots / s.trade_lots)

    def _book(self, s: _Security) -> None:
        """Rebuild five book levels a side around ``s.last``."""
        rnd = self._rng.random
        last = s.last
        up = s.up
        down = s.down
        div = s.div
        if last >= up:
            bid = last
        elif last <= down:
            bid = last - 1
        else:
            bid = last if rnd() < 0.7 else last - 1
        ask = last + 1
        size = s.book_lots
        shape = self._shapes[int(rnd() * _SHAPES)]
        if bid - 4 >= down and ask + 4 <= up:   # the usual case: both sides full
            bid_p = [bid / div, (bid - 1) / div, (bid - 2) / div, (bid - 3) / div,
                     (bid - 4) / div]
            ask_p = [ask / div, (ask + 1) / div, (ask + 2) / div, (ask + 3) / div,
                     (ask + 4) / div]
            bid_v = [int(size * x) + 1 for x in shape[:5]]
            ask_v = [int(size * x) + 1 for x in shape[5:]]
        else:
            bid_p = [(bid - k) / div if bid - k >= down else 0.0 for k in range(5)]
            ask_p = [(ask + k) / div if ask + k <= up else 0.0 for k in range(5)]
            bid_v = [int(size * x) + 1 if p else 0 for p, x in zip(bid_p, shape[:5])]
            ask_v = [int(size * x) + 1 if p else 0 for p, x in zip(ask_p, shape[5:])]
        if last >= up:
            bid_v[0] = int(size * (30.0 + 50.0 * rnd())) + 1   # sealed at limit-up
        s.bid_p = bid_p
        s.ask_p = ask_p
        s.bid_v = bid_v
        s.ask_v = ask_v


# -- universe ---------------------------------------------------------------------------


def _index_count(securities: int) -> int:
    """How many of :data:`_INDICES` a universe of ``securities`` symbols holds."""
    return max(1, min(len(_INDICES), (securities - len(_BOARDS)) // 2))


def _board_counts(total: int) -> List[int]:
    """Split ``total`` non-index securities across :data:`_BOARDS` by weight.

    Every board gets at least one; a board whose code ranges are full passes its excess on
    to the boards that still have room.
    """
    capacity = [sum(cap for _, cap, _ in b[3]) for b in _BOARDS]
    counts = [max(1, int(total * b[2])) for b in _BOARDS]
    counts[0] += total - sum(counts)   # the remainder goes to the largest board
    excess = 0
    for j, cap in enumerate(capacity):
        if counts[j] > cap:
            excess += counts[j] - cap
            counts[j] = cap
    for j, cap in enumerate(capacity):
        room = min(excess, cap - counts[j])
        counts[j] += room
        excess -= room
    return counts


def _draw_codes(rng: random.Random, prefixes: _Prefixes, count: int) -> List[str]:
    """``count`` distinct codes spread over the board's prefixes by weight."""
    cumulative: List[float] = []
    acc = 0.0
    for _, _, weight in prefixes:
        acc += weight
        cumulative.append(acc)
    per = [0] * len(prefixes)
    for _ in range(count):
        j = min(bisect_right(cumulative, rng.random() * acc), len(prefixes) - 1)
        # Overflow into the next prefix with room (only at very large universes).
        while per[j] >= prefixes[j][1]:
            j = (j + 1) % len(prefixes)
        per[j] += 1
    codes: List[str] = []
    for (prefix, capacity, _), n in zip(prefixes, per):
        width = 6 - len(prefix)
        first = 1 if capacity == 999 else 0   # 688/159 codes start at 001 (688001, 159001)
        numbers = rng.sample(range(first, capacity + first), n)
        codes.extend(f"{prefix}{k:0{width}d}" for k in numbers)
    return sorted(codes)


class _Namer:
    """Deterministic, unique Chinese-looking names."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self._used: Set[str] = set()

    def stock(self) -> str:
        rng = self._rng
        while True:
            first, second = rng.choice(_NAME_FIRST), rng.choice(_NAME_SECOND)
            if first == second:
                continue
            name = first + second + rng.choice(_NAME_SUFFIX)
            if name not in self._used:
                self._used.add(name)
                return name

    def etf(self) -> str:
        rng = self._rng
        for _ in range(1000):
            name = rng.choice(_ETF_ISSUERS) + rng.choice(_ETF_THEMES) + "ETF"
            if name not in self._used:
                self._used.add(name)
                return name
        while True:   # issuer x theme exhausted (huge universes): use a made-up brand
            name = self.stock()[:2] + rng.choice(_ETF_THEMES) + "ETF"
            if name not in self._used:
                self._used.add(name)
                return name


def _lognormal_price(rng: random.Random, median: float, low: float, high: float) -> float:
    return min(high, max(low, median * math.exp(rng.gauss(0.0, 0.7))))


def _build_universe(rng: random.Random, securities: int) -> List[_Security]:
    """Draw the universe: indices, then every board's securities, sorted by symbol."""
    namer = _Namer(rng)
    secs: List[_Security] = []
    indices = _INDICES[: _index_count(securities)]
    for symbol, name, level, beta, daily_lots, share_price in indices:
        s = _Security(symbol, name, board="index", div=100, limit_pct=0,
                      prev=round(level * (1.0 + rng.gauss(0.0, 0.03)) * 100))
        s.beta = beta
        s.rate = math.inf                      # indices change at every push
        s.lots_per_sec = daily_lots / _TRADING_SECONDS
        s.trade_lots = 20.0
        s.amount_price = share_price
        secs.append(s)
    counts = _board_counts(securities - len(indices))
    for (board, market, _, prefixes, pct, div, median, vol), count in zip(_BOARDS, counts):
        for code in _draw_codes(rng, prefixes, count):
            if board == "etf":
                name = namer.etf()
                price = min(5.0, max(0.5, median * math.exp(rng.gauss(0.0, 0.5))))
                kind, limit = "etf", pct
            else:
                name = namer.stock()
                price = _lognormal_price(rng, median, 2.0, 300.0)
                if rng.random() < 0.003:
                    price = rng.uniform(300.0, 1800.0)
                kind, limit = board, pct
                if board == "main" and rng.random() < _ST_SHARE:
                    name = ("*ST" if rng.random() < 0.4 else "ST") + name
                    kind, limit = "st", 5
            s = _Security(f"{code}.{market}", name, board=kind, div=div, limit_pct=limit,
                          prev=max(1, round(price * div)))
            liquidity = rng.gauss(0.0, 1.0)        # one draw drives volume and activity
            s.beta = rng.uniform(0.9, 1.1) if kind == "etf" else rng.uniform(0.6, 1.5)
            daily_vol = vol * math.exp(rng.gauss(0.0, 0.3))
            s.sigma = daily_vol / math.sqrt(_TRADING_SECONDS)
            daily_lots = (2.0e5 if kind == "etf" else 1.2e5) * math.exp(1.1 * liquidity)
            s.lots_per_sec = daily_lots / _TRADING_SECONDS
            s.trade_lots = rng.uniform(5.0, 30.0)
            s.book_lots = max(5.0, daily_lots / 400.0 * rng.uniform(0.5, 1.5))
            # Chance to change within one 3 s push at average activity: 5 %-95 %.
            p3 = min(0.95, max(0.05, 0.4 + 0.2 * liquidity + rng.gauss(0.0, 0.08)))
            s.rate = -math.log(1.0 - p3) / 3.0
            secs.append(s)
    secs.sort(key=lambda s: (s.symbol[-2:] != "SH", s.symbol[-2:] != "SZ", s.symbol))
    return secs


# -- the source -------------------------------------------------------------------------


def _previous_weekday(day: date) -> date:
    while day.weekday() >= 5:
        day -= timedelta(days=1)
    return day


def simulated_date(config: SimulatorConfig, now: float) -> date:
    """The trading date a simulator built from ``config`` at wall time ``now`` simulates.

    Raises:
        ConfigError: ``date`` is not ``YYYY-MM-DD``.
    """
    if config.start == "clock":
        return date.fromordinal(_session_day(int(now * 1000)) + _EPOCH_ORDINAL)
    if config.date is None:
        day = datetime.fromtimestamp(now, CHINA_TZ).date()
    else:
        try:
            day = date.fromisoformat(config.date)
        except ValueError:
            raise _config_error("date", "expected YYYY-MM-DD") from None
    return _previous_weekday(day)


class SimulatorSource:
    """The simulated market as a :class:`~relay.sources.Source`.

    With ``start="open"`` (the default) the simulated day begins at 09:30:00 China time on
    ``date`` (today in China when unset; a weekend date means the Friday before) with the
    09:25 match already done, so continuous-trading ticks flow at once whatever the wall
    time; ``"auction"`` begins at 09:15:00 instead. Simulated time then runs ``speed``
    times faster than the wall clock. With ``start="clock"`` the market follows the real
    China time of ``clock`` (``speed`` and ``date`` are ignored): nothing is pushed outside
    trading hours.

    Args:
        config: the ``source.simulator`` section.
        clock: wall clock in epoch seconds (default :func:`time.time`).

    Raises:
        ConfigError: a setting is out of range or ``date`` is not ``YYYY-MM-DD``.
    """

    kind: str = "simulator"

    def __init__(self, config: SimulatorConfig, *, clock: Optional[Clock] = None) -> None:
        self._clock: Clock = clock if clock is not None else time.time
        self._mode = config.start
        if self._mode not in ("open", "auction", "clock"):
            raise _config_error("start", "expected one of open, auction, clock")
        if not config.speed > 0:
            raise _config_error("speed", "must be positive")
        if not config.push_interval > 0:
            raise _config_error("push_interval", "must be positive")
        if not MIN_SECURITIES <= config.securities <= MAX_SECURITIES:
            raise _config_error(
                "securities", f"must be between {MIN_SECURITIES} and {MAX_SECURITIES}")
        now = self._clock()
        self._speed = 1.0 if self._mode == "clock" else float(config.speed)
        day = simulated_date(config, now)
        self._interval_ms = max(1, round(config.push_interval * 1000))
        self._skip_breaks = config.skip_breaks and self._mode != "clock"
        self._market = SimulatedMarket(seed=config.seed, securities=config.securities,
                                       trading_date=day, push_interval=config.push_interval)
        self._seed = config.seed
        self._wall0 = 0.0
        self._sim0 = 0
        self._last_ms = 0
        self._first: Optional[Batch] = None
        self._stop: Optional[asyncio.Event] = None
        self._started = False
        self._closed = False

    @classmethod
    def from_config(cls, config: Config, *, clock: Optional[Clock] = None) -> SimulatorSource:
        """Build the source from ``config.source.simulator``.

        Args:
            config: the relay configuration.
            clock: wall clock in epoch seconds (default :func:`time.time`).

        Returns:
            A source ready to :meth:`start`.

        Raises:
            ConfigError: a simulator setting is invalid.
        """
        return cls(config.source.simulator, clock=clock)

    @property
    def names(self) -> Mapping[str, str]:
        """Security names by QMT symbol, indices included."""
        return self._market.names

    @property
    def connected(self) -> bool:
        """True between :meth:`start` and :meth:`close`."""
        return self._started and not self._closed

    @property
    def market(self) -> SimulatedMarket:
        """The underlying model (for inspection; do not step it while :meth:`batches` runs)."""
        return self._market

    async def start(self) -> None:
        """Position the market at its start instant and prepare the full first batch.

        Raises:
            SourceError: the source was already closed.
        """
        if self._closed:
            raise SourceError(self.kind, "cannot start after close()")
        if self._started:
            return
        now = self._clock()
        day = self._market.trading_date
        if self._mode == "clock":
            sim_start = int(now * 1000)
        elif self._mode == "auction":
            sim_start = china_ms(day, 9, 15)
        else:
            sim_start = china_ms(day, 9, 30)
        self._wall0 = now
        self._sim0 = sim_start
        self._last_ms = sim_start
        self._market.step(sim_start)   # phase changes (and catching up when mid-session)
        self._first = self._market.snapshot(sim_start)
        self._stop = asyncio.Event()
        self._started = True
        structlog.get_logger(__name__).info(
            "simulator_started",
            simulated=True,
            securities=len(self._first),
            date=self._market.trading_date.isoformat(),
            start=self._mode,
            speed=self._speed,
            seed=self._seed,
        )

    async def batches(self) -> AsyncIterator[Batch]:
        """Yield the full market once, then each non-empty push at its wall-clock time.

        Ends when :meth:`close` is called. If the consumer falls behind by more than one
        push, intermediate pushes are merged into one (the market is not slowed down).

        Raises:
            SourceError: :meth:`start` was not called.
        """
        stop = self._stop
        if stop is None:
            raise SourceError(self.kind, "batches() called before start()")
        market = self._market
        interval = self._interval_ms
        first, self._first = self._first, None
        if first is not None and not self._closed:
            yield first
        while not self._closed:
            last = self._last_ms
            nxt = market.next_push_time(last)
            now_sim = self._sim_of(self._clock())
            behind = (now_sim - nxt) // interval
            if behind >= 1:
                # Late by a whole push or more: merge into the latest push already due.
                nxt = market.next_push_time(nxt + (behind - 1) * interval)
            ref = max(last, now_sim)
            if self._skip_breaks and nxt - ref > interval:
                # A break lies ahead: jump it, the next push comes one interval from now.
                self._wall0 = self._wall_of(ref) + interval / 1000.0 / self._speed
                self._sim0 = nxt
            delay = self._wall_of(nxt) - self._clock()
            if delay > 0:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=delay)
            else:
                await asyncio.sleep(0)
            if self._closed:
                return
            batch = market.step(nxt)
            self._last_ms = nxt
            if batch:
                yield batch

    async def close(self) -> None:
        """Stop producing; a running :meth:`batches` iterator ends. Idempotent."""
        self._closed = True
        if self._stop is not None:
            self._stop.set()

    def _sim_of(self, wall: float) -> int:
        return self._sim0 + int((wall - self._wall0) * self._speed * 1000.0)

    def _wall_of(self, sim_ms: int) -> float:
        return self._wall0 + (sim_ms - self._sim0) / 1000.0 / self._speed


def _config_error(key: str, reason: str) -> ConfigError:
    return ConfigError("<config>", f"source.simulator.{key}", reason)
