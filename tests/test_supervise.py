"""Supervision: injected faults in threads and tasks are logged, counted, restarted, fatal."""

from __future__ import annotations

import asyncio
import json
import sys
import threading
from typing import Any, List

import pytest
from helpers import CollectingSink, ScriptedSource, real_tick, run_relay_with, tcp_address
from hostile import log_events
from structlog.testing import capture_logs

from relay.app import Relay
from relay.config import Config, PublishConfig, SupervisionConfig
from relay.errors import ServiceError
from relay.supervise import Supervisor, capture_crashes, loop_exception_handler


def fast(**kw: Any) -> Supervisor:
    kw.setdefault("backoff_min", 0.01)
    kw.setdefault("backoff_max", 0.02)
    return Supervisor(**kw)


def test_thread_failure_is_logged_with_traceback_and_restarted() -> None:
    """A thread that raises twice then returns: two error events with tracebacks, two restarts."""
    calls: List[int] = []

    def target() -> None:
        calls.append(1)
        if len(calls) <= 2:
            raise RuntimeError(f"boom {len(calls)}")

    sup = fast()
    with capture_logs() as logs:
        handle = sup.thread("worker", target)
        assert handle.join(10)
    failed = [e for e in logs if e["event"] == "service_failed"]
    assert 3 == len(calls)
    assert ["error", "error"] == [e["log_level"] for e in failed]
    assert isinstance(failed[0]["exc_info"], RuntimeError)
    status = sup.status()[0]
    assert ("worker", False, 2, 2) == (status.name, status.alive, status.failures,
                                       status.restarts)
    assert {"failures": 2, "services": {"worker": {"alive": False, "failures": 2,
                                                   "restarts": 2}}} == sup.summary()


def test_repeated_failures_call_the_fatal_handler_once() -> None:
    """max_failures failures within the window give up: one ServiceError, no more restarts."""
    fatal: List[ServiceError] = []
    sup = fast(max_failures=3, window=60)
    sup.set_fatal_handler(fatal.append)

    def target() -> None:
        raise ValueError("always")

    with capture_logs() as logs:
        handle = sup.thread("flaky", target)
        assert handle.join(10)
    assert 1 == len(fatal)
    assert "flaky" == fatal[0].service
    assert 3 == fatal[0].failures
    assert "always" in str(fatal[0])
    assert 1 == sum(1 for e in logs if e["event"] == "service_gave_up")


def test_failures_outside_the_window_are_not_fatal() -> None:
    """Failures spread wider than the window never add up to max_failures."""
    now = [0.0]
    sup = Supervisor(max_failures=2, window=10, backoff_min=0.001, backoff_max=0.001,
                     clock=lambda: now[0])
    calls: List[int] = []

    def target() -> None:
        calls.append(1)
        now[0] += 100  # each failure is far from the previous one
        if len(calls) < 5:
            raise OSError("transient")

    with capture_logs():
        assert sup.thread("slow", target).join(10)
    assert 5 == len(calls)
    assert sup.fatal is None


def test_stop_ends_a_backoff_wait() -> None:
    """stop() during a long backoff ends the service at once, with no restart."""
    sup = Supervisor(backoff_min=60, backoff_max=60)
    failed = threading.Event()

    def target() -> None:
        failed.set()
        raise RuntimeError("once")

    with capture_logs():
        handle = sup.thread("waiting", target)
        assert failed.wait(10)
        handle.stop()
        assert handle.join(10)
    assert 0 == handle.restarts


def test_task_failure_is_restarted_on_the_loop() -> None:
    """A supervised task that raises is awaited again after the backoff."""
    calls: List[int] = []

    async def body() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise KeyError("first")

    async def main() -> None:
        handle = fast().task("job", body)
        assert handle.task is not None
        await handle.task

    with capture_logs() as logs:
        asyncio.run(main())
    assert 2 == len(calls)
    assert 1 == sum(1 for e in logs if e["event"] == "service_failed")


def test_crash_hooks_log_instead_of_printing(capsys: pytest.CaptureFixture[str]) -> None:
    """An uncaught thread exception and an unawaited task error become error events."""

    def die() -> None:
        raise RuntimeError("thread died")

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(loop_exception_handler)
        loop.call_exception_handler({"message": "lost", "exception": ValueError("lost")})

    with capture_logs() as logs, capture_crashes():
        t = threading.Thread(target=die, name="doomed")
        t.start()
        t.join()
        asyncio.run(main())
    events = {e["event"]: e for e in logs}
    assert "doomed" == events["thread_crashed"]["thread"]
    assert "RuntimeError: thread died" in events["thread_crashed"]["traceback"]
    assert "ValueError: lost" in events["loop_exception"]["traceback"]
    assert "" == capsys.readouterr().err
    assert threading.excepthook is not None and sys.excepthook is sys.__excepthook__


