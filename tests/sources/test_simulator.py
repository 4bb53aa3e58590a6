"""Tests for relay.sources.simulator: the simulated market and its Source wrapper."""

from __future__ import annotations

import asyncio
import re
from datetime import date, datetime, timedelta, timezone
from typing import Any, Dict, List, Tuple

import pytest

from relay.config import Config, SimulatorConfig, SourceConfig
from relay.errors import ConfigError
from relay.sources import Batch, create_source
from relay.sources.simulator import SimulatedMarket, SimulatorSource, china_ms

CHINA = timezone(timedelta(hours=8))
DAY = date(2024, 12, 2)          # a Monday
FRIDAY = date(2024, 12, 6)
MONDAY = date(2024, 12, 9)

SAMPLE_KEYS = {
    "time", "lastPrice", "open", "high", "low", "lastClose", "amount", "volume", "pvolume",
    "stockStatus", "openInt", "transactionNum", "lastSettlementPrice", "settlementPrice", "pe",
    "askPrice", "bidPrice", "askVol", "bidVol", "volRatio", "speed1Min", "speed5Min",
}

BOARD_PATTERNS = {
    "main": r"^(60[0135]\d{3}\.SH|00[0-3]\d{3}\.SZ)$",
    "st": r"^(60[0135]\d{3}\.SH|00[0-3]\d{3}\.SZ)$",
    "star": r"^688\d{3}\.SH$",
    "chinext": r"^30[01]\d{3}\.SZ$",
    "bj": r"^((43|83|87)\d{4}|920\d{3})\.BJ$",
    "etf": r"^((510|512|588)\d{3}\.SH|159\d{3}\.SZ)$",
}

REAL_INDICES = {
    "000001.SH": "上证指数",
    "000300.SH": "沪深300",
    "000016.SH": "上证50",
    "000905.SH": "中证500",
    "399001.SZ": "深证成指",
    "399006.SZ": "创业板指",
    "899050.BJ": "北证50",
}

LIMIT_PCT = {"main": 10, "st": 5, "star": 20, "chinext": 20, "bj": 30, "etf": 10}


def make_market(seed: int = 7, securities: int = 5200, day: date = DAY,
                interval: float = 3.0) -> SimulatedMarket:
    return SimulatedMarket(seed=seed, securities=securities, trading_date=day,
                           push_interval=interval)


def run_pushes(market: SimulatedMarket, start_ms: int, count: int) -> List[Tuple[int, Batch]]:
    """Step the market through ``count`` consecutive push instants after ``start_ms``."""
    out: List[Tuple[int, Batch]] = []
    at = start_ms
    for _ in range(count):
        at = market.next_push_time(at)
        out.append((at, market.step(at)))
    return out


def limits(tick: Dict[str, Any], board: str) -> Tuple[float, float]:
    """Limit-down and limit-up from the previous close, by exchange rounding."""
    div = 1000 if board == "etf" else 100
    prev = round(tick["lastClose"] * div)
    pct = LIMIT_PCT[board]
    return (prev * (100 - pct) + 50) // 100 / div, (prev * (100 + pct) + 50) // 100 / div


def check_book(symbol: str, tick: Dict[str, Any], board: str) -> None:
    bids, asks = tick["bidPrice"], tick["askPrice"]
    bid_vol, ask_vol = tick["bidVol"], tick["askVol"]
    assert 5 == len(bids) == len(asks) == len(bid_vol) == len(ask_vol), symbol
    if board == "index":
        assert [0.0] * 5 == bids == asks, symbol
        assert [0] * 5 == bid_vol == ask_vol, symbol
        return
    for prices, sizes in ((bids, bid_vol), (asks, ask_vol)):
        filled = [p for p in prices if p]
        assert prices[: len(filled)] == filled, f"{symbol}: zeros only at the tail"
        assert all(s > 0 for s in sizes[: len(filled)]), symbol
        assert all(s == 0 for s in sizes[len(filled):]), symbol
        assert all(isinstance(s, int) for s in sizes), symbol
    nz_bids = [p for p in bids if p]
    nz_asks = [p for p in asks if p]
    assert nz_bids == sorted(nz_bids, reverse=True) and len(set(nz_bids)) == len(nz_bids)
    assert nz_asks == sorted(nz_asks) and len(set(nz_asks)) == len(nz_asks)
    if tick["stockStatus"] == 0 and not nz_bids and not nz_asks:
        return   # before the auction the book is empty
    if nz_bids:
        assert nz_bids[0] <= tick["lastPrice"] + 1e-9, symbol
    if nz_asks:
        assert nz_asks[0] > tick["lastPrice"], symbol
    if nz_bids and nz_asks:
        assert max(nz_bids) < min(nz_asks), symbol
    down, up = limits(tick, board)
    assert all(down - 1e-9 <= p <= up + 1e-9 for p in nz_bids + nz_asks), symbol
    if tick["lastPrice"] >= up - 1e-9:
        assert [] == nz_asks, f"{symbol}: no asks at limit-up"


