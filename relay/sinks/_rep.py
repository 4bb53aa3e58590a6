"""The one place where the relay's REQ/REP services open their listening socket.

The snapshot and history services both listen through :func:`listen_rep`, so a setting that
every TCP service must honour (access rules, TLS) is added here once.
"""

from __future__ import annotations

import pynng

from relay.errors import PublishError

__all__ = ["listen_rep", "recv_request"]


def listen_rep(address: str, service: str, *, recv_timeout_ms: int, send_timeout_ms: int,
               recv_max_size: int = 0) -> pynng.Rep0:
    """A ``Rep0`` socket listening on ``address``.

    Args:
        address: ``tcp://HOST:PORT`` or ``ipc://PATH``.
        service: named in errors (``"snapshot service"``).
        recv_timeout_ms, send_timeout_ms: socket timeouts (the serving loop polls).
        recv_max_size: NNG drops the connection of a peer sending a larger request (0: no
            limit).

    Raises:
        PublishError: the address is invalid or in use.
    """
    sock = pynng.Rep0(recv_timeout=recv_timeout_ms, send_timeout=send_timeout_ms)
    if recv_max_size:
        sock.recv_max_size = recv_max_size
    try:
        sock.listen(address)
    except pynng.exceptions.NNGException as exc:
        sock.close()
        raise PublishError(address, f"{service}: {exc}") from None
    return sock


def recv_request(sock: pynng.Rep0) -> bytes:
    """The next request (``pynng.Timeout`` when none came within the socket's timeout).

    pynng cannot hand over a zero-length message (it raises ``RuntimeError`` after NNG
    received it): that request is returned as ``b""``, so the service answers it with an
    error instead of losing its serving thread.
    """
    try:
        body: bytes = sock.recv()
    except RuntimeError:
        return b""
    return body
