"""The Windows service: a thin shell over the same run/stop code as ``qmt-relay run``.

``qmt-relay service install|remove|start|stop|status [--config FILE]`` maps each command to a
``win32serviceutil`` call (pywin32, the ``service`` extra, imported lazily). Installing
registers :class:`QmtRelayService` (built on first access, so this module imports on any OS),
remembers the config file in the service's registry parameters, starts it automatically at
boot and sets failure actions that restart it after a crash or a failed run; a secondary
setting the system refuses (failure actions, description) is a warning, not a failed install,
and ``status`` says whether the recovery actions are in place.

A service has no console (``sys.stdout`` and ``sys.stderr`` are ``None``): it logs JSON to a
file only (``logging.file``, or :data:`DEFAULT_LOG_FILE` when unset). A failed start (a bad
config, an address in use, MiniQMT unreachable) is written to that file and, by the service
class, to the Windows event log before the service reports stopped. The SCM's stop maps to
:meth:`relay.app.Relay.request_stop`, the graceful stop that releases every QMT
subscription.

All logic lives in plain functions (:func:`service_command`, :class:`ServiceRunner`,
:func:`service_config`) that the tests run on Linux with the win32 modules faked.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os
import sys
import threading
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Type

if TYPE_CHECKING:
    from relay.app import Relay
    from relay.config import Config, LoggingConfig

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
ERROR_SERVICE_SPECIFIC_ERROR = 1066   # winerror: "the service has returned a service-specific
                                      # error code" (the exit code), a stop as a failure


def _win32() -> Dict[str, Any]:
    """Import pywin32's service modules (lazily: Windows only)."""
    return {name: importlib.import_module(name)
            for name in ("win32serviceutil", "win32service", "servicemanager", "pywintypes")}


def service_config_logging(logging: LoggingConfig) -> LoggingConfig:
    """The ``logging`` section as the service uses it: JSON, to a file even if none is set."""
    return dataclasses.replace(
        logging, format="json",
        file=logging.file if logging.file is not None else DEFAULT_LOG_FILE)


def service_config(config: Config) -> Config:
    """``config`` as the service runs it: JSON logs, to a file even if none is set."""
    return dataclasses.replace(config, logging=service_config_logging(config.logging))


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
        self.failure: Optional[str] = None      # why run() failed, for the event log
        self.log_file: Optional[str] = None     # where run() logs (known once it started)

    def run(self) -> int:
        """Load the config, configure logging, run the relay until stopped; the exit code.

        Returns 0 after a requested stop, 2 for a bad config, 3 if startup failed, 1 if the
        relay failed while running. Whatever went wrong is logged (to the log file when it
        could be opened) and kept in :attr:`failure` for the event log.

        The work runs on a thread of its own: pythonservice.exe calls SvcDoRun on the SCM's
        thread, which ``threading`` takes for the main thread although it is not the
        interpreter's, and asyncio's Windows loop then fails on ``signal.set_wakeup_fd``.
        """
        result: List[int] = []
        worker = threading.Thread(target=lambda: result.append(self._run()),
                                  name="qmt-relay-service", daemon=True)
        worker.start()
        worker.join()
        return result[0] if result else EXIT_FAILURE

    def _run(self) -> int:
        from relay.config import LoggingConfig, load_config  # noqa: PLC0415
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
        except ConfigError as exc:
            # No config to say where to log: the default file, so the failure is on disk.
            self.log_file = DEFAULT_LOG_FILE
            with contextlib.suppress(ConfigError):
                configure_logging(service_config_logging(LoggingConfig()), console=False)
            return self._failed(EXIT_CONFIG, "config_invalid", exc)
        self.log_file = config.logging.file
        try:
            configure_logging(config.logging, console=False)
        except ConfigError as exc:
            return self._failed(EXIT_CONFIG, "log_file_unusable", exc)
        try:
            relay = self._build(config)
        except Exception as exc:
            return self._failed(EXIT_STARTUP, "relay_start_failed", exc)
        with self._lock:
            self._relay = relay
            stop = self._stop
        if stop:
            relay.request_stop()
        try:
            relay.run()
        except ConfigError as exc:
            return self._failed(EXIT_CONFIG, "relay_start_failed", exc)
        except PublishError as exc:
            return self._failed(EXIT_STARTUP, "relay_start_failed", exc)
        except RelayError as exc:
            if relay.state.value == "starting":
                return self._failed(EXIT_STARTUP, "relay_start_failed", exc)
            return self._failed(EXIT_FAILURE, "relay_failed", exc)
        except Exception as exc:  # a bug: still on disk and in the event log
            return self._failed(EXIT_FAILURE, "relay_crashed", exc, trace=True)
        return EXIT_OK

    def _failed(self, code: int, event: str, exc: BaseException, *, trace: bool = False) -> int:
        import structlog  # noqa: PLC0415

        self.failure = str(exc) or repr(exc)
        log = structlog.get_logger("relay.ops.service")
        log.error(event, error=self.failure, exit_code=code, exc_info=exc if trace else None)
        return code

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


