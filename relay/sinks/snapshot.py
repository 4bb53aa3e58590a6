"""Late-joiner service: the latest record of every security, served over NNG REQ/REP.

:class:`SnapshotService` is a sink. ``write()`` runs on the relay's event loop and only
appends the published batch to a queue; a thread of its own folds queued batches into a
``{(market, code): SpotRecord}`` table and answers requests on a pynng ``Rep0`` socket, so
neither a slow requester nor a large reply ever delays publishing. The request/reply format
is in :mod:`relay.client._snapshot` (shared with the subscriber library).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from typing import Callable, Deque, Dict, Iterable, List, Optional, Tuple

import pynng
import structlog

from relay.client._snapshot import (
    ERROR_PREFIX,
    SNAPSHOT_REQUEST,
    encode_snapshot_reply,
)
from relay.config import Config, service_addresses
from relay.encode import SpotEncoder
from relay.records import SpotRecord
from relay.security import Security
from relay.sinks import PublishedBatch
from relay.sinks._rep import recv_request
from relay.supervise import ServiceHandle, Supervisor

__all__ = ["SnapshotService"]

log = structlog.get_logger("relay.sinks.snapshot")

_POLL_MS = 200
_SEND_TIMEOUT_MS = 5000
_REQUEST_MAX = 1024  # requests are a few bytes; NNG drops a peer that sends a bigger one


class SnapshotService:
    """Keeps the latest record per security and serves it to late joiners.

    Args:
        address: where the REP socket listens (``tcp://`` or ``ipc://``).
        max_message_bytes: size limit of each ``SpotList`` inside a reply.
        clock: epoch seconds, for the reply's ``time_ms``.
        supervisor: runs the serving thread (restarted if it dies); a private one if None.
        security: allow-list and TLS for the REP socket; ``Security()`` by default.
    """

    def __init__(self, address: str, *, max_message_bytes: int = 512 * 1024,
                 clock: Callable[[], float] = time.time,
                 supervisor: Optional[Supervisor] = None,
                 security: Optional[Security] = None) -> None:
        self.address = address
        self._max = max_message_bytes
        self._clock = clock
        self._lock = threading.Lock()  # fold() runs on our thread and in callers' threads
        self._pending: Deque[PublishedBatch] = deque()
        self._latest: Dict[Tuple[str, str], SpotRecord] = {}
        self._seq = 0
        self._run_id = ""
        self._source = ""
        self._socket: Optional[pynng.Rep0] = None
        self._supervisor = supervisor or Supervisor()
        self._security = security or Security()
        self._thread: Optional[ServiceHandle] = None
        self._stop = threading.Event()
        self.requests = 0
        self.bad_requests = 0

    @classmethod
    def from_config(cls, config: Config, *, supervisor: Optional[Supervisor] = None,
                    security: Optional[Security] = None) -> SnapshotService:
        """The service at the port plan's snapshot address (see ``service_addresses``)."""
        address = service_addresses(config).snapshot
        if address is None:
            raise ValueError("the snapshot service is turned off in this config")
        return cls(address, max_message_bytes=config.publish.max_message_bytes,
                   supervisor=supervisor, security=security)

    # -- sink protocol ---------------------------------------------------------------------

    def counters(self) -> Dict[str, int]:
        """Counters for the metrics endpoint."""
        return {"snapshot_requests": self.requests}

    def start(self) -> None:
        """Listen and start the serving thread.

        Raises:
            PublishError: the address is invalid or in use.
        """
        self._socket = self._security.listen(
            pynng.Rep0, [self.address], service="snapshot", recv_timeout=_POLL_MS,
            send_timeout=_SEND_TIMEOUT_MS, recv_max_size=_REQUEST_MAX)
        self._stop.clear()
        self._thread = self._supervisor.thread("snapshot", self._serve)
        log.info("snapshot_serving", address=self.address)

    def write(self, batch: PublishedBatch) -> None:
        """Queue a published batch (O(1) on the event loop; folded in on our thread)."""
        self._pending.append(batch)

    def close(self) -> None:
        """Stop serving and close the socket (idempotent)."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.stop()
            thread.join(5)
        sock, self._socket = self._socket, None
        if sock is not None:
            sock.close()

    # -- table -----------------------------------------------------------------------------

    def fold(self) -> None:
        """Apply every queued batch to the latest-record table."""
        with self._lock:
            self._fold()

    def _fold(self) -> None:
        pending, latest = self._pending, self._latest
        while pending:
            batch = pending.popleft()
            columns = batch.columns
            records = batch.records
            keys: Iterable[Tuple[str, str]]
            if columns is not None:
                keys = zip(columns.market, columns.code)
            else:
                keys = ((r.market, r.code) for r in records)
            latest.update(zip(keys, records))
            self._seq = batch.first_seq + len(batch.messages) - 1
            self._run_id, self._source = batch.run_id, batch.source

    @property
    def securities(self) -> int:
        """Securities in the table (after folding what is queued)."""
        self.fold()
        return len(self._latest)

    def reply(self) -> bytes:
        """The full snapshot reply, as of the last folded batch."""
        with self._lock:
            self._fold()
            records: List[SpotRecord] = list(self._latest.values())
            run_id, source, seq = self._run_id, self._source, self._seq
        now_ms = int(self._clock() * 1000)
        messages: List[bytes] = []
        if records:
            encoder = SpotEncoder(run_id, source, self._max)
            messages = encoder.encode(records, first_seq=0, publish_time_ms=now_ms)
        header = {"run_id": run_id, "source": source, "seq": seq, "records": len(records),
                  "time_ms": now_ms}
        return encode_snapshot_reply(header, messages)

    # -- serving thread --------------------------------------------------------------------

    def _serve(self) -> None:
        sock = self._socket
        assert sock is not None
        while not self._stop.is_set():
            self.fold()
            try:
                request = recv_request(sock)
            except pynng.Timeout:
                continue
            except pynng.exceptions.NNGException:
                if self._stop.is_set():
                    return
                log.exception("snapshot_recv_failed")
                continue
            if request is None:
                continue
            try:
                if request == SNAPSHOT_REQUEST:
                    self.requests += 1
                    answer = self.reply()
                else:
                    self.bad_requests += 1  # hostile or confused peer: answered, counted
                    answer = ERROR_PREFIX + b"unknown request"
                sock.send(answer)
            except pynng.exceptions.NNGException as exc:
                log.warning("snapshot_send_failed", error=repr(exc))
            except Exception as exc:
                log.exception("snapshot_failed", error=repr(exc))
                with contextlib.suppress(pynng.exceptions.NNGException):
                    sock.send(ERROR_PREFIX + b"internal error")
