"""History protocol: reply round trips, flatc's reading of them, hostile replies, requests."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
from typing import Any, List

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay._flatgen import load_history
from relay.client._history import (
    BAR_STRUCT,
    INDEX_STRUCT,
    KIND_BARS,
    KIND_CATALOGUE,
    KIND_FILE,
    KIND_SYNC,
    STATUS_CHANGED,
    Bars,
    CatalogueSlice,
    TableSlice,
    checked,
    decode_reply,
    encode_request,
    hikyuu_datetime,
)
from relay.errors import DecodeError, HistoryRequestError
from relay.history.protocol import (
    BarsRequest,
    CatalogueRequest,
    FileRequest,
    FilesRequest,
    SyncRequest,
    catalogue_reply,
    error_reply,
    file_reply,
    files_reply,
    parse_request,
    tables_reply,
)

BAR = st.tuples(st.integers(0, 2**64 - 1), *(st.integers(0, 2**32 - 1) for _ in range(4)),
                st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1))


def bars_bytes(rows: List[Any]) -> bytes:
    return b"".join(BAR_STRUCT.pack(*row) for row in rows)


@settings(max_examples=40, deadline=None)
@given(st.lists(BAR, max_size=50), st.lists(st.tuples(st.integers(0, 2**64 - 1),
                                                       st.integers(0, 2**64 - 1)), max_size=20),
       st.booleans(), st.integers(0, 2**64 - 1))
def test_tables_round_trip_and_flatc_reads_them(rows: List[Any], entries: List[Any], more: bool,
                                                generation: int) -> None:
    """decode(encode(tables)) == tables, and flatc's generated Python reads the same values."""
    data = TableSlice("600000", "data", 0, 99, 7, bars_bytes(rows), len(rows), True)
    index = TableSlice("600000", "week", STATUS_CHANGED, 5, 1,
                       b"".join(INDEX_STRUCT.pack(*e) for e in entries), len(entries), False)
    body = tables_reply(KIND_SYNC, "SZ", "5min", [data, index], answered=1, more=more,
                        generation=generation)
    reply = decode_reply(body)
    assert ([data, index], "SZ", "5min", 1, more, generation) == (
        reply.tables, reply.market, reply.period, reply.answered, reply.more, reply.generation)
    ref = load_history().Reply.GetRootAs(body, 0)
    assert 1 == ref.Version()
    got = ref.Tables(0)
    assert [tuple(row) for row in rows] == [
        (b.Datetime(), b.Open(), b.High(), b.Low(), b.Close(), b.Amount(), b.Count())
        for b in (got.Bars(i) for i in range(got.BarsLength()))]
    week = ref.Tables(1)
    assert (b"week", STATUS_CHANGED, False) == (week.Group(), week.Status(), week.Complete())
    assert [tuple(e) for e in entries] == [
        (e.Datetime(), e.Start()) for e in (week.Entries(i) for i in range(week.EntriesLength()))]


def test_catalogue_and_files_round_trip() -> None:
    """A catalogue page and a files reply decode to what was encoded."""
    page = CatalogueSlice("SH", "day", ("week", "month"), 3, 1, ["600001", "600002"], [10, 0],
                          [202401020000, 0], [202402020000, 0])
    assert [page] == checked(decode_reply(catalogue_reply(page, 5)), KIND_CATALOGUE).catalogues
    empty = page._replace(codes=[], rows=[], first=[], last=[])
    assert [empty, empty] == decode_reply(files_reply([empty, empty])).catalogues


def test_file_reply_round_trip_and_flatc_reads_it() -> None:
    """A file page decodes to its bytes, size and generation, in both decoders; a file
    request parses with its offset."""
    blob = bytes(range(256)) * 3
    body = file_reply("SZ", "day", blob, 10_000, 77)
    reply = checked(decode_reply(body), KIND_FILE)
    assert (blob, 10_000, 77, "SZ", "day") == (reply.blob, reply.size, reply.generation,
                                               reply.market, reply.period)
    ref = load_history().Reply.GetRootAs(body, 0)
    assert (blob, 10_000, 5) == (ref.BlobAsNumpy().tobytes(), ref.Size(), ref.Kind())
    assert b"" == decode_reply(file_reply("SZ", "day", b"", 0, 1)).blob
    assert FileRequest("BJ", "1min", 4096, 8192) == parse_request(encode_request(
        "file", market="BJ", period="1min", offset=4096, max_bytes=8192), max_bytes=1 << 20)


def test_error_reply_raises_history_error() -> None:
    """checked() turns an error reply into HistoryRequestError carrying the relay's reason."""
    with pytest.raises(HistoryRequestError, match="unknown op"):
        checked(decode_reply(error_reply("unknown op 'x'")), KIND_BARS)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_garbage_raises_decode_error_only(junk: bytes) -> None:
    """Random bytes, with or without the identifier, raise DecodeError and nothing else."""
    for body in (junk, junk[:4] + b"QRHB" + junk[8:]):
        with contextlib.suppress(DecodeError):
            decode_reply(body)


