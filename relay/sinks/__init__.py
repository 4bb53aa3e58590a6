"""Sinks: consumers of every published batch (snapshot service, HDF5 recorder, tests).

A sink is a small class with ``start()``, ``write(batch)`` and ``close()``. ``write`` runs on
the relay's event loop right after a batch is published and must never block: a slow sink
owns a bounded queue and a writer of its own, counts what it drops, and logs once per
episode. :func:`sinks_from_config` builds the sinks the configuration asks for.

The implementations live beside this module (``snapshot.py``, ``recorder.py``, ...) and import
it for :class:`PublishedBatch`; it never imports them: :data:`SINKS` names each one as a
``"module:Class"`` string, imported only when the configuration enables it (so h5py loads
only when recording). Every sink class offers ``from_config(config, *, supervisor,
security)``: the relay's :class:`~relay.supervise.Supervisor` runs its threads, and
:class:`~relay.security.Security` opens any socket it listens on (either may be ``None``:
the sink then makes a private default).
"""

from __future__ import annotations

from typing import (
    TYPE_CHECKING,
    Callable,
    List,
    Mapping,
    Optional,
    Protocol,
    Tuple,
    runtime_checkable,
)

from relay._registry import load
from relay.config import service_addresses
from relay.records import SpotColumns, SpotRecord

if TYPE_CHECKING:
    from relay.config import Config
    from relay.normalise import BatchResult
    from relay.security import Security
    from relay.supervise import Supervisor

__all__ = ["SINKS", "HeartbeatSink", "PublishedBatch", "Sink", "sinks_from_config"]


class PublishedBatch:
    """What sinks receive for every published batch.

    Attributes:
        columns: the published records as columns, or ``None`` if their book depths differ.
        messages: the ``:spot:``-prefixed ``SpotList`` messages, in order.
        counts: how many records each message holds.
        first_seq: ``seq`` of ``messages[0]``; the others follow by one.
        publish_time_ms, run_id, source: as sent in every message.
    """

    __slots__ = ("_result", "counts", "first_seq", "messages", "publish_time_ms", "run_id",
                 "source")

    def __init__(self, result: BatchResult, messages: List[bytes], counts: List[int],
                 first_seq: int, publish_time_ms: int, run_id: str, source: str) -> None:
        self._result = result
        self.messages = messages
        self.counts = counts
        self.first_seq = first_seq
        self.publish_time_ms = publish_time_ms
        self.run_id = run_id
        self.source = source

    @property
    def records(self) -> List[SpotRecord]:
        """The published records, in order (built on first use)."""
        return self._result.records

    @property
    def columns(self) -> Optional[SpotColumns]:
        return self._result.columns


class Sink(Protocol):
    """A consumer of published batches (the HDF5 recorder, test collectors).

    ``write`` is called on the event loop and must not block: a slow sink owns a bounded
    queue and a writer of its own.
    """

    def start(self) -> None: ...

    def write(self, batch: PublishedBatch) -> None: ...

    def close(self) -> None: ...


@runtime_checkable
class HeartbeatSink(Sink, Protocol):
    """A sink that also forwards the relay's heartbeats (the NATS bridge).

    ``heartbeat`` gets every ``:relay:heartbeat:`` message the relay publishes, on the event
    loop, and must not block either.
    """

    def heartbeat(self, message: bytes) -> None: ...


SINKS: Mapping[str, Tuple[str, Callable[[Config], bool]]] = {
    # name: ("module:Class", enabled by this config?), in start order
    "snapshot": ("relay.sinks.snapshot:SnapshotService",
                 lambda config: service_addresses(config).snapshot is not None),
    "recorder": ("relay.sinks.recorder:Recorder", lambda config: config.recorder.enabled),
    "history": ("relay.history.service:HistoryService",
                lambda config: service_addresses(config).history is not None),
    "nats": ("relay.sinks.nats:NatsBridge", lambda config: bool(config.bridge.nats.url)),
}


def sinks_from_config(config: Config, *, supervisor: Optional[Supervisor] = None,
                      security: Optional[Security] = None) -> List[Sink]:
    """The sinks ``config`` enables, in the start order of :data:`SINKS`.

    Args:
        config: the relay's configuration.
        supervisor: runs the sinks' threads (each sink makes a private one without it).
        security: opens the sinks' listening sockets (allow-list, TLS).
    """
    return [load(target).from_config(config, supervisor=supervisor, security=security)
            for target, enabled in SINKS.values() if enabled(config)]
