"""The metrics endpoint, health, status command and alerts of a relay run as a subprocess."""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path

from helpers import free_tcp_port, run_relay_with, tcp_address
from ops_helpers import (
    LineReader,
    WebhookServer,
    down_url,
    get,
    get_json,
    metrics,
    status_command,
    wait_for,
)

SIMULATOR = """
source:
  kind: simulator
  simulator: {{securities: 60, push_interval: 0.3, speed: 1.0}}
publish:
  addresses: ["{publish}"]
  snapshot_address: "{snapshot}"
  heartbeat_interval: 0.1
metrics:
  address: "{metrics}"
  sample_interval: 0.1
alerts:
  timeout: 20.0
  retries: 1
  backoff: 0.05
  webhooks:
    - "{slow}"
    - "{down}"
logging: {{format: json, stats_interval: 0.3}}
"""


def test_metrics_health_status_page_and_webhooks_that_do_not_delay_publishing(
        tmp_path: Path) -> None:
    """Counters move as batches flow; health, status, page answer; hung webhooks delay nothing."""
    publish = tcp_address()
    base = f"http://127.0.0.1:{free_tcp_port()}"
    gate = threading.Event()
    with WebhookServer(gate=gate) as slow:
        proc = run_relay_with(tmp_path, SIMULATOR.format(
            publish=publish, snapshot=tcp_address(), metrics=base, slow=slow.url,
            down=down_url()))
        reader = LineReader(proc)
        try:
            wait_for(lambda: get_json(base + "/healthz")[0] == 200 if _listening(base) else None,
                     "relay never became healthy")
            # The slow webhook holds the relay_started alert; publishing goes on regardless.
            wait_for(lambda: slow.waiting, "relay_started alert never reached the webhook")
            first = metrics(base)
            wait_for(lambda: metrics(base)["qmt_relay_records_total"]
                     > first["qmt_relay_records_total"] + 100,
                     "records stopped moving while a webhook hangs")
            later = metrics(base)
            assert 1 == slow.waiting        # still hanging: nothing waited for it
            for name in ("qmt_relay_batches_total", "qmt_relay_messages_total",
                         "qmt_relay_bytes_total", "qmt_relay_batch_seconds_count"):
                assert later[name] > first[name], name
            assert 1.0 == later["qmt_relay_source_up"]
            assert 1.0 == later["qmt_relay_healthy"]
            assert 0.0 == later["qmt_relay_alerts_sent_total"]
            # Supervised services, the HTTP thread among them, show up as alive.
            assert 1.0 == later['qmt_relay_service_up{service="metrics_http"}']
            assert 0.0 == later['qmt_relay_service_failures_total{service="metrics_http"}']
            assert sum(v for k, v in later.items()
                       if k.startswith("qmt_relay_securities_today{")) == 60
            assert {"market"} == {k.split("{")[1].split("=")[0] for k in later
                                  if k.startswith("qmt_relay_market_records_total{")}
            info = [k for k in later if k.startswith("qmt_relay_build_info{")]
            assert 1 == len(info) and 'source="simulator"' in info[0]

            status, health = get_json(base + "/healthz")
            assert (200, True, "up") == (status, health["healthy"], health["status"])
            done = status_command(publish)
            assert 0 == done.returncode, done.stdout + done.stderr
            assert "HEALTHY (up)" in done.stdout and "simulator" in done.stdout
            as_json = json.loads(status_command(base, "--json").stdout)
            assert (True, True) == (as_json["reachable"], as_json["healthy"])

            code, page, headers = get(base + "/")
            assert 200 == code and headers["Content-Type"].startswith("text/html")
            assert b"<canvas" in page and b"src=\"http" not in page and b"href=\"http" not in page
            assert 404 == get(base + "/nope")[0]
            _hostile(base)
            assert 200 == get(base + "/healthz")[0]     # the server survived all of it
            gate.set()
            wait_for(lambda: slow.events() == ["relay_started"], "started alert lost")
        finally:
            gate.set()
            err = reader.finish(proc)
    assert 0 == proc.returncode, err
    assert ["relay_started", "relay_stopped"] == slow.events()
    failed = [e for e in reader.events("alert_failed")]
    assert {"relay_started"} <= {e["alert"] for e in failed}   # the down webhook, counted
    assert all("secret" not in line for line in reader.lines)   # robot tokens stay out of logs
    assert 0 != status_command(publish, "--timeout", "0.5").returncode


def _listening(base: str) -> bool:
    port = int(base.rsplit(":", 1)[1])
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _hostile(base: str) -> None:
    """Garbage, a POST, a huge header line and a silent connection: answered or dropped."""
    port = int(base.rsplit(":", 1)[1])
    for payload in (b"\x00\xff garbage\r\n\r\n", b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n",
                    b"POST /metrics HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello", b""):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            if payload:
                s.sendall(payload)
                answer = s.recv(4096)
                assert any(code in answer for code in (b"400", b"405", b"414")), answer
    code, _, headers = get(base + "/metrics")
    assert 200 == code and headers["Content-Type"].startswith("text/plain")
