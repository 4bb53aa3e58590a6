"""Who may connect: the allow-list, TLS, and the one function that opens listening sockets.

Every NNG socket the relay listens on (the stream's PUB, the snapshot and history REP
services) is made by :meth:`Security.listen`, which

- refuses a TCP peer outside ``security.allow`` in a pre-connect pipe callback: NNG closes
  the pipe right after the SP handshake, before any message reaches it; the refusal is
  counted per service and logged, at most once per ``log_interval`` per service;
- configures NNG's TLS transport for ``tls+tcp://`` addresses from ``security.tls`` (server
  certificate and key; with ``ca`` set, a client certificate issued by it is required);
- warns at startup when it opens a non-loopback TCP address and no allow-list is set;
- raises :class:`~relay.errors.PublishError` for an address it cannot open.

IPC peers (same host; the socket file's permissions decide) are always allowed. The HTTP
metrics service applies the same list through :meth:`Security.is_allowed`.
"""

from __future__ import annotations

import ipaddress
import re
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, Optional, Sequence, Tuple, Union

import pynng
import structlog

from relay.errors import ConfigError, PublishError

if TYPE_CHECKING:
    from relay.config import SecurityConfig

__all__ = ["AllowList", "Security", "TlsFiles", "describe_nng_error", "is_loopback_address"]

log = structlog.get_logger("relay.security")

_Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
_Address = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
_TCP_URL = re.compile(r"(?:tls\+)?tcp://(?P<host>\[[^\]]+\]|[^:/]+):\d+", re.ASCII)


class AllowList:
    """IP addresses and CIDR networks allowed to connect (``["192.168.1.0/24", "10.0.0.7"]``).

    Calling it (or :meth:`is_allowed`) with a peer's IP address answers whether it may
    connect. IPv4-mapped IPv6 peers (``::ffff:192.168.1.5``) match IPv4 entries.

    Raises:
        ValueError: an entry is not an IP address or network.
    """

    __slots__ = ("_networks", "entries")

    def __init__(self, entries: Sequence[str]) -> None:
        self.entries = tuple(entries)
        self._networks: Tuple[_Network, ...] = tuple(
            ipaddress.ip_network(entry.strip(), strict=False) for entry in entries)

    def is_allowed(self, ip: str) -> bool:
        """Whether ``ip`` (``"192.168.1.5"``, ``"::1"``; brackets and zone ids accepted)."""
        try:
            address: _Address = ipaddress.ip_address(ip.strip("[]").split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self._networks)

    __call__ = is_allowed


def is_loopback_address(url: str) -> bool:
    """True for ``ipc://`` and TCP URLs on a loopback host (127.0.0.0/8, ::1, localhost)."""
    match = _TCP_URL.fullmatch(url)
    if match is None:
        return True  # ipc:// (or not a network address at all)
    host = match.group("host").strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: whatever it resolves to is reachable by others


class TlsFiles:
    """The PEM files of ``security.tls``: the server certificate, its key, an optional CA.

    The files are read when a ``tls+tcp://`` socket is opened, so a replaced certificate is
    picked up by the next start.
    """

    __slots__ = ("ca", "cert", "key")

    def __init__(self, cert: str, key: str, ca: Optional[str] = None) -> None:
        self.cert = cert
        self.key = key
        self.ca = ca

    def server_config(self) -> pynng.TLSConfig:
        """A pynng server TLS configuration (client certificates required when ``ca``).

        Raises:
            ConfigError: a file cannot be read or is not PEM (names ``security.tls.*``).
        """
        cert = _read_pem(self.cert, "security.tls.cert")
        key = _read_pem(self.key, "security.tls.key")
        if self.ca is None:
            return pynng.TLSConfig(pynng.TLSConfig.MODE_SERVER, own_cert_string=cert,
                                   own_key_string=key)
        return pynng.TLSConfig(pynng.TLSConfig.MODE_SERVER, own_cert_string=cert,
                               own_key_string=key, ca_string=_read_pem(self.ca, "security.tls.ca"),
                               auth_mode=pynng.TLSConfig.AUTH_MODE_REQUIRED)


class _Refusals:
    """Per-service refusal counter with rate-limited logging (NNG threads call it)."""

    __slots__ = ("last_log", "suppressed", "total")

    def __init__(self) -> None:
        self.total = 0
        self.suppressed = 0
        self.last_log: Optional[float] = None


