"""Subscriber-side benchmark: ``python -m relay.bench client [--records N] [--repeat N]``.

On one simulated full-market batch (default 8,000 records) it measures, best of ``repeat``:

* decode to objects: ``decode_spot_list`` on the relay's messages (``SpotRecord`` tuples);
* decode to columns: the same plus :attr:`Batch.columns` (one list per field);
* ``Batch.to_numpy()`` and ``Batch.to_pandas()`` on top of that (when installed);
* columns mode: the same messages read as ``Subscriber(..., columns=True)`` reads them, to
  NumPy and pandas straight from the buffers, against the flatc-generated accessors reading
  every field of the same messages (timed in the same rounds);
* a snapshot reply: decode of the whole-market reply the snapshot service sends;
* end to end (the publishing side tuned as ``qmt-relay run`` tunes it, see
  :mod:`relay._heap`): a full-market burst from the relay's publisher until a
  :class:`~relay.client.Subscriber` in another process (pure-Python TCP) has delivered the
  decoded batch (p50/p99 over ``--bursts``), and until a columns-mode subscriber has it as
  NumPy columns.

Prints a report and, last, one JSON line. Nothing here asserts a time. Needs the relay
package (simulator, normaliser, encoder), not just the client library.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from typing import Dict, List, Optional, Sequence

from relay.client._batch import Batch
from relay.client._codec import decode_spot_list
from relay.client._snapshot import encode_snapshot_reply, snapshot_batch
from relay.records import SpotRecord

__all__ = ["main"]


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m relay.bench client",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--records", type=int, default=8000, help="securities per batch")
    ap.add_argument("--repeat", type=int, default=7, help="timing repeats (best is kept)")
    ap.add_argument("--bursts", type=int, default=60, help="end-to-end bursts (0 = skip)")
    args = ap.parse_args(argv)

    from relay._heap import keep_freed_memory  # noqa: PLC0415
    from relay.bench.spot import (  # noqa: PLC0415 - relay side, not the library
        best_time,
        best_times,
        builder_decode,
        column_batch,
        columns_subscriber_proc,
        measure_e2e,
        percentile,
        simulated_ticks,
        tcp_subscriber_proc,
    )
    from relay.encode import SpotEncoder  # noqa: PLC0415
    from relay.normalise import Normaliser  # noqa: PLC0415

    ticks, names = simulated_ticks(args.records)
    result = Normaliser(names).normalise_batch(ticks)
    n = len(result)
    encoder = SpotEncoder("bench", "simulator")  # default 512 KiB messages, as published
    messages = encoder.encode(result.columns or result.records, first_seq=1, publish_time_ms=0)
    (single,) = SpotEncoder("bench", "simulator", 1 << 40).encode(
        result.records, first_seq=1, publish_time_ms=0)

    def to_objects() -> List[SpotRecord]:
        records: List[SpotRecord] = []
        for message in messages:
            records.extend(decode_spot_list(message, 6).records)
        return records

    def to_batch() -> Batch:
        return Batch(to_objects(), 1, len(messages), "bench", "simulator", 0)

    rep = args.repeat
    t_single = best_time(lambda: decode_spot_list(single, 6), rep)
    t_objects = best_time(to_objects, rep)
    t_columns = best_time(lambda: to_batch().columns, rep)
    batch = to_batch()
    figures: Dict[str, object] = {
        "records": n,
        "messages": len(messages),
        "decode_one_message_rps": round(n / t_single),
        "decode_objects_rps": round(n / t_objects),
        "decode_columns_rps": round(n / t_columns),
        "columns_only_ms": round(best_time(lambda: Batch(batch.records, 1, 1, "", "", 0).columns,
                                       rep) * 1000, 2),
    }
    if importlib.util.find_spec("numpy") is not None:
        figures["to_numpy_ms"] = round(best_time(
            lambda: Batch(batch.records, 1, 1, "", "", 0).to_numpy(), rep) * 1000, 2)
        figures["decode_numpy_rps"] = round(n / best_time(lambda: to_batch().to_numpy(), rep))
    if importlib.util.find_spec("numpy") is not None:
        contenders = {
            "accessors": lambda: [builder_decode(m, 6) for m in messages],
            "objects": to_objects,
            "numpy": lambda: column_batch(messages).to_numpy(),
        }
        if importlib.util.find_spec("pandas") is not None:
            contenders["pandas"] = lambda: column_batch(messages).to_pandas()
        col_t = best_times(contenders, rep)  # as many rounds as the main bench
        figures["baseline_accessors_rps"] = round(n / col_t["accessors"])
        figures["columns_numpy_rps"] = round(n / col_t["numpy"])
        figures["columns_numpy_speedup"] = round(col_t["accessors"] / col_t["numpy"], 1)
        if "pandas" in col_t:
            figures["columns_pandas_rps"] = round(n / col_t["pandas"])
            figures["columns_pandas_speedup"] = round(col_t["accessors"] / col_t["pandas"], 1)
        figures["decode_objects_speedup"] = round(col_t["accessors"] / col_t["objects"], 1)
    if importlib.util.find_spec("pandas") is not None:
        figures["to_pandas_ms"] = round(best_time(
            lambda: Batch(batch.records, 1, 1, "", "", 0).to_pandas(), rep) * 1000, 2)
        figures["decode_pandas_rps"] = round(n / best_time(lambda: to_batch().to_pandas(), rep))
    reply = encode_snapshot_reply({"run_id": "bench", "source": "simulator", "seq": 1,
                                   "records": n, "time_ms": 0}, messages)
    t_reply = best_time(lambda: snapshot_batch(reply, None), rep)
    figures["snapshot_decode_ms"] = round(t_reply * 1000, 2)
    if args.bursts > 0:
        # The publishing side (this process) as `qmt-relay run` has it: freed memory kept
        # (glibc). The subscriber processes keep the allocator as an application has it.
        figures["heap_kept"] = keep_freed_memory()
        latencies = measure_e2e(result.columns or result.records, args.bursts,
                                subscriber=tcp_subscriber_proc)
        figures["e2e_p50_ms"] = round(percentile(latencies, 50), 2)
        figures["e2e_p99_ms"] = round(percentile(latencies, 99), 2)
        if importlib.util.find_spec("numpy") is not None:
            latencies = measure_e2e(result.columns or result.records, args.bursts,
                                    subscriber=columns_subscriber_proc)
            figures["e2e_columns_p50_ms"] = round(percentile(latencies, 50), 2)
            figures["e2e_columns_p99_ms"] = round(percentile(latencies, 99), 2)
    figures["python"] = sys.version.split()[0]

    print(f"{n} records in {len(messages)} messages of <= 512 KiB")
    print(f"  decode, one {n}-record message    {figures['decode_one_message_rps']:>10,} rec/s")
    print(f"  decode to objects (SpotRecord)      {figures['decode_objects_rps']:>10,} rec/s")
    print(f"  decode to columns (Batch.columns)   {figures['decode_columns_rps']:>10,} rec/s")
    for key, label in (("to_numpy_ms", "Batch.to_numpy() "), ("to_pandas_ms", "Batch.to_pandas()")):
        if key in figures:
            print(f"  {label} on {n} records       {figures[key]:>10} ms")
    if "columns_numpy_rps" in figures:
        print(f"  columns mode to NumPy               {figures['columns_numpy_rps']:>10,} rec/s  "
              f"({figures['columns_numpy_speedup']}x the generated accessors, "
              f"{figures['baseline_accessors_rps']:,} rec/s)")
    if "columns_pandas_rps" in figures:
        print(f"  columns mode to pandas              {figures['columns_pandas_rps']:>10,} rec/s  "
              f"({figures['columns_pandas_speedup']}x)")
    print(f"  snapshot reply decode               {figures['snapshot_decode_ms']:>10} ms")
    if "e2e_p50_ms" in figures:
        print(f"  publish -> Subscriber batch, p50    {figures['e2e_p50_ms']:>10} ms  "
              f"(p99 {figures['e2e_p99_ms']} ms, {args.bursts} bursts)")
    if "e2e_columns_p50_ms" in figures:
        print(f"  publish -> NumPy columns, p50       {figures['e2e_columns_p50_ms']:>10} ms  "
              f"(p99 {figures['e2e_columns_p99_ms']} ms)")
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
