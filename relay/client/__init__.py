"""Subscriber library for the relay's stream: stdlib + ``flatbuffers`` only.

Importing this package never loads pynng, h5py, structlog, xtquant or NumPy: the TCP
transport is pure Python, pynng is used only for ``ipc://`` addresses, and NumPy/pandas only
by :meth:`Batch.to_numpy` / :meth:`Batch.to_pandas` and ``Subscriber(..., columns=True)``
(which reads the relay's messages as NumPy columns straight from their buffers; without
NumPy it falls back to the pure-Python decoder). The record decoder uses NumPy only if the
application has already loaded it.

Example::

    from relay.client import Subscriber

    with Subscriber("tcp://127.0.0.1:9200", codes=["600000.SH"]) as sub:
        for batch in sub:
            for rec in batch.records:
                print(rec.symbol, rec.close)

History (the relay's ``history.address``, by default the publish port + 2)::

    from relay.client import fetch_bars

    bars = fetch_bars("tcp://relay-host:9202", "600000.SH", "day", start="2024-01-01")
    frame = bars.to_pandas()
"""

from __future__ import annotations

from relay.client._batch import Batch
from relay.client._codec import SpotList, decode_spot_list
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
from relay.client._history import Bar, Bars, TableInfo, fetch_bars, fetch_catalogue
from relay.client._snapshot import fetch_snapshot
from relay.client._subscriber import Stats, Subscriber
from relay.client._transport import TransportError
from relay.errors import DecodeError, HistoryRequestError
from relay.records import SpotRecord

__all__ = [
    "Bar",
    "Bars",
    "Batch",
    "Connected",
    "DecodeError",
    "DecodeFailed",
    "Disconnected",
    "Event",
    "Gap",
    "HistoryRequestError",
    "Restart",
    "Silence",
    "SnapshotFailed",
    "SnapshotLoaded",
    "SpotList",
    "SpotRecord",
    "Stats",
    "Subscriber",
    "TableInfo",
    "TransportError",
    "decode_spot_list",
    "fetch_bars",
    "fetch_catalogue",
    "fetch_snapshot",
]
