"""A batch of records as delivered to a strategy, with columnar views.

A batch keeps the messages it came from. :meth:`Batch.to_numpy` and :meth:`Batch.to_pandas`
read uniform messages (the relay's own) column by column straight out of their buffers
(:mod:`relay.client._columns`) and use the records otherwise; a batch built in columns mode
(``Subscriber(..., columns=True)``) builds no record objects until :attr:`Batch.records` is
first read.
"""

from __future__ import annotations

import importlib
from typing import Any, Dict, Iterator, List, Optional, Sequence, Set, Tuple, Union

from relay.client._codec import _DEFAULT
from relay.errors import DecodeError
from relay.records import FIELDS, SpotColumns, SpotRecord, _acyclic, _plain, _rows

__all__ = ["BOOK_FIELDS", "Batch", "CodeFilter", "Message", "columns_of", "numpy_available"]

BOOK_FIELDS = ("bid", "bid_amount", "ask", "ask_amount")
_BOOK_IDS = frozenset(range(11, 15))
_NOT_YET: Any = object()  # "not computed yet", where None is a meaningful result


def columns_of(records: List[SpotRecord]) -> Dict[str, List[Any]]:
    """Every field of ``records`` as a list (books as lists of tuples), in schema order."""
    if not records:
        return {name: [] for name in FIELDS}
    return dict(zip(FIELDS, map(list, zip(*records))))


class CodeFilter:
    """Keeps records whose code (``"600000"``) or symbol (``"600000.SH"``) was asked for."""

    __slots__ = ("_bare", "_pairs")

    def __init__(self, codes: Sequence[str]) -> None:
        self._bare: Set[str] = set()
        self._pairs: Set[Tuple[str, str]] = set()
        for item in codes:
            code, dot, market = item.strip().partition(".")
            if dot:
                self._pairs.add((code, market.upper()))
            else:
                self._bare.add(code)

    @classmethod
    def of(cls, codes: Optional[Sequence[str]]) -> Optional[CodeFilter]:
        return None if codes is None else cls(codes)

    def filter(self, records: List[SpotRecord]) -> List[SpotRecord]:
        bare, pairs = self._bare, self._pairs
        return [r for r in records if r.code in bare or (r.code, r.market) in pairs]

    def positions(self, codes: Sequence[str], markets: Sequence[str]) -> List[int]:
        """Positions of the records to keep, given their code and market columns."""
        bare, pairs = self._bare, self._pairs
        return [i for i, (code, market) in enumerate(zip(codes, markets))
                if code in bare or (code, market) in pairs]


Body = Union[SpotColumns, List[SpotRecord]]


class Message:
    """One ``:spot:`` message of a batch: its header now, its records in the form asked for.

    Attributes:
        n: number of records in the message (before any code filter).
        seq, run_id, source, publish_time_ms: the message's header fields (``None`` when
            the producer sent none).
    """

    __slots__ = ("_arrays", "_body", "_data", "_offset", "n", "publish_time_ms", "run_id",
                 "seq", "source")

    def __init__(self, data: bytes, offset: int, head: List[Any], n: int,
                 body: Optional[Body] = None, arrays: Any = _NOT_YET) -> None:
        self._data = data
        self._offset = offset
        self.seq: Optional[int] = head[1]
        self.run_id: Optional[str] = head[2]
        self.source: Optional[str] = head[3]
        self.publish_time_ms: Optional[int] = head[4]
        self.n = n
        self._body = body
        self._arrays = arrays

    @classmethod
    def decode(cls, data: bytes, offset: int = 0) -> Message:
        """Decode a message to records now (the subscriber's default mode).

        Raises:
            DecodeError: the message is truncated or malformed.
        """
        body, head = _DEFAULT.columns(data, offset)
        if isinstance(body, SpotColumns):
            body = body.records
        return cls(data, offset, head, len(body), body)

    @classmethod
    def read(cls, data: bytes, offset: int = 0, *, numpy: bool = True) -> Message:
        """Read a message as columns now; records are built only if asked for (columns mode).

        With ``numpy`` (see :func:`numpy_available`), a uniform message is checked and its
        strings converted here, the rest is read when the batch's arrays are asked for;
        without NumPy, or for a message that is not uniform, the pure-Python decoder reads it
        (as columns when it can).

        Raises:
            DecodeError: the message is truncated or malformed.
        """
        if numpy:
            head, arrays = _wire_arrays(data, offset)
            if arrays is not None:
                return cls(data, offset, head, arrays.n, None, arrays)
        body, head = _DEFAULT.columns(data, offset)
        return cls(data, offset, head, len(body), body, None if numpy else _NOT_YET)

    def records(self) -> List[SpotRecord]:
        """The message's records (decoded on first use)."""
        body = self._body
        if body is None:
            body = self._body = _DEFAULT.columns(self._data, self._offset)[0]
        if isinstance(body, SpotColumns):
            return body.records
        return body

    def lists(self) -> Body:
        """The message's records as pure-Python columns if uniform, else as records."""
        if self._body is None:
            self._body = _DEFAULT.columns(self._data, self._offset)[0]
        return self._body

    def arrays(self) -> Any:
        """The message as NumPy columns (``MessageColumns``), or ``None`` if not uniform."""
        if self._arrays is _NOT_YET:
            try:
                self._arrays = _wire_arrays(self._data, self._offset)[1]
            except DecodeError:
                self._arrays = None  # the record decoder read it: this cannot happen
        return self._arrays


