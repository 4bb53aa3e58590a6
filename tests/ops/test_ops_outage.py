"""A MiniQMT outage as operations see it: /healthz, ``qmt-relay status``, webhooks, the page.

The relay runs as a subprocess with the qmt source over the hostile xtdata fake; the page is
checked in a real headless Chromium (Debian's ``chromium`` and ``chromium-driver``) through
selenium.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator, Optional

import pytest
from helpers import REPO, free_tcp_port, relay_env, tcp_address
from ops_helpers import LineReader, WebhookServer, get_json, metrics, status_command, wait_for

FAKES = REPO / "tests" / "fakes"
CONFIG = """
source:
  kind: qmt
  qmt:
    markets: [SH, SZ]
    batch_pause: 0.0
    check_interval: 0.05
    reconnect_min: 0.05
    reconnect_max: 0.2
publish:
  addresses: ["{publish}"]
  snapshot_address: null
  heartbeat_interval: 0.1
metrics:
  address: "{metrics}"
  sample_interval: 0.1
  history_minutes: 1
alerts:
  timeout: 10.0
  webhooks:
    - url: "{feishu}"
      template: {{msg_type: text, content: {{text: "$text"}}, event: "$event"}}
logging: {{format: json, stats_interval: 0.2}}
shutdown_timeout: 5.0
"""

CHROMIUM = ("chromium", "chromium-browser", "google-chrome")
DRIVER = "chromedriver"


def _browser(tmp_path: Path) -> Any:
    """A headless Chromium driven by selenium, or skip saying what is missing."""
    binary = next((path for path in map(shutil.which, CHROMIUM) if path), None)
    driver_path = shutil.which(DRIVER) or (
        "/usr/lib/chromium/chromedriver" if os.path.exists("/usr/lib/chromium/chromedriver")
        else None)
    if binary is None or driver_path is None:
        pytest.skip("health page test skipped because no Chromium and chromedriver were found "
                    "(apt-get install chromium chromium-driver; .ci/run installs them)")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("health page test skipped because selenium is not installed (test extra)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--window-size=1280,1000",
                 f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path=driver_path), options=options)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    driver = _browser(tmp_path)
    try:
        yield driver
    finally:
        driver.quit()


def _text(driver: Any, element_id: str) -> str:
    from selenium.webdriver.common.by import By

    return str(driver.find_element(By.ID, element_id).text)


def _stats_records(reader: LineReader) -> int:
    return sum(int(e["records"]) for e in reader.events("stats"))


def test_outage_flips_health_status_page_and_alerts_once_each(tmp_path: Path,
                                                               browser: Any) -> None:
    """Drop: 503, status 1, page DOWN, one feed_lost; restart: 200, status 0, one recovered."""
    publish = tcp_address()
    base = f"http://127.0.0.1:{free_tcp_port()}"
    control = tmp_path / "control"
    env = relay_env()
    env.update(PYTHONPATH=str(FAKES) + os.pathsep + env["PYTHONPATH"],
               FAKE_XTDATA_CONTROL=str(control), FAKE_XTDATA_SECURITIES="60",
               FAKE_XTDATA_PUSH_INTERVAL="0.05")
    with WebhookServer() as feishu:
        cfg = tmp_path / "relay.yaml"
        cfg.write_text(CONFIG.format(publish=publish, metrics=base, feishu=feishu.url))
        proc = subprocess.Popen([sys.executable, "-m", "relay", "run", "--config", str(cfg)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=env, cwd=tmp_path)
        reader = LineReader(proc)
        try:
            wait_for(lambda: _healthz(base) == 200, "relay never became healthy")
            browser.get(base + "/?interval=200")
            wait_for(lambda: _text(browser, "status") == "UP", "page never showed UP")
            first = _text(browser, "records")
            wait_for(lambda: _text(browser, "records") != first, "page numbers never moved")
            assert "qmt" == _text(browser, "source")
            assert 0 == status_command(publish).returncode

            control.write_text("drop\n")
            wait_for(lambda: _healthz(base) == 503, "healthz still 200 after the drop")
            status, body = get_json(base + "/healthz")
            assert (503, False, "down") == (status, body["healthy"], body["status"])
            done = status_command(publish)
            assert 1 == done.returncode, done.stdout + done.stderr
            assert "UNHEALTHY (down)" in done.stdout
            wait_for(lambda: _text(browser, "status") == "DOWN", "page never showed DOWN")
            assert "not connected" in _text(browser, "reason")
            browser.save_screenshot(str(tmp_path / "page-down.png"))
            # No data flows while down: the counters settle on what the stats lines logged.
            wait_for(lambda: metrics(base)["qmt_relay_records_total"] == _stats_records(reader)
                     > 0, "metrics never matched the stats lines")
            assert metrics(base)["qmt_relay_batches_total"] == sum(
                int(e["batches"]) for e in reader.events("stats"))
            assert 0.0 == metrics(base)["qmt_relay_source_up"]

            control.write_text("drop\nrestore\nrestart\n")
            wait_for(lambda: _healthz(base) == 200, "healthz never recovered")
            assert 0 == status_command(publish).returncode
            wait_for(lambda: _text(browser, "status") == "UP", "page never showed UP again")
            assert metrics(base)["qmt_relay_source_reconnects_total"] >= 1
            wait_for(lambda: "feed_recovered" in feishu.events(), "no recovered alert")
        finally:
            err = reader.finish(proc)
    assert 0 == proc.returncode, err
    events = feishu.events()
    assert ["relay_started", "feed_lost", "feed_recovered", "relay_stopped"] == events
    assert all(body["msg_type"] == "text" and body["content"]["text"].startswith("[qmt-relay] ")
               for body in feishu.bodies)
    assert "not connected" in feishu.bodies[1]["content"]["text"]


def _healthz(base: str) -> Optional[int]:
    try:
        return get_json(base + "/healthz")[0]
    except OSError:
        return None
