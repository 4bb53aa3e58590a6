"""Helpers for the subscriber-library tests: records, messages, a pynng publisher peer."""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, Iterator, List, Optional, Sequence

import pynng

from relay.client import Subscriber
from relay.encode import SpotEncoder
from relay.records import SpotRecord
from relay.wire import END, START, encode_heartbeat


def record(code: str = "600000", market: str = "SH", close: float = 11.39,
           time_ms: Optional[int] = 1733118954000) -> SpotRecord:
    return SpotRecord(market, code, f"N{code}", "2024-12-02 13:55:54", 11.38, 11.39, 11.4,
                      11.31, close, 86212.78, 758612.84, (11.39, 11.38, 11.37, 11.36, 11.35),
                      (313.0, 5219.0, 2996.0, 2420.0, 1638.0),
                      (11.4, 11.41, 11.42, 11.43, 11.44),
                      (1932.0, 2410.0, 1810.0, 1130.0, 2006.0), time_ms, 3, 37062)


def messages(records: Sequence[SpotRecord], seq: int, run_id: str = "run-a",
             max_bytes: int = 512 * 1024) -> List[bytes]:
    return SpotEncoder(run_id, "simulator", max_bytes).encode(records, first_seq=seq,
                                                                publish_time_ms=1)


class Peer:
    """A pynng Pub0 the subscriber under test connects to."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.pipes = 0
        self.joined = threading.Event()
        self.sock = pynng.Pub0()
        self.sock.add_post_pipe_connect_cb(self._on_pipe)
        self.sock.listen(url)

    def _on_pipe(self, _pipe: Any) -> None:
        self.pipes += 1
        self.joined.set()

    def batch(self, *parts: bytes) -> None:
        self.sock.send(START)
        for part in parts:
            self.sock.send(part)
        self.sock.send(END)

    def send(self, msg: bytes) -> None:
        self.sock.send(msg)

    def heartbeat(self, run_id: str = "run-a", seq: int = 0) -> None:
        self.sock.send(encode_heartbeat({"run_id": run_id, "seq": seq}))

    def close(self) -> None:
        self.sock.close()


def wait_joined(sub: Subscriber, peer: Peer, pipes: int = 1, timeout: float = 10.0) -> None:
    """Drive ``sub`` until the peer has seen ``pipes`` connections."""
    deadline = time.monotonic() + timeout
    while peer.pipes < pipes:
        assert time.monotonic() < deadline, "subscriber never connected"
        sub.next_update(0.05)
    time.sleep(0.05)  # pynng starts sending on a new pipe right after its callback


def take(source: Callable[[], Any], until: Callable[[List[Any]], bool],
         timeout: float = 15.0) -> List[Any]:
    """Collect non-None results of ``source()`` until ``until(items)`` holds."""
    out: List[Any] = []
    deadline = time.monotonic() + timeout
    while not until(out):
        assert time.monotonic() < deadline, f"condition not reached; got {out!r}"
        item = source()
        if item is not None:
            out.append(item)
    return out


def items_of(sub: Subscriber) -> Iterator[Any]:
    while True:
        item = sub.next_update(0.1)
        if item is not None:
            yield item
