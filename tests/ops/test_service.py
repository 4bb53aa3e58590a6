"""The Windows service shell, with pywin32's modules faked so it runs on Linux."""

from __future__ import annotations

import sys
import threading
import types
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import pytest
from helpers import no_streams

from relay import cli
from relay.config import Config, LoggingConfig, load_config
from relay.ops import service


class FakeWinError(Exception):
    def __init__(self, winerror: int, funcname: str, strerror: str) -> None:
        super().__init__(winerror, funcname, strerror)
        self.strerror = strerror


def fake_win32(state: int = 4, *, refuse: Sequence[int] = ()) -> Dict[str, Any]:
    """win32serviceutil / win32service / servicemanager / pywintypes that record calls.

    ``refuse``: the ChangeServiceConfig2 info levels the fake system refuses (as Wine does
    failure actions). Failure actions set are read back by QueryServiceConfig2.
    """
    calls: List[Any] = []
    options: Dict[str, str] = {}
    stored: Dict[int, Any] = {}

    def change_config2(handle: Any, level: int, value: Any) -> None:
        calls.append(("ChangeServiceConfig2", (handle, level, value), {}))
        if level in refuse:
            raise FakeWinError(50, "ChangeServiceConfig2", "The request is not supported.")
        stored[level] = value

    def query_config2(handle: Any, level: int) -> Any:
        calls.append(("QueryServiceConfig2", (handle, level), {}))
        return stored.get(level, {"ResetPeriod": 0, "RebootMsg": None, "Command": None,
                                  "Actions": ()})

    def rec(name: str) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            calls.append((name, args, kwargs))
            return f"handle-{name}"
        return call

    class ServiceFramework:
        def __init__(self, args: Any) -> None:
            self.args = args
            self.reported: List[Any] = []

        def ReportServiceStatus(self, status: int, waitHint: int = 5000,  # noqa: N802, N803
                                win32ExitCode: int = 0, svcExitCode: int = 0) -> None:  # noqa: N803
            self.reported.append(status if not win32ExitCode
                                 else (status, win32ExitCode, svcExitCode))
            calls.append(("ReportServiceStatus", (status,), {}))

    util = types.SimpleNamespace(
        InstallService=rec("InstallService"), RemoveService=rec("RemoveService"),
        StartService=rec("StartService"), StopService=rec("StopService"),
        QueryServiceStatus=lambda name: (16, state, 0, 0, 0, 0, 0),
        SetServiceCustomOption=lambda svc, opt, value: options.__setitem__(opt, value),
        GetServiceCustomOption=lambda svc, opt, default=None: options.get(opt, default),
        ServiceFramework=ServiceFramework,
    )
    svc = types.SimpleNamespace(
        SERVICE_AUTO_START=2, SERVICE_STOPPED=1, SERVICE_START_PENDING=2,
        SERVICE_STOP_PENDING=3, SERVICE_RUNNING=4,
        SC_MANAGER_ALL_ACCESS=0xF003F, SERVICE_ALL_ACCESS=0xF01FF, SC_ACTION_RESTART=1,
        SERVICE_CONFIG_DESCRIPTION=1, SERVICE_CONFIG_FAILURE_ACTIONS=2,
        SERVICE_CONFIG_FAILURE_ACTIONS_FLAG=4,
        OpenSCManager=rec("OpenSCManager"), OpenService=rec("OpenService"),
        ChangeServiceConfig2=change_config2, QueryServiceConfig2=query_config2,
        CloseServiceHandle=rec("CloseServiceHandle"),
    )
    manager = types.SimpleNamespace(LogInfoMsg=rec("LogInfoMsg"), LogErrorMsg=rec("LogErrorMsg"))
    return {"win32serviceutil": util, "win32service": svc, "servicemanager": manager,
            "pywintypes": types.SimpleNamespace(error=FakeWinError),
            "calls": calls, "options": options, "stored": stored}


def names(win: Dict[str, Any]) -> List[str]:
    return [c[0] for c in win["calls"]]


@pytest.mark.skipif(sys.platform == "win32", reason="the non-Windows path")
def test_non_windows_prints_clear_error_and_exits_2(capsys: Any) -> None:
    """`qmt-relay service` on Linux: a clear message and exit code 2."""
    assert 2 == cli.main(["service", "status"])
    assert "Windows only" in capsys.readouterr().err


