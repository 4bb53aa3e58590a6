"""What the relay's REQ/REP services (snapshot, history) share beyond
:meth:`relay.security.Security.listen`, which opens their sockets."""

from __future__ import annotations

import pynng

__all__ = ["recv_request"]


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
