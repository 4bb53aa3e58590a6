"""Helpers of the operations tests: a real local webhook server, HTTP reads, metric parsing."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Dict, List, Optional, Tuple

from helpers import free_tcp_port, relay_env
from prometheus_client.parser import text_string_to_metric_families


class WebhookServer:
    """A real HTTP server on loopback that keeps every JSON body POSTed to it.

    Args:
        fail_first: answer the first N requests with 500.
        gate: when given, every request waits for it (a slow webhook) before answering.
    """

    def __init__(self, *, fail_first: int = 0, gate: Optional[threading.Event] = None) -> None:
        self.bodies: List[Any] = []
        self.requests = 0
        self.waiting = 0
        self._fail_first = fail_first
        self._gate = gate
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with outer._lock:
                    outer.requests += 1
                    number = outer.requests
                if outer._gate is not None:
                    with outer._lock:
                        outer.waiting += 1
                    outer._gate.wait(30)
                if number <= outer._fail_first:
                    self.send_response(500)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                with outer._lock:
                    outer.bodies.append(json.loads(body))
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/hook?access_token=secret"
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.02}, daemon=True)

    def __enter__(self) -> WebhookServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._gate is not None:
            self._gate.set()
        self._server.shutdown()
        self._server.server_close()

    def events(self, key: str = "event") -> List[Any]:
        with self._lock:
            return [body.get(key) if isinstance(body, dict) else body for body in self.bodies]


def down_url() -> str:
    """A webhook URL nobody listens on (connection refused)."""
    return f"http://127.0.0.1:{free_tcp_port()}/hook"


def get(url: str, timeout: float = 5.0) -> Tuple[int, bytes, Dict[str, str]]:
    """GET ``url``: status, body and headers, also for 4xx/5xx answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers)


def get_json(url: str) -> Tuple[int, Any]:
    status, body, _ = get(url)
    return status, json.loads(body)


def metrics(base: str) -> Dict[str, float]:
    """``/metrics`` as ``{'name{label="v"}': value}`` (samples, parsed by prometheus_client)."""
    _, body, _ = get(base + "/metrics")
    out: Dict[str, float] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out


def wait_for(what: Callable[[], Any], message: str, limit: float = 30.0,
             step: float = 0.05) -> Any:
    """Poll until ``what()`` is truthy; returns it. A generous limit, not a timing check."""
    deadline = time.monotonic() + limit
    while True:
        value = what()
        if value:
            return value
        assert time.monotonic() < deadline, message
        time.sleep(step)


class LineReader:
    """Collects a subprocess's stdout lines on a thread (the stats lines, while it runs)."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: List[str] = []
        assert proc.stdout is not None
        stream = proc.stdout
        self._thread = threading.Thread(target=lambda: self.lines.extend(iter(stream.readline,
                                                                               "")), daemon=True)
        self._thread.start()

    def events(self, name: str) -> List[dict]:  # type: ignore[type-arg]
        out = []
        for line in list(self.lines):
            if line.startswith("{"):
                entry = json.loads(line)
                if entry.get("event") == name:
                    out.append(entry)
        return out

    def finish(self, proc: subprocess.Popen[str]) -> str:
        """Stop ``proc`` (SIGTERM) if still running; returns its stderr."""
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        self._thread.join(10)
        assert proc.stdout is not None and proc.stderr is not None
        err = proc.stderr.read()
        proc.stdout.close()
        proc.stderr.close()
        return err


def status_command(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "relay", "status", *args], capture_output=True,
                          text=True, env=relay_env(), timeout=30)
