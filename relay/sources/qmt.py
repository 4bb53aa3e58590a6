"""MiniQMT's full push through ``xtquant.xtdata``: the production source.

Written against the ``xtquant.xtdata`` API only (``connect``, ``reconnect``, ``get_client``,
``subscribe_whole_quote``, ``unsubscribe_quote``, ``get_full_tick``,
``get_stock_list_in_sector``, ``get_instrument_detail``, ``get_holidays``, ``disconnect``), so
a test fake with the same signatures can stand in for it. What it must respect (DESIGN.md,
"QMT facts"):

- **One thread.** Concurrent xtdata calls have crashed xtquant's native client, so every call
  runs on one daemon thread owned by the source (:class:`_Worker`), in order. xtquant's
  callback thread only hands each push to the event loop
  (``loop.call_soon_threadsafe``); a full queue drops and counts pushes, logged once per
  episode. The callback catches its own errors: xtquant would swallow them.
- **Outages raise, then heal silently.** During an outage every xtdata call raises a plain
  ``Exception``; after it the next call quietly gets a brand-new client with no
  subscriptions. So the watchdog polls ``get_client()`` every ``check_interval`` seconds:
  an exception means the connection is lost, a different client object means MiniQMT came
  back without our subscriptions, and no push for ``stall_timeout`` seconds inside a watch
  window of a trading day is a silent stall. Each leads to a new connection
  (``reconnect()`` for a stall, since ``connect()`` would return the stalled client), every
  subscription made again in batches, and a re-seed with ``get_full_tick``; retries back off
  exponentially with jitter up to ``reconnect_max``. Meanwhile :attr:`QmtSource.connected` is
  False, so the relay's heartbeats say ``down``.
- **Startup never waits forever.** :meth:`QmtSource.start` fails only when xtquant cannot be
  imported (a configuration error). If MiniQMT is absent it returns after the first attempt
  (or ``connect_timeout``) and keeps retrying in the background.
- **Seeding.** Pushes carry only what changed, so every (re)connect and every ``seed_times``
  instant of a trading day reads all securities with ``get_full_tick`` and yields the result
  as an ordinary batch. Such records may carry ``timetag`` strings and int prices and lack
  ``pvolume``; the normaliser accepts them. ``time == 0`` seed records are passed on and
  dropped (counted) by the normaliser; call-auction ticks pass with their status.
- **Graceful stop.** :meth:`QmtSource.close` unsubscribes every subscription (logging, not
  raising, the plain ``Exception`` xtdata raises during an outage), disconnects, and stops
  the worker, all within ``shutdown_timeout``: an ungraceful exit is known to leave MiniQMT
  refusing the next ``connect()``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import importlib
import queue
import random
import threading
import time
from datetime import date
from types import MappingProxyType
from typing import (
    TYPE_CHECKING,
    Any,
    AsyncIterator,
    Callable,
    Dict,
    List,
    Mapping,
    Optional,
    Sequence,
    Set,
    Tuple,
    TypeVar,
)

import structlog

from relay.errors import ConfigError, SourceError
from relay.sources import Batch, Clock
from relay.sources._calendar import TradingCalendar, parse_day, parse_hhmm, parse_window

if TYPE_CHECKING:
    from relay.config import Config, QmtConfig

__all__ = ["XTDATA_MODULE", "QmtSource"]

XTDATA_MODULE = "xtquant.xtdata"
"""The module the source talks to (a test fake can take its place on ``sys.path``)."""

log = structlog.get_logger("relay.sources.qmt")

_T = TypeVar("_T")
_END = object()   # ends batches()


class _Unavailable(Exception):
    """An xtdata call failed the way it does when MiniQMT is unreachable (retried)."""


class _Worker:
    """One daemon thread that runs every xtdata call, in submission order.

    Daemon, so a call stuck inside xtquant can never keep the process alive after stop.
    """

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def ident(self) -> Optional[int]:
        return self._thread.ident

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            future, fn, args = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = fn(*args)
            except BaseException as exc:
                future.set_exception(exc)
            else:
                future.set_result(result)

    async def call(self, fn: Callable[..., _T], *args: Any) -> _T:
        """Run ``fn(*args)`` on the worker thread and await its result."""
        future: concurrent.futures.Future[_T] = concurrent.futures.Future()
        self._jobs.put((future, fn, args))
        return await asyncio.wrap_future(future)

    def shutdown(self) -> None:
        """Let the thread finish after the jobs already queued."""
        self._jobs.put(None)


class _Backoff:
    """Capped exponential backoff with full jitter in [delay/2, delay]."""

    def __init__(self, low: float, high: float, rng: random.Random) -> None:
        self._low = low
        self._high = high
        self._rng = rng
        self._next = low

    def reset(self) -> None:
        self._next = self._low

    def delay(self) -> float:
        base = self._next
        self._next = min(self._high, self._next * 2.0)
        return base * (0.5 + 0.5 * self._rng.random())


def _is_transport_failure(exc: BaseException) -> bool:
    """What xtdata raises when MiniQMT is unreachable: a plain ``Exception`` or an OSError.

    Anything else is a bug (ours or xtquant's) and propagates.
    """
    return type(exc) is Exception or isinstance(exc, OSError)


def _chunks(items: Sequence[str], size: int) -> List[List[str]]:
    return [list(items[i:i + size]) for i in range(0, len(items), size)]


class QmtSource:
    """MiniQMT full-push ticks as a :class:`~relay.sources.Source`.

    Args:
        config: the ``source.qmt`` section.
        shutdown_timeout: seconds :meth:`close` may spend releasing subscriptions.
        clock: wall clock in epoch seconds (default :func:`time.time`); decides trading
            hours, seed times and stalls.
        module: the xtdata module to import (default ``xtquant.xtdata``).
        rng: jitter source (default: a fresh :class:`random.Random`).

    Raises:
        ConfigError: ``watch_windows``, ``seed_times`` or ``holidays`` are malformed, or
            ``reconnect_min`` exceeds ``reconnect_max``.
    """

    kind: str = "qmt"

    def __init__(self, config: QmtConfig, *, shutdown_timeout: float = 5.0,
                 clock: Optional[Clock] = None, module: str = XTDATA_MODULE,
                 rng: Optional[random.Random] = None) -> None:
        self._cfg = config
        self._clock: Clock = clock if clock is not None else time.time
        self._module = module
        self._shutdown_timeout = shutdown_timeout
        if config.reconnect_min > config.reconnect_max:
            raise _config_error("reconnect_min", "must not exceed reconnect_max")
        if not (config.markets or config.sectors or config.codes or config.indices):
            raise _config_error("markets", "nothing to subscribe: set markets, sectors, codes "
                                           "or indices")
        try:
            windows = [parse_window(w) for w in config.watch_windows]
            self._seed_times = sorted({parse_hhmm(t) for t in config.seed_times})
            holidays = [parse_day(d) for d in config.holidays]
        except ValueError as exc:
            raise _config_error("watch_windows/seed_times/holidays", str(exc)) from None
        self._calendar = TradingCalendar(windows, holidays)
        self._backoff = _Backoff(config.reconnect_min, config.reconnect_max,
                                 rng if rng is not None else random.Random())
        self._names: Dict[str, str] = {}
        self._names_view: Mapping[str, str] = MappingProxyType(self._names)
        self._xt: Any = None
        self._worker: Optional[_Worker] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._queue: Optional[asyncio.Queue[Any]] = None
        self._stop: Optional[asyncio.Event] = None
        self._first_attempt: Optional[asyncio.Event] = None
        self._task: Optional[asyncio.Task[None]] = None
        self._failure: Optional[BaseException] = None
        # Touched on the worker thread only: the subscriptions of the current client.
        self._subs: List[int] = []
        self._client: Any = None
        self._holidays_loaded = False
        self._universe: List[str] = []
        self._seeded: Set[Tuple[date, int]] = set()
        self._started = False
        self._closed = False
        self._connected = False
        self._connected_at = 0.0
        self._last_push = 0.0
        self._session_pushes = 0
        self._overflowing = False
        # Counters (ints only grow; the callback thread increments callback_errors).
        self.pushes = 0
        self.dropped_pushes = 0
        self.callback_errors = 0
        self.reconnects = 0
        self.stalls = 0

    def counters(self) -> Dict[str, int]:
        """Counters for the metrics endpoint."""
        queue = self._queue
        return {"reconnects": self.reconnects, "stalls": self.stalls,
                "callback_errors": self.callback_errors, "dropped_pushes": self.dropped_pushes,
                "source_queue": queue.qsize() if queue is not None else 0}

    @classmethod
    def from_config(cls, config: Config, *, clock: Optional[Clock] = None) -> QmtSource:
        """Build the source from ``config.source.qmt`` and ``config.shutdown_timeout``.

        Raises:
            ConfigError: a QMT setting is invalid.
        """
        return cls(config.source.qmt, shutdown_timeout=config.shutdown_timeout, clock=clock)

    # -- Source protocol ---------------------------------------------------------------------

    @property
    def names(self) -> Mapping[str, str]:
        """Security names from ``get_instrument_detail`` (filled in as securities are seen)."""
        return self._names_view

    @property
    def connected(self) -> bool:
        """True while subscribed on a live connection; False while reconnecting."""
        return self._connected and not self._closed

    @property
    def worker_thread(self) -> Optional[int]:
        """Ident of the one thread that makes every xtdata call (for tests and diagnostics)."""
        return self._worker.ident if self._worker is not None else None

    async def start(self) -> None:
        """Import xtdata, then connect and subscribe in the background.

        Returns once the first connection attempt has succeeded or failed, or after
        ``connect_timeout``; later attempts continue in the background.

        Raises:
            SourceError: xtquant cannot be imported, or the source was closed.
        """
        if self._closed:
            raise SourceError(self.kind, "cannot start after close()")
        if self._started:
            return
        self._loop = asyncio.get_running_loop()
        self._queue = asyncio.Queue(self._cfg.queue_size)
        self._stop = asyncio.Event()
        self._first_attempt = asyncio.Event()
        worker = self._worker = _Worker("qmt-xtdata")
        try:
            self._xt = await worker.call(self._import)
        except ImportError as exc:
            worker.shutdown()
            self._worker = None
            self._closed = True
            raise SourceError(
                self.kind,
                f"cannot import {self._module} ({exc}); install the QMT extra on the MiniQMT "
                'machine: pip install "qmt-relay[qmt]"',
            ) from None
        self._started = True
        self._task = self._loop.create_task(self._supervise())
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._first_attempt.wait(), self._cfg.connect_timeout)
        if not self._first_attempt.is_set():
            log.warning("qmt_start_pending", waited_s=self._cfg.connect_timeout)
        log.info("qmt_source_started", connected=self.connected, securities=len(self._names),
                 module=self._module)

    async def batches(self) -> AsyncIterator[Batch]:
        """Yield pushes and seeds in arrival order until :meth:`close`.

        Raises:
            SourceError: :meth:`start` was not called, or the source hit a bug it cannot
                recover from (the cause is chained).
        """
        q = self._queue
        if q is None:
            raise SourceError(self.kind, "batches() called before start()")
        while True:
            item = await q.get()
            if item is _END:
                break
            yield item
        if self._failure is not None:
            raise SourceError(self.kind, f"feed failed: {self._failure!r}") from self._failure

    async def close(self) -> None:
        """Unsubscribe everything, disconnect and stop the worker thread. Idempotent.

        Takes at most ``shutdown_timeout`` seconds; a call stuck inside xtquant is abandoned
        (logged) after that.
        """
        if self._closed:
            return
        self._closed = True
        self._connected = False
        if self._stop is not None:
            self._stop.set()
        task = self._task
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        worker = self._worker
        if worker is not None:
            try:
                released, failed = await asyncio.wait_for(
                    worker.call(self._release_all), self._shutdown_timeout)
            except asyncio.TimeoutError:
                log.error("qmt_release_timeout", timeout_s=self._shutdown_timeout)
            else:
                log.info("qmt_released", unsubscribed=released, failed=failed)
            worker.shutdown()
        self._end_batches()
        log.info("qmt_source_closed", pushes=self.pushes, dropped_pushes=self.dropped_pushes,
                 callback_errors=self.callback_errors, reconnects=self.reconnects)

    # -- the xtquant callback (runs on xtquant's thread) ---------------------------------------

    def _on_push(self, data: Any) -> None:
        """xtquant's callback: hand the push to the event loop, nothing else."""
        try:
            loop = self._loop
            if loop is not None:
                loop.call_soon_threadsafe(self._enqueue, data, True)
        except Exception:   # loop closed while a push was in flight; xtquant would swallow it
            self.callback_errors += 1

    # -- event-loop side ---------------------------------------------------------------------

    def _enqueue(self, data: Any, push: bool) -> None:
        q = self._queue
        if q is None or self._closed:
            return
        if push:
            self._last_push = self._clock()
            self._session_pushes += 1
            self.pushes += 1
        if not isinstance(data, dict):
            self.callback_errors += 1
            log.warning("qmt_bad_payload", type=type(data).__name__)
            return
        if not data:
            return
        try:
            q.put_nowait(data)
        except asyncio.QueueFull:
            self.dropped_pushes += 1
            if not self._overflowing:
                self._overflowing = True
                log.warning("qmt_queue_full", size=q.maxsize, dropped_total=self.dropped_pushes)
            return
        if self._overflowing:
            self._overflowing = False
            log.info("qmt_queue_recovered", dropped_total=self.dropped_pushes)

    def _end_batches(self) -> None:
        q = self._queue
        if q is None:
            return
        while not q.empty():   # make room for the end marker; stopping anyway
            q.get_nowait()
        q.put_nowait(_END)

    async def _call(self, fn: Callable[..., _T], *args: Any) -> _T:
        """Run one job on the worker; transport failures become :class:`_Unavailable`."""
        assert self._worker is not None
        try:
            return await self._worker.call(fn, *args)
        except Exception as exc:
            if _is_transport_failure(exc):
                raise _Unavailable(str(exc) or type(exc).__name__) from exc
            raise

    async def _sleep(self, seconds: float) -> None:
        """Sleep, returning early when the source closes."""
        assert self._stop is not None
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)

    async def _supervise(self) -> None:
        """Connect, watch, and reconnect until closed."""
        assert self._first_attempt is not None
        attempt = 0
        fresh = False
        try:
            while not self._closed:
                attempt += 1
                log.info("qmt_connecting", attempt=attempt, fresh=fresh)
                try:
                    await self._establish(fresh)
                except _Unavailable as exc:
                    self._first_attempt.set()
                    fresh = False
                    delay = self._backoff.delay()
                    log.warning("qmt_connect_failed", attempt=attempt, error=str(exc),
                                retry_in_s=round(delay, 3))
                    await self._sleep(delay)
                    continue
                self._connected = True
                self._first_attempt.set()
                log.info("qmt_connected", attempt=attempt, subscriptions=len(self._subs),
                         securities=len(self._names))
                attempt = 0
                reason = await self._watch()
                self._connected = False
                if reason is None:
                    return
                self.reconnects += 1
                if self._session_pushes:
                    self._backoff.reset()   # the connection was healthy: start over quickly
                fresh = reason == "stall"
                dropped = await self._forget(unsubscribe=fresh)
                delay = self._backoff.delay()
                log.warning("qmt_feed_lost", reason=reason, subscriptions_released=dropped,
                            retry_in_s=round(delay, 3))
                await self._sleep(delay)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:   # a bug: end the feed loudly, never spin on it
            self._failure = exc
            self._connected = False
            self._first_attempt.set()
            log.exception("qmt_source_failed", error=repr(exc))
            self._end_batches()

    async def _establish(self, fresh: bool) -> None:
        """New connection, every subscription, a seed; raises :class:`_Unavailable`."""
        cfg = self._cfg
        xt = self._xt
        port = cfg.port or None
        self._session_pushes = 0
        client = await self._call(xt.reconnect if fresh else xt.connect, cfg.ip, port)
        await self._call(self._adopt_client, client)
        if not self._holidays_loaded:
            await self._load_holidays()
        codes = list(dict.fromkeys(cfg.codes))
        for sector in cfg.sectors:
            members = await self._call(xt.get_stock_list_in_sector, sector)
            log.info("qmt_sector", sector=sector, securities=len(members or ()))
            codes.extend(members or ())
        codes = [c for c in dict.fromkeys(codes) if c not in cfg.indices]
        units: List[Tuple[str, List[str]]] = [("market", [m]) for m in cfg.markets]
        units += [("codes", chunk) for chunk in _chunks(codes, cfg.batch_size)]
        units += [("indices", chunk)
                  for chunk in _chunks(list(dict.fromkeys(cfg.indices)), cfg.batch_size)]
        self._connected_at = self._clock()
        for number, (kind, unit) in enumerate(units):
            if number:
                await self._sleep(cfg.batch_pause)
            if self._closed:
                return
            await self._subscribe(kind, unit, number + 1, len(units))
        self._universe = [*cfg.markets, *codes, *cfg.indices]
        await self._seed("connect", self._universe)
        now = self._clock()
        # Seed times already passed today are covered by this seed.
        self._calendar.due(now, self._seed_times, self._seeded)

    def _adopt_client(self, client: Any) -> None:
        """(worker) A new client has no subscriptions of ours."""
        if client is not self._client:
            self._subs.clear()
        self._client = client

    async def _subscribe(self, kind: str, codes: List[str], number: int, total: int) -> None:
        cfg = self._cfg
        backoff = _Backoff(cfg.reconnect_min, cfg.reconnect_max, random.Random())
        for attempt in range(1, cfg.subscribe_retries + 2):
            seq = await self._call(self._subscribe_job, codes)
            if isinstance(seq, int) and not isinstance(seq, bool) and seq > 0:
                log.info("qmt_subscribed", kind=kind, batch=number, batches=total,
                         codes=len(codes), first=codes[0], seq=seq, attempt=attempt)
                return
            if attempt > cfg.subscribe_retries:
                break
            delay = backoff.delay()
            log.warning("qmt_subscribe_failed", kind=kind, batch=number, batches=total,
                        codes=len(codes), first=codes[0], result=seq, attempt=attempt,
                        retry_in_s=round(delay, 3))
            await self._sleep(delay)
            if self._closed:
                return
        log.error("qmt_subscribe_gave_up", kind=kind, batch=number, codes=len(codes),
                  first=codes[0], attempts=cfg.subscribe_retries + 1)
        raise _Unavailable(f"subscribe_whole_quote({codes[0]}...) kept returning {seq!r}")

    def _subscribe_job(self, codes: List[str]) -> Any:
        """(worker) Subscribe and remember the number, so close() can release it."""
        seq = self._xt.subscribe_whole_quote(codes, self._on_push)
        if isinstance(seq, int) and not isinstance(seq, bool) and seq > 0:
            self._subs.append(seq)
        return seq

    async def _seed(self, reason: str, codes: Sequence[str]) -> None:
        """Read every security with get_full_tick, load missing names, queue it as a batch."""
        data = await self._call(self._xt.get_full_tick, list(codes))
        if not isinstance(data, dict):
            log.warning("qmt_seed_empty", reason=reason, type=type(data).__name__)
            return
        missing = [code for code in data if code not in self._names]
        for chunk in _chunks(missing, self._cfg.batch_size):
            self._names.update(await self._call(self._names_job, chunk))
        log.info("qmt_seeded", reason=reason, securities=len(data), names=len(self._names))
        self._enqueue(data, False)

    def _names_job(self, codes: List[str]) -> Dict[str, str]:
        """(worker) InstrumentName of each code that has instrument details."""
        names: Dict[str, str] = {}
        for code in codes:
            detail = self._xt.get_instrument_detail(code)
            if isinstance(detail, dict):
                name = detail.get("InstrumentName")
                if isinstance(name, str):
                    names[code] = name
        return names

    async def _load_holidays(self) -> None:
        getter = getattr(self._xt, "get_holidays", None)
        if getter is None:
            log.info("qmt_holidays", source="config", holidays=len(self._calendar.holidays))
            self._holidays_loaded = True
            return
        days = await self._call(getter)
        parsed: List[date] = []
        for day in days or ():
            with contextlib.suppress(ValueError, TypeError):
                parsed.append(parse_day(day))
        added = self._calendar.add_holidays(parsed)
        self._holidays_loaded = True
        log.info("qmt_holidays", source="xtdata", from_xtdata=len(parsed), new=added,
                 holidays=len(self._calendar.holidays))

    async def _watch(self) -> Optional[str]:
        """Poll the connection until it is lost; returns why, or None when closed."""
        cfg = self._cfg
        client = self._client
        while not self._closed:
            await self._sleep(cfg.check_interval)
            if self._closed:
                return None
            try:
                current = await self._call(self._xt.get_client)
            except _Unavailable as exc:
                log.warning("qmt_connection_lost", error=str(exc))
                return "connection_lost"
            if current is not client:
                return "client_changed"
            now = self._clock()
            since = self._calendar.window_start(now)
            if since is not None:
                quiet_from = max(since, self._last_push, self._connected_at)
                if now - quiet_from > cfg.stall_timeout:
                    log.warning("qmt_stall", silent_s=round(now - quiet_from, 3),
                                stall_timeout_s=cfg.stall_timeout)
                    self.stalls += 1
                    return "stall"
            for _ in self._calendar.due(now, self._seed_times, self._seeded):
                try:
                    await self._seed("scheduled", self._universe)
                except _Unavailable as exc:
                    log.warning("qmt_connection_lost", error=str(exc))
                    return "connection_lost"
        return None

    async def _forget(self, *, unsubscribe: bool) -> int:
        """Drop the subscriptions of a lost feed; unsubscribe them if the client lives on."""
        if not unsubscribe:
            return await self._call(self._clear_job)
        released, _ = await self._call(self._release_all, False)
        return released

    def _clear_job(self) -> int:
        """(worker) The client is gone and its subscriptions with it."""
        count = len(self._subs)
        self._subs.clear()
        return count

    def _release_all(self, disconnect: bool = True) -> Tuple[int, int]:
        """(worker) Unsubscribe every subscription, then optionally disconnect.

        Returns:
            (unsubscribed, failed).
        """
        released = failed = 0
        while self._subs:
            seq = self._subs.pop(0)
            try:
                self._xt.unsubscribe_quote(seq)
            except Exception as exc:
                if not _is_transport_failure(exc):
                    raise
                failed += 1
                log.warning("qmt_unsubscribe_failed", seq=seq, error=str(exc))
            else:
                released += 1
        if disconnect and self._xt is not None:
            try:
                self._xt.disconnect()
            except Exception as exc:
                if not _is_transport_failure(exc):
                    raise
                log.warning("qmt_disconnect_failed", error=str(exc))
            self._client = None
        return released, failed

    def _import(self) -> Any:
        """(worker) Import xtdata once; it may make a network call at import."""
        module: Any = importlib.import_module(self._module)
        module.enable_hello = False   # its banner would land in a service's log
        return module


def _config_error(key: str, reason: str) -> ConfigError:
    return ConfigError("<config>", f"source.qmt.{key}", reason)
