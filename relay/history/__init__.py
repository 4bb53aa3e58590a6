"""K-line history: QMT (or simulated) bars in hikyuu's HDF5 data directory.

- :mod:`relay.history.store`: hikyuu's file layout, the crash-safe writer and raw reader;
- :mod:`relay.history.source`: the history-source protocol and registry
  (:mod:`~relay.history.qmt`, :mod:`~relay.history.simulator`);
- :mod:`relay.history.importer`: the import job (lock, incremental merge, progress, summary);
- :mod:`relay.history.reader`: :func:`open_dir`, bars in plain units for people without hikyuu.

Importing this package loads nothing heavy; :func:`open_dir` loads h5py and NumPy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from relay.history.reader import HistoryDir, open_dir

__all__ = ["HistoryDir", "open_dir"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from relay.history import reader  # noqa: PLC0415

        return getattr(reader, name)
    raise AttributeError(name)
