"""K-line history from MiniQMT through xtquant's ``xtdata`` (Windows; faked in tests).

Every xtdata call runs in one **worker process** that owns its own xtdata client, on that
process's main thread (xtquant's native client asserts on concurrent calls). A process,
not a thread, because a download can hang with no progress inside xtquant's own polling loop,
and only a process can be stopped there: a chunk that exceeds ``history.chunk_timeout`` kills
the worker, and the chunk is retried on a new one. Being a separate process also keeps it
clear of a ``qmt-relay run`` on the same box.

Per chunk of codes and days (see :mod:`relay.history.importer`):

1. ``download_history_data2(codes, period, start, end, callback)``: the callback (on
   xtquant's thread) reports each finished code, which drives the progress display; a code
   whose progress carries a message has no data and is reported failed with it;
2. ``get_market_data_ex([], codes, period, start, end, dividend_type="none",
   fill_data=False)``: frames of the local cache, converted to plain arrays (``volume`` is
   already in lots; zero-volume suspension filler is dropped).

A connection drop or a download error is retried with capped, jittered exponential backoff
(xtdata reconnects by itself on the next call); codes whose download had already finished
are not downloaded again (the worker resumes where it stopped). Codes still failing after
``history.retries`` retries are reported failed with the last reason.
"""

from __future__ import annotations

import contextlib
import importlib
import multiprocessing
import random
import threading
import time
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Set, Tuple

import numpy as np
import structlog

from relay.errors import HistoryUnavailableError
from relay.history.source import Bars, Fetched, Progress

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

    from relay.config import Config, HistoryConfig, QmtConfig

__all__ = ["QmtHistory"]

log = structlog.get_logger(__name__)

CHINA_TZ = timezone(timedelta(hours=8), "CST")
_PERIODS = {"day": "1d", "1min": "1m", "5min": "5m"}
_SH_SZ = ("沪深A股", "沪深ETF", "沪深指数")
_MARKET_SECTORS = {"SH": _SH_SZ, "SZ": _SH_SZ, "BJ": ("京市A股",)}


class _WorkerDied(Exception):
    pass


class _Timeout(Exception):
    pass


# -- the worker process ---------------------------------------------------------------------

def _to_arrays(period: str, frame: Any) -> Optional[Dict[str, Any]]:
    """One ``get_market_data_ex`` frame -> plain arrays (None when empty)."""
    if frame is None or not len(frame):
        return None
    index = [str(i) for i in frame.index]
    stamps = [s[:8] + "0000" for s in index] if period == "1d" else [s[:12] for s in index]
    out: Dict[str, Any] = {"datetime": np.array(stamps, dtype=np.uint64)}
    for col in ("open", "high", "low", "close", "amount", "volume"):
        out[col] = np.asarray(frame[col], dtype=np.float64)
    if "suspendFlag" in frame.columns:   # filler, should fill_data=False not be honoured
        filler = (out["volume"] == 0) & (np.asarray(frame["suspendFlag"]) == 1)
        if filler.any():
            out = {k: v[~filler] for k, v in out.items()}
    return out


def _worker_main(conn: Connection, module_name: str, ip: str, port: Optional[int]) -> None:
    """Entry of the worker process: serve requests from ``conn`` until "stop"."""
    send_lock = threading.Lock()

    def send(message: Tuple[Any, ...]) -> None:
        with send_lock:
            conn.send(message)

    try:
        xt: Any = importlib.import_module(module_name)
        xt.enable_hello = False
    except ImportError as exc:
        send(("unavailable", f"cannot import {module_name} ({exc}); on Windows: "
                             "pip install qmt-relay[qmt]"))
        return
    send(("ready",))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        kind = message[0]
        if kind == "stop":
            return
        try:
            if kind == "connect":
                xt.connect(ip, port)
                send(("ok", None))
            elif kind == "universe":
                found: List[str] = []
                for sector in message[1]:
                    found.extend(xt.get_stock_list_in_sector(sector) or ())
                send(("ok", found))
            elif kind == "fetch":
                _, period, download, read, start, end = message

                def on_progress(data: Any) -> None:
                    if isinstance(data, dict):
                        send(("progress", int(data.get("finished") or 0),
                              str(data.get("stockcode") or ""), str(data.get("message") or "")))

                if download:
                    xt.download_history_data2(download, period, start_time=start,
                                              end_time=end, callback=on_progress)
                    send(("downloaded",))
                frames = xt.get_market_data_ex([], list(read), period=period, start_time=start,
                                               end_time=end, count=-1, dividend_type="none",
                                               fill_data=False)
                bars = {code: arrays for code, frame in (frames or {}).items()
                        if (arrays := _to_arrays(period, frame)) is not None}
                send(("ok", bars))
            else:
                send(("error", f"unknown request {kind!r}"))
        except Exception as exc:   # xtquant raises plain Exception for everything
            send(("error", str(exc) or type(exc).__name__))


