"""The relay keeps freed heap memory for the next batch (glibc only)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from relay._heap import keep_freed_memory


def _glibc() -> bool:
    try:
        return sys.platform.startswith("linux") and "glibc" in (
            os.confstr("CS_GNU_LIBC_VERSION") or "")
    except (AttributeError, ValueError, OSError):
        return False


_GLIBC = _glibc()

_CHURN = """
import resource, sys
from relay._heap import keep_freed_memory
tuned = keep_freed_memory() if sys.argv[1] == "tuned" else False
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def batch():  # as a batch of messages: six 512 KiB buffers written, then all freed
    messages = [bytearray(512 * 1024) for _ in range(6)]
    for m in messages:
        m[::4096] = b"x" * len(m[::4096])
for _ in range(5):
    batch()
before = faults()
for _ in range(20):
    batch()
print(tuned, (faults() - before) / 20)
"""


@pytest.mark.skipif(not _GLIBC, reason="mallopt tuning applies to glibc only")
def test_freed_memory_is_reused_without_page_faults() -> None:
    """Batch after batch of large buffers: with glibc's defaults every batch faults its
    pages in again; tuned, the freed memory is reused and the faults all but vanish."""
    def run(mode: str) -> float:
        out = subprocess.run([sys.executable, "-c", _CHURN, mode], capture_output=True,
                             text=True, check=True, timeout=60).stdout.split()
        assert out[0] == str(mode == "tuned")
        return float(out[1])

    default, tuned = run("default"), run("tuned")
    assert default > 300  # about 768 pages per batch
    assert tuned < default / 10


def test_tuning_is_a_no_op_off_glibc_and_idempotent_on_it() -> None:
    first = keep_freed_memory()
    assert first is _GLIBC
    assert keep_freed_memory() is first
