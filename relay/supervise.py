"""Supervision: no thread or task of the relay dies silently.

Every long-running thread and asyncio task the relay owns (the source pump, the snapshot
service, the recorder's writer, and the history, metrics, alerts and NATS services) runs
through one :class:`Supervisor`:

- ``supervisor.thread(name, target)`` runs ``target()`` on a daemon thread;
- ``supervisor.task(name, factory)`` runs ``await factory()`` as a task on the running loop.

When the target returns, the service is done. When it raises, the supervisor logs an
``service_failed`` error event whose JSON line carries the traceback, counts the failure,
waits a capped exponential backoff and calls the target again. ``max_failures`` failures of
one service within ``window`` seconds are fatal: the supervisor logs ``service_gave_up`` and
calls its fatal handler once (the relay stops and exits non-zero, so the service manager
restarts the process). :meth:`Supervisor.status` is what heartbeats and metrics report.

:func:`capture_crashes` routes what would otherwise print a bare traceback to stderr
(uncaught exceptions in any thread, unraisable exceptions, an asyncio loop's unhandled
errors) to the log as error events.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass
from types import TracebackType
from typing import (
    Any,
    Awaitable,
    Callable,
    Deque,
    Dict,
    Iterator,
    List,
    Optional,
    Type,
)

import structlog

from relay.errors import ServiceError

__all__ = ["ServiceHandle", "ServiceStatus", "Supervisor", "capture_crashes",
           "loop_exception_handler"]

log = structlog.get_logger("relay.supervise")

FatalHandler = Callable[[ServiceError], None]


@dataclass(frozen=True)
class ServiceStatus:
    """One supervised service as heartbeats and metrics show it."""

    name: str
    alive: bool
    failures: int             # unexpected deaths since start
    restarts: int             # times it was started again after one
    last_error: Optional[str]


class ServiceHandle:
    """A supervised thread or task: its counters, and a way to stop restarting it."""

    __slots__ = ("_alive", "_done", "_loop", "_stopped", "_thread", "_wake", "failures",
                 "last_error", "name", "recent", "restarts", "task")

    def __init__(self, name: str) -> None:
        self.name = name
        self.failures = 0
        self.restarts = 0
        self.last_error: Optional[str] = None
        self.recent: Deque[float] = deque()
        self._alive = False
        self._stopped = threading.Event()
        self._done = threading.Event()
        self._wake: Optional[asyncio.Event] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread: Optional[threading.Thread] = None
        self.task: Optional[asyncio.Task[None]] = None

    @property
    def alive(self) -> bool:
        return self._alive

    @property
    def stopping(self) -> bool:
        return self._stopped.is_set()

    def stop(self) -> None:
        """No more restarts; a pending backoff wait ends at once. The target itself is
        stopped by its owner (its own stop flag), or, for a task, by cancelling it."""
        self._stopped.set()
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # loop closing concurrently
                loop.call_soon_threadsafe(wake.set)

    def join(self, timeout: Optional[float] = None) -> bool:
        """Wait until the service has finished for good; False on timeout."""
        return self._done.wait(timeout)

    def status(self) -> ServiceStatus:
        return ServiceStatus(self.name, self._alive, self.failures, self.restarts,
                             self.last_error)


class Supervisor:
    """Runs, watches and restarts the relay's threads and tasks.

    Args:
        max_failures: this many failures of one service within ``window`` seconds are fatal.
        window: seconds over which failures are counted.
        backoff_min: first wait before a restart, seconds; doubled per failure ...
        backoff_max: ... up to this cap.
        clock: monotonic seconds (tests pass a fake one).
    """

    def __init__(self, *, max_failures: int = 5, window: float = 60.0,
                 backoff_min: float = 0.5, backoff_max: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_failures = max_failures
        self.window = window
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self._clock = clock
        self._lock = threading.Lock()
        self._services: Dict[str, ServiceHandle] = {}
        self._fatal: Optional[FatalHandler] = None
        self.fatal: Optional[ServiceError] = None

    def set_fatal_handler(self, handler: Optional[FatalHandler]) -> None:
        """Call ``handler`` (once, from the failing thread) when a service fails too often."""
        self._fatal = handler

    # -- starting ----------------------------------------------------------------------------

    def thread(self, name: str, target: Callable[[], None]) -> ServiceHandle:
        """Run ``target()`` on a supervised daemon thread named ``name``."""
        handle = self._register(name)
        thread = threading.Thread(target=self._run_thread, args=(handle, target),
                                  name=name, daemon=True)
        handle._thread = thread
        thread.start()
        return handle

    def task(self, name: str, factory: Callable[[], Awaitable[None]]) -> ServiceHandle:
        """Run ``await factory()`` as a supervised task on the running loop.

        Cancelling ``handle.task`` (or :meth:`ServiceHandle.stop`) ends it for good.
        """
        handle = self._register(name)
        handle._wake = asyncio.Event()
        handle._loop = asyncio.get_running_loop()
        handle.task = asyncio.ensure_future(self._run_task(handle, factory))
        return handle

    def _register(self, name: str) -> ServiceHandle:
        with self._lock:
            old = self._services.get(name)
            if old is not None and not old._done.is_set():
                raise ValueError(f"a service named {name!r} is already running")
            handle = self._services[name] = ServiceHandle(name)
        return handle

    # -- reporting ---------------------------------------------------------------------------

    def status(self) -> List[ServiceStatus]:
        """Every service started so far, in start order."""
        with self._lock:
            handles = list(self._services.values())
        return [h.status() for h in handles]

    def summary(self) -> Dict[str, Any]:
        """A JSON-able summary for heartbeats: total failures and each service's state."""
        services = self.status()
        return {
            "failures": sum(s.failures for s in services),
            "services": {s.name: {"alive": s.alive, "failures": s.failures,
                                  "restarts": s.restarts} for s in services},
        }

    @property
    def failures(self) -> int:
        return sum(s.failures for s in self.status())

    # -- machinery ---------------------------------------------------------------------------

    def _failed(self, handle: ServiceHandle, exc: BaseException) -> Optional[float]:
        """Count and log one failure; the backoff before a restart, or None to give up."""
        now = self._clock()
        handle.failures += 1
        handle.last_error = repr(exc)
        recent = handle.recent
        recent.append(now)
        while recent and now - recent[0] > self.window:
            recent.popleft()
        log.error("service_failed", service=handle.name, error=repr(exc),
                  failures=handle.failures, exc_info=exc)
        if len(recent) >= self.max_failures:
            error = ServiceError(handle.name, len(recent), self.window, repr(exc))
            log.error("service_gave_up", service=handle.name, failures=len(recent),
                      window_s=self.window, error=repr(exc))
            self._give_up(error)
            return None
        return float(min(self.backoff_max, self.backoff_min * 2.0 ** (len(recent) - 1)))

    def _give_up(self, error: ServiceError) -> None:
        with self._lock:
            first = self.fatal is None
            if first:
                self.fatal = error
        handler = self._fatal
        if first and handler is not None:
            try:
                handler(error)
            except Exception as exc:  # the handler only asks the relay to stop; log, go on
                log.error("fatal_handler_failed", error=repr(exc), exc_info=exc)

    def _run_thread(self, handle: ServiceHandle, target: Callable[[], None]) -> None:
        try:
            while not handle.stopping:
                handle._alive = True
                try:
                    target()
                except Exception as exc:  # the point of supervision: log, count, restart
                    handle._alive = False
                    delay = self._failed(handle, exc)
                    if delay is None or handle._stopped.wait(delay):
                        return
                    handle.restarts += 1
                    log.info("service_restarted", service=handle.name,
                             restarts=handle.restarts)
                    continue
                return
        finally:
            handle._alive = False
            handle._done.set()

    async def _run_task(self, handle: ServiceHandle,
                        factory: Callable[[], Awaitable[None]]) -> None:
        wake = handle._wake
        assert wake is not None
        try:
            while not handle.stopping:
                handle._alive = True
                try:
                    await factory()
                except Exception as exc:  # the point of supervision: log, count, restart
                    handle._alive = False
                    delay = self._failed(handle, exc)
                    if delay is None:
                        return
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(wake.wait(), delay)
                    if handle.stopping:
                        return
                    handle.restarts += 1
                    log.info("service_restarted", service=handle.name,
                             restarts=handle.restarts)
                    continue
                return
        finally:
            handle._alive = False
            handle._done.set()


