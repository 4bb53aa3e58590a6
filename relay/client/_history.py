"""The history protocol (NNG REQ/REP), client side: requests, reply decoder, ``fetch_bars``.

Requests are compact JSON objects (``{"v": 1, "op": ...}``); every reply is one ``Reply``
FlatBuffer of ``schemas/bars.fbs`` (file identifier ``QRHB``). Bars travel as hikyuu's own
40-byte HDF5 record, so this module reads them with one ``struct`` call per bar and NumPy
(when asked for) lays a structured array over them without copying.

The decoder is stdlib only and bounds-checks every read: a truncated or malformed reply
raises :class:`~relay.errors.DecodeError`, and a lying length cannot make it allocate more
than the reply holds. The relay's side (encoder, request checks) is
:mod:`relay.history.protocol`.
"""

from __future__ import annotations

import datetime as _dt
import importlib
import json
import re
import struct
import time
from typing import Any, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

from relay.client._transport import Requester
from relay.errors import DecodeError, HistoryRequestError

__all__ = [
    "BAR_SIZE",
    "FILE_IDENTIFIER",
    "INDEX_GROUPS",
    "INDEX_SIZE",
    "PERIODS",
    "PROTOCOL_VERSION",
    "SYNC_WINDOW",
    "Bar",
    "Bars",
    "CatalogueSlice",
    "Reply",
    "TableInfo",
    "TableSlice",
    "decode_reply",
    "encode_request",
    "fetch_bars",
    "fetch_catalogue",
    "hikyuu_datetime",
]

PROTOCOL_VERSION = 1
FILE_IDENTIFIER = b"QRHB"
PERIODS = ("day", "1min", "5min")
MARKETS = ("SH", "SZ", "BJ")
INDEX_GROUPS: Dict[str, Tuple[str, ...]] = {
    "day": ("week", "month", "quarter", "halfyear", "year"),
    "1min": (),
    "5min": ("min15", "min30", "min60", "hour2"),
}
SYNC_WINDOW = 16
"""Rows before the requester's end that a ``sync`` request's digest covers."""

# Reply kinds and table statuses (schemas/bars.fbs enums).
KIND_ERROR, KIND_FILES, KIND_CATALOGUE, KIND_BARS, KIND_SYNC, KIND_FILE = range(6)
STATUS_OK, STATUS_CHANGED, STATUS_MISSING = range(3)

BAR_STRUCT = struct.Struct("<QIIIIQQ")
BAR_SIZE = BAR_STRUCT.size  # 40: hikyuu's record
INDEX_STRUCT = struct.Struct("<QQ")
INDEX_SIZE = INDEX_STRUCT.size

_u8 = struct.Struct("<B").unpack_from
_u16 = struct.Struct("<H").unpack_from
_u32 = struct.Struct("<I").unpack_from
_i32 = struct.Struct("<i").unpack_from
_u64 = struct.Struct("<Q").unpack_from
_CODE = re.compile(r"[0-9A-Za-z]{1,16}", re.ASCII)

Buffer = Union[bytes, bytearray, memoryview]
DateLike = Union[None, int, str, _dt.date, _dt.datetime]


# -- requests --------------------------------------------------------------------------------

def encode_request(op: str, **fields: Any) -> bytes:
    """One request: ``{"v": 1, "op": op, **fields}`` as compact UTF-8 JSON."""
    body = {"v": PROTOCOL_VERSION, "op": op, **fields}
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


# -- reply decoding --------------------------------------------------------------------------

class TableSlice(NamedTuple):
    """A slice of one table as received: ``data`` holds ``records`` raw records."""

    code: str
    group: str
    status: int
    rows: int
    start: int
    data: bytes
    records: int
    complete: bool
    derived: bool = False
    tail: str = ""


class CatalogueSlice(NamedTuple):
    """One file's tables (or a page of them); ``codes`` is empty in a ``files`` reply."""

    market: str
    period: str
    indexes: Tuple[str, ...]
    total: int
    offset: int
    codes: List[str]
    rows: List[int]
    first: List[int]
    last: List[int]


