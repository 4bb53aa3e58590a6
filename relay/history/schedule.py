"""The running relay's scheduled history import (``history.schedule``).

On each trading day (a weekday not in ``source.qmt.holidays``) at each configured China time
(``["15:35"]``; a time already passed when the relay starts counts as due), a thread of its
own starts ``qmt-relay history import`` as a **child process** with the relay's config, waits
for it and logs the outcome (``history_schedule_done`` with the exit code). The relay's loop
never waits for it: publishing goes on whatever the import does. A run still going when the
next one is due is not doubled (``history_schedule_skipped``). On relay stop a running child
is terminated: the import is crash-safe and the next run completes it.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import threading
import time
from datetime import date
from typing import Callable, List, Optional, Sequence, Set, Tuple

import structlog
import yaml

from relay.config import Config, config_to_dict
from relay.sources._calendar import TradingCalendar, parse_day, parse_hhmm

__all__ = ["HistorySchedule"]

log = structlog.get_logger(__name__)


class HistorySchedule:
    """Starts the import child process at the configured times.

    Args:
        config: the relay's config (``history.schedule``, the rest is handed to the child).
        clock: epoch seconds (tests drive it).
        command: the child's command line before ``--config FILE`` (default:
            ``python -m relay history import``).
        check_interval: seconds between checks of the clock.
    """

    def __init__(self, config: Config, *, clock: Callable[[], float] = time.time,
                 command: Optional[Sequence[str]] = None, check_interval: float = 1.0) -> None:
        self._config = config
        self._clock = clock
        self._times = [parse_hhmm(t) for t in config.history.schedule]
        self._calendar = TradingCalendar((), [parse_day(d) for d in config.source.qmt.holidays])
        self._done: Set[Tuple[date, int]] = set()
        self._command = list(command or [sys.executable, "-m", "relay", "history", "import"])
        self._interval = check_interval
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._child: Optional[subprocess.Popen[bytes]] = None
        self._config_file: Optional[str] = None
        self.outcomes: List[int] = []
        """Exit codes of the finished runs, in order."""

    def start(self) -> None:
        """Write the child's config file and start the scheduling thread."""
        if not self._times or self._thread is not None:
            return
        fd, path = tempfile.mkstemp(prefix="qmt-relay-history-", suffix=".yaml")
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            yaml.safe_dump(config_to_dict(self._config), file, allow_unicode=True)
        self._config_file = path
        self._thread = threading.Thread(target=self._run, name="history-schedule", daemon=True)
        self._thread.start()
        log.info("history_schedule_started", times=list(self._config.history.schedule),
                 dir=self._config.history.dir)

    def close(self) -> None:
        """Stop scheduling; terminate a running import. Idempotent."""
        self._stop.set()
        child = self._child
        if child is not None and child.poll() is None:
            child.terminate()
            log.warning("history_schedule_terminated", pid=child.pid)
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        if self._config_file is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._config_file)
            self._config_file = None

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                for _ in self._calendar.due(self._clock(), self._times, self._done):
                    self._launch()
            except Exception as exc:   # never let the scheduler die silently
                log.error("history_schedule_error", error=repr(exc))
            self._stop.wait(self._interval)

    def _launch(self) -> None:
        if self._child is not None and self._child.poll() is None:
            log.warning("history_schedule_skipped", reason="previous import still running",
                        pid=self._child.pid)
            return
        assert self._config_file is not None
        started = time.monotonic()
        with tempfile.TemporaryFile() as errors:
            try:
                child = subprocess.Popen([*self._command, "--config", self._config_file],
                                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=errors)
            except OSError as exc:
                log.error("history_schedule_failed", error=str(exc))
                return
            self._child = child
            log.info("history_schedule_running", pid=child.pid)
            while child.poll() is None and not self._stop.wait(0.2):
                pass
            code = child.wait()
            errors.seek(0)
            summary = errors.read()[-4000:].decode("utf-8", "replace").strip().splitlines()
        self.outcomes.append(code)
        event = "history_schedule_done" if code in (0, 1) else "history_schedule_failed"
        log.info(event, exit_code=code, elapsed_s=round(time.monotonic() - started, 1),
                 some_failed=code == 1, summary=summary[-12:])
