"""Subscriber behaviour against a real pynng Pub0 peer: batches, events, reconnects, APIs."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from typing import Any, List

import flatbuffers
import pytest
from client_helpers import Peer, items_of, messages, record, take, wait_joined
from helpers import ipc_address, tcp_address

from relay._flatgen import load
from relay.client import (
    Batch,
    Connected,
    DecodeFailed,
    Disconnected,
    Gap,
    Restart,
    Silence,
    Subscriber,
)
from relay.wire import SPOT_PREFIX


def is_batch(item: Any) -> bool:
    return isinstance(item, Batch)


def test_import_loads_nothing_heavy() -> None:
    """`import relay.client` loads none of pynng, h5py, structlog, xtquant, numpy, nats."""
    code = ("import sys, relay.client; "
            "print(','.join(m for m in ('pynng', 'h5py', 'structlog', 'xtquant', 'numpy', "
            "'pandas', 'nats') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert "" == out.stdout.strip()


def test_batches_are_reassembled_over_pure_python_tcp() -> None:
    """Start tag, two data messages, end tag arrive as one Batch with header fields."""
    url = tcp_address()
    peer = Peer(url)
    try:
        with Subscriber(url) as sub:
            wait_joined(sub, peer)
            recs = [record(f"{600000 + i}") for i in range(300)]
            parts = messages(recs, seq=1, max_bytes=64 * 1024)
            assert len(parts) > 1
            peer.batch(*parts)
            batch = sub.recv(timeout=10)
    finally:
        peer.close()
    assert batch is not None
    assert recs == batch.records
    assert (1, len(parts), "run-a", "simulator", 1) == (
        batch.first_seq, batch.last_seq, batch.run_id, batch.source, batch.publish_time_ms)
    assert not batch.snapshot


def test_codes_filter_keeps_symbols_and_bare_codes() -> None:
    """codes= accepts 600000.SH and bare 000001; other securities are dropped."""
    url = tcp_address()
    peer = Peer(url)
    try:
        with Subscriber(url, codes=["600000.SH", "000001"]) as sub:
            wait_joined(sub, peer)
            peer.batch(*messages([record("600000"), record("600000", "SZ"),
                                  record("000001", "SZ"), record("601398")], seq=1))
            batch = sub.recv(timeout=10)
    finally:
        peer.close()
    assert batch is not None
    assert [("600000", "SH"), ("000001", "SZ")] == [(r.code, r.market) for r in batch]


def test_gap_restart_and_decode_failure_are_events_and_the_stream_continues() -> None:
    """A seq jump is a Gap, a new run id a Restart, garbage a DecodeFailed; batches go on."""
    url = tcp_address()
    peer = Peer(url)
    seen: List[Any] = []
    errors: List[Any] = []
    try:
        with Subscriber(url, on_event=seen.append, on_error=errors.append) as sub:
            wait_joined(sub, peer)
            peer.batch(*messages([record()], seq=1))
            peer.batch(*messages([record()], seq=5))            # 2..4 lost
            peer.batch(SPOT_PREFIX + b"\x08\x00\x00\x00garbage!")
            peer.heartbeat("run-b")                             # the relay restarted
            peer.batch(*messages([record(close=12.0)], seq=1, run_id="run-b"))
            got = take(lambda: sub.next_update(0.1),
                       lambda items: sum(map(is_batch, items)) >= 3)
    finally:
        peer.close()
    events = [i for i in got if not is_batch(i)]
    assert Gap(2, 5, "run-a") in events and Gap(2, 5, "run-a").missed == 3
    assert Restart("run-a", "run-b") in events
    assert 1 == sum(isinstance(e, DecodeFailed) for e in events)
    assert 1 == len(errors) and "cannot decode" in str(errors[0])
    batches = [i for i in got if is_batch(i)]
    assert [1, 5, 1] == [b.first_seq for b in batches]
    assert 12.0 == batches[-1].records[0].close
    assert [e for e in seen if not isinstance(e, Connected)] == [
        e for e in events if not isinstance(e, Connected)]
    assert 1 == sub.stats.gaps and 1 == sub.stats.restarts and 1 == sub.stats.decode_errors


def test_reconnects_after_the_publisher_goes_away() -> None:
    """Publisher closed and reopened: Disconnected, Connected again, batches resume."""
    url = tcp_address()
    peer = Peer(url)
    with Subscriber(url, reconnect_wait=0.05, reconnect_wait_max=0.2) as sub:
        wait_joined(sub, peer)
        peer.batch(*messages([record()], seq=1))
        assert sub.recv(timeout=10) is not None
        peer.close()
        take(lambda: sub.next_update(0.1), lambda items: any(
            isinstance(i, Disconnected) for i in items))
        assert not sub.connected
        peer = Peer(url)
        try:
            wait_joined(sub, peer)
            assert sub.connected
            peer.batch(*messages([record()], seq=2))
            batch = sub.recv(timeout=10)
        finally:
            peer.close()
    assert batch is not None and 2 == batch.first_seq
    assert 2 == sub.stats.connects


def test_silence_is_reported_then_the_subscriber_reconnects() -> None:
    """No heartbeat within heartbeat_timeout: a Silence event, then a fresh connection."""
    url = tcp_address()
    peer = Peer(url)
    try:
        with Subscriber(url, heartbeat_timeout=0.3, reconnect_wait=0.01) as sub:
            wait_joined(sub, peer)
            got = take(lambda: sub.next_update(0.1),
                       lambda items: sum(isinstance(i, Connected) for i in items) >= 1
                       and any(isinstance(i, Silence) for i in items) and peer.pipes >= 2)
    finally:
        peer.close()
    silence = next(i for i in got if isinstance(i, Silence))
    assert silence.seconds >= 0.3
    assert 1 <= sub.stats.silences


def test_ipc_uses_pynng() -> None:
    """An ipc:// address works through pynng, with Connected reported."""
    url = ipc_address()
    peer = Peer(url)
    seen: List[Any] = []
    try:
        with Subscriber(url, on_event=seen.append) as sub:
            wait_joined(sub, peer)
            assert sub.connected
            peer.batch(*messages([record()], seq=7))
            got = take(lambda: sub.next_update(0.1), lambda items: any(map(is_batch, items)))
    finally:
        peer.close()
    assert [Connected(url)] == seen
    assert 7 == next(i for i in got if is_batch(i)).first_seq


