"""The history protocol, relay side: request parsing and the ``Reply`` encoder.

Requests are JSON objects checked field by field here (a bad one raises
:class:`~relay.errors.HistoryRequestError`, which the service turns into an error reply); replies
are ``Reply`` FlatBuffers of ``schemas/bars.fbs`` built with ``flatbuffers.Builder``. The
bars and index entries of a table go into their vector as one block of bytes, exactly as
hikyuu stores them. The client side (decoder, requests) is :mod:`relay.client._history`.
"""

from __future__ import annotations

import array
import json
import re
import sys
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import flatbuffers

from relay.client._history import (
    BAR_SIZE,
    FILE_IDENTIFIER,
    INDEX_GROUPS,
    INDEX_SIZE,
    KIND_CATALOGUE,
    KIND_ERROR,
    KIND_FILE,
    KIND_FILES,
    MARKETS,
    PERIODS,
    PROTOCOL_VERSION,
    CatalogueSlice,
    TableSlice,
)
from relay.errors import HistoryRequestError

__all__ = [
    "BarsRequest",
    "CatalogueRequest",
    "FilesRequest",
    "Request",
    "SyncRequest",
    "catalogue_reply",
    "error_reply",
    "files_reply",
    "parse_request",
    "tables_reply",
]

_DC: Dict[str, Any] = {"frozen": True}
if sys.version_info >= (3, 10):
    _DC["slots"] = True

_CODE = re.compile(r"[0-9A-Za-z]{1,16}", re.ASCII)
_DIGEST = re.compile(r"[0-9a-f]{32}", re.ASCII)
_MAX_DATETIME = 999_912_312_359
MAX_SYNC_TABLES = 50_000
"""Tables one ``sync`` request may list (the client sends fewer per request)."""


@dataclass(**_DC)
class FilesRequest:
    """``{"op": "files"}``: the files served, without their tables."""


@dataclass(**_DC)
class CatalogueRequest:
    """``{"op": "catalogue", "market", "period", "offset", "codes_only"}``: one page of a
    file's tables (``codes_only``: names without rows and range, which cost two reads each)."""

    market: str
    period: str
    offset: int
    codes_only: bool = False


@dataclass(**_DC)
class BarsRequest:
    """``{"op": "bars", ...}``: bars of one table in ``[start, end]``, after ``after``."""

    market: str
    period: str
    code: str
    start: Optional[int]
    end: Optional[int]
    after: Optional[int]
    max_bytes: Optional[int]


@dataclass(**_DC)
class SyncRequest:
    """``{"op": "sync", ...}``: what a mirror lacks of each listed table.

    ``tables`` holds ``(code, group, rows the mirror has, digest of its last rows)``.
    """

    market: str
    period: str
    tables: Tuple[Tuple[str, str, int, str], ...]
    max_bytes: Optional[int]


@dataclass(**_DC)
class FileRequest:
    """``{"op": "file", "market", "period", "offset", "max_bytes"}``: the HDF5 file's own
    bytes from ``offset`` (a mirror that holds nothing of the file copies it whole)."""

    market: str
    period: str
    offset: int
    max_bytes: Optional[int]


Request = Union[FilesRequest, CatalogueRequest, BarsRequest, SyncRequest, FileRequest]

_KEYS: Mapping[str, Tuple[str, ...]] = {
    "files": (),
    "catalogue": ("market", "period", "offset", "codes_only"),
    "bars": ("market", "period", "code", "start", "end", "after", "max_bytes"),
    "sync": ("market", "period", "tables", "max_bytes"),
    "file": ("market", "period", "offset", "max_bytes"),
}


def parse_request(body: bytes, *, max_bytes: int) -> Request:
    """Check and parse one request.

    Raises:
        HistoryRequestError: too long, not JSON, an unknown version or operation, or a bad field
            (the reason names it).
    """
    if len(body) > max_bytes:
        raise HistoryRequestError(f"request of {len(body)} bytes exceeds the {max_bytes}-byte "
                                  "limit")
    try:
        data = json.loads(body.decode())
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise HistoryRequestError("request is not UTF-8 JSON") from None
    if not isinstance(data, dict):
        raise HistoryRequestError("request is not a JSON object")
    if data.get("v") != PROTOCOL_VERSION or type(data.get("v")) is not int:
        raise HistoryRequestError(f"unsupported protocol version {data.get('v')!r}; the relay "
                                  f"speaks {PROTOCOL_VERSION}")
    op = data.get("op")
    if not isinstance(op, str) or op not in _KEYS:
        raise HistoryRequestError(f"unknown op {op!r}; valid: {', '.join(_KEYS)}")
    unknown = sorted(set(data) - {"v", "op", *_KEYS[op]})
    if unknown:
        raise HistoryRequestError(f"unknown field {unknown[0]!r} in a {op} request")
    if op == "files":
        return FilesRequest()
    market = _market(data.get("market"))
    period = _period(data.get("period"))
    if op == "catalogue":
        codes_only = data.get("codes_only", False)
        if not isinstance(codes_only, bool):
            raise HistoryRequestError(f"codes_only must be true or false; got {codes_only!r}")
        return CatalogueRequest(market, period, _int(data, "offset", 0, 1 << 31) or 0,
                                codes_only)
    max_reply = _int(data, "max_bytes", 4096, 1 << 40)
    if op == "file":
        return FileRequest(market, period, _int(data, "offset", 0, 1 << 50) or 0, max_reply)
    if op == "bars":
        return BarsRequest(market, period, _code(data.get("code")),
                           _int(data, "start", 0, _MAX_DATETIME),
                           _int(data, "end", 0, _MAX_DATETIME),
                           _int(data, "after", 0, _MAX_DATETIME), max_reply)
    return SyncRequest(market, period, _tables(data.get("tables"), period), max_reply)


