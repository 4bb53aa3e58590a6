"""Command line: argv -> Config -> logging -> Relay -> exit code.

Only this module turns errors into messages and exit codes. Standard streams may be missing
(``None`` under a Windows service or ``pythonw``: nothing is written to them then) or in a
narrow code page: human text degrades to ``?``, JSON and CSV go out as UTF-8 bytes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import sys
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, TextIO, Union

from relay import __version__
from relay._console import binary, tolerant, usable, write_text
from relay.errors import (
    EXIT_CONFIG,
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_STARTUP,
    EXIT_UNREACHABLE,
    ConfigError,
    PublishError,
    RelayError,
)

if TYPE_CHECKING:
    from relay.recording import Day

__all__ = ["EXIT_CONFIG", "EXIT_FAILURE", "EXIT_OK", "EXIT_STARTUP", "EXIT_UNREACHABLE", "main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qmt-relay",
        description="Relay MiniQMT full-push ticks (or a simulated market) over NNG "
                    "in hikyuu's spot format.",
    )
    p.add_argument("--version", action="version", version=f"qmt-relay {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    run = sub.add_parser("run", help="run the relay until SIGINT/SIGTERM")
    run.add_argument("--config", "-c", metavar="FILE",
                     help="YAML config (default: built-in defaults, the simulator)")
    run.add_argument("--source", metavar="NAME", help="source kind: simulator, qmt or replay")
    run.add_argument("--publish", metavar="URL", action="append",
                     help="publish address, replaces the configured ones; repeat for several")
    run.add_argument("--snapshot", metavar="URL|off",
                     help="snapshot service address, or off (default: the publish TCP port + 1)")
    run.add_argument("--file", metavar="DAY.h5", help="recorded day for --source replay")
    run.add_argument("--speed", type=float, metavar="X",
                     help="replay speed factor (replay source)")
    run.add_argument("--nats", metavar="URL", action="append",
                     help="bridge onto this NATS server (nats://HOST:PORT), replaces "
                          "bridge.nats.url; repeat for a cluster")
    run.add_argument("--log-level", choices=["debug", "info", "warning", "error"])

    check = sub.add_parser("check-config", help="validate a config file and print it")
    check.add_argument("file", metavar="FILE")

    tail = sub.add_parser("tail", help="print records from a running relay")
    tail.add_argument("url", metavar="URL", nargs="?", default="tcp://127.0.0.1:9200",
                      help="relay address (default tcp://127.0.0.1:9200)")
    tail.add_argument("--json", action="store_true", help="one JSON object per record")
    tail.add_argument("--codes", metavar="CODES",
                      help="comma-separated codes to keep, e.g. 600000.SH,000001.SZ")
    tail.add_argument("--count", type=int, metavar="N", help="stop after N records")

    record = sub.add_parser("record", help="record a running relay to HDF5 until SIGINT/SIGTERM")
    record.add_argument("url", metavar="URL", help="relay address, e.g. tcp://127.0.0.1:9200")
    record.add_argument("--dir", required=True, metavar="DIR",
                        help="where the day files go (DIR/YYYY-MM-DD.h5)")
    record.add_argument("--codes", metavar="CODES",
                        help="comma-separated codes to keep, e.g. 600000.SH,000001.SZ")
    record.add_argument("--config", "-c", metavar="FILE",
                        help="YAML config: its recorder and logging sections are used")
    record.add_argument("--units", choices=["hikyuu", "raw"],
                        help="units the relay publishes in (default: the config's)")
    record.add_argument("--log-level", choices=["debug", "info", "warning", "error"])

    export = sub.add_parser("export", help="export a recorded day (DAY.h5) as CSV")
    export.add_argument("file", metavar="DAY.h5")
    export.add_argument("--csv", nargs="?", const="", default=None, metavar="OUT",
                        help="CSV file to write (default DAY.csv beside DAY.h5; - = stdout)")
    tail.add_argument("--snapshot", action="store_true",
                      help="start with the relay's snapshot (latest record of every security)")
    tail.add_argument("--snapshot-url", metavar="URL",
                      help="snapshot address (default: the stream's TCP port + 1)")
    tail.add_argument("--ca", metavar="FILE",
                      help="tls+tcp://: CA certificate (PEM) that verifies the relay")
    tail.add_argument("--cert", metavar="FILE",
                      help="tls+tcp://: our client certificate (PEM), if the relay wants one")
    tail.add_argument("--key", metavar="FILE", help="tls+tcp://: the client certificate's key")

    tls = sub.add_parser("tls", help="TLS helpers (needs the tls extra: cryptography)")
    tls.add_argument("action", choices=["make-test-ca"],
                     help="make-test-ca: a test CA, a server and a client certificate in DIR")
    tls.add_argument("dir", metavar="DIR")
    tls.add_argument("--host", action="append", metavar="NAME",
                     help="host name or IP the server certificate is for; repeat "
                          "(default: localhost, 127.0.0.1, ::1)")
    tls.add_argument("--days", type=int, default=365, help="validity (default 365 days)")
    tail.add_argument("--replay-from", metavar="SEQ|TIME",
                      help="nats:// only: start with stored messages, after relay sequence "
                           "SEQ or from a China time YYYY-MM-DDTHH:MM[:SS]")

    status = sub.add_parser(
        "status", help="report a running relay's health (exit 0 healthy, 1 unhealthy, "
                       "2 unreachable)")
    status.add_argument("url", metavar="URL", nargs="?", default="tcp://127.0.0.1:9200",
                        help="stream address (heartbeats) or the metrics endpoint "
                             "http://HOST:PORT (default tcp://127.0.0.1:9200)")
    status.add_argument("--metrics-url", metavar="URL",
                        help="metrics endpoint (default: the stream's TCP port + 3)")
    status.add_argument("--timeout", type=float, default=3.0, metavar="S",
                        help="seconds to wait for a heartbeat and per request (default 3)")
    status.add_argument("--ca", metavar="FILE",
                        help="CA certificate of an https:// metrics endpoint")
    status.add_argument("--json", action="store_true", help="one JSON object, for scripts")

    service = sub.add_parser("service", help="manage the Windows service (Windows only)")
    service.add_argument("action", choices=["install", "remove", "start", "stop", "status"])
    service.add_argument("--config", "-c", metavar="FILE",
                         help="YAML config the service runs with (install)")
    service.add_argument("--username", metavar="USER",
                         help=r"run as this Windows account, e.g. .\trader (install)")
    service.add_argument("--password", metavar="PASSWORD", help="that account's password")
    _history_parser(sub)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``qmt-relay`` console script."""
    # Human text never raises UnicodeEncodeError (cp1252 consoles and pipes, Chinese names).
    tolerant(sys.stdout)
    tolerant(sys.stderr)
    args = _parser().parse_args(argv)
    if args.command == "run":
        return _run(args)
    if args.command == "check-config":
        return _check_config(args.file)
    if args.command == "service":
        from relay.ops.service import service_command  # noqa: PLC0415

        return service_command(args.action, args.config, username=args.username,
                               password=args.password)
    if args.command == "tls":
        return _tls(args)
    if args.command == "record":
        return _record(args)
    if args.command == "export":
        return _export(args)
    if args.command == "history":
        return _history(args)
    if args.command == "status":
        return _status(args)
    return _tail(args)


