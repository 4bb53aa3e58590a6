"""TLS: tls+tcp:// publish and snapshot addresses, verified by the pure-Python subscriber."""

from __future__ import annotations

import socket
import subprocess
import threading
from pathlib import Path
from typing import Dict, Iterator, List

import pynng
import pytest
from helpers import free_tcp_port, relay_command
from hostile import SP_SUB, read_until_closed, split, start_relay

from relay.client import Subscriber, TransportError, fetch_snapshot
from relay.client._transport import (
    PROTO_PUB,
    PROTO_SUB,
    TcpConnection,
    client_tls_context,
)
from relay.config import parse_config, service_addresses
from relay.security import Security, TlsFiles
from relay.tls import make_test_ca


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, str]:
    """A test CA with a server certificate for 127.0.0.1 and a client certificate."""
    return make_test_ca(str(tmp_path_factory.mktemp("ca")))


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, str]:
    """A second, unrelated CA (its certificates must not be trusted by the first)."""
    return make_test_ca(str(tmp_path_factory.mktemp("other")))


def tls_address() -> str:
    return f"tls+tcp://127.0.0.1:{free_tcp_port()}"


def test_port_plan_follows_a_tls_publish_address() -> None:
    """With a tls+tcp first publish address, the derived snapshot/history use tls+tcp too."""
    config = parse_config({"publish": {"addresses": ["tls+tcp://127.0.0.1:7000"]},
                           "security": {"tls": {"cert": "c.pem", "key": "k.pem"}}})
    plan = service_addresses(config)
    assert "tls+tcp://127.0.0.1:7001" == plan.snapshot
    assert "tls+tcp://127.0.0.1:7002" == plan.history
    assert "http://127.0.0.1:7003" == plan.metrics  # the HTTP endpoint has no TLS


def test_relay_serves_stream_and_snapshot_over_tls(
        tmp_path: Path, procs: List[subprocess.Popen[str]], ca: Dict[str, str],
        other_ca: Dict[str, str]) -> None:
    """Verified subscriber and snapshot work; a wrong CA and a plain TCP client get nothing."""
    publish, snapshot = tls_address(), tls_address()
    proc = start_relay(tmp_path, procs, publish, snapshot, extra=(
        f"security: {{tls: {{cert: '{ca['server']}', key: '{ca['server_key']}'}}}}"))
    with Subscriber(publish, ca=ca["ca"], snapshot=True, snapshot_url=snapshot,
                    connect_timeout=10) as sub:
        first = sub.recv(timeout=60)
        second = sub.recv(timeout=60)
    assert first is not None and first.snapshot
    assert second is not None and not second.snapshot and len(second.records) > 0
    snap = fetch_snapshot(snapshot, ca=ca["ca"], timeout=10)
    assert 50 == len(snap.records)

    with pytest.raises(TransportError, match="certificate verify failed"):
        fetch_snapshot(snapshot, ca=other_ca["ca"], timeout=10)
    host, port = split(publish)
    with pytest.raises(TransportError, match="certificate verify failed"):
        TcpConnection(host, port, PROTO_SUB, PROTO_PUB, timeout=10, max_message_bytes=1 << 20,
                      tls=client_tls_context(other_ca["ca"]))

    with socket.create_connection((host, port), timeout=10) as plain:
        plain.sendall(SP_SUB)
        data = read_until_closed(plain, timeout=3)
    assert b"\x00SP\x00" not in data and b":relay:" not in data  # at most a TLS alert

    proc.terminate()
    proc.communicate(timeout=30)
    assert 0 == proc.returncode


def _serving(sock: pynng.Socket, stop: threading.Event) -> threading.Thread:
    def loop() -> None:
        while not stop.wait(0.05):
            sock.send(b":relay:heartbeat:{}")

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    return thread


@pytest.fixture
def client_cert_pub(ca: Dict[str, str]) -> Iterator[str]:
    """A PUB socket on tls+tcp:// that requires client certificates issued by ``ca``."""
    address = tls_address()
    security = Security(tls=TlsFiles(ca["server"], ca["server_key"], ca["ca"]))
    sock = security.listen(pynng.Pub0, [address], service="publish")
    stop = threading.Event()
    thread = _serving(sock, stop)
    try:
        yield address
    finally:
        stop.set()
        thread.join()
        sock.close()


def test_client_certificate_mode_refuses_a_client_without_one(
        client_cert_pub: str, ca: Dict[str, str], other_ca: Dict[str, str]) -> None:
    """security.tls.ca set: only a client with a certificate from that CA gets messages."""
    host, port = split(client_cert_pub)
    for context in (client_tls_context(ca["ca"]),
                    client_tls_context(ca["ca"], other_ca["client"], other_ca["client_key"])):
        with pytest.raises(TransportError):
            conn = TcpConnection(host, port, PROTO_SUB, PROTO_PUB, timeout=10,
                                 max_message_bytes=1 << 20, tls=context)
            conn.recv(5)  # TLS 1.3: the server's verdict may arrive after our handshake
            conn.close()
    good = TcpConnection(host, port, PROTO_SUB, PROTO_PUB, timeout=10, max_message_bytes=1 << 20,
                         tls=client_tls_context(ca["ca"], ca["client"], ca["client_key"]))
    try:
        assert b":relay:heartbeat:{}" == good.recv(10)
    finally:
        good.close()


def test_make_test_ca_command_and_tail_tls_options(tmp_path: Path, ca: Dict[str, str]) -> None:
    """`qmt-relay tls make-test-ca DIR` writes the files; `tail --ca` rejects a missing file."""
    made = relay_command(tmp_path, "tls", "make-test-ca", str(tmp_path / "pki"),
                         "--host", "relay.lan", "--host", "192.168.1.5")
    out, err = made.communicate(timeout=60)
    assert 0 == made.returncode, err
    for name in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key"):
        assert (tmp_path / "pki" / name).is_file()
    assert "security: {tls: {cert:" in out
    tail = relay_command(tmp_path, "tail", tls_address(), "--ca", str(tmp_path / "nope.pem"))
    _, err = tail.communicate(timeout=60)
    assert 2 == tail.returncode
    assert "Traceback" not in err and "No such file" in err