def test_universe_is_large_and_well_formed() -> None:
    """The default universe has >= 5000 symbols, valid codes per board and all markets."""
    market = make_market()
    symbols = market.symbols
    assert 5200 == len(symbols) == len(set(symbols)) == len(market.names)
    assert {"SH", "SZ", "BJ"} == {s[-2:] for s in symbols}
    boards = market.boards
    for symbol, board in boards.items():
        if board == "index":
            continue
        assert re.match(BOARD_PATTERNS[board], symbol), (symbol, board)
    counts = {b: sum(1 for v in boards.values() if v == b) for b in set(boards.values())}
    assert {"main", "st", "star", "chinext", "bj", "etf", "index"} == set(counts)
    assert counts["main"] + counts["st"] > counts["chinext"] > counts["star"] > counts["bj"]
    for symbol, name in REAL_INDICES.items():
        assert name == market.names[symbol]
        assert "index" == boards[symbol]


def test_small_and_huge_universes() -> None:
    """The 10 and 20,000 symbol extremes keep 上证指数, every board and unique symbols."""
    for size in (10, 20000):
        market = make_market(securities=size)
        assert size == len(set(market.symbols)) == len(set(market.names.values()))
        assert "上证指数" == market.names["000001.SH"]
        assert {"main", "star", "chinext", "bj", "etf", "index"} <= set(market.boards.values())
        for symbol, board in market.boards.items():
            if board != "index":
                assert re.match(BOARD_PATTERNS[board], symbol), (symbol, board)


def test_names_look_chinese_with_st_and_etf() -> None:
    """Names are CJK, unique, ST names carry the prefix and ETF names end in ETF."""
    market = make_market()
    names = market.names
    assert len(set(names.values())) == len(names)
    for symbol, name in names.items():
        board = market.boards[symbol]
        if board == "etf":
            assert name.endswith("ETF"), name
        elif board == "st":
            assert re.match(r"^\*?ST[\u4e00-\u9fff]{4}$", name), name
        elif board != "index":
            assert re.match(r"^[\u4e00-\u9fff]{4}$", name), name


def test_same_seed_same_market_and_batches() -> None:
    """Two markets with one seed give identical names and identical batches."""
    a, b = make_market(seed=42, securities=600), make_market(seed=42, securities=600)
    start = china_ms(DAY, 9, 30)
    assert dict(a.names) == dict(b.names)
    assert a.snapshot(start) == b.snapshot(start)
    assert run_pushes(a, start, 30) == run_pushes(b, start, 30)


def test_different_seed_different_market() -> None:
    """Another seed gives another universe and other prices."""
    a, b = make_market(seed=1, securities=600), make_market(seed=2, securities=600)
    start = china_ms(DAY, 9, 30)
    assert dict(a.names) != dict(b.names)
    assert a.snapshot(start)["000001.SH"] != b.snapshot(start)["000001.SH"]


def test_every_tick_has_the_qmt_keys_and_types() -> None:
    """Every tick carries exactly the real sample's keys with QMT's value types."""
    market = make_market()
    start = china_ms(DAY, 9, 30)
    batches = [market.snapshot(start)] + [b for _, b in run_pushes(market, start, 3)]
    for batch in batches:
        for symbol, tick in batch.items():
            assert SAMPLE_KEYS == set(tick), symbol
            assert isinstance(tick["time"], int)
            assert isinstance(tick["volume"], int) and isinstance(tick["pvolume"], int)
            assert isinstance(tick["amount"], float) and isinstance(tick["lastPrice"], float)
            assert tick["low"] <= tick["open"] <= tick["high"], symbol
            assert tick["low"] <= tick["lastPrice"] <= tick["high"], symbol


