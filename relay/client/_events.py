"""What a subscriber reports besides batches: connection changes, gaps, restarts, silence."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from relay.errors import DecodeError

__all__ = [
    "Connected",
    "DecodeFailed",
    "Disconnected",
    "Event",
    "Gap",
    "Restart",
    "Silence",
    "SnapshotFailed",
    "SnapshotLoaded",
]


@dataclass(frozen=True)
class Connected:
    """A connection to the relay is up (``url`` is the stream address)."""

    url: str


@dataclass(frozen=True)
class Disconnected:
    """The connection dropped; the subscriber reconnects on its own."""

    url: str
    reason: str


@dataclass(frozen=True)
class Gap:
    """Messages were lost: sequence number ``got`` arrived where ``expected`` was due."""

    expected: int
    got: int
    run_id: Optional[str]

    @property
    def missed(self) -> int:
        """How many messages were lost."""
        return self.got - self.expected


@dataclass(frozen=True)
class Restart:
    """The relay restarted: its run id changed (sequence numbers start again from 1)."""

    old_run_id: str
    new_run_id: str


@dataclass(frozen=True)
class Silence:
    """Nothing (not even a heartbeat) arrived for ``seconds``; the subscriber reconnects."""

    seconds: float


@dataclass(frozen=True)
class DecodeFailed:
    """A message could not be decoded; it was skipped and the subscriber kept running."""

    error: DecodeError


@dataclass(frozen=True)
class SnapshotLoaded:
    """The snapshot was fetched: ``records`` securities as of stream sequence ``seq``."""

    records: int
    seq: Optional[int]
    run_id: Optional[str]


@dataclass(frozen=True)
class SnapshotFailed:
    """The snapshot could not be fetched; the stream is delivered without it."""

    reason: str


Event = Union[Connected, Disconnected, Gap, Restart, Silence, DecodeFailed, SnapshotLoaded,
              SnapshotFailed]
"""Every kind of event a :class:`~relay.client.Subscriber` reports."""
