"""The relay's operations side: snapshots, health transitions, alerts, the HTTP endpoint.

:class:`Operations` is owned by :class:`relay.app.Relay`. The relay calls
:meth:`Operations.observe_batch` once per published batch (the only hot-path cost) and
:meth:`Operations.sample` every ``metrics.sample_interval`` seconds on its event loop with
the numbers it knows; ``sample`` stores an immutable :class:`~relay.ops.metrics.OpsStatus`
for the HTTP thread and turns health changes into alerts.
"""

from __future__ import annotations

import time
from typing import (
    Any,
    Callable,
    Dict,
    Iterable,
    List,
    Mapping,
    Optional,
    Protocol,
    Sequence,
    Tuple,
    runtime_checkable,
)

import structlog

from relay import __version__
from relay.config import Config, service_addresses
from relay.ops.alerts import Alert, AlertSender, webhooks_from_config
from relay.ops.metrics import FeedTracker, History, OpsStatus, assess_health, build_registry

__all__ = ["Operations", "ReportsCounters"]

log = structlog.get_logger("relay.ops")


_TROUBLE = frozenset({"feed_lost", "feed_stalled", "recorder_failed"})


@runtime_checkable
class ReportsCounters(Protocol):
    """A source or sink that reports counters for metrics (``reconnects``, ``*_queue``...)."""

    def counters(self) -> Mapping[str, int]: ...


