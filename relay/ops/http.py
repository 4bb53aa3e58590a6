"""The operations HTTP endpoint, on a thread of its own.

Served over ``http://`` or, with ``security.tls``'s certificate (the same one as
``tls+tcp://``), ``https://``.

``/metrics``  Prometheus text format (``prometheus_client``), this relay's registry only.
``/healthz``  200 while healthy, 503 otherwise; a JSON body says why either way.
``/status``   the latest :class:`~relay.ops.metrics.OpsStatus` as JSON (the page, the
              ``qmt-relay status`` command).
``/``         the live status page (``page.html``, self-contained: no CDN, no build step).

Handlers only read the latest snapshot the relay's event loop stored, so no request can delay
publishing. Anything can reach an opened port: requests other than GET/HEAD of these paths get
404/405, a client that never speaks is dropped after ``request_timeout`` seconds, and every
handler error is answered 500 and logged, never ending the server.
"""

from __future__ import annotations

import importlib.resources
import json
import re
import ssl
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Dict, Optional, Protocol, Tuple

import structlog
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from relay.errors import PublishError
from relay.ops.metrics import Health, OpsStatus

__all__ = ["OpsServer", "TlsFiles", "parse_http_address"]

log = structlog.get_logger("relay.ops.http")

_HTTP = re.compile(
    r"(?P<scheme>https?)://(?P<host>\[[0-9A-Fa-f:.]+\]|[^\s:/\[\]]+):(?P<port>\d{1,5})/?",
    re.ASCII)


def parse_http_address(address: str) -> Tuple[str, str, int]:
    """``http[s]://HOST:PORT`` -> ``(scheme, host, port)`` (brackets of an IPv6 host removed).

    Raises:
        ValueError: not of that form.
    """
    match = _HTTP.fullmatch(address)
    if match is None:
        raise ValueError(f"expected http://HOST:PORT or https://HOST:PORT, got {address!r}")
    return match.group("scheme"), match.group("host").strip("[]"), int(match.group("port"))


class TlsFiles(Protocol):
    """The PEM files an ``https://`` endpoint needs (``relay.security.TlsFiles``)."""

    cert: str
    key: str
    ca: Optional[str]


