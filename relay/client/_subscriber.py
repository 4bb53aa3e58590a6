"""The subscriber: reassembles framed spot batches, reconnects, reports what went wrong.

One :class:`Subscriber` reads one relay stream. All reading happens in whichever thread
consumes it (the blocking iterator, :meth:`Subscriber.run`, or an executor thread under
:meth:`Subscriber.aiter`); :meth:`Subscriber.close` may be called from any thread.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections import deque
from typing import (
    Any,
    AsyncIterator,
    Callable,
    Deque,
    Dict,
    Iterable,
    Iterator,
    List,
    Optional,
    Union,
)

from relay.client._batch import Batch, Message, numpy_available
from relay.client._events import (
    Connected,
    DecodeFailed,
    Disconnected,
    Event,
    Gap,
    Restart,
    Silence,
    SnapshotFailed,
    SnapshotLoaded,
)
from relay.client._nats import NatsSub, ReplayFrom, is_nats_url
from relay.client._snapshot import (
    SNAPSHOT_REQUEST,
    CodeFilter,
    default_snapshot_url,
    snapshot_batch,
)
from relay.client._transport import (
    PynngSub,
    TcpSub,
    TransportError,
    client_tls_context,
    parse_url,
    request,
)
from relay.errors import DecodeError
from relay.wire import END, HEARTBEAT_PREFIX, SPOT_PREFIX, START, decode_heartbeat

__all__ = ["Batch", "Subscriber"]

_PREFIX_LEN = len(SPOT_PREFIX)
_TOPICS = (SPOT_PREFIX, HEARTBEAT_PREFIX)

Item = Union[Batch, Event]
"""What :meth:`Subscriber.updates` yields."""


class Stats:
    """Counters of one subscriber (cumulative since it was created)."""

    __slots__ = ("batches", "connects", "decode_errors", "gaps", "messages", "missed",
                 "restarts", "silences")

    def __init__(self) -> None:
        self.messages = 0
        self.batches = 0
        self.decode_errors = 0
        self.gaps = 0
        self.missed = 0
        self.restarts = 0
        self.connects = 0
        self.silences = 0

    def __repr__(self) -> str:
        body = ", ".join(f"{name}={getattr(self, name)}" for name in self.__slots__)
        return f"Stats({body})"


class Subscriber:
    """Subscribe to a relay and receive complete batches, plus events.

    Use it as a blocking iterator (``for batch in sub``), with a callback
    (:meth:`run` / :meth:`start`), or from asyncio (``async for batch in sub``); close it
    with :meth:`close` or a ``with`` block. Events (:mod:`relay.client` ``Gap``,
    ``Restart``, ``Silence``, ``Connected``, ``Disconnected``, ``DecodeFailed``,
    ``SnapshotLoaded``, ``SnapshotFailed``) go to ``on_event``; :meth:`updates` yields
    batches and events together.

    Args:
        url: the relay's stream address, ``tcp://HOST:PORT`` (pure Python),
            ``ipc://PATH`` (needs pynng), or the NATS bridge's server,
            ``nats://HOST:PORT[?prefix=qmt&stream=QMT]`` (needs nats-py, pure Python).
        codes: keep only these securities (``"600000.SH"`` or ``"600000"``); ``None`` = all.
        snapshot: fetch the relay's full-market snapshot after connecting (and after every
            reconnect) and deliver it first, as a batch with ``snapshot=True``; stream
            messages it already covers are skipped.
            Over NATS the snapshot is read from JetStream once, at the first connect; after
            a reconnect the stream resumes where it stopped.
        snapshot_url: the relay's ``publish.snapshot_address``; by default the stream's TCP
            port + 1 (``tcp://127.0.0.1:9201`` for ``ipc://``). Not used over NATS.
        replay_from: NATS only: start with stored messages instead of new ones, from a
            ``datetime`` (naive = China time) or after a relay sequence number of the newest
            run (``replay_from=sub.last_seq`` resumes exactly where a previous one stopped).
        heartbeat_timeout: seconds without any message (the relay sends heartbeats every
            second by default) before reporting :class:`Silence` and reconnecting; ``None``
            disables the watchdog.
        on_event: called with every event, in the consuming thread.
        on_error: called with each :class:`DecodeError` (the message is skipped either way).
        reconnect_wait: first delay before reconnecting, seconds; doubles per failed attempt.
        reconnect_wait_max: cap of that delay (a random 50-100 % of it is used).
        connect_timeout: seconds allowed to connect and for the snapshot reply.
        max_message_bytes: a longer message breaks the connection (it cannot be ours).
        columns: deliver batches that build no record objects until :attr:`Batch.records`
            is read: :meth:`Batch.to_numpy` and :meth:`Batch.to_pandas` read the relay's
            messages column by column straight out of their buffers (needs NumPy; without
            it, :attr:`Batch.columns` still works). Messages are still checked on arrival:
            a malformed one is reported and skipped exactly as in the default mode.
        ca: for ``tls+tcp://``: PEM file of the CA that issued the relay's certificate
            (``None``: the system's trust store). The certificate is always verified.
        cert: PEM file of our client certificate, for a relay that requires one.
        key: its private key (``None``: in ``cert``).
    """

    def __init__(
        self,
        url: str,
        *,
        codes: Optional[Iterable[str]] = None,
        snapshot: bool = False,
        snapshot_url: Optional[str] = None,
        replay_from: Optional[ReplayFrom] = None,
        heartbeat_timeout: Optional[float] = 5.0,
        on_event: Optional[Callable[[Event], Any]] = None,
        on_error: Optional[Callable[[DecodeError], Any]] = None,
        reconnect_wait: float = 0.1,
        reconnect_wait_max: float = 5.0,
        connect_timeout: float = 5.0,
        max_message_bytes: int = 256 * 1024 * 1024,
        columns: bool = False,
        ca: Optional[str] = None,
        cert: Optional[str] = None,
        key: Optional[str] = None,
    ) -> None:
        nats = is_nats_url(url)
        if replay_from is not None and not nats:
            raise ValueError("replay_from= needs a nats:// URL (JetStream keeps the stream)")
        if replay_from is not None and snapshot:
            raise ValueError("use either snapshot=True or replay_from=, not both")
        scheme, host, port = ("nats", "", 0) if nats else parse_url(url)
        self._tls = client_tls_context(ca, cert, key) if scheme == "tls+tcp" else None
        self.url = url
        self._keep = CodeFilter.of(list(codes) if codes is not None else None)
        self._snapshot = snapshot
        self.snapshot_url = (snapshot_url or default_snapshot_url(url)) if (
            snapshot and not nats) else None
        self._heartbeat_timeout = heartbeat_timeout
        self._on_event = on_event
        self._on_error = on_error
        self._wait0 = reconnect_wait
        self._wait_max = reconnect_wait_max
        self._connect_timeout = connect_timeout
        self._max = max_message_bytes
        self._columns = columns
        self._numpy = columns and numpy_available()
        self._transport: Union[TcpSub, PynngSub, NatsSub]
        if scheme in ("tcp", "tls+tcp"):
            self._transport = TcpSub(host, port, connect_timeout=connect_timeout,
                                     max_message_bytes=max_message_bytes, tls=self._tls)
        elif nats:
            # JetStream's idle heartbeats: two missed ones recreate the consumer
            idle = 2.0 if heartbeat_timeout is None else min(5.0, max(0.5, heartbeat_timeout / 2))
            self._transport = NatsSub(url, snapshot=snapshot, replay_from=replay_from,
                                      connect_timeout=connect_timeout, idle_heartbeat=idle)
        else:
            self._transport = PynngSub(url, _TOPICS, max_message_bytes=max_message_bytes)
        # tcp and nats connect synchronously; pynng reports its pipes as events
        self._sync_connect = scheme in ("tcp", "tls+tcp", "nats")
        # a half-open TCP connection never heals
        self._redial_on_silence = scheme in ("tcp", "tls+tcp")
        self._snapshot_loaded = False
        self._rng = random.Random()
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._items: Deque[Item] = deque()
        # connection state
        self._opened = False          # transport connected (tcp) / dialling (pynng)
        self._connected = False
        self._attempt = 0
        self._retry_at = 0.0
        self._last_message = 0.0
        self._silent = False
        # stream state
        self._in_batch = False
        self._parts: List[Message] = []
        self._run_id: Optional[str] = None
        self._last_seq: Optional[int] = None
        self._snap_run: Optional[str] = None
        self._snap_seq: Optional[int] = None
        self.last_heartbeat: Optional[Dict[str, Any]] = None
        self.stats = Stats()

    # -- public API ------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """Whether a connection to the relay is up right now."""
        return self._connected

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    @property
    def run_id(self) -> Optional[str]:
        """The relay run seen last (from data or heartbeats)."""
        return self._run_id

    @property
    def last_seq(self) -> Optional[int]:
        """Sequence number of the last message taken from the stream (or the snapshot)."""
        return self._last_seq

    def recv(self, timeout: Optional[float] = None) -> Optional[Batch]:
        """The next batch, or ``None`` after ``timeout`` seconds (or once closed)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._closed.is_set():
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return None
            item = self.next_update(remaining)
            if isinstance(item, Batch):
                return item
        return None

    def next_update(self, timeout: Optional[float] = None) -> Optional[Item]:
        """The next batch or event, or ``None`` after ``timeout`` seconds or once closed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while True:
                if self._items:
                    return self._items.popleft()
                if self._closed.is_set():
                    self._transport.close()  # in case close() raced with a connect
                    return None
                wait = 0.25
                if deadline is not None:
                    wait = min(wait, deadline - time.monotonic())
                    if wait <= 0:
                        return None
                self._step(wait)

    def updates(self) -> Iterator[Item]:
        """Yield batches and events, in arrival order, until :meth:`close`."""
        while not self._closed.is_set():
            item = self.next_update(None)
            if item is not None:
                yield item

    def batches(self) -> Iterator[Batch]:
        """Yield batches until :meth:`close`; events go to ``on_event`` only."""
        for item in self.updates():
            if isinstance(item, Batch):
                yield item

    def __iter__(self) -> Iterator[Batch]:
        return self.batches()

    def run(self, on_batch: Callable[[Batch], Any]) -> None:
        """Call ``on_batch`` with every batch until :meth:`close` (blocks)."""
        for batch in self.batches():
            on_batch(batch)

    def start(self, on_batch: Callable[[Batch], Any]) -> threading.Thread:
        """Run :meth:`run` on a daemon thread and return it; :meth:`close` stops it."""
        thread = threading.Thread(target=self.run, args=(on_batch,), daemon=True,
                                  name=f"relay-subscriber {self.url}")
        thread.start()
        return thread

    async def aupdates(self) -> AsyncIterator[Item]:
        """Async version of :meth:`updates`: the socket is read on an executor thread."""
        loop = asyncio.get_running_loop()
        while not self._closed.is_set():
            item = await loop.run_in_executor(None, self.next_update, 0.25)
            if item is not None:
                yield item

    async def aiter(self) -> AsyncIterator[Batch]:
        """Async iterator of batches (``async for batch in sub.aiter()``)."""
        async for item in self.aupdates():
            if isinstance(item, Batch):
                yield item

    def __aiter__(self) -> AsyncIterator[Batch]:
        return self.aiter()

    def close(self) -> None:
        """Stop: wakes a blocked reader, closes the connection. Idempotent, any thread."""
        if self._closed.is_set():
            return
        self._closed.set()
        self._transport.close()

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> Subscriber:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    # -- machinery -------------------------------------------------------------------------

    def _emit(self, event: Event) -> None:
        self._items.append(event)
        if self._on_event is not None:
            self._on_event(event)

    def _step(self, wait: float) -> None:
        """Connect if needed, then read and handle at most one message (waits <= ``wait``)."""
        if not self._opened:
            now = time.monotonic()
            if now < self._retry_at:
                self._closed.wait(min(wait, self._retry_at - now))
                return
            try:
                self._transport.connect()
            except TransportError as exc:
                self._schedule_retry(str(exc))
                return
            self._opened = True
            self._last_message = time.monotonic()
            self._silent = False
            if self._sync_connect:
                self._on_connected()
        try:
            msg = self._transport.recv(wait)
        except TransportError as exc:
            if not self._closed.is_set():
                self._drop(str(exc))
            return
        for kind, reason in self._transport.take_events():
            if kind == "connected":
                self._on_connected()
            elif self._connected:
                self._connected = False
                self._emit(Disconnected(self.url, reason))
        now = time.monotonic()
        if msg is None:
            self._watch_silence(now)
            return
        self._last_message = now
        self._silent = False
        self._attempt = 0  # a healthy connection resets the backoff
        self.stats.messages += 1
        self._handle(msg)

    def _on_connected(self) -> None:
        self._connected = True
        self.stats.connects += 1
        if not isinstance(self._transport, NatsSub):  # JetStream resumes mid-batch
            self._in_batch, self._parts = False, []
        self._emit(Connected(self.url))
        if self._snapshot and not (self._snapshot_loaded and isinstance(self._transport, NatsSub)):
            self._load_snapshot()

    def _schedule_retry(self, reason: str) -> None:
        delay = min(self._wait_max, self._wait0 * (2 ** min(self._attempt, 30)))
        self._attempt += 1
        self._retry_at = time.monotonic() + delay * self._rng.uniform(0.5, 1.0)

    def _drop(self, reason: str) -> None:
        self._transport.close()
        self._opened = False
        if self._connected:
            self._connected = False
            self._emit(Disconnected(self.url, reason))
        self._in_batch, self._parts = False, []
        self._schedule_retry(reason)

    def _watch_silence(self, now: float) -> None:
        timeout = self._heartbeat_timeout
        if timeout is None or self._silent:
            return
        quiet = now - self._last_message
        if quiet >= timeout:
            self._silent = True
            self.stats.silences += 1
            self._emit(Silence(round(quiet, 3)))
            if self._redial_on_silence:  # a half-open TCP connection heals by reconnecting
                self._drop(f"no message for {quiet:.1f} s")
                self._retry_at = 0.0

    def _load_snapshot(self) -> None:
        transport = self._transport
        try:
            if isinstance(transport, NatsSub):
                body = transport.take_snapshot()
                if body is None:
                    return
            else:
                assert self.snapshot_url is not None
                body = request(self.snapshot_url, SNAPSHOT_REQUEST,
                               timeout=self._connect_timeout, max_message_bytes=1 << 30,
                               tls=self._tls)
            batch = snapshot_batch(body, self._keep, columns=self._columns,
                                   numpy=self._numpy)
        except (TransportError, DecodeError, ValueError) as exc:
            self._emit(SnapshotFailed(str(exc)))
            return
        if batch.run_id is not None:
            self._note_run(batch.run_id)
        self._snap_run, self._snap_seq = batch.run_id, batch.last_seq
        if batch.run_id is not None and batch.last_seq is not None and (
                self._last_seq is None or batch.last_seq > self._last_seq):
            self._last_seq = batch.last_seq
        self._snapshot_loaded = True
        self._emit(SnapshotLoaded(len(batch), batch.last_seq, batch.run_id))
        self._items.append(batch)
        self.stats.batches += 1

    def _handle(self, msg: bytes) -> None:
        if msg.startswith(HEARTBEAT_PREFIX):
            try:
                beat = decode_heartbeat(msg)
            except (ValueError, UnicodeDecodeError) as exc:
                self._decode_failed(DecodeError(f"bad heartbeat: {exc}"))
                return
            self.last_heartbeat = beat
            run = beat.get("run_id")
            if isinstance(run, str):
                self._note_run(run)
            return
        if not msg.startswith(SPOT_PREFIX):
            return
        if msg == START:
            if self._parts:
                self._flush()  # the end tag was lost: deliver what arrived
            self._in_batch = True
        elif msg == END:
            if self._in_batch:
                self._flush()
            self._in_batch = False
        else:
            try:
                if self._columns:
                    part = Message.read(msg, _PREFIX_LEN, numpy=self._numpy)
                else:
                    part = Message.decode(msg, _PREFIX_LEN)
            except DecodeError as exc:
                self._decode_failed(exc)
                return
            if self._fresh(part) and self._in_batch:
                self._parts.append(part)

    def _decode_failed(self, exc: DecodeError) -> None:
        self.stats.decode_errors += 1
        if self._on_error is not None:
            self._on_error(exc)
        self._emit(DecodeFailed(exc))

    def _note_run(self, run_id: str) -> None:
        old = self._run_id
        if old is not None and old != run_id:
            self.stats.restarts += 1
            self._last_seq = None
            self._parts = []
            self._emit(Restart(old, run_id))
        self._run_id = run_id

    def _fresh(self, part: Message) -> bool:
        """Track sequence numbers; False for a message already seen or in the snapshot."""
        if part.run_id is not None:
            self._note_run(part.run_id)
        seq = part.seq
        if seq is None:
            return True
        if (self._snap_seq is not None and part.run_id == self._snap_run
                and seq <= self._snap_seq):
            return False
        last = self._last_seq
        if last is not None:
            if seq <= last:
                return False
            if seq != last + 1:
                self.stats.gaps += 1
                self.stats.missed += seq - last - 1
                self._emit(Gap(last + 1, seq, part.run_id))
        self._last_seq = seq
        return True

    def _flush(self) -> None:
        parts, self._parts = self._parts, []
        if not parts:
            return
        self.stats.batches += 1
        self._items.append(Batch.of_messages(parts, self._keep, records=not self._columns))