def _error(message: str) -> None:
    write_text(sys.stderr, f"qmt-relay: error: {message}\n")


def _write_json(text: str) -> None:
    """JSON on stdout as UTF-8 bytes whatever the code page; nothing without a stdout."""
    raw = binary(sys.stdout)
    if raw is not None:
        raw.write(text.encode("utf-8"))
        raw.flush()
    else:
        write_text(sys.stdout, text)


def _say(message: str, *, err: bool = False) -> None:
    """A line of human text on stdout (or stderr); nothing when that stream is missing."""
    write_text(sys.stderr if err else sys.stdout, message + "\n")


def _run(args: argparse.Namespace) -> int:
    from relay.config import apply_overrides, load_config  # noqa: PLC0415 - keep --help fast

    try:
        config = apply_overrides(
            load_config(args.config),
            source=args.source,
            publish=args.publish,
            snapshot="" if args.snapshot == "off" else args.snapshot,
            replay_file=args.file,
            replay_speed=args.speed,
            log_level=args.log_level,
            nats=args.nats,
        )
    except ConfigError as exc:
        _error(str(exc))
        return EXIT_CONFIG

    from relay.app import Relay  # noqa: PLC0415
    from relay.logs import configure_logging  # noqa: PLC0415

    configure_logging(config.logging)
    relay = Relay(config)
    try:
        relay.run()
    except ConfigError as exc:
        _error(str(exc))
        return EXIT_CONFIG
    except PublishError as exc:
        _error(str(exc))
        return EXIT_STARTUP
    except RelayError as exc:
        _error(str(exc))
        return EXIT_STARTUP if relay.state.value == "starting" else EXIT_FAILURE
    except Exception as exc:  # a bug: one JSON error line with the traceback, not stderr
        import structlog  # noqa: PLC0415

        structlog.get_logger("relay.cli").critical("relay_crashed", error=repr(exc),
                                                   exc_info=exc)
        _error(f"the relay crashed: {exc!r} (traceback in the log)")
        return EXIT_FAILURE
    return EXIT_OK


