"""The relay: one object that owns start, run and graceful stop.

``Relay.run()`` holds the only ``asyncio.run``; ``serve()`` is ``startup()`` -> ``main_loop()``
-> ``shutdown()``. Sinks and the publisher start before the source; stop runs in reverse:
close the source (releasing every subscription), drain within ``shutdown_timeout``, close the
sinks (the recorder flushes), close the sockets.

Stopping is a method: POSIX signal handlers and the Windows service both call
:meth:`Relay.request_stop`, which only sets a flag and wakes the loop; a second SIGINT forces
a fast stop (no draining).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import signal
import threading
import time
import uuid
from typing import (
    Any,
    Callable,
    Dict,
    Iterable,
    Iterator,
    List,
    Optional,
    Sequence,
)

import structlog

from relay._heap import keep_freed_memory
from relay.config import Config, service_addresses
from relay.encode import Records, SpotEncoder
from relay.errors import RelayError, ServiceError, SourceError
from relay.normalise import Normaliser
from relay.ops.metrics import OpsStatus
from relay.ops.monitor import Operations, ReportsCounters
from relay.publish import Publisher
from relay.security import Security
from relay.sinks import HeartbeatSink, PublishedBatch, Sink, sinks_from_config
from relay.sources import Batch, Source, create_source
from relay.supervise import ServiceHandle, Supervisor, capture_crashes, loop_exception_handler
from relay.wire import encode_heartbeat

__all__ = ["PublishedBatch", "Relay", "Sink", "State"]  # sinks re-exported for convenience

log = structlog.get_logger("relay.app")

_HANDLED_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGBREAK") if hasattr(signal, name)
)


class State(enum.Enum):
    NEW = "new"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


class _Stats:
    __slots__ = ("batches", "bytes", "dropped", "errors", "lag_ms_max", "messages", "records")

    def __init__(self) -> None:
        self.batches = 0
        self.records = 0
        self.messages = 0
        self.bytes = 0
        self.errors = 0
        self.lag_ms_max: Optional[int] = None
        self.dropped: Dict[str, int] = {}

    def add(self, other: _Stats) -> None:
        """Fold ``other``'s counts into these (``lag_ms_max`` is per interval, not summed)."""
        self.batches += other.batches
        self.records += other.records
        self.messages += other.messages
        self.bytes += other.bytes
        self.errors += other.errors
        for reason, n in other.dropped.items():
            self.dropped[reason] = self.dropped.get(reason, 0) + n


