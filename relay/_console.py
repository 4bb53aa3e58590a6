"""Standard streams as they really are: maybe missing, maybe in a narrow code page.

A Windows service or ``pythonw`` has no console: ``sys.stdout`` and ``sys.stderr`` are
``None``. A Windows console or a redirected pipe uses the ANSI code page (cp1252, cp437,
cp936...), which lacks most Chinese characters. These helpers let the CLI and the logging
setup write human text that degrades (``?``) instead of raising, machine output (JSON, CSV)
as UTF-8 bytes whatever the code page, and nothing at all to a missing stream. Stdlib only.
"""

from __future__ import annotations

import contextlib
import io
from typing import Any, BinaryIO, Optional, TextIO

__all__ = ["binary", "isatty", "tolerant", "usable", "write_text"]


def usable(stream: Optional[Any]) -> bool:
    """Whether ``stream`` can be written to: not ``None``, has ``write``, not closed."""
    if stream is None or not callable(getattr(stream, "write", None)):
        return False
    try:
        return not stream.closed
    except (AttributeError, ValueError):  # no `closed`, or a detached wrapper
        return True


def isatty(stream: Optional[Any]) -> bool:
    """``stream.isatty()``, False for a missing, detached or closed stream."""
    if stream is None:
        return False
    try:
        return bool(stream.isatty())
    except (AttributeError, OSError, ValueError):
        return False


def tolerant(stream: Optional[TextIO]) -> Optional[TextIO]:
    """``stream`` made to write ``?`` for characters its encoding lacks (None stays None).

    A :class:`io.TextIOWrapper` with strict errors (a pipe under cp1252 without
    ``PYTHONIOENCODING``) is reconfigured to ``errors="replace"``; other streams are left
    as they are.
    """
    if usable(stream) and isinstance(stream, io.TextIOWrapper) and stream.errors == "strict":
        with contextlib.suppress(AttributeError, ValueError, io.UnsupportedOperation):
            stream.reconfigure(errors="replace")
    return stream


def binary(stream: Optional[TextIO]) -> Optional[BinaryIO]:
    """The byte stream under a text stream (``sys.stdout.buffer``), flushed first; or None."""
    if not usable(stream):
        return None
    assert stream is not None
    buffer = getattr(stream, "buffer", None)
    if buffer is None:
        return None
    stream.flush()
    result: BinaryIO = buffer
    return result


def write_text(stream: Optional[TextIO], text: str) -> None:
    """Write ``text`` if ``stream`` exists, replacing what its encoding cannot encode."""
    if not usable(stream):
        return
    assert stream is not None
    try:
        stream.write(text)
    except UnicodeEncodeError:
        encoding = getattr(stream, "encoding", None) or "ascii"
        stream.write(text.encode(encoding, "replace").decode(encoding, "replace"))
