"""The column route (NumPy straight from the buffer) against the record route."""

from __future__ import annotations

import subprocess
import sys
from typing import Any, Dict, List, Optional, Sequence

import flatbuffers
import numpy as np
import pytest
from client_helpers import Peer, messages, record, take, wait_joined
from helpers import tcp_address
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay._flatgen import load
from relay.client import Batch, DecodeError, DecodeFailed, Subscriber
from relay.client._batch import CodeFilter, Message, columns_of
from relay.client._columns import records_arrays
from relay.encode import SpotEncoder
from relay.records import SpotRecord
from relay.wire import SPOT_PREFIX

SPOT, SPOT_LIST = load()

floats = st.floats(width=64)  # NaN and infinities too: both routes copy the bits
names = st.text(max_size=10)  # any text: CJK, NUL, non-BMP; padded to the longest on the wire


@st.composite
def markets(draw: Any) -> List[SpotRecord]:
    """Records as a normaliser produces them, with book depth, units and optional fields
    drawn per batch: uniform batches, except where an optional field or a width differs."""
    depth = draw(st.integers(0, 6))
    book = st.lists(floats, min_size=depth, max_size=depth).map(tuple)
    optional = draw(st.sampled_from(["all", "some", "none"]))
    wide = draw(st.booleans())  # a datetime of another width: the encoder's record path

    def ints(lo: int, hi: int) -> Any:
        if optional == "all":
            return st.integers(lo, hi)
        if optional == "none":
            return st.none()
        return st.none() | st.integers(lo, hi)

    record = st.builds(
        SpotRecord,
        market=st.sampled_from(["SH", "SZ", "BJ"]),
        code=st.text("0123456789", min_size=6, max_size=6),
        name=names,
        datetime=st.sampled_from(["2024-12-02 13:55:54", "2024-12-02 09:30:00"]
                                 + (["2024-12-02 9:30"] if wide else [])),
        yesterday_close=floats, open=floats, high=floats, low=floats, close=floats,
        amount=floats, volume=floats,
        bid=book, bid_amount=book, ask=book, ask_amount=book,
        time_ms=ints(-(2**63), 2**63 - 1),
        status=ints(-(2**31), 2**31 - 1),
        trade_count=ints(-(2**63), 2**63 - 1),
    )
    return draw(st.lists(record, max_size=40))


def assert_same_arrays(expected: Dict[str, Any], actual: Dict[str, Any]) -> None:
    assert list(expected) == list(actual)
    for name, want in expected.items():
        got = actual[name]
        assert (name, want.dtype, want.shape) == (name, got.dtype, got.shape)
        assert want.tobytes() == got.tobytes(), name  # bit for bit: NaN, -0.0 included


def read_batch(msgs: Sequence[bytes], keep: Optional[CodeFilter] = None) -> Batch:
    return Batch.of_messages([Message.read(m, 6) for m in msgs], keep, records=False)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(markets(), st.sampled_from([4096, 8192, 512 * 1024]))
def test_column_route_equals_record_route(recs: List[SpotRecord], limit: int) -> None:
    """Every field, value type and message shape: NumPy columns, lists and records agree."""
    msgs = SpotEncoder("run", "simulator", limit).encode(recs, first_seq=7, publish_time_ms=9)
    batch = read_batch(msgs)
    assert batch._records is None and len(recs) == len(batch)  # nothing built so far
    uniform = batch._arrays() is not None
    assert_same_arrays(records_arrays(recs), batch.to_numpy())
    assert repr(columns_of(recs)) == repr(batch.columns)
    assert (batch._records is None) == uniform  # the column route builds no records
    assert repr(recs) == repr(batch.records)  # repr: NaN != NaN
    # the record-mode batch of the same messages takes the column route too
    decoded = Batch.of_messages([Message.decode(m, 6) for m in msgs])
    assert repr(recs) == repr(decoded.records)
    assert_same_arrays(records_arrays(recs), decoded.to_numpy())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(markets(), st.data())
def test_code_filter_keeps_the_same_records_on_both_routes(recs: List[SpotRecord],
                                                           data: Any) -> None:
    """A code filter selects the same records from the arrays, the lists and the records."""
    pool = ["600000", "000001.SZ"] + [r.code for r in recs] + [f"{r.code}.SH" for r in recs]
    codes = data.draw(st.lists(st.sampled_from(pool), max_size=5))
    keep = CodeFilter(codes)
    msgs = SpotEncoder("run", "simulator", 8192).encode(recs, first_seq=1, publish_time_ms=0)
    batch = read_batch(msgs, keep)
    kept = keep.filter(recs)
    assert len(kept) == len(batch)
    assert_same_arrays(records_arrays(kept), batch.to_numpy())
    assert repr(columns_of(kept)) == repr(batch.columns)
    assert repr(kept) == repr(batch.records)


