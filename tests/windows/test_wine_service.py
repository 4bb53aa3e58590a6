"""The Windows service, whole cycle, through Wine's service control manager (services.exe)
with the project's own service class hosted by pywin32's pythonservice.exe."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List

from tests.helpers import relay_env, tcp_address
from tests.windows.winehelpers import Wine, relay_config

QMT = "source:\n  kind: qmt\n  qmt:\n    markets: [SH, SZ]\n    batch_pause: 0.0\n"


def lines(path: Path) -> List[Dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def wait_for_state(wine: Wine, state: str) -> str:
    """``service status`` until it reports ``state`` (bounded by a count, not a clock)."""
    out = ""
    for _ in range(60):
        status = wine.relay("service", "status")
        out = status.stdout
        if out.startswith(f"qmt-relay: {state}"):
            break
    return out


def test_service_whole_cycle(wine: Wine, tmp_path: Path) -> None:
    """install, start, status, a Linux subscriber reads the service, graceful stop that
    releases every QMT subscription, remove.

    The service runs the qmt source on the fake xtquant (copied into the Wine CPython).
    "Every subscription released" is read from the service's log file: one
    ``qmt_subscribed`` per subscription made, and ``qmt_released`` counting the
    unsubscribes that succeeded and those that failed. (The fake's own call log cannot be
    used: a service's environment comes from the system, not from the test.)"""
    address = tcp_address()
    log = tmp_path / "logs" / "relay.log"
    cfg = tmp_path / "service.yaml"
    cfg.write_text(relay_config(address, source=QMT,
                                extra=f"logging:\n  file: {wine.path(log)}\n"),
                   encoding="utf-8")
    installed = False
    try:
        install = wine.relay("service", "install", "--config", wine.path(cfg))
        assert 0 == install.returncode, install.stderr
        installed = True
        assert "installed service qmt-relay" in install.stdout
        # Wine refuses failure actions: install still succeeds, and says what was refused.
        assert "warning: the system refused the restart-on-failure actions" in install.stderr

        start = wine.relay("service", "start")
        assert 0 == start.returncode, start.stderr
        assert "qmt-relay: running" in start.stdout

        status = wine.relay("service", "status")
        assert 0 == status.returncode, status.stderr
        assert status.stdout.startswith("qmt-relay: running")
        assert "recovery: " in status.stdout           # in place or not, it is stated
        assert f"log file: {wine.path(log)}" in status.stdout

        tail = subprocess.run(
            [sys.executable, "-m", "relay", "tail", address, "--json", "--count", "40"],
            capture_output=True, text=True, timeout=90, env=relay_env())
        assert 0 == tail.returncode, tail.stderr
        rows = [json.loads(line) for line in tail.stdout.splitlines()]
        assert 40 == len(rows) and {"qmt"} == {r["source"] for r in rows}

        stop = wine.relay("service", "stop")
        assert 0 == stop.returncode, stop.stderr
        assert wait_for_state(wine, "stopped").startswith("qmt-relay: stopped")
    finally:
        if installed:
            removed = wine.relay("service", "remove")
            assert 0 == removed.returncode, removed.stderr
    gone = wine.relay("service", "status")
    assert 1 == gone.returncode and "does not exist" in gone.stderr

    events = lines(log)
    names = [e["event"] for e in events]
    assert "relay_started" in names and "relay_stopped" == names[-1], names
    subscribed = [e for e in events if e["event"] == "qmt_subscribed"]
    [released] = [e for e in events if e["event"] == "qmt_released"]
    assert subscribed and (len(subscribed), 0) == (released["unsubscribed"], released["failed"])
    assert names.index("qmt_released") < names.index("relay_stopped")


def test_service_failed_start_is_in_the_log_file(wine: Wine, tmp_path: Path) -> None:
    """A service whose publish address is taken fails to start: `service start` says so
    and where to look, and the log file holds the reason."""
    import pynng

    address = tcp_address()
    log = tmp_path / "relay.log"
    cfg = tmp_path / "service.yaml"
    cfg.write_text(relay_config(address, extra=f"logging:\n  file: {wine.path(log)}\n"),
                   encoding="utf-8")
    with pynng.Pub0(listen=address):
        install = wine.relay("service", "install", "--config", wine.path(cfg))
        assert 0 == install.returncode, install.stderr
        try:
            start = wine.relay("service", "start")
            if start.returncode == 0:       # it may still have been starting: wait it out
                assert wait_for_state(wine, "stopped").startswith("qmt-relay: stopped")
            else:
                assert "stopped at once" in start.stderr and wine.path(log) in start.stderr
        finally:
            removed = wine.relay("service", "remove")
            assert 0 == removed.returncode, removed.stderr
    [failure] = [e for e in lines(log) if e["event"] == "relay_start_failed"]
    assert address.rsplit(":", 1)[1] in failure["error"] and 3 == failure["exit_code"]