class Reply(NamedTuple):
    """A decoded ``Reply`` (``error`` is ``""`` unless ``kind`` is the error kind)."""

    version: int
    kind: int
    error: str
    catalogues: List[CatalogueSlice]
    market: str
    period: str
    tables: List[TableSlice]
    answered: int
    more: bool
    generation: int
    blob: bytes = b""       # kind file: bytes of the HDF5 file from the offset asked
    size: int = 0           # kind file: the file's size


class _Tab:
    """A bounds-checked view of one FlatBuffers table."""

    __slots__ = ("buf", "n", "offs", "pos", "size")

    def __init__(self, buf: bytes, pos: int) -> None:
        n = len(buf)
        if pos < 0 or pos + 4 > n:
            raise DecodeError("table outside the buffer", pos)
        vt = pos - _i32(buf, pos)[0]
        if vt < 0 or vt + 4 > n:
            raise DecodeError("vtable outside the buffer", pos)
        vsize, tsize = struct.unpack_from("<HH", buf, vt)
        if vsize < 4 or vsize & 1 or vt + vsize > n or tsize < 4 or pos + tsize > n:
            raise DecodeError("bad vtable", vt)
        self.buf, self.n, self.pos, self.size = buf, n, pos, tsize
        self.offs = struct.unpack_from(f"<{(vsize - 4) // 2}H", buf, vt + 4)

    def _at(self, fid: int, width: int) -> int:
        """Absolute position of field ``fid`` (0 when absent)."""
        if fid >= len(self.offs):
            return 0
        off = self.offs[fid]
        if not off:
            return 0
        if off < 4 or off + width > self.size:
            raise DecodeError(f"field {fid} outside its table", self.pos)
        at: int = self.pos + off
        return at

    def scalar(self, fid: int, unpack: Any, width: int, default: int) -> int:
        at = self._at(fid, width)
        if not at:
            return default
        value: int = unpack(self.buf, at)[0]
        return value

    def _ref(self, fid: int) -> int:
        at = self._at(fid, 4)
        if not at:
            return 0
        target: int = at + _u32(self.buf, at)[0]
        if target + 4 > self.n:
            raise DecodeError(f"field {fid} points outside the buffer", at)
        return target

    def string(self, fid: int) -> str:
        at = self._ref(fid)
        return "" if not at else _string(self.buf, at)

    def vector(self, fid: int, width: int) -> Tuple[int, int]:
        """``(position of element 0, count)``; ``(0, 0)`` when absent."""
        at = self._ref(fid)
        if not at:
            return 0, 0
        count = _u32(self.buf, at)[0]
        if at + 4 + count * width > self.n:
            raise DecodeError(f"vector field {fid} runs past the end", at)
        return at + 4, count

    def tables(self, fid: int) -> Iterator[_Tab]:
        start, count = self.vector(fid, 4)
        buf = self.buf
        for i in range(count):
            at = start + 4 * i
            yield _Tab(buf, at + _u32(buf, at)[0])

    def strings(self, fid: int) -> List[str]:
        start, count = self.vector(fid, 4)
        buf, n = self.buf, self.n
        out = []
        for i in range(count):
            at = start + 4 * i
            target = at + _u32(buf, at)[0]
            if target + 4 > n:
                raise DecodeError("string outside the buffer", at)
            out.append(_string(buf, target))
        return out

    def numbers(self, fid: int, code: str, width: int) -> List[int]:
        start, count = self.vector(fid, width)
        return list(struct.unpack_from(f"<{count}{code}", self.buf, start)) if count else []


def _string(buf: bytes, at: int) -> str:
    size = _u32(buf, at)[0]
    if at + 4 + size > len(buf):
        raise DecodeError("string runs past the end", at)
    try:
        return buf[at + 4:at + 4 + size].decode()
    except UnicodeDecodeError:
        raise DecodeError("string is not UTF-8", at) from None


