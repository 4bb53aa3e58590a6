"""Tick dict -> SpotRecord: units, China time, rounding, and every bad-tick case."""

from __future__ import annotations

import copy
import math
import os
import subprocess
import sys
import textwrap
from datetime import date
from typing import Any, Callable, Dict, List, Tuple
from unittest import mock

import pytest
from helpers import REAL_TICK
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay import normalise
from relay.errors import BadTick
from relay.normalise import DROP_REASONS, Normaliser, china_datetime, normalise_tick
from relay.records import SpotRecord

# A real pushed tick for 600000.SH (2024-12-02 13:55:54 China time), float noise included.
RAW: Dict[str, Any] = REAL_TICK


def tick(**changes: Any) -> Dict[str, Any]:
    t = copy.deepcopy(RAW)
    for key, value in changes.items():
        if value is _DELETE:
            del t[key]
        else:
            t[key] = value
    return t


_DELETE = object()


def test_real_tick_in_hikyuu_units() -> None:
    """The real sample becomes the expected record, in hikyuu units and China time."""
    rec = normalise_tick("600000.SH", tick(), name="浦发银行")
    assert ("SH", "600000", "浦发银行") == (rec.market, rec.code, rec.name)
    assert "2024-12-02 13:55:54" == rec.datetime
    assert (11.38, 11.39, 11.4, 11.31, 11.39) == (
        rec.yesterday_close, rec.open, rec.high, rec.low, rec.close)
    assert 86212.78 == rec.amount           # yuan * 0.0001
    assert 758612.84 == rec.volume          # shares * 0.01
    assert (11.39, 11.38, 11.37, 11.36, 11.35) == rec.bid   # float noise rounded away
    assert (313, 5219, 2996, 2420, 1638) == rec.bid_amount
    assert (11.4, 11.41, 11.42, 11.43, 11.44) == rec.ask
    assert (1733118954000, 3, 37062) == (rec.time_ms, rec.status, rec.trade_count)


def test_raw_units() -> None:
    """units=raw keeps yuan and shares."""
    rec = normalise_tick("600000.SH", tick(), units="raw")
    assert (862127800.0, 75861284.0) == (rec.amount, rec.volume)


def test_volume_falls_back_to_lots_without_pvolume() -> None:
    """Without pvolume, volume (already lots) is used as is."""
    rec = normalise_tick("600000.SH", tick(pvolume=_DELETE))
    assert 758613.0 == rec.volume


def test_full_tick_timetag_and_int_prices() -> None:
    """get_full_tick records: timetag instead of time, whole prices as ints."""
    rec = normalise_tick("000001.SZ", tick(time=_DELETE, timetag="20241202 09:30:03",
                                          lastPrice=12, open=12, high=12, low=12))
    assert "2024-12-02 09:30:03" == rec.datetime
    assert 1733103003000 == rec.time_ms
    assert 12 == rec.close


def test_china_time_whatever_the_host_zone() -> None:
    """The datetime string is UTC+8 even when the process runs in another zone."""
    code = textwrap.dedent("""
        import time
        time.tzset()
        from relay.normalise import china_datetime
        print(china_datetime(1733118954))
    """)
    for tz in ("UTC", "America/New_York", "Asia/Tokyo"):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env={**os.environ, "TZ": tz}, check=True).stdout.strip()
        assert "2024-12-02 13:55:54" == out, tz


def test_china_datetime_midnight_boundary() -> None:
    """16:00 UTC is already the next day in China."""
    assert "2024-12-03 00:00:00" == china_datetime(1733155200)


def test_empty_book_is_accepted() -> None:
    """Indices carry no book: empty arrays pass."""
    rec = normalise_tick("000300.SH", tick(askPrice=[], bidPrice=[], askVol=[], bidVol=[]))
    assert () == rec.bid == rec.ask


