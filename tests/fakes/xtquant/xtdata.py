"""A faithful, hostile fake of ``xtquant.xtdata`` (MiniQMT's Python API) for tests.

Same function names, signatures and return conventions as the real module (xtquant
250807), for the calls the relay makes:

- ``connect(ip='', port=None, remember_if_success=True)`` returns the existing client while
  it is connected, else makes a new one; raises a plain ``Exception`` ("无法连接xtquant服务…")
  when MiniQMT is unreachable. ``reconnect`` shuts the old client down first;
  ``disconnect`` drops it (the next call reconnects). Each new connection prints a banner
  to stdout unless ``enable_hello = False``.
- Every other function goes through ``get_client()``, which silently reconnects: during an
  outage any call raises the plain ``Exception``; afterwards the next call quietly gets a
  brand-new client with no subscriptions.
- ``subscribe_whole_quote(code_list, callback=None)`` takes market codes or security codes
  and returns a subscription number > 0, or -1. Callbacks run on the fake's own push thread
  through the same wrapper as the real one (exceptions are printed and swallowed). The first
  push of a subscription is the full snapshot of its codes, later ones only what changed.
- ``get_full_tick`` records carry ``timetag`` strings, whole-number prices as ints and no
  ``pvolume`` (JSON round trip, as the real one ``json.loads`` its answer).
- ``get_holidays()`` returns 8-digit strings; ``get_trading_dates`` epoch milliseconds of
  China midnights; ``get_trading_calendar`` 8-digit strings for SH/SZ only.

Ticks come from :class:`relay.sources.simulator.SimulatedMarket` (a trading day from 09:30,
one simulated push interval of 3 s per real ``push_interval``).

The control object ``_fake`` (a :class:`FakeMiniQMT`) switches hostile behaviour on:
``fail_subscribes`` (next N subscribes return -1), ``refuse_connects``, :meth:`drop` /
:meth:`restore` (outage), :meth:`restart` (MiniQMT restarted: old client and subscriptions
gone), :meth:`stall` (subscriptions stay but go silent), ``seed_zero`` (first push carries
``time == 0`` records), ``malformed`` (next push carries N bad ticks), ``call_delay`` (slow
calls), ``markets_without_indices`` (market subscriptions leave indices out). Calls from
two threads at once raise ``AssertionError`` (xtquant's native client asserts) and are
counted in ``violations``.

For a relay run as a subprocess, environment variables read at import configure it:
``FAKE_XTDATA_SECURITIES``, ``FAKE_XTDATA_PUSH_INTERVAL``, ``FAKE_XTDATA_FAIL_SUBSCRIBES``,
``FAKE_XTDATA_LOG`` (JSON lines: every call, and an ``exit`` line listing subscriptions
still active on a live client), ``FAKE_XTDATA_CONTROL`` (a file polled by the push thread;
each new line is a command: ``drop``, ``restore``, ``restart``, ``stall``,
``fail_subscribes N``, ``malformed N``).
"""

# The real module keeps its client in module globals and its messages in Chinese; so does
# the fake.
# ruff: noqa: PLW0603, RUF001

from __future__ import annotations

import atexit
import functools
import json
import os
import threading
import time
import traceback
from datetime import date, timedelta
from typing import Any, Callable, Dict, List, Optional, Set, Tuple, TypeVar

from relay.sources.simulator import SimulatedMarket, china_ms

__all__ = [
    "connect",
    "disconnect",
    "download_history_data",
    "download_history_data2",
    "get_client",
    "get_full_tick",
    "get_holidays",
    "get_instrument_detail",
    "get_market_data_ex",
    "get_stock_list_in_sector",
    "get_trading_calendar",
    "get_trading_dates",
    "reconnect",
    "run",
    "subscribe_whole_quote",
    "unsubscribe_quote",
]

enable_hello = True
debug_mode = 0

UNREACHABLE = "无法连接xtquant服务，请检查QMT-投研版或QMT-极简版是否开启"
FAKE_DAY = date(2024, 12, 2)   # a Monday
_PRICE_KEYS = ("lastPrice", "open", "high", "low", "lastClose")