def _status(args: argparse.Namespace) -> int:
    from relay.ops.status import format_report, gather  # noqa: PLC0415

    if not args.timeout > 0:
        _error("--timeout must be > 0")
        return EXIT_CONFIG
    report = gather(args.url, metrics_url=args.metrics_url, timeout=args.timeout, ca=args.ca)
    if args.json:
        _write_json(json.dumps(report.as_dict(), ensure_ascii=False, indent=2) + "\n")
    else:
        write_text(sys.stdout, format_report(report))
    if not report.reachable:
        return EXIT_UNREACHABLE
    return EXIT_OK if report.healthy else EXIT_FAILURE


def _check_config(path: str) -> int:
    from relay.config import config_to_dict, load_config  # noqa: PLC0415

    try:
        config = load_config(path)
    except ConfigError as exc:
        _error(str(exc))
        return EXIT_CONFIG
    import yaml  # noqa: PLC0415

    shown = config_to_dict(config)
    nats = shown["bridge"]["nats"]  # never print the bridge's secrets
    for key in ("password", "token"):
        if nats[key]:
            nats[key] = "***"
    nats["url"] = [re.sub(r"://([^:/@]*):[^@/]*@", r"://\1:***@", u) for u in nats["url"]]
    _say(f"# {path}: OK")
    write_text(sys.stdout, yaml.safe_dump(shown, sort_keys=False, allow_unicode=True))
    return EXIT_OK


_TABLE_HEAD = (
    f"{'time':<8} {'symbol':<10} {'name':<8} {'last':>10} {'chg%':>7} "
    f"{'volume':>12} {'amount':>12} {'bid1':>10} {'ask1':>10}"
)


def _table_row(rec: object, out: TextIO) -> None:
    """One line of the table view; ``?`` for characters ``out``'s code page lacks."""
    from relay.records import SpotRecord  # noqa: PLC0415

    assert isinstance(rec, SpotRecord)
    chg = (rec.close / rec.yesterday_close - 1.0) * 100 if rec.yesterday_close else 0.0
    bid1 = rec.bid[0] if rec.bid else 0.0
    ask1 = rec.ask[0] if rec.ask else 0.0
    # Chinese names are two columns wide per character: pad by display width.
    name = rec.name[:6]
    pad = max(0, 8 - sum(2 if ord(c) > 0x2E80 else 1 for c in name))
    write_text(out,
        f"{rec.datetime[11:]:<8} {rec.symbol:<10} {name}{' ' * pad} {rec.close:>10.3f} "
        f"{chg:>+7.2f} {rec.volume:>12.0f} {rec.amount:>12.1f} {bid1:>10.3f} {ask1:>10.3f}\n"
    )


def _tail_event(event: object) -> None:
    """Report the subscriber's events (gaps, restarts, silence, bad messages) on stderr."""
    from relay.client import Connected, DecodeFailed  # noqa: PLC0415

    if isinstance(event, DecodeFailed):
        _error(f"skipped message: {event.error}")
    elif not isinstance(event, Connected):
        _say(f"qmt-relay: {event}", err=True)