def _market(value: object) -> str:
    if not isinstance(value, str) or value not in MARKETS:
        raise HistoryRequestError(f"market must be one of {', '.join(MARKETS)}; got {value!r}")
    return value


def _period(value: object) -> str:
    if not isinstance(value, str) or value not in PERIODS:
        raise HistoryRequestError(f"period must be one of {', '.join(PERIODS)}; got {value!r}")
    return value


def _code(value: object) -> str:
    if not isinstance(value, str) or not _CODE.fullmatch(value):
        raise HistoryRequestError(f"code must be 1-16 letters or digits; got {value!r}")
    return value


def _int(data: Mapping[str, Any], key: str, low: int, high: int) -> Optional[int]:
    value = data.get(key)
    if value is None:
        return None
    if type(value) is not int or not low <= value <= high:
        raise HistoryRequestError(f"{key} must be an integer {low}..{high}; got {value!r}")
    return value


def _tables(value: object, period: str) -> Tuple[Tuple[str, str, int, str], ...]:
    if not isinstance(value, list):
        raise HistoryRequestError("tables must be a list of [code, group, rows, digest]")
    if len(value) > MAX_SYNC_TABLES:
        raise HistoryRequestError(f"{len(value)} tables in one request; at most {MAX_SYNC_TABLES}")
    groups = ("data", *INDEX_GROUPS[period])
    out = []
    for i, item in enumerate(value):
        if not isinstance(item, list) or len(item) != 4:
            raise HistoryRequestError(f"tables[{i}] must be [code, group, rows, digest]")
        code, group, rows, digest = item
        if group not in groups:
            raise HistoryRequestError(f"tables[{i}]: group must be one of {', '.join(groups)}; "
                               f"got {group!r}")
        if type(rows) is not int or not 0 <= rows < 1 << 40:
            raise HistoryRequestError(f"tables[{i}]: rows must be a non-negative integer")
        if not isinstance(digest, str) or not (digest == "" if rows == 0
                                               else _DIGEST.fullmatch(digest)):
            raise HistoryRequestError(f"tables[{i}]: digest must be 32 hex digits "
                                      "(\"\" for 0 rows)")
        out.append((_code(code), group, rows, digest))
    return tuple(out)


# -- replies ---------------------------------------------------------------------------------

def _raw_vector(b: flatbuffers.Builder, data: bytes, width: int, count: int,
                alignment: int) -> int:
    """A vector of ``count`` fixed-size elements already laid out little-endian in ``data``."""
    b.StartVector(width, count, alignment)
    b.head = b.head - len(data)  # the same block copy flatbuffers' CreateByteVector makes
    b.Bytes[b.head:b.head + len(data)] = data
    return int(b.EndVector())


def _strings(b: flatbuffers.Builder, items: Sequence[str]) -> int:
    refs = [b.CreateString(item) for item in items]
    b.StartVector(4, len(refs), 4)
    for ref in reversed(refs):
        b.PrependUOffsetTRelative(ref)
    return int(b.EndVector())


def _tables_vector(b: flatbuffers.Builder, refs: List[int]) -> int:
    b.StartVector(4, len(refs), 4)
    for ref in reversed(refs):
        b.PrependUOffsetTRelative(ref)
    return int(b.EndVector())


def _finish(b: flatbuffers.Builder, kind: int, *, error: int = 0, catalogues: int = 0,
            market: int = 0, period: int = 0, tables: int = 0, answered: int = 0,
            more: bool = False, generation: int = 0, blob: int = 0, size: int = 0) -> bytes:
    b.StartObject(12)
    b.PrependUint64Slot(9, generation, 0)
    b.PrependUint64Slot(11, size, 0)
    if blob:
        b.PrependUOffsetTRelativeSlot(10, blob, 0)
    if tables:
        b.PrependUOffsetTRelativeSlot(6, tables, 0)
    if catalogues:
        b.PrependUOffsetTRelativeSlot(3, catalogues, 0)
    for slot, ref in ((2, error), (4, market), (5, period)):
        if ref:
            b.PrependUOffsetTRelativeSlot(slot, ref, 0)
    b.PrependUint32Slot(7, answered, 0)
    b.PrependUint16Slot(0, PROTOCOL_VERSION, 0)
    b.PrependUint8Slot(1, kind, KIND_ERROR)
    b.PrependBoolSlot(8, more, False)
    b.Finish(b.EndObject(), file_identifier=FILE_IDENTIFIER)
    return bytes(b.Output())