_F = TypeVar("_F", bound=Callable[..., Any])
_memory_state: Dict[str, Any] = {}   # the history cache without FAKE_XTDATA_HISTORY


class _Subscription:
    def __init__(self, seq: int, codes: Set[str], callback: Optional[Callable[[Any], None]]):
        self.seq = seq
        self.codes = codes
        self.callback = callback
        self.initial_sent = False
        self.silent = False


class _Client:
    """What ``get_client()`` returns: alive until shut down or MiniQMT goes away."""

    def __init__(self, server: FakeMiniQMT, number: int, epoch: int) -> None:
        self._server = server
        self.number = number
        self._epoch = epoch
        self._alive = True
        self.subs: Dict[int, _Subscription] = {}

    def is_connected(self) -> bool:
        s = self._server
        return self._alive and s.up and self._epoch == s.epoch

    def shutdown(self) -> None:
        with self._server.lock:
            self._alive = False
            self.subs.clear()

    def __repr__(self) -> str:
        return f"<fake xtquant client {self.number}>"


class FakeMiniQMT:
    """MiniQMT as the fake sees it: a market, clients, hostile switches, a call log."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.guard = threading.Lock()
        self._thread: Optional[threading.Thread] = None
        self._halt = threading.Event()
        self.reset()

    # -- test control -----------------------------------------------------------------------

    def reset(self, *, securities: int = 60, push_interval: float = 0.05,
              fail_subscribes: int = 0, refuse_connects: int = 0, seed_zero: bool = False,
              markets_without_indices: bool = False, call_delay: float = 0.0,
              holidays: Tuple[str, ...] = ("20250101",), log_path: Optional[str] = None,
              control_path: Optional[str] = None) -> None:
        """Stop the push thread and start over with a fresh market and no clients."""
        global _client
        self.stop()
        with self.lock:
            _client = None
            self.market = SimulatedMarket(seed=11, securities=securities, trading_date=FAKE_DAY,
                                          push_interval=3.0)
            self.sim_ms = china_ms(FAKE_DAY, 9, 30)
            self.latest: Dict[str, Dict[str, Any]] = self.market.snapshot(self.sim_ms)
            self.push_interval = push_interval
            self.fail_subscribes = fail_subscribes
            self.refuse_connects = refuse_connects
            self.seed_zero = seed_zero
            self.markets_without_indices = markets_without_indices
            self.call_delay = call_delay
            self.holidays = list(holidays)
            self.malformed = 0
            self.up = True
            self.epoch = 0
            self.clients: List[_Client] = []
            self.next_seq = 1
            self.calls: List[Dict[str, Any]] = []
            self.threads: Set[int] = set()
            self.violations = 0
            self.pushes = 0
            self.log_path = log_path
            self.control_path = control_path
            self._control_done = 0
            _memory_state.clear()

    def drop(self) -> None:
        """MiniQMT goes away: every client disconnects, every call raises until restore()."""
        with self.lock:
            self.up = False
            self.epoch += 1
        self._record("_fake.drop")

    def restore(self) -> None:
        """MiniQMT is back; the next call gets a new client with no subscriptions."""
        with self.lock:
            self.up = True
        self._record("_fake.restore")

    def restart(self) -> None:
        """MiniQMT restarted (daily re-login): old client and subscriptions are gone."""
        with self.lock:
            self.epoch += 1
        self._record("_fake.restart")

    def stall(self) -> None:
        """Every current subscription stays but goes silent (cured by resubscribing)."""
        with self.lock:
            for client in self.clients:
                for sub in client.subs.values():
                    sub.silent = True
        self._record("_fake.stall")

    def stop(self) -> None:
        """Stop the push thread (tests call it at teardown)."""
        thread = self._thread
        self._halt.set()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)
        self._thread = None
        self._halt = threading.Event()

    @property
    def live_client(self) -> Optional[_Client]:
        live = [c for c in self.clients if c.is_connected()]
        return live[-1] if live else None

    def active_subscriptions(self) -> List[int]:
        """Subscription numbers still held on a live client."""
        client = self.live_client
        return sorted(client.subs) if client is not None else []

    def calls_named(self, name: str) -> List[Dict[str, Any]]:
        return [c for c in self.calls if c["call"] == name]

    # -- server side ------------------------------------------------------------------------

    def _record(self, call: str, **info: Any) -> None:
        entry = {"call": call, "thread": threading.get_ident(), **info}
        self.calls.append(entry)
        if self.log_path:
            with open(self.log_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(entry, ensure_ascii=False, default=str) + "\n")

    def _accept(self) -> _Client:
        with self.lock:
            if not self.up or self.refuse_connects > 0:
                self.refuse_connects = max(0, self.refuse_connects - 1)
                raise Exception(UNREACHABLE)
            client = _Client(self, len(self.clients) + 1, self.epoch)
            self.clients.append(client)
            self._ensure_thread()
            return client

    def _ensure_thread(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._pump, args=(self._halt,),
                                            name="fake-xtquant-push", daemon=True)
            self._thread.start()

    def _expand(self, code_list: Any) -> Set[str]:
        boards = self.market.boards
        codes: Set[str] = set()
        for code in code_list or ():
            if not isinstance(code, str):
                continue
            if "." in code:
                if code in boards:
                    codes.add(code)
                continue
            for symbol, board in boards.items():
                if symbol.endswith("." + code) and not (
                        self.markets_without_indices and board == "index"):
                    codes.add(symbol)
        return codes

    def _pump(self, halt: threading.Event) -> None:
        while not halt.wait(self.push_interval):
            self._poll_control()
            deliveries: List[Tuple[Callable[[Any], None], Dict[str, Any]]] = []
            with self.lock:
                if not self.up:
                    continue
                self.sim_ms = self.market.next_push_time(self.sim_ms)
                batch = self.market.step(self.sim_ms)
                self.latest.update(batch)
                bad = _malformed(self.malformed)
                self.malformed = 0
                for client in self.clients:
                    if not client.is_connected():
                        continue
                    for sub in client.subs.values():
                        if sub.silent or sub.callback is None:
                            continue
                        if not sub.initial_sent:
                            sub.initial_sent = True
                            payload = {c: dict(self.latest[c]) for c in sub.codes}
                            if self.seed_zero:
                                for tick in payload.values():
                                    tick["time"] = 0
                        else:
                            payload = {c: t for c, t in batch.items() if c in sub.codes}
                        if bad:
                            payload.update(bad)
                            bad = {}
                        if payload:
                            deliveries.append((sub.callback, payload))
                self.pushes += 1
            for callback, payload in deliveries:
                callback(payload)

    def _poll_control(self) -> None:
        path = self.control_path
        if not path or not os.path.exists(path):
            return
        with open(path, encoding="utf-8") as f:
            lines = [line.split() for line in f.read().splitlines() if line.strip()]
        for words in lines[self._control_done:]:
            self._control_done += 1
            command, args = words[0], words[1:]
            if command in ("drop", "restore", "restart", "stall"):
                getattr(self, command)()
            elif command in ("fail_subscribes", "malformed"):
                setattr(self, command, int(args[0]))
            self._record("_fake.control", command=" ".join(words))

    def _exit_report(self) -> None:
        self.stop()
        self._record("exit", active=self.active_subscriptions(), violations=self.violations,
                     threads=len(self.threads))


def _malformed(count: int) -> Dict[str, Any]:
    """Bad ticks as a broken feed might send them."""
    kinds: List[Tuple[str, Any]] = [
        ("BAD", {"time": 1733118954000}),
        ("600999.SH", None),
        ("600998.SH", {"time": 1733118954000, "lastPrice": float("nan")}),
        ("600997.SH", {"time": "yesterday", "lastPrice": 1.0}),
    ]
    return dict(kinds[i % len(kinds)] for i in range(count))


_fake = FakeMiniQMT()
_client: Optional[_Client] = None
_client_last_spec: Tuple[str, Any] = ("", None)


def _from_environment() -> None:
    env = os.environ
    if not any(k.startswith("FAKE_XTDATA_") for k in env):
        return
    _fake.reset(
        securities=int(env.get("FAKE_XTDATA_SECURITIES", "60")),
        push_interval=float(env.get("FAKE_XTDATA_PUSH_INTERVAL", "0.05")),
        fail_subscribes=int(env.get("FAKE_XTDATA_FAIL_SUBSCRIBES", "0")),
        refuse_connects=int(env.get("FAKE_XTDATA_REFUSE_CONNECTS", "0")),
        log_path=env.get("FAKE_XTDATA_LOG"),
        control_path=env.get("FAKE_XTDATA_CONTROL"),
    )
    atexit.register(_fake._exit_report)


_from_environment()


def _api(fn: _F) -> _F:
    """One call at a time, like xtquant's native client, which asserts otherwise."""

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        fake = _fake
        if not fake.guard.acquire(blocking=False):
            fake.violations += 1
            raise AssertionError("xtquant client: concurrent calls from several threads")
        try:
            fake.threads.add(threading.get_ident())
            if fake.call_delay:
                time.sleep(fake.call_delay)
            return fn(*args, **kwargs)
        finally:
            fake.guard.release()

    return call  # type: ignore[return-value]


