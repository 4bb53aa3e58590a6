"""Feed tracking, health rules, the per-relay registry, and the ops config and examples."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional

import pytest
import yaml
from helpers import REPO, ScriptedSource, free_tcp_port, ipc_address, real_tick
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from relay.app import Relay
from relay.config import Config, config_to_dict, load_config, parse_config
from relay.errors import ConfigError, PublishError
from relay.ops.alerts import PLACEHOLDERS
from relay.ops.http import OpsServer
from relay.ops.metrics import FeedTracker, OpsStatus, assess_health, build_registry

CONFIG_DIR = REPO / "config"
DAY = 1764633600.0 + 3600   # 2025-12-02 09:00 China time (01:00 UTC)


def test_feed_tracker_counts_today_per_market_and_resets_at_china_midnight() -> None:
    """Securities with a record today, by market; a new China day starts from zero."""
    tracker = FeedTracker(clock=lambda: DAY)
    tracker.observe(["600000.SH", "600001.SH", "000001.SZ"], ["SH", "SH", "SZ"], DAY)
    tracker.observe(["600000.SH", "430047.BJ"], ["SH", "BJ"], DAY + 3)   # BJ: new market
    assert {"SH": 2, "SZ": 1, "BJ": 1} == tracker.securities_today()
    assert {"SH": 3, "SZ": 1, "BJ": 1} == dict(tracker.records_by_market)
    tracker.observe(["000002.SZ"], ["SZ"], DAY + 15 * 3600)   # the next China day (00:00 + 1 h)
    assert {"SZ": 1} == tracker.securities_today()
    assert {"SH": 3, "SZ": 2, "BJ": 1} == dict(tracker.records_by_market)


def test_quiet_lists_silent_securities_only_while_their_market_is_active() -> None:
    """SH still trades, so a silent SH code is quiet; SZ went silent as a whole: not listed."""
    tracker = FeedTracker(clock=lambda: DAY)
    tracker.observe(["600000.SH", "600001.SH", "000001.SZ"], ["SH", "SH", "SZ"], DAY)
    tracker.observe(["600000.SH"], ["SH"], DAY + 200)
    assert ["600001.SH"] == tracker.quiet(DAY + 201, quiet_after=120)
    assert [] == tracker.quiet(DAY + 201, quiet_after=500)


@pytest.mark.parametrize(("kwargs", "expected"), [
    ({"state": "starting"}, (False, "starting")),
    ({"state": "stopping"}, (False, "stopping")),
    ({"connected": False}, (False, "down")),
    ({"in_window": True, "last_batch_age": 61.0}, (False, "stalled")),
    ({"in_window": True, "last_batch_age": None, "started_for": 61.0}, (False, "stalled")),
    ({"in_window": False, "last_batch_age": 5000.0}, (True, "up")),   # lunch, night
    ({"in_window": True, "last_batch_age": 3.0}, (True, "up")),
])
def test_health_rules(kwargs: Dict[str, Any], expected: Any) -> None:
    """Down when disconnected; stalled only inside a watch window; quiet hours are fine."""
    args: Dict[str, Any] = {"state": "running", "connected": True, "in_window": False,
                            "last_batch_age": 1.0, "stall_timeout": 60.0, "started_for": 10.0}
    args.update(kwargs)
    health = assess_health(**args)
    assert expected == (health.healthy, health.status)
    assert health.reason


def _status(**changes: Any) -> OpsStatus:
    fields: Dict[str, Any] = dict(
        time=DAY, run_id="r1", version="0.1.0", source="qmt", state="running", connected=True,
        in_window=True, last_batch_age=1.5, lag_s=0.25, seq=42, subscribers=3, batches=10,
        records=5000, messages=30, bytes=1_700_000, errors=1,
        dropped={"nan_price": 2, "bad_code": 1}, records_by_market={"SH": 3000, "SZ": 2000},
        securities_today={"SH": 2, "SZ": 2}, quiet=("600001.SH",),
        counters={"reconnects": 2, "stalls": 1, "recorder_rows": 4000, "recorder_queue": 5,
                  "snapshot_requests": 7, "history_requests": 4, "history_errors": 1,
                  "alerts_sent": 1},
        health=assess_health(state="running", connected=True, in_window=True,
                             last_batch_age=1.5, stall_timeout=60, started_for=9))
    fields.update(changes)
    return OpsStatus(**fields)


def _samples(registry: Any) -> Dict[str, float]:
    out: Dict[str, float] = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def test_registry_exposes_every_family_from_the_latest_snapshot() -> None:
    """Counters, labelled drops, gauges, the info metric; nothing in the global registry."""
    latest: List[Optional[OpsStatus]] = [None]
    before = set(REGISTRY._names_to_collectors)
    registry, histogram = build_registry(lambda: latest[0], run_id="r1", version="0.1.0",
                                         source="qmt")
    assert before == set(REGISTRY._names_to_collectors)
    assert "qmt_relay_records_total" not in _samples(registry)   # no snapshot yet
    latest[0] = _status()
    histogram.observe(0.004)
    got = _samples(registry)
    expected = {
        "qmt_relay_build_info{run_id=r1,source=qmt,version=0.1.0}": 1.0,
        "qmt_relay_batches_total": 10.0, "qmt_relay_records_total": 5000.0,
        "qmt_relay_messages_total": 30.0, "qmt_relay_bytes_total": 1_700_000.0,
        "qmt_relay_errors_total": 1.0,
        "qmt_relay_ticks_dropped_total{reason=bad_code}": 1.0,
        "qmt_relay_ticks_dropped_total{reason=nan_price}": 2.0,
        "qmt_relay_market_records_total{market=SH}": 3000.0,
        "qmt_relay_source_reconnects_total": 2.0, "qmt_relay_source_stalls_total": 1.0,
        "qmt_relay_recorder_rows_total": 4000.0, "qmt_relay_alerts_sent_total": 1.0,
        "qmt_relay_requests_total{service=snapshot}": 7.0,
        "qmt_relay_requests_total{service=history}": 4.0,
        "qmt_relay_request_errors_total{service=history}": 1.0,
        "qmt_relay_queue_depth{queue=recorder}": 5.0,
        "qmt_relay_source_up": 1.0, "qmt_relay_healthy": 1.0, "qmt_relay_in_watch_window": 1.0,
        "qmt_relay_seconds_since_push": 1.5, "qmt_relay_lag_seconds": 0.25,
        "qmt_relay_subscribers": 3.0, "qmt_relay_seq": 42.0,
        "qmt_relay_securities_today{market=SZ}": 2.0,
        "qmt_relay_quiet_securities{market=SH}": 1.0,
        "qmt_relay_batch_seconds_count": 1.0,
    }
    assert expected == {k: got.get(k) for k in expected}


def test_two_relays_in_one_process_keep_separate_registries() -> None:
    """Each registry reports its own snapshot."""
    a, _ = build_registry(lambda: _status(records=1), run_id="a", version="v", source="qmt")
    b, _ = build_registry(lambda: _status(records=2), run_id="b", version="v", source="qmt")
    assert (1.0, 2.0) == (_samples(a)["qmt_relay_records_total"],
                          _samples(b)["qmt_relay_records_total"])


def test_status_json_is_plain() -> None:
    """/status's document round-trips through JSON."""
    data = json.loads(json.dumps(_status().as_dict()))
    assert ["600001.SH"] == data["quiet"] and data["health"]["healthy"] is True