def test_callbacks_on_a_thread_and_close_from_another() -> None:
    """start(callback) delivers batches on a thread; close() ends it."""
    url = tcp_address()
    peer = Peer(url)
    got: List[Batch] = []
    arrived = threading.Event()

    def on_batch(batch: Batch) -> None:
        got.append(batch)
        arrived.set()

    sub = Subscriber(url)
    try:
        thread = sub.start(on_batch)
        assert peer.joined.wait(10)
        while not arrived.is_set():
            peer.batch(*messages([record()], seq=len(got) + 1))
            arrived.wait(0.1)
    finally:
        sub.close()
        peer.close()
    thread.join(5)
    assert not thread.is_alive()
    assert got and "600000" == got[0].records[0].code


def test_async_iterator() -> None:
    """`async for batch in sub` yields batches; the async context manager closes it."""
    url = tcp_address()
    peer = Peer(url)

    async def main() -> Batch:
        async with Subscriber(url) as sub:
            async for batch in sub:
                return batch
        raise AssertionError("no batch")

    def feed() -> None:
        assert peer.joined.wait(10)
        for seq in range(1, 200):
            peer.batch(*messages([record()], seq=seq))
            if done.wait(0.05):
                return

    done = threading.Event()
    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    try:
        batch = asyncio.run(asyncio.wait_for(main(), 20))
    finally:
        done.set()
        feeder.join(5)
        peer.close()
    assert "600000" == batch.records[0].code


def hikyuu_message(codes: List[str]) -> bytes:
    """A SpotList as hikyuu's own producer builds it: Builder, no appended fields."""
    spot, spot_list = load()
    b = flatbuffers.Builder(0)
    offsets = []
    for code in codes:
        strs = [b.CreateString(x) for x in ("SZ", code, "平安银行", "2024-12-02 10:00:00")]
        spot.Start(b)
        spot.AddMarket(b, strs[0])
        spot.AddCode(b, strs[1])
        spot.AddName(b, strs[2])
        spot.AddDatetime(b, strs[3])
        spot.AddClose(b, 10.5)
        offsets.append(spot.End(b))
    spot_list.StartSpotVector(b, len(offsets))
    for off in reversed(offsets):
        b.PrependUOffsetTRelative(off)
    vec = b.EndVector()
    spot_list.Start(b)
    spot_list.AddSpot(b, vec)
    b.Finish(spot_list.End(b))
    return SPOT_PREFIX + bytes(b.Output())


def test_plain_hikyuu_producer_stream() -> None:
    """A Builder-made stream without seq or run id decodes; absent fields are None."""
    url = tcp_address()
    peer = Peer(url)
    try:
        with Subscriber(url, heartbeat_timeout=None) as sub:
            wait_joined(sub, peer)
            peer.batch(hikyuu_message(["000001", "000002"]))
            peer.batch(hikyuu_message(["000001"]))
            got = take(lambda: sub.next_update(0.1),
                       lambda items: sum(map(is_batch, items)) >= 2)
    finally:
        peer.close()
    batches = [i for i in got if is_batch(i)]
    assert [2, 1] == [len(b) for b in batches]
    rec = batches[0].records[0]
    assert ("000001", 10.5, "平安银行") == (rec.code, rec.close, rec.name)
    assert (None, None, None) == (rec.time_ms, rec.status, rec.trade_count)
    assert (None, None) == (batches[0].first_seq, batches[0].run_id)
    assert not any(isinstance(i, (Gap, Restart)) for i in got)
    numpy = pytest.importorskip("numpy")
    arrays = batches[0].to_numpy()
    assert "time_ms" not in arrays and "status" not in arrays
    assert numpy.float64 == arrays["close"].dtype


def test_iterator_and_updates_helpers() -> None:
    """`for batch in sub` yields only batches; updates() yields events as well."""
    url = tcp_address()
    peer = Peer(url)
    try:
        with Subscriber(url) as sub:
            wait_joined(sub, peer)
            peer.batch(*messages([record()], seq=1))
            first = next(iter(sub))
            peer.batch(*messages([record()], seq=3))
            kinds = []
            for item in items_of(sub):
                kinds.append(type(item).__name__)
                if is_batch(item):
                    break
    finally:
        peer.close()
    assert 1 == first.first_seq
    assert ["Gap", "Batch"] == kinds
