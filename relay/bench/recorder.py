"""Recorder benchmark: sustained records/second absorbed, file bytes per record, read times.

Run ``python -m relay.bench recorder [--securities N] [--batches N]``. It normalises a
simulated full market (the first batch is every security, later ones the usual 20-60 %
changes), then feeds the batches to a :class:`~relay.sinks.recorder.Recorder` as fast as
``write()`` accepts them, with a queue large enough that nothing is dropped, and times from
the first write to ``close()`` returning (everything committed). Prints figures; asserts
nothing.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from datetime import date
from typing import List, Optional, Sequence

from relay.normalise import BatchResult, Normaliser
from relay.recording import open_day
from relay.sinks.recorder import Recorder
from relay.sources.simulator import SimulatedMarket, china_ms


def _batches(securities: int, count: int) -> List[BatchResult]:
    market = SimulatedMarket(securities=securities, trading_date=date(2024, 12, 2))
    normaliser = Normaliser(market.names)
    t = china_ms(market.trading_date, 9, 30)
    market.step(t)
    out = [normaliser.normalise_batch(market.snapshot(t))]
    while len(out) < count:
        t = market.next_push_time(t)
        batch = market.step(t)
        if batch:
            out.append(normaliser.normalise_batch(batch))
    return out


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m relay.bench recorder")
    parser.add_argument("--securities", type=int, default=5200)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--flush-interval", type=float, default=1.0)
    args = parser.parse_args(argv)
    batches = _batches(args.securities, args.batches)
    total = sum(len(b) for b in batches)
    print(f"{len(batches)} batches, {total} records ({args.securities} securities)")
    with tempfile.TemporaryDirectory() as directory:
        rec = Recorder(directory, flush_interval=args.flush_interval,
                       queue_size=len(batches) + 1, index_interval=30.0)
        rec.start()
        start = time.perf_counter()
        enqueue = 0.0
        for seq, result in enumerate(batches, start=1):
            t = time.perf_counter()
            columns = result.columns
            rec.write_records(columns if columns is not None else result.records,
                              first_seq=seq, run_id="bench", source="simulator",
                              publish_time_ms=1733118954000 + seq * 3000,
                              counts=[len(result)])
            enqueue += time.perf_counter() - t
        rec.close()
        elapsed = time.perf_counter() - start
        (name,) = os.listdir(directory)
        path = os.path.join(directory, name)
        size = os.path.getsize(path)
        print(f"recorder absorbs   {total / elapsed:12,.0f} records/s  "
              f"({elapsed:.2f} s to commit everything; dropped {rec.dropped})")
        print(f"write() cost       {enqueue / len(batches) * 1e6:12,.1f} us per batch "
              "on the caller's thread")
        print(f"file size          {size / total:12,.1f} bytes per record "
              f"({size / 1e6:.1f} MB)")
        with open_day(path) as day:
            code = day.codes()[len(day.codes()) // 2]
            t = time.perf_counter()
            n = len(day.ticks(code)["code"])
            t_code = time.perf_counter() - t
            mid = int(day._batches["tmax"][len(day._batches["tmax"]) // 2])
            t = time.perf_counter()
            m = len(day.at(mid)["code"])
            t_at = time.perf_counter() - t
            t = time.perf_counter()
            k = len(day.all()["code"])
            t_all = time.perf_counter() - t
        print(f"ticks(code)        {t_code * 1e3:12,.1f} ms ({n} records)")
        print(f"at(t)              {t_at * 1e3:12,.1f} ms ({m} securities)")
        print(f"all()              {t_all * 1e3:12,.1f} ms ({k} records)")


if __name__ == "__main__":
    main()