BAD_TICKS = [
    ("not a dict", "600000.SH", lambda: [1, 2, 3], "not_a_dict"),
    ("None tick", "600000.SH", lambda: None, "not_a_dict"),
    ("bad suffix", "600000.SS", tick, "bad_code"),
    ("short code", "60000.SH", tick, "bad_code"),
    ("lowercase market", "600000.sh", tick, "bad_code"),
    ("no market", "600000", tick, "bad_code"),
    ("missing lastPrice", "600000.SH", lambda: tick(lastPrice=_DELETE), "missing_field"),
    ("missing askVol", "600000.SH", lambda: tick(askVol=_DELETE), "missing_field"),
    ("missing time and timetag", "600000.SH", lambda: tick(time=_DELETE), "missing_field"),
    ("missing both volumes", "600000.SH", lambda: tick(volume=_DELETE, pvolume=_DELETE),
     "missing_field"),
    ("None price", "600000.SH", lambda: tick(lastPrice=None), "bad_type"),
    ("string price", "600000.SH", lambda: tick(high="11.4"), "bad_type"),
    ("list amount", "600000.SH", lambda: tick(amount=[1.0]), "bad_type"),
    ("NaN price", "600000.SH", lambda: tick(lastPrice=math.nan), "not_finite"),
    ("inf amount", "600000.SH", lambda: tick(amount=math.inf), "not_finite"),
    ("-inf low", "600000.SH", lambda: tick(low=-math.inf), "not_finite"),
    ("negative volume", "600000.SH", lambda: tick(pvolume=-5), "negative"),
    ("negative price", "600000.SH", lambda: tick(open=-1.0), "negative"),
    ("book too short", "600000.SH", lambda: tick(bidPrice=[11.39, 11.38]), "bad_book"),
    ("book too long", "600000.SH", lambda: tick(askVol=[1] * 10), "bad_book"),
    ("book lengths differ", "600000.SH",
     lambda: tick(askPrice=[], askVol=[], bidPrice=[11.3] * 5), "bad_book"),
    ("book not a list", "600000.SH", lambda: tick(bidPrice=None), "bad_book"),
    ("book has None", "600000.SH", lambda: tick(bidVol=[1, None, 3, 4, 5]), "bad_book"),
    ("book has NaN", "600000.SH", lambda: tick(askPrice=[math.nan] * 5), "bad_book"),
    ("book negative", "600000.SH", lambda: tick(askVol=[1, -2, 3, 4, 5]), "bad_book"),
    ("time zero seed", "600000.SH", lambda: tick(time=0), "seed_record"),
    ("time as string", "600000.SH", lambda: tick(time="1733118954000"), "bad_time"),
    ("time in seconds", "600000.SH", lambda: tick(time=1733118954), "bad_time"),
    ("time NaN", "600000.SH", lambda: tick(time=math.nan), "bad_time"),
    ("bad timetag", "600000.SH", lambda: tick(time=_DELETE, timetag="yesterday"), "bad_time"),
]


@pytest.mark.parametrize(("symbol", "make", "reason"),
                         [case[1:] for case in BAD_TICKS], ids=[c[0] for c in BAD_TICKS])
def test_bad_tick_is_rejected_with_reason(
    symbol: str, make: Callable[[], Any], reason: str
) -> None:
    """Each malformed tick raises BadTick with its documented reason."""
    with pytest.raises(BadTick) as info:
        normalise_tick(symbol, make())
    assert reason == info.value.reason
    assert reason in DROP_REASONS


def test_batch_drops_bad_ticks_and_keeps_the_rest() -> None:
    """A batch with one of every bad tick still publishes its good ticks, drops counted."""
    batch: Dict[str, Any] = {"600000.SH": tick(), "000001.SZ": tick(time=1733118957000)}
    expected: Dict[str, int] = {}
    for i, (_, symbol, make, reason) in enumerate(BAD_TICKS):
        key = symbol if symbol != "600000.SH" else f"{600100 + i}.SH"
        batch[key] = make()
        expected[reason] = expected.get(reason, 0) + 1
    result = Normaliser({"600000.SH": "浦发银行"}).normalise_batch(batch)
    assert ["600000.SH", "000001.SZ"] == [r.symbol for r in result.records]
    assert "浦发银行" == result.records[0].name
    assert expected == result.dropped


def test_decreasing_volume_is_dropped_within_a_day() -> None:
    """Cumulative volume may not go backwards on the same day; a new day resets it."""
    norm = Normaliser()
    assert 1 == len(norm.normalise_batch({"600000.SH": tick()}).records)
    back = norm.normalise_batch({"600000.SH": tick(pvolume=75000000, time=1733118957000)})
    assert {"volume_decreased": 1} == back.dropped
    next_day = norm.normalise_batch({"600000.SH": tick(pvolume=100, time=1733205354000)})
    assert 1 == len(next_day.records)


def test_auction_ticks_pass_unless_configured() -> None:
    """Call-auction ticks (status 2) pass with their status, or are dropped when asked."""
    auction = tick(stockStatus=2, open=0, high=0, low=0, pvolume=0, volume=0, amount=0)
    passed = Normaliser().normalise_batch({"600000.SH": auction})
    assert 2 == passed.records[0].status
    dropped = Normaliser(drop_auction=True).normalise_batch({"600000.SH": auction})
    assert ([], {"auction": 1}) == (dropped.records, dropped.dropped)