# -- connection ---------------------------------------------------------------------------


def _connect(ip: str = "", port: Any = None, remember_if_success: bool = True) -> _Client:
    global _client, _client_last_spec
    if _client is not None:
        if _client.is_connected():
            return _client
        _client.shutdown()
        _client = None
    if not port and ip not in ("", "127.0.0.1", "localhost"):
        raise Exception("远程地址不支持仅输入IP")
    try:
        client = _fake._accept()
    except Exception:
        _fake._record("connect", ok=False)
        raise
    _client = client
    if remember_if_success:
        _client_last_spec = (ip, port)
    _fake._record("connect", ok=True, client=client.number)
    if enable_hello:
        print(f"***** xtdata连接成功 (fake client {client.number}) *****\n"
              "设置xtdata.enable_hello = False可隐藏此消息\n")
    return client


def _get_client() -> _Client:
    global _client
    if _client is None or not _client.is_connected():
        ip, port = _client_last_spec
        _client = _connect(ip, port, False)
    return _client


@_api
def connect(ip: str = "", port: Any = None, remember_if_success: bool = True) -> _Client:
    return _connect(ip, port, remember_if_success)


@_api
def reconnect(ip: str = "", port: Any = None, remember_if_success: bool = True) -> _Client:
    global _client
    if _client is not None:
        _client.shutdown()
        _client = None
    return _connect(ip, port, remember_if_success)