def _tail(args: argparse.Namespace) -> int:
    from relay.client import Subscriber  # noqa: PLC0415

    codes: Optional[List[str]] = None
    if args.codes:
        codes = [c.strip() for c in args.codes.split(",") if c.strip()]
    if args.count is not None and args.count < 1:
        _error("--count must be at least 1")
        return EXIT_CONFIG
    replay_from: Union[int, datetime.datetime, None] = None
    if args.replay_from:
        text = args.replay_from.strip()
        try:
            replay_from = int(text) if text.isdigit() else datetime.datetime.fromisoformat(text)
        except ValueError:
            _error(f"--replay-from: expected a sequence number or YYYY-MM-DDTHH:MM, got {text!r}")
            return EXIT_CONFIG
    out = sys.stdout
    if not usable(out):
        _error("tail needs a standard output to print to")
        return EXIT_CONFIG
    assert out is not None
    # JSON is UTF-8 whatever the console's code page: bytes straight to the byte stream.
    raw = binary(out) if args.json else None
    seen = 0
    try:
        sub = Subscriber(args.url, codes=codes, snapshot=args.snapshot,
                         snapshot_url=args.snapshot_url, replay_from=replay_from,
                         on_event=_tail_event, ca=args.ca, cert=args.cert, key=args.key)
    except (OSError, ValueError, ImportError) as exc:  # bad URL or PEM file, no nats-py
        _error("nats:// needs nats-py: pip install 'qmt-relay[nats]'"
               if isinstance(exc, ImportError) else str(exc))
        return EXIT_CONFIG
    try:
        with sub:
            if not args.json:
                write_text(out, _TABLE_HEAD + "\n")
            for batch in sub:
                for rec in batch.records:
                    if args.json:
                        row = rec._asdict()
                        row["source"] = batch.source
                        row["seq"] = batch.first_seq
                        line = json.dumps(row, ensure_ascii=False) + "\n"
                        if raw is not None:
                            raw.write(line.encode("utf-8"))
                        else:  # a text-only stream (no byte buffer under it)
                            write_text(out, line)
                    else:
                        _table_row(rec, out)
                    seen += 1
                    if args.count is not None and seen >= args.count:
                        (raw or out).flush()
                        return EXIT_OK
                (raw or out).flush()
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `qmt-relay tail | head`
        return EXIT_OK
    return EXIT_OK


def _tls(args: argparse.Namespace) -> int:
    try:
        from relay.tls import make_test_ca  # noqa: PLC0415

        paths = make_test_ca(args.dir, hosts=args.host or ("localhost", "127.0.0.1", "::1"),
                             days=args.days)
    except ImportError:
        _error('the tls helper needs cryptography: pip install "qmt-relay[tls]"')
        return EXIT_CONFIG
    except OSError as exc:
        _error(f"cannot write {args.dir}: {exc}")
        return EXIT_FAILURE
    for name, path in paths.items():
        print(f"{name:<11} {path}")
    cert, key = paths["server"], paths["server_key"]
    print(f"relay config:  security: {{tls: {{cert: {cert}, key: {key}}}}}")
    print(f"subscriber:    Subscriber('tls+tcp://HOST:PORT', ca={paths['ca']!r})")
    return EXIT_OK


def _record(args: argparse.Namespace) -> int:
    import dataclasses  # noqa: PLC0415
    import signal  # noqa: PLC0415

    from relay.config import apply_overrides, load_config  # noqa: PLC0415

    try:
        config = apply_overrides(load_config(args.config), log_level=args.log_level)
    except ConfigError as exc:
        _error(str(exc))
        return EXIT_CONFIG
    from relay.client import Subscriber  # noqa: PLC0415
    from relay.logs import configure_logging  # noqa: PLC0415
    from relay.sinks.recorder import Recorder  # noqa: PLC0415

    configure_logging(config.logging)
    rc = dataclasses.replace(config.recorder, dir=args.dir)
    recorder = Recorder(rc.dir, flush_interval=rc.flush_interval, queue_size=rc.queue_size,
                        rollover=rc.rollover, index_interval=rc.index_interval,
                        retry_interval=rc.retry_interval,
                        units=args.units or config.normalise.units)
    codes = [c.strip() for c in args.codes.split(",") if c.strip()] if args.codes else None
    stopping: List[bool] = []
    try:
        sub = Subscriber(args.url, codes=codes)
    except (ValueError, ImportError) as exc:
        _error(str(exc) if isinstance(exc, ValueError)
               else "nats:// needs nats-py: pip install 'qmt-relay[nats]'")
        return EXIT_CONFIG

    def on_signal(_signum: int, _frame: object) -> None:
        stopping.append(True)
        sub.close()   # ends the iteration below, even through silence

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    recorder.start()
    try:
        for batch in sub:
            messages = 1
            if batch.first_seq is not None and batch.last_seq is not None:
                messages = batch.last_seq - batch.first_seq + 1
            recorder.write_records(
                batch.records, first_seq=batch.first_seq, run_id=batch.run_id,
                source=batch.source, publish_time_ms=batch.publish_time_ms,
                counts=[len(batch.records)] if messages == 1 else None, messages=messages)
            if stopping:
                break
    except Exception as exc:
        if not stopping:
            _error(f"recording stopped: {exc}")
            return EXIT_FAILURE
    finally:
        sub.close()
        recorder.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return EXIT_OK


