"""NNG transports for the subscriber: pure-Python TCP and TLS (SUB, REQ), pynng for ``ipc://``.

NNG's scalability protocols over TCP are simple: each side first sends an 8-byte header,
``\\x00SP\\x00``, its 16-bit big-endian protocol id and two zero bytes; after that every
message is an 8-byte big-endian length followed by the body. A SUB socket sends nothing (it
filters topics itself); a REQ message carries a 4-byte big-endian request id with the high
bit set before its body, and the REP reply echoes it.

A lying length never makes us allocate more than what has actually arrived, and a length
above ``max_message_bytes`` drops the connection.

``tls+tcp://`` is the same framing inside a TLS session (NNG's TLS transport), spoken with
the standard library's :mod:`ssl`: the server certificate is verified (against ``ca``, or the
system's trust store) and its name checked against the URL's host; ``cert``/``key`` present a
client certificate to a relay that requires one.
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import struct
import threading
from collections import deque
from typing import Any, Deque, Optional, Tuple

__all__ = [
    "PROTO_PUB",
    "PROTO_REP",
    "PROTO_REQ",
    "PROTO_SUB",
    "Requester",
    "TransportError",
    "client_tls_context",
    "parse_url",
    "request",
]

PROTO_PUB = 0x20
PROTO_SUB = 0x21
PROTO_REQ = 0x30
PROTO_REP = 0x31

_SP_HEADER = struct.Struct(">4sHH")
_SP_MAGIC = b"\x00SP\x00"
_LENGTH = struct.Struct(">Q")
_REQ_ID = struct.Struct(">I")
_CHUNK = 1 << 20


class TransportError(OSError):
    """The connection failed, was closed by the peer, or broke the NNG protocol."""


def parse_url(url: str) -> Tuple[str, str, int]:
    """Split ``tcp://HOST:PORT``, ``tls+tcp://HOST:PORT`` or ``ipc://PATH`` into
    ``(scheme, host or path, port)``.

    Raises:
        ValueError: any other kind of URL.
    """
    if url.startswith("ipc://"):
        return "ipc", url[6:], 0
    scheme, sep, rest = url.partition("://")
    if sep and scheme in ("tcp", "tls+tcp"):
        host, sep, port = rest.rpartition(":")
        if sep and port.isdigit() and host:
            host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
            return scheme, host, int(port)
    raise ValueError(f"expected tcp://HOST:PORT, tls+tcp://HOST:PORT or ipc://PATH, got {url!r}")


def client_tls_context(ca: Optional[str] = None, cert: Optional[str] = None,
                       key: Optional[str] = None) -> ssl.SSLContext:
    """A verifying client TLS context for ``tls+tcp://`` relays.

    Args:
        ca: PEM file of the CA that issued the relay's certificate; ``None`` = the system's
            trust store.
        cert: PEM file of our client certificate (for a relay that requires one).
        key: its private key (``None``: the key is in ``cert``).

    Raises:
        OSError: a file cannot be read. ssl.SSLError: a file is not a certificate or key.
    """
    context = ssl.create_default_context(cafile=ca)
    if cert is not None:
        context.load_cert_chain(cert, key)
    return context


class TcpConnection:
    """One NNG SP-over-TCP connection (blocking socket, reads with a timeout).

    Args:
        host, port: where the peer listens.
        proto: our protocol id; the peer's must be its partner.
        peer: the protocol id the peer must announce.
        timeout: seconds allowed to connect and handshake.
        max_message_bytes: larger messages break the connection.
        tls: speak TLS with this context (the host name is verified against ``host``).
    """

    __slots__ = ("_buf", "_closed", "_max", "_sock")

    def __init__(self, host: str, port: int, proto: int, peer: int, *, timeout: float,
                 max_message_bytes: int, tls: Optional[ssl.SSLContext] = None) -> None:
        self._max = max_message_bytes
        self._buf = bytearray()
        self._closed = False
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as exc:
            raise TransportError(f"cannot connect to {host}:{port}: {exc}") from None
        if tls is not None:
            try:
                sock = tls.wrap_socket(sock, server_hostname=host)
            except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
                sock.close()
                raise TransportError(f"TLS handshake with {host}:{port} failed: {exc}") from None
        self._sock = sock
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(_SP_HEADER.pack(_SP_MAGIC, proto, 0))
            head = self._read_exact(_SP_HEADER.size, timeout)
            if head is None:
                raise TransportError("no SP header from the peer")
            magic, their, reserved = _SP_HEADER.unpack(head)
            if magic != _SP_MAGIC or reserved != 0:
                raise TransportError("peer is not an NNG socket (bad SP header)")
            if their != peer:
                raise TransportError(f"peer speaks protocol 0x{their:x}, expected 0x{peer:x}")
        except BaseException:
            self.close()
            raise

    def _fill(self, want: int, timeout: Optional[float]) -> bool:
        """Read until the buffer holds ``want`` bytes; False on timeout."""
        buf = self._buf
        sock = self._sock
        try:
            sock.settimeout(timeout)
        except OSError as exc:  # closed from another thread
            raise TransportError(f"connection closed: {exc}") from None
        while len(buf) < want:
            try:
                chunk = sock.recv(_CHUNK)  # never sized by a length the peer claims
            except socket.timeout:
                return False
            except OSError as exc:
                self.close()
                raise TransportError(f"connection lost: {exc}") from None
            if not chunk:
                self.close()
                raise TransportError("connection closed by the peer")
            buf += chunk
        return True

    def _read_exact(self, n: int, timeout: Optional[float]) -> Optional[bytes]:
        if not self._fill(n, timeout):
            return None
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    def recv(self, timeout: Optional[float]) -> Optional[bytes]:
        """The next message, or ``None`` if none completed within ``timeout`` seconds.

        A partly received message stays buffered for the next call.

        Raises:
            TransportError: the connection broke or a length exceeds the limit.
        """
        if not self._fill(8, timeout):
            return None
        (size,) = _LENGTH.unpack_from(self._buf, 0)
        if size > self._max:
            self.close()
            raise TransportError(f"message of {size} bytes exceeds the {self._max}-byte limit")
        if not self._fill(8 + size, timeout):
            return None
        view = memoryview(self._buf)
        out = bytes(view[8:8 + size])  # one copy (a bytearray slice would make two)
        view.release()
        del self._buf[:8 + size]
        return out

    def send(self, body: bytes) -> None:
        try:
            self._sock.sendall(_LENGTH.pack(len(body)) + body)
        except OSError as exc:
            raise TransportError(f"cannot send: {exc}") from None

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            with contextlib.suppress(OSError):  # already reset by the peer
                self._sock.shutdown(socket.SHUT_RDWR)
            self._sock.close()


class TcpSub:
    """A SUB connection over pure-Python TCP or TLS (topic filtering is done by the caller)."""

    __slots__ = ("_conn", "_host", "_max", "_port", "_timeout", "_tls")

    events_need_poll = False

    def __init__(self, host: str, port: int, *, connect_timeout: float,
                 max_message_bytes: int, tls: Optional[ssl.SSLContext] = None) -> None:
        self._host, self._port = host, port
        self._timeout = connect_timeout
        self._max = max_message_bytes
        self._tls = tls
        self._conn: Optional[TcpConnection] = None

    def connect(self) -> None:
        """Connect and handshake once.

        Raises:
            TransportError: the relay is unreachable or not an NNG PUB socket.
        """
        self._conn = TcpConnection(self._host, self._port, PROTO_SUB, PROTO_PUB,
                                   timeout=self._timeout, max_message_bytes=self._max,
                                   tls=self._tls)

    def recv(self, timeout: float) -> Optional[bytes]:
        conn = self._conn
        if conn is None:
            raise TransportError("not connected")
        return conn.recv(timeout)

    def take_events(self) -> Deque[Tuple[str, str]]:
        return deque()

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


class PynngSub:
    """A SUB socket through pynng (for ``ipc://``); pynng redials by itself."""

    __slots__ = ("_events", "_lock", "_max", "_pynng", "_sock", "_topics", "_url")

    def __init__(self, url: str, topics: Tuple[bytes, ...], *, max_message_bytes: int) -> None:
        import pynng  # noqa: PLC0415 - optional, only for addresses the pure transport lacks

        self._pynng: Any = pynng
        self._url = url
        self._topics = topics
        self._max = max_message_bytes
        self._sock: Any = None
        self._lock = threading.Lock()
        self._events: Deque[Tuple[str, str]] = deque()

    def connect(self) -> None:
        sock = self._pynng.Sub0()
        sock.recv_max_size = self._max
        for topic in self._topics:
            sock.subscribe(topic)
        sock.add_post_pipe_connect_cb(lambda _p: self._events.append(("connected", "")))
        sock.add_post_pipe_remove_cb(lambda _p: self._events.append(("disconnected",
                                                                     "pipe closed")))
        sock.dial(self._url, block=False)
        self._sock = sock

    def recv(self, timeout: float) -> Optional[bytes]:
        sock = self._sock
        if sock is None:
            raise TransportError("not connected")
        sock.recv_timeout = max(1, int(timeout * 1000))
        try:
            msg: bytes = sock.recv()
        except self._pynng.Timeout:
            return None
        except self._pynng.NNGException as exc:
            raise TransportError(str(exc)) from None
        return msg

    def take_events(self) -> Deque[Tuple[str, str]]:
        return take_all(self._events)

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()


def take_all(events: Deque[Tuple[str, str]]) -> Deque[Tuple[str, str]]:
    """Move the ``(kind, reason)`` events another thread queued into a new deque."""
    out: Deque[Tuple[str, str]] = deque()
    while events:
        out.append(events.popleft())
    return out


class Requester:
    """A REQ connection kept open for several requests (one at a time).

    Pure-Python TCP for ``tcp://`` (TLS for ``tls+tcp://``), pynng for ``ipc://``. A broken
    connection is dropped and the next request connects again; a request that fails is not
    retried.

    Args:
        url: the REP socket's address.
        timeout: seconds allowed to connect and for each reply.
        max_message_bytes: refuse larger replies.
        tls: the client TLS context for ``tls+tcp://`` (default: a verifying one with the
            system's trust store).
    """

    __slots__ = ("_conn", "_host", "_max", "_port", "_scheme", "_timeout", "_tls", "_url")

    def __init__(self, url: str, *, timeout: float, max_message_bytes: int,
                 tls: Optional[ssl.SSLContext] = None) -> None:
        self._scheme, self._host, self._port = parse_url(url)
        if self._scheme != "tls+tcp":
            tls = None
        elif tls is None:
            tls = client_tls_context()
        self._tls = tls
        self._url = url
        self._timeout = timeout
        self._max = max_message_bytes
        self._conn: Optional[TcpConnection] = None

    def __enter__(self) -> Requester:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, body: bytes) -> bytes:
        """Send one request and return the reply body.

        Raises:
            TransportError: unreachable, timed out, or a protocol violation.
        """
        if self._scheme == "ipc":
            return _pynng_request(self._url, body, self._timeout, self._max)
        conn = self._conn
        if conn is None:
            conn = self._conn = TcpConnection(self._host, self._port, PROTO_REQ, PROTO_REP,
                                              timeout=self._timeout,
                                              max_message_bytes=self._max + 4, tls=self._tls)
        try:
            req_id = int.from_bytes(os.urandom(4), "big") | 0x80000000
            conn.send(_REQ_ID.pack(req_id) + body)
            reply = conn.recv(self._timeout)
            if reply is None:
                raise TransportError(f"no reply from {self._url} within {self._timeout} s")
            if len(reply) < 4 or _REQ_ID.unpack_from(reply)[0] != req_id:
                raise TransportError("reply does not answer our request")
        except BaseException:
            self.close()  # a late reply must not answer the next request
            raise
        return reply[4:]

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


def request(url: str, body: bytes, *, timeout: float, max_message_bytes: int,
            tls: Optional[ssl.SSLContext] = None) -> bytes:
    """Send one REQ message to a REP socket and return the reply body.

    Uses pure-Python TCP for ``tcp://`` (and TLS for ``tls+tcp://``: ``tls`` or a default
    verifying context) and pynng for ``ipc://``.

    Raises:
        TransportError: unreachable, timed out, or a protocol violation.
        ValueError: an unsupported URL.
    """
    with Requester(url, timeout=timeout, max_message_bytes=max_message_bytes, tls=tls) as req:
        return req.request(body)


def _pynng_request(url: str, body: bytes, timeout: float, max_message_bytes: int) -> bytes:
    import pynng  # noqa: PLC0415 - optional

    ms = max(1, int(timeout * 1000))
    with pynng.Req0(recv_timeout=ms, send_timeout=ms) as sock:
        sock.recv_max_size = max_message_bytes
        try:
            sock.dial(url, block=True)
            sock.send(body)
            reply: bytes = sock.recv()
        except pynng.NNGException as exc:
            raise TransportError(f"{url}: {exc}") from None
    return reply
