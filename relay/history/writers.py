"""Writer processes: one file of the history directory each, several at a time.

The HDF5 library serialises every call of a process, so the import and the mirror write
several files at once by giving each file to a process of its own (:func:`run_jobs`).
A writer process dies with the process that started it (a killed import or sync must
leave no process writing the directory: on Linux the kernel kills it at once; elsewhere a
thread watching its parent ends it), and sends its progress back with :func:`emit`.
Processes are started with ``spawn`` on every OS, so what runs here is what runs on
Windows.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import queue
import sys
import threading
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable, List, Sequence, Tuple

from relay.errors import EXIT_INTERRUPTED, HistoryError

__all__ = ["emit", "run_jobs", "writer_count"]

_EVENTS: List[Any] = []     # a writer process's event queue (set once, at its start)


def writer_count(configured: int, files: int) -> int:
    """Processes to use for ``files`` files: ``configured`` (0 = one per CPU, at most 4)."""
    wanted = configured or min(os.cpu_count() or 1, 4)
    return max(1, min(wanted, files))


def run_jobs(directory: str, jobs: Sequence[Tuple[Callable[..., Any], Tuple[Any, ...]]],
             writers: int, on_event: Callable[[Any], None]) -> List[Any]:
    """Run ``fn(*args)`` of every job in a writer process, ``writers`` at a time, in the
    order given; ``on_event`` gets (in this process) what the jobs :func:`emit`.

    Returns:
        The jobs' results, in order.

    Raises:
        HistoryError: a writer process died; otherwise whatever a job raised.
    """
    context = multiprocessing.get_context("spawn")
    events: Any = context.Queue()
    with ProcessPoolExecutor(max_workers=writers, mp_context=context,
                             initializer=_start, initargs=(events,)) as pool:
        futures: List[Future[Any]] = [pool.submit(fn, *args) for fn, args in jobs]
        try:
            pending = set(futures)
            while pending:
                _drain(events, on_event, timeout=0.1)
                pending = {f for f in pending if not f.done()}
            _drain(events, on_event, timeout=0.0)
            results = []
            for future in futures:
                try:
                    results.append(future.result())
                except BrokenProcessPool as exc:
                    raise HistoryError(directory, "a writer process died") from exc
            return results
        except BaseException:
            for future in futures:
                future.cancel()
            raise


def emit(event: Any) -> None:
    """In a writer process: send ``event`` to the ``on_event`` of :func:`run_jobs`."""
    _EVENTS[0].put(event)


def _drain(events: Any, on_event: Callable[[Any], None], *, timeout: float) -> None:
    try:
        on_event(events.get(timeout=timeout) if timeout else events.get_nowait())
        while True:
            on_event(events.get_nowait())
    except queue.Empty:
        return


def _start(events: Any) -> None:
    _EVENTS.append(events)
    if sys.platform.startswith("linux"):
        import ctypes  # noqa: PLC0415
        import signal  # noqa: PLC0415

        ctypes.CDLL(None).prctl(1, int(signal.SIGKILL))   # PR_SET_PDEATHSIG
    parent = multiprocessing.parent_process()
    if parent is not None:
        def watch() -> None:
            multiprocessing.connection.wait([parent.sentinel])
            os._exit(EXIT_INTERRUPTED)

        threading.Thread(target=watch, name="history-parent-watch", daemon=True).start()
