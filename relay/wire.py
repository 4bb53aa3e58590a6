"""Wire-level constants and framing helpers (stdlib only; shared with the client).

Every spot batch goes out as ``START``, one or more ``SPOT_PREFIX + SpotList`` messages, then
``END``. Relay-only messages (heartbeats) use ``RELAY_PREFIX`` so that hikyuu, which subscribes
to ``:spot:`` only, never sees them.
"""

from __future__ import annotations

import json
from typing import Any, Dict

__all__ = [
    "END",
    "HEARTBEAT_PREFIX",
    "RELAY_PREFIX",
    "SPOT_PREFIX",
    "START",
    "decode_heartbeat",
    "encode_heartbeat",
]

SPOT_PREFIX = b":spot:"
START = b":spot:[start spot]"
END = b":spot:[end spot]"
RELAY_PREFIX = b":relay:"
HEARTBEAT_PREFIX = b":relay:heartbeat:"

PROTOCOL_VERSION = 1


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