def test_metrics_endpoint_in_use_is_a_publish_error() -> None:
    """A taken port: a clear error naming the address, nothing left listening."""
    first = OpsServer("http://127.0.0.1:0", build_registry(lambda: None, run_id="r",
                      version="v", source="s")[0], lambda: None)
    first.start()
    try:
        second = OpsServer(first.url, first.registry, lambda: None)
        with pytest.raises(PublishError, match="metrics endpoint"):
            second.start()
    finally:
        first.close()
    with pytest.raises(PublishError, match="expected http://HOST:PORT"):
        OpsServer("ftp://127.0.0.1:1", first.registry, lambda: None).start()


def test_relay_in_process_feeds_the_snapshot_per_batch() -> None:
    """process() feeds the tracker; a sample reports totals, markets and the source state."""
    config = parse_config({"publish": {"addresses": [ipc_address()], "snapshot_address": None},
                           "metrics": {"address": f"http://127.0.0.1:{free_tcp_port()}"}})
    batch = {"600000.SH": real_tick(), "000001.SZ": real_tick(), "bad": {"time": 1}}
    relay = Relay(config, source=ScriptedSource([batch, batch], finish=True))
    relay.run()
    latest = relay.ops_status   # the last snapshot stays readable after the run
    assert latest is not None
    assert (2, 4, {"SH": 2, "SZ": 2}) == (latest.batches, latest.records,
                                         dict(latest.records_by_market))
    assert 2 == sum(latest.dropped.values())
    assert ("stopping", False) == (latest.state, latest.health.healthy)