def _tls_context(files: TlsFiles) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(files.cert, files.key)
    if files.ca:   # as for tls+tcp://: a CA set means client certificates are required
        context.load_verify_locations(files.ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def _page() -> bytes:
    return importlib.resources.files("relay.ops").joinpath("page.html").read_bytes()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = False  # a second relay on the same port must fail, not share it

    def __init__(self, address: Tuple[str, int], ops: OpsServer) -> None:
        if ":" in address[0]:
            import socket  # noqa: PLC0415

            self.address_family = socket.AF_INET6
        self.ops = ops
        super().__init__(address, _Handler)

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """The allow-list (``security.allow``): a refused peer is closed before it speaks."""
        ops = self.ops
        ip = str(client_address[0])
        if ops.allow is None or ops.allow(ip):
            return True
        if ops.refuse is not None:
            ops.refuse("metrics", ip)
        return False

    def handle_error(self, request: Any, client_address: Any) -> None:
        error = sys.exc_info()[1]
        if isinstance(error, (ssl.SSLError, OSError)):   # a failed handshake, a reset peer
            self.ops.connection_errors += 1
            log.debug("ops_http_connection_failed", client=str(client_address),
                      error=repr(error))
            return
        log.warning("ops_http_error", client=str(client_address), exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "qmt-relay"
    sys_version = ""
    protocol_version = "HTTP/1.1"
    # Headers and body leave in one segment (buffered, flushed per request) with no Nagle
    # delay: unbuffered writes cost a delayed-ACK round (~40 ms) per keep-alive request.
    wbufsize = 64 * 1024
    disable_nagle_algorithm = True

    def setup(self) -> None:
        # StreamRequestHandler applies ``timeout`` to the connection: drop silent clients.
        self.request.settimeout(self.server.ops.request_timeout)
        if isinstance(self.request, ssl.SSLSocket):
            # The TLS handshake runs here, on the connection's own thread (with the timeout),
            # never in the accepting loop, so a peer that stalls it delays nobody else.
            self.request.do_handshake()
        super().setup()

    def log_message(self, format: str, *args: Any) -> None:
        """Silence the stdlib's per-request stderr lines (a scrape every few seconds)."""

    def do_HEAD(self) -> None:
        self._respond(head=True)

    def do_GET(self) -> None:
        self._respond(head=False)

    def _not_allowed(self) -> None:
        self.close_connection = True   # its body (if any) is never read
        self._send(405, b"method not allowed\n", "text/plain; charset=utf-8", False,
                   {"Allow": "GET, HEAD", "Connection": "close"})

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _not_allowed  # noqa: N815 - stdlib's

    def _respond(self, *, head: bool) -> None:
        ops = self.server.ops
        path = self.path.split("?", 1)[0]
        try:
            status, body, ctype, extra = ops.answer(path, self.headers.get("Accept"))
        except Exception as exc:  # a bug in one answer must not end the server
            log.exception("ops_http_failed", path=path, error=repr(exc))
            status, body, ctype, extra = 500, b"internal error\n", "text/plain", {}
        self._send(status, body, ctype, head, extra)

    def _send(self, status: int, body: bytes, ctype: str, head: bool,
              extra: Dict[str, str]) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for name, value in extra.items():
            self.send_header(name, value)
        self.end_headers()
        if not head:
            self.wfile.write(body)


_JSON = "application/json; charset=utf-8"


class OpsServer:
    """Serves metrics, health, status and the page for one relay.

    Args:
        address: ``http://HOST:PORT`` to listen on (port 0 picks a free one).
        registry: the relay's metrics registry.
        latest: returns the latest status snapshot (``None`` before the first one).
        stale_after: a snapshot older than this many seconds means the relay's loop is
            stuck: ``/healthz`` answers 503.
        request_timeout: seconds a client may take to send its request.
        clock: epoch seconds.
        allow: whether a peer's IP address may connect (the relay's allow-list).
        refuse: counts and logs one refused peer, ``refuse(service, ip)``.
        tls: certificate, key and optional CA (``security.tls``) for an ``https://`` address.
    """

    def __init__(self, address: str, registry: CollectorRegistry,
                 latest: Callable[[], Optional[OpsStatus]], *, stale_after: float = 10.0,
                 request_timeout: float = 10.0, clock: Callable[[], float] = time.time,
                 allow: Optional[Callable[[str], bool]] = None,
                 refuse: Optional[Callable[[str, str], None]] = None,
                 tls: Optional[TlsFiles] = None) -> None:
        self.address = address
        self.registry = registry
        self.request_timeout = request_timeout
        self.allow = allow
        self.refuse = refuse
        self.connection_errors = 0   # failed handshakes, resets (logged at debug only)
        self._tls = tls
        self._handle: Any = None
        self._latest = latest
        self._stale_after = stale_after
        self._clock = clock
        self._server: Optional[_Server] = None
        self._thread: Optional[threading.Thread] = None
        self._page = _page()
        self.requests = 0

    @property
    def url(self) -> str:
        """The address actually listened on (the real port when 0 was asked)."""
        if self._server is None:
            return self.address
        host, port = self._server.server_address[:2]
        text = host.decode() if isinstance(host, bytes) else str(host)
        shown = f"[{text}]" if ":" in text else text
        scheme = "https" if self.address.startswith("https:") else "http"
        return f"{scheme}://{shown}:{port}"

    def start(self, spawn: Optional[Callable[[str, Callable[[], None]], Any]] = None) -> None:
        """Listen and serve on a daemon thread.

        Args:
            spawn: runs the serving loop as a named service (``Supervisor.thread``, which
                restarts it after an unexpected death); default: a plain daemon thread.

        Raises:
            PublishError: the address is invalid or cannot be bound.
        """
        try:
            scheme, host, port = parse_http_address(self.address)
        except ValueError as exc:
            raise PublishError(self.address, str(exc)) from None
        context = None
        if scheme == "https":
            if self._tls is None:
                raise PublishError(self.address, "metrics endpoint: https:// needs "
                                                 "security.tls.cert and security.tls.key")
            try:
                context = _tls_context(self._tls)
            except (OSError, ssl.SSLError) as exc:
                raise PublishError(self.address, f"metrics endpoint TLS: {exc}") from None
        try:
            self._server = _Server((host, port), self)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise PublishError(self.address, f"metrics endpoint: {reason}") from None
        if context is not None:
            self._server.socket = context.wrap_socket(
                self._server.socket, server_side=True, do_handshake_on_connect=False)
        server = self._server

        def serve() -> None:
            server.serve_forever(poll_interval=0.2)

        if spawn is not None:
            self._handle = spawn("metrics_http", serve)
        else:
            self._thread = threading.Thread(target=serve, name="relay-ops-http", daemon=True)
            self._thread.start()
        log.info("ops_http_started", url=self.url)

    def close(self) -> None:
        """Stop serving and close the socket. Idempotent."""
        server, self._server = self._server, None
        if server is None:
            return
        handle, self._handle = self._handle, None
        if handle is not None:
            handle.stop()   # no restart once serve_forever returns
        server.shutdown()
        server.server_close()
        if handle is not None:
            handle.join(5.0)
        if self._thread is not None:
            self._thread.join(5.0)
            self._thread = None

    def health(self) -> Tuple[Health, Optional[OpsStatus]]:
        status = self._latest()
        if status is None:
            return Health(False, "starting", "relay is starting"), None
        age = self._clock() - status.time
        if age > self._stale_after:
            return Health(False, "stuck", f"relay status is {age:.0f} s old (event loop "
                                          "busy or stuck)"), status
        return status.health, status

    def answer(self, path: str, accept: Optional[str]) -> Tuple[int, bytes, str, Dict[str, str]]:
        """Status code, body, content type and extra headers for a GET of ``path``."""
        self.requests += 1
        if path == "/metrics":
            encoder, ctype = choose_encoder(accept or "")
            return 200, encoder(self.registry), ctype, {}
        if path == "/healthz":
            health, status = self.health()
            body = health.as_dict()
            if status is not None:
                body.update(run_id=status.run_id, source=status.source,
                            last_data_age_s=status.last_batch_age, seq=status.seq)
            return (200 if health.healthy else 503), _dump(body), _JSON, {}
        if path == "/status":
            health, status = self.health()
            data: Dict[str, Any] = status.as_dict() if status is not None else {}
            data["health"] = health.as_dict()
            data["now"] = self._clock()
            return 200, _dump(data), _JSON, {}
        if path in ("/", "/index.html"):
            return 200, self._page, "text/html; charset=utf-8", {}
        return 404, b"not found\n", "text/plain; charset=utf-8", {}


def _dump(data: Any) -> bytes:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n"
