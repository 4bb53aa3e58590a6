"""Tests for relay.sources.qmt against the hostile xtdata fake in tests/fakes."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List

import pytest
from structlog.testing import capture_logs

from relay.config import Config, QmtConfig, SourceConfig
from relay.errors import ConfigError, SourceError
from relay.normalise import Normaliser
from relay.sources import Batch, create_source
from relay.sources._calendar import TradingCalendar, parse_window
from relay.sources.qmt import QmtSource

FAKES = Path(__file__).resolve().parent.parent / "fakes"
CHINA = timezone(timedelta(hours=8))
MONDAY = date(2024, 12, 2)


@pytest.fixture
def xt(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """The fake xtdata module, reset, first on sys.path."""
    monkeypatch.syspath_prepend(str(FAKES))
    from xtquant import xtdata

    xtdata._fake.reset(securities=40, push_interval=0.02)
    xtdata.enable_hello = True
    try:
        yield xtdata
    finally:
        xtdata._fake.stop()
        xtdata._fake.reset()


def china_clock(hour: int, minute: int, second: int = 0, day: date = MONDAY
                ) -> Callable[[], float]:
    """A clock that starts at a China wall time and runs at real speed."""
    base = datetime(day.year, day.month, day.day, hour, minute, second, tzinfo=CHINA).timestamp()
    t0 = time.monotonic()
    return lambda: base + (time.monotonic() - t0)


def qmt_config(**changes: Any) -> QmtConfig:
    fast = dict(batch_pause=0.0, check_interval=0.02, reconnect_min=0.01, reconnect_max=0.05,
                stall_timeout=0.3, connect_timeout=5.0)
    fast.update(changes)
    return dataclasses.replace(QmtConfig(), **fast)


def make_source(clock: Callable[[], float] = china_clock(10, 0), **changes: Any) -> QmtSource:
    return QmtSource(qmt_config(**changes), shutdown_timeout=5.0, clock=clock)


async def take(source: QmtSource, until: Callable[[List[Batch]], bool],
               timeout: float = 10.0) -> List[Batch]:
    """Collect batches until ``until(collected)`` holds."""
    got: List[Batch] = []

    async def run() -> None:
        async for batch in source.batches():
            got.append(batch)
            if until(got):
                return

    await asyncio.wait_for(run(), timeout)
    return got


async def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


def events(logs: List[Dict[str, Any]], name: str) -> List[Dict[str, Any]]:
    return [e for e in logs if e["event"] == name]


# -- start, data, names, one thread --------------------------------------------------------


def test_start_subscribes_seeds_names_and_streams(xt: Any) -> None:
    """start() connects quietly, subscribes each market, seeds, fills names; pushes flow."""

    async def main() -> None:
        source = make_source()
        await source.start()
        try:
            assert source.connected
            assert False is xt.enable_hello
            assert dict(xt._fake.market.names) == dict(source.names)
            batches = await take(source, lambda got: len(got) >= 5)
            # The seed follows the subscriptions, so on a busy machine a push can come first.
            seed = next(b for b in batches if all("timetag" in t for t in b.values()))
            assert set(xt._fake.market.names) == set(seed)
            assert all("timetag" in t and "pvolume" not in t for t in seed.values())
            assert any("pvolume" in t for b in batches[1:] for t in b.values())
            subs = xt._fake.calls_named("subscribe_whole_quote")
            assert [["SH"], ["SZ"], ["BJ"]] == [c["first"] for c in subs]
        finally:
            await source.close()
        assert {source.worker_thread} == xt._fake.threads
        assert 0 == xt._fake.violations

    asyncio.run(main())


def test_close_unsubscribes_everything_disconnects_and_is_idempotent(xt: Any) -> None:
    """close() releases every subscription and the connection; batches() ends; twice is fine."""

    async def main() -> None:
        source = make_source()
        await source.start()
        consumer = asyncio.ensure_future(take(source, lambda got: False, timeout=30))
        await wait_for(lambda: source.pushes > 2)
        await source.close()
        await asyncio.wait_for(consumer, 5)
        await source.close()
        assert not source.connected

    with capture_logs() as logs:
        asyncio.run(main())
    subscribed = {c["result"] for c in xt._fake.calls_named("subscribe_whole_quote")}
    released = {c["seq"] for c in xt._fake.calls_named("unsubscribe_quote")}
    assert subscribed == released
    assert [] == xt._fake.active_subscriptions()
    assert 1 == len(xt._fake.calls_named("disconnect"))
    assert 1 == len(events(logs, "qmt_source_closed"))


def test_missing_xtquant_is_a_clear_source_error() -> None:
    """xtquant not importable: SourceError naming the pip extra; nothing keeps running."""
    source = QmtSource(qmt_config(), module="no_such_xtquant.xtdata")

    async def main() -> None:
        with pytest.raises(SourceError, match=r'pip install "qmt-relay\[qmt\]"'):
            await source.start()
        await source.close()

    asyncio.run(main())


def test_create_source_builds_qmt_from_config(xt: Any) -> None:
    """source.kind qmt goes through the registry to QmtSource.from_config."""
    config = Config(source=SourceConfig(kind="qmt", qmt=qmt_config()), shutdown_timeout=2.0)
    source = create_source(config)
    assert isinstance(source, QmtSource) and "qmt" == source.kind


def test_invalid_settings_are_config_errors() -> None:
    """Backoff bounds reversed or nothing to subscribe: ConfigError naming source.qmt."""
    with pytest.raises(ConfigError, match=r"source\.qmt\.reconnect_min"):
        QmtSource(qmt_config(reconnect_min=10.0, reconnect_max=1.0))
    with pytest.raises(ConfigError, match="nothing to subscribe"):
        QmtSource(qmt_config(markets=()))


# -- subscribing -----------------------------------------------------------------------------


def test_subscribe_minus_one_is_retried_and_logged(xt: Any) -> None:
    """Two -1 answers are retried with backoff; the third attempt succeeds."""
    xt._fake.fail_subscribes = 2

    async def main() -> None:
        source = make_source(markets=("SH",))
        await source.start()
        try:
            assert source.connected
        finally:
            await source.close()

    with capture_logs() as logs:
        asyncio.run(main())
    failed = events(logs, "qmt_subscribe_failed")
    assert [1, 2] == [e["attempt"] for e in failed]
    assert {-1} == {e["result"] for e in failed}
    assert 3 == events(logs, "qmt_subscribed")[0]["attempt"]


def test_subscribe_giving_up_reconnects_and_starts_over(xt: Any) -> None:
    """A batch failing past its retries makes the source reconnect and resubscribe."""
    xt._fake.fail_subscribes = 3

    async def main() -> None:
        source = make_source(markets=("SH", "SZ"), subscribe_retries=1)
        await source.start()
        await wait_for(lambda: source.connected)
        await source.close()

    with capture_logs() as logs:
        asyncio.run(main())
    assert 1 == len(events(logs, "qmt_subscribe_gave_up"))
    assert 1 <= len(events(logs, "qmt_connect_failed"))
    assert 1 == len(events(logs, "qmt_connected"))


def test_codes_sectors_in_batches_and_indices_on_their_own(xt: Any) -> None:
    """Sector members and codes go in batch_size chunks; indices get their own subscription."""
    xt._fake.markets_without_indices = True
    indices = sorted(s for s, b in xt._fake.market.boards.items() if b == "index")

    async def main() -> None:
        source = make_source(markets=(), sectors=("沪深A股",), codes=("600000.SH",),
                             indices=tuple(indices), batch_size=7)
        await source.start()
        try:
            seeds = []

            def until(got: List[Batch]) -> bool:
                seeds[:] = [b for b in got if all("timetag" in t for t in b.values())]
                return bool(seeds) and any(set(indices) & set(b) for b in got if b is not seeds[0])

            await take(source, until)
            assert set(indices) <= set(seeds[0])
        finally:
            await source.close()

    asyncio.run(main())
    subs = xt._fake.calls_named("subscribe_whole_quote")
    assert all(c["codes"] <= 7 for c in subs)
    assert [[indices[0]], [indices[7]]] == [c["first"] for c in subs[-2:]]
    members = xt.get_stock_list_in_sector("沪深A股")
    assert len(subs) == -(-len(members) // 7) + -(-len(indices) // 7)


# -- outages, restarts, stalls ---------------------------------------------------------------


def test_absent_miniqmt_start_returns_down_then_connects_in_background(xt: Any) -> None:
    """MiniQMT away: start() returns with connected False; it connects once MiniQMT is up."""
    xt._fake.drop()

    async def main() -> None:
        source = make_source()
        with capture_logs() as logs:
            await source.start()
            assert not source.connected
            await wait_for(lambda: len(events(logs, "qmt_connect_failed")) >= 3)
            xt._fake.restore()
            await wait_for(lambda: source.connected)
        try:
            got = await take(source, lambda got: len(got) >= 3)
            assert len(got[0]) == len(xt._fake.market.names)
        finally:
            await source.close()
        delays = [e["retry_in_s"] for e in events(logs, "qmt_connect_failed")]
        assert all(0 < d <= 0.05 for d in delays)

    asyncio.run(main())


def test_miniqmt_restart_new_client_is_resubscribed_and_reseeded(xt: Any) -> None:
    """A restart leaves a new client with no subscriptions: the source notices and redoes all."""

    async def main() -> None:
        source = make_source(markets=("SH", "SZ"))
        await source.start()
        try:
            await take(source, lambda got: len(got) >= 3)
            xt._fake.restart()
            got = await take(source, lambda got: len(got) >= 3
                             and 2 == len(xt._fake.active_subscriptions()))
            assert any("timetag" in next(iter(b.values())) for b in got)   # re-seeded
            assert 1 == source.reconnects
        finally:
            await source.close()
        assert [] == xt._fake.active_subscriptions()

    with capture_logs() as logs:
        asyncio.run(main())
    assert ["client_changed"] == [e["reason"] for e in events(logs, "qmt_feed_lost")]
    assert 2 == len(events(logs, "qmt_connected"))


def test_connection_drop_reports_down_then_recovers(xt: Any) -> None:
    """An outage (calls raise) turns connected False; after restore data flows again."""

    async def main() -> None:
        source = make_source()
        await source.start()
        try:
            await take(source, lambda got: len(got) >= 2)
            xt._fake.drop()
            await wait_for(lambda: not source.connected)
            xt._fake.restore()
            await wait_for(lambda: source.connected)
            before = source.pushes
            await take(source, lambda got: source.pushes > before + 2)
        finally:
            await source.close()

    with capture_logs() as logs:
        asyncio.run(main())
    assert ["connection_lost"] == [e["reason"] for e in events(logs, "qmt_feed_lost")]


def test_silent_stall_in_session_reconnects_and_resubscribes(xt: Any) -> None:
    """No pushes for stall_timeout at 10:00 on a trading day: reconnect() and resubscribe."""

    async def main() -> None:
        source = make_source(markets=("SH",))
        await source.start()
        try:
            await take(source, lambda got: len(got) >= 2)
            old = xt._fake.active_subscriptions()
            xt._fake.stall()
            await wait_for(lambda: source.reconnects == 1 and source.connected)
            before = source.pushes
            await take(source, lambda got: source.pushes > before + 2)
            assert old[0] in {c["seq"] for c in xt._fake.calls_named("unsubscribe_quote")}
            assert old != xt._fake.active_subscriptions()
        finally:
            await source.close()

    with capture_logs() as logs:
        asyncio.run(main())
    assert ["stall"] == [e["reason"] for e in events(logs, "qmt_feed_lost")]


@pytest.mark.parametrize("when", [(12, 0, MONDAY), (10, 0, date(2024, 12, 7)),
                                  (10, 0, date(2025, 1, 1))],
                         ids=["lunch", "saturday", "holiday-from-xtdata"])
def test_silence_outside_watch_windows_is_not_a_stall(xt: Any, when: Any) -> None:
    """Silence at lunch, at weekends and on xtdata's holidays never triggers a reconnect."""
    hour, minute, day = when

    async def main() -> None:
        source = make_source(clock=china_clock(hour, minute, day=day), markets=("SH",),
                             stall_timeout=0.05)
        await source.start()
        try:
            xt._fake.stall()
            await asyncio.sleep(0.4)
            assert 0 == source.reconnects and source.connected
        finally:
            await source.close()

    asyncio.run(main())


