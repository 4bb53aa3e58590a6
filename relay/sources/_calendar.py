"""China A-share trading calendar for the QMT source: trading days, watch windows, seed times.

Everything is computed in China time (UTC+8) explicitly, whatever the host's zone: xtquant's
own calendar helpers convert with the local zone and can shift dates by a day elsewhere.

A *trading day* is a weekday that is not a holiday. Holidays come from xtdata
(``get_holidays()``, 8-digit strings) when it offers them, merged with the list in config.
*Watch windows* are the stretches of a trading day in which a silent feed counts as a stall
(by default 09:15-09:25, 09:30-11:30 and 13:00-15:00: silence at 09:25-09:30, at lunch,
after the close and at night is normal).
"""

from __future__ import annotations

import re
from datetime import date, datetime, timedelta, timezone
from typing import FrozenSet, Iterable, List, Optional, Sequence, Set, Tuple

__all__ = [
    "CHINA_TZ",
    "TradingCalendar",
    "parse_day",
    "parse_hhmm",
    "parse_window",
]

CHINA_TZ = timezone(timedelta(hours=8), "CST")

_HHMM = re.compile(r"([01]\d|2[0-3]):([0-5]\d)", re.ASCII)


def parse_hhmm(text: str) -> int:
    """Seconds after China midnight of ``"HH:MM"``.

    Raises:
        ValueError: not ``HH:MM``.
    """
    match = _HHMM.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"expected HH:MM, got {text!r}")
    return int(match.group(1)) * 3600 + int(match.group(2)) * 60


def parse_window(text: str) -> Tuple[int, int]:
    """``"09:30-11:30"`` as seconds after China midnight ``(start, end)``.

    Raises:
        ValueError: not ``HH:MM-HH:MM`` with start before end.
    """
    first, sep, second = text.partition("-")
    if not sep:
        raise ValueError(f"expected HH:MM-HH:MM, got {text!r}")
    start, end = parse_hhmm(first), parse_hhmm(second)
    if start >= end:
        raise ValueError(f"window must start before it ends, got {text!r}")
    return start, end


def parse_day(text: str) -> date:
    """A holiday as ``YYYY-MM-DD`` (config) or ``YYYYMMDD`` (xtdata ``get_holidays``).

    Raises:
        ValueError: neither format, or not a real date.
    """
    tag = str(text).strip()
    if re.fullmatch(r"\d{8}", tag, re.ASCII):
        return date(int(tag[:4]), int(tag[4:6]), int(tag[6:]))
    return date.fromisoformat(tag)


class TradingCalendar:
    """Which instants are inside a watch window of a trading day, in China time.

    Args:
        windows: watch windows as ``(start, end)`` seconds after China midnight.
        holidays: non-trading weekdays.
    """

    def __init__(self, windows: Sequence[Tuple[int, int]],
                 holidays: Iterable[date] = ()) -> None:
        self._windows = tuple(sorted(windows))
        self._holidays: Set[date] = set(holidays)

    @property
    def holidays(self) -> FrozenSet[date]:
        """Every known holiday."""
        return frozenset(self._holidays)

    def add_holidays(self, days: Iterable[date]) -> int:
        """Merge more holidays (e.g. from xtdata); returns how many were new."""
        before = len(self._holidays)
        self._holidays.update(days)
        return len(self._holidays) - before

    @staticmethod
    def china_time(epoch: float) -> datetime:
        """The China wall-clock time of an epoch instant."""
        return datetime.fromtimestamp(epoch, CHINA_TZ)

    def is_trading_day(self, day: date) -> bool:
        """A weekday that is not a holiday."""
        return day.weekday() < 5 and day not in self._holidays

    def window_start(self, epoch: float) -> Optional[float]:
        """Epoch seconds at which the watch window containing ``epoch`` began, or None.

        None outside every window and on non-trading days.
        """
        now = self.china_time(epoch)
        if not self.is_trading_day(now.date()):
            return None
        second = now.hour * 3600 + now.minute * 60 + now.second + now.microsecond / 1e6
        for start, end in self._windows:
            if start <= second < end:
                return epoch - (second - start)
        return None

    def due(self, epoch: float, times: Sequence[int], done: Set[Tuple[date, int]]) -> List[int]:
        """Seed times (seconds after China midnight) passed today and not yet in ``done``.

        Marks the returned ones done. Non-trading days have none.
        """
        now = self.china_time(epoch)
        day = now.date()
        if not self.is_trading_day(day):
            return []
        second = now.hour * 3600 + now.minute * 60 + now.second
        due = [t for t in times if t <= second and (day, t) not in done]
        done.update((day, t) for t in due)
        return due