def test_relay_messages_take_the_column_route() -> None:
    """The relay's own messages are uniform: read without building records."""
    recs = [SpotRecord("SZ", f"{i:06d}", "平安银行"[: i % 5], "2024-12-02 13:55:54",
                       *(float(i),) * 7, (1.0,) * 5, (2.0,) * 5, (3.0,) * 5, (4.0,) * 5,
                       i, 3, i * 2) for i in range(50)]
    msgs = SpotEncoder("run", "simulator", 4096).encode(recs, first_seq=1, publish_time_ms=0)
    assert len(msgs) > 1
    batch = read_batch(msgs)
    assert all(part.arrays() is not None for part in batch._messages)
    arrays = batch.to_numpy()
    assert ["", "平", "平安", "平安银", "平安银行"] == arrays["name"][:5].tolist()
    assert np.dtype("<U4") == arrays["name"].dtype
    assert (50, 5) == arrays["ask"].shape and np.int64 == arrays["status"].dtype
    assert batch._records is None
    frame = batch.to_pandas()
    assert "000003.SZ" == frame.index[3] and 3.0 == frame["close"].iloc[3]


def test_a_name_column_seen_before_decodes_the_same() -> None:
    """The memo of decoded UTF-8 columns: the second message with the same names (and one
    with the same bytes but other lengths) gives the same arrays as the records, writable."""
    def market(names: Sequence[str]) -> List[SpotRecord]:
        return [SpotRecord("SZ", f"{i:06d}", name, "2024-12-02 13:55:54", *(1.0,) * 7,
                           (), (), (), (), i, 3, i) for i, name in enumerate(names)]

    first = market(["平安银行", "万科A", "ab\x00"])
    other = market(["平安银行", "万科A", "ab"])  # same padded bytes, another length
    for recs in (first, first, other, first):
        msgs = SpotEncoder("run", "simulator", 1 << 20).encode(recs, first_seq=1,
                                                               publish_time_ms=0)
        batch = read_batch(msgs)
        arrays = batch.to_numpy()
        assert_same_arrays(records_arrays(recs), arrays)
        assert repr(recs) == repr(batch.records)
        arrays["name"][0] = "x"  # the caller's copy, not the memo's


def build_generated(recs: Sequence[SpotRecord]) -> bytes:
    """A SpotList built the ordinary way (flatbuffers.Builder + generated builders)."""
    b = flatbuffers.Builder(0)
    offsets = []
    for r in recs:
        strs = [b.CreateString(x) for x in (r.market, r.code, r.name, r.datetime)]
        vecs = []
        for start, values in ((SPOT.StartBidVector, r.bid),
                              (SPOT.StartBidAmountVector, r.bid_amount),
                              (SPOT.StartAskVector, r.ask),
                              (SPOT.StartAskAmountVector, r.ask_amount)):
            start(b, len(values))
            for v in reversed(values):
                b.PrependFloat64(v)
            vecs.append(b.EndVector())
        SPOT.Start(b)
        for add, value in zip((SPOT.AddMarket, SPOT.AddCode, SPOT.AddName, SPOT.AddDatetime),
                              strs):
            add(b, value)
        for add, value in zip((SPOT.AddYesterdayClose, SPOT.AddOpen, SPOT.AddHigh, SPOT.AddLow,
                               SPOT.AddClose, SPOT.AddAmount, SPOT.AddVolume), r[4:11]):
            add(b, value)
        for add, value in zip((SPOT.AddBid, SPOT.AddBidAmount, SPOT.AddAsk, SPOT.AddAskAmount),
                              vecs):
            add(b, value)
        if r.time_ms is not None:
            SPOT.AddTimeMs(b, r.time_ms)
        offsets.append(SPOT.End(b))
    SPOT_LIST.StartSpotVector(b, len(offsets))
    for off in reversed(offsets):
        b.PrependUOffsetTRelative(off)
    vec = b.EndVector()
    SPOT_LIST.Start(b)
    SPOT_LIST.AddSpot(b, vec)
    b.Finish(SPOT_LIST.End(b))
    return b"\0" * 6 + bytes(b.Output())


