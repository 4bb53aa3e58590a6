"""The history service over real NNG sockets: catalogue, bars, paging edges, bad requests."""

from __future__ import annotations

import json
import socket
import struct
from pathlib import Path
from typing import Iterator, Tuple

import pynng
import pytest
from helpers import tcp_address
from history_helpers import simulator, write_history

from relay.client import HistoryRequestError, TransportError, fetch_bars, fetch_catalogue
from relay.client._history import (
    BAR_SIZE,
    KIND_SYNC,
    STATUS_CHANGED,
    STATUS_MISSING,
    checked,
    decode_reply,
    encode_request,
)
from relay.client._transport import Requester
from relay.history.service import HistoryService
from relay.history.store import open_file
from relay.sinks import SINKS

START = {"day": 20240401, "1min": 20240603, "5min": 20240528}
PAGE = 8192   # small pages: every 1min table takes several


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tuple[str, Path]]:
    """A history directory written through the store, served on a unique address."""
    directory = tmp_path_factory.mktemp("served")
    write_history(directory, simulator(), start=START, end=20240604)
    url = tcp_address()
    service = HistoryService(url, str(directory), max_reply_bytes=PAGE,
                             max_request_bytes=8192)
    service.start()
    try:
        yield url, directory
    finally:
        service.close()


def test_catalogue_lists_every_table_with_rows_and_range(served: Tuple[str, Path]) -> None:
    """fetch_catalogue gives each table's rows and first/last datetime as the store has them."""
    url, directory = served
    got = {(t.market, t.period, t.code): (t.rows, t.first, t.last)
           for t in fetch_catalogue(url)}
    want = {}
    for market in ("SH", "SZ"):
        for period in ("day", "1min", "5min"):
            with open_file(directory, market, period) as hf:
                for name, info in hf.tables().items():
                    want[(market, period, name[2:])] = info
    assert sorted(want) == sorted(got)
    for key, info in want.items():
        rows, first, last = got[key]
        assert (info.rows, info.first, info.last) == (
            rows, int(first.strftime("%Y%m%d%H%M")), int(last.strftime("%Y%m%d%H%M")))
    assert {"1min"} == {t.period for t in fetch_catalogue(url, periods=["1min"])}


def test_bars_equal_the_stored_records_across_pages(served: Tuple[str, Path]) -> None:
    """A 1min table of several pages arrives whole, byte for byte."""
    url, directory = served
    with open_file(directory, "SZ", "1min") as hf:
        name = hf.names()[0]
        stored = hf.read(name)
    assert stored.nbytes > 2 * PAGE
    bars = fetch_bars(url, f"{name[2:]}.SZ", "1min")
    assert stored.tobytes() == bars.raw


def test_bars_in_a_range_and_empty_ranges(served: Tuple[str, Path]) -> None:
    """start/end are inclusive; an end date includes its whole day; empty ranges are empty."""
    url, directory = served
    with open_file(directory, "SH", "5min") as hf:
        name = hf.names()[0]
        day = hf.read(name, 202406040000, 202406042359)
    bars = fetch_bars(url, f"{name[2:]}.SH", "5min", start="2024-06-04", end="2024-06-04")
    assert day.tobytes() == bars.raw
    assert 48 == len(bars)
    assert 0 == len(fetch_bars(url, f"{name[2:]}.SH", "5min", start="2024-06-05"))
    assert 0 == len(fetch_bars(url, f"{name[2:]}.SH", "5min", start="2024-06-04",
                               end="2024-06-03"))


def test_exactly_one_page(served: Tuple[str, Path]) -> None:
    """A range of exactly one page's bars comes in one reply that says no more."""
    url, _ = served
    per_page = (PAGE - 512 - 192) // BAR_SIZE   # the service keeps 704 bytes spare
    code = fetch_catalogue(url, markets=["SZ"], periods=["1min"])[0].symbol
    everything = fetch_bars(url, code, "1min")
    assert len(everything) > per_page
    last = everything.records[per_page - 1].datetime
    with Requester(url, timeout=10, max_message_bytes=1 << 20) as req:
        reply = decode_reply(req.request(encode_request(
            "bars", market="SZ", period="1min", code=code[:6], start=None,
            end=int(last.strftime("%Y%m%d%H%M")))))
    assert (per_page, False) == (reply.tables[0].records, reply.more)


