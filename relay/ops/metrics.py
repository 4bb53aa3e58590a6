"""What the relay knows about itself, as snapshots, health and Prometheus metrics.

The relay's event loop feeds a :class:`FeedTracker` once per published batch (a couple of
C-level dict updates, nothing per record in Python) and takes an :class:`OpsStatus` snapshot
every ``metrics.sample_interval`` seconds. Everything that other threads serve (``/metrics``,
``/healthz``, ``/status``, the page, alerts) reads the latest snapshot, never the relay's
live state, so a scrape costs the pipeline nothing.

Each relay gets a registry of its own (:func:`build_registry`): no metric lives in
``prometheus_client``'s global default registry, so two relays (or tests) in one process never
share a counter.
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter, deque
from dataclasses import dataclass
from itertools import repeat
from typing import (
    Callable,
    Deque,
    Dict,
    Iterable,
    Iterator,
    List,
    Mapping,
    Optional,
    Tuple,
    Type,
    Union,
)

from prometheus_client import CollectorRegistry, Histogram, Info
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

__all__ = [
    "BATCH_SECONDS_BUCKETS",
    "FeedTracker",
    "Health",
    "History",
    "OpsStatus",
    "assess_health",
    "build_registry",
]

_CHINA_OFFSET_S = 8 * 3600
_DAY_S = 86_400

# Per-batch processing time: a few ms for a small push, up to ~100 ms for a full market.
BATCH_SECONDS_BUCKETS: Tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
)


def _china_day(epoch: float) -> int:
    """Days since the epoch in China time (UTC+8, whatever the host's zone)."""
    return int((epoch + _CHINA_OFFSET_S) // _DAY_S)


class FeedTracker:
    """Per-security last-record times and per-market record counts, fed once per batch.

    Keys are QMT symbols (``600000.SH``): the source batch's own keys, whose string hashes
    Python has already computed, so noting a batch is one C-level dict update. The table is
    cleared when the China date changes, so :meth:`securities_today` counts the securities
    with a record today.

    Args:
        clock: epoch seconds.
    """

    __slots__ = ("_clock", "_day", "_markets", "last_seen", "records_by_market")

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._day = _china_day(clock())
        self._markets: Tuple[str, ...] = ()
        self.last_seen: Dict[str, float] = {}
        self.records_by_market: Dict[str, int] = {}

    def observe(self, symbols: Iterable[str], markets: List[str], now: float) -> None:
        """Note one published batch at ``now``.

        Args:
            symbols: the published records' symbols (``CODE.MARKET``).
            markets: their ``market`` column.
            now: publish time, epoch seconds.
        """
        day = _china_day(now)
        if day != self._day:
            self._day = day
            self.last_seen.clear()
        self.last_seen.update(zip(symbols, repeat(now)))
        # list.count per known market (a C loop comparing interned strings) is several times
        # cheaper than a Counter over the column; a market seen for the first time is added.
        by_market = self.records_by_market
        counted = 0
        for market in self._markets:
            n = markets.count(market)
            if n:
                by_market[market] += n
                counted += n
        if counted != len(markets):
            for market, n in Counter(m for m in markets if m not in by_market).items():
                by_market[market] = n
            self._markets = tuple(by_market)

    def securities_today(self) -> Dict[str, int]:
        """Securities with a record today, by market."""
        return self.summary(0.0, 0.0)[0]

    def quiet(self, now: float, quiet_after: float, limit: int = 200) -> List[str]:
        """Securities silent for ``quiet_after`` seconds while their market is still active.

        See :meth:`summary`.
        """
        return self.summary(now, quiet_after, limit)[1]

    def summary(self, now: float, quiet_after: float,
                limit: int = 200) -> Tuple[Dict[str, int], List[str]]:
        """Securities with a record today by market, and the quiet ones, in one pass.

        A security is quiet when silent for ``quiet_after`` seconds while its market is still
        active: a market counts as active (open) while any of its securities had a record
        within ``quiet_after`` seconds, so a closed market or a lost feed does not list every
        security as quiet. At most ``limit`` quiet symbols (``CODE.MARKET``), the longest
        silent first.
        """
        cutoff = now - quiet_after
        today: Dict[str, int] = {}
        active = set()
        silent: List[Tuple[float, str, str]] = []
        for symbol, seen in self.last_seen.items():
            market = symbol[symbol.rfind(".") + 1:]
            today[market] = today.get(market, 0) + 1
            if seen >= cutoff:
                active.add(market)
            else:
                silent.append((seen, symbol, market))
        quiet = sorted((seen, symbol) for seen, symbol, market in silent if market in active)
        return today, [symbol for _, symbol in quiet[:limit]]


@dataclass(frozen=True)
class Health:
    """Whether the feed is healthy, and why (the body of ``/healthz``)."""

    healthy: bool
    status: str             # "up", "down", "stalled", "starting", "stopping"
    reason: str

    def as_dict(self) -> Dict[str, object]:
        return {"healthy": self.healthy, "status": self.status, "reason": self.reason}


@dataclass(frozen=True)
class OpsStatus:
    """One snapshot of the relay, taken on its event loop.

    Counters are totals since the relay started; ``counters`` holds those of the source and
    the sinks (``reconnects``, ``stalls``, ``recorder_rows``, ``snapshot_requests``, queue
    depths named ``*_queue``...), whichever they report.
    """

    time: float
    run_id: str
    version: str
    source: str
    state: str
    connected: bool
    in_window: bool
    last_batch_age: Optional[float]
    lag_s: Optional[float]
    seq: int
    subscribers: int
    batches: int
    records: int
    messages: int
    bytes: int
    errors: int
    dropped: Mapping[str, int]
    records_by_market: Mapping[str, int]
    securities_today: Mapping[str, int]
    quiet: Tuple[str, ...]
    counters: Mapping[str, int]
    health: Health
    rates: Tuple[Mapping[str, object], ...] = ()   # records/s per market, last minutes
    services: Tuple[Tuple[str, bool, int, int], ...] = ()  # name, alive, failures, restarts
    refused: Mapping[str, int] = dataclasses.field(default_factory=dict)  # peers, per service

    def as_dict(self) -> Dict[str, object]:
        """Plain JSON-ready form (``/status``)."""
        out = dataclasses.asdict(self)
        out["quiet"] = list(self.quiet)
        out["rates"] = list(self.rates)
        out["services"] = [{"name": n, "alive": a, "failures": f, "restarts": r}
                           for n, a, f, r in self.services]
        return out


def assess_health(*, state: str, connected: bool, in_window: bool,
                  last_batch_age: Optional[float], stall_timeout: float,
                  started_for: float) -> Health:
    """Healthy while the source is connected and, inside a watch window, data flows.

    Args:
        state: the relay's lifecycle state (``running`` ...).
        connected: the source reports a live feed.
        in_window: now is inside a watch window of a trading day (always False for sources
            without a market calendar, so they are never "stalled").
        last_batch_age: seconds since the last published batch, None if none yet.
        stall_timeout: silence inside a watch window that counts as a stall.
        started_for: seconds since the relay started running (grace before the first batch).
    """
    if state != "running":
        return Health(False, "starting" if state in ("new", "starting") else "stopping",
                      f"relay is {state}")
    if not connected:
        return Health(False, "down", "source is not connected")
    if in_window:
        silent = last_batch_age if last_batch_age is not None else started_for
        if silent > stall_timeout:
            return Health(False, "stalled",
                          f"no data for {silent:.0f} s inside a watch window "
                          f"(stall after {stall_timeout:g} s)")
    if last_batch_age is None:
        return Health(True, "up", "source connected, no data yet")
    return Health(True, "up", f"source connected, last data {last_batch_age:.1f} s ago")


# Source and sink counters exported as Prometheus counters: key -> (metric name, help).
_COUNTERS: Mapping[str, Tuple[str, str]] = {
    "reconnects": ("source_reconnects", "Reconnects of the source (feed lost, stall, restart)."),
    "stalls": ("source_stalls", "Silent stalls the source detected and cured by resubscribing."),
    "callback_errors": ("source_callback_errors", "Errors inside the source's push callback."),
    "dropped_pushes": ("source_dropped_pushes", "Pushes dropped (source queue full)."),
    "recorder_rows": ("recorder_rows", "Records the recorder committed to HDF5."),
    "recorder_dropped": ("recorder_dropped", "Records the recorder dropped (queue full)."),
    "recorder_lost": ("recorder_lost", "Records the recorder lost to disk errors."),
    "recorder_failures": ("recorder_failures", "Disk errors of the recorder."),
    "nats_messages": ("nats_messages", "Spot messages the NATS bridge published."),
    "nats_acked": ("nats_acked", "Spot messages JetStream acknowledged."),
    "nats_unacked": ("nats_unacked", "Spot messages whose acknowledgement failed or never came."),
    "nats_dropped": ("nats_dropped", "Batches the NATS bridge dropped (queue full, NATS down)."),
    "nats_errors": ("nats_errors", "Publish calls of the NATS bridge that failed."),
    "nats_latest": ("nats_latest", "Latest-record messages the NATS bridge published."),
    "nats_disconnects": ("nats_disconnects", "Connections to NATS lost (the client reconnects)."),
    "alerts_sent": ("alerts_sent", "Alerts delivered to a webhook."),
    "alerts_failed": ("alerts_failed", "Alert deliveries that failed after every retry."),
    "alerts_dropped": ("alerts_dropped", "Alerts dropped because a webhook's queue was full."),
    "alerts_suppressed": ("alerts_suppressed", "Alerts suppressed by the per-kind rate limit."),
}
_REQUESTS_SUFFIX = "_requests"   # "snapshot_requests" -> requests_total{service="snapshot"}
_ERRORS_SUFFIX = "_errors"       # "history_errors" -> request_errors_total{service="history"}
_QUEUE_SUFFIX = "_queue"         # "recorder_queue" -> queue_depth{queue="recorder"}


class _StatusCollector:
    """Turns the latest :class:`OpsStatus` into metric families at scrape time."""

    def __init__(self, latest: Callable[[], Optional[OpsStatus]], prefix: str) -> None:
        self._latest = latest
        self._prefix = prefix

    def collect(self) -> Iterable[Metric]:
        status = self._latest()
        if status is None:
            return []
        return list(self._families(status))

    def _families(self, s: OpsStatus) -> Iterator[Metric]:  # one block per metric, flat
        p = self._prefix

        def counter(name: str, text: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(p + name, text, value=value)

        def gauge(name: str, text: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(p + name, text, value=value)

        def labelled(family: Type[Union[CounterMetricFamily, GaugeMetricFamily]], name: str,
                     text: str, label: str, values: Mapping[str, float]) -> Metric:
            """One family with a sample per label value, in label order."""
            metric = family(p + name, text, labels=[label])
            for key, value in sorted(values.items()):
                metric.add_metric([key], value)
            return metric

        yield counter("batches", "Batches published.", s.batches)
        yield counter("records", "Records published.", s.records)
        yield counter("messages", "Messages published (framing tags included).", s.messages)
        yield counter("bytes", "Bytes published.", s.bytes)
        yield counter("errors", "Errors (failed batches, failing sinks).", s.errors)
        yield labelled(CounterMetricFamily, "ticks_dropped", "Ticks dropped by the normaliser.",
                       "reason", s.dropped)
        yield labelled(CounterMetricFamily, "market_records", "Records published, per market.",
                       "market", s.records_by_market)
        requests = CounterMetricFamily(p + "requests", "Requests served, per service.",
                                       labels=["service"])
        request_errors = CounterMetricFamily(p + "request_errors", "Requests answered with an "
                                             "error, per service.", labels=["service"])
        queues = GaugeMetricFamily(p + "queue_depth", "Items waiting in a queue.",
                                   labels=["queue"])
        for key, value in sorted(s.counters.items()):
            known = _COUNTERS.get(key)
            if known is not None:
                yield counter(known[0], known[1], value)
            elif key.endswith(_REQUESTS_SUFFIX):
                requests.add_metric([key[: -len(_REQUESTS_SUFFIX)]], value)
            elif key.endswith(_ERRORS_SUFFIX):
                request_errors.add_metric([key[: -len(_ERRORS_SUFFIX)]], value)
            elif key.endswith(_QUEUE_SUFFIX):
                queues.add_metric([key[: -len(_QUEUE_SUFFIX)]], value)
        yield requests
        yield request_errors
        yield queues
        yield gauge("source_up", "1 while the source has a live feed.", float(s.connected))
        yield gauge("healthy", "1 while /healthz answers 200.", float(s.health.healthy))
        yield gauge("in_watch_window", "1 inside a watch window of a trading day.",
                    float(s.in_window))
        if s.last_batch_age is not None:
            yield gauge("seconds_since_push", "Seconds since the last published batch.",
                        s.last_batch_age)
        if s.lag_s is not None:
            yield gauge("lag_seconds", "Exchange time to publish time of the newest record "
                                       "of the last batch (qmt source).", s.lag_s)
        yield gauge("subscribers", "Subscribers connected to the stream.", s.subscribers)
        yield gauge("seq", "Sequence number of the last published message.", s.seq)
        yield labelled(GaugeMetricFamily, "securities_today", "Securities with a record today.",
                       "market", s.securities_today)
        yield labelled(GaugeMetricFamily, "quiet_securities",
                       "Securities gone quiet while their market is active.", "market",
                       Counter(sym.rpartition(".")[2] for sym in s.quiet))
        alive = GaugeMetricFamily(p + "service_up", "1 while a supervised thread or task runs.",
                                  labels=["service"])
        failures = CounterMetricFamily(p + "service_failures", "Unexpected deaths of a "
                                       "supervised thread or task.", labels=["service"])
        restarts = CounterMetricFamily(p + "service_restarts", "Restarts of a supervised "
                                       "thread or task.", labels=["service"])
        for name, up, failed, restarted in s.services:
            alive.add_metric([name], float(up))
            failures.add_metric([name], failed)
            restarts.add_metric([name], restarted)
        yield alive
        yield failures
        yield restarts
        yield labelled(CounterMetricFamily, "peers_refused", "Peers refused by the allow-list.",
                       "service", s.refused)


def build_registry(latest: Callable[[], Optional[OpsStatus]], *, run_id: str, version: str,
                   source: str, prefix: str = "qmt_relay_",
                   ) -> Tuple[CollectorRegistry, Histogram]:
    """A registry of this relay's metrics, and the batch-time histogram the loop observes.

    Args:
        latest: returns the latest snapshot (read at scrape time).
        run_id, version, source: labels of the ``qmt_relay_build`` info metric.
        prefix: metric name prefix.
    """
    registry = CollectorRegistry(auto_describe=False)
    info = Info(prefix + "build", "Relay run id, version and source kind.", registry=registry)
    info.info({"run_id": run_id, "version": version, "source": source})
    histogram = Histogram(prefix + "batch_seconds", "Time to normalise, encode and publish "
                          "one batch.", buckets=BATCH_SECONDS_BUCKETS, registry=registry)
    registry.register(_StatusCollector(latest, prefix))
    return registry, histogram


class History:
    """Records per second per market over the last minutes (the page's chart).

    Each :meth:`add` turns the cumulative counts into rates against the previous sample, so
    :meth:`rates` only copies what is kept.

    Args:
        seconds: how far back rates are kept.
    """

    __slots__ = ("_last", "_rates", "_seconds", "_times")

    def __init__(self, seconds: float) -> None:
        self._seconds = seconds
        self._last: Optional[Tuple[float, Dict[str, int]]] = None
        self._rates: Deque[Mapping[str, object]] = deque()
        self._times: Deque[float] = deque()

    def add(self, now: float, records_by_market: Mapping[str, int]) -> None:
        counts = dict(records_by_market)
        last, self._last = self._last, (now, counts)
        if last is None or now <= last[0]:
            return
        span = now - last[0]
        previous = last[1]
        self._rates.append({"t": round(now, 3), "rates": {
            market: round((n - previous.get(market, 0)) / span, 2)
            for market, n in sorted(counts.items())}})
        self._times.append(now)
        while self._times and self._times[0] < now - self._seconds:
            self._times.popleft()
            self._rates.popleft()

    def rates(self) -> Tuple[Mapping[str, object], ...]:
        """``{"t": epoch seconds, "rates": {market: records/s}}`` per sample, oldest first."""
        return tuple(self._rates)
