"""The Windows service shell, with pywin32's modules faked so it runs on Linux."""

from __future__ import annotations

import sys
import threading
import types
from pathlib import Path
from typing import Any, Dict, List, Optional

import pytest

from relay import cli
from relay.config import Config, LoggingConfig, load_config
from relay.ops import service


class FakeWinError(Exception):
    def __init__(self, winerror: int, funcname: str, strerror: str) -> None:
        super().__init__(winerror, funcname, strerror)
        self.strerror = strerror


def fake_win32(state: int = 4) -> Dict[str, Any]:
    """win32serviceutil / win32service / servicemanager / pywintypes that record calls."""
    calls: List[Any] = []
    options: Dict[str, str] = {}

    def rec(name: str) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            calls.append((name, args, kwargs))
            return f"handle-{name}"
        return call

    class ServiceFramework:
        def __init__(self, args: Any) -> None:
            self.args = args
            self.reported: List[int] = []

        def ReportServiceStatus(self, status: int) -> None:  # noqa: N802
            self.reported.append(status)

    util = types.SimpleNamespace(
        InstallService=rec("InstallService"), RemoveService=rec("RemoveService"),
        StartService=rec("StartService"), StopService=rec("StopService"),
        QueryServiceStatus=lambda name: (16, state, 0, 0, 0, 0, 0),
        SetServiceCustomOption=lambda svc, opt, value: options.__setitem__(opt, value),
        GetServiceCustomOption=lambda svc, opt, default=None: options.get(opt, default),
        ServiceFramework=ServiceFramework,
    )
    svc = types.SimpleNamespace(
        SERVICE_AUTO_START=2, SERVICE_STOPPED=1, SERVICE_STOP_PENDING=3,
        SC_MANAGER_ALL_ACCESS=0xF003F, SERVICE_ALL_ACCESS=0xF01FF, SC_ACTION_RESTART=1,
        SERVICE_CONFIG_FAILURE_ACTIONS=2, SERVICE_CONFIG_FAILURE_ACTIONS_FLAG=4,
        OpenSCManager=rec("OpenSCManager"), OpenService=rec("OpenService"),
        ChangeServiceConfig2=rec("ChangeServiceConfig2"),
        CloseServiceHandle=rec("CloseServiceHandle"),
    )
    manager = types.SimpleNamespace(LogInfoMsg=rec("LogInfoMsg"), LogErrorMsg=rec("LogErrorMsg"))
    return {"win32serviceutil": util, "win32service": svc, "servicemanager": manager,
            "pywintypes": types.SimpleNamespace(error=FakeWinError),
            "calls": calls, "options": options}


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
    assert str(cfg) == win["options"]["config"]
    changes = [c[1] for c in win["calls"] if c[0] == "ChangeServiceConfig2"]
    actions = changes[0][2]["Actions"]
    assert [(1, 10_000), (1, 30_000), (1, 60_000)] == actions
    assert (4, True) == changes[1][1:]
    assert 2 == names(win).count("CloseServiceHandle")


@pytest.mark.parametrize(("action", "state", "expected"), [
    ("start", 1, ["StartService"]),
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
    assert expected == names(win)
    if action == "status":
        assert "qmt-relay: running" in capsys.readouterr().out


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

    monkeypatch.setattr(relay.logs, "configure_logging", lambda cfg, stream=None: None)
    runner = service.ServiceRunner(None, relay_factory=FakeRelay)
    runner.stop()
    assert 0 == runner.run()


def test_runner_bad_config_exit_2(tmp_path: Path) -> None:
    """A bad config file makes run() return 2 (the service then fails and is restarted)."""
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("nope: 1\n")
    assert 2 == service.ServiceRunner(str(cfg), relay_factory=FakeRelay).run()


def test_service_class_maps_stop_and_failures() -> None:
    """SvcStop reports stop-pending and stops the runner; a failed run raises for restart."""
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

    instance.runner = Runner()
    instance.SvcStop()
    assert [3] == instance.reported and instance.runner.stopped
    with pytest.raises(RuntimeError, match="code 3"):
        instance.SvcDoRun()
    instance.runner.code = 0
    instance.SvcDoRun()
    assert "LogErrorMsg" in names(win)


def test_shipped_systemd_unit_and_production_config_are_valid() -> None:
    """config/qmt-relay.service runs `qmt-relay run`; production-qmt.yaml loads."""
    from helpers import REPO

    unit = (REPO / "config" / "qmt-relay.service").read_text()
    assert "ExecStart=" in unit and " run " in unit and "KillSignal=SIGTERM" in unit
    assert "qmt" == load_config(REPO / "config" / "production-qmt.yaml").source.kind
