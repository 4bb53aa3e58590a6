"""Abuse: what the relay still serves while hostile peers hammer it.

``python -m relay.bench abuse [--seconds 15] [--attackers 2] [--securities 1000]``

A relay subprocess (simulator) publishes on loopback with its snapshot service. In three
phases of equal length (quiet, abuse, quiet again) a well-behaved client fetches snapshots
in a loop (requests/s served) and a raw subscriber reads the stream (latency from publish
time to arrival, p50/p99, and seq gaps). During the abuse phase, attacker processes open
connections that never speak, send bad and truncated handshakes, random bytes, writes to the
PUB socket, empty/random/oversized snapshot requests and connect/close floods, as fast as
they can. Figures are noisy on a shared machine; compare the phases of one run.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import random
import socket
import struct
import threading
import time
from typing import Any, List, Optional, Sequence

from relay.bench._net import ProcStats, RawSubscriber, free_port, percentile, pump, start_relay

__all__ = ["main"]

_SP_SUB = b"\x00SP\x00\x00\x21\x00\x00"
_SP_REQ = b"\x00SP\x00\x00\x30\x00\x00"


def _config(port: int, snapshot: int, securities: int) -> str:
    return f"""
source:
  kind: simulator
  simulator: {{securities: {securities}, speed: 3.0, push_interval: 3.0}}
publish:
  addresses: ["tcp://127.0.0.1:{port}"]
  snapshot_address: "tcp://127.0.0.1:{snapshot}"
history: {{address: null}}
metrics: {{address: null}}
logging: {{level: error}}
"""


def _attack(ports: Sequence[int], seconds: float, seed: int, done: Any) -> None:
    """One attacker process: cycles through every kind of abuse until time is up."""
    rng = random.Random(seed)
    idle: List[socket.socket] = []
    deadline = time.monotonic() + seconds
    count = 0

    def conn(port: int) -> socket.socket:
        s = socket.create_connection(("127.0.0.1", port), timeout=1)
        s.settimeout(0.2)
        return s

    while time.monotonic() < deadline:
        port = rng.choice(ports)
        kind = rng.randrange(7)
        try:
            if kind == 0 and len(idle) < 200:          # connections that never speak
                idle.append(conn(port))
            elif kind == 1:                           # connect / close flood
                for _ in range(20):
                    conn(port).close()
            else:
                with conn(port) as s:
                    header = _SP_SUB if port == ports[0] else _SP_REQ
                    if kind == 2:                     # bad or truncated handshake
                        s.sendall(rng.choice([b"\x00SP", b"\x00SP\x00\x00\x20\x00\x00",
                                              b"GET / HTTP/1.0\r\n\r\n"]))
                    elif kind == 3:                   # random bytes
                        s.sendall(rng.randbytes(rng.choice([1, 9, 4096, 65536])))
                    elif kind == 4:                   # frames after a valid handshake
                        s.sendall(header + struct.pack(">Q", 5) + b"\x80\x00\x00\x01x")
                    elif kind == 5:                   # an empty request / message
                        s.sendall(header + struct.pack(">Q", 4) + b"\x80\x00\x00\x02")
                    else:                             # a lying length
                        s.sendall(header + struct.pack(">Q", 1 << 40) + b"abc")
                    with contextlib.suppress(OSError):
                        s.recv(4096)
            count += 1
        except OSError:
            count += 1
    for s in idle:
        s.close()
    done.put(count)


def _requester(port: int, stop: threading.Event, served: List[int]) -> None:
    from relay.client import TransportError, fetch_snapshot  # noqa: PLC0415

    while not stop.is_set():
        try:
            fetch_snapshot(f"tcp://127.0.0.1:{port}", timeout=10)
        except (TransportError, ValueError):
            continue
        served.append(1)


def _phase(name: str, stats: ProcStats, port: int, snapshot: int, seconds: float,
           attackers: int, seed: int) -> None:
    sub = RawSubscriber("127.0.0.1", port)
    pump([sub], 1.0)
    sub.latencies_ms.clear()
    sub.gaps = sub.missed = 0
    stop = threading.Event()
    served: List[int] = []
    thread = threading.Thread(target=_requester, args=(snapshot, stop, served), daemon=True)
    ctx = multiprocessing.get_context("spawn")
    done = ctx.Queue()
    procs = [ctx.Process(target=_attack, args=((port, snapshot), seconds, seed + i, done))
             for i in range(attackers)]
    for p in procs:
        p.start()
    thread.start()
    cpu = stats.cpu()
    pump([sub], seconds)
    cpu = stats.cpu() - cpu
    stop.set()
    thread.join(30)
    attacks = sum(done.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(30)
    lat = sub.latencies_ms
    print(f"  {name:<7} snapshots served {len(served) / seconds:6.1f}/s; stream latency "
          f"p50 {percentile(lat, 50):6.1f} p99 {percentile(lat, 99):6.1f} ms, "
          f"gaps {sub.gaps}; abusive actions {attacks / seconds:5.0f}/s; "
          f"relay CPU {cpu / seconds * 100:3.0f} %")
    sub.close()


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m relay.bench abuse", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=15.0, help="length of each phase")
    p.add_argument("--attackers", type=int, default=2, help="attacker processes")
    p.add_argument("--securities", type=int, default=1000)
    args = p.parse_args(argv)
    port, snapshot = free_port(), free_port()
    proc = start_relay(_config(port, snapshot, args.securities))
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                sub = RawSubscriber("127.0.0.1", port)
                got, _ = pump([sub], 2.0)
                sub.close()
                if got:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("the relay did not start")
            time.sleep(0.2)
        print(f"relay: {args.securities} securities; phases of {args.seconds:.0f} s, "
              f"{args.attackers} attacker processes")
        stats = ProcStats(proc.pid)
        for name, attackers in (("quiet", 0), ("abuse", args.attackers), ("quiet", 0)):
            _phase(name, stats, port, snapshot, args.seconds, attackers, 1)
        alive = proc.poll() is None
        print(f"  relay still running: {alive}")
    finally:
        proc.terminate()
        proc.wait(30)
    return 0
