"""Hypothesis fuzzing of everything the subscriber parses: SpotList, snapshot replies."""

from __future__ import annotations

import contextlib
import struct
import tracemalloc
from typing import Any, List

from client_helpers import messages, record
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.client import DecodeError, decode_spot_list
from relay.client._snapshot import decode_snapshot_reply, encode_snapshot_reply

VALID = messages([record(f"{600000 + i}") for i in range(4)], seq=3)[0][6:]
REPLY = encode_snapshot_reply({"run_id": "r", "source": "s", "seq": 3, "records": 4,
                               "time_ms": 0}, [b":spot:" + VALID])
FUZZ = settings(max_examples=400, deadline=1000, suppress_health_check=[HealthCheck.too_slow])


def decode_or_error(buf: bytes) -> None:
    with contextlib.suppress(DecodeError):
        decode_spot_list(buf)


@FUZZ
@given(st.binary(max_size=512))
def test_arbitrary_bytes_raise_only_decode_error(noise: bytes) -> None:
    """Random bytes either decode or raise DecodeError; nothing else escapes."""
    decode_or_error(noise)


@FUZZ
@given(st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)),
                min_size=1, max_size=8))
def test_mutated_valid_message_raises_only_decode_error(flips: List[Any]) -> None:
    """A valid message with some bytes overwritten never raises anything but DecodeError."""
    buf = bytearray(VALID)
    for pos, value in flips:
        buf[pos] = value
    decode_or_error(bytes(buf))


@FUZZ
@given(st.integers(0, len(VALID) - 4), st.sampled_from([0x7FFFFFFF, 0xFFFFFFFF, 1 << 28,
                                                        len(VALID), len(VALID) + 1]))
def test_lying_lengths_and_offsets_anywhere(pos: int, value: int) -> None:
    """Any 32-bit word replaced by a huge count or offset gives DecodeError or a result."""
    buf = bytearray(VALID)
    struct.pack_into("<I", buf, pos, value)
    decode_or_error(bytes(buf))


def test_lying_vector_count_allocates_nothing_large() -> None:
    """A spot vector claiming 2**30 records fails fast without a large allocation."""
    root = struct.unpack_from("<I", VALID)[0]
    buf = bytearray(VALID)
    # find the spot vector count: the uoffset in the SpotList table's first reference field
    for pos in range(root, len(buf) - 4, 4):
        target = pos + struct.unpack_from("<I", buf, pos)[0]
        if target + 4 <= len(buf) and struct.unpack_from("<I", buf, target)[0] == 4:
            struct.pack_into("<I", buf, target, 1 << 30)
            break
    else:
        raise AssertionError("spot vector not found")
    tracemalloc.start()
    try:
        try:
            decode_spot_list(bytes(buf))
        except DecodeError:
            pass
        else:
            raise AssertionError("decoded a lying vector")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


@FUZZ
@given(st.binary(max_size=256))
def test_snapshot_reply_noise_raises_only_decode_error(noise: bytes) -> None:
    """Random snapshot replies (with or without the tag) raise DecodeError or parse."""
    for body in (noise, b":relay:snapshot:" + noise):
        with contextlib.suppress(DecodeError):
            decode_snapshot_reply(body)


@FUZZ
@given(st.integers(0, len(REPLY) - 1), st.integers(0, len(REPLY)))
def test_cut_or_mutated_snapshot_reply(pos: int, cut: int) -> None:
    """A snapshot reply cut short or with a byte changed never raises anything else."""
    buf = bytearray(REPLY[:max(cut, 1)])
    if pos < len(buf):
        buf[pos] ^= 0xFF
    try:
        _header, parts = decode_snapshot_reply(bytes(buf))
        for part in parts:
            decode_spot_list(part, 6)
    except DecodeError:
        pass


def test_snapshot_reply_round_trip() -> None:
    """An encoded reply decodes to its header and messages."""
    header, parts = decode_snapshot_reply(REPLY)
    assert (3, "r", 1) == (header["seq"], header["run_id"], header["messages"])
    assert [b":spot:" + VALID] == parts
    assert 4 == len(decode_spot_list(parts[0], 6).records)


def test_records_with_no_string_or_vector_field_decode_to_defaults() -> None:
    """A Spot table whose vtable lists no field (Hypothesis found one) decodes to defaults."""
    import flatbuffers

    from relay._flatgen import load

    spot_mod, list_mod = load()
    builder = flatbuffers.Builder(256)
    spots = []
    for _ in range(3):
        spot_mod.SpotStart(builder)
        spots.append(spot_mod.SpotEnd(builder))
    list_mod.SpotListStartSpotVector(builder, len(spots))
    for spot in reversed(spots):
        builder.PrependUOffsetTRelative(spot)
    vector = builder.EndVector()
    list_mod.SpotListStart(builder)
    list_mod.SpotListAddSpot(builder, vector)
    builder.Finish(list_mod.SpotListEnd(builder))
    decoded = decode_spot_list(bytes(builder.Output()))
    assert 3 == len(decoded.records)
    assert {("", "", "", 0.0, ())} == {(r.market, r.code, r.datetime, r.close, r.bid)
                                       for r in decoded.records}
