"""Access control: security.allow refuses peers outside the list on every TCP service."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import List

import pynng
import pytest
from helpers import free_tcp_port, ipc_address, tcp_address
from hostile import (
    SP_SUB,
    connect,
    log_events,
    read_until_closed,
    snapshot_request,
    start_relay,
    wait_for_heartbeat,
)
from structlog.testing import capture_logs

from relay.config import parse_config
from relay.errors import ConfigError, PublishError
from relay.security import AllowList, Security, is_loopback_address


def test_allow_list_matches_addresses_and_networks() -> None:
    """Single addresses, CIDR networks, IPv6 and IPv4-mapped IPv6 peers."""
    allow = AllowList(["192.168.1.0/24", "10.0.0.7", "::1", "fd00::/8"])
    assert allow("192.168.1.77")
    assert allow.is_allowed("10.0.0.7")
    assert not allow("10.0.0.8")
    assert allow("::ffff:192.168.1.5")
    assert allow("[::1]")
    assert allow("fd12::3")
    assert not allow("2001:db8::1")
    assert not allow("not-an-ip")
    assert Security().is_allowed("203.0.113.9")  # no list: everyone


@pytest.mark.parametrize(("text", "key"), [
    ("security: {allow: [192.168.1.0/24, 300.1.1.1]}", "security.allow[1]"),
    ("security: {allow: []}", "security.allow"),
    ("security: {tls: {cert: a.pem}}", "security.tls.key"),
    ("publish: {addresses: ['tls+tcp://127.0.0.1:7000']}", "publish.addresses[0]"),
])
def test_bad_security_config_names_the_key(text: str, key: str) -> None:
    """Invalid allow entries and incomplete TLS settings are ConfigErrors naming the key."""
    import yaml

    with pytest.raises(ConfigError) as info:
        parse_config(yaml.safe_load(text), path="relay.yaml")
    assert key == info.value.key


def test_loopback_detection() -> None:
    """ipc and loopback TCP are private; a wildcard, LAN address or host name is not."""
    assert is_loopback_address("ipc:///tmp/x.ipc")
    assert is_loopback_address("tcp://127.0.0.1:9")
    assert is_loopback_address("tls+tcp://[::1]:9")
    assert is_loopback_address("tcp://localhost:9")
    assert not is_loopback_address("tcp://0.0.0.0:9")
    assert not is_loopback_address("tcp://192.168.1.2:9")
    assert not is_loopback_address("tcp://relay.example:9")


def test_open_address_without_a_list_warns() -> None:
    """Listening on all interfaces with no allow-list logs the exposure; a list silences it."""
    address = f"tcp://0.0.0.0:{free_tcp_port()}"
    with capture_logs() as logs:
        Security().listen(pynng.Pub0, [address, ipc_address()], service="publish").close()
        Security(["127.0.0.1"]).listen(pynng.Pub0, [address], service="publish").close()
    warned = [e for e in logs if e["event"] == "open_to_network"]
    assert [address] == [e["address"] for e in warned]


def test_listen_failure_is_a_publish_error_and_closes_everything() -> None:
    """An address in use fails the whole listen with PublishError naming service and address."""
    address = tcp_address()
    with pynng.Pub0(listen=address), pytest.raises(PublishError,
                                                 match="snapshot service: address in use"):
        Security().listen(pynng.Rep0, [ipc_address(), address], service="snapshot")


def test_refused_peer_gets_nothing_in_process() -> None:
    """A peer outside the list is closed before it receives a published message."""
    address = tcp_address()
    sec = Security(["127.0.0.1"], log_interval=60)
    with capture_logs() as logs:
        sock = sec.listen(pynng.Pub0, [address], service="publish")
        try:
            peers = []
            for _ in range(3):
                peer = connect(address, source="127.0.0.2")
                peer.sendall(SP_SUB)
                peers.append(peer)
            for _ in range(20):
                sock.send(b":spot:x")
            received = [read_until_closed(p, timeout=5) for p in peers]
        finally:
            sock.close()
            for p in peers:
                p.close()
    assert all(r in (b"", b"\x00SP\x00\x00\x20\x00\x00") for r in received)
    assert 3 == sec.refused("publish")
    assert {"publish": 3} == sec.refusals()
    refused = [e for e in logs if e["event"] == "peer_refused"]
    assert 1 == len(refused)  # rate-limited: one line, the rest counted
    assert refused[0]["peer"].startswith("127.0.0.2:")


def test_relay_subprocess_refuses_outsiders_on_stream_and_snapshot(
        tmp_path: Path, procs: List[subprocess.Popen[str]]) -> None:
    """Allowed loopback addresses receive the stream and snapshot; 127.0.0.2 gets nothing."""
    publish, snapshot = tcp_address(), tcp_address()
    proc = start_relay(tmp_path, procs, publish, snapshot,
                       extra="security: {allow: [127.0.0.1/32, 127.0.0.3], log_interval: 0.01}")
    beat = wait_for_heartbeat(publish)
    assert "up" == beat["status"]
    assert "up" == wait_for_heartbeat(publish, source="127.0.0.3")["status"]

    outsider = connect(publish, source="127.0.0.2")
    outsider.sendall(SP_SUB)
    data = read_until_closed(outsider, timeout=5)
    outsider.close()
    assert data in (b"", b"\x00SP\x00\x00\x20\x00\x00")  # the handshake at most, no message

    reply = snapshot_request(snapshot, source="127.0.0.3")
    assert reply is not None and reply.startswith(b":relay:snapshot:")
    assert snapshot_request(snapshot, source="127.0.0.2") is None

    proc.terminate()
    out, _ = proc.communicate(timeout=30)
    assert 0 == proc.returncode
    refused = {e["service"] for e in log_events(out) if e["event"] == "peer_refused"}
    assert {"publish", "snapshot"} == refused


def test_metrics_http_endpoint_applies_the_allow_list() -> None:
    """The HTTP endpoint answers allowed peers and closes others before reading a byte."""
    from relay.ops.http import OpsServer
    from relay.ops.metrics import build_registry

    registry, _ = build_registry(lambda: None, run_id="r", version="0", source="simulator")
    sec = Security(["127.0.0.1"])
    server = OpsServer(f"http://127.0.0.1:{free_tcp_port()}", registry, lambda: None,
                       allow=sec.is_allowed, refuse=sec.refuse)
    server.start()
    try:
        url = server.url
        for source, expect_reply in (("127.0.0.1", True), ("127.0.0.2", False)):
            with connect(url.replace("http://", "tcp://"), source=source) as s:
                s.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
                reply = read_until_closed(s, timeout=5)
            assert expect_reply == reply.startswith(b"HTTP/1.1 200"), (source, reply[:60])
    finally:
        server.close()
    assert 1 == sec.refused("metrics")


def test_refused_peers_are_not_counted_as_subscribers() -> None:
    """The publisher's subscriber count sees allowed peers only."""
    import time

    from relay.publish import Publisher

    address = tcp_address()
    with capture_logs():
        pub = Publisher([address], security=Security(["127.0.0.1"]))
        pub.start()
        good = [connect(address) for _ in range(2)]
        try:
            for g in good:
                g.sendall(SP_SUB)
            for _ in range(3):
                with connect(address, source="127.0.0.2") as bad:
                    bad.sendall(SP_SUB)
                    read_until_closed(bad, timeout=5)
            deadline = time.monotonic() + 10
            while pub.subscribers != 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert 2 == pub.subscribers
        finally:
            for g in good:
                g.close()
            pub.close()
