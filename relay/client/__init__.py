"""Subscriber library for the relay's stream: stdlib + ``flatbuffers`` only.

Importing this package never loads pynng, h5py, structlog, xtquant or NumPy: the TCP
transport is pure Python, pynng is used only for ``ipc://`` addresses, and NumPy/pandas only
by :meth:`Batch.to_numpy` / :meth:`Batch.to_pandas`.

Example::

    from relay.client import Subscriber

    with Subscriber("tcp://127.0.0.1:9200", codes=["600000.SH"]) as sub:
        for batch in sub:
            for rec in batch.records:
                print(rec.symbol, rec.close)
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
from relay.client._snapshot import fetch_snapshot
from relay.client._subscriber import Stats, Subscriber
from relay.client._transport import TransportError
from relay.errors import DecodeError
from relay.records import SpotRecord

__all__ = [
    "Batch",
    "Connected",
    "DecodeError",
    "DecodeFailed",
    "Disconnected",
    "Event",
    "Gap",
    "Restart",
    "Silence",
    "SnapshotFailed",
    "SnapshotLoaded",
    "SpotList",
    "SpotRecord",
    "Stats",
    "Subscriber",
    "TransportError",
    "decode_spot_list",
    "fetch_snapshot",
]
