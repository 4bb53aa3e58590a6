"""`history sync`: a mirror equals the relay's directory, incrementally, after changes and
kills; the relay process serves its history.dir."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator, List, Tuple

import h5py
import pytest
from helpers import relay_command, relay_env, run_relay_with, tcp_address
from history_helpers import (
    assert_same_tables,
    open_when_free,
    simulator,
    tables_of,
    write_history,
)

from relay.client import fetch_catalogue
from relay.history.service import HistoryService
from relay.history.store import open_file
from relay.history.sync import sync as _sync

START = {"day": 20240501, "1min": 20240603, "5min": 20240530}


def sync(url: str, directory: str, **options: Any) -> Any:
    """The library's sync, in this process (writer processes: tests of their own)."""
    options.setdefault("writers", 1)
    return _sync(url, directory, **options)


@pytest.fixture
def relay_dir(tmp_path: Path) -> Iterator[Tuple[str, Path]]:
    """A history directory up to 2024-06-03, served on a unique address with small pages."""
    directory = tmp_path / "server"
    write_history(directory, simulator(), start=START, end=20240603)
    url = tcp_address()
    service = HistoryService(url, str(directory), max_reply_bytes=16 * 1024)
    service.start()
    try:
        yield url, directory
    finally:
        service.close()


def test_sync_into_empty_dir_equals_the_server(relay_dir: Tuple[str, Path],
                                               tmp_path: Path) -> None:
    """Every data and index table of the mirror equals the server's, field for field."""
    url, server = relay_dir
    mirror = tmp_path / "mirror"
    summary = sync(url, str(mirror))
    assert_same_tables(server, mirror)
    total = sum(rows.shape[0] for tables in tables_of(server).values()
                for name, rows in tables.items() if name.startswith("data/"))
    assert (6, total, []) == (summary.files, summary.bars, summary.refetched)
    again = sync(url, str(mirror))
    assert (0, 0, again.tables) == (again.bars, again.index_rows, again.up_to_date)


def test_writer_processes_mirror_what_one_process_mirrors(relay_dir: Tuple[str, Path],
                                                          tmp_path: Path) -> None:
    """A sync with a writer process per file gives the same files and summary as one in
    this process, with progress from every file; the next one finds all up to date."""
    url, server = relay_dir
    seen: List[str] = []
    one = sync(url, str(tmp_path / "one"))
    two = sync(url, str(tmp_path / "two"), writers=2,
               progress=lambda label, *_: seen.append(label))
    assert_same_tables(server, tmp_path / "two")
    assert (one.files, one.tables, one.bars, one.index_rows) == (
        two.files, two.tables, two.bars, two.index_rows)
    assert len(set(seen)) == two.files
    again = sync(url, str(tmp_path / "two"), writers=2)
    assert (0, again.tables) == (again.bars, again.up_to_date)


def test_a_file_the_mirror_lacks_is_copied_whole(relay_dir: Tuple[str, Path],
                                                 tmp_path: Path) -> None:
    """A mirror holding nothing of a file copies it whole, page by page (here pages of 4 KiB),
    and the copy is the relay's file; a later sync goes table by table and finds it up to
    date; a sync of some codes only never copies."""
    url, server = relay_dir
    mirror = tmp_path / "mirror"
    summary = sync(url, str(mirror), max_reply_bytes=4096)
    served = sorted(p.name for p in server.glob("*.h5"))
    assert summary.copied == summary.files == len(served)
    assert summary.requests > 2 * len(served)          # several pages per file
    for name in served:
        assert (server / name).read_bytes() == (mirror / name).read_bytes()
    assert not list(mirror.glob("*.copy-*"))
    again = sync(url, str(mirror))
    assert (0, 0, again.tables) == (again.copied, again.bars, again.up_to_date)
    some = tmp_path / "some"
    code = fetch_catalogue(url, markets=["SZ"], periods=["day"])[0].symbol
    part = sync(url, str(some), periods=["day"], markets=["SZ"], codes=[code])
    assert (0, 1) == (part.copied, part.tables)


def test_second_sync_fetches_only_the_new_day(relay_dir: Tuple[str, Path],
                                              tmp_path: Path) -> None:
    """After an incremental import of one day, sync fetches exactly that day's bars."""
    url, server = relay_dir
    mirror = tmp_path / "mirror"
    sync(url, str(mirror))
    added = write_history(server, simulator(), start={p: 20240604 for p in START},
                          end=20240604)
    summary = sync(url, str(mirror))
    assert sum(added.values()) == summary.bars
    assert [] == summary.refetched
    assert_same_tables(server, mirror)


def test_changed_history_is_detected_and_refetched(relay_dir: Tuple[str, Path],
                                                   tmp_path: Path) -> None:
    """A table re-imported with other prices on the server is fetched again whole."""
    url, server = relay_dir
    mirror = tmp_path / "mirror"
    sync(url, str(mirror))
    with open_file(server, "SH", "day", "a") as hf:
        name = hf.names()[0]
        rows = hf.read(name)
        rows["closePrice"] += 1
        hf.replace_from(name, 0, rows)
    with open_file(server, "SZ", "5min", "a") as hf:   # a longer history: new first bar
        other = hf.names()[0]
        rows = hf.read(other)
        hf.replace_from(other, 0, rows[48:])
    summary = sync(url, str(mirror))
    assert [name, other] == summary.refetched
    assert_same_tables(server, mirror)


