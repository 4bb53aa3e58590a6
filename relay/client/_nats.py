"""NATS JetStream transport for the subscriber (``nats://`` and ``tls://`` URLs).

nats-py (pure Python, the optional ``nats`` extra) is imported only when such a URL is used.
It runs on a thread of its own with its own asyncio loop; what arrives is turned into the
messages the NNG stream carries (start tag, ``:spot:`` + ``SpotList``, end tag, heartbeats),
so :class:`~relay.client.Subscriber` handles both transports with the same code.

Over NATS the spot stream is a JetStream stream, read by an ordered consumer: after a
reconnect (or a server restart) it resumes at the next stored message, so nothing is lost
unless the bridge itself lost it. ``snapshot=True`` reads the latest record of every security
from the last-record stream and starts the stream consumer just after the message the
snapshot is complete to; ``replay_from=`` starts it at a time or after a relay sequence
number instead. The subject layout is :class:`relay.wire.NatsSubjects`.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as _dt
import json
import queue
import threading
from collections import deque
from typing import Any, Deque, Dict, List, Optional, Tuple, Union
from urllib.parse import parse_qs, urlsplit, urlunsplit

from relay.client._snapshot import encode_snapshot_reply
from relay.client._transport import TransportError, take_all
from relay.wire import (
    END,
    HDR_BATCH_FIRST,
    HDR_BATCH_LAST,
    HDR_RUN_ID,
    HDR_SEQ,
    HEARTBEAT_PREFIX,
    SPOT_PREFIX,
    START,
    NatsSubjects,
)

__all__ = ["NatsSub", "ReplayFrom", "is_nats_url", "parse_nats_url"]

ReplayFrom = Union[int, _dt.datetime]
"""A relay sequence number (messages after it) or a time (messages from it)."""

_CHINA = _dt.timezone(_dt.timedelta(hours=8))
_QUEUE_LIMIT = 100_000


def is_nats_url(url: str) -> bool:
    return url.startswith(("nats://", "tls://"))


def parse_nats_url(url: str) -> Tuple[List[str], NatsSubjects]:
    """``nats://HOST:PORT[,HOST:PORT...][?prefix=P&stream=S]`` -> servers and subjects.

    User and password may be given as ``nats://user:pass@HOST:PORT``.

    Raises:
        ValueError: not a nats:// or tls:// URL, or an unknown query parameter.
    """
    if not is_nats_url(url):
        raise ValueError(f"expected nats://HOST:PORT or tls://HOST:PORT, got {url!r}")
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    unknown = set(query) - {"prefix", "stream"}
    if unknown or not parts.netloc:
        raise ValueError(f"expected nats://HOST:PORT[?prefix=P&stream=S], got {url!r}")
    prefix = query.get("prefix", ["qmt"])[-1]
    stream = query.get("stream", ["QMT"])[-1]
    servers = [urlunsplit((parts.scheme, loc, "", "", "")) for loc in parts.netloc.split(",")]
    return servers, NatsSubjects(prefix, stream)


class NatsSub:
    """One subscriber's NATS connection, consumers and message queue.

    Args:
        url: see :func:`parse_nats_url`.
        snapshot: read the latest-record snapshot on the first connect.
        replay_from: where the stream consumer starts (``None``: new messages only).
        connect_timeout: seconds allowed for connecting and for the snapshot.
        idle_heartbeat: seconds of consumer idleness after which JetStream sends a heartbeat;
            two missed ones make nats-py recreate the consumer (after a server restart).
    """

    def __init__(self, url: str, *, snapshot: bool, replay_from: Optional[ReplayFrom],
                 connect_timeout: float, idle_heartbeat: float = 2.0) -> None:
        import nats  # noqa: PLC0415 - optional, only for nats:// URLs

        self._nats: Any = nats
        self._servers, self.subjects = parse_nats_url(url)
        self._snapshot = snapshot
        self._replay_from = replay_from
        self._timeout = connect_timeout
        self._idle = idle_heartbeat
        self._queue: queue.Queue[bytes] = queue.Queue()
        self._events: Deque[Tuple[str, str]] = deque()
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread: Optional[threading.Thread] = None
        self._nc: Any = None
        self._snapshot_body: Optional[bytes] = None
        self._caught_up = True
        self._connected_once = False
        self._restarted = False   # the consumer (re)starts: the first message opens a batch
        self.dropped = 0

    # -- the subscriber's side (its consuming thread) ----------------------------------------

    def connect(self) -> None:
        """Connect, read the snapshot if asked, start the consumers.

        Raises:
            TransportError: NATS unreachable, or the streams are missing or unreadable.
        """
        loop = self._ensure_loop()
        future = asyncio.run_coroutine_threadsafe(self._setup(), loop)
        try:
            future.result(self._timeout * 3 + 5)
        except TransportError:
            raise
        except Exception as exc:  # any failure to set up is a failed connect, retried
            future.cancel()
            raise TransportError(f"NATS {', '.join(self._servers)}: {exc!r}") from None

    def take_snapshot(self) -> Optional[bytes]:
        """The snapshot read at connect, as an NNG snapshot reply; ``None`` once taken."""
        body, self._snapshot_body = self._snapshot_body, None
        return body

    def recv(self, timeout: float) -> Optional[bytes]:
        try:
            return self._queue.get(timeout=max(0.0, timeout))
        except queue.Empty:
            return None

    def take_events(self) -> Deque[Tuple[str, str]]:
        return take_all(self._events)

    def close(self) -> None:
        loop, self._loop = self._loop, None
        if loop is None:
            return
        with contextlib.suppress(Exception):  # closing anyway
            asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(8)
        loop.call_soon_threadsafe(loop.stop)
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(5)

    # -- the transport's thread ------------------------------------------------------------------

    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            loop = asyncio.new_event_loop()
            self._loop = loop

            def run() -> None:
                asyncio.set_event_loop(loop)
                try:
                    loop.run_forever()
                finally:
                    loop.close()

            self._thread = threading.Thread(target=run, name="relay-subscriber-nats",
                                            daemon=True)
            self._thread.start()
        return self._loop

    async def _close_nc(self) -> None:
        nc, self._nc = self._nc, None
        if nc is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(nc.close(), 3)

    async def _shutdown(self) -> None:
        await self._close_nc()
        current = asyncio.current_task()
        tasks = [t for t in asyncio.all_tasks() if t is not current]
        for task in tasks:  # nats-py's consumer watchdogs outlive the connection
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _setup(self) -> None:
        await self._close_nc()
        nc = self._nats.NATS()
        try:
            await asyncio.wait_for(nc.connect(
                servers=self._servers, connect_timeout=self._timeout,
                max_reconnect_attempts=-1, reconnect_time_wait=0.5,
                disconnected_cb=self._on_disconnected, reconnected_cb=self._on_reconnected,
                error_cb=self._on_error), self._timeout + 1)
        except BaseException:
            with contextlib.suppress(Exception):
                await nc.close()
            raise
        self._nc = nc
        js = nc.jetstream(timeout=self._timeout)
        subj = self.subjects
        start: Optional[int] = None   # stream sequence to start at; None = new messages
        start_time: Optional[_dt.datetime] = None
        if self._snapshot and not self._connected_once:
            start = await self._read_snapshot(nc, js)
        elif isinstance(self._replay_from, _dt.datetime):
            when = self._replay_from
            start_time = when.replace(tzinfo=_CHINA) if when.tzinfo is None else when
        elif self._replay_from is not None:
            start = await self._find_after(nc, self._replay_from)
        await nc.subscribe(subj.heartbeat, cb=self._on_heartbeat)
        from nats.js.api import DeliverPolicy  # noqa: PLC0415 - optional

        config: Dict[str, Any] = {}
        if start is not None:
            policy = DeliverPolicy.BY_START_SEQUENCE
            config["opt_start_seq"] = start
            info = await nc.jsm().stream_info(subj.stream)
            self._caught_up = start > info.state.last_seq
        elif start_time is not None:
            policy = DeliverPolicy.BY_START_TIME
            config["opt_start_time"] = start_time
            self._caught_up = False
        else:
            policy = DeliverPolicy.NEW
        from nats.js.api import ConsumerConfig  # noqa: PLC0415 - optional

        self._restarted = True
        await js.subscribe(subj.spot, stream=subj.stream, cb=self._on_spot,
                           ordered_consumer=True, idle_heartbeat=self._idle,
                           deliver_policy=policy, config=ConsumerConfig(**config))
        self._connected_once = True

    async def _read_snapshot(self, nc: Any, js: Any) -> Optional[int]:
        """Read the marker and the latest records; returns where the stream continues."""
        subj = self.subjects
        jsm = nc.jsm()
        marker: Dict[str, Any] = {}
        try:
            raw = await jsm.get_last_msg(subj.last_stream, subj.snapshot)
            loaded = json.loads(raw.data or b"{}")
            marker = loaded if isinstance(loaded, dict) else {}
        except self._nats.js.errors.NotFoundError:
            pass
        info = await jsm.stream_info(subj.last_stream)
        latest: Dict[str, bytes] = {}   # subject -> message (the bridge may update it meanwhile)
        expected = max(0, info.state.messages - (1 if marker else 0))
        if expected:
            done = asyncio.Event()

            async def on_last(msg: Any) -> None:
                latest[msg.subject] = SPOT_PREFIX + msg.data
                if msg.metadata.num_pending == 0:
                    done.set()

            from nats.js.api import DeliverPolicy  # noqa: PLC0415 - optional

            sub = await js.subscribe(f"{subj.last}.>", stream=subj.last_stream, cb=on_last,
                                     ordered_consumer=True,
                                     deliver_policy=DeliverPolicy.LAST_PER_SUBJECT)
            try:
                await asyncio.wait_for(done.wait(), self._timeout * 2)
            finally:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
        messages = list(latest.values())
        seq, run_id = marker.get("seq"), marker.get("run_id")
        header = {"run_id": run_id if isinstance(run_id, str) else "",
                  "source": marker.get("source") or "",
                  "seq": seq if isinstance(seq, int) else None,
                  "records": len(messages), "time_ms": marker.get("time_ms")}
        self._snapshot_body = encode_snapshot_reply(header, messages)
        stream_seq = marker.get("stream_seq")
        return int(stream_seq) + 1 if isinstance(stream_seq, int) else None

    async def _find_after(self, nc: Any, after: int) -> int:
        """Stream sequence of the first message of the newest run with relay seq > ``after``."""
        subj, jsm = self.subjects, nc.jsm()
        info = await jsm.stream_info(subj.stream)
        first, last = int(info.state.first_seq), int(info.state.last_seq)
        if not info.state.messages:
            return last + 1
        newest = await jsm.get_last_msg(subj.stream, subj.spot)
        run = (newest.headers or {}).get(HDR_RUN_ID)
        lo, hi, best = first, last + 1, last + 1   # best: the answer found so far
        while lo < hi:
            mid = (lo + hi) // 2
            try:
                msg = await jsm.get_msg(subj.stream, mid, subject=subj.spot, next=True)
            except self._nats.js.errors.NotFoundError:
                hi = mid
                continue
            headers = msg.headers or {}
            if headers.get(HDR_RUN_ID) == run and int(headers.get(HDR_SEQ, 0)) > after:
                best = min(best, int(msg.seq))
                hi = mid
            else:
                lo = int(msg.seq) + 1
        return best

    async def _on_spot(self, msg: Any) -> None:
        headers = msg.headers or {}
        try:
            seq = int(headers[HDR_SEQ])
            first = int(headers.get(HDR_BATCH_FIRST, seq))
            last = int(headers.get(HDR_BATCH_LAST, seq))
        except (KeyError, ValueError):
            first = last = seq = -1  # no framing: deliver it as a batch of its own
        with contextlib.suppress(Exception):  # not a JetStream message (cannot happen here)
            self._caught_up = msg.metadata.num_pending == 0
        if seq in (first, -1) or self._restarted:
            self._restarted = False
            self._put(START)
        self._put(SPOT_PREFIX + msg.data)
        if seq in (last, -1):
            self._put(END)

    async def _on_heartbeat(self, msg: Any) -> None:
        if self._caught_up:  # replayed data must not be mixed with a live run's heartbeats
            self._put(HEARTBEAT_PREFIX + msg.data)

    def _put(self, message: bytes) -> None:
        if self._queue.qsize() >= _QUEUE_LIMIT:
            self.dropped += 1  # the subscriber sees a Gap
            return
        self._queue.put_nowait(message)

    async def _on_disconnected(self) -> None:
        self._events.append(("disconnected", "NATS connection lost"))

    async def _on_reconnected(self) -> None:
        self._events.append(("connected", ""))

    async def _on_error(self, exc: Exception) -> None:
        pass  # reconnects are nats-py's job; what they mean shows as events and gaps
