"""The Windows suite: the project on a real Windows CPython (python.org's) under Wine.

The session fixture prepares the Wine prefix (tests/windows/prepare.py: a no-op when
.ci/run has prepared it already), starts one persistent wineserver with its system
processes (services.exe is the service control manager) on /dev/null, and kills it at the
end. Every test is marked ``windows``: ``pytest -m "not windows"`` leaves the suite out.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Iterator, List

import pytest

from tests.windows.prepare import prepare
from tests.windows.winehelpers import Wine, quiet


def pytest_collection_modifyitems(items: List[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.windows)


@pytest.fixture(scope="session")
def wine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Wine]:
    result = prepare()
    if isinstance(result, str):
        pytest.skip(result)
    w = Wine(result, tmp_path_factory.mktemp("wine"))
    env = w.env()
    quiet(["wineserver", "-k"], env)          # nothing left from an earlier run
    quiet(["wineserver", "-p"], env)          # one server for the whole session
    quiet(["wine", str(result.python), "-c", "pass"], env)   # boots services.exe & co
    # A service left installed by an interrupted run would start at every boot.
    quiet(["wine", str(result.python), "-m", "relay", "service", "remove"], env)
    try:
        yield w
    finally:
        quiet(["wineserver", "-k"], env)


@pytest.fixture
def wine_procs() -> Iterator[List[subprocess.Popen[bytes]]]:
    """Wine processes a test starts; any still running at the end are killed.

    Unlike the suite's ``procs``, a process that already exited is left alone: Wine's own
    processes may still hold its pipes, so ``communicate()`` on it could wait forever.
    """
    started: List[subprocess.Popen[bytes]] = []
    try:
        yield started
    finally:
        for proc in started:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
