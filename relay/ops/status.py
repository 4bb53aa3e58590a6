"""``qmt-relay status``: one report from a relay's heartbeats and its metrics endpoint.

The stream's heartbeats (``:relay:heartbeat:`` on the publish address) say whether the
source is up, the last ``seq``, the run id and the subscribers; the metrics endpoint
(``/status``, publish port + 3 by default), when reachable, adds health with its reason,
last data age, drops and quiet securities. Either one is enough for a verdict.
"""

from __future__ import annotations

import json
import ssl
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from relay.config import planned_address

__all__ = ["StatusReport", "format_report", "gather"]


@dataclass
class StatusReport:
    """What ``status`` found out.

    Attributes:
        stream_url: the stream address asked (None when only a metrics URL was given).
        metrics_url: the metrics endpoint asked (None when unknown).
        heartbeat: the first heartbeat received, if any.
        status: the endpoint's ``/status`` document, if reachable.
        problems: why a part could not be read.
    """

    stream_url: Optional[str]
    metrics_url: Optional[str]
    heartbeat: Optional[Dict[str, Any]] = None
    status: Optional[Dict[str, Any]] = None
    problems: List[str] = field(default_factory=list)

    @property
    def reachable(self) -> bool:
        return self.heartbeat is not None or self.status is not None

    @property
    def healthy(self) -> bool:
        """Healthy if every part that answered says so."""
        if not self.reachable:
            return False
        if self.heartbeat is not None and self.heartbeat.get("status") != "up":
            return False
        if self.status is not None:
            return bool(self.status.get("health", {}).get("healthy"))
        return True

    def as_dict(self) -> Dict[str, Any]:
        return {"reachable": self.reachable, "healthy": self.healthy,
                "stream_url": self.stream_url, "metrics_url": self.metrics_url,
                "heartbeat": self.heartbeat, "status": self.status, "problems": self.problems}


def _heartbeat(url: str, timeout: float) -> Dict[str, Any]:
    import pynng  # noqa: PLC0415 - status over http:// alone needs no pynng

    from relay.wire import HEARTBEAT_PREFIX, decode_heartbeat  # noqa: PLC0415

    deadline = time.monotonic() + timeout
    with pynng.Sub0(recv_timeout=max(1, int(timeout * 1000))) as sub:
        sub.subscribe(HEARTBEAT_PREFIX)
        sub.dial(url, block=False)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no heartbeat within {timeout:g} s")
            sub.recv_timeout = max(1, int(left * 1000))
            try:
                return decode_heartbeat(sub.recv())
            except pynng.Timeout:
                raise TimeoutError(f"no heartbeat within {timeout:g} s") from None
            except ValueError:
                continue   # not a heartbeat we understand: wait for the next


def _fetch_status(url: str, timeout: float, ca: Optional[str]) -> Dict[str, Any]:
    context = ssl.create_default_context(cafile=ca) if url.startswith("https:") else None
    with urllib.request.urlopen(url.rstrip("/") + "/status", timeout=timeout,
                                context=context) as response:
        data = json.loads(response.read(4 * 1024 * 1024).decode("utf-8"))
    if not isinstance(data, dict):
        raise ValueError("/status is not a JSON object")
    return data


def gather(url: str, *, metrics_url: Optional[str] = None, timeout: float = 3.0,
           ca: Optional[str] = None) -> StatusReport:
    """Read a relay's heartbeats and its metrics endpoint.

    Args:
        url: the stream (``tcp://``, ``ipc://``) or the metrics endpoint (``http://``).
        metrics_url: the metrics endpoint; by default the port plan's (``tcp://HOST:P`` ->
            ``http://HOST:P+3``; ``http://127.0.0.1:9203`` for an ``ipc://`` url).
        timeout: seconds to wait for a heartbeat, and per HTTP request.
        ca: CA file that signed an ``https://`` endpoint's certificate (default: the
            system's trust store).
    """
    if url.startswith(("http://", "https://")):
        report = StatusReport(None, url)
    else:
        report = StatusReport(url, metrics_url or planned_address([url], "metrics"))
        try:
            report.heartbeat = _heartbeat(url, timeout)
        except Exception as exc:  # any failure is reported, not raised
            report.problems.append(f"stream {url}: {exc}")
    if report.metrics_url is not None:
        try:
            report.status = _fetch_status(report.metrics_url, timeout, ca)
        except (OSError, ValueError) as exc:
            reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
            report.problems.append(f"metrics {report.metrics_url}: {reason}")
    return report


def _age(seconds: Optional[float]) -> str:
    return "-" if seconds is None else f"{seconds:.1f} s"


def format_report(report: StatusReport) -> str:
    """The report as a few readable lines."""
    lines: List[str] = []
    if not report.reachable:
        lines.append("qmt-relay: UNREACHABLE")
        lines.extend(f"  {p}" for p in report.problems)
        return "\n".join(lines) + "\n"
    hb, st = report.heartbeat or {}, report.status or {}
    health = st.get("health") or {}
    verdict = "HEALTHY" if report.healthy else "UNHEALTHY"
    status = health.get("status") or hb.get("status") or "?"
    lines.append(f"qmt-relay: {verdict} ({status})")
    if health.get("reason"):
        lines.append(f"  reason:       {health['reason']}")
    lines.append(f"  source:       {st.get('source') or hb.get('source') or '-'}")
    age = st.get("last_batch_age")
    if age is None and hb.get("last_data_ms") and hb.get("time_ms"):
        age = (hb["time_ms"] - hb["last_data_ms"]) / 1000.0
    lines.append(f"  last data:    {_age(age)} ago")
    lines.append(f"  seq:          {st.get('seq', hb.get('seq', '-'))}")
    lines.append(f"  run id:       {st.get('run_id') or hb.get('run_id') or '-'}")
    lines.append(f"  subscribers:  {st.get('subscribers', hb.get('subscribers', '-'))}")
    if st:
        dropped = st.get("dropped") or {}
        drops = ", ".join(f"{k} {v}" for k, v in sorted(dropped.items())) or "none"
        lines.append(f"  records:      {st.get('records', '-')} in {st.get('batches', '-')} "
                     "batches")
        lines.append(f"  drops:        {drops}")
        counters = st.get("counters") or {}
        if "recorder_dropped" in counters:
            lines.append(f"  recorder:     {counters.get('recorder_rows', 0)} rows, "
                         f"{counters['recorder_dropped']} dropped")
        quiet = st.get("quiet") or []
        if quiet:
            lines.append(f"  quiet:        {len(quiet)} ({', '.join(quiet[:5])}"
                         f"{', ...' if len(quiet) > 5 else ''})")
    for where, url in (("stream", report.stream_url), ("metrics", report.metrics_url)):
        if url:
            lines.append(f"  {where + ':':<13} {url}")
    lines.extend(f"  note:         {p}" for p in report.problems)
    return "\n".join(lines) + "\n"