def decode_reply(buf: Buffer) -> Reply:
    """Decode one history reply.

    Returns:
        The reply, error replies included (``kind`` 0, ``error`` set).

    Raises:
        DecodeError: not a history reply, an unknown version, or truncated/malformed.
    """
    data = buf if isinstance(buf, bytes) else bytes(buf)
    try:
        return _decode(data)
    except DecodeError:
        raise
    except (struct.error, ValueError) as exc:
        raise DecodeError(f"truncated or malformed history reply ({exc})") from None


def _decode(buf: bytes) -> Reply:
    if len(buf) < 12 or buf[4:8] != FILE_IDENTIFIER:
        raise DecodeError("not a history reply (no QRHB identifier)")
    root = _Tab(buf, _u32(buf, 0)[0])
    version = root.scalar(0, _u16, 2, 0)
    if version != PROTOCOL_VERSION:
        raise DecodeError(f"history protocol version {version}; this library speaks "
                          f"{PROTOCOL_VERSION}")
    catalogues = [
        CatalogueSlice(t.string(0), t.string(1), tuple(t.strings(2)), t.scalar(3, _u32, 4, 0),
                       t.scalar(4, _u32, 4, 0), t.strings(5), t.numbers(6, "Q", 8),
                       t.numbers(7, "Q", 8), t.numbers(8, "Q", 8))
        for t in root.tables(3)
    ]
    for cat in catalogues:
        if not len(cat.rows) == len(cat.first) == len(cat.last) or (
                cat.rows and len(cat.rows) != len(cat.codes)):
            raise DecodeError("catalogue columns differ in length")
    tables = []
    for t in root.tables(6):
        bars_at, bars = t.vector(5, BAR_SIZE)
        entries_at, entries = t.vector(6, INDEX_SIZE)
        if bars and entries:
            raise DecodeError("a table carries both bars and index entries")
        if entries:
            data = buf[entries_at:entries_at + entries * INDEX_SIZE]
        else:
            data = buf[bars_at:bars_at + bars * BAR_SIZE]
        tables.append(TableSlice(t.string(0), t.string(1), t.scalar(2, _u8, 1, STATUS_OK),
                                 t.scalar(3, _u64, 8, 0), t.scalar(4, _u64, 8, 0), data,
                                 bars or entries, bool(t.scalar(7, _u8, 1, 1)),
                                 bool(t.scalar(8, _u8, 1, 0)), t.string(9)))
    blob_at, blob = root.vector(10, 1)
    return Reply(version, root.scalar(1, _u8, 1, KIND_ERROR), root.string(2), catalogues,
                 root.string(4), root.string(5), tables, root.scalar(7, _u32, 4, 0),
                 bool(root.scalar(8, _u8, 1, 0)), root.scalar(9, _u64, 8, 0),
                 buf[blob_at:blob_at + blob], root.scalar(11, _u64, 8, 0))


def checked(reply: Reply, expected: int) -> Reply:
    """``reply`` if it is of kind ``expected``.

    Raises:
        HistoryRequestError: the relay refused the request (its reason), or answered another kind.
    """
    if reply.kind == KIND_ERROR:
        raise HistoryRequestError(reply.error or "unspecified error")
    if reply.kind != expected:
        raise DecodeError(f"reply of kind {reply.kind} to a request of kind {expected}")
    return reply


# -- datetimes -------------------------------------------------------------------------------

def hikyuu_datetime(value: DateLike, *, end: bool = False) -> Optional[int]:
    """A date or time as hikyuu's ``YYYYMMDDhhmm`` integer (China time).

    Accepts ``None``, a ``datetime.date`` / ``datetime.datetime`` (naive, China time), an
    integer or string ``YYYYMMDD`` / ``YYYYMMDDhhmm``, or a string ``YYYY-MM-DD[ HH:MM]``.
    A bare date means its first minute, or with ``end=True`` its last (so an end date
    includes that whole day).

    Raises:
        ValueError: anything else.
    """
    if value is None:
        return None
    if isinstance(value, _dt.datetime):
        return int(value.strftime("%Y%m%d%H%M"))
    if isinstance(value, _dt.date):
        return value.year * 100_000_000 + value.month * 1_000_000 + value.day * 10_000 + (
            2359 if end else 0)
    text = str(value).strip() if isinstance(value, (int, str)) else None
    if text is None or isinstance(value, bool):
        raise ValueError(f"expected a date or datetime, got {value!r}")
    digits = re.sub(r"[-: T]", "", text)
    if not digits.isdigit() or len(digits) not in (8, 12):
        raise ValueError(f"expected YYYYMMDD or YYYYMMDDhhmm, got {value!r}")
    try:
        _dt.datetime.strptime(digits, "%Y%m%d%H%M" if len(digits) == 12 else "%Y%m%d")
    except ValueError:
        raise ValueError(f"not a valid date or time: {value!r}") from None
    if len(digits) == 8:
        return int(digits) * 10_000 + (2359 if end else 0)
    return int(digits)


