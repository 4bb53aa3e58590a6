"""Hot-path benchmark: ``python -m relay.bench [--records N] [--bursts N]``.

Measures, in one run on the same simulated full-market snapshot:

* normalise + encode records/second, ours against the plain path (tick dict mapped by hand
  into ``flatbuffers.Builder`` calls through the flatc-generated builder functions);
* decode records/second of every field, ours against the flatc-generated accessors: to
  records, and to NumPy / pandas columns read straight out of the buffer (columns mode);
* end-to-end latency: from handing a full-market batch of records to the encoder and
  publisher until a subscriber process on loopback TCP has decoded all of it (p50/p99):
  to records (pynng subscriber), and to NumPy columns (``Subscriber(columns=True)`` on the
  pure-Python TCP transport, ``batch.to_numpy()``).

The subscriber-side figures are taken first, with the allocator as an application has it;
the relay-side ones after :func:`relay._heap.keep_freed_memory`, as ``qmt-relay run`` sets it
(``heap_kept`` in the JSON says whether it applied: glibc only).

Prints a human-readable report; the last line is one JSON object with ``encode_speedup``,
``decode_speedup``, ``columns_numpy_rps``, ``columns_numpy_speedup``, ``columns_pandas_rps``,
``e2e_p50_ms``, ``e2e_p99_ms``, ``e2e_columns_p50_ms`` and ``e2e_columns_p99_ms`` among its
keys. Nothing here asserts a
time: the numbers are for people and CI logs.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import socket
import sys
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from relay.records import SpotColumns, SpotRecord

Records = Union[List[SpotRecord], SpotColumns]

__all__ = [
    "best_time",
    "best_times",
    "builder_decode",
    "builder_encode",
    "column_batch",
    "columns_subscriber_proc",
    "main",
    "measure_e2e",
    "percentile",
    "simulated_ticks",
    "tcp_subscriber_proc",
]

Batch = Dict[str, Dict[str, Any]]


def simulated_ticks(n: int, seed: int = 7) -> Tuple[Batch, Mapping[str, str]]:
    """A full-market snapshot of ``n`` simulated securities at 10:30 on a trading day."""
    import datetime as dt  # noqa: PLC0415

    from relay.sources.simulator import SimulatedMarket, china_ms  # noqa: PLC0415

    day = dt.date(2024, 12, 2)
    market = SimulatedMarket(seed=seed, securities=n, trading_date=day)
    t = china_ms(day, 9, 30)
    for _ in range(40):  # two minutes of trading: prices and volumes move off the close
        market.step(t)
        t = market.next_push_time(t)
    return market.snapshot(t), market.names


# -- the plain path: generated builder functions and accessors ----------------------------


def builder_encode(batch: Batch, names: Mapping[str, str], *, seq: int = 1, run_id: str = "",
                   source: str = "", publish_time_ms: int = 0) -> bytes:
    """Map QMT ticks straight into ``flatbuffers.Builder`` (how another producer would)."""
    import flatbuffers  # noqa: PLC0415

    from relay._flatgen import load  # noqa: PLC0415

    spot, spot_list = load()
    b = flatbuffers.Builder(1024 * 1024)
    offsets = []

    def doubles(start: Callable[[Any, int], None], values: Sequence[float]) -> int:
        start(b, len(values))
        for v in reversed(values):
            b.PrependFloat64(float(v))
        return int(b.EndVector())

    for symbol, t in batch.items():
        code, market = symbol.split(".")
        ms = int(t["time"])
        dt = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ms // 1000 + 8 * 3600))
        s_market = b.CreateString(market)
        s_code = b.CreateString(code)
        s_name = b.CreateString(names.get(symbol, ""))
        s_dt = b.CreateString(dt)
        v_bid = doubles(spot.SpotStartBidVector, t["bidPrice"])
        v_bid_amount = doubles(spot.SpotStartBidAmountVector, t["bidVol"])
        v_ask = doubles(spot.SpotStartAskVector, t["askPrice"])
        v_ask_amount = doubles(spot.SpotStartAskAmountVector, t["askVol"])
        spot.SpotStart(b)
        spot.SpotAddMarket(b, s_market)
        spot.SpotAddCode(b, s_code)
        spot.SpotAddName(b, s_name)
        spot.SpotAddDatetime(b, s_dt)
        spot.SpotAddYesterdayClose(b, t["lastClose"])
        spot.SpotAddOpen(b, t["open"])
        spot.SpotAddHigh(b, t["high"])
        spot.SpotAddLow(b, t["low"])
        spot.SpotAddClose(b, t["lastPrice"])
        spot.SpotAddAmount(b, t["amount"] * 0.0001)
        spot.SpotAddVolume(b, t["pvolume"] * 0.01)
        spot.SpotAddBid(b, v_bid)
        spot.SpotAddBidAmount(b, v_bid_amount)
        spot.SpotAddAsk(b, v_ask)
        spot.SpotAddAskAmount(b, v_ask_amount)
        spot.SpotAddTimeMs(b, ms)
        spot.SpotAddStatus(b, t["stockStatus"])
        spot.SpotAddTradeCount(b, t["transactionNum"])
        offsets.append(spot.SpotEnd(b))
    s_run = b.CreateString(run_id)
    s_source = b.CreateString(source)
    spot_list.SpotListStartSpotVector(b, len(offsets))
    for off in reversed(offsets):
        b.PrependUOffsetTRelative(off)
    vec = b.EndVector()
    spot_list.SpotListStart(b)
    spot_list.SpotListAddSpot(b, vec)
    spot_list.SpotListAddSeq(b, seq)
    spot_list.SpotListAddRunId(b, s_run)
    spot_list.SpotListAddSource(b, s_source)
    spot_list.SpotListAddPublishTimeMs(b, publish_time_ms)
    b.Finish(spot_list.SpotListEnd(b))
    return bytes(b.Output())


def builder_decode(buf: bytes, offset: int = 0) -> List[Tuple[Any, ...]]:
    """Read every field of every record through the generated accessors."""
    from relay._flatgen import load  # noqa: PLC0415

    _, spot_list = load()
    root = spot_list.SpotList.GetRootAs(buf, offset)
    out = []
    for i in range(root.SpotLength()):
        s = root.Spot(i)
        out.append((
            s.Market().decode(), s.Code().decode(), s.Name().decode(), s.Datetime().decode(),
            s.YesterdayClose(), s.Open(), s.High(), s.Low(), s.Close(), s.Amount(), s.Volume(),
            tuple(s.Bid(j) for j in range(s.BidLength())),
            tuple(s.BidAmount(j) for j in range(s.BidAmountLength())),
            tuple(s.Ask(j) for j in range(s.AskLength())),
            tuple(s.AskAmount(j) for j in range(s.AskAmountLength())),
            s.TimeMs(), s.Status(), s.TradeCount(),
        ))
    return out


# -- measurement helpers -------------------------------------------------------------------


def best_time(fn: Callable[[], object], repeat: int) -> float:
    """Best wall time of ``repeat`` calls of ``fn``, in seconds."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def best_times(fns: Mapping[str, Callable[[], object]], rounds: int) -> Dict[str, float]:
    """Best wall time of each function, in seconds, over ``rounds`` interleaved rounds.

    Each round calls every function once, so ours and the baseline sample the same moments
    of a noisy machine and their ratio stays steady even when absolute figures drift.
    """
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _subscriber_proc(url: str, bursts: int, ready: Any, results: Any) -> None:
    import pynng  # noqa: PLC0415

    from relay.client import decode_spot_list  # noqa: PLC0415
    from relay.wire import END, START  # noqa: PLC0415

    with pynng.Sub0(recv_timeout=10000) as sock:
        sock.subscribe(b":spot:")
        sock.dial(url, block=True)
        ready.set()
        done = 0
        count = 0
        while done < bursts:
            msg = sock.recv()
            if msg == START:
                count = 0
            elif msg == END:
                results.put((time.monotonic(), count))
                done += 1
            else:
                count += len(decode_spot_list(msg, 6).records)


