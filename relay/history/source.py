"""History sources: one small Protocol, implementations picked by name.

A history source answers "bars of these securities, this period, these days" in plain
units; the importer turns them into hikyuu records and writes them. The ``qmt`` source talks
to MiniQMT through xtquant, the ``simulator`` source draws the simulated market's past.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Mapping, Optional, Protocol, Sequence

import numpy as np
import numpy.typing as npt

from relay.errors import ConfigError

if TYPE_CHECKING:
    from relay.config import Config

__all__ = ["HISTORY_SOURCES", "Bars", "Fetched", "HistorySource", "Progress",
           "create_history_source"]

HISTORY_SOURCES: Mapping[str, str] = {
    "simulator": "relay.history.simulator:SimulatorHistory",
    "qmt": "relay.history.qmt:QmtHistory",
}

Progress = Callable[[int], None]
"""Called with the number of securities a fetch has finished so far (any thread)."""


@dataclass(frozen=True)
class Bars:
    """Bars of one security in plain units, as the source gave them (not yet validated).

    ``datetime`` is ``YYYYMMDDhhmm`` (day bars ``YYYYMMDD0000``, minute bars their end
    minute); prices and ``amount`` in yuan; ``volume`` in lots (100 shares).
    """

    datetime: npt.NDArray[np.uint64]
    open: npt.NDArray[np.float64]
    high: npt.NDArray[np.float64]
    low: npt.NDArray[np.float64]
    close: npt.NDArray[np.float64]
    amount: npt.NDArray[np.float64]
    volume: npt.NDArray[np.float64]

    def __len__(self) -> int:
        return int(self.datetime.shape[0])


@dataclass
class Fetched:
    """What one fetch returned: bars by symbol and failed symbols with reasons."""

    bars: Dict[str, Bars] = field(default_factory=dict)
    failed: Dict[str, str] = field(default_factory=dict)


class HistorySource(Protocol):
    """What the importer needs from a history source."""

    kind: str
    """``"qmt"`` or ``"simulator"``."""

    def open(self) -> None:
        """Connect. Raises :class:`~relay.errors.HistoryUnavailableError` if impossible."""

    def universe(self, markets: Sequence[str]) -> List[str]:
        """Symbols (``600000.SH``) of the configured universe in ``markets``."""

    def last_day(self) -> int:
        """The last day (``YYYYMMDD``) the source can have bars for: the default end."""

    def fetch(self, period: str, symbols: Sequence[str], start: int, end: int,
              progress: Optional[Progress] = None) -> Fetched:
        """Bars of ``symbols`` for days ``start`` to ``end`` (``YYYYMMDD``, inclusive).

        A symbol with no bars in the range is absent from :attr:`Fetched.bars` and not
        failed; a symbol that could not be fetched is in :attr:`Fetched.failed`.
        """

    def close(self) -> None:
        """Release the connection. Idempotent."""


def create_history_source(config: Config, kind: Optional[str] = None,
                          **options: Any) -> HistorySource:
    """Build the history source ``kind`` (default: the config's ``source.kind``).

    Raises:
        ConfigError: unknown kind.
    """
    name = kind or config.source.kind
    if name == "replay":
        name = "simulator"   # a replay has no history: simulate one for the same universe
    target = HISTORY_SOURCES.get(name)
    if target is None:
        valid = ", ".join(sorted(HISTORY_SOURCES))
        raise ConfigError("<command line>", "--source",
                          f"unknown history source {name!r}; valid: {valid}")
    module_name, _, attr = target.partition(":")
    factory: Any = getattr(importlib.import_module(module_name), attr)
    source: HistorySource = factory.from_config(config, **options)
    return source
