"""The history service: the relay's hikyuu data directory over NNG REQ/REP.

:class:`HistoryService` is a sink of the relay only for its lifecycle (``write`` does
nothing): a thread of its own answers requests on a ``Rep0`` socket, so a large request never
delays publishing or the snapshot service. Requests and replies are
:mod:`relay.history.protocol` (JSON in, ``schemas/bars.fbs`` out).

Every request is answered, a bad one with an error reply; the work of one request is bounded
by the reply size (``history.max_reply_bytes``): bars beyond it are left for the next page.
Files are opened per request, read-only and without HDF5's file lock, so the importer (a
separate process) can always open them for writing; a file whose size or modification time
changed while a request read it is answered with a "retry" error rather than a possibly torn
read. Only committed rows (the store's commit record, ``/relay_state``) are served.
"""

from __future__ import annotations

import hashlib
import os
import threading
from typing import TYPE_CHECKING, Any, Dict, List, NamedTuple, Optional, Tuple

import h5py
import numpy as np
import numpy.typing as npt
import pynng
import structlog

from relay.client._history import (
    BAR_SIZE,
    INDEX_SIZE,
    KIND_BARS,
    KIND_SYNC,
    STATUS_CHANGED,
    STATUS_MISSING,
    STATUS_OK,
    SYNC_WINDOW,
    CatalogueSlice,
    TableSlice,
)
from relay.config import Config, service_addresses
from relay.errors import HistoryRequestError
from relay.history.protocol import (
    BarsRequest,
    CatalogueRequest,
    FileRequest,
    FilesRequest,
    Request,
    SyncRequest,
    catalogue_reply,
    error_reply,
    file_reply,
    files_reply,
    parse_request,
    tables_reply,
)
from relay.history.store import (
    BAR_DTYPE,
    INDEX_DTYPE,
    INDEX_GROUPS,
    commit_record,
    file_name,
    iter_files,
    open_table,
    read_table,
    search_datetime,
)
from relay.security import Security
from relay.sinks._rep import recv_request
from relay.supervise import ServiceHandle, Supervisor

if TYPE_CHECKING:
    from relay.sinks import PublishedBatch

__all__ = ["HistoryService", "digest_rows"]

log = structlog.get_logger("relay.history.service")

_POLL_MS = 200
_TABLE_OVERHEAD = 192           # bytes a Table costs beyond its records, at most
_CATALOGUE_ENTRY = 64           # bytes a catalogue entry costs, at most for 16-letter codes
_CATALOGUE_READS = 1000         # tables per catalogue page with ranges (two reads each)


def digest_rows(data: bytes) -> str:
    """The digest a ``sync`` request carries: BLAKE2b-128 of the records' bytes, in hex."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def canonical(rows: npt.NDArray[np.void], dtype: np.dtype[np.void]) -> bytes:
    """Rows as the wire's bytes: fields of ``dtype`` by name, little-endian, packed.

    A table written by another tool may order or type its fields differently (hikyuu
    matches fields by name); a field it lacks reads as 0, as in hikyuu.
    """
    if rows.dtype == dtype:
        return rows.tobytes()
    out = np.zeros(rows.shape[0], dtype=dtype)
    names = rows.dtype.names or ()
    for name in dtype.names or ():
        if name in names:
            out[name] = rows[name]
    return out.tobytes()


def _generation(path: str) -> int:
    st = os.stat(path)
    return hash((st.st_mtime_ns, st.st_size, st.st_ino)) & 0xFFFF_FFFF_FFFF_FFFF


class _Listing(NamedTuple):
    """One file's tables as of ``generation``; ``ranges`` fills as catalogue pages are read."""

    generation: int
    indexes: Tuple[str, ...]
    names: List[str]
    ranges: Dict[str, Tuple[int, int, int]]   # name -> (rows, first, last)


def _committed(ds: Any, mark: Optional[Tuple[int, ...]]) -> int:
    """Rows of ``ds`` to serve: its committed rows when the store wrote it, else all."""
    n = int(ds.shape[0])
    return n if mark is None else min(n, mark[0])


def _range(ds: h5py.Dataset, mark: Optional[Tuple[int, ...]]) -> Tuple[int, int, int]:
    rows = _committed(ds, mark)
    if not rows:
        return 0, 0, 0
    return rows, int(ds[0]["datetime"]), int(ds[rows - 1]["datetime"])


