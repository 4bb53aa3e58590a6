"""NNG ``Pub0`` publishing on every configured address.

One socket listens on all addresses (IPC for the same host, TCP for others), so a message is
handed to NNG once. Pub/sub never waits for a slow subscriber: NNG drops messages for a peer
whose queue is full, and the sequence numbers in every ``SpotList`` make such drops visible to
that subscriber.
"""

from __future__ import annotations

import threading
from typing import Iterable, List, Optional, Sequence

import pynng

from relay.errors import PublishError
from relay.wire import END, START

__all__ = ["Publisher"]


class Publisher:
    """Publishes framed spot batches and relay messages.

    Args:
        addresses: ``ipc://`` and ``tcp://`` URLs to listen on.
        send_buffer: messages NNG queues per subscriber before dropping for that subscriber.
            A full-market batch is a few messages, so the default holds several batches.
    """

    __slots__ = ("_addresses", "_lock", "_send_buffer", "_socket", "_subscribers", "bytes_sent",
                 "messages_sent")

    def __init__(self, addresses: Sequence[str], *, send_buffer: int = 256) -> None:
        self._addresses = tuple(addresses)
        self._send_buffer = send_buffer
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
        sock = pynng.Pub0()
        sock.send_buffer_size = self._send_buffer
        sock.add_post_pipe_connect_cb(self._on_connect)
        sock.add_post_pipe_remove_cb(self._on_remove)
        for address in self._addresses:
            try:
                sock.listen(address)
            except pynng.exceptions.NNGException as exc:
                sock.close()
                raise PublishError(address, _describe(exc)) from None
        self._socket = sock

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


def _describe(exc: Exception) -> str:
    if isinstance(exc, pynng.exceptions.AddressInUse):
        return "address in use (is another relay or hikyuu producer running?)"
    if isinstance(exc, pynng.exceptions.PermissionDenied):
        return "permission denied"
    if isinstance(exc, pynng.exceptions.AddressInvalid):
        return "invalid address"
    return str(exc) or exc.__class__.__name__