def test_scheduled_seed_at_0930(xt: Any) -> None:
    """Crossing a seed time on a trading day re-reads every security with get_full_tick."""

    async def main() -> None:
        source = make_source(clock=china_clock(9, 29, 59), markets=("SZ",))
        await source.start()
        try:
            await wait_for(lambda: 2 == len(xt._fake.calls_named("get_full_tick")))
        finally:
            await source.close()

    with capture_logs() as logs:
        asyncio.run(main())
    assert ["connect", "scheduled"] == [e["reason"] for e in events(logs, "qmt_seeded")]


def test_seed_records_and_malformed_ticks_are_dropped_downstream(xt: Any) -> None:
    """time==0 first pushes and malformed ticks are dropped by reason; good ticks pass."""
    xt._fake.seed_zero = True
    normaliser = Normaliser()
    dropped: Dict[str, int] = {}
    published = 0

    async def main() -> None:
        nonlocal published
        source = make_source(markets=("SH",))
        await source.start()
        normaliser.set_names(source.names)
        xt._fake.malformed = 4
        try:
            async for batch in source.batches():
                result = normaliser.normalise_batch(batch)
                published += len(result)
                for reason, n in result.dropped.items():
                    dropped[reason] = dropped.get(reason, 0) + n
                if "seed_record" in dropped and published > 40 and len(dropped) > 1:
                    break
        finally:
            await source.close()

    asyncio.run(main())
    assert dropped["seed_record"] > 0
    assert sum(dropped.values()) - dropped["seed_record"] >= 3


