"""Structured logging, configured once by :mod:`relay.cli`.

structlog and the stdlib ``logging`` module share one pipeline
(:class:`structlog.stdlib.ProcessorFormatter`), so third-party loggers and Python warnings
come out in the same format as ours: JSON lines for services and pipes, a readable console
format at a terminal. Every line has ``ts`` (ISO 8601, UTC), ``level``, ``event`` and
``logger``. Library code only calls ``structlog.get_logger()``; it never configures logging.

A process may have no standard streams at all (a Windows service, ``pythonw``: ``sys.stdout``
is ``None``): then lines go to the log file only, and nothing writes to or queries the missing
stream. A console whose code page cannot show a character (cp1252 and Chinese security
names) gets a replacement character instead of a lost line.
"""

from __future__ import annotations

import importlib.util
import logging
import logging.handlers
import os
import sys
from typing import Any, List, Optional, TextIO

import structlog
from structlog.typing import EventDict

from relay._console import isatty, usable
from relay.config import LoggingConfig
from relay.errors import ConfigError

__all__ = ["configure_logging", "reset_logging"]

# Our handlers on the root logger carry these names, so a second call (or reset_logging)
# finds and replaces them without keeping module state.
_HANDLER_PREFIX = "relay."
_STREAM_HANDLER = "relay.stream"
_FILE_HANDLER = "relay.file"


def _shared_processors() -> List[Any]:
    """Processors that run for structlog and stdlib records alike."""
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts"),
    ]


def _console_timestamp(_: Any, __: str, event_dict: EventDict) -> EventDict:
    """Move ``ts`` to ``timestamp``, where ConsoleRenderer puts it first on the line."""
    if "ts" in event_dict:
        event_dict["timestamp"] = event_dict.pop("ts")
    return event_dict


def _formatter(*, json: bool, colors: bool = False) -> structlog.stdlib.ProcessorFormatter:
    renderer: Any
    tail: List[Any] = [structlog.stdlib.ProcessorFormatter.remove_processors_meta]
    if json:
        # Tracebacks become one string field; ensure_ascii=False keeps 浦发银行 readable.
        tail += [structlog.processors.format_exc_info]
        renderer = structlog.processors.JSONRenderer(ensure_ascii=False)
    else:
        # ConsoleRenderer's timestamp_key= needs structlog 23.3; rename for older ones.
        tail += [_console_timestamp]
        renderer = structlog.dev.ConsoleRenderer(colors=colors)
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=_shared_processors(),
        processors=[*tail, renderer],
    )


class _ConsoleHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler that never loses a line to the stream's encoding.

    Characters the stream's encoding lacks (Chinese names on a cp1252 console) become ``?``.
    """

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        encoding = getattr(self.stream, "encoding", None)
        if not encoding:
            return line
        try:
            return line.encode(encoding, "replace").decode(encoding, "replace")
        except LookupError:  # an encoding name codecs does not know
            return line


def _remove_handlers(root: logging.Logger) -> None:
    for handler in list(root.handlers):
        if (handler.get_name() or "").startswith(_HANDLER_PREFIX):
            root.removeHandler(handler)
            handler.close()


def configure_logging(cfg: LoggingConfig, *, stream: Optional[TextIO] = None,
                      console: bool = True, default_file: Optional[str] = None) -> None:
    """Route structlog and stdlib logging to ``stream`` and/or a rotating file.

    Calling it again replaces the handlers it installed before.

    Args:
        cfg: level, format (``"auto"`` means JSON unless ``stream`` is a terminal) and file.
        stream: where lines go; ``sys.stdout`` by default. A missing stream (``None``, as
            in a Windows service) is never written to or queried.
        console: False: no stream at all (the service logs to its file only).
        default_file: the log file when ``cfg.file`` is unset and there is no stream (the
            service's own file); with neither, lines are dropped.

    Raises:
        ConfigError: the log file cannot be opened.
    """
    out = (sys.stdout if stream is None else stream) if console else None
    handlers: List[logging.Handler] = []
    if usable(out):
        assert out is not None
        tty = isatty(out)
        json = cfg.format == "json" or (cfg.format == "auto" and not tty)
        stream_handler = _ConsoleHandler(out)
        stream_handler.set_name(_STREAM_HANDLER)
        # structlog needs colorama for colours on Windows (and refuses colors=True without it).
        colors = tty and (sys.platform != "win32"
                          or importlib.util.find_spec("colorama") is not None)
        stream_handler.setFormatter(_formatter(json=json, colors=colors))
        handlers.append(stream_handler)
        path = cfg.file
    else:
        path = cfg.file if cfg.file is not None else default_file
    if path is not None:
        try:
            handlers.append(_file_handler(cfg, path))
        except ConfigError:
            for handler in handlers:
                handler.close()
            raise
    if not handlers:
        # Nowhere to write: drop lines rather than let logging's last resort try stderr.
        null = logging.NullHandler()
        null.set_name(_STREAM_HANDLER)
        handlers.append(null)

    root = logging.getLogger()
    _remove_handlers(root)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(cfg.level.upper())
    logging.captureWarnings(True)

    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *_shared_processors(),
            structlog.stdlib.PositionalArgumentsFormatter(),
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        # Not cached: module-level loggers must follow a reconfiguration (tests, capture_logs).
        cache_logger_on_first_use=False,
    )


def _file_handler(cfg: LoggingConfig, path: str) -> logging.Handler:
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        handler = logging.handlers.RotatingFileHandler(
            path, maxBytes=cfg.file_max_bytes, backupCount=cfg.file_backups, encoding="utf-8")
    except OSError as exc:
        reason = f"cannot open log file {path!r}: {exc.strerror or exc}"
        raise ConfigError("<config>", "logging.file", reason) from exc
    handler.set_name(_FILE_HANDLER)
    handler.setFormatter(_formatter(json=True))
    return handler


def reset_logging() -> None:
    """Undo :func:`configure_logging`: remove and close its handlers, reset structlog."""
    root = logging.getLogger()
    _remove_handlers(root)
    root.setLevel(logging.WARNING)
    logging.captureWarnings(False)
    structlog.reset_defaults()