def test_status_and_trade_count_absent_become_none() -> None:
    """Missing optional QMT fields are reported as absent, not zero."""
    rec = normalise_tick("600000.SH", tick(stockStatus=_DELETE, transactionNum=_DELETE))
    assert (None, None) == (rec.status, rec.trade_count)


@pytest.mark.parametrize(("status", "trades", "expected"), [
    (2**31 - 1, 2**63 - 1, (2**31 - 1, 2**63 - 1)),
    (-(2**31), -(2**63), (-(2**31), -(2**63))),
    (2**31, 2**63, (None, None)),
    (-(2**31) - 1, 2**70, (None, None)),
    (True, 1.0, (None, None)),
])
def test_status_and_trade_count_outside_the_schema_become_none(
        status: Any, trades: Any, expected: Any) -> None:
    """A status that is no int32 or a trade count that is no int64 cannot go on the wire:
    reported absent, and the tick itself still passes and encodes, on both paths."""
    from relay.encode import SpotEncoder

    batch = {"600000.SH": tick(stockStatus=status, transactionNum=trades),
             "000001.SZ": tick()}
    result = Normaliser().normalise_batch(batch)
    assert expected == (result.records[0].status, result.records[0].trade_count)
    assert expected == _per_tick_status(batch)
    messages = SpotEncoder("r", "s").encode(result.columns or result.records, first_seq=1,
                                            publish_time_ms=0)
    from relay.client import decode_spot_list

    assert result.records == decode_spot_list(messages[0], 6).records


def _per_tick_status(batch: Dict[str, Any]) -> Any:
    rec = Normaliser()._per_tick(batch).records[0]
    return (rec.status, rec.trade_count)


def _simulated_batches() -> List[Dict[str, Any]]:
    from relay.sources.simulator import SimulatedMarket, china_ms

    day = date(2024, 12, 2)
    market = SimulatedMarket(seed=3, securities=400, trading_date=day)
    t = china_ms(day, 9, 30)
    batches = [market.snapshot(t)]
    for _ in range(5):
        t = market.next_push_time(t)
        batches.append(market.step(t))
    return batches


def _typed(records: List[SpotRecord]) -> List[Tuple[Any, ...]]:
    """Records with the type of every value, books included: equal means equal and alike."""
    return [(r, tuple(map(type, r)), tuple(type(x) for book in r[11:15] for x in book))
            for r in records]


