"""The Windows service: a thin shell over the same run/stop code as ``qmt-relay run``.

``qmt-relay service install|remove|start|stop|status [--config FILE]`` maps each command to a
``win32serviceutil`` call (pywin32, the ``service`` extra, imported lazily). Installing
registers :class:`QmtRelayService` (built on first access, so this module imports on any OS),
remembers the config file in the service's registry parameters, starts it automatically at
boot and sets failure actions that restart it after a crash or a failed run. The service logs
to a file (``logging.file``, or :data:`DEFAULT_LOG_FILE` when unset) and maps the SCM's stop
to :meth:`relay.app.Relay.request_stop`, the graceful stop that releases every QMT
subscription.

All logic lives in plain functions (:func:`service_command`, :class:`ServiceRunner`,
:func:`service_config`) that the tests run on Linux with the win32 modules faked.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import sys
import threading
from typing import TYPE_CHECKING, Any, Dict, Optional

if TYPE_CHECKING:
    from relay.app import Relay
    from relay.config import Config

__all__ = [
    "ACTIONS",
    "DEFAULT_LOG_FILE",
    "SERVICE_NAME",
    "ServiceRunner",
    "service_command",
    "service_config",
]

SERVICE_NAME = "qmt-relay"
DISPLAY_NAME = "QMT Relay"
DESCRIPTION = "Relays MiniQMT full-push ticks over NNG pub/sub (hikyuu spot format)."
CLASS_PATH = "relay.ops.service.QmtRelayService"
CONFIG_OPTION = "config"
DEFAULT_LOG_FILE = os.path.join(
    os.environ.get("PROGRAMDATA", r"C:\ProgramData"), "qmt-relay", "logs", "relay.log")
ACTIONS = ("install", "remove", "start", "stop", "status")
RESTART_DELAYS_MS = (10_000, 30_000, 60_000)   # first, second, later failures
RESET_PERIOD_S = 86_400                        # failure count resets after a quiet day

_STATES = {1: "stopped", 2: "start pending", 3: "stop pending", 4: "running",
           5: "continue pending", 6: "pause pending", 7: "paused"}

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


def _win32() -> Dict[str, Any]:
    """Import pywin32's service modules (lazily: Windows only)."""
    return {name: importlib.import_module(name)
            for name in ("win32serviceutil", "win32service", "servicemanager", "pywintypes")}


def service_config(config: Config) -> Config:
    """``config`` as the service runs it: JSON logs, to a file even if none is set."""
    log_cfg = dataclasses.replace(
        config.logging, format="json",
        file=config.logging.file if config.logging.file is not None else DEFAULT_LOG_FILE)
    return dataclasses.replace(config, logging=log_cfg)


class ServiceRunner:
    """Runs one relay for the service and stops it on request (from the SCM's thread).

    Args:
        config_path: the YAML config (None: built-in defaults).
        relay_factory: builds the relay (tests pass a fake).
    """

    def __init__(self, config_path: Optional[str], *, relay_factory: Any = None) -> None:
        self.config_path = config_path
        self._factory = relay_factory
        self._lock = threading.Lock()
        self._relay: Optional[Relay] = None
        self._stop = False

    def run(self) -> int:
        """Load the config, configure logging, run the relay until stopped; the exit code.

        Returns 0 after a requested stop, 2 for a bad config, 3 if startup failed, 1 if the
        relay failed while running.
        """
        from relay.config import load_config  # noqa: PLC0415
        from relay.errors import (  # noqa: PLC0415
            EXIT_CONFIG,
            EXIT_STARTUP,
            ConfigError,
            PublishError,
            RelayError,
        )
        from relay.logs import configure_logging  # noqa: PLC0415

        try:
            config = service_config(load_config(self.config_path))
            configure_logging(config.logging)
        except ConfigError:
            return EXIT_CONFIG
        relay = self._build(config)
        with self._lock:
            self._relay = relay
            stop = self._stop
        if stop:
            relay.request_stop()
        try:
            relay.run()
        except ConfigError:
            return EXIT_CONFIG
        except PublishError:
            return EXIT_STARTUP
        except RelayError:
            return EXIT_STARTUP if relay.state.value == "starting" else EXIT_FAILURE
        return EXIT_OK

    def stop(self) -> None:
        """The graceful stop; safe from any thread, before or during :meth:`run`."""
        with self._lock:
            self._stop = True
            relay = self._relay
        if relay is not None:
            relay.request_stop()

    def _build(self, config: Config) -> Relay:
        if self._factory is not None:
            relay: Relay = self._factory(config)
            return relay
        from relay.app import Relay  # noqa: PLC0415

        return Relay(config)


def _failure_actions(win32service: Any, service: str) -> None:
    """Restart after a crash or a failed run (10 s, 30 s, then every 60 s)."""
    scm = win32service.OpenSCManager(None, None, win32service.SC_MANAGER_ALL_ACCESS)
    try:
        handle = win32service.OpenService(scm, service, win32service.SERVICE_ALL_ACCESS)
        try:
            actions = [(win32service.SC_ACTION_RESTART, delay) for delay in RESTART_DELAYS_MS]
            win32service.ChangeServiceConfig2(
                handle, win32service.SERVICE_CONFIG_FAILURE_ACTIONS,
                {"ResetPeriod": RESET_PERIOD_S, "RebootMsg": None, "Command": None,
                 "Actions": actions})
            # Also restart when the service stops itself with an error, not only on a crash.
            win32service.ChangeServiceConfig2(
                handle, win32service.SERVICE_CONFIG_FAILURE_ACTIONS_FLAG, True)
        finally:
            win32service.CloseServiceHandle(handle)
    finally:
        win32service.CloseServiceHandle(scm)