def test_time_is_simulated_china_time() -> None:
    """The tick time is the simulated China-time instant, whatever the host zone."""
    market = make_market(securities=100)
    at = china_ms(DAY, 10, 0, 3)
    tick = market.snapshot(at)["000001.SH"]
    moment = datetime.fromtimestamp(tick["time"] / 1000, CHINA)
    assert datetime(2024, 12, 2, 10, 0, 3, tzinfo=CHINA) == moment


def test_book_is_consistent_over_a_session() -> None:
    """Books stay ordered, inside the limits and zero-padded only at the tail."""
    market = make_market(securities=1500)
    start = china_ms(DAY, 9, 15)
    batches = [market.snapshot(start)] + [b for _, b in run_pushes(market, start, 150)]
    for batch in batches:
        for symbol, tick in batch.items():
            check_book(symbol, tick, market.boards[symbol])


def test_prices_stay_within_daily_limits() -> None:
    """Over a whole day every price stays within its board's limit and on the tick grid."""
    market = make_market(securities=1000, interval=60.0)
    start = china_ms(DAY, 9, 15)
    hits = 0
    for _, batch in run_pushes(market, start, 260):
        for symbol, tick in batch.items():
            board = market.boards[symbol]
            if board == "index":
                continue
            down, up = limits(tick, board)
            div = 1000 if board == "etf" else 100
            for key in ("lastPrice", "open", "high", "low"):
                price = tick[key]
                if price:
                    assert down - 1e-9 <= price <= up + 1e-9, (symbol, key, price)
                    assert abs(price * div - round(price * div)) < 1e-6, (symbol, price)
            hits += tick["lastPrice"] >= up - 1e-9
    assert hits > 0, "some securities reach limit-up during a day"


def test_cumulative_fields_are_monotonic() -> None:
    """Volume, amount and trade count never decrease; amount matches volume x price."""
    market = make_market(securities=800)
    start = china_ms(DAY, 9, 30)
    state = {s: t for s, t in market.snapshot(start).items()}
    for _, batch in run_pushes(market, start, 200):
        for symbol, tick in batch.items():
            before = state[symbol]
            for key in ("volume", "pvolume", "amount", "transactionNum"):
                assert tick[key] >= before[key], (symbol, key)
            state[symbol] = tick
    for symbol, tick in state.items():
        assert tick["pvolume"] > 0
        assert (tick["pvolume"] + 50) // 100 == tick["volume"]
        if market.boards[symbol] != "index":
            average = tick["amount"] / tick["pvolume"]
            assert tick["low"] - 1e-6 <= average <= tick["high"] + 1e-6, symbol


def test_first_batch_full_then_partial_pushes() -> None:
    """A snapshot holds every symbol; later pushes carry a non-empty strict subset."""
    market = make_market()
    start = china_ms(DAY, 9, 30)
    assert 5200 == len(market.snapshot(start))
    for at, batch in run_pushes(market, start, 40):
        assert 0 < len(batch) < 5200, at
        assert 0.15 < len(batch) / 5200 < 0.7
        assert all(tick["time"] == at for tick in batch.values())


def test_auction_ticks() -> None:
    """09:15-09:25 ticks have status 2, an indicative price and zero open/volume."""
    market = make_market(securities=300)
    start = china_ms(DAY, 9, 14, 57)
    pushes = run_pushes(market, start, 5)
    assert china_ms(DAY, 9, 15) == pushes[0][0]
    assert 300 == len(pushes[0][1])    # every status changes at 09:15
    for _, batch in pushes:
        for symbol, tick in batch.items():
            assert 2 == tick["stockStatus"], symbol
            assert 0.0 == tick["open"] == tick["high"] == tick["low"] == tick["amount"]
            assert 0 == tick["volume"] == tick["pvolume"]
            assert tick["lastPrice"] > 0