@_api
def disconnect() -> None:
    global _client
    if _client is not None:
        _client.shutdown()
        _client = None
    _fake._record("disconnect")


@_api
def get_client() -> _Client:
    return _get_client()


@_api
def run() -> None:
    client = _get_client()
    while True:
        time.sleep(3)
        if not client.is_connected():
            raise Exception("行情服务连接断开")


# -- quotes -------------------------------------------------------------------------------


def _wrap_callback(callback: Callable[[Any], None]) -> Callable[[Any], None]:
    def subscribe_callback(datas: Any) -> None:
        try:
            if callback:
                callback(datas)
        except Exception:
            print("subscribe callback error:", callback)
            traceback.print_exc()

    return subscribe_callback


@_api
def subscribe_whole_quote(code_list: Any, callback: Optional[Callable[[Any], None]] = None
                          ) -> int:
    client = _get_client()
    fake = _fake
    with fake.lock:
        if fake.fail_subscribes > 0:
            fake.fail_subscribes -= 1
            fake._record("subscribe_whole_quote", codes=len(code_list), result=-1)
            return -1
        seq = fake.next_seq
        fake.next_seq += 1
        wrapped = _wrap_callback(callback) if callback else None
        client.subs[seq] = _Subscription(seq, fake._expand(code_list), wrapped)
    fake._record("subscribe_whole_quote", codes=len(code_list), first=list(code_list)[:1],
                 client=client.number, result=seq)
    return seq


