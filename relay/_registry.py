"""Plugins picked by name: ``"module:attr"`` strings imported only when chosen.

Sources, sinks and benchmarks each keep one map from a name to such a string, so the module
that defines a protocol never imports its implementations (and their heavy dependencies:
xtquant, h5py, nats-py) at the top.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["load"]


def load(target: str) -> Any:
    """Import ``"package.module:attr"`` and return the attribute."""
    module_name, _, attr = target.partition(":")
    return getattr(importlib.import_module(module_name), attr)