def test_match_at_0925_then_silence_until_0930() -> None:
    """09:25:00 pushes the whole market matched; nothing is pushed until 09:30."""
    market = make_market(securities=300)
    assert china_ms(DAY, 9, 25) == market.next_push_time(china_ms(DAY, 9, 24, 58))
    market.step(china_ms(DAY, 9, 24, 58))
    matched = market.step(china_ms(DAY, 9, 25))
    assert 300 == len(matched)
    for tick in matched.values():
        assert 3 == tick["stockStatus"]
        assert tick["open"] == tick["lastPrice"] == tick["high"] == tick["low"] > 0
        assert tick["volume"] > 0
    assert china_ms(DAY, 9, 30) == market.next_push_time(china_ms(DAY, 9, 25))
    assert {} == market.step(china_ms(DAY, 9, 27))


def test_no_pushes_during_lunch() -> None:
    """The push after 11:30:00 is 13:00:00 and a step inside the break returns nothing."""
    market = make_market(securities=300)
    assert china_ms(DAY, 11, 30) == market.next_push_time(china_ms(DAY, 11, 29, 59))
    assert china_ms(DAY, 13, 0) == market.next_push_time(china_ms(DAY, 11, 30))
    market.step(china_ms(DAY, 11, 29, 59))
    assert {} == market.step(china_ms(DAY, 12, 0))
    afternoon = run_pushes(market, china_ms(DAY, 13, 0), 3)
    assert all(batch for _, batch in afternoon)


def test_close_and_rollover_to_next_weekday() -> None:
    """After Friday's close the market rolls to Monday 09:15 with closes carried over."""
    market = make_market(securities=300, day=FRIDAY)
    closing = market.step(china_ms(FRIDAY, 15, 0))
    assert all(3 == t["stockStatus"] for t in closing.values())
    final = market.snapshot(china_ms(FRIDAY, 15, 0, 3))
    assert all(0 == t["stockStatus"] for t in final.values())
    monday_0915 = china_ms(MONDAY, 9, 15)
    assert monday_0915 == market.next_push_time(china_ms(FRIDAY, 15, 5))
    assert {} == market.step(china_ms(FRIDAY, 16, 0))
    assert MONDAY == market.trading_date
    opening = market.step(monday_0915)
    assert set(final) == set(opening)
    for symbol, tick in opening.items():
        assert final[symbol]["lastPrice"] == tick["lastClose"], symbol
        assert 0 == tick["volume"] and 0.0 == tick["amount"]
    assert datetime(2024, 12, 9, 9, 15, tzinfo=CHINA) == datetime.fromtimestamp(
        next(iter(opening.values()))["time"] / 1000, CHINA)


def test_trailing_pushes_resend_final_ticks_once() -> None:
    """Between 15:00 and 15:05 each security is resent once, closed and unchanged."""
    market = make_market(securities=300)
    market.step(china_ms(DAY, 15, 0))
    seen: Dict[str, Dict[str, Any]] = {}
    for _, batch in run_pushes(market, china_ms(DAY, 15, 0), 100):
        for symbol, tick in batch.items():
            assert symbol not in seen
            assert 0 == tick["stockStatus"]
            seen[symbol] = tick
    assert 300 == len(seen)


def test_weekend_has_no_pushes() -> None:
    """A Saturday step is silent and the next push is Monday's auction."""
    market = make_market(securities=300, day=FRIDAY)
    saturday_noon = china_ms(date(2024, 12, 7), 12, 0)
    assert china_ms(MONDAY, 9, 15) == market.next_push_time(saturday_noon)
    assert {} == market.step(saturday_noon)


def test_bad_settings_raise_config_error() -> None:
    """Out-of-range settings and a malformed date raise ConfigError naming the key."""
    bad = {
        "date": SimulatorConfig(date="2024/12/02"),
        "securities": SimulatorConfig(securities=9),
        "speed": SimulatorConfig(speed=0.0),
        "push_interval": SimulatorConfig(push_interval=-1.0),
    }
    for key, config in bad.items():
        with pytest.raises(ConfigError) as info:
            SimulatorSource(config)
        assert f"source.simulator.{key}" == info.value.key


def collect(source: SimulatorSource, count: int) -> List[Batch]:
    """Start the source, take ``count`` batches, close it and drain the iterator."""

    async def main() -> List[Batch]:
        await source.start()
        assert source.connected
        out: List[Batch] = []
        iterator = source.batches()
        async for batch in iterator:
            out.append(batch)
            if len(out) == count:
                await source.close()
        assert not source.connected
        return out

    return asyncio.run(main())


