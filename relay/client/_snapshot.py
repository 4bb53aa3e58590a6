"""The snapshot request/reply protocol (NNG REQ/REP), shared by the relay and the client.

Request: the 8 bytes ``b"snapshot"``. Reply::

    b":relay:snapshot:"                    16-byte tag
    u32 big-endian H, then H bytes         a JSON object: v, run_id, source, seq, records,
                                           messages, time_ms
    repeated `messages` times:
        u32 big-endian L, then L bytes     a ``:spot:`` + SpotList message, as on the stream

``seq`` is the sequence number of the last stream message whose records the snapshot
includes (0 before the first batch): a subscriber discards stream messages of the same
``run_id`` up to it. The ``seq`` inside snapshot messages only numbers the chunks (from 0).
Any other request is answered with ``b":relay:error:"`` and a reason.
"""

from __future__ import annotations

import json
import struct
from typing import Any, Dict, List, Optional, Sequence, Tuple

from relay.client._batch import Batch, CodeFilter, Message
from relay.client._transport import client_tls_context, parse_url, request
from relay.errors import DecodeError
from relay.records import SpotRecord
from relay.wire import SPOT_PREFIX

__all__ = [
    "ERROR_PREFIX",
    "SNAPSHOT_PREFIX",
    "SNAPSHOT_REQUEST",
    "CodeFilter",
    "decode_snapshot_reply",
    "default_snapshot_url",
    "encode_snapshot_reply",
    "fetch_snapshot",
]

SNAPSHOT_REQUEST = b"snapshot"
SNAPSHOT_PREFIX = b":relay:snapshot:"
ERROR_PREFIX = b":relay:error:"
DEFAULT_SNAPSHOT_PORT = 9201
_U32 = struct.Struct(">I")
_PREFIX_LEN = len(SPOT_PREFIX)


def encode_snapshot_reply(header: Dict[str, Any], messages: Sequence[bytes]) -> bytes:
    """Frame a snapshot reply (the relay side)."""
    head = json.dumps({**header, "v": 1, "messages": len(messages)},
                      separators=(",", ":"), ensure_ascii=False).encode()
    parts = [SNAPSHOT_PREFIX, _U32.pack(len(head)), head]
    for message in messages:
        parts += (_U32.pack(len(message)), message)
    return b"".join(parts)


def decode_snapshot_reply(body: bytes) -> Tuple[Dict[str, Any], List[bytes]]:
    """Split a snapshot reply into its header and its ``:spot:`` messages.

    Raises:
        DecodeError: an error reply, or a truncated or malformed one.
    """
    if body.startswith(ERROR_PREFIX):
        reason = body[len(ERROR_PREFIX):].decode(errors="replace")
        raise DecodeError(f"relay refused the snapshot request: {reason}")
    if not body.startswith(SNAPSHOT_PREFIX):
        raise DecodeError("not a snapshot reply")
    pos = len(SNAPSHOT_PREFIX)
    n = len(body)
    chunks: List[bytes] = []
    while pos < n:
        if pos + 4 > n:
            raise DecodeError("truncated snapshot reply", pos)
        (size,) = _U32.unpack_from(body, pos)
        if pos + 4 + size > n:
            raise DecodeError("snapshot chunk runs past the end", pos)
        chunks.append(body[pos + 4:pos + 4 + size])
        pos += 4 + size
    if not chunks:
        raise DecodeError("snapshot reply has no header")
    try:
        header = json.loads(chunks[0].decode())
    except (UnicodeDecodeError, ValueError):
        raise DecodeError("snapshot header is not JSON") from None
    if not isinstance(header, dict):
        raise DecodeError("snapshot header is not a JSON object")
    messages = chunks[1:]
    if header.get("messages", len(messages)) != len(messages):
        raise DecodeError("snapshot reply lost messages")
    for message in messages:
        if not message.startswith(SPOT_PREFIX):
            raise DecodeError("snapshot chunk is not a :spot: message")
    return header, messages


def default_snapshot_url(url: str) -> str:
    """The snapshot address that goes with a stream address by convention.

    ``tcp://HOST:PORT`` -> ``tcp://HOST:PORT+1`` (the relay's defaults are 9200 and 9201),
    the same for ``tls+tcp://``; ``ipc://...`` -> ``tcp://127.0.0.1:9201``.
    """
    scheme, host, port = parse_url(url)
    if scheme != "ipc":
        shown = f"[{host}]" if ":" in host else host
        return f"{scheme}://{shown}:{port + 1}"
    return f"tcp://127.0.0.1:{DEFAULT_SNAPSHOT_PORT}"


def fetch_snapshot(url: str, *, codes: Optional[Sequence[str]] = None, timeout: float = 10.0,
                   max_message_bytes: int = 1 << 30, ca: Optional[str] = None,
                   cert: Optional[str] = None, key: Optional[str] = None) -> Batch:
    """Fetch the relay's latest record of every security, in one request.

    Args:
        url: the relay's snapshot address (``publish.snapshot_address``).
        codes: keep only these securities (``"600000.SH"`` or ``"600000"``).
        timeout: seconds allowed to connect and for the reply.
        max_message_bytes: refuse larger replies.
        ca, cert, key: for ``tls+tcp://``: the CA file that verifies the relay (default: the
            system's trust store) and our client certificate and key, if the relay wants one.

    Returns:
        A :class:`Batch` with ``snapshot=True``; its ``first_seq`` and ``last_seq`` are the
        stream sequence number the snapshot is current to.

    Raises:
        TransportError: the snapshot service is unreachable or did not answer in time.
        DecodeError: the reply is malformed.
    """
    tls = client_tls_context(ca, cert, key) if url.startswith("tls+tcp://") else None
    body = request(url, SNAPSHOT_REQUEST, timeout=timeout, max_message_bytes=max_message_bytes,
                   tls=tls)
    return snapshot_batch(body, CodeFilter.of(codes))


def snapshot_batch(body: bytes, keep: Optional[CodeFilter], *, columns: bool = False,
                   numpy: bool = False) -> Batch:
    """The batch a snapshot reply holds.

    ``columns``: records built on demand only (as :meth:`Message.read`, NumPy columns with
    ``numpy``).
    """
    header, messages = decode_snapshot_reply(body)
    if columns:
        parts = [Message.read(message, _PREFIX_LEN, numpy=numpy) for message in messages]
    else:
        parts = [Message.decode(message, _PREFIX_LEN) for message in messages]
    records: Optional[List[SpotRecord]] = None
    if not columns:
        records = [rec for part in parts for rec in part.records()]
        if keep is not None:
            records = keep.filter(records)
    seq = header.get("seq")
    run_id = header.get("run_id")
    source = header.get("source")
    time_ms = header.get("time_ms")
    return Batch(
        records,
        seq if isinstance(seq, int) else None,
        seq if isinstance(seq, int) else None,
        run_id if isinstance(run_id, str) and run_id else None,  # "" = nothing published
        source if isinstance(source, str) and source else None,
        time_ms if isinstance(time_ms, int) else None,
        snapshot=True,
        messages=parts,
        keep=keep,
    )
