"""``python -m relay.bench [NAME] [options]``: run the benchmark NAME (default ``spot``)."""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from relay._registry import load
from relay.bench import BENCHES, DEFAULT


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    name = DEFAULT
    if args and not args[0].startswith("-"):
        name = args.pop(0)
    elif args and args[0] in ("-h", "--help") and len(args) == 1:
        print(f"usage: python -m relay.bench [{'|'.join(BENCHES)}] [options]")
        print(f"default: {DEFAULT}; NAME --help shows a benchmark's options")
        return 0
    if name not in BENCHES:
        print(f"unknown benchmark {name!r}; choose from: {', '.join(BENCHES)}", file=sys.stderr)
        return 2
    result = load(BENCHES[name])(args)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