# -- threads and queue -------------------------------------------------------------------------


def test_slow_calls_never_overlap(xt: Any) -> None:
    """With slow xtdata calls, pushes, seeds and watchdog polls still use one thread only."""
    xt._fake.call_delay = 0.005

    async def main() -> None:
        source = make_source(batch_size=5, markets=(), sectors=("沪深A股",))
        await source.start()
        try:
            await take(source, lambda got: len(got) >= 5)
        finally:
            await source.close()
        assert {source.worker_thread} == xt._fake.threads

    asyncio.run(main())
    assert 0 == xt._fake.violations


def test_queue_overflow_drops_counts_and_logs_once(xt: Any) -> None:
    """Nobody consuming: pushes beyond queue_size are dropped, counted, logged once."""

    async def main() -> None:
        source = make_source(queue_size=2)
        await source.start()
        try:
            await wait_for(lambda: source.dropped_pushes >= 5)
        finally:
            await source.close()

    with capture_logs() as logs:
        asyncio.run(main())
    assert 1 == len(events(logs, "qmt_queue_full"))


def test_unsubscribe_during_outage_is_logged_and_close_finishes(xt: Any) -> None:
    """Stopping while MiniQMT is away logs each failed unsubscribe; close() still returns."""

    async def main() -> None:
        source = make_source(markets=("SH", "SZ"), check_interval=5.0)
        await source.start()
        xt._fake.drop()
        await source.close()

    with capture_logs() as logs:
        asyncio.run(main())
    assert 2 == len(events(logs, "qmt_unsubscribe_failed"))
    assert {"unsubscribed": 0, "failed": 2} == {
        k: events(logs, "qmt_released")[0][k] for k in ("unsubscribed", "failed")}