def _export_to_stdout(day: Day) -> None:
    """CSV to stdout as UTF-8 whatever the code page (like a file); nothing without one."""
    import io  # noqa: PLC0415

    from relay.recording import export_csv  # noqa: PLC0415

    raw = binary(sys.stdout)
    if raw is None:
        if usable(sys.stdout):
            export_csv(day, sys.stdout)
        return
    text = io.TextIOWrapper(raw, encoding="utf-8", newline="", write_through=True)
    try:
        export_csv(day, text)
        text.flush()
    finally:
        text.detach()  # leave sys.stdout's buffer open


def _export(args: argparse.Namespace) -> int:
    from relay.recording import export_csv, open_day  # noqa: PLC0415

    if args.csv is None:
        _error("say what to export: --csv [OUT]")
        return EXIT_CONFIG
    try:
        day = open_day(args.file)
    except (OSError, ValueError) as exc:
        _error(f"cannot open {args.file}: {exc}")
        return EXIT_FAILURE
    out_path = args.csv or os.path.splitext(args.file)[0] + ".csv"
    try:
        with day:
            if out_path == "-":
                _export_to_stdout(day)
            else:
                with open(out_path, "w", encoding="utf-8", newline="") as out:
                    n = export_csv(day, out)
                _say(f"{out_path}: {n} records", err=True)
    except OSError as exc:
        _error(f"cannot write {out_path}: {exc}")
        return EXIT_FAILURE
    return EXIT_OK


# -- history (K-line history in hikyuu's HDF5 layout) ---------------------------------------

def _history_parser(sub: Any) -> None:
    history = sub.add_parser("history", help="K-line history in hikyuu's HDF5 layout")
    actions = history.add_subparsers(dest="history_command", metavar="ACTION")
    actions.required = True
    _history_sync_parser(actions)
    imp = actions.add_parser("import", help="download (or simulate) K-lines into DIR")
    imp.add_argument("--dir", metavar="DIR", help="hikyuu data directory (default: history.dir)")
    imp.add_argument("--source", choices=["qmt", "simulator"],
                     help="history source (default: history.source, else source.kind)")
    imp.add_argument("--periods", metavar="LIST", help="comma-separated: day,1min,5min")
    imp.add_argument("--markets", metavar="LIST", help="comma-separated: SH,SZ,BJ")
    imp.add_argument("--codes", metavar="LIST", help="only these, e.g. 600000.SH,000001.SZ")
    imp.add_argument("--start", metavar="YYYYMMDD",
                     help="first day (default: day bars from listing, minutes one year back)")
    imp.add_argument("--end", metavar="YYYYMMDD", help="last day (default: the latest)")
    imp.add_argument("--config", "-c", metavar="FILE", help="YAML config (history: section)")
    imp.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    show = actions.add_parser("show", help="print stored bars of one security")
    show.add_argument("symbol", metavar="SYMBOL", help="e.g. 600000.SH")
    show.add_argument("--dir", metavar="DIR", help="hikyuu data directory (default: history.dir)")
    show.add_argument("--period", default="day", choices=["day", "1min", "5min"])
    show.add_argument("--tail", type=int, default=10, metavar="N", help="last N bars (default 10)")
    show.add_argument("--start", metavar="WHEN", help="from YYYYMMDD[hhmm]")
    show.add_argument("--end", metavar="WHEN", help="to YYYYMMDD[hhmm]")
    show.add_argument("--config", "-c", metavar="FILE", help="YAML config (history.dir)")


_HISTORY_OPTIONS = {"dir": "--dir", "source": "--source", "periods": "--periods",
                    "markets": "--markets", "codes": "--codes", "start": "--start"}


