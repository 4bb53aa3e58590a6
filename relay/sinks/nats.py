"""Bridge sink: every published batch onto NATS JetStream, through the official nats-py client.

:class:`NatsBridge` is a sink. ``write()`` runs on the relay's event loop and only appends the
batch to a bounded queue (a full queue drops the batch, counts it and logs once per episode);
a thread of its own runs an asyncio loop with the nats-py client, which reconnects by itself.
A NATS outage is a logged, counted degradation of the bridge, never a relay failure: the NNG
stream goes on unaffected.

What goes where (:class:`relay.wire.NatsSubjects`):

* each ``SpotList`` message of the stream, unchanged but for the ``:spot:`` topic prefix, on
  ``PREFIX.spot`` with the framing and ``seq``/``run_id`` in headers, published to JetStream
  (stream ``STREAM``, limits from ``bridge.nats``) with asynchronous acknowledgements;
* every ``latest_interval`` seconds, the latest record of each security that changed since
  the last round, as a one-record ``SpotList`` on ``PREFIX.last.MARKET.CODE`` (stream
  ``STREAM_LAST``, one message per subject), then a ``PREFIX.snapshot`` marker saying up to
  which stream message those records are complete;
* heartbeats on ``PREFIX.heartbeat`` (core NATS).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import ssl
import threading
import time
from collections import deque
from itertools import chain, repeat
from typing import TYPE_CHECKING, Any, Deque, Dict, Iterable, List, Optional, Tuple, Union

import structlog

from relay.encode import SpotEncoder
from relay.errors import ConfigError, RelayError
from relay.records import SpotColumns, SpotRecord
from relay.sinks import PublishedBatch
from relay.supervise import ServiceHandle, Supervisor
from relay.wire import (
    HDR_BATCH_FIRST,
    HDR_BATCH_LAST,
    HDR_RECORDS,
    HDR_RUN_ID,
    HDR_SEQ,
    HDR_SOURCE,
    HEARTBEAT_PREFIX,
    SPOT_PREFIX,
    NatsSubjects,
)

if TYPE_CHECKING:
    from relay.config import Config, NatsConfig
    from relay.security import Security

__all__ = ["NatsBridge", "connect_options"]

log = structlog.get_logger("relay.sinks.nats")

_PREFIX_LEN = len(SPOT_PREFIX)
_HB_LEN = len(HEARTBEAT_PREFIX)
_ACK_TIMEOUT = 10.0         # an acknowledgement not back by then counts as lost
_CONNECT_RETRY_MAX = 30.0   # cap of the first-connection backoff
_CLOSE_DRAIN = 3.0          # seconds close() lets the queue drain into NATS
_STREAM_RETRY = 5.0         # seconds between attempts to create the streams
_BAD_TOKEN = frozenset(" .*>\t\r\n")
_LATEST_SLICE = 250         # latest records published between two pauses ...
_LATEST_PAUSE = 0.002       # ... of this many seconds, so a round never hogs the GIL

_Item = Union[PublishedBatch, bytes]   # a batch, or a heartbeat message


def connect_options(config: NatsConfig) -> Dict[str, Any]:
    """nats-py ``connect()`` keyword arguments for ``config`` (servers, credentials, TLS).

    Raises:
        ConfigError: a TLS file cannot be loaded.
    """
    opts: Dict[str, Any] = {
        "servers": list(config.url),
        "name": config.name,
        "connect_timeout": config.connect_timeout,
        "reconnect_time_wait": config.reconnect_wait,
        "max_reconnect_attempts": -1,   # forever: an outage is a degradation, not an end
        "allow_reconnect": True,
        "pending_size": config.pending_bytes,
    }
    for key, name in (("user", "user"), ("password", "password"), ("token", "token"),
                      ("user_credentials", "creds_file"), ("nkeys_seed", "nkeys_seed"),
                      ("tls_hostname", "tls_hostname")):
        value = getattr(config, name)
        if value:
            opts[key] = value
    if config.tls_ca or config.tls_cert or any(u.startswith("tls://") for u in config.url):
        try:
            ctx = ssl.create_default_context(cafile=config.tls_ca or None)
            if config.tls_cert:
                ctx.load_cert_chain(config.tls_cert, config.tls_key or None)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError("<config>", "bridge.nats.tls_ca", f"cannot load TLS files: {exc}"
                              ) from None
        opts["tls"] = ctx
    return opts


def _redact(url: str) -> str:
    """``nats://user:secret@host:4222`` -> ``nats://user:***@host:4222``."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, host = rest.rpartition("@")
    if not at:
        return url
    user = userinfo.split(":", 1)[0]
    return f"{scheme}{sep}{user}:***@{host}"