def test_install_registers_class_config_and_failure_actions(tmp_path: Path) -> None:
    """install: auto-start service, config path remembered, restart-on-failure actions set."""
    cfg = tmp_path / "relay.yaml"
    cfg.write_text("source:\n  kind: qmt\n")
    win = fake_win32()
    code = service.service_command("install", str(cfg), username=r".\trader", password="pw",
                                   platform="win32", modules=win)
    assert 0 == code
    install = next(c for c in win["calls"] if c[0] == "InstallService")
    assert ("relay.ops.service.QmtRelayService", "qmt-relay", "QMT Relay") == install[1]
    assert 2 == install[2]["startType"] and r".\trader" == install[2]["userName"]
    assert "description" not in install[2]   # set apart, so a refusal cannot fail install
    assert str(cfg) == win["options"]["config"]
    changes = [c[1] for c in win["calls"] if c[0] == "ChangeServiceConfig2"]
    assert (1, service.DESCRIPTION) == changes[0][1:]
    actions = changes[1][2]["Actions"]
    assert [(1, 10_000), (1, 30_000), (1, 60_000)] == actions
    assert (4, True) == changes[2][1:]
    assert names(win).count("OpenService") == names(win).count("CloseServiceHandle") / 2


@pytest.fixture(autouse=True)
def _default_log_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The service's default log file, in the test's own directory (never C:\\ProgramData)."""
    path = tmp_path / "programdata" / "relay.log"
    monkeypatch.setattr(service, "DEFAULT_LOG_FILE", str(path))
    return path



@pytest.mark.parametrize(("action", "state", "expected"), [
    ("start", 4, ["StartService"]),
    ("stop", 4, ["StopService"]),
    ("remove", 4, ["StopService", "RemoveService"]),
    ("remove", 1, ["RemoveService"]),
    ("status", 4, []),
])
def test_commands_map_to_win32serviceutil(action: str, state: int, expected: List[str],
                                          capsys: Any) -> None:
    """start/stop/remove/status call the matching win32serviceutil functions."""
    win = fake_win32(state)
    assert 0 == service.service_command(action, platform="win32", modules=win)
    assert expected == [n for n in names(win) if n.endswith("Service")
                        and n not in ("OpenService", "CloseServiceHandle")]
    if action == "status":
        assert "qmt-relay: running" in capsys.readouterr().out


def test_install_warns_when_failure_actions_are_refused(capsys: Any) -> None:
    """Registered but failure actions refused (as on Wine): exit 0, a warning naming them;
    status then says no recovery actions are in place."""
    win = fake_win32(refuse=[2])
    assert 0 == service.service_command("install", platform="win32", modules=win)
    err = capsys.readouterr().err
    assert "warning: the system refused the restart-on-failure actions" in err
    assert "description" not in err
    assert 0 == service.service_command("status", platform="win32", modules=win)
    out = capsys.readouterr().out
    assert "recovery: none" in out and "qmt-relay: running" in out


def test_install_warns_when_description_is_refused(capsys: Any) -> None:
    """A refused description is a warning too; the failure actions are still set."""
    win = fake_win32(refuse=[1])
    assert 0 == service.service_command("install", platform="win32", modules=win)
    assert "refused the description" in capsys.readouterr().err
    assert 0 == service.service_command("status", platform="win32", modules=win)
    assert "recovery: restart after 10 s, 30 s, 60 s" in capsys.readouterr().out


def test_status_names_config_and_log_file(tmp_path: Path, capsys: Any) -> None:
    """status shows the config file and where the service logs."""
    cfg = tmp_path / "relay.yaml"
    cfg.write_text(f"logging:\n  file: {tmp_path / 'svc.log'}\n")
    win = fake_win32()
    assert 0 == service.service_command("install", str(cfg), platform="win32", modules=win)
    assert 0 == service.service_command("status", platform="win32", modules=win)
    out = capsys.readouterr().out
    assert f"config: {cfg}" in out and f"log file: {tmp_path / 'svc.log'}" in out


def test_status_when_recovery_cannot_be_read(capsys: Any) -> None:
    """A system that cannot read failure actions back: status says so and exits 0."""
    win = fake_win32()

    def unsupported(*_: Any) -> None:
        raise FakeWinError(120, "QueryServiceConfig2", "Not implemented.")

    win["win32service"].QueryServiceConfig2 = unsupported
    assert 0 == service.service_command("status", platform="win32", modules=win)
    assert "recovery: unknown (cannot read the failure actions: Not implemented.)" in (
        capsys.readouterr().out)


def test_start_that_stops_at_once_points_to_the_log(capsys: Any,
                                                   _default_log_file: Path) -> None:
    """start, then the service stops by itself: exit 1 naming the log file and event log."""
    win = fake_win32(1)
    assert 1 == service.service_command("start", platform="win32", modules=win,
                                        sleep=lambda _s: None)
    err = capsys.readouterr().err
    assert f"stopped at once; the reason is in its log file {_default_log_file}" in err
    assert "event log" in err


def test_start_waits_while_start_pending(capsys: Any) -> None:
    """start polls while the service is start-pending and reports the state it reached."""
    win = fake_win32()
    states = iter([2, 2, 4])
    win["win32serviceutil"].QueryServiceStatus = lambda _n: (16, next(states), 0, 0, 0, 0, 0)
    slept: List[float] = []
    assert 0 == service.service_command("start", platform="win32", modules=win,
                                        sleep=slept.append)
    assert 2 == len(slept) and "qmt-relay: running" in capsys.readouterr().out


def test_commands_without_streams_write_nothing() -> None:
    """No console at all: every action still runs and nothing touches the missing streams."""
    with no_streams():
        for action in ("install", "status", "start", "stop", "remove"):
            assert 0 == service.service_command(action, platform="win32", modules=fake_win32())
        assert 1 == service.service_command("start", platform="win32", modules=fake_win32(1),
                                            sleep=lambda _s: None)


def test_win32_error_is_reported_exit_1(capsys: Any) -> None:
    """A pywin32 error (e.g. access denied) is one clear line and exit code 1."""
    win = fake_win32()

    def denied(*_: Any) -> None:
        raise FakeWinError(5, "StartService", "Access is denied.")

    win["win32serviceutil"].StartService = denied
    assert 1 == service.service_command("start", platform="win32", modules=win)
    assert "service start failed: Access is denied." in capsys.readouterr().err


def test_missing_config_file_is_rejected(tmp_path: Path, capsys: Any) -> None:
    """install --config with a missing file fails before touching the SCM."""
    win = fake_win32()
    missing = str(tmp_path / "nope.yaml")
    assert 2 == service.service_command("install", missing, platform="win32", modules=win)
    assert [] == names(win)
    assert "file not found" in capsys.readouterr().err


def test_service_config_logs_json_to_a_file() -> None:
    """The service always logs JSON, to the configured file or the default one."""
    assert service.DEFAULT_LOG_FILE == service.service_config(Config()).logging.file
    custom = Config(logging=LoggingConfig(file="/x/relay.log"))
    assert "/x/relay.log" == service.service_config(custom).logging.file
    assert "json" == service.service_config(custom).logging.format


class FakeRelay:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.stopped = threading.Event()
        self.started = threading.Event()

    def request_stop(self, *, force: bool = False) -> None:
        self.stopped.set()

    def run(self) -> None:
        self.started.set()
        assert self.stopped.wait(10)


def test_runner_stop_from_another_thread_is_graceful(tmp_path: Path) -> None:
    """SvcStop's thread calls runner.stop(); the relay's request_stop ends run() with 0."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"logging:\n  file: {tmp_path / 'logs' / 'relay.log'}\n")
    made: List[FakeRelay] = []

    def factory(config: Config) -> FakeRelay:
        made.append(FakeRelay(config))
        return made[-1]

    runner = service.ServiceRunner(str(cfg), relay_factory=factory)
    result: List[int] = []
    thread = threading.Thread(target=lambda: result.append(runner.run()))
    thread.start()
    while not made or not made[0].started.wait(0.01):
        pass
    runner.stop()
    thread.join(10)
    assert [0] == result
    assert (tmp_path / "logs" / "relay.log").exists()