class FaultySink(CollectingSink):
    """A sink whose thread (run by the relay's supervisor) always dies."""

    def __init__(self, supervisor: Supervisor) -> None:
        super().__init__()
        self._sup = supervisor

    def start(self) -> None:
        super().start()

        def work() -> None:
            raise RuntimeError("sink thread died")

        self._sup.thread("faulty", work)


def test_relay_stops_with_service_error_when_a_sink_thread_keeps_dying() -> None:
    """The relay gives up on a service that keeps failing: ServiceError after a clean stop."""
    sup = fast(max_failures=3)
    sink = FaultySink(sup)
    config = Config(publish=PublishConfig(addresses=(tcp_address(),), snapshot_address=None))
    relay = Relay(config, source=ScriptedSource([{"600000.SH": real_tick()}]), sinks=[sink],
                  supervisor=sup)
    with capture_logs(), pytest.raises(ServiceError, match="faulty failed 3 times"):
        relay.run()
    assert ["start", "close"] == sink.calls


def test_broken_source_is_restarted_then_fatal() -> None:
    """A source whose iterator keeps raising is re-run with backoff, then stops the relay."""

    class Broken(ScriptedSource):
        async def batches(self) -> Any:  # type: ignore[override]
            yield {"600000.SH": real_tick()}
            raise RuntimeError("push thread died")

    sink = CollectingSink()
    config = Config(publish=PublishConfig(addresses=(tcp_address(),), snapshot_address=None),
                    supervision=SupervisionConfig(max_failures=3, backoff_min=0.01,
                                                  backoff_max=0.01))
    relay = Relay(config, source=Broken([]), sinks=[sink])
    with capture_logs() as logs, pytest.raises(ServiceError, match="push thread died"):
        relay.run()
    assert 3 == len(sink.batches)   # published, failed, restarted: three times
    assert 2 == sum(1 for e in logs if e["event"] == "service_restarted")


def test_heartbeat_carries_service_failures(tmp_path: Any, procs: Any) -> None:
    """A relay subprocess reports its services and failure count in every heartbeat."""
    import pynng

    address = tcp_address()
    proc = run_relay_with(tmp_path, f"""
source: {{kind: simulator, simulator: {{securities: 20}}}}
publish: {{addresses: ["{address}"], snapshot_address: "{tcp_address()}",
          heartbeat_interval: 0.2}}
""", quiet=True)
    procs.append(proc)
    with pynng.Sub0(recv_timeout=20000) as sub:
        sub.subscribe(b":relay:heartbeat:")
        sub.dial(address, block=False)
        beat = json.loads(sub.recv()[len(b":relay:heartbeat:"):])
    assert 0 == beat["failures"]
    assert {"source", "heartbeat", "stats", "snapshot"} <= set(beat["services"])
    assert beat["services"]["snapshot"]["alive"]
    proc.terminate()
    assert 0 == proc.wait(20)



def test_cli_maps_a_crash_to_exit_1_and_one_log_line(
        monkeypatch: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """A bug escaping Relay.run: exit 1, a relay_crashed error event, no bare traceback."""
    from relay import cli

    def crash(self: Relay) -> None:
        raise ZeroDivisionError("bug")

    monkeypatch.setattr(Relay, "run", crash)
    code = cli.main(["run", "--publish", tcp_address(), "--snapshot", "off"])
    assert 1 == code
    out, err = capsys.readouterr()
    crashed = [e for e in log_events(out) if e["event"] == "relay_crashed"]
    assert 1 == len(crashed) and "ZeroDivisionError" in crashed[0]["error"]
    assert "Traceback (most recent call last)" in crashed[0]["exception"]  # in the JSON line
    assert "Traceback" not in err and "the relay crashed" in err


def test_cli_maps_service_error_to_exit_1(monkeypatch: Any,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """A service that kept failing ends `qmt-relay run` with exit code 1 and its reason."""
    from relay import cli

    def give_up(self: Relay) -> None:
        self.state = self.state.__class__.RUNNING
        raise ServiceError("snapshot", 5, 60.0, "RuntimeError('x')")

    monkeypatch.setattr(Relay, "run", give_up)
    with capture_logs():
        code = cli.main(["run", "--publish", tcp_address(), "--snapshot", "off"])
    assert 1 == code
    assert "service snapshot failed 5 times within 60 s" in capsys.readouterr().err
