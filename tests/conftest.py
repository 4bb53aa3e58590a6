"""Shared fixtures."""

from __future__ import annotations

import subprocess
from typing import Iterator, List

import pytest
import structlog

from relay.logs import reset_logging


@pytest.fixture(autouse=True)
def _reset_logging() -> Iterator[None]:
    """Undo any logging configuration a test made, even when it fails."""
    try:
        yield
    finally:
        reset_logging()
        structlog.reset_defaults()


@pytest.fixture
def procs() -> Iterator[List[subprocess.Popen[str]]]:
    """Subprocesses a test starts; any still running at the end are killed."""
    started: List[subprocess.Popen[str]] = []
    try:
        yield started
    finally:
        for proc in started:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()  # also closes the pipes of one that already exited
