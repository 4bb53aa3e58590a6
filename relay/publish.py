"""NNG ``Pub0`` publishing on every configured address.

One socket listens on all addresses (IPC for the same host, TCP for others), so a message is
handed to NNG once. Pub/sub never waits for a slow subscriber: NNG drops messages for a peer
whose queue is full, and the sequence numbers in every ``SpotList`` make such drops visible to
that subscriber.

The socket is opened by :meth:`relay.security.Security.listen`, like every listening socket
of the relay (allow-list, TLS). A subscriber never sends anything: the socket's receive limit
is tiny, so whatever a hostile peer writes to it cannot make the relay buffer much.
"""

from __future__ import annotations

import threading
from typing import Iterable, List, Optional, Sequence

import pynng

from relay.security import Security
from relay.wire import END, START

__all__ = ["Publisher"]

_RECV_MAX = 4096  # a subscriber sends nothing; NNG drops a peer that sends more than this


class Publisher:
    """Publishes framed spot batches and relay messages.

    Args:
        addresses: ``ipc://``, ``tcp://`` and ``tls+tcp://`` URLs to listen on.
        send_buffer: messages NNG queues per subscriber before dropping for that subscriber.
            A full-market batch is a few messages, so the default holds several batches.
            Queued messages are shared between subscribers (NNG counts references), so a
            subscriber that stops reading costs at most this many messages, plus its kernel
            socket buffer.
        security: allow-list and TLS; ``Security()`` (everyone, no TLS) by default.
    """

    __slots__ = ("_addresses", "_lock", "_security", "_send_buffer", "_socket", "_subscribers",
                 "bytes_sent", "messages_sent")

    def __init__(self, addresses: Sequence[str], *, send_buffer: int = 256,
                 security: Optional[Security] = None) -> None:
        self._addresses = tuple(addresses)
        self._send_buffer = send_buffer
        self._security = security or Security()
        self._socket: Optional[pynng.Pub0] = None
        self._subscribers = 0
        self._lock = threading.Lock()  # pipe callbacks run on NNG's threads
        self.messages_sent = 0
        self.bytes_sent = 0

    @property
    def addresses(self) -> Sequence[str]:
        return self._addresses

    @property
    def subscribers(self) -> int:
        """Subscribers connected right now (over all addresses)."""
        return self._subscribers

    def start(self) -> None:
        """Listen on every address.

        Raises:
            PublishError: an address is invalid, in use, or not permitted; nothing stays open.
        """
        def prepare(sock: pynng.Socket) -> None:
            sock.add_post_pipe_connect_cb(self._on_connect)
            sock.add_post_pipe_remove_cb(self._on_remove)

        self._socket = self._security.listen(
            pynng.Pub0, self._addresses, service="publish", prepare=prepare,
            send_buffer_size=self._send_buffer, recv_max_size=_RECV_MAX)

    def _on_connect(self, _pipe: pynng.Pipe) -> None:
        with self._lock:
            self._subscribers += 1

    def _on_remove(self, _pipe: pynng.Pipe) -> None:
        with self._lock:
            self._subscribers = max(0, self._subscribers - 1)

    def send(self, message: bytes) -> None:
        """Publish one message; never waits for subscribers."""
        sock = self._socket
        if sock is None:
            raise RuntimeError("publisher is not started")
        sock.send(message)
        self.messages_sent += 1
        self.bytes_sent += len(message)

    def send_batch(self, messages: Iterable[bytes]) -> List[bytes]:
        """Publish one spot batch framed as hikyuu expects: start tag, data, end tag.

        ``messages`` may be a generator: each message goes out as soon as it is produced.
        Returns the data messages sent.
        """
        sent = []
        self.send(START)
        try:
            for message in messages:
                self.send(message)
                sent.append(message)
        finally:
            self.send(END)  # close the frame even if encoding failed half way
        return sent

    def close(self) -> None:
        """Close the socket (idempotent); NNG removes the IPC socket files."""
        sock, self._socket = self._socket, None
        if sock is not None:
            sock.close()

