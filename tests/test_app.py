"""The Relay lifecycle and pipeline, with a scripted source and real NNG sockets."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
import time
from typing import Any, List

import pynng
import pytest
from helpers import CollectingSink, ScriptedSource, ipc_address, real_tick, tcp_address
from structlog.testing import capture_logs

from relay.app import Relay, State
from relay.client import decode_spot_list
from relay.config import Config, PublishConfig, SupervisionConfig
from relay.errors import PublishError, ServiceError
from relay.publish import Publisher
from relay.wire import END, HEARTBEAT_PREFIX, START, decode_heartbeat


def config_for(*addresses: str, **publish: Any) -> Config:
    publish.setdefault("snapshot_address", None)  # tests/test_snapshot.py covers it
    return Config(publish=PublishConfig(addresses=tuple(addresses), **publish))


def run_in_thread(relay: Relay) -> threading.Thread:
    thread = threading.Thread(target=lambda: asyncio.run(relay.serve()), daemon=True)
    thread.start()
    return thread


def wait_for(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.01)


def collect(sock: pynng.Socket, until_ends: int) -> List[bytes]:
    out: List[bytes] = []
    while sum(1 for m in out if m == END) < until_ends:
        out.append(sock.recv())
    return out


def test_batches_flow_framed_to_a_subscriber_on_tcp_and_ipc() -> None:
    """Each batch arrives as start tag, SpotList data, end tag on both transports."""
    tcp, ipc = tcp_address(), ipc_address()
    batches = [{"600000.SH": real_tick(), "000001.SZ": real_tick(time=1733118957000)},
               {"600000.SH": real_tick(time=1733118960000, pvolume=75900000)}]
    gate = threading.Event()
    source = ScriptedSource(batches, {"600000.SH": "浦发银行"}, gate=gate)
    sink = CollectingSink()
    relay = Relay(config_for(tcp, ipc), source=source, sinks=[sink])
    with pynng.Sub0(recv_timeout=5000) as s1, pynng.Sub0(recv_timeout=5000) as s2:
        thread = run_in_thread(relay)
        wait_for(lambda: relay.state is State.RUNNING)
        for sock, url in ((s1, tcp), (s2, ipc)):
            sock.subscribe(b":spot:")
            sock.dial(url, block=True)
        wait_for(lambda: relay.subscribers == 2)
        time.sleep(0.1)  # subscriptions travel after the connection
        gate.set()
        got_tcp, got_ipc = collect(s1, 2), collect(s2, 2)
        relay.request_stop()
        thread.join(10)
    assert not thread.is_alive()
    for got in (got_tcp, got_ipc):
        assert [START, END, START, END] == [m for m in got if m in (START, END)]
        data = [decode_spot_list(m, 6) for m in got if m not in (START, END)]
        assert [["600000", "000001"], ["600000"]] == [[r.code for r in d.records]
                                                       for d in data]
        assert [1, 2] == [d.seq for d in data]
        assert {relay.run_id} == {d.run_id for d in data}
        assert {"simulator"} == {d.source for d in data}
        assert "浦发银行" == data[0].records[0].name
    assert ["start", "close"] == sink.calls
    assert [1, 2] == [b.first_seq for b in sink.batches]
    assert source.close_calls >= 1
    assert State.STOPPED is relay.state


def test_bad_ticks_are_dropped_and_the_rest_published() -> None:
    """A batch with malformed ticks still publishes its good ones; drops are logged."""
    batch = {"600000.SH": real_tick(), "600001.SH": real_tick(lastPrice=None),
             "600002.SH": real_tick(time=0), "bogus": real_tick()}
    sink = CollectingSink()
    relay = Relay(config_for(tcp_address()), source=ScriptedSource([batch], finish=True),
                  sinks=[sink])
    with capture_logs() as logs:
        asyncio.run(relay.serve())
    assert [["600000"]] == [[r.code for r in b.records] for b in sink.batches]
    stopped = next(e for e in logs if e["event"] == "relay_stopped")
    assert {"bad_code": 1, "bad_type": 1, "seed_record": 1} == stopped["dropped"]


def test_live_source_lag_is_logged_as_a_plain_number() -> None:
    """For a live source the stats line reports lag; from the numpy fast path it must still
    be a plain int, or the JSON log line could not be written."""

    class LiveSource(ScriptedSource):
        kind = "qmt"

    now_ms = int(time.time() * 1000)
    batch = {f"60000{i}.SH": real_tick(time=now_ms - 1500 + i) for i in range(4)}
    relay = Relay(config_for(tcp_address()), source=LiveSource([batch], finish=True))
    with capture_logs() as logs:
        asyncio.run(relay.serve())
    stats = [e for e in logs if e["event"] == "stats" and e["records"]]
    assert 1 == len(stats)
    lag = stats[0]["lag_ms_max"]
    assert type(lag) is int and 1400 < lag < 60_000
    json.dumps(stats[0])


def test_heartbeats_use_their_own_prefix() -> None:
    """Heartbeats go out under :relay: (hikyuu never sees them) with run id and status."""
    url = tcp_address()
    relay = Relay(config_for(url, heartbeat_interval=0.05), source=ScriptedSource([]))
    with pynng.Sub0(recv_timeout=5000) as sub:
        sub.subscribe(HEARTBEAT_PREFIX)
        sub.dial(url, block=False)
        thread = run_in_thread(relay)
        beat = decode_heartbeat(sub.recv())
        relay.request_stop()
        thread.join(10)
    assert (relay.run_id, "simulator", True, "up") == (
        beat["run_id"], beat["source"], beat["simulated"], beat["status"])


def test_hikyuu_style_subscription_sees_only_spot_messages() -> None:
    """A subscriber of ':spot:' alone never receives heartbeats."""
    url = tcp_address()
    gate = threading.Event()
    source = ScriptedSource([{"600000.SH": real_tick()}], gate=gate)
    relay = Relay(config_for(url, heartbeat_interval=0.02), source=source)
    with pynng.Sub0(recv_timeout=5000) as sub:
        thread = run_in_thread(relay)
        wait_for(lambda: relay.state is State.RUNNING)
        sub.subscribe(b":spot:")
        sub.dial(url, block=True)
        wait_for(lambda: relay.subscribers == 1)
        time.sleep(0.2)  # several heartbeats go by
        gate.set()
        got = collect(sub, 1)
        relay.request_stop()
        thread.join(10)
    assert all(m.startswith(b":spot:") for m in got)


def test_address_in_use_is_a_publish_error() -> None:
    """Binding an address already in use fails with PublishError naming it."""
    url = tcp_address()
    first = Publisher([url])
    first.start()
    try:
        with pytest.raises(PublishError, match="address in use") as info:
            Publisher([url]).start()
        assert url == info.value.address
    finally:
        first.close()


def test_stop_closes_source_sinks_and_sockets() -> None:
    """After stop, the source was closed, sinks closed, and the address is free again."""
    url = tcp_address()
    source = ScriptedSource([{"600000.SH": real_tick()}])
    sink = CollectingSink()
    relay = Relay(config_for(url), source=source, sinks=[sink])
    thread = run_in_thread(relay)
    wait_for(lambda: relay.state is State.RUNNING)
    relay.request_stop()
    thread.join(10)
    assert source.close_calls >= 1
    assert ["start", "close"] == sink.calls
    again = Publisher([url])
    again.start()  # would raise if the relay had left the socket open
    again.close()


def test_failing_sink_does_not_stop_publishing() -> None:
    """A sink that raises is logged; publishing and other sinks go on."""

    class Broken(CollectingSink):
        def write(self, batch: Any) -> None:
            raise OSError("disk full")

    good = CollectingSink()
    source = ScriptedSource([{"600000.SH": real_tick()}, {"600000.SH": real_tick()}],
                            finish=True)
    relay = Relay(config_for(tcp_address()), source=source, sinks=[Broken(), good])
    with capture_logs() as logs:
        asyncio.run(relay.serve())
    assert 2 == len(good.batches)
    assert 2 == sum(1 for e in logs if e["event"] == "sink_failed")


def test_broken_source_stops_relay_with_an_error() -> None:
    """A source that keeps raising ends the run with ServiceError after a clean shutdown."""

    class Broken(ScriptedSource):
        async def batches(self) -> Any:  # type: ignore[override]
            yield {"600000.SH": real_tick()}
            raise RuntimeError("push thread died")

    sink = CollectingSink()
    config = dataclasses.replace(config_for(tcp_address()), supervision=SupervisionConfig(
        max_failures=1, backoff_min=0.01, backoff_max=0.01))
    relay = Relay(config, source=Broken([]), sinks=[sink])
    with pytest.raises(ServiceError, match="push thread died"):
        relay.run()
    assert ["start", "close"] == sink.calls
    assert 1 == len(sink.batches)
