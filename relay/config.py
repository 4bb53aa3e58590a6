"""Typed, frozen configuration and its loader.

``load_config(path)`` reads YAML with a ``yaml.SafeLoader`` that also rejects duplicate keys,
rejects unknown config keys, checks types and ranges, and raises
:class:`~relay.errors.ConfigError` naming the file and the dotted key. Building a config has no
side effects.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import ipaddress
import json
import math
import os
import re
import sys
from collections import abc
from dataclasses import dataclass, field
from typing import (
    Any,
    Callable,
    Dict,
    List,
    Literal,
    Mapping,
    NamedTuple,
    NewType,
    Optional,
    Sequence,
    Tuple,
    Union,
    get_args,
    get_origin,
    get_type_hints,
)

import yaml

from relay.errors import ConfigError

__all__ = [
    "AlertsConfig",
    "BridgeConfig",
    "Config",
    "HistoryConfig",
    "JsonText",
    "LoggingConfig",
    "MetricsConfig",
    "NatsConfig",
    "NormaliseConfig",
    "PublishConfig",
    "QmtConfig",
    "RecorderConfig",
    "ReplayConfig",
    "SecurityConfig",
    "ServiceAddresses",
    "SimulatorConfig",
    "SourceConfig",
    "SupervisionConfig",
    "TlsConfig",
    "WebhookConfig",
    "apply_overrides",
    "config_to_dict",
    "load_config",
    "parse_config",
    "service_addresses",
]

# dataclass(slots=True) exists from Python 3.10; on 3.9 the classes are frozen without slots.
_DC: Dict[str, Any] = {"frozen": True}
if sys.version_info >= (3, 10):
    _DC["slots"] = True

SourceKind = Literal["simulator", "qmt", "replay"]
DEFAULT_ADDRESSES: Tuple[str, ...] = ("ipc:///tmp/hikyuu_real.ipc", "tcp://127.0.0.1:9200")
AUTO = "auto"
"""A service address that follows the port plan (see :func:`service_addresses`)."""


@dataclass(**_DC)
class SimulatorConfig:
    """The built-in simulated market."""

    seed: int = 20240101
    securities: int = 5200          # how many securities to simulate (at least 5000 by default)
    speed: float = 1.0              # simulated seconds per wall-clock second
    push_interval: float = 3.0      # simulated seconds between pushes
    # "open": the day starts at 09:30 (open already matched); "auction": starts at 09:15;
    # "clock": follow real China time (speed and date ignored; silent outside sessions)
    start: Literal["open", "auction", "clock"] = "open"
    date: Optional[str] = None      # simulated trading date YYYY-MM-DD; None = today (China time)
    skip_breaks: bool = False       # open/auction: jump over lunch and nights instead of waiting


@dataclass(**_DC)
class QmtConfig:
    """MiniQMT via xtquant (Windows only); see :mod:`relay.sources.qmt`."""

    ip: str = ""
    port: int = 0
    markets: Tuple[str, ...] = ("SH", "SZ", "BJ")   # whole markets subscribed to the full push
    sectors: Tuple[str, ...] = ()   # sector names whose members are subscribed ("沪深A股")
    codes: Tuple[str, ...] = ()     # explicit securities ("600000.SH")
    indices: Tuple[str, ...] = ()   # index codes, subscribed on their own ("000300.SH")
    batch_size: int = 250           # codes per subscribe_whole_quote call
    batch_pause: float = 0.5        # seconds between subscribe calls
    subscribe_retries: int = 3      # retries of a subscribe that returned -1, then reconnect
    seed_times: Tuple[str, ...] = ("09:30",)   # China times of get_full_tick on trading days
    stall_timeout: float = 60.0     # silence in a watch window that counts as a stall
    watch_windows: Tuple[str, ...] = ("09:15-09:25", "09:30-11:30", "13:00-15:00")
    holidays: Tuple[str, ...] = ()  # YYYY-MM-DD, merged with xtdata's get_holidays()
    reconnect_min: float = 1.0      # first reconnect delay (seconds), doubled up to ...
    reconnect_max: float = 60.0     # ... this cap, with jitter
    check_interval: float = 1.0     # seconds between connection / stall checks
    queue_size: int = 256           # pushes buffered between xtquant's thread and the relay
    connect_timeout: float = 30.0   # start() waits this long for the first connection


@dataclass(**_DC)
class ReplayConfig:
    """Replay of a recorded day (see :mod:`relay.sources.replay`)."""

    file: str = ""
    speed: float = 1.0              # original pacing x speed; a huge value = as fast as possible
    start_delay: float = 0.0        # seconds to wait before the first batch (subscribers join)


@dataclass(**_DC)
class RecorderConfig:
    """The HDF5 recorder sink (see :mod:`relay.sinks.recorder`)."""

    enabled: bool = False
    dir: str = "recordings"         # one file per trading day: DIR/YYYY-MM-DD.h5
    flush_interval: float = 1.0     # seconds between commits; a crash loses at most this much
    queue_size: int = 1024          # batches waiting for the writer; beyond, dropped (counted)
    rollover: str = "08:00"         # China time at which a trading day's file begins
    index_interval: float = 300.0   # seconds between per-code index / market snapshot periods
    retry_interval: float = 30.0    # seconds before retrying after a disk error


@dataclass(**_DC)
class NatsConfig:
    """The NATS JetStream bridge sink (see :mod:`relay.sinks.nats`); off while ``url`` is empty.

    The credential and TLS fields are handed to nats-py's ``connect()`` as they are.
    """

    url: Tuple[str, ...] = ()       # nats://HOST:PORT or tls://HOST:PORT; several = a cluster
    name: str = "qmt-relay"         # connection name shown by the server's monitoring
    user: str = ""
    password: str = ""
    token: str = ""
    creds_file: str = ""            # a .creds file (JWT + NKey seed), nats-py user_credentials
    nkeys_seed: str = ""            # a file holding an NKey seed
    tls_ca: str = ""                # CA bundle that signed the server's certificate
    tls_cert: str = ""              # client certificate (mutual TLS), with tls_key
    tls_key: str = ""
    tls_hostname: str = ""          # server name to verify when it differs from the URL's host
    subject_prefix: str = "qmt"     # subjects PREFIX.spot, PREFIX.last.MARKET.CODE, ...
    stream: str = "QMT"             # JetStream stream of the spot messages; STREAM_LAST: latest
    max_age: float = 86400.0        # seconds a spot message is kept (the trading day and more)
    max_bytes: int = 16 * 1024 ** 3    # size cap of the spot stream; the oldest go first
    storage: Literal["file", "memory"] = "file"
    replicas: int = 1               # stream replicas (a clustered server: 3)
    latest_interval: float = 5.0    # seconds between updates of the latest-record subjects
    queue_size: int = 256           # batches waiting for the bridge; beyond, dropped (counted)
    pending_bytes: int = 64 * 1024 * 1024  # bytes nats-py buffers while disconnected
    connect_timeout: float = 5.0    # seconds per connection attempt
    reconnect_wait: float = 1.0     # seconds between the client's reconnect attempts


@dataclass(**_DC)
class BridgeConfig:
    """Bridges of the published stream onto other messaging systems."""

    nats: NatsConfig = field(default_factory=NatsConfig)


@dataclass(**_DC)
class SourceConfig:
    kind: SourceKind = "simulator"
    simulator: SimulatorConfig = field(default_factory=SimulatorConfig)
    qmt: QmtConfig = field(default_factory=QmtConfig)
    replay: ReplayConfig = field(default_factory=ReplayConfig)


@dataclass(**_DC)
class NormaliseConfig:
    units: Literal["hikyuu", "raw"] = "hikyuu"
    book_levels: int = 5            # expected depth of bid/ask arrays (empty arrays also pass)
    price_decimals: int = 4         # rounding that removes float noise (11.370000000000001)
    drop_auction: bool = False      # drop call-auction ticks (stockStatus 2), don't pass them


@dataclass(**_DC)
class PublishConfig:
    addresses: Tuple[str, ...] = DEFAULT_ADDRESSES
    max_message_bytes: int = 512 * 1024
    heartbeat_interval: float = 1.0
    # messages NNG queues per subscriber; a subscriber that falls further behind loses the
    # oldest (a gap it sees in seq). Queued messages are shared, so this bounds memory.
    send_buffer: int = 256
    # REQ/REP late joiners; "auto" = the port plan (P+1), null or "" = off
    snapshot_address: Optional[str] = AUTO


@dataclass(**_DC)
class LoggingConfig:
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"
    file: Optional[str] = None
    file_max_bytes: int = 20 * 1024 * 1024
    file_backups: int = 5
    stats_interval: float = 10.0


JsonText = NewType("JsonText", str)
"""A YAML mapping or list in the file, kept as compact JSON text (alert body templates)."""


@dataclass(**_DC)
class MetricsConfig:
    """The operations HTTP endpoint: /metrics, /healthz, /status and the page (relay.ops)."""

    address: Optional[str] = AUTO   # http://HOST:PORT; auto = publish port + 3; null = off
    sample_interval: float = 1.0    # seconds between status snapshots (health, alerts, page)
    history_minutes: float = 10.0   # minutes of records/s the page's chart shows
    quiet_after: float = 120.0      # silence (s) after which a security counts as quiet


@dataclass(**_DC)
class WebhookConfig:
    """One alert webhook with a JSON body template ($event, $text, $run_id, ...)."""

    url: str
    template: Optional[JsonText] = None


@dataclass(**_DC)
class AlertsConfig:
    """Webhook alerts (relay.ops.alerts): feed lost/stalled/recovered, recorder, start/stop."""

    webhooks: Tuple[Union[str, WebhookConfig], ...] = ()  # URL strings or {url, template}
    timeout: float = 5.0            # seconds per POST (and to deliver what is queued at stop)
    retries: int = 3                # further attempts after a failed POST ...
    backoff: float = 1.0            # ... after this many seconds, doubled each time ...
    backoff_max: float = 30.0       # ... up to this cap
    queue_size: int = 100           # alerts waiting for delivery; beyond, dropped (counted)
    rate_limit: int = 5             # alerts of one kind per rate_window ...
    rate_window: float = 600.0      # ... seconds; more are suppressed (counted, then reported)


@dataclass(**_DC)
class HistoryConfig:
    """K-line history: the hikyuu HDF5 directory and the service that serves it."""

    dir: str = "history"            # hikyuu data directory (sh_day.h5, sz_1min.h5, ...)
    address: Optional[str] = AUTO   # history service (NNG REQ/REP); auto = P+2; null = off
    max_reply_bytes: int = 4 * 1024 * 1024     # history service: replies are paged under this
    max_request_bytes: int = 1024 * 1024       # history service: longer requests are refused
    # -- import (qmt-relay history import; see relay.history.importer) --
    source: Optional[Literal["simulator", "qmt"]] = None   # None = follow source.kind
    periods: Tuple[str, ...] = ("day", "1min", "5min")
    markets: Tuple[str, ...] = ("SH", "SZ", "BJ")
    codes: Tuple[str, ...] = ()     # only these securities ("600000.SH"); empty = the universe
    start: Optional[str] = None     # YYYYMMDD; None = day bars from listing, minutes 1 year back
    minute_days: int = 365          # default minute range (calendar days back from the end)
    schedule: Tuple[str, ...] = ()  # China times the running relay imports on trading days
    chunk_codes: int = 50           # securities per download / read call
    chunk_days: int = 30            # calendar days per minute-bar call (bounds memory)
    chunk_timeout: float = 600.0    # seconds one download call may take before it is retried
    retries: int = 3                # further attempts of a failed or timed-out chunk
    retry_min: float = 1.0          # first retry delay (seconds), doubled up to ...
    retry_max: float = 60.0         # ... this cap, with jitter
    progress_interval: float = 5.0  # seconds between history_progress log lines (no terminal)
    compression: int = 1            # gzip level of new tables (1-9)
    writers: int = 0                # processes writing files at once; 0 = one per CPU (max 4)


@dataclass(**_DC)
class TlsConfig:
    """Certificates for ``tls+tcp://`` addresses (PEM files)."""

    cert: Optional[str] = None      # the relay's certificate (chain), PEM
    key: Optional[str] = None       # its private key, PEM, unencrypted
    ca: Optional[str] = None        # set: only clients with a certificate this CA issued


