"""``qmt-relay history sync``: mirror a relay's history directory into a local one.

The mirror asks the relay's history service for its catalogue, then, file by file, sends
``sync`` requests listing each ``/data`` table it wants with the rows it already holds and a
digest of its last :data:`~relay.client._history.SYNC_WINDOW` rows. The relay answers with
the rows after them, or ``changed`` when its table does not hold those rows there (a
re-import, another start, a shorter table): the mirror then fetches that table whole.

Data rows are written through :mod:`relay.history.store` (staged, committed in crash-safe
phases after every reply), so a mirror killed at any moment stays readable and the next sync
completes it. The store derives the index tables from the data as it commits. When the
relay's own store derives a security's index tables too (the reply says so), the two are
equal by construction and no index row travels; otherwise (a directory another tool wrote)
the index tables are synced like the data, after the data commit, and written over the
derived ones where they differ, so the mirror's index tables are the relay's.
"""

from __future__ import annotations

import glob
import json
import os
import sys
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Deque, Dict, List, Optional, Sequence, Set, Tuple

import h5py
import numpy as np
import structlog

from relay.client._history import (
    KIND_FILE,
    KIND_SYNC,
    STATUS_CHANGED,
    STATUS_MISSING,
    STATUS_OK,
    SYNC_WINDOW,
    CatalogueSlice,
    TableSlice,
    catalogue_pages,
    checked,
    decode_reply,
    encode_request,
)
from relay.client._transport import Requester
from relay.errors import HistoryRequestError
from relay.history.service import digest_rows
from relay.history.store import (
    BAR_DTYPE,
    INDEX_DTYPE,
    DirectoryLock,
    HistoryFile,
    commit_record,
    file_name,
    open_file,
)
from relay.history.writers import emit, run_jobs, writer_count

__all__ = ["SyncSummary", "sync"]

log = structlog.get_logger("relay.history.sync")

_TABLES_PER_REQUEST = 3000      # about 200 KB of JSON
_TAILS_NAME = ".qmt-relay-sync.json"
_BUSY_RETRIES = 20
_BUSY_PAUSE = 0.5
_COPY_SUFFIX = ".copy-"
_COPY_ATTEMPTS = 5


@dataclass
class SyncSummary:
    """What a sync did."""

    files: int = 0
    tables: int = 0                 # data tables considered
    bars: int = 0                   # bars fetched and written
    index_rows: int = 0             # index rows fetched
    index_fixed: int = 0            # index tables written over with the relay's rows
    refetched: List[str] = field(default_factory=list)   # tables whose history had changed
    up_to_date: int = 0             # data tables that needed nothing
    requests: int = 0
    bytes: int = 0
    copied: int = 0                 # files the mirror lacked, copied whole
    elapsed: float = 0.0


Progress = Callable[[str, int, int, int], None]
"""``progress(file, tables done, tables in all, bars so far)``."""


def sync(url: str, directory: str, *, periods: Optional[Sequence[str]] = None,
         markets: Optional[Sequence[str]] = None, codes: Optional[Sequence[str]] = None,
         timeout: float = 60.0, max_reply_bytes: Optional[int] = None,
         progress: Optional[Progress] = None, writers: int = 0) -> SyncSummary:
    """Bring ``directory`` to the relay's content for what is asked.

    A file the mirror does not hold at all is copied whole (the relay's HDF5 file, at one
    generation), unless ``codes`` restricts the tables; every other file is synced table by
    table, fetching only the rows the mirror lacks.

    Args:
        url: the relay's history service, ``tcp://HOST:PORT``.
        directory: the local hikyuu data directory (created when missing).
        periods, markets: only these (default: every file the relay serves).
        codes: only these securities (``600000`` or ``600000.SH``).
        timeout: seconds allowed for each reply.
        max_reply_bytes: ask for smaller pages than the relay's own limit.
        progress: called after every reply.
        writers: files mirrored at once, each by a process of its own with its own
            connection (0: one per CPU, at most 4; 1: all in this process).

    Raises:
        HistoryRequestError: the relay refused a request, or stayed busy.
        HistoryLockedError: another process writes ``directory``.
        TransportError: the relay is unreachable or stopped answering.
    """
    began = time.monotonic()
    summary = SyncSummary()
    wanted = _CodeSet(codes)
    os.makedirs(directory, exist_ok=True)
    with DirectoryLock(directory), Requester(url, timeout=timeout,
                                             max_message_bytes=1 << 30) as req:
        for stale in glob.glob(os.path.join(glob.escape(directory), f"*{_COPY_SUFFIX}*")):
            os.unlink(stale)          # a copy a killed sync left (we hold the lock)
        tails = _Tails(directory)
        jobs: List[Tuple[CatalogueSlice, List[int], str]] = []
        for cat in catalogue_pages(req, markets=markets, periods=periods, codes_only=True):
            keep = [i for i, code in enumerate(cat.codes) if wanted.keeps(code, cat.market)]
            if keep:
                jobs.append((cat, keep, file_name(cat.market, cat.period)))
        summary.files = len(jobs)
        count = writer_count(writers, len(jobs))
        if count > 1:
            # the biggest files first, so that no writer is left with a big one at the end
            jobs.sort(key=lambda job: -len(job[1]) * _COST.get(job[0].period, 1))
            results = run_jobs(directory, [
                (_sync_job, (url, timeout, directory, cat, keep, max_reply_bytes,
                             progress is not None, tails.get(name), codes is None))
                for cat, keep, name in jobs], count,
                lambda event: progress(*event) if progress is not None else None)
            for (_, _, name), (part, known) in zip(jobs, results):
                _fold(summary, part)
                tails.put(name, known)
        else:
            for cat, keep, name in jobs:
                known = tails.get(name)
                _sync_file(req, directory, cat, keep, summary, max_reply_bytes, progress,
                           known, codes is None)
                tails.put(name, known)
    summary.elapsed = time.monotonic() - began
    return summary