def _server_of(nc: Any) -> Optional[str]:
    """``host:port`` of the server ``nc`` is connected to (without credentials)."""
    url = getattr(nc, "connected_url", None)
    return f"{url.hostname}:{url.port}" if url is not None else None


class _BufferFull(RelayError):
    """The client's reconnect buffer cannot take a batch (NATS has been down a while)."""

    def __init__(self, size: int) -> None:
        super().__init__(f"reconnect buffer full ({size} bytes more)")


class _Stats:
    __slots__ = ("acked", "batches", "connects", "disconnects", "dropped", "errors", "latest",
                 "messages", "unacked")

    def __init__(self) -> None:
        self.batches = 0        # batches handed to NATS
        self.messages = 0       # spot messages published
        self.acked = 0          # ... and acknowledged by JetStream
        self.unacked = 0        # ... whose acknowledgement failed or never came
        self.dropped = 0        # batches dropped: queue full, or NATS unavailable
        self.errors = 0         # publish calls that raised
        self.latest = 0         # latest-record messages published
        self.connects = 0
        self.disconnects = 0

    def as_dict(self) -> Dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}


class NatsBridge:
    """Publishes every batch to NATS JetStream from a thread of its own.

    Args:
        config: the ``bridge.nats`` section (``url`` must not be empty).
        max_message_bytes: ``publish.max_message_bytes``, for the latest-record encoder.
        supervisor: runs the bridge's thread (restarted if it dies); a private one if None.

    Attributes:
        stats: counters (batches, messages, acked, unacked, dropped, errors, latest, ...).
    """

    def __init__(self, config: NatsConfig, *, max_message_bytes: int = 512 * 1024,
                 supervisor: Optional[Supervisor] = None) -> None:
        if not config.url:
            raise ValueError("bridge.nats.url is empty")
        self.config = config
        self.subjects = NatsSubjects(config.subject_prefix, config.stream)
        self._shown_urls = [_redact(u) for u in config.url]  # logs never show a password
        self._max = max_message_bytes
        self._queue: Deque[_Item] = deque()
        self._limit = config.queue_size
        self._dropping = False      # inside a drop episode (logged once)
        self._episode_drops = 0
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._wake: Optional[asyncio.Event] = None
        self._supervisor = supervisor or Supervisor()
        self._thread: Optional[ServiceHandle] = None
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._nc: Any = None
        self._js: Any = None
        self._streams_ok = False
        self._streams_failed = False    # inside a failure episode (logged once)
        self._streams_retry = 0.0       # monotonic time of the next attempt
        self._connected = False
        self._unreachable_logged = False
        self._failing = False           # inside a publish-failure episode (logged once)
        # latest records changed since the last round: (market, code) -> (the batch's columns
        # or records, index there, seq of the message holding it, run_id)
        self._dirty: Dict[Tuple[str, str], Tuple[Union[SpotColumns, List[SpotRecord]], int,
                                                 int, str]] = {}
        self._encoders: Dict[Tuple[str, str], SpotEncoder] = {}
        self._folded: Optional[Tuple[str, str, int]] = None     # run_id, source, last seq
        self._acked: Optional[Tuple[str, int, int]] = None      # run_id, seq, stream seq
        self._marked: Optional[Tuple[str, int, int]] = None     # what the marker says
        self._pending_acks: Deque[Tuple[float, Any]] = deque()
        self.stats = _Stats()

    @classmethod
    def from_config(cls, config: Config, *, supervisor: Optional[Supervisor] = None,
                    security: Optional[Security] = None) -> NatsBridge:
        """The bridge ``config.bridge.nats`` describes.

        ``supervisor`` runs the bridge's thread; ``security`` is accepted as every sink's
        is: the bridge dials out, there is nothing to allow-list.
        """
        return cls(config.bridge.nats, max_message_bytes=config.publish.max_message_bytes,
                   supervisor=supervisor)

    def counters(self) -> Dict[str, int]:
        """Counters for the metrics endpoint (``nats_*``; ``nats_queue`` is the queue depth)."""
        st = self.stats
        return {"nats_messages": st.messages, "nats_acked": st.acked,
                "nats_unacked": st.unacked, "nats_dropped": st.dropped,
                "nats_errors": st.errors, "nats_latest": st.latest,
                "nats_disconnects": st.disconnects, "nats_queue": len(self._queue)}

    # -- sink protocol (relay's event loop) --------------------------------------------------

    @property
    def connected(self) -> bool:
        """Whether the bridge's NATS connection is up right now."""
        return self._connected

    def start(self) -> None:
        """Start the bridge thread; returns at once, connected or not.

        Raises:
            ConfigError: nats-py is not installed, or a TLS file cannot be loaded.
        """
        try:
            import nats  # noqa: F401, PLC0415 - optional extra, checked before the thread starts
        except ImportError:
            raise ConfigError("<config>", "bridge.nats.url",
                              "the NATS bridge needs nats-py: pip install 'qmt-relay[nats]'"
                              ) from None
        connect_options(self.config)  # fail now on unreadable TLS files
        self._stop.clear()
        self._thread = self._supervisor.thread("nats", self._thread_main)
        self._ready.wait(5)
        log.info("nats_bridge_started", servers=self._shown_urls,
                 prefix=self.config.subject_prefix, stream=self.config.stream)

    def write(self, batch: PublishedBatch) -> None:
        """Queue a published batch (O(1); never blocks, drops when the queue is full)."""
        self._enqueue(batch)

    def heartbeat(self, message: bytes) -> None:
        """Queue a ``:relay:heartbeat:`` message for ``PREFIX.heartbeat``."""
        self._enqueue(message)

    def _enqueue(self, item: _Item) -> None:
        if len(self._queue) >= self._limit:
            if isinstance(item, bytes):
                return  # heartbeats are not worth a drop episode
            self.stats.dropped += 1
            self._episode_drops += 1
            if not self._dropping:
                self._dropping = True
                log.warning("nats_bridge_dropping", queue_size=self._limit,
                            connected=self._connected)
            return
        if self._dropping and len(self._queue) < self._limit // 2:
            self._dropping = False
            log.info("nats_bridge_recovered", dropped=self._episode_drops)
            self._episode_drops = 0
        self._queue.append(item)
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None:
            with contextlib.suppress(RuntimeError):  # the bridge loop is closing
                loop.call_soon_threadsafe(wake.set)

    def close(self) -> None:
        """Drain what is queued (for a few seconds), then disconnect. Idempotent."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._stop.set()
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(wake.set)
        thread.stop()
        thread.join(_CLOSE_DRAIN + 5)
        log.info("nats_bridge_stopped", **self.stats.as_dict(), queued=len(self._queue))

    # -- bridge thread -------------------------------------------------------------------------

    def _thread_main(self) -> None:
        """The bridge's loop; a bug raises out of it and the supervisor restarts it."""
        try:
            asyncio.run(self._main())
        finally:
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._ready.set()
        try:
            if await self._connect():
                await self._pump()
        finally:
            await self._disconnect()

    async def _connect(self) -> bool:
        """Connect the first time (nats-py retries by itself); False if stopped first."""
        from nats.aio.client import Client  # noqa: PLC0415 - optional extra

        opts = connect_options(self.config)
        wait = 0.5
        while not self._stop.is_set():
            nc = Client()
            task = asyncio.ensure_future(nc.connect(
                **opts, error_cb=self._on_error, disconnected_cb=self._on_disconnected,
                reconnected_cb=self._on_reconnected, closed_cb=self._on_closed))
            while not task.done() and not self._stop.is_set():
                await self._sleep(0.25)
                self._drain_while_down()
            if not task.done():  # stopped while still trying
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
                with contextlib.suppress(Exception):
                    await nc.close()
                return False
            exc = task.exception()
            if exc is not None:  # rejected (authorization, TLS): retry with backoff
                log.error("nats_connect_failed", servers=self._shown_urls, error=repr(exc))
                with contextlib.suppress(Exception):
                    await nc.close()
                await self._sleep(wait * random.uniform(0.5, 1.0))
                wait = min(_CONNECT_RETRY_MAX, wait * 2)
                continue
            self._nc, self._js = nc, nc.jetstream()
            self._connected = True
            self.stats.connects += 1
            log.info("nats_connected", server=_server_of(nc))
            await self._ensure_streams()
            return True
        return False

    def _drain_while_down(self) -> None:
        """Before the first connection, batches beyond half the queue are dropped (counted)."""
        while len(self._queue) > self._limit // 2:
            item = self._queue.popleft()
            if not isinstance(item, bytes):
                self.stats.dropped += 1

    async def _sleep(self, seconds: float) -> None:
        wake = self._wake
        assert wake is not None
        wake.clear()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(wake.wait(), seconds)

    async def _ensure_streams(self) -> None:
        """Create (or update) both streams; a failure is logged and retried later."""
        from nats.js.api import DiscardPolicy, StorageType, StreamConfig  # noqa: PLC0415

        cfg, subj = self.config, self.subjects
        storage = StorageType.FILE if cfg.storage == "file" else StorageType.MEMORY
        spot = StreamConfig(name=subj.stream, subjects=[subj.spot], max_age=cfg.max_age,
                            max_bytes=cfg.max_bytes, storage=storage,
                            num_replicas=cfg.replicas, discard=DiscardPolicy.OLD,
                            allow_direct=True,
                            description="qmt-relay spot stream (SpotList messages)")
        last = StreamConfig(name=subj.last_stream, subjects=[f"{subj.last}.>", subj.snapshot],
                            max_msgs_per_subject=1, storage=storage,
                            num_replicas=cfg.replicas, discard=DiscardPolicy.OLD,
                            allow_direct=True,
                            description="qmt-relay latest record per security")
        from nats.js.errors import NotFoundError  # noqa: PLC0415

        jsm = self._nc.jsm()
        self._streams_retry = time.monotonic() + _STREAM_RETRY
        try:
            for config in (spot, last):
                try:
                    await jsm.stream_info(config.name)
                except NotFoundError:
                    await jsm.add_stream(config)
                else:  # it exists, perhaps with other limits: bring it to ours
                    await jsm.update_stream(config)
        except Exception as exc:  # no JetStream, limits beyond the server's, no permission
            self._streams_ok = False
            if not self._streams_failed:
                self._streams_failed = True
                log.error("nats_stream_setup_failed", stream=subj.stream, error=str(exc),
                          retry_s=_STREAM_RETRY)
            return
        if self._streams_failed:
            log.info("nats_streams_ready", stream=subj.stream)
        self._streams_ok, self._streams_failed = True, False

    async def _on_error(self, exc: Exception) -> None:
        if self._nc is None and not self._unreachable_logged:  # before the first connection
            self._unreachable_logged = True
            log.warning("nats_unreachable", servers=self._shown_urls, error=repr(exc))
        else:
            log.debug("nats_client_error", error=repr(exc))

    async def _on_disconnected(self) -> None:
        if self._connected and not self._stop.is_set():
            self.stats.disconnects += 1
            log.warning("nats_disconnected", queued=len(self._queue))
        self._connected = False

    async def _on_reconnected(self) -> None:
        self._connected = True
        self.stats.connects += 1
        nc = self._nc
        log.info("nats_reconnected", server=_server_of(nc))
        self._streams_ok = False  # a restarted server may have lost them: check again
        self._streams_retry = 0.0

    async def _on_closed(self) -> None:
        self._connected = False

    async def _pump(self) -> None:
        interval = self.config.latest_interval
        next_latest = time.monotonic() + interval
        stop_at: Optional[float] = None
        while True:
            if self._stop.is_set() and stop_at is None:
                stop_at = time.monotonic() + _CLOSE_DRAIN
            if stop_at is not None and (not self._queue or time.monotonic() > stop_at):
                break
            if self._nc.is_closed and stop_at is None:  # closed under us: start afresh
                log.warning("nats_connection_closed")
                self._connected = False
                if not await self._connect():
                    break
            if (not self._streams_ok and self._connected
                    and time.monotonic() >= self._streams_retry):
                await self._ensure_streams()
            while self._queue:
                item = self._queue.popleft()
                try:
                    if isinstance(item, bytes):
                        await self._nc.publish(self.subjects.heartbeat, item[_HB_LEN:])
                    else:
                        await self._publish_batch(item)
                except Exception as exc:  # buffer full while disconnected, too large, ...
                    self.stats.errors += 1
                    if not isinstance(item, bytes):
                        self.stats.dropped += 1
                        self._fold(item)  # its records still count as the latest
                    if not self._failing:
                        self._failing = True
                        log.warning("nats_publish_failed", error=repr(exc),
                                    connected=self._connected)
                else:
                    if self._failing and not isinstance(item, bytes):
                        self._failing = False
                        log.info("nats_publish_recovered", errors=self.stats.errors)
                await asyncio.sleep(0)  # let acknowledgements and pings through
            self._expire_acks()
            now = time.monotonic()
            if now >= next_latest or stop_at is not None:
                await self._publish_latest()
                next_latest = now + interval
            if not self._queue and stop_at is None:
                await self._sleep(max(0.0, next_latest - time.monotonic()))
        await self._publish_latest()

    async def _publish_batch(self, batch: PublishedBatch) -> None:
        js, subject = self._js, self.subjects.spot
        first = batch.first_seq
        last = first + len(batch.messages) - 1
        if not self._connected:
            # nats-py buffers while it reconnects; never let it overflow (a publish that
            # fails there would also leak one of its in-flight slots)
            size = sum(map(len, batch.messages))
            if self._nc.pending_data_size + size > self.config.pending_bytes:
                raise _BufferFull(size)
        fixed = {HDR_RUN_ID: batch.run_id, HDR_BATCH_FIRST: str(first),
                 HDR_BATCH_LAST: str(last), HDR_SOURCE: batch.source}
        for i, (message, count) in enumerate(zip(batch.messages, batch.counts)):
            seq = first + i
            headers = {**fixed, HDR_SEQ: str(seq), HDR_RECORDS: str(count)}
            future = await js.publish_async(subject, message[_PREFIX_LEN:], headers=headers,
                                            wait_stall=_ACK_TIMEOUT)
            self.stats.messages += 1
            future.add_done_callback(self._ack_callback(batch.run_id, seq))
            self._pending_acks.append((time.monotonic(), future))
        self.stats.batches += 1
        self._fold(batch)

    def _ack_callback(self, run_id: str, seq: int) -> Any:
        def done(future: asyncio.Future[Any]) -> None:
            if future.cancelled() or future.exception() is not None:
                self.stats.unacked += 1
                return
            self.stats.acked += 1
            self._acked = (run_id, seq, int(future.result().seq))

        return done

    def _expire_acks(self) -> None:
        pending, cutoff = self._pending_acks, time.monotonic() - _ACK_TIMEOUT
        while pending and (pending[0][1].done() or pending[0][0] < cutoff):
            _, future = pending.popleft()
            if not future.done():
                future.cancel()  # releases nats-py's in-flight slot; counted as unacked

    def _fold(self, batch: PublishedBatch) -> None:
        """Remember where each security's latest record is (no record is built here)."""
        cols = batch.columns
        rows: Union[SpotColumns, List[SpotRecord]] = cols if cols is not None else batch.records
        if cols is not None:
            keys: Iterable[Tuple[str, str]] = zip(cols.market, cols.code)
        else:
            keys = ((r.market, r.code) for r in batch.records)
        dirty, run = self._dirty, batch.run_id
        seqs = chain.from_iterable(repeat(seq, count)
                                   for seq, count in enumerate(batch.counts, batch.first_seq))
        for i, (key, seq) in enumerate(zip(keys, seqs)):
            dirty[key] = (rows, i, seq, run)
        self._folded = (run, batch.source, batch.first_seq + len(batch.messages) - 1)

    async def _publish_latest(self) -> None:
        """Publish the changed latest records, then the snapshot marker."""
        if not self._connected or self._folded is None:
            return
        if not self._dirty and self._acked == self._marked:
            return  # nothing new: the marker already says it
        dirty, self._dirty = self._dirty, {}
        nc, subj = self._nc, self.subjects
        _, source, _ = self._folded
        now_ms = int(time.time() * 1000)
        # A batch holding many of the latest records builds them all at once (the fast way);
        # one holding a few builds just those.
        share: Dict[int, int] = {}
        for rows, *_ in dirty.values():
            share[id(rows)] = share.get(id(rows), 0) + 1
        published = 0
        try:
            for (market, code), (rows, i, seq, run) in dirty.items():
                if _BAD_TOKEN.intersection(market) or _BAD_TOKEN.intersection(code):
                    continue  # not a valid subject token; the stream still carries it
                if not isinstance(rows, SpotColumns):
                    rec = rows[i]
                elif share[id(rows)] * 8 < rows.n:
                    rec = rows.record(i)
                else:
                    rec = rows.records[i]
                encoder = self._encoders.get((run, source))
                if encoder is None:
                    self._encoders.clear()  # one run at a time
                    encoder = self._encoders[(run, source)] = SpotEncoder(run, source, self._max)
                (message,) = encoder.encode([rec], first_seq=seq, publish_time_ms=now_ms)
                # no headers: run_id and seq are inside the SpotList already
                await nc.publish(subj.last_subject(market, code), message[_PREFIX_LEN:])
                published += 1
                if published % _LATEST_SLICE == 0:  # hand the GIL back to the relay's thread
                    await asyncio.sleep(_LATEST_PAUSE)
        except Exception as exc:  # disconnected half way: keep the rest for the next round
            self.stats.errors += 1
            for key, value in dirty.items():
                self._dirty.setdefault(key, value)
            log.debug("nats_latest_failed", error=repr(exc))
            return
        finally:
            self.stats.latest += published
        acked = self._acked
        marker = {"v": 1, "run_id": acked[0] if acked else None,
                  "seq": acked[1] if acked else None,
                  "stream_seq": acked[2] if acked else None,
                  "source": source, "time_ms": now_ms}
        try:
            await self._js.publish(subj.snapshot, json.dumps(marker).encode(),
                                   timeout=_ACK_TIMEOUT)
        except Exception as exc:  # the next round writes it again
            log.debug("nats_marker_failed", error=repr(exc))
        else:
            self._marked = acked

    async def _disconnect(self) -> None:
        nc, self._nc = self._nc, None
        if nc is None:
            return
        with contextlib.suppress(Exception):
            await asyncio.wait_for(nc.flush(), 2)
        pending: List[Any] = [f for _, f in self._pending_acks if not f.done()]
        if pending:
            await asyncio.wait(pending, timeout=2)
        self._expire_acks()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(nc.close(), 5)
        self._connected = False