@dataclass(**_DC)
class SecurityConfig:
    """Who may connect to the relay's TCP services (see :mod:`relay.security`)."""

    allow: Optional[Tuple[str, ...]] = None   # IPs / CIDR networks; null = every peer
    log_interval: float = 10.0      # at most one "peer_refused" line per service this often
    tls: TlsConfig = field(default_factory=TlsConfig)


@dataclass(**_DC)
class SupervisionConfig:
    """How the relay restarts a thread or task that died (see :mod:`relay.supervise`)."""

    max_failures: int = 5           # this many failures of one service within ...
    window: float = 60.0            # ... this many seconds stop the relay (exit 1)
    backoff_min: float = 0.5        # first wait before a restart, doubled per failure ...
    backoff_max: float = 30.0       # ... up to this cap


@dataclass(**_DC)
class Config:
    source: SourceConfig = field(default_factory=SourceConfig)
    normalise: NormaliseConfig = field(default_factory=NormaliseConfig)
    publish: PublishConfig = field(default_factory=PublishConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    recorder: RecorderConfig = field(default_factory=RecorderConfig)
    history: HistoryConfig = field(default_factory=HistoryConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    alerts: AlertsConfig = field(default_factory=AlertsConfig)
    supervision: SupervisionConfig = field(default_factory=SupervisionConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    bridge: BridgeConfig = field(default_factory=BridgeConfig)
    shutdown_timeout: float = 5.0


# --------------------------------------------------------------------------------------------
# The port plan: publish on P (the first TCP publish address); every other TCP service of the
# relay defaults to the next ports on the same host. So a second relay on one host needs only
# its own publish address.

SERVICE_OFFSETS: Mapping[str, int] = {"snapshot": 1, "history": 2, "metrics": 3}
"""Port offsets from the first TCP publish port, by service."""

FALLBACK_HOST = "127.0.0.1"
FALLBACK_PORT = 9200
"""Host and base port of the plan when no TCP publish address exists (services 9201-9203)."""


class ServiceAddresses(NamedTuple):
    """Where each TCP service of the relay listens; ``None`` = turned off."""

    snapshot: Optional[str]
    history: Optional[str]
    metrics: Optional[str]


def plan_base(addresses: Sequence[str]) -> Tuple[str, str, int]:
    """``(scheme, host, port)`` of the first TCP publish address, the port plan's base.

    Without one (IPC only), the plan's fallback: ``("tcp", "127.0.0.1", 9200)``.
    """
    for address in addresses:
        match = _ADDRESS.fullmatch(address)
        if match is not None and match.group("port") is not None:
            return match.group("scheme"), match.group("host"), int(match.group("port"))
    return "tcp", FALLBACK_HOST, FALLBACK_PORT


def planned_address(addresses: Sequence[str], service: str) -> str:
    """The port plan's default address of ``service`` (``snapshot``, ``history``, ``metrics``)."""
    scheme, host, port = plan_base(addresses)
    port += SERVICE_OFFSETS[service]
    if port > 65535:
        port = FALLBACK_PORT + SERVICE_OFFSETS[service]
    if service == "metrics":
        # plain HTTP even beside a tls+tcp stream: the endpoint has no TLS (the allow-list
        # applies to it like to every TCP service)
        return f"http://{host}:{port}"
    return f"{scheme}://{host}:{port}"


def service_addresses(config: Config) -> ServiceAddresses:
    """Resolve every service address of ``config``: ``auto`` follows the plan, null/"" is off."""
    addresses = config.publish.addresses

    def resolve(value: Optional[str], service: str) -> Optional[str]:
        if not value:
            return None
        return planned_address(addresses, service) if value == AUTO else value

    return ServiceAddresses(
        snapshot=resolve(config.publish.snapshot_address, "snapshot"),
        history=resolve(config.history.address, "history"),
        metrics=resolve(config.metrics.address, "metrics"),
    )


# --------------------------------------------------------------------------------------------
# Loading. Everything below is driven by the dataclasses' type hints, so a field added to a
# section above is loaded, type-checked and listed in "unknown key" messages with no change
# here; a range check for it is one line in _CHECKS.

_Check = Callable[[Any], Optional[str]]
"""A semantic check on an already typed value: returns why it is bad, or None if it is fine."""

_CLI = "<command line>"


def _positive(value: float) -> Optional[str]:
    return None if value > 0 else f"must be > 0, got {value!r}"


def _between(low: int, high: int) -> _Check:
    def check(value: int) -> Optional[str]:
        if low <= value <= high:
            return None
        return f"must be between {low} and {high}, got {value!r}"

    return check


def _at_least(low: int) -> _Check:
    def check(value: int) -> Optional[str]:
        return None if value >= low else f"must be >= {low}, got {value!r}"

    return check


def _yyyymmdd(value: str) -> Optional[str]:
    if re.fullmatch(r"\d{8}", value, re.ASCII):
        try:
            _dt.date(int(value[:4]), int(value[4:6]), int(value[6:]))
        except ValueError:
            pass
        else:
            return None
    return f"expected a date YYYYMMDD, got {value!r}"


def _iso_date(value: str) -> Optional[str]:
    if re.fullmatch(r"\d{4}-\d{2}-\d{2}", value, re.ASCII):
        try:
            _dt.date.fromisoformat(value)
        except ValueError:
            pass
        else:
            return None
    return f"expected a date YYYY-MM-DD, got {value!r}"


_ADDRESS = re.compile(
    r"ipc://(?P<path>.+)|(?P<scheme>(?:tls\+)?tcp)://"
    r"(?P<host>\[[0-9A-Fa-f:.]+\]|[^\s:/\[\]]+):(?P<port>\d{1,5})",
    re.ASCII,
)
_HTTP_ADDRESS = re.compile(
    r"https?://(?P<host>\[[0-9A-Fa-f:.]+\]|[^\s:/\[\]]+):(?P<port>\d{1,5})/?", re.ASCII
)


def _address(value: str) -> Optional[str]:
    match = _ADDRESS.fullmatch(value)
    if match is None:
        return f"expected ipc://PATH, tcp://HOST:PORT or tls+tcp://HOST:PORT, got {value!r}"
    port = match.group("port")
    if port is not None and not 1 <= int(port) <= 65535:
        return f"port must be 1-65535, got {value!r}"
    return None


def _service_address(value: str) -> Optional[str]:
    return None if value in ("", AUTO) else _address(value)


def _http_address(value: str) -> Optional[str]:
    if value in ("", AUTO):
        return None
    match = _HTTP_ADDRESS.fullmatch(value)
    if match is None:
        return f"expected auto or http://HOST:PORT, got {value!r}"
    if not 1 <= int(match.group("port")) <= 65535:
        return f"port must be 1-65535, got {value!r}"
    return None


def _addresses(value: Tuple[str, ...]) -> Optional[str]:
    if not value:
        return "must list at least one address"
    duplicates = sorted({address for address in value if value.count(address) > 1})
    if duplicates:
        return f"duplicate address {duplicates[0]!r}"
    return None


def _webhook_url(value: str) -> Optional[str]:
    if re.fullmatch(r"https?://[^\s/?#]+[^\s]*", value, re.ASCII):
        return None
    return f"expected an http:// or https:// URL, got {value!r}"


def _template(value: str) -> Optional[str]:
    import string  # noqa: PLC0415 - only configs with templates need it

    placeholders = ("event", "text", "run_id", "source", "time", "host", "details")
    unknown: List[str] = []

    def walk(item: Any) -> None:
        if isinstance(item, str):
            for match in string.Template.pattern.finditer(item):
                name = match.group("named") or match.group("braced")
                if name and name not in placeholders and name not in unknown:
                    unknown.append(name)
        elif isinstance(item, list):
            for element in item:
                walk(element)
        elif isinstance(item, dict):
            for key, element in item.items():
                walk(key)
                walk(element)

    walk(json.loads(value))
    if unknown:
        return (f"unknown placeholder ${unknown[0]}; valid: "
                + ", ".join("$" + name for name in placeholders))
    return None


def _ip_network(value: str) -> Optional[str]:
    try:
        ipaddress.ip_network(value.strip(), strict=False)
    except ValueError:
        return f"expected an IP address or CIDR network (192.168.1.0/24), got {value!r}"
    return None


_NATS_URL = re.compile(r"(nats|tls)://([^\s@/]+@)?[^\s:/@]+(:\d{1,5})?", re.ASCII)
_SUBJECT = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*", re.ASCII)

# Checks run after type checking, on non-null values, keyed by dotted path ("[]" = each item).
_CHECKS: Mapping[str, _Check] = {
    "history.periods": lambda v: None if v else "must list at least one period",
    "history.periods[]": lambda v: None if v in ("day", "1min", "5min")
    else f"expected one of day, 1min, 5min, got {v!r}",
    "history.markets[]": lambda v: None if v in ("SH", "SZ", "BJ")
    else f"expected one of SH, SZ, BJ, got {v!r}",
    "history.codes[]": lambda v: None if re.fullmatch(r"[0-9A-Za-z]+\.(SH|SZ|BJ)", v, re.ASCII)
    else f"expected CODE.MARKET such as 600000.SH, got {v!r}",
    "history.start": _yyyymmdd,
    "history.minute_days": _between(1, 100_000),
    "history.schedule[]": lambda v: None if re.fullmatch(r"([01]\d|2[0-3]):[0-5]\d", v, re.ASCII)
    else f"expected HH:MM (China time), got {v!r}",
    "history.chunk_codes": _between(1, 10_000),
    "history.chunk_days": _between(1, 100_000),
    "history.chunk_timeout": _positive,
    "history.retries": _between(0, 100),
    "history.retry_min": _positive,
    "history.retry_max": _positive,
    "history.progress_interval": _positive,
    "history.compression": _between(1, 9),
    "history.writers": _between(0, 64),
    "shutdown_timeout": _positive,
    "source.simulator.securities": _between(10, 20_000),
    "source.simulator.speed": _positive,
    "source.simulator.push_interval": _positive,
    "source.simulator.date": _iso_date,
    "source.replay.speed": _positive,
    "source.replay.start_delay": lambda v: None if v >= 0 else f"must be >= 0, got {v!r}",
    "source.qmt.port": _between(0, 65535),
    "source.qmt.markets[]": lambda v: None if re.fullmatch(r"[A-Z]{2,6}", v, re.ASCII)
    else f"expected a market code such as SH, got {v!r}",
    "source.qmt.codes[]": lambda v: None if re.fullmatch(r"[0-9A-Za-z]+\.[A-Z]{2,6}", v, re.ASCII)
    else f"expected CODE.MARKET such as 600000.SH, got {v!r}",
    "source.qmt.indices[]": lambda v: None if re.fullmatch(r"[0-9A-Za-z]+\.[A-Z]{2,6}", v, re.ASCII)
    else f"expected CODE.MARKET such as 000300.SH, got {v!r}",
    "source.qmt.batch_size": _between(1, 10_000),
    "source.qmt.batch_pause": lambda v: None if v >= 0 else f"must be >= 0, got {v!r}",
    "source.qmt.subscribe_retries": _between(0, 100),
    "source.qmt.seed_times[]": lambda v: None if re.fullmatch(
        r"([01]\d|2[0-3]):[0-5]\d", v, re.ASCII) else f"expected HH:MM (China time), got {v!r}",
    "source.qmt.stall_timeout": _positive,
    "source.qmt.watch_windows[]": lambda v: None if re.fullmatch(
        r"([01]\d|2[0-3]):[0-5]\d-([01]\d|2[0-3]):[0-5]\d", v, re.ASCII) and v[:5] < v[6:]
    else f"expected HH:MM-HH:MM with start before end, got {v!r}",
    "source.qmt.holidays[]": _iso_date,
    "source.qmt.reconnect_min": _positive,
    "source.qmt.reconnect_max": _positive,
    "source.qmt.check_interval": _positive,
    "source.qmt.queue_size": _between(1, 100_000),
    "source.qmt.connect_timeout": _positive,
    "normalise.book_levels": _between(1, 10),
    "normalise.price_decimals": _between(0, 8),
    "publish.addresses": _addresses,
    "publish.addresses[]": _address,
    "publish.max_message_bytes": _between(4096, 64 * 1024 * 1024),
    "publish.heartbeat_interval": _positive,
    "publish.send_buffer": _between(2, 8192),
    "publish.snapshot_address": _service_address,
    "history.address": _service_address,
    "history.dir": lambda v: None if v else "must not be empty",
    "history.max_reply_bytes": _between(64 * 1024, 256 * 1024 * 1024),
    "history.max_request_bytes": _between(4096, 64 * 1024 * 1024),
    "metrics.address": _http_address,
    "logging.stats_interval": _positive,
    "logging.file_max_bytes": _at_least(1024),
    "logging.file_backups": _at_least(0),
    "recorder.dir": lambda v: None if v else "must not be empty",
    "recorder.flush_interval": _positive,
    "recorder.queue_size": _between(1, 1_000_000),
    "recorder.rollover": lambda v: None if re.fullmatch(r"([01]\d|2[0-3]):[0-5]\d", v, re.ASCII)
    else f"expected HH:MM (China time), got {v!r}",
    "recorder.index_interval": _positive,
    "recorder.retry_interval": _positive,
    "metrics.sample_interval": _positive,
    "metrics.history_minutes": _positive,
    "metrics.quiet_after": _positive,
    "alerts.webhooks[]": lambda v: _webhook_url(v) if isinstance(v, str) else None,
    "alerts.webhooks[].url": _webhook_url,
    "alerts.webhooks[].template": _template,
    "alerts.timeout": _positive,
    "alerts.retries": _between(0, 20),
    "alerts.backoff": _positive,
    "alerts.backoff_max": _positive,
    "alerts.queue_size": _between(1, 100_000),
    "alerts.rate_limit": _between(1, 10_000),
    "alerts.rate_window": _positive,
    "security.allow": lambda v: None if v else "must list at least one address (or be null)",
    "security.allow[]": _ip_network,
    "security.log_interval": _positive,
    "supervision.max_failures": _between(1, 1000),
    "supervision.window": _positive,
    "supervision.backoff_min": _positive,
    "supervision.backoff_max": _positive,
    "bridge.nats.url[]": lambda v: None if _NATS_URL.fullmatch(v)
    else f"expected nats://HOST:PORT or tls://HOST:PORT, got {v!r}",
    "bridge.nats.subject_prefix": lambda v: None if _SUBJECT.fullmatch(v)
    else f"expected subject tokens such as qmt or desk1.qmt (letters, digits, - and _), got {v!r}",
    "bridge.nats.stream": lambda v: None if re.fullmatch(r"[A-Za-z0-9_-]{1,200}", v, re.ASCII)
    else f"expected a stream name (letters, digits, - and _), got {v!r}",
    "bridge.nats.max_age": _positive,
    "bridge.nats.max_bytes": _at_least(1024 * 1024),
    "bridge.nats.replicas": _between(1, 5),
    "bridge.nats.latest_interval": _positive,
    "bridge.nats.queue_size": _between(1, 1_000_000),
    "bridge.nats.pending_bytes": _at_least(1024 * 1024),
    "bridge.nats.connect_timeout": _positive,
    "bridge.nats.reconnect_wait": _positive,
}

# apply_overrides() keyword -> (dotted config key, command-line option named in errors).
_OVERRIDES: Mapping[str, Tuple[str, str]] = {
    "source": ("source.kind", "--source"),
    "publish": ("publish.addresses", "--publish"),
    "snapshot": ("publish.snapshot_address", "--snapshot"),
    "replay_file": ("source.replay.file", "--replay-file"),
    "nats": ("bridge.nats.url", "--nats"),
    "replay_speed": ("source.replay.speed", "--replay-speed"),
    "log_level": ("logging.level", "--log-level"),
}

_TYPE_NAMES: Mapping[Any, str] = {
    type(None): "null",
    bool: "boolean",
    int: "integer",
    float: "number",
    str: "string",
    list: "list",
    tuple: "list",
    dict: "mapping",
    _dt.date: "date",
    _dt.datetime: "timestamp",
}


def _kind(value: object) -> str:
    """The YAML-ish name of a loaded value's type, for messages."""
    return _TYPE_NAMES.get(type(value), type(value).__name__)


def _describe(hint: Any) -> str:  # one return per kind of hint
    """What a type hint expects, in words, for messages."""
    if dataclasses.is_dataclass(hint):
        return "mapping"
    origin, args = get_origin(hint), get_args(hint)
    if origin is Union:
        return " or ".join(_describe(arg) for arg in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(arg) for arg in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list of {_describe(args[0])}"
        return f"list of {len(args)} items"
    if hint is bool:
        return "boolean (true or false)"
    if hint is JsonText:
        return "mapping or list (a JSON body)"
    return _TYPE_NAMES.get(hint, repr(hint))


def _mismatch(hint: Any, value: object, path: str, key: str) -> ConfigError:
    shown = repr(value)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return ConfigError(path, key, f"expected {_describe(hint)}, got {_kind(value)} {shown}")


def _convert(hint: Any, value: Any, path: str, key: str, rule: str) -> Any:
    """Type-check and convert one loaded value, then run its semantic check.

    Args:
        hint: the field's resolved type hint.
        value: what YAML (or the command line) gave.
        path: file named in errors.
        key: dotted key (or option) named in errors.
        rule: dotted key without list indices, to find the check in ``_CHECKS``.
    """
    result = _convert_type(hint, value, path, key, rule)
    check = _CHECKS.get(rule)
    if check is not None and result is not None:
        reason = check(result)
        if reason is not None:
            raise ConfigError(path, key, reason)
    return result


def _convert_type(  # one branch per kind of hint, flat on purpose
    hint: Any, value: Any, path: str, key: str, rule: str
) -> Any:
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return _build(hint, value, path, key, rule)
    origin, args = get_origin(hint), get_args(hint)
    if origin is Union:
        arms = [arg for arg in args if arg is not type(None)]
        if value is None and len(arms) < len(args):
            return None
        if isinstance(value, abc.Mapping):
            for arm in arms:
                if dataclasses.is_dataclass(arm):   # its errors name the exact key
                    return _convert(arm, value, path, key, rule)
        for arm in arms:
            try:
                return _convert(arm, value, path, key, rule)
            except ConfigError:
                if len(arms) == 1:
                    raise
        raise _mismatch(hint, value, path, key)
    if origin is Literal:
        # Compare types too: True == 1, but a boolean is not the choice 1.
        if any(type(value) is type(arg) and value == arg for arg in args):
            return value
        choices = ", ".join(repr(arg) for arg in args)
        raise ConfigError(path, key, f"expected one of {choices}; got {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise _mismatch(hint, value, path, key)
        if len(args) == 2 and args[1] is Ellipsis:
            items = [args[0]] * len(value)
        elif len(args) == len(value):
            items = list(args)
        else:
            raise ConfigError(path, key, f"expected {len(args)} items, got {len(value)}")
        return tuple(
            # A command-line option ("--publish") is repeated, not indexed: name it as is.
            _convert(item, element, path, key if path == _CLI else f"{key}[{index}]", f"{rule}[]")
            for index, (item, element) in enumerate(zip(items, value))
        )
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:
                number = math.inf
            if not math.isfinite(number):
                raise ConfigError(path, key, f"expected a finite number, got {value!r}")
            return number
    elif hint is JsonText:
        if isinstance(value, (abc.Mapping, list, tuple)):
            try:
                return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
            except (TypeError, ValueError) as exc:
                raise ConfigError(path, key, f"not representable as JSON: {exc}") from None
    elif hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, _dt.date) and not isinstance(value, _dt.datetime):
            return value.isoformat()  # YAML reads an unquoted 2024-01-02 as a date
    else:
        raise TypeError(f"relay.config cannot load a field annotated {hint!r} ({key})")
    raise _mismatch(hint, value, path, key)


def _build(cls: type, value: Any, path: str, key: str, rule: str) -> Any:
    """Build dataclass ``cls`` from a mapping; absent keys keep their defaults."""
    if value is None:
        value = {}  # a section whose keys are all commented out
    if not isinstance(value, abc.Mapping):
        raise _mismatch(cls, value, path, key)
    hints = get_type_hints(cls)
    fields = [f for f in dataclasses.fields(cls) if f.init]
    names = [f.name for f in fields]
    kwargs: Dict[str, Any] = {}
    for name, item in value.items():
        child_key = f"{key}.{name}" if key else str(name)
        if name not in names:
            valid = ", ".join(sorted(names))
            raise ConfigError(path, child_key, f"unknown key {name!r}; valid: {valid}")
        child_rule = f"{rule}.{name}" if rule else name
        kwargs[name] = _convert(hints[name], item, path, child_key, child_rule)
    for f in fields:
        required = (f.default is dataclasses.MISSING
                    and f.default_factory is dataclasses.MISSING)
        if required and f.name not in kwargs:
            raise ConfigError(path, f"{key}.{f.name}" if key else f.name, "missing (required)")
    return cls(**kwargs)


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that rejects a key given twice in one mapping.

    Plain PyYAML keeps the last value silently, so a second ``publish:`` section would
    quietly replace the first.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> Dict[Any, Any]:
        seen: List[str] = []
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                if key_node.value in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key_node.value!r}", key_node.start_mark
                    )
                seen.append(key_node.value)
        return super().construct_mapping(node, deep=deep)


def parse_config(data: Any, *, path: str = "<mapping>") -> Config:
    """Validate already parsed YAML data (a mapping of sections, or ``None``) into a Config.

    Args:
        data: what ``yaml.safe_load`` returned; ``None`` gives the defaults.
        path: where the data came from, named in errors.

    Returns:
        The validated, frozen config.

    Raises:
        ConfigError: unknown key, wrong type or value out of range (names the dotted key).
    """
    config: Config = _build(Config, data, path, "", "")
    _check_tls(config, path)
    return config


def _check_tls(config: Config, path: str) -> None:
    """``tls+tcp://`` addresses need a certificate and key; a key needs a certificate."""
    tls = config.security.tls
    if (tls.cert is None) != (tls.key is None):
        missing = "security.tls.key" if tls.key is None else "security.tls.cert"
        raise ConfigError(path, missing, "security.tls needs both cert and key")
    if tls.ca is not None and tls.cert is None:
        raise ConfigError(path, "security.tls.ca", "client certificates need cert and key too")
    if tls.cert is None:
        for index, address in enumerate(config.publish.addresses):
            if address.startswith("tls+tcp://"):
                raise ConfigError(path, f"publish.addresses[{index}]",
                                  "tls+tcp:// needs security.tls.cert and security.tls.key")
        services = service_addresses(config)
        for key, service in (("publish.snapshot_address", services.snapshot),
                             ("history.address", services.history)):
            if service is not None and service.startswith("tls+tcp://"):
                raise ConfigError(path, key,
                                  "tls+tcp:// needs security.tls.cert and security.tls.key")


def load_config(path: Optional[Union[str, os.PathLike[str]]]) -> Config:
    """Load and validate a YAML config file.

    Args:
        path: the YAML file; ``None`` gives the built-in defaults, as does an empty file.

    Returns:
        The validated, frozen config.

    Raises:
        ConfigError: the file cannot be read or parsed, or a value is invalid; the error
            names the file and the dotted key (``publish.addresses[1]``).
    """
    if path is None:
        return Config()
    name = os.fspath(path)
    try:
        # utf-8-sig: Windows Notepad may save UTF-8 with a byte-order mark.
        with open(name, encoding="utf-8-sig") as file:
            text = file.read()
    except FileNotFoundError as exc:
        raise ConfigError(name, "", "file not found") from exc
    except OSError as exc:
        raise ConfigError(name, "", f"cannot read file: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(name, "", f"not UTF-8 text (byte {exc.start})") from exc
    try:
        data = yaml.load(text, Loader=_Loader)  # a SafeLoader subclass: safe
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = exc.problem or exc.context or "syntax error"
        raise ConfigError(name, "", f"invalid YAML{where}: {problem}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(name, "", f"invalid YAML: {exc}") from exc
    if data is not None and not isinstance(data, abc.Mapping):
        raise ConfigError(name, "", f"expected a mapping of sections, got {_kind(data)}")
    return parse_config(data, path=name)


def apply_overrides(
    config: Config,
    *,
    source: Optional[str] = None,
    publish: Optional[Sequence[str]] = None,
    snapshot: Optional[str] = None,
    replay_file: Optional[str] = None,
    replay_speed: Optional[float] = None,
    log_level: Optional[str] = None,
    nats: Optional[Sequence[str]] = None,
) -> Config:
    """Return ``config`` with command-line values replacing the file's; ``None`` keeps it.

    Overridden values are checked exactly like the file's.

    Args:
        config: the loaded config.
        source: ``source.kind``.
        publish: ``publish.addresses`` (replaces the whole list).
        snapshot: ``publish.snapshot_address`` (``""`` turns the service off).
        replay_file: ``source.replay.file``.
        replay_speed: ``source.replay.speed``.
        log_level: ``logging.level``.
        nats: ``bridge.nats.url`` (replaces the whole list).

    Returns:
        A new config; ``config`` itself is unchanged.

    Raises:
        ConfigError: an overridden value is invalid; path ``"<command line>"`` and the option
            as key (``--publish``).
    """
    given: Dict[str, Any] = {
        "source": source,
        # A bare string would be a Sequence of characters: keep it whole so it is rejected.
        "publish": publish if publish is None or isinstance(publish, str) else list(publish),
        "snapshot": snapshot,
        "replay_file": replay_file,
        "replay_speed": replay_speed,
        "log_level": log_level,
        "nats": nats if nats is None or isinstance(nats, str) else list(nats),
    }
    for name, value in given.items():
        if value is not None:
            rule, option = _OVERRIDES[name]
            config = _replace_at(config, rule, rule.split("."), value, option)
    _check_tls(config, _CLI)
    return config


def _replace_at(section: Any, rule: str, names: List[str], value: Any, option: str) -> Any:
    head, rest = names[0], names[1:]
    if rest:
        new = _replace_at(getattr(section, head), rule, rest, value, option)
    else:
        new = _convert(get_type_hints(type(section))[head], value, _CLI, option, rule)
    return dataclasses.replace(section, **{head: new})


def config_to_dict(config: Config) -> Dict[str, Any]:
    """The config as plain dicts, lists and scalars (``yaml.safe_dump``-able), e.g. to log it.

    Loading the dumped YAML gives back an equal config.
    """
    plain: Dict[str, Any] = _plain(config)
    return plain


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        hints = get_type_hints(type(value))
        out = {}
        for f in dataclasses.fields(value):
            item = getattr(value, f.name)
            json_text = hints[f.name] in (JsonText, Optional[JsonText])
            out[f.name] = json.loads(item) if json_text and item is not None else _plain(item)
        return out
    if isinstance(value, tuple):
        return [_plain(item) for item in value]
    return value