class Relay:
    """Runs one source through normalise -> encode -> publish (and sinks) until stopped.

    Args:
        config: the validated configuration.
        source: a source to use instead of the one ``config.source.kind`` names.
        sinks: extra consumers of every published batch.
        clock: epoch seconds; publish times and stats use it.
        supervisor: runs the relay's threads and tasks (and those of its sinks); by default
            one made from ``config.supervision``. A service that fails too often stops the
            relay with :class:`~relay.errors.ServiceError`.
    """

    def __init__(
        self,
        config: Config,
        *,
        source: Optional[Source] = None,
        sinks: Sequence[Sink] = (),
        clock: Callable[[], float] = time.time,
        supervisor: Optional[Supervisor] = None,
    ) -> None:
        self.config = config
        self.run_id = uuid.uuid4().hex[:16]
        self.state = State.NEW
        self._clock = clock
        self._source = source
        self._owns_source = source is None  # a source made from config is remade on restart
        sup = config.supervision
        self.supervisor = supervisor or Supervisor(
            max_failures=sup.max_failures, window=sup.window, backoff_min=sup.backoff_min,
            backoff_max=sup.backoff_max)
        self.supervisor.set_fatal_handler(self._service_gave_up)
        # Opens every listening socket (allow-list, TLS); the metrics service asks its
        # is_allowed(ip) too.
        self.security = Security.from_config(config.security)
        self._sinks = [*sinks_from_config(config, supervisor=self.supervisor,
                                         security=self.security), *sinks]
        self._publisher = Publisher(config.publish.addresses,
                                    send_buffer=config.publish.send_buffer,
                                    security=self.security)
        norm = config.normalise
        self._normaliser = Normaliser(
            units=norm.units,
            book_levels=norm.book_levels,
            price_decimals=norm.price_decimals,
            drop_auction=norm.drop_auction,
        )
        self._encoder: Optional[SpotEncoder] = None
        self._seq = 0
        self._stats = _Stats()
        self._totals = _Stats()
        self._stop_requested = False
        self._force = False
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._wake: Optional[asyncio.Event] = None
        self._started_sinks: List[Sink] = []
        self._heartbeat_sinks = [s for s in self._sinks if isinstance(s, HeartbeatSink)]
        self._failure: Optional[BaseException] = None  # why the source stopped, if it broke
        self._heap_kept = False
        self._history_schedule: Any = None   # relay.history.schedule, when history.schedule
        # Operations (metrics endpoint, health, alerts): decided once, built at startup.
        self._ops_wanted = bool(service_addresses(config).metrics or config.alerts.webhooks)
        self._ops: Optional[Operations] = None
        self._ops_status: Optional[OpsStatus] = None
        self._last_batch_at: Optional[float] = None
        self._last_lag_ms: Optional[int] = None
        self._pump_failed = False

    @property
    def ops(self) -> Optional[Operations]:
        """The operations side (metrics, health, alerts), once started; None when off."""
        return self._ops

    @property
    def ops_status(self) -> Optional[OpsStatus]:
        """The latest operations snapshot (kept after stop); None when operations are off."""
        return self._ops_status

    # -- stopping --------------------------------------------------------------------------

    def request_stop(self, *, force: bool = False) -> None:
        """Ask the relay to stop; safe from signal handlers and other threads."""
        self._force = self._force or force
        self._stop_requested = True
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # loop closing concurrently
                loop.call_soon_threadsafe(wake.set)

    def _service_gave_up(self, error: ServiceError) -> None:
        """The supervisor's fatal handler (any thread): stop, and exit non-zero."""
        if self._failure is None:
            self._failure = error
        self.request_stop()

    @property
    def subscribers(self) -> int:
        """Subscribers connected right now."""
        return self._publisher.subscribers

    @property
    def stop_requested(self) -> bool:
        return self._stop_requested

    def _handle_signal(self, signum: int, _frame: Any) -> None:
        force = self._stop_requested and signum == signal.SIGINT
        log.info("stop_requested", signal=signal.Signals(signum).name, force=force)
        self.request_stop(force=force)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """Route SIGINT/SIGTERM to :meth:`request_stop`; restore prior handlers on exit."""
        previous: Dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            try:
                for sig in _HANDLED_SIGNALS:
                    previous[sig] = signal.signal(sig, self._handle_signal)
            except ValueError:
                # Not the interpreter's main thread after all: pythonservice.exe runs
                # SvcDoRun on the SCM's thread, which `threading` may take for the main one.
                # The service stops the relay through request_stop instead.
                pass
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    # -- running ---------------------------------------------------------------------------

    def run(self) -> None:
        """Run until stopped; the only ``asyncio.run`` in the relay.

        Raises:
            RelayError: startup failed (bad address, source unavailable), or the source
                broke while running (after a graceful shutdown of everything else).
        """
        self._heap_kept = keep_freed_memory()  # glibc: no page faults batch after batch
        with self.capture_signals(), capture_crashes():
            asyncio.run(self.serve())
        if self._failure is not None:
            # The source broke (not a stop request): report it, so that a service manager
            # restarts the relay.
            if isinstance(self._failure, RelayError):
                raise self._failure
            raise SourceError(self.config.source.kind, repr(self._failure))

    async def serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.set_exception_handler(loop_exception_handler)
        self._wake = asyncio.Event()
        if self._stop_requested:
            self._wake.set()
        try:
            await self.startup()
            if not self._stop_requested:
                await self.main_loop()
        finally:
            await self.shutdown()

    async def startup(self) -> None:
        self.state = State.STARTING
        cfg = self.config
        if self._source is None:
            self._source = create_source(cfg, clock=self._clock)
        source = self._source
        self._encoder = SpotEncoder(self.run_id, source.kind, cfg.publish.max_message_bytes)
        if self._ops_wanted:
            self._ops = Operations(cfg, run_id=self.run_id, source=source.kind,
                                   clock=self._clock, supervisor=self.supervisor,
                                   allow=self.security.is_allowed, refuse=self.security.refuse,
                                   tls=self.security.tls)
        self._publisher.start()
        log.info("publishing", addresses=list(cfg.publish.addresses), run_id=self.run_id)
        if self._ops is not None:
            self._ops.start()
        for sink in self._sinks:
            sink.start()
            self._started_sinks.append(sink)
        if cfg.history.schedule:   # imports as a child process: never in the way of publishing
            from relay.history.schedule import HistorySchedule  # noqa: PLC0415

            self._history_schedule = HistorySchedule(cfg)
            self._history_schedule.start()
        await source.start()
        self._normaliser.set_names(source.names)
        log.info(
            "relay_started",
            source=source.kind,
            simulated=source.kind == "simulator",
            run_id=self.run_id,
            securities=len(source.names),
            heap_kept=self._heap_kept,
        )
        self.state = State.RUNNING
        if self._ops is not None:
            self._ops.started(len(source.names))
            self._sample()

    async def main_loop(self) -> None:
        assert self._wake is not None
        sup = self.supervisor
        handle = sup.task("source", self._pump)
        pump = handle.task
        assert pump is not None
        interval = self.config.publish.heartbeat_interval
        helpers = [
            sup.task("heartbeat", lambda: self._every(interval, self._heartbeat)),
            sup.task("stats", lambda: self._every(self.config.logging.stats_interval,
                                                  self._log_stats)),
        ]
        if self._ops is not None:
            sample = self.config.metrics.sample_interval
            helpers.append(sup.task("metrics_sample", lambda: self._every(sample, self._sample)))
        wake = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait([pump, wake], return_when=asyncio.FIRST_COMPLETED)
        finally:
            wake.cancel()
            tasks = []
            for helper in helpers:
                helper.stop()
                if helper.task is not None:
                    helper.task.cancel()
                    tasks.append(helper.task)
            self.state = State.STOPPING
            await self._stop_pump(handle, pump)
            await asyncio.gather(*tasks, wake, return_exceptions=True)

    async def _stop_pump(self, handle: ServiceHandle, pump: asyncio.Future[None]) -> None:
        handle.stop()  # no restart from here on
        source = self._source
        if source is not None:
            await source.close()  # ends the batch iterator; releases subscriptions
        if not pump.done():
            timeout = 0.0 if self._force else self.config.shutdown_timeout
            done, _ = await asyncio.wait([pump], timeout=timeout)
            if not done:
                log.warning("pump_cancelled", timeout=timeout)
                pump.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            exc = await asyncio.gather(pump, return_exceptions=True)
            if exc and isinstance(exc[0], Exception):
                log.error("pump_failed", error=repr(exc[0]))
                self._failure = exc[0]

    async def _pump(self) -> None:
        """Feed every source batch through :meth:`process` (supervised as ``source``).

        Called again by the supervisor after an unexpected error: a source the relay made
        from the config is closed and made anew; a source given to the relay is iterated
        again.
        """
        if self._pump_failed:
            await self._renew_source()
        self._pump_failed = True  # cleared when the source ends normally
        assert self._source is not None
        async for batch in self._source.batches():
            try:
                self.process(batch)
            except Exception as exc:  # one bad batch must not stop the relay
                self._stats.errors += 1
                log.exception("batch_failed", error=repr(exc), size=len(batch))
            if self._stop_requested:
                break
        self._pump_failed = False
        if not self._stop_requested:
            log.info("source_finished", source=self._source.kind)
            self.request_stop()

    async def _renew_source(self) -> None:
        if not self._owns_source or self._stop_requested:
            return
        old = self._source
        if old is not None:
            try:
                await old.close()
            except Exception as exc:  # it already failed; the new one matters
                log.error("source_close_failed", error=repr(exc))
        source = self._source = create_source(self.config, clock=self._clock)
        await source.start()
        self._normaliser.set_names(source.names)
        log.info("source_renewed", source=source.kind)

    def process(self, batch: Batch) -> Optional[PublishedBatch]:
        """Normalise, encode and publish one source batch; returns what was published."""
        encoder, source = self._encoder, self._source
        assert encoder is not None and source is not None
        started = time.perf_counter()
        result = self._normaliser.normalise_batch(batch)
        stats = self._stats
        for reason, n in result.dropped.items():
            stats.dropped[reason] = stats.dropped.get(reason, 0) + n
        if not len(result):
            return None
        columns = result.columns
        payload: Records = columns if columns is not None else result.records
        publish_ms = int(self._clock() * 1000)
        first_seq = self._seq + 1
        counts: List[int] = []
        publisher = self._publisher
        sent_before = publisher.bytes_sent

        def chunks() -> Iterator[bytes]:
            for message, count in encoder.iter_chunks(payload, first_seq=first_seq,
                                                      publish_time_ms=publish_ms):
                counts.append(count)
                yield message

        messages = publisher.send_batch(chunks())  # each message leaves as soon as encoded
        self._seq += len(messages)
        stats.batches += 1
        stats.records += len(result)
        stats.messages += len(messages) + 2
        stats.bytes += publisher.bytes_sent - sent_before
        # Lag means something only against the real clock: a simulated or replayed day runs
        # on its own time.
        newest = 0
        if source.kind == "qmt":
            times = columns.time_ms if columns is not None else [r.time_ms for r in result.records]
            newest = int(max(filter(None, times), default=0))  # numpy column: plain int
        if newest:
            lag = self._last_lag_ms = publish_ms - newest
            if stats.lag_ms_max is None or lag > stats.lag_ms_max:
                stats.lag_ms_max = lag
        self._last_batch_at = publish_ms / 1000.0
        published = PublishedBatch(result, messages, counts, first_seq, publish_ms,
                                   self.run_id, source.kind)
        for sink in self._started_sinks:
            try:
                sink.write(published)
            except Exception as exc:  # a failing sink must not stop publishing
                stats.errors += 1
                log.error("sink_failed", sink=type(sink).__name__, error=repr(exc))
        ops = self._ops
        if ops is not None:
            if columns is not None:
                codes, markets = columns.code, columns.market
            else:
                codes = [r.code for r in result.records]
                markets = [r.market for r in result.records]
            # Every tick published: the batch's own keys are the symbols (hashes cached).
            symbols: Iterable[str] = batch.keys() if len(codes) == len(batch) else [
                f"{code}.{market}" for code, market in zip(codes, markets)]
            ops.observe_batch(symbols, markets, publish_ms / 1000.0,
                              time.perf_counter() - started)
        return published

    async def _every(self, interval: float, action: Callable[[], None]) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                action()
            except Exception as exc:  # heartbeats and stats must keep going
                log.error("periodic_task_failed", action=action.__name__, error=repr(exc))

    def _heartbeat(self) -> None:
        source = self._source
        connected = bool(source is not None and source.connected)
        last = self._last_batch_at
        message = encode_heartbeat({
            "run_id": self.run_id,
            "source": source.kind if source is not None else None,
            "simulated": source is not None and source.kind == "simulator",
            "status": "up" if connected else "down",
            "seq": self._seq,
            "time_ms": int(self._clock() * 1000),
            "last_data_ms": None if last is None else int(last * 1000),
            "subscribers": self._publisher.subscribers,
            **self.supervisor.summary(),
        })
        self._publisher.send(message)
        for sink in self._heartbeat_sinks:
            sink.heartbeat(message)

    def _counters(self) -> Dict[str, int]:
        """Counters the source and the sinks report (reconnects, recorder rows, queues...)."""
        counters: Dict[str, int] = {}
        for part in (self._source, *self._started_sinks):
            if isinstance(part, ReportsCounters):
                counters.update(part.counters())
        return counters

    def _sample(self) -> None:
        """Hand the operations side a snapshot of what the relay knows (every few seconds)."""
        ops, source = self._ops, self._source
        if ops is None:
            return
        now = _Stats()   # the totals so far: the logged intervals plus the current one
        now.add(self._totals)
        now.add(self._stats)
        self._ops_status = ops.sample(
            state=self.state.value,
            connected=bool(source is not None and source.connected),
            last_batch_at=self._last_batch_at, lag_ms=self._last_lag_ms, seq=self._seq,
            subscribers=self._publisher.subscribers,
            totals={"batches": now.batches, "records": now.records, "messages": now.messages,
                    "bytes": now.bytes, "errors": now.errors},
            dropped=now.dropped, counters=self._counters(),
            services=[(service.name, service.alive, service.failures, service.restarts)
                      for service in self.supervisor.status()],
            refused=self.security.refusals())

    def _log_stats(self) -> None:
        s, t = self._stats, self._totals
        log.info(
            "stats",
            interval_s=self.config.logging.stats_interval,
            batches=s.batches,
            records=s.records,
            dropped=dict(sorted(s.dropped.items())),
            messages=s.messages,
            bytes=s.bytes,
            errors=s.errors,
            subscribers=self._publisher.subscribers,
            lag_ms_max=s.lag_ms_max,
            seq=self._seq,
            service_failures=self.supervisor.failures,
        )
        t.add(s)
        self._stats = _Stats()

    async def shutdown(self) -> None:
        """Release everything in reverse order of startup. Idempotent."""
        if self.state is State.STOPPED:
            return
        self.state = State.STOPPING
        if self._history_schedule is not None:
            self._history_schedule.close()
            self._history_schedule = None
        source = self._source
        if source is not None:
            try:
                await source.close()
            except Exception as exc:  # keep releasing the rest
                log.error("source_close_failed", error=repr(exc))
        for sink in reversed(self._started_sinks):
            try:
                sink.close()
            except Exception as exc:  # keep releasing the rest
                log.error("sink_close_failed", sink=type(sink).__name__, error=repr(exc))
        self._publisher.close()
        self._sample()
        self._started_sinks.clear()
        self._log_stats()
        t = self._totals
        ops, self._ops = self._ops, None
        if ops is not None:
            try:
                ops.close(stopped={"batches": t.batches, "records": t.records,
                                   "last_seq": self._seq, "errors": t.errors})
            except Exception as exc:  # keep releasing the rest
                log.error("ops_close_failed", error=repr(exc))
        log.info("relay_stopped", run_id=self.run_id, batches=t.batches, records=t.records,
                 messages=t.messages, dropped=dict(sorted(t.dropped.items())), errors=t.errors,
                 last_seq=self._seq)
        self.state = State.STOPPED
