"""Latest price of a few securities, straight from a running relay.

    python examples/latest_prices.py                       # tcp://127.0.0.1:9200
    python examples/latest_prices.py tcp://192.168.1.20:9200 --codes 600000.SH,000001.SZ

Needs only ``pip install qmt-relay`` (the client library uses flatbuffers, nothing
compiled). With ``--snapshot`` the current prices are printed at once instead of after each
security's next trade.
"""

from __future__ import annotations

import argparse
import sys
from typing import Dict, Optional, Sequence

from relay.client import Event, Gap, Restart, Silence, Subscriber


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("url", nargs="?", default="tcp://127.0.0.1:9200")
    ap.add_argument("--codes", default="600000.SH,000001.SZ,600519.SH,000001.SH")
    ap.add_argument("--snapshot", action="store_true", help="start from the relay's snapshot")
    ap.add_argument("--snapshot-url", help="default: the stream's port + 1")
    ap.add_argument("--count", type=int, help="stop after N batches")
    args = ap.parse_args(argv)
    codes = [c.strip() for c in args.codes.split(",") if c.strip()]

    def on_event(event: Event) -> None:
        if isinstance(event, (Gap, Restart, Silence)):
            print(f"# {event}", file=sys.stderr)

    latest: Dict[str, float] = {}
    batches = 0
    with Subscriber(args.url, codes=codes, snapshot=args.snapshot,
                    snapshot_url=args.snapshot_url, on_event=on_event) as sub:
        for batch in sub:
            for rec in batch.records:
                if latest.get(rec.symbol) != rec.close:
                    latest[rec.symbol] = rec.close
                    change = rec.close / rec.yesterday_close - 1 if rec.yesterday_close else 0.0
                    print(f"{rec.datetime} {rec.symbol:<10} {rec.name:<6} {rec.close:>10.3f} "
                          f"{change:>+8.2%}", flush=True)
            batches += 1
            if args.count is not None and batches >= args.count:
                break
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