class Operations:
    """Metrics registry, feed tracker, health, alerts and the HTTP endpoint of one relay.

    Args:
        config: the relay's config (``metrics``, ``alerts``, the qmt watch windows).
        run_id: the relay's run id.
        source: the source kind.
        clock: epoch seconds.
        supervisor: a :class:`relay.supervise.Supervisor` that runs (and restarts) the HTTP
            thread; without one it runs on a plain thread.
        allow: the allow-list predicate for HTTP peers' IP addresses (``security.allow``).
        refuse: counts (and logs) one refused peer: ``refuse(service, ip)``.
        tls: ``security.tls`` files (cert, key, optional CA) for an ``https://`` endpoint.
    """

    def __init__(self, config: Config, *, run_id: str, source: str,
                 clock: Callable[[], float] = time.time, supervisor: Any = None,
                 allow: Optional[Callable[[str], bool]] = None,
                 refuse: Optional[Callable[[str, str], None]] = None,
                 tls: Any = None) -> None:
        self._config = config
        self._run_id = run_id
        self._source = source
        self._clock = clock
        mc = config.metrics
        self.tracker = FeedTracker(clock)
        self._history = History(mc.history_minutes * 60.0)
        self.latest: Optional[OpsStatus] = None
        self.registry, self.batch_seconds = build_registry(
            lambda: self.latest, run_id=run_id, version=__version__, source=source)
        self.server: Any = None
        address = service_addresses(config).metrics
        if address is not None:
            from relay.ops.http import OpsServer  # noqa: PLC0415 - only with an endpoint

            self.server = OpsServer(address, self.registry, lambda: self.latest,
                                    stale_after=max(10.0, 5 * mc.sample_interval), clock=clock,
                                    allow=allow, refuse=refuse, tls=tls)
        self._supervisor = supervisor
        ac = config.alerts
        self.alerts = AlertSender(webhooks_from_config(ac.webhooks), queue_size=ac.queue_size,
                                  timeout=ac.timeout, retries=ac.retries, backoff=ac.backoff,
                                  backoff_max=ac.backoff_max, rate_limit=ac.rate_limit,
                                  rate_window=ac.rate_window)
        self._calendar: Any = None
        self._stall_timeout = config.source.qmt.stall_timeout
        if source == "qmt":   # the only source whose silence in market hours means trouble
            from relay.sources._calendar import (  # noqa: PLC0415
                TradingCalendar,
                parse_day,
                parse_window,
            )

            qmt = config.source.qmt
            self._calendar = TradingCalendar([parse_window(w) for w in qmt.watch_windows],
                                             [parse_day(d) for d in qmt.holidays])
        self._feed: Optional[str] = None       # last feed status alerts were decided on
        self._recorder_failures = 0
        self._running_since: Optional[float] = None

    @property
    def url(self) -> Optional[str]:
        return self.server.url if self.server is not None else None

    def start(self) -> None:
        """Open the HTTP endpoint and start the alert sender.

        Raises:
            PublishError: the metrics address cannot be bound.
        """
        if self.server is not None:
            spawn = None
            if self._supervisor is not None:
                spawn = self._supervisor.thread
            self.server.start(spawn=spawn)
        self.alerts.start()

    def started(self, securities: int) -> None:
        """The relay is running: send ``relay_started``."""
        self._running_since = self._clock()
        self.alert("relay_started", f"relay started (source {self._source}, "
                                    f"{securities} securities)", {"securities": securities})

    def observe_batch(self, symbols: Iterable[str], markets: List[str], now: float,
                      seconds: float) -> None:
        """One published batch (hot path): its symbols and markets, processing time."""
        self.tracker.observe(symbols, markets, now)
        self.batch_seconds.observe(seconds)

    def in_window(self, now: float) -> bool:
        return self._calendar is not None and self._calendar.window_start(now) is not None

    def sample(self, *, state: str, connected: bool, last_batch_at: Optional[float],
               lag_ms: Optional[int], seq: int, subscribers: int, totals: Mapping[str, int],
               dropped: Mapping[str, int], counters: Mapping[str, int],
               services: Sequence[Tuple[str, bool, int, int]] = (),
               refused: Optional[Mapping[str, int]] = None) -> OpsStatus:
        """Take a snapshot (on the event loop), store it, and alert on health changes."""
        now = self._clock()
        mc = self._config.metrics
        in_window = self.in_window(now)
        age = None if last_batch_at is None else max(0.0, now - last_batch_at)
        since = self._running_since
        health = assess_health(state=state, connected=connected, in_window=in_window,
                               last_batch_age=age, stall_timeout=self._stall_timeout,
                               started_for=0.0 if since is None else now - since)
        tracker = self.tracker
        today, quiet = tracker.summary(now, mc.quiet_after)
        self._history.add(now, tracker.records_by_market)
        all_counters = dict(counters)
        all_counters.update(self.alerts.counters())
        status = OpsStatus(
            time=now, run_id=self._run_id, version=__version__, source=self._source,
            state=state, connected=connected, in_window=in_window, last_batch_age=age,
            lag_s=None if lag_ms is None else lag_ms / 1000.0, seq=seq, subscribers=subscribers,
            batches=totals["batches"], records=totals["records"], messages=totals["messages"],
            bytes=totals["bytes"], errors=totals["errors"], dropped=dict(dropped),
            records_by_market=dict(tracker.records_by_market),
            securities_today=today, quiet=tuple(quiet), counters=all_counters,
            health=health, rates=self._history.rates(), services=tuple(services),
            refused=dict(refused or {}))
        self.latest = status
        if state == "running":
            self._alert_on_change(status)
        return status

    def _alert_on_change(self, status: OpsStatus) -> None:
        feed, previous = status.health.status, self._feed
        if feed != previous:
            self._feed = feed
            details: Dict[str, Any] = {"reason": status.health.reason, "seq": status.seq,
                                       "last_data_age_s": status.last_batch_age}
            if feed == "down":
                self.alert("feed_lost", f"feed lost: {status.health.reason}", details)
            elif feed == "stalled":
                self.alert("feed_stalled", f"feed stalled: {status.health.reason}", details)
            elif feed == "up" and previous is not None:
                self.alert("feed_recovered", f"feed recovered: {status.health.reason}",
                           details)
        failures = status.counters.get("recorder_failures", 0)
        if failures > self._recorder_failures:
            self._recorder_failures = failures
            self.alert("recorder_failed", f"recorder failed ({failures} disk errors so far)",
                       {"failures": failures, "lost": status.counters.get("recorder_lost", 0)})

    def alert(self, event: str, text: str, details: Mapping[str, Any]) -> None:
        """Log the event and hand it to the alert sender (never blocks)."""
        level = log.warning if event in _TROUBLE else log.info
        level("alert", alert=event, text=text)
        self.alerts.notify(Alert(event, f"[qmt-relay] {text}", self._run_id, self._source,
                                 self._clock(), dict(details)))

    def close(self, *, stopped: Mapping[str, Any]) -> None:
        """Send ``relay_stopped`` (waiting at most ``alerts.timeout``), close the endpoint."""
        if self._running_since is not None:
            self.alert("relay_stopped", "relay stopped", stopped)
        self.alerts.close()
        if self.server is not None:
            self.server.close()
