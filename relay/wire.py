"""Wire-level constants and framing helpers (stdlib only; shared with the client).

Every spot batch goes out as ``START``, one or more ``SPOT_PREFIX + SpotList`` messages, then
``END``. Relay-only messages (heartbeats) use ``RELAY_PREFIX`` so that hikyuu, which subscribes
to ``:spot:`` only, never sees them.

Over NATS (the bridge, :mod:`relay.sinks.nats`) the same ``SpotList`` bytes travel without the
``:spot:`` prefix and without start/end tags: the headers of :class:`NatsSubjects` carry the
framing and the sequence numbers instead.
"""

from __future__ import annotations

import json
from typing import Any, Dict

__all__ = [
    "END",
    "HDR_BATCH_FIRST",
    "HDR_BATCH_LAST",
    "HDR_RECORDS",
    "HDR_RUN_ID",
    "HDR_SEQ",
    "HDR_SOURCE",
    "HEARTBEAT_PREFIX",
    "RELAY_PREFIX",
    "SPOT_PREFIX",
    "START",
    "NatsSubjects",
    "decode_heartbeat",
    "encode_heartbeat",
]

SPOT_PREFIX = b":spot:"
START = b":spot:[start spot]"
END = b":spot:[end spot]"
RELAY_PREFIX = b":relay:"
HEARTBEAT_PREFIX = b":relay:heartbeat:"

PROTOCOL_VERSION = 1

# NATS headers of every PREFIX.spot message.
HDR_RUN_ID = "Relay-Run-Id"
HDR_SEQ = "Relay-Seq"               # the message's seq, as inside the SpotList
HDR_BATCH_FIRST = "Relay-Batch-First"   # seq of the batch's first message (= a start tag)
HDR_BATCH_LAST = "Relay-Batch-Last"     # seq of the batch's last message (= an end tag)
HDR_SOURCE = "Relay-Source"
HDR_RECORDS = "Relay-Records"


class NatsSubjects:
    """The bridge's NATS subjects and JetStream streams under one prefix and stream name.

    ``PREFIX.spot``
        every ``SpotList`` message of the stream, in stream ``STREAM`` (kept ``max_age``).
    ``PREFIX.last.MARKET.CODE``
        the latest record of each security as a one-record ``SpotList`` (its ``seq`` and
        ``run_id`` are those of the stream message it came from), in stream ``STREAM_LAST``
        (one message per subject).
    ``PREFIX.snapshot``
        a JSON object saying up to which message the latest records are complete (``seq``,
        ``run_id``, ``stream_seq``: that message's sequence in ``STREAM``), in ``STREAM_LAST``.
    ``PREFIX.heartbeat``
        the relay's heartbeats, JSON as on NNG without the ``:relay:heartbeat:`` prefix (core
        NATS, not stored).
    """

    __slots__ = ("heartbeat", "last", "last_stream", "prefix", "snapshot", "spot", "stream")

    def __init__(self, prefix: str = "qmt", stream: str = "QMT") -> None:
        self.prefix = prefix
        self.spot = f"{prefix}.spot"
        self.last = f"{prefix}.last"
        self.snapshot = f"{prefix}.snapshot"
        self.heartbeat = f"{prefix}.heartbeat"
        self.stream = stream
        self.last_stream = f"{stream}_LAST"

    def last_subject(self, market: str, code: str) -> str:
        return f"{self.last}.{market}.{code}"


def encode_heartbeat(fields: Dict[str, Any]) -> bytes:
    """Frame a heartbeat: ``:relay:heartbeat:`` followed by a compact JSON object."""
    body = dict(fields)
    body.setdefault("v", PROTOCOL_VERSION)
    return HEARTBEAT_PREFIX + json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


def decode_heartbeat(msg: bytes) -> Dict[str, Any]:
    """Parse a heartbeat message.

    Raises:
        ValueError: if ``msg`` is not a heartbeat or its JSON is not an object.
    """
    if not msg.startswith(HEARTBEAT_PREFIX):
        raise ValueError("not a heartbeat message")
    body = json.loads(msg[len(HEARTBEAT_PREFIX):].decode())
    if not isinstance(body, dict):
        raise ValueError("heartbeat body is not a JSON object")
    return body