def tcp_subscriber_proc(url: str, bursts: int, ready: Any, results: Any,
                        columns: bool = False) -> None:
    """An e2e subscriber: :class:`~relay.client.Subscriber` over the pure-Python TCP
    transport; a batch counts as done once decoded to records, or with ``columns`` once a
    columns-mode batch is NumPy columns (``batch.to_numpy()``)."""
    from relay.client import Connected, Subscriber  # noqa: PLC0415

    with Subscriber(url, heartbeat_timeout=None, columns=columns,
                    on_event=lambda e: ready.set() if isinstance(e, Connected) else None) as sub:
        for done, batch in enumerate(sub, 1):
            count = len(batch.to_numpy()["close"]) if columns else len(batch.records)
            results.put((time.monotonic(), count))
            if done >= bursts:
                break


def columns_subscriber_proc(url: str, bursts: int, ready: Any, results: Any) -> None:
    """:func:`tcp_subscriber_proc` in columns mode."""
    tcp_subscriber_proc(url, bursts, ready, results, columns=True)


def measure_e2e(records: Records, bursts: int,
                subscriber: Callable[[str, int, Any, Any], None] = _subscriber_proc,
                ) -> List[float]:
    """Latency (ms) of each full-market burst, publisher to decoded at a subscriber process.

    ``subscriber(url, bursts, ready, results)`` runs in a spawned process: it sets ``ready``
    once connected and puts ``(time.monotonic(), records decoded)`` on ``results`` per burst.
    """
    from relay.encode import SpotEncoder  # noqa: PLC0415
    from relay.publish import Publisher  # noqa: PLC0415

    url = f"tcp://127.0.0.1:{_free_port()}"
    pub = Publisher([url])
    pub.start()
    ctx = mp.get_context("spawn")
    ready, results = ctx.Event(), ctx.Queue()
    proc = ctx.Process(target=subscriber, args=(url, bursts, ready, results), daemon=True)
    proc.start()
    try:
        if not ready.wait(30):
            raise RuntimeError("subscriber did not start")
        time.sleep(0.5)  # let the subscription reach the publisher
        encoder = SpotEncoder("bench", "simulator")
        latencies = []
        seq = 1
        for _ in range(bursts):
            t0 = time.monotonic()
            pub.send_batch(encoder.iter_messages(records, first_seq=seq,
                                                  publish_time_ms=int(time.time() * 1000)))
            t_done, count = results.get(timeout=30)
            if count != len(records):
                raise RuntimeError(f"subscriber decoded {count} of {len(records)} records")
            latencies.append((t_done - t0) * 1000)
            seq += 100
            time.sleep(0.02)
        return latencies
    finally:
        proc.join(10)
        if proc.is_alive():
            proc.kill()
        pub.close()