@_api
def unsubscribe_quote(seq: int) -> None:
    client = _get_client()
    with _fake.lock:
        found = client.subs.pop(seq, None) is not None
    _fake._record("unsubscribe_quote", seq=seq, client=client.number, found=found)


def _full_tick_record(tick: Dict[str, Any]) -> Dict[str, Any]:
    record = dict(tick)
    record.pop("pvolume", None)
    ms = int(record.get("time") or 0)
    if ms:
        t = time.gmtime(ms / 1000 + 8 * 3600)
        record["timetag"] = time.strftime("%Y%m%d %H:%M:%S", t)
    for key in _PRICE_KEYS:
        value = record.get(key)
        if isinstance(value, float) and value.is_integer():
            record[key] = int(value)
    return record


@_api
def get_full_tick(code_list: Any) -> Dict[str, Any]:
    _get_client()
    fake = _fake
    with fake.lock:
        codes = fake._expand(code_list)
        data = {c: _full_tick_record(fake.latest[c]) for c in sorted(codes)}
    fake._record("get_full_tick", codes=len(code_list), result=len(data))
    result: Dict[str, Any] = json.loads(json.dumps(data))
    return result


# -- reference data -----------------------------------------------------------------------

_SECTORS: Dict[str, Tuple[Tuple[str, ...], Tuple[str, ...]]] = {
    "沪深A股": (("SH", "SZ"), ("main", "st", "star", "chinext")),
    "京市A股": (("BJ",), ("bj",)),
    "沪深指数": (("SH", "SZ"), ("index",)),
    "沪深ETF": (("SH", "SZ"), ("etf",)),
}


@_api
def get_stock_list_in_sector(sector_name: str, real_timetag: Any = -1) -> List[str]:
    _get_client()
    markets, boards = _SECTORS.get(sector_name, ((), ()))
    found = [s for s, b in _fake.market.boards.items() if b in boards and s[-2:] in markets]
    _fake._record("get_stock_list_in_sector", sector=sector_name, result=len(found))
    return sorted(found)


@_api
def get_instrument_detail(stock_code: str, iscomplete: bool = False) -> Optional[Dict[str, Any]]:
    _get_client()
    market = _fake.market
    name = market.names.get(stock_code)
    if name is None:
        return None
    code, _, exchange = stock_code.partition(".")
    tick = _fake.latest.get(stock_code, {})
    return {
        "ExchangeID": exchange, "InstrumentID": code, "InstrumentName": name,
        "ProductID": "", "ProductName": "", "ProductType": None, "ExchangeCode": code,
        "UniCode": code, "CreateDate": "0", "OpenDate": "19991110", "ExpireDate": "99999999",
        "TradingDay": FAKE_DAY.strftime("%Y%m%d"), "PreClose": tick.get("lastClose"),
        "SettlementPrice": 0.0, "UpStopPrice": 0.0, "DownStopPrice": 0.0,
        "FloatVolume": 1.0e9, "TotalVolume": 1.0e9, "LongMarginRatio": None,
        "ShortMarginRatio": None, "PriceTick": 0.01, "VolumeMultiple": 1, "MainContract": None,
        "LastVolume": None, "InstrumentStatus": 0, "IsTrading": None, "IsRecent": None,
        "ProductTradeQuota": None, "ContractTradeQuota": None,
        "ProductOpenInterestQuota": None, "ContractOpenInterestQuota": None,
    }


def _trading_days(start: date, end: date) -> List[date]:
    holidays = {h for h in _fake.holidays}
    days = []
    day = start
    while day <= end:
        if day.weekday() < 5 and day.strftime("%Y%m%d") not in holidays:
            days.append(day)
        day += timedelta(days=1)
    return days