def test_ops_config_defaults_and_errors(tmp_path: Path) -> None:
    """Defaults; each bad value names its dotted key."""
    config = Config()
    assert ("auto", 1.0, ()) == (config.metrics.address, config.metrics.sample_interval,
                                 config.alerts.webhooks)
    bad = {
        "metrics: {sample_interval: 0}": "metrics.sample_interval",
        "metrics: {address: 'tcp://127.0.0.1:1'}": "metrics.address",
        "alerts: {webhooks: ['ftp://x']}": "alerts.webhooks[0]",
        "alerts: {webhooks: [{url: nope}]}": "alerts.webhooks[0].url",
        "alerts: {webhooks: [{template: {a: 1}}]}": "alerts.webhooks[0].url",
        "alerts: {webhooks: [{url: 'http://a:1', tmpl: {}}]}": "alerts.webhooks[0].tmpl",
        "alerts: {webhooks: [{url: 'http://a:1', template: 'text'}]}":
            "alerts.webhooks[0].template",
        "alerts: {webhooks: [{url: 'http://a:1', template: {t: $oops}}]}":
            "alerts.webhooks[0].template",
        "alerts: {retries: -1}": "alerts.retries",
        "alerts: {rate_limit: 0}": "alerts.rate_limit",
    }
    for text, key in bad.items():
        path = tmp_path / "bad.yaml"
        path.write_text(text)
        with pytest.raises(ConfigError) as info:
            load_config(str(path))
        assert (str(path), key) == (info.value.path, info.value.key), text


@pytest.mark.parametrize("name", ["dingtalk", "wecom", "feishu", "slack"])
def test_alert_examples_load_and_use_known_placeholders(name: str) -> None:
    """config/alerts/*.yaml load as they are; a dumped config loads back equal."""
    config = load_config(str(CONFIG_DIR / "alerts" / f"{name}.yaml"))
    assert config.alerts.webhooks
    dumped = yaml.safe_dump(config_to_dict(config), sort_keys=False)
    assert config == parse_config(yaml.safe_load(dumped))
    assert {"text", "event"} <= PLACEHOLDERS


def test_grafana_dashboard_is_importable_json_over_our_metrics() -> None:
    """Valid JSON with a Prometheus datasource input; every query names a metric we export."""
    dashboard = json.loads((CONFIG_DIR / "grafana" / "qmt-relay-dashboard.json").read_text())
    assert [{"name": "DS_PROMETHEUS", "type": "datasource", "pluginId": "prometheus"}] == [
        {k: i[k] for k in ("name", "type", "pluginId")} for i in dashboard["__inputs"]]
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert exprs and all("qmt_relay_" in e for e in exprs)
    assert all(p["datasource"]["uid"] == "${DS_PROMETHEUS}" for p in dashboard["panels"])
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])