def file_reply(market: str, period: str, blob: bytes, size: int, generation: int) -> bytes:
    """A ``file`` reply: ``blob`` (bytes of the file from the offset asked), the file's
    ``size`` and ``generation``."""
    b = flatbuffers.Builder(len(blob) + 256)
    ref = b.CreateByteVector(blob) if blob else 0
    return _finish(b, KIND_FILE, market=b.CreateString(market), period=b.CreateString(period),
                   blob=ref, size=size, generation=generation)


def error_reply(reason: str) -> bytes:
    """An error reply: the request is refused for ``reason``."""
    b = flatbuffers.Builder(128 + len(reason))
    return _finish(b, KIND_ERROR, error=b.CreateString(reason))


def _catalogue(b: flatbuffers.Builder, cat: CatalogueSlice) -> int:
    cols = [_raw_vector(b, _u64s(col), 8, len(col), 8) for col in (cat.rows, cat.first, cat.last)]
    codes = _strings(b, cat.codes)
    indexes = _strings(b, cat.indexes)
    market, period = b.CreateString(cat.market), b.CreateString(cat.period)
    b.StartObject(9)
    for slot, ref in zip((6, 7, 8), cols):
        b.PrependUOffsetTRelativeSlot(slot, ref, 0)
    b.PrependUOffsetTRelativeSlot(5, codes, 0)
    b.PrependUOffsetTRelativeSlot(2, indexes, 0)
    b.PrependUOffsetTRelativeSlot(0, market, 0)
    b.PrependUOffsetTRelativeSlot(1, period, 0)
    b.PrependUint32Slot(3, cat.total, 0)
    b.PrependUint32Slot(4, cat.offset, 0)
    return int(b.EndObject())


def _u64s(values: Sequence[int]) -> bytes:
    arr = array.array("Q", values)
    if sys.byteorder != "little":
        arr.byteswap()
    return arr.tobytes()


def files_reply(files: Sequence[CatalogueSlice]) -> bytes:
    """The files served (each slice without codes)."""
    b = flatbuffers.Builder(256 + 128 * len(files))
    refs = [_catalogue(b, f) for f in files]
    return _finish(b, KIND_FILES, catalogues=_tables_vector(b, refs))


def catalogue_reply(page: CatalogueSlice, generation: int) -> bytes:
    """One page of a file's catalogue."""
    b = flatbuffers.Builder(1024 + 48 * len(page.codes))
    ref = _catalogue(b, page)
    return _finish(b, KIND_CATALOGUE, catalogues=_tables_vector(b, [ref]),
                   generation=generation)


def tables_reply(kind: int, market: str, period: str, tables: Sequence[TableSlice], *,
                 answered: int = 0, more: bool = False, generation: int = 0) -> bytes:
    """A ``bars`` or ``sync`` reply carrying ``tables`` (their data as raw records)."""
    size = 256 + sum(len(t.data) + 96 for t in tables)
    b = flatbuffers.Builder(size)
    refs = []
    for t in tables:
        data_ref = 0
        if t.records:
            width = BAR_SIZE if t.group == "data" else INDEX_SIZE
            if len(t.data) != width * t.records:
                raise ValueError("table data is not count records")
            data_ref = _raw_vector(b, t.data, width, t.records, 8)
        code, group = b.CreateString(t.code), b.CreateString(t.group)
        tail = b.CreateString(t.tail) if t.tail else 0
        b.StartObject(10)
        b.PrependUint64Slot(3, t.rows, 0)
        b.PrependUint64Slot(4, t.start, 0)
        b.PrependUOffsetTRelativeSlot(0, code, 0)
        b.PrependUOffsetTRelativeSlot(1, group, 0)
        if data_ref:
            b.PrependUOffsetTRelativeSlot(5 if t.group == "data" else 6, data_ref, 0)
        if tail:
            b.PrependUOffsetTRelativeSlot(9, tail, 0)
        b.PrependUint8Slot(2, t.status, 0)
        b.PrependBoolSlot(7, t.complete, True)
        b.PrependBoolSlot(8, t.derived, False)
        refs.append(b.EndObject())
    vec = _tables_vector(b, refs)
    return _finish(b, kind, market=b.CreateString(market), period=b.CreateString(period),
                   tables=vec, answered=answered, more=more, generation=generation)
