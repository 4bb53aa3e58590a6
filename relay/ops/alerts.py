"""Webhook alerts: JSON POSTs when the feed is lost, stalls or recovers, the recorder fails,
or the relay starts and stops.

:meth:`AlertSender.notify` only appends to bounded queues (it never blocks, whatever the
webhooks do); each webhook has a thread of its own that delivers its alerts, retrying with
exponential backoff, so a slow or dead robot delays nobody else. Each event kind is
rate-limited (at most ``rate_limit`` alerts per ``rate_window`` seconds), so a flapping feed
sends a bounded number of alerts; the next alert of that kind says how many were suppressed.

A webhook is a URL (it receives the generic body below) or a URL with a body ``template``: any
JSON value whose strings may use ``$event``, ``$text``, ``$run_id``, ``$source``, ``$time``,
``$host`` and ``$details`` (the details as JSON text), so DingTalk, WeCom, Feishu and Slack
robots get the shape they expect. The generic body::

    {"event": "feed_lost", "text": "...", "run_id": "...", "source": "qmt",
     "time": "2026-12-02T09:31:02+08:00", "host": "...", "details": {...}}
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import queue
import socket
import string
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Deque, Dict, List, Mapping, Optional, Sequence, Union

import structlog

__all__ = ["EVENTS", "PLACEHOLDERS", "Alert", "AlertSender", "Webhook", "render_template"]

log = structlog.get_logger("relay.ops.alerts")

EVENTS: Mapping[str, str] = {
    "relay_started": "relay started",
    "relay_stopped": "relay stopped",
    "feed_lost": "feed lost",
    "feed_stalled": "feed stalled",
    "feed_recovered": "feed recovered",
    "recorder_failed": "recorder failed",
}
"""Event kind -> the words used in the alert text."""

PLACEHOLDERS = frozenset({"event", "text", "run_id", "source", "time", "host", "details"})
"""Names a body template may use as ``$name`` or ``${name}``."""

_CHINA = _dt.timezone(_dt.timedelta(hours=8))
_STOP = object()


@dataclass(frozen=True)
class Alert:
    """One alert, before it is rendered for a webhook."""

    event: str
    text: str
    run_id: str
    source: str
    time: float
    details: Mapping[str, Any] = field(default_factory=dict)

    def fields(self, host: str) -> Dict[str, Any]:
        """The generic body (and the values of a template's placeholders)."""
        when = _dt.datetime.fromtimestamp(self.time, _CHINA).isoformat(timespec="seconds")
        return {"event": self.event, "text": self.text, "run_id": self.run_id,
                "source": self.source, "time": when, "host": host,
                "details": dict(self.details)}


def render_template(template: Any, values: Mapping[str, Any]) -> Any:
    """``template`` with ``$name`` placeholders replaced in every string (keys included).

    Unknown ``$names`` and lone ``$`` signs stay as they are.
    """
    if isinstance(template, str):
        return string.Template(template).safe_substitute(values)
    if isinstance(template, list):
        return [render_template(item, values) for item in template]
    if isinstance(template, dict):
        return {render_template(k, values): render_template(v, values)
                for k, v in template.items()}
    return template


@dataclass(frozen=True)
class Webhook:
    """Where alerts go: a URL and an optional body template (a parsed JSON value)."""

    url: str
    template: Optional[Any] = None

    def body(self, alert: Alert, host: str) -> bytes:
        generic = alert.fields(host)
        if self.template is None:
            payload: Any = generic
        else:
            values = dict(generic)
            values["details"] = json.dumps(generic["details"], ensure_ascii=False,
                                           sort_keys=True)
            payload = render_template(self.template, values)
        return json.dumps(payload, ensure_ascii=False).encode("utf-8")

    @property
    def shown(self) -> str:
        """The URL without its query (robot tokens live there), for logs."""
        return self.url.split("?", 1)[0]


Poster = Callable[[str, bytes, float], int]
"""POSTs a JSON body with a timeout, returns the HTTP status; raises OSError on failure."""


def _post(url: str, body: bytes, timeout: float) -> int:
    request = urllib.request.Request(
        url, data=body, method="POST",
        headers={"Content-Type": "application/json; charset=utf-8",
                 "User-Agent": "qmt-relay-alerts"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            response.read(65536)
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


class _Channel:
    """One webhook's queue and sender thread (a slow robot never delays another)."""

    def __init__(self, hook: Webhook, queue_size: int) -> None:
        self.hook = hook
        self.queue: queue.Queue[Any] = queue.Queue(maxsize=queue_size)
        self.thread: Optional[threading.Thread] = None


class AlertSender:
    """Delivers alerts to webhooks, each from a thread of its own.

    Args:
        webhooks: where every alert goes.
        queue_size: alerts waiting per webhook; beyond it, new alerts are dropped (counted).
        timeout: seconds per HTTP request; also how long :meth:`close` waits to deliver
            what is queued (the ``relay_stopped`` alert).
        retries: further attempts after a failed delivery.
        backoff: seconds before the first retry, doubled for each next one.
        backoff_max: cap of the retry delay.
        rate_limit: alerts of one event kind allowed per ``rate_window`` seconds.
        rate_window: seconds.
        clock: monotonic seconds (rate limiting).
        post: the HTTP POST (tests may substitute one).
        host: the host name put in alerts (default: this machine's).
    """

    def __init__(self, webhooks: Sequence[Webhook], *, queue_size: int = 100,
                 timeout: float = 5.0, retries: int = 3, backoff: float = 1.0,
                 backoff_max: float = 30.0, rate_limit: int = 5, rate_window: float = 600.0,
                 clock: Callable[[], float] = time.monotonic,
                 post: Poster = _post, host: Optional[str] = None) -> None:
        self.webhooks = tuple(webhooks)
        self._channels = [_Channel(hook, queue_size) for hook in self.webhooks]
        self._queue_size = queue_size
        self._timeout = timeout
        self._retries = retries
        self._backoff = backoff
        self._backoff_max = backoff_max
        self._rate_limit = rate_limit
        self._rate_window = rate_window
        self._clock = clock
        self._post = post
        self._host = host if host is not None else socket.gethostname()
        self._recent: Dict[str, Deque[float]] = {}
        self._suppressed_by_kind: Dict[str, int] = {}
        self._started = False
        self._deadline: Optional[float] = None   # set by close(): stop retrying after it
        self._wake = threading.Event()
        self._lock = threading.Lock()            # counters are bumped by several threads
        # Counters (read by the metrics snapshot).
        self.sent = 0
        self.failed = 0
        self.dropped = 0
        self.suppressed = 0

    @property
    def depth(self) -> int:
        """Alerts waiting for delivery, over all webhooks."""
        return sum(channel.queue.qsize() for channel in self._channels)

    def counters(self) -> Dict[str, int]:
        return {"alerts_sent": self.sent, "alerts_failed": self.failed,
                "alerts_dropped": self.dropped, "alerts_suppressed": self.suppressed,
                "alerts_queue": self.depth}

    def start(self) -> None:
        """Start one sender thread per webhook."""
        if self._started:
            return
        self._started = True
        for number, channel in enumerate(self._channels):
            channel.thread = threading.Thread(target=self._run, args=(channel,),
                                              name=f"relay-alerts-{number}", daemon=True)
            channel.thread.start()

    def notify(self, alert: Alert) -> bool:
        """Queue ``alert`` for every webhook unless rate-limited; never blocks.

        Returns:
            Whether the alert was queued (for at least one webhook).
        """
        if not self._channels:
            return False
        now = self._clock()
        recent = self._recent.setdefault(alert.event, deque())
        while recent and recent[0] <= now - self._rate_window:
            recent.popleft()
        if len(recent) >= self._rate_limit:
            self.suppressed += 1
            self._suppressed_by_kind[alert.event] = self._suppressed_by_kind.get(alert.event,
                                                                                 0) + 1
            log.info("alert_suppressed", alert=alert.event, window_s=self._rate_window)
            return False
        recent.append(now)
        skipped = self._suppressed_by_kind.pop(alert.event, 0)
        if skipped:
            alert = Alert(alert.event, f"{alert.text} ({skipped} similar alerts suppressed)",
                          alert.run_id, alert.source, alert.time,
                          {**alert.details, "suppressed": skipped})
        queued = False
        for channel in self._channels:
            try:
                channel.queue.put_nowait(alert)
            except queue.Full:
                with self._lock:
                    self.dropped += 1
                log.warning("alert_dropped", alert=alert.event, webhook=channel.hook.shown,
                            queue_size=self._queue_size)
            else:
                queued = True
        return queued

    def close(self) -> None:
        """Deliver what is queued within ``timeout`` seconds, then stop. Idempotent."""
        if not self._started:
            return
        self._started = False
        self._deadline = time.monotonic() + self._timeout
        self._wake.set()   # cut retry waits short: from now on, retries respect the deadline
        for channel in self._channels:
            with contextlib.suppress(queue.Full):
                channel.queue.put(_STOP, timeout=max(0.0, self._deadline - time.monotonic()))
        for channel in self._channels:
            thread, channel.thread = channel.thread, None
            if thread is None:
                continue
            thread.join(max(0.0, self._deadline - time.monotonic()) + 1.0)
            if thread.is_alive():
                log.warning("alerts_abandoned", webhook=channel.hook.shown,
                            queued=channel.queue.qsize())

    # -- the sender threads -----------------------------------------------------------------

    def _run(self, channel: _Channel) -> None:
        while True:
            item = channel.queue.get()
            if item is _STOP:
                return
            if self._past_deadline():
                continue   # closing and out of time: drain without sending
            try:
                self._deliver(channel.hook, item)
            except Exception as exc:  # a bug must not end this webhook's thread
                with self._lock:
                    self.failed += 1
                log.exception("alert_failed", alert=item.event, webhook=channel.hook.shown,
                              error=repr(exc))

    def _past_deadline(self) -> bool:
        return self._deadline is not None and time.monotonic() >= self._deadline

    def _deliver(self, hook: Webhook, alert: Alert) -> None:
        body = hook.body(alert, self._host)
        delay = self._backoff
        attempts = self._retries + 1
        error: Union[str, int] = ""
        for attempt in range(1, attempts + 1):
            timeout = self._timeout
            if self._deadline is not None:
                timeout = min(timeout, max(0.1, self._deadline - time.monotonic()))
            try:
                status = self._post(hook.url, body, timeout)
            except (OSError, ValueError) as exc:   # refused, timed out, bad URL
                error = repr(exc)
            else:
                if 200 <= status < 300:
                    with self._lock:
                        self.sent += 1
                    log.info("alert_sent", alert=alert.event, webhook=hook.shown,
                             attempt=attempt)
                    return
                error = status
            if attempt == attempts or self._past_deadline():
                break
            log.warning("alert_retry", alert=alert.event, webhook=hook.shown, attempt=attempt,
                        error=error, delay_s=delay)
            self._wake.wait(delay)
            delay = min(self._backoff_max, delay * 2)
        with self._lock:
            self.failed += 1
        log.error("alert_failed", alert=alert.event, webhook=hook.shown, error=error)


def webhooks_from_config(entries: Sequence[Any]) -> List[Webhook]:
    """:class:`Webhook` objects from ``alerts.webhooks`` (URL strings or url/template)."""
    hooks: List[Webhook] = []
    for entry in entries:
        if isinstance(entry, str):
            hooks.append(Webhook(entry))
        else:
            template = json.loads(entry.template) if entry.template is not None else None
            hooks.append(Webhook(entry.url, template))
    return hooks