def test_every_truncation_and_bit_flip_is_safe() -> None:
    """Every prefix and every single-byte corruption of a real reply decodes or raises
    DecodeError."""
    rows = [(202401020000 + i, 1, 2, 3, 4, 5, 6) for i in range(3)]
    body = tables_reply(KIND_BARS, "SH", "day",
                        [TableSlice("600000", "data", 0, 3, 0, bars_bytes(rows), 3, True)])
    for cut in range(len(body)):
        with pytest.raises(DecodeError):
            decode_reply(body[:cut])
    for i in range(len(body)):
        for value in (0x00, 0xFF, 0x7F):
            with contextlib.suppress(DecodeError):
                decode_reply(body[:i] + bytes([value]) + body[i + 1:])


def test_bars_units_and_columns() -> None:
    """Bars convert hikyuu integers to yuan, shares and datetimes in every view."""
    raw = bars_bytes([(202401020000, 10005, 10100, 9900, 10000, 123456, 789),
                      (202401031500, 1, 2, 1, 2, 0, 0)])
    bars = Bars("SH", "600000", "day", raw)
    first = bars.records[0]
    assert (dt.datetime(2024, 1, 2), 10.005, 123_456_000.0, 78_900) == (
        first.datetime, first.open, first.amount, first.volume)
    assert [dt.datetime(2024, 1, 2), dt.datetime(2024, 1, 3, 15, 0)] == \
        bars.columns["datetime"]
    arrays = bars.to_numpy()
    assert ["2024-01-02T00:00", "2024-01-03T15:00"] == [str(v) for v in arrays["datetime"]]
    frame = bars.to_pandas()
    assert [10.005, 0.001] == list(frame["open"])
    assert [78_900, 0] == list(frame["volume"])
    assert 0 == len(Bars("SH", "600000", "day", b"").to_pandas())


def test_hikyuu_datetime_forms() -> None:
    """Dates and times in every accepted form become YYYYMMDDhhmm; an end date is inclusive."""
    assert 202401020000 == hikyuu_datetime("2024-01-02")
    assert 202401022359 == hikyuu_datetime(dt.date(2024, 1, 2), end=True)
    assert 202401021330 == hikyuu_datetime(dt.datetime(2024, 1, 2, 13, 30))
    assert 202401021330 == hikyuu_datetime("202401021330")
    assert 202401020000 == hikyuu_datetime(20240102)
    for bad in ("2024-13-01", "yesterday", "2024010", True):
        with pytest.raises(ValueError):
            hikyuu_datetime(bad)  # type: ignore[arg-type]


def test_requests_parse() -> None:
    """Each op parses into its request type with its fields checked."""
    lim = 1 << 20
    assert FilesRequest() == parse_request(encode_request("files"), max_bytes=lim)
    assert CatalogueRequest("SZ", "1min", 10) == parse_request(
        encode_request("catalogue", market="SZ", period="1min", offset=10), max_bytes=lim)
    assert BarsRequest("SH", "day", "600000", 1, None, 2, None) == parse_request(
        encode_request("bars", market="SH", period="day", code="600000", start=1, end=None,
                       after=2), max_bytes=lim)
    digest = "0" * 32
    assert SyncRequest("BJ", "5min", (("830799", "min15", 3, digest), ("830799", "data", 0, "")),
                       8192) == parse_request(encode_request(
                           "sync", market="BJ", period="5min", max_bytes=8192,
                           tables=[["830799", "min15", 3, digest], ["830799", "data", 0, ""]]),
                           max_bytes=lim)


@pytest.mark.parametrize(("body", "reason"), [
    (b"\xff\xfe", "not UTF-8 JSON"),
    (b"[1]", "not a JSON object"),
    (b'{"v":2,"op":"files"}', "version"),
    (b'{"v":1,"op":"drop"}', "unknown op"),
    (b'{"v":1,"op":"files","x":1}', "unknown field 'x'"),
    (b'{"v":1,"op":"catalogue","market":"sh","period":"day"}', "market"),
    (b'{"v":1,"op":"catalogue","market":"SH","period":"week"}', "period"),
    (b'{"v":1,"op":"bars","market":"SH","period":"day","code":"../x"}', "code"),
    (b'{"v":1,"op":"bars","market":"SH","period":"day","code":"1","start":-1}', "start"),
    (b'{"v":1,"op":"bars","market":"SH","period":"day","code":"1","end":1.5}', "end"),
    (b'{"v":1,"op":"sync","market":"SH","period":"1min","tables":[["1","week",0,""]]}',
     "group"),
    (b'{"v":1,"op":"sync","market":"SH","period":"day","tables":[["1","data",3,"zz"]]}',
     "digest"),
    (b'{"v":1,"op":"sync","market":"SH","period":"day","tables":{}}', "tables"),
    (b"[" * 100_000, "not UTF-8 JSON"),
])
def test_bad_requests_are_refused_with_a_reason(body: bytes, reason: str) -> None:
    """Every malformed request raises HistoryRequestError naming what is wrong."""
    with pytest.raises(HistoryRequestError, match=reason):
        parse_request(body, max_bytes=1 << 20)


def test_oversized_request_is_refused() -> None:
    """A request longer than the limit is refused before it is parsed."""
    body = json.dumps({"v": 1, "op": "files", "pad": "x" * 5000}).encode()
    with pytest.raises(HistoryRequestError, match="exceeds"):
        parse_request(body, max_bytes=4096)