def _range(start_time: str, end_time: str) -> Tuple[date, date]:
    start = FAKE_DAY - timedelta(days=60)
    end = FAKE_DAY
    if start_time:
        start = date(int(start_time[:4]), int(start_time[4:6]), int(start_time[6:8]))
    if end_time:
        end = date(int(end_time[:4]), int(end_time[4:6]), int(end_time[6:8]))
    return start, end


@_api
def get_holidays() -> List[str]:
    _get_client()
    return [str(d) for d in _fake.holidays]


@_api
def get_trading_dates(market: str, start_time: str = "", end_time: str = "",
                      count: int = -1) -> List[int]:
    _get_client()
    days = [china_ms(d, 0, 0) for d in _trading_days(*_range(start_time, end_time))]
    return days[-count:] if count > 0 else days


@_api
def get_trading_calendar(market: str, start_time: str = "", end_time: str = "") -> List[str]:
    if market not in ("SH", "SZ"):
        raise Exception("暂不支持除SH,SZ以外市场的交易日历")
    _get_client()
    return [d.strftime("%Y%m%d") for d in _trading_days(*_range(start_time, end_time))]


# -- history (K-lines) --------------------------------------------------------------------
#
# MiniQMT keeps downloaded K-lines in a local cache on its side, so it outlives a client (and
# the process that made it). The fake keeps that cache, and the hostile switches for history,
# in a JSON file named by FAKE_XTDATA_HISTORY (shared by every process that imports the fake),
# or in memory without it. Keys: "cache" {period: [codes]}, "hang" (the next N downloads never
# finish), "drop" (the next N downloads lose the connection half-way), "fail_total" (the next
# N downloads report total < 0), "no_data" [codes] (progress carries a message; no bars),
# "bad" [codes] (their frames carry NaN, zero, high < low, duplicate and out-of-order rows).
#
# Bars exist for trading days from HISTORY_FIRST (later for some codes: listing) to the day
# before FAKE_DAY; a code is suspended on some days (returned as flat, zero-volume bars with
# suspendFlag 1 only when fill_data=True). Some codes' prices come back as int64 columns
# (whole-yuan prices) and some volumes as float64, as pandas frames from the real API can.

HISTORY_FIRST = date(2024, 10, 1)
_PERIOD_MINUTES = {"1m": 1, "5m": 5}


def _hist_state() -> Dict[str, Any]:
    path = os.environ.get("FAKE_XTDATA_HISTORY")
    if not path:
        return _memory_state
    try:
        with open(path, encoding="utf-8") as f:
            state: Dict[str, Any] = json.load(f)
            return state
    except (OSError, ValueError):
        return {}


def _hist_save(state: Dict[str, Any]) -> None:
    path = os.environ.get("FAKE_XTDATA_HISTORY")
    if not path:
        _memory_state.clear()
        _memory_state.update(state)
        return
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(state, f)
    os.replace(tmp, path)


def _take(state: Dict[str, Any], key: str) -> bool:
    """Use up one of the next-N hostile switch ``key``."""
    if int(state.get(key, 0)) > 0:
        state[key] = int(state[key]) - 1
        _hist_save(state)
        return True
    return False


def _code_hash(code: str) -> int:
    import zlib

    return zlib.crc32(code.encode())


def _listing(code: str) -> date:
    h = _code_hash(code)
    return HISTORY_FIRST + timedelta(days=(h % 3) * 7) if h % 4 == 0 else HISTORY_FIRST


def _fake_days(code: str, start: date, end: date) -> List[Tuple[date, bool]]:
    """(day, suspended) of the code's trading days in [start, end]."""
    first = max(start, _listing(code))
    last = min(end, FAKE_DAY - timedelta(days=1))
    h = _code_hash(code)
    return [(d, (h + d.toordinal()) % 13 == 0) for d in _trading_days(first, last)]


def _day_prices(code: str, day: date) -> Tuple[float, float, float, float]:
    import math

    h = _code_hash(code)
    base = 4.0 + h % 40
    close = round(base * (1.0 + 0.06 * math.sin(day.toordinal() * 0.37 + h % 17)), 2)
    open_ = round(close * (1.0 + 0.01 * math.cos(day.toordinal() * 0.91 + h % 5)), 2)
    high = round(max(open_, close) * 1.012, 2)
    low = round(min(open_, close) * 0.988, 2)
    return open_, high, low, close