def _history_config(args: argparse.Namespace) -> Any:
    """The config with the history options of the command line applied (checked alike)."""
    from relay.config import config_to_dict, load_config, parse_config  # noqa: PLC0415

    config = load_config(args.config)
    data = config_to_dict(config)
    given: Dict[str, Any] = {}
    for key in _HISTORY_OPTIONS:
        value = getattr(args, key, None)
        if value is None:
            continue
        if key in ("periods", "markets", "codes"):
            value = [v.strip() for v in value.split(",") if v.strip()]
        given[key] = value
    if not given:
        return config
    data["history"].update(given)
    try:
        return parse_config(data, path="<command line>")
    except ConfigError as exc:
        name = exc.key.split(".")[1].split("[")[0] if exc.key.startswith("history.") else ""
        if name in _HISTORY_OPTIONS:
            raise ConfigError("<command line>", _HISTORY_OPTIONS[name], exc.reason) from None
        raise


def _history(args: argparse.Namespace) -> int:
    if args.history_command == "sync":
        return _history_sync(args)
    try:
        config = _history_config(args)
        if args.history_command == "show":
            return _history_show(args, config)
        end = None
        if getattr(args, "end", None):
            from relay.config import _yyyymmdd  # noqa: PLC0415

            reason = _yyyymmdd(args.end)
            if reason is not None:
                raise ConfigError("<command line>", "--end", reason)
            end = int(args.end)
    except ConfigError as exc:
        _error(str(exc))
        return EXIT_CONFIG
    import dataclasses  # noqa: PLC0415

    from relay.errors import (  # noqa: PLC0415
        HistoryError,
        HistoryLockedError,
        HistoryUnavailableError,
    )
    from relay.history.importer import ImportRequest, run_import  # noqa: PLC0415
    from relay.history.source import create_history_source  # noqa: PLC0415
    from relay.logs import configure_logging  # noqa: PLC0415

    if args.log_level:
        config = dataclasses.replace(
            config, logging=dataclasses.replace(config.logging, level=args.log_level))
    configure_logging(config.logging)
    try:
        source = create_history_source(config, config.history.source)
        request = ImportRequest.from_config(config.history, end=end)
        summary = run_import(config, request, source)
    except ConfigError as exc:
        _error(str(exc))
        return EXIT_CONFIG
    except (HistoryLockedError, HistoryUnavailableError) as exc:
        _error(str(exc))
        return EXIT_STARTUP
    except HistoryError as exc:
        _error(str(exc))
        return EXIT_FAILURE
    except KeyboardInterrupt:
        _error("interrupted: what was committed is kept; run again to complete")
        return EXIT_INTERRUPTED
    for line in summary.lines():
        _say(line, err=True)
    return summary.exit_code


def _history_show(args: argparse.Namespace, config: Any) -> int:
    from relay.errors import HistoryError  # noqa: PLC0415
    from relay.history.reader import open_dir  # noqa: PLC0415

    if args.tail is not None and args.tail < 1:
        _error("--tail must be at least 1")
        return EXIT_CONFIG
    directory = args.dir or config.history.dir
    try:
        with open_dir(directory) as hist:
            bars = hist.bars(args.symbol, args.period, args.start, args.end)
    except (HistoryError, ValueError) as exc:
        _error(str(exc))
        return EXIT_FAILURE
    if args.tail:
        bars = bars[-args.tail:]
    out = sys.stdout
    write_text(out, f"{args.symbol} {args.period}: {len(bars)} bars\n")
    write_text(out, f"{'datetime':<16} {'open':>10} {'high':>10} {'low':>10} {'close':>10} "
                    f"{'volume':>14} {'amount':>16}\n")
    for row in bars:
        when = str(row["datetime"]).replace("T", " ")
        if args.period == "day":
            when = when[:10]
        write_text(out, f"{when:<16} {row['open']:>10.3f} {row['high']:>10.3f} "
                        f"{row['low']:>10.3f} {row['close']:>10.3f} {row['volume']:>14,.0f} "
                        f"{row['amount']:>16,.0f}\n")
    return EXIT_OK


# -- history sync (mirror a relay's history directory) -------------------------------------

