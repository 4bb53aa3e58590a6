"""Hostile peers against a running relay: every service keeps serving everyone else.

One relay subprocess (simulator, fast pushes) serves a well-behaved subscriber for the whole
module while the tests throw garbage at its stream (PUB), snapshot and history (REP) and
metrics (HTTP) ports. At the end
the good subscriber must have seen no gap (nothing it should have received was lost, so
publishing was never held up into dropping), the stream must have kept advancing during each
attack (seq grew), and the relay must still answer, log no service failure, and stop cleanly.
"""

from __future__ import annotations

import contextlib
import random
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, List, NamedTuple

import pytest
from helpers import free_tcp_port, tcp_address
from hostile import (
    SP_REQ,
    SP_SUB,
    connect,
    frame,
    log_events,
    read_until_closed,
    snapshot_request,
    start_relay,
    wait_for_heartbeat,
)

from relay.client import Subscriber, fetch_snapshot
from relay.client._history import decode_reply, encode_request
from relay.client._transport import request as nng_request

SECURITIES = 200
RNG_SEED = 20240601


class Target(NamedTuple):
    proc: subprocess.Popen[str]
    publish: str
    snapshot: str
    history: str
    metrics: str
    good: Subscriber
    seqs: List[int]


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    """The relay under attack, and a subscriber that reads everything it publishes."""
    tmp = tmp_path_factory.mktemp("abuse")
    procs: List[subprocess.Popen[str]] = []
    publish, snapshot, history = tcp_address(), tcp_address(), tcp_address()
    metrics = f"http://127.0.0.1:{free_tcp_port()}"
    proc = start_relay(Path(tmp), procs, publish, snapshot, securities=SECURITIES,
                       push_interval=0.3, history=history, metrics=metrics)
    wait_for_heartbeat(publish)
    seqs: List[int] = []
    good = Subscriber(publish, heartbeat_timeout=None, connect_timeout=10)

    def read() -> None:
        for batch in good:
            if batch.last_seq is not None:
                seqs.append(batch.last_seq)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        yield Target(proc, publish, snapshot, history, metrics.replace("http://", "tcp://"),
                     good, seqs)
    finally:
        good.close()
        reader.join(10)
        if proc.poll() is None:
            proc.kill()
        proc.communicate()  # closes its pipes too


def advancing(relay: Target, attack: Callable[[], Any]) -> None:
    """Run ``attack``; then the good subscriber must receive a batch published after it."""
    before = relay.seqs[-1] if relay.seqs else 0
    attack()
    assert relay.proc.poll() is None, "the relay died"
    deadline = time.monotonic() + 60
    while not relay.seqs or relay.seqs[-1] <= before:
        assert time.monotonic() < deadline, "the stream stopped"
        time.sleep(0.05)


def silent_connections(url: str, n: int) -> List[socket.socket]:
    return [connect(url) for _ in range(n)]


def test_connections_that_never_speak(relay: Target) -> None:
    """Hundreds of idle TCP connections on every port change nothing for others."""
    idle: List[socket.socket] = []

    def attack() -> None:
        for url in (relay.publish, relay.snapshot, relay.history, relay.metrics):
            idle.extend(silent_connections(url, 40))
        assert SECURITIES == len(fetch_snapshot(relay.snapshot, timeout=20).records)
        assert history_answers(relay)
        assert metrics_answer(relay)

    try:
        advancing(relay, attack)
    finally:
        for s in idle:
            s.close()


BAD_HANDSHAKES = [
    b"",                                       # connect and close
    b"\x00SP",                                 # truncated header
    b"\x00SP\x00\x00\x20\x00\x00",             # PUB talking to PUB / REP
    b"\x00SP\x00\x00\x21\x01\x00",             # reserved bytes set
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",      # the wrong protocol entirely
    b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1",   # a TLS ClientHello on a plain port
]


@pytest.mark.parametrize("port", ["publish", "snapshot", "history", "metrics"])
def test_wrong_and_truncated_handshakes(relay: Target, port: str) -> None:
    """Bad SP headers and foreign protocols are dropped; nobody else notices."""
    url = getattr(relay, port)

    def attack() -> None:
        for garbage in BAD_HANDSHAKES:
            with connect(url) as s:
                s.sendall(garbage)
                read_until_closed(s, timeout=0.3, limit=4096)

    advancing(relay, attack)


@pytest.mark.parametrize("port", ["publish", "snapshot", "history", "metrics"])
def test_random_bytes_on_raw_sockets(relay: Target, port: str) -> None:
    """Random bytes, before and after a valid handshake, do not hurt the service."""
    url = getattr(relay, port)
    rng = random.Random(RNG_SEED)
    header = {"publish": SP_SUB, "metrics": b"GET /metrics HTTP/1.1\r\n"}.get(port, SP_REQ)

    def attack() -> None:
        for i in range(10):
            with connect(url, timeout=2) as s:
                payload = bytes(rng.getrandbits(8) for _ in range(rng.choice([1, 7, 8, 9, 4096])))
                with contextlib.suppress(OSError):  # the relay may hang up on us first
                    s.sendall((header if i % 2 else b"") + payload)
                read_until_closed(s, timeout=0.2, limit=4096)

    advancing(relay, attack)


