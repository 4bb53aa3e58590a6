"""Shared fixtures."""

from __future__ import annotations

from typing import Iterator

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
