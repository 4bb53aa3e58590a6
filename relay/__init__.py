"""qmt-relay: MiniQMT full-push ticks to NNG pub/sub in hikyuu's spot format.

The package root stays light: importing ``relay`` (or ``relay.client``) loads no pynng,
h5py, structlog or xtquant.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