def test_runner_stop_before_run_stops_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stop that arrives before the relay exists is not lost."""
    import relay.logs

    monkeypatch.setattr(relay.logs, "configure_logging", lambda cfg, **_: None)
    runner = service.ServiceRunner(None, relay_factory=FakeRelay)
    runner.stop()
    assert 0 == runner.run()


def test_runner_bad_config_exit_2(tmp_path: Path) -> None:
    """A bad config file makes run() return 2 (the service then fails and is restarted)."""
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("nope: 1\n")
    assert 2 == service.ServiceRunner(str(cfg), relay_factory=FakeRelay).run()


def log_lines(path: Path) -> List[Dict[str, Any]]:
    import json

    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_runner_without_streams_logs_to_the_file_only(tmp_path: Path,
                                                     _default_log_file: Path) -> None:
    """sys.stdout = sys.stderr = None and no logging.file: the service's file gets the logs."""
    with no_streams():
        import structlog

        class LoggingRelay(FakeRelay):
            def run(self) -> None:
                structlog.get_logger("relay.app").info("relay_started", note="浦发银行")

        cfg = tmp_path / "c.yaml"
        cfg.write_text("source:\n  kind: simulator\n")
        assert 0 == service.ServiceRunner(str(cfg), relay_factory=LoggingRelay).run()
        [line] = log_lines(_default_log_file)
        assert ("relay_started", "浦发银行") == (line["event"], line["note"])