# -- no bare tracebacks ------------------------------------------------------------------------


def _format(exc_type: Type[BaseException], exc: Optional[BaseException],
            tb: Optional[TracebackType]) -> str:
    return "".join(traceback.format_exception(exc_type, exc, tb))


def _thread_hook(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return
    thread = args.thread.name if args.thread is not None else None
    log.error("thread_crashed", thread=thread, error=repr(args.exc_value),
              traceback=_format(args.exc_type, args.exc_value, args.exc_traceback))


def _unraisable_hook(args: Any) -> None:
    exc = args.exc_value
    log.error("unraisable_exception", error=repr(exc), message=args.err_msg,
              object=repr(args.object)[:200],
              traceback=_format(args.exc_type, exc, args.exc_traceback))


def _main_hook(exc_type: Type[BaseException], exc: BaseException,
               tb: Optional[TracebackType]) -> None:
    if issubclass(exc_type, KeyboardInterrupt):
        return
    log.critical("uncaught_exception", error=repr(exc), traceback=_format(exc_type, exc, tb))


def loop_exception_handler(loop: asyncio.AbstractEventLoop, context: Dict[str, Any]) -> None:
    """asyncio's handler for errors nobody awaited: an error event, never stderr."""
    exc = context.get("exception")
    fields: Dict[str, Any] = {"message": context.get("message")}
    if isinstance(exc, BaseException):
        fields["error"] = repr(exc)
        fields["traceback"] = _format(type(exc), exc, exc.__traceback__)
    for key in ("task", "future", "handle"):
        if key in context:
            fields[key] = repr(context[key])[:200]
    log.error("loop_exception", **fields)


@contextlib.contextmanager
def capture_crashes() -> Iterator[None]:
    """Route uncaught exceptions of every thread, unraisable exceptions and (in the main
    thread) uncaught exceptions to the log; restore the previous hooks on exit."""
    previous = (threading.excepthook, sys.unraisablehook, sys.excepthook)
    threading.excepthook = _thread_hook
    sys.unraisablehook = _unraisable_hook
    sys.excepthook = _main_hook
    try:
        yield
    finally:
        threading.excepthook, sys.unraisablehook, sys.excepthook = previous
