"""Blocking subscriber: reassembles framed spot batches from the relay's stream."""

from __future__ import annotations

from typing import Any, Iterable, Iterator, List, NamedTuple, Optional

from relay.client._codec import decode_spot_list
from relay.errors import DecodeError
from relay.records import SpotRecord
from relay.wire import END, HEARTBEAT_PREFIX, SPOT_PREFIX, START

__all__ = ["Batch", "Subscriber"]

_PREFIX_LEN = len(SPOT_PREFIX)


class Batch(NamedTuple):
    """Every record published between one ``[start spot]`` and ``[end spot]`` pair."""

    records: List[SpotRecord]
    first_seq: Optional[int]
    last_seq: Optional[int]
    run_id: Optional[str]
    source: Optional[str]
    publish_time_ms: Optional[int]


class Subscriber:
    """Subscribe to a relay and iterate over complete batches.

    Args:
        url: the relay's address, ``tcp://HOST:PORT`` or ``ipc://PATH``.
        codes: only keep these securities (``"600000.SH"`` or ``"600000"``); ``None`` = all.
        timeout: seconds to wait for a message before :meth:`recv_message` returns ``None``.
        on_error: called with each :class:`DecodeError`; the message is skipped either way.
    """

    def __init__(
        self,
        url: str,
        *,
        codes: Optional[Iterable[str]] = None,
        timeout: float = 1.0,
        on_error: Optional[Any] = None,
    ) -> None:
        import pynng  # noqa: PLC0415 - optional: the pure-Python transport needs no pynng

        self.url = url
        self._pynng = pynng
        self._socket = pynng.Sub0(recv_timeout=int(timeout * 1000))
        self._socket.subscribe(SPOT_PREFIX)
        self._socket.subscribe(HEARTBEAT_PREFIX)
        self._socket.dial(url, block=False)
        wanted = set(codes) if codes is not None else None
        self._wanted = wanted
        self._on_error = on_error
        self.decode_errors = 0
        self.last_heartbeat: Optional[bytes] = None

    def _keep(self, rec: SpotRecord) -> bool:
        wanted = self._wanted
        return wanted is None or rec.code in wanted or f"{rec.code}.{rec.market}" in wanted

    def recv_message(self) -> Optional[bytes]:
        """One raw message, or ``None`` after ``timeout`` seconds without one."""
        try:
            msg: bytes = self._socket.recv()
        except self._pynng.Timeout:
            return None
        return msg

    def __iter__(self) -> Iterator[Batch]:
        return self.batches()

    def batches(self) -> Iterator[Batch]:
        """Yield complete batches until :meth:`close` (waits through silence)."""
        in_batch = False
        parts: List[Any] = []
        while True:
            try:
                msg = self.recv_message()
            except self._pynng.Closed:
                return
            if msg is None:
                continue
            if msg == START:
                in_batch, parts = True, []
            elif msg == END:
                if in_batch:
                    yield self._assemble(parts)
                in_batch = False
            elif msg.startswith(HEARTBEAT_PREFIX):
                self.last_heartbeat = msg
            elif in_batch and msg.startswith(SPOT_PREFIX):
                try:
                    parts.append(decode_spot_list(msg, _PREFIX_LEN))
                except DecodeError as exc:
                    self.decode_errors += 1
                    if self._on_error is not None:
                        self._on_error(exc)

    def _assemble(self, parts: List[Any]) -> Batch:
        records: List[SpotRecord] = []
        for part in parts:
            if self._wanted is None:
                records.extend(part.records)
            else:
                records.extend(r for r in part.records if self._keep(r))
        first = parts[0] if parts else None
        last = parts[-1] if parts else None
        return Batch(
            records,
            first.seq if first else None,
            last.seq if last else None,
            first.run_id if first else None,
            first.source if first else None,
            first.publish_time_ms if first else None,
        )

    def close(self) -> None:
        self._socket.close()

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