_COST = {"day": 6, "1min": 2, "5min": 5}    # tables of a security in a file (data + index)


def _sync_job(url: str, timeout: float, directory: str, cat: CatalogueSlice, keep: List[int],
              max_reply: Optional[int], report: bool, known: Dict[str, List[Any]],
              whole: bool) -> Tuple[SyncSummary, Dict[str, List[Any]]]:
    """One file's sync, in a writer process (its own connection to the relay)."""
    part = SyncSummary()
    with Requester(url, timeout=timeout, max_message_bytes=1 << 30) as req:
        _sync_file(req, directory, cat, keep, part, max_reply,
                   (lambda *event: emit(event)) if report else None, known, whole)
    return part, known


def _fold(summary: SyncSummary, part: SyncSummary) -> None:
    for name in ("tables", "bars", "index_rows", "index_fixed", "up_to_date", "requests",
                 "bytes", "copied"):
        setattr(summary, name, getattr(summary, name) + getattr(part, name))
    summary.refetched.extend(part.refetched)


class _Tails:
    """What the mirror knows of its own tables without reading them: per file, each data
    table's rows and the digest of its last rows, as the relay reported them when they were
    written. Kept in ``DIR/.qmt-relay-sync.json`` with the file's size and modification time
    after the sync closed it; a file changed since (another writer, a killed sync) is read
    again instead."""

    def __init__(self, directory: str) -> None:
        self._dir = directory
        self._path = os.path.join(directory, _TAILS_NAME)
        try:
            with open(self._path, encoding="utf-8") as f:
                loaded = json.load(f)
        except (OSError, ValueError):
            loaded = {}
        self._data: Dict[str, Any] = loaded if isinstance(loaded, dict) else {}

    def _stat(self, name: str) -> Optional[List[int]]:
        try:
            st = os.stat(os.path.join(self._dir, name))
        except OSError:
            return None
        return [st.st_mtime_ns, st.st_size, st.st_ino]

    def get(self, name: str) -> Dict[str, List[Any]]:
        """The tables of file ``name`` (empty unless the file is as the last sync left it)."""
        entry = self._data.get(name)
        stat = self._stat(name)
        if isinstance(entry, dict) and stat is not None and entry.get("stat") == stat and (
                isinstance(entry.get("tables"), dict)):
            return dict(entry["tables"])
        return {}

    def put(self, name: str, tables: Dict[str, List[Any]]) -> None:
        """Record ``tables`` for file ``name`` as it is now (after it was closed)."""
        self._data[name] = {"stat": self._stat(name), "tables": tables}
        tmp = self._path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps(self._data, separators=(",", ":")))
        os.replace(tmp, self._path)


class _CodeSet:
    def __init__(self, codes: Optional[Sequence[str]]) -> None:
        self._all = codes is None
        self._bare: Set[str] = set()
        self._pairs: Set[Tuple[str, str]] = set()
        for item in codes or ():
            code, dot, market = item.strip().partition(".")
            if dot:
                self._pairs.add((code, market.upper()))
            else:
                self._bare.add(code)

    def keeps(self, code: str, market: str) -> bool:
        return self._all or code in self._bare or (code, market) in self._pairs


