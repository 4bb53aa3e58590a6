"""The normalised record type shared by the relay and the subscriber library.

Stdlib only: :mod:`relay.client` imports this module, and must stay free of anything
compiled or heavy.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

__all__ = ["FIELDS", "HIKYUU_FIELDS", "SpotRecord"]


class SpotRecord(NamedTuple):
    """One security's spot (latest tick), in the units the relay publishes.

    The first fifteen fields mirror the hikyuu ``Spot`` table; the last three are the relay's
    appended fields and are ``None`` when a producer did not send them.

    Prices are in yuan (index points for indices). With the default ``hikyuu`` units,
    ``amount`` is in 10,000 yuan and ``volume`` in lots of 100 shares; with ``raw`` units they
    are yuan and shares. Book sizes (``bid_amount``/``ask_amount``) are passed through as QMT
    reports them.
    """

    market: str
    code: str
    name: str
    datetime: str
    yesterday_close: float
    open: float
    high: float
    low: float
    close: float
    amount: float
    volume: float
    bid: Tuple[float, ...]
    bid_amount: Tuple[float, ...]
    ask: Tuple[float, ...]
    ask_amount: Tuple[float, ...]
    time_ms: Optional[int] = None
    status: Optional[int] = None
    trade_count: Optional[int] = None

    @property
    def symbol(self) -> str:
        """The QMT-style symbol, e.g. ``"600000.SH"``."""
        return f"{self.code}.{self.market}"


FIELDS: Tuple[str, ...] = SpotRecord._fields
"""Every field name, in schema order."""

HIKYUU_FIELDS: Tuple[str, ...] = FIELDS[:15]
"""The fields a plain hikyuu producer sends."""