def service_command(action: str, config_path: Optional[str] = None, *,
                    username: Optional[str] = None, password: Optional[str] = None,
                    platform: str = sys.platform, modules: Optional[Dict[str, Any]] = None,
                    out: Any = None) -> int:
    """Carry out ``qmt-relay service ACTION``; returns the exit code.

    Args:
        action: one of :data:`ACTIONS`.
        config_path: the config file the service runs with (install; default: built-ins).
        username, password: the Windows account to run as (install; use MiniQMT's user).
        platform: ``sys.platform`` (tests pass ``"win32"``).
        modules: the pywin32 modules by name (tests pass fakes).
        out: where messages go (stdout by default; errors go to stderr).
    """
    stream = out if out is not None else sys.stdout
    if platform != "win32":
        print("qmt-relay: error: `qmt-relay service` manages a Windows service and works on "
              "Windows only; on Linux use a systemd unit (config/qmt-relay.service)",
              file=sys.stderr)
        return EXIT_USAGE
    if action not in ACTIONS:
        print(f"qmt-relay: error: unknown service action {action!r}", file=sys.stderr)
        return EXIT_USAGE
    if config_path is not None and not os.path.isfile(config_path):
        print(f"qmt-relay: error: {config_path}: file not found", file=sys.stderr)
        return EXIT_USAGE
    try:
        win = modules if modules is not None else _win32()
    except ImportError:
        print('qmt-relay: error: pywin32 is missing: pip install "qmt-relay[service]"',
              file=sys.stderr)
        return EXIT_USAGE
    util, svc = win["win32serviceutil"], win["win32service"]
    try:
        if action == "install":
            util.InstallService(CLASS_PATH, SERVICE_NAME, DISPLAY_NAME,
                                startType=svc.SERVICE_AUTO_START, userName=username,
                                password=password, description=DESCRIPTION)
            path = os.path.abspath(config_path) if config_path is not None else ""
            util.SetServiceCustomOption(SERVICE_NAME, CONFIG_OPTION, path)
            _failure_actions(svc, SERVICE_NAME)
            print(f"installed service {SERVICE_NAME} (config: {path or 'built-in defaults'}); "
                  f"start it with: qmt-relay service start", file=stream)
        elif action == "remove":
            state = util.QueryServiceStatus(SERVICE_NAME)[1]
            if state != svc.SERVICE_STOPPED:
                util.StopService(SERVICE_NAME)
            util.RemoveService(SERVICE_NAME)
            print(f"removed service {SERVICE_NAME}", file=stream)
        elif action == "start":
            util.StartService(SERVICE_NAME)
            print(f"starting service {SERVICE_NAME}", file=stream)
        elif action == "stop":
            util.StopService(SERVICE_NAME)
            print(f"stopping service {SERVICE_NAME}", file=stream)
        else:
            state = util.QueryServiceStatus(SERVICE_NAME)[1]
            print(f"{SERVICE_NAME}: {_STATES.get(state, f'state {state}')}", file=stream)
    except win["pywintypes"].error as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        print(f"qmt-relay: error: service {action} failed: {reason}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def build_service_class(modules: Optional[Dict[str, Any]] = None) -> type:
    """The ``win32serviceutil.ServiceFramework`` subclass the service host instantiates."""
    win = modules if modules is not None else _win32()
    util, svc, manager = win["win32serviceutil"], win["win32service"], win["servicemanager"]

    class QmtRelayService(util.ServiceFramework):  # type: ignore[misc, name-defined]
        _svc_name_ = SERVICE_NAME
        _svc_display_name_ = DISPLAY_NAME
        _svc_description_ = DESCRIPTION

        def __init__(self, args: Any) -> None:
            super().__init__(args)
            path = util.GetServiceCustomOption(SERVICE_NAME, CONFIG_OPTION, "") or None
            self.runner = ServiceRunner(path)

        def SvcStop(self) -> None:  # noqa: N802 - pywin32's name
            self.ReportServiceStatus(svc.SERVICE_STOP_PENDING)
            self.runner.stop()

        def SvcDoRun(self) -> None:  # noqa: N802 - pywin32's name
            manager.LogInfoMsg(f"{SERVICE_NAME}: starting (config: {self.runner.config_path})")
            code = self.runner.run()
            if code != EXIT_OK:
                # Raising reports the stop as a failure, so the failure actions restart it.
                manager.LogErrorMsg(f"{SERVICE_NAME}: relay exited with code {code}")
                raise RuntimeError(f"qmt-relay exited with code {code}")
            manager.LogInfoMsg(f"{SERVICE_NAME}: stopped")

    QmtRelayService.__module__ = __name__
    return QmtRelayService


def __getattr__(name: str) -> Any:
    """``relay.ops.service.QmtRelayService``, built on first access (pywin32 needed then)."""
    if name == "QmtRelayService":
        return build_service_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