def test_runner_bad_config_is_in_the_default_log_file(tmp_path: Path,
                                                      _default_log_file: Path) -> None:
    """A config that does not load: the reason is in the default log file and in failure."""
    with no_streams():
        cfg = tmp_path / "bad.yaml"
        cfg.write_text("publish:\n  addresses: [nope]\n")
        runner = service.ServiceRunner(str(cfg), relay_factory=FakeRelay)
        assert 2 == runner.run()
        [line] = log_lines(_default_log_file)
        assert "config_invalid" == line["event"] and "publish.addresses" in line["error"]
        assert runner.failure is not None and "publish.addresses" in runner.failure
        assert str(_default_log_file) == runner.log_file


def test_runner_startup_failure_is_logged_before_it_returns(tmp_path: Path) -> None:
    """A real relay whose publish address is taken: exit 3, reason in the configured file."""
    with no_streams():
        import pynng

        from tests.helpers import tcp_address

        address = tcp_address()
        log = tmp_path / "relay.log"
        cfg = tmp_path / "c.yaml"
        cfg.write_text(f"publish:\n  addresses: [{address}]\n  snapshot_address: null\n"
                       f"source:\n  simulator:\n    securities: 10\n"
                       f"logging:\n  file: {log}\n")
        with pynng.Pub0(listen=address):
            runner = service.ServiceRunner(str(cfg))
            assert 3 == runner.run()
        events = [line["event"] for line in log_lines(log)]
        assert "relay_start_failed" == events[-1]
        assert runner.failure is not None and address.split(":")[-1] in runner.failure


def test_runner_unexpected_error_is_logged_with_its_traceback(tmp_path: Path,
                                                             _default_log_file: Path) -> None:
    """A bug in the relay is not lost either: logged with its traceback, exit 1."""
    with no_streams():
        class Broken(FakeRelay):
            def run(self) -> None:
                raise ZeroDivisionError("boom")

        assert 1 == service.ServiceRunner(None, relay_factory=Broken).run()
        [line] = log_lines(_default_log_file)
        assert "relay_crashed" == line["event"] and "ZeroDivisionError" in line["exception"]


def test_failure_message_names_reason_and_log_file() -> None:
    """The event log line says what failed, why, and where the details are."""
    text = service.failure_message(3, "address in use", r"C:\logs\relay.log")
    assert "failed to start (exit code 3): address in use; log file: C:\\logs\\relay.log" in text
    assert "failed (exit code 1)" in service.failure_message(1, None, None)


def test_service_class_maps_stop_and_failures() -> None:
    """SvcStop reports stop-pending and stops the runner; a failed run is in the event log,
    then stops with an error code (so failure actions restart it)."""
    win = fake_win32()
    win["options"]["config"] = "C:/qmt-relay/relay.yaml"
    cls = service.build_service_class(win)
    instance: Any = cls(("qmt-relay",))
    assert "C:/qmt-relay/relay.yaml" == instance.runner.config_path

    class Runner:
        config_path: Optional[str] = None
        stopped = False
        code = 3

        def stop(self) -> None:
            self.stopped = True

        def run(self) -> int:
            return self.code

        failure = "tcp://127.0.0.1:9: Address in use"
        log_file = r"C:\ProgramData\qmt-relay\logs\relay.log"

    instance.runner = Runner()
    instance.SvcStop()
    assert [3] == instance.reported and instance.runner.stopped
    instance.reported.clear()
    instance.SvcRun()
    # running, then stopped with the service-specific error code (what recovery acts on)
    assert [4, (1, 1066, 3)] == instance.reported
    [error] = [c[1][0] for c in win["calls"] if c[0] == "LogErrorMsg"]
    assert Runner.failure in error and Runner.log_file in error
    order = names(win)
    assert order.index("LogErrorMsg") < len(order) - 1 - order[::-1].index(
        "ReportServiceStatus")   # in the event log before the service reports stopped
    instance.reported.clear()
    instance.runner.code = 0
    instance.SvcRun()
    assert [4, 1] == instance.reported
    assert 1 == names(win).count("LogErrorMsg")


def test_shipped_systemd_unit_and_production_config_are_valid() -> None:
    """config/qmt-relay.service runs `qmt-relay run`; production-qmt.yaml loads."""
    from helpers import REPO

    unit = (REPO / "config" / "qmt-relay.service").read_text()
    assert "ExecStart=" in unit and " run " in unit and "KillSignal=SIGTERM" in unit
    assert "qmt" == load_config(REPO / "config" / "production-qmt.yaml").source.kind