# -- calendar ---------------------------------------------------------------------------------


def test_calendar_is_china_time_whatever_the_host_zone(monkeypatch: pytest.MonkeyPatch) -> None:
    """Windows, weekends, holidays and seed times are judged in UTC+8 even on a US host."""
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        cal = TradingCalendar([parse_window("09:30-11:30")], [date(2024, 12, 3)])
        at = datetime(2024, 12, 2, 10, 0, tzinfo=CHINA).timestamp()   # Sunday 21:00 in NY
        assert at - 1800 == cal.window_start(at)
        assert cal.window_start(at + 86400) is None       # holiday
        assert cal.window_start(at + 5 * 86400) is None   # Saturday
        assert cal.window_start(at + 3 * 3600) is None    # 13:00, outside the window
        done: set[Any] = set()
        assert [9 * 3600 + 1800] == cal.due(at, [9 * 3600 + 1800], done)
        assert [] == cal.due(at + 60, [9 * 3600 + 1800], done)
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()


def test_holidays_merge_config_and_xtdata(xt: Any) -> None:
    """Config holidays and xtdata's get_holidays() both end up in the calendar."""

    async def main() -> QmtSource:
        source = make_source(holidays=("2024-10-01",))
        await source.start()
        await source.close()
        return source

    source = asyncio.run(main())
    assert {date(2024, 10, 1), date(2025, 1, 1)} <= source._calendar.holidays
