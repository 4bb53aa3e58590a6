"""The pure-Python NNG TCP transport against pynng peers (SUB/PUB and REQ/REP)."""

from __future__ import annotations

import socket
import struct
import threading
from typing import Iterator, List

import pynng
import pytest
from helpers import tcp_address

from relay.client._transport import (
    PROTO_PUB,
    PROTO_SUB,
    TcpConnection,
    TransportError,
    parse_url,
    request,
)


@pytest.fixture
def raw_server() -> Iterator[socket.socket]:
    """A plain TCP listener on a free loopback port."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    try:
        yield srv
    finally:
        srv.close()


def test_parse_url() -> None:
    """tcp and ipc URLs split into scheme, host or path, port; others are refused."""
    assert ("tcp", "127.0.0.1", 9200) == parse_url("tcp://127.0.0.1:9200")
    assert ("tcp", "::1", 9200) == parse_url("tcp://[::1]:9200")
    assert ("ipc", "/tmp/x.ipc", 0) == parse_url("ipc:///tmp/x.ipc")
    with pytest.raises(ValueError, match="expected tcp"):
        parse_url("udp://1.2.3.4:5")


def test_sub_receives_pynng_pub_messages_of_any_size() -> None:
    """Messages from a pynng Pub0 arrive whole, from 0 bytes to 3 MB, in order."""
    url = tcp_address()
    _, host, port = parse_url(url)
    joined = threading.Event()
    with pynng.Pub0() as pub:
        pub.add_post_pipe_connect_cb(lambda _p: joined.set())
        pub.listen(url)
        conn = TcpConnection(host, port, PROTO_SUB, PROTO_PUB, timeout=5,
                             max_message_bytes=1 << 24)
        try:
            assert joined.wait(5)
            sent = [b"", b"x", bytes(range(256)) * 12000, b"tail"]
            for body in sent:
                pub.send(body)
            got: List[bytes] = []
            while len(got) < len(sent):
                msg = conn.recv(5)
                assert msg is not None
                got.append(msg)
        finally:
            conn.close()
    assert sent == got


def test_recv_times_out_with_none() -> None:
    """No message within the timeout gives None, not an error."""
    url = tcp_address()
    _, host, port = parse_url(url)
    with pynng.Pub0(listen=url):
        conn = TcpConnection(host, port, PROTO_SUB, PROTO_PUB, timeout=5,
                             max_message_bytes=1024)
        try:
            assert conn.recv(0.05) is None
        finally:
            conn.close()


def test_req_talks_to_pynng_rep_with_request_id_echo() -> None:
    """request() gets the reply of a pynng Rep0; the id header is stripped."""
    url = tcp_address()
    with pynng.Rep0(listen=url, recv_timeout=5000) as rep:
        def serve() -> None:
            body = rep.recv()
            rep.send(b"re:" + body)

        thread = threading.Thread(target=serve)
        thread.start()
        reply = request(url, b"hello", timeout=5, max_message_bytes=1024)
        thread.join(5)
    assert b"re:hello" == reply


def test_req_over_ipc_uses_pynng(tmp_path: object) -> None:
    """request() on an ipc:// address goes through pynng."""
    url = f"ipc://{tmp_path}/rep.ipc"
    with pynng.Rep0(listen=url, recv_timeout=5000) as rep:
        thread = threading.Thread(target=lambda: rep.send(rep.recv() * 2))
        thread.start()
        reply = request(url, b"ab", timeout=5, max_message_bytes=1024)
        thread.join(5)
    assert b"abab" == reply


def test_unreachable_is_a_transport_error() -> None:
    """Connecting to a closed port raises TransportError naming the address."""
    url = tcp_address()
    with pytest.raises(TransportError, match="cannot connect"):
        request(url, b"x", timeout=2, max_message_bytes=1024)


def test_wrong_protocol_peer_is_refused() -> None:
    """A SUB connection to a REP socket fails the handshake."""
    url = tcp_address()
    _, host, port = parse_url(url)
    with pynng.Rep0(listen=url), pytest.raises(TransportError, match="protocol 0x31"):
        TcpConnection(host, port, PROTO_SUB, PROTO_PUB, timeout=5, max_message_bytes=1024)


def test_non_nng_peer_is_refused(raw_server: socket.socket) -> None:
    """A peer that is not NNG (bad SP header) is refused."""
    port = raw_server.getsockname()[1]

    def serve() -> None:
        peer, _ = raw_server.accept()
        with peer:
            peer.sendall(b"HTTP/1.1")
            peer.recv(8)

    thread = threading.Thread(target=serve)
    thread.start()
    with pytest.raises(TransportError, match="bad SP header"):
        TcpConnection("127.0.0.1", port, PROTO_SUB, PROTO_PUB, timeout=5, max_message_bytes=64)
    thread.join(5)


def test_lying_length_breaks_the_connection_without_allocating(
    raw_server: socket.socket,
) -> None:
    """A length prefix of 2**62 bytes is refused at once; nothing that size is allocated."""
    port = raw_server.getsockname()[1]
    done = threading.Event()

    def serve() -> None:
        peer, _ = raw_server.accept()
        with peer:
            peer.recv(8)
            peer.sendall(struct.pack(">4sHH", b"\x00SP\x00", PROTO_PUB, 0))
            peer.sendall(struct.pack(">Q", 1 << 62) + b"abc")
            done.wait(5)

    thread = threading.Thread(target=serve)
    thread.start()
    conn = TcpConnection("127.0.0.1", port, PROTO_SUB, PROTO_PUB, timeout=5,
                         max_message_bytes=1 << 20)
    with pytest.raises(TransportError, match="exceeds"):
        conn.recv(5)
    done.set()
    thread.join(5)


def test_peer_closing_mid_message_is_a_transport_error(raw_server: socket.socket) -> None:
    """A message cut short by the peer closing raises TransportError, not a hang."""
    port = raw_server.getsockname()[1]

    def serve() -> None:
        peer, _ = raw_server.accept()
        with peer:
            peer.recv(8)
            peer.sendall(struct.pack(">4sHH", b"\x00SP\x00", PROTO_PUB, 0))
            peer.sendall(struct.pack(">Q", 100) + b"only ten b")

    thread = threading.Thread(target=serve)
    thread.start()
    conn = TcpConnection("127.0.0.1", port, PROTO_SUB, PROTO_PUB, timeout=5,
                         max_message_bytes=1 << 20)
    with pytest.raises(TransportError, match="closed by the peer"):
        while True:
            conn.recv(5)
    thread.join(5)
