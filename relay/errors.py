"""The relay's error hierarchy.

Library code raises these; only :mod:`relay.cli` (and the Windows service shell, which is a
command of its own) turns them into messages and the exit codes named here.
Each subclass stores its data as attributes and builds its message in ``__init__``.
Stdlib only (the subscriber library raises :class:`DecodeError`).
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "EXIT_CONFIG",
    "EXIT_FAILURE",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_STARTUP",
    "BadTick",
    "ConfigError",
    "DecodeError",
    "HistoryError",
    "HistoryLockedError",
    "HistoryRequestError",
    "HistoryUnavailableError",
    "PublishError",
    "RelayError",
    "ServiceError",
    "SourceError",
]


EXIT_OK = 0
EXIT_FAILURE = 1          # the relay failed while running
EXIT_CONFIG = 2           # bad configuration or command line
EXIT_STARTUP = 3          # could not start: address in use, source unavailable
EXIT_INTERRUPTED = 130    # tail stopped by Ctrl-C
EXIT_UNREACHABLE = 2      # qmt-relay status: no relay reachable (1 = unhealthy)


class RelayError(Exception):
    """Base class of every error the relay raises on purpose."""


class ConfigError(RelayError):
    """A configuration file or value is invalid.

    Attributes:
        path: the file the value came from ("<defaults>" or "<command line>" otherwise).
        key: dotted key of the bad value, e.g. ``publish.addresses[1]`` ("" for the file).
        reason: what is wrong with it.
    """

    def __init__(self, path: str, key: str, reason: str) -> None:
        self.path = path
        self.key = key
        self.reason = reason
        where = f"{path}: {key}" if key else path
        super().__init__(f"{where}: {reason}")


class SourceError(RelayError):
    """A market-data source failed in a way it cannot recover from by itself."""

    def __init__(self, source: str, reason: str) -> None:
        self.source = source
        self.reason = reason
        super().__init__(f"source {source}: {reason}")


class PublishError(RelayError):
    """A publish address could not be opened (bad URL, address in use, no permission)."""

    def __init__(self, address: str, reason: str) -> None:
        self.address = address
        self.reason = reason
        super().__init__(f"cannot publish on {address}: {reason}")


class ServiceError(RelayError):
    """A supervised thread or task of the relay kept failing; the relay stops (exit 1)."""

    def __init__(self, service: str, failures: int, window: float, reason: str) -> None:
        self.service = service
        self.failures = failures
        self.window = window
        self.reason = reason
        super().__init__(f"service {service} failed {failures} times within {window:g} s; "
                         f"last error: {reason}")


class DecodeError(RelayError, ValueError):
    """A message could not be decoded (truncated, malformed or not a SpotList)."""

    def __init__(self, reason: str, offset: int = -1) -> None:
        self.reason = reason
        self.offset = offset
        at = f" at byte {offset}" if offset >= 0 else ""
        super().__init__(f"cannot decode message{at}: {reason}")


class BadTick(RelayError, ValueError):
    """A tick failed validation; the normaliser drops it and counts ``reason``."""

    def __init__(self, code: str, reason: str) -> None:
        self.code = code
        self.reason = reason
        super().__init__(f"bad tick {code}: {reason}")


class HistoryError(RelayError):
    """A K-line history file cannot be opened, read or written as asked."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {reason}")

    def __reduce__(self) -> Any:     # raised in a writer process, re-raised in the importer
        return HistoryError, (self.path, self.reason)


class HistoryLockedError(HistoryError):
    """Another process is writing the history directory (its lock file is held)."""

    def __init__(self, directory: str) -> None:
        super().__init__(directory, "locked by another running import (one writer at a time)")
        self.directory = directory

    def __reduce__(self) -> Any:
        return HistoryLockedError, (self.directory,)


class HistoryUnavailableError(HistoryError):
    """A history source cannot start (xtquant missing, MiniQMT unreachable)."""

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(f"source {source}", reason)
        self.source = source


class HistoryRequestError(HistoryError):
    """The history service refused a request (malformed, unknown security, file busy).

    Raised by the service for a bad request (it becomes the error reply) and by the client
    for an error reply (``where`` is then the service's address).
    """

    def __init__(self, reason: str, where: str = "history service") -> None:
        super().__init__(where, reason)