def test_builder_made_buffers_fall_back_with_identical_results() -> None:
    """A Builder-made (non-uniform) message goes through the records, with the same arrays."""
    recs = [SpotRecord("SH", "600000", "浦发银行", "2024-12-02 13:55:54", *(1.5,) * 7,
                       (1.0, 2.0), (3.0, 4.0), (5.0,), (), 1733118954000, None, None),
            SpotRecord("SZ", "000001", "平安", "2024-12-02 13:55:55", *(2.5,) * 7,
                       (), (), (), (), None, None, None)]
    msg = build_generated(recs)
    batch = read_batch([msg])
    assert batch._messages[0].arrays() is None  # not uniform: the column route declines
    arrays = batch.to_numpy()
    assert_same_arrays(records_arrays(recs), arrays)
    assert [1733118954000.0] == arrays["time_ms"][:1].tolist() and np.isnan(arrays["time_ms"][1])
    assert np.isnan(arrays["bid"][1]).all() and 2.0 == arrays["bid"][0][1]
    assert "status" not in arrays
    assert recs == batch.records


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(markets().filter(bool), st.data())
def test_truncated_or_corrupt_messages_raise_decode_error(recs: List[SpotRecord],
                                                          data: Any) -> None:
    """A cut or flipped byte: DecodeError on arrival, or the same result on both routes."""
    (msg,) = SpotEncoder("run", "simulator", 1 << 20).encode(recs, first_seq=1,
                                                             publish_time_ms=0)
    buf = bytearray(msg)
    if data.draw(st.booleans()):
        del buf[data.draw(st.integers(6, len(buf) - 1)):]
    else:
        for _ in range(data.draw(st.integers(1, 3))):
            at = data.draw(st.integers(6, len(buf) - 1))
            buf[at] ^= data.draw(st.integers(1, 255))
    outcomes: List[Any] = []
    for read in (Message.read, Message.decode):
        try:
            batch = Batch.of_messages([read(bytes(buf), 6)], records=False)
            outcomes.append((batch.to_numpy(), batch.records))
        except DecodeError:
            outcomes.append("DecodeError")
    if "DecodeError" in outcomes:
        assert ["DecodeError", "DecodeError"] == outcomes
    else:
        (arrays, records), (arrays2, records2) = outcomes
        assert repr(records) == repr(records2)  # repr: a flipped byte may make a NaN
        assert_same_arrays(arrays2, arrays)


def test_columns_without_numpy_still_give_lists() -> None:
    """Without NumPy, columns mode reads with the pure-Python decoder: batch.columns works."""
    code = """
import sys
sys.modules["numpy"] = None  # unimportable
from relay.client._batch import Batch, Message, numpy_available
from relay.records import SpotRecord
assert not numpy_available()
msg = bytes.fromhex(sys.argv[1])
batch = Batch.of_messages([Message.read(msg, 6, numpy=numpy_available())], records=False)
print(batch.columns["close"], batch.columns["bid"][0], batch._records is None, len(batch))
"""
    recs = [SpotRecord("SH", f"60000{i}", "x", "2024-12-02 13:55:54", *(float(i),) * 7,
                       (1.0,), (2.0,), (3.0,), (4.0,), 1, 2, 3) for i in range(3)]
    (msg,) = SpotEncoder("run", "simulator").encode(recs, first_seq=1, publish_time_ms=0)
    out = subprocess.run([sys.executable, "-c", code, msg.hex()], capture_output=True,
                         text=True, check=True)
    assert "[0.0, 1.0, 2.0] (1.0,) True 3" == out.stdout.strip()


def test_empty_batch_arrays_agree() -> None:
    """No records at all: the same empty arrays on both routes."""
    msgs = SpotEncoder("run", "simulator").encode([], first_seq=1, publish_time_ms=0)
    batch = read_batch(msgs)
    assert 0 == len(batch)
    assert_same_arrays(records_arrays([]), batch.to_numpy())
    assert_same_arrays(records_arrays([]), Batch([], 1, 1, None, None, None).to_numpy())
    assert 0 == len(batch.to_pandas())


def test_pandas_frames_agree() -> None:
    """to_pandas gives the same frame from the column route and from records."""
    pd = pytest.importorskip("pandas")
    recs = [SpotRecord("SH", f"{600000 + i}", f"名{i}", "2024-12-02 13:55:54",
                       *(i + 0.5,) * 7, (1.0,) * 5, (2.0,) * 5, (3.0,) * 5, (4.0,) * 5,
                       i, 3, 7) for i in range(20)]
    msgs = SpotEncoder("run", "simulator", 4096).encode(recs, first_seq=1, publish_time_ms=0)
    pd.testing.assert_frame_equal(Batch(recs, 1, 1, None, None, None).to_pandas(),
                                  read_batch(msgs).to_pandas())


def test_subscriber_columns_mode_over_pure_python_tcp() -> None:
    """Subscriber(columns=True): batches filtered by code, garbage skipped, records lazily."""
    url = tcp_address()
    peer = Peer(url)
    recs = [record(f"{600000 + i}", close=10.0 + i) for i in range(300)]
    try:
        with Subscriber(url, columns=True, codes=["600007.SH", "600299"],
                        heartbeat_timeout=None) as sub:
            wait_joined(sub, peer)
            peer.batch(*messages(recs, seq=1, max_bytes=64 * 1024))
            peer.batch(SPOT_PREFIX + b"\x08\x00\x00\x00garbage!")
            peer.batch(*messages(recs[:2], seq=99))
            got = take(lambda: sub.next_update(0.1),
                       lambda items: sum(isinstance(i, Batch) for i in items) >= 2)
    finally:
        peer.close()
    batch, empty = [i for i in got if isinstance(i, Batch)]
    assert 1 == sum(isinstance(i, DecodeFailed) for i in got)
    assert 2 == len(batch) and batch._records is None
    arrays = batch.to_numpy()
    assert ["600007", "600299"] == arrays["code"].tolist()
    assert [17.0, 309.0] == arrays["close"].tolist()
    assert batch._records is None
    assert [recs[7], recs[299]] == batch.records
    assert 0 == len(empty) and 0 == len(empty.to_numpy()["close"])
