"""Reading a hikyuu data directory without hikyuu: bars in plain units.

>>> from relay.history import open_dir
>>> with open_dir("~/hikyuu-data") as hist:                      # doctest: +SKIP
...     bars = hist.bars("600000.SH", "day", start="2024-01-01")
...     df = hist.frame("600000.SH", "5min")                      # needs pandas

Units: prices in yuan, ``amount`` in yuan, ``volume`` in shares, ``datetime`` as NumPy
``datetime64[m]`` in China time (naive). The files store prices to 0.001 yuan, amount to
1,000 yuan and volume to lots of 100 shares, so that is the precision you get back.
"""

from __future__ import annotations

import os
import re
from types import TracebackType
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple, Type, Union

import numpy as np
import numpy.typing as npt

from relay.errors import HistoryError
from relay.history.store import PERIODS, HistoryFile, open_file, symbol_of, table_name

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["BARS_DTYPE", "HistoryDir", "open_dir", "parse_when", "to_plain"]

BARS_DTYPE = np.dtype([
    ("datetime", "M8[m]"),
    ("open", "f8"), ("high", "f8"), ("low", "f8"), ("close", "f8"),
    ("amount", "f8"), ("volume", "f8"),
])
"""Bars in plain units (see the module docstring)."""

When = Union[str, int, None]


def parse_when(value: When, *, end: bool = False) -> Optional[int]:
    """``"2024-01-02"``, ``"20240102"``, ``"2024-01-02 09:35"`` or ``202401020935`` -> 12 digits.

    A bare date as ``end`` means the whole day (``...2359``).

    Raises:
        ValueError: not one of those forms.
    """
    if value is None:
        return None
    text = re.sub(r"[-: T]", "", str(value).strip())
    if not re.fullmatch(r"\d{8}(\d{4})?", text, re.ASCII):
        raise ValueError(f"expected YYYY-MM-DD[ HH:MM] or YYYYMMDD[hhmm], got {value!r}")
    if len(text) == 8:
        text += "2359" if end else "0000"
    return int(text)


def to_plain(rows: npt.NDArray[np.void]) -> npt.NDArray[np.void]:
    """Raw hikyuu records -> :data:`BARS_DTYPE` (yuan, shares, ``datetime64[m]``)."""
    out = np.empty(rows.shape[0], dtype=BARS_DTYPE)
    dt = rows["datetime"].astype(np.int64)
    y = dt // 100_000_000
    mo = dt // 1_000_000 % 100
    d = dt // 10_000 % 100
    hh = dt // 100 % 100
    mm = dt % 100
    months = ((y - 1970) * 12 + mo - 1).astype("m8[M]")
    days = (np.datetime64("1970-01", "M") + months).astype("M8[D]") + (d - 1).astype("m8[D]")
    out["datetime"] = days.astype("M8[m]") + (hh * 60 + mm).astype("m8[m]")
    for plain, raw in (("open", "openPrice"), ("high", "highPrice"), ("low", "lowPrice"),
                       ("close", "closePrice")):
        out[plain] = rows[raw] / 1000.0
    out["amount"] = rows["transAmount"].astype(np.float64) * 1000.0
    out["volume"] = rows["transCount"].astype(np.float64) * 100.0
    return out


class HistoryDir:
    """A hikyuu data directory opened for reading. Use :func:`open_dir`."""

    def __init__(self, directory: Union[str, os.PathLike[str]]) -> None:
        self.directory = os.path.expanduser(os.fspath(directory))
        if not os.path.isdir(self.directory):
            raise HistoryError(self.directory, "no such directory")
        self._files: Dict[Tuple[str, str], Optional[HistoryFile]] = {}

    def __enter__(self) -> HistoryDir:
        return self

    def __exit__(self, exc_type: Optional[Type[BaseException]],
                 exc: Optional[BaseException], tb: Optional[TracebackType]) -> None:
        self.close()

    def close(self) -> None:
        """Close every file opened so far."""
        for file in self._files.values():
            if file is not None:
                file.close()
        self._files.clear()

    def _file(self, market: str, period: str) -> Optional[HistoryFile]:
        if period not in PERIODS:
            raise HistoryError(self.directory,
                               f"unknown period {period!r}; valid: {', '.join(PERIODS)}")
        key = (market.upper(), period)
        if key not in self._files:
            try:
                self._files[key] = open_file(self.directory, market, period)
            except HistoryError:
                self._files[key] = None
        return self._files[key]

    def symbols(self, period: str = "day", market: Optional[str] = None) -> List[str]:
        """Symbols (``600000.SH``) with a table in the ``period`` files."""
        out: List[str] = []
        for m in ([market.upper()] if market else ["SH", "SZ", "BJ"]):
            file = self._file(m, period)
            if file is not None:
                out.extend(symbol_of(name) for name in file.names())
        return out

    def raw(self, symbol: str, period: str = "day", start: When = None,
            end: When = None) -> npt.NDArray[np.void]:
        """Stored records of ``symbol`` (raw hikyuu integers), ``start <= datetime <= end``."""
        try:
            name = table_name(symbol)
        except ValueError as exc:
            raise HistoryError(self.directory, str(exc)) from exc
        file = self._file(name[:2], period)
        if file is None:
            from relay.history.store import BAR_DTYPE  # noqa: PLC0415

            return np.empty(0, dtype=BAR_DTYPE)
        return file.read(name, parse_when(start), parse_when(end, end=True))

    def bars(self, symbol: str, period: str = "day", start: When = None,
             end: When = None) -> npt.NDArray[np.void]:
        """Bars of ``symbol`` in plain units (:data:`BARS_DTYPE`).

        Args:
            symbol: ``600000.SH``.
            period: ``day``, ``1min`` or ``5min``.
            start: first date/time wanted (``2024-01-02``, ``20240102``, ``202401020935``).
            end: last date/time wanted, inclusive (a bare date means that whole day).

        Raises:
            HistoryError: bad symbol or period.
        """
        return to_plain(self.raw(symbol, period, start, end))

    def frame(self, symbol: str, period: str = "day", start: When = None,
              end: When = None) -> pd.DataFrame:
        """:meth:`bars` as a pandas DataFrame indexed by ``datetime`` (needs pandas)."""
        import pandas as pd  # noqa: PLC0415

        return pd.DataFrame(self.bars(symbol, period, start, end)).set_index("datetime")


def open_dir(directory: Union[str, os.PathLike[str]]) -> HistoryDir:
    """Open a hikyuu data directory (``~`` expanded) for reading.

    Raises:
        HistoryError: the directory does not exist.
    """
    return HistoryDir(directory)