def test_unknown_code_and_missing_file_are_refused(served: Tuple[str, Path]) -> None:
    """An unknown security or a file the relay lacks raises HistoryRequestError."""
    url, _ = served
    with pytest.raises(HistoryRequestError, match=r"no day bars of 999999\.SH"):
        fetch_bars(url, "999999.SH", "day")
    with pytest.raises(HistoryRequestError, match="no day file for BJ"):
        fetch_bars(url, "830799.BJ", "day")


def test_sync_request_reports_changed_and_missing(served: Tuple[str, Path]) -> None:
    """A wrong digest answers 'changed', an unknown table 'missing'; both are answered."""
    url, directory = served
    with open_file(directory, "SH", "day") as hf:
        code = hf.names()[0][2:]
    body = encode_request("sync", market="SH", period="day", tables=[
        [code, "data", 3, "0" * 32], ["999999", "week", 0, ""], [code, "data", 0, ""]])
    with Requester(url, timeout=10, max_message_bytes=1 << 20) as req:
        reply = checked(decode_reply(req.request(body)), KIND_SYNC)
    assert [STATUS_CHANGED, STATUS_MISSING, 0] == [t.status for t in reply.tables]
    assert 3 == reply.answered


@pytest.mark.parametrize("body", [
    b"", b"\x00\xff garbage", b"{}", json.dumps({"v": 1, "op": "bars"}).encode(),
    json.dumps({"v": 1, "op": "files", "pad": "x" * 9000}).encode(),   # over 8 KiB
])
def test_malformed_requests_get_error_replies_and_the_service_lives(
        served: Tuple[str, Path], body: bytes) -> None:
    """Each bad request gets an error reply; the next good one is answered."""
    url, _ = served
    with pynng.Req0(dial=url, recv_timeout=10_000, send_timeout=10_000) as req:
        req.send(body)
        reply = decode_reply(req.recv())
        assert (0, True) == (reply.kind, bool(reply.error))
        req.send(encode_request("files"))
        assert 6 == len(decode_reply(req.recv()).catalogues)


def test_huge_request_drops_the_connection_not_the_service(served: Tuple[str, Path]) -> None:
    """A request far over the limit is cut off by NNG itself; the service answers the next."""
    url, _ = served
    host, port = url[6:].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"\x00SP\x00\x00\x30\x00\x00")
        s.recv(8)
        s.sendall(struct.pack(">Q", 1 << 30) + b"\x80\x00\x00\x01" + b"x" * 65536)
        s.settimeout(10)
        with pytest.raises((ConnectionError, TransportError, OSError)):
            while s.recv(65536):
                pass
            raise ConnectionResetError("closed")
    assert fetch_catalogue(url, periods=["day"])


def test_history_service_is_a_registered_sink() -> None:
    """The relay starts the history service when history.address is on."""
    from relay.config import parse_config

    target, enabled = SINKS["history"]
    assert "relay.history.service:HistoryService" == target
    assert enabled(parse_config(None))
    assert not enabled(parse_config({"history": {"address": None}}))


def test_catalogue_pages_add_up(served: Tuple[str, Path]) -> None:
    """A catalogue split into many small pages equals the one-page catalogue."""
    url, directory = served
    small = tcp_address()
    service = HistoryService(small, str(directory), max_reply_bytes=700)   # 2 per page
    service.start()
    try:
        assert fetch_catalogue(url) == fetch_catalogue(small)
        with Requester(small, timeout=10, max_message_bytes=1 << 20) as req:
            reply = decode_reply(req.request(encode_request(
                "catalogue", market="SH", period="day", offset=0, codes_only=True)))
    finally:
        service.close()
    page = reply.catalogues[0]
    assert (2, [], True) == (len(page.codes), page.rows, page.total > 2)


def test_no_reply_exceeds_the_page_size(served: Tuple[str, Path]) -> None:
    """Sync replies over many tables, empty or full, and bars replies stay under the limit."""
    url, _ = served
    codes = [t.code for t in fetch_catalogue(url, markets=["SZ"], periods=["5min"])]
    sizes = []
    with Requester(url, timeout=10, max_message_bytes=1 << 20) as req:
        for have in (0, 10**6):   # every row asked for / every table "changed"
            tables = [[c, g, have, "0" * 32 if have else ""] for c in codes * 40
                      for g in ("data", "min15")]
            body = encode_request("sync", market="SZ", period="5min", tables=tables[:300])
            sizes.append(len(req.request(body)))
        body = encode_request("bars", market="SZ", period="5min", code=codes[0], start=None,
                              end=None)
        sizes.append(len(req.request(body)))
    assert all(size <= PAGE for size in sizes), sizes
