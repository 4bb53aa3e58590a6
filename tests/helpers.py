"""Shared test helpers: unique addresses, a scripted source, a collecting sink."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import os
import socket
import subprocess
import sys
import tempfile
import threading
import uuid
from pathlib import Path
from typing import Any, AsyncIterator, Dict, Iterator, List, Mapping, Optional, Sequence

from relay.app import PublishedBatch

REPO = Path(__file__).resolve().parent.parent

REAL_TICK: Dict[str, Any] = {
    "time": 1733118954000, "lastPrice": 11.39, "open": 11.39, "high": 11.4, "low": 11.31,
    "lastClose": 11.38, "amount": 862127800.0, "volume": 758613, "pvolume": 75861284,
    "stockStatus": 3, "openInt": 13, "transactionNum": 37062, "lastSettlementPrice": 11.38,
    "settlementPrice": 0.0, "pe": 0.0,
    "askPrice": [11.4, 11.41, 11.42, 11.43, 11.44],
    "bidPrice": [11.39, 11.38, 11.370000000000001, 11.36, 11.35],
    "askVol": [1932, 2410, 1810, 1130, 2006], "bidVol": [313, 5219, 2996, 2420, 1638],
    "volRatio": 0.0, "speed1Min": 0.0, "speed5Min": 0.0,
}


def real_tick(**changes: Any) -> Dict[str, Any]:
    t = copy.deepcopy(REAL_TICK)
    t.update(changes)
    return t


@contextlib.contextmanager
def no_streams() -> Iterator[None]:
    """No console, as under pythonservice.exe or pythonw: sys.stdout = sys.stderr = None.

    Set inside the test body: pytest puts its capture back on sys.stdout after fixtures.
    """
    saved = sys.stdout, sys.stderr
    sys.stdout = sys.stderr = None  # type: ignore[assignment]
    try:
        yield
    finally:
        sys.stdout, sys.stderr = saved


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def tcp_address() -> str:
    """A free loopback port P whose port-plan services (P+1 .. P+3) are free as well."""
    for _ in range(50):
        port = free_tcp_port()
        if port + 3 <= 65535 and all(_bindable(port + k) for k in (1, 2, 3)):
            return f"tcp://127.0.0.1:{port}"
    return f"tcp://127.0.0.1:{free_tcp_port()}"


def ipc_address() -> str:
    return f"ipc://{os.path.join(tempfile.gettempdir(), f'relay-test-{uuid.uuid4().hex[:12]}.ipc')}"


class ScriptedSource:
    """A source that yields the given batches, then waits until closed."""

    kind = "simulator"

    def __init__(self, batches: Sequence[Mapping[str, Any]], names: Optional[Dict[str, str]] = None,
                 *, finish: bool = False, delay: float = 0.0,
                 gate: Optional[threading.Event] = None) -> None:
        self._batches = list(batches)
        self._names = names or {}
        self._finish = finish
        self._delay = delay
        self._gate = gate  # when given, nothing is yielded until it is set
        self._closed: Optional[asyncio.Event] = None  # made inside the loop (Python 3.9)
        self.started = False
        self.close_calls = 0

    @property
    def names(self) -> Mapping[str, str]:
        return self._names

    @property
    def connected(self) -> bool:
        return self.started and not (self._closed is not None and self._closed.is_set())

    async def start(self) -> None:
        self._closed = asyncio.Event()
        self.started = True

    async def batches(self) -> AsyncIterator[Dict[str, Any]]:
        assert self._closed is not None
        while self._gate is not None and not self._gate.is_set():
            if self._closed.is_set():
                return
            await asyncio.sleep(0.01)
        for batch in self._batches:
            if self._closed.is_set():
                return
            if self._delay:
                await asyncio.sleep(self._delay)
            yield dict(batch)
        if not self._finish:
            await self._closed.wait()

    async def close(self) -> None:
        self.close_calls += 1
        if self._closed is not None:
            self._closed.set()


class CollectingSink:
    """Keeps every published batch; records the lifecycle calls."""

    def __init__(self) -> None:
        self.batches: List[PublishedBatch] = []
        self.calls: List[str] = []

    def start(self) -> None:
        self.calls.append("start")

    def write(self, batch: PublishedBatch) -> None:
        self.batches.append(batch)

    def close(self) -> None:
        self.calls.append("close")


def relay_env() -> Dict[str, str]:
    """The environment for a relay subprocess: this checkout importable, output unbuffered."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def relay_command(tmp_path: Path, *args: str, quiet: bool = False) -> subprocess.Popen[str]:
    """``python -m relay ARGS`` as a user runs it, in ``tmp_path``; output piped (or dropped)."""
    out = subprocess.DEVNULL if quiet else subprocess.PIPE
    return subprocess.Popen([sys.executable, "-m", "relay", *args], stdout=out, stderr=out,
                            text=True, env=relay_env(), cwd=tmp_path)


def run_relay_with(tmp_path: Path, config: str, *args: str, name: str = "relay",
                   quiet: bool = False) -> subprocess.Popen[str]:
    """``qmt-relay run`` with ``config`` written to ``tmp_path/NAME.yaml``, plus ``args``."""
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(config)
    return relay_command(tmp_path, "run", "--config", str(cfg), *args, quiet=quiet)