class Security:
    """The relay's network policy, applied to every socket it listens on.

    Args:
        allow: IP addresses and networks allowed on TCP; ``None`` allows every peer.
        tls: certificate and key for ``tls+tcp://`` addresses.
        log_interval: at most one ``peer_refused`` line per service per this many seconds.
        clock: monotonic seconds.
    """

    def __init__(self, allow: Optional[Sequence[str]] = None, *, tls: Optional[TlsFiles] = None,
                 log_interval: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.allow = AllowList(allow) if allow is not None else None
        self.tls = tls
        self._log_interval = log_interval
        self._clock = clock
        self._lock = threading.Lock()
        self._refusals: Dict[str, _Refusals] = {}

    @classmethod
    def from_config(cls, cfg: SecurityConfig) -> Security:
        """Build from ``config.security`` (no side effects: TLS files are read on listen)."""
        tls = None
        if cfg.tls.cert is not None and cfg.tls.key is not None:
            tls = TlsFiles(cfg.tls.cert, cfg.tls.key, cfg.tls.ca)
        return cls(cfg.allow, tls=tls, log_interval=cfg.log_interval)

    # -- the predicate -----------------------------------------------------------------------

    def is_allowed(self, ip: str) -> bool:
        """Whether a TCP peer at ``ip`` may connect (always True without an allow-list)."""
        return self.allow is None or self.allow.is_allowed(ip)

    def refused(self, service: Optional[str] = None) -> int:
        """Peers refused so far, by ``service`` or over all of them."""
        with self._lock:
            if service is not None:
                entry = self._refusals.get(service)
                return entry.total if entry is not None else 0
            return sum(entry.total for entry in self._refusals.values())

    def refusals(self) -> Dict[str, int]:
        """Refused peers per service."""
        with self._lock:
            return {name: entry.total for name, entry in self._refusals.items()}

    def refuse(self, service: str, peer: str) -> None:
        """Count (and maybe log) one refused peer; HTTP services call it too."""
        now = self._clock()
        with self._lock:
            entry = self._refusals.setdefault(service, _Refusals())
            entry.total += 1
            if entry.last_log is not None and now - entry.last_log < self._log_interval:
                entry.suppressed += 1
                return
            suppressed, entry.suppressed, entry.last_log = entry.suppressed, 0, now
            total = entry.total
        log.warning("peer_refused", service=service, peer=peer, refused=total,
                    suppressed=suppressed)

    # -- opening sockets ---------------------------------------------------------------------

    def listen(self, factory: Callable[..., pynng.Socket], addresses: Sequence[str], *,
               service: str, prepare: Optional[Callable[[pynng.Socket], None]] = None,
               **options: Any) -> pynng.Socket:
        """Create a socket with ``factory(**options)`` and listen on every address.

        Args:
            factory: a pynng socket class (``pynng.Pub0``, ``pynng.Rep0``).
            addresses: ``ipc://``, ``tcp://`` and ``tls+tcp://`` URLs.
            service: the name used in logs and refusal counts (``publish``, ``snapshot``).
            prepare: called with the socket before it listens (to add pipe callbacks).
            options: socket options (``recv_timeout=200``, ``recv_max_size=65536``).

        Returns:
            The listening socket; the caller owns it.

        Raises:
            PublishError: an address cannot be opened, or is ``tls+tcp://`` without
                ``security.tls``; nothing stays open.
            ConfigError: a TLS file cannot be read.
        """
        tls_needed = any(a.startswith("tls+tcp://") for a in addresses)
        if tls_needed and self.tls is None:
            first = next(a for a in addresses if a.startswith("tls+tcp://"))
            raise PublishError(first, "tls+tcp:// needs security.tls.cert and security.tls.key")
        sock = factory(**options)
        try:
            if self.allow is not None:
                sock.add_pre_pipe_connect_cb(self._guard(service))
            if tls_needed:
                assert self.tls is not None
                sock.tls_config = self.tls.server_config()
            if prepare is not None:
                prepare(sock)
            for address in addresses:
                try:
                    sock.listen(address)
                except pynng.exceptions.NNGException as exc:
                    reason = f"{service} service: {describe_nng_error(exc)}"
                    raise PublishError(address, reason) from None
        except BaseException:
            sock.close()
            raise
        for address in addresses:
            if self.allow is None and not is_loopback_address(address):
                log.warning("open_to_network", service=service, address=address,
                            hint="every host that can reach this address may connect; "
                                 "list the allowed ones in security.allow")
        return sock

    def _guard(self, service: str) -> Callable[[pynng.Pipe], None]:
        allow = self.allow
        assert allow is not None

        def check(pipe: pynng.Pipe) -> None:
            # Runs on an NNG thread before the pipe joins the socket: closing it here means
            # the peer never receives a message. Any failure to read the address refuses.
            try:
                remote = pipe.remote_address
                family = remote.family_as_str
            except Exception:  # an odd pipe: refuse rather than let an exception into NNG
                family, remote = "unknown", None
            if family == "ipc":
                return
            text = str(remote) if remote is not None else "?"
            ip = text.rpartition(":")[0] if family.startswith("inet") else ""
            if ip and allow.is_allowed(ip):
                return
            try:
                pipe.close()
            finally:
                self.refuse(service, text)

        return check


def _read_pem(path: str, key: str) -> str:
    try:
        with open(path, encoding="ascii") as file:
            text = file.read()
    except OSError as exc:
        raise ConfigError("<config>", key, f"cannot read {path!r}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError("<config>", key, f"{path!r} is not a PEM file") from None
    if "-----BEGIN " not in text:
        raise ConfigError("<config>", key, f"{path!r} is not a PEM file")
    return text


def describe_nng_error(exc: Exception) -> str:
    """A short reason for a failed listen, for :class:`PublishError`."""
    if isinstance(exc, pynng.exceptions.AddressInUse):
        return "address in use (is another relay or hikyuu producer running?)"
    if isinstance(exc, pynng.exceptions.PermissionDenied):
        return "permission denied"
    if isinstance(exc, pynng.exceptions.AddressInvalid):
        return "invalid address"
    return str(exc) or exc.__class__.__name__
