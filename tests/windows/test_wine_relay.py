"""`qmt-relay run` and `tail` on Windows CPython under Wine: TCP to Linux, ipc:// (named
pipes) between Windows processes, Ctrl-C, a cp1252 pipe."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
import uuid
from pathlib import Path
from typing import Any, Dict, List

from tests.helpers import relay_env, tcp_address
from tests.windows.winehelpers import Wine, relay_config


def native_tail(address: str, *args: str) -> subprocess.CompletedProcess[str]:
    """The Linux `qmt-relay tail`, as a subscriber on the other side of the wire."""
    return subprocess.run([sys.executable, "-m", "relay", "tail", address, *args],
                          capture_output=True, text=True, timeout=90, env=relay_env())


def json_rows(text: str) -> List[Dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def start_relay(wine: Wine, tmp_path: Path, config: str,
                procs: List[subprocess.Popen[bytes]], **kwargs: Any) -> subprocess.Popen[bytes]:
    cfg = tmp_path / "relay.yaml"
    cfg.write_text(config, encoding="utf-8")
    proc = wine.popen("-m", "relay", "run", "--config", wine.path(cfg), **kwargs)
    procs.append(proc)
    return proc


def test_run_publishes_to_a_linux_subscriber_over_tcp(
        wine: Wine, tmp_path: Path, wine_procs: List[subprocess.Popen[bytes]]) -> None:
    """The Windows relay publishes the simulator over TCP; the Linux tail decodes it."""
    address = tcp_address()
    proc = start_relay(wine, tmp_path, relay_config(address), wine_procs)
    tail = native_tail(address, "--json", "--count", "50")
    assert 0 == tail.returncode, tail.stderr
    rows = json_rows(tail.stdout)
    assert 50 == len(rows) and {"simulator"} == {r["source"] for r in rows}
    assert all(r["market"] in ("SH", "SZ", "BJ") and r["name"] for r in rows)
    assert proc.poll() is None


def test_ipc_between_two_windows_processes(
        wine: Wine, tmp_path: Path, wine_procs: List[subprocess.Popen[bytes]]) -> None:
    """ipc:// on Windows is a named pipe: a Windows tail reads a Windows relay through it."""
    address = f"ipc://qmt-relay-test-{uuid.uuid4().hex[:12]}"
    start_relay(wine, tmp_path, relay_config(address), wine_procs)
    tail = wine.relay("tail", address, "--json", "--count", "30")
    assert 0 == tail.returncode, tail.stderr
    rows = json_rows(tail.stdout)
    assert 30 == len(rows) and {"simulator"} == {r["source"] for r in rows}


def test_tail_json_into_a_cp1252_pipe_is_utf8(
        wine: Wine, tmp_path: Path, wine_procs: List[subprocess.Popen[bytes]]) -> None:
    """Windows CPython's pipe encoding is the ANSI code page (cp1252 here, PYTHONIOENCODING
    unset): `tail --json` still writes UTF-8 with the Chinese names; the table view writes
    '?' instead of dying on UnicodeEncodeError."""
    probe = wine.run("-c", "import sys; print(sys.stdout.encoding)")
    assert "cp1252" == probe.stdout.strip(), "the precondition: a cp1252 pipe"
    address = tcp_address()
    start_relay(wine, tmp_path, relay_config(address), wine_procs)
    codes = "000001.SH,399001.SZ,399006.SZ"       # 上证指数, 深证成指, 创业板指
    tail = wine.popen("-m", "relay", "tail", address, "--json", "--count", "3",
                      "--codes", codes)
    out, err = tail.communicate(timeout=90)
    assert 0 == tail.returncode, err
    rows = [json.loads(line) for line in out.decode("utf-8").splitlines()]
    assert 3 == len(rows)
    assert {r["name"] for r in rows} <= {"上证指数", "深证成指", "创业板指"}
    table = wine.relay("tail", address, "--count", "3", "--codes", codes)
    assert 0 == table.returncode, table.stderr
    lines = table.stdout.splitlines()
    assert 4 == len(lines) and all("????" in line for line in lines[1:])
    assert "Traceback" not in table.stderr


def _read_until(fd: int, buf: bytearray, token: bytes, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while token not in buf and time.monotonic() < end:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:      # the terminal closed: the process ended
                break
            if not chunk:
                break
            buf += chunk
    return token in buf


def test_ctrl_c_stops_gracefully(wine: Wine, tmp_path: Path,
                                 wine_procs: List[subprocess.Popen[bytes]]) -> None:
    """Ctrl-C typed on the relay's terminal: Wine turns it into CTRL_C_EVENT on the
    console, CPython into SIGINT, the relay into its graceful stop (exit 0, relay_stopped).

    The relay runs on a pseudo-terminal that is its controlling terminal, so the byte
    0x03 written to it is a real Ctrl-C: the terminal sends SIGINT to the foreground
    process group, and Wine delivers it to the Windows console process as a user's Ctrl-C.
    """
    address = tcp_address()
    cfg = tmp_path / "relay.yaml"
    cfg.write_text(relay_config(address, extra="logging:\n  format: json\n"),
                   encoding="utf-8")
    master, slave = pty.openpty()
    # A wide terminal, so that Wine's console does not wrap the JSON lines.
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 4000, 0, 0))

    def controlling_terminal() -> None:
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    proc = subprocess.Popen(["wine", str(wine.wp.python), "-m", "relay", "run", "--config",
                             wine.path(cfg)], stdin=slave, stdout=slave, stderr=slave,
                            env=wine.env(),
                            preexec_fn=controlling_terminal)  # noqa: PLW1509 - no threads yet
    wine_procs.append(proc)
    os.close(slave)
    buf = bytearray()
    try:
        assert _read_until(master, buf, b'"relay_started"', 90), bytes(buf).decode()
        tail = native_tail(address, "--json", "--count", "5")
        assert 0 == tail.returncode, tail.stderr
        os.write(master, b"\x03")
        assert _read_until(master, buf, b'"relay_stopped"', 60), bytes(buf).decode()
        assert 0 == proc.wait(timeout=60)
    finally:
        os.close(master)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", bytes(buf).decode("utf-8", "replace"))
    events = []
    for line in text.replace("\r", "\n").splitlines():
        start = line.find('{"')
        if start >= 0:
            try:
                events.append(json.loads(line[start:]))
            except ValueError:       # terminal noise around a line; the events checked below
                continue             # must all be there
    events = [e for e in events if isinstance(e, dict) and "event" in e]
    names = [e["event"] for e in events]
    assert "relay_stopped" == names[-1], names
    [stop] = [e for e in events if e["event"] == "stop_requested"]
    assert "SIGINT" == stop["signal"] and not stop["force"]
