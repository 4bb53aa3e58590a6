"""Operations benchmark: ``python -m relay.bench ops [--records N] [--rounds N]``.

Measures, in one run:

* the hot-path cost of metrics: batches/second through ``Relay.process`` (normalise, encode,
  publish) with the operations side off and on, interleaved round by round (order
  alternating) so both sample the same machine state, best round of each; for a full-market
  batch and for a typical small push; and the bookkeeping call alone on a full batch;
* the event-loop cost of one status snapshot (``metrics.sample_interval``, default 1 s);
* ``/metrics`` and ``/status`` requests/second over loopback (one keep-alive client).

Prints a report; the last line is one JSON object. Nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import socket
import time
from typing import Any, AsyncIterator, Dict, List, Mapping, Optional, Sequence

from relay.app import Relay
from relay.bench.spot import simulated_ticks
from relay.config import parse_config

__all__ = ["main"]


class _IdleSource:
    """A source that is connected and yields nothing: the benchmark calls process() itself."""

    kind = "simulator"

    def __init__(self, names: Mapping[str, str]) -> None:
        self._names = names
        self._closed = False

    @property
    def names(self) -> Mapping[str, str]:
        return self._names

    @property
    def connected(self) -> bool:
        return not self._closed

    async def start(self) -> None:
        return None

    async def batches(self) -> AsyncIterator[Dict[str, Dict[str, Any]]]:
        while not self._closed:
            await asyncio.sleep(0.05)
            if False:  # pragma: no cover - makes this an async generator
                yield {}

    async def close(self) -> None:
        self._closed = True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _relay(names: Mapping[str, str], *, metrics: bool) -> Relay:
    port = _free_port()
    config = parse_config({
        "publish": {"addresses": [f"tcp://127.0.0.1:{port}"], "snapshot_address": None},
        "metrics": {"address": f"http://127.0.0.1:{_free_port()}" if metrics else None},
    })
    return Relay(config, source=_IdleSource(names))


def _rate(relay: Relay, batch: Dict[str, Dict[str, Any]], n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        relay.process(batch)
    return n / (time.perf_counter() - start)


def _http_rate(host: str, port: int, path: str, seconds: float) -> float:
    conn = http.client.HTTPConnection(host, port, timeout=10)
    done = 0
    start = time.perf_counter()
    try:
        while time.perf_counter() - start < seconds:
            conn.request("GET", path)
            response = conn.getresponse()
            response.read()
            done += 1
    finally:
        conn.close()
    return done / (time.perf_counter() - start)


def _median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


async def _run(args: argparse.Namespace) -> Dict[str, Any]:
    full, names = simulated_ticks(args.records)
    small = dict(list(full.items())[: args.push])
    off, on = _relay(names, metrics=False), _relay(names, metrics=True)
    for relay in (off, on):
        await relay.startup()
    try:
        results: Dict[str, Any] = {}
        for label, batch, n in (("full", full, args.full_batches),
                                ("push", small, args.push_batches)):
            rates: Dict[str, List[float]] = {"off": [], "on": []}
            _rate(off, batch, 2)
            _rate(on, batch, 2)
            for round_ in range(args.rounds):  # interleaved, order alternating: both see
                pair = [("off", off), ("on", on)]  # the same machine state
                for name, relay in pair if round_ % 2 else reversed(pair):
                    rates[name].append(_rate(relay, batch, n))
            # Best round of each (as relay.bench spot does): the least disturbed by others.
            r_off, r_on = max(rates["off"]), max(rates["on"])
            results[label] = {"records": len(batch), "off_batches_s": round(r_off, 1),
                              "on_batches_s": round(r_on, 1),
                              "overhead_pct": round((r_off / r_on - 1.0) * 100.0, 2)}
        cols = on._normaliser.normalise_batch(full).columns
        assert cols is not None and on.ops is not None
        start = time.perf_counter()
        for _ in range(20):
            on.ops.observe_batch(full.keys(), cols.market, time.time(), 0.01)
        results["observe_full_ms"] = round((time.perf_counter() - start) / 20 * 1000.0, 3)
        samples = []
        for _ in range(args.rounds * 5):
            start = time.perf_counter()
            on._sample()
            samples.append(time.perf_counter() - start)
        results["sample_ms"] = round(_median(samples) * 1000.0, 3)
        ops = on.ops
        assert ops is not None and ops.url is not None
        host, port = ops.url[len("http://"):].rsplit(":", 1)
        loop = asyncio.get_running_loop()
        for path in ("/metrics", "/status"):
            rate = await loop.run_in_executor(None, _http_rate, host, int(port), path,
                                              args.http_seconds)
            results[f"{path[1:]}_requests_s"] = round(rate, 1)
        return results
    finally:
        for relay in (off, on):
            await relay.shutdown()


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m relay.bench ops", description=__doc__.split(
        "\n\n")[0])
    p.add_argument("--records", type=int, default=5000, help="securities in a full batch")
    p.add_argument("--push", type=int, default=300, help="ticks in a small push")
    p.add_argument("--rounds", type=int, default=9, help="interleaved rounds (best kept)")
    p.add_argument("--full-batches", type=int, default=5, help="full batches per round")
    p.add_argument("--push-batches", type=int, default=40, help="small pushes per round")
    p.add_argument("--http-seconds", type=float, default=2.0, help="seconds per HTTP path")
    args = p.parse_args(argv)
    from relay.config import LoggingConfig  # noqa: PLC0415
    from relay.logs import configure_logging  # noqa: PLC0415

    configure_logging(LoggingConfig(level="warning"))   # keep the report readable
    results = asyncio.run(_run(args))
    for label in ("full", "push"):
        r = results[label]
        print(f"{label:>5} batch ({r['records']} records): metrics off {r['off_batches_s']:>8} "
              f"batches/s, on {r['on_batches_s']:>8} batches/s, overhead {r['overhead_pct']}%")
    print(f"metrics bookkeeping of one full batch: {results['observe_full_ms']} ms")
    print(f"status snapshot on the loop: {results['sample_ms']} ms (every sample_interval)")
    print(f"/metrics: {results['metrics_requests_s']} requests/s, "
          f"/status: {results['status_requests_s']} requests/s (one keep-alive client)")
    print(json.dumps(results))
    return 0