def column_batch(messages: Sequence[bytes]) -> Any:
    """A columns-mode :class:`~relay.client.Batch` of ``:spot:`` messages, as
    ``Subscriber(..., columns=True)`` builds it (each message checked on arrival)."""
    from relay.client._batch import Batch, Message  # noqa: PLC0415

    return Batch.of_messages([Message.read(m, 6) for m in messages], records=False)


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m relay.bench [spot]",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--records", type=int, default=8000, help="securities per snapshot")
    ap.add_argument("--bursts", type=int, default=60, help="end-to-end bursts (>= 50)")
    ap.add_argument("--repeat", type=int, default=7,
                    help="timing rounds; each times every contender once, the best is kept")
    args = ap.parse_args(argv)

    from relay._heap import keep_freed_memory  # noqa: PLC0415
    from relay.client import decode_spot_list  # noqa: PLC0415
    from relay.encode import SpotEncoder  # noqa: PLC0415
    from relay.normalise import Normaliser, normalise_tick  # noqa: PLC0415

    batch, names = simulated_ticks(args.records)
    n = len(batch)
    norm = Normaliser(names)
    # As the relay encodes: messages of at most the default 512 KiB. The decode figures use
    # one message holding the whole snapshot.
    encoder = SpotEncoder("bench", "simulator")
    whole = SpotEncoder("bench", "simulator", max_message_bytes=1 << 40)
    result_ = norm.normalise_batch(batch)
    if len(result_) != n:
        raise RuntimeError(f"only {len(result_)} of {n} simulated ticks normalised")
    records = result_.records

    def ours_encode() -> object:
        return encoder.encode(norm.normalise_batch(batch).columns or [], first_seq=1,
                              publish_time_ms=0)

    def plain_mapping() -> object:
        # The same rules as ours (validation, units, rounding, China time), tick by tick.
        return [normalise_tick(sym, tick, name=names.get(sym, "")) for sym, tick in batch.items()]

    rep = args.repeat
    cols = result_.columns
    (msg,) = whole.encode(records, first_seq=1, publish_time_ms=0)
    plain = builder_encode(batch, names)
    dec_t = best_times({
        "ours": lambda: decode_spot_list(msg, 6),
        "builder_buffer": lambda: decode_spot_list(plain),
        "accessors": lambda: builder_decode(msg, 6),
        "numpy": lambda: column_batch([msg]).to_numpy(),
        "pandas": lambda: column_batch([msg]).to_pandas(),
    }, rep)
    ours_dec, ours_dec_plain, base_dec, ours_numpy, ours_pandas = (
        n / dec_t[k] for k in ("ours", "builder_buffer", "accessors", "numpy", "pandas"))
    # The subscriber side is timed first, with the allocator as an application has it; the
    # relay side then as `qmt-relay run` has it (freed memory kept by glibc).
    heap_kept = keep_freed_memory()
    enc_t = best_times({
        "ours": ours_encode,
        "normalise": lambda: norm.normalise_batch(batch),
        "encode": lambda: encoder.encode(cols or [], first_seq=1, publish_time_ms=0),
        "mapping": plain_mapping,
        "builder": lambda: builder_encode(batch, names),
    }, rep)
    ours_enc, ours_norm, ours_enc_only, base_map, base_build = (
        n / enc_t[k] for k in ("ours", "normalise", "encode", "mapping", "builder"))
    base_enc = 1.0 / (1.0 / base_map + 1.0 / base_build)
    latencies = measure_e2e(cols or records, args.bursts)
    col_latencies = measure_e2e(cols or records, args.bursts,
                                subscriber=columns_subscriber_proc)

    result = {
        "records": n,
        "normalise_rps": round(ours_norm),
        "encode_only_rps": round(ours_enc_only),
        "normalise_encode_rps": round(ours_enc),
        "baseline_mapping_rps": round(base_map),
        "baseline_builder_rps": round(base_build),
        "baseline_encode_rps": round(base_enc),
        "encode_speedup": round(ours_enc / base_enc, 1),
        "encode_speedup_vs_builder_only": round(ours_enc / base_build, 1),
        "decode_rps": round(ours_dec),
        "decode_builder_buffer_rps": round(ours_dec_plain),
        "baseline_decode_rps": round(base_dec),
        "decode_speedup": round(ours_dec / base_dec, 1),
        "columns_numpy_rps": round(ours_numpy),
        "columns_numpy_speedup": round(ours_numpy / base_dec, 1),
        "columns_pandas_rps": round(ours_pandas),
        "columns_pandas_speedup": round(ours_pandas / base_dec, 1),
        "e2e_bursts": len(latencies),
        "e2e_p50_ms": round(percentile(latencies, 50), 2),
        "e2e_p99_ms": round(percentile(latencies, 99), 2),
        "e2e_max_ms": round(max(latencies), 2),
        "e2e_columns_p50_ms": round(percentile(col_latencies, 50), 2),
        "e2e_columns_p99_ms": round(percentile(col_latencies, 99), 2),
        "e2e_columns_max_ms": round(max(col_latencies), 2),
        "bytes_per_record": round((len(msg) - 6) / n, 1),
        "heap_kept": heap_kept,
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
    }
    print(f"simulated full-market snapshot: {n} records, {result['bytes_per_record']} bytes each")
    print("normalise + encode (ticks -> messages)"
          + (", freed memory kept as `qmt-relay run` keeps it" if heap_kept else ""))
    print(f"  ours: columnar normalise + encode   {ours_enc:>10,.0f} rec/s  (normalise "
          f"{ours_norm:,.0f}, encode {ours_enc_only:,.0f})")
    print(f"  plain: per-tick mapping + Builder   {base_enc:>10,.0f} rec/s  (mapping "
          f"{base_map:,.0f}, Builder {base_build:,.0f})")
    print(f"  speedup {result['encode_speedup']}x  (against the Builder step alone: "
          f"{result['encode_speedup_vs_builder_only']}x)")
    print("decode, every field of every record")
    print(f"  ours                                {ours_dec:>10,.0f} rec/s  (a Builder-made "
          f"buffer: {ours_dec_plain:,.0f})")
    print(f"  plain: generated accessors          {base_dec:>10,.0f} rec/s")
    print(f"  speedup {result['decode_speedup']}x")
    print("columns straight from the buffer, every field of every record (Subscriber columns=True)")
    print(f"  batch.to_numpy()                    {ours_numpy:>10,.0f} rec/s  "
          f"speedup {result['columns_numpy_speedup']}x")
    print(f"  batch.to_pandas()                   {ours_pandas:>10,.0f} rec/s  "
          f"speedup {result['columns_pandas_speedup']}x")
    print(f"end to end (encode, publish, TCP, decode in another process), {len(latencies)} bursts")
    print(f"  to records: p50 {result['e2e_p50_ms']} ms   p99 {result['e2e_p99_ms']} ms   "
          f"max {result['e2e_max_ms']} ms")
    print(f"  to NumPy columns (pure-Python TCP Subscriber): p50 {result['e2e_columns_p50_ms']} ms"
          f"   p99 {result['e2e_columns_p99_ms']} ms   max {result['e2e_columns_max_ms']} ms")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