def _send_frames(url: str, header: bytes, bodies: List[bytes]) -> None:
    with connect(url, timeout=2) as s:
        try:
            s.sendall(header)
            for body in bodies:
                s.sendall(frame(body))
        except OSError:
            pass
        read_until_closed(s, timeout=0.5, limit=4096)


def test_a_peer_sending_to_the_stream(relay: Target) -> None:
    """A subscriber that writes (empty, tiny, huge, lying lengths) is dropped or ignored."""

    def attack() -> None:
        _send_frames(relay.publish, SP_SUB, [b"", b"x", b":spot:[start spot]"])
        _send_frames(relay.publish, SP_SUB, [b"\x00" * (2 << 20)])
        with connect(relay.publish, timeout=2) as s:  # a length far beyond anything
            s.sendall(SP_SUB + struct.pack(">Q", (1 << 63) + 5) + b"abc")
            read_until_closed(s, timeout=0.5, limit=4096)

    advancing(relay, attack)


def test_bad_snapshot_requests(relay: Target) -> None:
    """Empty, unknown, huge and malformed requests get an error reply or are dropped."""
    assert snapshot_request(relay.snapshot, body=b"") == b":relay:error:unknown request"
    assert snapshot_request(relay.snapshot, body=b"snapshotX") == b":relay:error:unknown request"
    rng = random.Random(RNG_SEED)
    for _ in range(10):
        reply = snapshot_request(relay.snapshot, body=rng.randbytes(rng.randint(1, 900)))
        assert reply is None or reply.startswith(b":relay:error:")
    # beyond the request size limit: the connection is dropped, no reply
    assert snapshot_request(relay.snapshot, body=b"s" * (1 << 20), timeout=3) is None

    def attack() -> None:
        _send_frames(relay.snapshot, SP_REQ, [b"", b"\x00\x00", b"\x80\x00\x00\x07"])  # no id
        with connect(relay.snapshot, timeout=2) as s:  # claims 1 GiB, sends 3 bytes, waits
            s.sendall(SP_REQ + struct.pack(">Q", 1 << 30) + b"abc")
            assert SECURITIES == len(fetch_snapshot(relay.snapshot, timeout=20).records)

    advancing(relay, attack)


def history_answers(relay: Target) -> bool:
    """A valid history request still gets a proper (non-error) reply."""
    body = nng_request(relay.history, encode_request("files"), timeout=20,
                       max_message_bytes=1 << 24)
    return not decode_reply(body).error


def metrics_answer(relay: Target) -> bool:
    with connect(relay.metrics, timeout=20) as s:
        s.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
        return read_until_closed(s, timeout=20).startswith(b"HTTP/1.")


def test_bad_history_requests(relay: Target) -> None:
    """Empty, random, oversized and wrong-shaped history requests: error replies or drops."""
    rng = random.Random(RNG_SEED)
    bodies = [b"", b"{", b"[]", b'{"v": 1}', b'{"v": 1, "op": "nope"}',
              b'{"v": 1, "op": "bars", "market": "SH", "period": "day", "code": 5}',
              b'{"v": 99, "op": "files"}', b'{"v": 1, "op": "files", "x": "\xe6\xb5\xa6"}',
              *(rng.randbytes(rng.randint(1, 600)) for _ in range(8))]

    def attack() -> None:
        for body in bodies:
            reply = snapshot_request(relay.history, body=body, timeout=10)
            assert reply is not None  # every bad request is answered (with an error)
            assert decode_reply(reply).error, body
        # beyond history.max_request_bytes (1 MiB): refused or dropped, never served
        big = snapshot_request(relay.history, body=b"x" * (2 << 20), timeout=5)
        assert big is None or big[:1] != b""
        assert history_answers(relay)

    advancing(relay, attack)


def test_floods_of_connections_and_requests(relay: Target) -> None:
    """Connect/close floods on both ports and parallel request floods: all still served."""
    served: List[int] = []
    failed: List[BaseException] = []

    def requester() -> None:
        for _ in range(8):
            try:
                reply = snapshot_request(relay.snapshot, timeout=30)
            except OSError as exc:
                failed.append(exc)
                continue
            if reply is not None and reply.startswith(b":relay:snapshot:"):
                served.append(1)

    def attack() -> None:
        threads = [threading.Thread(target=requester) for _ in range(4)]
        for t in threads:
            t.start()
        for _ in range(60):
            for url in (relay.publish, relay.snapshot, relay.history, relay.metrics):
                with contextlib.suppress(OSError):
                    connect(url, timeout=2).close()
        for t in threads:
            t.join(120)

    advancing(relay, attack)
    assert 32 == len(served), failed


def test_relay_survived_everything(relay: Target) -> None:
    """After every attack: no gap for the good subscriber, no failure, a clean stop."""
    assert relay.good.stats.gaps == 0, relay.good.stats
    assert relay.good.stats.decode_errors == 0
    assert len(relay.seqs) > 5
    assert SECURITIES == len(fetch_snapshot(relay.snapshot, timeout=20).records)
    assert history_answers(relay)
    assert metrics_answer(relay)
    relay.proc.terminate()
    out, err = relay.proc.communicate(timeout=30)
    assert 0 == relay.proc.returncode
    assert "Traceback" not in err
    events = log_events(out)
    bad = [e for e in events if e.get("level") in ("error", "critical")]
    assert [] == bad
