"""A full-market pandas DataFrame, kept current with every batch from a running relay.

    pip install qmt-relay pandas
    python examples/market_dataframe.py                    # tcp://127.0.0.1:9200

It starts from the relay's snapshot (the whole market at once), then folds in each batch
(only the securities that changed) and prints a one-line summary per batch. The subscriber
runs in columns mode: each batch becomes a DataFrame straight from the relay's message
buffers, without a Python object per record.
"""

from __future__ import annotations

import argparse
import time
from typing import Any, Optional, Sequence

import pandas as pd  # type: ignore[import-untyped, unused-ignore]

from relay.client import Subscriber


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("url", nargs="?", default="tcp://127.0.0.1:9200")
    ap.add_argument("--snapshot-url", help="default: the stream's port + 1")
    ap.add_argument("--no-snapshot", action="store_true", help="build up from the stream only")
    ap.add_argument("--count", type=int, help="stop after N batches")
    args = ap.parse_args(argv)

    market: Any = None
    batches = 0
    with Subscriber(args.url, snapshot=not args.no_snapshot,
                    snapshot_url=args.snapshot_url, columns=True) as sub:
        for batch in sub:
            t0 = time.perf_counter()
            frame = batch.to_pandas()                    # indexed by symbol, e.g. 600000.SH
            if market is None or batch.snapshot:
                market = frame
            else:
                market = pd.concat([market[~market.index.isin(frame.index)], frame])
            ms = (time.perf_counter() - t0) * 1000
            change = market["close"] / market["yesterday_close"] - 1
            up, down = int((change > 0).sum()), int((change < 0).sum())
            top = change.idxmax() if len(change) else "-"
            kind = "snapshot" if batch.snapshot else "batch"
            print(f"{kind} seq {batch.last_seq}: {len(frame)} changed, market {len(market)} "
                  f"securities, {up} up / {down} down, top {top}, {ms:.1f} ms", flush=True)
            batches += 1
            if args.count is not None and batches >= args.count:
                break
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