# -- the source -------------------------------------------------------------------------

class QmtHistory:
    """MiniQMT's K-line history as a :class:`~relay.history.source.HistorySource`.

    Args:
        qmt: the ``source.qmt`` section (ip, port, markets, sectors, codes, indices).
        history: the ``history`` section (timeouts, retries, backoff).
        module: the xtdata module to import in the worker (tests name the fake's).
        clock: wall clock in epoch seconds (for the default end day, China time).
    """

    kind = "qmt"

    def __init__(self, qmt: QmtConfig, history: HistoryConfig, *,
                 module: str = "xtquant.xtdata", clock: Optional[Any] = None) -> None:
        self._qmt = qmt
        self._hc = history
        self._module = module
        self._clock = clock if callable(clock) else time.time
        self._ctx = multiprocessing.get_context("spawn")
        self._proc: Optional[Any] = None
        self._conn: Optional[Connection] = None
        self._rng = random.Random()
        self.restarts = 0

    @classmethod
    def from_config(cls, config: Config, **options: Any) -> QmtHistory:
        """Build from ``config.source.qmt`` and ``config.history``."""
        return cls(config.source.qmt, config.history,
                   module=str(options.get("module", "xtquant.xtdata")),
                   clock=options.get("clock"))

    # -- lifecycle ------------------------------------------------------------------------

    def open(self) -> None:
        """Start the worker and connect to MiniQMT.

        Raises:
            HistoryUnavailableError: xtquant missing, or MiniQMT unreachable.
        """
        self._start_worker()
        reply = self._request(("connect",), self._qmt.connect_timeout)
        if reply[0] != "ok":
            self.close()
            raise HistoryUnavailableError(self.kind, f"MiniQMT unreachable: {reply[1]}")

    def close(self) -> None:
        """Stop the worker (killed if it does not stop at once). Idempotent."""
        conn, proc = self._conn, self._proc
        self._conn = self._proc = None
        if conn is not None:
            with contextlib.suppress(OSError, ValueError):
                conn.send(("stop",))
        if proc is not None:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
        if conn is not None:
            conn.close()

    def _start_worker(self) -> None:
        parent, child = self._ctx.Pipe()
        proc = self._ctx.Process(target=_worker_main, name="qmt-relay-history-xtdata",
                                 args=(child, self._module, self._qmt.ip,
                                       self._qmt.port or None), daemon=True)
        proc.start()
        child.close()
        self._proc, self._conn = proc, parent
        try:
            first = self._receive(self._qmt.connect_timeout + 30.0)
        except (_WorkerDied, _Timeout) as exc:
            self.close()
            raise HistoryUnavailableError(self.kind, f"xtdata worker did not start: {exc}"
                                          ) from None
        if first[0] == "unavailable":
            self.close()
            raise HistoryUnavailableError(self.kind, str(first[1]))

    def _restart_worker(self) -> None:
        self.close()
        self.restarts += 1
        self._start_worker()

    # -- requests -------------------------------------------------------------------------

    def _receive(self, timeout: float) -> Tuple[Any, ...]:
        conn, proc = self._conn, self._proc
        if conn is None or proc is None:
            raise _WorkerDied("no worker")
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise _Timeout(f"no answer within {timeout:g} s")
            try:
                if conn.poll(min(left, 0.2)):
                    message: Tuple[Any, ...] = conn.recv()
                    return message
            except (EOFError, OSError):
                raise _WorkerDied("worker connection closed") from None
            if not proc.is_alive():
                raise _WorkerDied(f"worker exited with code {proc.exitcode}")

    def _request(self, message: Tuple[Any, ...], timeout: float) -> Tuple[Any, ...]:
        assert self._conn is not None
        self._conn.send(message)
        return self._receive(timeout)

    def universe(self, markets: Sequence[str]) -> List[str]:
        """Codes of ``source.qmt``'s codes, indices and sectors, and of the markets' sectors."""
        wanted = {m.upper() for m in markets}
        sectors: List[str] = list(self._qmt.sectors)
        for market in self._qmt.markets:
            if market in wanted:
                sectors.extend(s for s in _MARKET_SECTORS.get(market, ()) if s not in sectors)
        found: List[str] = [*self._qmt.codes, *self._qmt.indices]
        if sectors:
            reply = self._request(("universe", sectors), self._hc.chunk_timeout)
            if reply[0] != "ok":
                raise HistoryUnavailableError(self.kind, f"cannot list securities: {reply[1]}")
            found.extend(reply[1])
        return [c for c in dict.fromkeys(found) if c.rpartition(".")[2].upper() in wanted]

    def last_day(self) -> int:
        """Today in China (an intraday run stores a partial day; the next run completes it)."""
        today = datetime.fromtimestamp(self._clock(), CHINA_TZ).date()
        return today.year * 10000 + today.month * 100 + today.day

    def fetch(self, period: str, symbols: Sequence[str], start: int, end: int,
              progress: Optional[Progress] = None) -> Fetched:
        """Download then read one chunk, with timeout, retries and resume (module docstring)."""
        qperiod = _PERIODS[period]
        result = Fetched()
        pending: List[str] = list(symbols)    # not yet downloaded in this chunk
        finished: Set[str] = set()
        reason = ""
        hc = self._hc
        for attempt in range(hc.retries + 1):
            if attempt:
                delay = min(hc.retry_max, hc.retry_min * 2 ** (attempt - 1))
                delay *= 0.5 + 0.5 * self._rng.random()
                log.warning("history_chunk_retry", period=period, codes=len(symbols),
                            attempt=attempt, delay_s=round(delay, 2), reason=reason)
                time.sleep(delay)
            try:
                bars = self._fetch_once(qperiod, pending, symbols, str(start), str(end),
                                        finished, result, progress)
            except _Timeout as exc:
                reason = f"download timed out ({exc})"
                self._restart_after(reason)
            except _WorkerDied as exc:
                reason = f"xtdata worker died ({exc})"
                self._restart_after(reason)
            except _ChunkError as exc:
                reason = exc.reason
            else:
                for code, arrays in bars.items():
                    if code in result.failed:
                        continue
                    result.bars[code] = Bars(arrays["datetime"], arrays["open"], arrays["high"],
                                             arrays["low"], arrays["close"], arrays["amount"],
                                             arrays["volume"])
                return result
            pending = [c for c in pending if c not in finished]
        for code in symbols:
            if code not in result.bars:
                result.failed.setdefault(code, reason or "failed")
        return result

    def _restart_after(self, reason: str) -> None:
        log.warning("history_worker_restart", reason=reason)
        try:
            self._restart_worker()
        except HistoryUnavailableError as exc:
            log.warning("history_worker_unavailable", reason=str(exc))

    def _fetch_once(self, qperiod: str, download: List[str], read: Sequence[str], start: str,
                    end: str, finished: Set[str], result: Fetched,
                    progress: Optional[Progress]) -> Dict[str, Dict[str, Any]]:
        if self._conn is None:
            raise _WorkerDied("no worker")
        self._conn.send(("fetch", qperiod, download, list(read), start, end))
        deadline = time.monotonic() + self._hc.chunk_timeout
        already = len(read) - len(download)
        while True:
            message = self._receive(max(0.0, deadline - time.monotonic()))
            kind = message[0]
            if kind == "progress":
                _, done, code, text = message
                if code:
                    finished.add(code)
                    if text:
                        result.failed[code] = f"no data: {text}"
                if progress is not None:
                    progress(already + done)
            elif kind == "downloaded":
                continue
            elif kind == "ok":
                bars: Dict[str, Dict[str, Any]] = message[1]
                return bars
            else:
                raise _ChunkError(str(message[1]))


class _ChunkError(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