def _with_service(svc: Any, service: str, action: Any) -> Any:
    """``action(handle)`` on an open handle of ``service``; handles closed afterwards."""
    scm = svc.OpenSCManager(None, None, svc.SC_MANAGER_ALL_ACCESS)
    try:
        handle = svc.OpenService(scm, service, svc.SERVICE_ALL_ACCESS)
        try:
            return action(handle)
        finally:
            svc.CloseServiceHandle(handle)
    finally:
        svc.CloseServiceHandle(scm)


def _set_failure_actions(svc: Any, handle: Any) -> None:
    """Restart after a crash or a failed run (10 s, 30 s, then every 60 s)."""
    actions = [(svc.SC_ACTION_RESTART, delay) for delay in RESTART_DELAYS_MS]
    svc.ChangeServiceConfig2(
        handle, svc.SERVICE_CONFIG_FAILURE_ACTIONS,
        {"ResetPeriod": RESET_PERIOD_S, "RebootMsg": None, "Command": None, "Actions": actions})
    # Also restart when the service stops itself with an error, not only on a crash.
    svc.ChangeServiceConfig2(handle, svc.SERVICE_CONFIG_FAILURE_ACTIONS_FLAG, True)


def _set_description(svc: Any, handle: Any) -> None:
    svc.ChangeServiceConfig2(handle, svc.SERVICE_CONFIG_DESCRIPTION, DESCRIPTION)


def recovery_summary(actions: Any) -> str:
    """What ``status`` says of the failure actions read back from the system.

    Args:
        actions: ``QueryServiceConfig2(handle, SERVICE_CONFIG_FAILURE_ACTIONS)``'s answer
            (a dict with ``Actions``: ``(type, delay_ms)`` pairs), or None.
    """
    pairs = list((actions or {}).get("Actions") or ())
    delays = [delay for kind, delay in pairs if kind == 1]   # SC_ACTION_RESTART
    if not delays:
        return "recovery: none (the system will not restart the service after a failure)"
    return "recovery: restart after " + ", ".join(f"{d / 1000:g} s" for d in delays)