def numpy_available() -> bool:
    """Whether NumPy can be imported (it is then imported)."""
    try:
        import numpy  # noqa: F401, PLC0415 - optional dependency
    except ImportError:
        return False
    return True


def _wire_arrays(data: bytes, offset: int) -> Tuple[List[Any], Any]:
    """The header of the message at ``data[offset:]`` and its NumPy columns (``None`` if
    its layout is not uniform); the buffer is not copied.

    Raises:
        DecodeError: the header is malformed.
    """
    from relay.client._columns import message_columns  # noqa: PLC0415 - needs NumPy

    view = memoryview(data)[offset:]
    head, base, count, plan = _DEFAULT.header(view)
    if plan is None:
        return head, message_columns(view, base, 0, 0, ())  # type: ignore[arg-type]
    return head, message_columns(view, base, count, plan.table_size,  # type: ignore[arg-type]
                                 plan.present)


class Batch:
    """Every record published between one ``[start spot]`` and ``[end spot]`` pair.

    Attributes:
        records: the records, as :class:`~relay.records.SpotRecord` (filtered by ``codes``);
            in columns mode built on first use.
        first_seq, last_seq: sequence numbers of the first and last message of the batch
            (``None`` from a producer that sends none).
        run_id: the relay run that published it (changes when the relay restarts).
        source: ``"qmt"``, ``"simulator"`` or ``"replay"``.
        publish_time_ms: when the relay published it, epoch milliseconds.
        snapshot: ``True`` for the full-market snapshot a subscriber fetches on connecting.
    """

    __slots__ = ("_columns", "_keep", "_messages", "_positions", "_records", "first_seq",
                 "last_seq", "publish_time_ms", "run_id", "snapshot", "source")

    def __init__(self, records: Optional[List[SpotRecord]], first_seq: Optional[int],
                 last_seq: Optional[int], run_id: Optional[str], source: Optional[str],
                 publish_time_ms: Optional[int], snapshot: bool = False, *,
                 messages: Sequence[Message] = (), keep: Optional[CodeFilter] = None) -> None:
        if records is None and not messages:
            records = []
        self._records = records
        self._messages = list(messages)
        self._keep = keep  # applied to the messages; ``records`` are filtered already
        self._positions: Any = _NOT_YET
        self.first_seq = first_seq
        self.last_seq = last_seq
        self.run_id = run_id
        self.source = source
        self.publish_time_ms = publish_time_ms
        self.snapshot = snapshot
        self._columns: Optional[Dict[str, List[Any]]] = None

    @classmethod
    def of_messages(cls, messages: Sequence[Message], keep: Optional[CodeFilter] = None, *,
                    records: bool = True, snapshot: bool = False) -> Batch:
        """A batch of ``messages``: their records now (``records=True``) or on demand."""
        first, last = messages[0], messages[-1]
        recs: Optional[List[SpotRecord]] = None
        if records:
            recs = []
            for message in messages:
                recs.extend(message.records())
            if keep is not None:
                recs = keep.filter(recs)
        return cls(recs, first.seq, last.seq, first.run_id, first.source,
                   first.publish_time_ms, snapshot, messages=messages, keep=keep)

    @property
    def records(self) -> List[SpotRecord]:
        if self._records is None:
            records: List[SpotRecord] = []
            for message in self._messages:
                records.extend(message.records())
            if self._keep is not None:
                records = self._keep.filter(records)
            self._records = records
        return self._records

    def __len__(self) -> int:
        if self._records is not None:
            return len(self._records)
        if self._keep is None:
            return sum(message.n for message in self._messages)
        parts = self._arrays()
        if parts is not None:
            return len(self._array_positions(parts))
        return len(self.columns["code"])

    def __iter__(self) -> Iterator[SpotRecord]:
        return iter(self.records)

    def __repr__(self) -> str:
        kind = "snapshot" if self.snapshot else "batch"
        return (f"<{kind} {len(self)} records seq {self.first_seq}..{self.last_seq} "
                f"run {self.run_id} source {self.source}>")

    @property
    def columns(self) -> Dict[str, List[Any]]:
        """Every field as a list, in schema order (books: one tuple per record); cached.

        Needs nothing but the standard library; in columns mode no record objects are built.
        """
        if self._columns is None:
            if self._records is not None:
                self._columns = columns_of(self._records)
            else:
                self._columns = self._message_lists()
        return self._columns

    def _message_lists(self) -> Dict[str, List[Any]]:
        cols: Dict[str, List[Any]] = {name: [] for name in FIELDS}
        for message in self._messages:
            body = message.lists()
            if isinstance(body, SpotColumns):
                with _acyclic():
                    for i, name in enumerate(FIELDS):
                        col = getattr(body, name)
                        cols[name].extend(_rows(col, body.levels, body.n) if i in _BOOK_IDS
                                          else _plain(col))
            else:
                for name, col in columns_of(body).items():
                    cols[name].extend(col)
        if self._keep is not None:
            keep = self._keep.positions(cols["code"], cols["market"])
            cols = {name: [col[i] for i in keep] for name, col in cols.items()}
        return cols

    @property
    def symbols(self) -> List[str]:
        """``"600000.SH"``-style symbols, one per record."""
        cols = self.columns
        return [f"{c}.{m}" for c, m in zip(cols["code"], cols["market"])]

    def to_numpy(self) -> Dict[str, Any]:
        """The batch as a dict of NumPy arrays, one per field (needs NumPy).

        Strings are ``str`` arrays (``<U``, as wide as the longest value; NumPy drops
        trailing NUL characters); prices, amount and volume ``float64``; each book field a
        2-D ``float64`` array of shape ``(records, levels)`` (shorter books padded with NaN).
        ``time_ms``, ``status`` and ``trade_count`` are ``int64``; a field that no record
        carries (a plain hikyuu producer) is left out, and one that only some records carry
        is ``float64`` with NaN where absent.

        Uniform messages (the relay's own) are read column by column straight out of their
        buffers, without record objects; any other batch goes through its records. Both
        give identical arrays.
        """
        from relay.client._columns import batch_arrays, records_arrays  # noqa: PLC0415

        parts = self._arrays()
        if parts is None:
            return records_arrays(self.records)
        return batch_arrays(parts, self._array_positions(parts))

    def _arrays(self) -> Optional[List[Any]]:
        """Every message's NumPy columns, or ``None`` if a message is not uniform."""
        if not self._messages:
            return None
        parts = []
        for message in self._messages:
            part = message.arrays()
            if part is None:
                return None
            parts.append(part)
        return parts

    def _array_positions(self, parts: List[Any]) -> Any:
        if self._keep is None:
            return None
        if self._positions is _NOT_YET:
            import numpy as np  # noqa: PLC0415 - optional dependency

            codes = np.concatenate([part.strings[1] for part in parts]).tolist()
            markets = np.concatenate([part.strings[0] for part in parts]).tolist()
            self._positions = np.array(self._keep.positions(codes, markets), dtype=np.intp)
        return self._positions

    def to_pandas(self) -> Any:
        """The batch as a ``pandas.DataFrame`` indexed by symbol (needs pandas).

        One column per scalar field; book levels become ``bid1 .. bidN``,
        ``bid_amount1 .. bid_amountN``, ``ask1 ..``, ``ask_amount1 ..``. Fields that no
        record carries are left out (see :meth:`to_numpy`).
        """
        import numpy as np  # noqa: PLC0415 - optional dependency

        # Optional dependency, typed as Any: pandas ships no type hints of its own.
        pd: Any = importlib.import_module("pandas")

        arrays = self.to_numpy()
        data: Dict[str, Any] = {}
        for name in FIELDS:
            if name not in arrays:
                continue
            arr = arrays[name]
            if name in BOOK_FIELDS:
                for level in range(arr.shape[1]):
                    data[f"{name}{level + 1}"] = arr[:, level]
            else:
                data[name] = arr
        text: Any = getattr(np, "strings", None) or np.char  # np.strings: NumPy >= 2
        symbols = text.add(text.add(arrays["code"], "."), arrays["market"])
        index = pd.Index(symbols, name="symbol", dtype=object)
        return pd.DataFrame(data, index=index, copy=False)
