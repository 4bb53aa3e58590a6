"""Running the project on the Wine CPython (see conftest.py and prepare.py)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any, Dict, Sequence

from tests.windows.prepare import WinePython


class Wine:
    """The prepared Windows CPython and how to run things with it."""

    def __init__(self, wp: WinePython, session_dir: Path) -> None:
        self.wp = wp
        self.session_dir = session_dir

    def env(self, **extra: str) -> Dict[str, str]:
        return self.wp.env(**extra)

    def path(self, path: Path) -> str:
        return self.wp.windows_path(path)

    def popen(self, *args: str, env: Any = None, **kwargs: Any) -> subprocess.Popen[bytes]:
        """``python.exe ARGS`` under Wine; stdout and stderr piped (Windows CPython cannot
        start with a regular file as a standard stream), stdin /dev/null."""
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        kwargs.setdefault("stdout", subprocess.PIPE)
        kwargs.setdefault("stderr", subprocess.PIPE)
        return subprocess.Popen(["wine", str(self.wp.python), *args],
                                env=env if env is not None else self.env(), **kwargs)

    def run(self, *args: str, timeout: float = 90, env: Any = None
            ) -> subprocess.CompletedProcess[str]:
        """``python.exe ARGS`` to the end; output decoded (UTF-8, ``\\r\\n`` made ``\\n``)."""
        proc = self.popen(*args, env=env)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            raise AssertionError(f"{args} did not finish; stderr:\n{err.decode()}") from None
        return subprocess.CompletedProcess(
            args, proc.returncode, _text(out), _text(err))

    def relay(self, *args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
        return self.run("-m", "relay", *args, timeout=timeout)


def _text(data: bytes) -> str:
    return data.decode("utf-8", "replace").replace("\r\n", "\n")


def quiet(cmd: Sequence[str], env: Dict[str, str], timeout: float = 300) -> None:
    # /dev/null for all three: Wine's system processes inherit the standard handles, and a
    # pipe they hold would never reach end-of-file.
    subprocess.run(list(cmd), env=env, timeout=timeout, check=False, stdin=subprocess.DEVNULL,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def relay_config(address: str, *, extra: str = "", source: str = "") -> str:
    """A relay config publishing on ``address`` only: every other service off."""
    return (f"publish:\n  addresses: [{address}]\n  snapshot_address: null\n"
            "  heartbeat_interval: 0.5\n"
            "history:\n  address: null\nmetrics:\n  address: null\n"
            + (source or "source:\n  simulator:\n    securities: 120\n    speed: 20\n")
            + extra)