def test_foreign_index_tables_are_copied_as_served(relay_dir: Tuple[str, Path],
                                                   tmp_path: Path) -> None:
    """Index rows that differ from what the store derives (another writer) are mirrored,
    first whole, then incrementally."""
    url, server = relay_dir
    with h5py.File(server / "sh_day.h5", "a") as f:
        name = sorted(f["week"].keys())[0]
        week = f["week"][name][:]
        week["datetime"] += 1       # not the store's labels
        f["week"][name][:] = week
        record = f["relay_state"][:]          # a table another tool wrote: not in the
        del f["relay_state"]                  # store's commit record
        f.create_dataset("relay_state", data=record[record["name"] != name.encode()],
                         maxshape=(None,), chunks=(2048,))
    mirror = tmp_path / "mirror"
    open_file(mirror, "SH", "day", "a").close()    # held: synced table by table, not copied
    summary = sync(url, str(mirror))
    assert 1 == summary.index_fixed
    assert summary.index_rows > 0
    assert_same_tables(server, mirror)
    with h5py.File(server / "sh_day.h5", "a") as f:   # the other tool adds a week
        data, week = f["data"][name], f["week"][name]
        last = data[-1:]
        last["datetime"] = 202406100000
        data.resize((data.shape[0] + 1,))
        data[-1:] = last
        week.resize((week.shape[0] + 1,))
        week[-1:] = [(202406140001, data.shape[0] - 1)]
    again = sync(url, str(mirror))
    assert (1, []) == (again.bars, again.refetched)
    assert_same_tables(server, mirror)


def test_filters_take_only_what_is_asked(relay_dir: Tuple[str, Path], tmp_path: Path) -> None:
    """--periods/--markets/--codes limit the files and tables mirrored."""
    url, _ = relay_dir
    mirror = tmp_path / "mirror"
    code = fetch_catalogue(url, markets=["SZ"], periods=["day"])[0].symbol
    summary = sync(url, str(mirror), periods=["day"], markets=["SZ"], codes=[code])
    assert (1, 1) == (summary.files, summary.tables)
    assert {"sz_day.h5"} == set(tables_of(mirror))
    assert [f"data/SZ{code[:6]}"] == [k for k in tables_of(mirror)["sz_day.h5"]
                                      if k.startswith("data/")]


def test_killed_sync_leaves_a_readable_dir_and_resync_completes(
        relay_dir: Tuple[str, Path], tmp_path: Path) -> None:
    """SIGKILL in the middle of a sync, then sync again: the mirror equals the server."""
    url, server = relay_dir
    mirror = tmp_path / "mirror"
    proc = subprocess.Popen(
        [sys.executable, "-m", "relay", "history", "sync", url, "--dir", str(mirror),
         "--page-bytes", "4096"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=relay_env(), cwd=tmp_path)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if '"history_sync_progress"' in line:
                break
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()
    assert -signal.SIGKILL == proc.returncode
    for path in mirror.glob("*.h5"):       # readable as it was left
        with open_when_free(path) as f:
            assert "data" in f
    summary = sync(url, str(mirror))
    assert summary.bars > 0
    assert_same_tables(server, mirror)


def test_relay_process_serves_its_history_dir_to_the_cli_sync(tmp_path: Path,
                                                              procs: List[
                                                                  subprocess.Popen[str]]
                                                              ) -> None:
    """`qmt-relay run` serves history.dir; `qmt-relay history sync` mirrors it exactly."""
    server = tmp_path / "server"
    write_history(server, simulator(), start=START, end=20240603, markets=("SH",),
                  periods=("day", "5min"))
    history = tcp_address()
    proc = run_relay_with(tmp_path, f"""
source:
  simulator: {{securities: 20, date: "2024-06-05"}}
publish:
  addresses: ["{tcp_address()}"]
  snapshot_address: null
history:
  dir: "{server}"
  address: "{history}"
metrics:
  address: null
""", quiet=True)
    procs.append(proc)
    mirror = tmp_path / "mirror"
    deadline = time.monotonic() + 30
    while True:
        done = relay_command(tmp_path, "history", "sync", history, "--dir", str(mirror),
                             "--timeout", "5")
        _, err = done.communicate(timeout=60)
        if done.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.3)     # the relay is still starting
    assert 0 == done.returncode, err
    assert "2 files" in err
    assert_same_tables(server, mirror)


def test_cli_errors_have_exit_codes(tmp_path: Path) -> None:
    """Bad options exit 2; an unreachable relay exits 3."""
    bad = relay_command(tmp_path, "history", "sync", "tcp://127.0.0.1:1", "--dir", "x",
                        "--periods", "week")
    bad.communicate(timeout=30)
    assert 2 == bad.returncode
    gone = relay_command(tmp_path, "history", "sync", tcp_address(), "--dir",
                         str(tmp_path / "m"), "--timeout", "2")
    _, err = gone.communicate(timeout=30)
    assert 3 == gone.returncode, err
    assert "cannot connect" in err


def test_mirror_changed_behind_the_syncs_back_is_read_again(relay_dir: Tuple[str, Path],
                                                            tmp_path: Path) -> None:
    """The remembered tails of a file are ignored once the file changed: a table cut short
    in the mirror gets its rows back."""
    url, server = relay_dir
    mirror = tmp_path / "mirror"
    sync(url, str(mirror))
    assert (mirror / ".qmt-relay-sync.json").exists()
    with open_file(mirror, "SZ", "day", "a") as hf:
        name = hf.names()[0]
        rows = hf.read(name)
        hf.replace_from(name, int(rows[-2]["datetime"]), rows[-2:-1])   # drops the last row
    summary = sync(url, str(mirror))
    assert (1, []) == (summary.bars, summary.refetched)
    assert_same_tables(server, mirror)