def test_operations_turn_health_changes_into_one_alert_each() -> None:
    """Lost, recovered, stalled (inside a watch window), recovered, recorder failure: once each."""
    from ops_helpers import WebhookServer, wait_for

    from relay.ops.monitor import Operations

    now = [1764640800.0]   # Tuesday 2025-12-02 10:00 China time: inside a watch window
    with WebhookServer() as server:
        config = parse_config({"metrics": {"address": None},
                               "source": {"qmt": {"stall_timeout": 30.0}},
                               "alerts": {"webhooks": [server.url]}})
        ops = Operations(config, run_id="r1", source="qmt", clock=lambda: now[0])
        ops.start()

        def sample(connected: bool = True, last: Optional[float] = None,
                   failures: int = 0) -> str:
            status = ops.sample(state="running", connected=connected,
                                last_batch_at=now[0] - 1 if last is None else last,
                                lag_ms=None, seq=1, subscribers=0,
                                totals=dict.fromkeys(("batches", "records", "messages", "bytes",
                                                      "errors"), 0),
                                dropped={}, counters={"recorder_failures": failures})
            return status.health.status

        ops.started(10)
        steps = [sample(), sample(connected=False), sample(connected=False), sample(),
                 sample(last=now[0] - 31), sample(last=now[0] - 40), sample(),
                 sample(failures=1), sample(failures=1)]
        ops.close(stopped={})
        wait_for(lambda: len(server.bodies) == 7, "alerts missing")
    assert ["up", "down", "down", "up", "stalled", "stalled", "up", "up", "up"] == steps
    assert ["relay_started", "feed_lost", "feed_recovered", "feed_stalled", "feed_recovered",
            "recorder_failed", "relay_stopped"] == server.events()


def test_allow_list_refuses_other_peers_before_they_are_answered() -> None:
    """Only 127.0.0.2 may ask; 127.0.0.1 is closed unanswered and counted as refused."""
    import socket

    refused: List[Any] = []
    server = OpsServer(f"http://127.0.0.1:{free_tcp_port()}",
                       build_registry(lambda: None, run_id="r", version="v", source="s")[0],
                       lambda: None, allow=lambda ip: ip == "127.0.0.2",
                       refuse=lambda service, ip: refused.append((service, ip)))
    server.start()
    port = int(server.url.rsplit(":", 1)[1])
    request = b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    try:
        answers = []
        for source_ip in ("127.0.0.1", "127.0.0.2"):
            with socket.socket() as s:
                s.settimeout(5)
                s.bind((source_ip, 0))
                s.connect(("127.0.0.1", port))
                try:
                    s.sendall(request)
                    answers.append(s.recv(12))
                except ConnectionResetError:
                    answers.append(b"")
    finally:
        server.close()
    assert [b"", b"HTTP/1.1 200"] == answers
    assert [("metrics", "127.0.0.1")] == refused


def test_https_endpoint_serves_with_the_security_tls_certificate(tmp_path: Path) -> None:
    """https:// uses security.tls's certificate; plain HTTP to it fails; no cert: an error."""
    import shutil
    import ssl
    import subprocess
    import urllib.request
    from types import SimpleNamespace

    from relay.ops.status import gather

    if shutil.which("openssl") is None:
        pytest.skip("https test skipped because the openssl command is not installed")
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2", "-subj",
                    "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    registry = build_registry(_status, run_id="r", version="v", source="qmt")[0]
    address = f"https://127.0.0.1:{free_tcp_port()}"
    with pytest.raises(PublishError, match=r"security\.tls\.cert"):
        OpsServer(address, registry, _status).start()
    server = OpsServer(address, registry, _status, clock=lambda: DAY,
                       tls=SimpleNamespace(cert=str(cert), key=str(key), ca=None))
    server.start()
    try:
        assert server.url.startswith("https://127.0.0.1:")
        plain = server.url.replace("https://", "http://") + "/healthz"
        with pytest.raises(OSError):
            urllib.request.urlopen(plain, timeout=5).read()
        context = ssl.create_default_context(cafile=str(cert))
        with urllib.request.urlopen(server.url + "/healthz", timeout=5,
                                    context=context) as response:
            assert (200, True) == (response.status, json.loads(response.read())["healthy"])
        report = gather(server.url, ca=str(cert))   # qmt-relay status URL --ca FILE
        assert (True, True, "r1") == (report.reachable, report.healthy,
                                      report.status and report.status["run_id"])
    finally:
        server.close()
    assert server.connection_errors >= 1
