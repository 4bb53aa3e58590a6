"""`qmt-relay run --source qmt` as a user starts it, with the xtdata fake on PYTHONPATH."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, List

import pynng
from helpers import REPO, relay_env, tcp_address

from relay.client import decode_spot_list
from relay.wire import END, HEARTBEAT_PREFIX, START, decode_heartbeat

FAKES = REPO / "tests" / "fakes"
CONFIG = """
source:
  kind: qmt
  qmt:
    markets: [SH, SZ]
    batch_pause: 0.0
    check_interval: 0.05
    reconnect_min: 0.05
    reconnect_max: 0.2
publish:
  heartbeat_interval: 0.1
logging:
  format: json
  stats_interval: 0.5
shutdown_timeout: 5.0
"""


def test_relay_with_qmt_source_survives_drop_and_restart_then_stops_cleanly(
        tmp_path: Path) -> None:
    """Data flows, an outage and a MiniQMT restart are survived, SIGTERM releases everything."""
    cfg = tmp_path / "relay.yaml"
    cfg.write_text(CONFIG)
    calls, control = tmp_path / "xtdata.jsonl", tmp_path / "control"
    env = relay_env()
    env.update(PYTHONPATH=str(FAKES) + os.pathsep + env["PYTHONPATH"], FAKE_XTDATA_LOG=str(calls),
               FAKE_XTDATA_CONTROL=str(control), FAKE_XTDATA_SECURITIES="60",
               FAKE_XTDATA_PUSH_INTERVAL="0.05", FAKE_XTDATA_FAIL_SUBSCRIBES="1")
    url = tcp_address()
    proc = subprocess.Popen(
        [sys.executable, "-m", "relay", "run", "--config", str(cfg), "--publish", url],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    statuses: List[str] = []
    records = 0
    try:
        with pynng.Sub0(recv_timeout=10000) as sub:
            sub.subscribe(b":spot:")
            sub.subscribe(HEARTBEAT_PREFIX)
            sub.dial(url, block=False)

            def pump(until: Any, limit: float = 30.0) -> None:
                nonlocal records
                deadline = time.monotonic() + limit
                while not until():
                    assert time.monotonic() < deadline, "relay too slow"
                    msg = sub.recv()
                    if msg.startswith(HEARTBEAT_PREFIX):
                        statuses.append(decode_heartbeat(msg)["status"])
                    elif msg not in (START, END):
                        part = decode_spot_list(msg, 6)
                        assert "qmt" == part.source
                        assert all(r.name and r.time_ms for r in part.records)
                        records += len(part.records)

            pump(lambda: records > 200 and statuses[-1:] == ["up"])
            control.write_text("drop\n")
            pump(lambda: statuses[-1:] == ["down"])
            control.write_text("drop\nrestore\nrestart\n")
            before = records
            pump(lambda: records > before + 100 and statuses[-1:] == ["up"])
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert 0 == proc.returncode, err
    log = [json.loads(line) for line in calls.read_text().splitlines()]
    exit_line = log[-1]
    assert {"call": "exit", "active": [], "violations": 0, "threads": 1} == {
        k: exit_line[k] for k in ("call", "active", "violations", "threads")}
    assert any(e["call"] == "unsubscribe_quote" and e["found"] for e in log)
    assert any(e["call"] == "disconnect" for e in log)
    events = [json.loads(line)["event"] for line in out.splitlines() if line.startswith("{")]
    assert "qmt_subscribe_failed" in events and "qmt_feed_lost" in events
    assert events.count("qmt_connected") >= 2
    assert "xtdata连接成功" not in out     # enable_hello = False