def _sync_file(req: Requester, directory: str, cat: CatalogueSlice, keep: List[int],
               summary: SyncSummary, max_reply: Optional[int],
               progress: Optional[Progress], known: Dict[str, List[Any]],
               whole: bool = False) -> None:
    label = f"{cat.market.lower()}_{cat.period}"
    groups = ("data", *cat.indexes)
    if whole and not os.path.exists(os.path.join(directory, file_name(cat.market, cat.period))):
        before = summary.bars
        if _copy_file(req, directory, cat, max_reply, summary):
            known.clear()
            known.update(_tails_of(directory, cat))   # the next sync reads none of them
            summary.tables += len(keep)
            if progress is not None:
                progress(label, len(keep), len(keep), summary.bars - before)
            return
    with open_file(directory, cat.market, cat.period, "a", recover_corrupt=True) as hf:
        raw: h5py.File = hf._file  # the store's h5py file: which tables each group holds
        # a relay table shorter than ours, or not holding our last rows where we hold them
        # (a re-import, another start), is answered "changed" and fetched again whole
        refetch: Set[Tuple[str, str]] = set()
        summary.tables += len(keep)
        state = _FileState(label, len(keep), progress)

        def fetch(batch: List[Tuple[str, str]]) -> Tuple[List[_Entry], Any]:
            entries = _entries(hf, raw, cat.market, groups, batch, refetch, known)
            return entries, _request(req, cat, entries, max_reply, summary)

        # First pass over the /data tables, pipelined: the next request is under way (on a
        # thread of ours, and in the relay's process) while this reply is written.
        queue: Deque[Tuple[str, str]] = deque((cat.codes[i], "data") for i in keep)
        later: List[Tuple[str, str]] = []
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="history-sync") as pool:
            size = _TABLES_PER_REQUEST
            batch = _take(queue, size)
            future: Optional[Future[Tuple[List[_Entry], Any]]] = (
                pool.submit(fetch, batch) if batch else None)
            while future is not None:
                entries, reply = future.result()
                tables = _check(reply, entries)
                queue.extendleft(reversed([(e[0], e[1]) for e in entries[len(tables):]]))
                size = max(16, min(_TABLES_PER_REQUEST, reply.answered * 5 // 4))
                batch = _take(queue, size)
                future = pool.submit(fetch, batch) if batch else None
                later += state.applied(hf, cat.market, groups, entries, reply, refetch,
                                       summary, known)
        # What is left (changed tables, a table longer than a page, foreign index tables):
        # one request after the other, each built from what the previous one wrote.
        while later:
            batch, later = later[:_TABLES_PER_REQUEST], later[_TABLES_PER_REQUEST:]
            entries, reply = fetch(batch)
            tables = _check(reply, entries)
            rest = [(e[0], e[1]) for e in entries[len(tables):]]
            later = state.applied(hf, cat.market, groups, entries, reply, refetch,
                                  summary, known) + rest + later


_Entry = Tuple[str, str, int, str]


def _take(queue: Deque[Tuple[str, str]], size: int) -> List[Tuple[str, str]]:
    return [queue.popleft() for _ in range(min(size, len(queue)))]


def _check(reply: Any, entries: List[_Entry]) -> List[TableSlice]:
    tables: List[TableSlice] = reply.tables
    if not tables or len(tables) > len(entries):
        raise HistoryRequestError("the relay answered a sync request with no table or too many")
    return tables


def _entries(hf: HistoryFile, raw: h5py.File, market: str, groups: Sequence[str],
             batch: List[Tuple[str, str]], refetch: Set[Tuple[str, str]],
             known: Dict[str, List[Any]]) -> List[_Entry]:
    present = {g: set(raw[g].keys()) if g in raw else set() for g in groups}
    out: List[_Entry] = []
    for code, group in batch:
        name = market + code
        if (code, group) in refetch or name not in present[group]:
            out.append((code, group, 0, ""))
            continue
        tail = known.get(name) if group == "data" else None
        out.append((code, group, int(tail[0]), str(tail[1])) if tail else
                   _entry(hf, market, code, group))
    return out


class _FileState:
    """Progress and the loop guard of one file's sync."""

    def __init__(self, label: str, total: int, progress: Optional[Progress]) -> None:
        self.label = label
        self.total = total
        self.done = 0
        self.progress = progress
        self.refetches: Dict[Tuple[str, str], int] = {}

    def applied(self, hf: HistoryFile, market: str, groups: Sequence[str],
                entries: List[_Entry], reply: Any, refetch: Set[Tuple[str, str]],
                summary: SyncSummary, known: Dict[str, List[Any]]) -> List[Tuple[str, str]]:
        """Write one reply; returns the tables to ask for again (changed tables whole, a
        partial one from where it stopped, the index tables of foreign securities)."""
        tables: List[TableSlice] = reply.tables
        for table in tables:   # forget first: a failed write below must not leave them
            if table.group == "data":
                known.pop(market + table.code, None)
        again, foreign = _apply(hf, market, entries, tables, refetch, summary)
        for table in tables:
            if table.group == "data" and table.status == STATUS_OK and table.tail:
                known[market + table.code] = [table.start + table.records, table.tail]
        for key in again:
            self.refetches[key] = self.refetches.get(key, 0) + 1
            if self.refetches[key] > 3:
                raise HistoryRequestError(f"{market}{key[0]} {key[1]}: keeps changing on the "
                                          "relay")
        partial = [] if tables[-1].complete else [(tables[-1].code, tables[-1].group)]
        self.done += sum(1 for t in tables[:reply.answered] if t.group == "data")
        if self.progress is not None:
            self.progress(self.label, min(self.done, self.total), self.total, summary.bars)
        return sorted(again) + partial + [(code, g) for code in foreign for g in groups[1:]]


def _entry(hf: HistoryFile, market: str, code: str, group: str) -> _Entry:
    """``[code, group, rows held, digest of the last rows]`` for a sync request."""
    rows, tail = hf.last_rows(market + code, SYNC_WINDOW, group)
    return (code, group, rows, digest_rows(tail.tobytes())) if rows else (code, group, 0, "")


def _tails_of(directory: str, cat: CatalogueSlice) -> Dict[str, List[Any]]:
    """What a sync remembers of a file's /data tables (rows, digest of the last rows), read
    from the file itself: for a file just copied, it is what the relay would report."""
    out: Dict[str, List[Any]] = {}
    with open_file(directory, cat.market, cat.period) as hf:
        for name in hf.names():
            rows, tail = hf.last_rows(name, SYNC_WINDOW)
            if rows:
                out[name] = [rows, digest_rows(tail.tobytes())]
    return out


def _request(req: Requester, cat: CatalogueSlice, entries: List[_Entry],
             max_reply: Optional[int], summary: SyncSummary) -> Any:
    fields: Dict[str, Any] = {"market": cat.market, "period": cat.period,
                              "tables": [list(e) for e in entries]}
    if max_reply:
        fields["max_bytes"] = max_reply
    reply = _ask(req, encode_request("sync", **fields), summary)
    return checked(reply, KIND_SYNC)


def _ask(req: Requester, body: bytes, summary: SyncSummary, *, retries: int = _BUSY_RETRIES
         ) -> Any:
    """One request, asked again while the relay answers "busy" (its import is writing
    the file right now); the last answer, busy or not."""
    for attempt in range(retries):
        answer = req.request(body)
        summary.requests += 1
        summary.bytes += len(answer)
        reply = decode_reply(answer)
        if not reply.error.startswith("busy") or attempt == retries - 1:
            return reply
        time.sleep(_BUSY_PAUSE)
    raise AssertionError("unreachable")


def _copy_file(req: Requester, directory: str, cat: CatalogueSlice,
               max_reply: Optional[int], summary: SyncSummary) -> bool:
    """A mirror that holds nothing of a file copies the relay's file whole, page by page,
    into a temporary file renamed into place once complete (the copy is the relay's file at
    one generation: a page read while it changed is refused, a change between pages starts
    the copy again). Returns False when it did not succeed (the caller then syncs the file
    table by table)."""
    final = os.path.join(directory, file_name(cat.market, cat.period))
    tmp = f"{final}{_COPY_SUFFIX}{os.getpid()}"
    fields: Dict[str, Any] = {"market": cat.market, "period": cat.period}
    if max_reply:
        fields["max_bytes"] = max_reply
    try:
        for _ in range(_COPY_ATTEMPTS):
            generation: Optional[int] = None
            offset, size = 0, -1
            with open(tmp, "wb") as out:
                while offset != size:
                    reply = _ask(req, encode_request("file", offset=offset, **fields), summary,
                                 retries=1)
                    if reply.error.startswith("busy"):
                        break
                    checked(reply, KIND_FILE)
                    if generation is None:
                        generation, size = reply.generation, reply.size
                    elif (reply.generation, reply.size) != (generation, size):
                        break                     # the file changed: start again
                    if not reply.blob and offset < size:
                        raise HistoryRequestError("the relay sent an empty page of a file")
                    out.write(reply.blob)
                    offset += len(reply.blob)
                    if offset > size:
                        raise HistoryRequestError("the relay sent more than its file")
            if offset == size:
                summary.bars += _bars_in(tmp)
                os.replace(tmp, final)
                summary.copied += 1
                return True
            time.sleep(_BUSY_PAUSE)
        return False
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _bars_in(path: str) -> int:
    """Committed bars of every /data table of a copied file (which must open)."""
    try:
        with h5py.File(path, "r") as f:
            record = commit_record(f)
            data = f.get("data")
            names = list(data) if isinstance(data, h5py.Group) else []
            return sum(record[n][0] if n in record else int(data[n].shape[0]) for n in names)
    except OSError as exc:
        raise HistoryRequestError(f"the copy of {os.path.basename(path)} is not an HDF5 "
                                  f"file HDF5 opens ({exc})") from None


def _apply(hf: HistoryFile, market: str,
           entries: List[_Entry], tables: List[TableSlice],
           refetch: Set[Tuple[str, str]], summary: SyncSummary
           ) -> Tuple[Set[Tuple[str, str]], List[str]]:
    """Write one reply's tables.

    Returns:
        The tables to ask for again (whole), and the codes whose index tables must be
        fetched (the relay does not derive them from the data).
    """
    again: Set[Tuple[str, str]] = set()
    foreign: List[str] = []
    index_tables: List[Tuple[str, str, int, np.ndarray[Any, Any]]] = []
    for (code, group, have, _), table in zip(entries, tables):
        if (table.code, table.group) != (code, group):
            raise HistoryRequestError("the relay answered tables out of order")
        key = (code, group)
        if table.status == STATUS_MISSING:
            continue
        if table.status == STATUS_CHANGED:
            refetch.add(key)
            again.add(key)
            if group == "data":
                summary.refetched.append(f"{market}{code}")
                log.info("history_sync_changed", table=f"{market}{code}", file=hf.path)
            continue
        if table.start != have:
            raise HistoryRequestError(f"{market}{code} {group}: rows from {table.start}, "
                                      f"asked from {have}")
        if group == "data":
            rows = np.frombuffer(table.data, dtype=BAR_DTYPE, count=table.records)
            if have == 0 and key in refetch:
                hf.replace_from(market + code, 0, rows)
            elif table.records:
                hf.append(market + code, rows)
            elif have:
                summary.up_to_date += 1
            summary.bars += table.records
            if not table.derived and table.complete:
                foreign.append(code)
        else:
            index_tables.append((code, group, have,
                                 np.frombuffer(table.data, dtype=INDEX_DTYPE,
                                               count=table.records)))
        if group != "data":
            summary.index_rows += table.records
        refetch.discard(key)   # fetched from 0: a next page continues incrementally
    hf.commit()
    for code, group, have, rows in index_tables:
        summary.index_fixed += int(hf.put_index(market + code, group, have, rows))
    if index_tables:
        hf.flush()
    return again, foreign


def progress_printer(stream: Any = None) -> Tuple[Progress, Callable[[], None]]:
    """A progress bar (tqdm) on a terminal, else JSON ``history_sync_progress`` log lines
    every few seconds. Returns ``(progress, close)``."""
    out = stream or sys.stderr
    if out.isatty():
        try:
            from tqdm import tqdm  # noqa: PLC0415 - optional (the history extra)
        except ImportError:
            pass
        else:
            bars: Dict[str, Any] = {}

            def show(label: str, done: int, total: int, fetched: int) -> None:
                bar = bars.get(label)
                if bar is None:
                    bar = bars[label] = tqdm(total=total, desc=label, unit="tables", file=out)
                bar.n = done
                bar.set_postfix(bars=fetched, refresh=False)
                bar.refresh()

            def close() -> None:
                for bar in bars.values():
                    bar.close()

            return show, close
    last = [0.0]

    def log_line(label: str, done: int, total: int, fetched: int) -> None:
        now = time.monotonic()
        if now - last[0] >= 2.0 or done == total:
            last[0] = now
            log.info("history_sync_progress", file=label, tables=done, total=total,
                     bars=fetched)

    return log_line, lambda: None