def _history_sync_parser(actions: Any) -> None:
    sync = actions.add_parser("sync", help="mirror a relay's history directory into DIR")
    sync.add_argument("url", metavar="URL",
                      help="the relay's history service, e.g. tcp://relay-host:9202")
    sync.add_argument("--dir", required=True, metavar="DIR", help="local hikyuu data directory")
    sync.add_argument("--periods", metavar="LIST", help="comma-separated: day,1min,5min")
    sync.add_argument("--markets", metavar="LIST", help="comma-separated: SH,SZ,BJ")
    sync.add_argument("--codes", metavar="LIST", help="only these, e.g. 600000.SH,000001")
    sync.add_argument("--timeout", type=float, default=60.0, metavar="S",
                      help="seconds allowed for each reply (default 60)")
    sync.add_argument("--page-bytes", type=int, metavar="N",
                      help="ask for replies of at most N bytes (default: the relay's limit)")
    sync.add_argument("--writers", type=int, default=0, metavar="N",
                      help="files mirrored at once, each by a process of its own "
                           "(default 0: one per CPU, at most 4)")
    sync.add_argument("--log-level", choices=["debug", "info", "warning", "error"])


def _split(value: Optional[str]) -> Optional[List[str]]:
    return None if value is None else [v.strip() for v in value.split(",") if v.strip()]


def _history_sync(args: argparse.Namespace) -> int:
    from relay.client._history import MARKETS, PERIODS  # noqa: PLC0415
    from relay.client._transport import TransportError, parse_url  # noqa: PLC0415
    from relay.config import LoggingConfig  # noqa: PLC0415
    from relay.errors import HistoryError, HistoryLockedError  # noqa: PLC0415

    periods, markets = _split(args.periods), _split(args.markets)
    if markets is not None:
        markets = [m.upper() for m in markets]
    for option, values, valid in (("--periods", periods, PERIODS),
                                  ("--markets", markets, MARKETS)):
        bad = [v for v in values or () if v not in valid]
        if bad:
            _error(f"{option}: unknown {bad[0]!r}; valid: {', '.join(valid)}")
            return EXIT_CONFIG
    try:
        parse_url(args.url)
    except ValueError as exc:
        _error(str(exc))
        return EXIT_CONFIG
    if args.page_bytes is not None and args.page_bytes < 4096:
        _error("--page-bytes: must be at least 4096")
        return EXIT_CONFIG
    if not 0 <= args.writers <= 64:
        _error("--writers: must be 0 (one per CPU) to 64")
        return EXIT_CONFIG
    from relay.history.sync import progress_printer, sync  # noqa: PLC0415
    from relay.logs import configure_logging  # noqa: PLC0415

    configure_logging(LoggingConfig(level=args.log_level or "info"))
    progress, close = progress_printer()
    try:
        summary = sync(args.url, args.dir, periods=periods, markets=markets,
                       codes=_split(args.codes), timeout=args.timeout,
                       max_reply_bytes=args.page_bytes, progress=progress,
                       writers=args.writers)
    except HistoryLockedError as exc:
        _error(str(exc))
        return EXIT_STARTUP
    except (HistoryError, TransportError) as exc:
        _error(f"sync stopped: {exc} (what was committed is kept; run again to complete)")
        unreachable = isinstance(exc, TransportError) and str(exc).startswith("cannot connect")
        return EXIT_STARTUP if unreachable else EXIT_FAILURE
    except KeyboardInterrupt:
        _error("interrupted: what was committed is kept; run again to complete")
        return EXIT_INTERRUPTED
    finally:
        close()
    rate = summary.bars / summary.elapsed if summary.elapsed > 0 else 0.0
    lines = [
        f"history sync from {args.url} into {args.dir}: {summary.files} files, "
        f"{summary.tables} tables ({summary.up_to_date} already up to date; "
        f"{summary.copied} files the mirror lacked copied whole)",
        f"  bars fetched: {summary.bars} ({rate:,.0f} bars/s); index rows: "
        f"{summary.index_rows}; index tables rewritten: {summary.index_fixed}",
        f"  tables re-fetched because the relay's history changed: {len(summary.refetched)}"
        + (f" ({', '.join(summary.refetched[:10])}{' ...' if len(summary.refetched) > 10 else ''})"
           if summary.refetched else ""),
        f"  {summary.requests} requests, {summary.bytes:,} bytes, {summary.elapsed:.1f} s",
    ]
    if summary.tables == 0:
        lines.append("  nothing to sync: the relay serves no table matching the request")
    for line in lines:
        print(line, file=sys.stderr)
    return EXIT_OK
