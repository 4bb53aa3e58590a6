"""The relay-side snapshot service: latest record per security over NNG REQ/REP."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any, Iterator, List, Tuple

import pynng
import pytest
from helpers import ScriptedSource, ipc_address, real_tick, tcp_address

from relay.app import Relay, State
from relay.client import Batch, Subscriber, fetch_snapshot
from relay.client._snapshot import SNAPSHOT_REQUEST, decode_snapshot_reply
from relay.config import Config, PublishConfig, parse_config, service_addresses
from relay.errors import ConfigError, PublishError
from relay.sinks import sinks_from_config
from relay.sinks.snapshot import SnapshotService


def config_for(stream: str, snapshot: Any) -> Config:
    return Config(publish=PublishConfig(addresses=(stream,), snapshot_address=snapshot,
                                        heartbeat_interval=0.05))


def wait_for(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


BATCHES = [
    {"600000.SH": real_tick(), "000001.SZ": real_tick(lastPrice=10.0)},
    {"600000.SH": real_tick(time=1733118957000, lastPrice=11.45, pvolume=75900000)},
]


@pytest.fixture
def running() -> Iterator[Tuple[Relay, str, str, threading.Event]]:
    """A relay in a thread with a gated scripted source and a snapshot address."""
    stream, snap = tcp_address(), tcp_address()
    gate = threading.Event()
    relay = Relay(config_for(stream, snap), source=ScriptedSource(BATCHES, gate=gate))
    thread = threading.Thread(target=lambda: asyncio.run(relay.serve()), daemon=True)
    thread.start()
    try:
        wait_for(lambda: relay.state is State.RUNNING)
        yield relay, stream, snap, gate
    finally:
        relay.request_stop()
        thread.join(10)


def service_of(relay: Relay) -> SnapshotService:
    (service,) = [s for s in relay._started_sinks if isinstance(s, SnapshotService)]
    return service


def test_snapshot_holds_the_latest_record_of_each_security(
    running: Tuple[Relay, str, str, threading.Event],
) -> None:
    """After two batches the snapshot has one record per symbol, the newest, as of seq 2."""
    relay, _, snap, gate = running
    gate.set()
    wait_for(lambda: service_of(relay).securities == 2 and service_of(relay).reply()
             and decode_snapshot_reply(service_of(relay).reply())[0]["seq"] == 2)
    batch = fetch_snapshot(snap, timeout=5)
    assert batch.snapshot
    assert (2, 2, relay.run_id, "simulator") == (batch.first_seq, batch.last_seq,
                                                 batch.run_id, batch.source)
    by_symbol = {r.symbol: r for r in batch.records}
    assert {"600000.SH", "000001.SZ"} == set(by_symbol)
    assert 11.45 == by_symbol["600000.SH"].close
    assert 10.0 == by_symbol["000001.SZ"].close


def test_empty_snapshot_before_the_first_batch(
    running: Tuple[Relay, str, str, threading.Event],
) -> None:
    """Before anything is published the snapshot is empty, as of seq 0."""
    _, _, snap, _ = running
    batch = fetch_snapshot(snap, timeout=5)
    assert ([], 0, None) == (batch.records, batch.last_seq, batch.run_id)


def test_pynng_req_client_and_unknown_request(
    running: Tuple[Relay, str, str, threading.Event],
) -> None:
    """A pynng Req0 gets the same reply; an unknown request gets an error reply."""
    relay, _, snap, gate = running
    gate.set()
    wait_for(lambda: service_of(relay).securities == 2)
    with pynng.Req0(dial=snap, recv_timeout=5000) as req:
        req.recv_max_size = 0
        req.send(SNAPSHOT_REQUEST)
        header, parts = decode_snapshot_reply(req.recv())
        req.send(b"what?")
        refused = req.recv()
    assert relay.run_id == header["run_id"] and parts
    assert refused.startswith(b":relay:error:")


def test_subscriber_gets_snapshot_first_then_only_newer_stream_data(
    running: Tuple[Relay, str, str, threading.Event],
) -> None:
    """snapshot=True: the snapshot batch comes first; messages it covers are skipped."""
    _relay, stream, snap, gate = running
    events: List[Any] = []
    with Subscriber(stream, snapshot=True, snapshot_url=snap, on_event=events.append) as sub:
        first = sub.recv(timeout=10)
        assert first is not None and first.snapshot and [] == first.records
        gate.set()
        got: List[Batch] = []
        while len(got) < 2:
            batch = sub.recv(timeout=10)
            assert batch is not None
            got.append(batch)
    assert [1, 2] == [b.first_seq for b in got]
    assert [2, 1] == [len(b) for b in got]
    assert "SnapshotLoaded" in [type(e).__name__ for e in events]


def test_subscriber_skips_stream_messages_older_than_the_snapshot(
    running: Tuple[Relay, str, str, threading.Event],
) -> None:
    """Connected after seq 2: the snapshot says seq 2 and nothing older is delivered again."""
    relay, stream, snap, gate = running
    gate.set()
    wait_for(lambda: service_of(relay).securities == 2
             and decode_snapshot_reply(service_of(relay).reply())[0]["seq"] == 2)
    with Subscriber(stream, snapshot=True, snapshot_url=snap, codes=["600000.SH"]) as sub:
        first = sub.recv(timeout=10)
        nothing = sub.recv(timeout=0.3)
    assert first is not None and first.snapshot
    assert (2, ["600000"]) == (first.last_seq, [r.code for r in first.records])
    assert nothing is None
    assert 2 == sub.last_seq


def test_snapshot_over_ipc(tmp_path: Any) -> None:
    """The service also listens on ipc://; fetch_snapshot reaches it through pynng."""
    snap = ipc_address()
    service = SnapshotService(snap)
    service.start()
    try:
        batch = fetch_snapshot(snap, timeout=5)
    finally:
        service.close()
    assert [] == batch.records


def test_snapshot_failure_is_an_event_and_the_stream_continues() -> None:
    """No snapshot service: SnapshotFailed is reported and the subscriber stays up."""
    stream = tcp_address()
    events: List[Any] = []
    with pynng.Pub0(listen=stream), Subscriber(stream, snapshot=True,
                                               snapshot_url=tcp_address(),
                                               on_event=events.append) as sub:
        deadline = time.monotonic() + 10
        while not any(type(e).__name__ == "SnapshotFailed" for e in events):
            assert time.monotonic() < deadline
            sub.next_update(0.05)
        assert sub.connected


def test_address_in_use_is_a_publish_error() -> None:
    """A snapshot address already taken fails start() with PublishError."""
    snap = tcp_address()
    with pynng.Rep0(listen=snap):
        service = SnapshotService(snap)
        with pytest.raises(PublishError, match="snapshot"):
            service.start()


def test_config_enables_and_disables_the_service() -> None:
    """Default config adds the sink; null or "" removes it; a bad URL is a ConfigError."""
    def snapshots(config: Config) -> list:  # type: ignore[type-arg]
        return [s for s in sinks_from_config(config) if type(s).__name__ == "SnapshotService"]

    assert 1 == len(snapshots(Config()))
    assert "tcp://127.0.0.1:9201" == service_addresses(Config()).snapshot
    assert ["tcp://127.0.0.1:9201"] == [s.address for s in snapshots(Config())]
    for off in (None, ""):
        cfg = parse_config({"publish": {"snapshot_address": off}})
        assert [] == snapshots(cfg)
    with pytest.raises(ConfigError, match=r"publish\.snapshot_address"):
        parse_config({"publish": {"snapshot_address": "http://x"}})
