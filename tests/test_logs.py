"""Tests for relay.logs: JSON and console output, files, stdlib integration."""



from __future__ import annotations

import io
import json
import logging
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List

import pytest
import structlog

from relay.config import LoggingConfig
from relay.errors import ConfigError
from relay.logs import configure_logging, reset_logging


def lines(stream: io.StringIO) -> List[Dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def ours(logger: logging.Logger) -> List[str]:
    return sorted(
        h.get_name() for h in logger.handlers if (h.get_name() or "").startswith("relay.")
    )


def test_json_lines_have_ts_level_event_logger() -> None:
    """In JSON format each structlog call is one JSON object with ts, level, event, logger."""
    stream = io.StringIO()
    configure_logging(LoggingConfig(format="json"), stream=stream)
    structlog.get_logger("relay.test").info("tick_dropped", code="600000.SH", reason="nan")
    [line] = lines(stream)
    expected = {
        "event": "tick_dropped",
        "level": "info",
        "logger": "relay.test",
        "code": "600000.SH",
        "reason": "nan",
    }
    assert expected == {k: v for k, v in line.items() if k != "ts"}
    ts = datetime.fromisoformat(line["ts"].replace("Z", "+00:00"))
    assert timezone.utc == ts.tzinfo


def test_auto_is_json_when_not_a_tty() -> None:
    """format auto writes JSON to a stream that is not a terminal."""
    stream = io.StringIO()
    configure_logging(LoggingConfig(format="auto"), stream=stream)
    structlog.get_logger().warning("no_data", seconds=30)
    assert [("warning", "no_data", 30)] == [
        (d["level"], d["event"], d["seconds"]) for d in lines(stream)
    ]


def test_console_format_is_plain_text() -> None:
    """format console writes readable text with no colour codes to a non-terminal."""
    stream = io.StringIO()
    configure_logging(LoggingConfig(format="console"), stream=stream)
    structlog.get_logger().info("relay_started", source="simulator")
    text = stream.getvalue()
    assert ("relay_started" in text, "source=simulator" in text, "\x1b[" in text) == (
        True,
        True,
        False,
    )


def test_chinese_is_not_escaped() -> None:
    """Chinese security names appear as themselves in JSON, not as \\u escapes."""
    stream = io.StringIO()
    configure_logging(LoggingConfig(format="json"), stream=stream)
    structlog.get_logger().info("name_seen", name="浦发银行")
    assert "浦发银行" in stream.getvalue()
    assert "浦发银行" == lines(stream)[0]["name"]


def test_level_filters() -> None:
    """Events below the configured level are dropped, for structlog and stdlib alike."""
    stream = io.StringIO()
    configure_logging(LoggingConfig(format="json", level="warning"), stream=stream)
    structlog.get_logger().info("quiet")
    logging.getLogger("third.party").info("quiet too")
    structlog.get_logger().warning("loud")
    assert ["loud"] == [d["event"] for d in lines(stream)]


def test_stdlib_logging_is_structured() -> None:
    """A third-party stdlib logger comes out as the same JSON, with its arguments formatted."""
    stream = io.StringIO()
    configure_logging(LoggingConfig(format="json"), stream=stream)
    logging.getLogger("pynng.thing").warning("dial %s failed", "tcp://h:1")
    [line] = lines(stream)
    expected = {
        "event": "dial tcp://h:1 failed",
        "level": "warning",
        "logger": "pynng.thing",
    }
    assert expected == {k: v for k, v in line.items() if k != "ts"}


def test_exceptions_are_one_json_field() -> None:
    """log.exception puts the traceback in the exception field of one JSON line."""
    stream = io.StringIO()
    configure_logging(LoggingConfig(format="json"), stream=stream)
    try:
        raise ValueError("boom")
    except ValueError:
        structlog.get_logger().exception("callback_failed")
    [line] = lines(stream)
    assert ("callback_failed", True) == (line["event"], "ValueError: boom" in line["exception"])


def test_python_warnings_are_logged() -> None:
    """warnings.warn output goes through the same pipeline (logger py.warnings)."""
    stream = io.StringIO()
    configure_logging(LoggingConfig(format="json"), stream=stream)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("old api", UserWarning, stacklevel=1)
    [line] = lines(stream)
    assert ("py.warnings", "warning", True) == (
        line["logger"],
        line["level"],
        "old api" in line["event"],
    )


def test_rotating_file_is_json(tmp_path: Path) -> None:
    """With a file set, lines also go to it as JSON (even in console format) and rotate."""
    path = tmp_path / "logs" / "relay.log"
    cfg = LoggingConfig(format="console", file=str(path), file_max_bytes=1024, file_backups=2)
    configure_logging(cfg, stream=io.StringIO())
    log = structlog.get_logger()
    for n in range(40):
        log.info("stats", n=n, padding="x" * 50)
    reset_logging()  # closes the file
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert ("stats", 39) == (records[-1]["event"], records[-1]["n"])
    assert sorted(["relay.log", "relay.log.1", "relay.log.2"]) == sorted(
        p.name for p in path.parent.iterdir()
    )


def test_unopenable_file_is_config_error(tmp_path: Path) -> None:
    """A log file that cannot be opened raises ConfigError naming logging.file."""
    blocker = tmp_path / "file"
    blocker.write_text("", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        configure_logging(LoggingConfig(file=str(blocker / "relay.log")), stream=io.StringIO())
    assert "logging.file" == info.value.key


def test_second_call_replaces_handlers(tmp_path: Path) -> None:
    """Configuring twice leaves one set of handlers, writing only to the new stream."""
    first, second = io.StringIO(), io.StringIO()
    cfg = LoggingConfig(format="json", file=str(tmp_path / "relay.log"))
    configure_logging(cfg, stream=first)
    configure_logging(cfg, stream=second)
    root = logging.getLogger()
    assert ["relay.file", "relay.stream"] == ours(root)
    structlog.get_logger().info("once")
    assert ("", ["once"]) == (first.getvalue(), [d["event"] for d in lines(second)])


def test_reset_removes_handlers() -> None:
    """reset_logging removes our handlers and leaves others alone."""
    other = logging.NullHandler()
    root = logging.getLogger()
    root.addHandler(other)
    try:
        configure_logging(LoggingConfig(format="json"), stream=io.StringIO())
        reset_logging()
        assert ([], True) == (ours(root), other in root.handlers)
    finally:
        root.removeHandler(other)


def test_capture_logs_still_works_after_configure() -> None:
    """Module-level loggers are not cached, so structlog.testing.capture_logs sees events."""
    configure_logging(LoggingConfig(format="json"), stream=io.StringIO())
    log = structlog.get_logger()
    log.info("before")
    with structlog.testing.capture_logs() as captured:
        log.info("during", n=1)
    assert [{"event": "during", "n": 1, "log_level": "info"}] == captured


def test_no_stdout_logs_to_the_file_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """sys.stdout = sys.stderr = None (a service): no stream handler, lines in the file."""
    log = tmp_path / "relay.log"
    monkeypatch.setattr("sys.stdout", None)
    monkeypatch.setattr("sys.stderr", None)
    configure_logging(LoggingConfig(file=str(log)))
    assert ["relay.file"] == ours(logging.getLogger())
    structlog.get_logger("relay.test").info("relay_started", name="浦发银行")
    [line] = [json.loads(x) for x in log.read_text(encoding="utf-8").splitlines()]
    assert ("relay_started", "浦发银行") == (line["event"], line["name"])


def test_no_stdout_and_no_file_uses_the_default_file(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """No stream and no logging.file: the caller's default file (the service's) is used."""
    monkeypatch.setattr("sys.stdout", None)
    configure_logging(LoggingConfig(), default_file=str(tmp_path / "svc.log"))
    structlog.get_logger().warning("no_data")
    assert "no_data" in (tmp_path / "svc.log").read_text(encoding="utf-8")


def test_nowhere_to_write_drops_lines_quietly(monkeypatch: pytest.MonkeyPatch) -> None:
    """No stream, no file, no default: lines are dropped (nothing reaches a None stream)."""
    monkeypatch.setattr("sys.stdout", None)
    monkeypatch.setattr("sys.stderr", None)
    configure_logging(LoggingConfig())
    structlog.get_logger().error("lost", code="600000.SH")
    logging.getLogger("third.party").error("also lost")


def test_console_false_skips_a_working_stream(tmp_path: Path) -> None:
    """console=False: the file only, even with a stream at hand."""
    stream = io.StringIO()
    configure_logging(LoggingConfig(), stream=stream, console=False,
                      default_file=str(tmp_path / "svc.log"))
    structlog.get_logger().info("relay_started")
    assert "" == stream.getvalue()
    assert "relay_started" in (tmp_path / "svc.log").read_text(encoding="utf-8")


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_cp1252_console_gets_replacement_characters(fmt: str) -> None:
    """A strict cp1252 console: Chinese becomes '?', the line is written, nothing raised."""
    raw = io.BytesIO()
    stream = io.TextIOWrapper(raw, encoding="cp1252", errors="strict")
    configure_logging(LoggingConfig(format=fmt), stream=stream)  # type: ignore[arg-type]
    structlog.get_logger().info("subscribed", name="浦发银行", code="600000.SH")
    stream.flush()
    text = raw.getvalue().decode("cp1252")
    assert "????" in text and "600000.SH" in text and "subscribed" in text


def test_a_closed_stream_is_not_used(tmp_path: Path) -> None:
    """A closed stream (a detached console) is neither queried nor written to."""
    stream = io.StringIO()
    stream.close()
    configure_logging(LoggingConfig(), stream=stream, default_file=str(tmp_path / "x.log"))
    structlog.get_logger().info("relay_started")
    assert "relay_started" in (tmp_path / "x.log").read_text(encoding="utf-8")