@pytest.mark.parametrize("chunk", [1000, 64])
def test_columnar_path_matches_per_tick_path_on_a_simulated_market(
        chunk: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fast columnar path gives exactly the per-tick path's records, push after push,
    whether a batch is read in one chunk or in several."""
    monkeypatch.setattr(normalise, "_CHUNK", chunk)
    batches = _simulated_batches()
    fast, slow = Normaliser(), Normaliser()
    for batch in batches:
        got = fast.normalise_batch(batch)
        assert got._columns is not None  # the fast path was taken
        expected = slow._per_tick(batch)
        assert _typed(expected.records) == _typed(got.records)
        assert {} == got.dropped == expected.dropped


scalars = st.one_of(
    st.floats(min_value=0, max_value=1e6), st.integers(0, 10**9),
    st.sampled_from([None, math.nan, math.inf, -1.0, True, "1.0"]),
)
books = st.one_of(
    st.lists(st.floats(min_value=0, max_value=1e4), min_size=5, max_size=5),
    st.lists(st.integers(0, 10**6), min_size=5, max_size=5),
    st.just([]), st.lists(st.floats(allow_nan=True), max_size=6),
)


@st.composite
def hostile_ticks(draw: Any) -> Dict[str, Any]:
    t = tick(time=draw(st.integers(1733118954000, 1733118999999)),
             pvolume=draw(st.integers(0, 10**9)), lastPrice=draw(st.floats(1, 100)))
    rare = st.integers(0, 12).map(lambda x: x == 0)
    for key in ("lastClose", "open", "high", "low", "lastPrice", "amount", "pvolume"):
        if draw(rare):
            t[key] = draw(scalars)
    for key in ("bidPrice", "bidVol", "askPrice", "askVol"):
        if draw(rare):
            t[key] = draw(books)
    if draw(rare):
        t["time"] = draw(st.sampled_from([0, 1733118954000, 1733118955123, 1.5, None]))
    if draw(rare):
        t["stockStatus"] = draw(st.sampled_from([2, 3, None, 3.0, 2**31, -(2**31) - 1]))
    if draw(rare):
        t["transactionNum"] = draw(st.sampled_from([0, None, 2**63 - 1, 2**63, -(2**70)]))
    if draw(st.integers(0, 9)) == 0:
        del t[draw(st.sampled_from(sorted(t)))]
    return t


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(hostile_ticks(), min_size=1, max_size=8),
       st.lists(st.sampled_from(["SH", "SZ", "BJ", "SH", "SZ", "bad"]), min_size=8, max_size=8),
       st.sampled_from([1000, 3, 1]))
def test_batch_result_never_depends_on_the_path(ticks: List[Dict[str, Any]],
                                               codes: List[str], chunk: int) -> None:
    """Whatever the ticks and however the fast path chunks them, normalise_batch equals the
    per-tick path: records and drops."""
    batch = {f"{600100 + i}.{codes[i]}" if codes[i] != "bad" else f"{i}.XX": t
             for i, t in enumerate(ticks)}
    with mock.patch.object(normalise, "_CHUNK", chunk):
        got = Normaliser().normalise_batch(batch)
    expected = Normaliser()._per_tick(batch)
    assert _typed(expected.records) == _typed(got.records)
    assert expected.dropped == got.dropped


def test_set_names_reaches_the_fast_path() -> None:
    """Names come from the current table, also for symbols already seen."""
    norm = Normaliser({"600000.SH": "浦发银行"})
    first = norm.normalise_batch({"600000.SH": tick(), "000001.SZ": tick()})
    assert first._columns is not None
    assert ["浦发银行", ""] == [r.name for r in first.records]
    norm.set_names({"600000.SH": "浦发", "000001.SZ": "平安银行"})
    second = norm.normalise_batch({"600000.SH": tick(), "000001.SZ": tick()})
    assert ["浦发", "平安银行"] == [r.name for r in second.records]


def test_symbol_memory_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stream of ever-new symbols cannot grow the per-symbol table without limit."""
    monkeypatch.setattr(normalise, "_UNIVERSE_LIMIT", 8)
    norm = Normaliser()
    for start in range(0, 40, 4):
        batch = {f"{600000 + i}.SH": tick() for i in range(start, start + 4)}
        assert 4 == len(norm.normalise_batch(batch).records)
        assert len(norm._universe) <= 8 + 4
    # after a reset the volume check starts afresh and still works
    assert 1 == len(norm.normalise_batch({"600036.SH": tick()}).records)
    back = norm.normalise_batch({"600036.SH": tick(pvolume=100, time=1733118957000)})
    assert {"volume_decreased": 1} == back.dropped


@pytest.mark.parametrize("units", ["hikyuu", "raw"])
@pytest.mark.parametrize("empty_books", [False, True])
def test_fast_path_units_and_empty_books(units: str, empty_books: bool) -> None:
    """Both unit systems, and batches whose books are all empty (as for indices)."""
    keys = ("bidPrice", "bidVol", "askPrice", "askVol")
    books: Dict[str, Any] = {key: [] for key in keys} if empty_books else {}
    batch = {f"{600000 + i}.SH": tick(time=1733118954000 + i, **books) for i in range(5)}
    got = Normaliser(units=units).normalise_batch(batch)
    assert got._columns is not None
    expected = Normaliser(units=units)._per_tick(batch)
    assert _typed(expected.records) == _typed(got.records)
    assert (0 if empty_books else 5) == len(got.records[0].bid) == got.columns.levels


@pytest.mark.parametrize("sizes", [
    [2**53 + 1, 2**53 + 3, 2**62 + 2**9 + 1, 7, 1],  # ints a double cannot hold exactly
    [3, True, 5, False, 9],                           # bools are numbers to array("d")
    [100, 200.5, 300, 400, 500],                      # an int first, then a float
    [2**63, 1, 2, 3, 4],                              # outside int64: packed as doubles
    [10**400, 1, 2, 3, 4],                            # too large even for a double
])
def test_int_sizes_are_read_as_the_per_tick_path_reads_them(sizes: List[Any]) -> None:
    """Sizes and volumes that start with an int are packed as int64 and cast by numpy: the
    same doubles as array("d") gives, down to the rounding of ints past 2**53; anything
    int64 cannot hold takes the double route, and the results never differ."""
    batch = {f"{600000 + i}.SH": tick(time=1733118954000 + i, bidVol=list(sizes),
                                      askVol=list(reversed(sizes)), pvolume=sizes[0] + i)
             for i in range(4)}
    got = Normaliser().normalise_batch(batch)
    expected = Normaliser()._per_tick(batch)
    assert _typed(expected.records) == _typed(got.records)
    assert expected.dropped == got.dropped
