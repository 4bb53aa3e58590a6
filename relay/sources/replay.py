"""Replay of a recorded day: republishes an HDF5 recording through the normal pipeline.

Each recorded batch is turned back into the tick dicts xtquant's callback would have
delivered (``{"600000.SH": {"time": ..., "lastPrice": ..., ...}}``), so replayed data goes
through the same normalise and encode stages as live data; a subscriber sees the same
records, grouped as originally published, and can tell a replay only by ``source``.

Units are inverted from what the file stores (``hikyuu``: amount x 10,000 and volume x 100
as ``pvolume``), choosing for each value the double that the normaliser maps back to exactly
the stored one. Batches are paced by their original publish times divided by ``speed``: a
very large speed (``1e9``) replays as fast as the relay can publish.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from typing import TYPE_CHECKING, Any, AsyncIterator, Dict, Mapping, Optional

import structlog

from relay.errors import SourceError
from relay.sources import Batch, Clock

if TYPE_CHECKING:
    from relay.config import Config, ReplayConfig
    from relay.recording import Columns, Day

__all__ = ["ReplaySource", "tick_dicts"]

_BOOKS = (("bidPrice", "bid"), ("bidVol", "bid_amount"), ("askPrice", "ask"),
          ("askVol", "ask_amount"))


def _invert(stored: float, factor: int) -> float:
    """A value ``x`` with ``x / factor == stored`` (the normaliser divides by ``factor``).

    Prefers a whole number (QMT sends whole shares), else the nearest double that works.
    """
    guess = stored * factor
    whole = round(guess)
    if whole / factor == stored:
        return whole
    if guess / factor == stored:
        return guess
    for direction in (math.inf, -math.inf):
        x = guess
        for _ in range(8):
            x = math.nextafter(x, direction)
            if x / factor == stored:
                return x
    return guess


def tick_dicts(cols: Columns, units: str) -> Batch:
    """Recorded columns -> a QMT callback batch that normalises back to the same records.

    Args:
        cols: one batch as :meth:`relay.recording.Day.batches` gives it.
        units: the units the file was recorded in (``hikyuu`` or ``raw``).
    """
    hikyuu = units == "hikyuu"
    depth = cols["depth"].tolist()
    books = [(key, cols[name].tolist()) for key, name in _BOOKS]
    time_ms = cols["time_ms"].tolist()
    status = cols["status"].tolist()
    trades = cols["trade_count"].tolist()
    amount = cols["amount"].tolist()
    volume = cols["volume"].tolist()
    out: Batch = {}
    for i, (code, market, dt, lc, op, hi, lo, last) in enumerate(zip(
            cols["code"].tolist(), cols["market"].tolist(), cols["datetime"].tolist(),
            cols["yesterday_close"].tolist(), cols["open"].tolist(), cols["high"].tolist(),
            cols["low"].tolist(), cols["close"].tolist())):
        shares = _invert(volume[i], 100) if hikyuu else volume[i]
        tick: Dict[str, Any] = {
            "lastPrice": last, "open": op, "high": hi, "low": lo, "lastClose": lc,
            "amount": _invert(amount[i], 10000) if hikyuu else amount[i],
            "volume": int(shares) // 100, "pvolume": shares,
        }
        if time_ms[i] >= 0:
            tick["time"] = time_ms[i]
        else:   # recorded from a producer that sent no time_ms: its datetime is China time
            tick["timetag"] = dt[:10].replace("-", "") + " " + dt[11:]
        if status[i] >= 0:
            tick["stockStatus"] = status[i]
        if trades[i] >= 0:
            tick["transactionNum"] = trades[i]
        d = depth[i]
        for key, values in books:
            tick[key] = values[i][:d]
        out[f"{code}.{market}"] = tick
    return out


class ReplaySource:
    """Plays a recorded day back as a :class:`~relay.sources.Source`.

    Args:
        config: the ``source.replay`` section (``file``, ``speed``, ``start_delay``).
        clock: wall clock in epoch seconds (default :func:`time.time`).
    """

    kind: str = "replay"

    def __init__(self, config: ReplayConfig, *, clock: Optional[Clock] = None) -> None:
        self._path = config.file
        self._speed = config.speed
        self._delay = config.start_delay
        self._clock: Clock = clock if clock is not None else time.time
        self._day: Optional[Day] = None
        self._names: Mapping[str, str] = {}
        self._stop: Optional[asyncio.Event] = None
        self._closed = False
        self._iterating = False
        self.batches_sent = 0

    @classmethod
    def from_config(cls, config: Config, *, clock: Optional[Clock] = None) -> ReplaySource:
        """Build the source from ``config.source.replay``."""
        return cls(config.source.replay, clock=clock)

    @property
    def names(self) -> Mapping[str, str]:
        """Security names as recorded."""
        return self._names

    @property
    def connected(self) -> bool:
        return self._day is not None and not self._closed

    async def start(self) -> None:
        """Open the recording.

        Raises:
            SourceError: no file configured, or it cannot be opened as a recording.
        """
        if not self._path:
            raise SourceError(self.kind, "no file to replay: set source.replay.file or --file")
        from relay.recording import open_day  # noqa: PLC0415 - h5py only when replaying

        try:
            self._day = open_day(self._path)
        except (OSError, ValueError) as exc:
            raise SourceError(self.kind, f"cannot open {self._path}: {exc}") from exc
        self._names = self._day.names
        self._stop = asyncio.Event()
        structlog.get_logger(__name__).info(
            "replay_started", file=self._path, day=self._day.day, records=len(self._day),
            speed=self._speed, securities=len(self._names))

    async def batches(self) -> AsyncIterator[Batch]:
        """Yield each recorded batch at its original time (scaled by ``speed``).

        Ends at the end of the file or when :meth:`close` is called.
        """
        day, stop = self._day, self._stop
        if day is None or stop is None:
            raise SourceError(self.kind, "batches() called before start()")
        self._iterating = True
        try:
            if self._delay and await self._wait(stop, self._delay):
                return
            wall0: Optional[float] = None
            pub0 = 0
            for batch in day.batches():
                if self._closed:
                    return
                if wall0 is None or batch.publish_time_ms < 0:
                    wall0, pub0 = self._clock(), max(batch.publish_time_ms, 0)
                else:
                    due = wall0 + (batch.publish_time_ms - pub0) / 1000.0 / self._speed
                    delay = due - self._clock()
                    if delay > 0.0005:
                        if await self._wait(stop, delay):
                            return
                    else:
                        await asyncio.sleep(0)
                self.batches_sent += 1
                yield tick_dicts(batch.columns, day.units)
            structlog.get_logger(__name__).info("replay_finished", batches=self.batches_sent)
        finally:
            self._iterating = False
            day.close()   # the file is read here only: close it here, not under our feet

    @staticmethod
    async def _wait(stop: asyncio.Event, seconds: float) -> bool:
        """Sleep ``seconds`` unless stopped first; True if stopped."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=seconds)
        return stop.is_set()

    async def close(self) -> None:
        """Stop replaying and close the file. Idempotent."""
        self._closed = True
        if self._stop is not None:
            self._stop.set()
        if self._day is not None and not self._iterating:
            self._day.close()

    def __repr__(self) -> str:
        return f"ReplaySource({self._path!r}, speed={self._speed})"