def _secondary_settings(svc: Any, error: Type[BaseException]) -> List[str]:
    """Set the description and the failure actions; the names of those the system refused."""
    refused: List[str] = []
    for name, setter in (("description", _set_description),
                         ("restart-on-failure actions", _set_failure_actions)):
        try:
            _with_service(svc, SERVICE_NAME, lambda handle, f=setter: f(svc, handle))
        except (error, NotImplementedError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
            refused.append(f"{name} ({reason})")
    return refused


def _status_lines(util: Any, svc: Any, error: Type[BaseException]) -> List[str]:
    state = util.QueryServiceStatus(SERVICE_NAME)[1]
    lines = [f"{SERVICE_NAME}: {_STATES.get(state, f'state {state}')}"]
    try:
        actions = _with_service(svc, SERVICE_NAME, lambda handle: svc.QueryServiceConfig2(
            handle, svc.SERVICE_CONFIG_FAILURE_ACTIONS))
        lines.append(recovery_summary(actions))
    except (error, NotImplementedError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        lines.append(f"recovery: unknown (cannot read the failure actions: {reason})")
    try:
        path = util.GetServiceCustomOption(SERVICE_NAME, CONFIG_OPTION, "") or None
        lines.append(f"config: {path or 'built-in defaults'}")
        lines.append(f"log file: {log_file_of(path)}")
    except error:
        pass
    return lines


def log_file_of(config_path: Optional[str]) -> str:
    """Where the service run with ``config_path`` logs (the default file if it cannot tell)."""
    from relay.config import load_config  # noqa: PLC0415
    from relay.errors import ConfigError  # noqa: PLC0415

    try:
        return service_config(load_config(config_path)).logging.file or DEFAULT_LOG_FILE
    except ConfigError:
        return DEFAULT_LOG_FILE


def _say(stream: Any, text: str) -> None:
    from relay._console import write_text  # noqa: PLC0415

    write_text(stream, text + "\n")


def _error(text: str) -> None:
    _say(sys.stderr, f"qmt-relay: error: {text}")


def _wait_started(util: Any, svc: Any, *, timeout: float, sleep: Any) -> int:
    """Poll the state while the service is start-pending (at most ``timeout`` s); the state."""
    waited = 0.0
    state = int(util.QueryServiceStatus(SERVICE_NAME)[1])
    while state == svc.SERVICE_START_PENDING and waited < timeout:
        sleep(0.25)
        waited += 0.25
        state = int(util.QueryServiceStatus(SERVICE_NAME)[1])
    return state


def service_command(action: str, config_path: Optional[str] = None, *,
                    username: Optional[str] = None, password: Optional[str] = None,
                    platform: str = sys.platform, modules: Optional[Dict[str, Any]] = None,
                    out: Any = None, start_timeout: float = 30.0, sleep: Any = None) -> int:
    """Carry out ``qmt-relay service ACTION``; returns the exit code.

    Args:
        action: one of :data:`ACTIONS`.
        config_path: the config file the service runs with (install; default: built-ins).
        username, password: the Windows account to run as (install; use MiniQMT's user).
        platform: ``sys.platform`` (tests pass ``"win32"``).
        modules: the pywin32 modules by name (tests pass fakes).
        out: where messages go (stdout by default; errors go to stderr; a missing stream
            gets nothing).
        start_timeout: start: how long to wait for the service to leave "start pending".
        sleep: ``time.sleep`` (tests pass a fake).
    """
    stream = out if out is not None else sys.stdout
    if platform != "win32":
        _error("`qmt-relay service` manages a Windows service and works on Windows only; "
               "on Linux use a systemd unit (config/qmt-relay.service)")
        return EXIT_USAGE
    if action not in ACTIONS:
        _error(f"unknown service action {action!r}")
        return EXIT_USAGE
    if config_path is not None and not os.path.isfile(config_path):
        _error(f"{config_path}: file not found")
        return EXIT_USAGE
    try:
        win = modules if modules is not None else _win32()
    except ImportError:
        _error('pywin32 is missing: pip install "qmt-relay[service]"')
        return EXIT_USAGE
    util, svc, error = win["win32serviceutil"], win["win32service"], win["pywintypes"].error
    if sleep is None:
        import time  # noqa: PLC0415

        sleep = time.sleep
    try:
        if action == "install":
            # The description is set below, apart: InstallService fails as a whole if the
            # system refuses it, after registering the service.
            util.InstallService(CLASS_PATH, SERVICE_NAME, DISPLAY_NAME,
                                startType=svc.SERVICE_AUTO_START, userName=username,
                                password=password)
            path = os.path.abspath(config_path) if config_path is not None else ""
            util.SetServiceCustomOption(SERVICE_NAME, CONFIG_OPTION, path)
            for refused in _secondary_settings(svc, error):
                _say(sys.stderr, f"qmt-relay: warning: the system refused the {refused}; "
                                 "the service is installed without it")
            _say(stream, f"installed service {SERVICE_NAME} (config: "
                         f"{path or 'built-in defaults'}; log file: "
                         f"{log_file_of(path or None)}); start it with: qmt-relay service start")
        elif action == "remove":
            state = util.QueryServiceStatus(SERVICE_NAME)[1]
            if state != svc.SERVICE_STOPPED:
                util.StopService(SERVICE_NAME)
            util.RemoveService(SERVICE_NAME)
            _say(stream, f"removed service {SERVICE_NAME}")
        elif action == "start":
            util.StartService(SERVICE_NAME)
            state = _wait_started(util, svc, timeout=start_timeout, sleep=sleep)
            if state == svc.SERVICE_STOPPED:
                configured = util.GetServiceCustomOption(SERVICE_NAME, CONFIG_OPTION, "")
                _error(f"service {SERVICE_NAME} stopped at once; the reason is in its log "
                       f"file {log_file_of(configured or None)} and in the Windows event log "
                       "(Application, source qmt-relay)")
                return EXIT_FAILURE
            _say(stream, f"{SERVICE_NAME}: {_STATES.get(state, f'state {state}')}")
        elif action == "stop":
            util.StopService(SERVICE_NAME)
            _say(stream, f"stopping service {SERVICE_NAME}")
        else:
            for line in _status_lines(util, svc, error):
                _say(stream, line)
    except error as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        _error(f"service {action} failed: {reason}")
        return EXIT_FAILURE
    return EXIT_OK


def failure_message(code: int, failure: Optional[str], log_file: Optional[str]) -> str:
    """The event log's line for a failed run: why, and where the details are."""
    what = "failed to start" if code in (2, 3) else "failed"
    reason = failure or "see the log file"
    where = f"; log file: {log_file}" if log_file else ""
    return f"{SERVICE_NAME}: {what} (exit code {code}): {reason}{where}"


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

        def SvcRun(self) -> None:  # noqa: N802 - pywin32's name
            # pywin32's own SvcRun reports a plain stop even after a failure; a failed run
            # must stop with an error code, which is what the failure actions act on.
            self.ReportServiceStatus(svc.SERVICE_RUNNING)
            code = self.SvcDoRun()
            if code == EXIT_OK:
                self.ReportServiceStatus(svc.SERVICE_STOPPED)
            else:
                self.ReportServiceStatus(svc.SERVICE_STOPPED,
                                         win32ExitCode=ERROR_SERVICE_SPECIFIC_ERROR,
                                         svcExitCode=code)

        def SvcDoRun(self) -> int:  # noqa: N802 - pywin32's name
            manager.LogInfoMsg(f"{SERVICE_NAME}: starting (config: {self.runner.config_path})")
            code = self.runner.run()
            if code != EXIT_OK:
                # In the event log before the service reports stopped.
                manager.LogErrorMsg(failure_message(code, self.runner.failure,
                                                    self.runner.log_file))
            else:
                manager.LogInfoMsg(f"{SERVICE_NAME}: stopped")
            return code

    QmtRelayService.__module__ = __name__
    return QmtRelayService


def __getattr__(name: str) -> Any:
    """``relay.ops.service.QmtRelayService``, built on first access (pywin32 needed then)."""
    if name == "QmtRelayService":
        return build_service_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