def test_source_yields_snapshot_then_partial_pushes_until_closed() -> None:
    """The source yields the whole market, then partial pushes, and ends after close()."""
    config = Config(source=SourceConfig(simulator=SimulatorConfig(
        seed=3, securities=500, speed=600.0, push_interval=3.0, date="2024-12-02")))
    source = create_source(config)
    assert isinstance(source, SimulatorSource)
    assert "simulator" == source.kind
    assert "上证指数" == source.names["000001.SH"]
    batches = collect(source, 6)
    assert 6 == len(batches)
    assert 500 == len(batches[0])
    first_time = datetime.fromtimestamp(batches[0]["000001.SH"]["time"] / 1000, CHINA)
    assert datetime(2024, 12, 2, 9, 30, tzinfo=CHINA) == first_time
    assert all(3 == t["stockStatus"] and t["open"] > 0 for t in batches[0].values())
    for batch in batches[1:]:
        assert 0 < len(batch) < 500
        moment = datetime.fromtimestamp(next(iter(batch.values()))["time"] / 1000, CHINA)
        assert DAY == moment.date() and moment.hour in (9, 10)


def test_source_auction_start_and_close_is_idempotent() -> None:
    """start="auction" begins at 09:15 with status 2 and close() can be called twice."""
    source = SimulatorSource(SimulatorConfig(
        seed=5, securities=200, speed=600.0, start="auction", date="2024-12-07"))
    batches = collect(source, 2)
    first = batches[0]["000001.SH"]
    assert datetime(2024, 12, 6, 9, 15, tzinfo=CHINA) == datetime.fromtimestamp(
        first["time"] / 1000, CHINA)   # a Saturday date falls back to Friday
    assert all(2 == t["stockStatus"] for t in batches[0].values())
    asyncio.run(source.close())
    assert not source.connected


def test_source_clock_mode_follows_the_injected_clock() -> None:
    """start="clock" stamps the first batch with the injected China time."""
    now = datetime(2024, 12, 3, 10, 30, 0, tzinfo=CHINA).timestamp()
    source = SimulatorSource(SimulatorConfig(securities=200, start="clock"), clock=lambda: now)

    async def main() -> Batch:
        await source.start()
        try:
            async for batch in source.batches():
                return batch
        finally:
            await source.close()
        raise AssertionError("no batch")

    first = asyncio.run(main())
    assert 200 == len(first)
    tick = first["000001.SH"]
    assert int(now * 1000) == tick["time"]
    assert 3 == tick["stockStatus"] and tick["volume"] > 0


def test_source_skip_breaks_jumps_over_lunch() -> None:
    """With skip_breaks a source caught in the lunch break pushes 13:00 at once."""
    wall = [datetime(2030, 1, 1, tzinfo=CHINA).timestamp()]
    source = SimulatorSource(SimulatorConfig(
        securities=100, speed=1.0, push_interval=0.01, date="2024-12-02", skip_breaks=True),
        clock=lambda: wall[0])

    async def main() -> List[int]:
        await source.start()                 # simulated 09:30:00
        wall[0] += 2.5 * 3600                # the wall clock now maps to 12:00: lunch
        times: List[int] = []
        async for batch in source.batches():
            times.append(next(iter(batch.values()))["time"])
            if len(times) == 4:
                await source.close()
        return times

    # Without skipping, the 13:00 push would be an hour of wall time away at speed 1.
    times = asyncio.run(main())
    assert [china_ms(DAY, 9, 30), china_ms(DAY, 13, 0), china_ms(DAY, 13, 0) + 10,
            china_ms(DAY, 13, 0) + 20] == times


def test_source_is_deterministic_for_a_clock_sequence() -> None:
    """Two sources with one seed and the same clock readings yield identical batches."""

    def run() -> List[Batch]:
        ticks = iter(range(10**6))
        base = datetime(2030, 1, 1, tzinfo=CHINA).timestamp()
        source = SimulatorSource(
            SimulatorConfig(seed=11, securities=300, speed=600.0, date="2024-12-02"),
            clock=lambda: base + 0.01 * next(ticks))   # each reading 6 simulated s later
        return collect(source, 8)

    first, second = run(), run()
    assert 8 == len(first)
    assert first == second
