"""Market-data sources: one Protocol, three implementations picked by name.

A source yields batches shaped exactly like xtquant's ``subscribe_whole_quote`` callback
payload: ``{"600000.SH": {tick dict}, ...}``. Implementations satisfy :class:`Source`
structurally; :func:`create_source` imports the chosen one lazily, so xtquant is only
imported when the ``qmt`` source is picked.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, Dict, Mapping, Optional, Protocol

from relay._registry import load
from relay.errors import ConfigError

if TYPE_CHECKING:
    from relay.config import Config

__all__ = ["SOURCES", "Batch", "Clock", "Source", "create_source"]

Batch = Dict[str, Dict[str, Any]]
"""One push: QMT symbol -> raw tick dict."""

Clock = Callable[[], float]
"""Returns epoch seconds; sources take one so tests can drive time."""

SOURCES: Mapping[str, str] = {
    "simulator": "relay.sources.simulator:SimulatorSource",
    "qmt": "relay.sources.qmt:QmtSource",
    "replay": "relay.sources.replay:ReplaySource",
}


class Source(Protocol):
    """What the relay needs from a market-data source."""

    kind: str
    """Short name published in every message: ``"qmt"``, ``"simulator"`` or ``"replay"``."""

    @property
    def names(self) -> Mapping[str, str]:
        """Security names by QMT symbol (``"600000.SH" -> "浦发银行"``), for ``Spot.name``."""

    @property
    def connected(self) -> bool:
        """Whether the source currently has a live feed (reported in heartbeats)."""

    async def start(self) -> None:
        """Connect and subscribe. Raises :class:`~relay.errors.SourceError` if impossible."""

    def batches(self) -> AsyncIterator[Batch]:
        """Yield batches until :meth:`close` is called (then the iterator ends)."""

    async def close(self) -> None:
        """Release every subscription and connection. Idempotent."""


def create_source(config: Config, *, clock: Optional[Clock] = None) -> Source:
    """Build the source named by ``config.source.kind``.

    Raises:
        ConfigError: the name is not one of :data:`SOURCES`.
    """
    kind = config.source.kind
    target = SOURCES.get(kind)
    if target is None:
        valid = ", ".join(sorted(SOURCES))
        raise ConfigError("<config>", "source.kind", f"unknown source {kind!r}; valid: {valid}")
    factory: Any = load(target)
    source: Source = factory.from_config(config, clock=clock)
    return source
