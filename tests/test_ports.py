"""The port plan: every TCP service defaults to the publish host and the ports after P."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Tuple

import pynng
import pytest
from helpers import free_tcp_port, relay_env, run_relay_with

from relay.config import (
    Config,
    ServiceAddresses,
    apply_overrides,
    parse_config,
    planned_address,
    service_addresses,
)
from relay.errors import ConfigError


def plan(*addresses: str, **sections: object) -> ServiceAddresses:
    data = {"publish": {"addresses": list(addresses)}, **sections}
    return service_addresses(parse_config(data))


def test_defaults_follow_the_first_tcp_publish_address() -> None:
    """P = 9200 by default: snapshot 9201, history 9202, metrics 9203, all on loopback."""
    assert ServiceAddresses("tcp://127.0.0.1:9201", "tcp://127.0.0.1:9202",
                            "http://127.0.0.1:9203") == service_addresses(Config())


def test_services_move_with_the_publish_address() -> None:
    """Only the publish address differs: the services follow it, host and port."""
    assert ServiceAddresses("tcp://10.0.0.5:7001", "tcp://10.0.0.5:7002",
                            "http://10.0.0.5:7003") == plan("ipc:///tmp/x.ipc",
                                                            "tcp://10.0.0.5:7000",
                                                            "tcp://127.0.0.1:8000")
    assert "tcp://[::1]:9301" == plan("tcp://[::1]:9300").snapshot


def test_ipc_only_keeps_the_loopback_ports() -> None:
    """With no TCP publish address the services keep 127.0.0.1:9201-9203."""
    assert ServiceAddresses("tcp://127.0.0.1:9201", "tcp://127.0.0.1:9202",
                            "http://127.0.0.1:9203") == plan("ipc:///tmp/only.ipc")


def test_explicit_addresses_and_null_win_over_the_plan() -> None:
    """An explicit address is kept as given; null or "" turns a service off."""
    got = plan("tcp://127.0.0.1:7000",
               history={"address": "ipc:///tmp/history.ipc"},
               metrics={"address": None})
    assert ServiceAddresses("tcp://127.0.0.1:7001", "ipc:///tmp/history.ipc", None) == got
    off = service_addresses(parse_config({"publish": {"snapshot_address": ""}}))
    assert None is off.snapshot


def test_the_top_port_does_not_overflow() -> None:
    """A publish port at the top of the range falls back to the plan's loopback ports."""
    assert "tcp://127.0.0.1:9201" == planned_address(["tcp://127.0.0.1:65535"], "snapshot")


@pytest.mark.parametrize(("data", "key"), [
    ({"history": {"address": "http://x:1"}}, "history.address"),
    ({"metrics": {"address": "tcp://127.0.0.1:9203"}}, "metrics.address"),
    ({"metrics": {"address": "http://127.0.0.1:99999"}}, "metrics.address"),
    ({"publish": {"snapshot_address": "automatic"}}, "publish.snapshot_address"),
    ({"history": {"dir": ""}}, "history.dir"),
])
def test_bad_service_addresses_name_the_key(data: dict, key: str) -> None:  # type: ignore[type-arg]
    """A bad service address is a ConfigError naming its dotted key."""
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        parse_config(data)


def test_snapshot_override_from_the_command_line() -> None:
    """--snapshot URL moves the service; --snapshot off ("" here) turns it off."""
    moved = apply_overrides(Config(), snapshot="tcp://127.0.0.1:7777")
    assert "tcp://127.0.0.1:7777" == service_addresses(moved).snapshot
    assert None is service_addresses(apply_overrides(Config(), snapshot="")).snapshot


# -- as users run it -----------------------------------------------------------------------

SIM = """
source:
  simulator:
    speed: 20
    securities: 300
publish:
  heartbeat_interval: 0.2
metrics:
  address: null
history:
  address: null
logging:
  format: json
"""


def _plan_port() -> int:
    """A publish port P whose snapshot port P+1 is also free."""
    for _ in range(50):
        port = free_tcp_port()
        if port < 65535:
            try:
                with pynng.Rep0(listen=f"tcp://127.0.0.1:{port + 1}"):
                    return port
            except pynng.exceptions.AddressInUse:
                continue
    raise AssertionError("no free port pair")


def _stop(proc: subprocess.Popen[str]) -> Tuple[int, str]:
    if proc.poll() is None:
        proc.terminate()
    _, err = proc.communicate(timeout=30)
    return proc.returncode, err


def _tail_snapshot(url: str) -> List[dict]:  # type: ignore[type-arg]
    deadline = time.monotonic() + 60
    while True:
        tail = subprocess.run(
            [sys.executable, "-m", "relay", "tail", url, "--snapshot", "--json", "--count", "3"],
            capture_output=True, text=True, timeout=60, env=relay_env())
        if tail.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert 0 == tail.returncode, tail.stderr
    return [json.loads(line) for line in tail.stdout.splitlines()]


def test_two_relays_side_by_side_differ_only_in_publish(tmp_path: Path) -> None:
    """Two relays with one config and their own --publish: both stream, both serve snapshots."""
    ports = [_plan_port()]
    while True:
        other = _plan_port()
        if abs(other - ports[0]) > 1:
            ports.append(other)
            break
    procs = [run_relay_with(tmp_path, SIM, "--publish", f"tcp://127.0.0.1:{p}", name="relay")
             for p in ports]
    try:
        from relay.client import fetch_snapshot

        for port in ports:
            rows = _tail_snapshot(f"tcp://127.0.0.1:{port}")   # tail finds P+1 by default
            assert 3 == len(rows) and {"simulator"} == {r["source"] for r in rows}
            snap = fetch_snapshot(f"tcp://127.0.0.1:{port + 1}", timeout=10)
            assert len(snap) == 300
    finally:
        results = [_stop(p) for p in procs]
    for code, err in results:
        assert 0 == code, err


def test_snapshot_off_and_port_in_use_names_the_service(tmp_path: Path) -> None:
    """A taken P+1 fails startup with exit 3 naming the snapshot service; --snapshot off runs."""
    port = _plan_port()
    with pynng.Rep0(listen=f"tcp://127.0.0.1:{port + 1}"):
        taken = run_relay_with(tmp_path, SIM, "--publish", f"tcp://127.0.0.1:{port}")
        taken.wait(timeout=30)
        code, err = _stop(taken)
        assert 3 == code
        assert "snapshot service" in err and f"127.0.0.1:{port + 1}" in err
        assert "Traceback" not in err
        off = run_relay_with(tmp_path, SIM, "--publish", f"tcp://127.0.0.1:{port}",
                             "--snapshot", "off")
        with pynng.Sub0(recv_timeout=20000) as sub:
            sub.subscribe(b":spot:")
            sub.dial(f"tcp://127.0.0.1:{port}", block=False)
            assert sub.recv().startswith(b":spot:")
        code, err = _stop(off)
    assert 0 == code, err
