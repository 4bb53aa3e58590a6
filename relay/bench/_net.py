"""Shared pieces of the network benchmarks (load, abuse): a relay subprocess, its CPU and
memory, and many cheap raw subscribers multiplexed on one thread.

A raw subscriber speaks NNG's SP over TCP itself and reads only each message's header
fields (``seq``, ``publish_time_ms``) with the generated accessors, so fifty of them fit in
one Python thread and what is measured is the relay, not our decoding.
"""

from __future__ import annotations

import importlib
import os
import selectors
import socket
import struct
import subprocess
import sys
import tempfile
import time
from typing import Any, List, Optional, Sequence, Tuple

from relay.wire import END, SPOT_PREFIX, START

__all__ = ["ProcStats", "RawSubscriber", "free_port", "percentile", "pump", "start_relay"]

_SP_SUB = b"\x00SP\x00\x00\x21\x00\x00"
_LENGTH = struct.Struct(">Q")
_PREFIX = len(SPOT_PREFIX)
# flatc's generated accessors (untyped): reading two header fields costs next to nothing
SpotList: Any = importlib.import_module("relay._flatgen.hikyuu.flat.SpotList").SpotList


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def start_relay(config: str, directory: Optional[str] = None) -> subprocess.Popen[bytes]:
    """``python -m relay run`` with ``config`` (YAML text); its output is discarded."""
    where = directory or tempfile.mkdtemp(prefix="relay-bench-")
    path = os.path.join(where, "relay.yaml")
    with open(path, "w", encoding="utf-8") as out:
        out.write(config)
    return subprocess.Popen([sys.executable, "-m", "relay", "run", "--config", path],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=where)


class ProcStats:
    """CPU seconds and resident memory of a process, from ``/proc`` (Linux only)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def cpu(self) -> float:
        try:
            with open(f"/proc/{self.pid}/stat", encoding="ascii") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            return float("nan")
        return (int(fields[11]) + int(fields[12])) / self._tick

    def rss_mib(self) -> float:
        try:
            with open(f"/proc/{self.pid}/status", encoding="ascii") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) / 1024
        except OSError:
            pass
        return float("nan")


class RawSubscriber:
    """One SUB connection read without decoding records: counts seq gaps and latency."""

    def __init__(self, host: str, port: int, *, reading: bool = True) -> None:
        self.sock = socket.create_connection((host, port), timeout=10)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
        self.sock.sendall(_SP_SUB)
        self.sock.setblocking(False)
        self.reading = reading
        self._buf = bytearray()
        self._header = False
        self.last_seq: Optional[int] = None
        self.messages = 0
        self.batches = 0
        self.gaps = 0
        self.missed = 0
        self.latencies_ms: List[float] = []

    def on_readable(self) -> bool:
        """Read what is there; False when the relay closed the connection."""
        try:
            chunk = self.sock.recv(1 << 20)
        except BlockingIOError:
            return True
        except OSError:
            return False
        if not chunk:
            return False
        buf = self._buf
        buf += chunk
        if not self._header:
            if len(buf) < 8:
                return True
            del buf[:8]
            self._header = True
        pos = 0
        now_ms = time.time() * 1000
        while len(buf) - pos >= 8:
            (size,) = _LENGTH.unpack_from(buf, pos)
            if len(buf) - pos - 8 < size:
                break
            body = bytes(buf[pos + 8:pos + 8 + size])
            pos += 8 + size
            self._message(body, now_ms)
        del buf[:pos]
        return True

    def _message(self, body: bytes, now_ms: float) -> None:
        self.messages += 1
        if not body.startswith(SPOT_PREFIX):
            return
        if body == START:
            return
        if body == END:
            self.batches += 1
            return
        head = SpotList.GetRootAs(body, _PREFIX)
        seq = head.Seq()
        if self.last_seq is not None and seq > self.last_seq + 1:
            self.gaps += 1
            self.missed += seq - self.last_seq - 1
        self.last_seq = seq
        self.latencies_ms.append(now_ms - head.PublishTimeMs())

    def close(self) -> None:
        self.sock.close()


def pump(subscribers: Sequence[RawSubscriber], seconds: float) -> Tuple[int, int]:
    """Read every reading subscriber for ``seconds``; returns (messages, closed connections)."""
    sel = selectors.DefaultSelector()
    for sub in subscribers:
        if sub.reading:
            sel.register(sub.sock, selectors.EVENT_READ, sub)
    before = sum(s.messages for s in subscribers)
    closed = 0
    deadline = time.monotonic() + seconds
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            for key, _ in sel.select(min(left, 0.2)):
                sub = key.data
                if not sub.on_readable():
                    sel.unregister(sub.sock)
                    closed += 1
    finally:
        sel.close()
    return sum(s.messages for s in subscribers) - before, closed