class _Busy(Exception):
    """The file changed while a request read it."""


class HistoryService:
    """Serves a hikyuu data directory to mirrors and ``relay.client.fetch_bars``.

    Args:
        address: where the REP socket listens (``tcp://`` or ``ipc://``).
        directory: the hikyuu data directory (``history.dir``); it may not exist yet.
        max_reply_bytes: replies are paged under this size.
        max_request_bytes: longer requests get an error reply.
        supervisor: runs the serving thread (restarted if it dies); a private one if None.
        security: allow-list and TLS for the REP socket; ``Security()`` by default.
    """

    def __init__(self, address: str, directory: str, *, max_reply_bytes: int = 4 << 20,
                 max_request_bytes: int = 1 << 20, supervisor: Optional[Supervisor] = None,
                 security: Optional[Security] = None) -> None:
        self.address = address
        self.directory = directory
        self._max_reply = max_reply_bytes
        self._max_request = max_request_bytes
        self._socket: Optional[pynng.Rep0] = None
        self._supervisor = supervisor or Supervisor()
        self._security = security or Security()
        self._thread: Optional[ServiceHandle] = None
        self._stop = threading.Event()
        self._listings: Dict[str, _Listing] = {}   # by file path
        self._records: Dict[str, Tuple[int, Dict[str, Tuple[int, int, int, int]]]] = {}
        self.requests = 0
        self.errors = 0

    @classmethod
    def from_config(cls, config: Config, *, supervisor: Optional[Supervisor] = None,
                    security: Optional[Security] = None) -> HistoryService:
        """The service at the port plan's history address, serving ``history.dir``."""
        address = service_addresses(config).history
        if address is None:
            raise ValueError("the history service is turned off in this config")
        hist = config.history
        return cls(address, hist.dir, max_reply_bytes=hist.max_reply_bytes,
                   max_request_bytes=hist.max_request_bytes, supervisor=supervisor,
                   security=security)

    def counters(self) -> Dict[str, int]:
        """Counters for the metrics endpoint."""
        return {"history_requests": self.requests, "history_errors": self.errors}

    # -- sink protocol ---------------------------------------------------------------------

    def start(self) -> None:
        """Listen and start the serving thread.

        Raises:
            PublishError: the address is invalid or in use.
        """
        self._socket = self._security.listen(
            pynng.Rep0, [self.address], service="history", recv_timeout=_POLL_MS,
            send_timeout=10_000, recv_max_size=4 * self._max_request + 1024)
        self._stop.clear()
        self._thread = self._supervisor.thread("history", self._serve)
        log.info("history_serving", address=self.address, dir=self.directory)

    def write(self, batch: PublishedBatch) -> None:
        """Nothing to do: the service serves files, not the stream."""

    def close(self) -> None:
        """Stop serving and close the socket (idempotent)."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.stop()
            thread.join(10)
        sock, self._socket = self._socket, None
        if sock is not None:
            sock.close()

    def _serve(self) -> None:
        sock = self._socket
        assert sock is not None
        while not self._stop.is_set():
            try:
                body = recv_request(sock)
            except pynng.Timeout:
                continue
            except pynng.exceptions.NNGException:
                if self._stop.is_set():
                    return
                log.exception("history_recv_failed")
                continue
            try:
                sock.send(self.handle(body))
            except pynng.exceptions.NNGException as exc:
                log.warning("history_send_failed", error=repr(exc))
            except Exception as exc:  # never a dead service thread
                log.exception("history_send_failed", error=repr(exc))

    # -- requests --------------------------------------------------------------------------

    def handle(self, body: bytes) -> bytes:
        """The reply to one request; never raises (a failure becomes an error reply)."""
        self.requests += 1
        try:
            request = parse_request(body, max_bytes=self._max_request)
            return self._dispatch(request)
        except HistoryRequestError as exc:
            self.errors += 1
            log.info("history_request_refused", reason=exc.reason)
            return error_reply(exc.reason)
        except (_Busy, OSError, KeyError) as exc:
            # a file being written by the importer right now: the requester retries
            self.errors += 1
            log.info("history_file_busy", error=repr(exc))
            return error_reply(f"busy: the file is being written, retry ({exc})")
        except Exception as exc:  # never a dead service: the request fails, not the thread
            self.errors += 1
            log.exception("history_request_failed", error=repr(exc))
            return error_reply(f"internal error: {exc!r}")

    def _dispatch(self, request: Request) -> bytes:
        if isinstance(request, FilesRequest):
            return self._files()
        if isinstance(request, CatalogueRequest):
            return self._catalogue(request)
        if isinstance(request, FileRequest):
            return self._copy(request)
        if isinstance(request, BarsRequest):
            return self._bars(request)
        return self._sync(request)

    def _budget(self, asked: Optional[int]) -> int:
        return min(self._max_reply, asked or self._max_reply) - 512

    def _path(self, market: str, period: str) -> str:
        return os.path.join(self.directory, file_name(market, period))

    def _open(self, path: str) -> Tuple[h5py.File, int]:
        generation = _generation(path)
        # no HDF5 file lock: the importer must always be able to open the file for writing
        return h5py.File(path, "r", locking=False), generation

    def _marks(self, path: str, file: h5py.File, generation: int
               ) -> Dict[str, Tuple[int, int, int, int]]:
        """The store's commit record of ``file`` (cached until the file changes)."""
        cached = self._records.get(path)
        if cached is not None and cached[0] == generation:
            return cached[1]
        marks = commit_record(file)
        self._records[path] = (generation, marks)
        return marks

    @staticmethod
    def _same(path: str, generation: int) -> None:
        if _generation(path) != generation:
            raise _Busy("the file changed while it was read")

    def _files(self) -> bytes:
        files = []
        for market, period, path in iter_files(self.directory):
            listing = self._listing(path, period)
            files.append(CatalogueSlice(market, period, listing.indexes, len(listing.names), 0,
                                        [], [], [], []))
        return files_reply(files)

    def _listing(self, path: str, period: str) -> _Listing:
        """The file's table names and index groups (cached until the file changes)."""
        cached = self._listings.get(path)
        if cached is not None and cached.generation == _generation(path):
            return cached
        file, generation = self._open(path)
        with file:
            indexes = tuple(g for g in INDEX_GROUPS[period] if g in file)
            data = file.get("data")
            names = sorted(data.keys()) if isinstance(data, h5py.Group) else []
        self._same(path, generation)
        listing = self._listings[path] = _Listing(generation, indexes, names, {})
        return listing

    def _catalogue(self, request: CatalogueRequest) -> bytes:
        path = self._path(request.market, request.period)
        if not os.path.exists(path):
            raise HistoryRequestError(f"no {request.period} file for {request.market}")
        listing = self._listing(path, request.period)
        per_page = max(1, self._budget(None) // _CATALOGUE_ENTRY)
        if not request.codes_only:
            per_page = min(per_page, _CATALOGUE_READS)   # reads two rows of every table
        names = listing.names[request.offset:request.offset + per_page]
        rows: List[int] = []
        first: List[int] = []
        last: List[int] = []
        if not request.codes_only and names:
            known = listing.ranges
            missing = [name for name in names if name not in known]
            if missing:
                file, generation = self._open(path)
                if generation != listing.generation:
                    file.close()
                    raise _Busy("the file changed between catalogue pages")
                with file:
                    marks = self._marks(path, file, generation)
                    for name in missing:
                        ds = file.get(f"data/{name}")
                        known[name] = (_range(ds, marks.get(name))
                                       if isinstance(ds, h5py.Dataset) else (0, 0, 0))
                self._same(path, generation)
            rows, first, last = (list(col) for col in zip(*(known[n] for n in names)))
        return catalogue_reply(CatalogueSlice(
            request.market, request.period, listing.indexes, len(listing.names),
            request.offset, [n[2:] for n in names], rows, first, last), listing.generation)

    def _bars(self, request: BarsRequest) -> bytes:
        path = self._path(request.market, request.period)
        if not os.path.exists(path):
            raise HistoryRequestError(f"no {request.period} file for {request.market}")
        budget = max(1, (self._budget(request.max_bytes) - _TABLE_OVERHEAD) // BAR_SIZE)
        file, generation = self._open(path)
        with file:
            ds = file.get(f"data/{request.market}{request.code}")
            if not isinstance(ds, h5py.Dataset):
                table = TableSlice(request.code, "data", STATUS_MISSING, 0, 0, b"", 0, True)
                return tables_reply(KIND_BARS, request.market, request.period, [table])
            rows = _committed(ds, self._marks(path, file, generation).get(
                request.market + request.code))
            low = request.start
            if request.after is not None:
                low = max(low or 0, request.after + 1)
            lo = 0 if low is None else search_datetime(ds, rows, low, "left")
            hi = rows if request.end is None else search_datetime(ds, rows, request.end,
                                                                  "right")
            hi = max(hi, lo)
            stop = min(hi, lo + budget)
            data = canonical(ds[lo:stop], BAR_DTYPE) if stop > lo else b""
        self._same(path, generation)
        table = TableSlice(request.code, "data", STATUS_OK, rows, lo, data, stop - lo, stop >= hi)
        return tables_reply(KIND_BARS, request.market, request.period, [table],
                            more=stop < hi, generation=generation)

    def _copy(self, request: FileRequest) -> bytes:
        """A page of the file's own bytes. The requester checks that the generation stays
        the same over all pages (else it starts again), and a page read while the file
        changed is refused here: a copy is never torn."""
        path = self._path(request.market, request.period)
        if not os.path.exists(path):
            raise HistoryRequestError(f"no {request.period} file for {request.market}")
        generation = _generation(path)
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            f.seek(min(request.offset, size))
            blob = f.read(max(0, self._budget(request.max_bytes) - 256))
        self._same(path, generation)
        return file_reply(request.market, request.period, blob, size, generation)

    def _sync(self, request: SyncRequest) -> bytes:
        path = self._path(request.market, request.period)
        if not os.path.exists(path):
            raise HistoryRequestError(f"no {request.period} file for {request.market}")
        budget = self._budget(request.max_bytes)
        out: List[TableSlice] = []
        answered = 0
        file, generation = self._open(path)
        with file:
            marks = self._marks(path, file, generation)
            for code, group, have, digest in request.tables:
                if out and budget < _TABLE_OVERHEAD + BAR_SIZE:
                    break
                table = self._sync_table(file, marks, request.market, code, group, have,
                                         digest, budget)
                budget -= _TABLE_OVERHEAD + len(table.data)
                out.append(table)
                if not table.complete:
                    break
                answered += 1
        self._same(path, generation)
        return tables_reply(KIND_SYNC, request.market, request.period, out, answered=answered,
                            generation=generation)

    @staticmethod
    def _sync_table(file: h5py.File, marks: Dict[str, Tuple[int, int, int, int]], market: str,
                    code: str, group: str, have: int, digest: str, budget: int) -> TableSlice:
        ds = open_table(file, f"{group}/{market}{code}")
        if ds is None:
            return TableSlice(code, group, STATUS_MISSING, 0, 0, b"", 0, True)
        is_data = group == "data"
        dtype, width = (BAR_DTYPE, BAR_SIZE) if is_data else (INDEX_DTYPE, INDEX_SIZE)
        derived = False
        mark = marks.get(market + code)
        chunk = 0 if mark is None else mark[2] if is_data else mark[3]
        if is_data:
            rows = _committed(ds, mark)
            # the store keeps this security's index tables derived from its data
            derived = mark is not None and mark[1] == rows
        else:
            rows = int(ds.shape[0])
        if have > rows:
            return TableSlice(code, group, STATUS_CHANGED, rows, 0, b"", 0, True)
        window = min(SYNC_WINDOW, have)
        fit = max(1, (budget - _TABLE_OVERHEAD) // width)
        stop = min(rows, have + fit)
        data = (read_table(ds, have - window, stop, dtype, chunk).tobytes()
                if stop > have - window else b"")
        if window and digest_rows(data[:window * width]) != digest:
            return TableSlice(code, group, STATUS_CHANGED, rows, 0, b"", 0, True)
        # the digest the requester's next sync request will carry (it may keep it)
        tail = digest_rows(data[-min(SYNC_WINDOW, stop) * width:]) if stop else ""
        return TableSlice(code, group, STATUS_OK, rows, have, data[window * width:],
                          stop - have, stop >= rows, derived, tail)


