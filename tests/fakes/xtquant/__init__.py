"""A test fake of the ``xtquant`` package: only ``xtquant.xtdata`` (see ``xtdata.py``).

Put ``tests/fakes`` first on ``sys.path`` (or ``PYTHONPATH``) and ``import xtquant.xtdata``
finds the fake instead of the real, Windows-only package.
"""

__version__ = "xtquant_fake"