def _to_datetime(value: int) -> _dt.datetime:
    day, minute = divmod(value, 10_000)
    year, md = divmod(day, 10_000)
    month, dom = divmod(md, 100)
    hour, mins = divmod(minute, 100)
    return _dt.datetime(year, month, dom, hour, mins)


# -- Bars ------------------------------------------------------------------------------------

BAR_FIELDS = ("datetime", "open", "high", "low", "close", "amount", "volume")


class Bar(NamedTuple):
    """One bar in plain units."""

    datetime: _dt.datetime  # bar end (minute bars) or the day, naive China time
    open: float             # yuan
    high: float
    low: float
    close: float
    amount: float           # yuan
    volume: int             # shares


class Bars:
    """K-line bars of one security and period, as fetched from the relay.

    ``raw`` is hikyuu's records exactly as stored (40 bytes each: ``YYYYMMDDhhmm``, prices
    x 1000, amount / 1000 yuan, volume in lots); :attr:`records`, :attr:`columns`,
    :meth:`to_numpy` and :meth:`to_pandas` give plain units (yuan, shares), like
    ``relay.history``'s reader.

    Attributes:
        market, code, period: what was asked for (``"SH"``, ``"600000"``, ``"day"``).
        raw: the records' bytes.
    """

    __slots__ = ("_columns", "_records", "code", "market", "period", "raw")

    def __init__(self, market: str, code: str, period: str, raw: bytes) -> None:
        self.market = market
        self.code = code
        self.period = period
        self.raw = raw
        self._records: Optional[List[Bar]] = None
        self._columns: Optional[Dict[str, List[Any]]] = None

    def __len__(self) -> int:
        return len(self.raw) // BAR_SIZE

    def __iter__(self) -> Iterator[Bar]:
        return iter(self.records)

    def __repr__(self) -> str:
        return f"<Bars {self.code}.{self.market} {self.period}: {len(self)} bars>"

    @property
    def symbol(self) -> str:
        return f"{self.code}.{self.market}"

    @property
    def records(self) -> List[Bar]:
        """Every bar as a :class:`Bar` (built on first use)."""
        if self._records is None:
            new = tuple.__new__
            self._records = [
                new(Bar, (_to_datetime(d), o / 1000, h / 1000, lo / 1000, c / 1000,
                          a * 1000.0, v * 100))
                for d, o, h, lo, c, a, v in BAR_STRUCT.iter_unpack(self.raw)
            ]
        return self._records

    @property
    def columns(self) -> Dict[str, List[Any]]:
        """Every field as a list, in :data:`BAR_FIELDS` order; cached."""
        if self._columns is None:
            recs = self.records
            self._columns = (dict(zip(BAR_FIELDS, map(list, zip(*recs)))) if recs
                             else {name: [] for name in BAR_FIELDS})
        return self._columns

    def to_numpy(self) -> Dict[str, Any]:
        """The bars as NumPy arrays (needs NumPy): ``datetime`` as ``datetime64[m]``,
        prices and amount ``float64`` (yuan), volume ``int64`` (shares)."""
        np: Any = importlib.import_module("numpy")
        raw = np.frombuffer(self.raw, dtype=_numpy_dtype(np))
        day, minute = np.divmod(raw["datetime"].astype(np.int64), 10_000)
        year, md = np.divmod(day, 10_000)
        month, dom = np.divmod(md, 100)
        months = ((year - 1970) * 12 + month - 1).astype("datetime64[M]")
        minutes = (dom - 1) * 1440 + (minute // 100) * 60 + minute % 100
        return {
            "datetime": months.astype("datetime64[m]") + minutes.astype("timedelta64[m]"),
            "open": raw["open"] / 1000.0,
            "high": raw["high"] / 1000.0,
            "low": raw["low"] / 1000.0,
            "close": raw["close"] / 1000.0,
            "amount": raw["amount"] * 1000.0,
            "volume": raw["count"].astype(np.int64) * 100,
        }

    def to_pandas(self) -> Any:
        """The bars as a ``pandas.DataFrame`` indexed by ``datetime`` (needs pandas)."""
        pd: Any = importlib.import_module("pandas")
        arrays = self.to_numpy()
        index = pd.DatetimeIndex(arrays.pop("datetime"), name="datetime")
        return pd.DataFrame(arrays, index=index, copy=False)


def _numpy_dtype(np: Any) -> Any:
    return np.dtype([("datetime", "<u8"), ("open", "<u4"), ("high", "<u4"), ("low", "<u4"),
                     ("close", "<u4"), ("amount", "<u8"), ("count", "<u8")])


class TableInfo(NamedTuple):
    """One table of the relay's history directory (a catalogue entry)."""

    market: str
    code: str
    period: str
    rows: int
    first: Optional[_dt.datetime]  # None for an empty table
    last: Optional[_dt.datetime]

    @property
    def symbol(self) -> str:
        return f"{self.code}.{self.market}"


# -- fetching --------------------------------------------------------------------------------

def split_symbol(symbol: str) -> Tuple[str, str]:
    """``"600000.SH"`` -> ``("SH", "600000")``.

    Raises:
        ValueError: not CODE.MARKET.
    """
    code, dot, market = symbol.strip().partition(".")
    market = market.upper()
    if not dot or not _CODE.fullmatch(code) or market not in MARKETS:
        raise ValueError(f"expected CODE.MARKET such as 600000.SH, got {symbol!r}")
    return market, code


def _check_period(period: str) -> None:
    if period not in PERIODS:
        raise ValueError(f"period must be one of {', '.join(PERIODS)}; got {period!r}")


def fetch_bars(url: str, code: str, period: str = "day", start: DateLike = None,
               end: DateLike = None, *, timeout: float = 30.0,
               max_message_bytes: int = 64 << 20) -> Bars:
    """Fetch the bars of one security and period from the relay's history service.

    Args:
        url: the history service (``history.address``, by default ``tcp://HOST:P+2``).
        code: ``"600000.SH"``.
        period: ``"day"``, ``"1min"`` or ``"5min"``.
        start, end: inclusive bounds (see :func:`hikyuu_datetime`; an end date includes its
            whole day); ``None`` = from the first / to the last bar.
        timeout: seconds allowed to connect and for each reply.
        max_message_bytes: refuse larger replies (the relay pages well below its limit).

    Returns:
        The bars, possibly none.

    Raises:
        HistoryRequestError: the relay refused the request (unknown security, no such period).
        TransportError: the service is unreachable or did not answer in time.
        DecodeError: a malformed reply.
        ValueError: a bad symbol, period or date.
    """
    market, bare = split_symbol(code)
    _check_period(period)
    lo = hikyuu_datetime(start)
    hi = hikyuu_datetime(end, end=True)
    parts: List[bytes] = []
    after: Optional[int] = None
    with Requester(url, timeout=timeout, max_message_bytes=max_message_bytes) as req:
        while True:
            fields: Dict[str, Any] = {"market": market, "period": period, "code": bare,
                                      "start": lo, "end": hi}
            if after is not None:
                fields["after"] = after
            reply = checked(decode_reply(req.request(encode_request("bars", **fields))),
                            KIND_BARS)
            if len(reply.tables) != 1:
                raise DecodeError("a bars reply must carry exactly one table")
            table = reply.tables[0]
            if table.status == STATUS_MISSING:
                raise HistoryRequestError(f"no {period} bars of {bare}.{market} on the relay")
            if table.records and table.group != "data":
                raise DecodeError("a bars reply carries index entries")
            parts.append(table.data)
            if not reply.more:
                break
            if not table.records:
                raise DecodeError("a bars reply says more but carries no bar")
            after = BAR_STRUCT.unpack_from(table.data, len(table.data) - BAR_SIZE)[0]
    return Bars(market, bare, period, b"".join(parts))


def fetch_catalogue(url: str, *, markets: Optional[Sequence[str]] = None,
                    periods: Optional[Sequence[str]] = None, timeout: float = 30.0,
                    max_message_bytes: int = 64 << 20) -> List[TableInfo]:
    """Every table the relay's history directory holds (optionally some markets/periods).

    Returns:
        One :class:`TableInfo` per table, by market, period, then code.

    Raises:
        HistoryRequestError, TransportError, DecodeError: as :func:`fetch_bars`.
    """
    out: List[TableInfo] = []
    with Requester(url, timeout=timeout, max_message_bytes=max_message_bytes) as req:
        for cat in catalogue_pages(req, markets=markets, periods=periods):
            out.extend(
                TableInfo(cat.market, code, cat.period, rows,
                          _to_datetime(first) if rows else None,
                          _to_datetime(last) if rows else None)
                for code, rows, first, last in zip(cat.codes, cat.rows, cat.first, cat.last))
    return out


def list_files(req: Requester) -> List[CatalogueSlice]:
    """The files (market, period, index groups, table count) the relay serves."""
    return checked(decode_reply(req.request(encode_request("files"))), KIND_FILES).catalogues


def catalogue_pages(req: Requester, *, markets: Optional[Sequence[str]] = None,
                    periods: Optional[Sequence[str]] = None, codes_only: bool = False,
                    attempts: int = 5) -> Iterator[CatalogueSlice]:
    """Each file's whole catalogue, page by page merged into one slice per file.

    A file that changes between pages (an import running on the relay) is listed again from
    its start, up to ``attempts`` times. ``codes_only`` leaves ``rows``, ``first`` and
    ``last`` empty (the relay then reads no table).

    Raises:
        HistoryRequestError: the file kept changing, or the relay refused.
    """
    wanted_m = None if markets is None else {m.upper() for m in markets}
    wanted_p = None if periods is None else set(periods)
    for file in list_files(req):
        if (wanted_m is not None and file.market not in wanted_m) or (
                wanted_p is not None and file.period not in wanted_p):
            continue
        for _ in range(attempts):
            merged = _whole_catalogue(req, file.market, file.period, codes_only)
            if merged is not None:
                yield merged
                break
            time.sleep(0.5)   # an import is writing the file: give it a moment
        else:
            raise HistoryRequestError(f"the {file.market} {file.period} file kept changing while "
                               "its catalogue was read")


def _whole_catalogue(req: Requester, market: str, period: str,
                     codes_only: bool) -> Optional[CatalogueSlice]:
    codes: List[str] = []
    rows: List[int] = []
    first: List[int] = []
    last: List[int] = []
    generation: Optional[int] = None
    indexes: Tuple[str, ...] = ()
    total = 0
    while True:
        reply = decode_reply(req.request(encode_request(
            "catalogue", market=market, period=period, offset=len(codes),
            codes_only=codes_only)))
        if reply.error.startswith("busy"):
            return None   # the file changed between pages: list it again
        checked(reply, KIND_CATALOGUE)
        if len(reply.catalogues) != 1:
            raise DecodeError("a catalogue reply must carry exactly one catalogue")
        page = reply.catalogues[0]
        if generation is not None and reply.generation != generation:
            return None
        generation = reply.generation
        if page.offset != len(codes):
            raise DecodeError("catalogue page at the wrong offset")
        indexes, total = page.indexes, page.total
        codes += page.codes
        rows += page.rows
        first += page.first
        last += page.last
        if len(codes) >= total or not page.codes:
            break
    if len(codes) != total:
        raise DecodeError("catalogue pages do not add up to its total")
    return CatalogueSlice(market, period, indexes, total, 0, codes, rows, first, last)

