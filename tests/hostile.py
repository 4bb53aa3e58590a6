"""Raw-socket peers for the hostile-network tests: speak (or mangle) NNG's SP over TCP."""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from helpers import run_relay_with

SP_SUB = b"\x00SP\x00\x00\x21\x00\x00"
SP_REQ = b"\x00SP\x00\x00\x30\x00\x00"
HEARTBEAT = b":relay:heartbeat:"


def split(url: str) -> Tuple[str, int]:
    host, _, port = url.split("://", 1)[1].rpartition(":")
    return host.strip("[]"), int(port)


def connect(url: str, *, source: str = "127.0.0.1", timeout: float = 5.0) -> socket.socket:
    """A plain TCP connection to ``url`` from the loopback address ``source``."""
    return socket.create_connection(split(url), timeout=timeout, source_address=(source, 0))


def read_until_closed(sock: socket.socket, timeout: float = 5.0, limit: int = 1 << 20) -> bytes:
    """Everything the peer sends until it closes (or ``timeout`` of silence, or ``limit``)."""
    sock.settimeout(timeout)
    out = bytearray()
    try:
        while len(out) < limit:
            chunk = sock.recv(65536)
            if not chunk:
                break
            out += chunk
    except (socket.timeout, ConnectionResetError):
        pass
    return bytes(out)


def recv_frame(sock: socket.socket, timeout: float = 10.0) -> Optional[bytes]:
    """One SP message (8-byte length + body), or None if the peer closed first."""
    sock.settimeout(timeout)
    head = _exact(sock, 8)
    if head is None:
        return None
    (size,) = struct.unpack(">Q", head)
    return _exact(sock, size)


def _exact(sock: socket.socket, n: int) -> Optional[bytes]:
    buf = bytearray()
    while len(buf) < n:
        try:
            chunk = sock.recv(n - len(buf))
        except ConnectionResetError:
            return None
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def frame(body: bytes) -> bytes:
    return struct.pack(">Q", len(body)) + body


def snapshot_request(url: str, *, source: str = "127.0.0.1", body: bytes = b"snapshot",
                     timeout: float = 10.0) -> Optional[bytes]:
    """One REQ over a raw socket; the reply body (request id stripped), or None if refused."""
    with connect(url, source=source, timeout=timeout) as sock:
        sock.sendall(SP_REQ)
        header = _exact(sock, 8)
        if header is None:
            return None
        try:
            sock.sendall(frame(b"\x80\x00\x00\x01" + body))
        except (BrokenPipeError, ConnectionResetError):
            return None       # refused mid-send (an oversized request): dropped, no reply
        reply = recv_frame(sock, timeout)
        return None if reply is None else reply[4:]


def start_relay(tmp_path: Path, procs: List[subprocess.Popen[str]], publish: str,
                snapshot: str, extra: str = "", securities: int = 50,
                push_interval: float = 0.2, name: str = "relay", history: Optional[str] = None,
                metrics: Optional[str] = None) -> subprocess.Popen[str]:
    """A simulator relay subprocess publishing fast, with stdout piped (JSON log lines).

    The history and metrics services are off unless their addresses are given.
    """
    services = (f"history: {{address: {json.dumps(history)}, dir: {json.dumps(str(tmp_path))}}}\n"
                f"metrics: {{address: {json.dumps(metrics)}}}\n")
    proc = run_relay_with(tmp_path, f"""
source:
  kind: simulator
  simulator: {{securities: {securities}, speed: 1.0, push_interval: {push_interval}}}
publish:
  addresses: ["{publish}"]
  snapshot_address: "{snapshot}"
  heartbeat_interval: 0.2
logging: {{format: json}}
{services}{extra}
""", name=name)
    procs.append(proc)
    return proc


def wait_for_heartbeat(url: str, timeout: float = 30.0, **kw: Any) -> Dict[str, Any]:
    """Dial ``url`` as a SUB until a heartbeat arrives; its JSON."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with connect(url, **kw) as sock:
                sock.sendall(SP_SUB)
                if _exact(sock, 8) is not None:
                    while True:
                        msg = recv_frame(sock, 5)
                        if msg is None:
                            break
                        if msg.startswith(HEARTBEAT):
                            beat: Dict[str, Any] = json.loads(msg[len(HEARTBEAT):])
                            return beat
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"no heartbeat from {url}")
        time.sleep(0.1)


def log_events(stdout: str) -> List[Dict[str, Any]]:
    """The JSON log lines of a relay's stdout."""
    events = []
    for raw in stdout.splitlines():
        line = raw.strip()
        if line.startswith("{"):
            try:
                events.append(json.loads(line))
            except ValueError:
                continue
    return events
