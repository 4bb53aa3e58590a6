"""The command line: main(argv) with Relay.run patched, and the real thing as a subprocess."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple

import pynng
import pytest
from helpers import REPO, ipc_address, no_streams, relay_env, run_relay_with, tcp_address

from relay import cli
from relay._heap import keep_freed_memory
from relay.app import Relay
from relay.client import decode_spot_list
from relay.wire import END, HEARTBEAT_PREFIX, START, decode_heartbeat

FAST_SIM = """
source:
  simulator:
    speed: 20
    securities: 5200
publish:
  heartbeat_interval: 0.2
  snapshot_address: null
logging:
  format: json
  stats_interval: 0.5
"""


def start_relay(tmp_path: Path, *args: str, config: str = FAST_SIM) -> subprocess.Popen[str]:
    return run_relay_with(tmp_path, config, *args)


def stop(proc: subprocess.Popen[str], sig: int = signal.SIGTERM) -> Tuple[int, str, str]:
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        out, err = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"relay did not stop on {sig}; stderr:\n{err}") from None
    return proc.returncode, out, err


@pytest.fixture
def relay_proc(tmp_path: Path) -> Iterator[Tuple[subprocess.Popen[str], str, str]]:
    tcp, ipc = tcp_address(), ipc_address()
    proc = start_relay(tmp_path, "--publish", tcp, "--publish", ipc)
    try:
        yield proc, tcp, ipc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def json_lines(text: str) -> List[Dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


# -- main(argv) without running a relay ---------------------------------------------------


def test_run_builds_relay_from_config_and_overrides(monkeypatch: Any, tmp_path: Path) -> None:
    """`run --source --publish` reaches Relay with the overrides applied; exit 0."""
    seen: Dict[str, Any] = {}

    def fake_run(self: Relay) -> None:
        seen["config"] = self.config

    monkeypatch.setattr(Relay, "run", fake_run)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("publish:\n  addresses: [tcp://127.0.0.1:9999]\n")
    code = cli.main(["run", "--config", str(cfg), "--source", "simulator",
                     "--publish", "tcp://127.0.0.1:7001", "--publish", "ipc:///tmp/x.ipc"])
    assert 0 == code
    assert ("tcp://127.0.0.1:7001", "ipc:///tmp/x.ipc") == seen["config"].publish.addresses


def test_run_with_bad_config_exits_2_naming_file_and_key(
    tmp_path: Path, capsys: Any
) -> None:
    """A bad config is one line on stderr with file and dotted key; exit code 2."""
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("publish:\n  addresses: [tcp://127.0.0.1:1, 'htp://x']\n")
    assert 2 == cli.main(["run", "--config", str(cfg)])
    err = capsys.readouterr().err
    assert str(cfg) in err and "publish.addresses[1]" in err
    assert "Traceback" not in err


def test_bad_publish_override_exits_2(capsys: Any) -> None:
    """--publish with a bad URL is a config error on the command line."""
    assert 2 == cli.main(["run", "--publish", "udp://1.2.3.4:5"])
    assert "--publish" in capsys.readouterr().err


def test_check_config_prints_effective_config(capsys: Any) -> None:
    """check-config on the shipped default prints it and exits 0."""
    assert 0 == cli.main(["check-config", str(REPO / "config" / "relay.yaml")])
    out = capsys.readouterr().out
    assert "OK" in out and "ipc:///tmp/hikyuu_real.ipc" in out



def test_commands_without_streams_do_not_crash(tmp_path: Path) -> None:
    """check-config (good and bad), a bad run, tail: exit codes as usual, nothing written."""
    with no_streams():
        assert 0 == cli.main(["check-config", str(REPO / "config" / "relay.yaml")])
        bad = tmp_path / "bad.yaml"
        bad.write_text("nope: 1\n")
        assert 2 == cli.main(["check-config", str(bad)])
        assert 2 == cli.main(["run", "--publish", "udp://1.2.3.4:5"])
        assert 2 == cli.main(["tail", tcp_address(), "--count", "1"])


def test_human_output_degrades_under_cp1252(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """check-config of a Chinese sector name to a strict cp1252 stdout: '?', no error."""
    import io

    raw = io.BytesIO()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(raw, encoding="cp1252"))
    cfg = tmp_path / "c.yaml"
    cfg.write_text("source:\n  qmt:\n    sectors: [沪深A股]\n", encoding="utf-8")
    assert 0 == cli.main(["check-config", str(cfg)])
    sys.stdout.flush()
    assert "- ??A?" in raw.getvalue().decode("cp1252")


# -- the real thing, as a user runs it ----------------------------------------------------


def test_relay_subprocess_end_to_end(
    relay_proc: Tuple[subprocess.Popen[str], str, str]
) -> None:
    """A simulated market reaches a subscriber: framed, decoded, sane; SIGTERM exits 0."""
    proc, tcp, _ipc = relay_proc
    records = []
    frames: List[bytes] = []
    beats = []
    with pynng.Sub0(recv_timeout=15000) as sub:
        sub.subscribe(b":spot:")
        sub.subscribe(HEARTBEAT_PREFIX)
        sub.dial(tcp, block=False)
        deadline = time.monotonic() + 60
        while len(records) < 4000 or frames[-1] != END or not beats:
            assert time.monotonic() < deadline, "too slow"
            msg = sub.recv()
            if msg.startswith(HEARTBEAT_PREFIX):
                beats.append(decode_heartbeat(msg))
                continue
            frames.append(msg if msg in (START, END) else b"data")
            if msg not in (START, END):
                part = decode_spot_list(msg, 6)
                assert "simulator" == part.source
                records.extend(part.records)
    code, out, err = stop(proc)
    assert 0 == code, err
    # framing: start, one or more data, end, repeated; the first frame may be mid-batch
    text = "".join({START: "S", END: "E"}.get(m, "d") for m in frames)
    assert re.fullmatch(r"d*E?(Sd+E)+", text), text
    assert len(records) >= 4000
    for r in records:
        assert r.market in ("SH", "SZ", "BJ") and re.fullmatch(r"\d{6}", r.code)
        assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", r.datetime)
        assert r.time_ms and r.name
        assert 0 <= r.low <= r.close <= r.high or r.volume == 0
        if r.bid and r.ask and r.bid[0] and r.ask[0]:
            assert r.bid[0] < r.ask[0]
    assert {b["simulated"] for b in beats} == {True}
    events = json_lines(out)
    names = [e["event"] for e in events]
    assert "relay_started" in names and "relay_stopped" in names and "stats" in names
    assert not any(e["event"] == "tick_dropped" for e in events)  # nothing per tick
    started = next(e for e in events if e["event"] == "relay_started")
    assert started["heap_kept"] is keep_freed_memory()  # glibc: freed memory kept


def test_relay_subprocess_sigint_and_tail(
    relay_proc: Tuple[subprocess.Popen[str], str, str]
) -> None:
    """`qmt-relay tail --json --count` prints N records over IPC; SIGINT stops with 0."""
    proc, _, ipc = relay_proc
    tail = subprocess.run(
        [sys.executable, "-m", "relay", "tail", ipc, "--json", "--count", "25"],
        capture_output=True, text=True, timeout=60, env=relay_env(),
    )
    assert 0 == tail.returncode, tail.stderr
    rows = [json.loads(line) for line in tail.stdout.splitlines()]
    assert 25 == len(rows)
    assert {"simulator"} == {r["source"] for r in rows}
    table = subprocess.run(
        [sys.executable, "-m", "relay", "tail", ipc, "--count", "5", "--codes",
         "000001.SH,399001.SZ,600000"],
        capture_output=True, text=True, timeout=60, env=relay_env(),
    )
    lines = table.stdout.splitlines()
    assert lines[0].split()[:3] == ["time", "symbol", "name"]
    assert 6 == len(lines)
    assert {ln.split()[1] for ln in lines[1:]} <= {"000001.SH", "399001.SZ", "600000.SH"}
    code, _, err = stop(proc, signal.SIGINT)
    assert 0 == code, err


def test_tail_under_cp1252_json_is_utf8_and_table_degrades(
    relay_proc: Tuple[subprocess.Popen[str], str, str]
) -> None:
    """A cp1252 pipe (strict, as on Windows without PYTHONIOENCODING): `tail --json` writes
    UTF-8 with the Chinese names intact; the table view writes '?' instead of failing."""
    proc, _, ipc = relay_proc
    env = {**relay_env(), "PYTHONIOENCODING": "cp1252"}
    codes = "000001.SH,399001.SZ,399006.SZ"  # index names: 上证指数, 深证成指, 创业板指
    tail = subprocess.run(
        [sys.executable, "-m", "relay", "tail", ipc, "--json", "--count", "3", "--codes", codes],
        capture_output=True, timeout=60, env=env)
    assert 0 == tail.returncode, tail.stderr
    rows = [json.loads(line) for line in tail.stdout.decode("utf-8").splitlines()]
    assert {"上证指数", "深证成指", "创业板指"} >= {r["name"] for r in rows}
    table = subprocess.run(
        [sys.executable, "-m", "relay", "tail", ipc, "--count", "3", "--codes", codes],
        capture_output=True, timeout=60, env=env)
    assert 0 == table.returncode, table.stderr
    lines = table.stdout.decode("cp1252").splitlines()
    assert 4 == len(lines) and all("????" in ln for ln in lines[1:])
    assert b"Traceback" not in table.stderr
    code, _, err = stop(proc, signal.SIGINT)
    assert 0 == code, err


def test_address_in_use_exits_nonzero_with_clear_error(tmp_path: Path) -> None:
    """A second relay on the same address fails fast with a clear message."""
    url = tcp_address()
    with pynng.Pub0(listen=url):
        proc = start_relay(tmp_path, "--publish", url)
        code, _, err = stop(proc) if proc.wait(timeout=30) is None else (
            proc.returncode, *proc.communicate())
    assert 3 == code
    assert "address in use" in err and url in err
    assert "Traceback" not in err


def test_check_config_subprocess_bad_file_exit_2(tmp_path: Path) -> None:
    """`qmt-relay check-config` on a bad file: exit 2, file and key named, no traceback."""
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("logging:\n  levle: info\n")
    proc = subprocess.run([sys.executable, "-m", "relay", "check-config", str(cfg)],
                          capture_output=True, text=True, env=relay_env())
    assert 2 == proc.returncode
    assert f"{cfg}: logging.levle" in proc.stderr
    assert "Traceback" not in proc.stderr
