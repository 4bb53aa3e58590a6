"""The NATS JetStream bridge and the subscriber over nats://, against a real nats-server."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Tuple

import pytest
from helpers import CollectingSink, ScriptedSource, real_tick, run_relay_with, tcp_address
from nats_helpers import NatsServer
from structlog.testing import capture_logs

from relay.app import Relay, State
from relay.client import Batch, Gap, Subscriber, fetch_snapshot
from relay.config import (
    BridgeConfig,
    Config,
    HistoryConfig,
    MetricsConfig,
    NatsConfig,
    PublishConfig,
    parse_config,
)
from relay.errors import ConfigError
from relay.records import SpotRecord

pytest.importorskip("nats", reason="the NATS tests need nats-py (the test extra installs it)")


def wait_for(predicate: Callable[[], Any], timeout: float = 15.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not reached: {what}")
        time.sleep(0.02)


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path / "jetstream")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def scripted_batches(n: int) -> List[Dict[str, Dict[str, Any]]]:
    """``n`` batches of 60 securities each, every one moving a little."""
    out = []
    for i in range(n):
        batch = {}
        for k in range(60):
            code = f"{600000 + k}.SH" if k % 2 else f"{k:06d}.SZ"
            batch[code] = real_tick(time=1733118954000 + 3000 * i, lastPrice=10.0 + i * 0.01 + k,
                                    high=100.0, low=1.0, pvolume=75861284 + i * 100)
        out.append(batch)
    return out


class Collector:
    """Runs a subscriber on a thread and keeps its batches and events."""

    def __init__(self, sub: Subscriber) -> None:
        self.sub = sub
        self.items: List[Any] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        for item in self.sub.updates():
            self.items.append(item)

    @property
    def batches(self) -> List[Batch]:
        return [b for b in list(self.items) if isinstance(b, Batch)]

    def by_seq(self) -> Dict[int, List[SpotRecord]]:
        return {b.first_seq: b.records for b in self.batches
                if b.first_seq is not None and not b.snapshot}

    def close(self) -> None:
        self.sub.close()
        self.thread.join(10)


def bridged_config(stream: str, snapshot: str, nats_url: str) -> Config:
    return Config(
        publish=PublishConfig(addresses=(stream,), snapshot_address=snapshot,
                              max_message_bytes=8192, heartbeat_interval=0.2),
        bridge=BridgeConfig(nats=NatsConfig(url=(nats_url,), latest_interval=0.1,
                                            storage="memory")),
        metrics=MetricsConfig(address=None), history=HistoryConfig(address=None),
    )


@pytest.fixture(scope="module")
def quiet_relay(tmp_path_factory: Any) -> Iterator[Tuple[Relay, CollectingSink, str, str]]:
    """An in-process relay that publishes 12 scripted batches, then stays quiet."""
    nats_server = NatsServer(tmp_path_factory.mktemp("quiet") / "jetstream")
    nats_server.start()
    stream, snapshot = tcp_address(), tcp_address()
    sink = CollectingSink()
    relay = Relay(bridged_config(stream, snapshot, nats_server.url),
                  source=ScriptedSource(scripted_batches(12)), sinks=[sink])
    thread = threading.Thread(target=lambda: asyncio.run(relay.serve()), daemon=True)
    thread.start()
    try:
        wait_for(lambda: relay.state is State.RUNNING and len(sink.batches) == 12, what="12")
        bridge = next(s for s in relay._sinks if type(s).__name__ == "NatsBridge")
        last = sink.batches[-1]
        last_seq = last.first_seq + len(last.messages) - 1
        wait_for(lambda: bridge.stats.acked == last_seq, what="every message acknowledged")
        wait_for(lambda: bridge._marked is not None and bridge._marked[1] == last_seq
                 and not bridge._dirty, what="latest records and marker published")
        yield relay, sink, nats_server.url, snapshot
    finally:
        relay.request_stop()
        thread.join(15)
        nats_server.stop()


def test_late_joiner_snapshot_over_nats_equals_the_nng_snapshot(
        quiet_relay: Tuple[Relay, CollectingSink, str, str]) -> None:
    """Subscriber(nats://, snapshot=True) gets the same records and seq as the NNG service."""
    relay, _, nats_url, snapshot_url = quiet_relay
    nng = fetch_snapshot(snapshot_url, timeout=5)
    with Subscriber(nats_url, snapshot=True) as sub:
        over_nats = sub.recv(timeout=10)
    assert over_nats is not None and over_nats.snapshot
    key = lambda r: (r.market, r.code)  # noqa: E731
    assert sorted(nng.records, key=key) == sorted(over_nats.records, key=key)
    assert 60 == len(over_nats.records)
    assert (nng.last_seq, relay.run_id) == (over_nats.last_seq, over_nats.run_id)


def test_replay_from_a_sequence_returns_exactly_the_messages_after_it(
        quiet_relay: Tuple[Relay, CollectingSink, str, str]) -> None:
    """replay_from=N delivers the batches after message N, record for record, in order."""
    _, sink, nats_url, _ = quiet_relay
    start = sink.batches[4]
    after = start.first_seq + len(start.messages) - 1  # the last message of batch 5
    expected = [b.records for b in sink.batches[5:]]
    got: List[Batch] = []
    with Subscriber(nats_url, replay_from=after) as sub:
        while len(got) < len(expected):
            batch = sub.recv(timeout=10)
            assert batch is not None, f"replay stopped after {len(got)} batches"
            got.append(batch)
        assert sub.recv(timeout=0.5) is None  # nothing more: the relay is quiet
    assert expected == [b.records for b in got]
    assert [b.first_seq for b in sink.batches[5:]] == [b.first_seq for b in got]
    assert after + 1 == got[0].first_seq


RELAY_CONFIG = """
source:
  simulator:
    speed: 30
    securities: 400
publish:
  heartbeat_interval: 0.2
  max_message_bytes: 16384
  snapshot_address: null
bridge:
  nats:
    latest_interval: 0.2
    reconnect_wait: 0.2
metrics:
  address: null
history:
  address: null
logging:
  format: json
  stats_interval: 60
"""


@pytest.fixture(scope="module")
def live_relay(tmp_path_factory: Any) -> Iterator[Tuple[str, str, Path]]:
    """A relay subprocess on the simulator, bridged to its own nats-server: (tcp, nats, dir)."""
    tmp = tmp_path_factory.mktemp("live")
    server = NatsServer(tmp / "jetstream")
    server.start()
    stream = tcp_address()
    proc = run_relay_with(tmp, RELAY_CONFIG, "--publish", stream, "--nats", server.url,
                          quiet=True)
    try:
        yield stream, server.url, tmp
    finally:
        proc.kill()
        proc.wait(20)
        server.stop()


def test_nats_subscriber_gets_the_same_records_as_an_nng_subscriber(
        live_relay: Tuple[str, str, Path]) -> None:
    """One relay run: the batches seen over NATS equal those over NNG, seq for seq."""
    stream, nats_url, _ = live_relay
    nng = Collector(Subscriber(stream))
    over_nats = Collector(Subscriber(nats_url))
    try:
        wait_for(lambda: len(set(nng.by_seq()) & set(over_nats.by_seq())) >= 6,
                 what="six batches over both")
    finally:
        nng.close()
        over_nats.close()
    a, b = nng.by_seq(), over_nats.by_seq()
    common = sorted(set(a) & set(b))
    assert [a[s] for s in common] == [b[s] for s in common]
    assert all(a[s] for s in common)


def test_tail_and_record_read_nats_urls(live_relay: Tuple[str, str, Path],
                                        procs: List[subprocess.Popen[str]]) -> None:
    """`qmt-relay tail nats://...` prints records; `record nats://...` writes a day file."""
    from helpers import relay_command

    from relay.recording import open_day

    _, nats_url, tmp = live_relay
    out = tmp / "rec"
    recorder = relay_command(tmp, "record", nats_url, "--dir", str(out), "--codes",
                             "000001.SH,399001.SZ", "--log-level", "debug")
    procs.append(recorder)
    tail = relay_command(tmp, "tail", nats_url, "--json", "--count", "3", "--replay-from", "0")
    procs.append(tail)
    tail_out, tail_err = tail.communicate(timeout=60)
    assert 0 == tail.returncode, tail_err
    rows = [json.loads(line) for line in tail_out.splitlines()]
    assert 3 == len(rows) and all(r["source"] == "simulator" for r in rows)
    assert recorder.stdout is not None
    flushes = 0
    for line in recorder.stdout:
        if '"recorder_flushed"' in line:
            flushes += 1
            if flushes == 1:
                break
    recorder.terminate()
    recorder.communicate(timeout=30)
    assert 0 == recorder.returncode
    (path,) = out.iterdir()
    with open_day(path) as day:
        assert {"000001.SH", "399001.SZ"} == set(day.codes())
        assert 1 <= len(day)


def test_relay_keeps_publishing_through_a_nats_outage_and_the_bridge_recovers(
        nats_server: NatsServer, tmp_path: Path,
        procs: List[subprocess.Popen[str]]) -> None:
    """nats-server killed and restarted: NNG never stops, NATS resumes (a Gap at most)."""
    stream = tcp_address()
    nng = Collector(Subscriber(stream))
    over_nats = Collector(Subscriber(nats_server.url, heartbeat_timeout=1.0))
    proc = run_relay_with(tmp_path, RELAY_CONFIG, "--publish", stream, "--nats",
                          nats_server.url)
    procs.append(proc)
    try:
        wait_for(lambda: len(over_nats.by_seq()) >= 2 and len(nng.by_seq()) >= 2,
                 what="batches over NATS and NNG")
        nats_server.kill()
        down_at = max(nng.by_seq())
        wait_for(lambda: max(nng.by_seq()) > down_at + 5, what="NNG goes on during the outage")
        nats_server.start()
        up_at = max(nng.by_seq())
        wait_for(lambda: max(over_nats.by_seq(), default=0) > up_at, timeout=20,
                 what="NATS delivers batches published after the restart")
        assert proc.poll() is None
    finally:
        nng.close()
        over_nats.close()
        proc.terminate()
        out, _ = proc.communicate(timeout=20)
    assert 0 == proc.returncode
    events = [json.loads(line).get("event") for line in out.splitlines()
              if line.startswith("{")]
    assert "nats_disconnected" in events
    assert "nats_reconnected" in events
    # over NATS, every batch follows the one before it, or a Gap says what was lost
    last_seq, gap_seen, batches = None, False, 0
    for item in over_nats.items:
        if isinstance(item, Gap):
            gap_seen = True
        elif isinstance(item, Batch) and item.first_seq is not None:
            if last_seq is not None:
                assert item.first_seq == last_seq + 1 or gap_seen, (last_seq, item.first_seq)
            last_seq, gap_seen = item.last_seq, False
            batches += 1
    assert batches >= 3


def test_bridge_without_a_server_counts_drops_and_never_blocks() -> None:
    """Nothing listening: write() returns at once, drops are counted, close() is quick."""
    from relay.sinks.nats import NatsBridge

    bridge = NatsBridge(NatsConfig(url=(f"nats://127.0.0.1:{tcp_address().rsplit(':')[-1]}",),
                                   queue_size=4, connect_timeout=0.2))
    sink = CollectingSink()
    source = ScriptedSource(scripted_batches(1))
    relay = Relay(Config(publish=PublishConfig(addresses=(tcp_address(),),
                                               snapshot_address=None),
                         metrics=MetricsConfig(address=None), history=HistoryConfig(address=None)),
                  source=source, sinks=[sink])
    thread = threading.Thread(target=lambda: asyncio.run(relay.serve()), daemon=True)
    with capture_logs() as logs:
        bridge.start()
        thread.start()
        wait_for(lambda: len(sink.batches) == 1)
        for _ in range(50):
            bridge.write(sink.batches[0])
        bridge.close()
        relay.request_stop()
        thread.join(10)
    assert bridge.stats.dropped >= 46
    assert 0 == bridge.stats.batches
    assert bridge.stats.dropped == bridge.counters()["nats_dropped"]  # the metrics endpoint
    assert 1 == sum(1 for e in logs if e["event"] == "nats_bridge_dropping")
    assert any(e["event"] == "nats_unreachable" for e in logs)


@pytest.mark.parametrize(("data", "key"), [
    ({"bridge": {"nats": {"url": ["http://x:1"]}}}, "bridge.nats.url[0]"),
    ({"bridge": {"nats": {"subject_prefix": "a.>"}}}, "bridge.nats.subject_prefix"),
    ({"bridge": {"nats": {"stream": "a b"}}}, "bridge.nats.stream"),
    ({"bridge": {"nats": {"queue_size": 0}}}, "bridge.nats.queue_size"),
    ({"bridge": {"nats": {"storage": "disk"}}}, "bridge.nats.storage"),
    ({"bridge": {"nats": {"urls": []}}}, "bridge.nats.urls"),
])
def test_bad_bridge_config_names_the_key(data: Dict[str, Any], key: str) -> None:
    """Each bad bridge.nats value is a ConfigError naming its dotted key."""
    with pytest.raises(ConfigError) as info:
        parse_config(data, path="relay.yaml")
    assert key == info.value.key


def test_subscriber_over_nats_loads_no_compiled_extension(
        quiet_relay: Tuple[Relay, CollectingSink, str, str]) -> None:
    """Receiving over nats:// imports no compiled module from site-packages, nor pynng."""
    _, _, nats_url, _ = quiet_relay
    code = (
        "import sys, sysconfig\n"
        "from relay.client import Subscriber\n"
        f"with Subscriber({nats_url!r}, replay_from=0) as sub:\n"
        "    assert sub.recv(timeout=10) is not None\n"
        "site = sysconfig.get_paths()['purelib']\n"
        "bad = sorted(n for n, m in list(sys.modules.items())\n"
        "             if (getattr(m, '__file__', None) or '').startswith(site)\n"
        "             and not m.__file__.endswith('.py'))\n"
        "heavy = [m for m in ('pynng', 'h5py', 'structlog', 'numpy') if m in sys.modules]\n"
        "print(','.join(bad + heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert 0 == out.returncode, out.stderr
    assert "" == out.stdout.strip()


def test_columns_record_equals_the_built_records() -> None:
    """SpotColumns.record(i), which the bridge uses, equals records[i], types included."""
    from relay.normalise import Normaliser

    batch = scripted_batches(1)[0]
    one, other = Normaliser().normalise_batch(batch), Normaliser().normalise_batch(batch)
    assert one.columns is not None and other.columns is not None
    singles = [one.columns.record(i) for i in range(len(one))]
    assert other.columns.records == singles
    assert [type(v) for v in other.columns.records[0]] == [type(v) for v in singles[0]]


def test_a_message_the_server_refuses_is_counted_and_the_bridge_goes_on(
        nats_server: NatsServer) -> None:
    """A message over the server's max_payload: logged once, counted; the next batch goes."""
    from relay.encode import SpotEncoder
    from relay.normalise import Normaliser
    from relay.sinks import PublishedBatch
    from relay.sinks.nats import NatsBridge

    result = Normaliser().normalise_batch(scripted_batches(1)[0])
    assert result.columns is not None
    messages, counts = SpotEncoder("run-a", "simulator").encode_chunks(
        result.columns, first_seq=2, publish_time_ms=1)
    huge = PublishedBatch(result, [b":spot:" + bytes(2 << 20)], [len(result)], 1, 1, "run-a",
                          "simulator")
    normal = PublishedBatch(result, messages, counts, 2, 1, "run-a", "simulator")
    bridge = NatsBridge(NatsConfig(url=(nats_server.url,), storage="memory"))
    with capture_logs() as logs:
        bridge.start()
        try:
            wait_for(lambda: bridge.connected, what="connected")
            bridge.write(huge)
            bridge.write(normal)
            wait_for(lambda: bridge.stats.acked == len(messages), what="the normal batch acked")
        finally:
            bridge.close()
    assert (1, 1) == (bridge.stats.errors, bridge.stats.dropped)
    events = [e["event"] for e in logs]
    assert 1 == events.count("nats_publish_failed")
    assert "nats_publish_recovered" in events


def test_a_long_outage_fills_the_reconnect_buffer_then_drops_and_recovers(
        nats_server: NatsServer) -> None:
    """NATS down: batches beyond pending_bytes are dropped (counted); after it, they flow."""
    from relay.encode import SpotEncoder
    from relay.normalise import Normaliser
    from relay.sinks import PublishedBatch
    from relay.sinks.nats import NatsBridge

    result = Normaliser().normalise_batch(scripted_batches(1)[0])
    assert result.columns is not None
    enc = SpotEncoder("run-a", "simulator")

    def batch(seq: int) -> PublishedBatch:
        messages, counts = enc.encode_chunks(result.columns or [], first_seq=seq,
                                             publish_time_ms=1)
        return PublishedBatch(result, messages * 20, counts * 20, seq, 1, "run-a", "simulator")

    bridge = NatsBridge(NatsConfig(url=(nats_server.url,), storage="memory",
                                   pending_bytes=1024 * 1024, reconnect_wait=0.2))
    bridge.start()
    try:
        wait_for(lambda: bridge.connected, what="connected")
        nats_server.kill()
        wait_for(lambda: not bridge.connected, what="disconnected")
        seq = 1
        for _ in range(8):  # 8 x ~0.5 MiB into a 1 MiB buffer
            bridge.write(batch(seq))
            seq += 20
        wait_for(lambda: bridge.stats.dropped >= 5, what="drops counted")
        nats_server.start()
        wait_for(lambda: bridge.connected, what="reconnected")
        acked = bridge.stats.acked
        bridge.write(batch(seq))
        wait_for(lambda: bridge.stats.acked >= acked + 20, what="a batch after the outage")
    finally:
        bridge.close()


def test_check_config_hides_the_bridge_secrets(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """`check-config` prints bridge.nats without its password, token or URL password."""
    from relay.cli import main

    cfg = tmp_path / "relay.yaml"
    cfg.write_text("bridge:\n  nats:\n    url: [nats://relay:s3cret@127.0.0.1:4222]\n"
                   "    password: s3cret\n    token: t0ken\n")
    assert 0 == main(["check-config", str(cfg)])
    out = capsys.readouterr().out
    assert "s3cret" not in out and "t0ken" not in out
    assert "nats://relay:***@127.0.0.1:4222" in out
