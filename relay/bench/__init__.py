"""Benchmarks, runnable installed: ``python -m relay.bench [NAME] [options]``.

Each benchmark is a module here with a ``main(argv) -> int | None``; :data:`BENCHES` maps the
names ``python -m relay.bench`` accepts to them (imported only when chosen). With no name, or
with options only, the hot-path benchmark (``spot``) runs. Benchmarks print figures; nothing
here asserts a time.
"""

from __future__ import annotations

from typing import Dict

__all__ = ["BENCHES", "DEFAULT"]

DEFAULT = "spot"

BENCHES: Dict[str, str] = {
    "spot": "relay.bench.spot:main",          # normalise + encode, decode, end to end
    "recorder": "relay.bench.recorder:main",  # HDF5 recorder throughput and size
    "client": "relay.bench.client:main",      # subscriber library decode paths
    "load": "relay.bench.load:main",          # 50 subscribers, a stalled one: CPU, memory
    "abuse": "relay.bench.abuse:main",        # requests/s and stream latency under abuse
    "history": "relay.bench.history:main",    # hikyuu HDF5 K-line writer, incremental import
    "history-sync": "relay.bench.history_sync:main",  # history service -> mirror, loopback
    "ops": "relay.bench.ops:main",            # metrics cost on the hot path, /metrics rate
    "nats": "relay.bench.nats:main",          # NATS bridge: throughput, e2e, cost to publishing
}
