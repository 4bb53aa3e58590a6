"""Load: many subscribers on the full-market stream, and one that stops reading.

``python -m relay.bench load [--subscribers 50] [--seconds 15] [--stall 40] [--send-buffer 256]``

A relay subprocess (simulator, full market) publishes on loopback. Phases, in one run:

1. no subscriber: the relay's own CPU;
2. N raw subscribers that keep up: relay CPU per subscriber, their gaps (should be 0) and
   latency (publish time to arrival, p50/p99);
3. N-1 of them plus one that never reads: the relay's resident memory sampled every second
   (it must stay flat: NNG's per-subscriber queue is bounded and drops for that subscriber),
   the others' latency and gaps; at the end the stalled one reads again and reports the
   messages it lost (its gap).

Figures are noisy on a shared machine; compare phases of the same run. Linux only for the
CPU and memory figures (``/proc``).
"""

from __future__ import annotations

import argparse
import time
from typing import List, Optional, Sequence

from relay.bench._net import ProcStats, RawSubscriber, free_port, percentile, pump, start_relay

__all__ = ["main"]


def _config(port: int, securities: int, speed: float, send_buffer: int) -> str:
    return f"""
source:
  kind: simulator
  simulator: {{securities: {securities}, speed: {speed}, push_interval: 3.0}}
publish:
  addresses: ["tcp://127.0.0.1:{port}"]
  snapshot_address: null
  send_buffer: {send_buffer}
history: {{address: null}}
metrics: {{address: null}}
logging: {{level: warning}}
"""


def _wait_up(port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            sub = RawSubscriber("127.0.0.1", port)
        except OSError:
            time.sleep(0.2)
            continue
        try:
            messages, _ = pump([sub], 2.0)
        finally:
            sub.close()
        if messages:
            return
    raise SystemExit("the relay did not start")


def _cpu_rate(stats: ProcStats, subs: List[RawSubscriber], seconds: float) -> float:
    start_cpu, start = stats.cpu(), time.monotonic()
    if subs:
        pump(subs, seconds)
    else:
        time.sleep(seconds)
    return (stats.cpu() - start_cpu) / (time.monotonic() - start)


def _summary(subs: Sequence[RawSubscriber]) -> str:
    lat = [x for s in subs for x in s.latencies_ms]
    gaps = sum(s.gaps for s in subs)
    missed = sum(s.missed for s in subs)
    batches = min((s.batches for s in subs), default=0)
    return (f"batches>={batches} gaps={gaps} missed={missed} latency p50={percentile(lat, 50):.1f}"
            f" p99={percentile(lat, 99):.1f} ms")


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m relay.bench load", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--subscribers", type=int, default=50)
    p.add_argument("--seconds", type=float, default=15.0, help="length of each phase")
    p.add_argument("--securities", type=int, default=5200)
    p.add_argument("--speed", type=float, default=3.0,
                   help="simulated seconds per second (3: a push every second)")
    p.add_argument("--stall", type=float, default=40.0,
                   help="seconds one subscriber stops reading (long enough to overflow)")
    p.add_argument("--send-buffer", type=int, default=256, help="publish.send_buffer")
    args = p.parse_args(argv)

    port = free_port()
    proc = start_relay(_config(port, args.securities, args.speed, args.send_buffer))
    try:
        _wait_up(port)
        stats = ProcStats(proc.pid)
        idle = _cpu_rate(stats, [], args.seconds)
        print(f"relay: {args.securities} securities, speed {args.speed}; phases of "
              f"{args.seconds:.0f} s")
        print(f"  0 subscribers: relay CPU {idle * 100:.1f} % of a core, "
              f"RSS {stats.rss_mib():.0f} MiB")

        subs = [RawSubscriber("127.0.0.1", port) for _ in range(args.subscribers)]
        pump(subs, 2.0)  # everyone connected and past the first batch
        for s in subs:
            s.latencies_ms.clear()
            s.gaps = s.missed = 0
        before = subs[0].messages
        busy = _cpu_rate(stats, subs, args.seconds)
        rate = (subs[0].messages - before) / args.seconds
        per = (busy - idle) / max(1, len(subs))
        print(f"  {len(subs)} subscribers: relay CPU {busy * 100:.1f} % "
              f"({per * 100:.2f} % per subscriber), RSS {stats.rss_mib():.0f} MiB; "
              f"{_summary(subs)}; {rate:.1f} messages/s each")

        stalled, keep = subs[0], subs[1:]
        stalled.reading = False
        for s in keep:
            s.latencies_ms.clear()
            s.gaps = s.missed = 0
        stalled_from = stalled.last_seq
        rss: List[float] = []
        for _ in range(max(1, int(args.stall))):
            pump(subs, 1.0)
            rss.append(stats.rss_mib())
        quarters = " ".join(f"{rss[min(len(rss) - 1, i * len(rss) // 4)]:.0f}"
                            for i in range(4))
        print(f"  1 stalled + {len(keep)} reading for {len(rss)} s "
              f"(send_buffer {args.send_buffer}): relay RSS by quarter {quarters}, "
              f"max {max(rss):.0f}, last {rss[-1]:.0f} MiB; others {_summary(keep)}")
        stalled.reading = True
        stalled.gaps = stalled.missed = 0
        pump([stalled], 3.0)
        print(f"  stalled subscriber reads again: from seq {stalled_from} it missed "
              f"{stalled.missed} messages in {stalled.gaps} gap(s)")
        for s in subs:
            s.close()
    finally:
        proc.terminate()
        proc.wait(30)
    return 0
