"""Subscriber library for the relay's stream: stdlib + ``flatbuffers`` only.

Importing this package never loads pynng, h5py, structlog or xtquant.
"""

from __future__ import annotations

from relay.client._codec import SpotList, decode_spot_list
from relay.client._subscriber import Batch, Subscriber
from relay.errors import DecodeError
from relay.records import SpotRecord

__all__ = ["Batch", "DecodeError", "SpotList", "SpotRecord", "Subscriber", "decode_spot_list"]