def _frame(code: str, period: str, start: date, end: date, fill_data: bool) -> Any:
    import pandas as pd

    h = _code_hash(code)
    rows: List[Dict[str, Any]] = []
    index: List[str] = []
    prev_close = None
    for day, suspended in _fake_days(code, start, end):
        o, hi, lo, c = _day_prices(code, day)
        stamp = day.strftime("%Y%m%d")
        if suspended:
            if fill_data and prev_close is not None:
                flat = prev_close
                if period == "1d":
                    index.append(stamp)
                    rows.append({"time": china_ms(day, 0, 0), "open": flat, "high": flat,
                                 "low": flat, "close": flat, "volume": 0, "amount": 0.0,
                                 "preClose": flat, "suspendFlag": 1})
            continue
        lots = 1000 + (h + day.toordinal()) % 700
        if period == "1d":
            index.append(stamp)
            rows.append({"time": china_ms(day, 0, 0), "open": o, "high": hi, "low": lo,
                         "close": c, "volume": lots, "amount": lots * 100.0 * (o + c) / 2,
                         "preClose": prev_close or o, "suspendFlag": 0})
        else:
            step = _PERIOD_MINUTES[period]
            ends = [m for m in range(9 * 60 + 30 + step, 11 * 60 + 31, step)]
            ends += [m for m in range(13 * 60 + step, 15 * 60 + 1, step)]
            price = o
            for k, minute in enumerate(ends):
                frac = (k + 1) / len(ends)
                nxt = round(o + (c - o) * frac + 0.01 * ((k * 7 + h) % 5 - 2), 2)
                nxt = min(hi, max(lo, nxt)) if k < len(ends) - 1 else c
                top, bottom = max(price, nxt), min(price, nxt)
                v = 3 + (h + k) % 9
                index.append(f"{stamp}{minute // 60:02d}{minute % 60:02d}00")
                rows.append({"time": china_ms(day, minute // 60, minute % 60), "open": price,
                             "high": top, "low": bottom, "close": nxt, "volume": v,
                             "amount": v * 100.0 * (price + nxt) / 2, "preClose": 0.0,
                             "suspendFlag": 0})
                price = nxt
        prev_close = c
    columns = ["time", "open", "high", "low", "close", "volume", "amount",
               "settelementPrice", "openInterest", "preClose", "suspendFlag"]
    frame = pd.DataFrame(rows, index=index, columns=columns)
    frame["settelementPrice"] = 0.0
    frame["openInterest"] = 0
    if not len(frame):
        return frame
    frame["time"] = frame["time"].astype("int64")
    frame["volume"] = frame["volume"].astype("int64")
    if h % 5 == 0:      # whole-yuan prices arrive as ints
        for col in ("open", "high", "low", "close"):
            frame[col] = frame[col].round().astype("int64")
    elif h % 5 == 1:    # float noise
        frame["close"] = frame["close"] + 1e-12
    if h % 3 == 0:
        frame["volume"] = frame["volume"].astype("float64")
    return frame


def _bad_frame(frame: Any) -> Any:
    """NaN, zero, high < low, a duplicate and an out-of-order row."""
    import pandas as pd

    if len(frame) < 8:
        return frame
    frame = frame.astype({"open": "float64", "high": "float64", "low": "float64",
                          "close": "float64"})
    frame.iloc[1, frame.columns.get_loc("close")] = float("nan")
    frame.iloc[2, frame.columns.get_loc("open")] = 0.0
    frame.iloc[3, frame.columns.get_loc("high")] = frame.iloc[3]["low"] - 0.5
    parts = [frame.iloc[:5], frame.iloc[4:5], frame.iloc[6:7], frame.iloc[5:6], frame.iloc[7:]]
    return pd.concat(parts)


def _parse_day(text: str, default: date) -> date:
    if not text:
        return default
    return date(int(text[:4]), int(text[4:6]), int(text[6:8]))


@_api
def download_history_data2(stock_list: List[str], period: str, start_time: str = "",
                           end_time: str = "", callback: Optional[Callable[[Any], None]] = None,
                           incrementally: Optional[bool] = None) -> Dict[str, Any]:
    client = _get_client()
    if period not in ("1d", "1m", "5m", "tick"):
        raise Exception(f"不支持的周期: {period}")
    state = _hist_state()
    _fake._record("download_history_data2", codes=len(stock_list), period=period,
                  start=start_time, end=end_time)
    if _take(state, "fail_total"):
        if callback:
            _wrap_callback(callback)({"finished": 0, "total": -1, "stockcode": "",
                                      "message": "服务器错误"})
        raise Exception("下载数据失败：服务器错误")
    hang = _take(state, "hang")
    drop = _take(state, "drop")
    no_data = set(state.get("no_data", []))
    total = len(stock_list)
    cache = state.setdefault("cache", {}).setdefault(period, [])
    result: Dict[str, Any] = {}
    # progress goes to the callback on a thread of its own, as xtquant's callbacks do
    import queue

    updates: queue.Queue[Optional[Dict[str, Any]]] = queue.Queue()
    wrapped = _wrap_callback(callback) if callback else None

    def deliver() -> None:
        while True:
            item = updates.get()
            if item is None:
                return
            if wrapped is not None:
                wrapped(item)

    thread = threading.Thread(target=deliver, name="fake-xtquant-download", daemon=True)
    thread.start()
    try:
        for i, code in enumerate(stock_list):
            if hang and i >= total // 2:
                _hist_save(state)
                while True:          # progress stops; the real call polls forever
                    time.sleep(0.1)
            if drop and i >= total // 2:
                _hist_save(state)
                client.shutdown()
                raise Exception("行情服务连接断开")
            message = "无数据" if code in no_data or code not in _fake.market.names else ""
            if not message and code not in cache:
                cache.append(code)
            if not message:
                result[code] = {"start_time": start_time, "end_time": end_time}
            updates.put({"finished": i + 1, "total": total, "stockcode": code,
                         "message": message})
        _hist_save(state)
    finally:
        updates.put(None)
        thread.join()
    return result


@_api
def download_history_data(stock_code: str, period: str, start_time: str = "",
                          end_time: str = "", incrementally: Optional[bool] = None) -> None:
    _get_client()
    state = _hist_state()
    _fake._record("download_history_data", code=stock_code, period=period)
    if stock_code in set(state.get("no_data", [])) or stock_code not in _fake.market.names:
        return
    cache = state.setdefault("cache", {}).setdefault(period, [])
    if stock_code not in cache:
        cache.append(stock_code)
        _hist_save(state)


@_api
def get_market_data_ex(field_list: Optional[List[str]] = None,
                       stock_list: Optional[List[str]] = None, period: str = "1d",
                       start_time: str = "", end_time: str = "", count: int = -1,
                       dividend_type: str = "none", fill_data: bool = True) -> Dict[str, Any]:
    _get_client()
    state = _hist_state()
    cache = set(state.get("cache", {}).get(period, []))
    bad = set(state.get("bad", []))
    start = _parse_day(start_time, HISTORY_FIRST)
    end = _parse_day(end_time, FAKE_DAY)
    out: Dict[str, Any] = {}
    for code in stock_list or []:
        if code in cache:
            frame = _frame(code, period, start, end, fill_data)
            out[code] = _bad_frame(frame) if code in bad else frame
        else:
            import pandas as pd

            out[code] = pd.DataFrame()
    _fake._record("get_market_data_ex", codes=len(stock_list or []), period=period,
                  fill_data=fill_data, dividend_type=dividend_type)
    return out


def expected_frame(code: str, period: str, start: str = "", end: str = "") -> Any:
    """The bars the fake serves for ``code`` (test helper; fill_data=False, no bad rows)."""
    return _frame(code, period, _parse_day(start, HISTORY_FIRST), _parse_day(end, FAKE_DAY),
                  False)
